//! Vector quantization through the CLI on the zoo's models: importance from real calibration data,
//! the report's codebook figures, determinism, and recipe errors.

mod common;

use common::*;
use serde_json::Value;

fn report(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The output SQNR (dB) onnxruntime measured for magika's label scores.
fn label_sqnr(r: &Value) -> f64 {
    r["retention"]["runtimes"]["ort"]["outputs"]["target_label"]["sqnr_db"]
        .as_f64()
        .unwrap()
}

/// magika with vq2, clustered weighted by the input-channel energy of 256 real files, against the
/// same codebooks clustered unweighted, both scored on 512 others: the weighting is used (the report
/// says so, the codebooks differ) and both keep the labels' scores within a few dB of each other.
/// Both are 2.1–2.4 bits per weight and use every code. (On these files the weighting does not win:
/// 18.4 dB weighted against 19.2 dB unweighted.)
#[test]
fn calibration_importance_weights_vq_on_magika() {
    let (Some(py), Some(_)) = (python(), zoo_model("magika")) else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let (calib, eval) = magika_split(&py, dir.path());
    let unweighted = dir.path().join("vq2-none.yaml");
    let text = quench::recipes::BUILTIN
        .iter()
        .find(|(n, _)| *n == "vq2")
        .unwrap()
        .1
        .replace("importance: calibration", "importance: none");
    std::fs::write(&unweighted, text).unwrap();
    let run = |recipe: &str, tag: &str| {
        let out = dir.path().join(format!("magika.{tag}.onnx"));
        let json = dir.path().join(format!("magika.{tag}.json"));
        let o = quantize_calibrated("zoo:magika", recipe, &calib, &eval, &out, &json, &[]);
        assert!(o.status.success(), "{tag}: {}", stderr_of(&o));
        report(&json)
    };
    let weighted = run("vq2", "weighted");
    let plain = run(&unweighted.display().to_string(), "unweighted");
    for (tag, r) in [("weighted", &weighted), ("unweighted", &plain)] {
        let vq_sites: Vec<&Value> = r["weights"]["sites"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["vq"].is_object())
            .collect();
        assert!(vq_sites.len() >= 2, "{tag}: {} VQ sites", vq_sites.len());
        for s in vq_sites {
            let v = &s["vq"];
            let bpw = v["bits_per_weight"].as_f64().unwrap();
            assert!((2.0..2.5).contains(&bpw), "{tag}: {bpw} bits per weight");
            assert_eq!(v["weighted_by_data"].as_bool(), Some(tag == "weighted"));
            for c in v["codebooks"].as_array().unwrap() {
                assert!(c["active"].as_u64().unwrap() >= 250, "{tag}: {c}");
                assert!(c["entropy_bits"].as_f64().unwrap() > 7.0, "{tag}: {c}");
            }
        }
        let ratio = r["file_bytes"]["after"].as_f64().unwrap()
            / r["file_bytes"]["before"].as_f64().unwrap();
        assert!(ratio < 0.1, "{tag}: file {ratio} of fp32");
    }
    let (a, b) = (label_sqnr(&plain), label_sqnr(&weighted));
    eprintln!(
        "magika vq2 on 512 unseen files: output SQNR unweighted {a:.2} dB, weighted {b:.2} dB"
    );
    assert_ne!(a, b, "the weighting changed nothing");
    assert!(
        a.min(b) > 12.0 && (a - b).abs() < 3.0,
        "{a:.2} vs {b:.2} dB"
    );
}

/// The same recipe, data and seed give byte-identical files; without --calib the clustering is
/// data-free and says so; VQ keys in the wrong place are refused with their place.
#[test]
fn vq_is_deterministic_and_bad_keys_are_refused() {
    if zoo_model("magika").is_none() {
        return;
    }
    let dir = tempdir();
    let mut files = Vec::new();
    for i in 0..2 {
        let out = dir.path().join(format!("m{i}.onnx"));
        let o = quench(&[
            "quantize",
            "zoo:magika",
            "-o",
            &out.display().to_string(),
            "--recipe",
            "vq3",
            "--calib-random",
            "4",
            "--runtime",
            "tract",
        ]);
        assert!(o.status.success(), "{}", stderr_of(&o));
        files.push(std::fs::read(&out).unwrap());
    }
    assert!(files[0] == files[1], "two runs differ");
    let out = dir.path().join("free.onnx");
    let o = quench(&[
        "quantize",
        "zoo:magika",
        "-o",
        &out.display().to_string(),
        "--recipe",
        "vq2",
        "--runtime",
        "tract",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("data-free"), "{text}");
    for (yaml, want) in [
        (
            "defaults: { format: vq, bits: 2 }\n",
            "`bits` does not apply to format vq",
        ),
        (
            "defaults: { format: vq, dim: 20 }\n",
            "dim must be in 1..=16",
        ),
        (
            "defaults: { bits: 4, codebook_size: 256 }\n",
            "`codebook_size` goes with format vq",
        ),
        (
            "defaults: { format: vq }\nrules:\n  - match: { op: [Gather] }\n    scheme: { importance: fisher }\n",
            "rules[0]",
        ),
    ] {
        let recipe = dir.path().join("bad.yaml");
        std::fs::write(&recipe, yaml).unwrap();
        let out = dir.path().join("bad.onnx");
        let o = quench(&[
            "quantize",
            "zoo:magika",
            "-o",
            &out.display().to_string(),
            "--recipe",
            &recipe.display().to_string(),
        ]);
        assert!(!o.status.success(), "{yaml}");
        let err = stderr_of(&o);
        assert!(err.contains(want), "{yaml}: {err}");
        assert!(!out.exists());
    }
}
