//! Source sections of the pipeline file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The source of records.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    /// PNG and JPEG files from a directory or a glob pattern.
    Images(ImagesSourceConfig),
    /// Rows of an Arrow IPC file.
    ArrowFile(ArrowFileSourceConfig),
    /// Rows of a `.npy` array: one record per index of the first axis.
    Npy(NpySourceConfig),
    /// Records drawn from a prior: the input of a generator pipeline.
    Latent(super::LatentSourceConfig),
    /// Files that arrive in a directory (daemon only).
    Watch(WatchSourceConfig),
    /// Arrow IPC streams sent to a loopback TCP port or a Unix socket
    /// (daemon only).
    Socket(SocketSourceConfig),
    /// Messages of a NATS JetStream stream, each an Arrow IPC stream, read
    /// through a durable consumer that several daemons share (daemon only).
    Nats(NatsSourceConfig),
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Images(_) => "images",
            SourceConfig::ArrowFile(_) => "arrow_file",
            SourceConfig::Npy(_) => "npy",
            SourceConfig::Latent(_) => "latent",
            SourceConfig::Watch(_) => "watch",
            SourceConfig::Socket(_) => "socket",
            SourceConfig::Nats(_) => "nats",
        }
    }

    pub fn batch_size(&self) -> usize {
        match self {
            SourceConfig::Images(c) => c.batch_size,
            SourceConfig::ArrowFile(c) => c.batch_size,
            SourceConfig::Npy(c) => c.batch_size,
            SourceConfig::Latent(c) => c.batch_size,
            SourceConfig::Watch(c) => c.read.batch_size(),
            SourceConfig::Socket(_) | SourceConfig::Nats(_) => 1,
        }
    }

    /// Returns whether the source never ends, so only `stochflow daemon` can run it.
    pub fn is_endless(&self) -> bool {
        matches!(self, SourceConfig::Watch(_) | SourceConfig::Socket(_) | SourceConfig::Nats(_))
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSourceConfig {
    /// The watched directory.
    pub path: PathBuf,
    /// The source that reads each file: an `arrow_file`, `npy` or `images` source
    /// whose `path` is a file name pattern, such as `"*.arrow"`.
    pub read: Box<SourceConfig>,
    /// A file counts as complete once its size and modification time have
    /// not changed for this long. Writers that create files under a hidden or
    /// `.partial` name and rename them in can set 0.
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
    /// Interval between two scans of the directory.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

fn default_settle_ms() -> u64 {
    1000
}

fn default_poll_ms() -> u64 {
    200
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SocketSourceConfig {
    /// `127.0.0.1:PORT` (a loopback TCP address) or `unix:PATH`.
    pub listen: String,
    /// Column that contains the record key (integer or string). When absent,
    /// the key is `STREAM:OFFSET`, the stream name and the record's position.
    #[serde(default)]
    pub id_column: Option<String>,
    /// Columns to read, in this order; all columns when absent.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Columns to read as tensors, with their per-row shape, as in `arrow_file`.
    #[serde(default)]
    pub tensors: std::collections::BTreeMap<String, TensorShapeConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    /// The NATS server, such as `nats://127.0.0.1:4222`.
    pub url: String,
    /// The JetStream stream that contains the input messages. It is created,
    /// capturing `subject`, when it does not exist.
    pub stream: String,
    /// The subject the input messages are published to.
    pub subject: String,
    /// The durable pull consumer that the daemons share; created when it
    /// does not exist.
    #[serde(default = "default_consumer")]
    pub consumer: String,
    /// How long the server waits for a message's acknowledgement before it
    /// hands the message to another daemon, when the consumer is created.
    #[serde(default = "default_ack_wait_ms")]
    pub ack_wait_ms: u64,
    /// The start of a consumer the daemon creates: the first message in the
    /// stream, or the first one published after the consumer's creation.
    #[serde(default)]
    pub deliver: NatsDeliver,
    /// Messages fetched from the server at a time.
    #[serde(default = "default_fetch", deserialize_with = "super::count::count")]
    pub fetch: usize,
    /// Column that contains the record key (integer or string). When absent,
    /// the key is `STREAM:SEQUENCE:ROW`.
    #[serde(default)]
    pub id_column: Option<String>,
    /// Columns to read, in this order; all columns when absent.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Columns to read as tensors, with their per-row shape, as in `arrow_file`.
    #[serde(default)]
    pub tensors: std::collections::BTreeMap<String, TensorShapeConfig>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NatsDeliver {
    #[default]
    All,
    New,
}

fn default_consumer() -> String {
    String::from("stochflow")
}

fn default_ack_wait_ms() -> u64 {
    60_000
}

fn default_fetch() -> usize {
    8
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesSourceConfig {
    /// A directory (its `.png`, `.jpg` and `.jpeg` files) or a glob pattern.
    pub path: PathBuf,
    /// Descend into subdirectories when `path` is a directory.
    #[serde(default)]
    pub recursive: bool,
    /// Record key: the file path relative to the directory, or the ordinal.
    #[serde(default)]
    pub key: ImagesKey,
    /// Name of the column that contains each file's encoded bytes.
    #[serde(default = "default_image_column")]
    pub column: String,
    /// Records per batch that the source emits.
    #[serde(default = "default_image_batch", deserialize_with = "super::count::count")]
    pub batch_size: usize,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ImagesKey {
    #[default]
    Path,
    Ordinal,
}

fn default_image_column() -> String {
    String::from("image")
}

fn default_image_batch() -> usize {
    16
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArrowFileSourceConfig {
    pub path: PathBuf,
    /// Column that contains the record key (integer or string). The row
    /// ordinal is the key when absent.
    #[serde(default)]
    pub id_column: Option<String>,
    /// Columns to read, in this order; all columns when absent.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Columns to read as tensors, with their per-row shape. A column of
    /// variable-length lists becomes a tensor column here, and a row whose
    /// length does not match the shape is rejected.
    #[serde(default)]
    pub tensors: std::collections::BTreeMap<String, TensorShapeConfig>,
    #[serde(default = "default_table_batch", deserialize_with = "super::count::count")]
    pub batch_size: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TensorShapeConfig {
    pub shape: Vec<usize>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NpySourceConfig {
    pub path: PathBuf,
    /// Name of the tensor column the rows go to.
    #[serde(default = "default_npy_column")]
    pub column: String,
    #[serde(default = "default_table_batch", deserialize_with = "super::count::count")]
    pub batch_size: usize,
}

fn default_npy_column() -> String {
    String::from("tensor")
}

fn default_table_batch() -> usize {
    256
}
