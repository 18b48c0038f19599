use crate::common::*;

/// Runs `add_noise` over constant records from a `.npy` file and returns
/// (noisy - clean) for every element.
fn noise_differences(
    dir: &std::path::Path,
    name: &str,
    value: f32,
    records: usize,
    noise: &str,
) -> (Vec<f64>, Vec<f32>) {
    let width = 50;
    let input = dir.join(format!("{name}.npy"));
    write_npy_f32(&input, &[records, width], &vec![value; records * width]);
    let yaml = format!(
        r#"
seed: 2024
source: {{kind: npy, path: {input}, column: x}}
stages:
  - name: noise
    kind: add_noise
    column: x
    output: noisy
    {noise}
sink: {{kind: arrow_file, path: unused.arrow}}
"#,
        input = yaml_path(&input)
    );
    let output = run_ok(dir, name, &yaml);
    let (_, batches) = read_arrow(&output);
    let clean = tensor_f32(&batches, "x");
    let noisy = tensor_f32(&batches, "noisy");
    assert_eq!(clean.len(), records * width);
    let differences = noisy.iter().zip(&clean).map(|(n, c)| f64::from(*n) - f64::from(*c)).collect();
    (differences, noisy)
}

#[test]
fn gaussian_moments_and_ks_match_configuration() {
    let dir = tempfile::tempdir().unwrap();
    // 2,400 records x 50 values = 120,000 draws.
    let (differences, _) = noise_differences(dir.path(), "gauss", 0.25, 2400, "mean: 0.3\n    std: 0.7");
    let n = differences.len() as f64;
    let (mean, std) = mean_std(&differences);
    // Standard error of the mean is 0.7 / sqrt(120000) = 0.002; allow 5 of them.
    assert!((mean - 0.3).abs() < 0.01, "mean {mean} is not 0.3 within 0.01");
    // Standard error of the std is about 0.7 / sqrt(2n) = 0.0014; allow 1%.
    assert!((std - 0.7).abs() < 0.007, "std {std} is not 0.7 within 0.007");
    // Kolmogorov-Smirnov: the 1% critical value is 1.628 / sqrt(n).
    let statistic = ks_normal(&differences, 0.3, 0.7);
    let critical = 1.628 / n.sqrt();
    assert!(statistic < critical, "KS statistic {statistic} exceeds the 1% critical value {critical}");
}

#[test]
fn zero_std_is_identity_and_mean_shifts() {
    let dir = tempfile::tempdir().unwrap();
    let (differences, _) = noise_differences(dir.path(), "shift", 0.5, 10, "mean: -0.125\n    std: 0.0");
    assert!(differences.iter().all(|d| *d == -0.125), "a zero std must add exactly the mean");
}

#[test]
fn clip_bounds_hold_with_expected_tail_mass() {
    let dir = tempfile::tempdir().unwrap();
    // Clean value 0.5, std 0.5, clip [0, 1]: P(x < 0) = P(x > 1) = Phi(-1) = 0.1587.
    let (_, noisy) = noise_differences(dir.path(), "clip", 0.5, 2000, "std: 0.5\n    clip: [0.0, 1.0]");
    assert!(noisy.iter().all(|v| (0.0..=1.0).contains(v)), "a value escaped the clip range");
    let n = noisy.len() as f64;
    let at_low = noisy.iter().filter(|v| **v == 0.0).count() as f64 / n;
    let at_high = noisy.iter().filter(|v| **v == 1.0).count() as f64 / n;
    let expected = normal_cdf(-1.0);
    // Standard error sqrt(p(1-p)/n) = 0.0012 for n = 100,000; allow 0.006.
    assert!((at_low - expected).abs() < 0.006, "mass at 0 is {at_low}, expected {expected}");
    assert!((at_high - expected).abs() < 0.006, "mass at 1 is {at_high}, expected {expected}");
}

#[test]
fn uint8_noise_saturates_at_type_range() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bytes.npy");
    // Half the records at 0, half at 255, with a large std: results pile up at the bounds.
    let records = 400;
    let width = 25;
    let data: Vec<u8> = (0..records * width).map(|i| if (i / width) % 2 == 0 { 0 } else { 255 }).collect();
    write_npy(&input, "|u1", &[records, width], &data);
    let yaml = format!(
        "seed: 1\nsource: {{kind: npy, path: {}, column: x}}\nstages:\n  - {{kind: add_noise, column: x, output: noisy, std: 20.0}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let output = run_ok(dir.path(), "bytes", &yaml);
    let (_, batches) = read_arrow(&output);
    let clean = tensor_u8(&batches, "x");
    let noisy = tensor_u8(&batches, "noisy");
    assert_eq!(clean, data);
    let low: Vec<u8> = noisy.iter().zip(&clean).filter(|(_, c)| **c == 0).map(|(n, _)| *n).collect();
    let high: Vec<u8> = noisy.iter().zip(&clean).filter(|(_, c)| **c == 255).map(|(n, _)| *n).collect();
    // Half the draws are negative, so about half of the zeros stay at 0.
    let zeros = low.iter().filter(|v| **v == 0).count() as f64 / low.len() as f64;
    let full = high.iter().filter(|v| **v == 255).count() as f64 / high.len() as f64;
    assert!((zeros - 0.5).abs() < 0.05, "fraction saturated at 0 is {zeros}");
    assert!((full - 0.5).abs() < 0.05, "fraction saturated at 255 is {full}");
    assert!(low.iter().any(|v| *v > 20), "positive noise must raise some zeros");
}

#[test]
fn uint16_noise_scales_to_sixteen_bits() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("words.npy");
    let records = 400;
    let width = 50;
    let clean_value: u16 = 30_000;
    let data: Vec<u8> = (0..records * width).flat_map(|_| clean_value.to_le_bytes()).collect();
    write_npy(&input, "<u2", &[records, width], &data);
    // std 2 in 8-bit units is 514 in 16-bit units.
    let yaml = format!(
        "seed: 4\nsource: {{kind: npy, path: {}, column: x}}\nstages:\n  - {{kind: add_noise, column: x, output: noisy, std: 2.0}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let output = run_ok(dir.path(), "words", &yaml);
    let (schema, batches) = read_arrow(&output);
    assert_eq!(schema.field_with_name("noisy").unwrap().data_type().to_string(), "FixedSizeList(50 x non-null UInt16)");
    let noisy: Vec<f64> = batches
        .iter()
        .flat_map(|b| {
            use arrow::array::AsArray;
            let list = b.column_by_name("noisy").unwrap().as_fixed_size_list();
            list.values().as_primitive::<arrow::datatypes::UInt16Type>().values().to_vec()
        })
        .map(|v| f64::from(v) - f64::from(clean_value))
        .collect();
    let (mean, std) = mean_std(&noisy);
    // 20,000 draws: the standard error of the mean is 514 / 141 = 3.6.
    assert!(mean.abs() < 18.0, "mean shift {mean}");
    assert!((std - 514.0).abs() < 10.0, "std {std} is not 514 within 10");
}
