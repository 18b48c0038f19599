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
//! Dropout can also be injected at a named tensor of a model that has no
//! Dropout there: a `Mul(tensor, mask)` node is inserted after the node that
//! computes the tensor, and the nodes that read the tensor read the product.
//!
//! The rewrite works on the protobuf wire format. Every field of the model
//! is copied as it is, except the Dropout nodes, which are replaced, and
//! the graph's inputs, which gain the masks. The partial schema in
//! [`super::proto`] is used only to read what is rewritten.

use std::collections::{BTreeMap, HashMap, HashSet};

use prost::Message;

use super::proto::{AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use super::wire;

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

/// The kind of place a mask multiplies a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteKind {
    /// A Dropout node of the model, replaced by the multiplication.
    Node,
    /// A tensor of a model without Dropout there: the multiplication is
    /// inserted after the node that computes the tensor, and the nodes that
    /// read the tensor read the product instead.
    Injected,
}

/// A multiplication by a mask input: a rewritten Dropout node or dropout
/// injected at a tensor.
#[derive(Clone, Debug)]
pub struct MaskSite {
    pub kind: SiteKind,
    /// The Dropout node's name, or the tensor's name for injected dropout.
    pub node: String,
    /// The name of the `Mul` node.
    pub mul: String,
    /// The tensor the mask multiplies.
    pub input: String,
    pub output: String,
    /// The model input that takes the mask.
    pub mask: String,
    pub ratio: f32,
}

impl MaskSite {
    /// Names the site in messages.
    pub fn subject(&self) -> String {
        match self.kind {
            SiteKind::Node => format!("Dropout node {:?}", self.node),
            SiteKind::Injected => format!("the dropout injected at tensor {:?}", self.node),
        }
    }

    /// Returns the pipeline setting that requested the site, as a key under the stage.
    pub fn setting(&self) -> String {
        match self.kind {
            SiteKind::Node => String::from("mc_dropout"),
            SiteKind::Injected => format!("inject_dropout.{}", self.node),
        }
    }
}

/// A reason the masks cannot be planned, with the setting it concerns.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteError {
    /// A key under the stage: `mc_dropout` or `inject_dropout.TENSOR`.
    pub setting: String,
    pub message: String,
}

impl SiteError {
    fn new(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self { setting: setting.into(), message: message.into() }
    }
}

/// The request for the masks of a stage.
pub struct MaskRequest<'a> {
    /// Whether the model's own Dropout nodes are kept active.
    pub mc_dropout: bool,
    /// Tensors to inject dropout at, with their ratios.
    pub inject: &'a BTreeMap<String, f32>,
    /// The values of model inputs that the pipeline feeds a constant
    /// scalar, which a Dropout node's ratio may come from.
    pub known: &'a HashMap<String, f32>,
}

/// Finds where the masks go: the model's Dropout nodes in node order (with
/// `mc_dropout`), then the injected tensors in name order. Returns why the
/// model cannot take a mask where one is asked for.
pub fn mask_sites(model: &ModelProto, request: &MaskRequest<'_>) -> Result<Vec<MaskSite>, SiteError> {
    let graph = model.graph.clone().unwrap_or_default();
    let mut names: HashSet<String> = graph.input.iter().filter_map(|input| input.name.clone()).collect();
    names.extend(graph.node.iter().flat_map(|node| node.output.iter().cloned()));
    names.extend(graph.initializer.iter().filter_map(|tensor| tensor.name.clone()));
    let mut node_names: HashSet<String> = graph.node.iter().filter_map(|node| node.name.clone()).collect();
    let mut sites = Vec::new();
    let mut add = |kind: SiteKind, node: String, input: String, output: Option<String>, ratio: f32| {
        let mask = fresh(&mut names, format!("stochflow.dropout_mask.{node}"));
        let output = output.unwrap_or_else(|| fresh(&mut names, format!("{input}.dropped")));
        let mul = fresh(&mut node_names, format!("{node}.mask"));
        sites.push(MaskSite { kind, node, mul, input, output, mask, ratio });
    };
    if request.mc_dropout {
        for (node, ratio) in dropout_ratios(&graph, request.known)? {
            add(SiteKind::Node, node.name, node.input, Some(node.output), ratio);
        }
    }
    for (tensor, &ratio) in request.inject {
        check_injection(&graph, tensor, ratio)?;
        add(SiteKind::Injected, tensor.clone(), tensor.clone(), None, ratio);
    }
    Ok(sites)
}

/// Returns `base`, with underscores added until no name in `used` has it,
/// and marks it taken.
fn fresh(used: &mut HashSet<String>, mut base: String) -> String {
    while used.contains(&base) {
        base.push('_');
    }
    used.insert(base.clone());
    base
}

/// Lists the Dropout nodes that Monte Carlo dropout rewrites, with their
/// ratios.
fn dropout_ratios(graph: &GraphProto, known: &HashMap<String, f32>) -> Result<Vec<(DropoutNode, f32)>, SiteError> {
    let fail = |message: String| SiteError::new("mc_dropout", message);
    let nodes = dropout_nodes(graph);
    if nodes.is_empty() {
        return Err(fail(String::from(
            "the model has no Dropout nodes, so there is no dropout to keep active; export the model with its Dropout layers (converters often remove them in inference mode), inject dropout at named tensors with `inject_dropout`, or remove `mc_dropout`",
        )));
    }
    let mut used: HashSet<&str> = graph.node.iter().flat_map(|node| node.input.iter().map(String::as_str)).collect();
    used.extend(graph.output.iter().filter_map(|output| output.name.as_deref()));
    let mut found = Vec::new();
    for node in nodes {
        if let Some(mask) = node.mask_output.as_deref().filter(|mask| used.contains(mask)) {
            return Err(fail(format!(
                "Dropout node {:?} has its mask output {mask:?} read by another node or listed as a model output; the rewritten node has no mask output, so export the model without that use of the mask",
                node.name
            )));
        }
        let ratio = match &node.ratio {
            Ratio::Computed(tensor) => known.get(tensor).copied().map_or(node.ratio.value(), Some),
            other => other.value(),
        };
        let ratio = match ratio {
            Some(ratio) if (0.0..1.0).contains(&ratio) => ratio,
            Some(ratio) => {
                return Err(fail(format!("Dropout node {:?} has ratio {ratio}; a ratio must be in [0, 1)", node.name)));
            }
            None => {
                let Ratio::Computed(tensor) = &node.ratio else { unreachable!("only a computed ratio has no value") };
                return Err(fail(format!(
                    "Dropout node {:?} takes its ratio from {tensor:?}, which is not a float scalar known before the model runs; give the ratio as an attribute, an initializer, a Constant node, or a model input fed by a one-value entry under `constants`",
                    node.name
                )));
            }
        };
        found.push((node, ratio));
    }
    Ok(found)
}

/// Checks that dropout can be injected at `tensor`: an activation of the
/// main graph (a node's output or a graph input fed by the pipeline) that
/// is not a model output.
pub fn check_injection(graph: &GraphProto, tensor: &str, ratio: f32) -> Result<(), SiteError> {
    let fail = |message: String| SiteError::new(format!("inject_dropout.{tensor}"), message);
    if !(0.0..1.0).contains(&ratio) {
        return Err(fail(format!(
            "the ratio of the dropout at tensor {tensor:?} is {ratio}; a ratio must be in [0, 1)"
        )));
    }
    let named = |name: Option<&String>| name.is_some_and(|name| name == tensor);
    if graph.initializer.iter().any(|initializer| named(initializer.name.as_ref())) {
        return Err(fail(format!(
            "tensor {tensor:?} is a weight of the model (an initializer), not an activation; dropout is injected at tensors that depend on the record. To perturb weights, use `weight_noise`"
        )));
    }
    if graph.output.iter().any(|output| named(output.name.as_ref())) {
        return Err(fail(format!(
            "tensor {tensor:?} is a model output; to drop elements of an output, add an `add_noise` stage with `noise: dropout` after this stage, or inject at a tensor inside the model"
        )));
    }
    let produced = graph.node.iter().any(|node| node.output.iter().any(|output| output == tensor));
    if !produced && !graph.input.iter().any(|input| named(input.name.as_ref())) {
        return Err(fail(format!(
            "the model has no tensor {tensor:?} in its main graph; `stochflow inspect MODEL --tensors` lists the tensors its nodes compute"
        )));
    }
    Ok(())
}

/// Returns the model with each site's mask applied. A rewritten Dropout
/// node becomes `Mul(input, mask)`. For injected dropout, `Mul(tensor,
/// mask)` follows the node that computes the tensor (or comes first, for a
/// graph input), and the nodes that read the tensor read the product. The
/// masks are added as float32 inputs of shape `[N, shape...]`, where
/// `shapes` gives each site's per-record shape. The ratios and training
/// flags that only the replaced nodes read are removed, with the
/// initializers and Constant nodes that give them, because ONNX Runtime
/// warns about unused initializers.
pub fn with_masks(bytes: &[u8], sites: &[MaskSite], shapes: &[Vec<usize>]) -> Result<Vec<u8>, String> {
    let injected: Vec<&MaskSite> = sites.iter().filter(|site| site.kind == SiteKind::Injected).collect();
    let renames: HashMap<&str, &str> =
        injected.iter().map(|site| (site.input.as_str(), site.output.as_str())).collect();
    let multiply = |site: &MaskSite| NodeProto {
        input: vec![site.input.clone(), site.mask.clone()],
        output: vec![site.output.clone()],
        name: Some(site.mul.clone()),
        op_type: Some(String::from("Mul")),
        attribute: Vec::<AttributeProto>::new(),
    };
    wire::rewrite_graph(bytes, |graph, out| {
        let graph = wire::fields(graph)?;
        let node_error = |err: prost::DecodeError| format!("cannot read a graph node: {err}");
        let site_of = |node: &NodeProto| {
            sites.iter().find(|site| {
                site.kind == SiteKind::Node
                    && node.op_type.as_deref() == Some("Dropout")
                    && node.input.first() == Some(&site.input)
                    && node.output.first() == Some(&site.output)
            })
        };
        // Tensors read by the replaced nodes' other inputs and by nothing else.
        let mut unused: HashSet<String> = HashSet::new();
        let mut kept_reads: HashSet<String> = HashSet::new();
        let mut subgraphs = false;
        let mut initialized: HashSet<String> = HashSet::new();
        for field in &graph {
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
                    kept_reads.extend(wire::value_name(payload));
                }
                (5, Some(payload)) => initialized.extend(wire::named_tensor(payload)),
                _ => {}
            }
        }
        unused.retain(|name| !kept_reads.contains(name));
        // A subgraph may read any tensor of the main graph by name.
        if subgraphs {
            unused.clear();
        }

        // Injected dropout at graph inputs comes before the first node.
        let mut at_inputs: Vec<&MaskSite> = injected.clone();
        at_inputs.retain(|site| !produced_by_a_node(&graph, &site.input));
        let mut inputs_done = false;
        for field in &graph {
            match (field.number, field.payload) {
                (1, Some(payload)) => {
                    if !inputs_done {
                        for site in at_inputs.drain(..) {
                            wire::put_message(out, 1, &multiply(site).encode_to_vec());
                        }
                        inputs_done = true;
                    }
                    let node = NodeProto::decode(payload).map_err(node_error)?;
                    if let Some(site) = site_of(&node) {
                        let mut mul = multiply(site);
                        for input in &mut mul.input {
                            if let Some(&renamed) = renames.get(input.as_str()) {
                                *input = renamed.to_string();
                            }
                        }
                        wire::put_message(out, 1, &mul.encode_to_vec());
                    } else if node.op_type.as_deref() == Some("Constant")
                        && node.output.len() == 1
                        && unused.contains(&node.output[0])
                    {
                        // A ratio that only the replaced node read.
                        continue;
                    } else if node.input.iter().any(|input| renames.contains_key(input.as_str())) {
                        wire::put_message(out, 1, &wire::rename_inputs(payload, &renames)?);
                    } else {
                        out.extend_from_slice(field.raw);
                    }
                    for site in injected.iter().filter(|site| node.output.contains(&site.input)) {
                        wire::put_message(out, 1, &multiply(site).encode_to_vec());
                    }
                }
                // Initializers (5) of removed ratios, and graph inputs (11) that name them.
                (5, Some(payload)) if wire::named_tensor(payload).is_some_and(|name| unused.contains(&name)) => {}
                // A graph input without an initializer is fed by the pipeline.
                (11, Some(payload))
                    if wire::value_name(payload)
                        .is_some_and(|name| unused.contains(&name) && initialized.contains(&name)) => {}
                _ => out.extend_from_slice(field.raw),
            }
        }
        for site in at_inputs {
            wire::put_message(out, 1, &multiply(site).encode_to_vec());
        }
        for (site, shape) in sites.iter().zip(shapes) {
            let mut dims = vec![Dimension { dim_value: None, dim_param: Some(String::from("N")) }];
            dims.extend(shape.iter().map(|&size| Dimension { dim_value: Some(size as i64), dim_param: None }));
            wire::put_message(out, 11, &wire::float_value(&site.mask, Some(dims)).encode_to_vec());
        }
        Ok(())
    })
}

/// Returns whether a node of the graph (given as its fields) computes `tensor`.
fn produced_by_a_node(fields: &[wire::Field<'_>], tensor: &str) -> bool {
    fields
        .iter()
        .filter(|field| field.number == 1)
        .filter_map(|field| field.payload)
        .any(|payload| NodeProto::decode(payload).is_ok_and(|node| node.output.iter().any(|output| output == tensor)))
}

/// Returns the model with `names` added as float32 graph outputs of unknown
/// shape, so that a run reports the shapes of those tensors.
pub fn with_outputs(bytes: &[u8], names: &[String]) -> Result<Vec<u8>, String> {
    wire::rewrite_graph(bytes, |graph, out| {
        out.extend_from_slice(graph);
        for name in names {
            let untyped = ValueInfoProto { name: Some(name.clone()), r#type: None };
            wire::put_message(out, 12, &untyped.encode_to_vec());
        }
        Ok(())
    })
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
        let request = MaskRequest { mc_dropout: true, inject: &BTreeMap::new(), known: &HashMap::new() };
        let sites = mask_sites(&model, &request).unwrap();
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
        let request = MaskRequest { mc_dropout: true, inject: &BTreeMap::new(), known: &HashMap::new() };
        let error = mask_sites(&model, &request).unwrap_err();
        assert_eq!(error.setting, "mc_dropout");
        assert!(error.message.starts_with("the model has no Dropout nodes"), "{}", error.message);
    }

    #[test]
    fn truncated_model_is_malformed() {
        let bytes = fixture("mlp_digits.onnx");
        let error = with_outputs(&bytes[..bytes.len() / 2], &[String::from("h")]).unwrap_err();
        assert_eq!(error, "the model file is not valid protobuf");
    }
}
