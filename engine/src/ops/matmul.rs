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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random_vec, to_f64};

    /// (m, n, k): 1, odd, primes, exact and off-by-one multiples of the tiles (64×64 tiled; 16×128 register), and
    /// n % 4 == 0 cases that take the register design's vec4 path for B.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 7, 3),
        (5, 1, 9),
        (17, 33, 65),
        (64, 64, 64),
        (65, 63, 129),
        (5, 12, 7),
        (100, 257, 31),
        (3, 130, 2),
        (33, 260, 17),
    ];

    fn check(
        v: MatmulVariant,
        batch: usize,
        (m, n, k): (usize, usize, usize),
        spec: MatmulSpec,
        bias: bool,
        bcast: bool,
    ) {
        let gpu = gpu();
        let seed = (m * 1000 + n * 10 + k) as u64;
        let a_shape = if spec.trans_a { [batch, k, m] } else { [batch, m, k] };
        let b_batch = if bcast { 1 } else { batch };
        let b_shape = if spec.trans_b { [b_batch, n, k] } else { [b_batch, k, n] };
        let av = random_vec(batch * m * k, seed);
        let bv = random_vec(b_batch * k * n, seed + 1);
        let biasv = random_vec(n, seed + 2);
        let cv = random_vec(batch * m * n, seed + 3);
        let a = gpu.upload(&av, if batch == 1 { &a_shape[1..] } else { &a_shape }).unwrap();
        let b = gpu.upload(&bv, if batch == 1 || bcast { &b_shape[1..] } else { &b_shape }).unwrap();
        let tb = gpu.upload(&biasv, &[n]).unwrap();
        let c_shape = if batch == 1 { vec![m, n] } else { vec![batch, m, n] };
        let c = gpu.upload(&cv, &c_shape).unwrap();
        matmul_with(gpu, v, &a, &b, bias.then_some(&tb), &c, spec).unwrap();
        let s = matmul_shape(&a, &b, spec).unwrap();
        let want =
            cpu::matmul(&to_f64(&av), &to_f64(&bv), bias.then(|| to_f64(&biasv)).as_deref(), &to_f64(&cv), &s, spec);
        // Each output sums k products of values in [-1, 1] in f32 (order differs from the reference): the rounding
        // error grows at most like k·2^-24 per unit of magnitude, so 1e-6·k absolute (plus 1e-5 relative) bounds it.
        let what = format!("{v:?} batch {batch} (m,n,k)=({m},{n},{k}) {spec:?} bias {bias} broadcast {bcast}");
        assert_close(&gpu.read(&c).unwrap(), &want, 1e-5, 1e-6 * k as f64 + 1e-6, &what);
    }

    #[test]
    fn every_variant_matches_reference_on_odd_shapes() {
        for v in MatmulVariant::all_available(gpu()) {
            for &shape in SHAPES {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let spec = MatmulSpec { trans_a: ta, trans_b: tb, ..MatmulSpec::default() };
                    check(v, 1, shape, spec, false, false);
                }
            }
        }
    }

    #[test]
    fn every_variant_handles_batch_bias_alpha_beta() {
        for v in MatmulVariant::all_available(gpu()) {
            for &shape in &SHAPES[1..6] {
                let spec = MatmulSpec { trans_a: false, trans_b: true, alpha: 0.5, beta: 1.0 };
                check(v, 3, shape, spec, true, false);
                check(v, 2, shape, MatmulSpec { alpha: -2.0, beta: 0.25, ..MatmulSpec::tn() }, false, false);
                check(v, 3, shape, MatmulSpec::nn(), true, true);
            }
        }
    }

    #[test]
    fn software_adapters_run_both_variants_and_pick_register() {
        let gpu = gpu();
        if gpu.is_software() && gpu.has_subgroups() {
            assert_eq!(MatmulVariant::all_available(gpu), MatmulVariant::ALL.to_vec());
            if std::env::var_os("KILN_MATMUL").is_none() {
                assert_eq!(variant_for(gpu).unwrap(), MatmulVariant::Register);
            }
        }
        assert!(MatmulVariant::Tiled.available(gpu), "the tiled design must run everywhere");
    }

    #[test]
    fn gpt_sized_product_matches_reference() {
        // One larger case per variant: a [129, 768] activation times a [768, 301] weight.
        for v in MatmulVariant::all_available(gpu()) {
            check(v, 1, (129, 301, 768), MatmulSpec::nn(), true, false);
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let gpu = gpu();
        let a = gpu.upload(&random_vec(6, 1), &[2, 3]).unwrap();
        let b = gpu.upload(&random_vec(8, 2), &[4, 2]).unwrap();
        let r = matmul(gpu, &a, &b, None, MatmulSpec::nn());
        assert!(matches!(r, Err(Error::Shape { what: "inner dimension", .. })), "{r:?}");
        assert!(matches!(matmul(gpu, &a, &b, None, MatmulSpec::nt()), Err(Error::Shape { .. })));
        let c = gpu.alloc(&[2, 5], DType::F32).unwrap();
        let b2 = gpu.upload(&random_vec(12, 3), &[3, 4]).unwrap();
        assert!(matches!(
            matmul_with(gpu, MatmulVariant::Tiled, &a, &b2, None, &c, MatmulSpec::nn()),
            Err(Error::Shape { what: "output", .. })
        ));
        let bias = gpu.upload(&[1.0, 2.0], &[2]).unwrap();
        assert!(matches!(matmul(gpu, &a, &b2, Some(&bias), MatmulSpec::nn()), Err(Error::Shape { what: "bias", .. })));
        let v1 = gpu.upload(&[1.0, 2.0, 3.0], &[3]).unwrap();
        assert!(matches!(
            matmul(gpu, &v1, &b2, None, MatmulSpec::nn()),
            Err(Error::Shape { what: "operand ranks", .. })
        ));
        let ids = gpu.upload_i32(&[1, 2, 3, 4, 5, 6], &[2, 3]).unwrap();
        assert!(matches!(matmul(gpu, &ids, &b2, None, MatmulSpec::nn()), Err(Error::DType { .. })));
    }

    #[test]
    fn operand_larger_than_a_binding_is_a_limit_error() {
        let gpu = gpu();
        let limit = gpu.limits().max_storage_buffer_binding_size;
        let rows = (limit / 4 / 64 + 1) as usize; // one row past what one binding can hold
        if (rows * 64 * 4) as u64 > gpu.limits().max_buffer_size {
            // Such an adapter cannot even allocate it: that must be the typed error instead.
            assert!(matches!(gpu.alloc(&[rows, 64], DType::F32), Err(Error::Limit { .. })));
            return;
        }
        let a = gpu.alloc(&[rows, 64], DType::F32).unwrap();
        let b = gpu.alloc(&[64, 1], DType::F32).unwrap();
        match matmul(gpu, &a, &b, None, MatmulSpec::nn()) {
            Err(Error::Limit { limit_name, adapter, .. }) => {
                assert_eq!(limit_name, "max_storage_buffer_binding_size");
                assert_eq!(adapter, gpu.adapter_name());
            }
            other => panic!("expected a limit error, got {other:?}"),
        }
    }
}
