//! Fused softmax cross-entropy over the vocabulary: the forward gives the per-row loss and the per-row logsumexp,
//! which the backward reuses to form the probabilities without a second reduction; neither kernel materializes
//! the softmax.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::norm::RowReduction;
use crate::ops::norm::{row_grid, rows_cols};
use crate::ops::{nonempty, shape_is};
use crate::shaders::{LOSS, LOSS_SUBGROUP};
use crate::{DType, Error, Gpu, Result, Tensor};

/// Targets equal to this contribute exactly 0 loss (padding, masked positions), as PyTorch's `ignore_index`.
pub const IGNORE_INDEX: i32 = -1;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    v: u32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { rows, v })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// (rows, V) of F32 `logits` [N, V] (any leading dims) with I32 `targets` shaped like its leading dims.
fn check_logits_targets(op: &'static str, logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    let (rows, v) = rows_cols(op, "logits", logits)?;
    let rank = logits.shape().len();
    if rank < 2 {
        return Err(Error::Shape {
            op,
            what: "logits",
            expected: "[N, V] or [B, T, V]".into(),
            got: format!("{:?}", logits.shape()),
        });
    }
    nonempty(op, "targets", targets)?;
    expect_dtype(op, "targets", targets, DType::I32)?;
    shape_is(op, "targets", targets, &logits.shape()[..rank - 1])?;
    Ok((rows, v))
}

/// Cross-entropy of `logits` [N, V] (or [B, T, V]: any leading dims) against I32 `targets` shaped like the
/// leading dims. Returns (losses shaped like `targets`, logsumexp [N]); per row, loss = logsumexp(row) -
/// row[target]. A target of [`IGNORE_INDEX`] gives exactly 0. Any other target outside [0, V) makes that row's loss
/// NaN: ids live on the GPU and checking them on the host would cost a readback every step, so the NaN detection
/// downstream reports the step instead.
pub fn cross_entropy(gpu: &Gpu, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "cross_entropy";
    let (rows, v) = check_logits_targets(op, logits, targets)?;
    let losses = gpu.alloc(targets.shape(), DType::F32)?;
    let lse = gpu.alloc(&[rows], DType::F32)?;
    let params = Params { rows: rows as u32, v: v as u32 };
    let (shader, overrides) = RowReduction::module(gpu, &LOSS, &LOSS_SUBGROUP);
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: "cross_entropy",
        overrides,
        args: &[logits, targets, &losses, &lse],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok((losses, lse))
}

/// Gradient of the per-row losses of [`cross_entropy`] with respect to `logits`: a NEW tensor shaped like `logits`,
/// dlogits[row] = dloss[row] · (softmax(logits[row]) − onehot(target[row])), the softmax formed from the forward's
/// `lse` [N] without a second reduction. `dloss` is the upstream gradient of each row's loss, shaped [N] or like
/// `targets`: 1/N_valid for a mean loss, any signed weights for advantage-weighted RL losses. Rows whose target is
/// [`IGNORE_INDEX`] get exactly 0.0 in every column whatever their dloss; any other target outside [0, V) makes its
/// row NaN, as the forward's loss (ids live on the GPU).
pub fn cross_entropy_backward(
    gpu: &Gpu,
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    dloss: &Tensor,
) -> Result<Tensor> {
    check_logits_targets("cross_entropy_backward", logits, targets)?;
    let dlogits = gpu.alloc(logits.shape(), DType::F32)?;
    cross_entropy_backward_into(gpu, logits, targets, lse, dloss, &dlogits)?;
    Ok(dlogits)
}

/// [`cross_entropy_backward`] into a given `dlogits` shaped like `logits` (the chunked classifier's scratch).
pub fn cross_entropy_backward_into(
    gpu: &Gpu,
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    dloss: &Tensor,
    dlogits: &Tensor,
) -> Result<()> {
    let op = "cross_entropy_backward";
    let (rows, v) = check_logits_targets(op, logits, targets)?;
    expect_dtype(op, "lse", lse, DType::F32)?;
    shape_is(op, "lse", lse, &[rows])?;
    expect_dtype(op, "dloss", dloss, DType::F32)?;
    if dloss.shape() != [rows] && dloss.shape() != targets.shape() {
        return Err(Error::Shape {
            op,
            what: "dloss",
            expected: format!("[{rows}] or {:?} (the shape of targets)", targets.shape()),
            got: format!("{:?}", dloss.shape()),
        });
    }
    shape_is(op, "dlogits", dlogits, logits.shape())?;
    let params = Params { rows: rows as u32, v: v as u32 };
    let (shader, overrides) = RowReduction::module(gpu, &LOSS, &LOSS_SUBGROUP);
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: "cross_entropy_backward",
        overrides,
        args: &[logits, targets, lse, dloss, dlogits],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })
}

pub mod cpu {
    use super::IGNORE_INDEX;

    /// (losses, logsumexp) of rows of length `v`; the same ignore and out-of-range rules as the kernel.
    pub fn cross_entropy(logits: &[f64], targets: &[i32], v: usize) -> (Vec<f64>, Vec<f64>) {
        let mut losses = Vec::with_capacity(targets.len());
        let mut lses = Vec::with_capacity(targets.len());
        for (row, &t) in logits.chunks(v).zip(targets) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let loss = match t {
                IGNORE_INDEX => 0.0,
                t if t < 0 || t as usize >= v => f64::NAN,
                t => lse - row[t as usize],
            };
            losses.push(loss);
            lses.push(lse);
        }
        (losses, lses)
    }

    /// dlogits of rows of length `v` given the forward's `lse` and the per-row upstream `dloss`; ignored rows are
    /// exactly 0, other out-of-range targets NaN, as the kernel.
    pub fn cross_entropy_backward(logits: &[f64], targets: &[i32], lse: &[f64], dloss: &[f64], v: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(logits.len());
        for (((row, &t), &l), &d) in logits.chunks(v).zip(targets).zip(lse).zip(dloss) {
            match t {
                IGNORE_INDEX => out.extend(std::iter::repeat_n(0.0, v)),
                t if t < 0 || t as usize >= v => out.extend(std::iter::repeat_n(f64::NAN, v)),
                t => out.extend(row.iter().enumerate().map(|(j, x)| {
                    let onehot = if j == t as usize { 1.0 } else { 0.0 };
                    d * ((x - l).exp() - onehot)
                })),
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "loss_tests.rs"]
mod tests;
