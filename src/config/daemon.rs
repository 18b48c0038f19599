//! The `daemon` section of the pipeline file.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// When an output file is committed and the next one started.
    #[serde(default)]
    pub rotate: RotateConfig,
    /// Maximum time, in milliseconds, that records wait for a full model
    /// batch before a smaller one runs.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// Address of the health and metrics HTTP server; `null` turns it off.
    #[serde(default = "default_http")]
    pub http: Option<String>,
    /// Milliseconds that a stop signal leaves for finishing the records in
    /// flight and committing them, before the daemon exits without them.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            rotate: RotateConfig::default(),
            max_delay_ms: default_max_delay_ms(),
            http: default_http(),
            drain_timeout_ms: default_drain_timeout_ms(),
        }
    }
}

/// Limits of one output file; the file is committed when any is reached.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RotateConfig {
    #[serde(default = "default_rotate_rows")]
    pub rows: u64,
    /// Arrow memory size of the file's rows, close to its uncompressed size.
    /// The rows of the open file are held in memory up to this size, so that
    /// a failed commit can be written again.
    #[serde(default = "default_rotate_bytes")]
    pub bytes: u64,
    /// Milliseconds since the file's first row.
    #[serde(default = "default_rotate_age_ms")]
    pub age_ms: u64,
}

impl Default for RotateConfig {
    fn default() -> Self {
        Self { rows: default_rotate_rows(), bytes: default_rotate_bytes(), age_ms: default_rotate_age_ms() }
    }
}

fn default_max_delay_ms() -> u64 {
    20
}

fn default_http() -> Option<String> {
    Some(String::from("127.0.0.1:9464"))
}

fn default_drain_timeout_ms() -> u64 {
    30_000
}

fn default_rotate_rows() -> u64 {
    100_000
}

fn default_rotate_bytes() -> u64 {
    64 << 20
}

fn default_rotate_age_ms() -> u64 {
    10_000
}
