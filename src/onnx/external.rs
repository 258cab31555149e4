//! Resolution of external tensor data. A tensor's `location` is taken relative to the model's folder and
//! must stay inside it: absolute paths, `..` components and symlinks that lead out are refused. The byte
//! range is checked against the file's size, and the data is memory-mapped, so a large model is never
//! copied into memory on load.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use super::pb::TensorProto;
use super::pb::tensor_proto::DataLocation;
use crate::error::{Error, Result};

/// Files smaller than this are read rather than mapped.
const MAP_THRESHOLD: u64 = 1 << 20;

/// Reads a file as Bytes: memory-mapped when large, read otherwise.
pub(crate) fn file_bytes(path: &Path) -> Result<Bytes> {
    let read_err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len < MAP_THRESHOLD {
        return std::fs::read(path).map(Bytes::from).map_err(read_err);
    }
    // SAFETY: the map is read-only. Like every memory-mapping reader, quench relies on the file not
    // being truncated while the model is loaded; saving refuses to write over any file a loaded model
    // maps, so quench itself never does that.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(read_err)?);
    let mut maps = MAPS.lock().unwrap_or_else(|e| e.into_inner());
    maps.retain(|m| m.strong_count() > 0);
    maps.push(Arc::downgrade(&map));
    Ok(Bytes::from_owner(Mapped(map)))
}

/// A read-only file mapping shared by the Bytes that point into it.
struct Mapped(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Every live mapping `file_bytes` made, so that [`release_pages`] can tell mapped data from heap data.
static MAPS: Mutex<Vec<Weak<memmap2::Mmap>>> = Mutex::new(Vec::new());

/// Alignment of released ranges: a multiple of every common page size (4, 16 and 64 KiB).
const RELEASE_ALIGN: usize = 1 << 16;

/// Lets the kernel drop the resident pages of `data` when it lies inside a read-only file mapping made
/// by [`file_bytes`] (only whole aligned pages inside `data`); the pages are read again from the file if
/// touched later. Passes that read a large weight once call this so that the input model does not stay
/// resident beside its rewrite. Does nothing for heap data.
pub fn release_pages(data: &[u8]) {
    let start = data.as_ptr() as usize;
    let end = start + data.len();
    let maps = MAPS.lock().unwrap_or_else(|e| e.into_inner());
    for map in maps.iter().filter_map(Weak::upgrade) {
        let base = map.as_ptr() as usize;
        if start < base || end > base + map.len() {
            continue;
        }
        let lo = (start - base).div_ceil(RELEASE_ALIGN) * RELEASE_ALIGN;
        let hi = (end - base) / RELEASE_ALIGN * RELEASE_ALIGN;
        if hi > lo {
            // SAFETY: the mapping is private and read-only and nothing writes to it, so after
            // MADV_DONTNEED a read faults the same bytes back in from the file (the file must not change
            // while mapped, which every mapped read already relies on, see `file_bytes`). The range lies
            // inside the mapping, which `map` keeps alive.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
            };
        }
        return;
    }
}

/// Whether `data` lies inside a read-only file mapping made by [`file_bytes`].
pub(crate) fn is_mapped(data: &[u8]) -> bool {
    let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
    let maps = MAPS.lock().unwrap_or_else(|e| e.into_inner());
    maps.iter().filter_map(Weak::upgrade).any(|map| {
        let base = map.as_ptr() as usize;
        start >= base && end <= base + map.len()
    })
}

pub(crate) struct Resolver {
    base: Option<PathBuf>,
    files: BTreeMap<PathBuf, Bytes>,
}

impl Resolver {
    pub fn new(base: Option<&Path>) -> Resolver {
        Resolver {
            base: base.map(Path::to_path_buf),
            files: BTreeMap::new(),
        }
    }

    /// The canonical paths of every external data file used.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.files.keys()
    }

    pub fn resolve(&mut self, t: &mut TensorProto) -> Result<()> {
        if t.data_location != DataLocation::External as i32 {
            if !t.external_data.is_empty() {
                return Err(self.err(t, "entries are present but data_location is not EXTERNAL"));
            }
            return Ok(());
        }
        let (mut location, mut offset, mut length) = (None, 0u64, None);
        for e in &t.external_data {
            let parse = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{} '{v}' is not a byte count", e.key))
            };
            match e.key.as_str() {
                "location" => location = Some(e.value.clone()),
                "offset" => offset = parse(&e.value).map_err(|r| self.err(t, &r))?,
                "length" => length = Some(parse(&e.value).map_err(|r| self.err(t, &r))?),
                "checksum" | "basepath" => {}
                other => return Err(self.err(t, &format!("has an unknown key '{other}'"))),
            }
        }
        let location = location.ok_or_else(|| self.err(t, "has no location"))?;
        let path = self.checked_path(t, &location)?;
        let data = match self.files.get(&path) {
            Some(d) => d.clone(),
            None => {
                let d = file_bytes(&path)?;
                self.files.insert(path.clone(), d.clone());
                d
            }
        };
        let size = data.len() as u64;
        let length = length.unwrap_or(size.saturating_sub(offset));
        let end = offset.checked_add(length).filter(|&end| end <= size).ok_or_else(|| {
            self.err(
                t,
                &format!(
                    "range offset {offset} + length {length} runs past the end of '{location}' ({size} bytes)"
                ),
            )
        })?;
        t.raw_data = data.slice(offset as usize..end as usize);
        t.external_data.clear();
        t.data_location = DataLocation::Default as i32;
        Ok(())
    }

    fn checked_path(&self, t: &TensorProto, location: &str) -> Result<PathBuf> {
        let rel = Path::new(location);
        if location.is_empty() {
            return Err(self.err(t, "has an empty location"));
        }
        let looks_absolute = rel.is_absolute()
            || location.starts_with('/')
            || location.starts_with('\\')
            || location.as_bytes().get(1) == Some(&b':');
        if looks_absolute
            || rel
                .components()
                .any(|c| matches!(c, Component::RootDir | Component::Prefix(_)))
        {
            return Err(self.err(t, &format!("location '{location}' is an absolute path")));
        }
        if rel.components().any(|c| c == Component::ParentDir)
            || location.split(['/', '\\']).any(|p| p == "..")
        {
            return Err(self.err(
                t,
                &format!("location '{location}' leaves the model's folder ('..')"),
            ));
        }
        let Some(base) = &self.base else {
            return Err(self.err(
                t,
                "cannot be resolved: the model was loaded from bytes without a folder",
            ));
        };
        let joined = base.join(rel);
        let canonical = joined
            .canonicalize()
            .map_err(|e| self.err(t, &format!("location '{location}' cannot be opened: {e}")))?;
        let base = base.canonicalize().map_err(|source| Error::Read {
            path: base.clone(),
            source,
        })?;
        if !canonical.starts_with(&base) {
            return Err(self.err(
                t,
                &format!(
                    "location '{location}' resolves outside the model's folder (through a symlink)"
                ),
            ));
        }
        if !canonical.is_file() {
            return Err(self.err(t, &format!("location '{location}' is not a regular file")));
        }
        Ok(canonical)
    }

    fn err(&self, t: &TensorProto, reason: &str) -> Error {
        Error::ExternalData {
            tensor: t.name.clone(),
            reason: reason.to_string(),
        }
    }
}
