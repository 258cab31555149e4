//! Input sets: where the batches a model is run on come from.
//!
//! Every source yields batches of named tensors, lazily where it can (generated, tokenized and image
//! batches are made one at a time), so the same loader serves `run`, `compare`, `bench` and calibration
//! over large sets:
//! - an `.npz` file, a folder of `.npy` files (one file per input, named after it), or a folder of `.npz`
//!   files (one batch each);
//! - ONNX `TensorProto` files in the onnx test-data layout (`test_data_set_*/input_*.pb`, or `.pb` files
//!   directly in the folder), matched to inputs by their name or, when unnamed, by position;
//! - random values generated from the model's declared inputs, with dims and valid ranges from the
//!   options (integer inputs such as token ids need a range; bundled zoo models carry one);
//! - lines of a text file through a HuggingFace `tokenizer.json`;
//! - a folder of images, resized and normalised into NCHW (or NHWC) float tensors.
//!
//! With `batch_size`, arrays read from files are split along axis 0 into batches of that many rows.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::ReadNpyExt;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

use super::{Dim, InputInfo, Named, Tensor};
use crate::onnx::dtype::{DataType, DataTypeExt};
use crate::onnx::pb::TensorProto;
use crate::zoo::InputSpec;

/// Where batches come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A file or folder of arrays; the kind is found from what is there.
    Path(PathBuf),
    /// `count` batches of generated values.
    Random { count: usize },
    /// One input text per line, tokenized.
    Text { file: PathBuf, tokenizer: PathBuf },
}

#[derive(Clone, Debug)]
pub struct InputOptions {
    /// Rows per batch: arrays from files are split along axis 0; generated, tokenized and image sets are
    /// made in batches of this size. None keeps files as they are and makes batches of one.
    pub batch_size: Option<usize>,
    /// Values of symbolic dims (`--dim NAME=VALUE`).
    pub dims: HashMap<String, usize>,
    /// Inclusive value ranges of inputs (`--range INPUT=LO..HI`).
    pub ranges: HashMap<String, (f64, f64)>,
    /// Shapes and ranges known for the model (e.g. a zoo model's manifest entry).
    pub spec: Vec<InputSpec>,
    pub seed: u64,
    /// Longest token sequence for text inputs.
    pub max_tokens: usize,
    pub image: ImageOptions,
    /// Ranges the model itself implies for integer inputs ([`implied_ranges`]), used where neither
    /// `ranges` nor `spec` gives one; each with what implies it.
    pub implied: HashMap<String, Reasoned<(f64, f64)>>,
    /// Values the model implies for its open dims ([`infer`]), used where neither `dims`, the batch
    /// size nor `spec` gives one; each with why it was taken.
    pub implied_dims: std::collections::BTreeMap<DimKey, Reasoned<usize>>,
    /// The most bytes one generated input may take, whatever dims the model declares.
    pub max_generated_bytes: usize,
}

impl Default for InputOptions {
    fn default() -> Self {
        InputOptions {
            batch_size: None,
            dims: HashMap::new(),
            ranges: HashMap::new(),
            spec: Vec::new(),
            seed: 0,
            max_tokens: 128,
            image: ImageOptions::default(),
            implied: HashMap::new(),
            implied_dims: Default::default(),
            max_generated_bytes: MAX_GENERATED_BYTES,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// Height and width; taken from the model's input shape when fixed there.
    pub size: Option<(usize, usize)>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Channel order BGR instead of RGB.
    pub bgr: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        // ImageNet statistics, what most vision exports expect.
        ImageOptions {
            size: None,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            bgr: false,
        }
    }
}

/// A sequence of batches.
pub struct InputSet {
    pub description: String,
    len: usize,
    next: usize,
    make: Box<dyn FnMut(usize) -> Result<Vec<Named>>>,
}

impl InputSet {
    /// Number of batches.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batches at `indices`, in that order (each out-of-range index is an error when read).
    pub fn subset(self, indices: Vec<usize>, what: &str) -> InputSet {
        let mut make = self.make;
        let len = self.len;
        InputSet {
            description: format!("{} ({what})", self.description),
            len: indices.len(),
            next: 0,
            make: Box::new(move |i| match indices.get(i) {
                Some(&j) if j < len => make(j),
                _ => bail!("batch {i} out of range"),
            }),
        }
    }

    /// Batch `i`, made again on each call (deterministic for every source).
    pub fn batch(&mut self, i: usize) -> Result<Vec<Named>> {
        if i >= self.len {
            bail!("batch {i} out of range ({} batches)", self.len);
        }
        (self.make)(i)
    }
}

impl Iterator for InputSet {
    type Item = Result<Vec<Named>>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.len {
            return None;
        }
        self.next += 1;
        Some((self.make)(self.next - 1))
    }
}

pub use super::synth::{DimKey, Reasoned, implied_ranges};

/// Fills `opts` with what the model implies about its inputs (see [`super::synth`]): ranges of its
/// integer inputs and values of its open dims, the latter checked by tract's analysis when `check`.
/// What the options already give (`--dim`, `--range`, a manifest's spec) is left as it is.
pub fn infer(model: &crate::ir::Model, inputs: &[InputInfo], opts: &mut InputOptions, check: bool) {
    opts.implied = implied_ranges(model);
    let spec_of = |name: &str| opts.spec.iter().find(|s| s.name == name);
    let given = |key: &DimKey, info: &InputInfo, axis: usize| -> bool {
        let ranked = |s: &&InputSpec| info.dims.as_ref().is_some_and(|d| d.len() == s.dims.len());
        if spec_of(&info.name)
            .filter(ranked)
            .is_some_and(|s| axis < s.dims.len())
        {
            return true;
        }
        match key {
            DimKey::Symbol(s) => opts.dims.contains_key(s),
            DimKey::Axis(..) => axis == 0 && opts.batch_size.is_some(),
        }
    };
    let mut checker = None;
    let mut accepts = |values: &std::collections::BTreeMap<DimKey, usize>| {
        if !check {
            return None;
        }
        let mut o = opts.clone();
        o.implied_dims = values
            .iter()
            .map(|(k, v)| (k.clone(), (*v, String::new())))
            .collect();
        let o = batch_dims(inputs, &o).ok()?;
        let shapes = inputs
            .iter()
            .map(|i| Some((i.dtype?, generated_shape(i, spec_of(&i.name), &o).ok()?)))
            .collect::<Option<Vec<_>>>()?;
        let probe = checker
            .get_or_insert_with(|| super::synth::TractProbe::new(model))
            .as_ref()?;
        Some(probe.check(&shapes))
    };
    let batch = opts.batch_size.unwrap_or(1);
    let dims = super::synth::implied_dims(inputs, batch, &given, &mut accepts);
    opts.implied_dims = dims;
}

/// Opens an input set for a model with the given inputs.
pub fn open(source: &Source, inputs: &[InputInfo], opts: &InputOptions) -> Result<InputSet> {
    match source {
        Source::Random { count } => random_set(*count, inputs, opts),
        Source::Text { file, tokenizer } => text_set(file, tokenizer, inputs, opts),
        Source::Path(p) => path_set(p, inputs, opts),
    }
}

fn fixed_set(description: String, batches: Vec<Vec<Named>>) -> InputSet {
    InputSet {
        description,
        len: batches.len(),
        next: 0,
        make: Box::new(move |i| Ok(batches[i].clone())),
    }
}

fn path_set(path: &Path, inputs: &[InputInfo], opts: &InputOptions) -> Result<InputSet> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read inputs {}", path.display()))?;
    let shown = path.display().to_string();
    if meta.is_file() {
        let ext = extension(path);
        let batch = match ext.as_str() {
            "npz" => read_npz(path, inputs)?,
            "npy" => {
                let name = single_input(inputs, path)?;
                vec![(name.clone(), read_npy_file(path, preferred(inputs, &name))?)]
            }
            "pb" => {
                let t = read_pb(path)?;
                let name = if t.0.is_empty() {
                    single_input(inputs, path)?
                } else {
                    t.0
                };
                vec![(name, t.1)]
            }
            "txt" => bail!("{shown}: a text file needs --tokenizer tokenizer.json"),
            _ => bail!("{shown}: unknown input file type (expected .npz, .npy, .pb, or a folder)"),
        };
        return split(fixed_set(shown, vec![batch]), opts);
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot list {shown}"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    let sets: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("test_data_set"))
        })
        .collect();
    if !sets.is_empty() {
        let batches = sets
            .iter()
            .map(|d| read_pb_folder(d, inputs))
            .collect::<Result<Vec<_>>>()?;
        return split(fixed_set(shown, batches), opts);
    }
    let of = |e: &str| {
        entries
            .iter()
            .filter(|p| extension(p) == e)
            .cloned()
            .collect::<Vec<_>>()
    };
    let (npz, npy, pb) = (of("npz"), of("npy"), of("pb"));
    let images: Vec<PathBuf> = entries
        .iter()
        .filter(|p| matches!(extension(p).as_str(), "png" | "jpg" | "jpeg"))
        .cloned()
        .collect();
    if !npz.is_empty() {
        let batches = npz
            .iter()
            .map(|p| read_npz(p, inputs))
            .collect::<Result<Vec<_>>>()?;
        split(fixed_set(shown, batches), opts)
    } else if !npy.is_empty() {
        let batch = npy
            .iter()
            .map(|p| {
                let name = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                let t = read_npy_file(p, preferred(inputs, &name))?;
                Ok((name, t))
            })
            .collect::<Result<Vec<_>>>()?;
        split(fixed_set(shown, vec![batch]), opts)
    } else if !pb.is_empty() {
        let batch = read_pb_folder(path, inputs)?;
        split(fixed_set(shown, vec![batch]), opts)
    } else if !images.is_empty() {
        image_set(shown, images, inputs, opts)
    } else {
        bail!(
            "{shown} holds no inputs (.npz, .npy, .pb, test_data_set_* folders or .png/.jpg images)"
        )
    }
}

fn extension(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase()
}

fn single_input(inputs: &[InputInfo], path: &Path) -> Result<String> {
    match inputs {
        [one] => Ok(one.name.clone()),
        _ => bail!(
            "{} holds one unnamed array but the model has {} inputs; use an .npz with one array per input",
            path.display(),
            inputs.len()
        ),
    }
}

fn preferred(inputs: &[InputInfo], name: &str) -> Option<DataType> {
    inputs.iter().find(|i| i.name == name).and_then(|i| i.dtype)
}

/// Splits the batches of `set` that have more than `rows` rows into pieces of at most `rows` along
/// axis 0. Batches whose arrays disagree on their rows (a state laid out `[2, batch, n]`) are left
/// whole, as are sets of one-row batches.
pub fn rebatch(set: InputSet, rows: usize) -> Result<InputSet> {
    let description = set.description.clone();
    let mut out = Vec::new();
    for batch in set {
        let batch = batch?;
        let n = batch.first().and_then(|(_, t)| t.shape().first().copied());
        let shared = n.filter(|&n| batch.iter().all(|(_, t)| t.shape().first() == Some(&n)));
        match shared {
            Some(n) if n > rows => {
                let mut pieces: Vec<Vec<Named>> = Vec::new();
                for (name, t) in &batch {
                    for (i, part) in t.split_rows(rows)?.into_iter().enumerate() {
                        if pieces.len() <= i {
                            pieces.push(Vec::new());
                        }
                        pieces[i].push((name.clone(), part));
                    }
                }
                out.extend(pieces);
            }
            _ => out.push(batch),
        }
    }
    Ok(fixed_set(description, out))
}

/// How many rows of `batch` fit a run within `budget` bytes: the bytes of every value `model`
/// computes for one row (tract's analysis), four times over — the reference and the candidate, each
/// with its values exposed and copied out, as per-layer attribution runs them. None when it cannot
/// be told (tract cannot type the model, a shape stays unknown, the arrays disagree on their rows).
pub fn rows_within(
    model: &crate::ir::Model,
    inputs: &[InputInfo],
    batch: &[Named],
    budget: u64,
) -> Option<usize> {
    let shapes = inputs
        .iter()
        .map(|i| {
            let t = batch.iter().find(|(n, _)| *n == i.name)?.1.clone();
            let mut shape = t.shape().to_vec();
            *shape.first_mut()? = 1;
            Some((i.dtype?, shape))
        })
        .collect::<Option<Vec<_>>>()?;
    let per_row = super::synth::TractProbe::new(model)?
        .value_bytes(&shapes)
        .ok()??
        .max(1);
    Some((budget / (4 * per_row)).max(1) as usize)
}

/// The default memory budget of one run's batch: a quarter of the memory available now, at most
/// 2 GiB (1 GiB when it cannot be read).
pub fn default_budget() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match available {
        Some(a) => (a / 4).min(2 << 30),
        None => 1 << 30,
    }
}

/// Splits every batch along axis 0 when a batch size is set.
fn split(set: InputSet, opts: &InputOptions) -> Result<InputSet> {
    let Some(size) = opts.batch_size else {
        return Ok(set);
    };
    let description = set.description.clone();
    let mut out = Vec::new();
    for batch in set {
        let batch = batch?;
        let rows = batch
            .first()
            .map(|(_, t)| t.shape().first().copied().unwrap_or(0))
            .unwrap_or(0);
        let mut pieces: Vec<Vec<Named>> = Vec::new();
        for (name, t) in &batch {
            if t.shape().first() != Some(&rows) {
                bail!(
                    "{description}: cannot split into batches of {size}: '{name}' has shape {:?} but '{}' has {rows} rows",
                    t.shape(),
                    batch[0].0
                );
            }
            for (i, part) in t.split_rows(size)?.into_iter().enumerate() {
                if pieces.len() <= i {
                    pieces.push(Vec::new());
                }
                pieces[i].push((name.clone(), part));
            }
        }
        out.extend(pieces);
    }
    Ok(fixed_set(description, out))
}

/// Decodes one `.npy` image of bytes, trying the model's type first, then every supported type.
fn decode_npy(bytes: &[u8], want: Option<DataType>, what: &str) -> Result<Tensor> {
    macro_rules! attempt {
        ($t:ty) => {
            ArrayD::<$t>::read_npy(Cursor::new(bytes)).map(Tensor::from)
        };
    }
    let order = [
        DataType::Float,
        DataType::Double,
        DataType::Int64,
        DataType::Int32,
        DataType::Int16,
        DataType::Int8,
        DataType::Uint64,
        DataType::Uint32,
        DataType::Uint16,
        DataType::Uint8,
        DataType::Bool,
    ];
    let mut first_err = None;
    for dt in want.into_iter().chain(order) {
        let r = match dt {
            DataType::Float => attempt!(f32),
            DataType::Double => attempt!(f64),
            DataType::Int64 => attempt!(i64),
            DataType::Int32 => attempt!(i32),
            DataType::Int16 => attempt!(i16),
            DataType::Int8 => attempt!(i8),
            DataType::Uint64 => attempt!(u64),
            DataType::Uint32 => attempt!(u32),
            DataType::Uint16 => attempt!(u16),
            DataType::Uint8 => attempt!(u8),
            DataType::Bool => attempt!(bool),
            _ => continue,
        };
        match r {
            Ok(t) => return Ok(t),
            Err(e) => {
                if !matches!(e, ndarray_npy::ReadNpyError::WrongDescriptor(_)) {
                    return Err(anyhow!("{what}: {e}"));
                }
                first_err.get_or_insert(e);
            }
        }
    }
    Err(anyhow!(
        "{what}: unsupported array type ({})",
        first_err.map(|e| e.to_string()).unwrap_or_default()
    ))
}

fn read_npy_file(path: &Path, want: Option<DataType>) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    decode_npy(&bytes, want, &path.display().to_string())
}

fn read_npz(path: &Path, inputs: &[InputInfo]) -> Result<Vec<Named>> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| anyhow!("{shown} is not a readable .npz: {e}"))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| anyhow!("{shown}: entry {i}: {e}"))?;
        let name = entry
            .name()
            .strip_suffix(".npy")
            .unwrap_or(entry.name())
            .to_string();
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| anyhow!("{shown}: array '{name}': {e}"))?;
        let t = decode_npy(
            &bytes,
            preferred(inputs, &name),
            &format!("{shown}: array '{name}'"),
        )?;
        out.push((name, t));
    }
    if out.is_empty() {
        bail!("{shown} holds no arrays");
    }
    Ok(out)
}

fn read_pb(path: &Path) -> Result<(String, Tensor)> {
    use prost::Message;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let proto = TensorProto::decode(bytes.as_slice())
        .map_err(|e| anyhow!("{} is not an ONNX TensorProto: {e}", path.display()))?;
    let t = Tensor::from_proto(&proto).with_context(|| path.display().to_string())?;
    Ok((proto.name.clone(), t))
}

/// The `input_*.pb` files of one folder, in the numeric order of their index.
fn read_pb_folder(dir: &Path, inputs: &[InputInfo]) -> Result<Vec<Named>> {
    let mut files: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| {
            let stem = p.file_stem()?.to_str()?.to_string();
            let idx = stem.strip_prefix("input_")?.parse().ok()?;
            (extension(&p) == "pb").then_some((idx, p))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no input_*.pb files", dir.display());
    }
    files
        .iter()
        .map(|(idx, p)| {
            let (name, t) = read_pb(p)?;
            let name = if name.is_empty() {
                inputs.get(*idx).map(|i| i.name.clone()).ok_or_else(|| {
                    anyhow!(
                        "{} is input {idx} but the model has {} inputs",
                        p.display(),
                        inputs.len()
                    )
                })?
            } else {
                name
            };
            Ok((name, t))
        })
        .collect()
}

/// The shape to generate for an input: the model's fixed dims; symbolic dims from `--dim`, else from the
/// spec (a zoo model's manifest); a model that declares no shape takes the spec's whole.
fn generated_shape(
    info: &InputInfo,
    spec: Option<&InputSpec>,
    opts: &InputOptions,
) -> Result<Vec<usize>> {
    let from_spec = |axis: usize| -> Option<usize> {
        spec.filter(|s| info.dims.as_ref().is_some_and(|d| d.len() == s.dims.len()))
            .and_then(|s| s.dims.get(axis))
            .map(|&d| d as usize)
    };
    let implied = |k: DimKey| opts.implied_dims.get(&k).map(|(v, _)| *v);
    let Some(dims) = info.dims.as_ref() else {
        return match spec {
            Some(s) => Ok(s.dims.iter().map(|&d| d as usize).collect()),
            None => bail!(
                "input '{}' declares no shape: random inputs need one",
                info.name
            ),
        };
    };
    dims.iter()
        .enumerate()
        .map(|(axis, d)| match d {
            Dim::Fixed(v) => Ok(*v as usize),
            Dim::Symbol(s) => opts
                .dims
                .get(s)
                .copied()
                .or_else(|| from_spec(axis))
                .or_else(|| implied(DimKey::Symbol(s.clone())))
                .ok_or_else(|| {
                    anyhow!(
                        "input '{}' has symbolic dim '{s}' at axis {axis}: pass --dim {s}=N",
                        info.name
                    )
                }),
            // An unnamed first axis takes the batch size.
            Dim::Unknown => opts
                .batch_size
                .filter(|_| axis == 0)
                .or_else(|| from_spec(axis))
                .or_else(|| implied(DimKey::Axis(info.name.clone(), axis)))
                .ok_or_else(|| {
                    anyhow!(
                        "input '{}' has an unnamed dim at axis {axis}: it cannot be generated",
                        info.name
                    )
                }),
        })
        .collect()
}

/// The options for generating batches of `batch_size` rows: the symbolic dim on the first axis of
/// each input takes the batch size wherever it appears (unless `--dim` gives it). An error when no
/// input's first axis is free, as when a model fixes its batch at 1: the batch size would otherwise be
/// dropped without a word.
fn batch_dims(inputs: &[InputInfo], opts: &InputOptions) -> Result<InputOptions> {
    let mut out = opts.clone();
    let Some(b) = opts.batch_size else {
        return Ok(out);
    };
    let mut free = false;
    for info in inputs {
        match info.dims.as_ref().and_then(|d| d.first()) {
            Some(Dim::Symbol(s)) => {
                out.dims.entry(s.clone()).or_insert(b);
                free = true;
            }
            Some(Dim::Unknown) => free = true,
            _ => {}
        }
    }
    if !free && !inputs.is_empty() {
        let fixed: Vec<String> = inputs.iter().map(|i| i.describe()).collect();
        bail!(
            "--batch-size {b}: no input has a free first axis to batch along ({}); generated \
             batches would keep the model's fixed shape",
            fixed.join("; ")
        );
    }
    Ok(out)
}

/// The most one generated input may take by default, whatever dims a model declares.
pub const MAX_GENERATED_BYTES: usize = 1 << 30;

fn random_set(count: usize, inputs: &[InputInfo], opts: &InputOptions) -> Result<InputSet> {
    struct Plan {
        name: String,
        dtype: DataType,
        shape: Vec<usize>,
        range: (f64, f64),
        values: Option<Vec<f64>>,
    }
    let mut plans = Vec::new();
    let mut implied = Vec::new();
    let opts = &batch_dims(inputs, opts)?;
    for info in inputs {
        let spec = opts.spec.iter().find(|s| s.name == info.name);
        let dtype = info
            .dtype
            .ok_or_else(|| anyhow!("input '{}' declares no element type", info.name))?;
        if dtype == DataType::String {
            bail!(
                "input '{}' takes strings, which quench cannot generate: give data with --inputs",
                info.name
            );
        }
        let shape = generated_shape(info, spec, opts)?;
        let range = match (opts.ranges.get(&info.name), spec.and_then(|s| s.range)) {
            (Some(r), _) => *r,
            (None, Some([lo, hi])) => (lo, hi),
            (None, None) if dtype.is_float() => (-1.0, 1.0),
            (None, None) if dtype == DataType::Bool => (0.0, 1.0),
            (None, None) if spec.is_some_and(|s| s.values.is_some()) => (f64::MIN, f64::MAX),
            (None, None) if opts.implied.contains_key(&info.name) => {
                let (r, why) = &opts.implied[&info.name];
                implied.push(format!("{} {}..{} ({why})", info.name, r.0, r.1));
                *r
            }
            (None, None) => bail!(
                "integer input '{}' needs a valid range: nothing in the graph bounds it (no Gather, \
                 OneHot or comparison with a constant reads it); pass --range {}=LO..HI or give \
                 data with --inputs",
                info.name,
                info.name
            ),
        };
        if range.0 > range.1 {
            bail!(
                "range of input '{}' is empty: {}..{}",
                info.name,
                range.0,
                range.1
            );
        }
        if let Some((axis, d)) = shape.iter().enumerate().find(|(_, d)| **d > super::MAX_DIM) {
            bail!(
                "input '{}' would have {d} at axis {axis}, more than the {} quench runs on one \
                 axis: give smaller dims with --dim or data with --inputs",
                info.name,
                super::MAX_DIM
            );
        }
        let bytes = shape
            .iter()
            .try_fold(dtype.bits().unwrap_or(8).div_ceil(8), |a, &d| {
                a.checked_mul(d)
            })
            .filter(|&b| b <= opts.max_generated_bytes);
        if bytes.is_none() {
            bail!(
                "input '{}' would take {shape:?} × {} bytes per generated batch, more than the {} MiB \
                 quench generates for one input: give smaller dims with --dim or data with --inputs",
                info.name,
                dtype.bits().unwrap_or(8).div_ceil(8),
                opts.max_generated_bytes >> 20
            );
        }
        let values = if opts.ranges.contains_key(&info.name) {
            None
        } else {
            spec.and_then(|s| s.values.clone())
        };
        plans.push(Plan {
            name: info.name.clone(),
            dtype,
            shape,
            range,
            values,
        });
    }
    let seed = opts.seed;
    let mut description = format!("{count} random batches (seed {seed})");
    if !opts.implied_dims.is_empty() {
        let dims: Vec<String> = opts
            .implied_dims
            .iter()
            .map(|(k, (v, why))| format!("{k}={v} ({why})"))
            .collect();
        description += &format!("; dims {}", dims.join(", "));
    }
    if !implied.is_empty() {
        description += &format!("; values {}", implied.join(", "));
    }
    Ok(InputSet {
        description,
        len: count,
        next: 0,
        make: Box::new(move |i| {
            // One generator per batch, so batch i is the same however the set is walked.
            let mut rng = ChaCha8Rng::seed_from_u64(
                seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(i as u64),
            );
            plans
                .iter()
                .map(|p| {
                    Ok((
                        p.name.clone(),
                        generate(&mut rng, p.dtype, &p.shape, p.range, p.values.as_deref())?,
                    ))
                })
                .collect()
        }),
    })
}

fn generate(
    rng: &mut ChaCha8Rng,
    dtype: DataType,
    shape: &[usize],
    range: (f64, f64),
    values: Option<&[f64]>,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let (lo, hi) = range;
    let draw = |rng: &mut ChaCha8Rng| -> f64 {
        if let Some(v) = values.filter(|v| !v.is_empty()) {
            return v[(rng.next_u64() % v.len() as u64) as usize];
        }
        if dtype.is_float() {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            lo + u * (hi - lo)
        } else {
            let (l, h) = (lo.ceil() as i64, hi.floor() as i64);
            let span = (h - l + 1).max(1) as u64;
            (l + (rng.next_u64() % span) as i64) as f64
        }
    };
    let vals: Vec<f64> = (0..n).map(|_| draw(rng)).collect();
    let s = IxDyn(shape);
    macro_rules! mk {
        ($t:ty, $v:ident) => {
            Tensor::$v(ArrayD::from_shape_vec(
                s,
                vals.iter().map(|&x| x as $t).collect(),
            )?)
        };
    }
    Ok(match dtype {
        DataType::Float => mk!(f32, F32),
        DataType::Double => mk!(f64, F64),
        DataType::Float16 => Tensor::F16(ArrayD::from_shape_vec(
            s,
            vals.iter().map(|&x| half::f16::from_f64(x)).collect(),
        )?),
        DataType::Int64 => mk!(i64, I64),
        DataType::Int32 => mk!(i32, I32),
        DataType::Int16 => mk!(i16, I16),
        DataType::Int8 => mk!(i8, I8),
        DataType::Uint64 => mk!(u64, U64),
        DataType::Uint32 => mk!(u32, U32),
        DataType::Uint16 => mk!(u16, U16),
        DataType::Uint8 => mk!(u8, U8),
        DataType::Bool => Tensor::Bool(ArrayD::from_shape_vec(
            s,
            vals.iter().map(|&x| x >= 0.5).collect(),
        )?),
        other => bail!("cannot generate inputs of type {}", other.name()),
    })
}

/// Which tokenizer output feeds an input, judged by the usual names.
fn token_role(name: &str) -> Option<&'static str> {
    let n = name.to_ascii_lowercase();
    if n.contains("mask") {
        Some("attention_mask")
    } else if n.contains("type") || n.contains("segment") {
        Some("token_type_ids")
    } else if n.contains("ids") || n.contains("input") || n.contains("token") {
        Some("input_ids")
    } else {
        None
    }
}

fn text_set(
    file: &Path,
    tokenizer: &Path,
    inputs: &[InputInfo],
    opts: &InputOptions,
) -> Result<InputSet> {
    use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
    let mut tok = Tokenizer::from_file(tokenizer)
        .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", tokenizer.display()))?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        ..Default::default()
    }));
    tok.with_truncation(Some(TruncationParams {
        max_length: opts.max_tokens,
        ..Default::default()
    }))
    .map_err(|e| anyhow!("tokenizer {}: {e}", tokenizer.display()))?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        bail!("{} holds no text lines", file.display());
    }
    let roles: Vec<(String, &'static str, DataType)> = inputs
        .iter()
        .map(|i| {
            let role = token_role(&i.name).ok_or_else(|| {
                anyhow!("input '{}' is not one a tokenizer feeds (input_ids, attention_mask, token_type_ids)", i.name)
            })?;
            let dtype = i.dtype.unwrap_or(DataType::Int64);
            if !matches!(dtype, DataType::Int64 | DataType::Int32) {
                bail!("input '{}' is {} but token inputs must be int64 or int32", i.name, dtype.name());
            }
            Ok((i.name.clone(), role, dtype))
        })
        .collect::<Result<_>>()?;
    let size = opts.batch_size.unwrap_or(1).max(1);
    let chunks: Vec<Vec<String>> = lines.chunks(size).map(|c| c.to_vec()).collect();
    Ok(InputSet {
        description: format!("{} ({} lines, tokenized)", file.display(), lines.len()),
        len: chunks.len(),
        next: 0,
        make: Box::new(move |i| {
            let enc = tok
                .encode_batch(chunks[i].clone(), true)
                .map_err(|e| anyhow!("tokenizing batch {i}: {e}"))?;
            let rows = enc.len();
            let cols = enc.first().map(|e| e.len()).unwrap_or(0);
            roles
                .iter()
                .map(|(name, role, dtype)| {
                    let vals: Vec<i64> = enc
                        .iter()
                        .flat_map(|e| match *role {
                            "attention_mask" => e
                                .get_attention_mask()
                                .iter()
                                .map(|&v| v as i64)
                                .collect::<Vec<_>>(),
                            "token_type_ids" => {
                                e.get_type_ids().iter().map(|&v| v as i64).collect()
                            }
                            _ => e.get_ids().iter().map(|&v| v as i64).collect(),
                        })
                        .collect();
                    let a = ArrayD::from_shape_vec(IxDyn(&[rows, cols]), vals)?;
                    let t = if *dtype == DataType::Int32 {
                        Tensor::I32(a.mapv(|v| v as i32))
                    } else {
                        Tensor::I64(a)
                    };
                    Ok((name.clone(), t))
                })
                .collect()
        }),
    })
}

fn image_set(
    shown: String,
    files: Vec<PathBuf>,
    inputs: &[InputInfo],
    opts: &InputOptions,
) -> Result<InputSet> {
    let [info] = inputs else {
        bail!(
            "{shown}: a folder of images feeds models with one input, this one has {}",
            inputs.len()
        );
    };
    let dims = info.dims.clone().unwrap_or_default();
    if dims.len() != 4 {
        bail!(
            "{shown}: images feed a rank-4 input, '{}' is {}",
            info.name,
            info.describe()
        );
    }
    let nhwc = matches!(dims[3], Dim::Fixed(3)) && !matches!(dims[1], Dim::Fixed(3));
    let fixed = |d: &Dim| {
        if let Dim::Fixed(v) = d {
            Some(*v as usize)
        } else {
            None
        }
    };
    let (h, w) = if nhwc {
        (fixed(&dims[1]), fixed(&dims[2]))
    } else {
        (fixed(&dims[2]), fixed(&dims[3]))
    };
    let (h, w) = match (opts.image.size, h, w) {
        (Some(s), _, _) => s,
        (None, Some(h), Some(w)) => (h, w),
        _ => bail!(
            "{shown}: input '{}' has no fixed height and width: pass --image-size HxW",
            info.name
        ),
    };
    if info.dtype.is_some_and(|d| d != DataType::Float) {
        bail!(
            "{shown}: images make float32 tensors but '{}' is {}",
            info.name,
            info.describe()
        );
    }
    let name = info.name.clone();
    let size = opts.batch_size.unwrap_or(1).max(1);
    let chunks: Vec<Vec<PathBuf>> = files.chunks(size).map(|c| c.to_vec()).collect();
    let img = opts.image.clone();
    Ok(InputSet {
        description: format!("{shown} ({} images, {h}x{w})", files.len()),
        len: chunks.len(),
        next: 0,
        make: Box::new(move |i| {
            let files = &chunks[i];
            let n = files.len();
            let shape = if nhwc { [n, h, w, 3] } else { [n, 3, h, w] };
            let mut a = ArrayD::<f32>::zeros(IxDyn(&shape));
            for (b, f) in files.iter().enumerate() {
                let im = image::open(f)
                    .map_err(|e| anyhow!("cannot read image {}: {e}", f.display()))?
                    .to_rgb8();
                let im = image::imageops::resize(
                    &im,
                    w as u32,
                    h as u32,
                    image::imageops::FilterType::Triangle,
                );
                for (x, y, p) in im.enumerate_pixels() {
                    for c in 0..3 {
                        let src = if img.bgr { 2 - c } else { c };
                        let v = (p.0[src] as f32 / 255.0 - img.mean[c]) / img.std[c];
                        let idx = if nhwc {
                            [b, y as usize, x as usize, c]
                        } else {
                            [b, c, y as usize, x as usize]
                        };
                        a[IxDyn(&idx)] = v;
                    }
                }
            }
            Ok(vec![(name.clone(), Tensor::F32(a))])
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::pb::{AttributeProto, GraphProto, NodeProto};
    use crate::onnx::tensor::{from_f32, tensor_value_info};

    fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            attribute: attrs,
            ..crate::testing::node(op, inputs, output)
        }
    }

    use crate::testing::int_attr;

    /// Token ids read by two tables (the smaller bounds them, one through Unsqueeze), position ids
    /// through a Cast, a mask by its name, and an integer input used arithmetically (no range).
    #[test]
    fn integer_inputs_take_the_ranges_their_gathers_imply() {
        let int64 = DataType::Int64 as i32;
        let table =
            |name: &str, rows: i64| from_f32(name, &[rows, 4], &vec![0.5; rows as usize * 4]);
        let g = GraphProto {
            name: Some("g".into()),
            node: vec![
                node("Gather", &["E", "ids"], "a", vec![]),
                node("Unsqueeze", &["ids", "ax"], "ids1", vec![]),
                node("Gather", &["E3", "ids1"], "b", vec![]),
                node("Cast", &["pos"], "pos64", vec![int_attr("to", 7)]),
                node("Gather", &["P", "pos64"], "c", vec![int_attr("axis", 0)]),
                node("Cast", &["attention_mask"], "mf", vec![int_attr("to", 1)]),
                node("Add", &["steps", "steps"], "d", vec![]),
            ],
            initializer: vec![
                table("E", 100),
                table("E3", 50),
                table("P", 7),
                crate::passes::quantize_weights::emit::tensor(
                    DataType::Int64,
                    &[1],
                    0i64.to_le_bytes().to_vec(),
                ),
            ],
            input: vec![
                tensor_value_info("ids", int64, &[2, 5]),
                tensor_value_info("pos", DataType::Int32 as i32, &[2, 5]),
                tensor_value_info("attention_mask", int64, &[2, 5]),
                tensor_value_info("steps", int64, &[2]),
            ],
            output: vec![
                tensor_value_info("a", 1, &[2, 5, 4]),
                tensor_value_info("b", 1, &[2, 1, 5, 4]),
                tensor_value_info("c", 1, &[2, 5, 4]),
                tensor_value_info("mf", 1, &[2, 5]),
                tensor_value_info("d", int64, &[2]),
            ],
            ..Default::default()
        };
        let mut g = g;
        g.initializer[3].name = "ax".into();
        let model = crate::testing::model_of(g, 17);
        let implied = implied_ranges(&model);
        let range = |n: &str| implied.get(n).map(|(r, _)| *r);
        assert_eq!(range("ids"), Some((0.0, 49.0)));
        assert!(implied["ids"].1.contains("E3"));
        assert_eq!(range("pos"), Some((0.0, 6.0)));
        assert_eq!(range("attention_mask"), Some((0.0, 1.0)));
        assert_eq!(range("steps"), None);

        let info = crate::exec::Prepared::from_model(&model, "t").inputs;
        let mut opts = InputOptions {
            implied,
            ..Default::default()
        };
        let err = open(&Source::Random { count: 1 }, &info, &opts)
            .err()
            .expect("steps has no range");
        assert!(err.to_string().contains("--range steps="), "{err}");
        opts.ranges.insert("steps".into(), (0.0, 3.0));
        let mut set = open(&Source::Random { count: 4 }, &info, &opts).unwrap();
        assert!(set.description.contains("ids 0..49"), "{}", set.description);
        for batch in set.by_ref() {
            for (name, t) in batch.unwrap() {
                let hi = match name.as_str() {
                    "ids" => 49.0,
                    "pos" => 6.0,
                    "attention_mask" => 1.0,
                    _ => 3.0,
                };
                assert!(!t.is_float(), "{name}");
                let v = t.to_f32();
                assert!(
                    v.iter()
                        .all(|&x| (0.0..=hi).contains(&x) && x.fract() == 0.0)
                );
            }
        }
    }

    /// `batch_size` gives the symbolic first axis its value in every input that names it (a state
    /// `[2, batch, 128]` too), and is refused, by name, when every first axis is fixed.
    #[test]
    fn batch_size_sets_the_leading_symbolic_dim_everywhere() {
        use crate::exec::Dim::{Fixed, Symbol};
        let input = |name: &str, dims: Vec<Dim>| InputInfo {
            name: name.into(),
            dtype: Some(DataType::Float),
            dims: Some(dims),
        };
        let info = vec![
            input("x", vec![Symbol("batch".into()), Symbol("len".into())]),
            input("state", vec![Fixed(2), Symbol("batch".into()), Fixed(3)]),
            input("mask", vec![Dim::Unknown, Fixed(4)]),
        ];
        let mut opts = InputOptions {
            batch_size: Some(8),
            ..Default::default()
        };
        opts.dims.insert("len".into(), 5);
        let mut set = open(&Source::Random { count: 1 }, &info, &opts).unwrap();
        let batch = set.next().unwrap().unwrap();
        assert_eq!(batch[0].1.shape(), &[8, 5]);
        assert_eq!(batch[1].1.shape(), &[2, 8, 3]);
        assert_eq!(batch[2].1.shape(), &[8, 4]);

        let fixed = vec![input("image", vec![Fixed(1), Fixed(3), Symbol("w".into())])];
        opts.dims.insert("w".into(), 4);
        let err = open(&Source::Random { count: 1 }, &fixed, &opts)
            .err()
            .expect("a fixed batch of 1 cannot take 8 rows");
        let msg = err.to_string();
        assert!(
            msg.contains("--batch-size 8") && msg.contains("image"),
            "{msg}"
        );
    }
}
