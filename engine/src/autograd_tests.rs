//! The tape against an independent f64 reference: a one-block GPT-like stack (embedding → attention block → MLP
//! block → tied lm_head → cross-entropy → weighted sum) built twice, once on the GPU tape and once from the CPU f64
//! reference forwards, whose gradient is taken by central finite differences.

use super::*;
use crate::ops::adamw::{adamw_step, AdamW};
use crate::ops::{attention, elementwise, embedding, loss, matmul, norm};
use crate::testing::{gpu, random_vec, rng, to_f64};
use rand::Rng;

/// Sizes of the tiny model (deliberately odd: nothing is a tile multiple).
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    v: usize,
}

const NAMES: [&str; 13] =
    ["wte", "wpe", "ln1_g", "ln1_b", "w_qkv", "b_qkv", "w_proj", "b_proj", "ln2_g", "ln2_b", "w_fc", "b_fc", "w_fp"];

fn shapes(d: Dims) -> Vec<Vec<usize>> {
    let c = d.c;
    vec![
        vec![d.v, c],
        vec![d.t, c],
        vec![c],
        vec![c],
        vec![c, 3 * c],
        vec![3 * c],
        vec![c, c],
        vec![c],
        vec![c],
        vec![c],
        vec![c, 4 * c],
        vec![4 * c],
        vec![4 * c, c],
    ]
}

/// Parameter values: small random weights, layernorm gains near 1.
fn init(d: Dims, seed: u64) -> Vec<Vec<f32>> {
    shapes(d)
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let r = random_vec(n, seed + i as u64);
            if NAMES[i].ends_with("_g") {
                r.iter().map(|x| 1.0 + 0.2 * x).collect()
            } else {
                r.iter().map(|x| 0.5 * x).collect()
            }
        })
        .collect()
}

/// The forward on the tape; returns the loss var. `branch_scale` multiplies the attention branch (a scale op in
/// the middle of the graph).
fn gpu_loss<'a>(
    tape: &mut Tape<'a>,
    p: &'a [Param],
    d: Dims,
    tokens: &[i32],
    targets: &Tensor,
    weights: &Tensor,
    branch_scale: f32,
) -> Var {
    let v: Vec<Var> = p[2..].iter().map(|p| tape.param(p)).collect();
    let [ln1_g, ln1_b, w_qkv, b_qkv, w_proj, b_proj, ln2_g, ln2_b, w_fc, b_fc, w_fp] = v[..] else { unreachable!() };
    let nn = matmul::MatmulSpec::nn();
    let x = tape.embedding(tokens, d.b, d.t, &p[0], &p[1]).unwrap();
    let h = tape.layernorm(x, ln1_g, ln1_b, 1e-5).unwrap();
    let qkv = tape.matmul(h, w_qkv, Some(b_qkv), nn).unwrap();
    let a = tape.attention(qkv, d.nh).unwrap();
    let a = tape.matmul(a, w_proj, Some(b_proj), nn).unwrap();
    let a = tape.scale(a, branch_scale).unwrap();
    let x2 = tape.add(x, a).unwrap();
    // The same layernorm gains feed the final norm too: a parameter used twice.
    let h2 = tape.layernorm(x2, ln2_g, ln2_b, 1e-5).unwrap();
    let f = tape.matmul(h2, w_fc, Some(b_fc), nn).unwrap();
    let f = tape.gelu(f).unwrap();
    let f = tape.matmul(f, w_fp, None, nn).unwrap();
    let x3 = tape.add(x2, f).unwrap();
    let h3 = tape.layernorm(x3, ln2_g, ln1_b, 1e-5).unwrap();
    let wte = tape.param(&p[0]); // tied lm_head: logits = h3 · wteᵀ
    let logits = tape.matmul(h3, wte, None, matmul::MatmulSpec::nt()).unwrap();
    let losses = tape.cross_entropy(logits, targets).unwrap();
    tape.weighted_sum(losses, weights).unwrap()
}

fn mm(a: &[f64], b: &[f64], rows: usize, k: usize, n: usize, trans_b: bool) -> Vec<f64> {
    let mut out = vec![0.0; rows * n];
    for i in 0..rows {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * if trans_b { b[j * k + p] } else { b[p * n + j] }).sum();
        }
    }
    out
}

fn add_bias(x: &mut [f64], bias: &[f64]) {
    for row in x.chunks_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
    }
}

/// The same model from the CPU f64 references.
fn cpu_loss(p: &[Vec<f64>], d: Dims, tokens: &[i32], targets: &[i32], weights: &[f64], branch_scale: f64) -> f64 {
    let (n, c) = (d.b * d.t, d.c);
    let x = embedding::cpu::embedding(tokens, d.t, &p[0], &p[1], c);
    let (h, _, _) = norm::cpu::layernorm(&x, &p[2], &p[3], 1e-5);
    let mut qkv = mm(&h, &p[4], n, c, 3 * c, false);
    add_bias(&mut qkv, &p[5]);
    let (a, _) = attention::cpu::attention_forward(&qkv, d.b, d.t, c, d.nh);
    let mut a = mm(&a, &p[6], n, c, c, false);
    add_bias(&mut a, &p[7]);
    let x2: Vec<f64> = x.iter().zip(&a).map(|(x, a)| x + branch_scale * a).collect();
    let (h2, _, _) = norm::cpu::layernorm(&x2, &p[8], &p[9], 1e-5);
    let mut f = mm(&h2, &p[10], n, c, 4 * c, false);
    add_bias(&mut f, &p[11]);
    let f = elementwise::cpu::gelu(&f);
    let f = mm(&f, &p[12], n, 4 * c, c, false);
    let x3: Vec<f64> = x2.iter().zip(&f).map(|(x, f)| x + f).collect();
    let (h3, _, _) = norm::cpu::layernorm(&x3, &p[8], &p[3], 1e-5);
    let logits = mm(&h3, &p[0], n, c, d.v, true);
    let (losses, _) = loss::cpu::cross_entropy(&logits, targets, d.v);
    losses.iter().zip(weights).map(|(l, w)| l * w).sum()
}

struct Case {
    d: Dims,
    tokens: Vec<i32>,
    targets: Vec<i32>,
    weights: Vec<f32>,
}

fn case(d: Dims, seed: u64, masked_tail: usize) -> Case {
    let mut r = rng(seed);
    let tokens: Vec<i32> = (0..d.b * d.t).map(|_| r.random_range(0..d.v as i32)).collect();
    let targets: Vec<i32> = (0..d.b * d.t)
        .map(|i| if i % d.t >= d.t - masked_tail { loss::IGNORE_INDEX } else { r.random_range(0..d.v as i32) })
        .collect();
    // Signed per-token weights, as an advantage-weighted RL loss uses; zero where masked.
    let weights = targets.iter().map(|&t| if t < 0 { 0.0 } else { r.random_range(-1.0f32..1.0) }).collect();
    Case { d, tokens, targets, weights }
}

/// The case on the GPU: parameters (NAMES order), targets, weights.
fn upload(gpu: &Gpu, cs: &Case, values: &[Vec<f32>]) -> (Vec<Param>, Tensor, Tensor) {
    let params: Vec<Param> = values
        .iter()
        .zip(shapes(cs.d))
        .enumerate()
        .map(|(i, (v, s))| Param::new(gpu, NAMES[i], gpu.upload(v, &s).unwrap()).unwrap())
        .collect();
    let targets = gpu.upload_i32(&cs.targets, &[cs.d.b, cs.d.t]).unwrap();
    let weights = gpu.upload(&cs.weights, &[cs.d.b * cs.d.t]).unwrap();
    (params, targets, weights)
}

/// GPU gradients of every parameter, in NAMES order.
fn gpu_grads(cs: &Case, values: &[Vec<f32>], branch_scale: f32) -> Vec<Vec<f32>> {
    let gpu = gpu();
    let (params, targets, weights) = upload(gpu, cs, values);
    let mut tape = Tape::new(gpu);
    let loss = gpu_loss(&mut tape, &params, cs.d, &cs.tokens, &targets, &weights, branch_scale);
    tape.backward(loss).unwrap();
    params.iter().map(|p| gpu.read(&p.grad).unwrap()).collect()
}

#[test]
fn tiny_gpt_gradients_match_finite_differences() {
    let d = Dims { b: 2, t: 5, c: 6, nh: 2, v: 7 };
    let cs = case(d, 11, 1);
    let values = init(d, 100);
    let branch_scale = 0.75;
    let grads = gpu_grads(&cs, &values, branch_scale);
    let p64: Vec<Vec<f64>> = values.iter().map(|v| to_f64(v)).collect();
    let w64 = to_f64(&cs.weights);
    for (i, name) in NAMES.iter().enumerate() {
        let num = crate::testing::numeric_gradient(
            |x| {
                let mut p = p64.clone();
                p[i] = x.to_vec();
                cpu_loss(&p, d, &cs.tokens, &cs.targets, &w64, branch_scale as f64)
            },
            &p64[i],
            1e-5,
        );
        // The GPU runs the whole stack in f32 (each op good to ~1e-6 relative); gradients of O(0.1) magnitude
        // then agree with f64 central differences (truncation ~h² ≈ 1e-10) to ~1e-4 of the largest entry.
        let scale = num.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (j, (g, n)) in grads[i].iter().zip(&num).enumerate() {
            assert!(
                (*g as f64 - n).abs() <= 2e-4 * scale,
                "d{name}[{j}]: GPU {g}, finite differences {n} (largest |grad| {scale})"
            );
        }
    }
}

#[test]
fn masked_positions_get_exactly_zero_gradient() {
    // With the last two positions of every sequence masked, position embeddings of those positions influence only
    // masked outputs (attention is causal): their gradient must be exactly zero, not merely small.
    let d = Dims { b: 3, t: 6, c: 8, nh: 2, v: 9 };
    let cs = case(d, 12, 2);
    let grads = gpu_grads(&cs, &init(d, 200), 1.0);
    let wpe = &grads[1];
    for t in d.t - 2..d.t {
        assert!(wpe[t * d.c..(t + 1) * d.c].iter().all(|&g| g == 0.0), "wpe row {t}: {:?}", &wpe[t * d.c..]);
    }
    assert!(wpe[..d.c].iter().any(|&g| g != 0.0), "unmasked rows do get gradient");
}

#[test]
fn flipping_the_sign_of_per_token_weights_negates_every_gradient() {
    let d = Dims { b: 2, t: 4, c: 6, nh: 3, v: 5 };
    let cs = case(d, 13, 0);
    let values = init(d, 300);
    let base = gpu_grads(&cs, &values, 1.0);
    // Flipping every per-token weight negates every gradient exactly (f32 negation is exact, and so is every
    // kernel's response to it).
    let flipped = Case { weights: cs.weights.iter().map(|w| -w).collect(), ..case(d, 13, 0) };
    let neg = gpu_grads(&flipped, &values, 1.0);
    for (i, (a, b)) in base.iter().zip(&neg).enumerate() {
        assert!(a.iter().zip(b).all(|(x, y)| *x == -*y), "{} did not flip sign", NAMES[i]);
    }
    // A dropped coefficient in the middle of the graph is caught by the finite-difference test, which scales the
    // attention branch by 0.75.
}

#[test]
fn same_seed_gives_bit_identical_gradients() {
    let d = Dims { b: 2, t: 7, c: 8, nh: 2, v: 11 };
    let cs = case(d, 14, 1);
    let values = init(d, 400);
    assert_eq!(gpu_grads(&cs, &values, 1.0), gpu_grads(&cs, &values, 1.0));
}

#[test]
fn backward_releases_activations_and_accumulates_into_params() {
    let gpu = Gpu::new().unwrap_or_else(|e| panic!("{e}")); // private pool: exact byte counts
    let d = Dims { b: 2, t: 8, c: 16, nh: 2, v: 13 };
    let cs = case(d, 15, 0);
    let params: Vec<Param> = init(d, 500)
        .iter()
        .zip(shapes(d))
        .enumerate()
        .map(|(i, (v, s))| Param::new(&gpu, NAMES[i], gpu.upload(v, &s).unwrap()).unwrap())
        .collect();
    let targets = gpu.upload_i32(&cs.targets, &[d.b, d.t]).unwrap();
    let weights = gpu.upload(&cs.weights, &[d.b * d.t]).unwrap();
    let mut first = Vec::new();
    for round in 0..2 {
        gpu.sync().unwrap();
        let before = gpu.pool_stats().live_bytes;
        gpu.reset_peak();
        let mut tape = Tape::new(&gpu);
        let loss = gpu_loss(&mut tape, &params, d, &cs.tokens, &targets, &weights, 1.0);
        let after_forward = gpu.pool_stats().live_bytes;
        assert!(after_forward > before, "the forward holds activations");
        tape.backward(loss).unwrap();
        gpu.sync().unwrap();
        // Everything the forward saved has been released by the walk (the tape is still alive).
        assert_eq!(gpu.pool_stats().live_bytes, before, "round {round}: activations left after backward");
        assert!(gpu.pool_stats().peak_bytes >= after_forward);
        let g: Vec<f32> = gpu.read(&params[4].grad).unwrap();
        if round == 0 {
            first = g;
        } else {
            // A second backward without zero_grad adds the same gradient again.
            let twice: Vec<f32> = first.iter().map(|x| 2.0 * x).collect();
            let close = g.iter().zip(&twice).all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs()));
            assert!(close, "gradients accumulate across backward passes");
        }
    }
    let mut tape = Tape::no_grad(&gpu);
    let loss = gpu_loss(&mut tape, &params, d, &cs.tokens, &targets, &weights, 1.0);
    assert!(matches!(tape.backward(loss), Err(Error::Invalid { .. })));
}

#[test]
fn overfitting_one_batch_cuts_the_loss_by_90_percent() {
    let gpu = gpu();
    let d = Dims { b: 4, t: 16, c: 32, nh: 4, v: 37 };
    let cs = case(d, 16, 0);
    let params: Vec<Param> = init(d, 600)
        .iter()
        .zip(shapes(d))
        .enumerate()
        .map(|(i, (v, s))| Param::new(gpu, NAMES[i], gpu.upload(v, &s).unwrap()).unwrap())
        .collect();
    let m: Vec<Tensor> = params.iter().map(|p| elementwise::zeros(gpu, p.value.shape()).unwrap()).collect();
    let v: Vec<Tensor> = params.iter().map(|p| elementwise::zeros(gpu, p.value.shape()).unwrap()).collect();
    let targets = gpu.upload_i32(&cs.targets, &[d.b, d.t]).unwrap();
    let weights = gpu.upload(&mean_weights(&cs.targets), &[d.b * d.t]).unwrap();
    let cfg = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 };
    let mut losses = Vec::new();
    for step in 1..=150u32 {
        params.iter().for_each(|p| p.zero_grad(gpu).unwrap());
        let mut tape = Tape::new(gpu);
        let loss = gpu_loss(&mut tape, &params, d, &cs.tokens, &targets, &weights, 1.0);
        if step == 1 || step % 25 == 0 {
            losses.push(gpu.read(tape.value(loss)).unwrap()[0]);
        }
        tape.backward(loss).unwrap();
        for ((p, m), v) in params.iter().zip(&m).zip(&v) {
            adamw_step(gpu, &p.value, &p.grad, m, v, &cfg, step).unwrap();
        }
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(first > 2.0, "a random model starts near ln(37) ≈ 3.6, got {first}");
    assert!(last < 0.1 * first, "loss fell from {first} to {last} only: {losses:?}");
}

#[test]
fn nan_poisoned_allocations_change_nothing() {
    // Every fresh or reused buffer starts as NaN: any kernel that reads memory no one wrote would turn the
    // gradients into NaN. A private device, since the switch affects every allocation on it.
    let d = Dims { b: 2, t: 5, c: 6, nh: 2, v: 7 };
    let cs = case(d, 17, 1);
    let values = init(d, 700);
    let gpu = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    gpu.set_poison_allocations(true);
    let params: Vec<Param> = values
        .iter()
        .zip(shapes(d))
        .enumerate()
        .map(|(i, (v, s))| {
            let value = gpu.upload(v, &s).unwrap();
            let grad = gpu.upload(&vec![0.0; v.len()], &s).unwrap();
            Param { name: NAMES[i].into(), value, grad }
        })
        .collect();
    let targets = gpu.upload_i32(&cs.targets, &[d.b, d.t]).unwrap();
    let weights = gpu.upload(&cs.weights, &[d.b * d.t]).unwrap();
    let mut tape = Tape::new(&gpu);
    let loss = gpu_loss(&mut tape, &params, d, &cs.tokens, &targets, &weights, 1.0);
    tape.backward(loss).unwrap();
    let poisoned: Vec<Vec<f32>> = params.iter().map(|p| gpu.read(&p.grad).unwrap()).collect();
    assert!(poisoned.iter().flatten().all(|g| g.is_finite()), "a kernel read unwritten memory");
    assert_eq!(poisoned, gpu_grads(&cs, &values, 1.0), "poisoned and normal runs must agree bit for bit");
}

#[test]
fn tape_attention_segments_backward_is_the_segmented_kernel() {
    // qkv (a parameter) → attention over packed rows → Σ w·y: the parameter's gradient must be exactly the
    // segmented backward kernel's for dy = w (so the tape keeps starts for the backward), agree with the f64
    // reference, and differ from the causal gradient (the boundaries matter).
    let gpu = gpu();
    let (b, t, c, nh) = (2, 70, 48, 3);
    let lengths = [vec![20, 1, 30], vec![70]];
    let starts = gpu.upload_i32(&attention::segment_starts(&lengths, t), &[b, t]).unwrap();
    let x = random_vec(b * t * 3 * c, 900);
    let w = random_vec(b * t * c, 901);
    let qkv = Param::new(gpu, "qkv", gpu.upload(&x, &[b, t, 3 * c]).unwrap()).unwrap();
    let weights = gpu.upload(&w, &[b * t * c]).unwrap();
    let mut tape = Tape::new(gpu);
    let v = tape.param(&qkv);
    let y = tape.attention_segments(v, nh, Some(&starts)).unwrap();
    let loss = tape.weighted_sum(y, &weights).unwrap();
    tape.backward(loss).unwrap();
    let got = gpu.read(&qkv.grad).unwrap();

    let (yk, lse) = attention::attention_forward_segments(gpu, &qkv.value, nh, Some(&starts)).unwrap();
    let dy = gpu.upload(&w, &[b, t, c]).unwrap();
    let direct = attention::attention_backward_segments(gpu, &qkv.value, &yk, &lse, &dy, nh, Some(&starts)).unwrap();
    let direct = gpu.read(&direct).unwrap();
    assert!(got.iter().zip(&direct).all(|(a, b)| a.to_bits() == b.to_bits()), "tape ≠ attention_backward_segments");

    let host_starts = attention::segment_starts(&lengths, t);
    let want = attention::cpu::attention_backward_segments(&to_f64(&x), &to_f64(&w), b, t, c, nh, &host_starts);
    let scale = want.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
        assert!((g as f64 - r).abs() <= 1e-4 * scale, "dqkv[{i}]: tape {g}, f64 reference {r}");
    }
    let causal = attention::cpu::attention_backward(&to_f64(&x), &to_f64(&w), b, t, c, nh);
    let off = got.iter().zip(&causal).map(|(&g, &r)| (g as f64 - r).abs()).fold(0.0, f64::max);
    assert!(off > 1e-2 * scale, "the segmented gradient equals the causal one (max difference {off})");
}

#[test]
fn backward_with_reports_each_parameter_once_when_its_gradient_is_final() {
    // Data parallelism starts a parameter's all-reduce at the report: what it reads then must be the gradient
    // backward ends with, for every parameter, the tied embedding and the twice-used norm gains included.
    let d = Dims { b: 2, t: 5, c: 12, nh: 3, v: 11 };
    let cs = case(d, 21, 1);
    let values = init(d, 5);
    let want = gpu_grads(&cs, &values, 0.7);
    let gpu = gpu();
    let (params, targets, weights) = upload(gpu, &cs, &values);
    let mut tape = Tape::new(gpu);
    let loss = gpu_loss(&mut tape, &params, d, &cs.tokens, &targets, &weights, 0.7);
    let mut seen: Vec<(String, Vec<f32>)> = Vec::new();
    tape.backward_with(loss, &mut |p| {
        seen.push((p.name.clone(), gpu.read(&p.grad)?));
        Ok(())
    })
    .unwrap();
    let mut names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    // Reported in reverse order of first use: the parameters were put on the tape first (ln1_g first of all),
    // then the embedding used wte and wpe; the tied head's second use of wte does not delay it.
    let pos = |n: &str| names.iter().position(|&x| x == n).unwrap();
    assert!(pos("wte") < pos("w_fp") && pos("w_fp") < pos("w_qkv"), "{names:?}");
    assert_eq!(pos("ln1_g"), names.len() - 1, "{names:?}");
    for (name, at_report) in &seen {
        let i = NAMES.iter().position(|n| n == name).unwrap();
        assert_eq!(at_report, &want[i], "{name}: the gradient changed after it was reported final");
    }
    names.sort();
    let mut all = NAMES.to_vec();
    all.sort();
    assert_eq!(names, all, "every parameter exactly once");
}
