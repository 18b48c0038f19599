//! `stochflow inspect`: describe an ONNX model file. It reads the protobuf
//! directly, so it works without ONNX Runtime.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::model::dropout::{self, Ratio};
use crate::model::proto::{self, GraphProto, ValueInfoProto};

pub fn inspect(model_path: &Path, tensors: bool) -> anyhow::Result<ExitCode> {
    let bytes =
        std::fs::read(model_path).with_context(|| format!("cannot read model file {}", model_path.display()))?;
    let model = proto::decode(&bytes)
        .with_context(|| format!("{} is not an ONNX model (protobuf decoding failed)", model_path.display()))?;
    let graph = model.graph.clone().unwrap_or_default();
    let sha256: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();

    super::out!("model: {}", model_path.display());
    super::out!("  sha256: {sha256}");
    super::out!("  IR version: {}", model.ir_version.unwrap_or_default());
    let opsets: Vec<String> = model
        .opset_import
        .iter()
        .map(|o| {
            format!(
                "{} {}",
                o.domain.as_deref().filter(|d| !d.is_empty()).unwrap_or("ai.onnx"),
                o.version.unwrap_or_default()
            )
        })
        .collect();
    super::out!("  opsets: {}", opsets.join(", "));
    if let Some(producer) = model.producer_name.as_deref().filter(|p| !p.is_empty()) {
        let version = model.producer_version.as_deref().unwrap_or_default();
        super::out!("  producer: {}", format!("{producer} {version}").trim_end());
    }

    let initializers: HashMap<&str, &proto::TensorProto> =
        graph.initializer.iter().filter_map(|t| t.name.as_deref().map(|n| (n, t))).collect();
    super::out!("inputs:");
    for input in &graph.input {
        let name = input.name.as_deref().unwrap_or_default();
        let default = if initializers.contains_key(name) { "  (has a default: an initializer)" } else { "" };
        super::out!("  {}{default}", describe_value(input));
    }
    super::out!("outputs:");
    for output in &graph.output {
        super::out!("  {}", describe_value(output));
    }
    print_weights(&graph);
    print_dropout(&graph);
    if tensors {
        print_tensors(&graph);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints how many initializers the model has and how many float32 values
/// they hold: the weights that `weight_noise` perturbs.
fn print_weights(graph: &GraphProto) {
    let float32: Vec<&proto::TensorProto> = graph.initializer.iter().filter(|t| t.data_type == Some(1)).collect();
    let values: i64 = float32.iter().map(|t| t.dims.iter().product::<i64>()).sum();
    let perturbed = crate::model::weights::default_initializers(graph).len();
    super::out!(
        "initializers: {} (float32: {}, with {values} value{}; perturbed by weight_noise by default: {perturbed})",
        graph.initializer.len(),
        float32.len(),
        if values == 1 { "" } else { "s" }
    );
}

/// Lists the initializers with their types and shapes, then the tensors
/// computed by the main graph's nodes, in node order, with the node that
/// computes each and, where the model records it, the tensor's type.
fn print_tensors(graph: &GraphProto) {
    super::out!("initializer tensors:");
    for tensor in &graph.initializer {
        let dims: Vec<String> = tensor.dims.iter().map(i64::to_string).collect();
        super::out!(
            "  {}  {}  [{}]",
            tensor.name.as_deref().unwrap_or_default(),
            proto::data_type_name(tensor.data_type.unwrap_or_default()),
            dims.join(", ")
        );
    }
    let outputs: Vec<&str> = graph.output.iter().filter_map(|o| o.name.as_deref()).collect();
    let known: HashMap<&str, &ValueInfoProto> =
        graph.value_info.iter().chain(&graph.output).filter_map(|v| v.name.as_deref().map(|n| (n, v))).collect();
    super::out!("tensors computed by nodes:");
    for (index, node) in graph.node.iter().enumerate() {
        let op = node.op_type.as_deref().unwrap_or("?");
        let name = node.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| format!("node {index}"));
        for output in node.output.iter().filter(|o| !o.is_empty()) {
            let described = match known.get(output.as_str()) {
                Some(value) => describe_value(value),
                None => output.clone(),
            };
            let note = if outputs.contains(&output.as_str()) { "  (model output)" } else { "" };
            super::out!("  {described}  <- {op} {name}{note}");
        }
    }
}

/// Formats `name  dtype  [dims]`, with symbolic dimensions by name.
fn describe_value(value: &ValueInfoProto) -> String {
    let name = value.name.as_deref().unwrap_or_default();
    let Some(tensor) = value.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()) else {
        return format!("{name}  (not a tensor)");
    };
    let element = proto::data_type_name(tensor.elem_type.unwrap_or_default());
    let dims: Vec<String> = match &tensor.shape {
        Some(shape) => shape
            .dim
            .iter()
            .map(|d| match (&d.dim_value, &d.dim_param) {
                (Some(v), _) => v.to_string(),
                (None, Some(p)) if !p.is_empty() => p.clone(),
                _ => String::from("?"),
            })
            .collect(),
        None => vec![String::from("unknown rank")],
    };
    format!("{name}  {element}  [{}]", dims.join(", "))
}

fn print_dropout(graph: &GraphProto) {
    let dropouts = dropout::dropout_nodes(graph);
    super::out!("dropout nodes: {}", dropouts.len());
    for node in dropouts {
        let ratio = match &node.ratio {
            Ratio::Value(ratio) => format!("ratio {ratio}"),
            Ratio::Default => String::from("ratio 0.5 (default)"),
            Ratio::Computed(tensor) => format!("ratio from tensor {tensor:?}"),
        };
        super::out!("  {}  {ratio}  {} -> {}", node.name, node.input, node.output);
    }
}
