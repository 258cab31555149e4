//! Compare a candidate model against its reference on the same inputs: per output and per runtime, across
//! runtimes, and layer by layer.
//!
//! Output figures come from plain sessions of each model, exactly as they would be deployed. Per-layer
//! attribution runs a second pair of sessions whose graphs expose the intermediate tensors both models
//! share (matched by name, or by the producing node's name and output slot where a pass renamed a value),
//! because exposing a tensor can stop a runtime from fusing across it. Statistics are accumulated batch by
//! batch; no batch's tensors outlive it.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result};
use serde::Serialize;

use super::metrics::{Accumulator, Metrics, OutputKind};
use crate::exec::{
    self, Dim, Named, Prepared, RuntimeKind, Session, SessionOptions, inputs::InputSet,
};
use crate::ir::{Def, Graph, Model};
use crate::onnx::dtype::DataType;
use crate::util::Progress;

#[derive(Clone, Debug)]
pub struct CompareOptions {
    pub runtimes: Vec<RuntimeKind>,
    pub session: SessionOptions,
    /// Per-layer attribution on this runtime (None: no attribution).
    pub layers: Option<RuntimeKind>,
    /// Weight bytes from which the sessions open one at a time ([`ONE_SESSION_ABOVE`] unless a
    /// test says otherwise).
    pub one_session_above: u64,
}

#[derive(Debug, Serialize)]
pub struct RuntimeReport {
    pub settings: BTreeMap<String, String>,
    pub outputs: BTreeMap<String, Metrics>,
}

#[derive(Debug, Serialize)]
pub struct LayerReport {
    pub reference: String,
    pub candidate: String,
    /// Producing node of the reference tensor.
    pub node: String,
    pub op_type: String,
    #[serde(flatten)]
    pub metrics: Metrics,
}

#[derive(Debug, Serialize)]
pub struct CompareReport {
    pub reference: String,
    pub candidate: String,
    pub inputs: String,
    pub batches: usize,
    /// Figures of the first runtime, for a quick look: `outputs.<name>.sqnr_db`.
    pub outputs: BTreeMap<String, Metrics>,
    pub runtimes: BTreeMap<String, RuntimeReport>,
    /// The same model in tract vs onnxruntime (tract is the reference side), when both ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_runtime: Option<CrossRuntime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers_runtime: Option<RuntimeKind>,
    /// Worst first (lowest SQNR).
    pub layers: Vec<LayerReport>,
    /// Batch-level observations (NaN/Inf in inputs, …).
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CrossRuntime {
    pub reference: BTreeMap<String, Metrics>,
    pub candidate: BTreeMap<String, Metrics>,
}

/// A tensor pair to compare layer by layer.
struct LayerPair {
    reference: String,
    candidate: String,
    node: String,
    op_type: String,
}

/// Values computed only from constants (folded by any runtime; nothing to attribute).
fn constant_values(g: &Graph) -> HashSet<String> {
    let mut constant: HashSet<String> = HashSet::new();
    for (_, v) in g.values() {
        if matches!(v.def(), Def::Initializer) {
            constant.insert(v.name().to_string());
        }
    }
    for &id in g.node_ids() {
        let n = g.node(id);
        let all_const = n
            .inputs()
            .iter()
            .all(|i| i.is_none_or(|v| constant.contains(g.value_name(v))))
            && n.subgraphs().next().is_none();
        if all_const {
            for o in n.outputs().iter().flatten() {
                constant.insert(g.value_name(*o).to_string());
            }
        }
    }
    constant
}

/// The intermediate tensors of the reference's top-level graph that the candidate also computes.
fn layer_pairs(reference: &Model, candidate: &Model) -> Vec<LayerPair> {
    let (rg, cg) = (&reference.graph, &candidate.graph);
    let constants = constant_values(rg);
    let cand_nodes: HashMap<&str, _> = cg
        .nodes()
        .filter(|(_, n)| !n.name.is_empty())
        .map(|(id, n)| (n.name.as_str(), id))
        .collect();
    let mut pairs = Vec::new();
    for &id in rg.node_ids() {
        let node = rg.node(id);
        for (slot, out) in node.outputs().iter().enumerate() {
            let Some(out) = out else { continue };
            let name = rg.value_name(*out);
            if rg.is_output(*out) || constants.contains(name) {
                continue;
            }
            let by_name = cg
                .value_id(name)
                .filter(|v| matches!(cg.value(*v).def(), Def::Node { .. }));
            let cand = match by_name {
                Some(v) => Some(cg.value_name(v).to_string()),
                None => cand_nodes
                    .get(node.name.as_str())
                    .filter(|_| !node.name.is_empty())
                    .and_then(|cid| cg.node(*cid).outputs().get(slot).copied().flatten())
                    .map(|v| cg.value_name(v).to_string()),
            };
            if let Some(c) = cand {
                pairs.push(LayerPair {
                    reference: name.to_string(),
                    candidate: c,
                    node: node.name.clone(),
                    op_type: node.op_type.clone(),
                });
            }
        }
    }
    pairs
}

/// Whether an output looks like scores over classes, so that top-1 agreement means something: produced by
/// Softmax, LogSoftmax, or a linear layer, through shape-only ops, bias/scale arithmetic and the pieces of
/// a hand-written softmax or sigmoid (Sub, Exp, Div). A convolution's map does not qualify.
pub fn looks_like_scores(model: &Model, output: &str) -> bool {
    let g = &model.graph;
    let mut v = g.value_id(output);
    for _ in 0..8 {
        let Some((node, _)) = v.and_then(|v| g.value(v).producer()) else {
            return false;
        };
        let n = g.node(node);
        match n.op_type.as_str() {
            "Softmax" | "LogSoftmax" | "Gemm" | "MatMul" => return true,
            "Identity" | "Reshape" | "Squeeze" | "Unsqueeze" | "Flatten" | "Cast" | "Add"
            | "Sub" | "Mul" | "Div" | "Exp" | "Sigmoid" => {
                v = n.input(0);
            }
            _ => return false,
        }
    }
    false
}

/// How an output is read ([`OutputKind`]): scores of declared rank 3 are sequences (time first when
/// the second axis is named as the batch), other scores classes; other float outputs of rank 2, or of
/// rank 3 named as hidden states or embeddings, are embeddings; the rest raw.
pub fn output_kind(model: &Model, output: &str) -> OutputKind {
    let info = model
        .graph
        .outputs()
        .iter()
        .find(|p| p.info.name == output)
        .map(|p| exec::InputInfo::from_value_info(&p.info));
    let dims = info
        .as_ref()
        .and_then(|i| i.dims.clone())
        .unwrap_or_default();
    let float = info.and_then(|i| i.dtype).is_none_or(|d| {
        matches!(
            d,
            DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double
        )
    });
    let named_batch =
        |d: &Dim| matches!(d, Dim::Symbol(s) if s.to_ascii_lowercase().contains("batch"));
    if looks_like_scores(model, output) {
        return match dims.as_slice() {
            [_, d1, _] => OutputKind::Sequence {
                batch_axis: usize::from(named_batch(d1)),
            },
            _ => OutputKind::Classes,
        };
    }
    let lower = output.to_ascii_lowercase();
    let named = ["hidden", "embed", "pool", "sentence", "feature", "vector"]
        .iter()
        .any(|h| lower.contains(h));
    let wide = |d: &Dim| !matches!(d, Dim::Fixed(n) if *n < 8);
    match dims.as_slice() {
        [_, d] if float && wide(d) => OutputKind::Embedding,
        [_, _, d] if float && named && wide(d) => OutputKind::Embedding,
        _ => OutputKind::Raw,
    }
}

fn finish(accs: &BTreeMap<String, Accumulator>) -> BTreeMap<String, Metrics> {
    accs.iter().map(|(k, a)| (k.clone(), a.finish())).collect()
}

fn add_outputs(
    accs: &mut BTreeMap<String, Accumulator>,
    reference: &[Named],
    candidate: &[Named],
    kinds: &HashMap<String, OutputKind>,
) -> Result<()> {
    for ((name, r), (_, c)) in reference.iter().zip(candidate) {
        let kind = kinds.get(name).copied().unwrap_or_default();
        accs.entry(name.clone())
            .or_default()
            .add(r, c, kind)
            .with_context(|| format!("output '{name}'"))?;
    }
    Ok(())
}

/// Weights from which `compare` opens its sessions one at a time (1 GiB): above it, four sessions of
/// the model at once (two runtimes, reference and candidate) would take several times its size.
pub const ONE_SESSION_ABOVE: u64 = 1 << 30;

pub fn compare(
    reference: &Model,
    candidate: &Model,
    labels: (&str, &str),
    inputs: &mut InputSet,
    opts: &CompareOptions,
) -> Result<CompareReport> {
    let ref_prep = Prepared::from_model(reference, labels.0);
    let cand_prep = Prepared::from_model(candidate, labels.1);
    if ref_prep.outputs != cand_prep.outputs {
        anyhow::bail!(
            "the models have different outputs: {:?} vs {:?}",
            ref_prep.outputs,
            cand_prep.outputs
        );
    }
    let scores: HashMap<String, OutputKind> = ref_prep
        .outputs
        .iter()
        .map(|o| (o.clone(), output_kind(reference, o)))
        .collect();

    let pairs = if opts.layers.is_some() {
        layer_pairs(reference, candidate)
    } else {
        Vec::new()
    };
    let mut per_rt: Vec<BTreeMap<String, Accumulator>> = vec![BTreeMap::new(); opts.runtimes.len()];
    let mut cross_ref: BTreeMap<String, Accumulator> = BTreeMap::new();
    let mut cross_cand: BTreeMap<String, Accumulator> = BTreeMap::new();
    let mut notes = Vec::new();
    let total = inputs.len();
    let weights: u64 = crate::ir::constants(reference)
        .iter()
        .map(|c| c.bytes())
        .sum();
    let one_at_a_time = weights >= opts.one_session_above;
    let passes = if one_at_a_time {
        opts.runtimes.len()
    } else {
        1
    };
    let phases = passes + usize::from(opts.layers.is_some());
    let progress = Progress::new((total * phases) as u64, "comparing");
    let model_inputs = reference_inputs(reference);
    let batches = total;
    let mut read = |b: usize, notes: Option<&mut Vec<String>>| -> Result<Vec<Named>> {
        let batch = inputs
            .batch(b)
            .with_context(|| format!("input batch {b}"))?;
        let found =
            exec::check_batch(&model_inputs, &batch).with_context(|| format!("input batch {b}"))?;
        if let Some(notes) = notes {
            for (name, n) in found.non_finite {
                notes.push(format!(
                    "batch {b}: input '{name}' holds {n} NaN/Inf values"
                ));
            }
        }
        Ok(batch)
    };

    // Phase 1: outputs, every runtime, from plain sessions.
    let mut settings: Vec<(RuntimeKind, Vec<(String, String)>)> = Vec::new();
    if one_at_a_time {
        // A large model's sessions open one at a time: the reference's outputs for every batch,
        // then the candidate's, runtime after runtime (the first runtime's kept for the
        // cross-runtime comparison). Peak memory is then one session's, not four.
        let mut first: Vec<(Vec<Named>, Vec<Named>)> = Vec::new();
        for (i, &rt) in opts.runtimes.iter().enumerate() {
            let mut refs: Vec<Vec<Named>> = Vec::with_capacity(total);
            {
                let mut rs = exec::open(&ref_prep, rt, &opts.session)?;
                for b in 0..total {
                    let batch = read(b, (i == 0).then_some(&mut notes))?;
                    refs.push(
                        rs.run(&batch)
                            .with_context(|| format!("{rt}: reference, batch {b}"))?,
                    );
                }
                // After the runs: some settings describe the plans the runs made.
                settings.push((rt, rs.settings()));
            }
            let mut cs = exec::open(&cand_prep, rt, &opts.session)?;
            for (b, r) in refs.into_iter().enumerate() {
                let batch = read(b, None)?;
                let c = cs
                    .run(&batch)
                    .with_context(|| format!("{rt}: candidate, batch {b}"))?;
                add_outputs(&mut per_rt[i], &r, &c, &scores)
                    .with_context(|| format!("{rt}, batch {b}"))?;
                if opts.runtimes.len() == 2 {
                    if i == 0 {
                        first.push((r, c));
                    } else {
                        let (fr, fc) = &first[b];
                        add_outputs(&mut cross_ref, fr, &r, &scores)?;
                        add_outputs(&mut cross_cand, fc, &c, &scores)?;
                    }
                }
                progress.inc(1);
            }
        }
        drop((ref_prep, cand_prep));
    } else {
        // Per runtime: (runtime, reference session, candidate session).
        type Pair = (RuntimeKind, Box<dyn Session>, Box<dyn Session>);
        let mut sessions: Vec<Pair> = Vec::new();
        for &rt in &opts.runtimes {
            let r = exec::open(&ref_prep, rt, &opts.session)?;
            let c = exec::open(&cand_prep, rt, &opts.session)?;
            sessions.push((rt, r, c));
        }
        drop((ref_prep, cand_prep));
        for b in 0..total {
            let batch = read(b, Some(&mut notes))?;
            let mut results: Vec<(Vec<Named>, Vec<Named>)> = Vec::new();
            for (i, (rt, rs, cs)) in sessions.iter_mut().enumerate() {
                let r = rs
                    .run(&batch)
                    .with_context(|| format!("{rt}: reference, batch {b}"))?;
                let c = cs
                    .run(&batch)
                    .with_context(|| format!("{rt}: candidate, batch {b}"))?;
                add_outputs(&mut per_rt[i], &r, &c, &scores)
                    .with_context(|| format!("{rt}, batch {b}"))?;
                results.push((r, c));
            }
            if let [(tr, tc), (or, oc)] = results.as_slice() {
                add_outputs(&mut cross_ref, tr, or, &scores)?;
                add_outputs(&mut cross_cand, tc, oc, &scores)?;
            }
            progress.inc(1);
        }
        settings = sessions
            .iter()
            .map(|(rt, rs, _)| (*rt, rs.settings()))
            .collect();
        // The plain sessions go before the exposed ones open: peak memory is one phase's, not both.
        drop(sessions);
    }

    // Phase 2: per-layer attribution from sessions that expose the shared intermediate tensors.
    let mut layer_accs: Vec<Accumulator> = vec![Accumulator::default(); pairs.len()];
    let mut layer_seen = vec![false; pairs.len()];
    let layers_rt = opts.layers.filter(|_| !pairs.is_empty());
    if let Some(rt) = layers_rt {
        let rnames: Vec<String> = pairs.iter().map(|p| p.reference.clone()).collect();
        let cnames: Vec<String> = pairs.iter().map(|p| p.candidate.clone()).collect();
        let mut rs = exec::open(
            &exec::expose_values(
                reference,
                &rnames,
                &format!("{} (layers exposed)", labels.0),
            ),
            rt,
            &opts.session,
        )?;
        let mut cs = exec::open(
            &exec::expose_values(
                candidate,
                &cnames,
                &format!("{} (layers exposed)", labels.1),
            ),
            rt,
            &opts.session,
        )?;
        for b in 0..total {
            let batch = inputs
                .batch(b)
                .with_context(|| format!("input batch {b}"))?;
            let r = rs
                .run(&batch)
                .with_context(|| format!("layers: reference, batch {b}"))?;
            let c = cs
                .run(&batch)
                .with_context(|| format!("layers: candidate, batch {b}"))?;
            let r: HashMap<&str, &exec::Tensor> = r.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let c: HashMap<&str, &exec::Tensor> = c.iter().map(|(n, t)| (n.as_str(), t)).collect();
            for (i, p) in pairs.iter().enumerate() {
                let (Some(rt), Some(ct)) =
                    (r.get(p.reference.as_str()), c.get(p.candidate.as_str()))
                else {
                    continue;
                };
                // Integer tensors (shapes, indices) say nothing about numeric error.
                if !rt.is_float() || !ct.is_float() || rt.shape() != ct.shape() {
                    continue;
                }
                layer_accs[i].add(rt, ct, OutputKind::Raw)?;
                layer_seen[i] = true;
            }
            progress.inc(1);
        }
    }
    progress.finish();

    let mut runtimes = BTreeMap::new();
    let mut first = None;
    for ((rt, settings), accs) in settings.into_iter().zip(&per_rt) {
        let outputs = finish(accs);
        first.get_or_insert_with(|| outputs.clone());
        let settings = settings.into_iter().collect();
        runtimes.insert(rt.name().to_string(), RuntimeReport { settings, outputs });
    }
    let cross_runtime = (per_rt.len() == 2).then(|| CrossRuntime {
        reference: finish(&cross_ref),
        candidate: finish(&cross_cand),
    });
    let mut layers: Vec<LayerReport> = pairs
        .into_iter()
        .zip(layer_accs)
        .zip(layer_seen)
        .filter(|(_, seen)| *seen)
        .map(|((p, a), _)| LayerReport {
            reference: p.reference,
            candidate: p.candidate,
            node: p.node,
            op_type: p.op_type,
            metrics: a.finish(),
        })
        .collect();
    layers.sort_by(|a, b| a.metrics.sqnr_db.total_cmp(&b.metrics.sqnr_db));
    Ok(CompareReport {
        reference: labels.0.to_string(),
        candidate: labels.1.to_string(),
        inputs: inputs.description.clone(),
        batches,
        outputs: first.unwrap_or_default(),
        runtimes,
        cross_runtime,
        layers_runtime: layers_rt,
        layers,
        notes,
    })
}

fn reference_inputs(model: &Model) -> Vec<exec::InputInfo> {
    Prepared::from_model(model, "").inputs
}

fn db(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "inf".into() } else { "-inf".into() }
    } else {
        format!("{v:.2}")
    }
}

/// A compact terminal rendering: outputs per runtime, cross-runtime divergence, worst layers.
pub fn render(r: &CompareReport, max_layers: usize) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "reference  {}\ncandidate  {}\ninputs     {} ({} batches)",
        r.reference, r.candidate, r.inputs, r.batches
    );
    let header = |s: &mut String, first: &str| {
        let _ = writeln!(
            s,
            "\n{first:<34} {:>9} {:>10} {:>10} {:>11} {:>7}",
            "SQNR dB", "cosine", "rel L2", "max |err|", "top-1"
        );
    };
    let row = |s: &mut String, name: &str, m: &Metrics| {
        let top1 = m
            .top1_agreement
            .map(|t| format!("{:.1}%", t * 100.0))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<34} {:>9} {:>10.6} {:>10.2e} {:>11.3e} {:>7}",
            truncate(name, 34),
            db(m.sqnr_db),
            m.cosine,
            m.rel_l2,
            m.max_abs,
            top1
        );
        if let Some(t) = task_line(m) {
            let _ = writeln!(s, "  {t}");
        }
    };
    for (rt, rep) in &r.runtimes {
        header(&mut s, &format!("output ({rt})"));
        for (name, m) in &rep.outputs {
            row(&mut s, name, m);
        }
    }
    if let Some(x) = &r.cross_runtime {
        header(&mut s, "tract vs ort (reference)");
        for (name, m) in &x.reference {
            row(&mut s, name, m);
        }
        header(&mut s, "tract vs ort (candidate)");
        for (name, m) in &x.candidate {
            row(&mut s, name, m);
        }
    }
    if !r.layers.is_empty() {
        let rt = r.layers_runtime.map(|k| k.name()).unwrap_or("?");
        header(
            &mut s,
            &format!("worst layers of {} ({rt})", r.layers.len()),
        );
        for l in r.layers.iter().take(max_layers) {
            row(
                &mut s,
                &format!("{} [{}]", l.reference, l.op_type),
                &l.metrics,
            );
        }
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

/// The task figures of an output, in words: decoded sequences, near ties, similarity ranking.
pub fn task_line(m: &Metrics) -> Option<String> {
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    match m.kind {
        OutputKind::Sequence { .. } => {
            let (agree, n) = (m.sequence_agreement?, m.sequences?);
            Some(format!(
                "CTC-decoded sequences alike: {} of {n}; near-tie sequences {}; confident steps alike {}",
                pct(agree),
                pct(m.sequence_near_tie_share.unwrap_or(0.0)),
                m.top1_confident.map_or("-".into(), pct),
            ))
        }
        OutputKind::Classes => Some(format!(
            "near-tie rows (top two within {}): {}; top-1 on the rest {}",
            super::metrics::NEAR_TIE,
            pct(m.near_tie_share?),
            m.top1_confident.map_or("-".into(), pct),
        )),
        OutputKind::Embedding => Some(format!(
            "similarity ranking (Spearman over pairs of {} rows): {:.4}",
            m.embedding_rows?, m.similarity_rank?
        )),
        OutputKind::Raw => None,
    }
}

/// `s` cut to `n` characters, keeping its end (`…` marks the cut).
pub fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(n - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}
