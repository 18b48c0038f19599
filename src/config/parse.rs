//! Parsing the YAML text of a pipeline file.
//!
//! The file is read in two steps so that every error names its section and
//! line: first the top level, with each section kept as a YAML value, then
//! each section on its own, tracking the path of the failing key. serde
//! alone cannot do this for the tagged `kind` sections, whose errors lose
//! their position. All section errors are collected, not just the first.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::load::ConfigProblem;
use super::{PipelineConfig, RuntimeConfig};

/// The top level, with sections still unparsed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopLevel {
    seed: Value,
    source: Value,
    #[serde(default)]
    stages: Vec<Value>,
    sink: Value,
    #[serde(default)]
    runtime: Option<Value>,
}

/// Parses a pipeline file. `Err(Ok(message))` is a syntax or top-level
/// error that serde locates itself; `Err(Err(problems))` lists section
/// errors by path.
pub fn parse(text: &str) -> Result<PipelineConfig, Result<String, Vec<ConfigProblem>>> {
    let top: TopLevel = serde_yaml_ng::from_str(text).map_err(|err| Ok(plain_types(&err.to_string())))?;
    let mut problems = Vec::new();

    let seed = section::<u64>("seed", top.seed, &mut problems);
    let source = section("source", top.source, &mut problems);
    let stages: Vec<_> =
        top.stages.into_iter().enumerate().map(|(i, v)| section(&format!("stages[{i}]"), v, &mut problems)).collect();
    let sink = section("sink", top.sink, &mut problems);
    let runtime = match top.runtime {
        Some(value) => section::<RuntimeConfig>("runtime", value, &mut problems),
        None => Some(RuntimeConfig::default()),
    };

    match (seed, source, stages.into_iter().collect::<Option<Vec<_>>>(), sink, runtime) {
        (Some(seed), Some(source), Some(stages), Some(sink), Some(runtime)) if problems.is_empty() => {
            Ok(PipelineConfig { seed, source, stages, sink, runtime })
        }
        _ => Err(Err(problems)),
    }
}

/// Deserializes one section; on failure records a problem at the failing
/// key's path.
fn section<T: DeserializeOwned>(prefix: &str, value: Value, problems: &mut Vec<ConfigProblem>) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(parsed) => Some(parsed),
        Err(err) => {
            let message = plain_types(&err.inner().to_string());
            let mut path = prefix.to_string();
            let inner = err.path().to_string();
            if !inner.is_empty() && inner != "." && inner != "?" {
                if !inner.starts_with('[') {
                    path.push('.');
                }
                path.push_str(&inner);
            }
            // An unknown key is reported at the mapping that has it; point
            // at the key itself.
            if let Some(key) = unknown_field(&message) {
                if !path.ends_with(&format!(".{key}")) {
                    path = format!("{path}.{key}");
                }
            } else if path == prefix
                && !message.starts_with("missing field")
                && let Some(key) = culprit::<T>(&value, &message)
            {
                path = format!("{path}.{key}");
            }
            problems.push(ConfigProblem::new(path, message));
            None
        }
    }
}

/// Finds the key of a mapping that causes `message`, for errors that serde
/// reports without a path (values inside a `kind`-tagged section): the
/// first key whose removal changes the error.
fn culprit<T: DeserializeOwned>(value: &Value, message: &str) -> Option<String> {
    let mapping = value.as_mapping()?;
    for key in mapping.keys() {
        let Some(name) = key.as_str().filter(|name| *name != "kind") else { continue };
        let mut without = mapping.clone();
        without.remove(key);
        match serde_yaml_ng::from_value::<T>(Value::Mapping(without)) {
            Ok(_) => return Some(name.to_string()),
            Err(err) if plain_types(&err.to_string()) != message => return Some(name.to_string()),
            Err(_) => {}
        }
    }
    None
}

/// Returns the key of an "unknown field `key`" message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// Rewrites Rust type names in serde messages as plain words.
fn plain_types(message: &str) -> String {
    let mut text = message.to_string();
    for (rust, plain) in [
        ("expected usize", "expected a non-negative integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        (" as u128", ""),
        (" as i128", ""),
    ] {
        text = text.replace(rust, plain);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match parse(text) {
            Err(Err(problems)) => problems,
            other => panic!("expected section problems, got {:?}", other.map(|_| ())),
        }
    }

    const HEADER: &str = "seed: 1\nsource: {kind: npy, path: x.npy}\nsink: {kind: arrow_file, path: y.arrow}\n";

    #[test]
    fn unknown_stage_key_names_stage_and_key() {
        let found = problems(&format!(
            "{HEADER}stages:\n  - {{kind: add_noise, column: x, std: 1}}\n  - {{kind: sample, column: y, temprature: 2}}\n"
        ));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "stages[1].temprature");
        assert!(found[0].message.starts_with("unknown field `temprature`"), "{}", found[0].message);
    }

    #[test]
    fn wrong_type_names_key_in_plain_words() {
        let found = problems(&format!(
            "{HEADER}stages:\n  - {{kind: infer, model: m.onnx, inputs: {{x: x}}, sessions: two}}\n"
        ));
        assert_eq!(found[0].path, "stages[0].sessions");
        assert!(found[0].message.contains("expected a non-negative integer"), "{}", found[0].message);
    }

    #[test]
    fn missing_key_points_at_its_stage() {
        let found = problems(&format!("{HEADER}stages:\n  - {{kind: add_noise, column: x}}\n  - {{kind: sample}}\n"));
        let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["stages[1]"]);
        assert!(found[0].message.starts_with("missing field `column`"), "{}", found[0].message);
    }

    #[test]
    fn every_section_error_is_collected() {
        let text = "seed: -1\nsource: {kind: npy, path: x.npy, batch_size: -5}\nsink: {kind: arrow_file, path: y.arrow, compresion: lz4}\n";
        let paths: Vec<String> = problems(text).into_iter().map(|p| p.path).collect();
        assert_eq!(paths, ["seed", "source.batch_size", "sink.compresion"]);
    }
}
