// Token + position embedding: out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :], and its backward.
// One invocation per output element, 1-D over B*T*C folded into x/y (one grid dimension holds at most 65535
// workgroups). A token id outside [0, V) writes NaN across its row: the host cannot check ids without a readback.

struct Params {
    n: u32,
    c: u32,
    t: u32,
    v: u32,
    distinct: u32, // backward: distinct token ids U
    batch: u32,    // backward: B
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> tokens: array<i32>;
@group(0) @binding(1) var<storage, read> wte: array<f32>;
@group(0) @binding(2) var<storage, read> wpe: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// embedding_backward (naga allows variables of different entry points to share a binding).
// buckets = [ids (U) | offsets (U + 1) | positions (B*T)], built on the host by a stable counting sort.
@group(0) @binding(0) var<storage, read> buckets: array<i32>;
@group(0) @binding(1) var<storage, read> dout: array<f32>;
@group(0) @binding(2) var<storage, read_write> dwte: array<f32>;
@group(0) @binding(3) var<storage, read_write> dwpe: array<f32>;

const WG: u32 = 256u;

// naga rejects NaN literals and cannot constant-fold bitcast, so this stays a runtime value.
fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

@compute @workgroup_size(256)
fn embedding(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * WG + lid;
    if (i >= p.n) { return; }
    let ch = i % p.c;
    let bt = i / p.c;
    let pos = bt % p.t;
    let tok = tokens[bt];
    if (tok < 0 || u32(tok) >= p.v) {
        out[i] = nan();
        return;
    }
    out[i] = wte[u32(tok) * p.c + ch] + wpe[pos * p.c + ch];
}

// One invocation per (row, channel) of the tables' touched rows: the first U*C items are (distinct token, channel),
// the last T*C are (position, channel). Each sums its dout rows sequentially in a fixed order (a token's positions
// ascending; b ascending for a position) and adds the total to the table once. Every table element has exactly one
// writer, so there are no atomics and every run gives the same bits.
@compute @workgroup_size(256)
fn embedding_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * WG + lid;
    if (i >= p.n) { return; }
    let ch = i % p.c;
    let row = i / p.c;
    if (row < p.distinct) {
        let tok = u32(buckets[row]);
        let start = u32(buckets[p.distinct + row]);
        let end = u32(buckets[p.distinct + row + 1u]);
        let positions = 2u * p.distinct + 1u;
        var s = 0.0;
        for (var k = start; k < end; k++) {
            s += dout[u32(buckets[positions + k]) * p.c + ch];
        }
        dwte[tok * p.c + ch] += s;
    } else {
        let t = row - p.distinct;
        var s = 0.0;
        for (var b = 0u; b < p.batch; b++) {
            s += dout[(b * p.t + t) * p.c + ch];
        }
        dwpe[t * p.c + ch] += s;
    }
}
