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
    // (recipe, floor in tract, floor in ORT), each a floor on the true agreement rate, judged against
    // the 512-file sample by its binomial tail. Measured on the pinned packages' files: w8a8 98.8% in
    // tract, 98.6% in ORT (3 sites integer); dynamic 99.8% in both (2 of 3).
    for (recipe, floors) in [("w8a8", [0.98, 0.98]), ("dynamic", [0.99, 0.99])] {
        let out = dir.path().join(format!("magika.{recipe}.onnx"));
        let json = dir.path().join(format!("magika.{recipe}.json"));
        let o = quantize_calibrated("zoo:magika", recipe, &calib, &eval, &out, &json, &[]);
        assert!(o.status.success(), "{recipe}: {}", stderr_of(&o));
        let r = report(&json);
        let checks = r["activations"]["checks"].as_array().unwrap();
        assert!(!checks.is_empty(), "{recipe}: the fallback check ran");
        // The first Dense reads a one-hot encoding of the bytes: no two neighbouring codes are ever
        // non-zero together, so the saturation guard, bounded by the calibrated codes, widens none of
        // its channels (for any u8 input it would widen 62 of 64).
        for s in r["activations"]["sites"].as_array().unwrap() {
            // onnxruntime's ConvInteger is slower than its fp32 Conv: dynamic keeps the Conv float.
            if recipe == "dynamic" && s["op_type"] == "Conv" {
                assert!(s["form"].is_null(), "{s}");
                assert!(s["note"].as_str().unwrap().contains("ConvInteger"), "{s}");
            }
            if s["node"].as_str().unwrap().contains("Dense_0") && !s["form"].is_null() {
                assert_eq!(s["saturation_bound"], "calibrated", "{recipe}: {s}");
                assert_eq!(s["saturation_channels"], 0, "{recipe}: {s}");
            }
        }
        for (rt, floor) in ["tract", "ort"].into_iter().zip(floors) {
            let m = &r["retention"]["runtimes"][rt]["outputs"]["target_label"];
            let top1 = m["top1_agreement"].as_f64().unwrap();
            eprintln!(
                "magika {recipe} in {rt}: top-1 {:.2}% on 512 unseen files, {} sites integer",
                100.0 * top1,
                r["activations"]["quantized"]
            );
            assert!(
                agreement_meets(top1, 512, floor),
                "{recipe} in {rt}: top-1 {top1} on 512 files is below {floor} beyond chance"
            );
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
        // dynamic smooths the same groups (given calibration data): 0.99941 ORT on 8 batches, 0.99892
        // without smoothing.
        let floor = 0.998;
        for rt in ["tract", "ort"] {
            let c = r["retention"]["runtimes"][rt]["outputs"]["attention"]["cosine"]
                .as_f64()
                .unwrap();
            eprintln!("rxnmap {recipe} in {rt}: cosine {c:.5}");
            assert!(c >= floor, "{recipe} in {rt}: cosine {c}");
        }
        {
            let groups = r["activations"]["smoothing"].as_array().unwrap();
            let smoothed = groups
                .iter()
                .filter(|g| g["scaled"].as_u64().unwrap() > 0)
                .count();
            // 8 groups (each of the tied weights with its 7–8 layers' tensors).
            assert_eq!(groups.len(), 8, "{recipe}: {groups:?}");
            assert!(
                smoothed >= 4,
                "{recipe}: {smoothed} groups smoothed: {groups:?}"
            );
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

/// PP-OCR's orientation classifier on synthetic text crops: int8 weights alone, every activation
/// float, already cost more output cosine than a strict floor allows, so no fallback could reach it.
/// The activations are then held to the floor's allowance counted from that model instead of all
/// going back to float (which is what the fallback did before).
#[test]
fn activations_keep_their_allowance_when_the_weights_alone_miss_the_floor() {
    let (Some(py), Some(_)) = (python(), zoo_model("ppocr-cls")) else {
        return;
    };
    if !ort_ready() {
        return;
    }
    let dir = tempdir();
    let crops = |name: &str, count: usize, seed: usize| {
        let out = dir.path().join(name);
        let o = std::process::Command::new(&py)
            .arg(repo().join("tests/tools/text_images.py"))
            .arg(&out)
            .args([
                count.to_string(),
                "48".into(),
                "192".into(),
                seed.to_string(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr_of(&o));
        out
    };
    let (calib, eval) = (crops("calib.npz", 64, 1), crops("eval.npz", 16, 2));
    // Measured on these crops: int8 weights alone give output cosine 0.9977 (top-1 98.4%), far
    // below 0.999 on any CPU.
    let recipe = dir.path().join("strict.yaml");
    std::fs::write(
        &recipe,
        "defaults: { bits: 8, granularity: channel, symmetric: true }\n\
         rules:\n  - match: { max_elements: 64 }\n    skip: true\n\
         activations:\n  mode: static\n  ops: [MatMul, Gemm, Conv]\n  outputs: [Conv]\n\
         \x20 fallback: { sqnr_db: 20, cosine: 0.999 }\n",
    )
    .unwrap();
    let (out, json) = (dir.path().join("cls.onnx"), dir.path().join("cls.json"));
    let recipe = recipe.display().to_string();
    let o = quantize_calibrated("zoo:ppocr-cls", &recipe, &calib, &eval, &out, &json, &[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let r = report(&json);
    let a = &r["activations"];
    let tensors = a["tensors"].as_array().unwrap().len() as u64;
    let checks = a["checks"].as_array().unwrap();
    let cosine = |c: &Value| c["retention"]["cosine"].as_f64().unwrap();
    let base = checks
        .iter()
        .find(|c| c["float_tensors"] == tensors)
        .expect("the all-float model was scored");
    assert!(cosine(base) < 0.999, "{base}");
    let notes = a["notes"].to_string();
    assert!(notes.contains("already below the floors"), "{notes}");
    // The last candidate built is the one written: within the floor's allowance of the all-float
    // model, with integer sites left.
    let last = checks.last().unwrap();
    assert!(
        cosine(last) >= cosine(base) - 0.001 - 1e-9,
        "{last} vs {base}"
    );
    let integer = a["quantized"].as_u64().unwrap();
    assert!(integer > 0, "every site went back to float: {notes}");
    let m = &r["retention"]["runtimes"]["ort"]["outputs"]["save_infer_model/scale_0.tmp_1"];
    eprintln!(
        "ppocr-cls, strict floor: {integer} sites integer, all-float cosine {:.5}, written {:.5} \
         (calibration), {:.5} on unseen crops",
        cosine(base),
        cosine(last),
        m["cosine"].as_f64().unwrap()
    );
    assert!(m["cosine"].as_f64().unwrap() >= 0.99, "{m}");
}

/// A little-endian f32 `.npy` of shape `[rows, cols]`.
fn write_npy(path: &std::path::Path, rows: usize, cols: usize, values: &[f32]) {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let mut header = dict.into_bytes();
    // Magic (6) + version (2) + length (2) + header, padded with spaces to 64 bytes, ending in \n.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(&header);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).unwrap();
}

/// onnxruntime's u8·s8 MatMul kernels on x86 without VNNI add neighbouring products in saturating
/// 16-bit lanes. A weight whose neighbours are all large and of one sign overflows them for inputs
/// near the top of their range. The guard must widen exactly what the data can overflow: nothing for
/// one-hot rows (no two neighbours are ever non-zero), every channel for dense rows near 1, where
/// onnxruntime must then agree with tract's 32-bit integer products; `strict` widens for any input.
#[test]
fn saturation_guard_bounds_the_codes_the_data_gives() {
    if !ort_ready() {
        return;
    }
    use quench::onnx::pb::{GraphProto, NodeProto};
    let (k, n, rows) = (64usize, 16usize, 32usize);
    let dir = tempdir();
    // x [rows, k] · W [k, n] → Relu (a site whose output is a graph output stays float in dynamic).
    let w: Vec<u8> = (0..k * n)
        .flat_map(|i| (0.5 + 0.5 * ((i * 7919) % 97) as f32 / 97.0).to_le_bytes())
        .collect();
    let graph = GraphProto {
        name: Some("saturating".into()),
        node: vec![
            NodeProto {
                op_type: Some("MatMul".into()),
                name: Some("product".into()),
                input: vec!["x".into(), "w".into()],
                output: vec!["p".into()],
                ..Default::default()
            },
            NodeProto {
                op_type: Some("Relu".into()),
                name: Some("relu".into()),
                input: vec!["p".into()],
                output: vec!["y".into()],
                ..Default::default()
            },
        ],
        initializer: vec![raw_tensor("w", 1, &[k as i64, n as i64], w)],
        input: vec![value_info("x", 1)],
        output: vec![value_info("y", 1)],
        ..Default::default()
    };
    let model = dir.path().join("saturating.onnx");
    std::fs::write(&model, prost::Message::encode_to_vec(&model_of(graph))).unwrap();
    let one_hot: Vec<f32> = (0..rows * k)
        .map(|i| if i % k == (i / k * 7) % k { 1.0 } else { 0.0 })
        .collect();
    let dense: Vec<f32> = (0..rows * k)
        .map(|i| 0.9 + 0.1 * ((i * 31) % 11) as f32 / 11.0)
        .collect();
    // No fallback, so what the guard does is what runs.
    let recipe = |saturation: &str| {
        let path = dir.path().join(format!("dynamic.{saturation}.yaml"));
        std::fs::write(
            &path,
            format!(
                "description: dynamic, saturation {saturation}\n\
                 defaults: {{ bits: 8, granularity: channel, symmetric: true }}\n\
                 activations:\n  mode: dynamic\n  ops: [MatMul]\n  \
                 fallback: {{ cosine: 0, top1: 0 }}\n  saturation: {saturation}\n"
            ),
        )
        .unwrap();
        path
    };
    let run = |data: &[f32], name: &str, saturation: &str| -> Value {
        let npy = dir.path().join(format!("{name}.npy"));
        write_npy(&npy, rows, k, data);
        let out = dir.path().join(format!("{name}.{saturation}.onnx"));
        let json = dir.path().join(format!("{name}.{saturation}.json"));
        let o = quench(&[
            "quantize",
            &model.display().to_string(),
            "-o",
            &out.display().to_string(),
            "--recipe",
            &recipe(saturation).display().to_string(),
            "--target",
            "ort",
            "--calib",
            &npy.display().to_string(),
            "--inputs",
            &npy.display().to_string(),
            "--batch-size",
            "4",
            "--ort-fast",
            "--report",
            &json.display().to_string(),
        ]);
        assert!(o.status.success(), "{name} {saturation}: {}", stderr_of(&o));
        report(&json)
    };
    let site = |r: &Value| r["activations"]["sites"][0].clone();
    let cross = |r: &Value| {
        r["retention"]["cross_runtime"]["candidate"]["y"]["sqnr_db"]
            .as_f64()
            .unwrap_or(f64::INFINITY)
    };

    let r = run(&one_hot, "one-hot", "fix");
    let s = site(&r);
    assert_eq!(
        s["form"].as_str().map(|f| f.contains("MatMulInteger")),
        Some(true),
        "{s}"
    );
    assert_eq!(s["saturation_bound"], "calibrated", "{s}");
    assert_eq!(s["saturation_channels"], 0, "{s}");
    assert!(cross(&r) > 60.0, "one-hot: tract vs ort {} dB", cross(&r));
    let r = run(&one_hot, "one-hot", "strict");
    assert_eq!(site(&r)["saturation_bound"], "any_input");
    assert_eq!(site(&r)["saturation_channels"], n as u64);

    let r = run(&dense, "dense", "fix");
    assert_eq!(site(&r)["saturation_channels"], n as u64, "{}", site(&r));
    eprintln!("dense, guarded: tract vs ort {:.1} dB", cross(&r));
    assert!(
        cross(&r) > 60.0,
        "dense, guarded: tract vs ort {} dB",
        cross(&r)
    );
    // Unguarded, onnxruntime's 16-bit lanes saturate, and the test sees it, on a CPU without VNNI.
    // With VNNI (AVX-512 VNNI or AVX-VNNI) onnxruntime's kernel adds four products straight into 32
    // bits, as tract does: then the unguarded model agrees too.
    let r = run(&dense, "dense", "ignore");
    eprintln!("dense, unguarded: tract vs ort {:.1} dB", cross(&r));
    if ort_has_vnni() {
        assert!(
            cross(&r) > 60.0,
            "dense, unguarded on a VNNI CPU: tract vs ort {} dB",
            cross(&r)
        );
    } else {
        assert!(
            cross(&r) < 20.0,
            "dense, unguarded: tract vs ort {} dB",
            cross(&r)
        );
    }
}

/// Per-channel affine ops after a Conv (a BatchNormalization, a scalar Mul written first, a
/// per-channel Add, a Sub) are folded into its weight and bias: exactly (float weights, nothing
/// integer), and in W8A8 every integer Conv then writes a quantized output (right after it, or after
/// the Relu that onnxruntime drops into it), which is what onnxruntime fuses into QLinearConv.
#[test]
fn affine_ops_fold_into_convs_whose_outputs_are_quantized() {
    if !ort_ready() {
        return;
    }
    use quench::onnx::pb::{AttributeProto, GraphProto, ModelProto, NodeProto};
    let f32s = |v: Vec<f32>| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let wave = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0) * 0.5)
            .collect()
    };
    let node = |op: &str, name: &str, inputs: &[&str], output: &str| NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    let mut conv_a = node("Conv", "conv_a", &["x", "wa", "ba"], "a");
    conv_a.attribute.push(AttributeProto {
        name: "pads".into(),
        r#type: Some(7),
        ints: vec![1, 1, 1, 1],
        ..Default::default()
    });
    let bn_var: Vec<f32> = (0..6).map(|i| 0.5 + 0.25 * i as f32).collect();
    // conv_a → BatchNormalization → conv_b (no bias) → Mul (scalar first) → Add → Sub → Relu →
    // conv_c (no bias, nothing to fold) → pool: conv_b is rebuilt with a bias, after the
    // BatchNormalization it reads is gone.
    let graph = GraphProto {
        name: Some("affine".into()),
        node: vec![
            conv_a,
            node(
                "BatchNormalization",
                "bn_a",
                &["a", "g", "beta", "mean", "var"],
                "a1",
            ),
            node("Conv", "conv_b", &["a1", "wb"], "b"),
            node("Mul", "scale_b", &["sb", "b"], "b1"),
            node("Add", "shift_b", &["b1", "tb"], "b2"),
            node("Sub", "unshift_b", &["b2", "ub"], "b3"),
            node("Relu", "relu_b", &["b3"], "r"),
            node("Conv", "conv_c", &["r", "wc"], "c"),
            node("GlobalAveragePool", "pool", &["c"], "y"),
        ],
        initializer: vec![
            raw_tensor("wa", 1, &[6, 4, 3, 3], f32s(wave(216, 1))),
            raw_tensor("ba", 1, &[6], f32s(wave(6, 2))),
            raw_tensor(
                "g",
                1,
                &[6],
                f32s(wave(6, 5).iter().map(|v| v + 1.0).collect()),
            ),
            raw_tensor("beta", 1, &[6], f32s(wave(6, 6))),
            raw_tensor("mean", 1, &[6], f32s(wave(6, 7))),
            raw_tensor("var", 1, &[6], f32s(bn_var)),
            raw_tensor("wb", 1, &[5, 6, 1, 1], f32s(wave(30, 4))),
            raw_tensor("sb", 1, &[1], f32s(vec![1.7])),
            raw_tensor("tb", 1, &[1, 5, 1, 1], f32s(wave(5, 3))),
            raw_tensor("ub", 1, &[5, 1, 1], f32s(wave(5, 8))),
            raw_tensor("wc", 1, &[3, 5, 1, 1], f32s(wave(15, 9))),
        ],
        input: vec![quench::onnx::tensor::tensor_value_info(
            "x",
            1,
            &[1, 4, 8, 8],
        )],
        output: vec![value_info("y", 1)],
        ..Default::default()
    };
    let dir = tempdir();
    let model = dir.path().join("affine.onnx");
    let mut proto = model_of(graph);
    std::fs::write(&model, prost::Message::encode_to_vec(&proto)).unwrap();
    // Below opset 13 a QDQ weight has one scale: integer Convs become QLinearConv (per channel).
    let model12 = dir.path().join("affine12.onnx");
    proto.opset_import[0].version = Some(12);
    std::fs::write(&model12, prost::Message::encode_to_vec(&proto)).unwrap();
    let recipe = |name: &str, extra: &str, weights: &str| {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "description: {name}\n\
                 defaults: {{ bits: 8, granularity: channel, symmetric: true }}\n\
                 {weights}\
                 activations:\n  mode: static\n  ops: [Conv]\n  outputs: [Conv]\n  \
                 fallback: {{ sqnr_db: 0, cosine: 0, top1: 0 }}\n{extra}"
            ),
        )
        .unwrap();
        path
    };
    let run =
        |model: &std::path::Path, recipe: &std::path::Path, name: &str| -> (Value, ModelProto) {
            let out = dir.path().join(format!("{name}.onnx"));
            let json = dir.path().join(format!("{name}.json"));
            let o = quench(&[
                "quantize",
                &model.display().to_string(),
                "-o",
                &out.display().to_string(),
                "--recipe",
                &recipe.display().to_string(),
                "--target",
                "ort",
                "--calib-random",
                "8",
                "--random",
                "4",
                "--report",
                &json.display().to_string(),
            ]);
            assert!(o.status.success(), "{name}: {}", stderr_of(&o));
            let bytes = std::fs::read(&out).unwrap();
            (
                report(&json),
                prost::Message::decode(bytes.as_slice()).unwrap(),
            )
        };
    let ops = |m: &ModelProto| -> Vec<String> {
        m.graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type().to_string())
            .collect()
    };
    let sqnr = |r: &Value, rt: &str| {
        r["retention"]["runtimes"][rt]["outputs"]["y"]["sqnr_db"]
            .as_f64()
            .unwrap()
    };

    // Folded, nothing integer (every Conv excluded, every weight kept float): the same function.
    let float = recipe(
        "fold-only",
        "  exclude: [ { op: [Conv] } ]\n",
        "rules:\n  - match: { max_elements: 1000000 }\n    skip: true\n",
    );
    let (r, m) = run(&model, &float, "fold-only");
    let kinds = ops(&m);
    for gone in ["Mul", "Add", "Sub", "BatchNormalization"] {
        assert!(!kinds.iter().any(|k| k == gone), "{gone} left: {kinds:?}");
    }
    let notes = r["activations"]["notes"].to_string();
    assert!(
        notes.contains("folded 4 per-channel ops into 2 Conv"),
        "{notes}"
    );
    for rt in ["tract", "ort"] {
        assert!(sqnr(&r, rt) > 100.0, "folding in {rt}: {} dB", sqnr(&r, rt));
    }

    // W8A8: every Conv integer, each writing a quantized output onnxruntime can fuse.
    let w8a8 = recipe("w8a8-toy", "", "");
    let (r, m) = run(&model, &w8a8, "w8a8-toy");
    assert_eq!(r["activations"]["quantized"], 3, "{}", r["activations"]);
    let g = m.graph.as_ref().unwrap();
    let readers = |v: &str| -> Vec<&NodeProto> {
        g.node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == v))
            .collect()
    };
    let producer = |v: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == v));
    for conv in g.node.iter().filter(|n| n.op_type() == "Conv") {
        assert_eq!(
            producer(&conv.input[0]).map(|n| n.op_type()),
            Some("DequantizeLinear")
        );
        assert_eq!(
            producer(&conv.input[1]).map(|n| n.op_type()),
            Some("DequantizeLinear")
        );
        let after = readers(&conv.output[0]);
        let quantized = match after.as_slice() {
            [q] if q.op_type() == "QuantizeLinear" => true,
            [relu] if relu.op_type() == "Relu" => readers(&relu.output[0])
                .iter()
                .all(|q| q.op_type() == "QuantizeLinear"),
            _ => false,
        };
        assert!(
            quantized,
            "{}: output read by {:?}",
            conv.name(),
            after.iter().map(|n| n.op_type()).collect::<Vec<_>>()
        );
    }
    for rt in ["tract", "ort"] {
        eprintln!("affine toy w8a8 in {rt}: {:.1} dB", sqnr(&r, rt));
        assert!(sqnr(&r, rt) > 25.0, "w8a8 in {rt}: {} dB", sqnr(&r, rt));
    }

    // Opset 12: QLinearConv with a weight scale per output channel; the Relu goes into conv_b's.
    let (r, m) = run(&model12, &w8a8, "w8a8-toy-12");
    assert_eq!(r["activations"]["quantized"], 3, "{}", r["activations"]);
    let g = m.graph.as_ref().unwrap();
    let kinds: Vec<&str> = g.node.iter().map(|n| n.op_type()).collect();
    assert!(
        !kinds.contains(&"Conv") && !kinds.contains(&"Relu"),
        "{kinds:?}"
    );
    let qconvs: Vec<&NodeProto> = g
        .node
        .iter()
        .filter(|n| n.op_type() == "QLinearConv")
        .collect();
    assert_eq!(qconvs.len(), 3, "{kinds:?}");
    assert_eq!(qconvs[2].input.len(), 8, "conv_c has no bias");
    for (q, channels) in qconvs.iter().zip([6, 5, 3]) {
        let w_scale = g.initializer.iter().find(|t| t.name == q.input[4]).unwrap();
        assert_eq!(w_scale.dims, vec![channels], "{}", q.name());
    }
    for rt in ["tract", "ort"] {
        eprintln!(
            "affine toy w8a8 at opset 12 in {rt}: {:.1} dB",
            sqnr(&r, rt)
        );
        assert!(
            sqnr(&r, rt) > 25.0,
            "opset 12 w8a8 in {rt}: {} dB",
            sqnr(&r, rt)
        );
    }
}

/// Whether onnxruntime's x86 u8·s8 kernels on this CPU use VNNI (no 16-bit saturation): AVX-512 VNNI
/// or AVX-VNNI, as quench's own integer kernels detect them (whatever `QUENCH_KERNELS` caps).
fn ort_has_vnni() -> bool {
    use quench::kernels::integer::IntIsa;
    IntIsa::available()
        .iter()
        .any(|i| matches!(i, IntIsa::Avx512Vnni | IntIsa::AvxVnni))
}
