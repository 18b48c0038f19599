//! Interpolation between two latent vectors, for the `latent` source's
//! `interpolate` setting.

use crate::config::InterpolationMethod;

/// Below this `sin(omega)`, slerp's weights lose precision, and the
/// endpoints are so close to parallel that linear interpolation is
/// equivalent to within float32 precision.
const PARALLEL_SIN: f64 = 1e-6;

/// Writes the point at fraction `t` (0 at `a`, 1 at `b`) into `out`.
///
/// Spherical interpolation is slerp on the unnormalized vectors:
/// `sin((1 - t) omega) / sin(omega) * a + sin(t omega) / sin(omega) * b`,
/// where `omega` is the angle between `a` and `b`. When both have the same
/// norm, every point keeps that norm and the angle moves at a constant rate.
/// A zero vector or (anti)parallel endpoints fall back to linear
/// interpolation, where the angle is undefined.
pub fn interpolate(method: InterpolationMethod, a: &[f64], b: &[f64], t: f64, out: &mut [f64]) {
    let (wa, wb) = match method {
        InterpolationMethod::Linear => (1.0 - t, t),
        InterpolationMethod::Spherical => slerp_weights(a, b, t).unwrap_or((1.0 - t, t)),
    };
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = wa * x + wb * y;
    }
}

/// Returns the weights of `a` and `b` in slerp, or `None` when the angle is undefined.
fn slerp_weights(a: &[f64], b: &[f64], t: f64) -> Option<(f64, f64)> {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norms = a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if norms == 0.0 {
        return None;
    }
    let omega = (dot / norms).clamp(-1.0, 1.0).acos();
    let sin_omega = omega.sin();
    if sin_omega < PARALLEL_SIN {
        return None;
    }
    Some((((1.0 - t) * omega).sin() / sin_omega, (t * omega).sin() / sin_omega))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(v: &[f64]) -> f64 {
        v.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    fn angle(a: &[f64], b: &[f64]) -> f64 {
        (a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))).clamp(-1.0, 1.0).acos()
    }

    #[test]
    fn linear_midpoint_is_average() {
        let mut out = [0.0; 3];
        interpolate(InterpolationMethod::Linear, &[1.0, -2.0, 4.0], &[3.0, 2.0, 0.0], 0.5, &mut out);
        assert_eq!(out, [2.0, 0.0, 2.0]);
    }

    #[test]
    fn slerp_of_orthogonal_unit_vectors() {
        // Between (1, 0) and (0, 1), slerp at t is (cos(t pi/2), sin(t pi/2)).
        let mut out = [0.0; 2];
        for t in [0.0, 0.25, 0.5, 1.0] {
            interpolate(InterpolationMethod::Spherical, &[1.0, 0.0], &[0.0, 1.0], t, &mut out);
            let angle = t * std::f64::consts::FRAC_PI_2;
            assert!((out[0] - angle.cos()).abs() < 1e-12, "t {t}: {out:?}");
            assert!((out[1] - angle.sin()).abs() < 1e-12, "t {t}: {out:?}");
        }
    }

    #[test]
    fn slerp_keeps_equal_norms_and_even_angles() {
        let a = [3.0, 0.0, 4.0, 0.0];
        let b = [0.0, -4.0, 0.0, 3.0];
        let steps = 7;
        let points: Vec<Vec<f64>> = (0..steps)
            .map(|j| {
                let mut out = vec![0.0; 4];
                interpolate(InterpolationMethod::Spherical, &a, &b, j as f64 / (steps - 1) as f64, &mut out);
                out
            })
            .collect();
        let step_angle = angle(&a, &b) / (steps - 1) as f64;
        for pair in points.windows(2) {
            assert!((norm(&pair[1]) - 5.0).abs() < 1e-12, "norm {}", norm(&pair[1]));
            assert!((angle(&pair[0], &pair[1]) - step_angle).abs() < 1e-9);
        }
    }

    #[test]
    fn parallel_endpoints_fall_back_to_linear() {
        let mut out = [0.0; 2];
        interpolate(InterpolationMethod::Spherical, &[1.0, 1.0], &[2.0, 2.0], 0.5, &mut out);
        assert_eq!(out, [1.5, 1.5]);
        interpolate(InterpolationMethod::Spherical, &[0.0, 0.0], &[2.0, 2.0], 0.5, &mut out);
        assert_eq!(out, [1.0, 1.0]);
    }
}
