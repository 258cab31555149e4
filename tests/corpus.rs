//! First contact: every model the zoo fetches — its models, the corpus of public models quench was
//! never tuned on, and the onnx backend test models — quantized with `w8` and no other flag, then run
//! with `--random 2` in both runtimes. Each model is copied out of the zoo's cache first, so nothing
//! of the manifest reaches quench: dims and ranges come from the graph alone. Every step either
//! succeeds or fails with a one-line error; the tally is printed.

mod common;

use common::*;

/// What one command did: Ok, or its one-line error.
fn outcome(o: &std::process::Output, what: &str) -> Result<(), String> {
    let err = stderr_of(o);
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{what}: a panic reached the user:\n{err}"
    );
    if o.status.success() {
        return Ok(());
    }
    // One error line; a hint on how to get past it may follow.
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("error: "))
            && lines[1..].iter().all(|l| l.starts_with("hint: ")),
        "{what}: a failure must be one error line, got:\n{err}"
    );
    Err(lines[0].to_string())
}

#[test]
fn every_fetched_model_quantizes_and_runs_with_no_flags() {
    let (Some(zoo_models), Some(backend)) = (zoo_models(), backend_models()) else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let zoo = zoo();
    let mut models: Vec<(String, std::path::PathBuf, bool)> =
        zoo_models.into_iter().map(|(n, p)| (n, p, true)).collect();
    for m in &zoo.file.corpus {
        let p = zoo.model_path(&m.name);
        assert!(p.is_file(), "corpus model {} is not fetched", m.name);
        assert!(
            m.inputs.is_empty(),
            "{}: corpus entries carry no input spec",
            m.name
        );
        models.push((m.name.clone(), p, true));
    }
    models.extend(backend.into_iter().map(|(n, p, _)| (n, p, false)));

    let dir = tempdir();
    let (mut ok, mut refused) = (0usize, Vec::new());
    for (i, (name, path, must_pass)) in models.iter().enumerate() {
        // A copy under another name: quench finds no manifest entry for it.
        let model = dir.path().join(format!("m{i}.onnx"));
        std::fs::copy(path, &model).unwrap();
        let out = dir.path().join(format!("m{i}.w8.onnx"));
        let (model_s, out_s) = (model.display().to_string(), out.display().to_string());
        let o = quench(&["quantize", &model_s, "-o", &out_s, "--recipe", "w8"]);
        // A weight-only recipe needs no data: it writes the model, verified or said not to be.
        let quantized = outcome(&o, &format!("quantize {name}"));
        assert!(quantized.is_ok(), "quantize {name}: {quantized:?}");
        assert!(out.is_file(), "{name}: quantize succeeded without output");
        let mut ran = 0;
        for rt in ["tract", "ort"] {
            let o = quench(&["run", &out_s, "--random", "2", "--runtime", rt]);
            match outcome(&o, &format!("run {name} in {rt}")) {
                Ok(()) => ran += 1,
                Err(e) => refused.push(format!("{name} in {rt}: {e}")),
            }
        }
        // A zoo or corpus model runs in at least one runtime; the other may refuse it, in one line.
        assert!(!must_pass || ran > 0, "{name} runs in neither runtime");
        if ran == 2 {
            ok += 1;
        }
        let _ = std::fs::remove_file(&model);
        let _ = std::fs::remove_file(&out);
    }
    eprintln!(
        "first contact: {} models quantized with no flags; {ok} ran in both runtimes; {} runs \
         stopped with a one-line error:",
        models.len(),
        refused.len()
    );
    for r in &refused {
        eprintln!("  {r}");
    }
    // Every model quantized and every zoo and corpus model ran somewhere (asserted above); the
    // runs refused are a runtime's (old opsets onnxruntime no longer implements, operators tract
    // lacks) or inputs nothing bounds.
    assert!(ok * 10 >= models.len() * 6, "{ok} of {}", models.len());
}

/// Writes a small BERT-shaped encoder (symbolic batch and sequence, token, mask and segment inputs)
/// with tests/tools/make_encoder.py.
fn small_encoder(py: &std::path::Path, out: &std::path::Path) {
    let o = std::process::Command::new(py)
        .arg(repo().join("tests/tools/make_encoder.py"))
        .arg(out)
        .args([
            "--layers", "2", "--hidden", "64", "--heads", "4", "--ffn", "128",
        ])
        .args(["--vocab", "1000", "--max-pos", "128"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
}

/// A BERT-class encoder with `batch` and `sequence` dims quantizes, runs, compares and benches with
/// no flags; the report says which value each dim and range took and why; `--dim` and `--range`
/// still override.
#[test]
fn an_encoder_with_symbolic_dims_needs_no_flags() {
    let Some(py) = python() else { return };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let model = dir.path().join("enc.onnx");
    small_encoder(&py, &model);
    let d = |n: &str| dir.path().join(n).display().to_string();
    let m = model.display().to_string();
    let o = quench(&[
        "quantize",
        &m,
        "-o",
        &d("enc.w8.onnx"),
        "--report",
        &d("r.json"),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d("r.json")).unwrap()).unwrap();
    let inputs = r["retention"]["inputs"].as_str().unwrap();
    for said in [
        "batch=1 (the batch axis",
        "sequence=16 (default for a length axis, checked in tract)",
        "input_ids 0..999 (rows of the Gather table word_embeddings)",
        "token_type_ids 0..1 (rows of the Gather table token_type_embeddings)",
        "attention_mask 0..1 (a mask, by its name)",
    ] {
        assert!(inputs.contains(said), "{said}: {inputs}");
    }
    assert_eq!(r["retention"]["runtimes"].as_object().unwrap().len(), 2);

    let o = quench(&[
        "bench",
        &m,
        &d("enc.w8.onnx"),
        "--random",
        "1",
        "--runs",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let o = quench(&[
        "compare",
        &m,
        &d("enc.w8.onnx"),
        "--random",
        "1",
        "--dim",
        "sequence=7",
        "--range",
        "input_ids=5..9",
        "--json",
        &d("c.json"),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d("c.json")).unwrap()).unwrap();
    let inputs = c["inputs"].as_str().unwrap();
    assert!(
        !inputs.contains("sequence=") && !inputs.contains("input_ids 0..999"),
        "{inputs}"
    );
    let o = quench(&[
        "run",
        &m,
        "--random",
        "1",
        "--dim",
        "sequence=7",
        "-o",
        &d("y.npz"),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let shape = std::process::Command::new(&py)
        .args([
            "-c",
            "import sys, numpy as np; print(np.load(sys.argv[1])['last_hidden_state'].shape)",
        ])
        .arg(d("y.npz"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&shape.stdout).trim(), "(1, 7, 64)");
}

/// Data that does not fit the model is refused before any model runs, naming the input and the data
/// it came from; nothing is written.
#[test]
fn calibration_data_that_does_not_fit_is_refused_first() {
    let Some(py) = python() else { return };
    let dir = tempdir();
    let model = dir.path().join("enc.onnx");
    small_encoder(&py, &model);
    let bad = dir.path().join("bad.npz");
    let o = std::process::Command::new(&py)
        .args([
            "-c",
            "import sys, numpy as np; z = np.zeros((4, 8), np.int64); \
             np.savez(sys.argv[1], input_ids=z, attention_mask=z, token_types=z)",
        ])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let out = dir.path().join("out.onnx");
    let o = quench(&[
        "quantize",
        &model.display().to_string(),
        "-o",
        &out.display().to_string(),
        "--recipe",
        "w8a8",
        "--calib",
        &bad.display().to_string(),
    ]);
    assert!(!o.status.success());
    let e = stderr_of(&o);
    assert!(
        e.contains("calibration data") && e.contains("token_type"),
        "{e}"
    );
    assert!(!out.exists());
}

/// A weight-only recipe writes the model when no valid input can be made (an integer input that
/// nothing in the graph bounds), and says it was not verified and why; `--require-verify` refuses
/// it and writes nothing. A benchmark process that fails passes its own reason on.
#[test]
fn weight_only_work_needs_no_data_and_errors_travel() {
    let Some(py) = python() else { return };
    let dir = tempdir();
    let model = dir.path().join("steps.onnx");
    let o = std::process::Command::new(&py)
        .args([
            "-c",
            "import sys, numpy as np, onnx\n\
             from onnx import helper, numpy_helper, TensorProto as T\n\
             w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32), 'w')\n\
             g = helper.make_graph([helper.make_node('MatMul', ['x', 'w'], ['y']),\n\
                 helper.make_node('Add', ['steps', 'steps'], ['s2'])], 'g',\n\
                 [helper.make_tensor_value_info('x', T.FLOAT, ['n', 32]),\n\
                  helper.make_tensor_value_info('steps', T.INT64, [1])],\n\
                 [helper.make_tensor_value_info('y', T.FLOAT, ['n', 16]),\n\
                  helper.make_tensor_value_info('s2', T.INT64, [1])], [w])\n\
             onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)]), sys.argv[1])",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let (m, out) = (
        model.display().to_string(),
        dir.path().join("out.onnx").display().to_string(),
    );
    let o = quench(&["quantize", &m, "-o", &out, "--recipe", "w8"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("not verified") && said.contains("--range steps="),
        "{said}"
    );
    assert!(std::path::Path::new(&out).is_file());
    std::fs::remove_file(&out).unwrap();
    let o = quench(&[
        "quantize",
        &m,
        "-o",
        &out,
        "--recipe",
        "w8",
        "--require-verify",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("--range steps="),
        "{}",
        stderr_of(&o)
    );
    assert!(!std::path::Path::new(&out).exists());

    let o = quench(&["bench", &m, "--random", "1"]);
    assert!(!o.status.success());
    let e = stderr_of(&o);
    assert!(
        e.contains("benchmark of model 0 in tract failed: ") && e.contains("--range steps="),
        "{e}"
    );
}

/// The byte classifier whose input is read only through `Equal` (magika) and the OCR recognizer whose
/// input has an unnamed dim (PP-OCRv4's, `[?, 3, ?, ?]`), copied out of the zoo so no manifest
/// applies, bench with no flags in both runtimes.
#[test]
fn untuned_models_bench_with_no_flags() {
    let (Some(magika), Some(rec)) = (zoo_model("magika"), zoo_model("ppocr-rec")) else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    for (name, path) in [("magika", magika), ("rec", rec)] {
        let copy = dir.path().join(format!("{name}.onnx"));
        std::fs::copy(path, &copy).unwrap();
        let o = quench(&[
            "bench",
            &copy.display().to_string(),
            "--runtime",
            "both",
            "--random",
            "1",
            "--runs",
            "2",
            "--warmup",
            "1",
        ]);
        assert!(o.status.success(), "{name}: {}", stderr_of(&o));
        let table = String::from_utf8_lossy(&o.stdout);
        assert!(
            table.contains("tract") && table.contains("ort"),
            "{name}: {table}"
        );
    }
}
