//! Element types of ONNX tensors: sizes in bits and which typed field of TensorProto holds them.

pub use super::pb::tensor_proto::DataType;

/// The typed repeated field of a TensorProto that can carry a data type's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypedField {
    Float,
    Int32,
    String,
    Int64,
    Double,
    Uint64,
}

pub trait DataTypeExt {
    /// Bits per element; None for strings and UNDEFINED.
    fn bits(self) -> Option<usize>;
    /// The typed field that holds this type when raw_data is not used, and how many field entries one
    /// element takes (complex numbers take two) or how many elements one entry packs (sub-byte types).
    fn typed_field(self) -> Option<TypedField>;
    fn is_float(self) -> bool;
    fn name(self) -> &'static str;
}

impl DataTypeExt for DataType {
    fn bits(self) -> Option<usize> {
        use DataType::*;
        Some(match self {
            Undefined | String => return None,
            Bool | Uint8 | Int8 | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz
            | Float8e8m0 => 8,
            Uint16 | Int16 | Float16 | Bfloat16 => 16,
            Float | Int32 | Uint32 => 32,
            Int64 | Uint64 | Double | Complex64 => 64,
            Complex128 => 128,
            Uint4 | Int4 | Float4e2m1 => 4,
            Uint2 | Int2 => 2,
            Float6e2m3 | Float6e3m2 => 6,
        })
    }

    fn typed_field(self) -> Option<TypedField> {
        use DataType::*;
        Some(match self {
            Undefined => return None,
            Float | Complex64 => TypedField::Float,
            Double | Complex128 => TypedField::Double,
            Int64 => TypedField::Int64,
            Uint32 | Uint64 => TypedField::Uint64,
            String => TypedField::String,
            _ => TypedField::Int32,
        })
    }

    fn is_float(self) -> bool {
        use DataType::*;
        matches!(
            self,
            Float
                | Double
                | Float16
                | Bfloat16
                | Float8e4m3fn
                | Float8e4m3fnuz
                | Float8e5m2
                | Float8e5m2fnuz
                | Float8e8m0
                | Float4e2m1
                | Float6e2m3
                | Float6e3m2
        )
    }

    fn name(self) -> &'static str {
        self.as_str_name()
    }
}

/// Decodes a data_type code, naming it when unknown.
pub fn data_type(code: i32) -> Result<DataType, String> {
    DataType::try_from(code).map_err(|_| format!("has unknown data_type {code}"))
}

/// Packed byte length of `count` elements of `bits` each (sub-byte types are packed densely).
pub fn packed_bytes(count: u64, bits: usize) -> Option<u64> {
    count.checked_mul(bits as u64).map(|b| b.div_ceil(8))
}
