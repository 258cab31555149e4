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
}

impl Pass for QuantizeWeights<'_> {
    fn name(&self) -> &'static str {
        "quantize-weights"
    }

    fn run(&self, model: &mut Model) -> Result<PassReport> {
        let detail = quantize_weights(model, self.policy)?;
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
pub fn quantize_weights(model: &mut Model, policy: &dyn WeightPolicy) -> Result<WeightReport> {
    let opset = model.opset("").unwrap_or(1);
    let sites = weight_sites(model);
    let mut report = WeightReport::default();
    let mut patch = Patch::new("quantize-weights");
    for site in &sites {
        let r = quantize_site(model, site, policy, opset, &mut patch)?;
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
    if scheme.bits != 8 || matches!(scheme.granularity, Granularity::Block(_)) {
        return decline(
            out,
            format!(
                "{}-bit {:?} is not emitted by this pass yet",
                scheme.bits, scheme.granularity
            ),
        );
    }
    if shape.is_empty() || c.stored_elements == 0 {
        return decline(out, "scalar or empty".into());
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
    let decoded = match axis {
        Some(a) if opset >= 13 => {
            let s = patch.constant(names, &format!("{base}_scale"), f32_tensor(&[n], &q.scales));
            let z = patch.constant(
                names,
                &format!("{base}_zero_point"),
                tensor(code_dt, &[n], zp_raw),
            );
            out.form = Some(format!("DequantizeLinear(int8 per-channel, axis {a})"));
            patch.node(
                names,
                &format!("{base}_dequantize"),
                "DequantizeLinear",
                "",
                &[Some(&codes_name), Some(&s), Some(&z)],
                1,
                vec![attr_int("axis", a as i64)],
            )
        }
        Some(a) => {
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
        None => {
            let s = patch.constant(
                names,
                &format!("{base}_scale"),
                f32_tensor(&[], &q.scales[..1]),
            );
            let z = patch.constant(
                names,
                &format!("{base}_zero_point"),
                tensor(code_dt, &[], zp_raw[..1].to_vec()),
            );
            out.form = Some("DequantizeLinear(int8 per-tensor)".into());
            patch.node(
                names,
                &format!("{base}_dequantize"),
                "DequantizeLinear",
                "",
                &[Some(&codes_name), Some(&s), Some(&z)],
                1,
                vec![],
            )
        }
    };
    patch.replace_all_uses(&c.name, &decoded[0]);
    out.bytes_after = values.len() as u64 + q.scales.len() as u64 * 5;
    Ok(out)
}
