//! Checks and decoding of TensorProto payloads. A tensor's declared shape is checked against the bytes it
//! carries before anything is allocated from it, so a forged shape cannot cause a huge allocation.

use bytes::Bytes;

use super::dtype::{DataType, DataTypeExt, TypedField, data_type, packed_bytes};
use super::pb::TensorProto;
use super::pb::tensor_proto::DataLocation;

/// Number of elements of a shape; fails on negative dims or overflow.
pub fn element_count(dims: &[i64]) -> Result<u64, String> {
    let mut n: u64 = 1;
    for &d in dims {
        if d < 0 {
            return Err(format!("has a negative dimension in shape {dims:?}"));
        }
        n = n
            .checked_mul(d as u64)
            .ok_or_else(|| format!("has a shape {dims:?} whose element count overflows"))?;
    }
    Ok(n)
}

fn typed_len(t: &TensorProto, field: TypedField) -> (usize, &'static str) {
    match field {
        TypedField::Float => (t.float_data.len(), "float_data"),
        TypedField::Int32 => (t.int32_data.len(), "int32_data"),
        TypedField::String => (t.string_data.len(), "string_data"),
        TypedField::Int64 => (t.int64_data.len(), "int64_data"),
        TypedField::Double => (t.double_data.len(), "double_data"),
        TypedField::Uint64 => (t.uint64_data.len(), "uint64_data"),
    }
}

/// Entries of the typed field that `count` elements of `dt` need.
fn typed_entries(dt: DataType, count: u64) -> u64 {
    use DataType::*;
    match dt {
        Complex64 | Complex128 => count * 2,
        Uint4 | Int4 | Float4e2m1 => count.div_ceil(2),
        Uint2 | Int2 => count.div_ceil(4),
        _ => count,
    }
}

/// Checks that a (resolved, non-external) tensor's payload agrees with its shape and data type.
/// The error is the reason, to be placed after the tensor's name.
pub fn validate(t: &TensorProto) -> Result<(), String> {
    let dt = data_type(t.data_type)?;
    if dt == DataType::Undefined {
        return Err("has data_type UNDEFINED".into());
    }
    if t.data_location == DataLocation::External as i32 {
        return Err("still refers to external data".into());
    }
    let count = element_count(&t.dims)?;
    let populated: Vec<&str> = [
        (t.float_data.len(), "float_data"),
        (t.int32_data.len(), "int32_data"),
        (t.string_data.len(), "string_data"),
        (t.int64_data.len(), "int64_data"),
        (t.double_data.len(), "double_data"),
        (t.uint64_data.len(), "uint64_data"),
        (t.raw_data.len(), "raw_data"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(_, f)| *f)
    .collect();
    if populated.len() > 1 {
        return Err(format!(
            "carries data in several fields ({})",
            populated.join(", ")
        ));
    }
    if !t.raw_data.is_empty() {
        let Some(bits) = dt.bits() else {
            return Err(format!("of type {} cannot use raw_data", dt.name()));
        };
        let want = packed_bytes(count, bits).ok_or("has a shape whose byte size overflows")?;
        if want != t.raw_data.len() as u64 {
            return Err(format!(
                "has shape {:?} of {} ({} bytes) but carries {} bytes of raw_data",
                t.dims,
                dt.name(),
                want,
                t.raw_data.len()
            ));
        }
        return Ok(());
    }
    let field = dt.typed_field().expect("defined type has a field");
    let (have, field_name) = typed_len(t, field);
    if let Some(other) = populated.first()
        && *other != field_name
    {
        return Err(format!(
            "of type {} carries its data in {other}, expected {field_name}",
            dt.name()
        ));
    }
    let want = typed_entries(dt, count);
    if have as u64 != want {
        return Err(format!(
            "has shape {:?} of {} ({} elements) but {} entries in {}",
            t.dims,
            dt.name(),
            count,
            have,
            field_name
        ));
    }
    Ok(())
}

/// Size in bytes of the tensor's elements in their own type (packed for sub-byte types; strings counted
/// by their lengths).
pub fn payload_bytes(t: &TensorProto) -> u64 {
    let Ok(dt) = DataType::try_from(t.data_type) else {
        return 0;
    };
    let count = element_count(&t.dims).unwrap_or(0);
    match dt.bits() {
        Some(bits) => packed_bytes(count, bits).unwrap_or(u64::MAX),
        None => t.string_data.iter().map(|s| s.len() as u64).sum(),
    }
}

/// The tensor's payload as little-endian packed bytes (raw_data layout), converting from a typed field
/// when needed. Strings have no such layout and give None.
pub fn raw_bytes(t: &TensorProto) -> Option<Bytes> {
    if !t.raw_data.is_empty() {
        return Some(t.raw_data.clone());
    }
    let dt = DataType::try_from(t.data_type).ok()?;
    let bits = dt.bits()?;
    let count = element_count(&t.dims).ok()?;
    let mut out = Vec::with_capacity(packed_bytes(count, bits)? as usize);
    match dt.typed_field()? {
        TypedField::Float => t
            .float_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        TypedField::Double => t
            .double_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        TypedField::Int64 => t
            .int64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        TypedField::Uint64 => {
            for &v in &t.uint64_data {
                if dt == DataType::Uint32 {
                    out.extend_from_slice(&(v as u32).to_le_bytes());
                } else {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        TypedField::Int32 => match bits {
            // Each entry holds one element in its low bits (its bit pattern for 16-bit floats).
            8 => t.int32_data.iter().for_each(|&v| out.push(v as u8)),
            16 => t
                .int32_data
                .iter()
                .for_each(|&v| out.extend_from_slice(&(v as u16).to_le_bytes())),
            32 => t
                .int32_data
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            // Entries already pack two 4-bit or four 2-bit elements into their low byte.
            4 | 2 => t.int32_data.iter().for_each(|&v| out.push(v as u8)),
            6 => {
                let codes: Vec<u8> = t.int32_data.iter().map(|&v| (v & 0x3f) as u8).collect();
                for group in codes.chunks(4) {
                    let x = |i: usize| *group.get(i).unwrap_or(&0) as u32;
                    let word = x(0) | (x(1) << 6) | (x(2) << 12) | (x(3) << 18);
                    out.extend_from_slice(&word.to_le_bytes()[..3]);
                }
                out.truncate(packed_bytes(count, 6)? as usize);
            }
            _ => return None,
        },
        TypedField::String => return None,
    }
    Some(Bytes::from(out))
}

/// Decodes a numeric tensor to f32 (floats, 16-bit floats and integers). Other types give an error.
pub fn to_f32(t: &TensorProto) -> Result<Vec<f32>, String> {
    let dt = data_type(t.data_type)?;
    validate(t)?;
    let raw =
        raw_bytes(t).ok_or_else(|| format!("of type {} has no numeric payload", dt.name()))?;
    let v: Vec<f32> = match dt {
        DataType::Float => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DataType::Double => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        DataType::Float16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DataType::Bfloat16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DataType::Int8 => raw.iter().map(|&b| b as i8 as f32).collect(),
        DataType::Uint8 | DataType::Bool => raw.iter().map(|&b| b as f32).collect(),
        DataType::Int16 => raw
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
            .collect(),
        DataType::Uint16 => raw
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as f32)
            .collect(),
        DataType::Int32 => raw
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        DataType::Uint32 => raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        DataType::Int64 => raw
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        DataType::Uint64 => raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => return Err(format!("of type {} cannot be decoded to f32", other.name())),
    };
    Ok(v)
}

/// The declaration of a tensor value: its name, element type and fixed dims.
pub fn tensor_value_info(name: &str, elem_type: i32, dims: &[i64]) -> super::pb::ValueInfoProto {
    use super::pb::{TensorShapeProto, TypeProto, tensor_shape_proto, type_proto};
    super::pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A float32 tensor with raw_data, the form passes emit.
pub fn from_f32(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    let mut raw = Vec::with_capacity(values.len() * 4);
    values
        .iter()
        .for_each(|v| raw.extend_from_slice(&v.to_le_bytes()));
    TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: Bytes::from(raw),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_payload_must_agree() {
        let mut t = from_f32("w", &[2, 3], &[1.0; 6]);
        assert!(validate(&t).is_ok());
        t.dims = vec![1_000_000, 1_000_000];
        let e = validate(&t).unwrap_err();
        assert!(e.contains("24 bytes of raw_data"), "{e}");
        t.dims = vec![i64::MAX, 4];
        assert!(validate(&t).unwrap_err().contains("overflows"));
        t.dims = vec![-1, 6];
        assert!(validate(&t).unwrap_err().contains("negative"));
    }

    #[test]
    fn typed_fields_convert_to_raw_layout() {
        let t = TensorProto {
            dims: vec![3],
            data_type: DataType::Float16 as i32,
            int32_data: vec![0x3c00, 0x4000, 0xc000],
            ..Default::default()
        };
        assert_eq!(to_f32(&t).unwrap(), vec![1.0, 2.0, -2.0]);
        let t4 = TensorProto {
            dims: vec![3],
            data_type: DataType::Int4 as i32,
            int32_data: vec![0x21, 0x03],
            ..Default::default()
        };
        assert!(validate(&t4).is_ok());
        assert_eq!(raw_bytes(&t4).unwrap().as_ref(), &[0x21, 0x03]);
        let bad = TensorProto {
            dims: vec![5],
            data_type: DataType::Int4 as i32,
            int32_data: vec![1, 2],
            ..t4
        };
        assert!(validate(&bad).unwrap_err().contains("int32_data"));
    }

    #[test]
    fn data_in_the_wrong_field_is_named() {
        let t = TensorProto {
            dims: vec![2],
            data_type: DataType::Float as i32,
            int64_data: vec![1, 2],
            ..Default::default()
        };
        assert!(validate(&t).unwrap_err().contains("expected float_data"));
    }
}
