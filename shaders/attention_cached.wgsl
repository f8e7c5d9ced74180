// Attention over a KV cache, for generation. The cache holds k and v per layer as [B, NKV, Tmax, HS] (head-major, so
// one head's keys are contiguous; NKV key/value heads, NKV < NH under grouped-query attention, query head h reading
// key/value head h / (NH / NKV)); kv_append scatters the k and v parts of a packed qkv [B, T, (NH + 2·NKV)·HS] into
// it at positions pos..pos+T, and the attention kernels read the T new queries from qkv and keys 0..pos+T from the
// cache.
// Two attention kernels, both flash style (online softmax, no score matrix):
//   attention_cached_rows: one invocation per query row, key blocks staged in workgroup memory and shared by the
//     workgroup's rows (prefill: many queries);
//   attention_cached_split: one workgroup per query row, its invocations splitting the keys and merging their
//     partial softmaxes at the end (decode: one query, where a row per invocation would leave all but one idle).
// Every output element is written by one invocation after fixed-order sums: no atomics, reproducible results.

struct Params {
    // Batch rows of qkv (the cache may have more; rows 0..b are used).
    b: u32,
    // New tokens in qkv.
    t: u32,
    c: u32,
    nh: u32,
    hs: u32,
    // Absolute position of qkv's first token.
    pos: u32,
    tmax: u32,
    // Keys per staged block of attention_cached_rows.
    bc: u32,
    scale: f32,
    // kv_copy_rows: rows dst0..dst1 other than src get positions 0..len of row src.
    src: u32,
    dst0: u32,
    dst1: u32,
    len: u32,
    // Key/value heads and the qkv row width (nh + 2·nkv)·hs.
    nkv: u32,
    w: u32,
}
var<immediate> p: Params;

// Start of the cached keys (and values) that query head h of batch row bi reads.
fn cache_base(bi: u32, h: u32) -> u32 {
    return (bi * p.nkv + h / (p.nh / p.nkv)) * p.tmax * p.hs;
}

// kv_append: 0 qkv, 1 kc, 2 vc. Attention: 0 qkv, 1 kc_in, 2 vc_in, 3 y. kv_copy_rows: 0 kcopy, 1 vcopy.
@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> kc: array<f32>;
@group(0) @binding(2) var<storage, read_write> vc: array<f32>;
@group(0) @binding(1) var<storage, read> kc_in: array<f32>;
@group(0) @binding(2) var<storage, read> vc_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(0) var<storage, read_write> kcopy: array<f32>;
@group(0) @binding(1) var<storage, read_write> vcopy: array<f32>;

// Threads of the 1-D kernels (folded over x/y like the elementwise kernels).
const WG: u32 = 256u;
// Query rows per workgroup of attention_cached_rows; HS rounded up to a power of two, over 4 (see attention.wgsl).
override BR: u32 = 64u;
override HS4: u32 = 16u;
// Invocations splitting the keys of one query in attention_cached_split.
const SPLIT: u32 = 32u;
const MAX_HS4: u32 = 32u;
const MAX_BC: u32 = 64u;
const TILE4: u32 = 512u;
const NEG: f32 = -3.0e38;

var<workgroup> kt: array<vec4<f32>, TILE4>;
var<workgroup> vt: array<vec4<f32>, TILE4>;
// The split kernel's merge: half the invocations' accumulators at a time (8 KiB), and their maxima and sums.
var<workgroup> acc_sh: array<vec4<f32>, 512>;
var<workgroup> m_sh: array<f32, SPLIT>;
var<workgroup> l_sh: array<f32, SPLIT>;

fn qkv4(at: u32, d: u32, hs: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (d + i < hs) {
            v[i] = qkv[at + d + i];
        }
    }
    return v;
}

fn k4(at: u32, d: u32, hs: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (d + i < hs) {
            v[i] = kc_in[at + d + i];
        }
    }
    return v;
}

fn v4(at: u32, d: u32, hs: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (d + i < hs) {
            v[i] = vc_in[at + d + i];
        }
    }
    return v;
}

// One invocation per (batch row, new token, channel) of the k (and v) part, NKV·HS channels wide.
@compute @workgroup_size(WG)
fn kv_append(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    let ckv = p.nkv * p.hs;
    if (i >= p.b * p.t * ckv) {
        return;
    }
    let ch = i % ckv;
    let tok = (i / ckv) % p.t;
    let bi = i / (ckv * p.t);
    let h = ch / p.hs;
    let src = (bi * p.t + tok) * p.w + p.nh * p.hs + ch;
    let dst = ((bi * p.nkv + h) * p.tmax + p.pos + tok) * p.hs + ch % p.hs;
    kc[dst] = qkv[src];
    vc[dst] = qkv[src + ckv];
}

// One invocation per element of the copied rows; the source row is skipped (a copy onto itself).
@compute @workgroup_size(WG)
fn kv_copy_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    let per_row = p.nkv * p.len * p.hs;
    if (i >= (p.dst1 - p.dst0) * per_row) {
        return;
    }
    let r = p.dst0 + i / per_row;
    if (r == p.src) {
        return;
    }
    let e = i % per_row;
    let d = e % p.hs;
    let tok = (e / p.hs) % p.len;
    let h = e / (p.hs * p.len);
    let off = (h * p.tmax + tok) * p.hs + d;
    let row = p.nkv * p.tmax * p.hs;
    kcopy[r * row + off] = kcopy[p.src * row + off];
    vcopy[r * row + off] = vcopy[p.src * row + off];
}

// attention_forward's kernel with keys from the cache: query row `row` sits at position pos + row and sees keys
// 0..=pos+row. Grid: x = block of BR query rows, y = head, z = batch row.
@compute @workgroup_size(BR)
fn attention_cached_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.y;
    let bi = wg.z;
    let q0 = wg.x * BR;
    let row = q0 + lid;
    let valid = row < p.t;
    let hs = p.hs;
    let hs4 = HS4;
    let w = p.w;
    let kbase = cache_base(bi, h);

    // Rows past T compute on zeros so every invocation reaches the same barriers; they never write.
    var q: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    for (var d = 0u; d < hs4; d++) {
        q[d] = vec4<f32>(0.0);
        acc[d] = vec4<f32>(0.0);
        if (valid) {
            q[d] = qkv4((bi * p.t + row) * w + h * hs, 4u * d, hs) * p.scale;
        }
    }
    var m = NEG;
    var l = 0.0;
    var s: array<f32, MAX_BC>;
    let qpos = p.pos + row;

    // Keys past the workgroup's last query are masked for all its rows and never loaded, so cache positions that
    // were never appended are never read.
    let last = p.pos + min(q0 + BR, p.t);
    for (var kb = 0u; kb < last; kb += p.bc) {
        let nk = min(p.bc, last - kb);
        workgroupBarrier();
        for (var i = lid; i < nk * hs4; i += BR) {
            let at = kbase + (kb + i / hs4) * hs;
            kt[i] = k4(at, 4u * (i % hs4), hs);
            vt[i] = v4(at, 4u * (i % hs4), hs);
        }
        workgroupBarrier();

        var mb = m;
        for (var j = 0u; j < nk; j++) {
            var sc = 0.0;
            for (var d = 0u; d < hs4; d++) {
                sc += dot(q[d], kt[j * hs4 + d]);
            }
            s[j] = select(NEG, sc, kb + j <= qpos);
            mb = max(mb, s[j]);
        }
        let alpha = exp(m - mb);
        l *= alpha;
        for (var d = 0u; d < hs4; d++) {
            acc[d] *= alpha;
        }
        for (var j = 0u; j < nk; j++) {
            let pj = select(0.0, exp(s[j] - mb), kb + j <= qpos);
            l += pj;
            for (var d = 0u; d < hs4; d++) {
                acc[d] += pj * vt[j * hs4 + d];
            }
        }
        m = mb;
    }

    if (valid) {
        let inv = 1.0 / l;
        let out = (bi * p.t + row) * p.c + h * hs;
        for (var d = 0u; d < hs; d++) {
            y[out + d] = acc[d / 4u][d % 4u] * inv;
        }
    }
}

// One query row per workgroup: invocation i takes keys i, i + SPLIT, ... with its own online softmax, then the
// partial results are merged in a fixed tree. Grid: x = query row, y = head, z = batch row.
@compute @workgroup_size(SPLIT)
fn attention_cached_split(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.y;
    let bi = wg.z;
    let row = wg.x;
    let hs = p.hs;
    let hs4 = HS4;
    let kbase = cache_base(bi, h);
    let nkeys = p.pos + row + 1u;

    var q: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    for (var d = 0u; d < hs4; d++) {
        q[d] = qkv4((bi * p.t + row) * p.w + h * hs, 4u * d, hs) * p.scale;
        acc[d] = vec4<f32>(0.0);
    }
    var m = NEG;
    var l = 0.0;
    for (var j = lid; j < nkeys; j += SPLIT) {
        let at = kbase + j * hs;
        var sc = 0.0;
        for (var d = 0u; d < hs4; d++) {
            sc += dot(q[d], k4(at, 4u * d, hs));
        }
        let mn = max(m, sc);
        let alpha = exp(m - mn);
        let pj = exp(sc - mn);
        l = l * alpha + pj;
        for (var d = 0u; d < hs4; d++) {
            acc[d] = acc[d] * alpha + pj * v4(at, 4u * d, hs);
        }
        m = mn;
    }

    // Rescale every partial result to the common maximum (invocation 0 always has key 0, so it is finite; an
    // invocation without keys gets factor exp(NEG - M) = 0).
    m_sh[lid] = m;
    workgroupBarrier();
    var mx = NEG;
    for (var i = 0u; i < SPLIT; i++) {
        mx = max(mx, m_sh[i]);
    }
    let f = exp(m - mx);
    l *= f;
    for (var d = 0u; d < hs4; d++) {
        acc[d] *= f;
    }
    for (var s = SPLIT / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier(); // the previous step's readers are done
        if (lid >= s && lid < 2u * s) {
            for (var d = 0u; d < hs4; d++) {
                acc_sh[(lid - s) * hs4 + d] = acc[d];
            }
            l_sh[lid - s] = l;
        }
        workgroupBarrier();
        if (lid < s) {
            for (var d = 0u; d < hs4; d++) {
                acc[d] += acc_sh[lid * hs4 + d];
            }
            l += l_sh[lid];
        }
    }
    if (lid == 0u) {
        let inv = 1.0 / l;
        let out = (bi * p.t + row) * p.c + h * hs;
        for (var d = 0u; d < hs; d++) {
            y[out + d] = acc[d / 4u][d % 4u] * inv;
        }
    }
}
