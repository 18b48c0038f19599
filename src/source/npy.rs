//! Rows of a `.npy` array file.
//!
//! The header is parsed by hand (format versions 1 to 3, as numpy writes
//! them) and rows are read in batches, so memory use does not grow with the
//! file. `uint8` and `uint16` arrays keep their type; every other numeric
//! type is read as float32. Each index of the first axis is one record, keyed by ordinal.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::{ORDINAL_COLUMN, Source, SourceError};
use crate::batch::Batch;
use crate::config::NpySourceConfig;
use crate::tensor::{self, ElementType, TensorType};

/// Element types a `.npy` file may hold, little-endian or single-byte.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dtype {
    F32,
    F64,
    U8,
    I8,
    I16,
    U16,
    I32,
    I64,
}

impl Dtype {
    fn parse(descr: &str) -> Option<Self> {
        Some(match descr {
            "<f4" => Dtype::F32,
            "<f8" => Dtype::F64,
            "|u1" | "<u1" => Dtype::U8,
            "|i1" | "<i1" => Dtype::I8,
            "<i2" => Dtype::I16,
            "<u2" => Dtype::U16,
            "<i4" => Dtype::I32,
            "<i8" => Dtype::I64,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::U16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
        }
    }

    fn to_f32(self, bytes: &[u8], out: &mut Vec<f32>) {
        let size = self.size();
        out.extend(bytes.chunks_exact(size).map(|b| match self {
            Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32,
            Dtype::U8 => f32::from(b[0]),
            Dtype::I8 => f32::from(b[0] as i8),
            Dtype::I16 => f32::from(i16::from_le_bytes([b[0], b[1]])),
            Dtype::U16 => f32::from(u16::from_le_bytes([b[0], b[1]])),
            Dtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            Dtype::I64 => i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32,
        }));
    }
}

/// The parsed header of a `.npy` file.
#[derive(Debug, PartialEq)]
struct Header {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Offset of the first data byte.
    data_offset: usize,
}

pub struct NpySource {
    reader: BufReader<File>,
    dtype: Dtype,
    tensor: TensorType,
    rows: usize,
    next: usize,
    batch_size: usize,
    schema: SchemaRef,
    path: PathBuf,
}

impl NpySource {
    pub fn open(config: &NpySourceConfig) -> Result<Self, SourceError> {
        let path = &config.path;
        if !path.exists() {
            return Err(SourceError::NotFound(path.clone()));
        }
        let file = File::open(path).map_err(|source| SourceError::Io { path: path.clone(), source })?;
        let file_len = file.metadata().map_err(|source| SourceError::Io { path: path.clone(), source })?.len();
        let mut reader = BufReader::new(file);
        let header = read_header(&mut reader).map_err(|message| format_error(path, message))?;

        let rows =
            *header.shape.first().ok_or_else(|| format_error(path, "a zero-dimensional array has no rows".into()))?;
        let row_shape = if header.shape.len() == 1 { vec![1] } else { header.shape[1..].to_vec() };
        let expected =
            header.data_offset as u64 + (header.shape.iter().product::<usize>() * header.dtype.size()) as u64;
        if file_len < expected {
            return Err(format_error(
                path,
                format!(
                    "the file is truncated: shape {:?} needs {expected} bytes, the file has {file_len}",
                    header.shape
                ),
            ));
        }

        let element = match header.dtype {
            Dtype::U8 => ElementType::UInt8,
            Dtype::U16 => ElementType::UInt16,
            _ => ElementType::Float32,
        };
        let tensor = TensorType::new(element, row_shape);
        let schema = Arc::new(Schema::new(vec![
            Field::new(ORDINAL_COLUMN, DataType::Int64, false),
            tensor.field(&config.column),
        ]));
        Ok(Self {
            reader,
            dtype: header.dtype,
            tensor,
            rows,
            next: 0,
            batch_size: config.batch_size,
            schema,
            path: path.clone(),
        })
    }
}

fn format_error(path: &Path, message: String) -> SourceError {
    SourceError::Format { path: path.to_path_buf(), format: ".npy", message }
}

/// Reads the magic string, version and header dictionary.
fn read_header(reader: &mut impl Read) -> Result<Header, String> {
    let mut prefix = [0u8; 8];
    reader.read_exact(&mut prefix).map_err(|_| String::from("the file is shorter than a .npy header"))?;
    if &prefix[..6] != b"\x93NUMPY" {
        return Err(String::from("the file does not start with the .npy magic string"));
    }
    let (header_len, prefix_len) = match prefix[6] {
        1 => {
            let mut len = [0u8; 2];
            reader.read_exact(&mut len).map_err(|e| e.to_string())?;
            (u16::from_le_bytes(len) as usize, 10)
        }
        2 | 3 => {
            let mut len = [0u8; 4];
            reader.read_exact(&mut len).map_err(|e| e.to_string())?;
            (u32::from_le_bytes(len) as usize, 12)
        }
        version => return Err(format!("format version {version} is not supported")),
    };
    let mut text = vec![0u8; header_len];
    reader.read_exact(&mut text).map_err(|_| String::from("the header is truncated"))?;
    let text = String::from_utf8_lossy(&text);

    let descr = dict_value(&text, "descr").ok_or("the header has no 'descr'")?;
    let descr = descr.strip_prefix(['\'', '"']).and_then(|rest| rest.split(['\'', '"']).next()).unwrap_or(descr);
    let dtype = Dtype::parse(descr).ok_or_else(|| {
        format!("dtype {descr:?} is not supported; save the array as float32, float64 or an integer type")
    })?;
    let fortran = dict_value(&text, "fortran_order").ok_or("the header has no 'fortran_order'")?;
    if fortran.starts_with("True") {
        return Err(String::from("Fortran-ordered arrays are not supported; save with numpy.ascontiguousarray"));
    }
    let shape_text = dict_value(&text, "shape").ok_or("the header has no 'shape'")?;
    let inner = shape_text.trim_start_matches('(').split(')').next().unwrap_or_default();
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("invalid shape {shape_text:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Header { dtype, shape, data_offset: prefix_len + header_len })
}

/// Returns the text after `'key':` in a header dictionary.
fn dict_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let start = text.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = text[start..].trim_start().strip_prefix(':')?;
    Some(rest.trim_start())
}

impl NpySource {
    /// Wraps the next `count` rows' tensor column into a batch with ordinals.
    fn batch(&mut self, count: usize, values: ArrayRef) -> Batch {
        let ordinals = Int64Array::from_iter_values(self.next as i64..(self.next + count) as i64);
        self.next += count;
        let data = RecordBatch::try_new(self.schema.clone(), vec![Arc::new(ordinals), values])
            .expect("columns match the source schema");
        Batch::new(data, Vec::new())
    }
}

impl Source for NpySource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn key_column(&self) -> &str {
        ORDINAL_COLUMN
    }

    fn len_hint(&self) -> Option<u64> {
        Some(self.rows as u64)
    }

    fn next_batch(&mut self) -> Result<Option<Batch>, SourceError> {
        if self.next >= self.rows {
            return Ok(None);
        }
        let count = self.batch_size.min(self.rows - self.next);
        let io_error = |source| SourceError::Io { path: self.path.clone(), source };

        // Little-endian float32 is read straight into the column's buffer.
        if self.dtype == Dtype::F32 && cfg!(target_endian = "little") {
            let mut floats = vec![0f32; count * self.tensor.len()];
            self.reader.read_exact(bytemuck::cast_slice_mut(&mut floats)).map_err(io_error)?;
            let values = tensor::build_f32(&self.tensor, floats).expect("the buffer contains whole rows");
            return Ok(Some(self.batch(count, values)));
        }

        let mut bytes = vec![0u8; count * self.tensor.len() * self.dtype.size()];
        self.reader.read_exact(&mut bytes).map_err(io_error)?;
        let values: ArrayRef = match self.tensor.element {
            ElementType::UInt8 => tensor::build_u8(&self.tensor, bytes),
            ElementType::UInt16 => tensor::build_u16(
                &self.tensor,
                bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect(),
            ),
            ElementType::Float32 => {
                let mut floats = Vec::with_capacity(count * self.tensor.len());
                self.dtype.to_f32(&bytes, &mut floats);
                tensor::build_f32(&self.tensor, floats)
            }
        }
        .expect("the buffer contains whole rows");
        Ok(Some(self.batch(count, values)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(dict: &str) -> Vec<u8> {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        bytes.extend_from_slice(dict.as_bytes());
        bytes
    }

    #[test]
    fn parses_numpy_header() {
        let bytes = header_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (450, 64), }\n");
        let header = read_header(&mut bytes.as_slice()).unwrap();
        assert_eq!(header, Header { dtype: Dtype::F32, shape: vec![450, 64], data_offset: bytes.len() });
    }

    #[test]
    fn parses_one_dimensional_shape() {
        let bytes = header_bytes("{'descr': '<i8', 'fortran_order': False, 'shape': (7,), }\n");
        assert_eq!(read_header(&mut bytes.as_slice()).unwrap().shape, vec![7]);
    }

    #[test]
    fn rejects_fortran_order() {
        let bytes = header_bytes("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }\n");
        assert!(read_header(&mut bytes.as_slice()).unwrap_err().contains("Fortran"));
    }

    #[test]
    fn rejects_big_endian() {
        let bytes = header_bytes("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 2), }\n");
        assert!(read_header(&mut bytes.as_slice()).unwrap_err().contains("not supported"));
    }
}
