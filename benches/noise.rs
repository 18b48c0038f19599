//! Gaussian noise throughput under the randomness contract: rows of
//! 3 x 64 x 64 float32 values, each row from its own per-record stream, on
//! one thread. Prints one JSON line with the float32 samples per second.
//!
//! Usage: cargo bench --bench noise -- [ROWS]

use std::time::Instant;

use stochflow::rng::StageRng;
use stochflow::stage::noise::Noise;

fn main() {
    let rows: usize = std::env::args().skip(1).find(|a| a != "--bench").and_then(|a| a.parse().ok()).unwrap_or(4000);
    let row_len = 3 * 64 * 64;
    let noise = Noise::Gaussian { mean: 0.0, std: 0.1 };
    let rng = StageRng::new(1, "noise");
    let mut row = vec![0.5f32; row_len];

    // One warm-up row, then the timed rows.
    noise.apply(&mut row, &[3, 64, 64], &mut rng.stream(b"warm-up", 0)).expect("Gaussian noise never fails");
    let started = Instant::now();
    for record in 0..rows {
        let key = record.to_string();
        noise.apply(&mut row, &[3, 64, 64], &mut rng.stream(key.as_bytes(), 0)).expect("Gaussian noise never fails");
        std::hint::black_box(&row);
    }
    let seconds = started.elapsed().as_secs_f64();
    let samples = (rows * row_len) as f64;
    println!("{{\"samples\": {samples}, \"seconds\": {seconds:.6}, \"samples_per_s\": {:.1}}}", samples / seconds);
}
