//! The `preprocess` stage: decode images into model-ready tensors.
//!
//! Decoding convention: PNG and JPEG files of any supported kind decode to
//! float32 values in [0, 1], after the EXIF orientation is applied. The
//! kinds are grayscale, grayscale with alpha, RGB and RGBA, with 8 or 16 bits
//! per channel, and each integer value is divided by 255 or 65535. `color` then picks the channels:
//! `rgb` and `bgr` drop alpha and repeat gray, `gray` takes Rec. 709 luma,
//! `rgba` adds an opaque alpha where there is none. Resizing works on these
//! float values; normalization computes (value - mean) / std per channel.
//!
//! A file that does not decode, or an image smaller than the center crop,
//! is rejected with its key; the run goes on.

use std::io::Cursor;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, SchemaRef};
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageReader, Pixel};

use super::{PlanContext, Planned, Stage, StageError, reject_rows, schema_with, with_column};
use crate::batch::Batch;
use crate::config::{ColorOrder, ConfigProblem, Layout, PreprocessConfig, ResizeFilter, TensorDtype};
use crate::tensor::{self, ElementType, TensorType};

pub struct Preprocess {
    name: String,
    config: PreprocessConfig,
    output: String,
    tensor: TensorType,
    width: u32,
    height: u32,
    key_column: String,
    schema: SchemaRef,
    workers: usize,
}

impl Preprocess {
    pub fn plan(config: &PreprocessConfig, context: &PlanContext) -> Result<Planned, Vec<ConfigProblem>> {
        let name = config.name.clone().unwrap_or_else(|| String::from("preprocess"));
        let field = context.input.field_with_name(&config.column).map_err(|_| {
            vec![context.problem(
                "column",
                format!(
                    "column {:?} does not exist here; available columns: {}",
                    config.column,
                    context.column_names()
                ),
            )]
        })?;
        if !matches!(field.data_type(), DataType::Binary | DataType::LargeBinary) {
            return Err(vec![context.problem(
                "column",
                format!(
                    "column {:?} has type {}, not encoded image bytes; use the images source",
                    config.column,
                    field.data_type()
                ),
            )]);
        }

        // Every output tensor has one shape, so the final size must not
        // depend on the input image.
        let size = match (&config.center_crop, &config.resize) {
            (Some(crop), _) => (crop.width, crop.height),
            (None, Some(resize)) if resize.width.is_some() && resize.height.is_some() => {
                (resize.width.unwrap_or_default(), resize.height.unwrap_or_default())
            }
            _ => {
                return Err(vec![context.problem(
                    "resize",
                    "images differ in size; set `resize` with `width` and `height`, or a `center_crop`, so every tensor has one shape",
                )]);
            }
        };
        let channels = config.color.channels();
        let shape = match config.layout {
            Layout::Chw => vec![channels, size.1 as usize, size.0 as usize],
            Layout::Hwc => vec![size.1 as usize, size.0 as usize, channels],
        };
        let element = match config.dtype {
            TensorDtype::Float32 => ElementType::Float32,
            TensorDtype::Uint8 => ElementType::UInt8,
            TensorDtype::Uint16 => ElementType::UInt16,
        };
        let tensor = TensorType::new(element, shape);
        let output = config.output.clone().unwrap_or_else(|| config.column.clone());
        let schema = schema_with(context.input, tensor.field(&output));
        let stage = Self {
            name,
            config: config.clone(),
            output,
            tensor,
            width: size.0,
            height: size.1,
            key_column: context.key_column.to_string(),
            schema: schema.clone(),
            workers: context.workers,
        };
        Ok((Box::new(stage), schema))
    }

    /// Decodes and transforms one image into `out`, in the configured layout.
    fn convert(&self, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), String> {
        let image = decode(bytes)?;
        let channels = self.config.color.channels();
        let (pixels, width, height) = match self.config.color {
            ColorOrder::Gray => self.fit(image.to_luma32f())?,
            ColorOrder::Rgb | ColorOrder::Bgr => self.fit(image.to_rgb32f())?,
            ColorOrder::Rgba => self.fit(image.to_rgba32f())?,
        };
        debug_assert_eq!((width, height), (self.width, self.height));

        let plane = (width * height) as usize;
        let start = out.len();
        out.resize(start + plane * channels, 0.0);
        let target = &mut out[start..];
        for (index, pixel) in pixels.chunks_exact(channels).enumerate() {
            for (c, &value) in pixel.iter().enumerate() {
                let channel = if self.config.color == ColorOrder::Bgr { 2 - c } else { c };
                let value = match (&self.config.mean, &self.config.std) {
                    (Some(mean), Some(std)) => (value - mean[channel]) / std[channel],
                    _ => value,
                };
                let position = match self.config.layout {
                    Layout::Chw => channel * plane + index,
                    Layout::Hwc => index * channels + channel,
                };
                target[position] = value;
            }
        }
        Ok(())
    }

    /// Resizes and crops to the output size; returns interleaved pixels.
    fn fit<P>(&self, image: ImageBuffer<P, Vec<f32>>) -> Result<(Vec<f32>, u32, u32), String>
    where
        P: Pixel<Subpixel = f32> + 'static,
    {
        let filter = match self.config.resize.as_ref().map(|r| r.filter).unwrap_or_default() {
            ResizeFilter::Nearest => FilterType::Nearest,
            ResizeFilter::Bilinear => FilterType::Triangle,
            ResizeFilter::Bicubic => FilterType::CatmullRom,
            ResizeFilter::Lanczos3 => FilterType::Lanczos3,
        };
        let mut image = image;
        if let Some(resize) = &self.config.resize {
            let (w, h) = image.dimensions();
            let (new_w, new_h) = match (resize.width, resize.height, resize.shorter_side) {
                (Some(width), Some(height), _) => (width, height),
                (_, _, Some(side)) => {
                    let scale = f64::from(side) / f64::from(w.min(h));
                    ((f64::from(w) * scale).round().max(1.0) as u32, (f64::from(h) * scale).round().max(1.0) as u32)
                }
                _ => (w, h),
            };
            if (new_w, new_h) != (w, h) {
                image = imageops::resize(&image, new_w, new_h, filter);
            }
        }
        if let Some(crop) = &self.config.center_crop {
            let (w, h) = image.dimensions();
            if w < crop.width || h < crop.height {
                return Err(format!(
                    "the image is {w}x{h}, smaller than the {}x{} center crop; add a `resize`",
                    crop.width, crop.height
                ));
            }
            let x = (w - crop.width) / 2;
            let y = (h - crop.height) / 2;
            image = imageops::crop_imm(&image, x, y, crop.width, crop.height).to_image();
        }
        let (w, h) = image.dimensions();
        Ok((image.into_raw(), w, h))
    }
}

/// Decodes an image and applies its EXIF orientation.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage, String> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|err| err.to_string())?;
    match reader.format() {
        None => return Err(String::from("not a PNG or JPEG file")),
        Some(image::ImageFormat::Jpeg) if !jpeg_has_end(bytes) => {
            return Err(String::from("the JPEG file is truncated: no end-of-image marker after its last scan"));
        }
        Some(_) => {}
    }
    let mut decoder = reader.into_decoder().map_err(|err| format!("cannot decode image: {err}"))?;
    let orientation = decoder.orientation().map_err(|err| format!("cannot read EXIF orientation: {err}"))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|err| format!("cannot decode image: {err}"))?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Checks that a JPEG's last scan is followed by an end-of-image marker.
///
/// The JPEG decoder returns an image for a truncated scan instead of
/// failing, so truncation is checked here. Entropy-coded data never contains
/// a marker, because a 0xFF data byte is followed by 0x00 or a restart
/// marker. The last start-of-scan marker (FF DA) therefore belongs to the
/// main image, not to an EXIF
/// thumbnail, and a complete file has an FF D9 after it.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let Some(last_scan) = last_scan else {
        return false;
    };
    bytes[last_scan..].windows(2).any(|w| w == [0xFF, 0xD9])
}

impl Stage for Preprocess {
    fn name(&self) -> &str {
        &self.name
    }

    fn concurrency(&self) -> usize {
        self.workers
    }

    fn keeps_rows(&self) -> bool {
        true
    }

    fn process(&self, batch: Batch) -> Result<Batch, StageError> {
        let column = batch.data.column_by_name(&self.config.column).expect("the planned column exists").clone();
        let row_len = self.tensor.len();
        let mut values = Vec::with_capacity(column.len() * row_len);
        let mut problems = Vec::with_capacity(column.len());
        for row in 0..column.len() {
            let bytes = match column.data_type() {
                DataType::Binary => column.as_binary::<i32>().value(row),
                _ => column.as_binary::<i64>().value(row),
            };
            let start = values.len();
            match self.convert(bytes, &mut values) {
                Ok(()) => problems.push(None),
                Err(reason) => {
                    values.truncate(start);
                    values.resize(start + row_len, 0.0);
                    problems.push(Some(reason));
                }
            }
        }

        let error = |err: arrow::error::ArrowError| StageError { stage: self.name.clone(), message: err.to_string() };
        let tensor_column = match self.tensor.element {
            ElementType::Float32 => tensor::build_f32(&self.tensor, values),
            ElementType::UInt8 => tensor::build_u8(
                &self.tensor,
                values.iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect(),
            ),
            ElementType::UInt16 => tensor::build_u16(
                &self.tensor,
                values.iter().map(|v| (v * 65535.0).round().clamp(0.0, 65535.0) as u16).collect(),
            ),
        }
        .map_err(error)?;
        let mut batch = batch;
        batch.data = with_column(&batch.data, &self.schema, &self.output, tensor_column);
        Ok(reject_rows(batch, problems, &self.name, &self.key_column))
    }
}
