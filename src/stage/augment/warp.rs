//! Resampling through an affine map: rotation, zoom and translation.
//!
//! As in Keras (`keras.ops.image.affine_transform`), each transform maps an
//! output pixel's coordinates to the input coordinates it reads, with pixel
//! centers at integer coordinates, `x` to the right and `y` down. Pixel
//! values are then interpolated from the input's integer grid, and each grid
//! index outside the image is mapped back in, or replaced by the fill value,
//! according to the fill mode.

use super::planes::Planes;
use crate::config::{FillMode, Interpolation};

/// Output-to-input coordinate map: `x_in = xx * x + xy * y + x0`, and
/// `y_in = yx * x + yy * y + y0`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine {
    pub xx: f64,
    pub xy: f64,
    pub x0: f64,
    pub yx: f64,
    pub yy: f64,
    pub y0: f64,
}

impl Affine {
    /// Rotates the content counter-clockwise, as displayed with row 0 on
    /// top, by `degrees` about the image center. The center of the output
    /// canvas reads the center of the input, so the canvas may differ in size.
    pub fn rotation(degrees: f64, input: (usize, usize), output: (usize, usize)) -> Self {
        let (sin, cos) = sin_cos_degrees(degrees);
        let (in_cy, in_cx) = center(input);
        let (out_cy, out_cx) = center(output);
        // x_in = cos (x - cx) - sin (y - cy) + cx_in, y_in = sin (x - cx) + cos (y - cy) + cy_in.
        Self {
            xx: cos,
            xy: -sin,
            x0: in_cx - cos * out_cx + sin * out_cy,
            yx: sin,
            yy: cos,
            y0: in_cy - sin * out_cx - cos * out_cy,
        }
    }

    /// Scales about the image center: a factor above 1 reads a larger area
    /// of the input, so the content shrinks (zooms out).
    pub fn zoom(factor_y: f64, factor_x: f64, size: (usize, usize)) -> Self {
        let (cy, cx) = center(size);
        Self { xx: factor_x, xy: 0.0, x0: cx * (1.0 - factor_x), yx: 0.0, yy: factor_y, y0: cy * (1.0 - factor_y) }
    }

    /// Moves the content by `dy` pixels down and `dx` pixels right.
    pub fn translation(dy: f64, dx: f64) -> Self {
        Self { xx: 1.0, xy: 0.0, x0: -dx, yx: 0.0, yy: 1.0, y0: -dy }
    }

    fn apply(&self, x: f64, y: f64) -> (f64, f64) {
        (self.xx * x + self.xy * y + self.x0, self.yx * x + self.yy * y + self.y0)
    }
}

/// Center of a (height, width) canvas in pixel coordinates: (y, x).
fn center((height, width): (usize, usize)) -> (f64, f64) {
    ((height as f64 - 1.0) / 2.0, (width as f64 - 1.0) / 2.0)
}

/// Sine and cosine of an angle in degrees, exact at multiples of 90 so that
/// quarter turns move pixels without blending them.
// NOTE: other angles use the platform's libm, so a rotated value may differ
// in its last bits between platforms. One build on one machine always agrees.
fn sin_cos_degrees(degrees: f64) -> (f64, f64) {
    let quarter_turns = degrees / 90.0;
    if quarter_turns == quarter_turns.round() {
        match (quarter_turns as i64).rem_euclid(4) {
            0 => (0.0, 1.0),
            1 => (1.0, 0.0),
            2 => (0.0, -1.0),
            _ => (-1.0, 0.0),
        }
    } else {
        degrees.to_radians().sin_cos()
    }
}

/// Maps grid index `i` of an axis of length `n` into the image, or returns
/// `None` for the fill value. With `a b c d` the axis:
/// `constant` gives `k k | a b c d | k k`, `reflect` gives `b a | a b c d | d c`
/// (mirrored about the outer pixel edge), `nearest` gives `a a | a b c d | d d`
/// and `wrap` gives `c d | a b c d | a b`.
pub fn source_index(i: i64, n: usize, fill: FillMode) -> Option<usize> {
    let n_signed = n as i64;
    if (0..n_signed).contains(&i) {
        return Some(i as usize);
    }
    match fill {
        FillMode::Constant => None,
        FillMode::Nearest => Some(i.clamp(0, n_signed - 1) as usize),
        FillMode::Wrap => Some(i.rem_euclid(n_signed) as usize),
        FillMode::Reflect => {
            let folded = i.rem_euclid(2 * n_signed);
            Some(if folded < n_signed { folded } else { 2 * n_signed - 1 - folded } as usize)
        }
    }
}

/// Resamples `image` onto a `size` = (height, width) canvas: output pixel
/// (x, y) takes the input's value at `map(x, y)`. `nearest` reads the grid
/// point at `floor(coordinate + 0.5)`. `bilinear` weights the four
/// surrounding grid points, each one mapped by the fill mode, so a `constant`
/// border blends into the fill value over one pixel.
pub fn warp(
    image: &Planes,
    size: (usize, usize),
    map: Affine,
    fill: FillMode,
    fill_value: f32,
    interpolation: Interpolation,
) -> Planes {
    let (height, width) = size;
    let mut data = Vec::with_capacity(image.channels * height * width);
    let read = |plane: &[f32], y: i64, x: i64| -> f32 {
        match (source_index(y, image.height, fill), source_index(x, image.width, fill)) {
            (Some(y), Some(x)) => plane[y * image.width + x],
            _ => fill_value,
        }
    };
    for channel in 0..image.channels {
        let plane = image.plane(channel);
        for y in 0..height {
            for x in 0..width {
                let (x_in, y_in) = map.apply(x as f64, y as f64);
                let value = match interpolation {
                    Interpolation::Nearest => read(plane, (y_in + 0.5).floor() as i64, (x_in + 0.5).floor() as i64),
                    Interpolation::Bilinear => {
                        let (y_low, x_low) = (y_in.floor(), x_in.floor());
                        let (fy, fx) = ((y_in - y_low) as f32, (x_in - x_low) as f32);
                        let (y_low, x_low) = (y_low as i64, x_low as i64);
                        let mut value = 0.0;
                        for (dy, wy) in [(0, 1.0 - fy), (1, fy)] {
                            for (dx, wx) in [(0, 1.0 - fx), (1, fx)] {
                                let weight = wy * wx;
                                // Skipping zero weights keeps grid-aligned reads exact, even
                                // next to a NaN or a fill value.
                                if weight != 0.0 {
                                    value += weight * read(plane, y_low + dy, x_low + dx);
                                }
                            }
                        }
                        value
                    }
                };
                data.push(value);
            }
        }
    }
    Planes { channels: image.channels, height, width, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(height: usize, width: usize, data: &[f32]) -> Planes {
        Planes { channels: 1, height, width, data: data.to_vec() }
    }

    #[test]
    fn quarter_turn_into_transposed_canvas() {
        // a b c      c f
        // d e f  ->  b e
        //            a d
        let image = gray(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let map = Affine::rotation(90.0, (2, 3), (3, 2));
        for interpolation in [Interpolation::Nearest, Interpolation::Bilinear] {
            let rotated = warp(&image, (3, 2), map, FillMode::Constant, -1.0, interpolation);
            assert_eq!(rotated.data, [3.0, 6.0, 2.0, 5.0, 1.0, 4.0], "{interpolation:?}");
        }
    }

    #[test]
    fn positive_angle_turns_counter_clockwise() {
        // The pixel right of center moves to above center.
        let mut data = vec![0.0; 9];
        data[5] = 1.0;
        let image = gray(3, 3, &data);
        let rotated = warp(
            &image,
            (3, 3),
            Affine::rotation(90.0, (3, 3), (3, 3)),
            FillMode::Constant,
            0.0,
            Interpolation::Bilinear,
        );
        let mut expected = vec![0.0; 9];
        expected[1] = 1.0;
        assert_eq!(rotated.data, expected);
    }

    #[test]
    fn half_turn_keeps_the_canvas() {
        let image = gray(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let rotated = warp(
            &image,
            (2, 3),
            Affine::rotation(180.0, (2, 3), (2, 3)),
            FillMode::Constant,
            -1.0,
            Interpolation::Nearest,
        );
        assert_eq!(rotated.data, [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]);
    }

    #[test]
    fn fill_modes_on_a_translated_row() {
        // One row `1 2 3 4` moved right by 2 pixels: output x reads input x - 2.
        let image = gray(1, 4, &[1.0, 2.0, 3.0, 4.0]);
        let map = Affine::translation(0.0, 2.0);
        let shifted = |fill| warp(&image, (1, 4), map, fill, 9.0, Interpolation::Nearest).data;
        assert_eq!(shifted(FillMode::Constant), [9.0, 9.0, 1.0, 2.0]);
        assert_eq!(shifted(FillMode::Reflect), [2.0, 1.0, 1.0, 2.0]);
        assert_eq!(shifted(FillMode::Nearest), [1.0, 1.0, 1.0, 2.0]);
        assert_eq!(shifted(FillMode::Wrap), [3.0, 4.0, 1.0, 2.0]);
    }

    #[test]
    fn fill_modes_on_a_translated_column() {
        // One column `1 2 3` moved up by 2 pixels: output y reads input y + 2.
        let image = gray(3, 1, &[1.0, 2.0, 3.0]);
        let map = Affine::translation(-2.0, 0.0);
        let shifted = |fill| warp(&image, (3, 1), map, fill, 0.0, Interpolation::Nearest).data;
        assert_eq!(shifted(FillMode::Constant), [3.0, 0.0, 0.0]);
        assert_eq!(shifted(FillMode::Reflect), [3.0, 3.0, 2.0]);
        assert_eq!(shifted(FillMode::Nearest), [3.0, 3.0, 3.0]);
        assert_eq!(shifted(FillMode::Wrap), [3.0, 1.0, 2.0]);
    }

    #[test]
    fn reflect_index_repeats_with_period_two_n() {
        let indices: Vec<usize> = (-5..8).map(|i| source_index(i, 3, FillMode::Reflect).unwrap()).collect();
        assert_eq!(indices, [1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0, 0, 1]);
    }

    #[test]
    fn bilinear_blends_and_nearest_picks() {
        // Half a pixel right: output x reads input x - 0.5.
        let image = gray(1, 3, &[0.0, 10.0, 30.0]);
        let map = Affine::translation(0.0, 0.5);
        let bilinear = warp(&image, (1, 3), map, FillMode::Nearest, 0.0, Interpolation::Bilinear);
        assert_eq!(bilinear.data, [0.0, 5.0, 20.0]);
        // floor(x - 0.5 + 0.5) = x: rounding half up keeps each pixel in place.
        let nearest = warp(&image, (1, 3), map, FillMode::Nearest, 0.0, Interpolation::Nearest);
        assert_eq!(nearest.data, [0.0, 10.0, 30.0]);
        // A quarter pixel left: x reads x + 0.25.
        let map = Affine::translation(0.0, -0.25);
        let bilinear = warp(&image, (1, 3), map, FillMode::Constant, 100.0, Interpolation::Bilinear);
        assert_eq!(bilinear.data, [2.5, 15.0, 47.5]);
        let nearest = warp(&image, (1, 3), map, FillMode::Constant, 100.0, Interpolation::Nearest);
        assert_eq!(nearest.data, [0.0, 10.0, 30.0]);
    }

    #[test]
    fn zoom_out_reads_a_wider_area() {
        // Factor 2 about center x = 1: output x reads input 2x - 1.
        let image = gray(1, 3, &[1.0, 2.0, 3.0]);
        let zoomed =
            warp(&image, (1, 3), Affine::zoom(1.0, 2.0, (1, 3)), FillMode::Constant, 0.0, Interpolation::Nearest);
        assert_eq!(zoomed.data, [0.0, 2.0, 0.0]);
        let zoomed_in =
            warp(&image, (1, 3), Affine::zoom(1.0, 0.5, (1, 3)), FillMode::Constant, 0.0, Interpolation::Bilinear);
        assert_eq!(zoomed_in.data, [1.5, 2.0, 2.5]);
    }
}
