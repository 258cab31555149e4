//! The op table: for each (domain, op_type), which inputs are weights and along which axis their output
//! channels lie. Passes ask this table; they do not hard-code operator names.

use super::graph::Node;

/// What kind of weight an input slot carries, which fixes its output-channel axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightKind {
    /// MatMul B: [..., K, N], output channels along the last axis.
    MatMulB,
    /// Gemm B: [K, N], or [N, K] when transB = 1.
    GemmB,
    /// Conv W: [M, C/group, k...], output channels on axis 0.
    ConvW,
    /// ConvTranspose W: [C, M/group, k...], output channels on axis 1.
    ConvTransposeW,
    /// Gather data used as an embedding table: one row per token.
    Embedding,
    /// LSTM / GRU / RNN input and recurrence weights [dirs, gates*hidden, in].
    Recurrent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightSlot {
    pub input: usize,
    pub kind: WeightKind,
}

const MATMUL: &[WeightSlot] = &[WeightSlot {
    input: 1,
    kind: WeightKind::MatMulB,
}];
const GEMM: &[WeightSlot] = &[WeightSlot {
    input: 1,
    kind: WeightKind::GemmB,
}];
const CONV: &[WeightSlot] = &[WeightSlot {
    input: 1,
    kind: WeightKind::ConvW,
}];
const CONV_TRANSPOSE: &[WeightSlot] = &[WeightSlot {
    input: 1,
    kind: WeightKind::ConvTransposeW,
}];
const GATHER: &[WeightSlot] = &[WeightSlot {
    input: 0,
    kind: WeightKind::Embedding,
}];
const RECURRENT: &[WeightSlot] = &[
    WeightSlot {
        input: 1,
        kind: WeightKind::Recurrent,
    },
    WeightSlot {
        input: 2,
        kind: WeightKind::Recurrent,
    },
];

/// The weight slots of an operator (empty when it has none).
pub fn weight_slots(domain: &str, op_type: &str) -> &'static [WeightSlot] {
    if !matches!(domain, "" | "ai.onnx") {
        return &[];
    }
    match op_type {
        "MatMul" => MATMUL,
        "Gemm" => GEMM,
        "Conv" => CONV,
        "ConvTranspose" => CONV_TRANSPOSE,
        "Gather" => GATHER,
        "LSTM" | "GRU" | "RNN" => RECURRENT,
        _ => &[],
    }
}

/// The weight kind of `input` of `node`, if it is a weight slot.
pub fn weight_kind(node: &Node, input: usize) -> Option<WeightKind> {
    weight_slots(&node.domain, &node.op_type)
        .iter()
        .find(|s| s.input == input)
        .map(|s| s.kind)
}

/// The output-channel axis of a weight of rank `rank` in `input` of `node`.
pub fn output_channel_axis(node: &Node, input: usize, rank: usize) -> Option<usize> {
    let kind = weight_kind(node, input)?;
    Some(match kind {
        WeightKind::MatMulB => rank.checked_sub(1)?,
        WeightKind::GemmB => {
            if node.int_attribute("transB").unwrap_or(0) != 0 {
                0
            } else {
                1
            }
        }
        WeightKind::ConvW | WeightKind::Embedding => 0,
        WeightKind::ConvTransposeW | WeightKind::Recurrent => 1,
    })
    .filter(|&a| a < rank)
}
