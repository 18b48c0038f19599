//! Regrouping rows into batches of a fixed size before a stage that wants
//! them (the model stage).
//!
//! After a fan-out, a batch is cut only where a record's first sample
//! starts, so every batch contains all the samples of its records. Such batches
//! may then hold more than `size` rows, up to `size` plus one record's
//! samples minus one.
//!
//! The rejections and progress marks of an input batch travel with the
//! output batch that contains its last row, so they are never ahead of the
//! rows they follow. With a maximum delay (the daemon's dynamic batching),
//! rows wait at most that long for a full batch before a smaller one is sent.
//!
//! The daemon's sink may commit only after a batch that ends where a source
//! batch ended. Full batches line up with source batches rarely when their
//! sizes differ, so while the sink sets the flush request, every input batch
//! is sent on whole, with the rows pending before it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::{Int32Type, SchemaRef};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::execute::RunError;
use crate::batch::{Batch, Mark, Rejected, SAMPLE_COLUMN};

/// The end of an input batch among the pending rows, with the rejections
/// and marks it carried.
struct InputEnd {
    row: usize,
    rejected: Vec<Rejected>,
    marks: Vec<Mark>,
    /// Whether the input batch ended a source batch.
    ends_source_batch: bool,
}

/// Rows received but not yet sent.
struct Pending {
    schema: SchemaRef,
    parts: Vec<RecordBatch>,
    rows: usize,
    ends: VecDeque<InputEnd>,
    /// When the oldest pending input arrived.
    since: Option<Instant>,
}

impl Pending {
    fn push(&mut self, batch: Batch) {
        if batch.data.num_rows() > 0 {
            self.rows += batch.data.num_rows();
            self.parts.push(batch.data);
        }
        if !batch.rejected.is_empty() || !batch.marks.is_empty() || batch.ends_source_batch {
            self.ends.push_back(InputEnd {
                row: self.rows,
                rejected: batch.rejected,
                marks: batch.marks,
                ends_source_batch: batch.ends_source_batch,
            });
        }
        self.since.get_or_insert_with(Instant::now);
    }

    fn is_empty(&self) -> bool {
        self.rows == 0 && self.ends.is_empty()
    }

    /// Splits the pending rows into batches of `size` rows (or all of them
    /// when `flush` is set) and keeps the rest.
    fn take_batches(&mut self, size: usize, flush: bool) -> Vec<Batch> {
        let joined = concat_batches(&self.schema, &self.parts).expect("batches before a stage share its input schema");
        self.parts.clear();
        let mut batches = Vec::new();
        let mut offset = 0;
        loop {
            let end = match cut(&joined, offset, size) {
                Some(end) => end,
                None if flush && (offset < joined.num_rows() || !self.ends.is_empty()) => joined.num_rows(),
                None => break,
            };
            let mut batch = Batch::new(joined.slice(offset, end - offset), Vec::new());
            batch.ends_source_batch = false;
            while self.ends.front().is_some_and(|input_end| input_end.row <= end) {
                let input_end = self.ends.pop_front().expect("front was checked");
                batch.rejected.extend(input_end.rejected);
                batch.marks.extend(input_end.marks);
                batch.ends_source_batch = input_end.row == end && input_end.ends_source_batch;
            }
            batches.push(batch);
            offset = end;
            if offset == joined.num_rows() && (!flush || self.ends.is_empty()) {
                break;
            }
        }
        self.rows = joined.num_rows() - offset;
        if self.rows > 0 {
            self.parts.push(joined.slice(offset, self.rows));
        }
        for input_end in &mut self.ends {
            input_end.row -= offset;
        }
        // The rows left may have arrived with the oldest, so their wait
        // keeps counting from then: a later flush is early, never late.
        if self.is_empty() {
            self.since = None;
        }
        batches
    }
}

/// When a regrouping sends batches before they are full.
#[derive(Clone, Debug, Default)]
pub struct Flushing {
    /// Maximum wait of the oldest pending row.
    pub max_delay: Option<Duration>,
    /// Set by the sink while it waits for a batch that ends a source batch.
    pub requested: Option<Arc<AtomicBool>>,
}

impl Flushing {
    fn is_requested(&self) -> bool {
        self.requested.as_ref().is_some_and(|flag| flag.load(Ordering::Relaxed))
    }
}

/// Reads batches from `input` and sends batches of `size` rows to `output`,
/// plus a last, smaller one when the input ends, and earlier ones as
/// `flushing` requests. Returns when the input is closed or the output is dropped.
pub async fn rebatch(
    mut input: mpsc::Receiver<Batch>,
    output: mpsc::Sender<Batch>,
    size: usize,
    schema: SchemaRef,
    flushing: Flushing,
) {
    let max_delay = flushing.max_delay;
    let mut pending = Pending { schema, parts: Vec::new(), rows: 0, ends: VecDeque::new(), since: None };
    loop {
        let deadline = match (max_delay, pending.since) {
            (Some(delay), Some(since)) if !pending.is_empty() => Some(since + delay),
            _ => None,
        };
        let received = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, input.recv()).await {
                Ok(received) => received,
                Err(_elapsed) => {
                    if !send_all(&output, pending.take_batches(size, true)).await {
                        return;
                    }
                    continue;
                }
            },
            None => input.recv().await,
        };
        let Some(batch) = received else { break };
        pending.push(batch);
        let flush = flushing.is_requested();
        if (flush || pending.rows >= size) && !send_all(&output, pending.take_batches(size, flush)).await {
            return;
        }
    }
    if !pending.is_empty() {
        send_all(&output, pending.take_batches(size, true)).await;
    }
}

/// Regroups the batches of a pull intake on the calling thread: the same
/// cuts as [`rebatch`] without a maximum delay or flush requests, for a
/// source that is read to its end (the one-shot run).
pub struct Regrouper {
    pull: Box<dyn FnMut() -> Result<Option<Batch>, RunError> + Send>,
    size: usize,
    pending: Pending,
    ready: VecDeque<Batch>,
    ended: bool,
}

impl Regrouper {
    pub fn new(
        pull: Box<dyn FnMut() -> Result<Option<Batch>, RunError> + Send>,
        size: usize,
        schema: SchemaRef,
    ) -> Self {
        let pending = Pending { schema, parts: Vec::new(), rows: 0, ends: VecDeque::new(), since: None };
        Self { pull, size, pending, ready: VecDeque::new(), ended: false }
    }

    /// Returns the next regrouped batch, pulling as many input batches as
    /// that takes; `None` once the input ended and everything was returned.
    pub fn next(&mut self) -> Result<Option<Batch>, RunError> {
        loop {
            if let Some(batch) = self.ready.pop_front() {
                return Ok(Some(batch));
            }
            if self.ended {
                return Ok(None);
            }
            match (self.pull)()? {
                Some(batch) => {
                    self.pending.push(batch);
                    if self.pending.rows >= self.size {
                        self.ready.extend(self.pending.take_batches(self.size, false));
                    }
                }
                None => {
                    self.ended = true;
                    if !self.pending.is_empty() {
                        self.ready.extend(self.pending.take_batches(self.size, true));
                    }
                }
            }
        }
    }
}

/// Sends batches in order; returns false once the receiver is gone.
async fn send_all(output: &mpsc::Sender<Batch>, batches: Vec<Batch>) -> bool {
    for batch in batches {
        if output.send(batch).await.is_err() {
            return false;
        }
    }
    true
}

/// Returns where the batch starting at `offset` ends: `size` rows on, moved
/// forward to the next record's first sample after a fan-out. `None` when
/// the rows left cannot yet fill a batch.
fn cut(joined: &RecordBatch, offset: usize, size: usize) -> Option<usize> {
    let rows = joined.num_rows();
    let mut end = offset + size;
    if end > rows {
        return None;
    }
    if let Some(column) = joined.column_by_name(SAMPLE_COLUMN) {
        let samples = column.as_primitive::<Int32Type>().values();
        while end < rows && samples[end] != 0 {
            end += 1;
        }
        if end == rows {
            // The last record may continue in the next input batch.
            return None;
        }
    }
    Some(end)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int32Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn samples(values: Vec<i32>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(SAMPLE_COLUMN, DataType::Int32, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(values))]).unwrap()
    }

    #[test]
    fn cut_moves_to_record_start() {
        let batch = samples(vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(cut(&batch, 0, 2), Some(3));
        assert_eq!(cut(&batch, 3, 3), Some(6));
        assert_eq!(cut(&batch, 6, 2), Some(9));
    }

    fn ids(values: std::ops::Range<i32>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from_iter_values(values))]).unwrap()
    }

    fn marked(values: std::ops::Range<i32>, unit: &str) -> Batch {
        let records = values.end as u64;
        let mut batch = Batch::new(ids(values), Vec::new());
        batch.marks.push(Mark { unit: Arc::from(unit), records, complete: false });
        batch
    }

    /// Runs `rebatch` over `inputs` and collects what it sends.
    async fn regroup(inputs: Vec<Batch>, size: usize, flushing: Flushing) -> Vec<Batch> {
        let schema = ids(0..0).schema();
        let (tx, rx) = mpsc::channel(16);
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let task = tokio::spawn(rebatch(rx, out_tx, size, schema, flushing));
        for input in inputs {
            tx.send(input).await.unwrap();
        }
        drop(tx);
        task.await.unwrap();
        let mut outputs = Vec::new();
        while let Some(batch) = out_rx.recv().await {
            outputs.push(batch);
        }
        outputs
    }

    #[tokio::test]
    async fn marks_travel_with_last_row() {
        let outputs = regroup(vec![marked(0..3, "a"), marked(3..7, "a")], 4, Flushing::default()).await;
        let sizes: Vec<usize> = outputs.iter().map(|b| b.data.num_rows()).collect();
        assert_eq!(sizes, [4, 3], "7 rows regroup into 4 + 3");
        assert_eq!(outputs[0].marks.len(), 1, "the first mark (3 records) is within the first 4 rows");
        assert_eq!(outputs[0].marks[0].records, 3);
        assert!(!outputs[0].ends_source_batch, "row 4 is inside the second input batch");
        assert_eq!(outputs[1].marks.len(), 1, "the second mark rides the batch with row 7");
        assert_eq!(outputs[1].marks[0].records, 7);
        assert!(outputs[1].ends_source_batch, "the last batch ends where the input ended");
    }

    #[tokio::test]
    async fn rejections_stay_with_their_rows() {
        let mut second = marked(4..8, "a");
        second.rejected.push(Rejected {
            key: String::from("9"),
            component: String::from("source"),
            reason: String::new(),
            origin: None,
        });
        let outputs = regroup(vec![marked(0..4, "a"), second], 2, Flushing::default()).await;
        let rejected: Vec<usize> = outputs.iter().map(|b| b.rejected.len()).collect();
        assert_eq!(rejected, [0, 0, 0, 1], "the rejection waits for the batch ending its input batch");
    }

    #[tokio::test]
    async fn max_delay_sends_partial_batch() {
        let schema = ids(0..0).schema();
        let (tx, rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(4);
        let flushing = Flushing { max_delay: Some(Duration::from_millis(30)), requested: None };
        let task = tokio::spawn(rebatch(rx, out_tx, 64, schema, flushing));
        tx.send(marked(0..5, "a")).await.unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(5), out_rx.recv()).await;
        let batch = sent.expect("the partial batch is sent after the delay").expect("the channel is open");
        assert_eq!(batch.data.num_rows(), 5, "all pending rows are sent");
        assert_eq!(batch.marks.len(), 1, "with their mark");
        assert!(batch.ends_source_batch);
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn flush_request_ends_on_source_batch() {
        let requested = Arc::new(AtomicBool::new(true));
        let flushing = Flushing { max_delay: None, requested: Some(requested) };
        let outputs = regroup(vec![marked(0..5, "a"), marked(5..10, "a")], 4, flushing).await;
        let sizes: Vec<usize> = outputs.iter().map(|b| b.data.num_rows()).collect();
        assert_eq!(sizes, [4, 1, 4, 1], "each input batch is sent on whole, in full batches and a remainder");
        assert!(outputs[1].ends_source_batch, "the first remainder ends its source batch");
        assert!(outputs[3].ends_source_batch, "the second remainder ends its source batch");
    }

    #[tokio::test]
    async fn second_regrouping_keeps_ends() {
        let inputs = || vec![marked(0..5, "a"), marked(5..10, "a"), marked(10..13, "a")];
        let once = regroup(inputs(), 4, Flushing::default()).await;
        let ends: Vec<bool> = once.iter().map(|b| b.ends_source_batch).collect();
        assert_eq!(ends, [false, false, false, true], "rows 0-3, 4-7, 8-11 end inside input batches");
        let twice = regroup(once, 4, Flushing::default()).await;
        let ends_twice: Vec<bool> = twice.iter().map(|b| b.ends_source_batch).collect();
        assert_eq!(ends_twice, ends, "a second regrouping of the same size changes nothing");
    }

    #[test]
    fn cut_waits_when_record_may_continue() {
        let batch = samples(vec![0, 1, 2, 0, 1]);
        assert_eq!(cut(&batch, 3, 1), None);
        assert_eq!(cut(&batch, 0, 6), None);
    }
}
