//! Choosing the next token on the GPU: greedy, temperature, top-k and top-p sampling, one token per row of logits,
//! and the log-probabilities of chosen tokens (RL). Only ids (or log-probs) are produced, never a softmax.
//!
//! Semantics, which the kernel and [`cpu::sample`] share exactly:
//! * Tokens are ranked by logit, highest first, ties broken by the lower id (-0 and +0 tie). Filtering keeps a
//!   prefix of this ranking, so ties never make the kept set ambiguous: top-k keeps exactly k tokens, top-p the
//!   shortest prefix that reaches p.
//! * temperature = 0: the argmax (the lowest id among tied maxima); top_k, top_p and u are ignored.
//! * Otherwise w_j = exp((logit_j − max) / temperature). Top-k (k > 0; k ≥ V is off) keeps the k first tokens;
//!   top-p (p < 1) keeps, of those, the shortest prefix whose mass Σw reaches p · (mass of the top-k set). Both
//!   always keep the argmax.
//! * The token is the smallest kept id j whose cumulative kept mass, in id order, exceeds u · (total kept mass);
//!   u ≥ 1 picks the last kept token of positive weight.
//!
//! The GPU sums in f32, so a u within about (V/256 + 300) · 2⁻²⁴ of a bin edge (2e-5 at V = 50257, in probability),
//! or a p within that of a prefix's mass, may land on the neighbour. Logits must not be NaN; −inf is allowed
//! (weight 0, never drawn) as long as some logit is finite.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::elementwise::scale;
use crate::ops::loss::{cross_entropy, IGNORE_INDEX};
use crate::ops::norm::{row_grid, rows_cols};
use crate::ops::{nonempty, shape_is};
use crate::shaders::SAMPLING;
use crate::{DType, Error, Gpu, Result, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct SamplingParams {
    /// 0 = greedy; otherwise > 0 and finite.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// In (0, 1]; 1.0 = off.
    pub top_p: f32,
}

impl SamplingParams {
    pub const GREEDY: SamplingParams = SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0 };
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    v: u32,
    top_k: u32,
    inv_temp: f32,
    top_p: f32,
    greedy: u32,
    ld: u32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { rows, v, top_k, inv_temp, top_p, greedy, ld })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// (rows, V) of F32 `logits` [N, V] (any leading dims) with `other` (u or ids) of dtype `dtype` shaped like the
/// leading dims.
fn check_rows(
    op: &'static str,
    logits: &Tensor,
    what: &'static str,
    other: &Tensor,
    dtype: DType,
) -> Result<(usize, usize)> {
    let (rows, v) = rows_cols(op, "logits", logits)?;
    let rank = logits.shape().len();
    if rank < 2 {
        return Err(Error::Shape {
            op,
            what: "logits",
            expected: "[N, V] (or more leading dims)".into(),
            got: format!("{:?}", logits.shape()),
        });
    }
    nonempty(op, what, other)?;
    expect_dtype(op, what, other, dtype)?;
    shape_is(op, what, other, &logits.shape()[..rank - 1])?;
    Ok((rows, v))
}

/// One token per row of logits [N, V] (or [B, T, V]: any leading dims), on the GPU, following the semantics above,
/// with the per-row uniform `u` (shaped like the leading dims) in [0, 1) drawn by the caller from a seeded RNG, so
/// runs reproduce. Returns I32 ids shaped like `u`. Deterministic: the same logits and u give the same ids on every
/// run (fixed-order reductions, no atomics).
///
/// Cost per row, in passes over its V logits: 1 for greedy, 2 for plain sampling. Top-k and top-p bisect on the
/// logit value, one pass and workgroup reduction per step, until at most 512 tokens remain in play; those move to
/// workgroup memory and the remaining steps cost little. Top-k ≤ 256 starts from a probe that usually leaves about
/// 2k tokens in play, so it costs ~4 passes; top-p over a flat distribution (thousands of tokens kept) ~12. On
/// lavapipe (2 cores), 64 rows of V = 50257: greedy 5 ms, plain 10 ms, top-k 50 27 ms, top-k 50 + top-p 0.9 37 ms,
/// top-p 0.9 alone on uniform logits 90 ms.
pub fn sample(gpu: &Gpu, logits: &Tensor, u: &Tensor, p: SamplingParams) -> Result<Tensor> {
    let v = logits.shape().last().copied().unwrap_or(0);
    sample_columns(gpu, logits, u, p, v)
}

/// [`sample`] among the first `cols` columns of each row only (ids < cols): a model whose vocabulary is padded past
/// its tokenizer's must never emit an id the tokenizer cannot decode.
pub fn sample_columns(gpu: &Gpu, logits: &Tensor, u: &Tensor, p: SamplingParams, cols: usize) -> Result<Tensor> {
    const OP: &str = "sample";
    let (rows, ld) = check_rows(OP, logits, "u", u, DType::F32)?;
    if cols == 0 || cols > ld {
        let message = format!("sample among the first {cols} columns of rows of {ld}");
        return Err(Error::Invalid { op: OP, message });
    }
    let v = cols;
    let t = p.temperature;
    if !(t.is_finite() && t >= 0.0) {
        let message = format!("temperature must be finite and >= 0 (0 = greedy), got {t}");
        return Err(Error::Invalid { op: OP, message });
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        let message = format!("top_p must lie in (0, 1] (1 = off), got {}", p.top_p);
        return Err(Error::Invalid { op: OP, message });
    }
    let params = Params {
        rows: rows as u32,
        v: v as u32,
        top_k: if p.top_k as usize >= v { 0 } else { p.top_k },
        inv_temp: if t > 0.0 { 1.0 / t } else { 0.0 },
        top_p: p.top_p,
        greedy: (t == 0.0) as u32,
        ld: ld as u32,
    };
    let ids = gpu.alloc(u.shape(), DType::I32)?;
    gpu.dispatch(&Launch {
        op: OP,
        flops: 0,
        shader: &SAMPLING,
        entry: "sample",
        overrides: &[],
        args: &[logits, u, &ids],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok(ids)
}

/// Per-row log-softmax value of a chosen token: logp[i] = logits[i, ids[i]] − logsumexp(logits[i]) (RL needs the
/// log-probs of sampled tokens), at temperature 1 (scale the logits first for another). `ids` is I32 shaped like
/// the leading dims of `logits`; returns F32 of that shape. An id of [`IGNORE_INDEX`] (padding) gives 0; any other
/// id outside [0, V) gives NaN (ids live on the GPU).
pub fn token_logprobs(gpu: &Gpu, logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    check_rows("token_logprobs", logits, "ids", ids, DType::I32)?;
    // The log-prob is minus the cross-entropy loss, which its kernel computes with the same row reductions.
    let (loss, _lse) = cross_entropy(gpu, logits, ids)?;
    scale(gpu, &loss, -1.0)
}

pub mod cpu {
    use super::SamplingParams;

    /// Token ids in rank order: logit descending, ties by ascending id.
    pub fn ranking(row: &[f64]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..row.len()).collect();
        // partial_cmp, unlike total_cmp, ties -0 with +0, as the kernel does.
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).expect("NaN logit").then(a.cmp(&b)));
        order
    }

    /// The unnormalized weights exp((x − max)/T) of the kept tokens, 0 for dropped ones (T > 0).
    pub fn kept_weights(row: &[f64], p: SamplingParams) -> Vec<f64> {
        let t = p.temperature as f64;
        assert!(t > 0.0, "kept_weights needs a temperature > 0");
        let order = ranking(row);
        let m = row[order[0]];
        let w: Vec<f64> = row.iter().map(|&x| if x == m { 1.0 } else { ((x - m) / t).exp() }).collect();
        let mut n = row.len();
        if p.top_k > 0 && (p.top_k as usize) < n {
            n = p.top_k as usize;
        }
        if p.top_p < 1.0 {
            let goal = p.top_p as f64 * order[..n].iter().map(|&j| w[j]).sum::<f64>();
            let mut acc = 0.0;
            for (i, &j) in order[..n].iter().enumerate() {
                acc += w[j];
                if acc >= goal {
                    n = i + 1;
                    break;
                }
            }
        }
        let mut kept = vec![0.0; row.len()];
        order[..n].iter().for_each(|&j| kept[j] = w[j]);
        kept
    }

    /// The probability of each token under `p` (after filtering and renormalization).
    pub fn probabilities(row: &[f64], p: SamplingParams) -> Vec<f64> {
        if p.temperature == 0.0 {
            let mut out = vec![0.0; row.len()];
            out[ranking(row)[0]] = 1.0;
            return out;
        }
        let w = kept_weights(row, p);
        let total: f64 = w.iter().sum();
        w.iter().map(|x| x / total).collect()
    }

    /// One id per row of `logits` (rows of length `v`) with the per-row uniforms `u`.
    pub fn sample(logits: &[f64], v: usize, u: &[f64], p: SamplingParams) -> Vec<i32> {
        logits
            .chunks(v)
            .zip(u)
            .map(|(row, &u)| {
                if p.temperature == 0.0 {
                    return ranking(row)[0] as i32;
                }
                let w = kept_weights(row, p);
                let goal = u.clamp(0.0, 1.0) * w.iter().sum::<f64>();
                let mut acc = 0.0;
                let mut last = 0;
                for (j, &wj) in w.iter().enumerate().filter(|(_, &wj)| wj > 0.0) {
                    acc += wj;
                    last = j;
                    if acc > goal {
                        break;
                    }
                }
                last as i32
            })
            .collect()
    }

    /// logits[i, ids[i]] − logsumexp(logits[i]); 0 for IGNORE_INDEX, NaN for another id outside [0, v).
    pub fn token_logprobs(logits: &[f64], v: usize, ids: &[i32]) -> Vec<f64> {
        logits
            .chunks(v)
            .zip(ids)
            .map(|(row, &id)| {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                match id {
                    super::IGNORE_INDEX => 0.0,
                    id if id >= 0 && (id as usize) < v => row[id as usize] - lse,
                    _ => f64::NAN,
                }
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "sampling_tests.rs"]
mod tests;
