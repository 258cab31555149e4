//! Shielding: when a weight-only model misses its recipe's retention floors, the sites that cost the
//! most are promoted one step at a time — anything under 8 bits (integer blocks, NF4, FP4, codebooks)
//! to int8 per channel, int8 to float — until the floors hold on the data.
//!
//! Each promotion's gain is measured, not guessed: the reference model runs with every quantized
//! weight replaced by its decode (a [`Probe`]), then once per site with that site alone promoted; the
//! drop in output noise is the site's gain, and sites are taken in order of gain per byte it costs.
//! Promotions accumulate in the probe until its score meets the floors; the model is then built again
//! with those sites pinned, and the built model (its real forms, GPTQ where the recipe has it) is
//! checked; if it still misses, more sites follow, a few rounds at most.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use serde::Serialize;

use super::{Probe, Score};
use crate::exec::{Named, RuntimeKind, SessionOptions};
use crate::ir::{Model, WeightSite, weight_sites};
use crate::passes::quantize_weights::importance::ChannelEnergy;
use crate::passes::quantize_weights::{Decision, SiteInfo, WeightPolicy, WeightReport, simulate};
use crate::quant::int::Granularity;
use crate::quant::scheme::{Format, WeightScheme};
use crate::recipes::Floors;

/// The scheme one step up from `s`: int8 per channel for anything narrower, float (None) for int8.
pub fn promote(s: &WeightScheme) -> Option<WeightScheme> {
    let narrow = s.format != Format::Int || s.bits < 8;
    narrow.then(|| WeightScheme {
        gptq: s.gptq,
        ..WeightScheme::int(8, true, Granularity::PerChannel, false)
    })
}

/// A policy with some sites pinned: the shield's promotions over the recipe.
pub struct Pinned<'a> {
    pub inner: &'a dyn WeightPolicy,
    pub pins: HashMap<String, Option<WeightScheme>>,
}

impl WeightPolicy for Pinned<'_> {
    fn decide(&self, site: &SiteInfo) -> Decision {
        match self.pins.get(site.weight) {
            Some(Some(s)) => Decision::Quantize(*s),
            Some(None) => Decision::Skip("shielded: kept float to meet the recipe's floors".into()),
            None => self.inner.decide(site),
        }
    }
}

/// One promotion: the site, the step, what it measured and what it costs.
#[derive(Clone, Debug, Serialize)]
pub struct Promotion {
    pub weight: String,
    pub from: String,
    pub to: String,
    /// Output SQNR (dB, worst output) with every site as built, and with this site alone promoted.
    pub sqnr_db_before: f64,
    pub sqnr_db_promoted: f64,
    /// Bytes the promotion adds.
    pub bytes: i64,
}

/// What shielding did.
#[derive(Clone, Debug, Serialize)]
pub struct ShieldReport {
    pub floors: Floors,
    /// The built model's score before shielding and after (the same when nothing was promoted).
    pub before: Score,
    pub after: Score,
    pub met: bool,
    pub promotions: Vec<Promotion>,
    /// Probe runs spent measuring.
    pub probe_runs: usize,
    /// The floors still missed when the byte budget stopped the promotions.
    pub over_budget: bool,
    /// Promotions were made but left a floor's figure worse, so they were undone.
    pub undone: bool,
}

/// Whether `s` meets `f`; the figures that miss, in words, when not.
pub fn misses(f: &Floors, s: &Score) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = f.cosine
        && s.cosine < c
    {
        out.push(format!("cosine {:.5} < {c}", s.cosine));
    }
    if let Some(d) = f.sqnr_db
        && s.sqnr_db() < d
    {
        out.push(format!("SQNR {:.2} dB < {d} dB", s.sqnr_db()));
    }
    if let (Some(t), Some(v)) = (f.top1, s.top1)
        && v < t
    {
        out.push(format!("top-1 {v:.4} < {t}"));
    }
    if let (Some(t), Some(v)) = (f.similarity, s.similarity)
        && v < t
    {
        out.push(format!("similarity ranking {v:.4} < {t}"));
    }
    if let (Some(t), Some(v)) = (f.sequence, s.sequence)
        && v < t
    {
        out.push(format!("sequences alike {v:.4} < {t}"));
    }
    out
}

/// Whether every figure a floor names is at least as good in `after` as in `before`.
fn no_worse(f: &Floors, before: &Score, after: &Score) -> bool {
    (f.cosine.is_none() || after.cosine >= before.cosine)
        && (f.sqnr_db.is_none() || after.nsr <= before.nsr)
        && (f.top1.is_none() || after.top1.unwrap_or(1.0) >= before.top1.unwrap_or(1.0))
        && (f.similarity.is_none()
            || after.similarity.unwrap_or(1.0) >= before.similarity.unwrap_or(1.0))
        && (f.sequence.is_none() || after.sequence.unwrap_or(1.0) >= before.sequence.unwrap_or(1.0))
}

/// Builds the model a policy gives, with its report.
pub type Build<'a> = dyn FnMut(&dyn WeightPolicy) -> Result<(Model, WeightReport)> + 'a;

/// The most rebuilds one shielding makes.
const MAX_ROUNDS: usize = 4;

/// Promotes sites of the model built by `build` (from `policy`, whose report is `report`) until its
/// score, by `check`, meets `floors`. `build` builds the model for a policy; `batches` feed the probe.
/// Promotions stop short of adding more than `max_added_bytes`, when given.
#[allow(clippy::too_many_arguments)]
pub fn shield(
    reference: &Model,
    policy: &dyn WeightPolicy,
    floors: Floors,
    built: (Model, WeightReport),
    check: &dyn Fn(&Model) -> Result<Score>,
    build: &mut Build,
    batches: Vec<Vec<Named>>,
    runtime: RuntimeKind,
    session: &SessionOptions,
    energy: Option<&ChannelEnergy>,
    max_added_bytes: Option<u64>,
) -> Result<(Model, WeightReport, ShieldReport)> {
    let before = check(&built.0)?;
    let mut report = ShieldReport {
        floors,
        before,
        after: before,
        met: misses(&floors, &before).is_empty(),
        promotions: Vec::new(),
        probe_runs: 0,
        over_budget: false,
        undone: false,
    };
    if report.met {
        return Ok((built.0, built.1, report));
    }
    // The quantized sites and their schemes as built.
    let schemes: HashMap<String, WeightScheme> = built
        .1
        .sites
        .iter()
        .filter(|s| s.form.is_some())
        .filter_map(|s| s.scheme.map(|x| (s.weight.clone(), x)))
        .collect();
    let sites: Vec<WeightSite> = weight_sites(reference)
        .into_iter()
        .filter(|s| schemes.contains_key(&s.constant.name) && !s.constant.in_subgraph())
        .collect();
    let lifted: Vec<&WeightSite> = sites.iter().collect();
    let mut probe = Probe::new(reference, &lifted, batches, runtime, session)?;
    // Each site's current decode, and the ladder above it: (scheme or float, decode, bytes).
    type Step = (Option<WeightScheme>, Option<Arc<Vec<f32>>>, u64);
    let mut current: HashMap<String, Arc<Vec<f32>>> = HashMap::new();
    let mut ladder: HashMap<String, Vec<Step>> = HashMap::new();
    let mut bytes_now: HashMap<String, u64> = HashMap::new();
    for site in &sites {
        let name = site.constant.name.clone();
        let s = schemes[&name];
        let Ok(sim) = simulate(reference, site, &s, energy, None)? else {
            continue;
        };
        current.insert(name.clone(), Arc::new(sim.values));
        bytes_now.insert(name.clone(), sim.bytes);
        let mut steps = Vec::new();
        let mut at = Some(s);
        while let Some(from) = at {
            let next = promote(&from);
            match next {
                Some(n) => match simulate(reference, site, &n, energy, None)? {
                    Ok(sim) => steps.push((Some(n), Some(Arc::new(sim.values)), sim.bytes)),
                    Err(_) => steps.push((None, None, site.constant.bytes())),
                },
                None => steps.push((None, None, site.constant.bytes())),
            }
            at = next;
            if steps.last().is_some_and(|s| s.0.is_none()) {
                break;
            }
        }
        ladder.insert(name, steps);
    }
    let mut pins: HashMap<String, Option<WeightScheme>> = HashMap::new();
    let mut taken: HashMap<String, usize> = HashMap::new();
    let mut model = built.0;
    let mut weights = built.1;
    let mut added = 0i64;
    let mut over_budget = false;
    for _round in 0..MAX_ROUNDS {
        // The probe's view of the model as pinned so far.
        let mut replace = current.clone();
        for (name, &k) in &taken {
            match &ladder[name][k - 1].1 {
                Some(v) => {
                    replace.insert(name.clone(), v.clone());
                }
                None => {
                    replace.remove(name);
                }
            }
        }
        let base = probe.measure(&replace)?;
        // Each site's next step, measured alone on top of the current pins.
        let mut gains: Vec<(f64, String, Score, i64)> = Vec::new();
        for (name, steps) in &ladder {
            let k = taken.get(name).copied().unwrap_or(0);
            let Some((_, values, bytes)) = steps.get(k) else {
                continue;
            };
            let mut r = replace.clone();
            match values {
                Some(v) => {
                    r.insert(name.clone(), v.clone());
                }
                None => {
                    r.remove(name);
                }
            }
            let s = probe.measure(&r)?;
            let prev_bytes = if k == 0 {
                bytes_now[name]
            } else {
                steps[k - 1].2
            };
            let cost = *bytes as i64 - prev_bytes as i64;
            let gain = base.nsr - s.nsr;
            if gain > 0.0 {
                gains.push((gain / cost.max(1) as f64, name.clone(), s, cost));
            }
        }
        if gains.is_empty() {
            break;
        }
        gains.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        // Promote in that order until the probe meets the floors.
        let mut r = replace.clone();
        let promoted_before = report.promotions.len();
        for (_, name, alone, cost) in &gains {
            if max_added_bytes.is_some_and(|b| added + cost > b as i64) {
                over_budget = true;
                break;
            }
            added += cost;
            let k = taken.get(name).copied().unwrap_or(0);
            let (scheme, values, _) = &ladder[name][k];
            match values {
                Some(v) => {
                    r.insert(name.clone(), v.clone());
                }
                None => {
                    r.remove(name);
                }
            }
            let from = if k == 0 {
                schemes[name].label()
            } else {
                ladder[name][k - 1]
                    .0
                    .map_or("float".into(), |s: WeightScheme| s.label())
            };
            report.promotions.push(Promotion {
                weight: name.clone(),
                from,
                to: scheme.map_or("float".into(), |s| s.label()),
                sqnr_db_before: base.sqnr_db(),
                sqnr_db_promoted: alone.sqnr_db(),
                bytes: *cost,
            });
            pins.insert(name.clone(), *scheme);
            taken.insert(name.clone(), k + 1);
            if misses(&floors, &probe.measure(&r)?).is_empty() {
                break;
            }
        }
        if report.promotions.len() == promoted_before {
            break;
        }
        let policy = Pinned {
            inner: policy,
            pins: pins.clone(),
        };
        let (m, w) = build(&policy)?;
        let after = check(&m)?;
        model = m;
        weights = w;
        report.after = after;
        report.met = misses(&floors, &after).is_empty();
        if report.met || over_budget {
            break;
        }
    }
    report.over_budget = over_budget && !report.met;
    // Promotions that leave a floor's figure worse than before (on a degenerate output the metrics
    // can disagree) are undone: the model goes back to the recipe's own build.
    if !report.met && !report.promotions.is_empty() && !no_worse(&floors, &before, &report.after) {
        let (m, w) = build(policy)?;
        model = m;
        weights = w;
        report.after = before;
        report.promotions.clear();
        report.undone = true;
    }
    report.probe_runs = probe.runs;
    Ok((model, weights, report))
}
