//! Prometheus metrics of the daemon, all named `stochflow_*`.
//!
//! Counters and histograms are cumulative for the process lifetime, so a config
//! reload does not reset them. A labelled series first appears in
//! [`Metrics::render`] after its first update.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

/// Buckets 1, 2, 4, ..., 4096 rows.
fn rows_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// Buckets 100 µs, 200 µs, ..., 13.1 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-4, 2.0, 18))
}

/// The daemon's metric registry and the metrics in it, shared as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    records_in: Family<SourceLabels, Counter>,
    stage_rows_in: Family<StageLabels, Counter>,
    stage_rows_out: Family<StageLabels, Counter>,
    stage_rejected: Family<StageLabels, Counter>,
    stage_batch_rows: HistogramFamily<StageLabels>,
    stage_seconds: HistogramFamily<StageLabels>,
    model_run_seconds: HistogramFamily<StageLabels>,
    queue_depth: Family<QueueLabels, Gauge<u64, AtomicU64>>,
    records_out: Counter,
    rows_out: Counter,
    dead_letters: Family<StageLabels, Counter>,
    files_committed: Family<KindLabels, Counter>,
    bytes_committed: Family<KindLabels, Counter>,
    accepting: Gauge,
    reloads: Family<ResultLabels, Counter>,
    commit_failures: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Metrics {
            registry: Registry::with_prefix("stochflow"),
            records_in: Family::default(),
            stage_rows_in: Family::default(),
            stage_rows_out: Family::default(),
            stage_rejected: Family::default(),
            stage_batch_rows: Family::new_with_constructor(rows_histogram),
            stage_seconds: Family::new_with_constructor(seconds_histogram),
            model_run_seconds: Family::new_with_constructor(seconds_histogram),
            queue_depth: Family::default(),
            records_out: Counter::default(),
            rows_out: Counter::default(),
            dead_letters: Family::default(),
            files_committed: Family::default(),
            bytes_committed: Family::default(),
            accepting: Gauge::default(),
            reloads: Family::default(),
            commit_failures: Counter::default(),
        };
        metrics.register()
    }

    /// Registers every metric. The registry stores clones, which share their values with the fields.
    fn register(mut self) -> Self {
        let registry = &mut self.registry;

        // Counter names get their `_total` suffix from the encoder.
        registry.register("records_in", "Records read, by source", self.records_in.clone());
        registry.register("stage_rows_in", "Rows that entered a stage", self.stage_rows_in.clone());
        registry.register("stage_rows_out", "Rows that a stage passed on", self.stage_rows_out.clone());
        registry.register("stage_rejected", "Rows that a stage rejected", self.stage_rejected.clone());
        registry.register("stage_batch_rows", "Rows per batch entering a stage", self.stage_batch_rows.clone());
        registry.register_with_unit(
            "stage",
            "Time a stage took for one batch",
            Unit::Seconds,
            self.stage_seconds.clone(),
        );
        registry.register_with_unit(
            "model_run",
            "Time of one ONNX Runtime session run, by stage",
            Unit::Seconds,
            self.model_run_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Entries waiting in a queue: batches or records, depending on the queue",
            self.queue_depth.clone(),
        );
        registry.register("records_out", "Records written to output files", self.records_out.clone());
        registry.register("rows_out", "Rows written to output files", self.rows_out.clone());
        registry.register(
            "dead_letters",
            "Records written to dead-letter files, by failing stage",
            self.dead_letters.clone(),
        );
        registry.register("files_committed", "Files committed, by kind", self.files_committed.clone());
        registry.register("bytes_committed", "Bytes in committed files, by kind", self.bytes_committed.clone());
        registry.register("accepting", "1 while the daemon accepts new input, else 0", self.accepting.clone());
        registry.register("reloads", "Config reloads, by result", self.reloads.clone());
        registry.register("commit_failures", "Failed attempts to commit an output file", self.commit_failures.clone());

        // Both reload series exist from the start, so rate() over them works before the first reload.
        for result in ["ok", "rejected"] {
            let _ = self.reloads.get_or_create(&ResultLabels { result });
        }
        self
    }

    /// Counts records read from a source such as `"watch"` or `"socket"`.
    pub fn records_in(&self, source: &str, records: u64) {
        self.records_in.get_or_create(&SourceLabels { source: source.to_owned() }).inc_by(records);
    }

    /// Records one batch through a stage. `seconds` is the stage's wall time for the batch.
    pub fn stage_batch(&self, stage: &str, rows_in: usize, rows_out: usize, rejected: usize, seconds: f64) {
        let labels = StageLabels { stage: stage.to_owned() };
        self.stage_rows_in.get_or_create(&labels).inc_by(rows_in as u64);
        self.stage_rows_out.get_or_create(&labels).inc_by(rows_out as u64);
        self.stage_rejected.get_or_create(&labels).inc_by(rejected as u64);
        self.stage_batch_rows.get_or_create(&labels).observe(rows_in as f64);
        self.stage_seconds.get_or_create(&labels).observe(seconds);
    }

    /// Records the duration of one model run in the given stage.
    pub fn model_run(&self, stage: &str, seconds: f64) {
        self.model_run_seconds.get_or_create(&StageLabels { stage: stage.to_owned() }).observe(seconds);
    }

    /// Sets the number of entries waiting in `queue`: batches or records, depending on the queue.
    pub fn queue_depth(&self, queue: &str, depth: usize) {
        self.queue_depth.get_or_create(&QueueLabels { queue: queue.to_owned() }).set(depth as u64);
    }

    /// Counts records and their rows written to output files.
    pub fn records_written(&self, records: u64, rows: u64) {
        self.records_out.inc_by(records);
        self.rows_out.inc_by(rows);
    }

    /// Counts records sent to the dead-letter file because `stage` failed on them.
    pub fn dead_lettered(&self, stage: &str, records: u64) {
        self.dead_letters.get_or_create(&StageLabels { stage: stage.to_owned() }).inc_by(records);
    }

    /// Counts one committed file of the given kind (`"output"` or `"dead_letters"`) and its size.
    pub fn file_committed(&self, kind: &str, bytes: u64) {
        let labels = KindLabels { kind: kind.to_owned() };
        self.files_committed.get_or_create(&labels).inc();
        self.bytes_committed.get_or_create(&labels).inc_by(bytes);
    }

    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.set(i64::from(accepting));
    }

    /// Counts a config reload, as `result="ok"` or `result="rejected"`.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn commit_failure(&self) {
        self.commit_failures.inc();
    }

    /// Encodes every metric in the OpenMetrics text format, ending with `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // In prometheus-client 0.26 the text encoder fails only when the writer
        // fails or on native histograms; a String never fails and none are used.
        encode(&mut text, &self.registry).expect("encoding metrics into a String");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the value of the sample line `series` (name and labels, as rendered), if present.
    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
    }

    #[test]
    fn metrics_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Metrics>();
    }

    #[test]
    fn render_ends_with_eof() {
        let text = Metrics::new().render();
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn render_shows_unlabelled_counters_at_zero() {
        let text = Metrics::new().render();
        assert_eq!(sample(&text, "stochflow_records_out_total").as_deref(), Some("0"), "{text}");
        assert_eq!(sample(&text, "stochflow_rows_out_total").as_deref(), Some("0"), "{text}");
        assert_eq!(sample(&text, "stochflow_commit_failures_total").as_deref(), Some("0"), "{text}");
        assert_eq!(sample(&text, "stochflow_accepting").as_deref(), Some("0"), "{text}");
        assert_eq!(sample(&text, r#"stochflow_reloads_total{result="ok"}"#).as_deref(), Some("0"), "{text}");
        assert_eq!(sample(&text, r#"stochflow_reloads_total{result="rejected"}"#).as_deref(), Some("0"), "{text}");
    }

    #[test]
    fn records_written_accumulates() {
        let metrics = Metrics::new();
        metrics.records_written(5, 10);
        let text = metrics.render();
        assert_eq!(sample(&text, "stochflow_records_out_total").as_deref(), Some("5"), "{text}");
        assert_eq!(sample(&text, "stochflow_rows_out_total").as_deref(), Some("10"), "{text}");

        metrics.records_written(2, 3);
        let text = metrics.render();
        assert_eq!(sample(&text, "stochflow_records_out_total").as_deref(), Some("7"), "{text}");
        assert_eq!(sample(&text, "stochflow_rows_out_total").as_deref(), Some("13"), "{text}");
    }

    #[test]
    fn labelled_counters_and_gauges() {
        let metrics = Metrics::new();
        metrics.records_in("watch", 3);
        metrics.records_in("socket", 4);
        metrics.records_in("watch", 1);
        metrics.queue_depth("decode", 7);
        metrics.queue_depth("decode", 2);
        metrics.dead_lettered("classify", 2);
        metrics.file_committed("output", 1000);
        metrics.file_committed("output", 24);
        metrics.file_committed("dead_letters", 50);
        metrics.set_accepting(true);
        metrics.reload(true);
        metrics.reload(false);
        metrics.reload(false);
        metrics.commit_failure();
        let text = metrics.render();

        let expected = [
            (r#"stochflow_records_in_total{source="watch"}"#, "4"),
            (r#"stochflow_records_in_total{source="socket"}"#, "4"),
            (r#"stochflow_queue_depth{queue="decode"}"#, "2"),
            (r#"stochflow_dead_letters_total{stage="classify"}"#, "2"),
            (r#"stochflow_files_committed_total{kind="output"}"#, "2"),
            (r#"stochflow_bytes_committed_total{kind="output"}"#, "1024"),
            (r#"stochflow_files_committed_total{kind="dead_letters"}"#, "1"),
            (r#"stochflow_bytes_committed_total{kind="dead_letters"}"#, "50"),
            ("stochflow_accepting", "1"),
            (r#"stochflow_reloads_total{result="ok"}"#, "1"),
            (r#"stochflow_reloads_total{result="rejected"}"#, "2"),
            ("stochflow_commit_failures_total", "1"),
        ];
        for (series, value) in expected {
            assert_eq!(sample(&text, series).as_deref(), Some(value), "{series} in\n{text}");
        }

        metrics.set_accepting(false);
        assert_eq!(sample(&metrics.render(), "stochflow_accepting").as_deref(), Some("0"));
    }

    #[test]
    fn stage_batch_counters_and_histograms() {
        let metrics = Metrics::new();
        metrics.stage_batch("noise", 3, 2, 1, 0.002);
        metrics.stage_batch("noise", 3, 3, 0, 0.0003);
        metrics.stage_batch("crop", 100, 100, 0, 5.0);
        let text = metrics.render();

        let expected = [
            (r#"stochflow_stage_rows_in_total{stage="noise"}"#, "6"),
            (r#"stochflow_stage_rows_out_total{stage="noise"}"#, "5"),
            (r#"stochflow_stage_rejected_total{stage="noise"}"#, "1"),
            (r#"stochflow_stage_rows_in_total{stage="crop"}"#, "100"),
            // Row histogram: both noise batches had 3 rows, so they fall in the 4-row bucket.
            (r#"stochflow_stage_batch_rows_count{stage="noise"}"#, "2"),
            (r#"stochflow_stage_batch_rows_sum{stage="noise"}"#, "6.0"),
            (r#"stochflow_stage_batch_rows_bucket{le="2.0",stage="noise"}"#, "0"),
            (r#"stochflow_stage_batch_rows_bucket{le="4.0",stage="noise"}"#, "2"),
            (r#"stochflow_stage_batch_rows_bucket{le="4096.0",stage="noise"}"#, "2"),
            (r#"stochflow_stage_batch_rows_bucket{le="+Inf",stage="noise"}"#, "2"),
            (r#"stochflow_stage_batch_rows_bucket{le="64.0",stage="crop"}"#, "0"),
            (r#"stochflow_stage_batch_rows_bucket{le="128.0",stage="crop"}"#, "1"),
            // Latency histogram: 0.3 ms falls in the 0.4 ms bucket, 2 ms in the 3.2 ms bucket.
            (r#"stochflow_stage_seconds_count{stage="noise"}"#, "2"),
            (r#"stochflow_stage_seconds_bucket{le="0.0002",stage="noise"}"#, "0"),
            (r#"stochflow_stage_seconds_bucket{le="0.0004",stage="noise"}"#, "1"),
            (r#"stochflow_stage_seconds_bucket{le="0.0032",stage="noise"}"#, "2"),
            (r#"stochflow_stage_seconds_count{stage="crop"}"#, "1"),
            (r#"stochflow_stage_seconds_bucket{le="6.5536",stage="crop"}"#, "1"),
        ];
        for (series, value) in expected {
            assert_eq!(sample(&text, series).as_deref(), Some(value), "{series} in\n{text}");
        }
        assert!(text.contains("# UNIT stochflow_stage_seconds seconds\n"), "{text}");
    }

    #[test]
    fn seconds_buckets_reach_past_ten_seconds() {
        let metrics = Metrics::new();
        metrics.model_run("classify", 12.0);
        metrics.model_run("classify", 20.0);
        let text = metrics.render();

        assert_eq!(sample(&text, r#"stochflow_model_run_seconds_count{stage="classify"}"#).as_deref(), Some("2"));
        assert_eq!(sample(&text, r#"stochflow_model_run_seconds_sum{stage="classify"}"#).as_deref(), Some("32.0"));
        assert_eq!(
            sample(&text, r#"stochflow_model_run_seconds_bucket{le="13.1072",stage="classify"}"#).as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            sample(&text, r#"stochflow_model_run_seconds_bucket{le="+Inf",stage="classify"}"#).as_deref(),
            Some("2"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        metrics.dead_lettered("a\"b", 1);
        let text = metrics.render();
        assert_eq!(sample(&text, r#"stochflow_dead_letters_total{stage="a\"b"}"#).as_deref(), Some("1"), "{text}");
    }
}
