//! Folding per-channel affine ops into the convolution before them: `Conv → BatchNormalization`,
//! `Conv → Mul(c)`, `Conv → Div(c)`, `Conv → Add(c)` and `Conv → Sub(c)`, where `c` is a constant that
//! is one value per output channel (or one value for all). The weight and bias absorb the op, so the
//! Conv computes what the pair did (exact in real arithmetic; in float the products round once more),
//! and the op goes away.
//!
//! Exporters leave such chains behind (Paddle's "learnable affine blocks" are a scalar `Mul` and `Add`
//! after each Conv; older exporters keep BatchNormalization). Folding them matters for activation
//! quantization: the Conv's output is then the value the next op reads, so a `QuantizeLinear` right
//! after the Conv (what lets onnxruntime fuse QLinearConv) quantizes what the model keeps. onnxruntime
//! does not fold a `Mul` whose constant is its first input, so folding also makes the float parts
//! faster.
//!
//! A pair is left alone when the Conv's output has other readers or is a graph output, the reader's
//! output is a graph output (folding would rename it), the weight is read elsewhere (folding would
//! copy it), or the constant does not broadcast per output channel.

use std::collections::{HashMap, HashSet};

use super::{Pass, PassReport};
use crate::error::Result;
use crate::ir::{ConstantRef, Graph, Model, NodeId, Patch, Slot, ValueId};
use crate::onnx::dtype::DataType;
use crate::onnx::tensor::to_f32;
use crate::passes::quantize_weights::emit::f32_tensor;

pub struct FoldAffine;

impl Pass for FoldAffine {
    fn name(&self) -> &'static str {
        "fold-affine"
    }

    fn run(&self, model: &mut Model) -> Result<PassReport> {
        let mut report = PassReport::new(self.name());
        let mut folded: HashMap<String, Vec<String>> = HashMap::new();
        let mut renamed: HashMap<String, String> = HashMap::new();
        // Each round folds one reader into each Conv; chains (Mul then Add) take several rounds.
        loop {
            let consts = super::quantize_activations::main_graph_constants(model);
            let g = &model.graph;
            let mut patch = Patch::new(self.name());
            let mut any = false;
            let mut touched: HashSet<NodeId> = HashSet::new();
            let convs: Vec<NodeId> = g
                .nodes()
                .filter(|(_, n)| {
                    n.op_type == "Conv" && super::quantize_activations::is_std(&n.domain)
                })
                .map(|(id, _)| id)
                .collect();
            let folds: Vec<(NodeId, Fold)> = convs
                .into_iter()
                .filter_map(|c| foldable(g, c, &consts).map(|f| (c, f)))
                .collect();
            // A Conv without a bias is rebuilt; its new node must not read the output of a node
            // this round removes (the reroute covers only existing readers), so it waits a round.
            let readers: HashSet<NodeId> = folds.iter().map(|(_, f)| f.reader).collect();
            for (conv, fold) in folds {
                let n = g.node(conv);
                if touched.contains(&fold.reader)
                    || (n.input(2).is_none()
                        && n.input(0)
                            .and_then(|x| g.value(x).producer())
                            .is_some_and(|(p, _)| readers.contains(&p)))
                {
                    continue;
                }
                touched.insert(fold.reader);
                let names = &mut model.names;
                let w_name = g.value_name(n.input(1).expect("checked"));
                let base = w_name.replace(['/', ':'], "_");
                let w = patch.constant(
                    names,
                    &format!("{base}_folded"),
                    f32_tensor(&fold.w_dims, &fold.w),
                );
                let b = patch.constant(
                    names,
                    &format!("{base}_folded_bias"),
                    f32_tensor(&[fold.b.len() as i64], &fold.b),
                );
                patch.replace_input(conv, 1, &w);
                let conv_out = g.value_name(n.outputs()[0].expect("checked")).to_string();
                if n.input(2).is_some() {
                    patch.replace_input(conv, 2, &b);
                    patch.replace_all_uses(&fold.reader_out, &conv_out);
                    patch.remove_node(fold.reader);
                } else {
                    // No bias slot to reroute: a new Conv with one takes the pair's place.
                    let x = g.value_name(n.input(0).expect("checked")).to_string();
                    let attrs = n.attributes().iter().map(|a| a.proto.clone()).collect();
                    let out = patch.node(
                        names,
                        &n.name,
                        "Conv",
                        &n.domain,
                        &[Some(&x), Some(&w), Some(&b)],
                        1,
                        attrs,
                    );
                    patch.replace_all_uses(&fold.reader_out, &out[0]);
                    patch.remove_node(fold.reader);
                    patch.remove_node(conv);
                    // The new node is named after the old one (with a suffix); report it as the old.
                    if let Some(new_name) = out[0].strip_suffix("_out") {
                        let first = renamed.get(&n.name).cloned().unwrap_or(n.name.clone());
                        renamed.insert(new_name.to_string(), first);
                    }
                }
                let first = renamed.get(&n.name).cloned().unwrap_or(n.name.clone());
                folded.entry(first).or_default().push(fold.what);
                any = true;
            }
            if !any {
                break;
            }
            model.graph.apply(patch)?;
        }
        if !folded.is_empty() {
            super::DeadNodeElimination.run(model)?;
            report.changed = true;
            let mut convs: Vec<_> = folded.into_iter().collect();
            convs.sort();
            let ops: usize = convs.iter().map(|(_, v)| v.len()).sum();
            report.changes.push(format!(
                "folded {ops} per-channel ops into {} Conv weights and biases",
                convs.len()
            ));
            for (conv, what) in convs {
                report.changes.push(format!("{conv}: {}", what.join(", ")));
            }
        }
        Ok(report)
    }
}

struct Fold {
    reader: NodeId,
    reader_out: String,
    w: Vec<f32>,
    w_dims: Vec<i64>,
    b: Vec<f32>,
    what: String,
}

/// The folded weight and bias of `conv` with its only reader, when that reader is a per-channel
/// affine op with constant operands.
fn foldable(g: &Graph, conv: NodeId, consts: &HashMap<String, ConstantRef>) -> Option<Fold> {
    let n = g.node(conv);
    let out = n.outputs().first().copied().flatten()?;
    let [u] = g.value(out).uses() else {
        return None;
    };
    if g.is_output(out) {
        return None;
    }
    let Slot::Input(slot) = u.slot else {
        return None;
    };
    let r = g.node(u.node);
    if !super::quantize_activations::is_std(&r.domain) || r.outputs().len() != 1 {
        return None;
    }
    let r_out = r.outputs()[0]?;
    if g.is_output(r_out) {
        return None;
    }
    let float_const = |v: ValueId| -> Option<(Vec<f32>, Vec<i64>)> {
        let c = consts.get(g.value_name(v))?;
        if c.dtype() != Some(DataType::Float) {
            return None;
        }
        Some((to_f32(&c.tensor).ok()?, c.shape().to_vec()))
    };
    let w_in = n.input(1)?;
    if g.value(w_in).uses().len() != 1 {
        return None;
    }
    let (w, w_dims) = float_const(w_in)?;
    if w_dims.len() < 3 || w.is_empty() {
        return None;
    }
    let m = w_dims[0] as usize;
    let b = match n.input(2) {
        Some(b) => {
            let (b, _) = float_const(b)?;
            if b.len() != m {
                return None;
            }
            b
        }
        None => vec![0.0; m],
    };
    // One value per output channel of a [N, M, spatial…] output, or one value for all.
    let out_rank = w_dims.len();
    let per_channel = |(v, dims): (Vec<f32>, Vec<i64>)| -> Option<Vec<f32>> {
        if dims.len() > out_rank {
            return None;
        }
        if v.len() == 1 {
            return Some(vec![v[0]; m]);
        }
        let at = out_rank - dims.len();
        let channel_only = dims
            .iter()
            .enumerate()
            .all(|(i, &d)| if i + at == 1 { d as usize == m } else { d == 1 });
        (channel_only && v.len() == m).then_some(v)
    };
    let other = |slot: usize| {
        r.input(1 - slot)
            .and_then(&float_const)
            .and_then(per_channel)
    };
    let k = w.len() / m;
    let scaled = |a: &[f32], b: Vec<f32>, c: &[f32]| -> (Vec<f32>, Vec<f32>) {
        let w2 = w.iter().enumerate().map(|(i, x)| x * a[i / k]).collect();
        let b2 = b
            .iter()
            .zip(a)
            .zip(c)
            .map(|((b, a), c)| b * a + c)
            .collect();
        (w2, b2)
    };
    let zeros = vec![0.0; m];
    let ones = vec![1.0; m];
    let ((w2, b2), what) = match (r.op_type.as_str(), slot) {
        ("Mul", 0 | 1) => (scaled(&other(slot)?, b, &zeros), "Mul".to_string()),
        ("Div", 0) => {
            let c = other(0)?;
            if c.contains(&0.0) {
                return None;
            }
            let inv: Vec<f32> = c.iter().map(|c| 1.0 / c).collect();
            (scaled(&inv, b, &zeros), "Div".to_string())
        }
        ("Add", 0 | 1) => (scaled(&ones, b, &other(slot)?), "Add".to_string()),
        ("Sub", 0) => {
            let c: Vec<f32> = other(0)?.iter().map(|c| -c).collect();
            (scaled(&ones, b, &c), "Sub".to_string())
        }
        ("BatchNormalization", 0) => {
            if r.int_attribute("training_mode").unwrap_or(0) != 0 {
                return None;
            }
            let eps = r.attribute("epsilon").and_then(|a| a.f).unwrap_or(1e-5);
            let p: Vec<Vec<f32>> = (1..5)
                .map(|i| r.input(i).and_then(&float_const).map(|c| c.0))
                .collect::<Option<_>>()?;
            if p.iter().any(|v| v.len() != m) {
                return None;
            }
            let a: Vec<f32> = (0..m).map(|c| p[0][c] / (p[3][c] + eps).sqrt()).collect();
            let shift: Vec<f32> = (0..m).map(|c| p[1][c] - p[2][c] * a[c]).collect();
            (scaled(&a, b, &shift), "BatchNormalization".to_string())
        }
        _ => return None,
    };
    if w2.iter().chain(&b2).any(|x| !x.is_finite()) {
        return None;
    }
    Some(Fold {
        reader: u.node,
        reader_out: g.value_name(r_out).to_string(),
        w: w2,
        w_dims,
        b: b2,
        what,
    })
}
