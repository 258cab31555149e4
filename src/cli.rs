//! Arguments and drivers of `run`, `compare` and `bench`: raw flags become validated library options
//! once, here; the work is done by `quench::exec` and `quench::report`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;

use quench::Model;
use quench::exec::inputs::{self, InputOptions, InputSet, Source};
use quench::exec::{self, Named, Numerics, Prepared, RuntimeKind, SessionOptions, Tensor};
use quench::report::bench::{self, BenchOptions, BenchResult};
use quench::report::compare::{self, CompareOptions};
use quench::zoo::{InputSpec, Zoo};

pub mod adapt;

#[derive(Args, Clone, Debug)]
pub struct InputArgs {
    /// Input data: an .npz, .npy or .pb file; a folder of those or of test_data_set_* folders; a folder
    /// of .png/.jpg images; or a text file with --tokenizer.
    #[arg(long, value_name = "DATA")]
    inputs: Option<PathBuf>,
    /// Generate N batches of random values from the model's declared inputs instead.
    #[arg(long, value_name = "N", conflicts_with = "inputs", value_parser = at_least_one)]
    random: Option<usize>,
    /// A HuggingFace tokenizer.json that turns the lines of a text file into token inputs.
    #[arg(long, value_name = "FILE", requires = "inputs")]
    tokenizer: Option<PathBuf>,
    /// The value of a symbolic dim, for generated inputs (repeatable).
    #[arg(long = "dim", value_name = "NAME=VALUE")]
    dims: Vec<String>,
    /// The inclusive range of an input's generated values (repeatable), e.g. input_ids=0..30521.
    #[arg(long = "range", value_name = "INPUT=LO..HI")]
    ranges: Vec<String>,
    /// Rows per batch: arrays from files are split along axis 0; text and images are batched.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    batch_size: Option<usize>,
    /// Seed of generated inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest token sequence for text inputs (longer ones are truncated).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Image height and width, when the model does not fix them.
    #[arg(long, value_name = "HxW")]
    image_size: Option<String>,
    /// Per-channel mean for image normalisation (default: ImageNet's).
    #[arg(long, value_name = "R,G,B")]
    mean: Option<String>,
    /// Per-channel standard deviation for image normalisation (default: ImageNet's).
    #[arg(long, value_name = "R,G,B")]
    std: Option<String>,
    /// Feed image channels in BGR order.
    #[arg(long)]
    bgr: bool,
    /// The memory one run's batch may take (e.g. 512M, 2G): arrays from files are split along axis 0
    /// into batches that fit, sized from the values the model computes per row (default: a quarter of
    /// the available memory, at most 2G). --batch-size sets the rows instead.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    max_memory: Option<u64>,
    /// Batches generated when neither --inputs nor --random is given (0: one of them is required).
    #[arg(skip)]
    default_random: usize,
    /// What was inferred the first time inputs were opened, for the model's inputs as declared, so
    /// every later set (calibration, verification) takes the same without asking tract again.
    #[arg(skip)]
    inferred: std::rc::Rc<std::cell::RefCell<Inferred>>,
}

#[derive(Debug, Default)]
struct Inferred {
    /// The inputs it was inferred for.
    inputs: Vec<exec::InputInfo>,
    /// Values of open dims, for generated inputs.
    dims: Option<std::collections::BTreeMap<inputs::DimKey, (usize, String)>>,
    /// Rows per batch within the memory budget, for data from files whose first batch had these
    /// shapes (None: not known).
    rows: Option<(Vec<Vec<usize>>, Option<usize>)>,
}

/// A count that must be at least 1.
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("'{s}': {e}")),
    }
}

/// A byte count with an optional K, M or G suffix (powers of 1024).
fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512M, 2G)"))?;
    if v.is_nan() || v <= 0.0 {
        return Err(format!("'{s}': the size must be positive"));
    }
    Ok((v * mult as f64) as u64)
}

#[derive(Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// Threads per inference (0: the runtime's default).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Measure onnxruntime with its default session options, which may compute quantized graphs with
    /// other numerics than ONNX specifies (e.g. int8 activations in fused MatMulNBits).
    #[arg(long)]
    ort_fast: bool,
    /// Run tract without quench's kernels for compressed weights (they keep int8, 4-bit and codebook
    /// weights compressed in memory); tract then decodes them to f32 as its own operators do.
    #[arg(long)]
    tract_plain: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// An ONNX file, or zoo:NAME for a fetched zoo model.
    model: String,
    #[command(flatten)]
    input: InputArgs,
    #[arg(long, default_value = "tract")]
    runtime: RuntimeKind,
    #[command(flatten)]
    rt: RuntimeArgs,
    /// Where to write the outputs (.npz); batches are concatenated along axis 0.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// The reference model (an ONNX file or zoo:NAME).
    reference: String,
    /// The candidate model.
    candidate: String,
    #[command(flatten)]
    input: InputArgs,
    /// tract, ort or both.
    #[arg(long, default_value = "both")]
    runtime: String,
    #[command(flatten)]
    rt: RuntimeArgs,
    /// Skip the per-layer attribution.
    #[arg(long)]
    no_layers: bool,
    /// Layers to show in the table (the JSON has all).
    #[arg(long, default_value_t = 15)]
    top: usize,
    /// Write the full report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The model to quantize (an ONNX file or zoo:NAME).
    model: String,
    /// Where to write the quantized model (never over the input).
    #[arg(short, long)]
    output: PathBuf,
    /// A built-in recipe (w8, w4, nf4, fp4, w8a8, dynamic, vq2, vq3, auto-99, auto-4bpw) or a recipe
    /// YAML file (default: w8; auto-99 with --target-retention or --bits-per-weight).
    #[arg(long)]
    recipe: Option<String>,
    /// The runtime family the output is for: portable (standard ONNX at the model's opset), ort or
    /// tract (int8 as Cast·Mul, which they fold at load; 4-bit MatMul blocks as com.microsoft
    /// MatMulNBits).
    #[arg(long, default_value = "portable")]
    target: quench::passes::quantize_weights::Target,
    /// Inputs for verifying the result before it is written (default: 2 random batches).
    #[command(flatten)]
    input: InputArgs,
    /// Runtimes that verify the result: tract, ort or both (ort is skipped, and said, when missing).
    #[arg(long, default_value = "both")]
    runtime: String,
    #[command(flatten)]
    rt: RuntimeArgs,
    /// Write the report (per-site schemes, bytes, weight SQNR, retention) as JSON; a FILE ending in
    /// .html gets a self-contained page with charts, and the JSON beside it (.json).
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    #[command(flatten)]
    cal: CalibArgs,
    /// Fail instead of writing an unverified model when the result cannot be run on any input (no
    /// valid input could be made, or no runtime runs the original).
    #[arg(long)]
    require_verify: bool,
    /// Keep the model as the recipe builds it when it misses the recipe's retention floors, instead
    /// of promoting the sites that cost the most (shielding)
    #[arg(long)]
    no_shield: bool,
    #[command(flatten)]
    goal: adapt::GoalArgs,
    #[command(flatten)]
    sens: adapt::SensArgs,
}

#[derive(Args, Clone, Debug)]
pub struct CalibArgs {
    /// Calibration data for static activation quantization, for the importance weighting of VQ and
    /// for sensitivity (same forms as --inputs; the input options --tokenizer, --batch-size,
    /// --image-size, … apply to it too).
    #[arg(long, value_name = "DATA")]
    calib: Option<PathBuf>,
    /// Calibrate on N generated batches instead (seed: --seed + 1, so they differ from the
    /// verification batches).
    #[arg(long, value_name = "N", conflicts_with = "calib", value_parser = at_least_one)]
    calib_random: Option<usize>,
    /// The runtime that runs calibration, the fallback check and sensitivity (default: ort when it
    /// loads, else tract).
    #[arg(long)]
    calib_runtime: Option<RuntimeKind>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Models to measure (ONNX files or zoo:NAME); ratios are against the first.
    #[arg(required = true)]
    models: Vec<String>,
    #[command(flatten)]
    input: InputArgs,
    /// tract, ort or both.
    #[arg(long, default_value = "tract")]
    runtime: String,
    #[command(flatten)]
    rt: RuntimeArgs,
    /// Untimed runs before measuring.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Measure in this process instead of a child per model and runtime (peak RSS then covers all).
    #[arg(long)]
    in_process: bool,
    /// Load every model in this process and time their runs in turn (one run of each, then the next),
    /// so that a machine whose speed drifts slows all alike: steadier time ratios, no peak RSS.
    #[arg(long, conflicts_with = "in_process")]
    interleave: bool,
    /// Time every operator of the timed runs and print each model's time by kind of operator (tract
    /// only; timing each operator adds a little to every run).
    #[arg(long)]
    profile: bool,
    /// Internal: measure model INDEX in RUNTIME and print JSON (what each child does).
    #[arg(long, hide = true, value_name = "INDEX:RUNTIME")]
    child: Option<String>,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// A model argument: a path, or zoo:NAME for a fetched zoo model (which also brings its input spec).
/// A path that is a zoo model's cached file gets that model's spec too.
fn resolve_model(arg: &str) -> Result<(PathBuf, Vec<InputSpec>)> {
    if let Some(name) = arg.strip_prefix("zoo:") {
        let zoo = Zoo::load(&Zoo::default_manifest())?;
        let m = zoo.model(name)?;
        let path = zoo.model_path(name);
        if !path.is_file() {
            bail!("zoo model '{name}' is not fetched yet: run `quench zoo fetch {name}`");
        }
        return Ok((path, m.inputs.clone()));
    }
    let path = PathBuf::from(arg);
    let spec = Zoo::load(&Zoo::default_manifest())
        .ok()
        .and_then(|zoo| {
            let canon = path.canonicalize().ok()?;
            zoo.all_models().find_map(|m| {
                (zoo.model_path(&m.name).canonicalize().ok()? == canon).then(|| m.inputs.clone())
            })
        })
        .unwrap_or_default();
    Ok((path, spec))
}

fn parse_triple(s: &str, what: &str) -> Result<[f32; 3]> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow!("--{what} {s}: {e}"))?;
    v.try_into()
        .map_err(|_| anyhow!("--{what} takes three comma-separated values, got '{s}'"))
}

/// Whether two input lists declare the same names, types and dims.
fn same_inputs(a: &[exec::InputInfo], b: &[exec::InputInfo]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.name == y.name && x.dtype == y.dtype && x.dims == y.dims)
}

impl InputArgs {
    fn source(&self) -> Result<Source> {
        Ok(match (&self.inputs, self.random, &self.tokenizer) {
            (_, Some(n), _) => Source::Random { count: n },
            (Some(p), None, Some(t)) => Source::Text {
                file: p.clone(),
                tokenizer: t.clone(),
            },
            (Some(p), None, None) => Source::Path(p.clone()),
            (None, None, _) if self.default_random > 0 => Source::Random {
                count: self.default_random,
            },
            (None, None, _) => bail!("give --inputs DATA or --random N"),
        })
    }

    fn options(&self, spec: Vec<InputSpec>) -> Result<InputOptions> {
        let mut opts = InputOptions {
            batch_size: self.batch_size,
            seed: self.seed,
            spec,
            ..Default::default()
        };
        opts.max_tokens = self.max_tokens;
        for d in &self.dims {
            let (k, v) = d
                .split_once('=')
                .ok_or_else(|| anyhow!("--dim {d}: expected NAME=VALUE"))?;
            let v: usize = v.parse().map_err(|e| anyhow!("--dim {d}: {e}"))?;
            opts.dims.insert(k.to_string(), v);
        }
        // Dims given on the command line take precedence over the zoo's fixed shapes.
        if !opts.dims.is_empty() || self.batch_size.is_some() {
            opts.spec.iter_mut().for_each(|s| s.dims.clear());
            opts.spec
                .retain(|s| s.range.is_some() || s.values.is_some());
        }
        for r in &self.ranges {
            let (k, v) = r
                .split_once('=')
                .ok_or_else(|| anyhow!("--range {r}: expected INPUT=LO..HI"))?;
            let (lo, hi) = v
                .split_once("..")
                .ok_or_else(|| anyhow!("--range {r}: expected LO..HI"))?;
            let lo: f64 = lo.parse().map_err(|e| anyhow!("--range {r}: {e}"))?;
            let hi: f64 = hi.parse().map_err(|e| anyhow!("--range {r}: {e}"))?;
            opts.ranges.insert(k.to_string(), (lo, hi));
        }
        if let Some(s) = &self.image_size {
            let (h, w) = s
                .split_once('x')
                .ok_or_else(|| anyhow!("--image-size {s}: expected HxW"))?;
            opts.image.size = Some((h.parse()?, w.parse()?));
        }
        if let Some(m) = &self.mean {
            opts.image.mean = parse_triple(m, "mean")?;
        }
        if let Some(s) = &self.std {
            opts.image.std = parse_triple(s, "std")?;
        }
        opts.image.bgr = self.bgr;
        Ok(opts)
    }

    /// Opens the input set for a model.
    fn open(&self, model: &Model, spec: Vec<InputSpec>) -> Result<InputSet> {
        let info = Prepared::from_model(model, "").inputs;
        let mut opts = self.options(spec)?;
        // Generated shapes come from the zoo spec only where it names the input; the graph implies
        // the rest (open dims checked in tract, ranges of integer inputs).
        opts.spec.retain(|s| info.iter().any(|i| i.name == s.name));
        let source = self.source()?;
        let mut inferred = self.inferred.borrow_mut();
        if !same_inputs(&inferred.inputs, &info) {
            *inferred = Inferred {
                inputs: info.clone(),
                ..Default::default()
            };
        }
        let check = matches!(source, Source::Random { .. }) && inferred.dims.is_none();
        inputs::infer(model, &info, &mut opts, check);
        match &inferred.dims {
            Some(d) => opts.implied_dims = d.clone(),
            None if check => inferred.dims = Some(opts.implied_dims.clone()),
            None => {}
        }
        let mut set = inputs::open(&source, &info, &opts)?;
        // Data from files is run in batches that fit the memory budget, whatever its rows.
        if matches!(source, Source::Path(_)) && self.batch_size.is_none() && !set.is_empty() {
            let first = set.batch(0)?;
            let shapes: Vec<Vec<usize>> = first.iter().map(|(_, t)| t.shape().to_vec()).collect();
            if inferred.rows.as_ref().is_none_or(|(s, _)| *s != shapes) {
                let budget = self.max_memory.unwrap_or_else(inputs::default_budget);
                let rows = inputs::rows_within(model, &info, &first, budget);
                inferred.rows = Some((shapes, rows));
            }
            if let Some((_, Some(rows))) = inferred.rows {
                set = inputs::rebatch(set, rows)?;
            }
        }
        Ok(set)
    }

    fn paths(&self) -> Vec<&Path> {
        self.inputs
            .iter()
            .chain(&self.tokenizer)
            .map(|p| p.as_path())
            .collect()
    }
}

impl RuntimeArgs {
    fn session(&self) -> SessionOptions {
        SessionOptions {
            threads: self.threads,
            numerics: if self.ort_fast {
                Numerics::Fast
            } else {
                Numerics::Exact
            },
            lean: false,
            tract_kernels: !self.tract_plain,
        }
    }
}

fn runtimes(arg: &str) -> Result<Vec<RuntimeKind>> {
    Ok(match arg {
        "both" => vec![RuntimeKind::Tract, RuntimeKind::Ort],
        other => vec![other.parse().map_err(|e: String| anyhow!(e))?],
    })
}

/// Checked before any work: an output must go into an existing folder, must not be a folder, and
/// must not be (or lie inside) any file or folder the command reads.
fn refuse_overwrite(out: &Path, reads: &[&Path]) -> Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!(
            "cannot write {}: the folder {} does not exist",
            out.display(),
            dir.display()
        );
    }
    if out.is_dir() {
        bail!("cannot write {}: it is a folder", out.display());
    }
    let Ok(out_c) = out.canonicalize() else {
        return Ok(());
    };
    for r in reads {
        if r.canonicalize()
            .is_ok_and(|c| c == out_c || out_c.starts_with(&c) && c.is_dir())
        {
            bail!(
                "refusing to write {}: it is an input of this command",
                out.display()
            );
        }
    }
    Ok(())
}

pub fn run(args: RunArgs) -> Result<()> {
    let (path, spec) = resolve_model(&args.model)?;
    if let Some(out) = &args.output {
        let mut reads = args.input.paths();
        reads.push(&path);
        refuse_overwrite(out, &reads)?;
    }
    let model = Model::load(&path)?;
    let mut set = args.input.open(&model, spec)?;
    let prepared = Prepared::from_model(&model, &path.display().to_string());
    drop(model);
    let mut session = exec::open(&prepared, args.runtime, &args.rt.session())?;
    let mut outputs: Vec<Vec<Named>> = Vec::new();
    for (b, batch) in set.by_ref().enumerate() {
        let batch = batch.with_context(|| format!("input batch {b}"))?;
        let notes = exec::check_batch(&prepared.inputs, &batch)
            .with_context(|| format!("input batch {b}"))?;
        for (name, n) in notes.non_finite {
            eprintln!("note: batch {b}: input '{name}' holds {n} NaN/Inf values");
        }
        outputs.push(session.run(&batch).with_context(|| format!("batch {b}"))?);
    }
    let merged = merge_batches(outputs)?;
    for (name, t) in &merged {
        let v = t.to_f32();
        let finite: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
        let (lo, hi) = finite
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        let mean = finite.iter().map(|&x| x as f64).sum::<f64>() / finite.len().max(1) as f64;
        println!(
            "{name}: {} {:?} min {lo:.6} max {hi:.6} mean {mean:.6}{}",
            t.dtype_name(),
            t.shape(),
            if finite.len() < v.len() {
                format!(" ({} NaN/Inf)", v.len() - finite.len())
            } else {
                String::new()
            }
        );
    }
    if let Some(out) = &args.output {
        write_npz(out, &merged)?;
        println!(
            "wrote {} ({} batches, {})",
            out.display(),
            set.len(),
            args.runtime
        );
    }
    Ok(())
}

/// Concatenates each output over the batches along axis 0; outputs whose shapes cannot be concatenated
/// are kept per batch as `<name>.<batch>`.
fn merge_batches(batches: Vec<Vec<Named>>) -> Result<Vec<Named>> {
    if batches.len() == 1 {
        return Ok(batches.into_iter().next().unwrap_or_default());
    }
    let mut out = Vec::new();
    let names: Vec<String> = batches
        .first()
        .map(|b| b.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    for (i, name) in names.iter().enumerate() {
        let parts: Vec<&Tensor> = batches.iter().map(|b| &b[i].1).collect();
        match concat(&parts) {
            Some(t) => out.push((name.clone(), t)),
            None => out.extend(
                parts
                    .iter()
                    .enumerate()
                    .map(|(b, t)| (format!("{name}.{b}"), (*t).clone())),
            ),
        }
    }
    Ok(out)
}

fn concat(parts: &[&Tensor]) -> Option<Tensor> {
    macro_rules! cat {
        ($v:ident) => {{
            let views: Option<Vec<_>> = parts
                .iter()
                .map(|t| {
                    if let Tensor::$v(a) = t {
                        Some(a.view())
                    } else {
                        None
                    }
                })
                .collect();
            ndarray::concatenate(ndarray::Axis(0), &views?)
                .ok()
                .map(Tensor::$v)
        }};
    }
    if parts.iter().any(|t| t.shape().is_empty()) {
        return None;
    }
    match parts.first()? {
        Tensor::F32(_) => cat!(F32),
        Tensor::F64(_) => cat!(F64),
        Tensor::F16(_) => cat!(F16),
        Tensor::I64(_) => cat!(I64),
        Tensor::I32(_) => cat!(I32),
        Tensor::I16(_) => cat!(I16),
        Tensor::I8(_) => cat!(I8),
        Tensor::U64(_) => cat!(U64),
        Tensor::U32(_) => cat!(U32),
        Tensor::U16(_) => cat!(U16),
        Tensor::U8(_) => cat!(U8),
        Tensor::Bool(_) => cat!(Bool),
    }
}

/// Writes named tensors as an .npz, atomically (a temporary file in the same folder, then a rename).
fn write_npz(path: &Path, tensors: &[Named]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = quench::util::output_temp(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    let mut npz = ndarray_npy::NpzWriter::new(tmp.reopen()?);
    for (name, t) in tensors {
        let r = match t {
            Tensor::F32(a) => npz.add_array(name.as_str(), a),
            Tensor::F64(a) => npz.add_array(name.as_str(), a),
            Tensor::F16(a) => npz.add_array(name.as_str(), &a.mapv(f32::from)),
            Tensor::I64(a) => npz.add_array(name.as_str(), a),
            Tensor::I32(a) => npz.add_array(name.as_str(), a),
            Tensor::I16(a) => npz.add_array(name.as_str(), a),
            Tensor::I8(a) => npz.add_array(name.as_str(), a),
            Tensor::U64(a) => npz.add_array(name.as_str(), a),
            Tensor::U32(a) => npz.add_array(name.as_str(), a),
            Tensor::U16(a) => npz.add_array(name.as_str(), a),
            Tensor::U8(a) => npz.add_array(name.as_str(), a),
            Tensor::Bool(a) => npz.add_array(name.as_str(), a),
        };
        r.map_err(|e| anyhow!("writing '{name}' to {}: {e}", path.display()))?;
    }
    npz.finish()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error))?;
    Ok(())
}

pub fn compare(args: CompareArgs) -> Result<()> {
    let (rpath, spec) = resolve_model(&args.reference)?;
    let (cpath, cspec) = resolve_model(&args.candidate)?;
    if let Some(out) = &args.json {
        let mut reads = args.input.paths();
        reads.extend([rpath.as_path(), cpath.as_path()]);
        refuse_overwrite(out, &reads)?;
    }
    let reference = Model::load(&rpath)?;
    let candidate = Model::load(&cpath)?;
    let spec = if spec.is_empty() { cspec } else { spec };
    let mut set = args.input.open(&reference, spec)?;
    let rts = runtimes(&args.runtime)?;
    let opts = CompareOptions {
        layers: (!args.no_layers).then_some(rts[0]),
        runtimes: rts,
        session: args.rt.session(),
        one_session_above: compare::ONE_SESSION_ABOVE,
    };
    let report = compare::compare(
        &reference,
        &candidate,
        (&rpath.display().to_string(), &cpath.display().to_string()),
        &mut set,
        &opts,
    )?;
    print!("{}", compare::render(&report, args.top));
    if let Some(out) = &args.json {
        let json = serde_json::to_vec_pretty(&report)?;
        quench::util::write_atomic(out, &json)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn child_args(child: &str) -> Result<(usize, RuntimeKind)> {
    let (i, rt) = child
        .split_once(':')
        .ok_or_else(|| anyhow!("--child INDEX:RUNTIME"))?;
    Ok((i.parse()?, rt.parse().map_err(|e: String| anyhow!(e))?))
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let rts = runtimes(&args.runtime)?;
    if args.profile && rts.contains(&RuntimeKind::Ort) {
        bail!("--profile times tract's operators; run it with --runtime tract");
    }
    let opts = |runtime| BenchOptions {
        runtime,
        session: args.rt.session(),
        warmup: args.warmup,
        runs: args.runs,
        profile: args.profile,
    };
    // Inputs are made from the first model's declared inputs, so every model runs the same data; the
    // first model's input spec, else the measured model's.
    let batches = |spec: Vec<InputSpec>| -> Result<Vec<Vec<Named>>> {
        let (first, first_spec) = resolve_model(&args.models[0])?;
        let first_model = Model::load(&first)?;
        let spec = if first_spec.is_empty() {
            spec
        } else {
            first_spec
        };
        let set = args.input.open(&first_model, spec)?;
        set.collect()
    };
    let measure = |index: usize, runtime: RuntimeKind| -> Result<BenchResult> {
        let (path, spec) = resolve_model(&args.models[index])?;
        let batches = batches(spec)?;
        bench::bench(&path, &batches, &opts(runtime))
            .with_context(|| format!("{} in {runtime}", path.display()))
    };
    if let Some(child) = &args.child {
        let (i, rt) = child_args(child)?;
        println!("{}", serde_json::to_string(&measure(i, rt)?)?);
        return Ok(());
    }
    let mut results = Vec::new();
    if args.interleave {
        let resolved = args
            .models
            .iter()
            .map(|m| resolve_model(m))
            .collect::<Result<Vec<_>>>()?;
        // As above, with the first input spec any model brings.
        let spec = resolved
            .iter()
            .map(|(_, s)| s)
            .find(|s| !s.is_empty())
            .cloned()
            .unwrap_or_default();
        let batches = batches(spec)?;
        let paths: Vec<PathBuf> = resolved.into_iter().map(|(p, _)| p).collect();
        let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        for rt in &rts {
            results.extend(bench::bench_interleaved(&paths, &batches, &opts(*rt))?);
        }
    }
    for rt in rts.iter().filter(|_| !args.interleave) {
        for i in 0..args.models.len() {
            let r = if args.in_process {
                measure(i, *rt)?
            } else {
                run_child(i, *rt)?
            };
            results.push(r);
        }
    }
    print!("{}", bench::render(&results));
    if let Some(out) = &args.json {
        quench::util::write_atomic(out, &serde_json::to_vec_pretty(&results)?)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// Re-runs this very command line in a child process that measures one model in one runtime.
fn run_child(index: usize, rt: RuntimeKind) -> Result<BenchResult> {
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = std::process::Command::new(exe)
        .args(&args)
        .arg("--child")
        .arg(format!("{index}:{rt}"))
        .output()
        .context("cannot start a benchmark process")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // The child's own error line, else what ended it (a signal, an exit code).
        let reason = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .map(str::to_string)
            .unwrap_or_else(|| match stderr.trim() {
                "" => format!("the process ended with {}", out.status),
                text => format!("the process ended with {}: {text}", out.status),
            });
        bail!("benchmark of model {index} in {rt} failed: {reason}");
    }
    // Notes and progress the child printed go on to the user.
    eprint!("{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("benchmark process printed: {text}"))
}

/// One line per weight site: role, scheme, form, bytes, weight SQNR, sparsity and outliers; a site's
/// note (why it stayed float, or a fallback) on the line below it.
fn render_sites(w: &quench::passes::quantize_weights::WeightReport) -> String {
    use std::fmt::Write;
    let short = compare::truncate;
    let head = |s: &str, n: usize| {
        if s.chars().count() <= n {
            s.to_string()
        } else {
            format!("{}…", s.chars().take(n - 1).collect::<String>())
        }
    };
    let mut out = format!(
        "{:<36} {:<9} {:<26} {:<34} {:>9} {:>9} {:>7} {:>6}\n",
        "weight site", "role", "scheme", "form", "KB before", "KB after", "SQNR dB", "zeros"
    );
    for s in &w.sites {
        let role = serde_json::to_value(s.role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = write!(
            out,
            "{:<36} {:<9} {:<26} {:<34} {:>9.1} {:>9.1}",
            short(&s.weight, 36),
            role,
            short(s.label.as_deref().unwrap_or("float"), 26),
            head(s.form.as_deref().unwrap_or("-"), 34),
            s.bytes_before as f64 / 1e3,
            s.bytes_after as f64 / 1e3,
        );
        if s.form.is_some() {
            let _ = write!(
                out,
                " {:>7.2} {:>5.1}%",
                s.weight_sqnr_db,
                100.0 * s.sparsity
            );
            if s.outliers > 0 {
                let _ = write!(out, "  {} outliers kept", s.outliers);
            }
        }
        out.push('\n');
        if let Some(v) = &s.vq {
            let size: usize = s.scheme.and_then(|x| x.vq).map_or(0, |x| x.codebook_size);
            let active: Vec<String> = v
                .codebooks
                .iter()
                .map(|c| format!("{}/{size} ({:.2} bits)", c.active, c.entropy_bits))
                .collect();
            let revived: usize = v.codebooks.iter().map(|c| c.revived).sum();
            let iterations = v.codebooks.iter().map(|c| c.iterations).max().unwrap_or(0);
            let _ = writeln!(
                out,
                "    vq: {:.2} bits per weight, {}; codes used {}; {revived} revived; ≤ {iterations} iterations",
                v.bits_per_weight,
                if v.weighted_by_data {
                    "weighted by input energy"
                } else {
                    "data-free"
                },
                active.join(", ")
            );
        }
        if let Some(n) = &s.note {
            let _ = writeln!(out, "    note: {n}");
        }
    }
    let _ = writeln!(
        out,
        "{} weight sites quantized, {} left float; shared tables {:.1} KB",
        w.quantized,
        w.skipped,
        w.shared_bytes as f64 / 1e3
    );
    out
}

/// The input options of --calib / --calib-random: the verification options with their own data
/// and seed (--seed + 1).
fn calib_input_args(input: &InputArgs, cal: &CalibArgs) -> InputArgs {
    let mut ca = input.clone();
    ca.inputs = cal.calib.clone();
    ca.random = cal.calib_random;
    ca.seed = input.seed.wrapping_add(1);
    ca.default_random = 0;
    ca
}

/// The runtime of calibration (default: ort when it loads, else tract) and a lean exact session.
fn calib_runtime(cal: &CalibArgs, rt: &RuntimeArgs) -> (RuntimeKind, SessionOptions) {
    let runtime = match cal.calib_runtime {
        Some(r) => r,
        #[cfg(feature = "onnxruntime")]
        None if quench::exec::ort::library_path().is_ok() => RuntimeKind::Ort,
        None => RuntimeKind::Tract,
    };
    let session = SessionOptions {
        threads: rt.threads,
        numerics: Numerics::Exact,
        lean: true,
        ..Default::default()
    };
    (runtime, session)
}

/// What the recipe's weight sites take from --calib / --calib-random: the input-channel energy that
/// weights VQ sites, and the input Hessians of `gptq` sites. None of each (data-free, said in a note)
/// without calibration data or sites that want it.
type WeightCalibration = (
    Option<quench::passes::quantize_weights::importance::ChannelEnergy>,
    Option<std::collections::BTreeMap<String, quench::calib::Hessian>>,
);

fn weight_calibration(
    args: &QuantizeArgs,
    reference: &Model,
    spec: Vec<InputSpec>,
    recipe: &quench::recipes::Recipe,
    notes: &mut Vec<String>,
) -> Result<WeightCalibration> {
    let wanted = quench::passes::quantize_weights::energy_requests(reference, recipe);
    let hessian_requests = quench::passes::quantize_weights::hessian_requests(reference, recipe);
    if wanted.is_empty() && hessian_requests.is_empty() {
        return Ok((None, None));
    }
    let ca = calib_input_args(&args.input, &args.cal);
    if ca.inputs.is_none() && ca.random.is_none() {
        if !wanted.is_empty() {
            notes.push(
                "VQ clustered data-free (plain weight error): --calib DATA weights it by the \
                 energy of each input channel"
                    .into(),
            );
        }
        if !hessian_requests.is_empty() {
            notes.push(
                "gptq sites rounded to nearest: --calib DATA gives the input Hessians their error \
                 feedback needs"
                    .into(),
            );
        }
        return Ok((None, None));
    }
    let (rt, session) = calib_runtime(&args.cal, &args.rt);
    let mut set = ca.open(reference, spec.clone())?;
    let energy = if wanted.is_empty() {
        None
    } else {
        let stats = quench::calib::channel_stats(reference, &wanted, &mut set, rt, &session)
            .context("measuring the input-channel energy for VQ failed")?;
        Some(quench::calib::energy_of(stats))
    };
    let hessians = if hessian_requests.is_empty() {
        None
    } else {
        // Fitted on all but the batches the keep-or-drop check holds out (`calib::gptq_split`).
        let (fit, _) = quench::calib::gptq_split(set.len());
        let mut fit_set = ca
            .open(reference, spec)?
            .subset(fit, "the batches GPTQ fits on");
        Some(
            quench::calib::hessians(reference, &hessian_requests, &mut fit_set, rt, &session)
                .context("measuring the input Hessians for gptq failed")?,
        )
    };
    Ok((energy, hessians))
}

/// The weight pass over `m`, dead nodes removed, and the consistency check every built model gets.
fn quantize_weights_checked(
    m: &mut Model,
    policy: &dyn quench::passes::quantize_weights::WeightPolicy,
    target: quench::passes::quantize_weights::Target,
    energy: Option<&quench::passes::quantize_weights::importance::ChannelEnergy>,
    hessians: Option<&std::collections::BTreeMap<String, quench::calib::Hessian>>,
) -> Result<quench::passes::quantize_weights::WeightReport> {
    use quench::passes::{DeadNodeElimination, Pass};
    let w = quench::passes::quantize_weights::quantize_weights_with(
        m, policy, target, energy, hessians,
    )?;
    DeadNodeElimination.run(m)?;
    quench::ir::check_model(m).map_err(|e| anyhow!("the quantized model is inconsistent: {e}"))?;
    Ok(w)
}

/// GPTQ rounding lowers each layer's own output error on the calibration data, yet errors that
/// compound through a network can come out worse (measured on a MobileNetV3 with squeeze-excitation).
/// So the model built with it is scored against the same recipe rounded to nearest on the calibration
/// batches GPTQ was not fitted on (`calib::gptq_split`, up to 32), and the nearest build is returned
/// when its worst output is closer to the float model's; the figures go into a note either way.
fn gptq_or_nearest(
    args: &QuantizeArgs,
    reference: &Model,
    spec: Vec<InputSpec>,
    policy: &dyn quench::passes::quantize_weights::WeightPolicy,
    energy: Option<&quench::passes::quantize_weights::importance::ChannelEnergy>,
    with_gptq: &Model,
    notes: &mut Vec<String>,
) -> Result<Option<(Model, quench::passes::quantize_weights::WeightReport)>> {
    let mut plain = reference.clone();
    let report = quantize_weights_checked(&mut plain, policy, args.target, energy, None)?;
    let keep = gptq_beats_nearest(args, reference, spec, with_gptq, &plain, notes)?;
    Ok((!keep).then_some((plain, report)))
}

/// Whether the model built with gptq rounding has the closer worst output to the float model's than
/// the one rounded to nearest, on the calibration batches (up to 32); a note gives both figures.
fn gptq_beats_nearest(
    args: &QuantizeArgs,
    reference: &Model,
    spec: Vec<InputSpec>,
    with_gptq: &Model,
    nearest: &Model,
    notes: &mut Vec<String>,
) -> Result<bool> {
    let ca = calib_input_args(&args.input, &args.cal);
    let (rt, session) = calib_runtime(&args.cal, &args.rt);
    let set = ca.open(reference, spec)?;
    let n = set.len();
    let (_, held) = quench::calib::gptq_split(n);
    let judged = if n < 2 {
        "the one calibration batch it was fitted on"
    } else {
        "calibration batches it was not fitted on"
    };
    let mut set = set.subset(held, "the batches held out from GPTQ");
    let check = quench::calib::OutputCheck::new(reference, &mut set, 32, rt, &session)
        .context("scoring gptq against nearest rounding")?;
    let (fed, near) = (
        check.retention(with_gptq, None)?,
        check.retention(nearest, None)?,
    );
    let db = |nsr: f64| -10.0 * nsr.max(1e-30).log10();
    let keep = fed.nsr <= near.nsr;
    notes.push(format!(
        "gptq {}: on {} ({} of {n}) the output SQNR is {:.2} dB with it, {:.2} dB rounded to \
         nearest",
        if keep { "kept" } else { "dropped" },
        judged,
        set.len(),
        db(fed.nsr),
        db(near.nsr)
    ));
    Ok(keep)
}

/// Checks the built weight-only model against the recipe's floors on the verification data and, when
/// it misses them, shields it (`adapt::shield`): the costliest sites are promoted until they hold.
#[allow(clippy::too_many_arguments)]
fn shield_cli(
    args: &QuantizeArgs,
    reference: &Model,
    spec: Vec<InputSpec>,
    recipe: &quench::recipes::Recipe,
    floors: quench::recipes::Floors,
    built: (Model, quench::passes::quantize_weights::WeightReport),
    energy: Option<&quench::passes::quantize_weights::importance::ChannelEnergy>,
    hessians: Option<&std::collections::BTreeMap<String, quench::calib::Hessian>>,
    notes: &mut Vec<String>,
) -> Result<(
    Model,
    quench::passes::quantize_weights::WeightReport,
    Option<quench::adapt::shield::ShieldReport>,
)> {
    use quench::adapt::shield;
    const BATCHES: usize = 32;
    let opened = args.input.open(reference, spec.clone());
    let mut set = match opened {
        Ok(s) => s,
        Err(e) => {
            notes.push(format!("floors not checked: no verification data ({e:#})"));
            return Ok((built.0, built.1, None));
        }
    };
    let (rt, session) = calib_runtime(&args.cal, &args.rt);
    let n = set.len().min(BATCHES);
    let batches = (0..n).map(|b| set.batch(b)).collect::<Result<Vec<_>>>()?;
    let check = match quench::calib::OutputCheck::new(reference, &mut set, BATCHES, rt, &session) {
        Ok(c) => c,
        Err(e) => {
            notes.push(format!(
                "floors not checked: {rt} cannot run the original ({e:#})"
            ));
            return Ok((built.0, built.1, None));
        }
    };
    let score = |m: &Model| -> Result<quench::adapt::Score> {
        let r = check.retention(m, None)?;
        Ok(quench::adapt::Score {
            nsr: r.nsr,
            cosine: r.cosine,
            top1: r.top1,
            top1_rows: r.top1_rows,
            similarity: r.similarity,
            sequence: r.sequence,
        })
    };
    let mut build = |policy: &dyn quench::passes::quantize_weights::WeightPolicy| {
        let mut m = reference.clone();
        let w = quantize_weights_checked(&mut m, policy, args.target, energy, hessians)?;
        Ok((m, w))
    };
    // Generated inputs are not the data the model will meet: what they flag costs at most a quarter
    // of the quantized weights' bytes. The user's data is held to the floors whatever they cost.
    let generated = args.input.inputs.is_none();
    let budget = generated.then_some(built.1.bytes_after / 4);
    let (m, w, report) = shield::shield(
        reference, recipe, floors, built, &score, &mut build, batches, rt, &session, energy, budget,
    )
    .context("shielding the sites that miss the recipe's floors")?;
    let added: i64 = report.promotions.iter().map(|p| p.bytes).sum();
    if report.promotions.is_empty() && !report.met {
        notes.push(format!(
            "the model misses the recipe's floors ({}) on {n} verification batch(es) in {rt}, and \
             no promotion {} helps{}",
            shield::misses(&floors, &report.before).join(", "),
            if generated {
                "within a quarter of the weights' bytes"
            } else {
                "the shield measured"
            },
            if generated {
                "; these are generated inputs: --inputs with real data tells whether it matters"
            } else {
                ""
            }
        ));
    }
    if !report.promotions.is_empty() {
        let sites = {
            let mut v: Vec<&str> = report
                .promotions
                .iter()
                .map(|p| p.weight.as_str())
                .collect();
            v.sort_unstable();
            v.dedup();
            v.len()
        };
        let misses = shield::misses(&floors, &report.before).join(", ");
        notes.push(format!(
            "shielded {sites} site(s) in {} promotion(s) (+{:.2} MB) because the model missed the \
             recipe's floors ({misses}); output SQNR {:.2} → {:.2} dB, cosine {:.5} → {:.5} on {n} \
             verification batch(es) in {rt}; {}",
            report.promotions.len(),
            added as f64 / 1e6,
            report.before.sqnr_db(),
            report.after.sqnr_db(),
            report.before.cosine,
            report.after.cosine,
            if report.met {
                "the floors now hold".to_string()
            } else if report.over_budget {
                format!(
                    "still missing: {}; on generated inputs shielding stops at a quarter of the \
                     weights' bytes: --inputs with real data tells whether the model needs more",
                    shield::misses(&floors, &report.after).join(", ")
                )
            } else {
                format!(
                    "still missing: {}",
                    shield::misses(&floors, &report.after).join(", ")
                )
            }
        ));
    }
    Ok((m, w, Some(report)))
}

/// Static activation quantization calibrates on --calib (or --calib-random) and checks candidates on
/// the same data; dynamic needs no data, and checks candidates when given some.
fn quantize_activations_cli(
    args: &QuantizeArgs,
    recipe: &str,
    reference: &Model,
    spec: Vec<InputSpec>,
    policy: &quench::passes::quantize_activations::ActivationPolicy,
    finish: &mut dyn FnMut(&mut Model) -> Result<()>,
) -> Result<(
    Model,
    quench::passes::quantize_activations::ActivationReport,
)> {
    use quench::passes::quantize_activations::{
        Mode, plan, profile_requests, quantize_activations, smooth, tensors_to_calibrate,
    };
    // Per-channel affine ops after a Conv go into its weight and bias first, and hard-swish chains
    // become HardSigmoid · x; candidates are still checked against the model as given.
    let mut fold_notes = Vec::new();
    let folded;
    let base: &Model = if policy.fold {
        let mut m = reference.clone();
        for pass in [
            &quench::passes::FoldAffine as &dyn quench::passes::Pass,
            &quench::passes::FuseHardSwish,
        ] {
            let r = pass.run(&mut m)?;
            if r.changed {
                fold_notes.extend(r.changes.first().cloned());
            }
        }
        if fold_notes.is_empty() {
            reference
        } else {
            folded = m;
            &folded
        }
    } else {
        reference
    };
    let with_note = |(m, mut r): (
        Model,
        quench::passes::quantize_activations::ActivationReport,
    )| {
        for (i, n) in fold_notes.iter().enumerate() {
            r.notes.insert(i, n.clone());
        }
        (m, r)
    };
    let ca = calib_input_args(&args.input, &args.cal);
    if ca.inputs.is_none() && ca.random.is_none() {
        if policy.mode == Mode::Dynamic {
            let mut none = |_: &Model, _: Option<usize>| -> Result<quench::calib::Retention> {
                unreachable!("without calibration data nothing is scored")
            };
            return quantize_activations(base, None, policy, args.target, None, finish, &mut none)
                .map(with_note);
        }
        bail!(
            "recipe {} quantizes activations statically: give calibration data with --calib DATA \
             (or --calib-random N for generated inputs)",
            recipe
        );
    }
    let (rt, session) = calib_runtime(&args.cal, &args.rt);
    let mut set = ca.open(reference, spec)?;
    // Smoothing changes the tensors calibration sees: measure channel ranges on the original, smooth,
    // then calibrate the smoothed model (it computes what the original does).
    let spill = tempfile::Builder::new()
        .prefix("quench-smoothed-")
        .tempdir()
        .context("cannot make a temporary folder for the smoothed model")?;
    let (smoothing, smoothed) = match policy.smooth {
        Some(_) => {
            let (sites, _) = plan(base, policy);
            let (s, m) = smooth::measure_and_smooth(
                base,
                sites,
                policy,
                &mut set,
                rt,
                &session,
                spill.path(),
            )?;
            (Some(s), Some(m))
        }
        None => (None, None),
    };
    let model = smoothed.as_ref().unwrap_or(base);
    // Static mode calibrates the ranges; both modes profile the codes the saturation guard bounds.
    let mut calib = {
        let (sites, _) = plan(model, policy);
        let tensors = match policy.mode {
            Mode::Static => tensors_to_calibrate(&sites),
            Mode::Dynamic => Vec::new(),
        };
        let profiles = profile_requests(model, &sites, policy, args.target);
        if tensors.is_empty() && profiles.is_empty() {
            quench::calib::Calibration::default()
        } else {
            quench::calib::calibrate(model, &tensors, &profiles, &mut set, rt, &session)
                .context("calibration failed")?
        }
    };
    if policy.gptq {
        let (sites, _) = plan(model, policy);
        let requests = quench::passes::quantize_activations::hessian_requests(model, &sites);
        calib.hessians = quench::calib::hessians(model, &requests, &mut set, rt, &session)
            .context("measuring the input Hessians for gptq failed")?;
    }
    let check = quench::calib::OutputCheck::new(reference, &mut set, 256, rt, &session)?;
    let mut score = |m: &Model, limit: Option<usize>| check.retention(m, limit);
    quantize_activations(
        model,
        smoothing.as_ref(),
        policy,
        args.target,
        Some(&calib),
        finish,
        &mut score,
    )
    .map(with_note)
}

/// One line per activation site, then the float tensors with why and the fallback checks.
fn render_activations(a: &quench::passes::quantize_activations::ActivationReport) -> String {
    use std::fmt::Write;
    let short = compare::truncate;
    let mut out = format!(
        "activations: {:?}, ranges by {}\n{:<40} {:<8} {:<52} {:>8}\n",
        a.mode, a.method, "node", "op", "form", "w SQNR"
    );
    for s in &a.sites {
        let _ = write!(
            out,
            "{:<40} {:<8} {:<52}",
            short(&s.node, 40),
            s.op_type,
            short(s.form.as_deref().unwrap_or("float"), 52)
        );
        if s.form.is_some() {
            let _ = write!(out, " {:>8.2}", s.weight_sqnr_db);
        }
        out.push('\n');
        if let Some(n) = &s.note {
            let _ = writeln!(out, "    note: {n}");
        }
    }
    for g in &a.smoothing {
        let what = format!(
            "{} ({} tensor{}, {} weight{})",
            short(&g.tensors[0], 40),
            g.tensors.len(),
            if g.tensors.len() == 1 { "" } else { "s" },
            g.weights.len(),
            if g.weights.len() == 1 { "" } else { "s" }
        );
        let _ = match &g.note {
            Some(n) => writeln!(out, "smoothing {what}: left alone, {n}"),
            None => writeln!(
                out,
                "smoothing {what}: α {:.2}, {}/{} channels scaled, channel range spread \
                 {:.1}× → {:.1}×, estimated product error −{:.1} dB",
                g.alpha, g.scaled, g.channels, g.spread_before, g.spread_after, g.estimated_gain_db
            ),
        };
    }
    let float: Vec<_> = a.tensors.iter().filter(|t| !t.quantized).collect();
    if !a.tensors.is_empty() {
        let sq: Vec<f64> = a
            .tensors
            .iter()
            .filter(|t| t.quantized)
            .map(|t| t.sqnr_db)
            .collect();
        let lo = sq.iter().copied().fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            out,
            "{} activation tensors quantized (lowest own SQNR {:.1} dB), {} left float",
            sq.len(),
            lo,
            float.len()
        );
    }
    for t in float {
        let _ = writeln!(
            out,
            "    float: {} ({})",
            short(&t.name, 50),
            t.note.as_deref().unwrap_or("")
        );
    }
    for c in &a.checks {
        let _ = writeln!(
            out,
            "fallback check: {} tensors float → output cosine {:.5}{} on the calibration data",
            c.float_tensors,
            c.retention.cosine,
            c.retention
                .top1
                .map(|t| format!(", top-1 {:.2}%", 100.0 * t))
                .unwrap_or_default()
        );
    }
    for n in &a.notes {
        let _ = writeln!(out, "note: {n}");
    }
    let _ = writeln!(
        out,
        "{} sites integer, {} float; their weights {:.2} MB → {:.2} MB",
        a.quantized,
        a.float,
        a.weight_bytes_before as f64 / 1e6,
        a.weight_bytes_after as f64 / 1e6
    );
    out
}

/// Opens the input set `input` makes for `model` and checks its first batch against the model's
/// declared inputs (names, types, ranks, fixed dims), before any work that would need it.
fn first_batch_checked(input: &InputArgs, model: &Model, spec: Vec<InputSpec>) -> Result<()> {
    let mut set = input.open(model, spec)?;
    if set.is_empty() {
        bail!("{} holds no batches", set.description);
    }
    let batch = set.batch(0).context("input batch 0")?;
    let declared = Prepared::from_model(model, "").inputs;
    exec::check_batch(&declared, &batch)
        .with_context(|| format!("{}: batch 0", set.description))?;
    Ok(())
}

/// Runs the reference and the candidate on the verification inputs in `rts` and compares them. A
/// runtime that cannot run the reference itself says nothing about the quantization: it is dropped
/// with a note and the others verify. `Err(why)` when no runtime runs the reference; an error when
/// the candidate fails where the reference runs.
fn verify(
    args: &QuantizeArgs,
    reference: &Model,
    candidate: &Model,
    label: &str,
    spec: Vec<InputSpec>,
    mut rts: Vec<RuntimeKind>,
    notes: &mut Vec<String>,
) -> Result<std::result::Result<compare::CompareReport, String>> {
    let mut refused = Vec::new();
    loop {
        if rts.is_empty() {
            return Ok(Err(refused.join("; ")));
        }
        let opts = CompareOptions {
            runtimes: rts.clone(),
            session: args.rt.session(),
            layers: None,
            one_session_above: compare::ONE_SESSION_ABOVE,
        };
        let mut set = args.input.open(reference, spec.clone())?;
        let err =
            match compare::compare(reference, candidate, (label, "quantized"), &mut set, &opts) {
                Ok(r) => return Ok(Ok(r)),
                Err(e) => e,
            };
        // Which runtimes run the reference alone, on the first batch?
        let before = rts.len();
        let batch = args.input.open(reference, spec.clone())?.batch(0)?;
        let prepared = Prepared::from_model(reference, label);
        rts.retain(|&rt| {
            let ran = exec::open(&prepared, rt, &opts.session).and_then(|mut s| s.run(&batch));
            match ran {
                Ok(_) => true,
                Err(e) => {
                    let why = format!("{rt} cannot run the original model: {e:#}");
                    notes.push(why.clone());
                    refused.push(why);
                    false
                }
            }
        });
        if rts.len() == before {
            return Err(err.context("the quantized model failed verification; nothing was written"));
        }
    }
}

pub fn quantize(mut args: QuantizeArgs) -> Result<()> {
    use quench::recipes::Recipe;

    let (path, spec) = resolve_model(&args.model)?;
    let mut reads = args.input.paths();
    reads.push(&path);
    if let Some(r) = &args.report {
        refuse_overwrite(r, &reads)?;
    }
    refuse_overwrite(&args.output, &reads)?;
    let recipe_name = args.recipe.clone().unwrap_or_else(|| {
        if args.goal.requested() {
            "auto-99".into()
        } else {
            "w8".into()
        }
    });
    let recipe = Recipe::load(&recipe_name).map_err(|e| anyhow!(e))?;
    let reference = Model::load(&path)?;
    let mut notes = Vec::new();
    // Every input the command will read is checked before any model runs: the verification batches
    // (given, or generated from the graph) and the calibration data.
    args.input.default_random = 2;
    let verify_inputs = first_batch_checked(&args.input, &reference, spec.clone());
    let verify_inputs = match verify_inputs {
        Ok(()) => Ok(()),
        Err(e) if args.input.inputs.is_some() || args.require_verify => {
            return Err(e.context("the verification inputs"));
        }
        Err(e) => Err(e),
    };
    let ca = calib_input_args(&args.input, &args.cal);
    if ca.inputs.is_some() || ca.random.is_some() {
        first_batch_checked(&ca, &reference, spec.clone()).context("the calibration data")?;
    }
    let start = std::time::Instant::now();
    let mut weights = Default::default();
    let mut shielding = None;
    let mut allocation = None;
    let mut recipe = recipe;
    let (candidate, activations) = if args.goal.requested() || recipe.allocate.is_some() {
        recipe = args.goal.apply(recipe, &args.sens)?;
        let (m, w, a) =
            adapt::allocate(&args, &path, &reference, spec.clone(), &recipe, &mut notes)?;
        weights = w;
        allocation = Some(a);
        (m, None)
    } else {
        let (energy, hessians) =
            weight_calibration(&args, &reference, spec.clone(), &recipe, &mut notes)?;
        let mut finish = |m: &mut Model| -> Result<()> {
            weights = quantize_weights_checked(
                m,
                &recipe,
                args.target,
                energy.as_ref(),
                hessians.as_ref(),
            )?;
            Ok(())
        };
        match &recipe.activations {
            None => {
                let mut gptq_kept = true;
                let mut m = reference.clone();
                finish(&mut m)?;
                if weights
                    .sites
                    .iter()
                    .any(|s| s.scheme.is_some_and(|x| x.gptq))
                {
                    let plain = gptq_or_nearest(
                        &args,
                        &reference,
                        spec.clone(),
                        &recipe,
                        energy.as_ref(),
                        &m,
                        &mut notes,
                    )?;
                    if let Some((pm, pw)) = plain {
                        m = pm;
                        weights = pw;
                        gptq_kept = false;
                    }
                }
                if let Some(floors) = recipe.floors.filter(|_| !args.no_shield) {
                    let hessians = hessians.as_ref().filter(|_| gptq_kept);
                    let built = (m, std::mem::take(&mut weights));
                    let (sm, sw, report) = shield_cli(
                        &args,
                        &reference,
                        spec.clone(),
                        &recipe,
                        floors,
                        built,
                        energy.as_ref(),
                        hessians,
                        &mut notes,
                    )?;
                    m = sm;
                    weights = sw;
                    shielding = report;
                }
                (m, None)
            }
            Some(policy) => {
                let (m, r) = quantize_activations_cli(
                    &args,
                    &recipe.name,
                    &reference,
                    spec.clone(),
                    policy,
                    &mut finish,
                )?;
                (m, Some(r))
            }
        }
    };
    let quantize_secs = start.elapsed().as_secs_f64();

    // Verify before writing: both models run on the same inputs, in every runtime asked for.
    let mut rts = runtimes(&args.runtime)?;
    #[cfg(feature = "onnxruntime")]
    if args.runtime == "both"
        && let Err(e) = quench::exec::ort::library_path()
    {
        rts.retain(|r| *r != RuntimeKind::Ort);
        notes.push(format!("onnxruntime not verified: {e:#}"));
    }
    let label = path.display().to_string();
    let retention = match verify_inputs {
        Ok(()) => verify(&args, &reference, &candidate, &label, spec, rts, &mut notes)?,
        Err(e) => Err(format!("no valid input could be made: {e:#}")),
    };
    let retention = match retention {
        Ok(r) => Some(r),
        Err(why) if args.require_verify => {
            bail!("the quantized model was not verified ({why}); nothing was written")
        }
        Err(why) => {
            notes.push(format!(
                "not verified: {why}; the model is written unchecked (--require-verify refuses it)"
            ));
            None
        }
    };
    // The model's files: the .onnx and any external data it was read from or written with.
    let files_bytes = |files: &[PathBuf]| -> Result<u64> {
        let mut seen = std::collections::BTreeSet::new();
        let mut total = 0;
        for f in files {
            if seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())) {
                total += std::fs::metadata(f)
                    .with_context(|| format!("cannot read {}", f.display()))?
                    .len();
            }
        }
        Ok(total)
    };
    let mut read_from = vec![path.clone()];
    read_from.extend(reference.sources().iter().cloned());
    let before = files_bytes(&read_from)?;
    drop(reference);

    let data = candidate.save(&args.output, &quench::onnx::SaveOptions::default())?;
    let after = files_bytes(
        &[args.output.clone()]
            .into_iter()
            .chain(data)
            .collect::<Vec<_>>(),
    )?;

    println!(
        "recipe {} ({}), target {:?}, quantized in {quantize_secs:.2} s",
        recipe.name, recipe.description, args.target
    );
    if let Some(a) = &activations {
        print!("{}", render_activations(a));
    }
    print!("{}", render_sites(&weights));
    if weights.sites.iter().any(|s| {
        s.form
            .as_deref()
            .is_some_and(|f| f.starts_with("DequantizeLinear"))
    }) {
        notes.push(
            "stock onnxruntime runs a weight-only DequantizeLinear on every inference (slower than \
             fp32); --target ort writes Cast·Mul, which it folds at load"
                .into(),
        );
    }
    println!(
        "weights {:.2} MB → {:.2} MB ({:.2} bits per quantized weight); file {:.2} MB → {:.2} MB ({:.3}×)",
        weights.bytes_before as f64 / 1e6,
        weights.bytes_after as f64 / 1e6,
        weights.bits_per_weight,
        before as f64 / 1e6,
        after as f64 / 1e6,
        after as f64 / before as f64
    );
    match &retention {
        Some(r) => print!("{}", compare::render(r, 0)),
        None => println!("retention: not verified (see the note below)"),
    }
    for n in &notes {
        println!("note: {n}");
    }
    println!("wrote {}", args.output.display());
    if let Some(r) = &args.report {
        let json = serde_json::json!({
            "recipe": recipe.name,
            "target": args.target,
            "quantize_seconds": quantize_secs,
            "file_bytes": { "before": before, "after": after },
            "weights": weights,
            "activations": activations,
            "shield": shielding,
            "retention": retention,
            "notes": notes,
            "allocation": allocation.as_ref().map(|a| &a.json),
        });
        let bytes = serde_json::to_vec_pretty(&json)?;
        if r.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("html"))
        {
            // The page, and the same data as JSON beside it.
            let j = r.with_extension("json");
            let mut reads = args.input.paths();
            reads.push(&path);
            refuse_overwrite(&j, &reads)?;
            let title = format!("quench: {} with {}", path.display(), recipe.name);
            quench::util::write_atomic(r, quench::adapt::html::page(&json, &title).as_bytes())?;
            quench::util::write_atomic(&j, &bytes)?;
            println!("wrote {} and {}", r.display(), j.display());
        } else {
            quench::util::write_atomic(r, &bytes)?;
            println!("wrote {}", r.display());
        }
    }
    Ok(())
}
