//! The ONNX file format: prost types generated from proto/onnx.proto3, element types, tensor payload
//! checks and decoding, loading (memory-mapped, external data resolved safely) and atomic, deterministic
//! saving. This is the only module that knows protobuf.

pub mod dtype;
mod external;
mod load;
mod save;
pub mod tensor;
pub mod walk;

/// The generated protobuf types of the ONNX schema.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use dtype::DataType;
pub use external::release_pages;
pub(crate) use external::{file_bytes, is_mapped};
pub use load::{LoadedProto, read_model_bytes, read_model_file};
pub use save::{ExternalData, PROTOBUF_LIMIT, SaveOptions, write_model_file};
