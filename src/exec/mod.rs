//! Execution: run a model in tract (pure Rust, always compiled in) or onnxruntime (loaded at run time),
//! behind one [`Session`] trait, on batches of named [`Tensor`]s from an [`inputs`] source.
//!
//! A model reaches a runtime as ONNX bytes encoded from the IR, so what runs is exactly what quench would
//! write. Before a batch is run it is checked against the model's declared inputs ([`InputInfo`]), so a
//! wrong name, type, rank or dimension is reported by quench in the user's terms rather than by a runtime.

pub mod inputs;
#[cfg(feature = "onnxruntime")]
pub mod ort;
pub mod synth;
pub mod tensor;
pub mod tract;
pub mod tract_kernels;

use std::collections::HashMap;
use std::fmt;

use anyhow::{Context, Result, bail};
use prost::Message;
use serde::Serialize;

use crate::ir::Model;
use crate::onnx::dtype::{DataType, DataTypeExt};
use crate::onnx::pb::{ModelProto, ValueInfoProto, tensor_shape_proto, type_proto};

pub use tensor::{Named, Tensor};

/// Which runtime executes a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Tract,
    Ort,
}

impl RuntimeKind {
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Tract => "tract",
            RuntimeKind::Ort => "ort",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tract" => Ok(RuntimeKind::Tract),
            "ort" | "onnxruntime" => Ok(RuntimeKind::Ort),
            other => Err(format!("unknown runtime '{other}' (expected tract or ort)")),
        }
    }
}

/// How onnxruntime may change numerics. quench measures retention under the ONNX semantics of the graph
/// by default; `Fast` measures what the runtime does with its own default session options instead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Numerics {
    #[default]
    Exact,
    Fast,
}

#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Threads for one inference (intra-op); 0 lets the runtime decide.
    pub threads: usize,
    pub numerics: Numerics,
    /// Trade speed for memory (onnxruntime: no graph rewrites, memory pattern or weight pre-packing, so
    /// that the weights are only ever mapped from the session's model file), for long runs that keep
    /// many intermediate values, such as calibration.
    pub lean: bool,
    /// tract: run weight products over compressed weights (int8 DequantizeLinear, MatMulNBits, codebook
    /// lookups) with quench's own kernels, keeping the weights compressed in memory. Off gives tract's
    /// own handling of the same graph, the reference the kernels are checked against.
    pub tract_kernels: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            threads: 1,
            numerics: Numerics::Exact,
            lean: false,
            tract_kernels: true,
        }
    }
}

/// A model prepared for one runtime.
pub trait Session {
    fn runtime(&self) -> RuntimeKind;
    /// Output names in the order of the model's graph outputs.
    fn output_names(&self) -> &[String];
    /// Runs one batch. Inputs are matched by name; the caller has checked them with [`check_batch`].
    fn run(&mut self, inputs: &[Named]) -> Result<Vec<Named>>;
    /// Runs one batch and hands the outputs to `each` one at a time, in graph-output order. A runtime
    /// that owns its output buffers converts and releases them one by one, so a caller folding outputs
    /// into statistics never holds a second copy of them all.
    fn run_each(
        &mut self,
        inputs: &[Named],
        each: &mut dyn FnMut(String, Tensor) -> Result<()>,
    ) -> Result<()> {
        for (name, t) in self.run(inputs)? {
            each(name, t)?;
        }
        Ok(())
    }
    /// Runs one batch as [`Session::run`] does, adding the time each operator took to `ops` (by the
    /// runtime's name of the operator). tract only: other runtimes refuse.
    fn run_timing_ops(&mut self, inputs: &[Named], ops: &mut OpTimes) -> Result<Vec<Named>> {
        let _ = (inputs, ops);
        bail!(
            "{} does not time its operators (only tract does)",
            self.runtime()
        )
    }
    /// The settings that can change numerics or speed, as the runtime was configured (for reports).
    fn settings(&self) -> Vec<(String, String)>;
}

/// Time spent per kind of operator, summed over runs: operator name → (seconds, evaluations).
#[derive(Clone, Debug, Default)]
pub struct OpTimes(pub std::collections::BTreeMap<String, (f64, usize)>);

impl OpTimes {
    pub fn add(&mut self, op: &str, seconds: f64) {
        match self.0.get_mut(op) {
            Some((t, n)) => {
                *t += seconds;
                *n += 1;
            }
            None => {
                self.0.insert(op.to_string(), (seconds, 1));
            }
        }
    }
}

/// One dimension of a declared input shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbol(String),
    Unknown,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Symbol(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A model input that must be fed at run time (graph inputs backed by an initializer are not).
#[derive(Clone, Debug, Serialize)]
pub struct InputInfo {
    pub name: String,
    #[serde(serialize_with = "ser_dtype")]
    pub dtype: Option<DataType>,
    /// None when the model declares no shape.
    pub dims: Option<Vec<Dim>>,
}

fn ser_dtype<S: serde::Serializer>(
    d: &Option<DataType>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&d.name().to_ascii_lowercase()),
        None => s.serialize_none(),
    }
}

impl InputInfo {
    pub(crate) fn from_value_info(info: &ValueInfoProto) -> InputInfo {
        let mut out = InputInfo {
            name: info.name.clone(),
            dtype: None,
            dims: None,
        };
        if let Some(type_proto::Value::TensorType(t)) =
            info.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            out.dtype = DataType::try_from(t.elem_type)
                .ok()
                .filter(|d| *d != DataType::Undefined);
            out.dims = t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => {
                            Dim::Fixed(*v)
                        }
                        Some(tensor_shape_proto::dimension::Value::DimParam(p))
                            if !p.is_empty() && p != "?" =>
                        {
                            Dim::Symbol(p.clone())
                        }
                        _ => Dim::Unknown,
                    })
                    .collect()
            });
        }
        out
    }

    pub fn describe(&self) -> String {
        let dtype = self
            .dtype
            .map(|d| d.name().to_ascii_lowercase())
            .unwrap_or_else(|| "?".into());
        match &self.dims {
            Some(d) => {
                let dims: Vec<String> = d.iter().map(|d| d.to_string()).collect();
                format!("{}: {dtype}[{}]", self.name, dims.join(", "))
            }
            None => format!("{}: {dtype}[..]", self.name),
        }
    }
}

/// A model ready to be handed to a runtime: its ONNX form and what it declares. The protobuf shares
/// the model's tensor data; encoded bytes are made only when a runtime asks for them, and not kept.
#[derive(Clone)]
pub struct Prepared {
    pub label: String,
    pub inputs: Vec<InputInfo>,
    pub outputs: Vec<String>,
    proto: std::sync::Arc<ModelProto>,
}

impl Prepared {
    pub fn from_model(model: &Model, label: &str) -> Prepared {
        Prepared::from_proto(model.to_proto(), label)
    }

    pub fn from_proto(proto: ModelProto, label: &str) -> Prepared {
        let graph = proto.graph.as_ref();
        let initializers: std::collections::HashSet<&str> = graph
            .map(|g| g.initializer.iter().map(|t| t.name.as_str()).collect())
            .unwrap_or_default();
        let inputs = graph
            .map(|g| {
                g.input
                    .iter()
                    .filter(|i| !initializers.contains(i.name.as_str()))
                    .map(InputInfo::from_value_info)
                    .collect()
            })
            .unwrap_or_default();
        let outputs = graph
            .map(|g| g.output.iter().map(|o| o.name.clone()).collect())
            .unwrap_or_default();
        Prepared {
            label: label.to_string(),
            inputs,
            outputs,
            proto: std::sync::Arc::new(proto),
        }
    }

    /// The model encoded as ONNX bytes. A runtime that parses them should drop them as soon as it has:
    /// they are as large as the model.
    pub fn encode(&self) -> Vec<u8> {
        self.proto.encode_to_vec()
    }

    /// Lets the pages of the model's tensors that lie in quench's read-only file mappings go (they are
    /// read again if ever touched). A runtime calls this once it has encoded or written the model: the
    /// encoding read every weight, and the runtime holds its own copy or mapping from then on.
    pub fn release_pages(&self) {
        let Some(g) = &self.proto.graph else { return };
        let attrs = g.node.iter().flat_map(|n| n.attribute.iter());
        for t in g
            .initializer
            .iter()
            .chain(attrs.filter_map(|a| a.t.as_ref()))
        {
            crate::onnx::release_pages(&t.raw_data);
        }
    }

    /// Writes the model into `folder` as `model.onnx` with its tensors in `model.onnx.data`, so that a
    /// runtime can map the weights from the file instead of holding a copy of the encoded model.
    pub fn write_to(&self, folder: &std::path::Path) -> Result<std::path::PathBuf> {
        let path = folder.join("model.onnx");
        crate::onnx::write_model_file(
            (*self.proto).clone(),
            &path,
            &[],
            &crate::onnx::SaveOptions::external(1024),
        )
        .with_context(|| format!("cannot write {} for the runtime", self.label))?;
        Ok(path)
    }
}

/// Opens a session of the given runtime.
pub fn open(
    model: &Prepared,
    runtime: RuntimeKind,
    opts: &SessionOptions,
) -> Result<Box<dyn Session>> {
    match runtime {
        RuntimeKind::Tract => Ok(Box::new(tract::TractSession::new(model, opts)?)),
        #[cfg(feature = "onnxruntime")]
        RuntimeKind::Ort => Ok(Box::new(ort::OrtSession::new(model, opts)?)),
        #[cfg(not(feature = "onnxruntime"))]
        RuntimeKind::Ort => {
            bail!("this build of quench has no onnxruntime support (feature `onnxruntime`)")
        }
    }
}

/// What checking a batch found that is worth reporting but not an error.
#[derive(Debug, Default, Clone)]
pub struct BatchNotes {
    /// Inputs holding NaN or infinite values, with how many.
    pub non_finite: Vec<(String, usize)>,
}

/// Checks a batch against the model's declared inputs: every input present and no other, element type,
/// rank, fixed dims, and one value per symbolic dim across all inputs.
/// The longest axis an input fed to a runtime may have (2^31).
pub const MAX_DIM: usize = 1 << 31;

pub fn check_batch(inputs: &[InputInfo], batch: &[Named]) -> Result<BatchNotes> {
    let expected: Vec<String> = inputs.iter().map(|i| i.describe()).collect();
    for (name, _) in batch {
        if !inputs.iter().any(|i| &i.name == name) {
            bail!(
                "input '{name}' is not an input of the model (it takes {})",
                expected.join("; ")
            );
        }
    }
    let mut symbols: HashMap<&str, (usize, &str)> = HashMap::new();
    let mut notes = BatchNotes::default();
    for info in inputs {
        let Some((_, t)) = batch.iter().find(|(n, _)| n == &info.name) else {
            bail!(
                "input '{}' is missing (the model takes {})",
                info.name,
                expected.join("; ")
            );
        };
        // Even an empty tensor may not claim an axis no real data has: runtimes size their plans from
        // the dims, and one such dim beside a 0 kept tract's analysis busy without end.
        if let Some((axis, d)) = t.shape().iter().enumerate().find(|(_, d)| **d > MAX_DIM) {
            bail!(
                "input '{}' has {d} at axis {axis}, more than the {MAX_DIM} quench runs on one axis",
                info.name
            );
        }
        if let Some(dt) = info.dtype
            && dt != t.data_type()
        {
            bail!(
                "input '{}' is {} but the model declares {}",
                info.name,
                t.dtype_name(),
                dt.name().to_ascii_lowercase()
            );
        }
        if let Some(dims) = &info.dims {
            if dims.len() != t.shape().len() {
                bail!(
                    "input '{}' has rank {} (shape {:?}) but the model declares rank {} ({})",
                    info.name,
                    t.shape().len(),
                    t.shape(),
                    dims.len(),
                    info.describe()
                );
            }
            for (axis, (d, &actual)) in dims.iter().zip(t.shape()).enumerate() {
                match d {
                    Dim::Fixed(v) if *v != actual as i64 => bail!(
                        "input '{}' has {actual} at axis {axis} but the model fixes it to {v} ({})",
                        info.name,
                        info.describe()
                    ),
                    Dim::Symbol(s) => {
                        if let Some((prev, who)) = symbols.get(s.as_str())
                            && *prev != actual
                        {
                            bail!(
                                "dim '{s}' is {prev} in input '{who}' but {actual} in input '{}'",
                                info.name
                            );
                        }
                        symbols.insert(s, (actual, &info.name));
                    }
                    _ => {}
                }
            }
        }
        let bad = t.non_finite();
        if bad > 0 {
            notes.non_finite.push((info.name.clone(), bad));
        }
    }
    Ok(notes)
}

/// Builds a copy of the model whose graph outputs also expose the given intermediate values (already
/// existing outputs are kept first, in order). Runtimes then return them, so per-layer statistics can
/// be taken without any runtime-specific hook.
pub fn expose_values(model: &Model, names: &[String], label: &str) -> Prepared {
    let mut proto = model.to_proto();
    if let Some(g) = proto.graph.as_mut() {
        let have: std::collections::HashSet<String> =
            g.output.iter().map(|o| o.name.clone()).collect();
        // Graph inputs are not exposed as outputs (the caller has them already).
        let inputs: std::collections::HashSet<String> =
            g.input.iter().map(|i| i.name.clone()).collect();
        for n in names {
            if !have.contains(n) && !inputs.contains(n) {
                g.output.push(ValueInfoProto {
                    name: n.clone(),
                    ..Default::default()
                });
            }
        }
        read_tied_constants_directly(g);
    }
    Prepared::from_proto(proto, label)
}

/// Drops the `Identity` nodes that copy an initializer (exporters tie repeated layers' weights this
/// way): their readers read the initializer itself. A runtime that runs the graph as written (such as
/// onnxruntime without graph rewrites, as lean sessions do) would otherwise copy every tied weight on
/// every run. Identities read inside subgraphs or whose output is a graph output are kept.
fn read_tied_constants_directly(g: &mut crate::onnx::pb::GraphProto) {
    use crate::onnx::pb::NodeProto;
    fn subgraph_reads(nodes: &[NodeProto], into: &mut std::collections::HashSet<String>) {
        for n in nodes {
            for a in &n.attribute {
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    into.extend(sub.node.iter().flat_map(|m| m.input.iter().cloned()));
                    into.extend(sub.output.iter().map(|o| o.name.clone()));
                    subgraph_reads(&sub.node, into);
                }
            }
        }
    }
    let mut keep: std::collections::HashSet<String> =
        g.output.iter().map(|o| o.name.clone()).collect();
    subgraph_reads(&g.node, &mut keep);
    let mut alias: HashMap<String, String> = g
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.name.clone()))
        .collect();
    g.node.retain(|n| {
        let tie = n.op_type.as_deref() == Some("Identity")
            && matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"))
            && n.input.len() == 1
            && n.output.len() == 1
            && !keep.contains(&n.output[0]);
        match alias
            .get(n.input.first().map_or("", String::as_str))
            .cloned()
        {
            Some(src) if tie => {
                alias.insert(n.output[0].clone(), src);
                false
            }
            _ => true,
        }
    });
    for n in &mut g.node {
        for i in &mut n.input {
            if let Some(src) = alias.get(i.as_str()) {
                i.clone_from(src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::pb::{AttributeProto, GraphProto, NodeProto};

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    #[test]
    fn tied_constants_are_read_directly_except_where_named_elsewhere() {
        let sub = GraphProto {
            node: vec![node("Neg", &["in_sub"], "neg")],
            output: vec![ValueInfoProto {
                name: "neg".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut cond = node("If", &["c"], "branch");
        cond.attribute.push(AttributeProto {
            name: "then_branch".into(),
            g: Some(sub.clone()),
            ..Default::default()
        });
        let mut g = GraphProto {
            initializer: vec![crate::onnx::tensor::from_f32("w", &[2, 2], &[1.0; 4])],
            node: vec![
                node("Identity", &["w"], "w1"),
                node("Identity", &["w1"], "w2"),
                node("MatMul", &["x", "w2"], "y"),
                node("Identity", &["w"], "out"),
                node("Identity", &["w"], "in_sub"),
                cond,
                node("Identity", &["x"], "x1"),
                node("Add", &["x1", "w1"], "z"),
            ],
            output: vec![ValueInfoProto {
                name: "out".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        read_tied_constants_directly(&mut g);
        let listed: Vec<(String, Vec<String>)> = g
            .node
            .iter()
            .map(|n| (n.output[0].clone(), n.input.clone()))
            .collect();
        let expect =
            |o: &str, i: &[&str]| (o.to_string(), i.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            listed,
            vec![
                expect("y", &["x", "w"]),
                // A graph output and a value a subgraph reads keep their Identity.
                expect("out", &["w"]),
                expect("in_sub", &["w"]),
                expect("branch", &["c"]),
                // An Identity of a graph input is not a tie.
                expect("x1", &["x"]),
                expect("z", &["x1", "w"]),
            ]
        );
    }
}
