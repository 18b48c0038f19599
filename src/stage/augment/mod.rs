//! The `augment` stage: random image augmentation of tensor columns, with
//! the operations of Keras's preprocessing layers (`RandomFlip`,
//! `RandomRotation`, `RandomZoom`, `RandomTranslation`, `RandomCrop`,
//! `RandomContrast`, `RandomBrightness`) applied in list order.
//!
//! Each record draws every parameter from its own stream of (seed, stage
//! name, record key, sample index), operation by operation, so its result
//! depends on nothing else. The same draws are applied to the paired
//! columns, which keeps a segmentation mask aligned with its image.
//! docs/augment.md gives the exact semantics of each operation.

#[cfg(test)]
mod draw_statistics;
mod ops;
mod planes;
mod warp;

use std::collections::HashSet;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::SchemaRef;

use super::{PlanContext, Planned, Stage, StageError, schema_with};
use crate::batch::{Batch, Keys, sample_indices};
use crate::config::{AugmentConfig, AugmentOp, ConfigProblem, Layout, PairedConfig};
use crate::rng::StageRng;
use crate::tensor::{self, ElementType, TensorType};
use ops::{ColumnSettings, Op};
use planes::Planes;

pub struct Augment {
    name: String,
    ops: Vec<Op>,
    /// The main column first, then the paired columns in configured order.
    columns: Vec<ImageColumn>,
    rng: StageRng,
    key_column: String,
    schema: SchemaRef,
    workers: usize,
}

/// One augmented column: where it comes from and goes to, and its image shape.
struct ImageColumn {
    input: String,
    output: String,
    layout: Layout,
    element: ElementType,
    channels: usize,
    height: usize,
    width: usize,
    output_tensor: TensorType,
    settings: ColumnSettings,
}

/// Reads (channels, height, width) from an image tensor's per-row shape.
fn image_dims(shape: &[usize], layout: Layout) -> Result<(usize, usize, usize), String> {
    let (channels, height, width) = match (shape, layout) {
        ([c, h, w], Layout::Chw) => (*c, *h, *w),
        ([h, w, c], Layout::Hwc) => (*c, *h, *w),
        _ => {
            return Err(format!(
                "has per-row shape {shape:?}, not an image: augment needs three dimensions, {}",
                match layout {
                    Layout::Chw => "[channels, height, width] with layout chw",
                    Layout::Hwc => "[height, width, channels] with layout hwc",
                }
            ));
        }
    };
    if ![1, 3, 4].contains(&channels) {
        return Err(format!(
            "has per-row shape {shape:?}, so {channels} channels in layout {}; images have 1 (gray), 3 (RGB) or 4 (RGBA) channels, so check `layout`",
            layout_name(layout)
        ));
    }
    if height == 0 || width == 0 {
        return Err(format!("has per-row shape {shape:?}, an empty image"));
    }
    Ok((channels, height, width))
}

fn layout_name(layout: Layout) -> &'static str {
    match layout {
        Layout::Chw => "chw",
        Layout::Hwc => "hwc",
    }
}

fn image_shape(layout: Layout, channels: usize, height: usize, width: usize) -> Vec<usize> {
    match layout {
        Layout::Chw => vec![channels, height, width],
        Layout::Hwc => vec![height, width, channels],
    }
}

/// Data units per unit of the [0, 1] scale that `preprocess` decodes to.
fn unit_scale(element: ElementType) -> f32 {
    match element {
        ElementType::Float32 => 1.0,
        ElementType::UInt8 => 255.0,
        ElementType::UInt16 => 65535.0,
    }
}

/// Resolves an operation's ranges to `[low, high]`.
fn resolve(op: &AugmentOp) -> Op {
    match op {
        AugmentOp::Flip(mode) => Op::Flip(*mode),
        AugmentOp::Rotation(c) => Op::Rotation { degrees: c.degrees.bounds_around(0.0), resample: c.resample() },
        AugmentOp::Zoom(c) => Op::Zoom {
            height: c.height.bounds_around(0.0),
            width: c.width.map(|w| w.bounds_around(0.0)),
            resample: c.resample(),
        },
        AugmentOp::Translation(c) => Op::Translation {
            height: c.height.bounds_around(0.0),
            width: c.width.bounds_around(0.0),
            resample: c.resample(),
        },
        AugmentOp::Crop(c) => Op::Crop { height: c.height, width: c.width },
        AugmentOp::Contrast(c) => Op::Contrast { factor: c.factor.bounds_around(1.0) },
        AugmentOp::Brightness(c) => Op::Brightness { delta: c.delta.bounds_around(0.0) },
    }
}

impl Augment {
    pub fn plan(config: &AugmentConfig, context: &PlanContext) -> Result<Planned, Vec<ConfigProblem>> {
        let name = config.name.clone().unwrap_or_else(|| String::from("augment"));
        let mut problems = Vec::new();
        let tensor = context.tensor_column("column", &config.column).map_err(|p| vec![p])?;
        let (channels, height, width) = image_dims(&tensor.shape, config.layout)
            .map_err(|message| vec![context.problem("column", format!("column {:?} {message}", config.column))])?;

        // Crops are the only operations that change the size, so the final
        // size, and whether each crop fits, is known before any record.
        let mut size = (height, width);
        for (index, op) in config.ops.iter().enumerate() {
            if let AugmentOp::Crop(crop) = op {
                if crop.height > size.0 || crop.width > size.1 {
                    problems.push(context.problem(
                        &format!("ops[{index}].crop"),
                        format!(
                            "the crop of height {} and width {} is larger than the image it receives, of height {} and width {}",
                            crop.height, crop.width, size.0, size.1
                        ),
                    ));
                } else {
                    size = (crop.height, crop.width);
                }
            }
        }
        let ops: Vec<Op> = config.ops.iter().map(resolve).collect();

        let main_output = config.output.clone().unwrap_or_else(|| config.column.clone());
        let mut columns = vec![ImageColumn {
            input: config.column.clone(),
            output: main_output,
            layout: config.layout,
            element: tensor.element,
            channels,
            height,
            width,
            output_tensor: TensorType::new(tensor.element, image_shape(config.layout, channels, size.0, size.1)),
            settings: ColumnSettings {
                interpolation: None,
                fill_value: None,
                color: true,
                unit: unit_scale(tensor.element),
            },
        }];
        let mut inputs = HashSet::from([config.column.clone()]);
        for (index, paired) in config.paired.iter().enumerate() {
            let key = format!("paired[{index}].column");
            if !inputs.insert(paired.column.clone()) {
                problems.push(context.problem(
                    &key,
                    format!("column {:?} is already augmented by this stage; list each column once", paired.column),
                ));
                continue;
            }
            match plan_paired(paired, &key, &columns[0], size, context) {
                Ok(column) => columns.push(column),
                Err(problem) => problems.push(problem),
            }
        }

        // Output names are compared only once every column is planned, so
        // that a problem's `paired[i]` index is the configured one.
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut outputs = HashSet::new();
        for (index, column) in columns.iter().enumerate() {
            let key = if index == 0 { String::from("output") } else { format!("paired[{}].output", index - 1) };
            if !outputs.insert(column.output.clone()) {
                problems.push(context.problem(
                    &key,
                    format!(
                        "two augmented columns would both be written to {:?}; give each its own `output`",
                        column.output
                    ),
                ));
            }
            if column.output == context.key_column {
                problems.push(context.problem(
                    &key,
                    format!("{:?} is the record key column; choose another `output` name", column.output),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let mut schema = context.input.clone();
        for column in &columns {
            schema = schema_with(&schema, column.output_tensor.field(&column.output));
        }
        let stage = Self {
            rng: StageRng::new(context.seed, &name),
            name,
            ops,
            columns,
            key_column: context.key_column.to_string(),
            schema: schema.clone(),
            workers: context.workers,
        };
        Ok((Box::new(stage), schema))
    }

    /// Augments one record's images, main column first, with the draws of
    /// its stream.
    fn augment_record(&self, mut images: Vec<Planes>, key: &[u8], sample: u32) -> Vec<Planes> {
        let mut rng = self.rng.stream(key, sample);
        for op in &self.ops {
            let draw = op.draw(&mut rng, images[0].height, images[0].width);
            images = images
                .into_iter()
                .zip(&self.columns)
                .map(|(image, column)| ops::apply(op, draw, image, &column.settings))
                .collect();
        }
        images
    }
}

/// Plans one paired column, which must be an image of the main column's
/// height and width. `size` is the (height, width) after every crop.
fn plan_paired(
    paired: &PairedConfig,
    key: &str,
    main: &ImageColumn,
    size: (usize, usize),
    context: &PlanContext,
) -> Result<ImageColumn, ConfigProblem> {
    let tensor = context.tensor_column(key, &paired.column)?;
    let layout = paired.layout.unwrap_or(main.layout);
    let (channels, height, width) = image_dims(&tensor.shape, layout)
        .map_err(|message| context.problem(key, format!("column {:?} {message}", paired.column)))?;
    if (height, width) != (main.height, main.width) {
        return Err(context.problem(
            key,
            format!(
                "column {:?} has height {height} and width {width}, but column {:?} has height {} and width {}; paired columns must match the main column's size",
                paired.column, main.input, main.height, main.width
            ),
        ));
    }
    let unit = unit_scale(tensor.element);
    Ok(ImageColumn {
        input: paired.column.clone(),
        output: paired.output.clone().unwrap_or_else(|| paired.column.clone()),
        layout,
        element: tensor.element,
        channels,
        height,
        width,
        output_tensor: TensorType::new(tensor.element, image_shape(layout, channels, size.0, size.1)),
        settings: ColumnSettings {
            interpolation: Some(paired.interpolation),
            fill_value: paired.fill_value.map(|v| v as f32 * unit),
            color: paired.color,
            unit,
        },
    })
}

/// Reads a tensor column as float32 values in the data's own units.
fn read_values(column: &ArrayRef, element: ElementType) -> Result<Vec<f32>, arrow::error::ArrowError> {
    Ok(match element {
        ElementType::Float32 => tensor::f32_values(column)?.to_vec(),
        ElementType::UInt8 => tensor::u8_values(column)?.iter().map(|&v| f32::from(v)).collect(),
        ElementType::UInt16 => tensor::u16_values(column)?.iter().map(|&v| f32::from(v)).collect(),
    })
}

/// Builds a column of `tensor`'s element type. Integers are rounded half
/// away from zero and saturate at the type's range; float32 is kept as is.
fn build_values(tensor: &TensorType, values: Vec<f32>) -> Result<ArrayRef, arrow::error::ArrowError> {
    match tensor.element {
        ElementType::Float32 => tensor::build_f32(tensor, values),
        // `as` saturates, and maps NaN to 0.
        ElementType::UInt8 => tensor::build_u8(tensor, values.iter().map(|v| v.round() as u8).collect()),
        ElementType::UInt16 => tensor::build_u16(tensor, values.iter().map(|v| v.round() as u16).collect()),
    }
}

impl Stage for Augment {
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
        let error = |err: arrow::error::ArrowError| StageError { stage: self.name.clone(), message: err.to_string() };
        let data = &batch.data;
        let keys = Keys::new(data, &self.key_column).expect("the key column is checked when planning");
        let samples = sample_indices(data);
        let mut inputs = Vec::with_capacity(self.columns.len());
        for column in &self.columns {
            let array = data.column_by_name(&column.input).expect("the planned column exists");
            inputs.push(read_values(array, column.element).map_err(error)?);
        }
        let rows = data.num_rows();
        let mut outputs: Vec<Vec<f32>> =
            self.columns.iter().map(|c| Vec::with_capacity(rows * c.output_tensor.len())).collect();

        for row in 0..rows {
            let images = self
                .columns
                .iter()
                .zip(&inputs)
                .map(|(column, values)| {
                    let len = column.channels * column.height * column.width;
                    let values = &values[row * len..(row + 1) * len];
                    Planes::from_row(values, column.layout, column.channels, column.height, column.width)
                })
                .collect();
            let augmented = keys.with_bytes(row, |key| self.augment_record(images, key, samples[row]));
            for ((image, column), out) in augmented.iter().zip(&self.columns).zip(&mut outputs) {
                image.write_row(column.layout, out);
            }
        }

        let mut built = Vec::with_capacity(self.columns.len());
        for (column, values) in self.columns.iter().zip(outputs) {
            built.push((column.output.as_str(), build_values(&column.output_tensor, values).map_err(error)?));
        }
        let columns = self
            .schema
            .fields()
            .iter()
            .map(|field| match built.iter().find(|(name, _)| *name == field.name()) {
                Some((_, column)) => column.clone(),
                None => data.column_by_name(field.name()).expect("the planned schema matches the batch").clone(),
            })
            .collect();
        batch.data = RecordBatch::try_new(self.schema.clone(), columns).map_err(error)?;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_dims_follow_layout() {
        assert_eq!(image_dims(&[3, 4, 5], Layout::Chw), Ok((3, 4, 5)));
        assert_eq!(image_dims(&[4, 5, 3], Layout::Hwc), Ok((3, 4, 5)));
        assert!(image_dims(&[5, 4, 3], Layout::Chw).is_err(), "5 channels");
        assert!(image_dims(&[64], Layout::Chw).is_err(), "a vector");
        assert!(image_dims(&[1, 0, 5], Layout::Chw).is_err(), "empty");
    }

    #[test]
    fn integers_round_and_saturate() {
        let tensor = TensorType::new(ElementType::UInt8, vec![1, 1, 4]);
        let column = build_values(&tensor, vec![-3.0, 1.5, 254.4, 300.0]).unwrap();
        assert_eq!(tensor::u8_values(&column).unwrap(), &[0, 2, 254, 255]);
    }
}
