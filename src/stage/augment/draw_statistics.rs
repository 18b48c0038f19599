//! Statistical tests of the parameter draws, on the drawing function itself,
//! with fixed seeds: 4000 records each, one stream per record as the stage
//! uses them. Each test states its tolerance.

use super::ops::{Draw, Op};
use crate::config::{FillMode, FlipMode, Interpolation, Resample};
use crate::rng::StageRng;

const RECORDS: u32 = 4000;

const RESAMPLE: Resample =
    Resample { fill: FillMode::Reflect, fill_value: 0.0, interpolation: Interpolation::Bilinear };

/// Draws `op` once for each of `RECORDS` records of a 16x16 image.
fn draws(op: &Op, stage: &str) -> Vec<Draw> {
    let rng = StageRng::new(2024, stage);
    (0..RECORDS).map(|record| op.draw(&mut rng.stream(record.to_string().as_bytes(), 0), 16, 16)).collect()
}

/// Kolmogorov-Smirnov statistic of `values` against the uniform
/// distribution on [low, high].
fn ks_uniform(values: &[f64], low: f64, high: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mut statistic: f64 = 0.0;
    for (i, &x) in sorted.iter().enumerate() {
        let cdf = ((x - low) / (high - low)).clamp(0.0, 1.0);
        statistic = statistic.max((cdf - i as f64 / n).abs()).max(((i + 1) as f64 / n - cdf).abs());
    }
    statistic
}

/// 1.95 / sqrt(n): the KS critical value at significance 0.001.
fn ks_limit(n: usize) -> f64 {
    1.95 / (n as f64).sqrt()
}

/// Checks that `values` look uniform on [low, high]: the KS statistic below
/// its 0.001 critical value, the mean within 4 standard errors of the
/// midpoint, and every value inside the range.
fn assert_uniform(values: &[f64], low: f64, high: f64, what: &str) {
    assert!(values.iter().all(|v| (low..high).contains(v)), "{what}: a value is outside [{low}, {high})");
    let statistic = ks_uniform(values, low, high);
    assert!(statistic < ks_limit(values.len()), "{what}: KS statistic {statistic}");
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let standard_error = (high - low) / 12f64.sqrt() / n.sqrt();
    assert!((mean - (low + high) / 2.0).abs() < 4.0 * standard_error, "{what}: mean {mean}");
}

#[test]
fn flip_axes_pass_chi_square() {
    // Mode `both`: the four outcomes are equally likely, and independent axes.
    let mut counts = [0f64; 4];
    for draw in draws(&Op::Flip(FlipMode::Both), "flip") {
        let Draw::Flip { horizontal, vertical } = draw else { panic!("a flip draws a flip") };
        counts[usize::from(horizontal) * 2 + usize::from(vertical)] += 1.0;
    }
    let expected = f64::from(RECORDS) / 4.0;
    let chi_square: f64 = counts.iter().map(|c| (c - expected).powi(2) / expected).sum();
    // 16.27 is the 0.999 quantile of chi-square with 3 degrees of freedom.
    assert!(chi_square < 16.27, "counts {counts:?}, chi-square {chi_square}");
}

#[test]
fn single_axis_flip_never_flips_other() {
    for draw in draws(&Op::Flip(FlipMode::Vertical), "flip") {
        assert!(matches!(draw, Draw::Flip { horizontal: false, .. }));
    }
}

#[test]
fn rotation_angle_is_uniform() {
    let op = Op::Rotation { degrees: [-15.0, 25.0], resample: RESAMPLE };
    let angles: Vec<f64> = draws(&op, "rotation")
        .into_iter()
        .map(|draw| match draw {
            Draw::Rotation { degrees } => degrees,
            other => panic!("a rotation drew {other:?}"),
        })
        .collect();
    assert_uniform(&angles, -15.0, 25.0, "rotation angle");
}

#[test]
fn contrast_and_brightness_are_uniform() {
    let factors: Vec<f64> = draws(&Op::Contrast { factor: [0.8, 1.2] }, "contrast")
        .into_iter()
        .map(|draw| match draw {
            Draw::Contrast { factor } => factor,
            other => panic!("a contrast drew {other:?}"),
        })
        .collect();
    assert_uniform(&factors, 0.8, 1.2, "contrast factor");
    let deltas: Vec<f64> = draws(&Op::Brightness { delta: [-0.1, 0.3] }, "brightness")
        .into_iter()
        .map(|draw| match draw {
            Draw::Brightness { delta } => delta,
            other => panic!("a brightness drew {other:?}"),
        })
        .collect();
    assert_uniform(&deltas, -0.1, 0.3, "brightness delta");
}

#[test]
fn zoom_and_shift_are_uniform() {
    let op = Op::Zoom { height: [-0.2, 0.4], width: Some([0.0, 0.1]), resample: RESAMPLE };
    let (factors_y, factors_x): (Vec<f64>, Vec<f64>) = draws(&op, "zoom")
        .into_iter()
        .map(|draw| match draw {
            Draw::Zoom { factor_y, factor_x } => (factor_y, factor_x),
            other => panic!("a zoom drew {other:?}"),
        })
        .unzip();
    assert_uniform(&factors_y, 0.8, 1.4, "vertical zoom factor");
    assert_uniform(&factors_x, 1.0, 1.1, "horizontal zoom factor");
    // Fractions of the 16-pixel size, so shifts are in pixels.
    let op = Op::Translation { height: [-0.25, 0.25], width: [0.0, 0.5], resample: RESAMPLE };
    let (dy, dx): (Vec<f64>, Vec<f64>) = draws(&op, "shift")
        .into_iter()
        .map(|draw| match draw {
            Draw::Translation { dy, dx } => (dy, dx),
            other => panic!("a translation drew {other:?}"),
        })
        .unzip();
    assert_uniform(&dy, -4.0, 4.0, "vertical shift");
    assert_uniform(&dx, 0.0, 8.0, "horizontal shift");
}

#[test]
fn crop_positions_pass_chi_square() {
    // A 12x15 crop of 16x16: 5 top rows and 2 left columns, 10 positions.
    let mut counts = [0f64; 10];
    for draw in draws(&Op::Crop { height: 12, width: 15 }, "crop") {
        let Draw::Crop { top, left } = draw else { panic!("a crop draws a crop") };
        counts[top * 2 + left] += 1.0;
    }
    let expected = f64::from(RECORDS) / 10.0;
    let chi_square: f64 = counts.iter().map(|c| (c - expected).powi(2) / expected).sum();
    // 27.88 is the 0.999 quantile of chi-square with 9 degrees of freedom.
    assert!(chi_square < 27.88, "counts {counts:?}, chi-square {chi_square}");
}
