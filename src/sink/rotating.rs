//! The daemon's output: a directory of rotated Arrow IPC files, their
//! dead-letter files and the checkpoint.
//!
//! Commit protocol, for commit number N:
//! 1. Rows and rejected records are held in memory until the file's rotation
//!    limit is reached, and then only at the end of a source batch, where the
//!    progress marks cover every row held.
//! 2. The rejected records, if any, are written to `dead-N.arrow` through
//!    [`ArrowFileSink`]: a `.partial` file, footer, fsync, rename, fsync of
//!    the directory.
//! 3. The rows, if any, are written to `part-N.arrow` the same way. The
//!    footer of the last file written carries the checkpoint that is true
//!    once it is committed.
//! 4. `checkpoint.json` is replaced with that checkpoint (see
//!    [`super::checkpoint`] for how a restart reads these back).
//!
//! A step that fails (a full disk, say) removes its `.partial` file and
//! leaves the rows in memory, so the whole commit can be tried again and
//! nothing accepted is lost. No file under a final name is ever torn: a
//! crash leaves at most `.partial` files, which recovery removes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::checkpoint::{Checkpoint, FOOTER_KEY, UnitProgress, dead_letter_name, part_name};
use super::{ArrowFileSink, FileCompression, SinkError};
use crate::batch::{Batch, RecordRuns, Rejected};
use crate::config::RotateConfig;

/// The files and records of one commit.
#[derive(Debug, Default)]
pub struct Committed {
    /// Kind (`dead_letters` or `output`), path and size in bytes of each
    /// file committed, in commit order.
    pub files: Vec<(&'static str, PathBuf, u64)>,
    pub records: u64,
    pub rows: u64,
    /// The rejected records, by the source or stage that rejected them.
    pub dead_letters: Vec<String>,
    pub checkpoint: Checkpoint,
}

/// Tells whether an input unit, by name and progress, stays in the
/// checkpoint.
pub type KeepUnit = Box<dyn Fn(&str, &UnitProgress) -> bool + Send>;

/// The layout of output files.
pub struct FileFormat {
    /// The written schema.
    pub schema: SchemaRef,
    /// Indices of the written columns in each batch.
    pub projection: Vec<usize>,
    pub compression: FileCompression,
    pub rows_per_batch: usize,
}

pub struct RotatingSink {
    dir: PathBuf,
    format: FileFormat,
    rotate: RotateConfig,
    /// The checkpoint of the last commit.
    durable: Checkpoint,
    /// The checkpoint once everything held is committed.
    progress: Checkpoint,
    rows: Vec<RecordBatch>,
    row_count: u64,
    bytes: u64,
    pending_since: Option<Instant>,
    dead: Vec<(Rejected, String)>,
    /// Whether the last batch ended a source batch; see [`Batch::ends_source_batch`].
    at_boundary: bool,
    /// The unit of the last mark seen, for dead letters of batches without marks.
    last_unit: Option<Arc<str>>,
    /// Whether marks arrived since the last commit.
    marked: bool,
    key_column: String,
    /// Tells whether a unit is still kept in the checkpoint.
    keep_unit: Option<KeepUnit>,
    /// Records held: rows, or runs of one key after a fan-out.
    record_count: u64,
    records: RecordRuns,
}

impl RotatingSink {
    /// Opens the output directory at a recovered checkpoint.
    pub fn new(dir: &Path, format: FileFormat, rotate: RotateConfig, checkpoint: Checkpoint, key_column: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            format,
            rotate,
            progress: checkpoint.clone(),
            durable: checkpoint,
            rows: Vec::new(),
            row_count: 0,
            bytes: 0,
            pending_since: None,
            dead: Vec::new(),
            at_boundary: true,
            last_unit: None,
            marked: false,
            key_column: key_column.to_string(),
            keep_unit: None,
            record_count: 0,
            records: RecordRuns::default(),
        }
    }

    /// Drops the units for which `keep` returns false from the checkpoint
    /// at each commit, so that it does not grow without bound.
    pub fn prune_units(&mut self, keep: KeepUnit) {
        self.keep_unit = Some(keep);
    }

    /// Returns the checkpoint of the last commit.
    pub fn durable(&self) -> &Checkpoint {
        &self.durable
    }

    /// Holds a batch's rows and rejections for the next commit and records
    /// its progress marks.
    pub fn write(&mut self, batch: Batch) {
        let source = match batch.marks.as_slice() {
            [] => self.last_unit.as_deref().unwrap_or("").to_string(),
            [only] => only.unit.to_string(),
            several => {
                let mut units: Vec<&str> = several.iter().map(|mark| &*mark.unit).collect();
                units.dedup();
                units.join(" ")
            }
        };
        if batch.data.num_rows() > 0 || !batch.rejected.is_empty() || !batch.marks.is_empty() {
            self.pending_since.get_or_insert_with(Instant::now);
        }
        for rejected in batch.rejected {
            let origin = rejected.origin.clone().unwrap_or_else(|| source.clone());
            self.dead.push((rejected, origin));
        }
        for mark in &batch.marks {
            self.progress.apply(mark);
            self.marked = true;
        }
        if let Some(mark) = batch.marks.last() {
            self.last_unit = Some(mark.unit.clone());
        }
        if batch.data.num_rows() > 0 {
            self.record_count += self.records.count(&batch.data, &self.key_column);
            self.row_count += batch.data.num_rows() as u64;
            self.bytes += batch.data.get_array_memory_size() as u64;
            self.rows.push(batch.data);
        }
        self.at_boundary = batch.ends_source_batch;
    }

    /// Returns whether anything is held that a commit would write.
    pub fn has_pending(&self) -> bool {
        self.row_count > 0 || !self.dead.is_empty() || self.marked
    }

    /// Returns whether a commit may happen now, at the end of a source batch.
    pub fn at_boundary(&self) -> bool {
        self.at_boundary
    }

    /// Returns whether the open file reached a rotation limit. Until the end
    /// of a source batch arrives, the file may go past it.
    pub fn is_full(&self) -> bool {
        self.row_count >= self.rotate.rows
            || self.bytes >= self.rotate.bytes
            || self.pending_since.is_some_and(|at| at.elapsed() >= Duration::from_millis(self.rotate.age_ms))
    }

    /// Returns when what is held reaches the age limit, if anything is held.
    pub fn age_deadline(&self) -> Option<Instant> {
        self.pending_since.map(|at| at + Duration::from_millis(self.rotate.age_ms))
    }

    /// Commits what is held (see the module documentation). On failure,
    /// nothing is lost and the commit can be tried again.
    pub fn commit(&mut self) -> Result<Option<Committed>, SinkError> {
        if !self.has_pending() {
            return Ok(None);
        }
        let number = self.durable.next_file;
        if let Some(keep) = &self.keep_unit {
            self.progress.retain_units(keep);
        }
        let mut next = self.progress.clone();
        let has_rows = self.row_count > 0;
        let has_dead = !self.dead.is_empty();
        if has_rows || has_dead {
            next.next_file = number + 1;
        }
        let footer = next.to_json();
        let mut committed = Committed {
            records: self.record_count,
            rows: self.row_count,
            dead_letters: self.dead.iter().map(|(rejected, _)| rejected.component.clone()).collect(),
            ..Default::default()
        };

        if has_dead {
            let path = self.dir.join(dead_letter_name(number));
            let schema = dead_letter_schema();
            let columns = (0..schema.fields().len()).collect();
            let mut file =
                ArrowFileSink::create(&path, schema, columns, FileCompression::default(), self.format.rows_per_batch)?;
            file.write(&self.dead_letter_batch())?;
            if !has_rows {
                file.set_footer_metadata(FOOTER_KEY, footer.clone());
            }
            file.finish()?;
            committed.files.push(("dead_letters", path.clone(), file_size(&path)));
        }
        if has_rows {
            let path = self.dir.join(part_name(number));
            let format = &self.format;
            let mut file = ArrowFileSink::create(
                &path,
                format.schema.clone(),
                format.projection.clone(),
                format.compression,
                format.rows_per_batch,
            )?;
            for batch in &self.rows {
                file.write(batch)?;
            }
            file.set_footer_metadata(FOOTER_KEY, footer);
            file.finish()?;
            committed.files.push(("output", path.clone(), file_size(&path)));
        }
        next.save(&self.dir).map_err(|err| SinkError::Target { path: self.dir.clone(), message: err.to_string() })?;

        self.durable = next.clone();
        self.progress.next_file = next.next_file;
        self.rows.clear();
        self.record_count = 0;
        self.row_count = 0;
        self.bytes = 0;
        self.pending_since = None;
        self.dead.clear();
        self.marked = false;
        committed.checkpoint = next;
        Ok(Some(committed))
    }

    fn dead_letter_batch(&self) -> RecordBatch {
        let keys = StringArray::from_iter_values(self.dead.iter().map(|(r, _)| r.key.as_str()));
        let sources = StringArray::from_iter_values(self.dead.iter().map(|(_, source)| source.as_str()));
        let stages = StringArray::from_iter_values(self.dead.iter().map(|(r, _)| r.component.as_str()));
        let errors = StringArray::from_iter_values(self.dead.iter().map(|(r, _)| r.reason.as_str()));
        RecordBatch::try_new(
            dead_letter_schema(),
            vec![Arc::new(keys), Arc::new(sources), Arc::new(stages), Arc::new(errors)],
        )
        .expect("the dead-letter columns match their schema")
    }
}

/// Columns of a dead-letter file: the record key, the input unit it came
/// from, the source or stage that rejected it, and why.
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
    ]))
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;

    use super::*;
    use crate::batch::Mark;
    use crate::sink::checkpoint::{self, CHECKPOINT_FILE};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]))
    }

    fn sink(dir: &Path, rows: u64) -> RotatingSink {
        let format = FileFormat {
            schema: schema(),
            projection: vec![0],
            compression: FileCompression::default(),
            rows_per_batch: 8,
        };
        let rotate = RotateConfig { rows, bytes: u64::MAX, age_ms: 60_000 };
        RotatingSink::new(dir, format, rotate, checkpoint::recover(dir).unwrap(), "id")
    }

    fn batch(ids: std::ops::Range<i64>, unit: &str, rejected: &[&str]) -> Batch {
        let records = (ids.end + rejected.len() as i64) as u64;
        let data = RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from_iter_values(ids))]).unwrap();
        let rejected = rejected
            .iter()
            .map(|key| Rejected {
                key: key.to_string(),
                component: String::from("stage"),
                reason: String::from("bad"),
                origin: None,
            })
            .collect();
        let mut batch = Batch::new(data, rejected);
        batch.marks.push(Mark { unit: Arc::from(unit), records, complete: false });
        batch
    }

    #[test]
    fn commit_writes_files_and_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink(dir.path(), 4);
        sink.write(batch(0..5, "a.arrow", &["x"]));
        assert!(sink.is_full(), "5 rows reach the 4-row limit");
        let committed = sink.commit().unwrap().expect("there is something to commit");
        assert_eq!(committed.rows, 5);
        assert_eq!(committed.dead_letters, ["stage"]);
        assert!(dir.path().join("part-00000000.arrow").is_file(), "the output file is committed");
        assert!(dir.path().join("dead-00000000.arrow").is_file(), "the dead-letter file is committed");
        let recovered = checkpoint::recover(dir.path()).unwrap();
        assert_eq!(recovered.next_file, 1);
        assert_eq!(recovered.progress("a.arrow").records, 6, "5 rows and 1 rejection are durable");
        assert!(sink.commit().unwrap().is_none(), "nothing is left to commit");
    }

    #[test]
    fn recovery_takes_newer_footer_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink(dir.path(), 4);
        sink.write(batch(0..4, "a.arrow", &[]));
        sink.commit().unwrap();
        let first = std::fs::read(dir.path().join(CHECKPOINT_FILE)).unwrap();
        sink.write(batch(4..8, "a.arrow", &[]));
        sink.commit().unwrap();
        // A crash after the second file's rename, before its checkpoint.json.
        std::fs::write(dir.path().join(CHECKPOINT_FILE), first).unwrap();
        let recovered = checkpoint::recover(dir.path()).unwrap();
        assert_eq!(recovered.next_file, 2, "the footer of part 1 is newer than checkpoint.json");
        assert_eq!(recovered.progress("a.arrow").records, 8);
    }

    #[test]
    fn recovery_removes_torn_and_orphan_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink(dir.path(), 4);
        sink.write(batch(0..4, "a.arrow", &["x"]));
        sink.commit().unwrap();
        let checkpoint_text = std::fs::read(dir.path().join(CHECKPOINT_FILE)).unwrap();
        sink.write(batch(4..8, "a.arrow", &["y"]));
        sink.commit().unwrap();
        // A crash after dead-00000001 was renamed but before part-00000001 was.
        std::fs::remove_file(dir.path().join("part-00000001.arrow")).unwrap();
        std::fs::write(dir.path().join(CHECKPOINT_FILE), checkpoint_text).unwrap();
        std::fs::write(dir.path().join("part-00000001.arrow.partial"), b"torn").unwrap();
        let recovered = checkpoint::recover(dir.path()).unwrap();
        assert_eq!(recovered.next_file, 1, "commit 1 did not finish");
        assert!(!dir.path().join("dead-00000001.arrow").exists(), "the orphan dead-letter file is removed");
        assert!(!dir.path().join("part-00000001.arrow.partial").exists(), "the torn file is removed");
        assert!(dir.path().join("dead-00000000.arrow").exists(), "committed files stay");
    }

    #[test]
    fn commit_only_when_marks_cover_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink(dir.path(), 1);
        let mut inside = batch(0..2, "a.arrow", &[]);
        inside.marks.clear();
        inside.ends_source_batch = false;
        sink.write(inside);
        assert!(sink.is_full());
        assert!(!sink.at_boundary(), "rows without a covering mark block a commit");
        sink.write(batch(2..4, "a.arrow", &[]));
        assert!(sink.at_boundary());
    }
}
