//! Tests of the RL objectives (`policy.rs`): the policy loss against its f64 reference and, through the tape, its
//! gradient against finite differences; entropy and KL rows against theirs.

use rand::Rng;

use super::*;
use crate::autograd::{Param, Tape};
use crate::ops::loss;
use crate::ops::norm::tests::{assert_within, FD_ATOL, FD_H, FD_RTOL, FLUSH, U};
use crate::testing::{assert_close, assert_close_f64, gpu, numeric_gradient, random_vec, rng, to_f64};

const GPT2_VOCAB: usize = 50257;

/// Per-token inputs of `policy_loss`, as uploaded (f32).
struct Batch {
    losses: Vec<f32>,
    old: Vec<f32>,
    refp: Vec<f32>,
    adv: Vec<f32>,
    scale: Vec<f32>,
}

impl Batch {
    fn upload(&self) -> [Tensor; 5] {
        let gpu = gpu();
        let n = self.losses.len();
        [&self.losses, &self.old, &self.refp, &self.adv, &self.scale].map(|v| gpu.upload(v, &[n]).unwrap())
    }

    fn run(&self, cfg: PolicyLossConfig) -> (Vec<f32>, Vec<f32>) {
        let gpu = gpu();
        let [l, o, r, a, s] = self.upload();
        let pl = policy_loss(gpu, &l, &o, &r, &a, &s, cfg).unwrap();
        assert_eq!((pl.weights.shape(), pl.totals.shape()), (&[self.losses.len()][..], &[3][..]));
        (gpu.read(&pl.weights).unwrap(), gpu.read(&pl.totals).unwrap())
    }

    fn reference(&self, cfg: PolicyLossConfig) -> (Vec<f64>, [f64; 3]) {
        let [l, o, r, a, s] = [&self.losses, &self.old, &self.refp, &self.adv, &self.scale].map(|v| to_f64(v));
        cpu::policy_loss(&l, &o, &r, &a, &s, cfg.clip_eps.map(f64::from), cfg.beta as f64)
    }
}

/// Log-probs in [-6, -0.01]; ratios exp(±0.5), never within 1e-3 of a clip edge 1 ± `eps` (there f32 and f64 may
/// disagree on which side wins); log-ratios to the reference both tiny (the series branch of k3) and up to ±1.5;
/// advantages of both signs with some exactly 0; a quarter of the tokens masked, holding garbage (1e30, NaN) that
/// must not leak; the rest scaled by 1/(unmasked count).
fn random_batch(n: usize, eps: f32, seed: u64) -> Batch {
    let mut r = rng(seed);
    let mut b = Batch { losses: vec![], old: vec![], refp: vec![], adv: vec![], scale: vec![] };
    for _ in 0..n {
        if r.random_bool(0.25) {
            b.losses.push(1e30);
            b.old.push(0.0);
            b.refp.push(f32::NAN);
            b.adv.push(f32::NAN);
            b.scale.push(0.0);
            continue;
        }
        let logp = -r.random_range(0.01f32..6.0);
        let old = loop {
            let old = logp - r.random_range(-0.5f32..0.5);
            let ratio = ((logp - old) as f64).exp();
            if (ratio - (1.0 + eps as f64)).abs() > 1e-3 && (ratio - (1.0 - eps as f64)).abs() > 1e-3 {
                break old;
            }
        };
        let d = if r.random_bool(0.5) { r.random_range(-0.05f32..0.05) } else { r.random_range(-1.5f32..1.5) };
        b.losses.push(-logp);
        b.old.push(old);
        b.refp.push(logp + d);
        b.adv.push(if r.random_bool(0.1) { 0.0 } else { r.random_range(-2.0f32..2.0) });
        b.scale.push(1.0);
    }
    let unmasked = b.scale.iter().filter(|&&s| s != 0.0).count().max(1);
    b.scale.iter_mut().filter(|s| **s != 0.0).for_each(|s| *s = 1.0 / unmasked as f32);
    b
}

/// Per token, the magnitudes its rounding errors scale with: (|r·A|, e^d + |d| + 1) — the exp and the terms of k3
/// before they cancel; (0, 0) for masked tokens.
fn magnitudes(b: &Batch) -> Vec<(f64, f64)> {
    (0..b.losses.len())
        .map(|i| {
            if b.scale[i] == 0.0 {
                return (0.0, 0.0);
            }
            let logp = -(b.losses[i] as f64);
            let d = b.refp[i] as f64 - logp;
            (((logp - b.old[i] as f64).exp() * b.adv[i] as f64).abs(), d.exp() + d.abs() + 1.0)
        })
        .collect()
}

fn check_policy(n: usize, cfg: PolicyLossConfig, seed: u64) {
    crate::testing::each_row_reduction(|| check_policy_one(n, cfg, seed));
}

fn check_policy_one(n: usize, cfg: PolicyLossConfig, seed: u64) {
    let b = random_batch(n, cfg.clip_eps.unwrap_or(0.2), seed);
    let (w, totals) = b.run(cfg);
    let (want_w, want_t) = b.reference(cfg);
    let what = format!("policy_loss n={n} {cfg:?}");
    for (i, &s) in b.scale.iter().enumerate() {
        if s == 0.0 {
            assert_eq!(w[i].to_bits(), 0, "{what}: masked token {i} has weight {}", w[i]);
        }
    }
    // Per token: the f32 log-ratio (one rounding), exp (Vulkan allows 3 + 2|x| ulp), the product by A, the
    // penalty's terms and the final products: well under 32 roundings of the magnitudes involved.
    let beta = cfg.beta as f64;
    let mag = magnitudes(&b);
    let scaled: Vec<f64> = mag.iter().zip(&b.scale).map(|((ra, kl), &s)| s as f64 * (ra + beta * kl)).collect();
    let bound: Vec<f64> = scaled.iter().map(|m| 32.0 * U * m + FLUSH).collect();
    assert_within(&w, &want_w, &bound, &format!("{what} weights"));
    // Totals: a tree of depth log2(n) + 1 (the partials' pass) over per-token values carrying the error above.
    let depth = (n as f64).log2().ceil() + 2.0;
    let obj_bound = (depth + 32.0) * U * scaled.iter().sum::<f64>() + FLUSH;
    assert_within(&totals[..1], &want_t[..1], &[obj_bound], &format!("{what} Σ objective"));
    let k3_bound = (depth + 32.0) * U * mag.iter().map(|m| m.1).sum::<f64>() + FLUSH;
    assert_within(&totals[1..2], &want_t[1..2], &[k3_bound], &format!("{what} Σ k3"));
    assert_eq!(totals[2] as f64, want_t[2], "{what}: clipped count");
}

#[test]
fn policy_loss_matches_reference() {
    let configs = [
        PolicyLossConfig { clip_eps: Some(0.2), beta: 0.0 },
        PolicyLossConfig { clip_eps: Some(0.2), beta: 0.1 },
        PolicyLossConfig { clip_eps: None, beta: 0.0 },
        PolicyLossConfig { clip_eps: None, beta: 0.1 },
    ];
    // 100_003 tokens make 391 partial sums, more than the totals kernel's 256 threads take in one stride.
    for (i, &n) in [1, 7, 257, 10_007, 100_003].iter().enumerate() {
        for (j, &cfg) in configs.iter().enumerate() {
            check_policy(n, cfg, (10 * i + j) as u64);
        }
    }
    // The data must exercise both clip sides: A > 0 with r > 1 + ε and A < 0 with r < 1 − ε.
    let b = random_batch(10_007, 0.2, 30);
    let (mut high, mut low) = (0, 0);
    for i in (0..b.losses.len()).filter(|&i| b.scale[i] != 0.0) {
        let r = (-(b.losses[i] as f64) - b.old[i] as f64).exp();
        high += (b.adv[i] > 0.0 && r > 1.2) as usize;
        low += (b.adv[i] < 0.0 && r < 0.8) as usize;
    }
    assert!(high > 100 && low > 100, "clip sides: {high} above, {low} below");
    let (_, totals) = b.run(PolicyLossConfig { clip_eps: Some(0.2), beta: 0.0 });
    assert_eq!(totals[2] as usize, high + low);
}

#[test]
fn policy_loss_is_bit_reproducible() {
    let b = random_batch(100_003, 0.2, 40);
    let cfg = PolicyLossConfig { clip_eps: Some(0.2), beta: 0.1 };
    let bits = |(w, t): (Vec<f32>, Vec<f32>)| w.iter().chain(&t).map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(b.run(cfg)), bits(b.run(cfg)));
}

/// logp of each row's target, in f64 from the f32 logits.
fn logp_rows(x: &[f64], targets: &[i32], v: usize) -> Vec<f64> {
    loss::cpu::cross_entropy(x, targets, v).0.iter().map(|l| -l).collect()
}

#[test]
fn grpo_loss_and_gradient_match_reference_on_hand_made_batch() {
    // 8 tokens over V = 11. Ratios r and advantages A per token, ε = 0.2:
    //   0: r 1.1,  A +1    inside the band
    //   1: r 1.5,  A +1    clipped (the clamp 1.2·A is the min)
    //   2: r 0.9,  A −1    inside
    //   3: r 0.6,  A −1    clipped (0.8·A is the min)
    //   4: r 1.05, A +0.5  inside; its reference log-ratio −0.6 takes k3's exp branch
    //   5: masked (scale 0, a prompt token) holding garbage
    //   6: r 1.4,  A −0.7  outside the band but unclipped: r·A is already the min, the gradient flows
    //   7: r 0.7,  A +0.8  likewise
    let (n, v) = (8, 11);
    let gpu = gpu();
    let x32: Vec<f32> = random_vec(n * v, 500).iter().map(|a| 2.0 * a).collect();
    let x = to_f64(&x32);
    let targets = [3, 0, 10, 5, 7, 2, 9, 1];
    let logp = logp_rows(&x, &targets, v);
    let ratio = [1.1, 1.5, 0.9, 0.6, 1.05, 1.0, 1.4, 0.7];
    let adv = [1.0, 1.0, -1.0, -1.0, 0.5, 1e30, -0.7, 0.8];
    let d = [0.3, -0.2, 0.1, 0.4, -0.6, 0.0, 0.25, -0.15];
    let old: Vec<f32> = (0..n).map(|i| if i == 5 { 0.0 } else { (logp[i] - f64::ln(ratio[i])) as f32 }).collect();
    let refp: Vec<f32> = (0..n).map(|i| if i == 5 { f32::NAN } else { (logp[i] + d[i]) as f32 }).collect();
    let adv32: Vec<f32> = adv.iter().map(|&a| a as f32).collect();
    let scale: Vec<f32> = (0..n).map(|i| if i == 5 { 0.0 } else { 1.0 / 7.0 }).collect();
    let (old64, ref64, adv64, scale64) = (to_f64(&old), to_f64(&refp), to_f64(&adv32), to_f64(&scale));
    let tt = gpu.upload_i32(&targets, &[n]).unwrap();
    let inputs = [&old, &refp, &adv32, &scale].map(|v| gpu.upload(v, &[n]).unwrap());
    let eps = 0.2;
    let objective =
        |l: &[f64], beta: f64| cpu::policy_objective(l, v, &targets, &old64, &ref64, &adv64, &scale64, Some(eps), beta);
    for beta32 in [0.0f32, 0.05] {
        let beta = beta32 as f64;
        let what = format!("hand-made GRPO batch, beta {beta}");
        // The reference weights fed to the reference cross-entropy backward match finite differences.
        let (losses, lse) = loss::cpu::cross_entropy(&x, &targets, v);
        let (want_w, want_t) = cpu::policy_loss(&losses, &old64, &ref64, &adv64, &scale64, Some(eps), beta);
        let want_dx = loss::cpu::cross_entropy_backward(&x, &targets, &lse, &want_w, v);
        let fd = numeric_gradient(|l| objective(l, beta), &x, FD_H);
        assert_close_f64(&want_dx, &fd, FD_RTOL, FD_ATOL, &format!("{what}: reference gradient"));
        assert_eq!(want_t[2], 2.0);

        // The GPU, through the tape: logits → cross-entropy → policy weights → weighted sum → backward.
        let p = Param::new(gpu, "logits", gpu.upload(&x32, &[n, v]).unwrap()).unwrap();
        let mut tape = Tape::new(gpu);
        let xv = tape.param(&p);
        let lv = tape.cross_entropy(xv, &tt).unwrap();
        let [o, r, a, s] = &inputs;
        let cfg = PolicyLossConfig { clip_eps: Some(eps as f32), beta: beta32 };
        let pl = policy_loss(gpu, tape.value(lv), o, r, a, s, cfg).unwrap();
        let loss = tape.weighted_sum(lv, &pl.weights).unwrap();
        tape.backward(loss).unwrap();
        let totals = gpu.read(&pl.totals).unwrap();
        let w = gpu.read(&pl.weights).unwrap();
        let dx = gpu.read(&p.grad).unwrap();

        assert_eq!(totals[2], 2.0, "{what}: tokens 1 and 3 clip, and only they");
        // Weights and sums of O(0.1) terms, dlogits = w·(softmax − onehot): each a few f32 roundings (~1e-7
        // relative) of inputs that are themselves exact; the finite differences err by ~1e-10.
        assert_close(&w, &want_w, 4e-6, 1e-8, &format!("{what}: weights"));
        assert_close(&totals[..1], &[objective(&x, beta)], 4e-6, 1e-8, &format!("{what}: Σ objective"));
        assert_close(&totals[1..2], &[want_t[1]], 4e-6, 1e-8, &format!("{what}: Σ k3"));
        assert_close(&dx, &fd, 4e-6, 1e-8, &format!("{what}: dlogits vs finite differences"));
        let row = |i: usize| &dx[i * v..(i + 1) * v];
        assert!(row(5).iter().all(|&g| g == 0.0), "{what}: masked row {:?}", row(5));
        for i in [1, 3] {
            if beta == 0.0 {
                assert!(row(i).iter().all(|&g| g == 0.0), "{what}: clipped row {i} {:?}", row(i));
            } else {
                // Only the KL penalty's gradient: weight s·β·(exp(d) − 1), d = ref − logp.
                let wk = scale64[i] * beta * (ref64[i] - logp[i]).exp_m1();
                let (_, lse_i) = loss::cpu::cross_entropy(&x[i * v..(i + 1) * v], &targets[i..i + 1], v);
                let want =
                    loss::cpu::cross_entropy_backward(&x[i * v..(i + 1) * v], &targets[i..i + 1], &lse_i, &[wk], v);
                assert!(row(i).iter().any(|&g| g != 0.0), "{what}: clipped row {i} lost its KL gradient");
                assert_close(row(i), &want, 4e-6, 1e-8, &format!("{what}: clipped row {i}"));
            }
        }
        for i in [0, 2, 4, 6, 7] {
            assert!(row(i).iter().any(|&g| g != 0.0), "{what}: row {i} has no gradient");
        }
    }
}

#[test]
fn zero_advantage_weight_is_exactly_zero_until_the_penalty_is_on() {
    // Three tokens with A = 0 whose policy differs from the reference (d = 0.3, −0.7, 2.0), one with A = 1.
    let b = Batch {
        losses: vec![1.0, 2.0, 2.5, 1.5],
        old: vec![-1.1, -1.9, -2.5, -1.5],
        refp: vec![-0.7, -2.7, -0.5, -1.5],
        adv: vec![0.0, 0.0, 0.0, 1.0],
        scale: vec![0.25; 4],
    };
    let (w0, t0) = b.run(PolicyLossConfig { clip_eps: Some(0.2), beta: 0.0 });
    assert_eq!(&w0[..3], &[0.0; 3], "A = 0 and β = 0 give no gradient");
    assert_eq!(w0[3], 0.25, "A = 1 at ratio 1: weight s·r·A");
    let cfg = PolicyLossConfig { clip_eps: Some(0.2), beta: 0.1 };
    let (w1, t1) = b.run(cfg);
    let (want, _) = b.reference(cfg);
    for i in 0..3 {
        assert!(w1[i] != 0.0, "β > 0 with ref ≠ logp must move token {i}: {w1:?}");
    }
    assert_close(&w1, &want, 1e-6, 1e-8, "zero-advantage weights with β = 0.1");
    // The penalty's sign: weight = s·β·(exp(d) − 1) pushes logp towards the reference.
    assert!(w1[0] > 0.0 && w1[1] < 0.0 && w1[2] > 0.0, "{w1:?}");
    // Σ k3 is reported whatever β; the objective includes it only when β > 0.
    assert_eq!(t0[1], t1[1]);
    assert!(t1[0] > t0[0]);
}

#[test]
fn policy_loss_bad_inputs_are_typed_errors() {
    let gpu = gpu();
    let f = |n: usize| gpu.upload(&vec![0.5; n], &[n]).unwrap();
    let (l, good, short) = (f(5), f(5), f(4));
    let ok = PolicyLossConfig { clip_eps: Some(0.2), beta: 0.1 };
    // A different shape with the same element count is accepted ([B, T] losses with flat weights).
    let l23 = gpu.upload(&[0.5; 6], &[2, 3]).unwrap();
    let (f6, s) = (f(6), 6);
    assert!(policy_loss(gpu, &l23, &f6, &f6, &f6, &f6, ok).is_ok_and(|p| p.weights.shape() == [s]));
    for (k, what) in ["old_logp", "ref_logp", "adv", "scale"].iter().enumerate() {
        let mut args = [&good, &good, &good, &good];
        args[k] = &short;
        let e = policy_loss(gpu, &l, args[0], args[1], args[2], args[3], ok).expect_err("must be refused");
        assert!(e.to_string().contains(what), "{e}");
        assert!(matches!(e, Error::Shape { op: "policy_loss", what: w, .. } if w == *what), "{e:?}");
    }
    let e = policy_loss(gpu, &short, &good, &good, &good, &good, ok).expect_err("losses of 4, the rest 5");
    assert!(matches!(e, Error::Shape { what: "old_logp", .. }), "{e:?}");
    let ints = gpu.upload_i32(&[0; 5], &[5]).unwrap();
    let e = policy_loss(gpu, &l, &good, &good, &good, &ints, ok).expect_err("I32 scale");
    assert!(matches!(e, Error::DType { op: "policy_loss", what: "scale", .. }), "{e:?}");
    let bad = [
        PolicyLossConfig { clip_eps: Some(0.0), beta: 0.1 },
        PolicyLossConfig { clip_eps: Some(-0.2), beta: 0.1 },
        PolicyLossConfig { clip_eps: Some(f32::NAN), beta: 0.1 },
        PolicyLossConfig { clip_eps: Some(f32::INFINITY), beta: 0.1 },
        PolicyLossConfig { clip_eps: None, beta: f32::NAN },
        PolicyLossConfig { clip_eps: None, beta: -0.1 },
        PolicyLossConfig { clip_eps: Some(0.2), beta: f32::INFINITY },
    ];
    for cfg in bad {
        let e = policy_loss(gpu, &l, &good, &good, &good, &good, cfg).expect_err("must be refused");
        assert!(matches!(e, Error::Invalid { op: "policy_loss", .. }), "{cfg:?}: {e:?}");
    }
}

/// Entropy and KL of `rows` × `v` logits in ±`scale` against the references; q is p plus `q_noise` times fresh
/// noise, or independent logits of the same spread when `q_noise` is None.
fn check_rows(rows: usize, v: usize, scale: f32, q_noise: Option<f32>, seed: u64) {
    crate::testing::each_row_reduction(|| check_rows_one(rows, v, scale, q_noise, seed));
}

fn check_rows_one(rows: usize, v: usize, scale: f32, q_noise: Option<f32>, seed: u64) {
    let gpu = gpu();
    let x: Vec<f32> = random_vec(rows * v, seed).iter().map(|a| a * scale).collect();
    let y: Vec<f32> = match q_noise {
        Some(k) => x.iter().zip(random_vec(rows * v, seed + 1)).map(|(a, b)| a + k * b).collect(),
        None => random_vec(rows * v, seed + 1).iter().map(|a| a * scale).collect(),
    };
    let (tx, ty) = (gpu.upload(&x, &[rows, v]).unwrap(), gpu.upload(&y, &[rows, v]).unwrap());
    let h = token_entropy(gpu, &tx).unwrap();
    let kl = kl_rows(gpu, &tx, &ty).unwrap();
    assert_eq!((h.shape(), kl.shape()), (&[rows][..], &[rows][..]));
    let (xd, yd) = (to_f64(&x), to_f64(&y));
    let what = format!("rows={rows} v={v} scale={scale} q_noise={q_noise:?}");
    // Per row, what the kernels round: the shifted logits z = x − max (u·|z| each), then exp, the sums and the logs
    // (a few ulp of their magnitudes). Hence bounds of 8u times ln S + E_p|z| (entropy) and ln Sx + ln Sy +
    // E_p(|zx| + |zy|) (KL), plus the sums' own rounding, whose random-signed errors grow like the square root of
    // the terms each thread adds plus the tree's depth (the worst case, (V/256 + 8)·u, is ~100 times what occurs).
    let sum_err = 4.0 * (v as f64 / 256.0 + 8.0).sqrt() * U;
    let (mut h_bound, mut kl_bound) = (Vec::new(), Vec::new());
    for (px, py) in xd.chunks(v).zip(yd.chunks(v)) {
        let shifted = |r: &[f64]| {
            let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            r.iter().map(|a| a - m).collect::<Vec<_>>()
        };
        let (zx, zy) = (shifted(px), shifted(py));
        let (sx, sy) = (zx.iter().map(|z| z.exp()).sum::<f64>(), zy.iter().map(|z| z.exp()).sum::<f64>());
        let e_abs = |z: &[f64]| zx.iter().zip(z).map(|(a, b)| a.exp() / sx * b.abs()).sum::<f64>();
        h_bound.push(8.0 * U * (sx.ln() + e_abs(&zx)) + sum_err);
        kl_bound.push(8.0 * U * (sx.ln() + sy.ln() + e_abs(&zx) + e_abs(&zy)) + 2.0 * sum_err);
    }
    assert_within(&gpu.read(&h).unwrap(), &cpu::token_entropy(&xd, v), &h_bound, &format!("entropy {what}"));
    let kl = gpu.read(&kl).unwrap();
    assert_within(&kl, &cpu::kl_rows(&xd, &yd, v), &kl_bound, &format!("kl {what}"));
    assert!(kl.iter().all(|&k| k >= -1e-6), "{what}: negative KL {kl:?}");
}

#[test]
fn entropy_and_kl_match_reference() {
    for (i, &(rows, v)) in [(1, 1), (3, 5), (7, 257), (2, GPT2_VOCAB)].iter().enumerate() {
        check_rows(rows, v, 4.0, None, 600 + 10 * i as u64);
        // A policy close to its reference: KL ~ 4e-4, where the cancellation of f32 terms of size ln V shows first.
        check_rows(rows, v, 4.0, Some(0.05), 601 + 10 * i as u64);
    }
    // Logits in ±100: exp overflows f32 past 88.7, so only the max subtraction keeps these finite.
    check_rows(17, 769, 100.0, None, 650);
    check_rows(2, GPT2_VOCAB, 100.0, Some(1.0), 651);
}

#[test]
fn entropy_and_kl_special_rows() {
    let gpu = gpu();
    for v in [1, 7, 256, GPT2_VOCAB] {
        // Uniform rows (at an offset: only differences matter) have entropy ln V; a row against itself KL 0,
        // against itself shifted by a constant (the same softmax) KL ~0.
        let x: Vec<f32> = vec![3.25; 2 * v];
        let tx = gpu.upload(&x, &[2, v]).unwrap();
        let h = gpu.read(&token_entropy(gpu, &tx).unwrap()).unwrap();
        let ln_v = (v as f64).ln();
        assert_close(&h, &[ln_v, ln_v], 1e-6, 1e-7, &format!("uniform entropy v={v}"));
        let r: Vec<f32> = random_vec(2 * v, v as u64).iter().map(|a| 4.0 * a).collect();
        let tr = gpu.upload(&r, &[2, v]).unwrap();
        assert_eq!(gpu.read(&kl_rows(gpu, &tr, &tr).unwrap()).unwrap(), [0.0, 0.0], "KL(P‖P) v={v}");
        let shifted: Vec<f32> = r.iter().map(|a| a + 5.0).collect();
        let ts = gpu.upload(&shifted, &[2, v]).unwrap();
        let kl = gpu.read(&kl_rows(gpu, &tr, &ts).unwrap()).unwrap();
        assert!(kl.iter().all(|k| k.abs() <= 1e-6), "KL against a shifted copy v={v}: {kl:?}");
    }
    // One-hot-like rows: a −inf logit carries no mass and must add 0 (not NaN) to entropy and KL.
    let x = [0.0, f32::NEG_INFINITY, 0.0, 1.0];
    let y = [1.0, 0.5, -1.0, 0.0];
    let (tx, ty) = (gpu.upload(&x, &[1, 4]).unwrap(), gpu.upload(&y, &[1, 4]).unwrap());
    let p: Vec<f64> = [0.0, f64::NEG_INFINITY, 0.0, 1.0].to_vec();
    let want_h = cpu::token_entropy(&[0.0, 0.0, 1.0], 3);
    assert_close(&gpu.read(&token_entropy(gpu, &tx).unwrap()).unwrap(), &want_h, 1e-6, 1e-7, "entropy with −inf");
    let want_kl = cpu::kl_rows(&p, &to_f64(&y), 4);
    assert!(want_kl[0].is_finite());
    assert_close(&gpu.read(&kl_rows(gpu, &tx, &ty).unwrap()).unwrap(), &want_kl, 1e-6, 1e-7, "KL with −inf in P");
}

#[test]
fn entropy_and_kl_leading_dims_and_bad_inputs() {
    let gpu = gpu();
    let (b, t, v) = (2, 3, 7);
    let (x, y) = (random_vec(b * t * v, 700), random_vec(b * t * v, 701));
    let (tx, ty) = (gpu.upload(&x, &[b, t, v]).unwrap(), gpu.upload(&y, &[b, t, v]).unwrap());
    let h = token_entropy(gpu, &tx).unwrap();
    let kl = kl_rows(gpu, &tx, &ty).unwrap();
    assert_eq!((h.shape(), kl.shape()), (&[b, t][..], &[b, t][..]));
    assert_close(&gpu.read(&h).unwrap(), &cpu::token_entropy(&to_f64(&x), v), 1e-6, 1e-6, "entropy [B, T, V]");
    let want = cpu::kl_rows(&to_f64(&x), &to_f64(&y), v);
    assert_close(&gpu.read(&kl).unwrap(), &want, 1e-6, 1e-6, "kl [B, T, V]");

    let flat = gpu.upload(&x[..v], &[v]).unwrap();
    assert!(matches!(token_entropy(gpu, &flat), Err(Error::Shape { op: "token_entropy", what: "logits", .. })));
    assert!(matches!(kl_rows(gpu, &flat, &flat), Err(Error::Shape { op: "kl_rows", what: "p_logits", .. })));
    let other = gpu.upload(&y, &[b * t, v]).unwrap();
    let e = kl_rows(gpu, &tx, &other).expect_err("[2, 3, 7] against [6, 7]");
    assert!(matches!(e, Error::Shape { op: "kl_rows", what: "q_logits", .. }), "{e:?}");
    let ints = gpu.upload_i32(&vec![0; b * t * v], &[b, t, v]).unwrap();
    assert!(matches!(token_entropy(gpu, &ints), Err(Error::DType { op: "token_entropy", .. })));
    assert!(matches!(kl_rows(gpu, &tx, &ints), Err(Error::DType { op: "kl_rows", what: "q_logits", .. })));
}

#[test]
fn kl_rows_is_kl_of_its_first_argument_from_its_second() {
    // P = softmax(0, ln 3) = (1/4, 3/4) and Q uniform: KL(P‖Q) = ¼ln½ + ¾ln(3/2) = 0.1308, KL(Q‖P) = ½ln2 + ½ln(2/3)
    // = 0.1438, worked by hand. Swapping the arguments must give the other one, in the kernel and the reference.
    let gpu = gpu();
    let p = [0.0, 3.0f32.ln()];
    let q = [0.7f32, 0.7];
    let forward = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
    let reverse = 0.5 * 2.0f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
    assert!((forward - reverse).abs() > 0.01);
    let (tp, tq) = (gpu.upload(&p, &[1, 2]).unwrap(), gpu.upload(&q, &[1, 2]).unwrap());
    let pq = gpu.read(&kl_rows(gpu, &tp, &tq).unwrap()).unwrap()[0] as f64;
    let qp = gpu.read(&kl_rows(gpu, &tq, &tp).unwrap()).unwrap()[0] as f64;
    assert!((pq - forward).abs() < 1e-6, "kl_rows(P, Q) = {pq}, KL(P‖Q) = {forward}");
    assert!((qp - reverse).abs() < 1e-6, "kl_rows(Q, P) = {qp}, KL(Q‖P) = {reverse}");
    let (pd, qd) = (to_f64(&p), to_f64(&q));
    // ln 3 rounded to f32 moves P by ~1e-8.
    assert!((cpu::kl_rows(&pd, &qd, 2)[0] - forward).abs() < 1e-7, "the reference's direction");
}
