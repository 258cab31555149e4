//! Convolution weights that the graph decodes from compressed constants through a lookup (a codebook
//! or level table: `Gather`), and that stay with tract's own float convolution, are decoded once,
//! before tract reads the graph: the decoding nodes give way to one f32 initializer.
//!
//! tract would decode them itself, to the same values: its analysis evaluates every node whose inputs
//! are constant. But it keeps each step's result as a constant of the model it types, so a weight
//! decoded through a Gather, a Reshape, a Mul and another Reshape is resident four times over, all at
//! once, until decluttering drops the dead ones: ddddocr's codebook convolutions (0.9 M weights) put
//! about 14 MB on the load's peak that way. Decoded here, one weight at a time by tract itself on a
//! graph of just its decoding nodes, each step's result goes before the next weight's; the price is
//! the f32 weight in the parsed model instead of its codes. That pays for lookups (ddddocr vq2: peak
//! 51 → 45 MB), not for int8 codes (`Cast · Mul`, `DequantizeLinear`), which tract decodes in one or
//! two steps from one byte per weight: decoded here, ddddocr w8 peaked 4 MB higher.

use std::collections::HashSet;

use tract_onnx::pb;
use tract_onnx::prelude::{Framework, InferenceModelExt, IntoTensor, tvec};
use tract_onnx::tract_core::runtime::RunOptions;

use super::Index;

/// The longest chain of decoding nodes taken.
const MOST_NODES: usize = 64;

/// The nodes, in graph order, that compute `value` from constants alone (initializers and Constant
/// nodes); `None` if `value` is itself a constant, or something it depends on is not: a graph input,
/// a node of another domain, a node with a subgraph, a random generator, or more than
/// [`MOST_NODES`] nodes.
fn constant_chain(g: &pb::GraphProto, ix: &Index, value: &str) -> Option<Vec<usize>> {
    if ix.konst(value).is_some() {
        return None;
    }
    let mut nodes = Vec::new();
    let mut seen = HashSet::new();
    let mut pending = vec![value];
    while let Some(v) = pending.pop() {
        if v.is_empty() || ix.konst(v).is_some() || !seen.insert(v) {
            continue;
        }
        let p = *ix.producer.get(v)?;
        let node = &g.node[p];
        let plain = node.domain.is_empty() || node.domain == "ai.onnx";
        let subgraph = node
            .attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty());
        if !plain || subgraph || node.op_type.starts_with("Random") || nodes.len() == MOST_NODES {
            return None;
        }
        if !nodes.contains(&p) {
            nodes.push(p);
            pending.extend(node.input.iter().map(String::as_str));
        }
    }
    nodes.sort_unstable();
    Some(nodes)
}

/// `value` computed by tract from its decoding nodes alone, as an f32 initializer named `name`, and
/// the constants the nodes read; `None` if it is not computed from constants through a Gather, or
/// tract cannot compute it, or it is not f32.
fn decoded(
    g: &pb::GraphProto,
    ix: &Index,
    value: &str,
    name: &str,
    opsets: &[pb::OperatorSetIdProto],
) -> Option<(pb::TensorProto, Vec<String>)> {
    let nodes = constant_chain(g, ix, value)?;
    if !nodes.iter().any(|&i| g.node[i].op_type == "Gather") {
        return None;
    }
    let made: HashSet<&str> = nodes
        .iter()
        .flat_map(|&i| g.node[i].output.iter().map(String::as_str))
        .collect();
    let mut leaves: Vec<String> = Vec::new();
    for &i in &nodes {
        for x in &g.node[i].input {
            if !x.is_empty() && !made.contains(x.as_str()) && !leaves.contains(x) {
                leaves.push(x.clone());
            }
        }
    }
    let initializer = leaves
        .iter()
        .map(|l| {
            let mut t = ix.konst(l)?.t.clone();
            t.name = l.clone();
            Some(t)
        })
        .collect::<Option<Vec<_>>>()?;
    let mini = pb::ModelProto {
        ir_version: 8,
        opset_import: opsets.to_vec(),
        graph: Some(pb::GraphProto {
            name: "decode".into(),
            node: nodes.iter().map(|&i| g.node[i].clone()).collect(),
            initializer,
            output: vec![pb::ValueInfoProto {
                name: value.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let run = || -> tract_onnx::prelude::TractResult<_> {
        let onnx = tract_onnx::onnx().with_ignore_value_info(true);
        let plan = onnx
            .model_for_proto_model(&mini)?
            .into_optimized()?
            .into_runnable_with_options(&RunOptions::default())?;
        Ok(plan.run(tvec![])?.remove(0).into_tensor())
    };
    // A panic inside tract leaves the weight as the graph computes it.
    let t = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .ok()?
        .ok()?;
    let ram = t.try_as_plain_ram().ok()?;
    let values = ram.as_slice::<f32>().ok()?;
    let tensor = pb::TensorProto {
        name: name.into(),
        data_type: super::FLOAT,
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    };
    Some((tensor, leaves))
}

/// Replaces the lookup decoding the weight of every ONNX `Conv` and `ConvTranspose` left in `g` by the
/// decoded f32 initializer; returns the names of those initializers, and the constants the decoding
/// read (they go once nothing reads them).
pub(super) fn decode_conv_weights(
    g: &mut pb::GraphProto,
    opsets: &[pb::OperatorSetIdProto],
) -> (Vec<String>, Vec<String>) {
    let mut folded: Vec<(usize, String)> = Vec::new();
    let mut made: Vec<pb::TensorProto> = Vec::new();
    let mut read = Vec::new();
    {
        let ix = Index::new(g);
        for (i, node) in g.node.iter().enumerate() {
            let conv = matches!(node.op_type.as_str(), "Conv" | "ConvTranspose")
                && (node.domain.is_empty() || node.domain == "ai.onnx");
            let Some(w) = node.input.get(1).filter(|_| conv) else {
                continue;
            };
            let name = format!("{w}::decoded");
            if !made.iter().any(|t| t.name == name) {
                let Some((t, leaves)) = decoded(g, &ix, w, &name, opsets) else {
                    continue;
                };
                made.push(t);
                read.extend(leaves);
            }
            folded.push((i, name));
        }
    }
    let names = made.iter().map(|t| t.name.clone()).collect();
    for (i, name) in folded {
        g.node[i].input[1] = name;
    }
    g.initializer.extend(made);
    (names, read)
}
