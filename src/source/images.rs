//! Image files from a directory or a glob pattern.
//!
//! The source reads each file's bytes and leaves decoding to the `preprocess`
//! stage, which runs on worker threads. Files are taken in lexical path order
//! so that ordinals and output order do not depend on the file system.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::{ORDINAL_COLUMN, Source, SourceError};
use crate::batch::{Batch, Rejected};
use crate::config::{ImagesKey, ImagesSourceConfig};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
pub const PATH_COLUMN: &str = "path";

pub struct ImagesSource {
    files: Vec<(PathBuf, String)>,
    next: usize,
    key: ImagesKey,
    batch_size: usize,
    schema: SchemaRef,
}

impl ImagesSource {
    pub fn open(config: &ImagesSourceConfig) -> Result<Self, SourceError> {
        let files = list_files(&config.path, config.recursive)?;
        if files.is_empty() {
            return Err(SourceError::Config {
                path: String::from("source.path"),
                message: format!("no PNG or JPEG files found at {}", config.path.display()),
            });
        }
        let mut fields = Vec::new();
        if config.key == ImagesKey::Ordinal {
            fields.push(Field::new(ORDINAL_COLUMN, DataType::Int64, false));
        }
        fields.push(Field::new(PATH_COLUMN, DataType::Utf8, false));
        fields.push(Field::new(&config.column, DataType::Binary, false));
        Ok(Self {
            files,
            next: 0,
            key: config.key,
            batch_size: config.batch_size,
            schema: Arc::new(Schema::new(fields)),
        })
    }
}

/// Lists image files with their key: the path relative to the directory, or
/// to the glob pattern's literal leading folders.
fn list_files(path: &Path, recursive: bool) -> Result<Vec<(PathBuf, String)>, SourceError> {
    let pattern = path.to_string_lossy();
    let is_glob = pattern.contains(['*', '?', '[']);
    let mut files = Vec::new();
    if is_glob {
        let root: PathBuf =
            path.components().take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '['])).collect();
        let entries = glob::glob(&pattern).map_err(|err| SourceError::Config {
            path: String::from("source.path"),
            message: format!("invalid glob pattern {pattern:?}: {err}"),
        })?;
        for entry in entries.flatten() {
            if entry.is_file() && has_image_extension(&entry) {
                let key = relative_key(&entry, &root);
                files.push((entry, key));
            }
        }
    } else if path.is_dir() {
        collect_dir(path, path, recursive, &mut files)?;
    } else if path.is_file() {
        let key = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        files.push((path.to_path_buf(), key));
    } else {
        return Err(SourceError::NotFound(path.to_path_buf()));
    }
    files.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(files)
}

fn collect_dir(
    root: &Path,
    dir: &Path,
    recursive: bool,
    files: &mut Vec<(PathBuf, String)>,
) -> Result<(), SourceError> {
    let entries = std::fs::read_dir(dir).map_err(|source| SourceError::Io { path: dir.to_path_buf(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| SourceError::Io { path: dir.to_path_buf(), source })?;
        let path = entry.path();
        if path.is_dir() {
            if recursive {
                collect_dir(root, &path, recursive, files)?;
            }
        } else if has_image_extension(&path) {
            let key = relative_key(&path, root);
            files.push((path, key));
        }
    }
    Ok(())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).is_some_and(|e| EXTENSIONS.contains(&e.as_str()))
}

fn relative_key(path: &Path, root: &Path) -> String {
    let relative = path.strip_prefix(root).unwrap_or(path);
    relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

impl Source for ImagesSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn key_column(&self) -> &str {
        match self.key {
            ImagesKey::Path => PATH_COLUMN,
            ImagesKey::Ordinal => ORDINAL_COLUMN,
        }
    }

    fn len_hint(&self) -> Option<u64> {
        Some(self.files.len() as u64)
    }

    fn next_batch(&mut self) -> Result<Option<Batch>, SourceError> {
        if self.next >= self.files.len() {
            return Ok(None);
        }
        let end = (self.next + self.batch_size).min(self.files.len());
        let mut ordinals = Vec::new();
        let mut keys = Vec::new();
        let mut bytes = Vec::new();
        let mut rejected = Vec::new();
        for ordinal in self.next..end {
            let (path, key) = &self.files[ordinal];
            match std::fs::read(path) {
                Ok(data) => {
                    ordinals.push(ordinal as i64);
                    keys.push(key.clone());
                    bytes.push(data);
                }
                Err(err) => {
                    let key = if self.key == ImagesKey::Ordinal { ordinal.to_string() } else { key.clone() };
                    rejected.push(Rejected {
                        key,
                        component: String::from("source"),
                        reason: format!("cannot read {}: {err}", path.display()),
                        origin: None,
                    });
                }
            }
        }
        self.next = end;

        let mut columns: Vec<ArrayRef> = Vec::new();
        if self.key == ImagesKey::Ordinal {
            columns.push(Arc::new(Int64Array::from(ordinals)));
        }
        columns.push(Arc::new(StringArray::from(keys)));
        columns.push(Arc::new(BinaryArray::from_iter_values(bytes.iter())));
        let data = RecordBatch::try_new(self.schema.clone(), columns).expect("columns match the source schema");
        Ok(Some(Batch::new(data, rejected)))
    }
}
