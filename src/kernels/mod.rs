//! Matrix products over weights that stay compressed in memory.
//!
//! `Y[M, N] = A[M, K] · W[K, N]`, where `W` is never held in f32: a [`Panels`] source decodes it a
//! panel at a time (`kc` rows of the reduction axis × `nr` output columns) into a small buffer that stays
//! in the L1 cache, and a register-tiled micro-kernel multiplies every block of `MR` rows of `A` with
//! that panel before the next one is decoded. Each weight is decoded once per product, so the decoding
//! cost is `1/M` of the multiply-adds; the memory read per weight is its compressed size.
//!
//! The micro-kernels use `std::arch` behind run-time feature detection: AVX-512F (8 × 32 tiles), AVX2 +
//! FMA (6 × 16), and a portable one the compiler vectorises for whatever the build targets (NEON on
//! aarch64). All of them are checked against [`reference`] in the tests, ragged sizes included.

/// Calls `$body(args…)`, an `#[inline(always)]` function of plain loops, compiled for the widest
/// vector unit [`Isa::detect`] allows (AVX-512 with BW, else AVX2 + FMA), so LLVM vectorises it at that
/// width; the crate's own baseline is SSE2. Each argument is named, typed and given its value:
/// `for_cpu!(body(x: &[f32] = row, n: usize = 3) -> f32)`.
macro_rules! for_cpu {
    ($body:ident($($arg:ident : $ty:ty = $val:expr),* $(,)?) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
            fn wide($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            fn mid($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            use crate::kernels::Isa;
            if Isa::detect() == Isa::Avx512
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the features were detected.
                return unsafe { wide($($val),*) };
            }
            if Isa::detect() != Isa::Portable
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the features were detected.
                return unsafe { mid($($val),*) };
            }
        }
        $body($($val),*)
    }};
}

pub mod codebook;
pub mod conv;
pub mod formats;
pub mod integer;
pub mod lut;
pub mod nibbles;

/// Columns of the portable tile: 4 × 16 accumulators fill half of NEON's 32 registers; x86-64's
/// baseline (SSE2) has 16, so it takes 4 × 8 and keeps them all in registers.
const PORTABLE_NR: usize = if cfg!(target_arch = "x86_64") { 8 } else { 16 };

/// Rows of the reduction axis decoded per panel.
const KC: usize = 128;

/// The kernel family this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best family this CPU supports (detected once), or a lesser one named by the environment
    /// variable `QUENCH_KERNELS` (`avx2` or `portable`), to measure what other machines would run.
    pub fn detect() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let best = Isa::probe();
            match capped_to().as_deref() {
                Some("avx2") if best == Isa::Avx512 => Isa::Avx2,
                Some("portable") => Isa::Portable,
                _ => best,
            }
        })
    }

    fn probe() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every family this CPU can run (the best first), for tests and benchmarks.
    pub fn available() -> Vec<Isa> {
        let best = Isa::probe();
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .skip_while(|i| *i != best)
            .collect()
    }

    fn tile(self) -> (usize, usize) {
        match self {
            Isa::Avx512 => (8, 32),
            Isa::Avx2 => (6, 16),
            Isa::Portable => (4, PORTABLE_NR),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512f",
            Isa::Avx2 => "avx2+fma",
            Isa::Portable => "portable",
        }
    }
}

/// Asks the CPU to bring `data` towards the caches (L2), a 64-byte line at a time; nothing on CPUs
/// without a prefetch instruction here.
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let bytes = std::mem::size_of_val(data);
        let p = data.as_ptr().cast::<i8>();
        for at in (0..bytes).step_by(64) {
            // SAFETY: a prefetch reads nothing, and the address is inside `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.add(at)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Zeroes the upper halves of the vector registers (`vzeroupper`) where the CPU has AVX.
///
/// Some of tract's hand-written AVX-512 kernels return with those halves in use, and plain Rust
/// code (built for baseline x86-64, so SSE instructions without the VEX prefix) then runs far
/// slower on Intel CPUs: on a Xeon with AVX-512, libm's `expf` took 20 times as long right after
/// tract's matrix products as on its own. quench's operators call this when they start, and the
/// LSTM after each of tract's activation kernels.
#[inline]
pub fn zero_upper() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX; the upper halves hold nothing live between operators.
        unsafe { std::arch::x86_64::_mm256_zeroupper() }
    }
}

/// The kernel family `QUENCH_KERNELS` asks for, if set.
fn capped_to() -> Option<String> {
    std::env::var("QUENCH_KERNELS")
        .ok()
        .map(|v| v.to_ascii_lowercase())
}

/// A weight `W[K, N]` that can be decoded panel by panel.
pub trait Panels: Sync {
    /// The reduction size `K`.
    fn k(&self) -> usize;
    /// The output columns `N`.
    fn n(&self) -> usize;
    /// Writes `out[r * nr + j] = W[k0 + r, n0 + j]` for `r < kc`, `j < nr`; columns at or past `N` are
    /// written as 0. `out` holds at least `kc * nr` values.
    fn decode(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]);

    /// Per-column scales `s` with `W = W' · diag(s)`, when this form decodes `W'`
    /// ([`Panels::decode_unscaled`]) for less than `W`: the product then multiplies its finished
    /// columns once (`M × N` multiplies instead of `K × N` per product).
    fn column_scales(&self) -> Option<&[f32]> {
        None
    }

    /// The panel of `W'` (see [`Panels::column_scales`]); `W` itself for forms without column scales.
    fn decode_unscaled(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        self.decode(k0, kc, n0, nr, out)
    }

    /// Computes `c = a · W` for `m` rows without panels, when this form has a kernel for so few rows
    /// on `isa` (returns `false` and leaves `c` alone otherwise). With one or two rows a panel is
    /// decoded, stored and read back for one or two multiply-adds per weight; a kernel that decodes into
    /// registers does a third of that work.
    fn few_rows(&self, _isa: Isa, _a: &[f32], _m: usize, _c: &mut [f32]) -> bool {
        false
    }
}

/// `c[M, N] = a[M, K] · W` with the best kernels of this CPU.
pub fn matmul(a: &[f32], m: usize, w: &dyn Panels, c: &mut [f32]) {
    matmul_with(Isa::detect(), a, m, w, c)
}

/// `c[M, N] = a[M, K] · W` with the kernels of `isa` (which this CPU must support: see
/// [`Isa::available`]).
pub fn matmul_with(isa: Isa, a: &[f32], m: usize, w: &dyn Panels, c: &mut [f32]) {
    let (k, n) = (w.k(), w.n());
    assert_eq!(a.len(), m * k, "A holds {} values, not {m}×{k}", a.len());
    assert_eq!(c.len(), m * n, "C holds {} values, not {m}×{n}", c.len());
    // The families are ordered: a CPU runs its best one and every one after it.
    assert!(
        isa as usize >= Isa::probe() as usize,
        "{} kernels on a CPU without them",
        isa.name()
    );
    c.fill(0.0);
    if m == 0 || n == 0 || k == 0 || w.few_rows(isa, a, m, c) {
        return;
    }
    let (mr, nr) = isa.tile();
    let post = w.column_scales().filter(|s| s.len() == n);
    let mut panel = vec![0f32; KC * nr];
    let mut tile = vec![0f32; mr * nr];
    // Row blocks as even as the tile allows (20 rows on a 6-row tile: 5, 5, 5, 5, not 6, 6, 6, 2), each
    // run by a kernel of exactly its height, so no row is computed twice.
    let blocks = m.div_ceil(mr);
    let starts: Vec<(usize, usize)> = (0..blocks)
        .scan(0, |at, b| {
            let rows = m / blocks + usize::from(b < m % blocks);
            let start = *at;
            *at += rows;
            Some((start, rows))
        })
        .collect();
    for n0 in (0..n).step_by(nr) {
        let nw = nr.min(n - n0);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            if post.is_some() {
                w.decode_unscaled(k0, kc, n0, nr, &mut panel[..kc * nr]);
            } else {
                w.decode(k0, kc, n0, nr, &mut panel[..kc * nr]);
            }
            for &(m0, mw) in &starts {
                let row = |i: usize| {
                    let r = m0 + i.min(mw - 1);
                    &a[r * k + k0..r * k + k0 + kc]
                };
                // A whole block of columns accumulates straight into C (which starts at 0, so the
                // first panel need not read it); a ragged last block goes through the tile.
                let whole = nw == nr;
                let (out, ldc, load) = if whole {
                    (c[m0 * n + n0..].as_mut_ptr(), n, k0 > 0)
                } else {
                    (tile.as_mut_ptr(), nr, false)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (out, ldc, load);
                // A tile of exactly `mw` rows: `by_rows!(kernel, [heights below the most], most)`.
                #[cfg(target_arch = "x86_64")]
                macro_rules! by_rows {
                    ($kernel:ident, [$($r:literal),*], $most:literal) => {{
                        macro_rules! run {
                            ($h:literal) => {{
                                let rows: [&[f32]; $h] = std::array::from_fn(row);
                                // SAFETY: `isa` is one this CPU runs (asserted above); every row
                                // holds kc values and the panel kc × nr, which the kernel reads and
                                // no more; `out` has `$h` rows of nr values, `ldc` apart (in C: the
                                // rows m0.. of a whole block of nr columns; or the tile).
                                unsafe { x86::$kernel::<$h>(kc, &rows, &panel, out, ldc, load) }
                            }};
                        }
                        match mw {
                            $($r => run!($r),)*
                            _ => run!($most),
                        }
                    }};
                }
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => by_rows!(tile_avx512, [1, 2, 3, 4, 5, 6, 7], 8),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => by_rows!(tile_avx2, [1, 2, 3, 4, 5], 6),
                    _ => {
                        let rows: [&[f32]; 4] = std::array::from_fn(row);
                        tile_portable(kc, &rows, &panel, &mut tile)
                    }
                }
                if whole && isa != Isa::Portable {
                    continue;
                }
                for i in 0..mw {
                    let out = &mut c[(m0 + i) * n + n0..(m0 + i) * n + n0 + nw];
                    for (o, t) in out.iter_mut().zip(&tile[i * nr..i * nr + nw]) {
                        *o += t;
                    }
                }
            }
        }
    }
    if let Some(s) = post {
        for row in c.chunks_exact_mut(n) {
            for (v, s) in row.iter_mut().zip(s) {
                *v *= s;
            }
        }
    }
}

/// `tile[i * NR + j] = Σ_r rows[i][r] · panel[r * NR + j]`.
fn tile_portable(kc: usize, rows: &[&[f32]; 4], panel: &[f32], tile: &mut [f32]) {
    const NR: usize = PORTABLE_NR;
    let mut acc = [[0f32; NR]; 4];
    for (r, p) in panel[..kc * NR].chunks_exact(NR).enumerate() {
        for (i, acc) in acc.iter_mut().enumerate() {
            let x = rows[i][r];
            for (a, w) in acc.iter_mut().zip(p) {
                // Not `mul_add`: without a hardware FMA in the build target (x86-64's baseline has
                // none) that is a libm call per product.
                *a += x * *w;
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        tile[i * NR..(i + 1) * NR].copy_from_slice(acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `R` ≤ 8 rows × 32 columns: up to 16 zmm accumulators.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; each row must hold `kc` values, `panel` `kc * 32`, and `out` R rows of
    /// 32 writable values, `ldc` apart (read first when `load`).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512<const R: usize>(
        kc: usize,
        rows: &[&[f32]; R],
        panel: &[f32],
        out: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        debug_assert!(panel.len() >= kc * 32 && ldc >= 32);
        debug_assert!(rows.iter().all(|r| r.len() >= kc));
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if load {
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's `out` holds R rows of 32 values, `ldc` apart.
                unsafe {
                    acc[0] = _mm512_loadu_ps(out.add(i * ldc));
                    acc[1] = _mm512_loadu_ps(out.add(i * ldc + 16));
                }
            }
        }
        let p = panel.as_ptr();
        for r in 0..kc {
            // SAFETY: r < kc, so r * 32 + 31 < panel.len(); r < rows[i].len().
            unsafe {
                let b0 = _mm512_loadu_ps(p.add(r * 32));
                let b1 = _mm512_loadu_ps(p.add(r * 32 + 16));
                for i in 0..R {
                    let x = _mm512_set1_ps(*rows[i].get_unchecked(r));
                    acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: as above.
            unsafe {
                _mm512_storeu_ps(out.add(i * ldc), acc[0]);
                _mm512_storeu_ps(out.add(i * ldc + 16), acc[1]);
            }
        }
    }

    /// `R` ≤ 6 rows × 16 columns: up to 12 ymm accumulators.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; each row must hold `kc` values, `panel` `kc * 16`, and `out` R
    /// rows of 16 writable values, `ldc` apart (read first when `load`).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2<const R: usize>(
        kc: usize,
        rows: &[&[f32]; R],
        panel: &[f32],
        out: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        debug_assert!(panel.len() >= kc * 16 && ldc >= 16);
        debug_assert!(rows.iter().all(|r| r.len() >= kc));
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        if load {
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's `out` holds R rows of 16 values, `ldc` apart.
                unsafe {
                    acc[0] = _mm256_loadu_ps(out.add(i * ldc));
                    acc[1] = _mm256_loadu_ps(out.add(i * ldc + 8));
                }
            }
        }
        let p = panel.as_ptr();
        for r in 0..kc {
            // SAFETY: r < kc, so r * 16 + 15 < panel.len(); r < rows[i].len().
            unsafe {
                let b0 = _mm256_loadu_ps(p.add(r * 16));
                let b1 = _mm256_loadu_ps(p.add(r * 16 + 8));
                for i in 0..R {
                    let x = _mm256_set1_ps(*rows[i].get_unchecked(r));
                    acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: as above.
            unsafe {
                _mm256_storeu_ps(out.add(i * ldc), acc[0]);
                _mm256_storeu_ps(out.add(i * ldc + 8), acc[1]);
            }
        }
    }
}

/// The plain triple loop in f64 over the fully decoded weight: what the kernels must reproduce up to
/// float rounding.
pub fn reference(a: &[f32], m: usize, w: &dyn Panels) -> Vec<f32> {
    let (k, n) = (w.k(), w.n());
    let mut full = vec![0f32; k * n];
    w.decode(0, k, 0, n, &mut full);
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for r in 0..k {
                s += a[i * k + r] as f64 * full[r * n + j] as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::formats::{Int8Blocked, Int8Cols, NBits, NibblesK};
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{Rng, SeedableRng};

    pub(super) fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0)
            .collect()
    }

    fn close(got: &[f32], want: &[f32], k: usize) {
        // Float rounding of a k-term sum of products bounded by 1: a few ulps per term at most.
        let tol = 1e-6 * k as f32 + 1e-6;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "at {i}: {g} vs {w}");
        }
    }

    #[test]
    fn every_isa_matches_the_reference_on_ragged_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 64, 17),
            (2, 70, 45),
            (2, 1, 64),
            (3, 129, 33),
            (7, 300, 31),
            (9, 256, 64),
            (13, 33, 100),
            (48, 200, 47),
            (20, 130, 70),
        ] {
            let a = uniform(&mut rng, m * k);
            let q: Vec<i8> = (0..k * n).map(|_| rng.next_u32() as i8).collect();
            let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
            let zero: Vec<i8> = (0..n).map(|j| (j % 7) as i8 - 3).collect();
            for zero in [None, Some(&zero[..])] {
                let w = Int8Cols::new(&q, k, n, &scales, zero);
                let blocked = Int8Blocked::from_cols(&w);
                let want = reference(&a, m, &w);
                // The blocked copy decodes to the same weight, any panel included.
                let (mut x, mut y) = (vec![0f32; k * n], vec![0f32; k * n]);
                w.decode(0, k, 0, n, &mut x);
                blocked.decode(0, k, 0, n, &mut y);
                assert_eq!(x, y, "{k}×{n}");
                for isa in Isa::available() {
                    for panels in [&w as &dyn Panels, &blocked] {
                        let mut c = vec![f32::NAN; m * n];
                        matmul_with(isa, &a, m, panels, &mut c);
                        close(&c, &want, k);
                    }
                }
            }
        }
    }

    #[test]
    fn four_bit_blocks_match_the_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for &(m, k, n, block) in &[
            (2usize, 64usize, 5usize, 32usize),
            (5, 100, 19, 32),
            (4, 256, 40, 64),
            (1, 48, 3, 16),
            (3, 64, 75, 32),
        ] {
            let blocks = k.div_ceil(block);
            let blob = block / 2;
            let b: Vec<u8> = (0..n * blocks * blob)
                .map(|_| rng.next_u32() as u8)
                .collect();
            let scales = uniform(&mut rng, n * blocks);
            let zp: Vec<u8> = (0..n * blocks.div_ceil(2))
                .map(|_| rng.next_u32() as u8)
                .collect();
            for zp in [None, Some(&zp[..])] {
                let w = NBits::new(&b, &scales, zp, k, n, 4, block).unwrap();
                let relaid = NibblesK::from_nbits(&w).unwrap();
                let a = uniform(&mut rng, m * k);
                let want = reference(&a, m, &w);
                for isa in Isa::available() {
                    for panels in [&w as &dyn Panels, &relaid] {
                        let mut c = vec![0f32; m * n];
                        matmul_with(isa, &a, m, panels, &mut c);
                        close(&c, &want, k * 8);
                    }
                }
            }
        }
    }
}
