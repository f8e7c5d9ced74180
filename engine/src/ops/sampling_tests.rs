//! Sampling tests: the GPU ids against the f64 reference's, id for id, with uniforms kept away from the bin edges
//! where f32 and f64 sums may disagree; the reference's filtering against hand-worked cases; empirical frequencies
//! against the probabilities; log-probs; determinism; bad inputs.

use rand::Rng;

use super::*;
use crate::testing::{assert_close, gpu, random_vec, rng, to_f64};

const OFF: SamplingParams = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0 };

fn params(temperature: f32, top_k: u32, top_p: f32) -> SamplingParams {
    SamplingParams { temperature, top_k, top_p }
}

fn gpu_sample(logits: &[f32], shape: &[usize], u: &[f32], p: SamplingParams) -> Vec<i32> {
    let gpu = gpu();
    let t = gpu.upload(logits, shape).unwrap();
    let tu = gpu.upload(u, &shape[..shape.len() - 1]).unwrap();
    gpu.read_i32(&sample(gpu, &t, &tu, p).unwrap()).unwrap()
}

/// Uniforms for each row that lie at least `gap` (in probability) away from every edge of the row's reference CDF,
/// so that f32 rounding cannot move them to a neighbouring bin.
fn safe_uniforms(logits: &[f32], v: usize, p: SamplingParams, seed: u64, gap: f64) -> Vec<f32> {
    let mut r = rng(seed);
    logits
        .chunks(v)
        .map(|row| {
            let probs = cpu::probabilities(&to_f64(row), p);
            let mut edges = vec![0.0];
            probs.iter().filter(|&&q| q > 0.0).fold(0.0, |acc, q| {
                edges.push(acc + q);
                acc + q
            });
            loop {
                let u: f32 = r.random_range(0.0..1.0);
                if edges.iter().all(|e| (u as f64 - e).abs() > gap) {
                    return u;
                }
            }
        })
        .collect()
}

/// GPU and reference ids agree on `rows` random rows of width `v` (logits scaled by `amp`).
fn check_against_reference(rows: usize, v: usize, amp: f32, p: SamplingParams, seed: u64) {
    let logits: Vec<f32> = random_vec(rows * v, seed).iter().map(|x| x * amp).collect();
    let u = safe_uniforms(&logits, v, p, seed + 1, 1e-4);
    let got = gpu_sample(&logits, &[rows, v], &u, p);
    let want = cpu::sample(&to_f64(&logits), v, &to_f64(&u), p);
    assert_eq!(got, want, "rows {rows} V {v} amp {amp} {p:?}");
}

#[test]
fn greedy_is_argmax_with_ties_to_lowest_id() {
    let logits = [
        0.1, 3.0, -1.0, 3.0, 2.0, // tie at 1 and 3
        -5.0, -4.0, -4.5, -4.0, -6.0, // negative tie
        0.0, -0.0, -1.0, -2.0, -0.0, // +0 and -0 tie
        1.0, 1.0, 1.0, 1.0, 1.0, // all equal
    ];
    let u = [0.5, 0.9, 0.1, 0.99];
    assert_eq!(gpu_sample(&logits, &[4, 5], &u, SamplingParams::GREEDY), vec![1, 1, 0, 0]);
    assert_eq!(cpu::sample(&to_f64(&logits), 5, &to_f64(&u), SamplingParams::GREEDY), vec![1, 1, 0, 0]);
    // top-k = 1 keeps exactly the argmax, ties included, whatever u is.
    for t in [0.5, 1.0, 7.0] {
        assert_eq!(gpu_sample(&logits, &[4, 5], &u, params(t, 1, 1.0)), vec![1, 1, 0, 0], "top-k 1 at T {t}");
    }
    // A tiny top-p keeps only the argmax too.
    assert_eq!(gpu_sample(&logits, &[4, 5], &u, params(1.0, 0, 1e-6)), vec![1, 1, 0, 0]);
}

#[test]
fn greedy_on_random_rows_and_gpt2_vocab() {
    for (rows, v) in [(1, 1), (3, 7), (5, 255), (2, 257), (4, 1000), (3, 50257)] {
        let logits = random_vec(rows * v, v as u64);
        let u = vec![0.5; rows];
        let want = cpu::sample(&to_f64(&logits), v, &to_f64(&u), SamplingParams::GREEDY);
        assert_eq!(gpu_sample(&logits, &[rows, v], &u, SamplingParams::GREEDY), want, "V {v}");
        // top-k 1 at any temperature is greedy.
        assert_eq!(gpu_sample(&logits, &[rows, v], &u, params(1.3, 1, 1.0)), want, "top-k 1, V {v}");
    }
}

#[test]
fn reference_filtering_keeps_exact_prefixes() {
    // Ranking with ties: 2.0 (ids 1, 4), 1.0 (id 0), 0.0 (ids 2, 3).
    let row = [1.0, 2.0, 0.0, 0.0, 2.0];
    assert_eq!(cpu::ranking(&row), vec![1, 4, 0, 2, 3]);
    let kept = |p| cpu::kept_weights(&row, p).iter().map(|&w| w > 0.0).collect::<Vec<_>>();
    assert_eq!(kept(params(1.0, 1, 1.0)), [false, true, false, false, false]);
    assert_eq!(kept(params(1.0, 4, 1.0)), [true, true, true, false, true]);
    // Weights e^0, e^0, e^-1, e^-2, e^-2; total 2.6384. Shortest prefix with mass >= p·total.
    assert_eq!(kept(params(1.0, 0, 0.3)), [false, true, false, false, false]); // 1 >= 0.79
    assert_eq!(kept(params(1.0, 0, 0.5)), [false, true, false, false, true]); // 2 >= 1.32
    assert_eq!(kept(params(1.0, 0, 0.9)), [true, true, true, false, true]); // 2.503 >= 2.375
                                                                            // top-p applies to the top-k set's mass: top-2 has mass 2, p 0.6 needs 1.2, so both stay.
    assert_eq!(kept(params(1.0, 2, 0.6)), [false, true, false, false, true]);
    // Temperature reshapes mass: at T = 0.25 the two maxima hold 0.98 of it.
    assert_eq!(kept(params(0.25, 0, 0.95)), [false, true, false, false, true]);
}

#[test]
fn filters_with_ties_match_reference_on_gpu() {
    // Integer-valued logits tie a lot; every u is drawn away from the bin edges.
    let (rows, v) = (16, 40);
    let logits: Vec<f32> = random_vec(rows * v, 7).iter().map(|x| (x * 3.0).round()).collect();
    for p in [params(1.0, 5, 1.0), params(1.0, 13, 1.0), params(0.7, 0, 0.5), params(1.0, 7, 0.8), params(2.0, 0, 0.95)]
    {
        let u = safe_uniforms(&logits, v, p, 8, 1e-4);
        let got = gpu_sample(&logits, &[rows, v], &u, p);
        assert_eq!(got, cpu::sample(&to_f64(&logits), v, &to_f64(&u), p), "{p:?}");
        // Every id drawn is in the reference's kept set.
        for (row, &id) in logits.chunks(v).zip(&got) {
            assert!(cpu::kept_weights(&to_f64(row), p)[id as usize] > 0.0, "{p:?} drew a dropped token");
        }
    }
}

/// `p` with top_p moved up until, in every row, the tokens whose inclusion f32 rounding could flip hold at most
/// gap / 3 of the probability: those that follow a rank-order prefix whose mass lies within `gap` of top_p. In a
/// dense tail of tiny probabilities no top_p is free of such prefixes, but the tokens there cannot move a u drawn
/// `gap` away from the reference's bin edges into another bin.
fn safe_top_p(logits: &[f32], v: usize, mut p: SamplingParams, gap: f64) -> SamplingParams {
    if p.top_p >= 1.0 {
        return p;
    }
    let risky = |p: SamplingParams| {
        logits.chunks(v).any(|row| {
            let row = to_f64(row);
            let w = cpu::kept_weights(&row, SamplingParams { top_p: 1.0, ..p });
            let total: f64 = w.iter().sum();
            let (mut acc, mut flippable) = (0.0, 0.0);
            for j in cpu::ranking(&row) {
                if (acc / total - p.top_p as f64).abs() < gap {
                    flippable += w[j] / total;
                }
                acc += w[j];
            }
            flippable > gap / 3.0
        })
    };
    while risky(p) {
        p.top_p += 3.0 * gap as f32;
        assert!(p.top_p < 1.0, "no safe top_p for {p:?}");
    }
    p
}

#[test]
fn large_kept_sets_and_heavy_ties_match_reference() {
    // 17 distinct values over 4099 tokens: ~240 tokens tie at every threshold. top-k above and below CAP (512)
    // exercises the searches over the row and over workgroup memory, and both tie cuts. Kept sets of thousands of
    // tokens put prefix masses and CDF edges ~2e-4 apart, so the margins are tighter than elsewhere but still far
    // above the f32 error: the GPU's masses sum 17 terms per invocation, 8 tree levels and 256 chunk sums, each
    // rounding ≤ 2^-24 relative: ≤ 300 · 6e-8 ≈ 2e-5 in all, and the exps add a few ulps per term.
    // Three rows, each repeated 16 times with its own u: a kept set off by one token shifts most CDF edges.
    let (rows, v) = (48, 4099);
    let base = random_vec(3 * v, 21);
    let logits: Vec<f32> =
        (0..rows).flat_map(|r| base[(r % 3) * v..][..v].iter().map(|x| (x * 8.0).round() / 2.0)).collect();
    let cases = [
        params(1.0, 100, 1.0),
        params(1.0, 300, 1.0),
        params(1.0, 600, 1.0),
        params(2.0, 2000, 1.0),
        params(1.0, 0, 0.3),
        params(3.0, 0, 0.9),
        params(0.5, 0, 0.95),
        params(1.0, 300, 0.5),
        params(1.5, 1500, 0.8),
    ];
    for (i, &p) in cases.iter().enumerate() {
        let p = safe_top_p(&logits, v, p, 3e-5);
        let u = safe_uniforms(&logits, v, p, 30 + i as u64, 5e-5);
        let got = gpu_sample(&logits, &[rows, v], &u, p);
        assert_eq!(got, cpu::sample(&to_f64(&logits), v, &to_f64(&u), p), "{p:?}");
    }
}

#[test]
fn minus_infinity_logits_are_never_drawn() {
    // 2/3 of the vocabulary masked with -inf, top-k larger than the finite count so the kept set includes masked
    // tokens of weight 0.
    let (rows, v) = (4, 3000);
    let mut logits = random_vec(rows * v, 31);
    logits.iter_mut().enumerate().filter(|(i, _)| i % 3 != 1).for_each(|(_, x)| *x = f32::NEG_INFINITY);
    for p in [OFF, params(1.0, 1500, 1.0), params(1.0, 0, 0.9), params(0.5, 2500, 0.95), SamplingParams::GREEDY] {
        let u = safe_uniforms(&logits, v, p, 32, 1e-4);
        let got = gpu_sample(&logits, &[rows, v], &u, p);
        assert!(got.iter().all(|&id| id % 3 == 1), "{p:?} drew a masked token: {got:?}");
        assert_eq!(got, cpu::sample(&to_f64(&logits), v, &to_f64(&u), p), "{p:?}");
    }
}

#[test]
fn many_uniforms_on_a_known_distribution_match_reference() {
    // One distribution repeated over 200 rows, each with its own u: the GPU walks the whole CDF.
    let probs = [0.05, 0.3, 0.0, 0.15, 0.25, 0.05, 0.2];
    let row: Vec<f32> = probs.iter().map(|&q: &f64| if q > 0.0 { q.ln() as f32 } else { f32::NEG_INFINITY }).collect();
    let rows = 200;
    let logits: Vec<f32> = row.iter().cycle().take(rows * row.len()).cloned().collect();
    for p in [OFF, params(1.0, 3, 1.0), params(1.0, 0, 0.7), params(0.5, 4, 0.9)] {
        let u = safe_uniforms(&logits, row.len(), p, 3, 1e-4);
        let got = gpu_sample(&logits, &[rows, row.len()], &u, p);
        assert_eq!(got, cpu::sample(&to_f64(&logits), row.len(), &to_f64(&u), p), "{p:?}");
        assert!(got.iter().all(|&id| id != 2), "a token of probability 0 was drawn");
    }
}

#[test]
fn sampling_matches_reference_on_wide_rows() {
    for (case, (rows, v)) in [(3, 5), (4, 255), (2, 257), (3, 4099)].into_iter().enumerate() {
        let seed = 10 * case as u64;
        check_against_reference(rows, v, 4.0, OFF, seed);
        check_against_reference(rows, v, 4.0, params(0.8, 3, 1.0), seed + 2);
        check_against_reference(rows, v, 4.0, params(1.5, 0, 0.6), seed + 4);
        check_against_reference(rows, v, 8.0, params(1.0, 20, 0.9), seed + 6);
    }
}

#[test]
fn gpt2_vocab_rows_match_reference() {
    // Peaky logits (amp 12) like a trained model's, so top-p keeps a few hundred of the 50257 tokens.
    let v = 50257;
    check_against_reference(2, v, 12.0, params(1.0, 50, 1.0), 40);
    check_against_reference(2, v, 12.0, params(0.9, 0, 0.95), 41);
    check_against_reference(2, v, 12.0, params(1.0, 40, 0.9), 42);
}

#[test]
fn temperature_reshapes_the_distribution() {
    // Three tokens; for each temperature, the u just below and above the reference's first edge land on either
    // side of it. T = 0.25 puts 0.98 on the max, T = 4 spreads it almost evenly.
    let row = [0.0f32, 1.0, -0.5];
    for t in [0.25f32, 1.0, 4.0] {
        let p = params(t, 0, 1.0);
        let probs = cpu::probabilities(&to_f64(&row), p);
        let e1 = probs[0];
        let u = [e1 - 1e-3, e1 + 1e-3, e1 + probs[1] + 1e-3];
        let logits: Vec<f32> = row.iter().cycle().take(9).cloned().collect();
        let got = gpu_sample(&logits, &[3, 3], &u.map(|x| x as f32), p);
        assert_eq!(got, vec![0, 1, 2], "T {t}: probabilities {probs:?}");
    }
}

#[test]
fn empirical_frequencies_match_probabilities() {
    // 2000 draws from one 5-token distribution in a single launch; each count within 4.5 standard errors.
    let probs = [0.4, 0.25, 0.15, 0.12, 0.08];
    let row: Vec<f32> = probs.iter().map(|&q: &f64| q.ln() as f32 + 3.0).collect();
    let n = 2000;
    let logits: Vec<f32> = row.iter().cycle().take(n * 5).cloned().collect();
    let mut r = rng(77);
    let u: Vec<f32> = (0..n).map(|_| r.random_range(0.0..1.0)).collect();
    for p in [OFF, params(1.0, 3, 1.0), params(1.0, 0, 0.75)] {
        let want = cpu::probabilities(&to_f64(&row), p);
        let ids = gpu_sample(&logits, &[n, 5], &u, p);
        for (tok, &q) in want.iter().enumerate() {
            let count = ids.iter().filter(|&&id| id == tok as i32).count() as f64;
            let sd = (n as f64 * q * (1.0 - q)).sqrt();
            assert!((count - n as f64 * q).abs() <= 4.5 * sd + 1e-9, "{p:?}: token {tok} drawn {count}/{n}, p {q}");
        }
    }
}

#[test]
fn rows_fold_past_65535_workgroups() {
    // 65537 rows exceed 65535 workgroups in x, so the row index is folded over y. Greedy, since a sampled row costs
    // a software GPU about ten times more.
    let (rows, v) = (65_537, 2);
    let logits = random_vec(rows * v, 5);
    let u = vec![0.5; rows];
    let p = SamplingParams::GREEDY;
    let got = gpu_sample(&logits, &[rows, v], &u, p);
    assert_eq!(got, cpu::sample(&to_f64(&logits), v, &to_f64(&u), p));
}

#[test]
fn sampling_is_deterministic() {
    let (rows, v) = (4, 50257);
    let logits: Vec<f32> = random_vec(rows * v, 9).iter().map(|x| (x * 40.0).round() / 4.0).collect(); // ties
    let u = [0.3, 0.8, 0.01, 0.99];
    for p in [params(1.0, 100, 0.9), params(0.7, 0, 0.5), params(1.0, 0, 1.0)] {
        let first = gpu_sample(&logits, &[rows, v], &u, p);
        for _ in 0..3 {
            assert_eq!(gpu_sample(&logits, &[rows, v], &u, p), first, "{p:?}");
        }
    }
}

#[test]
fn token_logprobs_match_reference() {
    let gpu = gpu();
    for (rows, v) in [(1, 1), (3, 7), (4, 300), (2, 50257)] {
        let logits: Vec<f32> = random_vec(rows * v, v as u64).iter().map(|x| x * 10.0).collect();
        let ids: Vec<i32> = (0..rows).map(|i| ((i * 7919) % v) as i32).collect();
        let t = gpu.upload(&logits, &[rows, v]).unwrap();
        let got = gpu.read(&token_logprobs(gpu, &t, &gpu.upload_i32(&ids, &[rows]).unwrap()).unwrap()).unwrap();
        // The loss kernel's sum of exps rounds V/256 times per invocation and 8 times in its tree (plus a few ulps
        // per exp), log turns that relative error into an absolute one, and lse and the difference (|x| <= ~25)
        // round once each: (V/256 + 64) · f32::EPSILON covers it with a factor of 2 to spare.
        let want = cpu::token_logprobs(&to_f64(&logits), v, &ids);
        let atol = (v as f64 / 256.0 + 64.0) * f32::EPSILON as f64;
        assert_close(&got, &want, 0.0, atol, &format!("V {v}"));
    }
    // Leading dims [B, T], an out-of-range id (NaN) and padding (IGNORE_INDEX: 0).
    let logits = random_vec(2 * 3 * 5, 1);
    let ids = [0, 4, 2, 5, -1, 3];
    let t = gpu.upload(&logits, &[2, 3, 5]).unwrap();
    let got = gpu.read(&token_logprobs(gpu, &t, &gpu.upload_i32(&ids, &[2, 3]).unwrap()).unwrap()).unwrap();
    let want = cpu::token_logprobs(&to_f64(&logits), 5, &ids);
    assert!(got[3].is_nan() && want[3].is_nan());
    assert_eq!((got[4], want[4]), (0.0, 0.0));
    let keep = [0, 1, 2, 5];
    let pick = |x: &[f32]| keep.iter().map(|&i| x[i]).collect::<Vec<_>>();
    assert_close(&pick(&got), &keep.map(|i| want[i]), 1e-6, 1e-6, "[B, T] logprobs");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let gpu = gpu();
    let logits = gpu.upload(&random_vec(12, 0), &[3, 4]).unwrap();
    let u = gpu.upload(&[0.1, 0.2, 0.3], &[3]).unwrap();
    let ids = gpu.upload_i32(&[0, 1, 2], &[3]).unwrap();
    let is_invalid = |r: Result<Tensor>| matches!(r, Err(Error::Invalid { op: "sample", .. }));
    for t in [-1.0, f32::NAN, f32::INFINITY] {
        assert!(is_invalid(sample(gpu, &logits, &u, params(t, 0, 1.0))), "temperature {t}");
    }
    for top_p in [0.0, -0.5, 1.5, f32::NAN] {
        assert!(is_invalid(sample(gpu, &logits, &u, params(1.0, 0, top_p))), "top_p {top_p}");
    }
    let u2 = gpu.upload(&[0.1, 0.2], &[2]).unwrap();
    assert!(matches!(sample(gpu, &logits, &u2, OFF), Err(Error::Shape { op: "sample", what: "u", .. })));
    assert!(matches!(sample(gpu, &logits, &ids, OFF), Err(Error::DType { op: "sample", what: "u", .. })));
    assert!(matches!(sample(gpu, &ids, &u, OFF), Err(Error::DType { op: "sample", what: "logits", .. })));
    let flat = gpu.upload(&random_vec(4, 0), &[4]).unwrap();
    let one = gpu.upload(&[0.5], &[1]).unwrap();
    assert!(matches!(sample(gpu, &flat, &one, OFF), Err(Error::Shape { op: "sample", what: "logits", .. })));
    let op = "token_logprobs";
    assert!(matches!(token_logprobs(gpu, &logits, &u), Err(Error::DType { op: o, what: "ids", .. }) if o == op));
    let ids2 = gpu.upload_i32(&[0, 1], &[2]).unwrap();
    assert!(matches!(token_logprobs(gpu, &logits, &ids2), Err(Error::Shape { op: o, what: "ids", .. }) if o == op));
}
