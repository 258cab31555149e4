//! The embedded API: load an ONNX model (a quenched one or any other) and run it with tract, in-process,
//! with inputs and outputs as ndarray arrays. Nothing here touches onnxruntime, so an application built
//! with `default-features = false` carries no onnxruntime dependency at all.
//!
//! ```no_run
//! use ndarray::ArrayD;
//! use quench::embed::Runner;
//!
//! let mut model = Runner::load("model.q.onnx")?;
//! let x = ArrayD::<f32>::zeros(vec![1, 3, 224, 224]);
//! let outputs = model.run(vec![("x".to_string(), x.into())])?;
//! let scores = outputs[0].1.to_f32();
//! println!("{} scores", scores.len());
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::path::Path;

use anyhow::{Context, Result};

use crate::exec::tract::TractSession;
use crate::exec::{self, InputInfo, Named, Prepared, Session, SessionOptions};
use crate::ir::Model;

pub use crate::exec::Tensor;

/// A model loaded for repeated runs in tract.
pub struct Runner {
    inputs: Vec<InputInfo>,
    session: TractSession,
}

impl Runner {
    /// Loads an ONNX file (external data beside it is resolved safely) for single-threaded runs.
    pub fn load(path: impl AsRef<Path>) -> Result<Runner> {
        Runner::load_with_threads(path, 1)
    }

    /// Loads with `threads` threads per run (0: as many as the machine has).
    pub fn load_with_threads(path: impl AsRef<Path>, threads: usize) -> Result<Runner> {
        let path = path.as_ref();
        let model = Model::load(path)?;
        Runner::from_model(&model, &path.display().to_string(), threads)
    }

    /// Prepares a model already in memory (e.g. straight out of a pass).
    pub fn from_model(model: &Model, label: &str, threads: usize) -> Result<Runner> {
        let prepared = Prepared::from_model(model, label);
        let opts = SessionOptions {
            threads,
            ..Default::default()
        };
        let session = TractSession::new(&prepared, &opts)?;
        Ok(Runner {
            inputs: prepared.inputs,
            session,
        })
    }

    /// The inputs a run takes, with their declared types and shapes.
    pub fn inputs(&self) -> &[InputInfo] {
        &self.inputs
    }

    /// Output names, in the order [`Runner::run`] returns them.
    pub fn outputs(&self) -> &[String] {
        self.session.output_names()
    }

    /// Runs one batch. Inputs are checked against the model first (names, types, ranks, fixed dims).
    pub fn run(&mut self, inputs: Vec<Named>) -> Result<Vec<Named>> {
        exec::check_batch(&self.inputs, &inputs).context("inputs do not fit the model")?;
        self.session.run(&inputs)
    }
}
