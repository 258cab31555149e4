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

/// A scheme under comparison: its label and an encoder returning (decoded rows, bytes spent).
type Encoder = Box<dyn Fn(&[f32], usize, usize) -> (Vec<f32>, u64)>;

fn vq_scheme(dim: usize, size: usize, stages: usize) -> (String, Encoder) {
    let s = VqScheme {
        dim,
        codebook_size: size,
        stages,
        importance: vq::Importance::None,
        ..Default::default()
    };
    (
        s.label(),
        Box::new(move |w, c, k| {
            let e = vq::encode(w, c, k, &s, None).unwrap();
            (e.decode(), e.bytes())
        }),
    )
}

/// Blockwise integers with an MSE clip search, codes in `bits`-wide slots and f32 scales.
fn scalar_scheme(bits: u32, block: usize) -> (String, Encoder) {
    let s = IntScheme {
        bits,
        symmetric: true,
        granularity: Granularity::Block(block),
        clip_search: true,
    };
    let slot = match bits {
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    } as u64;
    (
        format!("int{bits} block {block} clip"),
        Box::new(move |w, c, k| {
            let q = quantize(w, c, k, &s).unwrap();
            let bytes = (w.len() as u64 * slot).div_ceil(8) + 4 * q.scales.len() as u64;
            (q.dequantize(), bytes)
        }),
    )
}

fn schemes() -> Vec<(String, Encoder)> {
    vec![
        vq_scheme(8, 256, 1),
        vq_scheme(4, 256, 1),
        vq_scheme(8, 256, 2),
        scalar_scheme(2, 64),
        scalar_scheme(2, 128),
        vq_scheme(8, 256, 3),
        vq_scheme(2, 256, 1),
        scalar_scheme(3, 64),
        scalar_scheme(4, 32),
    ]
}

/// SQNR per bit on a Gaussian source against the bound (σ²·2^(−2R): 6.02 dB per bit).
fn gaussian_reference() {
    let (c, k) = (256, 1024);
    let w = gaussian(c * k, 2);
    println!(
        "\nGaussian source [{c}, {k}]: SQNR against the rate–distortion bound at the bits spent"
    );
    println!(
        "  {:<30} {:>7} {:>9} {:>9} {:>10}",
        "scheme", "bits/w", "SQNR dB", "bound dB", "dB per bit"
    );
    for (name, enc) in schemes() {
        let (d, bytes) = enc(&w, c, k);
        let bits = bytes as f64 * 8.0 / w.len() as f64;
        let db = sqnr_db(&w, &d);
        println!(
            "  {name:<30} {bits:>7.3} {db:>9.2} {:>9.2} {:>10.2}",
            6.0206 * bits,
            db / bits
        );
    }
}

/// The 2-D MatMul/Gemm weights of the fetched zoo models with ≥ 64 K values, as [channels, k] rows.
fn zoo_matrices() -> Vec<(String, usize, usize, Vec<f32>)> {
    let zoo = quench::zoo::Zoo::load(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/zoo.yaml"),
    )
    .unwrap();
    let mut out = Vec::new();
    for (name, path) in zoo.fetched() {
        let Ok(model) = quench::Model::load(&path) else {
            continue;
        };
        for site in quench::ir::weight_sites(&model) {
            let c = &site.constant;
            let shape = c.shape();
            if shape.len() != 2 || c.stored_elements < 65_536 || c.in_subgraph() {
                continue;
            }
            let axes: Vec<Option<usize>> = site
                .uses
                .iter()
                .filter(|u| u.op_type == "MatMul" || u.op_type == "Gemm")
                .map(|u| u.channel_axis)
                .collect();
            let (Some(&Some(axis)), true) = (axes.first(), axes.len() == site.uses.len()) else {
                continue;
            };
            let Ok(v) = quench::onnx::tensor::to_f32(&c.tensor) else {
                continue;
            };
            if v.iter().any(|x| !x.is_finite()) {
                continue;
            }
            let (r, k) = (shape[0] as usize, shape[1] as usize);
            let rows = if axis == 1 {
                let mut t = vec![0f32; v.len()];
                for i in 0..r {
                    for j in 0..k {
                        t[j * r + i] = v[i * k + j];
                    }
                }
                (k, r, t)
            } else {
                (r, k, v)
            };
            out.push((format!("{name}:{}", c.name), rows.0, rows.1, rows.2));
        }
    }
    out
}

/// Every scheme over all the zoo's large matrices: SQNR of the concatenation and bits spent.
fn zoo_table() {
    let mats = zoo_matrices();
    if mats.is_empty() {
        println!("\nno zoo model is fetched: real-weight figures skipped");
        return;
    }
    let total: usize = mats.iter().map(|m| m.3.len()).sum();
    println!(
        "\nzoo weights: {} matrices, {:.1} M values (each clustered alone, importance none)",
        mats.len(),
        total as f64 / 1e6
    );
    println!(
        "  {:<30} {:>7} {:>9} {:>9} {:>8}",
        "scheme", "bits/w", "SQNR dB", "bound dB", "seconds"
    );
    for (name, enc) in schemes() {
        let start = Instant::now();
        let (mut signal, mut noise, mut bytes) = (0f64, 0f64, 0u64);
        for (_, c, k, w) in &mats {
            let (d, b) = enc(w, *c, *k);
            bytes += b;
            for (a, b) in w.iter().zip(&d) {
                signal += (*a as f64).powi(2);
                noise += ((a - b) as f64).powi(2);
            }
        }
        let bits = bytes as f64 * 8.0 / total as f64;
        println!(
            "  {name:<30} {bits:>7.3} {:>9.2} {:>9.2} {:>8.2}",
            10.0 * (signal / noise).log10(),
            6.0206 * bits,
            start.elapsed().as_secs_f64()
        );
    }
}

fn main() {
    speed();
    gaussian_reference();
    zoo_table();
}
