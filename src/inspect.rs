//! `quench inspect`: what a model is made of — IR version, opsets, producer, inputs and outputs, the
//! operator histogram, parameters and bytes by element type, and the weight sites.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::ir::{ConstantSource, Graph, Model, constants, weight_sites};
use crate::onnx::dtype::{DataType, DataTypeExt};
use crate::onnx::pb::tensor_shape_proto::dimension;
use crate::onnx::pb::{TypeProto, type_proto};

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub ir_version: i64,
    pub opsets: Vec<OpsetJson>,
    pub producer_name: String,
    pub producer_version: String,
    pub inputs: Vec<IoJson>,
    pub outputs: Vec<IoJson>,
    /// Nodes of every graph, subgraphs included.
    pub nodes: usize,
    pub subgraphs: usize,
    /// Operator counts over every graph; non-default domains as `domain::Op`.
    pub op_histogram: BTreeMap<String, usize>,
    /// Elements of every constant (initializers, Constant nodes, subgraphs; stored values of sparse ones).
    pub parameters: u64,
    pub parameter_bytes: u64,
    pub bytes_by_dtype: BTreeMap<String, u64>,
    pub parameters_by_dtype: BTreeMap<String, u64>,
    pub constants_by_source: BTreeMap<String, usize>,
    pub weight_sites: Vec<SiteJson>,
}

#[derive(Debug, Serialize)]
pub struct OpsetJson {
    pub domain: String,
    pub version: i64,
}

#[derive(Debug, Serialize)]
pub struct IoJson {
    pub name: String,
    pub dtype: String,
    /// Integers for fixed dims, strings for symbolic ones, null for unknown.
    pub dims: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Serialize)]
pub struct SiteJson {
    pub name: String,
    /// The consumer op type(s), comma-separated when they differ.
    pub op_type: String,
    pub shape: Vec<i64>,
    pub dtype: String,
    pub bytes: u64,
    /// initializer | constant | subgraph
    pub source: String,
    pub consumers: usize,
    pub uses: Vec<crate::ir::WeightUse>,
}

fn io_of(g: &Graph, ports: &[crate::ir::Port]) -> Vec<IoJson> {
    ports
        .iter()
        .map(|p| {
            let (dtype, dims) = describe_type(p.info.r#type.as_ref());
            IoJson {
                name: g.value_name(p.value).to_string(),
                dtype,
                dims,
            }
        })
        .collect()
}

fn describe_type(t: Option<&TypeProto>) -> (String, Option<Vec<serde_json::Value>>) {
    let Some(t) = t else {
        return ("unknown".into(), None);
    };
    match &t.value {
        Some(type_proto::Value::TensorType(tt)) => {
            let dtype = DataType::try_from(tt.elem_type)
                .map(|d| d.name().to_lowercase())
                .unwrap_or("unknown".into());
            let dims = tt.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(dimension::Value::DimValue(v)) => serde_json::Value::from(*v),
                        Some(dimension::Value::DimParam(p)) => serde_json::Value::from(p.clone()),
                        None => serde_json::Value::Null,
                    })
                    .collect()
            });
            (dtype, dims)
        }
        Some(type_proto::Value::SequenceType(_)) => ("sequence".into(), None),
        Some(type_proto::Value::MapType(_)) => ("map".into(), None),
        Some(type_proto::Value::OptionalType(_)) => ("optional".into(), None),
        Some(type_proto::Value::SparseTensorType(_)) => ("sparse_tensor".into(), None),
        Some(type_proto::Value::OpaqueType(_)) => ("opaque".into(), None),
        None => ("unknown".into(), None),
    }
}

fn histogram(g: &Graph, h: &mut BTreeMap<String, usize>, subgraphs: &mut usize) {
    for (_, n) in g.nodes() {
        let key = if matches!(n.domain.as_str(), "" | "ai.onnx") {
            n.op_type.clone()
        } else {
            format!("{}::{}", n.domain, n.op_type)
        };
        *h.entry(key).or_default() += 1;
        for s in n.subgraphs() {
            *subgraphs += 1;
            histogram(s, h, subgraphs);
        }
    }
}

fn source_name(source: ConstantSource, in_subgraph: bool) -> &'static str {
    if in_subgraph {
        return "subgraph";
    }
    match source {
        ConstantSource::Initializer | ConstantSource::SparseInitializer => "initializer",
        ConstantSource::ConstantNode => "constant",
    }
}

pub fn inspect(model: &Model) -> Inspection {
    let mut op_histogram = BTreeMap::new();
    let mut subgraphs = 0;
    histogram(&model.graph, &mut op_histogram, &mut subgraphs);
    let mut inspection = Inspection {
        ir_version: model.header.ir_version(),
        opsets: model
            .header
            .opset_import
            .iter()
            .map(|o| OpsetJson {
                domain: o.domain().to_string(),
                version: o.version(),
            })
            .collect(),
        producer_name: model.header.producer_name().to_string(),
        producer_version: model.header.producer_version().to_string(),
        inputs: io_of(&model.graph, model.graph.inputs()),
        outputs: io_of(&model.graph, model.graph.outputs()),
        nodes: model.graph.node_count_recursive(),
        subgraphs,
        op_histogram,
        parameters: 0,
        parameter_bytes: 0,
        bytes_by_dtype: BTreeMap::new(),
        parameters_by_dtype: BTreeMap::new(),
        constants_by_source: BTreeMap::new(),
        weight_sites: Vec::new(),
    };
    for c in constants(model) {
        let dtype = c
            .dtype()
            .map(|d| d.name().to_lowercase())
            .unwrap_or("unknown".into());
        let bytes = c.bytes();
        inspection.parameters += c.stored_elements;
        inspection.parameter_bytes += bytes;
        *inspection.bytes_by_dtype.entry(dtype.clone()).or_default() += bytes;
        *inspection.parameters_by_dtype.entry(dtype).or_default() += c.stored_elements;
        *inspection
            .constants_by_source
            .entry(source_name(c.source, c.in_subgraph()).to_string())
            .or_default() += 1;
    }
    for site in weight_sites(model) {
        let mut ops: Vec<&str> = site.uses.iter().map(|u| u.op_type.as_str()).collect();
        ops.dedup();
        let c = &site.constant;
        inspection.weight_sites.push(SiteJson {
            name: c.name.clone(),
            op_type: ops.join(","),
            shape: c.shape().to_vec(),
            dtype: c
                .dtype()
                .map(|d| d.name().to_lowercase())
                .unwrap_or_default(),
            bytes: c.bytes(),
            source: source_name(c.source, c.in_subgraph()).to_string(),
            consumers: site.uses.len(),
            uses: site.uses.clone(),
        });
    }
    inspection
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn dims_text(dims: &Option<Vec<serde_json::Value>>) -> String {
    match dims {
        None => "?".into(),
        Some(d) => {
            let parts: Vec<String> = d
                .iter()
                .map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "?".into(),
                    other => other.to_string(),
                })
                .collect();
            format!("[{}]", parts.join(", "))
        }
    }
}

/// The terminal form of an inspection.
pub fn render(i: &Inspection) -> String {
    let mut s = String::new();
    let opsets: Vec<String> = i
        .opsets
        .iter()
        .map(|o| {
            format!(
                "{}={}",
                if o.domain.is_empty() {
                    "ai.onnx"
                } else {
                    &o.domain
                },
                o.version
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "ir_version  {}   opsets  {}",
        i.ir_version,
        opsets.join(" ")
    );
    let _ = writeln!(s, "producer    {} {}", i.producer_name, i.producer_version);
    for io in &i.inputs {
        let _ = writeln!(
            s,
            "input       {}: {} {}",
            io.name,
            io.dtype,
            dims_text(&io.dims)
        );
    }
    for io in &i.outputs {
        let _ = writeln!(
            s,
            "output      {}: {} {}",
            io.name,
            io.dtype,
            dims_text(&io.dims)
        );
    }
    let _ = writeln!(s, "nodes       {} ({} subgraphs)", i.nodes, i.subgraphs);
    let mut ops: Vec<(&String, &usize)> = i.op_histogram.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let ops: Vec<String> = ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(s, "ops         {}", ops.join(", "));
    let _ = writeln!(
        s,
        "parameters  {} ({})",
        i.parameters,
        human_bytes(i.parameter_bytes)
    );
    for (dt, b) in &i.bytes_by_dtype {
        let _ = writeln!(
            s,
            "  {dt:<10} {:>12} elements  {}",
            i.parameters_by_dtype[dt],
            human_bytes(*b)
        );
    }
    let srcs: Vec<String> = i
        .constants_by_source
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(s, "constants   {}", srcs.join(", "));
    let _ = writeln!(s, "weight sites {}", i.weight_sites.len());
    let _ = writeln!(
        s,
        "  {:<48} {:<14} {:<18} {:<8} {:>10} {:<11} uses",
        "name", "op", "shape", "dtype", "bytes", "source"
    );
    for w in &i.weight_sites {
        let shape = format!("{:?}", w.shape);
        let name = if w.name.chars().count() > 48 {
            format!(
                "…{}",
                w.name
                    .chars()
                    .rev()
                    .take(47)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<String>()
            )
        } else {
            w.name.clone()
        };
        let _ = writeln!(
            s,
            "  {name:<48} {:<14} {shape:<18} {:<8} {:>10} {:<11} {}",
            w.op_type,
            w.dtype,
            human_bytes(w.bytes),
            w.source,
            w.consumers
        );
    }
    s
}
