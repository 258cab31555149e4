//! Activation quantization: integer matrix products for MatMul, Gemm and Conv.
//!
//! - **Static W8A8** ([`Mode::Static`]): each quantized activation tensor gets one
//!   `QuantizeLinear → DequantizeLinear` pair (u8, one scale and zero point from calibration) shared by
//!   its quantized readers; weights become int8 symmetric per output channel behind a
//!   `DequantizeLinear` (per tensor below opset 13, where an integer Conv is written as QLinearConv
//!   with per-channel weight scales instead); Conv/Gemm biases become int32 with scale `s_x·s_w`. The
//!   outputs of the op types the policy names are quantized too (every reader then reads the pair),
//!   which is what lets onnxruntime fuse a group into QLinearConv/QLinearMatMul; a Conv whose output
//!   stays float stays float altogether. A MatMul with float output becomes MatMulIntegerToFloat.
//! - **Dynamic int8** ([`Mode::Dynamic`]): `DynamicQuantizeLinear` per activation tensor (shared), then
//!   `MatMulInteger` (int8 weights) or `ConvInteger` (uint8 weights, zero point 128) → `Cast` →
//!   `Mul(s_x·s_w)` (→ `Add` bias): the pattern onnxruntime fuses into DynamicQuantizeMatMul, and that
//!   tract runs on its integer kernels. No calibration data.
//!
//! Saturation: on x86 CPUs without VNNI, onnxruntime multiplies u8 activations by s8 weights with
//! `vpmaddubsw`, which adds each pair of neighbouring products along the reduction axis in a saturating
//! 16-bit lane: `|a₀w₀ + a₁w₁|` may exceed 32767 when two neighbouring weights of one sign are both
//! large (255·127·2 = 64770). Measured with onnxruntime 1.31 on AVX2: the fused MatMul/Gemm forms
//! (static and dynamic) and QLinearConv saturate; ConvInteger (u8 weights) and depthwise QLinearConv do
//! not. [`fix_saturation`] finds the output channels where a pair could overflow and widens only their
//! scale until none can; other channels keep their full 8-bit precision. With calibration data the
//! bound reads the codes the data gave ([`crate::calib::CodeProfile`]: each channel's largest code and
//! each neighbouring pair's largest sum), else any u8 code.

pub mod smooth;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::roles::Role;
use crate::calib::{Calibration, Method, Range, Retention};
use crate::error::{Error, Result};
use crate::ir::{ConstantSource, Model, NodeId, Patch, constants};
use crate::onnx::dtype::DataType;
use crate::onnx::pb::{AttributeProto, TensorProto};
use crate::onnx::tensor::to_f32;
use crate::passes::quantize_weights::Target;
use crate::passes::quantize_weights::emit::{attr_int, f32_tensor, tensor};
use crate::quant::int::{Granularity, IntScheme, quantize, sqnr_db};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Static,
    Dynamic,
}

/// Which sites to leave float, by the reading node, its op type, the activation tensor's name, the
/// node's role or its position among the sites (`first`, `last`).
#[derive(Clone, Debug, Default)]
pub struct Exclusion {
    pub ops: Option<Vec<String>>,
    pub node: Option<crate::recipes::Pattern>,
    pub tensor: Option<crate::recipes::Pattern>,
    pub roles: Option<Vec<Role>>,
    pub position: Option<Position>,
    /// Where the exclusion came from (for the report).
    pub origin: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    First,
    Last,
}

/// Whether to guard u8·s8 products against 16-bit saturation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Saturation {
    /// Widen the scale of the output channels that could saturate (not for `--target tract`, whose
    /// integer kernels accumulate in 32 bits): for the codes calibration data gave, where there is
    /// some, else for any u8 code.
    Fix,
    /// Widen for any u8 code, whatever the data.
    Strict,
    Ignore,
}

/// What a site's saturation guard assumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SaturationBound {
    /// No guard: the policy ignores saturation, the target's kernels accumulate in 32 bits, or the
    /// form's onnxruntime kernel does not saturate (ConvInteger, depthwise QLinearConv).
    Unguarded,
    /// The largest codes calibration saw, per channel and per neighbouring pair.
    Calibrated,
    /// Any u8 code on every channel.
    AnyInput,
}

/// The largest u8 code each reduction index of a weight row may meet, and (for neighbouring pairs)
/// their largest sum; what [`fix_saturation`] bounds products with.
#[derive(Clone, Debug, PartialEq)]
pub struct CodeBound {
    /// Per reduction index of a weight row (length k).
    pub index: Vec<i32>,
    /// Per pair `(2i, 2i+1)` of indices: the largest sum of their codes.
    pub pair: Vec<i32>,
    /// Whether the kernel adds neighbouring products (MatMul/Gemm), or any two (Conv, whose packing
    /// order differs).
    pub pairs: bool,
}

impl CodeBound {
    /// Any u8 code everywhere.
    pub fn any(k: usize, pairs: bool) -> CodeBound {
        CodeBound {
            index: vec![255; k],
            pair: (0..k.div_ceil(2))
                .map(|i| if 2 * i + 1 < k { 510 } else { 255 })
                .collect(),
            pairs,
        }
    }

    /// The larger of two bounds, index by index.
    fn max(&mut self, other: &CodeBound) {
        for (a, b) in self.index.iter_mut().zip(&other.index) {
            *a = (*a).max(*b);
        }
        for (a, b) in self.pair.iter_mut().zip(&other.pair) {
            *a = (*a).max(*b);
        }
    }
}

/// The compiled `activations:` section of a recipe.
#[derive(Clone, Debug)]
pub struct ActivationPolicy {
    pub mode: Mode,
    /// Op types whose activation inputs are quantized (MatMul, Gemm, Conv).
    pub ops: Vec<String>,
    pub method: Method,
    /// u8 with zero point 128 and a symmetric range, instead of an asymmetric zero point.
    pub symmetric: bool,
    /// Op types whose outputs are quantized too (static only).
    pub outputs: Vec<String>,
    /// Quantize MatMuls of two activations (attention scores) as well.
    pub activation_matmul: bool,
    pub exclude: Vec<Exclusion>,
    /// Activation tensors whose own SQNR under their range is below this stay float.
    pub min_sqnr_db: f64,
    /// Sites whose int8 weight's SQNR is below this stay float (their weights then go to the weight
    /// rules).
    pub min_weight_sqnr_db: f64,
    /// After building, the output cosine on the calibration data must reach this, else the worst
    /// tensors go back to float until it does (counted from the model with every activation float
    /// when that one misses it already).
    pub min_cosine: Option<f64>,
    /// Likewise the top-1 agreement of outputs that look like class scores.
    pub min_top1: Option<f64>,
    pub saturation: Saturation,
    /// Static: move each input channel's range between activation and weight by the factor
    /// `max|X_j|^α / max|W_j|^(1−α)` before calibrating ([`smooth`]).
    pub smooth: Option<smooth::Strength>,
    /// Choose the int8 weight codes by error-compensating rounding against the calibration data's
    /// input Hessian ([`crate::quant::gptq`]) where calibration gives one.
    pub gptq: bool,
    /// Fold per-channel affine ops after a Conv into its weight and bias before anything else
    /// ([`crate::passes::FoldAffine`]), and hard-swish chains into `HardSigmoid`
    /// ([`crate::passes::FuseHardSwish`]).
    pub fold: bool,
    /// Dynamic mode: Conv sites become ConvInteger for targets other than tract too.
    pub conv_integer: bool,
}

impl Default for ActivationPolicy {
    fn default() -> Self {
        ActivationPolicy {
            mode: Mode::Static,
            ops: vec!["MatMul".into(), "Gemm".into(), "Conv".into()],
            method: Method::Percentile { percentile: 99.999 },
            symmetric: false,
            outputs: vec!["Conv".into()],
            activation_matmul: false,
            exclude: Vec::new(),
            min_sqnr_db: 20.0,
            min_weight_sqnr_db: 30.0,
            min_cosine: Some(0.995),
            min_top1: Some(0.998),
            saturation: Saturation::Fix,
            smooth: None,
            gptq: false,
            fold: true,
            conv_integer: false,
        }
    }
}

/// How a weight is laid out for its reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Layout {
    /// `[K, N]` (MatMul B, Gemm B without transB): channels along axis 1.
    KN,
    /// `[N, K]` (Gemm B with transB): channels along axis 0.
    NK,
    /// `[M, C/g, k…]` (Conv W): channels along axis 0, the rest reduced.
    Conv,
}

impl Layout {
    fn axis(self) -> usize {
        match self {
            Layout::KN => 1,
            _ => 0,
        }
    }
}

/// One node whose products become integer.
#[derive(Clone, Debug)]
pub struct Site {
    pub node: NodeId,
    pub name: String,
    pub op_type: String,
    pub role: Role,
    /// (input slot, tensor) of each activation input.
    pub activations: Vec<(usize, String)>,
    /// (input slot, constant name) of the weight.
    pub weight: Option<(usize, String)>,
    layout: Layout,
    /// (input slot, constant name) of a 1-D bias.
    pub bias: Option<(usize, String)>,
    /// The output to quantize as well (static).
    pub output: Option<String>,
}

/// What happened to one site.
#[derive(Clone, Debug, Serialize)]
pub struct SiteReport {
    pub node: String,
    pub op_type: String,
    pub role: Role,
    pub activations: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<String>,
    /// The graph form written, or None when the site stayed float.
    pub form: Option<String>,
    #[serde(serialize_with = "crate::report::ser_db")]
    pub weight_sqnr_db: f64,
    /// Output channels whose scale was widened against u8·s8 saturation.
    pub saturation_channels: usize,
    /// What the saturation guard assumed of the activation codes.
    pub saturation_bound: SaturationBound,
    /// Whether the weight codes came from error-compensating rounding.
    pub gptq: bool,
    /// The float weight's bytes and its integer form's (codes and scales); 0 and 0 for a weight an
    /// earlier site already stored.
    pub bytes_before: u64,
    pub bytes_after: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One calibrated activation tensor.
#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub min: f32,
    pub max: f32,
    pub range: Range,
    pub scale: f32,
    pub zero_point: u8,
    /// The tensor's own SQNR under its 8-bit range, from the calibration histogram.
    #[serde(serialize_with = "crate::report::ser_db")]
    pub sqnr_db: f64,
    /// The output retention with only this tensor's sites integer (measured when the fallback ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alone: Option<Retention>,
    pub quantized: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ActivationReport {
    pub mode: Mode,
    pub method: String,
    pub sites: Vec<SiteReport>,
    pub tensors: Vec<TensorReport>,
    pub quantized: usize,
    pub float: usize,
    /// Bytes of the integer sites' weights, float and integer.
    pub weight_bytes_before: u64,
    pub weight_bytes_after: u64,
    /// Output cosine on the calibration data, each time the fallback check measured it.
    pub checks: Vec<FallbackCheck>,
    /// Groups of tensors and weights smoothed before calibration (static with `smooth`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub smoothing: Vec<smooth::SmoothReport>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FallbackCheck {
    pub float_tensors: usize,
    pub retention: Retention,
}

pub(crate) fn is_std(domain: &str) -> bool {
    matches!(domain, "" | "ai.onnx")
}

/// Exporters tie repeated layers' weights through `Identity` nodes: the outputs of such chains, each
/// with the constant (by `is_const`) it passes on.
fn tie_aliases(g: &crate::ir::Graph, is_const: impl Fn(&str) -> bool) -> HashMap<String, String> {
    let mut alias: HashMap<String, String> = HashMap::new();
    for (_, n) in g.nodes() {
        if n.op_type == "Identity"
            && is_std(&n.domain)
            && let (Some(i), Some(Some(o))) = (n.input(0), n.outputs().first())
        {
            let src = g.value_name(i).to_string();
            let src = alias.get(&src).cloned().unwrap_or(src);
            if is_const(&src) {
                alias.insert(g.value_name(*o).to_string(), src);
            }
        }
    }
    alias
}

/// The dense constants of the main graph by name: what a site's weight can be.
pub(crate) fn main_graph_constants(model: &Model) -> HashMap<String, crate::ir::ConstantRef> {
    constants(model)
        .into_iter()
        .filter(|c| !c.in_subgraph() && c.source != ConstantSource::SparseInitializer)
        .map(|c| (c.name.clone(), c))
        .collect()
}

/// Finds the sites of the main graph the policy quantizes; the others come back with why not.
pub fn plan(model: &Model, policy: &ActivationPolicy) -> (Vec<Site>, Vec<SiteReport>) {
    let g = &model.graph;
    let consts = main_graph_constants(model);
    let alias = tie_aliases(g, |n| consts.contains_key(n));
    let resolve = |name: String| alias.get(&name).cloned().unwrap_or(name);
    let is_float_const = |name: &str, rank: Option<usize>| {
        consts.get(name).is_some_and(|c| {
            c.dtype() == Some(DataType::Float) && rank.is_none_or(|r| c.shape().len() == r)
        })
    };
    let weighted = super::roles::weighted_nodes(g);
    let mut sites = Vec::new();
    let mut declined = Vec::new();
    for (id, n) in g.nodes() {
        if !is_std(&n.domain) || !policy.ops.iter().any(|o| o == &n.op_type) {
            continue;
        }
        let name_of = |i: usize| n.input(i).map(|v| g.value_name(v).to_string());
        let (a, b) = (name_of(0), name_of(1).map(resolve));
        let (Some(a), Some(b)) = (a, b) else { continue };
        let mut site = Site {
            node: id,
            name: n.name.clone(),
            op_type: n.op_type.clone(),
            role: Role::Other,
            activations: vec![(0, a.clone())],
            weight: None,
            layout: Layout::KN,
            bias: None,
            output: None,
        };
        let mut why = None;
        match n.op_type.as_str() {
            "MatMul" => {
                if is_float_const(&b, Some(2)) {
                    site.weight = Some((1, b.clone()));
                } else if policy.activation_matmul && !consts.contains_key(&b) {
                    site.activations.push((1, b.clone()));
                } else {
                    continue;
                }
            }
            "Gemm" => {
                if n.int_attribute("transA").unwrap_or(0) != 0 {
                    why = Some("Gemm with transA".to_string());
                } else if !is_float_const(&b, Some(2)) {
                    continue;
                }
                site.weight = Some((1, b.clone()));
                site.layout = if n.int_attribute("transB").unwrap_or(0) != 0 {
                    Layout::NK
                } else {
                    Layout::KN
                };
                let alpha = float_attr(n, "alpha").unwrap_or(1.0);
                let beta = float_attr(n, "beta").unwrap_or(1.0);
                if let Some(c) = name_of(2).map(resolve) {
                    if is_float_const(&c, Some(1)) && alpha == 1.0 && beta == 1.0 {
                        site.bias = Some((2, c));
                    } else if policy.mode == Mode::Dynamic {
                        why = Some("Gemm with a non-constant or scaled C".into());
                    }
                }
                if policy.mode == Mode::Dynamic && alpha != 1.0 {
                    why = Some(format!("Gemm with alpha {alpha}"));
                }
            }
            "Conv" => {
                if !is_float_const(&b, None) || consts.get(&b).is_none_or(|c| c.shape().len() < 3) {
                    continue;
                }
                site.weight = Some((1, b.clone()));
                site.layout = Layout::Conv;
                if let Some(c) = name_of(2).map(resolve) {
                    if is_float_const(&c, Some(1)) {
                        site.bias = Some((2, c));
                    } else {
                        why = Some("Conv with a non-constant bias".into());
                    }
                }
            }
            _ => continue,
        }
        // Activation inputs must be float values computed by the graph (or graph inputs).
        for (_, t) in &site.activations {
            let v = g.value_id(t);
            let float = v.is_some_and(|v| {
                g.info_of(v)
                    .and_then(|i| i.r#type.as_ref())
                    .and_then(|t| match &t.value {
                        Some(crate::onnx::pb::type_proto::Value::TensorType(tt)) => {
                            Some(tt.elem_type == DataType::Float as i32)
                        }
                        _ => None,
                    })
                    .unwrap_or(true)
            });
            if !float || consts.contains_key(t) {
                why = Some(format!("input '{t}' is not a float activation"));
            }
        }
        site.role = {
            let readers = [(n.name.as_str(), n.op_type.as_str())];
            let by_name =
                super::roles::classify(site.weight.as_ref().map_or("", |w| w.1.as_str()), &readers);
            super::roles::structural(g, &[id], &weighted, by_name)
        };
        if policy.mode == Mode::Static
            && policy.outputs.iter().any(|o| o == &n.op_type)
            && let Some(Some(out)) = n.outputs().first()
        {
            let out = rectified(g, *out, &consts)
                .filter(|&r| !g.is_output(r))
                .unwrap_or(*out);
            if !g.is_output(out) && !g.value(out).uses().is_empty() {
                site.output = Some(g.value_name(out).to_string());
            }
        }
        if policy.mode == Mode::Dynamic
            && n.outputs()
                .first()
                .copied()
                .flatten()
                .is_some_and(|o| g.is_output(o))
        {
            why = Some("its output is a graph output (the integer form renames it)".into());
        }
        match why {
            Some(w) => declined.push(float_site(&site, w)),
            None => sites.push(site),
        }
    }
    // Exclusions, with positions over the sites found.
    let last = sites.len().saturating_sub(1);
    let mut kept = Vec::new();
    for (i, s) in sites.into_iter().enumerate() {
        let hit = policy.exclude.iter().find(|e| {
            e.ops.as_ref().is_none_or(|o| o.contains(&s.op_type))
                && e.node.as_ref().is_none_or(|p| p.matches(&s.name))
                && e.tensor
                    .as_ref()
                    .is_none_or(|p| s.activations.iter().any(|(_, t)| p.matches(t)))
                && e.roles.as_ref().is_none_or(|r| r.contains(&s.role))
                && e.position.is_none_or(|p| match p {
                    Position::First => i == 0,
                    Position::Last => i == last,
                })
        });
        match hit {
            Some(e) => declined.push(float_site(&s, format!("excluded by {}", e.origin))),
            None => kept.push(s),
        }
    }
    (kept, declined)
}

/// The output of the `Relu` (or `Clip` from 0) that alone reads `v`: quantizing there rather than at
/// `v` gives the range's lower half to nothing the model keeps, and lets onnxruntime drop the
/// activation into the product (it removes a Relu or Clip whose range the `QuantizeLinear` after it
/// already clamps to).
fn rectified(
    g: &crate::ir::Graph,
    v: crate::ir::ValueId,
    consts: &HashMap<String, crate::ir::ConstantRef>,
) -> Option<crate::ir::ValueId> {
    let [u] = g.value(v).uses() else { return None };
    if g.is_output(v) || u.slot != crate::ir::Slot::Input(0) {
        return None;
    }
    let n = g.node(u.node);
    if !is_std(&n.domain) {
        return None;
    }
    let from_zero = match n.op_type.as_str() {
        "Relu" => true,
        "Clip" => match n.input(1) {
            Some(m) => consts
                .get(g.value_name(m))
                .and_then(|c| to_f32(&c.tensor).ok())
                .is_some_and(|v| v.len() == 1 && v[0] == 0.0),
            // Before opset 11 the bounds are attributes (min defaults to the lowest float).
            None => n.inputs().len() == 1 && float_attr(n, "min") == Some(0.0),
        },
        _ => false,
    };
    if !from_zero {
        return None;
    }
    n.outputs().first().copied().flatten()
}

fn float_attr(n: &crate::ir::Node, name: &str) -> Option<f32> {
    n.attribute(name).and_then(|a| a.f)
}

fn float_site(s: &Site, why: String) -> SiteReport {
    SiteReport {
        node: s.name.clone(),
        op_type: s.op_type.clone(),
        role: s.role,
        activations: s.activations.iter().map(|(_, t)| t.clone()).collect(),
        weight: s.weight.as_ref().map(|w| w.1.clone()),
        form: None,
        weight_sqnr_db: f64::NAN,
        saturation_channels: 0,
        saturation_bound: SaturationBound::Unguarded,
        gptq: false,
        bytes_before: 0,
        bytes_after: 0,
        note: Some(why),
    }
}

/// The input Hessians error-compensating rounding of the sites' weights needs: one request per
/// weight (summing the inputs of every site that reads it). MatMul reads rows along A's last axis,
/// Gemm along A's axis 1 (0 with transA), Conv (1-D/2-D) its input patches.
pub fn hessian_requests(model: &Model, sites: &[Site]) -> Vec<crate::calib::HessianRequest> {
    let mut out: BTreeMap<String, crate::calib::HessianRequest> = BTreeMap::new();
    let consts: HashMap<String, Vec<i64>> = constants(model)
        .into_iter()
        .filter(|c| !c.in_subgraph())
        .map(|c| (c.name, c.tensor.dims.clone()))
        .collect();
    for site in sites {
        let (Some((_, wname)), Some((0, x))) = (&site.weight, site.activations.first()) else {
            continue;
        };
        let Some(dims) = consts.get(wname) else {
            continue;
        };
        let node = model.graph.node(site.node);
        let (k, axis, conv) = match (site.op_type.as_str(), site.layout, dims.as_slice()) {
            ("MatMul", Layout::KN, [k, _]) => (*k, -1, None),
            ("Gemm", Layout::KN | Layout::NK, [a, b]) => (
                if site.layout == Layout::KN { *a } else { *b },
                if node.int_attribute("transA").unwrap_or(0) != 0 {
                    0
                } else {
                    1
                },
                None,
            ),
            ("Conv", Layout::Conv, [_, rest @ ..])
                if node.int_attribute("group").unwrap_or(1) == 1 =>
            {
                let Some(g) =
                    crate::passes::quantize_weights::importance::conv_geometry(node, &dims[2..])
                else {
                    continue;
                };
                (rest.iter().product(), 1, Some(g))
            }
            _ => continue,
        };
        let r = out
            .entry(wname.clone())
            .or_insert_with(|| crate::calib::HessianRequest {
                key: wname.clone(),
                k: k.max(0) as usize,
                sources: Vec::new(),
            });
        let src = crate::calib::HessianSource {
            tensor: x.clone(),
            axis,
            conv,
        };
        if !r.sources.contains(&src) {
            r.sources.push(src);
        }
    }
    out.into_values().collect()
}

/// The tensors calibration must see for these sites: activation inputs and quantized outputs.
pub fn tensors_to_calibrate(sites: &[Site]) -> Vec<String> {
    let mut set = BTreeSet::new();
    for s in sites {
        for (_, t) in &s.activations {
            set.insert(t.clone());
        }
        if let Some(o) = &s.output {
            set.insert(o.clone());
        }
    }
    set.into_iter().collect()
}

/// A weight as a `[channels, k]` matrix, k in the reduction order of its reader.
fn to_rows(w: &[f32], dims: &[i64], layout: Layout) -> (Vec<f32>, usize, usize) {
    match layout {
        Layout::KN => {
            let (k, n) = (dims[0] as usize, dims[1] as usize);
            let mut out = vec![0f32; w.len()];
            for r in 0..k {
                for c in 0..n {
                    out[c * k + r] = w[r * n + c];
                }
            }
            (out, n, k)
        }
        Layout::NK | Layout::Conv => {
            let n = dims[0] as usize;
            (w.to_vec(), n, w.len() / n.max(1))
        }
    }
}

fn from_rows<T: Copy + Default>(rows: &[T], channels: usize, k: usize, layout: Layout) -> Vec<T> {
    match layout {
        Layout::KN => {
            let mut out = vec![T::default(); rows.len()];
            for c in 0..channels {
                for r in 0..k {
                    out[r * channels + c] = rows[c * k + r];
                }
            }
            out
        }
        _ => rows.to_vec(),
    }
}

/// Widens the scale of every output channel in which two weights that one u8 activation pair could
/// multiply (neighbours along the reduction axis when `bound.pairs`, any two otherwise) could sum past
/// the 16-bit limit, for activation codes within `bound`; codes are recomputed for those channels.
/// Returns how many channels changed.
pub fn fix_saturation(
    w_rows: &[f32],
    codes: &mut [i32],
    scales: &mut [f32],
    k: usize,
    bound: &CodeBound,
) -> usize {
    const LIMIT: i32 = 32767;
    let worst = |row: &[i32]| -> i32 {
        if bound.pairs {
            row.chunks(2)
                .enumerate()
                .map(|(i, p)| {
                    // Products of one sign add up; of opposite signs they cancel (and one u8·s8
                    // product alone, ≤ 255·127, always fits).
                    let side = |positive: bool| {
                        let terms: Vec<(i32, i32)> = p
                            .iter()
                            .enumerate()
                            .filter(|(_, q)| if positive { **q > 0 } else { **q < 0 })
                            .map(|(j, q)| (q.abs(), bound.index[2 * i + j]))
                            .collect();
                        match terms.as_slice() {
                            [(a, ha), (b, hb)] => (a * ha + b * hb).min(bound.pair[i] * a.max(b)),
                            [(a, ha)] => a * ha,
                            _ => 0,
                        }
                    };
                    side(true).max(side(false))
                })
                .max()
                .unwrap_or(0)
        } else {
            let (mut p, mut n) = ([0i32; 2], [0i32; 2]);
            for (&q, &h) in row.iter().zip(&bound.index) {
                let (top, v) = if q > 0 {
                    (&mut p, q * h)
                } else {
                    (&mut n, -q * h)
                };
                if v > top[0] {
                    top[1] = top[0];
                    top[0] = v;
                } else if v > top[1] {
                    top[1] = v;
                }
            }
            (p[0] + p[1]).max(n[0] + n[1])
        }
    };
    let mut fixed = 0;
    for (c, s) in scales.iter_mut().enumerate() {
        let row = &mut codes[c * k..(c + 1) * k];
        let mut w = worst(row);
        if w <= LIMIT {
            continue;
        }
        fixed += 1;
        let src = &w_rows[c * k..(c + 1) * k];
        let mut f = w as f32 / LIMIT as f32;
        while w > LIMIT {
            let ns = *s * f;
            for (q, &x) in row.iter_mut().zip(src) {
                *q = ((x / ns).round() as i32).clamp(-127, 127);
            }
            w = worst(row);
            if w <= LIMIT {
                *s = ns;
            }
            f *= 1.01;
        }
    }
    fixed
}

/// A quantized weight: int8 codes in the weight's own layout, scales per channel (or one).
struct QWeight {
    codes: Vec<i32>,
    scales: Vec<f32>,
    dims: Vec<i64>,
    axis: Option<usize>,
    sqnr_db: f64,
    /// The weight SQNR rounded to nearest.
    nearest_sqnr_db: f64,
    saturation_channels: usize,
    /// Whether the codes came from error feedback.
    gptq: bool,
}

fn quantize_weight(
    t: &TensorProto,
    layout: Layout,
    per_channel: bool,
    guard: Option<&CodeBound>,
    hessian: Option<&crate::quant::gptq::Hessian>,
    min_scales: Option<&[f32]>,
) -> std::result::Result<QWeight, String> {
    let w = to_f32(t)?;
    let (rows, channels, k) = to_rows(&w, &t.dims, layout);
    let scheme = IntScheme {
        bits: 8,
        symmetric: true,
        granularity: if per_channel {
            Granularity::PerChannel
        } else {
            Granularity::PerTensor
        },
        clip_search: false,
    };
    let mut q = quantize(&rows, channels, k, &scheme)?;
    // The floor on weight SQNR judges the scheme, so it reads nearest rounding: error feedback
    // gives up weight SQNR for output error.
    let nearest_sqnr_db = sqnr_db(&rows, &q.dequantize());
    let mut gptq = false;
    if let Some(h) = hessian.filter(|_| per_channel) {
        // Too few calibration rows leaves the codes as they are (to nearest).
        gptq = crate::quant::int::refine_with_feedback(
            &rows,
            &mut q,
            h,
            crate::passes::quantize_weights::GPTQ_DAMP,
        )
        .is_ok();
    }
    // Symmetric int8 codes stay within ±127 so negation and u8 offsets never overflow.
    let mut codes: Vec<i32> = q.codes.iter().map(|&c| c.max(-127)).collect();
    let mut scales = q.scales.clone();
    let mut fixed = 0;
    // A bound of another length than the rows (a profile that does not fit) assumes any code.
    let any;
    let guard = match guard {
        Some(b) if b.index.len() != k => {
            any = CodeBound::any(k, b.pairs);
            Some(&any)
        }
        g => g,
    };
    if let Some(bound) = guard {
        if per_channel {
            fixed = fix_saturation(&rows, &mut codes, &mut scales, k, bound);
        } else {
            // One scale for the whole tensor: treat it as one channel of all rows' pairs.
            let mut s = [scales[0]];
            let mut worst_rows = 0;
            for c in 0..channels {
                let mut cs = [s[0]];
                let mut row = codes[c * k..(c + 1) * k].to_vec();
                if fix_saturation(&rows[c * k..(c + 1) * k], &mut row, &mut cs, k, bound) > 0 {
                    worst_rows += 1;
                    s[0] = s[0].max(cs[0]);
                }
            }
            if worst_rows > 0 {
                scales[0] = s[0];
                for (q, &x) in codes.iter_mut().zip(&rows) {
                    *q = ((x / s[0]).round() as i32).clamp(-127, 127);
                }
                fixed = channels;
            }
        }
    }
    // Scales below a floor (where the int32 bias at scale s_x·s_w would overflow) are raised to it.
    // Only the raised rows are rounded again (the others keep their codes, error feedback's too).
    if let Some(min) = min_scales.filter(|m| m.len() == channels) {
        let mut raised = vec![false; scales.len()];
        for (c, &m) in min.iter().enumerate() {
            let at = if per_channel { c } else { 0 };
            if scales[at] < m {
                scales[at] = m;
                raised[at] = true;
            }
        }
        for (i, (q, &x)) in codes.iter_mut().zip(&rows).enumerate() {
            let at = if per_channel { i / k.max(1) } else { 0 };
            if raised[at] {
                *q = ((x / scales[at]).round() as i32).clamp(-127, 127);
            }
        }
    }
    let decoded: Vec<f32> = codes
        .iter()
        .enumerate()
        .map(|(i, &c)| c as f32 * scales[if per_channel { i / k.max(1) } else { 0 }])
        .collect();
    let sqnr = sqnr_db(&rows, &decoded);
    Ok(QWeight {
        codes: from_rows(&codes, channels, k, layout),
        scales,
        dims: t.dims.clone(),
        axis: per_channel.then(|| layout.axis()),
        sqnr_db: sqnr,
        nearest_sqnr_db,
        saturation_channels: fixed,
        gptq,
    })
}

/// Whether integer weights get one scale per output channel: static weights sit behind
/// DequantizeLinear, per axis from opset 13; dynamic mode applies the weight scales with its own
/// Mul, so it is per channel at any opset.
pub fn weights_per_channel(model: &Model, mode: Mode) -> bool {
    model.opset("").unwrap_or(1) >= 13 || mode == Mode::Dynamic
}

/// Whether the policy guards u8·s8 products against saturation for this target.
fn guards_saturation(policy: &ActivationPolicy, target: Target) -> bool {
    policy.saturation != Saturation::Ignore && target != Target::Tract
}

/// Whether onnxruntime's kernel for the site's integer form adds u8·s8 products in saturating 16-bit
/// lanes (measured on AVX2, onnxruntime 1.31): MatMul and Gemm in both modes and QLinearConv do;
/// ConvInteger (dynamic mode, u8 weights: the u8·u8 kernel widens to 16 bits first) and depthwise
/// QLinearConv (its own kernel) do not.
fn kernel_saturates(model: &Model, site: &Site, mode: Mode, wdims: &[i64]) -> bool {
    if site.layout != Layout::Conv {
        return true;
    }
    if mode == Mode::Dynamic {
        return false;
    }
    let group = model
        .graph
        .node(site.node)
        .int_attribute("group")
        .unwrap_or(1);
    let depthwise = group > 1 && wdims.first() == Some(&group) && wdims.get(1) == Some(&1);
    !depthwise
}

/// The reduction axis of a site's activation: channels (1) for Conv, the last for MatMul and Gemm.
fn reduction_axis(site: &Site) -> i64 {
    if site.layout == Layout::Conv { 1 } else { -1 }
}

/// The activation tensors whose u8 code profiles bound the saturation guard, for calibration to
/// collect ([`crate::calib::calibrate`]); none when the policy does not guard for this target.
pub fn profile_requests(
    model: &Model,
    sites: &[Site],
    policy: &ActivationPolicy,
    target: Target,
) -> Vec<crate::calib::ProfileRequest> {
    if !guards_saturation(policy, target) || policy.saturation == Saturation::Strict {
        return Vec::new();
    }
    let dims: HashMap<String, Vec<i64>> = constants(model)
        .into_iter()
        .filter(|c| !c.in_subgraph())
        .map(|c| (c.name, c.tensor.dims.clone()))
        .collect();
    let mut out: Vec<crate::calib::ProfileRequest> = Vec::new();
    for site in sites {
        let (Some((_, w)), Some((0, x))) = (&site.weight, site.activations.first()) else {
            continue;
        };
        if !dims
            .get(w)
            .is_some_and(|d| kernel_saturates(model, site, policy.mode, d))
        {
            continue;
        }
        let req = crate::calib::ProfileRequest {
            tensor: x.clone(),
            axis: reduction_axis(site),
            codes: match policy.mode {
                Mode::Static => crate::calib::Codes::Static,
                Mode::Dynamic => crate::calib::Codes::Dynamic,
            },
        };
        if !out.contains(&req) {
            out.push(req);
        }
    }
    out
}

/// The code bound of every guarded weight (by name and layout), over all the sites that will read
/// it integer: from calibration's code profiles where every such site has one, else any u8 code.
fn code_bounds(
    model: &Model,
    sites: &[Site],
    ranges: &BTreeMap<String, Range>,
    policy: &ActivationPolicy,
    calib: Option<&Calibration>,
    consts: &HashMap<String, TensorProto>,
) -> HashMap<(String, Layout), (CodeBound, SaturationBound)> {
    let mut out: HashMap<(String, Layout), (CodeBound, SaturationBound)> = HashMap::new();
    for site in sites {
        let (Some((_, w)), Some((0, x))) = (&site.weight, site.activations.first()) else {
            continue;
        };
        let Some(wt) = consts.get(w) else { continue };
        let d = &wt.dims;
        if !site.activations.iter().all(|(_, t)| ranges.contains_key(t))
            || !kernel_saturates(model, site, policy.mode, d)
        {
            continue;
        }
        let k = match (site.layout, d.as_slice()) {
            (Layout::KN, [k, _]) | (Layout::NK, [_, k]) => *k as usize,
            (Layout::Conv, [_, rest @ ..]) => rest.iter().product::<i64>() as usize,
            _ => continue,
        };
        let pairs = site.layout != Layout::Conv;
        let (s, z) = match policy.mode {
            Mode::Static => ranges[x].u8_params(policy.symmetric),
            Mode::Dynamic => (1.0, 0),
        };
        let profiled = calib
            .filter(|_| policy.saturation == Saturation::Fix)
            .and_then(|c| c.profiles.get(&(x.clone(), reduction_axis(site))))
            .and_then(|p| {
                let (ch, pair) = p.bounds(s, z);
                if pairs {
                    return (ch.len() == k).then_some(CodeBound {
                        index: ch,
                        pair,
                        pairs,
                    });
                }
                // Conv rows run over (input channel of the group, kernel position); a row of any
                // group meets the codes of its group's channels, and padding reads the zero point.
                let cpg = *d.get(1)? as usize;
                let spatial = k / cpg.max(1);
                let groups = ch.len() / cpg.max(1);
                if cpg == 0 || groups == 0 || groups * cpg != ch.len() {
                    return None;
                }
                let index: Vec<i32> = (0..k)
                    .map(|r| {
                        (0..groups)
                            .map(|g| ch[g * cpg + r / spatial])
                            .fold(z as i32, i32::max)
                    })
                    .collect();
                let pair = index.chunks(2).map(|c| c.iter().sum()).collect();
                Some(CodeBound { index, pair, pairs })
            });
        let (bound, how) = match profiled {
            Some(b) => (b, SaturationBound::Calibrated),
            None => (CodeBound::any(k, pairs), SaturationBound::AnyInput),
        };
        match out.entry((w.clone(), site.layout)) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert((bound, how));
            }
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let (b, h) = e.get_mut();
                if b.index.len() == bound.index.len() {
                    b.max(&bound);
                } else {
                    *b = CodeBound::any(bound.index.len(), pairs);
                    *h = SaturationBound::AnyInput;
                }
                if how == SaturationBound::AnyInput {
                    *h = how;
                }
            }
        }
    }
    out
}

fn scalar(dt: DataType, raw: Vec<u8>) -> TensorProto {
    tensor(dt, &[], raw)
}

/// The scalar scale and u8 zero point constants of a tensor's codes, named after `base`.
fn u8_constants(
    patch: &mut Patch,
    names: &mut crate::ir::Names,
    base: &str,
    (s, z): (f32, u8),
) -> (String, String) {
    let sc = patch.constant(
        names,
        &format!("{base}_scale"),
        scalar(DataType::Float, s.to_le_bytes().to_vec()),
    );
    let zp = patch.constant(
        names,
        &format!("{base}_zero_point"),
        scalar(DataType::Uint8, vec![z]),
    );
    (sc, zp)
}

/// A tensor's `QuantizeLinear → DequantizeLinear` pair: returns (decoded value, scale, codes, zero
/// point). With `every_reader`, every reader of `t` reads the decoded value.
fn static_pair(
    patch: &mut Patch,
    names: &mut crate::ir::Names,
    t: &str,
    (s, z): (f32, u8),
    every_reader: bool,
) -> Vec<String> {
    let b = t.replace(['/', ':'], "_");
    let (sc, zp) = u8_constants(patch, names, &b, (s, z));
    let q = patch.node(
        names,
        &format!("{b}_quantize"),
        "QuantizeLinear",
        "",
        &[Some(t), Some(&sc), Some(&zp)],
        1,
        vec![],
    );
    let dq = patch.node(
        names,
        &format!("{b}_dequantize"),
        "DequantizeLinear",
        "",
        &[Some(&q[0]), Some(&sc), Some(&zp)],
        1,
        vec![],
    );
    if every_reader {
        patch.replace_all_uses(t, &dq[0]);
    }
    vec![dq[0].clone(), sc, q[0].clone(), zp]
}

/// Emits the sites into the model. `ranges` holds the range of every tensor to quantize (static);
/// sites reading a tensor without one stay float. With `exact`, each tensor in `ranges` is quantized
/// wherever it is (to measure tensors alone), even where its Conv then runs in float. Returns the
/// site reports and the tensors that got a quantized form.
pub fn apply(
    model: &mut Model,
    sites: &[Site],
    ranges: &BTreeMap<String, Range>,
    policy: &ActivationPolicy,
    target: Target,
    calib: Option<&Calibration>,
    exact: bool,
) -> Result<(Vec<SiteReport>, BTreeSet<String>)> {
    let hessians = calib.map(|c| &c.hessians).filter(|_| policy.gptq);
    let opset = model.opset("").unwrap_or(1);
    let need = match policy.mode {
        Mode::Static => 10,
        Mode::Dynamic => 11,
    };
    if opset < need {
        let reports = sites
            .iter()
            .map(|s| {
                float_site(
                    s,
                    format!(
                        "{:?} activation quantization needs opset {need}, the model has {opset}",
                        policy.mode
                    ),
                )
            })
            .collect();
        return Ok((reports, BTreeSet::new()));
    }
    let per_channel = weights_per_channel(model, policy.mode);
    let consts: HashMap<String, TensorProto> = constants(model)
        .into_iter()
        .filter(|c| !c.in_subgraph())
        .map(|c| (c.name, c.tensor))
        .collect();
    let guards = if guards_saturation(policy, target) {
        code_bounds(model, sites, ranges, policy, calib, &consts)
    } else {
        HashMap::new()
    };
    let mut patch = Patch::new(format!("quantize-activations/{:?}", policy.mode).to_lowercase());
    let names = &mut model.names;
    let g = &model.graph;
    // A static Conv computes in integers only when its output is quantized too: onnxruntime fuses
    // DequantizeLinear → Conv → QuantizeLinear into QLinearConv, but runs a Conv whose output stays
    // float in float (dequantizing its weight on every run), and tract runs QDQ in float. Such a Conv
    // stays float. With `exact` (measuring tensors alone) the tensors in `ranges` are quantized
    // wherever they are.
    let output_float = |s: &Site| {
        policy.mode == Mode::Static
            && s.op_type == "Conv"
            && !s.output.as_deref().is_some_and(|o| ranges.contains_key(o))
    };
    let inputs_quantized = |s: &Site| s.activations.iter().all(|(_, t)| ranges.contains_key(t));
    // Tensors whose every reader reads the quantized pair: outputs of integer sites.
    // (A site whose inputs stay float keeps a float output: a pair there would only cost.)
    let all_readers: BTreeSet<&str> = sites
        .iter()
        .filter(|s| exact || (inputs_quantized(s) && !output_float(s)))
        .filter_map(|s| s.output.as_deref())
        .filter(|o| ranges.contains_key(*o))
        .collect();
    // tensor → name of its decoded value (static) or (codes, scale, zero point) (dynamic).
    let mut pairs: HashMap<String, Vec<String>> = HashMap::new();
    let mut reports = Vec::new();
    // A weight read by several sites is stored once per layout (static: its DequantizeLinear output;
    // dynamic: its integer constant).
    let mut quantized_weights: HashMap<(String, Layout), String> = HashMap::new();
    // Static Conv weights of QLinearConv nodes (below opset 13): codes, scales, zero points.
    let mut qlinear_weights: HashMap<String, (String, String, String)> = HashMap::new();
    let base = |s: &str| s.replace(['/', ':'], "_");
    // Dynamic mode: outputs of replaced nodes → the values that now hold them.
    let mut renamed: HashMap<String, String> = HashMap::new();
    for site in sites {
        if let Some((_, t)) = site
            .activations
            .iter()
            .find(|(_, t)| !ranges.contains_key(t))
        {
            reports.push(float_site(
                site,
                format!("activation '{t}' stays float (no usable range)"),
            ));
            continue;
        }
        if !exact && output_float(site) {
            let why = match &site.output {
                Some(o) => format!("its output '{o}' stays float"),
                None => "its output is not quantized".into(),
            };
            reports.push(float_site(
                site,
                format!(
                    "{why}, and a Conv between DequantizeLinear and a float output runs in float \
                     (onnxruntime fuses QLinearConv only up to a QuantizeLinear)"
                ),
            ));
            continue;
        }
        let node = g.node(site.node);
        let mut acts = Vec::new();
        for (slot, t) in &site.activations {
            let made = pairs.entry(t.clone()).or_insert_with(|| match policy.mode {
                Mode::Static => static_pair(
                    &mut patch,
                    names,
                    t,
                    ranges[t].u8_params(policy.symmetric),
                    all_readers.contains(t.as_str()),
                ),
                Mode::Dynamic => patch.node(
                    names,
                    &format!("{}_dynamic_quantize", base(t)),
                    "DynamicQuantizeLinear",
                    "",
                    // An earlier site (sites come in topological order) may have replaced it.
                    &[Some(renamed.get(t).unwrap_or(t))],
                    3,
                    vec![],
                ),
            });
            acts.push((*slot, made.clone()));
        }
        let Some((wslot, wname)) = &site.weight else {
            // Two activations (static only): both read their pairs.
            for (slot, made) in &acts {
                patch.replace_input(site.node, *slot, &made[0]);
            }
            reports.push(SiteReport {
                form: Some(format!("QDQ {}", site.op_type)),
                ..float_site(site, String::new())
            });
            if let Some(r) = reports.last_mut() {
                r.note = None;
            }
            continue;
        };
        let wt = &consts[wname];
        let key = (wname.clone(), site.layout);
        let hessian = hessians.and_then(|h| h.get(wname));
        let guard = guards.get(&key);
        // Below opset 13 a QDQ weight has one scale; an integer Conv is then written as
        // QLinearConv, whose weight scale is per output channel at any opset.
        // When the quantized output is a Relu's (or Clip's) after the Conv, the node replaces both:
        // only when the codes cannot go below zero, so that they clamp as the Relu did.
        let qlinear = policy.mode == Mode::Static
            && !per_channel
            && site.op_type == "Conv"
            && site.output.as_deref().is_some_and(|o| {
                all_readers.contains(o)
                    && (ranges[o].u8_params(policy.symmetric).1 == 0
                        || g.value_id(o)
                            .and_then(|v| g.value(v).producer())
                            .is_some_and(|(p, _)| p == site.node))
            });
        // Weight scales so small that the int32 bias (scale s_x·s_w) would overflow are raised.
        let min_scales: Option<Vec<f32>> = match (&site.bias, policy.mode) {
            (Some((_, bname)), Mode::Static) => to_f32(&consts[bname]).ok().map(|b| {
                let sx = ranges[&site.activations[0].1].u8_params(policy.symmetric).0;
                b.iter().map(|v| v.abs() / (sx * 2.0e9)).collect()
            }),
            _ => None,
        };
        let qw = match quantize_weight(
            wt,
            site.layout,
            per_channel || qlinear,
            guard.map(|g| &g.0),
            hessian,
            min_scales.as_deref(),
        ) {
            Ok(q) => q,
            Err(e) => {
                reports.push(float_site(site, format!("weight '{wname}': {e}")));
                continue;
            }
        };
        if qw.nearest_sqnr_db < policy.min_weight_sqnr_db {
            let why = if per_channel || qlinear {
                String::new()
            } else {
                format!(
                    " (one scale per tensor: per-channel needs opset 13, the model has {opset})"
                )
            };
            reports.push(float_site(
                site,
                format!(
                    "int8 weight SQNR {:.1} dB < {} dB{why}",
                    qw.nearest_sqnr_db, policy.min_weight_sqnr_db
                ),
            ));
            continue;
        }
        let wb = base(wname);
        let first = !quantized_weights.contains_key(&key);
        let (bytes_before, bytes_after) = if first {
            (
                crate::onnx::tensor::payload_bytes(wt),
                qw.codes.len() as u64 + 4 * qw.scales.len() as u64,
            )
        } else {
            (0, 0)
        };
        let mut report = SiteReport {
            form: None,
            weight_sqnr_db: qw.sqnr_db,
            saturation_channels: qw.saturation_channels,
            saturation_bound: guard.map_or(SaturationBound::Unguarded, |g| g.1),
            gptq: qw.gptq,
            bytes_before,
            bytes_after,
            ..float_site(site, String::new())
        };
        report.note = None;
        if qlinear {
            let out = site.output.as_deref().expect("checked");
            let (xq, xs, xz) = (&acts[0].1[2], &acts[0].1[1], &acts[0].1[3]);
            let sx = ranges[&site.activations[0].1].u8_params(policy.symmetric).0;
            let m = qw.scales.len();
            let (wq, ws, wz) = qlinear_weights
                .entry(wname.clone())
                .or_insert_with(|| {
                    let codes: Vec<u8> = qw.codes.iter().map(|&c| c as i8 as u8).collect();
                    (
                        patch.constant(
                            names,
                            &format!("{wb}_quantized"),
                            tensor(DataType::Int8, &qw.dims, codes),
                        ),
                        patch.constant(
                            names,
                            &format!("{wb}_scale"),
                            f32_tensor(&[m as i64], &qw.scales),
                        ),
                        patch.constant(
                            names,
                            &format!("{wb}_zero_point"),
                            tensor(DataType::Int8, &[m as i64], vec![0; m]),
                        ),
                    )
                })
                .clone();
            let ob = base(out);
            let (ys, yz) = u8_constants(
                &mut patch,
                names,
                &ob,
                ranges[out].u8_params(policy.symmetric),
            );
            // The bias as int32 with scale s_x·s_w per channel and zero point 0.
            let bias = site.bias.as_ref().and_then(|(_, bname)| {
                let b = to_f32(&consts[bname]).ok()?;
                let codes: Vec<i64> = b
                    .iter()
                    .zip(&qw.scales)
                    .map(|(v, sw)| (v / (sx * sw)).round() as i64)
                    .collect();
                (b.len() == m && codes.iter().all(|c| i32::try_from(*c).is_ok())).then(|| {
                    let raw: Vec<u8> = codes
                        .iter()
                        .flat_map(|&c| (c as i32).to_le_bytes())
                        .collect();
                    patch.constant(
                        names,
                        &format!("{}_quantized", base(bname)),
                        tensor(DataType::Int32, &[m as i64], raw),
                    )
                })
            });
            if site.bias.is_some() && bias.is_none() {
                reports.push(float_site(
                    site,
                    "its bias does not fit int32 at scale s_x·s_w".into(),
                ));
                continue;
            }
            let attrs: Vec<AttributeProto> =
                node.attributes().iter().map(|a| a.proto.clone()).collect();
            let mut inputs = vec![
                Some(xq.as_str()),
                Some(xs),
                Some(xz),
                Some(&wq),
                Some(&ws),
                Some(&wz),
                Some(&ys),
                Some(&yz),
            ];
            // No empty trailing slot for a missing bias (tract counts it as an input).
            if let Some(b) = &bias {
                inputs.push(Some(b));
            }
            let yq = patch.node(
                names,
                &format!("{}_qlinear", base(&site.name)),
                "QLinearConv",
                "",
                &inputs,
                1,
                attrs,
            );
            let dq = patch.node(
                names,
                &format!("{ob}_dequantize"),
                "DequantizeLinear",
                "",
                &[Some(&yq[0]), Some(&ys), Some(&yz)],
                1,
                vec![],
            );
            patch.replace_all_uses(out, &dq[0]);
            patch.remove_node(site.node);
            // A Relu/Clip between the Conv and its quantized output: the codes' range clamps as it did.
            if let Some(v) = g.value_id(out)
                && let Some((p, _)) = g.value(v).producer()
                && p != site.node
            {
                patch.remove_node(p);
            }
            pairs.insert(out.to_string(), vec![dq[0].clone(), ys, yq[0].clone(), yz]);
            report.form = Some(
                "QLinearConv (w int8 per channel; QDQ has one weight scale below opset 13) → Q/DQ output"
                    .into(),
            );
            reports.push(report);
            continue;
        }
        match policy.mode {
            Mode::Static => {
                let wdq = quantized_weights
                    .entry(key)
                    .or_insert_with(|| {
                        let codes: Vec<u8> = qw.codes.iter().map(|&c| c as i8 as u8).collect();
                        let (sdims, nz): (Vec<i64>, usize) = match qw.axis {
                            Some(_) => (vec![qw.scales.len() as i64], qw.scales.len()),
                            None => (vec![], 1),
                        };
                        let q = patch.constant(
                            names,
                            &format!("{wb}_quantized"),
                            tensor(DataType::Int8, &qw.dims, codes),
                        );
                        let s = patch.constant(
                            names,
                            &format!("{wb}_scale"),
                            f32_tensor(&sdims, &qw.scales),
                        );
                        let z = patch.constant(
                            names,
                            &format!("{wb}_zero_point"),
                            tensor(DataType::Int8, &sdims, vec![0; nz]),
                        );
                        let attrs = qw
                            .axis
                            .map(|a| vec![attr_int("axis", a as i64)])
                            .unwrap_or_default();
                        patch
                            .node(
                                names,
                                &format!("{wb}_dequantize"),
                                "DequantizeLinear",
                                "",
                                &[Some(&q), Some(&s), Some(&z)],
                                1,
                                attrs,
                            )
                            .remove(0)
                    })
                    .clone();
                let (slot, made) = &acts[0];
                if !all_readers.contains(site.activations[0].1.as_str()) {
                    patch.replace_input(site.node, *slot, &made[0]);
                }
                patch.replace_input(site.node, *wslot, &wdq);
                // The bias as int32 with scale s_x·s_w, so the group fuses with its bias.
                if let Some((bslot, bname)) = &site.bias {
                    let sx = ranges[&site.activations[0].1].u8_params(policy.symmetric).0;
                    let b = to_f32(&consts[bname]).unwrap_or_default();
                    let per = qw.scales.len() == b.len();
                    let bs: Vec<f32> = b
                        .iter()
                        .enumerate()
                        .map(|(i, _)| sx * qw.scales[if per { i } else { 0 }])
                        .collect();
                    let codes: Vec<i64> = b
                        .iter()
                        .zip(&bs)
                        .map(|(v, s)| (v / s).round() as i64)
                        .collect();
                    if !b.is_empty() && codes.iter().all(|c| i32::try_from(*c).is_ok()) {
                        let bb = base(bname);
                        let raw: Vec<u8> = codes
                            .iter()
                            .flat_map(|&c| (c as i32).to_le_bytes())
                            .collect();
                        let q = patch.constant(
                            names,
                            &format!("{bb}_quantized"),
                            tensor(DataType::Int32, &[b.len() as i64], raw),
                        );
                        let s = patch.constant(
                            names,
                            &format!("{bb}_scale"),
                            f32_tensor(&[b.len() as i64], &bs),
                        );
                        let z = patch.constant(
                            names,
                            &format!("{bb}_zero_point"),
                            tensor(DataType::Int32, &[b.len() as i64], vec![0; 4 * b.len()]),
                        );
                        let axis = if opset >= 13 {
                            vec![attr_int("axis", 0)]
                        } else {
                            vec![]
                        };
                        // Per-axis bias scales need opset 13; below it, only a shared scale works.
                        if opset >= 13 || !per {
                            let (s, z) = if opset >= 13 {
                                (s, z)
                            } else {
                                (
                                    patch.constant(
                                        names,
                                        &format!("{bb}_scale"),
                                        scalar(DataType::Float, bs[0].to_le_bytes().to_vec()),
                                    ),
                                    patch.constant(
                                        names,
                                        &format!("{bb}_zero_point"),
                                        scalar(DataType::Int32, vec![0; 4]),
                                    ),
                                )
                            };
                            let dq = patch.node(
                                names,
                                &format!("{bb}_dequantize"),
                                "DequantizeLinear",
                                "",
                                &[Some(&q), Some(&s), Some(&z)],
                                1,
                                axis,
                            );
                            patch.replace_input(site.node, *bslot, &dq[0]);
                        }
                    }
                }
                let out = if site
                    .output
                    .as_deref()
                    .is_some_and(|o| all_readers.contains(o))
                {
                    " → Q/DQ output"
                } else {
                    ""
                };
                report.form = Some(format!(
                    "QDQ {} (w int8 per {}){out}",
                    site.op_type,
                    if qw.axis.is_some() {
                        "channel"
                    } else {
                        "tensor"
                    }
                ));
            }
            Mode::Dynamic => {
                let (xq, xs, xz) = (&acts[0].1[0], &acts[0].1[1], &acts[0].1[2]);
                let rank = qw.dims.len();
                let out_name = node
                    .outputs()
                    .first()
                    .copied()
                    .flatten()
                    .map(|v| g.value_name(v).to_string());
                let Some(out_name) = out_name else {
                    reports.push(float_site(site, "the node has no output".into()));
                    continue;
                };
                let nb = base(&site.name);
                let ws: Vec<f32> = if qw.axis.is_some() {
                    qw.scales.clone()
                } else {
                    vec![qw.scales[0]]
                };
                let (int_out, scale_shape) = if site.op_type == "Conv" {
                    // ConvInteger takes uint8 weights: symmetric codes + 128, zero point 128.
                    let q = quantized_weights
                        .entry(key)
                        .or_insert_with(|| {
                            let codes: Vec<u8> =
                                qw.codes.iter().map(|&c| (c + 128) as u8).collect();
                            patch.constant(
                                names,
                                &format!("{wb}_quantized"),
                                tensor(DataType::Uint8, &qw.dims, codes),
                            )
                        })
                        .clone();
                    let z = patch.constant(
                        names,
                        &format!("{wb}_zero_point"),
                        scalar(DataType::Uint8, vec![128]),
                    );
                    let attrs: Vec<AttributeProto> =
                        node.attributes().iter().map(|a| a.proto.clone()).collect();
                    let y = patch.node(
                        names,
                        &format!("{nb}_conv_integer"),
                        "ConvInteger",
                        "",
                        &[Some(xq), Some(&q), Some(xz), Some(&z)],
                        1,
                        attrs,
                    );
                    let mut shape = vec![1i64; rank];
                    shape[1] = ws.len() as i64;
                    if ws.len() == 1 {
                        shape[1] = 1;
                    }
                    (y[0].clone(), shape)
                } else {
                    // MatMulInteger wants B as [K, N]; tied weights share one constant.
                    let q = quantized_weights
                        .entry(key)
                        .or_insert_with(|| {
                            let (codes, dims) = if site.layout == Layout::NK {
                                let (n, k) = (qw.dims[0] as usize, qw.dims[1] as usize);
                                let mut t = vec![0i32; n * k];
                                for r in 0..n {
                                    for c in 0..k {
                                        t[c * n + r] = qw.codes[r * k + c];
                                    }
                                }
                                (t, vec![qw.dims[1], qw.dims[0]])
                            } else {
                                (qw.codes.clone(), qw.dims.clone())
                            };
                            let raw: Vec<u8> = codes.iter().map(|&c| c as i8 as u8).collect();
                            patch.constant(
                                names,
                                &format!("{wb}_quantized"),
                                tensor(DataType::Int8, &dims, raw),
                            )
                        })
                        .clone();
                    let y = patch.node(
                        names,
                        &format!("{nb}_matmul_integer"),
                        "MatMulInteger",
                        "",
                        &[Some(xq), Some(&q), Some(xz)],
                        1,
                        vec![],
                    );
                    (y[0].clone(), vec![ws.len() as i64])
                };
                let wsc =
                    patch.constant(names, &format!("{wb}_scale"), f32_tensor(&scale_shape, &ws));
                let scale = patch.node(
                    names,
                    &format!("{nb}_scale"),
                    "Mul",
                    "",
                    &[Some(xs), Some(&wsc)],
                    1,
                    vec![],
                );
                let cast = patch.node(
                    names,
                    &format!("{nb}_cast"),
                    "Cast",
                    "",
                    &[Some(&int_out)],
                    1,
                    vec![attr_int("to", DataType::Float as i64)],
                );
                let mut y = patch.node(
                    names,
                    &format!("{nb}_rescale"),
                    "Mul",
                    "",
                    &[Some(&cast[0]), Some(&scale[0])],
                    1,
                    vec![],
                )[0]
                .clone();
                if let Some((_, b)) = site.bias.clone() {
                    let b = if site.op_type == "Conv" {
                        let v = to_f32(&consts[&b]).unwrap_or_default();
                        let mut shape = vec![1i64; rank];
                        shape[1] = v.len() as i64;
                        patch.constant(names, &format!("{}_bias", base(&b)), f32_tensor(&shape, &v))
                    } else {
                        b
                    };
                    y = patch.node(
                        names,
                        &format!("{nb}_bias"),
                        "Add",
                        "",
                        &[Some(&y), Some(&b)],
                        1,
                        vec![],
                    )[0]
                    .clone();
                }
                patch.replace_all_uses(&out_name, &y);
                patch.remove_node(site.node);
                renamed.insert(out_name, y);
                report.form = Some(format!(
                    "DynamicQuantizeLinear → {} (w {} per {})",
                    if site.op_type == "Conv" {
                        "ConvInteger"
                    } else {
                        "MatMulInteger"
                    },
                    if site.op_type == "Conv" {
                        "uint8"
                    } else {
                        "int8"
                    },
                    if qw.axis.is_some() {
                        "channel"
                    } else {
                        "tensor"
                    }
                ));
            }
        }
        if report.saturation_channels > 0 {
            report.note = Some(format!(
                "{} output channels widened against u8·s8 16-bit saturation ({})",
                report.saturation_channels,
                match report.saturation_bound {
                    SaturationBound::Calibrated => "for the codes calibration saw",
                    _ => "for any u8 input",
                }
            ));
        }
        reports.push(report);
    }
    // Quantized outputs no later site reads as its activation get their pair here.
    if policy.mode == Mode::Static {
        for o in &all_readers {
            if !pairs.contains_key(*o) {
                let made = static_pair(
                    &mut patch,
                    names,
                    o,
                    ranges[*o].u8_params(policy.symmetric),
                    true,
                );
                pairs.insert(o.to_string(), made);
            }
        }
    }
    model.graph.apply(patch)?;
    if model.graph.outputs().is_empty() {
        return Err(Error::Model("the graph lost its outputs".into()));
    }
    Ok((reports, pairs.into_keys().collect()))
}

/// The output-retention floors a candidate must reach on the calibration data.
#[derive(Clone, Copy, Debug)]
struct Floors {
    cosine: Option<f64>,
    top1: Option<f64>,
}

/// Significance below which a count of top-1 flips says the flip rate is above the floor's.
const TOP1_SIGNIFICANCE: f64 = 0.10;

/// The probability of `k` or more flips among `n` rows if each flips with probability `p`
/// (the binomial upper tail), summed in logs so large `n` does not underflow.
fn flips_tail(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut log_c = 0.0f64; // ln C(n, i)
    let mut below = 0.0;
    for i in 0..k.min(n + 1) {
        if i > 0 {
            log_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        below += (log_c + i as f64 * lp + (n - i) as f64 * lq).exp();
    }
    (1.0 - below).max(0.0)
}

impl Floors {
    /// The cosine floor is a bound on the figure. The top-1 floor is a bound on a rate, measured on
    /// a sample: an agreement below it still passes when its count of flips is what rows flipping
    /// at the floor's rate give with probability [`TOP1_SIGNIFICANCE`] or more (on 64–256 rows and
    /// a floor of 0.998, one flip; read literally, such a floor allows none, and one near tie then
    /// sends tensors back to float).
    fn meets(&self, r: &Retention) -> bool {
        self.cosine.is_none_or(|m| r.cosine >= m)
            && self
                .top1
                .is_none_or(|m| r.top1.is_none_or(|t| t >= m || self.top1_by_chance(r)))
    }

    /// Whether `r`'s top-1 agreement is below the floor by no more than chance allows.
    fn top1_by_chance(&self, r: &Retention) -> bool {
        let (Some(floor), Some(t), Some(n)) = (self.top1, r.top1, r.top1_rows) else {
            return false;
        };
        let flips = ((1.0 - t) * n as f64).round() as u64;
        flips_tail(flips, n, 1.0 - floor) >= TOP1_SIGNIFICANCE
    }

    /// Each floor `base` misses, moved to what it allows below `base`: the loss it permits
    /// (`1 − floor`) counted from `base`'s figure instead of from the float model. Floors `base`
    /// reaches stay.
    fn on_top_of(&self, base: &Retention) -> Floors {
        let relax = |floor: Option<f64>, got: Option<f64>| match (floor, got) {
            (Some(f), Some(g)) if g < f => Some(g - (1.0 - f)),
            _ => floor,
        };
        Floors {
            cosine: relax(self.cosine, Some(base.cosine)),
            top1: relax(self.top1, base.top1),
        }
    }
}

/// Check batches a tensor's cost alone is measured on (the whole candidate uses all of them).
const ALONE_BATCHES: usize = 32;

/// Quantizes activations of a copy of `model` as the policy says and returns it with the report.
///
/// Static mode reads the ranges from `calib`; tensors whose own SQNR is below the policy's floor stay
/// float. Dynamic mode needs no data; given some (`calib`, its statistics unused), it runs the same
/// output check. `finish` completes a candidate (the weight pass, clean-up) and `score` measures its output
/// retention on the calibration data (its first batches only, given a limit). When the whole candidate misses the policy's floors, each
/// quantized tensor is measured alone (the model with only that tensor's sites integer); the tensors
/// that cost the most (output noise power) go back to float (one at a time, then 2, 4, … once 8 went
/// back) until the floors hold.
/// When the model with every activation float misses a floor too (the weights alone cost more than it
/// allows), that floor is counted from the all-float model's figure instead of from the float model's,
/// so the activations still get the floor's allowance rather than all going back to float.
///
/// With `smoothing`, `model` is its fully smoothed model ([`smooth::Smoothing::new`]), which `calib`
/// must come from; each candidate smooths only the groups that keep an integer tensor.
pub fn quantize_activations(
    model: &Model,
    smoothing: Option<&smooth::Smoothing>,
    policy: &ActivationPolicy,
    target: Target,
    calib: Option<&Calibration>,
    finish: &mut dyn FnMut(&mut Model) -> anyhow::Result<()>,
    score: &mut dyn FnMut(&Model, Option<usize>) -> anyhow::Result<Retention>,
) -> anyhow::Result<(Model, ActivationReport)> {
    let (mut sites, mut declined) = plan(model, policy);
    // onnxruntime's ConvInteger is im2col, a u8 product and separate Cast/Mul/Add passes over the
    // output: slower than its fp32 Conv (measured 2.2× on magika's Conv, 1.6× on PP-OCR det's), so
    // dynamic Convs are integer only for tract (quench's kernels) or when the recipe asks.
    if policy.mode == Mode::Dynamic && target != Target::Tract && !policy.conv_integer {
        let (conv, rest): (Vec<Site>, Vec<Site>) =
            sites.into_iter().partition(|s| s.op_type == "Conv");
        sites = rest;
        declined.extend(conv.iter().map(|s| {
            float_site(
                s,
                "dynamic Conv stays float for onnxruntime: its ConvInteger runs slower than fp32 \
                 Conv (conv_integer: true asks for it; --target tract runs it on quench's kernels)"
                    .into(),
            )
        }));
    }
    let mut tensors = Vec::new();
    let mut ranges = BTreeMap::new();
    let mut notes = Vec::new();
    if policy.smooth.is_some() && smoothing.is_none() {
        notes.push(
            "not smoothed: smoothing measures channel ranges on calibration data (--calib)".into(),
        );
    }
    if policy.mode == Mode::Static {
        let Some(calib) = calib else {
            anyhow::bail!("static activation quantization needs calibration data");
        };
        for t in tensors_to_calibrate(&sites) {
            let Some(st) = calib.tensors.get(&t) else {
                tensors.push(TensorReport {
                    name: t,
                    min: f32::NAN,
                    max: f32::NAN,
                    range: Range::new(0.0, 0.0),
                    scale: 0.0,
                    zero_point: 0,
                    sqnr_db: f64::NAN,
                    alone: None,
                    quantized: false,
                    note: Some("not seen by calibration (or not float)".into()),
                });
                continue;
            };
            let r = st.range(policy.method);
            let (scale, zero_point) = r.u8_params(policy.symmetric);
            let sqnr = st.sqnr_db(r);
            let mut note = None;
            if st.count == 0 {
                note = Some("no finite value seen".to_string());
            } else if st.non_finite > 0 {
                note = Some(format!("{} NaN/Inf values seen", st.non_finite));
            } else if sqnr < policy.min_sqnr_db {
                note = Some(format!(
                    "own SQNR {sqnr:.1} dB < {} dB: stays float",
                    policy.min_sqnr_db
                ));
            }
            if note.is_none() {
                ranges.insert(t.clone(), r);
            }
            tensors.push(TensorReport {
                name: t,
                min: st.min,
                max: st.max,
                range: r,
                scale,
                zero_point,
                sqnr_db: sqnr,
                alone: None,
                quantized: note.is_none(),
                note,
            });
        }
    }
    if policy.mode == Mode::Dynamic {
        // Ranges are taken per batch at run time; the map only says which tensors are integer.
        for t in tensors_to_calibrate(&sites) {
            ranges.insert(t.clone(), Range::new(0.0, 0.0));
            tensors.push(TensorReport {
                name: t,
                min: f32::NAN,
                max: f32::NAN,
                range: Range::new(0.0, 0.0),
                scale: f32::NAN,
                zero_point: 0,
                sqnr_db: f64::NAN,
                alone: None,
                quantized: true,
                note: None,
            });
        }
    }
    let build = |ranges: &BTreeMap<String, Range>,
                 exact: bool,
                 finish: &mut dyn FnMut(&mut Model) -> anyhow::Result<()>|
     -> anyhow::Result<(Model, Vec<SiteReport>, BTreeSet<String>)> {
        let mut m = match smoothing {
            Some(s) => s.model_for(&|t| ranges.contains_key(t))?,
            None => model.clone(),
        };
        let (reports, paired) = apply(&mut m, &sites, ranges, policy, target, calib, exact)?;
        finish(&mut m)?;
        Ok((m, reports, paired))
    };
    let (mut candidate, mut reports, mut paired) = build(&ranges, false, finish)?;
    let mut checks = Vec::new();
    // The floors the candidates are held to: the policy's, or relaxed (see below) when the model
    // with every activation float already misses them.
    let mut floors = Floors {
        cosine: policy.min_cosine,
        top1: policy.min_top1,
    };
    // Static mode always has calibration data to check on; dynamic mode when it was given some.
    if calib.is_some() && (policy.min_cosine.is_some() || policy.min_top1.is_some()) {
        let mut order: Option<Vec<String>> = None;
        let mut next = 0;
        let mut step = 1;
        let mut last;
        loop {
            let r = score(&candidate, None)?;
            last = r;
            checks.push(FallbackCheck {
                float_tensors: tensors.len() - ranges.len(),
                retention: r,
            });
            let order = match order.as_mut() {
                Some(o) => o,
                None => {
                    if floors.meets(&r) {
                        break;
                    }
                    // The weights (and whatever else the candidate changes) alone, every activation
                    // float: if that misses a floor, no fallback can reach it, and the activations
                    // are held to what the floor allows on top of it instead.
                    let (all_float, _, _) = build(&BTreeMap::new(), false, finish)?;
                    let base = score(&all_float, None)?;
                    checks.push(FallbackCheck {
                        float_tensors: tensors.len(),
                        retention: base,
                    });
                    if !floors.meets(&base) {
                        floors = floors.on_top_of(&base);
                        let now: Vec<String> = [
                            floors.cosine.map(|c| format!("cosine ≥ {c:.5}")),
                            floors.top1.map(|t| format!("top-1 ≥ {:.2}%", 100.0 * t)),
                        ]
                        .into_iter()
                        .flatten()
                        .collect();
                        notes.push(format!(
                            "with every activation float the output retention on the calibration \
                             data is already below the floors (cosine {:.5}{}): the activations may \
                             cost what the floors allow on top of that ({})",
                            base.cosine,
                            base.top1
                                .map(|t| format!(", top-1 {:.2}%", 100.0 * t))
                                .unwrap_or_default(),
                            now.join(", ")
                        ));
                        if floors.meets(&r) {
                            break;
                        }
                    }
                    // Measure every quantized tensor alone, to know what costs the most.
                    let mut cost = Vec::new();
                    let quantized: Vec<String> = ranges.keys().cloned().collect();
                    let progress =
                        crate::util::Progress::new(quantized.len() as u64, "measuring tensors");
                    for t in quantized {
                        let one: BTreeMap<String, Range> =
                            [(t.clone(), ranges[&t])].into_iter().collect();
                        let (m, _, _) = build(&one, true, finish)?;
                        let r = score(&m, Some(ALONE_BATCHES))?;
                        // Ranked by the output's noise power, which adds up over independent
                        // tensors; top-1 flips are few and fall on near ties, which ranks by chance.
                        let c = r.nsr;
                        if let Some(rep) = tensors.iter_mut().find(|x| x.name == t) {
                            rep.alone = Some(r);
                        }
                        cost.push((c, t));
                        progress.inc(1);
                    }
                    progress.finish();
                    cost.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    order.insert(cost.into_iter().map(|c| c.1).collect())
                }
            };
            if floors.meets(&r) || next >= order.len() {
                if !floors.meets(&r) {
                    notes.push(format!(
                        "output retention on the calibration data (cosine {:.5}{}) stays below \
                         the floors with every activation float",
                        r.cosine,
                        r.top1
                            .map(|t| format!(", top-1 {:.2}%", 100.0 * t))
                            .unwrap_or_default()
                    ));
                }
                break;
            }
            for t in order.iter().skip(next).take(step) {
                ranges.remove(t);
                if let Some(rep) = tensors.iter_mut().find(|x| &x.name == t) {
                    rep.quantized = false;
                    rep.note = Some(format!(
                        "back to float: output cosine {:.5}{} on the calibration data",
                        r.cosine,
                        r.top1
                            .map(|t| format!(", top-1 {:.2}%", 100.0 * t))
                            .unwrap_or_default()
                    ));
                }
            }
            next += step;
            // One at a time at first; past 8, twice as many each round.
            if next >= 8 {
                step *= 2;
            }
            (candidate, reports, paired) = build(&ranges, false, finish)?;
        }
        let r = last;
        if let (Some(floor), Some(t), Some(n)) = (floors.top1, r.top1, r.top1_rows)
            && t < floor
            && floors.meets(&r)
        {
            let flips = ((1.0 - t) * n as f64).round() as u64;
            notes.push(format!(
                "top-1 agreement {:.2}% on the calibration data is below the floor {:.2}%: \
                 {flips} of {n} rows flipped, which rows flipping at the floor's rate ({:.2}%) \
                 give with probability {:.2}, so the floor holds",
                100.0 * t,
                100.0 * floor,
                100.0 * (1.0 - floor),
                flips_tail(flips, n, 1.0 - floor)
            ));
        }
    }
    // Tensors with a range that no integer site reads or writes (their Conv stayed float).
    for t in tensors.iter_mut() {
        if t.quantized && !paired.contains(&t.name) {
            t.quantized = false;
            t.note = Some("float: no site that reads or writes it is integer".into());
        }
    }
    reports.extend(declined);
    let quantized = reports.iter().filter(|r| r.form.is_some()).count();
    let report = ActivationReport {
        weight_bytes_before: reports.iter().map(|r| r.bytes_before).sum(),
        weight_bytes_after: reports.iter().map(|r| r.bytes_after).sum(),
        mode: policy.mode,
        method: match policy.mode {
            Mode::Static => policy.method.label(),
            Mode::Dynamic => "dynamic (per batch min/max)".into(),
        },
        float: reports.len() - quantized,
        quantized,
        sites: reports,
        tensors,
        checks,
        smoothing: smoothing.map(|s| s.reports.clone()).unwrap_or_default(),
        notes,
    };
    Ok((candidate, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_floor_allows_the_flips_chance_gives_at_its_rate() {
        // Binomial tails against hand-computed values: n = 64, p = 0.002.
        assert_eq!(flips_tail(0, 64, 0.002), 1.0);
        assert!((flips_tail(1, 64, 0.002) - (1.0 - 0.998f64.powi(64))).abs() < 1e-12);
        let two = 1.0 - 0.998f64.powi(64) - 64.0 * 0.002 * 0.998f64.powi(63);
        assert!((flips_tail(2, 64, 0.002) - two).abs() < 1e-12);
        // Large n does not underflow: 1000 rows at 0.2% expect 2 flips.
        let t = flips_tail(2, 1000, 0.002);
        assert!(t > 0.5 && t < 0.7, "{t}");
        assert!(flips_tail(10, 1000, 0.002) < 1e-3);
        let floors = Floors {
            cosine: Some(0.995),
            top1: Some(0.998),
        };
        let r = |top1: f64, rows: Option<u64>| Retention {
            cosine: 0.999,
            top1: Some(top1),
            top1_rows: rows,
            nsr: 0.0,
            similarity: None,
            sequence: None,
        };
        // One flip in 256 (P = 0.40) passes, two (P = 0.09) do not; without a count, the figure
        // is held to the floor as it is.
        assert!(floors.meets(&r(255.0 / 256.0, Some(256))));
        assert!(!floors.meets(&r(254.0 / 256.0, Some(256))));
        assert!(!floors.meets(&r(255.0 / 256.0, None)));
        // On 5000 rows the floor's rate expects 10 flips: 20 are not chance, 8 are within it.
        assert!(!floors.meets(&r(0.996, Some(5000))));
        assert!(floors.meets(&r(0.9984, Some(5000))));
    }

    #[test]
    fn floors_missed_with_every_activation_float_count_from_that_model() {
        let floors = Floors {
            cosine: Some(0.995),
            top1: Some(0.998),
        };
        let r = |cosine: f64, top1: Option<f64>| Retention {
            cosine,
            top1,
            top1_rows: None,
            nsr: 0.0,
            similarity: None,
            sequence: None,
        };
        // Both missed: each allowance is counted from the all-float figures.
        let f = floors.on_top_of(&r(0.99, Some(0.98)));
        assert!((f.cosine.unwrap() - 0.985).abs() < 1e-12);
        assert!((f.top1.unwrap() - 0.978).abs() < 1e-12);
        assert!(f.meets(&r(0.986, Some(0.979))) && !f.meets(&r(0.984, Some(0.99))));
        // Only top-1 missed: the cosine floor stays; outputs without classes have no top-1.
        let f = floors.on_top_of(&r(0.999, Some(0.95)));
        assert_eq!(f.cosine, Some(0.995));
        assert!((f.top1.unwrap() - 0.948).abs() < 1e-12);
        let f = floors.on_top_of(&r(0.99, None));
        assert_eq!(f.top1, Some(0.998));
        assert!(f.meets(&r(0.9851, None)));
        // A model that reaches the floors leaves them as they are.
        let f = floors.on_top_of(&r(0.9999, Some(1.0)));
        assert_eq!((f.cosine, f.top1), (Some(0.995), Some(0.998)));
    }

    #[test]
    fn saturation_fix_touches_only_channels_at_risk() {
        // Channel 0: two neighbouring large positive weights (255·(127+127) overflows 16 bits).
        // Channel 1: large weights of alternating sign (no pair can overflow).
        let k = 4;
        let w = [1.0f32, 1.0, 0.1, 0.1, 1.0, -1.0, 1.0, -1.0];
        let mut codes: Vec<i32> = vec![127, 127, 13, 13, 127, -127, 127, -127];
        let mut scales = vec![1.0 / 127.0; 2];
        let before = scales.clone();
        let fixed = fix_saturation(&w, &mut codes, &mut scales, k, &CodeBound::any(k, true));
        assert_eq!(fixed, 1);
        assert_eq!(scales[1], before[1]);
        assert_eq!(&codes[4..], &[127, -127, 127, -127]);
        assert!(scales[0] > before[0]);
        let pair = codes[0] + codes[1];
        assert!(255 * pair <= 32767, "{codes:?}");
        // Without pair structure (Conv in NHWC order) the two largest of one sign count.
        let mut codes2: Vec<i32> = vec![127, 13, 127, 13];
        let mut s2 = vec![1.0 / 127.0];
        assert_eq!(
            fix_saturation(
                &[1.0, 0.1, 1.0, 0.1],
                &mut codes2,
                &mut s2,
                4,
                &CodeBound::any(4, false)
            ),
            1
        );
        assert!(255 * (codes2[0] + codes2[2]) <= 32767);
    }

    #[test]
    fn calibrated_codes_leave_safe_channels_alone() {
        // Every pair of both channels holds two large weights of one sign: any u8 input could
        // overflow them.
        let k = 4;
        let w = [1.0f32; 8];
        let start: Vec<i32> = vec![127; 8];
        let s0 = vec![1.0 / 127.0; 2];
        // A one-hot input: each pair's codes sum to at most 255, so nothing can overflow.
        let one_hot = CodeBound {
            index: vec![255; k],
            pair: vec![255; 2],
            pairs: true,
        };
        let (mut codes, mut scales) = (start.clone(), s0.clone());
        assert_eq!(fix_saturation(&w, &mut codes, &mut scales, k, &one_hot), 0);
        assert_eq!((codes, scales), (start.clone(), s0.clone()));
        // Channels whose codes stay under 129 cannot overflow either (128·127·2 = 32512).
        let low = CodeBound {
            index: vec![128; k],
            pair: vec![256; 2],
            pairs: true,
        };
        let (mut codes, mut scales) = (start.clone(), s0.clone());
        assert_eq!(fix_saturation(&w, &mut codes, &mut scales, k, &low), 0);
        // One index reaching 255 in the second pair: that pair is widened just enough, in both
        // channels, and the bound holds after.
        let mut hot = low.clone();
        hot.index[3] = 255;
        hot.pair[1] = 383;
        let (mut codes, mut scales) = (start.clone(), s0.clone());
        assert_eq!(fix_saturation(&w, &mut codes, &mut scales, k, &hot), 2);
        for c in 0..2 {
            let r = &codes[c * k..(c + 1) * k];
            assert!(128 * r[2] + 255 * r[3] <= 32767, "{r:?}");
            assert!(
                128 * r[2] + 255 * r[3] > 32767 - 2 * 383,
                "widened too far: {r:?}"
            );
        }
        // Any-two (Conv): the two largest code·weight products of one sign count.
        let conv = CodeBound {
            index: vec![255, 10, 10, 255],
            pair: vec![265, 265],
            pairs: false,
        };
        let (mut codes, mut scales) = (start.clone(), s0);
        assert_eq!(fix_saturation(&w, &mut codes, &mut scales, k, &conv), 2);
        assert!(255 * (codes[0] + codes[3]) <= 32767);
    }
}
