//! Attention tests: the forward and backward kernels against the f64 references, the reference backward against
//! finite differences, memory (no T×T) and determinism.

use super::*;
use crate::testing::{assert_close, assert_close_f64, gpu, numeric_gradient, random_vec, to_f64};
use rand::Rng;

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

/// The designs this adapter runs (on 8-lane lavapipe both; with 4-lane subgroups or none, the tiled one). Every
/// GPU check below runs once per design; a head size the register design cannot take falls back to tiled.
fn designs(gpu: &Gpu) -> Vec<AttentionDesign> {
    AttentionDesign::ALL.into_iter().filter(|d| d.available(gpu, 4)).collect()
}

#[test]
fn register_design_runs_where_it_can() {
    let gpu = gpu();
    let can = gpu.has_subgroups() && gpu.info().subgroup_min_size >= 8;
    assert_eq!(AttentionDesign::Register.available(gpu, 64), can);
    assert!(!AttentionDesign::Register.available(gpu, 5), "head size 5 is not whole vec4s");
    let default = if can && gpu.is_software() { AttentionDesign::Register } else { AttentionDesign::Tiled };
    assert_eq!(AttentionDesign::chosen(gpu, 64), default);
    assert_eq!(AttentionDesign::Register.with(|| AttentionDesign::chosen(gpu, 5)), AttentionDesign::Tiled);
    assert_eq!(AttentionDesign::Tiled.with(|| AttentionDesign::chosen(gpu, 64)), AttentionDesign::Tiled);
    assert_eq!(AttentionDesign::chosen(gpu, 64), default, "with() restores the choice");
}

fn check(gpu: &Gpu, shape: (usize, usize, usize, usize), amp: f32, seed: u64) {
    for design in designs(gpu) {
        design.with(|| check_one(gpu, shape, amp, seed, design));
    }
}

fn check_one(gpu: &Gpu, (b, t, c, nh): (usize, usize, usize, usize), amp: f32, seed: u64, design: AttentionDesign) {
    let x = random_qkv(b, t, c, amp, seed);
    let (y, lse) = attention_forward(gpu, &gpu.upload(&x, &[b, t, 3 * c]).unwrap(), nh).unwrap();
    assert_eq!((y.shape(), lse.shape()), (&[b, t, c][..], &[b, nh, t][..]));
    let (want_y, want_lse) = cpu::attention_forward(&to_f64(&x), b, t, c, nh);
    let atol = tol(t, c / nh, amp as f64);
    let what = format!("{design:?} (B,T,C,NH)=({b},{t},{c},{nh}) amp {amp}");
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
    magnitudes_segments(qkv, dy, b, t, c, nh, &vec![0; b * t])
}

/// `magnitudes` over the keys each query sees with segment starts (clamped like the kernels clamp them).
fn magnitudes_segments(qkv: &[f64], dy: &[f64], b: usize, t: usize, c: usize, nh: usize, starts: &[i32]) -> Vec<f64> {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let at = |bi: usize, ti: usize, part: usize, h: usize| (bi * t + ti) * 3 * c + part * c + h * hs;
    let mut m = vec![0.0; qkv.len()];
    let mut p = vec![0.0; t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let s0 = (starts[bi * t + i].max(0) as usize).min(i);
                let q = &qkv[at(bi, i, 0, h)..][..hs];
                let g = &dy[(bi * t + i) * c + h * hs..][..hs];
                for j in s0..=i {
                    p[j] = q.iter().zip(&qkv[at(bi, j, 1, h)..][..hs]).map(|(a, b)| a * b).sum::<f64>() * scale;
                }
                let mx = p[s0..=i].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = p[s0..=i].iter().map(|s| (s - mx).exp()).sum();
                let a: f64 = g.iter().map(|v| v.abs()).sum();
                for j in s0..=i {
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
    let mut worst: f64 = 0.0;
    for design in designs(gpu) {
        let (x, g, got) = design.with(|| gpu_backward(gpu, shape, amp, seed));
        let (x, g) = (to_f64(&x), to_f64(&g));
        let want = cpu::attention_backward(&x, &g, b, t, c, nh);
        let mag = magnitudes(&x, &g, b, t, c, nh);
        let what = format!("{design:?} dqkv (B,T,C,NH)=({b},{t},{c},{nh}) amp {amp}");
        worst = worst.max(assert_backward_close(&got, &want, &mag, backward_tol(t, c / nh, amp as f64), &what));
    }
    worst
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
    for design in designs(gpu) {
        let (_, _, first) = design.with(|| gpu_backward(gpu, shape, 3.0, 42));
        let (_, _, second) = design.with(|| gpu_backward(gpu, shape, 3.0, 42));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&first) == bits(&second), "{design:?}: two backward runs differ");
    }
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

// ---- packed sequences (segment starts) ----

/// Random sequence lengths for one row of `t` positions: mostly 1..=t/3, a fifth of them single tokens, stopping
/// at a random point so that the row usually ends in padding (the extra segment `segment_starts` adds).
fn random_lengths(t: usize, r: &mut impl Rng) -> Vec<usize> {
    let mut lengths = Vec::new();
    let mut used = 0;
    while used < t && r.random_range(0..8) != 0 {
        let n = if r.random_range(0..5) == 0 { 1 } else { r.random_range(1..=(t / 3).max(1)) }.min(t - used);
        lengths.push(n);
        used += n;
    }
    lengths
}

/// (B, T, C, NH).
type Shape = (usize, usize, usize, usize);

/// GPU forward and backward with `starts` ([B, T] host values) against the f64 references; returns the worst
/// backward error as a fraction of its bound.
fn check_segments(gpu: &Gpu, shape: Shape, starts: &[i32], amp: f32, seed: u64) -> f64 {
    let run = |d: AttentionDesign| d.with(|| check_segments_one(gpu, shape, starts, amp, seed, d));
    designs(gpu).into_iter().map(run).fold(0.0, f64::max)
}

fn check_segments_one(gpu: &Gpu, (b, t, c, nh): Shape, starts: &[i32], amp: f32, seed: u64, d: AttentionDesign) -> f64 {
    let x = random_qkv(b, t, c, amp, seed);
    let g = random_vec(b * t * c, seed + 1_000_000);
    let qkv = gpu.upload(&x, &[b, t, 3 * c]).unwrap();
    let st = gpu.upload_i32(starts, &[b, t]).unwrap();
    let (y, lse) = attention_forward_segments(gpu, &qkv, nh, Some(&st)).unwrap();
    let dy = gpu.upload(&g, &[b, t, c]).unwrap();
    let dqkv = attention_backward_segments(gpu, &qkv, &y, &lse, &dy, nh, Some(&st)).unwrap();
    assert_eq!((y.shape(), lse.shape(), dqkv.shape()), (&[b, t, c][..], &[b, nh, t][..], &[b, t, 3 * c][..]));

    let (x, g) = (to_f64(&x), to_f64(&g));
    let what = format!("{d:?} (B,T,C,NH)=({b},{t},{c},{nh}) amp {amp} starts {starts:?}");
    let (want_y, want_lse) = cpu::attention_forward_segments(&x, b, t, c, nh, starts);
    let atol = tol(t, c / nh, amp as f64);
    assert_close(&gpu.read(&y).unwrap(), &want_y, 0.0, atol, &format!("y {what}"));
    assert_close(&gpu.read(&lse).unwrap(), &want_lse, f32::EPSILON as f64, atol, &format!("lse {what}"));
    let want = cpu::attention_backward_segments(&x, &g, b, t, c, nh, starts);
    let mag = magnitudes_segments(&x, &g, b, t, c, nh, starts);
    let got = gpu.read(&dqkv).unwrap();
    assert_backward_close(&got, &want, &mag, backward_tol(t, c / nh, amp as f64), &format!("dqkv {what}"))
}

#[test]
fn segment_starts_lays_out_packed_rows() {
    assert_eq!(segment_starts(&[vec![2, 1, 3]], 6), [0, 0, 2, 3, 3, 3]);
    assert_eq!(segment_starts(&[vec![2, 0, 1], vec![]], 5), [0, 0, 2, 3, 3, 0, 0, 0, 0, 0]); // padding: its own segment
    assert_eq!(segment_starts(&[vec![1, 1, 1]], 3), [0, 1, 2]);
}

#[test]
#[should_panic(expected = "add up to 7 > T = 6")]
fn segment_starts_refuses_rows_longer_than_t() {
    segment_starts(&[vec![4, 3]], 6);
}

#[test]
fn segments_match_reference_on_odd_shapes() {
    let gpu = gpu();
    let mut r = crate::testing::rng(77);
    // (shape, fixed segmentation): boundaries just before, on and after the 64-row workgroups and the key blocks
    // (64 keys for small heads, 32 at HS = 64, 16 at HS = 128), single tokens, a row that is one causal segment.
    let cases: Vec<(Shape, Vec<Vec<usize>>)> = vec![
        ((1, 1, 8, 2), vec![vec![1]]),
        ((2, 37, 24, 3), vec![vec![5, 1, 1, 12, 3], vec![37]]),
        ((3, 130, 64, 4), vec![vec![63, 2, 64, 1], vec![1; 70], vec![]]),
        ((1, 70, 128, 2), vec![vec![31, 33, 1]]),           // HS = 64
        ((1, 40, 256, 2), vec![vec![17, 15]]),              // HS = 128
        ((2, 19, 15, 3), vec![vec![1, 18], vec![9, 9, 1]]), // HS = 5
        ((2, 150, 48, 3), vec![vec![100, 50], vec![3, 140, 7]]),
    ];
    let mut worst: f64 = 0.0;
    for (case, (shape @ (b, t, ..), fixed)) in cases.into_iter().enumerate() {
        let random: Vec<Vec<usize>> = (0..b).map(|_| random_lengths(t, &mut r)).collect();
        for (k, lengths) in [fixed, random].iter().enumerate() {
            let starts = segment_starts(lengths, t);
            let seed = 900 + 10 * case as u64 + 2 * k as u64;
            worst = worst.max(check_segments(gpu, shape, &starts, 1.0, seed));
            worst = worst.max(check_segments(gpu, shape, &starts, 6.0, seed + 1));
        }
    }
    eprintln!("segmented attention backward: worst error {worst:.3} of the bound");
}

#[test]
fn arbitrary_starts_are_clamped_like_the_reference() {
    // Not segmentations at all: negative, past t, decreasing. Each query sees keys clamp(start, 0, t) ..= t, so no
    // query is ever left without a key (a NaN would fail the comparison).
    let gpu = gpu();
    let mut r = crate::testing::rng(78);
    for (case, &(b, t, c, nh)) in [(2, 100, 48, 3), (1, 130, 128, 2), (3, 9, 12, 1)].iter().enumerate() {
        let starts: Vec<i32> = (0..b * t).map(|_| r.random_range(-5..t as i32 + 20)).collect();
        check_segments(gpu, (b, t, c, nh), &starts, 3.0, 950 + case as u64);
    }
}

#[test]
fn reference_segments_backward_matches_finite_differences() {
    // (B, T, C, NH, amp, starts): packed rows with a single-token segment, and arbitrary (clamped) starts.
    let cases: [(usize, usize, usize, usize, f32, Vec<i32>); 3] = [
        (2, 7, 6, 2, 1.0, segment_starts(&[vec![3, 1, 3], vec![2, 4]], 7)),
        (1, 9, 9, 3, 1.0, segment_starts(&[vec![4, 1, 2]], 9)),
        (1, 8, 8, 1, 4.0, vec![0, -3, 1, 2, 9, 4, 2, 5]),
    ];
    for (case, (b, t, c, nh, amp, starts)) in cases.into_iter().enumerate() {
        let x = to_f64(&random_qkv(b, t, c, amp, 700 + case as u64));
        let w = to_f64(&random_vec(b * t * c, 800 + case as u64));
        let loss = |x: &[f64]| -> f64 {
            let (y, _) = cpu::attention_forward_segments(x, b, t, c, nh, &starts);
            y.iter().zip(&w).map(|(y, w)| y * w).sum()
        };
        let numeric = numeric_gradient(loss, &x, 1e-6);
        let analytic = cpu::attention_backward_segments(&x, &w, b, t, c, nh, &starts);
        // The same bounds as the causal finite-difference test.
        assert_close_f64(&analytic, &numeric, 1e-6, 1e-8, &format!("dqkv (B,T,C,NH)=({b},{t},{c},{nh}) {starts:?}"));
        // A segment boundary must cut the gradient: a key of an earlier segment gets nothing from later queries,
        // so the reference differs from the causal one (else this test could not see a missing mask).
        assert!(analytic != cpu::attention_backward(&x, &w, b, t, c, nh), "case {case}: segments changed nothing");
    }
}

/// Rows [lo, hi) of a [B, T, W] host tensor's row `bi`, as a [1, hi − lo, W] vector.
fn rows(x: &[f32], t: usize, w: usize, bi: usize, lo: usize, hi: usize) -> Vec<f32> {
    x[(bi * t + lo) * w..(bi * t + hi) * w].to_vec()
}

#[test]
fn packed_sequences_equal_each_sequence_alone() {
    // What SFT packing relies on: y and every gradient of a sequence are the same whether it runs alone or packed
    // with others (and padding) into one row. Alone, a sequence sits at positions 0.. with other block alignments,
    // so only the rounding differs.
    let gpu = gpu();
    let (b, t, c, nh) = (2, 150, 48, 3);
    let lengths = [vec![29, 41, 66], vec![64, 1, 70]]; // row 1: 15 positions of padding
    let x = random_qkv(b, t, c, 4.0, 31);
    let g = random_vec(b * t * c, 32);
    let qkv = gpu.upload(&x, &[b, t, 3 * c]).unwrap();
    let st = gpu.upload_i32(&segment_starts(&lengths, t), &[b, t]).unwrap();
    let (y, lse) = attention_forward_segments(gpu, &qkv, nh, Some(&st)).unwrap();
    let dy = gpu.upload(&g, &[b, t, c]).unwrap();
    let dqkv = attention_backward_segments(gpu, &qkv, &y, &lse, &dy, nh, Some(&st)).unwrap();
    let (y, dqkv) = (gpu.read(&y).unwrap(), gpu.read(&dqkv).unwrap());
    // Run twice: segmented results are bit-reproducible too.
    let again = attention_backward_segments(gpu, &qkv, &gpu.upload(&y, &[b, t, c]).unwrap(), &lse, &dy, nh, Some(&st));
    assert!(gpu.read(&again.unwrap()).unwrap().iter().zip(&dqkv).all(|(a, b)| a.to_bits() == b.to_bits()));

    let mut checked = 0;
    for (bi, row) in lengths.iter().enumerate() {
        let mut lo = 0;
        for &n in row {
            let (hi, what) = (lo + n, format!("row {bi} positions {lo}..{}", lo + n));
            let xs = rows(&x, t, 3 * c, bi, lo, hi);
            let q1 = gpu.upload(&xs, &[1, n, 3 * c]).unwrap();
            let (y1, lse1) = attention_forward(gpu, &q1, nh).unwrap();
            let dy1 = gpu.upload(&rows(&g, t, c, bi, lo, hi), &[1, n, c]).unwrap();
            let d1 = attention_backward(gpu, &q1, &y1, &lse1, &dy1, nh).unwrap();
            let want_y = to_f64(&gpu.read(&y1).unwrap());
            assert_close(&rows(&y, t, c, bi, lo, hi), &want_y, 1e-5, 1e-5, &format!("y {what}"));
            let want_d = to_f64(&gpu.read(&d1).unwrap());
            assert_close(&rows(&dqkv, t, 3 * c, bi, lo, hi), &want_d, 1e-5, 1e-5, &format!("dqkv {what}"));
            lo = hi;
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

#[test]
fn no_starts_is_causal_and_zero_starts_match_it() {
    let gpu = gpu();
    for (case, &(b, t, c, nh)) in [(2, 130, 64, 4), (1, 70, 32, 2), (1, 40, 256, 2)].iter().enumerate() {
        let x = random_qkv(b, t, c, 4.0, 40 + case as u64);
        let g = random_vec(b * t * c, 50 + case as u64);
        let qkv = gpu.upload(&x, &[b, t, 3 * c]).unwrap();
        let dy = gpu.upload(&g, &[b, t, c]).unwrap();
        let run = |starts: Option<&Tensor>, segments: bool| {
            let (y, lse) = if segments {
                attention_forward_segments(gpu, &qkv, nh, starts).unwrap()
            } else {
                attention_forward(gpu, &qkv, nh).unwrap()
            };
            let d = if segments {
                attention_backward_segments(gpu, &qkv, &y, &lse, &dy, nh, starts).unwrap()
            } else {
                attention_backward(gpu, &qkv, &y, &lse, &dy, nh).unwrap()
            };
            [gpu.read(&y).unwrap(), gpu.read(&lse).unwrap(), gpu.read(&d).unwrap()]
        };
        let causal = run(None, false);
        let none = run(None, true);
        let zeros = run(Some(&gpu.upload_i32(&vec![0; b * t], &[b, t]).unwrap()), true);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (k, name) in ["y", "lse", "dqkv"].iter().enumerate() {
            let what = format!("{name} (B,T,C,NH)=({b},{t},{c},{nh})");
            assert!(bits(&none[k]) == bits(&causal[k]), "{what}: starts = None differs from the causal kernels");
            assert_close(&zeros[k], &to_f64(&causal[k]), 1e-6, 1e-6, &format!("{what}, all-zero starts"));
        }
    }
}

#[test]
fn bad_starts_are_typed_errors() {
    let gpu = gpu();
    let (b, t, c, nh) = (2, 3, 8, 2);
    let up = |shape: &[usize]| gpu.upload(&vec![0.0; shape.iter().product()], shape).unwrap();
    let (qkv, y, lse, dy) = (up(&[b, t, 3 * c]), up(&[b, t, c]), up(&[b, nh, t]), up(&[b, t, c]));
    let wrong_shapes =
        [gpu.upload_i32(&[0; 8], &[b, t + 1]).unwrap(), gpu.upload_i32(&[0; 6], &[b * t]).unwrap(), up(&[1, 1])];
    for starts in &wrong_shapes[..2] {
        let fwd = attention_forward_segments(gpu, &qkv, nh, Some(starts)).map(|_| ());
        assert!(matches!(fwd, Err(Error::Shape { op: "attention_forward", what: "starts", .. })), "{fwd:?}");
        let bwd = attention_backward_segments(gpu, &qkv, &y, &lse, &dy, nh, Some(starts)).map(|_| ());
        assert!(matches!(bwd, Err(Error::Shape { op: "attention_backward", what: "starts", .. })), "{bwd:?}");
    }
    let floats = up(&[b, t]);
    let fwd = attention_forward_segments(gpu, &qkv, nh, Some(&floats)).map(|_| ());
    assert!(matches!(fwd, Err(Error::DType { op: "attention_forward", what: "starts", .. })), "{fwd:?}");
    let bwd = attention_backward_segments(gpu, &qkv, &y, &lse, &dy, nh, Some(&floats)).map(|_| ());
    assert!(matches!(bwd, Err(Error::DType { op: "attention_backward", what: "starts", .. })), "{bwd:?}");
    assert!(format!("{}", fwd.unwrap_err()).contains("starts"));
}

// ---- grouped-query attention ----

/// (B, T, HS, NH, NKV).
type GqaShape = (usize, usize, usize, usize, usize);

/// Random qkv [B, T, (NH + 2·NKV)·HS] with the q part scaled by `amp`.
fn random_qkv_gqa((b, t, hs, nh, nkv): GqaShape, amp: f32, seed: u64) -> Vec<f32> {
    let w = (nh + 2 * nkv) * hs;
    let mut x = random_vec(b * t * w, seed);
    x.chunks_mut(w).for_each(|row| row[..nh * hs].iter_mut().for_each(|v| *v *= amp));
    x
}

/// The multi-head qkv [B, T, 3·NH·HS] that GQA stands for: each key/value head copied to every query head of its
/// group, as Hugging Face's `repeat_kv` does (and as the kernels never do).
fn repeat_kv<T: Copy>(x: &[T], hs: usize, nh: usize, nkv: usize) -> Vec<T> {
    let (w, rep) = ((nh + 2 * nkv) * hs, nh / nkv);
    let mut out = Vec::with_capacity(x.len() / w * 3 * nh * hs);
    for row in x.chunks(w) {
        out.extend_from_slice(&row[..nh * hs]);
        for part in 0..2 {
            for h in 0..nh {
                let at = (nh + part * nkv + h / rep) * hs;
                out.extend_from_slice(&row[at..at + hs]);
            }
        }
    }
    out
}

/// The inverse direction for gradients (and error magnitudes): the GQA layout, each shared key/value head getting
/// the sum over the query heads of its group.
fn fold_kv(d: &[f64], hs: usize, nh: usize, nkv: usize) -> Vec<f64> {
    let (c, rep) = (nh * hs, nh / nkv);
    let mut out = Vec::with_capacity(d.len() / (3 * c) * (nh + 2 * nkv) * hs);
    for row in d.chunks(3 * c) {
        out.extend_from_slice(&row[..c]);
        for part in 1..3 {
            for j in 0..nkv {
                for e in 0..hs {
                    out.push((0..rep).map(|r| row[part * c + (j * rep + r) * hs + e]).sum());
                }
            }
        }
    }
    out
}

const GQA_SHAPES: [GqaShape; 7] = [
    (1, 1, 4, 2, 1),
    (2, 37, 8, 4, 2),
    (1, 70, 64, 6, 2),  // HS = 64: 32-key blocks
    (3, 19, 5, 3, 1),   // odd head size, multi-query
    (1, 130, 16, 8, 1), // multi-query, two query workgroups
    (2, 65, 12, 6, 3),
    (1, 40, 128, 4, 2), // the kernels' max head size
];

#[test]
fn gqa_reference_is_multi_head_attention_on_repeated_kv() {
    for (case, &shape) in GQA_SHAPES.iter().enumerate() {
        let (b, t, hs, nh, nkv) = shape;
        let c = nh * hs;
        let x = to_f64(&random_qkv_gqa(shape, 2.0, 1200 + case as u64));
        let g = to_f64(&random_vec(b * t * c, 1300 + case as u64));
        let mha = repeat_kv(&x, hs, nh, nkv);
        let (y, lse) = cpu::attention_forward(&x, b, t, c, (nh, nkv));
        assert!((y, lse) == cpu::attention_forward(&mha, b, t, c, nh), "case {case}: forward");
        let want = fold_kv(&cpu::attention_backward(&mha, &g, b, t, c, nh), hs, nh, nkv);
        let what = format!("case {case}: backward");
        assert_close_f64(&cpu::attention_backward(&x, &g, b, t, c, (nh, nkv)), &want, 1e-12, 1e-14, &what);
    }
}

#[test]
fn gqa_reference_backward_matches_finite_differences() {
    let starts = segment_starts(&[vec![3, 1, 3], vec![2, 4]], 7);
    for (case, (shape, starts)) in [((2, 7, 3, 4, 2), starts), ((1, 6, 4, 3, 1), vec![0; 6])].into_iter().enumerate() {
        let (b, t, hs, nh, nkv) = shape;
        let c = nh * hs;
        let x = to_f64(&random_qkv_gqa(shape, 2.0, 1400 + case as u64));
        let w = to_f64(&random_vec(b * t * c, 1500 + case as u64));
        let loss = |x: &[f64]| -> f64 {
            let (y, _) = cpu::attention_forward_segments(x, b, t, c, (nh, nkv), &starts);
            y.iter().zip(&w).map(|(y, w)| y * w).sum()
        };
        let numeric = numeric_gradient(loss, &x, 1e-6);
        let analytic = cpu::attention_backward_segments(&x, &w, b, t, c, (nh, nkv), &starts);
        // The bounds of the multi-head finite-difference test.
        assert_close_f64(&analytic, &numeric, 1e-6, 1e-8, &format!("GQA dqkv {shape:?}"));
    }
}

/// GPU forward and backward under GQA against the f64 reference, and the forward against the multi-head kernels
/// on repeated K/V (the same arithmetic in the same order, so the same bits). Returns the worst backward error as
/// a fraction of its bound.
fn check_gqa(gpu: &Gpu, shape: GqaShape, starts: Option<&[i32]>, amp: f32, seed: u64) -> f64 {
    let run = |d: AttentionDesign| d.with(|| check_gqa_one(gpu, shape, starts, amp, seed, d));
    designs(gpu).into_iter().map(run).fold(0.0, f64::max)
}

fn check_gqa_one(gpu: &Gpu, shape: GqaShape, starts: Option<&[i32]>, amp: f32, seed: u64, d: AttentionDesign) -> f64 {
    let (b, t, hs, nh, nkv) = shape;
    let (c, w) = (nh * hs, (nh + 2 * nkv) * hs);
    let x = random_qkv_gqa(shape, amp, seed);
    let g = random_vec(b * t * c, seed + 1_000_000);
    let qkv = gpu.upload(&x, &[b, t, w]).unwrap();
    let dy = gpu.upload(&g, &[b, t, c]).unwrap();
    let st = starts.map(|s| gpu.upload_i32(s, &[b, t]).unwrap());
    let heads = Heads::new(nh, nkv);
    let (y, lse) = attention_forward_segments(gpu, &qkv, heads, st.as_ref()).unwrap();
    let dqkv = attention_backward_segments(gpu, &qkv, &y, &lse, &dy, heads, st.as_ref()).unwrap();
    assert_eq!((y.shape(), lse.shape(), dqkv.shape()), (&[b, t, c][..], &[b, nh, t][..], &[b, t, w][..]));
    let (got_y, got_lse) = (gpu.read(&y).unwrap(), gpu.read(&lse).unwrap());

    let mha = gpu.upload(&repeat_kv(&x, hs, nh, nkv), &[b, t, 3 * c]).unwrap();
    let (my, mlse) = attention_forward_segments(gpu, &mha, nh, st.as_ref()).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let what = format!("{d:?} GQA (B,T,HS,NH,NKV)={shape:?} amp {amp} segmented {}", starts.is_some());
    assert!(bits(&got_y) == bits(&gpu.read(&my).unwrap()), "{what}: y differs from MHA on repeated K/V");
    assert!(bits(&got_lse) == bits(&gpu.read(&mlse).unwrap()), "{what}: lse differs from MHA on repeated K/V");

    let causal = vec![0; b * t];
    let starts = starts.unwrap_or(&causal);
    let (xd, gd) = (to_f64(&x), to_f64(&g));
    let (want_y, want_lse) = cpu::attention_forward_segments(&xd, b, t, c, heads, starts);
    let atol = tol(t, hs, amp as f64);
    assert_close(&got_y, &want_y, 0.0, atol, &format!("y {what}"));
    assert_close(&got_lse, &want_lse, f32::EPSILON as f64, atol, &format!("lse {what}"));
    let want = cpu::attention_backward_segments(&xd, &gd, b, t, c, heads, starts);
    // A shared key/value head sums the terms of its whole group: the multi-head magnitudes, folded the same way,
    // and NH/NKV times as many terms in each sum.
    let mha_x = repeat_kv(&xd, hs, nh, nkv);
    let mag = fold_kv(&magnitudes_segments(&mha_x, &gd, b, t, c, nh, starts), hs, nh, nkv);
    let tol = backward_tol(t * nh / nkv, hs, amp as f64);
    assert_backward_close(&gpu.read(&dqkv).unwrap(), &want, &mag, tol, &format!("dqkv {what}"))
}

#[test]
fn gqa_matches_reference_on_odd_shapes() {
    let gpu = gpu();
    let mut r = crate::testing::rng(79);
    let mut worst: f64 = 0.0;
    for (case, &shape) in GQA_SHAPES.iter().enumerate() {
        let seed = 1600 + 10 * case as u64;
        worst = worst.max(check_gqa(gpu, shape, None, 1.0, seed));
        worst = worst.max(check_gqa(gpu, shape, None, 6.0, seed + 1));
        let (b, t, ..) = shape;
        let lengths: Vec<Vec<usize>> = (0..b).map(|_| random_lengths(t, &mut r)).collect();
        worst = worst.max(check_gqa(gpu, shape, Some(&segment_starts(&lengths, t)), 3.0, seed + 2));
    }
    eprintln!("GQA attention backward: worst error {worst:.3} of the bound");
}

#[test]
fn gqa_bad_head_counts_are_typed_errors() {
    let gpu = gpu();
    let qkv = gpu.upload(&vec![0.0; 2 * 3 * 40], &[2, 3, 40]).unwrap();
    let invalid = |r: Result<(Tensor, Tensor)>, needle: &str| match r {
        Err(Error::Invalid { op: "attention_forward", message }) => assert!(message.contains(needle), "{message}"),
        other => panic!("expected Invalid mentioning {needle:?}, got {:?}", other.map(|_| ())),
    };
    invalid(attention_forward(gpu, &qkv, (6, 4)), "dividing n_head"); // 4 KV heads cannot share 6 query heads
    invalid(attention_forward(gpu, &qkv, (6, 0)), "at least 1");
    invalid(attention_forward(gpu, &qkv, (4, 1)), "divide the qkv width 40 into 6 heads");
    assert!(attention_forward(gpu, &qkv, (4, 2)).is_ok()); // 8 heads of 5
}
