//! Activation smoothing (SmoothQuant-style scale migration) before static W8A8.
//!
//! A few input channels of a MatMul often carry most of an activation tensor's range (transformers'
//! LayerNorm outputs, GELU outputs), so one per-tensor u8 scale spends its codes on them and the other
//! channels round coarsely. For a product `X·W` the factor `s_j` of each input channel `j` can move
//! from the activation to the weight: `X·W = (X·diag(1/s))·(diag(s)·W)`. With
//! `s_j = max|X_j|^α / max|W_j|^(1−α)` the activation's channels become more even, the weight's rows
//! less so; the weight has per-channel scales along the other axis and absorbs it better.
//!
//! Every `s_j` is rounded to a power of two, so both multiplications are exact in f32: the smoothed
//! float model computes what the original does, bit for bit (barring overflow). A `Mul` by `1/s`
//! feeds the smoothed readers; other readers of the tensor keep the original.
//!
//! Weights are shared: one weight read by several tensors' products (repeated layers tied through
//! `Identity`) must be scaled once, so tensors and weights linked by products form one group with one
//! `s`, from the largest activation of any of its tensors. A group is left alone when one of its weights
//! is read by anything other than its products (a Gather, a subgraph, a site not smoothed).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::{Layout, Site};
use crate::calib::ChannelStats;
use crate::error::Result;
use crate::ir::{Graph, Model, Patch};
use crate::onnx::dtype::DataType;
use crate::onnx::tensor::to_f32;
use crate::passes::quantize_weights::emit::f32_tensor;

/// What smoothing did to one group of tensors and weights.
#[derive(Clone, Debug, Serialize)]
pub struct SmoothReport {
    pub tensors: Vec<String>,
    /// What the group's products read instead of each tensor (empty when left alone).
    pub smoothed: Vec<String>,
    pub weights: Vec<String>,
    /// Input channels, and how many got a factor other than 1.
    pub channels: usize,
    pub scaled: usize,
    /// The largest channel range over the median one, before and after.
    pub spread_before: f32,
    pub spread_after: f32,
    /// The strength α chosen, and by how much it lowers the estimated product error.
    pub alpha: f64,
    pub estimated_gain_db: f64,
    /// The factor per input channel (empty when left alone).
    #[serde(skip)]
    pub factors: Vec<f32>,
    /// Why the group was left alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The tensor and its channel axis that smoothing needs per-channel maxima of, for each site it can
/// smooth: products with a constant weight whose input channels are one axis of the activation.
pub fn tensors_to_measure(model: &Model, sites: &[Site]) -> Vec<(String, i64)> {
    let mut out = BTreeSet::new();
    for s in sites {
        if let Some(axis) = channel_axis(&model.graph, s) {
            out.insert((s.activations[0].1.clone(), axis));
        }
    }
    out.into_iter().collect()
}

/// The activation axis holding a site's input channels, when the site can be smoothed.
fn channel_axis(g: &Graph, s: &Site) -> Option<i64> {
    if s.activations.len() != 1 || s.activations[0].0 != 0 || s.weight.is_none() {
        return None;
    }
    match s.layout {
        Layout::KN | Layout::NK => Some(-1),
        Layout::Conv => (g.node(s.node).int_attribute("group").unwrap_or(1) == 1).then_some(1),
    }
}

/// Visits every element of a weight as (input channel, output channel, flat index); returns the
/// number of input channels.
fn for_each_channel(layout: Layout, dims: &[i64], mut f: impl FnMut(usize, usize, usize)) -> usize {
    let d: Vec<usize> = dims.iter().map(|&x| x.max(0) as usize).collect();
    match layout {
        // [K, N]: row j.
        Layout::KN => {
            let (k, n) = (d[0], d[1]);
            for j in 0..k {
                for o in 0..n {
                    f(j, o, j * n + o);
                }
            }
            k
        }
        // [N, K]: column j.
        Layout::NK => {
            let (n, k) = (d[0], d[1]);
            for o in 0..n {
                for j in 0..k {
                    f(j, o, o * k + j);
                }
            }
            k
        }
        // [M, C, k…]: axis 1.
        Layout::Conv => {
            let (m, c) = (d[0], d[1]);
            let inner: usize = d[2..].iter().product();
            for o in 0..m {
                for j in 0..c {
                    for i in 0..inner {
                        f(j, o, (o * c + j) * inner + i);
                    }
                }
            }
            c
        }
    }
}

/// How strongly to smooth.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Strength {
    /// Always this α.
    Alpha(f64),
    /// Per group, the α of [`AUTO_GRID`] (or none) with the lowest [`estimated_noise`].
    Auto,
}

/// The strengths `Strength::Auto` chooses from.
pub const AUTO_GRID: [f64; 6] = [0.2, 0.35, 0.5, 0.6, 0.7, 0.85];

/// `Strength::Auto` smooths a group only when its best strength lowers the estimated product error by
/// this much (half the noise power): the estimate leaves out clipping, which already tames a few
/// outliers, and each smoothed tensor costs a `Mul` at run time.
pub const AUTO_MIN_GAIN_DB: f64 = 3.0;

/// The expected squared error that 8-bit rounding adds to a group's products when input channel `j`
/// is divided by `s[j]` in the activation and multiplied into the weights (up to a common factor):
/// the activation's step (one per tensor, from the largest smoothed channel range) times the smoothed
/// weights' energy, plus each output channel's weight step (or the tensor's, without per-channel
/// scales) times the smoothed activations' energy.
/// Clipping and the exact u8 zero point are left out: the figure only ranks strengths.
fn estimated_noise(
    s: &[f32],
    act: &[f32],
    energy: &[f64],
    weights: &BTreeMap<&str, (Layout, Vec<f32>, Vec<i64>)>,
    per_channel: bool,
) -> f64 {
    let range = act
        .iter()
        .zip(s)
        .map(|(&a, &s)| (a / s) as f64)
        .fold(0f64, f64::max);
    let step_x = 2.0 * range / 255.0;
    let mut noise = 0f64;
    for (layout, v, dims) in weights.values() {
        let outputs = match layout {
            Layout::KN => dims[1],
            _ => dims[0],
        }
        .max(0) as usize;
        let mut wmax = vec![0f64; outputs];
        let mut sq = 0f64;
        for_each_channel(*layout, dims, |j, o, at| {
            let w = s[j] as f64 * v[at] as f64;
            sq += w * w;
            wmax[o] = wmax[o].max(w.abs());
        });
        if !per_channel {
            // One weight scale per tensor (static below opset 13).
            let top = wmax.iter().copied().fold(0f64, f64::max);
            wmax.iter_mut().for_each(|w| *w = top);
        }
        noise += step_x * step_x * sq;
        for_each_channel(*layout, dims, |j, o, _| {
            let step_w = wmax[o] / 127.0;
            let x = 1.0 / s[j] as f64;
            noise += step_w * step_w * energy[j] * x * x;
        });
    }
    noise
}

fn spread(x: &[f32]) -> f32 {
    let mut v: Vec<f32> = x.iter().copied().filter(|v| v.is_finite()).collect();
    if v.is_empty() {
        return 1.0;
    }
    v.sort_by(f32::total_cmp);
    let med = v[v.len() / 2];
    if med > 0.0 { v[v.len() - 1] / med } else { 1.0 }
}

/// A power of two near `a^α / w^(1−α)`, or 1 where a channel has no range in either.
fn factor(a: f32, w: f32, alpha: f64) -> f32 {
    if !(a > 0.0 && w > 0.0 && a.is_finite() && w.is_finite()) {
        return 1.0;
    }
    let log2 = alpha * (a as f64).log2() - (1.0 - alpha) * (w as f64).log2();
    (log2.round().clamp(-24.0, 24.0) as i32 as f32).exp2()
}

/// Smoothing of one model, decided once: its sites, their channel statistics and each group's
/// factors, so that the model can be smoothed again with some groups left alone (when the fallback
/// sends their tensors back to float, their weights go back to the unsmoothed ones).
pub struct Smoothing<'a> {
    pub reference: &'a Model,
    pub sites: Vec<Site>,
    pub stats: BTreeMap<(String, i64), ChannelStats>,
    /// What was decided per group (with the factors) when every group was smoothed.
    pub reports: Vec<SmoothReport>,
}

impl<'a> Smoothing<'a> {
    /// Decides every group's factors; returns them with the reference fully smoothed.
    pub fn new(
        reference: &'a Model,
        sites: Vec<Site>,
        stats: BTreeMap<(String, i64), ChannelStats>,
        strength: Strength,
        mode: super::Mode,
    ) -> Result<(Smoothing<'a>, Model)> {
        let mut m = reference.clone();
        let per_channel = super::weights_per_channel(reference, mode);
        let reports = smooth(
            &mut m,
            &sites,
            &stats,
            Decide::Search(strength),
            per_channel,
        )?;
        let s = Smoothing {
            reference,
            sites,
            stats,
            reports,
        };
        Ok((s, m))
    }

    /// The reference with only the groups smoothed some of whose smoothed tensors `integer` holds,
    /// with the factors decided in [`Smoothing::new`].
    pub fn model_for(&self, integer: &dyn Fn(&str) -> bool) -> Result<Model> {
        let keep: Vec<&SmoothReport> = self
            .reports
            .iter()
            .filter(|r| r.smoothed.iter().any(|t| integer(t)))
            .collect();
        let mut m = self.reference.clone();
        smooth(&mut m, &self.sites, &self.stats, Decide::Given(&keep), true)?;
        Ok(m)
    }
}

/// Smoothing as activation quantization uses it: channel statistics of `reference` over `inputs`, every
/// group's factors decided, and the fully smoothed model, spilled into `folder` (see [`Model::spill`])
/// so that its new weights are file pages rather than memory held beside a runtime's copy. The
/// reference's weight pages are let go too (smoothing read them all).
pub fn measure_and_smooth<'a>(
    reference: &'a Model,
    sites: Vec<Site>,
    policy: &super::ActivationPolicy,
    inputs: &mut crate::exec::inputs::InputSet,
    runtime: crate::exec::RuntimeKind,
    session: &crate::exec::SessionOptions,
    folder: &std::path::Path,
) -> anyhow::Result<(Smoothing<'a>, Model)> {
    use anyhow::Context;
    let wanted = tensors_to_measure(reference, &sites);
    let stats = crate::calib::channel_stats(reference, &wanted, inputs, runtime, session)
        .context("measuring channel ranges for smoothing failed")?;
    let strength = policy.smooth.unwrap_or(Strength::Auto);
    let (smoothing, mut smoothed) = Smoothing::new(reference, sites, stats, strength, policy.mode)?;
    smoothed
        .spill(folder)
        .context("cannot write the smoothed weights")?;
    reference.release_pages();
    Ok((smoothing, smoothed))
}

/// Where a group's factors come from.
#[derive(Clone, Copy)]
pub enum Decide<'r> {
    /// Chosen by the strength (a search over [`AUTO_GRID`] for `Auto`).
    Search(Strength),
    /// Taken from these reports (matched by the group's tensors); groups not among them are left
    /// alone.
    Given(&'r [&'r SmoothReport]),
}

/// Smooths `model`'s sites given each measured tensor's channel statistics (keyed as
/// [`tensors_to_measure`] names them), with factors as `decide` says; a search estimates the weights'
/// rounding with one scale per output channel when `per_channel`, else one per tensor. Returns what
/// was done per group; the model is changed only where a group was smoothed.
pub fn smooth(
    model: &mut Model,
    sites: &[Site],
    stats: &BTreeMap<(String, i64), ChannelStats>,
    decide: Decide,
    per_channel: bool,
) -> Result<Vec<SmoothReport>> {
    let g = &model.graph;
    let consts = super::main_graph_constants(model);
    // Sites that can be smoothed, with their activation's maxima.
    let mut ok: Vec<(&Site, i64, &ChannelStats)> = Vec::new();
    for s in sites {
        let Some(axis) = channel_axis(g, s) else {
            continue;
        };
        let t = &s.activations[0].1;
        if let Some(m) = stats.get(&(t.clone(), axis)) {
            ok.push((s, axis, m));
        }
    }
    // Groups: tensors and weights linked by products (union-find over the sites).
    let mut parent: Vec<usize> = (0..ok.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    let mut first_of: HashMap<String, usize> = HashMap::new();
    for (i, (s, _, _)) in ok.iter().enumerate() {
        let keys = [
            format!("t:{}", s.activations[0].1),
            format!("w:{}", s.weight.as_ref().unwrap().1),
        ];
        for k in keys {
            match first_of.get(&k) {
                Some(&j) => {
                    let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                    parent[a.max(b)] = a.min(b);
                }
                None => {
                    first_of.insert(k, i);
                }
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..ok.len() {
        groups.entry(root(&mut parent, i)).or_default().push(i);
    }
    // Who reads each constant, seeing through Identity ties: (node, slot) of every non-Identity reader.
    let alias = super::tie_aliases(g, |n| consts.contains_key(n));
    let mut readers: HashMap<String, Vec<(crate::ir::NodeId, usize)>> = HashMap::new();
    for (id, n) in g.nodes() {
        let tie = n.op_type == "Identity"
            && n.outputs()
                .first()
                .copied()
                .flatten()
                .is_some_and(|o| alias.contains_key(g.value_name(o)));
        for (slot, v) in n.inputs().iter().enumerate() {
            let Some(v) = v else { continue };
            let name = g.value_name(*v).to_string();
            let name = alias.get(&name).cloned().unwrap_or(name);
            if !tie {
                readers.entry(name).or_default().push((id, slot));
            }
        }
    }
    // Names read from inside subgraphs (outer-scope references).
    let mut inner = BTreeSet::new();
    for (_, n) in g.nodes() {
        for sg in n.subgraphs() {
            collect_inputs(sg, &mut inner);
        }
    }

    let mut patch = Patch::new("smooth-activations");
    let names = &mut model.names;
    let mut reports = Vec::new();
    let mut scaled_weights: Vec<(String, String)> = Vec::new();
    for members in groups.values() {
        let tensors: BTreeSet<&str> = members
            .iter()
            .map(|&i| ok[i].0.activations[0].1.as_str())
            .collect();
        let weights: BTreeSet<&str> = members
            .iter()
            .map(|&i| ok[i].0.weight.as_ref().unwrap().1.as_str())
            .collect();
        let mut report = SmoothReport {
            tensors: tensors.iter().map(|t| t.to_string()).collect(),
            smoothed: Vec::new(),
            weights: weights.iter().map(|w| w.to_string()).collect(),
            channels: 0,
            scaled: 0,
            spread_before: 1.0,
            spread_after: 1.0,
            alpha: 0.0,
            estimated_gain_db: 0.0,
            factors: Vec::new(),
            note: None,
        };
        let given = match decide {
            Decide::Search(_) => None,
            Decide::Given(rs) => match rs.iter().find(|r| r.tensors == report.tensors) {
                Some(r) => Some(*r),
                None => {
                    report.note = Some("its tensors stay float".into());
                    reports.push(report);
                    continue;
                }
            },
        };
        // Every reader of every weight must be one of the group's products, at the weight's slot.
        let products: BTreeSet<(crate::ir::NodeId, usize)> = members
            .iter()
            .map(|&i| (ok[i].0.node, ok[i].0.weight.as_ref().unwrap().0))
            .collect();
        let foreign = weights.iter().find(|w| {
            inner.contains(**w)
                || g.value_id(w).is_some_and(|v| g.is_output(v))
                || readers
                    .get(**w)
                    .is_some_and(|r| r.iter().any(|x| !products.contains(x)))
        });
        if let Some(w) = foreign {
            report.note = Some(format!("weight '{w}' has other readers"));
            reports.push(report);
            continue;
        }
        // The activation maxima per channel (largest over the group's tensors).
        let k = ok[members[0]].2.absmax.len();
        if members.iter().any(|&i| ok[i].2.absmax.len() != k) {
            report.note = Some("tensors of different channel counts".into());
            reports.push(report);
            continue;
        }
        let mut act = vec![0f32; k];
        let mut energy = vec![0f64; k];
        for &i in members {
            for (a, &m) in act.iter_mut().zip(&ok[i].2.absmax) {
                *a = a.max(m as f32);
            }
            for (e, &m) in energy.iter_mut().zip(&ok[i].2.mean_square) {
                *e = e.max(m);
            }
        }
        // The weights' maxima per input channel, over every weight of the group.
        let mut wmax = vec![0f32; k];
        let mut decoded: BTreeMap<&str, (Layout, Vec<f32>, Vec<i64>)> = BTreeMap::new();
        let mut bad = None;
        for &i in members {
            let s = ok[i].0;
            let w = s.weight.as_ref().unwrap().1.as_str();
            if decoded.contains_key(w) {
                continue;
            }
            let c = &consts[w];
            if c.dtype() != Some(DataType::Float) {
                bad = Some(format!("weight '{w}' is not f32"));
                break;
            }
            let v = to_f32(&c.tensor).map_err(|e| crate::error::Error::Tensor {
                place: "smoothing".into(),
                tensor: w.to_string(),
                reason: e,
            })?;
            // The decoded copy is what is read from here on.
            crate::onnx::release_pages(&c.tensor.raw_data);
            let channels = for_each_channel(s.layout, c.shape(), |j, _, at| {
                if j < k {
                    wmax[j] = wmax[j].max(v[at].abs());
                }
            });
            if channels != k {
                bad = Some(format!(
                    "weight '{w}' has {channels} input channels, its activations {k}"
                ));
                break;
            }
            decoded.insert(w, (s.layout, v, c.shape().to_vec()));
        }
        if let Some(b) = bad {
            report.note = Some(b);
            reports.push(report);
            continue;
        }
        // The factors: decided before, the given strength, or the one of a grid (none included)
        // with the lowest estimated product error.
        let s = match (decide, given) {
            (_, Some(r)) => {
                report.alpha = r.alpha;
                report.estimated_gain_db = r.estimated_gain_db;
                r.factors.clone()
            }
            (Decide::Search(strength), None) => {
                let candidates: Vec<f64> = match strength {
                    Strength::Alpha(a) => vec![a],
                    Strength::Auto => AUTO_GRID.to_vec(),
                };
                let ones = vec![1f32; k];
                let base = estimated_noise(&ones, &act, &energy, &decoded, per_channel);
                let mut best: Option<(f64, f64, Vec<f32>)> = None;
                for &alpha in &candidates {
                    let s: Vec<f32> = act
                        .iter()
                        .zip(&wmax)
                        .map(|(&a, &w)| factor(a, w, alpha))
                        .collect();
                    let noise = estimated_noise(&s, &act, &energy, &decoded, per_channel);
                    if best.as_ref().is_none_or(|b| noise < b.1) {
                        best = Some((alpha, noise, s));
                    }
                }
                let (alpha, noise, s) = best.unwrap();
                report.alpha = alpha;
                report.estimated_gain_db = 10.0 * (base / noise).log10();
                if strength == Strength::Auto && report.estimated_gain_db < AUTO_MIN_GAIN_DB {
                    report.note = Some(format!(
                        "the best strength lowers the estimated error by less than \
                         {AUTO_MIN_GAIN_DB} dB"
                    ));
                    ones
                } else {
                    s
                }
            }
            (Decide::Given(_), None) => unreachable!("groups not given were left alone above"),
        };
        report.channels = k;
        report.scaled = s.iter().filter(|&&x| x != 1.0).count();
        report.spread_before = spread(&act);
        let after: Vec<f32> = act.iter().zip(&s).map(|(a, s)| a / s).collect();
        report.spread_after = spread(&after);
        if report.scaled == 0 {
            report
                .note
                .get_or_insert_with(|| "every factor is 1".into());
            reports.push(report);
            continue;
        }
        report.factors = s.clone();
        // Weights: row j times s_j (exact: powers of two).
        for (w, (layout, mut v, dims)) in decoded {
            for_each_channel(layout, &dims, |j, _, at| v[at] *= s[j]);
            let name = patch.constant(
                names,
                &format!("{}_smoothed", w.replace(['/', ':'], "_")),
                f32_tensor(&dims, &v),
            );
            scaled_weights.push((w.to_string(), name));
        }
        // Activations: one Mul by 1/s per tensor, read by the group's products only; tensors of one
        // rank share the constant.
        let inv: Vec<f32> = s.iter().map(|s| 1.0 / s).collect();
        let mut scale_of_rank: BTreeMap<Vec<i64>, String> = BTreeMap::new();
        for t in &tensors {
            let (axis, rank) = members
                .iter()
                .find(|&&i| ok[i].0.activations[0].1 == *t)
                .map(|&i| {
                    let s = ok[i].0;
                    let rank = consts[&s.weight.as_ref().unwrap().1].shape().len();
                    (ok[i].1, rank)
                })
                .unwrap();
            // Broadcast along the channel axis: [K] for the last axis, [C, 1, …] for Conv's axis 1.
            let dims: Vec<i64> = if axis == -1 {
                vec![k as i64]
            } else {
                std::iter::once(k as i64)
                    .chain(std::iter::repeat_n(1, rank.saturating_sub(2)))
                    .collect()
            };
            let base = t.replace(['/', ':'], "_");
            let c = scale_of_rank
                .entry(dims.clone())
                .or_insert_with(|| {
                    patch.constant(
                        names,
                        &format!("{base}_smooth_scale"),
                        f32_tensor(&dims, &inv),
                    )
                })
                .clone();
            let out = patch.node(
                names,
                &format!("{base}_smooth"),
                "Mul",
                "",
                &[Some(t), Some(&c)],
                1,
                Vec::new(),
            );
            for &i in members {
                let site = ok[i].0;
                if site.activations[0].1 == *t {
                    patch.replace_input(site.node, site.activations[0].0, &out[0]);
                }
            }
            report.smoothed.push(out[0].clone());
        }
        reports.push(report);
    }
    for (from, to) in &scaled_weights {
        patch.replace_all_uses(from, to);
    }
    model.graph.apply(patch)?;
    // The unsmoothed weights are read by nothing now; kept, they would double what the model carries
    // (and what a runtime is handed) until the final clean-up.
    for (from, _) in &scaled_weights {
        if let Some(id) = model.graph.value_id(from) {
            model.graph.remove_unused_value(id);
        }
    }
    Ok(reports)
}

fn collect_inputs(g: &Graph, out: &mut BTreeSet<String>) {
    for (_, n) in g.nodes() {
        for v in n.inputs().iter().flatten() {
            out.insert(g.value_name(*v).to_string());
        }
        for sg in n.subgraphs() {
            collect_inputs(sg, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::pb::GraphProto;
    use crate::onnx::tensor::from_f32;
    use crate::passes::quantize_activations::{ActivationPolicy, plan};

    fn vi(name: &str, dims: &[i64]) -> crate::onnx::pb::ValueInfoProto {
        crate::onnx::tensor::tensor_value_info(name, DataType::Float as i32, dims)
    }

    /// `a = Relu(x)` and `b = Sigmoid(a·W)` both read W (b through an Identity tie), `a` also feeds a
    /// residual Add; `c = Tanh(x)` reads W3, which a Gather reads too.
    fn model() -> Model {
        let w: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 16.0)
            .collect();
        let w3: Vec<f32> = (0..32)
            .map(|i| ((i * 11 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let g = GraphProto {
            name: Some("g".into()),
            node: vec![
                crate::testing::node("Relu", &["x"], "a"),
                crate::testing::node("MatMul", &["a", "W"], "y1"),
                crate::testing::node("Sigmoid", &["y1"], "b"),
                crate::testing::node("Identity", &["W"], "Wt"),
                crate::testing::node("MatMul", &["b", "Wt"], "y2"),
                crate::testing::node("Add", &["a", "y2"], "r"),
                crate::testing::node("Tanh", &["x"], "c"),
                crate::testing::node("MatMul", &["c", "W3"], "y3"),
                crate::testing::node("Gather", &["W3", "idx"], "g3"),
            ],
            initializer: vec![
                from_f32("W", &[8, 8], &w),
                from_f32("W3", &[8, 4], &w3),
                crate::passes::quantize_weights::emit::tensor(
                    DataType::Int64,
                    &[1],
                    1i64.to_le_bytes().to_vec(),
                )
                .tap_name("idx"),
            ],
            input: vec![vi("x", &[3, 8])],
            output: vec![vi("r", &[3, 8]), vi("y3", &[3, 4]), vi("g3", &[1, 4])],
            ..Default::default()
        };
        crate::testing::model_of(g, 17)
    }

    trait TapName {
        fn tap_name(self, name: &str) -> Self;
    }
    impl TapName for crate::onnx::pb::TensorProto {
        fn tap_name(mut self, name: &str) -> Self {
            self.name = name.into();
            self
        }
    }

    fn run(m: &Model, x: &[f32]) -> Vec<Vec<f32>> {
        crate::testing::run_f32(m, "x", &[3, 8], x)
    }

    #[test]
    fn smoothing_is_exact_shares_tied_weights_and_spares_foreign_readers() {
        let reference = model();
        let (sites, _) = plan(&reference, &ActivationPolicy::default());
        let wanted = tensors_to_measure(&reference, &sites);
        let names: Vec<&str> = wanted.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        // Channel 3 of `a` carries a 40× outlier.
        let stats: BTreeMap<(String, i64), ChannelStats> = wanted
            .iter()
            .map(|(t, ax)| {
                let absmax: Vec<f64> = (0..8).map(|j| if j == 3 { 40.0 } else { 1.0 }).collect();
                let stats = ChannelStats {
                    mean_square: absmax.iter().map(|a| a * a / 4.0).collect(),
                    absmax,
                };
                ((t.clone(), *ax), stats)
            })
            .collect();
        let mut m = reference.clone();
        let reports = smooth(
            &mut m,
            &sites,
            &stats,
            Decide::Search(Strength::Alpha(0.5)),
            true,
        )
        .unwrap();
        assert_eq!(reports.len(), 2, "{reports:?}");
        let tied = reports.iter().find(|r| r.tensors == ["a", "b"]).unwrap();
        assert_eq!(tied.weights, ["W"]);
        assert!(tied.note.is_none() && tied.scaled > 0, "{tied:?}");
        assert_eq!(tied.smoothed.len(), 2);
        assert!(tied.spread_after < tied.spread_before);
        let foreign = reports.iter().find(|r| r.tensors == ["c"]).unwrap();
        assert!(
            foreign
                .note
                .as_deref()
                .is_some_and(|n| n.contains("other readers")),
            "{foreign:?}"
        );
        crate::ir::check_model(&m).unwrap();
        // The unsmoothed W is gone (nothing reads it); W3, left alone, stays.
        assert!(m.graph.value_id("W").is_none());
        assert!(m.graph.value_id("W3").is_some());
        // Powers of two: the smoothed float model computes the same bits.
        let x: Vec<f32> = (0..24)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.37)
            .collect();
        assert_eq!(run(&reference, &x), run(&m, &x));
        // The residual Add still reads the original `a`; both products read smoothed tensors.
        let g = &m.graph;
        for (_, n) in g.nodes() {
            let ins: Vec<&str> = n
                .inputs()
                .iter()
                .flatten()
                .map(|v| g.value_name(*v))
                .collect();
            match n.op_type.as_str() {
                "Add" => assert_eq!(ins[0], "a"),
                "MatMul" if ins[0] != "c" => assert!(tied.smoothed.iter().any(|s| s == ins[0])),
                _ => {}
            }
        }
        // Given the decided factors the same model comes back; given none, the model as it was.
        let mut again = reference.clone();
        smooth(&mut again, &sites, &stats, Decide::Given(&[tied]), true).unwrap();
        assert_eq!(again.to_proto(), m.to_proto());
        let mut same = reference.clone();
        smooth(&mut same, &sites, &stats, Decide::Given(&[]), true).unwrap();
        assert_eq!(
            same.graph.node_ids().len(),
            reference.graph.node_ids().len()
        );
    }

    #[test]
    fn auto_leaves_even_channels_alone() {
        let reference = model();
        let (sites, _) = plan(&reference, &ActivationPolicy::default());
        let stats: BTreeMap<(String, i64), ChannelStats> = tensors_to_measure(&reference, &sites)
            .into_iter()
            .map(|k| {
                let s = ChannelStats {
                    mean_square: vec![0.25; 8],
                    absmax: vec![1.0; 8],
                };
                (k, s)
            })
            .collect();
        let mut m = reference.clone();
        let reports = smooth(&mut m, &sites, &stats, Decide::Search(Strength::Auto), true).unwrap();
        let tied = reports.iter().find(|r| r.tensors == ["a", "b"]).unwrap();
        assert_eq!(tied.scaled, 0, "{tied:?}");
        assert!(tied.note.is_some());
    }
}
