//! Reading ModelProto from a file or from bytes. The file is memory-mapped and tensor payloads stay
//! slices of the map (prost decodes `bytes` fields into `Bytes` without copying).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use super::external::{Resolver, file_bytes};
use super::pb::ModelProto;
use super::walk::model_tensors_mut;
use crate::error::{Error, Result};

/// A decoded model with its external data resolved, and the files it was read from.
pub struct LoadedProto {
    pub proto: ModelProto,
    /// Canonical paths of the model file and every external data file; saving refuses to write over them.
    pub sources: Vec<PathBuf>,
}

pub fn read_model_file(path: &Path) -> Result<LoadedProto> {
    let bytes = file_bytes(path)?;
    let canonical = path.canonicalize().map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let folder = canonical.parent().map(Path::to_path_buf);
    let mut loaded = decode(bytes, folder.as_deref(), &path.display().to_string())
        .map_err(|e| e.in_file(path))?;
    loaded.sources.insert(0, canonical);
    Ok(loaded)
}

/// Decodes a model held in memory. External data, if any, is looked up under `folder`.
pub fn read_model_bytes(bytes: Bytes, folder: Option<&Path>) -> Result<LoadedProto> {
    decode(bytes, folder, "model bytes")
}

fn decode(bytes: Bytes, folder: Option<&Path>, what: &str) -> Result<LoadedProto> {
    let mut proto = ModelProto::decode(bytes).map_err(|source| Error::Decode {
        what: what.to_string(),
        source,
    })?;
    if proto.graph.is_none() {
        return Err(Error::Model(
            "has no graph (empty or not an ONNX model)".into(),
        ));
    }
    let mut resolver = Resolver::new(folder);
    model_tensors_mut(&mut proto, &mut |t, _place| resolver.resolve(t))?;
    let sources = resolver.files().cloned().collect();
    Ok(LoadedProto { proto, sources })
}
