//! Stages: the steps between the source and the sink.
//!
//! A stage is planned against the schema it receives, which is how a
//! mismatch between the pipeline file, the data and the model is found
//! before any record is read. At run time it maps one batch to one batch,
//! on a worker thread. A record the stage cannot process is moved from the
//! batch's rows to its rejections, with the reason.

mod add_noise;
mod aggregate;
mod augment;
mod infer;
mod preprocess;
mod repeat;
mod sample;

use std::collections::BTreeMap;

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, SchemaRef};

use crate::batch::{Batch, Keys, Rejected};
use crate::config::{ConfigProblem, StageConfig};
use crate::tensor::TensorType;

pub use add_noise::AddNoise;
pub use aggregate::Aggregate;
pub use augment::Augment;

/// The noise kinds of `add_noise`, for benchmarks and library users.
pub mod noise {
    pub use super::add_noise::{Noise, ValueRange};
}
pub use infer::Infer;
pub use preprocess::Preprocess;
pub use repeat::Repeat;
pub use sample::Sample;

/// A failure that stops the pipeline, as opposed to a rejected record.
#[derive(Debug, thiserror::Error)]
#[error("stage {stage} failed: {message}")]
pub struct StageError {
    pub stage: String,
    pub message: String,
}

/// One planned step of a pipeline.
pub trait Stage: Send + Sync {
    fn name(&self) -> &str;

    /// Rows per call, when the stage wants batches of a fixed size (the
    /// model stage); the runtime then regroups rows before the stage.
    fn batch_size(&self) -> Option<usize> {
        None
    }

    /// Calls that may run at once.
    fn concurrency(&self) -> usize;

    /// Returns whether each input row gives exactly one output row (or a
    /// rejection), whatever the other rows of the batch. Rows may then be
    /// regrouped before this stage instead of after it.
    fn keeps_rows(&self) -> bool {
        false
    }

    /// Processes one batch.
    fn process(&self, batch: Batch) -> Result<Batch, StageError>;

    /// Provenance to record in the output's schema metadata.
    fn provenance(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}

/// Inputs to planning a stage: the seed, its position, its input schema.
pub struct PlanContext<'a> {
    pub seed: u64,
    pub index: usize,
    pub input: &'a SchemaRef,
    pub key_column: &'a str,
    pub workers: usize,
}

impl PlanContext<'_> {
    /// Builds a problem about a key of this stage's section.
    pub fn problem(&self, key: &str, message: impl Into<String>) -> ConfigProblem {
        ConfigProblem::new(format!("stages[{}].{key}", self.index), message)
    }

    /// Looks up a tensor column of the input, or explains why it is not one.
    pub fn tensor_column(&self, key: &str, name: &str) -> Result<TensorType, ConfigProblem> {
        let field = self.input.field_with_name(name).map_err(|_| {
            self.problem(
                key,
                format!("column {name:?} does not exist here; available columns: {}", self.column_names()),
            )
        })?;
        TensorType::of_field(field).ok_or_else(|| {
            let hint = match field.data_type() {
                DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..) => format!(
                    "; if it holds one tensor per record, give its shape under the source's `tensors` key, \
                     for example `tensors: {{{name}: {{shape: [64]}}}}`"
                ),
                _ => String::new(),
            };
            self.problem(
                key,
                format!("column {name:?} has type {}, not a float32, uint8 or uint16 tensor{hint}", field.data_type()),
            )
        })
    }

    pub fn column_names(&self) -> String {
        self.input.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// A planned stage and the schema of the batches it emits.
pub type Planned = (Box<dyn Stage>, SchemaRef);

/// Plans one stage against its input schema.
pub fn plan(config: &StageConfig, context: &PlanContext) -> Result<Planned, Vec<ConfigProblem>> {
    match config {
        StageConfig::Preprocess(c) => Preprocess::plan(c, context),
        StageConfig::AddNoise(c) => AddNoise::plan(c, context),
        StageConfig::Infer(c) => Infer::plan(c, context),
        StageConfig::Sample(c) => Sample::plan(c, context),
        StageConfig::Repeat(c) => Repeat::plan(c, context),
        StageConfig::Augment(c) => Augment::plan(c, context),
        StageConfig::Aggregate(c) => Aggregate::plan(c, context),
    }
}

/// Moves the rows that have a problem from the batch to its rejections.
pub fn reject_rows(mut batch: Batch, problems: Vec<Option<String>>, stage: &str, key_column: &str) -> Batch {
    if problems.iter().all(Option::is_none) {
        return batch;
    }
    let keys = Keys::new(&batch.data, key_column).expect("the key column is checked when the pipeline is planned");
    for (row, problem) in problems.iter().enumerate() {
        if let Some(reason) = problem {
            batch.rejected.push(Rejected {
                key: keys.get(row),
                component: stage.to_string(),
                reason: reason.clone(),
                origin: crate::batch::origin_of(&batch.data, row),
            });
        }
    }
    let keep = BooleanArray::from(problems.iter().map(Option::is_none).collect::<Vec<_>>());
    batch.data = filter_record_batch(&batch.data, &keep).expect("the mask has one entry per row");
    batch
}

/// Replaces or appends a column, keeping the schema's other fields.
pub fn with_column(batch: &RecordBatch, schema: &SchemaRef, name: &str, column: arrow::array::ArrayRef) -> RecordBatch {
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        if field.name() == name {
            columns.push(column.clone());
        } else {
            columns.push(batch.column_by_name(field.name()).expect("the planned schema matches the batch").clone());
        }
    }
    RecordBatch::try_new(schema.clone(), columns).expect("the planned schema matches the columns")
}

/// Returns the schema with `field` replacing a field of its name, or appended.
pub fn schema_with(input: &SchemaRef, field: arrow::datatypes::Field) -> SchemaRef {
    let mut fields: Vec<arrow::datatypes::FieldRef> = input.fields().iter().cloned().collect();
    match fields.iter().position(|f| f.name() == field.name()) {
        Some(index) => fields[index] = std::sync::Arc::new(field),
        None => fields.push(std::sync::Arc::new(field)),
    }
    std::sync::Arc::new(arrow::datatypes::Schema::new_with_metadata(fields, input.metadata().clone()))
}
