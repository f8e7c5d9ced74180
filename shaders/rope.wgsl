// Rotary position embeddings (RoPE) on a packed qkv [N, W], W = (NH + 2·NKV)·HS, in Hugging Face's rotate-half
// convention: within each query and key head, channel d < HS/2 pairs with d + HS/2, and the pair at position p
// turns by the angle p·θ^(-2d/HS):
//   out[d]        = x[d]·cos − x[d + HS/2]·sin
//   out[d + HS/2] = x[d + HS/2]·cos + x[d]·sin
// The value heads (the last NKV·HS channels) are copied. The backward is the same kernel with the angle negated
// (a rotation's transpose is its inverse). cos/sin come from host-computed tables [max_pos, HS/2]; each row's
// position is read from positions[N], so packed sequences restart at 0. A position outside [0, max_pos) makes the
// element NaN: positions live on the GPU, and the downstream NaN check reports the step.
// One invocation per element, 1-D over N·W folded into x/y.

struct Params {
    n: u32,
    w: u32,
    hs: u32,
    // Channels rotated: the (NH + NKV)·HS of the query and key heads.
    rotated: u32,
    max_pos: u32,
    // +1 forward, -1 backward.
    sign: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> positions: array<i32>;
@group(0) @binding(2) var<storage, read> cos_table: array<f32>;
@group(0) @binding(3) var<storage, read> sin_table: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * WG + lid;
    if (i >= p.n) { return; }
    let col = i % p.w;
    if (col >= p.rotated) {
        out[i] = x[i];
        return;
    }
    let pos = positions[i / p.w];
    if (pos < 0 || u32(pos) >= p.max_pos) {
        out[i] = nan();
        return;
    }
    let half = p.hs / 2u;
    let d = col % p.hs;
    let k = d % half;
    let at = u32(pos) * half + k;
    let c = cos_table[at];
    let s = p.sign * sin_table[at];
    if (d < half) {
        out[i] = x[i] * c - x[i + half] * s;
    } else {
        out[i] = x[i] * c + x[i - half] * s;
    }
}
