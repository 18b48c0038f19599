//! Standard normal float32 draws by the ziggurat method (Marsaglia and
//! Tsang, "The Ziggurat Method for Generating Random Variables", Journal of
//! Statistical Software 5(8), 2000), with 256 layers and one 32-bit word per
//! draw in the common case, as numpy does for float32.
//!
//! Each word gives the layer (8 bits), the sign (1 bit) and a 23-bit
//! magnitude. About 99% of draws are accepted at once. The rest take extra
//! uniforms from the same stream, so the draws stay a pure function of the
//! stream.

use std::sync::LazyLock;

use rand::Rng;

use super::RecordRng;

const LAYERS: usize = 256;
/// Start of the tail: the right edge of the base layer.
const TAIL_START: f64 = 3.654_152_885_361_009;
/// Area of each layer (and of the base layer with its tail), for
/// f(x) = exp(-x^2 / 2).
const LAYER_AREA: f64 = 4.928_673_233_99e-3;
const MAGNITUDE_SCALE: f64 = (1u32 << 23) as f64;

struct Tables {
    /// Acceptance thresholds on the 23-bit magnitude.
    k: [u32; LAYERS],
    /// Magnitude-to-x scale of each layer.
    w: [f32; LAYERS],
    /// f(x) at each layer's right edge.
    f: [f32; LAYERS],
}

static TABLES: LazyLock<Tables> = LazyLock::new(|| {
    let density = |x: f64| (-0.5 * x * x).exp();
    let mut k = [0u32; LAYERS];
    let mut w = [0f32; LAYERS];
    let mut f = [0f32; LAYERS];

    let mut edge = TAIL_START;
    let mut previous = edge;
    let q = LAYER_AREA / density(edge);
    k[0] = ((edge / q) * MAGNITUDE_SCALE) as u32;
    k[1] = 0;
    w[0] = (q / MAGNITUDE_SCALE) as f32;
    w[LAYERS - 1] = (edge / MAGNITUDE_SCALE) as f32;
    f[0] = 1.0;
    f[LAYERS - 1] = density(edge) as f32;
    for i in (1..LAYERS - 1).rev() {
        edge = (-2.0 * (LAYER_AREA / edge + density(edge)).ln()).sqrt();
        k[i + 1] = ((edge / previous) * MAGNITUDE_SCALE) as u32;
        previous = edge;
        f[i] = density(edge) as f32;
        w[i] = (edge / MAGNITUDE_SCALE) as f32;
    }
    Tables { k, w, f }
});

/// Fills `out` with standard normal draws from `rng`.
pub fn fill_standard_normal(rng: &mut RecordRng, out: &mut [f32]) {
    for_each_standard_normal(rng, out, |value, z| *value = z);
}

/// Draws one standard normal from `rng` for each element of `values`, in
/// order, and applies `update` to the element and its draw. The draws are
/// those of [`fill_standard_normal`], and updating in the same pass saves a
/// buffer of draws.
pub fn for_each_standard_normal(rng: &mut RecordRng, values: &mut [f32], update: impl FnMut(&mut f32, f32)) {
    #[cfg(target_arch = "x86_64")]
    if let Some(gathers) = *AVX2_GATHERS {
        // SAFETY: `AVX2_GATHERS` is `Some` only where the CPU has AVX2.
        unsafe {
            if gathers {
                draw_avx2_gathers(rng, values, update);
            } else {
                draw_avx2_portable(rng, values, update);
            }
        }
        return;
    }
    draw_chunks(rng, values, update, fast_path_portable);
}

/// Whether the fast path loads its table entries with AVX2 gathers
/// (`Some(true)`) or one at a time (`Some(false)`); `None` where the CPU
/// lacks AVX2.
///
/// Gathers are fast on some CPUs and slow on others: on one AMD EPYC guest
/// the plain loads drew 1.4 times as fast. So the first use times both
/// paths and keeps the faster. Both give the same draws, bit for bit.
#[cfg(target_arch = "x86_64")]
static AVX2_GATHERS: LazyLock<Option<bool>> = LazyLock::new(|| {
    if !std::arch::is_x86_feature_detected!("avx2") {
        return None;
    }
    let (gathers, portable) = time_avx2_paths();
    let choice = gathers < portable;
    tracing::debug!(
        gathers_ns = gathers.as_nanos() as u64,
        portable_ns = portable.as_nanos() as u64,
        "Gaussian draws {} AVX2 gathers",
        if choice { "use" } else { "do not use" }
    );
    Some(choice)
});

/// Times both AVX2 fast paths on the same 8,192 draws, alternating five
/// times, and returns the shortest time of each: gathers, then portable.
#[cfg(target_arch = "x86_64")]
fn time_avx2_paths() -> (std::time::Duration, std::time::Duration) {
    use std::time::{Duration, Instant};

    let rngs = super::StageRng::new(0, "calibration");
    let mut values = vec![0f32; 8192];
    let (mut gathers, mut portable) = (Duration::MAX, Duration::MAX);
    for round in 0..5 {
        let mut rng = rngs.stream(b"timing", round);
        let started = Instant::now();
        // SAFETY: the caller checked that the CPU has AVX2.
        unsafe { draw_avx2_gathers(&mut rng, &mut values, |value, z| *value = z) };
        gathers = gathers.min(started.elapsed());
        std::hint::black_box(&values);

        let mut rng = rngs.stream(b"timing", round);
        let started = Instant::now();
        // SAFETY: as above.
        unsafe { draw_avx2_portable(&mut rng, &mut values, |value, z| *value = z) };
        portable = portable.min(started.elapsed());
        std::hint::black_box(&values);
    }
    (gathers, portable)
}

/// Runs [`draw_chunks`] compiled for AVX2, with the fast path in AVX2
/// instructions. Its draws are bit for bit those of the portable code: the
/// same integer and float32 operations, in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn draw_avx2_gathers(rng: &mut RecordRng, values: &mut [f32], update: impl FnMut(&mut f32, f32)) {
    draw_chunks(rng, values, update, |tables, words, draws| fast_path_avx2(tables, words, draws));
}

/// Runs [`draw_chunks`] compiled for AVX2, with the portable fast path,
/// whose table loads the compiler keeps scalar.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn draw_avx2_portable(rng: &mut RecordRng, values: &mut [f32], update: impl FnMut(&mut f32, f32)) {
    draw_chunks(rng, values, update, fast_path_portable);
}

/// Words per chunk: a chunk's flags of rejected draws fit in a `u64`.
const CHUNK: usize = 64;

/// Draws the values chunk by chunk. A chunk takes its 64 words from the
/// stream first, and the fast path computes every draw it accepts. The draws
/// it rejects then take their extra uniforms from the stream, in order.
///
/// The last chunk takes 64 words too, however few values it has left, so a
/// stream's first `n` draws are the same whether `n` or more values are
/// drawn: the `latent` source relies on it for the endpoints of its paths.
#[inline(always)]
fn draw_chunks(
    rng: &mut RecordRng,
    values: &mut [f32],
    mut update: impl FnMut(&mut f32, f32),
    fast_path: impl Fn(&Tables, &[u32], &mut [f32]) -> u64,
) {
    let tables = &*TABLES;
    let mut words = [0u32; CHUNK];
    let mut draws = [0f32; CHUNK];
    for chunk in values.chunks_mut(CHUNK) {
        fill_words(rng, &mut words);
        let mut rejected = fast_path(tables, &words, &mut draws);
        if chunk.len() < CHUNK {
            rejected &= (1u64 << chunk.len()) - 1;
        }
        while rejected != 0 {
            let i = rejected.trailing_zeros() as usize;
            rejected &= rejected - 1;
            let word = words[i];
            let x = slow_path(rng, tables, (word & 0xff) as usize, word >> 9);
            draws[i] = with_sign(x, word);
        }
        for (value, &z) in chunk.iter_mut().zip(draws.iter()) {
            update(value, z);
        }
    }
}

/// Fills `words` from the stream: each 64-bit output gives two words, low
/// half first.
#[inline(always)]
fn fill_words(rng: &mut RecordRng, words: &mut [u32; CHUNK]) {
    for pair in words.chunks_exact_mut(2) {
        let bits = rng.next_u64();
        pair[0] = bits as u32;
        pair[1] = (bits >> 32) as u32;
    }
}

/// Gives `x` the sign of bit 8 of `word`. The bit moves to bit 31 of the
/// float: a branch on a random bit would mispredict half the time.
#[inline(always)]
fn with_sign(x: f32, word: u32) -> f32 {
    f32::from_bits(x.to_bits() ^ ((word & 0x100) << 23))
}

/// Runs the fast path of the ziggurat on one chunk: each word gives the layer
/// (8 bits), the sign (1 bit) and a 23-bit magnitude. Writes the draw of
/// every word and returns the flags of the words whose draw it rejects, bit
/// `i` for `words[i]`. The caller draws those again.
#[inline(always)]
fn fast_path_portable(tables: &Tables, words: &[u32], draws: &mut [f32]) -> u64 {
    let mut rejected = 0u64;
    for (i, (&word, draw)) in words.iter().zip(draws.iter_mut()).enumerate() {
        let layer = (word & 0xff) as usize;
        let magnitude = word >> 9;
        *draw = with_sign(magnitude as f32 * tables.w[layer], word);
        rejected |= u64::from(magnitude >= tables.k[layer]) << i;
    }
    rejected
}

/// Computes what [`fast_path_portable`] does, eight words at a time, with
/// table gathers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fast_path_avx2(tables: &Tables, words: &[u32], draws: &mut [f32]) -> u64 {
    use std::arch::x86_64::*;

    let full = words.len() / 8 * 8;
    let mut rejected = 0u64;
    let low_byte = _mm256_set1_epi32(0xff);
    let sign_bit = _mm256_set1_epi32(0x100);
    for start in (0..full).step_by(8) {
        // SAFETY: `start + 8 <= words.len() == draws.len()`, unaligned
        // loads and stores are used, and every gathered index is below 256,
        // the length of both tables.
        unsafe {
            let word = _mm256_loadu_si256(words.as_ptr().add(start).cast());
            let layer = _mm256_and_si256(word, low_byte);
            let magnitude = _mm256_srli_epi32::<9>(word);
            let scale = _mm256_i32gather_ps::<4>(tables.w.as_ptr(), layer);
            let x = _mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), scale);
            let sign = _mm256_slli_epi32::<23>(_mm256_and_si256(word, sign_bit));
            let draw = _mm256_xor_ps(x, _mm256_castsi256_ps(sign));
            _mm256_storeu_ps(draws.as_mut_ptr().add(start), draw);
            // Both sides are below 2^31, so a signed comparison serves.
            let threshold = _mm256_i32gather_epi32::<4>(tables.k.as_ptr().cast(), layer);
            let accepted = _mm256_cmpgt_epi32(threshold, magnitude);
            let accepted_bits = _mm256_movemask_ps(_mm256_castsi256_ps(accepted)) as u64;
            rejected |= (!accepted_bits & 0xff) << start;
        }
    }
    if full < words.len() {
        rejected |= fast_path_portable(tables, &words[full..], &mut draws[full..]) << full;
    }
    rejected
}

/// Handles the draws the fast path does not accept: the tail beyond
/// [`TAIL_START`], and the wedges between a layer's rectangle and the curve.
#[cold]
fn slow_path<R: Rng + ?Sized>(rng: &mut R, tables: &Tables, mut layer: usize, mut magnitude: u32) -> f32 {
    loop {
        if magnitude < tables.k[layer] {
            return magnitude as f32 * tables.w[layer];
        }
        if layer == 0 {
            // Marsaglia's tail method: exact for x > TAIL_START.
            loop {
                let x = -uniform_open(rng).ln() / TAIL_START;
                let y = -uniform_open(rng).ln();
                if 2.0 * y > x * x {
                    return (TAIL_START + x) as f32;
                }
            }
        }
        let x = magnitude as f32 * tables.w[layer];
        let u = uniform_open(rng) as f32;
        if tables.f[layer] + u * (tables.f[layer - 1] - tables.f[layer]) < (-0.5 * x * x).exp() {
            return x;
        }
        // Rejected: draw a fresh word (its sign is already fixed by the caller).
        let word = rng.next_u32();
        layer = (word & 0xff) as usize;
        magnitude = word >> 9;
    }
}

/// Draws a uniform value in (0, 1), never 0, so its logarithm is finite.
fn uniform_open<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::StageRng;

    #[test]
    fn tables_are_monotone() {
        let tables = &*TABLES;
        for i in 1..LAYERS - 1 {
            assert!(tables.w[i] < tables.w[i + 1], "w is not increasing at {i}");
            assert!(tables.f[i] > tables.f[i + 1], "f is not decreasing at {i}");
        }
    }

    /// The AVX2 fast path gives the portable one's draws and flags, bit for
    /// bit, on every chunk length and on words that hit every layer.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_fast_path_matches_portable() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let tables = &*TABLES;
        let mut rng = StageRng::new(5, "avx2").stream(b"words", 0);
        let mut rejected_seen = 0;
        for round in 0..2000 {
            let len = 1 + round % CHUNK;
            let mut words = [0u32; CHUNK];
            fill_words(&mut rng, &mut words);
            // Words at the edges of the magnitude range too.
            if round % 3 == 0 {
                words[0] = (words[0] & 0x1ff) | (0x7f_ffff << 9);
            }
            let (mut portable, mut avx2) = ([0f32; CHUNK], [0f32; CHUNK]);
            let expected = fast_path_portable(tables, &words[..len], &mut portable[..len]);
            // SAFETY: the CPU has AVX2, checked above.
            let found = unsafe { fast_path_avx2(tables, &words[..len], &mut avx2[..len]) };
            assert_eq!(found, expected, "flags of {len} words");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&avx2[..len]), bits(&portable[..len]), "draws of {len} words");
            rejected_seen += expected.count_ones();
        }
        assert!(rejected_seen > 100, "only {rejected_seen} rejected words were compared");
    }

    /// Whichever path the CPU runs faster, the draws are the same: both AVX2
    /// paths and the plain one, over enough draws to reach the wedges and
    /// the tail, and where each leaves its stream.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_path_gives_the_same_draws() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let rngs = StageRng::new(9, "paths");
        let run = |path: usize| {
            let mut rng = rngs.stream(b"paths", 0);
            let mut values = vec![0f32; 200_003];
            let set = |value: &mut f32, z: f32| *value = z;
            match path {
                // SAFETY: the CPU has AVX2, checked above.
                0 => unsafe { draw_avx2_gathers(&mut rng, &mut values, set) },
                1 => unsafe { draw_avx2_portable(&mut rng, &mut values, set) },
                _ => draw_chunks(&mut rng, &mut values, set, fast_path_portable),
            }
            (values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), rng.next_u64())
        };
        let gathers = run(0);
        assert!(gathers == run(1), "the AVX2 paths differ");
        assert!(gathers == run(2), "the AVX2 and plain paths differ");
    }

    /// A stream's first draws do not depend on how many are drawn, even
    /// where the slow path takes extra uniforms.
    #[test]
    fn draws_are_prefixes_of_longer_draws() {
        let rngs = StageRng::new(3, "prefix");
        for key in 0..200u32 {
            let mut long = vec![0f32; 300];
            fill_standard_normal(&mut rngs.stream(b"prefix", key), &mut long);
            for n in [1, 10, 63, 64, 65, 130] {
                let mut short = vec![0f32; n];
                fill_standard_normal(&mut rngs.stream(b"prefix", key), &mut short);
                assert_eq!(short[..], long[..n], "stream {key}, {n} draws");
            }
        }
    }

    /// Pins the draws of a few streams, and where each leaves its stream:
    /// lengths around a chunk's size, an odd length, and enough draws for
    /// every path of the ziggurat (wedges and tail). If this changes, the
    /// outputs of every pipeline with Gaussian noise change, and
    /// `CONTRACT_VERSION` must be bumped with it.
    #[test]
    fn known_answers_pin_the_draws() {
        let expected = [
            (1, 1069571035, 16069300192927967734),
            (63, 7335770537089874160, 8550956649947456783),
            (64, 7088260428164173689, 10559914454084196880),
            (65, 10414220603538776673, 15389003662503396976),
            (100_003, 15877177319515060921, 11397298222666813799),
        ];
        let rngs = StageRng::new(3, "normal");
        for (len, digest, next) in expected {
            let mut values = vec![0f32; len];
            let mut rng = rngs.stream(b"pin", len as u32);
            fill_standard_normal(&mut rng, &mut values);
            let found = values.iter().fold(0u64, |a, v| a.wrapping_mul(31).wrapping_add(u64::from(v.to_bits())));
            assert_eq!((found, rng.next_u64()), (digest, next), "{len} draws");
        }
    }

    #[test]
    fn draws_have_unit_moments() {
        let mut values = vec![0f32; 400_000];
        fill_standard_normal(&mut StageRng::new(3, "normal").stream(b"moments", 0), &mut values);
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let variance = values.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let kurtosis = values.iter().map(|&v| (f64::from(v) - mean).powi(4)).sum::<f64>() / n / variance.powi(2);
        // Standard errors: mean 0.0016, variance 0.0022, kurtosis 0.0077.
        assert!(mean.abs() < 0.008, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.011, "variance {variance}");
        assert!((kurtosis - 3.0).abs() < 0.04, "kurtosis {kurtosis}");
        let tail = values.iter().filter(|v| v.abs() > TAIL_START as f32).count() as f64 / n;
        // P(|z| > 3.654) = 2.58e-4; the standard error here is 2.5e-5.
        assert!((tail - 2.58e-4).abs() < 1e-4, "tail fraction {tail}");
    }
}
