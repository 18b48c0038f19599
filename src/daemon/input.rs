//! The daemon's input: a watched directory, a socket or a NATS JetStream
//! consumer.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arrow::datatypes::SchemaRef;
use tokio::sync::{mpsc, watch};

use crate::batch::Batch;
use crate::config::SourceConfig;
use crate::sink::KeepUnit;
use crate::sink::checkpoint::Checkpoint;
use crate::source::{NatsSource, SocketSource, SourceError, Unacked, WatchSource};

pub enum Input {
    Watch(Box<WatchSource>),
    Socket(SocketSource),
    Nats(Box<NatsSource>),
}

impl Input {
    /// Opens the configured input: checks the directory, binds the socket,
    /// or connects to the NATS server.
    pub async fn open(config: &SourceConfig, durable: watch::Receiver<Arc<Checkpoint>>) -> Result<Self, SourceError> {
        match config {
            SourceConfig::Watch(c) => Ok(Input::Watch(Box::new(WatchSource::new(c, durable)?))),
            SourceConfig::Socket(c) => Ok(Input::Socket(SocketSource::new(c, durable)?)),
            SourceConfig::Nats(c) => Ok(Input::Nats(Box::new(NatsSource::connect(c).await?))),
            other => Err(SourceError::Config {
                path: String::from("source.kind"),
                message: format!(
                    "the daemon reads from a `watch`, `socket` or `nats` source, not {}; use `stochflow run` for a finite source",
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
            Input::Nats(_) => "nats",
        }
    }

    /// Returns which units the checkpoint keeps at each commit.
    pub fn keeps_unit(&self) -> KeepUnit {
        match self {
            Input::Watch(source) => source.keeps_unit(),
            Input::Socket(source) => source.keeps_unit(),
            // The NATS input keeps no checkpoint.
            Input::Nats(_) => Box::new(|_, _| false),
        }
    }

    /// Sets the check that the first input's schema must pass.
    pub fn set_schema_check(&mut self, check: crate::source::SchemaCheck) {
        match self {
            Input::Watch(source) => source.set_schema_check(check),
            Input::Socket(source) => source.set_schema_check(check),
            Input::Nats(source) => source.set_schema_check(check),
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
            Input::Nats(source) => source.wait_for_schema(stop),
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
            Input::Nats(source) => source.run(output, stop, on_records),
        }
    }

    /// Returns the messages waiting for their acknowledgement, for a NATS
    /// input.
    pub fn unacked(&self) -> Option<Unacked> {
        match self {
            Input::Nats(source) => Some(source.unacked()),
            _ => None,
        }
    }

    /// Returns the server's address and the connection to it, for a NATS
    /// input.
    pub fn nats_connection(&self) -> Option<(String, async_nats::Client)> {
        match self {
            Input::Nats(source) => Some(source.connection()),
            _ => None,
        }
    }

    /// Returns the consumer's ack wait, for a NATS input.
    pub fn ack_wait(&self) -> Option<std::time::Duration> {
        match self {
            Input::Nats(source) => Some(source.ack_wait()),
            _ => None,
        }
    }

    /// Closes the input after the last commit. A socket source first sends
    /// each connection an ack for what that commit made durable; a NATS
    /// source hands the messages it did not finish back to the server.
    pub async fn close(self) {
        match self {
            Input::Socket(source) => source.close().await,
            Input::Nats(source) => source.close().await,
            Input::Watch(_) => {}
        }
    }
}
