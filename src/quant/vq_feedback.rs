//! Vector quantization for the layer's output, not its weights: codes chosen with error feedback
//! through the inverse Hessian, and codebooks and scales refitted by least squares against the
//! output error (the ideas of GPTVQ, van Baalen et al. 2024, on quench's own codebook layout).
//!
//! The quantity kept small is `Σ_r (w_r − ŵ_r)ᵀ H (w_r − ŵ_r)` over the rows of a `[channels, k]`
//! weight, with `H = XᵀX / n` the input Hessian of calibration data (damped as in [`super::gptq`]):
//! the squared error of the layer's outputs on that data. Starting from the plain clustering of
//! [`super::vq::encode`], each round
//!
//! 1. **assigns** every piece of every row in order along `k`, by the distance the output error
//!    puts on it. With `U` the upper Cholesky factor of `H⁻¹` and `B` a piece's columns, choosing
//!    `ŵ_B` costs `‖U_BB⁻ᵀ (v_B − ŵ_B)‖²`, where `v` is the row with the errors of the pieces before
//!    pushed onto it, `v_R −= (U_BB⁻ᵀ e_B)ᵀ U_BR` for the columns `R` after the piece (scalar GPTQ is the
//!    case of one-column pieces). One metric per piece serves every row, so the codebook is
//!    transformed once per piece and each row searches it in plain Euclidean distance;
//!    residual stages are searched greedily in the same metric.
//! 2. **refits** the codebooks with the codes fixed: the objective is quadratic in them, and
//!    conjugate gradients solve its normal equations through products with `H`. Then each row's
//!    scale has a closed form, `s_r = u_rᵀ H w_r / u_rᵀ H u_r` for the row's decoded shape `u_r`.
//!
//! The plain clustering refitted is a candidate too; the encoding with the lowest objective on
//! the fitted data is kept. Rows are independent in step 1 and worked on in parallel tiles; results
//! land by index, so the output does not depend on the thread count.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::gptq::{self, Hessian, times_h};
use super::vq::VqEncoded;

/// What the refinement reached, as relative output errors `Σ eᵀHe / Σ wᵀHw` on the fitted data.
#[derive(Clone, Debug, PartialEq)]
pub struct Refined {
    /// The plain clustering's.
    pub plain_nsr: f64,
    /// The kept encoding's.
    pub nsr: f64,
    /// The damping of `H`, × its mean diagonal.
    pub damping: f64,
    /// Rounds of assignment with feedback run, and the one kept (0: the plain codes refitted).
    pub rounds: usize,
    pub kept_round: usize,
}

/// Conjugate-gradient steps per codebook refit (warm-started from the current codebook).
const CG_STEPS: usize = 12;

/// Rows assigned together, sharing each piece's transformed codebook while it is in cache.
const TILE: usize = 8;

/// Refines `e`, encoded from `w` (`[channels, k]`), against the input Hessian `h` of its rows'
/// columns; `rounds` rounds of assignment with feedback and refit. Leaves `e` as it was on error.
pub fn refine(
    e: &mut VqEncoded,
    w: &[f32],
    h: &Hessian,
    damp: f64,
    rounds: usize,
) -> Result<Refined, String> {
    let (channels, k) = (e.channels, e.k);
    gptq::fits(w.len(), channels, k, h)?;
    if !e.outliers.is_empty() {
        return Err("error feedback does not take kept outliers".into());
    }
    let natural: Vec<usize> = (0..k).collect();
    let damp = gptq::damp_for_rows(damp, k, h.rows);
    let (u, damping) = gptq::inverse_factor(h, &natural, damp)?;
    let hd = gptq::damped(h, damping)?;
    let wm = ArrayView2::from_shape((channels, k), w).map_err(|e| e.to_string())?;
    let wh = times_h(wm, &hd);
    let signal: f64 = dot(w, wh.as_slice().expect("standard layout"));
    if signal.is_nan() || signal <= 0.0 {
        return Err("the weight has no output on the calibration data".into());
    }
    let objective = |e: &VqEncoded| -> f64 {
        let err: Vec<f32> = w.iter().zip(e.decode()).map(|(a, b)| a - b).collect();
        let em = ArrayView2::from_shape((channels, k), &err).expect("shape");
        dot(&err, times_h(em, &hd).as_slice().expect("standard layout"))
    };
    let plain = objective(e);
    let mut cur = e.clone();
    refit(&mut cur, &wh, &hd);
    let mut best = (objective(&cur), cur.clone(), 0);
    for round in 1..=rounds {
        assign(&mut cur, w, &u);
        refit(&mut cur, &wh, &hd);
        let f = objective(&cur);
        if f < best.0 {
            best = (f, cur.clone(), round);
        }
    }
    let (f, mut kept, kept_round) = best;
    if f >= plain {
        return Ok(Refined {
            plain_nsr: plain / signal,
            nsr: plain / signal,
            damping,
            rounds,
            kept_round: 0,
        });
    }
    recount(&mut kept);
    kept.sqnr_db = super::int::sqnr_db(w, &kept.decode());
    *e = kept;
    Ok(Refined {
        plain_nsr: plain / signal,
        nsr: f / signal,
        damping,
        rounds,
        kept_round,
    })
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Columns `a..b` of piece `p` (shorter than `dim` at the end of a row, empty in pure padding).
fn span(e: &VqEncoded, p: usize) -> (usize, usize) {
    let a = (p * e.dim).min(e.k);
    (a, ((p + 1) * e.dim).min(e.k))
}

/// Offset of a codebook entry in the flattened `[stages][subspaces, size, dim]` codebooks.
fn entry(e: &VqEncoded, stage: usize, p: usize, code: u16) -> usize {
    let s = p / e.pieces_per_subspace();
    ((stage * e.subspaces + s) * e.codebook_size + code as usize) * e.dim
}

/// Step 1 of the module docs: every code re-chosen with error feedback through `u`.
fn assign(e: &mut VqEncoded, w: &[f32], u: &[f32]) {
    let (k, d, pieces, size) = (e.k, e.dim, e.pieces(), e.codebook_size);
    let books: Vec<f32> = e.codebooks.concat();
    // Per piece: L = U_BB⁻ᵀ (row-major, d × d, lower) and the transformed codebooks with their norms.
    let metric: Vec<(Vec<f64>, Vec<f32>, Vec<f32>)> = (0..pieces)
        .into_par_iter()
        .map(|p| {
            let (a, b) = span(e, p);
            let n = b - a;
            let l = lower_inverse_transpose(u, k, a, n);
            let mut t = vec![0f32; e.stages * size * n];
            let mut norms = vec![0f32; e.stages * size];
            for st in 0..e.stages {
                for c in 0..size {
                    let src = &books[entry(e, st, p, c as u16)..][..n];
                    let dst = &mut t[(st * size + c) * n..][..n];
                    for i in 0..n {
                        dst[i] = (0..=i).map(|j| l[i * n + j] * src[j] as f64).sum::<f64>() as f32;
                    }
                    norms[st * size + c] = dst.iter().map(|v| v * v).sum();
                }
            }
            (l, t, norms)
        })
        .collect();
    let scales = &e.scales;
    let tiles: Vec<Vec<Vec<u16>>> = w
        .par_chunks(TILE * k)
        .enumerate()
        .map(|(ti, chunk)| {
            let rows = chunk.len() / k;
            let mut v = chunk.to_vec();
            let mut codes = vec![vec![0u16; rows * pieces]; e.stages];
            let (mut target, mut err) = (vec![0f32; d], vec![0f64; d]);
            for p in 0..pieces {
                let (a, b) = span(e, p);
                let n = b - a;
                if n == 0 {
                    continue;
                }
                let (l, t, norms) = &metric[p];
                for r in 0..rows {
                    let s = scales[ti * TILE + r];
                    if s == 0.0 {
                        continue;
                    }
                    let row = &mut v[r * k..(r + 1) * k];
                    for i in 0..n {
                        target[i] = ((0..=i)
                            .map(|j| l[i * n + j] * row[a + j] as f64)
                            .sum::<f64>()
                            / s as f64) as f32;
                    }
                    // Greedy stages; the decoded piece accumulates in `err` as −ŵ/s.
                    err[..n].iter_mut().for_each(|x| *x = 0.0);
                    for st in 0..e.stages {
                        let mut best = (f32::INFINITY, 0usize);
                        for c in 0..size {
                            let tc = &t[(st * size + c) * n..][..n];
                            let mut dist = norms[st * size + c];
                            for i in 0..n {
                                dist -= 2.0 * target[i] * tc[i];
                            }
                            if dist < best.0 {
                                best = (dist, c);
                            }
                        }
                        let c = best.1;
                        codes[st][r * pieces + p] = c as u16;
                        let tc = &t[(st * size + c) * n..][..n];
                        for i in 0..n {
                            target[i] -= tc[i];
                        }
                        let src = &books[entry(e, st, p, c as u16)..][..n];
                        for i in 0..n {
                            err[i] -= src[i] as f64;
                        }
                    }
                    // e_B = v_B − s·Σ c; e' = L e_B; v_R −= e'ᵀ U_BR.
                    for i in 0..n {
                        err[i] = row[a + i] as f64 + s as f64 * err[i];
                    }
                    for i in (0..n).rev() {
                        err[i] = (0..=i).map(|j| l[i * n + j] * err[j]).sum();
                    }
                    for i in 0..n {
                        let ei = err[i] as f32;
                        if ei == 0.0 {
                            continue;
                        }
                        let urow = &u[(a + i) * k + b..(a + i + 1) * k];
                        for (x, &uu) in row[b..].iter_mut().zip(urow) {
                            *x -= ei * uu;
                        }
                    }
                }
            }
            codes
        })
        .collect();
    for (ti, codes) in tiles.into_iter().enumerate() {
        for (st, c) in codes.into_iter().enumerate() {
            let at = ti * TILE * pieces;
            e.codes[st][at..at + c.len()].copy_from_slice(&c);
        }
    }
}

/// `U_BB⁻ᵀ` for the `n × n` diagonal block of the upper factor `u` (`k × k`) at `a`, row-major lower.
fn lower_inverse_transpose(u: &[f32], k: usize, a: usize, n: usize) -> Vec<f64> {
    // Invert the upper block by back substitution, column by column, then transpose.
    let ub = |i: usize, j: usize| u[(a + i) * k + a + j] as f64;
    let mut inv = vec![0f64; n * n];
    for c in 0..n {
        for i in (0..=c).rev() {
            let mut s = if i == c { 1.0 } else { 0.0 };
            for j in i + 1..=c {
                s -= ub(i, j) * inv[j * n + c];
            }
            inv[i * n + c] = s / ub(i, i);
        }
    }
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            l[i * n + j] = inv[j * n + i];
        }
    }
    l
}

/// The rows' decoded shapes before scaling, `[channels, k]`, from codebooks `books` (flattened).
fn shapes(e: &VqEncoded, books: &[f32]) -> Vec<f32> {
    let (k, pieces) = (e.k, e.pieces());
    let mut out = vec![0f32; e.channels * k];
    out.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
        for st in 0..e.stages {
            for p in 0..pieces {
                let (a, b) = span(e, p);
                let src = &books[entry(e, st, p, e.codes[st][r * pieces + p])..];
                for j in a..b {
                    row[j] += src[j - a];
                }
            }
        }
    });
    out
}

/// The codebooks' gradient-shaped sum `Σ_r weight_r · D_rᵀ z_r` of rows `z` (`[channels, k]`).
fn scatter(e: &VqEncoded, z: &[f32], weight: &[f32]) -> Vec<f64> {
    let (k, pieces) = (e.k, e.pieces());
    let mut g = vec![0f64; e.codebooks.iter().map(Vec::len).sum()];
    for r in 0..e.channels {
        let row = &z[r * k..(r + 1) * k];
        for st in 0..e.stages {
            for p in 0..pieces {
                let (a, b) = span(e, p);
                let at = entry(e, st, p, e.codes[st][r * pieces + p]);
                for j in a..b {
                    g[at + j - a] += (weight[r] * row[j]) as f64;
                }
            }
        }
    }
    g
}

/// Step 2 of the module docs: codebooks by conjugate gradients, then scales in closed form.
/// `wh` is `W · H`.
fn refit(e: &mut VqEncoded, wh: &Array2<f32>, h: &Array2<f32>) {
    let (channels, k) = (e.channels, e.k);
    let s2: Vec<f32> = e.scales.iter().map(|s| s * s).collect();
    // Normal equations A x = b: A x = Σ_r s_r² D_rᵀ H D_r x, b = Σ_r s_r D_rᵀ H w_r.
    let apply = |x: &[f32]| -> Vec<f64> {
        let y = shapes(e, x);
        let ym = ArrayView2::from_shape((channels, k), &y).expect("shape");
        scatter(e, times_h(ym, h).as_slice().expect("standard layout"), &s2)
    };
    let b = scatter(e, wh.as_slice().expect("standard layout"), &e.scales);
    let mut x: Vec<f32> = e.codebooks.concat();
    let ax = apply(&x);
    let mut r: Vec<f64> = b.iter().zip(&ax).map(|(b, a)| b - a).collect();
    let mut p = r.clone();
    let mut rr: f64 = r.iter().map(|v| v * v).sum();
    let bb: f64 = b.iter().map(|v| v * v).sum();
    for _ in 0..CG_STEPS {
        if rr.is_nan() || rr <= 1e-12 * bb {
            break;
        }
        let pf: Vec<f32> = p.iter().map(|&v| v as f32).collect();
        let ap = apply(&pf);
        let pap: f64 = p.iter().zip(&ap).map(|(a, b)| a * b).sum();
        if pap.is_nan() || pap <= 0.0 {
            break;
        }
        let alpha = rr / pap;
        for i in 0..x.len() {
            x[i] += (alpha * p[i]) as f32;
            r[i] -= alpha * ap[i];
        }
        let next: f64 = r.iter().map(|v| v * v).sum();
        let beta = next / rr;
        rr = next;
        for i in 0..p.len() {
            p[i] = r[i] + beta * p[i];
        }
    }
    if x.iter().all(|v| v.is_finite()) {
        let per = e.codebooks[0].len();
        for (st, book) in e.codebooks.iter_mut().enumerate() {
            book.copy_from_slice(&x[st * per..(st + 1) * per]);
        }
    }
    // Scales: s_r = u_rᵀ H w_r / u_rᵀ H u_r.
    let y = shapes(e, &e.codebooks.concat());
    let ym = ArrayView2::from_shape((channels, k), &y).expect("shape");
    let uh = times_h(ym, h);
    for r in 0..channels {
        let uhr = &uh.as_slice().expect("standard layout")[r * k..(r + 1) * k];
        let yr = &y[r * k..(r + 1) * k];
        let (num, den) = (
            dot(
                yr,
                &wh.as_slice().expect("standard layout")[r * k..(r + 1) * k],
            ),
            dot(uhr, yr),
        );
        let s = num / den;
        if den > 0.0 && s.is_finite() && s != 0.0 {
            e.scales[r] = s as f32;
        }
    }
}

/// Code usage figures after the codes changed.
fn recount(e: &mut VqEncoded) {
    let (pps, pieces) = (e.pieces_per_subspace(), e.pieces());
    for st in &mut e.stats {
        let mut usage = vec![0u64; e.codebook_size];
        for (i, &c) in e.codes[st.stage].iter().enumerate() {
            if (i % pieces) / pps == st.subspace {
                usage[c as usize] += 1;
            }
        }
        (st.active, st.entropy_bits) = super::vq::usage_figures(&usage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::vq::{VqScheme, encode};
    use crate::util::gaussian;

    /// Correlated inputs with uneven channel energy, `[n, k]`.
    fn inputs(n: usize, k: usize) -> Array2<f32> {
        inputs_from(n, k, 11)
    }

    /// `n` rows of the same distribution as [`inputs`], drawn with `seed`.
    fn inputs_from(n: usize, k: usize, seed: u64) -> Array2<f32> {
        let z = gaussian(n * k, seed);
        let mix = gaussian(k * k, 12);
        let mut x = Array2::<f32>::zeros((n, k));
        for i in 0..n {
            for j in 0..k {
                let mut s = 0.0;
                for m in 0..k {
                    s += z[i * k + m] * mix[m * k + j] / (k as f32).sqrt();
                }
                x[[i, j]] = s * (1.0 + 3.0 * (j % 5 == 0) as u8 as f32) + 0.3 * z[i * k + j];
            }
        }
        x
    }

    fn output_error(x: &Array2<f32>, w: &[f32], q: &[f32], k: usize) -> f64 {
        let d: Vec<f32> = w.iter().zip(q).map(|(a, b)| a - b).collect();
        let dm = ArrayView2::from_shape((w.len() / k, k), &d).unwrap();
        let y = x.dot(&dm.t());
        y.iter().map(|v| (*v as f64).powi(2)).sum()
    }

    fn setup(k: usize, ch: usize) -> (Array2<f32>, Hessian, Vec<f32>) {
        let x = inputs(4 * k, k);
        let mut h = Hessian::new(k);
        h.add_rows(x.view());
        let w: Vec<f32> = gaussian(ch * k, 13)
            .chunks(k)
            .enumerate()
            .flat_map(|(r, row)| {
                row.iter()
                    .map(move |v| v * (1.0 + (r % 3) as f32))
                    .collect::<Vec<_>>()
            })
            .collect();
        (x, h, w)
    }

    #[test]
    fn feedback_and_refit_lower_the_output_error() {
        let (k, ch) = (96, 64);
        let (x, h, w) = setup(k, ch);
        for (dim, size, stages, subspaces) in [(4, 16, 1, 1), (2, 16, 2, 1), (3, 16, 1, 2)] {
            let s = VqScheme {
                dim,
                codebook_size: size,
                stages,
                subspaces,
                ..Default::default()
            };
            let plain = encode(&w, ch, k, &s, None).unwrap();
            let mut fed = plain.clone();
            let r = refine(&mut fed, &w, &h, 0.01, 3).unwrap();
            let (before, after) = (
                output_error(&x, &w, &plain.decode(), k),
                output_error(&x, &w, &fed.decode(), k),
            );
            assert!(r.nsr < r.plain_nsr, "{r:?}");
            // The output error on the fitted data falls by a third at least.
            assert!(after < 0.67 * before, "{}: {before} → {after}", s.label());
            // Codes stay in range and the layout is unchanged: decode agrees with a fresh count.
            assert!(fed.codes.iter().flatten().all(|&c| (c as usize) < size));
            assert_eq!(fed.decode().len(), w.len());
            // Deterministic.
            let mut again = plain.clone();
            refine(&mut again, &w, &h, 0.01, 3).unwrap();
            assert_eq!(again, fed);
        }
    }

    #[test]
    fn fewer_rows_than_channels_still_help_unseen_inputs() {
        // Half as many calibration rows as input channels: XᵀX is singular, the damping grows, and
        // the output error on rows the fit never saw still falls.
        let (k, ch) = (96, 64);
        let (_, _, w) = setup(k, ch);
        let mut h = Hessian::new(k);
        h.add_rows(inputs_from(k / 2, k, 21).view());
        let unseen = inputs_from(8 * k, k, 22);
        let s = VqScheme {
            codebook_size: 16,
            ..Default::default()
        };
        let plain = encode(&w, ch, k, &s, None).unwrap();
        let mut fed = plain.clone();
        let r = refine(&mut fed, &w, &h, 0.1, 3).unwrap();
        assert!(r.damping > 0.0 && r.nsr < r.plain_nsr, "{r:?}");
        let (before, after) = (
            output_error(&unseen, &w, &plain.decode(), k),
            output_error(&unseen, &w, &fed.decode(), k),
        );
        assert!(after < 0.9 * before, "{before} → {after} on unseen rows");
    }

    #[test]
    fn one_column_pieces_match_scalar_feedback_metric() {
        // With pieces of one value the transformed metric is 1/U_cc²: the same scale as GPTQ's.
        let u = vec![2.0f32, 0.5, 0.0, 4.0];
        let l = lower_inverse_transpose(&u, 2, 0, 2);
        // U = [[2, .5], [0, 4]]: U⁻¹ = [[.5, −.0625], [0, .25]], transposed.
        let want = [0.5, 0.0, -0.0625, 0.25];
        for (a, b) in l.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{l:?}");
        }
        assert!((lower_inverse_transpose(&u, 2, 1, 1)[0] - 0.25).abs() < 1e-12);
    }

    #[test]
    fn refusals_say_why() {
        let (k, ch) = (32, 8);
        let (_, h, w) = setup(k, ch);
        let s = VqScheme {
            codebook_size: 16,
            ..Default::default()
        };
        let mut e = encode(&w, ch, k, &s, None).unwrap();
        let few = {
            let mut h = Hessian::new(k);
            h.add_rows(inputs(4, k).view());
            h
        };
        let before = e.clone();
        assert!(
            refine(&mut e, &w, &few, 0.01, 2)
                .unwrap_err()
                .contains("too few")
        );
        assert!(
            refine(&mut e, &w[..k], &h, 0.01, 2)
                .unwrap_err()
                .contains("values")
        );
        assert_eq!(e, before);
    }
}
