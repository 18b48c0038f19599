//! `stochflow daemon` operated as a service: a full output disk, corrupt
//! inputs, SIGHUP reloads, bad settings at start and JSON logs. Each test
//! starts the real binary, drops files into its watched directory, sends
//! real signals with `kill`, and reads `/healthz`, `/readyz` and `/metrics`
//! over a plain TCP connection to 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int32Type, Int64Type};

use crate::common::*;
use crate::daemon_support::*;

/// Noisy pixels of sample 0 of each id, over `files`.
fn pixels_by_id(files: &[CommittedFile]) -> BTreeMap<i64, Vec<f32>> {
    let mut pixels = BTreeMap::new();
    for file in files {
        for batch in &file.batches {
            let ids = batch.column_by_name("id").expect("the output has an id column").as_primitive::<Int64Type>();
            let samples =
                batch.column_by_name("sample").expect("the output has a sample column").as_primitive::<Int32Type>();
            let values = batch.column_by_name("pixels").expect("the output has a pixels column").as_fixed_size_list();
            for row in 0..batch.num_rows() {
                if samples.value(row) == 0 {
                    let row_values = values.value(row);
                    pixels.insert(ids.value(row), row_values.as_primitive::<Float32Type>().values().to_vec());
                }
            }
        }
    }
    pixels
}

fn config_sha256(file: &CommittedFile) -> String {
    file.schema.metadata().get("stochflow.config_sha256").cloned().unwrap_or_else(|| {
        panic!("{} has no stochflow.config_sha256 metadata: {:?}", file.name, file.schema.metadata())
    })
}

/// Checks that a dead letter's `source` column names the input file `file`.
fn assert_source(letter: &[String; 4], file: &str) {
    assert_eq!(letter[1], file, "the dead letter of {} names its input file as its source: {letter:?}", letter[0]);
}

/// Returns the digits pipeline of the daemon, over `input` into `output`, with
/// `std` as the input noise and `model` as the classifier.
fn digits_pipeline(input: &Path, output: &Path, port: u16, std: f64, model: &Path) -> String {
    format!(
        "seed: 42
source:
  kind: watch
  path: {input}
  settle_ms: 100
  poll_ms: 20
  read: {{kind: arrow_file, path: \"*.arrow\", id_column: id}}
{stages}sink: {{kind: arrow_file, path: {output}}}
daemon: {{rotate: {{rows: 2000, age_ms: 200}}, http: \"127.0.0.1:{port}\"}}
",
        input = yaml_path(input),
        stages = digits_stages_yaml(std, model),
        output = yaml_path(output),
    )
}

/// A test's directories: `in` (watched), `out` (output), and the log.
struct Dirs {
    root: tempfile::TempDir,
    input: PathBuf,
    output: PathBuf,
    log: PathBuf,
}

/// Starts the daemon on the digits pipeline over `dirs`, with noise std 0.1,
/// and waits for `/healthz`.
fn start_digits(dirs: &Dirs) -> Daemon {
    let port = free_port();
    let yaml = digits_pipeline(&dirs.input, &dirs.output, port, 0.1, &mlp());
    let pipeline = write_pipeline(dirs.root.path(), "digits.yaml", &yaml);
    let mut daemon = Daemon::start(&pipeline, Some(port), &dirs.log);
    daemon.wait_healthy();
    daemon
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().expect("a temporary directory is created");
    let input = root.path().join("in");
    let output = root.path().join("out");
    std::fs::create_dir(&input).expect("the watched directory is created");
    std::fs::create_dir(&output).expect("the output directory is created");
    let log = root.path().join("daemon.log");
    Dirs { root, input, output, log }
}

/// Starts the daemon in its own mount namespace, with a 1 MiB tmpfs mounted
/// on `output` there, and waits for `/healthz`. Returns the daemon and its
/// output directory as the test reaches it.
///
/// `unshare -rm` enters new user and mount namespaces without forking, and
/// `exec` replaces the shell with the daemon, so the child's pid is the
/// daemon's. The tmpfs exists only in that namespace, so the test reaches it
/// through `/proc/PID/root`.
fn start_on_tmpfs(pipeline: &Path, port: u16, output: &Path, log: &Path) -> (Daemon, PathBuf) {
    let needs = "this test runs the daemon under `unshare -rm` (util-linux) with a tmpfs mounted on its output \
                 directory, so it needs the unshare command and permission to create user and mount namespaces";
    let mut command = Command::new("unshare");
    command.args(["-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs \"$1\" && exec \"$0\" daemon \"$2\""]);
    command.arg(env!("CARGO_BIN_EXE_stochflow")).arg(output).arg(pipeline);
    let mut daemon = Daemon::spawn(&mut command, Some(port), log)
        .unwrap_or_else(|err| panic!("{needs}; starting unshare failed: {err}"));
    let relative = output.strip_prefix("/").expect("the output path is absolute");
    let reached = Path::new(&format!("/proc/{}/root", daemon.pid())).join(relative);
    let start = Instant::now();
    while daemon.get("/healthz").is_none() {
        if let Some(status) = daemon.exited() {
            panic!("{needs}; the command exited with {status}:\n{}", daemon.log());
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "the daemon under unshare did not serve /healthz in time:\n{}",
            daemon.log()
        );
        std::thread::sleep(POLL);
    }
    (daemon, reached)
}

#[test]
fn full_disk_pauses_then_recovers() {
    let dirs = dirs();
    let port = free_port();
    let pipeline =
        write_pipeline(dirs.root.path(), "digits.yaml", &digits_pipeline(&dirs.input, &dirs.output, port, 0.1, &mlp()));

    let (mut daemon, output) = start_on_tmpfs(&pipeline, port, &dirs.output, &dirs.log);
    let pid = daemon.pid();
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).expect("the daemon's mounts can be read");
    let output_text = dirs.output.to_str().expect("test paths are UTF-8");
    assert!(
        mounts.lines().any(|line| line.starts_with("tmpfs ") && line.split(' ').nth(1) == Some(output_text)),
        "the daemon's mount namespace has no tmpfs on {output_text}:\n{mounts}"
    );
    assert_eq!(daemon.get("/readyz").map(|(status, _)| status), Some(200), "the daemon is ready before the disk fills");

    // Fill the tmpfs until writes fail with ENOSPC.
    let filler_path = output.join("filler.bin");
    let mut filler = File::create(&filler_path).expect("the filler file is created on the tmpfs");
    let chunk = vec![0u8; 16 << 10];
    let full = loop {
        if let Err(err) = filler.write_all(&chunk).and_then(|()| filler.sync_all()) {
            break err;
        }
    };
    assert_eq!(full.raw_os_error(), Some(28), "writing the filler stops with ENOSPC, not {full}");
    drop(filler);

    let names = ["batch-0.arrow", "batch-1.arrow", "batch-2.arrow"];
    for (i, name) in names.iter().enumerate() {
        drop_arrow(&dirs.input, name, &digits_slice(i * 40..(i + 1) * 40));
    }

    let body = daemon.wait_for("/readyz to return 503", |d| match d.get("/readyz") {
        Some((503, body)) => Some(body),
        _ => None,
    });
    assert!(body.contains("cannot commit output"), "/readyz gives the commit failure as the reason: {body}");
    daemon.wait_log("commit failed");
    let log = daemon.log();
    assert!(log.contains("No space left on device"), "the logged commit failure names ENOSPC:\n{log}");
    let failures = daemon.metric("stochflow_commit_failures_total").expect("the commit failure counter is exported");
    assert!(failures > 0.0, "stochflow_commit_failures_total counts the failed commits, found {failures}");
    assert_eq!(daemon.metric("stochflow_accepting"), Some(0.0), "stochflow_accepting is 0 while commits fail");
    assert!(read_committed(&output, "part-").is_empty(), "no output file is committed while the disk is full");

    std::fs::remove_file(&filler_path).expect("the filler file is removed");
    daemon.wait_for("/readyz to return 200 after the disk has room", |d| {
        (d.get("/readyz").map(|(status, _)| status) == Some(200)).then_some(())
    });
    for name in names {
        daemon.wait_committed(&output, name);
    }
    assert_eq!(daemon.metric("stochflow_accepting"), Some(1.0), "stochflow_accepting is 1 again after recovery");
    assert!(daemon.log().contains("commits succeed again"), "the log records the recovery:\n{}", daemon.log());

    // The tmpfs goes away with the daemon's mount namespace, so read the
    // output before stopping it.
    let parts = read_committed(&output, "part-");
    assert!(read_committed(&output, "dead-").is_empty(), "no record is dead-lettered by a full disk");
    let counts = id_sample_counts(&parts);
    let expected: BTreeMap<(i64, i32), usize> = int64(&[digits_slice(0..120)], "id")
        .into_iter()
        .flat_map(|id| (0..5).map(move |sample| ((id, sample), 1)))
        .collect();
    assert_eq!(counts, expected, "every input record is in the output exactly once, with 5 samples each");

    daemon.stop(TIMEOUT);
}

#[test]
fn corrupt_arrow_inputs_are_dead_lettered() {
    let dirs = dirs();
    let port = free_port();
    let yaml = format!(
        "seed: 42
source:
  kind: watch
  path: {input}
  settle_ms: 100
  poll_ms: 20
  read: {{kind: arrow_file, path: \"*.arrow\", id_column: id, tensors: {{pixels: {{shape: [64]}}}}}}
stages:
  - {{name: input_noise, kind: add_noise, column: pixels, std: 0.1, clip: [0.0, 1.0]}}
  - {{name: classify, kind: infer, model: {model}, inputs: {{pixels: pixels}}, outputs: {{logits: logits}}}}
  - {{name: draw_class, kind: sample, column: logits, samples: 5, output: class}}
sink: {{kind: arrow_file, path: {output}}}
daemon: {{rotate: {{rows: 2000, age_ms: 200}}, http: \"127.0.0.1:{port}\"}}
",
        input = yaml_path(&dirs.input),
        output = yaml_path(&dirs.output),
        model = yaml_path(&mlp()),
    );
    let pipeline = write_pipeline(dirs.root.path(), "lists.yaml", &yaml);
    let mut daemon = Daemon::start(&pipeline, Some(port), &dirs.log);
    daemon.wait_healthy();

    // A good file, a file without its footer, a stream cut before its end
    // marker and a file with one short row, dropped together.
    let footerless = dirs.root.path().join("footerless.arrow");
    write_arrow(&footerless, &digits_as_lists(20..40, None));
    let mut bytes = std::fs::read(&footerless).expect("the written file can be read");
    bytes.truncate(bytes.len() - 16);
    drop_arrow(&dirs.input, "a_good.arrow", &digits_as_lists(0..20, None));
    drop_bytes(&dirs.input, "b_footerless.arrow", &bytes);
    drop_bytes(&dirs.input, "b_cut_stream.arrow", &cut_stream(&digits_as_lists(20..40, None)));
    let short_rows = digits_as_lists(40..60, Some(5));
    let short_id = int64(std::slice::from_ref(&short_rows), "id")[5];
    drop_arrow(&dirs.input, "c_short_row.arrow", &short_rows);
    for name in ["a_good.arrow", "b_footerless.arrow", "b_cut_stream.arrow", "c_short_row.arrow"] {
        daemon.wait_committed(&dirs.output, name);
    }
    assert_eq!(daemon.get("/healthz").map(|(status, _)| status), Some(200), "the daemon stays healthy");

    // A good file dropped afterwards is still processed.
    drop_arrow(&dirs.input, "d_good.arrow", &digits_as_lists(60..80, None));
    daemon.wait_committed(&dirs.output, "d_good.arrow");
    assert_eq!(daemon.get("/healthz").map(|(status, _)| status), Some(200), "the daemon stays healthy");
    assert!(daemon.exited().is_none(), "the daemon keeps running after corrupt inputs");

    let dead = dead_letters(&read_committed(&dirs.output, "dead-"));
    assert_eq!(dead.len(), 3, "one dead letter for each broken file and one for the short row: {dead:?}");
    let footer_letter = dead.iter().find(|row| row[0] == "b_footerless.arrow");
    let footer_letter =
        footer_letter.unwrap_or_else(|| panic!("the footerless file is dead-lettered by name: {dead:?}"));
    assert_source(footer_letter, "b_footerless.arrow");
    assert_eq!(footer_letter[2], "source", "the source rejects the footerless file");
    assert!(footer_letter[3].contains("b_footerless.arrow"), "the error names the file: {}", footer_letter[3]);
    assert!(footer_letter[3].contains("under a new name"), "the error says how to retry: {}", footer_letter[3]);
    let stream_letter = dead.iter().find(|row| row[0] == "b_cut_stream.arrow");
    let stream_letter = stream_letter.unwrap_or_else(|| panic!("the cut stream is dead-lettered by name: {dead:?}"));
    assert!(stream_letter[3].contains("end-of-stream marker"), "the error says what is missing: {}", stream_letter[3]);
    let short_letter = dead.iter().find(|row| row[0] == short_id.to_string());
    let short_letter =
        short_letter.unwrap_or_else(|| panic!("the short row is dead-lettered by its id {short_id}: {dead:?}"));
    assert_source(short_letter, "c_short_row.arrow");
    assert_eq!(short_letter[2], "source", "the source rejects the short row");
    assert!(
        short_letter[3].contains("has 63 values, expected 64"),
        "the error gives the row's length and the expected one: {}",
        short_letter[3]
    );

    let ids: BTreeSet<i64> =
        id_sample_counts(&read_committed(&dirs.output, "part-")).into_keys().map(|(id, _)| id).collect();
    let good_rows = [digits_slice(0..20), digits_slice(40..60), digits_slice(60..80)];
    let expected: BTreeSet<i64> = int64(&good_rows, "id").into_iter().filter(|&id| id != short_id).collect();
    assert_eq!(ids, expected, "the good rows, those of the short row's file included, are in the output");

    daemon.stop(TIMEOUT);
}

/// Returns a daemon pipeline that decodes and classifies the PNG files dropped into
/// `dirs.input`.
fn photos_pipeline(dirs: &Dirs, port: u16) -> String {
    format!(
        "seed: 7
source:
  kind: watch
  path: {input}
  settle_ms: 100
  poll_ms: 20
  read: {{kind: images, path: \"*.png\"}}
stages:
  - {{name: prepare, kind: preprocess, resize: {{width: 64, height: 64}}}}
  - {{name: classify, kind: infer, model: {model}, inputs: {{image: image}}, outputs: {{logits: logits}}}}
sink: {{kind: arrow_file, path: {output}, columns: [path, logits]}}
daemon: {{rotate: {{rows: 2000, age_ms: 200}}, http: \"127.0.0.1:{port}\"}}
",
        input = yaml_path(&dirs.input),
        output = yaml_path(&dirs.output),
        model = yaml_path(&repo("fixtures/models/conv_photos.onnx")),
    )
}

#[test]
fn truncated_png_is_dead_lettered() {
    let dirs = dirs();
    let port = free_port();
    let pipeline = write_pipeline(dirs.root.path(), "photos.yaml", &photos_pipeline(&dirs, port));
    let mut daemon = Daemon::start(&pipeline, Some(port), &dirs.log);
    daemon.wait_healthy();

    let photo = |name: &str| std::fs::read(repo(&format!("fixtures/photos/{name}"))).expect("the photo exists");
    let chelsea = photo("chelsea.png");
    drop_bytes(&dirs.input, "astronaut.png", &photo("astronaut.png"));
    drop_bytes(&dirs.input, "truncated.png", &chelsea[..chelsea.len() / 3]);
    for name in ["astronaut.png", "truncated.png"] {
        daemon.wait_committed(&dirs.output, name);
    }
    drop_bytes(&dirs.input, "coffee.png", &photo("coffee.png"));
    daemon.wait_committed(&dirs.output, "coffee.png");
    assert_eq!(daemon.get("/healthz").map(|(status, _)| status), Some(200), "the daemon stays healthy");

    let dead = dead_letters(&read_committed(&dirs.output, "dead-"));
    assert_eq!(dead.len(), 1, "only the truncated PNG is dead-lettered: {dead:?}");
    let [key, _, stage, error] = &dead[0];
    assert_eq!(key, "truncated.png", "the dead letter's key is the image's file name");
    assert_source(&dead[0], "truncated.png");
    assert_eq!(stage, "prepare", "the preprocess stage rejects the truncated PNG");
    assert!(!error.is_empty(), "the dead letter gives the decoding error");

    let paths: BTreeSet<String> =
        read_committed(&dirs.output, "part-").iter().flat_map(|file| strings(&file.batches, "path")).collect();
    let expected: BTreeSet<String> = ["astronaut.png", "coffee.png"].map(String::from).into();
    assert_eq!(paths, expected, "the good images are in the output");

    daemon.stop(TIMEOUT);
}

#[test]
fn dead_letter_names_one_source() {
    let dirs = dirs();
    let port = free_port();
    let pipeline = write_pipeline(dirs.root.path(), "photos.yaml", &photos_pipeline(&dirs, port));
    let mut daemon = Daemon::start(&pipeline, Some(port), &dirs.log);
    daemon.wait_healthy();

    // The good image and the truncated one reach the `infer` stage's
    // regrouping close together, so they share one batch from there on.
    let photo = std::fs::read(repo("fixtures/photos/astronaut.png")).expect("the photo exists");
    drop_bytes(&dirs.input, "good.png", &photo);
    drop_bytes(&dirs.input, "truncated.png", &photo[..photo.len() / 3]);
    daemon.wait_committed(&dirs.output, "good.png");
    daemon.wait_committed(&dirs.output, "truncated.png");

    let dead = dead_letters(&read_committed(&dirs.output, "dead-"));
    assert_eq!(dead.len(), 1, "only the truncated PNG is dead-lettered: {dead:?}");
    assert_eq!(dead[0][1], "truncated.png", "the dead letter's source is the truncated file alone");
    daemon.stop(TIMEOUT);
}

#[test]
fn sighup_reloads_or_keeps_old_pipeline() {
    let dirs = dirs();
    let port = free_port();
    let pipeline =
        write_pipeline(dirs.root.path(), "digits.yaml", &digits_pipeline(&dirs.input, &dirs.output, port, 0.1, &mlp()));
    let mut daemon = Daemon::start(&pipeline, Some(port), &dirs.log);
    daemon.wait_healthy();

    // Every file contains the same ids, so equal settings give equal noise.
    let records = digits_slice(0..20);
    drop_arrow(&dirs.input, "a.arrow", &records);
    daemon.wait_committed(&dirs.output, "a.arrow");
    let first = read_committed(&dirs.output, "part-");

    // A good edit: more input noise.
    write_pipeline(dirs.root.path(), "digits.yaml", &digits_pipeline(&dirs.input, &dirs.output, port, 0.3, &mlp()));
    daemon.signal("HUP");
    daemon.wait_metric("stochflow_reloads_total{result=\"ok\"}", 1.0);
    daemon.wait_log("reloaded pipeline running");
    drop_arrow(&dirs.input, "b.arrow", &records);
    daemon.wait_committed(&dirs.output, "b.arrow");
    let second: Vec<CommittedFile> = read_committed(&dirs.output, "part-").into_iter().skip(first.len()).collect();
    assert!(!second.is_empty(), "b.arrow is committed in new files");
    for file in &second {
        assert_ne!(config_sha256(file), config_sha256(&first[0]), "{} is written under the new settings", file.name);
    }
    let (old_pixels, new_pixels) = (pixels_by_id(&first), pixels_by_id(&second));
    assert_eq!(new_pixels.len(), 20, "every record of b.arrow is in the new files");
    for (id, pixels) in &new_pixels {
        assert_ne!(Some(pixels), old_pixels.get(id), "record {id} gets the new noise after the reload");
    }

    // A file that is not YAML is rejected.
    let good_text = std::fs::read_to_string(&pipeline).expect("the pipeline file can be read");
    std::fs::write(&pipeline, "seed: 42\nsource: [kind: watch\n").expect("the pipeline file is written");
    daemon.signal("HUP");
    daemon.wait_metric("stochflow_reloads_total{result=\"rejected\"}", 1.0);
    daemon.wait_log("reload rejected");
    assert_eq!(daemon.get("/readyz").map(|(status, _)| status), Some(200), "a rejected reload leaves the daemon ready");

    // So are a stage whose model is missing, and changes to settings that
    // only a restart applies.
    let missing = dirs.root.path().join("missing_model.onnx");
    let other_port = format!("127.0.0.1:{}", free_port());
    let edits = [
        (mlp().to_str().unwrap().to_string(), missing.to_str().unwrap().to_string(), "missing_model.onnx"),
        (String::from("settle_ms: 100"), String::from("settle_ms: 200"), "changes `source.settle_ms` from 100 to 200"),
        (format!("127.0.0.1:{port}"), other_port, "changes `daemon.http`"),
    ];
    for (rejected, (from, to, message)) in (2..).zip(edits) {
        assert!(good_text.contains(&from), "the pipeline file contains {from:?}");
        std::fs::write(&pipeline, good_text.replace(&from, &to)).expect("the pipeline file is written");
        daemon.signal("HUP");
        daemon.wait_metric("stochflow_reloads_total{result=\"rejected\"}", f64::from(rejected));
        daemon.wait_log(message);
    }
    assert_eq!(
        daemon.metric("stochflow_reloads_total{result=\"ok\"}"),
        Some(1.0),
        "no rejected file counts as reloaded"
    );
    assert_eq!(daemon.get("/readyz").map(|(status, _)| status), Some(200), "rejected reloads leave the daemon ready");

    // The pipeline loaded by the good reload keeps running.
    drop_arrow(&dirs.input, "c.arrow", &records);
    daemon.wait_committed(&dirs.output, "c.arrow");
    let third: Vec<CommittedFile> =
        read_committed(&dirs.output, "part-").into_iter().skip(first.len() + second.len()).collect();
    assert!(!third.is_empty(), "c.arrow is committed in new files");
    for file in &third {
        assert_eq!(
            config_sha256(file),
            config_sha256(&second[0]),
            "{} is written under the last good settings",
            file.name
        );
    }
    assert_eq!(pixels_by_id(&third), new_pixels, "c.arrow gets the same noise as b.arrow");

    daemon.stop(TIMEOUT);
}

#[test]
fn bad_settings_fail_at_start() {
    let dirs = dirs();

    let finite = format!(
        "seed: 1
source: {{kind: arrow_file, path: {data}, id_column: id}}
stages: []
sink: {{kind: arrow_file, path: {output}}}
daemon: {{http: null}}
",
        data = yaml_path(&repo("fixtures/data/digits_test.arrow")),
        output = yaml_path(&dirs.output),
    );
    let pipeline = write_pipeline(dirs.root.path(), "finite.yaml", &finite);
    let outcome = stochflow(&["daemon", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "a daemon over a finite source exits 1:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("source.kind"), "the error names source.kind:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("arrow_file"), "the error names the finite kind:\n{}", outcome.stderr);

    let watch = digits_pipeline(&dirs.input, &dirs.output, free_port(), 0.1, &mlp());
    let pipeline = write_pipeline(dirs.root.path(), "watch.yaml", &watch);
    let outcome = stochflow(&["run", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "`run` on a watch source exits 1:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("source.kind"), "the error names source.kind:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("stochflow daemon"), "the error points to `stochflow daemon`:\n{}", outcome.stderr);

    let occupant = TcpListener::bind("127.0.0.1:0").expect("a loopback port can be bound");
    let address = occupant.local_addr().expect("the bound address is known");
    let new_output = dirs.root.path().join("never_started");
    for output in [&dirs.output, &new_output] {
        let busy = digits_pipeline(&dirs.input, output, address.port(), 0.1, &mlp());
        let pipeline = write_pipeline(dirs.root.path(), "busy.yaml", &busy);
        let outcome = stochflow(&["daemon", pipeline.to_str().unwrap()]);
        assert_eq!(outcome.code, 1, "a daemon whose HTTP address is in use exits 1:\n{}", outcome.stderr);
        assert!(outcome.stderr.contains(&address.to_string()), "the error names {address}:\n{}", outcome.stderr);
        assert!(outcome.stderr.contains("address in use"), "the error says the address is in use:\n{}", outcome.stderr);
        assert!(!output.join(".stochflow.lock").exists(), "a daemon that did not start leaves no lock file");
    }
    assert!(!new_output.exists(), "a daemon that did not start removes the output directory it created");
    drop(occupant);

    let busy_poll = watch.replace("poll_ms: 20", "poll_ms: 0");
    let pipeline = write_pipeline(dirs.root.path(), "busy_poll.yaml", &busy_poll);
    let outcome = stochflow(&["daemon", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "a poll interval of 0 ms exits 1:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("source.poll_ms"), "the error names source.poll_ms:\n{}", outcome.stderr);

    let to_stdout = watch.replace(
        &format!("sink: {{kind: arrow_file, path: {}}}", yaml_path(&dirs.output)),
        "sink: {kind: arrow_file, path: \"-\"}",
    );
    assert_ne!(to_stdout, watch, "the pipeline's sink is replaced");
    let pipeline = write_pipeline(dirs.root.path(), "to_stdout.yaml", &to_stdout);
    let outcome = stochflow(&["daemon", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "standard output as the daemon's sink exits 1:\n{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("sink.path: `-` (standard output) is for `stochflow run`"),
        "the error names sink.path:\n{}",
        outcome.stderr
    );

    let path_pattern = watch.replace("path: \"*.arrow\"", "path: \"data/*.arrow\"");
    let pipeline = write_pipeline(dirs.root.path(), "path_pattern.yaml", &path_pattern);
    let outcome = stochflow(&["daemon", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "a path as `read.path` exits 1:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("source.read.path"), "the error names source.read.path:\n{}", outcome.stderr);
}

#[test]
fn validate_checks_daemon_pipeline() {
    let dirs = dirs();
    let good = digits_pipeline(&dirs.input, &dirs.output, free_port(), 0.1, &mlp());
    let pipeline = write_pipeline(dirs.root.path(), "good.yaml", &good);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "a good daemon pipeline validates:\n{}", outcome.stderr);
    assert!(outcome.stdout.contains("valid for `stochflow daemon`"), "validate says so:\n{}", outcome.stdout);

    let missing = dirs.root.path().join("missing.onnx");
    let bad = digits_pipeline(&dirs.input, &dirs.output, free_port(), 0.1, &missing);
    let pipeline = write_pipeline(dirs.root.path(), "bad.yaml", &bad);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "a missing model fails validation:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("stages[1].model"), "the error names the model key:\n{}", outcome.stderr);

    let misnamed = good.replace("inputs: {pixels: pixels}", "inputs: {pixel: pixels}");
    assert_ne!(misnamed, good, "the pipeline names the model input `pixels`");
    let pipeline = write_pipeline(dirs.root.path(), "misnamed.yaml", &misnamed);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "a model input the model lacks fails validation:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("stages[1].inputs.pixel"), "the error names the input key:\n{}", outcome.stderr);
    let outcome = stochflow(&["daemon", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "the daemon does not start with it either:\n{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("its inputs are pixels"),
        "the error lists the model's inputs:\n{}",
        outcome.stderr
    );

    let open_socket = format!(
        "seed: 1
source: {{kind: socket, listen: \"0.0.0.0:7001\", id_column: id}}
stages: []
sink: {{kind: arrow_file, path: {output}}}
daemon: {{http: null}}
",
        output = yaml_path(&dirs.output),
    );
    let pipeline = write_pipeline(dirs.root.path(), "open_socket.yaml", &open_socket);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "a socket outside loopback fails validation:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("source.listen"), "the error names source.listen:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("not a loopback address"), "the error says why:\n{}", outcome.stderr);

    let empty_unix = open_socket.replace("\"0.0.0.0:7001\"", "\"unix:\"");
    let pipeline = write_pipeline(dirs.root.path(), "empty_unix.yaml", &empty_unix);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "a Unix socket without a path fails validation:\n{}", outcome.stderr);
    assert!(outcome.stderr.contains("must be followed by the socket's path"), "{}", outcome.stderr);
}

#[test]
fn nullable_columns_match_first_file() {
    let dirs = dirs();
    let mut daemon = start_digits(&dirs);

    drop_arrow(&dirs.input, "a.arrow", &digits_slice(0..10));
    daemon.wait_committed(&dirs.output, "a.arrow");
    let records = digits_slice(10..20);
    let fields: Vec<arrow::datatypes::Field> =
        records.schema().fields().iter().map(|field| field.as_ref().clone().with_nullable(true)).collect();
    let nullable = Arc::new(arrow::datatypes::Schema::new(fields));
    let records = RecordBatch::try_new(nullable, records.columns().to_vec()).expect("the columns fit nullable fields");
    drop_arrow(&dirs.input, "b_nullable.arrow", &records);
    daemon.wait_committed(&dirs.output, "b_nullable.arrow");

    assert_eq!(Committed::read(&dirs.output).dead_count(), 0, "nullable fields without nulls are accepted");
    let counts = id_sample_counts(&read_committed(&dirs.output, "part-"));
    assert_eq!(counts.len(), 20 * 5, "both files' records are in the output");
    daemon.stop(Duration::from_secs(10));
}

#[test]
fn second_daemon_on_output_fails() {
    let dirs = dirs();
    let mut daemon = start_digits(&dirs);

    let other_input = dirs.root.path().join("in2");
    let other = digits_pipeline(&other_input, &dirs.output, free_port(), 0.1, &mlp());
    let other = write_pipeline(dirs.root.path(), "other.yaml", &other);
    let outcome = stochflow(&["daemon", other.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "a second daemon on the same output exits 1:\n{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("another stochflow daemon is writing to"),
        "the error says another daemon writes there:\n{}",
        outcome.stderr
    );
    assert!(daemon.is_running(), "the first daemon keeps running; log:\n{}", daemon.log_tail());
    daemon.stop(Duration::from_secs(10));
}

#[test]
fn removed_name_is_read_again_after_commit() {
    let dirs = dirs();
    let mut daemon = start_digits(&dirs);

    drop_arrow(&dirs.input, "a.arrow", &digits_slice(0..10));
    daemon.wait_committed(&dirs.output, "a.arrow");
    std::fs::remove_file(dirs.input.join("a.arrow")).expect("the processed file is removed");
    // The next commit drops the removed name from the checkpoint.
    drop_arrow(&dirs.input, "b.arrow", &digits_slice(10..20));
    daemon.wait_committed(&dirs.output, "b.arrow");
    daemon.wait_for("a.arrow to leave the checkpoint", |_| {
        (!checkpoint_units(&dirs.output).contains_key("a.arrow")).then_some(())
    });

    drop_arrow(&dirs.input, "a.arrow", &digits_slice(20..30));
    daemon.wait_committed(&dirs.output, "a.arrow");
    let counts = id_sample_counts(&read_committed(&dirs.output, "part-"));
    assert_eq!(counts.len(), 30 * 5, "the second a.arrow is read as a new file: {} rows", counts.len());
    assert!(counts.values().all(|&count| count == 1), "every record is written once");
    daemon.stop(Duration::from_secs(10));
}

#[test]
fn skipped_names_logged_once() {
    let dirs = dirs();
    let mut daemon = start_digits(&dirs);
    drop_arrow(&dirs.input, "a.arrow", &digits_slice(0..10));
    std::fs::write(dirs.input.join("notes.txt"), "not an input").expect("the note is written");
    daemon.wait_committed(&dirs.output, "a.arrow");
    daemon.wait_log("does not match `read.path`");
    daemon.stop(TIMEOUT);

    // After a restart, the file read before is skipped without a log line,
    // and the note is logged once more, however many scans pass.
    let before = daemon.log().len();
    let mut daemon = start_digits(&dirs);
    drop_arrow(&dirs.input, "b.arrow", &digits_slice(10..20));
    daemon.wait_committed(&dirs.output, "b.arrow");
    daemon.stop(TIMEOUT);
    let log = daemon.log();
    let restarted = &log[before..];
    assert_eq!(restarted.matches("does not match `read.path`").count(), 1, "the note is logged once:\n{restarted}");
    assert!(!restarted.contains("complete in the checkpoint"), "a.arrow is skipped quietly:\n{restarted}");
}

#[test]
fn json_logs_one_object_per_line() {
    let dirs = dirs();
    let port = free_port();
    let pipeline =
        write_pipeline(dirs.root.path(), "digits.yaml", &digits_pipeline(&dirs.input, &dirs.output, port, 0.1, &mlp()));
    let mut daemon = Daemon::start_with_args(&["--log-format", "json"], &pipeline, Some(port), &dirs.log);
    daemon.wait_healthy();
    drop_arrow(&dirs.input, "a.arrow", &digits_slice(0..20));
    daemon.wait_committed(&dirs.output, "a.arrow");
    daemon.stop(TIMEOUT);

    let log = daemon.log();
    let mut events = Vec::new();
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("a log line is not JSON ({err}): {line}"));
        assert!(event.is_object(), "a log line is not a JSON object: {line}");
        events.push(event);
    }
    let committed_event = events
        .iter()
        .find(|event| event["fields"]["message"] == "file committed")
        .unwrap_or_else(|| panic!("no \"file committed\" event in the log:\n{log}"));
    let file = committed_event["fields"]["file"]
        .as_str()
        .unwrap_or_else(|| panic!("the event has a file field: {committed_event}"));
    let part = dirs.output.join("part-00000000.arrow");
    assert_eq!(Path::new(file), part, "the event names the committed file");
    let size = std::fs::metadata(&part).expect("the committed file exists").len();
    assert_eq!(committed_event["fields"]["bytes"], size, "the event gives the committed file's size");
    assert_eq!(committed_event["level"], "INFO", "the event is logged at INFO");
}

/// A first file whose columns do not fit the stages must not stop the
/// daemon: it waits for a file that fits, plans against it, and sends the
/// unfit one to the dead letters.
#[test]
fn unfit_first_file_is_dead_lettered() {
    let dirs = dirs();
    let mut daemon = start_digits(&dirs);

    let ids_only = digits_slice(0..10).project(&[0]).expect("the id column is projected");
    drop_arrow(&dirs.input, "a_ids_only.arrow", &ids_only);
    daemon.wait_log("does not fit the pipeline");
    assert!(daemon.is_running(), "an unfit first file leaves the daemon running; log:\n{}", daemon.log_tail());
    assert_eq!(daemon.get("/healthz").map(|(status, _)| status), Some(200), "/healthz after the unfit file");

    // A file that cannot be opened at all is logged once, not at every scan
    // (every 20 ms here).
    drop_bytes(&dirs.input, "a_cut.arrow", &cut_stream(&digits_slice(0..10)));
    daemon.wait_log("cannot open input file");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemon.log().matches("cannot open input file").count(), 1, "one line for the cut file");

    drop_arrow(&dirs.input, "b_good.arrow", &digits_slice(10..30));
    daemon.wait_committed(&dirs.output, "b_good.arrow");
    daemon.wait_committed(&dirs.output, "a_ids_only.arrow");
    daemon.wait_committed(&dirs.output, "a_cut.arrow");
    let dead = dead_letters(&read_committed(&dirs.output, "dead-"));
    assert_eq!(dead.len(), 2, "the unfit file and the cut file are one dead letter each: {dead:?}");
    let unfit = dead.iter().find(|row| row[0] == "a_ids_only.arrow");
    let unfit = unfit.unwrap_or_else(|| panic!("the dead letter is keyed by the file name: {dead:?}"));
    assert_eq!(unfit[1], "a_ids_only.arrow", "the dead letter names the file as its source");
    assert!(dead.iter().any(|row| row[0] == "a_cut.arrow"), "the cut file is dead-lettered: {dead:?}");
    let counts = id_sample_counts(&read_committed(&dirs.output, "part-"));
    assert_eq!(counts.len(), 20 * 5, "the good file's 20 records have 5 samples each in the output");
    daemon.stop(Duration::from_secs(10));
}

/// Returns `records` in the Arrow IPC stream format without the end-of-stream
/// marker, as a writer that stopped early leaves them.
fn cut_stream(records: &RecordBatch) -> Vec<u8> {
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &records.schema()).unwrap();
    writer.write(records).unwrap();
    writer.finish().unwrap();
    let mut bytes = writer.into_inner().unwrap();
    bytes.truncate(bytes.len() - 8);
    bytes
}
