//! The daemon's checkpoint: how far each input unit (a watched file or a
//! socket stream) is durable in the output, and the number of the next
//! output file.
//!
//! The checkpoint is stored twice. Each committed output file carries the
//! checkpoint that is true after it in its footer metadata, and
//! `checkpoint.json` is rewritten (temporary file, fsync, rename) after each
//! commit. A crash between the two leaves a committed file newer than
//! `checkpoint.json`; [`recover`] finds it and takes its footer's
//! checkpoint, so the JSON file may lag behind the output but never runs
//! ahead of it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::batch::Mark;

/// Name of the checkpoint file in the output directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
/// Footer metadata key of the checkpoint in output files.
pub const FOOTER_KEY: &str = "stochflow.checkpoint";
const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// Number of the next output file, `part-NNNNNNNN.arrow`.
    pub next_file: u64,
    /// Progress of each input unit, by name.
    pub units: BTreeMap<String, UnitProgress>,
    /// Highest `N` of the `connection-N` stream names with durable records.
    /// Such a stream leaves `units` once its connection closes, and this
    /// number keeps its name from being given again.
    #[serde(default)]
    pub last_connection: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitProgress {
    /// Records of the unit that are durable, counted from its first.
    pub records: u64,
    /// Whether every record of the unit is durable.
    pub complete: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read or write the checkpoint in {}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not a valid stochflow checkpoint ({message}); move it away to start over, which processes every input again",
        path.display()
    )]
    Invalid { path: PathBuf, message: String },
}

impl Checkpoint {
    pub fn new() -> Self {
        Self { version: VERSION, next_file: 0, units: BTreeMap::new(), last_connection: 0 }
    }

    /// Records the progress that a mark reports.
    pub fn apply(&mut self, mark: &Mark) {
        let progress = self.units.entry(mark.unit.to_string()).or_default();
        progress.records = progress.records.max(mark.records);
        progress.complete |= mark.complete;
        self.count_connection(&mark.unit);
    }

    /// Drops the units for which `keep` returns false. A dropped
    /// `connection-N` unit still counts in `last_connection`.
    pub fn retain_units(&mut self, keep: impl Fn(&str, &UnitProgress) -> bool) {
        let mut last_connection = self.last_connection;
        self.units.retain(|unit, progress| {
            let stays = keep(unit, progress);
            if !stays && let Some(number) = connection_number(unit) {
                last_connection = last_connection.max(number);
            }
            stays
        });
        self.last_connection = last_connection;
    }

    fn count_connection(&mut self, unit: &str) {
        if let Some(number) = connection_number(unit) {
            self.last_connection = self.last_connection.max(number);
        }
    }

    /// Returns the progress of a unit; a unit never seen has none.
    pub fn progress(&self, unit: &str) -> UnitProgress {
        self.units.get(unit).copied().unwrap_or_default()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a checkpoint always serializes")
    }

    fn from_json(text: &str, path: &Path) -> Result<Self, CheckpointError> {
        let mut checkpoint: Checkpoint = serde_json::from_str(text)
            .map_err(|err| CheckpointError::Invalid { path: path.to_path_buf(), message: err.to_string() })?;
        if checkpoint.version != VERSION {
            return Err(CheckpointError::Invalid {
                path: path.to_path_buf(),
                message: format!("version {} is not the supported version {VERSION}", checkpoint.version),
            });
        }
        // A checkpoint written before `last_connection` existed has only
        // its units to count.
        let highest = checkpoint.units.keys().filter_map(|unit| connection_number(unit)).max().unwrap_or(0);
        checkpoint.last_connection = checkpoint.last_connection.max(highest);
        Ok(checkpoint)
    }

    /// Writes `checkpoint.json` atomically: a temporary file, fsync, rename,
    /// then fsync of the directory.
    pub fn save(&self, dir: &Path) -> Result<(), CheckpointError> {
        let io_error = |source| CheckpointError::Io { dir: dir.to_path_buf(), source };
        let temporary = dir.join(format!("{CHECKPOINT_FILE}.partial"));
        let mut file = File::create(&temporary).map_err(io_error)?;
        file.write_all(self.to_json().as_bytes()).map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        drop(file);
        std::fs::rename(&temporary, dir.join(CHECKPOINT_FILE)).map_err(io_error)?;
        File::open(dir).and_then(|dir| dir.sync_all()).map_err(io_error)
    }
}

/// Returns the stream name given to the `number`th connection that names
/// no stream of its own.
pub fn connection_name(number: u64) -> String {
    format!("{CONNECTION_PREFIX}{number}")
}

/// Returns `N` for a `connection-N` stream name, the form reserved for
/// connections that name no stream. Returns `None` for any other name and
/// for an `N` beyond `u64`.
pub fn connection_number(unit: &str) -> Option<u64> {
    if !is_connection_name(unit) {
        return None;
    }
    unit[CONNECTION_PREFIX.len()..].parse().ok()
}

/// Tells whether `unit` has the form `connection-` followed by digits.
pub fn is_connection_name(unit: &str) -> bool {
    unit.strip_prefix(CONNECTION_PREFIX)
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()))
}

const CONNECTION_PREFIX: &str = "connection-";

/// Returns the name of output file `number`.
pub fn part_name(number: u64) -> String {
    format!("part-{number:08}.arrow")
}

/// Returns the name of the dead-letter file committed with output file `number`.
pub fn dead_letter_name(number: u64) -> String {
    format!("dead-{number:08}.arrow")
}

/// Restores the checkpoint of an output directory after a stop or a crash.
///
/// 1. Temporary `.partial` files, torn by a crash, are removed: the records
///    in them are read again.
/// 2. `checkpoint.json` is read, if there is one.
/// 3. Output files numbered from its `next_file` on were committed after it
///    was written; the checkpoint in the footer of the last one is taken. A
///    dead-letter file is committed before the output file of its number,
///    and carries the checkpoint only when no output file follows. A
///    dead-letter file without a checkpoint and without its output file was
///    left by a crash between the two, so it is removed: its records are
///    dead-lettered again.
pub fn recover(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    let io_error = |source| CheckpointError::Io { dir: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(io_error)?;
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let path = entry.map_err(io_error)?.path();
        if path.extension().is_some_and(|extension| extension == "partial") {
            tracing::info!(file = %path.display(), "removing a temporary file left by an interrupted commit");
            std::fs::remove_file(&path).map_err(io_error)?;
        }
    }

    let json = dir.join(CHECKPOINT_FILE);
    let mut checkpoint = match std::fs::read_to_string(&json) {
        Ok(text) => Checkpoint::from_json(&text, &json)?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Checkpoint::new(),
        Err(source) => return Err(CheckpointError::Io { dir: dir.to_path_buf(), source }),
    };
    let from_json = checkpoint.clone();

    loop {
        let number = checkpoint.next_file;
        let part = dir.join(part_name(number));
        let dead = dir.join(dead_letter_name(number));
        let footer = if part.exists() {
            footer_checkpoint(&part)?
        } else if dead.exists() {
            footer_checkpoint(&dead)?
        } else {
            break;
        };
        match footer {
            Some(newer) if newer.next_file > number => checkpoint = newer,
            Some(_) => {
                return Err(CheckpointError::Invalid {
                    path: part,
                    message: format!("its footer checkpoint does not move past file number {number}"),
                });
            }
            None if !part.exists() => {
                tracing::info!(file = %dead.display(), "removing a dead-letter file whose commit did not finish");
                std::fs::remove_file(&dead).map_err(io_error)?;
                break;
            }
            None => {
                return Err(CheckpointError::Invalid {
                    path: part,
                    message: String::from("its footer has no checkpoint"),
                });
            }
        }
    }
    if checkpoint != from_json {
        checkpoint.save(dir)?;
    }
    Ok(checkpoint)
}

/// Reads the checkpoint from a committed file's footer metadata.
fn footer_checkpoint(path: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let invalid = |message: String| CheckpointError::Invalid { path: path.to_path_buf(), message };
    let file = File::open(path).map_err(|source| CheckpointError::Io { dir: path.to_path_buf(), source })?;
    let reader = arrow::ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)
        .map_err(|err| invalid(format!("cannot read its footer: {err}")))?;
    match reader.custom_metadata().get(FOOTER_KEY) {
        Some(text) => Checkpoint::from_json(text, path).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn mark(unit: &str, records: u64) -> Mark {
        Mark { unit: Arc::from(unit), records, complete: false }
    }

    #[test]
    fn connection_names_round_trip() {
        assert_eq!(connection_name(12), "connection-12");
        assert_eq!(connection_number("connection-12"), Some(12));
        for other in ["connection-", "connection-1a", "connection--1", "Connection-1", "stream", "connection-+1"] {
            assert_eq!(connection_number(other), None, "{other}");
            assert!(!is_connection_name(other), "{other}");
        }
        let beyond = "connection-99999999999999999999999";
        assert_eq!(connection_number(beyond), None);
        assert!(is_connection_name(beyond));
    }

    #[test]
    fn applied_connections_raise_the_count() {
        let mut checkpoint = Checkpoint::new();
        checkpoint.apply(&mark("connection-7", 3));
        checkpoint.apply(&mark("connection-2", 5));
        checkpoint.apply(&mark("named", 5));
        assert_eq!(checkpoint.last_connection, 7);
    }

    #[test]
    fn dropped_connections_keep_their_count() {
        let mut checkpoint = Checkpoint::new();
        // As a checkpoint written before the count existed would load.
        checkpoint.units.insert(String::from("connection-9"), UnitProgress { records: 4, complete: false });
        checkpoint.units.insert(String::from("named"), UnitProgress { records: 4, complete: false });
        checkpoint.retain_units(|unit, _| !is_connection_name(unit));
        assert_eq!(checkpoint.units.keys().collect::<Vec<_>>(), ["named"]);
        assert_eq!(checkpoint.last_connection, 9);
    }

    #[test]
    fn checkpoint_without_count_loads() {
        let text = r#"{"version":1,"next_file":3,"units":{"connection-4":{"records":2,"complete":false}}}"#;
        let checkpoint = Checkpoint::from_json(text, Path::new("checkpoint.json")).expect("a valid checkpoint");
        assert_eq!(checkpoint.last_connection, 4);
        assert_eq!(checkpoint.progress("connection-4").records, 2);
        let again = Checkpoint::from_json(&checkpoint.to_json(), Path::new("checkpoint.json")).expect("its own JSON");
        assert_eq!(again, checkpoint);
    }
}
