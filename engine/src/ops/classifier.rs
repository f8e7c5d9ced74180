//! The output layer and its loss as one op: logits = x·Wᵀ over the vocabulary (W [V, C]: a tied token embedding or
//! an lm_head) followed by softmax cross-entropy, run over chunks of rows (Cut Cross-Entropy / Liger style). No
//! [N, V] logits or dlogits tensor ever exists: each chunk's logits live in a scratch of chunk × V, the forward
//! keeps only the per-row loss and logsumexp, and the backward recomputes each chunk's logits, turns them into
//! dlogits, and accumulates dx and dW chunk by chunk in a fixed order (matmuls with beta = 1: no float atomics, so
//! the result is deterministic). When W itself is larger than one storage binding (GPT-2's 154 MB embedding on a
//! 128 MiB software GPU) it is used in row parts, each part's logits being a column block of the chunk's.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::matmul::{matmul_into, MatmulSpec};
use crate::ops::{fits_u32, grid_1d, loss, nonempty, policy, WG_1D};
use crate::shaders::CLASSIFIER;
use crate::{DType, Error, Gpu, MemoryKind, Result, Tensor};

/// Most bytes one chunk buffer (the chunk's logits, and in backward their gradient) may hold.
pub const CHUNK_BYTES: u64 = 16 << 20;

/// Chunk logits a training forward keeps for its backward (instead of recomputing them). With the two chunk
/// buffers of the backward, the classifier's scratch stays within 64 MiB whatever B·T.
pub const KEEP_BYTES: u64 = 2 * CHUNK_BYTES;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    src_ld: u32,
    src_col: u32,
    dst_ld: u32,
    dst_col: u32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { rows, cols, src_ld, src_col, dst_ld, dst_col })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// Chunk sizes are multiples of this many rows, so every chunk's rows start at an aligned byte offset whatever the
/// row width (views must be bound at multiples of the adapter's offset alignment).
pub fn row_step(gpu: &Gpu) -> usize {
    (gpu.limits().min_storage_buffer_offset_alignment as usize / 4).max(1)
}

/// The default rows per chunk for a vocabulary of `v`: as many as fit [`CHUNK_BYTES`] (and one binding), a multiple
/// of [`row_step`], at least one step.
pub fn chunk_rows(gpu: &Gpu, v: usize) -> usize {
    let step = row_step(gpu);
    let bytes = CHUNK_BYTES.min(gpu.max_binding());
    let rows = (bytes / (v.max(1) as u64 * 4)) as usize;
    (rows / step * step).max(step)
}

/// (N, C, V) of x [N, C] and w [V, C], checked, with the row count of `targets` (I32, N ids in any shape).
fn dims(op: &'static str, x: &Tensor, w: &Tensor, targets: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    for (what, t) in [("x", x), ("w", w)] {
        nonempty(op, what, t)?;
        expect_dtype(op, what, t, DType::F32)?;
    }
    let (&[n, c], &[v, wc]) = (x.shape(), w.shape()) else {
        return Err(Error::Shape {
            op,
            what: "x and w",
            expected: "x [N, C] and w [V, C]".into(),
            got: format!("x {:?}, w {:?}", x.shape(), w.shape()),
        });
    };
    if wc != c {
        return Err(Error::Shape {
            op,
            what: "w",
            expected: format!("[V, {c}] (C of x)"),
            got: format!("{:?}", w.shape()),
        });
    }
    if let Some(t) = targets {
        expect_dtype(op, "targets", t, DType::I32)?;
        if t.numel() != n {
            return Err(Error::Shape {
                op,
                what: "targets",
                expected: format!("{n} ids (one per row of x)"),
                got: format!("{:?}", t.shape()),
            });
        }
    }
    fits_u32(op, "w", w.numel())?;
    Ok((n, c, v))
}

/// Row ranges of `n` rows in chunks of `chunk` (a positive multiple of [`row_step`]).
fn chunks(gpu: &Gpu, op: &'static str, n: usize, chunk: usize) -> Result<Vec<(usize, usize)>> {
    let step = row_step(gpu);
    if chunk == 0 || !chunk.is_multiple_of(step) {
        return Err(Error::Invalid {
            op,
            message: format!("chunk of {chunk} rows: must be a positive multiple of {step} (offset alignment)"),
        });
    }
    Ok((0..n).step_by(chunk).map(|r0| (r0, (r0 + chunk).min(n))).collect())
}

/// dst[:, dst_col..dst_col + cols] = src[:, src_col..src_col + cols] for matrices with the same row count.
fn copy_columns(gpu: &Gpu, src: &Tensor, src_col: usize, dst: &Tensor, dst_col: usize, cols: usize) -> Result<()> {
    let op = "copy_columns";
    let (&[rows, src_ld], &[dst_rows, dst_ld]) = (src.shape(), dst.shape()) else {
        return Err(Error::Invalid {
            op,
            message: format!("2-D operands, got {:?} and {:?}", src.shape(), dst.shape()),
        });
    };
    if rows != dst_rows || src_col + cols > src_ld || dst_col + cols > dst_ld {
        return Err(Error::Invalid {
            op,
            message: format!("{cols} columns from {src_col} of {:?} to {dst_col} of {:?}", src.shape(), dst.shape()),
        });
    }
    let params = Params {
        rows: rows as u32,
        cols: cols as u32,
        src_ld: src_ld as u32,
        src_col: src_col as u32,
        dst_ld: dst_ld as u32,
        dst_col: dst_col as u32,
    };
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader: &CLASSIFIER,
        entry: "copy_columns",
        overrides: &[],
        args: &[src, dst],
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(fits_u32(op, "block", rows * cols)? as usize, WG_1D),
    })
}

/// out [R, V] = x_c [R, C] · Wᵀ, W used in the row parts `parts`.
fn chunk_logits(gpu: &Gpu, x_c: &Tensor, w: &Tensor, parts: &[(usize, usize)], out: &Tensor) -> Result<()> {
    if parts.len() == 1 {
        // split_rows gives one range exactly when the whole of W fits one binding.
        return matmul_into(gpu, x_c, w, None, out, MatmulSpec::nt());
    }
    for &(v0, v1) in parts {
        let block = gpu.alloc_kind(&[x_c.shape()[0], v1 - v0], DType::F32, MemoryKind::Scratch)?;
        matmul_into(gpu, x_c, &w.rows(v0, v1)?, None, &block, MatmulSpec::nt())?;
        copy_columns(gpu, &block, 0, out, v0, v1 - v0)?;
    }
    Ok(())
}

/// Logits [N, V] = x [N, C] · Wᵀ in full (decoding and `inspect` want them; training never does). Works for any W
/// that fits in device memory: W in parts of one binding, the output filled in row blocks of one binding each.
pub fn logits(gpu: &Gpu, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let op = "classifier_logits";
    let (n, c, v) = dims(op, x, w, None)?;
    let parts = gpu.split_rows(op, v, c)?;
    let out = gpu.alloc(&[n, v], DType::F32)?;
    // Output blocks of whole rows within one binding, starting at aligned rows.
    let (step, fit) = (row_step(gpu), (gpu.max_binding() / (v as u64 * 4)) as usize);
    let block = if n <= fit { n } else { (fit / step * step).max(step) };
    for r0 in (0..n).step_by(block) {
        let r1 = (r0 + block).min(n);
        chunk_logits(gpu, &x.rows(r0, r1)?, w, &parts, &out.rows(r0, r1)?)?;
    }
    Ok(out)
}

/// What the forward keeps for the backward: each row's logsumexp, and the logits of the first chunks while they fit
/// the `keep_bytes` the caller allowed (the backward recomputes the others). With the whole batch in one chunk
/// within the budget nothing is recomputed, so small vocabularies cost what an unchunked classifier costs.
pub struct Saved {
    /// [N]
    pub lse: Tensor,
    kept: Vec<Tensor>,
}

impl Saved {
    /// Bytes of chunk logits held for the backward.
    pub fn kept_bytes(&self) -> u64 {
        self.kept.iter().map(Tensor::bytes).sum()
    }
}

/// Per-row cross-entropy of logits x·Wᵀ against `targets` (I32, N ids in any shape; [`loss::IGNORE_INDEX`] gives
/// exactly 0), computed `chunk` rows at a time (see [`chunk_rows`]), keeping up to `keep_bytes` of chunk logits
/// for the backward. Returns (losses shaped like targets, [`Saved`]); the losses and logsumexps are the values
/// [`loss::cross_entropy`] gives on the full logits.
pub fn loss(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
    keep_bytes: u64,
) -> Result<(Tensor, Saved)> {
    let (losses, saved, _) = forward(gpu, x, w, targets, chunk, keep_bytes, false)?;
    Ok((losses, saved))
}

/// [`loss`] and, from the same chunks, each row's softmax entropy (nats) shaped like targets: the RL metric,
/// without the full logits `policy::token_entropy` would need.
pub fn loss_entropy(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
    keep_bytes: u64,
) -> Result<(Tensor, Saved, Tensor)> {
    let (losses, saved, h) = forward(gpu, x, w, targets, chunk, keep_bytes, true)?;
    Ok((losses, saved, h.expect("asked for the entropy")))
}

fn forward(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
    keep_bytes: u64,
    entropy: bool,
) -> Result<(Tensor, Saved, Option<Tensor>)> {
    let op = "classifier_loss";
    let (n, c, v) = dims(op, x, w, Some(targets))?;
    let parts = gpu.split_rows(op, v, c)?;
    let flat = targets.reshape(&[n])?;
    let losses = gpu.alloc(&[n], DType::F32)?;
    let lse = gpu.alloc(&[n], DType::F32)?;
    let h = if entropy { Some(gpu.alloc(&[n], DType::F32)?) } else { None };
    let mut kept = Vec::new();
    let mut budget = keep_bytes;
    for (r0, r1) in chunks(gpu, op, n, chunk)? {
        let scratch = gpu.alloc_kind(&[r1 - r0, v], DType::F32, MemoryKind::Scratch)?;
        chunk_logits(gpu, &x.rows(r0, r1)?, w, &parts, &scratch)?;
        let (l, s) = loss::cross_entropy(gpu, &scratch, &flat.rows(r0, r1)?)?;
        gpu.copy_elements(&l, 0, &losses, r0, r1 - r0)?;
        gpu.copy_elements(&s, 0, &lse, r0, r1 - r0)?;
        if let Some(h) = &h {
            gpu.copy_elements(&policy::token_entropy(gpu, &scratch)?, 0, h, r0, r1 - r0)?;
        }
        // Only a prefix of chunks is kept, so the backward knows chunk k's logits are kept[k].
        if kept.len() * chunk == r0 && scratch.bytes() <= budget {
            budget -= scratch.bytes();
            kept.push(scratch);
        }
    }
    let h = h.map(|h| h.reshape(targets.shape())).transpose()?;
    Ok((losses.reshape(targets.shape())?, Saved { lse, kept }, h))
}

/// The backward of [`loss`]: given the upstream gradient of every row's loss `dloss` (N values in any shape: mean
/// weights, SFT masks, RL advantages), returns dx [N, C] as a NEW tensor and ACCUMULATES (+=) dW into `dw` [V, C].
/// `saved` is the forward's and `chunk` must be the forward's; the kept logits are used once and released.
#[allow(clippy::too_many_arguments)]
pub fn loss_backward(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    saved: Saved,
    dloss: &Tensor,
    dw: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let op = "classifier_loss_backward";
    let (n, c, v) = dims(op, x, w, Some(targets))?;
    expect_dtype(op, "dw", dw, DType::F32)?;
    expect_dtype(op, "dloss", dloss, DType::F32)?;
    let Saved { lse, kept } = saved;
    if dw.shape() != w.shape() || lse.numel() != n || dloss.numel() != n {
        return Err(Error::Shape {
            op,
            what: "dw, lse, dloss",
            expected: format!("dw {:?}, lse and dloss of {n} values", w.shape()),
            got: format!("dw {:?}, lse {:?}, dloss {:?}", dw.shape(), lse.shape(), dloss.shape()),
        });
    }
    let parts = gpu.split_rows(op, v, c)?;
    let (flat, lse, dloss) = (targets.reshape(&[n])?, lse.reshape(&[n])?, dloss.reshape(&[n])?);
    let dx = gpu.alloc(&[n, c], DType::F32)?;
    let acc = MatmulSpec { trans_a: true, beta: 1.0, ..MatmulSpec::nn() };
    let mut kept = kept.into_iter();
    for (r0, r1) in chunks(gpu, op, n, chunk)? {
        let (x_c, dx_c) = (x.rows(r0, r1)?, dx.rows(r0, r1)?);
        let scratch = match kept.next() {
            Some(t) if t.shape() == [r1 - r0, v] => t,
            Some(t) => {
                let message =
                    format!("kept logits {:?} for rows {r0}..{r1}: the chunk differs from the forward's", t.shape());
                return Err(Error::Invalid { op, message });
            }
            None => {
                let t = gpu.alloc_kind(&[r1 - r0, v], DType::F32, MemoryKind::Scratch)?;
                chunk_logits(gpu, &x_c, w, &parts, &t)?;
                t
            }
        };
        // The chunk's dlogits go to a scratch of their own (one buffer cannot be bound both read and read_write
        // in one dispatch).
        let dl = gpu.alloc_kind(&[r1 - r0, v], DType::F32, MemoryKind::Scratch)?;
        let (t_c, lse_c, d_c) = (flat.rows(r0, r1)?, lse.rows(r0, r1)?, dloss.rows(r0, r1)?);
        loss::cross_entropy_backward_into(gpu, &scratch, &t_c, &lse_c, &d_c, &dl)?;
        drop(scratch);
        if parts.len() == 1 {
            matmul_into(gpu, &dl, w, None, &dx_c, MatmulSpec::nn())?;
            matmul_into(gpu, &dl, &x_c, None, dw, acc)?;
            continue;
        }
        for (i, &(v0, v1)) in parts.iter().enumerate() {
            let block = gpu.alloc_kind(&[r1 - r0, v1 - v0], DType::F32, MemoryKind::Scratch)?;
            copy_columns(gpu, &dl, v0, &block, 0, v1 - v0)?;
            let beta = if i == 0 { 0.0 } else { 1.0 };
            matmul_into(gpu, &block, &w.rows(v0, v1)?, None, &dx_c, MatmulSpec { beta, ..MatmulSpec::nn() })?;
            matmul_into(gpu, &block, &x_c, None, &dw.rows(v0, v1)?, acc)?;
        }
    }
    Ok(dx)
}

pub mod cpu {
    use crate::ops::loss::cpu as loss;

    /// Logits [N, V] = x [N, C] · wᵀ (w [V, C]) in f64.
    pub fn logits(x: &[f64], w: &[f64], c: usize) -> Vec<f64> {
        let v = w.len() / c;
        x.chunks(c).flat_map(|row| (0..v).map(move |j| (0..c).map(|k| row[k] * w[j * c + k]).sum::<f64>())).collect()
    }

    /// (losses, logsumexp) of x·wᵀ against targets: the reference the chunked kernels must equal.
    pub fn loss(x: &[f64], w: &[f64], targets: &[i32], c: usize) -> (Vec<f64>, Vec<f64>) {
        loss::cross_entropy(&logits(x, w, c), targets, w.len() / c)
    }

    /// (dx, dw) of Σ dloss_i · loss_i.
    pub fn loss_backward(x: &[f64], w: &[f64], targets: &[i32], dloss: &[f64], c: usize) -> (Vec<f64>, Vec<f64>) {
        let v = w.len() / c;
        let z = logits(x, w, c);
        let (_, lse) = loss::cross_entropy(&z, targets, v);
        let dz = loss::cross_entropy_backward(&z, targets, &lse, dloss, v);
        let n = targets.len();
        let mut dx = vec![0.0; n * c];
        let mut dw = vec![0.0; v * c];
        for i in 0..n {
            for j in 0..v {
                let d = dz[i * v + j];
                for k in 0..c {
                    dx[i * c + k] += d * w[j * c + k];
                    dw[j * c + k] += d * x[i * c + k];
                }
            }
        }
        (dx, dw)
    }
}

#[cfg(test)]
#[path = "classifier_tests.rs"]
mod tests;
