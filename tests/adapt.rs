//! Adaptive precision through the CLI on the zoo: sensitivity with its cache, allocation to a
//! retention target checked on disjoint data, the written recipe replayed byte for byte, the HTML
//! report, and a bits-per-weight budget on magika's real files.

mod common;

use common::*;
use serde_json::Value;

fn json(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// rxnmap to output cosine ≥ 0.99: met on the evaluation batches, and within a small margin on
/// batches neither calibration nor evaluation saw; smaller than uniform NF4 (the smallest uniform
/// 4-bit recipe that reaches the target); the recipe it writes rebuilds the identical model; the
/// sensitivity cache makes a second run measure nothing.
#[test]
fn rxnmap_allocation_meets_the_target_on_unseen_data_and_replays() {
    let Some(_) = zoo_model("rxnmap") else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let (out, html, cache) = (d("rx.auto.onnx"), d("rx.auto.html"), d("cache"));
    let schemes = "float,int8,int4,nf4,vq2";
    let o = quench(&[
        "quantize",
        "zoo:rxnmap",
        "-o",
        &out,
        "--target-retention",
        "0.99",
        "--calib-random",
        "4",
        "--eval-random",
        "4",
        "--sensitivity-batches",
        "4",
        "--schemes",
        schemes,
        "--cache",
        &cache,
        "--threads",
        "2",
        "--report",
        &html,
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        stdout.contains("allocation: cosine ≥ 0.99: met"),
        "{stdout}"
    );
    let r = json(&dir.path().join("rx.auto.json"));
    let a = &r["allocation"];
    let eval_cos = a["measured"]["cosine"].as_f64().unwrap();
    // The built allocation's scalar sites take error-compensating rounding when it measures closer.
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("gptq kept") || notes.contains("gptq dropped"),
        "{notes}"
    );
    eprintln!("gptq: {}; {notes}", a["gptq"]);
    assert!(a["met"].as_bool().unwrap() && eval_cos >= 0.99, "{a}");
    // The proxy ranks the menu like the measurement does.
    let rho = a["sensitivity"]["spearman"].as_f64().unwrap();
    assert!(rho > 0.8, "Spearman {rho}");
    // Smaller than uniform NF4, which is itself the smallest uniform scheme near the target.
    let tried = a["tried"].as_array().unwrap();
    let point = |kind: &str| tried.iter().find(|p| p["kind"] == kind).unwrap();
    let bpw = a["bits_per_weight"].as_f64().unwrap();
    let nf4 = point("uniform nf4")["bits_per_weight"].as_f64().unwrap();
    assert!(bpw < nf4, "allocation {bpw} bits/weight, uniform nf4 {nf4}");
    // At the size of uniform vq2 the allocation is not measurably worse: its output noise within
    // 0.5 dB (with error feedback uniform vq2 is itself near what mixing can give at that size).
    let nsr = |kind: &str| point(kind)["measured"]["nsr"].as_f64().unwrap();
    let (vq2, same) = (nsr("uniform vq2"), nsr("path at the size of vq2"));
    assert!(
        same <= vq2 * 1.122,
        "output noise: path {same} vs uniform vq2 {vq2}"
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("<svg")
            && page.contains("Retention against size")
            && !page.contains("<script")
    );

    // Data neither calibration (seed 1) nor evaluation (seed 2) saw.
    let cmp = d("unseen.json");
    let o = quench(&[
        "compare",
        "zoo:rxnmap",
        &out,
        "--random",
        "4",
        "--seed",
        "40",
        "--runtime",
        "ort",
        "--no-layers",
        "--json",
        &cmp,
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let unseen = json(std::path::Path::new(&cmp))["outputs"]["attention"]["cosine"]
        .as_f64()
        .unwrap();
    eprintln!("cosine: evaluation {eval_cos:.5}, unseen {unseen:.5}, {bpw:.2} bits per weight");
    // Chosen on 4 evaluation batches, the allocation meets 0.99 there; on others its output noise
    // (1 − cosine) stays within 1.5× of the target's.
    assert!(unseen >= 0.985, "unseen data: cosine {unseen}");

    // The written recipe rebuilds the same bytes.
    let replay = d("rx.replay.onnx");
    let recipe = format!("{out}.recipe.yaml");
    let o = quench(&[
        "quantize",
        "zoo:rxnmap",
        "-o",
        &replay,
        "--recipe",
        &recipe,
        "--calib-random",
        "4",
        "--runtime",
        "tract",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&replay).unwrap());

    // A second sensitivity run on the same data comes from the cache.
    let o = quench(&[
        "sensitivity",
        "zoo:rxnmap",
        "--calib-random",
        "4",
        "--sensitivity-batches",
        "4",
        "--schemes",
        schemes,
        "--cache",
        &cache,
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(s.contains(" 0 measured,"), "{s}");
}

/// magika within 5 bits per weight on real files: the budget holds in the written model, and top-1
/// agreement on the evaluation files is no worse than uniform NF4's, which fits the same budget, and recipe errors name their
/// place.
#[test]
fn magika_budget_holds_and_allocate_errors_are_clear() {
    let (Some(py), Some(_)) = (python(), zoo_model("magika")) else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let (calib, eval) = magika_split(&py, dir.path());
    let d = |n: &str| dir.path().join(n).display().to_string();
    let (out, rep) = (d("m.onnx"), d("m.json"));
    let o = quench(&[
        "quantize",
        "zoo:magika",
        "-o",
        &out,
        "--bits-per-weight",
        "5",
        "--metric",
        "top1",
        "--calib",
        &calib.display().to_string(),
        "--eval",
        &eval.display().to_string(),
        "--inputs",
        &eval.display().to_string(),
        "--batch-size",
        "32",
        "--cache",
        &d("cache"),
        "--report",
        &rep,
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let r = json(std::path::Path::new(&rep));
    let a = &r["allocation"];
    let bpw = a["bits_per_weight"].as_f64().unwrap();
    assert!(bpw <= 5.0 && a["met"].as_bool().unwrap(), "{a}");
    let top1 = a["measured"]["top1"].as_f64().unwrap();
    eprintln!("magika: {bpw:.2} bits per weight, top-1 {top1:.4} on the evaluation files");
    // Uniform NF4 fits the same budget: the allocation does at least as well on the same files.
    let nf4 = a["tried"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "uniform nf4")
        .unwrap();
    let nf4_top1 = nf4["measured"]["top1"].as_f64().unwrap();
    eprintln!(
        "uniform nf4: {} bits per weight, top-1 {nf4_top1:.4}",
        nf4["bits_per_weight"]
    );
    assert!(
        top1 >= 0.9 && top1 >= nf4_top1 - 0.005,
        "top-1 {top1} vs nf4 {nf4_top1}"
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "allocate: { target_retention: 0.99, menu: [int8, float] }\nrules:\n  - match: { op: [Gather] }\n    menu: [int4]\n",
    )
    .unwrap();
    let o = quench(&[
        "quantize",
        "zoo:magika",
        "-o",
        &d("x.onnx"),
        "--recipe",
        &bad.display().to_string(),
    ]);
    assert!(!o.status.success());
    let e = stderr_of(&o);
    assert!(e.contains("rules[0]") && e.contains("int4"), "{e}");
    let o = quench(&[
        "quantize",
        "zoo:magika",
        "-o",
        &d("x.onnx"),
        "--target-retention",
        "0.99",
    ]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("--calib"), "{}", stderr_of(&o));
    let o = quench(&[
        "quantize",
        "zoo:magika",
        "-o",
        &d("x.onnx"),
        "--target-retention",
        "1.5",
        "--calib-random",
        "2",
    ]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("(0, 1]"), "{}", stderr_of(&o));
}
