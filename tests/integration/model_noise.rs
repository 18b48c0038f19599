use std::path::{Path, PathBuf};

use crate::built::{self, float_tensor, node, value};
use crate::common::*;

/// Writes `y = Relu(x) + b`, with `b` a zero bias, on `width` values: the
/// place to inject dropout is `r = Relu(x)`, which is not a model output.
fn relu_model(dir: &Path, width: usize) -> PathBuf {
    let path = dir.join("relu.onnx");
    built::write(
        &path,
        vec![node("Relu", &["x"], &["r"], Some("relu")), node("Add", &["r", "b"], &["y"], Some("bias"))],
        vec![value("x", &[None, Some(width as i64)])],
        vec![value("y", &[None, Some(width as i64)])],
        vec![float_tensor("b", &[width as i64], vec![0.0; width])],
    );
    path
}

/// Writes `h = x + b1`, `y = h + b2` on 64 values, with `b1` all zeros and
/// `b2` all twos. Both `h` and `y` are outputs, so the noise on each bias
/// can be read back from them.
fn bias_model(dir: &Path) -> PathBuf {
    let path = dir.join("biases.onnx");
    built::write(
        &path,
        vec![node("Add", &["x", "b1"], &["h"], Some("first")), node("Add", &["h", "b2"], &["y"], Some("second"))],
        vec![value("x", &[None, Some(64)])],
        vec![value("h", &[None, Some(64)]), value("y", &[None, Some(64)])],
        vec![float_tensor("b1", &[64], vec![0.0; 64]), float_tensor("b2", &[64], vec![2.0; 64])],
    );
    path
}

/// `records` latent records of `width` values in [1, 2], fanned out into
/// `samples` rows when more than 1, through `model` with `settings` on the
/// `infer` stage.
fn pipeline(seed: u64, model: &Path, width: usize, records: usize, samples: usize, settings: &str) -> String {
    let fan_out =
        if samples > 1 { format!("  - {{name: copies, kind: repeat, samples: {samples}}}\n") } else { String::new() };
    format!(
        "seed: {seed}
source: {{kind: latent, records: {records}, shape: [{width}], prior: {{kind: uniform, low: 1.0, high: 2.0}}, batch_size: 100}}
stages:
{fan_out}  - name: net
    kind: infer
    model: {model}
    inputs: {{x: z}}
{settings}
sink: {{kind: arrow_file, path: unused.arrow}}
",
        model = yaml_path(model),
    )
}

/// Runs `validate` and returns its standard error, checking that it failed.
fn validate_fails(dir: &Path, name: &str, yaml: &str) -> String {
    let pipeline = write_pipeline(dir, name, yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    outcome.stderr
}

/// Returns the 1-based line of the first line of `yaml` that contains `text`.
fn line_of(yaml: &str, text: &str) -> usize {
    yaml.lines().position(|line| line.contains(text)).unwrap() + 1
}

#[test]
fn injected_dropout_drops_at_the_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let model = relu_model(dir.path(), 64);
    let output = run_ok(dir.path(), "rate", &pipeline(3, &model, 64, 2000, 1, "    inject_dropout: {r: 0.3}"));
    let batches = read_arrow(&output).1;
    let (z, y) = (tensor_f32(&batches, "z"), tensor_f32(&batches, "y"));
    let mut dropped = 0u64;
    for (&z, &y) in z.iter().zip(&y) {
        if y == 0.0 {
            dropped += 1;
        } else {
            // A kept element is scaled by 1 / (1 - ratio), as Dropout in training mode does.
            assert_eq!(y, z * (1.0f32 / 0.7), "a kept element is not x / 0.7");
        }
    }
    // Chi-square of the dropped and kept counts against 0.3 and 0.7, with 1
    // degree of freedom; 10.83 is its 0.1 % critical value.
    let total = z.len() as f64;
    let expected = [0.3 * total, 0.7 * total];
    let observed = [dropped as f64, total - dropped as f64];
    let chi_square: f64 = observed.iter().zip(expected).map(|(o, e)| (o - e).powi(2) / e).sum();
    assert!(chi_square < 10.83, "chi-square {chi_square}: {dropped} of {total} dropped");

    // Each record draws its own mask: a record keeps Binomial(64, 0.7)
    // elements, with variance 13.44 (std 3.67).
    let kept: Vec<f64> = y.chunks(64).map(|row| row.iter().filter(|&&v| v != 0.0).count() as f64).collect();
    let (mean, std) = mean_std(&kept);
    // Standard errors over 2,000 records: 0.082 for the mean, about 0.058 for the std.
    assert!((mean - 44.8).abs() < 0.41, "mean kept per record {mean}");
    assert!((std - 13.44f64.sqrt()).abs() < 0.29, "std of kept per record {std}");

    let (schema, _) = read_arrow(&output);
    assert_eq!(schema.metadata().get("stochflow.model.net.inject_dropout").map(String::as_str), Some(r#"{"r":0.3}"#));
    assert_eq!(schema.metadata().get("stochflow.model.net.mc_dropout"), None);
}

#[test]
fn injected_dropout_does_not_depend_on_batching() {
    let dir = tempfile::tempdir().unwrap();
    let model = relu_model(dir.path(), 16);
    let mut hashes = Vec::new();
    for (i, extra) in
        ["    batch_size: 1\n    sessions: 1", "    batch_size: 64\n    sessions: 2", "    batch_size: 500"]
            .iter()
            .enumerate()
    {
        let yaml = pipeline(9, &model, 16, 300, 3, &format!("    inject_dropout: {{r: 0.5}}\n{extra}"))
            .replace("batch_size: 100}", &format!("batch_size: {}}}", [7, 100, 300][i]))
            .replace("sink:", &format!("runtime: {{workers: {}}}\nsink:", 1 + i % 2));
        let output = run_ok(dir.path(), &format!("batching{i}"), &yaml);
        hashes.push(sha256(&output));
        if i == 0 {
            // The three samples of a record get different masks.
            let y = tensor_f32(&read_arrow(&output).1, "y");
            let rows: Vec<&[f32]> = y.chunks(16).collect();
            let differing =
                (0..300).filter(|r| rows[3 * r] != rows[3 * r + 1] && rows[3 * r + 1] != rows[3 * r + 2]).count();
            assert!(differing > 290, "only {differing} of 300 records have three different masks");
        }
    }
    assert!(hashes.iter().all(|hash| *hash == hashes[0]), "the output changed with batching: {hashes:?}");
}

#[test]
fn dropout_injected_at_a_model_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = relu_model(dir.path(), 64);
    let output = run_ok(dir.path(), "input", &pipeline(4, &model, 64, 500, 1, "    inject_dropout: {x: 0.25}"));
    let batches = read_arrow(&output).1;
    let (z, y) = (tensor_f32(&batches, "z"), tensor_f32(&batches, "y"));
    // The column keeps its values, and the model reads them dropped.
    assert!(z.iter().all(|&v| (1.0..=2.0).contains(&v)));
    let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
    // 32,000 elements: the standard error of the fraction is 0.0024.
    assert!((dropped - 0.25).abs() < 0.012, "dropped fraction {dropped}");
    assert!(y.iter().zip(&z).all(|(&y, &z)| y == 0.0 || y == z * (1.0f32 / 0.75)));
}

#[test]
fn injection_errors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = relu_model(dir.path(), 8);
    let cases = [
        (
            "nowhere: 0.2",
            "stages[0].inject_dropout.nowhere: the model has no tensor \"nowhere\" in its main graph; `stochflow inspect MODEL --tensors` lists",
        ),
        (
            "b: 0.2",
            "stages[0].inject_dropout.b: tensor \"b\" is a weight of the model (an initializer), not an activation",
        ),
        (
            "y: 0.2",
            "stages[0].inject_dropout.y: tensor \"y\" is a model output; to drop elements of an output, add an `add_noise` stage with `noise: dropout`",
        ),
        (
            "r: 1.0",
            "stages[0].inject_dropout.r: the ratio of the dropout at tensor \"r\" is 1; a ratio must be in [0, 1)",
        ),
    ];
    for (i, (setting, message)) in cases.iter().enumerate() {
        let yaml = pipeline(1, &model, 8, 10, 1, &format!("    inject_dropout:\n      {setting}"));
        let stderr = validate_fails(dir.path(), &format!("bad{i}.yaml"), &yaml);
        let line = line_of(&yaml, setting);
        assert!(stderr.contains(&format!(":{line}:7: {message}")), "{setting}:\n{stderr}");
    }
}

#[test]
fn inspect_lists_the_tensors_to_inject_at() {
    let dir = tempfile::tempdir().unwrap();
    let model = relu_model(dir.path(), 8);
    let outcome = stochflow(&["inspect", model.to_str().unwrap(), "--tensors"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(
        outcome.stdout.contains("initializers: 1 (float32: 1, with 8 values; perturbed by weight_noise by default: 1)"),
        "{}",
        outcome.stdout
    );
    assert!(
        outcome.stdout.contains("initializer tensors:\n  b  float32  [8]\ntensors computed by nodes:\n  r  <- Relu relu\n  y  float32  [N, 8]  <- Add bias  (model output)\n"),
        "{}",
        outcome.stdout
    );
}

#[test]
fn mc_dropout_and_injection_together() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(repo("pipelines/digits_mc_dropout.yaml"))
        .unwrap()
        .replace("../", &format!("{}/", repo("").display()))
        .replace("    mc_dropout: true", "    mc_dropout: true\n    inject_dropout: {fc1: 0.1, pixels: 0.05}");
    let (schema, batches) = read_arrow(&run_ok(dir.path(), "both", &yaml));
    assert_eq!(rows(&batches), 450);
    let metadata = schema.metadata();
    assert_eq!(metadata.get("stochflow.model.classify.mc_dropout").map(String::as_str), Some(r#"{"dropout1":0.2}"#));
    assert_eq!(
        metadata.get("stochflow.model.classify.inject_dropout").map(String::as_str),
        Some(r#"{"fc1":0.1,"pixels":0.05}"#)
    );
    let accuracy = int64(&batches, "label")
        .iter()
        .zip(int32(&batches, "class_vote"))
        .filter(|(l, v)| **l == i64::from(*v))
        .count();
    assert!(accuracy > 420, "{accuracy} of 450 votes are right");
}

/// Reads, for each row, `later - earlier` elementwise.
fn differences(batches: &[arrow::array::RecordBatch], later: &str, earlier: &str) -> Vec<f32> {
    tensor_f32(batches, later).iter().zip(tensor_f32(batches, earlier)).map(|(a, b)| a - b).collect()
}

#[test]
fn weight_noise_gaussian_per_copy() {
    let dir = tempfile::tempdir().unwrap();
    let model = bias_model(dir.path());
    let output = run_ok(dir.path(), "copies", &pipeline(3, &model, 64, 30, 40, "    weight_noise: {std: 0.1}"));
    let batches = read_arrow(&output).1;
    let noise = differences(&batches, "h", "z");
    let samples = int32(&batches, "sample");
    // Every record's sample s runs on copy s, so rows of one sample index
    // see the same noise on b1, and rows of different ones do not.
    let rows: Vec<&[f32]> = noise.chunks(64).collect();
    let copies: Vec<&[f32]> = rows[..40].to_vec();
    for (row, values) in rows.iter().enumerate() {
        assert_eq!(samples[row] as usize, row % 40);
        let copy = copies[row % 40];
        assert!(values.iter().zip(copy).all(|(a, b)| (a - b).abs() < 1e-5), "row {row} differs from its copy");
    }
    assert!((0..40).all(|a| (a + 1..40).all(|b| copies[a] != copies[b])), "two copies have the same noise");

    // 40 copies of 64 draws of N(0, 0.1). KS at 0.1 %: 1.95 / sqrt(2560) = 0.039.
    let draws: Vec<f64> = copies.iter().flat_map(|copy| copy.iter().map(|&v| f64::from(v))).collect();
    let ks = ks_normal(&draws, 0.0, 0.1);
    assert!(ks < 0.039, "KS statistic {ks}");
    let (mean, std) = mean_std(&draws);
    // Standard errors: 0.002 for the mean and 0.0014 for the std.
    assert!(mean.abs() < 0.008, "mean {mean}");
    assert!((std - 0.1).abs() < 0.006, "std {std}");

    // b2 gets its own noise, independent of b1's.
    let second: Vec<f64> = differences(&batches, "y", "h")[..40 * 64].iter().map(|&v| f64::from(v) - 2.0).collect();
    let (_, std2) = mean_std(&second);
    assert!((std2 - 0.1).abs() < 0.006, "std of b2's noise {std2}");
    let correlation = draws.iter().zip(&second).map(|(a, b)| a * b).sum::<f64>() / (draws.len() as f64 * 0.01);
    // The correlation of 2,560 independent pairs has a standard error of 0.02.
    assert!(correlation.abs() < 0.08, "correlation of the two biases' noise {correlation}");

    let (schema, _) = read_arrow(&output);
    assert_eq!(
        schema.metadata().get("stochflow.model.net.weight_noise").map(String::as_str),
        Some(r#"{"initializers":["b1","b2"],"members":40,"relative":false,"std":0.1}"#)
    );
}

#[test]
fn weight_noise_does_not_depend_on_batching() {
    let dir = tempfile::tempdir().unwrap();
    let model = bias_model(dir.path());
    let mut hashes = Vec::new();
    for (i, extra) in
        ["    batch_size: 1\n    sessions: 1", "    batch_size: 3\n    sessions: 2", "    batch_size: 200"]
            .iter()
            .enumerate()
    {
        let yaml = pipeline(5, &model, 64, 200, 5, &format!("    weight_noise: {{std: 0.2}}\n{extra}"))
            .replace("batch_size: 100}", &format!("batch_size: {}}}", [7, 100, 200][i]))
            .replace("sink:", &format!("runtime: {{workers: {}}}\nsink:", 1 + i % 2));
        hashes.push(sha256(&run_ok(dir.path(), &format!("batching{i}"), &yaml)));
    }
    assert!(hashes.iter().all(|hash| *hash == hashes[0]), "the output changed with batching: {hashes:?}");
}

#[test]
fn relative_noise_on_chosen_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = bias_model(dir.path());
    let settings = "    weight_noise: {std: 0.05, relative: true, initializers: [b2]}";
    let batches = read_arrow(&run_ok(dir.path(), "relative", &pipeline(3, &model, 64, 10, 40, settings))).1;
    // b1 has no noise, so h is x itself.
    assert_eq!(tensor_f32(&batches, "h"), tensor_f32(&batches, "z"));
    // b2's values are 2, so its noise has std 0.05 x 2.
    let draws: Vec<f64> = differences(&batches, "y", "h")[..40 * 64].iter().map(|&v| f64::from(v) - 2.0).collect();
    let (mean, std) = mean_std(&draws);
    assert!(mean.abs() < 0.008, "mean {mean}");
    assert!((std - 0.1).abs() < 0.006, "std {std}");
}

#[test]
fn weight_noise_seed_and_single_copy() {
    let dir = tempfile::tempdir().unwrap();
    let model = bias_model(dir.path());
    let noise_of = |seed: u64| {
        let output = run_ok(
            dir.path(),
            &format!("seed{seed}"),
            &pipeline(seed, &model, 64, 20, 1, "    weight_noise: {std: 0.1}"),
        );
        let (schema, batches) = read_arrow(&output);
        assert!(schema.metadata()["stochflow.model.net.weight_noise"].contains(r#""members":1"#));
        differences(&batches, "h", "z")
    };
    let (first, again, other) = (noise_of(1), noise_of(1), noise_of(2));
    assert_eq!(first, again);
    // Without a fan-out, every record runs on the same single copy.
    let rows: Vec<&[f32]> = first.chunks(64).collect();
    assert!(rows.iter().all(|row| row.iter().zip(rows[0]).all(|(a, b)| (a - b).abs() < 1e-5)));
    assert!(first.iter().zip(&other).all(|(a, b)| a != b), "another seed left a weight's noise unchanged");
}

#[test]
fn weight_noise_errors_name_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let model = bias_model(dir.path());
    let cases = [
        (
            "{std: -0.1}",
            "stages[1].weight_noise.std: `std` is -0.1; the standard deviation of weight noise must be a finite number ≥ 0",
        ),
        (
            "{std: 0.1, initializers: [b3]}",
            "stages[1].weight_noise.initializers[0]: the model has no initializer \"b3\"; its float32 initializers are b1, b2",
        ),
        ("{std: 0.1, initializers: []}", "stages[1].weight_noise.initializers: `initializers` lists no initializer"),
        (
            "{std: 0.1, initializers: [b1, b1]}",
            "stages[1].weight_noise.initializers[1]: initializer \"b1\" is listed twice",
        ),
        ("{relative: true}", "stages[1].weight_noise: missing field `std`"),
        ("{std: abc}", "stages[1].weight_noise.std: invalid type: string \"abc\", expected a number"),
        (
            "0.1",
            "stages[1].weight_noise: invalid type: floating point `0.1`, expected a mapping of weight-noise settings, such as `{std: 0.1}`",
        ),
    ];
    for (i, (setting, message)) in cases.iter().enumerate() {
        let yaml = pipeline(1, &model, 64, 10, 2, &format!("    weight_noise: {setting}"));
        let stderr = validate_fails(dir.path(), &format!("bad{i}.yaml"), &yaml);
        assert!(stderr.contains(message), "{setting}:\n{stderr}");
    }
}

#[test]
fn ensemble_pipeline_spreads_uncertain_digits() {
    let dir = tempfile::tempdir().unwrap();
    let schema = check_digit_uncertainty(dir.path(), "pipelines/digits_ensemble.yaml");
    assert!(schema.metadata()["stochflow.model.classify.weight_noise"].contains(r#""members":20"#));
}

#[test]
fn repeat_after_noisy_model_warns() {
    let dir = tempfile::tempdir().unwrap();
    let model = bias_model(dir.path());
    // The fan-out comes after the model instead of before it.
    let yaml = pipeline(1, &model, 64, 10, 1, "    weight_noise: {std: 0.1}")
        .replace("sink:", "  - {name: copies, kind: repeat, samples: 4}\nsink:");
    let file = write_pipeline(dir.path(), "late.yaml", &yaml);
    let outcome = stochflow(&["validate", file.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("stage \"net\" runs a copy of the model with weight noise once per record, and stage \"copies\" fans the records out after it"),
        "{}",
        outcome.stderr
    );
    // With the fan-out first, there is nothing to warn about.
    let yaml = pipeline(1, &model, 64, 10, 4, "    weight_noise: {std: 0.1}");
    let file = write_pipeline(dir.path(), "early.yaml", &yaml);
    let outcome = stochflow(&["validate", file.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(!outcome.stderr.contains("WARN"), "{}", outcome.stderr);
}

#[test]
fn every_model_noise_problem_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let model = relu_model(dir.path(), 8);
    let settings =
        "    inject_dropout: {nowhere: 0.2, b: 0.1, y: 0.3}\n    weight_noise: {std: 0.1, initializers: [b, c]}";
    let stderr = validate_fails(dir.path(), "several.yaml", &pipeline(1, &model, 8, 10, 1, settings));
    for expected in [
        "has 4 problems",
        "stages[0].inject_dropout.nowhere: the model has no tensor",
        "stages[0].inject_dropout.b: tensor \"b\" is a weight",
        "stages[0].inject_dropout.y: tensor \"y\" is a model output",
        "stages[0].weight_noise.initializers[1]: the model has no initializer \"c\"",
    ] {
        assert!(stderr.contains(expected), "{expected}:\n{stderr}");
    }
}

#[test]
fn every_dropped_tensor_problem_is_listed() {
    use stochflow::model::proto::AttributeProto;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("odd.onnx");
    // `to` of a Cast node, as an integer attribute (AttributeType 2).
    let cast = |input: &str, output: &str, to: i64| {
        let mut cast = node("Cast", &[input], &[output], Some(output));
        cast.attribute.push(AttributeProto {
            name: Some(String::from("to")),
            i: Some(to),
            r#type: Some(2),
            ..Default::default()
        });
        cast
    };
    built::write(
        &model,
        vec![
            cast("x", "xd", 11),
            cast("xd", "xf", 1),
            node("Transpose", &["xf"], &["xt"], Some("turn")),
            node("Transpose", &["xt"], &["y"], Some("back")),
        ],
        vec![value("x", &[None, Some(8)])],
        vec![value("y", &[None, Some(8)])],
        Vec::new(),
    );
    let yaml = pipeline(1, &model, 8, 10, 1, "    inject_dropout: {xd: 0.1, xt: 0.1}");
    let stderr = validate_fails(dir.path(), "odd.yaml", &yaml);
    for expected in [
        "has 2 problems",
        "stages[0].inject_dropout.xd: the dropout injected at tensor \"xd\" drops elements of \"xd\", which is not a float32 tensor",
        "stages[0].inject_dropout.xt: the dropout injected at tensor \"xt\" drops elements of \"xt\", whose first dimension is not the batch: its shape for 2 records is [8, 2]",
    ] {
        assert!(stderr.contains(expected), "{expected}:\n{stderr}");
    }
}

#[test]
fn output_with_fixed_first_dimension_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("pair.onnx");
    built::write(
        &model,
        vec![node("Relu", &["x"], &["y"], Some("relu")), node("Identity", &["c"], &["pair"], Some("copy"))],
        vec![value("x", &[None, Some(4)])],
        vec![value("y", &[None, Some(4)]), value("pair", &[Some(2)])],
        vec![float_tensor("c", &[2], vec![2.0, 8.0])],
    );
    let stderr = validate_fails(dir.path(), "pair.yaml", &pipeline(1, &model, 4, 10, 1, ""));
    assert!(
        stderr.contains("stages[0].model: model output \"pair\" has shape [2], whose first dimension is fixed at 2, so it is not the batch"),
        "{stderr}"
    );
}

#[test]
fn weight_noise_without_weights_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // The model's only initializer is a Dropout node's ratio.
    let model = repo("fixtures/models/dropout_pair.onnx");
    let stderr =
        validate_fails(dir.path(), "none.yaml", &pipeline(1, &model, 64, 10, 1, "    weight_noise: {std: 0.1}"));
    assert!(
        stderr.contains("stages[0].weight_noise: the model has no float32 weights, so weight noise does not apply to it; remove `weight_noise`"),
        "{stderr}"
    );
}
