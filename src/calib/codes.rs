//! Code profiles: the largest u8 code each input channel of a product took over calibration data,
//! and the largest sum of codes of each neighbouring pair of channels. They decide whether an
//! `u8 × s8` product whose CPU kernel adds neighbouring products in a saturating 16-bit lane
//! (`vpmaddubsw`) can overflow on data like the calibration set, which is far less often than the
//! worst case of any input: a one-hot input never has two non-zero neighbours, and the extremes of
//! two channels rarely meet in one row.

use ndarray::ArrayView2;

/// How the u8 codes of a profiled tensor are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codes {
    /// One scale and zero point for every batch, chosen after calibration: the profile keeps real
    /// values, turned into codes by [`CodeProfile::bounds`].
    Static,
    /// Per batch from the batch's own range, as `DynamicQuantizeLinear` does: the profile keeps codes.
    Dynamic,
}

/// Maxima over every row seen of one tensor along its reduction axis (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct CodeProfile {
    pub codes: Codes,
    /// Per channel: the largest value (static) or code (dynamic); `-inf` for a channel never seen.
    pub channel: Vec<f32>,
    /// Per pair of channels `(2i, 2i+1)`: the largest sum in one row (a lone last channel: its own).
    pub pair: Vec<f32>,
    pub rows: u64,
}

impl CodeProfile {
    pub fn new(codes: Codes, k: usize) -> CodeProfile {
        CodeProfile {
            codes,
            channel: vec![f32::NEG_INFINITY; k],
            pair: vec![f32::NEG_INFINITY; k.div_ceil(2)],
            rows: 0,
        }
    }

    /// Folds one batch of rows (`rows × k`); a dynamic profile takes the codes of this batch's range
    /// over all its values, which is what `DynamicQuantizeLinear` sees when the tensor is the batch.
    /// Non-finite values are left out.
    pub fn add(&mut self, x: ArrayView2<f32>) {
        let k = self.channel.len();
        if x.ncols() != k || x.nrows() == 0 {
            return;
        }
        let code: Box<dyn Fn(f32) -> f32> = match self.codes {
            Codes::Static => Box::new(|v| v),
            Codes::Dynamic => {
                let (lo, hi) = x
                    .iter()
                    .filter(|v| v.is_finite())
                    .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let scale = (hi - lo) / 255.0;
                if scale > 0.0 {
                    let zp = (-lo / scale).round_ties_even().clamp(0.0, 255.0);
                    Box::new(move |v| ((v / scale).round_ties_even() + zp).clamp(0.0, 255.0))
                } else {
                    // All zeros: every code is the zero point 0.
                    Box::new(|_| 0.0)
                }
            }
        };
        for row in x.rows() {
            let mut q = [0f32; 2];
            for (j, &v) in row.iter().enumerate() {
                let c = if v.is_finite() { code(v) } else { f32::NAN };
                if c.is_finite() {
                    self.channel[j] = self.channel[j].max(c);
                }
                q[j % 2] = c;
                if j % 2 == 1 || j + 1 == k {
                    let s = if j % 2 == 1 { q[0] + q[1] } else { q[0] };
                    if s.is_finite() {
                        self.pair[j / 2] = self.pair[j / 2].max(s);
                    }
                }
            }
        }
        self.rows += x.nrows() as u64;
    }

    /// The largest u8 code of each channel and of each pair's sum, given the static scale and zero
    /// point (ignored for a dynamic profile). A channel never seen reads the zero point; a pair sum
    /// is at most its channels' codes together, and `round(a) + round(b) ≤ a + b + 1`.
    pub fn bounds(&self, scale: f32, zero_point: u8) -> (Vec<i32>, Vec<i32>) {
        let z = zero_point as f32;
        let (channel, pair): (Vec<f32>, Vec<f32>) = match self.codes {
            Codes::Static => (
                self.channel
                    .iter()
                    .map(|&v| ((v / scale).round_ties_even() + z).clamp(0.0, 255.0))
                    .collect(),
                self.pair
                    .iter()
                    .map(|&v| (v / scale + 2.0 * z + 1.0).floor().clamp(0.0, 510.0))
                    .collect(),
            ),
            Codes::Dynamic => (self.channel.clone(), self.pair.clone()),
        };
        let channel: Vec<i32> = channel
            .iter()
            .map(|&c| {
                if c.is_finite() {
                    c as i32
                } else {
                    zero_point as i32
                }
            })
            .collect();
        let pair = pair
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let both = channel[2 * i] + channel.get(2 * i + 1).copied().unwrap_or(0);
                if s.is_finite() {
                    (s as i32).min(both)
                } else {
                    both
                }
            })
            .collect();
        (channel, pair)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn one_hot_rows_never_pair_two_codes() {
        // One-hot rows of 6 channels in [0, 1]: each pair holds at most one 1.
        let mut x = Array2::<f32>::zeros((12, 6));
        for r in 0..12 {
            x[[r, r % 6]] = 1.0;
        }
        for codes in [Codes::Static, Codes::Dynamic] {
            let mut p = CodeProfile::new(codes, 6);
            p.add(x.view());
            let (ch, pair) = p.bounds(1.0 / 255.0, 0);
            assert_eq!(ch, vec![255; 6], "{codes:?}");
            assert_eq!(pair, vec![255; 3], "{codes:?}");
        }
    }

    #[test]
    fn bounds_cover_every_code_pair_seen() {
        // Random rows, odd k, a few batches with different ranges; the bounds must hold for the
        // codes each batch actually quantizes to, and be tight for some pair.
        let mut state = 7u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.3
        };
        let k = 7;
        let batches: Vec<Array2<f32>> = (0..3)
            .map(|b| Array2::from_shape_fn((20, k), |(_, j)| rnd() * (1 + b + j % 3) as f32))
            .collect();
        let (scale, zp) = (0.02f32, 40u8);
        let quant = |v: f32, s: f32, z: f32| ((v / s).round_ties_even() + z).clamp(0.0, 255.0);
        for codes in [Codes::Static, Codes::Dynamic] {
            let mut p = CodeProfile::new(codes, k);
            let mut seen_max = 0f32;
            let mut seen_pair = vec![0f32; k.div_ceil(2)];
            for x in &batches {
                p.add(x.view());
                let (s, z) = match codes {
                    Codes::Static => (scale, zp as f32),
                    Codes::Dynamic => {
                        let lo = x.iter().fold(0f32, |a, &v| a.min(v));
                        let hi = x.iter().fold(0f32, |a, &v| a.max(v));
                        let s = (hi - lo) / 255.0;
                        (s, (-lo / s).round_ties_even())
                    }
                };
                for row in x.rows() {
                    let q: Vec<f32> = row.iter().map(|&v| quant(v, s, z)).collect();
                    seen_max = seen_max.max(q.iter().cloned().fold(0.0, f32::max));
                    for (i, c) in q.chunks(2).enumerate() {
                        seen_pair[i] = seen_pair[i].max(c.iter().sum());
                    }
                }
            }
            let (ch, pair) = p.bounds(scale, zp);
            assert_eq!(*ch.iter().max().unwrap() as f32, seen_max, "{codes:?}");
            for (b, s) in pair.iter().zip(&seen_pair) {
                assert!(*b as f32 >= *s, "{codes:?}: bound {b} < seen {s}");
                assert!(
                    (*b as f32) <= s + 1.0,
                    "{codes:?}: bound {b} loose against {s}"
                );
            }
        }
    }
}
