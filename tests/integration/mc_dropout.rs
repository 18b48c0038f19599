use crate::built;
use crate::common::*;

/// 2,000 latent records of 64 values in [1, 2] through the `dropout_pair`
/// model (h = Dropout(x, 0.25), y = Dropout(h, 0.5)), `samples` copies each.
fn pair_pipeline(seed: u64, settings: &str, samples: usize) -> String {
    format!(
        "seed: {seed}
source: {{kind: latent, records: 2000, shape: [64], prior: {{kind: uniform, low: 1.0, high: 2.0}}, batch_size: 100}}
stages:
  - {{name: copies, kind: repeat, samples: {samples}}}
  - name: mc
    kind: infer
    model: {model}
    inputs: {{x: z}}
{settings}
sink: {{kind: arrow_file, path: unused.arrow}}
",
        model = yaml_path(&repo("fixtures/models/dropout_pair.onnx")),
    )
}

const MC: &str = "    mc_dropout: true";

/// Counts of the three outcomes of an element: dropped by the first node,
/// kept by the first and dropped by the second, kept by both. Checks the
/// values of kept elements on the way.
fn outcomes(batches: &[arrow::array::RecordBatch]) -> [u64; 3] {
    let (z, h, y) = (tensor_f32(batches, "z"), tensor_f32(batches, "h"), tensor_f32(batches, "y"));
    let mut counts = [0u64; 3];
    for ((&z, &h), &y) in z.iter().zip(&h).zip(&y) {
        if h == 0.0 {
            assert_eq!(y, 0.0, "an element dropped by the first node came back");
            counts[0] += 1;
        } else {
            // A kept element is scaled by 1 / (1 - ratio), as Dropout in training mode does.
            assert_eq!(h, z * (1.0f32 / 0.75), "a kept element of h is not x / 0.75");
            if y == 0.0 {
                counts[1] += 1;
            } else {
                assert_eq!(y, h * 2.0, "a kept element of y is not h / 0.5");
                counts[2] += 1;
            }
        }
    }
    counts
}

#[test]
fn mask_rates_match_the_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_ok(dir.path(), "rates", &pair_pipeline(3, MC, 1));
    let counts = outcomes(&read_arrow(&output).1);
    let total: u64 = counts.iter().sum();
    assert_eq!(total, 2000 * 64);
    // Expected fractions 0.25, 0.75 x 0.5 and 0.75 x 0.5. The chi-square
    // statistic has 2 degrees of freedom; 13.82 is its 0.1 % critical value.
    let expected = [0.25, 0.375, 0.375].map(|p| p * total as f64);
    let chi_square: f64 =
        counts.iter().zip(expected).map(|(&observed, expected)| (observed as f64 - expected).powi(2) / expected).sum();
    assert!(chi_square < 13.82, "chi-square {chi_square} for counts {counts:?}, expected {expected:?}");

    // Each record's mask is its own: the number of elements a record keeps
    // in h is Binomial(64, 0.75), with variance 12; records sharing a mask
    // would show a far larger spread.
    let batches = read_arrow(&output).1;
    let h = tensor_f32(&batches, "h");
    let kept_per_record: Vec<f64> = h.chunks(64).map(|row| row.iter().filter(|&&v| v != 0.0).count() as f64).collect();
    let (mean, std) = mean_std(&kept_per_record);
    // Standard error of the mean: sqrt(12 / 2000) = 0.077; allow 5 of them.
    assert!((mean - 48.0).abs() < 0.39, "mean kept per record {mean}");
    // The std of 2,000 draws of a variance-12 count is 3.46, with a
    // standard error of about 0.055.
    assert!((std - 12f64.sqrt()).abs() < 0.2, "std of kept per record {std}");
}

#[test]
fn masks_do_not_depend_on_batching() {
    let dir = tempfile::tempdir().unwrap();
    let mut hashes = Vec::new();
    for (i, extra) in
        ["    batch_size: 1\n    sessions: 1", "    batch_size: 64\n    sessions: 2", "    batch_size: 1000"]
            .iter()
            .enumerate()
    {
        let yaml = pair_pipeline(9, &format!("{MC}\n{extra}"), 3)
            .replace("batch_size: 100}", &format!("batch_size: {}}}", [7, 100, 2000][i]));
        let yaml = yaml.replace("sink:", &format!("runtime: {{workers: {}}}\nsink:", 1 + i % 2));
        let output = run_ok(dir.path(), &format!("batching{i}"), &yaml);
        hashes.push(sha256(&output));
        if i == 0 {
            let batches = read_arrow(&output).1;
            let h = tensor_f32(&batches, "h");
            // The three samples of a record get different masks.
            let rows: Vec<&[f32]> = h.chunks(64).collect();
            assert_eq!(rows.len(), 6000);
            let differing =
                (0..2000).filter(|r| rows[3 * r] != rows[3 * r + 1] && rows[3 * r + 1] != rows[3 * r + 2]).count();
            assert!(differing > 1990, "only {differing} of 2000 records have three different masks");
        }
    }
    assert!(hashes.iter().all(|hash| *hash == hashes[0]), "the output changed with batching: {hashes:?}");
}

#[test]
fn seed_changes_the_masks() {
    let dir = tempfile::tempdir().unwrap();
    let first = read_arrow(&run_ok(dir.path(), "seed3", &pair_pipeline(3, MC, 1))).1;
    let again = read_arrow(&run_ok(dir.path(), "seed3_again", &pair_pipeline(3, MC, 1))).1;
    let other = read_arrow(&run_ok(dir.path(), "seed4", &pair_pipeline(4, MC, 1))).1;
    assert_eq!(tensor_f32(&first, "h"), tensor_f32(&again, "h"), "the same seed gave other masks");
    // The latent values change with the seed too, so compare the masks alone.
    let mask = |batches: &[arrow::array::RecordBatch]| -> Vec<bool> {
        tensor_f32(batches, "h").iter().map(|&v| v != 0.0).collect()
    };
    let (a, b) = (mask(&first), mask(&other));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
    // Independent masks agree where both keep or both drop: 0.75^2 + 0.25^2.
    assert!((same - 0.625).abs() < 0.01, "masks of two seeds agree on {same} of the elements");
}

#[test]
fn dropout_is_identity_without_mc_dropout() {
    let dir = tempfile::tempdir().unwrap();
    let batches = read_arrow(&run_ok(dir.path(), "plain", &pair_pipeline(3, "", 1))).1;
    let z = tensor_f32(&batches, "z");
    assert_eq!(tensor_f32(&batches, "h"), z);
    assert_eq!(tensor_f32(&batches, "y"), z);
}

#[test]
fn output_records_the_masked_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (schema, _) = read_arrow(&run_ok(dir.path(), "provenance", &pair_pipeline(3, MC, 1)));
    assert_eq!(
        schema.metadata().get("stochflow.model.mc.mc_dropout").map(String::as_str),
        Some(r#"{"drop_in":0.25,"drop_out":0.5}"#)
    );
}

#[test]
fn digits_pipeline_spreads_uncertain_digits() {
    let dir = tempfile::tempdir().unwrap();
    let schema = check_digit_uncertainty(dir.path(), "pipelines/digits_mc_dropout.yaml");
    assert_eq!(
        schema.metadata().get("stochflow.model.classify.mc_dropout").map(String::as_str),
        Some(r#"{"dropout1":0.2}"#)
    );
}

#[test]
fn model_without_dropout_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = pair_pipeline(3, MC, 1)
        .replace("dropout_pair.onnx", "scale_shift.onnx")
        .replace("shape: [64]", "shape: [4]")
        .replace("{x: z}", "{x: z}\n    constants: {scale: {values: [1.0]}, shift: {values: [0], dtype: int64}}");
    let line = yaml.lines().position(|line| line.contains("mc_dropout")).unwrap() + 1;
    let pipeline = write_pipeline(dir.path(), "no_dropout.yaml", &yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains(&format!(
            ":{line}:5: stages[1].mc_dropout: the model has no Dropout nodes, so there is no dropout to keep active"
        )),
        "{}",
        outcome.stderr
    );
}

/// Returns a pipeline of 200 latent records of `width` values in [1, 2]
/// through `model`, with `settings` on the `infer` stage.
fn built_pipeline(model: &std::path::Path, width: usize, settings: &str) -> String {
    format!(
        "seed: 5
source: {{kind: latent, records: 200, shape: [{width}], prior: {{kind: uniform, low: 1.0, high: 2.0}}}}
stages:
  - name: mc
    kind: infer
    model: {model}
    inputs: {{x: z}}
{settings}
sink: {{kind: arrow_file, path: unused.arrow}}
",
        model = yaml_path(model),
    )
}

/// Returns the fraction of zeros in the `y` column.
fn zero_fraction(batches: &[arrow::array::RecordBatch]) -> f64 {
    let y = tensor_f32(batches, "y");
    y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64
}

#[test]
fn transposed_dropout_input_is_rejected() {
    use built::*;
    let dir = tempfile::tempdir().unwrap();
    // x [N, 2] is transposed to [2, N], whose first dimension equals the
    // batch for 2 records only.
    let model = dir.path().join("transposed.onnx");
    write(
        &model,
        vec![
            node("Transpose", &["x"], &["t"], Some("to_columns")),
            node("Dropout", &["t", "r"], &["d"], Some("drop")),
            node("Transpose", &["d"], &["y"], Some("to_rows")),
        ],
        vec![value("x", &[None, Some(2)])],
        vec![value("y", &[None, Some(2)])],
        vec![float_scalar("r", 0.3)],
    );
    let pipeline = write_pipeline(dir.path(), "transposed.yaml", &built_pipeline(&model, 2, MC));
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("stages[0].mc_dropout: Dropout node \"drop\" drops elements of \"t\", whose first dimension is not the batch"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn fixed_batch_of_one_runs() {
    use built::*;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("single.onnx");
    write(
        &model,
        vec![node("Dropout", &["x", "r"], &["y"], Some("drop"))],
        vec![value("x", &[Some(1), Some(16)])],
        vec![value("y", &[Some(1), Some(16)])],
        vec![float_scalar("r", 0.5)],
    );
    let output = run_ok(dir.path(), "single", &built_pipeline(&model, 16, MC));
    // 3,200 elements: the standard error of the fraction is 0.0088.
    let zeros = zero_fraction(&read_arrow(&output).1);
    assert!((zeros - 0.5).abs() < 0.045, "{zeros} of the elements dropped at ratio 0.5");

    // A record's 3 samples reach the stage together and run one at a time.
    let fanned = built_pipeline(&model, 16, MC).replace("stages:\n", "stages:\n  - {kind: repeat, samples: 3}\n");
    let (outcome, output) = run_yaml(dir.path(), "single_fanned", &fanned);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(!outcome.stderr.contains("WARN"), "the run logged warnings:\n{}", outcome.stderr);
    assert_eq!(rows(&read_arrow(&output).1), 600);
}

#[test]
fn training_mode_needs_mc_dropout() {
    use built::*;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("training.onnx");
    write(
        &model,
        vec![node("Dropout", &["x", "r", "training"], &["y"], Some("drop"))],
        vec![value("x", &[None, Some(16)])],
        vec![value("y", &[None, Some(16)])],
        vec![float_scalar("r", 0.5), bool_scalar("training", true)],
    );
    let pipeline = write_pipeline(dir.path(), "training.yaml", &built_pipeline(&model, 16, ""));
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("stages[0].model: Dropout node \"drop\" runs in training mode"),
        "{}",
        outcome.stderr
    );

    // The same with `training_mode` a model input fed true under `constants`.
    let fed = dir.path().join("training_fed.onnx");
    write(
        &fed,
        vec![node("Dropout", &["x", "r", "training"], &["y"], Some("drop"))],
        vec![value("x", &[None, Some(16)]), bool_value("training")],
        vec![value("y", &[None, Some(16)])],
        vec![float_scalar("r", 0.5)],
    );
    let constant = "    constants: {training: {values: [1], shape: [], dtype: bool}}";
    let pipeline = write_pipeline(dir.path(), "training_fed.yaml", &built_pipeline(&fed, 16, constant));
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("stages[0].model: Dropout node \"drop\" runs in training mode"),
        "{}",
        outcome.stderr
    );
    let settings = format!("{MC}\n{constant}");
    let output = run_ok(dir.path(), "training_fed_mc", &built_pipeline(&fed, 16, &settings));
    let zeros = zero_fraction(&read_arrow(&output).1);
    assert!((zeros - 0.5).abs() < 0.045, "{zeros} of the elements dropped at ratio 0.5");

    let first = run_ok(dir.path(), "training_mc", &built_pipeline(&model, 16, MC));
    let again = run_ok(dir.path(), "training_mc_again", &built_pipeline(&model, 16, MC));
    assert_eq!(sha256(&first), sha256(&again), "the masks are drawn from the seed");
    let zeros = zero_fraction(&read_arrow(&first).1);
    assert!((zeros - 0.5).abs() < 0.045, "{zeros} of the elements dropped at ratio 0.5");
}

#[test]
fn unnamed_node_gets_a_free_name() {
    use built::*;
    let dir = tempfile::tempdir().unwrap();
    // The unnamed Dropout is node 2, and `dropout2` is taken.
    let model = dir.path().join("names.onnx");
    write(
        &model,
        vec![
            node("Dropout", &["x", "r"], &["a"], Some("dropout2")),
            node("Identity", &["a"], &["b"], Some("copy")),
            node("Dropout", &["b", "r"], &["y"], None),
        ],
        vec![value("x", &[None, Some(16)])],
        vec![value("y", &[None, Some(16)])],
        vec![float_scalar("r", 0.25)],
    );
    let output = run_ok(dir.path(), "names", &built_pipeline(&model, 16, MC));
    let (schema, batches) = read_arrow(&output);
    assert_eq!(
        schema.metadata().get("stochflow.model.mc.mc_dropout").map(String::as_str),
        Some(r#"{"dropout2":0.25,"dropout2_":0.25}"#)
    );
    // Two nodes at 0.25 keep 0.75 x 0.75 of the elements; 3,200 elements.
    let zeros = zero_fraction(&batches);
    assert!((zeros - 0.4375).abs() < 0.045, "{zeros} of the elements dropped");
}

#[test]
fn ratio_from_a_constant_input() {
    use built::*;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("ratio_input.onnx");
    write(
        &model,
        vec![node("Dropout", &["x", "r"], &["y"], Some("drop"))],
        vec![value("x", &[None, Some(16)]), value("r", &[])],
        vec![value("y", &[None, Some(16)])],
        Vec::new(),
    );
    let settings = format!("{MC}\n    constants: {{r: {{values: [0.8], shape: []}}}}");
    let output = run_ok(dir.path(), "ratio_input", &built_pipeline(&model, 16, &settings));
    let zeros = zero_fraction(&read_arrow(&output).1);
    assert!((zeros - 0.8).abs() < 0.036, "{zeros} of the elements dropped at ratio 0.8");
}

#[test]
fn bool_output_reported_at_model() {
    use built::*;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("mask_out.onnx");
    let mut mask = value("mask", &[None, Some(8)]);
    mask.r#type.as_mut().unwrap().tensor_type.as_mut().unwrap().elem_type = Some(9);
    write(
        &model,
        vec![node("Dropout", &["x"], &["y", "mask"], Some("drop"))],
        vec![value("x", &[None, Some(8)])],
        vec![value("y", &[None, Some(8)]), mask],
        Vec::new(),
    );
    let yaml = built_pipeline(&model, 8, "");
    let line = yaml.lines().position(|line| line.trim_start().starts_with("model:")).unwrap() + 1;
    let pipeline = write_pipeline(dir.path(), "bool.yaml", &yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains(&format!(
            ":{line}:5: stages[0].model: model output \"mask\" is bool; stochflow keeps float32 and int64 outputs; list the outputs to keep under `outputs`, without \"mask\""
        )),
        "{}",
        outcome.stderr
    );
}
