//! Helpers shared by the end-to-end tests.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int32Type, Int64Type, SchemaRef, UInt8Type};
use arrow::ipc::reader::FileReader;
use sha2::{Digest, Sha256};

/// Absolute path of a file in the repository.
pub fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Result of one command.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the stochflow binary with `args`.
pub fn stochflow(args: &[&str]) -> Outcome {
    let output =
        Command::new(env!("CARGO_BIN_EXE_stochflow")).args(args).output().expect("the stochflow binary starts");
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Returns the Python for the reader checks (`STOCHFLOW_TEST_PYTHON`, else
/// `python3`) when it imports every one of `modules`. Otherwise `None`, and the
/// check is skipped, unless `STOCHFLOW_REQUIRE_READERS` is set (as
/// tests/run.sh sets it, after installing the packages), which fails it.
pub fn python_with(modules: &[&str]) -> Option<String> {
    let python = std::env::var("STOCHFLOW_TEST_PYTHON").unwrap_or_else(|_| String::from("python3"));
    let imports = format!("import {}", modules.join(", "));
    let found = Command::new(&python).args(["-c", &imports]).status().is_ok_and(|status| status.success());
    if found {
        return Some(python);
    }
    assert!(
        std::env::var_os("STOCHFLOW_REQUIRE_READERS").is_none(),
        "these Python packages are required but `{python} -c '{imports}'` failed: {}",
        modules.join(", ")
    );
    eprintln!("skipping: {python} cannot import {}; run tests/run.sh to include this check", modules.join(", "));
    None
}

/// Writes `yaml` to `dir/name` and returns the path.
pub fn write_pipeline(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("the pipeline file is written");
    path
}

/// Writes a pipeline and runs it; the output goes to `dir/<name>.arrow`.
pub fn run_yaml(dir: &Path, name: &str, yaml: &str) -> (Outcome, PathBuf) {
    let pipeline = write_pipeline(dir, &format!("{name}.yaml"), yaml);
    let output = dir.join(format!("{name}.arrow"));
    let outcome = stochflow(&["run", pipeline.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    (outcome, output)
}

/// Runs a pipeline that must succeed with exit code 0.
pub fn run_ok(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let (outcome, output) = run_yaml(dir, name, yaml);
    assert_eq!(outcome.code, 0, "pipeline {name} failed:\n{}\n{}", outcome.stdout, outcome.stderr);
    output
}

/// Reads every batch of an Arrow IPC file.
pub fn read_arrow(path: &Path) -> (SchemaRef, Vec<RecordBatch>) {
    let reader = FileReader::try_new(File::open(path).expect("the output exists"), None)
        .expect("the output is an Arrow IPC file");
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>().expect("every batch reads");
    (schema, batches)
}

pub fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// Flat float32 values of a tensor column over all batches.
pub fn tensor_f32(batches: &[RecordBatch], column: &str) -> Vec<f32> {
    let mut values = Vec::new();
    for batch in batches {
        let list =
            batch.column_by_name(column).unwrap_or_else(|| panic!("column {column} exists")).as_fixed_size_list();
        values.extend_from_slice(list.values().as_primitive::<Float32Type>().values());
    }
    values
}

/// Flat uint8 values of a tensor column over all batches.
pub fn tensor_u8(batches: &[RecordBatch], column: &str) -> Vec<u8> {
    let mut values = Vec::new();
    for batch in batches {
        let list =
            batch.column_by_name(column).unwrap_or_else(|| panic!("column {column} exists")).as_fixed_size_list();
        values.extend_from_slice(list.values().as_primitive::<UInt8Type>().values());
    }
    values
}

pub fn int32(batches: &[RecordBatch], column: &str) -> Vec<i32> {
    batches
        .iter()
        .flat_map(|b| {
            b.column_by_name(column)
                .unwrap_or_else(|| panic!("column {column} exists"))
                .as_primitive::<Int32Type>()
                .values()
                .to_vec()
        })
        .collect()
}

pub fn int64(batches: &[RecordBatch], column: &str) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            b.column_by_name(column)
                .unwrap_or_else(|| panic!("column {column} exists"))
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        })
        .collect()
}

pub fn strings(batches: &[RecordBatch], column: &str) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let array =
                b.column_by_name(column).unwrap_or_else(|| panic!("column {column} exists")).as_string::<i32>().clone();
            (0..array.len()).map(move |i| array.value(i).to_string()).collect::<Vec<_>>()
        })
        .collect()
}

pub fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("the file exists");
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a C-ordered `.npy` file (format version 1).
pub fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let shape_text = match shape {
        [single] => format!("({single},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // numpy pads the header with spaces so the data starts on a 64-byte boundary.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).expect("the .npy file is written");
}

pub fn write_npy_f32(path: &Path, shape: &[usize], values: &[f32]) {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(path, "<f4", shape, &data);
}

/// Path text for YAML, quoted.
pub fn yaml_path(path: &Path) -> String {
    format!("{:?}", path.to_str().expect("test paths are UTF-8"))
}

/// Computes the standard normal CDF by the Abramowitz-Stegun 7.1.26 erf
/// approximation (absolute error below 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    let erf = if z >= 0.0 { erf } else { -erf };
    0.5 * (1.0 + erf)
}

/// Kolmogorov-Smirnov statistic of `samples` against the normal
/// distribution with `mean` and `std`.
pub fn ks_normal(samples: &[f64], mean: f64, std: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mut statistic: f64 = 0.0;
    for (i, &x) in sorted.iter().enumerate() {
        let cdf = normal_cdf((x - mean) / std);
        statistic = statistic.max((cdf - i as f64 / n).abs()).max(((i + 1) as f64 / n - cdf).abs());
    }
    statistic
}

pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, variance.sqrt())
}

/// Runs a shipped pipeline that classifies each of the 450 held-out digits
/// several times and summarizes the copies in one row. Checks no warnings,
/// one row per digit, a vote accuracy above 0.95, a spread of the logits for
/// every digit, and more mutual information on wrongly voted digits.
/// Returns the schema.
pub fn check_digit_uncertainty(dir: &Path, pipeline: &str) -> SchemaRef {
    let output = dir.join("summary.arrow");
    let outcome = stochflow(&["run", repo(pipeline).to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(!outcome.stderr.contains("WARN"), "the run logged warnings:\n{}", outcome.stderr);

    let (schema, batches) = read_arrow(&output);
    assert_eq!(rows(&batches), 450);
    let labels = int64(&batches, "label");
    let votes = int32(&batches, "class_vote");
    let correct: Vec<bool> = labels.iter().zip(&votes).map(|(&l, &v)| l == i64::from(v)).collect();
    let accuracy = correct.iter().filter(|&&c| c).count() as f64 / 450.0;
    assert!(accuracy > 0.95, "accuracy of the vote {accuracy}");

    let information: Vec<f32> = batches
        .iter()
        .flat_map(|batch| {
            let column = batch.column_by_name("mutual_information").unwrap();
            column.as_primitive::<arrow::datatypes::Float32Type>().values().to_vec()
        })
        .collect();
    let mean_of = |wanted: bool| {
        let values: Vec<f64> =
            information.iter().zip(&correct).filter(|(_, c)| **c == wanted).map(|(&v, _)| f64::from(v)).collect();
        values.iter().sum::<f64>() / values.len() as f64
    };
    // The copies disagree more on the digits the vote gets wrong.
    assert!(
        mean_of(false) > 3.0 * mean_of(true),
        "mutual information: wrong {}, right {}",
        mean_of(false),
        mean_of(true)
    );
    let spread = tensor_f32(&batches, "logits_std");
    assert!(spread.iter().all(|&s| s > 0.0), "a digit's copies gave equal logits");
    schema
}
