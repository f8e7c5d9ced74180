//! Batched matmul with optional transposes, alpha/beta and a fused bias: C = alpha·op(A)·op(B) + beta·C + bias.
//! Two WGSL variants (workgroup-memory tiles for GPUs, barrier-free register tiles for software rasterizers);
//! `variant_for` picks one per adapter from its type and a quick timing on first use.

use std::time::Instant;

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::{fits_u32, nonempty};
use crate::shaders::{ShaderSource, MATMUL, MATMUL_REGISTER};
use crate::{DType, Error, Gpu, Result, Tensor};

/// How to read the operands and combine with the output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulSpec {
    /// A is stored [.., K, M] and used transposed.
    pub trans_a: bool,
    /// B is stored [.., N, K] and used transposed.
    pub trans_b: bool,
    pub alpha: f32,
    /// Weight of the existing output (1 accumulates, as backward passes do; 0 never reads it).
    pub beta: f32,
}

impl Default for MatmulSpec {
    fn default() -> Self {
        MatmulSpec { trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }
    }
}

impl MatmulSpec {
    pub fn nn() -> Self {
        Self::default()
    }
    /// Aᵀ·B (weight gradients).
    pub fn tn() -> Self {
        MatmulSpec { trans_a: true, ..Self::default() }
    }
    /// A·Bᵀ (input gradients, attention scores).
    pub fn nt() -> Self {
        MatmulSpec { trans_b: true, ..Self::default() }
    }
}

/// The kernel designs in `shaders/matmul.wgsl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulVariant {
    /// 64×64 tiles in workgroup memory: what real GPUs want.
    Tiled,
    /// 16×8 register tiles per invocation, no barriers: what CPU-backed Vulkan (lavapipe) wants.
    Register,
}

impl MatmulVariant {
    pub const ALL: [MatmulVariant; 2] = [MatmulVariant::Tiled, MatmulVariant::Register];

    pub fn name(self) -> &'static str {
        match self {
            MatmulVariant::Tiled => "matmul_tiled",
            MatmulVariant::Register => "matmul_register",
        }
    }

    /// Whether this adapter can run the variant: the register design broadcasts across an 8-lane subgroup.
    pub fn available(self, gpu: &Gpu) -> bool {
        match self {
            MatmulVariant::Tiled => true,
            MatmulVariant::Register => gpu.has_subgroups() && gpu.info().subgroup_min_size >= 8,
        }
    }

    /// The variants this adapter can run (tests check every one).
    pub fn all_available(gpu: &Gpu) -> Vec<MatmulVariant> {
        Self::ALL.into_iter().filter(|v| v.available(gpu)).collect()
    }

    /// (shader, entry point, workgroup grid) for a problem.
    fn kernel(self, m: u32, n: u32, batch: u32, b_vec4: bool) -> (&'static ShaderSource, &'static str, [u32; 3]) {
        match self {
            MatmulVariant::Tiled => (&MATMUL, "matmul_tiled", [n.div_ceil(64), m.div_ceil(64), batch]),
            MatmulVariant::Register => {
                let entry = if b_vec4 { "matmul_register_v4" } else { "matmul_register" };
                (&MATMUL_REGISTER, entry, [m.div_ceil(16), n.div_ceil(128), batch])
            }
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    sa_b: u32,
    sa_m: u32,
    sa_k: u32,
    sb_b: u32,
    sb_k: u32,
    sb_n: u32,
    sc_b: u32,
    has_bias: u32,
    alpha: f32,
    beta: f32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { m, n, k, batch, sa_b, sa_m, sa_k, sb_b, sb_k, sb_n, sc_b, has_bias, alpha, beta })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// Problem sizes derived from the operand shapes, checked before anything is dispatched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulShape {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// B is 2-D while A is batched: the same B for every batch entry.
    pub broadcast_b: bool,
}

impl MatmulShape {
    pub fn out_shape(&self, a_rank: usize) -> Vec<usize> {
        if a_rank == 3 {
            vec![self.batch, self.m, self.n]
        } else {
            vec![self.m, self.n]
        }
    }

    pub fn flops(&self) -> u64 {
        2 * (self.batch * self.m * self.n * self.k) as u64
    }
}

pub fn matmul_shape(a: &Tensor, b: &Tensor, spec: MatmulSpec) -> Result<MatmulShape> {
    let op = "matmul";
    nonempty(op, "A", a)?;
    nonempty(op, "B", b)?;
    expect_dtype(op, "A", a, DType::F32)?;
    expect_dtype(op, "B", b, DType::F32)?;
    let (ar, br) = (a.shape().len(), b.shape().len());
    if !(ar == 2 || ar == 3) || !(br == 2 || br == ar) {
        return Err(Error::Shape {
            op,
            what: "operand ranks",
            expected: "A [M,K] with B [K,N], or A [batch,M,K] with B [K,N] or [batch,K,N]".into(),
            got: format!("A {:?}, B {:?}", a.shape(), b.shape()),
        });
    }
    let batch = if ar == 3 { a.shape()[0] } else { 1 };
    let (a_rows, a_cols) = (a.shape()[ar - 2], a.shape()[ar - 1]);
    let (b_rows, b_cols) = (b.shape()[br - 2], b.shape()[br - 1]);
    let (m, k) = if spec.trans_a { (a_cols, a_rows) } else { (a_rows, a_cols) };
    let (kb, n) = if spec.trans_b { (b_cols, b_rows) } else { (b_rows, b_cols) };
    if k != kb || (br == 3 && b.shape()[0] != batch) {
        return Err(Error::Shape {
            op,
            what: "inner dimension",
            expected: format!(
                "B with K = {k}{} (trans_b = {})",
                if br == 3 { format!(", batch {batch}") } else { String::new() },
                spec.trans_b
            ),
            got: format!("A {:?} (trans_a = {}), B {:?}", a.shape(), spec.trans_a, b.shape()),
        });
    }
    Ok(MatmulShape { batch, m, n, k, broadcast_b: ar == 3 && br == 2 })
}

/// op(A)·op(B) (+ bias) as a new tensor, with the adapter's preferred variant.
pub fn matmul(gpu: &Gpu, a: &Tensor, b: &Tensor, bias: Option<&Tensor>, spec: MatmulSpec) -> Result<Tensor> {
    let shape = matmul_shape(a, b, spec)?;
    let out = gpu.alloc(&shape.out_shape(a.shape().len()), DType::F32)?;
    matmul_into(gpu, a, b, bias, &out, MatmulSpec { beta: 0.0, ..spec })?;
    Ok(out)
}

/// out = alpha·op(A)·op(B) + beta·out + bias, with the adapter's preferred variant.
pub fn matmul_into(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    spec: MatmulSpec,
) -> Result<()> {
    let variant = variant_for(gpu)?;
    matmul_with(gpu, variant, a, b, bias, out, spec)
}

/// The same with an explicit variant (tests run every variant; benches compare them).
pub fn matmul_with(
    gpu: &Gpu,
    variant: MatmulVariant,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    spec: MatmulSpec,
) -> Result<()> {
    let s = matmul_shape(a, b, spec)?;
    let op = "matmul";
    expect_dtype(op, "output", out, DType::F32)?;
    let want = s.out_shape(a.shape().len());
    if out.shape() != want.as_slice() {
        return Err(Error::Shape {
            op,
            what: "output",
            expected: format!("{want:?}"),
            got: format!("{:?}", out.shape()),
        });
    }
    if let Some(bias) = bias {
        expect_dtype(op, "bias", bias, DType::F32)?;
        if bias.shape() != [s.n] {
            return Err(Error::Shape {
                op,
                what: "bias",
                expected: format!("[{}]", s.n),
                got: format!("{:?}", bias.shape()),
            });
        }
    }
    for (what, t) in [("A", a), ("B", b), ("output", out)] {
        fits_u32(op, what, t.numel())?;
    }
    let (m, n, k) = (s.m as u32, s.n as u32, s.k as u32);
    let (sa_m, sa_k) = if spec.trans_a { (1, m) } else { (k, 1) };
    let (sb_k, sb_n) = if spec.trans_b { (1, k) } else { (n, 1) };
    let params = Params {
        m,
        n,
        k,
        batch: s.batch as u32,
        sa_b: m * k,
        sa_m,
        sa_k,
        sb_b: if s.broadcast_b { 0 } else { k * n },
        sb_k,
        sb_n,
        sc_b: m * n,
        has_bias: bias.is_some() as u32,
        alpha: spec.alpha,
        beta: spec.beta,
    };
    // The kernel reads `bias` only when has_bias is set, but every binding needs a buffer.
    let dummy;
    let bias = match bias {
        Some(b) => b,
        None => {
            dummy = gpu.placeholder()?;
            &dummy
        }
    };
    if !variant.available(gpu) {
        return Err(Error::MissingFeature {
            adapter: gpu.adapter_name().to_string(),
            feature: "subgroups of at least 8 lanes",
            why: "the register-tiled matmul broadcasts A across the subgroup",
        });
    }
    // vec4 loads of B need it contiguous along n with rows of whole vec4s.
    let b_vec4 = !spec.trans_b && n % 4 == 0;
    let (shader, entry, groups) = variant.kernel(m, n, s.batch as u32, b_vec4);
    gpu.dispatch(&Launch {
        op,
        shader,
        entry,
        overrides: &[],
        args: &[a, b, bias, out],
        params: bytemuck::bytes_of(&params),
        groups,
    })
}

/// Gradients of C = op(A)·op(B) + bias (forward with alpha 1, beta 0) given dC, each a NEW tensor shaped like its
/// operand as stored: (dA, dB, dbias), computed only where `want` says so. Every case is a transposed matmul of
/// dC with the other operand; no transpose is ever copied.
pub fn matmul_backward(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    dc: &Tensor,
    spec: MatmulSpec,
    want: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let s = matmul_shape(a, b, spec)?;
    let op = "matmul_backward";
    let out = s.out_shape(a.shape().len());
    if dc.shape() != out.as_slice() {
        return Err(Error::Shape { op, what: "dC", expected: format!("{out:?}"), got: format!("{:?}", dc.shape()) });
    }
    let t = |trans_a, trans_b| MatmulSpec { trans_a, trans_b, ..MatmulSpec::default() };
    let (ta, tb) = (spec.trans_a, spec.trans_b);
    // dA (as stored): [M,K] gets dC·op(B)ᵀ; a stored-transposed A [K,M] gets op(B)·dCᵀ.
    let da = if want[0] {
        Some(if !ta { matmul(gpu, dc, b, None, t(false, !tb))? } else { matmul(gpu, b, dc, None, t(tb, true))? })
    } else {
        None
    };
    let db = if !want[1] {
        None
    } else if s.broadcast_b {
        // One B shared by the batch: its gradient sums over the batch, which for a row-major A is one product
        // over the flattened [batch·M] rows.
        if ta {
            return Err(Error::Invalid {
                op,
                message: "the gradient of a batch-broadcast B with a transposed A is not supported".into(),
            });
        }
        let a2 = a.reshape(&[s.batch * s.m, s.k])?;
        let dc2 = dc.reshape(&[s.batch * s.m, s.n])?;
        Some(if !tb {
            matmul(gpu, &a2, &dc2, None, t(true, false))?
        } else {
            matmul(gpu, &dc2, &a2, None, t(true, false))?
        })
    } else {
        // dB (as stored): [K,N] gets op(A)ᵀ·dC; a stored-transposed B [N,K] gets dCᵀ·op(A).
        Some(if !tb { matmul(gpu, a, dc, None, t(!ta, false))? } else { matmul(gpu, dc, a, None, t(true, ta))? })
    };
    let dbias =
        if want[2] { Some(crate::ops::reduce::sum_rows(gpu, &dc.reshape(&[s.batch * s.m, s.n])?)?) } else { None };
    Ok((da, db, dbias))
}

const CHOICE_KEY: &str = "matmul_variant";

/// The variant for this adapter: `KILN_MATMUL=tiled|register` forces one; otherwise software adapters take the
/// register design and GPUs the faster of the two on a 512³ product, timed once per process.
pub fn variant_for(gpu: &Gpu) -> Result<MatmulVariant> {
    if let Some(&v) = gpu.choices.lock().unwrap().get(CHOICE_KEY) {
        return Ok(MatmulVariant::ALL[v as usize]);
    }
    let chosen = match std::env::var("KILN_MATMUL").ok().as_deref() {
        Some("tiled") => MatmulVariant::Tiled,
        Some("register") => MatmulVariant::Register,
        Some(other) => {
            return Err(Error::Invalid {
                op: "matmul",
                message: format!("KILN_MATMUL={other:?}: use tiled or register"),
            })
        }
        None if gpu.is_software() && MatmulVariant::Register.available(gpu) => MatmulVariant::Register,
        None => fastest(gpu)?,
    };
    let idx = MatmulVariant::ALL.iter().position(|v| *v == chosen).unwrap() as u32;
    gpu.choices.lock().unwrap().insert(CHOICE_KEY, idx);
    Ok(chosen)
}

fn fastest(gpu: &Gpu) -> Result<MatmulVariant> {
    let n = 512;
    let a = crate::ops::elementwise::zeros(gpu, &[n, n])?;
    let c = gpu.alloc(&[n, n], DType::F32)?;
    let mut best = (f64::INFINITY, MatmulVariant::Tiled);
    for v in MatmulVariant::all_available(gpu) {
        matmul_with(gpu, v, &a, &a, None, &c, MatmulSpec::nn())?; // compile + warm up
        gpu.sync()?;
        let t = Instant::now();
        for _ in 0..3 {
            matmul_with(gpu, v, &a, &a, None, &c, MatmulSpec::nn())?;
        }
        gpu.sync()?;
        let dt = t.elapsed().as_secs_f64();
        if dt < best.0 {
            best = (dt, v);
        }
    }
    Ok(best.1)
}

pub mod cpu {
    use super::{MatmulShape, MatmulSpec};

    /// f64 reference over the same row-major layouts the GPU reads.
    pub fn matmul(
        a: &[f64],
        b: &[f64],
        bias: Option<&[f64]>,
        c: &[f64],
        s: &MatmulShape,
        spec: MatmulSpec,
    ) -> Vec<f64> {
        let (m, n, k) = (s.m, s.n, s.k);
        let mut out = c.to_vec();
        for bt in 0..s.batch {
            let ab = &a[bt * m * k..(bt + 1) * m * k];
            let bb = if s.broadcast_b { &b[..k * n] } else { &b[bt * k * n..(bt + 1) * k * n] };
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for p in 0..k {
                        let av = if spec.trans_a { ab[p * m + i] } else { ab[i * k + p] };
                        let bv = if spec.trans_b { bb[j * k + p] } else { bb[p * n + j] };
                        acc += av * bv;
                    }
                    let o = &mut out[bt * m * n + i * n + j];
                    let prev = if spec.beta != 0.0 { spec.beta as f64 * *o } else { 0.0 };
                    *o = spec.alpha as f64 * acc + prev + bias.map_or(0.0, |b| b[j]);
                }
            }
        }
        out
    }

    /// f64 reference gradients (dA, dB, dbias) of Σ dC ⊙ C, by the chain rule written out element by element.
    pub fn matmul_backward(
        a: &[f64],
        b: &[f64],
        dc: &[f64],
        s: &MatmulShape,
        spec: MatmulSpec,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (m, n, k) = (s.m, s.n, s.k);
        let mut da = vec![0.0; a.len()];
        let mut db = vec![0.0; b.len()];
        let mut dbias = vec![0.0; n];
        for bt in 0..s.batch {
            let b_off = if s.broadcast_b { 0 } else { bt * k * n };
            for i in 0..m {
                for j in 0..n {
                    let g = dc[bt * m * n + i * n + j];
                    dbias[j] += g;
                    for p in 0..k {
                        let ai = bt * m * k + if spec.trans_a { p * m + i } else { i * k + p };
                        let bi = b_off + if spec.trans_b { j * k + p } else { p * n + j };
                        da[ai] += g * b[bi];
                        db[bi] += g * a[ai];
                    }
                }
            }
        }
        (da, db, dbias)
    }
}

#[cfg(test)]
#[path = "matmul_tests.rs"]
mod tests;
