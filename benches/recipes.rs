//! Every built-in weight-only recipe on every fetched zoo and corpus model, through the CLI as a user
//! runs it: `cargo bench --bench recipes` prints, per model and recipe, the file size against fp32,
//! the worst output cosine, each output's task figure (top-1 agreement of class scores, sequences
//! decoded alike, similarity ranking of embeddings), the sites the shield promoted and what they cost,
//! and the wall time of `quantize`. Asserts nothing.
//!
//! Verification data: generated inputs (the manifest's spec, or what the graph implies) and 8
//! generated calibration batches, so GPTQ and VQ error feedback take part; the sentence encoder reads
//! the project's sentences instead (one of each paraphrase pair to calibrate, the others to verify).
//! `QUENCH_BENCH_MODELS=a,b` and `QUENCH_BENCH_RECIPES=w8,w4` pick rows. Needs a release build of the
//! binary (`cargo build --release`) and onnxruntime for the ort figures.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

const RECIPES: &[&str] = &["w8", "w4", "nf4", "fp4", "vq3", "vq2"];

fn picked(var: &str) -> Vec<String> {
    std::env::var(var)
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

/// The task figures of every output, in words.
fn task_figures(outputs: &serde_json::Map<String, Value>) -> String {
    let mut out = Vec::new();
    for (name, m) in outputs {
        if let Some(t) = m["top1_agreement"].as_f64() {
            out.push(format!("{name} top-1 {:.1}%", 100.0 * t));
        }
        if let Some(s) = m["sequence_agreement"].as_f64() {
            out.push(format!("{name} sequences {:.1}%", 100.0 * s));
        }
        if let Some(r) = m["similarity_rank"].as_f64() {
            out.push(format!("{name} ranking {r:.4}"));
        }
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(", ")
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join("target/release/quench");
    if !bin.is_file() {
        println!(
            "no release binary at {}: run cargo build --release",
            bin.display()
        );
        return;
    }
    let zoo = quench::zoo::Zoo::load(&root.join("models/zoo.yaml")).unwrap();
    let (models, recipes) = (
        picked("QUENCH_BENCH_MODELS"),
        picked("QUENCH_BENCH_RECIPES"),
    );
    let dir = tempfile::tempdir().unwrap();
    let sentences = root.join("tests/data/sentences.txt");
    let text = std::fs::read_to_string(&sentences).unwrap_or_default();
    let split = |odd: usize, name: &str| -> PathBuf {
        let p = dir.path().join(name);
        let lines: String = text
            .lines()
            .skip(odd)
            .step_by(2)
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&p, lines).unwrap();
        p
    };
    let (calib_text, eval_text) = (split(0, "calib.txt"), split(1, "eval.txt"));
    let tokenizer = zoo.file_path("bert-uncased-tokenizer.json");
    println!(
        "{:<14} {:<6} {:>7} {:>9} {:>8}  {:<24} task figures (ort)",
        "model", "recipe", "size", "cosine", "seconds", "shielded"
    );
    for (name, path) in zoo.fetched() {
        if !models.is_empty() && !models.contains(&name) {
            continue;
        }
        for recipe in RECIPES {
            if !recipes.is_empty() && !recipes.iter().any(|r| r == recipe) {
                continue;
            }
            let out = dir.path().join(format!("{name}.{recipe}.onnx"));
            let json = dir.path().join(format!("{name}.{recipe}.json"));
            let mut cmd = Command::new(&bin);
            cmd.arg("quantize")
                .arg(&path)
                .arg("-o")
                .arg(&out)
                .args(["--recipe", recipe, "--runtime", "ort", "--report"])
                .arg(&json)
                .env("CI", "true");
            if name == "minilm-l3" && tokenizer.is_file() {
                cmd.arg("--calib")
                    .arg(&calib_text)
                    .arg("--inputs")
                    .arg(&eval_text)
                    .arg("--tokenizer")
                    .arg(&tokenizer)
                    .args(["--batch-size", "8"]);
            } else {
                cmd.args(["--calib-random", "8"]);
            }
            let start = Instant::now();
            let o = cmd.output().unwrap();
            let secs = start.elapsed().as_secs_f64();
            if !o.status.success() {
                let err = String::from_utf8_lossy(&o.stderr);
                println!(
                    "{name:<14} {recipe:<6} failed: {}",
                    err.lines().last().unwrap_or("")
                );
                continue;
            }
            row(&name, recipe, &json, secs);
        }
    }
}

fn row(name: &str, recipe: &str, json: &Path, secs: f64) {
    let Ok(r) = std::fs::read(json)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()))
    else {
        println!("{name:<14} {recipe:<6} no report");
        return;
    };
    let size = r["file_bytes"]["after"].as_f64().unwrap_or(f64::NAN)
        / r["file_bytes"]["before"].as_f64().unwrap_or(f64::NAN);
    let empty = serde_json::Map::new();
    let outputs = r["retention"]["runtimes"]["ort"]["outputs"]
        .as_object()
        .unwrap_or(&empty);
    let cosine = outputs
        .values()
        .filter_map(|m| m["cosine"].as_f64())
        .fold(f64::NAN, f64::min);
    let shield = &r["shield"];
    let shielded = match shield["promotions"].as_array() {
        None => "-".to_string(),
        Some(p) if p.is_empty() => "none needed".to_string(),
        Some(p) => {
            let bytes: f64 = p.iter().filter_map(|x| x["bytes"].as_f64()).sum();
            format!(
                "{} site(s) +{:.0} KB{}",
                p.len(),
                bytes / 1e3,
                if shield["met"] == true {
                    ""
                } else {
                    ", missed"
                }
            )
        }
    };
    println!(
        "{name:<14} {recipe:<6} {size:>6.3}× {cosine:>9.5} {secs:>8.1}  {shielded:<24} {}",
        task_figures(outputs)
    );
}
