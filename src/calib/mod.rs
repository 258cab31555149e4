//! Calibration: run a model over an input set with the activations to be quantized exposed as extra
//! outputs, and fold each batch into per-tensor streaming statistics ([`stats::TensorStats`]). Nothing
//! of a batch outlives it, so memory is one batch's activations plus fixed-size histograms whatever the
//! number of samples.

pub mod codes;
pub mod stats;

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use crate::exec::inputs::InputSet;
use crate::exec::{self, RuntimeKind, SessionOptions};
use crate::ir::Model;
use crate::util::Progress;

pub use crate::quant::gptq::Hessian;
pub use codes::{CodeProfile, Codes};
pub use stats::{Method, Range, TensorStats};

/// Statistics of every calibrated tensor, by name.
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    pub tensors: BTreeMap<String, TensorStats>,
    pub batches: usize,
    pub runtime: Option<RuntimeKind>,
    /// What the input set was.
    pub description: String,
    /// Input Hessians of the weights whose codes are chosen by error feedback, by weight name.
    pub hessians: BTreeMap<String, Hessian>,
    /// u8 code profiles of product inputs, by (tensor, reduction axis).
    pub profiles: BTreeMap<(String, i64), CodeProfile>,
}

/// A tensor to profile ([`CodeProfile`]) along its reduction axis (negative counts from the end).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileRequest {
    pub tensor: String,
    pub axis: i64,
    pub codes: Codes,
}

/// Runs `model` over every batch of `inputs` in `runtime` and collects statistics of `tensors` (names of
/// float values of the main graph) and the code profiles of `profiles`. Tensors that never appear, or
/// are not float, get no entry.
pub fn calibrate(
    model: &Model,
    tensors: &[String],
    profiles: &[ProfileRequest],
    inputs: &mut InputSet,
    runtime: RuntimeKind,
    session: &SessionOptions,
) -> Result<Calibration> {
    let mut stats: BTreeMap<String, TensorStats> = BTreeMap::new();
    let mut prof: BTreeMap<(String, i64), CodeProfile> = BTreeMap::new();
    let mut names: Vec<String> = tensors
        .iter()
        .cloned()
        .chain(profiles.iter().map(|p| p.tensor.clone()))
        .collect();
    names.sort();
    names.dedup();
    let total = for_each_batch(
        model,
        &names,
        inputs,
        runtime,
        session,
        "calibrating",
        |name, t| {
            let v = t.to_f32();
            if tensors.iter().any(|x| x == name) {
                let s = stats.entry(name.to_string()).or_default();
                match v.as_slice() {
                    Some(x) => s.add(x),
                    None => s.add(&v.iter().copied().collect::<Vec<f32>>()),
                }
            }
            for p in profiles.iter().filter(|p| p.tensor == name) {
                let Some(rows) = rows_along(&v, p.axis, None) else {
                    continue;
                };
                let e = prof
                    .entry((p.tensor.clone(), p.axis))
                    .or_insert_with(|| CodeProfile::new(p.codes, rows.ncols()));
                e.add(rows.view());
            }
        },
    )?;
    Ok(Calibration {
        tensors: stats,
        batches: total,
        runtime: Some(runtime),
        description: inputs.description.clone(),
        hessians: BTreeMap::new(),
        profiles: prof,
    })
}

/// The values of `v` as rows along `axis` (negative counts from the end): that axis moved last and
/// the rest flattened. None when the rank has no such axis or its length is not `k` (when given).
fn rows_along(
    v: &ndarray::ArrayD<f32>,
    axis: i64,
    k: Option<usize>,
) -> Option<ndarray::CowArray<'_, f32, ndarray::Ix2>> {
    let rank = v.ndim() as i64;
    let a = if axis < 0 { rank + axis } else { axis };
    if !(0..rank).contains(&a) {
        return None;
    }
    let a = a as usize;
    let len = v.len_of(ndarray::Axis(a));
    if k.is_some_and(|k| k != len) {
        return None;
    }
    let mut perm: Vec<usize> = (0..v.ndim()).filter(|&d| d != a).collect();
    perm.push(a);
    let moved = v.view().permuted_axes(perm);
    let rows = moved.len() / len.max(1);
    // A copy only when the axis was not already last.
    Some(if moved.is_standard_layout() {
        moved
            .into_shape_with_order((rows, len))
            .expect("a standard-layout view reshapes")
            .into()
    } else {
        moved
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((rows, len))
            .expect("a standard-layout array reshapes")
            .into()
    })
}

/// Runs `model` over every batch with `tensors` exposed, handing each float value of them (graph inputs
/// read from the batch itself) to `fold` as soon as the runtime gives it out; returns the number of
/// batches.
fn for_each_batch(
    model: &Model,
    tensors: &[String],
    inputs: &mut InputSet,
    runtime: RuntimeKind,
    session_opts: &SessionOptions,
    label: &str,
    mut fold: impl FnMut(&str, &exec::Tensor),
) -> Result<usize> {
    let lean = session_opts.lean;
    let (mut session, info) = {
        let prepared = exec::expose_values(model, tensors, "calibration");
        let session = exec::open(&prepared, runtime, session_opts)
            .context("cannot open the calibration session")?;
        (session, prepared.inputs)
    };
    let wanted: std::collections::HashSet<&str> = tensors.iter().map(String::as_str).collect();
    let total = inputs.len();
    let progress = Progress::new(total as u64, label);
    for b in 0..total {
        let batch = inputs
            .batch(b)
            .with_context(|| format!("calibration batch {b}"))?;
        exec::check_batch(&info, &batch).with_context(|| format!("calibration batch {b}"))?;
        let mut returned = std::collections::HashSet::new();
        session
            .run_each(&batch, &mut |name, t| {
                if wanted.contains(name.as_str()) && t.is_float() {
                    fold(&name, &t);
                }
                returned.insert(name);
                Ok(())
            })
            .with_context(|| format!("{runtime}: calibration batch {b}"))?;
        for (name, t) in &batch {
            if !returned.contains(name) && wanted.contains(name.as_str()) && t.is_float() {
                fold(name, t);
            }
        }
        if lean {
            crate::util::release_freed_memory();
        }
        progress.inc(1);
    }
    progress.finish();
    Ok(total)
}

/// Per-channel statistics of one tensor along one axis, over every value seen.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChannelStats {
    /// The mean of x²: the input-channel energy that weights VQ clustering.
    pub mean_square: Vec<f64>,
    /// The largest finite |x|: the channel ranges activation smoothing evens out.
    pub absmax: Vec<f64>,
}

/// [`ChannelStats`] of each `(tensor, axis)` (a negative axis counts from the end) over every batch of
/// `inputs`. Tensors that never appear, or whose rank does not have the axis, get no entry.
pub fn channel_stats(
    model: &Model,
    wanted: &[(String, i64)],
    inputs: &mut InputSet,
    runtime: RuntimeKind,
    session: &SessionOptions,
) -> Result<BTreeMap<(String, i64), ChannelStats>> {
    let mut names: Vec<String> = wanted.iter().map(|(t, _)| t.clone()).collect();
    names.sort();
    names.dedup();
    // (sums of squares, maxima, values per channel) per request.
    type Acc = (Vec<f64>, Vec<f64>, u64);
    let mut acc: BTreeMap<(String, i64), Acc> = BTreeMap::new();
    for_each_batch(
        model,
        &names,
        inputs,
        runtime,
        session,
        "channel statistics",
        |name, x| {
            let v = x.to_f32();
            for (t, axis) in wanted.iter().filter(|(t, _)| t == name) {
                let rank = v.ndim() as i64;
                let a = if *axis < 0 { rank + axis } else { *axis };
                if !(0..rank).contains(&a) {
                    continue;
                }
                let a = ndarray::Axis(a as usize);
                let (sums, maxima): (Vec<f64>, Vec<f64>) = v
                    .axis_iter(a)
                    .map(|lane| {
                        lane.iter().fold((0f64, 0f64), |(s, m), &y| {
                            let y = y as f64;
                            // NaN never wins a max: a channel holding only NaN reads 0.
                            (s + y * y, if y.is_finite() { m.max(y.abs()) } else { m })
                        })
                    })
                    .unzip();
                let per = (v.len() / v.len_of(a).max(1)) as u64;
                let e = acc
                    .entry((t.clone(), *axis))
                    .or_insert_with(|| (vec![0.0; sums.len()], vec![0.0; sums.len()], 0));
                if e.0.len() == sums.len() {
                    e.0.iter_mut().zip(&sums).for_each(|(a, b)| *a += b);
                    e.1.iter_mut()
                        .zip(&maxima)
                        .for_each(|(a, b)| *a = a.max(*b));
                    e.2 += per;
                }
            }
        },
    )?;
    Ok(acc
        .into_iter()
        .map(|(k, (sums, absmax, n))| {
            let mean_square = sums.iter().map(|s| s / n.max(1) as f64).collect();
            (
                k,
                ChannelStats {
                    mean_square,
                    absmax,
                },
            )
        })
        .collect())
}

/// One layer input's second moment to accumulate: the rows of each source are folded into one
/// `k × k` [`Hessian`] under `key` (a weight read by several layers sums their inputs' moments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HessianRequest {
    pub key: String,
    pub k: usize,
    pub sources: Vec<HessianSource>,
}

/// A tensor whose rows are a layer's inputs: with its channel axis (negative counts from the end)
/// moved last, or, for a convolution, its patches ([`Hessian::add_patches`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HessianSource {
    pub tensor: String,
    pub axis: i64,
    pub conv: Option<crate::quant::gptq::ConvGeometry>,
}

/// The input Hessian `XᵀX / n` of every request over every batch of `inputs` (see
/// [`HessianRequest`]), in one pass over the data. Requests whose sources never appear, or whose
/// channel count is not `k`, get no entry. Each request holds its `k × k` f32 sums (`4·k²` bytes)
/// to the end.
/// How GPTQ's calibration batches are split so that its keep-or-drop check judges it on data it was
/// not fitted on: of `n` batches, every fourth (indices 3, 7, 11, …) is held out, or the last one when
/// there are 2 or 3; the Hessians are measured on the rest. One batch cannot be split: it is both.
/// Returns (fit, held).
pub fn gptq_split(n: usize) -> (Vec<usize>, Vec<usize>) {
    if n < 2 {
        return ((0..n).collect(), (0..n).collect());
    }
    let mut held: Vec<usize> = (0..n).filter(|i| i % 4 == 3).collect();
    if held.is_empty() {
        held.push(n - 1);
    }
    let fit = (0..n).filter(|i| !held.contains(i)).collect();
    (fit, held)
}

pub fn hessians(
    model: &Model,
    requests: &[HessianRequest],
    inputs: &mut InputSet,
    runtime: RuntimeKind,
    session: &SessionOptions,
) -> Result<BTreeMap<String, Hessian>> {
    let mut names: Vec<String> = requests
        .iter()
        .flat_map(|r| r.sources.iter().map(|src| src.tensor.clone()))
        .collect();
    names.sort();
    names.dedup();
    let mut acc: BTreeMap<&str, Hessian> = requests
        .iter()
        .map(|r| (r.key.as_str(), Hessian::new(r.k)))
        .collect();
    for_each_batch(
        model,
        &names,
        inputs,
        runtime,
        session,
        "input Hessians",
        |name, x| {
            let v = x.to_f32();
            for r in requests {
                for src in r.sources.iter().filter(|src| src.tensor == name) {
                    let Some(h) = acc.get_mut(r.key.as_str()) else {
                        continue;
                    };
                    if let Some(g) = &src.conv {
                        h.add_patches(v.view(), g);
                        continue;
                    }
                    if let Some(rows) = rows_along(&v, src.axis, Some(r.k)) {
                        h.add_rows(rows.view());
                    }
                }
            }
        },
    )?;
    let mut out = BTreeMap::new();
    for (k, mut h) in acc {
        h.finish();
        if h.rows > 0 {
            out.insert(k.to_string(), h);
        }
    }
    Ok(out)
}

/// The mean of x² per channel of each entry: the input-channel energy that weights VQ clustering.
pub fn energy_of(
    stats: BTreeMap<(String, i64), ChannelStats>,
) -> BTreeMap<(String, i64), Vec<f64>> {
    stats.into_iter().map(|(k, s)| (k, s.mean_square)).collect()
}

/// How closely a candidate reproduces the reference on the check batches: the lowest cosine over the
/// float outputs, and the lowest top-1 agreement over the outputs that look like class scores.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Retention {
    pub cosine: f64,
    pub top1: Option<f64>,
    /// Rows the top-1 agreement was counted over.
    pub top1_rows: Option<u64>,
    /// The worst output's noise-to-signal ratio Σ(r−c)²/Σr².
    pub nsr: f64,
    /// The lowest similarity-ranking agreement of embedding outputs.
    pub similarity: Option<f64>,
    /// The lowest share of sequences decoded alike.
    pub sequence: Option<f64>,
}

/// The float model's outputs on a few calibration batches, kept to score candidates against.
pub struct OutputCheck {
    kinds: BTreeMap<String, crate::report::metrics::OutputKind>,
    batches: Vec<Vec<exec::Named>>,
    reference: Vec<Vec<exec::Named>>,
    runtime: RuntimeKind,
    session: SessionOptions,
}

impl OutputCheck {
    /// Runs the reference over the first `max_batches` batches of `inputs`.
    pub fn new(
        reference: &Model,
        inputs: &mut InputSet,
        max_batches: usize,
        runtime: RuntimeKind,
        session: &SessionOptions,
    ) -> Result<OutputCheck> {
        let n = inputs.len().min(max_batches);
        let batches = (0..n)
            .map(|b| inputs.batch(b))
            .collect::<Result<Vec<_>>>()?;
        let mut s = exec::open(
            &exec::Prepared::from_model(reference, "reference"),
            runtime,
            session,
        )?;
        let outputs = batches
            .iter()
            .map(|b| s.run(b))
            .collect::<Result<Vec<_>>>()
            .context("reference outputs on the calibration data")?;
        let kinds = crate::adapt::output_kinds(
            reference,
            &exec::Prepared::from_model(reference, "").outputs,
        );
        Ok(OutputCheck {
            kinds,
            batches,
            reference: outputs,
            runtime,
            session: session.clone(),
        })
    }

    /// Scores a candidate against the reference outputs of the first `limit` batches (all: None).
    pub fn retention(&self, candidate: &Model, limit: Option<usize>) -> Result<Retention> {
        let mut s = exec::open(
            &exec::Prepared::from_model(candidate, "candidate"),
            self.runtime,
            &self.session,
        )?;
        let n = limit.unwrap_or(usize::MAX).min(self.batches.len());
        let outputs = self.batches[..n]
            .iter()
            .map(|b| s.run(b))
            .collect::<Result<Vec<_>>>()?;
        let sc = crate::adapt::score(&self.reference[..n], &outputs, &self.kinds)?;
        Ok(Retention {
            cosine: sc.cosine,
            top1: sc.top1,
            top1_rows: sc.top1_rows,
            nsr: sc.nsr,
            similarity: sc.similarity,
            sequence: sc.sequence,
        })
    }
}

#[cfg(test)]
mod split_tests {
    use super::gptq_split;

    #[test]
    fn held_batches_are_never_fitted_on() {
        assert_eq!(gptq_split(1), (vec![0], vec![0]));
        assert_eq!(gptq_split(2), (vec![0], vec![1]));
        assert_eq!(gptq_split(3), (vec![0, 1], vec![2]));
        assert_eq!(gptq_split(8), (vec![0, 1, 2, 4, 5, 6], vec![3, 7]));
    }
}
