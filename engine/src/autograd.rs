//! Reverse-mode autodiff. Each op computes its forward on the GPU and records a node: its inputs, the tensors its
//! backward needs, and which backward to run. `Tape::backward` walks the nodes in reverse, dispatching the backward
//! kernels into the same command stream; a node's saved tensors and incoming gradient are dropped right after its
//! backward runs, so activations return to the pool as the walk goes. Parameters are leaves owning a persistent
//! `grad` that backward adds into (so several backward passes accumulate, as gradient accumulation wants).

use crate::ops::attention::Heads;
use crate::ops::kv_cache::{self, KvCache};
use crate::ops::matmul::{matmul, matmul_backward, MatmulSpec};
use crate::ops::rope::{self, RopeTable};
use crate::ops::{attention, classifier, elementwise, embedding, loss, norm};
use crate::{DType, Error, Gpu, MemoryKind, Result, Tensor};
use std::collections::HashMap;

/// A trainable tensor and its gradient (same shape, zeroed by `zero_grad`).
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub grad: Tensor,
}

impl Param {
    pub fn new(gpu: &Gpu, name: impl Into<String>, value: Tensor) -> Result<Param> {
        let grad = elementwise::zeros(gpu, value.shape())?;
        gpu.set_kind(&value, MemoryKind::Parameters);
        gpu.set_kind(&grad, MemoryKind::Gradients);
        Ok(Param { name: name.into(), value, grad })
    }

    pub fn zero_grad(&self, gpu: &Gpu) -> Result<()> {
        elementwise::fill(gpu, &self.grad, 0.0)
    }
}

/// A value recorded on a tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

enum Op<'a> {
    Const,
    Param(&'a Param),
    Matmul { a: Var, b: Var, bias: Option<Var>, spec: MatmulSpec },
    Attention { qkv: Var, lse: Tensor, heads: Heads, starts: Option<Tensor> },
    LayerNorm { x: Var, gamma: Var, beta: Var, mean: Tensor, rstd: Tensor, eps: f32 },
    RmsNorm { x: Var, gamma: Var, rstd: Tensor, eps: f32 },
    Rope { x: Var, positions: Tensor, table: &'a RopeTable, heads: Heads },
    Gelu { x: Var },
    Swiglu { x: Var },
    Add { a: Var, b: Var },
    Scale { x: Var, alpha: f32 },
    Embedding { tokens: Vec<i32>, positions: Option<Vec<i32>>, wte: &'a Param, wpe: Option<&'a Param> },
    CrossEntropy { logits: Var, targets: Tensor, lse: Tensor },
    Classifier { x: Var, w: &'a Param, targets: Tensor, saved: classifier::Saved, chunk: usize },
    WeightedSum { x: Var, weights: Tensor },
    Reshape { x: Var, from: Vec<usize>, to: Vec<usize> },
}

struct Node<'a> {
    value: Option<Tensor>,
    grad: Option<Tensor>,
    op: Op<'a>,
    requires_grad: bool,
}

/// The record of one forward pass.
pub struct Tape<'a> {
    gpu: &'a Gpu,
    nodes: Vec<Node<'a>>,
    record: bool,
    /// Rows per chunk of [`Tape::classifier_loss`] (None: the classifier's default for the vocabulary).
    classifier_chunk: Option<usize>,
}

impl<'a> Tape<'a> {
    /// A tape that records for backward.
    pub fn new(gpu: &'a Gpu) -> Tape<'a> {
        Tape { gpu, nodes: Vec::new(), record: true, classifier_chunk: None }
    }

    /// Evaluation and generation: ops compute values but save nothing for backward.
    pub fn no_grad(gpu: &'a Gpu) -> Tape<'a> {
        Tape { gpu, nodes: Vec::new(), record: false, classifier_chunk: None }
    }

    pub fn value(&self, v: Var) -> &Tensor {
        self.nodes[v.0].value.as_ref().expect("a value is only released by backward, after which the tape is spent")
    }

    /// The gradient that reached an intermediate value, if backward has not consumed it yet (for tests).
    pub fn grad(&self, v: Var) -> Option<&Tensor> {
        self.nodes[v.0].grad.as_ref()
    }

    fn push(&mut self, value: Tensor, op: Op<'a>, inputs: &[Var]) -> Var {
        let requires_grad = match op {
            Op::Const => false,
            Op::Param(_) | Op::Embedding { .. } | Op::Classifier { .. } => self.record,
            _ => self.record && inputs.iter().any(|v| self.nodes[v.0].requires_grad),
        };
        let op = if requires_grad { op } else { Op::Const };
        self.nodes.push(Node { value: Some(value), grad: None, op, requires_grad });
        Var(self.nodes.len() - 1)
    }

    /// A constant input (no gradient).
    pub fn input(&mut self, t: Tensor) -> Var {
        self.push(t, Op::Const, &[])
    }

    /// A parameter: backward adds its gradient into `p.grad`.
    pub fn param(&mut self, p: &'a Param) -> Var {
        self.push(p.value.clone(), Op::Param(p), &[])
    }

    pub fn matmul(&mut self, a: Var, b: Var, bias: Option<Var>, spec: MatmulSpec) -> Result<Var> {
        let out = matmul(self.gpu, self.value(a), self.value(b), bias.map(|v| self.value(v)), spec)?;
        let inputs: Vec<Var> = [Some(a), Some(b), bias].into_iter().flatten().collect();
        Ok(self.push(out, Op::Matmul { a, b, bias, spec: MatmulSpec { alpha: 1.0, beta: 0.0, ..spec } }, &inputs))
    }

    /// Causal self-attention over a packed qkv [B, T, (NH + 2·NKV)·HS] → y [B, T, NH·HS]; `heads` is an n_head
    /// (multi-head, qkv [B, T, 3C]) or [`Heads`] for grouped-query attention.
    pub fn attention(&mut self, qkv: Var, heads: impl Into<Heads>) -> Result<Var> {
        self.attention_segments(qkv, heads, None)
    }

    /// Self-attention over rows of packed sequences: starts (I32 [B, T], see `attention::segment_starts`) gives
    /// each query the first key it may see, so no sequence attends to the ones packed before it. None = causal.
    pub fn attention_segments(&mut self, qkv: Var, heads: impl Into<Heads>, starts: Option<&Tensor>) -> Result<Var> {
        let heads = heads.into();
        let (y, lse) = attention::attention_forward_segments(self.gpu, self.value(qkv), heads, starts)?;
        Ok(self.push(y, Op::Attention { qkv, lse, heads, starts: starts.cloned() }, &[qkv]))
    }

    /// Decoding: appends the new tokens' k and v (qkv [B, T, W] at positions pos..pos+T) to `cache` and attends
    /// over the cached prefix. It has no backward, so it is refused where a gradient would have to flow through it.
    pub fn attention_cached(&mut self, qkv: Var, cache: &KvCache, pos: usize) -> Result<Var> {
        if self.needs(qkv) {
            let message = "attention over a KV cache has no backward: decode on a no_grad tape".into();
            return Err(Error::Invalid { op: "attention_cached", message });
        }
        kv_cache::kv_append(self.gpu, cache, self.value(qkv), pos)?;
        let y = kv_cache::attention_cached(self.gpu, cache, self.value(qkv), pos)?;
        Ok(self.input(y))
    }

    /// Rotary embeddings of qkv's query and key heads at `positions` (I32, one per row of qkv).
    pub fn rope(&mut self, qkv: Var, positions: &Tensor, table: &'a RopeTable, heads: impl Into<Heads>) -> Result<Var> {
        let heads = heads.into();
        let y = rope::rope(self.gpu, self.value(qkv), positions, table, heads)?;
        Ok(self.push(y, Op::Rope { x: qkv, positions: positions.clone(), table, heads }, &[qkv]))
    }

    /// The same values under another shape (same number of elements).
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let from = self.value(x).shape().to_vec();
        let y = self.value(x).reshape(shape)?;
        Ok(self.push(y, Op::Reshape { x, from, to: shape.to_vec() }, &[x]))
    }

    pub fn layernorm(&mut self, x: Var, gamma: Var, beta: Var, eps: f32) -> Result<Var> {
        let (y, mean, rstd) = norm::layernorm(self.gpu, self.value(x), self.value(gamma), self.value(beta), eps)?;
        Ok(self.push(y, Op::LayerNorm { x, gamma, beta, mean, rstd, eps }, &[x, gamma, beta]))
    }

    pub fn rmsnorm(&mut self, x: Var, gamma: Var, eps: f32) -> Result<Var> {
        let (y, rstd) = norm::rmsnorm(self.gpu, self.value(x), self.value(gamma), eps)?;
        Ok(self.push(y, Op::RmsNorm { x, gamma, rstd, eps }, &[x, gamma]))
    }

    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        let y = elementwise::gelu(self.gpu, self.value(x))?;
        Ok(self.push(y, Op::Gelu { x }, &[x]))
    }

    /// silu(gate)·up of a fused gate/up projection [..., 2I] → [..., I].
    pub fn swiglu(&mut self, gu: Var) -> Result<Var> {
        let y = elementwise::swiglu(self.gpu, self.value(gu))?;
        Ok(self.push(y, Op::Swiglu { x: gu }, &[gu]))
    }

    /// a + b (the residual connection).
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let y = elementwise::add(self.gpu, self.value(a), self.value(b), 1.0)?;
        Ok(self.push(y, Op::Add { a, b }, &[a, b]))
    }

    pub fn scale(&mut self, x: Var, alpha: f32) -> Result<Var> {
        let y = elementwise::scale(self.gpu, self.value(x), alpha)?;
        Ok(self.push(y, Op::Scale { x, alpha }, &[x]))
    }

    /// The GPU this tape records on.
    pub fn gpu(&self) -> &'a Gpu {
        self.gpu
    }

    /// Token + position embedding of `tokens` ([batch, time], row-major host ids) → [batch, time, C].
    pub fn embedding(
        &mut self,
        tokens: &[i32],
        batch: usize,
        time: usize,
        wte: &'a Param,
        wpe: &'a Param,
    ) -> Result<Var> {
        self.embedding_at(tokens, None, batch, time, wte, Some(wpe))
    }

    /// [`Tape::embedding`] with host position ids ([batch, time]; None = t), for packed sequences. Without a
    /// position table (`wpe` None: models with rotary positions) it is the token embedding alone and the position
    /// ids are not used.
    pub fn embedding_at(
        &mut self,
        tokens: &[i32],
        positions: Option<&[i32]>,
        batch: usize,
        time: usize,
        wte: &'a Param,
        wpe: Option<&'a Param>,
    ) -> Result<Var> {
        for (what, n) in [("tokens", Some(tokens.len())), ("positions", positions.map(<[i32]>::len))] {
            if let Some(n) = n.filter(|&n| n != batch * time) {
                return Err(Error::Shape {
                    op: "embedding",
                    what,
                    expected: format!("{batch}×{time} = {} ids", batch * time),
                    got: format!("{n} ids"),
                });
            }
        }
        let ids = self.gpu.upload_i32(tokens, &[batch, time])?;
        let (y, positions) = match wpe {
            Some(wpe) => {
                let pos = positions.map(|p| self.gpu.upload_i32(p, &[batch, time])).transpose()?;
                (embedding::embedding_at(self.gpu, &ids, pos.as_ref(), &wte.value, &wpe.value)?, positions)
            }
            None => (embedding::token_embedding(self.gpu, &ids, &wte.value)?, None),
        };
        let op = Op::Embedding { tokens: tokens.to_vec(), positions: positions.map(<[i32]>::to_vec), wte, wpe };
        Ok(self.push(y, op, &[]))
    }

    /// Per-row softmax cross-entropy of logits [N, V] (or [B, T, V]) against I32 targets; -1 rows give 0.
    pub fn cross_entropy(&mut self, logits: Var, targets: &Tensor) -> Result<Var> {
        let (losses, lse) = loss::cross_entropy(self.gpu, self.value(logits), targets)?;
        Ok(self.push(losses, Op::CrossEntropy { logits, targets: targets.clone(), lse }, &[logits]))
    }

    /// Rows per chunk of [`Tape::classifier_loss`] on this tape (a positive multiple of
    /// `classifier::row_step`; None: `classifier::chunk_rows` of the vocabulary). Benches and tests vary it.
    pub fn set_classifier_chunk(&mut self, rows: Option<usize>) {
        self.classifier_chunk = rows;
    }

    /// Per-row softmax cross-entropy of the logits x·wᵀ (x [N, C], the output weight `w` [V, C]: a tied token
    /// embedding or an lm_head) against I32 `targets` (N ids, any shape; -1 rows give 0), without ever forming the
    /// [N, V] logits: see `ops::classifier`. Returns losses shaped like `targets`. Backward adds dW straight into
    /// `w.grad` and passes dx on.
    pub fn classifier_loss(&mut self, x: Var, w: &'a Param, targets: &Tensor) -> Result<Var> {
        Ok(self.classifier(x, w, targets, false)?.0)
    }

    /// [`Tape::classifier_loss`] and each row's softmax entropy (a metric: no gradient flows through it).
    pub fn classifier_loss_entropy(&mut self, x: Var, w: &'a Param, targets: &Tensor) -> Result<(Var, Tensor)> {
        let (losses, h) = self.classifier(x, w, targets, true)?;
        Ok((losses, h.expect("asked for the entropy")))
    }

    fn classifier(&mut self, x: Var, w: &'a Param, targets: &Tensor, entropy: bool) -> Result<(Var, Option<Tensor>)> {
        let v = w.value.shape()[0];
        let chunk = self.classifier_chunk.unwrap_or_else(|| classifier::chunk_rows(self.gpu, v));
        // Keep chunk logits for the backward only where there will be one.
        let keep = if self.record { classifier::KEEP_BYTES } else { 0 };
        let (losses, saved, h) = if entropy {
            let (l, s, h) = classifier::loss_entropy(self.gpu, self.value(x), &w.value, targets, chunk, keep)?;
            (l, s, Some(h))
        } else {
            let (l, s) = classifier::loss(self.gpu, self.value(x), &w.value, targets, chunk, keep)?;
            (l, s, None)
        };
        Ok((self.push(losses, Op::Classifier { x, w, targets: targets.clone(), saved, chunk }, &[x]), h))
    }

    /// Whether this tape records for backward (false for `no_grad` tapes).
    pub fn records(&self) -> bool {
        self.record
    }

    /// Σ_i w_i·x_i → [1]. With w = 1/N_valid on valid rows it is the mean loss; with signed per-token weights it
    /// is an advantage-weighted policy-gradient loss.
    pub fn weighted_sum(&mut self, x: Var, weights: &Tensor) -> Result<Var> {
        let xv = self.value(x);
        if weights.numel() != xv.numel() || weights.dtype() != DType::F32 {
            return Err(Error::Shape {
                op: "weighted_sum",
                what: "weights",
                expected: format!("{} f32 values (one per element of {:?})", xv.numel(), xv.shape()),
                got: format!("{:?} {:?}", weights.dtype(), weights.shape()),
            });
        }
        // A [1, n]·[n, 1] product: the matmul kernels already reduce deterministically.
        let n = xv.numel();
        let y = matmul(self.gpu, &xv.reshape(&[1, n])?, &weights.reshape(&[n, 1])?, None, MatmulSpec::nn())?;
        Ok(self.push(y.reshape(&[1])?, Op::WeightedSum { x, weights: weights.clone() }, &[x]))
    }

    /// Drop the value of `v` now and recompute it from its inputs when backward needs it (activation
    /// recomputation: memory for time). The same kernels run on the same inputs, so the gradients are bit for bit
    /// those without forgetting. Values that cannot be recomputed (inputs, parameters, embeddings, losses) and
    /// values on `no_grad` tapes are kept.
    pub fn forget(&mut self, v: Var) {
        let node = &mut self.nodes[v.0];
        let recomputable = matches!(
            node.op,
            Op::Matmul { .. }
                | Op::Attention { .. }
                | Op::LayerNorm { .. }
                | Op::RmsNorm { .. }
                | Op::Rope { .. }
                | Op::Gelu { .. }
                | Op::Swiglu { .. }
                | Op::Add { .. }
                | Op::Scale { .. }
                | Op::Reshape { .. }
        );
        if self.record && node.requires_grad && recomputable {
            node.value = None;
        }
    }

    /// The index the next recorded value gets (for [`Tape::forget_since`]).
    pub fn mark(&self) -> usize {
        self.nodes.len()
    }

    /// [`Tape::forget`] every value recorded since `mark` except `keep` (a whole block but its output).
    pub fn forget_since(&mut self, mark: usize, keep: Var) {
        for i in mark..self.nodes.len() {
            if i != keep.0 {
                self.forget(Var(i));
            }
        }
    }

    /// Make sure `v` holds its value, recomputing it (and, first, any forgotten inputs) if it was forgotten.
    fn ensure(&mut self, v: Var) -> Result<()> {
        if self.nodes[v.0].value.is_some() {
            return Ok(());
        }
        let inputs: Vec<Var> = match &self.nodes[v.0].op {
            Op::Matmul { a, b, bias, .. } => [Some(*a), Some(*b), *bias].into_iter().flatten().collect(),
            Op::Attention { qkv: x, .. }
            | Op::Rope { x, .. }
            | Op::Gelu { x }
            | Op::Swiglu { x }
            | Op::Scale { x, .. }
            | Op::Reshape { x, .. } => vec![*x],
            Op::LayerNorm { x, gamma, beta, .. } => vec![*x, *gamma, *beta],
            Op::RmsNorm { x, gamma, .. } => vec![*x, *gamma],
            Op::Add { a, b } => vec![*a, *b],
            _ => {
                let message = format!("value #{} was released and cannot be recomputed", v.0);
                return Err(Error::Invalid { op: "backward", message });
            }
        };
        for i in inputs {
            self.ensure(i)?;
        }
        let gpu = self.gpu;
        let value = match &self.nodes[v.0].op {
            Op::Matmul { a, b, bias, spec } => {
                matmul(gpu, self.value(*a), self.value(*b), bias.map(|v| self.value(v)), *spec)?
            }
            Op::Attention { qkv, heads, starts, .. } => {
                attention::attention_forward_segments(gpu, self.value(*qkv), *heads, starts.as_ref())?.0
            }
            Op::Rope { x, positions, table, heads } => rope::rope(gpu, self.value(*x), positions, table, *heads)?,
            Op::Gelu { x } => elementwise::gelu(gpu, self.value(*x))?,
            Op::Swiglu { x } => elementwise::swiglu(gpu, self.value(*x))?,
            Op::Scale { x, alpha } => elementwise::scale(gpu, self.value(*x), *alpha)?,
            Op::Reshape { x, to, .. } => self.value(*x).reshape(to)?,
            Op::LayerNorm { x, gamma, beta, eps, .. } => {
                norm::layernorm(gpu, self.value(*x), self.value(*gamma), self.value(*beta), *eps)?.0
            }
            Op::RmsNorm { x, gamma, eps, .. } => norm::rmsnorm(gpu, self.value(*x), self.value(*gamma), *eps)?.0,
            Op::Add { a, b } => elementwise::add(gpu, self.value(*a), self.value(*b), 1.0)?,
            _ => unreachable!("the inputs match above refused every other op"),
        };
        self.nodes[v.0].value = Some(value);
        Ok(())
    }

    /// The inputs backward of node `i` reads (and the node itself for attention): forgotten ones are recomputed
    /// before it runs.
    fn ensure_for_backward(&mut self, i: usize) -> Result<()> {
        let needs: Vec<Var> = match &self.nodes[i].op {
            Op::Matmul { a, b, .. } => vec![*a, *b],
            Op::Attention { qkv, .. } => vec![*qkv, Var(i)],
            Op::LayerNorm { x, gamma, .. } | Op::RmsNorm { x, gamma, .. } => vec![*x, *gamma],
            Op::Gelu { x } | Op::Swiglu { x } | Op::WeightedSum { x, .. } => vec![*x],
            Op::Classifier { x, .. } => vec![*x],
            Op::CrossEntropy { logits, .. } => vec![*logits],
            _ => vec![],
        };
        for v in needs {
            self.ensure(v)?;
        }
        Ok(())
    }

    /// Add `g` to the gradient of `v`. Never in place on a node's gradient: the same tensor may have been handed to
    /// several inputs (a + b passes one gradient to both).
    fn accumulate(&mut self, v: Var, g: Tensor) -> Result<()> {
        let node = &mut self.nodes[v.0];
        if !node.requires_grad {
            return Ok(());
        }
        node.grad = Some(match node.grad.take() {
            None => g,
            Some(prev) => elementwise::add(self.gpu, &prev, &g, 1.0)?,
        });
        Ok(())
    }

    fn needs(&self, v: Var) -> bool {
        self.nodes[v.0].requires_grad
    }

    /// Backpropagate from a one-element `loss`. The tape is spent afterwards: values are released as it walks.
    pub fn backward(&mut self, loss: Var) -> Result<()> {
        self.backward_with(loss, &mut |_| Ok(()))
    }

    /// `backward`, calling `done(p)` as soon as parameter `p`'s gradient is final: once the walk has passed the
    /// first node that uses it (the kernels adding into `p.grad` are recorded, not necessarily run). Data-parallel
    /// training starts a bucket's all-reduce there. Parameters the tape never used are not reported.
    pub fn backward_with(&mut self, loss: Var, done: &mut dyn FnMut(&'a Param) -> Result<()>) -> Result<()> {
        // The node below which each parameter is used no more, by address (a tied weight appears twice).
        let mut first_use: HashMap<*const Param, (usize, &'a Param)> = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate().take(loss.0 + 1) {
            let used: [Option<&'a Param>; 2] = match node.op {
                Op::Param(p) | Op::Classifier { w: p, .. } => [Some(p), None],
                Op::Embedding { wte, wpe, .. } => [Some(wte), wpe],
                _ => [None, None],
            };
            for p in used.into_iter().flatten() {
                first_use.entry(p as *const Param).or_insert((i, p));
            }
        }
        let mut finals: HashMap<usize, Vec<&'a Param>> = HashMap::new();
        for (i, p) in first_use.into_values() {
            finals.entry(i).or_default().push(p);
        }
        if !self.record {
            return Err(Error::Invalid { op: "backward", message: "this tape was made with no_grad".into() });
        }
        let n = self.value(loss).numel();
        if n != 1 {
            return Err(Error::Invalid { op: "backward", message: format!("the loss must have one element, not {n}") });
        }
        let seed = self.gpu.alloc(&[1], DType::F32)?;
        elementwise::fill(self.gpu, &seed, 1.0)?;
        self.accumulate(loss, seed)?;
        for i in (0..=loss.0).rev() {
            if self.nodes[i].grad.is_some() {
                self.ensure_for_backward(i)?;
            }
            let node = &mut self.nodes[i];
            let op = std::mem::replace(&mut node.op, Op::Const);
            let g = node.grad.take();
            let value = node.value.take(); // released once this node's backward has run
            if let Some(g) = g {
                self.backward_node(op, g, value)?;
            }
            for p in finals.remove(&i).unwrap_or_default() {
                done(p)?;
            }
        }
        Ok(())
    }

    fn backward_node(&mut self, op: Op<'a>, g: Tensor, value: Option<Tensor>) -> Result<()> {
        let gpu = self.gpu;
        match op {
            Op::Const => {}
            Op::Param(p) => elementwise::add_inplace(gpu, &p.grad, &g, 1.0)?,
            Op::Matmul { a, b, bias, spec } => {
                let want = [self.needs(a), self.needs(b), bias.is_some_and(|v| self.needs(v))];
                let (da, db, dbias) = matmul_backward(gpu, self.value(a), self.value(b), &g, spec, want)?;
                for (v, d) in [(Some(a), da), (Some(b), db), (bias, dbias)] {
                    if let (Some(v), Some(d)) = (v, d) {
                        self.accumulate(v, d)?;
                    }
                }
            }
            Op::Attention { qkv, lse, heads, starts } => {
                let y = value.expect("attention keeps its output until its backward");
                let q = self.value(qkv);
                let d = attention::attention_backward_segments(gpu, q, &y, &lse, &g, heads, starts.as_ref())?;
                self.accumulate(qkv, d)?;
            }
            Op::RmsNorm { x, gamma, rstd, .. } => {
                let (dx, dg) = norm::rmsnorm_backward(gpu, &g, self.value(x), self.value(gamma), &rstd)?;
                self.accumulate(x, dx)?;
                self.accumulate(gamma, dg)?;
            }
            Op::Rope { x, positions, table, heads } => {
                let dx = rope::rope_backward(gpu, &g, &positions, table, heads)?;
                self.accumulate(x, dx)?;
            }
            Op::Swiglu { x } => {
                let dx = elementwise::swiglu_backward(gpu, self.value(x), &g)?;
                self.accumulate(x, dx)?;
            }
            Op::LayerNorm { x, gamma, beta, mean, rstd, .. } => {
                let (dx, dg, db) = norm::layernorm_backward(gpu, &g, self.value(x), self.value(gamma), &mean, &rstd)?;
                self.accumulate(x, dx)?;
                self.accumulate(gamma, dg)?;
                self.accumulate(beta, db)?;
            }
            Op::Gelu { x } => {
                let dx = elementwise::gelu_backward(gpu, self.value(x), &g)?;
                self.accumulate(x, dx)?;
            }
            Op::Add { a, b } => {
                self.accumulate(a, g.clone())?;
                self.accumulate(b, g)?;
            }
            Op::Scale { x, alpha } => {
                let dx = elementwise::scale(gpu, &g, alpha)?;
                self.accumulate(x, dx)?;
            }
            Op::Embedding { tokens, positions, wte, wpe: Some(wpe) } => {
                embedding::embedding_backward_at(gpu, &tokens, positions.as_deref(), &g, &wte.grad, &wpe.grad)?;
            }
            Op::Embedding { tokens, wte, wpe: None, .. } => {
                embedding::token_embedding_backward(gpu, &tokens, &g, &wte.grad)?;
            }
            Op::CrossEntropy { logits, targets, lse } => {
                let d = loss::cross_entropy_backward(gpu, self.value(logits), &targets, &lse, &g)?;
                self.accumulate(logits, d)?;
            }
            Op::Classifier { x, w, targets, saved, chunk } => {
                let dx = classifier::loss_backward(gpu, self.value(x), &w.value, &targets, saved, &g, &w.grad, chunk)?;
                self.accumulate(x, dx)?;
            }
            Op::Reshape { x, from, .. } => self.accumulate(x, g.reshape(&from)?)?,
            Op::WeightedSum { x, weights } => {
                // d(Σ w·x)/dx = w·g, with g the one-element upstream gradient: an [n, 1]·[1, 1] product.
                let shape = self.value(x).shape().to_vec();
                let n = weights.numel();
                let dx = matmul(gpu, &weights.reshape(&[n, 1])?, &g.reshape(&[1, 1])?, None, MatmulSpec::nn())?;
                self.accumulate(x, dx.reshape(&shape)?)?;
            }
        }
        Ok(())
    }
}

/// Weights for a mean over the rows whose target is not ignored: 1/N_valid there, 0 on ignored rows.
pub fn mean_weights(targets: &[i32]) -> Vec<f32> {
    let valid = targets.iter().filter(|&&t| t != loss::IGNORE_INDEX).count().max(1);
    targets.iter().map(|&t| if t == loss::IGNORE_INDEX { 0.0 } else { 1.0 / valid as f32 }).collect()
}

#[cfg(test)]
#[path = "autograd_tests.rs"]
mod tests;
