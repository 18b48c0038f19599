//! The noise kinds of `add_noise`, each applied to one row of float values
//! drawn from that row's random stream.

use rand::RngExt;
use rand_distr::{Distribution, Poisson};

use crate::rng::{RecordRng, for_each_standard_normal};

use crate::config::{AddNoiseConfig, NoiseKind};

/// A noise kind with its parameters, in the data's units.
#[derive(Clone, Debug, PartialEq)]
pub enum Noise {
    Gaussian {
        mean: f32,
        std: f32,
    },
    Uniform {
        low: f32,
        high: f32,
    },
    /// Gaussian dropout: multiply by N(1, std^2), std = sqrt(rate / (1 - rate)).
    Multiplicative {
        std: f32,
    },
    Dropout {
        rate: f32,
    },
    SaltAndPepper {
        amount: f32,
        salt_fraction: f32,
        salt: f32,
        pepper: f32,
    },
    Poisson {
        scale: f64,
    },
    Speckle {
        std: f32,
    },
}

/// Range of the element type: the default salt and pepper values.
#[derive(Clone, Copy, Debug)]
pub struct ValueRange {
    pub low: f32,
    pub high: f32,
}

impl Noise {
    /// Builds the noise of a checked config. `unit` converts additive
    /// settings to the data's units (257 for uint16, else 1).
    pub fn from_config(config: &AddNoiseConfig, unit: f32, range: ValueRange) -> Self {
        let get = |value: Option<f64>| value.unwrap_or_default() as f32;
        match config.noise {
            NoiseKind::Gaussian => Noise::Gaussian { mean: get(config.mean) * unit, std: get(config.std) * unit },
            NoiseKind::Uniform => Noise::Uniform { low: get(config.low) * unit, high: get(config.high) * unit },
            NoiseKind::Multiplicative => {
                let rate = config.rate.unwrap_or_default();
                Noise::Multiplicative { std: (rate / (1.0 - rate)).sqrt() as f32 }
            }
            NoiseKind::Dropout => Noise::Dropout { rate: get(config.rate) },
            NoiseKind::SaltAndPepper => Noise::SaltAndPepper {
                amount: get(config.amount),
                salt_fraction: config.salt_fraction.unwrap_or(0.5) as f32,
                salt: config.salt.map_or(range.high, |v| v as f32 * unit),
                pepper: config.pepper.map_or(range.low, |v| v as f32 * unit),
            },
            NoiseKind::Poisson => Noise::Poisson { scale: config.scale.unwrap_or(1.0) },
            NoiseKind::Speckle => Noise::Speckle { std: get(config.std) },
        }
    }

    /// Perturbs one row, a tensor of `shape`, in place. Fails only for
    /// Poisson noise on a negative value, which has no count distribution.
    pub fn apply(&self, values: &mut [f32], shape: &[usize], rng: &mut RecordRng) -> Result<(), String> {
        match *self {
            // Adding +0.0 would turn -0.0 into +0.0, so zero noise leaves
            // the values as they are, bit for bit.
            Noise::Gaussian { mean, std } if mean == 0.0 && std == 0.0 => {}
            Noise::Gaussian { mean, std } => for_each_standard_normal(rng, values, |value, z| *value += mean + std * z),
            Noise::Uniform { low, high } => {
                for value in values {
                    let u: f32 = rng.random();
                    *value += low + (high - low) * u;
                }
            }
            // Multiplying by 1.0 would quiet a signalling NaN, so zero
            // noise skips the values.
            Noise::Multiplicative { std: 0.0 } | Noise::Dropout { rate: 0.0 } => {}
            Noise::Multiplicative { std } => for_each_standard_normal(rng, values, |value, z| *value *= 1.0 + std * z),
            Noise::Dropout { rate } => {
                let keep_scale = 1.0 / (1.0 - rate);
                for value in values {
                    let u: f32 = rng.random();
                    *value = if u < rate { 0.0 } else { *value * keep_scale };
                }
            }
            Noise::SaltAndPepper { amount, salt_fraction, salt, pepper } => {
                for value in values {
                    let u: f32 = rng.random();
                    if u < amount {
                        let v: f32 = rng.random();
                        *value = if v < salt_fraction { salt } else { pepper };
                    }
                }
            }
            Noise::Poisson { scale } => {
                for (index, value) in values.iter_mut().enumerate() {
                    if !(*value >= 0.0 && value.is_finite()) {
                        return Err(format!(
                            "Poisson noise needs finite, non-negative values, found {value} at index {} of the record's tensor of shape {shape:?}",
                            crate::tensor::index_text(shape, index)
                        ));
                    }
                    let rate = f64::from(*value) * scale;
                    *value = if rate == 0.0 {
                        0.0
                    } else {
                        let count: f64 = Poisson::new(rate).map_err(|err| err.to_string())?.sample(rng);
                        (count / scale) as f32
                    };
                }
            }
            Noise::Speckle { std: 0.0 } => {}
            Noise::Speckle { std } => for_each_standard_normal(rng, values, |value, z| *value += *value * std * z),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::StageRng;

    fn row(noise: Noise, values: &[f32]) -> Vec<f32> {
        let mut row = values.to_vec();
        noise.apply(&mut row, &[values.len()], &mut StageRng::new(1, "noise").stream(b"k", 0)).unwrap();
        row
    }

    #[test]
    fn zero_rates_are_identity() {
        let values = [0.25, -1.0, 3.5, -0.0, f32::from_bits(0x7f80_0001)];
        let bits = |row: Vec<f32>| row.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let expected = bits(values.to_vec());
        assert_eq!(bits(row(Noise::Dropout { rate: 0.0 }, &values)), expected);
        assert_eq!(bits(row(Noise::Multiplicative { std: 0.0 }, &values)), expected);
        assert_eq!(bits(row(Noise::Speckle { std: 0.0 }, &values)), expected);
        assert_eq!(bits(row(Noise::Gaussian { mean: 0.0, std: 0.0 }, &values)), expected);
        let salt_and_pepper = Noise::SaltAndPepper { amount: 0.0, salt_fraction: 0.5, salt: 1.0, pepper: 0.0 };
        assert_eq!(bits(row(salt_and_pepper, &values)), expected);
    }

    #[test]
    fn poisson_rejects_negative_values() {
        let mut values = [1.0, 2.0, 0.0, -0.5];
        let result =
            Noise::Poisson { scale: 10.0 }.apply(&mut values, &[2, 2], &mut StageRng::new(1, "n").stream(b"k", 0));
        assert_eq!(
            result.unwrap_err(),
            "Poisson noise needs finite, non-negative values, found -0.5 at index [1, 1] of the record's tensor of shape [2, 2]"
        );
        let mut values = [1.0, f32::INFINITY];
        let result = Noise::Poisson { scale: 1.0 }.apply(&mut values, &[2], &mut StageRng::new(1, "n").stream(b"k", 0));
        assert_eq!(
            result.unwrap_err(),
            "Poisson noise needs finite, non-negative values, found inf at index [1] of the record's tensor of shape [2]"
        );
    }

    #[test]
    fn dropout_survivors_are_rescaled() {
        let out = row(Noise::Dropout { rate: 0.5 }, &[1.0; 64]);
        assert!(out.iter().all(|v| *v == 0.0 || *v == 2.0), "{out:?}");
    }
}
