//! Importance of a weight's columns from calibration data: the error a weight change δ makes in the
//! output of `y = x·W` is `δ·x`, whose expected square is `Σ_j δ_j² E[x_j²]` when the input channels
//! are uncorrelated — the diagonal of the layer's Hessian (or Fisher) proxy. So each column j of the
//! weight's `[channels, k]` rows is weighted by the energy E[x²] of the input channel it multiplies.
//!
//! - MatMul `A·B` (B a weight `[K, N]`): A's last axis, one channel per column.
//! - Gemm: A's axis 1 (0 with transA).
//! - Conv (group 1): X's axis 1; each input channel covers `kernel size` consecutive columns.
//!
//! Other readers (Gather tables, grouped convolutions, recurrent cells, readers in subgraphs) give
//! no importance, and the site is clustered data-free.

use std::collections::BTreeMap;

use crate::ir::{Model, WeightSite, WeightUse};

/// Mean x² per channel of `(tensor, axis)` over the calibration data.
pub type ChannelEnergy = BTreeMap<(String, i64), Vec<f64>>;

/// The activation a weight's reduction axis multiplies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Multiplicand {
    pub tensor: String,
    /// Its channel axis (negative counts from the end).
    pub axis: i64,
    /// Consecutive weight columns per input channel.
    pub repeat: usize,
    /// A convolution's geometry: each weight row multiplies a patch of the input.
    pub conv: Option<crate::quant::gptq::ConvGeometry>,
}

/// The multiplicand of one weight use, when the reader is one this module knows.
pub fn multiplicand(model: &Model, site: &WeightSite, u: &WeightUse) -> Option<Multiplicand> {
    if u.subgraph || u.node.is_empty() || u.input != 1 {
        return None;
    }
    let g = &model.graph;
    let mut found = g.nodes().filter(|(_, n)| n.name == u.node);
    let (_, node) = found.next()?;
    if found.next().is_some() || node.op_type != u.op_type {
        return None;
    }
    let a = g.value_name(node.input(0)?).to_string();
    let shape = site.constant.shape();
    match u.op_type.as_str() {
        "MatMul" if shape.len() == 2 => Some(Multiplicand {
            tensor: a,
            axis: -1,
            repeat: 1,
            conv: None,
        }),
        "Gemm" if shape.len() == 2 => Some(Multiplicand {
            tensor: a,
            axis: if node.int_attribute("transA").unwrap_or(0) != 0 {
                0
            } else {
                1
            },
            repeat: 1,
            conv: None,
        }),
        "Conv" if shape.len() >= 3 && node.int_attribute("group").unwrap_or(1) == 1 => {
            Some(Multiplicand {
                tensor: a,
                axis: 1,
                repeat: shape[2..].iter().product::<i64>().max(1) as usize,
                conv: conv_geometry(node, &shape[2..]),
            })
        }
        _ => None,
    }
}

/// The multiplicands of every use of the site, or None when any use has none.
pub fn multiplicands(model: &Model, site: &WeightSite) -> Option<Vec<Multiplicand>> {
    site.uses
        .iter()
        .map(|u| multiplicand(model, site, u))
        .collect()
}

/// One importance per column of the site's `[channels, k]` rows: the mean over its uses of each
/// use's channel energy normalised to mean 1. None when a use has no multiplicand or no calibrated
/// energy of the right length.
pub fn column_importance(
    model: &Model,
    site: &WeightSite,
    k: usize,
    energy: &ChannelEnergy,
) -> Option<Vec<f32>> {
    let uses = multiplicands(model, site)?;
    let mut out = vec![0f64; k];
    for m in &uses {
        let e = energy.get(&(m.tensor.clone(), m.axis))?;
        if e.len() * m.repeat != k {
            return None;
        }
        let mean = e.iter().sum::<f64>() / e.len().max(1) as f64;
        if !(mean > 0.0 && mean.is_finite()) {
            return None;
        }
        for (j, o) in out.iter_mut().enumerate() {
            *o += e[j / m.repeat] / mean;
        }
    }
    Some(
        out.iter()
            .map(|&v| (v / uses.len().max(1) as f64) as f32)
            .collect(),
    )
}

/// The patch geometry of a Conv node with kernel `kernel` (1-D and 2-D; None for others or for
/// attributes it cannot read).
pub(crate) fn conv_geometry(
    node: &crate::ir::Node,
    kernel: &[i64],
) -> Option<crate::quant::gptq::ConvGeometry> {
    use crate::quant::gptq::{AutoPad, ConvGeometry};
    let n = kernel.len();
    if !(1..=2).contains(&n) || kernel.iter().any(|&k| k < 1) {
        return None;
    }
    let ints = |name: &str, default: i64, len: usize| -> Option<Vec<usize>> {
        match node.attribute(name) {
            None => Some(vec![default as usize; len]),
            Some(a) if a.ints.len() == len && a.ints.iter().all(|&v| v >= 0) => {
                Some(a.ints.iter().map(|&v| v as usize).collect())
            }
            Some(_) => None,
        }
    };
    let auto_pad = match node.attribute("auto_pad").and_then(|a| a.s.as_deref()) {
        None | Some(b"NOTSET") | Some(b"") => AutoPad::Explicit,
        Some(b"VALID") => AutoPad::Valid,
        Some(b"SAME_UPPER") => AutoPad::SameUpper,
        Some(b"SAME_LOWER") => AutoPad::SameLower,
        Some(_) => return None,
    };
    let strides = ints("strides", 1, n)?;
    let dilations = ints("dilations", 1, n)?;
    if strides.contains(&0) || dilations.contains(&0) {
        return None;
    }
    Some(ConvGeometry {
        kernel: kernel.iter().map(|&k| k as usize).collect(),
        strides,
        dilations,
        pads: ints("pads", 0, 2 * n)?,
        auto_pad,
    })
}
