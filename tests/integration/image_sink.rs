use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::writer::FileWriter;
use image::DynamicImage;

use crate::common::*;

/// Decodes a PNG: its color type, width, height, and samples in file order widened to u16.
fn png_levels(path: &Path) -> (image::ColorType, u32, u32, Vec<u16>) {
    let decoded = image::open(path).unwrap_or_else(|err| panic!("{} decodes: {err}", path.display()));
    let (color, width, height) = (decoded.color(), decoded.width(), decoded.height());
    let levels = match decoded {
        DynamicImage::ImageLuma8(b) => b.into_raw().into_iter().map(u16::from).collect(),
        DynamicImage::ImageRgb8(b) => b.into_raw().into_iter().map(u16::from).collect(),
        DynamicImage::ImageRgba8(b) => b.into_raw().into_iter().map(u16::from).collect(),
        DynamicImage::ImageLuma16(b) => b.into_raw(),
        DynamicImage::ImageRgb16(b) => b.into_raw(),
        DynamicImage::ImageRgba16(b) => b.into_raw(),
        other => panic!("unexpected color type {:?}", other.color()),
    };
    (color, width, height, levels)
}

/// Maps a value as documented: `[low, high]` to `[0, max]`, clipped, rounded.
fn expected_level(value: f64, low: f64, high: f64, max: f64) -> u16 {
    (((value - low) / (high - low)).clamp(0.0, 1.0) * max).round() as u16
}

/// Lists the names of the files in a folder.
fn file_names(folder: &Path) -> BTreeSet<String> {
    std::fs::read_dir(folder).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

/// One image-sink case: a `.npy` of 3 records of `shape`, written as PNGs.
struct Case {
    name: &'static str,
    descr: &'static str,
    shape: [usize; 3],
    layout: &'static str,
    bit_depth: u32,
    /// `range` setting, or the default for the element type.
    range: Option<[f64; 2]>,
    default_range: [f64; 2],
    color: image::ColorType,
}

impl Case {
    /// Height, width and channels of the image, from shape and layout.
    fn geometry(&self) -> (usize, usize, usize) {
        let [a, b, c] = self.shape;
        if self.layout == "chw" { (b, c, a) } else { (a, b, c) }
    }

    /// Writes the input, runs the pipeline, and checks every pixel of every PNG.
    fn check(&self, dir: &Path) {
        let records = 3;
        let len: usize = self.shape.iter().product();
        // Values sweep past both ends of the range, so clipping is exercised.
        let [low, high] = self.range.unwrap_or(self.default_range);
        let span = high - low;
        let values: Vec<f64> = (0..records * len)
            .map(|i| {
                let value = low - 0.2 * span + 1.4 * span * ((i * 37) % 101) as f64 / 100.0;
                match self.descr {
                    "<f4" => f64::from(value as f32),
                    "|u1" => value.round().clamp(0.0, 255.0),
                    _ => value.round().clamp(0.0, 65535.0),
                }
            })
            .collect();
        let data: Vec<u8> = match self.descr {
            "<f4" => values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
            "|u1" => values.iter().map(|&v| v as u8).collect(),
            _ => values.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect(),
        };
        let input = dir.join(format!("{}.npy", self.name));
        let mut shape = vec![records];
        shape.extend(self.shape);
        write_npy(&input, self.descr, &shape, &data);
        let folder = dir.join(self.name);
        let range = self.range.map(|[l, h]| format!("\n    range: [{l}, {h}]")).unwrap_or_default();
        let yaml = format!(
            "seed: 1\nsource: {{kind: npy, path: {}, column: pixels, batch_size: 2}}\nsink:\n  kind: arrow_file\n  path: unused.arrow\n  images:\n    column: pixels\n    path: {}\n    layout: {}\n    bit_depth: {}{range}\n",
            yaml_path(&input),
            yaml_path(&folder),
            self.layout,
            self.bit_depth
        );
        run_ok(dir, self.name, &yaml);

        assert_eq!(file_names(&folder), BTreeSet::from(["0.png", "1.png", "2.png"].map(String::from)));
        let (height, width, channels) = self.geometry();
        let area = height * width;
        let max = if self.bit_depth == 16 { 65535.0 } else { 255.0 };
        for record in 0..records {
            let (color, w, h, levels) = png_levels(&folder.join(format!("{record}.png")));
            assert_eq!((color, w as usize, h as usize), (self.color, width, height), "{}", self.name);
            let row = &values[record * len..(record + 1) * len];
            for pixel in 0..area {
                for channel in 0..channels {
                    let value = if self.layout == "chw" {
                        row[channel * area + pixel]
                    } else {
                        row[pixel * channels + channel]
                    };
                    assert_eq!(
                        levels[pixel * channels + channel],
                        expected_level(value, low, high, max),
                        "{}: record {record} pixel {pixel} channel {channel}, value {value}",
                        self.name
                    );
                }
            }
        }
    }
}

#[test]
fn png_pixels_match_tensor_values() {
    let dir = tempfile::tempdir().unwrap();
    use image::ColorType::*;
    let cases = [
        Case {
            name: "gray8_chw_f32",
            descr: "<f4",
            shape: [1, 3, 5],
            layout: "chw",
            bit_depth: 8,
            range: Some([-1.0, 1.0]),
            default_range: [0.0, 1.0],
            color: L8,
        },
        Case {
            name: "gray16_hwc_f32",
            descr: "<f4",
            shape: [3, 5, 1],
            layout: "hwc",
            bit_depth: 16,
            range: None,
            default_range: [0.0, 1.0],
            color: L16,
        },
        Case {
            name: "rgb8_chw_f32",
            descr: "<f4",
            shape: [3, 4, 2],
            layout: "chw",
            bit_depth: 8,
            range: None,
            default_range: [0.0, 1.0],
            color: Rgb8,
        },
        Case {
            name: "rgb16_hwc_f32",
            descr: "<f4",
            shape: [2, 4, 3],
            layout: "hwc",
            bit_depth: 16,
            range: Some([-0.5, 2.0]),
            default_range: [0.0, 1.0],
            color: Rgb16,
        },
        Case {
            name: "rgb16_chw_u8",
            descr: "|u1",
            shape: [3, 2, 3],
            layout: "chw",
            bit_depth: 16,
            range: None,
            default_range: [0.0, 255.0],
            color: Rgb16,
        },
        Case {
            name: "rgba8_hwc_u8",
            descr: "|u1",
            shape: [2, 3, 4],
            layout: "hwc",
            bit_depth: 8,
            range: Some([20.0, 200.0]),
            default_range: [0.0, 255.0],
            color: Rgba8,
        },
        Case {
            name: "rgba16_chw_u16",
            descr: "<u2",
            shape: [4, 3, 2],
            layout: "chw",
            bit_depth: 16,
            range: None,
            default_range: [0.0, 65535.0],
            color: Rgba16,
        },
        Case {
            name: "gray8_hwc_u16",
            descr: "<u2",
            shape: [2, 2, 1],
            layout: "hwc",
            bit_depth: 8,
            range: None,
            default_range: [0.0, 65535.0],
            color: L8,
        },
    ];
    for case in &cases {
        case.check(dir.path());
    }
}

/// Writes an Arrow file with string `ids`, a 2x2 gray image `img` and two
/// class scores per record.
fn write_keyed_input(path: &Path, ids: [&str; 2]) {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("img", DataType::FixedSizeList(item.clone(), 4), false),
        Field::new("scores", DataType::FixedSizeList(item.clone(), 2), false),
    ]));
    let list = |size: i32, values: Vec<f32>| {
        Arc::new(FixedSizeListArray::new(item.clone(), size, Arc::new(Float32Array::from(values)), None))
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(ids.to_vec())),
            list(4, vec![0.0, 0.25, 0.5, 1.0, 1.0, 0.5, 0.25, 0.0]),
            list(2, vec![0.0, 1.0, 2.0, 0.0]),
        ],
    )
    .unwrap();
    let mut writer = FileWriter::try_new(File::create(path).unwrap(), &schema).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
}

/// Returns a pipeline over `input` that draws two samples per record and
/// writes `img` as PNG files into `folder`.
fn keyed_pipeline(input: &Path, folder: &Path) -> String {
    format!(
        "seed: 1\nsource: {{kind: arrow_file, path: {}, id_column: id, tensors: {{img: {{shape: [2, 2]}}}}}}\nstages:\n  - {{kind: sample, column: scores, samples: 2}}\nsink:\n  kind: arrow_file\n  path: unused.arrow\n  columns: [id, sample, class]\n  images: {{column: img, path: {}}}\n",
        yaml_path(input),
        yaml_path(folder)
    )
}

#[test]
fn file_names_follow_keys_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    // Keys that are file paths; the sample stage makes two rows of each record.
    let input = dir.path().join("keyed_input.arrow");
    write_keyed_input(&input, ["cats/a.png", "b"]);
    let folder = dir.path().join("pngs");
    let output = run_ok(dir.path(), "keyed", &keyed_pipeline(&input, &folder));
    assert_eq!(rows(&read_arrow(&output).1), 4);
    let expected =
        BTreeSet::from(["cats%2Fa%2Epng_s0.png", "cats%2Fa%2Epng_s1.png", "b_s0.png", "b_s1.png"].map(String::from));
    assert_eq!(file_names(&folder), expected, "one file per row and no temporary files left");
    let (color, width, height, levels) = png_levels(&folder.join("b_s1.png"));
    assert_eq!((color, width, height), (image::ColorType::L8, 2, 2));
    assert_eq!(levels, [255, 128, 64, 0]);
}

#[test]
fn duplicate_keys_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("same_keys.arrow");
    write_keyed_input(&input, ["same", "same"]);
    let (outcome, output) = run_yaml(dir.path(), "duplicates", &keyed_pipeline(&input, &dir.path().join("pngs")));
    assert_eq!(outcome.code, 1, "{}", outcome.stdout);
    assert!(outcome.stderr.contains("same_s0.png"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("record key \"same\" names a file this run already wrote"), "{}", outcome.stderr);
    assert!(!output.exists(), "a failed run must not commit the Arrow file");
}

/// Writes `pipelines/<name>.yaml` with its paths moved: fixtures from the
/// repository, outputs into `dir`. `extra` edits the text.
fn example_pipeline(dir: &Path, name: &str, extra: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(repo(&format!("pipelines/{name}.yaml"))).unwrap();
    let fixtures = format!("{}/", repo("fixtures").display());
    let text = extra(text.replace("../fixtures/", &fixtures).replace("../out/", &format!("{}/", dir.display())));
    write_pipeline(dir, &format!("{name}.yaml"), &text)
}

/// Runs a pipeline file that must succeed.
fn run_file(pipeline: &Path, extra_args: &[&str]) {
    let mut args = vec!["run", pipeline.to_str().unwrap()];
    args.extend(extra_args);
    let outcome = stochflow(&args);
    assert_eq!(outcome.code, 0, "{}\n{}", outcome.stdout, outcome.stderr);
}

#[test]
fn generator_pipelines_write_pngs_and_arrow() {
    let dir = tempfile::tempdir().unwrap();
    for (name, records, expected_columns) in [
        ("generator", 16, vec!["ordinal", "z", "image"]),
        ("generator_interpolate", 36, vec!["ordinal", "path_index", "step", "t", "z", "image"]),
    ] {
        run_file(&example_pipeline(dir.path(), name, |t| t), &[]);
        let (schema, batches) = read_arrow(&dir.path().join(format!("{name}.arrow")));
        let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(columns, expected_columns);
        assert_eq!(rows(&batches), records);
        let images = tensor_f32(&batches, "image");
        let folder = dir.path().join(name);
        let expected_files: BTreeSet<String> = (0..records).map(|i| format!("{i}.png")).collect();
        assert_eq!(file_names(&folder), expected_files);
        for record in 0..records {
            let (color, width, height, levels) = png_levels(&folder.join(format!("{record}.png")));
            assert_eq!((color, width, height), (image::ColorType::L8, 8, 8));
            let expected: Vec<u16> = images[64 * record..64 * (record + 1)]
                .iter()
                .map(|&v| expected_level(f64::from(v), 0.0, 1.0, 255.0))
                .collect();
            assert_eq!(levels, expected, "{name}: record {record}");
        }
    }
}

#[test]
fn png_bytes_ignore_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let hashes = |folder: &Path| -> Vec<String> { (0..16).map(|i| sha256(&folder.join(format!("{i}.png")))).collect() };
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    let third = dir.path().join("third");
    for folder in [&first, &second, &third] {
        std::fs::create_dir(folder).unwrap();
    }
    run_file(&example_pipeline(&first, "generator", |t| t), &[]);
    let small_batches = |t: String| t.replace("  records: 16\n", "  records: 16\n  batch_size: 3\n");
    run_file(&example_pipeline(&second, "generator", small_batches), &[]);
    run_file(&example_pipeline(&third, "generator", |t| t), &["--seed", "8"]);
    let (a, b, c) =
        (hashes(&first.join("generator")), hashes(&second.join("generator")), hashes(&third.join("generator")));
    assert_eq!(a, b, "the source batch size changed the PNG bytes");
    assert_eq!(sha256(&first.join("generator.arrow")), sha256(&second.join("generator.arrow")));
    assert!(a.iter().zip(&c).all(|(x, y)| x != y), "another seed must change every image");
}

#[test]
fn image_sink_rejects_non_images() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |edit: &dyn Fn(String) -> String| {
        let pipeline = example_pipeline(dir.path(), "generator", edit);
        let outcome = stochflow(&["validate", pipeline.to_str().unwrap()]);
        assert_eq!(outcome.code, 1, "validation passed:\n{}", outcome.stdout);
        outcome.stderr
    };
    let stderr = validate(&|t| t.replace("    column: image\n", "    column: ordinal\n"));
    assert!(
        stderr.contains("generator.yaml:33:5: sink.images.column: column \"ordinal\" has type Int64, not a float32, uint8 or uint16 tensor"),
        "{stderr}"
    );
    let stderr = validate(&|t| t.replace("    column: image\n", "    column: z\n"));
    assert!(stderr.contains("sink.images.column: column \"z\" has per-row shape [8]"), "{stderr}");
    let stderr = validate(&|t| t.replace("layout: chw", "layout: hwc"));
    assert!(stderr.contains("has 8 channels in layout hwc"), "{stderr}");
    let stderr =
        validate(&|t| t.replace("bit_depth: 8", "bit_depth: 12").replace("range: [0.0, 1.0]", "range: [1.0, 1.0]"));
    assert!(stderr.contains("generator.yaml:36:5: sink.images.bit_depth: must be 8 or 16, found 12"), "{stderr}");
    assert!(stderr.contains("generator.yaml:37:5: sink.images.range: must be two finite numbers"), "{stderr}");
}
