//! `C[M, N] = A[M, K] · W` over a codebook weight without decoding it: the product is taken with the
//! output's rows along the vector lanes, so every weight is a scalar that the FMA broadcasts straight
//! from the codebook (`vfmadd231ps` with an embedded `{1to16}` broadcast). The codebook of a piece is
//! looked up once per column and piece, then serves its `dim` rows of K. Column scales multiply the
//! finished output. A is transposed once per product (`K × M`, a small copy next to the weight).
//!
//! This replaces the panel decode ([`super::Panels`] on [`Codebook`]) on AVX-512 and on AVX2 + FMA
//! (`vbroadcastss` from the codebook, 8 lanes): there the decode, about one gather per weight per
//! product, cost as much as the multiply-adds at a few dozen rows.

use super::formats::Codebook;

/// Columns per tile on AVX-512; 8 × 3 zmm of rows = 24 accumulators.
#[cfg(target_arch = "x86_64")]
const NR: usize = 8;

/// Columns per tile on AVX2; 6 × 2 ymm of rows = 12 of the 16 registers.
#[cfg(target_arch = "x86_64")]
const NR_AVX2: usize = 6;

/// Rows of the output per tile, at most: 3 zmm, or 2 ymm.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 48;

/// Whether [`matmul`] runs on this CPU (else use the panel decode).
pub fn available() -> bool {
    matches!(super::Isa::detect(), super::Isa::Avx512 | super::Isa::Avx2)
}

/// Rows of A above which the panel decode wins: it decodes each weight once per product, this kernel
/// looks each piece up again for every 48 rows (AVX-512) or 16 (AVX2). Measured on AVX2
/// (`cargo bench --bench kernels`, vq2 pieces): 1.7× the panel rate at 1–8 rows, 1.1–1.2× at 20–24,
/// even at 48.
const MAX_ROWS: usize = 96;
const MAX_ROWS_AVX2: usize = 40;

/// `c[M, N] = a[M, K] · W`; `false` (and `c` untouched) when this CPU lacks the kernel or `M` is past
/// the size where it pays.
pub fn matmul(a: &[f32], m: usize, w: &Codebook, c: &mut [f32]) -> bool {
    let max_rows = if super::Isa::detect() == super::Isa::Avx512 {
        MAX_ROWS
    } else {
        MAX_ROWS_AVX2
    };
    if !available() || m > max_rows {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (k, n) = (w.k, w.n);
        assert_eq!(a.len(), m * k, "A holds {} values, not {m}×{k}", a.len());
        assert_eq!(c.len(), m * n, "C holds {} values, not {m}×{n}", c.len());
        // The shapes only: each code is bounds-checked where it is looked up.
        assert!(
            w.dim > 0
                && w.k_padded.is_multiple_of(w.dim)
                && w.k <= w.k_padded
                && w.subspaces > 0
                && (w.k_padded / w.dim).is_multiple_of(w.subspaces)
                && w.scales.len() == n
                && w.stages
                    .iter()
                    .all(|(c, _)| c.len() == n * (w.k_padded / w.dim)),
            "codebook weight of inconsistent shapes"
        );
        if m == 0 || n == 0 {
            return true;
        }
        if k == 0 {
            c.fill(0.0);
            return true;
        }
        let wide = super::Isa::detect() == super::Isa::Avx512;
        // Lanes per vector, columns per tile, vectors of rows per tile.
        let (lanes, nr, vmax) = if wide { (16, NR, 3) } else { (8, NR_AVX2, 2) };
        // Aᵀ, rows padded to K padded (zeros meet the padding pieces) and columns to a whole vector.
        let mp = m.div_ceil(lanes) * lanes;
        let mut at = vec![0f32; w.k_padded * mp];
        for (i, row) in a.chunks_exact(k).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                at[r * mp + i] = v;
            }
        }
        let zero_row = vec![0f32; w.dim];
        let mut tile = [0f32; NR * TILE_ROWS];
        for j0 in (0..n).step_by(nr) {
            let nw = nr.min(n - j0);
            for m0 in (0..mp).step_by(lanes * vmax) {
                let vecs = ((mp - m0) / lanes).min(vmax);
                // SAFETY: avx512f (wide) or avx2 and fma were checked by `available`; Aᵀ holds
                // k_padded × mp values and m0 + lanes·vecs ≤ mp.
                unsafe {
                    match (wide, vecs) {
                        (true, 3) => x86::tile::<3>(w, &at, mp, m0, j0, nw, &zero_row, &mut tile),
                        (true, 2) => x86::tile::<2>(w, &at, mp, m0, j0, nw, &zero_row, &mut tile),
                        (true, _) => x86::tile::<1>(w, &at, mp, m0, j0, nw, &zero_row, &mut tile),
                        (false, 2) => {
                            x86::tile_avx2::<2>(w, &at, mp, m0, j0, nw, &zero_row, &mut tile)
                        }
                        (false, _) => {
                            x86::tile_avx2::<1>(w, &at, mp, m0, j0, nw, &zero_row, &mut tile)
                        }
                    }
                }
                let scales = &w.scales[j0..j0 + nw];
                for i in 0..(lanes * vecs).min(m - m0) {
                    let out = &mut c[(m0 + i) * n + j0..][..nw];
                    for (j, (o, s)) in out.iter_mut().zip(scales).enumerate() {
                        *o = tile[j * TILE_ROWS + i] * s;
                    }
                }
            }
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, m, w, c);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Codebook, NR, NR_AVX2, TILE_ROWS};
    use std::arch::x86_64::*;

    /// One codebook tile: `tile[j * TILE_ROWS + i] = Σ_r Aᵀ[r, m0 + i] · W[r, j0 + j]` (unscaled) for
    /// `i < LANES·V`, `j < nw`, `COLS` columns of accumulators, each weight broadcast from its codebook.
    macro_rules! codebook_tile {
        ($(#[$doc:meta])* $name:ident, $feature:literal, $cols:ident, $lanes:literal, $vec:ty,
         $setzero:ident, $loadu:ident, $set1:ident, $fmadd:ident, $storeu:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $name<const V: usize>(
                w: &Codebook,
                at: &[f32],
                mp: usize,
                m0: usize,
                j0: usize,
                nw: usize,
                zero_row: &[f32],
                tile: &mut [f32; NR * TILE_ROWS],
            ) {
                let dim = w.dim;
                let pieces = w.k_padded / dim;
                let pps = pieces / w.subspaces;
                let mut acc: [[$vec; V]; $cols] = [[$setzero(); V]; $cols];
                let mut rows = [zero_row.as_ptr(); $cols];
                for p in 0..pieces {
                    let offset = if w.size > 0 { (p / pps) * w.size } else { 0 };
                    for (codes, book) in &w.stages {
                        for (j, row) in rows.iter_mut().enumerate().take(nw) {
                            let code = codes.get(p * w.n + j0 + j) + offset;
                            // A checked slice: a code past its codebook panics rather than reads
                            // out of it.
                            *row = book[code * dim..][..dim].as_ptr();
                        }
                        for d in 0..dim {
                            let r = p * dim + d;
                            let mut x: [$vec; V] = [$setzero(); V];
                            for (v, x) in x.iter_mut().enumerate() {
                                // SAFETY: r < k_padded and m0 + LANES·(v + 1) ≤ mp, so the values
                                // are in `at`.
                                *x = unsafe { $loadu(at.as_ptr().add(r * mp + m0 + $lanes * v)) };
                            }
                            for j in 0..$cols {
                                // SAFETY: rows[j] points at `dim` values of a codebook (or of
                                // zero_row).
                                let b = $set1(unsafe { *rows[j].add(d) });
                                for v in 0..V {
                                    acc[j][v] = $fmadd(x[v], b, acc[j][v]);
                                }
                            }
                        }
                    }
                }
                for (j, acc) in acc.iter().enumerate() {
                    for (v, acc) in acc.iter().enumerate() {
                        // SAFETY: j * TILE_ROWS + LANES·(v + 1) ≤ NR * TILE_ROWS.
                        unsafe { $storeu(tile.as_mut_ptr().add(j * TILE_ROWS + $lanes * v), *acc) };
                    }
                }
            }
        };
    }

    codebook_tile!(
        /// AVX-512: 8 columns × `V` ≤ 3 zmm of rows.
        ///
        /// # Safety
        /// The CPU must have AVX-512F; `at` must hold `k_padded × mp` values, `m0 + 16·V ≤ mp`,
        /// `zero_row` `dim` values.
        tile, "avx512f", NR, 16, __m512,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps
    );

    codebook_tile!(
        /// AVX2 + FMA: 6 columns × `V` ≤ 2 ymm of rows.
        ///
        /// # Safety
        /// The CPU must have AVX2 and FMA; `at` must hold `k_padded × mp` values, `m0 + 8·V ≤ mp`,
        /// `zero_row` `dim` values.
        tile_avx2, "avx2,fma", NR_AVX2, 8, __m256,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps
    );
}

#[cfg(test)]
mod tests {
    use super::super::formats::{CodeSlice, Codebook};
    use super::super::tests::uniform;
    use super::super::{Panels, reference};
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{Rng, SeedableRng};

    /// Multi-stage, subspace, padded and ragged codebook weights, against the f64 reference over the
    /// decoded weight, through both the broadcast kernel (where the CPU has it) and the panel decode.
    #[test]
    fn codebook_products_match_the_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for &(m, k, n, dim, subspaces, stages) in &[
            (1usize, 8usize, 3usize, 4usize, 1usize, 1usize),
            (5, 30, 17, 4, 2, 1),
            (17, 64, 9, 8, 1, 2),
            (30, 40, 14, 4, 1, 1),
            (48, 128, 40, 4, 4, 1),
            (50, 66, 33, 2, 3, 2),
            (9, 64, 48, 4, 1, 2),
            (48, 256, 32, 4, 2, 1),
        ] {
            let k_padded = k.div_ceil(dim * subspaces) * dim * subspaces;
            let pieces = k_padded / dim;
            let size = 16;
            let codes: Vec<Vec<u8>> = (0..stages)
                .map(|_| {
                    (0..n * pieces)
                        .map(|_| (rng.next_u32() % 16) as u8)
                        .collect()
                })
                .collect();
            let books: Vec<Vec<f32>> = (0..stages)
                .map(|_| uniform(&mut rng, size * subspaces * dim))
                .collect();
            let scales: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 * 0.01).collect();
            let w = Codebook {
                stages: codes
                    .iter()
                    .zip(&books)
                    .map(|(c, b)| (CodeSlice::U8(c), &b[..]))
                    .collect(),
                scales: &scales,
                k,
                n,
                k_padded,
                dim,
                subspaces,
                size,
            };
            w.check().unwrap();
            // The decode itself, against the codebook rows written out one weight at a time (the
            // panel paths differ with the panel's width: whole runs of 4-value pieces are
            // transposed in registers).
            let mut full = vec![0f32; k * n];
            w.decode(0, k, 0, n, &mut full);
            let pps = pieces / subspaces;
            for kk in 0..k {
                for j in 0..n {
                    let (p, d) = (kk / dim, kk % dim);
                    let mut v = 0f32;
                    for (c, b) in codes.iter().zip(&books) {
                        v += b[(c[p * n + j] as usize + (p / pps) * size) * dim + d];
                    }
                    assert_eq!(full[kk * n + j], v * scales[j], "W[{kk}, {j}]");
                }
            }
            let a = uniform(&mut rng, m * k);
            let want = reference(&a, m, &w);
            let tol = 1e-5 * (k * stages) as f32;
            let mut c = vec![f32::NAN; m * n];
            // Taken where the CPU has the kernel and M is within its limit.
            let limit = if super::super::Isa::detect() == super::super::Isa::Avx512 {
                MAX_ROWS
            } else {
                MAX_ROWS_AVX2
            };
            assert_eq!(matmul(&a, m, &w, &mut c), available() && m <= limit);
            if available() && m <= limit {
                for (i, (g, e)) in c.iter().zip(&want).enumerate() {
                    assert!((g - e).abs() <= tol, "broadcast kernel at {i}: {g} vs {e}");
                }
            }
            for isa in super::super::Isa::available() {
                let mut c = vec![f32::NAN; m * n];
                super::super::matmul_with(isa, &a, m, &w, &mut c);
                for (i, (g, e)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= tol,
                        "{} panels at {i}: {g} vs {e}",
                        isa.name()
                    );
                }
            }
            assert_eq!(w.k(), k);
        }
    }
}
