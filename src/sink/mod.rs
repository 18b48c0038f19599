//! Sinks: where results go.

mod arrow_file;
pub mod checkpoint;
mod images;
mod nats;
mod output;
mod rotating;
mod writeback;

pub use arrow_file::{ArrowFileSink, FileCompression, STDOUT_PATH, SinkError, is_stdout, resolve_output};
pub use images::ImageSink;
pub use nats::{NatsOutput, NatsSink, Published, UnitOutput};
pub use output::Sink;
pub use rotating::{Committed, FileFormat, KeepUnit, RotatingSink, dead_letter_schema};
