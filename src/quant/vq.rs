//! Vector quantization of a weight matrix: k-means codebooks over short pieces of its rows, with
//! product (subspace) and residual (stage) variants, importance weighting and an exact outlier store.
//!
//! The matrix is row-major `[channels, k]` (one row per output channel, k along the reduction axis).
//!
//! 1. Outliers chosen by the scheme's rule are taken out first and kept exactly.
//! 2. Every row is divided by its RMS (the per-channel scale vector).
//! 3. The row is cut into pieces of `dim` consecutive values (padded with zeros that count for
//!    nothing to a multiple of `dim · subspaces`). Piece p of a row belongs to subspace
//!    `p / (pieces per subspace)`; each subspace has its own codebook (product VQ).
//! 4. Stage 1 clusters the pieces; each further stage clusters what the stages before left
//!    (residual VQ). Codes are u8 for codebooks of ≤ 256 entries, else u16.
//!
//! Given the energy E[x²] of each input channel from calibration data (`importance: calibration`),
//! each coordinate of a piece is weighted by the energy of the column it sits in, in the distance and
//! the centroid update. In the normalised rows that is the expected error of each output channel
//! relative to its scale: `E[(δ_r·x)²] / scale_r² = Σ_j δ̂_rj² E[x_j²]` for uncorrelated inputs (a
//! diagonal Fisher/Hessian proxy), every output channel counting alike. Weighting rows by scale² as
//! well (the absolute output error) measured worse on the zoo's rxnmap and magika (cosine 0.916 vs
//! 0.932 and 0.967 vs 0.966 for vq2), so rows are not weighted. Without data, and with
//! `importance: none`, the normalised pieces are clustered unweighted.
//!
//! Decoding: `w[r, j] = scale[r] · Σ_stages codebook[stage][subspace(j)][code[stage][r, j / dim]][j % dim]`,
//! then `w[i] = v` for every kept outlier (i, v).

use serde::Serialize;

use super::kmeans::{self, Options};
use super::sparse::{self, OutlierRule};

/// How the clustering weighs the coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    /// Unweighted clustering of the normalised pieces.
    None,
    /// Weight error, weighted by the input channels' energy when calibration data gives it.
    Calibration,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct VqScheme {
    /// Values per piece (1…16).
    pub dim: usize,
    /// Entries per codebook (16…65536).
    pub codebook_size: usize,
    /// Residual stages (1…8).
    pub stages: usize,
    /// Product subspaces along k (≥ 1).
    pub subspaces: usize,
    pub importance: Importance,
    /// Most Lloyd iterations per codebook.
    pub iterations: usize,
    pub seed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outliers: Option<OutlierRule>,
}

impl Default for VqScheme {
    fn default() -> Self {
        VqScheme {
            dim: 4,
            codebook_size: 256,
            stages: 1,
            subspaces: 1,
            importance: Importance::Calibration,
            iterations: 20,
            seed: 0,
            outliers: None,
        }
    }
}

impl VqScheme {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=16).contains(&self.dim) {
            return Err(format!("dim must be in 1..=16, got {}", self.dim));
        }
        if !(16..=65536).contains(&self.codebook_size) {
            return Err(format!(
                "codebook_size must be in 16..=65536, got {}",
                self.codebook_size
            ));
        }
        if !(1..=8).contains(&self.stages) {
            return Err(format!("stages must be in 1..=8, got {}", self.stages));
        }
        if self.subspaces == 0 {
            return Err("subspaces must be ≥ 1".into());
        }
        if self.iterations == 0 {
            return Err("iterations must be ≥ 1".into());
        }
        self.outliers.map_or(Ok(()), |o| o.validate())
    }

    /// Bits of code per weight, codebooks and scales aside.
    pub fn code_bits_per_weight(&self) -> f64 {
        self.stages as f64 * (self.codebook_size as f64).log2() / self.dim as f64
    }

    pub fn label(&self) -> String {
        let mut s = format!("vq d{} k{}", self.dim, self.codebook_size);
        if self.stages > 1 {
            s += &format!(" ×{} stages", self.stages);
        }
        if self.subspaces > 1 {
            s += &format!(" {} subspaces", self.subspaces);
        }
        if self.importance == Importance::None {
            s += " unweighted";
        }
        match self.outliers {
            Some(OutlierRule::TopFraction(f)) => s += &format!(" outliers {f}"),
            Some(OutlierRule::StdThreshold(t)) => s += &format!(" outliers {t}σ"),
            None => {}
        }
        s
    }
}

/// Usage of one codebook.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CodebookStats {
    pub stage: usize,
    pub subspace: usize,
    /// Codes chosen by at least one piece.
    pub active: usize,
    /// Entropy of the code distribution, bits (log2 of the size at best).
    pub entropy_bits: f64,
    /// Codes re-seeded during clustering.
    pub revived: usize,
    pub iterations: usize,
}

/// A matrix in codebooks: see the module docs for how it decodes.
#[derive(Clone, Debug, PartialEq)]
pub struct VqEncoded {
    pub channels: usize,
    pub k: usize,
    /// k padded to a multiple of `dim · subspaces`.
    pub k_padded: usize,
    pub dim: usize,
    pub codebook_size: usize,
    pub stages: usize,
    pub subspaces: usize,
    /// Per stage, `[channels, pieces]` codes (pieces = k_padded / dim), subspace-local.
    pub codes: Vec<Vec<u16>>,
    /// Per stage, `[subspaces, codebook_size, dim]`.
    pub codebooks: Vec<Vec<f32>>,
    /// One per channel.
    pub scales: Vec<f32>,
    /// (flat index into `[channels, k]`, exact value), ascending.
    pub outliers: Vec<(usize, f32)>,
    pub stats: Vec<CodebookStats>,
    /// Whether calibration importance weighted the clustering.
    pub weighted_by_data: bool,
    pub sqnr_db: f64,
}

impl VqEncoded {
    pub fn pieces(&self) -> usize {
        self.k_padded / self.dim
    }

    pub fn pieces_per_subspace(&self) -> usize {
        self.pieces() / self.subspaces
    }

    /// Bytes per code: 1 for codebooks of ≤ 256 entries, else 2.
    pub fn code_bytes(&self) -> usize {
        if self.codebook_size <= 256 { 1 } else { 2 }
    }

    /// The decoded `[channels, k]` matrix.
    pub fn decode(&self) -> Vec<f32> {
        let (pieces, pps, d) = (self.pieces(), self.pieces_per_subspace(), self.dim);
        let mut out = vec![0f32; self.channels * self.k];
        let mut row = vec![0f32; self.k_padded];
        for r in 0..self.channels {
            row.iter_mut().for_each(|v| *v = 0.0);
            for (codes, book) in self.codes.iter().zip(&self.codebooks) {
                for p in 0..pieces {
                    let code = codes[r * pieces + p] as usize;
                    let entry = ((p / pps) * self.codebook_size + code) * d;
                    for j in 0..d {
                        row[p * d + j] += book[entry + j];
                    }
                }
            }
            for j in 0..self.k {
                out[r * self.k + j] = self.scales[r] * row[j];
            }
        }
        // The dense part under an outlier is whatever its piece decodes to: overwrite it.
        for &(i, v) in &self.outliers {
            out[i] = v;
        }
        out
    }

    /// Bytes of the stored form: codes, codebooks and scales (f32), outliers (i64 index + f32 value).
    pub fn bytes(&self) -> u64 {
        let codes: usize = self.codes.iter().map(|c| c.len() * self.code_bytes()).sum();
        let books: usize = self.codebooks.iter().map(|b| 4 * b.len()).sum();
        (codes + books + 4 * self.scales.len()) as u64 + 12 * self.outliers.len() as u64
    }

    pub fn bits_per_weight(&self) -> f64 {
        self.bytes() as f64 * 8.0 / (self.channels * self.k).max(1) as f64
    }
}

/// Codes used at least once, and the entropy of their distribution in bits, from per-code counts.
pub(crate) fn usage_figures(usage: &[u64]) -> (usize, f64) {
    let n: u64 = usage.iter().sum();
    let entropy = usage
        .iter()
        .filter(|&&u| u > 0)
        .map(|&u| {
            let q = u as f64 / n as f64;
            -q * q.log2()
        })
        .sum();
    (usage.iter().filter(|&&u| u > 0).count(), entropy)
}

/// Encodes a row-major `[channels, k]` matrix. `importance`, when given, has one non-negative
/// value per column (the energy of the input channel each column multiplies).
pub fn encode(
    w: &[f32],
    channels: usize,
    k: usize,
    scheme: &VqScheme,
    importance: Option<&[f32]>,
) -> Result<VqEncoded, String> {
    scheme.validate()?;
    if w.len() != channels * k || w.is_empty() {
        return Err(format!("{} values for a [{channels}, {k}] matrix", w.len()));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(format!("value {i} is not finite ({})", w[i]));
    }
    if let Some(imp) = importance {
        if imp.len() != k {
            return Err(format!("{} importance values for k = {k}", imp.len()));
        }
        if imp.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err("importance values must be finite and ≥ 0".into());
        }
    }
    let (d, m, size) = (scheme.dim, scheme.subspaces, scheme.codebook_size);
    if m > k.div_ceil(d) {
        return Err(format!(
            "{m} subspaces for rows of {} pieces of {d}: at most one subspace per piece",
            k.div_ceil(d)
        ));
    }
    let split = scheme
        .outliers
        .map(|rule| sparse::split_outliers(w, channels, k, rule));
    let dense: &[f32] = split.as_ref().map_or(w, |s| &s.dense);
    let outliers = split
        .as_ref()
        .map(|s| s.outliers.clone())
        .unwrap_or_default();

    // Per-column importance normalised to mean 1 (all ones without data).
    let weighted_by_data = scheme.importance == Importance::Calibration && importance.is_some();
    let column: Vec<f32> = match importance.filter(|_| weighted_by_data) {
        Some(imp) => {
            let mean = imp.iter().map(|&v| v as f64).sum::<f64>() / k as f64;
            if mean > 0.0 {
                // A floor keeps dead input channels from being ignored entirely.
                imp.iter()
                    .map(|&v| ((v as f64 / mean) as f32).max(1e-3))
                    .collect()
            } else {
                vec![1.0; k]
            }
        }
        None => vec![1.0; k],
    };
    let mut is_outlier = vec![false; w.len()];
    for &(i, _) in &outliers {
        is_outlier[i] = true;
    }
    let scales: Vec<f32> = (0..channels)
        .map(|r| {
            let row = &dense[r * k..(r + 1) * k];
            let n = (0..k).filter(|&j| !is_outlier[r * k + j]).count().max(1);
            let rms = (row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64).sqrt();
            if rms > 0.0 { rms as f32 } else { 1.0 }
        })
        .collect();
    let k_padded = k.div_ceil(d * m) * d * m;
    let pieces = k_padded / d;
    let pps = pieces / m;
    // Points of subspace s: every row's pieces s·pps .. (s+1)·pps, row by row.
    let unweighted = !weighted_by_data;
    let mut residual: Vec<Vec<f32>> = Vec::with_capacity(m);
    let mut weights: Vec<Option<Vec<f32>>> = Vec::with_capacity(m);
    for s in 0..m {
        let mut pts = Vec::with_capacity(channels * pps * d);
        let mut wts = Vec::with_capacity(channels * pps * d);
        let mut any_zero = false;
        for r in 0..channels {
            for p in s * pps..(s + 1) * pps {
                for j in p * d..(p + 1) * d {
                    let real = j < k && !is_outlier[r * k + j];
                    pts.push(if j < k {
                        dense[r * k + j] / scales[r]
                    } else {
                        0.0
                    });
                    let wv = if !real {
                        0.0
                    } else if unweighted {
                        1.0
                    } else {
                        column[j]
                    };
                    any_zero |= wv == 0.0;
                    wts.push(wv);
                }
            }
        }
        residual.push(pts);
        // Uniform weights use the faster kernel unless padding or outliers must not count.
        weights.push((weighted_by_data || any_zero).then_some(wts));
    }
    let mut codes = vec![vec![0u16; channels * pieces]; scheme.stages];
    let mut codebooks = vec![vec![0f32; m * size * d]; scheme.stages];
    let mut stats = Vec::new();
    for stage in 0..scheme.stages {
        for s in 0..m {
            let opts = Options {
                k: size,
                iterations: scheme.iterations,
                seed: scheme
                    .seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add((stage * 4099 + s) as u64),
                ..Default::default()
            };
            let pts = &mut residual[s];
            let km = kmeans::kmeans(pts, d, weights[s].as_deref(), &opts);
            codebooks[stage][s * size * d..(s + 1) * size * d].copy_from_slice(&km.centroids);
            for (i, &a) in km.assign.iter().enumerate() {
                let (r, p) = (i / pps, s * pps + i % pps);
                codes[stage][r * pieces + p] = a as u16;
                let c = km.centroid(a as usize);
                for j in 0..d {
                    pts[i * d + j] -= c[j];
                }
            }
            let (active, entropy_bits) = usage_figures(&km.usage());
            stats.push(CodebookStats {
                stage,
                subspace: s,
                active,
                entropy_bits,
                revived: km.revived,
                iterations: km.iterations,
            });
        }
    }
    let mut e = VqEncoded {
        channels,
        k,
        k_padded,
        dim: d,
        codebook_size: size,
        stages: scheme.stages,
        subspaces: m,
        codes,
        codebooks,
        scales,
        outliers,
        stats,
        weighted_by_data,
        sqnr_db: 0.0,
    };
    e.sqnr_db = super::int::sqnr_db(w, &e.decode());
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::int::{Granularity, IntScheme, quantize, sqnr_db};

    use crate::util::gaussian;

    /// Rows of different magnitudes, as real layers have.
    fn matrix(channels: usize, k: usize) -> Vec<f32> {
        let g = gaussian(channels * k, 3);
        g.chunks(k)
            .enumerate()
            .flat_map(|(r, row)| {
                let s = 0.02 * (1.0 + (r % 7) as f32);
                row.iter().map(move |v| v * s).collect::<Vec<f32>>()
            })
            .collect()
    }

    #[test]
    fn decode_matches_the_codes_and_bits_add_up() {
        let (c, k) = (64, 100);
        let w = matrix(c, k);
        for (dim, stages, subspaces) in [(4, 1, 1), (8, 2, 1), (4, 1, 4), (3, 2, 2)] {
            let s = VqScheme {
                dim,
                stages,
                subspaces,
                codebook_size: 16,
                ..Default::default()
            };
            let e = encode(&w, c, k, &s, None).unwrap();
            assert_eq!(e.k_padded % (dim * subspaces), 0);
            assert_eq!(e.codes.len(), stages);
            assert!(e.sqnr_db > 3.0, "{} {}", s.label(), e.sqnr_db);
            let codes: usize = stages * c * e.pieces();
            let bytes = codes + stages * subspaces * 16 * dim * 4 + 4 * c;
            assert_eq!(e.bytes(), bytes as u64);
            // Deterministic.
            assert_eq!(e, encode(&w, c, k, &s, None).unwrap());
        }
    }

    #[test]
    fn residual_stages_and_bigger_codebooks_cut_the_error() {
        let (c, k) = (128, 256);
        let w = matrix(c, k);
        let db = |s: VqScheme| encode(&w, c, k, &s, None).unwrap().sqnr_db;
        let one = db(VqScheme {
            dim: 4,
            codebook_size: 16,
            ..Default::default()
        });
        let two = db(VqScheme {
            dim: 4,
            codebook_size: 16,
            stages: 2,
            ..Default::default()
        });
        let big = db(VqScheme {
            dim: 4,
            codebook_size: 256,
            ..Default::default()
        });
        assert!(two > one + 3.0, "{one} → {two}");
        assert!(big > one + 3.0, "{one} → {big}");
    }

    #[test]
    fn vq_beats_scalar_blocks_at_two_bits() {
        // 2 bits per weight of codes: d4 × 256 codes, against int2 in blocks of 64 (2.5 bits with f32
        // scales). On Gaussian rows VQ gains from the shape of the cells, not only the rate.
        let (c, k) = (256, 512);
        let w = matrix(c, k);
        let v = encode(&w, c, k, &VqScheme::default(), None).unwrap();
        let q = quantize(
            &w,
            c,
            k,
            &IntScheme {
                bits: 2,
                symmetric: true,
                granularity: Granularity::Block(64),
                clip_search: true,
            },
        )
        .unwrap();
        let scalar = sqnr_db(&w, &q.dequantize());
        assert!(v.bits_per_weight() < 2.5, "{}", v.bits_per_weight());
        assert!(
            v.sqnr_db > scalar + 1.5,
            "vq {} vs int2 {scalar}",
            v.sqnr_db
        );
    }

    #[test]
    fn importance_protects_the_columns_that_matter() {
        let (c, k) = (64, 128);
        let w = matrix(c, k);
        // Input channel 0..16 carry 100× the energy of the rest.
        let imp: Vec<f32> = (0..k).map(|j| if j < 16 { 100.0 } else { 1.0 }).collect();
        let s = VqScheme {
            codebook_size: 16,
            ..Default::default()
        };
        let plain = encode(&w, c, k, &s, None).unwrap();
        let weighted = encode(&w, c, k, &s, Some(&imp)).unwrap();
        assert!(weighted.weighted_by_data && !plain.weighted_by_data);
        // The objective: each output channel's error relative to its scale, columns by energy.
        let err = |e: &VqEncoded| {
            let d = e.decode();
            let mut out = 0f64;
            for r in 0..c {
                let s = e.scales[r] as f64;
                for j in 0..k {
                    out += imp[j] as f64 * ((w[r * k + j] - d[r * k + j]) as f64 / s).powi(2);
                }
            }
            out
        };
        assert!(
            err(&weighted) < 0.95 * err(&plain),
            "{} vs {}",
            err(&weighted),
            err(&plain)
        );
    }

    #[test]
    fn outliers_are_kept_exactly() {
        let (c, k) = (32, 64);
        let mut w = matrix(c, k);
        w[77] = 5.0;
        let s = VqScheme {
            codebook_size: 16,
            outliers: Some(OutlierRule::StdThreshold(6.0)),
            ..Default::default()
        };
        let e = encode(&w, c, k, &s, None).unwrap();
        assert_eq!(e.outliers, vec![(77, 5.0)]);
        assert_eq!(e.decode()[77], 5.0);
        let plain = encode(
            &w,
            c,
            k,
            &VqScheme {
                outliers: None,
                ..s
            },
            None,
        )
        .unwrap();
        // The rest of the outlier's row is no longer scaled by the outlier.
        let rest = |d: Vec<f32>| {
            let (a, b): (Vec<f32>, Vec<f32>) =
                (64..128).filter(|&i| i != 77).map(|i| (w[i], d[i])).unzip();
            sqnr_db(&a, &b)
        };
        let (a, b) = (rest(plain.decode()), rest(e.decode()));
        assert!(b > a + 3.0, "{a} → {b} dB");
    }

    #[test]
    fn bad_schemes_say_why() {
        let s = VqScheme {
            dim: 17,
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().contains("dim"));
        let s = VqScheme {
            codebook_size: 8,
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().contains("codebook_size"));
        let w = vec![f32::NAN; 16];
        assert!(
            encode(&w, 4, 4, &VqScheme::default(), None)
                .unwrap_err()
                .contains("finite")
        );
        let many = VqScheme {
            subspaces: 100,
            ..Default::default()
        };
        let e = encode(&matrix(4, 16), 4, 16, &many, None).unwrap_err();
        assert!(e.contains("100 subspaces"), "{e}");
    }
}
