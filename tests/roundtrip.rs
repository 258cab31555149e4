//! Lossless I/O on real models: every zoo model and every onnx backend test model loads, saves and loads
//! again to an equal message; saving is byte-deterministic; external data round-trips; and onnxruntime
//! gives bitwise-equal outputs for the original and the re-saved file.

mod common;

use std::path::{Path, PathBuf};

use quench::Model;
use quench::onnx::{ExternalData, SaveOptions, read_model_file};

/// Load → save → load, comparing the resolved messages; a second save must give identical bytes.
fn roundtrip(src: &Path, dir: &Path, tag: &str) -> PathBuf {
    let original = read_model_file(src)
        .unwrap_or_else(|e| panic!("{}: {e}", src.display()))
        .proto;
    let model = Model::load(src).unwrap_or_else(|e| panic!("{}: {e:#}", src.display()));
    let out = dir.join(format!("{tag}.onnx"));
    model.save(&out, &SaveOptions::default()).unwrap();
    let again = read_model_file(&out).unwrap().proto;
    assert!(
        original == again,
        "{}: the re-saved model differs from the original",
        src.display()
    );
    let out2 = dir.join(format!("{tag}.2.onnx"));
    Model::load(&out)
        .unwrap()
        .save(&out2, &SaveOptions::default())
        .unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&out2).unwrap(),
        "{}: saving is not deterministic",
        src.display()
    );
    out
}

#[test]
fn zoo_models_roundtrip_losslessly() {
    let Some(models) = common::zoo_models() else {
        return;
    };
    let dir = common::tempdir();
    for (name, path) in models {
        roundtrip(&path, dir.path(), &name);
    }
}

#[test]
fn backend_models_roundtrip_losslessly() {
    let Some(models) = common::backend_models() else {
        return;
    };
    assert!(
        models.len() >= 140,
        "expected the whole backend suite, found {}",
        models.len()
    );
    let dir = common::tempdir();
    for (i, (_, path, _)) in models.iter().enumerate() {
        roundtrip(path, dir.path(), &format!("m{i}"));
    }
}

#[test]
fn external_data_roundtrips_and_is_mapped_back() {
    let Some(path) = common::zoo_model("rxnmap") else {
        return;
    };
    let dir = common::tempdir();
    let original = read_model_file(&path).unwrap().proto;
    let model = Model::load(&path).unwrap();
    let out = dir.path().join("rxnmap.onnx");
    let data = model
        .save(&out, &SaveOptions::external(4096))
        .unwrap()
        .expect("an external data file");
    // Named after its contents: `rxnmap.onnx.<8 hex digits>.data`.
    let name = data.file_name().unwrap().to_str().unwrap().to_string();
    let tag = name
        .strip_prefix("rxnmap.onnx.")
        .and_then(|t| t.strip_suffix(".data"))
        .unwrap_or_default();
    assert!(
        data.parent() == Some(dir.path())
            && tag.len() == 8
            && tag.bytes().all(|b| b.is_ascii_hexdigit()),
        "{name}"
    );
    let model_bytes = std::fs::metadata(&out).unwrap().len();
    let data_bytes = std::fs::metadata(&data).unwrap().len();
    assert!(
        model_bytes < 2 << 20,
        "the model file still holds the weights ({model_bytes} bytes)"
    );
    assert!(
        data_bytes > 80 << 20,
        "the data file is too small ({data_bytes} bytes)"
    );
    let back = read_model_file(&out).unwrap();
    assert_eq!(back.sources.len(), 2, "the model file and its data file");
    assert!(back.proto == original, "external data did not round-trip");
    // The copy with external data refuses to be overwritten through its own data file.
    let reloaded = Model::load(&out).unwrap();
    let err = reloaded.save(&out, &SaveOptions::default()).unwrap_err();
    assert!(err.to_string().contains("refusing to write"), "{err}");
}

#[test]
fn onnxruntime_outputs_are_bitwise_equal_after_resave() {
    let Some(python) = common::python() else {
        return;
    };
    let Some(zoo_models) = common::zoo_models() else {
        return;
    };
    let Some(backend) = common::backend_models() else {
        return;
    };
    let zoo = common::zoo();
    let dir = common::tempdir();
    let mut manifest = Vec::new();
    for (name, path) in &zoo_models {
        let copy = roundtrip(path, dir.path(), name);
        manifest.push(serde_json::json!({
            "name": name,
            "original": path,
            "candidate": copy,
            "data_sets": [],
            "inputs": zoo.model(name).unwrap().inputs,
        }));
    }
    for (i, (name, path, sets)) in backend.iter().enumerate() {
        let copy = roundtrip(path, dir.path(), &format!("b{i}"));
        manifest.push(serde_json::json!({
            "name": name, "original": path, "candidate": copy, "data_sets": sets, "inputs": null,
        }));
    }
    let manifest_path = dir.path().join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let out = std::process::Command::new(python)
        .arg(common::repo().join("tests/tools/ort_roundtrip.py"))
        .arg(&manifest_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|_| {
            panic!(
                "no summary from the ORT check:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("onnxruntime round-trip check: {summary}");
    assert!(
        out.status.success(),
        "ORT outputs differ after re-saving: {}",
        summary["failures"]
    );
    assert_eq!(summary["pairs"].as_u64().unwrap() as usize, manifest.len());
    // Every zoo model must really have run.
    assert!(summary["equal"].as_u64().unwrap() as usize >= zoo_models.len());
}

#[test]
fn data_moves_out_automatically_past_the_protobuf_limit() {
    let Some(path) = common::zoo_model("magika") else {
        return;
    };
    let dir = common::tempdir();
    let model = Model::load(&path).unwrap();
    let small = dir.path().join("small.onnx");
    assert!(
        model
            .save(&small, &SaveOptions::default())
            .unwrap()
            .is_none(),
        "3 MB stays inline"
    );
    // The same rule with the limit lowered below the model's size: initializers of >= 1 KiB move out.
    let opts = SaveOptions {
        external: ExternalData::Auto,
        protobuf_limit: 1 << 20,
    };
    let out = dir.path().join("auto.onnx");
    let data = model
        .save(&out, &opts)
        .unwrap()
        .expect("external data past the limit");
    assert!(std::fs::metadata(&out).unwrap().len() < 1 << 20);
    assert!(read_model_file(&out).unwrap().proto == read_model_file(&path).unwrap().proto);
    assert!(std::fs::metadata(&data).unwrap().len() > 3_000_000);
}
