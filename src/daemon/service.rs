//! The daemon's life cycle: recovery, generations of the pipeline, signals.
//!
//! A generation is one planned pipeline running over the input. It ends on a
//! stop signal, or on SIGHUP when the reloaded file plans without problems.
//! Either way intake stops, the batches in flight are finished and
//! committed, and the checkpoint is written. A reload then starts the next
//! generation from that checkpoint. A second stop signal exits at once, and
//! the next start resumes from the last checkpoint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::http::{self, Health};
use super::input::Input;
use super::metrics::Metrics;
use crate::batch::Batch;
use crate::config::{self, ConfigProblem, LoadedConfig, SinkConfig};
use crate::runtime::{self, ChainOptions, PlannedStages, RunError, StageObserver, error_chain};
use crate::sink::checkpoint::{self, Checkpoint};
use crate::sink::{FileCompression, FileFormat, NatsOutput, NatsSink, RotatingSink, SinkError};
use crate::source::Unacked;

/// Exit code of a stop whose drain did not finish in time.
const EXIT_DRAIN_TIMEOUT: u8 = 1;

/// Requests from the signal handler.
#[derive(Clone, Copy, Debug)]
enum Control {
    /// SIGTERM or SIGINT, with the exit code a second one uses.
    Stop(u8),
    /// SIGHUP.
    Reload,
}

/// State shared by all generations.
struct Shared {
    pipeline_file: PathBuf,
    seed: Option<u64>,
    /// The output directory, unless the output goes to NATS.
    output_dir: Option<PathBuf>,
    /// The NATS output, when the sink is `nats`.
    nats: Option<Arc<NatsOutput>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    durable: watch::Sender<Arc<Checkpoint>>,
    /// Whether the last commit attempt failed.
    commit_failing: AtomicBool,
    /// Whether a generation is draining, so the daemon is not ready.
    draining: AtomicBool,
}

impl Shared {
    /// Records a failed commit or publication: input pauses and the daemon
    /// is not ready until one succeeds.
    fn output_failed(&self, reason: &str) {
        self.metrics.commit_failure();
        self.commit_failing.store(true, Ordering::Relaxed);
        self.metrics.set_accepting(false);
        self.health.set_ready(false, reason);
    }

    /// Records a successful commit or publication. Returns whether the
    /// ones before it failed, in which case input resumes.
    fn output_recovered(&self) -> bool {
        if !self.commit_failing.swap(false, Ordering::Relaxed) {
            return false;
        }
        self.metrics.set_accepting(true);
        if !self.draining.load(Ordering::Relaxed) {
            self.health.set_ready(true, "");
        }
        true
    }
}

/// The step after a generation ends.
enum Next {
    Stop,
    Reload(Box<(LoadedConfig, PlannedStages)>),
}

/// Runs the daemon until a stop signal; returns 0 after a clean drain.
pub fn run(pipeline_file: &Path, seed: Option<u64>) -> anyhow::Result<ExitCode> {
    let loaded = load(pipeline_file, seed)?;
    let Some(sink) = loaded.config.sink.arrow_file() else {
        // Output to NATS leaves no files to lock or recover.
        return serve(pipeline_file, seed, loaded, None, Arc::new(AtomicBool::new(false)));
    };
    let output_dir = sink.path.clone();
    let new_dir = !output_dir.exists();
    // Held until the process exits: recovery removes other writers' files.
    let _lock = lock_output(&output_dir)?;
    let started = Arc::new(AtomicBool::new(false));
    let result = serve(pipeline_file, seed, loaded, Some(output_dir.clone()), started.clone());
    if result.is_err() && !started.load(Ordering::SeqCst) {
        undo_start(&output_dir, new_dir);
    }
    result
}

/// Recovers the checkpoint, opens the input and the health server, and
/// supervises the pipeline until a stop. `started` is set once the input
/// and the server are open.
fn serve(
    pipeline_file: &Path,
    seed: Option<u64>,
    loaded: LoadedConfig,
    output_dir: Option<PathBuf>,
    started: Arc<AtomicBool>,
) -> anyhow::Result<ExitCode> {
    let checkpoint = match &output_dir {
        Some(dir) => checkpoint::recover(dir)?,
        None => Checkpoint::new(),
    };
    match (&output_dir, &loaded.config.sink) {
        (Some(dir), _) => tracing::info!(
            pipeline = %pipeline_file.display(),
            seed = loaded.config.seed,
            output = %dir.display(),
            next_file = checkpoint.next_file,
            units_durable = checkpoint.units.len(),
            "daemon starting"
        ),
        (None, sink) => {
            let output = match sink {
                SinkConfig::Nats(nats) => format!("{} on {}", nats.subject, nats.url),
                other => other.kind().to_string(),
            };
            tracing::info!(pipeline = %pipeline_file.display(), seed = loaded.config.seed, output = %output, "daemon starting");
        }
    }

    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    tokio.block_on(async move {
        let (durable, durable_rx) = watch::channel(Arc::new(checkpoint.clone()));
        let as_config_error = |err: crate::source::SourceError, default_key: &str| {
            anyhow::anyhow!(loaded.error(vec![ConfigProblem::new(
                err.config_path().unwrap_or(default_key),
                error_chain(&err)
            )]))
        };
        let input = Input::open(&loaded.config.source, durable_rx).await.map_err(|err| as_config_error(err, "source.path"))?;
        let nats = match (&loaded.config.sink, input.ack_wait()) {
            (SinkConfig::Nats(sink), Some(ack_wait)) => Some(Arc::new(
                NatsOutput::connect(sink, ack_wait).await.map_err(|err| as_config_error(err, "sink.url"))?,
            )),
            _ => None,
        };
        let shared = Arc::new(Shared {
            pipeline_file: pipeline_file.to_path_buf(),
            seed,
            output_dir,
            nats,
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new()),
            durable,
            commit_failing: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        });
        let connections: Vec<(String, async_nats::Client)> =
            input.nats_connection().into_iter().chain(shared.nats.as_ref().map(|nats| nats.connection())).collect();
        if !connections.is_empty() {
            tokio::spawn(watch_connections(shared.clone(), connections));
        }
        let (control_tx, control) = mpsc::channel(4);
        tokio::spawn(watch_signals(control_tx));
        let http_server = match &loaded.config.daemon.http {
            Some(address) => {
                let address: SocketAddr = address.parse().expect("the address is checked when the file is loaded");
                let listener = http::bind(address).await?;
                if !address.ip().is_loopback() {
                    tracing::warn!(address = %address, "the health and metrics server listens outside loopback, without authentication");
                }
                let (metrics, health) = (shared.metrics.clone(), shared.health.clone());
                Some(tokio::spawn(http::serve(listener, metrics, health, std::future::pending())))
            }
            None => None,
        };
        started.store(true, Ordering::SeqCst);
        let code = supervise(shared.clone(), loaded, input, checkpoint, control).await?;
        if let Some(server) = http_server {
            server.abort();
        }
        Ok(code)
    })
}

/// The stages planned against the first input that fits, and the pipeline
/// file they were planned from.
type FirstPlan = (Arc<LoadedConfig>, PlannedStages);

/// Runs generation after generation until a stop.
async fn supervise(
    shared: Arc<Shared>,
    mut loaded: LoadedConfig,
    mut input: Input,
    mut checkpoint: Checkpoint,
    mut control: mpsc::Receiver<Control>,
) -> anyhow::Result<ExitCode> {
    shared.health.set_ready(true, "");
    shared.metrics.set_accepting(true);

    // The stages are planned against the first input that fits them; an
    // input that does not is rejected, and the daemon goes on waiting.
    // The check plans against the configuration current at that moment, and
    // a reload while waiting replaces it.
    let first_plan: Arc<Mutex<Option<FirstPlan>>> = Arc::default();
    let current = Arc::new(Mutex::new(Arc::new(loaded.clone())));
    let (stash, config) = (first_plan.clone(), current.clone());
    input.set_schema_check(Arc::new(move |schema, key_column| {
        let loaded = config.lock().expect("the configuration lock is never poisoned").clone();
        let planned =
            runtime::plan_stages(&loaded, schema.clone(), key_column.to_string()).map_err(|err| error_chain(&err))?;
        *stash.lock().expect("the plan lock is never poisoned") = Some((loaded, planned));
        Ok(())
    }));
    let (returned, found) = wait_for_schema(&shared, &mut loaded, &current, input, &checkpoint, &mut control).await?;
    input = returned;
    let Some((schema, key_column)) = found else {
        input.close().await;
        tracing::info!("daemon stopped before any input arrived");
        return Ok(ExitCode::SUCCESS);
    };
    let stashed = first_plan.lock().expect("the plan lock is never poisoned").take();
    let as_value =
        |loaded: &LoadedConfig| serde_json::to_value(&loaded.config).expect("a pipeline config always serializes");
    let mut planned = match stashed {
        Some((planned_loaded, planned)) if as_value(&planned_loaded) == as_value(&loaded) => planned,
        // Only a reload between the check and the end of the wait gets here.
        // A reloaded file that does not fit the first input is set aside for
        // the one the input was checked against.
        stashed => match (runtime::plan_stages(&loaded, schema.clone(), key_column.clone()), stashed) {
            (Ok(planned), _) => planned,
            (Err(err), Some((planned_loaded, planned))) => {
                tracing::error!(
                    pipeline = %shared.pipeline_file.display(),
                    error = %error_chain(&err),
                    "the reloaded pipeline file does not fit the first input; running the previous one, which does"
                );
                loaded = (*planned_loaded).clone();
                planned
            }
            (Err(err), None) => return Err(err.into()),
        },
    };
    loop {
        let (returned, durable, next) =
            run_generation(&shared, &loaded, planned, input, checkpoint, &mut control, &schema, &key_column).await?;
        input = returned;
        checkpoint = durable;
        match next {
            Next::Stop => {
                input.close().await;
                if shared.output_dir.is_some() {
                    tracing::info!(
                        next_file = checkpoint.next_file,
                        "daemon stopped after committing every record it read"
                    );
                } else {
                    tracing::info!("daemon stopped after storing the output of every message it read");
                }
                return Ok(ExitCode::SUCCESS);
            }
            Next::Reload(reloaded) => {
                (loaded, planned) = *reloaded;
                tracing::info!(pipeline = %shared.pipeline_file.display(), "reloaded pipeline running");
            }
        }
    }
}

/// Waits for the first input, whose schema the stages are planned against.
/// A reload while waiting replaces the configuration if it loads. Returns
/// no schema on a stop signal. The input moves to a blocking thread and
/// comes back.
async fn wait_for_schema(
    shared: &Shared,
    loaded: &mut LoadedConfig,
    current: &Mutex<Arc<LoadedConfig>>,
    mut input: Input,
    checkpoint: &Checkpoint,
    control: &mut mpsc::Receiver<Control>,
) -> anyhow::Result<(Input, Option<(SchemaRef, String)>)> {
    let stop = Arc::new(AtomicBool::new(false));
    tracing::info!("waiting for the first input");
    let waiting = {
        let stop = stop.clone();
        let checkpoint = checkpoint.clone();
        tokio::task::spawn_blocking(move || {
            let result = input.wait_for_schema(&checkpoint, &stop);
            (input, result)
        })
    };
    tokio::pin!(waiting);
    loop {
        tokio::select! {
            joined = &mut waiting => {
                let (input, result) = joined?;
                return Ok((input, result?));
            }
            Some(request) = control.recv() => match request {
                Control::Stop(_) => {
                    stop.store(true, Ordering::Relaxed);
                }
                Control::Reload => match load_for_reload(shared, loaded) {
                    Ok(new) => {
                        *current.lock().expect("the configuration lock is never poisoned") = Arc::new(new.clone());
                        *loaded = new;
                        shared.metrics.reload(true);
                        tracing::info!("pipeline file reloaded; it is planned against the first input that arrives");
                    }
                    Err(err) => reject_reload(shared, &err),
                },
            }
        }
    }
}

/// Runs one generation; returns the input, the durable checkpoint and what
/// comes next.
#[allow(clippy::too_many_arguments)]
async fn run_generation(
    shared: &Arc<Shared>,
    loaded: &LoadedConfig,
    planned: PlannedStages,
    mut input: Input,
    checkpoint: Checkpoint,
    control: &mut mpsc::Receiver<Control>,
    schema: &SchemaRef,
    key_column: &str,
) -> anyhow::Result<(Input, Checkpoint, Next)> {
    let config = &loaded.config;
    let stop = Arc::new(AtomicBool::new(false));
    let capacity = planned.channel_capacity;
    let (source_tx, source_rx) = mpsc::channel::<Batch>(capacity);
    let intake_depth = source_tx.downgrade();

    let keep_unit = input.keeps_unit();
    let unacked = input.unacked();
    let mut source_task = {
        let stop = stop.clone();
        let metrics = shared.metrics.clone();
        let durable = checkpoint.clone();
        tokio::task::spawn_blocking(move || {
            let _span = tracing::info_span!("source").entered();
            let kind = input.kind();
            let result = input.run(&durable, &source_tx, &stop, &|records| metrics.records_in(kind, records));
            (input, result)
        })
    };

    let mut tasks: JoinSet<Result<(), RunError>> = JoinSet::new();
    let flush_request = Arc::new(AtomicBool::new(false));
    let observer: Arc<dyn StageObserver> = Arc::new(MetricsObserver(shared.metrics.clone()));
    let options = ChainOptions {
        channel_capacity: capacity,
        max_delay: Some(Duration::from_millis(config.daemon.max_delay_ms)),
        flush_request: Some(flush_request.clone()),
        observer: Some(observer),
    };
    let sink_rx = runtime::spawn_stages(&mut tasks, &planned.stages, planned.stage_inputs.clone(), source_rx, &options);
    let (codec, level) = config.sink.compression();
    let format = FileFormat {
        schema: planned.output_schema.clone(),
        projection: planned.projection.clone(),
        compression: FileCompression { codec, level },
        rows_per_batch: config.sink.arrow_file().map_or(usize::MAX, |sink| sink.rows_per_batch),
    };
    let sink_task = match (&shared.nats, &shared.output_dir, unacked) {
        (Some(target), _, Some(unacked)) => {
            let sink = NatsSink::new(format, &planned.key_column);
            let (target, shared) = (target.clone(), shared.clone());
            tokio::spawn(async move {
                run_nats_sink(sink, sink_rx, target, unacked, shared).await?;
                Ok(checkpoint)
            })
        }
        (_, Some(dir), _) => {
            let mut sink =
                RotatingSink::new(dir, format, config.daemon.rotate.clone(), checkpoint, &planned.key_column);
            sink.prune_units(keep_unit);
            tokio::spawn(run_sink(sink, sink_rx, shared.clone(), intake_depth, flush_request))
        }
        _ => unreachable!("a daemon writes to a directory, or to NATS from a NATS input"),
    };

    // Run until a stop, an accepted reload or a failure.
    let mut next = None;
    let mut failure: Option<anyhow::Error> = None;
    while next.is_none() && failure.is_none() {
        tokio::select! {
            Some(request) = control.recv() => match request {
                Control::Stop(_) => {
                    tracing::info!("stop signal received; finishing the records in flight, send it again to exit at once");
                    next = Some(Next::Stop);
                }
                Control::Reload => match reload(shared, loaded, schema, key_column) {
                    Ok((new, new_planned)) => {
                        tracing::info!("pipeline file reloaded; finishing the records in flight under the old one");
                        next = Some(Next::Reload(Box::new((new, new_planned))));
                    }
                    Err(err) => reject_reload(shared, &err),
                },
            },
            Some(joined) = tasks.join_next() => {
                if let Ok(Err(err)) | Err(err) = joined.map_err(|err| RunError::Task(err.to_string())) {
                    failure = Some(err.into());
                }
            }
            joined = &mut source_task => {
                // The input returns early only on an error, or when a stage
                // failed and closed the channel. In that case the stage's
                // error is the one to report.
                failure = Some(match joined {
                    Ok((_, Err(err))) => anyhow::Error::new(err).context("reading the input failed"),
                    Ok((_, Ok(()))) => match tasks.join_next().await {
                        Some(Ok(Err(err))) => err.into(),
                        _ => anyhow::anyhow!("the input stopped unexpectedly"),
                    },
                    Err(err) => err.into(),
                });
            }
        }
    }

    stop.store(true, Ordering::Relaxed);
    if let Some(err) = failure {
        // What was committed stays; what was in flight is read again on the
        // next start.
        tasks.abort_all();
        tracing::error!(error = %format!("{err:#}"), "pipeline failed; committed output is kept and a restart resumes from it");
        return Err(err);
    }
    shared.draining.store(true, Ordering::Relaxed);
    let reloading = matches!(next, Some(Next::Reload(..)));
    shared.health.set_busy(if reloading { "reloading: draining the running pipeline" } else { "draining" });
    let deadline = Duration::from_millis(config.daemon.drain_timeout_ms);
    let drained = tokio::time::timeout(deadline, async {
        let (input, source_result) = source_task.await?;
        while let Some(joined) = tasks.join_next().await {
            joined.map_err(|err| RunError::Task(err.to_string()))??;
        }
        let durable = sink_task.await??;
        source_result?;
        anyhow::Ok((input, durable))
    })
    .await;
    let (input, durable) = match drained {
        Ok(result) => result?,
        Err(_elapsed) => {
            tracing::error!(
                timeout_ms = config.daemon.drain_timeout_ms,
                "records in flight were not committed in time; exiting, and the next start resumes from the last checkpoint"
            );
            crate::cli::exit_now(EXIT_DRAIN_TIMEOUT);
        }
    };
    let next = next.expect("the loop ends with a next step or a failure");
    if matches!(next, Next::Reload(..)) {
        shared.draining.store(false, Ordering::Relaxed);
        shared.health.set_ready(true, "");
    }
    Ok((input, durable, next))
}

/// Receives the pipeline's output, commits it as files rotate, and publishes
/// each new checkpoint. Returns the checkpoint of the last commit.
///
/// A file due for a commit that contains rows without a covering mark waits for
/// a batch that ends a source batch. Meanwhile `flush_request` requests one
/// from the regroupings.
async fn run_sink(
    mut sink: RotatingSink,
    mut input: mpsc::Receiver<Batch>,
    shared: Arc<Shared>,
    intake: mpsc::WeakSender<Batch>,
    flush_request: Arc<AtomicBool>,
) -> Result<Checkpoint, SinkError> {
    let mut rejections = 0u64;
    loop {
        let deadline = sink.age_deadline().map(tokio::time::Instant::from_std);
        let received = tokio::select! {
            received = input.recv() => received,
            _ = sleep_until(deadline) => {
                if sink.at_boundary() {
                    commit(&mut sink, &shared).await;
                    flush_request.store(false, Ordering::Relaxed);
                } else {
                    flush_request.store(true, Ordering::Relaxed);
                    // Wait for the next batch rather than for the past deadline.
                    match input.recv().await {
                        Some(batch) => sink.write(batch),
                        None => break,
                    }
                    if sink.at_boundary() {
                        commit(&mut sink, &shared).await;
                        flush_request.store(false, Ordering::Relaxed);
                    }
                }
                continue;
            }
        };
        let Some(batch) = received else { break };
        log_rejections(&batch, &mut rejections);
        shared.metrics.queue_depth("sink", input.len());
        if let Some(intake) = intake.upgrade() {
            shared.metrics.queue_depth("intake", intake.max_capacity() - intake.capacity());
        }
        sink.write(batch);
        if sink.is_full() {
            if sink.at_boundary() {
                commit(&mut sink, &shared).await;
                flush_request.store(false, Ordering::Relaxed);
            } else {
                flush_request.store(true, Ordering::Relaxed);
            }
        }
    }
    commit(&mut sink, &shared).await;
    Ok(sink.durable().clone())
}

/// Logs rejected records one by one up to a limit, then one in many.
fn log_rejections(batch: &Batch, rejections: &mut u64) {
    for rejected in &batch.rejected {
        *rejections += 1;
        if runtime::is_rejection_logged(*rejections) {
            tracing::warn!(
                record = %rejected.key,
                origin = rejected.origin.as_deref().unwrap_or(""),
                stage = %rejected.component,
                reason = %rejected.reason,
                rejected_so_far = *rejections,
                "record rejected; it goes to the dead letters"
            );
        }
        if *rejections == runtime::REJECTION_LOG_LIMIT {
            tracing::warn!("further rejected records are logged once every {}", runtime::REJECTION_LOG_EVERY);
        }
    }
}

/// Receives the pipeline's output and, as each input message completes,
/// publishes its output and dead letters to NATS, then acknowledges the
/// message. A failed publication is retried, with input paused meanwhile
/// by the full channels, as for a failed commit.
async fn run_nats_sink(
    mut sink: NatsSink,
    mut input: mpsc::Receiver<Batch>,
    target: Arc<NatsOutput>,
    unacked: Unacked,
    shared: Arc<Shared>,
) -> Result<(), SinkError> {
    let mut rejections = 0u64;
    while let Some(batch) = input.recv().await {
        log_rejections(&batch, &mut rejections);
        shared.metrics.queue_depth("sink", input.len());
        for unit in sink.write(batch) {
            let name = unit.unit.clone();
            let published = publish_until_stored(&sink, &target, unit, &shared).await;
            for stage in &published.dead_letters {
                shared.metrics.dead_lettered(stage, 1);
            }
            shared.metrics.records_written(published.records, published.rows);
            for (kind, bytes) in &published.messages {
                shared.metrics.file_committed(kind, *bytes);
            }
            tracing::info!(
                input = %name,
                records = published.records,
                rows = published.rows,
                dead_letters = published.dead_letters.len(),
                already_stored = published.duplicate,
                "output stored"
            );
            match unacked.take(&name) {
                Some(message) => {
                    if let Err(err) = message.double_ack().await {
                        tracing::warn!(input = %name, error = %err, "cannot acknowledge the message; the server hands it out again, and its output, already stored, is not written twice");
                    }
                }
                None => tracing::warn!(input = %name, "no message to acknowledge for this output"),
            }
        }
    }
    Ok(())
}

/// Publishes a unit's output, retrying with a growing delay until the server
/// stores it.
async fn publish_until_stored(
    sink: &NatsSink,
    target: &NatsOutput,
    mut unit: crate::sink::UnitOutput,
    shared: &Shared,
) -> crate::sink::Published {
    let mut delay = Duration::from_millis(100);
    loop {
        match sink.publish(target, &mut unit).await {
            Ok(published) => {
                if shared.output_recovered() {
                    tracing::info!("publications succeed again; accepting input");
                }
                return published;
            }
            Err(err) => {
                let message = error_chain(&err);
                tracing::error!(error = %message, retry_in_ms = delay.as_millis() as u64, "publication failed; input is paused until it succeeds");
                shared.output_failed(&format!("cannot store output: {message}"));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Commits what the sink holds, retrying until it succeeds. While a commit
/// fails (a full disk, say), the sink reads nothing, so the channels fill
/// and intake stops: nothing accepted is lost.
async fn commit(sink: &mut RotatingSink, shared: &Shared) {
    let mut delay = Duration::from_millis(100);
    loop {
        match tokio::task::block_in_place(|| sink.commit()) {
            Ok(None) => return,
            Ok(Some(committed)) => {
                // Rows and dead letters are counted before the files, so a
                // scrape that counts a file also counts the rows in it.
                for stage in &committed.dead_letters {
                    shared.metrics.dead_lettered(stage, 1);
                }
                shared.metrics.records_written(committed.records, committed.rows);
                for (kind, path, bytes) in &committed.files {
                    shared.metrics.file_committed(kind, *bytes);
                    tracing::info!(file = %path.display(), bytes, "file committed");
                }
                if shared.output_recovered() {
                    tracing::info!("commits succeed again; accepting input");
                }
                shared.durable.send_replace(Arc::new(committed.checkpoint));
                return;
            }
            Err(err) => {
                let message = error_chain(&err);
                tracing::error!(error = %message, retry_in_ms = delay.as_millis() as u64, "commit failed; input is paused until it succeeds");
                shared.output_failed(&format!("cannot commit output: {message}"));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Locks the output directory for this process, so that a second daemon on
/// it fails to start instead of overwriting files and the checkpoint.
fn lock_output(dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir)
        .map_err(|err| anyhow::anyhow!("cannot create the output directory {}: {err}", dir.display()))?;
    let path = dir.join(".stochflow.lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|err| anyhow::anyhow!("cannot open the lock file {}: {err}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another stochflow daemon is writing to {}; stop it, or choose another `sink.path`",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(err)) => {
            anyhow::bail!("cannot lock {}: {err}", path.display())
        }
    }
}

/// Removes what a daemon that could not start left behind: the lock file,
/// and the output directory when the start created it and nothing else was
/// written there.
fn undo_start(dir: &Path, new_dir: bool) {
    let _ = std::fs::remove_file(dir.join(".stochflow.lock"));
    if new_dir {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Loads the pipeline file with the daemon's checks, models included.
fn load(pipeline_file: &Path, seed: Option<u64>) -> anyhow::Result<LoadedConfig> {
    let loaded = config::load(pipeline_file, seed, None)?;
    let mut problems = check(&loaded);
    if problems.is_empty() {
        problems = super::preflight::check_models(&loaded);
    }
    if !problems.is_empty() {
        return Err(loaded.error(problems).into());
    }
    Ok(loaded)
}

/// Checks of the file that only the daemon needs.
pub fn check(loaded: &LoadedConfig) -> Vec<ConfigProblem> {
    let config = &loaded.config;
    let mut problems = Vec::new();
    if !config.source.is_endless() {
        problems.push(ConfigProblem::new(
            "source.kind",
            format!(
                "the daemon reads from a `watch`, `socket` or `nats` source, not {}; use `stochflow run` for a finite source",
                config.source.kind()
            ),
        ));
    }
    if let crate::config::SourceConfig::Socket(socket) = &config.source
        && let Err(message) = crate::source::parse_listen(&socket.listen)
    {
        problems.push(ConfigProblem::new("source.listen", message));
    }
    if let crate::config::SourceConfig::Watch(watch) = &config.source {
        if watch.poll_ms < 10 {
            problems.push(ConfigProblem::new(
                "source.poll_ms",
                format!("{} ms would keep a core busy scanning the directory; use at least 10", watch.poll_ms),
            ));
        }
        let pattern = match watch.read.as_ref() {
            crate::config::SourceConfig::ArrowFile(c) => Some(&c.path),
            crate::config::SourceConfig::Npy(c) => Some(&c.path),
            crate::config::SourceConfig::Images(c) => Some(&c.path),
            _ => None,
        };
        if let Some(pattern) = pattern
            && pattern.components().count() > 1
        {
            problems.push(ConfigProblem::new(
                "source.read.path",
                format!(
                    "{} is a path, but `read.path` is a file name pattern inside `source.path`, such as \"*.arrow\"",
                    pattern.display()
                ),
            ));
        }
    }
    let file_sink = config.sink.arrow_file();
    if file_sink.is_some_and(|sink| sink.images.is_some()) {
        problems.push(ConfigProblem::new("sink.images", "the daemon writes Arrow files only; remove `sink.images`"));
    }
    if let Some(sink) = file_sink
        && crate::sink::is_stdout(&sink.path)
    {
        problems.push(ConfigProblem::new(
            "sink.path",
            "`-` (standard output) is for `stochflow run`; the daemon writes a directory of files, so choose a directory",
        ));
    } else if let Some(sink) = file_sink
        && sink.path.is_file()
    {
        problems.push(ConfigProblem::new(
            "sink.path",
            format!(
                "{} is a file, but the daemon writes a directory of files; choose a directory",
                sink.path.display()
            ),
        ));
    }
    let daemon = &config.daemon;
    if let Some(address) = &daemon.http
        && address.parse::<SocketAddr>().is_err()
    {
        problems.push(ConfigProblem::new(
            "daemon.http",
            format!("{address:?} is not an address such as 127.0.0.1:9464; set an IP address and port, or null"),
        ));
    }
    for (key, value) in [
        ("daemon.rotate.rows", daemon.rotate.rows),
        ("daemon.rotate.bytes", daemon.rotate.bytes),
        ("daemon.rotate.age_ms", daemon.rotate.age_ms),
        ("daemon.drain_timeout_ms", daemon.drain_timeout_ms),
    ] {
        if value == 0 {
            problems.push(ConfigProblem::new(key, "must be at least 1, found 0"));
        }
    }
    problems
}

/// Loads the pipeline file again for SIGHUP. The source and the output
/// directory cannot change while the daemon runs.
fn load_for_reload(shared: &Shared, current: &LoadedConfig) -> anyhow::Result<LoadedConfig> {
    let new = load(&shared.pipeline_file, shared.seed)?;
    let as_json = |value: &crate::config::SourceConfig| serde_json::to_value(value).unwrap_or_default();
    let changes = changed_keys("source", &as_json(&current.config.source), &as_json(&new.config.source));
    if !changes.is_empty() {
        let needs = if changes.len() == 1 { "needs" } else { "need" };
        anyhow::bail!("the new file changes {}, which {needs} a restart of the daemon", changes.join(", "));
    }
    match (&new.config.sink, &current.config.sink) {
        (SinkConfig::ArrowFile(new_sink), SinkConfig::ArrowFile(old_sink)) => {
            if new_sink.path != old_sink.path {
                anyhow::bail!("the new file changes `sink.path`, which needs a restart of the daemon");
            }
        }
        (SinkConfig::Nats(new_sink), SinkConfig::Nats(old_sink)) => {
            let changed = [
                ("url", new_sink.url == old_sink.url),
                ("stream", new_sink.stream == old_sink.stream),
                ("subject", new_sink.subject == old_sink.subject),
                ("dead_letter_subject", new_sink.dead_letter_subject() == old_sink.dead_letter_subject()),
            ];
            if let Some((key, _)) = changed.iter().find(|(_, same)| !same) {
                let as_json = |sink: &crate::config::NatsSinkConfig| {
                    let mut value = serde_json::to_value(sink).unwrap_or_default();
                    value["dead_letter_subject"] = serde_json::Value::from(sink.dead_letter_subject());
                    value[*key].clone()
                };
                anyhow::bail!(
                    "the new file changes `sink.{key}` from {} to {}, which needs a restart of the daemon",
                    as_json(old_sink),
                    as_json(new_sink)
                );
            }
        }
        _ => anyhow::bail!("the new file changes `sink.kind`, which needs a restart of the daemon"),
    }
    if new.config.daemon.http != current.config.daemon.http {
        anyhow::bail!("the new file changes `daemon.http`, which needs a restart of the daemon");
    }
    Ok(new)
}

/// Lists the settings that differ between two JSON values, as `` `path` from
/// OLD to NEW``, descending into objects.
fn changed_keys(path: &str, old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    use serde_json::Value;
    match (old, new) {
        _ if old == new => Vec::new(),
        (Value::Object(old_map), Value::Object(new_map)) => {
            let keys: std::collections::BTreeSet<&String> = old_map.keys().chain(new_map.keys()).collect();
            keys.into_iter()
                .flat_map(|key| {
                    let null = Value::Null;
                    let (before, after) = (old_map.get(key).unwrap_or(&null), new_map.get(key).unwrap_or(&null));
                    changed_keys(&format!("{path}.{key}"), before, after)
                })
                .collect()
        }
        _ => vec![format!("`{path}` from {old} to {new}")],
    }
}

/// Loads and plans the pipeline file again, against the running input's schema.
fn reload(
    shared: &Shared,
    current: &LoadedConfig,
    schema: &SchemaRef,
    key_column: &str,
) -> anyhow::Result<(LoadedConfig, PlannedStages)> {
    let new = load_for_reload(shared, current)?;
    let planned = runtime::plan_stages(&new, schema.clone(), key_column.to_string())?;
    shared.metrics.reload(true);
    Ok((new, planned))
}

fn reject_reload(shared: &Shared, err: &anyhow::Error) {
    shared.metrics.reload(false);
    tracing::error!(
        pipeline = %shared.pipeline_file.display(),
        error = %format!("{err:#}"),
        "reload rejected; the running pipeline goes on unchanged"
    );
}

/// Sets the daemon not ready while a NATS connection is down, and ready
/// again once the client has reconnected.
async fn watch_connections(shared: Arc<Shared>, connections: Vec<(String, async_nats::Client)>) {
    let mut was_down = false;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let down = connections
            .iter()
            .find(|(_, client)| client.connection_state() != async_nats::connection::State::Connected);
        match down {
            Some((url, _)) if !was_down => {
                was_down = true;
                shared.metrics.set_accepting(false);
                shared.health.set_ready(false, &format!("disconnected from the NATS server at {url}; reconnecting"));
            }
            None if was_down => {
                was_down = false;
                let servers: Vec<&str> = connections.iter().map(|(url, _)| url.as_str()).collect();
                tracing::info!(server = %servers.join(", "), "reconnected to the NATS server");
                // A failing publication keeps input paused until it succeeds.
                if !shared.commit_failing.load(Ordering::Relaxed) {
                    shared.metrics.set_accepting(true);
                    if !shared.draining.load(Ordering::Relaxed) {
                        shared.health.set_ready(true, "");
                    }
                }
            }
            _ => {}
        }
    }
}

/// Turns signals into control requests. A second stop signal exits at once.
async fn watch_signals(control: mpsc::Sender<Control>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate), Ok(mut hangup)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
    else {
        tracing::warn!("cannot watch signals; stop the daemon with SIGKILL");
        return;
    };
    let mut stopping = false;
    loop {
        let request = tokio::select! {
            _ = interrupt.recv() => Control::Stop(crate::cli::EXIT_INTERRUPTED),
            _ = terminate.recv() => Control::Stop(crate::cli::EXIT_TERMINATED),
            _ = hangup.recv() => Control::Reload,
        };
        if let Control::Stop(code) = request {
            if stopping {
                tracing::warn!("second stop signal; exiting without committing the records in flight");
                crate::cli::exit_now(code);
            }
            stopping = true;
        }
        if control.send(request).await.is_err() {
            return;
        }
    }
}

/// Feeds stage measurements to the metrics.
struct MetricsObserver(Arc<Metrics>);

impl StageObserver for MetricsObserver {
    fn stage_batch(&self, stage: &str, model: bool, rows_in: usize, rows_out: usize, rejected: usize, seconds: f64) {
        self.0.stage_batch(stage, rows_in, rows_out, rejected, seconds);
        if model {
            self.0.model_run(stage, seconds);
        }
    }
}
