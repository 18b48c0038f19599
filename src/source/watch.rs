//! Files that arrive in a watched directory, for the daemon.
//!
//! The directory is scanned every `poll_ms`. A file whose name matches the
//! `read.path` pattern is taken once complete: when its size and
//! modification time have not changed for `settle_ms`. Names that start
//! with `.` or end in `.partial` or `.tmp` are never taken, so a writer that
//! creates a file under such a name and renames it in hands over a complete
//! file. Files are taken in name order, and each is read whole with the
//! `read` source before the next.
//!
//! Each file is one input unit, named by its file name. Every batch carries
//! a progress mark, so the checkpoint records which files are fully durable
//! and how far the others are. A file that is complete in the checkpoint is
//! skipped, and a partly durable one resumes after its durable records.
//! Keys stay unique across files: where the `read` source would key records
//! by ordinal, the key is `NAME:ORDINAL` in a string column `key`. A string
//! column `origin` contains each record's file name.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arrow::array::{ArrayRef, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use tokio::sync::{mpsc, watch};

use super::{ORDINAL_COLUMN, SchemaCheck, Source, SourceError, same_but_nullability};
use crate::batch::{Batch, Mark, ORIGIN_COLUMN, Rejected};
use crate::config::{SourceConfig, WatchSourceConfig};
use crate::sink::KeepUnit;
use crate::sink::checkpoint::Checkpoint;

/// Name of the string key column that replaces ordinals.
pub const WATCH_KEY_COLUMN: &str = "key";

pub struct WatchSource {
    config: WatchSourceConfig,
    pattern: glob::Pattern,
    /// Files seen but not yet settled: size, modification time, and when
    /// they were first seen with these.
    candidates: HashMap<String, (u64, SystemTime, Instant)>,
    /// Files handed to the pipeline in this generation that are still in
    /// the directory.
    started: HashSet<String>,
    /// Complete names that were not read in this process, logged once.
    skipped: HashSet<String>,
    /// Names that do not match the pattern, logged once.
    ignored: HashSet<String>,
    /// Whether the directory has been scanned once.
    scanned: bool,
    /// Names read in this process, whose completion needs no log line.
    started_before: HashSet<String>,
    /// The daemon's durable checkpoint, updated after each commit: a file
    /// complete there is not read again.
    durable: watch::Receiver<Arc<Checkpoint>>,
    /// The schema of the first file read, which every file must share.
    schema: Option<(SchemaRef, String)>,
    schema_check: Option<SchemaCheck>,
    /// Files that could not be opened or whose schema failed the check, so
    /// they are not tried again for the schema. Once the schema is known,
    /// they are read again and, if they still fail, rejected.
    unfit: HashSet<String>,
}

/// One file's records, read with the `read` source.
struct FileReader {
    inner: Box<dyn Source>,
    /// Whether the ordinal key is rewritten to `NAME:ORDINAL`.
    rewrite_key: bool,
    schema: SchemaRef,
    key_column: String,
}

impl WatchSource {
    pub fn new(config: &WatchSourceConfig, durable: watch::Receiver<Arc<Checkpoint>>) -> Result<Self, SourceError> {
        let pattern_text = match config.read.as_ref() {
            SourceConfig::ArrowFile(c) => c.path.to_string_lossy().into_owned(),
            SourceConfig::Npy(c) => c.path.to_string_lossy().into_owned(),
            SourceConfig::Images(c) => c.path.to_string_lossy().into_owned(),
            other => {
                return Err(SourceError::Config {
                    path: String::from("source.read.kind"),
                    message: format!(
                        "a watched directory cannot contain {} sources; use arrow_file, npy or images",
                        other.kind()
                    ),
                });
            }
        };
        let pattern = glob::Pattern::new(&pattern_text).map_err(|err| SourceError::Config {
            path: String::from("source.read.path"),
            message: format!("invalid file name pattern {pattern_text:?}: {err}"),
        })?;
        if !config.path.exists() {
            std::fs::create_dir_all(&config.path)
                .map_err(|source| SourceError::Io { path: config.path.clone(), source })?;
            tracing::info!(directory = %config.path.display(), "created the watched directory");
        }
        if !config.path.is_dir() {
            return Err(SourceError::Config {
                path: String::from("source.path"),
                message: format!("{} is not a directory; choose a directory to watch", config.path.display()),
            });
        }
        Ok(Self {
            config: config.clone(),
            pattern,
            candidates: HashMap::new(),
            started: HashSet::new(),
            skipped: HashSet::new(),
            ignored: HashSet::new(),
            scanned: false,
            started_before: HashSet::new(),
            durable,
            schema: None,
            schema_check: None,
            unfit: HashSet::new(),
        })
    }

    pub fn directory(&self) -> &Path {
        &self.config.path
    }

    /// Returns which units the checkpoint keeps: a complete file stays while
    /// it is in the directory. A removed file cannot come back under its
    /// name unless it is new, so the checkpoint drops it.
    pub fn keeps_unit(&self) -> KeepUnit {
        let dir = self.config.path.clone();
        Box::new(move |name, progress| !progress.complete || dir.join(name).exists())
    }

    /// Sets the check that the first file's schema must pass.
    pub fn set_schema_check(&mut self, check: SchemaCheck) {
        self.schema_check = Some(check);
    }

    /// Waits for the first complete file that can be opened and passes the
    /// schema check, and returns the schema and key column of its batches.
    /// Every file must share them. Returns `None` if `stop` is set first.
    pub fn wait_for_schema(
        &mut self,
        _durable: &Checkpoint,
        stop: &AtomicBool,
    ) -> Result<Option<(SchemaRef, String)>, SourceError> {
        while !stop.load(Ordering::Relaxed) {
            if let Some(known) = &self.schema {
                return Ok(Some(known.clone()));
            }
            for name in self.settled_files()? {
                if self.unfit.contains(&name) {
                    continue;
                }
                match self.open_file(&name) {
                    Ok(reader) => {
                        if let Some(check) = &self.schema_check
                            && let Err(reason) = check(&reader.schema, &reader.key_column)
                        {
                            tracing::warn!(file = %name, reason = %reason, "input file does not fit the pipeline; it goes to the dead letters once another file's columns start the pipeline");
                            self.unfit.insert(name);
                            continue;
                        }
                        let known = (reader.schema.clone(), reader.key_column.clone());
                        self.schema = Some(known.clone());
                        return Ok(Some(known));
                    }
                    Err(err) => {
                        tracing::warn!(file = %name, error = %crate::runtime::error_chain(&err), "cannot open input file; it goes to the dead letters once another file's columns start the pipeline");
                        self.unfit.insert(name);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(self.config.poll_ms));
        }
        Ok(None)
    }

    /// Sets the schema every file must have, as planned before.
    pub fn set_schema(&mut self, schema: SchemaRef, key_column: String) {
        self.schema = Some((schema, key_column));
    }

    /// Reads settled files into `output` until `stop` is set or the output
    /// is closed. `on_records` receives the number of records in each batch.
    pub fn run(
        &mut self,
        durable: &Checkpoint,
        output: &mpsc::Sender<Batch>,
        stop: &AtomicBool,
        on_records: &dyn Fn(u64),
    ) -> Result<(), SourceError> {
        // A file cut short by the previous stop resumes from `durable`.
        self.started.clear();
        while !stop.load(Ordering::Relaxed) {
            for name in self.settled_files()? {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                self.started.insert(name.clone());
                self.started_before.insert(name.clone());
                let resume = durable.progress(&name).records;
                if !self.read_file(&name, resume, output, stop, on_records) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(self.config.poll_ms));
        }
        Ok(())
    }

    /// Lists matching files that are settled, not started and not complete
    /// in the durable checkpoint, in name order. A started file that left the
    /// directory is forgotten, so a new file under its name is read once the
    /// checkpoint has dropped the name too.
    fn settled_files(&mut self) -> Result<Vec<String>, SourceError> {
        let durable = self.durable.borrow().clone();
        let dir = &self.config.path;
        let io_error = |source| SourceError::Io { path: dir.clone(), source };
        let settle = Duration::from_millis(self.config.settle_ms);

        let mut present = HashSet::new();
        let mut seen = HashSet::new();
        let mut settled = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            present.insert(name.clone());
            if name.starts_with('.') || name.ends_with(".partial") || name.ends_with(".tmp") {
                continue;
            }
            if !self.pattern.matches(&name) {
                if self.ignored.insert(name.clone()) {
                    tracing::info!(file = %name, pattern = %self.pattern, "not reading this file: its name does not match `read.path`");
                }
                continue;
            }
            if self.started.contains(&name) {
                continue;
            }
            if durable.progress(&name).complete {
                // Files already there at start were read by an earlier run,
                // so only a complete name that shows up later is logged.
                let new_name = self.skipped.insert(name.clone());
                if new_name && self.scanned && !self.started_before.contains(&name) {
                    tracing::info!(file = %name, "not reading this file: its name is complete in the checkpoint; give a new file a new name");
                }
                continue;
            }

            let Ok(metadata) = entry.metadata() else { continue };
            if !metadata.is_file() {
                continue;
            }
            seen.insert(name.clone());
            let modified = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let now = Instant::now();
            let state = self.candidates.entry(name.clone()).or_insert((metadata.len(), modified, now));
            if state.0 != metadata.len() || state.1 != modified {
                *state = (metadata.len(), modified, now);
            }
            if now.duration_since(state.2) >= settle {
                settled.push(name);
            }
        }

        self.candidates.retain(|name, _| seen.contains(name));
        self.started.retain(|name| present.contains(name));
        self.started_before.retain(|name| present.contains(name));
        self.skipped.retain(|name| present.contains(name));
        self.ignored.retain(|name| present.contains(name));
        self.scanned = true;
        settled.sort();
        for name in &settled {
            self.candidates.remove(name);
        }
        Ok(settled)
    }

    /// Opens one file with the `read` source.
    fn open_file(&self, name: &str) -> Result<FileReader, SourceError> {
        let path = self.config.path.join(name);
        let mut read = self.config.read.as_ref().clone();
        match &mut read {
            SourceConfig::ArrowFile(c) => c.path = path,
            SourceConfig::Npy(c) => c.path = path,
            SourceConfig::Images(c) => c.path = path,
            _ => unreachable!("the read kind is checked in WatchSource::new"),
        }
        let inner = super::open(&read, 0)?;
        let inner_schema = inner.schema();
        if inner_schema.field_with_name(ORIGIN_COLUMN).is_ok() {
            return Err(SourceError::Format {
                path: self.config.path.join(name),
                format: "input",
                message: format!(
                    "it has a column named {ORIGIN_COLUMN:?}, which the daemon adds itself; leave it out with `read.columns`"
                ),
            });
        }
        let rewrite_key = inner.key_column() == ORDINAL_COLUMN;
        let mut fields: Vec<Field> = inner_schema
            .fields()
            .iter()
            .map(|field| match rewrite_key && field.name() == ORDINAL_COLUMN {
                true => Field::new(WATCH_KEY_COLUMN, DataType::Utf8, false),
                false => field.as_ref().clone(),
            })
            .collect();
        fields.push(Field::new(ORIGIN_COLUMN, DataType::Utf8, false));
        let key_column = if rewrite_key { WATCH_KEY_COLUMN.to_string() } else { inner.key_column().to_string() };
        Ok(FileReader { inner, rewrite_key, schema: Arc::new(Schema::new(fields)), key_column })
    }

    /// Reads one file, skipping its first `resume` records, and sends its
    /// batches with their marks. A file that cannot be opened or read, or
    /// whose columns differ from the first file's, becomes one rejected
    /// record keyed by its name. Returns false once the pipeline is closed.
    fn read_file(
        &self,
        name: &str,
        resume: u64,
        output: &mpsc::Sender<Batch>,
        stop: &AtomicBool,
        on_records: &dyn Fn(u64),
    ) -> bool {
        let unit: Arc<str> = Arc::from(name);
        let reject_rest = |records: u64, reason: String| {
            let mut batch = Batch::new(RecordBatch::new_empty(self.expected_schema()), Vec::new());
            batch.rejected.push(Rejected {
                key: name.to_string(),
                component: String::from("source"),
                reason,
                origin: Some(name.to_string()),
            });
            batch.marks.push(Mark { unit: unit.clone(), records: records + 1, complete: true });
            batch
        };
        let mut reader = match self.open_file(name) {
            Ok(reader) => reader,
            Err(err) => {
                tracing::warn!(file = %name, error = %crate::runtime::error_chain(&err), "cannot open input file");
                on_records(1);
                let reason = format!(
                    "{}; this file name is not read again, so copy the file in under a new name once it is fixed",
                    error_text(&err)
                );
                return output.blocking_send(reject_rest(resume, reason)).is_ok();
            }
        };
        // A file whose columns differ from the first file's in nullability
        // alone is read with the first file's schema. A null where that
        // schema has none rejects the rest of the file.
        let retype = self.schema.as_ref().and_then(|(expected, _)| {
            (expected.fields() != reader.schema.fields() && same_but_nullability(expected, &reader.schema))
                .then(|| expected.clone())
        });
        if let Some((expected, key_column)) = &self.schema
            && ((expected.fields() != reader.schema.fields() && retype.is_none()) || *key_column != reader.key_column)
        {
            let reason = format!(
                "the file's columns differ from those of the first file read ({}); every file in the directory must have the same columns",
                super::column_difference(expected, &reader.schema)
            );
            tracing::warn!(file = %name, "{reason}");
            on_records(1);
            return output.blocking_send(reject_rest(resume, reason)).is_ok();
        }
        tracing::info!(file = %name, resume_after = resume, "reading input file");

        let mut position = 0u64;
        let mut held: Option<Batch> = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let next = match reader.inner.next_batch() {
                Ok(next) => next,
                Err(err) => {
                    tracing::warn!(file = %name, error = %crate::runtime::error_chain(&err), "cannot read input file");
                    if let Some(batch) = held.take()
                        && output.blocking_send(batch).is_err()
                    {
                        return false;
                    }
                    on_records(1);
                    let reason = format!("records from number {position} on cannot be read: {}", error_text(&err));
                    return output.blocking_send(reject_rest(position.max(resume), reason)).is_ok();
                }
            };
            let Some(batch) = next else { break };
            let records = (batch.data.num_rows() + batch.rejected.len()) as u64;
            let start = position;
            position += records;
            if position <= resume {
                continue;
            }
            let mut batch = reader.convert(batch, name);
            if let Some(expected) = &retype {
                match RecordBatch::try_new(expected.clone(), batch.data.columns().to_vec()) {
                    Ok(data) => batch.data = data,
                    Err(err) => {
                        if let Some(batch) = held.take()
                            && output.blocking_send(batch).is_err()
                        {
                            return false;
                        }
                        on_records(1);
                        let reason = format!(
                            "records from number {start} on do not fit the first file's columns: {err}; every file in the directory must have the same columns"
                        );
                        tracing::warn!(file = %name, "{reason}");
                        return output.blocking_send(reject_rest(start.max(resume), reason)).is_ok();
                    }
                }
            }
            if start < resume {
                // The checkpoint falls inside this batch, which happens only
                // when the read batch size changed since it was written.
                let skip = (resume - start) as usize;
                batch.data =
                    batch.data.slice(skip.min(batch.data.num_rows()), batch.data.num_rows().saturating_sub(skip));
            }
            on_records(records.min(position - resume));
            batch.marks.push(Mark { unit: unit.clone(), records: position, complete: false });
            if let Some(previous) = held.replace(batch)
                && output.blocking_send(previous).is_err()
            {
                return false;
            }
        }
        let finished = !stop.load(Ordering::Relaxed);
        let last = match held {
            Some(batch) => Some(batch),
            None if finished && position <= resume => {
                Some(Batch::new(RecordBatch::new_empty(self.expected_schema()), Vec::new()))
            }
            None => None,
        };
        if let Some(mut batch) = last {
            if finished {
                batch.marks.clear();
                batch.marks.push(Mark { unit, records: position.max(resume), complete: true });
            }
            return output.blocking_send(batch).is_ok();
        }
        true
    }

    fn expected_schema(&self) -> SchemaRef {
        self.schema.as_ref().map(|(schema, _)| schema.clone()).unwrap_or_else(|| Arc::new(Schema::empty()))
    }
}

impl FileReader {
    /// Rewrites ordinal keys to `NAME:ORDINAL`, in the rows and in the
    /// rejections, and adds the origin column.
    fn convert(&self, mut batch: Batch, name: &str) -> Batch {
        for rejected in &mut batch.rejected {
            if self.rewrite_key {
                rejected.key = format!("{name}:{}", rejected.key);
            }
            rejected.origin = Some(name.to_string());
        }
        let mut columns: Vec<ArrayRef> = batch
            .data
            .schema()
            .fields()
            .iter()
            .zip(batch.data.columns())
            .map(|(field, column)| {
                if !self.rewrite_key || field.name() != ORDINAL_COLUMN {
                    return column.clone();
                }
                let ordinals = column.as_primitive::<Int64Type>();
                let keys: StringArray =
                    (0..ordinals.len()).map(|i| Some(format!("{name}:{}", ordinals.value(i)))).collect();
                Arc::new(keys) as ArrayRef
            })
            .collect();
        columns.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(name, batch.data.num_rows()))));
        batch.data = RecordBatch::try_new(self.schema.clone(), columns).expect("the columns match the file's schema");
        batch
    }
}

fn error_text(err: &SourceError) -> String {
    crate::runtime::error_chain(err)
}
