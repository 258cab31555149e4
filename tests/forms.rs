//! Every graph form the weight pass emits computes exactly what the encoder encoded: for each scheme
//! (2–8 bits, symmetric and asymmetric, per tensor/channel/block with short last blocks, NF4/FP4, double
//! quantized scales, dead zone, outliers), weight layout (MatMul B, 3-D MatMul B, Gather table) and opset
//! (9: Slice attributes, no ScatterND; 13; 17), the quantized model is run in tract and onnxruntime with
//! inputs that make the op return its weight, and the result is compared with
//! `quench::quant::scheme::encode(..).decode()` of the same matrix.

mod common;

use common::*;
use ndarray::{ArrayD, IxDyn};
use quench::Model;
use quench::exec::{self, Prepared, RuntimeKind, SessionOptions, Tensor};
use quench::onnx::pb::attribute_proto::AttributeType;
use quench::onnx::pb::{AttributeProto, GraphProto, NodeProto, OperatorSetIdProto, TensorProto};
use quench::passes::quantize_weights::{
    Decision, SiteInfo, Target, WeightPolicy, quantize_weights,
};
use quench::quant::int::Granularity;
use quench::quant::scheme::{DeadZone, Format, WeightScheme, encode};
use quench::quant::sparse::OutlierRule;

struct Fixed(WeightScheme);

impl WeightPolicy for Fixed {
    fn decide(&self, _: &SiteInfo) -> Decision {
        Decision::Quantize(self.0)
    }
}

fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (u - 0.5) * (0.2 + u * u)
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Layout {
    /// MatMul(I, W[K, N]) = W: channel axis 1.
    MatMul2,
    /// MatMul(I, W[2, K, N]) = W: channel axis 2 with an outer dim.
    MatMul3,
    /// Gather(W[V, D], 0..V) = W: channel axis 0.
    Gather,
    /// Identity(Gemm(I, W[N, K], 1)), transB: W transposed plus one: channel axis 0, out [K, N].
    GemmT,
    /// Identity(Gather(W[V, ..], PICKED)): rows picked by 2-D indices with repeats and a negative
    /// index. The Gather's output is not the graph's, so only the picked rows are decoded.
    Pick,
}

/// The indices of [`Layout::Pick`] into a table of `v` rows.
fn picked(v: usize) -> Vec<i64> {
    vec![3, -1, 0, 2, 2, v as i64 - 2]
}

/// What [`Layout::GemmT`] computes from the decoded `[n, k]` weight: its transpose, plus one.
fn transposed_plus_one(d: &[f32], dims: &[usize]) -> Vec<f32> {
    let (n, k) = (dims[0], dims[1]);
    (0..k * n).map(|i| d[(i % n) * k + i / n] + 1.0).collect()
}

/// The shape of the model's output.
fn out_shape(layout: Layout, dims: &[usize]) -> Vec<usize> {
    match layout {
        Layout::GemmT => vec![dims[1], dims[0]],
        Layout::Pick => [&[2, 3], &dims[1..]].concat(),
        _ => dims.to_vec(),
    }
}

/// The rows of a `[v, ..]` table that [`Layout::Pick`] reads, from the whole table's values.
fn pick_rows(all: &[f32], v: usize) -> Vec<f32> {
    let k = all.len() / v;
    picked(v)
        .iter()
        .flat_map(|&i| {
            let r = i.rem_euclid(v as i64) as usize;
            all[r * k..(r + 1) * k].to_vec()
        })
        .collect()
}

/// The model and its feed.
fn model(layout: Layout, dims: &[usize], w: &[f32], opset: i64) -> (Model, Vec<(String, Tensor)>) {
    let node = |op: &str, i: &[&str]| NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("/layer/{op}")),
        input: i.iter().map(|s| s.to_string()).collect(),
        output: vec!["y".into()],
        ..Default::default()
    };
    let weight = TensorProto {
        name: "w".into(),
        data_type: 1,
        dims: dims.iter().map(|&d| d as i64).collect(),
        raw_data: w
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        ..Default::default()
    };
    let (n, feed) = match layout {
        Layout::MatMul2 | Layout::MatMul3 => {
            let k = dims[dims.len() - 2];
            let eye = ArrayD::from_shape_fn(IxDyn(&[k, k]), |i| f32::from(i[0] == i[1]));
            (
                node("MatMul", &["x", "w"]),
                ("x".to_string(), Tensor::F32(eye)),
            )
        }
        Layout::GemmT => {
            let k = dims[1];
            let eye = ArrayD::from_shape_fn(IxDyn(&[k, k]), |i| f32::from(i[0] == i[1]));
            let mut gemm = node("Gemm", &["x", "w", "one"]);
            gemm.attribute.push(AttributeProto {
                name: "transB".into(),
                r#type: Some(AttributeType::Int as i32),
                i: Some(1),
                ..Default::default()
            });
            (gemm, ("x".to_string(), Tensor::F32(eye)))
        }
        Layout::Gather => {
            let idx = ArrayD::from_shape_fn(IxDyn(&[dims[0]]), |i| i[0] as i64);
            (
                node("Gather", &["w", "x"]),
                ("x".to_string(), Tensor::I64(idx)),
            )
        }
        Layout::Pick => {
            let idx = ArrayD::from_shape_vec(IxDyn(&[2, 3]), picked(dims[0])).unwrap();
            (
                node("Gather", &["w", "x"]),
                ("x".to_string(), Tensor::I64(idx)),
            )
        }
    };
    let elem = if matches!(layout, Layout::Gather | Layout::Pick) {
        7
    } else {
        1
    };
    let nodes = match layout {
        Layout::Pick | Layout::GemmT => {
            let mut gather = n;
            gather.output = vec!["rows".into()];
            let mut copy = node("Identity", &["rows"]);
            copy.name = Some("/layer/copy".into());
            vec![gather, copy]
        }
        _ => vec![n],
    };
    let mut initializer = vec![weight];
    if let Layout::GemmT = layout {
        initializer.push(TensorProto {
            name: "one".into(),
            data_type: 1,
            dims: vec![1],
            raw_data: 1f32.to_le_bytes().to_vec().into(),
            ..Default::default()
        });
    }
    let graph = GraphProto {
        name: Some("form".into()),
        node: nodes,
        initializer,
        input: vec![value_info("x", elem)],
        output: vec![value_info("y", 1)],
        ..Default::default()
    };
    let mut proto = model_of(graph);
    proto.opset_import = vec![OperatorSetIdProto {
        domain: Some(String::new()),
        version: Some(opset),
    }];
    let m = Model::load_bytes(prost::Message::encode_to_vec(&proto), None).unwrap();
    (m, vec![feed])
}

/// What the graph must compute: the encoder's decode of the weight with its channel axis first, put
/// back in the weight's layout.
fn expected(layout: Layout, dims: &[usize], w: &[f32], s: &WeightScheme) -> Vec<f32> {
    if let Layout::Pick = layout {
        let k = dims[1..].iter().product();
        return pick_rows(&expected(Layout::Gather, &[dims[0], k], w, s), dims[0]);
    }
    if let Layout::GemmT = layout {
        return transposed_plus_one(&expected(Layout::Gather, dims, w, s), dims);
    }
    if s.granularity == Granularity::PerTensor {
        return encode(w, 1, w.len(), s).unwrap().decode();
    }
    expected_with(layout, dims, w, |m, rows, k| {
        encode(m, rows, k, s).unwrap().decode()
    })
}

/// `decode` of the `[channels, k]` rows of the weight, put back in the weight's layout.
fn expected_with(
    layout: Layout,
    dims: &[usize],
    w: &[f32],
    decode: impl Fn(&[f32], usize, usize) -> Vec<f32>,
) -> Vec<f32> {
    let (outer, k, n) = match layout {
        Layout::Gather => return decode(w, dims[0], dims[1]),
        Layout::Pick => {
            let k = dims[1..].iter().product();
            return pick_rows(&decode(w, dims[0], k), dims[0]);
        }
        Layout::GemmT => return transposed_plus_one(&decode(w, dims[0], dims[1]), dims),
        Layout::MatMul2 => (1, dims[0], dims[1]),
        Layout::MatMul3 => (dims[0], dims[1], dims[2]),
    };
    // Moved: [n, outer, k] as rows of length outer·k.
    let mut moved = Vec::with_capacity(w.len());
    for j in 0..n {
        for o in 0..outer {
            for i in 0..k {
                moved.push(w[(o * k + i) * n + j]);
            }
        }
    }
    let d = decode(&moved, n, outer * k);
    let mut out = vec![0f32; w.len()];
    for j in 0..n {
        for o in 0..outer {
            for i in 0..k {
                out[(o * k + i) * n + j] = d[j * outer * k + o * k + i];
            }
        }
    }
    out
}

/// Checks the model, runs it in tract and onnxruntime, and compares its one output with `want` to
/// float rounding; returns the number of runs checked.
fn runs_as(
    m: &Model,
    feed: &[(String, Tensor)],
    shape: &[usize],
    want: &[f32],
    what: &str,
) -> usize {
    quench::ir::check_model(m).unwrap();
    let prep = Prepared::from_model(m, "form");
    let rts = [RuntimeKind::Tract, RuntimeKind::Ort];
    for rt in rts {
        let got = exec::open(&prep, rt, &SessionOptions::default())
            .unwrap_or_else(|e| panic!("{what} in {rt}: {e:#}"))
            .run(feed)
            .unwrap_or_else(|e| panic!("{what} in {rt}: {e:#}"))
            .remove(0)
            .1;
        let Tensor::F32(got) = got else { panic!() };
        assert_eq!(got.shape(), shape, "{what} in {rt}");
        for (i, (g, e)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - e).abs() <= 1e-6 * e.abs().max(1e-3),
                "{what} in {rt}: element {i}: {g} vs {e}"
            );
        }
    }
    rts.len()
}

fn schemes() -> Vec<WeightScheme> {
    let int = WeightScheme::int;
    let mut v = vec![
        int(8, true, Granularity::PerChannel, false),
        int(8, false, Granularity::PerTensor, false),
        int(4, true, Granularity::Block(16), true),
        int(4, false, Granularity::Block(32), false),
        int(3, true, Granularity::Block(16), false),
        int(2, false, Granularity::PerChannel, true),
        int(5, true, Granularity::Block(24), false),
        int(6, true, Granularity::PerTensor, false),
    ];
    let mut nf4 = int(4, true, Granularity::Block(64), false);
    nf4.format = Format::Nf4;
    nf4.double_quant = true;
    v.push(nf4);
    let mut fp4 = int(4, true, Granularity::Block(32), true);
    fp4.format = Format::Fp4;
    v.push(fp4);
    let mut side = int(4, true, Granularity::Block(32), false);
    side.outliers = Some(OutlierRule::TopFraction(0.01));
    side.dead_zone = Some(DeadZone::Width(1.0));
    v.push(side);
    let mut dq8 = int(8, true, Granularity::PerChannel, false);
    dq8.double_quant = true;
    v.push(dq8);
    v
}

/// A float16 embedding table: decoded in float (whole, or only the rows read), cast back to float16,
/// equal to the encoder's decode of the float16 values rounded to float16.
#[test]
fn float16_weights_are_decoded_and_cast_back() {
    if !ort_ready() {
        return;
    }
    let dims = [40usize, 48];
    let w: Vec<f32> = weights(40 * 48, 5)
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    let raw: Vec<u8> = w
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    for (s, layout) in schemes()
        .into_iter()
        .flat_map(|s| [(s, Layout::Gather), (s, Layout::Pick)])
    {
        let (mut m, feed) = model(layout, &dims, &w, 17);
        let mut proto = m.to_proto();
        let g = proto.graph.as_mut().unwrap();
        g.initializer[0].data_type = 10;
        g.initializer[0].raw_data = raw.clone().into();
        g.output[0] = value_info("y", 10);
        m = Model::load_bytes(prost::Message::encode_to_vec(&proto), None).unwrap();
        let report = quantize_weights(&mut m, &Fixed(s), Target::Ort).unwrap();
        let site = &report.sites[0];
        assert!(site.form.is_some(), "{}: {:?}", s.label(), site.note);
        assert!(site.bytes_after < site.bytes_before);
        let want = expected(layout, &dims, &w, &site.scheme.unwrap());
        let prep = Prepared::from_model(&m, "f16");
        for rt in [RuntimeKind::Tract, RuntimeKind::Ort] {
            let got = exec::open(&prep, rt, &SessionOptions::default())
                .and_then(|mut x| x.run(&feed))
                .unwrap_or_else(|e| panic!("{} in {rt}: {e:#}", s.label()))
                .remove(0)
                .1;
            let Tensor::F16(got) = got else {
                panic!("{}: not float16 in {rt}", s.label())
            };
            assert_eq!(got.shape(), out_shape(layout, &dims), "{layout:?}");
            for (g, e) in got.iter().zip(&want) {
                assert_eq!(*g, half::f16::from_f32(*e), "{} in {rt}", s.label());
            }
        }
    }
}

/// Weights stored inside subgraphs (Constant nodes in the branches of an If) are decoded inside their
/// branch; each branch computes the encoder's decode of its own weight, and the float originals go.
#[test]
fn constants_inside_subgraphs_are_quantized_in_place() {
    if !ort_ready() {
        return;
    }
    let (k, n) = (48usize, 40usize);
    let ws = [weights(k * n, 21), weights(k * n, 22)];
    let branch = |name: &str, w: &[f32]| GraphProto {
        name: Some(name.into()),
        node: vec![
            NodeProto {
                op_type: Some("Constant".into()),
                name: Some(format!("{name}/w")),
                output: vec![format!("{name}_w")],
                attribute: vec![AttributeProto {
                    name: "value".into(),
                    r#type: Some(AttributeType::Tensor as i32),
                    t: Some(TensorProto {
                        data_type: 1,
                        dims: vec![k as i64, n as i64],
                        raw_data: w
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>()
                            .into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            },
            NodeProto {
                op_type: Some("MatMul".into()),
                name: Some(format!("{name}/mlp/MatMul")),
                input: vec!["x".into(), format!("{name}_w")],
                output: vec![format!("{name}_y")],
                ..Default::default()
            },
        ],
        output: vec![value_info(&format!("{name}_y"), 1)],
        ..Default::default()
    };
    let graph_attr = |name: &str, g: GraphProto| AttributeProto {
        name: name.into(),
        r#type: Some(AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    };
    let graph = GraphProto {
        name: Some("branches".into()),
        node: vec![NodeProto {
            op_type: Some("If".into()),
            name: Some("choose".into()),
            input: vec!["cond".into()],
            output: vec!["y".into()],
            attribute: vec![
                graph_attr("then_branch", branch("then", &ws[0])),
                graph_attr("else_branch", branch("else", &ws[1])),
            ],
            ..Default::default()
        }],
        input: vec![value_info("x", 1), value_info("cond", 9)],
        output: vec![value_info("y", 1)],
        ..Default::default()
    };
    let mut m = Model::load_bytes(prost::Message::encode_to_vec(&model_of(graph)), None).unwrap();
    let mut s = WeightScheme::int(4, true, Granularity::Block(16), true);
    s.format = Format::Nf4;
    let report = quantize_weights(&mut m, &Fixed(s), Target::Ort).unwrap();
    assert_eq!(report.quantized, 2, "{:?}", report.sites);
    quench::passes::Pass::run(&quench::passes::DeadNodeElimination, &mut m).unwrap();
    quench::ir::check_model(&m).unwrap();
    let proto = m.to_proto();
    let floats: usize = proto.graph.as_ref().unwrap().node[0]
        .attribute
        .iter()
        .flat_map(|a| a.g.iter())
        .flat_map(|g| g.node.iter().chain(std::iter::empty()))
        .filter(|n| n.op_type.as_deref() == Some("Constant"))
        .count();
    assert_eq!(floats, 0, "the float Constant nodes are gone");
    let prep = Prepared::from_model(&m, "branches");
    let eye = ArrayD::from_shape_fn(IxDyn(&[k, k]), |i| f32::from(i[0] == i[1]));
    for (b, w) in ws.iter().enumerate() {
        let want = expected(Layout::MatMul2, &[k, n], w, &s);
        let feed = vec![
            ("x".to_string(), Tensor::F32(eye.clone())),
            (
                "cond".to_string(),
                Tensor::Bool(ArrayD::from_elem(IxDyn(&[]), b == 0)),
            ),
        ];
        for rt in [RuntimeKind::Tract, RuntimeKind::Ort] {
            let got = exec::open(&prep, rt, &SessionOptions::default())
                .and_then(|mut x| x.run(&feed))
                .unwrap_or_else(|e| panic!("branch {b} in {rt}: {e:#}"))
                .remove(0)
                .1;
            let Tensor::F32(got) = got else { panic!() };
            for (g, e) in got.iter().zip(&want) {
                assert!(
                    (g - e).abs() <= 1e-6 * e.abs().max(1e-3),
                    "branch {b} in {rt}: {g} vs {e}"
                );
            }
        }
    }
}

#[test]
fn every_form_decodes_exactly_what_the_encoder_encoded() {
    if !ort_ready() {
        return;
    }
    let cases: [(Layout, &[usize]); 5] = [
        (Layout::MatMul2, &[72, 40]),
        (Layout::MatMul3, &[2, 20, 12]),
        (Layout::Gather, &[30, 50]),
        (Layout::Pick, &[30, 5, 10]),
        (Layout::GemmT, &[24, 64]),
    ];
    let mut gemm_nbits = 0;
    let mut checked = 0;
    for (ci, (layout, dims)) in cases.iter().enumerate() {
        let n: usize = dims.iter().product();
        let mut w = weights(n, 11 + ci as u64);
        w[7] = 3.0; // an outlier
        for s in schemes() {
            for opset in [9, 13, 17] {
                for target in [Target::Portable, Target::Ort] {
                    let (mut m, feed) = model(*layout, dims, &w, opset);
                    let report = quantize_weights(&mut m, &Fixed(s), target).unwrap();
                    let site = &report.sites[0];
                    let what = format!(
                        "{} on {layout:?} {dims:?}, opset {opset}, {target:?}",
                        s.label()
                    );
                    let form = site
                        .form
                        .clone()
                        .unwrap_or_else(|| panic!("{what}: not quantized: {:?}", site.note));
                    let used = site.scheme.unwrap();
                    if matches!(layout, Layout::GemmT) && form.starts_with("MatMulNBits") {
                        gemm_nbits += 1;
                    }
                    // A table read by Gather alone is gathered as codes, then decoded.
                    if matches!(layout, Layout::Pick) && site.outliers == 0 {
                        assert!(form.contains("rows"), "{what}: {form}");
                    }
                    if opset < 11 && s.outliers.is_some() {
                        assert!(
                            site.note
                                .as_deref()
                                .is_some_and(|n| n.contains("ScatterND")),
                            "{what}: {:?}",
                            site.note
                        );
                    }
                    let want = expected(*layout, dims, &w, &used);
                    checked += runs_as(
                        &m,
                        &feed,
                        &out_shape(*layout, dims),
                        &want,
                        &format!("{what} [{form}]"),
                    );
                }
            }
        }
    }
    // A Gemm with transB and a bias takes MatMulNBits (and an Add) like a MatMul.
    assert!(gemm_nbits >= 4, "{gemm_nbits}");
    eprintln!("{checked} form × runtime decodes matched the encoder");
}

/// The codebook form: pieces that do not divide k (padding), residual stages, product subspaces,
/// 16-bit codes and the outlier path, in both runtimes, equal to `quant::vq::encode(..).decode()`.
#[test]
fn every_vq_form_decodes_exactly_what_the_encoder_encoded() {
    use quench::quant::vq::{self, Importance, VqScheme};
    if !ort_ready() {
        return;
    }
    let cases: [(Layout, &[usize]); 4] = [
        (Layout::MatMul2, &[72, 40]),
        (Layout::MatMul3, &[2, 40, 24]),
        (Layout::Gather, &[30, 50]),
        (Layout::Pick, &[30, 5, 10]),
    ];
    let base = VqScheme {
        codebook_size: 16,
        importance: Importance::None,
        iterations: 8,
        ..Default::default()
    };
    let schemes = [
        VqScheme { dim: 3, ..base },
        VqScheme {
            dim: 4,
            stages: 2,
            subspaces: 2,
            ..base
        },
        VqScheme {
            dim: 2,
            codebook_size: 300,
            outliers: Some(OutlierRule::TopFraction(0.01)),
            ..base
        },
    ];
    let mut checked = 0;
    for (ci, (layout, dims)) in cases.iter().enumerate() {
        let n: usize = dims.iter().product();
        let mut w = weights(n, 21 + ci as u64);
        w[5] = 2.5;
        for v in schemes {
            let s = WeightScheme::vq(v);
            for opset in [9, 13] {
                let (mut m, feed) = model(*layout, dims, &w, opset);
                let report = quantize_weights(&mut m, &Fixed(s), Target::Portable).unwrap();
                let site = &report.sites[0];
                let what = format!("{} on {layout:?} {dims:?}, opset {opset}", s.label());
                if opset < 11 && v.outliers.is_some() {
                    assert!(
                        site.note
                            .as_deref()
                            .is_some_and(|n| n.contains("ScatterND")),
                        "{what}: {:?}",
                        site.note
                    );
                    continue;
                }
                let form = site
                    .form
                    .clone()
                    .unwrap_or_else(|| panic!("{what}: not quantized: {:?}", site.note));
                if matches!(layout, Layout::Pick) && site.outliers == 0 {
                    assert!(form.contains("rows"), "{what}: {form}");
                }
                let stats = site.vq.as_ref().expect("VQ figures in the report");
                assert_eq!(stats.codebooks.len(), v.stages * v.subspaces, "{what}");
                assert!(
                    (stats.bits_per_weight - site.bytes_after as f64 * 8.0 / n as f64).abs() < 1e-9
                );
                let want = expected_with(*layout, dims, &w, |x, rows, k| {
                    let e = vq::encode(x, rows, k, &v, None).unwrap();
                    assert!((e.sqnr_db - site.weight_sqnr_db).abs() < 1e-9, "{what}");
                    e.decode()
                });
                checked += runs_as(
                    &m,
                    &feed,
                    &out_shape(*layout, dims),
                    &want,
                    &format!("{what} [{form}]"),
                );
            }
        }
    }
    assert!(checked >= 24, "{checked}");
    eprintln!("{checked} VQ form × runtime decodes matched the encoder");
}
