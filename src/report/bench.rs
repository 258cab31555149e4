//! Benchmarks: how long a model takes to load and to run a batch, and how much memory it needs.
//!
//! One measurement is one model in one runtime. Peak RSS is a property of a whole process, so the CLI runs
//! each measurement in a fresh child process of its own; this module measures in the current process.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::exec::{self, Named, OpTimes, Prepared, RuntimeKind, SessionOptions};
use crate::ir::Model;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub runtime: RuntimeKind,
    pub session: SessionOptions,
    pub warmup: usize,
    pub runs: usize,
    /// Time every operator of the timed runs (tract only; the timing adds a little to each run).
    pub profile: bool,
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
    /// With `profile`: time per run by kind of operator, the slowest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<OpTime>,
}

/// The time one kind of operator took per run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpTime {
    pub op: String,
    /// Evaluations per run (nodes of this kind, times the steps of any loop they sit in).
    pub evals: f64,
    pub ms: f64,
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

/// A model loaded and run once: what [`bench`] and [`bench_interleaved`] time next.
struct Loaded {
    path: String,
    session: Box<dyn exec::Session>,
    load_ms: f64,
    first_run_ms: f64,
    times: Vec<f64>,
    /// Operator times of the timed runs, when profiling.
    ops: Option<OpTimes>,
}

/// Loads `path` into a session, checks the batches against its inputs and runs the first batch (which
/// includes tract's optimisation for the input shapes) and `opts.warmup` more.
fn load(path: &Path, batches: &[Vec<Named>], opts: &BenchOptions) -> Result<Loaded> {
    anyhow::ensure!(!batches.is_empty(), "no input batches to run");
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
    Ok(Loaded {
        path: path.display().to_string(),
        session,
        load_ms,
        first_run_ms,
        times: Vec::with_capacity(opts.runs),
        ops: opts.profile.then(OpTimes::default),
    })
}

impl Loaded {
    /// Times run `i` (batch `i` modulo their number).
    fn time_run(&mut self, i: usize, batches: &[Vec<Named>]) -> Result<()> {
        let b = &batches[i % batches.len()];
        let t = Instant::now();
        let out = match &mut self.ops {
            None => self.session.run(b)?,
            Some(ops) => self.session.run_timing_ops(b, ops)?,
        };
        self.times.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
        Ok(())
    }

    fn result(mut self, opts: &BenchOptions, batches: usize, rss: Option<f64>) -> BenchResult {
        let times = &mut self.times;
        let mean_ms = times.iter().sum::<f64>() / times.len().max(1) as f64;
        times.sort_by(f64::total_cmp);
        let runs = times.len().max(1) as f64;
        let mut ops: Vec<OpTime> = (self.ops.take().unwrap_or_default().0)
            .into_iter()
            .map(|(op, (secs, n))| OpTime {
                op,
                evals: n as f64 / runs,
                ms: secs * 1e3 / runs,
            })
            .collect();
        ops.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.op.cmp(&b.op)));
        BenchResult {
            model: self.path,
            runtime: opts.runtime.name().to_string(),
            threads: opts.session.threads,
            load_ms: self.load_ms,
            first_run_ms: self.first_run_ms,
            median_ms: percentile(times, 0.5),
            p90_ms: percentile(times, 0.9),
            mean_ms,
            runs: times.len(),
            batches,
            peak_rss_mb: rss,
            settings: self.session.settings(),
            ops,
        }
    }
}

/// Loads `path` and times `opts.runs` runs after `opts.warmup` warm-up runs, cycling through `batches`.
pub fn bench(path: &Path, batches: &[Vec<Named>], opts: &BenchOptions) -> Result<BenchResult> {
    reset_peak_rss();
    let mut loaded = load(path, batches, opts)?;
    for i in 0..opts.runs.max(1) {
        loaded.time_run(i, batches)?;
    }
    let rss = peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0));
    Ok(loaded.result(opts, batches.len(), rss))
}

/// Loads every model in this process, then times their runs in turn (run 1 of each model, then run 2
/// of each, …), so that a machine whose speed drifts during the measurement (another tenant, clock
/// changes) slows every model alike and the ratios between them hold. Peak RSS is not given: one
/// process holds them all.
pub fn bench_interleaved(
    paths: &[&Path],
    batches: &[Vec<Named>],
    opts: &BenchOptions,
) -> Result<Vec<BenchResult>> {
    let mut loaded = paths
        .iter()
        .map(|p| load(p, batches, opts).with_context(|| format!("{}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    for i in 0..opts.runs.max(1) {
        for l in &mut loaded {
            let path = l.path.clone();
            l.time_run(i, batches).with_context(|| path)?;
        }
    }
    Ok(loaded
        .into_iter()
        .map(|l| l.result(opts, batches.len(), None))
        .collect())
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
    for r in results.iter().filter(|r| !r.ops.is_empty()) {
        s.push_str(&render_ops(r));
    }
    s
}

/// Operators that took less than this share of a profiled run are summed on one line.
const MINOR_OP_SHARE: f64 = 0.01;

/// A profiled model's time per run by kind of operator, the slowest first.
fn render_ops(r: &BenchResult) -> String {
    use std::fmt::Write;
    let total: f64 = r.ops.iter().map(|o| o.ms).sum();
    let mut s = format!(
        "\n{} in {}: {:.2} ms per run in operators\n{:<32} {:>9} {:>10} {:>7}\n",
        r.model, r.runtime, total, "operator", "evals", "ms per run", "share"
    );
    let (major, minor): (Vec<&OpTime>, Vec<&OpTime>) = r
        .ops
        .iter()
        .partition(|o| total <= 0.0 || o.ms / total >= MINOR_OP_SHARE);
    let line = |s: &mut String, op: &str, evals: f64, ms: f64| {
        let share = if total > 0.0 { 100.0 * ms / total } else { 0.0 };
        let _ = writeln!(s, "{op:<32} {evals:>9.0} {ms:>10.3} {share:>6.1}%");
    };
    for o in major {
        line(&mut s, &o.op, o.evals, o.ms);
    }
    if !minor.is_empty() {
        let label = format!("{} others", minor.len());
        let evals = minor.iter().map(|o| o.evals).sum();
        let ms = minor.iter().map(|o| o.ms).sum();
        line(&mut s, &label, evals, ms);
    }
    s
}
