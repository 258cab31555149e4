//! Exact integer matrix products: `C[M, N] = (A − a₀) · (B − b₀)` in i32, with `A` u8 or i8 (the
//! activations, quantized at run time) and `B` a constant 8-bit weight packed once, at load. This is
//! what ONNX `MatMulInteger` computes, bit for bit.
//!
//! The products run on 8-bit operands: AVX-512 VNNI and AVX-VNNI `vpdpbusd` add four u8 × i8 products
//! into each i32 lane (without saturation, so the sum is exact), which is four times the multiply-adds
//! per instruction of an f32 FMA. Without VNNI, AVX2 widens both operands to i16 and `vpmaddwd` adds
//! two products per lane, again exactly (`vpmaddubsw`, which saturates in 16 bits, is not used). The
//! portable kernel does the same arithmetic in scalar code.
//!
//! Signed activations are shifted to unsigned (`a + 128`, and the zero point with them), unsigned
//! weights to signed (`b − 128`); the differences `a − a₀` and `b − b₀` do not change. Zero points are
//! applied after the product, through row and column sums:
//! `Σ(a − a₀)(b − b₀) = Σab − a₀Σb − b₀Σa + K·a₀·b₀`, with i32 wrapping arithmetic as ONNX specifies.

/// The integer kernel family this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IntIsa {
    /// AVX-512 VNNI: 12 rows × 32 columns, four rows of `K` per instruction.
    Avx512Vnni,
    /// AVX-VNNI (256-bit): 6 rows × 16 columns.
    AvxVnni,
    /// AVX2 `vpmaddwd` on widened operands: 6 rows × 16 columns, two rows of `K` per instruction.
    Avx2,
    /// Scalar code in the AVX2 layout.
    Portable,
}

/// How a weight is packed: panels of `nr` columns; within a panel, groups of `group` rows of `K`;
/// within a group, each column's `group` values side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub nr: usize,
    pub group: usize,
}

impl IntIsa {
    /// The best family this CPU supports (detected once), or a lesser one named by `QUENCH_KERNELS`
    /// (`avx2` or `portable`; see [`super::Isa::detect`]).
    pub fn detect() -> IntIsa {
        static BEST: std::sync::OnceLock<IntIsa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let all = IntIsa::available();
            let wanted = match super::capped_to().as_deref() {
                Some("avx2") => Some(IntIsa::Avx2),
                Some("portable") => Some(IntIsa::Portable),
                _ => None,
            };
            wanted.filter(|w| all.contains(w)).unwrap_or(all[0])
        })
    }

    /// Every family this CPU can run, the best first.
    pub fn available() -> Vec<IntIsa> {
        [
            IntIsa::Avx512Vnni,
            IntIsa::AvxVnni,
            IntIsa::Avx2,
            IntIsa::Portable,
        ]
        .into_iter()
        .filter(|i| i.supported())
        .collect()
    }

    fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                IntIsa::Avx512Vnni => has!("avx512f") && has!("avx512vnni"),
                IntIsa::AvxVnni => has!("avx2") && has!("avxvnni"),
                IntIsa::Avx2 => has!("avx2"),
                IntIsa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == IntIsa::Portable
        }
    }

    /// The packing this family's kernels read.
    pub fn layout(self) -> Layout {
        match self {
            IntIsa::Avx512Vnni => Layout { nr: 32, group: 4 },
            IntIsa::AvxVnni => Layout { nr: 16, group: 4 },
            IntIsa::Avx2 | IntIsa::Portable => Layout { nr: 16, group: 2 },
        }
    }

    fn rows(self) -> usize {
        match self {
            IntIsa::Avx512Vnni => 12,
            IntIsa::AvxVnni | IntIsa::Avx2 => 6,
            IntIsa::Portable => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            IntIsa::Avx512Vnni => "avx512-vnni",
            IntIsa::AvxVnni => "avx-vnni",
            IntIsa::Avx2 => "avx2",
            IntIsa::Portable => "portable",
        }
    }

    /// Whether [`matmul_f32`]'s three limbs take fewer instructions than an f32 product: with VNNI
    /// (four products per lane), not with `vpmaddwd` (two) or scalar code.
    pub fn limbs_pay(self) -> bool {
        matches!(self, IntIsa::Avx512Vnni | IntIsa::AvxVnni)
    }

    /// Whether an 8-bit product outruns the f32 one on its own: with VNNI (four products per lane),
    /// not with `vpmaddwd` (two, as many as the f32 FMA's one per lane of half the width) or scalar
    /// code.
    pub fn int8_outruns_f32(self) -> bool {
        matches!(self, IntIsa::Avx512Vnni | IntIsa::AvxVnni)
    }

    /// The family whose kernels read `layout` best on this CPU, if any does.
    pub fn for_layout(layout: Layout) -> Option<IntIsa> {
        IntIsa::available()
            .into_iter()
            .find(|i| i.layout() == layout)
    }
}

impl Layout {
    /// `K` rounded up to whole groups.
    pub fn k_padded(self, k: usize) -> usize {
        k.div_ceil(self.group) * self.group
    }

    /// Values in a packed `K × N` weight.
    pub fn packed_len(self, k: usize, n: usize) -> usize {
        self.k_padded(k) * n.div_ceil(self.nr) * self.nr
    }
}

/// An 8-bit weight `B[K, N]`, row-major, as stored in a model.
#[derive(Clone, Copy, Debug)]
pub enum Weight<'a> {
    I8(&'a [i8]),
    U8(&'a [u8]),
}

impl Weight<'_> {
    fn len(&self) -> usize {
        match self {
            Weight::I8(v) => v.len(),
            Weight::U8(v) => v.len(),
        }
    }

    /// The value at `i`, as i8 (u8 shifted by −128).
    fn get(&self, i: usize) -> i8 {
        match self {
            Weight::I8(v) => v[i],
            Weight::U8(v) => (v[i] ^ 0x80) as i8,
        }
    }

    /// What a zero point of this weight's type becomes after the shift to i8.
    pub fn shift(&self) -> i32 {
        match self {
            Weight::I8(_) => 0,
            Weight::U8(_) => -128,
        }
    }
}

/// Packs `B[K, N]` for the kernels of `layout` (u8 weights are shifted to i8: see [`Weight::shift`]).
/// Padding (columns past `N`, rows past `K`) is 0.
pub fn pack(b: Weight, k: usize, n: usize, layout: Layout) -> Vec<i8> {
    assert_eq!(b.len(), k * n, "B holds {} values, not {k}×{n}", b.len());
    let Layout { nr, group } = layout;
    let kg = layout.k_padded(k) / group;
    let mut out = vec![0i8; layout.packed_len(k, n)];
    for (p, panel) in out.chunks_exact_mut(kg * group * nr).enumerate() {
        for (q, grp) in panel.chunks_exact_mut(group * nr).enumerate() {
            for t in 0..group {
                let r = q * group + t;
                if r >= k {
                    break;
                }
                for j in 0..nr.min(n.saturating_sub(p * nr)) {
                    grp[j * group + t] = b.get(r * n + p * nr + j);
                }
            }
        }
    }
    out
}

/// A packed weight, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Packed<'a> {
    pub data: &'a [i8],
    pub k: usize,
    pub n: usize,
    pub layout: Layout,
}

impl Packed<'_> {
    /// `Σ_k B[k, j]` for every column (padding adds nothing).
    pub fn column_sums(&self) -> Vec<i32> {
        let Layout { nr, group } = self.layout;
        let mut sums = vec![0i32; self.n.div_ceil(nr) * nr];
        let panel_len = self.layout.k_padded(self.k) * nr;
        for (p, panel) in self.data.chunks_exact(panel_len).enumerate() {
            for grp in panel.chunks_exact(group * nr) {
                for (j, col) in grp.chunks_exact(group).enumerate() {
                    sums[p * nr + j] += col.iter().map(|&v| v as i32).sum::<i32>();
                }
            }
        }
        sums.truncate(self.n);
        sums
    }

    /// `B[r, j]` as packed (i8).
    pub fn value(&self, r: usize, j: usize) -> i8 {
        let Layout { nr, group } = self.layout;
        let kp = self.layout.k_padded(self.k);
        self.data[(j / nr) * kp * nr + (r / group) * group * nr + (j % nr) * group + r % group]
    }

    /// Whether the data fits the shape and layout.
    pub fn check(&self) -> Result<(), String> {
        if self.data.len() != self.layout.packed_len(self.k, self.n) {
            return Err(format!(
                "packed weight of {} values for {}×{} in panels of {} × groups of {}",
                self.data.len(),
                self.k,
                self.n,
                self.layout.nr,
                self.layout.group
            ));
        }
        Ok(())
    }
}

/// The activations `A[M, K]`.
#[derive(Clone, Copy, Debug)]
pub enum Acts<'a> {
    U8(&'a [u8]),
    I8(&'a [i8]),
}

impl Acts<'_> {
    fn len(&self) -> usize {
        match self {
            Acts::U8(v) => v.len(),
            Acts::I8(v) => v.len(),
        }
    }
}

/// Zero points: `a` of the activations (in their own type), `b` of the weight as packed (shifted to
/// i8; empty for none, one value for the whole weight, or one per column).
#[derive(Clone, Copy, Debug)]
pub struct Zeros<'a> {
    pub a: i32,
    pub b: &'a [i32],
    /// `Σ_k B[k, j]`, from [`Packed::column_sums`] (i8 activations need them even when `a` is 0).
    pub column_sums: &'a [i32],
}

/// Panics unless `isa` runs here and reads `b`'s layout, `b` fits its shape, and A and C hold `m`
/// rows of `K` and of `N` values.
fn check_operands(isa: IntIsa, b: &Packed, a_len: usize, m: usize, c_len: usize) {
    let (k, n) = (b.k, b.n);
    assert!(
        isa.supported(),
        "{} kernels on a CPU without them",
        isa.name()
    );
    assert_eq!(
        isa.layout(),
        b.layout,
        "{} kernels on another layout",
        isa.name()
    );
    b.check().unwrap();
    assert_eq!(a_len, m * k, "A holds {a_len} values, not {m}×{k}");
    assert_eq!(c_len, m * n, "C holds {c_len} values, not {m}×{n}");
}

/// `c[M, N] = (a − a₀) · (B − b₀)` with the kernels of `isa`, which must be among
/// [`IntIsa::available`] and read `b`'s layout.
pub fn matmul(isa: IntIsa, a: Acts, m: usize, b: &Packed, zeros: Zeros, c: &mut [i32]) {
    let (k, n) = (b.k, b.n);
    check_operands(isa, b, a.len(), m, c.len());
    assert!(matches!(zeros.b.len(), 0 | 1) || zeros.b.len() == n);
    assert_eq!(zeros.column_sums.len(), n, "column sums");
    if m == 0 || n == 0 {
        return;
    }
    let kp = b.layout.k_padded(k);
    // A as u8, padded to whole groups; i8 activations shift by +128 and so does their zero point.
    let mut rows_u8 = vec![0u8; m * kp];
    let shift = match a {
        Acts::U8(s) => {
            for (dst, src) in rows_u8.chunks_exact_mut(kp).zip(s.chunks_exact(k)) {
                dst[..k].copy_from_slice(src);
            }
            0
        }
        Acts::I8(s) => {
            for (dst, src) in rows_u8.chunks_exact_mut(kp).zip(s.chunks_exact(k)) {
                for (d, &x) in dst.iter_mut().zip(src) {
                    *d = (x as u8) ^ 0x80;
                }
            }
            128
        }
    };
    product(isa, &rows_u8, zeros.a + shift, m, b, zeros, c);
}

/// The product over A already as u8 rows padded to whole groups (`m` rows of `K` rounded up to the
/// layout's group, padding 0), `a0` its zero point in that domain (`zeros.a` is not read).
fn product(
    isa: IntIsa,
    rows_u8: &[u8],
    a0: i32,
    m: usize,
    b: &Packed,
    zeros: Zeros,
    c: &mut [i32],
) {
    let rows = Rows::new(isa, rows_u8, m, b.layout.k_padded(b.k), zeros.b);
    let panels = b.n.div_ceil(b.layout.nr);
    product_panels(isa, &rows, a0, b, zeros, 0..panels, c);
}

/// A's u8 rows as the tiles of one kernel family read them (widened to i16, or interleaved by
/// groups of four rows of `K`), with their sums when a weight zero point needs them. Made once for
/// any number of [`product_panels`] calls over the same rows.
struct Rows<'a> {
    u8s: &'a [u8],
    m: usize,
    kp: usize,
    wide: Vec<i16>,
    interleaved: Vec<u8>,
    sums: Vec<i32>,
}

impl<'a> Rows<'a> {
    fn new(isa: IntIsa, rows_u8: &'a [u8], m: usize, kp: usize, b_zeros: &[i32]) -> Rows<'a> {
        debug_assert_eq!(rows_u8.len(), m * kp);
        let sums: Vec<i32> = if b_zeros.iter().any(|&z| z != 0) {
            rows_u8
                .chunks_exact(kp)
                .map(|r| r.iter().map(|&x| x as i32).sum())
                .collect()
        } else {
            vec![0; m]
        };
        let wide: Vec<i16> = match isa {
            IntIsa::Avx2 | IntIsa::Portable => rows_u8.iter().map(|&x| x as i16).collect(),
            _ => Vec::new(),
        };
        let mr = isa.rows();
        // For AVX-512 VNNI, each tile of rows interleaved by groups of 4: one pointer walks all its rows.
        let interleaved: Vec<u8> = match isa {
            IntIsa::Avx512Vnni if m > FEW_ROWS => {
                let mut v = vec![0u8; m.div_ceil(mr) * mr * kp];
                debug_assert_eq!((isa.layout().group, mr), (4, 12));
                for (t, dst) in v.chunks_exact_mut(12 * kp).enumerate() {
                    // Rows past M repeat the last row: computed, never stored.
                    let rows: [&[u8]; 12] =
                        std::array::from_fn(|i| &rows_u8[(t * 12 + i).min(m - 1) * kp..][..kp]);
                    for (q, out) in dst.chunks_exact_mut(48).enumerate() {
                        for (o, row) in out.chunks_exact_mut(4).zip(&rows) {
                            o.copy_from_slice(&row[q * 4..q * 4 + 4]);
                        }
                    }
                }
                v
            }
            _ => Vec::new(),
        };
        Rows {
            u8s: rows_u8,
            m,
            kp,
            wide,
            interleaved,
            sums,
        }
    }
}

/// The columns of the weight's panels `panels` (panel `p` holds columns `p·nr ..`) of the product
/// of `rows` (zero point `a0` in their u8 domain) and `b`: `c` holds `m` rows of those columns
/// only. `zeros` are the whole weight's.
fn product_panels(
    isa: IntIsa,
    rows: &Rows,
    a0: i32,
    b: &Packed,
    zeros: Zeros,
    panels: std::ops::Range<usize>,
    c: &mut [i32],
) {
    let (k, n, m, kp) = (b.k, b.n, rows.m, rows.kp);
    let Layout { nr, group } = b.layout;
    debug_assert_eq!(kp, b.layout.k_padded(k));
    let (first, last) = (panels.start * nr, (panels.end * nr).min(n));
    let width = last - first;
    debug_assert_eq!(c.len(), m * width);
    let b0 = |j: usize| match zeros.b.len() {
        0 => 0,
        1 => zeros.b[0],
        _ => zeros.b[j],
    };
    let b0s: Vec<i32> = (first..last).map(b0).collect();
    // What the zero points take from each column: a₀Σb − K·a₀·b₀ (the row term is b₀·Σa).
    let col_term: Vec<i32> = (first..last)
        .map(|j| {
            let cs = if a0 == 0 { 0 } else { zeros.column_sums[j] };
            a0.wrapping_mul(cs)
                .wrapping_sub((k as i32).wrapping_mul(a0).wrapping_mul(b0(j)))
        })
        .collect();
    let panel_len = kp * nr;
    let data = &b.data[panels.start * panel_len..panels.end * panel_len];
    let finish = |i: usize, tile: &[i32], n0: usize, nw: usize, c: &mut [i32]| {
        finish_row(
            &tile[..nw],
            &col_term[n0..][..nw],
            &b0s[n0..][..nw],
            rows.sums[i],
            &mut c[i * width + n0..][..nw],
        )
    };
    #[cfg(target_arch = "x86_64")]
    if isa == IntIsa::Avx512Vnni && m <= FEW_ROWS {
        // Two panels at a time, then a last one alone.
        let mut tile = [0i32; FEW_ROWS * 64];
        for (pair, two) in data.chunks(2 * panel_len).enumerate() {
            let (n0, cols) = (pair * 2 * nr, two.len() / panel_len * nr);
            let nw = cols.min(width - n0);
            // SAFETY: the rows (m ≤ 6 of kp values each), the panels (one or two of kp × 32) and
            // the tile (6 × 64) are what the kernel reads and writes; the CPU's avx512f and
            // avx512vnni were checked by the caller.
            unsafe { few_rows(kp / group, rows.u8s, kp, m, two, cols / nr, &mut tile) };
            for i in 0..m {
                finish(i, &tile[i * cols..], n0, nw, c);
            }
        }
        return;
    }
    let mr = isa.rows();
    let mut tile = vec![0i32; mr * nr];
    for (p, panel) in data.chunks_exact(panel_len).enumerate() {
        let n0 = p * nr;
        let nw = nr.min(width - n0);
        for m0 in (0..m).step_by(mr) {
            let mw = mr.min(m - m0);
            // Rows past M repeat the last row: computed, never stored.
            let r = |i: usize| m0 + i.min(mw - 1);
            match isa {
                #[cfg(target_arch = "x86_64")]
                IntIsa::Avx512Vnni => {
                    let tile_rows = &rows.interleaved[m0 * kp..][..mr * kp];
                    // SAFETY: avx512f and avx512vnni were checked by the caller; the rows hold
                    // kp × 12 values and the panel kp × 32 (kp a multiple of 4), which is what the
                    // kernel reads.
                    unsafe { x86::tile_vnni512(kp / group, tile_rows, panel, &mut tile) }
                }
                #[cfg(target_arch = "x86_64")]
                IntIsa::AvxVnni => {
                    let tile_rows: [&[u8]; 6] =
                        std::array::from_fn(|i| &rows.u8s[r(i) * kp..][..kp]);
                    // SAFETY: avx2 and avxvnni were checked by the caller; lengths as for avx512.
                    unsafe { x86::tile_vnni256(kp / group, &tile_rows, panel, &mut tile) }
                }
                #[cfg(target_arch = "x86_64")]
                IntIsa::Avx2 => {
                    let tile_rows: [&[i16]; 6] =
                        std::array::from_fn(|i| &rows.wide[r(i) * kp..][..kp]);
                    // SAFETY: avx2 was checked by the caller; rows hold kp values (kp even) and the
                    // panel kp × 16.
                    unsafe { x86::tile_avx2(kp / group, &tile_rows, panel, &mut tile) }
                }
                _ => {
                    let tile_rows: [&[i16]; 4] =
                        std::array::from_fn(|i| &rows.wide[r(i) * kp..][..kp]);
                    tile_portable(kp / group, &tile_rows, panel, &mut tile)
                }
            }
            for i in 0..mw {
                finish(m0 + i, &tile[i * nr..], n0, nw, c);
            }
        }
    }
}

/// Rows up to which AVX-512 VNNI products take [`x86::few_vnni512`] instead of the 12-row tile.
const FEW_ROWS: usize = 6;

/// `m` (≤ [`FEW_ROWS`]) rows of `rows_u8` against `count` (1 or 2) panels, into `tile` (`m` rows
/// of `count · 32`).
///
/// # Safety
/// As [`x86::few_vnni512`].
#[cfg(target_arch = "x86_64")]
unsafe fn few_rows(
    groups: usize,
    rows_u8: &[u8],
    kp: usize,
    m: usize,
    panels: &[i8],
    count: usize,
    tile: &mut [i32],
) {
    macro_rules! rows {
        ($($r:literal)*) => {
            match (m, count) {
                $(
                    ($r, 1) => {
                        let rows: [&[u8]; $r] = std::array::from_fn(|i| &rows_u8[i * kp..][..kp]);
                        // SAFETY: as this function's.
                        unsafe { x86::few_vnni512::<$r, 1>(groups, &rows, panels, tile) }
                    }
                    ($r, 2) => {
                        let rows: [&[u8]; $r] = std::array::from_fn(|i| &rows_u8[i * kp..][..kp]);
                        // SAFETY: as this function's.
                        unsafe { x86::few_vnni512::<$r, 2>(groups, &rows, panels, tile) }
                    }
                )*
                _ => unreachable!("{m} rows × {count} panels"),
            }
        };
    }
    rows!(1 2 3 4 5 6)
}

/// `out[j] = tile[j] − col_term[j] − b0[j] · row_sum`: one row of a tile with its zero points applied.
fn finish_row(tile: &[i32], col_term: &[i32], b0: &[i32], row_sum: i32, out: &mut [i32]) {
    #[inline(always)]
    fn body(tile: &[i32], col_term: &[i32], b0: &[i32], row_sum: i32, out: &mut [i32]) {
        for (((o, &t), &c), &z) in out.iter_mut().zip(tile).zip(col_term).zip(b0) {
            *o = t.wrapping_sub(c).wrapping_sub(z.wrapping_mul(row_sum));
        }
    }
    for_cpu!(body(tile: &[i32] = tile, col_term: &[i32] = col_term, b0: &[i32] = b0, row_sum: i32 = row_sum, out: &mut [i32] = out) -> ())
}

/// How many 8-bit limbs an f32 activation is split into by [`matmul_f32`].
pub const LIMBS: usize = 3;
/// Each limb's step is the previous one's over this: a residual, at most half a step, then spans at
/// most ±127 steps of the next limb.
const LIMB_RATIO: f32 = 254.0;
const ROUND: f32 = 12582912.0;

/// `c[M, N] = a · ((B − b₀) · scale)` for f32 activations `a[M, K]`, on the integer kernels, to f32
/// rounding.
///
/// Each row of `a` is split into three signed 8-bit limbs, `x ≈ s₁q₁ + s₂q₂ + s₃q₃` with
/// `s₁ = max|x| / 127` and `s₂ = s₁ / 254`, `s₃ = s₂ / 254`: each limb holds the rounded residual of
/// the ones before (each residual rounded once, by an FMA), so what is left out is at most `s₃ / 2`, about
/// `2⁻²⁴ · max|x|` — f32's own rounding at the row's largest value. The three limb rows go through
/// the exact integer product, and `c = scale · (s₁S₁ + s₂S₂ + s₃S₃)`. On VNNI, which adds four
/// products per lane where an FMA adds one, three limbs still take fewer instructions than the f32
/// product, and the weight stays 8-bit. Rows holding a NaN or an infinity (or nothing but values
/// under 1e-30, whose limb steps would underflow) are computed in f32 instead, so they come out as
/// an f32 product would. `b_zeros` and `column_sums` are as in [`Zeros`]; `scales` holds one value
/// or one per column.
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32(
    isa: IntIsa,
    a: &[f32],
    m: usize,
    b: &Packed,
    b_zeros: &[i32],
    column_sums: &[i32],
    scales: &[f32],
    c: &mut [f32],
) {
    let (k, n) = (b.k, b.n);
    check_operands(isa, b, a.len(), m, c.len());
    assert!(
        scales.len() == 1 || scales.len() == n,
        "{} scales",
        scales.len()
    );
    assert!(matches!(b_zeros.len(), 0 | 1) || b_zeros.len() == n);
    if m == 0 || n == 0 {
        return;
    }
    let kp = b.layout.k_padded(k);
    let zeros = Zeros {
        a: 0,
        b: b_zeros,
        column_sums,
    };
    let column_scales: std::borrow::Cow<[f32]> = if scales.len() == n {
        scales.into()
    } else {
        vec![scales[0]; n].into()
    };
    // Rows at a time, split into limbs; then the weight's columns a block at a time, so that the
    // weight streams through the cache once per block of rows (a wide weight, say 1024 × 8210,
    // lives in memory, not in the cache) while the i32 sums of a block of columns stay near 256 KiB.
    let mr = isa.rows();
    let chunk = m.min(LIMB_ROWS).div_ceil(mr) * mr;
    let nr = b.layout.nr;
    let block = ((65536 / (LIMBS * chunk)) / nr).max(1) * nr;
    let rows_max = chunk.min(m);
    let mut rows_u8 = vec![0u8; rows_max * LIMBS * kp];
    let mut sums = vec![0i32; rows_max * LIMBS * block.min(n)];
    let mut steps = vec![[0f32; LIMBS]; rows_max];
    for m0 in (0..m).step_by(chunk) {
        let mw = chunk.min(m - m0);
        let mut in_float = Vec::new();
        for (i, (row, st)) in a[m0 * k..(m0 + mw) * k]
            .chunks_exact(k)
            .zip(&mut steps)
            .enumerate()
        {
            let limbs = &mut rows_u8[i * LIMBS * kp..][..LIMBS * kp];
            match split_in_limbs(row, limbs, kp) {
                Some(s) => *st = s,
                None => {
                    *st = [0.0; LIMBS];
                    in_float.push(i);
                }
            }
        }
        let rows = Rows::new(isa, &rows_u8[..mw * LIMBS * kp], mw * LIMBS, kp, b_zeros);
        for n0 in (0..n).step_by(block) {
            let width = block.min(n - n0);
            let out = &mut sums[..mw * LIMBS * width];
            let panels = n0 / nr..(n0 + width).div_ceil(nr);
            product_panels(isa, &rows, 128, b, zeros, panels, out);
            for (i, st) in steps[..mw].iter().enumerate() {
                let s: [&[i32]; LIMBS] =
                    std::array::from_fn(|l| &out[(i * LIMBS + l) * width..][..width]);
                let dst = &mut c[(m0 + i) * n + n0..][..width];
                combine(st, s, &column_scales[n0..][..width], dst);
            }
        }
        for i in in_float {
            let row = &a[(m0 + i) * k..][..k];
            let dst = &mut c[(m0 + i) * n..][..n];
            for (j, d) in dst.iter_mut().enumerate() {
                let z = match b_zeros.len() {
                    0 => 0,
                    1 => b_zeros[0],
                    _ => b_zeros[j],
                };
                let mut acc = 0f32;
                for (r, &x) in row.iter().enumerate() {
                    acc += x * (b.value(r, j) as i32 - z) as f32;
                }
                *d = acc * column_scales[j];
            }
        }
    }
}

/// Rows of A split into limbs at a time in [`matmul_f32`]: the weight streams once per this many.
const LIMB_ROWS: usize = 240;

/// Writes a row's three limbs (`LIMBS` rows of `kp` u8, each value `q + 128`, padding 0) and returns
/// their steps, or `None` for a row the limbs cannot hold (NaN, infinities, magnitudes under 1e-30).
pub(super) fn split_in_limbs(row: &[f32], limbs: &mut [u8], kp: usize) -> Option<[f32; LIMBS]> {
    #[inline(always)]
    fn body(row: &[f32], limbs: &mut [u8], kp: usize) -> Option<[f32; LIMBS]> {
        let k = row.len();
        // max|x| on the bits: magnitudes order as integers, and any NaN (above infinity) wins.
        let amax = f32::from_bits(
            row.iter()
                .map(|x| x.to_bits() & 0x7fff_ffff)
                .fold(0, u32::max),
        );
        if !amax.is_finite() || amax < 1e-30 {
            for l in limbs.chunks_exact_mut(kp) {
                l[..k].fill(128);
                l[k..].fill(0);
            }
            return (amax == 0.0).then_some([0.0; LIMBS]);
        }
        let s1 = amax / 127.0;
        let steps = [s1, s1 / LIMB_RATIO, s1 / (LIMB_RATIO * LIMB_RATIO)];
        let inv = steps.map(|s| 1.0 / s);
        let (l0, rest) = limbs.split_at_mut(kp);
        let (l1, l2) = rest.split_at_mut(kp);
        // Rounds v·inv (clamped to ±127) half to even by adding 1.5·2²³: the sum's low mantissa bits
        // then hold the integer, whose low byte, with its top bit flipped, is q + 128.
        let limb = |v: f32, inv: f32| {
            let y = (v * inv).clamp(-127.0, 127.0) + ROUND;
            (y - ROUND, (y.to_bits() as u8) ^ 0x80)
        };
        for (((&x, d0), d1), d2) in row
            .iter()
            .zip(&mut l0[..k])
            .zip(&mut l1[..k])
            .zip(&mut l2[..k])
        {
            // Each residual x − q·s is rounded once (FMA), an error of 2⁻²⁴ of a residual already
            // under half a step: far below the last limb's step.
            let (q0, c0) = limb(x, inv[0]);
            let r = (-q0).mul_add(steps[0], x);
            let (q1, c1) = limb(r, inv[1]);
            let r = (-q1).mul_add(steps[1], r);
            let (_, c2) = limb(r, inv[2]);
            (*d0, *d1, *d2) = (c0, c1, c2);
        }
        for l in [l0, l1, l2] {
            l[k..].fill(0);
        }
        Some(steps)
    }
    for_cpu!(body(row: &[f32] = row, limbs: &mut [u8] = limbs, kp: usize = kp) -> Option<[f32; LIMBS]>)
}

/// `dst[j] = scale[j] · (s₁S₁[j] + s₂S₂[j] + s₃S₃[j])`: one row's f32 result from its limbs' sums.
fn combine(steps: &[f32; LIMBS], sums: [&[i32]; LIMBS], scales: &[f32], dst: &mut [f32]) {
    #[inline(always)]
    fn body(steps: &[f32; LIMBS], sums: [&[i32]; LIMBS], scales: &[f32], dst: &mut [f32]) {
        let n = dst.len();
        let [a, b, c] = sums;
        for ((((d, &x), &y), &z), &s) in dst
            .iter_mut()
            .zip(&a[..n])
            .zip(&b[..n])
            .zip(&c[..n])
            .zip(&scales[..n])
        {
            *d = (steps[0] * x as f32 + (steps[1] * y as f32 + steps[2] * z as f32)) * s;
        }
    }
    for_cpu!(body(steps: &[f32; LIMBS] = steps, sums: [&[i32]; LIMBS] = sums, scales: &[f32] = scales, dst: &mut [f32] = dst) -> ())
}

/// ONNX `DynamicQuantizeLinear`: `y = saturate(round(x / s) + z)` over u8, with `s = (max − min) / 255`
/// and `z = saturate(round(−min / s))`, where the range `[min, max]` is the input's, widened to hold
/// 0, and rounding is to nearest even. NaN inputs do not move the range and quantize to `z`, as in
/// tract's operator, which this reproduces value for value. Returns `(s, z)`.
pub fn dynamic_quantize(x: &[f32], y: &mut [u8]) -> (f32, u8) {
    assert_eq!(x.len(), y.len(), "input and output lengths");
    let (lo, hi) = range_with_zero(x);
    let scale = (hi - lo) / 255.0;
    let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as u8;
    #[cfg(target_arch = "x86_64")]
    if scale.is_finite() && scale > 0.0 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: avx2 was checked; x and y have the same length.
        unsafe { x86::quantize_avx2(x, y, scale, zero) };
        return (scale, zero);
    }
    for (x, y) in x.iter().zip(y.iter_mut()) {
        *y = quantize_one(*x, scale, zero);
    }
    (scale, zero)
}

fn quantize_one(x: f32, scale: f32, zero: u8) -> u8 {
    ((x / scale).round_ties_even() as i32 + zero as i32).clamp(0, 255) as u8
}

/// `(min(0, min x), max(0, max x))`, NaN left out.
fn range_with_zero(x: &[f32]) -> (f32, f32) {
    // Eight independent lanes the compiler vectorises; `f32::min` ignores a NaN operand.
    let mut lo = [0f32; 8];
    let mut hi = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            lo[i] = lo[i].min(c[i]);
            hi[i] = hi[i].max(c[i]);
        }
    }
    let fold = |v: &[f32], init: f32, f: fn(f32, f32) -> f32| v.iter().fold(init, |a, &b| f(a, b));
    let lo = fold(rest, fold(&lo, 0.0, f32::min), f32::min);
    let hi = fold(rest, fold(&hi, 0.0, f32::max), f32::max);
    (lo, hi)
}

/// `tile[i * 16 + j] = Σ_q Σ_t rows[i][2q + t] · panel[(q * 16 + j) * 2 + t]`.
fn tile_portable(groups: usize, rows: &[&[i16]; 4], panel: &[i8], tile: &mut [i32]) {
    const NR: usize = 16;
    let mut acc = [[0i32; NR]; 4];
    for (q, g) in panel[..groups * 2 * NR].chunks_exact(2 * NR).enumerate() {
        for (i, acc) in acc.iter_mut().enumerate() {
            let (x0, x1) = (rows[i][2 * q] as i32, rows[i][2 * q + 1] as i32);
            for (a, w) in acc.iter_mut().zip(g.chunks_exact(2)) {
                *a = a.wrapping_add(x0 * w[0] as i32 + x1 * w[1] as i32);
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

    /// [`super::dynamic_quantize`]'s element loop, eight at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2; `x` and `y` must have the same length; `scale` finite and positive.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_avx2(x: &[f32], y: &mut [u8], scale: f32, zero: u8) {
        let n8 = x.len() / 8 * 8;
        let s = _mm256_set1_ps(scale);
        let z = _mm256_set1_ps(zero as f32);
        let top = _mm256_set1_ps(255.0);
        let bottom = _mm256_setzero_ps();
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 ≤ n8 ≤ x.len() = y.len().
            unsafe {
                let q = _mm256_div_ps(_mm256_loadu_ps(x.as_ptr().add(i)), s);
                let q = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q);
                // NaN quantizes to the zero point: its lanes are cleared to 0.0 before the shift.
                let q = _mm256_and_ps(q, _mm256_cmp_ps::<_CMP_ORD_Q>(q, q));
                let q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, z), bottom), top);
                let v = _mm256_cvtps_epi32(q);
                // 8 × i32 in 0..=255 → 8 bytes.
                let w = _mm256_packus_epi32(v, v);
                let w = _mm256_permute4x64_epi64::<0b1000>(w);
                let b = _mm256_packus_epi16(w, w);
                let lo = _mm256_castsi256_si128(b);
                y.as_mut_ptr()
                    .add(i)
                    .cast::<i64>()
                    .write_unaligned(_mm_cvtsi128_si64(lo));
            }
            i += 8;
        }
        for (x, y) in x[n8..].iter().zip(&mut y[n8..]) {
            *y = super::quantize_one(*x, scale, zero);
        }
    }

    /// 12 rows × 32 columns, 24 zmm accumulators, `vpdpbusd`: per group of 4 values of `K`, two
    /// loads of the panel and 12 broadcasts feed 24 instructions.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI; `rows` must hold `groups * 48` values (12 rows
    /// interleaved by groups of 4), `panel` `groups * 128` and `tile` 384.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn tile_vnni512(groups: usize, rows: &[u8], panel: &[i8], tile: &mut [i32]) {
        debug_assert!(panel.len() >= groups * 128 && tile.len() >= 384);
        debug_assert!(rows.len() >= groups * 48);
        let mut acc = [[_mm512_setzero_si512(); 2]; 12];
        let (p, a) = (panel.as_ptr(), rows.as_ptr());
        for q in 0..groups {
            // SAFETY: q < groups, so the 128 bytes at q * 128 are in the panel and the 48 at q * 48
            // in the rows.
            unsafe {
                let b0 = _mm512_loadu_si512(p.add(q * 128).cast());
                let b1 = _mm512_loadu_si512(p.add(q * 128 + 64).cast());
                for (i, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_epi32(a.add(q * 48 + i * 4).cast::<i32>().read_unaligned());
                    acc[0] = _mm512_dpbusd_epi32(acc[0], x, b0);
                    acc[1] = _mm512_dpbusd_epi32(acc[1], x, b1);
                }
            }
        }
        let t = tile.as_mut_ptr();
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: i * 32 + 31 < 384 ≤ tile.len().
            unsafe {
                _mm512_storeu_si512(t.add(i * 32).cast(), acc[0]);
                _mm512_storeu_si512(t.add(i * 32 + 16).cast(), acc[1]);
            }
        }
    }

    /// `R` rows (at most 6) × `P` panels of 32 columns, AVX-512 VNNI: for products of few rows (a
    /// batch-1 step and its three limbs), where the 12-row tile computes rows it then drops. Two
    /// panels at a time keep `4R` sums in flight, enough to cover `vpdpbusd`'s latency.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI; each row must hold `groups * 4` values,
    /// `panels` `P` panels of `groups * 128` and `tile` `R * P * 32`.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn few_vnni512<const R: usize, const P: usize>(
        groups: usize,
        rows: &[&[u8]; R],
        panels: &[i8],
        tile: &mut [i32],
    ) {
        let panel_len = groups * 128;
        debug_assert!(panels.len() >= P * panel_len && tile.len() >= R * P * 32);
        debug_assert!(rows.iter().all(|r| r.len() >= groups * 4));
        let mut acc = [[[_mm512_setzero_si512(); 2]; P]; R];
        let p = panels.as_ptr();
        for q in 0..groups {
            // SAFETY: q < groups, so the 128 bytes at j * panel_len + q * 128 are in panel j < P,
            // and the 4 at q * 4 in each row.
            unsafe {
                let b: [[__m512i; 2]; P] = std::array::from_fn(|j| {
                    let at = p.add(j * panel_len + q * 128);
                    [
                        _mm512_loadu_si512(at.cast()),
                        _mm512_loadu_si512(at.add(64).cast()),
                    ]
                });
                for (acc, row) in acc.iter_mut().zip(rows) {
                    let x =
                        _mm512_set1_epi32(row.as_ptr().add(q * 4).cast::<i32>().read_unaligned());
                    for (acc, b) in acc.iter_mut().zip(&b) {
                        acc[0] = _mm512_dpbusd_epi32(acc[0], x, b[0]);
                        acc[1] = _mm512_dpbusd_epi32(acc[1], x, b[1]);
                    }
                }
            }
        }
        let t = tile.as_mut_ptr();
        for (i, acc) in acc.iter().enumerate() {
            for (j, acc) in acc.iter().enumerate() {
                // SAFETY: (i * P + j) * 32 + 31 < R * P * 32 ≤ tile.len().
                unsafe {
                    let at = t.add((i * P + j) * 32);
                    _mm512_storeu_si512(at.cast(), acc[0]);
                    _mm512_storeu_si512(at.add(16).cast(), acc[1]);
                }
            }
        }
    }

    /// 6 rows × 16 columns, 12 ymm accumulators, AVX-VNNI `vpdpbusd`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and AVX-VNNI; each row must hold `groups * 4` values, `panel`
    /// `groups * 64` and `tile` 96.
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn tile_vnni256(groups: usize, rows: &[&[u8]; 6], panel: &[i8], tile: &mut [i32]) {
        debug_assert!(panel.len() >= groups * 64 && tile.len() >= 96);
        debug_assert!(rows.iter().all(|r| r.len() >= groups * 4));
        let mut acc = [[_mm256_setzero_si256(); 2]; 6];
        let p = panel.as_ptr();
        for q in 0..groups {
            // SAFETY: as for tile_vnni512, with 64-byte groups.
            unsafe {
                let b0 = _mm256_loadu_si256(p.add(q * 64).cast());
                let b1 = _mm256_loadu_si256(p.add(q * 64 + 32).cast());
                for i in 0..6 {
                    let x = _mm256_set1_epi32(
                        rows[i].as_ptr().add(q * 4).cast::<i32>().read_unaligned(),
                    );
                    acc[i][0] = _mm256_dpbusd_avx_epi32(acc[i][0], x, b0);
                    acc[i][1] = _mm256_dpbusd_avx_epi32(acc[i][1], x, b1);
                }
            }
        }
        let t = tile.as_mut_ptr();
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: i * 16 + 15 < 96 ≤ tile.len().
            unsafe {
                _mm256_storeu_si256(t.add(i * 16).cast(), acc[0]);
                _mm256_storeu_si256(t.add(i * 16 + 8).cast(), acc[1]);
            }
        }
    }

    /// 6 rows × 16 columns, 12 ymm accumulators, `vpmaddwd` on operands widened to i16.
    ///
    /// # Safety
    /// The CPU must have AVX2; each row must hold `groups * 2` values, `panel` `groups * 32` and
    /// `tile` 96.
    #[target_feature(enable = "avx2")]
    pub unsafe fn tile_avx2(groups: usize, rows: &[&[i16]; 6], panel: &[i8], tile: &mut [i32]) {
        debug_assert!(panel.len() >= groups * 32 && tile.len() >= 96);
        debug_assert!(rows.iter().all(|r| r.len() >= groups * 2));
        let mut acc = [[_mm256_setzero_si256(); 2]; 6];
        let p = panel.as_ptr();
        for q in 0..groups {
            // SAFETY: the 32 bytes at q * 32 are in the panel, the two i16 at 2q in each row.
            unsafe {
                let b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(q * 32).cast()));
                let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(q * 32 + 16).cast()));
                for i in 0..6 {
                    let x = _mm256_set1_epi32(
                        rows[i].as_ptr().add(q * 2).cast::<i32>().read_unaligned(),
                    );
                    acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(x, b0));
                    acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(x, b1));
                }
            }
        }
        let t = tile.as_mut_ptr();
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: i * 16 + 15 < 96 ≤ tile.len().
            unsafe {
                _mm256_storeu_si256(t.add(i * 16).cast(), acc[0]);
                _mm256_storeu_si256(t.add(i * 16 + 8).cast(), acc[1]);
            }
        }
    }
}

/// `(a − a₀)(b − b₀)` summed in i64 over the unpacked weight: what the kernels must equal exactly.
pub fn reference(
    a: Acts,
    m: usize,
    b: Weight,
    k: usize,
    n: usize,
    a0: i32,
    b0: &[i32],
) -> Vec<i32> {
    let av = |i: usize| match a {
        Acts::U8(v) => v[i] as i64,
        Acts::I8(v) => v[i] as i64,
    };
    let bv = |i: usize| match b {
        Weight::I8(v) => v[i] as i64,
        Weight::U8(v) => v[i] as i64,
    };
    let mut c = vec![0i32; m * n];
    for i in 0..m {
        for j in 0..n {
            let z = match b0.len() {
                0 => 0,
                1 => b0[0] as i64,
                _ => b0[j] as i64,
            };
            let s: i64 = (0..k)
                .map(|r| (av(i * k + r) - a0 as i64) * (bv(r * n + j) - z))
                .sum();
            c[i * n + j] = s as i32;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{Rng, SeedableRng};

    #[test]
    fn every_isa_equals_the_reference_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 3, 17),
            (3, 129, 33),
            (7, 301, 31),
            (9, 256, 64),
            (13, 33, 100),
            (48, 203, 47),
            // Few rows over an odd number of panels: pairs, then one alone.
            (2, 64, 96),
            (5, 77, 64),
            (6, 40, 130),
        ] {
            let au: Vec<u8> = (0..m * k).map(|_| rng.next_u32() as u8).collect();
            let ai: Vec<i8> = au.iter().map(|&x| x as i8).collect();
            let bi: Vec<i8> = (0..k * n).map(|_| rng.next_u32() as i8).collect();
            let bu: Vec<u8> = bi.iter().map(|&x| x as u8).collect();
            let per_col: Vec<i32> = (0..n).map(|_| (rng.next_u32() % 256) as i32).collect();
            for (acts, a0) in [
                (Acts::U8(&au), 0),
                (Acts::U8(&au), 131),
                (Acts::I8(&ai), -7),
            ] {
                for (w, b0) in [
                    (Weight::I8(&bi), vec![]),
                    (Weight::I8(&bi), vec![3]),
                    (Weight::U8(&bu), vec![128]),
                    (Weight::U8(&bu), per_col.clone()),
                ] {
                    let want = reference(acts, m, w, k, n, a0, &b0);
                    // A u8 weight's zero point is taken to i8 with the weight; none means 0 − 128.
                    let shifted: Vec<i32> = if b0.is_empty() && w.shift() != 0 {
                        vec![w.shift()]
                    } else {
                        b0.iter().map(|z| z + w.shift()).collect()
                    };
                    for isa in IntIsa::available() {
                        let layout = isa.layout();
                        let data = pack(w, k, n, layout);
                        let b = Packed {
                            data: &data,
                            k,
                            n,
                            layout,
                        };
                        let sums = b.column_sums();
                        let zeros = Zeros {
                            a: a0,
                            b: &shifted,
                            column_sums: &sums,
                        };
                        let mut c = vec![i32::MIN; m * n];
                        matmul(isa, acts, m, &b, zeros, &mut c);
                        assert_eq!(c, want, "{} on {m}×{k}×{n}", isa.name());
                    }
                }
            }
        }
    }
    /// The three-limb f32 product against an f64 product of the same operands: within f32 rounding
    /// of the row's scale, and NaN / infinite / zero rows as an f32 product gives them.
    #[test]
    fn f32_activations_in_limbs_match_the_float_product() {
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let mut unit = move || rng.next_u32() as f32 / u32::MAX as f32 * 2.0 - 1.0;
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 129, 33),
            (7, 301, 31),
            (50, 256, 97),
            (2, 1027, 1100),
            // Column blocks, a ragged last one; rows past one block of limb rows.
            (20, 64, 4000),
            (1, 70, 2000),
            (250, 16, 40),
        ] {
            let mut a: Vec<f32> = (0..m * k)
                .map(|i| unit() * [1.0, 1e-3, 3e4][i % 3] * if i % 7 == 0 { 40.0 } else { 1.0 })
                .collect();
            let bi: Vec<i8> = (0..k * n).map(|_| (unit() * 127.0) as i8).collect();
            let zeros: Vec<i32> = (0..n).map(|j| (j % 5) as i32 - 2).collect();
            let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
            if m > 2 {
                a[k..2 * k].fill(0.0);
                a[2 * k + k / 2] = f32::NAN;
            }
            if m > 3 {
                a[3 * k] = f32::INFINITY;
            }
            for isa in IntIsa::available() {
                let layout = isa.layout();
                let data = pack(Weight::I8(&bi), k, n, layout);
                let b = Packed {
                    data: &data,
                    k,
                    n,
                    layout,
                };
                let sums = b.column_sums();
                for z in [&[][..], &zeros[..1], &zeros[..]] {
                    let mut c = vec![f32::MIN; m * n];
                    matmul_f32(isa, &a, m, &b, z, &sums, &scales, &mut c);
                    for i in 0..m {
                        let row = &a[i * k..][..k];
                        let amax = row.iter().fold(0f64, |x, &v| x.max(v.abs() as f64));
                        for j in 0..n {
                            let zj = match z.len() {
                                0 => 0,
                                1 => z[0],
                                _ => z[j],
                            };
                            let w =
                                |r: usize| (bi[r * n + j] as i32 - zj) as f64 * scales[j] as f64;
                            let want: f64 = (0..k).map(|r| row[r] as f64 * w(r)).sum();
                            let bound: f64 = (0..k).map(|r| w(r).abs()).sum::<f64>() * amax;
                            let got = c[i * n + j] as f64;
                            if want.is_nan() {
                                assert!(got.is_nan(), "{} row {i} col {j}: {got}", isa.name());
                            } else if want.is_infinite() {
                                assert_eq!(got, want, "{} row {i} col {j}", isa.name());
                            } else {
                                assert!(
                                    (got - want).abs() <= 2e-7 * bound,
                                    "{} {m}×{k}×{n} row {i} col {j}: {got} vs {want} (bound {bound})",
                                    isa.name()
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dynamic_quantize_reproduces_the_scalar_formula() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let uniform = |rng: &mut ChaCha8Rng, lo: f32, hi: f32| {
            lo + (rng.next_u32() as f32 / u32::MAX as f32) * (hi - lo)
        };
        let mut cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![0.0; 13],
            vec![0., 2., -3., -2.5, 1.34, 0.5],
            vec![-1., -2.1, -1.3, -2.5, -3.34, -4.],
            vec![1., 2.1, 1.3, 2.5, 3.34, 4., 1.5, 2.6, 3.9, 4., 3., 2.345],
        ];
        for len in [1, 7, 8, 9, 64, 1000, 4099] {
            cases.push((0..len).map(|_| uniform(&mut rng, -3.0, 5.0)).collect());
            cases.push((0..len).map(|_| uniform(&mut rng, 0.5, 9.0)).collect());
            let mut with_nan: Vec<f32> = (0..len).map(|_| uniform(&mut rng, -1.0, 1.0)).collect();
            with_nan[len / 2] = f32::NAN;
            cases.push(with_nan);
        }
        // Values on rounding ties: k + 0.5 steps of the scale.
        cases.push((0..255).map(|i| i as f32 * 0.5 - 60.0).collect());
        for x in cases {
            let (mut lo, mut hi) = (0f32, 0f32);
            for &v in &x {
                if v < lo {
                    lo = v
                } else if v > hi {
                    hi = v
                }
            }
            let scale = (hi - lo) / 255.0;
            let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as u8;
            let want: Vec<u8> = x.iter().map(|&v| quantize_one(v, scale, zero)).collect();
            let mut y = vec![7u8; x.len()];
            let got = dynamic_quantize(&x, &mut y);
            assert_eq!(got.0.to_bits(), scale.to_bits(), "scale of {x:?}");
            assert_eq!(got.1, zero, "zero point of {x:?}");
            assert_eq!(y, want, "values of {x:?}");
        }
    }
}
