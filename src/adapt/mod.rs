//! Adaptive precision: which scheme each weight site can take, measured, and the allocation of
//! schemes to sites that meets a retention target or a bits-per-weight budget.
//!
//! - **Sensitivity** ([`sensitivity`]): for every weight site and every scheme of its menu, the
//!   site is encoded as the weight pass would encode it ([`simulate`]) and the model is run with
//!   only that site changed. The runs share one session of a *probe* model whose weights are graph
//!   inputs, so a candidate costs a few inferences, not a model build. Sites whose readers have an
//!   input Hessian on the calibration data take every scheme with error feedback, as the built
//!   model will. A cheap proxy — the relative output error `eᵀHe / wᵀHw` under that Hessian, else
//!   the weight error weighted by the calibrated energy of the input channels — prunes each site's
//!   menu to the schemes on its (bytes, proxy) Pareto front before anything runs; the rank
//!   correlation of proxy and measurement is reported. Results are cached per (model, data,
//!   runtime, scheme).
//! - **Allocation** ([`allocate`]): each site's measured options form a lower convex hull in
//!   (bytes, output noise); upgrades sorted by noise removed per byte give a path of allocations
//!   from the smallest to the most precise (a Lagrangian sweep). Output noise adds up across sites
//!   to first order, which predicts each point; the points are then *measured* on the evaluation
//!   data, by bisection for a retention target or at the budget for bits per weight.
//! - The caller builds the chosen allocation with the real pass, measures the written graph, and
//!   repairs (raises the worst contributors) until the target holds ([`Allocation::raise_worst`]).

pub mod html;
pub mod shield;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::exec::{self, Named, RuntimeKind, Session, SessionOptions, Tensor};
use crate::ir::{Model, WeightSite};
use crate::onnx::pb::{GraphProto, ModelProto};
use crate::passes::quantize_weights::importance::ChannelEnergy;
use crate::passes::quantize_weights::{
    Decision, SiteInfo, WeightPolicy, simulate, site_info, sites_with_roles,
};
use crate::passes::roles::Role;
use crate::quant::gptq::Hessian;
use crate::quant::scheme::WeightScheme;
use crate::recipes::{Goal, MenuEntry, Metric, Pin, Recipe, scheme_yaml};
use crate::report::metrics::{Accumulator, OutputKind};
use crate::util::Progress;

/// How closely a run reproduces the reference: the worst output's noise-to-signal ratio
/// (Σ(r−c)²/Σr²), the lowest cosine, the lowest top-1 agreement of class-score outputs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub nsr: f64,
    pub cosine: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub top1: Option<f64>,
    /// Rows the (lowest) top-1 agreement was counted over.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub top1_rows: Option<u64>,
    /// The lowest similarity-ranking agreement of embedding outputs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub similarity: Option<f64>,
    /// The lowest share of sequences decoded alike, of per-step score outputs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sequence: Option<f64>,
}

impl Score {
    pub const EXACT: Score = Score {
        nsr: 0.0,
        cosine: 1.0,
        top1: None,
        top1_rows: None,
        similarity: None,
        sequence: None,
    };

    pub fn sqnr_db(&self) -> f64 {
        nsr_db(self.nsr)
    }

    /// The figure a metric reads (top-1, similarity and sequence agreement are 1 where no output is
    /// read that way).
    pub fn value(&self, m: Metric) -> f64 {
        match m {
            Metric::Cosine => self.cosine,
            Metric::Sqnr => self.sqnr_db(),
            Metric::Top1 => self.top1.unwrap_or(1.0),
            Metric::Similarity => self.similarity.unwrap_or(1.0),
            Metric::Sequence => self.sequence.unwrap_or(1.0),
        }
    }
}

/// SQNR in dB of a noise-to-signal ratio (+∞ for none).
pub fn nsr_db(nsr: f64) -> f64 {
    if nsr <= 0.0 {
        f64::INFINITY
    } else {
        -10.0 * nsr.log10()
    }
}

/// The metric a total noise-to-signal ratio predicts, for output noise uncorrelated with the
/// signal (cosine = 1/√(1+nsr)); None for top-1, which noise power does not predict.
pub fn predict(m: Metric, nsr: f64) -> Option<f64> {
    match m {
        Metric::Cosine => Some(1.0 / (1.0 + nsr).sqrt()),
        Metric::Sqnr => Some(nsr_db(nsr)),
        Metric::Top1 | Metric::Similarity | Metric::Sequence => None,
    }
}

/// How each output of `model` is read ([`crate::report::compare::output_kind`]).
pub fn output_kinds(model: &Model, outputs: &[String]) -> BTreeMap<String, OutputKind> {
    outputs
        .iter()
        .map(|o| (o.clone(), crate::report::compare::output_kind(model, o)))
        .collect()
}

/// Scores outputs against reference outputs, batch by batch, each read as `kinds` says (raw when
/// not listed).
pub fn score(
    reference: &[Vec<Named>],
    outputs: &[Vec<Named>],
    kinds: &BTreeMap<String, OutputKind>,
) -> Result<Score> {
    let mut accs: BTreeMap<&str, Accumulator> = BTreeMap::new();
    for (r, c) in reference.iter().zip(outputs) {
        for ((name, rt), (_, ct)) in r.iter().zip(c) {
            if rt.is_float() {
                accs.entry(name.as_str())
                    .or_default()
                    .add(rt, ct, kinds.get(name).copied().unwrap_or_default())
                    .with_context(|| format!("output '{name}'"))?;
            }
        }
    }
    let mut s = Score::EXACT;
    for a in accs.values() {
        let m = a.finish();
        let nsr = if m.sqnr_db.is_infinite() && m.sqnr_db > 0.0 {
            0.0
        } else {
            10f64.powf(-m.sqnr_db / 10.0)
        };
        s.nsr = s.nsr.max(nsr);
        s.cosine = s.cosine.min(m.cosine);
        if let Some(t) = m.top1_agreement
            && s.top1.is_none_or(|x| t < x)
        {
            s.top1 = Some(t);
            s.top1_rows = m.top1_rows;
        }
        if let Some(r) = m.similarity_rank {
            s.similarity = Some(s.similarity.map_or(r, |x| x.min(r)));
        }
        if let Some(q) = m.sequence_agreement {
            s.sequence = Some(s.sequence.map_or(q, |x| x.min(q)));
        }
    }
    Ok(s)
}

/// Runs a model whose weights are graph inputs on a fixed set of batches, with any weights
/// replaced, and scores the outputs against the model's own.
pub struct Probe {
    session: Box<dyn Session>,
    batches: Vec<Vec<Named>>,
    reference: Vec<Vec<Named>>,
    kinds: BTreeMap<String, OutputKind>,
    /// The lifted weights, with their original values (fed when not replaced).
    weights: Vec<(String, Tensor)>,
    position: HashMap<String, usize>,
    pub runs: usize,
}

impl Probe {
    /// Lifts `weights` (names of weight sites) into graph inputs and runs the reference outputs.
    pub fn new(
        model: &Model,
        weights: &[&WeightSite],
        batches: Vec<Vec<Named>>,
        runtime: RuntimeKind,
        opts: &SessionOptions,
    ) -> Result<Probe> {
        let proto = lift(model, weights);
        let prepared = exec::Prepared::from_proto(proto, "probe");
        let session = exec::open(&prepared, runtime, opts)
            .context("cannot open the sensitivity probe (the model with its weights as inputs)")?;
        let mut tensors = Vec::new();
        for site in weights {
            let t = Tensor::from_proto(&site.constant.tensor)
                .with_context(|| format!("weight '{}'", site.constant.name))?;
            tensors.push((site.constant.name.clone(), t));
        }
        let position = tensors
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let kinds = output_kinds(model, &prepared.outputs);
        let mut p = Probe {
            session,
            batches,
            reference: Vec::new(),
            kinds,
            weights: tensors,
            position,
            runs: 0,
        };
        p.reference = p.run(&HashMap::new())?;
        Ok(p)
    }

    pub fn batches(&self) -> usize {
        self.batches.len()
    }

    fn run(&mut self, replace: &HashMap<String, Arc<Vec<f32>>>) -> Result<Vec<Vec<Named>>> {
        let mut feeds: Vec<Named> = Vec::with_capacity(self.weights.len());
        for (name, original) in &self.weights {
            let t = match replace.get(name.as_str()) {
                Some(v) => with_values(original, v)
                    .with_context(|| format!("replacing weight '{name}'"))?,
                None => original.clone(),
            };
            feeds.push((name.clone(), t));
        }
        let mut out = Vec::with_capacity(self.batches.len());
        for (b, batch) in self.batches.iter().enumerate() {
            let mut inputs = batch.clone();
            inputs.extend(feeds.iter().cloned());
            out.push(
                self.session
                    .run(&inputs)
                    .with_context(|| format!("probe batch {b}"))?,
            );
        }
        self.runs += 1;
        Ok(out)
    }

    /// Runs a built model (its weights its own) on the probe's batches in a session of its own and
    /// scores it against the probe's reference outputs.
    pub fn score_model(
        &self,
        model: &Model,
        runtime: RuntimeKind,
        opts: &SessionOptions,
    ) -> Result<Score> {
        let mut s = exec::open(
            &exec::Prepared::from_model(model, "candidate"),
            runtime,
            opts,
        )?;
        let outputs = self
            .batches
            .iter()
            .enumerate()
            .map(|(b, batch)| s.run(batch).with_context(|| format!("batch {b}")))
            .collect::<Result<Vec<_>>>()?;
        score(&self.reference, &outputs, &self.kinds)
    }

    /// Scores the model with the given weights replaced by decoded values (weight layout).
    pub fn measure(&mut self, replace: &HashMap<String, Arc<Vec<f32>>>) -> Result<Score> {
        for name in replace.keys() {
            if !self.position.contains_key(name) {
                bail!("weight '{name}' is not an input of the probe");
            }
        }
        let outputs = self.run(replace)?;
        score(&self.reference, &outputs, &self.kinds)
    }
}

/// A tensor of the original's type and shape holding `values`.
fn with_values(original: &Tensor, values: &[f32]) -> Result<Tensor> {
    let shape = IxDyn(original.shape());
    Ok(match original {
        Tensor::F32(_) => Tensor::F32(ArrayD::from_shape_vec(shape, values.to_vec())?),
        Tensor::F16(_) => Tensor::F16(ArrayD::from_shape_vec(
            shape,
            values.iter().map(|&v| half::f16::from_f32(v)).collect(),
        )?),
        other => bail!("a {} weight cannot be replaced", other.dtype_name()),
    })
}

/// The model with the given weights turned into graph inputs of the main graph (constants inside
/// subgraphs then read them from the outer scope).
fn lift(model: &Model, weights: &[&WeightSite]) -> ModelProto {
    let mut proto = model.to_proto();
    let names: HashSet<&str> = weights.iter().map(|w| w.constant.name.as_str()).collect();
    let Some(g) = proto.graph.as_mut() else {
        return proto;
    };
    strip(g, &names);
    let declared: HashSet<String> = g.input.iter().map(|i| i.name.clone()).collect();
    for w in weights {
        let t = &w.constant.tensor;
        if declared.contains(&w.constant.name) {
            continue;
        }
        g.input.push(crate::onnx::tensor::tensor_value_info(
            &w.constant.name,
            t.data_type,
            &t.dims,
        ));
    }
    proto
}

/// Removes the initializers and Constant nodes that define `names`, here and in subgraphs.
fn strip(g: &mut GraphProto, names: &HashSet<&str>) {
    g.initializer.retain(|t| !names.contains(t.name.as_str()));
    g.node.retain(|n| {
        !(n.op_type.as_deref() == Some("Constant")
            && n.domain.as_deref().unwrap_or("").is_empty()
            && n.output.len() == 1
            && names.contains(n.output[0].as_str()))
    });
    for n in &mut g.node {
        for a in &mut n.attribute {
            if let Some(sub) = a.g.as_mut() {
                strip(sub, names);
            }
            for sub in &mut a.graphs {
                strip(sub, names);
            }
        }
    }
}

/// The input channels whose energy weights the proxy (and VQ clustering) of every site.
pub fn energy_requests(model: &Model) -> Vec<(String, i64)> {
    let mut out = std::collections::BTreeSet::new();
    for (site, _) in sites_with_roles(model) {
        if let Some(ms) = crate::passes::quantize_weights::importance::multiplicands(model, &site) {
            out.extend(ms.into_iter().map(|m| (m.tensor, m.axis)));
        }
    }
    out.into_iter().collect()
}

/// One option of a site: a menu scheme, a scheme a rule pinned, or float.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteOption {
    /// The menu name, `pinned` or `float`.
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub label: Option<String>,
    #[serde(skip)]
    pub scheme: Option<WeightScheme>,
    pub bytes: u64,
    #[serde(
        serialize_with = "crate::report::ser_db",
        deserialize_with = "crate::report::metrics::de_db",
        default = "inf"
    )]
    pub weight_sqnr_db: f64,
    /// Energy-weighted relative weight error (the proxy).
    #[serde(deserialize_with = "crate::report::metrics::de_db")]
    pub proxy_nsr: f64,
    /// Whether the proxy used calibrated energy.
    pub weighted: bool,
    /// The model's output with only this site changed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub measured: Option<Score>,
    /// Why it was not measured (dominated by the proxy) or is not available.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub note: Option<String>,
}

fn inf() -> f64 {
    f64::INFINITY
}

impl SiteOption {
    fn float(bytes: u64) -> SiteOption {
        SiteOption {
            name: "float".into(),
            label: None,
            scheme: None,
            bytes,
            weight_sqnr_db: f64::INFINITY,
            proxy_nsr: 0.0,
            weighted: false,
            measured: Some(Score::EXACT),
            note: None,
        }
    }

    /// Usable by the allocator: measured and available.
    pub fn usable(&self) -> bool {
        self.measured.is_some() && self.note.is_none()
    }
}

/// One weight site and its options.
#[derive(Clone, Debug, Serialize)]
pub struct SiteTable {
    pub weight: String,
    pub role: Role,
    pub op_types: Vec<String>,
    pub shape: Vec<i64>,
    pub params: u64,
    pub float_bytes: u64,
    /// A rule fixed its scheme.
    pub pinned: bool,
    pub options: Vec<SiteOption>,
}

/// The measured sensitivity of every site.
#[derive(Clone, Debug, Serialize)]
pub struct Sensitivity {
    pub sites: Vec<SiteTable>,
    pub menu: Vec<String>,
    pub runtime: RuntimeKind,
    /// Batches each candidate ran on.
    pub batches: usize,
    pub data: String,
    /// Candidates measured in this run, taken from the cache, and left unmeasured by the proxy.
    pub measured: usize,
    pub cached: usize,
    pub pruned: usize,
    /// Spearman rank correlation of proxy and measured output noise over the measured candidates.
    pub spearman: Option<f64>,
    /// The same within each site (mean over sites with ≥ 3 measured options).
    pub spearman_within_sites: Option<f64>,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_file: Option<PathBuf>,
}

/// The menu, pins, data and runtime of a sensitivity run.
pub struct SensitivityOptions<'a> {
    pub recipe: &'a Recipe,
    /// The allocation menu (the recipe's, or one given on the command line).
    pub menu: &'a [MenuEntry],
    pub runtime: RuntimeKind,
    pub session: SessionOptions,
    /// Where cached results live (None: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Measure every option, not only those on each site's proxy front.
    pub no_prune: bool,
    /// Bytes that identify the model (its file) for the cache key.
    pub model_key: Vec<u8>,
    /// What the data is, for reports.
    pub data: String,
}

/// The sites, their decoded options (kept for measuring allocations) and the probe.
pub struct Workspace<'m> {
    pub model: &'m Model,
    sites: Vec<WeightSite>,
    decisions: Vec<Vec<Option<WeightScheme>>>,
    energy: Option<ChannelEnergy>,
    hessians: Arc<Hessians>,
    decoded: HashMap<(usize, usize), Arc<Vec<f32>>>,
}

/// Input Hessians by weight name.
pub type Hessians = BTreeMap<String, Hessian>;

impl Workspace<'_> {
    /// The calibrated input-channel energy (None without data or readers that have it).
    pub fn energy(&self) -> Option<&ChannelEnergy> {
        self.energy.as_ref()
    }

    /// The input Hessians the sites' options were fed with (empty: every option rounded plain).
    pub fn hessians(&self) -> Arc<Hessians> {
        self.hessians.clone()
    }

    /// Decoded values of option `o` of site `s` (encoded again if not kept).
    fn values(&mut self, s: usize, o: usize) -> Result<Option<Arc<Vec<f32>>>> {
        let Some(scheme) = self.decisions[s][o] else {
            return Ok(None);
        };
        if let Some(v) = self.decoded.get(&(s, o)) {
            return Ok(Some(v.clone()));
        }
        let site = &self.sites[s];
        let h = self.hessians.get(&site.constant.name);
        let sim = simulate(self.model, site, &scheme, self.energy.as_ref(), h)?
            .map_err(|why| anyhow::anyhow!("weight '{}': {why}", self.sites[s].constant.name))?;
        let v = Arc::new(sim.values);
        self.decoded.insert((s, o), v.clone());
        Ok(Some(v))
    }

    /// The replacements an allocation feeds a probe.
    fn feeds(&mut self, choice: &[usize]) -> Result<HashMap<String, Arc<Vec<f32>>>> {
        let mut out = HashMap::new();
        for (s, &o) in choice.iter().enumerate() {
            if let Some(v) = self.values(s, o)? {
                out.insert(self.sites[s].constant.name.clone(), v);
            }
        }
        Ok(out)
    }

    /// The weights a probe lifts: every site with an option that changes it.
    pub fn lifted(&self) -> Vec<&WeightSite> {
        self.sites
            .iter()
            .zip(&self.decisions)
            .filter(|(_, d)| d.iter().any(|s| s.is_some()))
            .map(|(s, _)| s)
            .collect()
    }
}

/// The input Hessians that error feedback needs for the sites' options under the recipe's pins and
/// the menu: every site with a quantized option whose reader has an input Hessian (see
/// [`crate::passes::quantize_weights::hessian_requests`]).
pub fn feedback_requests(
    model: &Model,
    recipe: &Recipe,
    menu: &[MenuEntry],
) -> Vec<crate::calib::HessianRequest> {
    let (_, tables, decisions) = site_options(model, recipe, menu, &Hessians::new());
    let fed = Assignment(
        tables
            .iter()
            .zip(&decisions)
            .filter_map(|(t, d)| {
                let s = d.iter().flatten().map(|s| with_gptq(*s)).find(|s| s.gptq)?;
                Some((t.weight.clone(), Decision::Quantize(s)))
            })
            .collect(),
    );
    crate::passes::quantize_weights::hessian_requests(model, &fed)
}

/// The options of each site under the recipe's pins and the menu; sites with an input Hessian take
/// every scheme [`with_gptq`].
fn site_options(
    model: &Model,
    recipe: &Recipe,
    menu: &[MenuEntry],
    hessians: &Hessians,
) -> (
    Vec<WeightSite>,
    Vec<SiteTable>,
    Vec<Vec<Option<WeightScheme>>>,
) {
    let mut sites = Vec::new();
    let mut tables = Vec::new();
    let mut decisions = Vec::new();
    for (site, role) in sites_with_roles(model) {
        let info: SiteInfo = site_info(&site, role);
        let c = &site.constant;
        let (pinned, schemes): (bool, Vec<(String, Option<WeightScheme>)>) = match recipe.pin(&info)
        {
            Pin::Fixed(Decision::Skip(_)) => (true, vec![("float".into(), None)]),
            Pin::Fixed(Decision::Quantize(s)) => (true, vec![("pinned".into(), Some(s))]),
            Pin::Choose(idx) => (
                false,
                idx.iter()
                    .map(|&i| (menu[i].name.clone(), menu[i].scheme))
                    .collect(),
            ),
        };
        let fed = hessians.contains_key(&c.name);
        let mut options = Vec::new();
        let mut ds = Vec::new();
        for (name, scheme) in schemes {
            let scheme = scheme.map(|s| if fed { with_gptq(s) } else { s });
            match scheme {
                None => options.push(SiteOption::float(c.bytes())),
                Some(s) => options.push(SiteOption {
                    name,
                    label: Some(s.label()),
                    scheme: Some(s),
                    bytes: 0,
                    weight_sqnr_db: f64::NAN,
                    proxy_nsr: f64::NAN,
                    weighted: false,
                    measured: None,
                    note: None,
                }),
            }
            ds.push(scheme);
        }
        let mut op_types: Vec<String> = site.uses.iter().map(|u| u.op_type.clone()).collect();
        op_types.dedup();
        tables.push(SiteTable {
            weight: c.name.clone(),
            role,
            op_types,
            shape: c.shape().to_vec(),
            params: c.stored_elements,
            float_bytes: c.bytes(),
            pinned,
            options,
        });
        decisions.push(ds);
        sites.push(site);
    }
    (sites, tables, decisions)
}

/// Results kept between runs: one JSON file per (model, data, runtime), entries per (site, scheme).
struct Cache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, SiteOption>,
}

impl Cache {
    fn open(dir: Option<&Path>, key: &str) -> Cache {
        let path = dir.map(|d| d.join(format!("sensitivity-{key}.json")));
        let entries = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Cache { path, entries }
    }

    fn key(weight: &str, scheme: &WeightScheme) -> String {
        format!("{weight}\u{1f}{}", scheme_yaml(scheme))
    }

    fn save(&self) -> Result<()> {
        let Some(p) = &self.path else {
            return Ok(());
        };
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)
                .with_context(|| format!("cannot create the cache folder {}", d.display()))?;
        }
        crate::util::write_atomic(p, &serde_json::to_vec(&self.entries)?)
    }
}

/// The default cache folder: `$QUENCH_CACHE`, else `$XDG_CACHE_HOME/quench`, else
/// `~/.cache/quench`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("QUENCH_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("quench"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("quench"))
}

fn hash_batches(h: &mut Sha256, batches: &[Vec<Named>]) {
    for b in batches {
        for (name, t) in b {
            h.update(name.as_bytes());
            h.update(format!("{:?}{:?}", t.data_type(), t.shape()).as_bytes());
            let p = t.to_proto(name);
            h.update(&p.raw_data);
            for v in &p.int64_data {
                h.update(v.to_le_bytes());
            }
            for v in &p.int32_data {
                h.update(v.to_le_bytes());
            }
            for v in &p.float_data {
                h.update(v.to_le_bytes());
            }
        }
    }
}

/// How much less proxy error another option of no more bytes must have to leave an option
/// unmeasured: the proxy ranks schemes well but not pairs within a few tenths of a dB (measured on
/// rxnmap: NF4 b64 has the lower proxy than int4 b32 on some weights and the higher output error).
const PRUNE_MARGIN: f64 = 1.5;

/// Indices of the options on the (bytes, proxy) lower-left front of a site, up to a margin: no
/// other option is both no larger and clearly less wrong. Float is always on it.
fn proxy_front(options: &[SiteOption]) -> Vec<usize> {
    let avail: Vec<usize> = (0..options.len())
        .filter(|&i| options[i].note.is_none())
        .collect();
    avail
        .iter()
        .copied()
        .filter(|&i| {
            let a = &options[i];
            !avail.iter().any(|&j| {
                let b = &options[j];
                j != i && b.bytes <= a.bytes && b.proxy_nsr * PRUNE_MARGIN < a.proxy_nsr
            })
        })
        .collect()
}

pub use crate::report::metrics::spearman;

/// Measures every site's options on the probe batches (see the module docs). Sites with an input
/// Hessian in `hessians` ([`feedback_requests`]) are measured with error feedback. Returns the table
/// and the workspace that measures allocations later.
pub fn sensitivity<'m>(
    model: &'m Model,
    opts: &SensitivityOptions,
    energy: Option<ChannelEnergy>,
    hessians: Hessians,
    batches: Vec<Vec<Named>>,
) -> Result<(Sensitivity, Workspace<'m>, Probe)> {
    let start = std::time::Instant::now();
    let (sites, mut tables, decisions) = site_options(model, opts.recipe, opts.menu, &hessians);
    let mut key = Sha256::new();
    key.update(b"quench sensitivity 3\0");
    key.update(env!("CARGO_PKG_VERSION").as_bytes());
    key.update(&opts.model_key);
    key.update(opts.runtime.name().as_bytes());
    hash_batches(&mut key, &batches);
    // Fed options depend on the data the Hessians came from, which may be more than the probe's.
    for (name, h) in &hessians {
        key.update(name.as_bytes());
        key.update(h.rows.to_le_bytes());
        for d in h.diagonal() {
            key.update(d.to_le_bytes());
        }
    }
    let key = crate::util::hex(&key.finalize()[..16]);
    let mut cache = Cache::open(opts.cache_dir.as_deref(), &key);
    let mut ws = Workspace {
        model,
        sites,
        decisions,
        energy,
        hessians: Arc::new(hessians),
        decoded: HashMap::new(),
    };
    let n_batches = batches.len();

    // Encode (or take from the cache) every option: bytes, weight SQNR, proxy.
    let total: usize = ws
        .decisions
        .iter()
        .flatten()
        .filter(|d| d.is_some())
        .count();
    let progress = Progress::new(total as u64, "encoding options");
    let mut cached = 0;
    for (s, table) in tables.iter_mut().enumerate() {
        for (o, opt) in table.options.iter_mut().enumerate() {
            let Some(scheme) = opt.scheme else { continue };
            let k = Cache::key(&table.weight, &scheme);
            if let Some(hit) = cache.entries.get(&k) {
                let name = std::mem::take(&mut opt.name);
                *opt = SiteOption {
                    name,
                    scheme: Some(scheme),
                    label: Some(scheme.label()),
                    ..hit.clone()
                };
                // Pruning is decided again below (the menu or --no-prune may differ).
                if opt
                    .note
                    .as_deref()
                    .is_some_and(|n| n.starts_with("not measured"))
                {
                    opt.note = None;
                }
                cached += usize::from(opt.measured.is_some());
            } else {
                let h = ws.hessians.get(&table.weight);
                match simulate(model, &ws.sites[s], &scheme, ws.energy.as_ref(), h)? {
                    Ok(sim) => {
                        opt.bytes = sim.bytes;
                        opt.weight_sqnr_db = sim.weight_sqnr_db;
                        opt.proxy_nsr = sim.proxy_nsr;
                        opt.weighted = sim.weighted;
                        ws.decoded.insert((s, o), Arc::new(sim.values));
                    }
                    Err(why) => {
                        opt.bytes = table.float_bytes;
                        opt.note = Some(why);
                    }
                }
            }
            progress.inc(1);
        }
    }
    progress.finish();

    // Measure the options on each site's proxy front.
    let lifted: Vec<&WeightSite> = ws.lifted();
    let mut probe = Probe::new(model, &lifted, batches, opts.runtime, &opts.session)?;
    let mut todo = Vec::new();
    let mut pruned = 0;
    for (s, table) in tables.iter_mut().enumerate() {
        let front = proxy_front(&table.options);
        for (o, opt) in table.options.iter_mut().enumerate() {
            if opt.scheme.is_none() || opt.note.is_some() || opt.measured.is_some() {
                continue;
            }
            if !opts.no_prune && !front.contains(&o) {
                opt.note =
                    Some("not measured: another option is smaller with less proxy error".into());
                pruned += 1;
                continue;
            }
            todo.push((s, o));
        }
    }
    let progress = Progress::new(todo.len() as u64, "measuring sensitivity");
    let mut measured = 0;
    for &(s, o) in &todo {
        let v = ws.values(s, o)?.expect("a scheme option");
        let name = tables[s].weight.clone();
        let mut replace = HashMap::new();
        replace.insert(name.clone(), v);
        let sc = probe.measure(&replace).with_context(|| {
            format!("measuring weight '{name}' as {}", tables[s].options[o].name)
        })?;
        tables[s].options[o].measured = Some(sc);
        measured += 1;
        progress.inc(1);
    }
    progress.finish();
    for table in &tables {
        for opt in &table.options {
            if let Some(scheme) = opt.scheme {
                cache
                    .entries
                    .insert(Cache::key(&table.weight, &scheme), opt.clone());
            }
        }
    }
    cache.save()?;

    let (mut px, mut my) = (Vec::new(), Vec::new());
    let mut within = Vec::new();
    for t in &tables {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for o in &t.options {
            if let (Some(m), Some(_)) = (o.measured, o.scheme) {
                a.push(o.proxy_nsr);
                b.push(m.nsr);
            }
        }
        if let Some(r) = spearman(&a, &b) {
            within.push(r);
        }
        px.extend(a);
        my.extend(b);
    }
    let sens = Sensitivity {
        sites: tables,
        menu: opts.menu.iter().map(|m| m.name.clone()).collect(),
        runtime: opts.runtime,
        batches: n_batches,
        data: opts.data.clone(),
        measured,
        cached,
        pruned,
        spearman: spearman(&px, &my),
        spearman_within_sites: (!within.is_empty())
            .then(|| within.iter().sum::<f64>() / within.len() as f64),
        seconds: start.elapsed().as_secs_f64(),
        cache_file: cache.path.clone(),
    };
    Ok((sens, ws, probe))
}

/// One allocation: an option index per site.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Choice(pub Vec<usize>);

/// An allocation that was measured (or only predicted).
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// What it is: `path`, `uniform <scheme>`, `final`.
    pub kind: String,
    pub bytes: u64,
    pub bits_per_weight: f64,
    /// Output noise predicted by adding the sites' measured noise.
    pub predicted_nsr: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<Score>,
    #[serde(skip)]
    pub choice: Vec<usize>,
}

/// The allocation path and what was measured along it.
pub struct Allocation<'s> {
    pub sens: &'s Sensitivity,
    /// Per site, the hull of usable options, cheapest first.
    hulls: Vec<Vec<usize>>,
    /// (site, hull position) upgrades in order of noise removed per byte.
    upgrades: Vec<(usize, usize)>,
    pub tried: Vec<Point>,
}

impl<'s> Allocation<'s> {
    pub fn new(sens: &'s Sensitivity) -> Allocation<'s> {
        let mut hulls = Vec::new();
        let mut upgrades: Vec<(f64, usize, usize)> = Vec::new();
        for (s, t) in sens.sites.iter().enumerate() {
            let mut pts: Vec<usize> = (0..t.options.len())
                .filter(|&o| t.options[o].usable())
                .collect();
            pts.sort_by(|&a, &b| {
                let (x, y) = (&t.options[a], &t.options[b]);
                x.bytes.cmp(&y.bytes).then(nsr(x).total_cmp(&nsr(y)))
            });
            // Lower convex hull, keeping only options that lower the noise.
            let mut hull: Vec<usize> = Vec::new();
            for &p in &pts {
                if let Some(&last) = hull.last()
                    && nsr(&t.options[p]) >= nsr(&t.options[last])
                {
                    continue;
                }
                while hull.len() >= 2 {
                    let (a, b) = (
                        &t.options[hull[hull.len() - 2]],
                        &t.options[hull[hull.len() - 1]],
                    );
                    let c = &t.options[p];
                    let slope_ab = (nsr(a) - nsr(b)) / (b.bytes - a.bytes).max(1) as f64;
                    let slope_bc = (nsr(b) - nsr(c)) / (c.bytes - b.bytes).max(1) as f64;
                    if slope_bc >= slope_ab {
                        hull.pop();
                    } else {
                        break;
                    }
                }
                hull.push(p);
            }
            for h in 1..hull.len() {
                let (a, b) = (&t.options[hull[h - 1]], &t.options[hull[h]]);
                let gain = (nsr(a) - nsr(b)) / (b.bytes.saturating_sub(a.bytes)).max(1) as f64;
                upgrades.push((gain, s, h));
            }
            hulls.push(hull);
        }
        // Most noise removed per byte first; ties by site and step for determinism.
        upgrades.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        Allocation {
            sens,
            hulls,
            upgrades: upgrades.into_iter().map(|(_, s, h)| (s, h)).collect(),
            tried: Vec::new(),
        }
    }

    /// Points on the path: 0 is every site at its smallest option, `len()` every upgrade made.
    pub fn len(&self) -> usize {
        self.upgrades.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upgrades.is_empty()
    }

    /// The allocation after the first `n` upgrades.
    pub fn at(&self, n: usize) -> Vec<usize> {
        let mut pos = vec![0usize; self.hulls.len()];
        for &(s, h) in &self.upgrades[..n.min(self.upgrades.len())] {
            pos[s] = pos[s].max(h);
        }
        pos.iter()
            .enumerate()
            .map(|(s, &h)| self.hulls[s].get(h).copied().unwrap_or(0))
            .collect()
    }

    /// Total bytes of the sites under an allocation.
    pub fn bytes(&self, choice: &[usize]) -> u64 {
        self.sens
            .sites
            .iter()
            .zip(choice)
            .map(|(t, &o)| t.options[o].bytes)
            .sum()
    }

    pub fn bits_per_weight(&self, choice: &[usize]) -> f64 {
        let params: u64 = self.sens.sites.iter().map(|t| t.params).sum();
        self.bytes(choice) as f64 * 8.0 / params.max(1) as f64
    }

    /// The output noise predicted for an allocation (sites' noise added); NaN when an option in
    /// it was not measured alone.
    pub fn predicted_nsr(&self, choice: &[usize]) -> f64 {
        self.sens
            .sites
            .iter()
            .zip(choice)
            .map(|(t, &o)| t.options[o].measured.map_or(f64::NAN, |m| m.nsr))
            .sum()
    }

    /// Measures an allocation on the probe and records it.
    pub fn measure(
        &mut self,
        ws: &mut Workspace,
        probe: &mut Probe,
        choice: &[usize],
        kind: &str,
    ) -> Result<Score> {
        if let Some(p) = self
            .tried
            .iter()
            .find(|p| p.choice == choice && p.measured.is_some())
        {
            return Ok(p.measured.expect("checked"));
        }
        let feeds = ws.feeds(choice)?;
        let score = probe.measure(&feeds)?;
        self.record(choice, kind, Some(score));
        Ok(score)
    }

    pub fn record(&mut self, choice: &[usize], kind: &str, measured: Option<Score>) {
        self.tried.push(Point {
            kind: kind.to_string(),
            bytes: self.bytes(choice),
            bits_per_weight: self.bits_per_weight(choice),
            predicted_nsr: self.predicted_nsr(choice),
            measured,
            choice: choice.to_vec(),
        });
    }

    /// Every site at one menu scheme where it has that option (measured or pruned; else the
    /// site's pinned option or float): the uniform recipes the allocation is compared with.
    pub fn uniform(&self, name: &str) -> Option<Vec<usize>> {
        let mut any = false;
        let choice = self
            .sens
            .sites
            .iter()
            .map(|t| {
                let available = |o: &SiteOption| {
                    o.note
                        .as_deref()
                        .is_none_or(|n| n.starts_with("not measured"))
                };
                if let Some(o) = t
                    .options
                    .iter()
                    .position(|o| o.name == name && available(o))
                {
                    any |= !t.pinned;
                    return o;
                }
                t.options
                    .iter()
                    .position(|o| o.name == "pinned")
                    .or_else(|| t.options.iter().position(|o| o.name == "float"))
                    .unwrap_or(0)
            })
            .collect();
        any.then_some(choice)
    }

    /// Finds the smallest allocation on the path whose measured `metric` reaches `target`, by
    /// bisection (retention grows along the path); Err(best point) when even the last does not.
    pub fn search_retention(
        &mut self,
        ws: &mut Workspace,
        probe: &mut Probe,
        metric: Metric,
        target: f64,
    ) -> Result<std::result::Result<Vec<usize>, Vec<usize>>> {
        let n = self.len();
        let last = self.at(n);
        let top = self.measure(ws, probe, &last, "path")?;
        if top.value(metric) < target {
            return Ok(Err(last));
        }
        // Start the bisection where the prediction says, when it can.
        let (mut lo, mut hi) = (0usize, n);
        if let Some(guess) = self
            .totals()
            .iter()
            .position(|&(_, noise)| predict(metric, noise).is_some_and(|v| v >= target))
        {
            let c = self.at(guess);
            if self.measure(ws, probe, &c, "path")?.value(metric) >= target {
                hi = guess;
            } else {
                lo = guess + 1;
            }
        }
        while lo < hi {
            let mid = (lo + hi) / 2;
            let c = self.at(mid);
            if self.measure(ws, probe, &c, "path")?.value(metric) >= target {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(Ok(self.at(lo)))
    }

    /// The most precise allocation within `bits` per weight; Err(smallest) when even the smallest
    /// is over. The upgrades are taken in the path's order, most noise removed per byte first; one
    /// that would go over the budget is passed by (with the later steps of its site), and the
    /// smaller upgrades after it still fill what is left: a large site whose next step does not
    /// fit must not leave the rest of the budget unspent.
    pub fn within_budget(&self, bits: f64) -> std::result::Result<Vec<usize>, Vec<usize>> {
        let first = self.at(0);
        let params = self.sens.sites.iter().map(|t| t.params).sum::<u64>().max(1);
        let fits = |bytes: u64| bytes as f64 * 8.0 / params as f64 <= bits + 1e-9;
        let mut bytes = self.bytes(&first);
        if !fits(bytes) {
            return Err(first);
        }
        let mut pos = vec![0usize; self.hulls.len()];
        let mut passed = vec![false; self.hulls.len()];
        for &(s, h) in &self.upgrades {
            if passed[s] || h <= pos[s] {
                continue;
            }
            let options = &self.sens.sites[s].options;
            let (old, new) = (&options[self.hulls[s][pos[s]]], &options[self.hulls[s][h]]);
            let after = bytes - old.bytes + new.bytes;
            if fits(after) {
                pos[s] = h;
                bytes = after;
            } else {
                passed[s] = true;
            }
        }
        Ok(pos
            .iter()
            .enumerate()
            .map(|(s, &h)| self.hulls[s].get(h).copied().unwrap_or(0))
            .collect())
    }

    /// (bytes, predicted noise) after each number of upgrades 0..=len, in one walk of the path.
    fn totals(&self) -> Vec<(u64, f64)> {
        let mut choice = self.at(0);
        let (mut bytes, mut noise) = (self.bytes(&choice), self.predicted_nsr(&choice));
        let mut out = vec![(bytes, noise)];
        for &(s, h) in &self.upgrades {
            let t = &self.sens.sites[s];
            let (old, new) = (&t.options[choice[s]], &t.options[self.hulls[s][h]]);
            bytes = bytes - old.bytes + new.bytes;
            noise += nsr(new) - nsr(old);
            choice[s] = self.hulls[s][h];
            out.push((bytes, noise));
        }
        out
    }

    /// Raises the site contributing the most measured noise to its next hull option; false when
    /// nothing can be raised.
    pub fn raise_worst(&self, choice: &mut [usize]) -> bool {
        let mut worst: Option<(f64, usize, usize)> = None;
        for (s, t) in self.sens.sites.iter().enumerate() {
            let hull = &self.hulls[s];
            let Some(h) = hull.iter().position(|&o| o == choice[s]) else {
                continue;
            };
            let Some(&next) = hull.get(h + 1) else {
                continue;
            };
            let n = nsr(&t.options[choice[s]]);
            if worst.is_none_or(|(w, _, _)| n > w) {
                worst = Some((n, s, next));
            }
        }
        match worst {
            Some((_, s, next)) => {
                choice[s] = next;
                true
            }
            None => false,
        }
    }

    /// The per-site decisions of an allocation, as a policy for the weight pass.
    pub fn policy(&self, choice: &[usize]) -> Assignment {
        Assignment(
            self.sens
                .sites
                .iter()
                .zip(choice)
                .map(|(t, &o)| {
                    let d = match t.options[o].scheme {
                        Some(s) => Decision::Quantize(s),
                        None => Decision::Skip("allocated float".into()),
                    };
                    (t.weight.clone(), d)
                })
                .collect(),
        )
    }

    /// The allocation as a recipe: one rule per site, in the model's order, then float for
    /// anything else; with `gptq`, its schemes [`with_gptq`], else each rounded to nearest.
    /// Replayed with the same calibration data it builds the same model.
    pub fn recipe_yaml(&self, choice: &[usize], header: &str, gptq: bool) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for line in header.lines() {
            let _ = writeln!(out, "# {line}");
        }
        let _ = writeln!(
            out,
            "description: {}",
            serde_json::to_string(&format!(
                "per-site allocation, {:.2} bits per weight",
                self.bits_per_weight(choice)
            ))
            .expect("a string")
        );
        let _ = writeln!(out, "defaults: {{ bits: 8, granularity: channel }}");
        let _ = writeln!(out, "rules:");
        for (t, &o) in self.sens.sites.iter().zip(choice) {
            let opt = &t.options[o];
            let pattern =
                serde_json::to_string(&crate::recipes::exact_pattern(&t.weight)).expect("a string");
            let _ = writeln!(
                out,
                "  - match: {{ weight: {pattern} }}   # {} {:?}, {}",
                t.role.name(),
                t.shape,
                opt.name
            );
            match opt.scheme {
                Some(s) => {
                    let s = if gptq {
                        with_gptq(s)
                    } else {
                        WeightScheme { gptq: false, ..s }
                    };
                    let _ = writeln!(out, "    scheme: {}", scheme_yaml(&s));
                }
                None => {
                    let _ = writeln!(out, "    skip: true");
                }
            }
        }
        let _ = writeln!(out, "  - match: {{}}\n    skip: true");
        out
    }
}

fn nsr(o: &SiteOption) -> f64 {
    o.measured.map_or(f64::INFINITY, |m| m.nsr)
}

/// A fixed decision per weight name (sites not listed stay float).
pub struct Assignment(pub BTreeMap<String, Decision>);

/// The scheme with error-compensating rounding where it takes it: scalar formats with scales per
/// channel or block and no dead zone (see [`crate::quant::gptq`]), and vq without kept outliers
/// ([`crate::quant::vq_feedback`]).
pub fn with_gptq(mut s: WeightScheme) -> WeightScheme {
    s.gptq = if s.format == crate::quant::scheme::Format::Vq {
        s.outliers.is_none()
    } else {
        s.dead_zone.is_none() && s.granularity != crate::quant::int::Granularity::PerTensor
    };
    s
}

impl Assignment {
    /// The same decisions, each scheme [`with_gptq`].
    pub fn with_gptq(&self) -> Assignment {
        Assignment(
            self.0
                .iter()
                .map(|(w, d)| {
                    let d = match d {
                        Decision::Quantize(s) => Decision::Quantize(with_gptq(*s)),
                        other => other.clone(),
                    };
                    (w.clone(), d)
                })
                .collect(),
        )
    }
}

impl WeightPolicy for Assignment {
    fn decide(&self, site: &SiteInfo) -> Decision {
        self.0
            .get(site.weight)
            .cloned()
            .unwrap_or_else(|| Decision::Skip("not in the allocation".into()))
    }
}

/// The goal of an allocation as words.
pub fn describe_goal(metric: Metric, goal: Goal) -> String {
    match goal {
        Goal::Retention(t) => format!("{} ≥ {t}", metric_name(metric)),
        Goal::BitsPerWeight(b) => {
            format!("best {} within {b} bits per weight", metric_name(metric))
        }
    }
}

pub fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::Cosine => "cosine",
        Metric::Sqnr => "SQNR (dB)",
        Metric::Top1 => "top-1",
        Metric::Similarity => "similarity ranking",
        Metric::Sequence => "sequences alike",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_monotone_and_reversed() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&x, &[10.0, 20.0, 25.0, 100.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[4.0, 3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-12);
        assert!(spearman(&x[..2], &[1.0, 2.0]).is_none());
    }

    fn opt(name: &str, bytes: u64, proxy: f64, nsr: f64) -> SiteOption {
        SiteOption {
            name: name.into(),
            label: None,
            scheme: Some(WeightScheme::int(
                8,
                true,
                crate::quant::int::Granularity::PerChannel,
                false,
            )),
            bytes,
            weight_sqnr_db: 0.0,
            proxy_nsr: proxy,
            weighted: false,
            measured: Some(Score {
                nsr,
                ..Score::EXACT
            }),
            note: None,
        }
    }

    fn table(options: Vec<SiteOption>) -> SiteTable {
        SiteTable {
            weight: "w".into(),
            role: Role::Other,
            op_types: vec![],
            shape: vec![],
            params: 100,
            float_bytes: 400,
            pinned: false,
            options,
        }
    }

    #[test]
    fn proxy_front_drops_dominated_options() {
        let o = vec![
            SiteOption::float(400),
            opt("a", 100, 0.01, 0.0),
            opt("b", 150, 0.02, 0.0),  // larger and clearly worse than a
            opt("d", 120, 0.012, 0.0), // larger, but within the margin of a
            opt("c", 50, 0.1, 0.0),
        ];
        assert_eq!(proxy_front(&o), vec![0, 1, 3, 4]);
    }

    #[test]
    fn path_takes_the_best_noise_per_byte_first_and_ends_at_float() {
        let sens = sensitivity_of(vec![
            table(vec![
                SiteOption::float(400),
                opt("int8", 100, 0.0, 0.001),
                opt("int4", 50, 0.0, 0.02),
                // Not on the hull: between int4 and int8 but worse than the line.
                opt("x", 90, 0.0, 0.019),
            ]),
            table(vec![
                SiteOption::float(400),
                opt("int8", 100, 0.0, 0.0001),
                opt("int4", 50, 0.0, 0.5),
            ]),
        ]);
        let a = Allocation::new(&sens);
        assert_eq!(a.at(0), vec![2, 2]);
        // Site 1's int4→int8 removes 0.4999 per 50 bytes: first.
        assert_eq!(a.at(1), vec![2, 1]);
        assert_eq!(a.at(2), vec![1, 1]);
        assert_eq!(a.at(a.len()), vec![0, 0]);
        assert_eq!(a.len(), 4);
        let mut c = a.at(0);
        assert!(a.raise_worst(&mut c));
        assert_eq!(c, vec![2, 1]);
        assert_eq!(a.within_budget(8.0 * 150.0 / 200.0), Ok(vec![2, 1]));
        assert!(a.within_budget(1.0).is_err());
        let y = a.recipe_yaml(&a.at(1), "test", false);
        let r = Recipe::parse("alloc", &y).unwrap();
        assert!(r.allocate.is_none());
    }

    fn sensitivity_of(sites: Vec<SiteTable>) -> Sensitivity {
        Sensitivity {
            sites,
            menu: vec![],
            runtime: RuntimeKind::Tract,
            batches: 1,
            data: String::new(),
            measured: 0,
            cached: 0,
            pruned: 0,
            spearman: None,
            spearman_within_sites: None,
            seconds: 0.0,
            cache_file: None,
        }
    }

    #[test]
    fn a_budget_is_filled_past_a_large_step_that_does_not_fit() {
        // A large table whose one upgrade removes the most noise per byte but costs 1000 bytes,
        // and a small matrix whose upgrade comes after it on the path.
        let big = table(vec![
            SiteOption::float(40_000),
            opt("int8", 10_000, 0.0, 0.001),
            opt("int4", 9_000, 0.0, 0.5),
        ]);
        let small = table(vec![
            SiteOption::float(4_000),
            opt("int8", 1_000, 0.0, 0.001),
            opt("int4", 500, 0.0, 0.2),
        ]);
        let sens = sensitivity_of(vec![big, small]);
        let a = Allocation::new(&sens);
        assert_eq!(a.at(0), vec![2, 2]);
        assert_eq!(a.at(1), vec![1, 2], "the table's step is first on the path");
        // 9 800 bytes: the table's step (+1 000) does not fit, the matrix's (+500) does.
        let bits =
            |bytes: f64| bytes * 8.0 / sens.sites.iter().map(|t| t.params).sum::<u64>() as f64;
        assert_eq!(a.within_budget(bits(10_000.0)), Ok(vec![2, 1]));
        assert_eq!(a.within_budget(bits(9_600.0)), Ok(vec![2, 2]));
        assert_eq!(a.within_budget(bits(11_000.0)), Ok(vec![1, 1]));
    }
}
