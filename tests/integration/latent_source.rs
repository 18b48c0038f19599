use crate::common::*;

/// Returns a pipeline of a `latent` source with `settings` and no stages.
fn latent_pipeline(seed: u64, settings: &str) -> String {
    format!("seed: {seed}\nsource:\n  kind: latent\n{settings}\nsink: {{kind: arrow_file, path: unused.arrow}}\n")
}

/// Runs a latent source and returns its output batches.
fn draw(dir: &std::path::Path, name: &str, seed: u64, settings: &str) -> Vec<arrow::array::RecordBatch> {
    let output = run_ok(dir, name, &latent_pipeline(seed, settings));
    read_arrow(&output).1
}

/// Draws 2,000 records x 50 values = 100,000 values of `prior`.
fn prior_values(dir: &std::path::Path, name: &str, prior: &str) -> Vec<f64> {
    let batches = draw(dir, name, 2024, &format!("  records: 2000\n  shape: [50]\n  prior: {prior}"));
    assert_eq!(int64(&batches, "ordinal"), (0..2000).collect::<Vec<i64>>());
    let values: Vec<f64> = tensor_f32(&batches, "z").into_iter().map(f64::from).collect();
    assert_eq!(values.len(), 100_000);
    values
}

/// Computes the Kolmogorov-Smirnov statistic of `samples` against `cdf`.
fn ks(samples: &[f64], cdf: impl Fn(f64) -> f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    sorted.iter().enumerate().fold(0.0, |statistic: f64, (i, &x)| {
        let p = cdf(x);
        statistic.max((p - i as f64 / n).abs()).max(((i + 1) as f64 / n - p).abs())
    })
}

/// The 1% critical value of the KS statistic for 100,000 draws.
const KS_CRITICAL: f64 = 1.628 / 316.227_766;

#[test]
fn normal_prior_moments_and_ks() {
    let dir = tempfile::tempdir().unwrap();
    let values = prior_values(dir.path(), "normal", "{kind: normal, mean: 0.5, std: 2.0}");
    let (mean, std) = mean_std(&values);
    // Standard error of the mean: 2 / sqrt(1e5) = 0.0063; allow 5 of them.
    assert!((mean - 0.5).abs() < 0.032, "mean {mean}");
    // Standard error of the std: 2 / sqrt(2e5) = 0.0045; allow 1%.
    assert!((std - 2.0).abs() < 0.02, "std {std}");
    let statistic = ks_normal(&values, 0.5, 2.0);
    assert!(statistic < KS_CRITICAL, "KS statistic {statistic} exceeds {KS_CRITICAL}");
}

#[test]
fn uniform_prior_matches_uniform_cdf() {
    let dir = tempfile::tempdir().unwrap();
    let values = prior_values(dir.path(), "uniform", "{kind: uniform, low: -1.0, high: 3.0}");
    assert!(values.iter().all(|v| (-1.0..=3.0).contains(v)), "a value left [-1, 3]");
    let (mean, std) = mean_std(&values);
    // Mean 1, std 4 / sqrt(12) = 1.1547; standard error of the mean 0.0037.
    assert!((mean - 1.0).abs() < 0.018, "mean {mean}");
    assert!((std - 1.1547).abs() < 0.006, "std {std}");
    let statistic = ks(&values, |x| ((x + 1.0) / 4.0).clamp(0.0, 1.0));
    assert!(statistic < KS_CRITICAL, "KS statistic {statistic} exceeds {KS_CRITICAL}");
}

/// Returns the CDF of the normal(mean, std) truncated to [low, high].
fn truncated_cdf(mean: f64, std: f64, low: f64, high: f64) -> impl Fn(f64) -> f64 {
    let below = normal_cdf((low - mean) / std);
    let mass = normal_cdf((high - mean) / std) - below;
    move |x| ((normal_cdf((x - mean) / std) - below) / mass).clamp(0.0, 1.0)
}

#[test]
fn truncated_normal_matches_truncated_cdf() {
    let dir = tempfile::tempdir().unwrap();
    // An asymmetric window around the mean, and a one-sided tail that contains
    // 6.7% of the normal's mass, where clipping would pile values at 1.5.
    for (name, prior, (mean, std, low, high)) in [
        ("window", "{kind: truncated_normal, mean: 0.5, std: 1.5, low: -0.5, high: 3.5}", (0.5, 1.5, -0.5, 3.5)),
        ("tail", "{kind: truncated_normal, low: 1.5, high: .inf}", (0.0, 1.0, 1.5, f64::INFINITY)),
    ] {
        let values = prior_values(dir.path(), name, prior);
        assert!(values.iter().all(|v| (low..=high).contains(v)), "{name}: a value left [{low}, {high}]");
        let statistic = ks(&values, truncated_cdf(mean, std, low, high));
        assert!(statistic < KS_CRITICAL, "{name}: KS statistic {statistic} exceeds {KS_CRITICAL}");
    }
}

/// Splits the `z` column into one latent vector of `len` values per record.
fn latent_rows(batches: &[arrow::array::RecordBatch], len: usize) -> Vec<Vec<f64>> {
    tensor_f32(batches, "z").chunks(len).map(|row| row.iter().map(|&v| f64::from(v)).collect()).collect()
}

/// Returns endpoints A and B of each path: a plain draw of shape [16] from the same
/// streams yields A's 8 values and then B's, as the source draws them.
fn endpoints(dir: &std::path::Path, paths: usize) -> Vec<(Vec<f64>, Vec<f64>)> {
    let batches = draw(dir, "endpoints", 9, &format!("  records: {paths}\n  shape: [16]"));
    latent_rows(&batches, 16).into_iter().map(|row| (row[..8].to_vec(), row[8..].to_vec())).collect()
}

#[test]
fn linear_interpolation_hits_endpoints_and_averages() {
    let dir = tempfile::tempdir().unwrap();
    let batches =
        draw(dir.path(), "linear", 9, "  records: 3\n  shape: [8]\n  interpolate: {steps: 5, method: linear}");
    assert_eq!(int64(&batches, "ordinal"), (0..15).collect::<Vec<i64>>());
    assert_eq!(int64(&batches, "path_index"), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
    assert_eq!(int32(&batches, "step"), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    let points = latent_rows(&batches, 8);
    for (path, (a, b)) in endpoints(dir.path(), 3).iter().enumerate() {
        let steps = &points[5 * path..5 * path + 5];
        assert_eq!(&steps[0], a, "path {path} starts at A");
        assert_eq!(&steps[4], b, "path {path} ends at B");
        for (j, point) in steps.iter().enumerate() {
            let t = j as f64 / 4.0;
            for ((p, x), y) in point.iter().zip(a).zip(b) {
                // float32 rounding of values below 5 in magnitude: under 1e-6.
                assert!((p - ((1.0 - t) * x + t * y)).abs() < 1e-6, "path {path} step {j}");
            }
        }
        let midpoint: Vec<f64> = a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect();
        assert!(steps[2].iter().zip(&midpoint).all(|(p, m)| (p - m).abs() < 1e-6), "path {path} midpoint");
    }
}

/// Endpoint A of path `p` is record `p` of a plain source, for every prior
/// and for record sizes that do not fill the ziggurat's 64-value chunks.
#[test]
fn endpoint_a_is_plain_record() {
    let dir = tempfile::tempdir().unwrap();
    let priors = ["normal", "{kind: uniform, low: -1.0, high: 1.0}", "{kind: truncated_normal, low: -1.0, high: 2.0}"];
    for (index, prior) in priors.iter().enumerate() {
        for len in [8, 100] {
            let name = format!("prefix_{index}_{len}");
            let shape = format!("  shape: [{len}]\n  prior: {prior}");
            let paths = draw(dir.path(), &name, 5, &format!("  records: 300\n{shape}\n  interpolate: {{steps: 2}}"));
            let plain = draw(dir.path(), &format!("{name}_plain"), 5, &format!("  records: 300\n{shape}"));
            let points = latent_rows(&paths, len);
            let records = latent_rows(&plain, len);
            for path in 0..300 {
                assert_eq!(points[2 * path], records[path], "{prior}, shape [{len}]: A of path {path}");
            }
        }
    }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn spherical_interpolation_matches_hand_slerp() {
    let dir = tempfile::tempdir().unwrap();
    let batches =
        draw(dir.path(), "slerp", 9, "  records: 3\n  shape: [8]\n  interpolate: {steps: 7, method: spherical}");
    let points = latent_rows(&batches, 8);
    for (path, (a, b)) in endpoints(dir.path(), 3).iter().enumerate() {
        let steps = &points[7 * path..7 * path + 7];
        assert_eq!(&steps[0], a);
        assert_eq!(&steps[6], b);
        let omega = (a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))).acos();
        for (j, point) in steps.iter().enumerate() {
            let t = j as f64 / 6.0;
            let (wa, wb) = (((1.0 - t) * omega).sin() / omega.sin(), (t * omega).sin() / omega.sin());
            let expected: Vec<f64> = a.iter().zip(b).map(|(x, y)| wa * x + wb * y).collect();
            for (p, e) in point.iter().zip(&expected) {
                assert!((p - e).abs() < 1e-5, "path {path} step {j}: {p} vs {e}");
            }
            assert!((norm(point) - norm(&expected)).abs() < 1e-5);
        }
        // Slerp's midpoint keeps at least the smaller endpoint norm, where
        // the linear midpoint of nearly orthogonal vectors shrinks.
        let midpoint = &steps[3];
        assert!(norm(midpoint) >= norm(a).min(norm(b)) - 1e-5, "path {path}: midpoint norm {}", norm(midpoint));
    }
}

#[test]
fn same_seed_same_bytes_across_batch_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for (name, settings) in [
        ("plain", "  records: 50\n  shape: [4, 3]\n  prior: {kind: truncated_normal, low: -1.0, high: 2.0}"),
        ("paths", "  records: 7\n  shape: [6]\n  interpolate: {steps: 4, method: spherical}"),
    ] {
        let hashes: Vec<String> = [1, 3, 256]
            .iter()
            .map(|batch| {
                let yaml = latent_pipeline(5, &format!("{settings}\n  batch_size: {batch}"));
                sha256(&run_ok(dir.path(), &format!("{name}{batch}"), &yaml))
            })
            .collect();
        assert!(hashes.iter().all(|h| h == &hashes[0]), "{name}: batch size changed the bytes: {hashes:?}");
        let other = run_ok(dir.path(), &format!("{name}_seed6"), &latent_pipeline(6, settings));
        assert_ne!(sha256(&other), hashes[0], "{name}: a different seed gave the same file");
    }
}

#[test]
fn draws_ignore_record_count_and_batching() {
    let dir = tempfile::tempdir().unwrap();
    let few = tensor_f32(&draw(dir.path(), "few", 3, "  records: 10\n  shape: [5]\n  batch_size: 4"), "z");
    let many = tensor_f32(&draw(dir.path(), "many", 3, "  records: 25\n  shape: [5]\n  batch_size: 7"), "z");
    assert_eq!(few[..], many[..50]);
    let renamed = tensor_f32(&draw(dir.path(), "renamed", 3, "  name: other\n  records: 10\n  shape: [5]"), "z");
    assert_ne!(few, renamed, "the source name keys its streams");
}

#[test]
fn prior_kind_alone_takes_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let short = tensor_f32(&draw(dir.path(), "short", 3, "  records: 4\n  shape: [3]\n  prior: normal"), "z");
    let settings = "  records: 4\n  shape: [3]\n  prior: {kind: normal, mean: 0.0, std: 1.0}";
    let full = tensor_f32(&draw(dir.path(), "full", 3, settings), "z");
    assert_eq!(short, full);
    // A mapping without `kind` is a normal prior.
    let no_kind = tensor_f32(&draw(dir.path(), "no_kind", 3, "  records: 4\n  shape: [3]\n  prior: {std: 1.0}"), "z");
    assert_eq!(no_kind, full);
    let stderr = invalid(dir.path(), &latent_pipeline(1, "  records: 4\n  shape: [8]\n  prior: {low: 0.0}"));
    let expected = "bad.yaml:6:11: source.prior.low: does not apply to a normal prior (the kind when `kind` is left out); remove it, or set `kind: uniform` or `kind: truncated_normal`";
    assert!(stderr.contains(expected), "{stderr}");
    let stderr = invalid(dir.path(), &latent_pipeline(1, "  records: 4\n  shape: [8]\n  prior: uniform"));
    assert!(stderr.contains("bad.yaml:6:3: source.prior.low: is required for a uniform prior"), "{stderr}");
}

#[test]
fn conditioning_columns_repeat_constants() {
    let dir = tempfile::tempdir().unwrap();
    let settings = "  records: 5\n  shape: [2]\n  batch_size: 2\n  conditioning:\n    label: {values: [0, 0, 1, 0], shape: [2, 2]}\n    scale: {values: [0.5]}";
    let output = run_ok(dir.path(), "conditioned", &latent_pipeline(1, settings));
    let (schema, batches) = read_arrow(&output);
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["ordinal", "z", "label", "scale"]);
    assert_eq!(schema.field_with_name("label").unwrap().metadata()["ARROW:extension:metadata"], r#"{"shape":[2,2]}"#);
    assert_eq!(tensor_f32(&batches, "label"), [0.0, 0.0, 1.0, 0.0].repeat(5));
    assert_eq!(tensor_f32(&batches, "scale"), [0.5; 5]);
}

/// Validates a pipeline and returns its error output, which must fail.
fn invalid(dir: &std::path::Path, yaml: &str) -> String {
    let pipeline = write_pipeline(dir, "bad.yaml", yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "validation passed:\n{}", outcome.stdout);
    outcome.stderr
}

#[test]
fn bad_latent_settings_name_lines() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = invalid(dir.path(), &latent_pipeline(1, "  records: 4\n  shape: [8]\n  prior: {kind: gamma}"));
    assert!(
        stderr.contains(
            "bad.yaml:6:11: source.prior.kind: unknown prior \"gamma\"; use normal, uniform or truncated_normal"
        ),
        "{stderr}"
    );

    let stderr = invalid(
        dir.path(),
        &latent_pipeline(1, "  records: 4\n  shape: [8]\n  prior:\n    kind: uniform\n    low: 2.0\n    high: 2.0"),
    );
    assert!(
        stderr.contains("bad.yaml:9:5: source.prior.high: must be above `low`, found low 2 and high 2"),
        "{stderr}"
    );

    let stderr = invalid(
        dir.path(),
        &latent_pipeline(1, "  records: 4\n  shape: [8]\n  prior: {kind: uniform, std: 2.0, low: 0.0}"),
    );
    assert!(stderr.contains("source.prior.std: does not apply to a uniform prior"), "{stderr}");
    assert!(stderr.contains("source.prior.high: is required for a uniform prior"), "{stderr}");

    let stderr = invalid(dir.path(), &latent_pipeline(1, "  records: 4\n  shape: [8]\n  interpolate:\n    steps: 1"));
    assert!(stderr.contains("bad.yaml:7:5: source.interpolate.steps: must be at least 2"), "{stderr}");

    let stderr = invalid(
        dir.path(),
        &latent_pipeline(
            1,
            "  records: 0\n  shape: [8, 0]\n  prior: {kind: truncated_normal, std: -1.0, low: 0.0, high: 1.0}",
        ),
    );
    for expected in [
        "bad.yaml has 3 problems",
        "source.records: must be at least 1",
        "source.shape: must be",
        "source.prior.std: must be positive",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in {stderr}");
    }
}

/// Record counts beyond the int64 ordinal are rejected, for plain records
/// and for paths of several steps each.
#[test]
fn record_counts_beyond_int64_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "  records: 9223372036854775808\n  shape: [8]",
            "source.records: must be at most 9223372036854775807, the largest int64 ordinal, found 9223372036854775808",
        ),
        (
            "  records: 2000000000000000000\n  shape: [8]\n  interpolate: {steps: 9}",
            "source.interpolate.steps: gives 2000000000000000000 paths of 9 records, more than 9223372036854775807",
        ),
    ];
    for (source, expected) in cases {
        let stderr = invalid(dir.path(), &latent_pipeline(1, source));
        assert!(stderr.contains(expected), "{source}: missing {expected:?} in {stderr}");
    }
}

/// Parameters beyond float32 are rejected: values are stored as float32,
/// and a truncated normal with bounds beyond 1e154 in standard units can
/// never accept a proposal, since their squares overflow.
#[test]
fn priors_beyond_float32_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "{kind: normal, mean: 1.0e39}",
            "source.prior.mean: must be within the float32 range of the values (±3.4e38), found 1e39",
        ),
        (
            "{kind: normal, std: 1.0e-300}",
            "source.prior.std: must be between 1.18e-38 and 3.4e38, the range of positive normal float32 numbers, found 1e-300",
        ),
        (
            "{kind: uniform, low: -1.0e300, high: 1.0e300}",
            "source.prior.low: bounds must be within the float32 range of the values (±3.4e38), found low -1e300 and high 1e300",
        ),
        (
            "{kind: truncated_normal, low: 1.0e155, high: 1.0e156}",
            "source.prior.low: bounds must be within the float32 range",
        ),
        (
            "{kind: truncated_normal, low: 0.0, high: 1.0e39}",
            "source.prior.high: bounds must be within the float32 range of the values (±3.4e38), found low 0 and high 1e39",
        ),
    ];
    for (prior, expected) in cases {
        let stderr = invalid(dir.path(), &latent_pipeline(1, &format!("  records: 4\n  shape: [8]\n  prior: {prior}")));
        assert!(stderr.contains(expected), "{prior}: missing {expected:?} in {stderr}");
    }
    // Bounds far out in standard units, within float32, still draw at once.
    let batches = draw(
        dir.path(),
        "far",
        1,
        "  records: 4\n  shape: [8]\n  prior: {kind: truncated_normal, std: 1.2e-38, low: 1.0e38, high: 2.0e38}",
    );
    let values = tensor_f32(&batches, "z");
    assert_eq!(values.len(), 32);
    assert!(values.iter().all(|&v| (1.0e38..=2.0e38).contains(&v)), "{values:?}");
}
