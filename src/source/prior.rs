//! Priors of the `latent` source: the distributions latent values are drawn
//! from.
//!
//! The truncated normal is drawn exactly by rejection, never by clipping.
//! With the bounds standardized to `[a, b]` (mirrored so that `b > 0`), the
//! proposal is chosen for the interval:
//! - `a <= 0 < b` and `b - a >= sqrt(2 pi)`: standard normal draws, kept
//!   when inside `[a, b]`;
//! - `a <= 0 < b`, narrower: uniform draws on `[a, b]`, kept with
//!   probability `exp(-z^2 / 2)`;
//! - `0 < a`, and `b - a` below `1 / lambda`: uniform draws kept with
//!   probability `exp((a^2 - z^2) / 2)`;
//! - `0 < a`, wider: `a` plus an exponential of rate
//!   `lambda = (a + sqrt(a^2 + 4)) / 2`, kept with probability
//!   `exp(-(z - lambda)^2 / 2)` when not above `b`.
//!
//! Each proposal is exact for the truncated density. Matching it to the
//! interval keeps the number of proposals per value small, in far tails
//! too (see `truncated_draws_need_few_tries`).

use rand::{Rng, RngExt};
use rand_distr::{Distribution, Exp1, StandardNormal};

use crate::config::{PriorConfig, PriorKind};
use crate::rng::{RecordRng, fill_standard_normal, for_each_standard_normal};

/// A prior ready to draw from.
#[derive(Clone, Copy, Debug)]
pub struct Prior(PriorKind);

impl Prior {
    /// Builds the prior of a section that passed the load-time checks.
    pub fn new(config: &PriorConfig) -> Self {
        Self(config.parse().expect("the prior is checked when the file is loaded"))
    }

    /// Fills `out` with draws, in order.
    ///
    /// A normal prior takes its standard normal draws from the float32
    /// ziggurat of the noise stages ([`crate::rng::for_each_standard_normal`])
    /// because it is faster than a float64 one, and the values end up as
    /// float32 anyway.
    pub fn draw(&self, rng: &mut RecordRng, out: &mut [f64]) {
        match self.0 {
            PriorKind::Normal { mean, std } => {
                // A multiple of the ziggurat's 64-value chunks, so the draws
                // are those of one call over the whole slice.
                let mut z = [0f32; 256];
                for chunk in out.chunks_mut(z.len()) {
                    let z = &mut z[..chunk.len()];
                    fill_standard_normal(rng, z);
                    for (value, &z) in chunk.iter_mut().zip(z.iter()) {
                        *value = mean + std * f64::from(z);
                    }
                }
            }
            _ => out.iter_mut().for_each(|value| *value = self.draw_one(rng)),
        }
    }

    /// Fills `out` with the values [`Prior::draw`] gives for a slice of the
    /// same length, rounded by [`Prior::narrow`], without a float64 buffer.
    pub fn draw_narrow(&self, rng: &mut RecordRng, out: &mut [f32]) {
        match self.0 {
            PriorKind::Normal { mean, std } => {
                for_each_standard_normal(rng, out, |value, z| *value = (mean + std * f64::from(z)) as f32);
            }
            _ => out.iter_mut().for_each(|value| *value = self.narrow(self.draw_one(rng))),
        }
    }

    /// Draws one value of a uniform or truncated normal prior.
    fn draw_one(&self, rng: &mut RecordRng) -> f64 {
        match self.0 {
            PriorKind::Normal { .. } => unreachable!("normal priors are drawn a slice at a time"),
            PriorKind::Uniform { low, high } => low + (high - low) * rng.random::<f64>(),
            PriorKind::TruncatedNormal { mean, std, low, high } => {
                let (z, _) = standard_truncated((low - mean) / std, (high - mean) / std, rng);
                (mean + std * z).clamp(low, high)
            }
        }
    }

    /// Rounds a value to float32. A value inside the prior's bounds stays
    /// inside them, where rounding to nearest would step over a bound.
    pub fn narrow(&self, value: f64) -> f32 {
        let rounded = value as f32;
        match self.0 {
            PriorKind::Normal { .. } => rounded,
            PriorKind::Uniform { low, high } | PriorKind::TruncatedNormal { low, high, .. } => {
                if value <= high && f64::from(rounded) > high {
                    rounded.next_down()
                } else if value >= low && f64::from(rounded) < low {
                    rounded.next_up()
                } else {
                    rounded
                }
            }
        }
    }
}

const SQRT_2PI: f64 = 2.506_628_274_631_000_7;

/// Draws from the standard normal truncated to `[a, b]`, `a < b`; returns
/// the value and the number of proposals it took.
fn standard_truncated<R: Rng + ?Sized>(a: f64, b: f64, rng: &mut R) -> (f64, u32) {
    if b <= 0.0 {
        let (z, tries) = standard_truncated(-b, -a, rng);
        return (-z, tries);
    }
    let mut tries = 0;
    loop {
        tries += 1;
        let accepted = if a <= 0.0 {
            if b - a >= SQRT_2PI {
                let z: f64 = StandardNormal.sample(rng);
                (a..=b).contains(&z).then_some(z)
            } else {
                let z = a + (b - a) * rng.random::<f64>();
                (rng.random::<f64>() < (-0.5 * z * z).exp()).then_some(z)
            }
        } else {
            let lambda = 0.5 * (a + (a * a + 4.0).sqrt());
            if b - a < 1.0 / lambda {
                let z = a + (b - a) * rng.random::<f64>();
                (rng.random::<f64>() < (0.5 * (a * a - z * z)).exp()).then_some(z)
            } else {
                let e: f64 = Exp1.sample(rng);
                let z = a + e / lambda;
                (z <= b && rng.random::<f64>() < (-0.5 * (z - lambda) * (z - lambda)).exp()).then_some(z)
            }
        };
        if let Some(z) = accepted {
            return (z, tries);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::StageRng;

    /// Every proposal keeps enough draws: fewer than 2.5 tries per value on
    /// average, over centered, one-sided, narrow and far-tail intervals.
    #[test]
    fn truncated_draws_need_few_tries() {
        let mut rng = StageRng::new(3, "tries").stream(b"0", 0);
        let bounds = [
            (-1.0, 1.0),
            (0.0, 2.5),
            (0.0, 2.6),
            (-0.01, f64::INFINITY),
            (0.01, 0.02),
            (0.1, f64::INFINITY),
            (2.0, 2.3),
            (2.0, 2.6),
            (8.0, 8.001),
            (8.0, f64::INFINITY),
            (-40.0, -39.0),
            (f64::NEG_INFINITY, f64::INFINITY),
        ];
        for (a, b) in bounds {
            let draws = 20_000;
            let mut total = 0;
            for _ in 0..draws {
                let (z, tries) = standard_truncated(a, b, &mut rng);
                assert!((a..=b).contains(&z), "{z} is outside [{a}, {b}]");
                total += tries;
            }
            let mean_tries = f64::from(total) / f64::from(draws);
            assert!(mean_tries < 2.5, "[{a}, {b}] took {mean_tries} tries per value");
        }
    }

    /// Far in the tail the mean follows the Mills ratio; clipping a normal
    /// draw, or rejecting plain normal draws, could not give that.
    #[test]
    fn far_tail_mean_follows_mills_ratio() {
        let mut rng = StageRng::new(4, "tail").stream(b"0", 0);
        let a = 6.0;
        let n = 20_000;
        let mean = (0..n).map(|_| standard_truncated(a, f64::INFINITY, &mut rng).0).sum::<f64>() / f64::from(n);
        // E[Z | Z > a] = phi(a) / (1 - Phi(a)) = 6.15848 for a = 6. The
        // conditional std is 0.155, so the standard error is 0.0011.
        assert!((mean - 6.15848).abs() < 0.0055, "tail mean {mean}");
    }

    /// Interpolation endpoints come from `draw` and plain records from
    /// `draw_narrow`: both must give the same values for the same stream.
    #[test]
    fn narrow_draws_match_rounded_draws() {
        let priors = [
            PriorKind::Normal { mean: 0.5, std: 2.0 },
            PriorKind::Uniform { low: -0.1, high: 0.1 },
            PriorKind::TruncatedNormal { mean: 0.0, std: 1.0, low: -0.5, high: 2.0 },
        ];
        for kind in priors {
            let prior = Prior(kind);
            let rngs = StageRng::new(5, "narrow");
            // 1,000 values: several of the normal prior's 256-value chunks.
            let mut wide = vec![0.0; 1000];
            prior.draw(&mut rngs.stream(b"7", 0), &mut wide);
            let mut narrow = vec![0f32; 1000];
            prior.draw_narrow(&mut rngs.stream(b"7", 0), &mut narrow);
            let rounded: Vec<f32> = wide.iter().map(|&v| prior.narrow(v)).collect();
            assert_eq!(narrow, rounded, "{kind:?}");
        }
    }

    #[test]
    fn float32_rounding_stays_inside_bounds() {
        let prior = Prior(PriorKind::Uniform { low: -0.1, high: 0.1 });
        // 0.1 rounds up to 0.100000001 in float32.
        assert!(f64::from(prior.narrow(0.1)) <= 0.1);
        assert!(f64::from(prior.narrow(-0.1)) >= -0.1);
    }
}
