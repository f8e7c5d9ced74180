// Token + position embedding: out[b, t, :] = wte[tokens[b, t], :] + wpe[pos(b, t), :], and its backward. pos(b, t)
// is t, or positions[b, t] when the host gives position ids (packed sequences restart at 0 in each row). Models with
// rotary positions have no wpe (has_wpe = 0): out = wte[tokens[b, t], :], and the backward has no position section.
// One invocation per output element, 1-D over B*T*C folded into x/y (one grid dimension holds at most 65535
// workgroups). A token id outside [0, V) writes NaN across its row: the host cannot check ids without a readback.

struct Params {
    n: u32,
    c: u32,
    t: u32,
    v: u32,
    distinct: u32,     // backward: distinct token ids U
    pos_distinct: u32, // backward: distinct positions P
    has_positions: u32, // forward: read positions[] instead of t
    max_t: u32,        // forward: rows of wpe
    batch_t: u32,      // backward: B·T
    has_wpe: u32,      // forward: add wpe (0 = token embedding only)
    v0: u32,           // the bound wte / dwte holds ids v0..v0 + v_rows (tables above one binding come in parts)
    v_rows: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> tokens: array<i32>;
@group(0) @binding(1) var<storage, read> wte: array<f32>;
@group(0) @binding(2) var<storage, read> wpe: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> positions: array<i32>;
// embedding_backward (naga allows variables of different entry points to share a binding).
// buckets = [token ids (U) | offsets (U + 1) | indices (B*T) | positions (P) | offsets (P + 1) | indices (B*T)]: the
// flat indices b·T + t grouped by token, then by position, each by a stable counting sort on the host.
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
    var pos = i32(bt % p.t);
    if (p.has_positions != 0u) {
        pos = positions[bt];
    }
    let tok = tokens[bt];
    if (tok < 0 || u32(tok) >= p.v) {
        if (p.v0 == 0u) { out[i] = nan(); } // one part writes it
        return;
    }
    let id = u32(tok);
    if (id < p.v0 || id >= p.v0 + p.v_rows) { return; } // another part's token
    let row = (id - p.v0) * p.c + ch;
    if (p.has_wpe == 0u) {
        out[i] = wte[row];
        return;
    }
    if (pos < 0 || u32(pos) >= p.max_t) {
        out[i] = nan();
        return;
    }
    out[i] = wte[row] + wpe[u32(pos) * p.c + ch];
}

// One invocation per (row, channel) of the tables' touched rows: the first U*C items are (distinct token, channel),
// the last P*C (distinct position, channel). Each sums its dout rows sequentially in a fixed order (ascending flat
// index) and adds the total to the table once. Every table element has exactly one writer, so there are no atomics
// and every run gives the same bits.
@compute @workgroup_size(256)
fn embedding_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * WG + lid;
    if (i >= p.n) { return; }
    let ch = i % p.c;
    let row = i / p.c;
    let n_idx = p.batch_t;
    var base = 0u;
    var u = p.distinct;
    var r = row;
    if (row >= p.distinct) {
        // The position section starts after the token section's ids, offsets and indices.
        base = 2u * p.distinct + 1u + n_idx;
        u = p.pos_distinct;
        r = row - p.distinct;
    }
    let id = u32(buckets[base + r]);
    if (row < p.distinct && (id < p.v0 || id >= p.v0 + p.v_rows)) { return; } // another part's row
    let start = u32(buckets[base + u + r]);
    let end = u32(buckets[base + u + r + 1u]);
    let idx = base + 2u * u + 1u;
    var s = 0.0;
    for (var k = start; k < end; k++) {
        s += dout[u32(buckets[idx + k]) * p.c + ch];
    }
    if (row < p.distinct) {
        dwte[(id - p.v0) * p.c + ch] += s;
    } else {
        dwpe[id * p.c + ch] += s;
    }
}
