//! quench's own matrix-product operator for tract, over weights that stay compressed.
//!
//! tract runs the standard ONNX forms of a compressed weight by decoding it to f32 on every run
//! (DequantizeLinear, a codebook Gather) and repacking the result for its f32 kernel, or, for 4-bit
//! MatMulNBits, through a matrix-vector kernel; see docs/tract-kernels.md for the measurements. Before
//! tract parses a model, [`rewrite`] replaces each MatMul whose weight is one of those forms, read from
//! constants, by one `QuenchMatMul` node over the same constants; [`register`] teaches tract-onnx that
//! node. Its typed operator keeps tract's own constant tensors (no copy) and multiplies through
//! [`crate::kernels`], which decode a cache-sized panel at a time. The file on disk is untouched: this
//! happens to the parsed protobuf, in memory, when a tract session opens.

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, AttributeProto, ModelProto, NodeProto, attribute_proto::AttributeType};
use tract_onnx::tract_hir::internal::*;

use crate::kernels::conv::{AutoPad, Geometry};
use crate::kernels::formats::{CodeSlice, Codebook, Codes, Int8Blocked, Int8Cols, NBits, NibblesK};
use crate::kernels::integer::{Acts, IntIsa, Layout, Packed, Weight, Zeros};
use crate::kernels::nibbles::{self, BlockNibbles};
use crate::kernels::{self, Panels};

mod fold;
mod lstm;
mod softmax;

pub use softmax::replace_strided as replace_strided_softmax;

const OP: &str = "QuenchMatMul";
const OP_INT: &str = "QuenchMatMulInteger";
const DOMAIN: &str = "ai.quench";

/// What [`rewrite`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rewrites {
    /// MatMuls over DequantizeLinear of an 8-bit constant.
    pub int8: usize,
    /// com.microsoft MatMulNBits, over weights decoded to f32 panels.
    pub nbits: usize,
    /// 4-bit MatMulNBits taken as integer products over f32 activations in 8-bit limbs (on AVX-512
    /// VNNI; elsewhere they count in `nbits`).
    pub nbits_limbs: usize,
    /// MatMuls over a codebook lookup.
    pub codebook: usize,
    /// MatMulIntegers over a constant 8-bit weight (exact i32 products on 8-bit operands).
    pub integer: usize,
    /// MatMuls over two DequantizeLinear (static QDQ), taken as integer products.
    pub qdq: usize,
    /// MatMuls over DequantizeLinear of an 8-bit constant taken as integer products over f32
    /// activations in 8-bit limbs (on VNNI; elsewhere they count in `int8`).
    pub limbs: usize,
    /// Conv and ConvInteger over a constant 8-bit weight (one group), as products over im2col rows:
    /// integer activations, static QDQ, or, on VNNI, f32 activations in limbs.
    pub conv: usize,
    /// Weight-only Conv (one group) as f32 products over im2col rows: over a constant 8-bit weight
    /// decoded a panel at a time, or over a weight decoded once at load (`decoded`).
    pub float_conv: usize,
    /// DynamicQuantizeLinear nodes (run by quench's operator, value for value as tract's).
    pub quantize: usize,
    /// Gemms over a compressed weight rewritten as MatMul (then Add) first; each also counts in the
    /// form that took its product.
    pub gemm: usize,
    /// QLinearConvs rewritten as DequantizeLinear → Conv → QuantizeLinear first: tract's own
    /// QLinearConv is slower than both its float Conv (which depthwise ones then run) and quench's
    /// integer product (which one-group ones then take, counted in `conv`).
    pub qlinear_conv: usize,
    /// LSTMs over 8-bit `W` and `R`, run by quench's operator with the weights kept 8-bit.
    pub lstm: usize,
    /// MatMulInteger and ConvInteger whose float epilogue of the dynamic-quantization form
    /// (`Cast` to float, `Mul` by the scales, then an `Add` of a bias) runs inside quench's operator,
    /// in the same order of f32 operations; each also counts in `integer` or `conv`.
    pub epilogues: usize,
    /// Weights of Conv and ConvTranspose decoded from a codebook lookup once, before tract reads
    /// the graph (see `fold`); a one-group Conv over one then also counts in `float_conv`, the
    /// others run tract's convolution.
    pub decoded: usize,
}

impl Rewrites {
    pub fn total(&self) -> usize {
        self.int8
            + self.nbits
            + self.nbits_limbs
            + self.codebook
            + self.integer
            + self.qdq
            + self.limbs
            + self.conv
            + self.float_conv
            + self.lstm
    }
}

/// Adds the `QuenchMatMul` builder to a tract-onnx parser.
pub fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert(OP, build);
    onnx.op_register.insert(OP_INT, build_integer);
    onnx.op_register.insert(lstm::OP, lstm::build);
    // tract's own rounds one value at a time through libm; this one is the same arithmetic, in SIMD.
    onnx.op_register.insert("DynamicQuantizeLinear", |_, _| {
        Ok((expand(DynamicQuantize), vec![]))
    });
}

// ONNX TensorProto data types.
const FLOAT: i32 = 1;
const UINT8: i32 = 2;
const INT8: i32 = 3;
const UINT16: i32 = 4;
const INT32: i32 = 6;
const INT64: i32 = 7;

/// A constant of the graph: an initializer or a Constant node's `value`.
struct Konst<'a> {
    t: &'a pb::TensorProto,
}

impl Konst<'_> {
    fn is(&self, dt: i32, rank: Option<usize>) -> bool {
        self.t.data_type == dt && rank.is_none_or(|r| self.t.dims.len() == r)
    }
    fn len(&self) -> i64 {
        self.t.dims.iter().product()
    }
    /// Small integer constants (shapes, axes, offsets) as i64.
    fn ints(&self) -> Option<Vec<i64>> {
        let t = self.t;
        match t.data_type {
            INT64 if !t.int64_data.is_empty() => Some(t.int64_data.clone()),
            INT64 => Some(
                t.raw_data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            INT32 if !t.int32_data.is_empty() => {
                Some(t.int32_data.iter().map(|&v| v as i64).collect())
            }
            INT32 => Some(
                t.raw_data
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            _ => None,
        }
        .filter(|v: &Vec<i64>| v.len() as i64 == self.len() && t.data_location != Some(1))
    }
}

struct Index<'a> {
    producer: HashMap<&'a str, usize>,
    readers: HashMap<&'a str, usize>,
    /// A node of this graph reading the value (the last one).
    reader: HashMap<&'a str, usize>,
    consts: HashMap<&'a str, Konst<'a>>,
}

impl<'a> Index<'a> {
    fn new(g: &'a pb::GraphProto) -> Index<'a> {
        let mut producer = HashMap::new();
        let mut readers: HashMap<&str, usize> = HashMap::new();
        let mut reader = HashMap::new();
        let mut consts = HashMap::new();
        for t in &g.initializer {
            consts.insert(t.name.as_str(), Konst { t });
        }
        for (i, n) in g.node.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
            for x in &n.input {
                *readers.entry(x.as_str()).or_default() += 1;
                reader.insert(x.as_str(), i);
            }
            if n.op_type == "Constant"
                && n.output.len() == 1
                && let Some(t) = n
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref())
            {
                consts.insert(n.output[0].as_str(), Konst { t });
            }
        }
        // Subgraphs may read outer values: count those readers too, so nothing they read is removed.
        for n in &g.node {
            for a in &n.attribute {
                for sub in a.g.iter().chain(&a.graphs) {
                    for sn in &sub.node {
                        for x in &sn.input {
                            *readers.entry(x.as_str()).or_default() += 1;
                        }
                    }
                }
            }
        }
        for o in &g.output {
            *readers.entry(o.name.as_str()).or_default() += 1;
        }
        Index {
            producer,
            readers,
            reader,
            consts,
        }
    }

    /// The node that alone reads `value` (not a graph output, nor read by a subgraph or twice).
    fn sole_reader(&self, value: &str) -> Option<usize> {
        (self.readers.get(value) == Some(&1))
            .then(|| self.reader.get(value).copied())
            .flatten()
    }

    fn konst(&self, name: &str) -> Option<&Konst<'a>> {
        self.consts.get(name)
    }

    /// The node producing `value`, if its op type is `op`.
    fn made_by(&self, g: &'a pb::GraphProto, value: &str, op: &str) -> Option<usize> {
        self.producer
            .get(value)
            .copied()
            .filter(|&i| g.node[i].op_type == op)
    }
}

fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn attr_ints<'a>(n: &'a NodeProto, name: &str) -> Option<&'a [i64]> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.as_slice())
}

fn ints_attr(name: &str, v: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v,
        ..Default::default()
    }
}

fn attr_s<'a>(n: &'a NodeProto, name: &str) -> Option<&'a str> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .and_then(|a| std::str::from_utf8(&a.s).ok())
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn str_attr(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// One planned replacement: the MatMul (or MatMulNBits) node and its new form.
struct Plan {
    node: usize,
    inputs: Vec<String>,
    attrs: Vec<AttributeProto>,
    kind: Kind,
    /// Nodes after `node` that the operator takes over (an integer product's float epilogue): they
    /// go, and the operator writes the last one's output.
    absorbed: Vec<usize>,
}

#[derive(Clone, Copy)]
enum Kind {
    Int8,
    NBits,
    Codebook,
    Integer,
    Qdq,
    Limbs,
    Conv,
    FloatConv,
    Lstm,
}

/// The weight a MatMul reads, seen through Identity nodes (tied weights).
fn weight_value<'g>(g: &'g pb::GraphProto, ix: &Index, mut v: &'g str) -> &'g str {
    while let Some(i) = ix.made_by(g, v, "Identity") {
        match g.node[i].input.first() {
            Some(x) => v = x,
            None => break,
        }
    }
    v
}

/// Whether `scale` holds one value, or one per column of a `[K, N]` weight laid out to broadcast along
/// the last axis (`[N]` for DequantizeLinear, `[1, N]` for a Mul).
fn column_scales(t: &pb::TensorProto, n: i64) -> bool {
    let len: i64 = t.dims.iter().product();
    len == 1 || (len == n && t.dims.last() == Some(&n))
}

/// `MatMul(A, W)` where W is an 8-bit constant `q[K, N]` decoded per tensor or per column, in either form
/// quench writes: `DequantizeLinear(q, scale[, zero point])` (axis 1), or `Mul(Cast(q) [− zero point],
/// scale)`.
fn plan_int8(g: &pb::GraphProto, ix: &Index, i: usize) -> Option<Plan> {
    let b = weight_value(g, ix, g.node[i].input.get(1)?);
    let w = int8_weight(g, ix, b, ScaleAxis::Columns)?;
    let mut inputs = vec![
        g.node[i].input[0].clone(),
        w.q.to_string(),
        w.scale.to_string(),
    ];
    inputs.extend(w.zero.cloned());
    Some(Plan {
        node: i,
        inputs,
        attrs: vec![
            str_attr("form", "int8"),
            int_attr("K", w.dims[0]),
            int_attr("N", w.dims[1]),
        ],
        kind: Kind::Int8,
        absorbed: Vec::new(),
    })
}

/// Which axis of an 8-bit weight its scales and zero points run along (one value, or one per index of
/// that axis).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ScaleAxis {
    /// A MatMul weight `[K, N]`: per column (axis 1), laid out to broadcast along the last axis.
    Columns,
    /// A convolution weight `[M, C, KH(, KW)]`: per output channel (axis 0).
    Channels,
    /// A Gemm weight read transposed (`transB`), `[N, K]`: per row (axis 0).
    Rows,
}

/// An 8-bit constant weight behind its decode, as [`int8_weight`] finds it.
struct Int8Weight<'g> {
    q: &'g str,
    scale: &'g str,
    zero: Option<&'g String>,
    /// Whether the zero point has the codes' type (DequantizeLinear), not f32 (the Mul form).
    zero_is_code: bool,
    dims: &'g [i64],
}

/// The 8-bit constant `q` that `w` decodes, in either form quench writes:
/// `DequantizeLinear(q, scale[, zero point])` on the axis `along` names, or
/// `Mul(Cast(q) [− zero point], scale)` with the scale shaped to broadcast along it.
fn int8_weight<'g>(
    g: &'g pb::GraphProto,
    ix: &Index<'g>,
    w: &'g str,
    along: ScaleAxis,
) -> Option<Int8Weight<'g>> {
    let codes = |name: &str| {
        let q = ix.konst(name)?;
        let rank_ok = match along {
            ScaleAxis::Columns | ScaleAxis::Rows => q.t.dims.len() == 2,
            ScaleAxis::Channels => (3..=4).contains(&q.t.dims.len()),
        };
        ((q.is(INT8, None) || q.is(UINT8, None)) && rank_ok).then_some(q.t.dims.as_slice())
    };
    let scales_fit = |t: &pb::TensorProto, dims: &[i64]| match along {
        ScaleAxis::Columns => column_scales(t, dims[1]),
        ScaleAxis::Channels | ScaleAxis::Rows => {
            let len: i64 = t.dims.iter().product();
            len == 1 || (len == dims[0] && t.dims.first() == Some(&dims[0]))
        }
    };
    if let Some(d) = ix.made_by(g, w, "DequantizeLinear") {
        let dq = &g.node[d];
        let q = dq.input.first()?;
        let dims = codes(q)?;
        let scale = dq.input.get(1)?;
        let sk = ix.konst(scale)?;
        let axis = attr_i(dq, "axis").unwrap_or(1);
        let axis_ok = match along {
            ScaleAxis::Columns => axis == 1 || axis == -1,
            ScaleAxis::Channels | ScaleAxis::Rows => axis == 0,
        };
        if sk.t.data_type != FLOAT
            || attr_i(dq, "block_size").unwrap_or(0) != 0
            || !scales_fit(sk.t, dims)
            || (sk.len() > 1 && !axis_ok)
        {
            return None;
        }
        let zero = dq.input.get(2).filter(|z| !z.is_empty());
        if let Some(z) = zero {
            let zk = ix.konst(z)?;
            if zk.t.data_type != ix.konst(q)?.t.data_type || zk.len() != sk.len() {
                return None;
            }
        }
        return Some(Int8Weight {
            q,
            scale,
            zero,
            zero_is_code: true,
            dims,
        });
    }
    let mul = &g.node[ix.made_by(g, w, "Mul")?];
    let (x, scale) = match (ix.konst(&mul.input[0]), mul.input.get(1)) {
        (None, Some(s)) => (&mul.input[0], s),
        (Some(_), Some(x)) => (x, &mul.input[0]),
        _ => return None,
    };
    let (x, zero) = match ix.made_by(g, x, "Sub") {
        Some(s) => (g.node[s].input.first()?, Some(g.node[s].input.get(1)?)),
        None => (x, None),
    };
    let c = ix.made_by(g, x, "Cast")?;
    if attr_i(&g.node[c], "to") != Some(FLOAT as i64) {
        return None;
    }
    let q = g.node[c].input.first()?;
    let dims = codes(q)?;
    let sk = ix.konst(scale)?;
    if sk.t.data_type != FLOAT || !scales_fit(sk.t, dims) {
        return None;
    }
    if let Some(z) = zero {
        let zk = ix.konst(z)?;
        if zk.t.data_type != FLOAT || zk.len() != sk.len() || zk.t.dims != sk.t.dims {
            return None;
        }
    }
    Some(Int8Weight {
        q,
        scale,
        zero,
        zero_is_code: false,
        dims,
    })
}

/// An 8-bit weight-only MatMul on a CPU with VNNI: the integer product over the f32 activations in
/// three 8-bit limbs ([`kernels::integer::matmul_f32`]), which is the f32 product to f32 rounding.
fn plan_int8_integer(g: &pb::GraphProto, ix: &Index, i: usize, packs: &mut Packs) -> Option<Plan> {
    if !kernels::integer::IntIsa::detect().limbs_pay() {
        return None;
    }
    let b = weight_value(g, ix, g.node[i].input.get(1)?);
    let w = int8_weight(g, ix, b, ScaleAxis::Columns)?;
    if w.zero.is_some() && !w.zero_is_code {
        return None;
    }
    let scales = floats_of(ix.konst(w.scale)?.t)?;
    let a = g.node[i].input.first().filter(|a| !a.is_empty())?;
    let site = Site {
        scales: Some(scales),
        ..Site::new(a, w.q, w.zero)
    };
    let mut plan = integer_plan(g, ix, i, packs, site)?;
    plan.kind = Kind::Limbs;
    Some(plan)
}

/// com.microsoft `MatMulNBits` with constant B, scales and (u8) zero points, no g_idx, no bias.
fn plan_nbits(g: &pb::GraphProto, ix: &Index, i: usize) -> Option<Plan> {
    let n = &g.node[i];
    let bits = attr_i(n, "bits").unwrap_or(4);
    if ![2, 4, 8].contains(&bits) || n.input.iter().skip(4).any(|x| !x.is_empty()) {
        return None;
    }
    ix.konst(n.input.get(1)?)?.is(UINT8, None).then_some(())?;
    ix.konst(n.input.get(2)?)?.is(FLOAT, None).then_some(())?;
    if let Some(z) = n.input.get(3).filter(|z| !z.is_empty()) {
        ix.konst(z)?.is(UINT8, None).then_some(())?;
    }
    let mut attrs = vec![str_attr("form", "nbits")];
    for key in ["K", "N", "bits", "block_size"] {
        attrs.push(int_attr(
            key,
            attr_i(n, key).unwrap_or(if key == "bits" { 4 } else { -1 }),
        ));
    }
    if attrs.iter().any(|a| a.i < 0) {
        return None;
    }
    Some(Plan {
        node: i,
        inputs: n.input.iter().take(4).cloned().collect(),
        attrs,
        kind: Kind::NBits,
        absorbed: Vec::new(),
    })
}

/// Whether a planned MatMulNBits runs in limbs ([`BlockNibbles`]): 4 bits in blocks of whole groups
/// of 4 rows, on AVX-512 VNNI.
fn nbits_in_limbs(attrs: &[AttributeProto]) -> bool {
    let get = |key: &str| attrs.iter().find(|a| a.name == key).map(|a| a.i);
    let (Some(bits), Some(block)) = (get("bits"), get("block_size")) else {
        return false;
    };
    nibbles::available() && BlockNibbles::takes(bits as usize, block as usize)
}

/// `MatMul(A, B)` where B is quench's codebook decode of a `[K, N]` weight:
/// `Transpose([1, 0]) ← Reshape([N, K]) ← [Slice(.., 0..K, axis 1)] ← Mul(·, scales[N, 1])
/// ← Reshape([N, K padded]) ← Gather(book, Cast(codes) [+ offsets]) [+ more stages]`.
///
/// The operator reads each stage's codes laid along K (`[pieces, N]`, a new initializer made once per
/// codes tensor; the file's `[N, subspaces, pieces]` goes unless something else reads it): a panel's
/// codes for one piece, and a run of columns for the lookup-table product, are then contiguous.
fn plan_codebook(g: &pb::GraphProto, ix: &Index, i: usize, packs: &mut Packs) -> Option<Plan> {
    let mm = &g.node[i];
    let b = weight_value(g, ix, mm.input.get(1)?);
    let made = |v: &str, op: &str| ix.made_by(g, v, op).map(|p| &g.node[p]);
    let t = made(b, "Transpose")?;
    if attr_ints(t, "perm") != Some(&[1, 0]) {
        return None;
    }
    let r = made(t.input.first()?, "Reshape")?;
    let shape = ix.konst(r.input.get(1)?)?.ints()?;
    let [n, k] = shape[..] else { return None };
    let mut x = r.input.first()?;
    if let Some(sl) = made(x, "Slice") {
        let starts = ix.konst(sl.input.get(1)?)?.ints()?;
        let ends = ix.konst(sl.input.get(2)?)?.ints()?;
        let axes = ix.konst(sl.input.get(3)?)?.ints()?;
        if starts != [0] || ends != [k] || axes != [1] || sl.input.len() > 4 {
            return None;
        }
        x = sl.input.first()?;
    }
    let m = made(x, "Mul")?;
    let scales = m.input.get(1)?;
    let sk = ix.konst(scales)?;
    if !sk.is(FLOAT, Some(2)) || sk.t.dims != [n, 1] {
        return None;
    }
    let r2 = made(m.input.first()?, "Reshape")?;
    let shape2 = ix.konst(r2.input.get(1)?)?.ints()?;
    let [n2, k_padded] = shape2[..] else {
        return None;
    };
    if n2 != n || k_padded < k {
        return None;
    }
    // The stages: Adds (neither input a constant) over Gathers, summed in order.
    let mut lookups = Vec::new();
    let mut pending = vec![r2.input.first()?];
    while let Some(v) = pending.pop() {
        if let Some(a) = made(v, "Add")
            && a.input.iter().all(|x| ix.konst(x).is_none())
        {
            pending.extend(a.input.iter());
            continue;
        }
        lookups.push(made(v, "Gather")?);
    }
    lookups.reverse();
    let mut inputs = vec![mm.input[0].clone(), scales.clone()];
    let (mut dim, mut subspaces, mut size) = (0i64, 1i64, 0i64);
    for gather in lookups {
        if attr_i(gather, "axis").unwrap_or(0) != 0 {
            return None;
        }
        let book = ix.konst(gather.input.first()?)?;
        if !book.is(FLOAT, Some(2)) || (dim != 0 && dim != book.t.dims[1]) {
            return None;
        }
        dim = book.t.dims[1];
        let mut idx = gather.input.get(1)?;
        if let Some(add) = made(idx, "Add") {
            let offsets = ix.konst(add.input.get(1)?)?.ints()?;
            subspaces = offsets.len() as i64;
            size = offsets.get(1).copied().unwrap_or(0);
            if offsets
                .iter()
                .enumerate()
                .any(|(s, &o)| o != s as i64 * size)
            {
                return None;
            }
            idx = add.input.first()?;
        }
        let codes = made(idx, "Cast")?.input.first()?;
        let ck = ix.konst(codes)?;
        if !(ck.is(UINT8, Some(3)) || ck.is(UINT16, Some(3)))
            || ck.t.dims[0] != n
            || ck.t.dims[1] != subspaces
        {
            return None;
        }
        let key = (codes.clone(), "along K".to_string());
        let along_k = match packs.by_source.get(&key) {
            Some((name, _)) => name.clone(),
            None => {
                let name = format!("{codes}.along_k");
                let mut t = codes_along_k(ck.t)?;
                t.name = name.clone();
                packs.made.push(t);
                packs.replaced.insert(codes.clone());
                packs.by_source.insert(key, (name.clone(), None));
                name
            }
        };
        inputs.push(along_k);
        inputs.push(gather.input[0].clone());
    }
    if dim == 0 {
        return None;
    }
    Some(Plan {
        node: i,
        inputs,
        attrs: vec![
            str_attr("form", "codebook"),
            int_attr("K", k),
            int_attr("N", n),
            int_attr("k_padded", k_padded),
            int_attr("dim", dim),
            int_attr("subspaces", subspaces),
            int_attr("size", size),
        ],
        kind: Kind::Codebook,
        absorbed: Vec::new(),
    })
}

fn attr_f(n: &NodeProto, name: &str) -> Option<f32> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

fn f32_scalar(name: &str, v: f32) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        data_type: FLOAT,
        raw_data: v.to_le_bytes().to_vec(),
        ..Default::default()
    }
}

/// A value name not yet in `taken` (which it joins), from `base`.
fn fresh(taken: &mut std::collections::HashSet<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut i = 1;
    while taken.contains(&name) {
        name = format!("{base}_{i}");
        i += 1;
    }
    taken.insert(name.clone());
    name
}

/// Rewrites each main-graph `QLinearConv` whose scales, zero points and bias are constants (and whose
/// weight is) as `DequantizeLinear(x) → Conv(DequantizeLinear(w) on axis 0, bias·s_x·s_w) →
/// QuantizeLinear(y)`: what it computes, up to float rounding of the sums. Returns how many.
fn qlinear_convs_as_qdq(g: &mut pb::GraphProto) -> usize {
    let mut taken = names_in(g);
    let mut edits: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut made = Vec::new();
    // Each quantized input is dequantized once, however many QLinearConvs read it (the first one's
    // DequantizeLinear stands where that reader stood, before the others).
    let mut dequantized: HashMap<Vec<String>, String> = HashMap::new();
    {
        let ix = Index::new(g);
        for (i, n) in g.node.iter().enumerate() {
            if n.op_type != "QLinearConv" || !n.domain.is_empty() {
                continue;
            }
            let input = |k: usize| n.input.get(k).filter(|v| !v.is_empty());
            let (Some(x), Some(sx), Some(w), Some(sw), Some(sy), Some(y)) = (
                input(0),
                input(1),
                input(3),
                input(4),
                input(6),
                n.output.first(),
            ) else {
                continue;
            };
            // Scales, zero points, weight and bias constant: tract would fold the weight's
            // DequantizeLinear at load, and the float bias is computed here.
            let consts_ok = [1, 2, 3, 4, 5, 6, 7, 8]
                .iter()
                .all(|&k| input(k).is_none_or(|v| ix.konst(v).is_some()));
            if !consts_ok {
                continue;
            }
            let Some(wk) = ix.konst(w) else { continue };
            let m = wk.t.dims.first().copied().unwrap_or(0);
            let (Some(x_scale), Some(w_scales)) = (
                ix.konst(sx).and_then(|k| floats_of(k.t)),
                ix.konst(sw).and_then(|k| floats_of(k.t)),
            ) else {
                continue;
            };
            if x_scale.len() != 1 || !(w_scales.len() == 1 || w_scales.len() as i64 == m) {
                continue;
            }
            let bias = match input(8) {
                None => None,
                Some(b) => {
                    let Some(v) = ix
                        .konst(b)
                        .filter(|k| k.is(INT32, Some(1)))
                        .and_then(|k| k.ints())
                    else {
                        continue;
                    };
                    if v.len() as i64 != m {
                        continue;
                    }
                    let name = fresh(&mut taken, &format!("{b}_float"));
                    let values: Vec<f32> = v
                        .iter()
                        .enumerate()
                        .map(|(c, &q)| {
                            let s = w_scales[if w_scales.len() == 1 { 0 } else { c }];
                            (q as f64 * x_scale[0] as f64 * s as f64) as f32
                        })
                        .collect();
                    made.push(pb::TensorProto {
                        name: name.clone(),
                        data_type: FLOAT,
                        dims: vec![m],
                        raw_data: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                        ..Default::default()
                    });
                    Some(name)
                }
            };
            let node = |op: &str, inputs: Vec<String>, out: &str, attribute| {
                derived_node(n, op, inputs, out, attribute)
            };
            let with_zero = |mut v: Vec<String>, k: usize| {
                v.extend(input(k).cloned());
                v
            };
            let mut nodes = Vec::new();
            let x_inputs = with_zero(vec![x.clone(), sx.clone()], 2);
            let xf = match dequantized.get(&x_inputs) {
                Some(xf) => xf.clone(),
                None => {
                    let xf = fresh(&mut taken, &format!("{x}_dequantized"));
                    nodes.push(node("DequantizeLinear", x_inputs.clone(), &xf, vec![]));
                    dequantized.insert(x_inputs, xf.clone());
                    xf
                }
            };
            let (wf, yf) = (
                fresh(&mut taken, &format!("{w}_dequantized")),
                fresh(&mut taken, &format!("{y}_float")),
            );
            nodes.push(node(
                "DequantizeLinear",
                with_zero(vec![w.clone(), sw.clone()], 5),
                &wf,
                vec![int_attr("axis", 0)],
            ));
            let mut conv_inputs = vec![xf, wf];
            conv_inputs.extend(bias);
            nodes.push(node("Conv", conv_inputs, &yf, n.attribute.clone()));
            nodes.push(node(
                "QuantizeLinear",
                with_zero(vec![yf.clone(), sy.clone()], 7),
                y,
                vec![],
            ));
            edits.insert(i, nodes);
        }
    }
    splice(g, edits, made)
}

/// Every value and initializer name of the main graph, for [`fresh`].
fn names_in(g: &pb::GraphProto) -> std::collections::HashSet<String> {
    g.node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output))
        .chain(g.initializer.iter().map(|t| &t.name))
        .chain(g.input.iter().chain(&g.output).map(|v| &v.name))
        .cloned()
        .collect()
}

/// A node standing in for part of `parent`, named after it and its output.
fn derived_node(
    parent: &NodeProto,
    op: &str,
    input: Vec<String>,
    out: &str,
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        name: format!("{}/quench_{}_{}", parent.name, op, out),
        op_type: op.into(),
        input,
        output: vec![out.to_string()],
        attribute,
        ..Default::default()
    }
}

/// Replaces each node `edits` names (by index) with its nodes, in place, and adds `made` to the
/// initializers. Returns how many nodes were replaced.
fn splice(
    g: &mut pb::GraphProto,
    mut edits: HashMap<usize, Vec<NodeProto>>,
    made: Vec<pb::TensorProto>,
) -> usize {
    let count = edits.len();
    if count > 0 {
        let old = std::mem::take(&mut g.node);
        for (i, n) in old.into_iter().enumerate() {
            match edits.remove(&i) {
                Some(nodes) => g.node.extend(nodes),
                None => g.node.push(n),
            }
        }
        g.initializer.extend(made);
    }
    count
}

/// Rewrites each main-graph `Gemm` over a compressed weight as `MatMul` (then `Mul` by α, then `Add`
/// of β·C, as the attributes ask) so that the product plans take it. A transposed weight (`transB`,
/// `[N, K]`) is laid out `[K, N]` first: 8-bit codes are transposed into a new constant, their row
/// scales read as column scales; a codebook decode gets a `Transpose` after it, the form
/// [`plan_codebook`] reads. Other Gemms are left alone. Returns how many were rewritten and the 8-bit
/// constants now read transposed.
fn gemms_as_matmuls(g: &mut pb::GraphProto) -> (usize, Vec<String>) {
    let mut taken = names_in(g);
    let mut edits: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut made = Vec::new();
    let mut transposed = Vec::new();
    {
        let ix = Index::new(g);
        for (i, n) in g.node.iter().enumerate() {
            if n.op_type != "Gemm" || !n.domain.is_empty() || attr_i(n, "transA").unwrap_or(0) != 0
            {
                continue;
            }
            let (Some(a), Some(b), Some(y)) = (n.input.first(), n.input.get(1), n.output.first())
            else {
                continue;
            };
            let c = n.input.get(2).filter(|c| !c.is_empty());
            let alpha = attr_f(n, "alpha").unwrap_or(1.0);
            let beta = attr_f(n, "beta").unwrap_or(1.0);
            let wv = weight_value(g, &ix, b);
            let node = |op: &str, inputs: Vec<String>, out: &str, attribute| {
                derived_node(n, op, inputs, out, attribute)
            };
            let mut nodes = Vec::new();
            // Constants and transposed codes of this Gemm, kept only if it is rewritten.
            let mut mine = Vec::new();
            let mut codes_read_transposed = None;
            let weight = if attr_i(n, "transB").unwrap_or(0) == 0 {
                // Already `[K, N]`: an 8-bit decode or a codebook decode (which ends transposed).
                if int8_weight(g, &ix, wv, ScaleAxis::Columns).is_none()
                    && ix.made_by(g, wv, "Transpose").is_none()
                {
                    continue;
                }
                b.clone()
            } else if let Some(w) = int8_weight(g, &ix, wv, ScaleAxis::Rows) {
                let Some(q) = ix.konst(w.q) else { continue };
                let Some(codes) = bytes_of(q.t) else { continue };
                let (rows, k) = (w.dims[0] as usize, w.dims[1] as usize);
                if rows == 0 || k == 0 || codes.len() != rows * k {
                    continue;
                }
                let mut t = vec![0u8; codes.len()];
                for (r, row) in codes.chunks_exact(k).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        t[j * rows + r] = v;
                    }
                }
                let q2 = fresh(&mut taken, &format!("{}_kn", w.q));
                mine.push(pb::TensorProto {
                    name: q2.clone(),
                    data_type: q.t.data_type,
                    dims: vec![k as i64, rows as i64],
                    raw_data: t,
                    ..Default::default()
                });
                codes_read_transposed = Some(w.q.to_string());
                let out = fresh(&mut taken, &format!("{y}_weight"));
                if w.zero_is_code {
                    // DequantizeLinear: the same scales and zero points, now along axis 1.
                    let mut inputs = vec![q2, w.scale.to_string()];
                    inputs.extend(w.zero.cloned());
                    nodes.push(node(
                        "DequantizeLinear",
                        inputs,
                        &out,
                        vec![int_attr("axis", 1)],
                    ));
                } else {
                    // Cast → (Sub zero point) → Mul scale, with `[N, 1]` row constants as `[1, N]`.
                    let mut as_columns = |name: &str| -> Option<String> {
                        let t = ix.konst(name)?.t;
                        if t.dims.iter().product::<i64>() == 1 {
                            return Some(name.to_string());
                        }
                        let v = floats_of(t)?;
                        let fresh_name = fresh(&mut taken, &format!("{name}_columns"));
                        mine.push(pb::TensorProto {
                            name: fresh_name.clone(),
                            data_type: FLOAT,
                            dims: vec![1, v.len() as i64],
                            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                            ..Default::default()
                        });
                        Some(fresh_name)
                    };
                    let Some(scale) = as_columns(w.scale) else {
                        continue;
                    };
                    let zero = match w.zero {
                        Some(z) => match as_columns(z) {
                            Some(z) => Some(z),
                            None => continue,
                        },
                        None => None,
                    };
                    let cast = fresh(&mut taken, &format!("{y}_weight_cast"));
                    nodes.push(node(
                        "Cast",
                        vec![q2],
                        &cast,
                        vec![int_attr("to", FLOAT as i64)],
                    ));
                    let mut x = cast;
                    if let Some(z) = zero {
                        let sub = fresh(&mut taken, &format!("{y}_weight_centred"));
                        nodes.push(node("Sub", vec![x, z], &sub, vec![]));
                        x = sub;
                    }
                    nodes.push(node("Mul", vec![x, scale], &out, vec![]));
                }
                out
            } else if let Some(r) = ix.made_by(g, wv, "Reshape")
                && g.node[r]
                    .input
                    .get(1)
                    .and_then(|s| ix.konst(s))
                    .and_then(|s| s.ints())
                    .is_some_and(|s| s.len() == 2)
                && ix.made_by(g, &g.node[r].input[0], "Mul").is_some()
            {
                let out = fresh(&mut taken, &format!("{y}_weight"));
                nodes.push(node(
                    "Transpose",
                    vec![wv.to_string()],
                    &out,
                    vec![ints_attr("perm", vec![1, 0])],
                ));
                out
            } else {
                continue;
            };
            let product = if alpha == 1.0 && c.is_none() {
                y.clone()
            } else {
                fresh(&mut taken, &format!("{y}_product"))
            };
            nodes.push(node("MatMul", vec![a.clone(), weight], &product, vec![]));
            let mut x = product;
            if alpha != 1.0 {
                let k = fresh(&mut taken, &format!("{y}_alpha"));
                mine.push(f32_scalar(&k, alpha));
                let out = if c.is_none() {
                    y.clone()
                } else {
                    fresh(&mut taken, &format!("{y}_scaled"))
                };
                nodes.push(node("Mul", vec![x, k], &out, vec![]));
                x = out;
            }
            if let Some(c) = c {
                let c = if beta == 1.0 {
                    c.clone()
                } else {
                    let k = fresh(&mut taken, &format!("{y}_beta"));
                    mine.push(f32_scalar(&k, beta));
                    let out = fresh(&mut taken, &format!("{y}_bias"));
                    nodes.push(node("Mul", vec![c.clone(), k], &out, vec![]));
                    out
                };
                nodes.push(node("Add", vec![x, c], y, vec![]));
            }
            edits.insert(i, nodes);
            made.extend(mine);
            transposed.extend(codes_read_transposed);
        }
    }
    (splice(g, edits, made), transposed)
}

/// Replaces, in the main graph, every weight product tract would decode to f32 by a `QuenchMatMul`
/// over the same constants, then removes the nodes nothing reads any more (the decodes).
pub fn rewrite(model: &mut ModelProto) -> Rewrites {
    let mut done = Rewrites::default();
    let opsets = model.opset_import.clone();
    let Some(g) = model.graph.as_mut() else {
        return done;
    };
    done.quantize = g
        .node
        .iter()
        .filter(|n| n.op_type == "DynamicQuantizeLinear" && n.domain.is_empty())
        .count();
    done.qlinear_conv = qlinear_convs_as_qdq(g);
    let (gemms, transposed) = gemms_as_matmuls(g);
    done.gemm = gemms;
    let mut packs = Packs::default();
    // The codes now read transposed go before the plans pack them again, so that a large weight is
    // not held three times at once (the file's layout, transposed, packed).
    remove_dead_nodes(g);
    packs.replaced.extend(transposed);
    drop_unread(g, &packs.replaced);
    let plans: Vec<Plan> = {
        let ix = Index::new(g);
        (0..g.node.len())
            .filter_map(|i| match g.node[i].op_type.as_str() {
                "MatMul" => plan_qdq(g, &ix, i, &mut packs)
                    .or_else(|| plan_int8_integer(g, &ix, i, &mut packs))
                    .or_else(|| plan_int8(g, &ix, i))
                    .or_else(|| plan_codebook(g, &ix, i, &mut packs)),
                "MatMulNBits" => plan_nbits(g, &ix, i),
                "MatMulInteger" => plan_integer(g, &ix, i, &mut packs),
                "Conv" => plan_conv(g, &ix, i, &mut packs),
                "ConvInteger" => plan_conv_integer(g, &ix, i, &mut packs),
                "LSTM" => lstm::plan(g, &ix, i, &mut packs),
                _ => None,
            })
            .collect()
    };
    let mut gone = std::collections::HashSet::new();
    apply(g, plans, &mut gone, &mut done);
    let (decoded, read) = fold::decode_conv_weights(g, &opsets);
    done.decoded = decoded.len();
    packs.replaced.extend(read);
    // The convolutions over the weights just decoded take quench's convolution too.
    let more: Vec<Plan> = {
        let ix = Index::new(g);
        let decoded: std::collections::HashSet<String> = decoded.into_iter().collect();
        (0..g.node.len())
            .filter(|&i| g.node[i].op_type == "Conv")
            .filter_map(|i| plan_decoded_conv(g, &ix, i, &decoded, &mut packs))
            .collect()
    };
    apply(g, more, &mut gone, &mut done);
    if done.total() == 0 && gemms == 0 && done.decoded == 0 {
        return done;
    }
    g.initializer.extend(packs.made);
    let mut at = 0..;
    g.node.retain(|_| !gone.contains(&at.next().unwrap()));
    remove_dead_nodes(g);
    // The 8-bit weights now packed: their original layout goes (unless something else reads it).
    drop_unread(g, &packs.replaced);
    if done.total() > 0 && !model.opset_import.iter().any(|o| o.domain == DOMAIN) {
        model.opset_import.push(pb::OperatorSetIdProto {
            domain: DOMAIN.into(),
            version: 1,
        });
    }
    done
}

/// Turns each planned node into quench's operator, and counts it in `done`; the nodes a plan absorbs
/// go into `gone`.
fn apply(
    g: &mut pb::GraphProto,
    plans: Vec<Plan>,
    gone: &mut std::collections::HashSet<usize>,
    done: &mut Rewrites,
) {
    for p in plans {
        if let Some(&last) = p.absorbed.last() {
            let out = g.node[last].output.clone();
            g.node[p.node].output = out;
            gone.extend(p.absorbed.iter().copied());
            done.epilogues += 1;
        }
        let node = &mut g.node[p.node];
        node.op_type = match p.kind {
            Kind::Integer | Kind::Qdq | Kind::Limbs | Kind::Conv => OP_INT,
            Kind::Lstm => lstm::OP,
            _ => OP,
        }
        .into();
        node.domain = DOMAIN.into();
        node.input = p.inputs;
        node.attribute = p.attrs;
        match p.kind {
            Kind::Int8 => done.int8 += 1,
            Kind::NBits if nbits_in_limbs(&node.attribute) => done.nbits_limbs += 1,
            Kind::NBits => done.nbits += 1,
            Kind::Codebook => done.codebook += 1,
            Kind::Integer => done.integer += 1,
            Kind::Qdq => done.qdq += 1,
            Kind::Limbs => done.limbs += 1,
            Kind::Conv => done.conv += 1,
            Kind::FloatConv => done.float_conv += 1,
            Kind::Lstm => done.lstm += 1,
        }
    }
}

/// Drops the initializers named in `replaced` that no node, subgraph or graph input reads any more.
fn drop_unread(g: &mut pb::GraphProto, replaced: &std::collections::HashSet<String>) {
    if replaced.is_empty() {
        return;
    }
    let read = Index::new(g).readers;
    let inputs: std::collections::HashSet<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
    let keep = |t: &pb::TensorProto| {
        !replaced.contains(&t.name)
            || inputs.contains(t.name.as_str())
            || read.get(t.name.as_str()).is_some_and(|&r| r > 0)
    };
    let kept: Vec<bool> = g.initializer.iter().map(keep).collect();
    let mut it = kept.into_iter();
    g.initializer.retain(|_| it.next().unwrap());
}

/// The constant tensor behind input `i` of a node being wired (an error naming the node if it is not
/// a constant).
fn constant_input(
    model: &TypedModel,
    prefix: &str,
    inputs: &[OutletId],
    i: usize,
) -> TractResult<Arc<Tensor>> {
    model
        .outlet_fact(inputs[i])?
        .konst
        .clone()
        .with_context(|| format!("{prefix}: input {i} must be a constant"))
}

/// Drops, until none is left, the nodes none of whose outputs is read (by a node, a subgraph or the
/// graph's outputs). ONNX operators have no side effects, so nothing observable goes with them.
fn remove_dead_nodes(g: &mut pb::GraphProto) {
    loop {
        let read: std::collections::HashSet<String> = Index::new(g)
            .readers
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(v, _)| v.to_string())
            .collect();
        let before = g.node.len();
        g.node
            .retain(|n| n.output.iter().any(|o| !o.is_empty() && read.contains(o)));
        if g.node.len() == before {
            break;
        }
    }
}

/// Shape rules of a product over a `[K, N]` weight: the output is the input with its last axis `N`.
fn last_axis_becomes<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    n: usize,
) -> InferenceResult {
    let n = n.to_dim();
    s.given(&inputs[0].rank, move |s, rank| {
        let rank = rank as usize;
        s.equals(&outputs[0].rank, rank as i64)?;
        for ax in 0..rank - 1 {
            s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
        }
        s.equals(&outputs[0].shape[rank - 1], n.clone())
    })
}

/// The output shape of a product over a `[K, N]` weight, for an input of `shape`.
fn output_shape(shape: &[usize], k: usize, n: usize, op: &str) -> TractResult<TVec<usize>> {
    ensure!(
        shape.last() == Some(&k),
        "{op}: input shape {shape:?} for K {k}"
    );
    let mut out: TVec<usize> = shape.into();
    *out.last_mut().unwrap() = n;
    Ok(out)
}

/// [`output_shape`] for typed facts.
fn output_fact_shape(a: &TypedFact, n: usize, op: &str) -> TractResult<TVec<TDim>> {
    ensure!(a.rank() >= 1, "{op} takes an input of rank ≥ 1");
    let mut shape: TVec<TDim> = a.shape.iter().cloned().collect();
    *shape.last_mut().unwrap() = n.to_dim();
    Ok(shape)
}

#[derive(Clone, Debug)]
enum Form {
    Int8,
    /// An f32 weight `[K, N]` (a convolution's, decoded once at load from a codebook).
    F32,
    NBits {
        bits: usize,
        block: usize,
    },
    Codebook {
        k_padded: usize,
        dim: usize,
        subspaces: usize,
        size: usize,
    },
}

fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let form: String = node.get_attr("form")?;
    let k: usize = node.get_attr("K")?;
    let n: usize = node.get_attr("N")?;
    let form = match form.as_str() {
        "int8" => Form::Int8,
        "f32" => Form::F32,
        "nbits" => Form::NBits {
            bits: node.get_attr("bits")?,
            block: node.get_attr("block_size")?,
        },
        "codebook" => Form::Codebook {
            k_padded: node.get_attr("k_padded")?,
            dim: node.get_attr("dim")?,
            subspaces: node.get_attr("subspaces")?,
            size: node.get_attr("size")?,
        },
        other => bail!("{OP}: unknown form '{other}'"),
    };
    let conv = match node.get_attr_opt_vec::<i64>("conv")? {
        None => None,
        Some(v) => Some(geometry_of(&v).with_context(|| format!("{}: conv {v:?}", node.name))?),
    };
    let bias = node.get_attr_opt::<i64>("bias")?.unwrap_or(0) != 0;
    ensure!(
        conv.is_some() || !bias,
        "{}: a bias without a convolution",
        node.name
    );
    Ok((
        expand(Expansion_ {
            form,
            k,
            n,
            conv,
            bias,
        }),
        vec![],
    ))
}

/// The inference-time face of the operator: shapes, then wiring the typed [`QMatMul`].
#[derive(Clone, Debug)]
#[allow(non_camel_case_types)]
struct Expansion_ {
    form: Form,
    k: usize,
    n: usize,
    /// A convolution over im2col rows of an `[N, C, spatial…]` input (int8 and f32 forms only).
    conv: Option<Geometry>,
    /// Whether the last input is the convolution's bias, one value per output channel.
    bias: bool,
}

impl Expansion for Expansion_ {
    fn name(&self) -> StaticName {
        OP.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        match self.conv.clone() {
            None => last_axis_becomes(s, inputs, outputs, self.n),
            Some(geo) => conv_becomes(s, inputs, outputs, geo, self.n, OP),
        }
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let weights = inputs.len() - self.bias as usize;
        let konsts = (1..weights)
            .map(|i| constant_input(model, prefix, inputs, i))
            .collect::<TractResult<Vec<_>>>()?;
        let bias = match self.bias {
            true => {
                let b = constant_input(model, prefix, inputs, weights)?;
                ensure!(
                    b.datum_type() == f32::datum_type() && b.len() == self.n,
                    "{prefix}: bias of {} values of {:?} for {} channels",
                    b.len(),
                    b.datum_type(),
                    self.n
                );
                Some(b)
            }
            false => None,
        };
        ensure!(
            self.conv.is_none() || matches!(self.form, Form::Int8 | Form::F32),
            "{prefix}: a convolution over a weight of form {:?}",
            self.form
        );
        if let Some(geo) = &self.conv {
            ensure!(
                geo.k() == self.k,
                "{prefix}: conv geometry for K {}",
                self.k
            );
        }
        let mut op = QMatMul {
            form: self.form.clone(),
            k: self.k,
            n: self.n,
            konsts,
            relaid: None,
            conv: self.conv.clone(),
            bias,
        };
        // A convolution's codes `[K, M]` are read in place: with at most a few hundred output
        // channels a panel's rows lie close together, and a blocked copy would hold them twice.
        if matches!(self.form, Form::NBits { .. } | Form::Int8) && self.conv.is_none() {
            op.relaid = relaid_weight(&op)?;
            if op.relaid.is_some() {
                op.konsts.clear();
            }
        }
        // Fail at load, not at the first run, when the constants do not fit the form.
        op.with_panels(true, |_, _| Ok(()))
            .with_context(|| format!("{prefix}: weight does not fit {OP}"))?;
        model.wire_node(prefix, op, &inputs[..1])
    }
}

/// `Y[.., N] = A[.., K] · W`, W decoded a panel at a time from tract's constants.
#[derive(Clone, Debug)]
pub struct QMatMul {
    form: Form,
    k: usize,
    n: usize,
    konsts: Vec<Arc<Tensor>>,
    /// 4-bit codes re-laid for quench's kernels, shared by every node reading the same constants.
    relaid: Option<Arc<Relaid>>,
    /// A convolution over im2col rows of an `[N, C, spatial…]` input, not a product over its last axis.
    conv: Option<Geometry>,
    /// The convolution's bias, one value per output channel.
    bias: Option<Arc<Tensor>>,
}

/// A weight re-laid at load: 4-bit MatMulNBits codes along K for the f32 panel kernels or in VNNI
/// blocks for products in limbs; 8-bit codes in blocks of columns.
#[derive(Debug)]
enum Relaid {
    Panels(NibblesK),
    Blocks(BlockNibbles),
    /// An 8-bit weight in blocks of 32 columns, so that panels of a wide weight are read in order.
    Int8(Int8Blocked),
}

impl Relaid {
    fn bytes(&self) -> usize {
        match self {
            Relaid::Panels(r) => r.bytes(),
            Relaid::Blocks(r) => r.bytes(),
            Relaid::Int8(r) => r.bytes(),
        }
    }
}

/// The re-laid copy of a 4-bit MatMulNBits weight ([`Relaid`]), made once per set of constants: tied
/// weights (one initializer read by several nodes) share it. The operator then lets go of the
/// MatMulNBits layout; the parsed model a session keeps to re-plan for new shapes still holds it, so
/// 4-bit codes are resident twice (1 byte per weight in all).
fn relaid_weight(op: &QMatMul) -> TractResult<Option<Arc<Relaid>>> {
    use std::sync::{Mutex, OnceLock, Weak};
    type Cache = Mutex<HashMap<Vec<usize>, Weak<Relaid>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key: Vec<usize> = op.konsts.iter().map(|t| Arc::as_ptr(t) as usize).collect();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(w) = cache.lock().unwrap().get(&key).and_then(Weak::upgrade) {
        return Ok(Some(w));
    }
    let made = match op.form {
        Form::Int8 => {
            op.int8_view(|w| Ok(Some(Arc::new(Relaid::Int8(Int8Blocked::from_cols(w))))))?
        }
        _ => op.nbits_view(|w| {
            let blocks = nibbles::available()
                .then(|| BlockNibbles::from_nbits(w))
                .flatten();
            Ok(match blocks {
                Some(b) => Some(Arc::new(Relaid::Blocks(b))),
                None => NibblesK::from_nbits(w).map(|r| Arc::new(Relaid::Panels(r))),
            })
        })?,
    };
    if let Some(m) = &made {
        let mut c = cache.lock().unwrap();
        c.retain(|_, w| w.strong_count() > 0);
        c.insert(key, Arc::downgrade(m));
    }
    Ok(made)
}

impl PartialEq for QMatMul {
    fn eq(&self, other: &Self) -> bool {
        self.k == other.k
            && self.n == other.n
            && match (&self.relaid, &other.relaid) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
            && self.konsts.len() == other.konsts.len()
            && self
                .konsts
                .iter()
                .zip(&other.konsts)
                .all(|(a, b)| Arc::ptr_eq(a, b))
            && self.conv == other.conv
            && same(&self.bias, &other.bias)
    }
}
impl Eq for QMatMul {}

impl QMatMul {
    /// Bytes of the constants the operator keeps.
    pub fn weight_bytes(&self) -> usize {
        self.relaid.as_ref().map_or(0, |r| r.bytes())
            + self
                .konsts
                .iter()
                .map(|t| t.len() * t.datum_type().size_of())
                .sum::<usize>()
    }

    /// Runs `f` over the panel source of the weight. `verify` checks every code against its codebook
    /// (done once, at load: the constants do not change after).
    fn with_panels<R>(
        &self,
        verify: bool,
        f: impl FnOnce(&dyn Panels, Option<&Codebook>) -> TractResult<R>,
    ) -> TractResult<R> {
        match self.relaid.as_deref() {
            Some(Relaid::Panels(r)) => return f(r, None),
            Some(Relaid::Blocks(r)) => return f(r, None),
            Some(Relaid::Int8(r)) => return f(r, None),
            None => {}
        }
        let rams = self.plain_konsts()?;
        let (k, n) = (self.k, self.n);
        match &self.form {
            Form::Int8 => self.int8_view(|w| f(w, None)),
            Form::F32 => {
                let data = rams
                    .first()
                    .context("f32 weight expected")?
                    .as_slice::<f32>()?;
                ensure!(
                    data.len() == k * n,
                    "f32 weight of {} values for {k}×{n}",
                    data.len()
                );
                f(&kernels::formats::F32Matrix { data, k, n }, None)
            }
            Form::NBits { .. } => self.nbits_view(|w| f(w, None)),
            Form::Codebook {
                k_padded,
                dim,
                subspaces,
                size,
            } => {
                let scales = rams[0].as_slice::<f32>()?;
                let mut stages = Vec::new();
                for pair in rams[1..].chunks(2) {
                    ensure!(pair.len() == 2, "codes without a codebook");
                    let codes = match pair[0].datum_type() {
                        DatumType::U8 => CodeSlice::U8(pair[0].as_slice::<u8>()?),
                        DatumType::U16 => CodeSlice::U16(pair[0].as_slice::<u16>()?),
                        dt => bail!("8- or 16-bit codes expected, found {dt:?}"),
                    };
                    stages.push((codes, pair[1].as_slice::<f32>()?));
                }
                let w = Codebook {
                    stages,
                    scales,
                    k,
                    n,
                    k_padded: *k_padded,
                    dim: *dim,
                    subspaces: *subspaces,
                    size: *size,
                };
                if verify {
                    w.check().map_err(|e| anyhow!(e))?;
                }
                f(&w, Some(&w))
            }
        }
    }
}

impl QMatMul {
    /// The constants' plain storage, in input order.
    fn plain_konsts(&self) -> TractResult<Vec<PlainView<'_>>> {
        self.konsts.iter().map(|t| t.try_as_plain_ram()).collect()
    }

    /// Runs `f` over the row-major view of the 8-bit constants (Int8 form only, before re-laying).
    fn int8_view<R>(&self, f: impl FnOnce(&Int8Cols) -> TractResult<R>) -> TractResult<R> {
        let rams = self.plain_konsts()?;
        let (k, n) = (self.k, self.n);
        ensure!(rams.len() >= 2, "8-bit codes and scales expected");
        let scales = rams[1].as_slice::<f32>()?;
        let codes = match rams[0].datum_type() {
            DatumType::I8 => Codes::I8(rams[0].as_slice::<i8>()?),
            DatumType::U8 => Codes::U8(rams[0].as_slice::<u8>()?),
            dt => bail!("8-bit codes expected, found {dt:?}"),
        };
        // DequantizeLinear's zero point has the codes' type; the Cast·Mul form's is float.
        let zero: Option<Vec<f32>> = match rams.get(2) {
            None => None,
            Some(z) => Some(match z.datum_type() {
                DatumType::I8 => z.as_slice::<i8>()?.iter().map(|&v| v as f32).collect(),
                DatumType::U8 => z.as_slice::<u8>()?.iter().map(|&v| v as f32).collect(),
                DatumType::F32 => z.as_slice::<f32>()?.to_vec(),
                dt => bail!("zero point of type {dt:?}"),
            }),
        };
        ensure!(
            rams[0].len() == k * n && (scales.len() == 1 || scales.len() == n),
            "codes of {} values and {} scales for {k}×{n}",
            rams[0].len(),
            scales.len()
        );
        ensure!(
            zero.as_ref().is_none_or(|z| z.len() == 1 || z.len() == n),
            "{} zero points for {n} columns",
            zero.as_ref().map_or(0, |z| z.len())
        );
        f(&Int8Cols::with_codes(codes, k, n, scales, zero))
    }

    /// Runs `f` over the MatMulNBits view of the constants (NBits form only).
    fn nbits_view<R>(&self, f: impl FnOnce(&NBits) -> TractResult<R>) -> TractResult<R> {
        let Form::NBits { bits, block } = self.form else {
            bail!("not a MatMulNBits weight");
        };
        let rams = self.plain_konsts()?;
        let zero = rams.get(2).map(|z| z.as_slice::<u8>()).transpose()?;
        let w = NBits::new(
            rams[0].as_slice::<u8>()?,
            rams[1].as_slice::<f32>()?,
            zero,
            self.k,
            self.n,
            bits,
            block,
        )
        .map_err(|e| anyhow!(e))?;
        f(&w)
    }
}

impl Op for QMatMul {
    fn name(&self) -> StaticName {
        OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} {}×{}, {} weight bytes, {} kernels",
            self.form,
            self.k,
            self.n,
            self.weight_bytes(),
            kernels::Isa::detect().name()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        kernels::zero_upper();
        let a = args_1!(inputs);
        ensure!(a.datum_type() == f32::datum_type(), "{OP} takes f32 input");
        if let Some(geo) = &self.conv {
            return Ok(tvec![self.conv(geo, &a)?.into_tvalue()]);
        }
        Ok(tvec![self.product(&a)?.into_tvalue()])
    }
}

impl QMatMul {
    /// The convolution of `x[N, C, spatial…]`: image by image (so that its rows stay in cache), the
    /// product over its im2col rows, back to channels first, plus the bias.
    fn conv(&self, geo: &Geometry, x: &Tensor) -> TractResult<Tensor> {
        let ConvExtent { batch, hw, oh, ow } = ConvExtent::of(geo, x.shape(), OP)?;
        let mut out = Tensor::zero::<f32>(&geo_output_shape(geo, batch, self.n, oh, ow))?;
        let plane = oh * ow;
        if plane * batch * self.n == 0 {
            return Ok(out);
        }
        let x_ram = x.try_as_plain_ram()?;
        let x = x_ram.as_slice::<f32>()?;
        let mut o_ram = out.try_as_plain_ram_mut()?;
        let o = o_ram.as_slice_mut::<f32>()?;
        let b_ram = self
            .bias
            .as_ref()
            .map(|b| b.try_as_plain_ram())
            .transpose()?;
        let bias = b_ram.as_ref().map(|b| b.as_slice::<f32>()).transpose()?;
        let mut cols = Vec::new();
        let mut y = vec![0f32; plane * self.n];
        let image_len = x.len() / batch;
        self.with_panels(false, |w, _| {
            // A pointwise convolution multiplies each image `[C, H·W]` as it is, from the left, by
            // the weight decoded to `[M, C]`: the result is channels-first, with no transpose on
            // either side (which would cost about as much as the product).
            let pointwise = geo
                .pointwise(hw)
                .then(|| kernels::formats::transposed_f32(w));
            for (image, o) in x
                .chunks_exact(image_len)
                .zip(o.chunks_exact_mut(plane * self.n))
            {
                if let Some(wt) = &pointwise {
                    let image = kernels::formats::F32Matrix {
                        data: image,
                        k: geo.channels,
                        n: plane,
                    };
                    kernels::matmul(wt, self.n, &image, o);
                } else {
                    geo.im2col_into(image, 1, hw, 0.0, &mut cols)
                        .context("im2col")?;
                    kernels::matmul(&cols, plane, w, &mut y);
                    kernels::conv::transpose(&y, plane, self.n, o);
                }
                if let Some(bias) = bias {
                    for (channel, &v) in o.chunks_exact_mut(plane).zip(bias) {
                        channel.iter_mut().for_each(|x| *x += v);
                    }
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// `a[.., K] · W`.
    fn product(&self, a: &Tensor) -> TractResult<Tensor> {
        let shape = output_shape(a.shape(), self.k, self.n, OP)?;
        let m = a.len() / self.k;
        let mut y = Tensor::zero::<f32>(&shape)?;
        {
            let a_ram = a.try_as_plain_ram()?;
            let a = a_ram.as_slice::<f32>()?;
            let mut y_ram = y.try_as_plain_ram_mut()?;
            let c = y_ram.as_slice_mut::<f32>()?;
            if let Some(Relaid::Blocks(w)) = self.relaid.as_deref() {
                nibbles::matmul_f32(a, m, w, c);
            } else {
                self.with_panels(false, |w, book| {
                    // A codebook weight is multiplied without decoding where the CPU allows: by
                    // lookup tables when wide, else with weights broadcast from the codebook.
                    let fast = |b: &Codebook| {
                        kernels::lut::matmul(a, m, b, c) || kernels::codebook::matmul(a, m, b, c)
                    };
                    if !book.is_some_and(fast) {
                        kernels::matmul(a, m, w, c);
                    }
                    Ok(())
                })?;
            }
        }
        Ok(y)
    }
}

impl TypedOp for QMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let a = inputs[0];
        ensure!(a.datum_type == f32::datum_type(), "{OP} takes f32 input");
        let shape = match &self.conv {
            Some(geo) => {
                let dims: TVec<TDim> = a.shape.iter().cloned().collect();
                conv_output_shape(geo, &dims, self.n, OP)?
            }
            None => output_fact_shape(a, self.n, OP)?,
        };
        Ok(tvec![f32::fact(shape)])
    }

    as_op!();
}

// ---------------------------------------------------------------------------------------------------
// MatMulInteger over a constant 8-bit weight.

/// Weights packed for the integer kernels while planning, one per distinct (weight, zero point).
#[derive(Default)]
struct Packs {
    /// (weight, zero point) → names of the packed weight and of its i32 zero point, if any.
    by_source: HashMap<(String, String), (String, Option<String>)>,
    /// The new initializers.
    made: Vec<pb::TensorProto>,
    /// The weights now read packed.
    replaced: std::collections::HashSet<String>,
}

/// Codes `[N, subspaces, pieces per subspace]` (8 or 16 bits) as `[pieces, N]`, same type; None for
/// data this cannot read in place (external, or of the wrong length).
fn codes_along_k(t: &pb::TensorProto) -> Option<pb::TensorProto> {
    let len = t.dims.iter().product::<i64>() as usize;
    let n = *t.dims.first()? as usize;
    if t.data_location == Some(1) || n == 0 {
        return None;
    }
    let pieces = len / n;
    let width = match t.data_type {
        UINT8 => 1,
        UINT16 => 2,
        _ => return None,
    };
    let raw: std::borrow::Cow<[u8]> = if t.raw_data.len() == len * width {
        std::borrow::Cow::Borrowed(&t.raw_data)
    } else if t.int32_data.len() == len {
        t.int32_data
            .iter()
            .flat_map(|&v| (v as u16).to_le_bytes().into_iter().take(width))
            .collect()
    } else {
        return None;
    };
    let mut out = vec![0u8; raw.len()];
    for (col, codes) in raw.chunks_exact(pieces * width).enumerate() {
        for (p, code) in codes.chunks_exact(width).enumerate() {
            let at = (p * n + col) * width;
            out[at..at + width].copy_from_slice(code);
        }
    }
    Some(pb::TensorProto {
        dims: vec![pieces as i64, n as i64],
        data_type: t.data_type,
        raw_data: out,
        ..Default::default()
    })
}

/// The values of an 8-bit constant, whether stored raw or in `int32_data`.
fn bytes_of(t: &pb::TensorProto) -> Option<Vec<u8>> {
    let len: i64 = t.dims.iter().product();
    if t.data_location == Some(1) || !matches!(t.data_type, INT8 | UINT8) {
        return None;
    }
    if t.raw_data.len() as i64 == len {
        Some(t.raw_data.clone())
    } else if t.int32_data.len() as i64 == len {
        Some(t.int32_data.iter().map(|&v| v as u8).collect())
    } else {
        None
    }
}

/// `MatMulInteger(A, B[, a₀[, b₀]])` with B a constant `[K, N]` of 8 bits, `b₀` a constant (one value or
/// one per column) and `a₀` one value: a constant, or DynamicQuantizeLinear's zero point.
fn plan_integer(g: &pb::GraphProto, ix: &Index, i: usize, packs: &mut Packs) -> Option<Plan> {
    let mm = &g.node[i];
    let a = mm.input.first().filter(|a| !a.is_empty())?;
    let b = weight_value(g, ix, mm.input.get(1)?);
    let a_zero = mm.input.get(2).filter(|z| !z.is_empty());
    let b_zero = mm.input.get(3).filter(|z| !z.is_empty());
    let n = *ix.konst(b)?.t.dims.get(1)?;
    let site = Site {
        a_zero,
        ..Site::new(a, b, b_zero).with_epilogue(epilogue(g, ix, i, a, n, None))
    };
    integer_plan(g, ix, i, packs, site)
}

/// The float epilogue of an integer product in the dynamic-quantization form: the i32 result is
/// `Cast` to float, multiplied by `s`, then maybe added a bias. `s` is a constant of one value per
/// output channel (or one in all), or `a_scale · c`, with `a_scale` the scale the
/// DynamicQuantizeLinear that made the product's A gave it and `c` such a constant. The operator
/// then computes `(y as f32) · (a_scale · c)` and `+ bias` in f32, the graph's operations in its
/// order, so its result is the graph's bit for bit.
struct Epilogue<'a> {
    scales: Vec<f32>,
    a_scale: Option<&'a String>,
    bias: Option<&'a String>,
    /// The Cast, the Mul and the Add taken over.
    absorbed: Vec<usize>,
}

/// Whether a float constant of `dims` holds one value per output channel, or one in all, as it
/// broadcasts against a product's result: for a product over the last axis, `[N]` (rank ≤ 1, so it
/// adds no axis); for a convolution of `spatial` axes, `[.., M, 1, 1]` of rank at most the output's.
fn per_channel(dims: &[i64], n: i64, spatial: Option<usize>) -> bool {
    let len: i64 = dims.iter().product();
    match spatial {
        None => dims.len() <= 1 && (len == 1 || len == n),
        Some(sp) if dims.len() > sp + 2 => false,
        Some(_) if len == 1 => true,
        Some(sp) => {
            len == n
                && dims.len() > sp
                && dims[dims.len() - sp - 1] == n
                && dims[dims.len() - sp..].iter().all(|&d| d == 1)
        }
    }
}

/// The input of a two-input node that is not `v` (`None` if both or neither are).
fn other_input<'g>(node: &'g NodeProto, v: &str) -> Option<&'g String> {
    match &node.input[..] {
        [x, y] if x == v && y != v => Some(y),
        [x, y] if y == v && x != v => Some(x),
        _ => None,
    }
}

/// The [`Epilogue`] after node `i`, an integer product over `a` with `n` output channels
/// (`spatial` axes for a convolution), if its result goes through one and nowhere else.
fn epilogue<'g>(
    g: &'g pb::GraphProto,
    ix: &Index<'g>,
    i: usize,
    a: &str,
    n: i64,
    spatial: Option<usize>,
) -> Option<Epilogue<'g>> {
    let plain = |j: usize, op: &str| g.node[j].op_type == op && g.node[j].domain.is_empty();
    let cast_i = ix.sole_reader(g.node[i].output.first()?)?;
    let cast = &g.node[cast_i];
    if !plain(cast_i, "Cast") || attr_i(cast, "to") != Some(FLOAT as i64) {
        return None;
    }
    let mul_i = ix.sole_reader(cast.output.first()?)?;
    if !plain(mul_i, "Mul") {
        return None;
    }
    let mul = &g.node[mul_i];
    let s = other_input(mul, &cast.output[0])?;
    let channel_floats = |v: &str| -> Option<Vec<f32>> {
        let k = ix.konst(v)?;
        per_channel(&k.t.dims, n, spatial).then_some(())?;
        floats_of(k.t)
    };
    let (scales, a_scale) = match channel_floats(s) {
        Some(c) => (c, None),
        None => {
            let m = &g.node[ix.made_by(g, s, "Mul")?];
            let of_a = |v: &str| {
                ix.made_by(g, v, "DynamicQuantizeLinear").is_some_and(|d| {
                    let out = &g.node[d].output;
                    out.first().is_some_and(|x| x == a) && out.get(1).is_some_and(|x| x == v)
                })
            };
            let x = m.input.iter().find(|v| of_a(v))?;
            (channel_floats(other_input(m, x)?)?, Some(x))
        }
    };
    let mut absorbed = vec![cast_i, mul_i];
    let mut bias = None;
    if let Some(add_i) = ix.sole_reader(&mul.output[0]).filter(|&j| plain(j, "Add"))
        && let Some(b) = other_input(&g.node[add_i], &mul.output[0])
        && ix.konst(b).is_some_and(|k| {
            k.t.data_type == FLOAT && k.len() == n && per_channel(&k.t.dims, n, spatial)
        })
    {
        bias = Some(b);
        absorbed.push(add_i);
    }
    Some(Epilogue {
        scales,
        a_scale,
        bias,
        absorbed,
    })
}

/// `MatMul(DequantizeLinear(x_q, s_x, z_x), DequantizeLinear(w_q, s_w, z_w))` with `s_x`, `z_x` one
/// constant value and `w_q` a constant 8-bit `[K, N]` (scale and zero point per tensor or per column,
/// axis 1): the static QDQ form. It becomes the integer product over `x_q`, times `s_x · s_w` per
/// column — the same value as the float product of the dequantized operands, up to float rounding.
fn plan_qdq(g: &pb::GraphProto, ix: &Index, i: usize, packs: &mut Packs) -> Option<Plan> {
    let mm = &g.node[i];
    let dx = &g.node[ix.made_by(g, mm.input.first()?, "DequantizeLinear")?];
    let dw = &g.node[ix.made_by(g, weight_value(g, ix, mm.input.get(1)?), "DequantizeLinear")?];
    let (x, sx) = (dx.input.first()?, ix.konst(dx.input.get(1)?)?);
    // The zero point's type is the activations' type: it must be there and 8-bit.
    let x_zero = dx.input.get(2).filter(|z| !z.is_empty());
    let zx = ix.konst(x_zero?)?;
    if sx.t.data_type != FLOAT
        || sx.len() != 1
        || !(zx.is(UINT8, None) || zx.is(INT8, None))
        || attr_i(dx, "block_size").unwrap_or(0) != 0
    {
        return None;
    }
    let sx = floats_of(sx.t)?[0];
    let (w, sw) = (dw.input.first()?, ix.konst(dw.input.get(1)?)?);
    let wk = ix.konst(w)?;
    let n = *wk.t.dims.get(1)?;
    let axis = attr_i(dw, "axis").unwrap_or(1);
    if sw.t.data_type != FLOAT
        || !column_scales(sw.t, n)
        || (sw.len() > 1 && axis != 1 && axis != -1)
        || attr_i(dw, "block_size").unwrap_or(0) != 0
    {
        return None;
    }
    let scales: Vec<f32> = floats_of(sw.t)?.iter().map(|s| sx * s).collect();
    let w_zero = dw.input.get(2).filter(|z| !z.is_empty());
    let site = Site {
        a_zero: x_zero,
        scales: Some(scales),
        ..Site::new(x, w, w_zero)
    };
    integer_plan(g, ix, i, packs, site)
}

/// The geometry of a Conv / ConvInteger with one group over a weight of dims `w` (`[M, C, KH(, KW)]`).
fn conv_geometry(node: &NodeProto, w: &[i64]) -> Option<Geometry> {
    if attr_i(node, "group").unwrap_or(1) != 1 || !(3..=4).contains(&w.len()) {
        return None;
    }
    if attr_ints(node, "kernel_shape").is_some_and(|k| k != &w[2..]) {
        return None;
    }
    let auto_pad = AutoPad::parse(attr_s(node, "auto_pad").unwrap_or(""))?;
    Geometry::new(
        usize::try_from(w[1]).ok()?,
        &w[2..],
        attr_ints(node, "strides"),
        attr_ints(node, "dilations"),
        attr_ints(node, "pads"),
        auto_pad,
    )
}

/// `Conv(X, W[, bias])` over an 8-bit constant weight, one group: with X from a DequantizeLinear of
/// one constant scale and 8-bit zero point, the static QDQ form as an exact integer product (on VNNI);
/// with f32 X, [`plan_float_conv`].
fn plan_conv(g: &pb::GraphProto, ix: &Index, i: usize, packs: &mut Packs) -> Option<Plan> {
    let node = &g.node[i];
    let (x, w) = (node.input.first()?, node.input.get(1)?);
    let wt = int8_weight(g, ix, weight_value(g, ix, w), ScaleAxis::Channels)?;
    let geo = conv_geometry(node, wt.dims)?;
    if ix.made_by(g, x, "DequantizeLinear").is_none() {
        return plan_float_conv(g, ix, i, &wt, geo, packs);
    }
    if wt.zero.is_some() && !wt.zero_is_code {
        return None;
    }
    let (q, w_zero) = (wt.q, wt.zero);
    let w_scales = floats_of(ix.konst(wt.scale)?.t)?;
    let conv = Some(geo);
    let bias = node.input.get(2).filter(|b| !b.is_empty());
    // The float alternative computes the same to float rounding: tract's f32 convolution over the
    // weight it folds at load. Without VNNI an 8-bit product is no faster than an f32 one (two
    // products per lane, as the FMA), and the im2col rows cost on top: PP-OCR det (256×256, w8a8
    // written as QLinearConv) ran 2.3× fp32 on this kernel against 1.2× in float, on AVX2.
    if !kernels::integer::IntIsa::detect().int8_outruns_f32() {
        return None;
    }
    if let Some(d) = ix.made_by(g, x, "DequantizeLinear") {
        let dx = &g.node[d];
        let sx = ix.konst(dx.input.get(1)?)?;
        let x_zero = dx.input.get(2).filter(|z| !z.is_empty());
        let zx = ix.konst(x_zero?)?;
        if sx.t.data_type != FLOAT
            || sx.len() != 1
            || !(zx.is(UINT8, None) || zx.is(INT8, None))
            || zx.len() != 1
            || attr_i(dx, "block_size").unwrap_or(0) != 0
        {
            return None;
        }
        let sx = floats_of(sx.t)?[0];
        let site = Site {
            a_zero: x_zero,
            scales: Some(w_scales.iter().map(|s| sx * s).collect()),
            conv,
            bias,
            ..Site::new(dx.input.first()?, q, w_zero)
        };
        return integer_plan(g, ix, i, packs, site);
    }
    None
}

/// A weight-only `Conv(X, W[, bias])` (f32 X) over an 8-bit constant weight, one group, and a constant
/// bias: an f32 product over quench's im2col rows, the weight decoded a panel at a time
/// ([`QMatMul`]'s int8 form with a `conv` geometry). The codes are re-laid here as `B[K, M]`, K in
/// im2col's order of columns, into a new initializer that replaces the file's (unless something
/// else reads it). Not in limbs: a thin convolution (24–256 output channels) spends more on
/// splitting each row than the integer product saves (ddddocr at batch 8 ran 1.09× fp32 so).
fn plan_float_conv(
    g: &pb::GraphProto,
    ix: &Index,
    i: usize,
    wt: &Int8Weight,
    geo: Geometry,
    packs: &mut Packs,
) -> Option<Plan> {
    let mut decode = vec![wt.scale.to_string()];
    decode.extend(wt.zero.cloned());
    float_conv_plan(g, ix, i, wt.q, decode, geo, packs)
}

/// A `Conv` over an f32 weight that [`fold`] decoded once from a codebook lookup: the same f32
/// product over im2col rows as [`plan_float_conv`], over the decoded weight re-laid `[K, M]` (which
/// replaces it), instead of tract's convolution over it and its packed copy.
fn plan_decoded_conv(
    g: &pb::GraphProto,
    ix: &Index,
    i: usize,
    decoded: &std::collections::HashSet<String>,
    packs: &mut Packs,
) -> Option<Plan> {
    let node = &g.node[i];
    let plain = node.domain.is_empty() || node.domain == "ai.onnx";
    let w = node
        .input
        .get(1)
        .filter(|w| plain && decoded.contains(*w))?;
    let dims = &ix.konst(w).filter(|k| k.t.data_type == FLOAT)?.t.dims;
    let geo = conv_geometry(node, dims)?;
    float_conv_plan(g, ix, i, w, Vec::new(), geo, packs)
}

/// The plan of a weight-only convolution over the constant `w[M, C, KH(, KW)]` (8-bit codes, decoded
/// by the constants `decode` (scale, then zero point); or f32, with none): `w` re-laid as
/// `B[K, M]`, K in im2col's order of columns, into a new initializer that replaces it (unless
/// something else reads it).
fn float_conv_plan(
    g: &pb::GraphProto,
    ix: &Index,
    i: usize,
    w: &str,
    decode: Vec<String>,
    geo: Geometry,
    packs: &mut Packs,
) -> Option<Plan> {
    let node = &g.node[i];
    let x = node.input.first().filter(|x| !x.is_empty())?;
    let bias = node.input.get(2).filter(|b| !b.is_empty());
    if let Some(b) = bias {
        ix.konst(b).filter(|b| b.is(FLOAT, Some(1)))?;
    }
    let wk = ix.konst(w)?;
    let (form, width) = match wk.t.data_type {
        INT8 | UINT8 => ("int8", 1),
        FLOAT => ("f32", 4),
        _ => return None,
    };
    let m = *wk.t.dims.first()?;
    let k = wk.len() / m.max(1);
    if m <= 0 || k as usize != geo.k() {
        return None;
    }
    let key = (w.to_string(), "conv_kn".to_string());
    let relaid = match packs.by_source.get(&key) {
        Some((name, _)) => name.clone(),
        None => {
            let (ku, mu) = (k as usize, m as usize);
            let mut raw = std::borrow::Cow::Borrowed(&wk.t.raw_data[..]);
            if raw.len() != ku * mu * width || wk.t.data_location == Some(1) {
                raw = match width {
                    1 => std::borrow::Cow::Owned(bytes_of(wk.t)?),
                    _ => floats_of(wk.t)?
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                };
            }
            // W[M, (c, i, j)] as B[(i, j, c), M], `width` bytes a value.
            let mut relaid = vec![0u8; ku * mu * width];
            for (t, v) in relaid.chunks_exact_mut(width).enumerate() {
                let at = ((t % mu) * ku + geo.weight_index(t / mu)) * width;
                v.copy_from_slice(&raw[at..at + width]);
            }
            let name = format!("{w}::quench_conv_kn");
            packs.made.push(pb::TensorProto {
                name: name.clone(),
                data_type: wk.t.data_type,
                dims: vec![k, m],
                raw_data: relaid,
                ..Default::default()
            });
            packs.replaced.insert(w.to_string());
            packs.by_source.insert(key, (name.clone(), None));
            name
        }
    };
    let mut inputs = vec![x.clone(), relaid];
    inputs.extend(decode);
    inputs.extend(bias.cloned());
    Some(Plan {
        node: i,
        inputs,
        attrs: vec![
            str_attr("form", form),
            int_attr("K", k),
            int_attr("N", m),
            ints_attr("conv", geometry_attr(&geo)),
            int_attr("bias", bias.is_some() as i64),
        ],
        kind: Kind::FloatConv,
        absorbed: Vec::new(),
    })
}

/// `ConvInteger(x, w[, x₀[, w₀]])` with `w` an 8-bit constant, one group.
fn plan_conv_integer(g: &pb::GraphProto, ix: &Index, i: usize, packs: &mut Packs) -> Option<Plan> {
    let node = &g.node[i];
    let a = node.input.first().filter(|a| !a.is_empty())?;
    let w = weight_value(g, ix, node.input.get(1)?);
    let geo = conv_geometry(node, &ix.konst(w)?.t.dims)?;
    let m = *ix.konst(w)?.t.dims.first()?;
    let tail = epilogue(g, ix, i, a, m, Some(geo.rank));
    let site = Site {
        a_zero: node.input.get(2).filter(|z| !z.is_empty()),
        conv: Some(geo),
        ..Site::new(a, w, node.input.get(3).filter(|z| !z.is_empty())).with_epilogue(tail)
    };
    integer_plan(g, ix, i, packs, site)
}

/// The values of a float constant.
fn floats_of(t: &pb::TensorProto) -> Option<Vec<f32>> {
    let len: i64 = t.dims.iter().product();
    if t.data_type != FLOAT || t.data_location == Some(1) {
        return None;
    }
    let v: Vec<f32> = if !t.float_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    (v.len() as i64 == len).then_some(v)
}

/// What a `QuenchMatMulInteger` reads: activations `a` (zero point `a_zero`), weight `b` (a constant
/// 8-bit `[K, N]`, or `[M, C, KH(, KW)]` for a convolution, zero point `b_zero`), and, for a float
/// result, the scale of each column (and a bias, for a convolution).
struct Site<'a> {
    a: &'a str,
    a_zero: Option<&'a String>,
    b: &'a str,
    b_zero: Option<&'a String>,
    scales: Option<Vec<f32>>,
    /// A runtime scalar the column scales are multiplied by first (A's dynamic scale).
    a_scale: Option<&'a String>,
    conv: Option<Geometry>,
    bias: Option<&'a String>,
    /// The epilogue's nodes the operator takes over (see [`Plan::absorbed`]).
    absorbed: Vec<usize>,
}

impl<'a> Site<'a> {
    fn new(a: &'a str, b: &'a str, b_zero: Option<&'a String>) -> Site<'a> {
        Site {
            a,
            a_zero: None,
            b,
            b_zero,
            scales: None,
            a_scale: None,
            conv: None,
            bias: None,
            absorbed: Vec::new(),
        }
    }

    /// The site with an [`Epilogue`]'s scales, bias and nodes taken into the product.
    fn with_epilogue(self, tail: Option<Epilogue<'a>>) -> Site<'a> {
        match tail {
            None => self,
            Some(t) => Site {
                scales: Some(t.scales),
                a_scale: t.a_scale,
                bias: t.bias,
                absorbed: t.absorbed,
                ..self
            },
        }
    }
}

/// The `QuenchMatMulInteger` plan for node `i` over `site`.
fn integer_plan(
    g: &pb::GraphProto,
    ix: &Index,
    i: usize,
    packs: &mut Packs,
    site: Site,
) -> Option<Plan> {
    let Site {
        a,
        a_zero,
        b,
        b_zero,
        scales,
        a_scale,
        conv,
        bias,
        absorbed,
    } = site;
    let rank = if conv.is_some() { None } else { Some(2) };
    let bk = ix
        .konst(b)
        .filter(|q| q.is(INT8, rank) || q.is(UINT8, rank))?;
    let (k, n) = match &conv {
        // W[M, C, KH, KW] is B[C·KH·KW, M] transposed.
        Some(_) => {
            let m = bk.t.dims[0];
            (bk.len() / m.max(1), m)
        }
        None => (bk.t.dims[0], bk.t.dims[1]),
    };
    if let Some(geo) = &conv
        && (k as usize != geo.k() || bk.t.dims.get(1) != Some(&(geo.channels as i64)))
    {
        return None;
    }
    if let Some(z) = a_zero {
        match ix.konst(z) {
            Some(zk) if zk.len() == 1 => {}
            Some(_) => return None,
            None => {
                let d = ix.made_by(g, z, "DynamicQuantizeLinear")?;
                if g.node[d].output.get(2) != Some(z) {
                    return None;
                }
            }
        }
    }
    let b_zero_values: Option<Vec<u8>> = match b_zero {
        None => None,
        Some(z) => {
            let zk = ix.konst(z)?;
            if zk.t.data_type != bk.t.data_type || !(zk.len() == 1 || zk.len() == n) {
                return None;
            }
            Some(bytes_of(zk.t)?)
        }
    };
    let layout = kernels::integer::IntIsa::detect().layout();
    let key = (b.to_string(), b_zero.cloned().unwrap_or_default());
    let (packed, zero) = match packs.by_source.get(&key) {
        Some(names) => names.clone(),
        None => {
            // The codes are read in place where the file stores them raw: a copy of a large weight
            // (an 8210-column head) would add to the load's peak memory, beside the packed one.
            let (ku, nu) = (k as usize, n as usize);
            let mut raw = std::borrow::Cow::Borrowed(&bk.t.raw_data[..]);
            if raw.len() != ku * nu || bk.t.data_location == Some(1) {
                raw = std::borrow::Cow::Owned(bytes_of(bk.t)?);
            }
            if let Some(geo) = &conv {
                // W[M, (c, i, j)] as B[(i, j, c), M], im2col's order of columns.
                raw = (0..ku * nu)
                    .map(|t| raw[(t % nu) * ku + geo.weight_index(t / nu)])
                    .collect();
            }
            let (w, shift) = if bk.t.data_type == INT8 {
                // SAFETY: i8 and u8 have the same size and alignment, and every byte is a valid i8.
                let v: &[i8] =
                    unsafe { std::slice::from_raw_parts(raw.as_ptr().cast(), raw.len()) };
                (kernels::integer::pack(Weight::I8(v), ku, nu, layout), 0)
            } else {
                let w = Weight::U8(&raw);
                (kernels::integer::pack(w, ku, nu, layout), w.shift())
            };
            drop(raw);
            let tag = format!("{}x{}", layout.nr, layout.group);
            let packed = format!("{b}::quench_packed_{tag}");
            let len = w.len() as i64;
            packs.made.push(pb::TensorProto {
                name: packed.clone(),
                data_type: INT8,
                dims: vec![len],
                // In place: the same allocation, read as bytes.
                raw_data: w.into_iter().map(|x| x as u8).collect(),
                ..Default::default()
            });
            // The zero point in the packed (i8) domain: u8 weights moved by −128, and so does theirs.
            let zeros: Vec<i32> = match &b_zero_values {
                Some(z) if bk.t.data_type == INT8 => z.iter().map(|&v| v as i8 as i32).collect(),
                Some(z) => z.iter().map(|&v| v as i32 + shift).collect(),
                None if shift != 0 => vec![shift],
                None => vec![],
            };
            let zero = (!zeros.is_empty()).then(|| {
                let name = format!("{packed}::zero");
                packs.made.push(pb::TensorProto {
                    name: name.clone(),
                    data_type: INT32,
                    dims: vec![zeros.len() as i64],
                    raw_data: zeros.iter().flat_map(|z| z.to_le_bytes()).collect(),
                    ..Default::default()
                });
                name
            });
            packs.replaced.insert(b.to_string());
            packs.by_source.insert(key, (packed.clone(), zero.clone()));
            (packed, zero)
        }
    };
    let mut inputs = vec![a.to_string()];
    inputs.extend(a_zero.cloned());
    inputs.push(packed);
    inputs.extend(zero.clone());
    let scaled = scales.is_some();
    let mut attrs = vec![];
    if let Some(geo) = &conv {
        attrs.push(ints_attr("conv", geometry_attr(geo)));
    }
    attrs.push(int_attr("bias", bias.is_some() as i64));
    if let Some(scales) = scales {
        let name = format!("{b}::quench_scale::{i}");
        packs.made.push(pb::TensorProto {
            name: name.clone(),
            data_type: FLOAT,
            dims: vec![scales.len() as i64],
            raw_data: scales.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        inputs.push(name);
    }
    inputs.extend(a_scale.cloned());
    inputs.extend(bias.cloned());
    // A MatMulInteger whose epilogue the operator took is still a MatMulInteger, not a QDQ MatMul.
    let kind = match (&conv, scaled && absorbed.is_empty()) {
        (Some(_), _) => Kind::Conv,
        (None, true) => Kind::Qdq,
        (None, false) => Kind::Integer,
    };
    attrs.extend([
        int_attr("K", k),
        int_attr("N", n),
        int_attr("nr", layout.nr as i64),
        int_attr("group", layout.group as i64),
        int_attr("a_zero", a_zero.is_some() as i64),
        int_attr("b_zero", zero.is_some() as i64),
        int_attr("scaled", scaled as i64),
        int_attr("a_scale", a_scale.is_some() as i64),
    ]);
    Some(Plan {
        node: i,
        inputs,
        attrs,
        kind,
        absorbed,
    })
}

fn build_integer(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let layout = Layout {
        nr: node.get_attr("nr")?,
        group: node.get_attr("group")?,
    };
    let a_zero: i64 = node.get_attr("a_zero")?;
    let b_zero: i64 = node.get_attr("b_zero")?;
    let scaled: i64 = node.get_attr_opt("scaled")?.unwrap_or(0);
    let conv = match node.get_attr_opt_vec::<i64>("conv")? {
        None => None,
        Some(v) => Some(geometry_of(&v).with_context(|| format!("{}: conv {v:?}", node.name))?),
    };
    let bias: i64 = node.get_attr_opt("bias")?.unwrap_or(0);
    let a_scale: i64 = node.get_attr_opt("a_scale")?.unwrap_or(0);
    Ok((
        expand(IntegerExpansion {
            conv,
            bias: bias != 0,
            a_scale: a_scale != 0,
            k: node.get_attr("K")?,
            n: node.get_attr("N")?,
            layout,
            a_zero: a_zero != 0,
            b_zero: b_zero != 0,
            scaled: scaled != 0,
        }),
        vec![],
    ))
}

/// A convolution's geometry as the `conv` attribute: rank, channels, auto_pad, then kernel, strides,
/// dilations (two each) and pads (four).
fn geometry_attr(geo: &Geometry) -> Vec<i64> {
    let mut v = vec![geo.rank as i64, geo.channels as i64, geo.auto_pad.code()];
    for x in geo
        .kernel
        .iter()
        .chain(&geo.strides)
        .chain(&geo.dilations)
        .chain(&geo.pads)
    {
        v.push(*x as i64);
    }
    v
}

/// The geometry a plan wrote in the `conv` attribute ([`geometry_attr`]).
fn geometry_of(v: &[i64]) -> Option<Geometry> {
    if v.len() != 13 || v.iter().any(|&x| x < 0) {
        return None;
    }
    let two = |i: usize| [v[i] as usize, v[i + 1] as usize];
    let geo = Geometry {
        rank: v[0] as usize,
        channels: v[1] as usize,
        auto_pad: AutoPad::from_code(v[2])?,
        kernel: two(3),
        strides: two(5),
        dilations: two(7),
        pads: [v[9], v[10], v[11], v[12]].map(|x| x as usize),
    };
    let ok = (1..=2).contains(&geo.rank)
        && geo
            .kernel
            .iter()
            .chain(&geo.strides)
            .chain(&geo.dilations)
            .all(|&x| x >= 1);
    ok.then_some(geo)
}

/// The output shape of a convolution over an input of `shape` `[N, C, spatial…]`.
fn conv_output_shape(
    geo: &Geometry,
    shape: &[TDim],
    m: usize,
    op: &str,
) -> TractResult<TVec<TDim>> {
    ensure!(
        shape.len() == geo.rank + 2,
        "{op}: a convolution of {} spatial axes over an input of rank {}",
        geo.rank,
        shape.len()
    );
    let mut out: TVec<TDim> = tvec![shape[0].clone(), m.to_dim()];
    for (ax, d) in shape[2..].iter().enumerate() {
        out.push(match d.to_i64() {
            Ok(len) => geo
                .out_len(ax, len as usize)
                .with_context(|| format!("{op}: the kernel does not fit an extent of {len}"))?
                .to_dim(),
            Err(_) => match geo.auto_pad {
                AutoPad::SameUpper | AutoPad::SameLower => {
                    d.clone().div_ceil(geo.strides[ax] as u64)
                }
                _ => {
                    let pads = if geo.auto_pad == AutoPad::Valid {
                        0
                    } else {
                        geo.pads[ax] + geo.pads[ax + 2]
                    };
                    (d.clone() + pads as i64 - geo.span(ax) as i64) / geo.strides[ax] as u64 + 1
                }
            },
        });
    }
    Ok(out)
}

/// Shape rules of a convolution of `m` output channels over an `[N, C, spatial…]` input.
fn conv_becomes<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    geo: Geometry,
    m: usize,
    op: &'static str,
) -> InferenceResult {
    s.equals(&inputs[0].rank, geo.rank as i64 + 2)?;
    s.equals(&outputs[0].rank, geo.rank as i64 + 2)?;
    s.given(&inputs[0].shape, move |s, shape| {
        s.equals(&outputs[0].shape, conv_output_shape(&geo, &shape, m, op)?)
    })
}

/// The inference-time face of `QuenchMatMulInteger`; inputs: A, [a₀], packed B, [b₀ as i32],
/// [column scales: the result is then f32, not i32], [A's scale, a runtime scalar the column scales
/// are multiplied by], [bias, added to a float result].
#[derive(Clone, Debug)]
struct IntegerExpansion {
    conv: Option<Geometry>,
    bias: bool,
    a_scale: bool,
    k: usize,
    n: usize,
    layout: Layout,
    a_zero: bool,
    b_zero: bool,
    scaled: bool,
}

impl Expansion for IntegerExpansion {
    fn name(&self) -> StaticName {
        OP_INT.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(
            inputs,
            2 + self.a_zero as usize
                + self.b_zero as usize
                + self.scaled as usize
                + self.a_scale as usize
                + self.bias as usize,
        )?;
        check_output_arity(outputs, 1)?;
        let dt = if self.scaled {
            f32::datum_type()
        } else {
            i32::datum_type()
        };
        s.equals(&outputs[0].datum_type, dt)?;
        match self.conv.clone() {
            None => last_axis_becomes(s, inputs, outputs, self.n),
            Some(geo) => conv_becomes(s, inputs, outputs, geo, self.n, OP_INT),
        }
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let konst = |i: usize| constant_input(model, prefix, inputs, i);
        let pi = 1 + self.a_zero as usize;
        let packed = konst(pi)?;
        let scales = if self.scaled {
            let t = konst(pi + 1 + self.b_zero as usize)?;
            ensure!(
                t.datum_type() == f32::datum_type() && (t.len() == 1 || t.len() == self.n),
                "{prefix}: column scales: {} values of {:?}",
                t.len(),
                t.datum_type()
            );
            Some(t)
        } else {
            None
        };
        let b_zero = if self.b_zero {
            let z = konst(pi + 1)?;
            ensure!(
                z.datum_type() == i32::datum_type() && (z.len() == 1 || z.len() == self.n),
                "{prefix}: zero point of the weight: {} values of {:?}",
                z.len(),
                z.datum_type()
            );
            Some(z)
        } else {
            None
        };
        let isa = IntIsa::for_layout(self.layout).with_context(|| {
            format!(
                "{prefix}: no integer kernel of this CPU reads panels of {} × groups of {}",
                self.layout.nr, self.layout.group
            )
        })?;
        let sums = {
            let ram = packed.try_as_plain_ram()?;
            let b = Packed {
                data: ram.as_slice::<i8>()?,
                k: self.k,
                n: self.n,
                layout: self.layout,
            };
            // Fails at load, not at the first run, when the constant does not fit.
            b.check().map_err(|e| anyhow!("{prefix}: {e}"))?;
            Arc::new(b.column_sums())
        };
        ensure!(
            !(self.bias || self.a_scale) || self.scaled,
            "{prefix}: a bias or A's scale needs column scales"
        );
        if let Some(geo) = &self.conv {
            ensure!(
                geo.k() == self.k,
                "{prefix}: conv geometry for K {}",
                self.k
            );
        }
        let op = QMatMulInteger {
            k: self.k,
            n: self.n,
            layout: self.layout,
            isa,
            packed,
            sums,
            b_zero,
            scales,
            a_zero: self.a_zero,
            conv: self.conv.clone(),
            bias: self.bias,
            a_scale: self.a_scale,
        };
        let mut wired: TVec<OutletId> = inputs[..pi].iter().copied().collect();
        if self.a_scale {
            wired.push(inputs[inputs.len() - 1 - self.bias as usize]);
        }
        if self.bias {
            wired.push(*inputs.last().unwrap());
        }
        model.wire_node(prefix, op, &wired)
    }
}

/// `Y[.., N] = (A[.., K] − a₀) · (B − b₀)` in i32, over B packed for the integer kernels.
#[derive(Clone, Debug)]
pub struct QMatMulInteger {
    k: usize,
    n: usize,
    layout: Layout,
    isa: IntIsa,
    packed: Arc<Tensor>,
    sums: Arc<Vec<i32>>,
    b_zero: Option<Arc<Tensor>>,
    /// Column scales of an f32 result (the QDQ form); none for MatMulInteger's i32.
    scales: Option<Arc<Tensor>>,
    /// Whether input 1 is A's zero point.
    a_zero: bool,
    /// A convolution over im2col rows of an `[N, C, spatial…]` input, not a product over its last axis.
    conv: Option<Geometry>,
    /// Whether the last input is a bias (one value per output channel) added to a float result.
    bias: bool,
    /// Whether the input after A (and its zero point) is a scalar the column scales are multiplied
    /// by at each run: A's scale from a DynamicQuantizeLinear.
    a_scale: bool,
}

impl PartialEq for QMatMulInteger {
    fn eq(&self, other: &Self) -> bool {
        self.k == other.k
            && self.n == other.n
            && self.layout == other.layout
            && Arc::ptr_eq(&self.packed, &other.packed)
            && same(&self.b_zero, &other.b_zero)
            && same(&self.scales, &other.scales)
            && self.a_zero == other.a_zero
            && self.conv == other.conv
            && self.bias == other.bias
            && self.a_scale == other.a_scale
    }
}
impl Eq for QMatMulInteger {}

fn same(a: &Option<Arc<Tensor>>, b: &Option<Arc<Tensor>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl Op for QMatMulInteger {
    fn name(&self) -> StaticName {
        OP_INT.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}×{}, {} weight bytes, {} kernels",
            self.k,
            self.n,
            self.packed.len(),
            self.isa.name()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QMatMulInteger {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        kernels::zero_upper();
        let a0: i32 = if self.a_zero {
            let z = &inputs[1];
            ensure!(
                z.len() == 1,
                "{OP_INT}: zero point of A has {} values",
                z.len()
            );
            let ram = z.try_as_plain_ram()?;
            match z.datum_type() {
                DatumType::U8 => ram.as_slice::<u8>()?[0] as i32,
                DatumType::I8 => ram.as_slice::<i8>()?[0] as i32,
                dt => bail!("{OP_INT}: zero point of A of type {dt:?}"),
            }
        } else {
            0
        };
        let factor = if self.a_scale {
            let t = &inputs[1 + self.a_zero as usize];
            ensure!(
                t.len() == 1 && t.datum_type() == DatumType::F32,
                "{OP_INT}: A's scale: {} values of {:?}",
                t.len(),
                t.datum_type()
            );
            Some(t.try_as_plain_ram()?.as_slice::<f32>()?[0])
        } else {
            None
        };
        let bias = match self.bias {
            true => {
                let b = inputs.last().unwrap();
                ensure!(
                    b.len() == self.n,
                    "{OP_INT}: bias of {} values for {} channels",
                    b.len(),
                    self.n
                );
                let b = b.cast_to::<f32>()?;
                Some(b.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
            }
            false => None,
        };
        let Some(geo) = &self.conv else {
            let y = self.product(&inputs[0], a0, factor, bias.as_deref())?;
            return Ok(tvec![y.into_tvalue()]);
        };
        // Image by image, so that the rows of one stay in cache while the product reads them.
        let x = &inputs[0];
        let batch = x.shape().first().copied().unwrap_or(0);
        let mut out: Option<Tensor> = None;
        for b in 0..batch.max(1) {
            let image = if batch > 1 {
                std::borrow::Cow::Owned(x.slice(0, b, b + 1)?)
            } else {
                std::borrow::Cow::Borrowed(&**x)
            };
            let (cols, [n, oh, ow]) = conv_rows(geo, &image, a0, OP_INT)?;
            let y = self.product(&cols, a0, factor, bias.as_deref())?;
            drop(cols);
            let out = match &mut out {
                Some(o) => o,
                None => {
                    let shape = geo_output_shape(geo, batch, self.n, oh, ow);
                    out.insert(Tensor::zero_dt(y.datum_type(), &shape)?)
                }
            };
            // [OH·OW, M] → [M, OH(, OW)] for each image.
            let (plane, len) = (oh * ow, n * oh * ow * self.n);
            if len == 0 {
                continue;
            }
            let y_ram = y.try_as_plain_ram()?;
            let mut o_ram = out.try_as_plain_ram_mut()?;
            let at = b * len..(b + 1) * len;
            match y.datum_type() {
                DatumType::F32 => channels_first(
                    y_ram.as_slice::<f32>()?,
                    &mut o_ram.as_slice_mut::<f32>()?[at],
                    plane,
                    self.n,
                ),
                _ => channels_first(
                    y_ram.as_slice::<i32>()?,
                    &mut o_ram.as_slice_mut::<i32>()?[at],
                    plane,
                    self.n,
                ),
            }
        }
        let out = out.context("no output")?;
        Ok(tvec![out.into_tvalue()])
    }
}

/// The extents of a convolution over an input `[N, C, H(, W)]`: its batch, spatial extents (`W` is 1
/// for one spatial axis) and output extents.
struct ConvExtent {
    batch: usize,
    hw: [usize; 2],
    oh: usize,
    ow: usize,
}

impl ConvExtent {
    fn of(geo: &Geometry, shape: &[usize], op: &str) -> TractResult<ConvExtent> {
        ensure!(
            shape.len() == geo.rank + 2 && shape[1] == geo.channels,
            "{op}: input of shape {shape:?} for a convolution over {} channels",
            geo.channels
        );
        let (batch, hw) = (shape[0], [shape[2], shape.get(3).copied().unwrap_or(1)]);
        let fits = |ax: usize| geo.out_len(ax, hw[ax]);
        let (Some(oh), Some(ow)) = (fits(0), fits(1)) else {
            bail!("{op}: the kernel does not fit an input of shape {shape:?}");
        };
        Ok(ConvExtent { batch, hw, oh, ow })
    }
}

/// `[N, M, OH(, OW)]`: a convolution's output shape, with the input's number of spatial axes.
fn geo_output_shape(geo: &Geometry, batch: usize, m: usize, oh: usize, ow: usize) -> TVec<usize> {
    let mut shape: TVec<usize> = tvec![batch, m, oh];
    if geo.rank == 2 {
        shape.push(ow);
    }
    shape
}

/// The im2col rows `[N·OH·OW, K]` of a convolution's input `x[N, C, spatial…]` (f32, u8 or i8;
/// padding is `pad`, a real 0 in the quantized domain), and `[N, OH, OW]`.
fn conv_rows(geo: &Geometry, x: &Tensor, pad: i32, op: &str) -> TractResult<(Tensor, [usize; 3])> {
    let ConvExtent { batch, hw, oh, ow } = ConvExtent::of(geo, x.shape(), op)?;
    let rows = [batch * oh * ow, geo.k()];
    let ram = x.try_as_plain_ram()?;
    let cols = match x.datum_type() {
        DatumType::F32 => {
            let c = geo.im2col(ram.as_slice::<f32>()?, batch, hw, 0.0).unwrap();
            Tensor::from_shape(&rows, &c)?
        }
        DatumType::U8 => {
            let c = geo
                .im2col(ram.as_slice::<u8>()?, batch, hw, pad as u8)
                .unwrap();
            Tensor::from_shape(&rows, &c)?
        }
        DatumType::I8 => {
            let c = geo
                .im2col(ram.as_slice::<i8>()?, batch, hw, pad as i8)
                .unwrap();
            Tensor::from_shape(&rows, &c)?
        }
        dt => bail!("{op} takes f32, u8 or i8 input, not {dt:?}"),
    };
    Ok((cols, [batch, oh, ow]))
}

/// `y[.., n] += bias` per column, for an f32 result in limbs (nothing without a bias).
fn add_bias(y: &mut Tensor, bias: Option<&[f32]>, n: usize) -> TractResult<()> {
    let Some(bias) = bias else {
        return Ok(());
    };
    let mut ram = y.try_as_plain_ram_mut()?;
    for row in ram.as_slice_mut::<f32>()?.chunks_exact_mut(n) {
        row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
    }
    Ok(())
}

/// Rows `[plane, n]` of each image to its `n` planes.
fn channels_first<T: Copy>(y: &[T], out: &mut [T], plane: usize, n: usize) {
    for (image, planes) in y
        .chunks_exact(plane * n)
        .zip(out.chunks_exact_mut(plane * n))
    {
        kernels::conv::transpose(image, plane, n, planes);
    }
}

impl QMatMulInteger {
    /// Calls `f` with the packed weight and its zero points (as packed, i32; empty for none).
    fn with_weight<R>(&self, f: impl FnOnce(&Packed, &[i32]) -> TractResult<R>) -> TractResult<R> {
        let p_ram = self.packed.try_as_plain_ram()?;
        let b = Packed {
            data: p_ram.as_slice::<i8>()?,
            k: self.k,
            n: self.n,
            layout: self.layout,
        };
        let z_ram = self
            .b_zero
            .as_ref()
            .map(|z| z.try_as_plain_ram())
            .transpose()?;
        let zeros = match &z_ram {
            Some(z) => z.as_slice::<i32>()?,
            None => &[],
        };
        f(&b, zeros)
    }

    /// The product over the last axis of `a` (u8 or i8 with zero point `a0`, or f32 in limbs); with
    /// column scales, times each column's scale (first multiplied by `factor`, if given), then plus
    /// each column's `bias`.
    fn product(
        &self,
        a: &Tensor,
        a0: i32,
        factor: Option<f32>,
        bias: Option<&[f32]>,
    ) -> TractResult<Tensor> {
        let shape = output_shape(a.shape(), self.k, self.n, OP_INT)?;
        let m = a.len() / self.k;
        if a.datum_type() == DatumType::F32 {
            let mut y = self.product_f32(a, m, &shape)?;
            add_bias(&mut y, bias, self.n)?;
            return Ok(y);
        }
        let mut y = Tensor::zero::<i32>(&shape)?;
        {
            let a_ram = a.try_as_plain_ram()?;
            let acts = match a.datum_type() {
                DatumType::U8 => Acts::U8(a_ram.as_slice::<u8>()?),
                DatumType::I8 => Acts::I8(a_ram.as_slice::<i8>()?),
                dt => bail!("{OP_INT} takes u8 or i8 input, not {dt:?}"),
            };
            let mut y_ram = y.try_as_plain_ram_mut()?;
            let c = y_ram.as_slice_mut::<i32>()?;
            self.with_weight(|b, b_zeros| {
                let zeros = Zeros {
                    a: a0,
                    b: b_zeros,
                    column_sums: &self.sums,
                };
                kernels::integer::matmul(self.isa, acts, m, b, zeros, c);
                Ok(())
            })?;
        }
        let Some(scales) = &self.scales else {
            return Ok(y);
        };
        // The QDQ form: the exact sums times s_x · s_w of their column.
        let mut f = Tensor::zero::<f32>(&shape)?;
        {
            let s_ram = scales.try_as_plain_ram()?;
            let mut s = std::borrow::Cow::Borrowed(s_ram.as_slice::<f32>()?);
            if let Some(f) = factor {
                s = s.iter().map(|&c| f * c).collect();
            }
            let y_ram = y.try_as_plain_ram()?;
            let mut f_ram = f.try_as_plain_ram_mut()?;
            let out = f_ram.as_slice_mut::<f32>()?;
            for (o, v) in out
                .chunks_exact_mut(self.n)
                .zip(y_ram.as_slice::<i32>()?.chunks_exact(self.n))
            {
                if s.len() == 1 {
                    o.iter_mut().zip(v).for_each(|(o, &v)| *o = v as f32 * s[0]);
                } else {
                    o.iter_mut()
                        .zip(v)
                        .zip(s.iter())
                        .for_each(|((o, &v), &s)| *o = v as f32 * s);
                }
                if let Some(bias) = bias {
                    o.iter_mut().zip(bias).for_each(|(o, &b)| *o += b);
                }
            }
        }
        Ok(f)
    }

    /// f32 activations (an 8-bit weight-only MatMul): three limbs through the integer kernels.
    fn product_f32(&self, a: &Tensor, m: usize, shape: &[usize]) -> TractResult<Tensor> {
        let scales = self
            .scales
            .as_ref()
            .with_context(|| format!("{OP_INT}: f32 input needs column scales"))?;
        let mut y = Tensor::zero::<f32>(shape)?;
        {
            let a_ram = a.try_as_plain_ram()?;
            let s_ram = scales.try_as_plain_ram()?;
            let mut y_ram = y.try_as_plain_ram_mut()?;
            let (a, scales) = (a_ram.as_slice::<f32>()?, s_ram.as_slice::<f32>()?);
            let c = y_ram.as_slice_mut::<f32>()?;
            self.with_weight(|b, zeros| {
                kernels::integer::matmul_f32(self.isa, a, m, b, zeros, &self.sums, scales, c);
                Ok(())
            })?;
        }
        Ok(y)
    }
}

impl TypedOp for QMatMulInteger {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let a = inputs[0];
        ensure!(
            a.datum_type == u8::datum_type()
                || a.datum_type == i8::datum_type()
                || (a.datum_type == f32::datum_type() && self.scales.is_some()),
            "{OP_INT} takes u8 or i8 input, or f32 with column scales"
        );
        let shape = match &self.conv {
            Some(geo) => {
                let dims: TVec<TDim> = a.shape.iter().cloned().collect();
                conv_output_shape(geo, &dims, self.n, OP_INT)?
            }
            None => output_fact_shape(a, self.n, OP_INT)?,
        };
        Ok(tvec![if self.scales.is_some() {
            f32::fact(shape)
        } else {
            i32::fact(shape)
        }])
    }

    as_op!();
}

/// ONNX `DynamicQuantizeLinear` (f32 → u8, scale, zero point) through
/// [`kernels::integer::dynamic_quantize`].
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct DynamicQuantize;

impl Expansion for DynamicQuantize {
    fn name(&self) -> StaticName {
        "DynamicQuantizeLinear".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(3)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 3)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        s.equals(&outputs[0].datum_type, u8::datum_type())?;
        s.equals(&outputs[1].datum_type, f32::datum_type())?;
        s.equals(&outputs[1].rank, 0)?;
        s.equals(&outputs[2].datum_type, u8::datum_type())?;
        s.equals(&outputs[2].rank, 0)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, QDynamicQuantize, &inputs[..1])
    }
}

/// The typed operator of [`DynamicQuantize`].
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct QDynamicQuantize;

impl Op for QDynamicQuantize {
    fn name(&self) -> StaticName {
        "QuenchDynamicQuantizeLinear".into()
    }

    op_as_typed_op!();
}

impl EvalOp for QDynamicQuantize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        kernels::zero_upper();
        let x = &inputs[0];
        let mut y = Tensor::zero::<u8>(x.shape())?;
        let (scale, zero) = {
            let x_ram = x.try_as_plain_ram()?;
            let mut y_ram = y.try_as_plain_ram_mut()?;
            kernels::integer::dynamic_quantize(
                x_ram.as_slice::<f32>()?,
                y_ram.as_slice_mut::<u8>()?,
            )
        };
        Ok(tvec![
            y.into_tvalue(),
            tensor0(scale).into_tvalue(),
            tensor0(zero).into_tvalue()
        ])
    }
}

impl TypedOp for QDynamicQuantize {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "DynamicQuantizeLinear takes f32 input"
        );
        let mut y = inputs[0].without_value();
        y.datum_type = u8::datum_type();
        Ok(tvec![y, f32::scalar_fact(), u8::scalar_fact()])
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::per_channel;

    /// A constant is per channel when it broadcasts along the channel axis only: `[.., M, 1, 1]` for
    /// a 2-D convolution's `[N, M, H, W]` (not `[M]`, which would run along W), `[N]` or one value
    /// for a product over the last axis (nothing of higher rank, which could add axes).
    #[test]
    fn per_channel_constants_broadcast_along_the_channels_only() {
        let conv2 = Some(2);
        assert!(per_channel(&[1, 24, 1, 1], 24, conv2));
        assert!(per_channel(&[24, 1, 1], 24, conv2));
        assert!(per_channel(&[1], 24, conv2));
        assert!(per_channel(&[], 24, conv2));
        assert!(!per_channel(&[24], 24, conv2));
        assert!(!per_channel(&[24, 1], 24, conv2));
        assert!(!per_channel(&[1, 1, 24, 1, 1], 24, conv2));
        assert!(!per_channel(&[1, 24, 1, 2], 24, conv2));
        assert!(per_channel(&[24, 1], 24, Some(1)));
        assert!(per_channel(&[3072], 3072, None));
        assert!(per_channel(&[1], 3072, None));
        assert!(!per_channel(&[1, 3072], 3072, None));
        assert!(!per_channel(&[1024], 3072, None));
    }
}
