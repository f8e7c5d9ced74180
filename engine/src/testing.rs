//! Helpers shared by the tests, benches and the quickstart self-check: one GPU per process, seeded random data,
//! and comparisons that say where and by how much results differ.

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Gpu;

/// Sizes for 1-D kernels: 1, odd, primes, a non-multiple of the 256-thread workgroup, and one over 65535 groups
/// wide would be too slow on a software GPU, so the grid folding is covered by `grid_1d`'s own test.
pub const SIZES_1D: &[usize] = &[1, 7, 31, 255, 257, 1000, 4099, 65_537];

/// The process-wide GPU. Fails (never skips) with the message that says how to get one.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::new() {
        Ok(g) => g,
        Err(e) => panic!("{e}"),
    })
}

/// Runs `f` once per row reduction the shared GPU can run (the tree everywhere; the subgroup one where subgroups
/// have a fixed size), forced on this thread, and names the reduction when `f` panics.
pub fn each_row_reduction(f: impl Fn()) {
    use crate::ops::norm::RowReduction;
    for r in RowReduction::ALL.into_iter().filter(|r| r.available(gpu())) {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.with(&f))) {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("with {r:?} reductions: {}", msg.unwrap_or_default());
        }
    }
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform values in [-1, 1), seeded.
pub fn random_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Largest |got - want| / (atol + rtol * |want|) over all elements, with its index.
pub fn worst_error(got: &[f32], want: &[f64], rtol: f64, atol: f64) -> (usize, f64) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut worst = (0, 0.0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = if g.is_finite() { (g as f64 - w).abs() / (atol + rtol * w.abs()) } else { f64::INFINITY };
        if e > worst.1 || e.is_nan() {
            worst = (i, if e.is_nan() { f64::INFINITY } else { e });
        }
    }
    worst
}

/// Max absolute difference (for reports).
pub fn max_abs_diff(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max)
}

/// Panics naming the first-worst element if any |got - want| > atol + rtol * |want|.
pub fn assert_close(got: &[f32], want: &[f64], rtol: f64, atol: f64, what: &str) {
    let (i, e) = worst_error(got, want, rtol, atol);
    assert!(
        e <= 1.0,
        "{what}: element {i} is {} but the f64 reference says {} (rtol {rtol}, atol {atol}, len {})",
        got[i],
        want[i],
        got.len()
    );
}

/// Central finite differences of a scalar f64 function: the independent check that proves each CPU reference
/// backward (which in turn checks the GPU kernels).
pub fn numeric_gradient(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + h;
            let up = f(&xp);
            xp[i] = x[i] - h;
            let down = f(&xp);
            xp[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Panics unless two f64 vectors agree within atol + rtol·|want| everywhere.
pub fn assert_close_f64(got: &[f64], want: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= atol + rtol * w.abs(), "{what}: element {i} is {g}, expected {w}");
    }
}
