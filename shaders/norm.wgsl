// Row kernels over the last dimension: LayerNorm (saving mean and rstd for the backward pass) and softmax.
// One workgroup per row, its index folded over the x/y grid (one grid dimension holds at most 65535 workgroups).
// Threads stride over the row; partial results meet in a fixed-order tree in workgroup memory, so every run gives
// the same bits (no atomics).

struct Params {
    rows: u32,
    c: u32,
    eps: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> gamma: array<f32>;
@group(0) @binding(2) var<storage, read> beta: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> rstd_out: array<f32>;
// softmax has no affine parameters and writes its output at binding 1.
@group(0) @binding(1) var<storage, read_write> probs: array<f32>;

const WG: u32 = 256u;
// WGSL has no infinity literal; the largest finite f32 is a safe identity for max over finite inputs.
const NEG_BIG: f32 = -3.4028235e38;

var<workgroup> red: array<f32, WG>;

fn row_index(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

fn reduce_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    // Every thread must read the result before the next reduction overwrites red[0].
    workgroupBarrier();
    return r;
}

fn reduce_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// y = (x - mean) * rstd * gamma + beta. Two passes (mean, then the sum of squared deviations) rather than
// E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std, as in deep residual streams.
@compute @workgroup_size(256)
fn layernorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.c;
    var s = 0.0;
    for (var j = lid; j < p.c; j += WG) { s += x[base + j]; }
    let mean = reduce_sum(lid, s) / f32(p.c);
    var q = 0.0;
    for (var j = lid; j < p.c; j += WG) {
        let d = x[base + j] - mean;
        q += d * d;
    }
    // 1/sqrt rather than inverseSqrt: Vulkan allows inverseSqrt 2 ulp, and sqrt plus a division is as cheap here.
    let rstd = 1.0 / sqrt(reduce_sum(lid, q) / f32(p.c) + p.eps);
    for (var j = lid; j < p.c; j += WG) {
        y[base + j] = (x[base + j] - mean) * rstd * gamma[j] + beta[j];
    }
    if (lid == 0u) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// probs = exp(x - max) / sum(exp(x - max)); subtracting the row max keeps every exp in (0, 1].
@compute @workgroup_size(256)
fn softmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.c;
    var m = NEG_BIG;
    for (var j = lid; j < p.c; j += WG) { m = max(m, x[base + j]); }
    m = reduce_max(lid, m);
    var s = 0.0;
    for (var j = lid; j < p.c; j += WG) { s += exp(x[base + j] - m); }
    let inv = 1.0 / reduce_sum(lid, s);
    for (var j = lid; j < p.c; j += WG) {
        probs[base + j] = exp(x[base + j] - m) * inv;
    }
}
