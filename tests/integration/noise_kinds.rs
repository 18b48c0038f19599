use crate::common::*;

/// Runs `add_noise` with `settings` over 2,400 records of 50 copies of
/// `value` (120,000 draws) and returns the noisy values.
fn noisy_values(dir: &std::path::Path, name: &str, value: f32, settings: &str) -> Vec<f64> {
    let (records, width) = (2400, 50);
    let input = dir.join(format!("{name}.npy"));
    write_npy_f32(&input, &[records, width], &vec![value; records * width]);
    let yaml = format!(
        "seed: 77\nsource: {{kind: npy, path: {}, column: x}}\nstages:\n  - {{name: noise, kind: add_noise, column: x, output: noisy, {settings}}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let output = run_ok(dir, name, &yaml);
    let (_, batches) = read_arrow(&output);
    let clean = tensor_f32(&batches, "x");
    assert!(clean.iter().all(|v| *v == value), "the clean column must pass through");
    tensor_f32(&batches, "noisy").into_iter().map(f64::from).collect()
}

/// Kolmogorov-Smirnov 1% critical value for `n` draws.
fn ks_critical(n: usize) -> f64 {
    1.628 / (n as f64).sqrt()
}

fn fraction(values: &[f64], predicate: impl Fn(f64) -> bool) -> f64 {
    values.iter().filter(|v| predicate(**v)).count() as f64 / values.len() as f64
}

#[test]
fn uniform_noise_matches_its_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let noisy = noisy_values(dir.path(), "uniform", 0.5, "noise: uniform, low: -0.2, high: 0.6");
    let differences: Vec<f64> = noisy.iter().map(|v| v - 0.5).collect();
    let (mean, std) = mean_std(&differences);
    // U(-0.2, 0.6): mean 0.2, std 0.8 / sqrt(12) = 0.2309.
    assert!((mean - 0.2).abs() < 0.004, "mean {mean}");
    assert!((std - 0.2309).abs() < 0.003, "std {std}");
    assert!(differences.iter().all(|d| (-0.2 - 1e-6..=0.6 + 1e-6).contains(d)), "a draw left [-0.2, 0.6]");

    let mut sorted = differences.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let statistic = sorted
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let cdf = ((x + 0.2) / 0.8).clamp(0.0, 1.0);
            (cdf - i as f64 / n).abs().max(((i + 1) as f64 / n - cdf).abs())
        })
        .fold(0.0, f64::max);
    assert!(statistic < ks_critical(sorted.len()), "KS statistic {statistic}");
}

#[test]
fn multiplicative_noise_is_gaussian_dropout() {
    let dir = tempfile::tempdir().unwrap();
    let noisy = noisy_values(dir.path(), "multiplicative", 2.0, "noise: multiplicative, rate: 0.2");
    let factors: Vec<f64> = noisy.iter().map(|v| v / 2.0).collect();
    // rate 0.2: factor ~ N(1, 0.2 / 0.8) = N(1, 0.5^2).
    let (mean, std) = mean_std(&factors);
    assert!((mean - 1.0).abs() < 0.008, "mean factor {mean}");
    assert!((std - 0.5).abs() < 0.005, "factor std {std}");
    let statistic = ks_normal(&factors, 1.0, 0.5);
    assert!(statistic < ks_critical(factors.len()), "KS statistic {statistic}");
}

#[test]
fn dropout_zeroes_at_rate_and_rescales() {
    let dir = tempfile::tempdir().unwrap();
    let noisy = noisy_values(dir.path(), "dropout", 1.5, "noise: dropout, rate: 0.3");
    let zeros = fraction(&noisy, |v| v == 0.0);
    // Standard error sqrt(0.3 * 0.7 / 120000) = 0.0013; allow 5 of them.
    assert!((zeros - 0.3).abs() < 0.0066, "zero fraction {zeros}");
    let survivor = f64::from(1.5_f32 * (1.0 / (1.0 - 0.3_f32)));
    assert!(noisy.iter().all(|v| *v == 0.0 || *v == survivor), "survivors must be 1.5 / 0.7");
}

#[test]
fn salt_and_pepper_hits_amount_and_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let noisy = noisy_values(dir.path(), "salt", 0.5, "noise: salt_and_pepper, amount: 0.1, salt_fraction: 0.3");
    let salt = fraction(&noisy, |v| v == 1.0);
    let pepper = fraction(&noisy, |v| v == 0.0);
    let untouched = fraction(&noisy, |v| v == 0.5);
    assert_eq!(salt + pepper + untouched, 1.0, "values other than salt, pepper and the input");
    // Expected 0.03 and 0.07; standard errors 0.0005 and 0.0007.
    assert!((salt - 0.03).abs() < 0.003, "salt fraction {salt}");
    assert!((pepper - 0.07).abs() < 0.004, "pepper fraction {pepper}");
}

#[test]
fn poisson_counts_follow_poisson_pmf() {
    let dir = tempfile::tempdir().unwrap();
    // 2.5 units at 4 counts per unit: counts ~ Poisson(10).
    let noisy = noisy_values(dir.path(), "poisson", 2.5, "noise: poisson, scale: 4.0");
    let counts: Vec<u64> = noisy.iter().map(|v| (v * 4.0).round() as u64).collect();
    assert!(noisy.iter().zip(&counts).all(|(v, c)| (v * 4.0 - *c as f64).abs() < 1e-4), "values are counts / scale");
    let (mean, std) = mean_std(&noisy);
    assert!((mean - 2.5).abs() < 0.01, "mean {mean}");
    assert!((std * std - 0.625).abs() < 0.02, "variance {} is not 10 / 16", std * std);

    // Chi-square over bins [0, 3], 4 ..= 19 and [20, inf): 18 bins, 17 degrees of freedom.
    let lambda: f64 = 10.0;
    let mut pmf = vec![(-lambda).exp()];
    for k in 1..20 {
        pmf.push(pmf[k - 1] * lambda / k as f64);
    }
    let mut expected = vec![pmf[..4].iter().sum::<f64>()];
    expected.extend_from_slice(&pmf[4..20]);
    expected.push(1.0 - pmf.iter().sum::<f64>());
    let mut observed = vec![0usize; expected.len()];
    for &count in &counts {
        let bin = match count {
            0..=3 => 0,
            20.. => expected.len() - 1,
            k => k as usize - 3,
        };
        observed[bin] += 1;
    }
    let n = counts.len() as f64;
    let statistic: f64 = observed.iter().zip(&expected).map(|(&o, &p)| (o as f64 - n * p).powi(2) / (n * p)).sum();
    // Chi-square critical value for 17 degrees of freedom at p = 0.001.
    assert!(statistic < 40.790, "chi-square {statistic}");
}

#[test]
fn speckle_noise_scales_with_value() {
    let dir = tempfile::tempdir().unwrap();
    let noisy = noisy_values(dir.path(), "speckle", 2.0, "noise: speckle, std: 0.3");
    let relative: Vec<f64> = noisy.iter().map(|v| (v - 2.0) / 2.0).collect();
    let statistic = ks_normal(&relative, 0.0, 0.3);
    assert!(statistic < ks_critical(relative.len()), "KS statistic {statistic}");
    let (mean, std) = mean_std(&relative);
    assert!(mean.abs() < 0.005, "mean {mean}");
    assert!((std - 0.3).abs() < 0.003, "std {std}");
}

#[test]
fn uint8_salt_and_pepper_uses_type_range() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bytes.npy");
    write_npy(&input, "|u1", &[200, 50], &[100u8; 200 * 50]);
    let yaml = format!(
        "seed: 5\nsource: {{kind: npy, path: {}, column: x}}\nstages:\n  - {{kind: add_noise, column: x, noise: salt_and_pepper, amount: 0.2}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let output = run_ok(dir.path(), "bytes", &yaml);
    let (_, batches) = read_arrow(&output);
    let values = tensor_u8(&batches, "x");
    assert!(values.iter().all(|v| [0, 100, 255].contains(v)), "only 0, 100 and 255 may appear");
    let replaced = values.iter().filter(|v| **v != 100).count() as f64 / values.len() as f64;
    assert!((replaced - 0.2).abs() < 0.02, "replaced fraction {replaced}");
}

#[test]
fn poisson_on_negative_values_skips_record() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("signed.npy");
    write_npy_f32(&input, &[3, 2], &[1.0, 2.0, -1.0, 2.0, 0.0, 3.0]);
    let yaml = format!(
        "seed: 5\nsource: {{kind: npy, path: {}, column: x}}\nstages:\n  - {{kind: add_noise, column: x, noise: poisson, scale: 10}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
        yaml_path(&input)
    );
    let (outcome, output) = run_yaml(dir.path(), "signed", &yaml);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains(
            "Poisson noise needs finite, non-negative values, found -1 at index [0] of the record's tensor of shape [2]"
        ),
        "{}",
        outcome.stderr
    );
    let (_, batches) = read_arrow(&output);
    assert_eq!(int64(&batches, "ordinal"), [0, 2]);
}

#[test]
fn wrong_noise_settings_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &[1, 2], &[0.0, 0.0]);
    let cases = [
        ("noise: dropout, rate: -0.1", "stages[0].rate: must be in [0, 1), found -0.1"),
        ("noise: dropout, rate: 1.0", "stages[0].rate: must be in [0, 1), found 1"),
        ("noise: gaussian, std: 0.1, rate: 0.2", "`rate` does not apply to gaussian noise, which reads std, mean"),
        ("noise: uniform, low: 1.0", "uniform noise needs `high`"),
        ("noise: speckle, std: -1", "stages[0].std: must be zero or positive, found -1"),
        ("noise: poisson, scale: 0", "stages[0].scale: must be positive, found 0"),
        ("noise: salt_and_pepper, amount: 1.5", "stages[0].amount: must be in [0, 1], found 1.5"),
    ];
    for (i, (settings, expected)) in cases.iter().enumerate() {
        let yaml = format!(
            "seed: 1\nsource: {{kind: npy, path: {}, column: x}}\nstages:\n  - {{kind: add_noise, column: x, {settings}}}\nsink: {{kind: arrow_file, path: unused.arrow}}\n",
            yaml_path(&input)
        );
        let (outcome, _) = run_yaml(dir.path(), &format!("case{i}"), &yaml);
        assert_eq!(outcome.code, 1, "{settings}: {}", outcome.stderr);
        assert!(outcome.stderr.contains(expected), "{settings}: missing {expected:?} in:\n{}", outcome.stderr);
    }
}
