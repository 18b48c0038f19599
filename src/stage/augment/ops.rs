//! Planned augmentation operations, the random parameters each one draws,
//! and how a drawn operation changes an image.
//!
//! Each operation draws its parameters from the record's stream, in list
//! order, before any pixel is touched, so the draws depend only on the
//! stream and on the image size (which only a crop changes). Every number in
//! a range is drawn as `low + (high - low) * u`, with `u` uniform in [0, 1).

use rand::{Rng, RngExt};

use super::planes::{self, Planes};
use super::warp::{self, Affine};
use crate::config::{FlipMode, Interpolation, Resample};

/// An operation with its ranges resolved to `[low, high]` and its
/// resampling settings fixed.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Flip(FlipMode),
    /// Angle range in degrees.
    Rotation {
        degrees: [f64; 2],
        resample: Resample,
    },
    /// Ranges of the zoom fractions; `width: None` reuses the height draw.
    Zoom {
        height: [f64; 2],
        width: Option<[f64; 2]>,
        resample: Resample,
    },
    /// Ranges of the shifts, as fractions of the height and width.
    Translation {
        height: [f64; 2],
        width: [f64; 2],
        resample: Resample,
    },
    Crop {
        height: usize,
        width: usize,
    },
    Contrast {
        factor: [f64; 2],
    },
    /// Offset range in the data's units.
    Brightness {
        delta: [f64; 2],
    },
}

/// The parameters one operation drew for one record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Draw {
    Flip {
        horizontal: bool,
        vertical: bool,
    },
    Rotation {
        degrees: f64,
    },
    /// Zoom factors: 1 + the drawn fractions.
    Zoom {
        factor_y: f64,
        factor_x: f64,
    },
    /// Shifts in pixels.
    Translation {
        dy: f64,
        dx: f64,
    },
    Crop {
        top: usize,
        left: usize,
    },
    Contrast {
        factor: f64,
    },
    Brightness {
        delta: f64,
    },
}

fn uniform<R: Rng + ?Sized>(rng: &mut R, [low, high]: [f64; 2]) -> f64 {
    let u: f64 = rng.random();
    low + (high - low) * u
}

impl Op {
    /// Draws this operation's parameters for an image of `height` x `width`
    /// pixels. Flip draws one uniform per axis it may flip (horizontal
    /// first) and flips when it is below 0.5. Zoom and translation draw the
    /// height before the width. Crop draws the top row, then the left column,
    /// each uniform over the positions that keep the window inside the image.
    pub fn draw<R: Rng + ?Sized>(&self, rng: &mut R, height: usize, width: usize) -> Draw {
        match *self {
            Op::Flip(mode) => {
                let mut coin = |axis_flips: bool| axis_flips && rng.random::<f64>() < 0.5;
                let horizontal = coin(matches!(mode, FlipMode::Horizontal | FlipMode::Both));
                let vertical = coin(matches!(mode, FlipMode::Vertical | FlipMode::Both));
                Draw::Flip { horizontal, vertical }
            }
            Op::Rotation { degrees, .. } => Draw::Rotation { degrees: uniform(rng, degrees) },
            Op::Zoom { height: height_range, width: width_range, .. } => {
                let factor_y = 1.0 + uniform(rng, height_range);
                let factor_x = match width_range {
                    Some(range) => 1.0 + uniform(rng, range),
                    None => factor_y,
                };
                Draw::Zoom { factor_y, factor_x }
            }
            Op::Translation { height: height_range, width: width_range, .. } => {
                let dy = uniform(rng, height_range) * height as f64;
                let dx = uniform(rng, width_range) * width as f64;
                Draw::Translation { dy, dx }
            }
            Op::Crop { height: crop_height, width: crop_width } => {
                let top = rng.random_range(0..=height - crop_height);
                let left = rng.random_range(0..=width - crop_width);
                Draw::Crop { top, left }
            }
            Op::Contrast { factor } => Draw::Contrast { factor: uniform(rng, factor) },
            Op::Brightness { delta } => Draw::Brightness { delta: uniform(rng, delta) },
        }
    }

    /// Returns whether the operation changes values rather than positions.
    pub fn is_color(&self) -> bool {
        matches!(self, Op::Contrast { .. } | Op::Brightness { .. })
    }

    fn resample(&self) -> Option<Resample> {
        match self {
            Op::Rotation { resample, .. } | Op::Zoom { resample, .. } | Op::Translation { resample, .. } => {
                Some(*resample)
            }
            _ => None,
        }
    }
}

/// Per-column settings for applying the drawn operations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColumnSettings {
    /// Replaces each operation's interpolation.
    pub interpolation: Option<Interpolation>,
    /// Replaces each operation's fill value, in the data's units.
    pub fill_value: Option<f32>,
    /// Whether contrast and brightness apply.
    pub color: bool,
    /// Data units per unit of the [0, 1] scale: 1 for float32, 255 for
    /// uint8, 65535 for uint16. Brightness deltas and fill values are scaled by it.
    pub unit: f32,
}

/// Applies one drawn operation to an image.
pub fn apply(op: &Op, draw: Draw, image: Planes, settings: &ColumnSettings) -> Planes {
    if op.is_color() && !settings.color {
        return image;
    }
    let size = (image.height, image.width);
    let map = match draw {
        Draw::Flip { horizontal, vertical } => {
            let mut image = image;
            if horizontal {
                planes::flip_horizontal(&mut image);
            }
            if vertical {
                planes::flip_vertical(&mut image);
            }
            return image;
        }
        Draw::Crop { top, left } => {
            let Op::Crop { height, width } = *op else { unreachable!("a crop draw comes from a crop") };
            return planes::crop(&image, top, left, height, width);
        }
        Draw::Contrast { factor } => {
            let mut image = image;
            planes::adjust_contrast(&mut image, factor as f32);
            return image;
        }
        Draw::Brightness { delta } => {
            let mut image = image;
            planes::adjust_brightness(&mut image, delta as f32 * settings.unit);
            return image;
        }
        Draw::Rotation { degrees } => Affine::rotation(degrees, size, size),
        Draw::Zoom { factor_y, factor_x } => Affine::zoom(factor_y, factor_x, size),
        Draw::Translation { dy, dx } => Affine::translation(dy, dx),
    };
    let resample = op.resample().expect("geometric draws come from resampling operations");
    let fill_value = settings.fill_value.unwrap_or(resample.fill_value as f32 * settings.unit);
    let interpolation = settings.interpolation.unwrap_or(resample.interpolation);
    warp::warp(&image, size, map, resample.fill, fill_value, interpolation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FillMode;
    use crate::rng::StageRng;

    const RESAMPLE: Resample =
        Resample { fill: FillMode::Reflect, fill_value: 0.0, interpolation: Interpolation::Bilinear };

    #[test]
    fn draws_depend_only_on_the_stream() {
        let op = Op::Rotation { degrees: [-15.0, 15.0], resample: RESAMPLE };
        let rng = StageRng::new(3, "tta");
        let first = op.draw(&mut rng.stream(b"cat.png", 0), 8, 8);
        assert_eq!(first, op.draw(&mut rng.stream(b"cat.png", 0), 8, 8));
        assert_ne!(first, op.draw(&mut rng.stream(b"cat.png", 1), 8, 8));
    }

    #[test]
    fn zoom_without_width_keeps_aspect() {
        let op = Op::Zoom { height: [-0.2, 0.2], width: None, resample: RESAMPLE };
        let Draw::Zoom { factor_y, factor_x } = op.draw(&mut StageRng::new(1, "z").stream(b"0", 0), 4, 4) else {
            panic!("a zoom draws a zoom");
        };
        assert_eq!(factor_y, factor_x);
        assert!((0.8..1.2).contains(&factor_y), "factor {factor_y}");
    }

    #[test]
    fn crop_offsets_stay_inside() {
        let op = Op::Crop { height: 3, width: 2 };
        let rng = StageRng::new(1, "crop");
        for record in 0..200u32 {
            let Draw::Crop { top, left } = op.draw(&mut rng.stream(&record.to_le_bytes(), 0), 5, 2) else {
                panic!("a crop draws a crop");
            };
            assert!(top <= 2, "top {top}");
            assert_eq!(left, 0);
        }
    }

    #[test]
    fn paired_column_skips_color_unless_asked() {
        let image = Planes { channels: 1, height: 1, width: 2, data: vec![0.0, 1.0] };
        let op = Op::Brightness { delta: [0.5, 0.5] };
        let draw = Draw::Brightness { delta: 0.5 };
        let mask = ColumnSettings { interpolation: None, fill_value: None, color: false, unit: 1.0 };
        assert_eq!(apply(&op, draw, image.clone(), &mask).data, [0.0, 1.0]);
        let uint8 = ColumnSettings { color: true, unit: 255.0, ..mask };
        assert_eq!(apply(&op, draw, image, &uint8).data, [127.5, 128.5]);
    }
}
