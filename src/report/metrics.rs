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

use anyhow::{Result, bail};
use serde::{Serialize, Serializer};

use crate::exec::Tensor;

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
    /// Adds one pair of tensors; `top1` asks for argmax agreement along the last axis.
    pub fn add(&mut self, reference: &Tensor, candidate: &Tensor, top1: bool) -> Result<()> {
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
        let last = *reference.shape().last().unwrap_or(&0);
        if top1 && last >= 2 {
            let (rs, cs) = (r.as_slice_memory_order(), c.as_slice_memory_order());
            let (rs, cs) = match (rs, cs, r.is_standard_layout() && c.is_standard_layout()) {
                (Some(a), Some(b), true) => (a.to_vec(), b.to_vec()),
                _ => (r.iter().copied().collect(), c.iter().copied().collect()),
            };
            for (ra, ca) in rs.chunks_exact(last).zip(cs.chunks_exact(last)) {
                self.top1_rows += 1;
                self.top1_agree += u64::from(argmax(ra) == argmax(ca));
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
            non_finite_reference: self.non_finite_ref,
            non_finite_candidate: self.non_finite_cand,
        }
    }
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
            true,
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
        acc.add(&t(&[2], vec![1.0, -1.0]), &t(&[2], vec![1.0, -1.0]), false)
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
            false,
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
            .add(&t(&[2, 2], a.clone()), &t(&[2, 2], b.clone()), true)
            .unwrap();
        let mut parts = Accumulator::default();
        parts
            .add(
                &t(&[1, 2], a[..2].to_vec()),
                &t(&[1, 2], b[..2].to_vec()),
                true,
            )
            .unwrap();
        parts
            .add(
                &t(&[1, 2], a[2..].to_vec()),
                &t(&[1, 2], b[2..].to_vec()),
                true,
            )
            .unwrap();
        assert_eq!(whole.finish(), parts.finish());
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let mut acc = Accumulator::default();
        assert!(
            acc.add(&t(&[2], vec![1.0, 2.0]), &t(&[1, 2], vec![1.0, 2.0]), false)
                .is_err()
        );
    }
}
