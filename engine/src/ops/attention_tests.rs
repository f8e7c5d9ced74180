//! Attention tests: the forward and backward kernels against the f64 references, the reference backward against
//! finite differences, memory (no T×T) and determinism.

use super::*;
use crate::testing::{assert_close, assert_close_f64, gpu, numeric_gradient, random_vec, to_f64};

/// Worst-case f32 error of one output, u = 2^-24 and amp = the largest |q| (k, v lie in [-1, 1)): a score sums
/// HS products after scaling by 1/sqrt(HS), so it is off by at most amp·HS^1.5·u; y and l sum T terms, plus one
/// rounding per rescaled block (fewer than T), so they are off by T·u relative; exp/log on the GPU add a few ulps.
/// f32::EPSILON = 2u doubles that bound for margin.
fn tol(t: usize, hs: usize, amp: f64) -> f64 {
    (amp * (hs as f64).powf(1.5) + 2.0 * t as f64) * f32::EPSILON as f64 + 1e-6
}

/// Random qkv with q multiplied by `amp`: a large amp makes the softmax peaky, so the running max moves between
/// key blocks and the online rescaling is exercised for real.
fn random_qkv(b: usize, t: usize, c: usize, amp: f32, seed: u64) -> Vec<f32> {
    let mut x = random_vec(b * t * 3 * c, seed);
    x.chunks_mut(3 * c).for_each(|row| row[..c].iter_mut().for_each(|v| *v *= amp));
    x
}

fn check(gpu: &Gpu, (b, t, c, nh): (usize, usize, usize, usize), amp: f32, seed: u64) {
    let x = random_qkv(b, t, c, amp, seed);
    let (y, lse) = attention_forward(gpu, &gpu.upload(&x, &[b, t, 3 * c]).unwrap(), nh).unwrap();
    assert_eq!((y.shape(), lse.shape()), (&[b, t, c][..], &[b, nh, t][..]));
    let (want_y, want_lse) = cpu::attention_forward(&to_f64(&x), b, t, c, nh);
    let atol = tol(t, c / nh, amp as f64);
    let what = format!("(B,T,C,NH)=({b},{t},{c},{nh}) amp {amp}");
    // |y| <= max|v| < 1 (a convex combination of v rows), so the absolute bound is the right measure.
    assert_close(&gpu.read(&y).unwrap(), &want_y, 0.0, atol, &format!("y {what}"));
    // lse = m + log(l) adds one rounding relative to |lse| on top of the same bound.
    assert_close(&gpu.read(&lse).unwrap(), &want_lse, f32::EPSILON as f64, atol, &format!("lse {what}"));
}

#[test]
fn matches_reference_on_odd_shapes() {
    let gpu = gpu();
    let shapes = [
        (1, 1, 8, 1),
        (2, 7, 12, 3),
        (1, 33, 48, 2),
        (3, 65, 64, 4),
        (1, 200, 96, 3),
        (2, 129, 32, 1),
        (1, 70, 128, 2), // HS = 64, GPT-2's head size: 32-key blocks
        (1, 40, 256, 2), // HS = 128, the kernel's max: 16-key blocks
        (2, 19, 15, 3),  // HS = 5, odd
    ];
    for (case, &shape) in shapes.iter().enumerate() {
        check(gpu, shape, 1.0, case as u64);
        check(gpu, shape, 6.0, 100 + case as u64);
    }
}

#[test]
fn long_sequence_matches_and_allocates_only_outputs() {
    // A private Gpu: the shared one's pool is used by tests running in parallel threads, which would make the
    // peak-bytes assertion racy.
    let gpu = Gpu::new().unwrap();
    let (b, t, c, nh) = (1, 1024, 32, 2);
    let x = random_qkv(b, t, c, 3.0, 7);
    let qkv = gpu.upload(&x, &[b, t, 3 * c]).unwrap();
    gpu.sync().unwrap();
    let before = gpu.pool_stats().live_bytes;
    gpu.reset_peak();
    let (y, lse) = attention_forward(&gpu, &qkv, nh).unwrap();
    gpu.sync().unwrap();
    let added = gpu.pool_stats().peak_bytes - before;
    let outputs = y.bytes() + lse.bytes();
    // Size classes round up by at most 12.5%; a T×T score matrix for even one head would be 4 MiB here.
    assert!(added <= outputs * 9 / 8, "attention allocated {added} bytes beyond its outputs' {outputs}");
    assert!(added < (t * t * 4) as u64 / 16);
    let (want_y, want_lse) = cpu::attention_forward(&to_f64(&x), b, t, c, nh);
    let atol = tol(t, c / nh, 3.0); // same bound as above, dominated by the 2·T·eps term here
    assert_close(&gpu.read(&y).unwrap(), &want_y, 0.0, atol, "y T=1024");
    assert_close(&gpu.read(&lse).unwrap(), &want_lse, f32::EPSILON as f64, atol, "lse T=1024");
}

#[test]
fn bad_shapes_are_typed_errors() {
    let gpu = gpu();
    let up = |shape: &[usize]| gpu.upload(&vec![0.0; shape.iter().product()], shape).unwrap();
    let invalid = |r: Result<(Tensor, Tensor)>, needle: &str| match r {
        Err(Error::Invalid { op: "attention_forward", message }) => assert!(message.contains(needle), "{message}"),
        other => panic!("expected Invalid mentioning {needle:?}, got {:?}", other.map(|_| ())),
    };
    invalid(attention_forward(gpu, &up(&[1, 4, 30]), 3), "divide"); // C = 10, 3 heads
    invalid(attention_forward(gpu, &up(&[1, 4, 30]), 0), "at least 1");
    invalid(attention_forward(gpu, &up(&[1, 2, 768]), 1), "128"); // head size 256
    let shape_err =
        |r: Result<(Tensor, Tensor)>| assert!(matches!(r, Err(Error::Shape { op: "attention_forward", .. })));
    shape_err(attention_forward(gpu, &up(&[1, 4, 10]), 1)); // not [q | k | v]
    shape_err(attention_forward(gpu, &up(&[4, 24]), 1)); // 2-D
    let ints = gpu.upload_i32(&[0; 24], &[1, 2, 12]).unwrap();
    assert!(matches!(attention_forward(gpu, &ints, 1), Err(Error::DType { .. })));
    // Empty tensors cannot be built (`alloc` and `reshape` refuse them), so `nonempty` is a guard only.
}

// ---- backward ----

/// Forward then backward on the GPU for random qkv (q scaled by `amp`) and dy; returns (qkv, dy, dqkv) as f32.
fn gpu_backward(
    gpu: &Gpu,
    (b, t, c, nh): (usize, usize, usize, usize),
    amp: f32,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = random_qkv(b, t, c, amp, seed);
    let g = random_vec(b * t * c, seed + 1_000_000);
    let qkv = gpu.upload(&x, &[b, t, 3 * c]).unwrap();
    let (y, lse) = attention_forward(gpu, &qkv, nh).unwrap();
    let dy = gpu.upload(&g, &[b, t, c]).unwrap();
    let dqkv = attention_backward(gpu, &qkv, &y, &lse, &dy, nh).unwrap();
    assert_eq!(dqkv.shape(), &[b, t, 3 * c]);
    (x, g, gpu.read(&dqkv).unwrap())
}

/// Per element of dqkv, the sum of |terms| its f32 value accumulates, bounding |v| and |y| by 1 (inputs lie in
/// [-1, 1), y is a convex combination of v rows): with a_i = Σ_d |dy_i,d| ≥ |dP_ij|, |D_i|,
/// dq_i,d ≤ scale Σ_j P_ij·2a_i·|k_j,d|, dk_j,d ≤ scale Σ_i P_ij·2a_i·|q_i,d|, dv_j,d ≤ Σ_i P_ij·|dy_i,d|.
fn magnitudes(qkv: &[f64], dy: &[f64], b: usize, t: usize, c: usize, nh: usize) -> Vec<f64> {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let at = |bi: usize, ti: usize, part: usize, h: usize| (bi * t + ti) * 3 * c + part * c + h * hs;
    let mut m = vec![0.0; qkv.len()];
    let mut p = vec![0.0; t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let q = &qkv[at(bi, i, 0, h)..][..hs];
                let g = &dy[(bi * t + i) * c + h * hs..][..hs];
                for (j, s) in p[..=i].iter_mut().enumerate() {
                    *s = q.iter().zip(&qkv[at(bi, j, 1, h)..][..hs]).map(|(a, b)| a * b).sum::<f64>() * scale;
                }
                let mx = p[..=i].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = p[..=i].iter().map(|s| (s - mx).exp()).sum();
                let a: f64 = g.iter().map(|v| v.abs()).sum();
                for j in 0..=i {
                    let pj = (p[j] - mx).exp() / sum;
                    for d in 0..hs {
                        m[at(bi, i, 0, h) + d] += scale * pj * 2.0 * a * qkv[at(bi, j, 1, h) + d].abs();
                        m[at(bi, j, 1, h) + d] += scale * pj * 2.0 * a * q[d].abs();
                        m[at(bi, j, 2, h) + d] += pj * g[d].abs();
                    }
                }
            }
        }
    }
    m
}

/// Relative f32 error of the backward, as a multiple of `magnitudes`, u = 2^-24: a probability exp(s − lse) is off
/// by |Δs| + |Δlse| ≤ (1.5·amp·HS^1.5 + 2T)·eps (the forward's bounds) plus exp's few ulps; D inherits y's absolute
/// error (amp·HS^1.5 + 2T)·eps; dP and D are HS-term dot products (HS·u); dq, dk, dv sum up to T terms (T·u).
/// f32::EPSILON = 2u gives the u terms a 2x margin.
fn backward_tol(t: usize, hs: usize, amp: f64) -> f64 {
    (2.0 * amp * (hs as f64).powf(1.5) + 4.0 * t as f64 + hs as f64 + 32.0) * f32::EPSILON as f64
}

/// |got − want| ≤ tol·magnitude (+ a denormal-sized floor) everywhere; returns the worst ratio to the bound.
fn assert_backward_close(got: &[f32], want: &[f64], mag: &[f64], tol: f64, what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0, 0.0);
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let e = if g.is_finite() { (g as f64 - w).abs() / (tol * m + 1e-30) } else { f64::INFINITY };
        if e.is_nan() || e > worst.1 {
            worst = (i, if e.is_nan() { f64::INFINITY } else { e });
        }
    }
    let (i, e) = worst;
    assert!(
        e <= 1.0,
        "{what}: element {i} is {} but the f64 reference says {} (bound {})",
        got[i],
        want[i],
        tol * mag[i]
    );
    e
}

fn check_backward(gpu: &Gpu, shape: (usize, usize, usize, usize), amp: f32, seed: u64) -> f64 {
    let (b, t, c, nh) = shape;
    let (x, g, got) = gpu_backward(gpu, shape, amp, seed);
    let (x, g) = (to_f64(&x), to_f64(&g));
    let want = cpu::attention_backward(&x, &g, b, t, c, nh);
    let mag = magnitudes(&x, &g, b, t, c, nh);
    let what = format!("dqkv (B,T,C,NH)=({b},{t},{c},{nh}) amp {amp}");
    assert_backward_close(&got, &want, &mag, backward_tol(t, c / nh, amp as f64), &what)
}

#[test]
fn reference_backward_matches_finite_differences() {
    // (B, T, C, NH, amp): two heads of 3, three heads of 3 (odd), one head of 8 with a peaky softmax.
    for (case, &(b, t, c, nh, amp)) in [(2, 5, 6, 2, 1.0), (1, 7, 9, 3, 1.0), (1, 6, 8, 1, 4.0)].iter().enumerate() {
        let x = to_f64(&random_qkv(b, t, c, amp, 500 + case as u64));
        let w = to_f64(&random_vec(b * t * c, 600 + case as u64));
        let loss = |x: &[f64]| -> f64 {
            let (y, _) = cpu::attention_forward(x, b, t, c, nh);
            y.iter().zip(&w).map(|(y, w)| y * w).sum()
        };
        let numeric = numeric_gradient(loss, &x, 1e-6);
        let analytic = cpu::attention_backward(&x, &w, b, t, c, nh);
        // Central differences are off by h²/6·|f'''| ~ 1e-12 (truncation) plus the loss's f64 rounding over 2h,
        // ~1e-15 / 2e-6 ~ 1e-9 (cancellation): 1e-6 relative with a 1e-8 floor leaves a wide margin yet would
        // catch any wrong term, which is off by O(|gradient|).
        assert_close_f64(&analytic, &numeric, 1e-6, 1e-8, &format!("dqkv (B,T,C,NH)=({b},{t},{c},{nh}) amp {amp}"));
    }
}

#[test]
fn backward_matches_reference_on_odd_shapes() {
    let gpu = gpu();
    let shapes = [
        (1, 1, 8, 1),
        (2, 7, 12, 3),
        (1, 33, 48, 2),
        (3, 65, 64, 4),
        (1, 200, 96, 3),
        (2, 129, 32, 1),
        (1, 70, 128, 2), // HS = 64, GPT-2's head size
        (1, 40, 256, 2), // HS = 128, the kernels' max: 15-query blocks in the dK/dV kernel
        (2, 19, 15, 3),  // HS = 5, odd
    ];
    let mut worst: f64 = 0.0;
    for (case, &shape) in shapes.iter().enumerate() {
        worst = worst.max(check_backward(gpu, shape, 1.0, 200 + case as u64));
        // Peaky softmax: probabilities near 0 and 1, where exp(s − lse) is most sensitive to the saved lse.
        worst = worst.max(check_backward(gpu, shape, 6.0, 300 + case as u64));
    }
    eprintln!("attention backward: worst error {worst:.3} of the bound");
}

#[test]
fn backward_is_bit_reproducible() {
    let gpu = gpu();
    let shape = (2, 77, 48, 3);
    let (_, _, first) = gpu_backward(gpu, shape, 3.0, 42);
    let (_, _, second) = gpu_backward(gpu, shape, 3.0, 42);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&first) == bits(&second), "two backward runs differ");
}

#[test]
fn long_sequence_backward_matches_without_a_score_matrix() {
    // A private Gpu so that tests running in parallel threads cannot raise its pool's peak.
    let gpu = Gpu::new().unwrap();
    let (b, t, c, nh) = (1, 2048, 32, 1);
    let amp = 3.0;
    let x = random_qkv(b, t, c, amp, 11);
    let g = random_vec(b * t * c, 12);
    let qkv = gpu.upload(&x, &[b, t, 3 * c]).unwrap();
    let dy = gpu.upload(&g, &[b, t, c]).unwrap();
    gpu.sync().unwrap();
    gpu.reset_peak();
    let (y, lse) = attention_forward(&gpu, &qkv, nh).unwrap();
    let dqkv = attention_backward(&gpu, &qkv, &y, &lse, &dy, nh).unwrap();
    let got = gpu.read(&dqkv).unwrap();
    let peak = gpu.pool_stats().peak_bytes;
    // Everything legitimately live (qkv, dy, y, lse, D, dqkv) is about 2 MiB; one head's T×T f32 scores is 16 MiB.
    assert!(peak < 4 << 20, "peak pool bytes {peak} during forward + backward at T = {t}");
    let (x, g) = (to_f64(&x), to_f64(&g));
    let want = cpu::attention_backward(&x, &g, b, t, c, nh);
    let mag = magnitudes(&x, &g, b, t, c, nh);
    let e = assert_backward_close(&got, &want, &mag, backward_tol(t, c / nh, amp as f64), "dqkv T=2048");
    eprintln!("attention backward T=2048: peak {peak} bytes, worst error {e:.3} of the bound");
}

#[test]
fn backward_bad_shapes_are_typed_errors() {
    let gpu = gpu();
    let up = |shape: &[usize]| gpu.upload(&vec![0.0; shape.iter().product()], shape).unwrap();
    let (b, t, c, nh) = (2, 3, 8, 2);
    let (qkv, y, lse, dy) = (up(&[b, t, 3 * c]), up(&[b, t, c]), up(&[b, nh, t]), up(&[b, t, c]));
    let shape_err = |r: Result<Tensor>, what: &str| match r {
        Err(Error::Shape { op: "attention_backward", what: w, .. }) => assert_eq!(w, what),
        other => panic!("expected a Shape error for {what}, got {other:?}"),
    };
    shape_err(attention_backward(gpu, &qkv, &up(&[b, t, c + 1]), &lse, &dy, nh), "y");
    shape_err(attention_backward(gpu, &qkv, &y, &lse, &up(&[b, t + 1, c]), nh), "dy");
    shape_err(attention_backward(gpu, &qkv, &y, &up(&[b, t, nh]), &dy, nh), "lse"); // [B, T, NH]: wrong order
    shape_err(attention_backward(gpu, &qkv, &y, &lse, &dy, 1), "lse"); // n_head disagrees with lse
    shape_err(attention_backward(gpu, &up(&[b, t, 3 * c + 1]), &y, &lse, &dy, nh), "qkv last dimension");
    let invalid = |r: Result<Tensor>, needle: &str| match r {
        Err(Error::Invalid { op: "attention_backward", message }) => assert!(message.contains(needle), "{message}"),
        other => panic!("expected Invalid mentioning {needle:?}, got {other:?}"),
    };
    invalid(attention_backward(gpu, &qkv, &y, &lse, &dy, 3), "divide");
    invalid(attention_backward(gpu, &qkv, &y, &lse, &dy, 0), "at least 1");
    let ints = gpu.upload_i32(&[0; 12], &[b, nh, t]).unwrap();
    assert!(matches!(
        attention_backward(gpu, &qkv, &y, &ints, &dy, nh),
        Err(Error::DType { op: "attention_backward", what: "lse", .. })
    ));
}
