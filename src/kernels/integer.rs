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
    /// AVX-512 VNNI: 8 rows × 32 columns, four rows of `K` per instruction.
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
            IntIsa::Avx512Vnni => 8,
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

/// `c[M, N] = (a − a₀) · (B − b₀)` with the kernels of `isa`, which must be among
/// [`IntIsa::available`] and read `b`'s layout.
pub fn matmul(isa: IntIsa, a: Acts, m: usize, b: &Packed, zeros: Zeros, c: &mut [i32]) {
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
    assert_eq!(a.len(), m * k, "A holds {} values, not {m}×{k}", a.len());
    assert_eq!(c.len(), m * n, "C holds {} values, not {m}×{n}", c.len());
    assert!(matches!(zeros.b.len(), 0 | 1) || zeros.b.len() == n);
    assert_eq!(zeros.column_sums.len(), n, "column sums");
    if m == 0 || n == 0 {
        return;
    }
    let Layout { nr, group } = b.layout;
    let kp = b.layout.k_padded(k);
    // A as u8, padded to whole groups; i8 activations shift by +128 and so does their zero point.
    let (rows_u8, a0): (Vec<u8>, i32) = {
        let mut v = vec![0u8; m * kp];
        let shift = match a {
            Acts::U8(s) => {
                for (dst, src) in v.chunks_exact_mut(kp).zip(s.chunks_exact(k)) {
                    dst[..k].copy_from_slice(src);
                }
                0
            }
            Acts::I8(s) => {
                for (dst, src) in v.chunks_exact_mut(kp).zip(s.chunks_exact(k)) {
                    for (d, &x) in dst.iter_mut().zip(src) {
                        *d = (x as u8) ^ 0x80;
                    }
                }
                128
            }
        };
        (v, zeros.a + shift)
    };
    let b0 = |j: usize| match zeros.b.len() {
        0 => 0,
        1 => zeros.b[0],
        _ => zeros.b[j],
    };
    let row_sums: Vec<i32> = if zeros.b.iter().any(|&z| z != 0) {
        rows_u8
            .chunks_exact(kp)
            .map(|r| r.iter().map(|&x| x as i32).sum())
            .collect()
    } else {
        vec![0; m]
    };
    // What the zero points take from each column: a₀Σb − K·a₀·b₀ (the row term is b₀·Σa).
    let col_term: Vec<i32> = (0..n)
        .map(|j| {
            let cs = if a0 == 0 { 0 } else { zeros.column_sums[j] };
            a0.wrapping_mul(cs)
                .wrapping_sub((k as i32).wrapping_mul(a0).wrapping_mul(b0(j)))
        })
        .collect();
    let wide: Vec<i16> = match isa {
        IntIsa::Avx2 | IntIsa::Portable => rows_u8.iter().map(|&x| x as i16).collect(),
        _ => Vec::new(),
    };
    let mr = isa.rows();
    let mut tile = vec![0i32; mr * nr];
    let panel_len = kp * nr;
    for (p, panel) in b.data.chunks_exact(panel_len).enumerate() {
        let n0 = p * nr;
        let nw = nr.min(n - n0);
        for m0 in (0..m).step_by(mr) {
            let mw = mr.min(m - m0);
            // Rows past M repeat the last row: computed, never stored.
            let r = |i: usize| m0 + i.min(mw - 1);
            match isa {
                #[cfg(target_arch = "x86_64")]
                IntIsa::Avx512Vnni => {
                    let rows: [&[u8]; 8] = std::array::from_fn(|i| &rows_u8[r(i) * kp..][..kp]);
                    // SAFETY: avx512f and avx512vnni were checked above; rows hold kp values and the
                    // panel kp × 32 (kp a multiple of 4), which is what the kernel reads.
                    unsafe { x86::tile_vnni512(kp / group, &rows, panel, &mut tile) }
                }
                #[cfg(target_arch = "x86_64")]
                IntIsa::AvxVnni => {
                    let rows: [&[u8]; 6] = std::array::from_fn(|i| &rows_u8[r(i) * kp..][..kp]);
                    // SAFETY: avx2 and avxvnni were checked above; lengths as for avx512.
                    unsafe { x86::tile_vnni256(kp / group, &rows, panel, &mut tile) }
                }
                #[cfg(target_arch = "x86_64")]
                IntIsa::Avx2 => {
                    let rows: [&[i16]; 6] = std::array::from_fn(|i| &wide[r(i) * kp..][..kp]);
                    // SAFETY: avx2 was checked above; rows hold kp values (kp even) and the panel
                    // kp × 16.
                    unsafe { x86::tile_avx2(kp / group, &rows, panel, &mut tile) }
                }
                _ => {
                    let rows: [&[i16]; 4] = std::array::from_fn(|i| &wide[r(i) * kp..][..kp]);
                    tile_portable(kp / group, &rows, panel, &mut tile)
                }
            }
            for i in 0..mw {
                let rs = row_sums[m0 + i];
                let out = &mut c[(m0 + i) * n + n0..][..nw];
                for (j, (o, &t)) in out.iter_mut().zip(&tile[i * nr..][..nw]).enumerate() {
                    *o = t
                        .wrapping_sub(col_term[n0 + j])
                        .wrapping_sub(b0(n0 + j).wrapping_mul(rs));
                }
            }
        }
    }
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

    /// 8 rows × 32 columns, 16 zmm accumulators, `vpdpbusd`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI; each row must hold `groups * 4` values, `panel`
    /// `groups * 128` and `tile` 256.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn tile_vnni512(groups: usize, rows: &[&[u8]; 8], panel: &[i8], tile: &mut [i32]) {
        debug_assert!(panel.len() >= groups * 128 && tile.len() >= 256);
        debug_assert!(rows.iter().all(|r| r.len() >= groups * 4));
        let mut acc = [[_mm512_setzero_si512(); 2]; 8];
        let p = panel.as_ptr();
        for q in 0..groups {
            // SAFETY: q < groups, so the 128 bytes at q * 128 are in the panel and the 4 at q * 4
            // in each row.
            unsafe {
                let b0 = _mm512_loadu_si512(p.add(q * 128).cast());
                let b1 = _mm512_loadu_si512(p.add(q * 128 + 64).cast());
                for i in 0..8 {
                    let x = _mm512_set1_epi32(
                        rows[i].as_ptr().add(q * 4).cast::<i32>().read_unaligned(),
                    );
                    acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], x, b0);
                    acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], x, b1);
                }
            }
        }
        let t = tile.as_mut_ptr();
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: i * 32 + 31 < 256 ≤ tile.len().
            unsafe {
                _mm512_storeu_si512(t.add(i * 32).cast(), acc[0]);
                _mm512_storeu_si512(t.add(i * 32 + 16).cast(), acc[1]);
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
