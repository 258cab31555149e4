//! onnxruntime through the `ort` crate, loaded at run time from a shared library.
//!
//! Nothing links against onnxruntime: the library is found through `ORT_DYLIB_PATH` or in the `capi/`
//! folder of an installed `onnxruntime` Python package, and loaded once per process. A session is made
//! from a temporary copy of the model whose tensors sit in an external data file: onnxruntime maps that
//! file rather than parsing a copy of the encoded model and copying every weight out of it (building a
//! lean session of rxnmap took 13 MB this way, 170 MB from the bytes). If the copy cannot be written,
//! the session is made from the encoded bytes.
//!
//! Numerics: by default (`Numerics::Exact`) quench switches off the session options under which ORT
//! computes something other than the graph's ONNX semantics — QDQ fusion into integer kernels and the
//! DequantizeLinear→MatMul fusion into MatMulNBits with int8 activations (accuracy level 4 by default).
//! `Numerics::Fast` leaves ORT's defaults, to measure what a deployment with stock options computes.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};
use ort::session::Session as OrtInner;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, ValueType};

use super::{Named, Numerics, Prepared, RuntimeKind, Session, SessionOptions, Tensor};

/// Session options quench sets for exact ONNX semantics.
pub const EXACT_CONFIG: &[(&str, &str)] = &[
    ("session.disable_quant_qdq", "1"),
    ("session.enable_dq_matmulnbits_fusion", "0"),
    ("session.qdq_matmulnbits_accuracy_level", "1"),
];

static ENV: OnceLock<std::result::Result<(ort::environment::Environment, PathBuf), String>> =
    OnceLock::new();

/// Where to look for `libonnxruntime` when ORT_DYLIB_PATH is not set: the `onnxruntime/capi/` folder of
/// Python environments in the usual places (an active virtualenv, `.venv` in the current folder or above
/// the quench executable, the user's and the system's site-packages).
pub fn candidate_libraries() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(v));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(|a| a.join(".venv")));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(|a| a.join(".venv")));
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local"));
    }
    roots.extend(["/usr/local", "/usr"].iter().map(PathBuf::from));
    let mut found = Vec::new();
    for root in roots {
        for lib in ["lib", "lib64"] {
            let Ok(entries) = std::fs::read_dir(root.join(lib)) else {
                continue;
            };
            let mut pythons: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("python3"))
                })
                .collect();
            pythons.sort();
            for py in pythons {
                for site in ["site-packages", "dist-packages"] {
                    let capi = py.join(site).join("onnxruntime").join("capi");
                    if let Some(lib) = library_in(&capi) {
                        found.push(lib);
                    }
                }
            }
        }
    }
    found.dedup();
    found
}

fn library_in(folder: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(folder)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                (n.starts_with("libonnxruntime.so")
                    || n == "libonnxruntime.dylib"
                    || n == "onnxruntime.dll")
                    && !n.contains("providers")
            })
        })
        .collect();
    libs.sort();
    libs.pop()
}

fn environment() -> Result<&'static (ort::environment::Environment, PathBuf)> {
    let env = ENV.get_or_init(|| {
        let path = match std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => match candidate_libraries().into_iter().next() {
                Some(p) => p,
                None => {
                    return Err("onnxruntime's shared library was not found: set ORT_DYLIB_PATH to \
                                libonnxruntime.so, or install it with `python3 -m pip install \
                                onnxruntime==1.31.1` (quench looks in the onnxruntime/capi/ folder of \
                                $VIRTUAL_ENV, ./.venv, ~/.local and /usr)"
                        .to_string());
                }
            },
        };
        if !path.is_file() {
            return Err(format!("onnxruntime library {} does not exist (from ORT_DYLIB_PATH)", path.display()));
        }
        let builder = ort::init_from(&path)
            .map_err(|e| format!("cannot load onnxruntime from {}: {e}", path.display()))?;
        let env = builder
            .with_name("quench")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("cannot start onnxruntime from {}: {e}", path.display()))?;
        // quench reports ORT's errors itself, with context; ORT's own log would repeat them.
        env.set_log_level(ort::logging::LogLevel::Fatal);
        Ok((env, path))
    });
    env.as_ref().map_err(|e| anyhow!("{e}"))
}

/// The library ORT sessions use (loading it if needed).
pub fn library_path() -> Result<PathBuf> {
    Ok(environment()?.1.clone())
}

pub struct OrtSession {
    label: String,
    session: OrtInner,
    output_names: Vec<String>,
    settings: Vec<(String, String)>,
    /// The model file onnxruntime maps, removed when the session is dropped (after it).
    _files: Option<tempfile::TempDir>,
}

fn builder_err(e: ort::Error<ort::session::builder::SessionBuilder>) -> anyhow::Error {
    anyhow!("{e}")
}

impl OrtSession {
    pub fn new(model: &Prepared, opts: &SessionOptions) -> Result<OrtSession> {
        let (env, path) = environment()?;
        let mut settings = vec![
            (
                "runtime".to_string(),
                format!("onnxruntime ({})", path.display()),
            ),
            ("threads".to_string(), opts.threads.to_string()),
            (
                "numerics".to_string(),
                format!("{:?}", opts.numerics).to_lowercase(),
            ),
        ];
        let mut builder = OrtInner::builder(env)
            .map_err(|e| anyhow!("{e}"))?
            .with_optimization_level(if opts.lean {
                // Graph rewrites copy initializers while the session is built.
                GraphOptimizationLevel::Disable
            } else {
                GraphOptimizationLevel::All
            })
            .map_err(builder_err)?
            .with_inter_threads(1)
            .map_err(builder_err)?;
        if opts.threads > 0 {
            builder = builder
                .with_intra_threads(opts.threads)
                .map_err(builder_err)?;
        }
        if opts.lean {
            // The CPU arena stays: it serves each run's intermediate values from blocks it keeps,
            // where the C allocator, given them one by one, leaves its heap fragmented and resident
            // (rxnmap calibration: a peak of 2.4× the model's size without the arena, 1.9× with it).
            builder = builder
                .with_memory_pattern(false)
                .map_err(builder_err)?
                .with_config_entry("session.disable_prepacking", "1")
                .map_err(builder_err)?;
            settings.push(("memory".to_string(), "lean".to_string()));
        }
        if opts.numerics == Numerics::Exact {
            for (k, v) in EXACT_CONFIG {
                builder = builder.with_config_entry(k, v).map_err(builder_err)?;
                settings.push((k.to_string(), v.to_string()));
            }
        }
        let written = tempfile::Builder::new()
            .prefix("quench-ort-")
            .tempdir()
            .map_err(anyhow::Error::from)
            .and_then(|dir| Ok((model.write_to(dir.path())?, dir)));
        let (session, files) = match written {
            Ok((path, dir)) => {
                model.release_pages();
                (builder.commit_from_file(&path), Some(dir))
            }
            Err(e) => {
                settings.push(("model".to_string(), format!("in memory ({e:#})")));
                let bytes = model.encode();
                model.release_pages();
                (builder.commit_from_memory(&bytes), None)
            }
        };
        let session =
            session.map_err(|e| anyhow!("onnxruntime cannot load {}: {e}", model.label))?;
        Ok(OrtSession {
            label: model.label.clone(),
            session,
            output_names: model.outputs.clone(),
            settings,
            _files: files,
        })
    }
}

impl Session for OrtSession {
    fn runtime(&self) -> RuntimeKind {
        RuntimeKind::Ort
    }

    fn output_names(&self) -> &[String] {
        &self.output_names
    }

    fn run(&mut self, batch: &[Named]) -> Result<Vec<Named>> {
        let mut out = Vec::with_capacity(self.output_names.len());
        self.run_each(batch, &mut |name, t| {
            out.push((name, t));
            Ok(())
        })?;
        Ok(out)
    }

    fn run_each(
        &mut self,
        batch: &[Named],
        each: &mut dyn FnMut(String, Tensor) -> Result<()>,
    ) -> Result<()> {
        let inputs: Vec<(String, DynValue)> = batch
            .iter()
            .map(|(n, t)| Ok((n.clone(), to_ort(t)?)))
            .collect::<Result<_>>()?;
        let label = self.label.clone();
        let mut outputs = self
            .session
            .run(inputs)
            .map_err(|e| anyhow!("onnxruntime failed to run {label}: {e}"))?;
        for name in &self.output_names {
            // Taken out of the outputs, the runtime's buffer is freed once converted.
            let v = outputs
                .remove(name.as_str())
                .ok_or_else(|| anyhow!("onnxruntime returned no output '{name}'"))?;
            let t = from_ort(&v).map_err(|e| anyhow!("output '{name}': {e}"))?;
            drop(v);
            each(name.clone(), t)?;
        }
        Ok(())
    }

    fn settings(&self) -> Vec<(String, String)> {
        self.settings.clone()
    }
}

/// Spare elements behind the data pointer of a tensor with no elements (see [`to_ort`]).
const EMPTY_SPARE: usize = 64;

fn to_ort(t: &Tensor) -> Result<DynValue> {
    // A tensor with no elements still hands onnxruntime a pointer, and some of its kernels read
    // behind it (InstanceNormalization over a zero-length axis, 1.31.1): the dangling pointer of an
    // empty Rust buffer crashes the process there. Such a tensor gets a real allocation instead.
    macro_rules! val {
        ($a:expr) => {
            if $a.is_empty() {
                let shape: Vec<i64> = $a.shape().iter().map(|&d| d as i64).collect();
                let mut spare = vec![Default::default(); EMPTY_SPARE];
                spare.clear();
                ort::value::Tensor::from_array((shape, spare))
            } else {
                ort::value::Tensor::from_array($a.clone())
            }
            .map(|v| v.into_dyn())
            .map_err(|e| anyhow!("{e}"))
        };
    }
    crate::exec::tensor::each_tensor!(t, a => val!(a))
}

fn from_ort(v: &DynValue) -> Result<Tensor> {
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        bail!("is not a tensor ({:?})", v.dtype());
    };
    macro_rules! arr {
        ($t:ty) => {
            v.try_extract_array::<$t>()
                .map_err(|e| anyhow!("{e}"))?
                .to_owned()
                .into()
        };
    }
    Ok(match ty {
        TensorElementType::Float32 => arr!(f32),
        TensorElementType::Float64 => arr!(f64),
        TensorElementType::Float16 => arr!(half::f16),
        TensorElementType::Int64 => arr!(i64),
        TensorElementType::Int32 => arr!(i32),
        TensorElementType::Int16 => arr!(i16),
        TensorElementType::Int8 => arr!(i8),
        TensorElementType::Uint64 => arr!(u64),
        TensorElementType::Uint32 => arr!(u32),
        TensorElementType::Uint16 => arr!(u16),
        TensorElementType::Uint8 => arr!(u8),
        TensorElementType::Bool => arr!(bool),
        other => bail!("has element type {other:?}, which quench cannot read"),
    })
}
