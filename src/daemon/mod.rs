//! `stochflow daemon`: a pipeline run as a service over endless input, with
//! rotated output files, a checkpoint, dead letters, health and metrics.

pub mod http;
mod input;
pub mod metrics;
mod preflight;
mod service;

pub use preflight::check_models;
pub use service::{check, run};
