// Causal multi-head attention, forward, flash style: softmax(q·kᵀ·scale + causal mask)·v with an online softmax
// over blocks of keys staged in workgroup memory, so no T×T matrix ever exists.
// Grid: x = ceil(T / BR) blocks of query rows, y = head, z = batch. Each invocation owns one query row.

struct Params {
    b: u32,
    t: u32,
    c: u32,
    nh: u32,
    hs: u32,
    // Keys per block, chosen on the host so that bc * HS4 <= TILE4 and bc <= MAX_BC.
    bc: u32,
    scale: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;

// Query rows per workgroup (= invocations per workgroup).
override BR: u32 = 64u;
// Head vectors are held as vec4s zero-padded past HS (zeros add nothing to dot products, so any HS works). HS4 is
// HS rounded up to a power of two, over 4, chosen by the host: a constant trip count lets the compiler unroll the
// head loops with constant indices into q and acc; measured 1.4-1.9x less CPU time on lavapipe than loops bounded
// by p.hs. Powers of two keep the pipeline variants to six.
override HS4: u32 = 16u;
// Private arrays need a constant size.
const MAX_HS4: u32 = 32u; // head size 128
const MAX_BC: u32 = 64u;
// vec4s per K or V tile: 2 × 512 × 16 bytes = 16 KiB, the WebGPU default workgroup memory.
const TILE4: u32 = 512u;
// Finite stand-in for -inf: exp(NEG - NEG) would be NaN with a real infinity.
const NEG: f32 = -3.0e38;

var<workgroup> kt: array<vec4<f32>, TILE4>;
var<workgroup> vt: array<vec4<f32>, TILE4>;

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

@compute @workgroup_size(BR)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.y;
    let bi = wg.z;
    let q0 = wg.x * BR;
    let row = q0 + lid;
    let valid = row < p.t;
    let hs = p.hs;
    let hs4 = HS4;
    let c3 = 3u * p.c;
    let base = bi * p.t * c3 + h * hs; // q of position 0 of this (batch, head)

    // Rows past T compute on zeros so every invocation reaches the same barriers; they never write.
    var q: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    for (var d = 0u; d < hs4; d++) {
        q[d] = vec4<f32>(0.0);
        acc[d] = vec4<f32>(0.0);
        if (valid) {
            q[d] = load4(base + row * c3, 4u * d, hs) * p.scale;
        }
    }
    var m = NEG;
    var l = 0.0;
    var s: array<f32, MAX_BC>;

    // Keys above the workgroup's last row are masked for every row, so those blocks are never loaded.
    let last = min(q0 + BR, p.t);
    for (var kb = 0u; kb < last; kb += p.bc) {
        let nk = min(p.bc, p.t - kb);
        workgroupBarrier(); // the previous block's readers are done
        for (var i = lid; i < nk * hs4; i += BR) {
            let g = base + (kb + i / hs4) * c3;
            kt[i] = load4(g + p.c, 4u * (i % hs4), hs);
            vt[i] = load4(g + 2u * p.c, 4u * (i % hs4), hs);
        }
        workgroupBarrier();

        // Scores of the whole block first, so the accumulator is rescaled once per block, not once per key.
        var mb = m;
        for (var j = 0u; j < nk; j++) {
            var sc = 0.0;
            for (var d = 0u; d < hs4; d++) {
                sc += dot(q[d], kt[j * hs4 + d]);
            }
            s[j] = select(NEG, sc, kb + j <= row);
            mb = max(mb, s[j]);
        }
        // The first block always holds key 0 <= row, so mb is finite from here on.
        let alpha = exp(m - mb);
        l *= alpha;
        for (var d = 0u; d < hs4; d++) {
            acc[d] *= alpha;
        }
        for (var j = 0u; j < nk; j++) {
            let pj = select(0.0, exp(s[j] - mb), kb + j <= row);
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
        lse[(bi * p.nh + h) * p.t + row] = m + log(l);
    }
}
