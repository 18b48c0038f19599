use crate::common::*;

/// Returns a pipeline of 3,000 latent records of 64 uniform values, written
/// with the sink settings `compression`.
fn pipeline(compression: &str) -> String {
    format!(
        "seed: 5\nsource: {{kind: latent, records: 3000, shape: [64], prior: {{kind: uniform, low: 0.0, high: 1.0}}}}\nsink:\n  kind: arrow_file\n  path: unused.arrow\n{compression}"
    )
}

/// Runs the pipeline once per compression setting and returns the outputs.
fn outputs(dir: &std::path::Path) -> Vec<(&'static str, std::path::PathBuf)> {
    [
        ("none", ""),
        ("lz4", "  compression: lz4\n"),
        ("zstd", "  compression: zstd\n"),
        ("zstd_1", "  compression: zstd\n  compression_level: 1\n"),
        ("zstd_19", "  compression: zstd\n  compression_level: 19\n"),
        ("zstd_fast", "  compression: zstd\n  compression_level: -5\n"),
    ]
    .into_iter()
    .map(|(name, settings)| (name, run_ok(dir, name, &pipeline(settings))))
    .collect()
}

#[test]
fn codecs_read_back_same_values() {
    let dir = tempfile::tempdir().unwrap();
    let outputs = outputs(dir.path());
    let (_, plain) = read_arrow(&outputs[0].1);
    let values = tensor_f32(&plain, "z");
    assert_eq!(values.len(), 3000 * 64);
    let plain_size = std::fs::metadata(&outputs[0].1).unwrap().len();
    for (name, path) in &outputs[1..] {
        let (_, batches) = read_arrow(path);
        assert_eq!(tensor_f32(&batches, "z"), values, "{name}");
        assert_eq!(int64(&batches, "ordinal"), (0..3000).collect::<Vec<i64>>(), "{name}");
        let size = std::fs::metadata(path).unwrap().len();
        assert!(size < plain_size, "{name}: {size} bytes, uncompressed {plain_size}");
    }
    // The level reaches the encoder: the same rows give other bytes.
    let hashes: Vec<String> = outputs[2..].iter().map(|(_, path)| sha256(path)).collect();
    assert_ne!(hashes[1], hashes[2], "levels 1 and 19 wrote the same bytes");
    assert_ne!(hashes[1], hashes[3], "levels 1 and -5 wrote the same bytes");
}

#[test]
fn level_needs_zstd_and_a_valid_level() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "  compression: lz4\n  compression_level: 3\n",
            "sink.compression_level: applies to `compression: zstd` only, and compression is `lz4`",
        ),
        (
            "  compression_level: 3\n",
            "sink.compression_level: applies to `compression: zstd` only, and compression is `none`",
        ),
        (
            "  compression: zstd\n  compression_level: 23\n",
            "sink.compression_level: must be a zstd level from -131072 to 22, found 23",
        ),
        (
            "  compression: {zstd: 3}\n",
            "sink.compression: `compression` takes a name alone, not a mapping: write `compression: zstd`, with the level as `compression_level: 3`",
        ),
    ];
    for (i, (settings, expected)) in cases.into_iter().enumerate() {
        let (outcome, output) = run_yaml(dir.path(), &format!("bad{i}"), &pipeline(settings));
        assert_eq!(outcome.code, 1, "{settings}: {}", outcome.stderr);
        assert!(outcome.stderr.contains(expected), "{settings}: expected {expected:?} in\n{}", outcome.stderr);
        assert!(!output.exists(), "{settings}: an output was written");
    }
}
