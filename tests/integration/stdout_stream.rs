use std::io::Read;
use std::process::{Command, Stdio};

use arrow::ipc::reader::StreamReader;

use crate::common::*;

/// Latent records with Gaussian noise, read `batch_size` at a time.
fn noisy_latent(batch_size: usize, workers: usize) -> String {
    format!(
        "seed: 3
source: {{kind: latent, records: 700, shape: [12], batch_size: {batch_size}}}
stages:
  - {{kind: add_noise, column: z, std: 0.5}}
sink: {{kind: arrow_file, path: unused.arrow, rows_per_batch: 256}}
runtime: {{workers: {workers}}}
"
    )
}

/// Reads an Arrow IPC stream from bytes.
fn read_stream(bytes: &[u8]) -> (arrow::datatypes::SchemaRef, Vec<arrow::array::RecordBatch>) {
    let reader = StreamReader::try_new(bytes, None).expect("standard output holds an Arrow IPC stream");
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>().expect("every batch of the stream reads");
    (schema, batches)
}

#[test]
fn stream_matches_file_output() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = repo("pipelines/digits.yaml");
    let file = dir.path().join("digits.arrow");
    let outcome = stochflow(&["run", pipeline.to_str().unwrap(), "--output", file.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);

    let streamed = Command::new(env!("CARGO_BIN_EXE_stochflow"))
        .args(["run", pipeline.to_str().unwrap(), "--output", "-"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&streamed.stderr);
    assert_eq!(streamed.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("read 450 records, wrote 450 records (2250 rows), skipped 0 records")
            && stderr.contains("output: standard output"),
        "the summary goes to standard error:\n{stderr}"
    );
    // The stream ends with its end-of-stream marker.
    assert!(streamed.stdout.ends_with(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]), "the stream lacks its end marker");

    let (file_schema, file_batches) = read_arrow(&file);
    let (stream_schema, stream_batches) = read_stream(&streamed.stdout);
    assert_eq!(stream_schema, file_schema, "the stream has the file's schema and provenance metadata");
    assert_eq!(stream_batches, file_batches, "the stream has the file's record batches");
    assert!(!dir.path().join("-").exists(), "`-` is not taken as a file name");
}

#[test]
fn stream_bytes_do_not_depend_on_batching() {
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for (batch_size, workers) in [(1, 1), (64, 2), (700, 1)] {
        let pipeline = write_pipeline(dir.path(), &format!("b{batch_size}.yaml"), &noisy_latent(batch_size, workers));
        let streamed = Command::new(env!("CARGO_BIN_EXE_stochflow"))
            .args(["run", pipeline.to_str().unwrap(), "--output", "-"])
            .output()
            .unwrap();
        assert_eq!(streamed.status.code(), Some(0), "{}", String::from_utf8_lossy(&streamed.stderr));
        outputs.push(streamed.stdout);
    }
    let (_, batches) = read_stream(&outputs[0]);
    assert_eq!(rows(&batches), 700);
    assert_eq!(batches.iter().map(|batch| batch.num_rows()).collect::<Vec<_>>(), [256, 256, 188]);
    assert!(outputs.iter().all(|bytes| *bytes == outputs[0]), "the stream's bytes changed with the batch size");
}

#[test]
fn dash_sink_path_is_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = noisy_latent(50, 2).replace("path: unused.arrow", "path: \"-\"");
    let pipeline = write_pipeline(dir.path(), "dash.yaml", &yaml);
    let streamed =
        Command::new(env!("CARGO_BIN_EXE_stochflow")).args(["run", pipeline.to_str().unwrap()]).output().unwrap();
    assert_eq!(streamed.status.code(), Some(0), "{}", String::from_utf8_lossy(&streamed.stderr));
    let (_, batches) = read_stream(&streamed.stdout);
    assert_eq!(rows(&batches), 700);
    assert!(!dir.path().join("-").exists(), "`-` is not taken as a file name");
}

#[test]
fn reader_that_exits_early_stops_the_run() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stochflow"))
        .args(["run", repo("pipelines/digits.yaml").to_str().unwrap(), "--output", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The output (720 kB) is far larger than a pipe's buffer (64 kB), so
    // closing the pipe after the first bytes makes a later write fail.
    let mut stdout = child.stdout.take().unwrap();
    let mut start = [0u8; 100];
    stdout.read_exact(&mut start).unwrap();
    drop(stdout);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "cannot write the Arrow stream to standard output: the program reading it closed the pipe before the end of the output"
        ),
        "{stderr}"
    );
}

#[test]
fn terminal_output_is_rejected() {
    let mut controller = -1;
    let mut terminal = -1;
    // SAFETY: openpty writes two descriptors into the given integers and
    // reads none of the null arguments.
    let opened = unsafe {
        libc::openpty(&mut controller, &mut terminal, std::ptr::null_mut(), std::ptr::null(), std::ptr::null())
    };
    assert_eq!(opened, 0, "a pseudo-terminal opens");
    // SAFETY: both descriptors were just opened and are owned here alone.
    let (controller, terminal) = unsafe {
        use std::os::fd::FromRawFd;
        (std::os::fd::OwnedFd::from_raw_fd(controller), std::os::fd::OwnedFd::from_raw_fd(terminal))
    };
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_stochflow"))
        .args(["run", repo("pipelines/digits.yaml").to_str().unwrap(), "--output", "-"])
        .current_dir(dir.path())
        .stdout(Stdio::from(terminal))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    drop(controller);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write the Arrow stream to standard output: it is a terminal; pipe it into a program"),
        "{stderr}"
    );
}

#[test]
fn json_logs_keep_standard_error_json() {
    let pipeline = repo("pipelines/digits.yaml");
    let streamed = Command::new(env!("CARGO_BIN_EXE_stochflow"))
        .args(["--log-format", "json", "run", pipeline.to_str().unwrap(), "--output", "-"])
        .output()
        .unwrap();
    assert!(streamed.status.success(), "{}", String::from_utf8_lossy(&streamed.stderr));
    let stderr = String::from_utf8(streamed.stderr).unwrap();
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}")))
        .collect();
    let summary = events.last().unwrap()["fields"]["message"].as_str().unwrap();
    assert!(summary.starts_with("read 450 records, wrote 450 records"), "{summary}");

    // An error is a JSON event too.
    let outcome = stochflow(&["--log-format", "json", "run", "missing.yaml"]);
    assert_eq!(outcome.code, 1);
    let event: serde_json::Value = serde_json::from_str(outcome.stderr.trim()).unwrap();
    assert_eq!(event["level"], "ERROR");
    assert!(event["fields"]["message"].as_str().unwrap().starts_with("cannot read pipeline file missing.yaml"));
}
