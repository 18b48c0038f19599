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
        Self { version: VERSION, next_file: 0, units: BTreeMap::new() }
    }

    /// Records the progress that a mark reports.
    pub fn apply(&mut self, mark: &Mark) {
        let progress = self.units.entry(mark.unit.to_string()).or_default();
        progress.records = progress.records.max(mark.records);
        progress.complete |= mark.complete;
    }

    /// Returns the progress of a unit; a unit never seen has none.
    pub fn progress(&self, unit: &str) -> UnitProgress {
        self.units.get(unit).copied().unwrap_or_default()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a checkpoint always serializes")
    }

    fn from_json(text: &str, path: &Path) -> Result<Self, CheckpointError> {
        let checkpoint: Checkpoint = serde_json::from_str(text)
            .map_err(|err| CheckpointError::Invalid { path: path.to_path_buf(), message: err.to_string() })?;
        if checkpoint.version != VERSION {
            return Err(CheckpointError::Invalid {
                path: path.to_path_buf(),
                message: format!("version {} is not the supported version {VERSION}", checkpoint.version),
            });
        }
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
