//! Reinforcement-learning objectives on the GPU: the clipped policy-gradient loss of GRPO/PPO with a k3 KL penalty
//! to a reference model, and the per-row entropy and exact KL divergence of softmax distributions (metrics).
//!
//! The policy loss does not differentiate through the logits itself: it turns per-token cross-entropy losses
//! (−log π of the sampled token, from `Tape::cross_entropy`) into per-token weights dObjective/dloss, which
//! `Tape::weighted_sum` then backpropagates. Per token i with scale s (0 = masked), ratio r = exp(logp − old_logp),
//! advantage A and d = ref_logp − logp:
//!
//! * surr = min(r·A, clamp(r, 1−ε, 1+ε)·A) (just r·A without clipping); the token is clipped when the clamped
//!   term is strictly smaller, and then no gradient flows through r.
//! * k3 = exp(d) − d − 1 ≥ 0, Schulman's unbiased estimator of KL(π‖π_ref).
//! * objective = s·(β·k3 − surr), to minimise; weight = s·((clipped ? 0 : r·A) − β·(1 − exp(d))).

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::norm::RowReduction;
use crate::ops::norm::{row_grid, rows_cols};
use crate::ops::{fits_u32, grid_1d, nonempty, same_shape};
use crate::shaders::{POLICY, POLICY_SUBGROUP};
use crate::{DType, Error, Gpu, Result, Tensor};

/// Settings of the clipped policy-gradient objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyLossConfig {
    /// PPO/GRPO ratio clip ε (ratio kept in [1-ε, 1+ε]); None = no clipping (plain REINFORCE).
    pub clip_eps: Option<f32>,
    /// Weight β of the k3 KL penalty to the reference model (0 = off).
    pub beta: f32,
}

/// What [`policy_loss`] returns.
#[derive(Debug)]
pub struct PolicyLoss {
    /// [N]: dObjective/d(loss_i), the per-token weight to hand to `Tape::weighted_sum` over the cross-entropy losses.
    pub weights: Tensor,
    /// [3]: (Σ objective_i, Σ k3_i over tokens with scale ≠ 0, Σ clipped_i) — sums, the caller divides.
    pub totals: Tensor,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    v: u32,
    parts: u32,
    clip: u32,
    eps: f32,
    beta: f32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { n, v, parts, clip, eps, beta })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// Per-token weights and summed statistics of the clipped policy-gradient objective (see the module docs).
/// `losses` are the per-token cross-entropy losses under the current policy; `old_logp` the sampling policy's
/// log-probs of the same tokens, `ref_logp` the reference model's, `adv` the advantages and `scale` each token's
/// share of the loss (0 masks it: prompt or padding; e.g. 1/completion length otherwise). All F32 with the same
/// number of elements, any shapes. Masked tokens give exactly 0 weight and add nothing to the totals whatever
/// their other inputs hold (NaN included). Two dispatches (per-token work with per-block partial sums, then one
/// workgroup adding the partials), fixed-order trees: bit-reproducible.
pub fn policy_loss(
    gpu: &Gpu,
    losses: &Tensor,
    old_logp: &Tensor,
    ref_logp: &Tensor,
    adv: &Tensor,
    scale: &Tensor,
    cfg: PolicyLossConfig,
) -> Result<PolicyLoss> {
    let op = "policy_loss";
    nonempty(op, "losses", losses)?;
    expect_dtype(op, "losses", losses, DType::F32)?;
    let n = losses.numel();
    fits_u32(op, "losses", n)?;
    for (what, t) in [("old_logp", old_logp), ("ref_logp", ref_logp), ("adv", adv), ("scale", scale)] {
        expect_dtype(op, what, t, DType::F32)?;
        if t.numel() != n {
            return Err(Error::Shape {
                op,
                what,
                expected: format!("{n} elements (one per token of losses {:?})", losses.shape()),
                got: format!("{:?}", t.shape()),
            });
        }
    }
    if let Some(eps) = cfg.clip_eps {
        if !(eps.is_finite() && eps > 0.0) {
            let message = format!("clip_eps must be finite and > 0 (None = no clipping), got {eps}");
            return Err(Error::Invalid { op, message });
        }
    }
    if !(cfg.beta.is_finite() && cfg.beta >= 0.0) {
        return Err(Error::Invalid { op, message: format!("beta must be finite and >= 0, got {}", cfg.beta) });
    }
    // A workgroup covers WG tokens: 256 with the tree reductions, the subgroup size with subgroup ones.
    let (shader, overrides) = RowReduction::module(gpu, &POLICY, &POLICY_SUBGROUP);
    let wg = RowReduction::threads(overrides);
    let blocks = n.div_ceil(wg as usize);
    let weights = gpu.alloc(&[n], DType::F32)?;
    let partials = gpu.alloc(&[blocks, 3], DType::F32)?;
    let totals = gpu.alloc(&[3], DType::F32)?;
    let params = Params {
        n: n as u32,
        v: 0,
        parts: blocks as u32,
        clip: cfg.clip_eps.is_some() as u32,
        eps: cfg.clip_eps.unwrap_or(0.0),
        beta: cfg.beta,
    };
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: "policy_loss",
        overrides,
        args: &[losses, old_logp, ref_logp, adv, scale, &weights, &partials],
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(n, wg),
    })?;
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: "policy_totals",
        overrides,
        args: &[&partials, &totals],
        params: bytemuck::bytes_of(&params),
        groups: [1, 1, 1],
    })?;
    Ok(PolicyLoss { weights, totals })
}

/// (rows, V) of F32 logits [N, V] (any leading dims).
fn check_logits(op: &'static str, what: &'static str, logits: &Tensor) -> Result<(usize, usize)> {
    let (rows, v) = rows_cols(op, what, logits)?;
    if logits.shape().len() < 2 {
        return Err(Error::Shape {
            op,
            what,
            expected: "[N, V] or [B, T, V]".into(),
            got: format!("{:?}", logits.shape()),
        });
    }
    Ok((rows, v))
}

fn row_kernel(gpu: &Gpu, op: &'static str, logits: &[&Tensor], rows: usize, v: usize) -> Result<Tensor> {
    let rank = logits[0].shape().len();
    let out = gpu.alloc(&logits[0].shape()[..rank - 1], DType::F32)?;
    let params = Params { n: rows as u32, v: v as u32, parts: 0, clip: 0, eps: 0.0, beta: 0.0 };
    let mut args = logits.to_vec();
    args.push(&out);
    let (shader, overrides) = RowReduction::module(gpu, &POLICY, &POLICY_SUBGROUP);
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: op,
        overrides,
        args: &args,
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok(out)
}

/// Entropy −Σ p log p of softmax(row) for each row of `logits` [N, V] (or [B, T, V]), shaped like the leading
/// dims. Logits of −inf are allowed (they add 0) as long as each row has a finite one.
pub fn token_entropy(gpu: &Gpu, logits: &Tensor) -> Result<Tensor> {
    let op = "token_entropy";
    let (rows, v) = check_logits(op, "logits", logits)?;
    row_kernel(gpu, op, &[logits], rows, v)
}

/// KL(P‖Q) = Σ_v p_v (log p_v − log q_v) over the whole vocabulary, exactly (not a sampled estimate), per row of
/// `p_logits` and `q_logits` (same shape, [N, V] or [B, T, V]), P and Q their softmaxes; shaped like the leading
/// dims. The f32 terms it sums are of size ln V, so it is accurate to a few ulp of those (~1e-6 at V = 50257,
/// absolute): a KL of 1e-4 keeps about two digits, and one near 0 may come out a few ulp below 0, returned as is.
pub fn kl_rows(gpu: &Gpu, p_logits: &Tensor, q_logits: &Tensor) -> Result<Tensor> {
    let op = "kl_rows";
    let (rows, v) = check_logits(op, "p_logits", p_logits)?;
    expect_dtype(op, "q_logits", q_logits, DType::F32)?;
    same_shape(op, "q_logits", p_logits, q_logits)?;
    row_kernel(gpu, op, &[p_logits, q_logits], rows, v)
}

pub mod cpu {
    use crate::ops::loss::cpu::cross_entropy;

    /// (weights, [Σ objective, Σ k3 over unmasked tokens, Σ clipped]) with the kernel's rules, in f64.
    pub fn policy_loss(
        losses: &[f64],
        old_logp: &[f64],
        ref_logp: &[f64],
        adv: &[f64],
        scale: &[f64],
        clip_eps: Option<f64>,
        beta: f64,
    ) -> (Vec<f64>, [f64; 3]) {
        let mut weights = Vec::with_capacity(losses.len());
        let mut totals = [0.0; 3];
        for i in 0..losses.len() {
            let s = scale[i];
            if s == 0.0 {
                weights.push(0.0);
                continue;
            }
            let logp = -losses[i];
            let ratio = (logp - old_logp[i]).exp();
            let unclipped = ratio * adv[i];
            let (mut surr, mut pg) = (unclipped, unclipped);
            if let Some(eps) = clip_eps {
                let c = ratio.clamp(1.0 - eps, 1.0 + eps) * adv[i];
                if c < unclipped {
                    (surr, pg) = (c, 0.0);
                    totals[2] += 1.0;
                }
            }
            let d = ref_logp[i] - logp;
            let k3 = d.exp_m1() - d;
            let (pen, dpen) = if beta != 0.0 { (beta * k3, -beta * d.exp_m1()) } else { (0.0, 0.0) };
            totals[0] += s * (pen - surr);
            totals[1] += k3;
            weights.push(s * (pg - dpen));
        }
        (weights, totals)
    }

    /// Σ objective of tokens whose losses come from `logits` (rows of length `v`) and `targets` by log-softmax: the
    /// scalar whose finite differences check the weights (and, through the tape, the GPU gradient).
    #[allow(clippy::too_many_arguments)]
    pub fn policy_objective(
        logits: &[f64],
        v: usize,
        targets: &[i32],
        old_logp: &[f64],
        ref_logp: &[f64],
        adv: &[f64],
        scale: &[f64],
        clip_eps: Option<f64>,
        beta: f64,
    ) -> f64 {
        let (losses, _) = cross_entropy(logits, targets, v);
        policy_loss(&losses, old_logp, ref_logp, adv, scale, clip_eps, beta).1[0]
    }

    /// Entropy of softmax of each row of length `v`; −inf logits add 0, as in the kernel.
    pub fn token_entropy(logits: &[f64], v: usize) -> Vec<f64> {
        logits
            .chunks(v)
            .map(|row| {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = row.iter().map(|x| (x - m).exp()).sum();
                let t: f64 =
                    row.iter().map(|x| if *x == f64::NEG_INFINITY { 0.0 } else { (x - m).exp() * (x - m) }).sum();
                s.ln() - t / s
            })
            .collect()
    }

    /// KL(softmax(p row) ‖ softmax(q row)) for each pair of rows of length `v`, summed term by term.
    pub fn kl_rows(p_logits: &[f64], q_logits: &[f64], v: usize) -> Vec<f64> {
        let log_softmax = |row: &[f64]| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            row.iter().map(|x| x - lse).collect::<Vec<_>>()
        };
        p_logits
            .chunks(v)
            .zip(q_logits.chunks(v))
            .map(|(p, q)| {
                let (lp, lq) = (log_softmax(p), log_softmax(q));
                // A token P gives no mass adds 0, the limit of p log(p/q).
                lp.iter().zip(&lq).map(|(a, b)| if *a == f64::NEG_INFINITY { 0.0 } else { a.exp() * (a - b) }).sum()
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
