//! stochflow runs YAML-configured pipelines that put controlled, reproducible
//! randomness around ONNX model inference:
//!
//! source -> decode -> input stages -> model -> output stages -> sink
//!
//! Every random draw is a pure function of (pipeline seed, stage name, record
//! key, sample index); see [`rng`].

pub mod batch;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod model;
pub mod rng;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod stage;
pub mod tensor;
