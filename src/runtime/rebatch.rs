//! Regrouping rows into batches of a fixed size before a stage that wants
//! them (the model stage). Rejections travel on with the next batch that is
//! sent, so their order relative to the rows is kept.

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use tokio::sync::mpsc;

use crate::batch::{Batch, Rejected};

/// Reads batches from `input` and sends batches of exactly `size` rows to
/// `output`, plus a last, smaller one when the input ends. Returns when the
/// input is closed or the output is dropped.
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
        while joined.num_rows() - offset >= size {
            let chunk = joined.slice(offset, size);
            offset += size;
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
