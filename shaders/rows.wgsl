// Shared by the row kernels (norm.wgsl, loss.wgsl, policy.wgsl), prepended to each at load time
// (engine/src/shaders.rs): one workgroup of WG threads per row, rows folded over the x/y grid, and fixed-order tree
// reductions in workgroup memory (no atomics, so results are bit-reproducible). rows_subgroup.wgsl provides the
// same functions with subgroup operations, for adapters with fixed-size subgroups (the host sizes policy's token
// blocks by the module's WG).

const WG: u32 = 256u;
// WGSL has no infinity literal; the largest finite f32 is a safe identity for max over finite inputs.
const NEG_BIG: f32 = -3.4028235e38;

var<workgroup> red: array<f32, WG>;

fn row_index(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

// Every thread gets the sum of v over the workgroup.
fn reduce_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    // Every thread must read the result before the next reduction overwrites red[0].
    workgroupBarrier();
    return r;
}

fn reduce_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

var<workgroup> red2: array<vec2<f32>, WG>;

// Two sums in one tree: half the barriers of two reduce_sum calls.
fn reduce_sum2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    red2[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) { red2[lid] = red2[lid] + red2[lid + s]; }
        workgroupBarrier();
    }
    let r = red2[0];
    workgroupBarrier();
    return r;
}
