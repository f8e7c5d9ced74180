//! Causal multi-head self-attention, flash style: kernels that read q, k, v straight from the packed qkv
//! projection and never materialize the T×T score matrix, forward and backward, plus their plain f64 references.
//! Grouped-query attention (fewer key/value heads than query heads, as Llama-family models) reads each shared
//! key/value head in place. Optionally block-diagonal ("packed sequences"): each query sees only the keys of its
//! own segment of the row.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::{fits_u32, grid_1d, nonempty, shape_is, WG_1D};
use crate::shaders::{ShaderSource, ATTENTION, ATTENTION_REGISTER};
use crate::{DType, Error, Gpu, Result, Tensor};
use std::cell::Cell;
use std::sync::OnceLock;

/// Largest head size the kernels hold in their private arrays (`4 * MAX_HS4` in the WGSL).
pub const MAX_HEAD_SIZE: usize = 128;
/// Query rows per workgroup of the forward and dQ kernels (the `BR` override).
pub(crate) const BR: u32 = 64;
/// Key rows per workgroup of the dK/dV kernel (the `BKV` override).
pub(crate) const BKV: u32 = 64;
/// vec4s per K (and per V) tile in workgroup memory, and the most keys per block (`TILE4`, `MAX_BC` in the WGSL).
const TILE4: usize = 512;
const MAX_BC: usize = 64;
/// vec4s per Q (and per dO) tile of the dK/dV kernel, and the most queries per block (`TILE4_BW`, `MAX_BQ`).
const TILE4_BW: usize = 496;
const MAX_BQ: usize = 64;
/// Most queries per block of the dK/dV kernel with segments: their starts share the lse tile (`SEG_AT`).
const MAX_BQ_SEGMENTED: usize = 32;

/// The two kernel designs: `shaders/attention.wgsl` (K/V or Q/dO blocks staged in workgroup memory and shared by
/// a workgroup of 64 rows: what GPUs want) and `attention_register.wgsl` (8-lane subgroups trading rows by
/// `subgroupBroadcast`, no workgroup memory: what a software GPU wants, measured in benches/RESULTS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionDesign {
    Tiled,
    Register,
}

thread_local! {
    static FORCED: Cell<Option<AttentionDesign>> = const { Cell::new(None) };
}

impl AttentionDesign {
    pub const ALL: [AttentionDesign; 2] = [AttentionDesign::Tiled, AttentionDesign::Register];

    /// Whether this adapter can run the design at this head size: the register design needs subgroups of at least
    /// 8 lanes (its workgroup is one) and reads heads as vec4s.
    pub fn available(self, gpu: &Gpu, head_size: usize) -> bool {
        match self {
            AttentionDesign::Tiled => true,
            AttentionDesign::Register => {
                gpu.has_subgroups() && gpu.info().subgroup_min_size >= 8 && head_size.is_multiple_of(4)
            }
        }
    }

    /// The design the launchers use: the one forced on this thread ([`AttentionDesign::with`]), else
    /// `KILN_ATTENTION=tiled|register`, else register on software adapters that can run it and tiled elsewhere.
    /// A forced or requested design this adapter cannot run falls back to tiled.
    pub fn chosen(gpu: &Gpu, head_size: usize) -> AttentionDesign {
        static ENV: OnceLock<Option<AttentionDesign>> = OnceLock::new();
        let env = *ENV.get_or_init(|| match std::env::var("KILN_ATTENTION").as_deref() {
            Ok("tiled") => Some(AttentionDesign::Tiled),
            Ok("register") => Some(AttentionDesign::Register),
            _ => None,
        });
        let wanted = FORCED.get().or(env).unwrap_or(if gpu.is_software() {
            AttentionDesign::Register
        } else {
            AttentionDesign::Tiled
        });
        if wanted.available(gpu, head_size) {
            wanted
        } else {
            AttentionDesign::Tiled
        }
    }

    /// Runs `f` with this design forced on the current thread (tests and benches compare the two in one process).
    pub fn with<R>(self, f: impl FnOnce() -> R) -> R {
        super::forced::with(&FORCED, self, f)
    }

    /// (shader, forward, dQ, dK/dV entry points, rows per workgroup of the forward/dQ and the dK/dV kernels).
    fn kernels(self) -> (&'static ShaderSource, [&'static str; 3], u32, u32) {
        match self {
            AttentionDesign::Tiled => {
                (&ATTENTION, ["attention_forward", "attention_backward_dq", "attention_backward_dkv"], BR, BKV)
            }
            AttentionDesign::Register => (
                &ATTENTION_REGISTER,
                ["attention_forward_register", "attention_backward_dq_register", "attention_backward_dkv_register"],
                REGISTER_ROWS,
                REGISTER_ROWS,
            ),
        }
    }
}

/// Rows per workgroup of the register design: one 8-lane subgroup.
const REGISTER_ROWS: u32 = 8;

/// Query heads and key/value heads. Query head h reads key/value head h / (n_head / n_kv_head), Hugging Face's
/// `repeat_kv` order; n_kv_head = n_head is plain multi-head attention. A bare `usize` converts to that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
}

impl Heads {
    pub fn new(n_head: usize, n_kv_head: usize) -> Heads {
        Heads { n_head, n_kv_head }
    }

    /// Width of a packed qkv row: n_head query heads, then n_kv_head key heads, then n_kv_head value heads.
    pub fn qkv_width(&self, head_size: usize) -> usize {
        (self.n_head + 2 * self.n_kv_head) * head_size
    }

    /// Invalid unless both counts are at least 1 and n_kv_head divides n_head.
    pub(crate) fn check(&self, op: &'static str) -> Result<()> {
        let Heads { n_head, n_kv_head } = *self;
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            let message = format!(
                "n_head = {n_head} and n_kv_head = {n_kv_head} must be at least 1, with n_kv_head dividing n_head"
            );
            return Err(Error::Invalid { op, message });
        }
        Ok(())
    }
}

impl From<usize> for Heads {
    fn from(n_head: usize) -> Heads {
        Heads { n_head, n_kv_head: n_head }
    }
}

impl From<(usize, usize)> for Heads {
    fn from((n_head, n_kv_head): (usize, usize)) -> Heads {
        Heads { n_head, n_kv_head }
    }
}

/// The immediates of every entry point (one `Params` in the WGSL).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    b: u32,
    t: u32,
    c: u32,
    nh: u32,
    hs: u32,
    bc: u32,
    scale: f32,
    nkv: u32,
    w: u32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { b, t, c, nh, hs, bc, scale, nkv, w })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// Sizes of a validated qkv: c = nh·hs is the width of y, w = (nh + 2·nkv)·hs that of qkv.
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
    w: usize,
}

impl Dims {
    /// FLOPs of one T×T×HS product per head over the causal triangle (Q·Kᵀ, P·V and the backward's products
    /// each cost this): forward is 2 of them, dQ recomputes S and does dP and dQ (3), dK/dV recomputes S and does
    /// dV, dP and dK (4).
    fn causal_product_flops(&self) -> u64 {
        (self.b * self.nh * self.t * (self.t + 1) * self.hs) as u64
    }

    /// The head loops' trip count in vec4s, an override so the shader compiler can unroll them (`HS4` in the WGSL):
    /// HS rounded up to a power of two for the tiled design (few pipeline variants), exactly HS / 4 for the
    /// register design (which reads vec4s and has no padding).
    fn hs4(&self, design: AttentionDesign) -> usize {
        match design {
            AttentionDesign::Tiled => self.hs.next_power_of_two().div_ceil(4),
            AttentionDesign::Register => self.hs / 4,
        }
    }

    /// Immediates with `tile4 / HS4` rows per staged block, at most `max_rows` (the register design ignores it).
    fn params(&self, tile4: usize, max_rows: usize) -> Params {
        Params {
            b: self.b as u32,
            t: self.t as u32,
            c: self.c as u32,
            nh: self.nh as u32,
            hs: self.hs as u32,
            bc: (tile4 / self.hs4(AttentionDesign::Tiled)).min(max_rows) as u32,
            scale: 1.0 / (self.hs as f32).sqrt(),
            nkv: self.nkv as u32,
            w: self.w as u32,
        }
    }

    /// Pipeline constants: rows per workgroup, head loop trip count, and whether the kernel reads segment starts
    /// (a constant, so the causal pipelines compile with every segment term folded away).
    fn overrides(
        &self,
        design: AttentionDesign,
        rows_name: &'static str,
        rows: u32,
        segmented: bool,
    ) -> [(&'static str, f64); 3] {
        let rows = match design {
            AttentionDesign::Tiled => rows,
            AttentionDesign::Register => 64, // the override's default: unused by the register entry points
        };
        [(rows_name, rows as f64), ("HS4", self.hs4(design) as f64), ("SEGMENTED", segmented as u8 as f64)]
    }
}

/// Checks an optional starts tensor (I32 [B, T]) and returns the buffer to bind: starts itself, or the GPU's
/// placeholder, which the causal pipelines never read.
fn starts_arg(gpu: &Gpu, op: &'static str, dims: &Dims, starts: Option<&Tensor>) -> Result<Tensor> {
    match starts {
        Some(s) => {
            expect_dtype(op, "starts", s, DType::I32)?;
            shape_is(op, "starts", s, &[dims.b, dims.t])?;
            Ok(s.clone())
        }
        None => gpu.placeholder(),
    }
}

/// Per-position segment starts for rows made of consecutive sequences: row b holds sequences of
/// `lengths[b][0]`, `lengths[b][1]`, … tokens from position 0 on, and positions past the last one form one more
/// segment (padding that sees only itself). Returns B·T values, row-major, ready for `gpu.upload_i32(.., &[B, T])`.
/// Zero lengths are skipped. Panics if a row's lengths add up to more than `t`.
pub fn segment_starts(lengths: &[Vec<usize>], t: usize) -> Vec<i32> {
    let mut out = Vec::with_capacity(lengths.len() * t);
    for (b, row) in lengths.iter().enumerate() {
        let total: usize = row.iter().sum();
        assert!(total <= t, "segment_starts: row {b}'s sequence lengths {row:?} add up to {total} > T = {t}");
        let mut at = 0;
        for &n in row.iter().chain(std::iter::once(&(t - total))) {
            out.extend(std::iter::repeat_n(at as i32, n));
            at += n;
        }
    }
    out
}

/// Checks qkv ([B, T, (NH + 2·NKV)·HS] f32, head size within the kernels' max) and returns its sizes. For
/// multi-head attention that is [B, T, 3C] with n_head dividing C.
fn qkv_dims(op: &'static str, qkv: &Tensor, heads: Heads) -> Result<Dims> {
    expect_dtype(op, "qkv", qkv, DType::F32)?;
    let &[b, t, w] = qkv.shape() else {
        return Err(Error::Shape {
            op,
            what: "qkv",
            expected: "3-D [B, T, (n_head + 2·n_kv_head)·head_size]".into(),
            got: format!("{:?}", qkv.shape()),
        });
    };
    nonempty(op, "qkv", qkv)?;
    let Heads { n_head, n_kv_head } = heads;
    if n_head == n_kv_head && w % 3 != 0 {
        return Err(Error::Shape {
            op,
            what: "qkv last dimension",
            expected: "a multiple of 3 ([q | k | v])".into(),
            got: format!("{w} (shape {:?})", qkv.shape()),
        });
    }
    heads.check(op)?;
    let parts = n_head + 2 * n_kv_head;
    if w % parts != 0 {
        let message = format!(
            "n_head = {n_head} and n_kv_head = {n_kv_head} must divide the qkv width {w} into {parts} heads \
             (divide the channel count C = n_head · head_size)"
        );
        return Err(Error::Invalid { op, message });
    }
    let hs = w / parts;
    let c = n_head * hs;
    if hs > MAX_HEAD_SIZE {
        let message =
            format!("head size {hs} (C = {c} / n_head = {n_head}) exceeds the kernel's max of {MAX_HEAD_SIZE}");
        return Err(Error::Invalid { op, message });
    }
    fits_u32(op, "qkv", qkv.numel())?;
    Ok(Dims { b, t, c, nh: n_head, nkv: n_kv_head, hs, w })
}

/// qkv: [B, T, (NH + 2·NKV)·HS] f32 as the qkv projection produces it (per position: q for all NH heads, then k for
/// the NKV key/value heads, then v; head h uses channels h·HS..(h+1)·HS of its part); for GPT-2 that is c_attn's
/// [B, T, 3C]. `heads` is an n_head (multi-head) or [`Heads`].
/// Returns (y [B, T, C = NH·HS] with heads merged back as GPT-2 expects, lse [B, NH, T] = per-row log-sum-exp of
/// the scaled scores, which the backward pass needs).
pub fn attention_forward(gpu: &Gpu, qkv: &Tensor, heads: impl Into<Heads>) -> Result<(Tensor, Tensor)> {
    attention_forward_segments(gpu, qkv, heads, None)
}

/// `attention_forward` over packed sequences. starts: I32 [B, T] — query t of row b sees keys starts[b,t] ..= t
/// (the first position of its own sequence; see `segment_starts`), clamped to [0, t] in the kernel so that no
/// query is ever left without keys. None = causal, exactly `attention_forward`.
pub fn attention_forward_segments(
    gpu: &Gpu,
    qkv: &Tensor,
    heads: impl Into<Heads>,
    starts: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention_forward";
    let dims = qkv_dims(OP, qkv, heads.into())?;
    let Dims { b, t, c, nh, .. } = dims;
    let seg = starts_arg(gpu, OP, &dims, starts)?;
    let params = dims.params(TILE4, MAX_BC);
    let design = AttentionDesign::chosen(gpu, dims.hs);
    let (shader, [entry, ..], rows, _) = design.kernels();
    let y = gpu.alloc(&[b, t, c], DType::F32)?;
    let lse = gpu.alloc(&[b, nh, t], DType::F32)?;
    gpu.dispatch(&Launch {
        op: OP,
        flops: 2 * dims.causal_product_flops(),
        shader,
        entry,
        overrides: &dims.overrides(design, "BR", BR, starts.is_some()),
        args: &[qkv, &y, &lse, &seg],
        params: bytemuck::bytes_of(&params),
        groups: [(t as u32).div_ceil(rows), nh as u32, b as u32],
    })?;
    Ok((y, lse))
}

/// Gradient of the packed qkv [B, T, W] given dy [B, T, C], from the forward's inputs and outputs (qkv, y, lse).
/// Returns a NEW tensor dqkv [B, T, W] (q, k, v parts laid out like qkv; a shared key/value head gets the sum
/// over the query heads that read it).
///
/// Three kernels, FlashAttention-2 style: D = rowsum(dy ⊙ y) per head ([B, NH, T]); then dQ per block of queries
/// and dK, dV per block of keys, each recomputing the probabilities exp(score − lse) block by block. The only
/// temporary is D; every dqkv element is written once by one invocation, so the result is bit-reproducible.
pub fn attention_backward(
    gpu: &Gpu,
    qkv: &Tensor,
    y: &Tensor,
    lse: &Tensor,
    dy: &Tensor,
    heads: impl Into<Heads>,
) -> Result<Tensor> {
    attention_backward_segments(gpu, qkv, y, lse, dy, heads, None)
}

/// `attention_backward` of `attention_forward_segments`: pass the same starts as the forward (None = causal).
pub fn attention_backward_segments(
    gpu: &Gpu,
    qkv: &Tensor,
    y: &Tensor,
    lse: &Tensor,
    dy: &Tensor,
    heads: impl Into<Heads>,
    starts: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "attention_backward";
    let dims = qkv_dims(OP, qkv, heads.into())?;
    let Dims { b, t, c, nh, nkv, w, .. } = dims;
    for (what, x) in [("y", y), ("lse", lse), ("dy", dy)] {
        expect_dtype(OP, what, x, DType::F32)?;
    }
    shape_is(OP, "y", y, &[b, t, c])?;
    shape_is(OP, "dy", dy, &[b, t, c])?;
    shape_is(OP, "lse", lse, &[b, nh, t])?;
    let seg = starts_arg(gpu, OP, &dims, starts)?;
    let segmented = starts.is_some();

    let dsum = gpu.alloc(&[b, nh, t], DType::F32)?;
    let params = dims.params(TILE4, MAX_BC);
    gpu.dispatch(&Launch {
        op: OP,
        flops: 0,
        shader: &ATTENTION,
        entry: "attention_backward_dsum",
        overrides: &[],
        args: &[y, dy, &dsum],
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(b * nh * t, WG_1D),
    })?;
    let design = AttentionDesign::chosen(gpu, dims.hs);
    let (shader, [_, entry_dq, entry_dkv], rows_q, rows_kv) = design.kernels();
    let dqkv = gpu.alloc(&[b, t, w], DType::F32)?;
    // Writes the q part of dqkv.
    gpu.dispatch(&Launch {
        op: OP,
        flops: 3 * dims.causal_product_flops(),
        shader,
        entry: entry_dq,
        overrides: &dims.overrides(design, "BR", BR, segmented),
        args: &[qkv, dy, &dsum, lse, &dqkv, &seg],
        params: bytemuck::bytes_of(&params),
        groups: [(t as u32).div_ceil(rows_q), nh as u32, b as u32],
    })?;
    // Writes the k and v parts: one workgroup per block of keys of each key/value head.
    let params = dims.params(TILE4_BW, if segmented { MAX_BQ_SEGMENTED } else { MAX_BQ });
    gpu.dispatch(&Launch {
        op: OP,
        flops: 4 * dims.causal_product_flops(),
        shader,
        entry: entry_dkv,
        overrides: &dims.overrides(design, "BKV", BKV, segmented),
        args: &[qkv, dy, &dsum, lse, &dqkv, &seg],
        params: bytemuck::bytes_of(&params),
        groups: [(t as u32).div_ceil(rows_kv), nkv as u32, b as u32],
    })?;
    Ok(dqkv)
}

pub mod cpu {
    use super::Heads;

    /// Offsets into a packed qkv [B, T, W] of query head h's q, k and v at position ti of row bi: k and v come from
    /// key/value head h / (NH / NKV).
    struct Layout {
        t: usize,
        hs: usize,
        nh: usize,
        nkv: usize,
    }

    impl Layout {
        fn new(t: usize, c: usize, heads: Heads) -> Layout {
            Layout { t, hs: c / heads.n_head, nh: heads.n_head, nkv: heads.n_kv_head }
        }

        fn width(&self) -> usize {
            (self.nh + 2 * self.nkv) * self.hs
        }

        fn q(&self, bi: usize, ti: usize, h: usize) -> usize {
            (bi * self.t + ti) * self.width() + h * self.hs
        }

        fn k(&self, bi: usize, ti: usize, h: usize) -> usize {
            (bi * self.t + ti) * self.width() + (self.nh + h / (self.nh / self.nkv)) * self.hs
        }

        fn v(&self, bi: usize, ti: usize, h: usize) -> usize {
            self.k(bi, ti, h) + self.nkv * self.hs
        }
    }

    /// Segment start of query i of row bi, clamped to [0, i] as the kernels clamp it.
    fn start(starts: &[i32], bi: usize, t: usize, i: usize) -> usize {
        (starts[bi * t + i].max(0) as usize).min(i)
    }

    /// softmax(q·kᵀ/sqrt(HS) + causal mask)·v per (batch, query head), the textbook way: the full score row, then
    /// its max, sum and weighted average. qkv is [B, T, (NH + 2·NKV)·HS], c = NH·HS. Returns (y [B, T, C],
    /// lse [B, NH, T]).
    pub fn attention_forward(
        qkv: &[f64],
        b: usize,
        t: usize,
        c: usize,
        heads: impl Into<Heads>,
    ) -> (Vec<f64>, Vec<f64>) {
        attention_forward_segments(qkv, b, t, c, heads, &vec![0; b * t])
    }

    /// The same with query i of row bi seeing only keys starts[bi·T + i] ..= i (clamped to [0, i]).
    pub fn attention_forward_segments(
        qkv: &[f64],
        b: usize,
        t: usize,
        c: usize,
        heads: impl Into<Heads>,
        starts: &[i32],
    ) -> (Vec<f64>, Vec<f64>) {
        let heads = heads.into();
        let n_head = heads.n_head;
        let at = Layout::new(t, c, heads);
        assert_eq!(qkv.len(), b * t * at.width(), "qkv length");
        assert_eq!(starts.len(), b * t, "starts length");
        let hs = at.hs;
        let scale = 1.0 / (hs as f64).sqrt();
        let mut y = vec![0.0; b * t * c];
        let mut lse = vec![0.0; b * n_head * t];
        let mut scores = vec![0.0; t];
        for bi in 0..b {
            for h in 0..n_head {
                for i in 0..t {
                    let s0 = start(starts, bi, t, i);
                    let q = &qkv[at.q(bi, i, h)..][..hs];
                    for j in s0..=i {
                        let k = &qkv[at.k(bi, j, h)..][..hs];
                        scores[j] = q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale;
                    }
                    let seen = &scores[s0..=i];
                    let m = seen.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = seen.iter().map(|s| (s - m).exp()).sum();
                    lse[(bi * n_head + h) * t + i] = m + sum.ln();
                    let out = &mut y[(bi * t + i) * c + h * hs..][..hs];
                    for (j, s) in (s0..=i).zip(seen) {
                        let p = (s - m).exp() / sum;
                        let v = &qkv[at.v(bi, j, h)..][..hs];
                        out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
                    }
                }
            }
        }
        (y, lse)
    }

    /// Gradient of qkv for the upstream gradient dy [B, T, C], straight from the chain rule through the textbook
    /// forward: P = softmax row, dP_ij = dy_i·v_j, dS_ij = P_ij (dP_ij − Σ_k P_ik dP_ik) (the softmax Jacobian, not
    /// the dy·y shortcut the GPU uses), dq_i = scale Σ_j dS_ij k_j, dk_j = scale Σ_i dS_ij q_i, dv_j = Σ_i P_ij dy_i,
    /// a shared key/value head summing over the query heads that read it.
    pub fn attention_backward(
        qkv: &[f64],
        dy: &[f64],
        b: usize,
        t: usize,
        c: usize,
        heads: impl Into<Heads>,
    ) -> Vec<f64> {
        attention_backward_segments(qkv, dy, b, t, c, heads, &vec![0; b * t])
    }

    /// The same through `attention_forward_segments`: the sums over j run over starts[bi·T + i] ..= i only.
    pub fn attention_backward_segments(
        qkv: &[f64],
        dy: &[f64],
        b: usize,
        t: usize,
        c: usize,
        heads: impl Into<Heads>,
        starts: &[i32],
    ) -> Vec<f64> {
        let heads = heads.into();
        let n_head = heads.n_head;
        let at = Layout::new(t, c, heads);
        assert_eq!(qkv.len(), b * t * at.width(), "qkv length");
        assert_eq!(dy.len(), b * t * c, "dy length");
        assert_eq!(starts.len(), b * t, "starts length");
        let hs = at.hs;
        let scale = 1.0 / (hs as f64).sqrt();
        let mut dqkv = vec![0.0; qkv.len()];
        let mut p = vec![0.0; t];
        let mut dp = vec![0.0; t];
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f64>();
        for bi in 0..b {
            for h in 0..n_head {
                for i in 0..t {
                    let s0 = start(starts, bi, t, i);
                    let q = &qkv[at.q(bi, i, h)..][..hs];
                    let g = &dy[(bi * t + i) * c + h * hs..][..hs];
                    for j in s0..=i {
                        p[j] = dot(q, &qkv[at.k(bi, j, h)..][..hs]) * scale;
                        dp[j] = dot(g, &qkv[at.v(bi, j, h)..][..hs]);
                    }
                    let m = p[s0..=i].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    p[s0..=i].iter_mut().for_each(|s| *s = (*s - m).exp());
                    let sum: f64 = p[s0..=i].iter().sum();
                    p[s0..=i].iter_mut().for_each(|s| *s /= sum);
                    let jacobian_term = dot(&p[s0..=i], &dp[s0..=i]);
                    for j in s0..=i {
                        let ds = p[j] * (dp[j] - jacobian_term) * scale;
                        let (qi, kj, vj) = (at.q(bi, i, h), at.k(bi, j, h), at.v(bi, j, h));
                        for d in 0..hs {
                            let (qd, kd) = (qkv[qi + d], qkv[kj + d]);
                            dqkv[qi + d] += ds * kd;
                            dqkv[kj + d] += ds * qd;
                            dqkv[vj + d] += p[j] * g[d];
                        }
                    }
                }
            }
        }
        dqkv
    }
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
