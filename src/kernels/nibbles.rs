//! 4-bit block weights (com.microsoft `MatMulNBits` with 4 bits) times f32 activations on AVX-512
//! VNNI, to f32 rounding.
//!
//! `W[k, n] = (q − z) · s`, with a scale `s` and a zero point `z` per column and block of `block`
//! rows of K. The activations are split into the three signed 8-bit limbs of
//! [`super::integer::matmul_f32`]. For each limb row, column and block, `Σ (limb + 128)(q − z)` is an
//! exact i32 sum of u8 × i8 products (`vpdpbusd`, four per lane per instruction); its accumulator
//! starts at `−128 · Σ (q − z)`, which takes the limbs' offset back out, so the sum is `Σ limb · (q − z)`
//! exactly. Each block's sum becomes f32, is multiplied by the block's scale and added to the column's
//! f32 sum: `F = Σ_blocks s · Σ limb (q − z)`. A row's result is `s₁F₁ + s₂F₂ + s₃F₃` over its limbs.
//! Every rounding is then one of f32 arithmetic, as in the reference's `A · W` in f32 (the limbs leave
//! out at most `2⁻²⁴ · max|x|` per value).
//!
//! The weight stays 4-bit in memory ([`BlockNibbles`], re-laid at load from the MatMulNBits bytes).
//! For each chunk of rows, a panel of 32 columns is unpacked a slice of K (whole blocks, about 256
//! rows) at a time to `q − z` bytes (and its blocks' column sums), into a scratch buffer the tiles
//! then read from L1; the next slice's codes are prefetched meanwhile.

use super::Panels;
use super::formats::NBits;
use super::integer::{LIMBS, split_in_limbs};

/// Columns per panel: two zmm registers of i32 lanes.
const NR: usize = 32;
/// Rows of limbs per tile: two activation rows' three limbs.
const MR: usize = 6;

/// A 4-bit `MatMulNBits` weight, re-laid for the VNNI tile: panels of 32 columns; within a panel, for
/// each group of 4 rows of K, 64 bytes, byte `4c + t` holding row `t` of column `c` in its low bits and
/// of column `16 + c` in its high bits (so a group unpacks to the two 64-byte operands of
/// `vpdpbusd` with one mask and one shift). Scales and zero points are `[panel][block][32]`. Rows of K
/// past `K` (to a whole group) hold their block's zero point; columns past `N` hold 0 with zero point 0
/// and scale 0: both then add nothing.
pub struct BlockNibbles {
    codes: Vec<u8>,
    scales: Vec<f32>,
    zero: Vec<u8>,
    k: usize,
    n: usize,
    block: usize,
}

impl std::fmt::Debug for BlockNibbles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockNibbles({}×{}, block {})",
            self.k, self.n, self.block
        )
    }
}

impl BlockNibbles {
    /// Whether a `MatMulNBits` of `bits` and `block` can be re-laid: 4 bits, blocks of whole groups of
    /// 4 rows.
    pub fn takes(bits: usize, block: usize) -> bool {
        bits == 4 && block > 0 && block.is_multiple_of(4)
    }

    /// Re-lays a 4-bit `MatMulNBits` weight; `None` for other widths, or blocks that are not whole
    /// groups of 4 rows.
    pub fn from_nbits(w: &NBits) -> Option<BlockNibbles> {
        let (k, n, block) = (w.k(), w.n(), w.block());
        if !BlockNibbles::takes(w.bits(), block) || k == 0 {
            return None;
        }
        let mut out = BlockNibbles {
            codes: Vec::new(),
            scales: Vec::new(),
            zero: Vec::new(),
            k,
            n,
            block,
        };
        let (groups, blocks, panels) = (out.groups(), out.blocks(), out.panels());
        out.codes = vec![0u8; panels * groups * 64];
        out.scales = vec![0f32; panels * blocks * NR];
        out.zero = vec![0u8; panels * blocks * NR];
        for col in 0..n {
            let (p, c) = (col / NR, col % NR);
            let (at, shift) = (4 * (c % 16), 4 * (c / 16));
            for blk in 0..blocks {
                out.scales[(p * blocks + blk) * NR + c] = w.scale(col, blk);
                out.zero[(p * blocks + blk) * NR + c] = w.zero_point(col, blk);
            }
            for kk in 0..groups * 4 {
                let code = if kk < k {
                    w.code(kk, col)
                } else {
                    w.zero_point(col, kk / block)
                };
                out.codes[(p * groups + kk / 4) * 64 + at + kk % 4] |= code << shift;
            }
        }
        Some(out)
    }

    /// Bytes held: the codes (half a byte per weight), scales and zero points.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len() + self.zero.len()
    }

    fn groups(&self) -> usize {
        self.k.div_ceil(4)
    }

    fn blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// `W[r, j]` in f32, as the reference dequantizes it.
    pub fn value(&self, r: usize, j: usize) -> f32 {
        let (p, c) = (j / NR, j % NR);
        let byte = self.codes[(p * self.groups() + r / 4) * 64 + 4 * (c % 16) + r % 4];
        let code = (byte >> (4 * (c / 16))) & 15;
        let at = (p * self.blocks() + r / self.block) * NR + c;
        (code as i32 - self.zero[at] as i32) as f32 * self.scales[at]
    }

    /// Asks the CPU to bring groups `g0..g1` of panel `p` towards the caches.
    fn prefetch(&self, p: usize, g0: usize, g1: usize) {
        let at = p * self.groups();
        super::prefetch(&self.codes[(at + g0) * 64..(at + g1) * 64]);
    }

    /// Unpacks groups `g0..g1` (from a block's start) of panel `p` to `q − z`, laid as
    /// [`super::integer`]'s VNNI panels (per group of 4 rows, 32 columns × 4 bytes), and writes each
    /// of their blocks' `−128 · Σ (q − z)` per column to `init`.
    fn unpack(&self, p: usize, g0: usize, g1: usize, out: &mut [i8], init: &mut [i32]) {
        let (groups, blocks) = (self.groups(), self.blocks());
        let per_block = self.block / 4;
        debug_assert!(g0.is_multiple_of(per_block) && g0 < g1 && g1 <= groups);
        let codes = &self.codes[(p * groups + g0) * 64..(p * groups + g1) * 64];
        let zero = &self.zero[(p * blocks + g0 / per_block) * NR..(p + 1) * blocks * NR];
        let (gs, bs) = (g1 - g0, (g1 - g0).div_ceil(per_block));
        assert!(out.len() >= gs * 128 && init.len() >= bs * NR);
        // SAFETY: `available` (checked by the only caller) covers the features; the lengths are
        // what the function reads and writes.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::unpack(codes, zero, self.block / 4, out, init)
        }
    }
}

/// The f32 panels of the weight, for the kernels of [`super::matmul`]: the rows the limbs cannot
/// hold go through them (rows past `K` and columns past `N` decode as 0).
impl Panels for BlockNibbles {
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn decode(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        for (r, row) in out.chunks_exact_mut(nr).take(kc).enumerate() {
            for (j, o) in row.iter_mut().enumerate() {
                let (kk, col) = (k0 + r, n0 + j);
                *o = if kk < self.k && col < self.n {
                    self.value(kk, col)
                } else {
                    0.0
                };
            }
        }
    }
}

/// Whether [`matmul_f32`] runs on this CPU (AVX-512 VNNI, and no cap to a lesser kernel family).
pub fn available() -> bool {
    use super::integer::IntIsa;
    #[cfg(target_arch = "x86_64")]
    {
        IntIsa::detect() == IntIsa::Avx512Vnni && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[M, N] = a · W` for f32 activations `a[M, K]` and a 4-bit block weight, to f32 rounding (see
/// the module's text). Rows holding a NaN or an infinity, or nothing but magnitudes under 1e-30, are
/// computed in f32 from the dequantized weight, as the reference would.
///
/// # Panics
/// When [`available`] is false, or the lengths do not fit `M`, `K` and `N`.
pub fn matmul_f32(a: &[f32], m: usize, w: &BlockNibbles, c: &mut [f32]) {
    let (k, n) = (w.k, w.n);
    assert!(available(), "4-bit limb products need AVX-512 VNNI");
    assert_eq!(a.len(), m * k, "A holds {} values, not {m}×{k}", a.len());
    assert_eq!(c.len(), m * n, "C holds {} values, not {m}×{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    let (groups, blocks) = (w.groups(), w.blocks());
    let kp = groups * 4;
    let per_block = w.block / 4;
    // K is taken in slices of whole blocks (about 256 rows), so that the unpacked panel slice (128
    // bytes per group) and the tile's rows stay in L1.
    let slice = (64usize.div_ceil(per_block) * per_block).min(blocks * per_block);
    // Rows at a time: their limbs (3 × kp bytes a row) stay near 512 KiB, in pairs (one tile).
    let chunk = (174_762 / kp).max(2) / 2 * 2;
    let chunk = chunk.min(m.div_ceil(2) * 2);
    let mut limbs = vec![0u8; chunk * LIMBS * kp];
    let mut steps = vec![[0f32; LIMBS]; chunk];
    let mut panel = vec![0i8; slice * 128];
    let mut init = vec![0i32; slice.div_ceil(per_block) * NR];
    let mut sums = vec![0f32; chunk * LIMBS * NR];
    for m0 in (0..m).step_by(chunk) {
        let mw = chunk.min(m - m0);
        let rows = mw * LIMBS;
        let mut in_float = Vec::new();
        for (i, (row, st)) in a[m0 * k..(m0 + mw) * k]
            .chunks_exact(k)
            .zip(&mut steps)
            .enumerate()
        {
            match split_in_limbs(row, &mut limbs[i * LIMBS * kp..][..LIMBS * kp], kp) {
                Some(s) => *st = s,
                None => {
                    *st = [0.0; LIMBS];
                    in_float.push(i);
                }
            }
        }
        for p in 0..w.panels() {
            sums[..rows * NR].fill(0.0);
            for g0 in (0..groups).step_by(slice) {
                let g1 = (g0 + slice).min(groups);
                let blk0 = g0 / per_block;
                w.unpack(p, g0, g1, &mut panel, &mut init);
                // The codes come from memory (a model's weights do not stay in cache between
                // runs): ask for the next slice's now, so they arrive while the tiles run.
                match (g1 < groups, p + 1 < w.panels()) {
                    (true, _) => w.prefetch(p, g1, (g1 + slice).min(groups)),
                    (false, true) => w.prefetch(p + 1, 0, slice.min(groups)),
                    _ => {}
                }
                let scales = &w.scales[(p * blocks + blk0) * NR..(p + 1) * blocks * NR];
                for t0 in (0..rows).step_by(MR) {
                    let r = MR.min(rows - t0);
                    let gs = g1 - g0;
                    // The tile's rows from group g0 on, `kp` bytes apart.
                    let rows_in = &limbs[t0 * kp + g0 * 4..(t0 + r - 1) * kp + g1 * 4];
                    let out = &mut sums[t0 * NR..][..r * NR];
                    // SAFETY: `available` checked avx512f and avx512vnni; the rows hold (r − 1) · kp
                    // + gs · 4 bytes, the panel gs × 128, init and scales a value per column of each
                    // of the slice's blocks, out r × 32.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        match r {
                            MR => x86::tile::<MR>(
                                gs, per_block, rows_in, kp, &panel, &init, scales, out,
                            ),
                            3 => x86::tile::<3>(
                                gs, per_block, rows_in, kp, &panel, &init, scales, out,
                            ),
                            _ => unreachable!("limb rows come in threes"),
                        }
                    }
                }
            }
            let (n0, nw) = (p * NR, NR.min(n - p * NR));
            for (i, st) in steps[..mw].iter().enumerate() {
                let f: [&[f32]; LIMBS] =
                    std::array::from_fn(|l| &sums[(i * LIMBS + l) * NR..][..nw]);
                combine(st, f, &mut c[(m0 + i) * n + n0..][..nw]);
            }
        }
        for i in in_float {
            let row = &a[(m0 + i) * k..][..k];
            super::matmul(row, 1, w, &mut c[(m0 + i) * n..][..n]);
        }
    }
}

/// `dst[j] = s₁F₁[j] + s₂F₂[j] + s₃F₃[j]`: one row's result from its limbs' block sums.
fn combine(steps: &[f32; LIMBS], f: [&[f32]; LIMBS], dst: &mut [f32]) {
    #[inline(always)]
    fn body(steps: &[f32; LIMBS], f: [&[f32]; LIMBS], dst: &mut [f32]) {
        let n = dst.len();
        let [a, b, c] = f;
        for (((d, &x), &y), &z) in dst.iter_mut().zip(&a[..n]).zip(&b[..n]).zip(&c[..n]) {
            *d = steps[0] * x + (steps[1] * y + steps[2] * z);
        }
    }
    for_cpu!(body(steps: &[f32; LIMBS] = steps, f: [&[f32]; LIMBS] = f, dst: &mut [f32] = dst) -> ())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::NR;
    use std::arch::x86_64::*;

    /// One panel's groups (64 bytes of two nibbles each) to `q − z` bytes, 128 a group: the low
    /// nibbles are columns 0–15, the high ones 16–31, each column's 4 rows side by side. Per block,
    /// `init` gets `−128 · Σ (q − z)` per column, summed by `vpdpbusd` against ones.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, BW and VNNI; `codes` holds whole groups, `zero` 32 values per
    /// block of `per_block` groups, `out` 128 bytes per group and `init` 32 values per block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn unpack(
        codes: &[u8],
        zero: &[u8],
        per_block: usize,
        out: &mut [i8],
        init: &mut [i32],
    ) {
        let groups = codes.len() / 64;
        let blocks = groups.div_ceil(per_block);
        debug_assert!(zero.len() >= blocks * NR && init.len() >= blocks * NR);
        debug_assert!(out.len() >= groups * 128);
        let low = _mm512_set1_epi8(15);
        let ones = _mm512_set1_epi8(1);
        let spread = _mm512_set1_epi32(0x0101_0101);
        for blk in 0..blocks {
            // SAFETY: blk < blocks: its 32 zero points and init values are in range, and each of
            // its groups' 64 code bytes and 128 output bytes.
            unsafe {
                // Each column's zero point in the 4 bytes of its lane.
                let z = zero.as_ptr().add(blk * NR);
                let z0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(z.cast()));
                let z1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(z.add(16).cast()));
                let (z0, z1) = (
                    _mm512_mullo_epi32(z0, spread),
                    _mm512_mullo_epi32(z1, spread),
                );
                let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for g in blk * per_block..((blk + 1) * per_block).min(groups) {
                    let v = _mm512_loadu_si512(codes.as_ptr().add(g * 64).cast());
                    let lo = _mm512_sub_epi8(_mm512_and_si512(v, low), z0);
                    let hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), z1);
                    _mm512_storeu_si512(out.as_mut_ptr().add(g * 128).cast(), lo);
                    _mm512_storeu_si512(out.as_mut_ptr().add(g * 128 + 64).cast(), hi);
                    s0 = _mm512_dpbusd_epi32(s0, ones, lo);
                    s1 = _mm512_dpbusd_epi32(s1, ones, hi);
                }
                let neg = |s| _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(s, 7));
                _mm512_storeu_si512(init.as_mut_ptr().add(blk * NR).cast(), neg(s0));
                _mm512_storeu_si512(init.as_mut_ptr().add(blk * NR + 16).cast(), neg(s1));
            }
        }
    }

    /// `R` limb rows × 32 columns: per block, i32 accumulators start at the block's `init` and add
    /// u8 × i8 products with `vpdpbusd`; at the block's end they become f32 and add, times the
    /// block's scales, into f32 accumulators, which start from and end in `out` (`R` rows of 32).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI; `rows` must hold `R` rows `stride` bytes apart,
    /// each of `groups · 4` bytes, `panel`
    /// `groups · 128`, `init` and `scales` `⌈groups / per_block⌉ · 32` values, `out` `R · 32`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn tile<const R: usize>(
        groups: usize,
        per_block: usize,
        rows: &[u8],
        stride: usize,
        panel: &[i8],
        init: &[i32],
        scales: &[f32],
        out: &mut [f32],
    ) {
        let blocks = groups.div_ceil(per_block);
        debug_assert!(rows.len() >= (R - 1) * stride + groups * 4 && panel.len() >= groups * 128);
        debug_assert!(init.len() >= blocks * NR && scales.len() >= blocks * NR);
        debug_assert!(out.len() >= R * NR);
        // SAFETY: out holds R · 32 values.
        let mut f: [[__m512; 2]; R] = std::array::from_fn(|i| unsafe {
            let o = out.as_ptr().add(i * NR);
            [_mm512_loadu_ps(o), _mm512_loadu_ps(o.add(16))]
        });
        let (p, a) = (panel.as_ptr(), rows.as_ptr());
        for blk in 0..blocks {
            // SAFETY: blk < blocks, so the 32 values at blk · 32 are in init and scales; each group
            // g < groups has its 128 bytes in the panel and 4 in each row.
            unsafe {
                let i0 = _mm512_loadu_si512(init.as_ptr().add(blk * NR).cast());
                let i1 = _mm512_loadu_si512(init.as_ptr().add(blk * NR + 16).cast());
                let mut acc = [[i0, i1]; R];
                for g in blk * per_block..((blk + 1) * per_block).min(groups) {
                    let b0 = _mm512_loadu_si512(p.add(g * 128).cast());
                    let b1 = _mm512_loadu_si512(p.add(g * 128 + 64).cast());
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let x = _mm512_set1_epi32(
                            a.add(i * stride + g * 4).cast::<i32>().read_unaligned(),
                        );
                        acc[0] = _mm512_dpbusd_epi32(acc[0], x, b0);
                        acc[1] = _mm512_dpbusd_epi32(acc[1], x, b1);
                    }
                }
                let s0 = _mm512_loadu_ps(scales.as_ptr().add(blk * NR));
                let s1 = _mm512_loadu_ps(scales.as_ptr().add(blk * NR + 16));
                for (f, acc) in f.iter_mut().zip(&acc) {
                    f[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[0]), s0, f[0]);
                    f[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[1]), s1, f[1]);
                }
            }
        }
        for (i, f) in f.iter().enumerate() {
            // SAFETY: i · 32 + 31 < R · 32 ≤ out.len().
            unsafe {
                _mm512_storeu_ps(out.as_mut_ptr().add(i * NR), f[0]);
                _mm512_storeu_ps(out.as_mut_ptr().add(i * NR + 16), f[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Panels;

    /// A MatMulNBits weight of `k × n` in blocks, with random codes, scales and (maybe) zero points.
    fn nbits_bytes(k: usize, n: usize, block: usize, zeros: bool, seed: u64) -> NBitsBytes {
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let blocks = k.div_ceil(block);
        let b = (0..n * blocks * block / 2).map(|_| next() as u8).collect();
        let scales = (0..n * blocks)
            .map(|_| (next() % 1000) as f32 / 1000.0 + 0.01)
            .collect();
        let zero = zeros.then(|| (0..n * blocks.div_ceil(2)).map(|_| next() as u8).collect());
        NBitsBytes {
            b,
            scales,
            zero,
            k,
            n,
            block,
        }
    }

    struct NBitsBytes {
        b: Vec<u8>,
        scales: Vec<f32>,
        zero: Option<Vec<u8>>,
        k: usize,
        n: usize,
        block: usize,
    }

    impl NBitsBytes {
        fn view(&self) -> NBits<'_> {
            NBits::new(
                &self.b,
                &self.scales,
                self.zero.as_deref(),
                self.k,
                self.n,
                4,
                self.block,
            )
            .unwrap()
        }
    }

    #[test]
    fn relaid_values_are_the_nbits_values() {
        for (k, n, block, zeros) in [(64, 40, 16, true), (70, 33, 32, false), (5, 1, 16, true)] {
            let bytes = nbits_bytes(k, n, block, zeros, 7);
            let w = bytes.view();
            let r = BlockNibbles::from_nbits(&w).unwrap();
            let mut dec = vec![0f32; k * n];
            w.decode(0, k, 0, n, &mut dec);
            for kk in 0..k {
                for j in 0..n {
                    assert_eq!(r.value(kk, j), dec[kk * n + j], "({kk}, {j}) of {k}×{n}");
                }
            }
        }
    }

    #[test]
    fn products_match_f64_on_ragged_shapes() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        let mut seed = 1u64;
        for (k, n, block, zeros) in [
            (32, 32, 32, false),
            (64, 17, 16, true),
            (100, 70, 32, true),
            (257, 33, 64, false),
            (1024, 96, 32, true),
            (6, 5, 16, false),
            (4096, 40, 128, true),
        ] {
            // 45 rows of K = 4096 take two chunks of rows.
            let ms: &[usize] = if k == 4096 {
                &[1, 45]
            } else {
                &[1, 2, 3, 5, 8]
            };
            for &m in ms {
                seed += 1;
                let bytes = nbits_bytes(k, n, block, zeros, seed);
                let w = BlockNibbles::from_nbits(&bytes.view()).unwrap();
                let mut s = seed;
                let mut a: Vec<f32> = (0..m * k)
                    .map(|_| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
                    })
                    .collect();
                if m >= 3 {
                    a[k..2 * k].fill(0.0); // a zero row
                    a[2 * k + 1] = f32::NAN; // a NaN row, computed in f32
                }
                let mut c = vec![0f32; m * n];
                matmul_f32(&a, m, &w, &mut c);
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut mag) = (0f64, 0f64);
                        for r in 0..k {
                            let t = a[i * k + r] as f64 * w.value(r, j) as f64;
                            exact += t;
                            mag += t.abs();
                        }
                        let got = c[i * n + j] as f64;
                        if exact.is_nan() {
                            assert!(got.is_nan(), "row {i} col {j} of {m}×{k}×{n}: {got}");
                            continue;
                        }
                        assert!(
                            (got - exact).abs() <= 4e-6 * mag + 1e-30,
                            "row {i} col {j} of {m}×{k}×{n} block {block}: {got} vs {exact} (Σ|t| {mag})"
                        );
                    }
                }
            }
        }
    }
}
