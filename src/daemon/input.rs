//! The daemon's input: a watched directory or a socket.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arrow::datatypes::SchemaRef;
use tokio::sync::{mpsc, watch};

use crate::batch::Batch;
use crate::config::SourceConfig;
use crate::sink::KeepUnit;
use crate::sink::checkpoint::Checkpoint;
use crate::source::{SocketSource, SourceError, WatchSource};

pub enum Input {
    Watch(Box<WatchSource>),
    Socket(SocketSource),
}

impl Input {
    /// Opens the configured input: checks the directory, or binds the socket.
    pub fn open(config: &SourceConfig, durable: watch::Receiver<Arc<Checkpoint>>) -> Result<Self, SourceError> {
        match config {
            SourceConfig::Watch(c) => Ok(Input::Watch(Box::new(WatchSource::new(c, durable)?))),
            SourceConfig::Socket(c) => Ok(Input::Socket(SocketSource::new(c, durable)?)),
            other => Err(SourceError::Config {
                path: String::from("source.kind"),
                message: format!(
                    "the daemon reads from a `watch` or `socket` source, not {}; use `stochflow run` for a finite source",
                    other.kind()
                ),
            }),
        }
    }

    /// Returns the source kind, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Watch(_) => "watch",
            Input::Socket(_) => "socket",
        }
    }

    /// Returns which units the checkpoint keeps at each commit.
    pub fn keeps_unit(&self) -> KeepUnit {
        match self {
            Input::Watch(source) => source.keeps_unit(),
            Input::Socket(source) => source.keeps_unit(),
        }
    }

    /// Sets the check that the first input's schema must pass.
    pub fn set_schema_check(&mut self, check: crate::source::SchemaCheck) {
        match self {
            Input::Watch(source) => source.set_schema_check(check),
            Input::Socket(source) => source.set_schema_check(check),
        }
    }

    /// Waits for the first input and returns its schema and key column.
    pub fn wait_for_schema(
        &mut self,
        durable: &Checkpoint,
        stop: &AtomicBool,
    ) -> Result<Option<(SchemaRef, String)>, SourceError> {
        match self {
            Input::Watch(source) => source.wait_for_schema(durable, stop),
            Input::Socket(source) => source.wait_for_schema(durable, stop),
        }
    }

    /// Reads until `stop` is set or the output closes.
    pub fn run(
        &mut self,
        durable: &Checkpoint,
        output: &mpsc::Sender<Batch>,
        stop: &AtomicBool,
        on_records: &dyn Fn(u64),
    ) -> Result<(), SourceError> {
        match self {
            Input::Watch(source) => source.run(durable, output, stop, on_records),
            Input::Socket(source) => source.run(durable, output, stop, on_records),
        }
    }

    /// Closes the input after the last commit. A socket source first sends
    /// each connection an ack for what that commit made durable.
    pub async fn close(self) {
        if let Input::Socket(source) = self {
            source.close().await;
        }
    }
}
