//! Running a planned pipeline.
//!
//! The workers of the first segment read the source themselves, one at a
//! time, and the workers of the last segment write the sink, one at a time
//! and in input order. With a single segment (the common case: noise, the
//! model and sampling), a batch is read, processed and written on one
//! thread, without hand-offs. Segments are joined by bounded channels of
//! `channel_capacity` batches (see the chain module), so a slow sink slows
//! the source instead of filling memory, and the output order equals the
//! input order whatever the parallelism.
//!
//! Memory is bounded by the batches in flight: at most `concurrency()`
//! batches inside each segment, `channel_capacity` batches between two
//! segments, the rows waiting in a regrouping (less than one model batch) and
//! the rows the sink buffers up to one record batch of the file.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::chain::{ChainOptions, Intake, Outlet, spawn_chain};
use super::plan::{Pipeline, error_chain};
use crate::batch::{Batch, RecordRuns};
use crate::sink::{Sink, SinkError};
use crate::source::SourceError;
use crate::stage::StageError;

/// Live counts, shared with the progress display.
#[derive(Debug, Default)]
pub struct Counters {
    pub read: AtomicU64,
    pub written: AtomicU64,
    pub rows: AtomicU64,
    pub rejected: AtomicU64,
    /// Set to stop reading new records; what was read is still finished.
    pub stop: AtomicBool,
    /// Whether the output is being committed or the run aborted. The first
    /// of the two to claim it excludes the other.
    pub ending: AtomicU8,
}

/// Values of [`Counters::ending`].
pub const RUNNING: u8 = 0;
pub const COMMITTING: u8 = 1;
pub const ABORTING: u8 = 2;

/// Counts and duration of a finished run.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Records the source produced, rejected ones included.
    pub read: u64,
    /// Records that reached the output.
    pub written: u64,
    /// Rows written: records times samples per record.
    pub rows: u64,
    /// Records rejected by the source or a stage.
    pub rejected: u64,
    pub seconds: f64,
    /// Whether the run stopped early on request.
    pub interrupted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("a pipeline task failed unexpectedly: {0}")]
    Task(String),
}

/// Rejections are logged one by one up to this count, then one line in this many.
pub const REJECTION_LOG_LIMIT: u64 = 20;
pub const REJECTION_LOG_EVERY: u64 = 1000;

/// Returns whether the `count`-th rejection of a run is logged.
pub fn is_rejection_logged(count: u64) -> bool {
    count <= REJECTION_LOG_LIMIT || count.is_multiple_of(REJECTION_LOG_EVERY)
}

/// Runs the pipeline to the end of its source, or until `counters.stop` is
/// set, and commits the output file.
pub async fn execute(pipeline: Pipeline, sink: Sink, counters: Arc<Counters>) -> Result<Summary, RunError> {
    let started = Instant::now();
    let Pipeline { mut source, stages, stage_inputs, channel_capacity, key_column, .. } = pipeline;
    let mut tasks = tokio::task::JoinSet::new();

    let source_counters = counters.clone();
    let source_span = tracing::info_span!("source");
    let intake = Intake::Pull(Box::new(move || {
        let _span = source_span.enter();
        if source_counters.stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let batch = source.next_batch()?;
        if let Some(batch) = &batch {
            source_counters.read.fetch_add((batch.data.num_rows() + batch.rejected.len()) as u64, Ordering::Relaxed);
        }
        Ok(batch)
    }));

    let output = Arc::new(Mutex::new(Output { sink, records: RecordCounter::default(), logged: 0 }));
    let sink_output = output.clone();
    let sink_counters = counters.clone();
    let sink_span = tracing::info_span!("sink");
    let outlet = Outlet::Push(Box::new(move |batch| {
        let mut output = sink_output.lock().expect("the sink is not used after a panic");
        output.write(&batch, &sink_counters, &key_column, &sink_span)
    }));

    let options = ChainOptions { channel_capacity, max_delay: None, flush_request: None, observer: None };
    spawn_chain(&mut tasks, &stages, stage_inputs, intake, outlet, &options);

    // The first failure is reported; dropping the channels stops the rest.
    let mut failure: Option<RunError> = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.map_err(|err| RunError::Task(err.to_string())).and_then(|r| r);
        if let Err(err) = result {
            tracing::error!(error = %error_chain(&err), "pipeline stage failed");
            failure.get_or_insert(err);
            tasks.abort_all();
        }
    }
    if let Some(err) = failure {
        return Err(err);
    }
    let output = Arc::try_unwrap(output)
        .map_err(|_| RunError::Task(String::from("the sink was still in use after the pipeline finished")))?;
    let sink = output.into_inner().map_err(|err| RunError::Task(err.to_string()))?.sink;
    if counters.ending.compare_exchange(RUNNING, COMMITTING, Ordering::SeqCst, Ordering::SeqCst).is_err() {
        // The run is being aborted, and the process exits without output.
        return Err(RunError::Task(String::from("the run was aborted before its output was committed")));
    }
    let path = sink.finish()?;
    if crate::sink::is_stdout(&path) {
        tracing::info!("output stream to standard output ended");
    } else {
        tracing::info!(path = %path.display(), "output committed");
    }

    Ok(Summary {
        read: counters.read.load(Ordering::Relaxed),
        written: counters.written.load(Ordering::Relaxed),
        rows: counters.rows.load(Ordering::Relaxed),
        rejected: counters.rejected.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        interrupted: counters.stop.load(Ordering::Relaxed),
    })
}

/// The sink of a one-shot run, written by whichever worker puts the next
/// batch in input order.
struct Output {
    sink: Sink,
    records: RecordCounter,
    /// Rejections seen so far, for rate-limited logging.
    logged: u64,
}

impl Output {
    /// Logs the batch's rejections, outside the sink's span since the
    /// record's stage rejected them, and writes its rows.
    fn write(
        &mut self,
        batch: &Batch,
        counters: &Counters,
        key_column: &str,
        span: &tracing::Span,
    ) -> Result<(), RunError> {
        for rejected in &batch.rejected {
            self.logged += 1;
            if is_rejection_logged(self.logged) {
                tracing::warn!(record = %rejected.key, component = %rejected.component, reason = %rejected.reason, rejected_so_far = self.logged, "record skipped");
            }
            if self.logged == REJECTION_LOG_LIMIT {
                tracing::warn!("further skipped records are logged once every {REJECTION_LOG_EVERY}");
            }
            if self.records.rejected_keys.insert(rejected.key.clone()) {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
            }
        }
        span.in_scope(|| self.sink.write(&batch.data))?;
        counters.rows.fetch_add(batch.data.num_rows() as u64, Ordering::Relaxed);
        counters.written.fetch_add(self.records.runs.count(&batch.data, key_column), Ordering::Relaxed);
        Ok(())
    }
}

/// Counts records at the sink. A record that lost some samples to
/// rejections still counts as written, and as skipped.
#[derive(Default)]
struct RecordCounter {
    runs: RecordRuns,
    /// Keys of rejected records, so that a record rejected in several of its
    /// samples counts once. Its size grows with the number of skipped records.
    rejected_keys: std::collections::HashSet<String>,
}
