//! Sources: where records come from.
//!
//! A source is opened before any work starts, so a missing or unreadable file
//! stops the pipeline with an error before the first record. After that it
//! yields batches until it runs out; records it cannot read are passed on as
//! rejections, never dropped.

mod arrow_file;
mod convert;
mod images;
mod interpolate;
mod latent;
mod nats;
mod npy;
mod prior;
mod socket;
mod watch;

use std::path::PathBuf;

use arrow::datatypes::{Schema, SchemaRef};

use crate::batch::Batch;
use crate::config::SourceConfig;

pub use arrow_file::ArrowFileSource;
pub use images::ImagesSource;
pub use latent::LatentSource;
pub use nats::{NatsSource, Unacked, connect as connect_nats, open_stream as open_nats_stream};
pub use npy::NpySource;
pub use socket::SocketSource;
pub(crate) use socket::parse_listen;
pub use watch::{WATCH_KEY_COLUMN, WatchSource};

/// Name of the key column of sources keyed by ordinal.
pub const ORDINAL_COLUMN: &str = "ordinal";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("input {} not found; check `source.path` (relative paths start at the pipeline file's folder)", .0.display())]
    NotFound(PathBuf),
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid {format} file: {message}", path.display())]
    Format { path: PathBuf, format: &'static str, message: String },
    #[error("{message}")]
    Config { path: String, message: String },
}

impl SourceError {
    /// Returns the pipeline-file path of the setting this error is about, if any.
    pub fn config_path(&self) -> Option<&str> {
        match self {
            SourceError::Config { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// Tells whether the first input's schema and key column fit the pipeline;
/// `Err` carries the reason. The daemon's sources take their schema from
/// the first input that passes it.
pub type SchemaCheck = std::sync::Arc<dyn Fn(&SchemaRef, &str) -> Result<(), String> + Send + Sync>;

/// A finite or endless supply of record batches.
pub trait Source: Send {
    /// Schema of every batch the source yields.
    fn schema(&self) -> SchemaRef;

    /// Name of the column that contains the record key.
    fn key_column(&self) -> &str;

    /// Number of records, when known before reading.
    fn len_hint(&self) -> Option<u64>;

    /// Reads the next batch; `None` once the source is exhausted.
    fn next_batch(&mut self) -> Result<Option<Batch>, SourceError>;
}

/// Opens the configured source. `seed` is the pipeline seed, for sources
/// that draw their records.
pub fn open(config: &SourceConfig, seed: u64) -> Result<Box<dyn Source>, SourceError> {
    Ok(match config {
        SourceConfig::Images(c) => Box::new(ImagesSource::open(c)?),
        SourceConfig::ArrowFile(c) => Box::new(ArrowFileSource::open(c)?),
        SourceConfig::Npy(c) => Box::new(NpySource::open(c)?),
        SourceConfig::Latent(c) => Box::new(LatentSource::open(c, seed)?),
        SourceConfig::Watch(_) | SourceConfig::Socket(_) | SourceConfig::Nats(_) => {
            return Err(SourceError::Config {
                path: String::from("source.kind"),
                message: format!(
                    "a {} source never ends, so it runs only under `stochflow daemon`; use an arrow_file, npy, images or latent source with `stochflow run`",
                    config.kind()
                ),
            });
        }
    })
}

/// Returns whether two schemas have the same columns, in the same order,
/// with the same types and metadata, differing at most in nullability.
pub(crate) fn same_but_nullability(expected: &Schema, found: &Schema) -> bool {
    expected.fields().len() == found.fields().len()
        && expected
            .fields()
            .iter()
            .zip(found.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type() && a.metadata() == b.metadata())
}

/// Describes how `found` differs from `expected`: missing and extra columns,
/// and columns of another type, tensor shape, nullability or metadata.
pub(crate) fn column_difference(expected: &Schema, found: &Schema) -> String {
    let type_text = |field: &arrow::datatypes::Field| match crate::tensor::TensorType::of_field(field) {
        Some(tensor) => format!("a tensor of {}", tensor.describe()),
        None => field.data_type().to_string(),
    };
    let mut parts = Vec::new();
    for field in expected.fields() {
        match found.field_with_name(field.name()) {
            Err(_) => parts.push(format!("missing column {:?}", field.name())),
            Ok(other) if other.data_type() != field.data_type() => {
                parts.push(format!("column {:?} is {}, expected {}", field.name(), type_text(other), type_text(field)))
            }
            Ok(other) if other.metadata() != field.metadata() => {
                // Tensor columns of the same list size differ in their shape metadata.
                let (found_type, expected_type) = (type_text(other), type_text(field));
                if found_type != expected_type {
                    parts.push(format!("column {:?} is {found_type}, expected {expected_type}", field.name()));
                } else {
                    parts.push(format!("column {:?} has other field metadata", field.name()));
                }
            }
            Ok(other) if other.is_nullable() != field.is_nullable() => parts.push(format!(
                "column {:?} is {}nullable, expected {}nullable",
                field.name(),
                if other.is_nullable() { "" } else { "not " },
                if field.is_nullable() { "" } else { "not " }
            )),
            Ok(_) => {}
        }
    }
    for field in found.fields() {
        if expected.field_with_name(field.name()).is_err() {
            parts.push(format!("extra column {:?}", field.name()));
        }
    }
    if parts.is_empty() {
        parts.push(String::from("the same columns in another order"));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::{DataType, Field};

    use super::*;

    fn pixels(size: i32, nullable: bool) -> Field {
        Field::new("pixels", DataType::new_fixed_size_list(DataType::Float32, size, false), nullable)
    }

    #[test]
    fn difference_names_shapes_and_nullability() {
        let id = Field::new("id", DataType::Int64, false);
        let expected = Schema::new(vec![id.clone(), pixels(64, false)]);

        let reshaped = Schema::new(vec![id.clone(), pixels(32, false)]);
        assert_eq!(
            column_difference(&expected, &reshaped),
            "column \"pixels\" is a tensor of float32[32], expected a tensor of float32[64]"
        );

        let metadata = std::collections::HashMap::from([
            (String::from("ARROW:extension:name"), String::from("arrow.fixed_shape_tensor")),
            (String::from("ARROW:extension:metadata"), String::from(r#"{"shape":[8,8]}"#)),
        ]);
        let square = Schema::new(vec![id.clone(), pixels(64, false).with_metadata(metadata)]);
        assert_eq!(
            column_difference(&expected, &square),
            "column \"pixels\" is a tensor of float32[8, 8], expected a tensor of float32[64]"
        );

        let nullable = Schema::new(vec![id.clone(), pixels(64, true)]);
        assert_eq!(column_difference(&expected, &nullable), "column \"pixels\" is nullable, expected not nullable");

        let renamed = Schema::new(vec![id, Field::new("label", DataType::Utf8, true)]);
        assert_eq!(column_difference(&expected, &renamed), "missing column \"pixels\"; extra column \"label\"");
    }
}
