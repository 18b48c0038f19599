//! Bernoulli draws, one per element: 1 with probability `p`, else 0.
//!
//! `p` is read as a probability, or as a logit through the sigmoid. Each
//! element takes one uniform draw from the record's stream, in row-major
//! order.

use crate::rng::RecordRng;
use rand::RngExt;

use super::Draw;
use crate::config::SampleFrom;

pub struct Bernoulli {
    pub from: SampleFrom,
}

impl Draw for Bernoulli {
    /// Success probability of each element.
    type Param = f64;
    type Value = i32;

    fn prepare(&self, inputs: &[&[f32]], params: &mut Vec<f64>) -> Result<(), String> {
        for &x in inputs[0] {
            params.push(probability(x, self.from)?);
        }
        Ok(())
    }

    fn draw(&self, probabilities: &[f64], rng: &mut RecordRng, out: &mut Vec<i32>) {
        for &p in probabilities {
            let u: f64 = rng.random();
            out.push(i32::from(u < p));
        }
    }
}

/// Returns the success probability of one score, or why it has none.
pub fn probability(x: f32, from: SampleFrom) -> Result<f64, String> {
    if x.is_nan() {
        return Err(String::from("the scores contain NaN"));
    }
    let x = f64::from(x);
    match from {
        // 1 / (1 + e^-x) is 0 at -inf and 1 at +inf, as the limits are.
        SampleFrom::Logits => Ok(1.0 / (1.0 + (-x).exp())),
        SampleFrom::Probabilities if (0.0..=1.0).contains(&x) => Ok(x),
        SampleFrom::Probabilities => Err(format!("probability {x} is outside [0, 1]")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_limits_are_exact() {
        assert_eq!(probability(f32::INFINITY, SampleFrom::Logits), Ok(1.0));
        assert_eq!(probability(f32::NEG_INFINITY, SampleFrom::Logits), Ok(0.0));
        assert_eq!(probability(0.0, SampleFrom::Logits), Ok(0.5));
    }

    #[test]
    fn out_of_range_probability_is_an_error() {
        assert!(probability(1.5, SampleFrom::Probabilities).is_err());
        assert!(probability(-0.1, SampleFrom::Probabilities).is_err());
        assert!(probability(f32::NAN, SampleFrom::Logits).is_err());
    }
}
