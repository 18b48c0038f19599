use std::fs::File;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::ipc::writer::FileWriter;

use crate::common::*;

/// Builds the digits pipeline with input noise, the MLP, output noise and samples,
/// with the batching and parallelism settings left open.
fn digits_pipeline(
    seed: u64,
    source_batch: usize,
    infer_batch: usize,
    workers: usize,
    sessions: usize,
    input: &std::path::Path,
) -> String {
    format!(
        r#"
seed: {seed}
source:
  kind: arrow_file
  path: {input}
  id_column: id
  batch_size: {source_batch}
stages:
  - name: input_noise
    kind: add_noise
    column: pixels
    output: noisy_pixels
    std: 0.2
    clip: [0.0, 1.0]
  - name: classify
    kind: infer
    model: {model}
    inputs: {{pixels: noisy_pixels}}
    batch_size: {infer_batch}
    sessions: {sessions}
  - name: output_noise
    kind: add_noise
    column: logits
    output: noisy_logits
    std: 0.5
  - name: draw
    kind: sample
    column: noisy_logits
    samples: 3
runtime:
  workers: {workers}
  channel_capacity: 2
sink:
  kind: arrow_file
  path: unused.arrow
  rows_per_batch: 500
"#,
        input = yaml_path(input),
        model = yaml_path(&repo("fixtures/models/mlp_digits.onnx")),
    )
}

#[test]
fn same_seed_same_bytes_across_batching_and_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let input = repo("fixtures/data/digits_test.arrow");
    let settings = [(1, 1, 1, 1), (7, 7, 1, 1), (64, 64, 2, 2), (13, 1, 3, 1), (256, 7, 2, 3)];
    let mut hashes = Vec::new();
    for (i, &(source_batch, infer_batch, workers, sessions)) in settings.iter().enumerate() {
        let output = run_ok(
            dir.path(),
            &format!("run{i}"),
            &digits_pipeline(11, source_batch, infer_batch, workers, sessions, &input),
        );
        hashes.push(sha256(&output));
    }
    for (setting, hash) in settings.iter().zip(&hashes) {
        assert_eq!(hash, &hashes[0], "batch/worker setting {setting:?} changed the output bytes");
    }
}

#[test]
fn different_seed_gives_different_noise() {
    let dir = tempfile::tempdir().unwrap();
    let input = repo("fixtures/data/digits_test.arrow");
    let first = run_ok(dir.path(), "seed11", &digits_pipeline(11, 64, 64, 1, 1, &input));
    let second = run_ok(dir.path(), "seed12", &digits_pipeline(12, 64, 64, 1, 1, &input));
    let (_, a) = read_arrow(&first);
    let (_, b) = read_arrow(&second);
    let noisy_a = tensor_f32(&a, "noisy_pixels");
    let noisy_b = tensor_f32(&b, "noisy_pixels");
    let clean = tensor_f32(&a, "pixels");
    assert_eq!(clean, tensor_f32(&b, "pixels"));
    let differing = noisy_a.iter().zip(&noisy_b).filter(|(x, y)| x != y).count();
    // Values clipped at 0 or 1 by both seeds can agree; most must differ.
    assert!(differing as f64 > 0.5 * noisy_a.len() as f64, "only {differing} of {} noisy values differ", noisy_a.len());
    assert_ne!(tensor_f32(&a, "noisy_logits"), tensor_f32(&b, "noisy_logits"));
}

#[test]
fn record_result_ignores_batch_neighbours() {
    // Run the first 100 records alone, then the whole file: the shared
    // records must come out identical, though their batches differ.
    let dir = tempfile::tempdir().unwrap();
    let full_input = repo("fixtures/data/digits_test.arrow");
    let (schema, batches) = read_arrow(&full_input);
    let all = arrow::compute::concat_batches(&schema, &batches).unwrap();
    let subset: RecordBatch = all.slice(37, 100);
    let subset_path = dir.path().join("subset.arrow");
    let mut writer = FileWriter::try_new(File::create(&subset_path).unwrap(), &Arc::clone(&schema)).unwrap();
    writer.write(&subset).unwrap();
    writer.finish().unwrap();

    let full = run_ok(dir.path(), "full", &digits_pipeline(5, 64, 64, 2, 1, &full_input));
    let part = run_ok(dir.path(), "part", &digits_pipeline(5, 9, 5, 1, 1, &subset_path));
    let (_, full_batches) = read_arrow(&full);
    let (_, part_batches) = read_arrow(&part);

    // Three samples per record: rows 3*37 .. 3*137 of the full run.
    let per_row = 64;
    let full_noisy = tensor_f32(&full_batches, "noisy_pixels");
    let part_noisy = tensor_f32(&part_batches, "noisy_pixels");
    assert_eq!(&full_noisy[3 * 37 * per_row..3 * 137 * per_row], &part_noisy[..]);
    assert_eq!(&int32(&full_batches, "class")[3 * 37..3 * 137], &int32(&part_batches, "class")[..]);
    assert_eq!(&int64(&full_batches, "id")[3 * 37..3 * 137], &int64(&part_batches, "id")[..]);
}
