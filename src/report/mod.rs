//! Reports: retention metrics, comparisons of a reference and a candidate model overall and layer by
//! layer, and benchmarks.

pub mod bench;
pub mod compare;
pub mod metrics;
pub use metrics::ser_db;
