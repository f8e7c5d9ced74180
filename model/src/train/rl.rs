//! Policy-gradient RL with verifiable rewards, GRPO style. Each step:
//!
//! 1. draws `prompts_per_step` prompts (seeded by the step, so a resumed run draws the same ones);
//! 2. samples a group of G completions per prompt on the GPU: the prompt's KV cache is filled once and copied to
//!    the G rows, every sample draws its own first token, and sample s of prompt p at step n uses its own seeded
//!    stream (`generate::stream_seed`);
//! 3. scores them with the reward function; advantage = reward − group mean (GRPO: divided by the group's std);
//! 4. runs `epochs` optimisation passes over the batch, minimising per completion token
//!    −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·k3, with ρ = π/π_old, k3 = π_ref/π − log(π_ref/π) − 1 (Schulman's
//!    estimator of KL(π‖π_ref)), averaged over all completion tokens of the batch.
//!
//! Log-probs are those of the full softmax at temperature 1, computed on the GPU from the training forward pass
//! (the cross-entropy of the sampled token). Prompt and padding positions are masked out of the loss; the end
//! token a completion stops with is trained (stopping is an action the reward depends on); a completion cut off at
//! `max_new_tokens` is trained as far as it got. REINFORCE is the same objective with no clipping, one pass, and
//! the mean reward of the group as baseline.

use std::sync::Arc;
use std::time::Instant;

use rand::seq::index::sample as sample_indices;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use kiln_engine::autograd::Tape;
use kiln_engine::ops::matmul::{matmul, MatmulSpec};
use kiln_engine::ops::policy::{policy_loss, PolicyLossConfig};
use kiln_engine::ops::{elementwise, sampling::SamplingParams};
use kiln_engine::{Gpu, Tensor};

use crate::arch::{Model, Recompute};
use crate::checkpoint::{Checkpoint, TrainState};
use crate::data::chat::ChatTokens;
use crate::data::tasks::Example;
use crate::data::tokenizer::Tokenizer;
use crate::error::{ModelError, Result};
use crate::eval::evaluate::{chat_prompts, completion_text};
use crate::eval::generate::{rollouts, stream_seed, Completion, GenerateConfig};
use crate::train::collective::{rank_of, Collective};
use crate::train::data_parallel::{verify_replicas, CommStats, GradSync};
use crate::train::driver::StepReport;
use crate::train::optim::{OptimConfig, Optimizer};
use crate::train::pretrain::{check_fits, resumable_state};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Clipped ratio objective, several passes per batch, advantages optionally divided by the group std.
    Grpo,
    /// Plain policy gradient with the group mean as baseline: one pass, no clipping, no std scaling.
    Reinforce,
}

/// Settings of an RL run (stored in its checkpoints). Its fields are `kiln rl`'s flags, each defaulting to the
/// value in `Default` below (the optimizer's flags too: RL's learning rate, warmup and decay are RL's own).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(
    mut_arg("lr", |a| a.default_value(RlConfig::default().optim.lr.to_string())),
    mut_arg("min_lr", |a| a.default_value(RlConfig::default().optim.min_lr.to_string())),
    mut_arg("warmup", |a| a.default_value(RlConfig::default().optim.warmup.to_string())),
    mut_arg("weight_decay", |a| a.default_value(RlConfig::default().optim.weight_decay.to_string())),
)]
pub struct RlConfig {
    #[arg(long, value_enum, default_value_t = RlConfig::default().algorithm)]
    pub algorithm: Algorithm,
    /// RL steps (each: rollouts, rewards, `epochs` optimizer steps).
    #[arg(long, default_value_t = RlConfig::default().steps)]
    pub steps: u64,
    /// Prompts per step.
    #[arg(long = "prompts", default_value_t = RlConfig::default().prompts_per_step)]
    pub prompts_per_step: usize,
    /// Completions per prompt (G).
    #[arg(long = "group", default_value_t = RlConfig::default().group_size)]
    pub group_size: usize,
    #[arg(long, default_value_t = RlConfig::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Sampling temperature of the rollouts (log-probs in the loss are always at temperature 1).
    #[arg(long, default_value_t = RlConfig::default().temperature)]
    pub temperature: f32,
    /// Ratio clip ε (GRPO).
    #[arg(long, default_value_t = RlConfig::default().clip_eps)]
    pub clip_eps: f32,
    /// Weight of the k3 KL penalty to the reference model (0 turns it off).
    #[arg(long, default_value_t = RlConfig::default().beta)]
    pub beta: f32,
    /// Optimisation passes over each batch of rollouts (GRPO; REINFORCE uses 1).
    #[arg(long, default_value_t = RlConfig::default().epochs)]
    pub epochs: usize,
    /// Divide advantages by the group's standard deviation (GRPO); `--no-std-scale` turns it off.
    #[arg(long = "no-std-scale", action = clap::ArgAction::SetFalse)]
    pub scale_by_std: bool,
    /// Sequences per forward/backward micro-batch (0 = all at once).
    #[arg(long, default_value_t = RlConfig::default().micro_batch)]
    pub micro_batch: usize,
    #[arg(long, default_value_t = RlConfig::default().seed)]
    pub seed: u64,
    /// Activations the policy's backward recomputes instead of keeping (none, gelu, block); results unchanged.
    #[arg(long, value_enum, default_value_t = Recompute::None)]
    #[serde(default)]
    pub recompute: Recompute,
    #[serde(flatten)]
    #[command(flatten)]
    pub optim: OptimConfig,
}

impl Default for RlConfig {
    fn default() -> Self {
        RlConfig {
            algorithm: Algorithm::Grpo,
            steps: 100,
            prompts_per_step: 16,
            group_size: 8,
            max_new_tokens: 16,
            temperature: 1.0,
            clip_eps: 0.2,
            beta: 0.04,
            epochs: 2,
            scale_by_std: true,
            micro_batch: 0,
            seed: 1,
            recompute: Recompute::None,
            optim: OptimConfig { lr: 3e-4, min_lr: 3e-5, warmup: 10, weight_decay: 0.0, ..OptimConfig::default() },
        }
    }
}

impl RlConfig {
    /// Passes per step actually run (REINFORCE is on-policy: one).
    pub fn passes(&self) -> usize {
        match self.algorithm {
            Algorithm::Grpo => self.epochs.max(1),
            Algorithm::Reinforce => 1,
        }
    }

    /// Optimizer steps of the whole run (the schedule's length): one per pass.
    pub fn optimizer_steps(&self) -> u64 {
        self.steps * self.passes() as u64
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.steps == 0 || self.prompts_per_step == 0 || self.group_size == 0 || self.max_new_tokens == 0 {
            return bad("steps, prompts_per_step, group_size and max_new_tokens must all be at least 1".into());
        }
        if self.algorithm == Algorithm::Grpo && self.group_size < 2 {
            return bad("GRPO needs groups of at least 2 completions: the advantage is relative to the group".into());
        }
        if !(self.clip_eps > 0.0 && self.clip_eps.is_finite()) {
            return bad(format!("clip_eps must be a positive number, got {}", self.clip_eps));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return bad(format!("beta (the KL weight) must be >= 0, got {}", self.beta));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be > 0 for RL rollouts, got {}", self.temperature));
        }
        self.optim.validate()
    }
}

/// A reward function: (completion text, reference answer) → reward. It must return a finite number.
pub type RewardFn = fn(&str, &str) -> f32;

/// What one RL step did (a JSONL line of `kiln rl`).
#[derive(Clone, Debug, Serialize)]
pub struct RlMetrics {
    pub step: u64,
    pub lr: f32,
    pub mean_reward: f64,
    /// Fraction of completions with reward ≥ 1 (exact match).
    pub accuracy: f64,
    /// Mean k3 estimate of KL(π‖π_ref) per completion token.
    pub kl: f64,
    pub mean_completion_len: f64,
    /// Fraction of completions that ended with the end token (the rest ran out of room).
    pub stopped: f64,
    /// Fraction of completion tokens whose ratio was clipped.
    pub clip_fraction: f64,
    /// Mean entropy (nats) of the policy per completion token.
    pub entropy: f64,
    /// Fraction of groups whose rewards were all equal: zero advantage, no policy-gradient signal.
    pub equal_reward_groups: f64,
    pub grad_norm: f32,
    /// The minimised objective (mean per completion token).
    pub objective: f64,
    pub rollout_tokens_per_s: f64,
    pub ms_per_step: f64,
    /// The gradient all-reduces of a data-parallel step, all passes together (absent when training alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<CommStats>,
}

/// Group-relative advantages: r − mean(group), divided by (std + 1e-4) when `scale_by_std` (GRPO), so a group
/// whose rewards are all equal gets exactly zero advantage.
pub fn group_advantages(rewards: &[f32], scale_by_std: bool) -> Vec<f32> {
    let n = rewards.len().max(1) as f64;
    let mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / n;
    let std = (rewards.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    rewards
        .iter()
        .map(|&r| {
            let a = r as f64 - mean;
            if a == 0.0 {
                0.0
            } else if scale_by_std {
                (a / (std + 1e-4)) as f32
            } else {
                a as f32
            }
        })
        .collect()
}

/// One micro-batch of rollouts as training rows, on the GPU.
struct Chunk {
    inputs: Vec<i32>,
    rows: usize,
    time: usize,
    targets: Tensor,
    adv: Tensor,
    scale: Tensor,
    /// Token weights for averaging metrics: 1/total completion tokens where trained, else 0.
    mean_w: Tensor,
    ref_logp: Tensor,
    /// Log-probs before this step's updates (only when there are several passes; one pass uses the current ones).
    old_logp: Option<Tensor>,
}

/// The sequences of one step as rows: inputs seq[..len−1], targets seq[1..] with −1 on prompt and padding
/// positions; per-token advantage and scale (1/total completion tokens on trained positions, 0 elsewhere).
pub(crate) struct RolloutBatch {
    pub inputs: Vec<Vec<i32>>,
    pub targets: Vec<Vec<i32>>,
    pub adv: Vec<Vec<f32>>,
    pub trained_tokens: usize,
}

pub(crate) fn rollout_batch(prompts: &[Vec<u32>], groups: &[Vec<Completion>], adv: &[Vec<f32>]) -> RolloutBatch {
    let mut b = RolloutBatch { inputs: Vec::new(), targets: Vec::new(), adv: Vec::new(), trained_tokens: 0 };
    for ((prompt, group), group_adv) in prompts.iter().zip(groups).zip(adv) {
        for (c, &a) in group.iter().zip(group_adv) {
            let seq: Vec<u32> = prompt.iter().chain(&c.tokens).copied().collect();
            let t = seq.len() - 1;
            let inputs = seq[..t].iter().map(|&x| x as i32).collect();
            // Position i predicts seq[i + 1]: trained when that token is part of the completion.
            let targets: Vec<i32> =
                (0..t).map(|i| if i + 1 >= prompt.len() { seq[i + 1] as i32 } else { -1 }).collect();
            b.trained_tokens += c.tokens.len();
            b.adv.push(vec![a; t]);
            b.inputs.push(inputs);
            b.targets.push(targets);
        }
    }
    b
}

pub struct RlTrainer<'g> {
    gpu: &'g Gpu,
    pub policy: Model,
    reference: Model,
    tok: Tokenizer,
    ct: ChatTokens,
    examples: Vec<Example>,
    prompts: Vec<Vec<u32>>,
    reward: RewardFn,
    pub cfg: RlConfig,
    opt: Optimizer,
    pub step: u64,
    /// Set when this process is one rank of a data-parallel job.
    dp: Option<GradSync>,
}

impl<'g> RlTrainer<'g> {
    /// Errors up front on: a tokenizer without the chat tokens, a reference of another shape, prompts that leave
    /// no room in the context, and batches beyond the adapter's binding size.
    pub fn new(
        gpu: &'g Gpu,
        policy: Model,
        reference: Model,
        tok: Tokenizer,
        examples: Vec<Example>,
        reward: RewardFn,
        cfg: RlConfig,
    ) -> Result<RlTrainer<'g>> {
        cfg.validate()?;
        if reference.config != policy.config {
            return Err(ModelError::Config(format!(
                "the reference model's shape {:?} does not match the policy's {:?}: the KL penalty compares them \
                 token by token, so use a checkpoint of the same model (usually the one RL starts from)",
                reference.config, policy.config
            )));
        }
        if examples.is_empty() {
            return Err(ModelError::Data("RL needs at least one prompt".into()));
        }
        let ct = ChatTokens::from_tokenizer(&tok)?;
        let prompts = chat_prompts(&tok, ct, &examples, policy.config.n_ctx)?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + cfg.max_new_tokens;
        let rows = if cfg.micro_batch == 0 { cfg.prompts_per_step * cfg.group_size } else { cfg.micro_batch };
        check_fits(gpu, &policy.config, rows, longest.min(policy.config.n_ctx))?;
        let opt = Optimizer::new(gpu, &policy)?;
        let mut policy = policy;
        policy.recompute = cfg.recompute;
        Ok(RlTrainer { gpu, policy, reference, tok, ct, examples, prompts, reward, cfg, opt, step: 0, dp: None })
    }

    /// Train as one rank of `comm`: each step draws ranks × prompts_per_step prompts, this rank samples and
    /// scores the groups of its own prompts, the objective is averaged over every rank's completion tokens, the
    /// gradients are summed over ranks and the metrics are the job's. `zero` shards the AdamW moments.
    /// Gradients travel in buckets of `bucket_bytes` ([`crate::train::data_parallel::BUCKET_BYTES`] is a good default).
    pub fn data_parallel(&mut self, comm: Arc<dyn Collective>, zero: bool, bucket_bytes: usize) -> Result<()> {
        self.dp = Some(GradSync::attach(self.gpu, comm, &self.policy, &mut self.opt, zero, bucket_bytes)?);
        Ok(())
    }

    pub fn ranks(&self) -> usize {
        self.dp.as_ref().map_or(1, GradSync::ranks)
    }

    /// This rank's prompts of step `step` (1-based): a seeded draw of ranks × prompts_per_step prompts without
    /// replacement (with, once the pool is smaller), of which rank r takes the r-th run of prompts_per_step.
    fn step_prompts(&self, step: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed ^ 0x726c);
        rng.set_stream(step);
        let (rank, ranks) = rank_of(self.dp.as_ref().map(GradSync::comm));
        let (n, per) = (self.prompts.len(), self.cfg.prompts_per_step);
        let k = per * ranks;
        let all = if k <= n { sample_indices(&mut rng, n, k).into_vec() } else { (0..k).map(|i| i % n).collect() };
        all[rank * per..(rank + 1) * per].to_vec()
    }

    /// One RL step: rollouts, rewards, `passes()` optimiser steps. Two readbacks per pass at most (the sampled
    /// tokens are read per generated position during the rollout, the metrics once per optimiser step).
    pub fn step(&mut self) -> Result<RlMetrics> {
        let gpu = self.gpu;
        let start = Instant::now();
        let step = self.step + 1;
        let picked = self.step_prompts(step);
        let prompts: Vec<Vec<u32>> = picked.iter().map(|&i| self.prompts[i].clone()).collect();
        let sampling = SamplingParams { temperature: self.cfg.temperature, top_k: 0, top_p: 1.0 };
        let rank = rank_of(self.dp.as_ref().map(GradSync::comm)).0 as u64;
        let gen = GenerateConfig {
            max_new_tokens: self.cfg.max_new_tokens,
            sampling,
            // Each rank's samples from streams of their own (rank 0's are those of a run alone).
            seed: stream_seed(self.cfg.seed, step, 0x726f_6c6c + rank),
            stop_token: Some(self.ct.end),
            vocab_limit: Some(self.tok.vocab_size()),
        };
        let groups = rollouts(gpu, &self.policy, &prompts, self.cfg.group_size, &gen, |_, _, _| {})?;
        let rollout_secs = start.elapsed().as_secs_f64();

        let mut rewards = Vec::with_capacity(groups.len());
        for (&i, group) in picked.iter().zip(&groups) {
            let mut r = Vec::with_capacity(group.len());
            for (s, c) in group.iter().enumerate() {
                let text = completion_text(&self.tok, self.ct, c)?;
                let value = (self.reward)(&text, &self.examples[i].answer);
                if !value.is_finite() {
                    return Err(ModelError::Data(format!(
                        "the reward function returned {value} at step {step} for sample {s} of prompt {:?} \
                         (completion {text:?}): rewards must be finite numbers",
                        self.examples[i].prompt
                    )));
                }
                r.push(value);
            }
            rewards.push(r);
        }
        let scale_by_std = self.cfg.scale_by_std && self.cfg.algorithm == Algorithm::Grpo;
        let adv: Vec<Vec<f32>> = rewards.iter().map(|r| group_advantages(r, scale_by_std)).collect();
        let batch = rollout_batch(&prompts, &groups, &adv);
        let passes = self.cfg.passes();
        let world = self.dp.as_ref().map(GradSync::comm);
        // The job's totals, from which the step's metrics and the objective's per-token mean are computed.
        let local = [
            rewards.iter().flatten().map(|&r| r as f64).sum::<f64>(),
            rewards.iter().flatten().filter(|&&r| r >= 1.0).count() as f64,
            rewards.iter().flatten().count() as f64,
            batch.trained_tokens as f64,
            groups.iter().flatten().filter(|c| c.stopped).count() as f64,
            rewards.iter().filter(|r| r.iter().all(|&x| x == r[0])).count() as f64,
            rewards.len() as f64,
        ];
        let mut job = local;
        if let Some(world) = world {
            world.all_reduce_sum_f64(&mut job)?;
        }
        let [reward_sum, correct, n_samples, trained_tokens, stopped, equal_groups, n_groups] = job;
        let chunks = self.upload_chunks(&batch, trained_tokens, passes > 1)?;

        let loss_cfg = PolicyLossConfig {
            clip_eps: match self.cfg.algorithm {
                Algorithm::Grpo => Some(self.cfg.clip_eps),
                Algorithm::Reinforce => None,
            },
            beta: self.cfg.beta,
        };
        let mut sums = [0.0f64; 4]; // objective, k3, clipped, entropy — summed over passes
        let (mut lr, mut grad_norm) = (0.0, 0.0);
        let mut comm: Option<CommStats> = None;
        for _ in 0..passes {
            self.policy.zero_grad(gpu)?;
            let totals = elementwise::zeros(gpu, &[3])?;
            let entropy = elementwise::zeros(gpu, &[1])?;
            for (ci, c) in chunks.iter().enumerate() {
                let mut tape = Tape::new(gpu);
                let (losses, h) =
                    self.policy.token_losses(&mut tape, &c.inputs, c.rows, c.time, None, &c.targets, true)?;
                let h = h.expect("asked for the entropy");
                let current;
                let old = match &c.old_logp {
                    Some(old) => old,
                    None => {
                        // One pass: π_old is the current policy itself (ratio 1, its gradient is A·∇log π).
                        current = elementwise::scale(gpu, tape.value(losses), -1.0)?;
                        &current
                    }
                };
                let pl = policy_loss(gpu, tape.value(losses), old, &c.ref_logp, &c.adv, &c.scale, loss_cfg)?;
                elementwise::add_inplace(gpu, &totals, &pl.totals, 1.0)?;
                let n = h.numel();
                let h_mean = matmul(gpu, &h.reshape(&[1, n])?, &c.mean_w.reshape(&[n, 1])?, None, MatmulSpec::nn())?;
                elementwise::add_inplace(gpu, &entropy, &h_mean.reshape(&[1])?, 1.0)?;
                let loss = tape.weighted_sum(losses, &pl.weights)?;
                match &self.dp {
                    Some(dp) if ci + 1 == chunks.len() => {
                        let params = &self.policy.params;
                        let c = dp.backward_and_reduce(gpu, params, |hook| Ok(tape.backward_with(loss, hook)?))?;
                        comm = Some(comm.map_or(c, |sum| sum.merge(c)));
                    }
                    _ => tape.backward(loss)?,
                }
            }
            let total = self.cfg.optimizer_steps();
            let (l, g, values) =
                self.opt.apply(gpu, &self.policy, &self.cfg.optim, total, &[&totals, &entropy], world)?;
            for (sum, v) in sums.iter_mut().zip(&values) {
                *sum += *v as f64;
            }
            (lr, grad_norm) = (l, g);
        }
        self.step = step;
        let tokens = trained_tokens.max(1.0);
        let p = passes as f64;
        if !sums[0].is_finite() {
            return Err(ModelError::NonFinite { what: "RL objective", value: sums[0] as f32, step });
        }
        Ok(RlMetrics {
            step,
            lr,
            mean_reward: reward_sum / n_samples,
            accuracy: correct / n_samples,
            kl: sums[1] / p / tokens,
            mean_completion_len: trained_tokens / n_samples,
            stopped: stopped / n_samples,
            clip_fraction: sums[2] / p / tokens,
            entropy: sums[3] / p,
            equal_reward_groups: equal_groups / n_groups,
            grad_norm,
            objective: sums[0] / p,
            rollout_tokens_per_s: tokens / rollout_secs,
            ms_per_step: start.elapsed().as_secs_f64() * 1e3,
            comm,
        })
    }

    /// Rows to the GPU in micro-batches, with the reference log-probs (and the pre-update ones for several
    /// passes) computed once, without gradients.
    /// `job_tokens`: completion tokens of the whole step over every rank (the objective is their mean).
    fn upload_chunks(&self, b: &RolloutBatch, job_tokens: f64, need_old: bool) -> Result<Vec<Chunk>> {
        let gpu = self.gpu;
        let per = if self.cfg.micro_batch == 0 { b.inputs.len() } else { self.cfg.micro_batch };
        let inv = (1.0 / job_tokens.max(1.0)) as f32;
        let mut chunks = Vec::new();
        for start in (0..b.inputs.len()).step_by(per.max(1)) {
            let end = (start + per).min(b.inputs.len());
            let rows = end - start;
            let time = b.inputs[start..end].iter().map(Vec::len).max().unwrap_or(1);
            let (mut inputs, mut targets) = (vec![self.ct.end as i32; rows * time], vec![-1i32; rows * time]);
            let (mut adv, mut scale) = (vec![0.0f32; rows * time], vec![0.0f32; rows * time]);
            for r in 0..rows {
                let (src_in, src_t, src_a) = (&b.inputs[start + r], &b.targets[start + r], &b.adv[start + r]);
                for i in 0..src_in.len() {
                    let at = r * time + i;
                    inputs[at] = src_in[i];
                    targets[at] = src_t[i];
                    if src_t[i] >= 0 {
                        adv[at] = src_a[i];
                        scale[at] = inv;
                    }
                }
            }
            let targets = gpu.upload_i32(&targets, &[rows, time])?;
            let logp = |model: &Model| -> Result<Tensor> {
                let mut tape = Tape::no_grad(gpu);
                let (losses, _) = model.token_losses(&mut tape, &inputs, rows, time, None, &targets, false)?;
                Ok(elementwise::scale(gpu, tape.value(losses), -1.0)?)
            };
            let ref_logp = logp(&self.reference)?;
            let old_logp = if need_old { Some(logp(&self.policy)?) } else { None };
            let scale_t = gpu.upload(&scale, &[rows * time])?;
            chunks.push(Chunk {
                rows,
                time,
                targets,
                adv: gpu.upload(&adv, &[rows * time])?,
                mean_w: scale_t.clone(),
                scale: scale_t,
                ref_logp,
                old_logp,
                inputs,
            });
        }
        Ok(chunks)
    }

    /// Weights, optimiser moments, step and settings: enough to resume exactly (the prompts of a step depend only
    /// on the seed and the step).
    pub fn checkpoint(&self, tokenizer_json: Option<String>) -> Result<Checkpoint> {
        let gpu = self.gpu;
        let state = TrainState {
            step: self.step,
            tokens_seen: 0,
            sampler: serde_json::Value::Null,
            rng: serde_json::Value::Null,
            extra: serde_json::to_value(&self.cfg).map_err(|e| ModelError::Data(e.to_string()))?,
            ranks: self.ranks(),
        };
        let model = self.policy.to_host(gpu)?;
        if let Some(dp) = &self.dp {
            verify_replicas(dp.comm(), &model, self.step)?;
        }
        Ok(Checkpoint {
            config: self.policy.config.clone(),
            model,
            optimizer: self.opt.checkpoint_moments(gpu, &self.policy, self.dp.as_ref().map(GradSync::comm))?,
            state: Some(state),
            tokenizer_json,
        })
    }

    /// Continue an RL run from a checkpoint written by `checkpoint`.
    pub fn resume(
        gpu: &'g Gpu,
        ckpt: Checkpoint,
        reference: Model,
        tok: Tokenizer,
        examples: Vec<Example>,
        reward: RewardFn,
        cfg: RlConfig,
    ) -> Result<RlTrainer<'g>> {
        let state = resumable_state(&ckpt)?;
        let policy = Model::from_host(gpu, &ckpt.config, ckpt.model)?;
        let mut tr = RlTrainer::new(gpu, policy, reference, tok, examples, reward, cfg)?;
        let opt_steps = state.step * tr.cfg.passes() as u64;
        tr.opt.restore(gpu, &tr.policy, ckpt.optimizer, opt_steps)?;
        tr.step = state.step;
        Ok(tr)
    }
}

impl crate::train::driver::Stage for RlTrainer<'_> {
    fn step_count(&self) -> u64 {
        self.step
    }

    fn total_steps(&self) -> u64 {
        self.cfg.steps
    }

    fn step(&mut self) -> Result<StepReport> {
        let m = RlTrainer::step(self)?;
        let message = format!(
            "reward {:.2} kl {:.3} clip {:.2} H {:.2} | {:.0} rollout tok/s",
            m.mean_reward, m.kl, m.clip_fraction, m.entropy, m.rollout_tokens_per_s
        );
        let metrics = serde_json::to_value(&m).map_err(|e| ModelError::Data(e.to_string()))?;
        Ok(StepReport { step: m.step, metrics, message })
    }

    fn model(&self) -> &Model {
        &self.policy
    }

    fn checkpoint(&self, tokenizer_json: Option<String>) -> Result<Checkpoint> {
        RlTrainer::checkpoint(self, tokenizer_json)
    }

    fn ranks(&self) -> usize {
        RlTrainer::ranks(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, FromArgMatches};

    #[test]
    fn flags_default_to_the_config_defaults() {
        let cmd = RlConfig::augment_args(clap::Command::new("rl"));
        let parsed = RlConfig::from_arg_matches(&cmd.clone().get_matches_from(["rl"])).unwrap();
        assert_eq!(parsed, RlConfig::default());
        let m =
            cmd.get_matches_from(["rl", "--lr", "0.01", "--no-std-scale", "--algorithm", "reinforce", "--group", "3"]);
        let parsed = RlConfig::from_arg_matches(&m).unwrap();
        assert_eq!((parsed.optim.lr, parsed.scale_by_std, parsed.group_size), (0.01, false, 3));
        assert_eq!(parsed.algorithm, Algorithm::Reinforce);
    }

    #[test]
    fn equal_rewards_give_zero_advantage_and_grpo_scales_by_std() {
        assert!(group_advantages(&[1.0; 5], true).iter().all(|&a| a == 0.0));
        assert!(group_advantages(&[0.0; 3], false).iter().all(|&a| a == 0.0));
        let a = group_advantages(&[1.0, 0.0, 0.0, 0.0], false);
        assert_eq!(a, vec![0.75, -0.25, -0.25, -0.25]);
        let s = group_advantages(&[1.0, 0.0, 0.0, 0.0], true);
        let std = (0.75f64 * 0.25).sqrt();
        assert!((s[0] as f64 - 0.75 / (std + 1e-4)).abs() < 1e-5);
    }

    #[test]
    fn only_completion_tokens_are_trained_and_the_stop_token_is() {
        let prompts = vec![vec![10, 11, 12]];
        let groups = vec![vec![
            Completion { tokens: vec![5, 6, 99], stopped: true },
            Completion { tokens: vec![7], stopped: false },
        ]];
        let b = rollout_batch(&prompts, &groups, &[vec![0.5, -0.5]]);
        assert_eq!(b.inputs[0], vec![10, 11, 12, 5, 6]);
        assert_eq!(b.targets[0], vec![-1, -1, 5, 6, 99], "prompt positions masked, end token trained");
        assert_eq!(b.targets[1], vec![-1, -1, 7]);
        assert_eq!(b.trained_tokens, 4);
        assert_eq!(b.adv[1], vec![-0.5; 3]);
    }
}
