//! Execution on real models: every zoo model in tract and onnxruntime, the onnx backend test data through
//! both runtimes, input sources, the embedded API, and compare's figures against an independent numpy
//! computation.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use ndarray::{ArrayD, IxDyn};
use quench::Model;
use quench::exec::inputs::{self, InputOptions, Source};
use quench::exec::{self, Prepared, RuntimeKind, SessionOptions, Tensor};
use quench::onnx::SaveOptions;
use quench::report::metrics::{Accumulator, OutputKind};
use serde_json::Value;

/// Largest |tract − ort| allowed, relative to max(1, max |output|): float kernels differ in summation
/// order and in their exp/tanh approximations, never by more than this on the zoo.
const CROSS_RUNTIME_TOL: f64 = 1e-4;

#[test]
fn every_zoo_model_runs_in_tract_and_ort_and_they_agree() {
    if !ort_ready() {
        return;
    }
    let Some(models) = zoo_models() else { return };
    for (name, path) in models {
        let model = Model::load(&path).unwrap();
        let prep = Prepared::from_model(&model, &name);
        let opts = InputOptions {
            spec: zoo_spec(&name),
            seed: 11,
            ..Default::default()
        };
        let set = inputs::open(&Source::Random { count: 2 }, &prep.inputs, &opts).unwrap();
        let mut tract = exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default()).unwrap();
        let mut ort = exec::open(&prep, RuntimeKind::Ort, &SessionOptions::default()).unwrap();
        // onnxruntime maps the weights from a temporary model file; a "model" setting says it fell
        // back to the encoded bytes, and why.
        assert!(
            !ort.settings().iter().any(|(k, _)| k == "model"),
            "{name}: {:?}",
            ort.settings()
        );
        let mut worst = 0f64;
        for batch in set {
            let batch = batch.unwrap();
            exec::check_batch(&prep.inputs, &batch).unwrap();
            let a = tract
                .run(&batch)
                .unwrap_or_else(|e| panic!("{name} in tract: {e:#}"));
            let b = ort
                .run(&batch)
                .unwrap_or_else(|e| panic!("{name} in ort: {e:#}"));
            assert_eq!(a.len(), prep.outputs.len());
            for ((out, x), (_, y)) in a.iter().zip(&b) {
                assert_eq!(x.shape(), y.shape(), "{name}: output {out}");
                assert_eq!(x.data_type(), y.data_type(), "{name}: output {out}");
                let mut acc = Accumulator::default();
                acc.add(x, y, OutputKind::Raw).unwrap();
                let m = acc.finish();
                let scale = x.to_f32().iter().fold(1f64, |s, v| s.max(v.abs() as f64));
                assert_eq!(
                    m.non_finite_reference + m.non_finite_candidate,
                    0,
                    "{name}: {out}"
                );
                assert!(
                    m.max_abs <= CROSS_RUNTIME_TOL * scale,
                    "{name}: output {out}: tract and ort differ by {} (scale {scale})",
                    m.max_abs
                );
                worst = worst.max(m.max_abs / scale);
            }
        }
        eprintln!("{name}: worst tract-vs-ort difference {worst:.3e} (relative to max(1, |y|))");
    }
}

/// The onnx backend test data: inputs read from `test_data_set_*/input_*.pb`, outputs checked against
/// `output_*.pb`. onnxruntime is the reference implementation and must match every model it loads;
/// tract's figures are reported.
#[test]
fn backend_test_data_through_both_runtimes() {
    if !ort_ready() {
        return;
    }
    let Some(models) = backend_models() else {
        return;
    };
    let mut tally = [(0usize, 0usize, 0usize); 2];
    let mut ort_mismatches = Vec::new();
    for (name, path, sets) in &models {
        if sets.is_empty() {
            continue;
        }
        let Ok(model) = Model::load(path) else {
            continue;
        };
        let prep = Prepared::from_model(&model, name);
        for (k, rt) in [RuntimeKind::Tract, RuntimeKind::Ort]
            .into_iter()
            .enumerate()
        {
            let Ok(mut session) = exec::open(&prep, rt, &SessionOptions::default()) else {
                continue;
            };
            tally[k].0 += 1;
            let mut ok = true;
            for set in sets {
                let batch = inputs::open(
                    &Source::Path(set.clone()),
                    &prep.inputs,
                    &InputOptions::default(),
                );
                let batch = match batch.and_then(|mut s| s.batch(0)) {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("{rt}: cannot read the inputs of {name}: {e:#}");
                        ok = false;
                        break;
                    }
                };
                let outputs = match session.run(&batch) {
                    Ok(o) => o,
                    Err(e) => {
                        eprintln!("{rt} cannot run {name}: {e:#}");
                        ok = false;
                        break;
                    }
                };
                for (i, (out, got)) in outputs.iter().enumerate() {
                    let file = set.join(format!("output_{i}.pb"));
                    let Ok(bytes) = std::fs::read(&file) else {
                        continue;
                    };
                    let proto =
                        <quench::onnx::pb::TensorProto as prost::Message>::decode(bytes.as_slice())
                            .unwrap();
                    let want = Tensor::from_proto(&proto).unwrap();
                    if !close(&want, got) {
                        ok = false;
                        if rt == RuntimeKind::Ort {
                            ort_mismatches.push(format!("{name}: {out}"));
                        }
                    }
                }
            }
            if ok {
                tally[k].1 += 1;
            } else {
                tally[k].2 += 1;
            }
        }
    }
    eprintln!(
        "tract: {} loaded, {} matched, {} failed or differed",
        tally[0].0, tally[0].1, tally[0].2
    );
    eprintln!(
        "ort:   {} loaded, {} matched, {} failed or differed",
        tally[1].0, tally[1].1, tally[1].2
    );
    assert!(
        ort_mismatches.is_empty(),
        "ort differs from the expected outputs: {ort_mismatches:?}"
    );
    assert!(
        tally[1].1 >= 95,
        "ort ran too few backend models: {:?}",
        tally[1]
    );
    assert!(
        tally[0].1 >= 80,
        "tract matched too few backend models: {:?}",
        tally[0]
    );
}

/// numpy.testing-style closeness: |a − b| ≤ 1e-4 + 1e-3·|b|, equal shapes and types, NaN where NaN.
fn close(want: &Tensor, got: &Tensor) -> bool {
    if want.shape() != got.shape() || want.data_type() != got.data_type() {
        return false;
    }
    let (w, g) = (want.to_f32(), got.to_f32());
    w.iter().zip(g.iter()).all(|(&a, &b)| {
        (a.is_nan() && b.is_nan())
            || a == b
            || ((a - b).abs() as f64) <= 1e-4 + 1e-3 * (b.abs() as f64)
    })
}

#[test]
fn random_inputs_are_deterministic_and_respect_ranges() {
    let Some(path) = zoo_model("rxnmap") else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let prep = Prepared::from_model(&model, "rxnmap");
    let opts = InputOptions {
        spec: zoo_spec("rxnmap"),
        seed: 3,
        ..Default::default()
    };
    let mut a = inputs::open(&Source::Random { count: 3 }, &prep.inputs, &opts).unwrap();
    let mut b = inputs::open(&Source::Random { count: 3 }, &prep.inputs, &opts).unwrap();
    // Batch 2 alone equals batch 2 reached by walking the set.
    let walked: Vec<_> = a.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(walked[2], b.batch(2).unwrap());
    assert_ne!(walked[0], walked[1]);
    for (name, t) in &walked[0] {
        let spec = zoo_spec("rxnmap")
            .into_iter()
            .find(|s| &s.name == name)
            .unwrap();
        let [lo, hi] = spec.range.unwrap();
        let v = t.to_f32();
        assert!(
            v.iter().all(|&x| x as f64 >= lo && x as f64 <= hi),
            "{name} outside {lo}..{hi}"
        );
        assert!(
            v.iter().any(|&x| x as f64 == hi),
            "{name} never reaches {hi}"
        );
    }
    let other = InputOptions { seed: 4, ..opts };
    let mut c = inputs::open(&Source::Random { count: 3 }, &prep.inputs, &other).unwrap();
    assert_ne!(c.batch(0).unwrap(), walked[0]);
}

/// With nothing given, the graph makes the inputs of rxnmap and magika: their integer inputs take
/// exactly the ranges their manifests give (rxnmap's four ids from its embedding tables, magika's
/// bytes from the `Equal` against 0..256 its one-hot is written as), their open dims values tract
/// accepts, and tract runs them.
#[test]
fn integer_inputs_and_dims_come_from_the_graph() {
    for (name, why) in [("rxnmap", "Gather table"), ("magika", "compared with")] {
        let Some(path) = zoo_model(name) else {
            return;
        };
        let model = Model::load(&path).unwrap();
        let prep = Prepared::from_model(&model, name);
        let mut opts = InputOptions::default();
        inputs::infer(&model, &prep.inputs, &mut opts, true);
        for s in zoo_spec(name) {
            let [lo, hi] = s.range.unwrap();
            let (range, said) = &opts.implied[&s.name];
            assert_eq!(*range, (lo, hi), "{name}: {}", s.name);
            assert!(said.contains(why), "{name}: {}: {said}", s.name);
        }
        let dims: Vec<String> = opts
            .implied_dims
            .iter()
            .map(|(k, (v, why))| format!("{k}={v} {why}"))
            .collect();
        assert!(!dims.is_empty(), "{name}");
        let mut set = inputs::open(&Source::Random { count: 1 }, &prep.inputs, &opts).unwrap();
        let batch = set.batch(0).unwrap();
        exec::check_batch(&prep.inputs, &batch).unwrap();
        let mut tract = exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default()).unwrap();
        tract
            .run(&batch)
            .unwrap_or_else(|e| panic!("{name} with {dims:?}: {e:#}"));
    }
}

#[test]
fn symbolic_dims_and_integer_ranges_must_be_given() {
    let Some(path) = zoo_model("rxnmap") else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let prep = Prepared::from_model(&model, "rxnmap");
    let err = inputs::open(
        &Source::Random { count: 1 },
        &prep.inputs,
        &InputOptions::default(),
    )
    .err()
    .expect("no dims given");
    let msg = format!("{err:#}");
    assert!(msg.contains("--dim") || msg.contains("--range"), "{msg}");
    let mut opts = InputOptions::default();
    for d in prep
        .inputs
        .iter()
        .flat_map(|i| i.dims.clone().unwrap_or_default())
    {
        if let exec::Dim::Symbol(s) = d {
            opts.dims.insert(s, 8);
        }
    }
    let err = inputs::open(&Source::Random { count: 1 }, &prep.inputs, &opts)
        .err()
        .expect("no range");
    assert!(
        format!("{err:#}").contains("needs a valid range"),
        "{err:#}"
    );
    for i in &prep.inputs {
        opts.ranges.insert(i.name.clone(), (0.0, 2.0));
    }
    let mut set = inputs::open(&Source::Random { count: 1 }, &prep.inputs, &opts).unwrap();
    let batch = set.batch(0).unwrap();
    assert!(batch.iter().all(|(_, t)| t.shape().contains(&8)));
    let mut tract = exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default()).unwrap();
    tract.run(&batch).unwrap();
    // Values outside the model's tables: tract's Gather panics inside; quench reports an error.
    opts.ranges.insert("atoms".into(), (100000.0, 100001.0));
    let bad = inputs::open(&Source::Random { count: 1 }, &prep.inputs, &opts)
        .unwrap()
        .batch(0)
        .unwrap();
    let err = tract.run(&bad).expect_err("out-of-range ids");
    assert!(
        format!("{err:#}").contains("tract failed to run")
            && format!("{err:#}").contains("tract panicked"),
        "{err:#}"
    );
}

/// tract's analysis indexes a QLinearConv's inputs by their count in the file, so an empty trailing
/// bias slot makes its own QLinearConv panic while optimising; quench reports an error (exit 1), not
/// an abort. With quench's kernels the QLinearConv runs as DequantizeLinear → Conv → QuantizeLinear,
/// which has no such slot.
#[test]
fn a_panic_in_tract_analysis_is_an_error() {
    use quench::onnx::pb::{GraphProto, NodeProto};
    let node = |op: &str, inputs: &[&str], output: &str| NodeProto {
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    let graph = GraphProto {
        name: Some("qlinear".into()),
        node: vec![
            node("QuantizeLinear", &["x", "s", "z"], "xq"),
            node(
                "QLinearConv",
                &["xq", "s", "z", "w", "s", "wz", "s", "z", ""],
                "yq",
            ),
            node("DequantizeLinear", &["yq", "s", "z"], "y"),
        ],
        initializer: vec![
            raw_tensor("s", 1, &[], 0.05f32.to_le_bytes().to_vec()),
            raw_tensor("z", 2, &[], vec![128]),
            raw_tensor("w", 3, &[2, 3, 1, 1], vec![1, 2, 3, 4, 5, 6]),
            raw_tensor("wz", 3, &[], vec![0]),
        ],
        input: vec![quench::onnx::tensor::tensor_value_info(
            "x",
            1,
            &[1, 3, 4, 4],
        )],
        output: vec![value_info("y", 1)],
        ..Default::default()
    };
    let mut model = model_of(graph);
    model.opset_import[0].version = Some(12);
    let dir = tempdir();
    let path = dir.path().join("qlinear.onnx");
    std::fs::write(&path, prost::Message::encode_to_vec(&model)).unwrap();
    let out = dir.path().join("out.npz");
    let run = |extra: &[&str]| {
        let path = path.display().to_string();
        let out = out.display().to_string();
        let mut args = vec![
            "run",
            &path,
            "--random",
            "1",
            "--runtime",
            "tract",
            "-o",
            &out,
        ];
        args.extend_from_slice(extra);
        quench(&args)
    };
    let o = run(&["--tract-plain"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("tract panicked"),
        "{}",
        stderr_of(&o)
    );
    assert!(!out.exists());
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(out.exists());
}

#[test]
fn embedded_runner_matches_the_tract_session() {
    let Some(path) = zoo_model("ppocr-cls") else {
        return;
    };
    let mut runner = quench::embed::Runner::load(&path).unwrap();
    assert_eq!(runner.inputs().len(), 1);
    let model = Model::load(&path).unwrap();
    let prep = Prepared::from_model(&model, "ppocr-cls");
    let opts = InputOptions {
        spec: zoo_spec("ppocr-cls"),
        ..Default::default()
    };
    let batch = inputs::open(&Source::Random { count: 1 }, &prep.inputs, &opts)
        .unwrap()
        .batch(0)
        .unwrap();
    let a = runner.run(batch.clone()).unwrap();
    let b = exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default())
        .unwrap()
        .run(&batch)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(runner.outputs(), prep.outputs.as_slice());
    // The same run on two threads gives the same classes.
    let mut two = quench::embed::Runner::load_with_threads(&path, 2).unwrap();
    let c = two.run(batch.clone()).unwrap();
    let mut acc = Accumulator::default();
    acc.add(&a[0].1, &c[0].1, OutputKind::Classes).unwrap();
    assert_eq!(acc.finish().top1_agreement, Some(1.0));
    // Wrong input: a clear error, not a runtime panic.
    let wrong = vec![(
        "x".to_string(),
        Tensor::F32(ArrayD::zeros(IxDyn(&[1, 4, 48, 192]))),
    )];
    let err = runner.run(wrong).unwrap_err();
    assert!(format!("{err:#}").contains("axis 1"), "{err:#}");
}

/// Rounds every float tensor of at least 64 elements to bfloat16 precision: a cheap stand-in for a
/// compressed model whose error is spread over every layer.
fn round_weights(src: &Path, dst: &Path, only: Option<&str>) {
    let model = Model::load(src).unwrap();
    let mut proto = model.to_proto();
    quench::onnx::walk::model_tensors_mut(&mut proto, &mut |t, _| {
        if t.data_type == 1
            && t.dims.iter().product::<i64>() >= 64
            && only.is_none_or(|n| n == t.name)
        {
            let v = quench::onnx::tensor::to_f32(t).unwrap();
            let r: Vec<f32> = v
                .iter()
                .map(|x| half::bf16::from_f32(*x).to_f32())
                .collect();
            let name = t.name.clone();
            *t = quench::onnx::tensor::from_f32(&name, &t.dims, &r);
        }
        Ok(())
    })
    .unwrap();
    Model::from_proto(proto, vec![])
        .unwrap()
        .save(dst, &SaveOptions::default())
        .unwrap();
}

#[test]
fn compare_figures_match_numpy() {
    let (Some(py), Some(path)) = (python(), zoo_model("magika")) else {
        return;
    };
    let dir = tempdir();
    let cand = dir.path().join("cand.onnx");
    round_weights(&path, &cand, None);
    let p = |n: &str| dir.path().join(n).display().to_string();
    let src = path.display().to_string();
    // The candidate is no zoo model: its symbolic batch dim and byte range are given explicitly.
    let common = [
        "--random",
        "3",
        "--seed",
        "5",
        "--runtime",
        "tract",
        "--dim",
        "unk__214=2",
        "--range",
        "bytes=0..256",
    ];
    for (model, out) in [
        (src.as_str(), p("ref.npz")),
        (p("cand.onnx").as_str(), p("cand.npz")),
    ] {
        let o = quench(&[&["run", model], &common[..], &["-o", &out]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let json = p("cmp.json");
    let o = quench(
        &[
            &["compare", &src, &p("cand.onnx")],
            &common[..],
            &["--no-layers", "--json", &json],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let reference = Command::new(py)
        .arg(repo().join("tests/tools/metrics_ref.py"))
        .args([p("ref.npz"), p("cand.npz"), "target_label".into()])
        .output()
        .unwrap();
    assert!(
        reference.status.success(),
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let want: Value = serde_json::from_slice(&reference.stdout).unwrap();
    let got = &report["runtimes"]["tract"]["outputs"]["target_label"];
    assert_eq!(got, &report["outputs"]["target_label"]);
    for key in ["sqnr_db", "cosine", "rel_l2", "max_abs", "top1_agreement"] {
        let (g, w) = (
            got[key].as_f64().unwrap(),
            want["target_label"][key].as_f64().unwrap(),
        );
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1e-12),
            "{key}: quench {g}, numpy {w}"
        );
    }
    let sqnr = got["sqnr_db"].as_f64().unwrap();
    assert!(
        sqnr > 10.0 && sqnr < 80.0,
        "bf16 weights give a finite, moderate SQNR: {sqnr}"
    );
}

#[test]
fn layer_attribution_finds_where_the_error_enters() {
    if !ort_ready() {
        return;
    }
    let Some(path) = zoo_model("rxnmap") else {
        return;
    };
    let model = Model::load(&path).unwrap();
    // Perturb one weight: the first MatMul's, in topological order.
    let g = &model.graph;
    let (first_mm, weight) = g
        .nodes()
        .find_map(|(_, n)| {
            let w = n.input(1)?;
            (n.op_type == "MatMul" && g.value(w).initializer().is_some())
                .then(|| (n.name.clone(), g.value_name(w).to_string()))
        })
        .expect("a MatMul with an initializer weight");
    let dir = tempdir();
    let cand_path = dir.path().join("cand.onnx");
    round_weights(&path, &cand_path, Some(&weight));
    let candidate = Model::load(&cand_path).unwrap();
    let opts = InputOptions {
        spec: zoo_spec("rxnmap"),
        ..Default::default()
    };
    let mut set = inputs::open(
        &Source::Random { count: 2 },
        &Prepared::from_model(&model, "").inputs,
        &opts,
    )
    .unwrap();
    let copts = quench::report::compare::CompareOptions {
        runtimes: vec![RuntimeKind::Tract, RuntimeKind::Ort],
        session: SessionOptions::default(),
        layers: Some(RuntimeKind::Tract),
        one_session_above: quench::report::compare::ONE_SESSION_ABOVE,
    };
    let report =
        quench::report::compare::compare(&model, &candidate, ("ref", "cand"), &mut set, &copts)
            .unwrap();
    assert_eq!(report.batches, 2);
    let out = &report.runtimes["ort"].outputs["attention"];
    assert!(out.sqnr_db.is_finite() && out.sqnr_db > 20.0, "{out:?}");
    let cross = report.cross_runtime.as_ref().unwrap();
    assert!(cross.reference["attention"].sqnr_db > 60.0);
    // Everything computed before the perturbed MatMul is exact; its output is the first inexact tensor.
    let order: Vec<String> = g.nodes().map(|(_, n)| n.name.clone()).collect();
    let pos = |node: &str| order.iter().position(|n| n == node).unwrap();
    let at = pos(&first_mm);
    let hit = report
        .layers
        .iter()
        .find(|l| l.node == first_mm)
        .expect("the perturbed MatMul is attributed");
    assert!(hit.metrics.sqnr_db.is_finite());
    for l in &report.layers {
        if pos(&l.node) < at {
            assert!(
                l.metrics.sqnr_db.is_infinite(),
                "{} before the perturbation: {:?}",
                l.node,
                l.metrics
            );
        }
    }
    // Worst first.
    assert!(
        report
            .layers
            .windows(2)
            .all(|w| w[0].metrics.sqnr_db <= w[1].metrics.sqnr_db)
    );
    assert!(report.layers.len() > 100);
    // With the sessions opened one at a time (as for a model over 1 GiB): the same report.
    let mut set = inputs::open(
        &Source::Random { count: 2 },
        &Prepared::from_model(&model, "").inputs,
        &opts,
    )
    .unwrap();
    let one_at_a_time = quench::report::compare::CompareOptions {
        runtimes: vec![RuntimeKind::Tract, RuntimeKind::Ort],
        session: SessionOptions::default(),
        layers: Some(RuntimeKind::Tract),
        one_session_above: 0,
    };
    let again = quench::report::compare::compare(
        &model,
        &candidate,
        ("ref", "cand"),
        &mut set,
        &one_at_a_time,
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(&report).unwrap(),
        serde_json::to_value(&again).unwrap()
    );
}

fn write_npz(path: &Path, arrays: &[(&str, Tensor)]) {
    let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(path).unwrap());
    for (name, t) in arrays {
        match t {
            Tensor::F32(a) => w.add_array(*name, a).unwrap(),
            Tensor::I32(a) => w.add_array(*name, a).unwrap(),
            Tensor::I64(a) => w.add_array(*name, a).unwrap(),
            other => panic!("test writes f32/i32/i64, not {}", other.dtype_name()),
        }
    }
    w.finish().unwrap();
}

#[test]
fn malformed_inputs_give_clear_errors() {
    let (Some(magika), Some(cls)) = (zoo_model("magika"), zoo_model("ppocr-cls")) else {
        return;
    };
    let dir = tempdir();
    let npz = |name: &str, arrays: &[(&str, Tensor)]| {
        let p = dir.path().join(name);
        write_npz(&p, arrays);
        p.display().to_string()
    };
    let bytes_ok = Tensor::I32(ArrayD::from_elem(IxDyn(&[1, 2048]), 7));
    let cases: Vec<(String, &str)> = vec![
        (
            npz("missing.npz", &[("other", bytes_ok.clone())]),
            "is not an input of the model",
        ),
        (
            npz(
                "extra.npz",
                &[("bytes", bytes_ok.clone()), ("extra", bytes_ok.clone())],
            ),
            "'extra' is not an input",
        ),
        (
            npz(
                "dtype.npz",
                &[("bytes", Tensor::F32(ArrayD::zeros(IxDyn(&[1, 2048]))))],
            ),
            "is float but the model declares int32",
        ),
        (
            npz(
                "rank.npz",
                &[("bytes", Tensor::I32(ArrayD::zeros(IxDyn(&[2048]))))],
            ),
            "has rank 1",
        ),
        (
            npz(
                "dim.npz",
                &[("bytes", Tensor::I32(ArrayD::zeros(IxDyn(&[1, 100]))))],
            ),
            "at axis 1 but the model fixes it to 2048",
        ),
    ];
    let model = magika.display().to_string();
    for (file, want) in &cases {
        let o = quench(&["run", &model, "--inputs", file]);
        assert!(!o.status.success(), "{file} was accepted");
        let err = stderr_of(&o);
        assert!(
            err.starts_with("error:") && err.contains(want),
            "{file}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let garbage = dir.path().join("garbage.npz");
    std::fs::write(&garbage, b"not a zip file at all").unwrap();
    let o = quench(&["run", &model, "--inputs", &garbage.display().to_string()]);
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("is not a readable .npz"),
        "{}",
        stderr_of(&o)
    );
    // The valid file runs; NaN in a float input is reported, not fatal.
    let o = quench(&[
        "run",
        &model,
        "--inputs",
        &npz("ok.npz", &[("bytes", bytes_ok)]),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let mut x = ArrayD::<f32>::zeros(IxDyn(&[1, 3, 48, 192]));
    x[[0, 0, 0, 0]] = f32::NAN;
    let o = quench(&[
        "run",
        &cls.display().to_string(),
        "--inputs",
        &npz("nan.npz", &[("x", Tensor::F32(x))]),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("holds 1 NaN/Inf values"),
        "{}",
        stderr_of(&o)
    );
    // Outputs never overwrite an input.
    let ok = dir.path().join("ok.npz").display().to_string();
    let o = quench(&["run", &model, "--inputs", &ok, "-o", &ok]);
    assert!(
        !o.status.success() && stderr_of(&o).contains("refusing to write"),
        "{}",
        stderr_of(&o)
    );
}

#[test]
fn npz_npy_and_pb_inputs_feed_the_same_values() {
    let Some(path) = zoo_model("ppocr-cls") else {
        return;
    };
    let dir = tempdir();
    let x = {
        let model = Model::load(&path).unwrap();
        let prep = Prepared::from_model(&model, "");
        let opts = InputOptions {
            spec: zoo_spec("ppocr-cls"),
            ..Default::default()
        };
        inputs::open(&Source::Random { count: 1 }, &prep.inputs, &opts)
            .unwrap()
            .batch(0)
            .unwrap()
            .remove(0)
            .1
    };
    let Tensor::F32(a) = &x else { panic!() };
    // Three rows in one file, split into batches of one.
    let three = ndarray::concatenate(ndarray::Axis(0), &[a.view(), a.view(), a.view()]).unwrap();
    write_npz(
        &dir.path().join("x.npz"),
        &[("x", Tensor::F32(three.clone()))],
    );
    std::fs::create_dir(dir.path().join("npy")).unwrap();
    ndarray_npy::write_npy(dir.path().join("npy/x.npy"), &three).unwrap();
    let set = dir.path().join("pb/test_data_set_0");
    std::fs::create_dir_all(&set).unwrap();
    let proto = Tensor::F32(three).to_proto("");
    std::fs::write(
        set.join("input_0.pb"),
        prost::Message::encode_to_vec(&proto),
    )
    .unwrap();
    let mut outs = Vec::new();
    for src in ["x.npz", "npy", "pb"] {
        let out = dir.path().join(format!("{src}.out.npz"));
        let o = quench(&[
            "run",
            &path.display().to_string(),
            "--inputs",
            &dir.path().join(src).display().to_string(),
            "--batch-size",
            "1",
            "-o",
            &out.display().to_string(),
        ]);
        assert!(o.status.success(), "{src}: {}", stderr_of(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("3 batches"),
            "{src}"
        );
        let mut r = ndarray_npy::NpzReader::new(std::fs::File::open(&out).unwrap()).unwrap();
        let names = r.names().unwrap();
        let y: ArrayD<f32> = r.by_name(&names[0]).unwrap();
        assert_eq!(y.shape()[0], 3);
        outs.push(y);
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
}

#[test]
fn images_are_resized_and_normalised_into_nchw() {
    let dir = tempdir();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    image::RgbImage::from_pixel(8, 6, image::Rgb([255, 0, 0]))
        .save(imgs.join("a.png"))
        .unwrap();
    image::RgbImage::from_pixel(3, 3, image::Rgb([0, 255, 255]))
        .save(imgs.join("b.png"))
        .unwrap();
    // y = Identity(x), x: float[N, 3, 4, 4].
    let mut x = value_info("x", 1);
    let dims = [None, Some(3), Some(4), Some(4)];
    if let Some(quench::onnx::pb::type_proto::Value::TensorType(t)) =
        x.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape = Some(quench::onnx::pb::TensorShapeProto {
            dim: dims
                .iter()
                .map(|d| quench::onnx::pb::tensor_shape_proto::Dimension {
                    value: Some(match d {
                        Some(v) => {
                            quench::onnx::pb::tensor_shape_proto::dimension::Value::DimValue(*v)
                        }
                        None => quench::onnx::pb::tensor_shape_proto::dimension::Value::DimParam(
                            "n".into(),
                        ),
                    }),
                    ..Default::default()
                })
                .collect(),
        });
    }
    let graph = quench::onnx::pb::GraphProto {
        name: Some("g".into()),
        node: vec![quench::onnx::pb::NodeProto {
            op_type: Some("Identity".into()),
            input: vec!["x".into()],
            output: vec!["y".into()],
            ..Default::default()
        }],
        input: vec![x],
        output: vec![value_info("y", 1)],
        ..Default::default()
    };
    let model_path = dir.path().join("id.onnx");
    std::fs::write(&model_path, prost::Message::encode_to_vec(&model_of(graph))).unwrap();
    let out = dir.path().join("y.npz");
    let o = quench(&[
        "run",
        &model_path.display().to_string(),
        "--inputs",
        &imgs.display().to_string(),
        "--batch-size",
        "2",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.5,0.5,0.5",
        "-o",
        &out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let y: ArrayD<f32> = ndarray_npy::NpzReader::new(std::fs::File::open(&out).unwrap())
        .unwrap()
        .by_name("y")
        .unwrap();
    assert_eq!(y.shape(), &[2, 3, 4, 4]);
    // Red → (1, −1, −1); cyan → (−1, 1, 1), everywhere after resizing a solid image.
    for (b, want) in [(0, [1.0, -1.0, -1.0]), (1, [-1.0, 1.0, 1.0])] {
        for (c, w) in want.iter().enumerate() {
            let plane = y.slice(ndarray::s![b, c, .., ..]);
            assert!(
                plane.iter().all(|v| (v - w).abs() < 1e-6),
                "image {b} channel {c}: {plane:?}"
            );
        }
    }
}

#[test]
fn text_is_tokenized_with_padding_and_truncation() {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let dir = tempdir();
    let vocab: std::collections::HashMap<String, u32> = [
        ("[PAD]", 0),
        ("[UNK]", 1),
        ("the", 2),
        ("cat", 3),
        ("sat", 4),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), *v))
    .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let tok_path = dir.path().join("tokenizer.json");
    tok.save(&tok_path, false).unwrap();
    std::fs::write(
        dir.path().join("in.txt"),
        "the cat sat\n\nthe dog\nsat sat sat sat sat\n",
    )
    .unwrap();
    // out_ids = Identity(input_ids), out_mask = Identity(attention_mask), both int64[b, s].
    let io = |n: &str| value_info(n, 7);
    let node = |i: &str, o: &str| quench::onnx::pb::NodeProto {
        op_type: Some("Identity".into()),
        input: vec![i.into()],
        output: vec![o.into()],
        ..Default::default()
    };
    let graph = quench::onnx::pb::GraphProto {
        name: Some("g".into()),
        node: vec![node("input_ids", "ids"), node("attention_mask", "mask")],
        input: vec![io("input_ids"), io("attention_mask")],
        output: vec![io("ids"), io("mask")],
        ..Default::default()
    };
    let model_path = dir.path().join("tok.onnx");
    std::fs::write(&model_path, prost::Message::encode_to_vec(&model_of(graph))).unwrap();
    let out = dir.path().join("o.npz");
    let o = quench(&[
        "run",
        &model_path.display().to_string(),
        "--inputs",
        &dir.path().join("in.txt").display().to_string(),
        "--tokenizer",
        &tok_path.display().to_string(),
        "--batch-size",
        "2",
        "--max-tokens",
        "4",
        "-o",
        &out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let mut r = ndarray_npy::NpzReader::new(std::fs::File::open(&out).unwrap()).unwrap();
    // Batches of different lengths are kept apart: [2, 3] then [1, 4].
    let ids0: ArrayD<i64> = r.by_name("ids.0").unwrap();
    let mask0: ArrayD<i64> = r.by_name("mask.0").unwrap();
    let ids1: ArrayD<i64> = r.by_name("ids.1").unwrap();
    assert_eq!(ids0.as_slice().unwrap(), &[2, 3, 4, 2, 1, 0]);
    assert_eq!(mask0.as_slice().unwrap(), &[1, 1, 1, 1, 1, 0]);
    assert_eq!(ids1.shape(), &[1, 4], "truncated to 4 tokens");
}

/// Runs `quench bench` with `args` on 2 random batches after 1 warm-up run, writing `json`; checks the
/// table was printed and that each result has `runs` runs and a positive median no above its p90.
fn bench_results(args: &[&str], json: &std::path::Path, runs: u64) -> Vec<Value> {
    let json_arg = json.display().to_string();
    let mut all = vec![
        "bench", "--random", "2", "--warmup", "1", "--json", &json_arg,
    ];
    all.extend_from_slice(args);
    let o = quench(&all);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("median ms"), "{table}");
    let results: Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    let results = results.as_array().unwrap().clone();
    for r in &results {
        assert!(r["median_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["p90_ms"].as_f64().unwrap() >= r["median_ms"].as_f64().unwrap());
        assert_eq!(r["runs"], runs);
    }
    results
}

#[test]
fn bench_prints_figures_for_both_runtimes() {
    if !ort_ready() {
        return;
    }
    let Some(path) = zoo_model("ppocr-cls") else {
        return;
    };
    let dir = tempdir();
    let json = dir.path().join("bench.json");
    let src = path.display().to_string();
    let results = bench_results(&[&src, &src, "--runs", "3", "--runtime", "both"], &json, 3);
    assert_eq!(results.len(), 4);
    for r in &results {
        assert!(r["peak_rss_mb"].as_f64().unwrap() > 1.0);
    }
    let rts: Vec<&str> = results
        .iter()
        .map(|r| r["runtime"].as_str().unwrap())
        .collect();
    assert_eq!(rts, ["tract", "tract", "ort", "ort"]);
}

/// `--interleave` loads the models in one process and times their runs in turn: every model gets all
/// its runs on the same inputs, and no peak RSS is claimed (one process holds them all). A model that
/// cannot take the first model's inputs is refused by name before any timing.
#[test]
fn bench_interleaved_times_every_model_in_turn() {
    let (Some(cls), Some(magika)) = (zoo_model("ppocr-cls"), zoo_model("magika")) else {
        return;
    };
    let dir = tempdir();
    let json = dir.path().join("bench.json");
    let cls = cls.display().to_string();
    let results = bench_results(
        &["zoo:ppocr-cls", &cls, "--runs", "5", "--interleave"],
        &json,
        5,
    );
    assert_eq!(results.len(), 2);
    for r in &results {
        assert!(r["peak_rss_mb"].is_null(), "{r}");
        assert_eq!(r["batches"], 2);
    }

    let magika = magika.display().to_string();
    let o = quench(&[
        "bench",
        "zoo:ppocr-cls",
        &magika,
        "--random",
        "1",
        "--interleave",
    ]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains(&magika), "{}", stderr_of(&o));
}

/// `--profile` times every operator of the timed runs: each model's table by kind of operator, whose
/// times per run add up to most of the run and never more; onnxruntime is refused (only tract's
/// operators are timed).
#[test]
fn bench_profile_times_each_kind_of_operator() {
    let Some(cls) = zoo_model("ppocr-cls") else {
        return;
    };
    let dir = tempdir();
    let json = dir.path().join("bench.json");
    let cls = cls.display().to_string();
    let results = bench_results(&["zoo:ppocr-cls", "--runs", "4", "--profile"], &json, 4);
    let ops = results[0]["ops"].as_array().unwrap();
    assert!(ops.len() > 3, "{ops:?}");
    let total: f64 = ops.iter().map(|o| o["ms"].as_f64().unwrap()).sum();
    let mean = results[0]["mean_ms"].as_f64().unwrap();
    assert!(
        total <= mean && total > 0.3 * mean,
        "{total} ms in operators, {mean} per run"
    );
    for o in ops {
        assert!(o["evals"].as_f64().unwrap() >= 1.0, "{o}");
    }
    // The slowest first.
    let ms: Vec<f64> = ops.iter().map(|o| o["ms"].as_f64().unwrap()).collect();
    assert!(ms.windows(2).all(|w| w[0] >= w[1]), "{ms:?}");

    let o = quench(&[
        "bench",
        &cls,
        "--random",
        "1",
        "--runtime",
        "ort",
        "--profile",
    ]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("--profile"), "{}", stderr_of(&o));
}

/// x[4,64] · DequantizeLinear(W int8[64,32]): ONNX says the product is computed in float. onnxruntime's
/// default options fuse it into MatMulNBits with int8 activations; quench's exact numerics must not.
#[test]
fn ort_exact_numerics_match_onnx_semantics_and_fast_is_reported_different() {
    use quench::onnx::pb::{GraphProto, NodeProto};
    if !ort_ready() {
        return;
    }
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let w: Vec<u8> = (0..64 * 32).map(|_| (next() % 255) as u8).collect();
    let tensor = raw_tensor;
    let node = |op: &str, i: &[&str], o: &str| NodeProto {
        op_type: Some(op.into()),
        input: i.iter().map(|s| s.to_string()).collect(),
        output: vec![o.into()],
        ..Default::default()
    };
    let graph = GraphProto {
        name: Some("dq_matmul".into()),
        node: vec![
            node("DequantizeLinear", &["w", "s", "z"], "wf"),
            node("MatMul", &["x", "wf"], "y"),
        ],
        initializer: vec![
            tensor("w", 3, &[64, 32], w),
            tensor("s", 1, &[], 0.02f32.to_le_bytes().to_vec()),
            tensor("z", 3, &[], vec![0]),
        ],
        input: vec![value_info("x", 1)],
        output: vec![value_info("y", 1)],
        ..Default::default()
    };
    let model = Model::load_bytes(prost::Message::encode_to_vec(&model_of(graph)), None).unwrap();
    let prep = Prepared::from_model(&model, "dq_matmul");
    let x: Vec<f32> = (0..4 * 64)
        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let batch = vec![(
        "x".to_string(),
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[4, 64]), x).unwrap()),
    )];
    let run = |rt, numerics| {
        let opts = SessionOptions {
            numerics,
            ..Default::default()
        };
        exec::open(&prep, rt, &opts)
            .unwrap()
            .run(&batch)
            .unwrap()
            .remove(0)
            .1
    };
    let tract = run(RuntimeKind::Tract, exec::Numerics::Exact);
    let exact = run(RuntimeKind::Ort, exec::Numerics::Exact);
    let fast = run(RuntimeKind::Ort, exec::Numerics::Fast);
    let diff = |a: &Tensor, b: &Tensor| {
        let mut acc = Accumulator::default();
        acc.add(a, b, OutputKind::Raw).unwrap();
        acc.finish().max_abs
    };
    assert!(
        diff(&tract, &exact) < 1e-4,
        "exact ORT vs tract: {}",
        diff(&tract, &exact)
    );
    let fast_err = diff(&tract, &fast);
    eprintln!("ORT default options vs ONNX semantics: max |err| {fast_err}");
    assert!(
        fast_err > 1e-3,
        "ORT's default options no longer change DQ→MatMul numerics ({fast_err}): re-measure FACTS"
    );
}

/// A pass may rename a value; attribution then pairs the tensors by producing node and output slot.
#[test]
fn renamed_tensors_are_paired_by_their_producing_node() {
    let Some(path) = zoo_model("ppocr-cls") else {
        return;
    };
    let reference = Model::load(&path).unwrap();
    let mut proto = reference.to_proto();
    let g = proto.graph.as_mut().unwrap();
    let conv = g.node.iter().position(|n| n.op_type() == "Conv").unwrap();
    let old = g.node[conv].output[0].clone();
    let new = format!("{old}.renamed");
    for n in &mut g.node {
        for v in n.input.iter_mut().chain(n.output.iter_mut()) {
            if *v == old {
                *v = new.clone();
            }
        }
    }
    let candidate = Model::from_proto(proto, vec![]).unwrap();
    let opts = InputOptions {
        spec: zoo_spec("ppocr-cls"),
        ..Default::default()
    };
    let mut set = inputs::open(
        &Source::Random { count: 1 },
        &Prepared::from_model(&reference, "").inputs,
        &opts,
    )
    .unwrap();
    let copts = quench::report::compare::CompareOptions {
        runtimes: vec![RuntimeKind::Tract],
        session: SessionOptions::default(),
        layers: Some(RuntimeKind::Tract),
        one_session_above: quench::report::compare::ONE_SESSION_ABOVE,
    };
    let report =
        quench::report::compare::compare(&reference, &candidate, ("ref", "cand"), &mut set, &copts)
            .unwrap();
    let pair = report
        .layers
        .iter()
        .find(|l| l.reference == old)
        .expect("the renamed tensor is compared");
    assert_eq!(pair.candidate, new);
    assert!(pair.metrics.sqnr_db.is_infinite() && pair.metrics.count > 0);
    assert!(
        report
            .layers
            .iter()
            .all(|l| l.metrics.sqnr_db.is_infinite())
    );
    assert!(report.cross_runtime.is_none());
}
