// Register-tiled causal attention for software GPUs (lavapipe), forward and backward: appended to attention.wgsl at
// load time (engine/src/shaders.rs), so it shares Params, the bindings' slots, the column helpers and the overrides.
// A module of its own because it needs the SUBGROUP feature.
//
// Same math as attention.wgsl (online softmax, lse saved, probabilities recomputed in the backward), another
// data flow. A workgroup is one 8-lane subgroup; each lane owns one row (a query, or a key in the dK/dV kernel) in
// registers. The other side's rows are taken 8 at a time: each lane loads one of them with vec4 loads, and
// `subgroupBroadcast` hands it to all lanes. llvmpipe reads workgroup memory per lane and per component even at
// a uniform address, and turns every load it cannot prove uniform into a loop over the lanes; one vec4 load per
// lane plus broadcasts (register shuffles) costs a fraction of that. No workgroup memory, no barrier.
// HS4 = HS / 4 exactly (the host requires HS % 4 == 0), so there is no padding: the head loops unroll and every
// array index becomes a constant.

@group(0) @binding(0) var<storage, read> qkv4: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> y4: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> dqkv4: array<vec4<f32>>;

const LANE: vec4<u32> = vec4<u32>(0u, 1u, 2u, 3u);

fn max4(v: vec4<f32>) -> f32 {
    return max(max(v.x, v.y), max(v.z, v.w));
}

fn sum4(v: vec4<f32>) -> f32 {
    return v.x + v.y + v.z + v.w;
}

// vec4 offset of channel 0 of head column `col` (a q_col/k_col/v_col result) at position `pos` of batch row `bi`.
fn at4(bi: u32, pos: u32, col: u32) -> u32 {
    return ((bi * p.t + pos) * p.w + col) / 4u;
}

// Σ_j a_j·(row j's vector), rows j = 0..7 held one per lane: the eight broadcasts of one vec4 of the head.
fn mix8(v: vec4<f32>, a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    var r = a.x * subgroupBroadcast(v, 0u);
    r = fma(vec4<f32>(a.y), subgroupBroadcast(v, 1u), r);
    r = fma(vec4<f32>(a.z), subgroupBroadcast(v, 2u), r);
    r = fma(vec4<f32>(a.w), subgroupBroadcast(v, 3u), r);
    r = fma(vec4<f32>(b.x), subgroupBroadcast(v, 4u), r);
    r = fma(vec4<f32>(b.y), subgroupBroadcast(v, 5u), r);
    r = fma(vec4<f32>(b.z), subgroupBroadcast(v, 6u), r);
    r = fma(vec4<f32>(b.w), subgroupBroadcast(v, 7u), r);
    return r;
}

// Partial dot products of this lane's `mine` with the eight lanes' `v` (one vec4 of the head), added to (lo, hi).
struct Dots {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn dots8(mine: vec4<f32>, v: vec4<f32>, acc: Dots) -> Dots {
    var r = acc;
    r.lo.x += dot(mine, subgroupBroadcast(v, 0u));
    r.lo.y += dot(mine, subgroupBroadcast(v, 1u));
    r.lo.z += dot(mine, subgroupBroadcast(v, 2u));
    r.lo.w += dot(mine, subgroupBroadcast(v, 3u));
    r.hi.x += dot(mine, subgroupBroadcast(v, 4u));
    r.hi.y += dot(mine, subgroupBroadcast(v, 5u));
    r.hi.z += dot(mine, subgroupBroadcast(v, 6u));
    r.hi.w += dot(mine, subgroupBroadcast(v, 7u));
    return r;
}

// Which of keys kb..kb+7 a query sees: (kb + j − st) <= span with span = row − st, wrapping below st as in
// attention.wgsl (a key before the segment start becomes a huge value).
struct Seen {
    lo: vec4<bool>,
    hi: vec4<bool>,
}

fn seen8(kb: u32, st: u32, span: u32) -> Seen {
    let kbs = vec4<u32>(kb - st) + LANE;
    return Seen(kbs <= vec4<u32>(span), kbs + 4u <= vec4<u32>(span));
}

// The subgroup's first key block when SEGMENTED: the smallest segment start of its valid rows.
fn first_block(valid: bool, st: u32) -> u32 {
    return subgroupMin(select(p.t, st, valid)) & ~7u;
}

// The eight lanes' values of a scalar, as (lanes 0..3, lanes 4..7).
fn gather8(x: f32) -> Dots {
    return Dots(
        vec4<f32>(subgroupBroadcast(x, 0u), subgroupBroadcast(x, 1u), subgroupBroadcast(x, 2u), subgroupBroadcast(x, 3u)),
        vec4<f32>(subgroupBroadcast(x, 4u), subgroupBroadcast(x, 5u), subgroupBroadcast(x, 6u), subgroupBroadcast(x, 7u)),
    );
}

@compute @workgroup_size(8)
fn attention_forward_register(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let h = wg.y;
    let bi = wg.z;
    let q0 = wg.x * 8u;
    let row = q0 + lane;
    let valid = row < p.t;
    // Lanes past T (and keys past T) read the last position: every load stays in bounds with no branch; their
    // results are masked or never written.
    let rowc = min(row, p.t - 1u);
    let qa = at4(bi, rowc, q_col(h));
    var q: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    for (var d = 0u; d < HS4; d++) {
        q[d] = qkv4[qa + d] * p.scale;
        acc[d] = vec4<f32>(0.0);
    }
    var m = NEG;
    var l = 0.0;

    var st = 0u;
    var first = 0u;
    if (SEGMENTED) {
        st = start_fwd(bi, rowc);
        first = first_block(valid, st);
    }
    let span = row - st;
    let last = min(q0 + 8u, p.t);
    let vcol = v_col(h) - k_col(h);
    for (var kb = first; kb < last; kb += 8u) {
        let ka = at4(bi, min(kb + lane, p.t - 1u), k_col(h));
        var s = Dots(vec4<f32>(0.0), vec4<f32>(0.0));
        for (var d = 0u; d < HS4; d++) {
            s = dots8(q[d], qkv4[ka + d], s);
        }
        let ok = seen8(kb, st, span);
        let mb = max(m, max(max4(select(vec4<f32>(NEG), s.lo, ok.lo)), max4(select(vec4<f32>(NEG), s.hi, ok.hi))));
        // NEG - NEG = 0 while a lane has seen no key: alpha = 1 on l = 0 and acc = 0.
        let alpha = exp(m - mb);
        let p_lo = select(vec4<f32>(0.0), exp(s.lo - mb), ok.lo);
        let p_hi = select(vec4<f32>(0.0), exp(s.hi - mb), ok.hi);
        l = l * alpha + sum4(p_lo) + sum4(p_hi);
        let va = ka + vcol / 4u;
        for (var d = 0u; d < HS4; d++) {
            acc[d] = acc[d] * alpha + mix8(qkv4[va + d], p_lo, p_hi);
        }
        m = mb;
    }

    if (valid) {
        let inv = 1.0 / l;
        let out = ((bi * p.t + row) * p.c + h * p.hs) / 4u;
        for (var d = 0u; d < HS4; d++) {
            y4[out + d] = acc[d] * inv;
        }
        lse[(bi * p.nh + h) * p.t + row] = m + log(l);
    }
}

// dQ_i = scale Σ_j dS_ij K_j, keys 8 at a time as in the forward.
@compute @workgroup_size(8)
fn attention_backward_dq_register(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let h = wg.y;
    let bi = wg.z;
    let q0 = wg.x * 8u;
    let row = q0 + lane;
    let valid = row < p.t;
    let rowc = min(row, p.t - 1u);
    let qa = at4(bi, rowc, q_col(h));
    let ga = ((bi * p.t + rowc) * p.c + h * p.hs) / 4u;
    var q: array<vec4<f32>, MAX_HS4>;
    var g: array<vec4<f32>, MAX_HS4>;
    var dq: array<vec4<f32>, MAX_HS4>;
    var kc: array<vec4<f32>, MAX_HS4>;
    for (var d = 0u; d < HS4; d++) {
        q[d] = qkv4[qa + d] * p.scale;
        g[d] = dy4[ga + d];
        dq[d] = vec4<f32>(0.0);
    }
    let stat = (bi * p.nh + h) * p.t + rowc;
    let li = lse_in[stat];
    let di = dsum_in[stat];

    var st = 0u;
    var first = 0u;
    if (SEGMENTED) {
        st = start_bwd(bi, rowc);
        first = first_block(valid, st);
    }
    let span = row - st;
    let last = min(q0 + 8u, p.t);
    let vcol = v_col(h) - k_col(h);
    for (var kb = first; kb < last; kb += 8u) {
        let ka = at4(bi, min(kb + lane, p.t - 1u), k_col(h));
        let va = ka + vcol / 4u;
        var s = Dots(vec4<f32>(0.0), vec4<f32>(0.0));
        var e = Dots(vec4<f32>(0.0), vec4<f32>(0.0));
        for (var d = 0u; d < HS4; d++) {
            kc[d] = qkv4[ka + d];
            s = dots8(q[d], kc[d], s);
            e = dots8(g[d], qkv4[va + d], e);
        }
        let ok = seen8(kb, st, span);
        // s - lse <= 0 up to rounding for the keys this row sees; a masked key's exp may overflow, select drops it.
        let p_lo = select(vec4<f32>(0.0), exp(s.lo - li), ok.lo);
        let p_hi = select(vec4<f32>(0.0), exp(s.hi - li), ok.hi);
        let ds_lo = p_lo * (e.lo - di);
        let ds_hi = p_hi * (e.hi - di);
        for (var d = 0u; d < HS4; d++) {
            dq[d] += mix8(kc[d], ds_lo, ds_hi);
        }
    }

    if (valid) {
        let out = at4(bi, row, q_col(h));
        for (var d = 0u; d < HS4; d++) {
            dqkv4[out + d] = dq[d] * p.scale;
        }
    }
}

// dK_j = scale Σ_i dS_ij Q_i and dV_j = Σ_i P_ij dO_i: each lane owns one key, queries 8 at a time from the
// block's first key to T (to the last query whose segment reaches back into the block when SEGMENTED); under GQA
// the workgroup walks every query head of its key/value head's group, so the sum stays private.
@compute @workgroup_size(8)
fn attention_backward_dkv_register(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let kvh = wg.y;
    let rep = p.nh / p.nkv;
    let h0 = kvh * rep;
    let bi = wg.z;
    let k0 = wg.x * 8u;
    let col = k0 + lane;
    let valid = col < p.t;
    let colc = min(col, p.t - 1u);
    let ka = at4(bi, colc, k_col(h0));
    let va = at4(bi, colc, v_col(h0));
    var k: array<vec4<f32>, MAX_HS4>;
    var v: array<vec4<f32>, MAX_HS4>;
    var dk: array<vec4<f32>, MAX_HS4>;
    var dv: array<vec4<f32>, MAX_HS4>;
    var qc: array<vec4<f32>, MAX_HS4>;
    var gc: array<vec4<f32>, MAX_HS4>;
    for (var d = 0u; d < HS4; d++) {
        k[d] = qkv4[ka + d];
        v[d] = qkv4[va + d];
        dk[d] = vec4<f32>(0.0);
        dv[d] = vec4<f32>(0.0);
    }

    // One past the last query that sees any key of this block: T when causal; otherwise the largest i + 1 with
    // st_i <= the block's last key (a strided scan of the starts, then a max over the subgroup).
    var end = p.t;
    if (SEGMENTED) {
        let kmax = min(k0 + 8u, p.t) - 1u;
        var e = 0u;
        for (var i = k0 + lane; i < p.t; i += 8u) {
            if (start_bwd(bi, i) <= kmax) {
                e = i + 1u;
            }
        }
        end = subgroupMax(e);
    }

    for (var h = h0; h < h0 + rep; h++) {
        let stats = (bi * p.nh + h) * p.t;
        for (var qb = k0; qb < end; qb += 8u) {
            // Lane j loads query qb + j (clamped; queries past T are masked below).
            let i = min(qb + lane, p.t - 1u);
            let qa = at4(bi, i, q_col(h));
            let ga = ((bi * p.t + i) * p.c + h * p.hs) / 4u;
            var s = Dots(vec4<f32>(0.0), vec4<f32>(0.0));
            var e = Dots(vec4<f32>(0.0), vec4<f32>(0.0));
            for (var d = 0u; d < HS4; d++) {
                // Q pre-scaled as in the forward: the scores match, and Σ dS·(scale·Q) is dK with no final multiply.
                qc[d] = qkv4[qa + d] * p.scale;
                gc[d] = dy4[ga + d];
                s = dots8(k[d], qc[d], s);
                e = dots8(v[d], gc[d], e);
            }
            let lse8 = gather8(lse_in[stats + i]);
            let d8 = gather8(dsum_in[stats + i]);
            // Query qb + j sees this key iff st <= col <= qb + j, and exists iff qb + j < T.
            var st_lo = vec4<u32>(0u);
            var st_hi = vec4<u32>(0u);
            if (SEGMENTED) {
                let st8 = gather8(bitcast<f32>(start_bwd(bi, i)));
                st_lo = bitcast<vec4<u32>>(st8.lo);
                st_hi = bitcast<vec4<u32>>(st8.hi);
            }
            let qi_lo = vec4<u32>(qb) + LANE;
            let qi_hi = qi_lo + 4u;
            let ok_lo = (vec4<u32>(col) - st_lo <= qi_lo - st_lo) & (qi_lo < vec4<u32>(p.t));
            let ok_hi = (vec4<u32>(col) - st_hi <= qi_hi - st_hi) & (qi_hi < vec4<u32>(p.t));
            let p_lo = select(vec4<f32>(0.0), exp(s.lo - lse8.lo), ok_lo);
            let p_hi = select(vec4<f32>(0.0), exp(s.hi - lse8.hi), ok_hi);
            let ds_lo = p_lo * (e.lo - d8.lo);
            let ds_hi = p_hi * (e.hi - d8.hi);
            for (var d = 0u; d < HS4; d++) {
                dv[d] += mix8(gc[d], p_lo, p_hi);
                dk[d] += mix8(qc[d], ds_lo, ds_hi);
            }
        }
    }

    if (valid) {
        let out_k = at4(bi, col, k_col(h0));
        let out_v = at4(bi, col, v_col(h0));
        for (var d = 0u; d < HS4; d++) {
            dqkv4[out_k + d] = dk[d];
            dqkv4[out_v + d] = dv[d];
        }
    }
}
