//! ONNX `LSTM` over 8-bit weights, run without decoding them to f32.
//!
//! tract folds an LSTM's `Mul(Cast(q), scale)` weights to f32 constants at load, so a recurrent
//! layer's weights are resident at 4 bytes each, beside the 1-byte codes the parsed model keeps.
//! `QuenchLstm` takes an LSTM whose `W` and `R` are 8-bit constants behind that decode (or behind a
//! `DequantizeLinear` without a zero point) and keeps them as 8-bit codes in blocks of 32 columns
//! ([`Int8Blocked`]). It runs the input products of every time step as one product (`T · batch` rows
//! of `X` against `Wᵀ`), then, step by step, the recurrent product (`batch` rows of `H` against `Rᵀ`,
//! which the few-rows kernel decodes into registers) and the cell: tract's own `sigmoid` and `tanh`
//! kernels in ONNX's gate order i, o, f, c, as tract's LSTM does.
//!
//! Taken: standard activations (absent, or written out as Sigmoid, Tanh, Tanh), no `clip`, `input_forget` 0, `layout` 0, no `sequence_lens` and no
//! peepholes; any direction; optional `B`, `initial_h` and `initial_c`. Other LSTMs stay with tract.

use super::*;
use crate::kernels::integer::{self as integer, Packed as PackedView};

pub(super) const OP: &str = "QuenchLstm";

/// The 8-bit codes `q[dirs, rows, ·]` and the scale that `w` decodes: `Mul(Cast(q), scale)` with the
/// scale one value or one per row (`[rows, 1]`, `[1, rows, 1]`, `[dirs, rows, 1]`), or
/// `DequantizeLinear(q, scale)` on axis 1 with one scale or one per row and no zero point.
fn lstm_weight<'g>(
    g: &'g pb::GraphProto,
    ix: &Index<'g>,
    w: &'g str,
    dirs: i64,
    rows: i64,
) -> Option<(&'g str, &'g str)> {
    let codes_ok = |q: &str| {
        ix.konst(q).is_some_and(|k| {
            (k.is(INT8, Some(3)) || k.is(UINT8, Some(3)))
                && k.t.dims[0] == dirs
                && k.t.dims[1] == rows
        })
    };
    let float = |s: &str| ix.konst(s).filter(|k| k.t.data_type == FLOAT);
    if let Some(d) = ix.made_by(g, w, "DequantizeLinear") {
        let dq = &g.node[d];
        let (q, s) = (dq.input.first()?, dq.input.get(1)?);
        let scale = float(s)?;
        let axis = attr_i(dq, "axis").unwrap_or(1);
        let shape_ok = scale.len() == 1 || (scale.t.dims == [rows] && axis == 1);
        let zero = dq.input.get(2).is_some_and(|z| !z.is_empty());
        return (codes_ok(q) && shape_ok && !zero && attr_i(dq, "block_size").unwrap_or(0) == 0)
            .then_some((q.as_str(), s.as_str()));
    }
    let mul = &g.node[ix.made_by(g, w, "Mul")?];
    let (x, s) = match (float(mul.input.first()?), mul.input.get(1)) {
        (None, Some(s)) => (&mul.input[0], s),
        (Some(_), Some(x)) => (x, &mul.input[0]),
        _ => return None,
    };
    let scale = float(s)?;
    let dims = scale.t.dims.as_slice();
    let shape_ok =
        scale.len() == 1 || dims == [rows, 1] || dims == [1, rows, 1] || dims == [dirs, rows, 1];
    let c = &g.node[ix.made_by(g, x, "Cast")?];
    let q = c.input.first()?;
    (attr_i(c, "to") == Some(FLOAT as i64) && codes_ok(q) && shape_ok)
        .then_some((q.as_str(), s.as_str()))
}

/// An `LSTM` node the operator takes (see the module's list), as a `QuenchLstm` over the codes and
/// scales of `W` and `R`, then whichever of `B`, `initial_h`, `initial_c` are given (attribute
/// `optional` says which).
pub(super) fn plan(g: &pb::GraphProto, ix: &Index, i: usize, packs: &mut Packs) -> Option<Plan> {
    let n = &g.node[i];
    if !(n.domain.is_empty() || n.domain == "ai.onnx") {
        return None;
    }
    let direction = attr_s(n, "direction").unwrap_or("forward");
    let dirs = match direction {
        "forward" | "reverse" => 1,
        "bidirectional" => 2,
        _ => return None,
    };
    // The default activations, also when an exporter writes them out.
    let defaults = |a: &AttributeProto| {
        a.strings.len() == 3 * dirs as usize
            && a.strings
                .chunks(3)
                .all(|f| f == [&b"Sigmoid"[..], b"Tanh", b"Tanh"])
    };
    for a in &n.attribute {
        match a.name.as_str() {
            "direction" | "hidden_size" => {}
            "layout" | "input_forget" if a.i == 0 => {}
            "activations" if defaults(a) => {}
            _ => return None,
        }
    }
    let hidden = attr_i(n, "hidden_size").filter(|&h| h > 0)?;
    let input = |j: usize| n.input.get(j).map(String::as_str).filter(|s| !s.is_empty());
    if input(4).is_some()
        || input(7).is_some()
        || n.input.len() > 8
        || n.output.len() > 3
        || n.output.iter().all(|o| o.is_empty())
    {
        return None;
    }
    let x = input(0)?;
    let (wq, ws) = lstm_weight(g, ix, input(1)?, dirs, 4 * hidden)?;
    let (rq, rs) = lstm_weight(g, ix, input(2)?, dirs, 4 * hidden)?;
    if ix.konst(rq)?.t.dims[2] != hidden {
        return None;
    }
    let optional = [input(3), input(5), input(6)];
    let mut attrs = vec![
        int_attr("hidden_size", hidden),
        str_attr("direction", direction),
        ints_attr(
            "optional",
            optional.iter().map(|o| o.is_some() as i64).collect(),
        ),
    ];
    // Where the limbs pay, the codes are packed for the integer kernels here, into the initializers
    // the operator then reads in place: packing them when tract wires the operator would keep a
    // second copy beside the parsed model's.
    let (mut w, mut r) = (wq.to_string(), rq.to_string());
    let isa = IntIsa::detect();
    if isa.limbs_pay() {
        let layout = isa.layout();
        let (wp, wk, wshift) = packed_codes(ix, wq, dirs, 4 * hidden, layout, packs)?;
        let (rp, rk, rshift) = packed_codes(ix, rq, dirs, 4 * hidden, layout, packs)?;
        let [nr, group] = [layout.nr, layout.group].map(|v| v as i64);
        attrs.push(ints_attr("packed", vec![nr, group, wk, wshift, rk, rshift]));
        (w, r) = (wp, rp);
    }
    let mut inputs: Vec<String> = vec![x.into(), w, ws.into(), r, rs.into()];
    inputs.extend(optional.iter().flatten().map(|s| s.to_string()));
    Some(Plan {
        node: i,
        inputs,
        attrs,
        kind: Kind::Lstm,
        absorbed: Vec::new(),
    })
}

/// The codes `q[dirs, rows, K]` as one new initializer: each direction's `qᵀ[K, rows]` packed for
/// the integer kernels of `layout`, one after the other. Returns its name, `K` and the shift of u8
/// codes to i8 (see [`Weight::shift`]).
fn packed_codes(
    ix: &Index,
    q: &str,
    dirs: i64,
    rows: i64,
    layout: Layout,
    packs: &mut Packs,
) -> Option<(String, i64, i64)> {
    let t = ix.konst(q)?.t;
    let k = t.dims[2];
    let shift = if t.data_type == UINT8 { -128 } else { 0 };
    let key = (q.to_string(), "lstm".to_string());
    if let Some((name, _)) = packs.by_source.get(&key) {
        return Some((name.clone(), k, shift));
    }
    let (ku, ru) = (k as usize, rows as usize);
    let mut raw = std::borrow::Cow::Borrowed(&t.raw_data[..]);
    if raw.len() != dirs as usize * ru * ku || t.data_location == Some(1) {
        raw = std::borrow::Cow::Owned(bytes_of(t)?);
    }
    let mut out = Vec::with_capacity(dirs as usize * layout.packed_len(ku, ru));
    let mut transposed = vec![0u8; ru * ku];
    for codes in raw.chunks_exact(ru * ku) {
        kernels::conv::transpose(codes, ru, ku, &mut transposed);
        let w = if t.data_type == INT8 {
            // SAFETY: i8 and u8 have the same size and alignment, and every byte is a valid i8.
            Weight::I8(unsafe { std::slice::from_raw_parts(transposed.as_ptr().cast(), ru * ku) })
        } else {
            Weight::U8(&transposed)
        };
        out.extend(
            integer::pack(w, ku, ru, layout)
                .into_iter()
                .map(|v| v as u8),
        );
    }
    let name = format!("{q}::quench_lstm_{}x{}", layout.nr, layout.group);
    packs.made.push(pb::TensorProto {
        name: name.clone(),
        data_type: INT8,
        dims: vec![out.len() as i64],
        raw_data: out,
        ..Default::default()
    });
    packs.replaced.insert(q.to_string());
    packs.by_source.insert(key, (name.clone(), None));
    Some((name, k, shift))
}

pub(super) fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let hidden: usize = node.get_attr("hidden_size")?;
    let direction: String = node.get_attr("direction")?;
    let optional: Vec<i64> = node.get_attr_vec("optional")?;
    ensure!(
        optional.len() == 3,
        "{OP}: 'optional' names B, initial_h, initial_c"
    );
    let dirs = match direction.as_str() {
        "forward" | "reverse" => 1,
        "bidirectional" => 2,
        other => bail!("{OP}: direction '{other}'"),
    };
    let packed = match node.get_attr_opt_vec::<i64>("packed")? {
        None => None,
        Some(v) => {
            let size = |x: i64| usize::try_from(x).ok().filter(|&x| x > 0);
            let shift = |x: i64| [0, -128].contains(&x).then_some(x as i32);
            let parsed = (v.len() == 6).then_some(()).and_then(|()| {
                Some(PackedAttr {
                    layout: Layout {
                        nr: size(v[0])?,
                        group: size(v[1])?,
                    },
                    k: [size(v[2])?, size(v[4])?],
                    shift: [shift(v[3])?, shift(v[5])?],
                })
            });
            Some(parsed.with_context(|| {
                format!("{OP}: 'packed' {v:?} is not nr, group, then K and shift of W and R")
            })?)
        }
    };
    Ok((
        expand(LstmExpansion {
            hidden,
            dirs,
            packed,
            reverse: direction == "reverse",
            optional: [0, 1, 2].map(|j| optional[j] != 0),
            // tract drops outputs with an empty name: the node has the others, in order.
            produce: [0, 1, 2].map(|j| node.output.get(j).is_some_and(|o| !o.is_empty())),
        }),
        vec![],
    ))
}

/// How a plan packed `W` and `R` (attribute `packed`): the kernels' layout, then each one's `K` and
/// the shift of its codes to i8 (0, or −128 for u8).
#[derive(Clone, Copy, Debug)]
struct PackedAttr {
    layout: Layout,
    k: [usize; 2],
    shift: [i32; 2],
}

#[derive(Clone, Debug)]
struct LstmExpansion {
    hidden: usize,
    dirs: usize,
    /// `W` and `R` packed for the integer kernels by the plan (else they are the codes).
    packed: Option<PackedAttr>,
    reverse: bool,
    /// Whether `B`, `initial_h`, `initial_c` are inputs (in that order, after the weights).
    optional: [bool; 3],
    /// Which of Y, Y_h, Y_c the node has.
    produce: [bool; 3],
}

impl LstmExpansion {
    fn outputs(&self) -> usize {
        self.produce.iter().filter(|&&p| p).count()
    }
}

impl Expansion for LstmExpansion {
    fn name(&self) -> StaticName {
        OP.into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.outputs())
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        let given = self.optional.iter().filter(|&&o| o).count();
        check_input_arity(inputs, 5 + given)?;
        check_output_arity(outputs, self.outputs())?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, 3)?;
        let kinds = (0..3).filter(|&j| self.produce[j]);
        for (j, o) in kinds.zip(outputs) {
            s.equals(&o.datum_type, f32::datum_type())?;
            // Y is [T, dirs, batch, hidden]; Y_h and Y_c are [dirs, batch, hidden].
            let at = usize::from(j == 0);
            s.equals(&o.rank, 3 + at as i64)?;
            if j == 0 {
                s.equals(&o.shape[0], &inputs[0].shape[0])?;
            }
            s.equals(&o.shape[at], self.dirs.to_dim())?;
            s.equals(&o.shape[at + 1], &inputs[0].shape[1])?;
            s.equals(&o.shape[at + 2], self.hidden.to_dim())?;
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let konst = |i: usize| constant_input(model, prefix, inputs, i);
        let (h, d) = (self.hidden, self.dirs);
        let weights = |i: usize, which: usize| -> TractResult<Vec<LstmWeight>> {
            let (codes, scale) = (konst(i)?, konst(i + 1)?);
            match self.packed {
                None => per_direction(&codes, &scale, d, 4 * h),
                Some(p) => shared_limbs(codes, &scale, d, 4 * h, p, which),
            }
            .with_context(|| format!("{prefix}: {}", ["W", "R"][which]))
        };
        let w = weights(1, 0)?;
        let r = weights(3, 1)?;
        ensure!(
            r.iter().all(|r| r.k() == h),
            "{prefix}: R is not [{d}, {}, {h}]",
            4 * h
        );
        let input_size = w[0].k();
        let mut wired = vec![inputs[0]];
        wired.extend_from_slice(&inputs[5..]);
        let op = QLstm {
            hidden: h,
            input_size,
            reverse: self.reverse,
            optional: self.optional,
            produce: self.produce,
            w: w.into_iter().map(Arc::new).collect(),
            r: r.into_iter().map(Arc::new).collect(),
        };
        model.wire_node(prefix, op, &wired)
    }
}

/// The scales of direction `d`'s rows, from one value, one per row shared by the directions, or one
/// per direction and row.
fn scales_of(scale: &Tensor, dirs: usize, rows: usize, d: usize) -> TractResult<Vec<f32>> {
    let ram = scale.try_as_plain_ram()?;
    let scale = ram.as_slice::<f32>()?;
    ensure!(
        [1, rows, dirs * rows].contains(&scale.len()),
        "{} scales for {dirs} × {rows} rows",
        scale.len()
    );
    Ok((0..rows)
        .map(|j| match scale.len() {
            1 => scale[0],
            n if n == rows => scale[j],
            _ => scale[d * rows + j],
        })
        .collect())
}

/// One `[K, rows]` weight per direction from the codes `q[dirs, rows, K]` and their scale, re-laid in
/// blocks of columns for the f32 kernels.
fn per_direction(
    q: &Tensor,
    scale: &Tensor,
    dirs: usize,
    rows: usize,
) -> TractResult<Vec<LstmWeight>> {
    let q_ram = q.try_as_plain_ram()?;
    ensure!(
        q.rank() == 3 && q.shape()[0] == dirs && q.shape()[1] == rows,
        "codes of shape {:?}, not [{dirs}, {rows}, K]",
        q.shape()
    );
    let k = q.shape()[2];
    let mut out = Vec::with_capacity(dirs);
    for d in 0..dirs {
        let scales = scales_of(scale, dirs, rows, d)?;
        // W[d] is [rows, K]; the product reads its transpose, [K, rows].
        fn transposed<T: Copy + Default>(q: &[T], rows: usize, k: usize) -> Vec<T> {
            let mut t = vec![T::default(); q.len()];
            kernels::conv::transpose(q, rows, k, &mut t);
            t
        }
        let span = d * rows * k..(d + 1) * rows * k;
        let (t_i8, t_u8);
        let codes = match q.datum_type() {
            DatumType::I8 => {
                t_i8 = transposed(&q_ram.as_slice::<i8>()?[span], rows, k);
                Codes::I8(&t_i8)
            }
            DatumType::U8 => {
                t_u8 = transposed(&q_ram.as_slice::<u8>()?[span], rows, k);
                Codes::U8(&t_u8)
            }
            dt => bail!("8-bit codes expected, found {dt:?}"),
        };
        let cols = Int8Cols::with_codes(codes, k, rows, &scales, None);
        out.push(LstmWeight::Blocked(Int8Blocked::from_cols(&cols)));
    }
    Ok(out)
}

/// One weight per direction over the codes the plan packed (`which`: 0 for `W`, 1 for `R`), each a
/// view of the same constant.
fn shared_limbs(
    packed: Arc<Tensor>,
    scale: &Tensor,
    dirs: usize,
    rows: usize,
    p: PackedAttr,
    which: usize,
) -> TractResult<Vec<LstmWeight>> {
    let isa = IntIsa::for_layout(p.layout).with_context(|| {
        format!(
            "no integer kernel of this CPU reads panels of {} × groups of {}",
            p.layout.nr, p.layout.group
        )
    })?;
    let k = p.k[which];
    let len = p.layout.packed_len(k, rows);
    ensure!(
        packed.datum_type() == i8::datum_type() && packed.len() == dirs * len,
        "packed codes: {} values of {:?}, not {dirs} × {len}",
        packed.len(),
        packed.datum_type()
    );
    let zeros = match p.shift[which] {
        0 => Vec::new(),
        z => vec![z],
    };
    (0..dirs)
        .map(|d| {
            let mut w = SharedLimbs {
                isa,
                packed: packed.clone(),
                offset: d * len,
                k,
                n: rows,
                zeros: zeros.clone(),
                sums: Vec::new(),
                scales: scales_of(scale, dirs, rows, d)?,
            };
            w.sums = w.with_packed(|b| {
                b.check().map_err(|e| anyhow!("{e}"))?;
                Ok(b.column_sums())
            })?;
            Ok(LstmWeight::Limbs(w))
        })
        .collect()
}

/// `Wᵀ` or `Rᵀ` of one direction: 8-bit codes in blocks of columns, which the f32 kernels decode,
/// or, where the integer kernels outrun those on f32 activations split in three 8-bit limbs (VNNI),
/// packed for them. Either way one byte per weight.
#[derive(Debug)]
pub enum LstmWeight {
    Blocked(Int8Blocked),
    Limbs(SharedLimbs),
}

/// A direction's slice of the codes the plan packed, read in place from the parsed model's constant.
#[derive(Debug)]
pub struct SharedLimbs {
    isa: IntIsa,
    packed: Arc<Tensor>,
    offset: usize,
    k: usize,
    n: usize,
    /// The zero point that undoes the packing's shift of u8 codes (empty for i8 codes).
    zeros: Vec<i32>,
    sums: Vec<i32>,
    scales: Vec<f32>,
}

impl SharedLimbs {
    fn with_packed<R>(&self, f: impl FnOnce(&PackedView) -> TractResult<R>) -> TractResult<R> {
        let ram = self.packed.try_as_plain_ram()?;
        let layout = self.isa.layout();
        let data = &ram.as_slice::<i8>()?[self.offset..][..layout.packed_len(self.k, self.n)];
        f(&PackedView {
            data,
            k: self.k,
            n: self.n,
            layout,
        })
    }
}

impl LstmWeight {
    fn k(&self) -> usize {
        match self {
            LstmWeight::Blocked(w) => w.k(),
            LstmWeight::Limbs(w) => w.k,
        }
    }

    /// Bytes held: for shared codes, their slice of the constant (held once, by the parsed model),
    /// plus the column sums and scales.
    fn bytes(&self) -> usize {
        match self {
            LstmWeight::Blocked(w) => w.bytes(),
            LstmWeight::Limbs(w) => {
                w.isa.layout().packed_len(w.k, w.n)
                    + 4 * (w.sums.len() + w.scales.len() + w.zeros.len())
            }
        }
    }

    /// `c[M, 4H] = a[M, K] · self`.
    fn matmul(&self, a: &[f32], m: usize, c: &mut [f32]) -> TractResult<()> {
        match self {
            LstmWeight::Blocked(w) => kernels::matmul(a, m, w, c),
            LstmWeight::Limbs(w) => w.with_packed(|b| {
                integer::matmul_f32(w.isa, a, m, b, &w.zeros, &w.sums, &w.scales, c);
                Ok(())
            })?,
        }
        Ok(())
    }
}

/// The typed operator: `[X, B?, initial_h?, initial_c?]` → `Y[, Y_h[, Y_c]]`.
#[derive(Clone, Debug)]
pub struct QLstm {
    hidden: usize,
    input_size: usize,
    reverse: bool,
    optional: [bool; 3],
    produce: [bool; 3],
    /// `Wᵀ` and `Rᵀ` of each direction: `[input_size, 4H]` and `[H, 4H]`.
    w: Vec<Arc<LstmWeight>>,
    r: Vec<Arc<LstmWeight>>,
}

impl PartialEq for QLstm {
    fn eq(&self, other: &Self) -> bool {
        self.hidden == other.hidden
            && self.reverse == other.reverse
            && self.optional == other.optional
            && self.produce == other.produce
            && self.w.len() == other.w.len()
            && self.w.iter().zip(&other.w).all(|(a, b)| Arc::ptr_eq(a, b))
            && self.r.iter().zip(&other.r).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}
impl Eq for QLstm {}

impl QLstm {
    fn dirs(&self) -> usize {
        self.w.len()
    }

    /// Bytes of the weights the operator keeps.
    pub fn weight_bytes(&self) -> usize {
        self.w.iter().chain(&self.r).map(|w| w.bytes()).sum()
    }
}

impl Op for QLstm {
    fn name(&self) -> StaticName {
        OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} direction(s), input {}, hidden {}, {} weight bytes",
            self.dirs(),
            self.input_size,
            self.hidden,
            self.weight_bytes()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QLstm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        kernels::zero_upper();
        use tract_linalg::routines::Func;
        let (h, dirs) = (self.hidden, self.dirs());
        let x = &inputs[0];
        ensure!(
            x.rank() == 3 && x.shape()[2] == self.input_size,
            "{OP}: X of shape {:?}, not [T, batch, {}]",
            x.shape(),
            self.input_size
        );
        let (steps, batch) = (x.shape()[0], x.shape()[1]);
        let x_ram = x.try_as_plain_ram()?;
        let x = x_ram.as_slice::<f32>()?;
        // The optional inputs that are there, in order.
        let mut given = inputs[1..].iter();
        let mut next = |on: bool, len: usize, what: &str| -> TractResult<Option<Vec<f32>>> {
            if !on {
                return Ok(None);
            }
            let t = given
                .next()
                .with_context(|| format!("{OP}: {what} missing"))?;
            let ram = t.try_as_plain_ram()?;
            let v = ram.as_slice::<f32>()?;
            ensure!(
                v.len() == len,
                "{OP}: {what} holds {} values, not {len}",
                v.len()
            );
            Ok(Some(v.to_vec()))
        };
        let b = next(self.optional[0], dirs * 8 * h, "B")?;
        let h0 = next(self.optional[1], dirs * batch * h, "initial_h")?;
        let c0 = next(self.optional[2], dirs * batch * h, "initial_c")?;
        let sigmoid = Func::Sigmoid.ew_f32()?;
        let tanh = Func::Tanh.ew_f32()?;
        let mut y = vec![0f32; steps * dirs * batch * h];
        let mut y_h = vec![0f32; dirs * batch * h];
        let mut y_c = vec![0f32; dirs * batch * h];
        let mut gates_x = vec![0f32; steps * batch * 4 * h];
        let mut pre = vec![0f32; batch * 4 * h];
        for d in 0..dirs {
            // Every step's input products at once.
            self.w[d].matmul(x, steps * batch, &mut gates_x)?;
            // Wb + Rb.
            let bias: Option<Vec<f32>> = b.as_ref().map(|b| {
                let b = &b[d * 8 * h..(d + 1) * 8 * h];
                (0..4 * h).map(|j| b[j] + b[4 * h + j]).collect()
            });
            let state = d * batch * h..(d + 1) * batch * h;
            let mut hid = h0
                .as_ref()
                .map_or(vec![0f32; batch * h], |v| v[state.clone()].to_vec());
            let mut cell = c0
                .as_ref()
                .map_or(vec![0f32; batch * h], |v| v[state.clone()].to_vec());
            let backwards = self.reverse || d == 1;
            for s in 0..steps {
                let t = if backwards { steps - 1 - s } else { s };
                self.r[d].matmul(&hid, batch, &mut pre)?;
                let gx = &gates_x[t * batch * 4 * h..(t + 1) * batch * 4 * h];
                for (p, g) in pre.iter_mut().zip(gx) {
                    *p += g;
                }
                if let Some(bias) = &bias {
                    for row in pre.chunks_exact_mut(4 * h) {
                        for (p, b) in row.iter_mut().zip(bias) {
                            *p += b;
                        }
                    }
                }
                for (n, row) in pre.chunks_exact_mut(4 * h).enumerate() {
                    // Gates i, o, f through the sigmoid, the cell candidate through tanh.
                    sigmoid.run(&mut row[..3 * h])?;
                    tanh.run(&mut row[3 * h..])?;
                    kernels::zero_upper();
                    let (c, hn) = (&mut cell[n * h..(n + 1) * h], &mut hid[n * h..(n + 1) * h]);
                    for j in 0..h {
                        c[j] = row[2 * h + j] * c[j] + row[j] * row[3 * h + j];
                    }
                    hn.copy_from_slice(c);
                    tanh.run(hn)?;
                    kernels::zero_upper();
                    for j in 0..h {
                        hn[j] *= row[h + j];
                    }
                }
                let at = (t * dirs + d) * batch * h;
                y[at..at + batch * h].copy_from_slice(&hid);
            }
            y_h[state.clone()].copy_from_slice(&hid);
            y_c[state].copy_from_slice(&cell);
        }
        let y = Tensor::from_shape(&[steps, dirs, batch, h], &y)?;
        let y_h = Tensor::from_shape(&[dirs, batch, h], &y_h)?;
        let y_c = Tensor::from_shape(&[dirs, batch, h], &y_c)?;
        let all = [y, y_h, y_c];
        Ok(all
            .into_iter()
            .zip(self.produce)
            .filter(|(_, on)| *on)
            .map(|(t, _)| t.into_tvalue())
            .collect())
    }
}

impl TypedOp for QLstm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(
            x.datum_type == f32::datum_type() && x.rank() == 3,
            "{OP} takes f32 X of rank 3"
        );
        let (steps, batch) = (x.shape[0].clone(), x.shape[1].clone());
        let (dirs, h) = (self.dirs().to_dim(), self.hidden.to_dim());
        let facts = [
            f32::fact([steps, dirs.clone(), batch.clone(), h.clone()]),
            f32::fact([dirs.clone(), batch.clone(), h.clone()]),
            f32::fact([dirs, batch, h]),
        ];
        Ok(facts
            .into_iter()
            .zip(self.produce)
            .filter(|(_, on)| *on)
            .map(|(f, _)| f)
            .collect())
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use crate::exec::{self, RuntimeKind, SessionOptions, Tensor};
    use crate::onnx::dtype::DataType;
    use crate::onnx::pb::{AttributeProto, GraphProto, TensorProto};
    use crate::onnx::tensor::{from_f32, tensor_value_info};
    use crate::testing::{int_attr, model_of, node};

    const T: i64 = 5;
    const BATCH: i64 = 3;
    const I: i64 = 7;
    const H: i64 = 6;

    fn values(n: i64, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn codes(name: &str, dims: &[i64], signed: bool, seed: u32) -> TensorProto {
        let n: i64 = dims.iter().product();
        let raw: Vec<u8> = values(n, seed)
            .iter()
            .map(|v| {
                if signed {
                    (v * 127.0) as i8 as u8
                } else {
                    ((v + 1.0) * 127.0) as u8
                }
            })
            .collect();
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: if signed {
                DataType::Int8
            } else {
                DataType::Uint8
            } as i32,
            raw_data: raw.into(),
            ..Default::default()
        }
    }

    /// One LSTM case: its direction, whether B / initial_h / initial_c are given, how its weights are
    /// decoded (the Cast·Mul form, per-direction scales when `per_direction`, or DequantizeLinear of
    /// unsigned codes) and how many outputs it has.
    struct Case {
        direction: &'static str,
        optional: [bool; 3],
        dequantize: bool,
        per_direction: bool,
        outputs: usize,
        /// Y's name left empty (only Y_h, Y_c read).
        skip_y: bool,
    }

    fn model(c: &Case) -> crate::ir::Model {
        let dirs = if c.direction == "bidirectional" { 2 } else { 1 };
        let mut nodes = Vec::new();
        let mut inits = Vec::new();
        for (w, k, seed) in [("W", I, 1), ("R", H, 2)] {
            let dims = [dirs, 4 * H, k];
            if c.dequantize {
                inits.push(codes(&format!("{w}_q"), &dims, false, seed));
                inits.push(from_f32(
                    &format!("{w}_s"),
                    &[4 * H],
                    &values(4 * H, seed + 10)
                        .iter()
                        .map(|v| 0.01 + v.abs() * 0.02)
                        .collect::<Vec<_>>(),
                ));
                let mut dq = node(
                    "DequantizeLinear",
                    &[&format!("{w}_q"), &format!("{w}_s")],
                    w,
                );
                dq.attribute.push(int_attr("axis", 1));
                nodes.push(dq);
            } else {
                let lead = if c.per_direction { dirs } else { 1 };
                inits.push(codes(&format!("{w}_q"), &dims, true, seed));
                let scales: Vec<f32> = values(lead * 4 * H, seed + 10)
                    .iter()
                    .map(|v| 0.01 + v.abs() * 0.02)
                    .collect();
                inits.push(from_f32(&format!("{w}_s"), &[lead, 4 * H, 1], &scales));
                let mut cast = node("Cast", &[&format!("{w}_q")], &format!("{w}_f"));
                cast.attribute.push(int_attr("to", DataType::Float as i64));
                nodes.push(cast);
                nodes.push(node("Mul", &[&format!("{w}_f"), &format!("{w}_s")], w));
            }
        }
        let [b, h0, c0] = c.optional;
        if b {
            inits.push(from_f32("B", &[dirs, 8 * H], &values(dirs * 8 * H, 3)));
        }
        if h0 {
            inits.push(from_f32(
                "h0",
                &[dirs, BATCH, H],
                &values(dirs * BATCH * H, 4),
            ));
        }
        if c0 {
            inits.push(from_f32(
                "c0",
                &[dirs, BATCH, H],
                &values(dirs * BATCH * H, 5),
            ));
        }
        let pick = |on: bool, name: &'static str| if on { name } else { "" };
        let mut lstm = node(
            "LSTM",
            &[
                "x",
                "W",
                "R",
                pick(b, "B"),
                "",
                pick(h0, "h0"),
                pick(c0, "c0"),
            ],
            "y",
        );
        let y = if c.skip_y { "" } else { "y" };
        lstm.output = [y, "y_h", "y_c"][..c.outputs]
            .iter()
            .map(|s| s.to_string())
            .collect();
        lstm.attribute.push(int_attr("hidden_size", H));
        lstm.attribute.push(AttributeProto {
            name: "direction".into(),
            s: Some(c.direction.as_bytes().to_vec().into()),
            r#type: Some(3),
            ..Default::default()
        });
        nodes.push(lstm);
        let float = DataType::Float as i32;
        let outputs = [
            tensor_value_info("y", float, &[T, dirs, BATCH, H]),
            tensor_value_info("y_h", float, &[dirs, BATCH, H]),
            tensor_value_info("y_c", float, &[dirs, BATCH, H]),
        ];
        let g = GraphProto {
            name: Some("g".into()),
            node: nodes,
            initializer: inits,
            input: vec![tensor_value_info("x", float, &[T, BATCH, I])],
            output: outputs[usize::from(c.skip_y)..c.outputs].to_vec(),
            ..Default::default()
        };
        model_of(g, 13)
    }

    fn run(m: &crate::ir::Model, kernels: bool) -> (Vec<Vec<f32>>, String) {
        let p = exec::Prepared::from_model(m, "lstm");
        let opts = SessionOptions {
            tract_kernels: kernels,
            ..Default::default()
        };
        let mut s = exec::open(&p, RuntimeKind::Tract, &opts).unwrap();
        let x = ndarray::ArrayD::from_shape_vec(
            vec![T as usize, BATCH as usize, I as usize],
            values(T * BATCH * I, 9).iter().map(|v| v * 2.0).collect(),
        )
        .unwrap();
        let out = s.run(&[("x".into(), Tensor::from(x))]).unwrap();
        let said = s
            .settings()
            .into_iter()
            .find(|(k, _)| k == "weight kernels")
            .map(|(_, v)| v)
            .unwrap();
        (
            out.iter()
                .map(|(_, t)| t.to_f32().iter().copied().collect())
                .collect(),
            said,
        )
    }

    /// ONNX's LSTM in f64 over the decoded weights of `m` (read back from its initializers): Y, Y_h,
    /// Y_c.
    fn reference(m: &crate::ir::Model, c: &Case, x: &[f32]) -> [Vec<f64>; 3] {
        let p = m.to_proto();
        let g = p.graph.as_ref().unwrap();
        let get = |name: &str| -> Option<Vec<f64>> {
            let t = g.initializer.iter().find(|t| t.name == name)?;
            Some(match t.data_type {
                1 => t
                    .raw_data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                3 => t.raw_data.iter().map(|&b| b as i8 as f64).collect(),
                _ => t.raw_data.iter().map(|&b| b as f64).collect(),
            })
        };
        let dirs = if c.direction == "bidirectional" { 2 } else { 1 };
        let (t_n, b_n, i_n, h) = (T as usize, BATCH as usize, I as usize, H as usize);
        let weight = |w: &str, k: usize| -> Vec<f64> {
            let q = get(&format!("{w}_q")).unwrap();
            let s = get(&format!("{w}_s")).unwrap();
            (0..q.len())
                .map(|i| {
                    let (d, row) = (i / (4 * h * k), (i / k) % (4 * h));
                    let at = if s.len() == 4 * h {
                        row
                    } else {
                        d * 4 * h + row
                    };
                    q[i] * s[at]
                })
                .collect()
        };
        let (w, r) = (weight("W", i_n), weight("R", h));
        let bias = get("B");
        let (h0, c0) = (get("h0"), get("c0"));
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let mut y = vec![0f64; t_n * dirs * b_n * h];
        let (mut y_h, mut y_c) = (vec![0f64; dirs * b_n * h], vec![0f64; dirs * b_n * h]);
        for d in 0..dirs {
            for n in 0..b_n {
                let st = (d * b_n + n) * h;
                let mut hid: Vec<f64> =
                    h0.as_ref().map_or(vec![0.0; h], |v| v[st..st + h].to_vec());
                let mut cell: Vec<f64> =
                    c0.as_ref().map_or(vec![0.0; h], |v| v[st..st + h].to_vec());
                for s in 0..t_n {
                    let t = if c.direction == "reverse" || d == 1 {
                        t_n - 1 - s
                    } else {
                        s
                    };
                    let pre: Vec<f64> = (0..4 * h)
                        .map(|g| {
                            let mut v: f64 = (0..i_n)
                                .map(|k| {
                                    x[(t * b_n + n) * i_n + k] as f64 * w[(d * 4 * h + g) * i_n + k]
                                })
                                .sum();
                            v += (0..h)
                                .map(|k| hid[k] * r[(d * 4 * h + g) * h + k])
                                .sum::<f64>();
                            if let Some(b) = &bias {
                                v += b[d * 8 * h + g] + b[d * 8 * h + 4 * h + g];
                            }
                            v
                        })
                        .collect();
                    for j in 0..h {
                        let (i, o, f, cc) = (
                            sig(pre[j]),
                            sig(pre[h + j]),
                            sig(pre[2 * h + j]),
                            pre[3 * h + j].tanh(),
                        );
                        cell[j] = f * cell[j] + i * cc;
                        hid[j] = o * cell[j].tanh();
                    }
                    let at = ((t * dirs + d) * b_n + n) * h;
                    y[at..at + h].copy_from_slice(&hid);
                }
                y_h[st..st + h].copy_from_slice(&hid);
                y_c[st..st + h].copy_from_slice(&cell);
            }
        }
        [y, y_h, y_c]
    }

    /// Against ONNX's LSTM computed in f64 (tract's sigmoid and tanh are rational approximations, so
    /// not to f32 rounding); against tract's own LSTM on the same graph to 1e-5 where tract agrees
    /// with onnxruntime. tract 0.23.9 computes `direction: reverse` differently from onnxruntime (up
    /// to 1.3 on these values; quench's operator matches onnxruntime to 4e-7).
    #[test]
    fn lstm_over_int8_weights_matches_the_onnx_lstm() {
        let cases = [
            Case {
                direction: "forward",
                optional: [true, true, true],
                dequantize: false,
                per_direction: false,
                outputs: 3,
                skip_y: false,
            },
            Case {
                direction: "reverse",
                optional: [false, false, false],
                dequantize: false,
                per_direction: false,
                outputs: 3,
                skip_y: false,
            },
            Case {
                direction: "bidirectional",
                optional: [true, false, true],
                dequantize: false,
                per_direction: true,
                outputs: 3,
                skip_y: false,
            },
            Case {
                direction: "bidirectional",
                optional: [false, true, false],
                dequantize: true,
                per_direction: false,
                outputs: 1,
                skip_y: false,
            },
            Case {
                direction: "forward",
                optional: [true, true, false],
                dequantize: true,
                per_direction: false,
                outputs: 2,
                skip_y: true,
            },
        ];
        let x: Vec<f32> = values(T * BATCH * I, 9).iter().map(|v| v * 2.0).collect();
        for c in &cases {
            let m = model(c);
            let (fast, said) = run(&m, true);
            assert!(
                said.contains("; 1 LSTM over int8 weights;"),
                "{}: {said}",
                c.direction
            );
            let first = usize::from(c.skip_y);
            assert_eq!(fast.len(), c.outputs - first);
            let want = reference(&m, c, &x);
            for (got, want) in fast.iter().zip(&want[first..]) {
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                assert!(scale > 0.05, "{}: outputs near zero", c.direction);
                for (a, b) in got.iter().zip(want) {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-4 * scale,
                        "{}: {a} vs {b}",
                        c.direction
                    );
                }
            }
            let tract_agrees = c.direction != "reverse";
            if tract_agrees {
                let (plain, _) = run(&m, false);
                for (a, b) in fast.iter().flatten().zip(plain.iter().flatten()) {
                    assert!((a - b).abs() <= 1e-5, "{}: {a} vs tract's {b}", c.direction);
                }
            }
        }
        // Activations written out as the defaults are taken; a clip or other activations are not.
        let with = |attr: AttributeProto| {
            let mut m = model(&cases[2]).to_proto();
            let g = m.graph.as_mut().unwrap();
            let lstm = g
                .node
                .iter_mut()
                .find(|n| n.op_type.as_deref() == Some("LSTM"))
                .unwrap();
            lstm.attribute.push(attr);
            run(&crate::ir::Model::from_proto(m, vec![]).unwrap(), true)
        };
        let activations = |names: [&str; 3]| AttributeProto {
            name: "activations".into(),
            strings: names
                .iter()
                .chain(&names)
                .map(|f| f.as_bytes().to_vec().into())
                .collect(),
            r#type: Some(8),
            ..Default::default()
        };
        let (out, said) = with(activations(["Sigmoid", "Tanh", "Tanh"]));
        assert!(said.contains("; 1 LSTM over int8 weights;"), "{said}");
        let (plain, _) = run(&model(&cases[2]), false);
        assert_eq!(out.len(), plain.len());
        for (a, b) in out.iter().flatten().zip(plain.iter().flatten()) {
            assert!(
                (a - b).abs() <= 1e-5,
                "explicit activations: {a} vs tract's {b}"
            );
        }
        let (_, said) = with(activations(["Sigmoid", "Relu", "Tanh"]));
        assert!(said.contains("; 0 LSTM over int8 weights;"), "{said}");
        let (_, said) = with(AttributeProto {
            name: "clip".into(),
            f: Some(0.5),
            r#type: Some(1),
            ..Default::default()
        });
        assert!(said.contains("; 0 LSTM over int8 weights;"), "{said}");
    }
}
