// A's fragment for matmul_blocked.wgsl, appended after it: THREAD_M values of the transposed A slab starting at
// vec4 index i, each invocation reading all of them from workgroup memory.
fn frag_a(i: u32, tx: u32) -> Frag {
    var f: Frag;
    f.v0 = Sa[i];
    if (THREAD_M > 4u) { f.v1 = Sa[i + 1u]; }
    if (THREAD_M > 8u) { f.v2 = Sa[i + 2u]; f.v3 = Sa[i + 3u]; }
    return f;
}
