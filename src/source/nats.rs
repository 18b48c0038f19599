//! Messages of a NATS JetStream stream, for the daemon's scale-out mode.
//!
//! Several daemons share one durable pull consumer, so the server hands
//! each message to one of them. A message contains one Arrow IPC stream and
//! is one input unit, named `STREAM:SEQUENCE` after its place in the stream.
//! A redelivery keeps that name. Without `id_column`, a record's key is
//! `STREAM:SEQUENCE:ROW`, so a message processed again, by this daemon or
//! another, draws the same noise and comes out the same.
//!
//! A message is acknowledged by the `nats` sink once its output is stored;
//! until then it stays in [`Unacked`]. A daemon that dies leaves its
//! messages unacknowledged, and the server redelivers them to the others
//! once the consumer's ack wait has passed.

use std::collections::{HashMap, VecDeque};
use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::reader::StreamReader;
use arrow::record_batch::RecordBatchReader;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, AckKind, Message};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::convert::{ColumnSettings, Converter, GeneratedKey};
use super::{SchemaCheck, SourceError, column_difference, same_but_nullability};
use crate::batch::{Batch, Mark, Rejected};
use crate::config::{NatsDeliver, NatsSourceConfig};

/// How long one fetch waits for messages before the source checks for a stop.
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// Messages held in memory that did not fit before the first message that
/// fits; later ones go back to the server.
const MAX_UNFIT: usize = 64;
/// How long the server keeps back an unfit message past that limit.
const UNFIT_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Messages handed to the pipeline and not yet acknowledged, by unit name.
#[derive(Clone, Default)]
pub struct Unacked(Arc<Mutex<HashMap<Arc<str>, Message>>>);

impl Unacked {
    fn insert(&self, unit: Arc<str>, message: Message) {
        self.0.lock().expect("the unacknowledged messages lock is never poisoned").insert(unit, message);
    }

    fn contains(&self, unit: &str) -> bool {
        self.0.lock().expect("the unacknowledged messages lock is never poisoned").contains_key(unit)
    }

    /// Returns the messages, to tell the server they are in progress.
    fn all(&self) -> Vec<Message> {
        self.0.lock().expect("the unacknowledged messages lock is never poisoned").values().cloned().collect()
    }

    /// Removes and returns the message of `unit`.
    pub fn take(&self, unit: &str) -> Option<Message> {
        self.0.lock().expect("the unacknowledged messages lock is never poisoned").remove(unit)
    }

    fn drain(&self) -> Vec<Message> {
        let mut map = self.0.lock().expect("the unacknowledged messages lock is never poisoned");
        map.drain().map(|(_, message)| message).collect()
    }
}

pub struct NatsSource {
    config: NatsSourceConfig,
    client: async_nats::Client,
    runtime: tokio::runtime::Handle,
    consumer: PullConsumer,
    /// Messages fetched and not yet read, in stream order.
    queue: VecDeque<Message>,
    /// Messages that did not fit before the first message fixed the
    /// columns. Once the pipeline runs, they are read again, and rejected if
    /// they still fail.
    unfit: Vec<Message>,
    unacked: Unacked,
    schema: Option<(SchemaRef, String)>,
    schema_check: Option<SchemaCheck>,
}

/// One message opened: its records and how they are converted.
struct OpenMessage {
    reader: Box<dyn RecordBatchReader + Send>,
    converter: Converter,
}

impl NatsSource {
    /// Connects to the server, creates the stream and the consumer if they
    /// do not exist, and checks that an existing consumer reads `subject`.
    pub async fn connect(config: &NatsSourceConfig) -> Result<Self, SourceError> {
        let client = connect(&config.url, "source.url").await?;
        let context = jetstream::new(client.clone());
        let problem = |path: &str, message: String| SourceError::Config { path: path.to_string(), message };
        let created = jetstream::stream::Config {
            name: config.stream.clone(),
            subjects: vec![config.subject.clone()],
            ..Default::default()
        };
        let stream = open_stream(&context, created, &config.url, "source.stream", "input").await?;

        let deliver = match config.deliver {
            NatsDeliver::All => DeliverPolicy::All,
            NatsDeliver::New => DeliverPolicy::New,
        };
        let consumer_config = pull::Config {
            durable_name: Some(config.consumer.clone()),
            filter_subject: config.subject.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_millis(config.ack_wait_ms),
            // A message is never given up on: each delivery either stores
            // its output or leaves it for another try.
            max_deliver: -1,
            deliver_policy: deliver,
            ..Default::default()
        };
        let existed = stream.consumer_info(&config.consumer).await.is_ok();
        let mut consumer: PullConsumer =
            stream.get_or_create_consumer(&config.consumer, consumer_config).await.map_err(|err| {
                problem(
                    "source.consumer",
                    format!(
                        "cannot open the consumer {:?} of stream {:?}: {err}; the stream must capture `source.subject` ({})",
                        config.consumer, config.stream, config.subject
                    ),
                )
            })?;

        let info = consumer.info().await.map_err(|err| {
            problem("source.consumer", format!("cannot read the consumer {:?}: {err}", config.consumer))
        })?;
        if info.config.filter_subject != config.subject {
            return Err(problem(
                "source.subject",
                format!(
                    "the consumer {:?} exists and reads subject {:?}, not {:?}; use the same subject in every daemon that shares it, or name another `consumer`",
                    config.consumer, info.config.filter_subject, config.subject
                ),
            ));
        }
        if info.config.ack_wait != Duration::from_millis(config.ack_wait_ms) {
            tracing::warn!(
                consumer = %config.consumer,
                consumer_ack_wait_ms = info.config.ack_wait.as_millis() as u64,
                configured_ack_wait_ms = config.ack_wait_ms,
                "the consumer exists with another ack wait, which it keeps; to change it, delete the consumer while no daemon runs, or name a new `consumer`"
            );
        }
        if existed && info.config.deliver_policy != deliver {
            tracing::warn!(
                consumer = %config.consumer,
                "the consumer exists and goes on where it is, so `deliver` applies only to a consumer the daemon creates"
            );
        }
        if !existed {
            tracing::info!(consumer = %config.consumer, deliver = ?config.deliver, "created the consumer");
        }
        if !existed && config.deliver == NatsDeliver::All && info.num_pending > 0 {
            tracing::warn!(
                consumer = %config.consumer,
                stream = %config.stream,
                messages = info.num_pending,
                "created the consumer, which reads every message already in the stream; outputs stored longer ago than the output stream's duplicate window are stored again, so set `deliver: new` for a consumer that should read new messages only"
            );
        }
        tracing::info!(stream = %config.stream, consumer = %config.consumer, pending = info.num_pending, "reading the input stream");
        Ok(Self {
            config: config.clone(),
            client,
            runtime: tokio::runtime::Handle::current(),
            consumer,
            queue: VecDeque::new(),
            unfit: Vec::new(),
            unacked: Unacked::default(),
            schema: None,
            schema_check: None,
        })
    }

    /// Returns the ack wait of the consumer, which bounds how long a message
    /// stays with a daemon that died.
    pub fn ack_wait(&self) -> Duration {
        self.consumer.cached_info().config.ack_wait
    }

    /// Returns the server's address and the connection to it.
    pub fn connection(&self) -> (String, async_nats::Client) {
        (self.config.url.clone(), self.client.clone())
    }

    /// Returns the messages handed to the pipeline and not yet acknowledged.
    pub fn unacked(&self) -> Unacked {
        self.unacked.clone()
    }

    pub fn set_schema_check(&mut self, check: SchemaCheck) {
        self.schema_check = Some(check);
    }

    pub fn set_schema(&mut self, schema: SchemaRef, key_column: String) {
        self.schema = Some((schema, key_column));
    }

    /// Waits for the first message that opens and passes the schema check,
    /// and returns its schema and key column. Returns `None` if `stop` is
    /// set first.
    pub fn wait_for_schema(&mut self, stop: &AtomicBool) -> Result<Option<(SchemaRef, String)>, SourceError> {
        while !stop.load(Ordering::Relaxed) {
            if let Some(known) = &self.schema {
                return Ok(Some(known.clone()));
            }
            let Some(message) = self.next_message() else { continue };
            let unit = unit_name(&message, &self.config.stream);
            let fits = match self.open(&message, &unit) {
                Ok(open) => {
                    let (schema, key) = (open.converter.schema(), open.converter.key_column().to_string());
                    match self.schema_check.as_ref().map(|check| check(&schema, &key)) {
                        Some(Err(reason)) => Err(reason),
                        _ => Ok((schema, key)),
                    }
                }
                Err(err) => Err(crate::runtime::error_chain(&err)),
            };
            match fits {
                Ok(known) => {
                    self.queue.push_front(message);
                    self.schema = Some(known.clone());
                    return Ok(Some(known));
                }
                Err(reason) if self.unfit.len() < MAX_UNFIT => {
                    tracing::warn!(input = %unit, reason = %reason, "input message does not fit the pipeline; it goes to the dead letters once another message's columns start the pipeline");
                    self.unfit.push(message);
                }
                Err(reason) => {
                    // Past the limit, the server keeps the message, so that
                    // memory stays bounded.
                    tracing::warn!(input = %unit, reason = %reason, "input message does not fit the pipeline; handed back to the server for a later try");
                    self.runtime.block_on(async {
                        if let Err(err) = message.ack_with(AckKind::Nak(Some(UNFIT_RETRY_DELAY))).await {
                            tracing::warn!(input = %unit, error = %err, "cannot hand the message back; the server redelivers it after the ack wait");
                        }
                    });
                }
            }
        }
        Ok(None)
    }

    /// Reads messages into `output` until `stop` is set or the output is
    /// closed. `on_records` receives the number of records in each batch.
    pub fn run(
        &mut self,
        output: &mpsc::Sender<Batch>,
        stop: &AtomicBool,
        on_records: &dyn Fn(u64),
    ) -> Result<(), SourceError> {
        self.queue.extend(self.unfit.drain(..));
        let mut last_progress = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if last_progress.elapsed() >= self.ack_wait() / 3 {
                self.report_progress();
                last_progress = Instant::now();
            }
            let Some(message) = self.next_message() else { continue };
            if !self.read_message(message, output, stop, on_records) {
                break;
            }
        }
        Ok(())
    }

    /// Hands the messages fetched and not read back to the server, so that
    /// other daemons get them at once, and with them the messages handed to
    /// the pipeline that the last commit did not acknowledge.
    pub async fn close(self) {
        let returned: Vec<Message> = self.queue.into_iter().chain(self.unfit).chain(self.unacked.drain()).collect();
        for message in &returned {
            if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(error = %err, "cannot hand a message back; the server redelivers it after the ack wait");
            }
        }
        if !returned.is_empty() {
            tracing::info!(messages = returned.len(), "handed unread messages back to the server");
        }
    }

    /// Tells the server that the messages queued and in the pipeline are in
    /// progress, which restarts their ack wait: a message long in the
    /// pipeline stays with this daemon while it runs.
    fn report_progress(&self) {
        let messages: Vec<Message> = self.queue.iter().cloned().chain(self.unacked.all()).collect();
        self.runtime.block_on(async {
            for message in &messages {
                if let Err(err) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %err, "cannot report a message in progress");
                }
            }
        });
    }

    /// Returns the next message, fetching when none is queued. Returns
    /// `None` when a fetch found nothing in its wait, or failed.
    fn next_message(&mut self) -> Option<Message> {
        if let Some(message) = self.queue.pop_front() {
            return Some(message);
        }
        let fetched = self.runtime.block_on(async {
            let mut batch =
                self.consumer.batch().max_messages(self.config.fetch).expires(FETCH_WAIT).messages().await?;
            let mut messages = Vec::new();
            while let Some(message) = batch.next().await {
                messages.push(message?);
            }
            Ok::<_, async_nats::Error>(messages)
        });
        match fetched {
            Ok(messages) => self.queue.extend(messages),
            Err(err) => {
                tracing::warn!(server = %self.config.url, error = %err, "cannot fetch messages; trying again");
                std::thread::sleep(FETCH_WAIT);
            }
        }
        self.queue.pop_front()
    }

    /// Opens a message's Arrow IPC stream and plans its conversion.
    fn open(&self, message: &Message, unit: &Arc<str>) -> Result<OpenMessage, SourceError> {
        let not_a_stream = |message: String| SourceError::Config { path: String::from("source"), message };
        if message.payload.starts_with(b"ARROW1") {
            return Err(not_a_stream(format!(
                "message {unit} is an Arrow IPC file, not a stream; publish each batch of records in the Arrow IPC stream format (pyarrow.ipc.new_stream)"
            )));
        }
        let reader = StreamReader::try_new(Cursor::new(message.payload.clone()), None).map_err(|err| {
            not_a_stream(format!(
                "message {unit} is not an Arrow IPC stream ({err}); publish each batch of records as one Arrow IPC stream"
            ))
        })?;
        let settings = ColumnSettings {
            id_column: self.config.id_column.as_deref(),
            columns: self.config.columns.as_deref(),
            tensors: &self.config.tensors,
        };
        let converter = Converter::new(
            &reader.schema(),
            &format!("message {unit}"),
            &settings,
            GeneratedKey::StreamPosition(unit.clone()),
            0,
        )?
        .with_origin(unit.clone())?;
        Ok(OpenMessage { reader: Box::new(reader), converter })
    }

    /// Reads one message and sends its batches with their marks, the last
    /// one complete. A message that cannot be read, or whose columns differ
    /// from the first message's, becomes one rejected record keyed by its
    /// unit name, after the records read before the failure. Returns false
    /// once the pipeline is closed.
    fn read_message(
        &mut self,
        message: Message,
        output: &mpsc::Sender<Batch>,
        stop: &AtomicBool,
        on_records: &dyn Fn(u64),
    ) -> bool {
        let unit = unit_name(&message, &self.config.stream);
        if self.unacked.contains(&unit) {
            // The ack wait passed while the message was in the pipeline. The
            // sink acknowledges it through this newer delivery when its
            // output is stored, so it is not read twice.
            tracing::info!(input = %unit, "message redelivered while still in the pipeline; reading it once");
            self.unacked.insert(unit, message);
            return true;
        }
        if let Ok(info) = message.info()
            && info.delivered > 1
        {
            tracing::info!(input = %unit, delivery = info.delivered, "reading a redelivered message");
        }
        self.unacked.insert(unit.clone(), message.clone());
        let reject_rest = |records: u64, reason: String| {
            on_records(1);
            let mut batch = Batch::new(RecordBatch::new_empty(self.expected_schema()), Vec::new());
            batch.rejected.push(Rejected {
                key: unit.to_string(),
                component: String::from("source"),
                reason,
                origin: Some(unit.to_string()),
            });
            batch.marks.push(Mark { unit: unit.clone(), records: records + 1, complete: true });
            batch
        };
        let mut open = match self.open(&message, &unit) {
            Ok(open) => open,
            Err(err) => return output.blocking_send(reject_rest(0, crate::runtime::error_chain(&err))).is_ok(),
        };
        let found = open.converter.schema();
        let retype = self.schema.as_ref().and_then(|(expected, _)| {
            (expected.fields() != found.fields() && same_but_nullability(expected, &found)).then(|| expected.clone())
        });
        if let Some((expected, key_column)) = &self.schema
            && ((expected.fields() != found.fields() && retype.is_none()) || key_column != open.converter.key_column())
        {
            let reason = format!(
                "the message's columns differ from those of the first message that fit the pipeline ({}); every message must have the same columns",
                column_difference(expected, &found)
            );
            return output.blocking_send(reject_rest(0, reason)).is_ok();
        }

        let mut position = 0u64;
        let mut held: Option<Batch> = None;
        for next in open.reader.by_ref() {
            if stop.load(Ordering::Relaxed) {
                // The sink drops the records sent so far with its incomplete
                // messages. The next generation, or another daemon after
                // `close`, reads the message again from the start.
                self.unacked.take(&unit);
                self.queue.push_front(message);
                return true;
            }
            let converted = next
                .map_err(|err| format!("records from number {position} on cannot be read: {err}"))
                .and_then(|data| open.converter.convert(data).map_err(|err| crate::runtime::error_chain(&err)))
                .and_then(|mut batch| {
                    if let Some(expected) = &retype {
                        batch.data =
                            RecordBatch::try_new(expected.clone(), batch.data.columns().to_vec()).map_err(|err| {
                                format!(
                                    "records from number {position} on do not fit the first message's columns: {err}"
                                )
                            })?;
                    }
                    Ok(batch)
                });
            let mut batch = match converted {
                Ok(batch) => batch,
                Err(reason) => {
                    if let Some(batch) = held.take()
                        && output.blocking_send(batch).is_err()
                    {
                        return false;
                    }
                    return output.blocking_send(reject_rest(position, reason)).is_ok();
                }
            };
            let records = (batch.data.num_rows() + batch.rejected.len()) as u64;
            position += records;
            on_records(records);
            batch.marks.push(Mark { unit: unit.clone(), records: position, complete: false });
            if let Some(previous) = held.replace(batch)
                && output.blocking_send(previous).is_err()
            {
                return false;
            }
        }
        let mut last = held.unwrap_or_else(|| Batch::new(RecordBatch::new_empty(self.expected_schema()), Vec::new()));
        last.marks.clear();
        last.marks.push(Mark { unit, records: position, complete: true });
        output.blocking_send(last).is_ok()
    }

    fn expected_schema(&self) -> SchemaRef {
        self.schema.as_ref().map(|(schema, _)| schema.clone()).unwrap_or_else(|| Arc::new(Schema::empty()))
    }
}

/// Names a message by its stream and its sequence number there.
fn unit_name(message: &Message, stream: &str) -> Arc<str> {
    match message.info() {
        Ok(info) => Arc::from(format!("{stream}:{}", info.stream_sequence)),
        // Every message a pull consumer delivers has its reply subject set.
        Err(_) => Arc::from(format!("{stream}:{}", message.subject)),
    }
}

/// Connects to a NATS server; `key` is the setting that names it.
pub async fn connect(url: &str, key: &str) -> Result<async_nats::Client, SourceError> {
    async_nats::ConnectOptions::new()
        .name("stochflow")
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|err| SourceError::Config {
            path: key.to_string(),
            message: format!(
                "cannot connect to the NATS server at {url}: {err}; start it with JetStream on (`nats-server -js`), or correct `{key}`"
            ),
        })
}

/// Opens a stream, or creates it with `created` when it does not exist.
/// `key` is the setting that names the stream, and `role` is what it
/// stores (`input` or `output`).
pub async fn open_stream(
    context: &jetstream::Context,
    created: jetstream::stream::Config,
    url: &str,
    key: &str,
    role: &str,
) -> Result<jetstream::stream::Stream, SourceError> {
    let problem = |message: String| SourceError::Config { path: key.to_string(), message };
    let name = created.name.clone();
    match context.get_stream(&name).await {
        Ok(stream) => Ok(stream),
        Err(err)
            if matches!(err.kind(), GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            let subjects = created.subjects.join(", ");
            let stream = context
                .create_stream(created)
                .await
                .map_err(|err| problem(format!("cannot create the {role} stream {name:?} on {url}: {err}")))?;
            tracing::info!(stream = %name, subjects = %subjects, "created the {role} stream");
            Ok(stream)
        }
        Err(err) => Err(problem(format!(
            "cannot look up the {role} stream {name:?} on {url}: {err}; the server must run with JetStream on (`nats-server -js`)"
        ))),
    }
}
