//! The compressed weight forms quench writes, as [`Panels`] sources over borrowed bytes: nothing here
//! copies a weight, so the running model holds exactly what the file holds.

use super::{Isa, Panels};

/// 8-bit codes, signed or not.
#[derive(Clone, Copy, Debug)]
pub enum Codes<'a> {
    I8(&'a [i8]),
    U8(&'a [u8]),
}

impl Codes<'_> {
    fn len(&self) -> usize {
        match self {
            Codes::I8(c) => c.len(),
            Codes::U8(c) => c.len(),
        }
    }
}

/// `DequantizeLinear(q[K, N], scale, zero_point)` with one scale (and zero point) per output column, or
/// one for the whole tensor: `W[k, n] = (q[k, n] - zp[n]) · scale[n]`, as ONNX computes it.
pub struct Int8Cols<'a> {
    q: Codes<'a>,
    k: usize,
    n: usize,
    scales: &'a [f32],
    zero: Vec<f32>,
}

impl<'a> Int8Cols<'a> {
    /// `scales` and `zero` hold 1 or `n` values.
    pub fn new(q: &'a [i8], k: usize, n: usize, scales: &'a [f32], zero: Option<&[i8]>) -> Self {
        let zero = zero.map(|z| z.iter().map(|&v| v as f32).collect());
        Int8Cols::with_codes(Codes::I8(q), k, n, scales, zero)
    }

    pub fn with_codes(
        q: Codes<'a>,
        k: usize,
        n: usize,
        scales: &'a [f32],
        zero: Option<Vec<f32>>,
    ) -> Self {
        assert_eq!(q.len(), k * n, "codes are not {k}×{n}");
        assert!(
            scales.len() == 1 || scales.len() == n,
            "{} scales",
            scales.len()
        );
        let zero = zero.unwrap_or_default();
        assert!(
            zero.len() <= 1 || zero.len() == n,
            "{} zero points",
            zero.len()
        );
        Int8Cols {
            q,
            k,
            n,
            scales,
            zero,
        }
    }

    fn column(&self, j: usize) -> (f32, f32) {
        let s = self.scales[if self.scales.len() == 1 { 0 } else { j }];
        let z = match self.zero.len() {
            0 => 0.0,
            1 => self.zero[0],
            _ => self.zero[j],
        };
        (s, z)
    }
}

/// A plain row-major f32 matrix `[K, N]` read as the right operand of a product: an activation, such
/// as the `[C, H·W]` image of a pointwise convolution, which the weight then multiplies from the left.
pub struct F32Matrix<'a> {
    pub data: &'a [f32],
    pub k: usize,
    pub n: usize,
}

impl Panels for F32Matrix<'_> {
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn decode(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        let nw = nr.min(self.n.saturating_sub(n0));
        for (r, o) in out.chunks_exact_mut(nr).take(kc).enumerate() {
            let row = &self.data[(k0 + r) * self.n + n0..][..nw];
            o[..nw].copy_from_slice(row);
            o[nw..].fill(0.0);
        }
    }
}

/// `Wᵀ` as row-major f32 `[N, K]`: every panel of `w` decoded once.
pub fn transposed_f32(w: &dyn Panels) -> Vec<f32> {
    const NR: usize = 32;
    let (k, n) = (w.k(), w.n());
    let mut panel = vec![0f32; k * NR];
    let mut out = vec![0f32; n * k];
    for n0 in (0..n).step_by(NR) {
        w.decode(0, k, n0, NR, &mut panel);
        for j in 0..NR.min(n - n0) {
            let row = &mut out[(n0 + j) * k..][..k];
            for (r, v) in row.iter_mut().enumerate() {
                *v = panel[r * NR + j];
            }
        }
    }
    out
}

impl Panels for Int8Cols<'_> {
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn decode(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        let nw = nr.min(self.n.saturating_sub(n0));
        // A kernel's panel is at most 32 columns wide: its scales stay on the stack.
        let (mut s_small, mut z_small) = ([0f32; 32], [0f32; 32]);
        let (mut s_big, mut z_big) = (Vec::new(), Vec::new());
        let (s, z) = if nw <= 32 {
            (&mut s_small[..nw], &mut z_small[..nw])
        } else {
            s_big.resize(nw, 0.0);
            z_big.resize(nw, 0.0);
            (&mut s_big[..], &mut z_big[..])
        };
        for (i, j) in (n0..n0 + nw).enumerate() {
            (s[i], z[i]) = self.column(j);
        }
        let rows = Rows {
            first: k0 * self.n + n0,
            stride: self.n,
            kc,
            nr,
        };
        match self.q {
            Codes::I8(q) => scale_rows(q, rows, s, z, true, out),
            Codes::U8(q) => scale_rows(q, rows, s, z, true, out),
        }
    }
}

/// Columns per block of [`Int8Blocked`]: a multiple of every kernel's panel width.
const BLOCK_COLS: usize = 32;

/// An 8-bit weight [`Int8Cols`] re-laid once, at load, in blocks of 32 columns: block `b` holds rows
/// `0..K` of columns `32b..32b + 32` one after the other. A panel then lies in consecutive bytes
/// whatever `N` is; in the row-major layout each of its rows is `N` bytes from the last, which for a
/// wide weight (a classifier's 8210 columns) defeats the hardware prefetcher. Same bytes per weight
/// (the last block is padded to 32 columns).
pub struct Int8Blocked {
    codes: BlockedCodes,
    k: usize,
    n: usize,
    scales: Vec<f32>,
    zero: Vec<f32>,
}

enum BlockedCodes {
    I8(Vec<i8>),
    U8(Vec<u8>),
}

/// Where `W[r, c]` lies in a weight blocked by [`BLOCK_COLS`] columns with `k` rows.
fn blocked_at(k: usize, r: usize, c: usize) -> usize {
    ((c / BLOCK_COLS) * k + r) * BLOCK_COLS + c % BLOCK_COLS
}

fn relay<T: Copy + Default>(q: &[T], k: usize, n: usize) -> Vec<T> {
    let mut out = vec![T::default(); n.div_ceil(BLOCK_COLS) * k * BLOCK_COLS];
    if n == 0 {
        return out;
    }
    for (r, row) in q.chunks_exact(n).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[blocked_at(k, r, c)] = v;
        }
    }
    out
}

impl Int8Blocked {
    pub fn from_cols(w: &Int8Cols) -> Int8Blocked {
        let (k, n) = (w.k, w.n);
        let codes = match w.q {
            Codes::I8(q) => BlockedCodes::I8(relay(q, k, n)),
            Codes::U8(q) => BlockedCodes::U8(relay(q, k, n)),
        };
        let (scales, zero) = (0..n).map(|j| w.column(j)).unzip();
        Int8Blocked {
            codes,
            k,
            n,
            scales,
            zero,
        }
    }

    pub fn bytes(&self) -> usize {
        let codes = match &self.codes {
            BlockedCodes::I8(c) => c.len(),
            BlockedCodes::U8(c) => c.len(),
        };
        codes + 4 * (self.scales.len() + self.zero.len())
    }
}

impl std::fmt::Debug for Int8Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Int8Blocked({}×{})", self.k, self.n)
    }
}

impl Panels for Int8Blocked {
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn few_rows(&self, isa: Isa, a: &[f32], m: usize, c: &mut [f32]) -> bool {
        self.few_rows_x86(isa, a, m, c)
    }
    fn decode(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        self.decode_with(k0, kc, n0, nr, true, out)
    }
    fn column_scales(&self) -> Option<&[f32]> {
        Some(&self.scales)
    }
    fn decode_unscaled(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        self.decode_with(k0, kc, n0, nr, false, out)
    }
}

impl Int8Blocked {
    /// The panel of `W` (`scaled`), or of `q − z` for the product to scale afterwards.
    fn decode_with(
        &self,
        k0: usize,
        kc: usize,
        n0: usize,
        nr: usize,
        scaled: bool,
        out: &mut [f32],
    ) {
        let nw = nr.min(self.n.saturating_sub(n0));
        let (s, z) = (&self.scales[n0..n0 + nw], &self.zero[n0..n0 + nw]);
        if n0 % BLOCK_COLS + nr <= BLOCK_COLS {
            // The kernels' panels: inside one block, rows 32 bytes apart.
            let rows = Rows {
                first: blocked_at(self.k, k0, n0),
                stride: BLOCK_COLS,
                kc,
                nr,
            };
            match &self.codes {
                BlockedCodes::I8(q) => scale_rows(q, rows, s, z, scaled, out),
                BlockedCodes::U8(q) => scale_rows(q, rows, s, z, scaled, out),
            }
            return;
        }
        for r in 0..kc {
            for j in 0..nr {
                out[r * nr + j] = if j < nw {
                    let at = blocked_at(self.k, k0 + r, n0 + j);
                    let q = match &self.codes {
                        BlockedCodes::I8(q) => q[at] as f32,
                        BlockedCodes::U8(q) => q[at] as f32,
                    };
                    if scaled { (q - z[j]) * s[j] } else { q - z[j] }
                } else {
                    0.0
                };
            }
        }
    }
}

/// Rows of A up to which [`Int8Blocked`] multiplies without panels (AVX2 and up), two rows at a time.
/// Measured with `cargo bench --bench kernels` (AVX2, K × N = 256 × 1024), against the panels: 2.1×
/// as fast at 1 row, 1.7–2.0× at 2, 1.01–1.04× at 3 and 4, even or behind from 5. (A three-row kernel
/// spills registers and was no faster than two plus one.)
const FEW_ROWS: usize = 4;

impl Int8Blocked {
    /// `c[m, N] = a[m, K] · W` decoding each block's codes straight into registers, two rows of A at a
    /// time; the column scales multiply the finished sums. `false` when this CPU or `m` is not one the
    /// kernel is for.
    fn few_rows_x86(&self, isa: Isa, a: &[f32], m: usize, c: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            if isa == Isa::Portable
                || m > FEW_ROWS
                || !std::arch::is_x86_feature_detected!("avx2")
                || !std::arch::is_x86_feature_detected!("fma")
            {
                return false;
            }
            let (k, n) = (self.k, self.n);
            let symmetric = self.zero.iter().all(|&z| z == 0.0);
            let mut zero = [0f32; BLOCK_COLS];
            let mut out = [[0f32; BLOCK_COLS]; 2];
            for b in 0..n.div_ceil(BLOCK_COLS) {
                let n0 = b * BLOCK_COLS;
                let nw = BLOCK_COLS.min(n - n0);
                zero[..nw].copy_from_slice(&self.zero[n0..n0 + nw]);
                let z = (!symmetric).then_some(&zero);
                let span = b * k * BLOCK_COLS..(b + 1) * k * BLOCK_COLS;
                let mut i = 0;
                while i < m {
                    let rows = (m - i).min(2);
                    let row = |r: usize| &a[(i + r) * k..(i + r + 1) * k];
                    macro_rules! run {
                        ($signed:literal, $q:expr) => {{
                            let q = $q[span.clone()].as_ptr().cast::<u8>();
                            // SAFETY: AVX2 and FMA were detected; the block holds `k` rows of 32
                            // codes and each row of A `k` values.
                            unsafe {
                                match rows {
                                    1 => few::block::<1, 2, $signed>(q, k, [row(0)], z, &mut out),
                                    _ => few::block::<2, 1, $signed>(
                                        q,
                                        k,
                                        [row(0), row(1)],
                                        z,
                                        &mut out,
                                    ),
                                }
                            }
                        }};
                    }
                    match &self.codes {
                        BlockedCodes::I8(q) => run!(true, q),
                        BlockedCodes::U8(q) => run!(false, q),
                    }
                    for (r, sums) in out.iter().enumerate().take(rows) {
                        let dst = &mut c[(i + r) * n + n0..(i + r) * n + n0 + nw];
                        for ((d, v), s) in dst.iter_mut().zip(sums).zip(&self.scales[n0..]) {
                            *d = v * s;
                        }
                    }
                    i += rows;
                }
            }
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, a, m, c);
            false
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod few {
    use std::arch::x86_64::*;

    /// `out[i][j] = Σ_r rows[i][r] · (q[r · 32 + j] − zero[j])` over one block of 32 columns: each
    /// row's 32 codes are widened to i32 and converted in four ymm registers, which every row of A
    /// multiplies. `P` rows of K are in flight at once, each into its own accumulators, so that
    /// `4 · R · P` independent FMA chains hide the FMA's latency (one row of A alone has only four).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `q` must point at `k · 32` codes and each row hold `k` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block<const R: usize, const P: usize, const SIGNED: bool>(
        q: *const u8,
        k: usize,
        rows: [&[f32]; R],
        zero: Option<&[f32; 32]>,
        out: &mut [[f32; 32]; 2],
    ) {
        debug_assert!(R <= 2 && rows.iter().all(|r| r.len() >= k));
        let mut acc = [[[_mm256_setzero_ps(); 4]; P]; R];
        let mut z = [_mm256_setzero_ps(); 4];
        if let Some(zero) = zero {
            for (t, z) in z.iter_mut().enumerate() {
                // SAFETY: t · 8 + 7 < 32.
                *z = unsafe { _mm256_loadu_ps(zero.as_ptr().add(8 * t)) };
            }
        }
        // SAFETY: the caller's bounds; every r passed is below k.
        let weight = |r: usize, t: usize| unsafe {
            let b = _mm_loadl_epi64(q.add(r * 32 + 8 * t).cast());
            let wide = if SIGNED {
                _mm256_cvtepi8_epi32(b)
            } else {
                _mm256_cvtepu8_epi32(b)
            };
            let w = _mm256_cvtepi32_ps(wide);
            if zero.is_some() {
                _mm256_sub_ps(w, z[t])
            } else {
                w
            }
        };
        // SAFETY: r < k ≤ rows[i].len().
        let x = |i: usize, r: usize| unsafe { _mm256_set1_ps(*rows[i].get_unchecked(r)) };
        let whole = k / P * P;
        for r0 in (0..whole).step_by(P) {
            for t in 0..4 {
                for p in 0..P {
                    let w = weight(r0 + p, t);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        acc[p][t] = _mm256_fmadd_ps(x(i, r0 + p), w, acc[p][t]);
                    }
                }
            }
        }
        for r in whole..k {
            for t in 0..4 {
                let w = weight(r, t);
                for (i, acc) in acc.iter_mut().enumerate() {
                    acc[0][t] = _mm256_fmadd_ps(x(i, r), w, acc[0][t]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for t in 0..4 {
                let mut sum = acc[0][t];
                for part in &acc[1..] {
                    sum = _mm256_add_ps(sum, part[t]);
                }
                // SAFETY: t · 8 + 7 < 32.
                unsafe { _mm256_storeu_ps(out[i].as_mut_ptr().add(8 * t), sum) };
            }
        }
    }
}

/// Where a panel's rows lie in a row-major code matrix.
#[derive(Clone, Copy)]
struct Rows {
    first: usize,
    stride: usize,
    kc: usize,
    nr: usize,
}

/// `out[r · nr + j] = (q[first + r · stride + j] − z[j]) · s[j]` (without `· s[j]` unless `scaled`) for
/// `j < s.len()`, zero after; compiled
/// for the widest vectors the CPU has.
fn scale_rows<T: Copy + Into<f32>>(
    q: &[T],
    at: Rows,
    s: &[f32],
    z: &[f32],
    scaled: bool,
    out: &mut [f32],
) {
    /// A full panel of `W` columns: fixed-size rows the compiler vectorises at full width (a runtime
    /// width of 16 was vectorised 4 lanes at a time), with no zero-point subtraction when every zero
    /// point is 0.
    #[inline(always)]
    fn fixed<T: Copy + Into<f32>, const W: usize, const ZERO: bool, const SCALED: bool>(
        q: &[T],
        at: Rows,
        s: &[f32; W],
        z: &[f32; W],
        out: &mut [f32],
    ) {
        for r in 0..at.kc {
            let row = at.first + r * at.stride;
            let q: &[T; W] = q[row..row + W].try_into().unwrap();
            let o: &mut [f32; W] = (&mut out[r * at.nr..r * at.nr + W]).try_into().unwrap();
            for j in 0..W {
                let v = if ZERO {
                    q[j].into() - z[j]
                } else {
                    q[j].into()
                };
                o[j] = if SCALED { v * s[j] } else { v };
            }
        }
    }
    #[inline(always)]
    fn body<T: Copy + Into<f32>>(
        q: &[T],
        at: Rows,
        s: &[f32],
        z: &[f32],
        scaled: bool,
        out: &mut [f32],
    ) {
        let nw = s.len().min(z.len());
        if nw == at.nr {
            let zero = z.iter().any(|&v| v != 0.0);
            macro_rules! full {
                ($w:literal) => {{
                    let (s, z) = (s.try_into().unwrap(), z.try_into().unwrap());
                    return match (zero, scaled) {
                        (true, true) => fixed::<T, $w, true, true>(q, at, s, z, out),
                        (true, false) => fixed::<T, $w, true, false>(q, at, s, z, out),
                        (false, true) => fixed::<T, $w, false, true>(q, at, s, z, out),
                        (false, false) => fixed::<T, $w, false, false>(q, at, s, z, out),
                    };
                }};
            }
            match nw {
                8 => full!(8),
                16 => full!(16),
                32 => full!(32),
                _ => {}
            }
        }
        for r in 0..at.kc {
            let row = at.first + r * at.stride;
            let (q, o) = (&q[row..row + nw], &mut out[r * at.nr..(r + 1) * at.nr]);
            let (head, tail) = o.split_at_mut(nw);
            for j in 0..nw {
                let v = q[j].into() - z[j];
                head[j] = if scaled { v * s[j] } else { v };
            }
            tail.fill(0.0);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn wide<T: Copy + Into<f32>>(
            q: &[T],
            at: Rows,
            s: &[f32],
            z: &[f32],
            sc: bool,
            out: &mut [f32],
        ) {
            body(q, at, s, z, sc, out)
        }
        #[target_feature(enable = "avx2")]
        fn mid<T: Copy + Into<f32>>(
            q: &[T],
            at: Rows,
            s: &[f32],
            z: &[f32],
            sc: bool,
            out: &mut [f32],
        ) {
            body(q, at, s, z, sc, out)
        }
        // Isa::detect() names a family only on a CPU that has it (and may be capped lower).
        if Isa::detect() == Isa::Avx512 {
            // SAFETY: the feature was detected.
            return unsafe { wide(q, at, s, z, scaled, out) };
        }
        if Isa::detect() != Isa::Portable && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was detected.
            return unsafe { mid(q, at, s, z, scaled, out) };
        }
    }
    body(q, at, s, z, scaled, out)
}

/// com.microsoft `MatMulNBits`: `B[N, blocks, blob]` holds `bits`-bit codes (low bits first) of `W^T`,
/// with one scale per (column, block) and optional packed zero points (default `2^(bits-1)`):
/// `W[k, n] = (code - zp) · scale`.
pub struct NBits<'a> {
    b: &'a [u8],
    scales: &'a [f32],
    zero: Option<&'a [u8]>,
    k: usize,
    n: usize,
    bits: usize,
    block: usize,
}

impl<'a> NBits<'a> {
    pub fn new(
        b: &'a [u8],
        scales: &'a [f32],
        zero: Option<&'a [u8]>,
        k: usize,
        n: usize,
        bits: usize,
        block: usize,
    ) -> Result<Self, String> {
        if ![2, 4, 8].contains(&bits) {
            return Err(format!("{bits}-bit codes (2, 4 or 8 are read)"));
        }
        if block == 0 || !(block * bits).is_multiple_of(8) {
            return Err(format!("block size {block} does not fill whole bytes"));
        }
        let blocks = k.div_ceil(block);
        let blob = block * bits / 8;
        if b.len() != n * blocks * blob {
            return Err(format!(
                "B holds {} bytes, not {n}×{blocks}×{blob}",
                b.len()
            ));
        }
        if scales.len() != n * blocks {
            return Err(format!("{} scales for {n}×{blocks} blocks", scales.len()));
        }
        let per_byte = 8 / bits;
        if let Some(z) = zero
            && z.len() != n * blocks.div_ceil(per_byte)
        {
            return Err(format!("{} zero-point bytes", z.len()));
        }
        Ok(NBits {
            b,
            scales,
            zero,
            k,
            n,
            bits,
            block,
        })
    }
}

impl NBits<'_> {
    pub fn bits(&self) -> usize {
        self.bits
    }

    pub fn block(&self) -> usize {
        self.block
    }

    /// The scale of column `col`'s block `blk`.
    pub fn scale(&self, col: usize, blk: usize) -> f32 {
        self.scales[col * self.k.div_ceil(self.block) + blk]
    }

    /// The zero point of column `col`'s block `blk` (`2^(bits-1)` when the model gives none).
    pub fn zero_point(&self, col: usize, blk: usize) -> u8 {
        let per_byte = 8 / self.bits;
        match self.zero {
            Some(zp) => {
                let byte =
                    zp[col * self.k.div_ceil(self.block).div_ceil(per_byte) + blk / per_byte];
                (byte >> (self.bits * (blk % per_byte))) & ((1u16 << self.bits) - 1) as u8
            }
            None => 1 << (self.bits - 1),
        }
    }

    /// The code of `W[kk, col]`.
    pub fn code(&self, kk: usize, col: usize) -> u8 {
        let per_byte = 8 / self.bits;
        let blob = self.block / per_byte;
        let (blk, i) = (kk / self.block, kk % self.block);
        let byte = self.b[(col * self.k.div_ceil(self.block) + blk) * blob + i / per_byte];
        (byte >> (self.bits * (i % per_byte))) & ((1u16 << self.bits) - 1) as u8
    }
}

impl Panels for NBits<'_> {
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn decode(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        let blocks = self.k.div_ceil(self.block);
        let per_byte = 8 / self.bits;
        let blob = self.block / per_byte;
        let mask = (1u32 << self.bits) - 1;
        let nw = nr.min(self.n.saturating_sub(n0));
        for j in 0..nw {
            let col = n0 + j;
            let codes = &self.b[col * blocks * blob..(col + 1) * blocks * blob];
            let mut r = 0;
            while r < kc {
                let kk = k0 + r;
                let blk = kk / self.block;
                let (s, z) = (self.scale(col, blk), self.zero_point(col, blk) as i32);
                let end = kc.min((blk + 1) * self.block - k0);
                for r in r..end {
                    let i = k0 + r - blk * self.block;
                    let byte = codes[blk * blob + i / per_byte] as u32;
                    let code = ((byte >> (self.bits * (i % per_byte))) & mask) as i32;
                    out[r * nr + j] = (code - z) as f32 * s;
                }
                r = end;
            }
        }
        if nw < nr {
            for r in 0..kc {
                out[r * nr + nw..(r + 1) * nr].fill(0.0);
            }
        }
    }
}

/// Vector-quantised weight: per stage, `codes[piece, N]` (laid along K: the file's
/// `[N, subspaces, pieces]` transposed, so that a panel's codes for one piece are contiguous) index a
/// codebook of `dim`-long pieces (subspace `s` reads rows `s · size ..` of the stacked codebook); the
/// stages add; each output column is scaled. `W[k, n] = scale[n] · Σ_stage book[code(piece of k, n)]
/// [k mod dim]`, over the first `K` of the `K padded` decoded values of a column.
pub struct Codebook<'a> {
    pub stages: Vec<(CodeSlice<'a>, &'a [f32])>,
    pub scales: &'a [f32],
    pub k: usize,
    pub n: usize,
    pub k_padded: usize,
    pub dim: usize,
    pub subspaces: usize,
    /// Rows of one subspace's codebook (`size`), or 0 when the codes already index the stacked book.
    pub size: usize,
}

/// 8- or 16-bit codes.
#[derive(Clone, Copy, Debug)]
pub enum CodeSlice<'a> {
    U8(&'a [u8]),
    U16(&'a [u16]),
}

impl CodeSlice<'_> {
    pub fn get(&self, i: usize) -> usize {
        match self {
            CodeSlice::U8(c) => c[i] as usize,
            CodeSlice::U16(c) => c[i] as usize,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            CodeSlice::U8(c) => c.len(),
            CodeSlice::U16(c) => c.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Codebook<'_> {
    /// Checks that every stage's codes and codebook fit the shapes.
    pub fn check(&self) -> Result<(), String> {
        let pieces = self.k_padded / self.dim.max(1);
        if self.dim == 0 || !self.k_padded.is_multiple_of(self.dim) || self.k > self.k_padded {
            return Err(format!(
                "pieces of {} do not tile {} (K {})",
                self.dim, self.k_padded, self.k
            ));
        }
        if self.subspaces == 0 || !pieces.is_multiple_of(self.subspaces) {
            return Err(format!("{} subspaces over {pieces} pieces", self.subspaces));
        }
        if self.scales.len() != self.n {
            return Err(format!(
                "{} scales for {} columns",
                self.scales.len(),
                self.n
            ));
        }
        for (i, (codes, book)) in self.stages.iter().enumerate() {
            if codes.len() != self.n * pieces {
                return Err(format!(
                    "stage {i}: {} codes for {pieces}×{}",
                    codes.len(),
                    self.n
                ));
            }
            if book.len() % self.dim != 0 {
                return Err(format!("stage {i}: codebook of {} values", book.len()));
            }
            let rows = book.len() / self.dim;
            let offset = if self.size > 0 {
                self.size * (self.subspaces - 1)
            } else {
                0
            };
            let max = (0..codes.len()).map(|c| codes.get(c)).max().unwrap_or(0);
            if max + offset >= rows {
                return Err(format!(
                    "stage {i}: code {max} past a codebook of {rows} rows"
                ));
            }
        }
        Ok(())
    }
}

impl Panels for Codebook<'_> {
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn decode(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        #[inline(always)]
        fn body(w: &Codebook, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
            w.decode_rows(k0, kc, n0, nr, true, out)
        }
        for_cpu!(body(w: &Codebook = self, k0: usize = k0, kc: usize = kc, n0: usize = n0, nr: usize = nr, out: &mut [f32] = out) -> ())
    }
    fn column_scales(&self) -> Option<&[f32]> {
        Some(self.scales)
    }
    fn decode_unscaled(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        #[inline(always)]
        fn body(w: &Codebook, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
            w.decode_rows(k0, kc, n0, nr, false, out)
        }
        for_cpu!(body(w: &Codebook = self, k0: usize = k0, kc: usize = kc, n0: usize = n0, nr: usize = nr, out: &mut [f32] = out) -> ())
    }
}

impl Codebook<'_> {
    /// The panel a row of K at a time: for each piece, the codebook row of every column is looked up
    /// once per stage, then each of the piece's rows of K is a contiguous run of `nw` stores (gathered
    /// from the codebook, which is small enough to stay in L1).
    #[inline(always)]
    fn decode_rows(
        &self,
        k0: usize,
        kc: usize,
        n0: usize,
        nr: usize,
        scaled: bool,
        out: &mut [f32],
    ) {
        let dim = self.dim;
        let pieces = self.k_padded / dim;
        let pps = pieces / self.subspaces;
        let nw = nr.min(self.n.saturating_sub(n0));
        let scales = &self.scales[n0..n0 + nw];
        // Whole panels of 4-value pieces take the transposing path, on CPUs (and under the
        // `QUENCH_KERNELS` cap) that run AVX2; decided once per panel, not per piece.
        #[cfg(target_arch = "x86_64")]
        let quads = dim == 4
            && nw == nr
            && nr.is_multiple_of(8)
            && Isa::detect() != Isa::Portable
            && std::arch::is_x86_feature_detected!("avx2");
        for p in k0 / dim..(k0 + kc).div_ceil(dim) {
            // The piece's rows of K that fall in the panel.
            let d_lo = k0.saturating_sub(p * dim);
            let d_hi = (k0 + kc - p * dim).min(dim);
            let offset = if self.size > 0 {
                (p / pps) * self.size
            } else {
                0
            };
            for (stage, (codes, book)) in self.stages.iter().enumerate() {
                // The piece's codebook, and its codes of the panel's columns (contiguous along N).
                let book = &book[(offset * dim).min(book.len())..];
                let at = p * self.n + n0;
                let o = &mut out[(p * dim + d_lo - k0) * nr..];
                match codes {
                    CodeSlice::U8(c) => {
                        #[cfg(target_arch = "x86_64")]
                        let quads = quads && d_lo == 0 && d_hi == 4;
                        #[cfg(not(target_arch = "x86_64"))]
                        let quads = false;
                        piece(
                            book,
                            &c[at..at + nw],
                            dim,
                            d_lo..d_hi,
                            nr,
                            stage > 0,
                            quads,
                            o,
                        )
                    }
                    CodeSlice::U16(c) => piece(
                        book,
                        &c[at..at + nw],
                        dim,
                        d_lo..d_hi,
                        nr,
                        stage > 0,
                        false,
                        o,
                    ),
                }
            }
        }
        for row in out[..kc * nr].chunks_exact_mut(nr) {
            if scaled {
                for (o, s) in row.iter_mut().zip(scales) {
                    *o *= s;
                }
            }
            row[nw..].fill(0.0);
        }
    }
}

/// Rows `ds` of one piece of a codebook panel, `out[(d − ds.start) · nr + j] (+)= book[codes[j] · dim +
/// d]` (added when `add`); through the transposing path when `quads` (4-value pieces, whole runs of 8
/// columns, AVX2 detected by the caller).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn piece<C: Copy + Into<usize> + Ord + Default>(
    book: &[f32],
    codes: &[C],
    dim: usize,
    ds: std::ops::Range<usize>,
    nr: usize,
    add: bool,
    quads: bool,
    out: &mut [f32],
) {
    // Every code must name a row of the book: true of every value of the type when the book has that
    // many rows (8-bit codes into 256 rows, vq2's case), else checked on the largest.
    let rows = book.len() / dim;
    let named = 1usize << (8 * std::mem::size_of::<C>());
    assert!(
        rows >= named || codes.iter().copied().max().unwrap_or_default().into() < rows,
        "code past the end of its codebook"
    );
    #[cfg(target_arch = "x86_64")]
    if quads {
        debug_assert!(dim == 4 && ds == (0..4));
        // SAFETY: AVX2 was detected (the caller's `quads`); every code names a row of 4 values of
        // `book` (asserted above); codes and out's 4 rows hold nr values, a multiple of 8.
        unsafe { quads::rows_of_four(book, codes, nr, add, out) };
        return;
    }
    let _ = quads;
    for (r, d) in ds.enumerate() {
        let o = &mut out[r * nr..][..codes.len()];
        let book = &book[d..];
        // SAFETY: code · dim + d < rows · dim ≤ book.len() + d (asserted above).
        let at = |c: C| unsafe { *book.get_unchecked(c.into() * dim) };
        if add {
            for (o, &c) in o.iter_mut().zip(codes) {
                *o += at(c);
            }
        } else {
            for (o, &c) in o.iter_mut().zip(codes) {
                *o = at(c);
            }
        }
    }
}

/// Codebook pieces of 4 values, 8 columns at a time: each column's piece is one 16-byte load, and a
/// 4 × 8 transpose in registers turns the 8 pieces into the panel's 4 rows.
#[cfg(target_arch = "x86_64")]
mod quads {
    use std::arch::x86_64::*;

    /// `out[d · nr + j] (+)= book[4 · codes[j] + d]` for `d < 4`, `j < nr` (added when `add`).
    ///
    /// # Safety
    /// The CPU must have AVX2; `4 · codes[j] + 4 ≤ book.len()` for every `j`; `codes` and each of the 4
    /// rows of `out` hold `nr` values, `nr` a multiple of 8.
    #[target_feature(enable = "avx2")]
    pub unsafe fn rows_of_four<C: Copy + Into<usize>>(
        book: &[f32],
        codes: &[C],
        nr: usize,
        add: bool,
        out: &mut [f32],
    ) {
        debug_assert!(nr.is_multiple_of(8) && codes.len() >= nr && out.len() >= 4 * nr);
        let b = book.as_ptr();
        let o = out.as_mut_ptr();
        for j in (0..nr).step_by(8) {
            // SAFETY: the caller's bounds.
            unsafe {
                let piece = |i: usize| {
                    let c: usize = (*codes.get_unchecked(j + i)).into();
                    _mm_loadu_ps(b.add(4 * c))
                };
                let pair = |lo: usize, hi: usize| {
                    _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(piece(lo)), piece(hi))
                };
                let (t0, t1, t2, t3) = (pair(0, 4), pair(1, 5), pair(2, 6), pair(3, 7));
                let (u0, u1) = (_mm256_unpacklo_ps(t0, t1), _mm256_unpackhi_ps(t0, t1));
                let (u2, u3) = (_mm256_unpacklo_ps(t2, t3), _mm256_unpackhi_ps(t2, t3));
                let d = [
                    _mm256_shuffle_ps::<0x44>(u0, u2),
                    _mm256_shuffle_ps::<0xEE>(u0, u2),
                    _mm256_shuffle_ps::<0x44>(u1, u3),
                    _mm256_shuffle_ps::<0xEE>(u1, u3),
                ];
                for (r, v) in d.into_iter().enumerate() {
                    let at = o.add(r * nr + j);
                    let v = if add {
                        _mm256_add_ps(_mm256_loadu_ps(at), v)
                    } else {
                        v
                    };
                    _mm256_storeu_ps(at, v);
                }
            }
        }
    }
}

/// [`NBits`] codes laid out along K for panel decoding: row `k` holds the codes of every column, two to a
/// byte, in groups of 32 columns in 16 bytes: byte `i` of group `g` holds column `32g + i` in its low
/// bits and column `32g + 16 + i` in its high bits. A run of up to 16 columns is then one shift of 16
/// contiguous bytes, which vectorises. The scales and zero points become `[blocks, N]` rows. Same size
/// as the MatMulNBits B it is made from (4-bit codes; a ragged last group is padded).
pub struct NibblesK {
    codes: Vec<u8>,
    scales: Vec<f32>,
    zero: Vec<f32>,
    k: usize,
    n: usize,
    block: usize,
}

impl std::fmt::Debug for NibblesK {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NibblesK({}×{}, block {})", self.k, self.n, self.block)
    }
}

impl NibblesK {
    /// Re-lays 4-bit `MatMulNBits` codes; None for other widths.
    pub fn from_nbits(w: &NBits) -> Option<NibblesK> {
        if w.bits != 4 {
            return None;
        }
        let (k, n, block) = (w.k, w.n, w.block);
        let blocks = k.div_ceil(block);
        let row = Self::row_bytes(n);
        let mut codes = vec![0u8; k * row];
        for col in 0..n {
            let (at, shift) = Self::place(col);
            for kk in 0..k {
                codes[kk * row + at] |= w.code(kk, col) << shift;
            }
        }
        let mut scales = vec![0f32; blocks * n];
        let mut zero = vec![0f32; blocks * n];
        for col in 0..n {
            for blk in 0..blocks {
                scales[blk * n + col] = w.scale(col, blk);
                zero[blk * n + col] = w.zero_point(col, blk) as f32;
            }
        }
        Some(NibblesK {
            codes,
            scales,
            zero,
            k,
            n,
            block,
        })
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scales.len() + self.zero.len())
    }

    /// Bytes of one row of K: whole groups of 32 columns.
    fn row_bytes(n: usize) -> usize {
        n.div_ceil(32) * 16
    }

    /// The byte of a row holding `col`, and the shift of its 4 bits.
    fn place(col: usize) -> (usize, u32) {
        let (g, i) = (col / 32, col % 32);
        (g * 16 + i % 16, 4 * (i / 16) as u32)
    }
}

impl Panels for NibblesK {
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn decode(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        #[inline(always)]
        fn body(w: &NibblesK, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
            let nw = nr.min(w.n.saturating_sub(n0));
            let row = NibblesK::row_bytes(w.n);
            if nw == nr && nr.is_multiple_of(16) && n0.is_multiple_of(16) {
                // Whole runs of 16 columns: fixed-size loops the compiler vectorises at full width
                // (a runtime run length was vectorised a quarter as wide).
                for r in 0..kc {
                    let kk = k0 + r;
                    let blk = kk / w.block;
                    let codes = &w.codes[kk * row..(kk + 1) * row];
                    for run in 0..nr / 16 {
                        let c0 = n0 + 16 * run;
                        let (at, shift) = NibblesK::place(c0);
                        let bytes: &[u8; 16] = codes[at..at + 16].try_into().unwrap();
                        let s: &[f32; 16] = w.scales[blk * w.n + c0..][..16].try_into().unwrap();
                        let z: &[f32; 16] = w.zero[blk * w.n + c0..][..16].try_into().unwrap();
                        let o: &mut [f32; 16] =
                            (&mut out[r * nr + 16 * run..][..16]).try_into().unwrap();
                        for j in 0..16 {
                            o[j] = (((bytes[j] >> shift) & 15) as f32 - z[j]) * s[j];
                        }
                    }
                }
                return;
            }
            for r in 0..kc {
                let kk = k0 + r;
                let blk = kk / w.block;
                let s = &w.scales[blk * w.n + n0..blk * w.n + n0 + nw];
                let z = &w.zero[blk * w.n + n0..blk * w.n + n0 + nw];
                let codes = &w.codes[kk * row..(kk + 1) * row];
                let o = &mut out[r * nr..(r + 1) * nr];
                // Runs of columns that share one half of a group: contiguous bytes, one shift.
                let mut j = 0;
                while j < nw {
                    let (at, shift) = NibblesK::place(n0 + j);
                    let len = (16 - (n0 + j) % 16).min(nw - j);
                    let bytes = &codes[at..at + len];
                    for (((o, &b), &z), &s) in o[j..j + len]
                        .iter_mut()
                        .zip(bytes)
                        .zip(&z[j..])
                        .zip(&s[j..])
                    {
                        *o = (((b >> shift) & 15) as f32 - z) * s;
                    }
                    j += len;
                }
                o[nw..].fill(0.0);
            }
        }
        for_cpu!(body(w: &NibblesK = self, k0: usize = k0, kc: usize = kc, n0: usize = n0, nr: usize = nr, out: &mut [f32] = out) -> ())
    }
}
