//! The chain of stage tasks between a source and a sink.
//!
//! A stage that wants batches of a fixed size (the model stage) gets a
//! regrouping task in front of it. The stages from one regrouping to the next
//! form a segment, and a segment runs as one task. Each batch goes through
//! all its stages in one call on a blocking thread, so a batch changes
//! threads once per segment rather than once per stage. A segment runs up to
//! the largest `concurrency()` of its stages batches at once, and emits
//! results in input order, so the output order equals the input order
//! whatever the parallelism. A model stage with fewer sessions than that
//! makes the extra calls wait for a free session. Segments and regroupings
//! are joined by bounded channels of `channel_capacity` batches.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use super::execute::RunError;
use super::rebatch::{Flushing, rebatch};
use crate::batch::Batch;
use crate::stage::Stage;

/// Receives a measurement of every batch a stage processes.
pub trait StageObserver: Send + Sync {
    /// Called after `stage` processed a batch of `rows_in` rows in `seconds`.
    /// `model` is true for a stage that runs a model.
    fn stage_batch(&self, stage: &str, model: bool, rows_in: usize, rows_out: usize, rejected: usize, seconds: f64);
}

pub struct ChainOptions {
    pub channel_capacity: usize,
    /// Maximum time rows wait for a full batch before a model stage. `None`
    /// waits for a full batch or the end of the input.
    pub max_delay: Option<Duration>,
    /// Set by the sink to have regroupings send what they hold at the end of
    /// each source batch; see [`Flushing`].
    pub flush_request: Option<Arc<AtomicBool>>,
    pub observer: Option<Arc<dyn StageObserver>>,
}

/// Spawns a task per stage (and per regrouping) onto `tasks`, reading from
/// `input`, and returns the receiver of the last stage's batches.
pub fn spawn_stages(
    tasks: &mut JoinSet<Result<(), RunError>>,
    stages: &[Arc<dyn Stage>],
    stage_inputs: Vec<SchemaRef>,
    input: mpsc::Receiver<Batch>,
    options: &ChainOptions,
) -> mpsc::Receiver<Batch> {
    let mut rx = input;
    let mut start = 0;
    while start < stages.len() {
        if let Some(size) = stages[start].batch_size() {
            let (tx, next_rx) = mpsc::channel(options.channel_capacity);
            let upstream = std::mem::replace(&mut rx, next_rx);
            let schema = stage_inputs[start].clone();
            let flushing = Flushing { max_delay: options.max_delay, requested: options.flush_request.clone() };
            tasks.spawn(async move {
                rebatch(upstream, tx, size, schema, flushing).await;
                Ok(())
            });
        }
        let mut end = start + 1;
        while end < stages.len() && stages[end].batch_size().is_none() {
            end += 1;
        }
        let (tx, next_rx) = mpsc::channel(options.channel_capacity);
        let upstream = std::mem::replace(&mut rx, next_rx);
        tasks.spawn(run_segment(stages[start..end].to_vec(), upstream, tx, options.observer.clone()));
        start = end;
    }
    rx
}

/// Runs a segment of stages over its input, up to the largest concurrency of
/// its stages at a time on blocking threads, sending results in input order.
async fn run_segment(
    stages: Vec<Arc<dyn Stage>>,
    input: mpsc::Receiver<Batch>,
    output: mpsc::Sender<Batch>,
    observer: Option<Arc<dyn StageObserver>>,
) -> Result<(), RunError> {
    let concurrency = stages.iter().map(|stage| stage.concurrency()).max().unwrap_or(1).max(1);
    let spans: Vec<tracing::Span> =
        stages.iter().map(|stage| tracing::info_span!("stage", name = %stage.name())).collect();
    let segment: Arc<[(Arc<dyn Stage>, tracing::Span)]> = stages.into_iter().zip(spans).collect();
    let mut results = ReceiverStream::new(input)
        .map(|batch| {
            let segment = segment.clone();
            let observer = observer.clone();
            tokio::task::spawn_blocking(move || {
                let mut batch = batch;
                for (stage, span) in segment.iter() {
                    batch = span.in_scope(|| process(stage.as_ref(), batch, observer.as_deref()))?;
                }
                Ok::<_, crate::stage::StageError>(batch)
            })
        })
        .buffered(concurrency);
    while let Some(joined) = results.next().await {
        let batch = joined.map_err(|err| RunError::Task(err.to_string()))??;
        if output.send(batch).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Runs one stage on one batch, and reports it to the observer.
fn process(
    stage: &dyn Stage,
    batch: Batch,
    observer: Option<&dyn StageObserver>,
) -> Result<Batch, crate::stage::StageError> {
    let Some(observer) = observer else { return stage.process(batch) };
    let started = Instant::now();
    let rows_in = batch.data.num_rows();
    let rejected_before = batch.rejected.len();
    let result = stage.process(batch);
    if let Ok(out) = &result {
        let rejected = out.rejected.len().saturating_sub(rejected_before);
        let model = stage.batch_size().is_some();
        observer.stage_batch(
            stage.name(),
            model,
            rows_in,
            out.data.num_rows(),
            rejected,
            started.elapsed().as_secs_f64(),
        );
    }
    result
}
