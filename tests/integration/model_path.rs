use crate::common::*;

fn argmax_pipeline(std: f64) -> String {
    format!(
        r#"
seed: 8
source: {{kind: arrow_file, path: {input}, id_column: id}}
stages:
  - {{name: noise, kind: add_noise, column: pixels, std: {std}}}
  - {{name: classify, kind: infer, model: {model}, inputs: {{pixels: pixels}}}}
  - {{name: pick, kind: sample, column: logits, temperature: 0}}
sink: {{kind: arrow_file, path: unused.arrow}}
"#,
        input = yaml_path(&repo("fixtures/data/digits_test.arrow")),
        model = yaml_path(&repo("fixtures/models/mlp_digits.onnx")),
    )
}

#[derive(serde::Deserialize)]
struct PythonReference {
    ids: Vec<i64>,
    classes: Vec<i32>,
}

#[test]
fn argmax_equals_python_onnxruntime_record_by_record() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_ok(dir.path(), "clean", &argmax_pipeline(0.0));
    let (_, batches) = read_arrow(&output);
    let text = std::fs::read_to_string(repo("fixtures/data/digits_test_ort.json")).unwrap();
    let reference: PythonReference = serde_json::from_str(&text).unwrap();
    assert_eq!(int64(&batches, "id"), reference.ids);
    assert_eq!(int32(&batches, "class"), reference.classes);
}

#[test]
fn accuracy_falls_as_noise_grows() {
    let dir = tempfile::tempdir().unwrap();
    let mut accuracies = Vec::new();
    for (i, std) in [0.0, 0.3, 0.6, 1.2].into_iter().enumerate() {
        let output = run_ok(dir.path(), &format!("noise{i}"), &argmax_pipeline(std));
        let (_, batches) = read_arrow(&output);
        let labels = int64(&batches, "label");
        let classes = int32(&batches, "class");
        let correct = labels.iter().zip(&classes).filter(|(l, c)| **l == i64::from(**c)).count();
        accuracies.push(correct as f64 / labels.len() as f64);
    }
    assert!(accuracies[0] > 0.95, "clean accuracy {} is below 0.95", accuracies[0]);
    for pair in accuracies.windows(2) {
        assert!(pair[1] < pair[0], "accuracy did not fall with more noise: {accuracies:?}");
    }
    assert!(accuracies[3] < 0.6, "accuracy at std 1.2 is still {}", accuracies[3]);
}

#[test]
fn constants_feed_extra_model_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
    write_npy_f32(&input, &[3, 4], &values);
    let yaml = format!(
        r#"
seed: 1
source: {{kind: npy, path: {input}, column: x}}
stages:
  - kind: infer
    model: {model}
    inputs: {{x: x}}
    constants:
      scale: {{values: [2.5]}}
      shift: {{values: [-3], dtype: int64}}
sink: {{kind: arrow_file, path: unused.arrow}}
"#,
        input = yaml_path(&input),
        model = yaml_path(&repo("fixtures/models/scale_shift.onnx")),
    );
    let output = run_ok(dir.path(), "constants", &yaml);
    let (_, batches) = read_arrow(&output);
    let expected: Vec<f32> = values.iter().map(|v| v * 2.5 - 3.0).collect();
    assert_eq!(tensor_f32(&batches, "y"), expected);
}

#[test]
fn constant_with_wrong_dtype_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &[1, 4], &[0.0; 4]);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}, column: x}}\nstages:\n  - kind: infer\n    model: {}\n    inputs: {{x: x}}\n    constants:\n      scale: {{values: [2.5]}}\n      shift: {{values: [1]}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input),
        yaml_path(&repo("fixtures/models/scale_shift.onnx")),
    );
    let (outcome, _) = run_yaml(dir.path(), "bad_constant", &yaml);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains(
            ":9:7: stages[0].constants.shift: model input \"shift\" takes int64, the constant is float32; set `dtype`"
        ),
        "{}",
        outcome.stderr
    );
}
