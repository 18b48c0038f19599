//! The `repeat` stage: fans each record out into `samples` rows, with the
//! row's index in a `sample` column, so that later random stages draw once
//! per sample (test-time augmentation, Monte Carlo estimates).

use std::sync::Arc;

use arrow::array::{Int32Array, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{Schema, SchemaRef};

use super::{PlanContext, Planned, Stage, StageError};
use crate::batch::{Batch, SAMPLE_COLUMN};
use crate::config::{ConfigProblem, RepeatConfig};

pub struct Repeat {
    name: String,
    samples: u32,
    schema: SchemaRef,
    workers: usize,
}

impl Repeat {
    pub fn plan(config: &RepeatConfig, context: &PlanContext) -> Result<Planned, Vec<ConfigProblem>> {
        if context.input.field_with_name(SAMPLE_COLUMN).is_ok() {
            return Err(vec![context.problem(
                "samples",
                "records were already fanned out by an earlier stage; fan out in one stage only",
            )]);
        }
        let mut fields: Vec<arrow::datatypes::FieldRef> = context.input.fields().iter().cloned().collect();
        fields.push(Arc::new(super::sample::sample_field(config.samples)));
        let schema = Arc::new(Schema::new_with_metadata(fields, context.input.metadata().clone()));
        let stage = Self {
            name: config.name.clone().unwrap_or_else(|| String::from("repeat")),
            samples: config.samples,
            schema: schema.clone(),
            workers: context.workers,
        };
        Ok((Box::new(stage), schema))
    }
}

impl Stage for Repeat {
    fn name(&self) -> &str {
        &self.name
    }

    fn concurrency(&self) -> usize {
        self.workers
    }

    fn process(&self, mut batch: Batch) -> Result<Batch, StageError> {
        let rows = batch.data.num_rows() as u32;
        let indices: Vec<u32> = (0..rows).flat_map(|row| std::iter::repeat_n(row, self.samples as usize)).collect();
        let samples: Vec<i32> = (0..rows).flat_map(|_| 0..self.samples as i32).collect();
        let error = |err: arrow::error::ArrowError| StageError { stage: self.name.clone(), message: err.to_string() };

        let repeated = take_record_batch(&batch.data, &UInt32Array::from(indices)).map_err(error)?;
        let mut columns = repeated.columns().to_vec();
        columns.push(Arc::new(Int32Array::from(samples)));
        batch.data = RecordBatch::try_new(self.schema.clone(), columns).map_err(error)?;
        Ok(batch)
    }
}
