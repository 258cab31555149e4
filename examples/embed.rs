//! Run an ONNX model with tract through quench's embedded API, on zeros or on random values shaped
//! after the model's declared inputs.
//!
//!     cargo run --release --example embed -- MODEL.onnx [DIM=VALUE ...]
//!
//! Symbolic dims (e.g. `batch`) take the values given as DIM=VALUE, else 1.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use ndarray::{ArrayD, IxDyn};
use quench::embed::{Runner, Tensor};
use quench::exec::Dim;
use quench::onnx::dtype::DataType;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        bail!("usage: embed MODEL.onnx [DIM=VALUE ...]")
    };
    let dims: HashMap<String, usize> = args
        .map(|a| {
            let (k, v) = a.split_once('=').context("dims are given as NAME=VALUE")?;
            Ok((k.to_string(), v.parse()?))
        })
        .collect::<Result<_>>()?;

    let mut model = Runner::load(&path)?;
    let mut inputs = Vec::new();
    for info in model.inputs() {
        let shape: Vec<usize> = info
            .dims
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|d| match d {
                Dim::Fixed(v) => *v as usize,
                Dim::Symbol(s) => dims.get(s).copied().unwrap_or(1),
                Dim::Unknown => 1,
            })
            .collect();
        let t = match info.dtype {
            Some(DataType::Float) | None => Tensor::F32(ArrayD::from_elem(IxDyn(&shape), 0.5)),
            Some(DataType::Int64) => Tensor::I64(ArrayD::zeros(IxDyn(&shape))),
            Some(DataType::Int32) => Tensor::I32(ArrayD::zeros(IxDyn(&shape))),
            Some(other) => bail!("this example feeds float and integer inputs, not {other:?}"),
        };
        println!("input  {} {:?}", info.name, t.shape());
        inputs.push((info.name.clone(), t));
    }
    let start = std::time::Instant::now();
    let outputs = model.run(inputs)?;
    println!("ran in {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    for (name, t) in &outputs {
        let v = t.to_f32();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        println!(
            "output {name} {} {:?} mean {mean:.6}",
            t.dtype_name(),
            t.shape()
        );
    }
    Ok(())
}
