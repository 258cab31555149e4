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

/// A temporary file in `dir` that is renamed over an output once complete. Its mode is the one a
/// plain create gives (0666 less the process umask), not the 0600 of a private temporary file, so
/// the renamed output can be read by whoever could read a file written directly.
///
/// The name carries the writing process's id (`.quench-PID-XXXXXX.tmp`): a process killed before its
/// rename leaves its temporary file behind, and the next write into the folder removes the files of
/// processes that no longer run.
pub fn output_temp(dir: &std::path::Path) -> std::io::Result<tempfile::NamedTempFile> {
    remove_stale_temps(dir);
    let prefix = format!(".quench-{}-", std::process::id());
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o666));
    }
    b.tempfile_in(dir)
}

/// Removes the temporary output files in `dir` left by quench processes that have ended (Linux,
/// where `/proc` tells which run; elsewhere nothing is removed).
fn remove_stale_temps(dir: &std::path::Path) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".quench-"))
            .filter(|n| n.ends_with(".tmp"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
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
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = output_temp(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {}", path.display(), e.error))?;
    Ok(())
}

/// Lower-case hexadecimal digits of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// An output is readable as a directly created file would be: mode 0666 less the umask, not
    /// the 0600 of a private temporary file.
    #[test]
    fn atomic_outputs_take_the_umask_mode() {
        use std::os::unix::fs::PermissionsExt;
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .expect("Umask line in /proc/self/status");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("out.bin");
        super::write_atomic(&path, b"abc").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask, "umask {umask:o}");
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left beside the output");
    }
}

/// Hands memory the allocator keeps after frees back to the system (glibc; elsewhere a no-op), so the
/// resident size does not keep the blocks of work that is over: past calibration batches, a model's
/// load.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
