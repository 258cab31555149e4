//! Throughput of the weight quantizers on a matrix the size of the zoo's rxnmap weights (21M values),
//! one thread and all threads. Run with `cargo bench --bench quant`; prints figures, asserts nothing.

use std::time::Instant;

use quench::quant::int::{Granularity, IntScheme, quantize, sqnr_db};
use quench::quant::table::{TableFormat, quantize as quantize_table};

fn weights(n: usize) -> Vec<f32> {
    // Deterministic, roughly normal values (sum of four uniforms).
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut u = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|_| (u() + u() + u() + u() - 2.0) * 0.05)
        .collect()
}

fn main() {
    let (channels, k) = (20_480, 1024);
    let w = weights(channels * k);
    let schemes = [
        (
            "int8 per-channel",
            IntScheme {
                bits: 8,
                symmetric: true,
                granularity: Granularity::PerChannel,
                clip_search: false,
            },
        ),
        (
            "int4 block 32",
            IntScheme {
                bits: 4,
                symmetric: true,
                granularity: Granularity::Block(32),
                clip_search: false,
            },
        ),
        (
            "int4 block 32 + MSE clip search",
            IntScheme {
                bits: 4,
                symmetric: true,
                granularity: Granularity::Block(32),
                clip_search: true,
            },
        ),
        (
            "uint4 block 32 asym + clip search",
            IntScheme {
                bits: 4,
                symmetric: false,
                granularity: Granularity::Block(32),
                clip_search: true,
            },
        ),
    ];
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("{} values ([{channels}, {k}])", w.len());
    for (name, s) in schemes {
        for t in [1, threads] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap();
            let start = Instant::now();
            let q = pool.install(|| quantize(&w, channels, k, &s).unwrap());
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{name:<36} {t} thread(s): {secs:>6.3} s, {:>6.1} M values/s, SQNR {:.2} dB",
                w.len() as f64 / secs / 1e6,
                sqnr_db(&w, &q.dequantize())
            );
        }
    }
    for format in [TableFormat::Nf4, TableFormat::Fp4] {
        let start = Instant::now();
        let q = quantize_table(&w, channels, k, 64, format).unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{:<36} 1 thread(s): {secs:>6.3} s, {:>6.1} M values/s, SQNR {:.2} dB",
            format!("{format:?} block 64"),
            w.len() as f64 / secs / 1e6,
            sqnr_db(&w, &q.dequantize())
        );
    }
}
