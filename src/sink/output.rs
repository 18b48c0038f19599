//! The sink a run writes to: the Arrow file, and PNG files when
//! `sink.images` is set.

use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;

use super::{ArrowFileSink, ImageSink, SinkError};

pub struct Sink {
    arrow: ArrowFileSink,
    images: Option<ImageSink>,
}

impl Sink {
    /// Wraps an opened Arrow file sink and creates the image folder, if any.
    pub fn new(arrow: ArrowFileSink, images: Option<ImageSink>) -> Result<Self, SinkError> {
        if let Some(images) = &images {
            images.create_folder()?;
        }
        Ok(Self { arrow, images })
    }

    /// Returns the temporary name of the Arrow file until it is committed;
    /// none for standard output.
    pub fn partial_path(&self) -> Option<&Path> {
        self.arrow.partial_path()
    }

    /// Writes a batch's PNG files, then buffers it for the Arrow file.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if let Some(images) = &mut self.images {
            images.write(batch)?;
        }
        self.arrow.write(batch)
    }

    /// Commits the Arrow file, after the PNG files are durable.
    pub fn finish(self) -> Result<PathBuf, SinkError> {
        if let Some(images) = &self.images {
            images.finish()?;
        }
        self.arrow.finish()
    }
}
