//! Throughput of the weight quantizers on a matrix the size of the zoo's rxnmap weights (21M values),
//! one thread and all threads; then the whole weight pass with each built-in recipe on the largest
//! fetched zoo model (load, quantize, save — no verification), each in a fresh process so its peak RSS
//! can be set against the model's size; then calibration of that model's w8a8 activations on 256
//! generated samples, plain and as `w8a8` runs it with smoothing (fresh process each: time, peak RSS,
//! the time of every method's ranges). A GPTQ panel times the three steps of error-compensating
//! rounding (the Hessian of 4096 input rows, its factorisation, the rounding of 1024 rows) for
//! k = 1024 and 3072, and the output error it leaves against rounding to nearest. Run with `cargo bench --bench quant`; prints figures, asserts
//! nothing.

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

/// Child: load, quantize with a built-in recipe, save; print seconds and peak RSS.
fn pass_child(recipe: &str, model: &str, out: &str) {
    use quench::passes::quantize_weights::{Target, quantize_weights};
    let t = Instant::now();
    let mut m = quench::Model::load(model).unwrap();
    let loaded = t.elapsed().as_secs_f64();
    let r = quench::recipes::Recipe::load(recipe).unwrap();
    let t = Instant::now();
    let report = quantize_weights(&mut m, &r, Target::Portable).unwrap();
    quench::passes::Pass::run(&quench::passes::DeadNodeElimination, &mut m).unwrap();
    let quantized = t.elapsed().as_secs_f64();
    m.save(out, &quench::onnx::SaveOptions::default()).unwrap();
    let rss = quench::report::bench::peak_rss_bytes().unwrap_or(0);
    println!(
        "{loaded} {quantized} {rss} {} {}",
        report.bytes_after, report.bits_per_weight
    );
}

fn zoo() -> quench::zoo::Zoo {
    quench::zoo::Zoo::load(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/zoo.yaml"),
    )
    .unwrap()
}

/// The largest fetched zoo model (name, path).
fn largest_zoo_model() -> Option<(String, std::path::PathBuf)> {
    let mut fetched = zoo().fetched();
    fetched.sort_by_key(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    fetched.pop()
}

fn whole_pass() {
    let Some((name, path)) = largest_zoo_model() else {
        println!("no zoo model is fetched: whole-pass figures skipped");
        return;
    };
    let size = std::fs::metadata(&path).unwrap().len() as f64;
    let dir = tempfile::tempdir().unwrap();
    println!(
        "\nweight pass on {name} ({:.1} MB), load + quantize + save, one process each",
        size / 1e6
    );
    for (recipe, text) in quench::recipes::BUILTIN {
        let r = quench::recipes::Recipe::parse(recipe, text).unwrap();
        if r.activations.is_some() || r.allocate.is_some() {
            continue; // the weight pass alone; calibration is measured below, allocation needs data
        }
        let out = dir.path().join(format!("{recipe}.onnx"));
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .env(
                "QUENCH_BENCH_PASS",
                format!("{recipe}\n{}\n{}", path.display(), out.display()),
            )
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout);
        let f: Vec<f64> = text
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        println!(
            "{recipe:<5} load {:>6.3} s  quantize {:>6.3} s  peak RSS {:>6.1} MB = {:.2}× the model  → {:.3}× its size, {:.2} bits/weight",
            f[0],
            f[1],
            f[2] / 1e6,
            f[2] / size,
            std::fs::metadata(&out).unwrap().len() as f64 / size,
            f[4]
        );
    }
}

/// Child: load, calibrate the w8a8 tensors on `batches` generated batches, compute every method's
/// ranges; print seconds, peak RSS and the runtime used. With `smooth`, as `quantize --recipe w8a8`
/// does: channel statistics first, smoothing, then calibration of the smoothed model.
fn calib_child(name: &str, model: &str, batches: usize, smooth: bool) {
    use quench::calib::Method;
    use quench::exec::{RuntimeKind, SessionOptions};
    use quench::passes::quantize_activations::{plan, tensors_to_calibrate};
    let zoo = zoo();
    let m = quench::Model::load(model).unwrap();
    let policy = quench::recipes::Recipe::load("w8a8")
        .unwrap()
        .activations
        .unwrap();
    let info = quench::exec::Prepared::from_model(&m, "").inputs;
    let opts = quench::exec::inputs::InputOptions {
        spec: zoo.model(name).unwrap().inputs.clone(),
        seed: 1,
        ..Default::default()
    };
    let mut set = quench::exec::inputs::open(
        &quench::exec::inputs::Source::Random { count: batches },
        &info,
        &opts,
    )
    .unwrap();
    let rt = if quench::exec::ort::library_path().is_ok() {
        RuntimeKind::Ort
    } else {
        RuntimeKind::Tract
    };
    let t = Instant::now();
    let session = SessionOptions {
        lean: true,
        ..Default::default()
    };
    let spill = tempfile::tempdir().unwrap();
    let smoothed = smooth.then(|| {
        use quench::passes::quantize_activations::smooth::measure_and_smooth;
        let (sites, _) = plan(&m, &policy);
        measure_and_smooth(&m, sites, &policy, &mut set, rt, &session, spill.path())
            .unwrap()
            .1
    });
    let model = smoothed.as_ref().unwrap_or(&m);
    let (sites, _) = plan(model, &policy);
    let tensors = tensors_to_calibrate(&sites);
    // The code profiles the saturation guard reads, as `quantize` collects them for onnxruntime.
    let profiles = quench::passes::quantize_activations::profile_requests(
        model,
        &sites,
        &policy,
        quench::passes::quantize_weights::Target::Ort,
    );
    let c = quench::calib::calibrate(model, &tensors, &profiles, &mut set, rt, &session).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for method in [
        Method::MinMax,
        Method::Percentile { percentile: 99.99 },
        Method::Entropy,
        Method::Mse,
    ] {
        for s in c.tensors.values() {
            std::hint::black_box(s.range(method));
        }
    }
    let ranges = t.elapsed().as_secs_f64();
    let rss = quench::report::bench::peak_rss_bytes().unwrap_or(0);
    println!("{secs} {ranges} {rss} {} {rt}", c.tensors.len());
}

fn calibration() {
    let Some((name, path)) = largest_zoo_model() else {
        return;
    };
    let size = std::fs::metadata(&path).unwrap().len() as f64;
    let batches = 256;
    for smooth in [false, true] {
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .env(
                "QUENCH_BENCH_CALIB",
                format!("{name}\n{}\n{batches}\n{smooth}", path.display()),
            )
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout);
        let f: Vec<&str> = text.split_whitespace().collect();
        let num = |i: usize| f[i].parse::<f64>().unwrap();
        println!(
            "\ncalibration of {name} ({:.1} MB){}: {} tensors, {batches} generated samples in {}: \
             {:.2} s ({:.1} ms per sample); ranges of all 4 methods {:.3} s; peak RSS {:.1} MB = {:.2}× \
             the model",
            size / 1e6,
            if smooth {
                ", smoothed as w8a8 does (channel statistics, smoothing, calibration)"
            } else {
                ""
            },
            f[3],
            f[4],
            num(0),
            1e3 * num(0) / batches as f64,
            num(1),
            num(2) / 1e6,
            num(2) / size
        );
    }
}

fn main() {
    if let Ok(job) = std::env::var("QUENCH_BENCH_CALIB") {
        let parts: Vec<&str> = job.split('\n').collect();
        calib_child(
            parts[0],
            parts[1],
            parts[2].parse().unwrap(),
            parts[3].parse().unwrap(),
        );
        return;
    }
    if let Ok(job) = std::env::var("QUENCH_BENCH_PASS") {
        let parts: Vec<&str> = job.split('\n').collect();
        pass_child(parts[0], parts[1], parts[2]);
        return;
    }
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
        let q = quantize_table(&w, channels, k, 64, format, false).unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{:<36} 1 thread(s): {secs:>6.3} s, {:>6.1} M values/s, SQNR {:.2} dB",
            format!("{format:?} block 64"),
            w.len() as f64 / secs / 1e6,
            sqnr_db(&w, &q.dequantize())
        );
    }
    gptq_panel();
    whole_pass();
    calibration();
}

/// GPTQ: time of each step, and output error ‖X(W − Ŵ)ᵀ‖² against nearest rounding, int4 blocks of
/// 32, on correlated inputs (64 shared factors plus noise); the output error is in-sample.
fn gptq_panel() {
    use quench::quant::gptq::Hessian;
    use quench::quant::int::refine_with_feedback;
    let (n, channels) = (4096, 1024);
    for k in [1024, 3072] {
        let f = weights(n * 64);
        let noise = weights(n * k);
        let x = ndarray::Array2::from_shape_fn((n, k), |(i, j)| {
            f[i * 64 + j % 64] * (1.0 + (j % 7) as f32) + 0.3 * noise[i * k + j]
        });
        let w = weights(channels * k);
        let s = IntScheme {
            bits: 4,
            symmetric: true,
            granularity: Granularity::Block(32),
            clip_search: false,
        };
        let t = Instant::now();
        let mut h = Hessian::new(k);
        h.add_rows(x.view());
        h.finish();
        let gram = t.elapsed().as_secs_f64();
        let nearest = quantize(&w, channels, k, &s).unwrap();
        let mut fed = nearest.clone();
        let t = Instant::now();
        refine_with_feedback(&w, &mut fed, &h, 0.01).unwrap();
        let round = t.elapsed().as_secs_f64();
        // Output error on the calibration rows, through the Hessian: Σ_rows δ H δᵀ.
        let err = |q: &[f32]| -> f64 {
            let d =
                ndarray::Array2::from_shape_fn((channels, k), |(r, c)| w[r * k + c] - q[r * k + c]);
            let y = x.dot(&d.t());
            y.iter().map(|v| (*v as f64).powi(2)).sum()
        };
        let (a, b) = (err(&nearest.dequantize()), err(&fed.dequantize()));
        println!(
            "gptq k={k:<5} {n} rows → Hessian {gram:.2} s; factorise + round {channels} rows {round:.2} s; \
             output error {:.3}× nearest ({:.1} dB better)",
            b / a,
            10.0 * (a / b).log10()
        );
    }
}
