//! Vector quantization figures. Run with `cargo bench --bench vq` (or `-- output` for one section);
//! prints figures, asserts nothing.
//!
//! 1. k-means speed: 1 M four-dimensional Gaussian vectors into 256 codes, 20 Lloyd iterations (early
//!    stop off), one thread and all threads, as vectors·codes·iterations per second.
//! 2. The physical reference: weight SQNR per bit on a Gaussian source against the rate–distortion
//!    bound (6.02 dB per bit), for VQ and scalar schemes.
//! 3. Real weights: every 2-D MatMul/Gemm weight of the fetched zoo models with at least 64 K values,
//!    VQ against blockwise scalar quantization at about the same bits per weight (codes, codebooks
//!    and scales all counted).
//! 4. What matters, the layers' outputs: on rxnmap (generated inputs) and paraphrase-MiniLM-L3
//!    (the project's 122 sentences, 8 per batch), with input Hessians measured on 12 batches, each
//!    weight quantized plain and with error feedback (GPTQ for scalars; feedback and refitted
//!    codebooks for VQ) at about 1, 2, 3 and 4 bits per weight, scored by the output SQNR
//!    `wᵀHw / eᵀHe` on the 4 other batches (summed over the model's matrices). The quantize time is
//!    per scheme over all matrices. `QUENCH_BENCH_MODELS=rxnmap` picks models.

use std::time::Instant;

use quench::quant::gptq::Hessian;
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

/// A quantizer under comparison for section 4: (decoded rows, bytes) from the rows, their fitted
/// Hessian and the column energy (the Hessian's diagonal).
type Fitted = Box<dyn Fn(&[f32], usize, usize, &Hessian, &[f32]) -> (Vec<f32>, u64)>;

fn fitted_schemes() -> Vec<(String, Fitted)> {
    use quench::passes::quantize_weights::{GPTQ_DAMP, VQ_DAMP, VQ_ROUNDS};
    let mut out: Vec<(String, Fitted)> = Vec::new();
    for (dim, stages) in [(8, 1), (4, 1), (8, 3)] {
        for fed in [false, true] {
            let s = VqScheme {
                dim,
                stages,
                ..Default::default()
            };
            let name = format!("{}{}", s.label(), if fed { " fed" } else { "" });
            out.push((
                name,
                Box::new(move |w, c, k, h, energy| {
                    let mut e = vq::encode(w, c, k, &s, Some(energy)).unwrap();
                    if fed {
                        let _ =
                            quench::quant::vq_feedback::refine(&mut e, w, h, VQ_DAMP, VQ_ROUNDS);
                    }
                    (e.decode(), e.bytes())
                }),
            ));
        }
    }
    for (bits, block) in [(2, 64), (3, 64), (4, 32)] {
        for fed in [false, true] {
            let s = IntScheme {
                bits,
                symmetric: true,
                granularity: Granularity::Block(block),
                clip_search: true,
            };
            let slot = if bits == 2 { 2 } else { 4 };
            let name = format!("int{bits} block {block}{}", if fed { " gptq" } else { "" });
            out.push((
                name,
                Box::new(move |w, c, k, h, _| {
                    let mut q = quantize(w, c, k, &s).unwrap();
                    if fed {
                        let _ = quench::quant::int::refine_with_feedback(w, &mut q, h, GPTQ_DAMP);
                    }
                    let bytes = (w.len() as u64 * slot).div_ceil(8) + 4 * q.scales.len() as u64;
                    (q.dequantize(), bytes)
                }),
            ));
        }
    }
    out
}

/// The input Hessians of a zoo model's MatMul/Gemm weights on `batches` of 16: generated from the
/// manifest's input spec, or the project's sentences (tests/data) for the sentence encoder.
fn zoo_hessians(
    name: &str,
    model: &quench::Model,
    batches: std::ops::Range<usize>,
) -> Option<std::collections::BTreeMap<String, Hessian>> {
    use quench::exec::inputs::{self, InputOptions, Source};
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let zoo = quench::zoo::Zoo::load(&root.join("models/zoo.yaml")).ok()?;
    let recipe =
        quench::recipes::Recipe::parse("bench", "defaults: { format: vq, gptq: true }\n").ok()?;
    let requests = quench::passes::quantize_weights::hessian_requests(model, &recipe);
    let info = quench::exec::Prepared::from_model(model, "").inputs;
    let text = name == "minilm-l3";
    let mut opts = InputOptions {
        spec: zoo.model(name).ok()?.inputs.clone(),
        seed: 1,
        batch_size: text.then_some(8),
        ..Default::default()
    };
    inputs::infer(model, &info, &mut opts, false);
    let source = if text {
        Source::Text {
            file: root.join("tests/data/sentences.txt"),
            tokenizer: zoo.file_path("bert-uncased-tokenizer.json"),
        }
    } else {
        Source::Random { count: 16 }
    };
    let set = inputs::open(&source, &info, &opts).ok()?;
    let mut set = set.subset(batches.collect(), "bench");
    let session = quench::exec::SessionOptions {
        lean: true,
        ..Default::default()
    };
    quench::calib::hessians(
        model,
        &requests,
        &mut set,
        quench::exec::RuntimeKind::Tract,
        &session,
    )
    .ok()
}

/// `Σ eᵀHe` and `Σ wᵀHw` over the rows of `w` and its decoding `d`.
fn output_error(w: &[f32], d: &[f32], k: usize, h: &Hessian) -> (f64, f64) {
    let hd = quench::quant::gptq::damped(h, 0.0).unwrap();
    let (mut noise, mut signal) = (0f64, 0f64);
    for (wr, dr) in w.chunks(k).zip(d.chunks(k)) {
        let e: Vec<f32> = wr.iter().zip(dr).map(|(a, b)| a - b).collect();
        for (i, row) in hd.rows().into_iter().enumerate() {
            let (mut he, mut hw) = (0f64, 0f64);
            for (j, &v) in row.iter().enumerate() {
                he += v as f64 * e[j] as f64;
                hw += v as f64 * wr[j] as f64;
            }
            noise += e[i] as f64 * he;
            signal += wr[i] as f64 * hw;
        }
    }
    (noise, signal)
}

/// Section 4 of the module docs.
fn output_table() {
    let zoo = quench::zoo::Zoo::load(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/zoo.yaml"),
    )
    .unwrap();
    let only: Vec<String> = std::env::var("QUENCH_BENCH_MODELS")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    for name in ["rxnmap", "minilm-l3"] {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let path = zoo.model_path(name);
        let Ok(model) = quench::Model::load(&path) else {
            println!("\n{name} is not fetched: its output figures are skipped");
            continue;
        };
        let (Some(fit), Some(held)) = (
            zoo_hessians(name, &model, 0..12),
            zoo_hessians(name, &model, 12..16),
        ) else {
            println!("\n{name}: no input Hessians");
            continue;
        };
        let mats: Vec<_> = zoo_matrices()
            .into_iter()
            .filter_map(|(n, c, k, w)| {
                let weight = n.strip_prefix(&format!("{name}:"))?.to_string();
                let (f, h) = (fit.get(&weight)?, held.get(&weight)?);
                (f.k == k && f.rows >= k as u64).then(|| (c, k, w, f.clone(), h.clone()))
            })
            .collect();
        if mats.is_empty() {
            println!("\n{name}: no large MatMul/Gemm weight with enough calibration rows");
            continue;
        }
        let values: usize = mats.iter().map(|m| m.2.len()).sum();
        println!(
            "\n{name}: {} matrices, {:.1} M values; output SQNR on 4 batches the fit did not see",
            mats.len(),
            values as f64 / 1e6
        );
        println!(
            "  {:<30} {:>7} {:>9} {:>10} {:>8}",
            "scheme", "bits/w", "weight dB", "output dB", "seconds"
        );
        for (label, enc) in fitted_schemes() {
            let start = Instant::now();
            let (mut bytes, mut ws, mut wn, mut on, mut os) = (0u64, 0f64, 0f64, 0f64, 0f64);
            let mut decoded = Vec::new();
            for (c, k, w, f, _) in &mats {
                let energy: Vec<f32> = f.diagonal().iter().map(|&v| v as f32).collect();
                let (d, b) = enc(w, *c, *k, f, &energy);
                bytes += b;
                decoded.push(d);
            }
            let secs = start.elapsed().as_secs_f64();
            for ((_, k, w, _, h), d) in mats.iter().zip(&decoded) {
                for (a, b) in w.iter().zip(d) {
                    ws += (*a as f64).powi(2);
                    wn += ((a - b) as f64).powi(2);
                }
                let (n, s) = output_error(w, d, *k, h);
                on += n;
                os += s;
            }
            println!(
                "  {label:<30} {:>7.3} {:>9.2} {:>10.2} {secs:>8.2}",
                bytes as f64 * 8.0 / values as f64,
                10.0 * (ws / wn).log10(),
                10.0 * (os / on).log10(),
            );
        }
    }
}

/// Runs every section, or those named on the command line (`cargo bench --bench vq -- output`).
fn main() {
    let sections: [(&str, fn()); 4] = [
        ("speed", speed),
        ("gaussian", gaussian_reference),
        ("zoo", zoo_table),
        ("output", output_table),
    ];
    let asked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for (name, run) in sections {
        if asked.is_empty() || asked.iter().any(|a| a == name) {
            run();
        }
    }
}
