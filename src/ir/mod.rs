//! The graph IR: a model owns a value-centred graph (values know their producer and their uses), the
//! name authority, opsets and the op table; passes change it only through patches.

pub mod check;
pub mod constants;
mod graph;
mod model;
mod names;
mod onnx_ops;
pub mod opset;
pub mod optable;
mod patch;

pub use check::check_model;
pub use constants::{
    ConstantRef, ConstantSource, GraphPath, WeightSite, WeightUse, constants, weight_sites,
};
pub use graph::{Attribute, Def, Graph, InfoEntry, Node, NodeId, Port, Slot, Use, Value, ValueId};
pub use model::Model;
pub use names::Names;
pub use opset::Opsets;
pub use patch::{NewNode, ORIGIN_KEY, Patch, PatchSummary};
