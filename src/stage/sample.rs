//! The `sample` stage: categorical samples from per-class scores.
//!
//! Scores are logits (softmax is applied) or probabilities (renormalized),
//! sharpened or flattened by a temperature `T`: softmax(logits / T), or
//! p^(1/T) renormalized. `T = 0` takes the most likely class, the lowest
//! index on ties. Each sample uses one uniform draw from the stream of
//! (seed, stage name, record key, sample index) and the inverse CDF.
//!
//! With `samples > 1` every record becomes that many rows, with a `sample`
//! column holding the index; the record's other columns are repeated.

use std::sync::Arc;

use arrow::array::{Int32Array, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rand::RngExt;

use super::{PlanContext, Planned, Stage, StageError, reject_rows};
use crate::batch::{Batch, Keys, SAMPLE_COLUMN, sample_indices};
use crate::config::{ConfigProblem, SampleConfig, SampleFrom};
use crate::rng::StageRng;
use crate::tensor::{self, ElementType};

pub struct Sample {
    name: String,
    column: String,
    classes: usize,
    from: SampleFrom,
    temperature: f64,
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
                format!("column {:?} holds {}; sampling needs float32 scores", config.column, tensor.element.name()),
            ));
        }
        if tensor.shape.len() != 1 {
            problems.push(context.problem(
                "column",
                format!(
                    "column {:?} has shape {:?}; sampling needs one vector of class scores per row",
                    config.column, tensor.shape
                ),
            ));
        }
        let fans_out = config.samples > 1;
        if fans_out && context.input.field_with_name(SAMPLE_COLUMN).is_ok() {
            problems.push(context.problem(
                "samples",
                "records were already fanned out by an earlier stage; draw several samples in one stage only",
            ));
        }
        if fans_out && config.output == SAMPLE_COLUMN {
            problems.push(context.problem(
                "output",
                format!("{SAMPLE_COLUMN:?} is the sample-index column of a fan-out; choose another `output` name"),
            ));
        } else if context.input.field_with_name(&config.output).is_ok() {
            problems.push(
                context.problem(
                    "output",
                    format!("column {:?} already exists; choose another `output` name", config.output),
                ),
            );
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let mut fields: Vec<arrow::datatypes::FieldRef> = context.input.fields().iter().cloned().collect();
        if fans_out {
            fields.push(Arc::new(Field::new(SAMPLE_COLUMN, DataType::Int32, false)));
        }
        fields.push(Arc::new(Field::new(&config.output, DataType::Int32, false)));
        let schema = Arc::new(Schema::new_with_metadata(fields, context.input.metadata().clone()));

        let stage = Self {
            rng: StageRng::new(context.seed, &name),
            name,
            column: config.column.clone(),
            classes: tensor.len(),
            from: config.from,
            temperature: config.temperature,
            samples: config.samples,
            key_column: context.key_column.to_string(),
            schema: schema.clone(),
            workers: context.workers,
        };
        Ok((Box::new(stage), schema))
    }
}

/// Turns one row of scores into unnormalized class weights. Fails on scores
/// that cannot define a distribution.
pub fn weights(scores: &[f32], from: SampleFrom, temperature: f64) -> Result<Vec<f64>, String> {
    if scores.iter().any(|s| s.is_nan()) {
        return Err(String::from("the scores contain NaN"));
    }
    match from {
        SampleFrom::Logits => {
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                return Err(String::from("every logit is -inf"));
            }
            if temperature == 0.0 {
                return Ok(one_hot_argmax(scores.iter().map(|&s| f64::from(s))));
            }
            if max == f32::INFINITY {
                // Infinite logits take all the mass, shared equally.
                return Ok(scores.iter().map(|&s| if s == f32::INFINITY { 1.0 } else { 0.0 }).collect());
            }
            let max = f64::from(max);
            Ok(scores.iter().map(|&s| ((f64::from(s) - max) / temperature).exp()).collect())
        }
        SampleFrom::Probabilities => {
            if scores.iter().any(|&p| p < 0.0 || p.is_infinite()) {
                return Err(String::from("probabilities must be finite and non-negative"));
            }
            if scores.iter().all(|&p| p == 0.0) {
                return Err(String::from("every probability is zero"));
            }
            if temperature == 0.0 {
                return Ok(one_hot_argmax(scores.iter().map(|&p| f64::from(p))));
            }
            // p^(1/T) computed in log space so that small T does not underflow.
            let logs: Vec<f64> = scores.iter().map(|&p| f64::from(p).ln() / temperature).collect();
            let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Ok(logs.iter().map(|&l| (l - max).exp()).collect())
        }
    }
}

fn one_hot_argmax(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let values: Vec<f64> = values.collect();
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    (0..values.len()).map(|i| if i == best { 1.0 } else { 0.0 }).collect()
}

/// Picks the class whose cumulative weight first exceeds `u * total`.
pub fn inverse_cdf(weights: &[f64], u: f64) -> usize {
    let total: f64 = weights.iter().sum();
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_positive = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            last_positive = i;
            cumulative += w;
            if target < cumulative {
                return i;
            }
        }
    }
    // Rounding can leave `target` a hair above the sum.
    last_positive
}

impl Stage for Sample {
    fn name(&self) -> &str {
        &self.name
    }

    fn concurrency(&self) -> usize {
        self.workers
    }

    fn process(&self, batch: Batch) -> Result<Batch, StageError> {
        let error = |err: arrow::error::ArrowError| StageError { stage: self.name.clone(), message: err.to_string() };
        let scores = tensor::f32_values(batch.data.column_by_name(&self.column).expect("the planned column exists"))
            .map_err(error)?;

        let problems: Vec<Option<String>> = scores
            .chunks_exact(self.classes)
            .map(|row| {
                weights(row, self.from, self.temperature)
                    .err()
                    .map(|reason| format!("cannot sample from column {:?}: {reason}", self.column))
            })
            .collect();
        let mut batch = reject_rows(batch, problems, &self.name, &self.key_column);
        let data = &batch.data;
        let scores =
            tensor::f32_values(data.column_by_name(&self.column).expect("the planned column exists")).map_err(error)?;
        let keys = Keys::new(data, &self.key_column).expect("the key column is checked when planning");
        let existing_samples = sample_indices(data);

        let rows = data.num_rows();
        let fan_out = self.samples as usize;
        let mut classes = Vec::with_capacity(rows * fan_out);
        let mut sample_column = Vec::with_capacity(rows * fan_out);
        let mut take = Vec::with_capacity(rows * fan_out);
        for (row, row_scores) in scores.chunks_exact(self.classes).enumerate() {
            let weights = weights(row_scores, self.from, self.temperature).expect("rows that fail were rejected above");
            let key = keys.get(row);
            for s in 0..self.samples {
                let sample = if fan_out > 1 { s } else { existing_samples[row] };
                let u: f64 = self.rng.stream(key.as_bytes(), sample).random();
                classes.push(inverse_cdf(&weights, u) as i32);
                sample_column.push(s as i32);
                take.push(row as u32);
            }
        }

        let repeated =
            if fan_out > 1 { take_record_batch(data, &UInt32Array::from(take)).map_err(error)? } else { data.clone() };
        let mut columns = repeated.columns().to_vec();
        if fan_out > 1 {
            columns.push(Arc::new(Int32Array::from(sample_column)));
        }
        columns.push(Arc::new(Int32Array::from(classes)));
        batch.data = RecordBatch::try_new(self.schema.clone(), columns).map_err(error)?;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_temperature_takes_argmax() {
        let w = weights(&[0.1, 2.0, 2.0, -1.0], SampleFrom::Logits, 0.0).unwrap();
        assert_eq!(w, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn zero_temperature_breaks_infinite_ties_by_lowest_index() {
        let w = weights(&[0.0, f32::INFINITY, f32::INFINITY], SampleFrom::Logits, 0.0).unwrap();
        assert_eq!(w, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn all_negative_infinity_is_an_error() {
        assert!(weights(&[f32::NEG_INFINITY; 3], SampleFrom::Logits, 1.0).is_err());
    }

    #[test]
    fn nan_is_an_error() {
        assert!(weights(&[0.0, f32::NAN], SampleFrom::Logits, 1.0).is_err());
    }

    #[test]
    fn inverse_cdf_picks_expected_bins() {
        let w = [1.0, 0.0, 3.0];
        assert_eq!(inverse_cdf(&w, 0.0), 0);
        assert_eq!(inverse_cdf(&w, 0.2499), 0);
        assert_eq!(inverse_cdf(&w, 0.25), 2);
        assert_eq!(inverse_cdf(&w, 0.999_999), 2);
    }

    #[test]
    fn probabilities_with_temperature_one_are_unchanged() {
        let w = weights(&[0.2, 0.3, 0.5], SampleFrom::Probabilities, 1.0).unwrap();
        let total: f64 = w.iter().sum();
        let normalized: Vec<f64> = w.iter().map(|x| x / total).collect();
        for (got, want) in normalized.iter().zip([0.2, 0.3, 0.5]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
