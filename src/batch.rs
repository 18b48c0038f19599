//! The unit that travels between pipeline tasks.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Int64Type, UInt64Type};

/// Name of the sample-index column that fan-out stages add.
pub const SAMPLE_COLUMN: &str = "sample";

/// Name of the string column the daemon's sources add: the file or stream
/// each record came from.
pub const ORIGIN_COLUMN: &str = "origin";

/// A batch of records plus the records that were rejected on the way.
///
/// Rejected records travel with the batch that would have held them, so that
/// the sink receives every input record exactly once, as a row or as a rejection,
/// and in input order.
///
/// In the daemon, batches also carry the progress marks of the input they
/// came from, so the sink can tell which input is durable once it commits a file.
#[derive(Debug)]
pub struct Batch {
    pub data: RecordBatch,
    pub rejected: Vec<Rejected>,
    /// Input read up to and including this batch's records.
    pub marks: Vec<Mark>,
    /// Whether `marks` cover every record up to this batch's last row, that
    /// is, whether the batch ends where a source batch ended. A file may be
    /// committed only after such a batch, or records in it would be durable
    /// without a mark saying so.
    pub ends_source_batch: bool,
}

impl Batch {
    pub fn new(data: RecordBatch, rejected: Vec<Rejected>) -> Self {
        Self { data, rejected, marks: Vec::new(), ends_source_batch: true }
    }
}

/// Progress through one input unit (a watched file or a socket stream): its
/// first `records` records have been read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub unit: Arc<str>,
    pub records: u64,
    /// Whether the unit has no more records.
    pub complete: bool,
}

/// A record that a source or stage could not process.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    pub key: String,
    /// The source or stage that rejected it.
    pub component: String,
    pub reason: String,
    /// The file or stream the record came from, when the source sets it.
    pub origin: Option<String>,
}

/// Returns the origin of row `row`: its value in the origin column, if the
/// batch has one.
pub fn origin_of(data: &RecordBatch, row: usize) -> Option<String> {
    let column = data.column_by_name(ORIGIN_COLUMN)?;
    let strings = column.as_string_opt::<i32>()?;
    strings.is_valid(row).then(|| strings.value(row).to_string())
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {} rejected by {}: {}", self.key, self.component, self.reason)
    }
}

/// Reads record keys from a key column as the bytes the random streams use.
///
/// Integer keys are written in decimal and strings as their UTF-8 bytes, so
/// the ordinal 5 and the id 5 name the same stream.
pub struct Keys<'a> {
    column: &'a ArrayRef,
}

impl<'a> Keys<'a> {
    pub fn new(batch: &'a RecordBatch, key_column: &str) -> Option<Self> {
        Self::of_column(batch.column_by_name(key_column)?)
    }

    /// Returns the keys in `column`, or `None` when its type cannot be a
    /// key.
    pub fn of_column(column: &'a ArrayRef) -> Option<Self> {
        match column.data_type() {
            DataType::Int64 | DataType::Int32 | DataType::UInt64 | DataType::Utf8 | DataType::LargeUtf8 => {
                Some(Self { column })
            }
            _ => None,
        }
    }

    /// Calls `f` with the key bytes of row `row`, the bytes that [`Keys::get`]
    /// returns as a string, without allocating: random streams are derived
    /// from them once per record.
    pub fn with_bytes<R>(&self, row: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        if self.column.is_null(row) {
            return f(b"<null>");
        }
        // itoa writes the same digits as Display, without the formatting machinery.
        let mut digits = itoa::Buffer::new();
        match self.column.data_type() {
            DataType::Int64 => f(digits.format(self.column.as_primitive::<Int64Type>().value(row)).as_bytes()),
            DataType::Int32 => f(digits.format(self.column.as_primitive::<Int32Type>().value(row)).as_bytes()),
            DataType::UInt64 => f(digits.format(self.column.as_primitive::<UInt64Type>().value(row)).as_bytes()),
            DataType::Utf8 => f(self.column.as_string::<i32>().value(row).as_bytes()),
            DataType::LargeUtf8 => f(self.column.as_string::<i64>().value(row).as_bytes()),
            other => unreachable!("key column type {other} is rejected in Keys::new"),
        }
    }

    /// Returns the key of row `row`.
    pub fn get(&self, row: usize) -> String {
        if self.column.is_null(row) {
            return String::from("<null>");
        }
        match self.column.data_type() {
            DataType::Int64 => self.column.as_primitive::<Int64Type>().value(row).to_string(),
            DataType::Int32 => self.column.as_primitive::<Int32Type>().value(row).to_string(),
            DataType::UInt64 => self.column.as_primitive::<UInt64Type>().value(row).to_string(),
            DataType::Utf8 => self.column.as_string::<i32>().value(row).to_string(),
            DataType::LargeUtf8 => self.column.as_string::<i64>().value(row).to_string(),
            other => unreachable!("key column type {other} is rejected in Keys::new"),
        }
    }
}

/// Counts records among rows that reach a sink. After a fan-out, a record's
/// rows are contiguous, so a record starts wherever the key changes, also
/// across batches.
#[derive(Debug, Default)]
pub struct RecordRuns {
    last_key: Option<String>,
}

impl RecordRuns {
    /// Returns the number of records that start in `data`: its rows, unless
    /// a fan-out added a sample column.
    pub fn count(&mut self, data: &RecordBatch, key_column: &str) -> u64 {
        if data.column_by_name(SAMPLE_COLUMN).is_none() {
            return data.num_rows() as u64;
        }
        let Some(keys) = Keys::new(data, key_column) else {
            return data.num_rows() as u64;
        };
        let mut records = 0;
        for row in 0..data.num_rows() {
            let key = keys.get(row);
            if self.last_key.as_deref() != Some(key.as_str()) {
                records += 1;
                self.last_key = Some(key);
            }
        }
        records
    }
}

/// Returns the sample index of each row: the `sample` column when a fan-out
/// stage added one, else 0.
pub fn sample_indices(batch: &RecordBatch) -> Vec<u32> {
    match batch.column_by_name(SAMPLE_COLUMN) {
        Some(column) => column.as_primitive::<Int32Type>().values().iter().map(|&s| s as u32).collect(),
        None => vec![0; batch.num_rows()],
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    #[test]
    fn key_bytes_match_key_text() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("path", DataType::Utf8, false),
        ]));
        let ids = Int64Array::from(vec![Some(0), Some(-17), Some(i64::MAX), None]);
        let paths = StringArray::from(vec!["a.png", "b/c.jpg", "", "x"]);
        let batch = RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(paths)]).unwrap();
        for column in ["id", "path"] {
            let keys = Keys::new(&batch, column).unwrap();
            for row in 0..4 {
                assert_eq!(
                    keys.with_bytes(row, |bytes| bytes.to_vec()),
                    keys.get(row).into_bytes(),
                    "{column} row {row}"
                );
            }
        }
    }
}
