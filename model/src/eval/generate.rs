//! Text generation with a KV cache on the GPU: the prompt is run once (prefill) and its keys and values cached per
//! layer; each new token then costs one position's worth of work. Sampling (temperature, top-k, top-p) runs on the
//! GPU with uniforms drawn from a seeded RNG, so a seed reproduces the same text. Several samples of one prompt
//! share the prompt's prefill (RL draws G completions per prompt this way).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use kiln_engine::autograd::Tape;
use kiln_engine::ops::kv_cache::{kv_copy_rows, KvCache};
use kiln_engine::ops::sampling::{sample_columns, SamplingParams};
use kiln_engine::{DType, Gpu, Tensor};

use crate::arch::{Attend, Model};
use crate::error::{ModelError, Result};

/// How to generate.
#[derive(Clone, Copy, Debug)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// Stop a sample when it emits this token (it is kept in the output).
    pub stop_token: Option<u32>,
    /// Sample only ids below this (the tokenizer's vocabulary, when the model's is padded past it); None = all.
    pub vocab_limit: Option<usize>,
}

/// A model with one KV cache per layer, positioned after `len` tokens.
pub struct Session<'m> {
    model: &'m Model,
    caches: Vec<KvCache>,
    batch: usize,
    len: usize,
}

impl<'m> Session<'m> {
    pub fn new(gpu: &Gpu, model: &'m Model, batch: usize) -> Result<Session<'m>> {
        Session::with_capacity(gpu, model, batch, model.config.n_ctx)
    }

    /// A session whose caches hold `max_len` (≤ n_ctx) positions: less memory when the length is known.
    pub fn with_capacity(gpu: &Gpu, model: &'m Model, batch: usize, max_len: usize) -> Result<Session<'m>> {
        let max_len = max_len.clamp(1, model.config.n_ctx);
        Ok(Session { model, caches: model.kv_caches(gpu, batch, max_len)?, batch, len: 0 })
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
        self.feed_rows(gpu, tokens, self.batch, t)
    }

    /// Like `feed` for batch rows 0..rows only (rows ≤ the session's batch): prefill k prompts in rows 0..k, then
    /// `fan_out`. Returns logits [rows, t, V]. Every row advances together, so use it for the first feed only.
    pub fn feed_rows(&mut self, gpu: &Gpu, tokens: &[i32], rows: usize, t: usize) -> Result<Tensor> {
        if rows > self.batch {
            return Err(ModelError::Data(format!("{rows} rows fed to a session of batch {}", self.batch)));
        }
        let cap = self.caches.first().map_or(self.model.config.n_ctx, |k| k.max_len);
        if self.len + t > cap {
            return Err(ModelError::Data(format!(
                "generation would reach position {} but this session holds {cap} positions (n_ctx = {})",
                self.len + t,
                self.model.config.n_ctx
            )));
        }
        // The training forward itself, with attention reading and writing the caches.
        let mut tape = Tape::no_grad(gpu);
        let attend = Attend::Cached { caches: &self.caches, pos: self.len };
        let logits = self.model.forward_logits(&mut tape, tokens, rows, t, attend)?;
        let logits = tape.value(logits).clone();
        self.len += t;
        Ok(logits)
    }

    /// Copy the caches of rows 0..k (k prompts prefilled once) so that prompt j fills rows j·samples..(j+1)·samples
    /// (its samples). k·samples must not exceed the batch.
    pub fn fan_out(&mut self, gpu: &Gpu, k: usize, samples: usize) -> Result<()> {
        if k * samples > self.batch {
            return Err(ModelError::Data(format!(
                "{k} prompts × {samples} samples exceed the session's batch {}",
                self.batch
            )));
        }
        // Highest prompt first: its destination rows start at j·samples ≥ j, past every source row not yet copied.
        for j in (0..k).rev() {
            for cache in &self.caches {
                kv_copy_rows(gpu, cache, j, j * samples..(j + 1) * samples, self.len)?;
            }
        }
        Ok(())
    }
}

/// One sampled continuation. `stopped` is true when it ended with the stop token (kept as its last token), false
/// when it ran out of room (max_new_tokens or the context).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub stopped: bool,
}

/// The seed of sample `sample` of prompt `prompt` under `seed` (SplitMix64 over the three): every sample has its
/// own stream, so a completion does not depend on how many others run beside it or when they stop.
pub fn stream_seed(seed: u64, prompt: u64, sample: u64) -> u64 {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    mix(mix(mix(seed) ^ prompt) ^ sample)
}

/// Most batch rows one decoding session holds: bounds the per-step logits and activations.
const MAX_SESSION_ROWS: usize = 256;

/// Prompts of one length decoded together: prompt k of the group owns batch rows k·G..(k+1)·G.
struct Group<'m> {
    session: Session<'m>,
    prompts: Vec<usize>,
    /// Logits [rows, V] the next tokens are sampled from.
    last: Tensor,
    budget: usize,
}

/// `samples` completions of each prompt ([prompt][sample]). Prompts of equal length share one batched session
/// (prefilled together, each prompt's KV cache then copied to its G rows), and all sessions decode in lockstep,
/// so a generated position costs one readback however many prompts there are. Every sample draws its own first
/// token from its prompt's last-position logits; sample s of prompt p uses the stream `stream_seed(cfg.seed, p,
/// s)`, so its tokens do not depend on which prompts run beside it. `on_token(prompt, sample, id)` sees each
/// token as it is chosen.
pub fn rollouts(
    gpu: &Gpu,
    model: &Model,
    prompts: &[Vec<u32>],
    samples: usize,
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(usize, usize, u32),
) -> Result<Vec<Vec<Completion>>> {
    let (v, n_ctx) = (model.config.vocab_size, model.config.n_ctx);
    if samples == 0 {
        return Err(ModelError::Data("samples must be at least 1".into()));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ModelError::Data(format!("prompt {i} is empty: give at least one token")));
        }
        if p.len() >= n_ctx {
            return Err(ModelError::Data(format!(
                "prompt {i} is {} tokens long, but the model's context n_ctx = {n_ctx} leaves no room to generate \
                 (prompts must be shorter than n_ctx)",
                p.len()
            )));
        }
    }
    // Rows per session: within MAX_SESSION_ROWS and so that the prefill logits [k, len, V] fit one binding.
    let limit = gpu.limits().max_storage_buffer_binding_size as usize;
    let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
    for (i, p) in prompts.iter().enumerate() {
        by_len.entry(p.len()).or_default().push(i);
    }
    let mut groups = Vec::new();
    for (len, idx) in by_len {
        let per = (MAX_SESSION_ROWS / samples).min(limit / (len * v * 4).max(1)).max(1);
        for chunk in idx.chunks(per) {
            groups.push(prefill_group(gpu, model, prompts, chunk, len, samples, cfg.max_new_tokens)?);
        }
    }
    let mut rngs: Vec<Vec<ChaCha8Rng>> = (0..prompts.len())
        .map(|p| (0..samples).map(|s| ChaCha8Rng::seed_from_u64(stream_seed(cfg.seed, p as u64, s as u64))).collect())
        .collect();
    let mut out = vec![vec![Completion { tokens: Vec::new(), stopped: false }; samples]; prompts.len()];
    let mut live: Vec<usize> = (0..groups.len()).filter(|&g| groups[g].budget > 0).collect();
    while !live.is_empty() {
        let rows: usize = live.iter().map(|&g| groups[g].prompts.len() * samples).sum();
        let all_ids = gpu.alloc(&[rows], DType::I32)?;
        let mut at = 0;
        for &g in &live {
            let grp = &groups[g];
            // Finished rows draw nothing, so a stream's numbers never depend on its neighbours.
            let u: Vec<f32> = grp
                .prompts
                .iter()
                .flat_map(|&p| (0..samples).map(move |s| (p, s)))
                .map(|(p, s)| if done(&out[p][s], grp.budget) { 0.0 } else { rngs[p][s].random_range(0.0f32..1.0) })
                .collect();
            let cols = cfg.vocab_limit.map_or(v, |k| k.clamp(1, v));
            let ids = sample_columns(gpu, &grp.last, &gpu.upload(&u, &[u.len()])?, cfg.sampling, cols)?;
            gpu.copy_elements(&ids, 0, &all_ids, at, u.len())?;
            at += u.len();
        }
        let ids = gpu.read_i32(&all_ids)?;
        let mut next = Vec::with_capacity(live.len());
        let mut at = 0;
        for &g in &live {
            let grp = &mut groups[g];
            let n = grp.prompts.len() * samples;
            let group_ids = &ids[at..at + n];
            at += n;
            for (k, &p) in grp.prompts.iter().enumerate() {
                for s in 0..samples {
                    let (c, id) = (&mut out[p][s], group_ids[k * samples + s]);
                    if !done(c, grp.budget) {
                        c.tokens.push(id as u32);
                        c.stopped = cfg.stop_token == Some(id as u32);
                        on_token(p, s, id as u32);
                    }
                }
            }
            if grp.prompts.iter().all(|&p| out[p].iter().all(|c| done(c, grp.budget))) {
                continue;
            }
            let logits = grp.session.feed(gpu, group_ids, 1)?;
            grp.last = logits.reshape(&[n, v])?;
            next.push(g);
        }
        live = next;
    }
    Ok(out)
}

/// One session for prompts `idx` (all `len` tokens long): prefill them in rows 0..k, copy prompt k's cache to its
/// rows k·G..(k+1)·G, and give every row its prompt's last-position logits.
fn prefill_group<'m>(
    gpu: &Gpu,
    model: &'m Model,
    prompts: &[Vec<u32>],
    idx: &[usize],
    len: usize,
    samples: usize,
    max_new_tokens: usize,
) -> Result<Group<'m>> {
    let (v, n_ctx) = (model.config.vocab_size, model.config.n_ctx);
    let budget = max_new_tokens.min(n_ctx - len);
    let (k, rows) = (idx.len(), idx.len() * samples);
    // The cache holds what these prompts will ever reach, not the whole context.
    let mut session = Session::with_capacity(gpu, model, rows, len + budget.max(1))?;
    let tokens: Vec<i32> = idx.iter().flat_map(|&i| prompts[i].iter().map(|&t| t as i32)).collect();
    let logits = session.feed_rows(gpu, &tokens, k, len)?;
    session.fan_out(gpu, k, samples)?;
    let last = gpu.alloc(&[rows, v], DType::F32)?;
    for j in 0..k {
        for s in 0..samples {
            gpu.copy_elements(&logits, (j * len + len - 1) * v, &last, (j * samples + s) * v, v)?;
        }
    }
    Ok(Group { session, prompts: idx.to_vec(), last, budget })
}

fn done(c: &Completion, budget: usize) -> bool {
    c.stopped || c.tokens.len() >= budget
}

/// `samples` continuations of one prompt (see [`rollouts`]). Calls `on_token(sample, id)` as each token is chosen
/// (for streaming).
pub fn generate(
    gpu: &Gpu,
    model: &Model,
    prompt: &[u32],
    samples: usize,
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    let mut out = rollouts(gpu, model, &[prompt.to_vec()], samples, cfg, |_, s, id| on_token(s, id))?;
    Ok(out.pop().expect("one prompt").into_iter().map(|c| c.tokens).collect())
}
