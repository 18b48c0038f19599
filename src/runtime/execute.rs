//! Running a planned pipeline.
//!
//! Each part runs as its own task, joined to the next by a bounded channel
//! of `channel_capacity` batches, so a slow sink slows the source instead of
//! filling memory. The source and the sink do blocking file I/O on blocking
//! threads. Each stage runs up to `concurrency()` batches at once on
//! blocking threads and emits results in input order, so the output order
//! equals the input order whatever the parallelism.
//!
//! Memory is bounded by the channels: at most `channel_capacity` batches
//! wait between two tasks, plus the batches in flight inside each stage and
//! the rows the sink buffers up to one record batch of the file.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;

use super::chain::{ChainOptions, spawn_stages};
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
}

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

    let (source_tx, rx) = mpsc::channel::<Batch>(channel_capacity);
    let source_counters = counters.clone();
    let source_task = tokio::task::spawn_blocking(move || -> Result<(), RunError> {
        let _span = tracing::info_span!("source").entered();
        while !source_counters.stop.load(Ordering::Relaxed) {
            let Some(batch) = source.next_batch()? else { break };
            source_counters.read.fetch_add((batch.data.num_rows() + batch.rejected.len()) as u64, Ordering::Relaxed);
            if source_tx.blocking_send(batch).is_err() {
                break;
            }
        }
        Ok(())
    });

    let options = ChainOptions { channel_capacity, max_delay: None, flush_request: None, observer: None };
    let mut rx = spawn_stages(&mut tasks, &stages, stage_inputs, rx, &options);

    let sink_counters = counters.clone();
    let sink_task = tokio::task::spawn_blocking(move || -> Result<Sink, RunError> {
        let _span = tracing::info_span!("sink").entered();
        let mut sink = sink;
        let mut records = RecordCounter::default();
        let mut logged = 0u64;
        while let Some(batch) = rx.blocking_recv() {
            for rejected in &batch.rejected {
                logged += 1;
                if is_rejection_logged(logged) {
                    tracing::warn!(record = %rejected.key, component = %rejected.component, reason = %rejected.reason, rejected_so_far = logged, "record skipped");
                }
                if logged == REJECTION_LOG_LIMIT {
                    tracing::warn!("further skipped records are logged once every {REJECTION_LOG_EVERY}");
                }
                if records.rejected_keys.insert(rejected.key.clone()) {
                    sink_counters.rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
            sink.write(&batch.data)?;
            sink_counters.rows.fetch_add(batch.data.num_rows() as u64, Ordering::Relaxed);
            sink_counters.written.fetch_add(records.runs.count(&batch.data, &key_column), Ordering::Relaxed);
        }
        Ok(sink)
    });

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
    let source_result = source_task.await.map_err(|err| RunError::Task(err.to_string())).and_then(|r| r);
    let sink_result = sink_task.await.map_err(|err| RunError::Task(err.to_string())).and_then(|r| r);
    if let Some(err) = failure {
        return Err(err);
    }
    source_result?;
    let sink = sink_result?;
    let path = sink.finish()?;
    tracing::info!(path = %path.display(), "output committed");

    Ok(Summary {
        read: counters.read.load(Ordering::Relaxed),
        written: counters.written.load(Ordering::Relaxed),
        rows: counters.rows.load(Ordering::Relaxed),
        rejected: counters.rejected.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        interrupted: counters.stop.load(Ordering::Relaxed),
    })
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
