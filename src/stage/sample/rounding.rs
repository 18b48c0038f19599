//! Stochastic rounding to a grid of spacing `step`.
//!
//! A value `x` between the grid points `lo = floor(x / step) * step` and
//! `lo + step` becomes `lo + step` with probability `(x - lo) / step` and
//! `lo` otherwise, so the expected output is `x` itself. Values on the grid
//! are kept. Each element takes one uniform draw, in row-major order.

use crate::rng::RecordRng;
use rand::RngExt;

use super::Draw;

pub struct StochasticRounding {
    pub step: f64,
}

impl Draw for StochasticRounding {
    /// Each value in units of `step`.
    type Param = f64;
    type Value = f32;

    fn prepare(&self, inputs: &[&[f32]], params: &mut Vec<f64>) -> Result<(), String> {
        for &x in inputs[0] {
            if !x.is_finite() {
                return Err(format!("value {x} is not finite"));
            }
            params.push(f64::from(x) / self.step);
        }
        Ok(())
    }

    fn draw(&self, scaled: &[f64], rng: &mut RecordRng, out: &mut Vec<f32>) {
        for &q in scaled {
            let u: f64 = rng.random();
            out.push(round(q, u, self.step));
        }
    }
}

/// Rounds `q` steps up when `u` falls below its fractional part, else down,
/// and scales back to data units.
pub fn round(q: f64, u: f64, step: f64) -> f32 {
    let low = q.floor();
    let up = u < q - low;
    ((low + f64::from(u8::from(up))) * step) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_by_fraction() {
        // 0.3 / 0.25 = 1.2 steps: up (to 0.5) when u < 0.2, else down (0.25).
        assert_eq!(round(1.2, 0.1, 0.25), 0.5);
        assert_eq!(round(1.2, 0.3, 0.25), 0.25);
        assert_eq!(round(-1.2, 0.7, 1.0), -1.0);
        assert_eq!(round(-1.2, 0.9, 1.0), -2.0);
    }

    #[test]
    fn grid_values_are_kept() {
        assert_eq!(round(3.0, 0.0, 0.5), 1.5);
        assert_eq!(round(3.0, 0.999, 0.5), 1.5);
    }
}
