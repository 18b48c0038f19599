//! `stochflow run`: one pass over a finite source.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use futures::FutureExt;

use crate::config::{self, ConfigProblem, SinkConfig};
use crate::config::{PipelineConfig, SourceConfig, StageConfig};
use crate::runtime::{self, Counters};
use crate::sink::{ArrowFileSink, FileCompression, Sink, is_stdout, resolve_output};

pub fn run(pipeline_file: &Path, seed: Option<u64>, output: Option<&Path>) -> anyhow::Result<ExitCode> {
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Stop signals are caught from the start, so that one that arrives while
    // the models load ends the run with a message rather than silently.
    let mut stops = {
        let _context = tokio.enter();
        StopSignals::new()
    };
    let loaded = config::load(pipeline_file, seed, output)?;
    let SinkConfig::ArrowFile(sink_config) = &loaded.config.sink else {
        let problem = ConfigProblem::new(
            "sink.kind",
            format!("a `{}` sink runs only under `stochflow daemon`", loaded.config.sink.kind()),
        );
        return Err(loaded.error(vec![problem]).into());
    };
    let mut pipeline = runtime::plan(&loaded)?;
    let compression = FileCompression { codec: sink_config.compression, level: sink_config.compression_level };
    let to_stdout = is_stdout(&sink_config.path);
    let arrow = if to_stdout {
        ArrowFileSink::stdout(
            pipeline.output_schema.clone(),
            pipeline.projection.clone(),
            compression,
            sink_config.rows_per_batch,
        )?
    } else {
        ArrowFileSink::create(
            &resolve_output(&sink_config.path, &input_files(&loaded.config))?,
            pipeline.output_schema.clone(),
            pipeline.projection.clone(),
            compression,
            sink_config.rows_per_batch,
        )?
    };
    let sink = Sink::new(arrow, pipeline.images.take())?;
    let total = pipeline.source.len_hint();
    if let Some(code) = stops.as_mut().and_then(|stops| stops.next().now_or_never()) {
        // Dropping the sink removes its partial file.
        drop(sink);
        super::logging::notice("stop signal received before the first record was read: stopped, no output written");
        return Ok(ExitCode::from(code));
    }
    tracing::info!(pipeline = %pipeline_file.display(), seed = loaded.config.seed, output = %sink_config.path.display(), "run started");

    let stop_code = Arc::new(AtomicU8::new(0));
    let summary = tokio.block_on(async {
        let counters = Arc::new(Counters::default());
        let progress = super::progress::spawn(counters.clone(), total);
        let signal_counters = counters.clone();
        let partial = sink.partial_path().map(Path::to_path_buf);
        let signal_code = stop_code.clone();
        let signals = tokio::spawn(async move {
            let Some(mut stops) = stops else { return };
            let code = stops.next().await;
            tracing::warn!("stop signal received; finishing the records already read, send it again to abort");
            signal_code.store(code, Ordering::Relaxed);
            signal_counters.stop.store(true, Ordering::Relaxed);
            stops.next().await;
            let claimed = signal_counters.ending.compare_exchange(
                runtime::RUNNING,
                runtime::ABORTING,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            if claimed.is_err() {
                // The commit has begun, and it is short: an fsync and a rename.
                // Exiting in its middle would leave the old file or the new one,
                // and the message could not tell which.
                eprintln!("second stop signal received while the output is committed: finishing the commit");
                return;
            }
            // Exiting skips the sink's cleanup, so its partial file is removed here.
            if let Some(partial) = &partial {
                let _ = std::fs::remove_file(partial);
            }
            eprintln!("second stop signal received: aborted, no output written");
            super::exit_now(code);
        });
        let result = runtime::execute(pipeline, sink, counters).await;
        progress.abort();
        let _ = progress.await;
        signals.abort();
        result
    })?;

    let line = format!(
        "read {}, wrote {} ({}), skipped {} in {:.3} s; output: {}",
        count(summary.read, "record"),
        count(summary.written, "record"),
        count(summary.rows, "row"),
        count(summary.rejected, "record"),
        summary.seconds,
        if to_stdout { String::from("standard output") } else { sink_config.path.display().to_string() }
    );
    // Standard output carries the data when it is the output.
    if to_stdout {
        super::logging::notice(&line);
    } else {
        super::out!("{line}");
    }
    if summary.interrupted {
        super::logging::warning("interrupted: the output contains the records read before the stop signal");
        return Ok(ExitCode::from(stop_code.load(Ordering::Relaxed)));
    }
    if summary.rejected > 0 {
        let named = if summary.rejected <= runtime::REJECTION_LOG_LIMIT {
            String::from("names each one and why")
        } else {
            format!(
                "names the first {} and one in every {} after that, with the reason",
                runtime::REJECTION_LOG_LIMIT,
                runtime::REJECTION_LOG_EVERY
            )
        };
        super::logging::warning(&format!(
            "{} skipped; the log above {named} (exit code 2)",
            count(summary.rejected, "record")
        ));
        return Ok(ExitCode::from(super::EXIT_SKIPPED));
    }
    Ok(ExitCode::SUCCESS)
}

/// Files the pipeline reads, which the output must not replace.
fn input_files(config: &PipelineConfig) -> Vec<&Path> {
    let mut files: Vec<&Path> = Vec::new();
    match &config.source {
        SourceConfig::ArrowFile(c) => files.push(&c.path),
        SourceConfig::Npy(c) => files.push(&c.path),
        SourceConfig::Images(c) => files.push(&c.path),
        SourceConfig::Latent(_) | SourceConfig::Socket(_) | SourceConfig::Nats(_) => {}
        SourceConfig::Watch(c) => files.push(&c.path),
    }
    for stage in &config.stages {
        if let StageConfig::Infer(c) = stage {
            files.push(&c.model);
        }
    }
    files
}

/// SIGINT and SIGTERM, caught from the moment this is created.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts catching the signals; `None` if they cannot be caught. Needs
    /// a Tokio runtime context.
    fn new() -> Option<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Self {
            interrupt: signal(SignalKind::interrupt()).ok()?,
            terminate: signal(SignalKind::terminate()).ok()?,
        })
    }

    /// Waits for the next signal and returns the exit code that reports it:
    /// 130 or 143, the shell's 128 + signal number.
    async fn next(&mut self) -> u8 {
        tokio::select! {
            _ = self.interrupt.recv() => super::EXIT_INTERRUPTED,
            _ = self.terminate.recv() => super::EXIT_TERMINATED,
        }
    }
}

/// Formats a count with its noun, singular or plural.
fn count(n: u64, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}
