//! Weight quantization: every weight site the policy gives a scheme is encoded once
//! ([`crate::quant::scheme::encode`]) — a tied weight stays one quantized tensor shared by all its
//! readers — and every read of the float tensor becomes a read of a decode in the graph. The form of
//! the decode depends on the scheme and the target:
//!
//! - int8 per channel or per tensor: `DequantizeLinear` (axis at opset ≥ 13) for `portable`; for `ort`
//!   and `tract` (and per channel below opset 13) `Mul(Cast(codes) [− zero point], scale)` — the same
//!   numbers, and both runtimes fold it to float at load, where stock onnxruntime runs a weight-only
//!   DequantizeLinear on every inference (3.1× slower than fp32 on the zoo's rxnmap, measured);
//! - 4-bit integer blocks read only by MatMul, for `ort` and `tract`: com.microsoft `MatMulNBits`
//!   (tract: symmetric blocks of 32, K a multiple of 32, f16-exact scales — its Q4_0 kernel);
//! - everything else (2–7 bits, NF4/FP4, double-quantized scales, other ops' weights, any target): the
//!   level-table form of [`emit::Emit::level_table`], standard ONNX from opset 7;
//! - kept outliers: `ScatterND` over the decoded weight (opset ≥ 11).
//!
//! Where a form cannot be emitted the site falls back (4-bit MatMulNBits → level table → int8 per
//! channel) or stays float, and the report says why. Constants inside subgraphs, sparse initializers,
//! graph outputs and non-finite weights stay float.

pub mod emit;
pub mod importance;

use serde::Serialize;

use self::emit::{Emit, Shared, attr_int, f32_tensor, tensor};
use super::roles::{Role, classify};
use super::{Declined, Pass, PassReport};
use crate::error::{Error, Result};
use crate::ir::{ConstantSource, Model, NodeId, Patch, Slot, WeightSite, weight_sites};
use crate::onnx::dtype::DataType;
use crate::onnx::tensor::to_f32;
use crate::quant::int::{Granularity, quantize, sqnr_db};
use crate::quant::scheme::{Encoded, Format, WeightScheme, encode};
use crate::quant::vq::{self, Importance, VqScheme};

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
    pub role: Role,
}

/// A scheme for a site, or a reason to leave it in float.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Quantize(WeightScheme),
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
    pub role: Role,
    pub shape: Vec<i64>,
    pub scheme: Option<WeightScheme>,
    /// The scheme in short (`int4 block 32 clip`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The graph form emitted.
    pub form: Option<String>,
    pub bytes_before: u64,
    pub bytes_after: u64,
    #[serde(serialize_with = "crate::report::ser_db")]
    pub weight_sqnr_db: f64,
    /// Fraction of the decoded weight that is exactly zero.
    pub sparsity: f64,
    /// Weights kept exactly in the outlier path.
    pub outliers: usize,
    /// Why the site stayed float, or a note on a fallback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Codebook figures of a vector-quantized site.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vq: Option<VqSiteReport>,
}

/// What vector quantization spent and how its codebooks are used.
#[derive(Clone, Debug, Serialize)]
pub struct VqSiteReport {
    /// Codes, codebooks, scales and outliers per weight.
    pub bits_per_weight: f64,
    /// Whether calibration data weighted the clustering (else data-free).
    pub weighted_by_data: bool,
    pub codebooks: Vec<crate::quant::vq::CodebookStats>,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct WeightReport {
    pub sites: Vec<SiteReport>,
    pub quantized: usize,
    pub skipped: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Values in the quantized sites.
    pub params_quantized: u64,
    /// Constants shared by several sites (the level tables), included in `bytes_after`.
    pub shared_bytes: u64,
    /// Bits per weight spent on the quantized sites (codes, scales, zero points, outliers, the shared
    /// tables).
    pub bits_per_weight: f64,
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

/// Quantizes the model's weights as the policy decides; returns the per-site report.
pub fn quantize_weights(
    model: &mut Model,
    policy: &dyn WeightPolicy,
    target: Target,
) -> Result<WeightReport> {
    quantize_weights_with(model, policy, target, None, None)
}

/// The role of a site, from names and, in the main graph, the structure around its readers.
fn site_role(
    model: &Model,
    site: &WeightSite,
    weighted: &std::collections::HashSet<crate::ir::NodeId>,
) -> Role {
    let c = &site.constant;
    let consumers: Vec<(&str, &str)> = site
        .uses
        .iter()
        .map(|u| (u.node.as_str(), u.op_type.as_str()))
        .collect();
    let by_name = classify(&c.name, &consumers);
    if c.in_subgraph() {
        by_name
    } else {
        let readers = super::roles::readers(&model.graph, c.value);
        super::roles::structural(&model.graph, &readers, weighted, by_name)
    }
}

/// Every weight site of the model with its role.
pub fn sites_with_roles(model: &Model) -> Vec<(WeightSite, Role)> {
    let weighted = super::roles::weighted_nodes(&model.graph);
    weight_sites(model)
        .into_iter()
        .map(|s| {
            let r = site_role(model, &s, &weighted);
            (s, r)
        })
        .collect()
}

/// What a policy is shown of a site.
pub fn site_info<'a>(site: &'a WeightSite, role: Role) -> SiteInfo<'a> {
    SiteInfo {
        weight: &site.constant.name,
        consumers: site
            .uses
            .iter()
            .map(|u| (u.node.as_str(), u.op_type.as_str()))
            .collect(),
        elements: site.constant.stored_elements,
        in_subgraph: site.constant.in_subgraph(),
        role,
    }
}

/// The activations (tensor, channel axis) whose per-channel energy the policy's VQ sites with
/// `importance: calibration` would use: what to calibrate before [`quantize_weights_with`].
pub fn energy_requests(model: &Model, policy: &dyn WeightPolicy) -> Vec<(String, i64)> {
    let weighted = super::roles::weighted_nodes(&model.graph);
    let mut out = std::collections::BTreeSet::new();
    for site in weight_sites(model) {
        let role = site_role(model, &site, &weighted);
        let Decision::Quantize(s) = policy.decide(&site_info(&site, role)) else {
            continue;
        };
        let wants = s
            .vq_scheme()
            .is_some_and(|v| v.importance == Importance::Calibration);
        if wants && let Some(ms) = importance::multiplicands(model, &site) {
            out.extend(ms.into_iter().map(|m| (m.tensor, m.axis)));
        }
    }
    out.into_iter().collect()
}

/// The input Hessians the policy's `gptq` sites would use: one request per weight (keyed by its
/// name) over the inputs of all its readers. Readers this knows are MatMul and Gemm in the main graph
/// ([`importance::multiplicand`] with one weight column per input channel) and 1-D/2-D Conv of
/// group 1 (one column per input channel and kernel position, over the input's patches).
pub fn hessian_requests(
    model: &Model,
    policy: &dyn WeightPolicy,
) -> Vec<crate::calib::HessianRequest> {
    let weighted = super::roles::weighted_nodes(&model.graph);
    let mut out = Vec::new();
    for site in weight_sites(model) {
        let role = site_role(model, &site, &weighted);
        let Decision::Quantize(s) = policy.decide(&site_info(&site, role)) else {
            continue;
        };
        if !s.gptq || site.constant.in_subgraph() {
            continue;
        }
        let Some(ms) = importance::multiplicands(model, &site) else {
            continue;
        };
        // The rows' width: everything but the output-channel axis.
        let shape = site.constant.shape();
        let axis = match site.uses.first().map(|u| u.channel_axis) {
            Some(Some(a)) if a < shape.len() => a,
            _ => continue,
        };
        let k: i64 = shape
            .iter()
            .enumerate()
            .filter(|(d, _)| *d != axis)
            .map(|(_, v)| *v)
            .product();
        if ms.iter().any(|m| m.repeat != 1 && m.conv.is_none()) {
            continue;
        }
        out.push(crate::calib::HessianRequest {
            key: site.constant.name.clone(),
            k: k.max(0) as usize,
            sources: ms
                .into_iter()
                .map(|m| crate::calib::HessianSource {
                    tensor: m.tensor,
                    axis: m.axis,
                    conv: m.conv,
                })
                .collect(),
        });
    }
    out
}

/// Damping of the input Hessian, × its mean diagonal (GPTQ's default).
pub const GPTQ_DAMP: f64 = 0.01;

/// Rounds of assignment with feedback and refit for vq sites with `gptq`.
pub const VQ_ROUNDS: usize = 3;

/// Damping of the input Hessian for vq sites with `gptq`, × its mean diagonal. Refitting codebooks
/// and scales fits more to the calibration data than scalar rounding does; ten times GPTQ's damping
/// keeps more of the plain weight error in the objective, which held up better on data the fit did
/// not see (docs/vq.md).
pub const VQ_DAMP: f64 = 0.1;

/// [`quantize_weights`] with what calibration data gives: the per-channel energy that weights the
/// clustering of VQ sites (see [`importance`]), and the input Hessians of `gptq` sites
/// ([`hessian_requests`]).
pub fn quantize_weights_with(
    model: &mut Model,
    policy: &dyn WeightPolicy,
    target: Target,
    energy: Option<&importance::ChannelEnergy>,
    hessians: Option<&std::collections::BTreeMap<String, crate::calib::Hessian>>,
) -> Result<WeightReport> {
    let opset = model.opset("").unwrap_or(1);
    let sites = weight_sites(model);
    let mut report = WeightReport::default();
    let mut patch = Patch::new("quantize-weights");
    // Constants that live inside subgraphs are decoded there: one patch per subgraph.
    let mut sub_patches: std::collections::BTreeMap<crate::ir::GraphPath, Patch> =
        Default::default();
    let mut shared = Shared::default();
    let mut nbits = false;
    let weighted = super::roles::weighted_nodes(&model.graph);
    for site in &sites {
        let role = site_role(model, site, &weighted);
        let site_patch = if site.constant.path.is_empty() {
            &mut patch
        } else {
            sub_patches
                .entry(site.constant.path.clone())
                .or_insert_with(|| Patch::new("quantize-weights"))
        };
        let r = quantize_site(
            model,
            site,
            role,
            policy,
            opset,
            target,
            site_patch,
            &mut shared,
            energy,
            hessians.map(|h| h.get(&site.constant.name)),
        )?;
        report.bytes_before += r.bytes_before;
        report.bytes_after += r.bytes_after;
        if r.form.is_some() {
            report.quantized += 1;
            report.params_quantized += site.constant.stored_elements;
            nbits |= r
                .form
                .as_deref()
                .is_some_and(|f| f.starts_with("MatMulNBits"));
        } else {
            report.skipped += 1;
        }
        report.sites.push(r);
    }
    report.shared_bytes = shared.bytes;
    report.bytes_after += shared.bytes;
    let quantized_bytes: u64 = report
        .sites
        .iter()
        .filter(|s| s.form.is_some())
        .map(|s| s.bytes_after)
        .sum::<u64>()
        + shared.bytes;
    report.bits_per_weight = if report.params_quantized > 0 {
        quantized_bytes as f64 * 8.0 / report.params_quantized as f64
    } else {
        0.0
    };
    model.graph.apply(patch)?;
    for (path, p) in sub_patches {
        model.graph.apply_at(&path, p)?;
    }
    if nbits {
        model.require_op("com.microsoft", "MatMulNBits", 1)?;
    }
    Ok(report)
}

/// The site's values in float and the type its decode is cast back to; `Err` says why the site stays
/// float. Reading gives the input's mapped pages back to the kernel.
#[allow(clippy::type_complexity)]
fn readable(
    model: &Model,
    site: &WeightSite,
    opset: i64,
) -> Result<std::result::Result<(Vec<f32>, Option<DataType>), String>> {
    let c = &site.constant;
    let Some(home) = model.graph.subgraph_at(&c.path) else {
        return Ok(Err(
            "the subgraph holding the constant is not named uniquely".into(),
        ));
    };
    if c.source == ConstantSource::SparseInitializer {
        return Ok(Err("sparse initializer: kept as stored".into()));
    }
    // float16 and bfloat16 weights are decoded in float and cast back to their type.
    let cast_back = match DataType::try_from(c.tensor.data_type).ok() {
        Some(DataType::Float) => None,
        Some(d @ (DataType::Float16 | DataType::Bfloat16)) => Some(d),
        _ => return Ok(Err("not float32, float16 or bfloat16".into())),
    };
    if cast_back == Some(DataType::Bfloat16) && opset < 13 {
        return Ok(Err(format!(
            "a bfloat16 weight needs Cast to bfloat16 (opset 13), the model has {opset}"
        )));
    }
    if home.is_output(c.value) {
        return Ok(Err("the weight is also a graph output".into()));
    }
    if c.shape().is_empty() || c.stored_elements == 0 {
        return Ok(Err("scalar or empty".into()));
    }
    let values = to_f32(&c.tensor).map_err(|e| Error::Model(format!("weight '{}' {e}", c.name)))?;
    // The float copy is all the pass needs now: the mapped input pages need not stay resident.
    crate::onnx::release_pages(&c.tensor.raw_data);
    let non_finite = values.iter().filter(|v| !v.is_finite()).count();
    if non_finite > 0 {
        return Ok(Err(format!(
            "holds {non_finite} NaN/Inf values (e.g. a −inf mask): kept float"
        )));
    }
    Ok(Ok((values, cast_back)))
}

/// A `Gather` that reads a table along axis 0: the node, its indices and its output.
struct RowReader {
    node: NodeId,
    ids: String,
    out: String,
}

/// The readers of the site's constant when every one is an ONNX `Gather` taking it as data along axis
/// 0, with indices, and an output that is not a graph output; `None` otherwise (the whole table is
/// then decoded, as for any other weight).
fn row_readers(model: &Model, site: &WeightSite) -> Option<Vec<RowReader>> {
    let c = &site.constant;
    let home = model.graph.subgraph_at(&c.path)?;
    let rank = c.shape().len() as i64;
    let uses = home.value(c.value).uses();
    if uses.is_empty() {
        return None;
    }
    uses.iter()
        .map(|u| {
            let n = home.node(u.node);
            let plain = n.domain.is_empty() || n.domain == "ai.onnx";
            let axis = n.int_attribute("axis").unwrap_or(0);
            if !plain || n.op_type != "Gather" || u.slot != Slot::Input(0) {
                return None;
            }
            if axis != 0 && axis + rank != 0 {
                return None;
            }
            let ids = n.input(1)?;
            let out = n.outputs().first().copied().flatten()?;
            if home.is_output(out) {
                return None;
            }
            Some(RowReader {
                node: u.node,
                ids: home.value_name(ids).to_string(),
                out: home.value_name(out).to_string(),
            })
        })
        .collect()
}

/// Every reader gathers its rows from `table` and decodes only them (cast back to the weight's type
/// where it was not float32); the readers themselves go.
fn emit_row_readers(
    emit: &mut Emit,
    table: &emit::RowTable,
    readers: &[RowReader],
    cast_back: Option<DataType>,
) {
    for r in readers {
        let mut y = emit.gather_rows(table, &r.ids);
        if let Some(d) = cast_back {
            y = emit.cast(&y, d);
        }
        emit.patch.replace_all_uses(&r.out, &y);
        emit.patch.remove_node(r.node);
    }
}

/// One output-channel axis for all readers; per tensor (said in `notes`) when there is none or
/// they disagree.
fn channel_axis(
    site: &WeightSite,
    scheme: &mut WeightScheme,
    notes: &mut Vec<String>,
) -> Option<usize> {
    let mut axes: Vec<usize> = site.uses.iter().filter_map(|u| u.channel_axis).collect();
    axes.sort_unstable();
    axes.dedup();
    match (scheme.granularity, axes.as_slice()) {
        (Granularity::PerTensor, _) => None,
        (_, [a]) => Some(*a),
        (_, []) => {
            notes.push(
                "no output-channel axis is known for this reader: quantized per tensor".into(),
            );
            scheme.granularity = Granularity::PerTensor;
            None
        }
        (_, _) => {
            notes.push("readers disagree on the output-channel axis: quantized per tensor".into());
            scheme.granularity = Granularity::PerTensor;
            None
        }
    }
}

/// The column weights of a VQ site with `importance: calibration`, when the energy has them.
fn vq_importance(
    model: &Model,
    site: &WeightSite,
    k: usize,
    scheme: &WeightScheme,
    energy: Option<&importance::ChannelEnergy>,
    notes: &mut Vec<String>,
) -> Option<Vec<f32>> {
    let wants = scheme
        .vq_scheme()
        .is_some_and(|v| v.importance == Importance::Calibration);
    let e = energy.filter(|_| wants && !site.constant.in_subgraph())?;
    let found = importance::column_importance(model, site, k, e);
    if found.is_none() {
        notes.push("no calibrated input energy for this reader: data-free".into());
    }
    found
}

/// What a site would become under a scheme, without changing the graph.
#[derive(Clone, Debug)]
pub struct Simulated {
    /// The decoded weight in its own layout (what every graph form of the scheme computes).
    pub values: Vec<f32>,
    /// Bytes of the encoding (codes, scales, codebooks, outliers; shared level tables excluded).
    pub bytes: u64,
    pub weight_sqnr_db: f64,
    /// Relative weight error Σ e_j (w − ŵ)² / Σ e_j w², each column weighted by the calibrated
    /// energy e_j of the input channel it multiplies (1 without): the expected relative error of
    /// the layer's output when input channels are uncorrelated.
    pub proxy_nsr: f64,
    /// Whether `proxy_nsr` (and VQ clustering) used calibration data: the energy or the Hessian.
    pub weighted: bool,
}

/// Encodes one site as the pass would (same axis, importance, encoder and, for a `gptq` scheme
/// given the site's input Hessian, error feedback) and decodes it back; `Ok(Err(reason))` where the
/// pass would leave it float. With a Hessian the proxy is the relative output error on its
/// calibration inputs ([`crate::quant::gptq::output_nsr`]), which ranks fed codes (more weight
/// error, less output error) with plain ones.
pub fn simulate(
    model: &Model,
    site: &WeightSite,
    scheme: &WeightScheme,
    energy: Option<&importance::ChannelEnergy>,
    hessian: Option<&crate::calib::Hessian>,
) -> Result<std::result::Result<Simulated, String>> {
    let opset = model.opset("").unwrap_or(1);
    let c = &site.constant;
    let (values, _) = match readable(model, site, opset)? {
        Ok(r) => r,
        Err(why) => return Ok(Err(why)),
    };
    let mut scheme = *scheme;
    let mut notes = Vec::new();
    let axis = channel_axis(site, &mut scheme, &mut notes);
    let dims: Vec<usize> = c.shape().iter().map(|&d| d as usize).collect();
    let rows = to_rows(values, &dims, axis);
    let columns = energy.and_then(|e| importance::column_importance(model, site, rows.k, e));
    let fail = |e: String| Error::Model(format!("weight '{}': {e}", c.name));
    let hessian = hessian.filter(|h| h.k == rows.k && !c.in_subgraph());
    let feed = hessian.filter(|_| scheme.gptq && scheme.granularity != Granularity::PerTensor);
    let (decoded, bytes, sqnr) = match scheme.vq_scheme() {
        Some(v) => {
            let imp = vq_importance(model, site, rows.k, &scheme, energy, &mut notes);
            let mut enc = vq::encode(&rows.values, rows.channels, rows.k, &v, imp.as_deref())
                .map_err(fail)?;
            // As the pass: the refined codes where they lower the output error, else the plain
            // ones (`refine` leaves them), and nearest rounding where feedback cannot run.
            if let Some(h) = feed {
                let _ = crate::quant::vq_feedback::refine(
                    &mut enc,
                    &rows.values,
                    h,
                    VQ_DAMP,
                    VQ_ROUNDS,
                );
            }
            (enc.decode(), enc.bytes(), enc.sqnr_db)
        }
        None => {
            let mut enc = encode(&rows.values, rows.channels, rows.k, &scheme).map_err(fail)?;
            if let Some(h) = feed {
                let _ = enc.refine_with_feedback(&rows.values, h, GPTQ_DAMP);
            }
            (
                enc.decode(),
                enc.bytes(emit::slot_bits(enc.bits)),
                enc.sqnr_db,
            )
        }
    };
    if bytes >= c.bytes() {
        return Ok(Err(format!(
            "{} would take {bytes} bytes, not fewer than the {} of float",
            scheme.label(),
            c.bytes()
        )));
    }
    let by_output = hessian.and_then(|h| {
        crate::quant::gptq::output_nsr(&rows.values, &decoded, rows.channels, h).ok()
    });
    let proxy_nsr = match by_output {
        Some(n) => n,
        None => {
            let (mut num, mut den) = (0f64, 0f64);
            for (i, (&w, &q)) in rows.values.iter().zip(&decoded).enumerate() {
                let e = columns.as_ref().map_or(1.0, |cw| cw[i % rows.k] as f64);
                let d = (w - q) as f64;
                num += e * d * d;
                den += e * (w as f64) * (w as f64);
            }
            if den > 0.0 { num / den } else { 0.0 }
        }
    };
    Ok(Ok(Simulated {
        values: from_rows(&decoded, &dims, axis),
        bytes,
        weight_sqnr_db: sqnr,
        proxy_nsr,
        weighted: columns.is_some() || by_output.is_some(),
    }))
}

/// The weight as a row-major `[channels, k]` matrix with the channel axis moved first.
struct Rows {
    channels: usize,
    k: usize,
    values: Vec<f32>,
    /// The shape of the moved tensor, and the Transpose perm back to the weight's layout.
    moved_dims: Vec<i64>,
    perm: Option<Vec<i64>>,
}

/// Takes the values: with the channel axis already first (or none), they are used as they are.
fn to_rows(values: Vec<f32>, dims: &[usize], axis: Option<usize>) -> Rows {
    let Some(a) = axis.filter(|&a| a != 0) else {
        let channels = axis.map_or(1, |a| dims[a]);
        return Rows {
            channels,
            k: values.len() / channels.max(1),
            values,
            moved_dims: dims.iter().map(|&d| d as i64).collect(),
            perm: None,
        };
    };
    let (ch, outer, inner) = split_at_axis(dims, a);
    let mut m = Vec::with_capacity(values.len());
    for c in 0..ch {
        for o in 0..outer {
            let base = (o * ch + c) * inner;
            m.extend_from_slice(&values[base..base + inner]);
        }
    }
    let mut moved_dims = vec![dims[a] as i64];
    moved_dims.extend(
        dims.iter()
            .enumerate()
            .filter(|(i, _)| *i != a)
            .map(|(_, &d)| d as i64),
    );
    let perm = (a != 0).then(|| {
        (0..dims.len())
            .map(|j| match j.cmp(&a) {
                std::cmp::Ordering::Less => j as i64 + 1,
                std::cmp::Ordering::Equal => 0,
                std::cmp::Ordering::Greater => j as i64,
            })
            .collect()
    });
    Rows {
        channels: ch,
        k: outer * inner,
        values: m,
        moved_dims,
        perm,
    }
}

fn split_at_axis(dims: &[usize], a: usize) -> (usize, usize, usize) {
    (
        dims[a],
        dims[..a].iter().product(),
        dims[a + 1..].iter().product(),
    )
}

/// Row-major moved `[channels, k]` data back in the weight's own layout.
fn from_rows<T: Copy + Default>(moved: &[T], dims: &[usize], axis: Option<usize>) -> Vec<T> {
    let Some(a) = axis else {
        return moved.to_vec();
    };
    let (ch, outer, inner) = split_at_axis(dims, a);
    let k = outer * inner;
    let mut out = vec![T::default(); moved.len()];
    for c in 0..ch {
        for o in 0..outer {
            let src = c * k + o * inner;
            let dst = (o * ch + c) * inner;
            out[dst..dst + inner].copy_from_slice(&moved[src..src + inner]);
        }
    }
    out
}

/// Coordinates in the weight's own layout of flat index `i` of the moved `[channels, k]` matrix.
fn original_index(i: usize, dims: &[usize], axis: Option<usize>) -> Vec<i64> {
    let flat = match axis {
        None => i,
        Some(a) => {
            let (ch, _, inner) = split_at_axis(dims, a);
            let k = dims.iter().product::<usize>() / ch.max(1);
            let (c, r) = (i / k.max(1), i % k.max(1));
            let (o, n) = (r / inner.max(1), r % inner.max(1));
            (o * ch + c) * inner + n
        }
    };
    let mut coords = vec![0i64; dims.len()];
    let mut rest = flat;
    for (d, &n) in coords.iter_mut().zip(dims).rev() {
        *d = (rest % n.max(1)) as i64;
        rest /= n.max(1);
    }
    coords
}

fn int8_channel(scheme: &WeightScheme) -> WeightScheme {
    WeightScheme {
        gptq: scheme.gptq,
        ..WeightScheme::int(8, scheme.symmetric, Granularity::PerChannel, false)
    }
}

#[allow(clippy::too_many_arguments)]
fn quantize_site(
    model: &mut Model,
    site: &WeightSite,
    role: Role,
    policy: &dyn WeightPolicy,
    opset: i64,
    target: Target,
    patch: &mut Patch,
    shared: &mut Shared,
    energy: Option<&importance::ChannelEnergy>,
    // None without calibration data; Some(None) when calibration did not reach this weight.
    hessian: Option<Option<&crate::calib::Hessian>>,
) -> Result<SiteReport> {
    let c = &site.constant;
    let shape = c.shape().to_vec();
    let mut out = SiteReport {
        weight: c.name.clone(),
        op_types: site.uses.iter().map(|u| u.op_type.clone()).collect(),
        role,
        shape: shape.clone(),
        scheme: None,
        label: None,
        form: None,
        bytes_before: c.bytes(),
        bytes_after: c.bytes(),
        weight_sqnr_db: f64::INFINITY,
        sparsity: 0.0,
        outliers: 0,
        note: None,
        vq: None,
    };
    out.op_types.dedup();
    let info = site_info(site, role);
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
    let (values, cast_back) = match readable(model, site, opset)? {
        Ok(r) => r,
        Err(why) => return decline(out, why),
    };
    let mut notes: Vec<String> = Vec::new();
    // Error feedback where the calibration data reached the weight's inputs; to nearest otherwise.
    let hessian = match (scheme.gptq, hessian) {
        (false, _) => None,
        (true, Some(Some(h))) => Some(h),
        (true, found) => {
            // Without --calib one note for the model says so; tables read by Gather have no layer
            // input to compensate over.
            if found.is_some()
                && site
                    .uses
                    .iter()
                    .any(|u| matches!(u.op_type.as_str(), "MatMul" | "Gemm" | "Conv"))
            {
                notes.push(
                    "gptq: no input Hessian for this reader (error feedback takes MatMul, Gemm \
                     and 1-D/2-D Conv of group 1): rounded to nearest"
                        .into(),
                );
            }
            scheme.gptq = false;
            None
        }
    };
    let nbits_candidate = scheme.format == Format::Int
        && scheme.bits == 4
        && matches!(scheme.granularity, Granularity::Block(_))
        && scheme.outliers.is_none()
        && scheme.dead_zone.is_none()
        && !scheme.double_quant;
    // MatMulNBits takes float scales for a float A only.
    if nbits_candidate && target != Target::Portable && cast_back.is_none() && !c.in_subgraph() {
        match matmul_nbits(model, site, &scheme, target, patch, hessian) {
            Ok(done) => {
                scheme.gptq = done.gptq.is_ok();
                if let Err(why) = &done.gptq
                    && !why.is_empty()
                {
                    notes.push(format!("gptq: {why}; rounded to nearest"));
                }
                if !notes.is_empty() {
                    out.note = Some(notes.join("; "));
                }
                out.scheme = Some(scheme);
                out.label = Some(scheme.label());
                out.form = Some(done.form);
                out.bytes_after = done.bytes;
                out.weight_sqnr_db = done.sqnr_db;
                out.sparsity = done.sparsity;
                return Ok(out);
            }
            Err(why) => notes.push(format!("{why}; level-table form instead")),
        }
    }
    let axis = channel_axis(site, &mut scheme, &mut notes);
    if scheme.granularity == Granularity::PerTensor && scheme.gptq {
        scheme.gptq = false;
    }
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let rows = to_rows(values, &dims, axis);
    let vq = scheme.vq_scheme();
    let imp = vq_importance(model, site, rows.k, &scheme, energy, &mut notes);
    // A table read only by Gather along its rows keeps its codes gathered, not decoded whole.
    let readers = row_readers(model, site).filter(|_| matches!(axis, Some(0) | None));
    let mut emit = Emit {
        patch,
        names: &mut model.names,
        opset,
        base: c.name.clone(),
        scope: format!("{:?}", c.path),
    };
    if let Some(v) = vq {
        let readers = readers.as_deref().filter(|_| axis == Some(0));
        return vq_site(
            &mut emit, v, &rows, &dims, axis, imp, hessian, cast_back, readers, notes, out,
        );
    }
    let mut attempt = scheme;
    let (decoded, bytes, form, enc) = loop {
        let mut enc = encode(&rows.values, rows.channels, rows.k, &attempt)
            .map_err(|e| Error::Model(format!("weight '{}': {e}", c.name)))?;
        if let Some(h) = hessian.filter(|_| attempt.gptq) {
            match enc.refine_with_feedback(&rows.values, h, GPTQ_DAMP) {
                Ok(d) if d > GPTQ_DAMP * 1.5 => {
                    notes.push(format!("gptq: the input Hessian needed damping {d}"))
                }
                Ok(_) => {}
                Err(why) => {
                    notes.push(format!("gptq: {why}; rounded to nearest"));
                    attempt.gptq = false;
                }
            }
        }
        let estimate = enc.bytes(emit::slot_bits(enc.bits));
        if estimate >= c.bytes() {
            return decline(
                out,
                format!(
                    "{} would take {estimate} bytes, not fewer than the {} of float",
                    attempt.label(),
                    c.bytes()
                ),
            );
        }
        let plain_int8 = attempt.format == Format::Int
            && attempt.bits == 8
            && !matches!(attempt.granularity, Granularity::Block(_))
            && attempt.outliers.is_none()
            && !attempt.double_quant;
        let by_rows = readers.as_deref().filter(|_| {
            enc.outliers.is_empty() && (plain_int8 || enc.channels == 1 || axis == Some(0))
        });
        let result = match by_rows {
            Some(readers) => rows_form(
                &mut emit, shared, &enc, &dims, plain_int8, readers, cast_back,
            )
            .map(|(bytes, form)| (None, bytes, form)),
            None if plain_int8 => {
                int8_form(&mut emit, &enc, &dims, axis, target).map(|(x, b, f)| (Some(x), b, f))
            }
            None => level_table_form(&mut emit, shared, &enc, &rows, &dims, axis)
                .map(|(x, b, f)| (Some(x), b, f)),
        };
        match result {
            Ok((x, bytes, form)) => break (x, bytes, form, enc),
            Err(why) if !plain_int8 => {
                notes.push(format!("{why}; int8 per-channel instead"));
                attempt = int8_channel(&attempt);
            }
            Err(why) => return decline(out, why),
        }
    };
    if let Some(decoded) = decoded {
        let decoded = match cast_back {
            Some(d) => emit.cast(&decoded, d),
            None => decoded,
        };
        emit.patch.replace_all_uses(&c.name, &decoded);
    }
    out.scheme = Some(attempt);
    out.label = Some(attempt.label());
    out.form = Some(form);
    out.bytes_after = bytes;
    out.weight_sqnr_db = enc.sqnr_db;
    out.sparsity = enc.sparsity;
    out.outliers = enc.outliers.len();
    if !notes.is_empty() {
        out.note = Some(notes.join("; "));
    }
    Ok(out)
}

/// A vector-quantized site: encode, refuse when it saves nothing, emit the codebook form (and the
/// outlier path), and fill in the report.
#[allow(clippy::too_many_arguments)]
fn vq_site(
    emit: &mut Emit,
    v: VqScheme,
    rows: &Rows,
    dims: &[usize],
    axis: Option<usize>,
    imp: Option<Vec<f32>>,
    hessian: Option<&crate::calib::Hessian>,
    cast_back: Option<DataType>,
    readers: Option<&[RowReader]>,
    mut notes: Vec<String>,
    mut out: SiteReport,
) -> Result<SiteReport> {
    if v.outliers.is_some() && emit.opset < 11 {
        out.note = Some(format!(
            "the outlier path (ScatterND) needs opset 11, the model has {}",
            emit.opset
        ));
        return Ok(out);
    }
    let mut enc = vq::encode(&rows.values, rows.channels, rows.k, &v, imp.as_deref())
        .map_err(|e| Error::Model(format!("weight '{}': {e}", out.weight)))?;
    let mut fed = false;
    if let Some(h) = hessian {
        match crate::quant::vq_feedback::refine(&mut enc, &rows.values, h, VQ_DAMP, VQ_ROUNDS) {
            Ok(r) => {
                fed = r.nsr < r.plain_nsr;
                notes.push(format!(
                    "gptq: layer output SQNR {:.2} → {:.2} dB on the fitted data",
                    -10.0 * r.plain_nsr.log10(),
                    -10.0 * r.nsr.log10()
                ));
            }
            Err(why) => notes.push(format!("gptq: {why}; plain clustering")),
        }
    }
    if enc.bytes() >= out.bytes_before {
        out.note = Some(format!(
            "{} would take {} bytes, not fewer than the {} of float",
            v.label(),
            enc.bytes(),
            out.bytes_before
        ));
        return Ok(out);
    }
    let by_rows = readers.filter(|_| enc.outliers.is_empty());
    if let Some(readers) = by_rows {
        let (table, bytes) = match emit.vq_rows(&enc, dims) {
            Ok(done) => done,
            Err(why) => {
                out.note = Some(why);
                return Ok(out);
            }
        };
        emit_row_readers(emit, &table, readers, cast_back);
        return Ok(vq_report(out, v, fed, &enc, rows, bytes, notes, true));
    }
    let (mut x, mut bytes) = match emit.vq_lookup(&enc, &rows.moved_dims, rows.perm.as_deref()) {
        Ok(done) => done,
        Err(why) => {
            out.note = Some(why);
            return Ok(out);
        }
    };
    if !enc.outliers.is_empty() {
        let (y, b) = emit
            .outliers(&x, &enc.outliers, dims.len(), |i| {
                original_index(i, dims, axis)
            })
            .map_err(Error::Model)?;
        x = y;
        bytes += b;
    }
    if let Some(d) = cast_back {
        x = emit.cast(&x, d);
    }
    emit.patch.replace_all_uses(&out.weight, &x);
    Ok(vq_report(out, v, fed, &enc, rows, bytes, notes, false))
}

/// The report of a vector-quantized site.
#[allow(clippy::too_many_arguments)]
fn vq_report(
    mut out: SiteReport,
    v: VqScheme,
    fed: bool,
    enc: &vq::VqEncoded,
    rows: &Rows,
    bytes: u64,
    notes: Vec<String>,
    by_rows: bool,
) -> SiteReport {
    let mut form = format!(
        "Gather(codebook {}×{}, {}-bit codes)·Mul",
        enc.codebook_size,
        enc.dim,
        8 * enc.code_bytes()
    );
    if by_rows {
        form += ", rows gathered as codes";
    }
    if enc.stages > 1 {
        form += &format!(", {} residual stages", enc.stages);
    }
    if enc.subspaces > 1 {
        form += &format!(", {} subspaces", enc.subspaces);
    }
    if !enc.outliers.is_empty() {
        form += &format!(" + ScatterND({} outliers)", enc.outliers.len());
    }
    let scheme = WeightScheme {
        gptq: fed,
        ..WeightScheme::vq(v)
    };
    out.scheme = Some(scheme);
    out.label = Some(scheme.label());
    out.form = Some(form);
    out.bytes_after = bytes;
    out.weight_sqnr_db = enc.sqnr_db;
    out.sparsity = 0.0;
    out.outliers = enc.outliers.len();
    out.vq = Some(VqSiteReport {
        bits_per_weight: bytes as f64 * 8.0 / (rows.channels * rows.k).max(1) as f64,
        weighted_by_data: enc.weighted_by_data,
        codebooks: enc.stats.clone(),
    });
    if !notes.is_empty() {
        out.note = Some(notes.join("; "));
    }
    out
}

/// The stored bytes of 8-bit codes: level index → int8 for symmetric (index − 128), the index itself
/// for uint8 (asymmetric).
fn stored_int8(enc: &Encoded) -> Vec<u8> {
    if enc.zero_points.is_none() {
        enc.codes
            .iter()
            .map(|&u| (u as i32 - 128) as i8 as u8)
            .collect()
    } else {
        enc.codes.clone()
    }
}

/// int8 per channel or per tensor as DequantizeLinear or Cast·Mul (see the module docs).
fn int8_form(
    emit: &mut Emit,
    enc: &Encoded,
    dims: &[usize],
    axis: Option<usize>,
    target: Target,
) -> std::result::Result<(String, u64, String), String> {
    let symmetric = enc.zero_points.is_none();
    let moved = stored_int8(enc);
    let codes = from_rows(&moved, dims, axis);
    let shape: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let dt = if symmetric {
        DataType::Int8
    } else {
        DataType::Uint8
    };
    let zps: Vec<u8> = enc
        .zero_points
        .clone()
        .unwrap_or_else(|| vec![0; enc.scales.len()]);
    let bytes =
        codes.len() as u64 + enc.scales.len() as u64 * 4 + (!symmetric as u64) * zps.len() as u64;
    let kind = if axis.is_some() {
        "per-channel"
    } else {
        "per-tensor"
    };
    let axis_note = axis.map(|a| format!(", axis {a}")).unwrap_or_default();
    // DequantizeLinear: per tensor from opset 10, with `axis` from 13.
    let dq_opset = if axis.is_some() { 13 } else { 10 };
    if target == Target::Portable && emit.opset >= dq_opset {
        let zdims: Vec<i64> = if axis.is_some() {
            vec![zps.len() as i64]
        } else {
            vec![]
        };
        let x = emit.dequantize_linear(
            tensor(dt, &shape, codes),
            &enc.scales,
            tensor(dt, &zdims, zps),
            axis,
        );
        return Ok((
            x,
            bytes,
            format!("DequantizeLinear(int8 {kind}{axis_note})"),
        ));
    }
    if emit.opset < 7 {
        return Err(format!(
            "Cast·Mul needs opset 7 (broadcasting Mul), the model has {}",
            emit.opset
        ));
    }
    let zf: Option<Vec<f32>> = (!symmetric).then(|| zps.iter().map(|&z| z as f32).collect());
    let x = emit.cast_mul(
        tensor(dt, &shape, codes),
        dims.len(),
        &enc.scales,
        zf.as_deref(),
        axis,
    );
    let why = if target == Target::Portable {
        format!("; opset {} < {dq_opset}", emit.opset)
    } else {
        String::new()
    };
    Ok((x, bytes, format!("Cast·Mul(int8 {kind}{axis_note}{why})")))
}

/// A table read only by Gather (see [`row_readers`]): its codes stay compressed and each reader
/// gathers its rows as codes, then decodes them (int8 as Cast·Mul in every target, anything else
/// through the level table). Returns the bytes of the site's constants and the form.
fn rows_form(
    emit: &mut Emit,
    shared: &mut Shared,
    enc: &Encoded,
    dims: &[usize],
    plain_int8: bool,
    readers: &[RowReader],
    cast_back: Option<DataType>,
) -> std::result::Result<(u64, String), String> {
    let (table, bytes, form) = if plain_int8 {
        if emit.opset < 7 {
            return Err(format!(
                "Cast·Mul needs opset 7 (broadcasting Mul), the model has {}",
                emit.opset
            ));
        }
        let codes = stored_int8(enc);
        let kind = if enc.channels > 1 {
            "per-row"
        } else {
            "per-tensor"
        };
        let (t, b) = emit.int8_rows(enc, codes, dims);
        (t, b, format!("Gather(int8 {kind} rows)·Cast·Mul"))
    } else {
        // One scale for the whole table: laid out per row all the same, each row its own group.
        let per_row;
        let enc = if enc.channels == 1 && dims[0] > 1 {
            let v = dims[0];
            per_row = Encoded {
                channels: v,
                k: enc.k / v,
                group: enc.k / v,
                scales: vec![enc.scales[0]; v],
                zero_points: enc.zero_points.as_ref().map(|z| vec![z[0]; v]),
                double: None,
                codes: enc.codes.clone(),
                levels: enc.levels.clone(),
                outliers: Vec::new(),
                ..*enc
            };
            &per_row
        } else {
            enc
        };
        let (t, b) = emit.level_rows(shared, enc, dims)?;
        let slot = emit::slot_bits(enc.bits);
        let mut form = format!("Gather({slot}-bit rows)·Gather(levels)·Mul");
        if enc.double.is_some() {
            form += " with 8-bit scales";
        }
        (t, b, form)
    };
    emit_row_readers(emit, &table, readers, cast_back);
    Ok((bytes, form))
}

/// Any encoding as the level-table form, with the outlier path when there are outliers.
fn level_table_form(
    emit: &mut Emit,
    shared: &mut Shared,
    enc: &Encoded,
    rows: &Rows,
    dims: &[usize],
    axis: Option<usize>,
) -> std::result::Result<(String, u64, String), String> {
    if !enc.outliers.is_empty() && emit.opset < 11 {
        return Err(format!(
            "the outlier path (ScatterND) needs opset 11, the model has {}",
            emit.opset
        ));
    }
    let (mut x, mut bytes) =
        emit.level_table(shared, enc, &rows.moved_dims, rows.perm.as_deref())?;
    if !enc.outliers.is_empty() {
        let (y, b) = emit.outliers(&x, &enc.outliers, dims.len(), |i| {
            original_index(i, dims, axis)
        })?;
        x = y;
        bytes += b;
    }
    let slot = emit::slot_bits(enc.bits);
    let mut form = format!("Gather(levels, {slot}-bit slots)·Mul");
    if enc.double.is_some() {
        form += " with 8-bit scales";
    }
    if !enc.outliers.is_empty() {
        form += &format!(" + ScatterND({} outliers)", enc.outliers.len());
    }
    Ok((x, bytes, form))
}

struct NBitsDone {
    form: String,
    bytes: u64,
    sqnr_db: f64,
    sparsity: f64,
    /// Whether the codes were chosen with error feedback, or why not.
    gptq: Result<(), String>,
}

/// Replaces every MatMul reading the weight by com.microsoft MatMulNBits over shared packed 4-bit
/// blocks. Errs (changing nothing) with the reason when the site or the target does not allow it.
fn matmul_nbits(
    model: &mut Model,
    site: &WeightSite,
    scheme: &WeightScheme,
    target: Target,
    patch: &mut Patch,
    hessian: Option<&crate::calib::Hessian>,
) -> std::result::Result<NBitsDone, String> {
    let gptq = scheme.gptq;
    let scheme = &scheme.int_scheme();
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
        .any(|u| !matches!(u.op_type.as_str(), "MatMul" | "Gemm") || u.input != 1 || u.subgraph)
    {
        return Err(
            "MatMulNBits replaces MatMul and Gemm B only, and this weight has other readers".into(),
        );
    }
    if site.readers != site.uses.len() {
        return Err("the weight is also read outside a weight slot".into());
    }
    let g = &model.graph;
    let mut consumers = Vec::new();
    let mut transposed = None;
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
            return Err(format!(
                "{} '{}' lacks an input or output",
                u.op_type, u.node
            ));
        };
        if g.is_output(y) {
            return Err(format!(
                "the output of {} '{}' is a graph output",
                u.op_type, u.node
            ));
        }
        // Gemm: Y = A·B (B [K, N]) or A·Bᵀ (transB, B [N, K]), plus C; only alpha = beta = 1 and
        // an untransposed A map onto MatMulNBits and an Add.
        let mut bias = None;
        let trans_b = if u.op_type == "Gemm" {
            let float = |n: &str| node.attribute(n).and_then(|a| a.f).unwrap_or(1.0);
            if node.int_attribute("transA").unwrap_or(0) != 0 {
                return Err(format!("Gemm '{}' transposes A", u.node));
            }
            if float("alpha") != 1.0 || (node.input(2).is_some() && float("beta") != 1.0) {
                return Err(format!("Gemm '{}' scales by alpha or beta", u.node));
            }
            bias = node.input(2).map(|c| g.value_name(c).to_string());
            node.int_attribute("transB").unwrap_or(0) != 0
        } else {
            false
        };
        if transposed.replace(trans_b).is_some_and(|t| t != trans_b) {
            return Err("its readers disagree on whether B is transposed".into());
        }
        consumers.push((
            *id,
            g.value_name(a).to_string(),
            g.value_name(y).to_string(),
            node.name.clone(),
            bias,
        ));
    }
    let transposed = transposed.unwrap_or(false);
    let (k, n) = match c.shape() {
        [k, n] if !transposed => (*k as usize, *n as usize),
        [n, k] => (*k as usize, *n as usize),
        _ => {
            return Err(format!(
                "MatMulNBits needs a 2-D B, this is {:?}",
                c.shape()
            ));
        }
    };
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
    let values = to_f32(&c.tensor).map_err(|e| format!("weight {e}"))?;
    // [K, N] → rows of B^T: [N, K] (a transposed Gemm B already is).
    let wt = if transposed {
        values
    } else {
        let mut wt = vec![0f32; values.len()];
        for (i, row) in values.chunks(n).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                wt[j * k + i] = v;
            }
        }
        wt
    };
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
    let feedback = match hessian.filter(|_| gptq) {
        Some(h) => crate::quant::int::refine_with_feedback(&wt, &mut q, h, GPTQ_DAMP).map(|_| ()),
        None => Err(String::new()),
    };
    let deq = q.dequantize();
    let sqnr_db = sqnr_db(&wt, &deq);
    let sparsity = deq.iter().filter(|v| **v == 0.0).count() as f64 / deq.len().max(1) as f64;
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
    for (id, a, y, node_name, bias) in &consumers {
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
        let out = match bias {
            Some(c) => patch
                .node(
                    names,
                    &format!("{node_name}_bias"),
                    "Add",
                    "",
                    &[Some(out[0].as_str()), Some(c.as_str())],
                    1,
                    vec![],
                )
                .remove(0),
            None => out.into_iter().next().expect("one output"),
        };
        patch.replace_all_uses(y, &out);
        patch.remove_node(*id);
    }
    let bytes = packed.len() as u64
        + q.scales.len() as u64 * 4
        + q.zero_points.as_ref().map_or(0, |z| z.len() as u64 / 2);
    Ok(NBitsDone {
        gptq: feedback,
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
        sparsity,
    })
}
