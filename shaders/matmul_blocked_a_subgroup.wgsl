// A's fragment for matmul_blocked.wgsl, shared across the subgroup: the `-sg` candidates, for adapters whose
// subgroups have one fixed size S with THREAD_M / 4 <= S and S dividing BLOCK_N / THREAD_N (checked by the host).
// Invocation tid = ty · (BLOCK_N / THREAD_N) + tx, so the S consecutive invocations of a subgroup share ty and
// need the same THREAD_M values of A: lane tx % (THREAD_M / 4) reads one vec4 of them and `subgroupBroadcast`
// hands the rest out. On llvmpipe, which reads workgroup memory lane by lane, that is 1 read in place of
// THREAD_M / 4 (measured in benches/RESULTS.md); on a GPU it trades workgroup-memory reads for shuffles.
fn frag_a(i: u32, tx: u32) -> Frag {
    var f: Frag;
    let mine = Sa[i + tx % (THREAD_M / 4u)];
    f.v0 = subgroupBroadcast(mine, 0u);
    if (THREAD_M > 4u) { f.v1 = subgroupBroadcast(mine, 1u); }
    if (THREAD_M > 8u) { f.v2 = subgroupBroadcast(mine, 2u); f.v3 = subgroupBroadcast(mine, 3u); }
    return f;
}
