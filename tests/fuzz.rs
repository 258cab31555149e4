//! A seeded, structure-aware fuzzer of the library's entry points, on stable Rust.
//!
//! Each case takes a real model (the onnx backend test models and magika), mutates its protobuf the
//! way broken exports and hostile files do — dims that lie or are huge, wrong element types,
//! truncated or resized tensors, unknown or swapped op types, attributes of the wrong type, duplicate
//! names, cycles, odd opset and IR versions, missing inputs, lying value_info, external data pointing
//! anywhere, raw byte damage — and drives load, inspect, save, input synthesis, weight quantization
//! with a built-in recipe and a run in tract (and in onnxruntime for every fourth case) in this
//! process. An error is fine; a panic in any step, or a case that runs past a minute (a hang), is a
//! failure, reported with the case's seed and mutations so it can be replayed. (An abort ends the
//! whole run, which fails it as loudly.)
//!
//! `QUENCH_FUZZ_CASES` (default 1500) and `QUENCH_FUZZ_SECONDS` (default 120) bound the run, the
//! first reached stopping it; `QUENCH_FUZZ_SEED` (default 1) picks the sequence, and case `i` of a
//! seed is the same on every run: `QUENCH_FUZZ_SEED=S QUENCH_FUZZ_FROM=i QUENCH_FUZZ_CASES=1`
//! replays one; `QUENCH_FUZZ_DUMP=DIR` writes each case's model there; `QUENCH_FUZZ_VERBOSE=1` names each case before it runs, to find the one an abort
//! ends the run in.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use quench::Model;
use quench::exec::inputs::{self, InputOptions, Source};
use quench::exec::{self, Prepared, RuntimeKind, SessionOptions};
use quench::onnx::pb::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// How long one case may take before it counts as a hang.
const CASE_SECONDS: u64 = 60;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> Option<&'a T> {
    (!items.is_empty()).then(|| &items[(rng.next_u64() % items.len() as u64) as usize])
}

fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

const OPS: &[&str] = &[
    "Conv",
    "MatMul",
    "Gemm",
    "Gather",
    "Reshape",
    "Add",
    "Relu",
    "Softmax",
    "LSTM",
    "If",
    "Loop",
    "Concat",
    "Slice",
    "Transpose",
    "DequantizeLinear",
    "MatMulNBits",
    "NoSuchOp",
    "",
];
const DIMS: &[i64] = &[0, 1, 3, 7, 64, 1 << 20, 1 << 40, -1, -7, i64::MAX];

/// Applies one mutation to `m`, returning what it did.
fn mutate(rng: &mut ChaCha8Rng, m: &mut ModelProto) -> String {
    let kind = below(rng, 13);
    if kind == 8 {
        let v = *pick(rng, &[0i64, 1, 6, 99, 10_000, -1]).unwrap();
        if rng.next_u32().is_multiple_of(2) {
            m.ir_version = Some(v);
        } else if let Some(o) = m.opset_import.first_mut() {
            o.version = Some(v);
        }
        return format!("version {v}");
    }
    let Some(g) = m.graph.as_mut() else {
        return "no graph".into();
    };
    match kind {
        0 => {
            let dim = *pick(rng, DIMS).unwrap();
            let Some(i) = (!g.input.is_empty()).then(|| below(rng, g.input.len())) else {
                return "no input".into();
            };
            if let Some(type_proto::Value::TensorType(t)) =
                g.input[i].r#type.as_mut().and_then(|t| t.value.as_mut())
                && let Some(s) = t.shape.as_mut()
                && !s.dim.is_empty()
            {
                let a = below(rng, s.dim.len());
                s.dim[a].value = Some(tensor_shape_proto::dimension::Value::DimValue(dim));
                return format!("input {i} axis {a} = {dim}");
            }
            "input without shape".into()
        }
        1 => {
            let ty = below(rng, 24) as i32;
            if let Some(i) = (!g.input.is_empty()).then(|| below(rng, g.input.len()))
                && let Some(type_proto::Value::TensorType(t)) =
                    g.input[i].r#type.as_mut().and_then(|t| t.value.as_mut())
            {
                t.elem_type = ty;
                return format!("input {i} type {ty}");
            }
            "no input".into()
        }
        2 | 3 => {
            let Some(i) = (!g.initializer.is_empty()).then(|| below(rng, g.initializer.len()))
            else {
                return "no initializer".into();
            };
            let t = &mut g.initializer[i];
            if kind == 2 {
                let keep = below(rng, t.raw_data.len() + 9);
                let mut raw = t.raw_data.to_vec();
                raw.resize(keep, 0xA5);
                t.raw_data = Bytes::from(raw);
                format!("initializer {i} raw bytes {keep}")
            } else {
                let d = *pick(rng, DIMS).unwrap();
                if t.dims.is_empty() {
                    t.dims.push(d);
                } else {
                    let a = below(rng, t.dims.len());
                    t.dims[a] = d;
                }
                format!("initializer {i} dim {d}")
            }
        }
        4..=7 | 9 => {
            let Some(i) = (!g.node.is_empty()).then(|| below(rng, g.node.len())) else {
                return "no node".into();
            };
            let j = below(rng, g.node.len());
            match kind {
                4 => {
                    let op = *pick(rng, OPS).unwrap();
                    g.node[i].op_type = Some(op.into());
                    format!("node {i} op {op}")
                }
                5 => {
                    let n = &mut g.node[i];
                    if n.attribute.is_empty() || rng.next_u32().is_multiple_of(3) {
                        n.attribute.push(AttributeProto {
                            name: (*pick(rng, &["axis", "perm", "kernel_shape", "to", "alpha"])
                                .unwrap())
                            .into(),
                            r#type: Some(below(rng, 15) as i32),
                            i: Some(*pick(rng, DIMS).unwrap()),
                            ints: vec![*pick(rng, DIMS).unwrap(); below(rng, 4)],
                            ..Default::default()
                        });
                        format!("node {i} attribute added")
                    } else {
                        let a = below(rng, n.attribute.len());
                        n.attribute[a].r#type = Some(below(rng, 15) as i32);
                        n.attribute[a].i = Some(*pick(rng, DIMS).unwrap());
                        n.attribute[a].ints.clear();
                        format!("node {i} attribute {a} retyped")
                    }
                }
                6 => {
                    let out = g.node[j].output.first().cloned().unwrap_or_default();
                    if let Some(o) = g.node[i].output.first_mut() {
                        *o = out.clone();
                    }
                    format!("node {i} output named {out}")
                }
                7 => {
                    let out = g.node[j.max(i)].output.first().cloned().unwrap_or_default();
                    if let Some(x) = g.node[i].input.first_mut() {
                        *x = out.clone();
                    }
                    format!("node {i} reads {out} (a cycle or a forward read)")
                }
                _ => {
                    let n = &mut g.node[i];
                    if !n.input.is_empty() && rng.next_u32().is_multiple_of(2) {
                        n.input.pop();
                        format!("node {i} input dropped")
                    } else {
                        n.input.push("nowhere".into());
                        format!("node {i} reads an undefined value")
                    }
                }
            }
        }
        10 => {
            let Some(out) = g.node.first().and_then(|n| n.output.first()).cloned() else {
                return "no node".into();
            };
            let dims: Vec<i64> = (0..below(rng, 4))
                .map(|_| *pick(rng, DIMS).unwrap())
                .collect();
            let mut vi = quench::onnx::tensor::tensor_value_info(&out, below(rng, 17) as i32, &[]);
            if let Some(type_proto::Value::TensorType(t)) =
                vi.r#type.as_mut().and_then(|t| t.value.as_mut())
                && let Some(s) = t.shape.as_mut()
            {
                s.dim = dims
                    .iter()
                    .map(|&d| tensor_shape_proto::Dimension {
                        value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                        ..Default::default()
                    })
                    .collect();
            }
            g.value_info.push(vi);
            format!("value_info of {out} lies: {dims:?}")
        }
        11 => {
            let Some(i) = (!g.initializer.is_empty()).then(|| below(rng, g.initializer.len()))
            else {
                return "no initializer".into();
            };
            let loc = *pick(
                rng,
                &["../../etc/passwd", "missing.bin", "/dev/zero", "w.bin"],
            )
            .unwrap();
            let off = pick(rng, &[0i64, 7, 1 << 40, -5]).unwrap().to_string();
            let t = &mut g.initializer[i];
            t.data_location = tensor_proto::DataLocation::External as i32;
            t.raw_data = Bytes::new();
            t.external_data = vec![
                StringStringEntryProto {
                    key: "location".into(),
                    value: loc.into(),
                },
                StringStringEntryProto {
                    key: "offset".into(),
                    value: off.clone(),
                },
            ];
            format!("initializer {i} external at {loc}+{off}")
        }
        _ => "byte damage".into(),
    }
}

/// Drives one mutated model through the entry points: how far it got (0 refused at load, 1 loaded,
/// 2 inputs made, 3 ran in tract), or Err(step) when a step panicked.
fn drive(bytes: Vec<u8>, dir: &Path, ort: bool, recipe: &'static str) -> Result<usize, String> {
    let step = |what: &str, f: &mut dyn FnMut()| -> Result<(), String> {
        catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("{what} panicked: {msg}")
        })
    };
    let mut model = None;
    step("load", &mut || {
        model = Model::load_bytes(bytes.clone(), Some(dir)).ok()
    })?;
    let Some(mut model) = model else {
        return Ok(0);
    };
    step("inspect", &mut || {
        quench::inspect::render(&quench::inspect::inspect(&model));
    })?;
    let out = dir.join("out.onnx");
    step("save", &mut || {
        let _ = model.save(&out, &quench::onnx::SaveOptions::default());
    })?;
    let prep = Prepared::from_model(&model, "fuzz");
    let mut batch = None;
    step("inputs", &mut || {
        // A case's memory budget: declared dims may ask for up to 16 MiB of inputs.
        let mut opts = InputOptions {
            max_generated_bytes: 16 << 20,
            ..Default::default()
        };
        inputs::infer(&model, &prep.inputs, &mut opts, true);
        batch = inputs::open(&Source::Random { count: 1 }, &prep.inputs, &opts)
            .and_then(|mut s| s.batch(0))
            .ok();
    })?;
    step("quantize", &mut || {
        let r = quench::recipes::Recipe::load(recipe).unwrap();
        let _ = quench::passes::quantize_weights::quantize_weights_with(
            &mut model,
            &r,
            Default::default(),
            None,
            None,
        );
    })?;
    let Some(batch) = batch else { return Ok(1) };
    let prep = Prepared::from_model(&model, "fuzz");
    let runtimes: &[RuntimeKind] = if ort {
        &[RuntimeKind::Tract, RuntimeKind::Ort]
    } else {
        &[RuntimeKind::Tract]
    };
    let mut ran = false;
    for &rt in runtimes {
        step(&format!("run in {rt}"), &mut || {
            if let Ok(mut s) = exec::open(&prep, rt, &SessionOptions::default()) {
                ran |= s.run(&batch).is_ok() && rt == RuntimeKind::Tract;
            }
        })?;
    }
    Ok(if ran { 3 } else { 2 })
}

#[test]
fn mutated_models_never_panic() {
    let Some(backend) = common::backend_models() else {
        return;
    };
    let ort = quench::exec::ort::library_path().is_ok();
    let mut seeds: Vec<Vec<u8>> = backend
        .iter()
        .map(|(_, p, _)| std::fs::read(p).unwrap())
        .collect();
    if let Some(m) = common::zoo_model("magika") {
        seeds.push(std::fs::read(m).unwrap());
    }
    let (cases, seconds) = (
        env("QUENCH_FUZZ_CASES", 1500),
        env("QUENCH_FUZZ_SECONDS", 120),
    );
    let (seed, from) = (env("QUENCH_FUZZ_SEED", 1), env("QUENCH_FUZZ_FROM", 0));
    // Each case named before it runs, to find the one an abort ends the run in.
    let verbose = env("QUENCH_FUZZ_VERBOSE", 0) == 1;
    let dir = common::tempdir();
    let recipes = ["w8", "w4", "nf4", "fp4", "vq2"];
    let start = Instant::now();
    let mut failures = Vec::new();
    let mut done = 0u64;
    let mut stages = [0usize; 4];
    for case in from..from + cases {
        if start.elapsed() > Duration::from_secs(seconds) {
            break;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9).wrapping_add(case));
        let base = pick(&mut rng, &seeds).unwrap();
        let mut proto = ModelProto::decode(base.as_slice()).unwrap();
        let mut what = Vec::new();
        for _ in 0..1 + below(&mut rng, 3) {
            what.push(mutate(&mut rng, &mut proto));
        }
        let mut bytes = proto.encode_to_vec();
        if what.iter().any(|w| w == "byte damage") {
            for _ in 0..1 + below(&mut rng, 8) {
                let i = below(&mut rng, bytes.len());
                bytes[i] ^= 1 << below(&mut rng, 8);
            }
        }
        let recipe = *pick(&mut rng, &recipes).unwrap();
        if verbose {
            eprintln!("case {case}: {}; {recipe}", what.join(", "));
        }
        if let Ok(d) = std::env::var("QUENCH_FUZZ_DUMP") {
            std::fs::write(
                Path::new(&d).join(format!("case-{seed}-{case}.onnx")),
                &bytes,
            )
            .unwrap();
        }
        // Each case on a thread of its own, watched: a case that does not finish within the
        // budget is a hang, reported like a panic (its thread is left behind and the run stops).
        let (tx, rx) = std::sync::mpsc::channel();
        let case_dir = dir.path().to_path_buf();
        let with_ort = ort && case.is_multiple_of(4);
        std::thread::spawn(move || {
            let _ = tx.send(drive(bytes, &case_dir, with_ort, recipe));
        });
        let failed = |e: String| {
            format!(
                "seed {seed} case {case} ({}; {recipe}): {e}",
                what.join(", ")
            )
        };
        match rx.recv_timeout(Duration::from_secs(CASE_SECONDS)) {
            Ok(Ok(reached)) => stages[reached] += 1,
            Ok(Err(e)) => failures.push(failed(e)),
            Err(_) => {
                failures.push(failed(format!("did not finish within {CASE_SECONDS} s")));
                break;
            }
        }
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "fuzz: {done} cases in {secs:.1} s ({:.1} per second), {} failures; refused at load {}, \
         loaded without valid inputs {}, inputs made but tract refused {}, ran in tract {}",
        done as f64 / secs,
        failures.len(),
        stages[0],
        stages[1],
        stages[2],
        stages[3]
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
