//! Visits every tensor a model carries, wherever it lives: graph initializers, sparse initializers,
//! node attributes (Constant values and any other tensor attribute), subgraphs of If/Loop/Scan, model
//! functions and training graphs. Each tensor comes with a description of where it is.

use super::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto,
};
use crate::error::Result;

pub type TensorVisitor<'a> = dyn FnMut(&mut TensorProto, &str) -> Result<()> + 'a;

pub fn model_tensors_mut(model: &mut ModelProto, f: &mut TensorVisitor) -> Result<()> {
    if let Some(g) = model.graph.as_mut() {
        graph_tensors_mut(g, "graph", f)?;
    }
    for func in &mut model.functions {
        let place = format!("function '{}'", func.name);
        for node in &mut func.node {
            node_tensors_mut(node, &place, f)?;
        }
    }
    for (i, ti) in model.training_info.iter_mut().enumerate() {
        if let Some(g) = ti.initialization.as_mut() {
            graph_tensors_mut(g, &format!("training_info[{i}].initialization"), f)?;
        }
        if let Some(g) = ti.algorithm.as_mut() {
            graph_tensors_mut(g, &format!("training_info[{i}].algorithm"), f)?;
        }
    }
    Ok(())
}

pub fn graph_tensors_mut(g: &mut GraphProto, place: &str, f: &mut TensorVisitor) -> Result<()> {
    let here = if g.name().is_empty() {
        place.to_string()
    } else {
        format!("{place} '{}'", g.name())
    };
    for t in &mut g.initializer {
        f(t, &format!("{here}, initializer"))?;
    }
    for s in &mut g.sparse_initializer {
        sparse_mut(s, &format!("{here}, sparse initializer"), f)?;
    }
    for node in &mut g.node {
        node_tensors_mut(node, &here, f)?;
    }
    Ok(())
}

fn node_tensors_mut(node: &mut NodeProto, place: &str, f: &mut TensorVisitor) -> Result<()> {
    let here = format!("{place}, node '{}' ({})", node.name(), node.op_type());
    for attr in &mut node.attribute {
        attribute_tensors_mut(attr, &here, f)?;
    }
    Ok(())
}

fn attribute_tensors_mut(
    attr: &mut AttributeProto,
    place: &str,
    f: &mut TensorVisitor,
) -> Result<()> {
    let here = format!("{place} attribute '{}'", attr.name);
    if let Some(t) = attr.t.as_mut() {
        f(t, &here)?;
    }
    for t in &mut attr.tensors {
        f(t, &here)?;
    }
    if let Some(s) = attr.sparse_tensor.as_mut() {
        sparse_mut(s, &here, f)?;
    }
    for s in &mut attr.sparse_tensors {
        sparse_mut(s, &here, f)?;
    }
    if let Some(g) = attr.g.as_mut() {
        graph_tensors_mut(g, &format!("{here} subgraph"), f)?;
    }
    for g in &mut attr.graphs {
        graph_tensors_mut(g, &format!("{here} subgraph"), f)?;
    }
    Ok(())
}

fn sparse_mut(s: &mut SparseTensorProto, place: &str, f: &mut TensorVisitor) -> Result<()> {
    if let Some(v) = s.values.as_mut() {
        f(v, &format!("{place} values"))?;
    }
    if let Some(i) = s.indices.as_mut() {
        f(i, &format!("{place} indices"))?;
    }
    Ok(())
}
