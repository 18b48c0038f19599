//! End-to-end tests: each runs the real `stochflow` binary on real fixtures
//! (the digits data and model, the photos, the conv model) and reads the
//! Arrow file it writes. ONNX Runtime is found as the binary finds it; see
//! src/model/library.rs.

mod common;

/// Image augmentation: geometry, dtypes, pairing, fan-out and determinism.
mod augment;
/// Bad files, bad records and bad settings, with their exit codes.
mod bad_input;
/// Small ONNX models built by the tests.
mod built;
/// `inspect`, `validate` and the options of `run`.
mod commands;
/// LZ4 and zstd output, and the zstd level.
mod compression;
/// The daemon's delivery: drain on SIGTERM, exactly once across kill -9, rotation, metrics, memory.
mod daemon_delivery;
/// The daemon on NATS JetStream: shared consumers, kill -9, duplicates, dead letters.
mod daemon_nats;
/// The daemon in operation: full disk, corrupt inputs, reloads, bad settings, JSON logs.
mod daemon_operation;
/// The daemon's socket source: acks, exactly once across kill -9 and resends, bad streams, SIGTERM, pyarrow.
mod daemon_socket;
/// Shared helpers of the daemon tests: the process guard, HTTP and metrics, inputs, output readers.
mod daemon_support;
/// Same seed, same bytes, whatever the batching and parallelism.
mod determinism;
/// PNG output of `sink.images`: pixel mapping, file names, the generator pipelines.
mod image_sink;
/// Image decoding convention: bit depths, channels, EXIF orientation.
mod images;
/// The `latent` source: prior statistics, interpolation, determinism.
mod latent_source;
/// Monte Carlo dropout: mask rates and scales, determinism, the shipped pipeline.
mod mc_dropout;
/// Dropout injected at named tensors, and weight-noise ensembles.
mod model_noise;
/// The model path agrees with onnxruntime in Python; noise hurts accuracy.
mod model_path;
/// Uniform, multiplicative, dropout, salt-and-pepper, Poisson and speckle noise.
mod noise_kinds;
/// Mean, spread, tails and clipping of the Gaussian noise.
mod noise_statistics;
/// pyarrow, polars and DuckDB read the output files and stream.
mod readers;
/// Categorical sampling frequencies and temperature limits.
mod sampling;
/// Truncated, sequence, Bernoulli, Gaussian and rounding draws; aggregates.
mod sampling_catalogue;
/// `run --output -`: the Arrow IPC stream on standard output.
mod stdout_stream;
