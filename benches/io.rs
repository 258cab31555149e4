//! Load and save throughput on the largest zoo model, and the peak resident memory of `quench convert`
//! against the model's size. Run with `cargo bench --bench io`; prints figures, asserts nothing.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use quench::Model;
use quench::onnx::SaveOptions;
use quench::zoo::Zoo;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn children_peak_rss_bytes() -> u64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss as u64 * 1024
}

fn main() {
    let zoo =
        Zoo::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/zoo.yaml")).unwrap();
    let mut fetched = zoo.fetched();
    if fetched.is_empty() {
        eprintln!("no zoo model is fetched: run `bash scripts/setup.sh` first");
        std::process::exit(1);
    }
    fetched.sort_by_key(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    let (name, path) = fetched.pop().unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    let mb = size as f64 / 1e6;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");

    let runs = 7;
    let mut load = Vec::new();
    let mut save = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let m = Model::load(&path).unwrap();
        load.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        m.save(&out, &SaveOptions::default()).unwrap();
        save.push(t.elapsed().as_secs_f64());
    }
    let (l, s) = (median(load), median(save));
    println!("model {name}: {mb:.1} MB ({runs} runs, medians)");
    println!("load  {:>8.1} ms  {:>8.0} MB/s", l * 1e3, mb / l);
    println!("save  {:>8.1} ms  {:>8.0} MB/s", s * 1e3, mb / s);

    let bin = env!("CARGO_BIN_EXE_quench");
    let t = Instant::now();
    let st = Command::new(bin)
        .arg("convert")
        .arg(&path)
        .arg(dir.path().join("c.onnx"))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let wall = t.elapsed().as_secs_f64();
    let rss = children_peak_rss_bytes();
    println!(
        "convert (process) {:>6.1} ms  peak RSS {:.1} MB = {:.2}x the model's size",
        wall * 1e3,
        rss as f64 / 1e6,
        rss as f64 / size as f64
    );
}
