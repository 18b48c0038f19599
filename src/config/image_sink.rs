//! The `sink.images` section: a tensor column written as PNG files beside
//! the Arrow file, and the checks of this section that need no data.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::load::ConfigProblem;
use super::{Layout, SinkConfig};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSinkConfig {
    /// Tensor column holding one image per row.
    pub column: String,
    /// Folder the PNG files go to; created when missing.
    pub path: PathBuf,
    /// Order of the tensor's axes: channels first or last.
    #[serde(default)]
    pub layout: Layout,
    /// Bits per channel of the PNG files: 8 or 16.
    #[serde(default = "default_bit_depth")]
    pub bit_depth: u8,
    /// Values mapped to black and to full intensity; `[0, 1]` for float32
    /// tensors and the type's full range for integer tensors when absent.
    #[serde(default)]
    pub range: Option<[f64; 2]>,
}

fn default_bit_depth() -> u8 {
    8
}

/// Checks `sink.images`; no problems when the section is absent.
pub fn check(sink: &SinkConfig) -> Vec<ConfigProblem> {
    let Some(images) = sink.arrow_file().and_then(|sink| sink.images.as_ref()) else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    if images.bit_depth != 8 && images.bit_depth != 16 {
        problems
            .push(ConfigProblem::new("sink.images.bit_depth", format!("must be 8 or 16, found {}", images.bit_depth)));
    }
    if let Some([low, high]) = images.range
        && !(low.is_finite() && high.is_finite() && low < high)
    {
        problems.push(ConfigProblem::new(
            "sink.images.range",
            format!("must be two finite numbers [low, high] with low below high, found [{low}, {high}]"),
        ));
    }
    problems
}
