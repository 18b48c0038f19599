//! `stochflow run`: one pass over a finite source.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::config::{self, SinkConfig};
use crate::runtime::{self, Counters};
use crate::sink::{ArrowFileSink, Sink};

pub fn run(pipeline_file: &Path, seed: Option<u64>, output: Option<&Path>) -> anyhow::Result<ExitCode> {
    let loaded = config::load(pipeline_file, seed, output)?;
    let mut pipeline = runtime::plan(&loaded)?;
    let SinkConfig::ArrowFile(sink_config) = &loaded.config.sink;
    let arrow = ArrowFileSink::create(
        &sink_config.path,
        pipeline.output_schema.clone(),
        pipeline.projection.clone(),
        sink_config.compression,
        sink_config.rows_per_batch,
    )?;
    let sink = Sink::new(arrow, pipeline.images.take())?;
    let total = pipeline.source.len_hint();
    tracing::info!(pipeline = %pipeline_file.display(), seed = loaded.config.seed, output = %sink_config.path.display(), "run started");

    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let summary = tokio.block_on(async {
        let counters = Arc::new(Counters::default());
        let progress = super::progress::spawn(counters.clone(), total);
        let signal_counters = counters.clone();
        let partial = sink.partial_path().to_path_buf();
        let signals = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::warn!("interrupt received; finishing the records already read, press Ctrl-C again to abort");
                signal_counters.stop.store(true, Ordering::Relaxed);
                if tokio::signal::ctrl_c().await.is_ok() {
                    // Exiting skips the sink's cleanup, so its partial file is removed here.
                    let _ = std::fs::remove_file(&partial);
                    std::process::exit(i32::from(super::EXIT_INTERRUPTED));
                }
            }
        });
        let result = runtime::execute(pipeline, sink, counters).await;
        progress.abort();
        let _ = progress.await;
        signals.abort();
        result
    })?;

    println!(
        "read {} records, wrote {} records ({} rows), skipped {} records in {:.3} s; output: {}",
        summary.read,
        summary.written,
        summary.rows,
        summary.rejected,
        summary.seconds,
        sink_config.path.display()
    );
    if summary.interrupted {
        eprintln!("interrupted: the output contains the records read before the interrupt");
        return Ok(ExitCode::from(super::EXIT_INTERRUPTED));
    }
    if summary.rejected > 0 {
        eprintln!("{} records were skipped; the log above names each one and why (exit code 2)", summary.rejected);
        return Ok(ExitCode::from(super::EXIT_SKIPPED));
    }
    Ok(ExitCode::SUCCESS)
}
