//! Helpers for the tests that run `stochflow daemon` as a process: the
//! process guard, the HTTP endpoints and metrics, the digits pipeline and
//! inputs, and readers of the output directory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, Float32Builder, ListBuilder, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Float32Type, Int32Type, Int64Type, Schema, SchemaRef};
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;

use crate::common::{read_arrow, repo, run_ok, strings, yaml_path};

/// Maximum wait for one step of the daemon. Steps take well under a second
/// on an idle machine, so the margin covers a loaded one.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two checks while waiting for the daemon.
pub const POLL: Duration = Duration::from_millis(25);
/// Rows per record drawn by the `sample` stage of the digits pipeline.
pub const SAMPLES: usize = 5;
/// Output columns compared with a clean run.
pub const COMPARED_COLUMNS: &str = "[id, label, logits, sample, class]";

/// Writes a line to standard error, past the test harness's output capture,
/// so that it shows whether or not the test passes.
pub fn note(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

// ---------------------------------------------------------------------------
// The digits pipeline and its inputs

/// Returns the path of the digits classifier, a small MLP over 64 pixels.
pub fn mlp() -> PathBuf {
    repo("fixtures/models/mlp_digits.onnx")
}

/// Returns the `stages` section of the digits pipeline: Gaussian input noise
/// with `noise_std` (stage `input_noise`), `model` as the classifier in
/// batches of 64 (`classify`), and [`SAMPLES`] classes drawn per record
/// (`draw_class`).
pub fn digits_stages_yaml(noise_std: f64, model: &Path) -> String {
    let model = yaml_path(model);
    format!(
        r#"stages:
  - {{name: input_noise, kind: add_noise, column: pixels, std: {noise_std}, clip: [0.0, 1.0]}}
  - {{name: classify, kind: infer, model: {model}, inputs: {{pixels: pixels}}, outputs: {{logits: logits}}, batch_size: 64}}
  - {{name: draw_class, kind: sample, column: logits, samples: {SAMPLES}, output: class}}
"#
    )
}

/// Runs the digits stages, with seed 42 and input noise 0.1, through
/// `stochflow run` over the Arrow file `input` keyed by its `id` column, and
/// returns the output file: the clean run that a daemon's output must equal.
pub fn run_clean(dir: &Path, input: &Path) -> PathBuf {
    let yaml = format!(
        "seed: 42\nsource: {{kind: arrow_file, path: {input}, id_column: id}}\n{stages}\
         sink: {{kind: arrow_file, path: clean.arrow, columns: {COMPARED_COLUMNS}}}\n",
        input = yaml_path(input),
        stages = digits_stages_yaml(0.1, &mlp()),
    );
    run_ok(dir, "clean", &yaml)
}

/// Returns the 450 digits of the fixture as one batch: `id` (Int64),
/// `pixels` (a float32 tensor of shape [64]) and `label`.
pub fn digits() -> RecordBatch {
    let (schema, batches) = read_arrow(&repo("fixtures/data/digits_test.arrow"));
    concat_batches(&schema, &batches).expect("the fixture's batches share its schema")
}

/// Returns rows `range` of the digits fixture.
pub fn digits_slice(range: Range<usize>) -> RecordBatch {
    digits().slice(range.start, range.len())
}

/// Rows `range` of the digits fixture as `id` (Int64, not null) and `pixels`
/// as a plain `List<Float32>` column, with the row at index `short_row` of
/// the slice (if any) cut to 63 values.
pub fn digits_as_lists(range: Range<usize>, short_row: Option<usize>) -> RecordBatch {
    let batch = digits_slice(range);
    let ids = batch.column_by_name("id").expect("the fixture has ids").clone();
    let pixels = batch.column_by_name("pixels").expect("the fixture has pixels").as_fixed_size_list();
    let mut lists = ListBuilder::new(Float32Builder::new());
    for row in 0..batch.num_rows() {
        let values = pixels.value(row);
        let values = values.as_primitive::<Float32Type>().values();
        let length = if Some(row) == short_row { 63 } else { 64 };
        lists.values().append_slice(&values[..length]);
        lists.append(true);
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("pixels", DataType::List(Arc::new(Field::new("item", DataType::Float32, true))), true),
    ]));
    RecordBatch::try_new(schema, vec![ids, Arc::new(lists.finish())]).expect("the columns match the schema")
}

/// Writes `records` as one Arrow file to `path`.
pub fn write_arrow(path: &Path, records: &RecordBatch) {
    let file = BufWriter::new(File::create(path).expect("the input file is created"));
    let mut writer = FileWriter::try_new(file, &records.schema()).expect("the Arrow writer starts");
    writer.write(records).expect("the records are written");
    writer.finish().expect("the footer is written");
    writer.into_inner().expect("the writer is finished").flush().expect("the file is flushed");
}

/// Writes `records` as an Arrow file under a hidden name in `dir` and
/// renames the finished file to `name`, so that the daemon never reads it
/// half written.
pub fn drop_arrow(dir: &Path, name: &str, records: &RecordBatch) {
    let hidden = dir.join(format!(".{name}.partial"));
    write_arrow(&hidden, records);
    std::fs::rename(&hidden, dir.join(name)).expect("the input file is renamed into the watched directory");
}

/// Writes `bytes` under a hidden name in `dir` and renames them to `name`.
pub fn drop_bytes(dir: &Path, name: &str, bytes: &[u8]) {
    let hidden = dir.join(format!(".{name}.partial"));
    std::fs::write(&hidden, bytes).expect("the input file is written");
    std::fs::rename(&hidden, dir.join(name)).expect("the input file is renamed into the watched directory");
}

// ---------------------------------------------------------------------------
// The daemon process

/// A running `stochflow daemon`. Dropping it kills the process with SIGKILL
/// if it still runs, so a failed test leaves no daemon behind.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    /// Port of the health and metrics server on 127.0.0.1, or none where the
    /// pipeline sets `daemon.http: null`.
    http_port: Option<u16>,
}

impl Daemon {
    /// Starts `stochflow daemon PIPELINE`, appending its standard error to `log`.
    pub fn start(pipeline: &Path, http_port: Option<u16>, log: &Path) -> Daemon {
        Daemon::start_with_args(&[], pipeline, http_port, log)
    }

    /// Starts `stochflow ARGS daemon PIPELINE`, appending its standard error
    /// to `log`.
    pub fn start_with_args(args: &[&str], pipeline: &Path, http_port: Option<u16>, log: &Path) -> Daemon {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stochflow"));
        command.args(args).arg("daemon").arg(pipeline);
        Daemon::spawn(&mut command, http_port, log).unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"))
    }

    /// Spawns `command`, which must run the daemon in the process it starts,
    /// with standard error appended to `log` and standard output discarded.
    pub fn spawn(command: &mut Command, http_port: Option<u16>, log: &Path) -> std::io::Result<Daemon> {
        let stderr = File::options().create(true).append(true).open(log)?;
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn()?;
        Ok(Daemon { child, log: log.to_path_buf(), http_port })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a name such as `TERM`) with kill(1). The child is not
    /// reaped before this, so its PID still names it.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let status = Command::new("kill").args(["-s", signal, &pid]).status().expect("kill(1) runs");
        assert!(status.success(), "kill -s {signal} {pid} failed with {status}\n{}", self.log_tail());
    }

    /// Returns the exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("the daemon's status can be read")
    }

    pub fn is_running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Waits up to `timeout` for the daemon to exit and returns its status,
    /// or `None` if it still runs.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends SIGTERM, asserts that the daemon exits with 0 within `timeout`
    /// (its drain timeout, or longer), and returns how long it took.
    pub fn stop(&mut self, timeout: Duration) -> Duration {
        self.wait_for_term_handler();
        let sent = Instant::now();
        self.signal("TERM");
        let status = self.wait(timeout);
        let took = sent.elapsed();
        let Some(status) = status else {
            panic!("the daemon still ran {took:?} after SIGTERM, past {timeout:?}\n{}", self.log_tail());
        };
        assert_eq!(status.code(), Some(0), "the daemon's exit after SIGTERM ({status})\n{}", self.log_tail());
        took
    }

    /// Waits until the daemon catches SIGTERM, as SigCgt in /proc/PID/status
    /// shows. In its first milliseconds, before the handler is installed, the
    /// signal's default action would end the process.
    pub fn wait_for_term_handler(&mut self) {
        const SIGTERM_BIT: u64 = 1 << (15 - 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while caught_signals(self.pid()) & SIGTERM_BIT == 0 {
            assert!(self.is_running(), "the daemon exited before SIGTERM\n{}", self.log_tail());
            assert!(Instant::now() < deadline, "the daemon did not catch SIGTERM within 10 s\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills the daemon with SIGKILL and reaps it. The daemon never exits by
    /// itself, so it must still run.
    pub fn crash(&mut self) {
        if let Some(status) = self.exited() {
            panic!("the daemon exited by itself with {status} before SIGKILL\n{}", self.log_tail());
        }
        self.signal("KILL");
        let status = self.wait(Duration::from_secs(10)).expect("a process killed with SIGKILL exits");
        assert_eq!(status.signal(), Some(9), "the daemon should die of SIGKILL, not {status}\n{}", self.log_tail());
    }

    /// Returns the daemon's standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Returns the end of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let start = text.len().saturating_sub(6000);
        let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
        format!("--- end of the daemon log {} ---\n{}", self.log.display(), &text[start..])
    }

    /// Polls `check` until it returns a value. Panics with `what` and the
    /// daemon's log after [`TIMEOUT`], or if the daemon exits first.
    pub fn wait_for<T>(&mut self, what: &str, mut check: impl FnMut(&Daemon) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = check(self) {
                return value;
            }
            if let Some(status) = self.exited() {
                panic!("the daemon exited with {status} while the test waited for {what}\n{}", self.log_tail());
            }
            if start.elapsed() > TIMEOUT {
                panic!("timed out after {TIMEOUT:?} waiting for {what}\n{}", self.log_tail());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends a GET request to the daemon's HTTP server and returns the
    /// status and body, or `None` while nothing listens.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let port = self.http_port.expect("the daemon's pipeline has an HTTP server");
        http_get(port, path).ok()
    }

    /// Waits until `/healthz` returns 200.
    pub fn wait_healthy(&mut self) {
        self.wait_for("/healthz to return 200", |d| {
            (d.get("/healthz").map(|(status, _)| status) == Some(200)).then_some(())
        });
    }

    /// Returns the value of the metric line that starts with `series`, such
    /// as `stochflow_reloads_total{result="ok"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (status, body) = self.get("/metrics")?;
        assert_eq!(status, 200, "/metrics failed: {body}");
        metric(&body, series)
    }

    /// Waits until `series` equals `value`.
    pub fn wait_metric(&mut self, series: &str, value: f64) {
        self.wait_for(&format!("{series} = {value}"), |d| (d.metric(series) == Some(value)).then_some(()));
    }

    /// Waits until the log contains `text`.
    pub fn wait_log(&mut self, text: &str) {
        self.wait_for(&format!("the log line {text:?}"), |d| d.log().contains(text).then_some(()));
    }

    /// Waits until the checkpoint in `output` records the input unit `name`
    /// (a watched file) as completely committed.
    pub fn wait_committed(&mut self, output: &Path, name: &str) {
        self.wait_for(&format!("{name} to be complete in checkpoint.json"), |_| {
            checkpoint_units(output).get(name).is_some_and(|&(_, complete)| complete).then_some(())
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads the mask of the signals that process `pid` catches (SigCgt in
/// /proc/PID/status), bit `n - 1` for signal `n`; 0 once the process exits.
pub fn caught_signals(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    let line = status.lines().find(|line| line.starts_with("SigCgt:")).expect("/proc/PID/status has SigCgt");
    let mask = line.split_whitespace().nth(1).expect("SigCgt has a value");
    u64::from_str_radix(mask, 16).expect("SigCgt is hexadecimal")
}

/// Returns a port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port can be bound");
    listener.local_addr().expect("the bound address is known").port()
}

/// Sends `GET path` to 127.0.0.1:`port` and returns the status code and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let invalid = || std::io::Error::other(format!("invalid HTTP response {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).ok_or_else(invalid)?;
    Ok((status, body.to_string()))
}

/// Returns the value of the sample `series` (name and labels, as rendered).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Returns the sum of the samples of the labelled metric `name`.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Polls `done` every 10 ms until it returns true or `timeout` passes, and
/// returns whether it did.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// The output directory

/// Progress of each input unit (a file or a stream) in `checkpoint.json`:
/// durable records and whether the unit is complete. Empty before the first
/// commit.
pub fn checkpoint_units(output: &Path) -> HashMap<String, (u64, bool)> {
    let path = output.join("checkpoint.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(err) => panic!("cannot read {}: {err}", path.display()),
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not valid JSON ({err}): {text}", path.display()));
    let units = json["units"].as_object().unwrap_or_else(|| panic!("{} has no `units` map: {text}", path.display()));
    units
        .iter()
        .map(|(name, progress)| {
            let records = progress["records"].as_u64().expect("`records` is a count");
            let complete = progress["complete"].as_bool().expect("`complete` is a boolean");
            (name.clone(), (records, complete))
        })
        .collect()
}

/// Returns the sorted names of the files in `dir`, or none if `dir` does not
/// exist yet (before the daemon's first start).
pub fn file_names(dir: &Path) -> Vec<String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(err) => panic!("cannot list {}: {err}", dir.display()),
    };
    let mut names: Vec<String> = entries
        .map(|entry| entry.expect("a directory entry reads").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Names of the files in `dir` that end in `.partial`.
pub fn partial_files(dir: &Path) -> Vec<String> {
    file_names(dir).into_iter().filter(|name| name.ends_with(".partial")).collect()
}

/// Paths of the committed files in `dir` whose names start with `prefix`
/// (`part-` for output files, `dead-` for dead-letter files), in name order.
pub fn committed_files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    file_names(dir)
        .into_iter()
        .filter(|name| name.starts_with(prefix) && name.ends_with(".arrow"))
        .map(|name| dir.join(name))
        .collect()
}

/// One committed file: its name, schema and batches.
pub struct CommittedFile {
    pub name: String,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

/// Reads a committed file to its end. Panics, naming the file, if it is
/// torn: without a footer, or with a record batch that does not read.
pub fn read_committed_file(path: &Path) -> CommittedFile {
    let file = File::open(path).unwrap_or_else(|err| panic!("cannot open committed file {}: {err}", path.display()));
    let reader = FileReader::try_new(std::io::BufReader::new(file), None)
        .unwrap_or_else(|err| panic!("committed file {} has no valid footer (torn): {err}", path.display()));
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|err| panic!("committed file {} has a batch that does not read (torn): {err}", path.display()));
    let name = path.file_name().expect("a committed file has a name").to_string_lossy().into_owned();
    CommittedFile { name, schema, batches }
}

/// Reads the committed files of `output` whose names start with `prefix`
/// (`part-` or `dead-`), in name order.
pub fn read_committed(output: &Path, prefix: &str) -> Vec<CommittedFile> {
    committed_files(output, prefix).iter().map(|path| read_committed_file(path)).collect()
}

/// Every committed file of an output directory, each read to its end.
pub struct Committed {
    pub part_files: usize,
    pub dead_files: usize,
    pub rows: Vec<RecordBatch>,
    pub dead: Vec<RecordBatch>,
}

impl Committed {
    pub fn read(output: &Path) -> Self {
        let parts = read_committed(output, "part-");
        let deads = read_committed(output, "dead-");
        Committed {
            part_files: parts.len(),
            dead_files: deads.len(),
            rows: parts.into_iter().flat_map(|file| file.batches).collect(),
            dead: deads.into_iter().flat_map(|file| file.batches).collect(),
        }
    }

    pub fn row_count(&self) -> usize {
        self.rows.iter().map(RecordBatch::num_rows).sum()
    }

    pub fn dead_count(&self) -> usize {
        self.dead.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Counts the rows of each (id, sample) pair over `files`.
pub fn id_sample_counts(files: &[CommittedFile]) -> BTreeMap<(i64, i32), usize> {
    let mut counts = BTreeMap::new();
    for file in files {
        let ids = crate::common::int64(&file.batches, "id");
        let samples = crate::common::int32(&file.batches, "sample");
        for pair in ids.into_iter().zip(samples) {
            *counts.entry(pair).or_default() += 1;
        }
    }
    counts
}

/// Dead letters over `files` as (key, source, stage, error) rows.
pub fn dead_letters(files: &[CommittedFile]) -> Vec<[String; 4]> {
    let mut rows = Vec::new();
    for file in files {
        let columns = ["key", "source", "stage", "error"].map(|column| strings(&file.batches, column));
        for row in 0..columns[0].len() {
            rows.push(columns.clone().map(|column| column[row].clone()));
        }
    }
    rows
}

/// Class and logits (as bits) of every row, by (id, sample).
pub fn rows_by_key(rows: &[RecordBatch]) -> HashMap<(i64, i32), (i32, Vec<u32>)> {
    let mut by_key = HashMap::new();
    for batch in rows {
        let column = |name: &str| batch.column_by_name(name).unwrap_or_else(|| panic!("the output has column {name}"));
        let ids = column("id").as_primitive::<Int64Type>();
        let samples = column("sample").as_primitive::<Int32Type>();
        let classes = column("class").as_primitive::<Int32Type>();
        let logits = column("logits").as_fixed_size_list();
        for row in 0..batch.num_rows() {
            let values = logits.value(row);
            let bits = values.as_primitive::<Float32Type>().values().iter().map(|v| v.to_bits()).collect();
            by_key.insert((ids.value(row), samples.value(row)), (classes.value(row), bits));
        }
    }
    by_key
}

/// Asserts that every row of `rows` equals the clean run's row of the same
/// id and sample, in class and logits, bit for bit, and that both have as
/// many rows.
pub fn assert_rows_equal_clean_run(rows: &[RecordBatch], clean: &HashMap<(i64, i32), (i32, Vec<u32>)>) {
    let daemon = rows_by_key(rows);
    let mut absent = Vec::new();
    let mut different = Vec::new();
    for (key, row) in &daemon {
        match clean.get(key) {
            None => absent.push(*key),
            Some(clean_row) if clean_row != row => different.push((*key, row.clone(), clean_row.clone())),
            Some(_) => {}
        }
    }
    absent.sort();
    different.sort();
    assert!(absent.is_empty(), "{} daemon rows have no row in the clean run, first {:?}", absent.len(), absent.first());
    assert!(
        different.is_empty(),
        "{} daemon rows differ from the clean run; first ((id, sample), (class, logit bits) daemon, clean): {:?}",
        different.len(),
        different.first()
    );
    assert_eq!(daemon.len(), clean.len(), "rows in the daemon's output and in the clean run");
}
