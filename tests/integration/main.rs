//! End-to-end tests: each runs the real `stochflow` binary on real fixtures
//! (the digits data and model, the photos, the conv model) and reads the
//! Arrow file it writes. ONNX Runtime is found as the binary finds it; see
//! src/model/library.rs.

mod common;

/// Bad files, bad records and bad settings, with their exit codes.
mod bad_input;
/// `inspect`, `validate` and the options of `run`.
mod commands;
/// Same seed, same bytes, whatever the batching and parallelism.
mod determinism;
/// Image decoding convention: bit depths, channels, EXIF orientation.
mod images;
/// The model path agrees with onnxruntime in Python; noise hurts accuracy.
mod model_path;
/// Mean, spread, tails and clipping of the Gaussian noise.
mod noise_statistics;
/// pyarrow reads the output.
mod pyarrow_reader;
/// Categorical sampling frequencies and temperature limits.
mod sampling;
/// Truncated, sequence, Bernoulli, Gaussian and rounding draws; aggregates.
mod sampling_catalogue;
