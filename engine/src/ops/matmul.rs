//! Batched matmul with optional transposes, alpha/beta and a fused bias: C = alpha·op(A)·op(B) + beta·C + bias.
//! Three WGSL designs (blocked workgroup tiles with register blocking for GPUs, barrier-free register tiles for
//! software rasterizers, and the first plain tiled kernel as a baseline); `matmul_tune` picks one per adapter and
//! shape class by timing the candidates once and remembering the choice on disk.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::{fits_u32, nonempty};
use crate::shaders::{ShaderSource, MATMUL, MATMUL_BLOCKED, MATMUL_BLOCKED_SG, MATMUL_REGISTER};
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

/// The kernel designs: `shaders/matmul.wgsl` (tiled), `matmul_register.wgsl`, `matmul_blocked.wgsl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulVariant {
    /// 64×64 tiles in workgroup memory, 4×4 scalar outputs per invocation: the first GPU design, kept as the
    /// baseline the blocked design is measured against.
    Tiled,
    /// 16×8 register tiles per invocation, no barriers: what CPU-backed Vulkan (lavapipe) wants.
    Register,
    /// Workgroup tiles with 2D register blocking and vec4 loads, sizes from the autotuner: what real GPUs want.
    Blocked(BlockedConfig),
}

/// Tile sizes of the blocked design (override constants of `matmul_blocked.wgsl`): a workgroup computes BM×BN
/// outputs in BK-deep steps, each invocation TM×TN of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockedConfig {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub tm: u32,
    pub tn: u32,
    /// A's fragments shared across the subgroup (`matmul_blocked_a_subgroup.wgsl`, names ending in `-sg`).
    pub shared_a: bool,
}

const fn blocked(bm: u32, bn: u32, bk: u32, tm: u32, tn: u32) -> BlockedConfig {
    BlockedConfig { bm, bn, bk, tm, tn, shared_a: false }
}

const fn blocked_sg(bm: u32, bn: u32, bk: u32, tm: u32, tn: u32) -> BlockedConfig {
    BlockedConfig { bm, bn, bk, tm, tn, shared_a: true }
}

impl BlockedConfig {
    /// What the autotuner times: Boehm's 128×128 with 8×8 per invocation; 16×16 per invocation (256
    /// accumulators: too many registers for most GPUs, but the fewest workgroup-memory reads per FMA, which is
    /// what bounds a software GPU); halves for mid-sized and skinny products; and small tiles that keep many
    /// workgroups busy when M·N is small; and the two big ones again with A's fragments shared across the subgroup
    /// (one workgroup-memory read per invocation in place of THREAD_M / 4), where subgroups allow it.
    pub const CANDIDATES: [BlockedConfig; 9] = [
        blocked(128, 128, 16, 8, 8),
        blocked(128, 128, 16, 16, 16),
        blocked_sg(128, 128, 16, 16, 16),
        blocked_sg(128, 128, 16, 8, 8),
        blocked(128, 64, 16, 8, 4),
        blocked(64, 128, 16, 4, 8),
        blocked(64, 64, 16, 4, 4),
        blocked(64, 64, 8, 8, 8),
        blocked(32, 32, 16, 4, 4),
    ];
    /// Used where tuning is off (`KILN_AUTOTUNE=off`) or impossible.
    pub const DEFAULT: BlockedConfig = Self::CANDIDATES[0];

    /// Whether a `-sg` candidate's subgroups each lie within one row of fragments: subgroups of one fixed size S
    /// (as consecutive invocations) with THREAD_M / 4 <= S and S dividing BLOCK_N / THREAD_N.
    pub fn subgroups_fit(&self, gpu: &Gpu) -> bool {
        let (min, max) = (gpu.info().subgroup_min_size, gpu.info().subgroup_max_size);
        gpu.has_subgroups() && min == max && min >= self.tm / 4 && (self.bn / self.tn).is_multiple_of(min)
    }

    pub fn invocations(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    /// Workgroup memory the kernel declares (sized for the largest candidate, see the WGSL).
    pub const WORKGROUP_BYTES: u32 = 2 * 512 * 16;

    /// The shape rules the WGSL relies on (it indexes its workgroup arrays without checks).
    pub fn valid(&self) -> bool {
        matches!(self.tm, 4 | 8 | 16)
            && matches!(self.tn, 4 | 8 | 16)
            && self.bm.is_multiple_of(self.tm)
            && self.bn.is_multiple_of(self.tn)
            && self.bk.is_multiple_of(4)
            && self.bk > 0
            && self.bk * self.bm <= 2048
            && self.bk * self.bn <= 2048
    }

    pub(crate) fn overrides(&self) -> [(&'static str, f64); 6] {
        [
            ("BLOCK_M", self.bm as f64),
            ("BLOCK_N", self.bn as f64),
            ("BLOCK_K", self.bk as f64),
            ("THREAD_M", self.tm as f64),
            ("THREAD_N", self.tn as f64),
            ("INVOCATIONS", self.invocations() as f64),
        ]
    }
}

impl std::fmt::Display for MatmulVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MatmulVariant::Tiled => write!(f, "tiled"),
            MatmulVariant::Register => write!(f, "register"),
            MatmulVariant::Blocked(c) => {
                write!(f, "blocked-{}x{}x{}-{}x{}{}", c.bm, c.bn, c.bk, c.tm, c.tn, if c.shared_a { "-sg" } else { "" })
            }
        }
    }
}

impl std::str::FromStr for MatmulVariant {
    type Err = String;
    /// The names `Display` writes (`KILN_MATMUL`, the autotune cache); "blocked" alone is the default config.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "blocked" {
            return Ok(MatmulVariant::Blocked(BlockedConfig::DEFAULT));
        }
        Self::all()
            .into_iter()
            .chain(
                // Any valid blocked configuration, not only the candidates: a user may try their own.
                parse_blocked(s).map(MatmulVariant::Blocked),
            )
            .find(|v| v.to_string() == s)
            .ok_or_else(|| {
                format!("unknown matmul variant {s:?}: use tiled, register, blocked or blocked-BMxBNxBK-TMxTN[-sg]")
            })
    }
}

fn parse_blocked(s: &str) -> Option<BlockedConfig> {
    let rest = s.strip_prefix("blocked-")?;
    let (rest, shared_a) = match rest.strip_suffix("-sg") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let (tile, thread) = rest.split_once('-')?;
    let nums: Vec<u32> = tile.split('x').chain(thread.split('x')).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let [bm, bn, bk, tm, tn] = nums[..] else { return None };
    let c = BlockedConfig { shared_a, ..blocked(bm, bn, bk, tm, tn) };
    c.valid().then_some(c)
}

impl MatmulVariant {
    /// Every variant, in a fixed order (tests run each one the adapter can).
    pub fn all() -> Vec<MatmulVariant> {
        let mut v = vec![MatmulVariant::Tiled, MatmulVariant::Register];
        v.extend(BlockedConfig::CANDIDATES.map(MatmulVariant::Blocked));
        v
    }

    /// Whether this adapter can run the variant: the register design broadcasts across an 8-lane subgroup; the
    /// blocked ones need their invocations and workgroup memory within the adapter's limits.
    pub fn available(self, gpu: &Gpu) -> bool {
        let lim = gpu.limits();
        match self {
            MatmulVariant::Tiled => true,
            MatmulVariant::Register => gpu.has_subgroups() && gpu.info().subgroup_min_size >= 8,
            MatmulVariant::Blocked(c) => {
                c.valid()
                    && (!c.shared_a || c.subgroups_fit(gpu))
                    && c.invocations() <= lim.max_compute_invocations_per_workgroup
                    && c.invocations() <= lim.max_compute_workgroup_size_x
                    && BlockedConfig::WORKGROUP_BYTES <= lim.max_compute_workgroup_storage_size
            }
        }
    }

    /// The variants this adapter can run (tests check every one).
    pub fn all_available(gpu: &Gpu) -> Vec<MatmulVariant> {
        Self::all().into_iter().filter(|v| v.available(gpu)).collect()
    }

    /// (shader, entry point, workgroup grid, override constants) for a problem. `vec4` says B (register) or both
    /// operands (blocked) may be read as vec4 along their contiguous dimension.
    fn kernel(
        self,
        m: u32,
        n: u32,
        batch: u32,
        vec4: bool,
    ) -> (&'static ShaderSource, &'static str, [u32; 3], Vec<(&'static str, f64)>) {
        match self {
            MatmulVariant::Tiled => (&MATMUL, "matmul_tiled", [n.div_ceil(64), m.div_ceil(64), batch], vec![]),
            MatmulVariant::Register => {
                let entry = if vec4 { "matmul_register_v4" } else { "matmul_register" };
                (&MATMUL_REGISTER, entry, [m.div_ceil(16), n.div_ceil(128), batch], vec![])
            }
            MatmulVariant::Blocked(c) => {
                let entry = if vec4 { "matmul_blocked_v4" } else { "matmul_blocked" };
                let shader = if c.shared_a { &MATMUL_BLOCKED_SG } else { &MATMUL_BLOCKED };
                (shader, entry, [n.div_ceil(c.bn), m.div_ceil(c.bm), batch], c.overrides().to_vec())
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
    let shape = matmul_shape(a, b, spec)?;
    let variant = crate::ops::matmul_tune::variant_for(gpu, &shape, spec)?;
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
        return Err(match variant {
            MatmulVariant::Blocked(c) => Error::Invalid {
                op,
                message: format!(
                    "{variant} does not fit {}: it needs {} invocations and {} B of workgroup memory (limits {} \
                     and {} B), TM and TN of 4, 8 or 16, BK a multiple of 4 and BK·BM, BK·BN at most 2048{}",
                    gpu.adapter_name(),
                    c.invocations(),
                    BlockedConfig::WORKGROUP_BYTES,
                    gpu.limits().max_compute_invocations_per_workgroup,
                    gpu.limits().max_compute_workgroup_storage_size,
                    if c.shared_a {
                        format!(
                            "; -sg also needs subgroups of one fixed size S with TM/4 <= S dividing BN/TN (this \
                             adapter: {}..{} lanes)",
                            gpu.info().subgroup_min_size,
                            gpu.info().subgroup_max_size
                        )
                    } else {
                        String::new()
                    }
                ),
            },
            _ => Error::MissingFeature {
                adapter: gpu.adapter_name().to_string(),
                feature: "subgroups of at least 8 lanes",
                why: "the register-tiled matmul broadcasts A across the subgroup",
            },
        });
    }
    let (shader, entry, groups, overrides) = variant.kernel(m, n, s.batch as u32, vec4_ok(variant, &s, spec));
    gpu.dispatch(&Launch {
        op,
        flops: s.flops(),
        shader,
        entry,
        overrides: &overrides,
        args: &[a, b, bias, out],
        params: bytemuck::bytes_of(&params),
        groups,
    })
}

/// Whether the variant's vec4 entry point may read this problem's operands: the register design reads B as
/// vec4 along n (B not transposed, N % 4 == 0); the blocked one reads both operands along their contiguous
/// dimension, which must then hold whole vec4s (A: K or, transposed, M; B: N or, transposed, K). Bindings start
/// at offsets aligned far beyond 16 bytes, so a batch stride that is a multiple of 4 keeps every row aligned.
fn vec4_ok(variant: MatmulVariant, s: &MatmulShape, spec: MatmulSpec) -> bool {
    match variant {
        MatmulVariant::Tiled => false,
        MatmulVariant::Register => !spec.trans_b && s.n.is_multiple_of(4),
        MatmulVariant::Blocked(_) => {
            let a_row = if spec.trans_a { s.m } else { s.k };
            let b_row = if spec.trans_b { s.k } else { s.n };
            a_row.is_multiple_of(4) && b_row.is_multiple_of(4)
        }
    }
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
