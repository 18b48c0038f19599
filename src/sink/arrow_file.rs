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
//!
//! The output path `-` is standard output, which gets the Arrow IPC stream
//! format instead. The stream has the same schema and batches, without a
//! footer, so another program can read it through a pipe as it is written.

use std::fs::File;
use std::io::{BufWriter, Stdout};
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::ipc::CompressionType;
use arrow::ipc::writer::{FileWriter, IpcWriteOptions, StreamWriter};

use super::writeback::WritebackFile;
use crate::config::Compression;

/// Compression settings of a file's record batches.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileCompression {
    pub codec: Compression,
    /// The zstd level; the codec's default when absent.
    pub level: Option<i32>,
}

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
    #[error("cannot write the Arrow stream to standard output: {message}")]
    Stdout { message: String },
    #[error("{message}")]
    Nats { message: String },
}

/// The output path of standard output.
pub const STDOUT_PATH: &str = "-";

/// Returns whether an output path is standard output.
pub fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == STDOUT_PATH
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
    /// The file's name until it is committed; none for standard output.
    partial: Option<PathBuf>,
    writer: Option<Writer>,
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
        compression: FileCompression,
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
        let options = write_options(compression).map_err(arrow_error)?;
        let writer = FileWriter::try_new_with_options(BufWriter::new(WritebackFile::new(file)), &schema, options)
            .map_err(arrow_error)?;
        Ok(Self {
            path: path.to_path_buf(),
            partial: Some(partial),
            writer: Some(Writer::File(writer)),
            schema,
            projection,
            rows_per_batch,
            pending: Vec::new(),
            pending_rows: 0,
        })
    }

    /// Writes the schema to standard output as the start of an Arrow IPC
    /// stream. Fails when standard output is a terminal, which binary data
    /// would garble.
    pub fn stdout(
        schema: SchemaRef,
        projection: Vec<usize>,
        compression: FileCompression,
        rows_per_batch: usize,
    ) -> Result<Self, SinkError> {
        let stdout = std::io::stdout();
        if std::io::IsTerminal::is_terminal(&stdout) {
            return Err(SinkError::Stdout {
                message: String::from(
                    "it is a terminal; pipe it into a program or redirect it to a file, or give a file path as the output",
                ),
            });
        }
        let stream_error = |err: arrow::error::ArrowError| SinkError::Stdout { message: stream_message(&err) };
        let options = write_options(compression).map_err(stream_error)?;
        // Batches of several megabytes are written at once; the buffer only
        // joins the small IPC messages around them.
        let writer =
            StreamWriter::try_new_with_options(BufWriter::new(stdout), &schema, options).map_err(stream_error)?;
        Ok(Self {
            path: PathBuf::from(STDOUT_PATH),
            partial: None,
            writer: Some(Writer::Stdout(writer)),
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

    /// Returns the temporary name the file has until it is committed; none
    /// for standard output.
    pub fn partial_path(&self) -> Option<&Path> {
        self.partial.as_deref()
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
            let written = match writer {
                Writer::File(writer) => writer.write(&chunk),
                Writer::Stdout(writer) => writer.write(&chunk),
            };
            written.map_err(|err| self.arrow_error(err))?;
            offset += length;
        }
        self.pending_rows = joined.num_rows() - offset;
        if self.pending_rows > 0 {
            self.pending.push(joined.slice(offset, self.pending_rows));
        }
        Ok(())
    }

    /// Adds a key-value pair to the footer's custom metadata. A stream has
    /// no footer; only files are given one.
    pub fn set_footer_metadata(&mut self, key: &str, value: String) {
        if let Some(Writer::File(writer)) = self.writer.as_mut() {
            writer.write_metadata(key, value);
        }
    }

    /// Writes the footer and commits the file under its final name; on
    /// standard output, writes the end of the stream and flushes it.
    pub fn finish(mut self) -> Result<PathBuf, SinkError> {
        self.flush(true)?;
        let mut writer = match self.writer.take().expect("the writer is open until finish") {
            Writer::File(writer) => writer,
            Writer::Stdout(mut writer) => {
                // Finishing flushes the stream.
                writer.finish().map_err(|err| self.arrow_error(err))?;
                return Ok(self.path.clone());
            }
        };
        writer.finish().map_err(|err| self.arrow_error(err))?;
        let file = writer.into_inner().map_err(|err| self.arrow_error(err))?;
        let file = file
            .into_inner()
            .map_err(|err| SinkError::Io { path: self.path.clone(), source: err.into_error() })?
            .into_inner();
        let io_error = |source| SinkError::Io { path: self.path.clone(), source };
        file.sync_all().map_err(io_error)?;
        drop(file);
        let partial = self.partial.as_ref().expect("a file sink has a partial file");
        std::fs::rename(partial, &self.path).map_err(io_error)?;
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent).and_then(|dir| dir.sync_all()).map_err(io_error)?;
        }
        Ok(self.path.clone())
    }

    fn arrow_error(&self, err: arrow::error::ArrowError) -> SinkError {
        match self.partial {
            Some(_) => SinkError::Arrow { path: self.path.clone(), message: err.to_string() },
            None => SinkError::Stdout { message: stream_message(&err) },
        }
    }
}

impl Drop for ArrowFileSink {
    /// Removes the partial file of a sink that was not finished.
    fn drop(&mut self) {
        if self.writer.take().is_some()
            && let Some(partial) = &self.partial
        {
            let _ = std::fs::remove_file(partial);
        }
    }
}

/// The Arrow IPC writer of a file or of standard output.
enum Writer {
    File(FileWriter<BufWriter<WritebackFile>>),
    Stdout(StreamWriter<BufWriter<Stdout>>),
}

pub(crate) fn write_options(compression: FileCompression) -> Result<IpcWriteOptions, arrow::error::ArrowError> {
    IpcWriteOptions::default()
        .try_with_compression(match compression.codec {
            Compression::None => None,
            Compression::Lz4 => Some(CompressionType::LZ4_FRAME),
            Compression::Zstd => Some(CompressionType::ZSTD),
        })
        .and_then(|options| options.try_with_compression_level(compression.level))
}

/// Returns the message for a failed write to standard output. A reader that
/// exited early (a broken pipe) is the usual cause.
fn stream_message(err: &arrow::error::ArrowError) -> String {
    match err {
        arrow::error::ArrowError::IoError(_, io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
            String::from("the program reading it closed the pipe before the end of the output")
        }
        other => other.to_string(),
    }
}
