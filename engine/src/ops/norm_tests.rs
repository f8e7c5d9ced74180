//! Tests of the row kernels (`norm.rs`): forward and backward against the f64 references.

use super::*;
use crate::testing::{assert_close, assert_close_f64, gpu, numeric_gradient, random_vec, to_f64};

/// Unit roundoff of f32 (half an ulp of 1): every error bound below counts roundings in units of it.
pub(crate) const U: f64 = f32::EPSILON as f64 / 2.0;

/// Step of the central differences that prove the f64 reference backwards. On O(1) inputs the truncation error is
/// ~h²·|f′′′| ≈ 1e-10 and the cancellation error ~1e-16·|loss| / h ≈ 1e-10, so [`FD_RTOL`] = 1e-6 relative (plus
/// [`FD_ATOL`] for gradients that are exactly 0) leaves a margin of about 1000.
pub(crate) const FD_H: f64 = 1e-5;
pub(crate) const FD_RTOL: f64 = 1e-6;
pub(crate) const FD_ATOL: f64 = 1e-8;

/// Allowance for results below f32's normal range, which a GPU may flush to zero: one flush of an intermediate
/// (then multiplied by a factor <= 1) and one of the result.
pub(crate) const FLUSH: f64 = 2.0 * f32::MIN_POSITIVE as f64;

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Panics unless |got[i] - want[i]| <= bound[i] for every i: per-element bounds derived from the roundings each
/// kernel performs, tighter than one rtol/atol pair where results cancel to near zero.
pub(crate) fn assert_within(got: &[f32], want: &[f64], bound: &[f64], what: &str) {
    assert_eq!((got.len(), want.len()), (bound.len(), bound.len()), "{what}: length");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= b, "{what}: element {i} is {g}, f64 reference {w}, error {err:e} > bound {b:e}");
    }
}

/// Row counts and row lengths that are not multiples of the 256-thread workgroup (1 and 7 leave most threads
/// idle, 769 makes threads take unequal strides).
const ROWS: &[usize] = &[1, 3, 17, 129, 300];
const COLS: &[usize] = &[1, 7, 64, 255, 769];
/// GPT-2's vocabulary size: the longest rows a GPT sees.
const VOCAB: usize = 50257;

fn check_layernorm(rows: usize, c: usize, offset: f32, seed: u64, tol: (f64, f64)) {
    crate::testing::each_row_reduction(|| check_layernorm_one(rows, c, offset, seed, tol));
}

fn check_layernorm_one(rows: usize, c: usize, offset: f32, seed: u64, tol: (f64, f64)) {
    let gpu = gpu();
    let x: Vec<f32> = random_vec(rows * c, seed).iter().map(|v| v + offset).collect();
    let g: Vec<f32> = random_vec(c, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect();
    let b = random_vec(c, seed + 2);
    let tx = gpu.upload(&x, &[rows, c]).unwrap();
    let (tg, tb) = (gpu.upload(&g, &[c]).unwrap(), gpu.upload(&b, &[c]).unwrap());
    let (y, mean, rstd) = layernorm(gpu, &tx, &tg, &tb, 1e-5).unwrap();
    let (wy, wm, wr) = cpu::layernorm(&to_f64(&x), &to_f64(&g), &to_f64(&b), 1e-5);
    let what = format!("layernorm rows={rows} c={c} offset={offset}");
    assert_close(&gpu.read(&y).unwrap(), &wy, tol.0, tol.1, &format!("{what} y"));
    // The mean is an f32 sum of C values over C: rounding grows like sqrt(C/256 + 8) eps in practice, ~1e-7 of
    // the mean's scale (|x| < 1, or 100 with the offset), well inside 1e-6 absolute plus 1e-6 relative.
    assert_close(&gpu.read(&mean).unwrap(), &wm, 1e-6, 1e-6, &format!("{what} mean"));
    // rstd carries the variance's sum error halved by the sqrt, plus sqrt and divide roundings.
    assert_close(&gpu.read(&rstd).unwrap(), &wr, 1e-5, 0.0, &format!("{what} rstd"));
}

#[test]
fn layernorm_matches_reference() {
    for (i, &rows) in ROWS.iter().enumerate() {
        for (j, &c) in COLS.iter().enumerate() {
            // |y| <= ~3 (unit-variance rows times gamma <= 1.5 plus beta): a few f32 roundings of
            // (x - mean) * rstd * gamma + beta, with rstd known to 1e-5 relative.
            check_layernorm(rows, c, 0.0, (10 * i + j) as u64, (1e-5, 1e-5));
        }
    }
}

#[test]
fn layernorm_long_rows_and_large_mean() {
    // Vocabulary-length rows: each thread sums ~200 values before the tree, error ~200 eps relative.
    check_layernorm(2, VOCAB, 0.0, 7, (1e-5, 1e-5));
    // |mean| = 100 >> std ~ 0.58: two passes keep var accurate (a one-pass E[x^2] - E[x]^2 in f32 would lose
    // ~1e-2 of it); what remains is the mean's rounding, ~1e-5 absolute, scaled by rstd ~ 1.7.
    check_layernorm(17, 769, 100.0, 8, (1e-4, 1e-4));
}

fn check_softmax(rows: usize, c: usize, scale: f32, seed: u64) {
    crate::testing::each_row_reduction(|| check_softmax_one(rows, c, scale, seed));
}

fn check_softmax_one(rows: usize, c: usize, scale: f32, seed: u64) {
    let gpu = gpu();
    let x: Vec<f32> = random_vec(rows * c, seed).iter().map(|v| v * scale).collect();
    let out = softmax(gpu, &gpu.upload(&x, &[rows, c]).unwrap()).unwrap();
    // Each probability is exp (a few ulp) times 1/sum, the sum of C terms in (0, 1] off by ~(C/256 + 8) eps
    // relative; 1e-5 relative covers it and 1e-12 absolute admits terms that underflow to zero in f32.
    assert_close(
        &gpu.read(&out).unwrap(),
        &cpu::softmax(&to_f64(&x), c),
        1e-5,
        1e-12,
        &format!("softmax rows={rows} c={c} scale={scale}"),
    );
}

#[test]
fn softmax_matches_reference() {
    for (i, &rows) in ROWS.iter().enumerate() {
        for (j, &c) in COLS.iter().enumerate() {
            check_softmax(rows, c, 4.0, (100 + 10 * i + j) as u64);
        }
    }
    check_softmax(3, VOCAB, 4.0, 200);
    // Logits in +-100: exp overflows f32 past 88.7 and underflows to 0 below -103, so only the max
    // subtraction keeps these rows finite.
    check_softmax(17, 769, 100.0, 201);
    check_softmax(2, VOCAB, 100.0, 202);
}

#[test]
fn rows_beyond_one_grid_dimension() {
    // 65537 rows need a second grid row of workgroups; rows differ (row r is [(r mod 50) / 10, 0]), so a
    // skipped or misplaced row shows.
    let (rows, c) = (65_537, 2);
    let x: Vec<f32> = (0..rows).flat_map(|r| [(r % 50) as f32 * 0.1, 0.0]).collect();
    let gpu = gpu();
    let out = softmax(gpu, &gpu.upload(&x, &[rows, c]).unwrap()).unwrap();
    // Two-term softmax: exp and one division, a few ulp.
    assert_close(&gpu.read(&out).unwrap(), &cpu::softmax(&to_f64(&x), c), 1e-6, 1e-7, "softmax 65537 rows");
}

#[test]
fn leading_dims_flatten_into_rows() {
    let gpu = gpu();
    let (b, t, c) = (2, 3, 5);
    let x = random_vec(b * t * c, 300);
    let tx = gpu.upload(&x, &[b, t, c]).unwrap();
    let (g, beta) = (gpu.upload(&[1.0; 5], &[c]).unwrap(), gpu.upload(&[0.0; 5], &[c]).unwrap());
    let (y, mean, rstd) = layernorm(gpu, &tx, &g, &beta, 1e-5).unwrap();
    assert_eq!((y.shape(), mean.shape(), rstd.shape()), (&[b, t, c][..], &[b * t][..], &[b * t][..]));
    assert_eq!(softmax(gpu, &tx).unwrap().shape(), &[b, t, c]);
    let (wy, _, _) = cpu::layernorm(&to_f64(&x), &[1.0; 5], &[0.0; 5], 1e-5);
    // Same bound as layernorm_matches_reference.
    assert_close(&gpu.read(&y).unwrap(), &wy, 1e-5, 1e-5, "layernorm [B, T, C]");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let gpu = gpu();
    let x = gpu.upload(&random_vec(12, 1), &[3, 4]).unwrap();
    let g4 = gpu.upload(&[1.0; 4], &[4]).unwrap();
    let g3 = gpu.upload(&[1.0; 3], &[3]).unwrap();
    let g22 = gpu.upload(&[1.0; 4], &[2, 2]).unwrap();
    let gi = gpu.upload_i32(&[1; 4], &[4]).unwrap();
    let xi = gpu.upload_i32(&[1; 12], &[3, 4]).unwrap();
    let shape = |r: Result<(Tensor, Tensor, Tensor)>, what: &str| {
        assert!(matches!(r, Err(Error::Shape { op: "layernorm", what: w, .. }) if w == what), "{what}");
    };
    shape(layernorm(gpu, &x, &g3, &g4, 1e-5), "gamma");
    shape(layernorm(gpu, &x, &g4, &g3, 1e-5), "beta");
    shape(layernorm(gpu, &x, &g22, &g4, 1e-5), "gamma");
    let scalar = gpu.upload(&[1.0], &[1]).unwrap().reshape(&[]).unwrap();
    shape(layernorm(gpu, &scalar, &g4, &g4, 1e-5), "x");
    assert!(matches!(layernorm(gpu, &x, &gi, &g4, 1e-5), Err(Error::DType { what: "gamma", .. })));
    assert!(matches!(layernorm(gpu, &xi, &g4, &g4, 1e-5), Err(Error::DType { what: "x", .. })));
    assert!(matches!(layernorm(gpu, &x, &g4, &g4, f32::NAN), Err(Error::Invalid { op: "layernorm", .. })));
    assert!(matches!(layernorm(gpu, &x, &g4, &g4, -1.0), Err(Error::Invalid { op: "layernorm", .. })));
    assert!(matches!(softmax(gpu, &xi), Err(Error::DType { op: "softmax", .. })));
    assert!(matches!(softmax(gpu, &scalar), Err(Error::Shape { op: "softmax", .. })));
}

#[test]
fn layernorm_reference_backward_matches_finite_differences() {
    let eps = 1e-5;
    // Odd tiny shapes; C = 1 is the degenerate row (xhat = 0, y = beta) whose dx must come out 0.
    for (rows, c, seed) in [(3, 5, 1), (1, 7, 2), (2, 1, 3), (4, 3, 4)] {
        let x = to_f64(&random_vec(rows * c, seed));
        let g: Vec<f64> = random_vec(c, seed + 1).iter().map(|&v| 1.0 + 0.5 * v as f64).collect();
        let b = to_f64(&random_vec(c, seed + 2));
        let w = to_f64(&random_vec(rows * c, seed + 3));
        let loss = |x: &[f64], g: &[f64], b: &[f64]| dot(&cpu::layernorm(x, g, b, eps).0, &w);
        let (_, mean, rstd) = cpu::layernorm(&x, &g, &b, eps);
        let (dx, dg, db) = cpu::layernorm_backward(&w, &x, &g, &mean, &rstd);
        let what = format!("layernorm backward rows={rows} c={c}");
        let fd_x = numeric_gradient(|v| loss(v, &g, &b), &x, FD_H);
        assert_close_f64(&dx, &fd_x, FD_RTOL, FD_ATOL, &format!("{what} dx"));
        let fd_g = numeric_gradient(|v| loss(&x, v, &b), &g, FD_H);
        assert_close_f64(&dg, &fd_g, FD_RTOL, FD_ATOL, &format!("{what} dgamma"));
        let fd_b = numeric_gradient(|v| loss(&x, &g, v), &b, FD_H);
        assert_close_f64(&db, &fd_b, FD_RTOL, FD_ATOL, &format!("{what} dbeta"));
    }
}

#[test]
fn softmax_reference_backward_matches_finite_differences() {
    for (rows, c, seed) in [(3, 5, 10), (2, 1, 11), (1, 9, 12)] {
        let x: Vec<f64> = random_vec(rows * c, seed).iter().map(|&v| 3.0 * v as f64).collect();
        let w = to_f64(&random_vec(rows * c, seed + 1));
        let dx = cpu::softmax_backward(&cpu::softmax(&x, c), &w, c);
        let fd = numeric_gradient(|v| dot(&cpu::softmax(v, c), &w), &x, FD_H);
        assert_close_f64(&dx, &fd, FD_RTOL, FD_ATOL, &format!("softmax backward rows={rows} c={c}"));
    }
}

/// Backward rows and lengths: not multiples of the 256-thread workgroup or of sum_rows' 32-row blocks.
const BWD_ROWS: &[usize] = &[1, 3, 17, 129];
const BWD_COLS: &[usize] = &[1, 7, 255, 769];

/// (dx, dgamma, dbeta, mean, rstd) from the GPU, fed the GPU forward's own mean and rstd as a training step is.
fn gpu_layernorm_backward(x: &[f32], g: &[f32], dy: &[f32], rows: usize, c: usize) -> [Vec<f32>; 5] {
    let gpu = gpu();
    let tx = gpu.upload(x, &[rows, c]).unwrap();
    let tg = gpu.upload(g, &[c]).unwrap();
    let (_, mean, rstd) = layernorm(gpu, &tx, &tg, &gpu.upload(&vec![0.0; c], &[c]).unwrap(), 1e-5).unwrap();
    let tdy = gpu.upload(dy, &[rows, c]).unwrap();
    let (dx, dg, db) = layernorm_backward(gpu, &tdy, &tx, &tg, &mean, &rstd).unwrap();
    assert_eq!((dx.shape(), dg.shape(), db.shape()), (&[rows, c][..], &[c][..], &[c][..]));
    [&dx, &dg, &db, &mean, &rstd].map(|t| gpu.read(t).unwrap())
}

fn check_layernorm_backward(rows: usize, c: usize, seed: u64) {
    crate::testing::each_row_reduction(|| check_layernorm_backward_one(rows, c, seed));
}

fn check_layernorm_backward_one(rows: usize, c: usize, seed: u64) {
    let x = random_vec(rows * c, seed);
    let g: Vec<f32> = random_vec(c, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect();
    let dy = random_vec(rows * c, seed + 2);
    let [dx, dg, db, mean, rstd] = gpu_layernorm_backward(&x, &g, &dy, rows, c);
    let (xd, gd, dyd, mean, rstd) = (to_f64(&x), to_f64(&g), to_f64(&dy), to_f64(&mean), to_f64(&rstd));
    let (want_dx, want_dg, want_db) = cpu::layernorm_backward(&dyd, &xd, &gd, &mean, &rstd);
    let what = format!("layernorm backward rows={rows} c={c}");
    // dx = rstd·(dxhat − m1 − xhat·m2). xhat and dxhat carry ~3 roundings, the row means m1 = mean(dxhat) and
    // m2 = mean(dxhat·xhat) a sequential-then-tree sum of depth ceil(C/256) + 8 over their absolute values, and
    // the combination ~4 more: error <= rstd·k·u·(|dxhat| + mean|dxhat| + |xhat|·mean|dxhat·xhat|).
    let k = (c.div_ceil(256) + 16) as f64 * U;
    let mut bound = Vec::with_capacity(rows * c);
    let (mut abs_dgx, mut abs_dy) = (vec![0.0; c], vec![0.0; c]);
    for r in 0..rows {
        let row = r * c..(r + 1) * c;
        let xhat: Vec<f64> = xd[row.clone()].iter().map(|v| (v - mean[r]) * rstd[r]).collect();
        let dxhat: Vec<f64> = dyd[row.clone()].iter().zip(&gd).map(|(d, g)| (d * g).abs()).collect();
        let a1 = dxhat.iter().sum::<f64>() / c as f64;
        let a2 = dxhat.iter().zip(&xhat).map(|(d, h)| d * h.abs()).sum::<f64>() / c as f64;
        bound.extend(dxhat.iter().zip(&xhat).map(|(d, h)| rstd[r] * k * (d + a1 + h.abs() * a2) + FLUSH));
        for j in 0..c {
            abs_dgx[j] += (dyd[r * c + j] * xhat[j]).abs();
            abs_dy[j] += dyd[r * c + j].abs();
        }
    }
    assert_within(&dx, &want_dx, &bound, &format!("{what} dx"));
    // Column sums through sum_rows: a tree of depth ceil(log2 rows) + 4 (its own bound) over terms dy·xhat that
    // carry 3 roundings each (xhat's two, the product's one).
    let depth = (rows as f64).log2().ceil() + 4.0;
    let bound: Vec<f64> = abs_dgx.iter().map(|a| (depth + 3.0) * U * a + FLUSH).collect();
    assert_within(&dg, &want_dg, &bound, &format!("{what} dgamma"));
    let bound: Vec<f64> = abs_dy.iter().map(|a| depth * U * a + FLUSH).collect();
    assert_within(&db, &want_db, &bound, &format!("{what} dbeta"));
}

#[test]
fn layernorm_backward_matches_reference() {
    for (i, &rows) in BWD_ROWS.iter().enumerate() {
        for (j, &c) in BWD_COLS.iter().enumerate() {
            check_layernorm_backward(rows, c, (500 + 10 * i + j) as u64);
        }
    }
    check_layernorm_backward(2, VOCAB, 550);
}

#[test]
fn layernorm_backward_is_bit_identical_across_runs() {
    let (rows, c) = (129, 769);
    let (x, dy) = (random_vec(rows * c, 600), random_vec(rows * c, 601));
    let g: Vec<f32> = random_vec(c, 602).iter().map(|v| 1.0 + 0.5 * v).collect();
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let a = gpu_layernorm_backward(&x, &g, &dy, rows, c);
    let b = gpu_layernorm_backward(&x, &g, &dy, rows, c);
    for (k, name) in ["dx", "dgamma", "dbeta"].iter().enumerate() {
        assert_eq!(bits(&a[k]), bits(&b[k]), "layernorm backward {name} differs between runs");
    }
}

fn check_softmax_backward(rows: usize, c: usize, scale: f32, seed: u64) {
    crate::testing::each_row_reduction(|| check_softmax_backward_one(rows, c, scale, seed));
}

fn check_softmax_backward_one(rows: usize, c: usize, scale: f32, seed: u64) {
    let gpu = gpu();
    let logits: Vec<f64> = random_vec(rows * c, seed).iter().map(|&v| (v * scale) as f64).collect();
    let y: Vec<f32> = cpu::softmax(&logits, c).iter().map(|&v| v as f32).collect();
    let dy = random_vec(rows * c, seed + 1);
    let ty = gpu.upload(&y, &[rows, c]).unwrap();
    let dx = softmax_backward(gpu, &ty, &gpu.upload(&dy, &[rows, c]).unwrap()).unwrap();
    assert_eq!(dx.shape(), &[rows, c]);
    let (yd, dyd) = (to_f64(&y), to_f64(&dy));
    let want = cpu::softmax_backward(&yd, &dyd, c);
    // dx = y·(dy − s), s = Σ dy·y: s errs by (ceil(C/256) + 9)·u·Σ|dy·y| (products, sequential adds, the tree),
    // the subtraction and product by 2u of their operands.
    let k = (c.div_ceil(256) + 9) as f64 * U;
    let mut bound = Vec::with_capacity(rows * c);
    for (yr, dyr) in yd.chunks(c).zip(dyd.chunks(c)) {
        let (s, abs_s) = (dot(yr, dyr), yr.iter().zip(dyr).map(|(a, b)| (a * b).abs()).sum::<f64>());
        bound.extend(yr.iter().zip(dyr).map(|(y, d)| y * (k * abs_s + 2.0 * U * (d.abs() + s.abs())) + FLUSH));
    }
    let what = format!("softmax backward rows={rows} c={c} scale={scale}");
    assert_within(&gpu.read(&dx).unwrap(), &want, &bound, &what);
}

#[test]
fn softmax_backward_matches_reference() {
    for (i, &rows) in BWD_ROWS.iter().enumerate() {
        for (j, &c) in BWD_COLS.iter().enumerate() {
            check_softmax_backward(rows, c, 4.0, (700 + 10 * i + j) as u64);
        }
    }
    check_softmax_backward(3, VOCAB, 4.0, 750);
    // Probabilities spanning e^-200: most underflow to 0, the rest must still match.
    check_softmax_backward(17, 769, 100.0, 751);
}

#[test]
fn backward_bad_inputs_are_typed_errors() {
    let gpu = gpu();
    let x = gpu.upload(&random_vec(12, 1), &[3, 4]).unwrap();
    let x43 = gpu.upload(&random_vec(12, 2), &[4, 3]).unwrap();
    let xi = gpu.upload_i32(&[1; 12], &[3, 4]).unwrap();
    let g4 = gpu.upload(&[1.0; 4], &[4]).unwrap();
    let g3 = gpu.upload(&[1.0; 3], &[3]).unwrap();
    let r3 = gpu.upload(&[1.0; 3], &[3]).unwrap();
    let r4 = gpu.upload(&[1.0; 4], &[4]).unwrap();
    let r3i = gpu.upload_i32(&[1; 3], &[3]).unwrap();
    let err = |dy: &Tensor, x: &Tensor, g: &Tensor, m: &Tensor, r: &Tensor| {
        layernorm_backward(gpu, dy, x, g, m, r).expect_err("must be refused")
    };
    let ln = |e: Error, dtype: bool, what: &str| match e {
        Error::DType { op: "layernorm_backward", what: w, .. } if dtype => assert_eq!(w, what),
        Error::Shape { op: "layernorm_backward", what: w, .. } if !dtype => assert_eq!(w, what),
        e => panic!("{what}: unexpected {e:?}"),
    };
    ln(err(&xi, &x, &g4, &r3, &r3), true, "dy");
    ln(err(&x, &xi, &g4, &r3, &r3), true, "x");
    ln(err(&x, &x43, &g4, &r3, &r3), false, "x");
    ln(err(&x, &x, &g3, &r3, &r3), false, "gamma");
    ln(err(&x, &x, &g4, &r4, &r3), false, "mean");
    ln(err(&x, &x, &g4, &r3, &r3i), true, "rstd");
    let sm = |y: &Tensor, dy: &Tensor| softmax_backward(gpu, y, dy).expect_err("must be refused");
    assert!(matches!(sm(&xi, &x), Error::DType { op: "softmax_backward", what: "y", .. }));
    assert!(matches!(sm(&x, &xi), Error::DType { op: "softmax_backward", what: "dy", .. }));
    assert!(matches!(sm(&x, &x43), Error::Shape { op: "softmax_backward", what: "dy", .. }));
}

// ---- RMSNorm ----

fn gpu_rmsnorm(x: &[f32], g: &[f32], dy: &[f32], rows: usize, c: usize) -> [Vec<f32>; 4] {
    let gpu = gpu();
    let tx = gpu.upload(x, &[rows, c]).unwrap();
    let tg = gpu.upload(g, &[c]).unwrap();
    let (y, rstd) = rmsnorm(gpu, &tx, &tg, 1e-5).unwrap();
    assert_eq!((y.shape(), rstd.shape()), (&[rows, c][..], &[rows][..]));
    let (dx, dg) = rmsnorm_backward(gpu, &gpu.upload(dy, &[rows, c]).unwrap(), &tx, &tg, &rstd).unwrap();
    assert_eq!((dx.shape(), dg.shape()), (&[rows, c][..], &[c][..]));
    [&y, &rstd, &dx, &dg].map(|t| gpu.read(t).unwrap())
}

fn check_rmsnorm(rows: usize, c: usize, offset: f32, seed: u64) {
    crate::testing::each_row_reduction(|| check_rmsnorm_one(rows, c, offset, seed));
}

fn check_rmsnorm_one(rows: usize, c: usize, offset: f32, seed: u64) {
    let x: Vec<f32> = random_vec(rows * c, seed).iter().map(|v| v + offset).collect();
    let g: Vec<f32> = random_vec(c, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect();
    let dy = random_vec(rows * c, seed + 2);
    let [y, rstd, dx, dg] = gpu_rmsnorm(&x, &g, &dy, rows, c);
    let (xd, gd, dyd) = (to_f64(&x), to_f64(&g), to_f64(&dy));
    let (want_y, want_rstd) = cpu::rmsnorm(&xd, &gd, 1e-5);
    let what = format!("rmsnorm rows={rows} c={c} offset={offset}");
    // rstd: a sum of C non-negative squares (no cancellation) to (ceil(C/256) + 8 + 1)·u relative, halved by the
    // sqrt, plus sqrt and divide; y = x·rstd·gamma adds two roundings.
    let k = (c.div_ceil(256) + 12) as f64 * U;
    let bound: Vec<f64> = want_rstd.iter().map(|r| k * r).collect();
    assert_within(&rstd, &want_rstd, &bound, &format!("{what} rstd"));
    let bound: Vec<f64> = want_y.iter().map(|y| (k + 2.0 * U) * y.abs() + FLUSH).collect();
    assert_within(&y, &want_y, &bound, &format!("{what} y"));
    // The backward from the GPU's own rstd, as a training step runs it: dx = rstd·(dxhat − xhat·m) with
    // m = mean(dxhat·xhat) a sequential-then-tree sum, bounded like LayerNorm's.
    let rstd = to_f64(&rstd);
    let (want_dx, want_dg) = cpu::rmsnorm_backward(&dyd, &xd, &gd, &rstd);
    let mut bound = Vec::with_capacity(rows * c);
    let mut abs_dgx = vec![0.0; c];
    for r in 0..rows {
        let row = r * c..(r + 1) * c;
        let xhat: Vec<f64> = xd[row.clone()].iter().map(|v| v * rstd[r]).collect();
        let dxhat: Vec<f64> = dyd[row.clone()].iter().zip(&gd).map(|(d, g)| (d * g).abs()).collect();
        let a = dxhat.iter().zip(&xhat).map(|(d, h)| d * h.abs()).sum::<f64>() / c as f64;
        bound.extend(dxhat.iter().zip(&xhat).map(|(d, h)| rstd[r] * k * (d + h.abs() * a) + FLUSH));
        for j in 0..c {
            abs_dgx[j] += (dyd[r * c + j] * xhat[j]).abs();
        }
    }
    assert_within(&dx, &want_dx, &bound, &format!("{what} dx"));
    let depth = (rows as f64).log2().ceil() + 4.0;
    let bound: Vec<f64> = abs_dgx.iter().map(|a| (depth + 2.0) * U * a + FLUSH).collect();
    assert_within(&dg, &want_dg, &bound, &format!("{what} dgamma"));
}

#[test]
fn rmsnorm_matches_reference_forward_and_backward() {
    for (i, &rows) in BWD_ROWS.iter().enumerate() {
        for (j, &c) in COLS.iter().enumerate() {
            check_rmsnorm(rows, c, 0.0, (800 + 10 * i + j) as u64);
        }
    }
    check_rmsnorm(2, VOCAB, 0.0, 850);
    // A large common offset: RMSNorm keeps it (no mean subtracted), and nothing cancels.
    check_rmsnorm(17, 769, 100.0, 851);
}

#[test]
fn rmsnorm_reference_backward_matches_finite_differences() {
    for (rows, c, seed) in [(3, 5, 20), (1, 7, 21), (2, 1, 22), (4, 3, 23)] {
        let x = to_f64(&random_vec(rows * c, seed));
        let g: Vec<f64> = random_vec(c, seed + 1).iter().map(|&v| 1.0 + 0.5 * v as f64).collect();
        let w = to_f64(&random_vec(rows * c, seed + 2));
        let loss = |x: &[f64], g: &[f64]| dot(&cpu::rmsnorm(x, g, 1e-5).0, &w);
        let (_, rstd) = cpu::rmsnorm(&x, &g, 1e-5);
        let (dx, dg) = cpu::rmsnorm_backward(&w, &x, &g, &rstd);
        let what = format!("rmsnorm backward rows={rows} c={c}");
        assert_close_f64(&dx, &numeric_gradient(|v| loss(v, &g), &x, FD_H), FD_RTOL, FD_ATOL, &format!("{what} dx"));
        assert_close_f64(&dg, &numeric_gradient(|v| loss(&x, v), &g, FD_H), FD_RTOL, FD_ATOL, &format!("{what} dg"));
    }
}

#[test]
fn rmsnorm_is_bit_identical_across_runs_and_refuses_bad_inputs() {
    let (rows, c) = (129, 769);
    let (x, dy) = (random_vec(rows * c, 860), random_vec(rows * c, 861));
    let g: Vec<f32> = random_vec(c, 862).iter().map(|v| 1.0 + 0.5 * v).collect();
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let (a, b) = (gpu_rmsnorm(&x, &g, &dy, rows, c), gpu_rmsnorm(&x, &g, &dy, rows, c));
    for k in 0..4 {
        assert_eq!(bits(&a[k]), bits(&b[k]), "rmsnorm output {k} differs between runs");
    }
    let gpu = gpu();
    let x = gpu.upload(&random_vec(12, 1), &[3, 4]).unwrap();
    let g3 = gpu.upload(&[1.0; 3], &[3]).unwrap();
    let g4 = gpu.upload(&[1.0; 4], &[4]).unwrap();
    let r3 = gpu.upload(&[1.0; 3], &[3]).unwrap();
    assert!(matches!(rmsnorm(gpu, &x, &g3, 1e-5), Err(Error::Shape { op: "rmsnorm", what: "gamma", .. })));
    assert!(matches!(rmsnorm(gpu, &x, &g4, f32::NAN), Err(Error::Invalid { op: "rmsnorm", .. })));
    let xi = gpu.upload_i32(&[1; 12], &[3, 4]).unwrap();
    assert!(matches!(rmsnorm(gpu, &xi, &g4, 1e-5), Err(Error::DType { op: "rmsnorm", what: "x", .. })));
    let bwd = |dy: &Tensor, x: &Tensor, g: &Tensor, r: &Tensor| rmsnorm_backward(gpu, dy, x, g, r).unwrap_err();
    assert!(matches!(bwd(&x, &x, &g3, &r3), Error::Shape { what: "gamma", .. }));
    assert!(matches!(bwd(&x, &x, &g4, &g4), Error::Shape { what: "rstd", .. }));
    let x43 = gpu.upload(&random_vec(12, 2), &[4, 3]).unwrap();
    assert!(matches!(bwd(&x, &x43, &g4, &r3), Error::Shape { what: "x", .. }));
}

#[test]
fn subgroup_reductions_run_where_subgroups_have_one_size() {
    let gpu = gpu();
    let info = gpu.info();
    let fixed = gpu.has_subgroups() && info.subgroup_min_size == info.subgroup_max_size;
    assert_eq!(
        RowReduction::Subgroup.available(gpu),
        fixed,
        "subgroups {}..{}",
        info.subgroup_min_size,
        info.subgroup_max_size
    );
    let default = if fixed { RowReduction::Subgroup } else { RowReduction::Tree };
    assert_eq!(RowReduction::chosen(gpu), default);
    assert_eq!(RowReduction::Tree.with(|| RowReduction::chosen(gpu)), RowReduction::Tree);
    assert_eq!(RowReduction::chosen(gpu), default, "with() restores the choice");
}
