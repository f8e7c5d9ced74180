//! The quickstart self-check: every forward kernel once on a mid-sized random input, compared with its CPU f64
//! reference, timed on the GPU. A quick confidence report for a new machine, not a substitute for the tests.

use std::time::Instant;

use crate::ops::{adamw, attention, elementwise, embedding, loss, matmul, norm, policy, reduce};
use crate::testing::{max_abs_diff, random_vec, rng, to_f64};
use crate::{Gpu, Result, Tensor};
use rand::Rng;

/// One row of the report.
#[derive(Clone, Debug)]
pub struct CheckRow {
    pub kernel: &'static str,
    pub shape: String,
    pub max_abs_err: f64,
    pub tolerance: f64,
    /// Throughput in `unit` (GFLOP/s for compute-bound kernels, GB/s of compulsory traffic for the rest).
    pub rate: f64,
    pub unit: &'static str,
}

impl CheckRow {
    pub fn passed(&self) -> bool {
        self.max_abs_err <= self.tolerance
    }
}

/// Seconds per call of `f`, after one untimed call (pipeline compilation), over enough calls to pass 50 ms.
fn seconds_per_call(gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    gpu.sync()?;
    let (mut calls, start) = (0u32, Instant::now());
    while calls < 2 || start.elapsed().as_secs_f64() < 0.05 {
        f()?;
        gpu.sync()?;
        calls += 1;
    }
    Ok(start.elapsed().as_secs_f64() / calls as f64)
}

struct Row<'a> {
    kernel: &'static str,
    shape: String,
    got: &'a [f32],
    want: &'a [f64],
    tolerance: f64,
    work: f64,
    unit: &'static str,
    secs: f64,
}

fn row(r: Row) -> CheckRow {
    CheckRow {
        kernel: r.kernel,
        shape: r.shape,
        max_abs_err: max_abs_diff(r.got, r.want),
        tolerance: r.tolerance,
        rate: r.work / r.secs / 1e9,
        unit: r.unit,
    }
}

fn up(gpu: &Gpu, n: usize, seed: u64, shape: &[usize]) -> Result<(Vec<f32>, Tensor)> {
    let v = random_vec(n, seed);
    let t = gpu.upload(&v, shape)?;
    Ok((v, t))
}

/// Run every kernel once against its reference; the matmul uses the variant this adapter picked.
pub fn run(gpu: &Gpu) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    let f4 = 4.0;

    // matmul in all three layouts the training step uses, at an odd GPT-like shape.
    let (m, n, k) = (257, 384, 768);
    for (name, spec) in [
        ("matmul", matmul::MatmulSpec::nn()),
        ("matmul Aᵀ·B", matmul::MatmulSpec::tn()),
        ("matmul A·Bᵀ", matmul::MatmulSpec::nt()),
    ] {
        let a_shape = if spec.trans_a { [k, m] } else { [m, k] };
        let b_shape = if spec.trans_b { [n, k] } else { [k, n] };
        let (av, a) = up(gpu, m * k, 1, &a_shape)?;
        let (bv, b) = up(gpu, k * n, 2, &b_shape)?;
        let out = matmul::matmul(gpu, &a, &b, None, spec)?;
        let shape = matmul::matmul_shape(&a, &b, spec)?;
        let want = matmul::cpu::matmul(&to_f64(&av), &to_f64(&bv), None, &vec![0.0; m * n], &shape, spec);
        let secs = seconds_per_call(gpu, || matmul::matmul_into(gpu, &a, &b, None, &out, spec))?;
        let label = format!("{m}x{n}x{k} ({})", crate::ops::matmul_tune::variant_for(gpu, &shape, spec)?);
        let got = gpu.read(&out)?;
        // f32 sums of k products of values in [-1, 1].
        let tolerance = 1e-6 * k as f64;
        rows.push(row(Row {
            kernel: name,
            shape: label,
            got: &got,
            want: &want,
            tolerance,
            work: shape.flops() as f64,
            unit: "GFLOP/s",
            secs,
        }));
    }

    // Causal attention: QKᵀ and PV over the lower triangle, 2·2·T²/2·C FLOPs per batch entry.
    let (b, t, c, nh) = (1, 256, 128, 4);
    let (qv, qkv) = up(gpu, b * t * 3 * c, 3, &[b, t, 3 * c])?;
    let (y, _lse) = attention::attention_forward(gpu, &qkv, nh)?;
    let (want, _) = attention::cpu::attention_forward(&to_f64(&qv), b, t, c, nh);
    let secs = seconds_per_call(gpu, || attention::attention_forward(gpu, &qkv, nh).map(|_| ()))?;
    let got = gpu.read(&y)?;
    let work = 2.0 * (b * t * t * c) as f64;
    rows.push(row(Row {
        kernel: "attention",
        shape: format!("B{b} T{t} C{c} NH{nh}"),
        got: &got,
        want: &want,
        tolerance: 1e-4,
        work,
        unit: "GFLOP/s",
        secs,
    }));

    // Memory-bound kernels: report the bytes they must move.
    let (nr, nc) = (512, 768);
    let (xv, x) = up(gpu, nr * nc, 4, &[nr, nc])?;
    let (gv, g) = up(gpu, nc, 5, &[nc])?;
    let (bv, bt) = up(gpu, nc, 6, &[nc])?;
    let (ln, _, _) = norm::layernorm(gpu, &x, &g, &bt, 1e-5)?;
    let (want, _, _) = norm::cpu::layernorm(&to_f64(&xv), &to_f64(&gv), &to_f64(&bv), 1e-5);
    let want: Vec<f64> = want;
    let secs = seconds_per_call(gpu, || norm::layernorm(gpu, &x, &g, &bt, 1e-5).map(|_| ()))?;
    let got = gpu.read(&ln)?;
    rows.push(row(Row {
        kernel: "layernorm",
        shape: format!("{nr}x{nc}"),
        got: &got,
        want: &want,
        tolerance: 1e-4,
        work: 2.0 * f4 * (nr * nc) as f64,
        unit: "GB/s",
        secs,
    }));

    let sm = norm::softmax(gpu, &x)?;
    let want = norm::cpu::softmax(&to_f64(&xv), nc);
    let secs = seconds_per_call(gpu, || norm::softmax(gpu, &x).map(|_| ()))?;
    let got = gpu.read(&sm)?;
    rows.push(row(Row {
        kernel: "softmax",
        shape: format!("{nr}x{nc}"),
        got: &got,
        want: &want,
        tolerance: 1e-6,
        work: 2.0 * f4 * (nr * nc) as f64,
        unit: "GB/s",
        secs,
    }));

    let (rows_ce, vocab) = (64, 50257);
    let (lv, logits) = up(gpu, rows_ce * vocab, 7, &[rows_ce, vocab])?;
    let mut r = rng(8);
    let targets: Vec<i32> =
        (0..rows_ce).map(|i| if i % 5 == 4 { loss::IGNORE_INDEX } else { r.random_range(0..vocab as i32) }).collect();
    let tt = gpu.upload_i32(&targets, &[rows_ce])?;
    let (l, _) = loss::cross_entropy(gpu, &logits, &tt)?;
    let (want, _) = loss::cpu::cross_entropy(&to_f64(&lv), &targets, vocab);
    let secs = seconds_per_call(gpu, || loss::cross_entropy(gpu, &logits, &tt).map(|_| ()))?;
    let got = gpu.read(&l)?;
    rows.push(row(Row {
        kernel: "cross_entropy",
        shape: format!("{rows_ce}x{vocab}"),
        got: &got,
        want: &want,
        tolerance: 1e-4,
        work: f4 * (rows_ce * vocab) as f64,
        unit: "GB/s",
        secs,
    }));

    let (nel, seed) = (1 << 20, 9);
    let (ev, e) = up(gpu, nel, seed, &[nel])?;
    let (fv, f) = up(gpu, nel, seed + 1, &[nel])?;
    let ge = elementwise::gelu(gpu, &e)?;
    let want = elementwise::cpu::gelu(&to_f64(&ev));
    let secs = seconds_per_call(gpu, || elementwise::gelu(gpu, &e).map(|_| ()))?;
    let got = gpu.read(&ge)?;
    rows.push(row(Row {
        kernel: "gelu",
        shape: format!("{nel}"),
        got: &got,
        want: &want,
        tolerance: 1e-5,
        work: 2.0 * f4 * nel as f64,
        unit: "GB/s",
        secs,
    }));

    let s = elementwise::add(gpu, &e, &f, 1.0)?;
    let want = elementwise::cpu::add(&to_f64(&ev), &to_f64(&fv), 1.0);
    let secs = seconds_per_call(gpu, || elementwise::add(gpu, &e, &f, 1.0).map(|_| ()))?;
    let got = gpu.read(&s)?;
    rows.push(row(Row {
        kernel: "residual add",
        shape: format!("{nel}"),
        got: &got,
        want: &want,
        tolerance: 1e-6,
        work: 3.0 * f4 * nel as f64,
        unit: "GB/s",
        secs,
    }));

    let total = reduce::sum(gpu, &e)?;
    let want = [reduce::cpu::sum(&to_f64(&ev))];
    let secs = seconds_per_call(gpu, || reduce::sum(gpu, &e).map(|_| ()))?;
    let got = gpu.read(&total)?;
    // Tree summation of 2^20 values in [-1, 1]: about log2(n)·2^-24·Σ|x| ≈ 0.6 in the worst case; random signs
    // make it far smaller, 1e-2 is generous and still catches a lost block (|x| ≈ 0.5 per element).
    rows.push(row(Row {
        kernel: "sum",
        shape: format!("{nel}"),
        got: &got,
        want: &want,
        tolerance: 1e-2,
        work: f4 * nel as f64,
        unit: "GB/s",
        secs,
    }));

    let (vocab_e, ctx, bsz, tl, ce) = (1001, 128, 4, 100, 96);
    let (wv, wte) = up(gpu, vocab_e * ce, 10, &[vocab_e, ce])?;
    let (pv, wpe) = up(gpu, ctx * ce, 11, &[ctx, ce])?;
    let toks: Vec<i32> = (0..bsz * tl).map(|_| r.random_range(0..vocab_e as i32)).collect();
    let tk = gpu.upload_i32(&toks, &[bsz, tl])?;
    let em = embedding::embedding(gpu, &tk, &wte, &wpe)?;
    let want = embedding::cpu::embedding(&toks, tl, &to_f64(&wv), &to_f64(&pv), ce);
    let secs = seconds_per_call(gpu, || embedding::embedding(gpu, &tk, &wte, &wpe).map(|_| ()))?;
    let got = gpu.read(&em)?;
    rows.push(row(Row {
        kernel: "embedding",
        shape: format!("B{bsz} T{tl} C{ce}"),
        got: &got,
        want: &want,
        tolerance: 1e-6,
        work: 3.0 * f4 * (bsz * tl * ce) as f64,
        unit: "GB/s",
        secs,
    }));

    let cfg = adamw::AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let (pv, p) = up(gpu, nel, 12, &[nel])?;
    let m = elementwise::zeros(gpu, &[nel])?;
    let v = elementwise::zeros(gpu, &[nel])?;
    adamw::adamw_step(gpu, &p, &f, &m, &v, &cfg, 1)?;
    let got = gpu.read(&p)?;
    let (mut pw, mut mw, mut vw) = (to_f64(&pv), vec![0.0; nel], vec![0.0; nel]);
    adamw::cpu::adamw_step(&mut pw, &to_f64(&fv), &mut mw, &mut vw, &cfg, 1);
    let secs = seconds_per_call(gpu, || adamw::adamw_step(gpu, &p, &f, &m, &v, &cfg, 2))?;
    rows.push(row(Row {
        kernel: "adamw",
        shape: format!("{nel}"),
        got: &got,
        want: &pw,
        tolerance: 1e-6,
        work: 7.0 * f4 * nel as f64,
        unit: "GB/s",
        secs,
    }));

    // The RL family: entropy and exact KL per row of logits, and the clipped policy-gradient weights.
    let (rows_p, vp) = (64, 2048);
    let (lp, p_logits) = up(gpu, rows_p * vp, 13, &[rows_p, vp])?;
    let (lq, q_logits) = up(gpu, rows_p * vp, 14, &[rows_p, vp])?;
    let h = policy::token_entropy(gpu, &p_logits)?;
    let want = policy::cpu::token_entropy(&to_f64(&lp), vp);
    let secs = seconds_per_call(gpu, || policy::token_entropy(gpu, &p_logits).map(|_| ()))?;
    let got = gpu.read(&h)?;
    rows.push(row(Row {
        kernel: "entropy",
        shape: format!("{rows_p}×{vp}"),
        got: &got,
        want: &want,
        tolerance: 1e-4,
        work: f4 * (rows_p * vp) as f64,
        unit: "GB/s",
        secs,
    }));
    let kl = policy::kl_rows(gpu, &p_logits, &q_logits)?;
    let want = policy::cpu::kl_rows(&to_f64(&lp), &to_f64(&lq), vp);
    let secs = seconds_per_call(gpu, || policy::kl_rows(gpu, &p_logits, &q_logits).map(|_| ()))?;
    let got = gpu.read(&kl)?;
    rows.push(row(Row {
        kernel: "kl",
        shape: format!("{rows_p}×{vp}"),
        got: &got,
        want: &want,
        tolerance: 1e-4,
        work: 2.0 * f4 * (rows_p * vp) as f64,
        unit: "GB/s",
        secs,
    }));
    let nt = 1 << 16;
    let losses: Vec<f32> = (0..nt).map(|_| r.random_range(0.5f32..3.0)).collect();
    // Old log-probs within ±0.4 of the current ones, so both sides of the 0.2 clip occur.
    let old: Vec<f32> = losses.iter().map(|l| -l + r.random_range(-0.4f32..0.4)).collect();
    let refp: Vec<f32> = losses.iter().map(|l| -l + r.random_range(-0.3f32..0.3)).collect();
    let adv: Vec<f32> = (0..nt).map(|_| r.random_range(-1.0f32..1.0)).collect();
    let scale: Vec<f32> = (0..nt).map(|i| if i % 7 == 0 { 0.0 } else { 1.0 / nt as f32 }).collect();
    let t = |v: &[f32]| gpu.upload(v, &[nt]);
    let (lt, ot, rt, at, st) = (t(&losses)?, t(&old)?, t(&refp)?, t(&adv)?, t(&scale)?);
    let cfg = policy::PolicyLossConfig { clip_eps: Some(0.2), beta: 0.04 };
    let pl = policy::policy_loss(gpu, &lt, &ot, &rt, &at, &st, cfg)?;
    let (want, _) = policy::cpu::policy_loss(
        &to_f64(&losses),
        &to_f64(&old),
        &to_f64(&refp),
        &to_f64(&adv),
        &to_f64(&scale),
        Some(0.2),
        0.04,
    );
    let secs = seconds_per_call(gpu, || policy::policy_loss(gpu, &lt, &ot, &rt, &at, &st, cfg).map(|_| ()))?;
    let got = gpu.read(&pl.weights)?;
    rows.push(row(Row {
        kernel: "policy loss",
        shape: format!("{nt}"),
        got: &got,
        want: &want,
        tolerance: 1e-9,
        work: 6.0 * f4 * nt as f64,
        unit: "GB/s",
        secs,
    }));
    Ok(rows)
}
