//! Monte Carlo dropout: Dropout nodes kept active at inference, with masks
//! that follow the randomness contract.
//!
//! ONNX Runtime removes Dropout nodes when it optimizes a graph, and a
//! Dropout it kept would draw its mask from its own generator. So each
//! Dropout node `y = Dropout(x, ratio)` is rewritten into `y = Mul(x, mask)`,
//! where `mask` is a new model input that the `infer` stage fills: per
//! element, `1 / (1 - ratio)` with probability `1 - ratio`, else 0, as a
//! Dropout node in training mode computes.
//!
//! The rewrite works on the protobuf wire format. Every field of the model
//! is copied as it is, except the Dropout nodes, which are replaced, and
//! the graph's inputs, which gain the masks. The partial schema in
//! [`super::proto`] is used only to read what is rewritten.

use std::collections::{HashMap, HashSet};

use prost::Message;

use super::proto::{
    AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, TensorProto, TensorShapeProto, TensorTypeProto,
    TypeProto, ValueInfoProto,
};

/// The ratio of a Dropout node.
#[derive(Clone, Debug, PartialEq)]
pub enum Ratio {
    /// A constant: an attribute (before opset 12), an initializer or the
    /// output of a Constant node.
    Value(f32),
    /// No ratio given: ONNX's default, 0.5.
    Default,
    /// Computed by the graph from the named tensor.
    Computed(String),
}

impl Ratio {
    /// Returns the ratio when it is known before the model runs.
    pub fn value(&self) -> Option<f32> {
        match self {
            Ratio::Value(ratio) => Some(*ratio),
            Ratio::Default => Some(0.5),
            Ratio::Computed(_) => None,
        }
    }
}

/// A Dropout node of a model's main graph.
#[derive(Clone, Debug)]
pub struct DropoutNode {
    /// The node's name, or `dropout{index}` for an unnamed node.
    pub name: String,
    /// The tensor the node drops elements of.
    pub input: String,
    pub output: String,
    /// The optional mask output, when the node names one.
    pub mask_output: Option<String>,
    pub ratio: Ratio,
    /// Whether the node's `training_mode` input is a constant true, so
    /// that ONNX Runtime drops elements with its own generator.
    pub training: bool,
    /// The tensor of the `training_mode` input, when the node has one.
    pub training_input: Option<String>,
}

/// Lists the Dropout nodes of a graph in node order. An unnamed node is
/// called `dropout` followed by its index among the graph's nodes, made
/// unique with underscores.
pub fn dropout_nodes(graph: &GraphProto) -> Vec<DropoutNode> {
    let mut names: HashSet<String> = graph.node.iter().filter_map(|node| node.name.clone()).collect();
    let initializers: HashMap<&str, &TensorProto> =
        graph.initializer.iter().filter_map(|t| t.name.as_deref().map(|n| (n, t))).collect();
    let constants: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .filter(|node| node.op_type.as_deref() == Some("Constant"))
        .filter_map(|node| node.output.first().map(|output| (output.as_str(), node)))
        .collect();
    graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, node)| node.op_type.as_deref() == Some("Dropout"))
        .map(|(index, node)| {
            // Before opset 12 the ratio is an attribute; from 12 on, an optional input.
            let attribute = node.attribute.iter().find(|a| a.name.as_deref() == Some("ratio")).and_then(|a| a.f);
            let constant = |name: &str| {
                initializers.get(name).copied().or_else(|| constants.get(name).and_then(|node| constant_tensor(node)))
            };
            let ratio = match (attribute, node.input.get(1).filter(|name| !name.is_empty())) {
                (Some(ratio), _) => Ratio::Value(ratio),
                (None, None) => Ratio::Default,
                (None, Some(name)) => constant(name)
                    .and_then(scalar_f32)
                    .or_else(|| constants.get(name.as_str()).and_then(|node| constant_float(node)))
                    .map_or_else(|| Ratio::Computed(name.clone()), Ratio::Value),
            };
            let training = node
                .input
                .get(2)
                .filter(|name| !name.is_empty())
                .and_then(|name| constant(name))
                .and_then(scalar_bool)
                .unwrap_or(false);
            let name = match node.name.clone().filter(|name| !name.is_empty()) {
                Some(name) => name,
                None => {
                    let mut name = format!("dropout{index}");
                    while names.contains(&name) {
                        name.push('_');
                    }
                    names.insert(name.clone());
                    name
                }
            };
            DropoutNode {
                name,
                input: node.input.first().cloned().unwrap_or_default(),
                output: node.output.first().cloned().unwrap_or_default(),
                mask_output: node.output.get(1).filter(|name| !name.is_empty()).cloned(),
                ratio,
                training,
                training_input: node.input.get(2).filter(|name| !name.is_empty()).cloned(),
            }
        })
        .collect()
}

/// Returns the name of the first Dropout node that runs in training mode,
/// if the model has one: its `training_mode` is a constant true in the
/// model, or a model input that `known` gives a nonzero value. Models
/// without the word "Dropout" in their bytes are not decoded.
pub fn training_node(bytes: &[u8], known: &HashMap<String, f32>) -> Option<String> {
    bytes.windows(7).any(|window| window == b"Dropout").then_some(())?;
    let model = super::proto::decode(bytes).ok()?;
    let fed_true = |node: &DropoutNode| {
        node.training_input.as_ref().and_then(|input| known.get(input)).is_some_and(|&value| value != 0.0)
    };
    dropout_nodes(model.graph.as_ref()?).into_iter().find(|node| node.training || fed_true(node)).map(|node| node.name)
}

/// Reads a float32 or float64 scalar tensor as float32.
pub fn scalar_f32(tensor: &TensorProto) -> Option<f32> {
    if tensor.dims.iter().product::<i64>() != 1 {
        return None;
    }
    let raw = tensor.raw_data.as_deref();
    match tensor.data_type? {
        1 => tensor.float_data.first().copied().or_else(|| Some(f32::from_le_bytes(raw?.get(..4)?.try_into().ok()?))),
        11 => tensor
            .double_data
            .first()
            .copied()
            .or_else(|| Some(f64::from_le_bytes(raw?.get(..8)?.try_into().ok()?)))
            .map(|value| value as f32),
        _ => None,
    }
}

/// Reads a bool scalar tensor.
fn scalar_bool(tensor: &TensorProto) -> Option<bool> {
    if tensor.data_type != Some(9) || tensor.dims.iter().product::<i64>() != 1 {
        return None;
    }
    let value = match tensor.int32_data.first() {
        Some(&value) => value,
        None => i32::from(*tensor.raw_data.as_deref()?.first()?),
    };
    Some(value != 0)
}

/// Returns the tensor of a Constant node given by its `value` attribute.
fn constant_tensor(node: &NodeProto) -> Option<&TensorProto> {
    node.attribute.iter().find(|a| a.name.as_deref() == Some("value")).and_then(|a| a.t.as_ref())
}

/// Reads the `value_float` attribute of a Constant node.
fn constant_float(node: &NodeProto) -> Option<f32> {
    node.attribute.iter().find(|a| a.name.as_deref() == Some("value_float")).and_then(|a| a.f)
}

/// A Dropout node rewritten into a multiplication by a mask input.
#[derive(Clone, Debug)]
pub struct MaskSite {
    pub node: String,
    /// The name of the `Mul` node that replaces it.
    pub mul: String,
    /// The tensor the mask multiplies.
    pub input: String,
    pub output: String,
    /// The model input that takes the mask.
    pub mask: String,
    pub ratio: f32,
}

/// Finds the Dropout nodes that Monte Carlo dropout rewrites, or returns
/// why the model cannot have its dropout kept active. `known` gives the
/// values of model inputs that the pipeline feeds a constant scalar, which
/// a ratio may come from.
pub fn mask_sites(model: &ModelProto, known: &HashMap<String, f32>) -> Result<Vec<MaskSite>, String> {
    let graph = model.graph.clone().unwrap_or_default();
    let nodes = dropout_nodes(&graph);
    if nodes.is_empty() {
        return Err(String::from(
            "the model has no Dropout nodes, so there is no dropout to keep active; export the model with its Dropout layers (converters often remove them in inference mode), or remove `mc_dropout`",
        ));
    }
    let mut used: HashSet<&str> = graph.node.iter().flat_map(|node| node.input.iter().map(String::as_str)).collect();
    used.extend(graph.output.iter().filter_map(|output| output.name.as_deref()));
    let mut names: HashSet<String> = graph.input.iter().filter_map(|input| input.name.clone()).collect();
    names.extend(graph.node.iter().flat_map(|node| node.output.iter().cloned()));
    names.extend(graph.initializer.iter().filter_map(|tensor| tensor.name.clone()));
    let mut node_names: HashSet<String> = graph.node.iter().filter_map(|node| node.name.clone()).collect();

    let mut sites = Vec::new();
    for node in nodes {
        if let Some(mask) = node.mask_output.as_deref().filter(|mask| used.contains(mask)) {
            return Err(format!(
                "Dropout node {:?} has its mask output {mask:?} read by another node or listed as a model output; the rewritten node has no mask output, so export the model without that use of the mask",
                node.name
            ));
        }
        let ratio = match &node.ratio {
            Ratio::Computed(tensor) => known.get(tensor).copied().map_or(node.ratio.value(), Some),
            other => other.value(),
        };
        let ratio = match ratio {
            Some(ratio) if (0.0..1.0).contains(&ratio) => ratio,
            Some(ratio) => {
                return Err(format!("Dropout node {:?} has ratio {ratio}; a ratio must be in [0, 1)", node.name));
            }
            None => {
                let Ratio::Computed(tensor) = &node.ratio else { unreachable!("only a computed ratio has no value") };
                return Err(format!(
                    "Dropout node {:?} takes its ratio from {tensor:?}, which is not a float scalar known before the model runs; give the ratio as an attribute, an initializer, a Constant node, or a model input fed by a one-value entry under `constants`",
                    node.name
                ));
            }
        };
        let mut mask = format!("stochflow.dropout_mask.{}", node.name);
        while names.contains(&mask) {
            mask.push('_');
        }
        names.insert(mask.clone());
        let mut mul = format!("{}.mask", node.name);
        while node_names.contains(&mul) {
            mul.push('_');
        }
        node_names.insert(mul.clone());
        sites.push(MaskSite { node: node.name, mul, input: node.input, output: node.output, mask, ratio });
    }
    Ok(sites)
}

/// Returns the model with each site's Dropout node replaced by `Mul(input,
/// mask)` and the masks added as float32 inputs of shape `[N, shape...]`,
/// where `shapes` gives each site's per-record shape. The ratios and
/// training flags that only the replaced nodes read are removed, with the
/// initializers and Constant nodes that give them, because ONNX Runtime
/// warns about unused initializers.
pub fn with_masks(bytes: &[u8], sites: &[MaskSite], shapes: &[Vec<usize>]) -> Result<Vec<u8>, String> {
    rewrite_graph(bytes, |graph, out| {
        let node_error = |err: prost::DecodeError| format!("cannot read a graph node: {err}");
        let site_of = |node: &NodeProto| {
            sites.iter().find(|site| {
                node.op_type.as_deref() == Some("Dropout")
                    && node.input.first() == Some(&site.input)
                    && node.output.first() == Some(&site.output)
            })
        };
        // Tensors read by the replaced nodes' other inputs and by nothing else.
        let mut unused: HashSet<String> = HashSet::new();
        let mut kept_reads: HashSet<String> = HashSet::new();
        let mut subgraphs = false;
        let mut initialized: HashSet<String> = HashSet::new();
        for field in fields(graph)? {
            match (field.number, field.payload) {
                (1, Some(payload)) => {
                    let node = NodeProto::decode(payload).map_err(node_error)?;
                    subgraphs |= matches!(node.op_type.as_deref(), Some("If" | "Loop" | "Scan"))
                        || node.attribute.iter().any(|attribute| matches!(attribute.r#type, Some(5 | 10)));
                    if site_of(&node).is_some() {
                        unused.extend(node.input.iter().skip(1).filter(|name| !name.is_empty()).cloned());
                    } else {
                        kept_reads.extend(node.input);
                    }
                }
                (12, Some(payload)) => {
                    kept_reads.extend(value_name(payload));
                }
                (5, Some(payload)) => initialized.extend(named_tensor(payload)),
                _ => {}
            }
        }
        unused.retain(|name| !kept_reads.contains(name));
        // A subgraph may read any tensor of the main graph by name.
        if subgraphs {
            unused.clear();
        }

        for field in fields(graph)? {
            match (field.number, field.payload) {
                (1, Some(payload)) => {
                    let node = NodeProto::decode(payload).map_err(node_error)?;
                    if let Some(site) = site_of(&node) {
                        let mul = NodeProto {
                            input: vec![site.input.clone(), site.mask.clone()],
                            output: vec![site.output.clone()],
                            name: Some(site.mul.clone()),
                            op_type: Some(String::from("Mul")),
                            attribute: Vec::<AttributeProto>::new(),
                        };
                        put_message(out, 1, &mul.encode_to_vec());
                    } else if node.op_type.as_deref() == Some("Constant")
                        && node.output.len() == 1
                        && unused.contains(&node.output[0])
                    {
                        // A ratio that only the replaced node read.
                    } else {
                        out.extend_from_slice(field.raw);
                    }
                }
                // Initializers (5) of removed ratios, and graph inputs (11) that name them.
                (5, Some(payload)) if named_tensor(payload).is_some_and(|name| unused.contains(&name)) => {}
                // A graph input without an initializer is fed by the pipeline.
                (11, Some(payload))
                    if value_name(payload)
                        .is_some_and(|name| unused.contains(&name) && initialized.contains(&name)) => {}
                _ => out.extend_from_slice(field.raw),
            }
        }
        for (site, shape) in sites.iter().zip(shapes) {
            let mut dims = vec![Dimension { dim_value: None, dim_param: Some(String::from("N")) }];
            dims.extend(shape.iter().map(|&size| Dimension { dim_value: Some(size as i64), dim_param: None }));
            put_message(out, 11, &float_value(&site.mask, Some(dims)).encode_to_vec());
        }
        Ok(())
    })
}

/// Returns the model with `names` added as float32 graph outputs of unknown
/// shape, so that a run reports the shapes of those tensors.
pub fn with_outputs(bytes: &[u8], names: &[String]) -> Result<Vec<u8>, String> {
    rewrite_graph(bytes, |graph, out| {
        out.extend_from_slice(graph);
        for name in names {
            put_message(out, 12, &float_value(name, None).encode_to_vec());
        }
        Ok(())
    })
}

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

fn value_name(payload: &[u8]) -> Option<String> {
    Named::decode(payload).ok()?.name
}

fn named_tensor(payload: &[u8]) -> Option<String> {
    NamedTensor::decode(payload).ok()?.name
}

/// Builds the description of a float32 tensor, with its dimensions when
/// known.
fn float_value(name: &str, dims: Option<Vec<Dimension>>) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto { elem_type: Some(1), shape: dims.map(|dim| TensorShapeProto { dim }) }),
        }),
    }
}

/// Copies a model, with its graph (field 7 of `ModelProto`) replaced by
/// what `rewrite` writes from the original graph's bytes.
fn rewrite_graph(
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
struct Field<'a> {
    number: u64,
    /// The whole field: key and value.
    raw: &'a [u8],
    /// The bytes of a length-delimited value.
    payload: Option<&'a [u8]>,
}

/// Splits a protobuf message into its fields, in order.
fn fields(bytes: &[u8]) -> Result<Vec<Field<'_>>, String> {
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

fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
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

/// Appends a length-delimited field.
fn put_message(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    put_varint(out, number << 3 | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/fixtures/models/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn ratios_come_from_initializer_and_constant() {
        let model = super::super::proto::decode(&fixture("dropout_pair.onnx")).unwrap();
        let nodes = dropout_nodes(model.graph.as_ref().unwrap());
        let found: Vec<(&str, &str, Ratio)> =
            nodes.iter().map(|node| (node.name.as_str(), node.input.as_str(), node.ratio.clone())).collect();
        assert_eq!(found, [("drop_in", "x", Ratio::Value(0.25)), ("drop_out", "h", Ratio::Value(0.5))]);
    }

    #[test]
    fn masked_model_keeps_other_fields() {
        let bytes = fixture("mlp_digits.onnx");
        let model = super::super::proto::decode(&bytes).unwrap();
        let sites = mask_sites(&model, &HashMap::new()).unwrap();
        assert_eq!(sites.len(), 1);
        assert_eq!(sites[0].mask, "stochflow.dropout_mask.dropout1");
        assert_eq!(sites[0].ratio, 0.2);
        let masked = with_masks(&bytes, &sites, &[vec![128]]).unwrap();
        let rewritten = super::super::proto::decode(&masked).unwrap();
        let graph = rewritten.graph.as_ref().unwrap();
        let original = model.graph.as_ref().unwrap();
        assert!(dropout_nodes(graph).is_empty(), "a Dropout node is left");
        assert_eq!(graph.node.len(), original.node.len());
        let mul = graph.node.iter().find(|node| node.name.as_deref() == Some("dropout1.mask")).unwrap();
        assert_eq!(mul.input, [sites[0].input.clone(), sites[0].mask.clone()]);
        assert_eq!(graph.input.len(), original.input.len() + 1);
        // The weights are copied as they are; the ratio, which only the
        // Dropout node read, is removed.
        let weights: Vec<_> =
            original.initializer.iter().filter(|t| t.name.as_deref() != Some("dropout.ratio")).cloned().collect();
        assert_eq!(weights.len(), original.initializer.len() - 1, "the fixture's ratio is an initializer");
        assert_eq!(graph.initializer, weights);
        assert_eq!(rewritten.opset_import, model.opset_import);
        assert_eq!(rewritten.ir_version, model.ir_version);
    }

    #[test]
    fn model_without_dropout_is_rejected() {
        let model = super::super::proto::decode(&fixture("conv_photos.onnx")).unwrap();
        let error = mask_sites(&model, &HashMap::new()).unwrap_err();
        assert!(error.starts_with("the model has no Dropout nodes"), "{error}");
    }

    #[test]
    fn truncated_model_is_malformed() {
        let bytes = fixture("mlp_digits.onnx");
        let error = with_outputs(&bytes[..bytes.len() / 2], &[String::from("h")]).unwrap_err();
        assert_eq!(error, "the model file is not valid protobuf");
    }

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
