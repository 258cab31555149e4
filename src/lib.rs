//! quench compresses ONNX models with graph-rewriting passes and measures what the compression cost.
//!
//! The data path: [`onnx`] loads a file into [`ir::Model`] (a value-centred graph), [`passes`] rewrite it
//! through patches, and [`onnx`] saves it again without losing anything the passes did not change.

pub mod error;
pub mod inspect;
pub mod ir;
pub mod onnx;
pub mod passes;
pub mod zoo;

pub use error::{Error, Result};
pub use ir::Model;
