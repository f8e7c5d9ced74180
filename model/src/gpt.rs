//! The GPT-2 architecture on Kiln's tape: learned position embeddings, pre-LayerNorm blocks with causal
//! multi-head attention and a GELU(tanh) MLP of width 4C, a final LayerNorm, and an lm_head tied to the token
//! embedding. Parameters carry their Hugging Face GPT-2 names, so checkpoints load in other GPT-2 tools.
//!
//! One `forward` serves pretraining (mean loss), fine-tuning (masked targets) and RL (signed per-token weights):
//! it returns the per-token losses and the weighted sum the caller asks for.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use kiln_engine::autograd::{Param, Tape, Var};
use kiln_engine::ops::attention::segment_starts;
use kiln_engine::ops::matmul::MatmulSpec;
use kiln_engine::{Gpu, Tensor};

use crate::checkpoint::{check_gpt2_tensors, gpt2_param_shapes, HostTensor};
use crate::config::GptConfig;
use crate::error::{ModelError, Result};

/// LayerNorm epsilon of GPT-2.
pub const LN_EPS: f32 = 1e-5;

/// Parameters of one transformer block, as (weight, bias) indices into `Gpt::params`.
pub(crate) struct Block {
    pub(crate) ln_1: (usize, usize),
    pub(crate) c_attn: (usize, usize),
    pub(crate) attn_proj: (usize, usize),
    pub(crate) ln_2: (usize, usize),
    pub(crate) c_fc: (usize, usize),
    pub(crate) mlp_proj: (usize, usize),
}

pub struct Gpt {
    pub config: GptConfig,
    /// In the order of `gpt2_param_shapes`: wte, wpe, then each block, then ln_f.
    pub params: Vec<Param>,
    pub(crate) blocks: Vec<Block>,
}

/// Per-token results of a forward pass.
pub struct Forward {
    /// [B, T, V]
    pub logits: Var,
    /// [B, T] cross-entropy per position (0 where the target is ignored).
    pub losses: Var,
    /// Σ weights·losses (one element): what backward starts from.
    pub loss: Var,
}

fn normal(rng: &mut ChaCha8Rng, std: f32) -> f32 {
    // Box–Muller: two uniforms give one standard normal.
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random_range(0.0..1.0);
    std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

impl Gpt {
    /// GPT-2 initialisation: weights N(0, 0.02), the two residual projections of each block N(0, 0.02/√(2L))
    /// so the residual stream's variance does not grow with depth, biases 0, LayerNorm gains 1.
    pub fn new(gpu: &Gpu, config: &GptConfig, seed: u64) -> Result<Gpt> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let resid_std = 0.02 / (2.0 * config.n_layer as f32).sqrt();
        let tensors = gpt2_param_shapes(config)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data = if name.ends_with(".bias") {
                    vec![0.0; n]
                } else if name.contains("ln_") {
                    vec![1.0; n]
                } else {
                    let std = if name.ends_with("c_proj.weight") { resid_std } else { 0.02 };
                    (0..n).map(|_| normal(&mut rng, std)).collect()
                };
                HostTensor { name, shape, data }
            })
            .collect();
        Gpt::from_host(gpu, config, tensors)
    }

    /// Upload named tensors (e.g. a checkpoint); names and shapes must match `config` exactly.
    pub fn from_host(gpu: &Gpu, config: &GptConfig, tensors: Vec<HostTensor>) -> Result<Gpt> {
        config.validate()?;
        check_gpt2_tensors(config, &tensors)?;
        let order = gpt2_param_shapes(config);
        let mut by_name: std::collections::HashMap<String, HostTensor> =
            tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        let mut params = Vec::with_capacity(order.len());
        for (name, shape) in &order {
            let t = by_name.remove(name).expect("checked by check_gpt2_tensors");
            params.push(Param::new(gpu, name.clone(), gpu.upload(&t.data, shape)?)?);
        }
        let index =
            |name: String| -> usize { order.iter().position(|(n, _)| *n == name).expect("name from the same list") };
        let pair = |i: usize, part: &str| {
            (index(format!("transformer.h.{i}.{part}.weight")), index(format!("transformer.h.{i}.{part}.bias")))
        };
        let blocks = (0..config.n_layer)
            .map(|i| Block {
                ln_1: pair(i, "ln_1"),
                c_attn: pair(i, "attn.c_attn"),
                attn_proj: pair(i, "attn.c_proj"),
                ln_2: pair(i, "ln_2"),
                c_fc: pair(i, "mlp.c_fc"),
                mlp_proj: pair(i, "mlp.c_proj"),
            })
            .collect();
        Ok(Gpt { config: config.clone(), params, blocks })
    }

    /// Host copies of every parameter under its HF name (for checkpoints).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<HostTensor>> {
        self.params
            .iter()
            .map(|p| {
                Ok(HostTensor { name: p.name.clone(), shape: p.value.shape().to_vec(), data: gpu.read(&p.value)? })
            })
            .collect()
    }

    fn param<'a>(&'a self, tape: &mut Tape<'a>, i: usize) -> Var {
        tape.param(&self.params[i])
    }

    /// Check a token batch before it reaches the GPU: ids in range, sequence within the context.
    pub fn check_tokens(&self, tokens: &[i32], batch: usize, time: usize) -> Result<()> {
        if batch == 0 || time == 0 || tokens.len() != batch * time {
            return Err(ModelError::Data(format!(
                "a batch of {batch}×{time} needs {} tokens, got {}",
                batch * time,
                tokens.len()
            )));
        }
        if time > self.config.n_ctx {
            return Err(ModelError::Data(format!(
                "sequence length {time} exceeds the model's context n_ctx = {}",
                self.config.n_ctx
            )));
        }
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= self.config.vocab_size) {
            return Err(ModelError::Data(format!(
                "token id {t} at position {i} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Logits [B, T, V] of `tokens` ([B, T] row-major).
    pub fn logits<'a>(&'a self, tape: &mut Tape<'a>, tokens: &[i32], batch: usize, time: usize) -> Result<Var> {
        self.logits_packed(tape, tokens, batch, time, None)
    }

    /// Logits of rows that each hold several sequences end to end (`packed[b]` = their lengths, summing to at most
    /// T; positions after them form one more sequence): positions restart at 0 for each sequence and attention
    /// stays inside it, so every sequence computes what it would alone.
    pub fn logits_packed<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        tokens: &[i32],
        batch: usize,
        time: usize,
        packed: Option<&[Vec<usize>]>,
    ) -> Result<Var> {
        self.check_tokens(tokens, batch, time)?;
        let layout = match packed {
            None => None,
            Some(rows) => {
                if rows.len() != batch || rows.iter().any(|r| r.iter().sum::<usize>() > time) {
                    return Err(ModelError::Data(format!(
                        "packing layout: need {batch} rows of sequence lengths summing to at most T = {time}"
                    )));
                }
                let starts = segment_starts(rows, time);
                let positions: Vec<i32> = starts.iter().enumerate().map(|(i, &s)| (i % time) as i32 - s).collect();
                Some((positions, tape.gpu().upload_i32(&starts, &[batch, time])?))
            }
        };
        let nn = MatmulSpec::nn();
        let positions = layout.as_ref().map(|(p, _)| p.as_slice());
        let starts = layout.as_ref().map(|(_, s)| s);
        let mut x = tape.embedding_at(tokens, positions, batch, time, &self.params[0], &self.params[1])?;
        for b in &self.blocks {
            let (g, bias) = (self.param(tape, b.ln_1.0), self.param(tape, b.ln_1.1));
            let h = tape.layernorm(x, g, bias, LN_EPS)?;
            let (w, bias) = (self.param(tape, b.c_attn.0), self.param(tape, b.c_attn.1));
            let qkv = tape.matmul(h, w, Some(bias), nn)?;
            let a = tape.attention_segments(qkv, self.config.n_head, starts)?;
            let (w, bias) = (self.param(tape, b.attn_proj.0), self.param(tape, b.attn_proj.1));
            let a = tape.matmul(a, w, Some(bias), nn)?;
            x = tape.add(x, a)?;
            let (g, bias) = (self.param(tape, b.ln_2.0), self.param(tape, b.ln_2.1));
            let h = tape.layernorm(x, g, bias, LN_EPS)?;
            let (w, bias) = (self.param(tape, b.c_fc.0), self.param(tape, b.c_fc.1));
            let f = tape.matmul(h, w, Some(bias), nn)?;
            let f = tape.gelu(f)?;
            let (w, bias) = (self.param(tape, b.mlp_proj.0), self.param(tape, b.mlp_proj.1));
            let f = tape.matmul(f, w, Some(bias), nn)?;
            x = tape.add(x, f)?;
        }
        let n = self.params.len();
        let (g, bias) = (self.param(tape, n - 2), self.param(tape, n - 1));
        let x = tape.layernorm(x, g, bias, LN_EPS)?;
        let wte = self.param(tape, 0); // tied lm_head
        Ok(tape.matmul(x, wte, None, MatmulSpec::nt())?)
    }

    /// Logits, per-token losses against `targets` (I32 [B, T], -1 = ignored) and Σ weights·losses.
    pub fn forward<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        tokens: &[i32],
        batch: usize,
        time: usize,
        targets: &Tensor,
        weights: &Tensor,
    ) -> Result<Forward> {
        self.forward_packed(tape, tokens, batch, time, None, targets, weights)
    }

    /// [`Gpt::forward`] of packed rows (see [`Gpt::logits_packed`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_packed<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        tokens: &[i32],
        batch: usize,
        time: usize,
        packed: Option<&[Vec<usize>]>,
        targets: &Tensor,
        weights: &Tensor,
    ) -> Result<Forward> {
        let logits = self.logits_packed(tape, tokens, batch, time, packed)?;
        let losses = tape.cross_entropy(logits, targets)?;
        let loss = tape.weighted_sum(losses, weights)?;
        Ok(Forward { logits, losses, loss })
    }

    pub fn zero_grad(&self, gpu: &Gpu) -> Result<()> {
        for p in &self.params {
            p.zero_grad(gpu)?;
        }
        Ok(())
    }
}
