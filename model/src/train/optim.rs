//! The optimizer every stage shares: AdamW (weight decay where the parameter table says so), linear warmup then
//! cosine decay, clipping by the global gradient norm computed on the GPU, and the NaN check that names the step.

use serde::{Deserialize, Serialize};

use kiln_engine::ops::adamw::{adamw_step, AdamW};
use kiln_engine::ops::{elementwise, reduce};
use kiln_engine::{Gpu, Tensor};

use std::sync::Arc;

use crate::arch::Model;
use crate::checkpoint::HostTensor;
use crate::error::{ModelError, Result};
use crate::train::collective::Collective;

/// AdamW and learning-rate schedule settings. The defaults are pretraining's; each stage's config holds its own
/// (so RL's smaller learning rate is RL's default, not a second copy of pretraining's flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct OptimConfig {
    /// Peak learning rate, reached after the warmup.
    #[arg(long, default_value_t = OptimConfig::default().lr)]
    pub lr: f32,
    /// Learning rate at the last step (cosine decay from lr).
    #[arg(long, default_value_t = OptimConfig::default().min_lr)]
    pub min_lr: f32,
    /// Optimizer steps of linear warmup.
    #[arg(long, default_value_t = OptimConfig::default().warmup)]
    pub warmup: u64,
    /// AdamW weight decay of the matrices (biases and norm gains never decay).
    #[arg(long, default_value_t = OptimConfig::default().weight_decay)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = OptimConfig::default().beta1)]
    pub beta1: f32,
    #[arg(long, default_value_t = OptimConfig::default().beta2)]
    pub beta2: f32,
    #[arg(long, default_value_t = OptimConfig::default().eps)]
    pub eps: f32,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = OptimConfig::default().grad_clip)]
    pub grad_clip: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

impl OptimConfig {
    /// Learning rate at 1-based `step` of `total` optimizer steps: linear warmup to `lr`, then cosine down to
    /// `min_lr` at `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f32 {
        if step <= self.warmup {
            return self.lr * step as f32 / self.warmup.max(1) as f32;
        }
        let span = total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (self.min_lr as f64 + (self.lr - self.min_lr) as f64 * cosine) as f32
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if !(self.lr > 0.0 && self.lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(format!("need 0 < lr ({}) and 0 <= min_lr ({}) <= lr", self.lr, self.min_lr));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!("betas must be in [0, 1): got {} and {}", self.beta1, self.beta2));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad(format!("eps must be a positive number, got {}", self.eps));
        }
        if !(self.grad_clip >= 0.0 && self.weight_decay >= 0.0) {
            return bad("grad_clip and weight_decay must not be negative".into());
        }
        Ok(())
    }
}

/// AdamW moments of every parameter plus the step count, and the end of every optimizer step: global gradient
/// norm, one readback, NaN check, clipping, update. Pretraining, SFT and RL all finish their steps here.
pub struct Optimizer {
    /// Moments per parameter; None for a parameter another rank updates (ZeRO-1).
    m: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    /// Optimizer steps taken so far.
    pub step: u64,
    shard: Option<Shard>,
}

/// ZeRO-1: which rank updates (and holds the moments of) each parameter.
struct Shard {
    comm: Arc<dyn Collective>,
    owner: Vec<usize>,
}

impl Shard {
    /// Parameters by owner, balanced by size: largest first, each to the least-loaded rank (lowest on a tie), so
    /// every rank computes the same assignment.
    fn assign(model: &Model, ranks: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..model.params.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(model.params[i].value.numel()), i));
        let mut load = vec![0usize; ranks];
        let mut owner = vec![0; model.params.len()];
        for i in order {
            let r = (0..ranks).min_by_key(|&r| (load[r], r)).expect("at least one rank");
            owner[i] = r;
            load[r] += model.params[i].value.numel();
        }
        owner
    }

    fn mine(&self) -> impl Iterator<Item = usize> + '_ {
        let rank = self.comm.rank();
        self.owner.iter().enumerate().filter(move |(_, &o)| o == rank).map(|(i, _)| i)
    }

    /// Values per rank, in rank order, of `per_param(i)` elements for each parameter the rank owns.
    fn counts(&self, per_param: impl Fn(usize) -> usize) -> Vec<usize> {
        let mut counts = vec![0; self.comm.size()];
        for (i, &o) in self.owner.iter().enumerate() {
            counts[o] += per_param(i);
        }
        counts
    }

    /// Every rank's owned tensors (`tensors(i)`: `per` tensors of parameter i's shape), gathered on every rank and
    /// split back into one vector per parameter (the tensors of parameter i end to end).
    fn gather<'t>(
        &self,
        gpu: &Gpu,
        model: &Model,
        per: usize,
        tensors: impl Fn(usize) -> Vec<&'t Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let size = |i: usize| model.params[i].value.numel() * per;
        // This rank's share end to end in one pooled buffer: one readback, not one per tensor.
        let total: usize = self.mine().map(size).sum();
        let packed = gpu.alloc(&[total.max(1)], kiln_engine::DType::F32)?;
        let mut at = 0;
        for i in self.mine() {
            for t in tensors(i) {
                gpu.copy_elements(t, 0, &packed, at, t.numel())?;
                at += t.numel();
            }
        }
        debug_assert_eq!(at, total, "every owned parameter contributes `per` tensors of its shape");
        let mut local = gpu.read(&packed)?;
        local.truncate(total);
        let all = self.comm.all_gather_f32(&local, &self.counts(size))?;
        let mut out = vec![Vec::new(); model.params.len()];
        let mut at = 0;
        for r in 0..self.comm.size() {
            for i in (0..model.params.len()).filter(|&i| self.owner[i] == r) {
                out[i] = all[at..at + size(i)].to_vec();
                at += size(i);
            }
        }
        Ok(out)
    }
}

impl Optimizer {
    pub fn new(gpu: &Gpu, model: &Model) -> Result<Optimizer> {
        let zeros = |p: &kiln_engine::autograd::Param| elementwise::zeros(gpu, p.value.shape()).map(Some);
        let m = model.params.iter().map(zeros).collect::<kiln_engine::Result<Vec<_>>>()?;
        let v = model.params.iter().map(zeros).collect::<kiln_engine::Result<Vec<_>>>()?;
        for t in m.iter().chain(&v).flatten() {
            gpu.set_kind(t, kiln_engine::MemoryKind::Optimizer);
        }
        Ok(Optimizer { m, v, step: 0, shard: None })
    }

    /// ZeRO-1 over `comm`: keep the moments of this rank's share of the parameters only (their memory goes back
    /// to the pool). Each step every rank updates its share from the (all-reduced) gradients and the updated
    /// parameters are all-gathered, so every rank still ends the step with the same weights.
    pub fn shard(&mut self, gpu: &Gpu, model: &Model, comm: Arc<dyn Collective>) -> Result<()> {
        let owner = Shard::assign(model, comm.size());
        for (i, &o) in owner.iter().enumerate() {
            if o != comm.rank() {
                self.m[i] = None;
                self.v[i] = None;
            }
        }
        self.shard = Some(Shard { comm, owner });
        gpu.flush()?;
        Ok(())
    }

    /// Update `model` from the gradients it holds. `report` tensors (scalars the caller wants, such as the loss)
    /// are read back together with the gradient norm in one readback, the only one of the step; returns
    /// (learning rate, gradient norm, the reported values in order). A non-finite norm is an error naming the step.
    /// In a data-parallel job (`world`) the gradients are already summed over ranks and the reported values are
    /// summed here, so every rank returns the job's totals.
    pub fn apply(
        &mut self,
        gpu: &Gpu,
        model: &Model,
        cfg: &OptimConfig,
        total_steps: u64,
        report: &[&Tensor],
        world: Option<&dyn Collective>,
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
        let mut values = gpu.read(&all)?;
        if let Some(world) = world {
            world.all_reduce_sum(&mut values[1..])?;
        }
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
        let lr = cfg.lr_at(self.step, total_steps);
        let decay = AdamW { lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, weight_decay: cfg.weight_decay };
        let no_decay = AdamW { weight_decay: 0.0, ..decay };
        for (((p, spec), m), v) in model.params.iter().zip(&model.specs).zip(&self.m).zip(&self.v) {
            // The table says which parameters decay: matrices, not biases or norm gains.
            let cfg = if spec.decay { &decay } else { &no_decay };
            if let (Some(m), Some(v)) = (m, v) {
                adamw_step(gpu, &p.value, &p.grad, m, v, cfg, self.step as u32)?;
            }
        }
        if let Some(shard) = &self.shard {
            let values = shard.gather(gpu, model, 1, |i| vec![&model.params[i].value])?;
            for (i, (p, data)) in model.params.iter().zip(values).enumerate() {
                if shard.owner[i] != shard.comm.rank() {
                    gpu.write(&p.value, &data)?;
                }
            }
        }
        gpu.sync()?;
        Ok((lr, grad_norm, values[1..].to_vec()))
    }

    /// The moments as host tensors named `<param>.m` / `<param>.v` (the checkpoint's optimizer file).
    /// The moments a checkpoint of this rank holds: all of them where it is written (alone, or rank 0 of
    /// `world`) and always when sharded (gathering them is a collective every rank joins); none on the other ranks
    /// of an unsharded job, which would only discard them.
    pub fn checkpoint_moments(
        &self,
        gpu: &Gpu,
        model: &Model,
        world: Option<&dyn Collective>,
    ) -> Result<Vec<HostTensor>> {
        if self.shard.is_some() || world.is_none_or(|w| w.rank() == 0) {
            self.to_host(gpu, model)
        } else {
            Ok(Vec::new())
        }
    }

    /// Sharded (ZeRO-1), this is a collective: every rank must call it, and every rank gets all the moments.
    pub fn to_host(&self, gpu: &Gpu, model: &Model) -> Result<Vec<HostTensor>> {
        let gathered = match &self.shard {
            Some(shard) => {
                Some(shard.gather(gpu, model, 2, |i| [&self.m[i], &self.v[i]].into_iter().flatten().collect())?)
            }
            None => None,
        };
        let mut out = Vec::new();
        for (i, ((p, m), v)) in model.params.iter().zip(&self.m).zip(&self.v).enumerate() {
            let shape = p.value.shape().to_vec();
            let (m, v) = match (&gathered, m, v) {
                (Some(g), _, _) => {
                    let n = p.value.numel();
                    (g[i][..n].to_vec(), g[i][n..].to_vec())
                }
                (None, Some(m), Some(v)) => (gpu.read(m)?, gpu.read(v)?),
                _ => unreachable!("unsharded optimizers hold every moment"),
            };
            out.push(HostTensor { name: format!("{}.m", p.name), shape: shape.clone(), data: m });
            out.push(HostTensor { name: format!("{}.v", p.name), shape, data: v });
        }
        Ok(out)
    }

    /// Load moments written by `to_host`; every parameter's pair must be present.
    pub fn restore(&mut self, gpu: &Gpu, model: &Model, tensors: Vec<HostTensor>, step: u64) -> Result<()> {
        let moments: std::collections::HashMap<String, HostTensor> =
            tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        for ((p, m), v) in model.params.iter().zip(&self.m).zip(&self.v) {
            for (suffix, dst) in [("m", m), ("v", v)] {
                let Some(dst) = dst else { continue }; // another rank's share (ZeRO-1)
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
