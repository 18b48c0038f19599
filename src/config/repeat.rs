//! The `repeat` section of the pipeline file.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepeatConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// Rows per record; each gets its index in the `sample` column.
    #[serde(deserialize_with = "super::count::count")]
    pub samples: u32,
}
