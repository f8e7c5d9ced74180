// Row kernels over the last dimension: LayerNorm and RMSNorm (saving their row statistics for the backward pass)
// and softmax, and their backward passes.
// One workgroup per row, its index folded over the x/y grid (one grid dimension holds at most 65535 workgroups).
// Threads stride over the row; partial results meet in a fixed-order reduction (rows.wgsl's tree in workgroup
// memory, or rows_subgroup.wgsl's subgroup operations), so every run gives the same bits (no atomics).

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
// layernorm_backward: x and gamma as above, then these. Variables sharing a binding belong to different entry
// points, which naga allows.
@group(0) @binding(2) var<storage, read> ln_dy: array<f32>;
@group(0) @binding(3) var<storage, read> mean_in: array<f32>;
@group(0) @binding(4) var<storage, read> rstd_in: array<f32>;
@group(0) @binding(5) var<storage, read_write> ln_dx: array<f32>;
@group(0) @binding(6) var<storage, read_write> dy_xhat: array<f32>;
// softmax_backward
@group(0) @binding(0) var<storage, read> sm_y: array<f32>;
@group(0) @binding(1) var<storage, read> sm_dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> sm_dx: array<f32>;

// rmsnorm: 0 x, 1 gamma, then these.
@group(0) @binding(2) var<storage, read_write> rms_y: array<f32>;
@group(0) @binding(3) var<storage, read_write> rms_rstd: array<f32>;
// rmsnorm_backward: 0 x, 1 gamma, 2 ln_dy, then these.
@group(0) @binding(3) var<storage, read> rms_rstd_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> rms_dx: array<f32>;
@group(0) @binding(5) var<storage, read_write> rms_dgx: array<f32>;

// y = (x - mean) * rstd * gamma + beta. Two passes (mean, then the sum of squared deviations) rather than
// E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std, as in deep residual streams.
@compute @workgroup_size(WG)
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
@compute @workgroup_size(WG)
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

// With xhat = (x - mean) * rstd and dxhat = dy * gamma:
//   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
// Also writes dy * xhat per element; the host sums its columns into dgamma in a fixed order (no atomics).
// xhat is recomputed in the second pass: a thread cannot keep its share of a long row in registers.
@compute @workgroup_size(WG)
fn layernorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.c;
    let mean = mean_in[row];
    let rstd = rstd_in[row];
    var s = vec2<f32>(0.0, 0.0);
    for (var j = lid; j < p.c; j += WG) {
        let xhat = (x[base + j] - mean) * rstd;
        let d = ln_dy[base + j];
        let dxhat = d * gamma[j];
        s += vec2<f32>(dxhat, dxhat * xhat);
        dy_xhat[base + j] = d * xhat;
    }
    let m = reduce_sum2(lid, s) / f32(p.c);
    for (var j = lid; j < p.c; j += WG) {
        let xhat = (x[base + j] - mean) * rstd;
        let dxhat = ln_dy[base + j] * gamma[j];
        ln_dx[base + j] = rstd * (dxhat - m.x - xhat * m.y);
    }
}

// dx = y * (dy - sum(dy * y)): the softmax Jacobian applied without forming it.
@compute @workgroup_size(WG)
fn softmax_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.c;
    var s = 0.0;
    for (var j = lid; j < p.c; j += WG) { s += sm_dy[base + j] * sm_y[base + j]; }
    let dot = reduce_sum(lid, s);
    for (var j = lid; j < p.c; j += WG) {
        sm_dx[base + j] = sm_y[base + j] * (sm_dy[base + j] - dot);
    }
}

// RMSNorm (Llama): y = x * rstd * gamma with rstd = 1/sqrt(mean(x^2) + eps), in that order as Hugging Face's
// LlamaRMSNorm. One pass for the sum of squares (no mean to subtract, so nothing cancels), one for the output.
@compute @workgroup_size(WG)
fn rmsnorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.c;
    var q = 0.0;
    for (var j = lid; j < p.c; j += WG) {
        let v = x[base + j];
        q += v * v;
    }
    let rstd = 1.0 / sqrt(reduce_sum(lid, q) / f32(p.c) + p.eps);
    for (var j = lid; j < p.c; j += WG) {
        rms_y[base + j] = x[base + j] * rstd * gamma[j];
    }
    if (lid == 0u) {
        rms_rstd[row] = rstd;
    }
}

// With xhat = x * rstd and dxhat = dy * gamma: dx = rstd * (dxhat - xhat * mean(dxhat * xhat)) (LayerNorm's
// formula without the mean terms). Writes dy * xhat per element for the host's fixed-order column sums (dgamma).
@compute @workgroup_size(WG)
fn rmsnorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.c;
    let rstd = rms_rstd_in[row];
    var s = 0.0;
    for (var j = lid; j < p.c; j += WG) {
        let xhat = x[base + j] * rstd;
        let d = ln_dy[base + j];
        s += d * gamma[j] * xhat;
        rms_dgx[base + j] = d * xhat;
    }
    let m = reduce_sum(lid, s) / f32(p.c);
    for (var j = lid; j < p.c; j += WG) {
        let xhat = x[base + j] * rstd;
        rms_dx[base + j] = rstd * (ln_dy[base + j] * gamma[j] - xhat * m);
    }
}
