// Fused softmax cross-entropy over the vocabulary: per row, loss = logsumexp(logits) - logits[target], and the
// logsumexp itself for the backward pass, which turns it into dlogits. One workgroup per row (index folded over the
// x/y grid); fixed-order reductions (rows.wgsl's tree or rows_subgroup.wgsl's subgroup operations), so results are
// deterministic.

struct Params {
    rows: u32,
    v: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> losses: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse_out: array<f32>;
// cross_entropy_backward: logits and targets as above, then these (naga allows variables of different entry points
// to share a binding).
@group(0) @binding(2) var<storage, read> lse_in: array<f32>;
@group(0) @binding(3) var<storage, read> dloss: array<f32>;
@group(0) @binding(4) var<storage, read_write> dlogits: array<f32>;

const IGNORE: i32 = -1;

// naga rejects NaN literals and cannot constant-fold bitcast, so this stays a runtime value.
fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

// Pass 1: row max. Pass 2: sum of exp(x - max), every term in (0, 1]. Then one thread forms the loss.
// Target -1 (ignore index) gives exactly 0; any other target outside [0, V) gives NaN, since the host cannot check
// ids without a readback and a NaN loss is caught downstream.
@compute @workgroup_size(WG)
fn cross_entropy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.v;
    var m = NEG_BIG;
    for (var j = lid; j < p.v; j += WG) { m = max(m, logits[base + j]); }
    m = reduce_max(lid, m);
    var s = 0.0;
    for (var j = lid; j < p.v; j += WG) { s += exp(logits[base + j] - m); }
    s = reduce_sum(lid, s);
    if (lid == 0u) {
        let lse = m + log(s);
        let t = targets[row];
        var loss = 0.0;
        if (t != IGNORE) {
            if (t < 0 || u32(t) >= p.v) {
                loss = nan();
            } else {
                loss = lse - logits[base + u32(t)];
            }
        }
        losses[row] = loss;
        lse_out[row] = lse;
    }
}

// dlogits[j] = dloss · (exp(logits[j] − lse) − [j == target]). The forward's lse makes this one elementwise pass
// over the row: no reduction, so no barriers. Ignored rows write exactly 0.0 whatever dloss holds (even a NaN);
// other out-of-range targets write NaN, as the forward's loss does.
@compute @workgroup_size(WG)
fn cross_entropy_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.v;
    let t = targets[row];
    if (t == IGNORE) {
        for (var j = lid; j < p.v; j += WG) { dlogits[base + j] = 0.0; }
        return;
    }
    if (t < 0 || u32(t) >= p.v) {
        let bad = nan();
        for (var j = lid; j < p.v; j += WG) { dlogits[base + j] = bad; }
        return;
    }
    let lse = lse_in[row];
    let d = dloss[row];
    for (var j = lid; j < p.v; j += WG) {
        let onehot = select(0.0, 1.0, j == u32(t));
        dlogits[base + j] = d * (exp(logits[base + j] - lse) - onehot);
    }
}
