//! `stochflow daemon` with a `socket` source, end to end. Each test starts
//! the real binary on the digits pipeline and sends Arrow IPC streams from
//! arrow-rs `StreamWriter` (or pyarrow) over a loopback TCP port or a Unix
//! socket. It reads the newline-delimited JSON acks from the same
//! connection, then checks the committed files against the acks and against
//! a `stochflow run` over the same records.
//!
//! Output files rotate every 64 records (320 rows), so a stream of a few
//! hundred records is committed, and acknowledged, in several steps.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::ipc::writer::StreamWriter;
use serde_json::Value;

use crate::common::{int64, strings, yaml_path};
use crate::daemon_support::*;

/// Records per batch that the Rust clients send.
const CLIENT_BATCH: usize = 25;
/// Records in the digits fixture.
const DIGITS: usize = 450;

// ---------------------------------------------------------------------------
// The daemon

/// Where the socket source listens.
enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

impl Listen {
    /// Returns the `source.listen` value.
    fn address(&self) -> String {
        match self {
            Listen::Tcp(port) => format!("127.0.0.1:{port}"),
            Listen::Unix(path) => format!("unix:{}", path.display()),
        }
    }
}

/// A test's daemon setup: a temporary directory with the pipeline file, the
/// output directory and the daemon logs.
struct Setup {
    root: tempfile::TempDir,
    pipeline: PathBuf,
    output: PathBuf,
    listen: Listen,
    http_port: u16,
}

/// Creates a temporary directory with a daemon pipeline: a socket source,
/// keyed by the `id` column, that reads `pixels` as a float32 tensor of
/// shape [64], and the digits stages. Files are committed every 64 records
/// or 100 ms.
fn setup(unix_socket: bool) -> Setup {
    let root = tempfile::tempdir().expect("a temporary directory is created");
    let output = root.path().join("out");
    let listen = if unix_socket {
        Listen::Unix(root.path().join("run").join("stochflow.sock"))
    } else {
        Listen::Tcp(free_port())
    };
    let http_port = free_port();
    let yaml = format!(
        r#"seed: 42
source:
  kind: socket
  listen: {listen:?}
  id_column: id
  tensors: {{pixels: {{shape: [64]}}}}
{stages}sink: {{kind: arrow_file, path: {output}, columns: [id, origin, logits, sample, class]}}
daemon:
  rotate: {{rows: {rotate_rows}, age_ms: 100}}
  http: "127.0.0.1:{http_port}"
  drain_timeout_ms: 10000
"#,
        listen = listen.address(),
        stages = digits_stages_yaml(0.1, &mlp()),
        output = yaml_path(&output),
        rotate_rows = 64 * SAMPLES,
    );
    let pipeline = root.path().join("socket.yaml");
    std::fs::write(&pipeline, yaml).expect("the pipeline file is written");
    Setup { root, pipeline, output, listen, http_port }
}

impl Setup {
    /// Starts the daemon with its standard error in `NAME.log`, and waits
    /// until it serves `/healthz` and its socket listens.
    fn start(&self, name: &str) -> Daemon {
        let log = self.root.path().join(format!("{name}.log"));
        let mut daemon = Daemon::start(&self.pipeline, Some(self.http_port), &log);
        daemon.wait_healthy();
        daemon.wait_log("socket source listening");
        daemon
    }

    fn connect(&self) -> Client {
        Client::connect(&self.listen)
    }

    /// Returns the committed count of `stream` in the first reply of a new
    /// connection that sends no records. The daemon closes that connection
    /// once every record of the stream it accepted earlier is durable, and
    /// acks them first.
    fn committed_count(&self, stream: &str) -> u64 {
        let mut probe = self.connect();
        probe.start_stream(&stream_schema(stream, None));
        probe.end_stream();
        let committed = probe.ack(stream);
        let later = probe.acks_until_closed(stream);
        assert!(later.iter().all(|&ack| ack > committed), "later acks rise past {committed}: {later:?}");
        committed
    }
}

// ---------------------------------------------------------------------------
// Clients

/// A connected TCP or Unix socket.
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn connect(listen: &Listen) -> Socket {
        match listen {
            Listen::Tcp(port) => Socket::Tcp(
                TcpStream::connect(("127.0.0.1", *port))
                    .unwrap_or_else(|err| panic!("cannot connect to the socket source on 127.0.0.1:{port}: {err}")),
            ),
            Listen::Unix(path) => Socket::Unix(
                UnixStream::connect(path)
                    .unwrap_or_else(|err| panic!("cannot connect to the socket source on {}: {err}", path.display())),
            ),
        }
    }

    fn try_clone(&self) -> Socket {
        match self {
            Socket::Tcp(socket) => Socket::Tcp(socket.try_clone().expect("the TCP socket can be cloned")),
            Socket::Unix(socket) => Socket::Unix(socket.try_clone().expect("the Unix socket can be cloned")),
        }
    }

    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match self {
            Socket::Tcp(socket) => socket.shutdown(how),
            Socket::Unix(socket) => socket.shutdown(how),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(socket) => socket.read(buffer),
            Socket::Unix(socket) => socket.read(buffer),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(socket) => socket.write(buffer),
            Socket::Unix(socket) => socket.write(buffer),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Socket::Tcp(socket) => socket.flush(),
            Socket::Unix(socket) => socket.flush(),
        }
    }
}

/// A client of the socket source. It writes an Arrow IPC stream with
/// arrow-rs `StreamWriter` (or raw bytes), while a thread reads the reply
/// lines of the same connection.
struct Client {
    socket: Socket,
    writer: Option<StreamWriter<BufWriter<Socket>>>,
    /// Reply lines as JSON; the channel closes when the daemon closes the
    /// connection.
    replies: mpsc::Receiver<Value>,
}

impl Client {
    fn connect(listen: &Listen) -> Client {
        let socket = Socket::connect(listen);
        let (sender, replies) = mpsc::channel();
        let reader = socket.try_clone();
        std::thread::spawn(move || {
            // Ends at the end of the input, or on an error such as a reset
            // by a killed daemon.
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                let reply = serde_json::from_str(&line)
                    .unwrap_or_else(|err| Value::String(format!("a reply line is not JSON ({err}): {line}")));
                if sender.send(reply).is_err() {
                    break;
                }
            }
        });
        Client { socket, writer: None, replies }
    }

    /// Writes the schema message of a stream.
    fn start_stream(&mut self, schema: &SchemaRef) {
        let mut writer = StreamWriter::try_new_buffered(self.socket.try_clone(), schema)
            .unwrap_or_else(|err| panic!("cannot write the schema message: {err}"));
        writer.flush().unwrap_or_else(|err| panic!("cannot send the schema message: {err}"));
        self.writer = Some(writer);
    }

    /// Writes one record batch message.
    fn send(&mut self, batch: &RecordBatch) {
        let writer = self.writer.as_mut().expect("the stream is started");
        writer.write(batch).unwrap_or_else(|err| panic!("cannot write a record batch: {err}"));
        writer.flush().unwrap_or_else(|err| panic!("cannot send a record batch: {err}"));
    }

    /// Writes the end-of-stream marker and closes the write side.
    fn end_stream(&mut self) {
        let writer = self.writer.as_mut().expect("the stream is started");
        writer.finish().unwrap_or_else(|err| panic!("cannot send the end of the stream: {err}"));
        self.close_write();
    }

    fn write_raw(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).unwrap_or_else(|err| panic!("cannot send {} bytes: {err}", bytes.len()));
    }

    fn close_write(&self) {
        self.socket.shutdown(Shutdown::Write).unwrap_or_else(|err| panic!("cannot close the write side: {err}"));
    }

    /// Returns the next reply line, or `None` once the daemon closed the
    /// connection. Panics if none comes within [`TIMEOUT`].
    fn reply(&self) -> Option<Value> {
        match self.replies.recv_timeout(TIMEOUT) {
            Ok(reply) => Some(reply),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("no reply line and no close within {TIMEOUT:?}"),
        }
    }

    /// Reads the next reply, which must be an ack of `stream`, and returns
    /// its committed count.
    fn ack(&self, stream: &str) -> u64 {
        let reply = self.reply().unwrap_or_else(|| panic!("the connection closed before an ack of {stream:?}"));
        ack_count(&reply, stream)
    }

    /// Reads the next reply, which must be an error, and returns its message.
    fn error(&self) -> String {
        let reply = self.reply().expect("the connection closed before the error reply");
        let message = reply["error"].as_str().unwrap_or_else(|| panic!("expected an error reply, got {reply}"));
        message.to_string()
    }

    /// Reads acks of `stream` until the daemon closes the connection, and
    /// returns their committed counts.
    fn acks_until_closed(&self, stream: &str) -> Vec<u64> {
        let mut acks = Vec::new();
        while let Some(reply) = self.reply() {
            acks.push(ack_count(&reply, stream));
        }
        acks
    }

    /// Returns the acks of `stream` already received, without waiting.
    fn acks_received(&self, stream: &str) -> Vec<u64> {
        self.replies.try_iter().map(|reply| ack_count(&reply, stream)).collect()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Ends the reader thread.
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

/// Returns the committed count of an ack of `stream`; panics on any other
/// reply.
fn ack_count(reply: &Value, stream: &str) -> u64 {
    assert_eq!(reply["stream"], stream, "expected an ack of stream {stream:?}, got {reply}");
    reply["committed"].as_u64().unwrap_or_else(|| panic!("the ack has no committed count: {reply}"))
}

/// Asserts that `acks` rise strictly and end at `total`.
fn assert_acks_rise_to(acks: &[u64], total: u64) {
    assert!(acks.windows(2).all(|pair| pair[0] < pair[1]), "acks rise strictly: {acks:?}");
    assert_eq!(acks.last(), Some(&total), "the last ack counts every record sent: {acks:?}");
}

/// Returns the schema the Rust clients send: `id` (Int64) and `pixels`
/// (`List<Float32>`), named `stream` at position `offset` in the metadata.
fn stream_schema(stream: &str, offset: Option<u64>) -> SchemaRef {
    let fields = digits_as_lists(0..1, None).schema().fields().clone();
    let mut metadata = std::collections::HashMap::from([(String::from("stochflow.stream"), stream.to_string())]);
    if let Some(offset) = offset {
        metadata.insert(String::from("stochflow.offset"), offset.to_string());
    }
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// Sends the digits `range`, as lists, in batches of [`CLIENT_BATCH`] records.
fn send_digits(client: &mut Client, range: Range<usize>) {
    let records = digits_as_lists(range, None);
    for start in (0..records.num_rows()).step_by(CLIENT_BATCH) {
        client.send(&records.slice(start, CLIENT_BATCH.min(records.num_rows() - start)));
    }
}

/// Ids of the digits `range`.
fn digit_ids(range: Range<usize>) -> Vec<i64> {
    int64(&[digits_slice(range)], "id")
}

// ---------------------------------------------------------------------------
// Output checks

/// Asserts that the output files contain each of `ids` with all its samples
/// exactly once, and no other record.
fn assert_each_id_once(output: &Path, ids: &[i64]) {
    let counts = id_sample_counts(&read_committed(output, "part-"));
    let expected: BTreeMap<(i64, i32), usize> =
        ids.iter().flat_map(|&id| (0..SAMPLES as i32).map(move |sample| ((id, sample), 1))).collect();
    let missing: Vec<_> = expected.keys().filter(|key| !counts.contains_key(key)).take(10).collect();
    let repeated: Vec<_> = counts.iter().filter(|&(_, &count)| count > 1).take(10).collect();
    let unknown: Vec<_> = counts.keys().filter(|key| !expected.contains_key(key)).take(10).collect();
    assert!(missing.is_empty(), "(id, sample) pairs missing from the output, first ones: {missing:?}");
    assert!(repeated.is_empty(), "(id, sample) pairs more than once in the output, with counts: {repeated:?}");
    assert!(unknown.is_empty(), "(id, sample) pairs in the output that were never sent: {unknown:?}");
}

/// Asserts that every output row came from `stream`.
fn assert_origin(output: &Path, stream: &str) {
    let rows = Committed::read(output).rows;
    let origins = strings(&rows, "origin");
    let other: Vec<&String> = origins.iter().filter(|origin| *origin != stream).take(5).collect();
    assert!(other.is_empty(), "every output row has origin {stream:?}; found {other:?}");
}

/// Returns the durable record count of `stream` in the checkpoint.
fn durable(output: &Path, stream: &str) -> u64 {
    checkpoint_units(output).get(stream).map_or(0, |&(records, _)| records)
}

/// Runs the digits stages over the fixture with `stochflow run` and asserts
/// that every committed row equals the clean run's row of the same id and
/// sample, bit for bit.
fn assert_output_equals_clean_run(setup: &Setup) {
    let input = setup.root.path().join("digits.arrow");
    write_arrow(&input, &digits());
    let (_, clean_batches) = crate::common::read_arrow(&run_clean(setup.root.path(), &input));
    let clean = rows_by_key(&clean_batches);
    assert_eq!(clean.len(), DIGITS * SAMPLES, "rows of the clean run");
    assert_rows_equal_clean_run(&Committed::read(&setup.output).rows, &clean);
}

// ---------------------------------------------------------------------------
// Tests

/// One stream over TCP: the first reply gives 0 committed, acks follow the
/// commits up to every record sent, and the output and metrics agree.
#[test]
fn socket_acks_follow_commits() {
    let setup = setup(false);
    let mut daemon = setup.start("daemon");

    let mut client = setup.connect();
    client.start_stream(&stream_schema("acks", None));
    assert_eq!(client.ack("acks"), 0, "the first reply of a new stream says nothing is committed");
    // The second half waits for the first to be acknowledged, so the stream
    // is committed at least twice however fast the daemon reads it.
    let half = DIGITS / 2;
    send_digits(&mut client, 0..half);
    let mut acks = vec![client.ack("acks")];
    while *acks.last().expect("one ack was read") < half as u64 {
        acks.push(client.ack("acks"));
    }
    send_digits(&mut client, half..DIGITS);
    client.end_stream();
    acks.extend(client.acks_until_closed("acks"));
    assert_acks_rise_to(&acks, DIGITS as u64);
    // Acks report the latest durable count, so commits in quick succession
    // may share one ack; the commits themselves are counted in files.
    let parts = committed_files(&setup.output, "part-").len();
    assert!(parts >= 2, "a stream of {DIGITS} records is committed in several files, found {parts}; acks {acks:?}");

    assert_each_id_once(&setup.output, &digit_ids(0..DIGITS));
    assert_origin(&setup.output, "acks");
    assert_eq!(Committed::read(&setup.output).dead_count(), 0, "no record is dead-lettered");
    assert_eq!(durable(&setup.output, "acks"), DIGITS as u64, "the checkpoint counts every record of the stream");
    daemon.wait_metric("stochflow_records_out_total", DIGITS as f64);
    let records_in = daemon.metric(r#"stochflow_records_in_total{source="socket"}"#);
    assert_eq!(records_in, Some(DIGITS as f64), "records_in_total of the socket source");
    daemon.stop(TIMEOUT);
}

/// Sends part of a stream, kills the daemon with SIGKILL after an ack while
/// more records are in flight, restarts it and resends: from the committed
/// count that a new connection's first reply gives, or from 0. Every record
/// ends up in the output once, equal to a clean `stochflow run`.
fn crash_and_resend(resend_from_zero: bool) {
    const STREAM: &str = "sensor";
    let setup = setup(false);
    let mut daemon = setup.start("first");

    let mut client = setup.connect();
    client.start_stream(&stream_schema(STREAM, None));
    assert_eq!(client.ack(STREAM), 0, "the first reply of a new stream says nothing is committed");
    send_digits(&mut client, 0..100);
    let first_ack = client.ack(STREAM);
    assert!(first_ack > 0, "an ack after the opening reply counts new records: {first_ack}");
    assert!(first_ack <= 100, "the first ack ({first_ack}) counts no more than the 100 records sent");
    // More records in flight when the daemon dies.
    send_digits(&mut client, 100..200);
    let last_ack = client.acks_received(STREAM).into_iter().fold(first_ack, u64::max);
    daemon.crash();
    drop(client);

    let mut daemon = setup.start("second");
    let resume = setup.committed_count(STREAM);
    assert!(resume >= last_ack, "after the restart, {resume} records are durable, fewer than the {last_ack} acked");
    assert!(resume <= 200, "after the restart, {resume} records are durable, more than the 200 sent");
    assert_eq!(durable(&setup.output, STREAM), resume, "the first reply gives the checkpoint's count");

    let from = if resend_from_zero { 0 } else { resume };
    let mut client = setup.connect();
    client.start_stream(&stream_schema(STREAM, Some(from)));
    assert_eq!(client.ack(STREAM), resume, "the first reply of the resend gives the durable count");
    send_digits(&mut client, from as usize..DIGITS);
    client.end_stream();
    let acks = client.acks_until_closed(STREAM);
    assert_acks_rise_to(&acks, DIGITS as u64);
    assert!(acks[0] > resume, "acks after the resend go past the durable count {resume}: {acks:?}");

    assert_eq!(partial_files(&setup.output), Vec::<String>::new(), "no .partial file is left in the output");
    assert_each_id_once(&setup.output, &digit_ids(0..DIGITS));
    assert_origin(&setup.output, STREAM);
    assert_eq!(Committed::read(&setup.output).dead_count(), 0, "no record is dead-lettered");
    assert_output_equals_clean_run(&setup);
    daemon.stop(TIMEOUT);
    note(&format!(
        "crash_and_resend (from {}): {last_ack} records acked before SIGKILL, {resume} durable after the restart",
        if resend_from_zero { "0" } else { "the committed count" }
    ));
}

#[test]
fn crash_resume_from_committed_once() {
    crash_and_resend(false);
}

#[test]
fn crash_resend_from_zero_once() {
    crash_and_resend(true);
}

/// A wrong-length tensor row, a connection with other columns and a stream
/// cut inside a message: each is rejected on its own, and the daemon goes on
/// serving.
#[test]
fn bad_socket_input_keeps_serving() {
    let setup = setup(false);
    let mut daemon = setup.start("daemon");
    let healthz = |daemon: &Daemon, step: &str| {
        let status = daemon.get("/healthz").map(|(status, _)| status);
        assert_eq!(status, Some(200), "/healthz after {step}");
    };

    // Row 7 has 63 pixels: the record is dead-lettered, the others committed.
    let short = digits_as_lists(0..100, Some(7));
    let short_id = int64(std::slice::from_ref(&short), "id")[7];
    let mut client = setup.connect();
    client.start_stream(&stream_schema("short-row", None));
    assert_eq!(client.ack("short-row"), 0, "the first reply of a new stream says nothing is committed");
    client.send(&short.slice(0, 50));
    client.send(&short.slice(50, 50));
    client.end_stream();
    let acks = client.acks_until_closed("short-row");
    assert_acks_rise_to(&acks, 100);
    healthz(&daemon, "a wrong-length row");

    let dead = dead_letters(&read_committed(&setup.output, "dead-"));
    assert_eq!(dead.len(), 1, "only the wrong-length row is dead-lettered: {dead:?}");
    let [key, source, stage, error] = &dead[0];
    assert_eq!(*key, short_id.to_string(), "the dead letter's key is the row's id");
    assert_eq!(source, "short-row", "the dead letter's source is the stream's name");
    assert_eq!(stage, "source", "the socket source rejects the row");
    assert!(error.contains("has 63 values, expected 64"), "the error gives both lengths: {error}");
    let good: Vec<i64> = digit_ids(0..100).into_iter().filter(|&id| id != short_id).collect();
    assert_each_id_once(&setup.output, &good);

    // Another column set than the first connection's is a protocol error.
    let mut other = setup.connect();
    let digits = digits_slice(100..110);
    let schema = Arc::new(digits.schema().as_ref().clone().with_metadata(std::collections::HashMap::from([(
        String::from("stochflow.stream"),
        String::from("other-columns"),
    )])));
    other.start_stream(&schema);
    assert_eq!(other.ack("other-columns"), 0, "the first reply comes before the columns are checked");
    other.send(&RecordBatch::try_new(schema.clone(), digits.columns().to_vec()).expect("the columns are unchanged"));
    other.end_stream();
    let error = other.error();
    assert!(error.contains("differ"), "the error says the columns differ: {error}");
    assert!(error.contains("label"), "the error lists the connection's columns: {error}");
    assert_eq!(other.reply(), None, "the daemon closes the connection after the error");
    healthz(&daemon, "a connection with other columns");

    // A stream cut inside its second batch: the first batch stays accepted.
    let schema = stream_schema("cut", None);
    let mut writer = StreamWriter::try_new(Vec::new(), &schema).expect("the stream writer starts");
    writer.write(&digits_as_lists(100..120, None)).expect("the first batch is encoded");
    let first_end = writer.get_ref().len();
    writer.write(&digits_as_lists(120..140, None)).expect("the second batch is encoded");
    let second_end = writer.get_ref().len();
    let bytes = writer.into_inner().expect("the stream is finished");
    let mut cut = setup.connect();
    cut.write_raw(&bytes[..first_end + (second_end - first_end) / 2]);
    cut.close_write();
    assert_eq!(cut.ack("cut"), 0, "the first reply of a new stream says nothing is committed");
    let error = cut.error();
    assert!(error.contains("ended inside an IPC message"), "the error says where the stream ended: {error}");
    assert!(error.contains("resend from position 20"), "the error says where to resend from: {error}");
    assert_eq!(cut.reply(), None, "the daemon closes the connection after the error");
    // The daemon updates the count it sends to new connections just after
    // it writes checkpoint.json, so wait for the reply rather than the file.
    daemon.wait_for("a new connection to be told that the first batch of the cut stream is durable", |_| {
        (setup.committed_count("cut") == 20).then_some(())
    });
    assert_eq!(durable(&setup.output, "cut"), 20, "the checkpoint counts the first batch of the cut stream");
    healthz(&daemon, "a truncated stream");

    // The resend of the whole cut stream adds only its second batch.
    let mut resend = setup.connect();
    resend.start_stream(&schema);
    assert_eq!(resend.ack("cut"), 20, "the first reply gives the records durable before the cut");
    send_digits(&mut resend, 100..140);
    resend.end_stream();
    assert_acks_rise_to(&resend.acks_until_closed("cut"), 40);

    // Ids declared nullable where the first connection's are not: the
    // columns differ in nullability alone, so the stream is read.
    let records = digits_as_lists(140..150, None);
    let mut fields: Vec<Field> = records.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields[0] = fields[0].clone().with_nullable(true);
    let metadata = std::collections::HashMap::from([(String::from("stochflow.stream"), String::from("nullable-ids"))]);
    let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
    let mut nullable = setup.connect();
    nullable.start_stream(&schema);
    assert_eq!(nullable.ack("nullable-ids"), 0, "the first reply of a new stream says nothing is committed");
    nullable
        .send(&RecordBatch::try_new(schema.clone(), records.columns().to_vec()).expect("the columns are unchanged"));
    nullable.end_stream();
    assert_acks_rise_to(&nullable.acks_until_closed("nullable-ids"), 10);

    let ids: Vec<i64> = good.into_iter().chain(digit_ids(100..150)).collect();
    assert_each_id_once(&setup.output, &ids);
    assert_eq!(Committed::read(&setup.output).dead_count(), 1, "no other record is dead-lettered");
    daemon.wait_metric(r#"stochflow_dead_letters_total{stage="source"}"#, 1.0);
    healthz(&daemon, "the resend");
    daemon.stop(TIMEOUT);
}

/// Connections without a stream name get `connection-1`, `connection-2`
/// and so on. Their entries leave the checkpoint once they close, and the
/// numbering goes on after a restart instead of giving a name again.
#[test]
fn unnamed_connections_leave_the_checkpoint() {
    let setup = setup(false);
    let mut daemon = setup.start("daemon");
    let unnamed = digits_as_lists(0..1, None).schema();
    for (number, range) in [(1, 0..30), (2, 30..60), (3, 60..90)] {
        let stream = format!("connection-{number}");
        let mut client = setup.connect();
        client.start_stream(&unnamed);
        assert_eq!(client.ack(&stream), 0, "the first reply names the stream {stream}");
        send_digits(&mut client, range);
        client.end_stream();
        assert_acks_rise_to(&client.acks_until_closed(&stream), 30);
    }
    // A named stream's commit comes after the unnamed connections closed,
    // and drops them from the checkpoint.
    let mut client = setup.connect();
    client.start_stream(&stream_schema("named", None));
    assert_eq!(client.ack("named"), 0);
    send_digits(&mut client, 90..120);
    client.end_stream();
    assert_acks_rise_to(&client.acks_until_closed("named"), 30);
    daemon.stop(TIMEOUT);

    let units = checkpoint_units(&setup.output);
    assert_eq!(units.keys().collect::<Vec<_>>(), ["named"], "the checkpoint's units");
    let text = std::fs::read_to_string(setup.output.join("checkpoint.json")).expect("the checkpoint is written");
    let checkpoint: Value = serde_json::from_str(&text).expect("the checkpoint is JSON");
    assert_eq!(checkpoint["last_connection"], 3, "the checkpoint counts the connections: {text}");
    assert_each_id_once(&setup.output, &digit_ids(0..120));

    let mut daemon = setup.start("restart");
    let mut client = setup.connect();
    client.start_stream(&unnamed);
    assert_eq!(client.ack("connection-4"), 0, "a restart goes on with the next number");
    client.end_stream();
    assert_eq!(client.acks_until_closed("connection-4"), Vec::<u64>::new());
    daemon.stop(TIMEOUT);
}

/// SIGTERM while a client on a Unix socket is in the middle of its stream:
/// the daemon exits with 0. The output contains the stream's first N
/// records once each, where N is the durable count and covers every ack.
#[test]
fn sigterm_keeps_acked_records() {
    const STREAM: &str = "unix-stream";
    let setup = setup(true);
    let Listen::Unix(socket_path) = &setup.listen else { unreachable!("the setup listens on a Unix socket") };
    let mut daemon = setup.start("daemon");
    assert!(socket_path.exists(), "the daemon creates the socket file {}", socket_path.display());

    let mut client = setup.connect();
    client.start_stream(&stream_schema(STREAM, None));
    assert_eq!(client.ack(STREAM), 0, "the first reply of a new stream says nothing is committed");
    send_digits(&mut client, 0..100);
    let first_ack = client.ack(STREAM);
    send_digits(&mut client, 100..200);
    let acked_before = client.acks_received(STREAM).into_iter().fold(first_ack, u64::max);

    let drain = daemon.stop(TIMEOUT);
    let acks_after: Vec<u64> = std::iter::from_fn(|| client.reply()).map(|reply| ack_count(&reply, STREAM)).collect();
    let durable = durable(&setup.output, STREAM);
    assert!(durable >= acked_before, "{durable} records durable after SIGTERM, fewer than the {acked_before} acked");
    assert!(durable <= 200, "{durable} records durable after SIGTERM, more than the 200 sent");
    let highest = acks_after.iter().copied().fold(acked_before, u64::max);
    assert!(highest <= durable, "an ack ({highest}) went past the durable count {durable}: {acks_after:?}");
    assert_eq!(highest, durable, "the last ack says what the drain made durable: {acks_after:?}");
    assert_each_id_once(&setup.output, &digit_ids(0..durable as usize));
    assert_eq!(partial_files(&setup.output), Vec::<String>::new(), "no .partial file is left after the drain");
    assert!(!socket_path.exists(), "the daemon removes its socket file {} on exit", socket_path.display());
    note(&format!(
        "sigterm_keeps_acked_records: {acked_before} records acked before SIGTERM, {durable} durable after the \
         drain of {drain:?}"
    ));
}

/// The Python client of docs/daemon.md, with the file, port and stream name
/// as arguments, printing each reply as one JSON line.
const PYTHON_CLIENT: &str = r#"
import json
import socket
import sys

import pyarrow as pa

path, port, stream = sys.argv[1], int(sys.argv[2]), sys.argv[3]
table = pa.ipc.open_file(path).read_all()
table = table.replace_schema_metadata({"stochflow.stream": stream})
sink = pa.BufferOutputStream()
with pa.ipc.new_stream(sink, table.schema) as writer:
    writer.write_table(table, max_chunksize=64)

with socket.create_connection(("127.0.0.1", port)) as connection:
    connection.sendall(sink.getvalue())
    connection.shutdown(socket.SHUT_WR)
    for line in connection.makefile():
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        print(json.dumps(reply), flush=True)
"#;

/// A pyarrow client sends the digits fixture, with its fixed-shape tensor
/// column, as `pa.ipc.new_stream` writes it, and receives its acks. The
/// output equals a clean `stochflow run`.
#[test]
fn python_client_receives_acks() {
    let Some(python) = crate::common::python_with(&["pyarrow"]) else { return };
    let setup = setup(false);
    let Listen::Tcp(port) = setup.listen else { unreachable!("the setup listens on TCP") };
    let mut daemon = setup.start("daemon");

    let fixture = crate::common::repo("fixtures/data/digits_test.arrow");
    let mut command = std::process::Command::new(&python);
    command.args(["-c", PYTHON_CLIENT]).arg(&fixture).arg(port.to_string()).arg("python-digits");
    let output = command.output().unwrap_or_else(|err| panic!("cannot run {python}: {err}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the Python client failed ({}):\n{stdout}\n{stderr}", output.status);
    let acks: Vec<u64> = stdout
        .lines()
        .map(|line| {
            let reply: Value = serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("a line of the Python client's output is not JSON ({err}): {line}"));
            ack_count(&reply, "python-digits")
        })
        .collect();
    assert_eq!(acks.first(), Some(&0), "the first reply of a new stream says nothing is committed: {acks:?}");
    assert_acks_rise_to(&acks, DIGITS as u64);

    assert_each_id_once(&setup.output, &digit_ids(0..DIGITS));
    assert_origin(&setup.output, "python-digits");
    assert_output_equals_clean_run(&setup);
    daemon.stop(TIMEOUT);
}

/// A first connection whose columns do not fit the stages gets an error and
/// the daemon keeps serving; the next connection that fits starts the
/// pipeline.
#[test]
fn unfit_first_stream_is_rejected() {
    let setup = setup(false);
    // Without `tensors`, the columns go to the stages as sent.
    let yaml = std::fs::read_to_string(&setup.pipeline).expect("the pipeline file is read");
    let yaml: String = yaml.lines().filter(|line| !line.contains("tensors:")).map(|line| format!("{line}\n")).collect();
    std::fs::write(&setup.pipeline, yaml).expect("the pipeline file is written");
    let mut daemon = setup.start("daemon");

    let narrow = digits_slice(0..10);
    let ids = narrow.column_by_name("id").expect("the fixture has ids").clone();
    let pixels = arrow::array::FixedSizeListArray::try_new(
        Arc::new(arrow::datatypes::Field::new("item", arrow::datatypes::DataType::Float32, false)),
        32,
        Arc::new(arrow::array::Float32Array::from(vec![0.5f32; 10 * 32])),
        None,
    )
    .expect("a list of 32 values per row");
    let schema = Arc::new(arrow::datatypes::Schema::new_with_metadata(
        vec![
            arrow::datatypes::Field::new("id", arrow::datatypes::DataType::Int64, false),
            arrow::datatypes::Field::new("pixels", arrow::array::Array::data_type(&pixels).clone(), false),
        ],
        std::collections::HashMap::from([(String::from("stochflow.stream"), String::from("narrow"))]),
    ));
    let mut client = setup.connect();
    client.start_stream(&schema);
    assert_eq!(client.ack("narrow"), 0, "the first reply comes before the columns are checked");
    client.send(&RecordBatch::try_new(schema.clone(), vec![ids, Arc::new(pixels)]).expect("the batch is built"));
    client.end_stream();
    let error = client.error();
    assert!(error.contains("do not fit the pipeline"), "the error says the columns do not fit: {error}");
    assert!(error.contains("[32]"), "the error names the shape that does not fit: {error}");
    assert!(daemon.is_running(), "an unfit first stream leaves the daemon running; log:\n{}", daemon.log_tail());

    let mut good = setup.connect();
    let digits = digits_slice(0..50);
    let schema =
        Arc::new(digits.schema().as_ref().clone().with_metadata(std::collections::HashMap::from([(
            String::from("stochflow.stream"),
            String::from("fits"),
        )])));
    good.start_stream(&schema);
    assert_eq!(good.ack("fits"), 0, "the first reply of a new stream says nothing is committed");
    good.send(&RecordBatch::try_new(schema.clone(), digits.columns().to_vec()).expect("the columns are unchanged"));
    good.end_stream();
    assert_acks_rise_to(&good.acks_until_closed("fits"), 50);
    assert_each_id_once(&setup.output, &digit_ids(0..50));
    daemon.stop(TIMEOUT);
}
