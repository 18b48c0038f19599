//! Progress of a one-shot run: a bar on a terminal, a log line every few
//! seconds otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::runtime::Counters;

const LOG_INTERVAL: Duration = Duration::from_secs(10);
const BAR_INTERVAL: Duration = Duration::from_millis(200);

/// Reports progress until the returned handle is aborted.
pub fn spawn(counters: Arc<Counters>, total: Option<u64>) -> tokio::task::JoinHandle<()> {
    if std::io::stderr().is_terminal() {
        let bar = match total {
            Some(total) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} records  {rate}  eta {eta}  {msg}")
                    .expect("the template is valid")
                    .with_key("rate", format_rate),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {pos} records  {rate}  {msg}")
                    .expect("the template is valid")
                    .with_key("rate", format_rate),
            ),
        };
        super::logging::set_bar(&bar);
        tokio::spawn(async move {
            let _guard = ClearOnDrop(bar.clone());
            loop {
                let done = counters.written.load(Ordering::Relaxed) + counters.rejected.load(Ordering::Relaxed);
                bar.set_position(done);
                let skipped = counters.rejected.load(Ordering::Relaxed);
                if skipped > 0 {
                    bar.set_message(format!("{skipped} skipped"));
                }
                tokio::time::sleep(BAR_INTERVAL).await;
            }
        })
    } else {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOG_INTERVAL).await;
                tracing::info!(
                    read = counters.read.load(Ordering::Relaxed),
                    written = counters.written.load(Ordering::Relaxed),
                    skipped = counters.rejected.load(Ordering::Relaxed),
                    total = total.map(|t| t.to_string()).unwrap_or_else(|| String::from("unknown")),
                    "progress"
                );
            }
        })
    }
}

/// Removes the bar when the progress task ends or is aborted.
struct ClearOnDrop(ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
        super::logging::clear_bar();
    }
}

/// Formats the rate as whole records per second.
fn format_rate(state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write) {
    let _ = write!(out, "{:.0} records/s", state.per_sec());
}
