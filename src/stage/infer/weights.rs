//! Weight noise in the `infer` stage: an ensemble of copies of the model
//! whose weights carry Gaussian noise ([`crate::model::weights`]), one copy
//! per sample index.
//!
//! After a `repeat` stage with `samples: K`, sample `s` of every record runs
//! on copy `s`, so each record goes through all K copies and the copies'
//! spread shows in the samples. Without a fan-out, every record runs on
//! copy 0: one perturbed model.

use super::PlanContext;
use crate::batch::SAMPLE_COLUMN;
use crate::config::{ConfigProblem, WeightNoiseConfig};
use crate::model::ModelFile;
use crate::model::weights::{self, WeightNoise};
use crate::rng::StageRng;
use crate::stage::sample::SAMPLES_METADATA;

/// The perturbed copies of a model, and their description for the output's
/// metadata.
pub struct Ensemble {
    pub members: Vec<ModelFile>,
    pub description: String,
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
                "the records carry a {SAMPLE_COLUMN:?} column that no `repeat` stage added, so the number of model copies is unknown; fan the records out with a `repeat` stage before this one"
            ),
        )
    })
}

/// Builds the perturbed copies of `model`. Their noise comes from the
/// streams of the stage name with `#weights` appended, apart from the
/// streams the stage draws dropout masks from.
pub fn ensemble(
    model: &ModelFile,
    config: &WeightNoiseConfig,
    members: u32,
    stage_name: &str,
    context: &PlanContext,
) -> Result<Ensemble, Vec<ConfigProblem>> {
    let problem = |key: &str, message: String| vec![context.problem(&format!("weight_noise.{key}"), message)];
    if !config.std.is_finite() || config.std < 0.0 {
        return Err(problem(
            "std",
            format!("`std` is {}; the standard deviation of weight noise must be a finite number ≥ 0", config.std),
        ));
    }
    let proto = crate::model::proto::decode(&model.bytes)
        .map_err(|err| problem("std", format!("cannot read the model's graph: {err}")))?;
    let graph = proto.graph.unwrap_or_default();
    let initializers = match &config.initializers {
        Some(names) if names.is_empty() => {
            let message = "`initializers` lists no initializer; name the weights to perturb, or remove the key to perturb every float32 initializer with more than one value";
            return Err(problem("initializers", message.to_string()));
        }
        Some(names) => {
            weights::check_initializers(&graph, names).map_err(|message| problem("initializers", message))?;
            names.clone()
        }
        None => weights::default_initializers(&graph),
    };
    if initializers.is_empty() {
        return Err(problem(
            "std",
            String::from(
                "the model has no float32 initializer with more than one value, so it has no weights to perturb",
            ),
        ));
    }
    let noise = WeightNoise { std: config.std, relative: config.relative, initializers };
    let rng = StageRng::new(context.seed, &format!("{stage_name}#weights"));
    let members = (0..members)
        .map(|member| {
            let bytes = weights::with_noise(&model.bytes, &noise, &rng, member)
                .map_err(|message| problem("initializers", message))?;
            Ok(ModelFile { path: model.path.clone(), bytes, sha256: model.sha256.clone() })
        })
        .collect::<Result<Vec<_>, Vec<ConfigProblem>>>()?;
    let weights: usize = members.iter().map(|member| member.bytes.len()).sum();
    tracing::info!(
        stage = stage_name,
        copies = members.len(),
        megabytes = weights / 1_000_000,
        "built the copies of the model with weight noise"
    );
    // The std's shortest decimal form, such as 0.1 rather than 0.10000000149.
    let std: f64 = config.std.to_string().parse().unwrap_or(f64::from(config.std));
    let description = serde_json::json!({
        "std": std,
        "relative": config.relative,
        "members": members.len(),
        "initializers": noise.initializers,
    })
    .to_string();
    Ok(Ensemble { members, description })
}
