//! The bare ONNX Runtime loop that stochflow is measured against: the same
//! model, batches and session options as the `infer` stage, with no noise,
//! no sampling and no sink. The whole input is read into memory first, so
//! only `Session::run` is timed. With SESSIONS above 1, that many threads
//! each run their own session over every SESSIONS-th batch, which is how
//! the `infer` stage runs its default sessions.
//!
//! Usage: cargo bench --bench ort_loop -- MODEL INPUT.npy BATCH THREADS [SESSIONS]
//! Prints one JSON line: {"records": R, "seconds": S, "records_per_s": X}.

use std::time::Instant;

use ort::value::TensorRef;
use stochflow::model::ModelFile;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (model, input, batch, threads, sessions) = match args.as_slice() {
        [model, input, batch, threads] => (model, input, batch, threads, "1"),
        [model, input, batch, threads, sessions] => (model, input, batch, threads, sessions.as_str()),
        _ => anyhow::bail!("usage: ort_loop MODEL INPUT.npy BATCH THREADS [SESSIONS]"),
    };
    let batch: usize = batch.parse()?;
    let threads: usize = threads.parse()?;
    let sessions: usize = sessions.parse()?;
    anyhow::ensure!(batch > 0 && sessions > 0, "BATCH and SESSIONS must be at least 1");

    let (shape, values) = read_npy_f32(input)?;
    let row_len: usize = shape[1..].iter().product();
    let records = shape[0];

    let model = ModelFile::read(std::path::Path::new(model))?;
    let mut pool = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        pool.push(model.session(threads)?);
    }

    let started = Instant::now();
    let starts: Vec<usize> = (0..records).step_by(batch).collect();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut running = Vec::new();
        for (index, session) in pool.iter_mut().enumerate() {
            let (starts, values, shape) = (&starts, &values, &shape);
            running.push(scope.spawn(move || -> anyhow::Result<()> {
                let input_name = session.inputs()[0].name().to_string();
                for &start in starts.iter().skip(index).step_by(sessions) {
                    let rows = batch.min(records - start);
                    let mut dims = vec![rows];
                    dims.extend_from_slice(&shape[1..]);
                    let slice = &values[start * row_len..(start + rows) * row_len];
                    let input = TensorRef::from_array_view((dims, slice))?;
                    let outputs = session.run(ort::inputs![input_name.as_str() => input])?;
                    std::hint::black_box(&outputs);
                }
                Ok(())
            }));
        }
        for thread in running {
            thread.join().map_err(|_| anyhow::anyhow!("a session thread panicked"))??;
        }
        Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{{\"records\": {records}, \"seconds\": {seconds:.6}, \"records_per_s\": {:.1}}}",
        records as f64 / seconds
    );
    Ok(())
}

/// Reads a little-endian float32 `.npy` file (format version 1) into memory.
fn read_npy_f32(path: &str) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path)?;
    anyhow::ensure!(bytes.starts_with(b"\x93NUMPY\x01"), "{path} is not a version 1 .npy file");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len])?;
    anyhow::ensure!(header.contains("'<f4'"), "{path} does not hold float32 values");
    let shape_text = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).unwrap_or_default();
    let shape: Vec<usize> =
        shape_text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect::<Result<_, _>>()?;
    let data = &bytes[10 + header_len..];
    let values = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok((shape, values))
}
