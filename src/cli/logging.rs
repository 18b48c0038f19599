//! Log setup. Logs go to standard error through `tracing`. The filter comes
//! from `STOCHFLOW_LOG` (tracing-subscriber's `EnvFilter` syntax) and
//! defaults to `info` for stochflow and `warn` for everything else. While a
//! progress bar is shown, log lines are printed above it.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::ProgressBar;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

static ACTIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Whether log lines are JSON objects.
static JSON: AtomicBool = AtomicBool::new(false);

/// Format of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, with the event's fields and spans.
    Json,
}

/// Installs the subscriber.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("STOCHFLOW_LOG").unwrap_or_else(|_| EnvFilter::new("warn,stochflow=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(BarAwareWriter).with_target(false);
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// Prints a line for the user on standard error: as it is with text logs,
/// or as a log event with JSON logs, so that standard error stays one JSON
/// object per line.
pub fn notice(line: &str) {
    user_line(tracing::Level::INFO, line);
}

/// Prints a warning for the user on standard error, as [`notice`] does.
pub fn warning(line: &str) {
    user_line(tracing::Level::WARN, line);
}

/// Prints an error for the user on standard error, as [`notice`] does,
/// after `error: ` in text.
pub fn error(line: &str) {
    user_line(tracing::Level::ERROR, line);
}

fn user_line(level: tracing::Level, line: &str) {
    if !JSON.load(Ordering::Relaxed) {
        let prefix = if level == tracing::Level::ERROR { "error: " } else { "" };
        eprintln!("{prefix}{line}");
    } else if level == tracing::Level::ERROR {
        tracing::error!("{line}");
    } else if level == tracing::Level::WARN {
        tracing::warn!("{line}");
    } else {
        tracing::info!("{line}");
    }
}

/// Makes log lines print above `bar` until [`clear_bar`].
pub fn set_bar(bar: &ProgressBar) {
    *ACTIVE_BAR.lock().expect("the progress bar lock is never poisoned") = Some(bar.clone());
}

pub fn clear_bar() {
    *ACTIVE_BAR.lock().expect("the progress bar lock is never poisoned") = None;
}

#[derive(Clone, Copy)]
struct BarAwareWriter;

impl<'a> MakeWriter<'a> for BarAwareWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(Vec::new())
    }
}

/// Collects one log event and prints it whole when dropped.
struct LineWriter(Vec<u8>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let bar = ACTIVE_BAR.lock().ok().and_then(|guard| guard.clone());
        let print = || {
            let _ = std::io::stderr().write_all(&self.0);
        };
        match bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}
