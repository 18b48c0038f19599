//! Weight noise in the `infer` stage: an ensemble of copies of the model
//! whose weights carry Gaussian noise ([`crate::model::weights`]), one copy
//! per sample index.
//!
//! After a fan-out into K samples (a `repeat` stage with `samples: K`, or
//! a `sample` stage that draws K), sample `s` of every record runs
//! on copy `s`. Each record thus goes through all K copies, and the
//! copies' spread shows in the samples. Without a fan-out, every record runs on
//! copy 0: one perturbed model.

use super::PlanContext;
use crate::batch::SAMPLE_COLUMN;
use crate::config::{ConfigProblem, WeightNoiseConfig};
use crate::model::ModelFile;
use crate::model::weights::{self, WeightNoise};
use crate::rng::StageRng;
use crate::stage::sample::SAMPLES_METADATA;

/// The plan of the perturbed copies of a model, and its description for
/// the output's metadata. Copies are built one at a time, so that only the
/// sessions keep their weights.
pub struct Ensemble {
    noise: WeightNoise,
    rng: StageRng,
    pub count: u32,
    pub description: String,
}

impl Ensemble {
    /// Builds copy `member` of `model`.
    pub fn member(&self, model: &ModelFile, member: u32) -> Result<ModelFile, String> {
        let bytes = weights::with_noise(&model.bytes, &self.noise, &self.rng, member)?;
        Ok(ModelFile { path: model.path.clone(), bytes, sha256: model.sha256.clone() })
    }
}

/// Returns the number of copies: the samples per record of the fan-out
/// before the stage, or 1 without one.
pub fn member_count(context: &PlanContext) -> Result<u32, ConfigProblem> {
    let Ok(field) = context.input.field_with_name(SAMPLE_COLUMN) else {
        return Ok(1);
    };
    field.metadata().get(SAMPLES_METADATA).and_then(|samples| samples.parse().ok()).ok_or_else(|| {
        context.problem(
            "weight_noise",
            format!(
                "the records carry a {SAMPLE_COLUMN:?} column that no fan-out of this pipeline added, so the number of model copies is unknown; rename that column in the data, and fan the records out with a `repeat` stage before this one"
            ),
        )
    })
}

/// Checks the weight-noise settings against the model file. Each named
/// initializer must exist, be float32 and be a weight rather than a Dropout
/// node's ratio, and the model must have weights to perturb.
pub fn model_problems(model: &ModelFile, config: &WeightNoiseConfig, context: &PlanContext) -> Vec<ConfigProblem> {
    let Ok(proto) = crate::model::proto::decode(&model.bytes) else {
        return vec![context.problem("model", "the model file is not a valid ONNX model (protobuf decoding failed)")];
    };
    let graph = proto.graph.unwrap_or_default();
    match &config.initializers {
        Some(names) => names
            .iter()
            .enumerate()
            .filter_map(|(position, name)| {
                let message = weights::initializer_problem(&graph, name)?;
                Some(context.problem(&format!("weight_noise.initializers[{position}]"), message))
            })
            .collect(),
        None if weights::default_initializers(&graph).is_empty() => {
            let nameable = weights::nameable_initializers(&graph);
            let message = if nameable.is_empty() {
                String::from(
                    "the model has no float32 weights, so weight noise does not apply to it; remove `weight_noise`",
                )
            } else {
                format!(
                    "the model has no float32 initializer with more than one value, so weight noise has no weights to perturb by default; name the scalar weights to perturb under `initializers` ({})",
                    nameable.join(", ")
                )
            };
            vec![context.problem("weight_noise", message)]
        }
        None => Vec::new(),
    }
}

/// Plans the perturbed copies of `model`. Their noise comes from the
/// streams of the stage name with `#weights` appended, apart from the
/// streams the stage draws dropout masks from.
pub fn ensemble(
    model: &ModelFile,
    config: &WeightNoiseConfig,
    count: u32,
    stage_name: &str,
    context: &PlanContext,
) -> Result<Ensemble, Vec<ConfigProblem>> {
    let proto = crate::model::proto::decode(&model.bytes)
        .map_err(|err| vec![context.problem("weight_noise", format!("cannot read the model's graph: {err}"))])?;
    let graph = proto.graph.unwrap_or_default();
    let initializers = match &config.initializers {
        Some(names) => names.clone(),
        None => weights::default_initializers(&graph),
    };
    // The std's shortest decimal form, such as 0.1 rather than 0.10000000149.
    let std: f64 = config.std.to_string().parse().unwrap_or(f64::from(config.std));
    let description = serde_json::json!({
        "std": std,
        "relative": config.relative,
        "members": count,
        "initializers": initializers,
    })
    .to_string();
    Ok(Ensemble {
        noise: WeightNoise { std: config.std, relative: config.relative, initializers },
        rng: StageRng::new(context.seed, &format!("{stage_name}#weights")),
        count,
        description,
    })
}
