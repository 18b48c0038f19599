//! Dropout masks in the `infer` stage: planning the masks of a model whose
//! Dropout nodes are rewritten into mask inputs, or that has dropout injected
//! at named tensors ([`crate::model::dropout`]), and drawing them for each
//! batch.
//!
//! Each record's masks come from its own stream of the stage, keyed by the
//! record key and the sample index, and are drawn in node order. So a
//! record's masks do not depend on its batch, and the samples of a fan-out
//! get independent masks.

use std::collections::{BTreeMap, HashMap};

use arrow::array::RecordBatch;
use ort::session::SessionInputValue;
use ort::value::Tensor;
use rand::Rng;

use crate::batch::{Keys, sample_indices};
use crate::model::ModelFile;
use crate::model::dropout::{self, MaskRequest, MaskSite, SiteError, SiteKind};
use crate::rng::StageRng;

/// One mask input of the rewritten model.
struct Mask {
    input: String,
    kind: SiteKind,
    /// The Dropout node's name, or the tensor's for injected dropout.
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

/// The dropout masks of a stage.
pub struct DropoutMasks {
    rng: StageRng,
    key_column: String,
    masks: Vec<Mask>,
}

/// A model rewritten to take dropout masks, with its masks.
pub struct MaskedModel {
    pub model: ModelFile,
    pub masks: DropoutMasks,
}

/// The settings of [`mask_model`] that come from the stage's plan.
pub struct MaskPlan<'a> {
    pub threads: usize,
    pub rng: StageRng,
    pub key_column: &'a str,
    /// Per-record shapes of the model inputs fed by columns.
    pub graph_inputs: BTreeMap<String, Vec<usize>>,
    /// Values of the model inputs fed a one-value constant.
    pub known: HashMap<String, f32>,
    /// Whether the model's Dropout nodes are kept active.
    pub mc_dropout: bool,
    /// Tensors to inject dropout at, with their ratios.
    pub inject: BTreeMap<String, f32>,
    /// Whether the model fixes its batch dimension to 1.
    pub batch_of_one: bool,
}

/// Checks each tensor that dropout is injected at, before anything runs,
/// and returns every problem found.
pub fn injection_problems(model: &ModelFile, inject: &BTreeMap<String, f32>) -> Vec<SiteError> {
    let Ok(proto) = crate::model::proto::decode(&model.bytes) else {
        return Vec::new();
    };
    let graph = proto.graph.unwrap_or_default();
    inject.iter().filter_map(|(tensor, &ratio)| dropout::check_injection(&graph, tensor, ratio).err()).collect()
}

/// Rewrites `model` so that its Dropout nodes, and the tensors dropout is
/// injected at, multiply by masks that the stage feeds. The per-record
/// shape of each dropped tensor comes from runs
/// of the model on records of zeros (`probe_inputs` builds them for a
/// number of records), with the tensors added as outputs. Two runs, on 2
/// and 3 records, tell the batch dimension from a dimension that happens to
/// equal the number of records.
pub fn mask_model(
    model: &ModelFile,
    plan: MaskPlan<'_>,
    probe_inputs: impl Fn(usize) -> Result<Vec<(String, SessionInputValue<'static>)>, String>,
) -> Result<MaskedModel, Vec<SiteError>> {
    let MaskPlan { threads, rng, key_column, graph_inputs, known, mc_dropout, inject, batch_of_one } = plan;
    // Problems that concern no site in particular.
    let setting = if mc_dropout { "mc_dropout" } else { "inject_dropout" };
    let general = |message: String| vec![SiteError { setting: setting.to_string(), message }];
    let proto = crate::model::proto::decode(&model.bytes)
        .map_err(|err| general(format!("cannot read the model's graph: {err}")))?;
    let sites = dropout::mask_sites(&proto, &MaskRequest { mc_dropout, inject: &inject, known: &known })
        .map_err(|error| vec![error])?;
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
        bytes: dropout::with_outputs(&model.bytes, &probed).map_err(general)?,
        sha256: model.sha256.clone(),
    };
    let mut session = probe.session(threads).map_err(|err| {
        general(format!(
            "the model with its dropped tensors read out to find their shapes cannot be loaded, which happens when a dropped tensor is not float32 (dropout masks are float32 only). ONNX Runtime reports: {err}"
        ))
    })?;
    let probe_rows: &[usize] = if batch_of_one { &[1] } else { &[2, 3] };
    let mut shapes: Vec<Option<Vec<usize>>> = vec![None; sites.len()];
    // Problems of each site, all reported together.
    let mut problems: Vec<Option<SiteError>> = vec![None; sites.len()];
    for &rows in probe_rows {
        let results = session.run(probe_inputs(rows).map_err(general)?).map_err(|err| {
            general(format!(
                "running the model on {rows} records of zeros to find the shapes of its dropped tensors failed: {err}"
            ))
        })?;
        for ((site, found), problem) in sites.iter().zip(shapes.iter_mut()).zip(problems.iter_mut()) {
            if problem.is_some() {
                continue;
            }
            let shape = match graph_inputs.get(&site.input) {
                Some(shape) => shape.clone(),
                None => match per_record_shape(site, &results[site.input.as_str()], rows) {
                    Ok(shape) => shape,
                    Err(error) => {
                        *problem = Some(error);
                        continue;
                    }
                },
            };
            if let Some(earlier) = found.as_ref().filter(|earlier| **earlier != shape) {
                let change = format!("after the first dimension it is {earlier:?} for 2 records and {shape:?} for 3");
                *problem = Some(not_batch_first(site, &change));
                continue;
            }
            *found = Some(shape);
        }
    }
    let problems: Vec<SiteError> = problems.into_iter().flatten().collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    let shapes: Vec<Vec<usize>> = shapes.into_iter().map(Option::unwrap_or_default).collect();
    drop(session);

    let masked = ModelFile {
        path: model.path.clone(),
        bytes: dropout::with_masks(&model.bytes, &sites, &shapes).map_err(general)?,
        sha256: model.sha256.clone(),
    };
    let masks = sites
        .into_iter()
        .zip(shapes)
        .map(|(site, shape)| {
            let keep = 1.0 - f64::from(site.ratio);
            Mask {
                input: site.mask,
                kind: site.kind,
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
fn per_record_shape(site: &MaskSite, value: &ort::value::DynValue, rows: usize) -> Result<Vec<usize>, SiteError> {
    let (shape, _) = value.try_extract_tensor::<f32>().map_err(|_| SiteError {
        setting: site.setting(),
        message: format!(
            "{} drops elements of {:?}, which is not a float32 tensor; dropout masks are float32 only",
            site.subject(),
            site.input
        ),
    })?;
    let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    match dims.split_first() {
        Some((&first, rest)) if first == rows => Ok(rest.to_vec()),
        Some(_) => Err(not_batch_first(site, &format!("its shape for {rows} records is {dims:?}"))),
        None => Err(not_batch_first(site, "it is a scalar")),
    }
}

/// Words the problem of a dropped tensor whose first dimension is not the
/// batch.
fn not_batch_first(site: &MaskSite, found: &str) -> SiteError {
    SiteError {
        setting: site.setting(),
        message: format!(
            "{} drops elements of {:?}, whose first dimension is not the batch: {found}. A dropout mask is drawn per record, so the dropped tensor needs the batch as its first dimension",
            site.subject(),
            site.input
        ),
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

    /// Describes the masks of one kind for the output's metadata, as a JSON
    /// object from node name (or tensor name, for injected dropout) to
    /// ratio. Returns `None` when there are none of that kind.
    pub fn describe(&self, kind: SiteKind) -> Option<String> {
        let nodes: serde_json::Map<String, serde_json::Value> = self
            .masks
            .iter()
            .filter(|mask| mask.kind == kind)
            .map(|mask| {
                // The ratio's shortest decimal form, such as 0.2 rather than 0.20000000298.
                let ratio: f64 = mask.ratio.to_string().parse().unwrap_or(f64::from(mask.ratio));
                (mask.node.clone(), serde_json::Value::from(ratio))
            })
            .collect();
        (!nodes.is_empty()).then(|| serde_json::Value::Object(nodes).to_string())
    }
}
