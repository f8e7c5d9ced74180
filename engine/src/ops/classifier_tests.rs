//! Tests of the chunked classifier (`classifier.rs`): loss, logsumexp, dx and dW against the f64 reference of the
//! unchunked x·Wᵀ + cross-entropy, on odd shapes, with chunks that split the rows unevenly, and with W larger than
//! a (lowered) binding limit so it is used in parts.

use rand::Rng;

use super::*;
use crate::ops::loss::IGNORE_INDEX;
use crate::testing::{assert_close, assert_close_f64, gpu, numeric_gradient, random_vec, rng, to_f64};

/// Targets with about a fifth ignored; signed per-row weights like RL advantages (zero where ignored).
fn data(n: usize, v: usize, seed: u64) -> (Vec<i32>, Vec<f32>) {
    let mut r = rng(seed);
    let t: Vec<i32> =
        (0..n).map(|_| if r.random_bool(0.2) { IGNORE_INDEX } else { r.random_range(0..v as i32) }).collect();
    let d = t.iter().map(|&t| if t == IGNORE_INDEX { 0.0 } else { r.random_range(-1.0f32..1.0) }).collect();
    (t, d)
}

/// Run forward and backward on `gpu` with `chunk` rows per chunk; compare with the f64 reference.
fn check(gpu: &Gpu, n: usize, c: usize, v: usize, chunk: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    check_keep(gpu, n, c, v, chunk, 0, seed)
}

/// [`check`] with up to `keep` bytes of chunk logits kept from the forward for the backward.
fn check_keep(
    gpu: &Gpu,
    n: usize,
    c: usize,
    v: usize,
    chunk: usize,
    keep: u64,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let what = format!("classifier n={n} c={c} v={v} chunk={chunk} keep={keep}");
    let x = random_vec(n * c, seed);
    let w: Vec<f32> = random_vec(v * c, seed + 1).iter().map(|a| a * 2.0).collect();
    let (t, d) = data(n, v, seed + 2);
    let (xg, wg) = (gpu.upload(&x, &[n, c]).unwrap(), gpu.upload(&w, &[v, c]).unwrap());
    let tg = gpu.upload_i32(&t, &[n]).unwrap();
    let (losses, saved) = loss(gpu, &xg, &wg, &tg, chunk, keep).unwrap();
    let got_s = gpu.read(&saved.lse).unwrap();
    let dloss = gpu.upload(&d, &[n]).unwrap();
    // dW accumulates: start from a known gradient.
    let dw0 = random_vec(v * c, seed + 3);
    let dw = gpu.upload(&dw0, &[v, c]).unwrap();
    let dx = loss_backward(gpu, &xg, &wg, &tg, saved, &dloss, &dw, chunk).unwrap();
    let got_l = gpu.read(&losses).unwrap();
    let (got_dx, got_dw) = (gpu.read(&dx).unwrap(), gpu.read(&dw).unwrap());

    let (xd, wd) = (to_f64(&x), to_f64(&w));
    let (want_l, want_s) = cpu::loss(&xd, &wd, &t, c);
    let (want_dx, want_dw) = cpu::loss_backward(&xd, &wd, &t, &to_f64(&d), c);
    let want_dw: Vec<f64> = want_dw.iter().zip(&dw0).map(|(g, &a)| g + a as f64).collect();
    // |logits| <= 2C; f32 dot products of length C and sums over V give errors of a few ulp of C and of ln V.
    let atol = 1e-5 * (c as f64).max(1.0);
    assert_close(&got_s, &want_s, 1e-5, atol, &format!("{what} lse"));
    assert_close(&got_l, &want_l, 1e-5, atol, &format!("{what} loss"));
    assert_close(&got_dx, &want_dx, 1e-4, 1e-5 * c as f64, &format!("{what} dx"));
    assert_close(&got_dw, &want_dw, 1e-4, 1e-5 * n as f64, &format!("{what} dw"));
    for (i, &ti) in t.iter().enumerate() {
        assert!(ti != IGNORE_INDEX || got_l[i] == 0.0, "{what}: ignored row {i} has loss {}", got_l[i]);
    }
    (got_l, got_dx, got_dw)
}

#[test]
fn chunked_equals_reference_on_odd_shapes() {
    let gpu = gpu();
    let step = row_step(gpu);
    for (i, &(n, c, v)) in [(1, 1, 1), (7, 13, 97), (3 * step + 5, 33, 769), (2 * step + 1, 8, 50)].iter().enumerate() {
        for chunk in [step, 2 * step, chunk_rows(gpu, v)] {
            check(gpu, n, c, v, chunk, 10 * i as u64);
        }
    }
}

#[test]
fn chunk_size_changes_nothing_but_rounding() {
    // Losses and dx rows are computed per row the same way whatever the chunk: bit-identical. dW sums over chunks
    // in order, so only its rounding may differ.
    let gpu = gpu();
    let step = row_step(gpu);
    let n = 3 * step + 7;
    let (l1, dx1, _) = check(gpu, n, 19, 131, step, 7);
    let (l2, dx2, _) = check(gpu, n, 19, 131, 4 * step, 7);
    assert_eq!(l1, l2, "losses differ between chunk sizes");
    assert_eq!(dx1, dx2, "dx differs between chunk sizes");
}

#[test]
fn kept_logits_give_the_same_bits_as_recomputed_ones() {
    // Keeping a chunk's logits from the forward skips a matmul in the backward; the same product either way.
    let gpu = gpu();
    let step = row_step(gpu);
    let (n, c, v) = (3 * step + 2, 21, 173);
    let all = check_keep(gpu, n, c, v, step, u64::MAX, 11);
    let some = check_keep(gpu, n, c, v, step, (step * v * 4) as u64, 11); // the first chunk only
    let none = check_keep(gpu, n, c, v, step, 0, 11);
    assert!(all == none && some == none, "kept and recomputed logits differ");
}

#[test]
fn weight_larger_than_one_binding_is_used_in_parts() {
    // A device of its own, so lowering its binding limit cannot affect the other tests.
    let gpu = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    let step = row_step(&gpu);
    // W [113, 97] is 43.8 KB; a 32 KiB limit splits it into row parts while a chunk's logits still fit.
    let (c, v) = (97, 113);
    let limit = 32 << 10;
    assert!(step * v * 4 <= limit, "test shape needs a chunk to fit the lowered limit");
    let n = 2 * step + 3;
    let (l_whole, dx_whole, dw_whole) = check(&gpu, n, c, v, step, 3);
    gpu.set_binding_limit(Some(limit as u64));
    assert!(gpu.split_rows("test", v, c).unwrap().len() > 1, "W should need parts");
    let (l_parts, dx_parts, dw_parts) = check(&gpu, n, c, v, step, 3);
    // The logits are the same products, so the losses agree bit for bit; dx sums over parts in another order.
    assert_eq!(l_whole, l_parts);
    assert_close(&dx_parts, &to_f64(&dx_whole), 1e-5, 1e-6, "dx parts vs whole");
    assert_eq!(dw_whole, dw_parts, "each dW row is one part's product either way");
    // The full logits (decoding, inspect) come out the same from parts and from row blocks of one binding.
    let x = random_vec(n * c, 5);
    let w = random_vec(v * c, 6);
    let want = cpu::logits(&to_f64(&x), &to_f64(&w), c);
    let z = logits(&gpu, &gpu.upload(&x, &[n, c]).unwrap(), &gpu.upload(&w, &[v, c]).unwrap()).unwrap();
    assert_close(&gpu.read(&z).unwrap(), &want, 1e-5, 1e-5, "logits in parts");
}

#[test]
fn reference_backward_matches_finite_differences() {
    let (n, c, v) = (5, 4, 7);
    let x = to_f64(&random_vec(n * c, 1));
    let w = to_f64(&random_vec(v * c, 2));
    let (t, d) = data(n, v, 3);
    let d = to_f64(&d);
    let objective = |x: &[f64], w: &[f64]| cpu::loss(x, w, &t, c).0.iter().zip(&d).map(|(l, d)| l * d).sum::<f64>();
    let (dx, dw) = cpu::loss_backward(&x, &w, &t, &d, c);
    assert_close_f64(&dx, &numeric_gradient(|x| objective(x, &w), &x, 1e-5), 1e-6, 1e-8, "dx vs finite differences");
    assert_close_f64(&dw, &numeric_gradient(|w| objective(&x, w), &w, 1e-5), 1e-6, 1e-8, "dw vs finite differences");
}

#[test]
fn bad_shapes_and_chunks_are_errors() {
    let gpu = gpu();
    let x = gpu.upload(&[0.0; 6], &[2, 3]).unwrap();
    let w = gpu.upload(&[0.0; 8], &[2, 4]).unwrap();
    let t = gpu.upload_i32(&[0, 1], &[2]).unwrap();
    let e = loss(gpu, &x, &w, &t, row_step(gpu), 0).err().unwrap().to_string();
    assert!(e.contains("[V, 3]"), "{e}");
    let w = gpu.upload(&[0.0; 6], &[2, 3]).unwrap();
    if row_step(gpu) > 1 {
        let e = loss(gpu, &x, &w, &t, row_step(gpu) + 1, 0).err().unwrap().to_string();
        assert!(e.contains("multiple of"), "{e}");
    }
}
