//! The pipeline file: its types, loading and validation.
//!
//! A pipeline file is YAML with a seed, one source, an ordered list of stages
//! and one sink. docs/pipeline.md documents every key. Unknown keys are
//! rejected so that a typo never silently falls back to a default.

mod augment;
mod check;
mod count;
mod daemon;
mod image_sink;
mod latent;
mod load;
mod locate;
mod nats;
mod noise;
mod parse;
mod repeat;
mod sampling;
mod sink;
mod source;
mod stage;

use serde::{Deserialize, Serialize};

pub use augment::{AugmentConfig, AugmentOp, FillMode, FlipMode, Interpolation, PairedConfig, RangeConfig, Resample};
pub use daemon::{DaemonConfig, RotateConfig};
pub use image_sink::ImageSinkConfig;
pub use latent::{
    ConditioningConfig, FRACTION_COLUMN, InterpolateConfig, InterpolationMethod, LatentSourceConfig, PATH_COLUMN,
    PriorConfig, PriorKind, STEP_COLUMN,
};
pub use load::{ConfigError, ConfigProblem, LoadedConfig, load};
pub use locate::Locator;
pub use nats::subjects_overlap;
pub use noise::{AddNoiseConfig, NoiseKind};
pub use repeat::RepeatConfig;
pub use sampling::{
    AggregateConfig, AggregateOp, Distribution, EntropyAggregate, MomentAggregate, SampleConfig, SampleFrom,
    VoteAggregate,
};
pub use sink::{ArrowFileSinkConfig, Compression, NatsSinkConfig, SinkConfig};
pub use source::{
    ArrowFileSourceConfig, ImagesKey, ImagesSourceConfig, NatsDeliver, NatsSourceConfig, NpySourceConfig,
    SocketSourceConfig, SourceConfig, TensorShapeConfig, WatchSourceConfig,
};
pub use stage::{
    ColorOrder, ConstantConfig, ConstantType, CropConfig, InferConfig, Layout, PreprocessConfig, ResizeConfig,
    ResizeFilter, StageConfig, TensorDtype, WeightNoiseConfig,
};

/// A whole pipeline file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Seed of every random draw in the pipeline.
    pub seed: u64,
    pub source: SourceConfig,
    #[serde(default)]
    pub stages: Vec<StageConfig>,
    pub sink: SinkConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Settings of `stochflow daemon`; `stochflow run` ignores them.
    #[serde(default)]
    pub daemon: DaemonConfig,
}

/// Settings that change speed and memory use but never the output.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Batches each CPU stage processes at once, on separate threads.
    #[serde(default = "default_workers", deserialize_with = "count::count")]
    pub workers: usize,
    /// Batches each channel between two tasks contains before the sender waits.
    #[serde(default = "default_channel_capacity", deserialize_with = "count::count")]
    pub channel_capacity: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { workers: default_workers(), channel_capacity: default_channel_capacity() }
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn default_channel_capacity() -> usize {
    4
}
