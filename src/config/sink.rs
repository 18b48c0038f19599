//! Sink sections of the pipeline file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The destination of results.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    /// One Arrow IPC file.
    ArrowFile(ArrowFileSinkConfig),
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
