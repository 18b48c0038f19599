use crate::common::*;

#[test]
fn inspect_lists_signature_and_dropout() {
    let outcome = stochflow(&["inspect", repo("fixtures/models/mlp_digits.onnx").to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    for expected in [
        "IR version: 8",
        "opsets: ai.onnx 17",
        "pixels  float32  [N, 64]",
        "logits  float32  [N, 10]",
        "dropout nodes: 1",
        "ratio 0.2",
    ] {
        assert!(outcome.stdout.contains(expected), "missing {expected:?} in:\n{}", outcome.stdout);
    }
}

#[test]
fn inspect_decoder_shows_output_shape() {
    let outcome = stochflow(&["inspect", repo("fixtures/models/digits_decoder.onnx").to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(outcome.stdout.contains("z  float32  [N, 8]"), "{}", outcome.stdout);
    assert!(outcome.stdout.contains("dropout nodes: 0"), "{}", outcome.stdout);
}

#[test]
fn inspect_rejects_non_model() {
    let outcome = stochflow(&["inspect", repo("fixtures/README.md").to_str().unwrap()]);
    assert_eq!(outcome.code, 1);
    assert!(outcome.stderr.contains("is not an ONNX model"), "{}", outcome.stderr);
}

#[test]
fn validate_accepts_shipped_pipelines() {
    let pipelines = [
        "pipelines/digits.yaml",
        "pipelines/photos.yaml",
        "pipelines/photos_tta.yaml",
        "pipelines/digits_mc_dropout.yaml",
        "pipelines/sampling.yaml",
        "pipelines/generator.yaml",
        "pipelines/generator_interpolate.yaml",
    ];
    for pipeline in pipelines {
        let outcome = stochflow(&["validate", repo(pipeline).to_str().unwrap()]);
        assert_eq!(outcome.code, 0, "{pipeline}: {}", outcome.stderr);
        assert!(outcome.stdout.contains("is valid"), "{}", outcome.stdout);
    }
}

#[test]
fn run_prints_summary_and_records_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("digits.arrow");
    let outcome =
        stochflow(&["run", repo("pipelines/digits.yaml").to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(
        outcome.stdout.starts_with("read 450 records, wrote 450 records (2250 rows), skipped 0 records in "),
        "{}",
        outcome.stdout
    );

    let (schema, batches) = read_arrow(&output);
    assert_eq!(rows(&batches), 2250);
    let metadata = schema.metadata();
    assert_eq!(metadata["stochflow.seed"], "42");
    assert_eq!(metadata["stochflow.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(metadata["stochflow.model.classify.sha256"], sha256(&repo("fixtures/models/mlp_digits.onnx")));
    assert_eq!(metadata["stochflow.config_sha256"].len(), 64);
    assert!(!dir.path().join("digits.arrow.partial").exists());
}

#[test]
fn seed_option_overrides_file() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = repo("pipelines/digits.yaml");
    let first = dir.path().join("a.arrow");
    let second = dir.path().join("b.arrow");
    let again = dir.path().join("c.arrow");
    for (path, seed) in [(&first, "1"), (&second, "2"), (&again, "1")] {
        let outcome =
            stochflow(&["run", pipeline.to_str().unwrap(), "--seed", seed, "--output", path.to_str().unwrap()]);
        assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    }
    assert_eq!(sha256(&first), sha256(&again));
    assert_ne!(sha256(&first), sha256(&second));
    let (schema, _) = read_arrow(&second);
    assert_eq!(schema.metadata()["stochflow.seed"], "2");
}

#[test]
fn tta_pipeline_summarizes_each_photo() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("tta.arrow");
    let outcome =
        stochflow(&["run", repo("pipelines/photos_tta.yaml").to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let (schema, batches) = read_arrow(&output);
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "path",
            "logits_mean",
            "logits_std",
            "class_vote",
            "class_agreement",
            "predictive_entropy",
            "mutual_information"
        ]
    );
    assert_eq!(strings(&batches, "path"), ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg"]);
    let spread = tensor_f32(&batches, "logits_std");
    assert!(spread.iter().all(|s| *s > 0.0), "augmented copies must give different logits");
}

/// Starts `stochflow run PIPELINE` with its output captured.
fn spawn_run(pipeline: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_stochflow"))
        .args(["run", pipeline.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends SIGTERM to `child`.
fn terminate(child: &std::process::Child) {
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill -TERM {} failed", child.id());
}

#[test]
fn sigterm_commits_records_read_so_far() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    let records = 20_000;
    write_npy_f32(&input, &[records, 64], &vec![0.5; records * 64]);
    let output = dir.path().join("stopped.arrow");
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}, column: pixels, batch_size: 64}}\nstages:\n  - {{kind: repeat, samples: 100}}\n  - {{kind: add_noise, column: pixels, std: 0.1}}\n  - {{kind: infer, model: {}, inputs: {{pixels: pixels}}}}\nsink: {{kind: arrow_file, path: {}, columns: [ordinal, sample]}}\n",
        yaml_path(&input),
        yaml_path(&repo("fixtures/models/mlp_digits.onnx")),
        yaml_path(&output)
    );
    let pipeline = write_pipeline(dir.path(), "long.yaml", &yaml);
    let child = spawn_run(&pipeline);

    // Wait until rows are being written, then stop the run.
    let partial = dir.path().join("stopped.arrow.partial");
    let started = std::time::Instant::now();
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < 100_000 {
        assert!(started.elapsed().as_secs() < 60, "the run did not start writing");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    terminate(&child);
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(143), "{stderr}");
    assert!(!partial.exists(), "the partial file must be committed or removed");

    let (_, batches) = read_arrow(&output);
    let written = rows(&batches);
    assert!(written > 0, "no rows were committed");
    assert!(written < records * 100, "all {written} rows were written before the signal");
    assert_eq!(written % 100, 0, "every record read is finished with all its samples");
}

#[test]
fn early_sigterm_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &[64, 64], &vec![0.5; 64 * 64]);
    let output = dir.path().join("early.arrow");
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}, column: pixels}}\nstages:\n  - {{kind: infer, model: {}, inputs: {{pixels: pixels}}}}\nsink: {{kind: arrow_file, path: {}}}\n",
        yaml_path(&input),
        yaml_path(&repo("fixtures/models/mlp_digits.onnx")),
        yaml_path(&output)
    );
    let pipeline = write_pipeline(dir.path(), "early.yaml", &yaml);
    let child = spawn_run(&pipeline);

    // SIGTERM as soon as the process catches it: while the model loads, as a
    // rule, or else while the records are read.
    const SIGTERM_BIT: u64 = 1 << (15 - 1);
    let started = std::time::Instant::now();
    while crate::daemon_support::caught_signals(child.id()) & SIGTERM_BIT == 0 {
        assert!(started.elapsed().as_secs() < 30, "the run did not catch SIGTERM");
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    terminate(&child);
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(143), "the run reports the signal in its exit code: {stderr}");
    let before_start = stderr.contains("stop signal received before the first record was read");
    let during_run = stderr.contains("interrupted: the output contains the records read before the stop signal");
    assert!(before_start || during_run, "the run says what the signal did: {stderr}");
    assert!(!dir.path().join("early.arrow.partial").exists(), "no partial file is left");
    assert_eq!(output.exists(), during_run, "an output file exists only if records were read");
}

#[test]
fn output_over_input_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &[2, 2], &[0.0; 4]);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}}}\nstages: []\nsink: {{kind: arrow_file, path: out.arrow}}\n",
        yaml_path(&input)
    );
    let pipeline = write_pipeline(dir.path(), "self.yaml", &yaml);
    let outcome = stochflow(&["run", pipeline.to_str().unwrap(), "--output", input.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("is an input of the pipeline"), "{}", outcome.stderr);
    assert_eq!(std::fs::metadata(&input).unwrap().len(), 128 + 16, "the input must be untouched");

    let folder = dir.path().join("a_folder");
    std::fs::create_dir(&folder).unwrap();
    let outcome = stochflow(&["run", pipeline.to_str().unwrap(), "--output", folder.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("is not a regular file"), "{}", outcome.stderr);
}

#[test]
fn output_symlink_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &[2, 2], &[0.0; 4]);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}}}\nstages: []\nsink: {{kind: arrow_file, path: out.arrow}}\n",
        yaml_path(&input)
    );
    let pipeline = write_pipeline(dir.path(), "link.yaml", &yaml);
    std::fs::create_dir(dir.path().join("real")).unwrap();
    let link = dir.path().join("link.arrow");
    std::os::unix::fs::symlink("real/target.arrow", &link).unwrap();
    let outcome = stochflow(&["run", pipeline.to_str().unwrap(), "--output", link.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link must stay a link");
    let (_, batches) = read_arrow(&dir.path().join("real/target.arrow"));
    assert_eq!(rows(&batches), 2);
}
