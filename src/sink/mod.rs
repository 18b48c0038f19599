//! Sinks: where results go.

mod arrow_file;

pub use arrow_file::{ArrowFileSink, SinkError};
