//! Rows of an Arrow IPC file.
//!
//! Columns pass through unchanged, except those listed under `tensors`,
//! which become float32 tensor columns of the configured shape. Lists of any
//! numeric type are accepted there. A null row or a row of the wrong length
//! is rejected with its key, and the run goes on. The conversion itself is
//! in `convert.rs`, shared with the socket source.

use std::fs::File;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::{FileReader, StreamReader};
use arrow::record_batch::RecordBatchReader;

use super::convert::{ColumnSettings, Converter, GeneratedKey};
use super::{Source, SourceError};
use crate::batch::Batch;
use crate::config::ArrowFileSourceConfig;

pub struct ArrowFileSource {
    reader: Box<dyn RecordBatchReader + Send>,
    converter: Converter,
    pending: Option<RecordBatch>,
    batch_size: usize,
    path: std::path::PathBuf,
}

impl ArrowFileSource {
    pub fn open(config: &ArrowFileSourceConfig) -> Result<Self, SourceError> {
        let path = &config.path;
        if !path.exists() {
            return Err(SourceError::NotFound(path.clone()));
        }
        let reader = open_reader(path)?;
        let settings = ColumnSettings {
            id_column: config.id_column.as_deref(),
            columns: config.columns.as_deref(),
            tensors: &config.tensors,
        };
        let converter =
            Converter::new(&reader.schema(), &path.display().to_string(), &settings, GeneratedKey::Ordinal, 0)?;
        Ok(Self { reader, converter, pending: None, batch_size: config.batch_size, path: path.clone() })
    }
}

/// Opens an Arrow IPC file in either format: the file format (random
/// access, starts with `ARROW1`) or the stream format.
fn open_reader(path: &std::path::Path) -> Result<Box<dyn RecordBatchReader + Send>, SourceError> {
    let io_error = |source| SourceError::Io { path: path.to_path_buf(), source };
    let format_error = |err: arrow::error::ArrowError| SourceError::Format {
        path: path.to_path_buf(),
        format: "Arrow IPC",
        message: err.to_string(),
    };
    let mut magic = [0u8; 6];
    let is_file_format = {
        use std::io::Read;
        let mut file = File::open(path).map_err(io_error)?;
        file.read(&mut magic).map_err(io_error)? == 6 && &magic == b"ARROW1"
    };
    let file = File::open(path).map_err(io_error)?;
    if is_file_format {
        Ok(Box::new(FileReader::try_new_buffered(file, None).map_err(format_error)?))
    } else {
        Ok(Box::new(StreamReader::try_new_buffered(file, None).map_err(format_error)?))
    }
}

impl Source for ArrowFileSource {
    fn schema(&self) -> SchemaRef {
        self.converter.schema()
    }

    fn key_column(&self) -> &str {
        self.converter.key_column()
    }

    fn len_hint(&self) -> Option<u64> {
        None
    }

    fn next_batch(&mut self) -> Result<Option<Batch>, SourceError> {
        let batch = match self.pending.take() {
            Some(batch) => batch,
            None => match self.reader.next() {
                None => return Ok(None),
                Some(Ok(batch)) => batch,
                Some(Err(err)) => {
                    return Err(SourceError::Format {
                        path: self.path.clone(),
                        format: "Arrow IPC",
                        message: err.to_string(),
                    });
                }
            },
        };
        let batch = if batch.num_rows() > self.batch_size {
            self.pending = Some(batch.slice(self.batch_size, batch.num_rows() - self.batch_size));
            batch.slice(0, self.batch_size)
        } else {
            batch
        };
        self.converter.convert(batch).map(Some)
    }
}
