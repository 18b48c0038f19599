//! Monte Carlo dropout in the `infer` stage: planning the masks of a model
//! whose Dropout nodes are rewritten into mask inputs ([`crate::model::dropout`]),
//! and drawing them for each batch.
//!
//! Each record's masks come from its own stream of the stage, keyed by the
//! record key and the sample index, and are drawn in node order. So a
//! record's masks do not depend on its batch, and the samples of a fan-out
//! get independent masks.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use ort::session::SessionInputValue;
use ort::value::Tensor;
use rand::Rng;

use crate::batch::{Keys, sample_indices};
use crate::model::ModelFile;
use crate::model::dropout::{self, MaskSite};
use crate::rng::StageRng;

/// One mask input of the rewritten model.
struct Mask {
    input: String,
    node: String,
    ratio: f32,
    /// Per-record shape: the dropped tensor's dimensions after the batch.
    shape: Vec<usize>,
    len: usize,
    /// An element is kept when a uniform 32-bit word is below this.
    threshold: u64,
    /// The value of a kept element: `1 / (1 - ratio)`.
    scale: f32,
}

/// The masks of a stage with Monte Carlo dropout.
pub struct DropoutMasks {
    rng: StageRng,
    key_column: String,
    masks: Vec<Mask>,
}

/// A model rewritten for Monte Carlo dropout, with its masks.
pub struct MaskedModel {
    pub model: ModelFile,
    pub masks: DropoutMasks,
}

/// Rewrites `model` so that its Dropout nodes multiply by masks that the
/// stage feeds. The per-record shape of each dropped tensor comes from a
/// run of the model on two records of zeros (`probe_inputs` builds them
/// for a batch size), with the tensors added as outputs.
pub fn mask_model(
    model: &ModelFile,
    threads: usize,
    rng: StageRng,
    key_column: &str,
    graph_inputs: &BTreeMap<String, Vec<usize>>,
    probe_inputs: impl Fn(usize) -> Result<Vec<(String, SessionInputValue<'static>)>, String>,
) -> Result<MaskedModel, String> {
    let proto =
        crate::model::proto::decode(&model.bytes).map_err(|err| format!("cannot read the model's graph: {err}"))?;
    let sites = dropout::mask_sites(&proto)?;
    let outputs: Vec<String> =
        proto.graph.as_ref().map(|g| g.output.iter().filter_map(|o| o.name.clone()).collect()).unwrap_or_default();
    let mut probed: Vec<String> = Vec::new();
    for site in &sites {
        if !graph_inputs.contains_key(&site.input) && !outputs.contains(&site.input) && !probed.contains(&site.input) {
            probed.push(site.input.clone());
        }
    }
    let probe = ModelFile {
        path: model.path.clone(),
        bytes: dropout::with_outputs(&model.bytes, &probed)?,
        sha256: model.sha256.clone(),
    };
    let mut session = probe.session(threads).map_err(|err| err.to_string())?;
    const PROBE_ROWS: usize = 2;
    let results = session.run(probe_inputs(PROBE_ROWS)?).map_err(|err| {
        format!(
            "running the model on {PROBE_ROWS} records of zeros to find the shapes of its Dropout inputs failed: {err}"
        )
    })?;
    let mut shapes = Vec::new();
    for site in &sites {
        let shape = match graph_inputs.get(&site.input) {
            Some(shape) => shape.clone(),
            None => per_record_shape(site, &results[site.input.as_str()], PROBE_ROWS)?,
        };
        shapes.push(shape);
    }
    drop(results);
    drop(session);

    let masked = ModelFile {
        path: model.path.clone(),
        bytes: dropout::with_masks(&model.bytes, &sites, &shapes)?,
        sha256: model.sha256.clone(),
    };
    let masks = sites
        .into_iter()
        .zip(shapes)
        .map(|(site, shape)| {
            let keep = 1.0 - f64::from(site.ratio);
            Mask {
                input: site.mask,
                node: site.node,
                ratio: site.ratio,
                len: shape.iter().product(),
                shape,
                threshold: (keep * 4_294_967_296.0).round() as u64,
                scale: (1.0 / keep) as f32,
            }
        })
        .collect();
    Ok(MaskedModel { model: masked, masks: DropoutMasks { rng, key_column: key_column.to_string(), masks } })
}

/// Reads the per-record shape of a dropped tensor from a probe run.
fn per_record_shape(site: &MaskSite, value: &ort::value::DynValue, rows: usize) -> Result<Vec<usize>, String> {
    let (shape, _) = value.try_extract_tensor::<f32>().map_err(|_| {
        format!(
            "Dropout node {:?} drops elements of {:?}, which is not a float32 tensor; Monte Carlo dropout supports float32 only",
            site.node, site.input
        )
    })?;
    let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    match dims.split_first() {
        Some((&first, rest)) if first == rows => Ok(rest.to_vec()),
        _ => Err(format!(
            "Dropout node {:?} drops elements of {:?}, whose shape {dims:?} for {rows} records does not start with the batch; Monte Carlo dropout needs the batch as the first dimension",
            site.node, site.input
        )),
    }
}

impl DropoutMasks {
    /// Draws the masks of a batch's records, as model inputs.
    pub fn draw(&self, data: &RecordBatch) -> Result<Vec<(String, SessionInputValue<'static>)>, String> {
        let rows = data.num_rows();
        let keys = Keys::new(data, &self.key_column).expect("the key column is checked when planning");
        let samples = sample_indices(data);
        let mut values: Vec<Vec<f32>> = self.masks.iter().map(|mask| vec![0.0; rows * mask.len]).collect();
        for row in 0..rows {
            let mut rng = keys.with_bytes(row, |key| self.rng.stream(key, samples[row]));
            for (mask, values) in self.masks.iter().zip(values.iter_mut()) {
                let row_values = &mut values[row * mask.len..(row + 1) * mask.len];
                for pair in row_values.chunks_mut(2) {
                    let word = rng.next_u64();
                    for (value, half) in pair.iter_mut().zip([word as u32, (word >> 32) as u32]) {
                        *value = if u64::from(half) < mask.threshold { mask.scale } else { 0.0 };
                    }
                }
            }
        }
        self.masks
            .iter()
            .zip(values)
            .map(|(mask, values)| {
                let mut shape = vec![rows];
                shape.extend_from_slice(&mask.shape);
                let tensor = Tensor::from_array((shape, values)).map_err(|err| err.to_string())?;
                Ok((mask.input.clone(), tensor.into()))
            })
            .collect()
    }

    /// Describes the masked nodes for the output's metadata, as
    /// `name:ratio` pairs in node order.
    pub fn describe(&self) -> String {
        self.masks.iter().map(|mask| format!("{}:{}", mask.node, mask.ratio)).collect::<Vec<_>>().join(",")
    }
}
