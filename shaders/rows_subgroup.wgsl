// The subgroup twin of rows.wgsl, prepended instead of it (engine/src/shaders.rs) where the adapter has subgroups
// of one fixed size: the host sets WG to that size, so a row's workgroup is exactly one subgroup and every
// reduction is one subgroup operation: no workgroup memory and no barrier. On lavapipe a barrier switches every
// invocation's coroutine and workgroup memory is read per lane, so the 8-level tree of rows.wgsl costs more than
// the row's arithmetic; real GPUs with 32-lane subgroups get llm.c's one-warp-per-row layout. Same function
// names and the same fixed reduction order on a given device, so results stay bit-reproducible.

override WG: u32 = 32u;
// WGSL has no infinity literal; the largest finite f32 is a safe identity for max over finite inputs.
const NEG_BIG: f32 = -3.4028235e38;

fn row_index(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

fn reduce_sum(lid: u32, v: f32) -> f32 {
    return subgroupAdd(v);
}

fn reduce_max(lid: u32, v: f32) -> f32 {
    return subgroupMax(v);
}

fn reduce_sum2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    return subgroupAdd(v);
}
