//! Tests of the embedding (`embedding.rs`): forward and backward against the f64 references.

use rand::Rng;

use super::*;
use crate::ops::elementwise::zeros;
use crate::ops::norm::tests::{assert_within, dot, FD_ATOL, FD_H, FD_RTOL, U};
use crate::testing::{assert_close_f64, gpu, numeric_gradient, random_vec, rng, to_f64};

/// GPU output against the f64 reference rounded to f32. Exact: the f64 sum of two f32 values is exact here
/// (both in [-1, 1)), so rounding it once gives the correctly rounded f32 add the GPU performs.
fn assert_exact(got: &[f32], want: &[f64], what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g == w as f32 || (g.is_nan() && w.is_nan()), "{what}: element {i} is {g}, want {w}");
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

fn check(b: usize, t: usize, max_t: usize, v: usize, c: usize, seed: u64) {
    let gpu = gpu();
    let mut r = rng(seed);
    let tokens: Vec<i32> = (0..b * t).map(|_| r.random_range(0..v as i32)).collect();
    let (wte, wpe) = (random_vec(v * c, seed + 1), random_vec(max_t * c, seed + 2));
    let out = embedding(
        gpu,
        &gpu.upload_i32(&tokens, &[b, t]).unwrap(),
        &gpu.upload(&wte, &[v, c]).unwrap(),
        &gpu.upload(&wpe, &[max_t, c]).unwrap(),
    )
    .unwrap();
    assert_eq!(out.shape(), &[b, t, c]);
    let want = cpu::embedding(&tokens, t, &to_f64(&wte), &to_f64(&wpe), c);
    assert_exact(&gpu.read(&out).unwrap(), &want, &format!("embedding b={b} t={t} maxT={max_t} v={v} c={c}"));
}

#[test]
fn matches_reference() {
    check(1, 1, 1, 1, 1, 0);
    check(2, 5, 7, 13, 3, 1);
    check(3, 17, 20, 101, 769, 2);
    check(4, 33, 64, 257, 65, 3);
    check(2, 129, 129, 50257, 7, 4);
}

#[test]
fn out_of_range_tokens_give_nan_rows() {
    let gpu = gpu();
    let (b, t, v, c) = (2, 3, 5, 4);
    let tokens = [0, 5, 4, -1, 2, i32::MAX];
    let (wte, wpe) = (random_vec(v * c, 10), random_vec(t * c, 11));
    let out = embedding(
        gpu,
        &gpu.upload_i32(&tokens, &[b, t]).unwrap(),
        &gpu.upload(&wte, &[v, c]).unwrap(),
        &gpu.upload(&wpe, &[t, c]).unwrap(),
    )
    .unwrap();
    let got = gpu.read(&out).unwrap();
    for bad in [1, 3, 5] {
        assert!(got[bad * c..][..c].iter().all(|g| g.is_nan()), "row {bad} must be NaN");
    }
    assert_exact(&got, &cpu::embedding(&tokens, t, &to_f64(&wte), &to_f64(&wpe), c), "embedding with bad ids");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let gpu = gpu();
    let tokens = gpu.upload_i32(&[0, 1, 2, 3], &[2, 2]).unwrap();
    let wte = gpu.upload(&random_vec(12, 1), &[4, 3]).unwrap();
    let wpe = gpu.upload(&random_vec(6, 2), &[2, 3]).unwrap();
    let err = |tk: &Tensor, te: &Tensor, pe: &Tensor| embedding(gpu, tk, te, pe).expect_err("must be refused");
    let float_tokens = gpu.upload(&[0.0; 4], &[2, 2]).unwrap();
    assert!(matches!(err(&float_tokens, &wte, &wpe), Error::DType { op: "embedding", what: "tokens", .. }));
    let int_wte = gpu.upload_i32(&[0; 12], &[4, 3]).unwrap();
    assert!(matches!(err(&tokens, &int_wte, &wpe), Error::DType { op: "embedding", what: "wte", .. }));
    let flat_tokens = gpu.upload_i32(&[0, 1], &[2]).unwrap();
    assert!(matches!(err(&flat_tokens, &wte, &wpe), Error::Shape { op: "embedding", what: "tokens", .. }));
    let flat_wte = gpu.upload(&random_vec(12, 1), &[12]).unwrap();
    assert!(matches!(err(&tokens, &flat_wte, &wpe), Error::Shape { op: "embedding", what: "wte", .. }));
    let narrow_wpe = gpu.upload(&random_vec(4, 3), &[2, 2]).unwrap();
    assert!(matches!(err(&tokens, &wte, &narrow_wpe), Error::Shape { op: "embedding", what: "wpe", .. }));
    // T = 3 positions but wpe holds only 2.
    let long = gpu.upload_i32(&[0; 6], &[2, 3]).unwrap();
    assert!(matches!(err(&long, &wte, &wpe), Error::Shape { op: "embedding", what: "tokens", .. }));
}

#[test]
fn reference_backward_matches_finite_differences() {
    // Token 1 repeats (three times, in both sequences), token 2 is unused and position 3 is beyond T: their
    // gradients must be exactly 0.
    let (b, t, max_t, v, c) = (2, 3, 4, 4, 3);
    let tokens = [1, 3, 1, 1, 0, 3];
    let wte = to_f64(&random_vec(v * c, 20));
    let wpe = to_f64(&random_vec(max_t * c, 21));
    let w = to_f64(&random_vec(b * t * c, 22));
    let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; max_t * c]);
    cpu::embedding_backward(&tokens, t, &w, c, &mut dwte, &mut dwpe);
    let fd = numeric_gradient(|e| dot(&cpu::embedding(&tokens, t, e, &wpe, c), &w), &wte, FD_H);
    assert_close_f64(&dwte, &fd, FD_RTOL, FD_ATOL, "embedding backward dwte");
    let fd = numeric_gradient(|p| dot(&cpu::embedding(&tokens, t, &wte, p, c), &w), &wpe, FD_H);
    assert_close_f64(&dwpe, &fd, FD_RTOL, FD_ATOL, "embedding backward dwpe");
    assert!(dwte[2 * c..3 * c].iter().chain(&dwpe[3 * c..]).all(|&g| g == 0.0));
}

#[test]
fn positions_are_bucketed_by_token_in_order() {
    let got = bucket_positions("test", &[3, 1, 3, 0, 1, 3], 5, 3).unwrap();
    // ids [0, 1, 3] | offsets [0, 1, 3, 6] | positions of 0, then of 1, then of 3, each ascending.
    assert_eq!(got, [0, 1, 3, 0, 1, 3, 6, 3, 1, 4, 0, 2, 5]);
}

struct Backward {
    dwte: Vec<f32>,
    dwpe: Vec<f32>,
}

/// Runs embedding_backward `calls` times into tables starting at `init` (zeros when None).
fn gpu_backward(
    tokens: &[i32],
    dout: &[f32],
    shape: [usize; 5],
    init: Option<(&[f32], &[f32])>,
    calls: usize,
) -> Backward {
    let gpu = gpu();
    let [b, t, max_t, v, c] = shape;
    let (dwte, dwpe) = match init {
        Some((e, p)) => (gpu.upload(e, &[v, c]).unwrap(), gpu.upload(p, &[max_t, c]).unwrap()),
        None => (zeros(gpu, &[v, c]).unwrap(), zeros(gpu, &[max_t, c]).unwrap()),
    };
    let tdout = gpu.upload(dout, &[b, t, c]).unwrap();
    for _ in 0..calls {
        embedding_backward(gpu, tokens, &tdout, &dwte, &dwpe).unwrap();
    }
    Backward { dwte: gpu.read(&dwte).unwrap(), dwpe: gpu.read(&dwpe).unwrap() }
}

fn check_backward(shape: [usize; 5], tokens: &[i32], seed: u64) {
    let [b, t, max_t, v, c] = shape;
    let dout = random_vec(b * t * c, seed);
    let (e0, p0) = (random_vec(v * c, seed + 1), random_vec(max_t * c, seed + 2));
    let got = gpu_backward(tokens, &dout, shape, Some((&e0, &p0)), 1);
    let (mut want_e, mut want_p) = (to_f64(&e0), to_f64(&p0));
    cpu::embedding_backward(tokens, t, &to_f64(&dout), c, &mut want_e, &mut want_p);
    // Each table element is its initial value plus k dout terms added sequentially: k roundings, each at most
    // u times the sum of the absolute values, with k the most rows any element sums (a token's count, or B).
    let abs = |x: &[f32]| x.iter().map(|v| v.abs() as f64).collect::<Vec<_>>();
    let (mut abs_e, mut abs_p) = (abs(&e0), abs(&p0));
    cpu::embedding_backward(tokens, t, &abs(&dout), c, &mut abs_e, &mut abs_p);
    let mut counts = vec![0usize; v];
    tokens.iter().for_each(|&id| counts[id as usize] += 1);
    let k = counts.iter().copied().max().unwrap().max(b) as f64;
    let what = format!("embedding backward b={b} t={t} maxT={max_t} v={v} c={c}");
    let bound = |a: &[f64]| a.iter().map(|x| k * U * x).collect::<Vec<_>>();
    assert_within(&got.dwte, &want_e, &bound(&abs_e), &format!("{what} dwte"));
    assert_within(&got.dwpe, &want_p, &bound(&abs_p), &format!("{what} dwpe"));
}

#[test]
fn backward_matches_reference() {
    for (case, shape) in
        [[1, 1, 1, 1, 1], [2, 5, 7, 13, 3], [3, 17, 20, 101, 769], [4, 33, 64, 7, 65], [2, 129, 129, 50257, 7]]
            .into_iter()
            .enumerate()
    {
        let [b, t, _, v, _] = shape;
        let mut r = rng(900 + case as u64);
        let tokens: Vec<i32> = (0..b * t).map(|_| r.random_range(0..v as i32)).collect();
        check_backward(shape, &tokens, 910 + case as u64);
    }
    // One token everywhere: a single bucket of 256 rows, with the last id of the vocabulary.
    check_backward([4, 64, 64, 50, 255], &[49; 256], 950);
}

#[test]
fn backward_accumulates_and_is_bit_reproducible() {
    let shape @ [b, t, _, v, c] = [3, 17, 20, 11, 255];
    let mut r = rng(960);
    let tokens: Vec<i32> = (0..b * t).map(|_| r.random_range(0..v as i32)).collect();
    let dout = random_vec(b * t * c, 961);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let once = gpu_backward(&tokens, &dout, shape, None, 1);
    let again = gpu_backward(&tokens, &dout, shape, None, 1);
    assert_eq!(bits(&once.dwte), bits(&again.dwte), "dwte differs between runs");
    assert_eq!(bits(&once.dwpe), bits(&again.dwpe), "dwpe differs between runs");
    // From zeros the first call stores each sum s exactly (0 + s) and the second adds the same s: s + s = 2s is
    // exact in binary floating point, so two calls give exactly twice one call.
    let twice = gpu_backward(&tokens, &dout, shape, None, 2);
    let doubled = |x: &[f32]| bits(&x.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
    assert_eq!(bits(&twice.dwte), doubled(&once.dwte), "dwte after two calls");
    assert_eq!(bits(&twice.dwpe), doubled(&once.dwpe), "dwpe after two calls");
    assert!(once.dwte.iter().any(|&g| g != 0.0) && once.dwpe.iter().any(|&g| g != 0.0));
}

#[test]
fn backward_bad_inputs_are_typed_errors() {
    let gpu = gpu();
    let (b, t, v, c) = (2, 3, 5, 4);
    let tokens = [0, 1, 2, 3, 4, 0];
    let dout = gpu.upload(&random_vec(b * t * c, 1), &[b, t, c]).unwrap();
    let dwte = gpu.upload(&random_vec(v * c, 2), &[v, c]).unwrap();
    let dwpe = gpu.upload(&random_vec(t * c, 3), &[t, c]).unwrap();
    let err = |tk: &[i32], d: &Tensor, e: &Tensor, p: &Tensor| {
        embedding_backward(gpu, tk, d, e, p).expect_err("must be refused")
    };
    let check = |e: Error, dtype: bool, what: &str| match e {
        Error::DType { op: "embedding_backward", what: w, .. } if dtype => assert_eq!(w, what),
        Error::Shape { op: "embedding_backward", what: w, .. } if !dtype => assert_eq!(w, what),
        e => panic!("{what}: unexpected {e:?}"),
    };
    check(err(&tokens, &gpu.upload_i32(&[0; 24], &[b, t, c]).unwrap(), &dwte, &dwpe), true, "dout");
    check(err(&tokens, &dout.reshape(&[b * t, c]).unwrap(), &dwte, &dwpe), false, "dout");
    check(err(&tokens, &dout, &gpu.upload_i32(&[0; 20], &[v, c]).unwrap(), &dwpe), true, "dwte");
    check(err(&tokens, &dout, &dwte.reshape(&[v * c]).unwrap(), &dwpe), false, "dwte");
    check(err(&tokens, &dout, &dwte.reshape(&[10, 2]).unwrap(), &dwpe), false, "dwte");
    check(err(&tokens, &dout, &dwte, &gpu.upload(&[0.0; 8], &[2, c]).unwrap()), false, "dwpe");
    check(err(&tokens, &dout, &dwte, &gpu.upload(&[0.0; 9], &[3, 3]).unwrap()), false, "dwpe");
    check(err(&tokens[..5], &dout, &dwte, &dwpe), false, "tokens");
    let same = gpu.upload(&[0.0; 12], &[t, c]).unwrap();
    match err(&[0, 1, 2, 0, 1, 2], &dout, &same.reshape(&[t, c]).unwrap(), &same) {
        Error::Invalid { op: "embedding_backward", message } => assert!(message.contains("share"), "{message}"),
        e => panic!("unexpected {e:?}"),
    }
    // Out-of-range ids are named by position, and nothing is recorded.
    let before = gpu.read(&dwte).unwrap();
    for (bad, pos) in [([0, 1, 2, 3, 5, 0], "position 4 (b 1, t 1)"), ([0, -1, 2, 3, 4, 0], "position 1 (b 0, t 1)")] {
        match err(&bad, &dout, &dwte, &dwpe) {
            Error::Invalid { op: "embedding_backward", message } => assert!(message.contains(pos), "{message}"),
            e => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(gpu.read(&dwte).unwrap(), before);
}

/// Position ids of rows packed with sequences of the given lengths: each restarts at 0.
fn packed_positions(rows: &[&[usize]], t: usize) -> Vec<i32> {
    let mut out = Vec::new();
    for lens in rows {
        let mut row: Vec<i32> = lens.iter().flat_map(|&n| 0..n as i32).collect();
        let tail = t - row.len();
        row.extend(0..tail as i32);
        out.extend(row);
    }
    out
}

#[test]
fn position_ids_match_reference_forward_and_backward() {
    let gpu = gpu();
    let (b, t, max_t, v, c) = (3, 37, 40, 101, 13);
    let mut r = rng(30);
    let tokens: Vec<i32> = (0..b * t).map(|_| r.random_range(0..v as i32)).collect();
    let positions = packed_positions(&[&[5, 1, 20, 11], &[37], &[2, 30]], t);
    let (wte, wpe) = (random_vec(v * c, 31), random_vec(max_t * c, 32));
    let tk = gpu.upload_i32(&tokens, &[b, t]).unwrap();
    let ps = gpu.upload_i32(&positions, &[b, t]).unwrap();
    let (wte_t, wpe_t) = (gpu.upload(&wte, &[v, c]).unwrap(), gpu.upload(&wpe, &[max_t, c]).unwrap());
    let out = embedding_at(gpu, &tk, Some(&ps), &wte_t, &wpe_t).unwrap();
    let want = cpu::embedding_at(&tokens, Some(&positions), t, &to_f64(&wte), &to_f64(&wpe), c);
    assert_exact(&gpu.read(&out).unwrap(), &want, "embedding with position ids");
    // Row 1 is one sequence: its positions are 0..T, the same as no position ids.
    let plain = gpu.read(&embedding(gpu, &tk, &wte_t, &wpe_t).unwrap()).unwrap();
    let got = gpu.read(&out).unwrap();
    assert_eq!(got[t * c..2 * t * c], plain[t * c..2 * t * c]);
    assert_ne!(got[..t * c], plain[..t * c], "packed rows use restarted positions");

    let dout = random_vec(b * t * c, 33);
    let (dwte, dwpe) = (zeros(gpu, &[v, c]).unwrap(), zeros(gpu, &[max_t, c]).unwrap());
    let dout_t = gpu.upload(&dout, &[b, t, c]).unwrap();
    embedding_backward_at(gpu, &tokens, Some(&positions), &dout_t, &dwte, &dwpe).unwrap();
    let (mut we, mut wp) = (vec![0.0; v * c], vec![0.0; max_t * c]);
    cpu::embedding_backward_at(&tokens, Some(&positions), t, &to_f64(&dout), c, &mut we, &mut wp);
    assert_within(&gpu.read(&dwte).unwrap(), &we, &vec![1e-5; we.len()], "dwte with position ids");
    assert_within(&gpu.read(&dwpe).unwrap(), &wp, &vec![1e-5; wp.len()], "dwpe with position ids");
    assert!(gpu.read(&dwpe).unwrap()[37 * c..].iter().all(|&g| g == 0.0), "unused positions get exactly 0");

    // The reference backward is the gradient of the reference forward.
    let wte64 = to_f64(&wte);
    let wpe64 = to_f64(&wpe);
    let w = to_f64(&dout);
    let fd =
        numeric_gradient(|p| dot(&cpu::embedding_at(&tokens, Some(&positions), t, &wte64, p, c), &w), &wpe64, FD_H);
    assert_close_f64(&wp, &fd, FD_RTOL, FD_ATOL, "reference dwpe with position ids");
}

#[test]
fn bad_position_ids_are_errors_or_nan_rows() {
    let gpu = gpu();
    let (b, t, max_t, v, c) = (1, 3, 3, 5, 2);
    let tokens = [1, 2, 3];
    let tk = gpu.upload_i32(&tokens, &[b, t]).unwrap();
    let (wte, wpe) =
        (gpu.upload(&random_vec(v * c, 1), &[v, c]).unwrap(), gpu.upload(&random_vec(6, 2), &[max_t, c]).unwrap());
    let ps = gpu.upload_i32(&[0, 3, -1], &[b, t]).unwrap();
    let got = gpu.read(&embedding_at(gpu, &tk, Some(&ps), &wte, &wpe).unwrap()).unwrap();
    assert!(got[..c].iter().all(|x| x.is_finite()) && got[c..].iter().all(|x| x.is_nan()));
    let wrong = gpu.upload_i32(&[0, 1], &[1, 2]).unwrap();
    assert!(matches!(embedding_at(gpu, &tk, Some(&wrong), &wte, &wpe), Err(Error::Shape { what: "positions", .. })));
    let dout = gpu.upload(&[0.5; 6], &[b, t, c]).unwrap();
    let (dwte, dwpe) = (zeros(gpu, &[v, c]).unwrap(), zeros(gpu, &[max_t, c]).unwrap());
    let e = embedding_backward_at(gpu, &tokens, Some(&[0, 1, 3]), &dout, &dwte, &dwpe).unwrap_err().to_string();
    assert!(e.contains("position ids"), "{e}");
}

#[test]
fn token_embedding_gathers_rows_and_scatters_their_gradient() {
    let gpu = gpu();
    for (case, &(b, t, v, c)) in [(1, 1, 1, 1), (2, 5, 13, 3), (3, 17, 101, 769), (2, 129, 50257, 7)].iter().enumerate()
    {
        let mut r = rng(70 + case as u64);
        // Repeated ids, so the backward sums several rows into one.
        let mut tokens: Vec<i32> = (0..b * t).map(|_| r.random_range(0..v.min(9) as i32)).collect();
        tokens[0] = v as i32 - 1;
        let wte = random_vec(v * c, 80 + case as u64);
        let ids = gpu.upload_i32(&tokens, &[b, t]).unwrap();
        let out = token_embedding(gpu, &ids, &gpu.upload(&wte, &[v, c]).unwrap()).unwrap();
        assert_eq!(out.shape(), &[b, t, c]);
        let what = format!("token_embedding b={b} t={t} v={v} c={c}");
        // A gather: exact.
        assert_exact(&gpu.read(&out).unwrap(), &cpu::token_embedding(&tokens, &to_f64(&wte), c), &what);

        let dout = random_vec(b * t * c, 90 + case as u64);
        let start = random_vec(v * c, 95 + case as u64);
        let dwte = gpu.upload(&start, &[v, c]).unwrap();
        token_embedding_backward(gpu, &tokens, &gpu.upload(&dout, &[b, t, c]).unwrap(), &dwte).unwrap();
        let mut want = to_f64(&start);
        let mut no_positions = vec![0.0; t * c];
        cpu::embedding_backward(&tokens, t, &to_f64(&dout), c, &mut want, &mut no_positions);
        // Each element sums at most B·T terms of |x| < 1 sequentially onto its start: (B·T + 1)·u each.
        let mut mag = start.iter().map(|v| v.abs() as f64).collect::<Vec<_>>();
        for (i, &tok) in tokens.iter().enumerate() {
            for j in 0..c {
                mag[tok as usize * c + j] += dout[i * c + j].abs() as f64;
            }
        }
        let bound: Vec<f64> = mag.iter().map(|m| (b * t + 1) as f64 * U * m).collect();
        assert_within(&gpu.read(&dwte).unwrap(), &want, &bound, &format!("{what} backward"));
    }
    // Bad ids: NaN rows forward, a typed error backward naming the position.
    let wte = gpu.upload(&random_vec(8, 1), &[4, 2]).unwrap();
    let out = token_embedding(gpu, &gpu.upload_i32(&[1, 4, -1], &[1, 3]).unwrap(), &wte).unwrap();
    let got = gpu.read(&out).unwrap();
    assert!(got[..2].iter().all(|v| v.is_finite()) && got[2..].iter().all(|v| v.is_nan()), "{got:?}");
    let dout = gpu.upload(&[0.0; 6], &[1, 3, 2]).unwrap();
    let e = token_embedding_backward(gpu, &[1, 4, 0], &dout, &wte).unwrap_err();
    assert!(matches!(&e, Error::Invalid { op: "token_embedding_backward", message } if message.contains("token id 4")));
    let e = token_embedding_backward(gpu, &[1, 2], &dout, &wte).unwrap_err();
    assert!(matches!(e, Error::Shape { what: "tokens", .. }), "{e:?}");
}
