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

    /// Moves the main graph's initializers held in memory (1 MiB and larger) into one file in `folder`
    /// and maps it: the same bytes, but as file pages, which the system can drop and read again
    /// rather than memory the process must hold. For a model built in memory (a rewrite of every
    /// weight) that lives while runtimes, each with its own copy, run it. Nothing else changes. On
    /// systems that cannot remove a mapped file, `folder` must outlive the model.
    pub fn spill(&mut self, folder: impl AsRef<Path>) -> Result<()> {
        use std::io::Write;
        const MIN: usize = 1 << 20;
        const ALIGN: u64 = 4096;
        let path = folder.as_ref().join("tensors.data");
        let werr = |source| Error::Write {
            path: path.clone(),
            source,
        };
        let ids: Vec<_> = self
            .graph
            .initializers
            .iter()
            .copied()
            .filter(|&id| {
                self.graph.value(id).initializer().is_some_and(|t| {
                    t.raw_data.len() >= MIN && !crate::onnx::is_mapped(&t.raw_data)
                })
            })
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut at = Vec::with_capacity(ids.len());
        {
            let file = std::fs::File::create(&path).map_err(werr)?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let mut offset = 0u64;
            for &id in &ids {
                let raw = &self.graph.value(id).initializer().unwrap().raw_data;
                let start = offset.div_ceil(ALIGN) * ALIGN;
                out.write_all(&vec![0u8; (start - offset) as usize])
                    .map_err(werr)?;
                out.write_all(raw).map_err(werr)?;
                offset = start + raw.len() as u64;
                at.push(start as usize);
            }
            out.flush().map_err(werr)?;
        }
        let mapped = crate::onnx::file_bytes(&path)?;
        for (&id, start) in ids.iter().zip(at) {
            if let Some(Some(v)) = self.graph.values.get_mut(id.index())
                && let Some(t) = v.initializer.as_mut()
            {
                let len = t.raw_data.len();
                t.raw_data = mapped.slice(start..start + len);
            }
        }
        Ok(())
    }

    /// Lets the pages of the model's tensors that lie in quench's read-only file mappings go (they are
    /// read again if ever touched): after a pass that read every weight, while the model waits.
    pub fn release_pages(&self) {
        for c in crate::ir::constants(self) {
            crate::onnx::release_pages(&c.tensor.raw_data);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::pb::{GraphProto, NodeProto};
    use crate::onnx::tensor::{from_f32, tensor_value_info};
    use prost::Message;

    #[test]
    fn spill_moves_large_heap_tensors_into_a_mapped_file_and_changes_nothing_else() {
        let big: Vec<f32> = (0..512 * 600)
            .map(|i| (i % 97) as f32 * 0.25 - 3.0)
            .collect();
        let small = vec![0.5f32; 600];
        let proto = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(13),
            }],
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![
                    NodeProto {
                        op_type: Some("MatMul".into()),
                        input: vec!["x".into(), "w".into()],
                        output: vec!["xw".into()],
                        ..Default::default()
                    },
                    NodeProto {
                        op_type: Some("Add".into()),
                        input: vec!["xw".into(), "b".into()],
                        output: vec!["y".into()],
                        ..Default::default()
                    },
                ],
                initializer: vec![
                    from_f32("w", &[512, 600], &big),
                    from_f32("b", &[600], &small),
                ],
                input: vec![tensor_value_info("x", 1, &[1, 512])],
                output: vec![tensor_value_info("y", 1, &[1, 600])],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut m = Model::load_bytes(proto.encode_to_vec(), None).unwrap();
        let before = m.to_proto().encode_to_vec();
        let dir = tempfile::tempdir().unwrap();
        m.spill(dir.path()).unwrap();
        let data = |m: &Model, name: &str| {
            let id = m.graph.value_id(name).unwrap();
            m.graph.value(id).initializer().unwrap().raw_data.clone()
        };
        assert!(crate::onnx::is_mapped(&data(&m, "w")));
        // Small tensors stay where they are.
        assert!(!crate::onnx::is_mapped(&data(&m, "b")));
        assert_eq!(m.to_proto().encode_to_vec(), before);
        // Spilling again finds nothing left to move.
        let dir2 = tempfile::tempdir().unwrap();
        m.spill(dir2.path()).unwrap();
        assert!(!dir2.path().join("tensors.data").exists());
    }
}
