//! A model: the top-level graph, the opset imports, and every other field of ModelProto kept as it was
//! read (producer, metadata, functions, training info, device configuration), so that saving loses
//! nothing that no pass changed.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::graph::Graph;
use super::names::Names;
use super::opset::{Opsets, first_version};
use crate::error::{Error, Result};
use crate::onnx::pb::{ModelProto, OperatorSetIdProto};
use crate::onnx::{SaveOptions, read_model_bytes, read_model_file, write_model_file};

#[derive(Clone, Debug)]
pub struct Model {
    /// Everything of the ModelProto but the graph.
    pub header: ModelProto,
    pub graph: Graph,
    /// The name authority of the whole model.
    pub names: Names,
    sources: Vec<PathBuf>,
}

impl Model {
    /// Loads a model file; external data is resolved relative to its folder and memory-mapped.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        let loaded = read_model_file(path)?;
        Model::from_proto(loaded.proto, loaded.sources).map_err(|e| e.in_file(path))
    }

    /// Loads a model from bytes; `folder` is where external data would be looked up.
    pub fn load_bytes(bytes: impl Into<Bytes>, folder: Option<&Path>) -> Result<Model> {
        let loaded = read_model_bytes(bytes.into(), folder)?;
        Model::from_proto(loaded.proto, loaded.sources)
    }

    pub fn from_proto(mut proto: ModelProto, sources: Vec<PathBuf>) -> Result<Model> {
        let g = proto
            .graph
            .take()
            .ok_or_else(|| Error::Model("has no graph".into()))?;
        let opsets = Opsets::from_imports(&proto.opset_import);
        if opsets.iter().next().is_none() && proto.ir_version() >= 3 {
            return Err(Error::Model(
                "imports no operator set (opset_import is empty)".into(),
            ));
        }
        let graph = Graph::from_proto(g, &opsets, None, None)?;
        let names = Names::of_graph(&graph);
        Ok(Model {
            header: proto,
            graph,
            names,
            sources,
        })
    }

    pub fn to_proto(&self) -> ModelProto {
        ModelProto {
            graph: Some(self.graph.to_proto()),
            ..self.header.clone()
        }
    }

    /// Saves atomically; refuses to write over the file (or external data) the model was loaded from.
    /// Returns the external data file written, if any.
    pub fn save(&self, path: impl AsRef<Path>, opts: &SaveOptions) -> Result<Option<PathBuf>> {
        write_model_file(self.to_proto(), path.as_ref(), &self.sources, opts)
    }

    /// The files this model was read from (model file first, then external data).
    pub fn sources(&self) -> &[PathBuf] {
        &self.sources
    }

    pub fn opsets(&self) -> Opsets {
        Opsets::from_imports(&self.header.opset_import)
    }

    pub fn opset(&self, domain: &str) -> Option<i64> {
        self.opsets().version(domain)
    }

    /// Makes sure `op_type` of `domain` can be used. A missing import of a non-default domain is added
    /// (that changes nothing else); the default domain's version is never raised, because that changes
    /// the meaning of other operators (Squeeze, ReduceSum, … moved attributes to inputs at 13), so a
    /// version too low is an error naming the operator and the version it needs.
    pub fn require_op(&mut self, domain: &str, op_type: &str, min_version: i64) -> Result<()> {
        let canonical = if domain == "ai.onnx" { "" } else { domain };
        match self.opset(canonical) {
            Some(v) if v >= min_version => Ok(()),
            Some(v) => Err(Error::Model(format!(
                "{op_type} needs opset {min_version} of domain '{canonical}', the model imports {v}; \
                 quench does not raise a model's opset"
            ))),
            None if canonical.is_empty() || canonical == "ai.onnx.ml" => {
                Err(Error::Model(format!(
                    "{op_type} needs domain '{canonical}' (opset {min_version}), which the model does not import"
                )))
            }
            None => {
                self.header.opset_import.push(OperatorSetIdProto {
                    domain: Some(canonical.to_string()),
                    version: Some(min_version),
                });
                Ok(())
            }
        }
    }

    /// The first default-domain opset that defines `op_type`, for passes choosing a form.
    pub fn op_available(&self, op_type: &str) -> bool {
        match (self.opset(""), first_version("", op_type)) {
            (Some(v), Some(first)) => v >= first,
            _ => false,
        }
    }
}
