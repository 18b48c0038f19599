//! Reading and writing ONNX models on the protobuf wire format.
//!
//! A model rewritten through a decoded message would lose every field that
//! the partial schema in [`super::proto`] does not list. These helpers split
//! messages into their raw fields instead, so that a rewrite copies what it
//! does not change byte for byte.

use std::collections::HashMap;

use prost::Message;

use super::proto::{Dimension, TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto};

/// The name of a `ValueInfoProto` (field 1), decoded without the rest.
#[derive(Clone, PartialEq, Message)]
struct Named {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

/// The name of a `TensorProto` (field 8), decoded without its data.
#[derive(Clone, PartialEq, Message)]
struct NamedTensor {
    #[prost(string, optional, tag = "8")]
    name: Option<String>,
}

pub(super) fn value_name(payload: &[u8]) -> Option<String> {
    Named::decode(payload).ok()?.name
}

pub(super) fn named_tensor(payload: &[u8]) -> Option<String> {
    NamedTensor::decode(payload).ok()?.name
}

/// Builds the description of a float32 tensor, with its dimensions when
/// known.
pub(super) fn float_value(name: &str, dims: Option<Vec<Dimension>>) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto { elem_type: Some(1), shape: dims.map(|dim| TensorShapeProto { dim }) }),
        }),
    }
}

/// Copies a model, with its graph (field 7 of `ModelProto`) replaced by
/// what `rewrite` writes from the original graph's bytes.
pub(super) fn rewrite_graph(
    bytes: &[u8],
    rewrite: impl FnOnce(&[u8], &mut Vec<u8>) -> Result<(), String>,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(bytes.len() + 256);
    let mut rewrite = Some(rewrite);
    for field in fields(bytes)? {
        match (field.number, field.payload) {
            (7, Some(graph)) => {
                let rewrite = rewrite.take().ok_or("the model has more than one graph")?;
                let mut new_graph = Vec::with_capacity(graph.len() + 256);
                rewrite(graph, &mut new_graph)?;
                put_message(&mut out, 7, &new_graph);
            }
            _ => out.extend_from_slice(field.raw),
        }
    }
    if rewrite.is_some() {
        return Err(String::from("the model has no graph"));
    }
    Ok(out)
}

/// One field of a protobuf message.
pub(super) struct Field<'a> {
    pub number: u64,
    /// The whole field: key and value.
    pub raw: &'a [u8],
    /// The bytes of a length-delimited value.
    pub payload: Option<&'a [u8]>,
}

/// Splits a protobuf message into its fields, in order.
pub(super) fn fields(bytes: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let malformed = || String::from("the model file is not valid protobuf");
    let mut fields = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let start = at;
        let key = varint(bytes, &mut at).ok_or_else(malformed)?;
        let payload = match key & 7 {
            0 => {
                varint(bytes, &mut at).ok_or_else(malformed)?;
                None
            }
            1 => {
                at = at.checked_add(8).filter(|&end| end <= bytes.len()).ok_or_else(malformed)?;
                None
            }
            2 => {
                let length = varint(bytes, &mut at).ok_or_else(malformed)?;
                let end = usize::try_from(length)
                    .ok()
                    .and_then(|length| at.checked_add(length))
                    .filter(|&end| end <= bytes.len())
                    .ok_or_else(malformed)?;
                let payload = &bytes[at..end];
                at = end;
                Some(payload)
            }
            5 => {
                at = at.checked_add(4).filter(|&end| end <= bytes.len()).ok_or_else(malformed)?;
                None
            }
            _ => return Err(malformed()),
        };
        fields.push(Field { number: key >> 3, raw: &bytes[start..at], payload });
    }
    Ok(fields)
}

pub(super) fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Re-encodes a `NodeProto` with the inputs (field 1) named in `renames`
/// renamed; its other fields are copied as they are.
pub(super) fn rename_inputs(node: &[u8], renames: &HashMap<&str, &str>) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(node.len() + 16);
    for field in fields(node)? {
        let renamed = match (field.number, field.payload) {
            (1, Some(name)) => std::str::from_utf8(name).ok().and_then(|name| renames.get(name)),
            _ => None,
        };
        match renamed {
            Some(renamed) => put_message(&mut out, 1, renamed.as_bytes()),
            None => out.extend_from_slice(field.raw),
        }
    }
    Ok(out)
}

/// Appends a length-delimited field.
pub(super) fn put_message(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    put_varint(out, number << 3 | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

pub(super) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for value in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut at = 0;
            assert_eq!(varint(&out, &mut at), Some(value));
            assert_eq!(at, out.len());
        }
    }
}
