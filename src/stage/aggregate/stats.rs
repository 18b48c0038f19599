//! The summaries of one record's samples, as pure functions.
//!
//! Entropies use the natural logarithm, so they are in nats, and treat
//! `0 ln 0` as 0. Sums are taken in f64 and stored as f32.

use crate::config::SampleFrom;
use crate::stage::sample::weights;

/// Elementwise mean and standard deviation (divisor n, so one sample has a
/// spread of 0) of equally long rows. NaN propagates.
pub fn mean_std(rows: &[&[f32]]) -> (Vec<f32>, Vec<f32>) {
    let n = rows.len() as f64;
    let len = rows.first().map_or(0, |row| row.len());
    let mut means = Vec::with_capacity(len);
    let mut stds = Vec::with_capacity(len);
    for i in 0..len {
        let mean = rows.iter().map(|row| f64::from(row[i])).sum::<f64>() / n;
        let variance = rows.iter().map(|row| (f64::from(row[i]) - mean).powi(2)).sum::<f64>() / n;
        means.push(mean as f32);
        stds.push(variance.sqrt() as f32);
    }
    (means, stds)
}

/// Normalized class probabilities of one vector of scores: softmax of
/// logits, or probabilities divided by their sum.
pub fn probabilities(scores: &[f32], from: SampleFrom) -> Result<Vec<f64>, String> {
    let mut p = weights(scores, from, 1.0)?;
    let total: f64 = p.iter().sum();
    for value in &mut p {
        *value /= total;
    }
    Ok(p)
}

/// Shannon entropy in nats.
pub fn entropy(p: &[f64]) -> f64 {
    -p.iter().filter(|&&x| x > 0.0).map(|&x| x * x.ln()).sum::<f64>()
}

/// The three uncertainty measures of one record's probability vectors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Uncertainty {
    /// Entropy of the mean probability vector (total uncertainty).
    pub predictive: f64,
    /// Mean of the samples' entropies (aleatoric part).
    pub expected: f64,
    /// Their difference (epistemic part), never below 0.
    pub mutual_information: f64,
}

pub fn uncertainty(samples: &[Vec<f64>]) -> Uncertainty {
    let n = samples.len() as f64;
    let classes = samples.first().map_or(0, Vec::len);
    let mean: Vec<f64> = (0..classes).map(|c| samples.iter().map(|p| p[c]).sum::<f64>() / n).collect();
    let predictive = entropy(&mean);
    let expected = samples.iter().map(|p| entropy(p)).sum::<f64>() / n;
    // Jensen's inequality makes the difference non-negative; rounding can
    // leave it a hair below 0 when the samples agree.
    Uncertainty { predictive, expected, mutual_information: (predictive - expected).max(0.0) }
}

/// Returns the most frequent class, the lower index on ties, and the
/// fraction of votes it got.
pub fn majority_vote(classes: &[i32]) -> (i32, f64) {
    let mut sorted = classes.to_vec();
    sorted.sort_unstable();
    let (mut best, mut best_count) = (sorted[0], 0);
    let mut start = 0;
    while start < sorted.len() {
        let end = start + sorted[start..].iter().take_while(|&&c| c == sorted[start]).count();
        // Classes come in ascending order, so only a strictly larger count
        // replaces the winner.
        if end - start > best_count {
            best = sorted[start];
            best_count = end - start;
        }
        start = end;
    }
    (best, best_count as f64 / classes.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn entropy_of_fair_coin_is_ln2() {
        assert!(close(entropy(&[0.5, 0.5]), std::f64::consts::LN_2));
        assert_eq!(entropy(&[1.0, 0.0]), 0.0);
    }

    #[test]
    fn identical_samples_have_no_mutual_information() {
        let p = vec![0.2, 0.3, 0.5];
        let u = uncertainty(&[p.clone(), p.clone(), p.clone()]);
        assert_eq!(u.mutual_information, 0.0);
        assert!(close(u.predictive, u.expected));
    }

    #[test]
    fn confident_disagreement_is_epistemic() {
        // Two certain samples that disagree: H(mean) = ln 2, E[H] = 0.
        let u = uncertainty(&[vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert!(close(u.predictive, std::f64::consts::LN_2));
        assert_eq!(u.expected, 0.0);
        assert!(close(u.mutual_information, std::f64::consts::LN_2));
    }

    #[test]
    fn majority_vote_ties_take_lower_class() {
        assert_eq!(majority_vote(&[3, 1, 3, 1, 2]), (1, 0.4));
        assert_eq!(majority_vote(&[7, 7, 7, 2]), (7, 0.75));
        assert_eq!(majority_vote(&[-1, 4]), (-1, 0.5));
    }

    #[test]
    fn mean_std_are_elementwise() {
        let (mean, std) = mean_std(&[&[1.0, 10.0], &[3.0, 10.0]]);
        assert_eq!(mean, [2.0, 10.0]);
        assert_eq!(std, [1.0, 0.0]);
    }

    #[test]
    fn logits_become_softmax() {
        let p = probabilities(&[0.0, 0.0], SampleFrom::Logits).unwrap();
        assert_eq!(p, [0.5, 0.5]);
        assert!(probabilities(&[0.0, -1.0], SampleFrom::Probabilities).is_err());
    }
}
