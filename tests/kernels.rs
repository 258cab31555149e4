//! quench's tract kernels for compressed weights, end to end: zoo models (a transformer, a byte
//! classifier, an OCR model with a bidirectional LSTM and a Gemm head) quantized with the w8, w4, vq2
//! and dynamic recipes for the tract target run with the kernels (weights kept compressed) and with
//! tract's own operators on the same graph; the outputs agree to float rounding (exactly, for the
//! integer products of the dynamic form), and the weight products were really taken over by the
//! kernels.

mod common;

use common::*;
use quench::Model;
use quench::exec::inputs::{self, InputOptions, Source};
use quench::exec::{self, Prepared, RuntimeKind, SessionOptions};

/// Values from a xorshift generator seeded with `seed`: each call gives one in `lo..=hi`.
fn ints_from(mut seed: u32) -> impl FnMut(i32, i32) -> i32 {
    move |lo, hi| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        lo + (seed % (hi - lo + 1) as u32) as i32
    }
}

/// A node of one output, named after it.
fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<quench::onnx::pb::AttributeProto>,
) -> quench::onnx::pb::NodeProto {
    quench::onnx::pb::NodeProto {
        op_type: Some(op.into()),
        name: Some(output.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

/// An INTS attribute.
fn ints(name: &str, v: &[i64]) -> quench::onnx::pb::AttributeProto {
    quench::onnx::pb::AttributeProto {
        name: name.into(),
        r#type: Some(7),
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// An INT attribute.
fn int_attr(name: &str, v: i64) -> quench::onnx::pb::AttributeProto {
    quench::onnx::pb::AttributeProto {
        name: name.into(),
        r#type: Some(2),
        i: Some(v),
        ..Default::default()
    }
}

/// What a tract session says about the kernels it took.
fn kernels_of(session: &dyn exec::Session) -> String {
    session
        .settings()
        .into_iter()
        .find(|(k, _)| k == "weight kernels")
        .map(|(_, v)| v)
        .unwrap()
}

/// The largest |x − y| and the largest |y| (at least 1e-6): the difference and the scale it is read
/// against.
fn max_difference(x: &quench::exec::Tensor, y: &quench::exec::Tensor) -> (f32, f32) {
    let (x, y) = (x.to_f32(), y.to_f32());
    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let worst = x
        .iter()
        .zip(y.iter())
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    (worst, scale)
}

/// The first output of `prep` on `feed`, run by tract's own operators (no quench kernels).
fn first_output_plain(
    prep: &Prepared,
    feed: &[(String, quench::exec::Tensor)],
) -> quench::exec::Tensor {
    let plain = SessionOptions {
        tract_kernels: false,
        ..Default::default()
    };
    let mut s = exec::open(prep, RuntimeKind::Tract, &plain).unwrap();
    s.run(feed).unwrap().remove(0).1
}

/// `model` quantized by the CLI with `recipe` for `target` into `out`, prepared for sessions.
fn quantized(
    model: &str,
    recipe: &str,
    target: &str,
    out: &std::path::Path,
    extra: &[&str],
) -> Prepared {
    let mut args = vec![
        "quantize",
        model,
        "--recipe",
        recipe,
        "--target",
        target,
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = quench(&args);
    assert!(o.status.success(), "{model} {recipe}: {}", stderr_of(&o));
    let model = Model::load(out).unwrap();
    Prepared::from_model(&model, recipe)
}

#[test]
fn kernels_reproduce_tracts_own_operators_on_quantized_zoo_models() {
    // ddddocr: its 8210-way head is a Gemm (transB) over 34 MB of weights.
    for zoo_name in ["rxnmap", "magika", "ddddocr"] {
        let Some(_) = zoo_model(zoo_name) else {
            return;
        };
        let dir = tempdir();
        for recipe in ["w8", "w4", "vq2", "dynamic"] {
            let out = dir.path().join(format!("{zoo_name}.{recipe}.onnx"));
            let prep = quantized(&format!("zoo:{zoo_name}"), recipe, "tract", &out, &[]);
            let opts = InputOptions {
                spec: zoo_spec(zoo_name),
                seed: 5,
                ..Default::default()
            };
            let plain_opts = SessionOptions {
                tract_kernels: false,
                ..Default::default()
            };
            let mut fast =
                exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default()).unwrap();
            let mut plain = exec::open(&prep, RuntimeKind::Tract, &plain_opts).unwrap();
            let kernels = kernels_of(&*fast);
            // Every weight MatMul of these models is one of the forms the kernels take.
            // The dynamic form's Cast → Mul → Add after each integer product runs inside it.
            let taken = if recipe == "dynamic" {
                !kernels.contains("(0 MatMulInteger")
                    && !kernels.contains(", 0 DynamicQuantize")
                    && !kernels.contains(", 0 with the float epilogue")
            } else {
                !kernels.contains("(0 int8, 0 MatMulNBits, 0 codebook")
                    || !kernels.contains(", 0 int8 MatMul in limbs")
                    || !kernels.contains(", 0 4-bit MatMulNBits in limbs")
            };
            assert!(
                kernels.starts_with("quench") && taken,
                "{zoo_name} {recipe}: {kernels}"
            );
            if zoo_name == "ddddocr" && recipe != "dynamic" {
                assert!(
                    kernels.contains("1 Gemm as MatMul"),
                    "{zoo_name} {recipe}: {kernels}"
                );
            }
            // ddddocr's bidirectional LSTM, over 8-bit W and R in every recipe.
            if zoo_name == "ddddocr" {
                assert!(
                    kernels.contains("; 1 LSTM over int8 weights"),
                    "{zoo_name} {recipe}: {kernels}"
                );
            }
            // ddddocr's 21 convolutions run as quench's f32 products over im2col rows: over int8
            // weights (w8, and w4, which keeps them 8-bit), or over codebook weights decoded once
            // at load (vq2).
            if zoo_name == "ddddocr" && recipe != "dynamic" {
                assert!(
                    kernels.contains("21 weight-only Conv"),
                    "{zoo_name} {recipe}: {kernels}"
                );
            }
            // ddddocr's codebook convolution weights are decoded before tract reads the graph;
            // int8 ones are not.
            if zoo_name == "ddddocr" {
                let decoded = !kernels.ends_with("; 0 convolution weights decoded once at load");
                assert_eq!(decoded, recipe == "vq2", "{zoo_name} {recipe}: {kernels}");
            }
            // magika's convolution, as ConvInteger.
            if zoo_name == "magika" && recipe == "dynamic" {
                assert!(
                    !kernels.contains(", 0 Conv"),
                    "{zoo_name} {recipe}: {kernels}"
                );
            }
            // tract's own MatMulNBits rounds the scales to f16; onnxruntime's (accuracy level 0)
            // computes in f32 from the file's scales, the exact reference for 4-bit weights.
            let mut exact = (recipe == "w4" && ort_ready())
                .then(|| exec::open(&prep, RuntimeKind::Ort, &SessionOptions::default()).unwrap());
            let set = inputs::open(&Source::Random { count: 2 }, &prep.inputs, &opts).unwrap();
            for batch in set {
                let batch = batch.unwrap();
                let a = fast.run(&batch).unwrap();
                if let Some(ort) = exact.as_mut() {
                    let e = ort.run(&batch).unwrap();
                    for ((name, x), (_, y)) in a.iter().zip(&e) {
                        let (worst, scale) = max_difference(x, y);
                        assert!(
                            worst <= 1e-4 * scale,
                            "{zoo_name} w4 {name} vs onnxruntime: max difference {worst} (output scale {scale})"
                        );
                        eprintln!(
                            "{zoo_name} w4 {name} vs onnxruntime: {:.2e} of the output scale",
                            worst / scale
                        );
                    }
                }
                let b = plain.run(&batch).unwrap();
                for ((name, x), (_, y)) in a.iter().zip(&b) {
                    let (worst, scale) = max_difference(x, y);
                    // tract's MatMulNBits rounds scales to f16 (see docs/tract-kernels.md); the
                    // kernels use the f32 scales the file holds, so w4 differs by that rounding.
                    // The integer products are exact and the quantizer is tract's arithmetic; int8
                    // weights on VNNI go through three-limb activations, f32's rounding. ddddocr's
                    // LSTM keeps int8 weights under `dynamic` too, and quench's LSTM sums its f32
                    // products in another order than tract's (in limbs on VNNI); the head then
                    // quantizes the LSTM's output at run time, where a value that rounding moves
                    // across a code boundary changes its u8 code by one: a few 1e-4 of the output.
                    let tol = match recipe {
                        "w4" => 2e-2,
                        "dynamic" if zoo_name == "ddddocr" => 1e-3,
                        "dynamic" => 0.0,
                        _ => 1e-4,
                    };
                    assert!(
                        worst <= tol * scale,
                        "{zoo_name} {recipe} {name}: max difference {worst} (output scale {scale})"
                    );
                }
            }
        }
    }
}

/// The static QDQ form, `MatMul(DequantizeLinear(QuantizeLinear(x)), DequantizeLinear(w_q))`, on one
/// layer: the kernels' integer product times `s_x · s_w` equals tract's float product of the
/// dequantized operands up to float rounding, for signed and unsigned weights with zero points.
#[test]
fn qdq_matmul_is_taken_as_an_integer_product() {
    use ndarray::{ArrayD, IxDyn};
    use quench::exec::Tensor;
    use quench::onnx::pb::{AttributeProto, GraphProto, NodeProto};

    let (m, k, n) = (37usize, 75usize, 43usize);
    let node = |op: &str, i: &[&str], o: &str, axis: Option<i64>| NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("/{o}")),
        input: i.iter().map(|s| s.to_string()).collect(),
        output: vec![o.into()],
        attribute: axis
            .map(|a| AttributeProto {
                name: "axis".into(),
                r#type: Some(2),
                i: Some(a),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let tensor = raw_tensor;
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut seed = 1u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    for (dt, zero) in [(3, 0u8), (2, 131u8)] {
        let q: Vec<u8> = (0..k * n).map(|_| next() as u8).collect();
        let sw: Vec<f32> = (0..n).map(|j| 0.002 + j as f32 * 1e-4).collect();
        let graph = GraphProto {
            name: Some("qdq".into()),
            node: vec![
                node("QuantizeLinear", &["x", "sx", "zx"], "xq", None),
                node("DequantizeLinear", &["xq", "sx", "zx"], "xd", None),
                node("DequantizeLinear", &["wq", "sw", "zw"], "wd", Some(1)),
                node("MatMul", &["xd", "wd"], "y", None),
            ],
            initializer: vec![
                tensor("sx", 1, &[], f32s(&[0.0123])),
                tensor("zx", 2, &[], vec![117]),
                tensor("wq", dt, &[k as i64, n as i64], q),
                tensor("sw", 1, &[n as i64], f32s(&sw)),
                tensor("zw", dt, &[n as i64], vec![zero; n]),
            ],
            input: vec![value_info("x", 1)],
            output: vec![value_info("y", 1)],
            ..Default::default()
        };
        let proto = model_of(graph);
        let model = Model::load_bytes(prost::Message::encode_to_vec(&proto), None).unwrap();
        let prep = Prepared::from_model(&model, "qdq");
        let x = ArrayD::from_shape_fn(IxDyn(&[m, k]), |_| (next() % 2001) as f32 / 1000.0 - 1.3);
        let feed = vec![("x".to_string(), Tensor::F32(x))];
        let mut fast = exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default()).unwrap();
        let kernels = kernels_of(&*fast);
        assert!(kernels.contains(", 1 QDQ MatMul"), "{kernels}");
        let got = fast.run(&feed).unwrap().remove(0).1;
        let want = first_output_plain(&prep, &feed);
        let (got, want) = (got.to_f32(), want.to_f32());
        assert_eq!(got.shape(), &[m, n]);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * scale,
                "weights of type {dt}, at {i}: {g} vs {w}"
            );
        }
    }
}

/// Gemm over a compressed weight (a PyTorch `Linear` on 2-D input, a classifier head): with `transB`,
/// α and β·C, and without, over int8 and codebook weights. The tract session rewrites each Gemm as a
/// MatMul the kernels take, and its output equals tract's own operators on the same graph.
#[test]
fn gemm_over_compressed_weights_is_taken() {
    use ndarray::{ArrayD, IxDyn};
    use quench::exec::Tensor;
    use quench::onnx::pb::{AttributeProto, GraphProto, NodeProto};

    let (m, k, n, n2) = (5usize, 128usize, 300usize, 120usize);
    let attr_f = |name: &str, v: f32| AttributeProto {
        name: name.into(),
        r#type: Some(1),
        f: Some(v),
        ..Default::default()
    };
    let attr_i = |name: &str, v: i64| AttributeProto {
        name: name.into(),
        r#type: Some(2),
        i: Some(v),
        ..Default::default()
    };
    let mut seed = 3u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as u32 % 2001) as f32 / 1000.0 - 1.0
    };
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let w1: Vec<f32> = (0..n * k).map(|_| next() * 0.1).collect();
    let c1: Vec<f32> = (0..n).map(|_| next()).collect();
    let w2: Vec<f32> = (0..n * n2).map(|_| next() * 0.1).collect();
    // x: float[5, 128].
    let mut x_info = value_info("x", 1);
    if let Some(quench::onnx::pb::type_proto::Value::TensorType(t)) =
        x_info.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        use quench::onnx::pb::tensor_shape_proto::{Dimension, dimension::Value};
        t.shape = Some(quench::onnx::pb::TensorShapeProto {
            dim: [m, k]
                .iter()
                .map(|&d| Dimension {
                    value: Some(Value::DimValue(d as i64)),
                    ..Default::default()
                })
                .collect(),
        });
    }
    let graph = GraphProto {
        name: Some("gemms".into()),
        node: vec![
            NodeProto {
                op_type: Some("Gemm".into()),
                name: Some("/head".into()),
                input: vec!["x".into(), "w1".into(), "c1".into()],
                output: vec!["h".into()],
                attribute: vec![
                    attr_i("transB", 1),
                    attr_f("alpha", 0.5),
                    attr_f("beta", 2.0),
                ],
                ..Default::default()
            },
            NodeProto {
                op_type: Some("Gemm".into()),
                name: Some("/tail".into()),
                input: vec!["h".into(), "w2".into()],
                output: vec!["y".into()],
                ..Default::default()
            },
        ],
        initializer: vec![
            raw_tensor("w1", 1, &[n as i64, k as i64], f32s(&w1)),
            raw_tensor("c1", 1, &[n as i64], f32s(&c1)),
            raw_tensor("w2", 1, &[n as i64, n2 as i64], f32s(&w2)),
        ],
        input: vec![x_info],
        output: vec![value_info("y", 1)],
        ..Default::default()
    };
    let dir = tempdir();
    let src = dir.path().join("gemms.onnx");
    std::fs::write(&src, prost::Message::encode_to_vec(&model_of(graph))).unwrap();
    let x = ArrayD::from_shape_fn(IxDyn(&[m, k]), |_| next());
    let feed = vec![("x".to_string(), Tensor::F32(x))];
    // int8 weights: decoded panels, or (on VNNI) integer products over activations in limbs.
    let int8 = |k: &str| k.contains("(2 int8") || k.contains("2 int8 MatMul in limbs");
    let codebook = |k: &str| k.contains("2 codebook products");
    // The tract target writes int8 as Cast·Mul, the portable one as DequantizeLinear.
    for (recipe, target, taken) in [
        ("w8", "tract", &int8 as &dyn Fn(&str) -> bool),
        ("w8", "portable", &int8),
        ("vq2", "tract", &codebook),
    ] {
        let out = dir.path().join(format!("gemms.{recipe}.{target}.onnx"));
        let extra = ["--random", "1", "--runtime", "tract"];
        let prep = quantized(src.to_str().unwrap(), recipe, target, &out, &extra);
        let mut fast = exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default()).unwrap();
        let kernels = kernels_of(&*fast);
        assert!(
            taken(&kernels) && kernels.contains("2 Gemm as MatMul"),
            "{recipe} {target}: {kernels}"
        );
        let got = fast.run(&feed).unwrap().remove(0).1;
        let want = first_output_plain(&prep, &feed);
        assert_eq!(got.to_f32().shape(), &[m, n2]);
        let (worst, scale) = max_difference(&got, &want);
        assert!(
            worst <= 1e-5 * scale,
            "{recipe} {target}: max difference {worst} (output scale {scale})"
        );
    }
}

/// A QLinearConv (what quench writes for an integer Conv below opset 13) runs in tract as
/// DequantizeLinear → Conv → QuantizeLinear: one group and depthwise, with per-channel weight scales
/// and an int32 bias. The codes equal onnxruntime's (which follows the spec in integers) but for a
/// float rounding at a half step, and so do tract's own QLinearConv's.
#[test]
fn qlinear_conv_runs_as_dequantize_conv_quantize() {
    use quench::onnx::pb::GraphProto;
    let mut next = ints_from(0x2545_f491);
    let (c, hw) = (8usize, 10usize);
    let i8s = |v: Vec<i32>| v.iter().map(|&q| q as i8 as u8).collect::<Vec<u8>>();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    // 7-bit weights: onnxruntime's u8 × s8 lanes on CPUs without VNNI then cannot saturate.
    let w1: Vec<i32> = (0..c * c * 9).map(|_| next(-63, 63)).collect();
    let w2: Vec<i32> = (0..c * 9).map(|_| next(-63, 63)).collect();
    let b1: Vec<u8> = (0..c)
        .flat_map(|_| next(-20000, 20000).to_le_bytes())
        .collect();
    let ws1: Vec<f32> = (0..c).map(|i| 0.0015 + 0.0002 * i as f32).collect();
    let ws2: Vec<f32> = (0..c).map(|i| 0.002 + 0.0002 * i as f32).collect();
    let group = int_attr("group", c as i64);
    let graph = GraphProto {
        name: Some("qlinear".into()),
        node: vec![
            node("QuantizeLinear", &["x", "sx", "zx"], "xq", vec![]),
            node(
                "QLinearConv",
                &["xq", "sx", "zx", "w1", "ws1", "wz1", "sy1", "zy1", "b1"],
                "y1q",
                vec![ints("pads", &[1, 1, 1, 1])],
            ),
            node(
                "QLinearConv",
                &["y1q", "sy1", "zy1", "w2", "ws2", "wz2", "sy2", "zy2"],
                "y2q",
                vec![ints("pads", &[1, 1, 1, 1]), group],
            ),
            node("DequantizeLinear", &["y1q", "sy1", "zy1"], "y1", vec![]),
            node("DequantizeLinear", &["y2q", "sy2", "zy2"], "y2", vec![]),
        ],
        initializer: vec![
            raw_tensor("sx", 1, &[], f32s(&[1.0 / 127.0])),
            raw_tensor("zx", 2, &[], vec![128]),
            raw_tensor("w1", 3, &[c as i64, c as i64, 3, 3], i8s(w1)),
            raw_tensor("ws1", 1, &[c as i64], f32s(&ws1)),
            raw_tensor("wz1", 3, &[c as i64], vec![0; c]),
            raw_tensor("sy1", 1, &[], f32s(&[0.02])),
            raw_tensor("zy1", 2, &[], vec![100]),
            raw_tensor("b1", 6, &[c as i64], b1),
            raw_tensor("w2", 3, &[c as i64, 1, 3, 3], i8s(w2)),
            raw_tensor("ws2", 1, &[c as i64], f32s(&ws2)),
            raw_tensor("wz2", 3, &[c as i64], vec![0; c]),
            raw_tensor("sy2", 1, &[], f32s(&[0.01])),
            raw_tensor("zy2", 2, &[], vec![128]),
        ],
        input: vec![quench::onnx::tensor::tensor_value_info(
            "x",
            1,
            &[1, c as i64, hw as i64, hw as i64],
        )],
        output: vec![value_info("y1", 1), value_info("y2", 1)],
        ..Default::default()
    };
    let mut proto = model_of(graph);
    proto.opset_import[0].version = Some(12);
    let dir = tempdir();
    let path = dir.path().join("qlinear.onnx");
    std::fs::write(&path, prost::Message::encode_to_vec(&proto)).unwrap();
    let prep = Prepared::from_model(&Model::load(&path).unwrap(), "qlinear");
    let x: Vec<f32> = (0..c * hw * hw)
        .map(|_| next(-1000, 1000) as f32 / 1000.0)
        .collect();
    let feed = vec![(
        "x".to_string(),
        quench::exec::Tensor::from(ndarray::ArrayD::from_shape_vec(vec![1, c, hw, hw], x).unwrap()),
    )];
    let mut fast = exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default()).unwrap();
    let kernels = kernels_of(fast.as_ref());
    assert!(
        kernels.contains("2 QLinearConv as DequantizeLinear"),
        "{kernels}"
    );
    let mine = fast.run(&feed).unwrap();
    // The outputs use their codes' range (not clamped to one end), so the comparison means something.
    for ((name, t), step) in mine.iter().zip([0.02f32, 0.01]) {
        let v = t.to_f32();
        let (lo, hi) = v
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        eprintln!("{name}: {lo} ..= {hi}");
        assert!((hi - lo) / step >= 60.0, "{name}: {lo} ..= {hi}");
    }
    let plain = SessionOptions {
        tract_kernels: false,
        ..Default::default()
    };
    let own = exec::open(&prep, RuntimeKind::Tract, &plain)
        .unwrap()
        .run(&feed)
        .unwrap();
    // Codes that differ, and by how many steps at most, per output.
    let steps = |a: &[(String, quench::exec::Tensor)], b: &[(String, quench::exec::Tensor)]| {
        a.iter()
            .zip(b)
            .zip([0.02f32, 0.01])
            .map(|(((_, x), (_, y)), step)| {
                let (x, y) = (x.to_f32(), y.to_f32());
                let d: Vec<f32> = x
                    .iter()
                    .zip(y.iter())
                    .map(|(p, q)| ((p - q) / step).abs().round())
                    .collect();
                let differ = d.iter().filter(|&&v| v > 0.0).count() as f64 / d.len() as f64;
                (differ, d.iter().fold(0f32, |m, &v| m.max(v)))
            })
            .collect::<Vec<_>>()
    };
    let check = |what: &str, s: Vec<(f64, f32)>| {
        eprintln!("{what}: (share of codes that differ, most steps) per output {s:?}");
        // The first layer's codes differ by a rounding at most; the depthwise layer reads those.
        assert!(s[0].0 <= 0.01 && s[0].1 <= 1.0, "{what}: {s:?}");
        assert!(s[1].0 <= 0.02 && s[1].1 <= 2.0, "{what}: {s:?}");
    };
    check("kernels vs tract's QLinearConv", steps(&mine, &own));
    if ort_ready() {
        let exact = exec::open(&prep, RuntimeKind::Ort, &SessionOptions::default())
            .unwrap()
            .run(&feed)
            .unwrap();
        check("kernels vs onnxruntime", steps(&mine, &exact));
    }
}

/// Weight-only convolutions over 8-bit codes (f32 activations) run as quench's f32 products over
/// im2col rows, the weight decoded a panel at a time: both decode forms quench writes
/// (DequantizeLinear per channel or per tensor, with or without a zero point; Cast → Sub → Mul),
/// strides, dilations, explicit and automatic padding, a pointwise and a one-dimensional
/// convolution, a batch of 3. The outputs equal tract's own convolution over the same graph to
/// float rounding; a ConvInteger of the dynamic form over the same batch, exactly.
#[test]
fn weight_only_conv_runs_over_int8_codes() {
    use quench::onnx::pb::{AttributeProto, GraphProto};
    let mut next = ints_from(0x1234_5677);
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let auto_pad = |v: &str| AttributeProto {
        name: "auto_pad".into(),
        r#type: Some(3),
        s: Some(v.as_bytes().to_vec().into()),
        ..Default::default()
    };
    let cast_to_float = int_attr("to", 1);
    let mut inits = Vec::new();
    let mut nodes = Vec::new();
    // Codes of `dims` (signed or not) and scales: per output channel, or one.
    let mut codes = |inits: &mut Vec<quench::onnx::pb::TensorProto>,
                     name: &str,
                     dims: &[i64],
                     signed: bool,
                     per_channel: bool| {
        let len: i64 = dims.iter().product();
        let raw: Vec<u8> = (0..len)
            .map(|_| {
                if signed {
                    next(-127, 127) as i8 as u8
                } else {
                    next(0, 255) as u8
                }
            })
            .collect();
        let dt = if signed { 3 } else { 2 };
        inits.push(raw_tensor(&format!("{name}_q"), dt, dims, raw));
        let m = if per_channel { dims[0] } else { 1 };
        let scales: Vec<f32> = (0..m).map(|i| 0.004 + 0.001 * (i % 5) as f32).collect();
        let scale_dims: Vec<i64> = if per_channel { vec![m] } else { vec![] };
        inits.push(raw_tensor(
            &format!("{name}_s"),
            1,
            &scale_dims,
            f32s(&scales),
        ));
        (m, dt)
    };
    // 1: 3×3, pads 1, int8 per channel, bias.
    codes(&mut inits, "w1", &[7, 5, 3, 3], true, true);
    inits.push(raw_tensor(
        "b1",
        1,
        &[7],
        f32s(&(0..7).map(|i| 0.1 * i as f32 - 0.3).collect::<Vec<_>>()),
    ));
    nodes.push(node("DequantizeLinear", &["w1_q", "w1_s"], "w1", vec![]));
    nodes
        .last_mut()
        .unwrap()
        .attribute
        .push(int_attr("axis", 0));
    nodes.push(node(
        "Conv",
        &["x", "w1", "b1"],
        "y1",
        vec![ints("pads", &[1, 1, 1, 1]), ints("kernel_shape", &[3, 3])],
    ));
    // 2: 3×2, strides 2×1, dilations 1×2, asymmetric pads; u8 codes through Cast → Sub → Mul with
    // per-channel float zero points.
    codes(&mut inits, "w2", &[6, 7, 3, 2], false, true);
    let zero2: Vec<f32> = (0..6).map(|i| 120.0 + i as f32).collect();
    inits.push(raw_tensor("w2_z", 1, &[6, 1, 1, 1], f32s(&zero2)));
    let s2 = inits.iter().position(|t| t.name == "w2_s").unwrap();
    inits[s2].dims = vec![6, 1, 1, 1];
    nodes.push(node("Cast", &["w2_q"], "w2_f", vec![cast_to_float.clone()]));
    nodes.push(node("Sub", &["w2_f", "w2_z"], "w2_c", vec![]));
    nodes.push(node("Mul", &["w2_c", "w2_s"], "w2", vec![]));
    nodes.push(node(
        "Conv",
        &["y1", "w2"],
        "y2",
        vec![
            ints("strides", &[2, 1]),
            ints("dilations", &[1, 2]),
            ints("pads", &[0, 1, 2, 0]),
        ],
    ));
    // 3: pointwise, u8 codes with a zero point per channel.
    codes(&mut inits, "w3", &[4, 6, 1, 1], false, true);
    inits.push(raw_tensor("w3_z", 2, &[4], vec![127, 128, 130, 125]));
    nodes.push(node(
        "DequantizeLinear",
        &["w3_q", "w3_s", "w3_z"],
        "w3",
        vec![],
    ));
    nodes
        .last_mut()
        .unwrap()
        .attribute
        .push(int_attr("axis", 0));
    nodes.push(node("Conv", &["y2", "w3"], "y3", vec![]));
    // 4: 2×2, stride 2, SAME_LOWER, one scale for the tensor.
    codes(&mut inits, "w4", &[3, 4, 2, 2], true, false);
    nodes.push(node("DequantizeLinear", &["w4_q", "w4_s"], "w4", vec![]));
    nodes.push(node(
        "Conv",
        &["y3", "w4"],
        "y4",
        vec![ints("strides", &[2, 2]), auto_pad("SAME_LOWER")],
    ));
    // 5: one spatial axis, dilation 2.
    codes(&mut inits, "w5", &[5, 4, 3], true, true);
    nodes.push(node("DequantizeLinear", &["w5_q", "w5_s"], "w5", vec![]));
    nodes
        .last_mut()
        .unwrap()
        .attribute
        .push(int_attr("axis", 0));
    nodes.push(node(
        "Conv",
        &["x1", "w5"],
        "y5",
        vec![ints("dilations", &[2]), ints("pads", &[2, 1])],
    ));
    // 6: the dynamic form's ConvInteger over the same input, an exact integer product image by
    // image.
    codes(&mut inits, "w6", &[4, 5, 3, 3], true, true);
    let mut dq = node("DynamicQuantizeLinear", &["x"], "xq", vec![]);
    dq.output = vec!["xq".into(), "xs".into(), "xz".into()];
    nodes.push(dq);
    nodes.push(node(
        "ConvInteger",
        &["xq", "w6_q", "xz"],
        "y6",
        vec![ints("pads", &[1, 1, 1, 1]), ints("strides", &[2, 2])],
    ));
    let (batch, c, h, w) = (3usize, 5usize, 9usize, 11usize);
    let graph = GraphProto {
        name: Some("convs".into()),
        node: nodes,
        initializer: inits,
        input: vec![
            quench::onnx::tensor::tensor_value_info(
                "x",
                1,
                &[batch as i64, c as i64, h as i64, w as i64],
            ),
            quench::onnx::tensor::tensor_value_info("x1", 1, &[batch as i64, 4, 13]),
        ],
        output: ["y1", "y2", "y3", "y4", "y5", "y6"]
            .iter()
            .map(|n| value_info(n, if *n == "y6" { 6 } else { 1 }))
            .collect(),
        ..Default::default()
    };
    let mut proto = model_of(graph);
    proto.opset_import[0].version = Some(13);
    let dir = tempdir();
    let path = dir.path().join("convs.onnx");
    std::fs::write(&path, prost::Message::encode_to_vec(&proto)).unwrap();
    let prep = Prepared::from_model(&Model::load(&path).unwrap(), "convs");
    let mut value = 0u32;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                value = value.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (value >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    };
    let tensor = |shape: Vec<usize>, v: Vec<f32>| {
        quench::exec::Tensor::from(ndarray::ArrayD::from_shape_vec(shape, v).unwrap())
    };
    let feed = vec![
        (
            "x".to_string(),
            tensor(vec![batch, c, h, w], values(batch * c * h * w)),
        ),
        (
            "x1".to_string(),
            tensor(vec![batch, 4, 13], values(batch * 4 * 13)),
        ),
    ];
    let mut fast = exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default()).unwrap();
    let kernels = kernels_of(fast.as_ref());
    assert!(
        kernels.contains("5 weight-only Conv") && kernels.contains(", 1 Conv,"),
        "{kernels}"
    );
    let mine = fast.run(&feed).unwrap();
    let plain = SessionOptions {
        tract_kernels: false,
        ..Default::default()
    };
    let theirs = exec::open(&prep, RuntimeKind::Tract, &plain)
        .unwrap()
        .run(&feed)
        .unwrap();
    for ((name, x), (_, y)) in mine.iter().zip(&theirs) {
        assert_eq!(x.shape(), y.shape(), "{name}");
        let (worst, scale) = max_difference(x, y);
        eprintln!(
            "{name}: {:?}, {:.1e} of the output scale {scale}",
            x.shape(),
            worst / scale
        );
        let tol = if name == "y6" { 0.0 } else { 1e-5 * scale };
        assert!(
            worst <= tol,
            "{name}: max difference {worst} (output scale {scale})"
        );
    }
}
