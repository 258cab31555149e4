//! Helpers shared by the integration tests: the zoo, the test Python, temporary folders. Under CI=true a
//! missing zoo model or Python runtime fails the test; elsewhere the test says what it skipped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use quench::onnx::pb::{
    GraphProto, ModelProto, OperatorSetIdProto, TensorProto, TypeProto, ValueInfoProto, type_proto,
};
use quench::zoo::Zoo;

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Reports a missing prerequisite: a failure in CI, a note elsewhere. Returns None for the caller to skip.
pub fn missing<T>(what: &str) -> Option<T> {
    if in_ci() {
        panic!("{what} is missing; run `bash scripts/setup.sh` (CI=true never skips)");
    }
    eprintln!("skipping: {what} is missing (run `bash scripts/setup.sh`)");
    None
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn zoo() -> Zoo {
    Zoo::load(&repo().join("models/zoo.yaml")).expect("models/zoo.yaml loads")
}

/// Every zoo model, or None (after reporting) when any is not fetched.
pub fn zoo_models() -> Option<Vec<(String, PathBuf)>> {
    let zoo = zoo();
    let mut out = Vec::new();
    for m in &zoo.file.models {
        let p = zoo.model_path(&m.name);
        if !p.is_file() {
            return missing(&format!("zoo model '{}' ({})", m.name, p.display()));
        }
        out.push((m.name.clone(), p));
    }
    Some(out)
}

pub fn zoo_model(name: &str) -> Option<PathBuf> {
    let p = zoo().model_path(name);
    if p.is_file() {
        Some(p)
    } else {
        missing(&format!("zoo model '{name}' ({})", p.display()))
    }
}

/// A file the zoo fetches beside its models (a tokenizer, …).
pub fn zoo_file(name: &str) -> Option<PathBuf> {
    let p = zoo().file_path(name);
    if p.is_file() {
        Some(p)
    } else {
        missing(&format!("zoo file '{name}' ({})", p.display()))
    }
}

/// The sentence encoder's tokenizer, when the encoder, its tokenizer and onnxruntime are all there
/// (None, after reporting what is missing, otherwise).
pub fn minilm_tokenizer() -> Option<PathBuf> {
    let (Some(_), Some(tok)) = (
        zoo_model("minilm-l3"),
        zoo_file("bert-uncased-tokenizer.json"),
    ) else {
        return None;
    };
    ort_ready().then_some(tok)
}

/// The project's sentences (tests/data) as two text files under `dir`: the first sentence of each
/// paraphrase pair, and the second.
pub fn sentence_halves(dir: &Path) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(repo().join("tests/data/sentences.txt")).unwrap();
    let half = |odd: usize, name: &str| {
        let p = dir.join(name);
        let lines: String = text
            .lines()
            .skip(odd)
            .step_by(2)
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&p, lines).unwrap();
        p
    };
    (half(0, "first.txt"), half(1, "second.txt"))
}

/// The folders of the onnx backend test data suite.
pub fn backend_models() -> Option<Vec<(String, PathBuf, Vec<PathBuf>)>> {
    let dir = zoo().suite_dir("onnx-backend");
    if !dir.join(".verified").is_file() {
        return missing(&format!("the onnx backend test data ({})", dir.display()));
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "onnx") {
                let folder = p.parent().unwrap();
                let mut sets: Vec<PathBuf> = std::fs::read_dir(folder)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|s| {
                        s.is_dir()
                            && s.file_name()
                                .unwrap()
                                .to_string_lossy()
                                .starts_with("test_data_set_")
                    })
                    .collect();
                sets.sort();
                let name = p.strip_prefix(&dir).unwrap().display().to_string();
                out.push((name, p, sets));
            }
        }
    }
    out.sort();
    Some(out)
}

/// The Python with onnx and onnxruntime used by test tooling: $QUENCH_PYTHON or .venv/bin/python.
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("QUENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    let ok = p.is_file()
        && Command::new(&p)
            .args(["-c", "import onnx, onnxruntime, numpy"])
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        Some(p)
    } else {
        missing(&format!(
            "the test Python with onnx and onnxruntime ({})",
            p.display()
        ))
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary folder")
}

pub fn quench_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_quench"))
}

/// A tensor-typed graph input or output of element type `elem_type` (1 = float) and unknown shape.
pub fn value_info(name: &str, elem_type: i32) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type,
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An initializer of ONNX data type `dt` (1 float, 2 uint8, 3 int8, …) from its little-endian bytes.
pub fn raw_tensor(name: &str, dt: i32, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: dt,
        dims: dims.to_vec(),
        raw_data: raw.into(),
        ..Default::default()
    }
}

/// A model of IR version 8 importing opset 17 of the default domain.
pub fn model_of(graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

/// Whether onnxruntime's shared library can be loaded (a failure under CI when it cannot).
pub fn ort_ready() -> bool {
    match quench::exec::ort::library_path() {
        Ok(_) => true,
        Err(e) => missing::<()>(&format!("onnxruntime ({e})")).is_some(),
    }
}

/// The zoo's input spec of a model.
pub fn zoo_spec(name: &str) -> Vec<quench::zoo::InputSpec> {
    zoo().model(name).expect("zoo model").inputs.clone()
}

/// Runs the quench binary (as in CI: no progress bars; as a user would, without RUST_BACKTRACE,
/// which lets caught panics of the runtimes print their backtraces).
pub fn quench(args: &[&str]) -> std::process::Output {
    Command::new(quench_bin())
        .args(args)
        .env("CI", "true")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

pub fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The sha256 of the features of the first 768 files tests/tools/magika_features.py picks from the
/// pinned packages of tests/requirements.txt: every machine tests the same data.
const MAGIKA_FEATURES_768: &str =
    "1f8f1e8fa32a4a4680c1258da40c1e714d0215b89f1b2076a1213018ce7a9be7";

/// Writes magika's input features of `count` real files to `out` (an .npz with `bytes`), with
/// tests/tools/magika_features.py: files of the pinned Python packages, the same on every machine
/// (checked by their digest for the 768 the retention tests use).
pub fn magika_features(py: &Path, out: &Path, count: usize) {
    let o = Command::new(py)
        .arg(repo().join("tests/tools/magika_features.py"))
        .arg(out)
        .arg(count.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    eprintln!(
        "magika inputs: {}",
        String::from_utf8_lossy(&o.stdout).trim()
    );
    if count == 768 {
        let o = Command::new(py)
            .args([
                "-c",
                "import sys, hashlib, numpy as np; \
                 print(hashlib.sha256(np.load(sys.argv[1])['bytes'].tobytes()).hexdigest())",
            ])
            .arg(out)
            .output()
            .unwrap();
        let digest = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert_eq!(
            digest, MAGIKA_FEATURES_768,
            "magika's test files differ from the project's (are the packages of \
             tests/requirements.txt installed at their pinned versions?)"
        );
    }
}

/// magika's features of 768 real files (the same on every machine) split into 256 for calibration
/// and 512 others for scoring:
/// (calibration .npz, evaluation .npz) in `dir`.
pub fn magika_split(py: &Path, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let all = dir.join("all.npz");
    magika_features(py, &all, 768);
    let (calib, eval) = (dir.join("calib.npz"), dir.join("eval.npz"));
    let o = Command::new(py)
        .args([
            "-c",
            "import sys, numpy as np; d = np.load(sys.argv[1])['bytes']; \
             np.savez(sys.argv[2], bytes=d[:256]); np.savez(sys.argv[3], bytes=d[256:])",
        ])
        .args([&all, &calib, &eval])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    (calib, eval)
}

/// `quench quantize MODEL -o OUT --recipe RECIPE --calib CALIB --inputs EVAL --batch-size 8 --report
/// JSON`, then `extra`.
pub fn quantize_calibrated(
    model: &str,
    recipe: &str,
    calib: &Path,
    eval: &Path,
    out: &Path,
    json: &Path,
    extra: &[&str],
) -> std::process::Output {
    let (calib, eval) = (calib.display().to_string(), eval.display().to_string());
    let (out, json) = (out.display().to_string(), json.display().to_string());
    let mut args = vec![
        "quantize",
        model,
        "-o",
        &out,
        "--recipe",
        recipe,
        "--calib",
        &calib,
        "--inputs",
        &eval,
        "--batch-size",
        "8",
        "--report",
        &json,
    ];
    args.extend_from_slice(extra);
    quench(&args)
}

/// Whether a top-1 agreement `rate` measured on `n` rows is consistent with a true agreement of at
/// least `floor`: it fails only when as many flips as were seen would come with probability under 1%
/// from rows flipping at the rate the floor allows (the binomial upper tail). A floor read literally
/// on a sample sits one flipped row away from the measurement.
pub fn agreement_meets(rate: f64, n: usize, floor: f64) -> bool {
    let flips = ((1.0 - rate) * n as f64).round() as u64;
    let p = 1.0 - floor;
    if rate >= floor || flips == 0 {
        return true;
    }
    // P(K >= flips) for K ~ Binomial(n, p), from the terms below it, in logs.
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let (mut log_c, mut below) = (0.0f64, 0.0f64);
    for i in 0..flips.min(n as u64 + 1) {
        if i > 0 {
            log_c += ((n as u64 - i + 1) as f64).ln() - (i as f64).ln();
        }
        below += (log_c + i as f64 * lp + (n as u64 - i) as f64 * lq).exp();
    }
    1.0 - below >= 0.01
}
