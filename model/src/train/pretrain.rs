//! Next-token training (pretraining, and SFT with its own batches): gradient accumulation over micro-batches, the
//! shared optimizer (`optim.rs`), checkpoints that resume exactly. The loop, metrics, evaluation and progress are
//! the driver's (`driver.rs`); `step` returns what they need.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use kiln_engine::autograd::{mean_weights, Tape};
use kiln_engine::ops::elementwise;
use kiln_engine::Gpu;

use crate::arch::{Model, Recompute};
use crate::checkpoint::{Checkpoint, TrainState};
use crate::data::{sequential_batches, BatchSampler, SamplerState};
use crate::error::{ModelError, Result};
use crate::train::collective::{rank_of, Collective};
use crate::train::data_parallel::{verify_replicas, CommStats, GradSync};
use crate::train::driver::StepReport;
use crate::train::optim::{OptimConfig, Optimizer};

/// Settings of next-token training (pretraining and SFT), stored in checkpoints so `--resume` continues the same
/// schedule. Its fields are the commands' flags: each default is the one in `Default` below.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct TrainConfig {
    /// Optimizer steps.
    #[arg(long, default_value_t = TrainConfig::default().steps)]
    pub steps: u64,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = TrainConfig::default().batch)]
    pub batch: usize,
    /// Positions per row.
    #[arg(long, default_value_t = TrainConfig::default().seq_len)]
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = TrainConfig::default().grad_accum)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Activations backward recomputes instead of keeping: none, gelu (the MLP activation) or block (all but
    /// each block's input). Changes memory and time, never the results.
    #[arg(long, value_enum, default_value_t = Recompute::None)]
    #[serde(default)]
    pub recompute: Recompute,
    #[serde(flatten)]
    #[command(flatten)]
    pub optim: OptimConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            batch: 8,
            seq_len: 128,
            grad_accum: 1,
            seed: 1337,
            recompute: Recompute::None,
            optim: OptimConfig::default(),
        }
    }
}

impl TrainConfig {
    /// Learning rate at 1-based `step` of this run's schedule.
    pub fn lr_at(&self, step: u64) -> f32 {
        self.optim.lr_at(step, self.steps)
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.seq_len == 0 || self.grad_accum == 0 || self.steps == 0 {
            return Err(ModelError::Config("steps, batch, seq_len and grad_accum must all be at least 1".into()));
        }
        self.optim.validate()
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub lr: f32,
    pub loss: f32,
    pub grad_norm: f32,
    pub tokens_per_s: f64,
    /// Tokens whose targets were trained (all of them in pretraining; the responses in SFT).
    pub trained_tokens: u64,
    pub ms_per_step: f64,
    /// Peak bytes the buffer pool held during the step.
    pub peak_bytes: u64,
    /// Where that peak went, by what the memory held (measured by the pool at the moment of the peak).
    pub memory: StepMemory,
    /// The gradient all-reduce of a data-parallel step (absent when training alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<CommStats>,
}

/// Bytes of a step's peak by kind, as the buffer pool counted them (size-class capacity).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StepMemory {
    pub parameters: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    /// The chunked classifier's logits and dlogits chunks, and staging for uploads.
    pub scratch: u64,
}

impl From<kiln_engine::MemorySplit> for StepMemory {
    fn from(s: kiln_engine::MemorySplit) -> StepMemory {
        StepMemory {
            parameters: s.parameters,
            gradients: s.gradients,
            optimizer: s.optimizer,
            activations: s.activations,
            scratch: s.scratch,
        }
    }
}

impl std::fmt::Display for StepMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "params {:.1} MiB, grads {:.1}, optimizer {:.1}, activations {:.1}, scratch {:.1}",
            mib(self.parameters),
            mib(self.gradients),
            mib(self.optimizer),
            mib(self.activations),
            mib(self.scratch)
        )
    }
}

/// One training batch of B rows × T positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<i32>,
    /// -1 where a position is not trained.
    pub targets: Vec<i32>,
    /// Per row, the lengths of the sequences packed end to end in it (positions restart and attention stays
    /// within each); None = every row is one sequence.
    pub packed: Option<Vec<Vec<usize>>>,
}

/// Where a trainer's batches come from, and a position that a checkpoint saves and `restore` continues exactly.
pub trait BatchSource {
    fn next_batch(&mut self) -> Batch;
    fn state(&self) -> Result<serde_json::Value>;
    fn restore(&mut self, state: serde_json::Value) -> Result<()>;
}

impl BatchSource for BatchSampler {
    fn next_batch(&mut self) -> Batch {
        let (inputs, targets) = BatchSampler::next_batch(self);
        Batch { inputs, targets, packed: None }
    }
    fn state(&self) -> Result<serde_json::Value> {
        serde_json::to_value(BatchSampler::state(self)).map_err(|e| ModelError::Data(e.to_string()))
    }
    fn restore(&mut self, state: serde_json::Value) -> Result<()> {
        let s: SamplerState = serde_json::from_value(state).map_err(|e| ModelError::Data(e.to_string()))?;
        BatchSampler::restore(self, &s)
    }
}

/// The training state a checkpoint must hold to be resumed, or a clear error.
pub fn resumable_state(ckpt: &Checkpoint) -> Result<TrainState> {
    ckpt.state.clone().ok_or_else(|| ModelError::Checkpoint {
        path: "<checkpoint>".into(),
        message: "it holds no training state (train_state.json): a weights-only export cannot be resumed".into(),
    })
}

/// Next-token training (pretraining and SFT: they differ only in the batches and which targets are masked).
pub struct Trainer<'g> {
    gpu: &'g Gpu,
    pub model: Model,
    pub cfg: TrainConfig,
    /// Optimizer steps taken so far.
    pub step: u64,
    pub tokens_seen: u64,
    opt: Optimizer,
    source: Box<dyn BatchSource>,
    /// Set when this process is one rank of a data-parallel job.
    dp: Option<GradSync>,
}

impl<'g> Trainer<'g> {
    /// Pretraining on random windows of `train`.
    pub fn new(gpu: &'g Gpu, model: Model, cfg: TrainConfig, train: Arc<Vec<u32>>) -> Result<Trainer<'g>> {
        let sampler = BatchSampler::new(train, cfg.batch, cfg.seq_len, cfg.seed)?;
        Trainer::with_source(gpu, model, cfg, Box::new(sampler))
    }

    /// Training on any batch source whose batches are cfg.batch × cfg.seq_len.
    pub fn with_source(
        gpu: &'g Gpu,
        model: Model,
        cfg: TrainConfig,
        source: Box<dyn BatchSource>,
    ) -> Result<Trainer<'g>> {
        cfg.validate()?;
        if cfg.seq_len > model.config.n_ctx {
            return Err(ModelError::Config(format!(
                "seq_len {} exceeds the model's context n_ctx = {}",
                cfg.seq_len, model.config.n_ctx
            )));
        }
        check_fits(gpu, &model.config, cfg.batch, cfg.seq_len)?;
        let opt = Optimizer::new(gpu, &model)?;
        let mut model = model;
        model.recompute = cfg.recompute;
        Ok(Trainer { gpu, model, cfg, step: 0, tokens_seen: 0, opt, source, dp: None })
    }

    /// Train as one rank of `comm`: every rank draws every micro-batch of the global batch (ranks × grad_accum
    /// micro-batches, in the order one process with that many accumulation steps would) and trains on its own
    /// grad_accum of them, so the data stream, its checkpointed position and the losses are those of a single
    /// process with ranks × grad_accum accumulation steps. `zero` shards the AdamW moments over the ranks.
    /// Gradients travel in buckets of `bucket_bytes` ([`crate::train::data_parallel::BUCKET_BYTES`] is a good default).
    /// Replace the data stream mid-run: on-policy fine-tuning refreshes its samples from the current model while
    /// the optimizer state and the learning-rate schedule carry on.
    pub fn set_source(&mut self, source: Box<dyn BatchSource>) {
        self.source = source;
    }

    pub fn data_parallel(&mut self, comm: Arc<dyn Collective>, zero: bool, bucket_bytes: usize) -> Result<()> {
        self.dp = Some(GradSync::attach(self.gpu, comm, &self.model, &mut self.opt, zero, bucket_bytes)?);
        Ok(())
    }

    /// Ranks of the data-parallel job this trainer is part of (1 alone).
    pub fn ranks(&self) -> usize {
        self.dp.as_ref().map_or(1, GradSync::ranks)
    }

    /// One optimizer step over `grad_accum` micro-batches: two submissions (forward/backward/norm, then clipping
    /// and AdamW) around one readback of two numbers, the loss and the gradient norm (the metrics the user asked
    /// for, the NaN check, and the clipping decision). The loss is the mean over trained (target ≠ -1) tokens.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let gpu = self.gpu;
        let start = Instant::now();
        gpu.reset_peak();
        let (b, t, accum) = (self.cfg.batch, self.cfg.seq_len, self.cfg.grad_accum);
        let (rank, ranks) = rank_of(self.dp.as_ref().map(GradSync::comm));
        let micro_batches = accum * ranks;
        self.model.zero_grad(gpu)?;
        let loss_sum = elementwise::zeros(gpu, &[1])?;
        let mut trained = 0u64;
        let mut comm = None;
        for j in 0..micro_batches {
            let batch = self.source.next_batch();
            trained += batch.targets.iter().filter(|&&x| x >= 0).count() as u64;
            if j / accum != rank {
                continue; // another rank's micro-batch
            }
            // The mean over the whole (global) batch: each micro-batch's mean scaled by 1/micro_batches.
            let w: Vec<f32> = mean_weights(&batch.targets).iter().map(|w| w / micro_batches as f32).collect();
            let targets = gpu.upload_i32(&batch.targets, &[b, t])?;
            let weights = gpu.upload(&w, &[b * t])?;
            let mut tape = Tape::new(gpu);
            let packed = batch.packed.as_deref();
            let f = self.model.forward_packed(&mut tape, &batch.inputs, b, t, packed, &targets, &weights)?;
            elementwise::add_inplace(gpu, &loss_sum, tape.value(f.loss), 1.0)?;
            match &self.dp {
                // The last local micro-batch finishes the gradients: reduce them as backward completes them.
                Some(dp) if j + 1 == (rank + 1) * accum => {
                    let params = &self.model.params;
                    comm = Some(dp.backward_and_reduce(gpu, params, |hook| Ok(tape.backward_with(f.loss, hook)?))?);
                }
                _ => tape.backward(f.loss)?,
            }
        }
        let world = self.dp.as_ref().map(GradSync::comm);
        let (lr, grad_norm, reported) =
            self.opt.apply(gpu, &self.model, &self.cfg.optim, self.cfg.steps, &[&loss_sum], world)?;
        self.step = self.opt.step;
        let loss = reported[0];
        if !loss.is_finite() {
            return Err(ModelError::NonFinite { what: "loss", value: loss, step: self.step });
        }
        let tokens = (b * t * micro_batches) as u64;
        self.tokens_seen += tokens;
        let secs = start.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: self.step,
            lr,
            loss,
            grad_norm,
            tokens_per_s: tokens as f64 / secs,
            trained_tokens: trained,
            ms_per_step: secs * 1e3,
            peak_bytes: gpu.pool_stats().peak_bytes,
            memory: gpu.pool_stats().peak_split.into(),
            comm,
        })
    }

    /// Everything needed to continue exactly: weights, AdamW moments, step, data position. In a data-parallel job
    /// every rank must call it (it checks that the ranks' weights agree and gathers sharded moments).
    pub fn checkpoint(&self, tokenizer_json: Option<String>) -> Result<Checkpoint> {
        let gpu = self.gpu;
        let state = TrainState {
            step: self.step,
            tokens_seen: self.tokens_seen,
            sampler: self.source.state()?,
            rng: serde_json::Value::Null,
            extra: serde_json::to_value(&self.cfg).map_err(|e| ModelError::Data(e.to_string()))?,
            ranks: self.ranks(),
        };
        let model = self.model.to_host(gpu)?;
        if let Some(dp) = &self.dp {
            verify_replicas(dp.comm(), &model, self.step)?;
        }
        Ok(Checkpoint {
            config: self.model.config.clone(),
            model,
            optimizer: self.opt.checkpoint_moments(gpu, &self.model, self.dp.as_ref().map(GradSync::comm))?,
            state: Some(state),
            tokenizer_json,
        })
    }

    /// Continue pretraining from a checkpoint written by `checkpoint`: same weights, moments, step and data.
    pub fn resume(gpu: &'g Gpu, ckpt: Checkpoint, cfg: TrainConfig, train: Arc<Vec<u32>>) -> Result<Trainer<'g>> {
        let sampler = BatchSampler::new(train, cfg.batch, cfg.seq_len, cfg.seed)?;
        Trainer::resume_with_source(gpu, ckpt, cfg, Box::new(sampler))
    }

    /// Continue from a checkpoint with any batch source (restored to the saved position).
    pub fn resume_with_source(
        gpu: &'g Gpu,
        ckpt: Checkpoint,
        cfg: TrainConfig,
        source: Box<dyn BatchSource>,
    ) -> Result<Trainer<'g>> {
        let state = resumable_state(&ckpt)?;
        let model = Model::from_host(gpu, &ckpt.config, ckpt.model)?;
        let mut tr = Trainer::with_source(gpu, model, cfg, source)?;
        tr.opt.restore(gpu, &tr.model, ckpt.optimizer, state.step)?;
        tr.source
            .restore(state.sampler)
            .map_err(|e| ModelError::Checkpoint { path: "<checkpoint>".into(), message: e.to_string() })?;
        tr.step = state.step;
        tr.tokens_seen = state.tokens_seen;
        Ok(tr)
    }
}

impl crate::train::driver::Stage for Trainer<'_> {
    fn step_count(&self) -> u64 {
        self.step
    }

    fn total_steps(&self) -> u64 {
        self.cfg.steps
    }

    fn step(&mut self) -> Result<StepReport> {
        let m = Trainer::step(self)?;
        let message = format!(
            "loss {:.3} | {:.0} tok/s | {:.0} ms/step | lr {:.1e}",
            m.loss, m.tokens_per_s, m.ms_per_step, m.lr
        );
        let metrics = serde_json::to_value(&m).map_err(|e| ModelError::Data(e.to_string()))?;
        Ok(StepReport { step: m.step, metrics, message })
    }

    fn model(&self) -> &Model {
        &self.model
    }

    fn checkpoint(&self, tokenizer_json: Option<String>) -> Result<Checkpoint> {
        Trainer::checkpoint(self, tokenizer_json)
    }

    fn ranks(&self) -> usize {
        Trainer::ranks(self)
    }
}

/// Refuse, before any work, a model and batch whose largest activation exceeds what one storage binding of this
/// adapter holds (the kernels would refuse it mid-step otherwise), naming the setting to change. The logits and
/// the token embedding are not limits: the classifier is chunked and tables above one binding go in parts.
pub fn check_fits(gpu: &Gpu, c: &crate::arch::config::ModelConfig, batch: usize, seq_len: usize) -> Result<()> {
    let limit = gpu.max_binding();
    let tokens = (batch * seq_len) as u64;
    let largest = [(tokens * 2 * c.n_inner as u64 * 4, "the MLP activations (batch × seq_len × 2·n_inner)")];
    for (bytes, what) in largest {
        if bytes > limit {
            return Err(ModelError::Config(format!(
                "{what} take {bytes} bytes, more than one storage binding of {} allows ({limit} bytes): lower the \
                 batch or seq_len, or use a GPU with larger limits",
                gpu.adapter_name()
            )));
        }
    }
    Ok(())
}

/// Mean per-token loss (nats) of `model` over sequential windows of `tokens`, at most `max_batches` of them.
pub fn eval_loss(
    gpu: &Gpu,
    model: &Model,
    tokens: &[u32],
    batch: usize,
    time: usize,
    max_batches: usize,
) -> Result<f32> {
    let batches = sequential_batches(tokens, batch, time);
    if batches.is_empty() {
        return Err(ModelError::Data(format!(
            "evaluation needs at least {} tokens for one {batch}×{time} batch, the text has {}",
            batch * time + 1,
            tokens.len()
        )));
    }
    let total = elementwise::zeros(gpu, &[1])?;
    let n = batches.len().min(max_batches.max(1));
    for (inputs, targets) in batches.into_iter().take(n) {
        let w = vec![1.0 / (n * batch * time) as f32; batch * time];
        let targets = gpu.upload_i32(&targets, &[batch, time])?;
        let weights = gpu.upload(&w, &[batch * time])?;
        let mut tape = Tape::no_grad(gpu);
        let f = model.forward(&mut tape, &inputs, batch, time, &targets, &weights)?;
        elementwise::add_inplace(gpu, &total, tape.value(f.loss), 1.0)?;
    }
    Ok(gpu.read(&total)?[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, FromArgMatches};

    #[test]
    fn flags_default_to_the_config_defaults() {
        let cmd = TrainConfig::augment_args(clap::Command::new("train"));
        let parsed = TrainConfig::from_arg_matches(&cmd.clone().get_matches_from(["train"])).unwrap();
        assert_eq!(parsed, TrainConfig::default());
        let parsed = TrainConfig::from_arg_matches(&cmd.get_matches_from(["train", "--lr", "0.5", "--batch", "3"]));
        let parsed = parsed.unwrap();
        assert_eq!((parsed.optim.lr, parsed.batch), (0.5, 3));
    }

    #[test]
    fn checkpointed_settings_keep_their_flat_json_layout() {
        // train_state.json of earlier runs stores the optimizer fields beside steps and batch.
        let json = serde_json::to_value(TrainConfig::default()).unwrap();
        assert_eq!(json["lr"], serde_json::json!(1e-3f32));
        assert_eq!(serde_json::from_value::<TrainConfig>(json).unwrap(), TrainConfig::default());
    }
}
