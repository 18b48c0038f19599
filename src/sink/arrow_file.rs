//! One Arrow IPC file, written so that no reader ever sees a torn file.
//!
//! Commit protocol:
//! 1. Batches are written to `<name>.partial` beside the final path.
//! 2. On finish, the footer is written, the file is fsync'd (its pages
//!    are handed to writeback as it grows, so little is left to wait for), renamed to its
//!    final name, and the folder is fsync'd so the rename is durable.
//! 3. If the run fails, the partial file is removed. A crash leaves at most
//!    a `.partial` file, never a torn file under the final name.
//!
//! Rows are regrouped into record batches of `rows_per_batch`, so the file's
//! bytes depend on the data and that setting alone, never on the batch sizes
//! used inside the pipeline. Nothing time-dependent is written.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::ipc::CompressionType;
use arrow::ipc::writer::{FileWriter, IpcWriteOptions};

use super::writeback::WritebackFile;
use crate::config::Compression;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write output file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write Arrow data to {}: {message}", path.display())]
    Arrow { path: PathBuf, message: String },
    #[error("cannot write image {}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error("output path {}: {message}", path.display())]
    Target { path: PathBuf, message: String },
}

/// Resolves the output path and rejects one that the commit's rename would
/// destroy: a device, FIFO or folder, or one of the pipeline's own input
/// files. A symbolic link is followed, so the file it points to is written.
pub fn resolve_output(path: &Path, inputs: &[&Path]) -> Result<PathBuf, SinkError> {
    let reject = |message: &str| SinkError::Target { path: path.to_path_buf(), message: message.to_string() };
    let mut target = path.to_path_buf();
    for _ in 0..32 {
        match std::fs::symlink_metadata(&target) {
            Ok(metadata) if metadata.file_type().is_symlink() => {
                let link =
                    std::fs::read_link(&target).map_err(|source| SinkError::Io { path: target.clone(), source })?;
                target = match target.parent() {
                    Some(parent) if link.is_relative() => parent.join(link),
                    _ => link,
                };
            }
            Ok(metadata) if !metadata.is_file() => {
                return Err(reject("exists and is not a regular file (a folder, device or FIFO); choose a file path"));
            }
            _ => break,
        }
    }
    if let Ok(resolved) = std::fs::canonicalize(&target) {
        for input in inputs {
            if std::fs::canonicalize(input).is_ok_and(|input| input == resolved) {
                return Err(reject(
                    "is an input of the pipeline, which the run would overwrite; choose another output path",
                ));
            }
        }
    }
    Ok(target)
}

pub struct ArrowFileSink {
    path: PathBuf,
    partial: PathBuf,
    writer: Option<FileWriter<BufWriter<WritebackFile>>>,
    schema: SchemaRef,
    /// Indices of the written columns in the pipeline's output schema.
    projection: Vec<usize>,
    rows_per_batch: usize,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
}

impl ArrowFileSink {
    /// Creates the partial file and writes the schema. `schema` is the
    /// written schema, `projection` picks its columns from each batch.
    pub fn create(
        path: &Path,
        schema: SchemaRef,
        projection: Vec<usize>,
        compression: Compression,
        rows_per_batch: usize,
    ) -> Result<Self, SinkError> {
        let io_error = |source| SinkError::Io { path: path.to_path_buf(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_error)?;
        }
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);

        let file = File::create(&partial).map_err(io_error)?;
        let arrow_error =
            |err: arrow::error::ArrowError| SinkError::Arrow { path: path.to_path_buf(), message: err.to_string() };
        let options = IpcWriteOptions::default()
            .try_with_compression(match compression {
                Compression::None => None,
                Compression::Lz4 => Some(CompressionType::LZ4_FRAME),
                Compression::Zstd => Some(CompressionType::ZSTD),
            })
            .map_err(arrow_error)?;
        let writer = FileWriter::try_new_with_options(BufWriter::new(WritebackFile::new(file)), &schema, options)
            .map_err(arrow_error)?;
        Ok(Self {
            path: path.to_path_buf(),
            partial,
            writer: Some(writer),
            schema,
            projection,
            rows_per_batch,
            pending: Vec::new(),
            pending_rows: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the temporary name the file has until it is committed.
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// Buffers a batch and writes every full record batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let projected = batch.project(&self.projection).map_err(|err| self.arrow_error(err))?;
        let projected = RecordBatch::try_new(self.schema.clone(), projected.columns().to_vec())
            .map_err(|err| self.arrow_error(err))?;
        self.pending_rows += projected.num_rows();
        self.pending.push(projected);
        if self.pending_rows >= self.rows_per_batch {
            self.flush(false)?;
        }
        Ok(())
    }

    /// Writes the buffered rows as batches of `rows_per_batch`; the remainder
    /// stays buffered unless `all` is set.
    fn flush(&mut self, all: bool) -> Result<(), SinkError> {
        if self.pending_rows == 0 {
            return Ok(());
        }
        let joined = concat_batches(&self.schema, &self.pending).map_err(|err| self.arrow_error(err))?;
        self.pending.clear();
        let mut offset = 0;
        while joined.num_rows() - offset >= self.rows_per_batch || (all && offset < joined.num_rows()) {
            let length = self.rows_per_batch.min(joined.num_rows() - offset);
            let chunk = joined.slice(offset, length);
            let writer = self.writer.as_mut().expect("the writer is open until finish");
            writer
                .write(&chunk)
                .map_err(|err| SinkError::Arrow { path: self.path.clone(), message: err.to_string() })?;
            offset += length;
        }
        self.pending_rows = joined.num_rows() - offset;
        if self.pending_rows > 0 {
            self.pending.push(joined.slice(offset, self.pending_rows));
        }
        Ok(())
    }

    /// Adds a key-value pair to the footer's custom metadata.
    pub fn set_footer_metadata(&mut self, key: &str, value: String) {
        self.writer.as_mut().expect("the writer is open until finish").write_metadata(key, value);
    }

    /// Writes the footer and commits the file under its final name.
    pub fn finish(mut self) -> Result<PathBuf, SinkError> {
        self.flush(true)?;
        let mut writer = self.writer.take().expect("the writer is open until finish");
        writer.finish().map_err(|err| self.arrow_error(err))?;
        let file = writer.into_inner().map_err(|err| self.arrow_error(err))?;
        let file = file
            .into_inner()
            .map_err(|err| SinkError::Io { path: self.path.clone(), source: err.into_error() })?
            .into_inner();
        let io_error = |source| SinkError::Io { path: self.path.clone(), source };
        file.sync_all().map_err(io_error)?;
        drop(file);
        std::fs::rename(&self.partial, &self.path).map_err(io_error)?;
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent).and_then(|dir| dir.sync_all()).map_err(io_error)?;
        }
        Ok(self.path.clone())
    }

    fn arrow_error(&self, err: arrow::error::ArrowError) -> SinkError {
        SinkError::Arrow { path: self.path.clone(), message: err.to_string() }
    }
}

impl Drop for ArrowFileSink {
    /// Removes the partial file of a sink that was not finished.
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}
