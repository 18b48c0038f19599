//! The `add_noise` stage: random noise on a tensor column.
//!
//! Each row is perturbed with draws from its own stream (seed, stage name,
//! record key, sample index); [`kinds`] lists the noise kinds. The optional
//! clip range is applied after the noise. Float data is never clipped
//! unless a range is configured. Integer data is rounded and saturates at
//! its type's range. For uint8, additive settings (mean, std, low, high,
//! salt, pepper, clip) are in the data's own units, 0 to 255. For uint16
//! they are in the same 8-bit units scaled by 257 = 65535 / 255, so one
//! pipeline perturbs 8- and 16-bit images alike. Rates and the Poisson
//! scale are not scaled.

mod kinds;

use arrow::array::{RecordBatch, new_empty_array};
use arrow::datatypes::{DataType, Float32Type, SchemaRef};

use super::{PlanContext, Planned, Stage, StageError, reject_rows, schema_with, with_column};
use crate::batch::{Batch, Keys, sample_indices};
use crate::config::{AddNoiseConfig, ConfigProblem};
use crate::rng::StageRng;
use crate::tensor::{self, ElementType, TensorType};

pub use kinds::{Noise, ValueRange};

/// Scale from 8-bit to 16-bit units.
const U16_SCALE: f32 = 257.0;

pub struct AddNoise {
    name: String,
    column: String,
    output: String,
    tensor: TensorType,
    noise: Noise,
    /// Clip bounds in the data's units.
    clip: Option<(f32, f32)>,
    rng: StageRng,
    key_column: String,
    schema: SchemaRef,
    workers: usize,
}

impl AddNoise {
    pub fn plan(config: &AddNoiseConfig, context: &PlanContext) -> Result<Planned, Vec<ConfigProblem>> {
        let name = config.name.clone().unwrap_or_else(|| String::from("add_noise"));
        let tensor = context.tensor_column("column", &config.column).map_err(|p| vec![p])?;
        let (unit, range) = match tensor.element {
            ElementType::Float32 => (1.0, ValueRange { low: 0.0, high: 1.0 }),
            ElementType::UInt8 => (1.0, ValueRange { low: 0.0, high: 255.0 }),
            ElementType::UInt16 => (U16_SCALE, ValueRange { low: 0.0, high: 65535.0 }),
        };
        let output = config.output.clone().unwrap_or_else(|| config.column.clone());
        let schema = schema_with(context.input, tensor.field(&output));
        let stage = Self {
            rng: StageRng::new(context.seed, &name),
            name,
            column: config.column.clone(),
            output,
            noise: Noise::from_config(config, unit, range),
            clip: config.clip.map(|[low, high]| (low as f32 * unit, high as f32 * unit)),
            tensor,
            key_column: context.key_column.to_string(),
            schema: schema.clone(),
            workers: context.workers,
        };
        Ok((Box::new(stage), schema))
    }

    /// Perturbs one row of float values in place.
    fn perturb_row(&self, values: &mut [f32], key: &[u8], sample: u32) -> Result<(), String> {
        let mut rng = self.rng.stream(key, sample);
        self.noise.apply(values, &self.tensor.shape, &mut rng)?;
        if let Some((low, high)) = self.clip {
            for value in values.iter_mut() {
                *value = value.clamp(low, high);
            }
        }
        Ok(())
    }

    /// Perturbs a float32 column. When the output replaces the column and
    /// no other array shares its buffer, the values change in that buffer,
    /// which saves a copy of the tensor data and an allocation per batch.
    fn perturb_f32(&self, mut batch: Batch) -> Result<Batch, StageError> {
        let error = |err: arrow::error::ArrowError| StageError { stage: self.name.clone(), message: err.to_string() };
        let samples = sample_indices(&batch.data);
        let schema = batch.data.schema();
        let index = schema.index_of(&self.column).expect("the planned column exists");
        let key_index = schema.index_of(&self.key_column).expect("the key column is checked when planning");
        let replaces = self.output == self.column;
        let data = std::mem::replace(&mut batch.data, RecordBatch::new_empty(schema.clone()));
        let (_, mut columns, _) = data.into_parts();
        let column = if replaces {
            std::mem::replace(&mut columns[index], new_empty_array(&DataType::Null))
        } else {
            columns[index].clone()
        };
        let mut values = tensor::into_values::<Float32Type>(column).map_err(error)?;

        let keys = Keys::of_column(&columns[key_index]).expect("the key column is checked when planning");
        let mut problems = vec![None; samples.len()];
        for (row, chunk) in values.chunks_exact_mut(self.tensor.len().max(1)).enumerate() {
            if let Err(reason) = keys.with_bytes(row, |key| self.perturb_row(chunk, key, samples[row])) {
                problems[row] = Some(reason);
            }
        }
        let noisy = tensor::build_f32(&self.tensor, values).map_err(error)?;
        batch.data = if replaces {
            columns[index] = noisy;
            RecordBatch::try_new(self.schema.clone(), columns).map_err(error)?
        } else {
            let data = RecordBatch::try_new(schema, columns).map_err(error)?;
            with_column(&data, &self.schema, &self.output, noisy)
        };
        Ok(reject_rows(batch, problems, &self.name, &self.key_column))
    }

    /// Perturbs integer rows: each row is widened to float32, perturbed,
    /// rounded, and saturated at the type's range by `narrow`.
    fn perturb_integers<T: Copy + num_traits::Bounded + Into<f64>>(
        &self,
        source: &[T],
        narrow: impl Fn(f32) -> T,
        keys: &Keys,
        samples: &[u32],
        problems: &mut [Option<String>],
    ) -> Vec<T> {
        let max = T::max_value().into() as f32;
        let row_len = self.tensor.len().max(1);
        let mut values = Vec::with_capacity(source.len());
        let mut row_buffer = vec![0f32; row_len];
        for (row, chunk) in source.chunks_exact(row_len).enumerate() {
            for (target, &value) in row_buffer.iter_mut().zip(chunk) {
                *target = value.into() as f32;
            }
            if let Err(reason) = keys.with_bytes(row, |key| self.perturb_row(&mut row_buffer, key, samples[row])) {
                problems[row] = Some(reason);
            }
            values.extend(row_buffer.iter().map(|v| narrow(v.round().clamp(0.0, max))));
        }
        values
    }
}

impl Stage for AddNoise {
    fn name(&self) -> &str {
        &self.name
    }

    fn concurrency(&self) -> usize {
        self.workers
    }

    fn keeps_rows(&self) -> bool {
        true
    }

    fn process(&self, mut batch: Batch) -> Result<Batch, StageError> {
        if self.tensor.element == ElementType::Float32 {
            return self.perturb_f32(batch);
        }
        let data = &batch.data;
        let column = data.column_by_name(&self.column).expect("the planned column exists");
        let keys = Keys::new(data, &self.key_column).expect("the key column is checked when planning");
        let samples = sample_indices(data);
        let mut problems = vec![None; data.num_rows()];
        let error = |err: arrow::error::ArrowError| StageError { stage: self.name.clone(), message: err.to_string() };

        let noisy = match self.tensor.element {
            ElementType::Float32 => unreachable!("float32 columns are perturbed by perturb_f32"),
            ElementType::UInt8 => {
                let source = tensor::u8_values(column).map_err(error)?;
                let values = self.perturb_integers(source, |v| v as u8, &keys, &samples, &mut problems);
                tensor::build_u8(&self.tensor, values)
            }
            ElementType::UInt16 => {
                let source = tensor::u16_values(column).map_err(error)?;
                let values = self.perturb_integers(source, |v| v as u16, &keys, &samples, &mut problems);
                tensor::build_u16(&self.tensor, values)
            }
        }
        .map_err(error)?;

        batch.data = with_column(data, &self.schema, &self.output, noisy);
        Ok(reject_rows(batch, problems, &self.name, &self.key_column))
    }
}
