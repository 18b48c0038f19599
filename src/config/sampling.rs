//! The `sample` and `aggregate` stage sections, and their static checks.
//!
//! docs/sampling.md documents every key. New optional keys are left out of
//! the serialized settings when absent, so a pipeline that does not use
//! them keeps its `stochflow.config_sha256`.

use serde::{Deserialize, Serialize};

use super::load::ConfigProblem;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// The distribution drawn from.
    #[serde(default, skip_serializing_if = "Distribution::is_categorical")]
    pub distribution: Distribution,
    /// The column holding the distribution's parameters: class scores,
    /// Bernoulli scores, the Gaussian mean, or the values to round.
    pub column: String,
    #[serde(default)]
    pub from: SampleFrom,
    /// Softmax temperature; 0 takes the most likely class.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Keep only the `k` most likely classes.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "super::count::optional_count")]
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely classes whose mass reaches `p`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Keep the classes whose probability is at least `m` times the largest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    /// Axis of the class scores in each row's tensor; negative counts from
    /// the end, the last axis when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub axis: Option<i64>,
    /// Gaussian: column of log-variances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_variance: Option<String>,
    /// Gaussian: column of standard deviations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<String>,
    /// Stochastic rounding: the grid spacing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<f64>,
    /// Samples drawn per record; more than one adds a `sample` index column
    /// and repeats the record's other columns.
    #[serde(default = "default_samples", deserialize_with = "super::count::count")]
    pub samples: u32,
    /// Column the draw goes to; the default depends on the distribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl SampleConfig {
    /// Returns the output column: the configured one, else the distribution's default.
    pub fn output(&self) -> &str {
        match (&self.output, self.distribution) {
            (Some(output), _) => output,
            (None, Distribution::Categorical) => "class",
            (None, Distribution::Bernoulli | Distribution::Gaussian) => "draw",
            (None, Distribution::StochasticRounding) => &self.column,
        }
    }

    /// Returns the grid spacing of stochastic rounding, 1 when not set.
    pub fn step(&self) -> f64 {
        self.step.unwrap_or(1.0)
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    #[default]
    Categorical,
    Bernoulli,
    Gaussian,
    StochasticRounding,
}

impl Distribution {
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Categorical => "categorical",
            Distribution::Bernoulli => "bernoulli",
            Distribution::Gaussian => "gaussian",
            Distribution::StochasticRounding => "stochastic_rounding",
        }
    }

    fn is_categorical(&self) -> bool {
        *self == Distribution::Categorical
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SampleFrom {
    #[default]
    Logits,
    Probabilities,
}

fn default_temperature() -> f64 {
    1.0
}

fn default_samples() -> u32 {
    1
}

/// The `aggregate` stage: one row per record from the record's samples.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// Columns copied from each record's first sample, after the key column.
    #[serde(default)]
    pub keep: Vec<String>,
    /// The summaries to compute, in output column order.
    pub aggregates: Vec<AggregateOp>,
}

/// One summary of a record's samples.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AggregateOp {
    /// Elementwise mean of a float column.
    Mean(MomentAggregate),
    /// Elementwise standard deviation (divisor n) of a float column.
    Std(MomentAggregate),
    /// Entropy of the mean probability vector.
    PredictiveEntropy(EntropyAggregate),
    /// Mean of the per-sample entropies.
    ExpectedEntropy(EntropyAggregate),
    /// Predictive minus expected entropy.
    MutualInformation(EntropyAggregate),
    /// Most frequent class and the fraction of samples that chose it.
    MajorityVote(VoteAggregate),
}

impl AggregateOp {
    pub fn name(&self) -> &'static str {
        match self {
            AggregateOp::Mean(_) => "mean",
            AggregateOp::Std(_) => "std",
            AggregateOp::PredictiveEntropy(_) => "predictive_entropy",
            AggregateOp::ExpectedEntropy(_) => "expected_entropy",
            AggregateOp::MutualInformation(_) => "mutual_information",
            AggregateOp::MajorityVote(_) => "majority_vote",
        }
    }

    /// Returns the input column.
    pub fn column(&self) -> &str {
        match self {
            AggregateOp::Mean(c) | AggregateOp::Std(c) => &c.column,
            AggregateOp::PredictiveEntropy(c) | AggregateOp::ExpectedEntropy(c) | AggregateOp::MutualInformation(c) => {
                &c.column
            }
            AggregateOp::MajorityVote(c) => &c.column,
        }
    }

    /// Returns the output columns, each with the key that names it.
    pub fn outputs(&self) -> Vec<(&'static str, String)> {
        let column = self.column();
        match self {
            AggregateOp::Mean(c) | AggregateOp::Std(c) => {
                vec![("output", c.output.clone().unwrap_or_else(|| format!("{column}_{}", self.name())))]
            }
            AggregateOp::PredictiveEntropy(c) | AggregateOp::ExpectedEntropy(c) | AggregateOp::MutualInformation(c) => {
                vec![("output", c.output.clone().unwrap_or_else(|| self.name().to_string()))]
            }
            AggregateOp::MajorityVote(c) => vec![
                ("output", c.output.clone().unwrap_or_else(|| format!("{column}_vote"))),
                ("agreement", c.agreement.clone().unwrap_or_else(|| format!("{column}_agreement"))),
            ],
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MomentAggregate {
    pub column: String,
    #[serde(default)]
    pub output: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyAggregate {
    /// Column of class scores, one vector per row.
    pub column: String,
    #[serde(default)]
    pub from: SampleFrom,
    #[serde(default)]
    pub output: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VoteAggregate {
    /// Int32 column of class indices.
    pub column: String,
    #[serde(default)]
    pub output: Option<String>,
    /// Column of the winner's share of the votes.
    #[serde(default)]
    pub agreement: Option<String>,
}

/// Checks a `sample` section; `at` turns a key into its YAML path.
pub fn check_sample(c: &SampleConfig, at: &dyn Fn(&str) -> String) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    let mut push = |key: &str, message: String| problems.push(ConfigProblem::new(at(key), message));
    if !(c.temperature >= 0.0 && c.temperature.is_finite()) {
        push("temperature", format!("must be zero or positive, found {}", c.temperature));
    }
    if c.samples == 0 {
        push("samples", "must be at least 1, found 0".into());
    }
    if c.top_k == Some(0) {
        push("top_k", "must be at least 1, found 0; leave `top_k` out to keep every class".into());
    }
    if let Some(p) = c.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        push("top_p", format!("must be above 0 and at most 1, found {p}"));
    }
    if let Some(m) = c.min_p
        && !(0.0..=1.0).contains(&m)
    {
        push("min_p", format!("must be between 0 and 1, found {m}"));
    }
    if let Some(step) = c.step
        && !(step > 0.0 && step.is_finite())
    {
        push("step", format!("must be positive and finite, found {step}"));
    }

    // Keys that belong to another distribution are errors rather than
    // silently ignored settings.
    let distribution = c.distribution;
    let mut foreign = |key: &str, set: bool, owner: &str| {
        if set {
            push(key, format!("applies to distribution {owner} only, not {}", distribution.name()));
        }
    };
    let categorical = distribution == Distribution::Categorical;
    if !categorical {
        foreign("temperature", c.temperature != 1.0, "categorical");
        foreign("top_k", c.top_k.is_some(), "categorical");
        foreign("top_p", c.top_p.is_some(), "categorical");
        foreign("min_p", c.min_p.is_some(), "categorical");
        foreign("axis", c.axis.is_some(), "categorical");
    }
    if !matches!(distribution, Distribution::Categorical | Distribution::Bernoulli) {
        foreign("from", c.from != SampleFrom::Logits, "categorical or bernoulli");
    }
    if distribution != Distribution::Gaussian {
        foreign("log_variance", c.log_variance.is_some(), "gaussian");
        foreign("std", c.std.is_some(), "gaussian");
    }
    if distribution != Distribution::StochasticRounding {
        foreign("step", c.step.is_some(), "stochastic_rounding");
    }
    if distribution == Distribution::Gaussian && c.log_variance.is_some() == c.std.is_some() {
        push("log_variance", "a gaussian needs exactly one of `log_variance` and `std` (column names)".into());
    }
    problems
}

/// Checks an `aggregate` section; `at` turns a key into its YAML path.
pub fn check_aggregate(c: &AggregateConfig, at: &dyn Fn(&str) -> String) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    if c.aggregates.is_empty() {
        problems.push(ConfigProblem::new(
            at("aggregates"),
            "list at least one aggregate, such as `{op: majority_vote, column: class}`",
        ));
    }
    let mut seen: Vec<String> = c.keep.clone();
    for (i, op) in c.aggregates.iter().enumerate() {
        for (key, output) in op.outputs() {
            if seen.contains(&output) {
                problems.push(ConfigProblem::new(
                    at(&format!("aggregates[{i}].{key}")),
                    format!("column {output:?} is written twice; give this aggregate another `{key}` name"),
                ));
            }
            seen.push(output);
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(yaml: &str) -> SampleConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn paths(problems: &[ConfigProblem]) -> Vec<String> {
        problems.iter().map(|p| p.path.clone()).collect()
    }

    #[test]
    fn foreign_keys_are_reported() {
        let c = sample("{distribution: gaussian, column: mu, std: sigma, top_k: 3, step: 0.5}");
        assert_eq!(paths(&check_sample(&c, &|k| k.to_string())), ["top_k", "step"]);
    }

    #[test]
    fn gaussian_needs_one_spread_column() {
        let c = sample("{distribution: gaussian, column: mu}");
        assert_eq!(paths(&check_sample(&c, &|k| k.to_string())), ["log_variance"]);
    }

    #[test]
    fn truncation_ranges_are_checked() {
        let c = sample("{column: logits, top_k: 0, top_p: 0.0, min_p: 1.5}");
        assert_eq!(paths(&check_sample(&c, &|k| k.to_string())), ["top_k", "top_p", "min_p"]);
    }

    #[test]
    fn duplicate_aggregate_outputs_are_reported() {
        let c: AggregateConfig = serde_yaml_ng::from_str(
            "{keep: [label], aggregates: [{op: mean, column: p, output: label}, {op: majority_vote, column: class}]}",
        )
        .unwrap();
        assert_eq!(paths(&check_aggregate(&c, &|k| k.to_string())), ["aggregates[0].output"]);
    }

    #[test]
    fn unknown_aggregate_key_is_rejected() {
        let parsed: Result<AggregateConfig, _> =
            serde_yaml_ng::from_str("{aggregates: [{op: mean, column: p, outptu: q}]}");
        assert!(parsed.is_err());
    }
}
