//! Small graphs for unit tests: nodes, a model around a graph, and a tract run of it.

use crate::exec::{self, RuntimeKind, SessionOptions, Tensor};
use crate::ir::Model;
use crate::onnx::pb::{AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto};

/// A standard-domain node named after its one output.
pub(crate) fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{op}_{output}")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// An INT attribute.
pub(crate) fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: Some(v),
        r#type: Some(2),
        ..Default::default()
    }
}

/// The model of `graph` at the given default-domain opset.
pub(crate) fn model_of(graph: GraphProto, opset: i64) -> Model {
    let proto = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        graph: Some(graph),
        ..Default::default()
    };
    Model::from_proto(proto, vec![]).unwrap()
}

/// Runs `m` in tract on one f32 input and returns every output as f32 values.
pub(crate) fn run_f32(m: &Model, input: &str, shape: &[usize], x: &[f32]) -> Vec<Vec<f32>> {
    let p = exec::Prepared::from_model(m, "t");
    let mut s = exec::open(&p, RuntimeKind::Tract, &SessionOptions::default()).unwrap();
    let x = ndarray::ArrayD::from_shape_vec(shape.to_vec(), x.to_vec()).unwrap();
    s.run(&[(input.into(), Tensor::from(x))])
        .unwrap()
        .iter()
        .map(|(_, t)| t.to_f32().iter().copied().collect())
        .collect()
}
