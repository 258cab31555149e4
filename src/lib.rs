//! quench compresses ONNX models with graph-rewriting passes and measures what the compression cost.
//!
//! The data path: [`onnx`] loads a file into [`ir::Model`] (a value-centred graph), [`passes`] rewrite it
//! through patches, and [`onnx`] saves it again without losing anything the passes did not change.
//!
//! ```
//! use prost::Message;
//! use quench::ir::{Patch, check_model};
//! use quench::onnx::pb::*;
//!
//! // y = Relu(x), as an exporter would write it.
//! let io = |name: &str| ValueInfoProto { name: name.into(), ..Default::default() };
//! let proto = ModelProto {
//!     ir_version: Some(8),
//!     opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
//!     graph: Some(GraphProto {
//!         name: Some("g".into()),
//!         node: vec![NodeProto {
//!             op_type: Some("Relu".into()),
//!             input: vec!["x".into()],
//!             output: vec!["y".into()],
//!             ..Default::default()
//!         }],
//!         input: vec![io("x")],
//!         output: vec![io("y")],
//!         ..Default::default()
//!     }),
//!     ..Default::default()
//! };
//! let mut model = quench::Model::load_bytes(proto.encode_to_vec(), None)?;
//!
//! // Put a Neg in front of the Relu: one patch, applied as a whole.
//! let mut patch = Patch::new("example/negate-input");
//! let neg = patch.node(&mut model.names, "neg", "Neg", "", &[Some("x")], 1, vec![]);
//! patch.replace_all_uses("x", &neg[0]);
//! model.graph.apply(patch)?;
//! check_model(&model).expect("consistent");
//!
//! let ops: Vec<&str> = model.graph.nodes().map(|(_, n)| n.op_type.as_str()).collect();
//! assert_eq!(ops, ["Neg", "Relu"]);
//! # Ok::<(), quench::Error>(())
//! ```

pub mod adapt;
pub mod calib;
pub mod embed;
pub mod error;
pub mod exec;
pub mod inspect;
pub mod ir;
pub mod kernels;
pub mod onnx;
pub mod passes;
pub mod quant;
pub mod recipes;
pub mod report;
#[cfg(test)]
mod testing;
pub mod util;
pub mod zoo;

pub use error::{Error, Result};
pub use ir::Model;
