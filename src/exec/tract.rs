//! tract, the embedded runtime: pure Rust, always compiled in.
//!
//! tract optimises a model for concrete input shapes, so a session keeps the parsed (inference) model
//! and builds one optimised plan per distinct set of input shapes it is fed, fixing every symbolic dim
//! from the actual data. `value_info` is ignored at parse time: tract would take its shapes as facts,
//! and a symbolic `batch` there cannot unify with a concrete input.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, TDim, TValue, TVec,
    Tensor as TTensor, TypedRunnableModel,
};
use tract_onnx::tract_core::plan::eval;
use tract_onnx::tract_core::runtime::RunOptions;
use tract_onnx::tract_core::tract_linalg::multithread::Executor;

use super::{Named, OpTimes, Prepared, RuntimeKind, Session, SessionOptions, Tensor};

/// How many shape-specialised plans a session keeps.
const PLAN_CACHE: usize = 4;

pub struct TractSession {
    label: String,
    model: InferenceModel,
    input_names: Vec<String>,
    output_names: Vec<String>,
    plans: Vec<(Vec<Vec<usize>>, Arc<TypedRunnableModel>)>,
    threads: usize,
    executor: Option<Executor>,
    rewrites: Option<super::tract_kernels::Rewrites>,
    /// Softmaxes over a middle axis that the newest plan runs with quench's operator.
    softmaxes: usize,
}

/// Runs a tract step, turning a panic inside tract (some of its analysis and kernels index without
/// checking, e.g. a Conv with an unexpected input count, a Gather with an out-of-range id) into an
/// error that says what was being done.
pub(crate) fn guarded<T>(
    what: impl FnOnce() -> String,
    f: impl FnOnce() -> tract_onnx::prelude::TractResult<T>,
) -> Result<T> {
    let caught = quiet_panics(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    match caught {
        Ok(r) => r.map_err(|e| anyhow!("{}: {e:#}", what())),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            bail!("{} (tract panicked: {msg})", what())
        }
    }
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with panics on this thread kept off the terminal: a panic inside tract becomes an error
/// that says what it was, and the hook's message and backtrace would only repeat it. Panics elsewhere
/// (and with RUST_BACKTRACE set) go to the hook that was there before.
fn quiet_panics<T>(f: impl FnOnce() -> T) -> T {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let quiet = QUIET.with(|q| q.get()) && std::env::var_os("RUST_BACKTRACE").is_none();
            if !quiet {
                previous(info);
            }
        }));
    });
    let before = QUIET.with(|q| q.replace(true));
    let out = f();
    QUIET.with(|q| q.set(before));
    out
}

/// A graph input that an initializer of the same name gives a default value must declare a shape
/// the initializer has (ONNX requires it; onnxruntime refuses the model otherwise). tract does not
/// check it, and its shape rules can then crash the process (BatchNormalization's did, found by
/// fuzzing), so the conflict is refused here, naming the input.
fn defaults_fit(proto: &tract_onnx::pb::ModelProto) -> std::result::Result<(), String> {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    use tract_onnx::pb::type_proto::Value as Type;
    let Some(g) = proto.graph.as_ref() else {
        return Ok(());
    };
    for input in &g.input {
        let Some(init) = g.initializer.iter().find(|t| t.name == input.name) else {
            continue;
        };
        let Some(Type::TensorType(t)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
            continue;
        };
        let Some(shape) = t.shape.as_ref() else {
            continue;
        };
        let fits = shape.dim.len() == init.dims.len()
            && shape
                .dim
                .iter()
                .zip(&init.dims)
                .all(|(d, &n)| match &d.value {
                    Some(Value::DimValue(v)) => *v == n,
                    _ => true,
                });
        if !fits {
            let declared: Vec<String> = shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(Value::DimValue(v)) => v.to_string(),
                    Some(Value::DimParam(p)) if !p.is_empty() => p.clone(),
                    _ => "?".into(),
                })
                .collect();
            return Err(format!(
                "input '{}' declares shape [{}] but the initializer of the same name (its default \
                 value) holds {:?}",
                input.name,
                declared.join(", "),
                init.dims
            ));
        }
    }
    Ok(())
}

/// Operators whose first input is laid out `[N, C, …]`: tract reads its channel axis without a
/// bounds check.
const CHANNEL_FIRST: &[&str] = &[
    "BatchNormalization",
    "InstanceNormalization",
    "Conv",
    "ConvInteger",
    "ConvTranspose",
    "QLinearConv",
    "MaxPool",
    "AveragePool",
    "LpPool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GlobalLpPool",
    "LRN",
];

/// The data input of an operator in [`CHANNEL_FIRST`] must have a batch and a channel axis (ONNX
/// requires it). When the graph fixes its rank (an initializer, or a graph input's declared shape)
/// and it has fewer than two axes, the node is refused, named: tract's shape rules index the channel
/// axis unchecked, and a BatchNormalization over a rank-1 tensor aborted the process (found by
/// fuzzing).
fn channel_ranks_fit(g: &tract_onnx::pb::GraphProto) -> std::result::Result<(), String> {
    use tract_onnx::pb::type_proto::Value as Type;
    let rank_of = |name: &str| -> Option<usize> {
        if let Some(t) = g.initializer.iter().find(|t| t.name == name) {
            return Some(t.dims.len());
        }
        let input = g.input.iter().find(|i| i.name == name)?;
        let Type::TensorType(t) = input.r#type.as_ref()?.value.as_ref()?;
        Some(t.shape.as_ref()?.dim.len())
    };
    for n in &g.node {
        if CHANNEL_FIRST.contains(&n.op_type.as_str())
            && let Some(x) = n.input.first()
            && let Some(rank) = rank_of(x)
            && rank < 2
        {
            return Err(format!(
                "node '{}' ({}): its input '{x}' has {rank} axes, fewer than the batch and \
                 channel axes the operator needs",
                n.name, n.op_type
            ));
        }
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                channel_ranks_fit(sub)?;
            }
        }
    }
    Ok(())
}

/// Every `Transpose`'s `perm` (in the graph and its subgraphs) must be a permutation of `0..n`, as
/// ONNX requires: tract's analysis allocates without bound on one that is not (a byte-damaged `perm`
/// made it ask for 8 GiB and more, found by fuzzing), so such a node is refused, named.
fn perms_valid(g: &tract_onnx::pb::GraphProto) -> std::result::Result<(), String> {
    for n in &g.node {
        if n.op_type == "Transpose"
            && let Some(a) = n.attribute.iter().find(|a| a.name == "perm")
        {
            let mut seen = vec![false; a.ints.len()];
            let ok = a.ints.iter().all(|&p| {
                usize::try_from(p)
                    .ok()
                    .filter(|&p| p < seen.len() && !seen[p])
                    .map(|p| seen[p] = true)
                    .is_some()
            });
            if !ok {
                return Err(format!(
                    "node '{}' (Transpose): perm {:?} is not a permutation of 0..{}",
                    n.name,
                    a.ints,
                    a.ints.len()
                ));
            }
        }
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                perms_valid(sub)?;
            }
        }
    }
    Ok(())
}

fn onnx() -> tract_onnx::Onnx {
    tract_onnx::onnx().with_ignore_value_info(true)
}

impl TractSession {
    pub fn new(model: &Prepared, opts: &SessionOptions) -> Result<TractSession> {
        let mut onnx = onnx();
        let mut rewrites = None;
        if opts.tract_kernels {
            super::tract_kernels::register(&mut onnx);
        }
        // The encoded bytes go as soon as tract has its own protobuf of them, and the weights' file
        // pages as soon as they are encoded.
        let bytes = model.encode();
        model.release_pages();
        // Decoded from the encoded bytes themselves: tract's `proto_model_for_read` would first copy
        // them into a growing buffer, which at worst holds twice the model beside them.
        let mut proto = {
            use prost::Message;
            tract_onnx::pb::ModelProto::decode(bytes::Bytes::from(bytes))
                .map_err(|e| anyhow!("tract cannot read {}: {e:#}", model.label))?
        };
        defaults_fit(&proto)
            .and_then(|()| proto.graph.as_ref().map_or(Ok(()), perms_valid))
            .and_then(|()| proto.graph.as_ref().map_or(Ok(()), channel_ranks_fit))
            .map_err(|e| anyhow!("tract cannot load {}: {e}", model.label))?;
        if opts.tract_kernels {
            rewrites = Some(super::tract_kernels::rewrite(&mut proto));
            // What the rewrite let go of (the codes it re-laid, its working copies) goes back before
            // tract copies every constant into its own model.
            crate::util::release_freed_memory();
        }
        let parsed = guarded(
            || format!("tract cannot load {}", model.label),
            || onnx.model_for_proto_model(&proto),
        )?;
        drop(proto);
        crate::util::release_freed_memory();
        let input_names = model
            .inputs
            .iter()
            .map(|i| i.name.clone())
            .collect::<Vec<_>>();
        let tract_inputs = parsed.input_outlets()?.len();
        if tract_inputs != input_names.len() {
            bail!(
                "tract sees {tract_inputs} inputs in {} but the graph declares {}",
                model.label,
                input_names.len()
            );
        }
        let executor = match opts.threads {
            1 => None,
            0 => Some(Executor::multithread(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
            )),
            n => Some(Executor::multithread(n)),
        };
        Ok(TractSession {
            label: model.label.clone(),
            model: parsed,
            input_names,
            output_names: model.outputs.clone(),
            plans: Vec::new(),
            threads: opts.threads,
            executor,
            rewrites,
            softmaxes: 0,
        })
    }

    /// The plan for these input shapes: parsed model + concrete input facts, optimised.
    fn plan(&mut self, inputs: &[&Tensor]) -> Result<Arc<TypedRunnableModel>> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        if let Some(pos) = self.plans.iter().position(|(s, _)| *s == shapes) {
            return Ok(self.plans[pos].1.clone());
        }
        let mut model = self.model.clone();
        for (i, t) in inputs.iter().enumerate() {
            let fact = InferenceFact::dt_shape(datum_type(t), t.shape());
            model.set_input_fact(i, fact)?;
        }
        let mut typed = guarded(
            || {
                format!(
                    "tract cannot optimise {} for input shapes {shapes:?}",
                    self.label
                )
            },
            || model.into_optimized(),
        )?;
        if self.rewrites.is_some() {
            self.softmaxes = super::tract_kernels::replace_strided_softmax(&mut typed)
                .map_err(|e| anyhow!("{}: {e:#}", self.label))?;
        }
        crate::util::release_freed_memory();
        let options = RunOptions {
            executor: self.executor.clone(),
            ..Default::default()
        };
        let plan = typed
            .into_runnable_with_options(&options)
            .map_err(|e| anyhow!("tract cannot plan {}: {e:#}", self.label))?;
        if self.plans.len() == PLAN_CACHE {
            self.plans.remove(0);
        }
        self.plans.push((shapes, plan.clone()));
        Ok(plan)
    }
}

impl TractSession {
    /// Runs one batch; with `ops`, each node's evaluation is timed and added there under its
    /// operator's name.
    fn run_with(&mut self, batch: &[Named], ops: Option<&mut OpTimes>) -> Result<Vec<Named>> {
        let ordered: Vec<&Tensor> = self
            .input_names
            .iter()
            .map(|n| {
                batch
                    .iter()
                    .find(|(m, _)| m == n)
                    .map(|(_, t)| t)
                    .with_context(|| format!("input '{n}' is missing"))
            })
            .collect::<Result<_>>()?;
        let plan = self.plan(&ordered)?;
        let values: TVec<TValue> = ordered.iter().map(|t| to_tract(t).into()).collect();
        // Some tract kernels index without checking (e.g. Gather with an out-of-range id): a panic there
        // is the input's fault and becomes an error, not an abort.
        let outputs = guarded(
            || format!("tract failed to run {}", self.label),
            || {
                let mut ops = ops;
                // Each node starts with the vector registers' upper halves clear: tract's
                // hand-written kernels can leave them in use, which slows the SSE code of the
                // operators after them (see `kernels::zero_upper`).
                plan.spawn()?
                    .run_plan_with_eval(values, |ctx, state, node, input| {
                        crate::kernels::zero_upper();
                        let start = ops.is_some().then(Instant::now);
                        let out = eval(ctx, state, node, input);
                        if let (Some(ops), Some(start)) = (ops.as_deref_mut(), start) {
                            ops.add(&node.op().name(), start.elapsed().as_secs_f64());
                        }
                        out
                    })
            },
        )?;
        if outputs.len() != self.output_names.len() {
            bail!(
                "tract returned {} outputs for {} declared",
                outputs.len(),
                self.output_names.len()
            );
        }
        self.output_names
            .iter()
            .zip(outputs)
            .map(|(name, v)| {
                Ok((
                    name.clone(),
                    from_tract(&v).with_context(|| format!("output '{name}'"))?,
                ))
            })
            .collect()
    }
}

impl Session for TractSession {
    fn runtime(&self) -> RuntimeKind {
        RuntimeKind::Tract
    }

    fn output_names(&self) -> &[String] {
        &self.output_names
    }

    fn run(&mut self, batch: &[Named]) -> Result<Vec<Named>> {
        self.run_with(batch, None)
    }

    fn run_timing_ops(&mut self, batch: &[Named], ops: &mut OpTimes) -> Result<Vec<Named>> {
        self.run_with(batch, Some(ops))
    }

    fn settings(&self) -> Vec<(String, String)> {
        vec![
            ("runtime".into(), format!("tract-onnx {}", TRACT_VERSION)),
            ("threads".into(), self.threads.to_string()),
            (
                "optimisation".into(),
                "into_optimized, value_info ignored".into(),
            ),
            (
                "weight kernels".into(),
                match &self.rewrites {
                    None => "tract's own".into(),
                    Some(r) => format!(
                        "quench {} ({} int8, {} MatMulNBits, {} codebook products, {} weight-only Conv, {} Gemm as MatMul); {} ({} MatMulInteger, {} QDQ MatMul, {} int8 MatMul in limbs, {} 4-bit MatMulNBits in limbs, {} Conv, {} with the float epilogue, {} DynamicQuantizeLinear); {} QLinearConv as DequantizeLinear → Conv → QuantizeLinear; {} LSTM over int8 weights; {} convolution weights decoded once at load",
                        crate::kernels::Isa::detect().name(),
                        r.int8,
                        r.nbits,
                        r.codebook,
                        r.float_conv,
                        r.gemm,
                        crate::kernels::integer::IntIsa::detect().name(),
                        r.integer,
                        r.qdq,
                        r.limbs,
                        r.nbits_limbs,
                        r.conv,
                        r.epilogues,
                        r.quantize,
                        r.qlinear_conv,
                        r.lstm,
                        r.decoded
                    ),
                },
            ),
            (
                "softmax over a middle axis".into(),
                match &self.rewrites {
                    None => "tract's own".into(),
                    Some(_) => format!("quench, over rows ({} in the newest plan)", self.softmaxes),
                },
            ),
        ]
    }
}

/// The tract version quench is built against (pinned in Cargo.toml).
pub const TRACT_VERSION: &str = "0.23.9";

/// tract's type for an ONNX element type that quench feeds.
pub(crate) fn datum_of(d: crate::onnx::dtype::DataType) -> Result<DatumType> {
    use crate::onnx::dtype::DataType as D;
    Ok(match d {
        D::Float => DatumType::F32,
        D::Double => DatumType::F64,
        D::Float16 => DatumType::F16,
        D::Int64 => DatumType::I64,
        D::Int32 => DatumType::I32,
        D::Int16 => DatumType::I16,
        D::Int8 => DatumType::I8,
        D::Uint64 => DatumType::U64,
        D::Uint32 => DatumType::U32,
        D::Uint16 => DatumType::U16,
        D::Uint8 => DatumType::U8,
        D::Bool => DatumType::Bool,
        other => bail!("quench cannot feed inputs of type {other:?}"),
    })
}

fn datum_type(t: &Tensor) -> DatumType {
    match t {
        Tensor::F32(_) => DatumType::F32,
        Tensor::F64(_) => DatumType::F64,
        Tensor::F16(_) => DatumType::F16,
        Tensor::I64(_) => DatumType::I64,
        Tensor::I32(_) => DatumType::I32,
        Tensor::I16(_) => DatumType::I16,
        Tensor::I8(_) => DatumType::I8,
        Tensor::U64(_) => DatumType::U64,
        Tensor::U32(_) => DatumType::U32,
        Tensor::U16(_) => DatumType::U16,
        Tensor::U8(_) => DatumType::U8,
        Tensor::Bool(_) => DatumType::Bool,
    }
}

fn to_tract(t: &Tensor) -> TTensor {
    crate::exec::tensor::each_tensor!(t, a => TTensor::from(a.clone()))
}

fn from_tract(t: &TTensor) -> Result<Tensor> {
    macro_rules! arr {
        ($ty:ty) => {
            t.to_plain_array_view::<$ty>()
                .map_err(|e| anyhow!("{e:#}"))?
                .to_owned()
                .into()
        };
    }
    Ok(match t.datum_type() {
        DatumType::F32 => arr!(f32),
        DatumType::F64 => arr!(f64),
        DatumType::F16 => arr!(half::f16),
        DatumType::I64 => arr!(i64),
        DatumType::I32 => arr!(i32),
        DatumType::I16 => arr!(i16),
        DatumType::I8 => arr!(i8),
        DatumType::U64 => arr!(u64),
        DatumType::U32 => arr!(u32),
        DatumType::U16 => arr!(u16),
        DatumType::U8 => arr!(u8),
        DatumType::Bool => arr!(bool),
        // Shape values computed symbolically; concrete once the plan has fixed every input dim.
        DatumType::TDim => {
            let v = t
                .to_plain_array_view::<TDim>()
                .map_err(|e| anyhow!("{e:#}"))?;
            let mut out = Vec::with_capacity(v.len());
            for d in v.iter() {
                out.push(
                    d.to_i64()
                        .map_err(|_| anyhow!("tract left the dim '{d}' symbolic"))?,
                );
            }
            ndarray::ArrayD::from_shape_vec(v.raw_dim(), out)?.into()
        }
        other => bail!("tract produced a tensor of type {other:?}, which quench cannot read"),
    })
}
