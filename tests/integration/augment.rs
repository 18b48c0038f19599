use std::fs::File;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{Field, Float32Type, Schema, UInt16Type};
use arrow::ipc::writer::FileWriter;
use stochflow::tensor::{self, ElementType, TensorType};

use crate::common::*;

/// Flat uint16 values of a tensor column over all batches.
fn tensor_u16(batches: &[RecordBatch], column: &str) -> Vec<u16> {
    let mut values = Vec::new();
    for batch in batches {
        let list = batch.column_by_name(column).unwrap().as_fixed_size_list();
        values.extend_from_slice(list.values().as_primitive::<UInt16Type>().values());
    }
    values
}

/// Reads the tensor type a field declares.
fn declared(schema: &arrow::datatypes::SchemaRef, column: &str) -> TensorType {
    TensorType::of_field(schema.field_with_name(column).unwrap()).unwrap()
}

/// The three channel counts, three element types and two layouts of
/// `preprocess`, each decoded from its fixture image.
const KINDS: [(&str, &str, &str, usize); 9] = [
    ("gray8.png", "gray", "uint8", 1),
    ("rgb8.png", "rgb", "uint8", 3),
    ("rgba8.png", "rgba", "uint8", 4),
    ("gray16.png", "gray", "uint16", 1),
    ("rgb16.png", "rgb", "uint16", 3),
    ("rgba8.png", "rgba", "uint16", 4),
    ("gray8.png", "gray", "float32", 1),
    ("rgb16.png", "rgb", "float32", 3),
    ("rgba8.png", "rgba", "float32", 4),
];

/// A pipeline that decodes one fixture image as `column` (4x3 pixels), then
/// augments it as `augmented` with `ops`.
fn image_pipeline(file: &str, color: &str, dtype: &str, layout: &str, ops: &str) -> String {
    format!(
        r#"
seed: 9
source: {{kind: images, path: {path}}}
stages:
  - {{name: decode, kind: preprocess, color: {color}, dtype: {dtype}, layout: {layout}, resize: {{width: 4, height: 3}}, output: plain}}
  - name: tta
    kind: augment
    column: plain
    output: augmented
    layout: {layout}
    ops: {ops}
sink: {{kind: arrow_file, path: unused.arrow}}
"#,
        path = yaml_path(&repo(&format!("fixtures/images/{file}"))),
    )
}

#[test]
fn every_image_kind_keeps_type_and_channels() {
    let dir = tempfile::tempdir().unwrap();
    let ops = "[{flip: both}, {rotation: {degrees: 20}}, {zoom: {height: [-0.2, 0.3]}}, {translation: {height: 0.2, width: 0.2, fill: constant, fill_value: 0.5}}, {contrast: {factor: 0.3}}, {brightness: {delta: 0.2}}, {crop: {height: 2, width: 3}}]";
    for (file, color, dtype, channels) in KINDS {
        for layout in ["chw", "hwc"] {
            let name = format!("{color}-{dtype}-{layout}");
            let output = run_ok(dir.path(), &name, &image_pipeline(file, color, dtype, layout, ops));
            let (schema, batches) = read_arrow(&output);
            let input = declared(&schema, "plain");
            let augmented = declared(&schema, "augmented");
            assert_eq!(input.element, augmented.element, "{name}: element type");
            assert_eq!(input.element.name(), dtype, "{name}: preprocess dtype");
            let want_shape = if layout == "chw" { vec![channels, 2, 3] } else { vec![2, 3, channels] };
            assert_eq!(augmented.shape, want_shape, "{name}: cropped shape");
            let values = match augmented.element {
                ElementType::Float32 => tensor_f32(&batches, "augmented").len(),
                ElementType::UInt8 => tensor_u8(&batches, "augmented").len(),
                ElementType::UInt16 => tensor_u16(&batches, "augmented").len(),
            };
            assert_eq!(values, channels * 6, "{name}: values per row");
        }
    }
}

/// Mirrors a `[channels, height, width]` or `[height, width, channels]` row left to right.
fn mirror<T: Copy>(row: &[T], layout: &str, channels: usize, height: usize, width: usize) -> Vec<T> {
    let mut out = row.to_vec();
    for y in 0..height {
        for x in 0..width {
            for c in 0..channels {
                let at = |x: usize| {
                    if layout == "chw" { (c * height + y) * width + x } else { (y * width + x) * channels + c }
                };
                out[at(width - 1 - x)] = row[at(x)];
            }
        }
    }
    out
}

#[test]
fn flip_moves_exact_values_every_kind() {
    // The four flips of a 3x4 image are distinct, so the output must equal
    // the input or its mirror image, value for value.
    let dir = tempfile::tempdir().unwrap();
    let mut flipped_runs = 0;
    for (file, color, dtype, channels) in KINDS {
        for layout in ["chw", "hwc"] {
            let name = format!("flip-{color}-{dtype}-{layout}");
            let output = run_ok(dir.path(), &name, &image_pipeline(file, color, dtype, layout, "[{flip: horizontal}]"));
            let (_, batches) = read_arrow(&output);
            let mut check = |plain: Vec<f64>, augmented: Vec<f64>| {
                let mirrored = mirror(&plain, layout, channels, 3, 4);
                assert!(augmented == plain || augmented == mirrored, "{name}: {augmented:?} from {plain:?}");
                if augmented == mirrored {
                    flipped_runs += 1;
                }
            };
            match dtype {
                "uint8" => check(
                    tensor_u8(&batches, "plain").into_iter().map(f64::from).collect(),
                    tensor_u8(&batches, "augmented").into_iter().map(f64::from).collect(),
                ),
                "uint16" => check(
                    tensor_u16(&batches, "plain").into_iter().map(f64::from).collect(),
                    tensor_u16(&batches, "augmented").into_iter().map(f64::from).collect(),
                ),
                _ => check(
                    tensor_f32(&batches, "plain").into_iter().map(f64::from).collect(),
                    tensor_f32(&batches, "augmented").into_iter().map(f64::from).collect(),
                ),
            }
        }
    }
    // Each file name keys its own stream, so some runs flip and some do not.
    assert!(flipped_runs > 0, "no run flipped");
    assert!(flipped_runs < 18, "every run flipped");
}

#[test]
fn integer_brightness_uses_unit_scale() {
    // delta 0.2 on the [0, 1] scale is 51 for uint8 and 13107 for uint16;
    // gray8's pixel 0 becomes 51, and 255 saturates.
    let dir = tempfile::tempdir().unwrap();
    let ops = "[{brightness: {delta: [0.2, 0.2]}}]";
    let output = run_ok(dir.path(), "u8", &image_pipeline("gray8.png", "gray", "uint8", "chw", ops));
    let (_, batches) = read_arrow(&output);
    let plain = tensor_u8(&batches, "plain");
    let expected: Vec<u8> = plain.iter().map(|&v| (u32::from(v) + 51).min(255) as u8).collect();
    assert_eq!(tensor_u8(&batches, "augmented"), expected);
    let output = run_ok(dir.path(), "u16", &image_pipeline("gray16.png", "gray", "uint16", "chw", ops));
    let (_, batches) = read_arrow(&output);
    let plain = tensor_u16(&batches, "plain");
    let expected: Vec<u16> = plain.iter().map(|&v| (u32::from(v) + 13107).min(65535) as u16).collect();
    assert_eq!(tensor_u16(&batches, "augmented"), expected);
}

/// Photos resized to 16x16 and augmented with every operation.
fn photos_pipeline(seed: u64, source_batch: usize, workers: usize) -> String {
    format!(
        r#"
seed: {seed}
source: {{kind: images, path: {path}, batch_size: {source_batch}}}
stages:
  - {{name: decode, kind: preprocess, resize: {{width: 16, height: 16}}}}
  - name: tta
    kind: augment
    column: image
    ops:
      - flip: both
      - rotation: {{degrees: [-30, 30], fill: reflect}}
      - zoom: {{height: [-0.2, 0.2], width: [-0.1, 0.1], fill: wrap}}
      - translation: {{height: [-0.1, 0.1], width: [-0.1, 0.1], fill: constant, fill_value: 0.5}}
      - crop: {{height: 12, width: 12}}
      - contrast: {{factor: [0.8, 1.2]}}
      - brightness: {{delta: [-0.1, 0.1]}}
runtime: {{workers: {workers}, channel_capacity: 2}}
sink: {{kind: arrow_file, path: unused.arrow}}
"#,
        path = yaml_path(&repo("fixtures/photos")),
    )
}

#[test]
fn same_seed_same_bytes_across_workers() {
    let dir = tempfile::tempdir().unwrap();
    let settings = [(1, 1), (2, 3), (5, 2)];
    let hashes: Vec<String> = settings
        .iter()
        .enumerate()
        .map(|(i, &(batch, workers))| {
            sha256(&run_ok(dir.path(), &format!("run{i}"), &photos_pipeline(4, batch, workers)))
        })
        .collect();
    for (setting, hash) in settings.iter().zip(&hashes) {
        assert_eq!(hash, &hashes[0], "batch size and workers {setting:?} changed the output");
    }
    let other = run_ok(dir.path(), "seed5", &photos_pipeline(5, 1, 1));
    let (schema, first) = read_arrow(&run_ok(dir.path(), "seed4", &photos_pipeline(4, 1, 1)));
    let (_, second) = read_arrow(&other);
    assert_eq!(declared(&schema, "image").shape, [3, 12, 12]);
    let (a, b) = (tensor_f32(&first, "image"), tensor_f32(&second, "image"));
    let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert!(differing > a.len() / 2, "only {differing} of {} values differ between seeds", a.len());
}

/// Builds a pipeline that decodes the photos twice, as `image` and `copy`, and
/// augments `image` with `copy` paired.
fn paired_pipeline(color_on_copy: bool) -> String {
    format!(
        r#"
seed: 3
source: {{kind: images, path: {path}}}
stages:
  - {{name: decode_copy, kind: preprocess, resize: {{width: 16, height: 20}}, layout: hwc, dtype: uint8, output: copy}}
  - {{name: decode, kind: preprocess, resize: {{width: 16, height: 20}}, layout: hwc, dtype: uint8}}
  - name: tta
    kind: augment
    column: image
    layout: hwc
    paired: [{{column: copy, output: copy_augmented, color: {color_on_copy}}}]
    ops:
      - flip: both
      - rotation: {{degrees: 40, interpolation: nearest, fill: constant, fill_value: 1.0}}
      - zoom: {{height: 0.3, interpolation: nearest}}
      - translation: {{height: 0.2, width: 0.2, interpolation: nearest, fill: wrap}}
      - crop: {{height: 15, width: 10}}
      - brightness: {{delta: 0.1}}
sink: {{kind: arrow_file, path: unused.arrow}}
"#,
        path = yaml_path(&repo("fixtures/photos")),
    )
}

#[test]
fn paired_copy_stays_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let (schema, batches) = read_arrow(&run_ok(dir.path(), "colored", &paired_pipeline(true)));
    assert_eq!(declared(&schema, "copy_augmented").shape, [15, 10, 3]);
    let augmented = tensor_u8(&batches, "image");
    assert_eq!(augmented, tensor_u8(&batches, "copy_augmented"));
    // The source column `copy` keeps its 20x16 size.
    assert_eq!(declared(&schema, "copy").shape, [20, 16, 3]);

    // Without `color`, the copy skips brightness: same geometry, other values.
    let (_, batches) = read_arrow(&run_ok(dir.path(), "geometry", &paired_pipeline(false)));
    assert_eq!(tensor_u8(&batches, "image"), augmented);
    assert_ne!(tensor_u8(&batches, "copy_augmented"), augmented);
}

/// Writes an Arrow file of `records` records with an `id`, a 1x2x3 float32
/// `image` holding 0 to 5, and two-class `scores`.
fn write_records(path: &std::path::Path, records: usize) {
    let image_type = TensorType::new(ElementType::Float32, vec![1, 2, 3]);
    let score_type = TensorType::new(ElementType::Float32, vec![2]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", arrow::datatypes::DataType::Int64, false),
        image_type.field("image"),
        score_type.field("scores"),
    ]));
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..records as i64));
    let pixels = (0..records).flat_map(|_| (0..6).map(|v| v as f32)).collect();
    let scores = vec![0.0; 2 * records];
    let columns = vec![
        ids,
        tensor::build::<Float32Type>(&image_type, pixels).unwrap(),
        tensor::build::<Float32Type>(&score_type, scores).unwrap(),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let mut writer = FileWriter::try_new(File::create(path).unwrap(), &schema).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
}

/// Records optionally fanned out into 4 samples, then rotated.
fn fan_out_pipeline(input: &std::path::Path, samples: u32) -> String {
    format!(
        r#"
seed: 8
source: {{kind: arrow_file, path: {input}, id_column: id}}
stages:
  - {{name: draw, kind: sample, column: scores, samples: {samples}}}
  - {{name: tta, kind: augment, column: image, ops: [{{rotation: {{degrees: 180, fill: nearest}}}}]}}
sink: {{kind: arrow_file, path: unused.arrow}}
"#,
        input = yaml_path(input),
    )
}

#[test]
fn fan_out_samples_draw_differently() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("records.arrow");
    write_records(&input, 10);
    let (_, fanned) = read_arrow(&run_ok(dir.path(), "fanned", &fan_out_pipeline(&input, 4)));
    let (_, single) = read_arrow(&run_ok(dir.path(), "single", &fan_out_pipeline(&input, 1)));
    let fanned_images = tensor_f32(&fanned, "image");
    let single_images = tensor_f32(&single, "image");
    assert_eq!(int32(&fanned, "sample"), (0..10).flat_map(|_| 0..4).collect::<Vec<_>>());
    for record in 0..10 {
        let rows: Vec<&[f32]> =
            (0..4).map(|s| &fanned_images[(record * 4 + s) * 6..(record * 4 + s + 1) * 6]).collect();
        // Sample 0 draws from the same stream as an unfanned record.
        assert_eq!(rows[0], &single_images[record * 6..(record + 1) * 6], "record {record}");
        for s in 1..4 {
            assert_ne!(rows[s], rows[0], "record {record} sample {s} repeats sample 0");
        }
    }
}

#[test]
fn flip_rate_passes_chi_square() {
    // 4000 one-row images [0, 1] flipped horizontally read [1, 0].
    let dir = tempfile::tempdir().unwrap();
    let records = 4000;
    let values: Vec<f32> = (0..records).flat_map(|_| [0.0, 1.0]).collect();
    let input = dir.path().join("rows.npy");
    write_npy_f32(&input, &[records, 1, 1, 2], &values);
    let yaml = format!(
        "seed: 21\nsource: {{kind: npy, path: {}, column: image}}\nstages:\n  - {{kind: augment, column: image, ops: [{{flip: horizontal}}]}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (_, batches) = read_arrow(&run_ok(dir.path(), "flips", &yaml));
    let flipped = tensor_f32(&batches, "image").chunks(2).filter(|row| row == &[1.0, 0.0]).count() as f64;
    let expected = records as f64 / 2.0;
    let chi_square = 2.0 * (flipped - expected).powi(2) / expected;
    // 10.83 is the 0.999 quantile of chi-square with 1 degree of freedom.
    assert!(chi_square < 10.83, "{flipped} of {records} flipped, chi-square {chi_square}");
}

#[test]
fn non_image_column_fails_validation() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {{kind: arrow_file, path: {}, id_column: id}}\nstages:\n  - name: tta\n    kind: augment\n    column: pixels\n    ops: [{{flip: horizontal}}, {{crop: {{height: 9, width: 9}}}}]\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&repo("fixtures/data/digits_test.arrow"))
    );
    let pipeline = write_pipeline(dir.path(), "vector.yaml", &yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{outcome:?}");
    assert!(outcome.stderr.contains("stages[0].column"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("not an image"), "{}", outcome.stderr);
}

#[test]
fn bad_ranges_are_listed_with_paths() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {{kind: images, path: {}}}\nstages:\n  - {{kind: preprocess, resize: {{width: 4, height: 3}}}}\n  - name: tta\n    kind: augment\n    column: image\n    ops:\n      - rotation: {{degrees: [15, -15]}}\n      - zoom: {{height: [-1.5, 0.2]}}\n      - contrast: {{factor: 1.5}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&repo("fixtures/images/rgb8.png"))
    );
    let pipeline = write_pipeline(dir.path(), "ranges.yaml", &yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{outcome:?}");
    for path in
        ["stages[1].ops[0].rotation.degrees", "stages[1].ops[1].zoom.height", "stages[1].ops[2].contrast.factor"]
    {
        assert!(outcome.stderr.contains(path), "{path} missing from:\n{}", outcome.stderr);
    }
}

#[test]
fn oversized_crop_fails_validation() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = image_pipeline(
        "rgb8.png",
        "rgb",
        "float32",
        "chw",
        "[{crop: {height: 2, width: 3}}, {crop: {height: 3, width: 3}}]",
    );
    let pipeline = write_pipeline(dir.path(), "crop.yaml", &yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{outcome:?}");
    assert!(outcome.stderr.contains("stages[1].ops[1].crop"), "{}", outcome.stderr);
}

#[test]
fn paired_size_mismatch_fails_validation() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {{kind: images, path: {}}}\nstages:\n  - {{name: small, kind: preprocess, resize: {{width: 4, height: 3}}, output: mask}}\n  - {{kind: preprocess, resize: {{width: 8, height: 6}}}}\n  - {{kind: augment, column: image, paired: [{{column: mask}}, {{column: image}}], ops: [{{flip: both}}]}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&repo("fixtures/images/rgb8.png"))
    );
    let pipeline = write_pipeline(dir.path(), "paired.yaml", &yaml);
    let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
    assert_eq!(outcome.code, 1, "{outcome:?}");
    assert!(outcome.stderr.contains("stages[2].paired[0].column"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("has height 3 and width 4"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("stages[2].paired[1].column"), "{}", outcome.stderr);
}

#[test]
fn chw_and_hwc_augment_alike() {
    // The same photos as chw (main) and hwc (paired, bilinear, with color)
    // take the same draws, so they agree value for value once transposed.
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
seed: 6
source: {{kind: images, path: {path}}}
stages:
  - {{name: decode_hwc, kind: preprocess, resize: {{width: 10, height: 8}}, layout: hwc, output: hwc}}
  - {{name: decode, kind: preprocess, resize: {{width: 10, height: 8}}}}
  - name: tta
    kind: augment
    column: image
    paired: [{{column: hwc, layout: hwc, interpolation: bilinear, color: true}}]
    ops:
      - flip: both
      - rotation: {{degrees: 30}}
      - zoom: {{height: 0.2, width: 0.1, fill: wrap}}
      - translation: {{height: 0.2, width: 0.2, fill: constant, fill_value: 0.3}}
      - crop: {{height: 6, width: 7}}
      - contrast: {{factor: 0.3}}
      - brightness: {{delta: 0.1}}
sink: {{kind: arrow_file, path: unused.arrow}}
"#,
        path = yaml_path(&repo("fixtures/photos")),
    );
    let (schema, batches) = read_arrow(&run_ok(dir.path(), "layouts", &yaml));
    assert_eq!(declared(&schema, "image").shape, [3, 6, 7]);
    assert_eq!(declared(&schema, "hwc").shape, [6, 7, 3]);
    let chw = tensor_f32(&batches, "image");
    let hwc = tensor_f32(&batches, "hwc");
    assert_eq!(chw.len(), 5 * 3 * 6 * 7);
    for (row, (planar, interleaved)) in chw.chunks(126).zip(hwc.chunks(126)).enumerate() {
        for c in 0..3 {
            for pixel in 0..42 {
                assert_eq!(planar[c * 42 + pixel], interleaved[pixel * 3 + c], "row {row}, channel {c}, pixel {pixel}");
            }
        }
    }
}
