//! The `augment` stage section: random image augmentation, one operation
//! after another, in the manner of stacked Keras preprocessing layers.
//! docs/augment.md documents every key and its exact semantics.

use serde::{Deserialize, Serialize};

use super::Layout;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// Image tensor column to augment.
    pub column: String,
    /// Column the augmented image goes to, `column` when absent.
    #[serde(default)]
    pub output: Option<String>,
    /// Axis order of `column`'s per-row shape.
    #[serde(default)]
    pub layout: Layout,
    /// Operations, applied in list order.
    pub ops: Vec<AugmentOp>,
    /// Columns that receive the same geometric draws as `column`.
    #[serde(default)]
    pub paired: Vec<PairedConfig>,
}

/// One augmentation operation, written in YAML as a single-key mapping such
/// as `- flip: horizontal`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AugmentOp {
    Flip(FlipMode),
    Rotation(RotationConfig),
    Zoom(ZoomConfig),
    Translation(TranslationConfig),
    Crop(RandomCropConfig),
    Contrast(ContrastConfig),
    Brightness(BrightnessConfig),
}

impl AugmentOp {
    /// Returns the operation's key in the pipeline file.
    pub fn key(&self) -> &'static str {
        match self {
            AugmentOp::Flip(_) => "flip",
            AugmentOp::Rotation(_) => "rotation",
            AugmentOp::Zoom(_) => "zoom",
            AugmentOp::Translation(_) => "translation",
            AugmentOp::Crop(_) => "crop",
            AugmentOp::Contrast(_) => "contrast",
            AugmentOp::Brightness(_) => "brightness",
        }
    }
}

/// Axes a flip may reverse, each with probability 0.5.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FlipMode {
    Horizontal,
    Vertical,
    Both,
}

/// A range to draw from: `[low, high]`, or one number `v` whose meaning
/// each operation defines (Keras's single-factor form).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum RangeConfig {
    Single(f64),
    Bounds([f64; 2]),
}

impl RangeConfig {
    /// Returns `[low, high]`, reading a single number `v` as `[center - v, center + v]`.
    pub fn bounds_around(self, center: f64) -> [f64; 2] {
        match self {
            RangeConfig::Single(v) => [center - v, center + v],
            RangeConfig::Bounds(bounds) => bounds,
        }
    }
}

/// Rule for reading pixels that fall outside the image in a geometric operation.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FillMode {
    Constant,
    #[default]
    Reflect,
    Nearest,
    Wrap,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Nearest,
    #[default]
    Bilinear,
}

/// Resampling settings shared by rotation, zoom and translation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resample {
    pub fill: FillMode,
    /// Value of pixels outside the image with `fill: constant`, on the
    /// [0, 1] scale for integer data.
    pub fill_value: f64,
    pub interpolation: Interpolation,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// Angle range in degrees, counter-clockwise positive. One number `d` means `[-d, d]`.
    pub degrees: RangeConfig,
    #[serde(default)]
    pub fill: FillMode,
    #[serde(default)]
    pub fill_value: f64,
    #[serde(default)]
    pub interpolation: Interpolation,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZoomConfig {
    /// Vertical zoom as a fraction of the height, positive zooms out. One number `h` means `[-h, h]`.
    pub height: RangeConfig,
    /// Horizontal zoom. When absent, the vertical draw is reused, which keeps the aspect ratio.
    #[serde(default)]
    pub width: Option<RangeConfig>,
    #[serde(default)]
    pub fill: FillMode,
    #[serde(default)]
    pub fill_value: f64,
    #[serde(default)]
    pub interpolation: Interpolation,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TranslationConfig {
    /// Vertical shift as a fraction of the height, positive moves the content down.
    #[serde(default = "no_shift")]
    pub height: RangeConfig,
    /// Horizontal shift as a fraction of the width, positive moves the content right.
    #[serde(default = "no_shift")]
    pub width: RangeConfig,
    #[serde(default)]
    pub fill: FillMode,
    #[serde(default)]
    pub fill_value: f64,
    #[serde(default)]
    pub interpolation: Interpolation,
}

fn no_shift() -> RangeConfig {
    RangeConfig::Bounds([0.0, 0.0])
}

/// Size in pixels of a random crop.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RandomCropConfig {
    #[serde(deserialize_with = "super::count::count")]
    pub height: usize,
    #[serde(deserialize_with = "super::count::count")]
    pub width: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContrastConfig {
    /// Range of the contrast multiplier. One number `f` means `[1 - f, 1 + f]`.
    pub factor: RangeConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrightnessConfig {
    /// Range of the added offset, on the [0, 1] scale for integer data. One number `d` means `[-d, d]`.
    pub delta: RangeConfig,
}

/// A column that follows the main column's geometric draws.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PairedConfig {
    pub column: String,
    /// Column the result goes to, `column` when absent.
    #[serde(default)]
    pub output: Option<String>,
    /// Axis order of this column, the main column's layout when absent.
    #[serde(default)]
    pub layout: Option<Layout>,
    /// Interpolation for every geometric operation on this column.
    #[serde(default = "paired_interpolation")]
    pub interpolation: Interpolation,
    /// Replaces every operation's `fill_value` for this column.
    #[serde(default)]
    pub fill_value: Option<f64>,
    /// Whether contrast and brightness also apply to this column.
    #[serde(default)]
    pub color: bool,
}

/// Paired columns are most often label masks, whose values must not be blended.
fn paired_interpolation() -> Interpolation {
    Interpolation::Nearest
}

impl RotationConfig {
    pub fn resample(&self) -> Resample {
        Resample { fill: self.fill, fill_value: self.fill_value, interpolation: self.interpolation }
    }
}

impl ZoomConfig {
    pub fn resample(&self) -> Resample {
        Resample { fill: self.fill, fill_value: self.fill_value, interpolation: self.interpolation }
    }
}

impl TranslationConfig {
    pub fn resample(&self) -> Resample {
        Resample { fill: self.fill, fill_value: self.fill_value, interpolation: self.interpolation }
    }
}

impl AugmentConfig {
    /// Checks that need neither the data nor the image size. Returns each
    /// problem as (key under the stage, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.ops.is_empty() {
            problems
                .push((String::from("ops"), String::from("list at least one operation, such as `- flip: horizontal`")));
        }
        for (index, op) in self.ops.iter().enumerate() {
            let key = |field: &str| format!("ops[{index}].{}.{field}", op.key());
            let range = |field: &str, value: RangeConfig, center: f64| {
                check_range(value, center).err().map(|message| (key(field), message))
            };
            let mut fill_value = None;
            match op {
                AugmentOp::Flip(_) => {}
                AugmentOp::Rotation(c) => {
                    problems.extend(range("degrees", c.degrees, 0.0));
                    fill_value = Some(c.fill_value);
                }
                AugmentOp::Zoom(c) => {
                    problems.extend(range("height", c.height, 0.0));
                    if let Some(width) = c.width {
                        problems.extend(range("width", width, 0.0));
                    }
                    for (field, value) in [("height", Some(c.height)), ("width", c.width)] {
                        if let Some(value) = value
                            && value.bounds_around(0.0)[0] <= -1.0
                        {
                            problems.push((
                                key(field),
                                format!(
                                    "fractions must be above -1 so that the zoom factor 1 + fraction stays positive, found {:?}",
                                    value.bounds_around(0.0)
                                ),
                            ));
                        }
                    }
                    fill_value = Some(c.fill_value);
                }
                AugmentOp::Translation(c) => {
                    problems.extend(range("height", c.height, 0.0));
                    problems.extend(range("width", c.width, 0.0));
                    fill_value = Some(c.fill_value);
                }
                AugmentOp::Crop(c) => {
                    if c.height == 0 || c.width == 0 {
                        problems.push((
                            format!("ops[{index}].crop"),
                            format!("height and width must be positive, found {}x{}", c.height, c.width),
                        ));
                    }
                }
                AugmentOp::Contrast(c) => {
                    problems.extend(range("factor", c.factor, 1.0));
                    let [low, _] = c.factor.bounds_around(1.0);
                    if low < 0.0 {
                        problems.push((
                            key("factor"),
                            format!("the contrast factor must not go below 0 (which would invert the image), found low end {low}"),
                        ));
                    }
                }
                AugmentOp::Brightness(c) => problems.extend(range("delta", c.delta, 0.0)),
            }
            if let Some(value) = fill_value
                && !value.is_finite()
            {
                problems.push((key("fill_value"), format!("must be a finite number, found {value}")));
            }
        }
        for (index, paired) in self.paired.iter().enumerate() {
            if let Some(value) = paired.fill_value
                && !value.is_finite()
            {
                problems
                    .push((format!("paired[{index}].fill_value"), format!("must be a finite number, found {value}")));
            }
        }
        problems
    }
}

/// Checks a range whose single-number form means `[center - v, center + v]`.
fn check_range(range: RangeConfig, center: f64) -> Result<(), String> {
    match range {
        RangeConfig::Single(v) if !v.is_finite() || v < 0.0 => Err(format!(
            "a single number v means [{center} - v, {center} + v] and must be zero or positive and finite, found {v}"
        )),
        RangeConfig::Bounds([low, high]) if !low.is_finite() || !high.is_finite() => {
            Err(format!("bounds must be finite numbers, found [{low}, {high}]"))
        }
        RangeConfig::Bounds([low, high]) if low > high => {
            Err(format!("lower bound {low} is above upper bound {high}; write [low, high]"))
        }
        _ => Ok(()),
    }
}
