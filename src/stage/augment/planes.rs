//! One row's image as float32 channel planes, and the operations that need
//! no resampling: flips, crops, contrast and brightness.
//!
//! Rows are converted to planes once, every operation works on float32 in
//! the data's own units, and the result is converted back once, so integer
//! images are rounded only at the end.

use crate::config::Layout;

/// A `[channels, height, width]` image, row-major within each channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Planes {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Planes {
    /// Reads one row stored in `layout`.
    pub fn from_row(row: &[f32], layout: Layout, channels: usize, height: usize, width: usize) -> Self {
        let data = match layout {
            Layout::Chw => row.to_vec(),
            Layout::Hwc => {
                let plane = height * width;
                let mut data = vec![0.0; row.len()];
                for (pixel, values) in row.chunks_exact(channels).enumerate() {
                    for (c, &value) in values.iter().enumerate() {
                        data[c * plane + pixel] = value;
                    }
                }
                data
            }
        };
        Self { channels, height, width, data }
    }

    /// Appends the image to `out` in `layout`.
    pub fn write_row(&self, layout: Layout, out: &mut Vec<f32>) {
        match layout {
            Layout::Chw => out.extend_from_slice(&self.data),
            Layout::Hwc => {
                let plane = self.height * self.width;
                for pixel in 0..plane {
                    out.extend((0..self.channels).map(|c| self.data[c * plane + pixel]));
                }
            }
        }
    }

    pub fn plane(&self, channel: usize) -> &[f32] {
        let size = self.height * self.width;
        &self.data[channel * size..(channel + 1) * size]
    }

    fn plane_mut(&mut self, channel: usize) -> &mut [f32] {
        let size = self.height * self.width;
        &mut self.data[channel * size..(channel + 1) * size]
    }

    /// Channels that contrast and brightness change: all but the alpha
    /// channel of a 4-channel (RGBA) image, because opacity is not a color.
    fn color_channels(&self) -> usize {
        if self.channels == 4 { 3 } else { self.channels }
    }
}

/// Mirrors the image left to right: column `x` moves to `width - 1 - x`.
pub fn flip_horizontal(image: &mut Planes) {
    let width = image.width;
    for row in image.data.chunks_exact_mut(width) {
        row.reverse();
    }
}

/// Mirrors the image top to bottom: row `y` moves to `height - 1 - y`.
pub fn flip_vertical(image: &mut Planes) {
    let (height, width) = (image.height, image.width);
    for channel in 0..image.channels {
        let plane = image.plane_mut(channel);
        for y in 0..height / 2 {
            let (top, bottom) = plane.split_at_mut((height - 1 - y) * width);
            top[y * width..(y + 1) * width].swap_with_slice(&mut bottom[..width]);
        }
    }
}

/// Cuts the `height` x `width` window whose top-left pixel is (`top`, `left`).
/// The window must lie inside the image.
pub fn crop(image: &Planes, top: usize, left: usize, height: usize, width: usize) -> Planes {
    assert!(top + height <= image.height, "crop rows {top}..{} exceed the height {}", top + height, image.height);
    assert!(left + width <= image.width, "crop columns {left}..{} exceed the width {}", left + width, image.width);
    let mut data = Vec::with_capacity(image.channels * height * width);
    for channel in 0..image.channels {
        let plane = image.plane(channel);
        for y in top..top + height {
            data.extend_from_slice(&plane[y * image.width + left..y * image.width + left + width]);
        }
    }
    Planes { channels: image.channels, height, width, data }
}

/// Computes `(x - mean) * factor + mean` for every pixel, with `mean` the
/// channel's mean over the image (Keras `RandomContrast`), alpha excepted.
pub fn adjust_contrast(image: &mut Planes, factor: f32) {
    for channel in 0..image.color_channels() {
        let plane = image.plane_mut(channel);
        // Summed in f64 so that large 16-bit images keep the mean exact enough.
        let mean = (plane.iter().map(|&v| f64::from(v)).sum::<f64>() / plane.len() as f64) as f32;
        for value in plane.iter_mut() {
            *value = (*value - mean) * factor + mean;
        }
    }
}

/// Adds `delta` to every pixel, alpha excepted.
pub fn adjust_brightness(image: &mut Planes, delta: f32) {
    let end = image.color_channels() * image.height * image.width;
    for value in &mut image.data[..end] {
        *value += delta;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1-channel image whose pixel (y, x) is `10 * y + x`.
    fn numbered(height: usize, width: usize) -> Planes {
        let data = (0..height).flat_map(|y| (0..width).map(move |x| (10 * y + x) as f32)).collect();
        Planes { channels: 1, height, width, data }
    }

    #[test]
    fn horizontal_flip_moves_first_pixel_to_last_column() {
        let mut image = numbered(2, 3);
        flip_horizontal(&mut image);
        assert_eq!(image.data, [2.0, 1.0, 0.0, 12.0, 11.0, 10.0]);
    }

    #[test]
    fn vertical_flip_reverses_rows() {
        let mut image = numbered(3, 2);
        flip_vertical(&mut image);
        assert_eq!(image.data, [20.0, 21.0, 10.0, 11.0, 0.0, 1.0]);
    }

    #[test]
    fn crop_takes_the_window() {
        let cropped = crop(&numbered(3, 4), 1, 2, 2, 2);
        assert_eq!((cropped.height, cropped.width), (2, 2));
        assert_eq!(cropped.data, [12.0, 13.0, 22.0, 23.0]);
    }

    #[test]
    fn hwc_rows_roundtrip_through_planes() {
        // Two pixels of RGB, interleaved.
        let row = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let image = Planes::from_row(&row, Layout::Hwc, 3, 1, 2);
        assert_eq!(image.data, [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let mut out = Vec::new();
        image.write_row(Layout::Hwc, &mut out);
        assert_eq!(out, row);
    }

    #[test]
    fn contrast_scales_around_channel_mean() {
        let mut image = Planes { channels: 2, height: 1, width: 2, data: vec![1.0, 3.0, 10.0, 20.0] };
        adjust_contrast(&mut image, 2.0);
        assert_eq!(image.data, [0.0, 4.0, 5.0, 25.0]);
    }

    #[test]
    fn color_ops_leave_alpha_alone() {
        let mut image = Planes { channels: 4, height: 1, width: 2, data: vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.2, 0.8] };
        adjust_contrast(&mut image, 0.5);
        adjust_brightness(&mut image, 0.1);
        assert_eq!(image.data[6..], [0.2, 0.8]);
        // Red: mean 0.5, so 0 and 1 become 0.25 and 0.75, then 0.35 and 0.85.
        assert!((image.data[0] - 0.35).abs() < 1e-6, "{}", image.data[0]);
        assert!((image.data[1] - 0.85).abs() < 1e-6, "{}", image.data[1]);
    }
}
