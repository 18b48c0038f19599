//! The chain of stage tasks between a source and a sink.
//!
//! Each stage runs as its own task, joined to the next by a bounded channel
//! of `channel_capacity` batches. A stage that wants batches of a fixed size
//! gets a regrouping task in front of it. Each stage runs up to
//! `concurrency()` batches at once on blocking threads and emits results in
//! input order, so the output order equals the input order whatever the
//! parallelism.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use super::execute::RunError;
use super::rebatch::rebatch;
use crate::batch::Batch;
use crate::stage::Stage;

/// Receives a measurement of every batch a stage processes.
pub trait StageObserver: Send + Sync {
    /// Called after `stage` processed a batch of `rows_in` rows in `seconds`.
    /// `model` tells whether the stage runs a model.
    fn stage_batch(&self, stage: &str, model: bool, rows_in: usize, rows_out: usize, rejected: usize, seconds: f64);
}

pub struct ChainOptions {
    pub channel_capacity: usize,
    /// Longest time rows wait for a full batch before a model stage; `None`
    /// waits for a full batch or the end of the input.
    pub max_delay: Option<Duration>,
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
    for (stage, input_schema) in stages.iter().zip(stage_inputs) {
        if let Some(size) = stage.batch_size() {
            let (tx, next_rx) = mpsc::channel(options.channel_capacity);
            let upstream = std::mem::replace(&mut rx, next_rx);
            let max_delay = options.max_delay;
            tasks.spawn(async move {
                rebatch(upstream, tx, size, input_schema, max_delay).await;
                Ok(())
            });
        }
        let (tx, next_rx) = mpsc::channel(options.channel_capacity);
        let upstream = std::mem::replace(&mut rx, next_rx);
        tasks.spawn(run_stage(stage.clone(), upstream, tx, options.observer.clone()));
    }
    rx
}

/// Runs one stage over its input, `concurrency()` batches at a time on
/// blocking threads, sending results in input order.
async fn run_stage(
    stage: Arc<dyn Stage>,
    input: mpsc::Receiver<Batch>,
    output: mpsc::Sender<Batch>,
    observer: Option<Arc<dyn StageObserver>>,
) -> Result<(), RunError> {
    let span = tracing::info_span!("stage", name = %stage.name());
    let concurrency = stage.concurrency().max(1);
    let model = stage.batch_size().is_some();
    let mut results = ReceiverStream::new(input)
        .map(|batch| {
            let stage = stage.clone();
            let span = span.clone();
            let observer = observer.clone();
            tokio::task::spawn_blocking(move || {
                span.in_scope(|| {
                    let Some(observer) = observer else { return stage.process(batch) };
                    let started = Instant::now();
                    let rows_in = batch.data.num_rows();
                    let rejected_before = batch.rejected.len();
                    let result = stage.process(batch);
                    if let Ok(out) = &result {
                        let rejected = out.rejected.len().saturating_sub(rejected_before);
                        let seconds = started.elapsed().as_secs_f64();
                        observer.stage_batch(stage.name(), model, rows_in, out.data.num_rows(), rejected, seconds);
                    }
                    result
                })
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
