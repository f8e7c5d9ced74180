//! Rotary position embeddings (RoPE) for Llama-family attention, applied to the query and key heads of a packed
//! qkv in Hugging Face's rotate-half convention, with positions read per row (packed sequences restart at 0), and
//! the backward (the inverse rotation). The cos/sin tables are computed once on the host in f64.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::attention::Heads;
use crate::ops::{fits_u32, grid_1d, nonempty, WG_1D};
use crate::shaders::ROPE;
use crate::{DType, Error, Gpu, Result, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    w: u32,
    hs: u32,
    rotated: u32,
    max_pos: u32,
    sign: f32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { n, w, hs, rotated, max_pos, sign })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// cos and sin of p·θ^(-2k/HS) for positions p < max_pos and k < HS/2, as [max_pos, HS/2] f32 tensors.
pub struct RopeTable {
    pub cos: Tensor,
    pub sin: Tensor,
    pub head_size: usize,
    pub max_pos: usize,
    pub theta: f64,
}

impl RopeTable {
    /// Errors unless head_size is even and at least 2, max_pos at least 1, and theta finite and > 1 (θ = 1 would
    /// turn every pair by the same angle: no position information).
    pub fn new(gpu: &Gpu, head_size: usize, max_pos: usize, theta: f64) -> Result<RopeTable> {
        const OP: &str = "RopeTable::new";
        if head_size < 2 || !head_size.is_multiple_of(2) {
            let message = format!("rotary embeddings need an even head size of at least 2, got {head_size}");
            return Err(Error::Invalid { op: OP, message });
        }
        if max_pos == 0 {
            return Err(Error::Empty { op: OP, what: "table", shape: vec![0, head_size / 2] });
        }
        if !(theta.is_finite() && theta > 1.0) {
            return Err(Error::Invalid { op: OP, message: format!("rope_theta must be finite and > 1, got {theta}") });
        }
        let (cos, sin) = cpu::tables(head_size, max_pos, theta);
        let shape = [max_pos, head_size / 2];
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        Ok(RopeTable {
            cos: gpu.upload(&to_f32(cos), &shape)?,
            sin: gpu.upload(&to_f32(sin), &shape)?,
            head_size,
            max_pos,
            theta,
        })
    }
}

/// Rotates the query and key heads of `qkv` ([..., W] f32, W = (NH + 2·NKV)·HS for the table's head size) by the
/// angles of `positions` (I32, one per row of qkv: [B, T] for [B, T, W]); value heads are copied. Returns a NEW
/// tensor shaped like qkv. A position outside [0, max_pos) makes its row's rotated elements NaN.
pub fn rope(gpu: &Gpu, qkv: &Tensor, positions: &Tensor, table: &RopeTable, heads: impl Into<Heads>) -> Result<Tensor> {
    launch(gpu, "rope", qkv, positions, table, heads.into(), 1.0)
}

/// Gradient of [`rope`]: dqkv from the upstream `dy` (shaped like qkv), the same positions and table: the inverse
/// rotation of the query and key parts, dy's value part unchanged. NEW tensor.
pub fn rope_backward(
    gpu: &Gpu,
    dy: &Tensor,
    positions: &Tensor,
    table: &RopeTable,
    heads: impl Into<Heads>,
) -> Result<Tensor> {
    launch(gpu, "rope_backward", dy, positions, table, heads.into(), -1.0)
}

fn launch(
    gpu: &Gpu,
    op: &'static str,
    x: &Tensor,
    positions: &Tensor,
    table: &RopeTable,
    heads: Heads,
    sign: f32,
) -> Result<Tensor> {
    nonempty(op, "qkv", x)?;
    expect_dtype(op, "qkv", x, DType::F32)?;
    expect_dtype(op, "positions", positions, DType::I32)?;
    heads.check(op)?;
    let hs = table.head_size;
    let w = heads.qkv_width(hs);
    if x.shape().last() != Some(&w) {
        return Err(Error::Shape {
            op,
            what: "qkv",
            expected: format!(
                "[..., {w}] ((n_head {} + 2 · n_kv_head {}) · head_size {hs})",
                heads.n_head, heads.n_kv_head
            ),
            got: format!("{:?}", x.shape()),
        });
    }
    let rows = x.numel() / w;
    if positions.numel() != rows {
        return Err(Error::Shape {
            op,
            what: "positions",
            expected: format!("{rows} position ids (one per row of qkv {:?})", x.shape()),
            got: format!("{:?}", positions.shape()),
        });
    }
    for (what, t) in [("table.cos", &table.cos), ("table.sin", &table.sin)] {
        expect_dtype(op, what, t, DType::F32)?;
        crate::ops::shape_is(op, what, t, &[table.max_pos, hs / 2])?;
    }
    let n = fits_u32(op, "qkv", x.numel())?;
    let params = Params {
        n,
        w: w as u32,
        hs: hs as u32,
        rotated: ((heads.n_head + heads.n_kv_head) * hs) as u32,
        max_pos: fits_u32(op, "table", table.max_pos)?,
        sign,
    };
    let out = gpu.alloc(x.shape(), DType::F32)?;
    gpu.dispatch(&Launch {
        op,
        flops: 0,
        shader: &ROPE,
        entry: "rope",
        overrides: &[],
        args: &[x, positions, &table.cos, &table.sin, &out],
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(x.numel(), WG_1D),
    })?;
    Ok(out)
}

pub mod cpu {
    use super::Heads;

    /// (cos, sin) of p·θ^(-2k/HS), [max_pos, HS/2] row-major.
    pub fn tables(head_size: usize, max_pos: usize, theta: f64) -> (Vec<f64>, Vec<f64>) {
        let half = head_size / 2;
        let angle = |i: usize| (i / half) as f64 * theta.powf(-2.0 * (i % half) as f64 / head_size as f64);
        ((0..max_pos * half).map(|i| angle(i).cos()).collect(), (0..max_pos * half).map(|i| angle(i).sin()).collect())
    }

    /// Hugging Face's formula, written as it is there: per query/key head, x·cos + rotate_half(x)·sin with
    /// cos = cat(cos(f), cos(f)), sin likewise, f_k = p·θ^(-2k/HS), rotate_half(x) = cat(−x[HS/2..], x[..HS/2]).
    /// `sign` = −1 turns by the opposite angle (the backward). x is rows of W = (NH + 2·NKV)·HS.
    pub fn rope(x: &[f64], positions: &[i32], head_size: usize, heads: Heads, theta: f64, sign: f64) -> Vec<f64> {
        let (hs, half) = (head_size, head_size / 2);
        let w = heads.qkv_width(hs);
        let mut out = x.to_vec();
        for (r, row) in x.chunks(w).enumerate() {
            let p = positions[r] as f64;
            let freq = |d: usize| p * theta.powf(-2.0 * (d % half) as f64 / hs as f64);
            for h in 0..heads.n_head + heads.n_kv_head {
                let v = &row[h * hs..(h + 1) * hs];
                let rotated: Vec<f64> = (0..hs).map(|d| if d < half { -v[d + half] } else { v[d - half] }).collect();
                for d in 0..hs {
                    out[r * w + h * hs + d] = v[d] * freq(d).cos() + rotated[d] * sign * freq(d).sin();
                }
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "rope_tests.rs"]
mod tests;
