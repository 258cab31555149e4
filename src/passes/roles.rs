//! What a weight is for, guessed from the names real exporters give (PyTorch module paths, TensorFlow
//! scopes, Hugging Face conventions) and from the op that reads it — so a recipe can say "attention
//! projections int8, feed-forward NF4, embeddings and the head float" once for every model.

use std::collections::{HashSet, VecDeque};

use serde::Serialize;

use crate::ir::{Graph, NodeId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Query/key/value/output projections of attention.
    Attention,
    /// Feed-forward (MLP) layers of a transformer block.
    Ffn,
    /// An embedding table read by Gather.
    Embedding,
    /// The output projection (lm_head, classifier).
    Head,
    /// A convolution kernel.
    Conv,
    Other,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Attention => "attention",
            Role::Ffn => "ffn",
            Role::Embedding => "embedding",
            Role::Head => "head",
            Role::Conv => "conv",
            Role::Other => "other",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "attention" => Role::Attention,
            "ffn" => Role::Ffn,
            "embedding" => Role::Embedding,
            "head" => Role::Head,
            "conv" => Role::Conv,
            "other" => Role::Other,
            _ => {
                return Err(format!(
                    "unknown role '{s}' (expected attention, ffn, embedding, head, conv, other)"
                ));
            }
        })
    }
}

/// Name pieces, lowercase: split at `/ . : ;` and whitespace.
fn pieces(name: &str) -> Vec<String> {
    name.split(['/', '.', ':', ';', ' '])
        .filter(|p| !p.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

const HEAD: &[&str] = &["lm_head", "classifier", "cls_head"];
const EMBEDDING: &[&str] = &["embed", "wte", "wpe", "tok_embeddings", "word_embeddings"];
/// Pieces that contain one of these belong to attention.
const ATTENTION_IN: &[&str] = &[
    "attn",
    "attention",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv",
    "out_proj",
    "in_proj",
    "multihead",
];
/// Pieces equal to one of these belong to attention (substrings would be too loose: `keypoint`).
const ATTENTION_IS: &[&str] = &[
    "query", "key", "value", "q", "k", "v", "wq", "wk", "wv", "wo_attn", "mha",
];
const FFN_IN: &[&str] = &[
    "mlp",
    "ffn",
    "feed_forward",
    "feedforward",
    "intermediate",
    "up_proj",
    "down_proj",
    "gate_proj",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "c_fc",
];
const FFN_IS: &[&str] = &[
    "fc1", "fc2", "fc3", "linear1", "linear2", "w1", "w2", "w3", "wi", "wi_0", "wi_1", "wo",
];

/// The role of a weight from its name, its readers' names and op types.
pub fn classify(weight: &str, readers: &[(&str, &str)]) -> Role {
    let mut ps = pieces(weight);
    for (node, _) in readers {
        ps.extend(pieces(node));
    }
    let any_in = |list: &[&str]| ps.iter().any(|p| list.iter().any(|l| p.contains(l)));
    let any_is = |list: &[&str]| ps.iter().any(|p| list.contains(&p.as_str()));
    let op = |o: &str| readers.iter().any(|(_, t)| *t == o);
    if any_in(HEAD) {
        Role::Head
    } else if op("Gather") || any_in(EMBEDDING) {
        Role::Embedding
    } else if any_in(ATTENTION_IN) || any_is(ATTENTION_IS) {
        Role::Attention
    } else if any_in(FFN_IN)
        || any_is(FFN_IS)
        // BERT: `layer.N.output.dense` is the second FFN matrix (`attention.output.dense` matched above).
        || (any_is(&["output"]) && any_is(&["dense"]))
    {
        Role::Ffn
    } else if op("Conv") || op("ConvTranspose") {
        Role::Conv
    } else {
        Role::Other
    }
}

/// Roles the names cannot tell, from the graph around the readers (`readers`, nodes of `g`):
/// - `Head`: some reader's output reaches a graph output without passing through another weighted
///   layer (`weighted` holds every node that reads a weight), not counting paths that only carry its
///   shape (through Shape or Size);
/// - `Embedding`: a MatMul/Gemm whose data input is a OneHot or an Equal (through Cast/Reshape-like
///   ops), which is a table lookup written as a product (jax2tf and TF exports).
///
/// Weights read inside subgraphs (If/Loop/Scan bodies) keep the role their names give.
pub fn structural(
    g: &Graph,
    readers: &[NodeId],
    weighted: &HashSet<NodeId>,
    by_name: Role,
) -> Role {
    if !matches!(by_name, Role::Other | Role::Conv)
        || readers
            .iter()
            .any(|&r| g.node(r).subgraphs().next().is_some())
    {
        return by_name;
    }
    if by_name == Role::Other
        && readers.iter().any(|&r| {
            let n = g.node(r);
            matches!(n.op_type.as_str(), "MatMul" | "Gemm")
                && n.input(0).is_some_and(|a| from_one_hot(g, a))
        })
    {
        return Role::Embedding;
    }
    let mut seen: HashSet<NodeId> = readers.iter().copied().collect();
    let mut queue: VecDeque<NodeId> = readers.iter().copied().collect();
    while let Some(n) = queue.pop_front() {
        for v in g.node(n).outputs().iter().flatten() {
            if g.is_output(*v) {
                return Role::Head;
            }
            for u in g.value(*v).uses() {
                // A Shape or Size reads only the dimensions: a layer whose values reach the output
                // only as the shape of something else is not the head.
                let shape_only = matches!(g.node(u.node).op_type.as_str(), "Shape" | "Size");
                if !shape_only && !weighted.contains(&u.node) && seen.insert(u.node) {
                    queue.push_back(u.node);
                }
            }
        }
    }
    by_name
}

/// Whether `v` is a constant: an initializer or a Constant node's output, possibly through Identity.
fn is_constant(g: &Graph, v: crate::ir::ValueId) -> bool {
    let (v, producer) = source(g, v, &["Identity"]);
    g.value(v).def() == crate::ir::Def::Initializer
        || producer.is_some_and(|p| g.node(p).op_type == "Constant")
}

/// Follows `v` up through nodes of the `through` op types (their input 0), at most 8 steps; returns
/// the value reached and the node producing it, if any.
fn source(
    g: &Graph,
    mut v: crate::ir::ValueId,
    through: &[&str],
) -> (crate::ir::ValueId, Option<NodeId>) {
    for _ in 0..8 {
        let Some((p, _)) = g.value(v).producer() else {
            return (v, None);
        };
        let n = g.node(p);
        match n.input(0) {
            Some(i) if through.contains(&n.op_type.as_str()) => v = i,
            _ => return (v, Some(p)),
        }
    }
    (v, g.value(v).producer().map(|(p, _)| p))
}

/// The layers of `g` that read a constant weight: MatMul/Gemm/Conv/ConvTranspose/recurrent ops with a
/// constant in a weight slot.
pub fn weighted_nodes(g: &Graph) -> HashSet<NodeId> {
    g.nodes()
        .filter(|(_, n)| {
            let slots: &[usize] = match n.op_type.as_str() {
                "MatMul" | "Gemm" | "Conv" | "ConvTranspose" => &[1],
                "LSTM" | "GRU" | "RNN" => &[1, 2],
                _ => &[],
            };
            slots
                .iter()
                .any(|&s| n.input(s).is_some_and(|v| is_constant(g, v)))
        })
        .map(|(id, _)| id)
        .collect()
}

/// The nodes reading value `v`, looking through Identity nodes.
pub fn readers(g: &Graph, v: crate::ir::ValueId) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        for u in g.value(v).uses() {
            let n = g.node(u.node);
            if n.op_type == "Identity" {
                stack.extend(n.outputs().iter().flatten().copied());
            } else if !out.contains(&u.node) {
                out.push(u.node);
            }
        }
    }
    out
}

fn from_one_hot(g: &Graph, v: crate::ir::ValueId) -> bool {
    const THROUGH: &[&str] = &[
        "Cast",
        "Reshape",
        "Identity",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Transpose",
    ];
    // OneHot, or the one-hot jax and TF write as Cast(Equal(ids, range)).
    source(g, v, THROUGH)
        .1
        .is_some_and(|p| matches!(g.node(p).op_type.as_str(), "OneHot" | "Equal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(weight: &str, node: &str, op: &str) -> Role {
        classify(weight, &[(node, op)])
    }

    #[test]
    fn real_exporter_names() {
        use Role::*;
        let cases = [
            (
                "onnx::MatMul_1582",
                "/mol_layer/self_attn/qkv_proj/MatMul",
                "MatMul",
                Attention,
            ),
            (
                "onnx::MatMul_1590",
                "/mol_layer/self_attn/o_proj/MatMul",
                "MatMul",
                Attention,
            ),
            (
                "onnx::MatMul_1591",
                "/mol_layer/linear1/MatMul",
                "MatMul",
                Ffn,
            ),
            (
                "model.layers.3.self_attn.q_proj.weight",
                "",
                "MatMul",
                Attention,
            ),
            ("model.layers.3.mlp.down_proj.weight", "", "MatMul", Ffn),
            (
                "bert/encoder/layer_0/attention/self/query/kernel",
                "",
                "MatMul",
                Attention,
            ),
            (
                "bert.encoder.layer.0.attention.output.dense.weight",
                "",
                "Gemm",
                Attention,
            ),
            (
                "bert.encoder.layer.0.intermediate.dense.weight",
                "",
                "Gemm",
                Ffn,
            ),
            ("bert.encoder.layer.0.output.dense.weight", "", "Gemm", Ffn),
            ("transformer.h.0.attn.c_attn.weight", "", "Gemm", Attention),
            ("transformer.h.0.mlp.c_proj.weight", "", "Gemm", Ffn),
            ("encoder.layers.1.fc1.weight", "", "MatMul", Ffn),
            ("lm_head.weight", "/lm_head/MatMul", "MatMul", Head),
            (
                "atoms_encoder.weight",
                "/atoms_encoder/Gather",
                "Gather",
                Embedding,
            ),
            ("model.embed_tokens.weight", "", "MatMul", Embedding),
            ("conv1.weight", "/conv1/Conv", "Conv", Conv),
            ("keypoint_head.w", "/kp/Conv", "Conv", Conv),
            // jax2tf prefixes every name with the traced function's name.
            (
                "jax2tf_get_logits_/Const:0",
                "jax2tf_get_logits_/pjit_get_logits_/MagikaV2/Dense_0/einsum/Einsum",
                "MatMul",
                Other,
            ),
        ];
        for (w, n, op, want) in cases {
            assert_eq!(role(w, n, op), want, "{w} / {n}");
        }
    }
}
