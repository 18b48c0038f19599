//! The `latent` source section: records drawn from a prior instead of read
//! from a file, for generator pipelines. Also the checks of this section
//! that need neither data nor models.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::load::ConfigProblem;
use super::{SourceConfig, StageConfig};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LatentSourceConfig {
    /// Keys the source's random streams, like a stage name. `source` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Records to draw; with `interpolate`, paths to draw, each giving `steps` records.
    #[serde(deserialize_with = "super::count::count")]
    pub records: u64,
    /// Per-record shape of the latent tensor.
    pub shape: Vec<usize>,
    /// Name of the latent tensor column.
    #[serde(default = "default_latent_column")]
    pub column: String,
    /// A mapping with `kind` and parameters, or a kind alone (`prior: normal`).
    #[serde(default, deserialize_with = "prior_or_kind")]
    pub prior: PriorConfig,
    /// Constant float32 tensor columns added to every record, by column name.
    #[serde(default)]
    pub conditioning: BTreeMap<String, ConditioningConfig>,
    /// Interpolate between two random endpoints instead of drawing each record.
    #[serde(default)]
    pub interpolate: Option<InterpolateConfig>,
    #[serde(default = "default_latent_batch", deserialize_with = "super::count::count")]
    pub batch_size: usize,
}

impl LatentSourceConfig {
    /// Name that keys the source's random streams.
    pub fn stream_name(&self) -> &str {
        self.name.as_deref().unwrap_or(DEFAULT_SOURCE_NAME)
    }
}

/// Stream name of a latent source without a `name`.
pub const DEFAULT_SOURCE_NAME: &str = "source";

fn default_latent_column() -> String {
    String::from("z")
}

fn default_latent_batch() -> usize {
    256
}

/// The distribution each latent value is drawn from, independently.
///
/// `kind` is read as text and checked by [`PriorConfig::parse`], rather than
/// as a tagged enum: serde reports an unknown variant nested this deep
/// without its line, and the check names the line of `kind`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriorConfig {
    /// `normal` (the default), `uniform` or `truncated_normal`.
    #[serde(default = "default_prior_kind")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high: Option<f64>,
}

impl Default for PriorConfig {
    fn default() -> Self {
        Self { kind: default_prior_kind(), mean: None, std: None, low: None, high: None }
    }
}

fn default_prior_kind() -> String {
    String::from("normal")
}

/// Reads `prior` as a mapping, or as a kind alone with default parameters.
fn prior_or_kind<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<PriorConfig, D::Error> {
    struct PriorVisitor;

    impl<'de> serde::de::Visitor<'de> for PriorVisitor {
        type Value = PriorConfig;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a prior kind (normal, uniform or truncated_normal) or a mapping with `kind` and parameters")
        }

        fn visit_str<E: serde::de::Error>(self, kind: &str) -> Result<PriorConfig, E> {
            Ok(PriorConfig { kind: kind.to_string(), ..PriorConfig::default() })
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<PriorConfig, A::Error> {
            PriorConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }

    deserializer.deserialize_any(PriorVisitor)
}

/// A prior with its parameters, defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PriorKind {
    Normal {
        mean: f64,
        std: f64,
    },
    Uniform {
        low: f64,
        high: f64,
    },
    /// The normal distribution restricted to `[low, high]` and renormalized.
    TruncatedNormal {
        mean: f64,
        std: f64,
        low: f64,
        high: f64,
    },
}

impl PriorConfig {
    /// Resolves the kind and its parameters, or lists each key that is
    /// missing, unknown or not used by the kind, as (key, message) pairs.
    pub fn parse(&self) -> Result<PriorKind, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let kind = self.kind.as_str();
        let (uses_normal, uses_bounds) = match kind {
            "normal" => (true, false),
            "uniform" => (false, true),
            "truncated_normal" => (true, true),
            _ => {
                let message = format!("unknown prior {kind:?}; use normal, uniform or truncated_normal");
                return Err(vec![("kind", message)]);
            }
        };
        let unused = [("mean", self.mean, uses_normal), ("std", self.std, uses_normal)];
        let bounds = [("low", self.low, uses_bounds), ("high", self.high, uses_bounds)];
        for (key, value, used) in unused.into_iter().chain(bounds) {
            if value.is_some() && !used {
                let message = if kind == "normal" {
                    // `kind` defaults to normal, so a forgotten kind ends up here.
                    String::from(
                        "does not apply to a normal prior (the kind when `kind` is left out); remove it, or set `kind: uniform` or `kind: truncated_normal`",
                    )
                } else {
                    format!("does not apply to a {kind} prior; remove it")
                };
                problems.push((key, message));
            }
            if value.is_none() && used && (key == "low" || key == "high") {
                problems.push((key, format!("is required for a {kind} prior")));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let (mean, std) = (self.mean.unwrap_or(0.0), self.std.unwrap_or(1.0));
        let (low, high) = (self.low.unwrap_or_default(), self.high.unwrap_or_default());
        Ok(match kind {
            "normal" => PriorKind::Normal { mean, std },
            "uniform" => PriorKind::Uniform { low, high },
            _ => PriorKind::TruncatedNormal { mean, std, low, high },
        })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConditioningConfig {
    pub values: Vec<f64>,
    /// Per-record shape; `[len(values)]` when absent.
    #[serde(default)]
    pub shape: Option<Vec<usize>>,
}

impl ConditioningConfig {
    pub fn shape(&self) -> Vec<usize> {
        self.shape.clone().unwrap_or_else(|| vec![self.values.len()])
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InterpolateConfig {
    /// Records per path, both endpoints included.
    #[serde(deserialize_with = "super::count::count_from_two")]
    pub steps: u32,
    #[serde(default)]
    pub method: InterpolationMethod,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationMethod {
    #[default]
    Linear,
    /// Spherical linear interpolation (slerp).
    Spherical,
}

/// Columns the latent source adds for interpolation paths.
pub const PATH_COLUMN: &str = "path_index";
pub const STEP_COLUMN: &str = "step";
pub const FRACTION_COLUMN: &str = "t";

/// Checks a `latent` source section; no problems for other sources.
pub fn check(source: &SourceConfig, stages: &[Option<&StageConfig>]) -> Vec<ConfigProblem> {
    let SourceConfig::Latent(source) = source else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    let mut push = |path: &str, message: String| problems.push(ConfigProblem::new(format!("source.{path}"), message));

    // Records are keyed by an int64 ordinal.
    let ordinals = i64::MAX as u64;
    if source.records == 0 {
        push("records", String::from("must be at least 1, found 0"));
    } else if source.records > ordinals {
        push("records", format!("must be at most {ordinals}, the largest int64 ordinal, found {}", source.records));
    }
    if source.shape.is_empty() || source.shape.contains(&0) {
        push("shape", format!("must be a non-empty list of positive sizes, found {:?}", source.shape));
    }
    check_prior(&source.prior, &mut push);
    if let Some(interpolate) = &source.interpolate {
        if interpolate.steps < 2 {
            push(
                "interpolate.steps",
                format!("must be at least 2 (both endpoints are records), found {}", interpolate.steps),
            );
        } else if source.records <= ordinals
            && u64::from(interpolate.steps).checked_mul(source.records).is_none_or(|total| total > ordinals)
        {
            push(
                "interpolate.steps",
                format!(
                    "gives {} paths of {} records, more than {ordinals}, the largest int64 ordinal; draw fewer paths or steps",
                    source.records, interpolate.steps
                ),
            );
        }
    }

    let mut reserved = vec![crate::source::ORDINAL_COLUMN];
    if source.interpolate.is_some() {
        reserved.extend([PATH_COLUMN, STEP_COLUMN, FRACTION_COLUMN]);
    }
    if reserved.contains(&source.column.as_str()) {
        push("column", format!("{:?} is a column the source adds itself; choose another name", source.column));
    }
    for (name, conditioning) in &source.conditioning {
        if reserved.contains(&name.as_str()) || *name == source.column {
            push(
                &format!("conditioning.{name}"),
                format!("column {name:?} already exists in the source's records; choose another name"),
            );
        }
        let shape = conditioning.shape();
        let expected: usize = shape.iter().product();
        if shape.is_empty() || shape.contains(&0) {
            push(
                &format!("conditioning.{name}.shape"),
                format!("must be a non-empty list of positive sizes, found {shape:?}"),
            );
        } else if expected != conditioning.values.len() {
            push(
                &format!("conditioning.{name}.values"),
                format!("shape {shape:?} needs {expected} values, found {}", conditioning.values.len()),
            );
        }
        if conditioning.values.iter().any(|v| !v.is_finite()) {
            push(&format!("conditioning.{name}.values"), String::from("every value must be a finite number"));
        }
    }

    let stream_name = source.stream_name();
    for (index, stage) in stages.iter().enumerate() {
        if stage.is_some_and(|stage| stage.name() == stream_name) {
            problems.push(ConfigProblem::new(
                format!("stages[{index}].name"),
                format!(
                    "{stream_name:?} is the latent source's stream name, and sharing it would correlate this stage's draws with the source's; rename the stage or set `source.name`"
                ),
            ));
        }
    }
    problems
}

fn check_prior(prior: &PriorConfig, push: &mut impl FnMut(&str, String)) {
    match prior.parse() {
        Ok(PriorKind::Normal { mean, std }) => check_normal(mean, std, push),
        Ok(PriorKind::Uniform { low, high }) => check_bounds(low, high, true, push),
        Ok(PriorKind::TruncatedNormal { mean, std, low, high }) => {
            check_normal(mean, std, push);
            check_bounds(low, high, false, push);
        }
        Err(problems) => {
            for (key, message) in problems {
                push(&format!("prior.{key}"), message);
            }
        }
    }
}

/// The largest magnitude of a finite float32, the type latent values are
/// stored as.
const FLOAT32_MAX: f64 = f32::MAX as f64;
/// The smallest positive normal float32.
const FLOAT32_MIN_POSITIVE: f64 = f32::MIN_POSITIVE as f64;

/// Formats a number for a message: in exponent form when it is very large
/// or very small, as Rust writes it otherwise.
fn number(value: f64) -> String {
    if value != 0.0 && !(1e-4..1e16).contains(&value.abs()) { format!("{value:e}") } else { value.to_string() }
}

fn check_normal(mean: f64, std: f64, push: &mut impl FnMut(&str, String)) {
    if !mean.is_finite() {
        push("prior.mean", format!("must be a finite number, found {mean}"));
    } else if mean.abs() > FLOAT32_MAX {
        push("prior.mean", format!("must be within the float32 range of the values (±3.4e38), found {}", number(mean)));
    }
    if !(std > 0.0 && std.is_finite()) {
        push("prior.std", format!("must be positive and finite, found {std}"));
    } else if !(FLOAT32_MIN_POSITIVE..=FLOAT32_MAX).contains(&std) {
        push(
            "prior.std",
            format!(
                "must be between 1.18e-38 and 3.4e38, the range of positive normal float32 numbers, found {}",
                number(std)
            ),
        );
    }
}

/// Checks `low < high`; a uniform prior needs finite bounds, a truncated
/// normal accepts `-.inf` or `.inf` for an open side. Finite bounds must be
/// float32 numbers, or rounding could not keep the values inside them.
fn check_bounds(low: f64, high: f64, finite: bool, push: &mut impl FnMut(&str, String)) {
    let beyond_float32 = |bound: f64| bound.is_finite() && bound.abs() > FLOAT32_MAX;
    if low.is_nan() || high.is_nan() {
        push("prior.low", String::from("bounds must be numbers, found NaN"));
    } else if finite && !(low.is_finite() && high.is_finite()) {
        push("prior.low", format!("a uniform prior needs finite bounds, found low {low} and high {high}"));
    } else if beyond_float32(low) || beyond_float32(high) {
        let key = if beyond_float32(low) { "prior.low" } else { "prior.high" };
        push(
            key,
            format!(
                "bounds must be within the float32 range of the values (±3.4e38), found low {} and high {}",
                number(low),
                number(high)
            ),
        );
    } else if low >= high {
        push("prior.high", format!("must be above `low`, found low {low} and high {high}"));
    }
}
