//! RoPE tests: the kernel against Hugging Face's formula in f64, the backward against finite differences and as
//! the inverse, the relative-position property, packed positions, and typed errors.

use super::*;
use crate::ops::norm::tests::{assert_within, dot, FD_ATOL, FD_H, FD_RTOL, FLUSH, U};
use crate::testing::{assert_close_f64, gpu, numeric_gradient, random_vec, rng, to_f64};
use rand::Rng;

/// Each output is a·cos − b·sin (or a·cos + b·sin): cos and sin rounded to f32 (u each), two products and a sum
/// (3u), relative to |a| + |b|; the f64 reference has the exact angle. Angles up to max_pos·1 rad lose nothing
/// more: the table was computed in f64 before rounding.
fn bound(x: &[f64], hs: usize, w: usize, rotated: usize) -> Vec<f64> {
    let half = hs / 2;
    (0..x.len())
        .map(|i| {
            let col = i % w;
            if col >= rotated {
                return 0.0;
            }
            let partner = if col % hs < half { i + half } else { i - half };
            5.0 * U * (x[i].abs() + x[partner].abs()) + FLUSH
        })
        .collect()
}

fn check(rows: usize, hs: usize, heads: Heads, max_pos: usize, theta: f64, seed: u64) {
    let gpu = gpu();
    let w = heads.qkv_width(hs);
    let mut r = rng(seed);
    let positions: Vec<i32> = (0..rows).map(|_| r.random_range(0..max_pos as i32)).collect();
    let x = random_vec(rows * w, seed + 1);
    let table = RopeTable::new(gpu, hs, max_pos, theta).unwrap();
    let pos = gpu.upload_i32(&positions, &[rows]).unwrap();
    let tx = gpu.upload(&x, &[rows, w]).unwrap();
    let y = rope(gpu, &tx, &pos, &table, heads).unwrap();
    assert_eq!(y.shape(), &[rows, w]);
    let xd = to_f64(&x);
    let what = format!("rope rows={rows} hs={hs} heads={heads:?} max_pos={max_pos} theta={theta}");
    let rotated = (heads.n_head + heads.n_kv_head) * hs;
    let want = cpu::rope(&xd, &positions, hs, heads, theta, 1.0);
    let got = gpu.read(&y).unwrap();
    assert_within(&got, &want, &bound(&xd, hs, w, rotated), &what);
    // Values pass through untouched.
    for (i, (g, x)) in got.iter().zip(&x).enumerate() {
        if i % w >= rotated {
            assert_eq!(g.to_bits(), x.to_bits(), "{what}: value element {i}");
        }
    }
    let dy = random_vec(rows * w, seed + 2);
    let dx = rope_backward(gpu, &gpu.upload(&dy, &[rows, w]).unwrap(), &pos, &table, heads).unwrap();
    let dyd = to_f64(&dy);
    let want = cpu::rope(&dyd, &positions, hs, heads, theta, -1.0);
    assert_within(&gpu.read(&dx).unwrap(), &want, &bound(&dyd, hs, w, rotated), &format!("{what} backward"));
}

#[test]
fn matches_hugging_face_formula_on_odd_shapes() {
    check(1, 2, Heads::new(1, 1), 1, 10_000.0, 1);
    check(7, 6, Heads::new(3, 1), 9, 10_000.0, 2);
    check(129, 64, Heads::new(4, 2), 2048, 100_000.0, 3); // SmolLM2's head size and θ
    check(300, 128, Heads::new(2, 2), 4096, 500_000.0, 4); // Llama 3's θ
    check(17, 10, Heads::new(6, 3), 50, 10_000.0, 5);
}

#[test]
fn reference_backward_matches_finite_differences_and_inverts_the_forward() {
    let heads = Heads::new(2, 1);
    let (hs, rows) = (6, 3);
    let w = heads.qkv_width(hs);
    let positions = [0, 5, 2];
    let x = to_f64(&random_vec(rows * w, 10));
    let g = to_f64(&random_vec(rows * w, 11));
    let analytic = cpu::rope(&g, &positions, hs, heads, 10_000.0, -1.0);
    let numeric = numeric_gradient(|v| dot(&cpu::rope(v, &positions, hs, heads, 10_000.0, 1.0), &g), &x, FD_H);
    assert_close_f64(&analytic, &numeric, FD_RTOL, FD_ATOL, "rope backward");
    let back = cpu::rope(&cpu::rope(&x, &positions, hs, heads, 10_000.0, 1.0), &positions, hs, heads, 10_000.0, -1.0);
    assert_close_f64(&back, &x, 1e-12, 1e-12, "rope then its inverse");
}

#[test]
fn scores_depend_only_on_relative_position() {
    // What rotary embeddings are for: q_i·k_j after rotation depends on i − j only. Shifting both positions by 37
    // leaves every score unchanged (to the f32 rounding of the rotation).
    let gpu = gpu();
    let (hs, heads) = (16, Heads::new(1, 1));
    let w = heads.qkv_width(hs);
    let table = RopeTable::new(gpu, hs, 128, 10_000.0).unwrap();
    let row = random_vec(w, 20);
    let x = gpu.upload(&[row.clone(), row.clone()].concat(), &[2, w]).unwrap();
    let score = |pq: i32, pk: i32| {
        let pos = gpu.upload_i32(&[pq, pk], &[2]).unwrap();
        let y = gpu.read(&rope(gpu, &x, &pos, &table, heads).unwrap()).unwrap();
        (0..hs).map(|d| y[d] as f64 * y[w + hs + d] as f64).sum::<f64>()
    };
    for (pq, pk) in [(5, 2), (9, 9), (3, 40)] {
        let (a, b) = (score(pq, pk), score(pq + 37, pk + 37));
        assert!((a - b).abs() < 1e-5, "score at ({pq}, {pk}) = {a}, shifted by 37 = {b}");
    }
    assert!((score(5, 2) - score(2, 5)).abs() > 1e-3, "a score must change with the relative position");
}

#[test]
fn bad_positions_give_nan_and_bad_shapes_typed_errors() {
    let gpu = gpu();
    let heads = Heads::new(2, 1);
    let (hs, w) = (4, heads.qkv_width(4));
    let table = RopeTable::new(gpu, hs, 8, 10_000.0).unwrap();
    let x = gpu.upload(&random_vec(3 * w, 30), &[3, w]).unwrap();
    let pos = gpu.upload_i32(&[1, 8, -1], &[3]).unwrap();
    let y = gpu.read(&rope(gpu, &x, &pos, &table, heads).unwrap()).unwrap();
    let rotated = 3 * hs;
    assert!(y[..w].iter().all(|v| v.is_finite()));
    for r in 1..3 {
        assert!(y[r * w..r * w + rotated].iter().all(|v| v.is_nan()), "row {r} has a bad position");
        assert!(y[r * w + rotated..(r + 1) * w].iter().all(|v| v.is_finite()), "row {r}'s values are copied");
    }
    let ok_pos = gpu.upload_i32(&[0, 1, 2], &[3]).unwrap();
    let err = |x: &Tensor, p: &Tensor, h: Heads| rope(gpu, x, p, &table, h).unwrap_err();
    assert!(matches!(err(&x, &ok_pos, Heads::new(2, 2)), Error::Shape { op: "rope", what: "qkv", .. }));
    assert!(matches!(err(&x, &ok_pos, Heads::new(3, 2)), Error::Invalid { op: "rope", .. }));
    let short = gpu.upload_i32(&[0, 1], &[2]).unwrap();
    assert!(matches!(err(&x, &short, heads), Error::Shape { what: "positions", .. }));
    let floats = gpu.upload(&[0.0; 3], &[3]).unwrap();
    assert!(matches!(err(&x, &floats, heads), Error::DType { what: "positions", .. }));
    for (hs, max_pos, theta) in [(5, 8, 1e4), (0, 8, 1e4), (4, 8, 1.0), (4, 8, f64::NAN)] {
        assert!(matches!(RopeTable::new(gpu, hs, max_pos, theta), Err(Error::Invalid { .. })), "{hs} {theta}");
    }
    assert!(matches!(RopeTable::new(gpu, 4, 0, 1e4), Err(Error::Empty { .. })));
}
