// Reinforcement-learning objectives: the clipped policy-gradient (GRPO/PPO) loss with its k3 KL penalty, and the
// per-row entropy and exact KL divergence of softmax distributions. rows.wgsl (WG, row folding, reduction trees) is
// prepended at load time. Every sum is a fixed-order tree in workgroup memory (no atomics): bit-reproducible.

struct Params {
    n: u32,        // policy_loss: tokens; row kernels: rows
    v: u32,        // row kernels: row length
    parts: u32,    // policy_loss, policy_totals: token blocks of WG (one partial sum each)
    clip: u32,     // policy_loss: 1 = clip the ratio to [1 - eps, 1 + eps]
    eps: f32,
    beta: f32,     // policy_loss: weight of the k3 KL penalty
}
var<immediate> p: Params;

// policy_loss
@group(0) @binding(0) var<storage, read> losses: array<f32>;
@group(0) @binding(1) var<storage, read> old_logp: array<f32>;
@group(0) @binding(2) var<storage, read> ref_logp: array<f32>;
@group(0) @binding(3) var<storage, read> adv: array<f32>;
@group(0) @binding(4) var<storage, read> scale: array<f32>;
@group(0) @binding(5) var<storage, read_write> weights: array<f32>;
@group(0) @binding(6) var<storage, read_write> partials: array<f32>;
// policy_totals (naga allows variables of different entry points to share a binding)
@group(0) @binding(0) var<storage, read> partials_in: array<f32>;
@group(0) @binding(1) var<storage, read_write> totals: array<f32>;
// token_entropy: logits, entropy_out. kl_rows: logits (P), q_logits, kl_out.
@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> entropy_out: array<f32>;
@group(0) @binding(1) var<storage, read> q_logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> kl_out: array<f32>;

// exp(d) - d - 1 (k3) for d = log(π_ref / π). Near d = 0, where a policy close to its reference lives, the direct
// form cancels to nothing in f32 (k3 ~ d²/2 against an exp rounded to ~1e-7), so |d| < 0.5 uses the Taylor series
// through d⁹/9! (truncation below 1e-8 relative).
fn k3(d: f32) -> f32 {
    if (abs(d) < 0.5) {
        let tail = 1.0 / 2.0 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0 + d * (1.0 / 720.0
            + d * (1.0 / 5040.0 + d * (1.0 / 40320.0 + d * (1.0 / 362880.0)))))));
        return d * d * tail;
    }
    return exp(d) - d - 1.0;
}

// Per token: the weight dObjective/dloss, and this workgroup's sums of (objective, k3, clipped) into partials
// [block, 3]. Masked tokens (scale 0) are skipped by a branch, not multiplied by 0, so whatever their other inputs
// hold (NaN, 1e30) they give exactly 0 everywhere. A workgroup covers WG consecutive tokens.
@compute @workgroup_size(WG)
fn policy_loss(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let block = row_index(wg, nwg);
    // The folded grid may hold a few workgroups past the last block (uniform: barriers below stay legal).
    if (block >= p.parts) { return; }
    let i = block * WG + lid;
    var objective = 0.0;
    var kl = 0.0;
    var clipped = 0.0;
    if (i < p.n) {
        let s = scale[i];
        var w = 0.0;
        if (s != 0.0) {
            let logp = -losses[i];
            let ratio = exp(logp - old_logp[i]);
            let a = adv[i];
            let unclipped = ratio * a;
            var surr = unclipped;
            // The policy-gradient part of -dObjective/dlogp: 0 where the clamp wins the min (constant in logp).
            var pg = unclipped;
            if (p.clip != 0u) {
                let c = clamp(ratio, 1.0 - p.eps, 1.0 + p.eps) * a;
                if (c < unclipped) {
                    surr = c;
                    pg = 0.0;
                    clipped = 1.0;
                }
            }
            let d = ref_logp[i] - logp;
            kl = k3(d);
            // beta = 0 switches the penalty off entirely: 0 · inf (an overflowing exp) must not make a NaN.
            var pen = 0.0;
            var dpen = 0.0; // d(k3)/dlogp = 1 - exp(d) = -(k3 + d)
            if (p.beta != 0.0) {
                pen = p.beta * kl;
                dpen = -p.beta * (kl + d);
            }
            objective = s * (pen - surr);
            w = s * (pg - dpen);
        }
        weights[i] = w;
    }
    let so = reduce_sum(lid, objective);
    let sk = reduce_sum(lid, kl);
    let sc = reduce_sum(lid, clipped);
    if (lid == 0u) {
        partials[block * 3u] = so;
        partials[block * 3u + 1u] = sk;
        partials[block * 3u + 2u] = sc;
    }
}

// totals[c] = Σ_block partials_in[block, c], one workgroup: each thread adds a strided column slice in order, then
// the tree.
@compute @workgroup_size(WG)
fn policy_totals(@builtin(local_invocation_index) lid: u32) {
    for (var c = 0u; c < 3u; c++) {
        var s = 0.0;
        for (var b = lid; b < p.parts; b += WG) { s += partials_in[b * 3u + c]; }
        s = reduce_sum(lid, s);
        if (lid == 0u) { totals[c] = s; }
    }
}

// H = -Σ p log p = log S - Σ e·z / S with z = x - max, e = exp(z), S = Σ e: every term is bounded (e·z >= -1/e), so
// large logits cannot cancel. Logits of -inf (e = 0) add 0, the limit of p log p.
@compute @workgroup_size(WG)
fn token_entropy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wg, nwg);
    if (row >= p.n) { return; }
    let base = row * p.v;
    var m = NEG_BIG;
    for (var j = lid; j < p.v; j += WG) { m = max(m, logits[base + j]); }
    m = reduce_max(lid, m);
    var s = 0.0;
    var t = 0.0;
    for (var j = lid; j < p.v; j += WG) {
        let z = logits[base + j] - m;
        let e = exp(z);
        s += e;
        t += select(0.0, e * z, e > 0.0);
    }
    s = reduce_sum(lid, s);
    t = reduce_sum(lid, t);
    if (lid == 0u) { entropy_out[row] = log(s) - t / s; }
}

// KL(P‖Q) = Σ p (log p - log q) = Σ e_x (zx - zy) / Sx - log Sx + log Sy, with zx = x - max x, zy = y - max y,
// e_x = exp(zx) and S the sums of exponentials: each row's own max keeps every exp in (0, 1]. Identical rows give
// exactly 0. A token P gives no mass (x = -inf) adds 0; one Q gives none while P does makes the KL infinite.
@compute @workgroup_size(WG)
fn kl_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wg, nwg);
    if (row >= p.n) { return; }
    let base = row * p.v;
    var mx = NEG_BIG;
    var my = NEG_BIG;
    for (var j = lid; j < p.v; j += WG) {
        mx = max(mx, logits[base + j]);
        my = max(my, q_logits[base + j]);
    }
    mx = reduce_max(lid, mx);
    my = reduce_max(lid, my);
    var sx = 0.0;
    var sy = 0.0;
    var t = 0.0;
    for (var j = lid; j < p.v; j += WG) {
        let zx = logits[base + j] - mx;
        let zy = q_logits[base + j] - my;
        let ex = exp(zx);
        sx += ex;
        sy += exp(zy);
        t += select(0.0, ex * (zx - zy), ex > 0.0);
    }
    sx = reduce_sum(lid, sx);
    sy = reduce_sum(lid, sy);
    t = reduce_sum(lid, t);
    if (lid == 0u) { kl_out[row] = t / sx - log(sx) + log(sy); }
}
