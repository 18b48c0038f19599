//! Reading a pipeline file: parsing, overrides, path resolution and the
//! checks that need no model or data.

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::check::{Sections, check_sections};
use super::locate::Locator;
use super::parse::ParseError;
use super::sink::ZSTD_DEFAULT_LEVEL;
use super::{PipelineConfig, SinkConfig, SourceConfig, StageConfig};

/// One problem in a pipeline file, at a path such as `stages[1].std`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

impl ConfigProblem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

/// Error that makes a pipeline file unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read pipeline file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", Position(file, *position))]
    Syntax { file: PathBuf, position: Option<(usize, usize)>, message: String },
    #[error("{}", Located(file, problems))]
    Invalid { file: PathBuf, problems: Vec<(Option<(usize, usize)>, ConfigProblem)> },
}

/// A file with a line and column, where known: `FILE:LINE:COLUMN`.
struct Position<'a>(&'a Path, Option<(usize, usize)>);

impl fmt::Display for Position<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some((line, column)) => write!(f, "{}:{line}:{column}", self.0.display()),
            None => write!(f, "{}", self.0.display()),
        }
    }
}

struct Located<'a>(&'a Path, &'a [(Option<(usize, usize)>, ConfigProblem)]);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.1.len();
        write!(f, "{} has {count} problem{}", self.0.display(), if count == 1 { "" } else { "s" })?;
        for (position, problem) in self.1 {
            write!(f, "\n  {}: {}: {}", Position(self.0, *position), problem.path, problem.message)?;
        }
        Ok(())
    }
}

/// A parsed pipeline file with its paths resolved.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub config: PipelineConfig,
    pub file: PathBuf,
    pub locator: Locator,
    /// SHA-256 of the settings that determine the output values.
    pub fingerprint: String,
}

impl LoadedConfig {
    /// Turns problems into an error that names each one's line.
    pub fn error(&self, problems: Vec<ConfigProblem>) -> ConfigError {
        invalid(&self.file, &self.locator, problems)
    }
}

/// Reads and checks a pipeline file. `seed` and `output` override the file's
/// seed and sink path. `output` is relative to the working directory, while
/// paths in the file are relative to the file.
pub fn load(file: &Path, seed: Option<u64>, output: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
    let text =
        std::fs::read_to_string(file).map_err(|source| ConfigError::Read { path: file.to_path_buf(), source })?;
    let locator = Locator::new(&text);
    // The deserializer would stop at the first repeated key and report the
    // mapping's position, so each repeat is listed here at its own line.
    if !locator.duplicates().is_empty() {
        let problems = locator
            .duplicates()
            .iter()
            .map(|repeat| {
                let first = if repeat.first.0 == repeat.position.0 {
                    format!("line {}, column {}", repeat.first.0, repeat.first.1)
                } else {
                    format!("line {}", repeat.first.0)
                };
                let message =
                    format!("`{}` is given again after its first value at {first}; keep only one", repeat.key);
                (Some(repeat.position), ConfigProblem::new(repeat.path.clone(), message))
            })
            .collect();
        return Err(ConfigError::Invalid { file: file.to_path_buf(), problems });
    }
    let mut config = match super::parse::parse(&text) {
        Ok(config) => config,
        Err(ParseError::Syntax { position, message }) => {
            return Err(ConfigError::Syntax { file: file.to_path_buf(), position, message });
        }
        Err(ParseError::Sections { mut problems, parsed }) => {
            // The sections that were read are checked too, so that one run
            // lists their problems with the others.
            let stages: Vec<Option<&StageConfig>> = parsed.stages.iter().map(Option::as_ref).collect();
            problems.extend(check_sections(Sections {
                source: parsed.source.as_ref(),
                stages: &stages,
                sink: parsed.sink.as_ref(),
                runtime: parsed.runtime.as_ref(),
            }));
            return Err(invalid(file, &locator, problems));
        }
    };

    if let Some(seed) = seed {
        config.seed = seed;
    }
    let fingerprint = fingerprint(&config);

    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    resolve_paths(&mut config, &base);
    if let Some(output) = output {
        // `stochflow run` rejects other sinks once the file is loaded.
        if let SinkConfig::ArrowFile(sink) = &mut config.sink {
            sink.path = output.to_path_buf();
        }
    }

    let problems = super::check::check(&config);
    if !problems.is_empty() {
        return Err(invalid(file, &locator, problems));
    }
    Ok(LoadedConfig { config, file: file.to_path_buf(), locator, fingerprint })
}

/// Locates problems of the file and lists them in the order of its lines.
fn invalid(file: &Path, locator: &Locator, problems: Vec<ConfigProblem>) -> ConfigError {
    let mut problems: Vec<_> = problems.into_iter().map(|p| (locator.find(&p.path), p)).collect();
    // The sort is stable: problems at one position keep their order.
    problems.sort_by_key(|(position, _)| position.unwrap_or((usize::MAX, usize::MAX)));
    ConfigError::Invalid { file: file.to_path_buf(), problems }
}

fn resolve_paths(config: &mut PipelineConfig, base: &Path) {
    let resolve = |path: &mut PathBuf| {
        if path.is_relative() {
            *path = normalize(&base.join(&*path));
        }
    };
    match &mut config.source {
        SourceConfig::Images(c) => resolve(&mut c.path),
        SourceConfig::ArrowFile(c) => resolve(&mut c.path),
        SourceConfig::Npy(c) => resolve(&mut c.path),
        SourceConfig::Latent(_) => {}
        // The `read` path is a file name pattern inside the directory.
        SourceConfig::Watch(c) => resolve(&mut c.path),
        SourceConfig::Socket(c) => {
            // An empty path stays empty, for the check to reject.
            if let Some(socket) = c.listen.strip_prefix("unix:").filter(|socket| !socket.is_empty()) {
                let mut path = PathBuf::from(socket);
                resolve(&mut path);
                c.listen = format!("unix:{}", path.display());
            }
        }
        SourceConfig::Nats(_) => {}
    }
    for stage in &mut config.stages {
        if let StageConfig::Infer(c) = stage {
            resolve(&mut c.model);
        }
    }
    let SinkConfig::ArrowFile(sink) = &mut config.sink else {
        return;
    };
    if !crate::sink::is_stdout(&sink.path) {
        resolve(&mut sink.path);
    }
    if let Some(images) = &mut sink.images {
        resolve(&mut images.path);
    }
}

/// Hashes the canonical JSON form of the settings that can change output
/// values. Batch sizes, thread, session and worker counts, channel capacities
/// and the output path are left out: they change speed, never results.
fn fingerprint(config: &PipelineConfig) -> String {
    let mut value = serde_json::to_value(config).expect("a pipeline config always serializes");

    remove_keys(&mut value, &["runtime", "daemon"]);
    // The server, the consumer and its settings decide who processes a
    // message, not what comes out of it.
    remove_keys(&mut value["source"], &["batch_size", "url", "consumer", "ack_wait_ms", "fetch", "deliver"]);
    remove_keys(&mut value["sink"], &["path", "rows_per_batch", "url", "stream", "subject", "dead_letter_subject"]);
    // Writing out zstd's default level, or 0, which zstd reads as its
    // default, is the same as leaving the level out.
    if value["sink"]["compression_level"]
        .as_i64()
        .is_some_and(|level| level == 0 || level == i64::from(ZSTD_DEFAULT_LEVEL))
    {
        remove_keys(&mut value["sink"], &["compression_level"]);
    }
    if let Some(images) = value["sink"].get_mut("images") {
        remove_keys(images, &["path"]);
    }
    if let Some(stages) = value["stages"].as_array_mut() {
        for stage in stages {
            remove_keys(stage, &["batch_size", "threads", "sessions"]);
        }
    }

    // serde_json sorts object keys, so this text is canonical.
    let canonical = serde_json::to_vec(&value).expect("JSON values always serialize");
    let digest = Sha256::digest(&canonical);
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn remove_keys(value: &mut serde_json::Value, keys: &[&str]) {
    if let Some(object) = value.as_object_mut() {
        for key in keys {
            object.remove(*key);
        }
    }
}

/// Removes `.` and `name/..` pairs without touching the file system, so
/// `pipelines/../out/x.arrow` reads as `out/x.arrow` in messages.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut parts: Vec<Component> = Vec::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir if matches!(parts.last(), Some(Component::Normal(_))) => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    if parts.is_empty() { PathBuf::from(".") } else { parts.iter().collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_removes_parent_pairs() {
        assert_eq!(normalize(Path::new("pipelines/../out/x.arrow")), PathBuf::from("out/x.arrow"));
        assert_eq!(normalize(Path::new("../fixtures/./m.onnx")), PathBuf::from("../fixtures/m.onnx"));
        assert_eq!(normalize(Path::new("a/..")), PathBuf::from("."));
    }

    /// Returns the config hash of a latent pipeline with the sink settings
    /// `sink`.
    fn hash_with_sink(sink: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        let text = format!(
            "seed: 1\nsource: {{kind: latent, records: 3, shape: [2]}}\nsink: {{kind: arrow_file, path: y.arrow{sink}}}\n"
        );
        std::fs::write(&file, text).unwrap();
        match load(&file, None, None) {
            Ok(loaded) => loaded.fingerprint,
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn default_zstd_level_leaves_hash_unchanged() {
        let zstd = hash_with_sink(", compression: zstd");
        assert_eq!(hash_with_sink(", compression: zstd, compression_level: 3"), zstd);
        assert_eq!(hash_with_sink(", compression: zstd, compression_level: 0"), zstd);
        assert_ne!(hash_with_sink(", compression: zstd, compression_level: 9"), zstd);
        assert_eq!(hash_with_sink(", compression: none"), hash_with_sink(""));
    }
}
