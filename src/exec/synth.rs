//! What a model implies about its own inputs, so that valid inputs can be generated without flags.
//!
//! - **Ranges of integer inputs**, from how the graph reads them: the indices of a `Gather` over a
//!   constant table (`GatherElements`, `GatherND` too) take that table's rows; `OneHot` indices its
//!   depth; a comparison (`Equal`, `Less`, `Greater`, …) against a constant of several values takes
//!   their span; a `Cast` to bool, or a name that says "mask", takes 0..1. Several readers intersect.
//!   An input only tested against single values (`sr == 16000`) takes the values tested for; the
//!   shape of an `Expand` takes ones, the repeats of a `Tile` 1..2.
//! - **Values of open dims** (symbolic or unnamed): the first axis is the batch (`--batch-size`, else
//!   1); axes after a fixed channel count of a rank-4 float input are spatial (64 first); any other
//!   open axis is a length (16 first). A symbol that names the batch takes the batch wherever it
//!   stands. Defaults are then checked by tract's shape analysis of the model with those dims; when
//!   tract refuses them, each open dim tries its next candidates in turn and keeps the first
//!   accepted, so a recognizer that needs a height of 48 gets 48.
//!
//! Every value carries the reason it was taken; the input set's description shows them.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;

use super::{Dim, InputInfo};
use crate::ir::{Def, Graph, Model, Slot, ValueId};
use crate::onnx::dtype::{DataType, DataTypeExt};

/// A value, and why it was taken.
pub type Reasoned<T> = (T, String);

/// Where an open dim stands: a named symbol (one value wherever it appears) or an unnamed axis of
/// one input.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DimKey {
    Symbol(String),
    Axis(String, usize),
}

impl std::fmt::Display for DimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DimKey::Symbol(s) => f.write_str(s),
            DimKey::Axis(input, axis) => write!(f, "{input}[{axis}]"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DimKind {
    Batch,
    Spatial,
    Length,
}

impl DimKind {
    /// The values tried, the default first.
    fn candidates(self, batch: usize) -> Vec<usize> {
        match self {
            DimKind::Batch => vec![batch],
            DimKind::Spatial => vec![64, 32, 48, 96, 128, 160, 224, 256, 320, 16, 8],
            DimKind::Length => vec![16, 32, 64, 128, 8, 256, 512, 1024, 4, 2, 1],
        }
    }

    fn what(self) -> &'static str {
        match self {
            DimKind::Batch => "the batch axis",
            DimKind::Spatial => "a spatial axis",
            DimKind::Length => "a length axis",
        }
    }
}

/// The open dims of the inputs that neither `given` (dims set by the user or a manifest) nor the batch
/// size fixes, each with its kind, in input order.
fn open_dims(
    inputs: &[InputInfo],
    given: &dyn Fn(&DimKey, &InputInfo, usize) -> bool,
) -> Vec<(DimKey, DimKind)> {
    let mut out: Vec<(DimKey, DimKind)> = Vec::new();
    // A symbol on some input's first axis is the batch everywhere it appears.
    let batch_symbols: HashSet<&str> = inputs
        .iter()
        .filter_map(|i| match i.dims.as_ref()?.first()? {
            Dim::Symbol(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    for info in inputs {
        let Some(dims) = &info.dims else { continue };
        let float = info.dtype.is_some_and(|d| d.is_float());
        let channels = |a: usize| matches!(dims.get(a), Some(Dim::Fixed(1 | 3 | 4)));
        let spatial = |axis: usize| {
            float
                && dims.len() == 4
                && ((channels(1) && axis >= 2)
                    || (channels(3) && !channels(1) && (1..3).contains(&axis)))
        };
        for (axis, d) in dims.iter().enumerate() {
            let key = match d {
                Dim::Fixed(_) => continue,
                Dim::Symbol(s) => DimKey::Symbol(s.clone()),
                Dim::Unknown => DimKey::Axis(info.name.clone(), axis),
            };
            if given(&key, info, axis) || out.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let names_batch = matches!(d, Dim::Symbol(s) if batch_symbols.contains(s.as_str())
                || s.to_ascii_lowercase().contains("batch"));
            let kind = if axis == 0 || names_batch {
                DimKind::Batch
            } else if spatial(axis) {
                DimKind::Spatial
            } else {
                DimKind::Length
            };
            out.push((key, kind));
        }
    }
    out
}

/// A check of one full assignment of the open dims: None when no check can be made.
pub type Accepts<'a> = dyn FnMut(&BTreeMap<DimKey, usize>) -> Option<Result<()>> + 'a;

/// Values for the open dims of `inputs` (those `given` leaves open): defaults by kind, checked with
/// `accepts` (which tries a full assignment; None when no check can be made) and replaced, one dim at a
/// time, by the first candidate it accepts.
pub fn implied_dims(
    inputs: &[InputInfo],
    batch: usize,
    given: &dyn Fn(&DimKey, &InputInfo, usize) -> bool,
    accepts: &mut Accepts,
) -> BTreeMap<DimKey, Reasoned<usize>> {
    let open = open_dims(inputs, given);
    let mut values: BTreeMap<DimKey, usize> = open
        .iter()
        .map(|(k, kind)| (k.clone(), kind.candidates(batch)[0]))
        .collect();
    let mut why: BTreeMap<DimKey, String> = open
        .iter()
        .map(|(k, kind)| {
            let w = if *kind == DimKind::Batch {
                format!("{} (--batch-size, else 1)", kind.what())
            } else {
                format!("default for {}", kind.what())
            };
            (k.clone(), w)
        })
        .collect();
    let free: Vec<&(DimKey, DimKind)> = open.iter().filter(|(_, k)| *k != DimKind::Batch).collect();
    if !free.is_empty() {
        match accepts(&values) {
            None => {
                for (k, _) in &free {
                    why.get_mut(k).unwrap().push_str(", not checked");
                }
            }
            Some(Ok(())) => {
                for (k, _) in &free {
                    why.get_mut(k).unwrap().push_str(", checked in tract");
                }
            }
            Some(Err(first)) => {
                let found = search(&free, &mut values, batch, accepts);
                match found {
                    Some((key, refused)) => {
                        why.insert(
                            key.clone(),
                            format!(
                                "the first value tract accepted for {} ({} refused)",
                                open.iter().find(|(k, _)| *k == key).unwrap().1.what(),
                                refused
                                    .iter()
                                    .map(|r| r.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        );
                        for (k, _) in &free {
                            if *k != key {
                                why.get_mut(k).unwrap().push_str(", checked in tract");
                            }
                        }
                    }
                    None => {
                        let first = format!("{first:#}");
                        let first = crate::report::compare::truncate(&first, 160);
                        for (k, _) in &free {
                            why.get_mut(k).unwrap().push_str(&format!(
                                ", refused by tract with every candidate ({first})"
                            ));
                        }
                    }
                }
            }
        }
    }
    values
        .into_iter()
        .map(|(k, v)| {
            let w = why.remove(&k).unwrap_or_default();
            (k, (v, w))
        })
        .collect()
}

/// One open dim at a time through its candidates (the others at their defaults), then all of them
/// together through the candidates of the first; the dim that made `accepts` pass and the values it
/// refused before, with `values` updated.
fn search(
    free: &[&(DimKey, DimKind)],
    values: &mut BTreeMap<DimKey, usize>,
    batch: usize,
    accepts: &mut Accepts,
) -> Option<(DimKey, Vec<usize>)> {
    for (key, kind) in free {
        let start = values[key];
        let mut refused = vec![start];
        for &c in kind.candidates(batch).iter().skip(1) {
            values.insert(key.clone(), c);
            if let Some(Ok(())) = accepts(values) {
                return Some((key.clone(), refused));
            }
            refused.push(c);
        }
        values.insert(key.clone(), start);
    }
    if free.len() > 1 {
        let defaults = values.clone();
        let (key, kind) = free[0];
        for &c in kind.candidates(batch).iter().skip(1) {
            for (k, _) in free {
                values.insert(k.clone(), c);
            }
            if let Some(Ok(())) = accepts(values) {
                return Some((key.clone(), vec![defaults[key]]));
            }
        }
        *values = defaults;
    }
    None
}

/// tract's analysis of one model, for asking what it makes of given input shapes.
pub struct TractProbe {
    parsed: tract_onnx::prelude::InferenceModel,
}

impl TractProbe {
    /// None when tract cannot parse the model (then nothing can be asked of it), or when the model is
    /// too large for a second parse to be worth it.
    pub fn new(model: &Model) -> Option<TractProbe> {
        use tract_onnx::prelude::Framework;
        let bytes = super::Prepared::from_model(model, "").encode();
        if bytes.len() > 1 << 30 {
            return None;
        }
        let proto = {
            use prost::Message;
            tract_onnx::pb::ModelProto::decode(bytes::Bytes::from(bytes)).ok()?
        };
        let onnx = tract_onnx::onnx().with_ignore_value_info(true);
        let parsed =
            super::tract::guarded(|| "parse".into(), || onnx.model_for_proto_model(&proto)).ok()?;
        Some(TractProbe { parsed })
    }

    /// The model typed by tract's analysis for inputs of these types and shapes (in input order).
    fn typed(&self, shapes: &[(DataType, Vec<usize>)]) -> Result<tract_onnx::prelude::TypedModel> {
        use tract_onnx::prelude::{InferenceFact, InferenceModelExt};
        let facts = shapes
            .iter()
            .map(|(dt, shape)| {
                Ok(InferenceFact::dt_shape(
                    super::tract::datum_of(*dt)?,
                    shape.as_slice(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut m = self.parsed.clone();
        super::tract::guarded(
            || "tract's analysis".into(),
            || {
                for (i, fact) in facts.into_iter().enumerate() {
                    m.set_input_fact(i, fact)?;
                }
                m.into_typed()
            },
        )
    }

    /// Whether tract's analysis types the model for these inputs without error.
    pub fn check(&self, shapes: &[(DataType, Vec<usize>)]) -> Result<()> {
        self.typed(shapes).map(|_| ())
    }

    /// The bytes of every value the model computes for these inputs (what a run that keeps them all,
    /// as per-layer attribution does, holds at once); None when some shape stays unknown.
    pub fn value_bytes(&self, shapes: &[(DataType, Vec<usize>)]) -> Result<Option<u64>> {
        let typed = self.typed(shapes)?;
        let mut total = 0u64;
        for node in &typed.nodes {
            for out in &node.outputs {
                // Weights and other constants are the model's, not the batch's.
                if out.fact.konst.is_some() {
                    continue;
                }
                let Some(shape) = out.fact.shape.as_concrete() else {
                    return Ok(None);
                };
                let n = shape.iter().product::<usize>() as u64;
                total += n * out.fact.datum_type.size_of() as u64;
            }
        }
        Ok(Some(total))
    }
}

/// The shape of a value computed from constants alone, followed through the ops that decode a
/// compressed weight (`DequantizeLinear`, `Cast`, `Mul`/`Sub`/`Add`/`Div` by scales, a `Gather` from a
/// table of levels, `Reshape`, `Transpose`, `Slice`, `Squeeze`/`Unsqueeze`, `Flatten`), so that a
/// quantized embedding table bounds its indices as the float one did.
fn const_shape(g: &Graph, v: ValueId, depth: usize) -> Option<Vec<i64>> {
    if let Some((dims, _)) = constant_values(g, v) {
        return Some(dims);
    }
    let Def::Node(n, _) = g.value(v).def() else {
        return None;
    };
    if depth > 16 {
        return None;
    }
    let node = g.node(n);
    let input = |i: usize| node.input(i).and_then(|x| const_shape(g, x, depth + 1));
    let ints = |i: usize| -> Option<Vec<i64>> {
        let (_, vals) = constant_values(g, node.input(i)?)?;
        Some(vals.iter().map(|&x| x as i64).collect())
    };
    let axis = |a: i64, rank: usize| -> Option<usize> {
        let a = if a < 0 { a + rank as i64 } else { a };
        usize::try_from(a).ok().filter(|&a| a < rank)
    };
    match node.op_type.as_str() {
        "DequantizeLinear" | "Cast" | "Identity" | "Neg" | "Abs" => input(0),
        "Mul" | "Sub" | "Add" | "Div" => {
            let (a, b) = (input(0)?, input(1)?);
            let rank = a.len().max(b.len());
            let pad = |s: &[i64]| {
                let mut p = vec![1; rank - s.len()];
                p.extend_from_slice(s);
                p
            };
            let (a, b) = (pad(&a), pad(&b));
            a.iter()
                .zip(&b)
                .map(|(&x, &y)| match (x, y) {
                    (x, y) if x == y => Some(x),
                    (1, y) => Some(y),
                    (x, 1) => Some(x),
                    _ => None,
                })
                .collect()
        }
        "Gather" => {
            let (data, idx) = (input(0)?, input(1)?);
            let a = axis(node.int_attribute("axis").unwrap_or(0), data.len())?;
            let mut out = data[..a].to_vec();
            out.extend(idx);
            out.extend_from_slice(&data[a + 1..]);
            Some(out)
        }
        "Reshape" => {
            let data = input(0)?;
            let mut shape = ints(1)?;
            let total: i64 = data.iter().product();
            for (i, d) in shape.iter_mut().enumerate() {
                if *d == 0 {
                    *d = *data.get(i)?;
                }
            }
            if let Some(p) = shape.iter().position(|&d| d == -1) {
                let known: i64 = shape.iter().filter(|&&d| d != -1).product();
                shape[p] = total.checked_div(known)?;
            }
            (shape.iter().product::<i64>() == total).then_some(shape)
        }
        "Transpose" => {
            let data = input(0)?;
            let perm = node
                .attribute("perm")
                .map(|a| a.ints.clone())
                .unwrap_or_else(|| (0..data.len() as i64).rev().collect());
            perm.iter()
                .map(|&p| data.get(p as usize).copied())
                .collect()
        }
        "Slice" => {
            let mut data = input(0)?;
            let (starts, ends) = (ints(1)?, ints(2)?);
            let axes = match node.input(3) {
                Some(_) => ints(3)?,
                None => (0..starts.len() as i64).collect(),
            };
            let steps = match node.input(4) {
                Some(_) => ints(4)?,
                None => vec![1; starts.len()],
            };
            for (((&s, &e), &a), &st) in starts.iter().zip(&ends).zip(&axes).zip(&steps) {
                let a = axis(a, data.len())?;
                let dim = data[a];
                if st != 1 {
                    return None;
                }
                let clamp = |x: i64| if x < 0 { (x + dim).max(0) } else { x.min(dim) };
                data[a] = (clamp(e) - clamp(s)).max(0);
            }
            Some(data)
        }
        "Squeeze" | "Unsqueeze" => {
            let data = input(0)?;
            let axes = match node.input(1) {
                Some(_) => ints(1)?,
                None => node.attribute("axes").map(|a| a.ints.clone())?,
            };
            if node.op_type == "Squeeze" {
                let drop: Vec<usize> = axes
                    .iter()
                    .map(|&a| axis(a, data.len()))
                    .collect::<Option<_>>()?;
                Some(
                    data.iter()
                        .enumerate()
                        .filter(|(i, _)| !drop.contains(i))
                        .map(|(_, &d)| d)
                        .collect(),
                )
            } else {
                let rank = data.len() + axes.len();
                let mut add: Vec<usize> =
                    axes.iter().map(|&a| axis(a, rank)).collect::<Option<_>>()?;
                add.sort();
                let mut out = data;
                for a in add {
                    out.insert(a, 1);
                }
                Some(out)
            }
        }
        "Flatten" => {
            let data = input(0)?;
            let a = node.int_attribute("axis").unwrap_or(1);
            let a = if a < 0 { a + data.len() as i64 } else { a } as usize;
            let (l, r) = data.split_at(a.min(data.len()));
            Some(vec![l.iter().product(), r.iter().product()])
        }
        _ => None,
    }
}

/// A constant value's elements as f64: an initializer or a `Constant` node's output.
fn constant_values(g: &Graph, v: ValueId) -> Option<(Vec<i64>, Vec<f64>)> {
    let val = g.value(v);
    let proto = match val.initializer() {
        Some(t) => t.clone(),
        None => {
            let Def::Node(n, _) = val.def() else {
                return None;
            };
            crate::ir::constants::constant_node_tensor(g, n)?.0
        }
    };
    let dims = proto.dims.clone();
    // Shapes are enough for tables; values are read only from small constants.
    if crate::onnx::tensor::element_count(&dims).unwrap_or(u64::MAX) > 1 << 16 {
        return Some((dims, Vec::new()));
    }
    let t = super::Tensor::from_proto(&proto).ok()?;
    let values = t.to_f32().iter().map(|&x| x as f64).collect();
    Some((dims, values))
}

fn is_integer(d: DataType) -> bool {
    !d.is_float() && d != DataType::Bool && d != DataType::String
}

/// Value ranges the model implies for its integer inputs (see the module's doc), each with what
/// implies it. Inputs nothing bounds are left out; they need `--range` or data.
pub fn implied_ranges(model: &Model) -> HashMap<String, Reasoned<(f64, f64)>> {
    let g = &model.graph;
    let mut out = HashMap::new();
    for port in g.inputs() {
        let name = g.value_name(port.value).to_string();
        let elem = port
            .info
            .r#type
            .as_ref()
            .and_then(|t| match &t.value {
                Some(crate::onnx::pb::type_proto::Value::TensorType(tt)) => Some(tt.elem_type),
                _ => None,
            })
            .and_then(|e| DataType::try_from(e).ok());
        if !elem.is_some_and(is_integer) {
            continue;
        }
        // Every bound found on the way, intersected at the end.
        let mut bounds: Vec<((f64, f64), String)> = Vec::new();
        let mut tested: Vec<((f64, f64), String)> = Vec::new();
        let mut stack = vec![port.value];
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            for u in g.value(v).uses() {
                let node = g.node(u.node);
                let slot = match u.slot {
                    Slot::Input(i) => i,
                    Slot::Implicit => continue,
                };
                let cast_to = || {
                    node.int_attribute("to")
                        .and_then(|t| DataType::try_from(t as i32).ok())
                };
                let passes = match node.op_type.as_str() {
                    "Identity" | "Squeeze" | "Unsqueeze" | "Flatten" | "Expand" | "Transpose"
                    | "Reshape" | "Gather" | "Slice" | "Split" | "Tile" => slot == 0,
                    "Concat" => true,
                    "Cast" => cast_to().is_some_and(is_integer),
                    _ => false,
                };
                if passes {
                    stack.extend(node.outputs().iter().flatten().copied());
                    continue;
                }
                let other = |i: usize| node.input(i).and_then(|x| constant_values(g, x));
                match (node.op_type.as_str(), slot) {
                    ("Gather" | "GatherElements", 1) => {
                        let Some(dims) = node.input(0).and_then(|t| const_shape(g, t, 0)) else {
                            continue;
                        };
                        let axis = node.int_attribute("axis").unwrap_or(0);
                        let a = if axis < 0 {
                            axis + dims.len() as i64
                        } else {
                            axis
                        };
                        if let Some(&n) = usize::try_from(a).ok().and_then(|a| dims.get(a))
                            && n > 0
                        {
                            let table = g.value_name(node.input(0).unwrap());
                            bounds.push((
                                (0.0, (n - 1) as f64),
                                format!("rows of the {} table {table}", node.op_type),
                            ));
                        }
                    }
                    ("GatherND", 1) => {
                        let Some(dims) = node.input(0).and_then(|t| const_shape(g, t, 0)) else {
                            continue;
                        };
                        let b = node.int_attribute("batch_dims").unwrap_or(0).max(0) as usize;
                        if let Some(&n) = dims.get(b)
                            && n > 0
                        {
                            let table = g.value_name(node.input(0).unwrap());
                            bounds.push((
                                (0.0, (n - 1) as f64),
                                format!("rows of the GatherND table {table}"),
                            ));
                        }
                    }
                    ("OneHot", 0) => {
                        if let Some((_, d)) = other(1)
                            && let Some(&depth) = d.first()
                            && depth >= 1.0
                        {
                            bounds.push((
                                (0.0, depth - 1.0),
                                format!("the depth of OneHot {}", node.name),
                            ));
                        }
                    }
                    ("Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual", 0 | 1) => {
                        if let Some((_, vals)) = other(1 - slot)
                            && !vals.is_empty()
                        {
                            let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
                            let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                            let what = if vals.len() > 1 {
                                "the constants it is compared with"
                            } else {
                                "the value it is tested for"
                            };
                            let bound = (
                                (lo.ceil(), hi.floor()),
                                format!("{what} in {} {}", node.op_type, node.name),
                            );
                            // Against several values (a one-hot written as Equal with 0..n) the
                            // comparison spans the input's values; against one, it only tests for
                            // that value, and counts when nothing else bounds the input.
                            if vals.len() > 1 {
                                bounds.push(bound);
                            } else {
                                tested.push(bound);
                            }
                        }
                    }
                    // A shape argument that broadcasts: ones keep the data's own shape.
                    ("Expand", 1) => {
                        bounds.push(((1.0, 1.0), format!("the shape of Expand {}", node.name)));
                    }
                    ("Tile", 1) => {
                        bounds.push(((1.0, 2.0), format!("the repeats of Tile {}", node.name)));
                    }
                    ("Cast", 0) if cast_to() == Some(DataType::Bool) => {
                        bounds.push(((0.0, 1.0), format!("its Cast to bool {}", node.name)));
                    }
                    _ => {}
                }
            }
        }
        if bounds.is_empty() && name.to_ascii_lowercase().contains("mask") {
            bounds.push(((0.0, 1.0), "a mask, by its name".to_string()));
        }
        if bounds.is_empty() && !tested.is_empty() {
            let lo = tested.iter().map(|b| b.0.0).fold(f64::INFINITY, f64::min);
            let hi = tested
                .iter()
                .map(|b| b.0.1)
                .fold(f64::NEG_INFINITY, f64::max);
            bounds.push(((lo, hi), tested.swap_remove(0).1));
        }
        let Some(first) = bounds.first().cloned() else {
            continue;
        };
        let (mut lo, mut hi, mut why) = (first.0.0, first.0.1, first.1);
        for ((l, h), w) in bounds.into_iter().skip(1) {
            if h < hi {
                hi = h;
                why = w.clone();
            }
            lo = lo.max(l);
        }
        if lo <= hi {
            out.insert(name, ((lo, hi), why));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::pb::GraphProto;
    use crate::onnx::tensor::{from_f32, tensor_value_info};
    use crate::testing::{int_attr, model_of, node};

    fn ints(name: &str, dims: &[i64], values: &[i64]) -> crate::onnx::pb::TensorProto {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut t = crate::passes::quantize_weights::emit::tensor(DataType::Int64, dims, bytes);
        t.name = name.into();
        t
    }

    /// Each kind of reader bounds its input: a one-hot written as Equal against 0..256, OneHot's
    /// depth, a Cast to bool, a value tested for, a Gather table (a test for a single value beside it
    /// does not narrow it), an Expand shape, a table decoded from codes (its shape followed through
    /// the decode); an input only added to gets nothing.
    #[test]
    fn readers_bound_integer_inputs() {
        let i64t = DataType::Int64 as i32;
        let levels: Vec<i64> = (0..=256).collect();
        let g = GraphProto {
            name: Some("g".into()),
            node: vec![
                node("Unsqueeze", &["bytes", "ax"], "b1"),
                node("Equal", &["b1", "levels"], "onehot"),
                node("OneHot", &["cls", "depth", "onoff"], "oh"),
                node("Cast", &["flag"], "flagb"),
                node("Equal", &["sr", "rate"], "is16k"),
                node("Gather", &["E", "ids"], "emb"),
                node("Greater", &["ids", "zero"], "nz"),
                node("Expand", &["x", "shape"], "xe"),
                node("Add", &["free", "free"], "twice"),
                // A table quantized to levels: codes [50, 2] → levels [.., 2] → [50, 4] → scaled.
                node("Cast", &["codes"], "codes32"),
                node("Gather", &["levels_f", "codes32"], "unpacked"),
                node("Reshape", &["unpacked", "table_shape"], "table"),
                node("DequantizeLinear", &["table_q", "tscale"], "tq"),
                node("Mul", &["table", "tq"], "decoded"),
                node("Gather", &["decoded", "qids"], "qemb"),
            ],
            initializer: vec![
                ints("ax", &[1], &[-1]),
                ints("levels", &[257], &levels),
                ints("depth", &[], &[10]),
                from_f32("onoff", &[2], &[0.0, 1.0]),
                ints("rate", &[], &[16000]),
                from_f32("E", &[100, 4], &[0.5; 400]),
                ints("zero", &[], &[0]),
                ints("codes", &[50, 2], &[1; 100]),
                from_f32("levels_f", &[256, 2], &[0.25; 512]),
                ints("table_shape", &[2], &[-1, 4]),
                ints("table_q", &[1, 4], &[1; 4]),
                from_f32("tscale", &[], &[0.5]),
            ],
            input: vec![
                tensor_value_info("bytes", DataType::Int32 as i32, &[1, 8]),
                tensor_value_info("cls", i64t, &[3]),
                tensor_value_info("flag", i64t, &[3]),
                tensor_value_info("sr", i64t, &[]),
                tensor_value_info("ids", i64t, &[2, 5]),
                tensor_value_info("x", 1, &[1, 4]),
                tensor_value_info("shape", i64t, &[2]),
                tensor_value_info("free", i64t, &[2]),
                tensor_value_info("qids", i64t, &[3]),
            ],
            output: [
                "onehot", "oh", "flagb", "is16k", "emb", "nz", "xe", "twice", "qemb",
            ]
            .iter()
            .map(|n| crate::onnx::pb::ValueInfoProto {
                name: n.to_string(),
                ..Default::default()
            })
            .collect(),
            ..Default::default()
        };
        let mut g = g;
        g.node[3]
            .attribute
            .push(int_attr("to", DataType::Bool as i64));
        let model = model_of(g, 17);
        let r = implied_ranges(&model);
        let range = |n: &str| r.get(n).map(|(r, _)| *r);
        assert_eq!(range("bytes"), Some((0.0, 256.0)));
        assert!(r["bytes"].1.contains("compared with"), "{}", r["bytes"].1);
        assert_eq!(range("cls"), Some((0.0, 9.0)));
        assert_eq!(range("flag"), Some((0.0, 1.0)));
        assert_eq!(range("sr"), Some((16000.0, 16000.0)));
        assert_eq!(range("ids"), Some((0.0, 99.0)));
        assert_eq!(range("shape"), Some((1.0, 1.0)));
        assert_eq!(range("free"), None);
        assert_eq!(range("qids"), Some((0.0, 49.0)));
    }

    /// Open dims take their kind's default; when the check refuses, the dim that needs another value
    /// walks its candidates (a height that must be 48), the others keep theirs, and the reasons say
    /// so. Dims the options give are left alone.
    #[test]
    fn open_dims_walk_their_candidates_until_the_check_accepts() {
        let input = |name: &str, dtype: DataType, dims: Vec<Dim>| InputInfo {
            name: name.into(),
            dtype: Some(dtype),
            dims: Some(dims),
        };
        let sym = |s: &str| Dim::Symbol(s.into());
        let inputs = vec![
            input(
                "x",
                DataType::Float,
                vec![sym("N"), Dim::Fixed(3), Dim::Unknown, sym("W")],
            ),
            input(
                "ids",
                DataType::Int64,
                vec![sym("N"), sym("seq"), sym("given")],
            ),
        ];
        let given = |k: &DimKey, _: &InputInfo, _: usize| *k == DimKey::Symbol("given".into());
        let h = DimKey::Axis("x".into(), 2);
        let mut tried = 0;
        let mut accepts = |v: &BTreeMap<DimKey, usize>| {
            tried += 1;
            assert!(!v.contains_key(&DimKey::Symbol("given".into())));
            Some(if v[&h] == 48 {
                Ok(())
            } else {
                Err(anyhow::anyhow!("height {} refused", v[&h]))
            })
        };
        let dims = implied_dims(&inputs, 2, &given, &mut accepts);
        let value = |k: DimKey| dims[&k].0;
        assert_eq!(value(DimKey::Symbol("N".into())), 2);
        assert_eq!(value(h.clone()), 48);
        assert_eq!(value(DimKey::Symbol("W".into())), 64);
        assert_eq!(value(DimKey::Symbol("seq".into())), 16);
        assert!(dims[&h].1.contains("64, 32 refused"), "{}", dims[&h].1);
        assert!(dims[&DimKey::Symbol("W".into())].1.contains("checked"));
        assert_eq!(tried, 3);

        // Without a check, defaults are said to be unchecked.
        let dims = implied_dims(&inputs, 1, &given, &mut |_| None);
        assert_eq!(dims[&h].0, 64);
        assert!(dims[&h].1.contains("not checked"));
    }
}
