//! The `latent` source: records drawn from a prior, the input of a
//! generator pipeline.
//!
//! Records are keyed by ordinal. A record's values come from the stream of
//! (seed, source name, ordinal, sample 0), drawn in row-major order, so a
//! record never depends on the batch size or on the other records. With
//! `interpolate`, `records` counts paths: path `p` draws endpoint A and then
//! endpoint B from the stream keyed by `p`, and yields `steps` records from
//! A to B, both included, with ordinals `p * steps .. (p + 1) * steps`.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Int32Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::interpolate::interpolate;
use super::prior::Prior;
use super::{ORDINAL_COLUMN, Source, SourceError};
use crate::batch::Batch;
use crate::config::{FRACTION_COLUMN, InterpolationMethod, LatentSourceConfig, PATH_COLUMN, STEP_COLUMN};
use crate::rng::{RecordRng, StageRng};
use crate::tensor::{self, ElementType, TensorType};

pub struct LatentSource {
    rng: StageRng,
    prior: Prior,
    tensor: TensorType,
    /// Steps per path and the method, when interpolating.
    interpolation: Option<(u64, InterpolationMethod)>,
    /// Constant columns: their type and values.
    conditioning: Vec<(TensorType, Vec<f32>)>,
    /// Records to yield in all.
    total: u64,
    next: u64,
    batch_size: usize,
    schema: SchemaRef,
    /// The endpoints of the path read last, since consecutive records share them.
    endpoints: Option<(u64, Vec<f64>, Vec<f64>)>,
    /// Buffer for one interpolated record before rounding.
    point: Vec<f64>,
}

impl LatentSource {
    /// Opens the source. Every setting was checked when the file was loaded,
    /// and nothing is read, so this returns `Ok` for any checked section.
    pub fn open(config: &LatentSourceConfig, seed: u64) -> Result<Self, SourceError> {
        let tensor = TensorType::new(ElementType::Float32, config.shape.clone());
        let interpolation = config.interpolate.as_ref().map(|i| (u64::from(i.steps), i.method));
        let mut fields = vec![Field::new(ORDINAL_COLUMN, DataType::Int64, false)];
        if interpolation.is_some() {
            fields.push(Field::new(PATH_COLUMN, DataType::Int64, false));
            fields.push(Field::new(STEP_COLUMN, DataType::Int32, false));
            fields.push(Field::new(FRACTION_COLUMN, DataType::Float32, false));
        }
        fields.push(tensor.field(&config.column));
        let mut conditioning = Vec::new();
        for (name, constant) in &config.conditioning {
            let constant_type = TensorType::new(ElementType::Float32, constant.shape());
            fields.push(constant_type.field(name));
            conditioning.push((constant_type, constant.values.iter().map(|&v| v as f32).collect()));
        }
        let steps = interpolation.map_or(1, |(steps, _)| steps);
        Ok(Self {
            rng: StageRng::new(seed, config.stream_name()),
            prior: Prior::new(&config.prior),
            tensor,
            interpolation,
            conditioning,
            total: config.records.saturating_mul(steps),
            next: 0,
            batch_size: config.batch_size,
            schema: Arc::new(Schema::new(fields)),
            endpoints: None,
            point: Vec::new(),
        })
    }

    /// Fills `out` with draws from the start of the stream of `key`.
    fn draw(&self, key: u64, out: &mut [f64]) {
        self.prior.draw(&mut self.stream(key), out);
    }

    /// Returns the stream of `key`, positioned at its start.
    fn stream(&self, key: u64) -> RecordRng {
        self.rng.stream(key.to_string().as_bytes(), 0)
    }

    /// Writes the latent values of record `ordinal` into `out`, rounded to
    /// float32.
    fn record(&mut self, ordinal: u64, out: &mut [f32]) {
        let Some((steps, method)) = self.interpolation else {
            self.prior.draw_narrow(&mut self.stream(ordinal), out);
            return;
        };
        let mut point = std::mem::take(&mut self.point);
        point.resize(out.len(), 0.0);
        self.interpolated(ordinal, steps, method, &mut point);
        for (value, &p) in out.iter_mut().zip(&point) {
            *value = self.prior.narrow(p);
        }
        self.point = point;
    }

    /// Writes the point of record `ordinal` on its path into `out`.
    fn interpolated(&mut self, ordinal: u64, steps: u64, method: InterpolationMethod, out: &mut [f64]) {
        let (path, step) = (ordinal / steps, ordinal % steps);
        if self.endpoints.as_ref().is_none_or(|(cached, ..)| *cached != path) {
            let len = self.tensor.len();
            let mut both = vec![0.0; 2 * len];
            self.draw(path, &mut both);
            let b = both.split_off(len);
            self.endpoints = Some((path, both, b));
        }
        let (_, a, b) = self.endpoints.as_ref().expect("the endpoints were just drawn");
        // The endpoints are copied, not computed, so they match A and B exactly.
        match step {
            0 => out.copy_from_slice(a),
            s if s == steps - 1 => out.copy_from_slice(b),
            s => interpolate(method, a, b, s as f64 / (steps - 1) as f64, out),
        }
    }
}

impl Source for LatentSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn key_column(&self) -> &str {
        ORDINAL_COLUMN
    }

    fn len_hint(&self) -> Option<u64> {
        Some(self.total)
    }

    fn next_batch(&mut self) -> Result<Option<Batch>, SourceError> {
        if self.next >= self.total {
            return Ok(None);
        }
        let count = (self.batch_size as u64).min(self.total - self.next);
        let ordinals = self.next..self.next + count;
        let len = self.tensor.len();
        let mut values = vec![0f32; count as usize * len];
        for (ordinal, row) in ordinals.clone().zip(values.chunks_exact_mut(len)) {
            self.record(ordinal, row);
        }

        let mut columns: Vec<ArrayRef> =
            vec![Arc::new(Int64Array::from_iter_values(ordinals.clone().map(|o| o as i64)))];
        if let Some((steps, _)) = self.interpolation {
            let last = (steps - 1) as f32;
            columns.push(Arc::new(Int64Array::from_iter_values(ordinals.clone().map(|o| (o / steps) as i64))));
            columns.push(Arc::new(Int32Array::from_iter_values(ordinals.clone().map(|o| (o % steps) as i32))));
            columns.push(Arc::new(Float32Array::from_iter_values(ordinals.clone().map(|o| (o % steps) as f32 / last))));
        }
        columns.push(tensor::build_f32(&self.tensor, values).expect("the buffer contains whole rows"));
        for (constant_type, constant) in &self.conditioning {
            let repeated = constant.iter().copied().cycle().take(constant.len() * count as usize).collect();
            columns.push(tensor::build_f32(constant_type, repeated).expect("the buffer contains whole rows"));
        }
        self.next += count;
        let data = RecordBatch::try_new(self.schema.clone(), columns).expect("columns match the source schema");
        Ok(Some(Batch::new(data, Vec::new())))
    }
}
