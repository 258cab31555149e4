//! One view of every constant of a model, wherever it lives: initializers, sparse initializers, `Constant`
//! nodes (value, value_float(s), value_int(s), value_string(s), sparse_value), in the main graph or in
//! any subgraph; and the weight sites: for each constant, the nodes and input slots that consume it as a
//! weight (a tied weight is one constant with several consumers).

use std::collections::HashMap;

use bytes::Bytes;
use serde::Serialize;

use super::graph::{Graph, NodeId, ValueId};
use super::model::Model;
use super::optable::{WeightKind, output_channel_axis, weight_kind};
use crate::onnx::dtype::{DataType, DataTypeExt};
use crate::onnx::pb::{SparseTensorProto, TensorProto};
use crate::onnx::tensor::{element_count, payload_bytes};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConstantSource {
    Initializer,
    SparseInitializer,
    /// The output of a `Constant` node.
    ConstantNode,
}

/// Where a graph sits in the model: the chain of (node, attribute, graph index) from the main graph.
pub type GraphPath = Vec<(String, String, usize)>;

#[derive(Clone, Debug)]
pub struct ConstantRef {
    pub name: String,
    pub path: GraphPath,
    pub value: ValueId,
    pub source: ConstantSource,
    /// The dense tensor (for sparse constants: the values tensor with the dense shape in `dims`).
    pub tensor: TensorProto,
    /// Number of elements stored (non-zeros for sparse constants).
    pub stored_elements: u64,
}

impl ConstantRef {
    pub fn dtype(&self) -> Option<DataType> {
        DataType::try_from(self.tensor.data_type).ok()
    }
    pub fn shape(&self) -> &[i64] {
        &self.tensor.dims
    }
    pub fn bytes(&self) -> u64 {
        // Sparse constants store only their non-zeros; `tensor.dims` is the dense shape.
        match (self.source, self.dtype().and_then(|d| d.bits())) {
            (ConstantSource::SparseInitializer, Some(bits)) => {
                crate::onnx::dtype::packed_bytes(self.stored_elements, bits).unwrap_or(u64::MAX)
            }
            _ => payload_bytes(&self.tensor),
        }
    }
    pub fn in_subgraph(&self) -> bool {
        !self.path.is_empty()
    }
}

/// The tensor a `Constant` node produces, from whichever attribute holds it.
pub fn constant_node_tensor(g: &Graph, node: NodeId) -> Option<(TensorProto, u64)> {
    let n = g.node(node);
    if n.op_type != "Constant" || !matches!(n.domain.as_str(), "" | "ai.onnx") {
        return None;
    }
    let a = n.attributes().first()?;
    let p = &a.proto;
    let scalar = |dt: DataType, dims: Vec<i64>| TensorProto {
        data_type: dt as i32,
        dims,
        ..Default::default()
    };
    let t = match a.name() {
        "value" => p.t.clone()?,
        "value_float" => TensorProto {
            float_data: vec![p.f()],
            ..scalar(DataType::Float, vec![])
        },
        "value_floats" => TensorProto {
            float_data: p.floats.clone(),
            ..scalar(DataType::Float, vec![p.floats.len() as i64])
        },
        "value_int" => TensorProto {
            int64_data: vec![p.i()],
            ..scalar(DataType::Int64, vec![])
        },
        "value_ints" => TensorProto {
            int64_data: p.ints.clone(),
            ..scalar(DataType::Int64, vec![p.ints.len() as i64])
        },
        "value_string" => TensorProto {
            string_data: vec![p.s.clone().unwrap_or_default()],
            ..scalar(DataType::String, vec![])
        },
        "value_strings" => TensorProto {
            string_data: p.strings.clone(),
            ..scalar(DataType::String, vec![p.strings.len() as i64])
        },
        "sparse_value" => {
            let s = p.sparse_tensor.as_ref()?;
            return Some(sparse_view(s));
        }
        _ => return None,
    };
    let count = element_count(&t.dims).unwrap_or(0);
    Some((t, count))
}

fn sparse_view(s: &SparseTensorProto) -> (TensorProto, u64) {
    let values = s.values.clone().unwrap_or_default();
    let nnz = values.dims.first().copied().unwrap_or(0).max(0) as u64;
    let t = TensorProto {
        dims: s.dims.clone(),
        raw_data: Bytes::new(),
        ..values
    };
    (t, nnz)
}

/// Every constant of the model, main graph first, then subgraphs depth-first, in graph order.
pub fn constants(model: &Model) -> Vec<ConstantRef> {
    let mut out = Vec::new();
    collect(&model.graph, &mut Vec::new(), &mut out);
    out
}

fn collect(g: &Graph, path: &mut GraphPath, out: &mut Vec<ConstantRef>) {
    for &id in g.initializers() {
        let v = g.value(id);
        let t = v.initializer().expect("initializer").clone();
        let stored_elements = element_count(&t.dims).unwrap_or(0);
        out.push(ConstantRef {
            name: v.name().to_string(),
            path: path.clone(),
            value: id,
            source: ConstantSource::Initializer,
            tensor: t,
            stored_elements,
        });
    }
    for &id in g.sparse_initializers() {
        let v = g.value(id);
        let (tensor, stored_elements) = sparse_view(v.sparse_initializer().expect("sparse"));
        out.push(ConstantRef {
            name: v.name().to_string(),
            path: path.clone(),
            value: id,
            source: ConstantSource::SparseInitializer,
            tensor,
            stored_elements,
        });
    }
    for (id, n) in g.nodes() {
        if let Some((tensor, stored_elements)) = constant_node_tensor(g, id)
            && let Some(Some(v)) = n.outputs().first()
        {
            out.push(ConstantRef {
                name: g.value_name(*v).to_string(),
                path: path.clone(),
                value: *v,
                source: ConstantSource::ConstantNode,
                tensor,
                stored_elements,
            });
        }
    }
    for (_, n) in g.nodes() {
        for a in n.attributes() {
            for (i, sub) in a.subgraphs().iter().enumerate() {
                path.push((n.name.clone(), a.name().to_string(), i));
                collect(sub, path, out);
                path.pop();
            }
        }
    }
}

/// One consumer of a weight: the node, its input slot and the weight's output-channel axis there.
#[derive(Clone, Debug, Serialize)]
pub struct WeightUse {
    pub node: String,
    pub op_type: String,
    pub input: usize,
    pub kind: WeightKind,
    pub channel_axis: Option<usize>,
    /// The consumer sits in a subgraph (the weight may live outside it).
    pub subgraph: bool,
}

#[derive(Clone, Debug)]
pub struct WeightSite {
    pub constant: ConstantRef,
    pub uses: Vec<WeightUse>,
    /// All readers of the constant, weight slot or not.
    pub readers: usize,
}

/// The weight sites of a model: constants of a floating-point type read at a weight slot of the op table.
pub fn weight_sites(model: &Model) -> Vec<WeightSite> {
    let all = constants(model);
    let mut index: HashMap<String, usize> = all
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.clone(), i))
        .collect();
    alias_identities(&model.graph, &mut index);
    let mut uses: Vec<Vec<WeightUse>> = vec![Vec::new(); all.len()];
    let mut readers = vec![0usize; all.len()];
    scan(&model.graph, false, &index, &all, &mut uses, &mut readers);
    all.into_iter()
        .zip(uses)
        .zip(readers)
        .filter(|((c, u), _)| !u.is_empty() && c.dtype().is_some_and(|d| d.is_float()))
        .map(|((constant, uses), readers)| WeightSite {
            constant,
            uses,
            readers,
        })
        .collect()
}

/// Exporters share a weight between repeated layers through `Identity` nodes (PyTorch does for tied
/// modules): the output of an Identity of a constant is that constant.
fn alias_identities(g: &Graph, index: &mut HashMap<String, usize>) {
    for (_, n) in g.nodes() {
        if n.op_type == "Identity"
            && matches!(n.domain.as_str(), "" | "ai.onnx")
            && let (Some(i), Some(Some(o))) = (n.input(0), n.outputs().first())
            && let Some(&c) = index.get(g.value_name(i))
        {
            index.insert(g.value_name(*o).to_string(), c);
        }
        for sub in n.subgraphs() {
            alias_identities(sub, index);
        }
    }
}

/// Names are unique across the whole model, so a read of a name anywhere (also through a subgraph's
/// outer scope) is a read of that constant.
fn scan(
    g: &Graph,
    in_subgraph: bool,
    index: &HashMap<String, usize>,
    all: &[ConstantRef],
    uses: &mut [Vec<WeightUse>],
    readers: &mut [usize],
) {
    for (_, n) in g.nodes() {
        if n.op_type == "Identity" {
            continue; // an alias, not a reader
        }
        for (slot, v) in n.inputs().iter().enumerate() {
            let Some(v) = v else { continue };
            let name = g.value_name(*v);
            let Some(&ci) = index.get(name) else { continue };
            readers[ci] += 1;
            if let Some(kind) = weight_kind(n, slot) {
                // A Gather is an embedding lookup only when its indices are not constant.
                if kind == WeightKind::Embedding
                    && n.input(1)
                        .is_some_and(|i| index.contains_key(g.value_name(i)))
                {
                    continue;
                }
                uses[ci].push(WeightUse {
                    node: n.name.clone(),
                    op_type: n.op_type.clone(),
                    input: slot,
                    kind,
                    channel_axis: output_channel_axis(n, slot, all[ci].tensor.dims.len()),
                    subgraph: in_subgraph,
                });
            }
        }
        for sub in n.subgraphs() {
            scan(sub, true, index, all, uses, readers);
        }
    }
}
