//! Graph forms that decode a quantized weight back to float, in standard ONNX ops. Each function adds
//! constants and nodes to a [`Patch`] and returns the name of the decoded value; the numbers it computes
//! are exactly [`Encoded::decode`] (tests run every form in both runtimes against it).

use std::collections::HashMap;

use crate::ir::{Names, Patch};
use crate::onnx::dtype::DataType;
use crate::onnx::pb::{AttributeProto, TensorProto, attribute_proto::AttributeType};
use crate::quant::scheme::Encoded;
use crate::quant::vq::VqEncoded;

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub fn tensor(dt: DataType, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        data_type: dt as i32,
        dims: dims.to_vec(),
        raw_data: raw.into(),
        ..Default::default()
    }
}

pub fn f32_tensor(dims: &[i64], v: &[f32]) -> TensorProto {
    tensor(
        DataType::Float,
        dims,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

fn i64_tensor(dims: &[i64], v: &[i64]) -> TensorProto {
    tensor(
        DataType::Int64,
        dims,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

/// The code slot width a `bits`-wide code is stored in: codes never straddle bytes.
pub fn slot_bits(bits: u32) -> u32 {
    match bits {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

/// `e`'s codes packed into bytes, low bits first, each group padded to whole bytes (so each channel
/// is a whole number of bytes too): the bytes, the padded group width in codes, and codes per byte.
fn packed_slots(e: &Encoded) -> (Vec<u8>, usize, usize) {
    let slot = slot_bits(e.bits);
    let per_byte = (8 / slot) as usize;
    let width = e.group.div_ceil(per_byte) * per_byte;
    let mut slots = Vec::with_capacity(e.channels * e.groups_per_row() * width);
    for r in 0..e.channels {
        let row = &e.codes[r * e.k..(r + 1) * e.k];
        for g in row.chunks(e.group) {
            slots.extend_from_slice(g);
            slots.resize(slots.len() + width - g.len(), 0);
        }
    }
    let packed = slots
        .chunks(per_byte)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |b, (i, &v)| b | (v << (i as u32 * slot)))
        })
        .collect();
    (packed, width, per_byte)
}

/// A lookup table kept compressed for [`Emit::gather_rows`]: its constants, and the shape of one
/// row (`table.shape[1..]`).
pub struct RowTable {
    kind: RowKind,
    rest: Vec<i64>,
}

enum RowKind {
    /// int8 codes `[V, k]`; scales and zero points `[V, 1]` per row, or scalars.
    Int8 {
        q: String,
        s: String,
        z: Option<String>,
        per_row: bool,
    },
    /// Packed codes `[V, bytes per row]`, the shared byte-to-levels table, zero points (uint8) and
    /// scales `[V, groups per row, 1]`.
    Levels {
        codes: String,
        table: String,
        z: Option<String>,
        scales: String,
        gpr: i64,
        width: i64,
        group: i64,
        k: i64,
    },
    /// Per stage codes `[V, subspaces, pieces]` and codebook; subspace offsets; scales `[V, 1]`.
    Codebook {
        stages: Vec<(String, String)>,
        offsets: Option<String>,
        scales: String,
        k_padded: i64,
        k: i64,
    },
}

/// Everything one pass run shares between sites: the byte-to-levels tables already emitted.
#[derive(Default)]
pub struct Shared {
    /// (graph the table lives in, level bits, slot width) → table name.
    tables: HashMap<(String, Vec<u32>, u32), String>,
    /// Bytes of the shared constants emitted so far.
    pub bytes: u64,
}

/// Where an emission happens: the patch, the model's names and opset, a base name for new values.
pub struct Emit<'a> {
    pub patch: &'a mut Patch,
    pub names: &'a mut Names,
    pub opset: i64,
    pub base: String,
    /// The graph the patch applies to (empty for the main graph): shared constants are per graph.
    pub scope: String,
}

impl Emit<'_> {
    fn constant(&mut self, suffix: &str, t: TensorProto) -> String {
        self.patch
            .constant(self.names, &format!("{}_{suffix}", self.base), t)
    }

    fn node(
        &mut self,
        suffix: &str,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> String {
        let inputs: Vec<Option<&str>> = inputs.iter().map(|s| Some(*s)).collect();
        self.patch
            .node(
                self.names,
                &format!("{}_{suffix}", self.base),
                op,
                "",
                &inputs,
                1,
                attrs,
            )
            .remove(0)
    }

    fn reshape(&mut self, x: &str, dims: &[i64]) -> String {
        let shape = self.constant("shape", i64_tensor(&[dims.len() as i64], dims));
        self.node("reshape", "Reshape", &[x, &shape], vec![])
    }

    /// `x[.., 0..end, ..]` along `axis`, in the Slice form of the model's opset.
    fn slice(&mut self, x: &str, axis: i64, end: i64) -> String {
        if self.opset >= 10 {
            let s = self.constant("starts", i64_tensor(&[1], &[0]));
            let e = self.constant("ends", i64_tensor(&[1], &[end]));
            let a = self.constant("axes", i64_tensor(&[1], &[axis]));
            self.node("slice", "Slice", &[x, &s, &e, &a], vec![])
        } else {
            self.node(
                "slice",
                "Slice",
                &[x],
                vec![
                    attr_ints("starts", &[0]),
                    attr_ints("ends", &[end]),
                    attr_ints("axes", &[axis]),
                ],
            )
        }
    }

    pub fn cast(&mut self, x: &str, to: DataType) -> String {
        self.node("cast", "Cast", &[x], vec![attr_int("to", to as i64)])
    }

    /// `DequantizeLinear(codes, scale, zero_point[, axis])`: int8 codes in the weight's own layout.
    pub fn dequantize_linear(
        &mut self,
        codes: TensorProto,
        scales: &[f32],
        zero_points: TensorProto,
        axis: Option<usize>,
    ) -> String {
        let dims: Vec<i64> = if axis.is_some() {
            vec![scales.len() as i64]
        } else {
            vec![]
        };
        let q = self.constant("q", codes);
        let s = self.constant("scale", f32_tensor(&dims, scales));
        let z = self.constant("zero_point", zero_points);
        let attrs = axis
            .map(|a| vec![attr_int("axis", a as i64)])
            .unwrap_or_default();
        self.node("dequantize", "DequantizeLinear", &[&q, &s, &z], attrs)
    }

    /// `Mul(Cast(codes) [− zero_point], scale)` with scale and zero point shaped to broadcast along
    /// `axis` (or scalars): the same numbers as DequantizeLinear, in ops every runtime folds at load.
    pub fn cast_mul(
        &mut self,
        codes: TensorProto,
        rank: usize,
        scales: &[f32],
        zero_points: Option<&[f32]>,
        axis: Option<usize>,
    ) -> String {
        let mut bshape = vec![1i64; rank];
        if let Some(a) = axis {
            bshape[a] = scales.len() as i64;
        }
        let q = self.constant("q", codes);
        let s = self.constant("scale", f32_tensor(&bshape, scales));
        let mut x = self.cast(&q, DataType::Float);
        if let Some(z) = zero_points {
            let z = self.constant("zero_point", f32_tensor(&bshape, z));
            x = self.node("centre", "Sub", &[&x, &z], vec![]);
        }
        self.node("dequantize", "Mul", &[&x, &s], vec![])
    }

    /// The level-table form for any [`Encoded`]: packed codes → Cast(int32) → Gather(table) → Reshape
    /// [groups, slots] (→ Sub zero points) → Mul(scales) → Slice/Reshape to `[channels, k]` → Reshape to
    /// `moved_dims` (→ Transpose by `perm`). The table maps each byte to the levels of the codes it
    /// packs (low bits first), so one Gather unpacks and looks up at once; tables are shared between
    /// sites. Needs opset ≥ 7. Returns the decoded value and the bytes of the site's own new constants
    /// (a new shared table is counted in `shared.bytes`).
    pub fn level_table(
        &mut self,
        shared: &mut Shared,
        e: &Encoded,
        moved_dims: &[i64],
        perm: Option<&[i64]>,
    ) -> Result<(String, u64), String> {
        if self.opset < 7 {
            return Err(format!(
                "the level-table form needs opset 7, the model has {}",
                self.opset
            ));
        }
        let gpr = e.groups_per_row();
        let rows = e.channels * gpr;
        let (packed, width, _) = packed_slots(e);
        let mut bytes = packed.len() as u64;
        let nbytes = packed.len() as i64;
        let table = self.levels_table(shared, e);
        let codes = self.constant("codes", tensor(DataType::Uint8, &[nbytes], packed));
        let idx = self.cast(&codes, DataType::Int32);
        let looked_up = self.node(
            "lookup",
            "Gather",
            &[&table, &idx],
            vec![attr_int("axis", 0)],
        );
        let mut x = self.reshape(&looked_up, &[rows as i64, width as i64]);
        if let Some(z) = &e.zero_points {
            bytes += z.len() as u64;
            let zc = self.constant(
                "zero_point",
                tensor(DataType::Uint8, &[rows as i64, 1], z.clone()),
            );
            let zf = self.cast(&zc, DataType::Float);
            x = self.node("centre", "Sub", &[&x, &zf], vec![]);
        }
        let (scales, scale_bytes) = self.scales(e, rows)?;
        bytes += scale_bytes;
        x = self.node("scale", "Mul", &[&x, &scales], vec![]);
        if width != e.group {
            x = self.slice(&x, 1, e.group as i64);
        }
        if gpr * e.group != e.k {
            x = self.reshape(&x, &[e.channels as i64, (gpr * e.group) as i64]);
            x = self.slice(&x, 1, e.k as i64);
        }
        x = self.reshape(&x, moved_dims);
        if let Some(p) = perm {
            x = self.node("transpose", "Transpose", &[&x], vec![attr_ints("perm", p)]);
        }
        Ok((x, bytes))
    }

    /// The shared byte-to-levels table of `e`'s levels and slot width (emitted once per graph).
    fn levels_table(&mut self, shared: &mut Shared, e: &Encoded) -> String {
        let slot = slot_bits(e.bits);
        let per_byte = (8 / slot) as usize;
        let key = (
            self.scope.clone(),
            e.levels.iter().map(|v| v.to_bits()).collect::<Vec<u32>>(),
            slot,
        );
        if let Some(name) = shared.tables.get(&key) {
            return name.clone();
        }
        let mask = (1usize << slot) - 1;
        let mut t = Vec::with_capacity(256 * per_byte);
        for b in 0..256usize {
            for i in 0..per_byte {
                let code = (b >> (i * slot as usize)) & mask;
                t.push(e.levels.get(code).copied().unwrap_or(0.0));
            }
        }
        shared.bytes += 4 * t.len() as u64;
        let name = self.constant("levels", f32_tensor(&[256, per_byte as i64], &t));
        shared.tables.insert(key, name.clone());
        name
    }

    /// The codebook form of a [`VqEncoded`]: per stage, codes (u8, or u16 beyond 256 entries)
    /// `[channels, subspaces, pieces per subspace]` → Cast(int32) (→ Add the subspace offsets into the
    /// stacked codebooks) → Gather(codebooks `[subspaces·size, dim]`); the stages' lookups are added;
    /// → Reshape `[channels, k padded]` → Mul(scales `[channels, 1]`) → Slice to k → Reshape to
    /// `moved_dims` (→ Transpose by `perm`). Standard ONNX from opset 7. Returns the decoded value and
    /// the bytes of the new constants.
    pub fn vq_lookup(
        &mut self,
        e: &VqEncoded,
        moved_dims: &[i64],
        perm: Option<&[i64]>,
    ) -> Result<(String, u64), String> {
        if self.opset < 7 {
            return Err(format!(
                "the codebook form needs opset 7, the model has {}",
                self.opset
            ));
        }
        let ch = e.channels as i64;
        let (offsets, mut bytes) = self.vq_offsets(e);
        let mut sum: Option<String> = None;
        for stage in 0..e.codes.len() {
            let (c, book, b) = self.vq_stage(e, stage);
            bytes += b;
            let mut idx = self.cast(&c, DataType::Int32);
            if let Some(o) = &offsets {
                idx = self.node("subspace", "Add", &[&idx, o], vec![]);
            }
            let looked_up = self.node(
                "lookup",
                "Gather",
                &[&book, &idx],
                vec![attr_int("axis", 0)],
            );
            sum = Some(match sum {
                None => looked_up,
                Some(prev) => self.node("stage", "Add", &[&prev, &looked_up], vec![]),
            });
        }
        let mut x = self.reshape(&sum.expect("at least one stage"), &[ch, e.k_padded as i64]);
        let scales = self.constant("scales", f32_tensor(&[ch, 1], &e.scales));
        bytes += 4 * e.scales.len() as u64;
        x = self.node("scale", "Mul", &[&x, &scales], vec![]);
        if e.k_padded != e.k {
            x = self.slice(&x, 1, e.k as i64);
        }
        x = self.reshape(&x, moved_dims);
        if let Some(p) = perm {
            x = self.node("transpose", "Transpose", &[&x], vec![attr_ints("perm", p)]);
        }
        Ok((x, bytes))
    }

    /// The constants of a table read only by `Gather` along its channel axis (axis 0), for
    /// [`Emit::gather_rows`]: int8 codes `[V, k]` with scales (and zero points) per row or per tensor.
    /// The codes are `enc`'s row-major `[channels, k]` matrix; `channels` is `V` or 1 (per tensor).
    pub fn int8_rows(&mut self, enc: &Encoded, codes: Vec<u8>, dims: &[usize]) -> (RowTable, u64) {
        let v = dims[0] as i64;
        let k = (dims.iter().product::<usize>() / dims[0].max(1)) as i64;
        let symmetric = enc.zero_points.is_none();
        let dt = if symmetric {
            DataType::Int8
        } else {
            DataType::Uint8
        };
        let sdims: Vec<i64> = if enc.channels == 1 {
            vec![]
        } else {
            vec![v, 1]
        };
        let mut bytes = codes.len() as u64 + 4 * enc.scales.len() as u64;
        let q = self.constant("q", tensor(dt, &[v, k], codes));
        let s = self.constant("scale", f32_tensor(&sdims, &enc.scales));
        let z = enc.zero_points.as_ref().map(|z| {
            bytes += z.len() as u64;
            let zf: Vec<f32> = z.iter().map(|&z| z as f32).collect();
            self.constant("zero_point", f32_tensor(&sdims, &zf))
        });
        let per_row = enc.channels > 1;
        let rest = dims[1..].iter().map(|&d| d as i64).collect();
        (
            RowTable {
                kind: RowKind::Int8 { q, s, z, per_row },
                rest,
            },
            bytes,
        )
    }

    /// The level-table form's constants laid out per row (`enc` per channel along axis 0, or in
    /// blocks within each row), for [`Emit::gather_rows`]. Needs opset ≥ 7.
    pub fn level_rows(
        &mut self,
        shared: &mut Shared,
        e: &Encoded,
        dims: &[usize],
    ) -> Result<(RowTable, u64), String> {
        if self.opset < 7 {
            return Err(format!(
                "the level-table form needs opset 7, the model has {}",
                self.opset
            ));
        }
        let v = e.channels as i64;
        let gpr = e.groups_per_row() as i64;
        let (packed, width, _) = packed_slots(e);
        let mut bytes = packed.len() as u64;
        let row_bytes = packed.len() as i64 / v.max(1);
        let table = self.levels_table(shared, e);
        let codes = self.constant("codes", tensor(DataType::Uint8, &[v, row_bytes], packed));
        let z = e.zero_points.as_ref().map(|z| {
            bytes += z.len() as u64;
            self.constant(
                "zero_point",
                tensor(DataType::Uint8, &[v, gpr, 1], z.clone()),
            )
        });
        let (scales, scale_bytes) = self.scales(e, (v * gpr) as usize)?;
        bytes += scale_bytes;
        let scales = self.reshape(&scales, &[v, gpr, 1]);
        let rest = dims[1..].iter().map(|&d| d as i64).collect();
        Ok((
            RowTable {
                kind: RowKind::Levels {
                    codes,
                    table,
                    z,
                    scales,
                    gpr,
                    width: width as i64,
                    group: e.group as i64,
                    k: e.k as i64,
                },
                rest,
            },
            bytes,
        ))
    }

    /// The codebook form's constants laid out per row (`e` per channel along axis 0), for
    /// [`Emit::gather_rows`]. Needs opset ≥ 7.
    pub fn vq_rows(&mut self, e: &VqEncoded, dims: &[usize]) -> Result<(RowTable, u64), String> {
        if self.opset < 7 {
            return Err(format!(
                "the codebook form needs opset 7, the model has {}",
                self.opset
            ));
        }
        let ch = e.channels as i64;
        let (offsets, mut bytes) = self.vq_offsets(e);
        let mut stages = Vec::new();
        for stage in 0..e.codes.len() {
            let (c, book, b) = self.vq_stage(e, stage);
            bytes += b;
            stages.push((c, book));
        }
        let scales = self.constant("scales", f32_tensor(&[ch, 1], &e.scales));
        bytes += 4 * e.scales.len() as u64;
        let rest = dims[1..].iter().map(|&d| d as i64).collect();
        Ok((
            RowTable {
                kind: RowKind::Codebook {
                    stages,
                    offsets,
                    scales,
                    k_padded: e.k_padded as i64,
                    k: e.k as i64,
                },
                rest,
            },
            bytes,
        ))
    }

    /// `Gather(table, ids)` (axis 0) computed from the compressed table: the rows `ids` names are
    /// gathered while still codes, and only they are decoded. The ids are flattened, so every step
    /// has a known rank, and the result takes the shape `ids.shape + table.shape[1..]` at the end.
    pub fn gather_rows(&mut self, t: &RowTable, ids: &str) -> String {
        let flat_shape = self.constant("flat", i64_tensor(&[1], &[-1]));
        let f = self.node("ids", "Reshape", &[ids, &flat_shape], vec![]);
        let gather = |me: &mut Self, suffix: &str, x: &str| {
            me.node(suffix, "Gather", &[x, &f], vec![attr_int("axis", 0)])
        };
        let x = match &t.kind {
            RowKind::Int8 { q, s, z, per_row } => {
                let q = gather(self, "rows", q);
                let mut x = self.cast(&q, DataType::Float);
                if let Some(z) = z {
                    let z = if *per_row {
                        gather(self, "row_zero_point", z)
                    } else {
                        z.clone()
                    };
                    x = self.node("centre", "Sub", &[&x, &z], vec![]);
                }
                let s = if *per_row {
                    gather(self, "row_scale", s)
                } else {
                    s.clone()
                };
                self.node("dequantize", "Mul", &[&x, &s], vec![])
            }
            RowKind::Levels {
                codes,
                table,
                z,
                scales,
                gpr,
                width,
                group,
                k,
            } => {
                let c = gather(self, "rows", codes);
                let idx = self.cast(&c, DataType::Int32);
                let looked_up = self.node(
                    "lookup",
                    "Gather",
                    &[table, &idx],
                    vec![attr_int("axis", 0)],
                );
                let mut x = self.reshape(&looked_up, &[-1, *gpr, *width]);
                if let Some(z) = z {
                    let z = gather(self, "row_zero_point", z);
                    let zf = self.cast(&z, DataType::Float);
                    x = self.node("centre", "Sub", &[&x, &zf], vec![]);
                }
                let s = gather(self, "row_scale", scales);
                x = self.node("scale", "Mul", &[&x, &s], vec![]);
                if width != group {
                    x = self.slice(&x, 2, *group);
                }
                x = self.reshape(&x, &[-1, gpr * group]);
                if gpr * group != *k {
                    x = self.slice(&x, 1, *k);
                }
                x
            }
            RowKind::Codebook {
                stages,
                offsets,
                scales,
                k_padded,
                k,
            } => {
                let mut sum: Option<String> = None;
                for (c, book) in stages {
                    let c = gather(self, "rows", c);
                    let mut idx = self.cast(&c, DataType::Int32);
                    if let Some(o) = offsets {
                        idx = self.node("subspace", "Add", &[&idx, o], vec![]);
                    }
                    let looked_up =
                        self.node("lookup", "Gather", &[book, &idx], vec![attr_int("axis", 0)]);
                    sum = Some(match sum {
                        None => looked_up,
                        Some(prev) => self.node("stage", "Add", &[&prev, &looked_up], vec![]),
                    });
                }
                let mut x = self.reshape(&sum.expect("at least one stage"), &[-1, *k_padded]);
                let s = gather(self, "row_scale", scales);
                x = self.node("scale", "Mul", &[&x, &s], vec![]);
                if k_padded != k {
                    x = self.slice(&x, 1, *k);
                }
                x
            }
        };
        let ids_shape = self.node("ids_shape", "Shape", &[ids], vec![]);
        let shape = if t.rest.is_empty() {
            ids_shape
        } else {
            let rest = self.constant("row_shape", i64_tensor(&[t.rest.len() as i64], &t.rest));
            self.node(
                "shape",
                "Concat",
                &[&ids_shape, &rest],
                vec![attr_int("axis", 0)],
            )
        };
        self.node("rows_reshape", "Reshape", &[&x, &shape], vec![])
    }

    /// The offsets of the product subspaces into the stacked codebooks (none for one subspace), and
    /// their bytes.
    fn vq_offsets(&mut self, e: &VqEncoded) -> (Option<String>, u64) {
        if e.subspaces < 2 {
            return (None, 0);
        }
        let v: Vec<u8> = (0..e.subspaces)
            .flat_map(|s| ((s * e.codebook_size) as i32).to_le_bytes())
            .collect();
        let bytes = v.len() as u64;
        let m = e.subspaces as i64;
        let name = self.constant("subspace_offsets", tensor(DataType::Int32, &[m, 1], v));
        (Some(name), bytes)
    }

    /// One stage's codes `[channels, subspaces, pieces]` (u8, or u16 beyond 256 entries) and
    /// codebook, as constants, and their bytes.
    fn vq_stage(&mut self, e: &VqEncoded, stage: usize) -> (String, String, u64) {
        let (codes, book) = (&e.codes[stage], &e.codebooks[stage]);
        let (ch, m, pps) = (
            e.channels as i64,
            e.subspaces as i64,
            e.pieces_per_subspace() as i64,
        );
        let (dt, raw): (DataType, Vec<u8>) = if e.code_bytes() == 1 {
            (DataType::Uint8, codes.iter().map(|&c| c as u8).collect())
        } else {
            (
                DataType::Uint16,
                codes.iter().flat_map(|c| c.to_le_bytes()).collect(),
            )
        };
        let bytes = raw.len() as u64 + 4 * book.len() as u64;
        let c = self.constant(&format!("codes{stage}"), tensor(dt, &[ch, m, pps], raw));
        let book = self.constant(
            &format!("codebook{stage}"),
            f32_tensor(&[m * e.codebook_size as i64, e.dim as i64], book),
        );
        (c, book, bytes)
    }

    /// The `[rows, 1]` scales: a constant, or decoded from their 8-bit double quantization
    /// (`min + code · step` per group of scales).
    fn scales(&mut self, e: &Encoded, rows: usize) -> Result<(String, u64), String> {
        let Some(d) = &e.double else {
            let s = self.constant("scales", f32_tensor(&[rows as i64, 1], &e.scales));
            return Ok((s, 4 * rows as u64));
        };
        let groups = d.mins.len();
        let mut codes = d.codes.clone();
        codes.resize(groups * d.group, 0);
        let c = self.constant(
            "scale_codes",
            tensor(DataType::Uint8, &[groups as i64, d.group as i64], codes),
        );
        let steps = self.constant("scale_steps", f32_tensor(&[groups as i64, 1], &d.steps));
        let mins = self.constant("scale_mins", f32_tensor(&[groups as i64, 1], &d.mins));
        let mut s = self.cast(&c, DataType::Float);
        s = self.node("scale_step", "Mul", &[&s, &steps], vec![]);
        s = self.node("scale_min", "Add", &[&s, &mins], vec![]);
        s = self.reshape(&s, &[(groups * d.group) as i64, 1]);
        if groups * d.group != rows {
            s = self.slice(&s, 0, rows as i64);
        }
        Ok((s, (groups * d.group + 8 * groups) as u64))
    }

    /// Writes the kept outliers over the decoded weight: `ScatterND(x, indices, values)` (opset ≥ 11).
    /// `index` maps a flat index of the encoded matrix to the weight's own coordinates.
    pub fn outliers(
        &mut self,
        x: &str,
        outliers: &[(usize, f32)],
        rank: usize,
        index: impl Fn(usize) -> Vec<i64>,
    ) -> Result<(String, u64), String> {
        if self.opset < 11 {
            return Err(format!(
                "the outlier path (ScatterND) needs opset 11, the model has {}",
                self.opset
            ));
        }
        let n = outliers.len() as i64;
        let idx: Vec<i64> = outliers.iter().flat_map(|&(i, _)| index(i)).collect();
        let vals: Vec<f32> = outliers.iter().map(|&(_, v)| v).collect();
        let i = self.constant("outlier_idx", i64_tensor(&[n, rank as i64], &idx));
        let v = self.constant("outlier_val", f32_tensor(&[n], &vals));
        let y = self.node("outliers", "ScatterND", &[x, &i, &v], vec![]);
        Ok((y, (idx.len() * 8 + vals.len() * 4) as u64))
    }
}
