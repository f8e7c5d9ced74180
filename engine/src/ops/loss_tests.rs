//! Tests of the fused cross-entropy (`loss.rs`): forward and backward against the f64 references.

use rand::Rng;

use super::*;
use crate::ops::norm::tests::{assert_within, dot, FD_ATOL, FD_H, FD_RTOL, FLUSH, U};
use crate::testing::{assert_close, assert_close_f64, gpu, numeric_gradient, random_vec, rng, to_f64};

/// Row counts and vocabulary sizes that are not multiples of the 256-thread workgroup.
const ROWS: &[usize] = &[1, 3, 17, 129, 300];
const VOCABS: &[usize] = &[1, 7, 64, 255, 769];
/// GPT-2's vocabulary.
const GPT2_VOCAB: usize = 50257;

/// Valid targets with about a quarter ignored.
fn targets(rows: usize, v: usize, seed: u64) -> Vec<i32> {
    let mut r = rng(seed);
    (0..rows).map(|_| if r.random_bool(0.25) { IGNORE_INDEX } else { r.random_range(0..v as i32) }).collect()
}

fn check(rows: usize, v: usize, scale: f32, seed: u64) {
    crate::testing::each_row_reduction(|| check_one(rows, v, scale, seed));
}

fn check_one(rows: usize, v: usize, scale: f32, seed: u64) {
    let gpu = gpu();
    let x: Vec<f32> = random_vec(rows * v, seed).iter().map(|a| a * scale).collect();
    let t = targets(rows, v, seed + 1);
    let (tl, tt) = (gpu.upload(&x, &[rows, v]).unwrap(), gpu.upload_i32(&t, &[rows]).unwrap());
    let (loss, lse) = cross_entropy(gpu, &tl, &tt).unwrap();
    let (loss, lse) = (gpu.read(&loss).unwrap(), gpu.read(&lse).unwrap());
    let (want_loss, want_lse) = cpu::cross_entropy(&to_f64(&x), &t, v);
    let what = format!("cross_entropy rows={rows} v={v} scale={scale}");
    for (i, &ti) in t.iter().enumerate() {
        if ti == IGNORE_INDEX {
            assert!(loss[i] == 0.0 && loss[i].is_sign_positive(), "{what}: ignored row {i} has loss {}", loss[i]);
        }
    }
    // lse = max + log(sum): the max is exact, so the error is ~2 ulp of |lse| <= scale + ln V plus the
    // sum's relative error (~(V/256 + 8) eps, at most 1.2e-5 for V = 50257, in practice far less); loss
    // = lse - x[t] adds one more rounding of the same size.
    let atol = 1e-6 + 4.0 * f32::EPSILON as f64 * (scale as f64 + (v as f64).ln());
    assert_close(&lse, &want_lse, 2e-6, atol, &format!("{what} lse"));
    assert_close(&loss, &want_loss, 2e-6, atol, &format!("{what} loss"));
}

#[test]
fn matches_reference() {
    for (i, &rows) in ROWS.iter().enumerate() {
        for (j, &v) in VOCABS.iter().enumerate() {
            check(rows, v, 4.0, (10 * i + j) as u64);
        }
    }
}

#[test]
fn gpt2_vocabulary_and_large_logits() {
    check(3, GPT2_VOCAB, 4.0, 100);
    // Logits in +-100: exp overflows f32 past 88.7, so only the max subtraction keeps these rows finite.
    check(17, 769, 100.0, 101);
    check(2, GPT2_VOCAB, 100.0, 102);
}

#[test]
fn repeated_runs_are_bitwise_identical() {
    // Fixed-order reductions, no atomics: the same inputs must give the same bits every time.
    let gpu = gpu();
    let v = GPT2_VOCAB;
    let logits = gpu.upload(&random_vec(2 * v, 300), &[2, v]).unwrap();
    let tg = gpu.upload_i32(&[5, 50_000], &[2]).unwrap();
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let (loss, lse) = cross_entropy(gpu, &logits, &tg).unwrap();
            (gpu.read(&loss).unwrap(), gpu.read(&lse).unwrap())
        })
        .collect();
    assert!(runs.iter().all(|r| r == &runs[0]), "{runs:?}");
}

#[test]
fn leading_dims_and_out_of_range_targets() {
    let gpu = gpu();
    let (b, t, v) = (2, 3, 7);
    let x = random_vec(b * t * v, 200);
    // Row 0: V itself, row 1: a negative id other than -1, both NaN; the rest are valid or ignored.
    let tg = [v as i32, -2, 0, IGNORE_INDEX, 6, 3];
    let (loss, lse) =
        cross_entropy(gpu, &gpu.upload(&x, &[b, t, v]).unwrap(), &gpu.upload_i32(&tg, &[b, t]).unwrap()).unwrap();
    assert_eq!((loss.shape(), lse.shape()), (&[b, t][..], &[b * t][..]));
    let (loss, lse) = (gpu.read(&loss).unwrap(), gpu.read(&lse).unwrap());
    let (want_loss, want_lse) = cpu::cross_entropy(&to_f64(&x), &tg, v);
    assert!(loss[0].is_nan() && loss[1].is_nan(), "out-of-range targets give NaN, got {:?}", &loss[..2]);
    assert_eq!(loss[3], 0.0);
    // Logits in [-1, 1), V = 7: lse ~ 2, so a few ulp of 2 absolute.
    assert_close(&loss[2..], &want_loss[2..], 2e-6, 2e-6, "cross_entropy [B, T, V] loss");
    assert_close(&lse, &want_lse, 2e-6, 2e-6, "cross_entropy [B, T, V] lse");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let gpu = gpu();
    let logits = gpu.upload(&random_vec(12, 1), &[3, 4]).unwrap();
    let good = gpu.upload_i32(&[0, 1, 2], &[3]).unwrap();
    let as_f32 = gpu.upload(&[0.0, 1.0, 2.0], &[3]).unwrap();
    let short = gpu.upload_i32(&[0, 1], &[2]).unwrap();
    let rank2 = gpu.upload_i32(&[0, 1, 2], &[3, 1]).unwrap();
    let flat = gpu.upload(&random_vec(4, 2), &[4]).unwrap();
    let int_logits = gpu.upload_i32(&[0; 12], &[3, 4]).unwrap();
    let err = |l: &Tensor, t: &Tensor| cross_entropy(gpu, l, t).expect_err("must be refused");
    assert!(matches!(err(&logits, &as_f32), Error::DType { op: "cross_entropy", what: "targets", .. }));
    assert!(matches!(err(&logits, &short), Error::Shape { op: "cross_entropy", what: "targets", .. }));
    assert!(matches!(err(&logits, &rank2), Error::Shape { op: "cross_entropy", what: "targets", .. }));
    assert!(matches!(err(&flat, &good), Error::Shape { op: "cross_entropy", what: "logits", .. }));
    assert!(matches!(err(&int_logits, &good), Error::DType { op: "cross_entropy", what: "logits", .. }));
}

#[test]
fn reference_backward_matches_finite_differences() {
    // Loss = Σ dloss_row · loss_row with signed weights (as an advantage-weighted RL loss) and one ignored row,
    // whose gradient must be exactly 0 (not merely small).
    for (rows, v, seed) in [(5, 5, 1), (3, 1, 2), (4, 7, 3)] {
        let x: Vec<f64> = random_vec(rows * v, seed).iter().map(|&a| 3.0 * a as f64).collect();
        let mut t = targets(rows, v, seed + 1);
        t[1] = IGNORE_INDEX;
        t[0] = (v - 1) as i32;
        let mut dloss = to_f64(&random_vec(rows, seed + 2));
        dloss[0] = -0.75;
        let (_, lse) = cpu::cross_entropy(&x, &t, v);
        let got = cpu::cross_entropy_backward(&x, &t, &lse, &dloss, v);
        let fd = numeric_gradient(|l| dot(&cpu::cross_entropy(l, &t, v).0, &dloss), &x, FD_H);
        assert_close_f64(&got, &fd, FD_RTOL, FD_ATOL, &format!("cross_entropy backward rows={rows} v={v}"));
        assert!(got[v..2 * v].iter().all(|&g| g == 0.0), "ignored row: {:?}", &got[v..2 * v]);
    }
}

/// GPU dlogits for `x` [rows, v], fed the GPU forward's lse, with the reference and a per-element error bound.
fn check_backward(rows: usize, v: usize, scale: f32, seed: u64) {
    crate::testing::each_row_reduction(|| check_backward_one(rows, v, scale, seed));
}

fn check_backward_one(rows: usize, v: usize, scale: f32, seed: u64) {
    let gpu = gpu();
    let x: Vec<f32> = random_vec(rows * v, seed).iter().map(|a| a * scale).collect();
    let t = targets(rows, v, seed + 1);
    // Signed weights; ignored rows get NaN to prove their zeros do not depend on dloss at all.
    let dloss: Vec<f32> = random_vec(rows, seed + 2)
        .iter()
        .zip(&t)
        .map(|(&d, &ti)| if ti == IGNORE_INDEX { f32::NAN } else { d })
        .collect();
    let (tl, tt) = (gpu.upload(&x, &[rows, v]).unwrap(), gpu.upload_i32(&t, &[rows]).unwrap());
    let (_, lse) = cross_entropy(gpu, &tl, &tt).unwrap();
    let dl = cross_entropy_backward(gpu, &tl, &tt, &lse, &gpu.upload(&dloss, &[rows]).unwrap()).unwrap();
    assert_eq!(dl.shape(), &[rows, v]);
    let got = gpu.read(&dl).unwrap();
    let (xd, lse) = (to_f64(&x), to_f64(&gpu.read(&lse).unwrap()));
    let want = cpu::cross_entropy_backward(&xd, &t, &lse, &to_f64(&dloss), v);
    let what = format!("cross_entropy backward rows={rows} v={v} scale={scale}");
    // Per element: z = x − lse rounds by u·|z|; Vulkan allows exp 3 + 2|z| ulp (2u each); p − onehot and the
    // product by dloss one rounding each.
    let mut bound = Vec::with_capacity(rows * v);
    for r in 0..rows {
        if t[r] == IGNORE_INDEX {
            let row = &got[r * v..(r + 1) * v];
            assert!(row.iter().all(|g| g.to_bits() == 0), "{what}: ignored row {r} is not +0.0: {row:?}");
            bound.extend(std::iter::repeat_n(0.0, v));
            continue;
        }
        let d = dloss[r].abs() as f64;
        bound.extend((0..v).map(|j| {
            let z = (xd[r * v + j] - lse[r]).abs();
            let p = (-z).exp();
            let q = (p - if j == t[r] as usize { 1.0 } else { 0.0 }).abs();
            d * (p * U * (z + 2.0 * (3.0 + 2.0 * z)) + 2.0 * U * q) + FLUSH
        }));
    }
    assert_within(&got, &want, &bound, &what);
}

#[test]
fn backward_matches_reference() {
    for (i, &rows) in [1, 3, 17, 129].iter().enumerate() {
        for (j, &v) in [1, 7, 255, 769].iter().enumerate() {
            check_backward(rows, v, 4.0, (400 + 10 * i + j) as u64);
        }
    }
    check_backward(2, GPT2_VOCAB, 4.0, 450);
    // Logits in ±100: most probabilities underflow; only those near the max survive.
    check_backward(17, 769, 100.0, 451);
    check_backward(2, GPT2_VOCAB, 100.0, 452);
}

#[test]
fn backward_rows_beyond_one_grid_dimension() {
    // 65537 rows need a second grid row of workgroups; row r has logits [(r mod 50) / 10, 0], target r mod 2 and
    // dloss (r mod 7) − 3, so a skipped or misplaced row shows.
    let (rows, v) = (65_537, 2);
    let x: Vec<f32> = (0..rows).flat_map(|r| [(r % 50) as f32 * 0.1, 0.0]).collect();
    let t: Vec<i32> = (0..rows).map(|r| (r % 2) as i32).collect();
    let dloss: Vec<f32> = (0..rows).map(|r| (r % 7) as f32 - 3.0).collect();
    let gpu = gpu();
    let (tl, tt) = (gpu.upload(&x, &[rows, v]).unwrap(), gpu.upload_i32(&t, &[rows]).unwrap());
    let (_, lse) = cross_entropy(gpu, &tl, &tt).unwrap();
    let dl = cross_entropy_backward(gpu, &tl, &tt, &lse, &gpu.upload(&dloss, &[rows]).unwrap()).unwrap();
    let lse = to_f64(&gpu.read(&lse).unwrap());
    let want = cpu::cross_entropy_backward(&to_f64(&x), &t, &lse, &to_f64(&dloss), v);
    // |dloss| <= 3 times a probability of a two-term softmax (a few ulp): 1e-6 absolute covers it.
    assert_close(&gpu.read(&dl).unwrap(), &want, 1e-6, 1e-6, "cross_entropy backward 65537 rows");
}

#[test]
fn backward_leading_dims_and_out_of_range_targets() {
    let gpu = gpu();
    let (b, t, v) = (2, 3, 7);
    let x = random_vec(b * t * v, 210);
    // Row 0: V itself and row 1: -2 give NaN rows (as the forward's loss); row 3 is ignored.
    let tg = [v as i32, -2, 0, IGNORE_INDEX, 6, 3];
    let dloss = [0.5, -0.5, 0.25, 1.0, -1.0, 2.0];
    let tl = gpu.upload(&x, &[b, t, v]).unwrap();
    let tt = gpu.upload_i32(&tg, &[b, t]).unwrap();
    let (_, lse) = cross_entropy(gpu, &tl, &tt).unwrap();
    // dloss as the forward's losses are shaped ([B, T]) or flat ([N]): the same result.
    let by_bt = cross_entropy_backward(gpu, &tl, &tt, &lse, &gpu.upload(&dloss, &[b, t]).unwrap()).unwrap();
    let by_n = cross_entropy_backward(gpu, &tl, &tt, &lse, &gpu.upload(&dloss, &[b * t]).unwrap()).unwrap();
    assert_eq!(by_bt.shape(), &[b, t, v]);
    let got = gpu.read(&by_bt).unwrap();
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&gpu.read(&by_n).unwrap()));
    assert!(got[..2 * v].iter().all(|g| g.is_nan()), "out-of-range targets give NaN rows: {:?}", &got[..2 * v]);
    assert!(got[3 * v..4 * v].iter().all(|&g| g == 0.0));
    let want = cpu::cross_entropy_backward(&to_f64(&x), &tg, &to_f64(&gpu.read(&lse).unwrap()), &to_f64(&dloss), v);
    // |dloss| <= 2 times probabilities of 7 logits in [-1, 1): a few ulp of 2.
    assert_close(&got[2 * v..], &want[2 * v..], 1e-6, 1e-6, "cross_entropy backward [B, T, V]");
}

#[test]
fn backward_bad_inputs_are_typed_errors() {
    let gpu = gpu();
    let logits = gpu.upload(&random_vec(12, 1), &[3, 4]).unwrap();
    let targets = gpu.upload_i32(&[0, 1, 2], &[3]).unwrap();
    let f3 = gpu.upload(&[0.0; 3], &[3]).unwrap();
    let f2 = gpu.upload(&[0.0; 2], &[2]).unwrap();
    let f31 = gpu.upload(&[0.0; 3], &[3, 1]).unwrap();
    let i3 = gpu.upload_i32(&[0; 3], &[3]).unwrap();
    let flat = gpu.upload(&random_vec(4, 2), &[4]).unwrap();
    let err = |l: &Tensor, t: &Tensor, lse: &Tensor, d: &Tensor| {
        cross_entropy_backward(gpu, l, t, lse, d).expect_err("must be refused")
    };
    let check = |e: Error, dtype: bool, what: &str| match e {
        Error::DType { op: "cross_entropy_backward", what: w, .. } if dtype => assert_eq!(w, what),
        Error::Shape { op: "cross_entropy_backward", what: w, .. } if !dtype => assert_eq!(w, what),
        e => panic!("{what}: unexpected {e:?}"),
    };
    check(err(&flat, &targets, &f3, &f3), false, "logits");
    check(err(&targets.reshape(&[3, 1]).unwrap(), &targets, &f3, &f3), true, "logits");
    check(err(&logits, &f3, &f3, &f3), true, "targets");
    check(err(&logits, &i3.reshape(&[1, 3]).unwrap(), &f3, &f3), false, "targets");
    check(err(&logits, &targets, &i3, &f3), true, "lse");
    check(err(&logits, &targets, &f2, &f3), false, "lse");
    check(err(&logits, &targets, &f3, &i3), true, "dloss");
    check(err(&logits, &targets, &f3, &f2), false, "dloss");
    check(err(&logits, &targets, &f3, &f31), false, "dloss");
}
