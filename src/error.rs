//! The typed errors of the library. Every variant names what it is about (file, tensor, node, value) so
//! that the one line the command-line tool prints is enough to find the problem.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a valid ONNX protobuf (truncated or corrupt)")]
    Decode {
        what: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("tensor '{tensor}': external data {reason}")]
    ExternalData { tensor: String, reason: String },
    #[error("{place}: tensor '{tensor}' {reason}")]
    Tensor {
        place: String,
        tensor: String,
        reason: String,
    },
    #[error("{place}: value '{name}' is defined twice ({first} and {second})")]
    DuplicateValue {
        place: String,
        name: String,
        first: String,
        second: String,
    },
    #[error("{place}: node '{node}' ({op_type}) reads value '{value}', which nothing defines")]
    UndefinedValue {
        place: String,
        node: String,
        op_type: String,
        value: String,
    },
    #[error("{place}: graph output '{value}' is not defined")]
    UndefinedOutput { place: String, value: String },
    #[error("{place}: the nodes form a cycle through {nodes}")]
    Cycle { place: String, nodes: String },
    #[error("{place}: node '{node}' ({op_type}): attribute '{attribute}' {reason}")]
    Attribute {
        place: String,
        node: String,
        op_type: String,
        attribute: String,
        reason: String,
    },
    #[error("{place}: node '{node}' ({domain_op}): {reason}")]
    Opset {
        place: String,
        node: String,
        domain_op: String,
        reason: String,
    },
    #[error("model: {0}")]
    Model(String),
    #[error("refusing to write {}: it is {what} of the loaded model", path.display())]
    Overwrite { path: PathBuf, what: &'static str },
    #[error("patch '{origin}': {reason}")]
    Patch { origin: String, reason: String },
    #[error("consistency check failed after {stage}: {reason}")]
    Inconsistent { stage: String, reason: String },
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps the error with the model file it arose in (unless it already names a file).
    pub fn in_file(self, path: impl Into<PathBuf>) -> Error {
        match self {
            e @ (Error::Read { .. } | Error::Write { .. } | Error::InFile { .. }) => e,
            e => Error::InFile {
                path: path.into(),
                source: Box::new(e),
            },
        }
    }
}
