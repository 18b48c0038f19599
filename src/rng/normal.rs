//! Standard normal float32 draws by the ziggurat method (Marsaglia and
//! Tsang, "The Ziggurat Method for Generating Random Variables", Journal of
//! Statistical Software 5(8), 2000), with 256 layers and one 32-bit word per
//! draw in the common case, as numpy does for float32.
//!
//! Each word gives the layer (8 bits), the sign (1 bit) and a 23-bit
//! magnitude. About 99% of draws are accepted at once. The rest take extra
//! uniforms from the same stream, so the draws stay a pure function of the
//! stream.

use std::sync::LazyLock;

use rand::Rng;

const LAYERS: usize = 256;
/// Start of the tail: the right edge of the base layer.
const TAIL_START: f64 = 3.654_152_885_361_009;
/// Area of each layer (and of the base layer with its tail), for
/// f(x) = exp(-x^2 / 2).
const LAYER_AREA: f64 = 4.928_673_233_99e-3;
const MAGNITUDE_SCALE: f64 = (1u32 << 23) as f64;

struct Tables {
    /// Acceptance thresholds on the 23-bit magnitude.
    k: [u32; LAYERS],
    /// Magnitude-to-x scale of each layer.
    w: [f32; LAYERS],
    /// f(x) at each layer's right edge.
    f: [f32; LAYERS],
}

static TABLES: LazyLock<Tables> = LazyLock::new(|| {
    let density = |x: f64| (-0.5 * x * x).exp();
    let mut k = [0u32; LAYERS];
    let mut w = [0f32; LAYERS];
    let mut f = [0f32; LAYERS];

    let mut edge = TAIL_START;
    let mut previous = edge;
    let q = LAYER_AREA / density(edge);
    k[0] = ((edge / q) * MAGNITUDE_SCALE) as u32;
    k[1] = 0;
    w[0] = (q / MAGNITUDE_SCALE) as f32;
    w[LAYERS - 1] = (edge / MAGNITUDE_SCALE) as f32;
    f[0] = 1.0;
    f[LAYERS - 1] = density(edge) as f32;
    for i in (1..LAYERS - 1).rev() {
        edge = (-2.0 * (LAYER_AREA / edge + density(edge)).ln()).sqrt();
        k[i + 1] = ((edge / previous) * MAGNITUDE_SCALE) as u32;
        previous = edge;
        f[i] = density(edge) as f32;
        w[i] = (edge / MAGNITUDE_SCALE) as f32;
    }
    Tables { k, w, f }
});

/// Fills `out` with standard normal draws from `rng`.
pub fn fill_standard_normal<R: Rng + ?Sized>(rng: &mut R, out: &mut [f32]) {
    for_each_standard_normal(rng, out, |value, z| *value = z);
}

/// Draws one standard normal from `rng` for each element of `values`, in
/// order, and applies `update` to the element and its draw. The draws are
/// those of [`fill_standard_normal`], and updating in the same pass saves a
/// buffer of draws.
pub fn for_each_standard_normal<R: Rng + ?Sized>(
    rng: &mut R,
    values: &mut [f32],
    mut update: impl FnMut(&mut f32, f32),
) {
    let tables = &*TABLES;
    let mut bytes = [0u8; 4 * 64];
    for chunk in values.chunks_mut(64) {
        let bytes = &mut bytes[..4 * chunk.len()];
        rng.fill_bytes(bytes);
        let words = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        for (value, word) in chunk.iter_mut().zip(words) {
            let layer = (word & 0xff) as usize;
            let magnitude = word >> 9;
            let x = if magnitude < tables.k[layer] {
                magnitude as f32 * tables.w[layer]
            } else {
                slow_path(rng, tables, layer, magnitude)
            };
            // The sign bit moves from bit 8 of the word to bit 31 of the
            // float: a branch on a random bit would mispredict half the time.
            update(value, f32::from_bits(x.to_bits() ^ ((word & 0x100) << 23)));
        }
    }
}

/// Handles the draws the fast path does not accept: the tail beyond
/// [`TAIL_START`], and the wedges between a layer's rectangle and the curve.
#[cold]
fn slow_path<R: Rng + ?Sized>(rng: &mut R, tables: &Tables, mut layer: usize, mut magnitude: u32) -> f32 {
    loop {
        if magnitude < tables.k[layer] {
            return magnitude as f32 * tables.w[layer];
        }
        if layer == 0 {
            // Marsaglia's tail method: exact for x > TAIL_START.
            loop {
                let x = -uniform_open(rng).ln() / TAIL_START;
                let y = -uniform_open(rng).ln();
                if 2.0 * y > x * x {
                    return (TAIL_START + x) as f32;
                }
            }
        }
        let x = magnitude as f32 * tables.w[layer];
        let u = uniform_open(rng) as f32;
        if tables.f[layer] + u * (tables.f[layer - 1] - tables.f[layer]) < (-0.5 * x * x).exp() {
            return x;
        }
        // Rejected: draw a fresh word (its sign is already fixed by the caller).
        let word = rng.next_u32();
        layer = (word & 0xff) as usize;
        magnitude = word >> 9;
    }
}

/// Draws a uniform value in (0, 1), never 0, so its logarithm is finite.
fn uniform_open<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::StageRng;

    #[test]
    fn tables_are_monotone() {
        let tables = &*TABLES;
        for i in 1..LAYERS - 1 {
            assert!(tables.w[i] < tables.w[i + 1], "w is not increasing at {i}");
            assert!(tables.f[i] > tables.f[i + 1], "f is not decreasing at {i}");
        }
    }

    #[test]
    fn draws_have_unit_moments() {
        let mut values = vec![0f32; 400_000];
        fill_standard_normal(&mut StageRng::new(3, "normal").stream(b"moments", 0), &mut values);
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let variance = values.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let kurtosis = values.iter().map(|&v| (f64::from(v) - mean).powi(4)).sum::<f64>() / n / variance.powi(2);
        // Standard errors: mean 0.0016, variance 0.0022, kurtosis 0.0077.
        assert!(mean.abs() < 0.008, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.011, "variance {variance}");
        assert!((kurtosis - 3.0).abs() < 0.04, "kurtosis {kurtosis}");
        let tail = values.iter().filter(|v| v.abs() > TAIL_START as f32).count() as f64 / n;
        // P(|z| > 3.654) = 2.58e-4; the standard error here is 2.5e-5.
        assert!((tail - 2.58e-4).abs() < 1e-4, "tail fraction {tail}");
    }
}
