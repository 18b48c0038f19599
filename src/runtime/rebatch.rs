//! Regrouping rows into batches of a fixed size before a stage that wants
//! them (the model stage). Rejections travel on with the next batch that is
//! sent, so their order relative to the rows is kept.
//!
//! After a fan-out, a batch is cut only where a record's first sample
//! starts, so every batch contains all the samples of its records. Such batches
//! may then hold more than `size` rows, up to `size` plus one record's
//! samples minus one.

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::{Int32Type, SchemaRef};
use tokio::sync::mpsc;

use crate::batch::{Batch, Rejected, SAMPLE_COLUMN};

/// Reads batches from `input` and sends batches of `size` rows to `output`,
/// plus a last, smaller one when the input ends. Returns when the input is
/// closed or the output is dropped.
pub async fn rebatch(mut input: mpsc::Receiver<Batch>, output: mpsc::Sender<Batch>, size: usize, schema: SchemaRef) {
    let mut pending: Vec<RecordBatch> = Vec::new();
    let mut pending_rows = 0;
    let mut rejected: Vec<Rejected> = Vec::new();

    while let Some(batch) = input.recv().await {
        rejected.extend(batch.rejected);
        if batch.data.num_rows() > 0 {
            pending_rows += batch.data.num_rows();
            pending.push(batch.data);
        }
        if pending_rows < size {
            continue;
        }

        let joined = concat_batches(&schema, &pending).expect("batches before a stage share its input schema");
        pending.clear();
        let mut offset = 0;
        while let Some(end) = cut(&joined, offset, size) {
            let chunk = joined.slice(offset, end - offset);
            offset = end;
            if output.send(Batch::new(chunk, std::mem::take(&mut rejected))).await.is_err() {
                return;
            }
        }
        pending_rows = joined.num_rows() - offset;
        if pending_rows > 0 {
            pending.push(joined.slice(offset, pending_rows));
        }
    }

    if pending_rows > 0 || !rejected.is_empty() {
        let joined = concat_batches(&schema, &pending).expect("batches before a stage share its input schema");
        let _ = output.send(Batch::new(joined, rejected)).await;
    }
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

    #[test]
    fn cut_waits_when_record_may_continue() {
        let batch = samples(vec![0, 1, 2, 0, 1]);
        assert_eq!(cut(&batch, 3, 1), None);
        assert_eq!(cut(&batch, 0, 6), None);
    }
}
