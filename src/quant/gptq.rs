//! Error-compensating rounding (GPTQ, Frantar et al. 2022) for a weight whose scales are already
//! chosen. The quantity kept small is the layer's output error on calibration data,
//! `‖X (W − Ŵ)ᵀ‖²` over the rows of `W` (`[channels, k]`, one row per output channel), whose
//! Hessian in each row is `H = XᵀX / n` (`k × k`). Rounding the columns one at a time, the error made
//! in column `c` is pushed onto the columns not yet rounded, in the direction that `H` says cancels it
//! best in the output: with `U` the upper Cholesky factor of `H⁻¹`,
//! `w[j] −= (w[c] − ŵ[c]) / U[c][c] · U[c][j]` for every `j > c`.
//!
//! Scales (and zero points, level tables, outliers) are not touched: the caller's encoder chose them
//! from the original weight, and only the choice of each code changes. So every row is independent,
//! and rows are worked on in tiles that share each row of `U` while it is in cache. Columns are taken
//! in descending order of `H`'s diagonal (GPTQ's "act order"), which fixed scales make free.
//!
//! The factorisation is in f64: `H + λ·mean(diag H)·I` (λ = `damp`, raised tenfold while the matrix is
//! not positive definite), channels that calibration never saw (zero diagonal) kept apart so that their
//! weights are rounded to nearest and their error goes nowhere.

use rayon::prelude::*;

/// The second moment `XᵀX / n` of a layer's input over calibration data, `k × k` row-major.
/// Rows are buffered and folded in by matrix products of [`FOLD_ROWS`] rows, into f32 sums (as
/// GPTQ's own implementation keeps them); the factorisation works in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Hessian {
    pub k: usize,
    sum: ndarray::Array2<f32>,
    /// Rows not yet folded into `sum`, `[pending, k]` row-major.
    pending: Vec<f32>,
    /// Input rows seen.
    pub rows: u64,
}

/// How a convolution pads its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoPad {
    /// `pads` as given.
    Explicit,
    Valid,
    SameUpper,
    SameLower,
}

/// Kernel, strides, dilations and pads (`[begin…, end…]`) of a 1-D or 2-D convolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads: Vec<usize>,
    pub auto_pad: AutoPad,
}

/// Most patch rows taken from one convolution input tensor (output positions are sampled evenly
/// beyond this).
pub const MAX_PATCH_ROWS: usize = 8192;

/// Rows gathered before one `XᵀX` product: few-row products would spend their time on the `k × k`
/// sum, not on the multiply-adds.
pub const FOLD_ROWS: usize = 512;

impl Hessian {
    pub fn new(k: usize) -> Self {
        Hessian {
            k,
            sum: ndarray::Array2::zeros((k, k)),
            pending: Vec::new(),
            rows: 0,
        }
    }

    /// Folds `n` rows of `x` (`[n, k]`) in.
    pub fn add_rows(&mut self, x: ndarray::ArrayView2<f32>) {
        assert_eq!(x.ncols(), self.k, "rows of the wrong width");
        for row in x.rows() {
            self.pending.extend(row.iter());
            if self.pending.len() >= FOLD_ROWS * self.k {
                self.fold();
            }
        }
        self.rows += x.nrows() as u64;
    }

    /// `sum += PᵀP` over the pending rows, upper triangle only (the matrix is symmetric), in
    /// bands of rows worked on in parallel.
    fn fold(&mut self) {
        let n = self.pending.len() / self.k.max(1);
        if n == 0 {
            return;
        }
        let p = ndarray::ArrayView2::from_shape((n, self.k), &self.pending)
            .expect("pending rows are whole");
        const BAND: usize = 128;
        let bands: Vec<_> = self
            .sum
            .axis_chunks_iter_mut(ndarray::Axis(0), BAND)
            .collect();
        bands.into_par_iter().enumerate().for_each(|(b, mut band)| {
            let at = b * BAND;
            let rows = band.nrows();
            let left = p.slice(ndarray::s![.., at..at + rows]);
            let right = p.slice(ndarray::s![.., at..]);
            let mut out = band.slice_mut(ndarray::s![.., at..]);
            ndarray::linalg::general_mat_mul(1.0, &left.t(), &right, 1.0, &mut out);
        });
        self.pending.clear();
    }

    /// Folds in the patch rows of a convolution's input `x` (`[N, C, spatial…]`, 1-D or 2-D): one
    /// row per output position (every `step`-th, so that at most [`MAX_PATCH_ROWS`] are taken from
    /// one tensor), its columns in the weight's `(channel, kernel position)` order, zeros where the
    /// patch reaches into padding. Returns false (nothing folded) when the shapes do not fit.
    pub fn add_patches(&mut self, x: ndarray::ArrayViewD<f32>, g: &ConvGeometry) -> bool {
        let sp = g.kernel.len();
        if x.ndim() != 2 + sp || !(1..=2).contains(&sp) {
            return false;
        }
        let (n, c) = (x.shape()[0], x.shape()[1]);
        // Work in 2-D: a 1-D convolution is one of height 1.
        let dims = |v: &[usize], one: usize| -> [usize; 2] {
            if sp == 1 { [one, v[0]] } else { [v[0], v[1]] }
        };
        let size = dims(&x.shape()[2..], 1);
        let kernel = dims(&g.kernel, 1);
        let strides = dims(&g.strides, 1);
        let dilations = dims(&g.dilations, 1);
        if c * kernel[0] * kernel[1] != self.k {
            return false;
        }
        let mut begin = [0usize; 2];
        let mut out = [0usize; 2];
        for a in 0..2 {
            let reach = (kernel[a] - 1) * dilations[a] + 1;
            let (b, e) = match g.auto_pad {
                AutoPad::Explicit if sp == 1 && a == 0 => (0, 0),
                AutoPad::Explicit => {
                    let a2 = if sp == 1 { 0 } else { a };
                    (g.pads[a2], g.pads[a2 + sp])
                }
                AutoPad::Valid => (0, 0),
                AutoPad::SameUpper | AutoPad::SameLower => {
                    let o = size[a].div_ceil(strides[a]);
                    let total = ((o.max(1) - 1) * strides[a] + reach).saturating_sub(size[a]);
                    let small = total / 2;
                    if g.auto_pad == AutoPad::SameUpper {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    }
                }
            };
            begin[a] = b;
            let padded = size[a] + b + e;
            if padded < reach {
                return false;
            }
            out[a] = (padded - reach) / strides[a] + 1;
        }
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        let positions = n * out[0] * out[1];
        let step = positions.div_ceil(MAX_PATCH_ROWS).max(1);
        let mut row = vec![0f32; self.k];
        for p in (0..positions).step_by(step) {
            let (b, rest) = (p / (out[0] * out[1]), p % (out[0] * out[1]));
            let (oy, ox) = (rest / out[1], rest % out[1]);
            let mut col = 0;
            for ch in 0..c {
                let plane = &xs[(b * c + ch) * size[0] * size[1]..][..size[0] * size[1]];
                for i in 0..kernel[0] {
                    let iy = (oy * strides[0] + i * dilations[0]) as isize - begin[0] as isize;
                    for j in 0..kernel[1] {
                        let ix = (ox * strides[1] + j * dilations[1]) as isize - begin[1] as isize;
                        row[col] = if iy >= 0
                            && ix >= 0
                            && (iy as usize) < size[0]
                            && (ix as usize) < size[1]
                        {
                            plane[iy as usize * size[1] + ix as usize]
                        } else {
                            0.0
                        };
                        col += 1;
                    }
                }
            }
            self.pending.extend_from_slice(&row);
            self.rows += 1;
            if self.pending.len() >= FOLD_ROWS * self.k {
                self.fold();
            }
        }
        true
    }

    /// Folds the rows still buffered; called before the sums are read.
    pub fn finish(&mut self) {
        self.fold();
        self.pending = Vec::new();
    }

    /// Entry (i, j) of `XᵀX / n` (from the upper triangle, the one summed).
    fn at(&self, i: usize, j: usize) -> f64 {
        self.sum[[i.min(j), i.max(j)]] as f64 / self.rows.max(1) as f64
    }

    /// The diagonal of `XᵀX / n`: each input channel's mean x².
    pub fn diagonal(&self) -> Vec<f64> {
        (0..self.k).map(|i| self.at(i, i)).collect()
    }
}

/// `h` with every buffered row folded in.
fn finished(h: &Hessian) -> std::borrow::Cow<'_, Hessian> {
    if h.pending.is_empty() {
        std::borrow::Cow::Borrowed(h)
    } else {
        let mut c = h.clone();
        c.finish();
        std::borrow::Cow::Owned(c)
    }
}

/// The upper Cholesky factor `U` of `(H + damping)⁻¹` over the columns in `order`, in f32, with the
/// damping used. Err when no damping up to 100 × the mean diagonal makes it positive definite.
pub fn inverse_factor(h: &Hessian, order: &[usize], damp: f64) -> Result<(Vec<f32>, f64), String> {
    let h = &*finished(h);
    let k = h.k;
    let (live, mean) = live_mean(h)?;
    let mut lambda = damp.max(1e-6);
    while lambda <= 100.0 {
        // With J the reversal, chol(J H J) = L Lᵀ gives U = J L⁻¹ J: upper, and Uᵀ U = H⁻¹.
        let mut a = ndarray::Array2::<f64>::zeros((k, k));
        for (ri, &i) in order.iter().rev().enumerate() {
            for (rj, &j) in order.iter().rev().enumerate() {
                a[[ri, rj]] = if !live[i] || !live[j] {
                    if i == j { 1.0 } else { 0.0 }
                } else if i == j {
                    h.at(i, j) + lambda * mean
                } else {
                    h.at(i, j)
                };
            }
        }
        if cholesky_lower(a.view_mut()) {
            let inv = invert_lower(a.view());
            // U[p][q] = L⁻¹[k−1−p][k−1−q], rows of U in `order`'s positions.
            let mut u = vec![0f32; k * k];
            for p in 0..k {
                for q in p..k {
                    u[p * k + q] = inv[[k - 1 - p, k - 1 - q]] as f32;
                }
            }
            return Ok((u, lambda));
        }
        lambda *= 10.0;
    }
    Err("the calibration Hessian is not positive definite even with damping".into())
}

/// Which input channels calibration reached (a positive, finite diagonal), and their mean diagonal.
fn live_mean(h: &Hessian) -> Result<(Vec<bool>, f64), String> {
    let diag = h.diagonal();
    let live: Vec<bool> = diag.iter().map(|&d| d > 0.0 && d.is_finite()).collect();
    let (s, c) = diag
        .iter()
        .zip(&live)
        .filter(|(_, l)| **l)
        .fold((0.0, 0usize), |(s, c), (d, _)| (s + d, c + 1));
    if c == 0 {
        return Err("calibration never reached this layer's inputs".into());
    }
    Ok((live, s / c as f64))
}

/// `XᵀX / n + lambda · mean(diag) · I` as a full symmetric `k × k` matrix, channels calibration never
/// reached keeping only the damping: the quadratic form of a layer's output error that
/// [`inverse_factor`]'s damping stands for.
pub fn damped(h: &Hessian, lambda: f64) -> Result<ndarray::Array2<f32>, String> {
    let h = &*finished(h);
    let (live, mean) = live_mean(h)?;
    let k = h.k;
    let mut a = ndarray::Array2::<f32>::zeros((k, k));
    for i in 0..k {
        for j in i..k {
            let v = if live[i] && live[j] { h.at(i, j) } else { 0.0 };
            let v = if i == j { v + lambda * mean } else { v };
            a[[i, j]] = v as f32;
            a[[j, i]] = v as f32;
        }
    }
    Ok(a)
}

/// `m · H` for `H` symmetric, in bands of rows worked on in parallel.
pub(crate) fn times_h(
    m: ndarray::ArrayView2<f32>,
    h: &ndarray::Array2<f32>,
) -> ndarray::Array2<f32> {
    let mut out = ndarray::Array2::<f32>::zeros((m.nrows(), h.ncols()));
    const BAND: usize = 64;
    let bands: Vec<_> = out
        .axis_chunks_iter_mut(ndarray::Axis(0), BAND)
        .zip(m.axis_chunks_iter(ndarray::Axis(0), BAND))
        .collect();
    bands
        .into_par_iter()
        .for_each(|(mut o, a)| ndarray::linalg::general_mat_mul(1.0, &a, h, 0.0, &mut o));
    out
}

/// The relative output error `Σ eᵀHe / Σ wᵀHw` over the rows of a `[channels, k]` weight `w` and its
/// stand-in `q`, with `H` the calibration Hessian undamped (channels calibration never reached count
/// nothing): how much of the layer's output on the calibration inputs the change costs, input
/// correlations included. Err when the Hessian does not fit or the weight has no output there.
pub fn output_nsr(w: &[f32], q: &[f32], channels: usize, h: &Hessian) -> Result<f64, String> {
    let k = h.k;
    if w.len() != channels * k || q.len() != w.len() {
        return Err(format!(
            "the calibration Hessian is {k}×{k}, the weight has {} values over {channels} channels",
            w.len()
        ));
    }
    let hd = damped(h, 0.0)?;
    let quad = |m: &[f32]| -> f64 {
        let mv = ndarray::ArrayView2::from_shape((channels, k), m).expect("checked shape");
        let mh = times_h(mv, &hd);
        m.iter()
            .zip(mh.iter())
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    };
    let err: Vec<f32> = w.iter().zip(q).map(|(a, b)| a - b).collect();
    let signal = quad(w);
    if signal.is_nan() || signal <= 0.0 {
        return Err("the weight has no output on the calibration data".into());
    }
    Ok(quad(&err).max(0.0) / signal)
}

/// Below this size the factorisations run column by column; above, they split in halves and the
/// off-diagonal work is matrix products (matrixmultiply's kernels).
const BLOCK: usize = 96;

/// In-place lower Cholesky of a symmetric matrix (the strict upper triangle is zeroed); false when a
/// pivot is not positive.
fn cholesky_lower(mut a: ndarray::ArrayViewMut2<f64>) -> bool {
    let n = a.nrows();
    if n <= BLOCK {
        for j in 0..n {
            let mut d = a[[j, j]];
            for m in 0..j {
                d -= a[[j, m]] * a[[j, m]];
            }
            if !(d > 0.0 && d.is_finite()) {
                return false;
            }
            let d = d.sqrt();
            a[[j, j]] = d;
            for i in j + 1..n {
                let mut v = a[[i, j]];
                for m in 0..j {
                    v -= a[[i, m]] * a[[j, m]];
                }
                a[[i, j]] = v / d;
            }
            for i in 0..j {
                a[[i, j]] = 0.0;
            }
        }
        return true;
    }
    let h = n / 2;
    let (mut top, mut bottom) = a.view_mut().split_at(ndarray::Axis(0), h);
    let mut a11 = top.slice_mut(ndarray::s![.., ..h]);
    if !cholesky_lower(a11.view_mut()) {
        return false;
    }
    // L21 = A21 · L11⁻ᵀ; A22 −= L21 · L21ᵀ.
    let inv11 = invert_lower(a11.view());
    let (mut a21, mut a22) = bottom.view_mut().split_at(ndarray::Axis(1), h);
    let l21 = a21.dot(&inv11.t());
    a21.assign(&l21);
    // The trailing update in two bands of rows, one per thread.
    let half = a22.nrows() / 2;
    let (mut up, mut down) = a22.view_mut().split_at(ndarray::Axis(0), half);
    let (l_up, l_down) = l21.view().split_at(ndarray::Axis(0), half);
    rayon::join(
        || ndarray::linalg::general_mat_mul(-1.0, &l_up, &l21.t(), 1.0, &mut up),
        || ndarray::linalg::general_mat_mul(-1.0, &l_down, &l21.t(), 1.0, &mut down),
    );
    top.slice_mut(ndarray::s![.., h..]).fill(0.0);
    cholesky_lower(a22)
}

/// The inverse of a lower-triangular matrix (lower as well).
fn invert_lower(l: ndarray::ArrayView2<f64>) -> ndarray::Array2<f64> {
    let n = l.nrows();
    let mut out = ndarray::Array2::<f64>::zeros((n, n));
    if n <= BLOCK {
        for j in 0..n {
            out[[j, j]] = 1.0 / l[[j, j]];
            for i in j + 1..n {
                let mut v = 0.0;
                for m in j..i {
                    v += l[[i, m]] * out[[m, j]];
                }
                out[[i, j]] = -v / l[[i, i]];
            }
        }
        return out;
    }
    // [L11 0; L21 L22]⁻¹ = [M11 0; −M22 L21 M11  M22].
    let h = n / 2;
    let (m11, m22) = rayon::join(
        || invert_lower(l.slice(ndarray::s![..h, ..h])),
        || invert_lower(l.slice(ndarray::s![h.., h..])),
    );
    let m21 = -m22.dot(&l.slice(ndarray::s![h.., ..h]).dot(&m11));
    out.slice_mut(ndarray::s![..h, ..h]).assign(&m11);
    out.slice_mut(ndarray::s![h.., h..]).assign(&m22);
    out.slice_mut(ndarray::s![h.., ..h]).assign(&m21);
    out
}

/// Rows rounded together, sharing each row of `U`.
const TILE: usize = 8;

/// What error-compensating rounding gave: a code and its decoded value for every weight, in the
/// input's layout, and the value each weight had when its turn came (what an exact outlier store
/// must keep).
pub struct Rounded {
    pub codes: Vec<i32>,
    pub decoded: Vec<f32>,
    pub compensated: Vec<f32>,
    /// The damping the factorisation needed (× the mean diagonal).
    pub damping: f64,
}

/// Feedback runs on as few as `k / FEWEST_ROWS_PER` calibration rows for `k` input channels.
pub(crate) const FEWEST_ROWS_PER: usize = 4;

/// Whether error feedback can run on a `[channels, k]` matrix of `len` values with `h`: the
/// Hessian's size is `k`, and calibration gave at least `k / FEWEST_ROWS_PER` input rows.
pub(crate) fn fits(len: usize, channels: usize, k: usize, h: &Hessian) -> Result<(), String> {
    if h.k != k {
        return Err(format!(
            "the calibration Hessian is {}×{}, the weight's rows have {k} columns",
            h.k, h.k
        ));
    }
    if len != channels * k {
        return Err(format!("{len} values for a [{channels}, {k}] matrix"));
    }
    let min_rows = k.div_ceil(FEWEST_ROWS_PER) as u64;
    if h.rows < min_rows {
        return Err(format!(
            "calibration gave {} input rows for {k} input channels, too few for error feedback \
             (it needs {min_rows})",
            h.rows
        ));
    }
    Ok(())
}

/// The damping for a Hessian of `rows` calibration rows over `k` channels: `damp` from `k` rows on,
/// grown by `k / rows` below. With fewer rows than channels `XᵀX` is singular and the sample
/// covariance noisy; unshrunk, the rounding would fit the calibration rows' span and push the error
/// into directions other data has. Shrinking toward the diagonal the more, the fewer rows back it
/// keeps the gain on data the fit never saw (MiniLM-L3's FFN down-projections, 736 rows for 1536
/// channels: see docs/features.md).
pub(crate) fn damp_for_rows(damp: f64, k: usize, rows: u64) -> f64 {
    damp * (k as f64 / rows.max(1) as f64).max(1.0)
}

/// Rounds a `[channels, k]` matrix column by column with error feedback (see the module docs).
/// `round(flat index, value)` gives the code the caller's scheme assigns to `value` at that place and
/// the value the code decodes to.
pub fn round_with_feedback(
    w: &[f32],
    channels: usize,
    k: usize,
    h: &Hessian,
    damp: f64,
    round: impl Fn(usize, f32) -> (i32, f32) + Sync,
) -> Result<Rounded, String> {
    fits(w.len(), channels, k, h)?;
    let damp = damp_for_rows(damp, k, h.rows);
    let h = &*finished(h);
    // Largest diagonal first; ties by index, so the order is deterministic.
    let diag = h.diagonal();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]).then(a.cmp(&b)));
    let (u, damping) = inverse_factor(h, &order, damp)?;
    let mut codes = vec![0i32; w.len()];
    let mut decoded = vec![0f32; w.len()];
    let mut compensated = vec![0f32; w.len()];
    let tiles = w.len().div_ceil(TILE * k.max(1));
    let work: Vec<(usize, &[f32])> = w.chunks(TILE * k.max(1)).enumerate().collect();
    let results: Vec<(Vec<i32>, Vec<f32>, Vec<f32>)> = work
        .into_par_iter()
        .map(|(t, chunk)| {
            let rows = chunk.len() / k.max(1);
            // The tile's rows in `order`'s column positions.
            let mut p = vec![0f32; chunk.len()];
            for r in 0..rows {
                for (q, &c) in order.iter().enumerate() {
                    p[r * k + q] = chunk[r * k + c];
                }
            }
            let mut c_out = vec![0i32; chunk.len()];
            let mut d_out = vec![0f32; chunk.len()];
            let mut v_out = vec![0f32; chunk.len()];
            let mut err = [0f32; TILE];
            for q in 0..k {
                let urow = &u[q * k..(q + 1) * k];
                let pivot = urow[q];
                let col = order[q];
                for r in 0..rows {
                    let flat = (t * TILE + r) * k + col;
                    let v = p[r * k + q];
                    let (code, dv) = round(flat, v);
                    c_out[r * k + col] = code;
                    d_out[r * k + col] = dv;
                    v_out[r * k + col] = v;
                    err[r] = (v - dv) / pivot;
                }
                let tail = &urow[q + 1..];
                for r in 0..rows {
                    let e = err[r];
                    if e == 0.0 {
                        continue;
                    }
                    let row = &mut p[r * k + q + 1..(r + 1) * k];
                    for (x, &uu) in row.iter_mut().zip(tail) {
                        *x -= e * uu;
                    }
                }
            }
            (c_out, d_out, v_out)
        })
        .collect();
    debug_assert_eq!(results.len(), tiles);
    for (t, (c, d, v)) in results.into_iter().enumerate() {
        let at = t * TILE * k;
        codes[at..at + c.len()].copy_from_slice(&c);
        decoded[at..at + d.len()].copy_from_slice(&d);
        compensated[at..at + v.len()].copy_from_slice(&v);
    }
    Ok(Rounded {
        codes,
        decoded,
        compensated,
        damping,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{Rng, SeedableRng};

    fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
        let u1 = (rng.next_u32() as f64 + 1.0) / (u32::MAX as f64 + 2.0);
        let u2 = rng.next_u32() as f64 / u32::MAX as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Correlated inputs with uneven channel energy, like a layer's activations.
    fn inputs(n: usize, k: usize, rng: &mut ChaCha8Rng) -> ndarray::Array2<f32> {
        let mix: Vec<f32> = (0..k * k)
            .map(|_| gaussian(rng) / (k as f32).sqrt())
            .collect();
        let mut x = ndarray::Array2::<f32>::zeros((n, k));
        for i in 0..n {
            let z: Vec<f32> = (0..k).map(|_| gaussian(rng)).collect();
            for j in 0..k {
                let s: f32 = (0..k).map(|m| z[m] * mix[m * k + j]).sum();
                x[[i, j]] = s * (1.0 + 3.0 * (j % 7 == 0) as u8 as f32) + 0.5 * z[j];
            }
        }
        x
    }

    fn output_error(x: &ndarray::Array2<f32>, w: &[f32], q: &[f32], k: usize) -> f64 {
        let ch = w.len() / k;
        let mut e = 0f64;
        for row in x.rows() {
            for c in 0..ch {
                let d: f64 = (0..k)
                    .map(|j| (row[j] * (w[c * k + j] - q[c * k + j])) as f64)
                    .sum();
                e += d * d;
            }
        }
        e
    }

    #[test]
    fn output_nsr_is_the_relative_output_error_on_the_inputs() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, k, ch) = (200, 24, 5);
        let x = inputs(n, k, &mut rng);
        let mut h = Hessian::new(k);
        h.add_rows(x.view());
        h.finish();
        let w: Vec<f32> = (0..ch * k).map(|_| gaussian(&mut rng)).collect();
        let q: Vec<f32> = w.iter().map(|v| (v * 4.0).round() / 4.0).collect();
        let zero = vec![0f32; w.len()];
        let expected = output_error(&x, &w, &q, k) / output_error(&x, &w, &zero, k);
        let got = output_nsr(&w, &q, ch, &h).unwrap();
        assert!(
            (got - expected).abs() <= 1e-4 * expected,
            "{got} vs {expected}"
        );
        assert_eq!(output_nsr(&w, &w, ch, &h).unwrap(), 0.0);
        assert!(output_nsr(&w, &q, ch + 1, &h).is_err());
    }

    #[test]
    fn feedback_lowers_the_output_error_of_rounding() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, k, ch) = (256, 48, 20);
        let x = inputs(n, k, &mut rng);
        let w: Vec<f32> = (0..ch * k).map(|_| gaussian(&mut rng)).collect();
        let mut h = Hessian::new(k);
        h.add_rows(x.view());
        assert_eq!(h.rows, n as u64);
        // 3-bit symmetric per-row scales.
        let scales: Vec<f32> = w
            .chunks(k)
            .map(|r| r.iter().fold(0f32, |m, v| m.max(v.abs())) / 3.0)
            .collect();
        let round = |i: usize, v: f32| {
            let s = scales[i / k];
            let c = (v / s).round().clamp(-4.0, 3.0);
            (c as i32, c * s)
        };
        let nearest: Vec<f32> = w.iter().enumerate().map(|(i, &v)| round(i, v).1).collect();
        let r = round_with_feedback(&w, ch, k, &h, 0.01, round).unwrap();
        for (i, (&c, &d)) in r.codes.iter().zip(&r.decoded).enumerate() {
            assert_eq!(c as f32 * scales[i / k], d);
        }
        let (a, b) = (
            output_error(&x, &w, &nearest, k),
            output_error(&x, &w, &r.decoded, k),
        );
        assert!(b < 0.7 * a, "feedback {b} vs nearest {a}");
        // Deterministic, whatever the thread count.
        let again = round_with_feedback(&w, ch, k, &h, 0.01, round).unwrap();
        assert_eq!(again.codes, r.codes);
    }

    #[test]
    fn the_inverse_factor_is_the_cholesky_of_the_inverse() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // Large enough for the blocked factorisations to split twice.
        let k = 200;
        let x = inputs(400, k, &mut rng);
        let mut h = Hessian::new(k);
        h.add_rows(x.view());
        h.finish();
        let order: Vec<usize> = (0..k).collect();
        let (u, lambda) = inverse_factor(&h, &order, 0.01).unwrap();
        let mean = h.diagonal().iter().sum::<f64>() / k as f64;
        // (Uᵀ U)(H + λ·mean·I) = I.
        let hd = |i: usize, j: usize| h.at(i, j) + if i == j { lambda * mean } else { 0.0 };
        let inv: Vec<f64> = (0..k * k)
            .map(|ij| {
                let (a, b) = (ij / k, ij % k);
                (0..k)
                    .map(|m| u[m * k + a] as f64 * u[m * k + b] as f64)
                    .sum()
            })
            .collect();
        for i in 0..k {
            assert!((0..i).all(|j| u[i * k + j] == 0.0), "U is upper");
            for j in 0..k {
                let p: f64 = (0..k).map(|m| inv[i * k + m] * hd(m, j)).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((p - want).abs() < 1e-3, "({i},{j}) {p}");
            }
        }
    }

    #[test]
    fn channels_never_seen_are_rounded_to_nearest() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let k = 16;
        let mut x = inputs(64, k, &mut rng);
        x.column_mut(5).fill(0.0);
        let mut h = Hessian::new(k);
        h.add_rows(x.view());
        let w: Vec<f32> = (0..4 * k).map(|_| gaussian(&mut rng)).collect();
        let round = |_: usize, v: f32| {
            let c = (v / 0.25).round();
            (c as i32, c * 0.25)
        };
        let r = round_with_feedback(&w, 4, k, &h, 0.01, round).unwrap();
        assert!(r.decoded.iter().all(|v| v.is_finite()));
        // A dead channel takes no error from the others (its row of U is the identity).
        let order: Vec<usize> = (0..k).collect();
        let (u, _) = inverse_factor(&h, &order, 0.01).unwrap();
        assert!(
            (0..k)
                .filter(|&j| j != 5)
                .all(|j| u[5 * k + j] == 0.0 && u[j * k + 5] == 0.0)
        );
    }

    #[test]
    fn convolution_patches_are_the_rows_the_kernel_multiplies() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, c, hh, ww) = (2, 3, 7, 6);
        let x = ndarray::Array4::<f32>::from_shape_fn((n, c, hh, ww), |_| gaussian(&mut rng));
        let g = ConvGeometry {
            kernel: vec![3, 2],
            strides: vec![2, 1],
            dilations: vec![1, 2],
            pads: vec![1, 0, 1, 1],
            auto_pad: AutoPad::Explicit,
        };
        let k = c * 3 * 2;
        let mut h = Hessian::new(k);
        assert!(h.add_patches(x.view().into_dyn(), &g));
        h.finish();
        // Naive im2col: output positions from the padded size.
        let (oh, ow) = ((hh + 1 + 1 - 3) / 2 + 1, ww + 1 - 3 + 1);
        let mut want = vec![0f64; k * k];
        let mut rows = 0;
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut row = Vec::with_capacity(k);
                    for ch in 0..c {
                        for i in 0..3 {
                            for j in 0..2 {
                                let iy = (oy * 2 + i) as isize - 1;
                                let ix = (ox + j * 2) as isize;
                                let inside = iy >= 0 && (iy as usize) < hh && (ix as usize) < ww;
                                row.push(if inside {
                                    x[[b, ch, iy as usize, ix as usize]]
                                } else {
                                    0.0
                                });
                            }
                        }
                    }
                    for p in 0..k {
                        for q in 0..k {
                            want[p * k + q] += row[p] as f64 * row[q] as f64;
                        }
                    }
                    rows += 1;
                }
            }
        }
        assert_eq!(h.rows, rows);
        for p in 0..k {
            for q in 0..k {
                let got = h.at(p, q) * rows as f64;
                assert!(
                    (got - want[p * k + q]).abs() < 1e-3,
                    "({p},{q}) {got} vs {}",
                    want[p * k + q]
                );
            }
        }
        // A 1-D convolution is one of height 1; a kernel that does not fit is refused.
        let x1 = ndarray::Array3::<f32>::from_shape_fn((1, 2, 9), |_| gaussian(&mut rng));
        let g1 = ConvGeometry {
            kernel: vec![3],
            strides: vec![1],
            dilations: vec![1],
            pads: vec![0, 0],
            auto_pad: AutoPad::SameUpper,
        };
        let mut h1 = Hessian::new(6);
        assert!(h1.add_patches(x1.view().into_dyn(), &g1));
        assert_eq!(h1.rows, 9);
        assert!(!Hessian::new(5).add_patches(x1.view().into_dyn(), &g1));
    }
}
