//! Numbers only, no graph: the quantizers that passes apply to weights. Every function takes plain
//! slices (a weight as a row-major `[channels, k]` matrix, one row per output channel, `k` along the
//! reduction axis) and returns codes and scales, so each can be tested against closed forms and measured
//! alone.

pub mod gptq;
pub mod int;
pub mod kmeans;
pub mod pack;
pub mod scheme;
pub mod sparse;
pub mod table;
pub mod vq;
pub mod vq_feedback;
