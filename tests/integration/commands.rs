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
