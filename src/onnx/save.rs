//! Writing a ModelProto: atomically (a temporary file in the target folder, renamed into place), never
//! over a file the loaded model was read from, byte-deterministically, streaming (the encoded model is
//! never held in memory as a whole), and with tensor data moved to an external file when asked or when
//! the protobuf would pass the 2 GiB limit of the format.
//!
//! A model and its data file cannot be renamed into place together, so the data file is named after
//! its contents, `<file>.<tag>.data` with `tag` the first 8 hex digits of its SHA-256: it is renamed
//! in beside the previous pair without touching it, the model's rename then switches from the
//! previous pair to the new one, and only after that are the data files of earlier writes to the
//! same `<file>` removed. A process killed at any point leaves the previous pair or the new one.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes};
use prost::Message;
use sha2::{Digest, Sha256};

use super::dtype::DataType;
use super::pb::tensor_proto::DataLocation;
use super::pb::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};
use super::tensor::{payload_bytes, raw_bytes};
use crate::error::{Error, Result};

/// Protobuf messages cannot exceed 2 GiB.
pub const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;

/// Where tensor payloads go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalData {
    /// Inline, unless the model would exceed the protobuf limit; then initializers of at least 1 KiB
    /// move to `<file>.<tag>.data`.
    Auto,
    /// Initializers of at least `threshold` bytes move to `<file>.<tag>.data`.
    Always { threshold: u64 },
}

#[derive(Clone, Debug)]
pub struct SaveOptions {
    pub external: ExternalData,
    /// The size past which `Auto` moves data out: the protobuf limit, lower only in tests.
    pub protobuf_limit: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            external: ExternalData::Auto,
            protobuf_limit: PROTOBUF_LIMIT,
        }
    }
}

impl SaveOptions {
    /// Initializers of at least `threshold` bytes go to `<file>.<tag>.data`.
    pub fn external(threshold: u64) -> SaveOptions {
        SaveOptions {
            external: ExternalData::Always { threshold },
            ..Default::default()
        }
    }
}

const AUTO_THRESHOLD: u64 = 1024;

/// Writes `proto` to `path`. `sources` are the files the model was read from; none of them is overwritten.
/// Returns the path of the external data file when one was written.
pub fn write_model_file(
    mut proto: ModelProto,
    path: &Path,
    sources: &[PathBuf],
    opts: &SaveOptions,
) -> Result<Option<PathBuf>> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Write {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        })?
        .to_string_lossy()
        .into_owned();
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    refuse_sources(path, sources, "the model file or an external data file")?;

    let threshold = match opts.external {
        ExternalData::Always { threshold } => Some(threshold),
        ExternalData::Auto if proto.encoded_len() as u64 > opts.protobuf_limit => {
            Some(AUTO_THRESHOLD)
        }
        ExternalData::Auto => None,
    };
    let mut data_file = None;
    if let Some(threshold) = threshold {
        // Written under a provisional location, renamed once the contents (and so the tag) are known.
        let provisional = format!("{file_name}.data");
        let mut tmp = temp_in(&folder, &folder.join(&provisional))?;
        let digest = {
            let mut writer = Hashing {
                out: BufWriter::with_capacity(1 << 20, tmp.as_file_mut()),
                hash: Sha256::new(),
            };
            let mut offset = 0u64;
            let wrote = |e| Error::Write {
                path: folder.join(&provisional),
                source: e,
            };
            if let Some(g) = proto.graph.as_mut() {
                externalize_graph(g, threshold, &provisional, &mut writer, &mut offset)
                    .map_err(wrote)?;
            }
            writer.out.flush().map_err(wrote)?;
            writer.hash.finalize()
        };
        let tag = crate::util::hex(&digest[..4]);
        let data_name = format!("{file_name}.{tag}.data");
        if let Some(g) = proto.graph.as_mut() {
            relocate_graph(g, &provisional, &data_name);
        }
        let data_path = folder.join(&data_name);
        refuse_sources(&data_path, sources, "an external data file")?;
        if proto.encoded_len() as u64 > opts.protobuf_limit {
            return Err(Error::Model(format!(
                "still {} bytes after moving initializers to external data (large Constant nodes?)",
                proto.encoded_len()
            )));
        }
        data_file = Some((tmp, data_path));
    }

    let mut tmp = temp_in(&folder, path)?;
    {
        let mut out = StreamBuf::new(BufWriter::with_capacity(1 << 16, tmp.as_file_mut()));
        proto
            .encode(&mut out)
            .map_err(|e| Error::Model(format!("cannot encode: {e}")))?;
        out.finish().map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let mut written_data = None;
    if let Some((data_tmp, data_path)) = data_file {
        data_tmp.persist(&data_path).map_err(|e| Error::Write {
            path: data_path.clone(),
            source: e.error,
        })?;
        written_data = Some(data_path);
    }
    tmp.persist(path).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    remove_earlier_data(&folder, &file_name, written_data.as_deref(), sources);
    Ok(written_data)
}

/// A writer that hashes what it passes on.
struct Hashing<W: Write> {
    out: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Whether `name` is a data file this module writes for the model file `file_name`.
fn is_data_of(name: &str, file_name: &str) -> bool {
    name.strip_prefix(file_name)
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_suffix(".data"))
        .is_some_and(|tag| tag.len() == 8 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Removes the data files earlier writes of `file_name` left in `folder` (the model file now names
/// `kept`, or none), except files the model was read from.
fn remove_earlier_data(folder: &Path, file_name: &str, kept: Option<&Path>, sources: &[PathBuf]) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let p = folder.join(name);
        if !is_data_of(name, file_name) || kept.is_some_and(|k| k == p) {
            continue;
        }
        if refuse_sources(&p, sources, "an external data file").is_ok() {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Points the external data entries at `from` to `to`, in `g` and its subgraphs.
fn relocate_graph(g: &mut GraphProto, from: &str, to: &str) {
    for t in &mut g.initializer {
        for e in &mut t.external_data {
            if e.key == "location" && e.value == from {
                e.value = to.to_string();
            }
        }
    }
    for node in &mut g.node {
        for attr in &mut node.attribute {
            if let Some(sub) = attr.g.as_mut() {
                relocate_graph(sub, from, to);
            }
            for sub in &mut attr.graphs {
                relocate_graph(sub, from, to);
            }
        }
    }
}

fn temp_in(folder: &Path, target: &Path) -> Result<tempfile::NamedTempFile> {
    crate::util::output_temp(folder).map_err(|source| Error::Write {
        path: target.to_path_buf(),
        source,
    })
}

/// Fails when `target` names the same file as one of `sources` (by path or, on Unix, by inode).
fn refuse_sources(target: &Path, sources: &[PathBuf], what: &'static str) -> Result<()> {
    let Ok(meta) = std::fs::metadata(target) else {
        return Ok(());
    };
    let canonical = target.canonicalize().ok();
    for s in sources {
        if canonical.as_ref() == Some(s) || same_inode(&meta, s) {
            return Err(Error::Overwrite {
                path: target.to_path_buf(),
                what,
            });
        }
    }
    Ok(())
}

#[cfg(unix)]
fn same_inode(meta: &std::fs::Metadata, other: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(other).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
}

#[cfg(not(unix))]
fn same_inode(_: &std::fs::Metadata, _: &Path) -> bool {
    false
}

/// Moves the payload of every initializer of `g` and its subgraphs of at least `threshold` bytes to the
/// data file. Large tensors start on page boundaries so that readers can map them.
fn externalize_graph(
    g: &mut GraphProto,
    threshold: u64,
    location: &str,
    out: &mut impl Write,
    offset: &mut u64,
) -> io::Result<()> {
    for t in &mut g.initializer {
        if t.data_type == DataType::String as i32 || payload_bytes(t) < threshold {
            continue;
        }
        let Some(raw) = raw_bytes(t) else { continue };
        let align = if raw.len() >= 1 << 20 { 4096 } else { 64 };
        let start = offset.div_ceil(align) * align;
        out.write_all(&vec![0u8; (start - *offset) as usize])?;
        out.write_all(&raw)?;
        *offset = start + raw.len() as u64;
        set_external(t, location, start, raw.len() as u64);
    }
    for node in &mut g.node {
        for attr in &mut node.attribute {
            if let Some(sub) = attr.g.as_mut() {
                externalize_graph(sub, threshold, location, out, offset)?;
            }
            for sub in &mut attr.graphs {
                externalize_graph(sub, threshold, location, out, offset)?;
            }
        }
    }
    Ok(())
}

fn set_external(t: &mut TensorProto, location: &str, offset: u64, length: u64) {
    t.raw_data = Bytes::new();
    t.float_data.clear();
    t.int32_data.clear();
    t.int64_data.clear();
    t.double_data.clear();
    t.uint64_data.clear();
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    t.external_data = vec![
        entry("location", location.to_string()),
        entry("offset", offset.to_string()),
        entry("length", length.to_string()),
    ];
    t.data_location = DataLocation::External as i32;
}

/// A `BufMut` that streams into a writer through a fixed buffer, so that prost can encode a model of
/// any size without an intermediate copy. I/O errors are kept and returned by `finish`.
struct StreamBuf<W: Write> {
    out: W,
    buf: Vec<u8>,
    error: Option<io::Error>,
}

impl<W: Write> StreamBuf<W> {
    fn new(out: W) -> Self {
        StreamBuf {
            out,
            buf: Vec::with_capacity(1 << 16),
            error: None,
        }
    }

    fn flush_buf(&mut self) {
        if self.error.is_none()
            && let Err(e) = self.out.write_all(&self.buf)
        {
            self.error = Some(e);
        }
        self.buf.clear();
    }

    fn finish(mut self) -> io::Result<()> {
        self.flush_buf();
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.out.flush()
    }
}

// SAFETY: `chunk_mut` hands out the vector's spare capacity, and `advance_mut` only extends the vector's
// length over bytes the caller has written into that capacity (checked against it).
unsafe impl<W: Write> BufMut for StreamBuf<W> {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize - self.buf.len()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.buf.len() + cnt;
        assert!(len <= self.buf.capacity(), "advance_mut past the buffer");
        // SAFETY: the caller initialised `cnt` bytes of the spare capacity returned by chunk_mut.
        unsafe { self.buf.set_len(len) };
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
        UninitSlice::uninit(self.buf.spare_capacity_mut())
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() > self.buf.capacity() - self.buf.len() {
            self.flush_buf();
            if src.len() >= self.buf.capacity() {
                if self.error.is_none()
                    && let Err(e) = self.out.write_all(src)
                {
                    self.error = Some(e);
                }
                return;
            }
        }
        self.buf.extend_from_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_encoding_equals_encode_to_vec() {
        let t = TensorProto {
            name: "w".into(),
            dims: vec![300_000],
            data_type: 2,
            raw_data: Bytes::from((0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
            float_data: vec![],
            ..Default::default()
        };
        let model = ModelProto {
            ir_version: Some(9),
            graph: Some(GraphProto {
                name: Some("g".into()),
                initializer: vec![t.clone(), t],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut out = Vec::new();
        let mut sb = StreamBuf::new(&mut out);
        model.encode(&mut sb).unwrap();
        sb.finish().unwrap();
        assert_eq!(out, model.encode_to_vec());
    }
}
