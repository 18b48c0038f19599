//! PNG files from a tensor column, one per row, beside the Arrow file.
//!
//! Each row's tensor (`[C, H, W]`, `[H, W, C]` or `[H, W]`, with 1, 3 or 4
//! channels: gray, RGB, RGBA) is mapped from `range` to the PNG's levels,
//! clipped, rounded to nearest, and written to `<key>.png`, or
//! `<key>_s<sample>.png` after a fan-out. Keys are percent-encoded, so a key
//! that is a file path gives one file name in the folder, and two different
//! keys never give the same name.
//!
//! Each file is written under a temporary name, synced and renamed, so a
//! reader never sees a torn PNG. The encoder writes no time or other
//! varying chunk, so the same tensor gives the same bytes. A run that fails
//! keeps the PNGs it finished; a later run overwrites files of the same name
//! and leaves others in place.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use image::ImageEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};

use super::SinkError;
use crate::batch::{Keys, SAMPLE_COLUMN, sample_indices};
use crate::config::{ConfigProblem, ImageSinkConfig, Layout};
use crate::tensor::{self, ElementType, TensorType};

pub struct ImageSink {
    folder: PathBuf,
    column: String,
    key_column: String,
    element: ElementType,
    layout: Layout,
    channels: usize,
    height: usize,
    width: usize,
    sixteen_bits: bool,
    low: f64,
    high: f64,
    /// File names written so far, to catch two rows with the same name.
    written: HashSet<String>,
}

impl ImageSink {
    /// Plans the image output against the schema that reaches the sink.
    /// Creates nothing; [`ImageSink::create_folder`] does.
    pub fn plan(config: &ImageSinkConfig, schema: &SchemaRef, key_column: &str) -> Result<Self, ConfigProblem> {
        let problem = |message: String| ConfigProblem::new("sink.images.column", message);
        let name = &config.column;
        let field = schema.field_with_name(name).map_err(|_| {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            problem(format!("column {name:?} does not reach the sink; available columns: {}", names.join(", ")))
        })?;
        let tensor = TensorType::of_field(field).ok_or_else(|| {
            problem(format!(
                "column {name:?} has type {}, not a float32, uint8 or uint16 tensor, so it cannot be written as images",
                field.data_type()
            ))
        })?;
        let (channels, height, width) = match (tensor.shape.as_slice(), config.layout) {
            (&[h, w], _) => (1, h, w),
            (&[c, h, w], Layout::Chw) => (c, h, w),
            (&[h, w, c], Layout::Hwc) => (c, h, w),
            (shape, _) => {
                return Err(problem(format!(
                    "column {name:?} has per-row shape {shape:?}; an image needs [height, width] or 3 dimensions in the `layout`"
                )));
            }
        };
        if ![1, 3, 4].contains(&channels) {
            let layout = if config.layout == Layout::Chw { "chw" } else { "hwc" };
            return Err(problem(format!(
                "column {name:?} of shape {:?} has {channels} channels in layout {layout}; PNG files take 1 (gray), 3 (RGB) or 4 (RGBA); check `sink.images.layout`",
                tensor.shape
            )));
        }
        if u32::try_from(height.max(width)).is_err() {
            return Err(problem(format!("column {name:?} has shape {:?}, too large for a PNG", tensor.shape)));
        }
        let [low, high] = config.range.unwrap_or(match tensor.element {
            ElementType::Float32 => [0.0, 1.0],
            ElementType::UInt8 => [0.0, 255.0],
            ElementType::UInt16 => [0.0, 65535.0],
        });
        Ok(Self {
            folder: config.path.clone(),
            column: name.clone(),
            key_column: key_column.to_string(),
            element: tensor.element,
            layout: config.layout,
            channels,
            height,
            width,
            sixteen_bits: config.bit_depth == 16,
            low,
            high,
            written: HashSet::new(),
        })
    }

    /// Creates the output folder.
    pub fn create_folder(&self) -> Result<(), SinkError> {
        std::fs::create_dir_all(&self.folder).map_err(|source| SinkError::Io { path: self.folder.clone(), source })
    }

    /// Writes one PNG file per row of `batch`.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let column = batch.column_by_name(&self.column).expect("the planned column reaches the sink");
        let values: Vec<f64> = match self.element {
            ElementType::Float32 => tensor::f32_values(column).map(|v| v.iter().map(|&x| f64::from(x)).collect()),
            ElementType::UInt8 => tensor::u8_values(column).map(|v| v.iter().map(|&x| f64::from(x)).collect()),
            ElementType::UInt16 => tensor::u16_values(column).map(|v| v.iter().map(|&x| f64::from(x)).collect()),
        }
        .map_err(|err| SinkError::Image { path: self.folder.clone(), message: err.to_string() })?;
        let keys = Keys::new(batch, &self.key_column).expect("the key column is checked when planning");
        let samples = batch.column_by_name(SAMPLE_COLUMN).is_some().then(|| sample_indices(batch));
        let row_len = self.channels * self.height * self.width;
        for (row, pixels) in values.chunks_exact(row_len).enumerate() {
            let key = keys.get(row);
            let name = file_name(&key, samples.as_ref().map(|s| s[row]));
            if !self.written.insert(name.clone()) {
                return Err(SinkError::Image {
                    path: self.folder.join(&name),
                    message: format!(
                        "record key {key:?} names a file this run already wrote; record keys must be unique to write images"
                    ),
                });
            }
            self.write_png(&self.folder.join(name), pixels)?;
        }
        Ok(())
    }

    /// Syncs the folder, so the renames of its files are durable.
    pub fn finish(&self) -> Result<(), SinkError> {
        File::open(&self.folder)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| SinkError::Io { path: self.folder.clone(), source })
    }

    /// Encodes one row and writes it under a temporary name, then renames it.
    fn write_png(&self, path: &Path, pixels: &[f64]) -> Result<(), SinkError> {
        let max = if self.sixteen_bits { f64::from(u16::MAX) } else { f64::from(u8::MAX) };
        let levels = interleave(pixels, self.layout, self.channels, self.height * self.width)
            .map(|value| level(value, self.low, self.high, max));
        let bytes: Vec<u8> = if self.sixteen_bits {
            // The encoder takes 16-bit samples in native byte order.
            levels.flat_map(|l| l.to_ne_bytes()).collect()
        } else {
            levels.map(|l| l as u8).collect()
        };
        let color = match (self.channels, self.sixteen_bits) {
            (1, false) => image::ExtendedColorType::L8,
            (3, false) => image::ExtendedColorType::Rgb8,
            (4, false) => image::ExtendedColorType::Rgba8,
            (1, true) => image::ExtendedColorType::L16,
            (3, true) => image::ExtendedColorType::Rgb16,
            (4, true) => image::ExtendedColorType::Rgba16,
            (other, _) => unreachable!("{other} channels are rejected when planning"),
        };

        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let io_error = |source| SinkError::Io { path: path.to_path_buf(), source };
        let mut file = BufWriter::new(File::create(&partial).map_err(io_error)?);
        let encoded = PngEncoder::new_with_quality(&mut file, CompressionType::Default, FilterType::Adaptive)
            .write_image(&bytes, self.width as u32, self.height as u32, color)
            .map_err(|err| SinkError::Image { path: path.to_path_buf(), message: err.to_string() });
        let result = encoded.and_then(|()| {
            file.flush().map_err(io_error)?;
            file.get_ref().sync_all().map_err(io_error)?;
            std::fs::rename(&partial, path).map_err(io_error)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }
}

/// Yields a row's values in the PNG's order: pixel by pixel, channels
/// interleaved.
fn interleave(pixels: &[f64], layout: Layout, channels: usize, area: usize) -> impl Iterator<Item = f64> + '_ {
    (0..area * channels).map(move |i| {
        let (pixel, channel) = (i / channels, i % channels);
        match layout {
            Layout::Chw => pixels[channel * area + pixel],
            Layout::Hwc => pixels[i],
        }
    })
}

/// Maps a value from `[low, high]` to a level in `[0, max]`, clipping
/// outside values and rounding to nearest. NaN maps to 0.
fn level(value: f64, low: f64, high: f64, max: f64) -> u16 {
    if value.is_nan() {
        return 0;
    }
    (((value - low) / (high - low)).clamp(0.0, 1.0) * max).round() as u16
}

/// Returns the file name of a row: its key, percent-encoded except for ASCII
/// letters, digits, `-` and `_`, then `_s<sample>` after a fan-out.
/// Encoding `.` and `/` keeps every name inside the folder and not hidden.
fn file_name(key: &str, sample: Option<u32>) -> String {
    let mut name = String::with_capacity(key.len() + 8);
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            name.push(byte as char);
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    if let Some(sample) = sample {
        name.push_str(&format!("_s{sample}"));
    }
    name.push_str(".png");
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_from_keys_and_samples() {
        assert_eq!(file_name("12", None), "12.png");
        assert_eq!(file_name("12", Some(3)), "12_s3.png");
        assert_eq!(file_name("cats/tabby 1.jpg", None), "cats%2Ftabby%201%2Ejpg.png");
        assert_eq!(file_name("..", None), "%2E%2E.png");
        assert_eq!(file_name("a%2F", None), "a%252F.png");
    }

    #[test]
    fn levels_map_range_clip_and_round() {
        assert_eq!(level(0.0, 0.0, 1.0, 255.0), 0);
        assert_eq!(level(1.0, 0.0, 1.0, 255.0), 255);
        assert_eq!(level(0.5, 0.0, 1.0, 255.0), 128);
        assert_eq!(level(-3.0, 0.0, 1.0, 255.0), 0);
        assert_eq!(level(7.0, 0.0, 1.0, 65535.0), 65535);
        assert_eq!(level(0.0, -1.0, 1.0, 65535.0), 32768);
        assert_eq!(level(f64::NAN, 0.0, 1.0, 255.0), 0);
    }

    #[test]
    fn chw_rows_are_interleaved() {
        // Two pixels, three channels: planes [r0 r1] [g0 g1] [b0 b1].
        let planes = [1.0, 2.0, 10.0, 20.0, 100.0, 200.0];
        let pixels: Vec<f64> = interleave(&planes, Layout::Chw, 3, 2).collect();
        assert_eq!(pixels, [1.0, 10.0, 100.0, 2.0, 20.0, 200.0]);
        let same: Vec<f64> = interleave(&pixels, Layout::Hwc, 3, 2).collect();
        assert_eq!(same, pixels);
    }
}
