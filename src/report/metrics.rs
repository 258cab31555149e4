//! Retention metrics between a reference tensor and a candidate tensor, accumulated batch by batch.
//!
//! Only running sums are kept (Σr², Σc², Σ(r−c)², Σr·c, max |r−c|, top-1 agreement counts), in f64, so a
//! large input set never has to be held in memory. Pairs where either side is NaN or infinite are counted
//! and left out of the sums rather than poisoning them.
//!
//! - SQNR (dB) = 10·log10(Σr² / Σ(r−c)²); +∞ when the two are identical.
//! - cosine = Σr·c / √(Σr²·Σc²); 1 when both are all zeros.
//! - relative L2 = √(Σ(r−c)² / Σr²).
//! - top-1 agreement = the fraction of rows (slices along the last axis) whose argmax agrees.
//!
//! What an output means decides the task figures ([`OutputKind`]):
//! - class scores: top-1 agreement, the share of rows whose reference is a near tie (its top two
//!   probabilities within [`NEAR_TIE`]), and top-1 agreement on the other, confident rows;
//! - sequences of class scores (an OCR or speech model's per-step output, decoded greedily as CTC:
//!   argmax per step, repeats merged, blank 0 dropped): the share of sequences decoded exactly as the
//!   reference decodes them, the share of reference sequences with a near-tie step, and per-step
//!   agreement on confident steps;
//! - embeddings (rows of features): the Spearman rank correlation between the reference's and the
//!   candidate's pairwise cosine similarities over the first [`MAX_EMBEDDING_ROWS`] rows — whether
//!   the candidate ranks neighbours as the reference does.

use anyhow::{Result, bail};
use serde::{Serialize, Serializer};

use crate::exec::Tensor;

/// Two probabilities closer than this make a near tie: a row whose reference answer a rounding may flip.
pub const NEAR_TIE: f32 = 0.05;

/// Rows of an embedding output kept for the similarity ranking.
pub const MAX_EMBEDDING_ROWS: usize = 256;

/// How an output is read: see the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    #[default]
    Raw,
    /// Scores over classes along the last axis.
    Classes,
    /// Per-step scores over classes along the last axis, rank 3, the batch along `batch_axis` (the
    /// other leading axis is time).
    Sequence { batch_axis: usize },
    /// Feature vectors along the last axis.
    Embedding,
}

#[derive(Clone, Debug, Default)]
pub struct Accumulator {
    count: u64,
    sum_ref2: f64,
    sum_cand2: f64,
    sum_diff2: f64,
    dot: f64,
    max_abs: f64,
    non_finite_ref: u64,
    non_finite_cand: u64,
    equal: u64,
    top1_rows: u64,
    top1_agree: u64,
    confident_rows: u64,
    confident_agree: u64,
    sequences: u64,
    sequences_agree: u64,
    sequences_near_tie: u64,
    embedding_ref: Vec<Vec<f32>>,
    embedding_cand: Vec<Vec<f32>>,
    kind: OutputKind,
}

/// Final figures of one accumulator.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Metrics {
    /// Elements compared (both sides finite).
    pub count: u64,
    #[serde(serialize_with = "ser_db")]
    pub sqnr_db: f64,
    pub cosine: f64,
    pub rel_l2: f64,
    pub max_abs: f64,
    /// Fraction of elements exactly equal.
    pub exact: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// Rows the top-1 agreement was counted over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_rows: Option<u64>,
    /// How the output was read (see [`OutputKind`]).
    pub kind: OutputKind,
    /// Share of rows (class scores) or steps (sequences) whose reference top two are a near tie.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub near_tie_share: Option<f64>,
    /// Top-1 agreement on the rows or steps that are not near ties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_confident: Option<f64>,
    /// Share of sequences whose greedy CTC decoding equals the reference's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence_agreement: Option<f64>,
    /// Sequences compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequences: Option<u64>,
    /// Share of reference sequences with at least one near-tie step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence_near_tie_share: Option<f64>,
    /// Spearman correlation of pairwise cosine similarities between rows (embeddings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity_rank: Option<f64>,
    /// Rows the similarity ranking was computed over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_rows: Option<u64>,
    pub non_finite_reference: u64,
    pub non_finite_candidate: u64,
}

/// JSON has no infinity: an exact match is written as the string "inf" (and −∞ as "-inf").
pub fn ser_db<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.is_infinite() {
        s.serialize_str(if *v > 0.0 { "inf" } else { "-inf" })
    } else {
        s.serialize_f64(*v)
    }
}

/// Reads what [`ser_db`] writes: a number, "inf" or "-inf"; null (how JSON writes NaN) is NaN.
pub fn de_db<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Db {
        Number(f64),
        Text(String),
        Null,
    }
    match <Option<Db> as serde::Deserialize>::deserialize(d)? {
        Some(Db::Number(v)) => Ok(v),
        Some(Db::Text(t)) if t == "inf" => Ok(f64::INFINITY),
        Some(Db::Text(t)) if t == "-inf" => Ok(f64::NEG_INFINITY),
        Some(Db::Text(t)) => Err(serde::de::Error::custom(format!(
            "'{t}' is not a dB figure"
        ))),
        Some(Db::Null) | None => Ok(f64::NAN),
    }
}

impl Accumulator {
    /// Adds one pair of tensors, read as `kind` says (class scores and sequences also count
    /// argmax agreement along the last axis).
    pub fn add(&mut self, reference: &Tensor, candidate: &Tensor, kind: OutputKind) -> Result<()> {
        if reference.shape() != candidate.shape() {
            bail!(
                "shapes differ: reference {:?}, candidate {:?}",
                reference.shape(),
                candidate.shape()
            );
        }
        let r = reference.to_f32();
        let c = candidate.to_f32();
        for (&a, &b) in r.iter().zip(c.iter()) {
            let (fa, fb) = (a.is_finite(), b.is_finite());
            if !fa || !fb {
                self.non_finite_ref += u64::from(!fa);
                self.non_finite_cand += u64::from(!fb);
                continue;
            }
            let (a, b) = (a as f64, b as f64);
            let d = a - b;
            self.count += 1;
            self.sum_ref2 += a * a;
            self.sum_cand2 += b * b;
            self.sum_diff2 += d * d;
            self.dot += a * b;
            self.max_abs = self.max_abs.max(d.abs());
            self.equal += u64::from(d == 0.0);
        }
        let shape = reference.shape().to_vec();
        let last = *shape.last().unwrap_or(&0);
        let kind = match kind {
            OutputKind::Sequence { batch_axis } if shape.len() != 3 || batch_axis > 1 => {
                OutputKind::Classes
            }
            k => k,
        };
        self.kind = kind;
        if kind == OutputKind::Raw || last < 2 {
            return Ok(());
        }
        let (rs, cs) = (r.as_slice_memory_order(), c.as_slice_memory_order());
        let (rs, cs) = match (rs, cs, r.is_standard_layout() && c.is_standard_layout()) {
            (Some(a), Some(b), true) => (a.to_vec(), b.to_vec()),
            _ => (r.iter().copied().collect(), c.iter().copied().collect()),
        };
        if kind == OutputKind::Embedding {
            for (ra, ca) in rs.chunks_exact(last).zip(cs.chunks_exact(last)) {
                if self.embedding_ref.len() == MAX_EMBEDDING_ROWS {
                    break;
                }
                self.embedding_ref.push(ra.to_vec());
                self.embedding_cand.push(ca.to_vec());
            }
            return Ok(());
        }
        // Per row: (argmaxes agree, the reference is a near tie).
        let rows: Vec<(usize, usize, bool)> = rs
            .chunks_exact(last)
            .zip(cs.chunks_exact(last))
            .map(|(ra, ca)| (argmax(ra), argmax(ca), near_tie(ra)))
            .collect();
        for &(a, b, tie) in &rows {
            self.top1_rows += 1;
            self.top1_agree += u64::from(a == b);
            if !tie {
                self.confident_rows += 1;
                self.confident_agree += u64::from(a == b);
            }
        }
        if let OutputKind::Sequence { batch_axis } = kind {
            let (batch, steps) = if batch_axis == 0 {
                (shape[0], shape[1])
            } else {
                (shape[1], shape[0])
            };
            for s in 0..batch {
                // Row index of step t of sequence s.
                let at = |t: usize| {
                    if batch_axis == 0 {
                        s * steps + t
                    } else {
                        t * batch + s
                    }
                };
                let seq: Vec<&(usize, usize, bool)> = (0..steps).map(|t| &rows[at(t)]).collect();
                let reference = ctc_greedy(seq.iter().map(|x| x.0));
                let candidate = ctc_greedy(seq.iter().map(|x| x.1));
                self.sequences += 1;
                self.sequences_agree += u64::from(reference == candidate);
                self.sequences_near_tie += u64::from(seq.iter().any(|x| x.2));
            }
        }
        Ok(())
    }

    pub fn finish(&self) -> Metrics {
        let sqnr_db = if self.sum_diff2 == 0.0 {
            f64::INFINITY
        } else if self.sum_ref2 == 0.0 {
            f64::NEG_INFINITY
        } else {
            10.0 * (self.sum_ref2 / self.sum_diff2).log10()
        };
        let denom = (self.sum_ref2 * self.sum_cand2).sqrt();
        let cosine = if denom == 0.0 {
            if self.sum_ref2 == self.sum_cand2 {
                1.0
            } else {
                0.0
            }
        } else {
            self.dot / denom
        };
        let rel_l2 = if self.sum_ref2 == 0.0 {
            if self.sum_diff2 == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (self.sum_diff2 / self.sum_ref2).sqrt()
        };
        Metrics {
            count: self.count,
            sqnr_db,
            cosine,
            rel_l2,
            max_abs: self.max_abs,
            exact: if self.count == 0 {
                1.0
            } else {
                self.equal as f64 / self.count as f64
            },
            top1_agreement: (self.top1_rows > 0)
                .then(|| self.top1_agree as f64 / self.top1_rows as f64),
            top1_rows: (self.top1_rows > 0).then_some(self.top1_rows),
            kind: self.kind,
            near_tie_share: (self.top1_rows > 0)
                .then(|| (self.top1_rows - self.confident_rows) as f64 / self.top1_rows as f64),
            top1_confident: (self.confident_rows > 0)
                .then(|| self.confident_agree as f64 / self.confident_rows as f64),
            sequence_agreement: (self.sequences > 0)
                .then(|| self.sequences_agree as f64 / self.sequences as f64),
            sequences: (self.sequences > 0).then_some(self.sequences),
            sequence_near_tie_share: (self.sequences > 0)
                .then(|| self.sequences_near_tie as f64 / self.sequences as f64),
            similarity_rank: (self.embedding_ref.len() >= 3)
                .then(|| similarity_rank(&self.embedding_ref, &self.embedding_cand)),
            embedding_rows: (self.embedding_ref.len() >= 3)
                .then_some(self.embedding_ref.len() as u64),
            non_finite_reference: self.non_finite_ref,
            non_finite_candidate: self.non_finite_cand,
        }
    }
}

/// Whether a row of scores has its top two within [`NEAR_TIE`] as probabilities: the row itself when
/// it already is a distribution (non-negative, summing to 1), its softmax otherwise.
fn near_tie(v: &[f32]) -> bool {
    let sum: f32 = v.iter().sum();
    let probabilities = v.iter().all(|&x| x >= 0.0) && (sum - 1.0).abs() < 1e-3;
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > first {
            second = first;
            first = x;
        } else if x > second {
            second = x;
        }
    }
    if !first.is_finite() || !second.is_finite() {
        return false;
    }
    if probabilities {
        return first - second < NEAR_TIE;
    }
    // Softmax probabilities of the top two: exp(x − max) / Σ exp(· − max).
    let z: f64 = v.iter().map(|&x| ((x - first) as f64).exp()).sum();
    let p2 = ((second - first) as f64).exp() / z;
    (1.0 / z - p2) < NEAR_TIE as f64
}

/// Greedy CTC decoding of per-step argmaxes: repeats merged, blank (class 0) dropped.
fn ctc_greedy(steps: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut out = Vec::new();
    let mut prev = None;
    for s in steps {
        if Some(s) != prev && s != 0 {
            out.push(s);
        }
        prev = Some(s);
    }
    out
}

/// Spearman correlation between the reference's and the candidate's cosine similarities over all
/// pairs of rows (1 when both rank every pair alike).
fn similarity_rank(reference: &[Vec<f32>], candidate: &[Vec<f32>]) -> f64 {
    let sims = |rows: &[Vec<f32>]| -> Vec<f64> {
        let norms: Vec<f64> = rows
            .iter()
            .map(|r| {
                r.iter()
                    .map(|&x| (x as f64) * (x as f64))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let mut out = Vec::new();
        for i in 0..rows.len() {
            for j in i + 1..rows.len() {
                let dot: f64 = rows[i]
                    .iter()
                    .zip(&rows[j])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                let d = norms[i] * norms[j];
                out.push(if d > 0.0 { dot / d } else { 0.0 });
            }
        }
        out
    };
    let (r, c) = (sims(reference), sims(candidate));
    // Constant similarities on both sides rank alike only when they are the same.
    spearman(&r, &c).unwrap_or(if r == c { 1.0 } else { 0.0 })
}

/// Spearman's rank correlation (average ranks on ties).
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() < 3 || x.len() != y.len() {
        return None;
    }
    let rank = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0;
            for k in i..=j {
                r[idx[k]] = avg;
            }
            i = j + 1;
        }
        r
    };
    let (rx, ry) = (rank(x), rank(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Index of the largest value; the first one on ties; NaN never wins.
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best = i;
            best_v = x;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
    }

    #[test]
    fn closed_forms() {
        let mut acc = Accumulator::default();
        // r = (3, 4), c = (3, 3): Σr² = 25, Σd² = 1, Σc² = 18, r·c = 21.
        acc.add(
            &t(&[1, 2], vec![3.0, 4.0]),
            &t(&[1, 2], vec![3.0, 3.0]),
            OutputKind::Classes,
        )
        .unwrap();
        let m = acc.finish();
        assert!((m.sqnr_db - 10.0 * 25f64.log10()).abs() < 1e-12);
        assert!((m.cosine - 21.0 / (25f64 * 18.0).sqrt()).abs() < 1e-12);
        assert!((m.rel_l2 - 0.2).abs() < 1e-12);
        assert_eq!(m.max_abs, 1.0);
        assert_eq!(m.exact, 0.5);
        // argmax(3,4) = 1, argmax(3,3) = 0 (first on ties).
        assert_eq!(m.top1_agreement, Some(0.0));
    }

    #[test]
    fn identical_is_infinite_sqnr_and_serialises() {
        let mut acc = Accumulator::default();
        acc.add(
            &t(&[2], vec![1.0, -1.0]),
            &t(&[2], vec![1.0, -1.0]),
            OutputKind::Raw,
        )
        .unwrap();
        let m = acc.finish();
        assert!(m.sqnr_db.is_infinite());
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["sqnr_db"], "inf");
        assert_eq!(json["cosine"], 1.0);
    }

    #[test]
    fn non_finite_pairs_are_counted_not_summed() {
        let mut acc = Accumulator::default();
        acc.add(
            &t(&[3], vec![1.0, f32::NAN, 2.0]),
            &t(&[3], vec![1.0, 5.0, f32::INFINITY]),
            OutputKind::Raw,
        )
        .unwrap();
        let m = acc.finish();
        assert_eq!(
            (m.count, m.non_finite_reference, m.non_finite_candidate),
            (1, 1, 1)
        );
        assert!(m.sqnr_db.is_infinite());
    }

    #[test]
    fn batches_accumulate_like_one() {
        let (a, b) = (vec![1.0, 2.0, 3.0, 4.0], vec![1.5, 2.0, 2.0, 4.5]);
        let mut whole = Accumulator::default();
        whole
            .add(
                &t(&[2, 2], a.clone()),
                &t(&[2, 2], b.clone()),
                OutputKind::Classes,
            )
            .unwrap();
        let mut parts = Accumulator::default();
        parts
            .add(
                &t(&[1, 2], a[..2].to_vec()),
                &t(&[1, 2], b[..2].to_vec()),
                OutputKind::Classes,
            )
            .unwrap();
        parts
            .add(
                &t(&[1, 2], a[2..].to_vec()),
                &t(&[1, 2], b[2..].to_vec()),
                OutputKind::Classes,
            )
            .unwrap();
        assert_eq!(whole.finish(), parts.finish());
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let mut acc = Accumulator::default();
        assert!(
            acc.add(
                &t(&[2], vec![1.0, 2.0]),
                &t(&[1, 2], vec![1.0, 2.0]),
                OutputKind::Raw
            )
            .is_err()
        );
    }

    #[test]
    fn near_ties_are_counted_and_left_out_of_confident_agreement() {
        let mut acc = Accumulator::default();
        // Probabilities: a clear row that flips, a near tie that flips, a clear row that agrees.
        acc.add(
            &t(&[3, 2], vec![0.9, 0.1, 0.51, 0.49, 0.2, 0.8]),
            &t(&[3, 2], vec![0.4, 0.6, 0.49, 0.51, 0.3, 0.7]),
            OutputKind::Classes,
        )
        .unwrap();
        let m = acc.finish();
        assert_eq!(m.top1_agreement, Some(1.0 / 3.0));
        assert_eq!(m.near_tie_share, Some(1.0 / 3.0));
        assert_eq!(m.top1_confident, Some(0.5));
        // Logits: softmax(2, 0) = (0.88, 0.12) is clear; softmax(0.1, 0) = (0.525, 0.475) is a tie.
        assert!(!near_tie(&[2.0, 0.0]));
        assert!(near_tie(&[0.1, 0.0]));
    }

    #[test]
    fn sequences_decode_as_ctc_in_either_layout() {
        assert_eq!(
            ctc_greedy([0, 3, 3, 0, 3, 5, 5, 0].into_iter()),
            vec![3, 3, 5]
        );
        // Two sequences of three steps over three classes, batch first: sequence 0 decodes
        // (1, 2) in both; sequence 1 decodes (2) vs (2, 1) — a step flips from blank to 1.
        let one_hot = |c: &[usize]| -> Vec<f32> {
            c.iter()
                .flat_map(|&k| (0..3).map(move |j| if j == k { 0.9 } else { 0.05 }))
                .collect()
        };
        let r = one_hot(&[1, 2, 2, 2, 0, 0]);
        let c = one_hot(&[1, 1, 2, 2, 0, 1]);
        let mut acc = Accumulator::default();
        acc.add(
            &t(&[2, 3, 3], r.clone()),
            &t(&[2, 3, 3], c.clone()),
            OutputKind::Sequence { batch_axis: 0 },
        )
        .unwrap();
        let m = acc.finish();
        assert_eq!((m.sequences, m.sequence_agreement), (Some(2), Some(0.5)));
        assert_eq!(m.sequence_near_tie_share, Some(0.0));
        // The same steps laid out time first: [3, 2, 3].
        let time_first = |v: &[f32]| -> Vec<f32> {
            let mut out = Vec::new();
            for step in 0..3 {
                for seq in 0..2 {
                    out.extend_from_slice(&v[(seq * 3 + step) * 3..][..3]);
                }
            }
            out
        };
        let mut acc = Accumulator::default();
        acc.add(
            &t(&[3, 2, 3], time_first(&r)),
            &t(&[3, 2, 3], time_first(&c)),
            OutputKind::Sequence { batch_axis: 1 },
        )
        .unwrap();
        assert_eq!(acc.finish().sequence_agreement, Some(0.5));
    }

    #[test]
    fn similarity_ranking_sees_neighbours_swapped() {
        let rows = vec![1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.5, 0.5];
        let mut same = Accumulator::default();
        same.add(
            &t(&[4, 2], rows.clone()),
            &t(&[4, 2], rows.clone()),
            OutputKind::Embedding,
        )
        .unwrap();
        assert_eq!(same.finish().similarity_rank, Some(1.0));
        // Row 1 moves from beside row 0 to beside row 2: the ranking of pairs changes.
        let mut moved = rows.clone();
        moved[2] = 0.1;
        moved[3] = 0.9;
        let mut acc = Accumulator::default();
        acc.add(&t(&[4, 2], rows), &t(&[4, 2], moved), OutputKind::Embedding)
            .unwrap();
        let m = acc.finish();
        assert_eq!(m.embedding_rows, Some(4));
        assert!(m.similarity_rank.unwrap() < 0.5, "{:?}", m.similarity_rank);
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 30.0, 20.0]).unwrap() - 0.5).abs() < 1e-12);
    }
}
