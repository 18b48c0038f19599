//! Arrow IPC streams sent to a loopback TCP port or a Unix socket, for the
//! daemon.
//!
//! # Protocol
//!
//! A client connects to `source.listen` and writes one Arrow IPC stream: a
//! schema message, then record batches (dictionary batches are allowed), as
//! arrow-rs `StreamWriter` or pyarrow `pa.ipc.new_stream` write them. The
//! schema's metadata sets:
//!
//! - `stochflow.stream`: the stream's name. A stream's records are counted
//!   from its first record ever, across connections and daemon restarts, and
//!   the daemon's checkpoint stores how many of them are durable. Without
//!   it, the connection gets a fresh name `connection-N`, not given before in
//!   this process and carried by no durable record of an earlier one on the
//!   same output directory, so it can never be resumed. Its entry leaves the checkpoint
//!   at the first commit after the connection closes. Names of that form are reserved: a client
//!   cannot choose one.
//! - `stochflow.offset`: the position in the stream of the connection's
//!   first record, a decimal integer. Default 0.
//!
//! The daemon writes newline-delimited JSON back on the same connection:
//!
//! - `{"stream":"NAME","committed":N}` as soon as the schema is read and
//!   the stream is open on this connection: the stream's first N records are
//!   durable.
//! - `{"stream":"NAME","committed":M}` each time more of the stream's records
//!   become durable.
//! - `{"error":"MESSAGE"}` on a protocol error, after which the daemon closes
//!   the connection.
//!
//! Records at positions below the count the daemon has accepted for the
//! stream (durable, or read and still in the pipeline) are skipped. So a
//! client that lost its connection, or saw the daemon restart, reconnects
//! with the same name and an offset no greater than the last committed count
//! it received (0 always works). It sends from there, and each record
//! reaches the output once. An offset above the accepted count would leave
//! a gap, so it is rejected with an error that names both numbers.
//!
//! The client ends its stream by closing its write side or by writing the
//! IPC end-of-stream marker. It may keep reading: the daemon sends acks until
//! every record of the stream it accepted is durable, including records sent
//! on earlier connections, then closes the connection.
//!
//! These errors close a connection:
//!
//! - a stream name that is open on another connection;
//! - invalid metadata, such as an empty stream name or a reserved one;
//! - settings (`id_column`, `columns`, `tensors`) that do not fit the
//!   stream's columns;
//! - converted columns that differ from the source's, which the first
//!   connection sets, other than in nullability alone; with that difference,
//!   a null where the source's columns have none;
//! - for the first connection, columns that the pipeline's stages cannot be
//!   planned against (such as a tensor of another shape than the model's
//!   input); the next connection may then set the columns;
//! - a gap;
//! - a message that cannot be decoded, or a stream that ends inside a message.
//!
//! Records forwarded before the error stay accepted. Later records of that
//! connection are discarded, so the client resends them from the committed
//! count. A row that cannot be converted, such as a tensor of the wrong
//! length or a null id, is no error: it becomes a rejected record.
//!
//! Record keys are the `id_column` values, or else `STREAM:POSITION` strings
//! in a Utf8 column `key`.
//!
//! The socket has no authentication: anyone who can connect can add
//! records. TCP addresses must therefore be loopback addresses, and a Unix
//! socket is guarded by its file permissions.
//!
//! # Backpressure
//!
//! Connection tasks hand batches to [`SocketSource::run`] through a channel
//! of [`CHANNEL_BATCHES`] batches. While it is full, they stop reading their
//! sockets, so TCP flow control slows a fast client down instead of the
//! daemon buffering its data. The source holds at most `CHANNEL_BATCHES`
//! batches in the channel and one in `run`, plus, for each open connection,
//! one batch being sent and the message being read. Batches are forwarded
//! as the clients sized them, so memory use grows with the clients' batch
//! sizes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arrow::array::ArrayRef;
use arrow::buffer::Buffer;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::MessageHeader;
use arrow::record_batch::RecordBatch;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::convert::{ColumnSettings, Converter, GeneratedKey};
use super::{SourceError, same_but_nullability};
use crate::batch::{Batch, Mark};
use crate::config::SocketSourceConfig;
use crate::sink::KeepUnit;
use crate::sink::checkpoint::{Checkpoint, connection_name, is_connection_name};

/// Schema metadata key of the stream name.
pub const STREAM_METADATA_KEY: &str = "stochflow.stream";
/// Schema metadata key of the stream position of a connection's first record.
pub const OFFSET_METADATA_KEY: &str = "stochflow.offset";
/// Capacity of the channel from the connection tasks to [`SocketSource::run`].
pub const CHANNEL_BATCHES: usize = 4;

/// Maximum time between two checks of the `stop` flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long the input of a failed connection is read and discarded after
/// the error reply. Closing a TCP socket with unread input resets the
/// connection, and the client could lose the error reply with it.
const LINGER: Duration = Duration::from_secs(2);
/// How long [`SocketSource::close`] waits for the connections to write their
/// last acks before it closes them.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Size of each connection's read buffer.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// First word of an IPC message since Arrow 0.15. The length follows it.
const CONTINUATION_MARKER: [u8; 4] = [0xff; 4];
/// Largest IPC message header accepted. Real headers are a few kilobytes, so
/// a larger one means the client sent something other than an IPC stream.
const MAX_HEADER_BYTES: u64 = 16 << 20;
/// Largest IPC message body accepted, which bounds the memory one
/// connection can take.
const MAX_BODY_BYTES: u64 = 1 << 30;

/// Receives Arrow IPC streams on a socket. The module documentation
/// describes the protocol.
pub struct SocketSource {
    shared: Arc<Shared>,
    batches: mpsc::Receiver<Batch>,
    /// A batch taken from `batches` that `run` could not forward before it
    /// returned; the next `run` forwards it first.
    pending: Option<Batch>,
    runtime: Handle,
    accept_task: JoinHandle<()>,
    address: String,
    /// The Unix socket file, removed when the source is dropped.
    socket_file: Option<PathBuf>,
}

/// State shared by the source and its connection tasks.
struct Shared {
    config: SocketSourceConfig,
    durable: watch::Receiver<Arc<Checkpoint>>,
    /// The schema and key column that every connection's converted batches
    /// must have: the first connection's, or the one given to `set_schema`.
    schema: watch::Sender<Option<(SchemaRef, String)>>,
    /// The check the first connection's schema must pass.
    schema_check: Mutex<Option<super::SchemaCheck>>,
    streams: Mutex<Streams>,
    batches: mpsc::Sender<Batch>,
    /// Set when the source closes: each connection writes its last ack and
    /// stops.
    closing: watch::Sender<bool>,
}

#[derive(Default)]
struct Streams {
    by_name: HashMap<String, StreamState>,
    /// Number of the last generated `connection-N` name.
    last_connection: u64,
    /// Generated names whose connection is still open, reading or waiting
    /// for acks. The checkpoint keeps only these of the generated names.
    serving: HashSet<Arc<str>>,
}

#[derive(Default)]
struct StreamState {
    /// Records of the stream that are durable or were forwarded by this
    /// process, counted from the stream's first record.
    accepted: u64,
    /// Whether a connection is sending the stream now.
    open: bool,
}

impl SocketSource {
    /// Binds `config.listen` and starts accepting connections. `durable` is
    /// the daemon's durable checkpoint, updated after each output commit:
    /// it decides which records a resending client may skip and when acks
    /// are sent.
    ///
    /// Panics outside a tokio runtime.
    pub fn new(config: &SocketSourceConfig, durable: watch::Receiver<Arc<Checkpoint>>) -> Result<Self, SourceError> {
        let (listener, address, socket_file) = bind(&config.listen)?;
        let (sender, batches) = mpsc::channel(CHANNEL_BATCHES);
        let shared = Arc::new(Shared {
            config: config.clone(),
            durable,
            schema: watch::Sender::new(None),
            schema_check: Mutex::new(None),
            streams: Mutex::new(Streams::default()),
            batches: sender,
            closing: watch::Sender::new(false),
        });
        let runtime = Handle::current();
        let accept_task = runtime.spawn(accept_connections(listener, shared.clone()));
        tracing::info!(address = %address, "socket source listening");
        Ok(Self { shared, batches, pending: None, runtime, accept_task, address, socket_file })
    }

    /// Closes the source after the pipeline's last commit: it stops accepting
    /// connections, and each connection sends an ack for the records the
    /// last commit made durable, or its pending error, and is closed. A
    /// connection whose client does not read its replies is closed after
    /// [`CLOSE_GRACE`].
    pub async fn close(mut self) {
        self.shared.closing.send_replace(true);
        if tokio::time::timeout(CLOSE_GRACE, &mut self.accept_task).await.is_err() {
            tracing::warn!("closing socket connections whose last replies were not written in time");
        }
    }

    /// Returns which units the checkpoint keeps: every named stream, so that
    /// a resend is recognized however late, and a generated `connection-N`
    /// stream only while its connection is open.
    pub fn keeps_unit(&self) -> KeepUnit {
        let shared = self.shared.clone();
        Box::new(move |name, _| {
            !is_connection_name(name)
                || shared.streams.lock().unwrap_or_else(PoisonError::into_inner).serving.contains(name)
        })
    }

    /// Returns the address the source listens on: `IP:PORT`, with the port
    /// the system chose for port 0, or `unix:PATH`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Waits for the first connection whose schema converts, and returns the
    /// converted schema and key column; every connection must share them.
    /// Returns `None` if `stop` is set first. `_durable` is unused: the
    /// source follows the checkpoint given to [`SocketSource::new`].
    pub fn wait_for_schema(
        &mut self,
        _durable: &Checkpoint,
        stop: &AtomicBool,
    ) -> Result<Option<(SchemaRef, String)>, SourceError> {
        let mut schema = self.shared.schema.subscribe();
        while !stop.load(Ordering::Relaxed) {
            if let Some(known) = schema.borrow_and_update().clone() {
                return Ok(Some(known));
            }
            let _ = self.runtime.block_on(tokio::time::timeout(POLL_INTERVAL, schema.changed()));
        }
        Ok(None)
    }

    /// Sets the check that the first connection's schema must pass; a
    /// connection that fails it gets an error and the schema stays open.
    pub fn set_schema_check(&mut self, check: super::SchemaCheck) {
        *self.shared.schema_check.lock().expect("the schema check lock is never poisoned") = Some(check);
    }

    /// Sets the schema and key column every connection must have, as
    /// planned before.
    pub fn set_schema(&mut self, schema: SchemaRef, key_column: String) {
        self.shared.schema.send_replace(Some((schema, key_column)));
    }

    /// Forwards the batches that connections send into `output`, until
    /// `stop` is set or `output` is closed. Batches not forwarded by then
    /// stay in the source for the next call. `on_records` is called with the
    /// number of records (rows and rejections) of each forwarded batch.
    /// `_durable` is unused, as in [`SocketSource::wait_for_schema`].
    ///
    /// Blocks, so call it from a blocking thread, not from async code.
    pub fn run(
        &mut self,
        _durable: &Checkpoint,
        output: &mpsc::Sender<Batch>,
        stop: &AtomicBool,
        on_records: &dyn Fn(u64),
    ) -> Result<(), SourceError> {
        while !stop.load(Ordering::Relaxed) {
            let batch = match self.pending.take() {
                Some(batch) => batch,
                None => match self.runtime.block_on(tokio::time::timeout(POLL_INTERVAL, self.batches.recv())) {
                    Ok(Some(batch)) => batch,
                    // `shared` contains a sender, so the channel never closes.
                    Ok(None) | Err(_) => continue,
                },
            };
            let records = (batch.data.num_rows() + batch.rejected.len()) as u64;
            loop {
                if stop.load(Ordering::Relaxed) {
                    self.pending = Some(batch);
                    return Ok(());
                }
                match self.runtime.block_on(tokio::time::timeout(POLL_INTERVAL, output.reserve())) {
                    Ok(Ok(permit)) => {
                        // Counted before the send, so that the count of records
                        // in is never below the count of records out.
                        on_records(records);
                        permit.send(batch);
                        break;
                    }
                    Ok(Err(_closed)) => {
                        self.pending = Some(batch);
                        return Ok(());
                    }
                    Err(_timeout) => {}
                }
            }
        }
        Ok(())
    }
}

impl Drop for SocketSource {
    fn drop(&mut self) {
        // The accept task owns the connection tasks, so they end with it.
        self.accept_task.abort();
        if let Some(path) = &self.socket_file
            && let Err(err) = std::fs::remove_file(path)
        {
            tracing::warn!(socket = %path.display(), error = %err, "cannot remove the socket file");
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// The address the socket source listens on.
pub(crate) enum ListenAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Parses `source.listen`: `unix:PATH`, or an IP address and port that must
/// be a loopback address, because the source has no authentication.
pub(crate) fn parse_listen(listen: &str) -> Result<ListenAddress, String> {
    if let Some(path) = listen.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(String::from("`unix:` must be followed by the socket's path, as in unix:/run/stochflow.sock"));
        }
        return Ok(ListenAddress::Unix(PathBuf::from(path)));
    }
    let address: SocketAddr = listen
        .parse()
        .map_err(|_| format!("invalid address {listen:?}; use 127.0.0.1:PORT, [::1]:PORT or unix:PATH"))?;
    if !address.ip().is_loopback() {
        return Err(format!(
            "{listen} is not a loopback address, and the socket source has no authentication, so anyone who can reach it could add records; listen on 127.0.0.1:PORT, [::1]:PORT or unix:PATH"
        ));
    }
    Ok(ListenAddress::Tcp(address))
}

/// Binds the listener for `listen`. Returns it with the address it is bound
/// to and, for a Unix socket, the socket file.
fn bind(listen: &str) -> Result<(Listener, String, Option<PathBuf>), SourceError> {
    let config_error = |message: String| SourceError::Config { path: String::from("source.listen"), message };
    let address = match parse_listen(listen).map_err(config_error)? {
        ListenAddress::Unix(path) => {
            prepare_socket_path(&path).map_err(config_error)?;
            let listener = std::os::unix::net::UnixListener::bind(&path)
                .and_then(|listener| {
                    listener.set_nonblocking(true)?;
                    UnixListener::from_std(listener)
                })
                .map_err(|err| {
                    config_error(format!(
                        "cannot listen on Unix socket {}: {err}; check that its folder is writable and that the path is shorter than 108 bytes",
                        path.display()
                    ))
                })?;
            return Ok((Listener::Unix(listener), format!("unix:{}", path.display()), Some(path)));
        }
        ListenAddress::Tcp(address) => address,
    };
    let listener = std::net::TcpListener::bind(address)
        .and_then(|listener| {
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        })
        .map_err(|err| {
            let fix = match err.kind() {
                std::io::ErrorKind::AddrInUse => "another process uses this port; stop it or choose another port",
                std::io::ErrorKind::PermissionDenied => "choose a port above 1023",
                _ => "check the address",
            };
            config_error(format!("cannot listen on {listen}: {err}; {fix}"))
        })?;
    let bound = listener.local_addr().map(|bound| bound.to_string()).unwrap_or_else(|_| listen.to_string());
    Ok((Listener::Tcp(listener), bound, None))
}

/// Creates the socket's folder and removes a socket file that no process
/// listens on any more.
fn prepare_socket_path(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;

    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|err| format!("cannot create the socket's folder {}: {err}", parent.display()))?;
    }
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(format!("{} exists and is not a socket; remove it or choose another path", path.display()));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!("another process listens on {}; stop it or choose another path", path.display()));
    }
    tracing::info!(socket = %path.display(), "removing a stale socket file");
    std::fs::remove_file(path).map_err(|err| format!("cannot remove the stale socket file {}: {err}", path.display()))
}

/// Accepts connections and serves each in a task until aborted, or until
/// the source closes and every connection has written its last reply.
async fn accept_connections(listener: Listener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    let mut closing = shared.closing.subscribe();
    // Each connection's reply writer owns a clone of `writing`, so
    // `written` closes when the last writer ends.
    let (writing, mut written) = mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            () = closed(&mut closing) => {
                drop(writing);
                let _ = written.recv().await;
                // Dropping the set aborts the readers, which may wait for
                // input that never comes.
                return;
            }
            accepted = accept(&listener) => match accepted {
                Ok(Accepted::Tcp(socket, peer)) => {
                    // Acks are small, so they are sent without waiting to fill a segment.
                    if let Err(err) = socket.set_nodelay(true) {
                        tracing::debug!(peer = %peer, error = %err, "cannot disable Nagle's algorithm");
                    }
                    connections.spawn(serve(socket, peer.to_string(), shared.clone(), writing.clone()));
                }
                Ok(Accepted::Unix(socket)) => {
                    connections.spawn(serve(socket, String::from("unix"), shared.clone(), writing.clone()));
                }
                Err(err) => {
                    // Running out of file descriptors, for instance; retry after a pause.
                    tracing::warn!(error = %err, "cannot accept a socket connection");
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            },
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                if let Err(err) = finished
                    && err.is_panic()
                {
                    tracing::error!(error = %err, "a socket connection task panicked");
                }
            }
        }
    }
}

enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(listener) => listener.accept().await.map(|(socket, peer)| Accepted::Tcp(socket, peer)),
        Listener::Unix(listener) => listener.accept().await.map(|(socket, _)| Accepted::Unix(socket)),
    }
}

/// A line for the writer half of a connection.
enum Reply {
    /// The stream's name and durable record count, once the schema is read.
    Opened { stream: Arc<str>, committed: u64 },
    /// The client ended its stream; the connection closes once `accepted`
    /// records of the stream are durable.
    Finished { accepted: u64 },
    /// A protocol error; the connection closes after it.
    Error(String),
}

#[derive(Serialize)]
struct AckLine<'a> {
    stream: &'a str,
    committed: u64,
}

#[derive(Serialize)]
struct ErrorLine<'a> {
    error: &'a str,
}

/// Serves one connection: reads its stream and writes its replies.
/// `writing` is dropped once the last reply is written.
async fn serve<S: AsyncRead + AsyncWrite + Send + 'static>(
    socket: S,
    peer: String,
    shared: Arc<Shared>,
    writing: mpsc::Sender<()>,
) {
    let (input, output) = tokio::io::split(socket);
    let (replies, reply_receiver) = mpsc::unbounded_channel();
    let writer = async {
        write_replies(output, reply_receiver, shared.durable.clone(), shared.closing.subscribe()).await;
        drop(writing);
    };
    let reader = async {
        let mut input = BufReader::with_capacity(READ_BUFFER_BYTES, input);
        let mut connection = Connection { shared: shared.clone(), peer: peer.clone(), replies, stream: None };
        let result = connection.read_stream(&mut input).await;
        // A connection that ends before its schema, or that cannot open
        // its stream, has no stream.
        let stream = connection.stream.as_deref().unwrap_or("(none)");
        match result {
            Ok(totals) => {
                tracing::info!(
                    peer = %peer,
                    stream,
                    forwarded = totals.forwarded,
                    skipped = totals.skipped,
                    "socket stream ended"
                );
                let _ = connection.replies.send(Reply::Finished { accepted: totals.accepted });
            }
            Err(message) => {
                tracing::warn!(peer = %peer, stream, error = %message, "closing socket connection");
                let _ = connection.replies.send(Reply::Error(message));
                let _ = tokio::time::timeout(LINGER, tokio::io::copy(&mut input, &mut tokio::io::sink())).await;
            }
        }
        connection.stream
    };
    let (stream, ()) = tokio::join!(reader, writer);
    if let Some(name) = stream.as_deref().filter(|name| is_connection_name(name)) {
        shared.close_generated(name);
    }
    tracing::info!(peer = %peer, stream = stream.as_deref().unwrap_or("(none)"), "socket connection closed");
}

/// Writes the replies of one connection, and an ack each time more of its
/// stream becomes durable, until the stream's records are all durable, an
/// error was written, the client is gone, or the source closes.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut output: W,
    mut replies: mpsc::UnboundedReceiver<Reply>,
    mut durable: watch::Receiver<Arc<Checkpoint>>,
    mut closing: watch::Receiver<bool>,
) {
    let mut stream: Option<Arc<str>> = None;
    let mut committed = 0;
    let mut finished_at: Option<u64> = None;
    loop {
        if finished_at.is_some_and(|accepted| committed >= accepted) {
            break;
        }
        // In this order, a closing source stops the loop only once the
        // queued replies and the last commit's ack are written.
        let line = tokio::select! {
            biased;
            reply = replies.recv(), if finished_at.is_none() => match reply {
                Some(Reply::Opened { stream: name, committed: records }) => {
                    committed = records;
                    let line = json_line(&AckLine { stream: &name, committed });
                    stream = Some(name);
                    line
                }
                Some(Reply::Finished { accepted }) => {
                    finished_at = Some(accepted);
                    continue;
                }
                Some(Reply::Error(message)) => {
                    let _ = output.write_all(json_line(&ErrorLine { error: &message }).as_bytes()).await;
                    break;
                }
                None => break,
            },
            changed = durable.changed(), if stream.is_some() => {
                if changed.is_err() {
                    break;
                }
                let name = stream.as_deref().expect("the branch runs only once the stream is known");
                let records = durable.borrow_and_update().progress(name).records;
                if records <= committed {
                    continue;
                }
                committed = records;
                json_line(&AckLine { stream: name, committed })
            }
            () = closed(&mut closing) => break,
        };
        if let Err(err) = output.write_all(line.as_bytes()).await {
            // The client closed the connection; it may reconnect later.
            tracing::debug!(stream = stream.as_deref().unwrap_or(""), error = %err, "cannot write a reply");
            break;
        }
    }
    let _ = output.shutdown().await;
}

/// Waits until the source closes. The borrow of the flag ends here, so the
/// caller's future stays `Send`.
async fn closed(closing: &mut watch::Receiver<bool>) {
    // The sender lives in `Shared`, which every caller holds.
    let _ = closing.wait_for(|closing| *closing).await;
}

fn json_line(value: &impl Serialize) -> String {
    let mut line = serde_json::to_string(value).expect("reply lines always serialize");
    line.push('\n');
    line
}

/// The reading side of one connection.
struct Connection {
    shared: Arc<Shared>,
    peer: String,
    replies: mpsc::UnboundedSender<Reply>,
    /// The stream's name, once its schema is read and the stream is open on
    /// this connection.
    stream: Option<Arc<str>>,
}

/// Record counts of a connection that ended without error.
struct Totals {
    /// Records of the stream accepted when the connection ended.
    accepted: u64,
    forwarded: u64,
    skipped: u64,
}

impl Connection {
    /// Reads the stream and forwards its new records. Returns an error
    /// message for the client on a protocol error.
    async fn read_stream<R: AsyncRead + Unpin>(&mut self, input: &mut R) -> Result<Totals, String> {
        let mut decoder = IpcDecoder::default();
        let Some(first) = next_message(input).await? else {
            return Ok(Totals { accepted: 0, forwarded: 0, skipped: 0 });
        };
        let Decoded::Schema(input_schema) = decoder.decode(first)? else {
            return Err(String::from("the stream must start with a schema message"));
        };
        let (requested, offset) = read_metadata(&input_schema)?;

        let name: Arc<str> = match requested {
            Some(name) => Arc::from(name),
            None => self.shared.fresh_stream_name(),
        };
        let committed = self.shared.durable.borrow().progress(&name).records;
        // The stream is taken before the first reply, so that once a client
        // has read that reply, no other connection can take the stream. A
        // connection that cannot take it gets the error alone.
        let open = OpenStream::open(&self.shared, name.clone())?;
        self.stream = Some(name.clone());
        let _ = self.replies.send(Reply::Opened { stream: name.clone(), committed });
        tracing::info!(peer = %self.peer, stream = %name, offset, committed, "socket stream opened");
        let settings = ColumnSettings {
            id_column: self.shared.config.id_column.as_deref(),
            columns: self.shared.config.columns.as_deref(),
            tensors: &self.shared.config.tensors,
        };
        let mut converter = Converter::new(
            &input_schema,
            &format!("stream {name:?}"),
            &settings,
            GeneratedKey::StreamPosition(name.clone()),
            offset,
        )
        .and_then(|converter| converter.with_origin(name.clone()))
        .map_err(|err| crate::runtime::error_chain(&err))?;
        let retype = self.shared.check_schema(&converter)?;

        let mut accepted = open.accepted;
        if offset > accepted {
            return Err(format!(
                "{OFFSET_METADATA_KEY} is {offset}, but stream {name:?} has only {accepted} records accepted, so records {accepted} to {} would be missing; resend from position {committed}, the committed count",
                offset - 1
            ));
        }

        let mut totals = Totals { accepted, forwarded: 0, skipped: 0 };
        let mut position = offset;
        // An error after the schema gives the client the position to resend from.
        let resend = |message: String, accepted: u64| {
            format!("{message}; stream {name:?} has {accepted} records accepted, so resend from position {accepted}")
        };
        while let Some(message) = next_message(input).await.map_err(|err| resend(err, accepted))? {
            let Decoded::Batch(batch) = decoder.decode(message).map_err(|err| resend(err, accepted))? else { continue };
            let rows = batch.num_rows() as u64;
            let start = position;
            position += rows;
            // `start <= accepted` stays true: the offset is checked above,
            // and each forwarded batch moves `accepted` to its end.
            let skip = rows.min(accepted - start);
            totals.skipped += skip;
            converter.skip(skip);
            if skip == rows {
                continue;
            }
            let data = batch.slice(skip as usize, (rows - skip) as usize);
            let mut batch =
                converter.convert(data).map_err(|err| resend(crate::runtime::error_chain(&err), accepted))?;
            if let Some(expected) = &retype {
                batch.data = RecordBatch::try_new(expected.clone(), batch.data.columns().to_vec()).map_err(|err| {
                    resend(
                        format!(
                            "records from position {} on do not fit the first connection's columns: {err}; every connection must send the same columns as the first",
                            start + skip
                        ),
                        accepted,
                    )
                })?;
            }
            batch.marks.push(Mark { unit: name.clone(), records: position, complete: false });
            if self.shared.batches.send(batch).await.is_err() {
                return Err(String::from("the daemon is shutting down; resend after it restarts"));
            }
            accepted = position;
            open.set_accepted(accepted);
            totals.forwarded += rows - skip;
        }
        totals.accepted = accepted;
        Ok(totals)
    }
}

/// Reads the stream name and offset from the schema metadata.
fn read_metadata(schema: &Schema) -> Result<(Option<String>, u64), String> {
    let metadata = schema.metadata();
    let name = match metadata.get(STREAM_METADATA_KEY) {
        Some(name) if name.is_empty() => {
            return Err(format!(
                "schema metadata {STREAM_METADATA_KEY} is empty; give the stream a name or leave it out"
            ));
        }
        Some(name) if is_connection_name(name) => {
            return Err(format!(
                "schema metadata {STREAM_METADATA_KEY} is {name:?}, but names of the form connection-N are given to connections without a stream name; choose another name"
            ));
        }
        Some(name) => Some(name.clone()),
        None => None,
    };
    let offset = match metadata.get(OFFSET_METADATA_KEY) {
        Some(text) => text.trim().parse().map_err(|_| {
            format!(
                "schema metadata {OFFSET_METADATA_KEY} is {text:?}, but it must be a record position: a non-negative integer"
            )
        })?,
        None => 0,
    };
    Ok((name, offset))
}

/// One IPC message: its flatbuffer metadata and its body.
struct RawMessage {
    metadata: Vec<u8>,
    body: Vec<u8>,
}

/// Reads one IPC message with its length prefix. Returns `None` at the end
/// of the input or at the end-of-stream marker.
async fn next_message<R: AsyncRead + Unpin>(input: &mut R) -> Result<Option<RawMessage>, String> {
    let truncated = |read: u64, expected: u64| {
        format!("the stream ended inside an IPC message, after {read} of its {expected} bytes")
    };
    let read_error = |err: std::io::Error| format!("cannot read from the connection: {err}");

    let mut prefix = [0u8; 4];
    let read = read_up_to(input, &mut prefix).await.map_err(read_error)?;
    if read == 0 {
        return Ok(None);
    }
    if read < 4 {
        return Err(truncated(read as u64, 4));
    }
    // Streams written before Arrow 0.15 have no continuation marker, and
    // their first word is the length.
    let mut prefix_length = 4;
    if prefix == CONTINUATION_MARKER {
        let read = read_up_to(input, &mut prefix).await.map_err(read_error)?;
        if read < 4 {
            return Err(truncated(4 + read as u64, 8));
        }
        prefix_length = 8;
    }
    let metadata_length = i32::from_le_bytes(prefix);
    if metadata_length == 0 {
        return Ok(None);
    }
    let metadata_length =
        u64::try_from(metadata_length).map_err(|_| format!("invalid IPC message length {metadata_length}"))?;
    if metadata_length > MAX_HEADER_BYTES {
        return Err(format!(
            "the connection did not send an Arrow IPC stream: its message header would be {metadata_length} bytes; send an Arrow IPC stream (schema, then record batches)"
        ));
    }

    let mut metadata = Vec::new();
    let read = (&mut *input).take(metadata_length).read_to_end(&mut metadata).await.map_err(read_error)?;
    let expected = prefix_length + metadata_length;
    if (read as u64) < metadata_length {
        return Err(truncated(prefix_length + read as u64, expected));
    }
    let body_length = arrow::ipc::root_as_message(&metadata)
        .map_err(|err| format!("invalid IPC message header: {err}"))?
        .bodyLength();
    let body_length =
        u64::try_from(body_length).map_err(|_| format!("invalid IPC message body length {body_length}"))?;
    if body_length > MAX_BODY_BYTES {
        return Err(format!(
            "a record batch of {body_length} bytes is over the limit of {MAX_BODY_BYTES} bytes; send smaller batches"
        ));
    }
    let mut body = Vec::new();
    let read = (&mut *input).take(body_length).read_to_end(&mut body).await.map_err(read_error)?;
    if (read as u64) < body_length {
        return Err(truncated(expected + read as u64, expected + body_length));
    }
    Ok(Some(RawMessage { metadata, body }))
}

/// Reads until `buffer` is full or the input ends, and returns the number
/// of bytes read.
async fn read_up_to<R: AsyncRead + Unpin>(input: &mut R, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match input.read(&mut buffer[filled..]).await? {
            0 => break,
            read => filled += read,
        }
    }
    Ok(filled)
}

/// Decodes the messages of one IPC stream, as arrow-rs `StreamReader` does.
/// arrow-rs `StreamDecoder` is not used because it holds back a message
/// with an empty body, such as the schema, until more bytes arrive
/// (arrow-ipc 60.1).
#[derive(Default)]
struct IpcDecoder {
    schema: Option<SchemaRef>,
    dictionaries: HashMap<i64, ArrayRef>,
}

enum Decoded {
    Schema(SchemaRef),
    Batch(RecordBatch),
    /// A dictionary batch, kept for the record batches that follow it.
    Dictionary,
}

impl IpcDecoder {
    fn decode(&mut self, message: RawMessage) -> Result<Decoded, String> {
        let invalid = |err: arrow::error::ArrowError| format!("cannot decode an IPC message: {err}");
        let header = arrow::ipc::root_as_message(&message.metadata)
            .map_err(|err| format!("invalid IPC message header: {err}"))?;
        let body = Buffer::from(message.body);
        let version = header.version();
        match header.header_type() {
            MessageHeader::Schema => {
                if self.schema.is_some() {
                    return Err(String::from("the stream contains a second schema message"));
                }
                let fields = header.header_as_schema().ok_or("the schema message has no schema")?;
                let schema = Arc::new(arrow::ipc::convert::try_fb_to_schema(fields).map_err(invalid)?);
                self.schema = Some(schema.clone());
                Ok(Decoded::Schema(schema))
            }
            MessageHeader::RecordBatch => {
                let schema = self.schema.clone().ok_or("a record batch came before the schema message")?;
                let batch = header.header_as_record_batch().ok_or("the record batch message has no batch")?;
                let batch =
                    arrow::ipc::reader::read_record_batch(&body, batch, schema, &self.dictionaries, None, &version)
                        .map_err(invalid)?;
                Ok(Decoded::Batch(batch))
            }
            MessageHeader::DictionaryBatch => {
                let schema = self.schema.clone().ok_or("a dictionary batch came before the schema message")?;
                let dictionary =
                    header.header_as_dictionary_batch().ok_or("the dictionary message has no dictionary")?;
                arrow::ipc::reader::read_dictionary(&body, dictionary, &schema, &mut self.dictionaries, &version)
                    .map_err(invalid)?;
                Ok(Decoded::Dictionary)
            }
            other => Err(format!("unsupported IPC message type {other:?}; send a schema, then record batches")),
        }
    }
}

impl Shared {
    /// Returns a `connection-N` name that no stream in this process or in
    /// the durable checkpoint has.
    fn fresh_stream_name(&self) -> Arc<str> {
        let durable = self.durable.borrow().clone();
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.last_connection = streams.last_connection.max(durable.last_connection);
        loop {
            streams.last_connection += 1;
            let name = connection_name(streams.last_connection);
            if !streams.by_name.contains_key(&name) && !durable.units.contains_key(&name) {
                let name: Arc<str> = Arc::from(name);
                streams.serving.insert(name.clone());
                return name;
            }
        }
    }

    /// Marks the connection of a generated name as closed, so the
    /// checkpoint drops the name at its next commit.
    fn close_generated(&self, name: &str) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.serving.remove(name);
    }

    /// Takes the first connection's converted schema as the source's, or
    /// checks that a later connection's matches it. A schema that differs
    /// from the source's in nullability alone is accepted, and the source's
    /// schema is returned for its batches. A null where that schema has none
    /// then ends the connection with an error.
    fn check_schema(&self, converter: &Converter) -> Result<Option<SchemaRef>, String> {
        let schema = converter.schema();
        if self.schema.borrow().is_none() {
            let check = self.schema_check.lock().expect("the schema check lock is never poisoned").clone();
            if let Some(check) = check {
                // Planning loads the models, so it leaves the async worker thread.
                tokio::task::block_in_place(|| check(&schema, converter.key_column()))
                    .map_err(|reason| format!("the stream's columns do not fit the pipeline: {reason}"))?;
            }
        }
        let mut mismatch = None;
        let mut retype = None;
        self.schema.send_if_modified(|expected| match expected {
            None => {
                *expected = Some((schema.clone(), converter.key_column().to_string()));
                true
            }
            Some((expected, key_column)) => {
                let differs = expected.fields() != schema.fields();
                if differs && key_column == converter.key_column() && same_but_nullability(expected, &schema) {
                    retype = Some(expected.clone());
                } else if differs {
                    mismatch = Some(format!(
                        "the stream's columns differ from those of the first connection ({}); every connection must send the same columns as the first",
                        super::column_difference(expected, &schema)
                    ));
                } else if key_column != converter.key_column() {
                    mismatch = Some(format!(
                        "the stream's key column is {}, but the first connection's is {key_column}; every connection must send the same columns as the first",
                        converter.key_column()
                    ));
                }
                false
            }
        });
        mismatch.map_or(Ok(retype), Err)
    }
}

/// A stream that a connection is sending; no other connection may send it
/// until this is dropped.
struct OpenStream {
    shared: Arc<Shared>,
    name: Arc<str>,
    /// Records of the stream accepted before the connection.
    accepted: u64,
}

impl OpenStream {
    fn open(shared: &Arc<Shared>, name: Arc<str>) -> Result<Self, String> {
        let durable = shared.durable.borrow().clone();
        let mut streams = shared.streams.lock().unwrap_or_else(PoisonError::into_inner);
        // Streams whose accepted records are all durable need no entry, and
        // nor do closed generated ones, which no connection can resume.
        streams.by_name.retain(|name, state| {
            state.open || (!is_connection_name(name) && state.accepted > durable.progress(name).records)
        });
        let state = streams.by_name.entry(name.to_string()).or_default();
        if state.open {
            return Err(format!(
                "stream {name:?} is open on another connection; close that one first, or give this one another {STREAM_METADATA_KEY} name"
            ));
        }
        state.open = true;
        state.accepted = state.accepted.max(durable.progress(&name).records);
        let accepted = state.accepted;
        drop(streams);
        Ok(Self { shared: shared.clone(), name, accepted })
    }

    fn set_accepted(&self, accepted: u64) {
        let mut streams = self.shared.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = streams.by_name.get_mut(&*self.name) {
            state.accepted = accepted;
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut streams = self.shared.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = streams.by_name.get_mut(&*self.name) {
            state.open = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader as StdBufReader, Read, Write};
    use std::net::{Shutdown, TcpStream as StdTcpStream};
    use std::ops::Range;
    use std::os::unix::net::UnixStream as StdUnixStream;
    use std::sync::atomic::AtomicU64;

    use arrow::array::{Array, AsArray, Int64Array, ListArray, StringArray};
    use arrow::datatypes::{DataType, Field, Float32Type};
    use arrow::ipc::writer::StreamWriter;
    use serde_json::{Value, json};

    use super::*;
    use crate::config::TensorShapeConfig;

    /// Maximum wait for anything the source should do promptly.
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn config(listen: &str) -> SocketSourceConfig {
        SocketSourceConfig {
            listen: listen.to_string(),
            id_column: None,
            columns: None,
            tensors: BTreeMap::from([(String::from("x"), TensorShapeConfig { shape: vec![2] })]),
        }
    }

    fn start(config: &SocketSourceConfig, durable: Checkpoint) -> (SocketSource, watch::Sender<Arc<Checkpoint>>) {
        let (sender, receiver) = watch::channel(Arc::new(durable));
        let source = SocketSource::new(config, receiver).unwrap_or_else(|err| panic!("cannot start: {err}"));
        (source, sender)
    }

    fn checkpoint(progress: &[(&str, u64)]) -> Checkpoint {
        let mut checkpoint = Checkpoint::new();
        for &(unit, records) in progress {
            checkpoint.apply(&Mark { unit: Arc::from(unit), records, complete: false });
        }
        checkpoint
    }

    /// Builds the schema the test clients send: an `id` column and a list
    /// column `x`.
    fn schema(stream: Option<&str>, offset: Option<u64>) -> SchemaRef {
        let mut metadata = HashMap::new();
        if let Some(stream) = stream {
            metadata.insert(STREAM_METADATA_KEY.to_string(), stream.to_string());
        }
        if let Some(offset) = offset {
            metadata.insert(OFFSET_METADATA_KEY.to_string(), offset.to_string());
        }
        let item = Arc::new(Field::new("item", DataType::Float32, true));
        let fields = vec![Field::new("id", DataType::Int64, true), Field::new("x", DataType::List(item), true)];
        Arc::new(Schema::new(fields).with_metadata(metadata))
    }

    /// Rows with ids `ids` and `x = [id, id]`; the ids in `wrong_length`
    /// get three values instead of two.
    fn records(schema: &SchemaRef, ids: Range<i64>, wrong_length: &[i64]) -> RecordBatch {
        let lists = ids.clone().map(|id| {
            let length = if wrong_length.contains(&id) { 3 } else { 2 };
            Some(vec![Some(id as f32); length])
        });
        let x = ListArray::from_iter_primitive::<Float32Type, _, _>(lists);
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from_iter_values(ids)), Arc::new(x)]).unwrap()
    }

    /// Writes an IPC stream. Returns its bytes and the length written after
    /// the schema and after each batch.
    fn encode(schema: &SchemaRef, batches: &[RecordBatch]) -> (Vec<u8>, Vec<usize>) {
        let mut writer = StreamWriter::try_new(Vec::new(), schema).unwrap();
        let mut ends = vec![writer.get_ref().len()];
        for batch in batches {
            writer.write(batch).unwrap();
            ends.push(writer.get_ref().len());
        }
        writer.finish().unwrap();
        (writer.into_inner().unwrap(), ends)
    }

    /// A blocking client. The test body runs outside the runtime's worker
    /// threads, so blocking there does not stall the source.
    struct Client {
        input: StdBufReader<Box<dyn Read + Send>>,
        output: Box<dyn Write + Send>,
        close_write: Box<dyn Fn() + Send>,
    }

    impl Client {
        fn connect(address: &str) -> Self {
            match address.strip_prefix("unix:") {
                Some(path) => {
                    let socket = StdUnixStream::connect(path).unwrap();
                    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
                    let closer = socket.try_clone().unwrap();
                    Client {
                        output: Box::new(socket.try_clone().unwrap()),
                        input: StdBufReader::new(Box::new(socket)),
                        close_write: Box::new(move || closer.shutdown(Shutdown::Write).unwrap()),
                    }
                }
                None => {
                    let socket = StdTcpStream::connect(address).unwrap();
                    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
                    let closer = socket.try_clone().unwrap();
                    Client {
                        output: Box::new(socket.try_clone().unwrap()),
                        input: StdBufReader::new(Box::new(socket)),
                        close_write: Box::new(move || closer.shutdown(Shutdown::Write).unwrap()),
                    }
                }
            }
        }

        /// Connects, sends `bytes` and closes the write side.
        fn send(address: &str, bytes: &[u8]) -> Self {
            let mut client = Client::connect(address);
            client.output.write_all(bytes).unwrap();
            (client.close_write)();
            client
        }

        /// Reads one reply line; `None` once the daemon closed the connection.
        fn reply(&mut self) -> Option<Value> {
            let mut line = String::new();
            match self.input.read_line(&mut line).unwrap() {
                0 => None,
                _ => Some(serde_json::from_str(&line).unwrap()),
            }
        }

        /// Reads the error reply that must come next.
        fn error(&mut self) -> String {
            let reply = self.reply().expect("an error reply");
            reply["error"].as_str().unwrap_or_else(|| panic!("expected an error reply, got {reply}")).to_string()
        }
    }

    fn ack(stream: &str, committed: u64) -> Option<Value> {
        Some(json!({ "stream": stream, "committed": committed }))
    }

    /// `SocketSource::run` on a blocking thread.
    struct Running {
        stop: Arc<AtomicBool>,
        task: tokio::task::JoinHandle<SocketSource>,
        output: mpsc::Receiver<Batch>,
        records: Arc<AtomicU64>,
    }

    impl Running {
        fn start(mut source: SocketSource, capacity: usize) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let records = Arc::new(AtomicU64::new(0));
            let (sender, output) = mpsc::channel(capacity);
            let (stop_flag, counter) = (stop.clone(), records.clone());
            let task = tokio::task::spawn_blocking(move || {
                let count = |n: u64| {
                    counter.fetch_add(n, Ordering::SeqCst);
                };
                source.run(&Checkpoint::new(), &sender, &stop_flag, &count).unwrap();
                source
            });
            Running { stop, task, output, records }
        }

        async fn next(&mut self) -> Batch {
            tokio::time::timeout(TIMEOUT, self.output.recv()).await.expect("a batch in time").expect("an open output")
        }

        /// Returns a batch if one arrives within half a second.
        async fn try_next(&mut self) -> Option<Batch> {
            tokio::time::timeout(Duration::from_millis(500), self.output.recv()).await.ok().flatten()
        }

        async fn stop(self) -> (SocketSource, mpsc::Receiver<Batch>) {
            self.stop.store(true, Ordering::SeqCst);
            let source = tokio::time::timeout(TIMEOUT, self.task).await.expect("run returns on stop").unwrap();
            (source, self.output)
        }
    }

    fn keys(batch: &Batch) -> Vec<String> {
        let column = batch.data.column_by_name("key").expect("a key column").as_string::<i32>();
        (0..column.len()).map(|row| column.value(row).to_string()).collect()
    }

    fn mark(unit: &str, records: u64) -> Vec<Mark> {
        vec![Mark { unit: Arc::from(unit), records, complete: false }]
    }

    /// Waits until no connection sends `stream`, so that another may.
    async fn wait_until_closed(shared: &Shared, stream: &str) {
        let closed = || {
            let streams = shared.streams.lock().unwrap();
            streams.by_name.get(stream).is_none_or(|state| !state.open)
        };
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !closed() {
            assert!(tokio::time::Instant::now() < deadline, "stream {stream} still open");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_forwards_records_with_marks() {
        let (source, _durable) = start(&config("127.0.0.1:0"), Checkpoint::new());
        let address = source.address().to_string();
        let schema = schema(Some("sensor"), None);
        let (bytes, _) = encode(&schema, &[records(&schema, 0..3, &[1]), records(&schema, 3..5, &[])]);
        let mut client = Client::send(&address, &bytes);
        assert_eq!(client.reply(), ack("sensor", 0));

        let (source, found) = tokio::task::spawn_blocking(move || {
            let mut source = source;
            let found = source.wait_for_schema(&Checkpoint::new(), &AtomicBool::new(false)).unwrap();
            (source, found)
        })
        .await
        .unwrap();
        let (found_schema, key_column) = found.expect("a schema");
        assert_eq!(key_column, "key");
        let names: Vec<&str> = found_schema.fields().iter().map(|field| field.name().as_str()).collect();
        assert_eq!(names, ["key", "id", "x", "origin"], "the origin column comes last");
        assert_eq!(found_schema.field(2).data_type(), &DataType::new_fixed_size_list(DataType::Float32, 2, false));

        let mut running = Running::start(source, 8);
        let first = running.next().await;
        assert_eq!(keys(&first), ["sensor:0", "sensor:2"]);
        assert_eq!(first.rejected.len(), 1);
        assert_eq!(first.rejected[0].key, "sensor:1");
        assert_eq!(first.rejected[0].origin.as_deref(), Some("sensor"), "a rejection names its stream");
        assert_eq!(first.rejected[0].component, "source");
        assert_eq!(first.marks, mark("sensor", 3));
        assert_eq!(*first.data.schema(), *found_schema);

        let second = running.next().await;
        assert_eq!(keys(&second), ["sensor:3", "sensor:4"]);
        assert!(second.rejected.is_empty());
        assert_eq!(second.marks, mark("sensor", 5));
        assert_eq!(running.records.load(Ordering::SeqCst), 5);
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_acks_durable_records() {
        let (source, durable) = start(&config("127.0.0.1:0"), Checkpoint::new());
        let schema = schema(Some("sensor"), None);
        let (bytes, _) = encode(&schema, &[records(&schema, 0..3, &[]), records(&schema, 3..5, &[])]);
        let mut client = Client::send(source.address(), &bytes);
        assert_eq!(client.reply(), ack("sensor", 0));

        let mut running = Running::start(source, 8);
        running.next().await;
        running.next().await;
        durable.send_replace(Arc::new(checkpoint(&[("other", 7), ("sensor", 3)])));
        assert_eq!(client.reply(), ack("sensor", 3));
        durable.send_replace(Arc::new(checkpoint(&[("other", 9), ("sensor", 5)])));
        assert_eq!(client.reply(), ack("sensor", 5));
        assert_eq!(client.reply(), None, "the connection closes once all its records are durable");
        running.stop().await;
    }

    /// Closing the source after a commit gives each open connection an ack
    /// for what that commit made durable, then closes it, also when its
    /// client is still sending. On one runtime thread, no connection task
    /// runs between the commit and the close, so the ack comes from the
    /// close alone.
    #[tokio::test(flavor = "current_thread")]
    async fn socket_close_sends_last_ack() {
        let (source, durable) = start(&config("127.0.0.1:0"), Checkpoint::new());
        let schema = schema(Some("sensor"), None);
        let (bytes, ends) = encode(&schema, &[records(&schema, 0..3, &[])]);
        let mut client = Client::connect(source.address());
        client.output.write_all(&bytes[..ends[1]]).unwrap();
        // The client blocks, so it reads on a blocking thread.
        let read_replies = |mut client: Client, count: usize| {
            tokio::task::spawn_blocking(move || {
                let replies: Vec<Option<Value>> = (0..count).map(|_| client.reply()).collect();
                (client, replies)
            })
        };
        let (client, replies) = read_replies(client, 1).await.unwrap();
        assert_eq!(replies, [ack("sensor", 0)]);

        let mut running = Running::start(source, 8);
        assert_eq!(running.next().await.marks, mark("sensor", 3));
        let (source, _output) = running.stop().await;
        durable.send_replace(Arc::new(checkpoint(&[("sensor", 3)])));
        tokio::time::timeout(TIMEOUT, source.close()).await.expect("the source closes in time");
        // Read on this thread, which stops the runtime: the replies must
        // have been written when `close` returned.
        let mut client = client;
        assert_eq!(client.reply(), ack("sensor", 3), "the last commit is acked before the connection closes");
        assert_eq!(client.reply(), None, "the connection closes after the last ack");
    }

    /// A connection without a stream name keeps its entry in the checkpoint
    /// until it has every ack, and then loses it. The next such connection
    /// gets a new number, also after a restart on the same checkpoint.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_generated_names_leave_checkpoint() {
        let mut earlier = checkpoint(&[("named", 4)]);
        earlier.last_connection = 7;
        let (source, durable) = start(&config("127.0.0.1:0"), earlier);
        let keep = source.keeps_unit();
        let progress = crate::sink::checkpoint::UnitProgress::default();
        let schema = schema(None, None);
        let (bytes, _) = encode(&schema, &[records(&schema, 0..2, &[])]);
        let mut client = Client::send(source.address(), &bytes);
        assert_eq!(client.reply(), ack("connection-8", 0), "numbers continue from the checkpoint's count");
        assert!(keep("connection-8", &progress), "an open connection's entry stays");
        assert!(!keep("connection-3", &progress), "an entry without a connection goes");
        assert!(keep("named", &progress), "named streams stay");

        let mut running = Running::start(source, 8);
        assert_eq!(running.next().await.marks, mark("connection-8", 2));
        let mut after = checkpoint(&[("named", 4), ("connection-8", 2)]);
        durable.send_replace(Arc::new(after.clone()));
        assert_eq!(client.reply(), ack("connection-8", 2));
        assert_eq!(client.reply(), None, "the connection closes once all its records are durable");
        let closed = async {
            while keep("connection-8", &progress) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(TIMEOUT, closed).await.expect("the entry goes once the connection closes");
        after.retain_units(&keep);
        assert_eq!(after.units.keys().collect::<Vec<_>>(), ["named"]);
        assert_eq!(after.last_connection, 8);
        running.stop().await;

        // A restart on that checkpoint, which no longer lists connection-8.
        let (source, _durable) = start(&config("127.0.0.1:0"), after);
        let mut client = Client::send(source.address(), &bytes);
        assert_eq!(client.reply(), ack("connection-9", 0), "a dropped name is not given again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_rejects_reserved_name() {
        let (source, _durable) = start(&config("127.0.0.1:0"), Checkpoint::new());
        let schema = schema(Some("connection-2"), None);
        let (bytes, _) = encode(&schema, &[records(&schema, 0..2, &[])]);
        let mut client = Client::send(source.address(), &bytes);
        let error = client.error();
        assert!(error.contains("\"connection-2\""), "{error}");
        assert!(error.contains("choose another name"), "{error}");
        assert_eq!(client.reply(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_resend_skips_accepted_records() {
        let (source, _durable) = start(&config("127.0.0.1:0"), Checkpoint::new());
        let address = source.address().to_string();
        let shared = source.shared.clone();
        let mut running = Running::start(source, 8);

        let first_schema = schema(Some("s"), None);
        let (bytes, _) = encode(&first_schema, &[records(&first_schema, 0..5, &[])]);
        let mut first = Client::send(&address, &bytes);
        assert_eq!(first.reply(), ack("s", 0));
        assert_eq!(running.next().await.marks, mark("s", 5));
        wait_until_closed(&shared, "s").await;

        // Records 0 to 4 are accepted but not durable: the resend from 0
        // forwards only records 5 to 7.
        let resend_schema = schema(Some("s"), Some(0));
        let batches = [
            records(&resend_schema, 0..3, &[]),
            records(&resend_schema, 3..6, &[]),
            records(&resend_schema, 6..8, &[]),
        ];
        let (bytes, _) = encode(&resend_schema, &batches);
        let mut resend = Client::send(&address, &bytes);
        assert_eq!(resend.reply(), ack("s", 0));
        let batch = running.next().await;
        assert_eq!(keys(&batch), ["s:5"]);
        assert_eq!(batch.data.column_by_name("id").unwrap().as_primitive::<arrow::datatypes::Int64Type>().value(0), 5);
        assert_eq!(batch.marks, mark("s", 6));
        let batch = running.next().await;
        assert_eq!(keys(&batch), ["s:6", "s:7"]);
        assert_eq!(batch.marks, mark("s", 8));
        wait_until_closed(&shared, "s").await;

        let gap_schema = schema(Some("s"), Some(10));
        let (bytes, _) = encode(&gap_schema, &[records(&gap_schema, 10..12, &[])]);
        let mut gap = Client::send(&address, &bytes);
        assert_eq!(gap.reply(), ack("s", 0));
        let error = gap.error();
        assert!(error.contains("is 10"), "{error}");
        assert!(error.contains("only 8 records accepted"), "{error}");
        assert_eq!(gap.reply(), None);
        assert!(running.try_next().await.is_none(), "records after a gap are not forwarded");
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_resend_after_restart_skips_durable() {
        let (source, _durable) = start(&config("127.0.0.1:0"), checkpoint(&[("s", 5)]));
        let schema = schema(Some("s"), Some(2));
        let (bytes, _) = encode(&schema, &[records(&schema, 2..8, &[])]);
        let mut client = Client::send(source.address(), &bytes);
        assert_eq!(client.reply(), ack("s", 5));

        let mut running = Running::start(source, 8);
        let batch = running.next().await;
        assert_eq!(keys(&batch), ["s:5", "s:6", "s:7"]);
        assert_eq!(batch.marks, mark("s", 8));
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_rejects_schema_mismatch() {
        let mut settings = config("127.0.0.1:0");
        settings.tensors.clear();
        let (source, _durable) = start(&settings, Checkpoint::new());
        let address = source.address().to_string();
        let mut running = Running::start(source, 8);

        let first_schema = schema(Some("a"), None);
        let (bytes, _) = encode(&first_schema, &[records(&first_schema, 0..2, &[])]);
        let mut first = Client::send(&address, &bytes);
        assert_eq!(first.reply(), ack("a", 0));
        running.next().await;

        let other_schema = Arc::new(
            Schema::new(vec![Field::new("id", DataType::Int64, true), Field::new("label", DataType::Utf8, true)])
                .with_metadata(HashMap::from([(STREAM_METADATA_KEY.to_string(), String::from("b"))])),
        );
        let batch = RecordBatch::try_new(
            other_schema.clone(),
            vec![Arc::new(Int64Array::from(vec![0])), Arc::new(StringArray::from(vec!["cat"]))],
        )
        .unwrap();
        let (bytes, _) = encode(&other_schema, &[batch]);
        let mut other = Client::send(&address, &bytes);
        assert_eq!(other.reply(), ack("b", 0));
        let error = other.error();
        assert!(error.contains("missing column \"x\""), "{error}");
        assert!(error.contains("extra column \"label\""), "{error}");
        assert_eq!(other.reply(), None);
        assert!(running.try_next().await.is_none(), "records of a mismatched stream are not forwarded");
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_rejects_second_open_stream() {
        let mut settings = config("127.0.0.1:0");
        settings.id_column = Some(String::from("id"));
        let (source, _durable) = start(&settings, Checkpoint::new());
        let address = source.address().to_string();
        let mut running = Running::start(source, 8);
        let schema = schema(Some("s"), None);
        let (bytes, ends) = encode(&schema, &[records(&schema, 0..2, &[])]);

        // The first connection sends its schema and stays open.
        let mut first = Client::connect(&address);
        first.output.write_all(&bytes[..ends[0]]).unwrap();
        assert_eq!(first.reply(), ack("s", 0));

        // The second connection gets the error without an ack first.
        let mut second = Client::send(&address, &bytes);
        let error = second.error();
        assert!(error.contains("open on another connection"), "{error}");
        assert_eq!(second.reply(), None);

        first.output.write_all(&bytes[ends[0]..]).unwrap();
        (first.close_write)();
        let batch = running.next().await;
        let ids = batch.data.column_by_name("id").unwrap().as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(ids.values(), &[0, 1]);
        assert!(batch.data.column_by_name("key").is_none(), "the id column is the key");
        assert_eq!(batch.marks, mark("s", 2));
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_rejects_invalid_offset() {
        let (source, _durable) = start(&config("127.0.0.1:0"), Checkpoint::new());
        let schema = Arc::new(
            Schema::new(vec![Field::new("id", DataType::Int64, true)])
                .with_metadata(HashMap::from([(OFFSET_METADATA_KEY.to_string(), String::from("-3"))])),
        );
        let (bytes, _) = encode(&schema, &[]);
        let mut client = Client::send(source.address(), &bytes);
        let error = client.error();
        assert!(error.contains("\"-3\""), "{error}");
        assert_eq!(client.reply(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_rejects_non_loopback_address() {
        for listen in ["0.0.0.0:0", "192.0.2.10:7000", "[::]:0"] {
            let (_sender, receiver) = watch::channel(Arc::new(Checkpoint::new()));
            let Err(err) = SocketSource::new(&config(listen), receiver) else {
                panic!("{listen} was accepted");
            };
            assert_eq!(err.config_path(), Some("source.listen"), "{listen}");
            assert!(err.to_string().contains("no authentication"), "{listen}: {err}");
        }
        let (_sender, receiver) = watch::channel(Arc::new(Checkpoint::new()));
        let Err(err) = SocketSource::new(&config("localhost:7000"), receiver) else {
            panic!("a host name was accepted");
        };
        assert!(err.to_string().contains("invalid address"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_truncated_stream_keeps_earlier_records() {
        let (source, _durable) = start(&config("127.0.0.1:0"), Checkpoint::new());
        let address = source.address().to_string();
        let mut running = Running::start(source, 8);
        let schema = schema(Some("cut"), None);
        let (bytes, ends) = encode(&schema, &[records(&schema, 0..3, &[]), records(&schema, 3..6, &[])]);

        let cut = ends[1] + (ends[2] - ends[1]) / 2;
        let mut client = Client::send(&address, &bytes[..cut]);
        assert_eq!(client.reply(), ack("cut", 0));
        let error = client.error();
        assert!(error.contains("ended inside an IPC message"), "{error}");
        assert!(error.contains("resend from position 3"), "{error}");
        assert_eq!(client.reply(), None);
        let batch = running.next().await;
        assert_eq!(keys(&batch), ["cut:0", "cut:1", "cut:2"]);
        assert_eq!(batch.marks, mark("cut", 3));
        assert!(running.try_next().await.is_none(), "a cut batch is not forwarded");

        // A header that is not a valid IPC message after the first batch.
        let schema = self::schema(Some("corrupt"), None);
        let (bytes, ends) = encode(&schema, &[records(&schema, 0..3, &[])]);
        let mut corrupt = bytes[..ends[1]].to_vec();
        corrupt.extend_from_slice(&CONTINUATION_MARKER);
        corrupt.extend_from_slice(&16i32.to_le_bytes());
        corrupt.extend_from_slice(&[0xab; 16]);
        let mut client = Client::send(&address, &corrupt);
        assert_eq!(client.reply(), ack("corrupt", 0));
        let error = client.error();
        assert!(error.contains("invalid IPC message header"), "{error}");
        assert_eq!(keys(&running.next().await), ["corrupt:0", "corrupt:1", "corrupt:2"]);

        // An HTTP request where an IPC stream belongs.
        let mut client = Client::send(&address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let error = client.error();
        assert!(error.contains("did not send an Arrow IPC stream"), "{error}");
        assert_eq!(client.reply(), None, "the connection is closed after the error");
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_unix_replaces_stale_socket() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("run").join("stochflow.sock");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a stale socket file is left behind");

        let (source, _durable) = start(&config(&format!("unix:{}", path.display())), Checkpoint::new());
        assert_eq!(source.address(), format!("unix:{}", path.display()));
        let schema = schema(None, None);
        let (bytes, _) = encode(&schema, &[records(&schema, 0..2, &[])]);
        let mut client = Client::send(source.address(), &bytes);
        assert_eq!(client.reply(), ack("connection-1", 0));

        let mut running = Running::start(source, 8);
        let batch = running.next().await;
        assert_eq!(keys(&batch), ["connection-1:0", "connection-1:1"]);
        assert_eq!(batch.marks, mark("connection-1", 2));
        let (source, _) = running.stop().await;
        drop(source);
        assert!(!path.exists(), "the socket file is removed with the source");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_run_resumes_after_stop() {
        let (source, _durable) = start(&config("127.0.0.1:0"), Checkpoint::new());
        let schema = schema(Some("s"), None);
        let batches: Vec<RecordBatch> = (0..4).map(|id| records(&schema, id..id + 1, &[])).collect();
        let (bytes, _) = encode(&schema, &batches);
        let mut client = Client::send(source.address(), &bytes);
        assert_eq!(client.reply(), ack("s", 0));

        // The output has room for one batch, so `run` waits with the second
        // in hand when it is stopped.
        let running = Running::start(source, 1);
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while running.records.load(Ordering::SeqCst) < 1 {
            assert!(tokio::time::Instant::now() < deadline, "no batch forwarded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (source, mut first_output) = running.stop().await;
        assert!(source.pending.is_some(), "run stopped with a batch in hand");
        let mut marks = vec![first_output.recv().await.unwrap().marks];
        assert!(first_output.recv().await.is_none());

        let mut running = Running::start(source, 1);
        for _ in 0..3 {
            marks.push(running.next().await.marks);
        }
        assert_eq!(marks, [mark("s", 1), mark("s", 2), mark("s", 3), mark("s", 4)]);
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_buffers_at_most_channel_batches() {
        let (source, _durable) = start(&config("127.0.0.1:0"), Checkpoint::new());
        let schema = schema(Some("s"), None);
        let batches: Vec<RecordBatch> = (0..20).map(|id| records(&schema, id..id + 1, &[])).collect();
        let (bytes, _) = encode(&schema, &batches);
        let mut client = Client::send(source.address(), &bytes);
        assert_eq!(client.reply(), ack("s", 0));

        // Without `run`, the connection stops once the channel is full.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(source.batches.len(), CHANNEL_BATCHES);

        let mut running = Running::start(source, 1);
        for records in 1..=20 {
            assert_eq!(running.next().await.marks, mark("s", records));
        }
        running.stop().await;
    }

    #[test]
    fn wait_for_schema_returns_on_stop() {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        let (_sender, receiver) = watch::channel(Arc::new(Checkpoint::new()));
        let mut source = runtime.block_on(async { SocketSource::new(&config("127.0.0.1:0"), receiver) }).unwrap();
        let found = source.wait_for_schema(&Checkpoint::new(), &AtomicBool::new(true)).unwrap();
        assert!(found.is_none());
    }
}
