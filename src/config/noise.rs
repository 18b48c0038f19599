//! The `add_noise` section of the pipeline file.
//!
//! The section is flat: `noise` picks the kind, and each kind reads its own
//! keys. A key that the chosen kind does not use is an error, so a typo or a
//! leftover key never passes silently.

use serde::{Deserialize, Serialize};

use super::load::ConfigProblem;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AddNoiseConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub column: String,
    /// Column the noisy tensor goes to; replaces `column` when absent.
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub noise: NoiseKind,
    /// Gaussian: mean of the added noise.
    #[serde(default)]
    pub mean: Option<f64>,
    /// Gaussian and speckle: standard deviation.
    #[serde(default)]
    pub std: Option<f64>,
    /// Uniform: bounds of the added noise.
    #[serde(default)]
    pub low: Option<f64>,
    #[serde(default)]
    pub high: Option<f64>,
    /// Multiplicative and dropout: the drop rate p, in [0, 1).
    #[serde(default)]
    pub rate: Option<f64>,
    /// Salt and pepper: the fraction of elements replaced.
    #[serde(default)]
    pub amount: Option<f64>,
    /// Salt and pepper: the fraction of replaced elements set to `salt`.
    #[serde(default)]
    pub salt_fraction: Option<f64>,
    /// Salt and pepper: replacement values; the type's range by default.
    #[serde(default)]
    pub salt: Option<f64>,
    #[serde(default)]
    pub pepper: Option<f64>,
    /// Poisson: counts per unit of the data.
    #[serde(default)]
    pub scale: Option<f64>,
    /// Lower and upper bound applied after the noise.
    #[serde(default)]
    pub clip: Option<[f64; 2]>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NoiseKind {
    /// x + N(mean, std^2).
    #[default]
    Gaussian,
    /// x + U(low, high).
    Uniform,
    /// x * N(1, rate / (1 - rate)): Gaussian dropout.
    Multiplicative,
    /// x / (1 - rate) with probability 1 - rate, else 0.
    Dropout,
    /// Elements replaced by `salt` or `pepper` with probability `amount`.
    SaltAndPepper,
    /// Poisson(x * scale) / scale: shot noise.
    Poisson,
    /// x + x * N(0, std^2).
    Speckle,
}

impl NoiseKind {
    pub fn name(self) -> &'static str {
        match self {
            NoiseKind::Gaussian => "gaussian",
            NoiseKind::Uniform => "uniform",
            NoiseKind::Multiplicative => "multiplicative",
            NoiseKind::Dropout => "dropout",
            NoiseKind::SaltAndPepper => "salt_and_pepper",
            NoiseKind::Poisson => "poisson",
            NoiseKind::Speckle => "speckle",
        }
    }

    /// The keys this kind reads; `required` ones must be present.
    fn keys(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            NoiseKind::Gaussian => (&["std"], &["mean"]),
            NoiseKind::Uniform => (&["low", "high"], &[]),
            NoiseKind::Multiplicative | NoiseKind::Dropout => (&["rate"], &[]),
            NoiseKind::SaltAndPepper => (&["amount"], &["salt_fraction", "salt", "pepper"]),
            NoiseKind::Poisson => (&["scale"], &[]),
            NoiseKind::Speckle => (&["std"], &[]),
        }
    }
}

/// Returns what a required key of a noise kind means, with an example value.
fn meaning(key: &str) -> Option<&'static str> {
    Some(match key {
        "std" => "the standard deviation of the noise, such as `std: 0.1`",
        "low" => "the lowest value of the noise, such as `low: -0.1`",
        "high" => "the highest value of the noise, such as `high: 0.1`",
        "rate" => "the drop rate in [0, 1), such as `rate: 0.1`",
        "amount" => "the fraction of elements replaced, such as `amount: 0.05`",
        "scale" => "the counts per unit of the data, such as `scale: 255` for data in [0, 1]",
        _ => return None,
    })
}

impl AddNoiseConfig {
    fn value(&self, key: &str) -> Option<f64> {
        match key {
            "mean" => self.mean,
            "std" => self.std,
            "low" => self.low,
            "high" => self.high,
            "rate" => self.rate,
            "amount" => self.amount,
            "salt_fraction" => self.salt_fraction,
            "salt" => self.salt,
            "pepper" => self.pepper,
            "scale" => self.scale,
            _ => None,
        }
    }

    /// Checks the keys and values of the chosen kind; `at` builds a problem
    /// path from a key.
    pub fn check(&self, at: impl Fn(&str) -> String) -> Vec<ConfigProblem> {
        const ALL: [&str; 10] =
            ["mean", "std", "low", "high", "rate", "amount", "salt_fraction", "salt", "pepper", "scale"];
        let mut problems = Vec::new();
        let kind = self.noise;
        let (required, optional) = kind.keys();
        for key in ALL {
            let present = self.value(key).is_some();
            if required.contains(&key) && !present {
                let message = match meaning(key) {
                    Some(meaning) => format!("{} noise needs `{key}`, {meaning}", kind.name()),
                    None => format!("{} noise needs `{key}`", kind.name()),
                };
                problems.push(ConfigProblem::new(at(key), message));
            } else if present && !required.contains(&key) && !optional.contains(&key) {
                let keys: Vec<&str> = required.iter().chain(optional).copied().collect();
                problems.push(ConfigProblem::new(
                    at(key),
                    format!("`{key}` does not apply to {} noise, which reads {}", kind.name(), keys.join(", ")),
                ));
            }
            if let Some(value) = self.value(key)
                && !value.is_finite()
            {
                problems.push(ConfigProblem::new(at(key), format!("must be a finite number, found {value}")));
            }
        }

        let non_negative = |key: &str, problems: &mut Vec<ConfigProblem>| {
            if let Some(value) = self.value(key)
                && value < 0.0
            {
                problems.push(ConfigProblem::new(at(key), format!("must be zero or positive, found {value}")));
            }
        };
        let fraction = |key: &str, upper_open: bool, problems: &mut Vec<ConfigProblem>| {
            if let Some(value) = self.value(key) {
                let valid = if upper_open { (0.0..1.0).contains(&value) } else { (0.0..=1.0).contains(&value) };
                if !valid {
                    let range = if upper_open { "[0, 1)" } else { "[0, 1]" };
                    problems.push(ConfigProblem::new(at(key), format!("must be in {range}, found {value}")));
                }
            }
        };
        non_negative("std", &mut problems);
        fraction("rate", true, &mut problems);
        fraction("amount", false, &mut problems);
        fraction("salt_fraction", false, &mut problems);
        if let Some(scale) = self.scale
            && scale <= 0.0
        {
            problems.push(ConfigProblem::new(at("scale"), format!("must be positive, found {scale}")));
        }
        if let (Some(low), Some(high)) = (self.low, self.high)
            && low > high
        {
            problems.push(ConfigProblem::new(at("low"), format!("`low` {low} is above `high` {high}")));
        }
        if let Some([low, high]) = self.clip {
            if low.is_nan() || high.is_nan() {
                problems.push(ConfigProblem::new(
                    at("clip"),
                    format!("bounds must not be NaN, found [{low}, {high}]; use .inf or -.inf for an open side"),
                ));
            } else if low > high {
                problems.push(ConfigProblem::new(at("clip"), format!("lower bound {low} is above upper bound {high}")));
            }
        }
        problems
    }
}
