//! The `aggregate` stage: one row per record from the rows of its samples.
//!
//! After a fan-out, a record is a run of rows with the same key and sample
//! indices 0, 1, ..., n − 1. The runtime keeps such a run in one batch: the
//! `sample` stage writes all of a record's samples into the batch that held
//! the record, and regrouping before an `infer` stage cuts batches only at a
//! record's first sample (src/runtime/rebatch.rs). The stage therefore
//! summarizes each batch on its own, and its output does not depend on the
//! batching.
//!
//! A run whose sample indices are not exactly 0..n, with n from the `sample`
//! field's metadata, lost samples on the way (an earlier stage rejected
//! them) and is rejected as a whole rather than summarized from part of its
//! samples. Runs are split where the key changes or the sample index stops
//! rising, so two records with the same key in a row stay apart.

mod stats;

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float32Array, Int32Array, RecordBatch, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, FieldRef, Float32Type, Int32Type, Schema, SchemaRef};

use super::sample::SAMPLES_METADATA;
use super::{PlanContext, Planned, Stage, StageError};
use crate::batch::{Batch, Keys, Rejected, SAMPLE_COLUMN, sample_indices};
use crate::config::{AggregateConfig, AggregateOp, ConfigProblem, SampleFrom};
use crate::tensor::{self, ElementType, TensorType};

/// One planned aggregate: its input column and what it computes.
enum Summary {
    /// Elementwise mean or standard deviation; `shape` is `None` for a plain
    /// Float32 column.
    Moment {
        column: String,
        len: usize,
        shape: Option<Vec<usize>>,
        std: bool,
    },
    Entropy {
        column: String,
        classes: usize,
        from: SampleFrom,
        measure: Measure,
    },
    Vote {
        column: String,
    },
}

#[derive(Clone, Copy)]
enum Measure {
    Predictive,
    Expected,
    MutualInformation,
}

/// The values of one output column, gathered record by record.
enum Values {
    Tensor(Vec<usize>, Vec<f32>),
    Float(Vec<f32>),
    Int(Vec<i32>),
}

pub struct Aggregate {
    name: String,
    summaries: Vec<Summary>,
    /// The key column and the `keep` columns, taken from the first sample.
    carried: Vec<String>,
    /// Samples per record, when the `sample` field records it.
    expected_samples: Option<usize>,
    key_column: String,
    schema: SchemaRef,
    workers: usize,
}

impl Aggregate {
    pub fn plan(config: &AggregateConfig, context: &PlanContext) -> Result<Planned, Vec<ConfigProblem>> {
        let name = config.name.clone().unwrap_or_else(|| String::from("aggregate"));
        let mut problems = Vec::new();
        let expected_samples = match context.input.field_with_name(SAMPLE_COLUMN) {
            Ok(field) if field.data_type() == &DataType::Int32 => {
                field.metadata().get(SAMPLES_METADATA).and_then(|n| n.parse().ok())
            }
            Ok(field) => {
                problems.push(context.problem(
                    "kind",
                    format!("the {SAMPLE_COLUMN:?} column has type {}, not Int32", field.data_type()),
                ));
                None
            }
            Err(_) => {
                return Err(vec![context.problem(
                    "kind",
                    format!(
                        "aggregate needs the {SAMPLE_COLUMN:?} column of a fan-out; put a `repeat` stage, or a `sample` stage with `samples` above 1, before it"
                    ),
                )]);
            }
        };

        let mut fields: Vec<FieldRef> = Vec::new();
        let mut carried = vec![context.key_column.to_string()];
        fields
            .push(Arc::new(context.input.field_with_name(context.key_column).expect("the key column exists").clone()));
        for (i, column) in config.keep.iter().enumerate() {
            if column == context.key_column || column == SAMPLE_COLUMN {
                problems.push(context.problem(
                    &format!("keep[{i}]"),
                    format!(
                        "column {column:?} is the {} column; remove it from `keep`, since the key column is always kept and {SAMPLE_COLUMN:?} is always dropped",
                        if column == SAMPLE_COLUMN { "sample-index" } else { "key" }
                    ),
                ));
                continue;
            }
            match context.input.field_with_name(column) {
                Ok(field) => {
                    fields.push(Arc::new(field.clone()));
                    carried.push(column.clone());
                }
                Err(_) => problems.push(context.problem(
                    &format!("keep[{i}]"),
                    format!("column {column:?} does not exist here; available columns: {}", context.column_names()),
                )),
            }
        }

        let mut summaries = Vec::new();
        for (i, op) in config.aggregates.iter().enumerate() {
            let at = format!("aggregates[{i}]");
            match plan_summary(op, &at, context) {
                Ok((summary, mut new_fields)) => {
                    summaries.push(summary);
                    fields.append(&mut new_fields);
                }
                Err(problem) => problems.push(problem),
            }
            for (key, output) in op.outputs() {
                if output == context.key_column || output == SAMPLE_COLUMN {
                    problems.push(context.problem(
                        &format!("{at}.{key}"),
                        format!("{output:?} is the key or sample-index column; choose another `{key}` name"),
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let schema = Arc::new(Schema::new_with_metadata(fields, context.input.metadata().clone()));
        let stage = Self {
            name,
            summaries,
            carried,
            expected_samples,
            key_column: context.key_column.to_string(),
            schema: schema.clone(),
            workers: context.workers,
        };
        Ok((Box::new(stage), schema))
    }

    /// Splits the rows into runs, one per record: a run ends where the key
    /// changes or the sample index stops rising.
    fn runs(keys: &Keys, samples: &[u32]) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let mut start = 0;
        let mut key = String::new();
        for row in 0..samples.len() {
            let row_key = keys.get(row);
            if row > start && (row_key != key || samples[row] <= samples[row - 1]) {
                runs.push((start, row));
                start = row;
            }
            key = row_key;
        }
        if start < samples.len() {
            runs.push((start, samples.len()));
        }
        runs
    }

    /// Returns why a run is not a whole record, or `None` when it is.
    fn incomplete(&self, samples: &[u32], key: &str, rejected: &[Rejected]) -> Option<String> {
        // Without the count in the field's metadata, the highest index seen
        // is used instead, so only samples missing at the end go unnoticed.
        let highest = samples.iter().copied().max().map_or(0, |s| s as usize + 1);
        let expected = self.expected_samples.unwrap_or(highest);
        if samples.iter().copied().eq(0..expected as u32) {
            return None;
        }
        let by = rejected
            .iter()
            .find(|r| r.key == key)
            .map_or_else(|| String::from("an earlier stage (see the log)"), |r| format!("stage {}", r.component));
        Some(format!(
            "only samples {samples:?} of 0 to {} reached this stage; the others were rejected by {by}, so the record is not summarized",
            expected.saturating_sub(1)
        ))
    }

    /// Computes every summary of one record, or returns why it cannot.
    fn summarize(&self, data: &RecordBatch, rows: (usize, usize), out: &mut [Vec<Values>]) -> Result<(), String> {
        let (start, end) = rows;
        let mut results = Vec::with_capacity(self.summaries.len());
        for summary in &self.summaries {
            match summary {
                Summary::Moment { column, len, shape, std } => {
                    let values = float_values(data, column);
                    let rows: Vec<&[f32]> = (start..end).map(|r| &values[r * len..][..*len]).collect();
                    let (mean, spread) = stats::mean_std(&rows);
                    let values = if *std { spread } else { mean };
                    results.push(vec![match shape {
                        Some(shape) => Values::Tensor(shape.clone(), values),
                        None => Values::Float(values),
                    }]);
                }
                Summary::Entropy { column, classes, from, measure } => {
                    let values = tensor::f32_values(data.column_by_name(column).expect("the planned column exists"))
                        .expect("the planned column is a float32 tensor");
                    let mut samples = Vec::with_capacity(end - start);
                    for (s, row) in (start..end).enumerate() {
                        let p = stats::probabilities(&values[row * classes..][..*classes], *from)
                            .map_err(|reason| format!("sample {s} of column {column:?}: {reason}"))?;
                        samples.push(p);
                    }
                    let u = stats::uncertainty(&samples);
                    let value = match measure {
                        Measure::Predictive => u.predictive,
                        Measure::Expected => u.expected,
                        Measure::MutualInformation => u.mutual_information,
                    };
                    results.push(vec![Values::Float(vec![value as f32])]);
                }
                Summary::Vote { column } => {
                    let array = data.column_by_name(column).expect("the planned column exists");
                    if (start..end).any(|r| array.is_null(r)) {
                        return Err(format!("column {column:?} has a null class"));
                    }
                    let classes = &array.as_primitive::<Int32Type>().values()[start..end];
                    let (winner, agreement) = stats::majority_vote(classes);
                    results.push(vec![Values::Int(vec![winner]), Values::Float(vec![agreement as f32])]);
                }
            }
        }
        for (collected, result) in out.iter_mut().zip(results) {
            for (target, values) in collected.iter_mut().zip(result) {
                match (target, values) {
                    (Values::Tensor(_, all), Values::Tensor(_, v)) | (Values::Float(all), Values::Float(v)) => {
                        all.extend(v)
                    }
                    (Values::Int(all), Values::Int(v)) => all.extend(v),
                    _ => unreachable!("each summary yields the value kinds it was planned with"),
                }
            }
        }
        Ok(())
    }
}

/// Plans one aggregate: checks its input column and returns its output fields.
fn plan_summary(op: &AggregateOp, at: &str, context: &PlanContext) -> Result<(Summary, Vec<FieldRef>), ConfigProblem> {
    let column = op.column().to_string();
    let key = format!("{at}.column");
    let field = context.input.field_with_name(&column).map_err(|_| {
        context.problem(
            &key,
            format!("column {column:?} does not exist here; available columns: {}", context.column_names()),
        )
    })?;
    let outputs = op.outputs();
    let named = |index: usize, field: Field| Arc::new(field.with_name(outputs[index].1.clone()));
    match op {
        AggregateOp::Mean(_) | AggregateOp::Std(_) => {
            let std = matches!(op, AggregateOp::Std(_));
            if field.data_type() == &DataType::Float32 {
                let out = named(0, Field::new("", DataType::Float32, false));
                return Ok((Summary::Moment { column, len: 1, shape: None, std }, vec![out]));
            }
            match TensorType::of_field(field) {
                Some(tensor) if tensor.element == ElementType::Float32 => {
                    let out = Arc::new(tensor.field(&outputs[0].1));
                    Ok((Summary::Moment { column, len: tensor.len(), shape: Some(tensor.shape), std }, vec![out]))
                }
                _ => Err(context.problem(
                    &key,
                    format!(
                        "column {column:?} has type {}; {} needs a Float32 column or float32 tensor",
                        field.data_type(),
                        op.name()
                    ),
                )),
            }
        }
        AggregateOp::PredictiveEntropy(c) | AggregateOp::ExpectedEntropy(c) | AggregateOp::MutualInformation(c) => {
            let measure = match op {
                AggregateOp::PredictiveEntropy(_) => Measure::Predictive,
                AggregateOp::ExpectedEntropy(_) => Measure::Expected,
                _ => Measure::MutualInformation,
            };
            match TensorType::of_field(field) {
                Some(tensor) if tensor.element == ElementType::Float32 && tensor.shape.len() == 1 => {
                    let out = named(0, Field::new("", DataType::Float32, false));
                    Ok((Summary::Entropy { column, classes: tensor.len(), from: c.from, measure }, vec![out]))
                }
                _ => Err(context.problem(
                    &key,
                    format!(
                        "column {column:?} has type {}; {} needs a float32 tensor of shape [classes]",
                        TensorType::of_field(field).map_or_else(|| field.data_type().to_string(), |t| t.describe()),
                        op.name()
                    ),
                )),
            }
        }
        AggregateOp::MajorityVote(_) => {
            if field.data_type() != &DataType::Int32 {
                return Err(context.problem(
                    &key,
                    format!(
                        "column {column:?} has type {}; majority_vote needs an Int32 column of class indices, such as a sample stage's output",
                        field.data_type()
                    ),
                ));
            }
            let vote = named(0, Field::new("", DataType::Int32, false));
            let agreement = named(1, Field::new("", DataType::Float32, false));
            Ok((Summary::Vote { column }, vec![vote, agreement]))
        }
    }
}

/// Returns the float values of a Float32 column or float32 tensor column.
fn float_values<'a>(data: &'a RecordBatch, column: &str) -> &'a [f32] {
    let array = data.column_by_name(column).expect("the planned column exists");
    match array.data_type() {
        DataType::Float32 => array.as_primitive::<Float32Type>().values(),
        _ => tensor::f32_values(array).expect("the planned column is a float32 tensor"),
    }
}

/// Empty output columns for each summary, in schema order.
fn empty_values(summaries: &[Summary]) -> Vec<Vec<Values>> {
    summaries
        .iter()
        .map(|summary| match summary {
            Summary::Moment { shape: Some(shape), .. } => vec![Values::Tensor(shape.clone(), Vec::new())],
            Summary::Moment { shape: None, .. } | Summary::Entropy { .. } => vec![Values::Float(Vec::new())],
            Summary::Vote { .. } => vec![Values::Int(Vec::new()), Values::Float(Vec::new())],
        })
        .collect()
}

impl Stage for Aggregate {
    fn name(&self) -> &str {
        &self.name
    }

    fn concurrency(&self) -> usize {
        self.workers
    }

    fn process(&self, mut batch: Batch) -> Result<Batch, StageError> {
        let error = |err: arrow::error::ArrowError| StageError { stage: self.name.clone(), message: err.to_string() };
        let data = &batch.data;
        let keys = Keys::new(data, &self.key_column).expect("the key column is checked when planning");
        let samples = sample_indices(data);

        let mut firsts = Vec::new();
        let mut out = empty_values(&self.summaries);
        let mut rejected = Vec::new();
        for (start, end) in Self::runs(&keys, &samples) {
            let key = keys.get(start);
            let problem = match self.incomplete(&samples[start..end], &key, &batch.rejected) {
                Some(reason) => Some(reason),
                None => self.summarize(data, (start, end), &mut out).err(),
            };
            match problem {
                Some(reason) => {
                    let origin = crate::batch::origin_of(data, start);
                    rejected.push(Rejected { key, component: self.name.clone(), reason, origin });
                }
                None => firsts.push(start as u32),
            }
        }

        let firsts = UInt32Array::from(firsts);
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for column in &self.carried {
            columns.push(
                take(data.column_by_name(column).expect("the planned column exists"), &firsts, None).map_err(error)?,
            );
        }
        for values in out.into_iter().flatten() {
            columns.push(match values {
                Values::Tensor(shape, values) => {
                    tensor::build_f32(&TensorType::new(ElementType::Float32, shape), values).map_err(error)?
                }
                Values::Float(values) => Arc::new(Float32Array::from(values)),
                Values::Int(values) => Arc::new(Int32Array::from(values)),
            });
        }
        batch.data = RecordBatch::try_new(self.schema.clone(), columns).map_err(error)?;
        batch.rejected.extend(rejected);
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    fn runs(keys: Vec<i64>, samples: Vec<u32>) -> Vec<(usize, usize)> {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(keys))]).unwrap();
        Aggregate::runs(&Keys::new(&batch, "id").unwrap(), &samples)
    }

    #[test]
    fn runs_split_on_key_and_restart() {
        assert_eq!(runs(vec![4, 4, 4, 9, 9, 9], vec![0, 1, 2, 0, 1, 2]), [(0, 3), (3, 6)]);
        // Equal keys in a row: a sample index that stops rising starts a new record.
        assert_eq!(runs(vec![5, 5, 5, 5], vec![0, 1, 0, 1]), [(0, 2), (2, 4)]);
        // A gap keeps the run whole, so it is rejected once.
        assert_eq!(runs(vec![5, 5, 5], vec![0, 1, 3]), [(0, 3)]);
        assert_eq!(runs(vec![], vec![]), Vec::<(usize, usize)>::new());
    }
}
