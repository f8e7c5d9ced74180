// Token + position embedding: out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :].
// One invocation per output element, 1-D over B*T*C folded into x/y (one grid dimension holds at most 65535
// workgroups). A token id outside [0, V) writes NaN across its row: the host cannot check ids without a readback.

struct Params {
    n: u32,
    c: u32,
    t: u32,
    v: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> tokens: array<i32>;
@group(0) @binding(1) var<storage, read> wte: array<f32>;
@group(0) @binding(2) var<storage, read> wpe: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

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
