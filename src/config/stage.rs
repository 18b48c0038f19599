//! Stage sections of the pipeline file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use super::noise::AddNoiseConfig;
pub use super::repeat::RepeatConfig;
use super::sampling::{AggregateConfig, SampleConfig};

/// One step between the source and the sink.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StageConfig {
    /// Decode images and turn them into model-ready tensors.
    Preprocess(PreprocessConfig),
    /// Repeat each record as several samples.
    Repeat(RepeatConfig),
    /// Add random noise to a tensor column.
    AddNoise(AddNoiseConfig),
    /// Run an ONNX model.
    Infer(InferConfig),
    /// Draw samples from a model's output distribution.
    Sample(SampleConfig),
    /// Randomly flip, rotate, zoom, shift, crop or recolor image tensors.
    Augment(super::AugmentConfig),
    /// Summarize the samples of each record in one row.
    Aggregate(AggregateConfig),
}

impl StageConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            StageConfig::Preprocess(_) => "preprocess",
            StageConfig::Repeat(_) => "repeat",
            StageConfig::AddNoise(_) => "add_noise",
            StageConfig::Infer(_) => "infer",
            StageConfig::Sample(_) => "sample",
            StageConfig::Augment(_) => "augment",
            StageConfig::Aggregate(_) => "aggregate",
        }
    }

    /// Returns the stage's name: the configured one, else its kind.
    pub fn name(&self) -> &str {
        let configured = match self {
            StageConfig::Preprocess(c) => &c.name,
            StageConfig::Repeat(c) => &c.name,
            StageConfig::AddNoise(c) => &c.name,
            StageConfig::Infer(c) => &c.name,
            StageConfig::Sample(c) => &c.name,
            StageConfig::Augment(c) => &c.name,
            StageConfig::Aggregate(c) => &c.name,
        };
        configured.as_deref().unwrap_or(self.kind())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// Column of encoded image bytes.
    #[serde(default = "default_image_column")]
    pub column: String,
    /// Column the tensor goes to; replaces `column` when absent.
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub color: ColorOrder,
    #[serde(default)]
    pub resize: Option<ResizeConfig>,
    #[serde(default)]
    pub center_crop: Option<CropConfig>,
    /// Per-channel mean, in the [0, 1] pixel scale, subtracted before dividing by `std`.
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation, in the [0, 1] pixel scale.
    #[serde(default)]
    pub std: Option<Vec<f32>>,
    #[serde(default)]
    pub layout: Layout,
    #[serde(default)]
    pub dtype: TensorDtype,
}

fn default_image_column() -> String {
    String::from("image")
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ColorOrder {
    #[default]
    Rgb,
    Bgr,
    Gray,
    Rgba,
}

impl ColorOrder {
    /// Returns the name used in pipeline files.
    pub fn name(self) -> &'static str {
        match self {
            ColorOrder::Rgb => "rgb",
            ColorOrder::Bgr => "bgr",
            ColorOrder::Gray => "gray",
            ColorOrder::Rgba => "rgba",
        }
    }

    pub fn channels(self) -> usize {
        match self {
            ColorOrder::Rgb | ColorOrder::Bgr => 3,
            ColorOrder::Gray => 1,
            ColorOrder::Rgba => 4,
        }
    }
}

/// Resize to an exact size, or scale so the shorter side has a given length.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeConfig {
    #[serde(default, deserialize_with = "super::count::optional_count")]
    pub width: Option<u32>,
    #[serde(default, deserialize_with = "super::count::optional_count")]
    pub height: Option<u32>,
    #[serde(default)]
    pub shorter_side: Option<u32>,
    #[serde(default)]
    pub filter: ResizeFilter,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    Nearest,
    #[default]
    Bilinear,
    Bicubic,
    Lanczos3,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CropConfig {
    #[serde(deserialize_with = "super::count::count")]
    pub width: u32,
    #[serde(deserialize_with = "super::count::count")]
    pub height: u32,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    #[default]
    Chw,
    Hwc,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TensorDtype {
    #[default]
    Float32,
    Uint8,
    Uint16,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InferConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub model: PathBuf,
    /// Model input name to the column that feeds it.
    pub inputs: BTreeMap<String, String>,
    /// Model inputs fed the same constant tensor on every run.
    #[serde(default)]
    pub constants: BTreeMap<String, ConstantConfig>,
    /// Model output name to the column it is written to; every output under
    /// its own name when absent.
    #[serde(default)]
    pub outputs: Option<BTreeMap<String, String>>,
    /// Records per model run.
    #[serde(default = "default_infer_batch", deserialize_with = "super::count::count")]
    pub batch_size: usize,
    /// Intra-op threads per session; 0 lets ONNX Runtime choose. By default,
    /// the cores divided among the sessions.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Sessions that run batches in parallel. By default, the number of
    /// cores, at most 4.
    #[serde(default, deserialize_with = "super::count::optional_count")]
    pub sessions: Option<usize>,
    /// Keeps the model's Dropout nodes active, with masks drawn by the stage.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mc_dropout: bool,
    /// Dropout added at tensors of the model: tensor name to ratio.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inject_dropout: BTreeMap<String, f32>,
    /// Gaussian noise on the model's weights: each sample index runs its own
    /// perturbed copy of the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_noise: Option<WeightNoiseConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeightNoiseConfig {
    /// Standard deviation of the noise added to each weight.
    pub std: f32,
    /// Whether `std` is relative to each initializer's root mean square.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relative: bool,
    /// The initializers that get noise; by default every float32
    /// initializer with more than one value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializers: Option<Vec<String>>,
}

/// Maximum sessions a stage opens by default, because each session keeps
/// its own copy of the model's weights.
const MAX_DEFAULT_SESSIONS: usize = 4;

impl InferConfig {
    /// Returns the session count and the intra-op threads per session. By
    /// default there is one session per core, up to 4, and the cores are
    /// shared among them. On the benchmark models, single-threaded sessions
    /// side by side spent less time waking and synchronizing ONNX Runtime's
    /// thread pool than one session with many threads.
    pub fn parallelism(&self) -> (usize, usize) {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let sessions = self.sessions.unwrap_or_else(|| cores.clamp(1, MAX_DEFAULT_SESSIONS));
        let threads = self.threads.unwrap_or_else(|| (cores / sessions.max(1)).max(1));
        (sessions, threads)
    }
}

fn default_infer_batch() -> usize {
    64
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConstantConfig {
    pub values: Vec<f64>,
    /// Shape of the tensor; a one-dimensional tensor of the values when absent.
    #[serde(default)]
    pub shape: Option<Vec<usize>>,
    #[serde(default)]
    pub dtype: ConstantType,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConstantType {
    #[default]
    Float32,
    Int64,
    Bool,
}
