//! Small ONNX models built in the tests, for cases the fixtures do not
//! cover.

use prost::Message;
use stochflow::model::proto::{
    Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TensorTypeProto,
    TypeProto, ValueInfoProto,
};

/// Builds a float32 tensor description; `None` is the batch dimension `N`.
pub fn value(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&size| match size {
            Some(size) => Dimension { dim_value: Some(size), dim_param: None },
            None => Dimension { dim_value: None, dim_param: Some(String::from("N")) },
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto { elem_type: Some(1), shape: Some(TensorShapeProto { dim }) }),
        }),
    }
}

/// Builds a bool scalar description.
pub fn bool_value(name: &str) -> ValueInfoProto {
    let mut value = value(name, &[]);
    value.r#type.as_mut().unwrap().tensor_type.as_mut().unwrap().elem_type = Some(9);
    value
}

pub fn node(op: &str, inputs: &[&str], outputs: &[&str], name: Option<&str>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: name.map(String::from),
        op_type: Some(op.to_string()),
        attribute: Vec::new(),
    }
}

/// Builds a float32 tensor of the given shape and values.
pub fn float_tensor(name: &str, dims: &[i64], values: Vec<f32>) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: Some(1),
        float_data: values,
        name: Some(name.to_string()),
        ..Default::default()
    }
}

pub fn float_scalar(name: &str, value: f32) -> TensorProto {
    TensorProto { data_type: Some(1), float_data: vec![value], name: Some(name.to_string()), ..Default::default() }
}

pub fn bool_scalar(name: &str, value: bool) -> TensorProto {
    TensorProto {
        data_type: Some(9),
        int32_data: vec![i32::from(value)],
        name: Some(name.to_string()),
        ..Default::default()
    }
}

/// Writes an opset 17 model to `path`.
pub fn write(
    path: &std::path::Path,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
) {
    let model = ModelProto {
        ir_version: Some(8),
        producer_name: Some(String::from("stochflow-tests")),
        producer_version: None,
        graph: Some(GraphProto {
            node: nodes,
            name: Some(String::from("test")),
            initializer: initializers,
            input: inputs,
            output: outputs,
            value_info: Vec::new(),
        }),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
    };
    std::fs::write(path, model.encode_to_vec()).unwrap();
}
