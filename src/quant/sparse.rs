//! Two ways of treating the values near and far from zero apart from the rest.
//!
//! - Dead zone (CoDeQ-style): values whose magnitude is below a threshold become exactly zero, the others
//!   are quantized as usual. The threshold is given, or chosen as the magnitude quantile that reaches a
//!   target sparsity.
//! - Outliers (LLM.int8-style): the largest-magnitude weights — a top fraction of the tensor, or those
//!   more than `t` standard deviations from their channel's mean — are taken out of the dense matrix (set
//!   to 0, which every scheme represents exactly) and kept exactly as (index, value) pairs, so a few
//!   extreme values do not inflate every scale. The graph adds them back through a sparse side path.

use serde::Serialize;

use super::int::IntQuantized;

/// The magnitude below which `target` (a fraction in [0, 1)) of the values lie.
pub fn threshold_for_sparsity(w: &[f32], target: f64) -> f32 {
    if w.is_empty() || target <= 0.0 {
        return 0.0;
    }
    let mut mags: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let idx = ((target.min(1.0) * mags.len() as f64).floor() as usize).min(mags.len() - 1);
    let (_, nth, _) = mags.select_nth_unstable_by(idx, f32::total_cmp);
    *nth
}

/// Sets to the zero code every value whose magnitude is below `threshold`; returns the fraction of
/// values that now dequantize to exactly zero.
pub fn apply_dead_zone(w: &[f32], q: &mut IntQuantized, threshold: f32) -> f64 {
    apply_dead_zone_by(w, q, |_| threshold)
}

/// Dead zone whose threshold depends on each group's scale: `threshold(scale)`. With
/// `|s| width * s` the zone is `width` quantization steps wide on each side of zero.
pub fn apply_dead_zone_by(w: &[f32], q: &mut IntQuantized, threshold: impl Fn(f32) -> f32) -> f64 {
    let k = q.k;
    let blocks = q.blocks_per_row();
    let block = match q.scheme.granularity {
        super::int::Granularity::Block(b) => b,
        _ => k.max(1),
    };
    let per_tensor = q.scheme.granularity == super::int::Granularity::PerTensor;
    let mut zeros = 0usize;
    for (i, (&x, c)) in w.iter().zip(q.codes.iter_mut()).enumerate() {
        let g = if per_tensor {
            0
        } else {
            (i / k) * blocks + (i % k) / block
        };
        let z = q.zero_points.as_ref().map_or(0, |z| z[g]);
        if x.abs() < threshold(q.scales[g]) {
            *c = z;
        }
        zeros += usize::from(*c == z);
    }
    zeros as f64 / w.len().max(1) as f64
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum OutlierRule {
    /// The largest-magnitude fraction of the whole tensor.
    TopFraction(f64),
    /// Values more than this many standard deviations from their channel's mean.
    StdThreshold(f64),
}

impl OutlierRule {
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            OutlierRule::TopFraction(f) if !(f > 0.0 && f < 0.5) => {
                Err(format!("outliers fraction must be in (0, 0.5), got {f}"))
            }
            OutlierRule::StdThreshold(t) if !(t.is_finite() && t > 0.0) => {
                Err(format!("outliers threshold must be > 0, got {t}"))
            }
            _ => Ok(()),
        }
    }
}

/// A dense matrix with its outliers taken out, and the outliers: (flat index, exact value), ascending.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub dense: Vec<f32>,
    pub outliers: Vec<(usize, f32)>,
}

pub fn split_outliers(w: &[f32], channels: usize, k: usize, rule: OutlierRule) -> Split {
    let mut picked: Vec<usize> = match rule {
        OutlierRule::TopFraction(f) => {
            let n = ((f.clamp(0.0, 1.0) * w.len() as f64).round() as usize).min(w.len());
            let mut idx: Vec<usize> = (0..w.len()).collect();
            // Largest magnitude first; ties by index so the choice is deterministic.
            idx.sort_by(|&a, &b| w[b].abs().total_cmp(&w[a].abs()).then(a.cmp(&b)));
            idx.truncate(n);
            idx
        }
        OutlierRule::StdThreshold(t) => (0..channels)
            .flat_map(|c| {
                let row = &w[c * k..(c + 1) * k];
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / k.max(1) as f64;
                let var =
                    row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / k.max(1) as f64;
                let limit = t * var.sqrt();
                row.iter()
                    .enumerate()
                    .filter(move |(_, v)| limit > 0.0 && (**v as f64 - mean).abs() > limit)
                    .map(move |(i, _)| c * k + i)
                    .collect::<Vec<_>>()
            })
            .collect(),
    };
    picked.sort_unstable();
    let mut dense = w.to_vec();
    let outliers = picked
        .into_iter()
        .map(|i| {
            dense[i] = 0.0;
            (i, w[i])
        })
        .collect();
    Split { dense, outliers }
}

/// Adds the outliers back into a dequantized dense matrix.
pub fn merge_outliers(dense: &mut [f32], outliers: &[(usize, f32)]) {
    for &(i, v) in outliers {
        dense[i] += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::int::{Granularity, IntScheme, quantize, sqnr_db};

    fn int4_channel() -> IntScheme {
        IntScheme {
            bits: 4,
            symmetric: true,
            granularity: Granularity::PerChannel,
            clip_search: false,
        }
    }

    #[test]
    fn dead_zone_reaches_the_target_sparsity() {
        let w: Vec<f32> = (0..1000)
            .map(|i| ((i * 613 % 1000) as f32 - 500.0) / 100.0)
            .collect();
        let t = threshold_for_sparsity(&w, 0.3);
        let mut q = quantize(&w, 10, 100, &int4_channel()).unwrap();
        let sparsity = apply_dead_zone(&w, &mut q, t);
        assert!((sparsity - 0.3).abs() < 0.02, "sparsity {sparsity}");
        let d = q.dequantize();
        assert!(w.iter().zip(&d).all(|(x, y)| x.abs() >= t || *y == 0.0));
        // Values outside the zone keep their ordinary codes.
        let plain = quantize(&w, 10, 100, &int4_channel()).unwrap();
        assert!(
            w.iter()
                .zip(q.codes.iter().zip(&plain.codes))
                .all(|(x, (a, b))| x.abs() < t || a == b)
        );
    }

    #[test]
    fn dead_zone_works_with_zero_points() {
        let w: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 2.0).collect();
        let s = IntScheme {
            bits: 4,
            symmetric: false,
            granularity: Granularity::Block(16),
            clip_search: false,
        };
        let mut q = quantize(&w, 2, 32, &s).unwrap();
        apply_dead_zone(&w, &mut q, 0.5);
        let d = q.dequantize();
        for (x, y) in w.iter().zip(&d) {
            if x.abs() < 0.5 {
                assert_eq!(*y, 0.0, "{x}");
            }
        }
    }

    #[test]
    fn outliers_come_out_exactly_and_stop_inflating_scales() {
        let mut w: Vec<f32> = (0..512)
            .map(|i| ((i * 97 % 512) as f32 - 256.0) / 256.0)
            .collect();
        w[5] = 40.0;
        w[300] = -25.0;
        let plain = quantize(&w, 4, 128, &int4_channel()).unwrap();
        let split = split_outliers(&w, 4, 128, OutlierRule::StdThreshold(6.0));
        assert_eq!(split.outliers, vec![(5, 40.0), (300, -25.0)]);
        let q = quantize(&split.dense, 4, 128, &int4_channel()).unwrap();
        let mut d = q.dequantize();
        merge_outliers(&mut d, &split.outliers);
        assert_eq!(d[5], 40.0);
        let (a, b) = (sqnr_db(&w, &plain.dequantize()), sqnr_db(&w, &d));
        assert!(b > a + 10.0, "outliers kept: {a:.1} → {b:.1} dB");
        let top = split_outliers(&w, 4, 128, OutlierRule::TopFraction(2.0 / 512.0));
        assert_eq!(top.outliers, split.outliers);
    }
}
