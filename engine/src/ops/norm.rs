//! Row kernels over the last dimension: LayerNorm (forward, returning the per-row mean and rstd its backward pass
//! reuses), RMSNorm (Llama's, returning rstd) and softmax, each with its backward. Leading dimensions are flattened
//! into rows.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::reduce::sum_rows;
use crate::ops::{fits_u32, grid_1d, nonempty, same_shape, shape_is};
use crate::shaders::{ShaderSource, NORM, NORM_SUBGROUP};
use crate::{DType, Error, Gpu, Result, Tensor};
use std::cell::Cell;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    c: u32,
    eps: f32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { rows, c, eps })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// (rows, last dim) of an F32 tensor seen as [N, C] with its leading dims flattened. Shared by the row kernels.
pub(crate) fn rows_cols(op: &'static str, what: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    nonempty(op, what, t)?;
    expect_dtype(op, what, t, DType::F32)?;
    let Some(&c) = t.shape().last() else {
        // Only a reshape to [] makes a rank-0 tensor; a row kernel needs a last dimension.
        return Err(Error::Shape { op, what, expected: "at least one dimension".into(), got: "[]".into() });
    };
    fits_u32(op, what, t.numel())?;
    Ok((t.numel() / c, c))
}

/// How a row kernel's workgroup combines its partial results: rows.wgsl's tree in workgroup memory (256 threads,
/// any adapter), or rows_subgroup.wgsl's subgroup operations (one subgroup per row, no barrier: adapters whose
/// subgroups have one fixed size, which the workgroup must equal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowReduction {
    Tree,
    Subgroup,
}

thread_local! {
    static FORCED_ROWS: Cell<Option<RowReduction>> = const { Cell::new(None) };
}

/// The subgroup sizes the subgroup modules are built for, with their override sets (WG = the subgroup size).
pub(crate) const SUBGROUP_WG: [(u32, [(&str, f64); 1]); 6] = [
    (4, [("WG", 4.0)]),
    (8, [("WG", 8.0)]),
    (16, [("WG", 16.0)]),
    (32, [("WG", 32.0)]),
    (64, [("WG", 64.0)]),
    (128, [("WG", 128.0)]),
];

impl RowReduction {
    pub const ALL: [RowReduction; 2] = [RowReduction::Tree, RowReduction::Subgroup];

    /// The override set of the subgroup module on this adapter, if it can run it.
    fn subgroup_overrides(gpu: &Gpu) -> Option<&'static [(&'static str, f64)]> {
        let (min, max) = (gpu.info().subgroup_min_size, gpu.info().subgroup_max_size);
        if !gpu.has_subgroups() || min != max {
            return None;
        }
        SUBGROUP_WG.iter().find(|(n, _)| *n == min).map(|(_, set)| &set[..])
    }

    pub fn available(self, gpu: &Gpu) -> bool {
        self == RowReduction::Tree || Self::subgroup_overrides(gpu).is_some()
    }

    /// Subgroup where the adapter can run it, unless [`RowReduction::with`] forces another on this thread.
    pub fn chosen(gpu: &Gpu) -> RowReduction {
        match FORCED_ROWS.get() {
            Some(r) if r.available(gpu) => r,
            Some(_) => RowReduction::Tree,
            None if RowReduction::Subgroup.available(gpu) => RowReduction::Subgroup,
            None => RowReduction::Tree,
        }
    }

    /// Runs `f` with this reduction forced on the current thread (tests compare both in one process).
    pub fn with<R>(self, f: impl FnOnce() -> R) -> R {
        super::forced::with(&FORCED_ROWS, self, f)
    }

    /// Threads per workgroup of the module [`RowReduction::module`] picks (its WG).
    pub(crate) fn threads(module_overrides: &[(&'static str, f64)]) -> u32 {
        module_overrides.iter().find(|(n, _)| *n == "WG").map_or(256, |(_, v)| *v as u32)
    }

    /// (module, override constants) for a row kernel family given its tree and subgroup modules.
    pub(crate) fn module(
        gpu: &Gpu,
        tree: &'static ShaderSource,
        subgroup: &'static ShaderSource,
    ) -> (&'static ShaderSource, &'static [(&'static str, f64)]) {
        match (Self::chosen(gpu), Self::subgroup_overrides(gpu)) {
            (RowReduction::Subgroup, Some(set)) => (subgroup, set),
            _ => (tree, &[]),
        }
    }
}

/// One workgroup per row; `grid_1d` folds the row count over x/y beyond 65535 rows.
pub(crate) fn row_grid(rows: usize) -> [u32; 3] {
    grid_1d(rows, 1)
}

/// LayerNorm over the last dim of `x` ([N, C], or any leading dims), with `gamma`/`beta` of shape [C]. Returns
/// (y shaped like x, mean [N], rstd [N]) where rstd = 1/sqrt(var + eps) with the biased variance, as PyTorch and
/// GPT-2 (which uses eps = 1e-5).
pub fn layernorm(gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "layernorm";
    let (rows, c) = rows_cols(op, "x", x)?;
    for (what, t) in [("gamma", gamma), ("beta", beta)] {
        expect_dtype(op, what, t, DType::F32)?;
        shape_is(op, what, t, &[c])?;
    }
    check_eps(op, eps)?;
    let y = gpu.alloc(x.shape(), DType::F32)?;
    let mean = gpu.alloc(&[rows], DType::F32)?;
    let rstd = gpu.alloc(&[rows], DType::F32)?;
    let params = Params { rows: rows as u32, c: c as u32, eps };
    let (shader, overrides) = RowReduction::module(gpu, &NORM, &NORM_SUBGROUP);
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: "layernorm",
        overrides,
        args: &[x, gamma, beta, &y, &mean, &rstd],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok((y, mean, rstd))
}

fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Invalid { op, message: format!("eps must be finite and >= 0, got {eps}") });
    }
    Ok(())
}

/// RMSNorm over the last dim of `x` ([N, C], or any leading dims) with `gamma` [C]: y = x · rstd · gamma where
/// rstd = 1/sqrt(mean(x²) + eps), as Hugging Face's LlamaRMSNorm. Returns (y shaped like x, rstd [N]).
pub fn rmsnorm(gpu: &Gpu, x: &Tensor, gamma: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let op = "rmsnorm";
    let (rows, c) = rows_cols(op, "x", x)?;
    expect_dtype(op, "gamma", gamma, DType::F32)?;
    shape_is(op, "gamma", gamma, &[c])?;
    check_eps(op, eps)?;
    let y = gpu.alloc(x.shape(), DType::F32)?;
    let rstd = gpu.alloc(&[rows], DType::F32)?;
    let params = Params { rows: rows as u32, c: c as u32, eps };
    let (shader, overrides) = RowReduction::module(gpu, &NORM, &NORM_SUBGROUP);
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: "rmsnorm",
        overrides,
        args: &[x, gamma, &y, &rstd],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok((y, rstd))
}

/// Gradients of [`rmsnorm`]: NEW (dx shaped like x, dgamma [C]) from the upstream `dy`, the forward input `x`,
/// `gamma` and the forward's `rstd` [N]. dgamma is a fixed-tree column sum ([`sum_rows`]): bit-reproducible.
pub fn rmsnorm_backward(gpu: &Gpu, dy: &Tensor, x: &Tensor, gamma: &Tensor, rstd: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "rmsnorm_backward";
    let (rows, c) = rows_cols(op, "dy", dy)?;
    expect_dtype(op, "x", x, DType::F32)?;
    same_shape(op, "x", dy, x)?;
    expect_dtype(op, "gamma", gamma, DType::F32)?;
    shape_is(op, "gamma", gamma, &[c])?;
    expect_dtype(op, "rstd", rstd, DType::F32)?;
    shape_is(op, "rstd", rstd, &[rows])?;
    let dx = gpu.alloc(x.shape(), DType::F32)?;
    let dgx = gpu.alloc(&[rows, c], DType::F32)?;
    let params = Params { rows: rows as u32, c: c as u32, eps: 0.0 };
    let (shader, overrides) = RowReduction::module(gpu, &NORM, &NORM_SUBGROUP);
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: "rmsnorm_backward",
        overrides,
        args: &[x, gamma, dy, rstd, &dx, &dgx],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok((dx, sum_rows(gpu, &dgx)?))
}

/// Numerically stable softmax over the last dim (the row max is subtracted before exponentiating).
pub fn softmax(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let op = "softmax";
    let (rows, c) = rows_cols(op, "x", x)?;
    let out = gpu.alloc(x.shape(), DType::F32)?;
    let params = Params { rows: rows as u32, c: c as u32, eps: 0.0 };
    let (shader, overrides) = RowReduction::module(gpu, &NORM, &NORM_SUBGROUP);
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: "softmax",
        overrides,
        args: &[x, &out],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok(out)
}

/// Gradients of [`layernorm`]: returns NEW (dx shaped like x, dgamma [C], dbeta [C]) from the upstream `dy`, the
/// forward input `x`, `gamma` and the forward's saved `mean`/`rstd` [N]. dgamma and dbeta are column sums over all
/// rows through [`sum_rows`]: a fixed reduction tree, so they are bit-reproducible (no atomics).
pub fn layernorm_backward(
    gpu: &Gpu,
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "layernorm_backward";
    let (rows, c) = rows_cols(op, "dy", dy)?;
    expect_dtype(op, "x", x, DType::F32)?;
    same_shape(op, "x", dy, x)?;
    expect_dtype(op, "gamma", gamma, DType::F32)?;
    shape_is(op, "gamma", gamma, &[c])?;
    for (what, t) in [("mean", mean), ("rstd", rstd)] {
        expect_dtype(op, what, t, DType::F32)?;
        shape_is(op, what, t, &[rows])?;
    }
    let dx = gpu.alloc(x.shape(), DType::F32)?;
    // dy * xhat per element; its column sums are dgamma. A [N, C] temporary keeps the column reduction in the
    // deterministic `sum_rows` instead of a second hand-written tree.
    let dgx = gpu.alloc(&[rows, c], DType::F32)?;
    let params = Params { rows: rows as u32, c: c as u32, eps: 0.0 };
    let (shader, overrides) = RowReduction::module(gpu, &NORM, &NORM_SUBGROUP);
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: "layernorm_backward",
        overrides,
        args: &[x, gamma, dy, mean, rstd, &dx, &dgx],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    let dgamma = sum_rows(gpu, &dgx)?;
    let dbeta = sum_rows(gpu, &dy.reshape(&[rows, c])?)?;
    Ok((dx, dgamma, dbeta))
}

/// Gradient of [`softmax`] from its output `y` and the upstream `dy`: dx = y ⊙ (dy − rowsum(dy ⊙ y)), NEW.
pub fn softmax_backward(gpu: &Gpu, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let op = "softmax_backward";
    let (rows, c) = rows_cols(op, "y", y)?;
    expect_dtype(op, "dy", dy, DType::F32)?;
    same_shape(op, "dy", y, dy)?;
    let dx = gpu.alloc(y.shape(), DType::F32)?;
    let params = Params { rows: rows as u32, c: c as u32, eps: 0.0 };
    let (shader, overrides) = RowReduction::module(gpu, &NORM, &NORM_SUBGROUP);
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader,
        entry: "softmax_backward",
        overrides,
        args: &[y, dy, &dx],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok(dx)
}

pub mod cpu {
    /// LayerNorm of rows of length `gamma.len()`: (y, mean, rstd), biased variance.
    pub fn layernorm(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let c = gamma.len();
        let (mut y, mut means, mut rstds) = (Vec::with_capacity(x.len()), Vec::new(), Vec::new());
        for row in x.chunks(c) {
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            y.extend(row.iter().zip(gamma).zip(beta).map(|((v, g), b)| (v - mean) * rstd * g + b));
            means.push(mean);
            rstds.push(rstd);
        }
        (y, means, rstds)
    }

    /// RMSNorm of rows of length `gamma.len()`: (y, rstd).
    pub fn rmsnorm(x: &[f64], gamma: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
        let c = gamma.len();
        let (mut y, mut rstds) = (Vec::with_capacity(x.len()), Vec::new());
        for row in x.chunks(c) {
            let rstd = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / c as f64 + eps).sqrt();
            y.extend(row.iter().zip(gamma).map(|(v, g)| v * rstd * g));
            rstds.push(rstd);
        }
        (y, rstds)
    }

    /// Gradients of [`rmsnorm`] given the forward's `rstd`: (dx, dgamma).
    pub fn rmsnorm_backward(dy: &[f64], x: &[f64], gamma: &[f64], rstd: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let c = gamma.len();
        let (mut dx, mut dgamma) = (Vec::with_capacity(x.len()), vec![0.0; c]);
        for ((dyr, xr), &r) in dy.chunks(c).zip(x.chunks(c)).zip(rstd) {
            let xhat: Vec<f64> = xr.iter().map(|v| v * r).collect();
            let dxhat: Vec<f64> = dyr.iter().zip(gamma).map(|(d, g)| d * g).collect();
            let m = dxhat.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / c as f64;
            dx.extend(dxhat.iter().zip(&xhat).map(|(d, h)| r * (d - h * m)));
            for j in 0..c {
                dgamma[j] += dyr[j] * xhat[j];
            }
        }
        (dx, dgamma)
    }

    /// Softmax of each row of length `c`.
    pub fn softmax(x: &[f64], c: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(c) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
            out.extend(row.iter().map(|v| (v - m).exp() / s));
        }
        out
    }

    /// Gradients of [`layernorm`] given the forward's `mean`/`rstd`: (dx, dgamma, dbeta).
    pub fn layernorm_backward(
        dy: &[f64],
        x: &[f64],
        gamma: &[f64],
        mean: &[f64],
        rstd: &[f64],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let c = gamma.len();
        let (mut dx, mut dgamma, mut dbeta) = (Vec::with_capacity(x.len()), vec![0.0; c], vec![0.0; c]);
        for (((dyr, xr), &m), &r) in dy.chunks(c).zip(x.chunks(c)).zip(mean).zip(rstd) {
            let xhat: Vec<f64> = xr.iter().map(|v| (v - m) * r).collect();
            let dxhat: Vec<f64> = dyr.iter().zip(gamma).map(|(d, g)| d * g).collect();
            let m1 = dxhat.iter().sum::<f64>() / c as f64;
            let m2 = dxhat.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / c as f64;
            dx.extend(dxhat.iter().zip(&xhat).map(|(d, h)| r * (d - m1 - h * m2)));
            for j in 0..c {
                dgamma[j] += dyr[j] * xhat[j];
                dbeta[j] += dyr[j];
            }
        }
        (dx, dgamma, dbeta)
    }

    /// Gradient of [`softmax`] from its output `y` (rows of length `c`) and the upstream `dy`.
    pub fn softmax_backward(y: &[f64], dy: &[f64], c: usize) -> Vec<f64> {
        let mut dx = Vec::with_capacity(y.len());
        for (yr, dyr) in y.chunks(c).zip(dy.chunks(c)) {
            let s: f64 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
            dx.extend(yr.iter().zip(dyr).map(|(a, b)| a * (b - s)));
        }
        dx
    }
}

#[cfg(test)]
#[path = "norm_tests.rs"]
pub(crate) mod tests;
