//! The command-line tool on the zoo: `inspect --json` has the promised keys and finds the weight sites
//! wherever they live (initializers, Constant nodes, subgraphs, tied through Identity); `convert` re-saves
//! losslessly, with external data on request.

mod common;

use std::process::Command;

use serde_json::Value;

fn inspect(path: &std::path::Path) -> Value {
    let out = Command::new(common::quench_bin())
        .arg("inspect")
        .arg(path)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn site<'a>(j: &'a Value, name: &str) -> &'a Value {
    j["weight_sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no site {name}"))
}

#[test]
fn inspect_json_on_every_zoo_model() {
    let Some(models) = common::zoo_models() else {
        return;
    };
    for (name, path) in models {
        let j = inspect(&path);
        assert!(j["parameters"].as_u64().unwrap() > 100_000, "{name}");
        let sites = j["weight_sites"].as_array().unwrap();
        assert!(!sites.is_empty(), "{name} has weight sites");
        for s in sites {
            for key in ["name", "op_type", "shape", "source"] {
                assert!(!s[key].is_null(), "{name}: weight site without {key}");
            }
        }
        assert!(
            j["opsets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["domain"] == "" || o["domain"] == "ai.onnx")
        );
        // The terminal form renders too.
        let out = Command::new(common::quench_bin())
            .arg("inspect")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("weight sites")
        );
    }
}

#[test]
fn weight_sites_are_found_where_exporters_put_them() {
    let (Some(rxn), Some(det), Some(vad)) = (
        common::zoo_model("rxnmap"),
        common::zoo_model("ppocr-det"),
        common::zoo_model("silero-vad"),
    ) else {
        return;
    };
    // rxnmap: 21M parameters; the transformer layers are applied repeatedly, their MatMul weights tied
    // through Identity nodes.
    let j = inspect(&rxn);
    let params = j["parameters"].as_u64().unwrap();
    assert!((21_000_000..21_300_000).contains(&params), "{params}");
    let qkv = site(&j, "onnx::MatMul_1582");
    assert_eq!(qkv["op_type"], "MatMul");
    assert_eq!(qkv["shape"], serde_json::json!([1024, 3072]));
    assert!(
        qkv["consumers"].as_u64().unwrap() >= 2,
        "tied weight: {qkv}"
    );
    assert_eq!(qkv["uses"][0]["channel_axis"], 1);
    assert_eq!(site(&j, "atoms_encoder.weight")["op_type"], "Gather");
    let matmul_bytes: u64 = j["weight_sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    assert!(
        matmul_bytes > 80_000_000,
        "almost all of rxnmap's bytes are weight sites: {matmul_bytes}"
    );

    // PP-OCR: every weight is a Constant node.
    let j = inspect(&det);
    let sites = j["weight_sites"].as_array().unwrap();
    assert!(sites.len() >= 60);
    assert!(sites.iter().all(|s| s["source"] == "constant"));
    assert!(
        sites
            .iter()
            .any(|s| s["op_type"] == "ConvTranspose" && s["uses"][0]["channel_axis"] == 1)
    );

    // silero: the weights are read from inside the If subgraphs.
    let j = inspect(&vad);
    let sites = j["weight_sites"].as_array().unwrap();
    assert!(sites.len() >= 10);
    assert!(sites.iter().all(|s| s["uses"][0]["subgraph"] == true));
    assert!(sites.iter().any(|s| s["op_type"] == "Gemm"));
    assert_eq!(j["subgraphs"], 2);
}

#[test]
fn convert_with_external_data() {
    let Some(path) = common::zoo_model("ppocr-rec") else {
        return;
    };
    let dir = common::tempdir();
    let out = dir.path().join("rec.onnx");
    let st = Command::new(common::quench_bin())
        .args(["convert", "--external-data", "--threshold", "0"])
        .arg(&path)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    // PP-OCR keeps its weights in Constant nodes, which stay inline: nothing crosses the threshold.
    let a = quench::onnx::read_model_file(&path).unwrap().proto;
    let b = quench::onnx::read_model_file(&out).unwrap().proto;
    assert!(a == b);
    let Some(rxn) = common::zoo_model("magika") else {
        return;
    };
    let out = dir.path().join("magika.onnx");
    let st = Command::new(common::quench_bin())
        .args(["convert", "--external-data"])
        .arg(&rxn)
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success());
    let data: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("magika.onnx.") && n.ends_with(".data"))
        .collect();
    assert_eq!(data.len(), 1, "{data:?}");
    assert!(std::fs::metadata(&out).unwrap().len() < 100_000);
    let a = quench::onnx::read_model_file(&rxn).unwrap().proto;
    let b = quench::onnx::read_model_file(&out).unwrap().proto;
    assert!(a == b);
    // Quantized from the copy with external data, the report's file sizes count the data file.
    let json = dir.path().join("w8.json");
    let o = common::quench(&[
        "quantize",
        &out.display().to_string(),
        "-o",
        &dir.path().join("w8.onnx").display().to_string(),
        "--recipe",
        "w8",
        "--runtime",
        "tract",
        "--no-shield",
        "--report",
        &json.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", common::stderr_of(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let before = r["file_bytes"]["before"].as_f64().unwrap();
    let original = std::fs::metadata(&rxn).unwrap().len() as f64;
    assert!(
        (before / original - 1.0).abs() < 0.01,
        "{before} bytes before, the model is {original}"
    );
}
