//! The `sample` stage: random draws from a distribution whose parameters
//! are in the record, one module per distribution.
//!
//! Every distribution follows the same steps. Each record's parameters are
//! read and checked first ([`Draw::prepare`]); a record without a valid
//! distribution is rejected with the reason. Then each sample of the record
//! draws from its own stream, (seed, stage name, record key, sample index),
//! taking its uniform or normal draws in row-major order of the output.
//!
//! With `samples > 1` every record becomes that many rows, with a `sample`
//! column holding the index; the record's other columns are repeated. The
//! `sample` field records the count in its metadata
//! ([`SAMPLES_METADATA`]), so that the `aggregate` stage can tell a record
//! whose samples were partly rejected from a complete one.

mod bernoulli;
mod categorical;
mod gaussian;
mod rounding;

use std::collections::HashMap;
use std::sync::Arc;

use crate::rng::RecordRng;
use arrow::array::{ArrayRef, FixedSizeListArray, Int32Array, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};

use super::{PlanContext, Planned, Stage, StageError, reject_rows};
use crate::batch::{Batch, Keys, SAMPLE_COLUMN, sample_indices};
use crate::config::{ConfigProblem, Distribution, SampleConfig};
use crate::rng::StageRng;
use crate::tensor::{self, ElementType, TensorType};

use bernoulli::Bernoulli;
pub use categorical::weights;
use categorical::{Categorical, Truncation};
use gaussian::{Gaussian, Spread};
use rounding::StochasticRounding;

/// Metadata key of the `sample` field: the number of samples per record.
pub const SAMPLES_METADATA: &str = "stochflow.samples";

/// One distribution: how a record's parameters are read, and how one
/// sample is drawn from them.
trait Draw: Send + Sync {
    /// One parameter of a record's distribution, ready to draw from.
    type Param;
    /// Element type of the output column.
    type Value: OutputValue;

    /// Appends one record's parameters to `params`, reading one slice per
    /// input column, or returns why they define no distribution. The
    /// parameters of a batch share one buffer, so preparing a record does not
    /// allocate.
    fn prepare(&self, inputs: &[&[f32]], params: &mut Vec<Self::Param>) -> Result<(), String>;

    /// Appends one sample, the output's elements in row-major order.
    fn draw(&self, params: &[Self::Param], rng: &mut RecordRng, out: &mut Vec<Self::Value>);

    /// Returns one record's parameters in a buffer of their own.
    #[cfg(test)]
    fn prepared(&self, inputs: &[&[f32]]) -> Result<Vec<Self::Param>, String> {
        let mut params = Vec::new();
        self.prepare(inputs, &mut params)?;
        Ok(params)
    }
}

/// An element type the stage can write.
trait OutputValue: Sized {
    /// Builds the output field for a per-row shape. An empty shape means one
    /// scalar per row.
    fn field(name: &str, shape: &[usize]) -> Field;
    fn column(shape: &[usize], values: Vec<Self>) -> Result<ArrayRef, arrow::error::ArrowError>;
}

impl OutputValue for i32 {
    fn field(name: &str, shape: &[usize]) -> Field {
        if shape.is_empty() {
            return Field::new(name, DataType::Int32, false);
        }
        // The tensor module has no int32 element type, so the float32
        // field lends its extension metadata to an Int32 list.
        let metadata = TensorType::new(ElementType::Float32, shape.to_vec()).field(name).metadata().clone();
        let item = Arc::new(Field::new("item", DataType::Int32, false));
        let size = shape.iter().product::<usize>() as i32;
        Field::new(name, DataType::FixedSizeList(item, size), false).with_metadata(metadata)
    }

    fn column(shape: &[usize], values: Vec<i32>) -> Result<ArrayRef, arrow::error::ArrowError> {
        let items = Arc::new(Int32Array::from(values));
        if shape.is_empty() {
            return Ok(items);
        }
        let item = Arc::new(Field::new("item", DataType::Int32, false));
        let size = shape.iter().product::<usize>() as i32;
        Ok(Arc::new(FixedSizeListArray::try_new(item, size, items, None)?))
    }
}

impl OutputValue for f32 {
    fn field(name: &str, shape: &[usize]) -> Field {
        TensorType::new(ElementType::Float32, shape.to_vec()).field(name)
    }

    fn column(shape: &[usize], values: Vec<f32>) -> Result<ArrayRef, arrow::error::ArrowError> {
        tensor::build_f32(&TensorType::new(ElementType::Float32, shape.to_vec()), values)
    }
}

enum Sampler {
    Categorical(Categorical),
    Bernoulli(Bernoulli),
    Gaussian(Gaussian),
    StochasticRounding(StochasticRounding),
}

pub struct Sample {
    name: String,
    sampler: Sampler,
    /// Input columns and their per-row element counts; the first is
    /// `column`, the Gaussian's spread column follows.
    inputs: Vec<(String, usize)>,
    output: String,
    /// Per-row shape of the output.
    output_shape: Vec<usize>,
    /// Whether the output replaces its input column in place.
    in_place: bool,
    samples: u32,
    rng: StageRng,
    key_column: String,
    schema: SchemaRef,
    workers: usize,
}

impl Sample {
    pub fn plan(config: &SampleConfig, context: &PlanContext) -> Result<Planned, Vec<ConfigProblem>> {
        let name = config.name.clone().unwrap_or_else(|| String::from("sample"));
        let tensor = context.tensor_column("column", &config.column).map_err(|p| vec![p])?;
        let mut problems = Vec::new();
        if tensor.element != ElementType::Float32 {
            problems.push(context.problem(
                "column",
                format!(
                    "column {:?} holds {}; distribution {} needs float32 values",
                    config.column,
                    tensor.element.name(),
                    config.distribution.name()
                ),
            ));
        }
        let mut inputs = vec![(config.column.clone(), tensor.len())];
        let (sampler, output_shape) = match config.distribution {
            Distribution::Categorical => {
                let (sampler, shape) = plan_categorical(config, &tensor, context, &mut problems);
                (Sampler::Categorical(sampler), shape)
            }
            Distribution::Bernoulli => (Sampler::Bernoulli(Bernoulli { from: config.from }), tensor.shape.clone()),
            Distribution::Gaussian => {
                let (key, spread, column) = match (&config.log_variance, &config.std) {
                    (Some(column), _) => ("log_variance", Spread::LogVariance, column),
                    (None, Some(column)) => ("std", Spread::Std, column),
                    (None, None) => {
                        // The static checks report this first; planning an
                        // unchecked config still fails cleanly.
                        return Err(vec![
                            context.problem("log_variance", "a gaussian needs a `log_variance` or a `std` column"),
                        ]);
                    }
                };
                match context.tensor_column(key, column) {
                    Ok(spread_tensor) if spread_tensor == tensor => inputs.push((column.clone(), tensor.len())),
                    Ok(other) => problems.push(context.problem(
                        key,
                        format!(
                            "column {column:?} is {}, but the mean column {:?} is {}; they must match",
                            other.describe(),
                            config.column,
                            tensor.describe()
                        ),
                    )),
                    Err(problem) => problems.push(problem),
                }
                (Sampler::Gaussian(Gaussian { spread }), tensor.shape.clone())
            }
            Distribution::StochasticRounding => {
                (Sampler::StochasticRounding(StochasticRounding { step: config.step() }), tensor.shape.clone())
            }
        };

        let output = config.output().to_string();
        let in_place = config.distribution == Distribution::StochasticRounding && output == config.column;
        let fans_out = config.samples > 1;
        if fans_out && context.input.field_with_name(SAMPLE_COLUMN).is_ok() {
            problems.push(context.problem(
                "samples",
                "records were already fanned out by an earlier stage; draw several samples in one stage only",
            ));
        }
        if fans_out && output == SAMPLE_COLUMN {
            problems.push(context.problem(
                "output",
                format!("{SAMPLE_COLUMN:?} is the sample-index column of a fan-out; choose another `output` name"),
            ));
        } else if !in_place && context.input.field_with_name(&output).is_ok() {
            problems.push(
                context.problem("output", format!("column {output:?} already exists; choose another `output` name")),
            );
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let output_field = Arc::new(match &sampler {
            Sampler::Categorical(_) | Sampler::Bernoulli(_) => i32::field(&output, &output_shape),
            Sampler::Gaussian(_) | Sampler::StochasticRounding(_) => f32::field(&output, &output_shape),
        });
        let mut fields: Vec<FieldRef> = context.input.fields().iter().cloned().collect();
        if in_place {
            let index = context.input.index_of(&output).expect("the input column exists");
            fields[index] = output_field.clone();
        }
        if fans_out {
            fields.push(Arc::new(sample_field(config.samples)));
        }
        if !in_place {
            fields.push(output_field);
        }
        let schema = Arc::new(Schema::new_with_metadata(fields, context.input.metadata().clone()));

        let stage = Self {
            rng: StageRng::new(context.seed, &name),
            name,
            sampler,
            inputs,
            output,
            output_shape,
            in_place,
            samples: config.samples,
            key_column: context.key_column.to_string(),
            schema: schema.clone(),
            workers: context.workers,
        };
        Ok((Box::new(stage), schema))
    }

    /// Prepares every record, rejects those without a distribution, and
    /// draws the samples of the others.
    fn run<D: Draw>(&self, sampler: &D, batch: Batch) -> Result<Batch, StageError> {
        let error = |err: arrow::error::ArrowError| StageError { stage: self.name.clone(), message: err.to_string() };
        let rows = batch.data.num_rows();
        // The parameters of every kept record, one after the other, and
        // where each record's parameters start.
        let mut params = Vec::with_capacity(rows * self.inputs[0].1);
        let mut starts = Vec::with_capacity(rows + 1);
        let mut problems = Vec::with_capacity(rows);
        {
            let mut columns = Vec::with_capacity(self.inputs.len());
            for (column, _) in &self.inputs {
                columns.push(
                    tensor::f32_values(batch.data.column_by_name(column).expect("the planned column exists"))
                        .map_err(error)?,
                );
            }
            let mut slices: Vec<&[f32]> = Vec::with_capacity(columns.len());
            for row in 0..rows {
                slices.clear();
                slices.extend(columns.iter().zip(&self.inputs).map(|(values, (_, len))| &values[row * len..][..*len]));
                let start = params.len();
                match sampler.prepare(&slices, &mut params) {
                    Ok(()) => {
                        starts.push(start);
                        problems.push(None);
                    }
                    Err(reason) => {
                        params.truncate(start);
                        problems.push(Some(format!("cannot sample from column {:?}: {reason}", self.inputs[0].0)))
                    }
                }
            }
            starts.push(params.len());
        }
        let mut batch = reject_rows(batch, problems, &self.name, &self.key_column);
        let data = &batch.data;
        let keys = Keys::new(data, &self.key_column).expect("the key column is checked when planning");
        let existing_samples = sample_indices(data);

        let fan_out = self.samples > 1;
        let draws = data.num_rows() * self.samples as usize;
        let mut values = Vec::with_capacity(draws * self.output_shape.iter().product::<usize>());
        let mut sample_column = Vec::with_capacity(draws);
        let mut take = Vec::with_capacity(draws);
        for (row, bounds) in starts.windows(2).enumerate() {
            let prepared = &params[bounds[0]..bounds[1]];
            for s in 0..self.samples {
                let sample = if fan_out { s } else { existing_samples[row] };
                let mut rng = keys.with_bytes(row, |key| self.rng.stream(key, sample));
                sampler.draw(prepared, &mut rng, &mut values);
                sample_column.push(s as i32);
                take.push(row as u32);
            }
        }

        let repeated =
            if fan_out { take_record_batch(data, &UInt32Array::from(take)).map_err(error)? } else { data.clone() };
        let output = D::Value::column(&self.output_shape, values).map_err(error)?;
        let mut columns = repeated.columns().to_vec();
        if self.in_place {
            let index = self.schema.index_of(&self.output).expect("the planned column exists");
            columns[index] = output.clone();
        }
        if fan_out {
            columns.push(Arc::new(Int32Array::from(sample_column)));
        }
        if !self.in_place {
            columns.push(output);
        }
        batch.data = RecordBatch::try_new(self.schema.clone(), columns).map_err(error)?;
        Ok(batch)
    }
}

/// Builds the `sample` field of a fan-out, with the sample count in its metadata.
pub(crate) fn sample_field(samples: u32) -> Field {
    Field::new(SAMPLE_COLUMN, DataType::Int32, false)
        .with_metadata(HashMap::from([(String::from(SAMPLES_METADATA), samples.to_string())]))
}

/// Plans the categorical sampler: the class axis, the steps around it, and
/// the top-k bound, which needs the number of classes.
fn plan_categorical(
    config: &SampleConfig,
    tensor: &TensorType,
    context: &PlanContext,
    problems: &mut Vec<ConfigProblem>,
) -> (Categorical, Vec<usize>) {
    let rank = tensor.shape.len() as i64;
    let requested = config.axis.unwrap_or(-1);
    let axis = if requested < 0 { requested + rank } else { requested };
    let axis = if (0..rank).contains(&axis) {
        axis as usize
    } else {
        problems.push(context.problem(
            "axis",
            format!(
                "axis {requested} is outside the {rank} axes of column {:?} (shape {:?}); use 0 to {} or -{rank} to -1",
                config.column,
                tensor.shape,
                rank - 1
            ),
        ));
        rank.max(1) as usize - 1
    };

    let classes = tensor.shape.get(axis).copied().unwrap_or(1);
    if let Some(k) = config.top_k
        && k > classes
    {
        problems.push(context.problem(
            "top_k",
            format!(
                "top_k {k} exceeds the {classes} classes on axis {axis} of column {:?}; use at most {classes}, or leave `top_k` out to keep every class",
                config.column
            ),
        ));
    }

    let outer = tensor.shape[..axis].iter().product();
    let inner = tensor.shape.get(axis + 1..).map_or(1, |rest| rest.iter().product());
    let mut output_shape = tensor.shape.clone();
    if axis < output_shape.len() {
        output_shape.remove(axis);
    }
    let sampler = Categorical {
        from: config.from,
        temperature: config.temperature,
        truncation: Truncation { top_k: config.top_k, top_p: config.top_p, min_p: config.min_p },
        classes,
        outer,
        inner,
    };
    (sampler, output_shape)
}

impl Stage for Sample {
    fn name(&self) -> &str {
        &self.name
    }

    fn concurrency(&self) -> usize {
        self.workers
    }

    fn keeps_rows(&self) -> bool {
        self.samples <= 1
    }

    fn process(&self, batch: Batch) -> Result<Batch, StageError> {
        match &self.sampler {
            Sampler::Categorical(s) => self.run(s, batch),
            Sampler::Bernoulli(s) => self.run(s, batch),
            Sampler::Gaussian(s) => self.run(s, batch),
            Sampler::StochasticRounding(s) => self.run(s, batch),
        }
    }
}
