//! Planning: opening the source, planning each stage against the schema it
//! receives, and fixing the output schema, all before any record is read.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};

use crate::batch::SAMPLE_COLUMN;
use crate::config::{ConfigError, ConfigProblem, LoadedConfig, SinkConfig, StageConfig};
use crate::sink::ImageSink;
use crate::source::{self, Source, SourceError};
use crate::stage::{self, PlanContext, Stage};

/// Error that stops a pipeline before it starts.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// A pipeline ready to run.
pub struct Pipeline {
    pub source: Box<dyn Source>,
    pub stages: Vec<Arc<dyn Stage>>,
    /// Schema of the batches each stage receives.
    pub stage_inputs: Vec<SchemaRef>,
    /// Schema of the batches that reach the sink.
    pub schema: SchemaRef,
    /// Schema of the written file, with provenance metadata.
    pub output_schema: SchemaRef,
    /// Indices of the written columns in `schema`.
    pub projection: Vec<usize>,
    pub key_column: String,
    pub channel_capacity: usize,
    /// The PNG output of `sink.images`, planned but not yet created.
    pub images: Option<ImageSink>,
}

/// The stages and output of a pipeline, planned against a source's schema.
pub struct PlannedStages {
    pub stages: Vec<Arc<dyn Stage>>,
    /// Schema of the batches each stage receives.
    pub stage_inputs: Vec<SchemaRef>,
    /// Schema of the batches that reach the sink.
    pub schema: SchemaRef,
    /// Schema of the written file, with provenance metadata.
    pub output_schema: SchemaRef,
    /// Indices of the written columns in `schema`.
    pub projection: Vec<usize>,
    pub key_column: String,
    pub channel_capacity: usize,
    /// The PNG output of `sink.images`, planned but not yet created.
    pub images: Option<ImageSink>,
}

/// Plans the pipeline of a loaded file. Every problem found is reported,
/// each with its YAML line.
pub fn plan(loaded: &LoadedConfig) -> Result<Pipeline, PlanError> {
    let config = &loaded.config;
    let source = match source::open(&config.source, config.seed) {
        Ok(source) => source,
        Err(err) => {
            let path = err.config_path().unwrap_or("source.path").to_string();
            let message = match &err {
                SourceError::Config { message, .. } => message.clone(),
                other => error_chain(other),
            };
            return Err(loaded.error(vec![ConfigProblem::new(path, message)]).into());
        }
    };
    let key_column = source.key_column().to_string();
    let planned = plan_stages(loaded, source.schema(), key_column)?;
    Ok(Pipeline {
        source,
        stages: planned.stages,
        stage_inputs: planned.stage_inputs,
        schema: planned.schema,
        output_schema: planned.output_schema,
        projection: planned.projection,
        key_column: planned.key_column,
        channel_capacity: planned.channel_capacity,
        images: planned.images,
    })
}

/// Plans the stages and the output of a loaded file against the schema and
/// key column of the batches its source yields.
pub fn plan_stages(
    loaded: &LoadedConfig,
    mut schema: SchemaRef,
    key_column: String,
) -> Result<PlannedStages, PlanError> {
    let config = &loaded.config;
    let mut stages: Vec<Arc<dyn Stage>> = Vec::new();
    let mut stage_inputs = Vec::new();
    let mut problems = Vec::new();
    for (index, stage_config) in config.stages.iter().enumerate() {
        let context = PlanContext {
            seed: config.seed,
            index,
            input: &schema,
            key_column: &key_column,
            workers: config.runtime.workers,
        };
        match stage::plan(stage_config, &context) {
            Ok((stage, output)) => {
                if let Some(column) = overwrites_reserved(&schema, &output, &key_column) {
                    let role = if column == key_column {
                        "the records' keys (they seed each record's random streams and name skipped records)"
                    } else {
                        "the sample indices"
                    };
                    problems.push(ConfigProblem::new(
                        format!("stages[{index}]"),
                        format!("the stage writes column {column:?}, the column of {role}; choose another output name"),
                    ));
                    break;
                }
                stages.push(Arc::from(stage));
                stage_inputs.push(schema.clone());
                schema = output;
            }
            Err(mut found) => {
                problems.append(&mut found);
                // Later stages would be checked against a schema this stage
                // did not produce, which only adds misleading problems.
                break;
            }
        }
    }
    if !problems.is_empty() {
        return Err(loaded.error(problems).into());
    }
    warn_fan_out_after_model_noise(&config.stages, &stages);

    let names: Vec<String> = match config.sink.columns() {
        Some(columns) => columns.to_vec(),
        None => schema.fields().iter().map(|f| f.name().clone()).collect(),
    };
    let mut projection = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match schema.index_of(name) {
            Ok(index) => projection.push(index),
            Err(_) => problems.push(ConfigProblem::new(
                format!("sink.columns[{i}]"),
                format!(
                    "column {name:?} does not reach the sink; available columns: {}",
                    schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }
    if matches!(config.sink, SinkConfig::Nats(_)) && schema.field_with_name(crate::batch::ORIGIN_COLUMN).is_err() {
        let dropped_by = config.stages.iter().rposition(|stage| matches!(stage, StageConfig::Aggregate(_)));
        let (path, message) = match dropped_by {
            Some(index) => (
                format!("stages[{index}].keep"),
                "the `nats` sink sends the output of each input message as one message, so it needs the `origin` column, which this aggregate drops; add `origin` to `keep`",
            ),
            None => (
                String::from("sink.kind"),
                "the `nats` sink sends the output of each input message as one message, so it needs the `origin` column, which does not reach the sink",
            ),
        };
        problems.push(ConfigProblem::new(path, message));
    }
    let images = config
        .sink
        .arrow_file()
        .and_then(|sink| sink.images.as_ref())
        .and_then(|c| ImageSink::plan(c, &schema, &key_column).map_err(|problem| problems.push(problem)).ok());
    if !problems.is_empty() {
        return Err(loaded.error(problems).into());
    }

    let mut metadata = HashMap::from([
        (String::from("stochflow.version"), env!("CARGO_PKG_VERSION").to_string()),
        (String::from("stochflow.seed"), config.seed.to_string()),
        (String::from("stochflow.config_sha256"), loaded.fingerprint.clone()),
        (String::from("stochflow.rng_contract"), crate::rng::CONTRACT_VERSION.to_string()),
        (String::from("stochflow.key_column"), key_column.clone()),
    ]);
    for stage in &stages {
        metadata.extend(stage.provenance());
    }
    let fields: Vec<_> = projection.iter().map(|&i| schema.field(i).clone()).collect();
    let output_schema = Arc::new(Schema::new_with_metadata(fields, metadata));

    Ok(PlannedStages {
        stages,
        stage_inputs,
        schema,
        output_schema,
        projection,
        key_column,
        channel_capacity: config.runtime.channel_capacity,
        images,
    })
}

/// Warns when a `repeat` stage comes after an `infer` stage that draws
/// dropout masks or runs copies with weight noise. Such a model draws once
/// per record, so the samples of the fan-out share its output: a spread
/// measured over them leaves the model's randomness out.
fn warn_fan_out_after_model_noise(configs: &[StageConfig], stages: &[Arc<dyn Stage>]) {
    let mut noisy_model: Option<(&str, &str)> = None;
    for (config, stage) in configs.iter().zip(stages) {
        match config {
            StageConfig::Infer(infer) if noisy_model.is_none() => {
                noisy_model = if infer.weight_noise.is_some() {
                    Some((stage.name(), "runs a copy of the model with weight noise"))
                } else if infer.mc_dropout || !infer.inject_dropout.is_empty() {
                    Some((stage.name(), "draws dropout masks"))
                } else {
                    None
                };
            }
            StageConfig::Repeat(_) => {
                if let Some((model, draws)) = noisy_model {
                    tracing::warn!(
                        "stage {model:?} {draws} once per record, and stage {:?} fans the records out after it, so all samples of a record share the model's output; put the `repeat` stage before {model:?} to draw once per sample",
                        stage.name()
                    );
                }
                return;
            }
            _ => {}
        }
    }
}

/// Returns the name of the key column, or of the sample index column, when
/// a stage's `output` schema gives it another type: the stage wrote its own
/// column under that name.
fn overwrites_reserved(input: &Schema, output: &Schema, key_column: &str) -> Option<String> {
    [key_column, SAMPLE_COLUMN]
        .into_iter()
        .filter_map(|name| input.field_with_name(name).ok().map(|field| (name, field)))
        .find(|(name, field)| output.field_with_name(name).is_ok_and(|out| out.data_type() != field.data_type()))
        .map(|(name, _)| name.to_string())
}

/// Formats an error with its causes, as "error: cause: cause".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
