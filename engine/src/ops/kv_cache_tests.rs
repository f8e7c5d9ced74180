//! KV-cache tests: prefill then decode through the cache reproduces full causal attention, row fan-out, and the
//! typed errors of every launcher.

use super::*;
use crate::ops::attention::{attention_forward, cpu as attn_cpu};
use crate::testing::{assert_close, gpu, random_vec, to_f64};

/// The bound of attention_tests.rs: scores off by amp·HS^1.5·u, the softmax sums by T·u, doubled by f32::EPSILON.
fn tol(t: usize, hs: usize, amp: f64) -> f64 {
    (amp * (hs as f64).powf(1.5) + 2.0 * t as f64) * f32::EPSILON as f64 + 1e-6
}

/// Random qkv [B, T, 3C] with q scaled by amp (a peaky softmax moves the running max between key blocks).
fn random_qkv(b: usize, t: usize, c: usize, amp: f32, seed: u64) -> Vec<f32> {
    let mut x = random_vec(b * t * 3 * c, seed);
    x.chunks_mut(3 * c).for_each(|row| row[..c].iter_mut().for_each(|v| *v *= amp));
    x
}

/// Positions t0..t1 of every batch row of x [B, T, w].
fn rows(x: &[f32], b: usize, t: usize, w: usize, (t0, t1): (usize, usize)) -> Vec<f32> {
    (0..b).flat_map(|bi| x[(bi * t + t0) * w..(bi * t + t1) * w].to_vec()).collect()
}

/// Appends and attends chunk by chunk (`chunks` = new tokens per call) through a cache first filled with NaN, so a
/// read of a position never appended would poison the result; returns y of every position, [B, T, C].
fn run_chunks(gpu: &Gpu, x: &[f32], shape: (usize, usize, usize, usize), chunks: &[usize]) -> Vec<f32> {
    run_chunks_gqa(gpu, x, shape, shape.3, chunks)
}

/// [`run_chunks`] with `nkv` key/value heads: x is [B, T, (NH + 2·NKV)·HS].
fn run_chunks_gqa(
    gpu: &Gpu,
    x: &[f32],
    (b, t, c, nh): (usize, usize, usize, usize),
    nkv: usize,
    chunks: &[usize],
) -> Vec<f32> {
    let w = (nh + 2 * nkv) * (c / nh);
    let cache = KvCache::new(gpu, b, (nh, nkv), c / nh, t + 3).unwrap();
    assert_eq!(cache.k.shape(), &[b, nkv, t + 3, c / nh]);
    fill(gpu, &cache.k, f32::NAN).unwrap();
    fill(gpu, &cache.v, f32::NAN).unwrap();
    let mut ys = Vec::new();
    let mut pos = 0;
    for &n in chunks {
        let qkv = gpu.upload(&rows(x, b, t, w, (pos, pos + n)), &[b, n, w]).unwrap();
        kv_append(gpu, &cache, &qkv, pos).unwrap();
        let y = attention_cached(gpu, &cache, &qkv, pos).unwrap();
        assert_eq!(y.shape(), &[b, n, c]);
        ys.push((pos, n, y));
        pos += n;
    }
    assert_eq!(pos, t);
    let mut out = vec![0.0; b * t * c];
    for (pos, n, y) in ys {
        let y = gpu.read(&y).unwrap();
        for bi in 0..b {
            out[(bi * t + pos) * c..(bi * t + pos + n) * c].copy_from_slice(&y[bi * n * c..(bi + 1) * n * c]);
        }
    }
    out
}

fn check(shape: (usize, usize, usize, usize), chunks: &[usize], amp: f32, seed: u64) {
    let gpu = gpu();
    let (b, t, c, nh) = shape;
    let x = random_qkv(b, t, c, amp, seed);
    let got = run_chunks(gpu, &x, shape, chunks);
    let what = format!("(B,T,C,NH)=({b},{t},{c},{nh}) chunks {chunks:?} amp {amp}");
    let (want, _) = attn_cpu::attention_forward(&to_f64(&x), b, t, c, nh);
    let atol = tol(t, c / nh, amp as f64);
    assert_close(&got, &want, 0.0, atol, &format!("vs reference {what}"));
    // And against the training kernel on the whole sequence: both are within atol of the reference.
    let (y, _) = attention_forward(gpu, &gpu.upload(&x, &[b, t, 3 * c]).unwrap(), nh).unwrap();
    assert_close(&got, &to_f64(&gpu.read(&y).unwrap()), 0.0, 2.0 * atol, &format!("vs attention_forward {what}"));
}

/// A prefill of `p` tokens, then `d` one-token decode steps.
fn prefill_decode(p: usize, d: usize) -> Vec<usize> {
    std::iter::once(p).chain(std::iter::repeat_n(1, d)).collect()
}

#[test]
fn prefill_then_decode_matches_full_attention() {
    let cases = [
        ((1, 40, 5, 1), 37, 3),      // HS 5, one head
        ((3, 30, 15, 3), 20, 10),    // HS 5, three heads, B 3
        ((3, 70, 48, 3), 61, 9),     // HS 16: key blocks of 64 and a partial one
        ((1, 130, 128, 2), 100, 30), // HS 64 (GPT-2), T 130
        ((2, 12, 256, 2), 9, 3),     // HS 128, the kernels' max: 16-key blocks
    ];
    for (i, &(shape, p, d)) in cases.iter().enumerate() {
        check(shape, &prefill_decode(p, d), 1.0, i as u64);
        check(shape, &prefill_decode(p, d), 6.0, 50 + i as u64);
    }
}

#[test]
fn chunked_prefill_and_multi_token_steps_match() {
    // Chunks past 8 tokens take the row kernel at pos > 0; chunks of 2..8 the split kernel with several queries.
    check((2, 130, 64, 4), &[50, 70, 3, 1, 6], 3.0, 7);
    check((3, 25, 15, 3), &[1, 1, 8, 9, 2, 4], 3.0, 8);
    check((1, 200, 32, 2), &[1, 199], 3.0, 9);
}

#[test]
fn broadcast_row_fans_a_prompt_out_to_a_group() {
    // RL: the prompt is prefilled once as a batch of 1 (row 0), fanned out to G rows, then each row decodes its own
    // tokens; every row must equal full attention over the prompt followed by its own tokens.
    let gpu = gpu();
    let (g, c, nh, p, d) = (3, 48, 3, 21, 4);
    let t = p + d;
    let prompt = random_qkv(1, p, c, 2.0, 1);
    let cache = KvCache::new(gpu, g, nh, c / nh, t).unwrap();
    fill(gpu, &cache.k, f32::NAN).unwrap();
    fill(gpu, &cache.v, f32::NAN).unwrap();
    let qkv = gpu.upload(&prompt, &[1, p, 3 * c]).unwrap();
    kv_append(gpu, &cache, &qkv, 0).unwrap();
    attention_cached(gpu, &cache, &qkv, 0).unwrap();
    kv_broadcast_row(gpu, &cache, 0, p).unwrap();
    let tails = random_qkv(g, d, c, 2.0, 2);
    let mut got = vec![Vec::new(); g];
    for step in 0..d {
        let tok = gpu.upload(&rows(&tails, g, d, 3 * c, (step, step + 1)), &[g, 1, 3 * c]).unwrap();
        kv_append(gpu, &cache, &tok, p + step).unwrap();
        let y = gpu.read(&attention_cached(gpu, &cache, &tok, p + step).unwrap()).unwrap();
        y.chunks(c).enumerate().for_each(|(row, y)| got[row].extend_from_slice(y));
    }
    for (row, got) in got.iter().enumerate() {
        let full: Vec<f32> = prompt.iter().chain(&tails[row * d * 3 * c..(row + 1) * d * 3 * c]).cloned().collect();
        let want = cpu::attention_cached(&to_f64(&full), 1, p, d, c, nh);
        assert_close(got, &want, 0.0, tol(t, c / nh, 2.0), &format!("group row {row}"));
    }
}

#[test]
fn copy_rows_copies_only_the_prefix_of_the_chosen_rows() {
    let gpu = gpu();
    let (b, nh, hs, tmax, len) = (4, 2, 5, 9, 6);
    let cache = KvCache::new(gpu, b, nh, hs, tmax).unwrap();
    let k0 = random_vec(b * nh * tmax * hs, 3);
    let v0 = random_vec(b * nh * tmax * hs, 4);
    gpu.write(&cache.k, &k0).unwrap();
    gpu.write(&cache.v, &v0).unwrap();
    kv_copy_rows(gpu, &cache, 2, 1..4, len).unwrap();
    let at = |row: usize, h: usize, tok: usize| ((row * nh + h) * tmax + tok) * hs;
    let expect = |x0: &[f32]| {
        let mut x = x0.to_vec();
        for row in [1, 3] {
            for h in 0..nh {
                x.copy_within(at(2, h, 0)..at(2, h, len), at(row, h, 0));
            }
        }
        x
    };
    assert_eq!(gpu.read(&cache.k).unwrap(), expect(&k0));
    assert_eq!(gpu.read(&cache.v).unwrap(), expect(&v0));
    // Broadcast: every row becomes row 0 on positions 0..tmax.
    kv_broadcast_row(gpu, &cache, 0, tmax).unwrap();
    let k = gpu.read(&cache.k).unwrap();
    k.chunks(nh * tmax * hs).for_each(|row| assert_eq!(row, &k0[..nh * tmax * hs]));
    // len 0, an empty range and a one-row cache are no-ops.
    kv_copy_rows(gpu, &cache, 0, 2..2, 3).unwrap();
    kv_broadcast_row(gpu, &cache, 1, 0).unwrap();
    kv_broadcast_row(gpu, &KvCache::new(gpu, 1, 1, 4, 4).unwrap(), 0, 4).unwrap();
}

#[test]
fn attention_cached_allocates_only_its_output() {
    let gpu = Gpu::new().unwrap(); // private: the peak must not see other tests' tensors
    let (c, nh, t) = (32, 2, 1024);
    let cache = KvCache::new(&gpu, 1, nh, c / nh, t).unwrap();
    let x = random_qkv(1, t, c, 2.0, 5);
    let qkv = gpu.upload(&x, &[1, t, 3 * c]).unwrap();
    kv_append(&gpu, &cache, &qkv, 0).unwrap();
    gpu.sync().unwrap();
    let before = gpu.pool_stats().live_bytes;
    gpu.reset_peak();
    let y = attention_cached(&gpu, &cache, &qkv, 0).unwrap();
    gpu.sync().unwrap();
    let added = gpu.pool_stats().peak_bytes - before;
    assert!(added <= y.bytes() * 9 / 8, "attention_cached allocated {added} bytes beyond its output's {}", y.bytes());
    let (want, _) = attn_cpu::attention_forward(&to_f64(&x), 1, t, c, nh);
    assert_close(&gpu.read(&y).unwrap(), &want, 0.0, tol(t, c / nh, 2.0), "T 1024");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let gpu = gpu();
    let cache = KvCache::new(gpu, 2, 3, 4, 10).unwrap(); // C = 12
    let up = |shape: &[usize]| gpu.upload(&vec![0.0; shape.iter().product()], shape).unwrap();
    let invalid = |r: Result<()>, op: &str, needles: &[&str]| match r {
        Err(Error::Invalid { op: o, message }) if o == op => {
            needles.iter().for_each(|n| assert!(message.contains(n), "{message} lacks {n:?}"))
        }
        other => panic!("expected Invalid from {op}, got {other:?}"),
    };
    // Positions 8..11 do not fit max_len 10: the message names both.
    invalid(kv_append(gpu, &cache, &up(&[2, 3, 36]), 8), "kv_append", &["11", "10"]);
    invalid(attention_cached(gpu, &cache, &up(&[1, 1, 36]), 10).map(|_| ()), "attention_cached", &["11", "10"]);
    kv_append(gpu, &cache, &up(&[2, 2, 36]), 8).unwrap(); // exactly fills the cache
    let shape = |r: Result<()>| assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    shape(kv_append(gpu, &cache, &up(&[2, 1, 30]), 0)); // C 10 is not n_head · head_size
    shape(kv_append(gpu, &cache, &up(&[3, 1, 36]), 0)); // more rows than the cache
    shape(kv_append(gpu, &cache, &up(&[2, 36]), 0)); // 2-D
    shape(attention_cached(gpu, &cache, &up(&[1, 1, 37]), 0).map(|_| ()));
    let ints = gpu.upload_i32(&[0; 36], &[1, 1, 36]).unwrap();
    assert!(matches!(kv_append(gpu, &cache, &ints, 0), Err(Error::DType { op: "kv_append", .. })));
    invalid(kv_copy_rows(gpu, &cache, 2, 0..1, 3), "kv_copy_rows", &["2"]);
    invalid(kv_copy_rows(gpu, &cache, 0, 1..3, 3), "kv_copy_rows", &["1..3"]);
    invalid(kv_broadcast_row(gpu, &cache, 0, 11), "kv_copy_rows", &["11", "10"]);
    // A hand-built cache whose fields disagree with its tensors.
    let wrong = KvCache { max_len: 11, ..KvCache::new(gpu, 2, 3, 4, 10).unwrap() };
    let r = kv_append(gpu, &wrong, &up(&[2, 1, 36]), 0);
    assert!(matches!(r, Err(Error::Shape { op: "kv_append", what: "cache.k", .. })), "{r:?}");
    assert!(matches!(KvCache::new(gpu, 0, 1, 4, 4), Err(Error::Empty { .. })));
    assert!(matches!(KvCache::new(gpu, 1, 1, 129, 4), Err(Error::Invalid { .. })));
    let huge = KvCache::new(gpu, 1 << 10, 16, 128, 1 << 10).map(|_| ());
    assert!(matches!(huge, Err(Error::Limit { .. })), "{huge:?}");
}

#[test]
fn gqa_prefill_then_decode_matches_full_attention() {
    // (B, T, C, NH), NKV, chunks: grouped and multi-query caches hold only the NKV heads and give the rows of
    // full GQA attention, through both the split (decode) and the row (prefill) kernels.
    let cases = [
        ((2, 40, 20, 4), 2, prefill_decode(30, 10)),
        ((1, 130, 384, 6), 2, vec![70, 1, 9, 50]),   // HS 64
        ((3, 25, 15, 3), 1, vec![1, 1, 8, 9, 2, 4]), // HS 5, multi-query
    ];
    let gpu = gpu();
    for (i, (shape @ (b, t, c, nh), nkv, chunks)) in cases.into_iter().enumerate() {
        let hs = c / nh;
        let w = (nh + 2 * nkv) * hs;
        let mut x = random_vec(b * t * w, 300 + i as u64);
        x.chunks_mut(w).for_each(|row| row[..c].iter_mut().for_each(|v| *v *= 3.0));
        let got = run_chunks_gqa(gpu, &x, shape, nkv, &chunks);
        let (want, _) = attn_cpu::attention_forward(&to_f64(&x), b, t, c, (nh, nkv));
        let what = format!("GQA (B,T,C,NH)={shape:?} NKV {nkv} chunks {chunks:?}");
        assert_close(&got, &want, 0.0, tol(t, hs, 3.0), &what);
    }
}

#[test]
fn gqa_broadcast_copies_only_the_kv_heads() {
    let gpu = gpu();
    let (g, nh, nkv, hs, p) = (3, 4, 2, 6, 9);
    let w = (nh + 2 * nkv) * hs;
    let cache = KvCache::new(gpu, g, (nh, nkv), hs, p + 1).unwrap();
    fill(gpu, &cache.k, f32::NAN).unwrap();
    fill(gpu, &cache.v, f32::NAN).unwrap();
    let prompt = random_vec(p * w, 5);
    kv_append(gpu, &cache, &gpu.upload(&prompt, &[1, p, w]).unwrap(), 0).unwrap();
    kv_broadcast_row(gpu, &cache, 0, p).unwrap();
    let (k, v) = (gpu.read(&cache.k).unwrap(), gpu.read(&cache.v).unwrap());
    for row in 0..g {
        for j in 0..nkv {
            for tok in 0..p {
                let at = ((row * nkv + j) * (p + 1) + tok) * hs;
                let src = tok * w + (nh + j) * hs;
                assert_eq!(&k[at..at + hs], &prompt[src..src + hs], "k row {row} head {j} token {tok}");
                assert_eq!(&v[at..at + hs], &prompt[src + nkv * hs..src + (nkv + 1) * hs], "v row {row} head {j}");
            }
        }
    }
    let e = KvCache::new(gpu, 1, (4, 3), 6, 4).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::Invalid { op: "KvCache::new", .. }), "{e:?}");
    let bad = gpu.upload(&vec![0.0; 3 * nh * hs], &[1, 1, 3 * nh * hs]).unwrap(); // a multi-head qkv
    assert!(matches!(kv_append(gpu, &cache, &bad, 0), Err(Error::Shape { op: "kv_append", what: "qkv", .. })));
}
