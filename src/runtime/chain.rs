//! The chain of stages between a source and a sink.
//!
//! A stage that wants batches of a fixed size (the model stage) gets a
//! regrouping task in front of it, moved up past the stages before it that
//! keep one row per record (noise, augmentation), since their output does
//! not depend on how rows are batched. The stages from one regrouping to the
//! next form a segment. A segment runs on worker threads, as many as the
//! largest `concurrency()` of its stages. Each worker takes the next batch
//! through every stage of the segment, so a batch changes threads once per
//! segment rather than once per stage. Results leave in
//! input order, so the output order equals the input order whatever the
//! parallelism. A model stage with fewer sessions than workers makes the
//! extra workers wait for a free session. Segments and regroupings are
//! joined by bounded channels of `channel_capacity` batches.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;

use super::execute::RunError;
use super::rebatch::{Flushing, Regrouper, rebatch};
use crate::batch::Batch;
use crate::stage::{Stage, StageError};

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

/// The source of the batches of a chain's first segment.
pub enum Intake {
    /// A channel fed by another task.
    Channel(mpsc::Receiver<Batch>),
    /// A function the segment's workers call, one at a time, for the next
    /// batch (`None` at the end). The one-shot run reads its source this
    /// way, so a batch is read, processed and written on one thread.
    Pull(Box<dyn FnMut() -> Result<Option<Batch>, RunError> + Send>),
}

/// The destination of the batches of a chain's last segment, in input order.
pub enum Outlet {
    /// A channel read by another task.
    Channel(mpsc::Sender<Batch>),
    /// A function the segment's workers call, one at a time.
    Push(Box<dyn FnMut(Batch) -> Result<(), RunError> + Send>),
}

/// Spawns the regroupings and segments of `stages` onto `tasks`, reading
/// from `input`, and returns the receiver of the last stage's batches.
pub fn spawn_stages(
    tasks: &mut JoinSet<Result<(), RunError>>,
    stages: &[Arc<dyn Stage>],
    stage_inputs: Vec<SchemaRef>,
    input: mpsc::Receiver<Batch>,
    options: &ChainOptions,
) -> mpsc::Receiver<Batch> {
    let (tx, rx) = mpsc::channel(options.channel_capacity);
    spawn_chain(tasks, stages, stage_inputs, Intake::Channel(input), Outlet::Channel(tx), options);
    rx
}

/// Spawns the regroupings and segments of `stages` onto `tasks`, from
/// `intake` to `outlet`. A chain without stages still runs one segment,
/// which passes batches on.
///
/// A regrouping in front of the first segment runs as its own task when
/// the intake is a channel, and inside the intake when the intake is a
/// pull. A pull regrouping ignores `max_delay` and `flush_request`, which
/// only a channel intake (the daemon's) needs.
pub fn spawn_chain(
    tasks: &mut JoinSet<Result<(), RunError>>,
    stages: &[Arc<dyn Stage>],
    stage_inputs: Vec<SchemaRef>,
    intake: Intake,
    outlet: Outlet,
    options: &ChainOptions,
) {
    let regroupings = regroupings(stages);
    let mut intake = intake;
    let mut outlet = Some(outlet);
    let mut start = 0;
    loop {
        if let Some(&(_, size)) = regroupings.iter().find(|&&(at, _)| at == start) {
            let schema = stage_inputs[start].clone();
            intake = match intake {
                Intake::Channel(upstream) => {
                    let (tx, rx) = mpsc::channel(options.channel_capacity);
                    let flushing = Flushing { max_delay: options.max_delay, requested: options.flush_request.clone() };
                    tasks.spawn(async move {
                        rebatch(upstream, tx, size, schema, flushing).await;
                        Ok(())
                    });
                    Intake::Channel(rx)
                }
                Intake::Pull(pull) => {
                    let mut regrouper = Regrouper::new(pull, size, schema);
                    Intake::Pull(Box::new(move || regrouper.next()))
                }
            };
        }
        let end = regroupings.iter().map(|&(at, _)| at).find(|&at| at > start).unwrap_or(stages.len());
        let last = end == stages.len();
        let (segment_outlet, next_intake) = if last {
            (outlet.take().expect("the outlet is used once, by the last segment"), None)
        } else {
            let (tx, rx) = mpsc::channel(options.channel_capacity);
            (Outlet::Channel(tx), Some(Intake::Channel(rx)))
        };
        tasks.spawn(run_segment(stages[start..end].to_vec(), intake, segment_outlet, options.observer.clone()));
        match next_intake {
            Some(next) => intake = next,
            None => break,
        }
        start = end;
    }
}

/// Returns the positions of the regroupings and their batch sizes: one in
/// front of each stage that wants a fixed batch size, moved up past the
/// stages before it that keep rows, so that they join its segment.
fn regroupings(stages: &[Arc<dyn Stage>]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut floor = 0;
    for (index, stage) in stages.iter().enumerate() {
        let Some(size) = stage.batch_size() else { continue };
        let mut at = index;
        // The stages from `floor` on have no batch size of their own.
        while at > floor && stages[at - 1].keeps_rows() {
            at -= 1;
        }
        found.push((at, size));
        floor = index + 1;
    }
    found
}

/// Runs a segment of stages over its intake on worker threads, as many as
/// the largest concurrency of its stages, putting results to its outlet in
/// input order.
async fn run_segment(
    stages: Vec<Arc<dyn Stage>>,
    intake: Intake,
    outlet: Outlet,
    observer: Option<Arc<dyn StageObserver>>,
) -> Result<(), RunError> {
    let concurrency = stages.iter().map(|stage| stage.concurrency()).max().unwrap_or(1).max(1);
    let spans: Vec<tracing::Span> =
        stages.iter().map(|stage| tracing::info_span!("stage", name = %stage.name())).collect();
    let segment = Arc::new(Segment {
        stages: stages.into_iter().zip(spans).collect(),
        observer,
        intake: Mutex::new(IntakeState { intake, next: 0, ended: false }),
        window: Semaphore::new(concurrency + 1),
        order: Mutex::new(Order { next: 0, done: BTreeMap::new() }),
        outlet: Mutex::new(outlet),
        stopped: AtomicBool::new(false),
        stop: Notify::new(),
    });
    let handle = tokio::runtime::Handle::current();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let segment = segment.clone();
        let handle = handle.clone();
        workers.spawn_blocking(move || segment.work(&handle));
    }
    while let Some(joined) = workers.join_next().await {
        let result = joined.map_err(|err| RunError::Task(err.to_string())).and_then(|r| r);
        if result.is_err() {
            segment.halt();
            return result;
        }
    }
    Ok(())
}

/// The shared state of a segment's workers.
///
/// A worker takes the next batch and its sequence number from the intake,
/// runs it through the stages, and files the result in the order book. Then
/// it puts the batches that are due to the outlet. If another worker is
/// putting already, it leaves them to that one and goes on with its next
/// batch instead of waiting for the write.
///
/// The window has one permit per batch between intake and order book, so at
/// most `concurrency + 1` batches are in the stages and the book, and at
/// most as many more on their way to the outlet. The spare permit lets a
/// worker that finished early start its next batch.
struct Segment {
    stages: Vec<(Arc<dyn Stage>, tracing::Span)>,
    observer: Option<Arc<dyn StageObserver>>,
    intake: Mutex<IntakeState>,
    window: Semaphore,
    order: Mutex<Order>,
    outlet: Mutex<Outlet>,
    stopped: AtomicBool,
    stop: Notify,
}

struct IntakeState {
    intake: Intake,
    next: u64,
    /// Set once the intake returned its end, so it is not called again.
    ended: bool,
}

/// Finished batches waiting for those before them.
struct Order {
    next: u64,
    done: BTreeMap<u64, Result<Batch, StageError>>,
}

impl Order {
    /// Removes the batches that are due, in order.
    fn take_due(&mut self) -> Vec<Result<Batch, StageError>> {
        let mut due = Vec::new();
        while let Some(result) = self.done.remove(&self.next) {
            self.next += 1;
            due.push(result);
        }
        due
    }
}

impl Segment {
    fn work(&self, handle: &tokio::runtime::Handle) -> Result<(), RunError> {
        let result = self.work_until_done(handle);
        if result.is_err() {
            self.halt();
        }
        result
    }

    /// Takes, runs and files batches until the intake ends, the outlet
    /// closes, the segment halts or a batch fails.
    fn work_until_done(&self, handle: &tokio::runtime::Handle) -> Result<(), RunError> {
        loop {
            let Some(permit) = handle.block_on(self.unless_halted(self.window.acquire())) else { return Ok(()) };
            permit.expect("the window is never closed").forget();
            let Some((sequence, batch)) = self.take(handle)? else { return Ok(()) };
            let result = self.run(batch);
            self.order.lock().expect("no worker panics while holding the order book").done.insert(sequence, result);
            if !self.deliver(handle)? {
                self.halt();
                return Ok(());
            }
        }
    }

    /// Puts the due batches to the outlet, and those that become due while
    /// it does. If another worker has taken the outlet, that worker puts
    /// them instead. Returns `false` once a channel outlet is closed or the
    /// segment halted.
    fn deliver(&self, handle: &tokio::runtime::Handle) -> Result<bool, RunError> {
        loop {
            let mut outlet = match self.outlet.try_lock() {
                Ok(outlet) => outlet,
                Err(std::sync::TryLockError::WouldBlock) => return Ok(true),
                Err(std::sync::TryLockError::Poisoned(_)) => panic!("no worker panics while holding the outlet"),
            };
            loop {
                let due = self.order.lock().expect("no worker panics while holding the order book").take_due();
                if due.is_empty() {
                    break;
                }
                self.window.add_permits(due.len());
                for result in due {
                    if !self.put(&mut outlet, result?, handle)? {
                        return Ok(false);
                    }
                }
            }
            drop(outlet);
            // A worker that filed a due batch after the last look above, and
            // found the outlet taken, left it for this one to put.
            let order = self.order.lock().expect("no worker panics while holding the order book");
            if !order.done.contains_key(&order.next) {
                return Ok(true);
            }
        }
    }

    /// Takes the next batch and its sequence number from the intake; `None`
    /// once the intake ended or the segment halted.
    fn take(&self, handle: &tokio::runtime::Handle) -> Result<Option<(u64, Batch)>, RunError> {
        let mut state = self.intake.lock().expect("no worker panics while holding the intake");
        let state = &mut *state;
        let received = match &mut state.intake {
            _ if state.ended || self.stopped.load(Ordering::SeqCst) => None,
            Intake::Channel(input) => handle.block_on(self.unless_halted(input.recv())).flatten(),
            Intake::Pull(pull) => pull()?,
        };
        let Some(batch) = received else {
            state.ended = true;
            return Ok(None);
        };
        state.next += 1;
        Ok(Some((state.next - 1, batch)))
    }

    /// Puts a batch to the outlet; `false` once a channel outlet is closed
    /// or the segment halted.
    fn put(&self, outlet: &mut Outlet, batch: Batch, handle: &tokio::runtime::Handle) -> Result<bool, RunError> {
        match outlet {
            Outlet::Channel(output) => {
                Ok(matches!(handle.block_on(self.unless_halted(output.send(batch))), Some(Ok(()))))
            }
            Outlet::Push(push) => push(batch).map(|()| true),
        }
    }

    /// Runs one batch through the segment's stages.
    fn run(&self, mut batch: Batch) -> Result<Batch, StageError> {
        for (stage, span) in &self.stages {
            batch = span.in_scope(|| process(stage.as_ref(), batch, self.observer.as_deref()))?;
        }
        Ok(batch)
    }

    /// Stops every worker: those waiting return, the others return after
    /// their current batch.
    fn halt(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
    }

    /// Awaits `future` unless the segment is halted first.
    async fn unless_halted<T>(&self, future: impl Future<Output = T>) -> Option<T> {
        let halted = self.stop.notified();
        if self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        tokio::select! {
            biased;
            () = halted => None,
            value = future => Some(value),
        }
    }
}

/// Runs one stage on one batch, and reports it to the observer.
fn process(stage: &dyn Stage, batch: Batch, observer: Option<&dyn StageObserver>) -> Result<Batch, StageError> {
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

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// A stage that passes batches on after a pause that varies by batch,
    /// and fails on the batch whose first id is `fail_at`.
    struct Probe {
        size: Option<usize>,
        keeps_rows: bool,
        concurrency: usize,
        fail_at: Option<i64>,
    }

    impl Probe {
        fn stage(size: Option<usize>, keeps_rows: bool) -> Arc<dyn Stage> {
            Arc::new(Probe { size, keeps_rows, concurrency: 1, fail_at: None })
        }
    }

    impl Stage for Probe {
        fn name(&self) -> &str {
            "probe"
        }

        fn batch_size(&self) -> Option<usize> {
            self.size
        }

        fn concurrency(&self) -> usize {
            self.concurrency
        }

        fn keeps_rows(&self) -> bool {
            self.keeps_rows
        }

        fn process(&self, batch: Batch) -> Result<Batch, StageError> {
            let ids = batch.data.column(0).as_any().downcast_ref::<Int64Array>().expect("an id column");
            let first = ids.value(0);
            if Some(first) == self.fail_at {
                return Err(StageError { stage: String::from("probe"), message: format!("batch at {first}") });
            }
            // Later batches finish sooner, so workers finish out of order.
            std::thread::sleep(Duration::from_micros(200 * (7 - first as u64 % 7)));
            Ok(batch)
        }
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]))
    }

    fn options() -> ChainOptions {
        ChainOptions { channel_capacity: 2, max_delay: None, flush_request: None, observer: None }
    }

    /// Sends `batches` batches of one id each through `stages`, and returns
    /// the ids that came out and the first task error.
    fn run(stages: &[Arc<dyn Stage>], batches: i64) -> (Vec<i64>, Option<String>) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let (tx, rx) = mpsc::channel(2);
            let mut tasks = JoinSet::new();
            let inputs = vec![schema(); stages.len()];
            let mut out = spawn_stages(&mut tasks, stages, inputs, rx, &options());
            tokio::spawn(async move {
                for id in 0..batches {
                    let data = RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(vec![id]))]).unwrap();
                    if tx.send(Batch::new(data, Vec::new())).await.is_err() {
                        break;
                    }
                }
            });
            let mut ids = Vec::new();
            while let Some(batch) = out.recv().await {
                let column = batch.data.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                ids.extend(column.values().iter().copied());
            }
            let mut error = None;
            while let Some(joined) = tasks.join_next().await {
                if let Err(err) = joined.unwrap() {
                    error.get_or_insert(err.to_string());
                }
            }
            (ids, error)
        })
    }

    /// Pulls `batches` batches of three ids each through `stages` with a
    /// pull intake that fails at batch `fail_at`, to a push outlet that
    /// takes `push_pause` per batch, and returns the sizes of the batches
    /// pushed, the ids, and the chain's first error.
    fn pull_through(
        stages: &[Arc<dyn Stage>],
        batches: i64,
        fail_at: Option<i64>,
        push_pause: Duration,
    ) -> (Vec<usize>, Vec<i64>, Option<String>) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let pushed = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let error = runtime.block_on(async {
            let mut next = 0;
            let intake = Intake::Pull(Box::new(move || {
                if Some(next) == fail_at {
                    return Err(RunError::Task(format!("cannot read batch {next}")));
                }
                if next == batches {
                    return Ok(None);
                }
                let ids = Int64Array::from_iter_values(next * 3..next * 3 + 3);
                next += 1;
                Ok(Some(Batch::new(RecordBatch::try_new(schema(), vec![Arc::new(ids)]).unwrap(), Vec::new())))
            }));
            let sink = pushed.clone();
            let outlet = Outlet::Push(Box::new(move |batch| {
                std::thread::sleep(push_pause);
                let column = batch.data.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                let mut sink = sink.lock().unwrap();
                sink.0.push(column.len());
                sink.1.extend(column.values().iter().copied());
                Ok(())
            }));
            let mut tasks = JoinSet::new();
            spawn_chain(&mut tasks, stages, vec![schema(); stages.len()], intake, outlet, &options());
            let mut error = None;
            while let Some(joined) = tasks.join_next().await {
                if let Err(err) = joined.unwrap() {
                    error.get_or_insert(err.to_string());
                }
            }
            error
        });
        let (sizes, ids) = std::mem::take(&mut *pushed.lock().unwrap());
        (sizes, ids, error)
    }

    #[test]
    fn pull_regroups_and_push_keeps_order() {
        let parallel: Arc<dyn Stage> = Arc::new(Probe { size: None, keeps_rows: true, concurrency: 3, fail_at: None });
        let stages = [parallel, Probe::stage(Some(4), true)];
        let (sizes, ids, error) = pull_through(&stages, 11, None, Duration::ZERO);
        assert_eq!(error, None);
        assert_eq!(sizes, [4, 4, 4, 4, 4, 4, 4, 4, 1], "33 rows in batches of 4 and a remainder");
        assert_eq!(ids, (0..33).collect::<Vec<_>>());

        let (_, ids, error) = pull_through(&[], 5, None, Duration::ZERO);
        assert_eq!((ids, error), ((0..15).collect(), None), "a chain without stages passes batches on");
    }

    #[test]
    fn slow_outlet_loses_no_batch() {
        // Pushing takes about as long as a batch, so workers often find the
        // outlet taken and leave their batches to the worker holding it.
        let parallel: Arc<dyn Stage> = Arc::new(Probe { size: None, keeps_rows: true, concurrency: 4, fail_at: None });
        let (sizes, ids, error) = pull_through(&[parallel], 150, None, Duration::from_micros(400));
        assert_eq!(error, None);
        assert_eq!(sizes.len(), 150);
        assert_eq!(ids, (0..450).collect::<Vec<_>>());
    }

    #[test]
    fn pull_failure_stops_chain() {
        let parallel: Arc<dyn Stage> = Arc::new(Probe { size: None, keeps_rows: true, concurrency: 2, fail_at: None });
        let (_, ids, error) = pull_through(&[parallel], 100, Some(6), Duration::ZERO);
        assert_eq!(error.as_deref(), Some("a pipeline task failed unexpectedly: cannot read batch 6"));
        assert!(
            ids.len() <= 18 && ids.iter().copied().eq(0..ids.len() as i64),
            "only batches before the failure, in order: {ids:?}"
        );
    }

    #[test]
    fn regrouping_moves_before_row_keepers() {
        let noise = || Probe::stage(None, true);
        let fan_out = || Probe::stage(None, false);
        let model = |size| Probe::stage(Some(size), true);
        assert_eq!(regroupings(&[noise(), model(64), noise()]), [(0, 64)]);
        assert_eq!(regroupings(&[fan_out(), noise(), model(64)]), [(1, 64)]);
        assert_eq!(regroupings(&[noise(), model(64), noise(), model(32)]), [(0, 64), (2, 32)]);
        assert_eq!(regroupings(&[model(64), model(32)]), [(0, 64), (1, 32)]);
        assert!(regroupings(&[noise(), fan_out()]).is_empty());
    }

    #[test]
    fn workers_keep_input_order() {
        let parallel: Arc<dyn Stage> = Arc::new(Probe { size: None, keeps_rows: true, concurrency: 4, fail_at: None });
        let stages = [parallel, Probe::stage(None, false), Probe::stage(Some(1), true)];
        let (ids, error) = run(&stages, 60);
        assert_eq!(error, None);
        assert_eq!(ids, (0..60).collect::<Vec<_>>());
    }

    #[test]
    fn stage_failure_stops_segment() {
        let failing: Arc<dyn Stage> =
            Arc::new(Probe { size: None, keeps_rows: true, concurrency: 3, fail_at: Some(9) });
        let (ids, error) = run(&[failing], 1000);
        assert_eq!(ids, (0..9).collect::<Vec<_>>(), "every batch before the failing one, in order, and none after");
        assert_eq!(error.as_deref(), Some("stage probe failed: batch at 9"));
    }
}
