//! Text generation with a KV cache on the GPU: the prompt is run once (prefill) and its keys and values cached per
//! layer; each new token then costs one position's worth of work. Sampling (temperature, top-k, top-p) runs on the
//! GPU with uniforms drawn from a seeded RNG, so a seed reproduces the same text. Several samples of one prompt
//! share the prompt's prefill (RL draws G completions per prompt this way).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use kiln_engine::ops::kv_cache::{attention_cached, kv_append, kv_broadcast_row, KvCache};
use kiln_engine::ops::matmul::{matmul, MatmulSpec};
use kiln_engine::ops::sampling::{sample, SamplingParams};
use kiln_engine::ops::{elementwise, embedding, norm};
use kiln_engine::{DType, Gpu, Tensor};

use crate::error::{ModelError, Result};
use crate::gpt::{Gpt, LN_EPS};

/// How to generate.
#[derive(Clone, Copy, Debug)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// Stop a sample when it emits this token (it is kept in the output).
    pub stop_token: Option<u32>,
}

/// A model with one KV cache per layer, positioned after `len` tokens.
pub struct Session<'m> {
    model: &'m Gpt,
    caches: Vec<KvCache>,
    batch: usize,
    len: usize,
}

impl<'m> Session<'m> {
    pub fn new(gpu: &Gpu, model: &'m Gpt, batch: usize) -> Result<Session<'m>> {
        let c = &model.config;
        let caches = (0..c.n_layer)
            .map(|_| KvCache::new(gpu, batch, c.n_head, c.head_size(), c.n_ctx))
            .collect::<kiln_engine::Result<Vec<_>>>()?;
        Ok(Session { model, caches, batch, len: 0 })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Run `tokens` ([batch, t] row-major) at positions len..len+t through the model, caching keys and values;
    /// returns the logits of every fed position [batch, t, V].
    pub fn feed(&mut self, gpu: &Gpu, tokens: &[i32], t: usize) -> Result<Tensor> {
        let m = self.model;
        let c = &m.config;
        m.check_tokens(tokens, self.batch, t)?;
        if self.len + t > c.n_ctx {
            return Err(ModelError::Data(format!(
                "generation would reach position {} but the model's context is n_ctx = {}",
                self.len + t,
                c.n_ctx
            )));
        }
        let p = |i: usize| &m.params[i].value;
        // Position rows len..len+t of wpe, so the embedding kernel (which adds wpe[0..t]) sees absolute positions.
        let wpe = gpu.alloc(&[t, c.n_embd], DType::F32)?;
        gpu.copy_elements(p(1), self.len * c.n_embd, &wpe, 0, t * c.n_embd)?;
        let ids = gpu.upload_i32(tokens, &[self.batch, t])?;
        let mut x = embedding::embedding(gpu, &ids, p(0), &wpe)?;
        let nn = MatmulSpec::nn();
        for (b, cache) in m.blocks.iter().zip(&self.caches) {
            let (h, _, _) = norm::layernorm(gpu, &x, p(b.ln_1.0), p(b.ln_1.1), LN_EPS)?;
            let qkv = matmul(gpu, &h, p(b.c_attn.0), Some(p(b.c_attn.1)), nn)?;
            kv_append(gpu, cache, &qkv, self.len)?;
            let a = attention_cached(gpu, cache, &qkv, self.len)?;
            let a = matmul(gpu, &a, p(b.attn_proj.0), Some(p(b.attn_proj.1)), nn)?;
            x = elementwise::add(gpu, &x, &a, 1.0)?;
            let (h, _, _) = norm::layernorm(gpu, &x, p(b.ln_2.0), p(b.ln_2.1), LN_EPS)?;
            let f = matmul(gpu, &h, p(b.c_fc.0), Some(p(b.c_fc.1)), nn)?;
            let f = elementwise::gelu(gpu, &f)?;
            let f = matmul(gpu, &f, p(b.mlp_proj.0), Some(p(b.mlp_proj.1)), nn)?;
            x = elementwise::add(gpu, &x, &f, 1.0)?;
        }
        let n = m.params.len();
        let (x, _, _) = norm::layernorm(gpu, &x, p(n - 2), p(n - 1), LN_EPS)?;
        self.len += t;
        Ok(matmul(gpu, &x, p(0), None, MatmulSpec::nt())?)
    }

    /// Copy batch row 0's cache into every other row (a prompt prefilled once, fanned out to the samples).
    pub fn fan_out(&mut self, gpu: &Gpu) -> Result<()> {
        for cache in &self.caches {
            kv_broadcast_row(gpu, cache, 0, self.len)?;
        }
        Ok(())
    }
}

/// `samples` continuations of one prompt. Calls `on_token(sample, id)` as each token is chosen (for streaming).
pub fn generate(
    gpu: &Gpu,
    model: &Gpt,
    prompt: &[u32],
    samples: usize,
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    if prompt.is_empty() {
        return Err(ModelError::Data("the prompt is empty: give at least one token".into()));
    }
    if samples == 0 {
        return Err(ModelError::Data("samples must be at least 1".into()));
    }
    let v = model.config.vocab_size;
    let mut session = Session::new(gpu, model, samples)?;
    // Prefill every row with the prompt (simple and exact; `fan_out` serves callers that prefill one row).
    let prompt_i32: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let rows: Vec<i32> = (0..samples).flat_map(|_| prompt_i32.iter().copied()).collect();
    let logits = session.feed(gpu, &rows, prompt.len())?;
    let mut last = last_position(gpu, &logits, samples, prompt.len(), v)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut out = vec![Vec::new(); samples];
    let mut done = vec![false; samples];
    let room = model.config.n_ctx - prompt.len();
    for _ in 0..cfg.max_new_tokens.min(room) {
        let u: Vec<f32> = (0..samples).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let ids = sample(gpu, &last, &gpu.upload(&u, &[samples])?, cfg.sampling)?;
        let ids = gpu.read_i32(&ids)?;
        for (s, &id) in ids.iter().enumerate() {
            if !done[s] {
                out[s].push(id as u32);
                on_token(s, id as u32);
                done[s] = cfg.stop_token == Some(id as u32);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        let logits = session.feed(gpu, &ids, 1)?;
        last = logits.reshape(&[samples, v])?;
    }
    Ok(out)
}

/// Logits of the last position of each row: [B, T, V] → [B, V].
fn last_position(gpu: &Gpu, logits: &Tensor, b: usize, t: usize, v: usize) -> Result<Tensor> {
    let out = gpu.alloc(&[b, v], DType::F32)?;
    for row in 0..b {
        gpu.copy_elements(logits, (row * t + t - 1) * v, &out, row * v, v)?;
    }
    Ok(out)
}
