use crate::common::*;

const LOGITS: [f32; 5] = [1.0, 0.5, 0.0, -0.5, -2.0];
/// Chi-square critical value for 4 degrees of freedom at p = 0.001.
const CHI_SQUARE_4DF_0_001: f64 = 18.467;

/// Samples `samples` classes for each of `records` copies of `scores`.
fn draw(dir: &std::path::Path, name: &str, scores: &[f32], records: usize, settings: &str) -> Vec<i32> {
    let input = dir.join(format!("{name}.npy"));
    let values: Vec<f32> = (0..records).flat_map(|_| scores.iter().copied()).collect();
    write_npy_f32(&input, &[records, scores.len()], &values);
    let yaml = format!(
        "seed: 99\nsource: {{kind: npy, path: {}, column: scores}}\nstages:\n  - {{name: draw, kind: sample, column: scores, {settings}}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let output = run_ok(dir, name, &yaml);
    let (_, batches) = read_arrow(&output);
    int32(&batches, "class")
}

fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|w| w / total).collect()
}

fn chi_square(classes: &[i32], probabilities: &[f64]) -> f64 {
    let n = classes.len() as f64;
    let mut counts = vec![0usize; probabilities.len()];
    for &c in classes {
        counts[c as usize] += 1;
    }
    counts.iter().zip(probabilities).map(|(&observed, &p)| (observed as f64 - n * p).powi(2) / (n * p)).sum()
}

#[test]
fn frequencies_match_softmax_over_temperatures() {
    let dir = tempfile::tempdir().unwrap();
    for temperature in [0.5, 1.0, 2.0] {
        // 4,000 records x 10 samples = 40,000 draws.
        let classes = draw(
            dir.path(),
            &format!("t{temperature}"),
            &LOGITS,
            4000,
            &format!("temperature: {temperature}, samples: 10"),
        );
        assert_eq!(classes.len(), 40_000);
        let statistic = chi_square(&classes, &softmax(&LOGITS, temperature));
        assert!(
            statistic < CHI_SQUARE_4DF_0_001,
            "T = {temperature}: chi-square {statistic} exceeds {CHI_SQUARE_4DF_0_001}"
        );
    }
}

#[test]
fn probabilities_input_matches_frequencies() {
    let dir = tempfile::tempdir().unwrap();
    let probabilities = [0.4_f32, 0.3, 0.15, 0.1, 0.05];
    let classes = draw(dir.path(), "probs", &probabilities, 40_000, "from: probabilities");
    let expected: Vec<f64> = probabilities.iter().map(|&p| f64::from(p)).collect();
    let statistic = chi_square(&classes, &expected);
    assert!(statistic < CHI_SQUARE_4DF_0_001, "chi-square {statistic} exceeds {CHI_SQUARE_4DF_0_001}");
}

#[test]
fn tiny_and_zero_temperature_give_argmax() {
    let dir = tempfile::tempdir().unwrap();
    let logits = [0.3_f32, 2.0, 1.99, -1.0, 0.0];
    for temperature in ["0.001", "0"] {
        let classes = draw(
            dir.path(),
            &format!("cold{temperature}"),
            &logits,
            500,
            &format!("temperature: {temperature}, samples: 4"),
        );
        assert_eq!(classes.len(), 2000);
        assert!(classes.iter().all(|&c| c == 1), "T = {temperature} must always pick class 1");
    }
}

#[test]
fn fan_out_adds_sample_index_and_repeats_columns() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("fan.npy");
    write_npy_f32(&input, &[3, 5], &LOGITS.repeat(3));
    let yaml = format!(
        "seed: 3\nsource: {{kind: npy, path: {}, column: scores}}\nstages:\n  - {{kind: sample, column: scores, samples: 4}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let output = run_ok(dir.path(), "fan", &yaml);
    let (schema, batches) = read_arrow(&output);
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["ordinal", "scores", "sample", "class"]);
    assert_eq!(int64(&batches, "ordinal"), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
    assert_eq!(int32(&batches, "sample"), [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]);
    assert_eq!(tensor_f32(&batches, "scores").len(), 12 * 5);
}

#[test]
fn repeat_gives_each_sample_its_own_noise() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &[2, 3], &[0.0; 6]);
    let yaml = format!(
        "seed: 3\nsource: {{kind: npy, path: {}, column: x}}\nstages:\n  - {{kind: repeat, samples: 3}}\n  - {{name: noise, kind: add_noise, column: x, std: 1.0}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let output = run_ok(dir.path(), "repeat", &yaml);
    let (_, batches) = read_arrow(&output);
    assert_eq!(int64(&batches, "ordinal"), [0, 0, 0, 1, 1, 1]);
    assert_eq!(int32(&batches, "sample"), [0, 1, 2, 0, 1, 2]);
    let values = tensor_f32(&batches, "x");
    let rows: Vec<&[f32]> = values.chunks(3).collect();
    for i in 0..rows.len() {
        for j in i + 1..rows.len() {
            assert_ne!(rows[i], rows[j], "rows {i} and {j} got the same noise");
        }
    }
}

#[test]
fn second_fan_out_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &[1, 5], &LOGITS);
    let yaml = format!(
        "seed: 3\nsource: {{kind: npy, path: {}, column: x}}\nstages:\n  - {{kind: repeat, samples: 3}}\n  - {{kind: sample, column: x, samples: 2}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (outcome, _) = run_yaml(dir.path(), "twice", &yaml);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("stages[1].samples: records were already fanned out"), "{}", outcome.stderr);
}
