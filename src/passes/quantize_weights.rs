//! Weight quantization, int8 (per output channel or per tensor), emitted as standard ONNX valid at the
//! model's opset.
//!
//! Rule: every weight site of the top-level graph's constants (initializers and `Constant` nodes, read
//! from anywhere, subgraphs included) that the policy gives a scheme is quantized once — a tied weight
//! stays one quantized tensor shared by all its readers — and every read of the float tensor becomes a
//! read of its decode:
//! - per output channel: `DequantizeLinear(codes, scale[C], zero_point[C], axis)` at opset ≥ 13; below
//!   13 (no `axis`), `Mul(Cast(codes − zero_point, float), scale)` with the scale shaped to broadcast along
//!   the channel axis — the same numbers, in ops every opset has;
//! - per tensor: `DequantizeLinear` with scalar scale and zero point (opset ≥ 10).
//!
//! Sites the pass cannot take are declined with the reason: constants inside subgraphs, graph outputs,
//! readers that disagree on the channel axis (then per tensor is used instead, and said), and schemes
//! this pass does not emit yet (sub-byte widths and blocks).

use serde::Serialize;

use super::{Declined, Pass, PassReport};
use crate::error::{Error, Result};
use crate::ir::{ConstantSource, Model, Patch, WeightSite, weight_sites};
use crate::onnx::dtype::DataType;
use crate::onnx::pb::{AttributeProto, TensorProto, attribute_proto::AttributeType};
use crate::onnx::tensor::to_f32;
use crate::quant::int::{Granularity, IntScheme, quantize, sqnr_db};

/// The runtime family the output is for: which graph forms may be emitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Standard ONNX only, valid at the model's opset.
    #[default]
    Portable,
    /// onnxruntime: also com.microsoft MatMulNBits (4-bit blocks, zero points when asymmetric).
    Ort,
    /// tract: also MatMulNBits where it maps to tract's Q4_0 kernel (bits 4, block 32, symmetric,
    /// K a multiple of 32, scales exact in f16).
    Tract,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "portable" => Ok(Target::Portable),
            "ort" => Ok(Target::Ort),
            "tract" => Ok(Target::Tract),
            other => Err(format!(
                "unknown target '{other}' (expected portable, ort or tract)"
            )),
        }
    }
}

/// What the policy knows about a site when it decides.
#[derive(Clone, Debug)]
pub struct SiteInfo<'a> {
    pub weight: &'a str,
    /// Consumer node names and op types.
    pub consumers: Vec<(&'a str, &'a str)>,
    pub elements: u64,
    pub in_subgraph: bool,
}

/// A scheme for a site, or a reason to leave it in float.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Quantize(IntScheme),
    Skip(String),
}

/// Decides per site; recipes compile into one.
pub trait WeightPolicy {
    fn decide(&self, site: &SiteInfo) -> Decision;
}

/// What happened to one weight site.
#[derive(Clone, Debug, Serialize)]
pub struct SiteReport {
    pub weight: String,
    pub op_types: Vec<String>,
    pub shape: Vec<i64>,
    pub scheme: Option<IntScheme>,
    /// The graph form emitted.
    pub form: Option<String>,
    pub bytes_before: u64,
    pub bytes_after: u64,
    #[serde(serialize_with = "crate::report::ser_db")]
    pub weight_sqnr_db: f64,
    /// Why the site stayed float, or a note on a fallback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct WeightReport {
    pub sites: Vec<SiteReport>,
    pub quantized: usize,
    pub skipped: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

pub struct QuantizeWeights<'p> {
    pub policy: &'p dyn WeightPolicy,
    pub target: Target,
}

impl Pass for QuantizeWeights<'_> {
    fn name(&self) -> &'static str {
        "quantize-weights"
    }

    fn run(&self, model: &mut Model) -> Result<PassReport> {
        let detail = quantize_weights(model, self.policy, self.target)?;
        let mut report = PassReport::new(self.name());
        for s in &detail.sites {
            match (&s.form, &s.note) {
                (Some(form), _) => report.changes.push(format!("{}: {form}", s.weight)),
                (None, Some(reason)) => report.declined.push(Declined {
                    site: s.weight.clone(),
                    reason: reason.clone(),
                }),
                _ => {}
            }
        }
        report.changed = detail.quantized > 0;
        Ok(report)
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn tensor(dt: DataType, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        data_type: dt as i32,
        dims: dims.to_vec(),
        raw_data: raw.into(),
        ..Default::default()
    }
}

fn f32_tensor(dims: &[i64], v: &[f32]) -> TensorProto {
    tensor(
        DataType::Float,
        dims,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

/// Quantizes the model's weights as the policy decides; returns the per-site report.
pub fn quantize_weights(
    model: &mut Model,
    policy: &dyn WeightPolicy,
    target: Target,
) -> Result<WeightReport> {
    let opset = model.opset("").unwrap_or(1);
    let sites = weight_sites(model);
    let mut report = WeightReport::default();
    let mut patch = Patch::new("quantize-weights");
    for site in &sites {
        let r = quantize_site(model, site, policy, opset, target, &mut patch)?;
        report.bytes_before += r.bytes_before;
        report.bytes_after += r.bytes_after;
        if r.form.is_some() {
            report.quantized += 1;
        } else {
            report.skipped += 1;
        }
        report.sites.push(r);
    }
    model.graph.apply(patch)?;
    Ok(report)
}

fn quantize_site(
    model: &mut Model,
    site: &WeightSite,
    policy: &dyn WeightPolicy,
    opset: i64,
    target: Target,
    patch: &mut Patch,
) -> Result<SiteReport> {
    let c = &site.constant;
    let shape = c.shape().to_vec();
    let mut out = SiteReport {
        weight: c.name.clone(),
        op_types: site.uses.iter().map(|u| u.op_type.clone()).collect(),
        shape: shape.clone(),
        scheme: None,
        form: None,
        bytes_before: c.bytes(),
        bytes_after: c.bytes(),
        weight_sqnr_db: f64::INFINITY,
        note: None,
    };
    out.op_types.dedup();
    let info = SiteInfo {
        weight: &c.name,
        consumers: site
            .uses
            .iter()
            .map(|u| (u.node.as_str(), u.op_type.as_str()))
            .collect(),
        elements: c.stored_elements,
        in_subgraph: c.in_subgraph(),
    };
    let mut scheme = match policy.decide(&info) {
        Decision::Skip(reason) => {
            out.note = Some(reason);
            return Ok(out);
        }
        Decision::Quantize(s) => s,
    };
    let decline = |mut out: SiteReport, why: String| {
        out.note = Some(why);
        Ok(out)
    };
    if c.in_subgraph() {
        return decline(
            out,
            "the constant lives inside a subgraph: not rewritten yet".into(),
        );
    }
    if c.source == ConstantSource::SparseInitializer {
        return decline(out, "sparse initializer: kept as stored".into());
    }
    if c.tensor.data_type != DataType::Float as i32 {
        return decline(out, "not float32".into());
    }
    if model.graph.is_output(c.value) {
        return decline(out, "the weight is also a graph output".into());
    }
    if shape.is_empty() || c.stored_elements == 0 {
        return decline(out, "scalar or empty".into());
    }
    if scheme.bits == 4 && matches!(scheme.granularity, Granularity::Block(_)) {
        match matmul_nbits(model, site, &scheme, target, patch) {
            Ok(done) => {
                out.scheme = Some(scheme);
                out.form = Some(done.form);
                out.bytes_after = done.bytes;
                out.weight_sqnr_db = done.sqnr_db;
                return Ok(out);
            }
            Err(why) => {
                out.note = Some(format!("{why}; int8 per-channel instead"));
                scheme = IntScheme {
                    bits: 8,
                    granularity: Granularity::PerChannel,
                    clip_search: false,
                    ..scheme
                };
            }
        }
    } else if scheme.bits != 8 {
        out.note = Some(format!(
            "{}-bit {:?} has no graph form here yet; int8 per-channel instead",
            scheme.bits, scheme.granularity
        ));
        scheme = IntScheme {
            bits: 8,
            granularity: Granularity::PerChannel,
            clip_search: false,
            ..scheme
        };
    } else if matches!(scheme.granularity, Granularity::Block(_)) {
        out.note = Some("int8 blocks have no graph form here yet; per-channel instead".into());
        scheme.granularity = Granularity::PerChannel;
    }
    // One channel axis for all readers, else per tensor.
    let mut axes: Vec<usize> = site.uses.iter().filter_map(|u| u.channel_axis).collect();
    axes.dedup();
    let axis = match (scheme.granularity, axes.as_slice()) {
        (Granularity::PerChannel, [a]) => Some(*a),
        (Granularity::PerChannel, _) => {
            out.note =
                Some("readers disagree on the output-channel axis: quantized per tensor".into());
            scheme.granularity = Granularity::PerTensor;
            None
        }
        _ => None,
    };
    if axis.is_none() && opset < 10 {
        return decline(
            out,
            format!("DequantizeLinear needs opset 10, the model has {opset}"),
        );
    }
    let values = to_f32(&c.tensor).map_err(|e| Error::Model(format!("weight '{}' {e}", c.name)))?;
    let non_finite = values.iter().filter(|v| !v.is_finite()).count();
    if non_finite > 0 {
        return decline(
            out,
            format!("holds {non_finite} NaN/Inf values (e.g. a −inf mask): kept float"),
        );
    }
    // Quantize as [channels, k] with the channel axis moved first.
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let (channels, k, moved) = match axis {
        Some(a) => {
            let ch = dims[a];
            let inner: usize = dims[a + 1..].iter().product();
            let outer: usize = dims[..a].iter().product();
            let mut m = Vec::with_capacity(values.len());
            for cidx in 0..ch {
                for o in 0..outer {
                    let base = (o * ch + cidx) * inner;
                    m.extend_from_slice(&values[base..base + inner]);
                }
            }
            (ch, outer * inner, m)
        }
        None => (1, values.len(), values.clone()),
    };
    let q = quantize(&moved, channels, k, &scheme)
        .map_err(|e| Error::Model(format!("weight '{}': {e}", c.name)))?;
    // Codes back in the weight's own layout.
    let mut codes = vec![0i32; values.len()];
    match axis {
        Some(a) => {
            let ch = dims[a];
            let inner: usize = dims[a + 1..].iter().product();
            let outer: usize = dims[..a].iter().product();
            for cidx in 0..ch {
                for o in 0..outer {
                    let src = cidx * k + o * inner;
                    let dst = (o * ch + cidx) * inner;
                    codes[dst..dst + inner].copy_from_slice(&q.codes[src..src + inner]);
                }
            }
        }
        None => codes.copy_from_slice(&q.codes),
    }
    let deq_moved = q.dequantize();
    out.weight_sqnr_db = sqnr_db(&moved, &deq_moved);
    out.scheme = Some(scheme);

    let (code_dt, raw): (DataType, Vec<u8>) = if scheme.symmetric {
        (
            DataType::Int8,
            codes.iter().map(|&v| v as i8 as u8).collect(),
        )
    } else {
        (DataType::Uint8, codes.iter().map(|&v| v as u8).collect())
    };
    let zps: Vec<i32> = q
        .zero_points
        .clone()
        .unwrap_or_else(|| vec![0; q.scales.len()]);
    let zp_raw: Vec<u8> = zps
        .iter()
        .map(|&z| {
            if scheme.symmetric {
                z as i8 as u8
            } else {
                z as u8
            }
        })
        .collect();
    let base = &c.name;
    let names = &mut model.names;
    let codes_name = patch.constant(names, &format!("{base}_q"), tensor(code_dt, &shape, raw));
    let n = q.scales.len() as i64;
    // DequantizeLinear per axis (opset ≥ 13) or per tensor; Cast·Mul for per-channel below opset 13.
    let dequantize_linear = match axis {
        Some(a) if opset >= 13 => Some((
            vec![n],
            zp_raw,
            vec![attr_int("axis", a as i64)],
            format!("DequantizeLinear(int8 per-channel, axis {a})"),
        )),
        None => Some((
            vec![],
            zp_raw[..1].to_vec(),
            vec![],
            "DequantizeLinear(int8 per-tensor)".to_string(),
        )),
        Some(_) => None,
    };
    let decoded = match (dequantize_linear, axis) {
        (Some((dims, zp, attrs, form)), _) => {
            let scales = if dims.is_empty() {
                &q.scales[..1]
            } else {
                &q.scales[..]
            };
            let s = patch.constant(names, &format!("{base}_scale"), f32_tensor(&dims, scales));
            let z = patch.constant(
                names,
                &format!("{base}_zero_point"),
                tensor(code_dt, &dims, zp),
            );
            out.form = Some(form);
            patch.node(
                names,
                &format!("{base}_dequantize"),
                "DequantizeLinear",
                "",
                &[Some(&codes_name), Some(&s), Some(&z)],
                1,
                attrs,
            )
        }
        (None, Some(a)) => {
            // (codes − zp) · scale, with scale and zp shaped [1, …, C, …, 1].
            let mut bshape = vec![1i64; shape.len()];
            bshape[a] = n;
            let s = patch.constant(
                names,
                &format!("{base}_scale"),
                f32_tensor(&bshape, &q.scales),
            );
            let zf: Vec<f32> = zps.iter().map(|&z| z as f32).collect();
            let cast = patch.node(
                names,
                &format!("{base}_cast"),
                "Cast",
                "",
                &[Some(&codes_name)],
                1,
                vec![attr_int("to", DataType::Float as i64)],
            );
            let centred = if scheme.symmetric {
                cast[0].clone()
            } else {
                let z = patch.constant(
                    names,
                    &format!("{base}_zero_point"),
                    f32_tensor(&bshape, &zf),
                );
                patch
                    .node(
                        names,
                        &format!("{base}_centre"),
                        "Sub",
                        "",
                        &[Some(&cast[0]), Some(&z)],
                        1,
                        vec![],
                    )
                    .remove(0)
            };
            out.form = Some(format!(
                "Cast·Mul (int8 per-channel, axis {a}; opset {opset} < 13)"
            ));
            patch.node(
                names,
                &format!("{base}_dequantize"),
                "Mul",
                "",
                &[Some(&centred), Some(&s)],
                1,
                vec![],
            )
        }
        (None, None) => unreachable!("per-tensor always has a DequantizeLinear form"),
    };
    patch.replace_all_uses(&c.name, &decoded[0]);
    out.bytes_after = values.len() as u64 + q.scales.len() as u64 * 5;
    Ok(out)
}

struct NBitsDone {
    form: String,
    bytes: u64,
    sqnr_db: f64,
}

/// Replaces every MatMul reading the weight by com.microsoft MatMulNBits over shared packed 4-bit
/// blocks. Errs (changing nothing) with the reason when the site or the target does not allow it.
fn matmul_nbits(
    model: &mut Model,
    site: &WeightSite,
    scheme: &IntScheme,
    target: Target,
    patch: &mut Patch,
) -> std::result::Result<NBitsDone, String> {
    let Granularity::Block(block) = scheme.granularity else {
        unreachable!("checked by the caller")
    };
    let c = &site.constant;
    if target == Target::Portable {
        return Err("4-bit blocks need --target ort or tract (MatMulNBits)".into());
    }
    if site
        .uses
        .iter()
        .any(|u| u.op_type != "MatMul" || u.input != 1 || u.subgraph)
    {
        return Err("MatMulNBits replaces MatMul B only, and this weight has other readers".into());
    }
    if site.readers != site.uses.len() {
        return Err("the weight is also read outside a weight slot".into());
    }
    let [k, n] = c.shape() else {
        return Err(format!(
            "MatMulNBits needs a 2-D B, this is {:?}",
            c.shape()
        ));
    };
    let (k, n) = (*k as usize, *n as usize);
    if block < 16 || !block.is_power_of_two() {
        return Err(format!(
            "MatMulNBits needs a power-of-two block ≥ 16, got {block}"
        ));
    }
    if target == Target::Tract {
        if block != 32 || !scheme.symmetric {
            return Err("tract's Q4_0 kernel takes symmetric blocks of 32 only".into());
        }
        if k % 32 != 0 {
            return Err(format!(
                "K={k} is not a multiple of 32 (tract's Q4_0 kernel)"
            ));
        }
    }
    let g = &model.graph;
    let mut consumers = Vec::new();
    for u in &site.uses {
        let found: Vec<_> = g
            .nodes()
            .filter(|(_, x)| !u.node.is_empty() && x.name == u.node)
            .map(|(id, _)| id)
            .collect();
        let [id] = found.as_slice() else {
            return Err(format!("consumer '{}' is not uniquely named", u.node));
        };
        let node = g.node(*id);
        let (Some(a), Some(y)) = (node.input(0), node.outputs().first().copied().flatten()) else {
            return Err(format!("MatMul '{}' lacks an input or output", u.node));
        };
        if g.is_output(y) {
            return Err(format!(
                "the output of MatMul '{}' is a graph output",
                u.node
            ));
        }
        consumers.push((
            *id,
            g.value_name(a).to_string(),
            g.value_name(y).to_string(),
            node.name.clone(),
        ));
    }
    let values = to_f32(&c.tensor).map_err(|e| format!("weight {e}"))?;
    // [K, N] → rows of B^T: [N, K].
    let mut wt = vec![0f32; values.len()];
    for (i, row) in values.chunks(n).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            wt[j * k + i] = v;
        }
    }
    let mut q = quantize(&wt, n, k, scheme)?;
    if target == Target::Tract {
        // tract keeps Q4_0 scales in f16: quantize against the f16 value of each scale.
        for s in q.scales.iter_mut() {
            let h = half::f16::from_f32(*s);
            *s = if h.is_infinite() {
                half::f16::MAX.to_f32()
            } else if h.to_f32() > 0.0 {
                h.to_f32()
            } else {
                half::f16::from_bits(1).to_f32()
            };
        }
        q.codes = crate::quant::int::codes_for_scales(&wt, &q);
    }
    let sqnr_db = sqnr_db(&wt, &q.dequantize());
    let blocks = k.div_ceil(block);
    let offset = if scheme.symmetric { 8 } else { 0 };
    let packed = crate::quant::pack::matmul_nbits_b(&q.codes, n, k, 4, block, offset);
    let blob = block / 2;
    let names = &mut model.names;
    let b_name = patch.constant(
        names,
        &format!("{}_q4", c.name),
        tensor(
            DataType::Uint8,
            &[n as i64, blocks as i64, blob as i64],
            packed.clone(),
        ),
    );
    let s_name = patch.constant(
        names,
        &format!("{}_scales", c.name),
        f32_tensor(&[(n * blocks) as i64], &q.scales),
    );
    let zp_name = match &q.zero_points {
        Some(z) => {
            let zp = crate::quant::pack::matmul_nbits_zero_points(z, n, blocks, 4);
            let len = zp.len() as i64;
            Some(patch.constant(
                names,
                &format!("{}_zero_points", c.name),
                tensor(DataType::Uint8, &[len], zp),
            ))
        }
        None => None,
    };
    for (id, a, y, node_name) in &consumers {
        let attrs = vec![
            attr_int("K", k as i64),
            attr_int("N", n as i64),
            attr_int("bits", 4),
            attr_int("block_size", block as i64),
        ];
        let inputs: Vec<Option<&str>> = match &zp_name {
            Some(z) => vec![
                Some(a.as_str()),
                Some(&b_name),
                Some(&s_name),
                Some(z.as_str()),
            ],
            None => vec![Some(a.as_str()), Some(&b_name), Some(&s_name)],
        };
        let out = patch.node(
            names,
            &format!("{node_name}_nbits"),
            "MatMulNBits",
            "com.microsoft",
            &inputs,
            1,
            attrs,
        );
        patch.replace_all_uses(y, &out[0]);
        patch.remove_node(*id);
    }
    model
        .require_op("com.microsoft", "MatMulNBits", 1)
        .map_err(|e| e.to_string())?;
    let bytes = packed.len() as u64
        + q.scales.len() as u64 * 4
        + q.zero_points.as_ref().map_or(0, |z| z.len() as u64 / 2);
    Ok(NBitsDone {
        form: format!(
            "MatMulNBits(4-bit, block {block}, {}) × {}",
            if scheme.symmetric {
                "symmetric"
            } else {
                "zero points"
            },
            consumers.len()
        ),
        bytes,
        sqnr_db,
    })
}
