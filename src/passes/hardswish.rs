//! Fusing hard-swish written out in elementary ops into `HardSigmoid` and one `Mul`.
//!
//! Exporters without a HardSwish op (Paddle, older TensorFlow and PyTorch exports) write
//! `x · relu6(x + 3) / 6` as four elementwise ops: `Add(x, 3) → Clip(0, 6) → Mul(x, ·) → Div(·, 6)`,
//! or with the `Div` (or a `Mul` by 1/6) before the `Mul` by `x`. onnxruntime fuses none of these
//! chains, so each is four passes over the tensor. `HardSigmoid(x; α = 1/6, β = 1/2)` computes
//! `clip(x/6 + 1/2, 0, 1) = relu6(x + 3)/6`, available from opset 6, so the chain becomes
//! `Mul(x, HardSigmoid(x))`: two passes. The results differ by float rounding only.
//!
//! On PP-OCR's detector (24 such chains; 256 × 256 pages, onnxruntime, 1 thread) this alone made
//! the fp32 model 0.86–0.88× its time (two runs). Activation quantization keeps the chains in
//! float between `DequantizeLinear` and `QuantizeLinear`; the detector's `w8a8` model went from
//! 1.05× to 0.95× the original fp32 time in the same run.
//!
//! A chain is left alone when one of its intermediate values has another reader or is a graph
//! output, or when its constants are not the scalars 3, 0, 6 (or 1/6).

use std::collections::HashMap;

use super::{Pass, PassReport};
use crate::error::Result;
use crate::ir::{ConstantRef, Graph, Model, NodeId, Patch, Slot, ValueId};
use crate::onnx::pb::AttributeProto;
use crate::onnx::tensor::to_f32;

pub struct FuseHardSwish;

/// The nodes of one chain, and the tensor it reads.
struct Chain {
    x: ValueId,
    nodes: Vec<NodeId>,
    out: ValueId,
}

impl Pass for FuseHardSwish {
    fn name(&self) -> &'static str {
        "fuse-hardswish"
    }

    fn run(&self, model: &mut Model) -> Result<PassReport> {
        let mut report = PassReport::new(self.name());
        if model.opset("").unwrap_or(1) < 6 {
            return Ok(report);
        }
        // A chain reading another chain's output waits for the next round: the patch reroutes only
        // readers that exist before it.
        let mut fused = 0;
        loop {
            let consts = super::quantize_activations::main_graph_constants(model);
            let g = &model.graph;
            let chains: Vec<Chain> = g
                .nodes()
                .filter(|(_, n)| {
                    n.op_type == "Add" && super::quantize_activations::is_std(&n.domain)
                })
                .filter_map(|(id, _)| chain_from(g, id, &consts))
                .collect();
            let outs: std::collections::HashSet<ValueId> = chains.iter().map(|c| c.out).collect();
            let ready: Vec<&Chain> = chains.iter().filter(|c| !outs.contains(&c.x)).collect();
            if ready.is_empty() {
                break;
            }
            let mut patch = Patch::new(self.name());
            let names = &mut model.names;
            for c in &ready {
                let x = g.value_name(c.x).to_string();
                let last = g.node(*c.nodes.last().expect("a chain has nodes"));
                let attrs = vec![float_attr("alpha", 1.0 / 6.0), float_attr("beta", 0.5)];
                let hs = patch.node(
                    names,
                    &format!("{}_hardsigmoid", last.name),
                    "HardSigmoid",
                    "",
                    &[Some(&x)],
                    1,
                    attrs,
                );
                let y = patch.node(
                    names,
                    &format!("{}_hardswish", last.name),
                    "Mul",
                    "",
                    &[Some(&x), Some(&hs[0])],
                    1,
                    Vec::new(),
                );
                patch.replace_all_uses(g.value_name(c.out), &y[0]);
                for &n in &c.nodes {
                    patch.remove_node(n);
                }
            }
            fused += ready.len();
            model.graph.apply(patch)?;
        }
        if fused == 0 {
            return Ok(report);
        }
        report.changed = true;
        report.changes.push(format!(
            "fused {fused} hard-swish chains (Add, Clip, Mul, Div) into HardSigmoid and Mul"
        ));
        Ok(report)
    }
}

fn float_attr(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: Some(v),
        r#type: Some(1),
        ..Default::default()
    }
}

/// The one reader of `v` (by input slot), when `v` has exactly one and is not a graph output.
fn only_reader(g: &Graph, v: ValueId) -> Option<(NodeId, usize)> {
    if g.is_output(v) {
        return None;
    }
    match g.value(v).uses() {
        [u] => match u.slot {
            Slot::Input(s) => Some((u.node, s)),
            Slot::Implicit => None,
        },
        _ => None,
    }
}

/// The chain `Add(x, 3) → Clip(0, 6) → {Mul(x, ·) → Div(·, 6) | Div(·, 6) / Mul(·, 1/6) → Mul(x, ·)}`
/// starting at the `Add` node `add`.
fn chain_from(g: &Graph, add: NodeId, consts: &HashMap<String, ConstantRef>) -> Option<Chain> {
    let scalar = |v: Option<ValueId>| -> Option<f32> {
        let c = consts.get(g.value_name(v?))?;
        // Only one-value constants qualify; a large bias is not decoded to find that out.
        if c.shape().iter().product::<i64>() != 1 {
            return None;
        }
        let vals = to_f32(&c.tensor).ok()?;
        (vals.len() == 1).then(|| vals[0])
    };
    let near = |a: Option<f32>, b: f32| a.is_some_and(|a| (a - b).abs() <= 1e-6 * b.abs().max(1.0));
    let std_node = |id: NodeId, op: &str| {
        let n = g.node(id);
        n.op_type == op && super::quantize_activations::is_std(&n.domain) && n.outputs().len() == 1
    };
    let out_of = |id: NodeId| g.node(id).outputs().first().copied().flatten();

    let a = g.node(add);
    let x = if near(scalar(a.input(1)), 3.0) {
        a.input(0)?
    } else if near(scalar(a.input(0)), 3.0) {
        a.input(1)?
    } else {
        return None;
    };
    if consts.contains_key(g.value_name(x)) {
        return None;
    }
    let (clip, 0) = only_reader(g, out_of(add)?)? else {
        return None;
    };
    if !std_node(clip, "Clip") {
        return None;
    }
    let cn = g.node(clip);
    let (lo, hi) = match (cn.input(1), cn.input(2)) {
        (None, None) => (
            cn.attribute("min").and_then(|a| a.f),
            cn.attribute("max").and_then(|a| a.f),
        ),
        (lo, hi) => (scalar(lo), scalar(hi)),
    };
    if !(near(lo, 0.0) && near(hi, 6.0)) {
        return None;
    }
    let clip_out = out_of(clip)?;
    let (second, slot) = only_reader(g, clip_out)?;
    let reads_x_and = |id: NodeId, other: ValueId| {
        let n = g.node(id);
        std_node(id, "Mul")
            && matches!((n.input(0), n.input(1)), (Some(p), Some(q)) if (p == x && q == other) || (p == other && q == x))
    };
    let divides_by_six = |id: NodeId, slot: usize| {
        let n = g.node(id);
        (std_node(id, "Div") && slot == 0 && near(scalar(n.input(1)), 6.0))
            || (std_node(id, "Mul") && near(scalar(n.input(1 - slot.min(1))), 1.0 / 6.0))
    };
    let third = if reads_x_and(second, clip_out) {
        // x · relu6(x + 3), then / 6.
        let (third, s) = only_reader(g, out_of(second)?)?;
        if !divides_by_six(third, s) {
            return None;
        }
        third
    } else if divides_by_six(second, slot) {
        // relu6(x + 3) / 6, then · x.
        let scaled = out_of(second)?;
        let (third, _) = only_reader(g, scaled)?;
        if !reads_x_and(third, scaled) {
            return None;
        }
        third
    } else {
        return None;
    };
    Some(Chain {
        x,
        nodes: vec![add, clip, second, third],
        out: out_of(third)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::dtype::DataType;
    use crate::onnx::pb::GraphProto;
    use crate::onnx::tensor::{from_f32, tensor_value_info};

    /// Three chains in the three orders, one whose Clip output is also read elsewhere (left alone),
    /// and one with the wrong constant (left alone).
    fn model() -> Model {
        let scalar = |name: &str, v: f32| from_f32(name, &[], &[v]);
        let g = GraphProto {
            name: Some("g".into()),
            node: vec![
                crate::testing::node("Add", &["x", "three"], "a1"),
                crate::testing::node("Clip", &["a1", "zero", "six"], "c1"),
                crate::testing::node("Mul", &["x", "c1"], "m1"),
                crate::testing::node("Div", &["m1", "six"], "y1"),
                crate::testing::node("Add", &["three", "y1"], "a2"),
                crate::testing::node("Clip", &["a2", "zero", "six"], "c2"),
                crate::testing::node("Div", &["c2", "six"], "d2"),
                crate::testing::node("Mul", &["d2", "y1"], "y2"),
                crate::testing::node("Add", &["y2", "three"], "a3"),
                crate::testing::node("Clip", &["a3", "zero", "six"], "c3"),
                crate::testing::node("Mul", &["sixth", "c3"], "d3"),
                crate::testing::node("Mul", &["y2", "d3"], "y3"),
                crate::testing::node("Add", &["y3", "three"], "a4"),
                crate::testing::node("Clip", &["a4", "zero", "six"], "c4"),
                crate::testing::node("Mul", &["y3", "c4"], "m4"),
                crate::testing::node("Div", &["m4", "six"], "y4"),
                crate::testing::node("Add", &["y4", "two"], "a5"),
                crate::testing::node("Clip", &["a5", "zero", "six"], "c5"),
                crate::testing::node("Mul", &["y4", "c5"], "m5"),
                crate::testing::node("Div", &["m5", "six"], "y5"),
            ],
            initializer: vec![
                scalar("three", 3.0),
                scalar("zero", 0.0),
                scalar("six", 6.0),
                scalar("sixth", 1.0 / 6.0),
                scalar("two", 2.0),
            ],
            input: vec![tensor_value_info("x", DataType::Float as i32, &[4, 16])],
            output: vec![
                tensor_value_info("y5", DataType::Float as i32, &[4, 16]),
                tensor_value_info("c4", DataType::Float as i32, &[4, 16]),
            ],
            ..Default::default()
        };
        crate::testing::model_of(g, 13)
    }

    fn run(m: &Model, x: &[f32]) -> Vec<Vec<f32>> {
        crate::testing::run_f32(m, "x", &[4, 16], x)
    }

    #[test]
    fn hard_swish_chains_become_hard_sigmoid_and_mul() {
        let reference = model();
        let mut fused = reference.clone();
        let r = FuseHardSwish.run(&mut fused).unwrap();
        assert_eq!(
            r.changes,
            vec!["fused 3 hard-swish chains (Add, Clip, Mul, Div) into HardSigmoid and Mul"]
        );
        let count = |m: &Model, op: &str| m.graph.nodes().filter(|(_, n)| n.op_type == op).count();
        assert_eq!(count(&fused, "HardSigmoid"), 3);
        assert_eq!(count(&fused, "Clip"), 2, "c4 is an output, a5 adds 2");
        crate::ir::check_model(&fused).unwrap();
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 4.0).collect();
        let (want, got) = (run(&reference, &x), run(&fused, &x));
        for (w, g) in want.iter().zip(&got) {
            for (a, b) in w.iter().zip(g) {
                assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
            }
        }
    }
}
