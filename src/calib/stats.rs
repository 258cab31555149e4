//! Streaming statistics of one activation tensor, and the quantization ranges chosen from them.
//!
//! A [`TensorStats`] sees every batch once and keeps a fixed amount of state: the running min/max, the
//! sum of squares, and a histogram of [`BINS`] bins over `[-half, half)`. When a batch holds a value
//! beyond the histogram, `half` doubles (as often as needed) and every pair of neighbouring bins merges
//! into one of the central half, which is exact: no count moves to a bin it was not in. So the histogram
//! of a stream is the same whatever the batch sizes, as long as the first batch sets the same start.
//!
//! Ranges ([`Method`]) are computed from the histogram alone: min/max, a percentile of each tail, the
//! TensorRT-style entropy threshold (the clip that minimises KL(P‖Q) between the clipped distribution
//! and its quantized version) and the clip that minimises the expected squared quantization error.

use serde::Serialize;

/// Histogram bins (even: zero sits on the boundary between the two central bins).
pub const BINS: usize = 2048;

/// How a tensor's range is chosen from its statistics.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "method")]
pub enum Method {
    MinMax,
    /// Each tail clipped at this percentile of the values (e.g. 99.99).
    Percentile {
        percentile: f64,
    },
    /// The symmetric clip minimising KL divergence between the clipped and the quantized histogram.
    Entropy,
    /// The clip minimising the expected squared error (rounding inside, clipping outside).
    Mse,
}

impl Method {
    pub fn parse(name: &str, percentile: Option<f64>) -> Result<Method, String> {
        let m = match name {
            "minmax" => Method::MinMax,
            "percentile" => Method::Percentile {
                percentile: percentile.unwrap_or(99.99),
            },
            "entropy" | "kl" => Method::Entropy,
            "mse" => Method::Mse,
            other => {
                return Err(format!(
                    "calibration method '{other}' is not one of minmax, percentile, entropy, mse"
                ));
            }
        };
        if let Method::Percentile { percentile: p } = m
            && !(50.0..=100.0).contains(&p)
        {
            return Err(format!("percentile must be within 50..=100, got {p}"));
        }
        Ok(m)
    }

    pub fn label(&self) -> String {
        match self {
            Method::MinMax => "minmax".into(),
            Method::Percentile { percentile } => format!("percentile {percentile}"),
            Method::Entropy => "entropy".into(),
            Method::Mse => "mse".into(),
        }
    }
}

/// A quantization range; always contains 0 (so zero is exact, as the zero point requires).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Range {
    pub lo: f32,
    pub hi: f32,
}

impl Range {
    pub fn new(lo: f32, hi: f32) -> Range {
        Range {
            lo: lo.min(0.0),
            hi: hi.max(0.0),
        }
    }

    /// Scale and zero point of 8-bit unsigned codes over the range: asymmetric (zero point anywhere
    /// in 0..=255) or symmetric (zero point 128, the scale set by the larger side).
    pub fn u8_params(&self, symmetric: bool) -> (f32, u8) {
        let tiny = f32::MIN_POSITIVE * 1e3;
        if symmetric {
            let amax = self.lo.abs().max(self.hi.abs());
            let s = (amax / 127.0).max(tiny);
            (s, 128)
        } else {
            let s = ((self.hi - self.lo) / 255.0).max(tiny);
            let z = (-self.lo / s).round().clamp(0.0, 255.0) as u8;
            (s, z)
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorStats {
    /// Finite values seen.
    pub count: u64,
    /// NaN or infinite values seen (ignored by every statistic).
    pub non_finite: u64,
    pub min: f32,
    pub max: f32,
    pub sum_sq: f64,
    /// The histogram covers [-half, half); 0 until a non-zero value is seen.
    half: f32,
    hist: Vec<u64>,
    /// Zeros seen before `half` was set.
    zeros: u64,
}

impl Default for TensorStats {
    fn default() -> Self {
        TensorStats {
            count: 0,
            non_finite: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            sum_sq: 0.0,
            half: 0.0,
            hist: vec![0; BINS],
            zeros: 0,
        }
    }
}

impl TensorStats {
    pub fn add(&mut self, values: &[f32]) {
        let (mut lo, mut hi, mut sq, mut n, mut bad) =
            (f32::INFINITY, f32::NEG_INFINITY, 0f64, 0u64, 0u64);
        for &v in values {
            if v.is_finite() {
                lo = lo.min(v);
                hi = hi.max(v);
                sq += (v as f64) * (v as f64);
                n += 1;
            } else {
                bad += 1;
            }
        }
        self.non_finite += bad;
        if n == 0 {
            return;
        }
        self.count += n;
        self.sum_sq += sq;
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
        let amax = lo.abs().max(hi.abs());
        if amax > 0.0 {
            if self.half == 0.0 {
                self.half = amax * (1.0 + 1e-6);
                self.hist[BINS / 2] += std::mem::take(&mut self.zeros);
            }
            while amax >= self.half {
                self.grow();
            }
        }
        if self.half == 0.0 {
            self.zeros += n;
            return;
        }
        let scale = BINS as f32 / (2.0 * self.half);
        for &v in values {
            if v.is_finite() {
                let b = ((v + self.half) * scale) as usize;
                self.hist[b.min(BINS - 1)] += 1;
            }
        }
    }

    /// Doubles the histogram's span, merging neighbouring bins into the central half.
    fn grow(&mut self) {
        let mut merged = vec![0u64; BINS];
        for (i, pair) in self.hist.chunks(2).enumerate() {
            merged[BINS / 4 + i] = pair[0] + pair[1];
        }
        self.hist = merged;
        self.half *= 2.0;
    }

    fn bin_width(&self) -> f32 {
        2.0 * self.half / BINS as f32
    }

    fn centre(&self, i: usize) -> f32 {
        -self.half + (i as f32 + 0.5) * self.bin_width()
    }

    /// The histogram as (bin centre, count), with zeros seen before any non-zero value at 0.
    fn bins(&self) -> impl Iterator<Item = (f32, u64)> + '_ {
        let zeros = (self.half == 0.0 && self.zeros > 0).then_some((0.0, self.zeros));
        self.hist
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, &c)| (self.centre(i), c))
            .chain(zeros)
    }

    /// The quantization range chosen by `method` for `levels` codes (255 steps for 8 bits).
    pub fn range(&self, method: Method) -> Range {
        if self.count == 0 {
            return Range::new(0.0, 0.0);
        }
        let full = Range::new(self.min, self.max);
        if self.half == 0.0 {
            return full;
        }
        match method {
            Method::MinMax => full,
            Method::Percentile { percentile } => self.percentile_range(percentile),
            Method::Entropy => self.entropy_range(),
            Method::Mse => self.mse_range(),
        }
    }

    fn percentile_range(&self, p: f64) -> Range {
        let tail = ((100.0 - p) / 100.0 * self.count as f64).max(0.0);
        let w = self.bin_width();
        // Lower end: the left edge of the bin where the cumulative count passes the tail.
        let mut acc = 0f64;
        let mut lo = self.min;
        for (i, &c) in self.hist.iter().enumerate() {
            acc += c as f64;
            if acc > tail {
                lo = -self.half + i as f32 * w;
                break;
            }
        }
        acc = 0.0;
        let mut hi = self.max;
        for (i, &c) in self.hist.iter().enumerate().rev() {
            acc += c as f64;
            if acc > tail {
                hi = -self.half + (i + 1) as f32 * w;
                break;
            }
        }
        Range::new(lo.max(self.min), hi.min(self.max))
    }

    /// Expected squared error of 8-bit codes over `r`, from the histogram: values inside are rounded
    /// (error step²/12), values outside are clipped to the nearer end.
    pub fn expected_mse(&self, r: Range) -> f64 {
        let step = ((r.hi - r.lo) / 255.0) as f64;
        let inside = step * step / 12.0;
        let mut err = 0f64;
        for (x, c) in self.bins() {
            let e = if x < r.lo {
                ((r.lo - x) as f64).powi(2)
            } else if x > r.hi {
                ((x - r.hi) as f64).powi(2)
            } else {
                inside
            };
            err += e * c as f64;
        }
        err / self.count.max(1) as f64
    }

    /// The tensor's own signal-to-quantization-noise ratio under `r`, in dB.
    pub fn sqnr_db(&self, r: Range) -> f64 {
        let signal = self.sum_sq / self.count.max(1) as f64;
        let noise = self.expected_mse(r);
        if noise <= 0.0 {
            return f64::INFINITY;
        }
        10.0 * (signal / noise).log10()
    }

    fn mse_range(&self) -> Range {
        let full = Range::new(self.min, self.max);
        let mut best = (self.expected_mse(full), full);
        // A joint shrink of both ends, then each end alone around the best joint one.
        for i in 1..100 {
            let a = 1.0 - 0.01 * i as f32;
            let r = Range::new(full.lo * a, full.hi * a);
            let e = self.expected_mse(r);
            if e < best.0 {
                best = (e, r);
            }
        }
        for _ in 0..2 {
            let base = best.1;
            for i in 1..60 {
                let a = 1.0 + 0.02 * i as f32 - 0.6;
                for r in [
                    Range::new((base.lo * a).max(full.lo), base.hi),
                    Range::new(base.lo, (base.hi * a).min(full.hi)),
                ] {
                    let e = self.expected_mse(r);
                    if e < best.0 {
                        best = (e, r);
                    }
                }
            }
        }
        best.1
    }

    /// TensorRT's entropy calibration on the histogram of |x|: for each candidate threshold, the
    /// distribution clipped there (outliers folded into the last bin) against the same distribution
    /// squeezed into the number of levels the range will have (255 for a one-sided tensor, 128 per
    /// side otherwise); the threshold with the least KL divergence wins.
    fn entropy_range(&self) -> Range {
        let half_bins = BINS / 2;
        let mut abs = vec![0f64; half_bins];
        for (i, &c) in self.hist.iter().enumerate() {
            let j = if i >= half_bins {
                i - half_bins
            } else {
                half_bins - 1 - i
            };
            abs[j] += c as f64;
        }
        let one_sided = self.min >= 0.0 || self.max <= 0.0;
        let levels = if one_sided { 255 } else { 128 };
        let last_nonzero = abs.iter().rposition(|&c| c > 0.0).unwrap_or(0) + 1;
        if last_nonzero <= levels {
            return Range::new(self.min, self.max);
        }
        let total_tail: Vec<f64> = {
            let mut t = vec![0f64; half_bins + 1];
            for i in (0..half_bins).rev() {
                t[i] = t[i + 1] + abs[i];
            }
            t
        };
        let mut best = (f64::INFINITY, last_nonzero);
        let mut p = vec![0f64; half_bins];
        let mut q = vec![0f64; half_bins];
        for t in levels..=last_nonzero {
            p[..t].copy_from_slice(&abs[..t]);
            p[t - 1] += total_tail[t];
            // Quantize the first t bins (without the clipped tail: clipping must cost) into `levels`
            // groups, each group's mass spread over its non-empty bins.
            for g in 0..levels {
                let start = g * t / levels;
                let end = ((g + 1) * t / levels).max(start + 1);
                let mass: f64 = abs[start..end].iter().sum::<f64>();
                let nonzero = (start..end).filter(|&i| abs[i] > 0.0).count();
                for i in start..end {
                    q[i] = if abs[i] > 0.0 && nonzero > 0 {
                        mass / nonzero as f64
                    } else {
                        0.0
                    };
                }
            }
            let (sp, sq): (f64, f64) = (p[..t].iter().sum(), q[..t].iter().sum());
            if sp <= 0.0 || sq <= 0.0 {
                continue;
            }
            let mut kl = 0f64;
            for i in 0..t {
                if p[i] > 0.0 {
                    let pi = p[i] / sp;
                    let qi = q[i] / sq;
                    kl += if qi > 0.0 {
                        pi * (pi / qi).ln()
                    } else {
                        pi * 1e3
                    };
                }
            }
            if kl < best.0 {
                best = (kl, t);
            }
        }
        let threshold = best.1 as f32 * self.bin_width();
        Range::new(self.min.max(-threshold), self.max.min(threshold))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::util::gaussian;

    #[test]
    fn growing_histogram_equals_one_shot() {
        let x = gaussian(100_000, 1);
        let mut whole = TensorStats::default();
        whole.add(&x);
        // Batches with growing ranges: the first batch sets the start, later ones double it.
        let mut parts = TensorStats::default();
        let mut scaled: Vec<f32> = x[..1000].iter().map(|v| v * 0.25).collect();
        parts.add(&scaled);
        scaled = x[1000..].to_vec();
        parts.add(&scaled);
        assert_eq!(parts.count, whole.count);
        let total: u64 = parts.hist.iter().sum();
        assert_eq!(total, parts.count);
        // 99% of the values come unscaled, so the 99.5th percentile is nearly the unscaled one.
        let r = |s: &TensorStats| s.range(Method::Percentile { percentile: 99.5 });
        assert!(
            (r(&parts).hi - r(&whole).hi).abs() < 0.05,
            "{:?} {:?}",
            r(&parts),
            r(&whole)
        );
        assert!(parts.max >= whole.max * 0.999 && parts.half >= parts.max);
    }

    #[test]
    fn ranges_of_a_gaussian() {
        let x = gaussian(400_000, 7);
        let mut s = TensorStats::default();
        for c in x.chunks(4096) {
            s.add(c);
        }
        let mm = s.range(Method::MinMax);
        assert_eq!((mm.lo, mm.hi), (s.min, s.max));
        // 99.9th percentile of N(0,1) is 3.09.
        let p = s.range(Method::Percentile { percentile: 99.9 });
        assert!(
            (p.hi - 3.09).abs() < 0.05 && (p.lo + 3.09).abs() < 0.05,
            "{p:?}"
        );
        // For 8 bits the MSE-optimal clip of a Gaussian sits near 4σ or beyond, but inside min/max
        // (about ±4.9 for this many samples).
        let m = s.range(Method::Mse);
        assert!(m.hi > 3.0 && m.hi <= s.max && m.lo < -3.0, "{m:?}");
        assert!(s.expected_mse(m) <= s.expected_mse(mm));
        // The KL threshold clips hard on a Gaussian (about 1σ with these bins): inside the data,
        // symmetric for a symmetric tensor.
        let e = s.range(Method::Entropy);
        assert!(
            e.hi > 0.5 && e.hi <= s.max && (e.hi + e.lo).abs() < 0.1,
            "{e:?}"
        );
        // A well-chosen 8-bit range of a Gaussian gives about 40 dB.
        assert!(s.sqnr_db(m) > 38.0, "{}", s.sqnr_db(m));
    }

    #[test]
    fn outliers_are_clipped_by_every_method_but_minmax() {
        let mut x = gaussian(200_000, 3);
        x[17] = 500.0;
        let mut s = TensorStats::default();
        s.add(&x);
        assert_eq!(s.range(Method::MinMax).hi, 500.0);
        let r = s.range(Method::Percentile { percentile: 99.99 });
        assert!(r.hi < 20.0, "{r:?}");
        // One value at 500 in 200 000: clipping it to 20 costs 480²/200 000 ≈ 1.2 per value, more
        // than the coarser rounding of keeping it, so mse keeps most of the range.
        let e = s.range(Method::Entropy);
        assert!(e.hi < 100.0, "{e:?}");
        // Bins are 0.5 wide now: too coarse to rank ranges by expected error, except for mse, which
        // minimises it.
        assert!(s.expected_mse(s.range(Method::Mse)) < s.expected_mse(s.range(Method::MinMax)));
    }

    #[test]
    fn one_sided_and_constant_tensors() {
        let x: Vec<f32> = gaussian(50_000, 9).iter().map(|v| v.max(0.0)).collect();
        let mut s = TensorStats::default();
        s.add(&x);
        for m in [
            Method::MinMax,
            Method::Percentile { percentile: 99.99 },
            Method::Entropy,
            Method::Mse,
        ] {
            let r = s.range(m);
            assert_eq!(r.lo, 0.0, "{m:?}");
            let (_, z) = r.u8_params(false);
            assert_eq!(z, 0, "{m:?}: zero must be code 0");
        }
        let mut z = TensorStats::default();
        z.add(&[0.0; 100]);
        z.add(&[f32::NAN]);
        assert_eq!(z.range(Method::Entropy), Range::new(0.0, 0.0));
        assert_eq!((z.count, z.non_finite), (100, 1));
        assert!(z.range(Method::MinMax).u8_params(false).0 > 0.0);
    }
}
