//! What holds whatever happens to a run: a process killed mid-write leaves no partial output, and
//! recipes write the same bytes whatever the thread count.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn temps_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".quench-"))
        .collect()
}

/// Starts `args`, kills it (SIGKILL) after `delay`, and waits for it.
fn killed_after(args: &[&str], delay: Duration) {
    let mut child = Command::new(quench_bin())
        .args(args)
        .env("CI", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill();
    child.wait().unwrap();
}

/// `convert` and `quantize` killed at points spread over their whole run: the output is either the
/// one a complete earlier run wrote or the one this run would write, never a partial file, and the
/// next run into the folder leaves no temporary file beside it.
#[test]
fn killed_runs_leave_the_previous_output_or_the_new_one() {
    let (Some(rxnmap), Some(_)) = (zoo_model("rxnmap"), zoo_model("magika")) else {
        return;
    };
    let dir = tempdir();
    let out = dir.path().join("out.onnx");
    let out_s = out.display().to_string();
    let src = rxnmap.display().to_string();
    // (command, the command that wrote the previous output).
    let w8 = [
        "quantize",
        "zoo:magika",
        "-o",
        &out_s,
        "--recipe",
        "w8",
        "--runtime",
        "tract",
    ];
    let w4 = [
        "quantize",
        "zoo:magika",
        "-o",
        &out_s,
        "--recipe",
        "w4",
        "--runtime",
        "tract",
    ];
    let convert = ["convert", &src, &out_s];
    let external = ["convert", &src, &out_s, "--external-data"];
    for (run, before) in [(&convert[..], &external[..]), (&w8[..], &w4[..])] {
        let whole = |args: &[&str]| -> (Vec<u8>, Duration) {
            let start = Instant::now();
            let o = quench(args);
            assert!(o.status.success(), "{args:?}: {}", stderr_of(&o));
            (std::fs::read(&out).unwrap(), start.elapsed())
        };
        let (new, took) = whole(run);
        let mut outcomes = [0usize; 3];
        for i in 0..8u32 {
            let (previous, _) = whole(before);
            // Spread over the run and past its end (a loaded machine runs it slower).
            let delay = took.mul_f64(f64::from(i) / 7.0 * 1.6);
            killed_after(run, delay);
            let got = std::fs::read(&out).unwrap();
            let which = if got == previous {
                0
            } else if got == new {
                1
            } else {
                2
            };
            assert!(
                which < 2,
                "{run:?} killed after {delay:?}: the output is neither the previous nor the new one"
            );
            outcomes[which] += 1;
        }
        eprintln!(
            "{}: {} kills left the previous output, {} the new one",
            run[0], outcomes[0], outcomes[1]
        );
        whole(run);
        assert_eq!(temps_in(dir.path()), Vec::<String>::new(), "{run:?}");
    }
}

/// Every kind of recipe writes the same bytes with `--threads 1`, `2` and `0` (the runtime's
/// default), and with quench's own thread pool at one thread or all: k-means, GPTQ's Hessians,
/// calibration and smoothing do not depend on how the work is split.
#[test]
fn recipes_write_the_same_bytes_whatever_the_thread_count() {
    if zoo_model("magika").is_none() || !ort_ready() {
        return;
    }
    let dir = tempdir();
    for recipe in ["w8", "w4", "vq2", "w8a8", "dynamic"] {
        let mut first: Option<Vec<u8>> = None;
        for (threads, pool) in [("1", "1"), ("2", "2"), ("0", "")] {
            let out = dir.path().join(format!("{recipe}.{threads}.onnx"));
            let o = Command::new(quench_bin())
                .args(["quantize", "zoo:magika", "-o", &out.display().to_string()])
                .args([
                    "--recipe",
                    recipe,
                    "--calib-random",
                    "4",
                    "--threads",
                    threads,
                ])
                .env("CI", "true")
                .env("RAYON_NUM_THREADS", pool)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{recipe} --threads {threads}: {}",
                stderr_of(&o)
            );
            let bytes = std::fs::read(&out).unwrap();
            match &first {
                None => first = Some(bytes),
                Some(f) => assert!(
                    *f == bytes,
                    "{recipe}: --threads {threads} wrote other bytes than --threads 1"
                ),
            }
        }
    }
}

/// The data files beside `out` (`<file>.<tag>.data`).
fn data_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".data"))
        .collect();
    v.sort();
    v
}

/// A model written with its weights in a data file, killed at points over its run while a previous
/// pair of another model is in place: what the model file holds, read with its data, is the
/// previous model or the new one, never a model whose data file has been replaced under it; the
/// next complete run leaves one data file, the one its model names.
#[test]
fn killed_runs_with_external_data_leave_a_whole_pair() {
    let (Some(rxnmap), Some(magika)) = (zoo_model("rxnmap"), zoo_model("magika")) else {
        return;
    };
    let dir = tempdir();
    let out = dir.path().join("out.onnx");
    let out_s = out.display().to_string();
    let (big, small) = (rxnmap.display().to_string(), magika.display().to_string());
    let run = ["convert", &big, &out_s, "--external-data"];
    let before = ["convert", &small, &out_s, "--external-data"];
    let read = || quench::onnx::read_model_file(&out).map(|m| m.proto);
    let whole = |args: &[&str]| -> Duration {
        let start = Instant::now();
        let o = quench(args);
        assert!(o.status.success(), "{args:?}: {}", stderr_of(&o));
        start.elapsed()
    };
    let took = whole(&run);
    let new = read().unwrap();
    assert_eq!(data_files(dir.path()).len(), 1);
    whole(&before);
    let previous = read().unwrap();
    assert_eq!(
        data_files(dir.path()).len(),
        1,
        "the earlier pair's data is removed"
    );
    let mut outcomes = [0usize; 2];
    for i in 0..8u32 {
        whole(&before);
        let delay = took.mul_f64(f64::from(i) / 7.0 * 1.6);
        killed_after(&run, delay);
        let got = read().unwrap_or_else(|e| panic!("killed after {delay:?}: {e}"));
        let which = if got == previous {
            0
        } else {
            assert!(got == new, "killed after {delay:?}: neither model");
            1
        };
        outcomes[which] += 1;
    }
    eprintln!(
        "convert --external-data: {} kills left the previous pair, {} the new one",
        outcomes[0], outcomes[1]
    );
    whole(&run);
    assert!(read().unwrap() == new);
    assert_eq!(
        data_files(dir.path()).len(),
        1,
        "{:?}",
        data_files(dir.path())
    );
    assert_eq!(temps_in(dir.path()), Vec::<String>::new());
}
