//! Truncated categorical, sequence, Bernoulli, Gaussian and stochastic
//! rounding draws, and the `aggregate` stage, through the real binary.
//!
//! Statistical checks use fixed seeds and tests at p = 0.001: a correct
//! sampler fails one of them for about one seed in a thousand.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, FixedSizeListArray, Float32Array, Int32Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Float32Type, Int32Type, Schema};
use arrow::ipc::writer::FileWriter;

use crate::common::*;

/// Chi-square critical values at p = 0.001, by degrees of freedom.
const CHI_SQUARE_0_001: [f64; 5] = [0.0, 10.828, 13.816, 16.266, 18.467];

/// Runs one stage over `records` copies of `scores` (row shape `shape`) and
/// returns the output batches.
fn run_stage(dir: &Path, name: &str, shape: &[usize], scores: &[f32], records: usize, stage: &str) -> Vec<RecordBatch> {
    let input = dir.join(format!("{name}.npy"));
    let values: Vec<f32> = (0..records).flat_map(|_| scores.iter().copied()).collect();
    let mut full_shape = vec![records];
    full_shape.extend_from_slice(shape);
    write_npy_f32(&input, &full_shape, &values);
    let yaml = format!(
        "seed: 2024\nsource: {{kind: npy, path: {}, column: scores}}\nstages:\n  - {{name: draw, kind: sample, column: scores, {stage}}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    read_arrow(&run_ok(dir, name, &yaml)).1
}

/// Chi-square statistic of observed class counts against probabilities;
/// classes of probability 0 must not be observed at all.
fn chi_square(classes: &[i32], probabilities: &[f64]) -> f64 {
    let n = classes.len() as f64;
    let mut counts = vec![0usize; probabilities.len()];
    for &c in classes {
        counts[c as usize] += 1;
    }
    let mut statistic = 0.0;
    for (class, (&observed, &p)) in counts.iter().zip(probabilities).enumerate() {
        if p == 0.0 {
            assert_eq!(observed, 0, "class {class} was truncated away but drawn {observed} times");
        } else {
            statistic += (observed as f64 - n * p).powi(2) / (n * p);
        }
    }
    statistic
}

fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|w| w / total).collect()
}

/// `probabilities` with the classes outside `kept` zeroed, renormalized.
fn renormalized(probabilities: &[f64], kept: &[usize]) -> Vec<f64> {
    let total: f64 = kept.iter().map(|&c| probabilities[c]).sum();
    (0..probabilities.len()).map(|c| if kept.contains(&c) { probabilities[c] / total } else { 0.0 }).collect()
}

const PROBABILITIES: [f32; 5] = [0.4, 0.3, 0.15, 0.1, 0.05];

#[test]
fn top_k_frequencies_match_renormalized() {
    let dir = tempfile::tempdir().unwrap();
    let logits = [1.0_f32, 0.5, 0.0, -0.5, -2.0];
    let batches = run_stage(dir.path(), "topk", &[5], &logits, 4000, "top_k: 3, samples: 10");
    let classes = int32(&batches, "class");
    assert_eq!(classes.len(), 40_000);
    let expected = renormalized(&softmax(&logits.map(f64::from)), &[0, 1, 2]);
    let statistic = chi_square(&classes, &expected);
    assert!(statistic < CHI_SQUARE_0_001[2], "chi-square {statistic} with 2 degrees of freedom");
}

#[test]
fn top_p_frequencies_match_renormalized() {
    let dir = tempfile::tempdir().unwrap();
    // 0.4 + 0.3 = 0.7 < 0.8, so the class that crosses 0.8 (0.15) is kept.
    let batches =
        run_stage(dir.path(), "topp", &[5], &PROBABILITIES, 4000, "from: probabilities, top_p: 0.8, samples: 10");
    let expected = renormalized(&PROBABILITIES.map(f64::from), &[0, 1, 2]);
    let statistic = chi_square(&int32(&batches, "class"), &expected);
    assert!(statistic < CHI_SQUARE_0_001[2], "chi-square {statistic} with 2 degrees of freedom");
}

#[test]
fn min_p_frequencies_match_renormalized() {
    let dir = tempfile::tempdir().unwrap();
    // min_p 0.5 keeps p >= 0.2: classes 0 and 1.
    let batches =
        run_stage(dir.path(), "minp", &[5], &PROBABILITIES, 4000, "from: probabilities, min_p: 0.5, samples: 10");
    let expected = renormalized(&PROBABILITIES.map(f64::from), &[0, 1]);
    let statistic = chi_square(&int32(&batches, "class"), &expected);
    assert!(statistic < CHI_SQUARE_0_001[1], "chi-square {statistic} with 1 degree of freedom");
}

#[test]
fn top_k_above_classes_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("few.npy");
    write_npy_f32(&input, &[1, 3], &[0.0, 1.0, 2.0]);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}}}\nstages:\n  - {{kind: sample, column: tensor, top_k: 4}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (outcome, _) = run_yaml(dir.path(), "few", &yaml);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("stages[0].top_k: top_k 4 exceeds the 3 classes"), "{}", outcome.stderr);
}

#[test]
fn sequence_steps_sample_independently() {
    let dir = tempfile::tempdir().unwrap();
    // Row shape [3 steps, 4 classes]; each step has its own distribution.
    let steps = [[2.0_f32, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.5, 1.5, 0.0]];
    let scores: Vec<f32> = steps.iter().flatten().copied().collect();
    let batches = run_stage(dir.path(), "seq", &[3, 4], &scores, 3000, "samples: 4");
    let (schema, _) = read_arrow(&dir.path().join("seq.arrow"));
    let field = schema.field_with_name("class").unwrap();
    assert_eq!(field.metadata()["ARROW:extension:metadata"], r#"{"shape":[3]}"#);
    let mut classes = Vec::new();
    for batch in &batches {
        let list = batch.column_by_name("class").unwrap().as_fixed_size_list();
        assert_eq!(list.value_length(), 3);
        classes.extend_from_slice(list.values().as_primitive::<Int32Type>().values());
    }
    assert_eq!(classes.len(), 3000 * 4 * 3);
    for (t, step) in steps.iter().enumerate() {
        let drawn: Vec<i32> = classes.iter().skip(t).step_by(3).copied().collect();
        let statistic = chi_square(&drawn, &softmax(&step.map(f64::from)));
        assert!(statistic < CHI_SQUARE_0_001[3], "step {t}: chi-square {statistic} with 3 degrees of freedom");
    }
}

#[test]
fn class_axis_can_be_first() {
    let dir = tempfile::tempdir().unwrap();
    // Row shape [2 classes, 3 steps], classes on axis 0, temperature 0:
    // the argmax of each column.
    let scores = [0.0_f32, 5.0, 1.0, 2.0, 1.0, 0.5];
    let batches = run_stage(dir.path(), "axis0", &[2, 3], &scores, 2, "axis: 0, temperature: 0");
    let list = batches[0].column_by_name("class").unwrap().as_fixed_size_list();
    assert_eq!(list.values().as_primitive::<Int32Type>().values(), &[1, 0, 0, 1, 0, 0]);
}

#[test]
fn bernoulli_frequencies_match_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    let p = [0.1_f32, 0.5, 0.9, 0.0, 1.0];
    let records = 20_000;
    let batches = run_stage(dir.path(), "bern", &[5], &p, records, "distribution: bernoulli, from: probabilities");
    let draws = tensor_i32(&batches, "draw");
    assert_eq!(draws.len(), records * 5);
    let mut statistic = 0.0;
    for (i, &pi) in p.iter().enumerate() {
        let ones = draws.iter().skip(i).step_by(5).filter(|&&d| d == 1).count() as f64;
        assert!(draws.iter().skip(i).step_by(5).all(|&d| d == 0 || d == 1));
        let n = records as f64;
        let pi = f64::from(pi);
        if pi == 0.0 || pi == 1.0 {
            assert_eq!(ones, n * pi, "element {i} with p = {pi}");
        } else {
            // Chi-square of the two cells (ones, zeros): 1 degree of freedom each.
            statistic += (ones - n * pi).powi(2) / (n * pi) + (ones - n * pi).powi(2) / (n * (1.0 - pi));
        }
    }
    assert!(statistic < CHI_SQUARE_0_001[3], "chi-square {statistic} with 3 degrees of freedom");
}

#[test]
fn bernoulli_logits_use_sigmoid() {
    let dir = tempfile::tempdir().unwrap();
    let records = 20_000;
    let batches = run_stage(dir.path(), "bernlogit", &[1], &[2.0], records, "distribution: bernoulli, output: hit");
    let ones = tensor_i32(&batches, "hit").iter().filter(|&&d| d == 1).count() as f64;
    let (n, p) = (records as f64, 1.0 / (1.0 + (-2.0_f64).exp()));
    let statistic = (ones - n * p).powi(2) / (n * p * (1.0 - p));
    assert!(statistic < CHI_SQUARE_0_001[1], "chi-square {statistic}: {ones} ones of {n}, p = {p}");
}

#[test]
fn invalid_probability_rejects_record() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("badp.npy");
    write_npy_f32(&input, &[3, 2], &[0.5, 0.5, 0.5, 1.5, 0.0, 1.0]);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}}}\nstages:\n  - {{kind: sample, distribution: bernoulli, column: tensor, from: probabilities, samples: 2}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (outcome, output) = run_yaml(dir.path(), "badp", &yaml);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("probability 1.5 is outside [0, 1]"), "{}", outcome.stderr);
    let (_, batches) = read_arrow(&output);
    assert_eq!(int64(&batches, "ordinal"), [0, 0, 2, 2]);
    assert_eq!(tensor_i32(&batches, "draw")[4..], [0, 1, 0, 1]);
}

/// Writes `rows` copies of a two-column record (mean, spread) as an Arrow
/// file of tensor columns of shape [2].
fn write_gaussian_input(path: &Path, rows: usize, mean: [f32; 2], spread: [f32; 2]) {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list = |values: [f32; 2]| -> Arc<dyn Array> {
        let flat: Vec<f32> = (0..rows).flat_map(|_| values).collect();
        Arc::new(FixedSizeListArray::new(item.clone(), 2, Arc::new(Float32Array::from(flat)), None))
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("mu", DataType::FixedSizeList(item.clone(), 2), false),
        Field::new("spread", DataType::FixedSizeList(item.clone(), 2), false),
    ]));
    let ids: Arc<dyn Array> = Arc::new(Int64Array::from((0..rows as i64).collect::<Vec<_>>()));
    let batch = RecordBatch::try_new(schema.clone(), vec![ids, list(mean), list(spread)]).unwrap();
    let mut writer = FileWriter::try_new(File::create(path).unwrap(), &schema).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
}

#[test]
fn gaussian_moments_and_ks() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 10_000;
    let (mean, std) = ([1.5_f32, -2.0], [1.0_f64, 2.0]);
    for (name, spread, key) in [("logvar", [0.0, 4.0f32.ln()], "log_variance"), ("std", [1.0, 2.0], "std")] {
        let input = dir.path().join(format!("{name}_input.arrow"));
        write_gaussian_input(&input, rows, mean, spread);
        let yaml = format!(
            "seed: 5\nsource: {{kind: arrow_file, path: {}, id_column: id}}\nstages:\n  - {{kind: sample, distribution: gaussian, column: mu, {key}: spread, samples: 2}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
            yaml_path(&input)
        );
        let (_, batches) = read_arrow(&run_ok(dir.path(), name, &yaml));
        let draws = tensor_f32(&batches, "draw");
        assert_eq!(draws.len(), rows * 2 * 2);
        for i in 0..2 {
            let values: Vec<f64> = draws.iter().skip(i).step_by(2).map(|&v| f64::from(v)).collect();
            let n = values.len() as f64;
            let (m, s) = mean_std(&values);
            let (want_m, want_s) = (f64::from(mean[i]), std[i]);
            // Four standard errors of the mean and of the standard deviation.
            assert!((m - want_m).abs() < 4.0 * want_s / n.sqrt(), "{name} element {i}: mean {m}, want {want_m}");
            assert!((s - want_s).abs() < 4.0 * want_s / (2.0 * n).sqrt(), "{name} element {i}: std {s}, want {want_s}");
            let ks = ks_normal(&values, want_m, want_s);
            assert!(ks < 1.95 / n.sqrt(), "{name} element {i}: KS statistic {ks}");
        }
    }
}

#[test]
fn stochastic_rounding_is_unbiased() {
    let dir = tempfile::tempdir().unwrap();
    let records = 20_000;
    // With step 0.5: 0.3 lies 0.6 of the way from 0 to 0.5, -1.7 lies 0.6
    // of the way from -2 to -1.5, and 2 is on the grid.
    let values = [0.3_f32, -1.7, 2.0];
    let batches =
        run_stage(dir.path(), "round", &[3], &values, records, "distribution: stochastic_rounding, step: 0.5");
    let rounded = tensor_f32(&batches, "scores");
    assert_eq!(rounded.len(), records * 3);
    let n = records as f64;
    for (i, (&x, low)) in values.iter().zip([0.0_f32, -2.0, 2.0]).enumerate() {
        let column: Vec<f32> = rounded.iter().skip(i).step_by(3).copied().collect();
        assert!(column.iter().all(|&v| v == low || v == low + 0.5), "element {i} left the grid");
        let up = column.iter().filter(|&&v| v != low).count() as f64;
        let p = if x == 2.0 { 0.0 } else { 0.6 };
        // Binomial bound: four standard deviations of the count.
        assert!((up - n * p).abs() <= 4.0 * (n * p * (1.0 - p)).sqrt(), "element {i}: {up} ups of {n}, p = {p}");
        let mean = column.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        assert!((mean - f64::from(x)).abs() < 0.01, "element {i}: mean {mean}, want {x}");
    }
}

/// Flat int32 values of a tensor column over all batches.
fn tensor_i32(batches: &[RecordBatch], column: &str) -> Vec<i32> {
    let mut values = Vec::new();
    for batch in batches {
        let list = batch.column_by_name(column).unwrap().as_fixed_size_list();
        values.extend_from_slice(list.values().as_primitive::<Int32Type>().values());
    }
    values
}

fn float32(batches: &[RecordBatch], column: &str) -> Vec<f32> {
    batches
        .iter()
        .flat_map(|b| b.column_by_name(column).unwrap().as_primitive::<Float32Type>().values().to_vec())
        .collect()
}

/// Writes already fanned-out rows: keys, sample indices, two-class
/// probabilities and classes.
fn write_samples(path: &Path, ids: &[i64], samples: &[i32], probabilities: &[[f32; 2]], classes: &[i32]) {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let flat: Vec<f32> = probabilities.iter().flatten().copied().collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("sample", DataType::Int32, false),
        Field::new("probs", DataType::FixedSizeList(item.clone(), 2), false),
        Field::new("class", DataType::Int32, false),
        Field::new("label", DataType::Int32, false),
    ]));
    let columns: Vec<Arc<dyn Array>> = vec![
        Arc::new(Int64Array::from(ids.to_vec())),
        Arc::new(Int32Array::from(samples.to_vec())),
        Arc::new(FixedSizeListArray::new(item, 2, Arc::new(Float32Array::from(flat)), None)),
        Arc::new(Int32Array::from(classes.to_vec())),
        Arc::new(Int32Array::from(ids.iter().map(|&id| id as i32 * 10).collect::<Vec<_>>())),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let mut writer = FileWriter::try_new(File::create(path).unwrap(), &schema).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
}

const AGGREGATE_STAGE: &str = "  - kind: aggregate\n    keep: [label]\n    aggregates:\n      - {op: mean, column: probs}\n      - {op: std, column: probs}\n      - {op: predictive_entropy, column: probs, from: probabilities, output: pe}\n      - {op: expected_entropy, column: probs, from: probabilities, output: ee}\n      - {op: mutual_information, column: probs, from: probabilities, output: mi}\n      - {op: majority_vote, column: class, output: vote, agreement: agree}\n";

#[test]
fn aggregates_match_hand_computed() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("samples.arrow");
    // Record 1: two certain samples that disagree. Record 2: three fair coins.
    write_samples(
        &input,
        &[1, 1, 2, 2, 2],
        &[0, 1, 0, 1, 2],
        &[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],
        &[0, 1, 2, 2, 1],
    );
    let yaml = format!(
        "seed: 1\nsource: {{kind: arrow_file, path: {}, id_column: id}}\nstages:\n{AGGREGATE_STAGE}sink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (schema, batches) = read_arrow(&run_ok(dir.path(), "agg", &yaml));
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["id", "label", "probs_mean", "probs_std", "pe", "ee", "mi", "vote", "agree"]);
    assert_eq!(int64(&batches, "id"), [1, 2]);
    assert_eq!(int32(&batches, "label"), [10, 20]);
    assert_eq!(tensor_f32(&batches, "probs_mean"), [0.5, 0.5, 0.5, 0.5]);
    assert_eq!(tensor_f32(&batches, "probs_std"), [0.5, 0.5, 0.0, 0.0]);
    let ln2 = std::f32::consts::LN_2;
    let close = |got: Vec<f32>, want: [f32; 2]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6);
    assert!(close(float32(&batches, "pe"), [ln2, ln2]), "{:?}", float32(&batches, "pe"));
    assert!(close(float32(&batches, "ee"), [0.0, ln2]), "{:?}", float32(&batches, "ee"));
    assert!(close(float32(&batches, "mi"), [ln2, 0.0]), "{:?}", float32(&batches, "mi"));
    // Record 1 ties 0 and 1: the lower class wins with half the votes.
    assert_eq!(int32(&batches, "vote"), [0, 2]);
    assert_eq!(float32(&batches, "agree"), [0.5, 2.0 / 3.0]);
}

#[test]
fn incomplete_record_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("gap_input.arrow");
    // Record 1 lacks sample 1; record 2 is whole.
    write_samples(&input, &[1, 1, 2, 2], &[0, 2, 0, 1], &[[0.5, 0.5]; 4], &[0, 0, 1, 1]);
    let yaml = format!(
        "seed: 1\nsource: {{kind: arrow_file, path: {}, id_column: id}}\nstages:\n{AGGREGATE_STAGE}sink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (outcome, output) = run_yaml(dir.path(), "gap", &yaml);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("only samples [0, 2] of 0 to 2"), "{}", outcome.stderr);
    assert_eq!(int64(&read_arrow(&output).1, "id"), [2]);
}

#[test]
fn aggregate_without_fan_out_fails() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("plain.npy");
    write_npy_f32(&input, &[2, 2], &[0.0, 1.0, 1.0, 0.0]);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}}}\nstages:\n  - {{kind: aggregate, aggregates: [{{op: mean, column: tensor}}]}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (outcome, _) = run_yaml(dir.path(), "plain", &yaml);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("aggregate needs the \"sample\" column of a fan-out"), "{}", outcome.stderr);
}

#[test]
fn fan_out_then_majority_vote() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("votes.npy");
    // Temperature 0 makes every sample agree on the argmax.
    write_npy_f32(&input, &[3, 3], &[0.0, 2.0, 1.0, 5.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}}}\nstages:\n  - {{kind: sample, column: tensor, temperature: 0, samples: 6}}\n  - {{kind: aggregate, aggregates: [{{op: majority_vote, column: class}}, {{op: predictive_entropy, column: tensor}}]}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (schema, batches) = read_arrow(&run_ok(dir.path(), "votes", &yaml));
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["ordinal", "class_vote", "class_agreement", "predictive_entropy"]);
    assert_eq!(int32(&batches, "class_vote"), [1, 0, 2]);
    assert_eq!(float32(&batches, "class_agreement"), [1.0, 1.0, 1.0]);
}

/// Digits through stochastic rounding with a fan-out, the model, a
/// truncated categorical draw and an aggregate, with batching left open.
fn digits_catalogue(source_batch: usize, infer_batch: usize, workers: usize) -> String {
    format!(
        r#"
seed: 8
source: {{kind: arrow_file, path: {input}, id_column: id, batch_size: {source_batch}}}
stages:
  - {{name: quantize, kind: sample, distribution: stochastic_rounding, column: pixels, step: 0.25, samples: 3}}
  - {{name: classify, kind: infer, model: {model}, inputs: {{pixels: pixels}}, batch_size: {infer_batch}}}
  - {{name: draw, kind: sample, column: logits, top_k: 3, top_p: 0.9}}
  - {{name: bits, kind: sample, distribution: bernoulli, column: logits}}
  - name: summary
    kind: aggregate
    keep: [label]
    aggregates:
      - {{op: majority_vote, column: class}}
      - {{op: mutual_information, column: logits}}
      - {{op: mean, column: logits}}
runtime: {{workers: {workers}, channel_capacity: 2}}
sink: {{kind: arrow_file, path: unused.arrow}}
"#,
        input = yaml_path(&repo("fixtures/data/digits_test.arrow")),
        model = yaml_path(&repo("fixtures/models/mlp_digits.onnx")),
    )
}

#[test]
fn new_kinds_ignore_batching_and_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut hashes = Vec::new();
    for (i, (source_batch, infer_batch, workers)) in [(256, 64, 1), (7, 5, 3), (1, 13, 2)].into_iter().enumerate() {
        let output = run_ok(dir.path(), &format!("cat{i}"), &digits_catalogue(source_batch, infer_batch, workers));
        hashes.push(sha256(&output));
        if i == 0 {
            let (_, batches) = read_arrow(&output);
            assert_eq!(rows(&batches), 450, "one row per digit after the aggregate");
        }
    }
    assert!(hashes.iter().all(|h| h == &hashes[0]), "batching changed the output: {hashes:?}");
}

#[test]
fn sampling_example_pipeline_runs() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("sampling.arrow");
    let outcome =
        stochflow(&["run", repo("pipelines/sampling.yaml").to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let (schema, batches) = read_arrow(&output);
    assert_eq!(rows(&batches), 450);
    assert!(schema.field_with_name("class_vote").is_ok());
    assert!(schema.field_with_name("predictive_entropy").is_ok());
    // Most noisy digits are still classified right by the vote.
    let correct =
        int32(&batches, "class_vote").iter().zip(int64(&batches, "label")).filter(|(v, l)| **v as i64 == *l).count();
    assert!(correct > 400, "{correct} of 450 votes match the label");
}

#[test]
fn aggregate_after_repeat_rejects_partial_records() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("small.npy");
    write_npy_f32(&input, &[40, 3], &[0.3; 120]);
    // Poisson noise rejects samples that Gaussian noise pushed below zero,
    // so some records lose samples before the aggregate. A value goes below
    // zero with probability P(z < -1.2) = 0.115, so a record keeps its 4
    // samples of 3 values with probability 0.23. With 40 records, the chance
    // that none or all of them keep their samples is below 1e-4 for any seed.
    // One record per batch puts the aggregate's message for the first
    // partial record among the first logged rejections.
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}, column: x, batch_size: 1}}\nstages:\n  - {{kind: repeat, samples: 4}}\n  - {{name: n, kind: add_noise, column: x, std: 0.25}}\n  - {{name: p, kind: add_noise, column: x, noise: poisson, scale: 10}}\n  - {{kind: aggregate, aggregates: [{{op: mean, column: x}}]}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (outcome, output) = run_yaml(dir.path(), "partial", &yaml);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    let (_, batches) = read_arrow(&output);
    let means = tensor_f32(&batches, "x_mean");
    assert!(!means.is_empty(), "some records keep all their samples");
    assert!(int64(&batches, "ordinal").len() < 40, "some records lose samples");
    // Every written mean is over all 4 samples: a multiple of 1 / (4 * scale) = 0.025.
    for mean in &means {
        let steps = mean / 0.025;
        assert!((steps - steps.round()).abs() < 1e-3, "mean {mean} is not over 4 samples");
    }
    assert!(outcome.stderr.contains("reached this stage"), "{}", outcome.stderr);
}
