//! Benchmarks: how long a model takes to load and to run a batch, and how much memory it needs.
//!
//! One measurement is one model in one runtime. Peak RSS is a property of a whole process, so the CLI runs
//! each measurement in a fresh child process of its own; this module measures in the current process.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::exec::{self, Named, Prepared, RuntimeKind, SessionOptions};
use crate::ir::Model;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub runtime: RuntimeKind,
    pub session: SessionOptions,
    pub warmup: usize,
    pub runs: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchResult {
    pub model: String,
    pub runtime: String,
    pub threads: usize,
    /// File to a session ready for the first batch (parse, IR, runtime session).
    pub load_ms: f64,
    /// The first run, which includes tract's optimisation for the input shapes.
    pub first_run_ms: f64,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub mean_ms: f64,
    pub runs: usize,
    pub batches: usize,
    /// Peak resident set size of the process (Linux VmHWM) from the start of the load (the count is
    /// reset there where the OS allows), when known.
    pub peak_rss_mb: Option<f64>,
    pub settings: Vec<(String, String)>,
}

/// Peak resident set size of this process in bytes (Linux; None elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Starts the peak-RSS count afresh (Linux: `clear_refs` 5), so that what ran before (making the input
/// batches from another model, say) is not charged to the model measured next. False where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

/// Loads `path` and times `opts.runs` runs after `opts.warmup` warm-up runs, cycling through `batches`.
pub fn bench(path: &Path, batches: &[Vec<Named>], opts: &BenchOptions) -> Result<BenchResult> {
    anyhow::ensure!(!batches.is_empty(), "no input batches to run");
    reset_peak_rss();
    let start = Instant::now();
    let model = Model::load(path)?;
    let prepared = Prepared::from_model(&model, &path.display().to_string());
    drop(model);
    for (i, b) in batches.iter().enumerate() {
        exec::check_batch(&prepared.inputs, b).with_context(|| format!("input batch {i}"))?;
    }
    let mut session = exec::open(&prepared, opts.runtime, &opts.session)?;
    drop(prepared);
    let load_ms = start.elapsed().as_secs_f64() * 1e3;

    let t = Instant::now();
    session.run(&batches[0])?;
    let first_run_ms = t.elapsed().as_secs_f64() * 1e3;
    for i in 0..opts.warmup {
        session.run(&batches[i % batches.len()])?;
    }
    let mut times = Vec::with_capacity(opts.runs);
    for i in 0..opts.runs.max(1) {
        let b = &batches[i % batches.len()];
        let t = Instant::now();
        let out = session.run(b)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    let mean_ms = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    Ok(BenchResult {
        model: path.display().to_string(),
        runtime: opts.runtime.name().to_string(),
        threads: opts.session.threads,
        load_ms,
        first_run_ms,
        median_ms: percentile(&times, 0.5),
        p90_ms: percentile(&times, 0.9),
        mean_ms,
        runs: times.len(),
        batches: batches.len(),
        peak_rss_mb: peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        settings: session.settings(),
    })
}

/// A table of results, with ratios against the first model measured in the same runtime.
pub fn render(results: &[BenchResult]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<40} {:<6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "model", "rt", "load ms", "first ms", "median ms", "p90 ms", "peak MB", "× time", "× RSS"
    );
    for r in results {
        let base = results.iter().find(|b| b.runtime == r.runtime).unwrap_or(r);
        let rss = r
            .peak_rss_mb
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "-".into());
        let rss_ratio = match (r.peak_rss_mb, base.peak_rss_mb) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let name = Path::new(&r.model)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<40} {:<6} {:>8.1} {:>9.1} {:>9.2} {:>9.2} {:>9} {:>8.2} {:>8}",
            name,
            r.runtime,
            r.load_ms,
            r.first_run_ms,
            r.median_ms,
            r.p90_ms,
            rss,
            r.median_ms / base.median_ms,
            rss_ratio
        );
    }
    s
}
