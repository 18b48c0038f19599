//! Sinks: where results go.

mod arrow_file;
mod images;
mod output;

pub use arrow_file::{ArrowFileSink, SinkError, resolve_output};
pub use images::ImageSink;
pub use output::Sink;
