//! A runtime-neutral tensor: the values that flow between input sets, runtimes and metrics.
//!
//! Each runtime has its own tensor type; this one is the meeting point. It holds an ndarray of one of the
//! element types ONNX models take as inputs or give as outputs, and converts from and to ONNX
//! `TensorProto` (the onnx test-data layout), so no runtime type leaks into the rest of quench.

use std::borrow::Cow;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use half::f16;
use ndarray::{ArrayD, ArrayViewD, IxDyn};

use crate::onnx::dtype::{DataType, DataTypeExt, data_type};
use crate::onnx::pb::TensorProto;
use crate::onnx::tensor::{raw_bytes, validate};

/// One named tensor of a batch.
pub type Named = (String, Tensor);

#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<f16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    I16(ArrayD<i16>),
    I8(ArrayD<i8>),
    U64(ArrayD<u64>),
    U32(ArrayD<u32>),
    U16(ArrayD<u16>),
    U8(ArrayD<u8>),
    Bool(ArrayD<bool>),
}

/// Applies `$body` to the array inside any variant, bound to `$a`.
#[macro_export]
#[doc(hidden)]
macro_rules! each_tensor {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            $crate::exec::Tensor::F32($a) => $body,
            $crate::exec::Tensor::F64($a) => $body,
            $crate::exec::Tensor::F16($a) => $body,
            $crate::exec::Tensor::I64($a) => $body,
            $crate::exec::Tensor::I32($a) => $body,
            $crate::exec::Tensor::I16($a) => $body,
            $crate::exec::Tensor::I8($a) => $body,
            $crate::exec::Tensor::U64($a) => $body,
            $crate::exec::Tensor::U32($a) => $body,
            $crate::exec::Tensor::U16($a) => $body,
            $crate::exec::Tensor::U8($a) => $body,
            $crate::exec::Tensor::Bool($a) => $body,
        }
    };
}
pub use each_tensor;

impl Tensor {
    pub fn data_type(&self) -> DataType {
        match self {
            Tensor::F32(_) => DataType::Float,
            Tensor::F64(_) => DataType::Double,
            Tensor::F16(_) => DataType::Float16,
            Tensor::I64(_) => DataType::Int64,
            Tensor::I32(_) => DataType::Int32,
            Tensor::I16(_) => DataType::Int16,
            Tensor::I8(_) => DataType::Int8,
            Tensor::U64(_) => DataType::Uint64,
            Tensor::U32(_) => DataType::Uint32,
            Tensor::U16(_) => DataType::Uint16,
            Tensor::U8(_) => DataType::Uint8,
            Tensor::Bool(_) => DataType::Bool,
        }
    }

    /// The ONNX name of the element type, in lower case (`float`, `int64`, …).
    pub fn dtype_name(&self) -> String {
        self.data_type().name().to_ascii_lowercase()
    }

    pub fn shape(&self) -> &[usize] {
        each_tensor!(self, a => a.shape())
    }

    pub fn len(&self) -> usize {
        each_tensor!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_float(&self) -> bool {
        matches!(self, Tensor::F32(_) | Tensor::F64(_) | Tensor::F16(_))
    }

    /// The values as f32, borrowed when they already are. Every numeric type converts (integers exactly
    /// up to 2^24); bools become 0 and 1.
    pub fn to_f32(&self) -> Cow<'_, ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Cow::Borrowed(a),
            Tensor::F64(a) => Cow::Owned(a.mapv(|v| v as f32)),
            Tensor::F16(a) => Cow::Owned(a.mapv(f32::from)),
            Tensor::I64(a) => Cow::Owned(a.mapv(|v| v as f32)),
            Tensor::I32(a) => Cow::Owned(a.mapv(|v| v as f32)),
            Tensor::I16(a) => Cow::Owned(a.mapv(f32::from)),
            Tensor::I8(a) => Cow::Owned(a.mapv(f32::from)),
            Tensor::U64(a) => Cow::Owned(a.mapv(|v| v as f32)),
            Tensor::U32(a) => Cow::Owned(a.mapv(|v| v as f32)),
            Tensor::U16(a) => Cow::Owned(a.mapv(f32::from)),
            Tensor::U8(a) => Cow::Owned(a.mapv(f32::from)),
            Tensor::Bool(a) => Cow::Owned(a.mapv(|v| if v { 1.0 } else { 0.0 })),
        }
    }

    /// How many elements are NaN or infinite (always 0 for integer tensors).
    pub fn non_finite(&self) -> usize {
        match self {
            Tensor::F32(a) => a.iter().filter(|v| !v.is_finite()).count(),
            Tensor::F64(a) => a.iter().filter(|v| !v.is_finite()).count(),
            Tensor::F16(a) => a.iter().filter(|v| !v.is_finite()).count(),
            _ => 0,
        }
    }

    /// Splits along axis 0 into pieces of at most `size` rows.
    pub fn split_rows(&self, size: usize) -> Result<Vec<Tensor>> {
        fn split<T: Clone>(
            a: &ArrayD<T>,
            size: usize,
            wrap: fn(ArrayD<T>) -> Tensor,
        ) -> Vec<Tensor> {
            a.axis_chunks_iter(ndarray::Axis(0), size.max(1))
                .map(|c| wrap(c.to_owned()))
                .collect()
        }
        if self.shape().is_empty() {
            bail!("a scalar has no rows to split");
        }
        Ok(match self {
            Tensor::F32(a) => split(a, size, Tensor::F32),
            Tensor::F64(a) => split(a, size, Tensor::F64),
            Tensor::F16(a) => split(a, size, Tensor::F16),
            Tensor::I64(a) => split(a, size, Tensor::I64),
            Tensor::I32(a) => split(a, size, Tensor::I32),
            Tensor::I16(a) => split(a, size, Tensor::I16),
            Tensor::I8(a) => split(a, size, Tensor::I8),
            Tensor::U64(a) => split(a, size, Tensor::U64),
            Tensor::U32(a) => split(a, size, Tensor::U32),
            Tensor::U16(a) => split(a, size, Tensor::U16),
            Tensor::U8(a) => split(a, size, Tensor::U8),
            Tensor::Bool(a) => split(a, size, Tensor::Bool),
        })
    }

    /// Decodes an ONNX TensorProto (raw_data or typed fields).
    pub fn from_proto(t: &TensorProto) -> Result<Tensor> {
        let dt = data_type(t.data_type).map_err(|e| anyhow::anyhow!("tensor '{}' {e}", t.name))?;
        validate(t).map_err(|e| anyhow::anyhow!("tensor '{}' {e}", t.name))?;
        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let raw = raw_bytes(t).with_context(|| {
            format!(
                "tensor '{}' of type {} has no numeric payload",
                t.name,
                dt.name()
            )
        })?;
        fn decode<T: LeBytes>(raw: &[u8], shape: Vec<usize>, name: &str) -> Result<ArrayD<T>> {
            let v = raw.chunks_exact(T::SIZE).map(T::from_le).collect();
            ArrayD::from_shape_vec(IxDyn(&shape), v)
                .map_err(|e| anyhow::anyhow!("tensor '{name}': {e}"))
        }
        macro_rules! by_type {
            ($($dt:ident => $v:ident),*) => {
                match dt {
                    $(DataType::$dt => Tensor::$v(decode(&raw, shape, &t.name)?),)*
                    other => bail!(
                        "tensor '{}' has type {}, which quench cannot feed to a runtime",
                        t.name,
                        other.name()
                    ),
                }
            };
        }
        Ok(
            by_type!(Float => F32, Double => F64, Float16 => F16, Int64 => I64, Int32 => I32,
            Int16 => I16, Int8 => I8, Uint64 => U64, Uint32 => U32, Uint16 => U16, Uint8 => U8,
            Bool => Bool),
        )
    }

    /// Encodes as an ONNX TensorProto with raw_data.
    pub fn to_proto(&self, name: &str) -> TensorProto {
        let mut raw = Vec::with_capacity(self.len() * 8);
        each_tensor!(self, a => a.iter().for_each(|v| v.put_le(&mut raw)));
        TensorProto {
            name: name.to_string(),
            dims: self.shape().iter().map(|&d| d as i64).collect(),
            data_type: self.data_type() as i32,
            raw_data: Bytes::from(raw),
            ..Default::default()
        }
    }
}

/// Little-endian element encoding, the raw_data layout of TensorProto.
trait LeBytes: Sized + Copy {
    const SIZE: usize;
    fn from_le(b: &[u8]) -> Self;
    fn put_le(&self, out: &mut Vec<u8>);
}

macro_rules! le_bytes {
    ($($t:ty),*) => {$(
        impl LeBytes for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_le(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("chunk of the element size"))
            }
            fn put_le(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
le_bytes!(f32, f64, f16, i64, i32, i16, i8, u64, u32, u16, u8);

impl LeBytes for bool {
    const SIZE: usize = 1;
    fn from_le(b: &[u8]) -> Self {
        b[0] != 0
    }
    fn put_le(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

macro_rules! from_array {
    ($($t:ty => $v:ident),*) => {$(
        impl From<ArrayD<$t>> for Tensor {
            fn from(a: ArrayD<$t>) -> Tensor {
                Tensor::$v(a)
            }
        }
        impl<'a> TryFrom<&'a Tensor> for ArrayViewD<'a, $t> {
            type Error = anyhow::Error;
            fn try_from(t: &'a Tensor) -> Result<ArrayViewD<'a, $t>> {
                match t {
                    Tensor::$v(a) => Ok(a.view()),
                    other => bail!("tensor holds {}, not {}", other.dtype_name(), stringify!($t)),
                }
            }
        }
    )*};
}
from_array!(f32 => F32, f64 => F64, f16 => F16, i64 => I64, i32 => I32, i16 => I16, i8 => I8,
    u64 => U64, u32 => U32, u16 => U16, u8 => U8, bool => Bool);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip_keeps_type_shape_and_values() {
        let cases = [
            Tensor::F32(
                ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, -2.5, 3.0, f32::NAN, 0.0, 7.0])
                    .unwrap(),
            ),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[3]), vec![-1, 0, i64::MAX]).unwrap()),
            Tensor::Bool(ArrayD::from_shape_vec(IxDyn(&[2]), vec![true, false]).unwrap()),
            Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[]), vec![9]).unwrap()),
            Tensor::F16(ArrayD::from_shape_vec(IxDyn(&[1]), vec![f16::from_f32(0.5)]).unwrap()),
        ];
        for t in cases {
            let back = Tensor::from_proto(&t.to_proto("t")).unwrap();
            assert_eq!(back.shape(), t.shape());
            assert_eq!(back.data_type(), t.data_type());
            assert_eq!(format!("{back:?}"), format!("{t:?}"));
        }
    }

    #[test]
    fn split_rows_makes_ragged_last_piece() {
        let t = Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[5, 2]), (0..10).collect()).unwrap());
        let parts = t.split_rows(2).unwrap();
        let shapes: Vec<_> = parts.iter().map(|p| p.shape().to_vec()).collect();
        assert_eq!(shapes, vec![vec![2, 2], vec![2, 2], vec![1, 2]]);
    }
}
