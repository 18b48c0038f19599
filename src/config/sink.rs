//! Sink sections of the pipeline file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The destination of results.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    /// One Arrow IPC file.
    ArrowFile(ArrowFileSinkConfig),
    /// One message per input message on a NATS JetStream subject (daemon
    /// with a `nats` source only).
    Nats(NatsSinkConfig),
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::ArrowFile(_) => "arrow_file",
            SinkConfig::Nats(_) => "nats",
        }
    }

    /// Returns the Arrow file sink's settings, if that is the sink.
    pub fn arrow_file(&self) -> Option<&ArrowFileSinkConfig> {
        match self {
            SinkConfig::ArrowFile(c) => Some(c),
            SinkConfig::Nats(_) => None,
        }
    }

    /// Columns to write, in this order; every column when absent.
    pub fn columns(&self) -> Option<&[String]> {
        match self {
            SinkConfig::ArrowFile(c) => c.columns.as_deref(),
            SinkConfig::Nats(c) => c.columns.as_deref(),
        }
    }

    pub fn compression(&self) -> (Compression, Option<i32>) {
        match self {
            SinkConfig::ArrowFile(c) => (c.compression, c.compression_level),
            SinkConfig::Nats(c) => (c.compression, c.compression_level),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSinkConfig {
    /// The NATS server, such as `nats://127.0.0.1:4222`.
    pub url: String,
    /// The JetStream stream that stores the output; created, capturing
    /// `subject` and `dead_letter_subject`, when it does not exist.
    pub stream: String,
    /// The subject of the output messages.
    pub subject: String,
    /// The subject of the dead-letter messages; `SUBJECT.dead` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_subject: Option<String>,
    #[serde(default)]
    pub compression: Compression,
    /// The zstd level; zstd's default level when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<i32>,
    /// Columns to write, in this order; every column when absent.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
}

impl NatsSinkConfig {
    pub fn dead_letter_subject(&self) -> String {
        self.dead_letter_subject.clone().unwrap_or_else(|| format!("{}.dead", self.subject))
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArrowFileSinkConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub compression: Compression,
    /// The zstd level; zstd's default level when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<i32>,
    /// Columns to write, in this order; every column when absent.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Rows per record batch in the file. The file's batches depend on this
    /// alone, never on the pipeline's internal batch sizes.
    #[serde(default = "default_rows_per_batch", deserialize_with = "super::count::count")]
    pub rows_per_batch: usize,
    /// Also writes a tensor column as PNG files, one per row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<super::ImageSinkConfig>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// The zstd level that Arrow's IPC writer uses when none is given.
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;

fn default_rows_per_batch() -> usize {
    4096
}
