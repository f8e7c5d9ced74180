// Causal multi-head attention, flash style, forward and backward, with grouped-query attention (GQA): NKV key/value
// heads, each shared by NH / NKV consecutive query heads (Hugging Face's repeat_kv order), read in place: no
// repeated K/V is ever materialised. No T×T matrix ever exists: the forward runs an
// online softmax over blocks of keys staged in workgroup memory and saves lse (the log-sum-exp of each row's scaled
// scores); the backward recomputes each probability as exp(score - lse) block by block (FlashAttention-2).
// qkv rows are W = (NH + 2·NKV)·HS wide: NH query heads, then NKV key heads, then NKV value heads; y and dy rows are
// C = NH·HS wide. Grids: x = block of rows (queries, or keys for attention_backward_dkv), y = head (query head, or
// key/value head for attention_backward_dkv), z = batch. Each invocation owns
// one row, and every output element is written by exactly one invocation: no atomics, bit-reproducible results.
//
// Packed sequences (SEGMENTED): query i of batch row b sees keys st_i ..= i, st_i = starts[b, i] clamped to [0, i]
// (the first position of its own sequence), so several sequences packed into one row never see each other. Every
// mask below is the one unsigned compare (j - st_i) <= (i - st_i): a key before st_i wraps around to a huge value.
// Causal attention is st_i = 0, and SEGMENTED = false folds every segment term away at pipeline creation, so the
// causal kernels are the plain causal code.

// One struct for every entry point: naga allows one `var<immediate>` per entry point, and one layout keeps the host
// side to a single Params.
struct Params {
    b: u32,
    t: u32,
    c: u32,
    nh: u32,
    hs: u32,
    // Rows per staged block (keys in the forward and dQ kernels, queries in the dK/dV kernel), chosen on the host
    // so that a block fits its tile (and, in the forward, the private score array).
    bc: u32,
    scale: f32,
    // Key/value heads (divides nh) and the qkv row width (nh + 2·nkv)·hs.
    nkv: u32,
    w: u32,
}
var<immediate> p: Params;

// Offsets into a qkv row: query head h, and the key and value heads that query head h reads.
fn q_col(h: u32) -> u32 {
    return h * p.hs;
}

fn k_col(h: u32) -> u32 {
    return (p.nh + h / (p.nh / p.nkv)) * p.hs;
}

fn v_col(h: u32) -> u32 {
    return k_col(h) + p.nkv * p.hs;
}

// Forward: qkv in; y, lse out.
@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
// starts [B, T] (I32) when SEGMENTED; otherwise a placeholder that is never read.
@group(0) @binding(3) var<storage, read> starts_fwd: array<i32>;

// Backward. Each entry point binds 0..n in order, so some bindings are shared with the forward's variables; no
// entry point uses two variables of one binding. Inputs are read-only so that they need no barriers.
//   attention_backward_dsum: 0 y_saved, 1 dy, 2 dsum
//   attention_backward_dq, attention_backward_dkv: 0 qkv, 1 dy, 2 dsum_in, 3 lse_in, 4 dqkv, 5 starts_bwd
@group(0) @binding(0) var<storage, read> y_saved: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dsum: array<f32>;
@group(0) @binding(2) var<storage, read> dsum_in: array<f32>;
@group(0) @binding(3) var<storage, read> lse_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> dqkv: array<f32>;
@group(0) @binding(5) var<storage, read> starts_bwd: array<i32>;

// Query rows per workgroup of the forward and dQ kernels (= invocations per workgroup).
override BR: u32 = 64u;
// Head vectors are held as vec4s zero-padded past HS (zeros add nothing to dot products, so any HS works). HS4 is
// HS rounded up to a power of two, over 4, chosen by the host: a constant trip count lets the compiler unroll the
// head loops with constant indices into q and acc; measured 1.4-1.9x less CPU time on lavapipe than loops bounded
// by p.hs. Powers of two keep the pipeline variants to six.
override HS4: u32 = 16u;
// Key rows per workgroup of attention_backward_dkv (= invocations per workgroup).
override BKV: u32 = 64u;
// Packed sequences: read per-query segment starts (the host sets it exactly when it binds a starts tensor).
override SEGMENTED: bool = false;
// Threads per workgroup of attention_backward_dsum (a 1-D launch folded into x/y like the elementwise kernels).
const WG: u32 = 256u;
// Private arrays need a constant size.
const MAX_HS4: u32 = 32u; // head size 128
const MAX_BC: u32 = 64u;
// vec4s per K or V tile: 2 × 512 × 16 bytes = 16 KiB, the WebGPU default workgroup memory.
const TILE4: u32 = 512u;
// The dK/dV kernel also stages lse and D per query: 2 × 496 × 16 + 2 × 64 × 4 bytes = 16 KiB.
const TILE4_BW: u32 = 496u;
const MAX_BQ: u32 = 64u;
// When SEGMENTED, the dK/dV kernel stages at most SEG_AT queries per block and keeps their starts (as bits) in
// lt[SEG_AT..]: no workgroup memory beyond the causal kernel's 16 KiB.
const SEG_AT: u32 = 32u;
// Finite stand-in for -inf: exp(NEG - NEG) would be NaN with a real infinity.
const NEG: f32 = -3.0e38;

// Drivers size workgroup memory per entry point from the variables it uses, so each kernel counts only its own.
// Forward and dQ: K and V tiles.
var<workgroup> kt: array<vec4<f32>, TILE4>;
var<workgroup> vt: array<vec4<f32>, TILE4>;
// dK/dV: the scaled Q tile, the dO tile, and lse and D of those queries.
var<workgroup> qt: array<vec4<f32>, TILE4_BW>;
var<workgroup> gt: array<vec4<f32>, TILE4_BW>;
var<workgroup> lt: array<f32, MAX_BQ>;
var<workgroup> dt: array<f32, MAX_BQ>;

// Segment start of query `row` of batch row `bi`, clamped to [0, row] so that every query keeps at least its own
// key (no empty softmax, whatever the input says).
fn start_fwd(bi: u32, row: u32) -> u32 {
    return min(u32(max(starts_fwd[bi * p.t + row], 0)), row);
}

fn start_bwd(bi: u32, row: u32) -> u32 {
    return min(u32(max(starts_bwd[bi * p.t + row], 0)), row);
}

// The smallest `v` over the workgroup of the forward or dQ kernel (one per invocation), as a uniform value so that
// it may bound the key-block loop. kt[0..BR] is scratch here: no block is staged yet, and the loop's first barrier
// comes before kt is overwritten. Values travel as bits through the f32 tile.
fn first_key(lid: u32, v: u32) -> u32 {
    kt[lid].x = bitcast<f32>(v);
    workgroupBarrier();
    if (lid == 0u) {
        var mn = v;
        for (var i = 1u; i < BR; i++) {
            mn = min(mn, bitcast<u32>(kt[i].x));
        }
        kt[BR].x = bitcast<f32>(mn);
    }
    return bitcast<u32>(workgroupUniformLoad(&kt[BR]).x);
}

// Channels d..d+3 of qkv starting at `at`, zero past the head size.
fn load4(at: u32, d: u32, hs: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (d + i < hs) {
            v[i] = qkv[at + d + i];
        }
    }
    return v;
}

// The same for dy, whose rows are C wide.
fn load4_dy(at: u32, d: u32, hs: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (d + i < hs) {
            v[i] = dy[at + d + i];
        }
    }
    return v;
}

@compute @workgroup_size(BR)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.y;
    let bi = wg.z;
    let q0 = wg.x * BR;
    let row = q0 + lid;
    let valid = row < p.t;
    let hs = p.hs;
    let hs4 = HS4;
    let w = p.w;
    let base = bi * p.t * w; // position 0 of this batch row

    // Rows past T compute on zeros so every invocation reaches the same barriers; they never write.
    var q: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    for (var d = 0u; d < hs4; d++) {
        q[d] = vec4<f32>(0.0);
        acc[d] = vec4<f32>(0.0);
        if (valid) {
            q[d] = load4(base + row * w + q_col(h), 4u * d, hs) * p.scale;
        }
    }
    var m = NEG;
    var l = 0.0;
    var s: array<f32, MAX_BC>;

    // This row sees keys st ..= row. Rows past T keep st = 0 (they see every loaded key).
    var st = 0u;
    var first = 0u;
    if (SEGMENTED) {
        if (valid) {
            st = start_fwd(bi, row);
        }
        first = first_key(lid, select(p.t, st, valid));
    }
    let span = row - st;

    // Keys above the workgroup's last row are masked for every row, and keys before its smallest start too, so
    // those blocks are never loaded.
    let last = min(q0 + BR, p.t);
    for (var kb = first; kb < last; kb += p.bc) {
        let nk = min(p.bc, p.t - kb);
        workgroupBarrier(); // the previous block's readers are done
        for (var i = lid; i < nk * hs4; i += BR) {
            let g = base + (kb + i / hs4) * w;
            kt[i] = load4(g + k_col(h), 4u * (i % hs4), hs);
            vt[i] = load4(g + v_col(h), 4u * (i % hs4), hs);
        }
        workgroupBarrier();

        // A block wholly before this row's start would add nothing (all its scores masked): skipped.
        if (!SEGMENTED || kb + nk > st) {
            // Scores of the whole block first, so the accumulator is rescaled once per block, not once per key.
            let kbs = kb - st; // wraps when the block begins before st: kbs + j > span for every key j < st
            var mb = m;
            for (var j = 0u; j < nk; j++) {
                var sc = 0.0;
                for (var d = 0u; d < hs4; d++) {
                    sc += dot(q[d], kt[j * hs4 + d]);
                }
                s[j] = select(NEG, sc, kbs + j <= span);
                mb = max(mb, s[j]);
            }
            // The first block this row computes holds key st <= row, so mb is finite from here on.
            let alpha = exp(m - mb);
            l *= alpha;
            for (var d = 0u; d < hs4; d++) {
                acc[d] *= alpha;
            }
            for (var j = 0u; j < nk; j++) {
                let pj = select(0.0, exp(s[j] - mb), kbs + j <= span);
                l += pj;
                for (var d = 0u; d < hs4; d++) {
                    acc[d] += pj * vt[j * hs4 + d];
                }
            }
            m = mb;
        }
    }

    if (valid) {
        let inv = 1.0 / l;
        let out = (bi * p.t + row) * p.c + h * hs;
        for (var d = 0u; d < hs; d++) {
            y[out + d] = acc[d / 4u][d % 4u] * inv;
        }
        lse[(bi * p.nh + h) * p.t + row] = m + log(l);
    }
}

// D[b, h, i] = dO_i · y_i per (batch, head, query row), laid out like lse. It equals Σ_j P_ij dP_ij, the term the
// softmax Jacobian subtracts, at O(HS) per row instead of O(T·HS).
@compute @workgroup_size(WG)
fn attention_backward_dsum(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * WG;
    if (r >= p.b * p.nh * p.t) {
        return;
    }
    let row = r % p.t;
    let h = (r / p.t) % p.nh;
    let bi = r / (p.t * p.nh);
    let at = (bi * p.t + row) * p.c + h * p.hs;
    var s = 0.0;
    for (var d = 0u; d < p.hs; d++) {
        s += dy[at + d] * y_saved[at + d];
    }
    dsum[r] = s;
}

// dQ_i = scale Σ_j dS_ij K_j for a block of BR query rows, looping over key blocks like the forward.
@compute @workgroup_size(BR)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.y;
    let bi = wg.z;
    let q0 = wg.x * BR;
    let row = q0 + lid;
    let valid = row < p.t;
    let hs = p.hs;
    let hs4 = HS4;
    let w = p.w;
    let base = bi * p.t * w;
    let stat = (bi * p.nh + h) * p.t + row;

    // Rows past T compute on zeros (their probabilities stay finite) so every invocation reaches the barriers.
    var q: array<vec4<f32>, MAX_HS4>;
    var g: array<vec4<f32>, MAX_HS4>;
    var dq: array<vec4<f32>, MAX_HS4>;
    for (var d = 0u; d < hs4; d++) {
        q[d] = vec4<f32>(0.0);
        g[d] = vec4<f32>(0.0);
        dq[d] = vec4<f32>(0.0);
        if (valid) {
            // Scaled exactly as the forward scaled it, so the recomputed scores match the ones lse summarizes.
            q[d] = load4(base + row * w + q_col(h), 4u * d, hs) * p.scale;
            g[d] = load4_dy((bi * p.t + row) * p.c + h * hs, 4u * d, hs);
        }
    }
    var li = 0.0;
    var di = 0.0;
    if (valid) {
        li = lse_in[stat];
        di = dsum_in[stat];
    }

    // Keys st ..= row, as in the forward.
    var st = 0u;
    var first = 0u;
    if (SEGMENTED) {
        if (valid) {
            st = start_bwd(bi, row);
        }
        first = first_key(lid, select(p.t, st, valid));
    }
    let span = row - st;

    let last = min(q0 + BR, p.t);
    for (var kb = first; kb < last; kb += p.bc) {
        let nk = min(p.bc, p.t - kb);
        workgroupBarrier();
        for (var i = lid; i < nk * hs4; i += BR) {
            let at = base + (kb + i / hs4) * w;
            kt[i] = load4(at + k_col(h), 4u * (i % hs4), hs);
            vt[i] = load4(at + v_col(h), 4u * (i % hs4), hs);
        }
        workgroupBarrier();

        if (!SEGMENTED || kb + nk > st) {
            let kbs = kb - st;
            for (var j = 0u; j < nk; j++) {
                var sc = 0.0;
                var dp = 0.0;
                for (var d = 0u; d < hs4; d++) {
                    sc += dot(q[d], kt[j * hs4 + d]);
                    dp += dot(g[d], vt[j * hs4 + d]);
                }
                // s - lse <= 0 up to rounding for the keys this row sees, so exp cannot overflow; a masked key's
                // exp may, but select drops it.
                let pj = select(0.0, exp(sc - li), kbs + j <= span);
                let ds = pj * (dp - di);
                for (var d = 0u; d < hs4; d++) {
                    dq[d] += ds * kt[j * hs4 + d];
                }
            }
        }
    }

    if (valid) {
        let out = base + row * w + q_col(h);
        for (var d = 0u; d < hs; d++) {
            dqkv[out + d] = dq[d / 4u][d % 4u] * p.scale;
        }
    }
}

// dK_j = scale Σ_i dS_ij Q_i and dV_j = Σ_i P_ij dO_i for a block of BKV key rows: the workgroup walks the query
// blocks from its first key to T (earlier queries cannot see these keys), staging Q, dO, lse and D, and each
// invocation accumulates its key's dK and dV privately, so no two workgroups ever add into the same element. Under
// GQA the workgroup belongs to one key/value head and walks the queries of each of the NH / NKV query heads that
// share it in turn, so the sum over the group stays private as well.
// When SEGMENTED it stops after the last query whose segment reaches back into its keys, and stages each query's
// start with its lse.
@compute @workgroup_size(BKV)
fn attention_backward_dkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let kvh = wg.y;
    let rep = p.nh / p.nkv;
    let h0 = kvh * rep; // the first query head of this key/value head's group
    let bi = wg.z;
    let k0 = wg.x * BKV;
    let col = k0 + lid;
    let valid = col < p.t;
    let hs = p.hs;
    let hs4 = HS4;
    let w = p.w;
    let base = bi * p.t * w;

    // Keys past T compute on zeros and are masked for every query (i < T <= col); they never write.
    var k: array<vec4<f32>, MAX_HS4>;
    var v: array<vec4<f32>, MAX_HS4>;
    var dk: array<vec4<f32>, MAX_HS4>;
    var dv: array<vec4<f32>, MAX_HS4>;
    for (var d = 0u; d < hs4; d++) {
        k[d] = vec4<f32>(0.0);
        v[d] = vec4<f32>(0.0);
        dk[d] = vec4<f32>(0.0);
        dv[d] = vec4<f32>(0.0);
        if (valid) {
            k[d] = load4(base + col * w + k_col(h0), 4u * d, hs);
            v[d] = load4(base + col * w + v_col(h0), 4u * d, hs);
        }
    }

    // One past the last query that sees any of this block's keys: T for causal attention. Otherwise the largest
    // i + 1 with st_i <= the block's last key, found by a strided scan of the starts and a max over the workgroup
    // (lt is scratch before the first query block is staged; values travel as bits).
    var end = p.t;
    if (SEGMENTED) {
        let kmax = min(k0 + BKV, p.t) - 1u;
        var e = 0u;
        for (var i = k0 + lid; i < p.t; i += BKV) {
            if (start_bwd(bi, i) <= kmax) {
                e = i + 1u;
            }
        }
        lt[lid] = bitcast<f32>(e);
        workgroupBarrier();
        if (lid == 0u) {
            for (var i = 1u; i < BKV; i++) {
                e = max(e, bitcast<u32>(lt[i]));
            }
            dt[0] = bitcast<f32>(e);
        }
        end = bitcast<u32>(workgroupUniformLoad(&dt[0]));
    }

    for (var h = h0; h < h0 + rep; h++) {
        let dy_base = bi * p.t * p.c + h * hs;
        let stats = (bi * p.nh + h) * p.t;
        for (var qb = k0; qb < end; qb += p.bc) {
            let nq = min(p.bc, end - qb);
            workgroupBarrier();
            for (var i = lid; i < nq * hs4; i += BKV) {
                let row = qb + i / hs4;
                // Q pre-scaled as in the forward: the scores match, and Σ dS·(scale·Q) is dK with no final multiply.
                qt[i] = load4(base + row * w + q_col(h), 4u * (i % hs4), hs) * p.scale;
                gt[i] = load4_dy(dy_base + row * p.c, 4u * (i % hs4), hs);
            }
            for (var i = lid; i < nq; i += BKV) {
                lt[i] = lse_in[stats + qb + i];
                dt[i] = dsum_in[stats + qb + i];
                if (SEGMENTED) {
                    lt[SEG_AT + i] = bitcast<f32>(start_bwd(bi, qb + i)); // the host keeps nq <= SEG_AT
                }
            }
            workgroupBarrier();

            for (var i = 0u; i < nq; i++) {
                var sc = 0.0;
                var dp = 0.0;
                for (var d = 0u; d < hs4; d++) {
                    sc += dot(qt[i * hs4 + d], k[d]);
                    dp += dot(gt[i * hs4 + d], v[d]);
                }
                // Query qb + i sees this key iff st <= col <= qb + i (keys past T: col > every query).
                var st = 0u;
                if (SEGMENTED) {
                    st = bitcast<u32>(lt[SEG_AT + i]);
                }
                let pij = select(0.0, exp(sc - lt[i]), col - st <= qb + i - st);
                let ds = pij * (dp - dt[i]);
                for (var d = 0u; d < hs4; d++) {
                    dv[d] += pij * gt[i * hs4 + d];
                    dk[d] += ds * qt[i * hs4 + d];
                }
            }
        }
    }

    if (valid) {
        let out = base + col * w;
        for (var d = 0u; d < hs; d++) {
            dqkv[out + k_col(h0) + d] = dk[d / 4u][d % 4u];
            dqkv[out + v_col(h0) + d] = dv[d / 4u][d % 4u];
        }
    }
}
