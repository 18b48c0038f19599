use std::fs::File;
use std::sync::Arc;

use arrow::array::{Float32Builder, Int64Array, ListBuilder, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::writer::{FileWriter, StreamWriter};

use crate::common::*;

fn mlp() -> String {
    yaml_path(&repo("fixtures/models/mlp_digits.onnx"))
}

#[test]
fn corrupt_images_are_skipped_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for name in ["astronaut.png", "coffee.png", "rocket.jpg"] {
        std::fs::copy(repo(&format!("fixtures/photos/{name}")), photos.join(name)).unwrap();
    }
    let png = std::fs::read(repo("fixtures/photos/chelsea.png")).unwrap();
    std::fs::write(photos.join("truncated.png"), &png[..png.len() / 3]).unwrap();
    std::fs::write(photos.join("not_an_image.jpg"), b"plain text, not a JPEG").unwrap();

    let yaml = format!(
        "seed: 1\nsource: {{kind: images, path: {}}}\nstages:\n  - {{kind: preprocess, resize: {{width: 64, height: 64}}}}\n  - {{kind: infer, model: {}, inputs: {{image: image}}}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&photos),
        yaml_path(&repo("fixtures/models/conv_photos.onnx"))
    );
    let (outcome, output) = run_yaml(dir.path(), "photos", &yaml);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(
        outcome.stdout.contains("read 5 records, wrote 3 records (3 rows), skipped 2 records"),
        "{}",
        outcome.stdout
    );
    assert!(outcome.stderr.contains("truncated.png"), "the log names the truncated file: {}", outcome.stderr);
    assert!(outcome.stderr.contains("not_an_image.jpg"), "the log names the text file: {}", outcome.stderr);
    let (_, batches) = read_arrow(&output);
    assert_eq!(strings(&batches, "path"), ["astronaut.png", "coffee.png", "rocket.jpg"]);
}

#[test]
fn wrong_length_and_null_rows_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ragged_input.arrow");
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("pixels", DataType::List(Arc::new(Field::new("item", DataType::Float32, true))), true),
    ]));
    let mut lists = ListBuilder::new(Float32Builder::new());
    for row in 0..6 {
        match row {
            2 => lists.append_null(),
            4 => {
                lists.values().append_slice(&[0.5; 63]);
                lists.append(true);
            }
            _ => {
                lists.values().append_slice(&[0.25; 64]);
                lists.append(true);
            }
        }
    }
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int64Array::from_iter_values(100..106)), Arc::new(lists.finish())],
    )
    .unwrap();
    let mut writer = FileWriter::try_new(File::create(&input).unwrap(), &schema).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();

    let yaml = format!(
        "seed: 1\nsource:\n  kind: arrow_file\n  path: {}\n  id_column: id\n  tensors: {{pixels: {{shape: [64]}}}}\nstages:\n  - {{kind: infer, model: {}, inputs: {{pixels: pixels}}}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input),
        mlp()
    );
    let (outcome, output) = run_yaml(dir.path(), "ragged", &yaml);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("the log above names each one and why"), "{}", outcome.stderr);
    assert!(outcome.stdout.contains("skipped 2 records"), "{}", outcome.stdout);
    assert!(outcome.stderr.contains("record=102"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("is null"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("record=104"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("has 63 values, expected 64"), "{}", outcome.stderr);
    let (_, batches) = read_arrow(&output);
    assert_eq!(int64(&batches, "id"), [100, 101, 103, 105]);
}

#[test]
fn many_skips_summary_says_sampled() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("nan.npy");
    let mut values = vec![0.5_f32; 30 * 64];
    for record in 0..25 {
        values[record * 64] = f32::NAN;
    }
    write_npy_f32(&input, &[30, 64], &values);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}, column: pixels}}\nstages:\n  - {{name: classify, kind: infer, model: {}, inputs: {{pixels: pixels}}}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input),
        mlp()
    );
    let (outcome, _) = run_yaml(dir.path(), "many_nan", &yaml);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(
        outcome
            .stderr
            .contains("25 records skipped; the log above names the first 20 and one in every 1000 after that"),
        "{}",
        outcome.stderr
    );
    let named = outcome.stderr.lines().filter(|line| line.contains("record skipped")).count();
    assert_eq!(named, 20, "{}", outcome.stderr);
    assert!(!outcome.stderr.contains("sink: record skipped"), "skipped records are not logged in the sink's span");
}

#[test]
fn non_finite_model_input_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("nan.npy");
    let mut values = vec![0.5_f32; 4 * 64];
    values[64 + 10] = f32::NAN;
    values[3 * 64] = f32::INFINITY;
    write_npy_f32(&input, &[4, 64], &values);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}, column: pixels}}\nstages:\n  - {{kind: infer, model: {}, inputs: {{pixels: pixels}}}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input),
        mlp()
    );
    let (outcome, output) = run_yaml(dir.path(), "nan", &yaml);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("contains NaN at index [10] of the record's tensor of shape [64]"),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("contains inf at index [0] of the record's tensor of shape [64]"),
        "{}",
        outcome.stderr
    );
    let (_, batches) = read_arrow(&output);
    assert_eq!(int64(&batches, "ordinal"), [0, 2]);
}

#[test]
fn all_negative_infinity_logits_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("scores.npy");
    let mut values = vec![0.0_f32; 3 * 4];
    values[4..8].fill(f32::NEG_INFINITY);
    write_npy_f32(&input, &[3, 4], &values);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}, column: scores}}\nstages:\n  - {{kind: sample, column: scores, samples: 2}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (outcome, output) = run_yaml(dir.path(), "inf", &yaml);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("every logit is -inf"), "{}", outcome.stderr);
    let (_, batches) = read_arrow(&output);
    assert_eq!(int64(&batches, "ordinal"), [0, 0, 2, 2]);
}

/// Runs a pipeline that must fail before any work, with exit code 1 and
/// every `expected` text in its error, and no output file.
fn assert_fails(dir: &std::path::Path, name: &str, yaml: &str, expected: &[&str]) {
    let (outcome, output) = run_yaml(dir, name, yaml);
    assert_eq!(outcome.code, 1, "{name}: {}\n{}", outcome.stdout, outcome.stderr);
    for text in expected {
        assert!(outcome.stderr.contains(text), "{name}: error does not mention {text:?}:\n{}", outcome.stderr);
    }
    assert!(!output.exists(), "{name}: a failed run must not leave an output file");
}

fn digits_source() -> String {
    format!("{{kind: arrow_file, path: {}, id_column: id}}", yaml_path(&repo("fixtures/data/digits_test.arrow")))
}

#[test]
fn unknown_key_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - kind: add_noise\n    column: pixels\n    stdev: 0.1\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        digits_source()
    );
    assert_fails(dir.path(), "unknown_key", &yaml, &[":6:5: stages[0].stdev: unknown field `stdev`"]);
}

#[test]
fn output_over_key_column_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - {{kind: add_noise, column: pixels, std: 0.1, output: id}}\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        digits_source()
    );
    assert_fails(dir.path(), "key_output", &yaml, &[":4:5: stages[0]", "writes column \"id\"", "records' keys"]);

    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - {{kind: repeat, samples: 2}}\n  - {{kind: add_noise, column: pixels, std: 0.1, output: sample}}\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        digits_source()
    );
    assert_fails(dir.path(), "sample_output", &yaml, &["stages[1]", "writes column \"sample\"", "sample indices"]);
}

#[test]
fn validate_lists_rule_problems_beside_type_errors() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - kind: add_noise\n    column: pixels\n    std: lots\n  - kind: sample\n    column: logits\n    temperature: -1\nsink: {{kind: arrow_file, path: x.arrow, rows_per_batch: 0}}\nruntime: {{workers: -2}}\n",
        digits_source()
    );
    let pipeline = write_pipeline(dir.path(), "mixed.yaml", &yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    let lines: Vec<&str> = outcome.stderr.lines().filter(|line| line.starts_with("  ")).collect();
    // One line per problem, in the order of the file: type errors and the
    // rules of the sections that were read, together.
    let expected = [
        ":6:5: stages[0].std: invalid type: string \"lots\", expected a number",
        ":9:5: stages[1].temperature: must be zero or positive, found -1",
        ":10:41: sink.rows_per_batch: must be at least 1, found 0",
        ":11:11: runtime.workers: must be at least 1, found -2",
    ];
    assert_eq!(lines.len(), expected.len(), "{}", outcome.stderr);
    for (line, part) in lines.iter().zip(expected) {
        assert!(line.contains(part), "{line:?} does not contain {part:?}:\n{}", outcome.stderr);
    }
}

#[test]
fn repeated_keys_are_each_named_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - kind: add_noise\n    column: pixels\n    std: 0.1\n    std: 0.2\nsink: {{kind: arrow_file, path: x.arrow}}\nseed: 2\n",
        digits_source()
    );
    assert_fails(
        dir.path(),
        "repeated_keys",
        &yaml,
        &[
            "has 2 problems",
            ":7:5: stages[0].std: `std` is given again after its first value at line 6; keep only one",
            ":9:1: seed: `seed` is given again after its first value at line 1",
        ],
    );
}

#[test]
fn unknown_top_level_key_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages: []\nsink: {{kind: arrow_file, path: x.arrow}}\nruntim: {{}}\n",
        digits_source()
    );
    assert_fails(dir.path(), "top_key", &yaml, &[":5:1: runtim: unknown field `runtim`, expected one of `seed`"]);
}

#[test]
fn missing_model_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - {{kind: infer, model: no_such_model.onnx, inputs: {{pixels: pixels}}}}\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        digits_source()
    );
    assert_fails(dir.path(), "missing_model", &yaml, &["no_such_model.onnx", "not found", ":4:"]);
}

#[test]
fn shape_mismatch_names_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - kind: infer\n    model: {}\n    inputs: {{image: pixels}}\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        digits_source(),
        yaml_path(&repo("fixtures/models/conv_photos.onnx"))
    );
    assert_fails(dir.path(), "shape", &yaml, &["per-record shape [64]", "[N, 3, 64, 64]", ":6:"]);
}

#[test]
fn unknown_model_input_lists_real_ones() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - kind: infer\n    model: {}\n    inputs: {{pixel: pixels}}\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        digits_source(),
        mlp()
    );
    assert_fails(
        dir.path(),
        "input_name",
        &yaml,
        &[
            "the model has no input \"pixel\"; its inputs are pixels",
            "model input \"pixels\" (float32 [N, 64]) is not fed",
        ],
    );
}

#[test]
fn list_column_gets_shape_hint() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("lists.arrow");
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("pixels", DataType::List(Arc::new(Field::new("item", DataType::Float32, true))), true),
    ]));
    let mut lists = ListBuilder::new(Float32Builder::new());
    lists.values().append_slice(&[0.25; 64]);
    lists.append(true);
    let batch =
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1])), Arc::new(lists.finish())])
            .unwrap();
    let mut writer = FileWriter::try_new(File::create(&input).unwrap(), &schema).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {{kind: arrow_file, path: {}, id_column: id}}\nstages:\n  - {{kind: infer, model: {}, inputs: {{pixels: pixels}}}}\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        yaml_path(&input),
        mlp()
    );
    assert_fails(
        dir.path(),
        "list",
        &yaml,
        &["not a float32, uint8 or uint16 tensor", "tensors: {pixels: {shape: [64]}}"],
    );
}

#[test]
fn zero_size_and_nan_bound_named() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - {{kind: add_noise, column: pixels, std: 0.1, clip: [.nan, 1]}}\n  - {{kind: infer, model: {}, inputs: {{pixels: pixels}}, batch_size: 0}}\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        digits_source(),
        mlp()
    );
    assert_fails(
        dir.path(),
        "zero_nan",
        &yaml,
        &["stages[1].batch_size: must be at least 1, found 0", "bounds must not be NaN, found [NaN, 1]"],
    );
}

#[test]
fn missing_source_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "seed: 1\nsource: {kind: npy, path: missing.npy}\nstages: []\nsink: {kind: arrow_file, path: x.arrow}\n";
    assert_fails(dir.path(), "missing_source", yaml, &["missing.npy not found", "source.path"]);
}

#[test]
fn truncated_npy_is_rejected_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("short.npy");
    write_npy_f32(&input, &[10, 64], &vec![0.0; 64 * 3]);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}}}\nstages: []\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        yaml_path(&input)
    );
    assert_fails(dir.path(), "short_npy", &yaml, &["truncated", "[10, 64]"]);
}

#[test]
fn non_arrow_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("fake.arrow");
    std::fs::write(&input, b"this is not Arrow").unwrap();
    let yaml = format!(
        "seed: 1\nsource: {{kind: arrow_file, path: {}}}\nstages: []\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        yaml_path(&input)
    );
    assert_fails(dir.path(), "fake_arrow", &yaml, &["fake.arrow is not a valid Arrow IPC file"]);
}

#[test]
fn unknown_sink_column_lists_available() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages: []\nsink: {{kind: arrow_file, path: x.arrow, columns: [id, logits]}}\n",
        digits_source()
    );
    assert_fails(
        dir.path(),
        "sink_columns",
        &yaml,
        &["column \"logits\" does not reach the sink", "available columns: id, pixels, label"],
    );
}

#[test]
fn validate_reports_every_problem_with_lines() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - kind: add_noise\n    column: pixels\n    std: -0.5\n  - kind: sample\n    column: logits\n    temperature: -1\n    samples: 0\nsink: {{kind: arrow_file, path: x.arrow, rows_per_batch: 0}}\n",
        digits_source()
    );
    let pipeline = write_pipeline(dir.path(), "many.yaml", &yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("has 4 problems"), "{}", outcome.stderr);
    for expected in [
        ":6:5: stages[0].std: must be zero or positive, found -0.5",
        ":9:5: stages[1].temperature",
        ":10:5: stages[1].samples",
        ":11:",
        "sink.rows_per_batch",
    ] {
        assert!(outcome.stderr.contains(expected), "missing {expected:?} in:\n{}", outcome.stderr);
    }
}

#[test]
fn missing_onnx_runtime_names_both_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - {{kind: infer, model: {}, inputs: {{pixels: pixels}}}}\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        digits_source(),
        mlp()
    );
    let pipeline = write_pipeline(dir.path(), "no_ort.yaml", &yaml);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stochflow"))
        .args(["run", pipeline.to_str().unwrap()])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ORT_DYLIB_PATH is set to /nonexistent/libonnxruntime.so, which does not exist"),
        "{stderr}"
    );
}

#[test]
fn missing_onnx_runtime_lists_places() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {}\nstages:\n  - {{kind: infer, model: {}, inputs: {{pixels: pixels}}}}\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        digits_source(),
        mlp()
    );
    let pipeline = write_pipeline(dir.path(), "no_ort.yaml", &yaml);
    let cache = dir.path().join("empty-cache");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stochflow"))
        .args(["run", pipeline.to_str().unwrap()])
        .env_remove("ORT_DYLIB_PATH")
        .env("STOCHFLOW_PYTHON", "/nonexistent/python3")
        .env("STOCHFLOW_CACHE_DIR", &cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for expected in [
        "cannot find the ONNX Runtime library",
        "ORT_DYLIB_PATH (not set)",
        "/nonexistent/python3 did not start",
        cache.to_str().unwrap(),
        "set ORT_DYLIB_PATH",
        "pip install onnxruntime==1.31.1",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
}

#[test]
fn cached_onnx_runtime_skips_python() {
    let dir = tempfile::tempdir().unwrap();
    // A cache holding a file that is not a library, and a Python that
    // leaves a mark when it is started.
    let cache = dir.path().join("cache");
    let cached = cache.join("onnxruntime-1.31.1").join("libonnxruntime.so.1.31.1");
    std::fs::create_dir_all(cached.parent().unwrap()).unwrap();
    std::fs::write(&cached, b"not a shared library").unwrap();
    let mark = dir.path().join("python-started");
    let python = dir.path().join("python3");
    std::fs::write(&python, format!("#!/bin/sh\ntouch {}\nexit 1\n", mark.display())).unwrap();
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stochflow"))
        .args(["validate", repo("pipelines/digits.yaml").to_str().unwrap()])
        .env_remove("ORT_DYLIB_PATH")
        .env("STOCHFLOW_PYTHON", &python)
        .env("STOCHFLOW_CACHE_DIR", &cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "the fake library cannot load: {stderr}");
    assert!(stderr.contains(cached.to_str().unwrap()), "the error names the cached library: {stderr}");
    assert!(!mark.exists(), "Python is not started when the cache has the library");
}

#[test]
fn truncated_jpeg_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("jpegs");
    std::fs::create_dir(&photos).unwrap();
    let jpeg = std::fs::read(repo("fixtures/photos/rocket.jpg")).unwrap();
    std::fs::write(photos.join("full.jpg"), &jpeg).unwrap();
    std::fs::write(photos.join("half.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let yaml = format!(
        "seed: 1\nsource: {{kind: images, path: {}}}\nstages:\n  - {{kind: preprocess, resize: {{width: 32, height: 32}}}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&photos)
    );
    let (outcome, output) = run_yaml(dir.path(), "jpegs", &yaml);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("the JPEG file is truncated"), "{}", outcome.stderr);
    let (_, batches) = read_arrow(&output);
    assert_eq!(strings(&batches, "path"), ["full.jpg"]);
}

#[test]
fn arrow_stream_format_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (schema, batches) = read_arrow(&repo("fixtures/data/digits_test.arrow"));
    let stream = dir.path().join("digits.arrows");
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(File::create(&stream).unwrap(), &schema).unwrap();
    for batch in &batches {
        writer.write(batch).unwrap();
    }
    writer.finish().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {{kind: arrow_file, path: {}, id_column: id}}\nstages: []\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&stream)
    );
    let output = run_ok(dir.path(), "stream", &yaml);
    let (_, written) = read_arrow(&output);
    assert_eq!(rows(&written), 450);
}

#[test]
fn stream_without_end_marker_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from_iter_values(0..5))]).unwrap();
    let mut writer = StreamWriter::try_new(Vec::new(), &schema).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
    let complete = writer.into_inner().unwrap();

    let input = dir.path().join("stream.arrow");
    std::fs::write(&input, &complete).unwrap();
    let yaml = format!(
        "seed: 1\nsource: {{kind: arrow_file, path: {}, id_column: id}}\nstages: []\nsink: {{kind: arrow_file, path: x.arrow}}\n",
        yaml_path(&input)
    );
    let output = run_ok(dir.path(), "complete_stream", &yaml);
    assert_eq!(rows(&read_arrow(&output).1), 5, "a closed stream is read whole");
    std::fs::remove_file(&output).unwrap();

    std::fs::write(&input, &complete[..complete.len() - 8]).unwrap();
    assert_fails(
        dir.path(),
        "cut_stream",
        &yaml,
        &["stream.arrow is not a valid Arrow IPC file", "end-of-stream marker"],
    );
}
