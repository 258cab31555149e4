//! What a weight is for, guessed from the names real exporters give (PyTorch module paths, TensorFlow
//! scopes, Hugging Face conventions) and from the op that reads it — so a recipe can say "attention
//! projections int8, feed-forward NF4, embeddings and the head float" once for every model.

use serde::Serialize;

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
