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

/// The end-of-stream marker of the Arrow IPC stream format: a continuation
/// marker followed by a zero message length.
const END_OF_STREAM: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];

/// Opens an Arrow IPC file in either format: the file format (random
/// access, starts with `ARROW1`) or the stream format. A stream must end with
/// its end-of-stream marker: without it, the file may be cut short, and its
/// missing records would go unnoticed.
fn open_reader(path: &std::path::Path) -> Result<Box<dyn RecordBatchReader + Send>, SourceError> {
    use std::io::{Read, Seek, SeekFrom};

    let io_error = |source| SourceError::Io { path: path.to_path_buf(), source };
    let format_error = |message: String| SourceError::Format { path: path.to_path_buf(), format: "Arrow IPC", message };
    let mut file = File::open(path).map_err(io_error)?;
    let length = file.metadata().map_err(io_error)?.len();
    let mut magic = [0u8; 6];
    let is_file_format = file.read(&mut magic).map_err(io_error)? == 6 && &magic == b"ARROW1";
    if is_file_format {
        file.seek(SeekFrom::Start(0)).map_err(io_error)?;
        let reader = FileReader::try_new_buffered(file, None).map_err(|err| {
            format_error(format!(
                "{err}; a file that starts like an Arrow file but has no valid footer is usually cut short or still being written, so read it once its writer has closed it"
            ))
        })?;
        return Ok(Box::new(reader));
    }
    let mut end = [0u8; 8];
    let has_end_marker = length >= 8
        && file.seek(SeekFrom::End(-8)).is_ok()
        && file.read_exact(&mut end).is_ok()
        && end == END_OF_STREAM;
    if !has_end_marker {
        return Err(format_error(String::from(
            "it does not start like the Arrow file format (ARROW1), and as an Arrow IPC stream it ends without the end-of-stream marker, so it is cut short or not Arrow at all; close the stream writer before the file is read",
        )));
    }
    file.seek(SeekFrom::Start(0)).map_err(io_error)?;
    let reader = StreamReader::try_new_buffered(file, None).map_err(|err| format_error(err.to_string()))?;
    Ok(Box::new(reader))
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
