//! Integer activations (static W8A8 and dynamic int8) on the zoo's models, in both runtimes.

mod common;

use common::*;
use serde_json::Value;

fn report(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// magika calibrated on 256 real files and scored on 512 others: the fallback keeps its labels, and
/// the check it ran is in the report.
#[test]
fn magika_w8a8_and_dynamic_keep_labels_on_unseen_files() {
    let (Some(py), Some(_)) = (python(), zoo_model("magika")) else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let (calib, eval) = magika_split(&py, dir.path());
    for (recipe, floor) in [("w8a8", 0.995), ("dynamic", 0.99)] {
        let out = dir.path().join(format!("magika.{recipe}.onnx"));
        let json = dir.path().join(format!("magika.{recipe}.json"));
        let o = quench(&[
            "quantize",
            "zoo:magika",
            "-o",
            &out.display().to_string(),
            "--recipe",
            recipe,
            "--calib",
            &calib.display().to_string(),
            "--inputs",
            &eval.display().to_string(),
            "--batch-size",
            "8",
            "--report",
            &json.display().to_string(),
        ]);
        assert!(o.status.success(), "{recipe}: {}", stderr_of(&o));
        let r = report(&json);
        let checks = r["activations"]["checks"].as_array().unwrap();
        assert!(!checks.is_empty(), "{recipe}: the fallback check ran");
        for rt in ["tract", "ort"] {
            let m = &r["retention"]["runtimes"][rt]["outputs"]["target_label"];
            let top1 = m["top1_agreement"].as_f64().unwrap();
            eprintln!(
                "magika {recipe} in {rt}: top-1 {:.2}% on 512 unseen files, {} sites integer",
                100.0 * top1,
                r["activations"]["quantized"]
            );
            assert!(top1 >= floor, "{recipe} in {rt}: top-1 {top1} < {floor}");
        }
    }
}

/// rxnmap with integer activations: every weight MatMul (tied layers included) becomes integer, both
/// runtimes agree, and the output stays close.
#[test]
fn rxnmap_integer_matmuls() {
    if zoo_model("rxnmap").is_none() || !ort_ready() {
        return;
    }
    let dir = tempdir();
    for recipe in ["w8a8", "dynamic"] {
        let out = dir.path().join(format!("rxnmap.{recipe}.onnx"));
        let json = dir.path().join(format!("rxnmap.{recipe}.json"));
        let o = quench(&[
            "quantize",
            "zoo:rxnmap",
            "-o",
            &out.display().to_string(),
            "--recipe",
            recipe,
            "--calib-random",
            "16",
            "--random",
            "2",
            "--report",
            &json.display().to_string(),
        ]);
        assert!(o.status.success(), "{recipe}: {}", stderr_of(&o));
        let r = report(&json);
        let integer = r["activations"]["quantized"].as_u64().unwrap();
        assert!(integer >= 60, "{recipe}: {integer} integer sites");
        let after = r["file_bytes"]["after"].as_f64().unwrap();
        let before = r["file_bytes"]["before"].as_f64().unwrap();
        assert!(
            after / before < 0.27,
            "{recipe}: file {:.3}×",
            after / before
        );
        // w8a8 smooths the LayerNorm and GELU outputs' outlier channels into the weights: measured
        // cosine 0.99905 (ORT) and 0.99929 (tract) on these batches, 0.9986 without smoothing.
        let floor = if recipe == "w8a8" { 0.998 } else { 0.995 };
        for rt in ["tract", "ort"] {
            let c = r["retention"]["runtimes"][rt]["outputs"]["attention"]["cosine"]
                .as_f64()
                .unwrap();
            eprintln!("rxnmap {recipe} in {rt}: cosine {c:.5}");
            assert!(c >= floor, "{recipe} in {rt}: cosine {c}");
        }
        if recipe == "w8a8" {
            let groups = r["activations"]["smoothing"].as_array().unwrap();
            let smoothed = groups
                .iter()
                .filter(|g| g["scaled"].as_u64().unwrap() > 0)
                .count();
            // 8 groups (each of the tied weights with its 7–8 layers' tensors).
            assert_eq!(groups.len(), 8, "{groups:?}");
            assert!(smoothed >= 4, "{smoothed} groups smoothed: {groups:?}");
        }
        let cross = r["retention"]["cross_runtime"]["candidate"]["attention"]["sqnr_db"]
            .as_f64()
            .unwrap_or(f64::INFINITY);
        // Measured 26.8 dB for w8a8 (as far apart as each is from the reference): an open question,
        // recorded rather than hidden; the floor catches a runtime computing something else.
        eprintln!("rxnmap {recipe}: tract vs ort {cross:.1} dB");
        assert!(cross > 20.0, "{recipe}: tract and ORT differ ({cross} dB)");
    }
}

/// The same calibration data gives the same bytes; static quantization without data is refused.
#[test]
fn calibration_is_deterministic_and_required() {
    if zoo_model("ppocr-cls").is_none() {
        return;
    }
    let dir = tempdir();
    let mut files = Vec::new();
    for i in 0..2 {
        let out = dir.path().join(format!("cls.{i}.onnx"));
        let o = quench(&[
            "quantize",
            "zoo:ppocr-cls",
            "-o",
            &out.display().to_string(),
            "--recipe",
            "w8a8",
            "--calib-random",
            "8",
            "--random",
            "1",
            "--runtime",
            "tract",
            "--calib-runtime",
            "tract",
        ]);
        assert!(o.status.success(), "{}", stderr_of(&o));
        files.push(std::fs::read(&out).unwrap());
    }
    assert!(
        files[0] == files[1],
        "two calibrations gave different files"
    );
    let out = dir.path().join("none.onnx");
    let o = quench(&[
        "quantize",
        "zoo:ppocr-cls",
        "-o",
        &out.display().to_string(),
        "--recipe",
        "w8a8",
    ]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("--calib"), "{}", stderr_of(&o));
    assert!(!out.exists());
}
