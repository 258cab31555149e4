//! `quench quantize` with the built-in recipes on every zoo model: valid ONNX (onnx.checker, full check),
//! smaller, verified in both runtimes before it is written, deterministic, and refusing bad recipes.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn checker_passes(py: &std::path::Path, model: &std::path::Path) -> Result<(), String> {
    let o = Command::new(py)
        .args([
            "-c",
            "import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True)",
        ])
        .arg(model)
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(stderr_of(&o))
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| {
        if v == "inf" {
            f64::INFINITY
        } else {
            panic!("not a number: {v}")
        }
    })
}

/// Every built-in weight-only recipe on every zoo model, with the default (portable) target: valid ONNX, smaller,
/// verified in both runtimes (which agree), a reason for every site left float.
#[test]
fn every_builtin_recipe_on_every_zoo_model() {
    let (Some(py), Some(models)) = (python(), zoo_models()) else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    // Recipes with integer activations, and the allocation presets, have their own tests
    // (tests/activations.rs, tests/adapt.rs).
    for (recipe, text) in quench::recipes::BUILTIN {
        let r = quench::recipes::Recipe::parse(recipe, text).unwrap();
        if r.activations.is_some() || r.allocate.is_some() {
            continue;
        }
        for (name, _) in &models {
            check_recipe_on_model(&py, dir.path(), recipe, name);
        }
    }
}

fn check_recipe_on_model(py: &std::path::Path, dir: &std::path::Path, recipe: &str, name: &str) {
    let what = format!("{recipe} on {name}");
    let out = dir.join(format!("{name}.{recipe}.onnx"));
    let report = dir.join(format!("{name}.{recipe}.json"));
    let o = quench(&[
        "quantize",
        &format!("zoo:{name}"),
        "-o",
        &out.display().to_string(),
        "--recipe",
        recipe,
        "--report",
        &report.display().to_string(),
    ]);
    assert!(o.status.success(), "{what}: {}", stderr_of(&o));
    checker_passes(py, &out).unwrap_or_else(|e| panic!("{what}: onnx.checker: {e}"));
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let ratio = f(&r["file_bytes"]["after"]) / f(&r["file_bytes"]["before"]);
    let w = &r["weights"];
    assert!(
        w["quantized"].as_u64().unwrap() > 0,
        "{what}: nothing quantized"
    );
    // int8 keeps ~40 dB on real weights; 4-bit formats ~20 dB; below these a pass is broken.
    // 2-bit VQ keeps ~10 dB on Gaussian-like weights (the Gaussian bound at 2 bits is 12 dB).
    let sqnr_floor = match recipe {
        "w8" => 25.0,
        "vq2" => 7.0,
        _ => 10.0,
    };
    for s in w["sites"].as_array().unwrap() {
        if s["form"].is_string() {
            assert!(
                f(&s["weight_sqnr_db"]) > sqnr_floor,
                "{what}: {} at {} dB",
                s["weight"],
                s["weight_sqnr_db"]
            );
            assert!(s["bytes_after"].as_u64() < s["bytes_before"].as_u64());
        } else {
            assert!(
                s["note"].is_string(),
                "{what}: a float site without a reason: {s}"
            );
        }
    }
    let ret = &r["retention"];
    assert_eq!(
        ret["runtimes"].as_object().unwrap().len(),
        2,
        "{what}: verified in both runtimes"
    );
    // On random inputs ppocr-det's map is ~1e-7 noise: at 2–3 bits per weight the candidate's map is
    // uncorrelated noise in both runtimes, so neither its cosine nor the runtimes' agreement on it
    // means anything (on rendered text pages vq2 keeps 5.8 dB, vq3 15.5 dB).
    let noise_only = name == "ppocr-det" && recipe.starts_with("vq");
    let mut cosines = Vec::new();
    for (out_name, m) in ret["runtimes"]["tract"]["outputs"].as_object().unwrap() {
        let ort = &ret["runtimes"]["ort"]["outputs"][out_name];
        assert!(
            noise_only || (f(&m["cosine"]) - f(&ort["cosine"])).abs() < 1e-3,
            "{what}: runtimes disagree on {out_name}"
        );
        cosines.push(f(&m["cosine"]));
        if let Some(t) = m["top1_agreement"].as_f64()
            && recipe == "w8"
        {
            assert!(t >= 0.99, "{what}: {out_name} top-1 {t}");
        }
    }
    let worst = cosines.iter().cloned().fold(1.0, f64::min);
    eprintln!(
        "{what}: file {ratio:.3}× fp32, {:.2} bits/weight, worst output cosine {worst:.6} (random inputs)",
        f(&w["bits_per_weight"])
    );
    // Random inputs are not real data; these floors catch a broken pass, not a weak recipe.
    let floor = match (recipe, name) {
        ("w8", "rxnmap" | "magika") => 0.9999,
        ("w8", "ppocr-det") => 0.9,
        _ if noise_only => -1.0,
        ("w8", _) => 0.99,
        // 2–3 bits per weight: measured 0.92–0.99 on these two.
        ("vq2" | "vq3", "rxnmap" | "magika") => 0.85,
        // 2 bits per weight on the OCR recogniser's random-input logits: measured 0.38.
        ("vq2" | "vq3", _) => 0.2,
        (_, "rxnmap" | "magika") => 0.99,
        _ => 0.5,
    };
    assert!(worst >= floor, "{what}: output cosine {worst} < {floor}");
    let size_cap = match (recipe, name) {
        ("w8", "rxnmap" | "magika") => 0.27,
        ("vq2", "rxnmap" | "magika") => 0.1,
        ("vq3", "rxnmap" | "magika") => 0.15,
        (_, "rxnmap") => 0.2,
        // nf4 keeps the head float, and ppocr-rec's 6625-way CTC head is a third of the model.
        ("nf4", "ppocr-rec") => 0.5,
        // ddddocr's 8210-way Gemm head is 62% of the model.
        ("nf4", "ddddocr") => 0.75,
        _ => 0.45,
    };
    assert!(ratio <= size_cap, "{what}: {ratio} of the fp32 size");
    // The quantized file runs through the embedded API too.
    quench::embed::Runner::load(&out).unwrap();
}

#[test]
fn quantize_is_deterministic_and_never_overwrites_its_input() {
    let Some(path) = zoo_model("ppocr-cls") else {
        return;
    };
    let dir = tempdir();
    let outs: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("q{i}.onnx")))
        .collect();
    for out in &outs {
        let o = quench(&[
            "quantize",
            &path.display().to_string(),
            "-o",
            &out.display().to_string(),
            "--runtime",
            "tract",
        ]);
        assert!(o.status.success(), "{}", stderr_of(&o));
    }
    assert_eq!(
        std::fs::read(&outs[0]).unwrap(),
        std::fs::read(&outs[1]).unwrap()
    );
    // Level tables and double-quantized scales (nf4 on ppocr-rec's MatMuls), on 1 and 2 threads: the
    // same bytes.
    let Some(rec) = zoo_model("ppocr-rec") else {
        return;
    };
    let files: Vec<Vec<u8>> = ["1", "2"]
        .iter()
        .map(|threads| {
            let out = dir.path().join(format!("nf4.{threads}.onnx"));
            let o = Command::new(quench_bin())
                .args(["quantize", &rec.display().to_string(), "-o"])
                .arg(&out)
                .args(["--recipe", "nf4", "--runtime", "tract"])
                .env("RAYON_NUM_THREADS", threads)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", stderr_of(&o));
            std::fs::read(&out).unwrap()
        })
        .collect();
    assert_eq!(files[0], files[1]);
    let copy = dir.path().join("model.onnx");
    std::fs::copy(&path, &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let o = quench(&[
        "quantize",
        &copy.display().to_string(),
        "-o",
        &copy.display().to_string(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("refusing to write"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(std::fs::read(&copy).unwrap(), before);
    // An output in a folder that does not exist, or onto a folder, is refused before any work.
    let missing = dir.path().join("no-such-folder").join("out.onnx");
    for (out, why) in [
        (missing.clone(), "does not exist"),
        (dir.path().to_path_buf(), "it is a folder"),
    ] {
        let o = quench(&[
            "quantize",
            &copy.display().to_string(),
            "-o",
            &out.display().to_string(),
        ]);
        assert!(!o.status.success());
        let err = stderr_of(&o);
        assert!(err.contains(why) && !err.contains("wrote"), "{err}");
    }
    assert!(!missing.parent().unwrap().exists());
}

#[test]
fn bad_recipes_are_refused_with_their_place() {
    let Some(path) = zoo_model("ppocr-cls") else {
        return;
    };
    let dir = tempdir();
    let recipe = dir.path().join("r.yaml");
    std::fs::write(
        &recipe,
        "defaults: { bits: 8 }\nrules:\n  - match: { op: [Conv] }\n    shceme: { bits: 8 }\n",
    )
    .unwrap();
    let out = dir.path().join("q.onnx");
    let o = quench(&[
        "quantize",
        &path.display().to_string(),
        "-o",
        &out.display().to_string(),
        "--recipe",
        &recipe.display().to_string(),
    ]);
    assert!(!o.status.success());
    let err = stderr_of(&o);
    assert!(err.contains("line 4") && err.contains("shceme"), "{err}");
    assert!(!out.exists(), "nothing is written on error");
    // A rule that skips every convolution leaves the model's convolutions float, and says why.
    std::fs::write(
        &recipe,
        "defaults: { bits: 8 }\nrules:\n  - match: { op: [Conv] }\n    skip: true\n",
    )
    .unwrap();
    let report = dir.path().join("r.json");
    let o = quench(&[
        "quantize",
        &path.display().to_string(),
        "-o",
        &out.display().to_string(),
        "--recipe",
        &recipe.display().to_string(),
        "--runtime",
        "tract",
        "--report",
        &report.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    for s in r["weights"]["sites"].as_array().unwrap() {
        if s["op_types"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "Conv")
        {
            assert!(
                s["form"].is_null() && s["note"].as_str().unwrap().contains("rules[0]"),
                "{s}"
            );
        }
    }
}

/// w4 with the runtime targets: MatMul weights become MatMulNBits (4-bit, block 32); with the tract target
/// the scales are exact in f16, so tract (which keeps Q4_0 scales in f16) and onnxruntime agree to float
/// rounding; sites tract's kernel cannot take fall back to int8 and say why.
#[test]
fn w4_for_ort_and_tract_targets() {
    let (Some(py), Some(_)) = (python(), zoo_model("rxnmap")) else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    for (name, target) in [
        ("rxnmap", "tract"),
        ("rxnmap", "ort"),
        ("magika", "ort"),
        ("ppocr-rec", "ort"),
        ("ppocr-rec", "tract"),
    ] {
        let out = dir.path().join(format!("{name}.{target}.onnx"));
        let report = dir.path().join(format!("{name}.{target}.json"));
        let o = quench(&[
            "quantize",
            &format!("zoo:{name}"),
            "-o",
            &out.display().to_string(),
            "--recipe",
            "w4",
            "--target",
            target,
            "--report",
            &report.display().to_string(),
        ]);
        assert!(o.status.success(), "{name} {target}: {}", stderr_of(&o));
        checker_passes(&py, &out).unwrap_or_else(|e| panic!("{name} {target}: onnx.checker: {e}"));
        let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let sites = r["weights"]["sites"].as_array().unwrap();
        let nbits = sites
            .iter()
            .filter(|s| {
                s["form"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("MatMulNBits"))
            })
            .count();
        let ratio = f(&r["file_bytes"]["after"]) / f(&r["file_bytes"]["before"]);
        let ret = &r["retention"];
        let cos = |rt: &str| {
            ret["runtimes"][rt]["outputs"]
                .as_object()
                .unwrap()
                .values()
                .map(|m| f(&m["cosine"]))
                .fold(1.0, f64::min)
        };
        let cross = ret["cross_runtime"]["candidate"]
            .as_object()
            .unwrap()
            .values()
            .map(|m| f(&m["sqnr_db"]))
            .fold(f64::INFINITY, f64::min);
        eprintln!(
            "{name} w4 --target {target}: {nbits} MatMulNBits sites, file {ratio:.3}×, cosine tract {:.5} ort {:.5}, tract-vs-ort {cross:.1} dB",
            cos("tract"),
            cos("ort")
        );
        match (name, target) {
            ("rxnmap", _) => {
                assert!(nbits >= 7, "{target}: {nbits}");
                assert!(ratio < 0.18, "{target}: {ratio}");
                assert!(cos("tract") > 0.99 && cos("ort") > 0.99);
            }
            // Its two MatMuls are a one-hot embedding and the head: w4 keeps both int8.
            ("magika", _) => {
                assert_eq!(nbits, 0);
                assert!(sites.iter().any(|s| s["role"] == "embedding"));
                assert!(sites.iter().any(|s| s["role"] == "head"));
            }
            // onnxruntime's MatMulNBits pads a short last block: every 4-bit MatMul site takes it.
            ("ppocr-rec", "ort") => {
                let four_bit = sites.iter().filter(|s| s["scheme"]["bits"] == 4).count();
                assert!(nbits > 0 && nbits == four_bit, "{nbits} of {four_bit}");
            }
            _ => {
                // K = 120 and 240 are not multiples of 32: those sites fall back, and the report says so.
                assert!(sites.iter().any(|s| {
                    s["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("not a multiple of 32"))
                }));
            }
        }
        if target == "tract" {
            assert!(
                cross > 90.0,
                "{name}: f16-exact scales make tract and ORT agree ({cross} dB)"
            );
        }
    }
}

/// magika on real files (the pinned packages' files; its documented feature extraction, in tests/tools): the
/// built-in w8 and w4 recipes keep its top-1 label on nearly every file, in both runtimes.
#[test]
fn magika_keeps_its_labels_on_real_files() {
    let (Some(py), Some(_)) = (python(), zoo_model("magika")) else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let feats = dir.path().join("files.npz");
    magika_features(&py, &feats, 512);
    for (recipe, floor) in [("w8", 0.995), ("w4", 0.99)] {
        let out = dir.path().join(format!("magika.{recipe}.onnx"));
        let report = dir.path().join(format!("magika.{recipe}.json"));
        let o = quench(&[
            "quantize",
            "zoo:magika",
            "-o",
            &out.display().to_string(),
            "--recipe",
            recipe,
            "--inputs",
            &feats.display().to_string(),
            "--batch-size",
            "8",
            "--report",
            &report.display().to_string(),
        ]);
        assert!(o.status.success(), "{recipe}: {}", stderr_of(&o));
        let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        for rt in ["tract", "ort"] {
            let m = &r["retention"]["runtimes"][rt]["outputs"]["target_label"];
            let top1 = f(&m["top1_agreement"]);
            eprintln!(
                "magika {recipe} in {rt}: top-1 agreement {:.2}% on 512 real files, cosine {:.6}",
                100.0 * top1,
                f(&m["cosine"])
            );
            assert!(
                agreement_meets(top1, 512, floor),
                "{recipe} in {rt}: top-1 {top1} on 512 files is below {floor} beyond chance"
            );
        }
    }
}

/// GPTQ rounding (the `gptq: true` of the built-in 4-bit and int8 recipes) against plain rounding
/// to nearest, on rxnmap with generated calibration batches: scored on other batches (the
/// verification seed), it lowers the output error by several dB in int4 blocks and in int8, and the
/// same data gives the same bytes. On ppocr-cls it is worse on the calibration batches held out from
/// the fit (every fourth of the 16), and the check against nearest rounding keeps the nearest build.
/// The other 12 give rxnmap's 3072-wide feed-forward input 4032 rows, enough for its Hessian.
#[test]
fn gptq_rounding_beats_nearest_on_data_it_did_not_see() {
    let (Some(_), Some(_)) = (python(), zoo_model("rxnmap")) else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let run = |model: &str, recipe: &str, tag: &str| -> (f64, Value, Vec<u8>) {
        let out = dir.path().join(format!("{model}.{tag}.onnx"));
        let report = dir.path().join(format!("{model}.{tag}.json"));
        let o = quench(&[
            "quantize",
            &format!("zoo:{model}"),
            "-o",
            &out.display().to_string(),
            "--recipe",
            recipe,
            "--target",
            "ort",
            "--runtime",
            "ort",
            "--calib-random",
            "16",
            "--random",
            "4",
            "--report",
            &report.display().to_string(),
        ]);
        assert!(o.status.success(), "{tag}: {}", stderr_of(&o));
        let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let sqnr = r["retention"]["runtimes"]["ort"]["outputs"]
            .as_object()
            .unwrap()
            .values()
            .map(|m| f(&m["sqnr_db"]))
            .fold(f64::INFINITY, f64::min);
        (sqnr, r, std::fs::read(&out).unwrap())
    };
    // ppocr-rec: convolutions (patches of their inputs) and its MatMul head.
    for (model, builtin, gain) in [
        ("rxnmap", "w4", 5.0),
        ("rxnmap", "w8", 2.0),
        ("ppocr-rec", "w8", 5.0),
        ("ppocr-cls", "w8", 0.0),
    ] {
        let text = quench::recipes::BUILTIN
            .iter()
            .find(|(n, _)| *n == builtin)
            .unwrap()
            .1;
        assert!(
            text.contains("gptq: true"),
            "{builtin} rounds with feedback"
        );
        let nearest = dir.path().join(format!("{builtin}-nearest.yaml"));
        std::fs::write(&nearest, text.replace("gptq: true", "gptq: false")).unwrap();
        let (plain, _, _) = run(
            model,
            &nearest.display().to_string(),
            &format!("{builtin}-n"),
        );
        let (fed, r, bytes) = run(model, builtin, &format!("{builtin}-g"));
        eprintln!("{model} {builtin}: output SQNR {plain:.2} dB nearest → {fed:.2} dB gptq");
        let says = r["notes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n.as_str())
            .find(|n| n.starts_with("gptq kept") || n.starts_with("gptq dropped"))
            .unwrap_or_else(|| panic!("{model}: no note on the gptq check"))
            .to_string();
        if model == "ppocr-cls" {
            // Worse with it on the held-out batches: the check keeps the nearest build.
            assert!(says.starts_with("gptq dropped"), "{says}");
            assert!(fed >= plain - 0.5, "{plain} → {fed} dB");
            continue;
        }
        assert!(says.starts_with("gptq kept"), "{says}");
        assert!(fed > plain + gain, "{builtin}: {plain} → {fed} dB");
        // Every MatMul site took the feedback, and says so in its scheme.
        let sites = r["weights"]["sites"].as_array().unwrap();
        let matmuls: Vec<&Value> = sites
            .iter()
            .filter(|s| {
                s["op_types"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|o| o == "MatMul")
            })
            .filter(|s| s["form"].is_string())
            .collect();
        assert!(!matmuls.is_empty());
        for s in &matmuls {
            assert_eq!(s["scheme"]["gptq"], true, "{s}");
        }
        if model == "rxnmap" {
            assert!(matmuls.len() >= 6, "{}", matmuls.len());
        } else {
            let convs = sites
                .iter()
                .filter(|s| s["op_types"][0] == "Conv" && s["scheme"]["gptq"] == true)
                .count();
            assert!(convs >= 10, "{convs} convolutions with feedback");
        }
        if builtin == "w4" {
            let (_, _, again) = run(model, builtin, "w4-again");
            assert!(again == bytes, "gptq is deterministic");
        }
    }
}

/// Retention in the task's terms. PP-OCR's recognizer on rendered text lines is read as CTC text:
/// the report gives the share of lines decoded alike and of lines with a near-tie step. The Gemm-LSTM
/// CRNN's logits are time first (`[20, batch, 37]`), read along the batch axis its name gives; `w4`
/// puts its Gemm weights, each read at every time step, into one shared 4-bit MatMulNBits weight.
#[test]
fn retention_reads_ocr_output_as_decoded_text() {
    let (Some(py), Some(_), Some(_)) =
        (python(), zoo_model("ppocr-rec"), zoo_model("captcha-crnn"))
    else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let lines = dir.path().join("lines.npz");
    let o = std::process::Command::new(&py)
        .arg(repo().join("tests/tools/text_images.py"))
        .arg(&lines)
        .args(["24", "48", "320", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let run = |model: &str, recipe: &str, extra: &[&str]| {
        let out = dir.path().join(format!("{recipe}.onnx"));
        let json = dir.path().join(format!("{recipe}.json"));
        let (out_s, json_s) = (out.display().to_string(), json.display().to_string());
        let mut args = vec![
            "quantize", model, "-o", &out_s, "--recipe", recipe, "--report", &json_s,
        ];
        args.extend_from_slice(extra);
        let o = quench(&args);
        assert!(o.status.success(), "{model}: {}", stderr_of(&o));
        let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        (String::from_utf8_lossy(&o.stdout).to_string(), r)
    };
    let lines_s = lines.display().to_string();
    let (stdout, r) = run("zoo:ppocr-rec", "w8", &["--inputs", &lines_s]);
    assert!(stdout.contains("CTC-decoded sequences alike"), "{stdout}");
    let mut alike_in = Vec::new();
    for rt in ["ort", "tract"] {
        let outputs = r["retention"]["runtimes"][rt]["outputs"]
            .as_object()
            .unwrap();
        let m = outputs.values().next().unwrap();
        assert_eq!(m["kind"]["sequence"]["batch_axis"], 0, "{m}");
        assert_eq!(m["sequences"], 24, "{m}");
        let alike = f(&m["sequence_agreement"]);
        let ties = f(&m["sequence_near_tie_share"]);
        eprintln!(
            "ppocr-rec w8 on 24 rendered lines in {rt}: {alike:.3} decoded alike, {ties:.3} with a near-tie step"
        );
        assert!(
            (0.0..=1.0).contains(&alike) && (0.0..=1.0).contains(&ties),
            "{m}"
        );
        // A line with a near-tie step has a near-tie step among all steps.
        assert_eq!(f(&m["near_tie_share"]) > 0.0, ties > 0.0, "{m}");
        alike_in.push(alike);
    }
    // Both runtimes compute the same numbers to float rounding: at most a line apart.
    assert!(
        (alike_in[0] - alike_in[1]).abs() <= 1.0 / 24.0 + 1e-9,
        "{alike_in:?}"
    );
    let (_, r) = run("zoo:captcha-crnn", "w4", &["--target", "tract"]);
    let m = &r["retention"]["runtimes"]["tract"]["outputs"]["logits"];
    assert_eq!(m["kind"]["sequence"]["batch_axis"], 1, "{m}");
    let sites = r["weights"]["sites"].as_array().unwrap();
    let gemm_4bit = sites
        .iter()
        .filter(|s| {
            s["op_types"][0] == "Gemm"
                && s["form"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("MatMulNBits"))
        })
        .count();
    assert_eq!(
        gemm_4bit, 2,
        "the input-to-hidden weights of both directions"
    );
    let ratio = f(&r["file_bytes"]["after"]) / f(&r["file_bytes"]["before"]);
    assert!(ratio < 0.2, "{ratio}");
}

/// Floors and shielding. silero-vad under w4 misses the recipe's cosine floor on generated inputs
/// because of one site; the shield promotes it (and little else) and the floor holds, where
/// `--no-shield` writes the model that misses. PP-OCR's recognizer under w8 on rendered text lines
/// (the user's data: held to the floor whatever it costs) misses 0.99 too; shielded, it meets it and
/// decodes more lines as the float model does.
#[test]
fn shielding_promotes_the_sites_that_miss_the_floors() {
    let (Some(py), Some(_), Some(_)) = (python(), zoo_model("silero-vad"), zoo_model("ppocr-rec"))
    else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let run = |model: &str, recipe: &str, tag: &str, extra: &[&str]| -> Value {
        let out = dir.path().join(format!("{tag}.onnx"));
        let json = dir.path().join(format!("{tag}.json"));
        let (out_s, json_s) = (out.display().to_string(), json.display().to_string());
        let mut args = vec![
            "quantize", model, "-o", &out_s, "--recipe", recipe, "--report", &json_s,
        ];
        args.extend_from_slice(extra);
        let o = quench(&args);
        assert!(o.status.success(), "{tag}: {}", stderr_of(&o));
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
    };
    let worst_cosine = |r: &Value| {
        r["retention"]["runtimes"]["ort"]["outputs"]
            .as_object()
            .unwrap()
            .values()
            .map(|m| f(&m["cosine"]))
            .fold(1.0, f64::min)
    };
    let shielded = run("zoo:silero-vad", "w4", "vad", &[]);
    let plain = run("zoo:silero-vad", "w4", "vad-plain", &["--no-shield"]);
    let s = &shielded["shield"];
    assert_eq!(s["floors"]["cosine"], 0.98);
    assert!(f(&s["before"]["cosine"]) < 0.98, "{s}");
    assert_eq!(s["met"], true, "{s}");
    let promotions = s["promotions"].as_array().unwrap();
    assert!(!promotions.is_empty() && promotions.len() <= 3, "{s}");
    for p in promotions {
        assert!(f(&p["sqnr_db_promoted"]) > f(&p["sqnr_db_before"]), "{p}");
        assert!(p["bytes"].as_i64().unwrap() > 0, "{p}");
    }
    assert!(plain["shield"].is_null());
    // The verification batches are the ones the shield measured on: the floor holds there.
    assert!(
        worst_cosine(&shielded) >= 0.98,
        "{}",
        worst_cosine(&shielded)
    );
    assert!(worst_cosine(&plain) < 0.98, "{}", worst_cosine(&plain));
    let size = |r: &Value| f(&r["file_bytes"]["after"]);
    assert!(size(&shielded) > size(&plain) && size(&shielded) < 1.2 * size(&plain));
    eprintln!(
        "silero-vad w4: cosine {:.4} unshielded → {:.4} with {} promotion(s), file {:.0} → {:.0} bytes",
        worst_cosine(&plain),
        worst_cosine(&shielded),
        promotions.len(),
        size(&plain),
        size(&shielded)
    );

    let lines = dir.path().join("lines.npz");
    let o = std::process::Command::new(&py)
        .arg(repo().join("tests/tools/text_images.py"))
        .arg(&lines)
        .args(["24", "48", "320", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let lines = lines.display().to_string();
    let shielded = run("zoo:ppocr-rec", "w8", "rec", &["--inputs", &lines]);
    let plain = run(
        "zoo:ppocr-rec",
        "w8",
        "rec-plain",
        &["--inputs", &lines, "--no-shield"],
    );
    assert_eq!(shielded["shield"]["met"], true, "{}", shielded["shield"]);
    let text = |r: &Value| {
        let outputs = r["retention"]["runtimes"]["ort"]["outputs"]
            .as_object()
            .unwrap();
        f(&outputs.values().next().unwrap()["sequence_agreement"])
    };
    eprintln!(
        "ppocr-rec w8 on 24 rendered lines: cosine {:.4} → {:.4}, lines decoded alike {:.3} → {:.3}",
        worst_cosine(&plain),
        worst_cosine(&shielded),
        text(&plain),
        text(&shielded)
    );
    assert!(worst_cosine(&plain) < 0.99);
    assert!(
        worst_cosine(&shielded) >= 0.99,
        "{}",
        worst_cosine(&shielded)
    );
    assert!(text(&shielded) > text(&plain));
}

/// A floor on the task's own figure: the sentence encoder's pooled embedding under w4 with a recipe
/// that asks for a similarity ranking of 0.995 on the user's sentences. The shield reads the ranking
/// (not only cosine or SQNR), promotes sites until it holds, and says so; the written model keeps it
/// on those sentences, where the unshielded one does not.
#[test]
fn a_similarity_floor_is_held_by_shielding() {
    let Some(tok) = minilm_tokenizer() else {
        return;
    };
    let dir = tempdir();
    let (_, sentences) = sentence_halves(dir.path());
    let builtin = quench::recipes::BUILTIN
        .iter()
        .find(|(n, _)| *n == "w4")
        .unwrap()
        .1;
    let recipe = dir.path().join("w4-similarity.yaml");
    let floors = builtin.lines().find(|l| l.starts_with("floors:")).unwrap();
    std::fs::write(
        &recipe,
        builtin.replace(floors, "floors: { similarity: 0.995 }"),
    )
    .unwrap();
    let (recipe, sentences, tok) = (
        recipe.display().to_string(),
        sentences.display().to_string(),
        tok.display().to_string(),
    );
    let run = |tag: &str, extra: &[&str]| -> (Value, String) {
        let out = dir.path().join(format!("{tag}.onnx"));
        let json = dir.path().join(format!("{tag}.json"));
        let (out_s, json_s) = (out.display().to_string(), json.display().to_string());
        let mut args = vec![
            "quantize",
            "zoo:minilm-l3",
            "-o",
            &out_s,
            "--recipe",
            &recipe,
            "--inputs",
            &sentences,
            "--tokenizer",
            &tok,
            "--batch-size",
            "8",
            "--runtime",
            "ort",
            "--report",
            &json_s,
        ];
        args.extend_from_slice(extra);
        let o = quench(&args);
        assert!(o.status.success(), "{tag}: {}", stderr_of(&o));
        (
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let rank =
        |r: &Value| f(&r["retention"]["runtimes"]["ort"]["outputs"]["461"]["similarity_rank"]);
    let (shielded, said) = run("shielded", &[]);
    let (plain, _) = run("plain", &["--no-shield"]);
    let s = &shielded["shield"];
    assert_eq!(s["floors"]["similarity"], 0.995);
    assert!(f(&s["before"]["similarity"]) < 0.995, "{s}");
    assert_eq!(s["met"], true, "{s}");
    assert!(said.contains("similarity ranking"), "{said}");
    assert!(rank(&plain) < 0.995, "{}", rank(&plain));
    assert!(rank(&shielded) >= 0.995, "{}", rank(&shielded));
    eprintln!(
        "minilm-l3 w4 on 61 sentences: similarity ranking {:.4} unshielded → {:.4} with {} promotion(s)",
        rank(&plain),
        rank(&shielded),
        s["promotions"].as_array().unwrap().len()
    );
}

/// The built-in w4 on the sentence encoder, calibrated on one sentence of each paraphrase pair and
/// scored on the other: at most 0.16× of the float file, with the ranking of sentence similarities
/// kept at 0.985 or more in both runtimes (MatMuls in int4 blocks of 32 with feedback rounding,
/// the word-embedding table in NF4 blocks of 16 with 8-bit scales).
#[test]
fn w4_keeps_the_sentence_ranking_at_a_sixth_of_the_size() {
    let Some(tok) = minilm_tokenizer() else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let (calib, eval) = sentence_halves(dir.path());
    let (out, json) = (dir.path().join("w4.onnx"), dir.path().join("w4.json"));
    let tok = tok.display().to_string();
    let o = quantize_calibrated(
        "zoo:minilm-l3",
        "w4",
        &calib,
        &eval,
        &out,
        &json,
        &["--tokenizer", &tok, "--runtime", "both", "--no-shield"],
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let ratio = f(&r["file_bytes"]["after"]) / f(&r["file_bytes"]["before"]);
    let table = r["weights"]["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["weight"].as_str().unwrap().contains("word_embeddings"))
        .unwrap();
    assert!(
        table["label"].as_str().unwrap().starts_with("nf4"),
        "{table}"
    );
    for rt in ["ort", "tract"] {
        let rank = f(&r["retention"]["runtimes"][rt]["outputs"]["461"]["similarity_rank"]);
        eprintln!(
            "minilm-l3 w4 on 61 unseen sentences ({rt}): ranking {rank:.4}, {ratio:.3}× size"
        );
        assert!(rank >= 0.985, "{rt}: {rank}");
    }
    assert!(ratio <= 0.16, "{ratio}");
}
