//! Gaussian draws by reparameterization: `mean + std * z` per element, with
//! `z` standard normal from the record's stream in row-major order.
//!
//! The spread comes from a second column of the mean's shape, holding
//! either log-variances (`std = exp(log_variance / 2)`, the usual output of
//! a variational encoder) or standard deviations.

use crate::rng::RecordRng;
use rand_distr::{Distribution, StandardNormal};

use super::Draw;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    LogVariance,
    Std,
}

pub struct Gaussian {
    pub spread: Spread,
}

impl Draw for Gaussian {
    /// Mean and standard deviation of each element.
    type Param = (f64, f64);
    type Value = f32;

    fn prepare(&self, inputs: &[&[f32]], params: &mut Vec<(f64, f64)>) -> Result<(), String> {
        let (means, spreads) = (inputs[0], inputs[1]);
        for (&mean, &spread) in means.iter().zip(spreads) {
            if !mean.is_finite() {
                return Err(format!("mean {mean} is not finite"));
            }
            let std = match self.spread {
                Spread::LogVariance if spread.is_finite() => (f64::from(spread) / 2.0).exp(),
                Spread::LogVariance => return Err(format!("log-variance {spread} is not finite")),
                Spread::Std if spread >= 0.0 && spread.is_finite() => f64::from(spread),
                Spread::Std => return Err(format!("standard deviation {spread} is not finite and >= 0")),
            };
            params.push((f64::from(mean), std));
        }
        Ok(())
    }

    fn draw(&self, params: &[(f64, f64)], rng: &mut RecordRng, out: &mut Vec<f32>) {
        for &(mean, std) in params {
            let z: f64 = StandardNormal.sample(rng);
            out.push((mean + std * z) as f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_variance_becomes_std() {
        let gaussian = Gaussian { spread: Spread::LogVariance };
        let params = gaussian.prepared(&[&[1.0, -2.0], &[0.0, 4.0f32.ln()]]).unwrap();
        assert_eq!(params[0], (1.0, 1.0));
        assert!((params[1].1 - 2.0).abs() < 1e-6, "{:?}", params[1]);
    }

    #[test]
    fn negative_std_is_an_error() {
        let gaussian = Gaussian { spread: Spread::Std };
        assert!(gaussian.prepared(&[&[0.0], &[-1.0]]).is_err());
        assert!(gaussian.prepared(&[&[f32::NAN], &[1.0]]).is_err());
    }
}
