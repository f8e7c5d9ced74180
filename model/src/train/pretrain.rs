//! Pretraining: AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient accumulation,
//! clipping by the global gradient norm (computed on the GPU), periodic validation loss, checkpoints that resume
//! exactly. The caller (the CLI) owns progress display and metric files; `step` returns what it needs.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use kiln_engine::autograd::{mean_weights, Tape};
use kiln_engine::ops::adamw::{adamw_step, AdamW};
use kiln_engine::ops::{elementwise, reduce};
use kiln_engine::{Gpu, Tensor};

use crate::arch::Model;
use crate::checkpoint::{Checkpoint, HostTensor, TrainState};
use crate::data::{sequential_batches, BatchSampler, SamplerState};
use crate::error::{ModelError, Result};

/// Optimisation settings (also stored in checkpoints so `--resume` continues the same schedule).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: u64,
    pub batch: usize,
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f32,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            batch: 8,
            seq_len: 128,
            grad_accum: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 1337,
        }
    }
}

impl TrainConfig {
    /// Learning rate at 1-based `step`: linear warmup to `lr`, then cosine down to `min_lr` at `steps`.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step <= self.warmup {
            return self.lr * step as f32 / self.warmup.max(1) as f32;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (self.min_lr as f64 + (self.lr - self.min_lr) as f64 * cosine) as f32
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.batch == 0 || self.seq_len == 0 || self.grad_accum == 0 || self.steps == 0 {
            return bad("steps, batch, seq_len and grad_accum must all be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(format!("need 0 < lr ({}) and 0 <= min_lr ({}) <= lr", self.lr, self.min_lr));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!("betas must be in [0, 1): got {} and {}", self.beta1, self.beta2));
        }
        if self.grad_clip < 0.0 || self.weight_decay < 0.0 {
            return bad("grad_clip and weight_decay must not be negative".into());
        }
        Ok(())
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

/// AdamW moments of every parameter plus the step count, and the end of every optimizer step: global gradient
/// norm, one readback, NaN check, clipping, update. Pretraining, SFT and RL all finish their steps here.
pub struct Optimizer {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken so far.
    pub step: u64,
}

impl Optimizer {
    pub fn new(gpu: &Gpu, model: &Model) -> Result<Optimizer> {
        let zeros = |p: &kiln_engine::autograd::Param| elementwise::zeros(gpu, p.value.shape());
        let m = model.params.iter().map(zeros).collect::<kiln_engine::Result<Vec<_>>>()?;
        let v = model.params.iter().map(zeros).collect::<kiln_engine::Result<Vec<_>>>()?;
        Ok(Optimizer { m, v, step: 0 })
    }

    /// Update `model` from the gradients it holds. `report` tensors (scalars the caller wants, such as the loss)
    /// are read back together with the gradient norm in one readback, the only one of the step; returns
    /// (learning rate, gradient norm, the reported values in order). A non-finite norm is an error naming the step.
    pub fn apply(
        &mut self,
        gpu: &Gpu,
        model: &Model,
        cfg: &TrainConfig,
        report: &[&Tensor],
    ) -> Result<(f32, f32, Vec<f32>)> {
        self.step += 1;
        let grads: Vec<&Tensor> = model.params.iter().map(|p| &p.grad).collect();
        let norm_t = reduce::global_norm(gpu, &grads)?;
        let n: usize = report.iter().map(|t| t.numel()).sum();
        let all = gpu.alloc(&[n + 1], kiln_engine::DType::F32)?;
        gpu.copy_elements(&norm_t, 0, &all, 0, 1)?;
        let mut at = 1;
        for t in report {
            gpu.copy_elements(t, 0, &all, at, t.numel())?;
            at += t.numel();
        }
        let values = gpu.read(&all)?;
        let grad_norm = values[0];
        if !grad_norm.is_finite() {
            return Err(ModelError::NonFinite { what: "gradient norm", value: grad_norm, step: self.step });
        }
        if cfg.grad_clip > 0.0 && grad_norm > cfg.grad_clip {
            let scale = cfg.grad_clip / grad_norm;
            for g in &grads {
                elementwise::scale_inplace(gpu, g, scale)?;
            }
        }
        let lr = cfg.lr_at(self.step);
        let decay = AdamW { lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, weight_decay: cfg.weight_decay };
        let no_decay = AdamW { weight_decay: 0.0, ..decay };
        for (((p, spec), m), v) in model.params.iter().zip(&model.specs).zip(&self.m).zip(&self.v) {
            // The table says which parameters decay: matrices, not biases or norm gains.
            let cfg = if spec.decay { &decay } else { &no_decay };
            adamw_step(gpu, &p.value, &p.grad, m, v, cfg, self.step as u32)?;
        }
        gpu.sync()?;
        Ok((lr, grad_norm, values[1..].to_vec()))
    }

    /// The moments as host tensors named `<param>.m` / `<param>.v` (the checkpoint's optimizer file).
    pub fn to_host(&self, gpu: &Gpu, model: &Model) -> Result<Vec<HostTensor>> {
        let mut out = Vec::new();
        for ((p, m), v) in model.params.iter().zip(&self.m).zip(&self.v) {
            let shape = p.value.shape().to_vec();
            out.push(HostTensor { name: format!("{}.m", p.name), shape: shape.clone(), data: gpu.read(m)? });
            out.push(HostTensor { name: format!("{}.v", p.name), shape, data: gpu.read(v)? });
        }
        Ok(out)
    }

    /// Load moments written by `to_host`; every parameter's pair must be present.
    pub fn restore(&mut self, gpu: &Gpu, model: &Model, tensors: Vec<HostTensor>, step: u64) -> Result<()> {
        let moments: std::collections::HashMap<String, HostTensor> =
            tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        for ((p, m), v) in model.params.iter().zip(&self.m).zip(&self.v) {
            for (suffix, dst) in [("m", m), ("v", v)] {
                let name = format!("{}.{suffix}", p.name);
                let t = moments.get(&name).ok_or_else(|| ModelError::Checkpoint {
                    path: "<checkpoint>".into(),
                    message: format!("optimizer state lacks {name}"),
                })?;
                gpu.write(dst, &t.data)?;
            }
        }
        self.step = step;
        Ok(())
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
        Ok(Trainer { gpu, model, cfg, step: 0, tokens_seen: 0, opt, source })
    }

    /// One optimizer step over `grad_accum` micro-batches: two submissions (forward/backward/norm, then clipping
    /// and AdamW) around one readback of two numbers, the loss and the gradient norm (the metrics the user asked
    /// for, the NaN check, and the clipping decision). The loss is the mean over trained (target ≠ -1) tokens.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let gpu = self.gpu;
        let start = Instant::now();
        gpu.reset_peak();
        let (b, t, accum) = (self.cfg.batch, self.cfg.seq_len, self.cfg.grad_accum);
        self.model.zero_grad(gpu)?;
        let loss_sum = elementwise::zeros(gpu, &[1])?;
        let mut trained = 0u64;
        for _ in 0..accum {
            let batch = self.source.next_batch();
            trained += batch.targets.iter().filter(|&&x| x >= 0).count() as u64;
            // The mean over the whole accumulated batch: each micro-batch's mean scaled by 1/accum.
            let w: Vec<f32> = mean_weights(&batch.targets).iter().map(|w| w / accum as f32).collect();
            let targets = gpu.upload_i32(&batch.targets, &[b, t])?;
            let weights = gpu.upload(&w, &[b * t])?;
            let mut tape = Tape::new(gpu);
            let packed = batch.packed.as_deref();
            let f = self.model.forward_packed(&mut tape, &batch.inputs, b, t, packed, &targets, &weights)?;
            elementwise::add_inplace(gpu, &loss_sum, tape.value(f.loss), 1.0)?;
            tape.backward(f.loss)?;
        }
        let (lr, grad_norm, reported) = self.opt.apply(gpu, &self.model, &self.cfg, &[&loss_sum])?;
        self.step = self.opt.step;
        let loss = reported[0];
        if !loss.is_finite() {
            return Err(ModelError::NonFinite { what: "loss", value: loss, step: self.step });
        }
        let tokens = (b * t * accum) as u64;
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
        })
    }

    /// Everything needed to continue exactly: weights, AdamW moments, step, data position.
    pub fn checkpoint(&self, tokenizer_json: Option<String>) -> Result<Checkpoint> {
        let gpu = self.gpu;
        let state = TrainState {
            step: self.step,
            tokens_seen: self.tokens_seen,
            sampler: self.source.state()?,
            rng: serde_json::Value::Null,
            extra: serde_json::to_value(&self.cfg).map_err(|e| ModelError::Data(e.to_string()))?,
        };
        Ok(Checkpoint {
            config: self.model.config.clone(),
            model: self.model.to_host(gpu)?,
            optimizer: self.opt.to_host(gpu, &self.model)?,
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

/// Refuse, before any work, a model and batch whose largest tensors exceed what one storage binding of this
/// adapter holds (the kernels would refuse them mid-step otherwise), naming the setting to change.
pub fn check_fits(gpu: &Gpu, c: &crate::arch::config::ModelConfig, batch: usize, seq_len: usize) -> Result<()> {
    let limit = gpu.limits().max_storage_buffer_binding_size;
    let tokens = (batch * seq_len) as u64;
    let largest = [
        (tokens * c.vocab_size as u64 * 4, "the logits (batch × seq_len × vocab_size)"),
        (c.vocab_size as u64 * c.n_embd as u64 * 4, "the token embedding (vocab_size × n_embd)"),
        (tokens * 2 * c.n_inner as u64 * 4, "the MLP activations (batch × seq_len × 2·n_inner)"),
    ];
    for (bytes, what) in largest {
        if bytes > limit {
            return Err(ModelError::Config(format!(
                "{what} take {bytes} bytes, more than one storage binding of {} allows ({limit} bytes): lower the \
                 batch, seq_len or vocabulary, or use a GPU with larger limits",
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
