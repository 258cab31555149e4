//! k-means for short vectors (d = 1…16), the engine of vector quantization.
//!
//! - Seeding: k-means++ (D² sampling) over a deterministic sample of at most [`SEED_SAMPLE`]·k points
//!   (all of them when fewer); for more than [`PLUSPLUS_MAX_K`] codes, distinct sample points.
//! - Lloyd iterations. The assignment step runs in parallel over fixed chunks of points and uses
//!   ‖x − c‖² = ‖x‖² + ‖c‖² − 2x·c, so each (point, code) pair costs d multiply-adds over a tile of
//!   points held in registers (AVX2/FMA when the CPU has it, detected at run time). The update step
//!   sums in f64 in point order, so the result is the same whatever the number of threads.
//! - Weights: optionally one weight per coordinate of every point (an importance, or 0 for a
//!   coordinate that does not count). The distance becomes Σ w·(x − c)² and each centroid coordinate
//!   the w-weighted mean of its points.
//! - Dead-code revival: after each update, codes that no point chose (or, during the first half of
//!   the iterations, that fewer than 1/64 of the mean usage chose) are moved onto the points with the
//!   largest error.
//! - Early stop when the total error improves by less than `tolerance` (relative) in an iteration
//!   without revival.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use rayon::prelude::*;

/// Points per k-means++ seed candidate: the sample holds at most this many points per code.
pub const SEED_SAMPLE: usize = 64;
/// Above this many codes, seeds are distinct sample points (k-means++ would cost O(sample·k·d)).
pub const PLUSPLUS_MAX_K: usize = 4096;
/// Points per parallel work item of the assignment step.
const CHUNK: usize = 4096;
/// Points a tile of the assignment kernel holds (two AVX registers of f32).
const LANES: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// Codes.
    pub k: usize,
    /// Most Lloyd iterations.
    pub iterations: usize,
    pub seed: u64,
    /// Stop when the error improves by less than this fraction in one iteration.
    pub tolerance: f64,
    /// Re-seed empty and rarely used codes.
    pub revive: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            k: 256,
            iterations: 20,
            seed: 0,
            tolerance: 1e-4,
            revive: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct KMeans {
    pub d: usize,
    /// `[k, d]` row-major.
    pub centroids: Vec<f32>,
    /// The nearest code of every point.
    pub assign: Vec<u32>,
    /// Lloyd updates run.
    pub iterations: usize,
    /// Codes re-seeded over all iterations.
    pub revived: usize,
    /// The (weighted) squared error of the final assignment.
    pub error: f64,
}

impl KMeans {
    pub fn k(&self) -> usize {
        self.centroids.len() / self.d.max(1)
    }

    pub fn centroid(&self, c: usize) -> &[f32] {
        &self.centroids[c * self.d..(c + 1) * self.d]
    }

    /// Points per code.
    pub fn usage(&self) -> Vec<u64> {
        let mut u = vec![0u64; self.k()];
        for &a in &self.assign {
            u[a as usize] += 1;
        }
        u
    }
}

/// Clusters `points` (`[n, d]` row-major) into `opts.k` codes. `weights`, when given, has one
/// non-negative weight per coordinate of every point (same length as `points`).
pub fn kmeans(points: &[f32], d: usize, weights: Option<&[f32]>, opts: &Options) -> KMeans {
    assert!(
        d > 0 && points.len().is_multiple_of(d),
        "points are [n, {d}]"
    );
    if let Some(w) = weights {
        assert_eq!(w.len(), points.len(), "one weight per coordinate");
    }
    let n = points.len() / d;
    let k = opts.k.max(1);
    let mut centroids = seed(points, d, weights, k, opts.seed);
    let mut assign = vec![0u32; n];
    let mut err = vec![0f32; n];
    let mut revived_total = 0;
    let mut iterations = 0;
    let mut last_error = f64::INFINITY;
    let mut revived_last = false;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x005E_ED0F_C0DE);
    loop {
        assign_all(points, d, weights, &centroids, &mut assign, &mut err);
        let error: f64 = err.iter().map(|&e| e.max(0.0) as f64).sum();
        let converged = !revived_last
            && last_error.is_finite()
            && (last_error - error) <= opts.tolerance * last_error.max(f64::MIN_POSITIVE);
        if iterations >= opts.iterations || converged || n <= k {
            return KMeans {
                d,
                centroids,
                assign,
                iterations,
                revived: revived_total,
                error,
            };
        }
        last_error = error;
        iterations += 1;
        let counts = update(points, d, weights, &assign, &mut centroids);
        revived_last = false;
        if opts.revive {
            let rare = if iterations * 2 <= opts.iterations {
                (n / (64 * k)) as u64
            } else {
                0
            };
            let r = revive(points, d, &counts, rare, &err, &mut centroids, &mut rng);
            revived_total += r;
            revived_last = r > 0;
        }
    }
}

/// Squared (weighted) distance of one point to one centroid.
fn distance(x: &[f32], w: Option<&[f32]>, c: &[f32]) -> f32 {
    match w {
        None => x.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum(),
        Some(w) => x
            .iter()
            .zip(c)
            .zip(w)
            .map(|((a, b), w)| w * (a - b) * (a - b))
            .sum(),
    }
}

/// A deterministic sample of point indices: every point when few, else a strided pick from a random
/// offset.
fn sample(n: usize, want: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    if n <= want {
        return (0..n).collect();
    }
    let step = n as f64 / want as f64;
    let off = (rng.next_u64() % 1_000_003) as f64 / 1_000_003.0 * step;
    (0..want)
        .map(|i| ((off + i as f64 * step) as usize).min(n - 1))
        .collect()
}

fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// k-means++ over a sample (see the module docs); codes beyond the distinct points repeat the first.
fn seed(points: &[f32], d: usize, weights: Option<&[f32]>, k: usize, seed: u64) -> Vec<f32> {
    let n = points.len() / d;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let idx = sample(n, (SEED_SAMPLE * k).max(8192), &mut rng);
    let pt = |i: usize| &points[i * d..(i + 1) * d];
    let wt = |i: usize| weights.map(|w| &w[i * d..(i + 1) * d]);
    let mut centroids = Vec::with_capacity(k * d);
    if idx.is_empty() {
        return vec![0.0; k * d];
    }
    if k > PLUSPLUS_MAX_K {
        let mut order = idx.clone();
        // Fisher–Yates with the seeded generator.
        for i in (1..order.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        for c in 0..k {
            centroids.extend_from_slice(pt(order[c % order.len()]));
        }
        return centroids;
    }
    let first = idx[(rng.next_u64() % idx.len() as u64) as usize];
    centroids.extend_from_slice(pt(first));
    let mut best: Vec<f32> = idx
        .par_iter()
        .map(|&i| distance(pt(i), wt(i), pt(first)))
        .collect();
    for _ in 1..k {
        let total: f64 = best.iter().map(|&b| b as f64).sum();
        let pick = if total <= 0.0 {
            // Fewer distinct points than codes: repeat.
            idx[(rng.next_u64() % idx.len() as u64) as usize]
        } else {
            let target = uniform(&mut rng) * total;
            let mut acc = 0.0;
            let mut chosen = idx[idx.len() - 1];
            for (j, &b) in best.iter().enumerate() {
                acc += b as f64;
                if acc > target {
                    chosen = idx[j];
                    break;
                }
            }
            chosen
        };
        let c = pt(pick).to_vec();
        best.par_iter_mut().zip(idx.par_iter()).for_each(|(b, &i)| {
            let e = distance(pt(i), wt(i), &c);
            if e < *b {
                *b = e;
            }
        });
        centroids.extend_from_slice(&c);
    }
    centroids
}

/// The nearest code of every point and its (weighted) squared error.
fn assign_all(
    points: &[f32],
    d: usize,
    weights: Option<&[f32]>,
    centroids: &[f32],
    assign: &mut [u32],
    err: &mut [f32],
) {
    let k = centroids.len() / d;
    // ‖c‖² per code (unweighted form) and c² per coordinate (weighted form).
    let norms: Vec<f32> = centroids
        .chunks(d)
        .map(|c| c.iter().map(|v| v * v).sum())
        .collect();
    let squares: Vec<f32> = centroids.iter().map(|v| v * v).collect();
    assign
        .par_chunks_mut(CHUNK)
        .zip(err.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(ci, (a, e))| {
            let start = ci * CHUNK;
            let len = a.len();
            let p = &points[start * d..(start + len) * d];
            let w = weights.map(|w| &w[start * d..(start + len) * d]);
            let t = Tables {
                centroids,
                norms: &norms,
                squares: &squares,
                k,
            };
            assign_chunk(p, d, w, &t, a, e);
        });
}

struct Tables<'a> {
    centroids: &'a [f32],
    norms: &'a [f32],
    squares: &'a [f32],
    k: usize,
}

fn assign_chunk(p: &[f32], d: usize, w: Option<&[f32]>, t: &Tables, a: &mut [u32], e: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the function is plain Rust compiled
        // with those features enabled.
        unsafe { assign_chunk_avx2(p, d, w, t, a, e) };
        return;
    }
    assign_chunk_portable(p, d, w, t, a, e);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn assign_chunk_avx2(
    p: &[f32],
    d: usize,
    w: Option<&[f32]>,
    t: &Tables,
    a: &mut [u32],
    e: &mut [f32],
) {
    assign_chunk_portable(p, d, w, t, a, e);
}

#[inline(always)]
fn assign_chunk_portable(
    p: &[f32],
    d: usize,
    w: Option<&[f32]>,
    t: &Tables,
    a: &mut [u32],
    e: &mut [f32],
) {
    macro_rules! dispatch {
        ($($n:literal)*) => {
            match d {
                $($n => tiles::<$n>(p, w, t, a, e),)*
                _ => unreachable!("vector dimension {d} is outside 1..=16"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
}

/// The assignment kernel over tiles of [`LANES`] points: for each code, the distance of all the
/// tile's points at once (the loops over lanes vectorise), keeping the running minimum.
#[inline(always)]
fn tiles<const D: usize>(p: &[f32], w: Option<&[f32]>, t: &Tables, a: &mut [u32], e: &mut [f32]) {
    let n = a.len();
    let mut start = 0;
    while start < n {
        let len = LANES.min(n - start);
        // Coordinates transposed: x[dd][lane]. Padding lanes repeat the last point.
        let mut x = [[0f32; LANES]; D];
        let mut wx = [[0f32; LANES]; D];
        let mut ww = [[1f32; LANES]; D];
        for lane in 0..LANES {
            let i = start + lane.min(len - 1);
            for dd in 0..D {
                x[dd][lane] = p[i * D + dd];
                if let Some(w) = w {
                    ww[dd][lane] = w[i * D + dd];
                }
            }
        }
        // The parts of the distance that depend on the point only: Σ w·x², and −2·w·x.
        let mut base = [0f32; LANES];
        for dd in 0..D {
            for lane in 0..LANES {
                base[lane] += ww[dd][lane] * x[dd][lane] * x[dd][lane];
                wx[dd][lane] = -2.0 * ww[dd][lane] * x[dd][lane];
            }
        }
        let mut best = [f32::INFINITY; LANES];
        let mut arg = [0u32; LANES];
        if w.is_none() {
            for c in 0..t.k {
                let cc = &t.centroids[c * D..c * D + D];
                let mut dist = [t.norms[c]; LANES];
                for dd in 0..D {
                    let v = cc[dd];
                    for lane in 0..LANES {
                        dist[lane] += wx[dd][lane] * v;
                    }
                }
                for lane in 0..LANES {
                    let better = dist[lane] < best[lane];
                    best[lane] = if better { dist[lane] } else { best[lane] };
                    arg[lane] = if better { c as u32 } else { arg[lane] };
                }
            }
        } else {
            for c in 0..t.k {
                let cc = &t.centroids[c * D..c * D + D];
                let sq = &t.squares[c * D..c * D + D];
                let mut dist = [0f32; LANES];
                for dd in 0..D {
                    let (v, v2) = (cc[dd], sq[dd]);
                    for lane in 0..LANES {
                        dist[lane] += ww[dd][lane] * v2 + wx[dd][lane] * v;
                    }
                }
                for lane in 0..LANES {
                    let better = dist[lane] < best[lane];
                    best[lane] = if better { dist[lane] } else { best[lane] };
                    arg[lane] = if better { c as u32 } else { arg[lane] };
                }
            }
        }
        for lane in 0..len {
            a[start + lane] = arg[lane];
            e[start + lane] = (best[lane] + base[lane]).max(0.0);
        }
        start += len;
    }
}

/// Centroids become the (weighted) means of their points; returns the points per code. Codes without
/// points (or whose points have zero weight in a coordinate) keep their old coordinates.
fn update(
    points: &[f32],
    d: usize,
    weights: Option<&[f32]>,
    assign: &[u32],
    centroids: &mut [f32],
) -> Vec<u64> {
    let k = centroids.len() / d;
    let mut sums = vec![0f64; k * d];
    let mut mass = vec![0f64; k * d];
    let mut counts = vec![0u64; k];
    for (i, &c) in assign.iter().enumerate() {
        let c = c as usize;
        counts[c] += 1;
        let x = &points[i * d..(i + 1) * d];
        let s = &mut sums[c * d..(c + 1) * d];
        let m = &mut mass[c * d..(c + 1) * d];
        match weights {
            None => {
                for j in 0..d {
                    s[j] += x[j] as f64;
                    m[j] += 1.0;
                }
            }
            Some(w) => {
                let w = &w[i * d..(i + 1) * d];
                for j in 0..d {
                    s[j] += (w[j] * x[j]) as f64;
                    m[j] += w[j] as f64;
                }
            }
        }
    }
    for ((c, s), m) in centroids.iter_mut().zip(&sums).zip(&mass) {
        if *m > 0.0 {
            *c = (s / m) as f32;
        }
    }
    counts
}

/// Moves codes with at most `rare` points (0: only empty ones) onto the points of largest error,
/// one distinct point each; returns how many moved.
fn revive(
    points: &[f32],
    d: usize,
    counts: &[u64],
    rare: u64,
    err: &[f32],
    centroids: &mut [f32],
    rng: &mut ChaCha8Rng,
) -> usize {
    let dead: Vec<usize> = (0..counts.len()).filter(|&c| counts[c] <= rare).collect();
    if dead.is_empty() {
        return 0;
    }
    let mut order: Vec<usize> = (0..err.len()).filter(|&i| err[i] > 0.0).collect();
    if order.is_empty() {
        return 0;
    }
    let m = dead.len().min(order.len());
    // The m largest errors, ties by index: deterministic.
    let by_err = |a: &usize, b: &usize| err[*b].total_cmp(&err[*a]).then(a.cmp(b));
    if m < order.len() {
        order.select_nth_unstable_by(m - 1, by_err);
        order.truncate(m);
    }
    order.sort_unstable_by(by_err);
    // Jitter-free: a revived code sits exactly on a badly served point. The generator only breaks the
    // symmetry of which dead code takes which point.
    let shift = (rng.next_u64() % m as u64) as usize;
    for (j, &c) in dead.iter().take(m).enumerate() {
        let i = order[(j + shift) % m];
        centroids[c * d..(c + 1) * d].copy_from_slice(&points[i * d..(i + 1) * d]);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::util::gaussian;

    /// `f` in a pool of `threads` threads.
    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    fn brute_assign(points: &[f32], d: usize, w: Option<&[f32]>, c: &[f32]) -> Vec<u32> {
        (0..points.len() / d)
            .map(|i| {
                let x = &points[i * d..(i + 1) * d];
                let wi = w.map(|w| &w[i * d..(i + 1) * d]);
                let mut best = (f32::INFINITY, 0u32);
                for (j, cc) in c.chunks(d).enumerate() {
                    let e = distance(x, wi, cc);
                    if e < best.0 {
                        best = (e, j as u32);
                    }
                }
                best.1
            })
            .collect()
    }

    #[test]
    fn the_kernel_finds_the_nearest_code_for_every_dimension_and_ragged_counts() {
        for d in 1..=16 {
            for n in [1, 15, 17, 4100] {
                let p = gaussian(n * d, d as u64);
                let c = gaussian(37 * d, 100 + d as u64);
                let w: Vec<f32> = gaussian(n * d, 7).iter().map(|v| v.abs() + 0.1).collect();
                for weights in [None, Some(w.as_slice())] {
                    let mut a = vec![0; n];
                    let mut e = vec![0.0; n];
                    assign_all(&p, d, weights, &c, &mut a, &mut e);
                    let b = brute_assign(&p, d, weights, &c);
                    // Ties in float may differ; the distances must not.
                    for i in 0..n {
                        let x = &p[i * d..(i + 1) * d];
                        let wi = weights.map(|w| &w[i * d..(i + 1) * d]);
                        let da = distance(x, wi, &c[a[i] as usize * d..][..d]);
                        let db = distance(x, wi, &c[b[i] as usize * d..][..d]);
                        assert!(da <= db * (1.0 + 1e-4) + 1e-5, "d {d} n {n} point {i}");
                        assert!((e[i] - da).abs() <= 1e-3 * (1.0 + da), "{} vs {da}", e[i]);
                    }
                }
            }
        }
    }

    #[test]
    fn separated_clusters_are_found() {
        // Four tight clusters in 2-D.
        let centres = [(-5.0f32, -5.0f32), (5.0, -5.0), (-5.0, 5.0), (5.0, 5.0)];
        let noise = gaussian(4000, 3);
        let mut p = Vec::new();
        for i in 0..2000 {
            let (cx, cy) = centres[i % 4];
            p.push(cx + 0.1 * noise[2 * i]);
            p.push(cy + 0.1 * noise[2 * i + 1]);
        }
        let r = kmeans(
            &p,
            2,
            None,
            &Options {
                k: 4,
                ..Default::default()
            },
        );
        let mut found: Vec<(i32, i32)> = r
            .centroids
            .chunks(2)
            .map(|c| (c[0].round() as i32, c[1].round() as i32))
            .collect();
        found.sort();
        assert_eq!(found, vec![(-5, -5), (-5, 5), (5, -5), (5, 5)]);
        assert!(r.error / 2000.0 < 0.03, "{}", r.error);
    }

    #[test]
    fn gaussian_distortion_is_near_the_known_optimum() {
        // Scalar Lloyd–Max with 4 levels on N(0,1): MSE 0.1175 (9.30 dB).
        let p = gaussian(100_000, 11);
        let r = kmeans(
            &p,
            1,
            None,
            &Options {
                k: 4,
                iterations: 100,
                ..Default::default()
            },
        );
        let mse = r.error / 100_000.0;
        assert!((mse - 0.1175).abs() < 0.004, "{mse}");
        // 2-D, 16 codes (2 bits per sample): better than scalar at the same rate.
        let r = kmeans(
            &p,
            2,
            None,
            &Options {
                k: 16,
                iterations: 100,
                ..Default::default()
            },
        );
        let mse2 = r.error / 100_000.0;
        assert!(mse2 < mse * 0.97, "{mse2} vs {mse}");
    }

    #[test]
    fn weights_pull_centroids_and_zero_weights_do_not_count() {
        // Two points, one code: the centroid is the weighted mean per coordinate.
        let p = [0.0f32, 0.0, 4.0, 8.0];
        let w = [3.0f32, 0.0, 1.0, 1.0];
        let r = kmeans(
            &p,
            2,
            Some(&w),
            &Options {
                k: 1,
                iterations: 5,
                ..Default::default()
            },
        );
        assert!((r.centroids[0] - 1.0).abs() < 1e-6, "{:?}", r.centroids);
        assert!((r.centroids[1] - 8.0).abs() < 1e-6, "{:?}", r.centroids);
    }

    #[test]
    fn dead_codes_are_revived() {
        // Directly: the empty code moves onto the worst-served point.
        let p = [0.0f32, 0.1, -0.1, 10.0];
        let mut c = vec![0.0f32, 100.0];
        let err = [0.0f32, 0.01, 0.01, 100.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(revive(&p, 1, &[4, 0], 0, &err, &mut c, &mut rng), 1);
        assert_eq!(c, vec![0.0, 10.0]);
        // Through k-means: beyond PLUSPLUS_MAX_K seeds are sample points, and with half the points
        // equal many seeds coincide and all but one of each stay empty.
        let mut p = vec![0.5f32; 10_000];
        p.extend(gaussian(10_000, 5));
        let k = PLUSPLUS_MAX_K + 100;
        let o = Options {
            k,
            iterations: 10,
            ..Default::default()
        };
        let on = kmeans(&p, 1, None, &o);
        let off = kmeans(&p, 1, None, &Options { revive: false, ..o });
        let used = |r: &KMeans| r.usage().iter().filter(|&&u| u > 0).count();
        assert!(on.revived > 1000, "{}", on.revived);
        assert!(
            used(&on) > used(&off) + 1000,
            "{} vs {}",
            used(&on),
            used(&off)
        );
        assert!(on.error < 0.5 * off.error, "{} vs {}", on.error, off.error);
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let p = gaussian(4 * 30_000, 9);
        let o = Options {
            k: 64,
            iterations: 8,
            ..Default::default()
        };
        let one = in_pool(1, || kmeans(&p, 4, None, &o));
        let many = in_pool(3, || kmeans(&p, 4, None, &o));
        assert_eq!(one, many);
    }
}
