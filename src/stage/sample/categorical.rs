//! Categorical draws from class scores: temperature, truncation (top-k,
//! top-p, min-p) and the inverse CDF, one step per vector of class scores
//! along the class axis.
//!
//! The order is fixed: temperature, then top-k, then top-p, then min-p,
//! then renormalization. Each filter works on the distribution renormalized
//! over the classes the previous filters kept. Samplers that mask logits to
//! -inf between filters behave the same way.

use crate::rng::RecordRng;
use rand::RngExt;

use super::Draw;
use crate::config::SampleFrom;

/// Truncation settings. `None` switches a filter off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Truncation {
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
}

impl Truncation {
    fn is_off(&self) -> bool {
        self.top_k.is_none() && self.top_p.is_none() && self.min_p.is_none()
    }
}

/// Draws one class per step from a row tensor of class scores.
pub struct Categorical {
    pub from: SampleFrom,
    pub temperature: f64,
    pub truncation: Truncation,
    /// Size of the class axis.
    pub classes: usize,
    /// Elements before and after the class axis in row-major order: the
    /// steps are the `outer * inner` positions of the remaining axes.
    pub outer: usize,
    pub inner: usize,
}

impl Draw for Categorical {
    /// Unnormalized class weights, `classes` per step, steps in row-major
    /// order of the output shape.
    type Param = f64;
    type Value = i32;

    fn prepare(&self, inputs: &[&[f32]], params: &mut Vec<f64>) -> Result<(), String> {
        let scores = inputs[0];
        let steps = self.outer * self.inner;
        // With the class axis last, each step's scores are contiguous; other
        // layouts gather them into a buffer first.
        let mut gathered = if self.inner == 1 { Vec::new() } else { vec![0f32; self.classes] };
        for o in 0..self.outer {
            for i in 0..self.inner {
                let base = o * self.classes * self.inner + i;
                let step_scores = if self.inner == 1 {
                    &scores[base..base + self.classes]
                } else {
                    for (c, score) in gathered.iter_mut().enumerate() {
                        *score = scores[base + c * self.inner];
                    }
                    &gathered[..]
                };
                let start = params.len();
                weights_into(step_scores, self.from, self.temperature, params).map_err(|reason| {
                    if steps > 1 { format!("step {}: {reason}", o * self.inner + i) } else { reason }
                })?;
                truncate(&mut params[start..], &self.truncation);
            }
        }
        Ok(())
    }

    fn draw(&self, weights: &[f64], rng: &mut RecordRng, out: &mut Vec<i32>) {
        for step in weights.chunks_exact(self.classes) {
            let u: f64 = rng.random();
            out.push(inverse_cdf(step, u) as i32);
        }
    }
}

/// Turns one vector of scores into unnormalized class weights. Fails on
/// scores that cannot define a distribution.
pub fn weights(scores: &[f32], from: SampleFrom, temperature: f64) -> Result<Vec<f64>, String> {
    let mut weights = Vec::with_capacity(scores.len());
    weights_into(scores, from, temperature, &mut weights)?;
    Ok(weights)
}

/// Appends the unnormalized class weights of one vector of scores to `out`,
/// as [`weights`] returns them. On failure, `out` may hold part of them.
fn weights_into(scores: &[f32], from: SampleFrom, temperature: f64, out: &mut Vec<f64>) -> Result<(), String> {
    if scores.iter().any(|s| s.is_nan()) {
        return Err(String::from("the scores contain NaN"));
    }
    let start = out.len();
    match from {
        SampleFrom::Logits => {
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                return Err(String::from("every logit is -inf"));
            }
            if temperature == 0.0 {
                out.extend(scores.iter().map(|&s| f64::from(s)));
                one_hot_argmax(&mut out[start..]);
            } else if max == f32::INFINITY {
                // Infinite logits take all the mass, shared equally.
                out.extend(scores.iter().map(|&s| if s == f32::INFINITY { 1.0 } else { 0.0 }));
            } else {
                let max = f64::from(max);
                out.extend(scores.iter().map(|&s| ((f64::from(s) - max) / temperature).exp()));
            }
        }
        SampleFrom::Probabilities => {
            if scores.iter().any(|&p| p < 0.0 || p.is_infinite()) {
                return Err(String::from("probabilities must be finite and non-negative"));
            }
            if scores.iter().all(|&p| p == 0.0) {
                return Err(String::from("every probability is zero"));
            }
            out.extend(scores.iter().map(|&p| f64::from(p)));
            let values = &mut out[start..];
            if temperature == 0.0 {
                one_hot_argmax(values);
            } else {
                // p^(1/T) computed in log space so that small T does not underflow.
                for value in values.iter_mut() {
                    *value = value.ln() / temperature;
                }
                let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                for value in values.iter_mut() {
                    *value = (*value - max).exp();
                }
            }
        }
    }
    Ok(())
}

/// Replaces `values` by 1 at the first largest value and 0 elsewhere.
fn one_hot_argmax(values: &mut [f64]) {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    for (i, value) in values.iter_mut().enumerate() {
        *value = if i == best { 1.0 } else { 0.0 };
    }
}

/// Sets the weight of every class that truncation drops to zero. The kept
/// weights are left as they are: the inverse CDF divides by their sum, which
/// is the renormalization.
pub fn truncate(weights: &mut [f64], truncation: &Truncation) {
    if truncation.is_off() {
        return;
    }
    // Descending weight, ties by the lower index: the order every filter
    // uses, so that equal classes are kept or dropped deterministically.
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));

    if let Some(k) = truncation.top_k {
        for &class in order.iter().skip(k) {
            weights[class] = 0.0;
        }
    }
    if let Some(p) = truncation.top_p {
        let total: f64 = weights.iter().sum();
        let mut mass = 0.0;
        let mut reached = false;
        for &class in &order {
            if reached {
                weights[class] = 0.0;
            } else {
                mass += weights[class] / total;
                // The class whose mass crosses p is kept, so the set is
                // never empty.
                reached = mass >= p;
            }
        }
    }
    if let Some(m) = truncation.min_p {
        let max = weights.iter().copied().fold(0.0, f64::max);
        for weight in weights.iter_mut() {
            if *weight < m * max {
                *weight = 0.0;
            }
        }
    }
}

/// Picks the class whose cumulative weight first exceeds `u * total`.
pub fn inverse_cdf(weights: &[f64], u: f64) -> usize {
    let total: f64 = weights.iter().sum();
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_positive = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            last_positive = i;
            cumulative += w;
            if target < cumulative {
                return i;
            }
        }
    }
    // Rounding can leave `target` a hair above the sum.
    last_positive
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the classes that keep a positive weight.
    fn kept(probabilities: &[f64], truncation: Truncation) -> Vec<usize> {
        let mut weights = probabilities.to_vec();
        truncate(&mut weights, &truncation);
        (0..weights.len()).filter(|&i| weights[i] > 0.0).collect()
    }

    fn top_k(k: usize) -> Truncation {
        Truncation { top_k: Some(k), ..Truncation::default() }
    }

    fn top_p(p: f64) -> Truncation {
        Truncation { top_p: Some(p), ..Truncation::default() }
    }

    fn min_p(m: f64) -> Truncation {
        Truncation { min_p: Some(m), ..Truncation::default() }
    }

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        assert_eq!(kept(&[0.2, 0.3, 0.2, 0.3], top_k(1)), [1]);
        assert_eq!(kept(&[0.2, 0.3, 0.2, 0.3], top_k(3)), [0, 1, 3]);
        assert_eq!(kept(&[0.25; 4], top_k(2)), [0, 1]);
    }

    #[test]
    fn top_k_of_all_classes_keeps_all() {
        assert_eq!(kept(&[0.1, 0.2, 0.7], top_k(3)), [0, 1, 2]);
    }

    #[test]
    fn top_p_single_class_reaching_p() {
        assert_eq!(kept(&[0.125, 0.75, 0.125], top_p(0.75)), [1]);
        assert_eq!(kept(&[0.125, 0.75, 0.125], top_p(0.5)), [1]);
    }

    #[test]
    fn top_p_includes_crossing_class() {
        // 0.5 < 0.75, then 0.5 + 0.25 reaches 0.75 exactly: two classes.
        assert_eq!(kept(&[0.25, 0.5, 0.125, 0.125], top_p(0.75)), [0, 1]);
        // 0.76 needs the third class, the one that crosses it.
        assert_eq!(kept(&[0.25, 0.5, 0.125, 0.125], top_p(0.76)), [0, 1, 2]);
    }

    #[test]
    fn top_p_of_one_keeps_every_positive_class() {
        assert_eq!(kept(&[0.3, 0.5, 0.0, 0.2], top_p(1.0)), [0, 1, 3]);
    }

    #[test]
    fn top_p_ties_take_lower_index() {
        assert_eq!(kept(&[0.25; 4], top_p(0.5)), [0, 1]);
    }

    #[test]
    fn min_p_keeps_relative_to_max() {
        assert_eq!(kept(&[0.05, 0.5, 0.2, 0.25], min_p(0.5)), [1, 3]);
        // Exactly m * max is kept.
        assert_eq!(kept(&[0.1, 0.4, 0.2, 0.3], min_p(0.5)), [1, 2, 3]);
        assert_eq!(kept(&[0.1, 0.4, 0.2, 0.3], min_p(0.0)), [0, 1, 2, 3]);
    }

    #[test]
    fn filters_apply_in_order() {
        // top-k keeps {1, 3, 2}; renormalized (0.4, 0.3, 0.2) / 0.9, top-p
        // 0.7 needs 0.444 + 0.333 = 0.778: {1, 3}; min-p 0.8 of 0.4 drops 3.
        let t = Truncation { top_k: Some(3), top_p: Some(0.7), min_p: Some(0.8) };
        assert_eq!(kept(&[0.1, 0.4, 0.2, 0.3], t), [1]);
        let t = Truncation { top_k: Some(3), top_p: Some(0.7), min_p: Some(0.7) };
        assert_eq!(kept(&[0.1, 0.4, 0.2, 0.3], t), [1, 3]);
    }

    #[test]
    fn unnormalized_weights_truncate_alike() {
        assert_eq!(kept(&[2.0, 4.0, 1.0, 1.0], top_p(0.75)), [0, 1]);
    }

    #[test]
    fn zero_temperature_takes_argmax() {
        let w = weights(&[0.1, 2.0, 2.0, -1.0], SampleFrom::Logits, 0.0).unwrap();
        assert_eq!(w, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn zero_temperature_breaks_infinite_ties_by_lowest_index() {
        let w = weights(&[0.0, f32::INFINITY, f32::INFINITY], SampleFrom::Logits, 0.0).unwrap();
        assert_eq!(w, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn all_negative_infinity_is_an_error() {
        assert!(weights(&[f32::NEG_INFINITY; 3], SampleFrom::Logits, 1.0).is_err());
    }

    #[test]
    fn nan_is_an_error() {
        assert!(weights(&[0.0, f32::NAN], SampleFrom::Logits, 1.0).is_err());
    }

    #[test]
    fn inverse_cdf_picks_expected_bins() {
        let w = [1.0, 0.0, 3.0];
        assert_eq!(inverse_cdf(&w, 0.0), 0);
        assert_eq!(inverse_cdf(&w, 0.2499), 0);
        assert_eq!(inverse_cdf(&w, 0.25), 2);
        assert_eq!(inverse_cdf(&w, 0.999_999), 2);
    }

    #[test]
    fn probabilities_with_temperature_one_are_unchanged() {
        let w = weights(&[0.2, 0.3, 0.5], SampleFrom::Probabilities, 1.0).unwrap();
        let total: f64 = w.iter().sum();
        let normalized: Vec<f64> = w.iter().map(|x| x / total).collect();
        for (got, want) in normalized.iter().zip([0.2, 0.3, 0.5]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn steps_follow_the_class_axis() {
        // Row shape [2, 3] with classes on axis 0: steps are the 3 columns.
        let sampler = Categorical {
            from: SampleFrom::Logits,
            temperature: 0.0,
            truncation: Truncation::default(),
            classes: 2,
            outer: 1,
            inner: 3,
        };
        let scores = [0.0, 5.0, 1.0, 2.0, 1.0, 0.5];
        let weights = sampler.prepared(&[&scores]).unwrap();
        assert_eq!(weights, [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn rejected_step_is_named() {
        let sampler = Categorical {
            from: SampleFrom::Logits,
            temperature: 1.0,
            truncation: Truncation::default(),
            classes: 2,
            outer: 2,
            inner: 1,
        };
        let error = sampler.prepared(&[&[0.0, 1.0, f32::NAN, 0.0]]).unwrap_err();
        assert_eq!(error, "step 1: the scores contain NaN");
    }
}
