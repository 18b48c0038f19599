//! ONNX models: finding ONNX Runtime, reading model files, building sessions
//! and describing model signatures.

pub mod dropout;
pub mod inspect;
pub mod library;
pub mod proto;
pub mod session;
pub mod weights;
mod wire;

pub use library::{LibraryError, ORT_VERSION};
pub use session::{ModelError, ModelFile, Signature, TensorInfo};
