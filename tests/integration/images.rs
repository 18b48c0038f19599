use serde_json::Value;

use crate::common::*;

/// Decodes one fixture image through `preprocess` with no resizing, in HWC
/// layout, and returns the flat tensor.
fn decode(dir: &std::path::Path, file: &str, color: &str, width: u64, height: u64) -> Vec<f32> {
    let yaml = format!(
        "seed: 1\nsource: {{kind: images, path: {}}}\nstages:\n  - {{kind: preprocess, color: {color}, layout: hwc, resize: {{width: {width}, height: {height}}}}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&repo(&format!("fixtures/images/{file}")))
    );
    let name = format!("{}-{color}", file.replace('.', "-"));
    let output = run_ok(dir, &name, &yaml);
    let (_, batches) = read_arrow(&output);
    assert_eq!(strings(&batches, "path"), [file]);
    tensor_f32(&batches, "image")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo("fixtures/images/expected.json")).unwrap()).unwrap()
}

/// Returns the fixture's pixels as RGBA values in [0, 1], with gray repeated
/// and alpha 1 when absent.
fn expected_rgba(entry: &Value, pixels_key: &str) -> Vec<f32> {
    let max = if entry["bit_depth"] == 16 { 65535.0 } else { 255.0 };
    let mut values = Vec::new();
    for row in entry[pixels_key].as_array().unwrap() {
        for pixel in row.as_array().unwrap() {
            let channels: Vec<f32> = match pixel {
                Value::Array(c) => c.iter().map(|v| v.as_f64().unwrap() as f32 / max).collect(),
                v => vec![v.as_f64().unwrap() as f32 / max],
            };
            match channels.len() {
                1 => values.extend([channels[0], channels[0], channels[0], 1.0]),
                3 => values.extend([channels[0], channels[1], channels[2], 1.0]),
                _ => values.extend(channels),
            }
        }
    }
    values
}

#[test]
fn every_kind_decodes_to_unit_range_floats() {
    let dir = tempfile::tempdir().unwrap();
    let expected = expected();
    for file in ["gray8.png", "gray16.png", "rgb8.png", "rgb16.png", "rgba8.png"] {
        let entry = &expected[file];
        let width = entry["width"].as_u64().unwrap();
        let height = entry["height"].as_u64().unwrap();
        let decoded = decode(dir.path(), file, "rgba", width, height);
        let want = expected_rgba(entry, "pixels");
        assert_eq!(decoded.len(), want.len(), "{file}: tensor size");
        for (i, (got, want)) in decoded.iter().zip(&want).enumerate() {
            assert!((got - want).abs() < 1e-6, "{file}: value {i} is {got}, expected {want}");
        }
    }
}

#[test]
fn gray_sixteen_bit_keeps_full_precision() {
    let dir = tempfile::tempdir().unwrap();
    let entry = &expected()["gray16.png"];
    let decoded = decode(dir.path(), "gray16.png", "gray", 4, 3);
    let want: Vec<f32> = entry["pixels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32 / 65535.0))
        .collect();
    assert_eq!(decoded.len(), 12);
    for (got, want) in decoded.iter().zip(&want) {
        assert!((got - want).abs() < 1e-6, "gray16 value {got}, expected {want}");
    }
    // Neighbouring 16-bit values stay distinct, which 8 bits could not do.
    assert_ne!(decoded[0], decoded[1]);
}

#[test]
fn exif_orientation_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let entry = &expected()["exif_rotate90.jpg"];
    assert_eq!((entry["oriented_width"].as_u64(), entry["oriented_height"].as_u64()), (Some(16), Some(32)));
    let decoded = decode(dir.path(), "exif_rotate90.jpg", "rgb", 16, 32);
    assert_eq!(decoded.len(), 16 * 32 * 3);
    let want = expected_rgba(entry, "oriented_pixels");
    // JPEG is lossy: allow 3 of 255 per channel.
    for (pixel, (got, want)) in decoded.chunks(3).zip(want.chunks(4)).enumerate() {
        for c in 0..3 {
            assert!((got[c] - want[c]).abs() < 3.0 / 255.0, "pixel {pixel} channel {c}: {} vs {}", got[c], want[c]);
        }
    }
    // Top-left is red and bottom-left is blue once rotated.
    assert!(decoded[0] > 0.9, "top-left red channel is {}", decoded[0]);
    assert!(decoded[2] < 0.1, "top-left blue channel is {}", decoded[2]);
    let last_row = 31 * 16 * 3;
    assert!(decoded[last_row] < 0.1, "bottom-left red channel is {}", decoded[last_row]);
    assert!(decoded[last_row + 2] > 0.9, "bottom-left blue channel is {}", decoded[last_row + 2]);
}

#[test]
fn bgr_and_chw_reorder_channels() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 1\nsource: {{kind: images, path: {}}}\nstages:\n  - {{kind: preprocess, color: bgr, layout: chw, resize: {{width: 4, height: 3}}, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&repo("fixtures/images/rgb8.png"))
    );
    let output = run_ok(dir.path(), "bgr", &yaml);
    let (schema, batches) = read_arrow(&output);
    assert_eq!(schema.field_with_name("image").unwrap().metadata()["ARROW:extension:metadata"], r#"{"shape":[3,3,4]}"#);
    let values = tensor_f32(&batches, "image");
    // Pixel (0, 0) is pure red: in BGR planes, red is the third plane.
    // Normalized with mean 0.5 and std 0.5, 1.0 becomes 1.0 and 0.0 becomes -1.0.
    let plane = 12;
    assert_eq!(values[0], -1.0, "blue plane at (0,0)");
    assert_eq!(values[plane], -1.0, "green plane at (0,0)");
    assert_eq!(values[2 * plane], 1.0, "red plane at (0,0)");
}
