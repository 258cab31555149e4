//! `C[M, N] = A[M, K] · W` over a codebook weight by lookup-table accumulation: no weight is decoded
//! and no product is taken per weight.
//!
//! For a block of 8 rows of A and one piece `p` of K (`dim` values), every entry `e` of the piece's
//! codebook gives the 8 partial sums `T[e] = A[rows, piece p] · book[e]` (a table of `entries × 8`
//! floats, built with `entries × dim` multiply-adds per row). Each output column then adds the table
//! row its code names: `C[rows, n] += T[code(p, n)]`, one 8-lane add per column and piece where the
//! product would take `dim` FMAs. The tables cost as much as `entries` columns of the plain product,
//! so this wins for wide weights (N well past the codebook's 256 entries) and loses for narrow ones.
//! Residual stages are further tables, summed the same way. Column scales multiply the finished
//! output.
//!
//! Tables of a few pieces at a time stay in L1; the column sums of the block (`N × 8` floats) are
//! re-read once per group of pieces. Codes are read along N (the layout [`Codebook`] holds).

use super::formats::{CodeSlice, Codebook};

/// Codebook rows of a piece at most: the table of 8 rows is then ≤ 8 KB.
pub const MAX_ENTRIES: usize = 256;

/// Output columns from which the table product is taken, and from which it is taken for products of
/// at most [`FEW_ROWS`] rows. Measured with `cargo bench --bench kernels` on AVX2 (vq2 pieces, 256
/// entries), against the panel product: 0.55× at 256 columns and 48 rows, 0.9–1.05× at 512–768, 1.1×
/// at 1024, 1.3–1.5× at 3072, 1.6–2.3× at 8210; at 1–8 rows 1.3–1.75× from 512 columns, 2–4× from
/// 1024. With 16-row tables on AVX-512 (an Intel Xeon with AVX-512 VNNI), against the better of the
/// panel and broadcast products: 0.85–0.95× at 48 × 256 × 1024, about even at 48 × 1024 × 1024, 1.7×
/// at 48 × 1024 × 3072 (one run), 1.4–1.8× at 20–24 × 1024 × 8210, 1.2–1.35× at 1–8 rows of 1024
/// columns (these machines are noisy: read these as ranges).
pub const MIN_COLUMNS: usize = 768;
pub const MIN_COLUMNS_FEW_ROWS: usize = 512;
pub const FEW_ROWS: usize = 8;

/// Past [`MANY_ROWS`] rows of A the panel product decodes each weight once for that many rows and runs
/// near the FMA peak, while the tables cost the same per block of rows: at 384 × 256 × 1024 the table
/// product ran at 0.7× the panels (AVX-512). Then only weights of at least [`MIN_COLUMNS_MANY_ROWS`]
/// columns take the tables (at 160 × 1024 × 8210 and 384 × 1024 × 3072 they were 1.3× the panels, on a
/// loaded machine).
pub const MANY_ROWS: usize = 96;
pub const MIN_COLUMNS_MANY_ROWS: usize = 3072;

/// Whether this CPU runs the table product: AVX2 + FMA (8 rows of A per table), or AVX-512F (16 rows
/// per table in zmm, 8 for a last block of at most 8 rows); under the `QUENCH_KERNELS` cap
/// (`QUENCH_KERNELS=avx2` keeps an AVX-512 CPU to the 8-row tables).
pub fn available() -> bool {
    lanes().is_some()
}

/// Rows of A per table on this CPU: 16 with AVX-512F, 8 with AVX2 + FMA, None without either.
fn lanes() -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        match super::Isa::detect() {
            super::Isa::Avx512 if avx2 && std::arch::is_x86_feature_detected!("avx512f") => {
                return Some(16);
            }
            super::Isa::Avx512 | super::Isa::Avx2 if avx2 => return Some(8),
            _ => {}
        }
    }
    None
}

/// Whether the table product takes `w`: every stage's codebook of at most [`MAX_ENTRIES`] rows per
/// subspace, whatever the CPU ([`product`] also needs [`available`]).
pub fn takes(w: &Codebook) -> bool {
    entries(w).is_some_and(|e| e <= MAX_ENTRIES)
}

/// Rows of one subspace's codebook (the same for every stage), if the stages agree.
fn entries(w: &Codebook) -> Option<usize> {
    let dim = w.dim.max(1);
    let mut rows = None;
    for (_, book) in &w.stages {
        let r = if w.size > 0 { w.size } else { book.len() / dim };
        if rows.is_some_and(|x| x != r) {
            return None;
        }
        rows = Some(r);
    }
    rows
}

/// `c[M, N] = a[M, K] · W` where the table product is the fastest kernel (weights of at least
/// [`MIN_COLUMNS`] columns, [`MIN_COLUMNS_FEW_ROWS`] for few rows, [`MIN_COLUMNS_MANY_ROWS`] for many);
/// `false` (and `c` untouched) otherwise.
pub fn matmul(a: &[f32], m: usize, w: &Codebook, c: &mut [f32]) -> bool {
    let wide = if m <= FEW_ROWS {
        MIN_COLUMNS_FEW_ROWS
    } else if m > MANY_ROWS {
        MIN_COLUMNS_MANY_ROWS
    } else {
        MIN_COLUMNS
    };
    w.n >= wide && product(a, m, w, c)
}

/// `c[M, N] = a[M, K] · W` by the table product, whatever N; `false` (and `c` untouched) when the CPU
/// lacks the kernel or `w` is not one [`takes`] accepts.
pub fn product(a: &[f32], m: usize, w: &Codebook, c: &mut [f32]) -> bool {
    let Some(most) = lanes() else {
        return false;
    };
    if !takes(w) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (k, n, dim) = (w.k, w.n, w.dim);
        assert_eq!(a.len(), m * k, "A holds {} values, not {m}×{k}", a.len());
        assert_eq!(c.len(), m * n, "C holds {} values, not {m}×{n}", c.len());
        // The shapes only; each slice below is bounds-checked, each code below.
        assert!(
            dim > 0
                && w.k_padded.is_multiple_of(dim)
                && w.k <= w.k_padded
                && w.subspaces > 0
                && (w.k_padded / dim).is_multiple_of(w.subspaces)
                && w.scales.len() == n,
            "codebook weight of inconsistent shapes"
        );
        let entries = entries(w).unwrap_or(0);
        let pieces = w.k_padded / dim;
        let pps = pieces / w.subspaces;
        // The tables of each (piece, stage): the stage's codebook rows of the piece's subspace, and
        // the piece's codes along N. `check` bounds every code by the stacked book; a code past the
        // subspace's rows would read the next subspace's, so those are checked too.
        let mut lookups = Vec::with_capacity(pieces * w.stages.len());
        for p in 0..pieces {
            let first = if w.size > 0 { (p / pps) * w.size } else { 0 };
            for (codes, book) in &w.stages {
                let book = &book[first * dim..(first + entries) * dim];
                let codes = match codes {
                    CodeSlice::U8(c) => Codes::U8(&c[p * n..(p + 1) * n]),
                    CodeSlice::U16(c) => Codes::U16(&c[p * n..(p + 1) * n]),
                };
                lookups.push((p, book, codes));
            }
        }
        for (_, _, codes) in &lookups {
            let top = match codes {
                Codes::U8(_) if entries >= 256 => 0,
                Codes::U8(c) => c.iter().copied().max().unwrap_or(0) as usize,
                Codes::U16(c) => c.iter().copied().max().unwrap_or(0) as usize,
            };
            assert!(
                top < entries,
                "code {top} past a codebook of {entries} rows"
            );
        }
        // Rows of tables, sums and Aᵀ start on cache lines: a 64-byte row read across two lines
        // costs two loads.
        let mut at = Aligned::new(w.k_padded * most);
        let mut sums = Aligned::new(n * most);
        let mut tables = Aligned::new(GROUP * entries * most);
        let mut m0 = 0;
        while m0 < m {
            // 16-row tables while more than 8 rows are left, else 8-row ones.
            let lanes = if most == 16 && m - m0 > 8 { 16 } else { 8 };
            let rows = (m - m0).min(lanes);
            let at = &mut at.as_mut()[..w.k_padded * lanes];
            // Aᵀ of the block's rows, zeros past K and past M.
            at.fill(0.0);
            for i in 0..rows {
                for (r, &v) in a[(m0 + i) * k..(m0 + i + 1) * k].iter().enumerate() {
                    at[r * lanes + i] = v;
                }
            }
            let sums = &mut sums.as_mut()[..n * lanes];
            let tables = tables.as_mut();
            for (g, group) in lookups.chunks(GROUP).enumerate() {
                for (t, (p, book, _)) in tables.chunks_exact_mut(entries * lanes).zip(group) {
                    let at = &at[p * dim * lanes..(p + 1) * dim * lanes];
                    // SAFETY: `lanes` is 16 only with AVX-512F, else AVX2 and FMA (`lanes()`); `at`
                    // holds the piece's dim × lanes values, `book` entries × dim values and `t`
                    // entries × lanes.
                    unsafe {
                        if lanes == 16 {
                            x86::table16(at, book, dim, t)
                        } else {
                            x86::table8(at, book, dim, t)
                        }
                    };
                }
                // SAFETY: as above; `sums` holds n × lanes values; every code < entries (asserted
                // above), and each of the group's tables holds entries × lanes values.
                unsafe { sum_group(lanes, group, tables, entries, g == 0, sums) };
            }
            for i in 0..rows {
                let out = &mut c[(m0 + i) * n..(m0 + i + 1) * n];
                for (j, (o, s)) in out.iter_mut().zip(w.scales).enumerate() {
                    *o = sums[j * lanes + i] * s;
                }
            }
            m0 += rows;
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, m, w, c, most);
        false
    }
}

/// Tables built and summed together: four of 8 KB (8 rows, 256 entries) stay in L1 beside the streams
/// of codes and sums; four of 16 KB (16 rows) measured faster than two on rxnmap (AVX-512).
const GROUP: usize = 4;

/// `sums (+)= Σ` over the group's pieces of their tables' rows that the codes name (set when
/// `first`): all [`GROUP`] 8-bit code streams in one pass when the group is full, else a pass per
/// piece.
///
/// # Safety
/// As [`x86::add_rows`], for each piece of `group` and its table in `tables`.
#[cfg(target_arch = "x86_64")]
unsafe fn sum_group(
    lanes: usize,
    group: &[(usize, &[f32], Codes)],
    tables: &[f32],
    entries: usize,
    first: bool,
    sums: &mut [f32],
) {
    fn narrow<'a, const Q: usize>(group: &[(usize, &[f32], Codes<'a>)]) -> Option<[&'a [u8]; Q]> {
        if group.len() != Q {
            return None;
        }
        let mut out = [&[][..]; Q];
        for (o, (_, _, c)) in out.iter_mut().zip(group) {
            match c {
                Codes::U8(c) => *o = c,
                Codes::U16(_) => return None,
            }
        }
        Some(out)
    }
    // SAFETY: passed on.
    unsafe {
        if let Some(codes) = narrow::<GROUP>(group) {
            return x86::add_rows(lanes, &codes, tables, entries, first, sums);
        }
        for (i, (_, _, codes)) in group.iter().enumerate() {
            let t = &tables[i * entries * lanes..];
            let first = first && i == 0;
            match codes {
                Codes::U8(c) => x86::add_rows(lanes, &[*c], t, entries, first, sums),
                Codes::U16(c) => x86::add_rows(lanes, &[*c], t, entries, first, sums),
            }
        }
    }
}

/// Zeroed f32s whose first value starts a 64-byte cache line.
struct Aligned {
    buf: Vec<f32>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0f32; len + 16];
        let at = buf.as_ptr().align_offset(64).min(16);
        Aligned { buf, at, len }
    }
    fn as_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

/// One piece's codes along N.
#[derive(Clone, Copy)]
enum Codes<'a> {
    U8(&'a [u8]),
    U16(&'a [u16]),
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The table and summing kernels for one vector width: `$lanes` rows of A per table, in the
    /// vectors `$ty` with the features `$features`, through the intrinsics named after them.
    macro_rules! width {
        (
            $table:ident, $add_rows:ident, $lanes:literal, $features:literal, $ty:ty,
            $load:ident, $store:ident, $set1:ident, $zero:ident, $mul:ident, $fmadd:ident, $add:ident
        ) => {
            #[doc = concat!("`t[e · ", $lanes, " + i] = Σ_d at[d · ", $lanes, " + i] · book[e · dim + d]` for every entry `e` of `book`.")]
            ///
            /// # Safety
            #[doc = concat!("The CPU must have ", $features, "; `at` holds `dim × ", $lanes, "` values, `book` `entries × dim` and `t` `entries × ", $lanes, "`.")]
            #[target_feature(enable = $features)]
            pub unsafe fn $table(at: &[f32], book: &[f32], dim: usize, t: &mut [f32]) {
                let entries = book.len() / dim;
                debug_assert!(at.len() >= dim * $lanes && t.len() >= entries * $lanes);
                // SAFETY: the bounds above.
                unsafe {
                    let x = at.as_ptr();
                    let b = book.as_ptr();
                    let o = t.as_mut_ptr();
                    if dim == 4 {
                        let xs: [$ty; 4] = [0, 1, 2, 3].map(|d| $load(x.add($lanes * d)));
                        for e in 0..entries {
                            let r = b.add(4 * e);
                            let lo = $mul(xs[0], $set1(*r));
                            let lo = $fmadd(xs[1], $set1(*r.add(1)), lo);
                            let hi = $mul(xs[2], $set1(*r.add(2)));
                            let hi = $fmadd(xs[3], $set1(*r.add(3)), hi);
                            $store(o.add($lanes * e), $add(lo, hi));
                        }
                        return;
                    }
                    for e in 0..entries {
                        let r = b.add(dim * e);
                        let mut acc = $zero();
                        for d in 0..dim {
                            acc = $fmadd($load(x.add($lanes * d)), $set1(*r.add(d)), acc);
                        }
                        $store(o.add($lanes * e), acc);
                    }
                }
            }

            #[doc = concat!("[`add_rows`] with ", $lanes, " lanes.")]
            ///
            /// # Safety
            #[doc = concat!("As [`add_rows`]; the CPU must have ", $features, ".")]
            #[target_feature(enable = $features)]
            unsafe fn $add_rows<C: Copy + Into<usize>, const Q: usize>(
                codes: &[&[C]; Q],
                tables: &[f32],
                entries: usize,
                first: bool,
                sums: &mut [f32],
            ) {
                let n = sums.len() / $lanes;
                debug_assert!(
                    tables.len() >= Q * entries * $lanes && codes.iter().all(|c| c.len() >= n)
                );
                let t = tables.as_ptr();
                let s = sums.as_mut_ptr();
                // SAFETY: the bounds above.
                unsafe {
                    for j in 0..n {
                        let mut acc = if first { $zero() } else { $load(s.add($lanes * j)) };
                        for (q, codes) in codes.iter().enumerate() {
                            let code: usize = (*codes.get_unchecked(j)).into();
                            acc = $add(acc, $load(t.add((q * entries + code) * $lanes)));
                        }
                        $store(s.add($lanes * j), acc);
                    }
                }
            }
        };
    }

    width!(
        table8,
        add_rows8,
        8,
        "avx2,fma",
        __m256,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_setzero_ps,
        _mm256_mul_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps
    );
    width!(
        table16,
        add_rows16,
        16,
        "avx512f",
        __m512,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_setzero_ps,
        _mm512_mul_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps
    );

    /// `sums[n · lanes ..][..lanes] (+)= Σ_q tables[q][codes[q][n]]` (set when `first`), the tables
    /// `entries × lanes` values each, one after the other; `lanes` is 8 or 16.
    ///
    /// # Safety
    /// The CPU must have AVX2 (and AVX-512F when `lanes` is 16); every code is below `entries`;
    /// `tables` holds `Q × entries × lanes` values; each `codes[q]` holds `n` codes and `sums`
    /// `n × lanes` values.
    pub unsafe fn add_rows<C: Copy + Into<usize>, const Q: usize>(
        lanes: usize,
        codes: &[&[C]; Q],
        tables: &[f32],
        entries: usize,
        first: bool,
        sums: &mut [f32],
    ) {
        debug_assert!(tables.len() >= Q * entries * lanes);
        // SAFETY: passed on.
        unsafe {
            if lanes == 16 {
                add_rows16(codes, tables, entries, first, sums)
            } else {
                add_rows8(codes, tables, entries, first, sums)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::formats::{CodeSlice, Codebook};
    use super::super::reference;
    use super::super::tests::uniform;
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{Rng, SeedableRng};

    /// Ragged rows, padded K, subspaces, residual stages, 8- and 16-bit codes and books of 16 to 256
    /// rows, against the f64 product over the decoded weight.
    #[test]
    fn table_products_match_the_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for &(m, k, n, dim, subspaces, stages, size, wide) in &[
            (
                1usize, 8usize, 3usize, 4usize, 1usize, 1usize, 256usize, false,
            ),
            (5, 30, 17, 4, 2, 1, 16, false),
            (9, 64, 40, 8, 1, 3, 256, false),
            (17, 66, 33, 2, 3, 2, 64, true),
            (48, 256, 800, 4, 1, 1, 256, false),
            (13, 100, 70, 4, 5, 1, 256, true),
            (8, 16, 9, 4, 1, 3, 200, true),
        ] {
            let k_padded = k.div_ceil(dim * subspaces) * dim * subspaces;
            let pieces = k_padded / dim;
            let codes: Vec<Vec<u16>> = (0..stages)
                .map(|_| {
                    (0..n * pieces)
                        .map(|_| (rng.next_u32() as usize % size) as u16)
                        .collect()
                })
                .collect();
            let narrow: Vec<Vec<u8>> = codes
                .iter()
                .map(|c| c.iter().map(|&v| v as u8).collect())
                .collect();
            let books: Vec<Vec<f32>> = (0..stages)
                .map(|_| uniform(&mut rng, size * subspaces * dim))
                .collect();
            let scales: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 * 0.01).collect();
            let w = Codebook {
                stages: (0..stages)
                    .map(|s| {
                        let c = if wide {
                            CodeSlice::U16(&codes[s])
                        } else {
                            CodeSlice::U8(&narrow[s])
                        };
                        (c, &books[s][..])
                    })
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
            assert!(takes(&w));
            let a = uniform(&mut rng, m * k);
            let want = reference(&a, m, &w);
            let mut c = vec![f32::NAN; m * n];
            assert_eq!(product(&a, m, &w, &mut c), available());
            if !available() {
                continue;
            }
            let tol = 1e-5 * (k * stages) as f32;
            for (i, (g, e)) in c.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= tol,
                    "{m}×{k}×{n} dim {dim} at {i}: {g} vs {e}"
                );
            }
        }
    }

    /// A code past its subspace's rows (which would read the next subspace's) is refused.
    #[test]
    #[should_panic(expected = "past a codebook")]
    fn a_code_past_its_codebook_panics() {
        let codes = vec![0u8, 1, 16, 2];
        let book = vec![0.5f32; 2 * 16 * 4];
        let scales = vec![1f32; 2];
        let w = Codebook {
            stages: vec![(CodeSlice::U8(&codes), &book[..])],
            scales: &scales,
            k: 8,
            n: 2,
            k_padded: 8,
            dim: 4,
            subspaces: 2,
            size: 16,
        };
        let mut c = vec![0f32; 2];
        if !product(&[1.0; 8], 1, &w, &mut c) {
            panic!("past a codebook (no kernel on this CPU)");
        }
    }
}
