//! Small shared helpers: progress bars that show on a terminal and stay quiet in pipes and CI.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on stderr when it is a terminal and CI is not set; otherwise nothing.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    pub fn new(total: u64, what: &str) -> Progress {
        let quiet = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
            || !std::io::stderr().is_terminal();
        if quiet || total == 0 {
            return Progress(None);
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Progress(Some(bar))
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// Writes a file atomically: a temporary file in the same folder, synced, then renamed over `path`.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {}", path.display(), e.error))?;
    Ok(())
}

/// Standard normal samples (Box–Muller over a seeded ChaCha8), for unit tests.
#[cfg(test)]
pub(crate) fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    use rand_chacha::ChaCha8Rng;
    use rand_core::{Rng, SeedableRng};
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1 = ((rng.next_u32() as f64 + 1.0) / (u32::MAX as f64 + 2.0)).max(1e-12);
            let u2 = rng.next_u32() as f64 / u32::MAX as f64;
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}
