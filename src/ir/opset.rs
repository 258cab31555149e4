//! Operator sets: the model's imports, and the ONNX operator schemas (generated into onnx_ops.rs from the
//! pinned onnx package) used to check that an operator exists at the model's opset and that its
//! attributes have the declared types.

use std::collections::BTreeMap;

use crate::onnx::pb::AttributeProto;
use crate::onnx::pb::OperatorSetIdProto;
use crate::onnx::pb::attribute_proto::AttributeType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrType {
    Float,
    Int,
    String,
    Tensor,
    Graph,
    Floats,
    Ints,
    Strings,
    Tensors,
    Graphs,
    SparseTensor,
    SparseTensors,
    TypeProto,
    TypeProtos,
}

impl AttrType {
    fn proto(self) -> AttributeType {
        match self {
            AttrType::Float => AttributeType::Float,
            AttrType::Int => AttributeType::Int,
            AttrType::String => AttributeType::String,
            AttrType::Tensor => AttributeType::Tensor,
            AttrType::Graph => AttributeType::Graph,
            AttrType::Floats => AttributeType::Floats,
            AttrType::Ints => AttributeType::Ints,
            AttrType::Strings => AttributeType::Strings,
            AttrType::Tensors => AttributeType::Tensors,
            AttrType::Graphs => AttributeType::Graphs,
            AttrType::SparseTensor => AttributeType::SparseTensor,
            AttrType::SparseTensors => AttributeType::SparseTensors,
            AttrType::TypeProto => AttributeType::TypeProto,
            AttrType::TypeProtos => AttributeType::TypeProtos,
        }
    }
}

/// One version of an operator, as the ONNX schema registry declares it.
#[derive(Debug)]
pub struct OpSchema {
    pub domain: &'static str,
    pub op_type: &'static str,
    pub since: i64,
    pub deprecated: bool,
    pub attributes: &'static [(&'static str, AttrType)],
}

/// Domains whose operators quench knows from the ONNX schema registry.
pub fn is_standard_domain(domain: &str) -> bool {
    matches!(domain, "" | "ai.onnx" | "ai.onnx.ml")
}

fn canonical_domain(domain: &str) -> &str {
    if domain == "ai.onnx" { "" } else { domain }
}

/// The opset imports of a model: domain → version ("" and "ai.onnx" are the same domain).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Opsets(BTreeMap<String, i64>);

impl Opsets {
    pub fn from_imports(imports: &[OperatorSetIdProto]) -> Opsets {
        Opsets(
            imports
                .iter()
                .map(|o| (canonical_domain(o.domain()).to_string(), o.version()))
                .collect(),
        )
    }

    pub fn version(&self, domain: &str) -> Option<i64> {
        self.0.get(canonical_domain(domain)).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(d, v)| (d.as_str(), *v))
    }
}

/// The schema in force for `op_type` at `version` of `domain`, if the registry knows the operator.
pub fn schema(domain: &str, op_type: &str, version: i64) -> Option<&'static OpSchema> {
    let domain = canonical_domain(domain);
    let all = super::onnx_ops::SCHEMAS;
    let start = all.partition_point(|s| (s.domain, s.op_type) < (domain, op_type));
    all[start..]
        .iter()
        .take_while(|s| s.domain == domain && s.op_type == op_type)
        .filter(|s| s.since <= version)
        .last()
}

/// Whether the registry knows `op_type` in `domain` at any version.
pub fn is_known_op(domain: &str, op_type: &str) -> bool {
    schema(domain, op_type, i64::MAX).is_some()
}

/// The first version of `domain` that defines `op_type`.
pub fn first_version(domain: &str, op_type: &str) -> Option<i64> {
    let domain = canonical_domain(domain);
    super::onnx_ops::SCHEMAS
        .iter()
        .find(|s| s.domain == domain && s.op_type == op_type)
        .map(|s| s.since)
}

/// Checks one attribute against a schema: the name must be declared and the declared type must match
/// both the attribute's `type` field and the field that carries its value.
pub fn check_attribute(schema: &OpSchema, attr: &AttributeProto) -> Result<(), String> {
    if !attr.ref_attr_name().is_empty() {
        return Ok(()); // a reference to a function attribute: typed where the function is called
    }
    let Some((_, want)) = schema.attributes.iter().find(|(n, _)| *n == attr.name) else {
        return Err(format!(
            "is not an attribute of {} version {}",
            schema.op_type, schema.since
        ));
    };
    let declared = attr.r#type();
    let carried = carried_type(attr);
    let want = want.proto();
    if declared != AttributeType::Undefined && declared != want {
        return Err(format!(
            "has type {}, expected {}",
            declared.as_str_name(),
            want.as_str_name()
        ));
    }
    if let Some(c) = carried
        && c != want
    {
        return Err(format!(
            "carries a {} value, expected {}",
            c.as_str_name(),
            want.as_str_name()
        ));
    }
    Ok(())
}

/// The type of value an attribute actually carries, judged by its populated fields (None when only
/// defaults are present, e.g. an INT attribute equal to 0 in proto3 encoding).
fn carried_type(a: &AttributeProto) -> Option<AttributeType> {
    use AttributeType as T;
    Some(if !a.floats.is_empty() {
        T::Floats
    } else if !a.ints.is_empty() {
        T::Ints
    } else if !a.strings.is_empty() {
        T::Strings
    } else if !a.tensors.is_empty() {
        T::Tensors
    } else if !a.graphs.is_empty() {
        T::Graphs
    } else if !a.sparse_tensors.is_empty() {
        T::SparseTensors
    } else if !a.type_protos.is_empty() {
        T::TypeProtos
    } else if a.t.is_some() {
        T::Tensor
    } else if a.g.is_some() {
        T::Graph
    } else if a.sparse_tensor.is_some() {
        T::SparseTensor
    } else if a.tp.is_some() {
        T::TypeProto
    } else if a.s.is_some() {
        T::String
    } else if a.f.is_some() {
        T::Float
    } else if a.i.is_some() {
        T::Int
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_versions_resolve() {
        assert_eq!(schema("", "DequantizeLinear", 12).unwrap().since, 10);
        assert_eq!(schema("", "DequantizeLinear", 13).unwrap().since, 13);
        assert!(schema("", "DequantizeLinear", 9).is_none());
        assert_eq!(first_version("", "DequantizeLinear"), Some(10));
        assert!(schema("ai.onnx", "Conv", 17).is_some());
        assert!(schema("", "NoSuchOp", 17).is_none());
        let dq21 = schema("", "DequantizeLinear", 21).unwrap();
        assert!(dq21.attributes.iter().any(|(n, _)| *n == "block_size"));
    }

    #[test]
    fn wrong_attribute_types_are_named() {
        let conv = schema("", "Conv", 11).unwrap();
        let bad = AttributeProto {
            name: "kernel_shape".into(),
            r#type: Some(AttributeType::Float as i32),
            f: Some(3.0),
            ..Default::default()
        };
        assert!(
            check_attribute(conv, &bad)
                .unwrap_err()
                .contains("expected INTS")
        );
        let unknown = AttributeProto {
            name: "kernel".into(),
            r#type: Some(AttributeType::Ints as i32),
            ints: vec![3],
            ..Default::default()
        };
        assert!(
            check_attribute(conv, &unknown)
                .unwrap_err()
                .contains("not an attribute")
        );
        let good = AttributeProto {
            name: "kernel_shape".into(),
            r#type: Some(AttributeType::Ints as i32),
            ints: vec![3, 3],
            ..Default::default()
        };
        assert!(check_attribute(conv, &good).is_ok());
    }
}
