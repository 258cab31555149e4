//! Graph-rewriting passes. A pass is one struct implementing [`Pass`]: it reads the model, changes it
//! through patches, and returns a report of what it changed and of every site it declined, with why.
//! [`PassManager`] runs passes in order with the consistency check before and after each one (always in
//! debug and test builds, on request otherwise).

mod dce;
mod fold;
mod hardswish;
pub mod quantize_activations;
pub mod quantize_weights;
pub mod roles;
mod toposort;

pub use dce::DeadNodeElimination;
pub use fold::FoldAffine;
pub use hardswish::FuseHardSwish;
pub use quantize_weights::QuantizeWeights;
pub use toposort::TopologicalSort;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::{Model, check_model};

/// A site a pass's rule selected but the pass left alone, and why.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Declined {
    pub site: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct PassReport {
    pub pass: String,
    pub changed: bool,
    pub changes: Vec<String>,
    pub declined: Vec<Declined>,
}

impl PassReport {
    pub fn new(pass: &str) -> PassReport {
        PassReport {
            pass: pass.to_string(),
            ..Default::default()
        }
    }
}

pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, model: &mut Model) -> Result<PassReport>;
}

pub struct PassManager {
    check: bool,
}

impl Default for PassManager {
    fn default() -> Self {
        PassManager {
            check: cfg!(debug_assertions),
        }
    }
}

impl PassManager {
    pub fn with_checks(check: bool) -> PassManager {
        PassManager { check }
    }

    pub fn run(&self, model: &mut Model, passes: &[&dyn Pass]) -> Result<Vec<PassReport>> {
        let mut reports = Vec::with_capacity(passes.len());
        for pass in passes {
            if self.check {
                check_model(model).map_err(|reason| Error::Inconsistent {
                    stage: format!("loading, before pass '{}'", pass.name()),
                    reason,
                })?;
            }
            let report = pass.run(model)?;
            if self.check {
                check_model(model).map_err(|reason| Error::Inconsistent {
                    stage: format!("pass '{}'", pass.name()),
                    reason,
                })?;
            }
            reports.push(report);
        }
        Ok(reports)
    }
}
