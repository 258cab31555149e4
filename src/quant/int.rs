//! Integer quantizers (2–8 bits): symmetric or asymmetric, per tensor, per output channel or blockwise
//! along the reduction axis, with an optional search for the clipping range that minimises the weight's
//! squared error.
//!
//! Weights come as a row-major matrix `[channels, k]`: one row per output channel, `k` along the
//! reduction axis. A *group* is the run of values that share one scale: a whole row (per channel), a
//! block of a row (blockwise), or the whole matrix (per tensor). Codes are stored as i32 whatever the
//! width; packing into bytes is [`super::pack`]'s job.
//!
//! - Symmetric: q ∈ [−2^(b−1), 2^(b−1)−1], x ≈ s·q, no zero point. The unclipped scale maps |x|max to
//!   2^(b−1)−1, so both signs use the same range; the clip search may shrink it.
//! - Asymmetric: q ∈ [0, 2^b−1], x ≈ s·(q − z) with an integer zero point z ∈ [0, 2^b−1], so 0 is always
//!   exactly representable (as ONNX DequantizeLinear and MatMulNBits require of a zero point).

use rayon::prelude::*;
use serde::Serialize;

/// How many values share one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Granularity {
    PerTensor,
    PerChannel,
    /// Blocks of this many values along the reduction axis (the last block of a row may be short).
    Block(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct IntScheme {
    pub bits: u32,
    pub symmetric: bool,
    pub granularity: Granularity,
    /// Search the clipping range that minimises squared error (else: the full min/max range).
    pub clip_search: bool,
}

/// The result of quantizing a `[channels, k]` matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct IntQuantized {
    pub channels: usize,
    pub k: usize,
    pub scheme: IntScheme,
    /// Row-major `[channels, k]` codes.
    pub codes: Vec<i32>,
    /// One scale per group, groups in row-major order (`[channels, blocks]` for blockwise).
    pub scales: Vec<f32>,
    /// Zero points per group (asymmetric only).
    pub zero_points: Option<Vec<i32>>,
}

impl IntScheme {
    pub fn qmin(&self) -> i32 {
        if self.symmetric {
            -(1 << (self.bits - 1))
        } else {
            0
        }
    }

    pub fn qmax(&self) -> i32 {
        if self.symmetric {
            (1 << (self.bits - 1)) - 1
        } else {
            (1 << self.bits) - 1
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(2..=8).contains(&self.bits) {
            return Err(format!("bits must be 2..=8, got {}", self.bits));
        }
        if let Granularity::Block(b) = self.granularity
            && !(2..=4096).contains(&b)
        {
            return Err(format!("block size must be 2..=4096, got {b}"));
        }
        Ok(())
    }
}

/// Shrink factors tried by the clip search: 1.0 down to 0.5 in steps of 0.02.
fn clip_factors() -> impl Iterator<Item = f32> {
    (0..=25).map(|i| 1.0 - 0.02 * i as f32)
}

/// Scale and zero point for a range [lo, hi] that contains 0.
fn params(scheme: &IntScheme, lo: f32, hi: f32) -> (f32, i32) {
    if scheme.symmetric {
        let amax = lo.abs().max(hi.abs());
        let s = amax / scheme.qmax() as f32;
        (if s > 0.0 && s.is_finite() { s } else { 1.0 }, 0)
    } else {
        let s = (hi - lo) / scheme.qmax() as f32;
        if !(s > 0.0 && s.is_finite()) {
            return (1.0, 0);
        }
        let z = (-lo / s).round().clamp(0.0, scheme.qmax() as f32) as i32;
        (s, z)
    }
}

#[inline]
pub(crate) fn code(x: f32, s: f32, z: i32, qmin: i32, qmax: i32) -> i32 {
    ((x / s).round() as i32 + z).clamp(qmin, qmax)
}

/// Quantizes one group, returning (scale, zero point) and writing its codes.
fn quantize_group(scheme: &IntScheme, x: &[f32], out: &mut [i32]) -> (f32, i32) {
    let (qmin, qmax) = (scheme.qmin(), scheme.qmax());
    let lo = x.iter().copied().fold(0f32, f32::min);
    let hi = x.iter().copied().fold(0f32, f32::max);
    let (mut s, mut z) = params(scheme, lo, hi);
    if scheme.clip_search {
        let mut best = f64::INFINITY;
        for a in clip_factors() {
            let (cs, cz) = params(scheme, lo * a, hi * a);
            let mut err = 0f64;
            for &v in x {
                let d = v - cs * (code(v, cs, cz, qmin, qmax) - cz) as f32;
                err += (d * d) as f64;
                if err >= best {
                    break;
                }
            }
            if err < best {
                best = err;
                (s, z) = (cs, cz);
            }
        }
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = code(v, s, z, qmin, qmax);
    }
    (s, z)
}

/// Quantizes a row-major `[channels, k]` matrix.
pub fn quantize(
    w: &[f32],
    channels: usize,
    k: usize,
    scheme: &IntScheme,
) -> Result<IntQuantized, String> {
    scheme.validate()?;
    if w.len() != channels * k {
        return Err(format!("{} values for a [{channels}, {k}] matrix", w.len()));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(format!("value {i} is not finite ({})", w[i]));
    }
    let mut codes = vec![0i32; w.len()];
    // Groups are independent, so rows are quantized in parallel; the result does not depend on the
    // thread count.
    let per_row: Vec<Vec<(f32, i32)>> = match scheme.granularity {
        Granularity::PerTensor => vec![vec![quantize_group(scheme, w, &mut codes)]],
        Granularity::PerChannel | Granularity::Block(_) => {
            let b = match scheme.granularity {
                Granularity::Block(b) => b,
                _ => k.max(1),
            };
            w.par_chunks(k.max(1))
                .zip(codes.par_chunks_mut(k.max(1)))
                .map(|(row, out)| {
                    row.chunks(b)
                        .zip(out.chunks_mut(b))
                        .map(|(x, o)| quantize_group(scheme, x, o))
                        .collect()
                })
                .collect()
        }
    };
    let (scales, zps): (Vec<f32>, Vec<i32>) = per_row.into_iter().flatten().unzip();
    Ok(IntQuantized {
        channels,
        k,
        scheme: *scheme,
        codes,
        scales,
        zero_points: (!scheme.symmetric).then_some(zps),
    })
}

impl IntQuantized {
    /// Groups per row (1 for per-channel; 1 row-spanning group for per-tensor).
    pub fn blocks_per_row(&self) -> usize {
        match self.scheme.granularity {
            Granularity::Block(b) => self.k.div_ceil(b),
            _ => 1,
        }
    }

    /// Index of the group that element (row, col) belongs to.
    pub(crate) fn group_of(&self, row: usize, col: usize) -> usize {
        match self.scheme.granularity {
            Granularity::PerTensor => 0,
            Granularity::PerChannel => row,
            Granularity::Block(b) => row * self.blocks_per_row() + col / b,
        }
    }

    /// The values the codes stand for, row-major `[channels, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.codes.len());
        for r in 0..self.channels {
            for c in 0..self.k {
                let g = self.group_of(r, c);
                let z = self.zero_points.as_ref().map_or(0, |z| z[g]);
                out.push(self.scales[g] * (self.codes[r * self.k + c] - z) as f32);
            }
        }
        out
    }
}

/// Re-chooses the codes of `q` (the quantization of the row-major `w`) by error-compensating rounding
/// against the calibration Hessian `h` of the rows' columns ([`super::gptq`]); scales and zero
/// points stay. Returns the damping used.
pub fn refine_with_feedback(
    w: &[f32],
    q: &mut IntQuantized,
    h: &super::gptq::Hessian,
    damp: f64,
) -> Result<f64, String> {
    if q.scheme.granularity == Granularity::PerTensor {
        return Err("error feedback needs the weight's rows: not per tensor".into());
    }
    let (qmin, qmax) = (q.scheme.qmin(), q.scheme.qmax());
    let k = q.k.max(1);
    let r = {
        let q = &*q;
        super::gptq::round_with_feedback(w, q.channels, q.k, h, damp, |i, v| {
            let g = q.group_of(i / k, i % k);
            let z = q.zero_points.as_ref().map_or(0, |z| z[g]);
            let c = code(v, q.scales[g], z, qmin, qmax);
            (c, q.scales[g] * (c - z) as f32)
        })?
    };
    q.codes = r.codes;
    Ok(r.damping)
}

/// Codes of `w` against the scales and zero points already in `q` (e.g. after rounding scales to f16).
pub fn codes_for_scales(w: &[f32], q: &IntQuantized) -> Vec<i32> {
    let (qmin, qmax) = (q.scheme.qmin(), q.scheme.qmax());
    let mut out = Vec::with_capacity(w.len());
    for r in 0..q.channels {
        for c in 0..q.k {
            let g = q.group_of(r, c);
            let z = q.zero_points.as_ref().map_or(0, |z| z[g]);
            out.push(code(w[r * q.k + c], q.scales[g], z, qmin, qmax));
        }
    }
    out
}

/// Signal-to-quantization-noise ratio of an approximation, in dB (+∞ when exact).
pub fn sqnr_db(original: &[f32], approx: &[f32]) -> f64 {
    let (mut s, mut n) = (0f64, 0f64);
    for (&a, &b) in original.iter().zip(approx) {
        s += (a as f64) * (a as f64);
        n += ((a - b) as f64).powi(2);
    }
    if n == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (s / n).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheme(bits: u32, symmetric: bool, granularity: Granularity) -> IntScheme {
        IntScheme {
            bits,
            symmetric,
            granularity,
            clip_search: false,
        }
    }

    #[test]
    fn symmetric_int8_per_channel_closed_form() {
        // Row 0: absmax 2 → s = 2/127; row 1: absmax 0.5 → s = 0.5/127.
        let w = [2.0, -1.0, 0.5, 0.0, 0.25, -0.5];
        let q = quantize(&w, 2, 3, &scheme(8, true, Granularity::PerChannel)).unwrap();
        assert_eq!(q.scales, vec![2.0 / 127.0, 0.5 / 127.0]);
        assert_eq!(q.codes, vec![127, -64, 32, 0, 64, -127]);
        assert!(q.zero_points.is_none());
        let d = q.dequantize();
        for (a, b) in w.iter().zip(&d) {
            assert!((a - b).abs() <= q.scales[0] / 2.0 + 1e-7);
        }
    }

    #[test]
    fn asymmetric_keeps_zero_exact_and_uses_the_full_range() {
        let w = [-1.0, 0.0, 2.0, 3.0];
        let q = quantize(&w, 1, 4, &scheme(4, false, Granularity::PerTensor)).unwrap();
        // s = 4/15, z = round(1/s) = round(3.75) = 4.
        assert!((q.scales[0] - 4.0 / 15.0).abs() < 1e-7);
        assert_eq!(q.zero_points, Some(vec![4]));
        assert_eq!(q.codes[1], 4, "0 maps to the zero point");
        assert_eq!(q.dequantize()[1], 0.0);
        assert!(q.codes.iter().all(|&c| (0..=15).contains(&c)));
    }

    #[test]
    fn blocks_split_rows_with_a_short_last_block() {
        let w: Vec<f32> = (0..10).map(|i| i as f32 - 4.5).collect();
        let q = quantize(&w, 1, 10, &scheme(4, true, Granularity::Block(4))).unwrap();
        assert_eq!(q.blocks_per_row(), 3);
        assert_eq!(q.scales.len(), 3);
        // Block 2 holds [3.5, 4.5]: s = 4.5/7.
        assert!((q.scales[2] - 4.5 / 7.0).abs() < 1e-7);
        assert!(sqnr_db(&w, &q.dequantize()) > 20.0);
    }

    #[test]
    fn clip_search_never_loses_and_wins_on_heavy_tails() {
        // Laplace-distributed values (inverse CDF of a fixed uniform sequence): the MSE-optimal 3-bit
        // clip is near 3.9 scale units while the extreme of 1000 draws sits near 6.9.
        let w: Vec<f32> = (0..1000)
            .map(|i| {
                let u = ((i * 7919) % 1000) as f32 / 1000.0 + 0.0005 - 0.5;
                -u.signum() * (1.0 - 2.0 * u.abs()).ln()
            })
            .collect();
        for bits in [2, 3, 4, 8] {
            let plain =
                quantize(&w, 1, w.len(), &scheme(bits, true, Granularity::PerTensor)).unwrap();
            let mut s = scheme(bits, true, Granularity::PerTensor);
            s.clip_search = true;
            let searched = quantize(&w, 1, w.len(), &s).unwrap();
            let (a, b) = (
                sqnr_db(&w, &plain.dequantize()),
                sqnr_db(&w, &searched.dequantize()),
            );
            assert!(b >= a - 1e-9, "{bits} bits: search {b} < plain {a}");
            if bits <= 3 {
                assert!(
                    b > a + 1.0,
                    "{bits} bits: clipping the tail should pay ({a:.2} → {b:.2} dB)"
                );
                assert!(searched.scales[0] < plain.scales[0]);
            }
        }
    }

    #[test]
    fn error_is_bounded_by_half_a_step_inside_the_range() {
        for bits in 2..=8 {
            for symmetric in [true, false] {
                let w: Vec<f32> = (0..64)
                    .map(|i| ((i * 29 % 64) as f32 - 20.0) / 7.0)
                    .collect();
                let q =
                    quantize(&w, 4, 16, &scheme(bits, symmetric, Granularity::PerChannel)).unwrap();
                let d = q.dequantize();
                for (i, (a, b)) in w.iter().zip(&d).enumerate() {
                    let s = q.scales[i / 16];
                    assert!(
                        (a - b).abs() <= s / 2.0 + 1e-6,
                        "bits {bits} sym {symmetric}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(
            quantize(
                &[1.0, f32::NAN],
                1,
                2,
                &scheme(8, true, Granularity::PerTensor)
            )
            .is_err()
        );
        assert!(quantize(&[1.0], 1, 2, &scheme(8, true, Granularity::PerTensor)).is_err());
        assert!(quantize(&[1.0], 1, 1, &scheme(9, true, Granularity::PerTensor)).is_err());
        let zeros = quantize(&[0.0; 4], 1, 4, &scheme(4, false, Granularity::PerTensor)).unwrap();
        assert_eq!(zeros.dequantize(), vec![0.0; 4]);
    }
}
