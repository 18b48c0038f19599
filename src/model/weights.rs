//! Weight noise: copies of a model whose weights (float32 initializers)
//! carry Gaussian noise, drawn under the randomness contract.
//!
//! Copy `m` adds `scale × z` to each value of each chosen initializer, where
//! `z` comes from the stream of the weights' generator keyed by the
//! initializer's name and `m`, in the order of the values. So a copy's
//! weights depend on the seed, the stage, the initializer and the copy's
//! index alone. `scale` is the configured standard deviation, times the
//! initializer's root mean square when the noise is relative.
//!
//! The rewrite works on the protobuf wire format: the chosen initializers
//! get their values anew as `raw_data`, and every other byte is copied.

use std::collections::HashSet;

use prost::Message;

use super::proto::{GraphProto, TensorProto};
use super::wire;
use crate::rng::{StageRng, fill_standard_normal};

/// The noise added to a model's weights.
#[derive(Clone, Debug)]
pub struct WeightNoise {
    /// The standard deviation of the noise, or its ratio to each
    /// initializer's root mean square when `relative`.
    pub std: f32,
    pub relative: bool,
    /// The initializers that get noise.
    pub initializers: Vec<String>,
}

/// `TensorProto.DataLocation` of a tensor whose values are in another file.
const EXTERNAL: i32 = 1;

/// The fields of a `TensorProto` that locate its data, beside those in
/// [`super::proto`].
#[derive(Clone, PartialEq, Message)]
struct Location {
    #[prost(int32, optional, tag = "14")]
    data_location: Option<i32>,
}

/// Lists the initializers that weight noise perturbs by default: those of
/// float32 type with more than one value, which leaves out scalars such as
/// a Dropout ratio or a normalization epsilon.
pub fn default_initializers(graph: &GraphProto) -> Vec<String> {
    graph
        .initializer
        .iter()
        .filter(|tensor| tensor.data_type == Some(1) && tensor.dims.iter().product::<i64>() > 1)
        .filter_map(|tensor| tensor.name.clone())
        .collect()
}

/// Returns why weight noise cannot be added to the initializer `name`: the
/// main graph has no such initializer, it is not float32, or only Dropout
/// nodes read it (as their ratio or training flag).
pub fn initializer_problem(graph: &GraphProto, name: &str) -> Option<String> {
    let Some(tensor) = graph.initializer.iter().find(|tensor| tensor.name.as_deref() == Some(name)) else {
        let nameable = nameable_initializers(graph);
        let listed = nameable.iter().take(12).cloned().collect::<Vec<_>>().join(", ");
        let more = if nameable.len() > 12 { ", ..." } else { "" };
        return Some(format!(
            "the model has no initializer {name:?}; its float32 initializers are {listed}{more} (`stochflow inspect MODEL --tensors` lists them all)"
        ));
    };
    if tensor.data_type != Some(1) {
        return Some(format!(
            "initializer {name:?} holds {}; weight noise is added to float32 initializers only",
            super::proto::data_type_name(tensor.data_type.unwrap_or_default())
        ));
    }
    if read_by_dropout_only(graph, name) {
        let node = graph.node.iter().find(|node| node.input.iter().any(|input| input == name));
        let node = node.and_then(|node| node.name.as_deref()).unwrap_or("Dropout");
        return Some(format!(
            "initializer {name:?} is an input of Dropout node {node:?} (its ratio), not a weight; remove it from `initializers`"
        ));
    }
    None
}

/// Returns whether nodes read the tensor `name`, all of them Dropout nodes.
fn read_by_dropout_only(graph: &GraphProto, name: &str) -> bool {
    let mut readers = graph.node.iter().filter(|node| node.input.iter().any(|input| input == name)).peekable();
    readers.peek().is_some() && readers.all(|node| node.op_type.as_deref() == Some("Dropout"))
}

/// Lists the float32 initializers that weight noise can perturb: all but
/// the ratios of Dropout nodes.
pub fn nameable_initializers(graph: &GraphProto) -> Vec<String> {
    graph
        .initializer
        .iter()
        .filter(|tensor| tensor.data_type == Some(1))
        .filter_map(|tensor| tensor.name.clone())
        .filter(|name| !read_by_dropout_only(graph, name))
        .collect()
}

/// Returns the model with noise added to the chosen initializers, for the
/// copy with index `member`.
pub fn with_noise(bytes: &[u8], noise: &WeightNoise, rng: &StageRng, member: u32) -> Result<Vec<u8>, String> {
    let chosen: HashSet<&str> = noise.initializers.iter().map(String::as_str).collect();
    let mut found: HashSet<String> = HashSet::new();
    let rewritten = wire::rewrite_graph(bytes, |graph, out| {
        for field in wire::fields(graph)? {
            let payload = match (field.number, field.payload) {
                (5, Some(payload))
                    if wire::named_tensor(payload).is_some_and(|name| chosen.contains(name.as_str())) =>
                {
                    payload
                }
                _ => {
                    out.extend_from_slice(field.raw);
                    continue;
                }
            };
            let tensor = TensorProto::decode(payload)
                .map_err(|err| format!("cannot read an initializer of the model: {err}"))?;
            let name = tensor.name.clone().unwrap_or_default();
            if Location::decode(payload).is_ok_and(|location| location.data_location == Some(EXTERNAL)) {
                return Err(format!(
                    "initializer {name:?} keeps its values in a file beside the model (external data); save the model with its weights inside"
                ));
            }
            let mut values = float_values(&tensor)?;
            let mut scale = noise.std;
            if noise.relative {
                let mean_square =
                    values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / values.len() as f64;
                scale *= mean_square.sqrt() as f32;
            }
            let mut stream = rng.stream(name.as_bytes(), member);
            let mut draws = vec![0.0f32; values.len()];
            fill_standard_normal(&mut stream, &mut draws);
            for (value, z) in values.iter_mut().zip(draws) {
                *value += scale * z;
            }
            // The tensor's fields, less its values (float_data 4, raw_data 9).
            let mut new_tensor = Vec::with_capacity(payload.len() + 16);
            for part in wire::fields(payload)? {
                if !matches!(part.number, 4 | 9) {
                    new_tensor.extend_from_slice(part.raw);
                }
            }
            let raw: Vec<u8> = values.iter().flat_map(|value| value.to_le_bytes()).collect();
            wire::put_message(&mut new_tensor, 9, &raw);
            wire::put_message(out, 5, &new_tensor);
            found.insert(name);
        }
        Ok(())
    })?;
    if let Some(missing) = noise.initializers.iter().find(|name| !found.contains(*name)) {
        return Err(format!("the model has no initializer {missing:?}"));
    }
    Ok(rewritten)
}

/// Reads the values of a float32 tensor.
fn float_values(tensor: &TensorProto) -> Result<Vec<f32>, String> {
    let name = tensor.name.as_deref().unwrap_or_default();
    if tensor.data_type != Some(1) {
        return Err(format!("initializer {name:?} is not float32"));
    }
    let values: Vec<f32> = match tensor.raw_data.as_deref() {
        Some(raw) => raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect(),
        None => tensor.float_data.clone(),
    };
    let expected: i64 = tensor.dims.iter().product();
    if values.len() as i64 != expected {
        return Err(format!(
            "initializer {name:?} has {} values for its shape {:?}; the model file is damaged",
            values.len(),
            tensor.dims
        ));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::proto;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/fixtures/models/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn initializers(bytes: &[u8]) -> Vec<TensorProto> {
        proto::decode(bytes).unwrap().graph.unwrap().initializer
    }

    #[test]
    fn noise_changes_chosen_weights_only() {
        let bytes = fixture("mlp_digits.onnx");
        let graph = proto::decode(&bytes).unwrap().graph.unwrap();
        let chosen = default_initializers(&graph);
        assert_eq!(chosen.len(), 4, "two weight matrices and two biases: {chosen:?}");
        let noise = WeightNoise { std: 0.05, relative: false, initializers: chosen.clone() };
        let noisy = with_noise(&bytes, &noise, &StageRng::new(1, "infer"), 0).unwrap();
        let before = initializers(&bytes);
        let after = initializers(&noisy);
        assert_eq!(before.len(), after.len());
        for (old, new) in before.iter().zip(&after) {
            assert_eq!(old.name, new.name);
            assert_eq!(old.dims, new.dims);
            let (old_values, new_values) = (float_values(old).unwrap(), float_values(new).unwrap());
            if chosen.contains(old.name.as_ref().unwrap()) {
                let differences: Vec<f64> = old_values.iter().zip(&new_values).map(|(a, b)| f64::from(b - a)).collect();
                assert!(differences.iter().all(|d| *d != 0.0));
                if differences.len() > 1000 {
                    let n = differences.len() as f64;
                    let mean = differences.iter().sum::<f64>() / n;
                    let std = (differences.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
                    // Standard errors: 0.05 / sqrt(n) for the mean, about 0.05 / sqrt(2n) for the std.
                    assert!(mean.abs() < 4.0 * 0.05 / n.sqrt(), "mean {mean}");
                    assert!((std - 0.05).abs() < 4.0 * 0.05 / (2.0 * n).sqrt(), "std {std}");
                }
            } else {
                assert_eq!(old_values, new_values, "{:?} changed", old.name);
            }
        }
        // The same copy again is byte-identical; another copy differs.
        assert_eq!(noisy, with_noise(&bytes, &noise, &StageRng::new(1, "infer"), 0).unwrap());
        assert_ne!(noisy, with_noise(&bytes, &noise, &StageRng::new(1, "infer"), 1).unwrap());
    }

    #[test]
    fn relative_noise_scales_with_each_weight() {
        let bytes = fixture("mlp_digits.onnx");
        let graph = proto::decode(&bytes).unwrap().graph.unwrap();
        let name = default_initializers(&graph).into_iter().next().unwrap();
        let noise = WeightNoise { std: 0.1, relative: true, initializers: vec![name.clone()] };
        let noisy = with_noise(&bytes, &noise, &StageRng::new(3, "infer"), 2).unwrap();
        let find = |tensors: Vec<TensorProto>| {
            float_values(tensors.iter().find(|t| t.name.as_ref() == Some(&name)).unwrap()).unwrap()
        };
        let (old, new) = (find(initializers(&bytes)), find(initializers(&noisy)));
        let rms =
            |values: &[f32]| (values.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
        let differences: Vec<f32> = old.iter().zip(&new).map(|(a, b)| b - a).collect();
        let ratio = rms(&differences) / rms(&old);
        let n = old.len() as f64;
        assert!((ratio - 0.1).abs() < 4.0 * 0.1 / (2.0 * n).sqrt(), "ratio {ratio} over {n} values");
    }

    #[test]
    fn initializer_problems_are_named() {
        let graph = proto::decode(&fixture("mlp_digits.onnx")).unwrap().graph.unwrap();
        let error = initializer_problem(&graph, "fc9.weight").unwrap();
        assert!(
            error.starts_with("the model has no initializer \"fc9.weight\"; its float32 initializers are "),
            "{error}"
        );
        let error = initializer_problem(&graph, "dropout.ratio").unwrap();
        assert!(error.starts_with("initializer \"dropout.ratio\" is an input of Dropout node \"dropout1\""), "{error}");
        assert_eq!(initializer_problem(&graph, "fc1.weight"), None);
        assert!(!nameable_initializers(&graph).contains(&String::from("dropout.ratio")));
    }
}
