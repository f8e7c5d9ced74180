//! The model, defined once for every family: a parameter table (name, shape, init rule, decay) and one block
//! forward. Training (a recording tape, all positions) and decoding (a `no_grad` tape, a KV cache, new positions
//! only) run the same `forward`; the only difference is whether attention reads and writes a cache.
//!
//! A block is pre-norm attention then a pre-norm MLP, each added to the residual stream:
//!   x += proj(attention(rope?(qkv(norm_1(x)))));   x += down(act(up(norm_2(x))))
//! GPT-2: LayerNorm, learned positions, no rope, GELU(tanh) with up = c_fc. Llama: RMSNorm, rope on q and k,
//! grouped-query attention, SwiGLU with up = [gate | up] fused into one product. Each family's file (gpt2.rs,
//! llama.rs) owns its parameter table, its Hugging Face tensor schema and its config.json.
//!
//! Shapes: B batch, T time, C channels (n_embd), N = B·T rows, V vocab, W = (n_head + 2·n_kv_head)·head_size.

pub mod config;
pub mod gpt2;
pub mod llama;
mod schema;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use kiln_engine::autograd::{Param, Tape, Var};
use kiln_engine::ops::attention::segment_starts;
use kiln_engine::ops::classifier;
use kiln_engine::ops::kv_cache::KvCache;
use kiln_engine::ops::matmul::MatmulSpec;
use kiln_engine::ops::policy::token_entropy;
use kiln_engine::ops::rope::RopeTable;
use kiln_engine::{Gpu, Tensor};

use crate::checkpoint::HostTensor;
use crate::error::{ModelError, Result};
use config::{Family, ModelConfig};
pub use schema::{export_hf, import_hf};

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal { std: f32 },
}

/// One row of a model's parameter table.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Kiln's name: the Hugging Face name, except where a family fuses several HF tensors into one (its schema
    /// splits them on export).
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// AdamW pulls it toward zero (matrices; not biases or norm gains).
    pub decay: bool,
}

/// A linear layer: weight and optional bias indices, and how the weight is stored (GPT-2's Conv1D [in, out]
/// is x·W; nn.Linear's [out, in] is x·Wᵀ).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Linear {
    pub w: usize,
    pub b: Option<usize>,
    pub spec: MatmulSpec,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Norm {
    Layer { gamma: usize, beta: usize },
    Rms { gamma: usize },
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockLayout {
    pub norm_1: Norm,
    pub qkv: Linear,
    pub proj: Linear,
    pub norm_2: Norm,
    /// c_fc (GPT-2) or [gate | up] (Llama).
    pub up: Linear,
    pub down: Linear,
}

/// Where each part of the forward finds its parameters.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub wte: usize,
    pub wpe: Option<usize>,
    pub blocks: Vec<BlockLayout>,
    pub norm_f: Norm,
    /// The output head; the token embedding when tied.
    pub head: Linear,
}

/// Builds a parameter table and its layout together, so an index can never point at the wrong row.
#[derive(Default)]
pub(crate) struct TableBuilder {
    pub specs: Vec<ParamSpec>,
}

impl TableBuilder {
    pub fn push(&mut self, name: String, shape: Vec<usize>, init: Init, decay: bool) -> usize {
        self.specs.push(ParamSpec { name, shape, init, decay });
        self.specs.len() - 1
    }
}

/// The parameter table of `config` (family order: embeddings, each block, final norm, head).
pub fn param_table(config: &ModelConfig) -> Vec<ParamSpec> {
    table(config).0
}

/// `tensors` (Kiln names, table order) of a model with `config.vocab_size` rows of vocabulary, grown to `vocab`
/// rows: the token embedding and an untied output head get new rows equal to the mean of their existing rows, so
/// a new token starts as an average token (Hugging Face's resize_token_embeddings does the same) and every
/// existing token's logits are unchanged. Returns the new config and tensors.
pub fn grow_vocab(
    config: &ModelConfig,
    tensors: Vec<HostTensor>,
    vocab: usize,
) -> Result<(ModelConfig, Vec<HostTensor>)> {
    let (specs, layout) = table(config);
    let mut tensors = schema::in_table_order(config, &specs, tensors, None)?;
    if vocab < config.vocab_size {
        return Err(ModelError::Config(format!(
            "cannot shrink the vocabulary from {} to {vocab} rows",
            config.vocab_size
        )));
    }
    let c = config.n_embd;
    let mut rows = vec![layout.wte];
    if layout.head.w != layout.wte {
        rows.push(layout.head.w);
    }
    for i in rows {
        let t = &mut tensors[i];
        let mean: Vec<f32> = (0..c)
            .map(|j| {
                (t.data.iter().skip(j).step_by(c).map(|&v| v as f64).sum::<f64>() / config.vocab_size as f64) as f32
            })
            .collect();
        for _ in config.vocab_size..vocab {
            t.data.extend_from_slice(&mean);
        }
        t.shape[0] = vocab;
    }
    Ok((ModelConfig { vocab_size: vocab, ..config.clone() }, tensors))
}

fn table(config: &ModelConfig) -> (Vec<ParamSpec>, Layout) {
    match config.family {
        Family::Gpt2 => gpt2::table(config),
        Family::Llama => llama::table(config),
    }
}

/// What attention sees.
pub enum Attend<'c> {
    /// Each row is one sequence from position 0, causal.
    Causal,
    /// Row b holds sequences of `lengths[b]` tokens end to end (positions after them form one more): positions
    /// restart at 0 for each and attention stays inside it, so every sequence computes what it would alone.
    Packed(&'c [Vec<usize>]),
    /// Decoding: the tokens sit at positions pos..pos+T of every row, and attention appends their keys and values
    /// to one cache per layer and reads the prefix from it (no_grad tapes only).
    Cached { caches: &'c [KvCache], pos: usize },
}

/// Per-token results of a forward pass.
pub struct Forward {
    /// [B, T] cross-entropy per position (0 where the target is ignored).
    pub losses: Var,
    /// Σ weights·losses (one element): what backward starts from.
    pub loss: Var,
}

/// Which activations backward recomputes instead of keeping (llm.c's `-r`): memory for time, never results (the
/// same kernels run on the same inputs, so gradients are bit for bit those of `None`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every activation.
    #[default]
    None,
    /// Recompute the MLP activation (GELU, or SwiGLU in the Llama family) from its input: the widest tensor.
    Gelu,
    /// Keep only each block's input and recompute the whole block in backward.
    Block,
}

pub struct Model {
    pub config: ModelConfig,
    /// What backward recomputes (training sets it from its config).
    pub recompute: Recompute,
    /// In the order of `param_table(&config)`.
    pub params: Vec<Param>,
    pub specs: Vec<ParamSpec>,
    layout: Layout,
    /// cos/sin of every position (Llama family).
    rope: Option<RopeTable>,
}

fn normal(rng: &mut ChaCha8Rng, std: f32) -> f32 {
    // Box–Muller: two uniforms give one standard normal.
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random_range(0.0..1.0);
    std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

impl Model {
    /// A freshly initialised model: every parameter drawn by its table row's rule, in table order from `seed`.
    pub fn new(gpu: &Gpu, config: &ModelConfig, seed: u64) -> Result<Model> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let tensors = param_table(config)
            .into_iter()
            .map(|s| {
                let n: usize = s.shape.iter().product();
                let data = match s.init {
                    Init::Zeros => vec![0.0; n],
                    Init::Ones => vec![1.0; n],
                    Init::Normal { std } => (0..n).map(|_| normal(&mut rng, std)).collect(),
                };
                HostTensor { name: s.name, shape: s.shape, data }
            })
            .collect();
        Model::from_host(gpu, config, tensors)
    }

    /// Upload named tensors (Kiln names, e.g. a loaded checkpoint); names and shapes must match the table.
    pub fn from_host(gpu: &Gpu, config: &ModelConfig, tensors: Vec<HostTensor>) -> Result<Model> {
        config.validate()?;
        let (specs, layout) = table(config);
        let tensors = schema::in_table_order(config, &specs, tensors, None)?;
        let params = specs
            .iter()
            .zip(tensors)
            .map(|(s, t)| Ok(Param::new(gpu, s.name.clone(), gpu.upload(&t.data, &s.shape)?)?))
            .collect::<Result<Vec<_>>>()?;
        let rope = match config.family {
            Family::Gpt2 => None,
            Family::Llama => Some(RopeTable::new(gpu, config.head_size(), config.n_ctx, config.rope_theta)?),
        };
        Ok(Model { config: config.clone(), recompute: Recompute::None, params, specs, layout, rope })
    }

    /// Host copies of every parameter under its Kiln name (for checkpoints).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<HostTensor>> {
        self.params
            .iter()
            .map(|p| {
                Ok(HostTensor { name: p.name.clone(), shape: p.value.shape().to_vec(), data: gpu.read(&p.value)? })
            })
            .collect()
    }

    pub fn zero_grad(&self, gpu: &Gpu) -> Result<()> {
        for p in &self.params {
            p.zero_grad(gpu)?;
        }
        Ok(())
    }

    /// Check a token batch before it reaches the GPU: ids in range, positions within the context.
    pub fn check_tokens(&self, tokens: &[i32], batch: usize, time: usize) -> Result<()> {
        self.check_tokens_at(tokens, batch, time, 0)
    }

    fn check_tokens_at(&self, tokens: &[i32], batch: usize, time: usize, pos: usize) -> Result<()> {
        if batch == 0 || time == 0 || tokens.len() != batch * time {
            return Err(ModelError::Data(format!(
                "a batch of {batch}×{time} needs {} tokens, got {}",
                batch * time,
                tokens.len()
            )));
        }
        if pos + time > self.config.n_ctx {
            let at =
                if pos > 0 { format!("positions {pos}..{}", pos + time) } else { format!("sequence length {time}") };
            return Err(ModelError::Data(format!("{at} exceeds the model's context n_ctx = {}", self.config.n_ctx)));
        }
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= self.config.vocab_size) {
            return Err(ModelError::Data(format!(
                "token id {t} at position {i} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Logits [B, T, V] of `tokens` ([B, T] row-major): the one forward of every path, through the output head.
    /// A head larger than one storage binding is applied in parts without a backward (decoding, inspect);
    /// training goes through [`Model::forward`], whose chunked classifier never forms the logits.
    pub fn forward_logits<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        tokens: &[i32],
        batch: usize,
        time: usize,
        attend: Attend<'_>,
    ) -> Result<Var> {
        let x = self.forward_hidden(tape, tokens, batch, time, attend)?;
        let head = self.layout.head;
        let w = &self.params[head.w];
        let gpu = tape.gpu();
        let logits = if w.value.bytes() <= gpu.max_binding() || !self.head_is_classifier() {
            self.linear(tape, x, head)?
        } else if tape.records() {
            return Err(ModelError::Config(format!(
                "the output head [{}, {}] is larger than one storage binding ({} bytes on {}): full logits have no \
                 backward there; train through Model::forward (the chunked classifier)",
                self.config.vocab_size,
                self.config.n_embd,
                gpu.max_binding(),
                gpu.adapter_name()
            )));
        } else {
            tape.input(classifier::logits(gpu, tape.value(x), &w.value)?)
        };
        Ok(tape.reshape(logits, &[batch, time, self.config.vocab_size])?)
    }

    /// Whether the head is x·Wᵀ with W [V, C] and no bias: the shape the chunked classifier takes (both families).
    fn head_is_classifier(&self) -> bool {
        self.layout.head.b.is_none() && self.layout.head.spec == MatmulSpec::nt()
    }

    /// The final hidden states [B·T, C] (after the last norm) of `tokens`: everything but the output head.
    pub fn forward_hidden<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        tokens: &[i32],
        batch: usize,
        time: usize,
        attend: Attend<'_>,
    ) -> Result<Var> {
        let c = &self.config;
        let pos0 = if let Attend::Cached { pos, .. } = attend { pos } else { 0 };
        self.check_tokens_at(tokens, batch, time, pos0)?;
        let gpu = tape.gpu();
        // Host position ids (None = 0..T in every row) and, for packed rows, each query's first visible key.
        let (positions, starts): (Option<Vec<i32>>, Option<Tensor>) = match attend {
            Attend::Causal => (None, None),
            Attend::Packed(rows) => {
                if rows.len() != batch || rows.iter().any(|r| r.iter().sum::<usize>() > time) {
                    return Err(ModelError::Data(format!(
                        "packing layout: need {batch} rows of sequence lengths summing to at most T = {time}"
                    )));
                }
                let starts = segment_starts(rows, time);
                let positions = starts.iter().enumerate().map(|(i, &s)| (i % time) as i32 - s).collect();
                (Some(positions), Some(gpu.upload_i32(&starts, &[batch, time])?))
            }
            Attend::Cached { caches, pos } => {
                if caches.len() != c.n_layer {
                    let message = format!("{} caches for {} layers", caches.len(), c.n_layer);
                    return Err(ModelError::Data(message));
                }
                let row = (pos..pos + time).map(|p| p as i32);
                (Some((0..batch).flat_map(|_| row.clone()).collect()), None)
            }
        };
        let rope_positions = match &self.rope {
            None => None,
            Some(_) => {
                let ids: Vec<i32> = match &positions {
                    Some(p) => p.clone(),
                    None => (0..batch).flat_map(|_| 0..time as i32).collect(),
                };
                Some(gpu.upload_i32(&ids, &[batch, time])?)
            }
        };
        let l = &self.layout;
        let wpe = l.wpe.map(|i| &self.params[i]);
        let x = tape.embedding_at(tokens, positions.as_deref(), batch, time, &self.params[l.wte], wpe)?;
        let mut x = tape.reshape(x, &[batch * time, c.n_embd])?;
        let ctx = BlockCtx { batch, time, starts: starts.as_ref(), rope_positions: rope_positions.as_ref(), attend };
        for (i, b) in l.blocks.iter().enumerate() {
            x = self.block(tape, x, b, i, &ctx)?;
        }
        self.norm(tape, x, l.norm_f)
    }

    /// One transformer block on x [N, C] (see the file's opening comment).
    fn block<'a>(&'a self, tape: &mut Tape<'a>, x: Var, b: &BlockLayout, layer: usize, ctx: &BlockCtx) -> Result<Var> {
        let c = &self.config;
        let (nh, nkv) = (c.n_head, c.n_kv_head);
        let mark = tape.mark();
        let h = self.norm(tape, x, b.norm_1)?;
        let qkv = self.linear(tape, h, b.qkv)?;
        let mut qkv = tape.reshape(qkv, &[ctx.batch, ctx.time, c.qkv_width()])?;
        if let (Some(table), Some(positions)) = (&self.rope, ctx.rope_positions) {
            qkv = tape.rope(qkv, positions, table, (nh, nkv))?;
        }
        let a = match ctx.attend {
            Attend::Cached { caches, pos } => tape.attention_cached(qkv, &caches[layer], pos)?,
            _ => tape.attention_segments(qkv, (nh, nkv), ctx.starts)?,
        };
        let a = tape.reshape(a, &[ctx.batch * ctx.time, c.n_embd])?;
        let a = self.linear(tape, a, b.proj)?;
        let x = tape.add(x, a)?;
        let h = self.norm(tape, x, b.norm_2)?;
        let f = self.linear(tape, h, b.up)?;
        let f = match c.family {
            Family::Gpt2 => tape.gelu(f)?,
            Family::Llama => tape.swiglu(f)?,
        };
        let act = f;
        let f = self.linear(tape, f, b.down)?;
        let out = tape.add(x, f)?;
        match self.recompute {
            Recompute::None => {}
            Recompute::Gelu => tape.forget(act),
            Recompute::Block => tape.forget_since(mark, out),
        }
        Ok(out)
    }

    fn norm<'a>(&'a self, tape: &mut Tape<'a>, x: Var, n: Norm) -> Result<Var> {
        let eps = self.config.norm_eps as f32;
        Ok(match n {
            Norm::Layer { gamma, beta } => {
                let (g, b) = (tape.param(&self.params[gamma]), tape.param(&self.params[beta]));
                tape.layernorm(x, g, b, eps)?
            }
            Norm::Rms { gamma } => {
                let g = tape.param(&self.params[gamma]);
                tape.rmsnorm(x, g, eps)?
            }
        })
    }

    fn linear<'a>(&'a self, tape: &mut Tape<'a>, x: Var, l: Linear) -> Result<Var> {
        let w = tape.param(&self.params[l.w]);
        let b = l.b.map(|i| tape.param(&self.params[i]));
        Ok(tape.matmul(x, w, b, l.spec)?)
    }

    /// Logits [B, T, V] of `tokens` ([B, T] row-major), each row one causal sequence.
    pub fn logits<'a>(&'a self, tape: &mut Tape<'a>, tokens: &[i32], batch: usize, time: usize) -> Result<Var> {
        self.forward_logits(tape, tokens, batch, time, Attend::Causal)
    }

    /// Logits of packed rows (see [`Attend::Packed`]; None = causal rows).
    pub fn logits_packed<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        tokens: &[i32],
        batch: usize,
        time: usize,
        packed: Option<&[Vec<usize>]>,
    ) -> Result<Var> {
        let attend = packed.map_or(Attend::Causal, Attend::Packed);
        self.forward_logits(tape, tokens, batch, time, attend)
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

    /// [`Model::forward`] of packed rows (see [`Attend::Packed`]).
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
        let (losses, _) = self.token_losses(tape, tokens, batch, time, packed, targets, false)?;
        let loss = tape.weighted_sum(losses, weights)?;
        Ok(Forward { losses, loss })
    }

    /// Cross-entropy of every position against `targets` (I32 [B, T], -1 = ignored) → [B, T], through the chunked
    /// classifier (no [B·T, V] logits), and with `entropy` each position's softmax entropy (a metric, no gradient).
    #[allow(clippy::too_many_arguments)]
    pub fn token_losses<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        tokens: &[i32],
        batch: usize,
        time: usize,
        packed: Option<&[Vec<usize>]>,
        targets: &Tensor,
        entropy: bool,
    ) -> Result<(Var, Option<Tensor>)> {
        if !self.head_is_classifier() {
            let logits = self.logits_packed(tape, tokens, batch, time, packed)?;
            let losses = tape.cross_entropy(logits, targets)?;
            let h = if entropy { Some(token_entropy(tape.gpu(), tape.value(logits))?) } else { None };
            return Ok((losses, h));
        }
        let attend = packed.map_or(Attend::Causal, Attend::Packed);
        let x = self.forward_hidden(tape, tokens, batch, time, attend)?;
        let w = &self.params[self.layout.head.w];
        Ok(if entropy {
            let (losses, h) = tape.classifier_loss_entropy(x, w, targets)?;
            (losses, Some(h))
        } else {
            (tape.classifier_loss(x, w, targets)?, None)
        })
    }

    /// A KV cache per layer for `batch` rows of up to `max_len` positions.
    pub fn kv_caches(&self, gpu: &Gpu, batch: usize, max_len: usize) -> Result<Vec<KvCache>> {
        let c = &self.config;
        (0..c.n_layer).map(|_| Ok(KvCache::new(gpu, batch, (c.n_head, c.n_kv_head), c.head_size(), max_len)?)).collect()
    }
}

/// What every block of one forward shares.
struct BlockCtx<'c> {
    batch: usize,
    time: usize,
    starts: Option<&'c Tensor>,
    rope_positions: Option<&'c Tensor>,
    attend: Attend<'c>,
}
