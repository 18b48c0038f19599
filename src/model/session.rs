//! Model files and ONNX Runtime sessions.

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorElementType, ValueType};
use sha2::{Digest, Sha256};

use super::library::{self, LibraryError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {} not found; check the `model` path (relative paths start at the pipeline file's folder)", .0.display())]
    NotFound(PathBuf),
    #[error("cannot read model file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Library(#[from] LibraryError),
    #[error("ONNX Runtime cannot load model {}: {message}", path.display())]
    Session { path: PathBuf, message: String },
}

/// A model file read into memory, with its SHA-256.
#[derive(Debug)]
pub struct ModelFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub sha256: String,
}

impl ModelFile {
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        if !path.exists() {
            return Err(ModelError::NotFound(path.to_path_buf()));
        }
        let bytes = std::fs::read(path).map_err(|source| ModelError::Read { path: path.to_path_buf(), source })?;
        let sha256 = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { path: path.to_path_buf(), bytes, sha256 })
    }

    /// Builds an ONNX Runtime session. `threads` is the intra-op thread
    /// count, 0 for ONNX Runtime's default. Spinning is off: an idle spinning
    /// worker takes CPU time from the pipeline's other stages.
    pub fn session(&self, threads: usize) -> Result<Session, ModelError> {
        let environment = library::environment()?;
        let fail = |err: ort::Error| ModelError::Session { path: self.path.clone(), message: err.to_string() };
        let mut builder = Session::builder(&environment)
            .map_err(fail)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|err| fail(err.into()))?
            .with_intra_op_spinning(false)
            .map_err(|err| fail(err.into()))?;
        if threads > 0 {
            builder = builder.with_intra_threads(threads).map_err(|err| fail(err.into()))?;
        }
        builder.commit_from_memory(&self.bytes).map_err(fail)
    }
}

/// Name, element type and shape of a model input or output. A dynamic
/// dimension is `None`, with its symbolic name when the model gives one.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub element: Option<TensorElementType>,
    pub dims: Vec<Option<usize>>,
    pub symbols: Vec<String>,
}

impl TensorInfo {
    fn from_outlet(name: &str, value_type: &ValueType) -> Self {
        match value_type {
            ValueType::Tensor { ty, shape, dimension_symbols } => Self {
                name: name.to_string(),
                element: Some(*ty),
                dims: shape.iter().map(|&d| usize::try_from(d).ok()).collect(),
                symbols: dimension_symbols.iter().map(|s| s.to_string()).collect(),
            },
            _ => Self { name: name.to_string(), element: None, dims: Vec::new(), symbols: Vec::new() },
        }
    }

    /// Formats the shape with symbolic dimensions by name, as `[N, 10]`.
    pub fn shape_text(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Some(d) => d.to_string(),
                None => match self.symbols.get(i).filter(|s| !s.is_empty()) {
                    Some(symbol) => symbol.clone(),
                    None => String::from("?"),
                },
            })
            .collect();
        format!("[{}]", dims.join(", "))
    }

    pub fn element_name(&self) -> &'static str {
        self.element.map(element_name).unwrap_or("non-tensor")
    }
}

/// A model's inputs and outputs as ONNX Runtime reports them.
#[derive(Clone, Debug)]
pub struct Signature {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

impl Signature {
    pub fn of(session: &Session) -> Self {
        Self {
            inputs: session.inputs().iter().map(|o| TensorInfo::from_outlet(o.name(), o.dtype())).collect(),
            outputs: session.outputs().iter().map(|o| TensorInfo::from_outlet(o.name(), o.dtype())).collect(),
        }
    }
}

/// Names an element type as ONNX does (`float32`, `int64`), where ONNX
/// Runtime's own display uses Rust names (`f32`).
pub fn element_name(element: TensorElementType) -> &'static str {
    match element {
        TensorElementType::Float32 => "float32",
        TensorElementType::Float64 => "float64",
        TensorElementType::Float16 => "float16",
        TensorElementType::Bfloat16 => "bfloat16",
        TensorElementType::Uint8 => "uint8",
        TensorElementType::Int8 => "int8",
        TensorElementType::Uint16 => "uint16",
        TensorElementType::Int16 => "int16",
        TensorElementType::Uint32 => "uint32",
        TensorElementType::Int32 => "int32",
        TensorElementType::Uint64 => "uint64",
        TensorElementType::Int64 => "int64",
        TensorElementType::Bool => "bool",
        TensorElementType::String => "string",
        _ => "an unsupported type",
    }
}
