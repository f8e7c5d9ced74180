// Elementwise kernels: fill, copy, scale, add (residual), GELU (tanh form, as GPT-2), SwiGLU (Llama's MLP gate).
// Launch grid: 1-D over n elements, folded into x/y because one grid dimension holds at most 65535 workgroups.

struct Params {
    n: u32,
    alpha: f32,
    // swiglu: the MLP's inner width I (gu rows are 2I wide: gate, then up).
    inner: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
// In-place entry points bind their one buffer read_write at binding 0.
@group(0) @binding(0) var<storage, read_write> acc: array<f32>;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> out1: array<f32>;

const WG: u32 = 256u;

fn index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * WG + lid;
}

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { acc[i] = p.alpha; }
}

// out1 = x
@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out1[i] = x[i]; }
}

// out1 = alpha * x
@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out1[i] = p.alpha * x[i]; }
}

// acc *= alpha
@compute @workgroup_size(256)
fn scale_inplace(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { acc[i] = p.alpha * acc[i]; }
}

// out = x + alpha * y  (residual add with alpha = 1)
@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out[i] = x[i] + p.alpha * y[i]; }
}

// acc += alpha * src  (gradient accumulation)
@compute @workgroup_size(256)
fn add_inplace(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { acc[i] = acc[i] + p.alpha * src[i]; }
}

const GELU_SCALE: f32 = 0.7978845608028654; // sqrt(2/pi)

fn gelu_tanh(v: f32) -> f32 {
    // tanh saturates to +-1 beyond |u| = 10 in f32; clamping keeps exp-based tanh implementations finite.
    let u = clamp(GELU_SCALE * (v + 0.044715 * v * v * v), -15.0, 15.0);
    return 0.5 * v * (1.0 + tanh(u));
}

// out1 = gelu(x)
@compute @workgroup_size(256)
fn gelu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out1[i] = gelu_tanh(x[i]); }
}

// gelu'(x) in the sigmoid form of the same function: 0.5(1 + tanh u) = σ(2u), so
//   gelu'(x) = σ(2u) + x·2σ(2u)(1 − σ(2u))·u',  u' = GELU_SCALE·(1 + 3·0.044715·x²),
// with σ(2u) = 1/(1 + e) and 1 − σ(2u) = e/(1 + e), e = exp(−2u). Unlike 1 + tanh(u) and 1 − tanh²(u), neither
// cancels as tanh(u) → ±1, so both terms stay accurate relative to themselves in the tails. Where the forward
// clamps u, its derivative through u is 0 and only σ(2u) remains (this also keeps huge |x|, whose x³ overflows,
// from forming inf·0).
fn gelu_grad(v: f32) -> f32 {
    let raw = GELU_SCALE * (v + 0.044715 * v * v * v);
    let u = clamp(raw, -15.0, 15.0);
    let e = exp(-2.0 * u);
    let sig = 1.0 / (1.0 + e);
    if (abs(raw) >= 15.0) {
        return sig;
    }
    let du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * v * v);
    return sig + 2.0 * v * sig * (e / (1.0 + e)) * du;
}

// out = y * gelu'(x), y the upstream gradient
@compute @workgroup_size(256)
fn gelu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out[i] = y[i] * gelu_grad(x[i]); }
}

// silu(g) = g·σ(g). σ = 1/(1 + exp(−g)): exp overflows to +inf for g < −88, giving σ = 0 and silu = −0, the limit.
fn sigmoid(g: f32) -> f32 {
    return 1.0 / (1.0 + exp(-g));
}

// out1[r, j] = silu(gu[r, j]) · gu[r, I + j]: gate and up come from one fused [N, 2I] projection, so the MLP's
// hidden activation is written once, never the separate silu(gate) tensor.
@compute @workgroup_size(256)
fn swiglu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let at = (i / p.inner) * 2u * p.inner + i % p.inner;
    let g = x[at];
    out1[i] = g * sigmoid(g) * x[at + p.inner];
}

// d gate = dy·up·σ(g)(1 + g(1 − σ(g))), d up = dy·silu(g); x = gu, y = dy [N, I], out = dgu [N, 2I]. One
// invocation per (row, j) writes both halves.
@compute @workgroup_size(256)
fn swiglu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let at = (i / p.inner) * 2u * p.inner + i % p.inner;
    let g = x[at];
    let u = x[at + p.inner];
    let s = sigmoid(g);
    let d = y[i];
    out[at] = d * u * s * (1.0 + g * (1.0 - s));
    out[at + p.inner] = d * g * s;
}
