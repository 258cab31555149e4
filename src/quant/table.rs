//! Table-based 4-bit formats with blockwise absmax scaling (bitsandbytes semantics): each block of the
//! reduction axis is divided by its largest magnitude, and every value becomes the index of the nearest
//! entry of a 16-entry code table in [−1, 1]. Block scales can themselves be quantized to 8 bits
//! ("double quantization").
//!
//! - NF4: the table of quantiles of N(0, 1) that bitsandbytes uses — 8 positive and 7 negative levels
//!   plus an exact zero, normalised to ±1. It is computed here from the inverse normal CDF, not copied.
//! - FP4: the OCP/ONNX FLOAT4E2M1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} with sign, divided by 6; the code of
//!   a value is its E2M1 bit pattern (sign in bit 3), so codes are valid ONNX float4e2m1 elements.

use std::sync::OnceLock;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TableFormat {
    Nf4,
    Fp4,
}

/// Inverse of the standard normal CDF (Acklam's rational approximation; relative error < 1.2e-9).
#[allow(clippy::excessive_precision)] // published coefficients, kept as printed
pub fn normal_ppf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    const LOW: f64 = 0.02425;
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The NF4 levels, ascending; code i stands for level i.
pub fn nf4_table() -> &'static [f32; 16] {
    static T: OnceLock<[f32; 16]> = OnceLock::new();
    T.get_or_init(|| {
        // bitsandbytes' construction: quantiles at evenly spaced probabilities from `offset` down to
        // 0.5 (exclusive), 8 for the positive side and 7 for the negative side, plus 0.
        let offset = 0.9677083f64;
        let side = |n: usize| -> Vec<f64> {
            (0..n - 1)
                .map(|i| normal_ppf(offset + (0.5 - offset) * i as f64 / (n - 1) as f64))
                .collect()
        };
        let mut v: Vec<f64> = side(9);
        v.extend(side(8).iter().map(|x| -x));
        v.push(0.0);
        v.sort_by(f64::total_cmp);
        let max = v[15];
        let mut t = [0f32; 16];
        for (d, x) in t.iter_mut().zip(&v) {
            *d = (x / max) as f32;
        }
        t
    })
}

/// The FP4 (E2M1) values divided by 6, indexed by their 4-bit code.
pub fn fp4_table() -> &'static [f32; 16] {
    static T: OnceLock<[f32; 16]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0f32; 16];
        for (code, d) in t.iter_mut().enumerate() {
            let (sign, e, m) = ((code >> 3) & 1, (code >> 1) & 3, code & 1);
            let mag = if e == 0 {
                0.5 * m as f32
            } else {
                (1 << (e - 1)) as f32 * (1.0 + 0.5 * m as f32)
            };
            *d = if sign == 1 { -mag } else { mag } / 6.0;
        }
        t
    })
}

impl TableFormat {
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            TableFormat::Nf4 => nf4_table(),
            TableFormat::Fp4 => fp4_table(),
        }
    }
}

/// A `[channels, k]` matrix in a table format: one code per value, one absmax scale per block.
#[derive(Clone, Debug, PartialEq)]
pub struct TableQuantized {
    pub format: TableFormat,
    pub channels: usize,
    pub k: usize,
    pub block: usize,
    pub codes: Vec<u8>,
    /// `[channels, blocks]` absmax scales.
    pub scales: Vec<f32>,
}

/// Nearest-entry lookup for a 16-entry table: the entries sorted, the midpoints between neighbours, and
/// the code of each sorted entry. Ties go to the lower entry, so both zeros of FP4 map to +0's code.
struct Nearest {
    mids: [f32; 15],
    codes: [u8; 16],
}

impl Nearest {
    fn new(table: &[f32; 16]) -> Nearest {
        let mut order: Vec<usize> = (0..16).collect();
        // Equal values keep code order, so of FP4's ±0 the +0 code (0) comes first.
        order.sort_by(|&a, &b| {
            table[a]
                .partial_cmp(&table[b])
                .expect("finite table")
                .then(a.cmp(&b))
        });
        order.dedup_by(|a, b| table[*a] == table[*b]);
        let mut mids = [f32::INFINITY; 15];
        let mut codes = [order[order.len() - 1] as u8; 16];
        for (i, w) in order.windows(2).enumerate() {
            mids[i] = 0.5 * (table[w[0]] + table[w[1]]);
        }
        for (i, &c) in order.iter().enumerate() {
            codes[i] = c as u8;
        }
        Nearest { mids, codes }
    }

    #[inline]
    fn code(&self, x: f32) -> u8 {
        // Entries whose midpoint with the next entry is below x are too small.
        self.codes[self.mids.partition_point(|&m| m < x)]
    }
}

/// Codes of one block against its scale, and the block's squared error.
fn block_codes(table: &[f32; 16], near: &Nearest, x: &[f32], s: f32, out: &mut [u8]) -> f64 {
    let inv = 1.0 / s;
    let mut err = 0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = near.code(v * inv);
        let d = v - table[*o as usize] * s;
        err += (d * d) as f64;
    }
    err
}

/// Quantizes a row-major `[channels, k]` matrix in blocks of `block` along k. The scale of a block is
/// its absmax (bitsandbytes), or with `clip_search` the shrunk absmax (factors 1.0 down to 0.5) that
/// minimises the block's squared error.
pub fn quantize(
    w: &[f32],
    channels: usize,
    k: usize,
    block: usize,
    format: TableFormat,
    clip_search: bool,
) -> Result<TableQuantized, String> {
    use rayon::prelude::*;
    if w.len() != channels * k {
        return Err(format!("{} values for a [{channels}, {k}] matrix", w.len()));
    }
    if block == 0 {
        return Err("block size must be positive".into());
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(format!("value {i} is not finite ({})", w[i]));
    }
    let table = format.table();
    let near = Nearest::new(table);
    let mut codes = vec![0u8; w.len()];
    let per_row: Vec<Vec<f32>> = w
        .par_chunks(k.max(1))
        .zip(codes.par_chunks_mut(k.max(1)))
        .map(|(row, out)| {
            row.chunks(block)
                .zip(out.chunks_mut(block))
                .map(|(x, o)| {
                    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                    if amax == 0.0 {
                        block_codes(table, &near, x, 1.0, o);
                        return 1.0;
                    }
                    let mut best = (block_codes(table, &near, x, amax, o), amax);
                    if clip_search {
                        let mut trial = vec![0u8; x.len()];
                        for i in 1..=25 {
                            let s = amax * (1.0 - 0.02 * i as f32);
                            let e = block_codes(table, &near, x, s, &mut trial);
                            if e < best.0 {
                                best = (e, s);
                                o.copy_from_slice(&trial);
                            }
                        }
                    }
                    best.1
                })
                .collect()
        })
        .collect();
    Ok(TableQuantized {
        format,
        channels,
        k,
        block,
        codes,
        scales: per_row.into_iter().flatten().collect(),
    })
}

impl TableQuantized {
    pub fn dequantize_with(&self, scales: &[f32]) -> Vec<f32> {
        let table = self.format.table();
        let blocks = self.k.div_ceil(self.block);
        let mut out = Vec::with_capacity(self.codes.len());
        for r in 0..self.channels {
            for c in 0..self.k {
                let s = scales[r * blocks + c / self.block];
                out.push(table[self.codes[r * self.k + c] as usize] * s);
            }
        }
        out
    }

    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_with(&self.scales)
    }

    /// Re-picks every code against new block scales (e.g. after double quantization of the scales).
    pub fn requantize_with(&mut self, w: &[f32], scales: Vec<f32>) {
        let table = self.format.table();
        let near = Nearest::new(table);
        let blocks = self.k.div_ceil(self.block);
        for r in 0..self.channels {
            let row = r * self.k..(r + 1) * self.k;
            for (b, (x, o)) in w[row.clone()]
                .chunks(self.block)
                .zip(self.codes[row].chunks_mut(self.block))
                .enumerate()
            {
                block_codes(table, &near, x, scales[r * blocks + b], o);
            }
        }
        self.scales = scales;
    }
}

/// Scales quantized to 8 bits in groups: each group keeps its minimum and step as floats, and every
/// scale becomes `min + q·step` with q ∈ 0..=255 — never below the group's smallest scale, so a scale
/// can not change sign.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuantized {
    pub group: usize,
    pub codes: Vec<u8>,
    pub mins: Vec<f32>,
    pub steps: Vec<f32>,
}

pub fn double_quantize(scales: &[f32], group: usize) -> DoubleQuantized {
    let group = group.max(1);
    let (mut codes, mut mins, mut steps) = (Vec::new(), Vec::new(), Vec::new());
    for g in scales.chunks(group) {
        let lo = g.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let step = if hi > lo { (hi - lo) / 255.0 } else { 0.0 };
        codes.extend(g.iter().map(|&s| {
            if step > 0.0 {
                ((s - lo) / step).round().clamp(0.0, 255.0) as u8
            } else {
                0
            }
        }));
        mins.push(lo);
        steps.push(step);
    }
    DoubleQuantized {
        group,
        codes,
        mins,
        steps,
    }
}

impl DoubleQuantized {
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| self.mins[i / self.group] + q as f32 * self.steps[i / self.group])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::int::sqnr_db;

    /// The NF4 levels as published with bitsandbytes and the QLoRA paper (float32).
    #[allow(clippy::excessive_precision)]
    const PUBLISHED_NF4: [f32; 16] = [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ];

    #[test]
    fn nf4_matches_the_published_levels() {
        for (a, b) in nf4_table().iter().zip(PUBLISHED_NF4) {
            assert!((a - b).abs() < 2e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn normal_ppf_closed_forms() {
        assert!(normal_ppf(0.5).abs() < 1e-12);
        assert!((normal_ppf(0.975) - 1.959963984540054).abs() < 1e-8);
        assert!((normal_ppf(0.001) + 3.090232306167813).abs() < 1e-8);
    }

    #[test]
    fn fp4_codes_are_e2m1_bit_patterns() {
        let t = fp4_table();
        let want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for (code, w) in want.iter().enumerate() {
            assert_eq!(t[code] * 6.0, *w);
            assert_eq!(t[code | 8] * 6.0, -*w);
        }
    }

    #[test]
    fn blockwise_absmax_scaling() {
        let w: Vec<f32> = (0..128)
            .map(|i| ((i * 53 % 128) as f32 - 64.0) / 16.0)
            .collect();
        for format in [TableFormat::Nf4, TableFormat::Fp4] {
            let q = quantize(&w, 2, 64, 32, format, false).unwrap();
            assert_eq!(q.scales.len(), 4);
            // Each block's largest magnitude is represented exactly (±1 · absmax).
            for (b, chunk) in w.chunks(32).enumerate() {
                let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(q.scales[b], amax);
            }
            let sqnr = sqnr_db(&w, &q.dequantize());
            assert!(sqnr > 12.0, "{format:?}: {sqnr} dB");
            assert!(
                q.dequantize()
                    .iter()
                    .zip(&w)
                    .all(|(d, x)| *x != 0.0 || *d == 0.0),
                "0 stays 0"
            );
        }
    }

    #[test]
    fn nf4_beats_fp4_on_normal_weights() {
        // Normal-looking weights (sum of uniforms), NF4's design case.
        let mut s = 1u64;
        let mut u = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        let w: Vec<f32> = (0..4096)
            .map(|_| (0..6).map(|_| u()).sum::<f32>() - 3.0)
            .collect();
        let nf4 = sqnr_db(
            &w,
            &quantize(&w, 64, 64, 64, TableFormat::Nf4, false)
                .unwrap()
                .dequantize(),
        );
        let fp4 = sqnr_db(
            &w,
            &quantize(&w, 64, 64, 64, TableFormat::Fp4, false)
                .unwrap()
                .dequantize(),
        );
        assert!(nf4 > fp4, "nf4 {nf4} dB, fp4 {fp4} dB");
    }

    #[test]
    fn lookup_is_the_nearest_entry_and_clip_search_never_hurts() {
        let w: Vec<f32> = (0..4096)
            .map(|i| ((i * 2654435761u64 as usize) % 1000) as f32 / 500.0 - 1.0)
            .map(|x| x * x * x)
            .collect();
        for format in [TableFormat::Nf4, TableFormat::Fp4] {
            let table = format.table();
            let plain = quantize(&w, 32, 128, 64, format, false).unwrap();
            for (i, (&x, &c)) in w.iter().zip(&plain.codes).enumerate() {
                let s = plain.scales[i / 64];
                let best = table
                    .iter()
                    .map(|t| (x / s - t).abs())
                    .fold(f32::INFINITY, f32::min);
                assert!(((x / s) - table[c as usize]).abs() <= best + 1e-6);
            }
            let clipped = quantize(&w, 32, 128, 64, format, true).unwrap();
            let (a, b) = (
                sqnr_db(&w, &plain.dequantize()),
                sqnr_db(&w, &clipped.dequantize()),
            );
            assert!(b >= a, "{format:?}: clip search {b} dB < absmax {a} dB");
        }
    }

    #[test]
    fn double_quantization_keeps_scales_close_and_positive() {
        let scales: Vec<f32> = (0..600)
            .map(|i| 0.01 + (i * 7919 % 600) as f32 * 1e-4)
            .collect();
        let dq = double_quantize(&scales, 256);
        assert_eq!(dq.mins.len(), 3);
        let back = dq.dequantize();
        for (a, b) in scales.iter().zip(&back) {
            assert!(*b > 0.0);
            assert!((a - b).abs() <= dq.steps.iter().cloned().fold(0.0, f32::max) / 2.0 + 1e-7);
        }
        assert!(sqnr_db(&scales, &back) > 40.0);
    }
}
