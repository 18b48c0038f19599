//! Parsing the YAML text of a pipeline file.
//!
//! The file is read in two steps so that every error names its section and
//! line: first the top level, with each section kept as a YAML value, then
//! each section on its own, tracking the path of the failing key. serde
//! alone cannot do this for the tagged `kind` sections, whose errors lose
//! their position. Errors are collected from every section, and up to
//! [`PROBLEMS_PER_SECTION`] from each.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::load::ConfigProblem;
use super::{DaemonConfig, PipelineConfig, RuntimeConfig, SinkConfig, SourceConfig, StageConfig};

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
    #[serde(default)]
    daemon: Option<Value>,
}

/// An error that stops a pipeline file from being read.
pub enum ParseError {
    /// A syntax or top-level error that serde locates itself, at a line
    /// and column where it gives one.
    Syntax { position: Option<(usize, usize)>, message: String },
    /// Problems of sections, by path, and the sections read without any.
    Sections { problems: Vec<ConfigProblem>, parsed: Box<Partial> },
}

/// The sections of a pipeline file that were read without problems, when
/// others had some. Stages keep their indices.
#[derive(Default)]
pub struct Partial {
    pub source: Option<SourceConfig>,
    pub stages: Vec<Option<StageConfig>>,
    pub sink: Option<SinkConfig>,
    pub runtime: Option<RuntimeConfig>,
}

/// Parses a pipeline file.
pub fn parse(text: &str) -> Result<PipelineConfig, ParseError> {
    // serde gives no position for an unknown top-level key, so those are
    // found here and reported by path, which the loader locates.
    let unknown = unknown_top_level_keys(text);
    if !unknown.is_empty() {
        return Err(ParseError::Sections { problems: unknown, parsed: Box::default() });
    }
    let top: TopLevel = serde_yaml_ng::from_str(text).map_err(|err| {
        let (position, message) = syntax_message(&err);
        ParseError::Syntax { position, message }
    })?;
    let mut problems = Vec::new();

    let seed = section::<u64>("seed", top.seed, &[], &mut problems);
    let source = section("source", top.source, &[], &mut problems);
    let stages: Vec<Option<StageConfig>> = top
        .stages
        .into_iter()
        .enumerate()
        .map(|(i, v)| section(&format!("stages[{i}]"), v, &[], &mut problems))
        .collect();
    let sink = section("sink", top.sink, &[], &mut problems);
    let runtime = match top.runtime {
        Some(value) => section::<RuntimeConfig>("runtime", value, &[], &mut problems),
        None => Some(RuntimeConfig::default()),
    };
    let daemon = match top.daemon {
        Some(value) => section::<DaemonConfig>("daemon", value, DAEMON_NULL_KEYS, &mut problems),
        None => Some(DaemonConfig::default()),
    };

    if !problems.is_empty() {
        return Err(ParseError::Sections { problems, parsed: Box::new(Partial { source, stages, sink, runtime }) });
    }
    match (seed, source, stages.into_iter().collect::<Option<Vec<_>>>(), sink, runtime, daemon) {
        (Some(seed), Some(source), Some(stages), Some(sink), Some(runtime), Some(daemon)) => {
            Ok(PipelineConfig { seed, source, stages, sink, runtime, daemon })
        }
        _ => unreachable!("a section that fails to parse records a problem"),
    }
}

/// Keys that may appear at the top of a pipeline file.
const TOP_LEVEL_KEYS: [&str; 6] = ["seed", "source", "stages", "sink", "runtime", "daemon"];

/// Returns a problem for each top-level key that is not a pipeline section.
fn unknown_top_level_keys(text: &str) -> Vec<ConfigProblem> {
    let Ok(Value::Mapping(map)) = serde_yaml_ng::from_str::<Value>(text) else { return Vec::new() };
    let expected = TOP_LEVEL_KEYS.map(|key| format!("`{key}`")).join(", ");
    map.keys()
        .filter_map(|key| key.as_str())
        .filter(|key| !TOP_LEVEL_KEYS.contains(key))
        .map(|key| ConfigProblem::new(key.to_string(), format!("unknown field `{key}`, expected one of {expected}")))
        .collect()
}

/// Most problems reported for one section. After each, the failing key is
/// removed and the section parsed again, so one run lists several.
const PROBLEMS_PER_SECTION: usize = 10;

/// Keys of the `daemon` section whose documented value may be `null`.
const DAEMON_NULL_KEYS: &[&str] = &["http"];

/// Deserializes one section; on failure records a problem at each failing
/// key's path. A key given without a value, which serde takes as absent
/// for an optional setting, is a problem too, unless it is one of
/// `null_keys`, the keys directly in the section whose documented value may
/// be `null`.
fn section<T: DeserializeOwned>(
    prefix: &str,
    value: Value,
    null_keys: &[&str],
    problems: &mut Vec<ConfigProblem>,
) -> Option<T> {
    let mut empty = Vec::new();
    empty_values(&value, &mut Vec::new(), &mut empty);
    let original = value.clone();
    let first = problems.len();
    let parsed = parse_section::<T>(prefix, value, problems);
    let reported: Vec<String> = problems[first..].iter().map(|problem| problem.path.clone()).collect();
    let mut empty: Vec<ConfigProblem> = empty
        .into_iter()
        .filter(|trail| !matches!(trail.as_slice(), [Step::Key(key)] if null_keys.contains(&key.as_str())))
        .map(|trail| {
            let (trail, message) = name_setting::<T>(&original, trail, EMPTY_VALUE.to_string());
            ConfigProblem::new(path_of(prefix, &trail), message)
        })
        .filter(|problem| !reported.contains(&problem.path))
        .collect();
    empty.dedup_by(|a, b| a.path == b.path);
    if empty.is_empty() {
        return parsed;
    }
    problems.extend(empty);
    None
}

/// The problem of a key written with nothing after its colon.
const EMPTY_VALUE: &str = "no value given; write a value after the colon, or remove the key if the setting is optional";

/// Collects the trails of mapping entries whose value is empty (`null`).
fn empty_values(value: &Value, trail: &mut Vec<Step>, found: &mut Vec<Vec<Step>>) {
    match value {
        Value::Mapping(mapping) => {
            for (key, child) in mapping {
                let Some(key) = key.as_str() else { continue };
                trail.push(Step::Key(key.to_string()));
                if child.is_null() {
                    found.push(trail.clone());
                } else {
                    empty_values(child, trail, found);
                }
                trail.pop();
            }
        }
        Value::Sequence(items) => {
            for (index, child) in items.iter().enumerate() {
                trail.push(Step::Index(index));
                empty_values(child, trail, found);
                trail.pop();
            }
        }
        _ => {}
    }
}

/// Deserializes one section, recording a problem at each failing key's
/// path.
fn parse_section<T: DeserializeOwned>(prefix: &str, value: Value, problems: &mut Vec<ConfigProblem>) -> Option<T> {
    let mut value = value;
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..PROBLEMS_PER_SECTION {
        let (trail, message) = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(parsed) => return removed.is_empty().then_some(parsed),
            Err(err) => {
                let message = plain_types(&err.inner().to_string());
                let mut trail = failing_trail::<T>(&value, &err, &message);
                let message = name_variants::<T>(&value, &mut trail, message);
                name_setting::<T>(&value, trail, message)
            }
        };
        // A key removed after an earlier problem may be required; its
        // absence is not a problem of the file.
        if removed.iter().any(|key| message.starts_with(&format!("missing field `{key}`"))) {
            return None;
        }
        problems.push(ConfigProblem::new(path_of(prefix, &trail), message));
        // Removing a sequence item would shift the indices of later
        // problems, so the search stops there.
        match trail.split_last() {
            Some((Step::Key(key), parent)) if lookup(&value, parent).is_some() => {
                removed.push(key.clone());
                remove(&mut value, parent, &Step::Key(key.clone()));
            }
            _ => return None,
        }
    }
    None
}

/// Returns the path of a key below a section, such as
/// `stages[1].aggregates[0].op`.
fn path_of(prefix: &str, trail: &[Step]) -> String {
    let mut path = prefix.to_string();
    for step in trail {
        match step {
            Step::Key(key) => path.push_str(&format!(".{key}")),
            Step::Index(index) => path.push_str(&format!("[{index}]")),
        }
    }
    path
}

/// Words the problem of a setting whose value is one of several names and
/// that is given a mapping (`compression: {zstd: 3}`, `from: {}`). serde
/// reports it inside the mapping or as a map of the wrong size, so the
/// trail is searched for such a setting, and the problem is moved to it.
fn name_setting<T: DeserializeOwned>(section: &Value, trail: Vec<Step>, message: String) -> (Vec<Step>, String) {
    for end in 1..=trail.len() {
        let prefix = &trail[..end];
        let (Some(Step::Key(setting)), Some(Value::Mapping(given))) = (prefix.last(), lookup(section, prefix)) else {
            continue;
        };
        let Some(error) = variant_probe::<T>(section, prefix) else { continue };
        let Some((_, names)) = error.split_once("unknown variant `\u{1}`, ") else { continue };
        let names = names.split(" at line ").next().unwrap_or(names);
        let name = match given.iter().collect::<Vec<_>>()[..] {
            [(key, value)] => key.as_str().filter(|key| names.contains(&format!("`{key}`"))).map(|key| (key, value)),
            _ => None,
        };
        let message = match name {
            Some((name, value)) => {
                let mut message = format!("`{setting}` takes a name alone, not a mapping: write `{setting}: {name}`");
                // The zstd level has a key of its own.
                let parent = lookup(section, &prefix[..end - 1]);
                if setting == "compression"
                    && name == "zstd"
                    && let Some(level) = value.as_i64()
                    && parent.is_some_and(|parent| parent.get("compression_level").is_none())
                {
                    message.push_str(&format!(", with the level as `compression_level: {level}`"));
                } else if value.is_mapping() {
                    message.push_str(&format!(", with its settings beside `{setting}`"));
                }
                message
            }
            None => format!("`{setting}` takes a name alone, not a mapping; {names}"),
        };
        return (prefix.to_vec(), message);
    }
    (trail, message)
}

/// Returns the path of the key that a deserialization error (with its
/// `message`) is about.
fn failing_trail<T: DeserializeOwned>(
    value: &Value,
    err: &serde_path_to_error::Error<serde_yaml_ng::Error>,
    message: &str,
) -> Vec<Step> {
    let mut trail = Vec::new();
    for segment in err.path().iter() {
        match segment {
            serde_path_to_error::Segment::Map { key } => trail.push(Step::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => trail.push(Step::Index(*index)),
            _ => {}
        }
    }
    // An error inside a `kind`-tagged section comes without a path. Removing
    // a nested mapping that lacks a key fixes the error, which finds the
    // mapping. A key missing from the section itself stays at the section.
    if trail.is_empty() {
        let found = if message.starts_with("missing field") {
            search::<T>(value, &mut Vec::new(), message)
        } else {
            isolate::<T>(value, message)
        };
        trail = found.unwrap_or_default();
    }
    // An unknown key is reported at the mapping that has it; point at the
    // key itself.
    if let Some(key) = unknown_field(message)
        && !matches!(trail.last(), Some(Step::Key(last)) if last == key)
    {
        trail.push(Step::Key(key.to_string()));
    }
    trail
}

/// Finds the key of a section that an error is about by parsing each key
/// alone (with `kind`), which gives the same error only for that key even
/// when the section has other errors. Inside that key, [`search`] goes on.
fn isolate<T: DeserializeOwned>(section: &Value, message: &str) -> Option<Vec<Step>> {
    let Value::Mapping(mapping) = section else {
        return search::<T>(section, &mut Vec::new(), message);
    };
    for (key, child) in mapping {
        let Some(name) = key.as_str().filter(|name| *name != "kind") else { continue };
        let mut alone = serde_yaml_ng::Mapping::new();
        if let Some(kind) = mapping.get("kind") {
            alone.insert(Value::from("kind"), kind.clone());
        }
        alone.insert(key.clone(), child.clone());
        let alone = Value::Mapping(alone);
        let error = serde_yaml_ng::from_value::<T>(alone.clone()).err().map(|err| plain_types(&err.to_string()));
        if error.as_deref() == Some(message) {
            let mut trail = vec![Step::Key(name.to_string())];
            return Some(search::<T>(&alone, &mut trail, message).unwrap_or(trail));
        }
    }
    search::<T>(section, &mut Vec::new(), message)
}

/// The keys that name the variant of an internally tagged enum.
const TAG_KEYS: [&str; 2] = ["kind", "op"];

fn required_key(step: &Step) -> &str {
    match step {
        Step::Key(key) => key,
        Step::Index(_) => "",
    }
}

/// Finds where in a section an error lies, for errors that serde reports
/// without a path (values inside `kind`-tagged sections), as a trail of
/// steps such as `aggregates`, `0`, `from`. A child is implicated when
/// removing it fixes the error or changes it; a required child, whose
/// removal only reports it missing, is searched inside.
fn search<T: DeserializeOwned>(section: &Value, trail: &mut Vec<Step>, message: &str) -> Option<Vec<Step>> {
    let missing = message.starts_with("missing field");
    let children: Vec<Step> = match lookup(section, trail)? {
        Value::Mapping(mapping) => mapping
            .keys()
            .filter_map(|key| key.as_str())
            .filter(|key| *key != "kind")
            .map(|key| Step::Key(key.to_string()))
            .collect(),
        Value::Sequence(items) => (0..items.len()).map(Step::Index).collect(),
        _ => return None,
    };
    for child in children {
        let mut candidate = section.clone();
        remove(&mut candidate, trail, &child);
        let required = match &child {
            Step::Key(key) => format!("missing field `{key}`"),
            Step::Index(_) => String::new(),
        };
        let outcome = serde_yaml_ng::from_value::<T>(candidate).map_err(|err| plain_types(&err.to_string()));
        // Serde reads every key of a mapping before it reports a missing
        // one, so when removing a required child (other than an enum's
        // tag, which is read first) leaves only that child missing, a bad
        // value lay in the child.
        let bad_required_value = message.starts_with("invalid")
            && !TAG_KEYS.contains(&required_key(&child))
            && outcome.as_ref().is_err_and(|other| other == &required || other.starts_with(&format!("{required} ")));
        let implicated = match &outcome {
            Ok(_) => true,
            Err(other) => !missing && other != message && (!other.starts_with(&required) || bad_required_value),
        };
        let searchable = implicated || outcome.as_ref().is_err_and(|other| !missing && other.starts_with(&required));
        if !searchable {
            continue;
        }
        trail.push(child);
        if let Some(deeper) = search::<T>(section, trail, message) {
            return Some(deeper);
        }
        if implicated {
            return Some(std::mem::take(trail));
        }
        trail.pop();
    }
    None
}

/// serde's messages for an empty or non-string value where one of several
/// names is expected.
const VARIANT_EXPECTED: [&str; 2] = ["expected variant identifier", "expected string or map"];

/// Replaces serde's wording in a message about a value that must be one of
/// several names by the list of those names. serde lists them only for an
/// unknown name, so the value is replaced by a name no setting has, and the
/// list is taken from that error.
///
/// Extends the trail to the tag's key when the error is about a tag inside
/// a list item, such as an aggregate's `op`, which serde reports at the item.
fn name_variants<T: DeserializeOwned>(section: &Value, trail: &mut Vec<Step>, message: String) -> String {
    let Some(expected) = VARIANT_EXPECTED.iter().find(|expected| message.ends_with(*expected)) else {
        return message;
    };
    let error = match variant_probe::<T>(section, trail) {
        Some(error) => error,
        None => {
            let keys: Vec<String> = match lookup(section, trail) {
                Some(Value::Mapping(mapping)) => {
                    mapping.keys().filter_map(|key| key.as_str().map(String::from)).collect()
                }
                _ => return message,
            };
            let found = keys.into_iter().find_map(|key| {
                let mut candidate = trail.clone();
                candidate.push(Step::Key(key));
                variant_probe::<T>(section, &candidate).map(|error| (candidate, error))
            });
            let Some((candidate, error)) = found else { return message };
            *trail = candidate;
            error
        }
    };
    // serde writes "unknown variant `NAME`, expected `a` or `b`", or
    // "expected one of `a`, `b`, `c`" for more names.
    match error.split_once("unknown variant `\u{1}`, ") {
        Some((_, names)) => {
            let names = names.split(" at line ").next().unwrap_or(names);
            format!("{}{names}", &message[..message.len() - expected.len()])
        }
        None => message,
    }
}

/// Replaces the value at `trail` by a name that no setting has, and returns
/// serde's error when it is about that name.
fn variant_probe<T: DeserializeOwned>(section: &Value, trail: &[Step]) -> Option<String> {
    let (last, parent) = trail.split_last()?;
    let mut probe = section.clone();
    let slot = lookup_mut(&mut probe, parent).and_then(|node| match last {
        Step::Key(key) => node.get_mut(key.as_str()),
        Step::Index(index) => node.get_mut(*index),
    })?;
    *slot = Value::from("\u{1}");
    let error = serde_yaml_ng::from_value::<T>(probe).err()?.to_string();
    error.contains("unknown variant `\u{1}`").then_some(error)
}

fn lookup_mut<'a>(value: &'a mut Value, trail: &[Step]) -> Option<&'a mut Value> {
    trail.iter().try_fold(value, |node, step| match step {
        Step::Key(key) => node.get_mut(key.as_str()),
        Step::Index(index) => node.get_mut(*index),
    })
}

/// One step down a YAML value: a mapping key or a sequence index.
#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn lookup<'a>(value: &'a Value, trail: &[Step]) -> Option<&'a Value> {
    trail.iter().try_fold(value, |node, step| match step {
        Step::Key(key) => node.get(key.as_str()),
        Step::Index(index) => node.get(*index),
    })
}

fn remove(value: &mut Value, trail: &[Step], child: &Step) {
    let mut node = value;
    for step in trail {
        node = match step {
            Step::Key(key) => node.get_mut(key.as_str()).expect("the trail exists"),
            Step::Index(index) => node.get_mut(*index).expect("the trail exists"),
        };
    }
    match (node, child) {
        (Value::Mapping(mapping), Step::Key(key)) => {
            mapping.remove(key.as_str());
        }
        (Value::Sequence(items), Step::Index(index)) => {
            items.remove(*index);
        }
        _ => {}
    }
}

/// Returns the key of an "unknown field `key`" message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// Splits a YAML error into its position and a message without it.
fn syntax_message(err: &serde_yaml_ng::Error) -> (Option<(usize, usize)>, String) {
    let mut message = plain_types(&err.to_string());
    let position = err.location().map(|location| (location.line(), location.column()));
    if let Some((line, column)) = position {
        let suffix = format!(" at line {line} column {column}");
        if let Some(start) = message.find(&suffix) {
            message.replace_range(start..start + suffix.len(), "");
        }
    }
    // A value of `-` alone starts a list.
    if message.starts_with("block sequence entries are not allowed in this context") {
        message.push_str(
            "; a `-` after a key starts a list, so write a value of - in quotes (\"-\"), as for standard output",
        );
    }
    // An integer beyond 64 bits fails as the wrong type for any YAML value.
    if message.contains("invalid type: integer") && message.contains("expected any YAML value") {
        message = message.replace(
            "invalid type: integer",
            "integer out of range: integers in a pipeline file must lie between -9223372036854775808 and 18446744073709551615, found",
        );
        message = message.replace(", expected any YAML value", "");
    }
    (position, message)
}

/// Rewrites Rust type names in serde messages as plain words.
fn plain_types(message: &str) -> String {
    let mut text = message.to_string();
    for (rust, plain) in [
        ("expected usize", "expected a non-negative integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected i32", "expected an integer"),
        ("expected internally tagged enum SourceConfig", "expected a mapping with `kind` and the source's settings"),
        ("expected internally tagged enum StageConfig", "expected a mapping with `kind` and the stage's settings"),
        ("expected internally tagged enum SinkConfig", "expected a mapping with `kind` and the sink's settings"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        (" as u128", ""),
        (" as i128", ""),
        ("expected a sequence", "expected a list"),
        ("expected struct WeightNoiseConfig", "expected a mapping of weight-noise settings, such as `{std: 0.1}`"),
        // A key with nothing after its colon.
        ("invalid type: unit value, expected", "no value given, expected"),
    ] {
        text = text.replace(rust, plain);
    }
    // serde's word for a map of names, which "expected a mapping" also starts with.
    if let Some(start) = text.find("expected a map")
        && !text[start + 14..].starts_with(|c: char| c.is_alphabetic())
    {
        text.replace_range(start..start + 14, "expected a mapping of `name: value` entries");
    }
    // Other settings sections, by the name of their Rust type.
    if let Some(start) = text.find("expected struct ") {
        let name_end =
            text[start + 16..].find(|c: char| !c.is_alphanumeric()).map_or(text.len(), |end| start + 16 + end);
        text.replace_range(start..name_end, "expected a mapping of settings");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match parse(text) {
            Err(ParseError::Sections { problems, .. }) => problems,
            Err(ParseError::Syntax { message, .. }) => panic!("expected section problems, got {message}"),
            Ok(_) => panic!("expected section problems"),
        }
    }

    const HEADER: &str = "seed: 1\nsource: {kind: npy, path: x.npy}\nsink: {kind: arrow_file, path: y.arrow}\n";

    fn syntax_error(text: &str) -> (Option<(usize, usize)>, String) {
        match parse(text) {
            Err(ParseError::Syntax { position, message }) => (position, message),
            Err(ParseError::Sections { problems, .. }) => panic!("expected a syntax error, got {problems:?}"),
            Ok(_) => panic!("expected a syntax error"),
        }
    }

    #[test]
    fn syntax_error_position_is_separate() {
        let (position, message) = syntax_error("seed: 1\nsource: {kind: latent, records: 3\n");
        assert_eq!(position, Some((3, 1)));
        assert!(message.starts_with("did not find expected ',' or '}'"), "{message}");
        assert!(!message.contains("at line 3 column 1"), "{message}");
    }

    #[test]
    fn integer_beyond_64_bits_is_out_of_range() {
        let (position, message) = syntax_error("seed: 1\nsource:\n  records: 99999999999999999999\n");
        assert_eq!(position, Some((3, 12)));
        assert!(message.contains("integer out of range"), "{message}");
        assert!(message.contains("18446744073709551615, found `99999999999999999999`"), "{message}");
        assert!(!message.contains("any YAML value"), "{message}");
    }

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
        assert!(found[0].message.contains("expected an integer of at least 1"), "{}", found[0].message);
    }

    #[test]
    fn empty_value_says_so() {
        let found =
            problems("seed:\nsource: {kind: latent, records: , shape: [2]}\nsink: {kind: arrow_file, path: y.arrow}\n");
        let found: Vec<String> = found.into_iter().map(|p| format!("{}: {}", p.path, p.message)).collect();
        assert_eq!(
            found,
            [
                "seed: no value given, expected a non-negative integer",
                "source.records: no value given, expected an integer of at least 1"
            ]
        );
    }

    #[test]
    fn empty_name_lists_the_names() {
        let text = "seed: 1\nsource: {kind: , records: 3, shape: [2]}\nsink: {kind: arrow_file, path: y.arrow, compression: }\n";
        let found: Vec<String> = problems(text).into_iter().map(|p| format!("{}: {}", p.path, p.message)).collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("source.kind: no value given, expected one of `images`"), "{}", found[0]);
        assert_eq!(found[1], "sink.compression: no value given, expected one of `none`, `lz4`, `zstd`");

        let text = format!("{HEADER}stages:\n  - {{kind: sample, column: y, from: }}\n");
        let found = problems(&text);
        assert_eq!(found[0].message, "no value given, expected `logits` or `probabilities`");
    }

    #[test]
    fn empty_optional_value_is_a_problem() {
        let text = format!(
            "{HEADER}stages:\n  - {{kind: add_noise, column: x, std: 1, clip: , name: }}\n  - {{kind: aggregate, aggregates: [{{op: mean, column: y, output: }}]}}\ndaemon: {{http: }}\n"
        );
        let found: Vec<String> = problems(&text).into_iter().map(|p| format!("{}: {}", p.path, p.message)).collect();
        let empty = "no value given; write a value after the colon, or remove the key if the setting is optional";
        assert_eq!(
            found,
            [
                format!("stages[0].clip: {empty}"),
                format!("stages[0].name: {empty}"),
                format!("stages[1].aggregates[0].output: {empty}"),
            ]
        );
        // `http: null` turns the server off.
        let text = format!("{HEADER}daemon: {{http: null}}\n");
        let config = parse(&text).unwrap_or_else(|_| panic!("`http: null` is accepted"));
        assert_eq!(config.daemon.http, None);
    }

    #[test]
    fn empty_value_is_reported_once_beside_type_errors() {
        let text = format!("{HEADER}stages:\n  - {{kind: add_noise, column: , std: one, clip: }}\n");
        let found: Vec<String> = problems(&text).into_iter().map(|p| format!("{}: {}", p.path, p.message)).collect();
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0], "stages[0].column: no value given, expected a string");
        assert!(found[1].starts_with("stages[0].std: invalid type: string \"one\", expected a number"), "{}", found[1]);
        assert!(found[2].starts_with("stages[0].clip: no value given; write a value"), "{}", found[2]);
    }

    #[test]
    fn name_given_mapping_is_reported() {
        let cases = [
            (
                "compression: {zstd: 3}",
                "sink.compression: `compression` takes a name alone, not a mapping: write `compression: zstd`, with the level as `compression_level: 3`",
            ),
            (
                "compression: {zstd: 3}, compression_level: 5",
                "sink.compression: `compression` takes a name alone, not a mapping: write `compression: zstd`",
            ),
            (
                "compression: {lz4: 3}",
                "sink.compression: `compression` takes a name alone, not a mapping: write `compression: lz4`",
            ),
            (
                "compression: {zstd: {level: 3}}",
                "sink.compression: `compression` takes a name alone, not a mapping: write `compression: zstd`, with its settings beside `compression`",
            ),
            (
                "compression: {}",
                "sink.compression: `compression` takes a name alone, not a mapping; expected one of `none`, `lz4`, `zstd`",
            ),
        ];
        for (settings, expected) in cases {
            let text = format!(
                "seed: 1\nsource: {{kind: npy, path: x.npy}}\nsink: {{kind: arrow_file, path: y.arrow, {settings}}}\n"
            );
            let found: Vec<String> =
                problems(&text).into_iter().map(|p| format!("{}: {}", p.path, p.message)).collect();
            assert_eq!(found, [expected], "{settings}");
        }

        let stages = [
            (
                "{kind: aggregate, aggregates: [{op: {mean: 2}, column: y}]}",
                "stages[0].aggregates[0].op: `op` takes a name alone, not a mapping: write `op: mean`",
            ),
            (
                "{kind: sample, column: y, from: {logits: 1}}",
                "stages[0].from: `from` takes a name alone, not a mapping: write `from: logits`",
            ),
            (
                "{kind: sample, column: y, from: {logits: }}",
                "stages[0].from: `from` takes a name alone, not a mapping: write `from: logits`",
            ),
            (
                "{kind: sample, column: y, from: {logits: 1, probabilities: 2}}",
                "stages[0].from: `from` takes a name alone, not a mapping; expected `logits` or `probabilities`",
            ),
        ];
        for (stage, expected) in stages {
            let text = format!("{HEADER}stages:\n  - {stage}\n");
            let found: Vec<String> =
                problems(&text).into_iter().map(|p| format!("{}: {}", p.path, p.message)).collect();
            assert_eq!(found, [expected], "{stage}");
        }
    }

    #[test]
    fn dash_value_asks_for_quotes() {
        let (_, message) = syntax_error("seed: 1\nsink:\n  kind: arrow_file\n  path: -\n");
        assert!(message.ends_with("so write a value of - in quotes (\"-\"), as for standard output"), "{message}");
    }

    #[test]
    fn missing_key_points_at_its_stage() {
        let found = problems(&format!("{HEADER}stages:\n  - {{kind: add_noise, column: x}}\n  - {{kind: sample}}\n"));
        let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["stages[1]"]);
        assert!(found[0].message.starts_with("missing field `column`"), "{}", found[0].message);
    }

    #[test]
    fn bad_value_of_required_nested_key_is_located() {
        let found = problems(&format!(
            "{HEADER}stages:\n  - kind: infer\n    model: m.onnx\n    inputs: {{x: x}}\n    weight_noise:\n      std: abc\n"
        ));
        assert_eq!(found[0].path, "stages[0].weight_noise.std");
        let found = problems(&format!(
            "{HEADER}stages:\n  - {{kind: aggregate, aggregates: [{{op: mean, column: 5, output: m}}]}}\n"
        ));
        assert_eq!(found[0].path, "stages[0].aggregates[0].column");
    }

    #[test]
    fn missing_nested_key_points_at_its_mapping() {
        let found = problems(&format!(
            "{HEADER}stages:\n  - kind: infer\n    model: m.onnx\n    inputs: {{x: x}}\n    weight_noise: {{relative: true}}\n"
        ));
        assert_eq!(found[0].path, "stages[0].weight_noise");
        assert!(found[0].message.starts_with("missing field `std`"), "{}", found[0].message);
    }

    #[test]
    fn nested_errors_name_their_path() {
        let found = problems(&format!(
            "{HEADER}stages:\n  - {{kind: repeat, samples: 2}}\n  - {{kind: aggregate, aggregates: [{{op: mean, column: x}}, {{op: mean, column: y, from: logits}}]}}\n"
        ));
        assert_eq!(found[0].path, "stages[1].aggregates[1].from");
    }

    #[test]
    fn several_errors_in_one_section_are_collected() {
        let text = format!(
            "{HEADER}stages:\n  - {{kind: infer, model: m.onnx, inputs: {{x: x}}, sessions: two, threads: -1, bach_size: 4}}\ndaemon: {{rotate: {{rows: -5}}, max_delay_ms: fast}}\n"
        );
        let paths: Vec<String> = problems(&text).into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            [
                "stages[0].sessions",
                "stages[0].bach_size",
                "stages[0].threads",
                "daemon.rotate.rows",
                "daemon.max_delay_ms"
            ]
        );
    }

    #[test]
    fn removed_required_key_is_not_reported_missing() {
        let found = problems(&format!("{HEADER}stages:\n  - {{kind: add_noise, column: [x], std: 1}}\n"));
        let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["stages[0].column"], "{found:?}");
    }

    #[test]
    fn every_section_error_is_collected() {
        let text = "seed: -1\nsource: {kind: npy, path: x.npy, batch_size: -5}\nsink: {kind: arrow_file, path: y.arrow, compresion: lz4}\n";
        let paths: Vec<String> = problems(text).into_iter().map(|p| p.path).collect();
        assert_eq!(paths, ["seed", "source.batch_size", "sink.compresion"]);
    }
}
