// Register-tiled matmul for software GPUs (lavapipe): appended to matmul.wgsl at load time (engine/src/shaders.rs),
// so it shares Params, bindings and `store`. Kept in its own file because it needs the SUBGROUP feature and a
// module that uses subgroup built-ins fails validation on adapters without it.
//
// Design (measured on lavapipe, see benches/RESULTS.md): a workgroup is one 8-lane subgroup computing a 16×128
// tile; each lane owns 16 rows × 16 columns in 64 vec4 registers. No workgroup memory and no barrier. Per k, each
// lane loads one A value of rows row0+lane and row0+8+lane and `subgroupBroadcast` shares them: llvmpipe turns
// loads it cannot prove uniform into a scalar loop over the 8 lanes, so one load per lane plus broadcasts beats
// 16 loads. The body is unrolled by hand: with loops and arrays the accumulators live in memory (5× slower).

@group(0) @binding(1) var<storage, read> B4: array<vec4<f32>>;

fn store4(batch: u32, row: u32, col: u32, v: vec4<f32>) {
    store(batch, row, col, v.x);
    store(batch, row, col + 1u, v.y);
    store(batch, row, col + 2u, v.z);
    store(batch, row, col + 3u, v.w);
}

// B read as vec4: requires B row-major in n (not transposed) with n % 4 == 0.
@compute @workgroup_size(8)
fn matmul_register_v4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    // Row blocks run along x: consecutive workgroups reuse the same slab of B from cache.
    let batch = wg.z;
    let row0 = wg.x * 16u;
    let col0 = wg.y * 128u + lane * 16u;
    // Clamped indices keep every load in bounds with no branch in the loop; extra rows/cols are discarded.
    let a_lo = batch * p.sa_b + min(row0 + lane, p.m - 1u) * p.sa_m;
    let a_hi = batch * p.sa_b + min(row0 + 8u + lane, p.m - 1u) * p.sa_m;
    let n4 = p.n / 4u;
    let b_base = batch * (p.sb_b / 4u);
    let bc0 = b_base + min(col0 / 4u + 0u, n4 - 1u);
    let bc1 = b_base + min(col0 / 4u + 1u, n4 - 1u);
    let bc2 = b_base + min(col0 / 4u + 2u, n4 - 1u);
    let bc3 = b_base + min(col0 / 4u + 3u, n4 - 1u);
    var c0_0 = vec4<f32>(); var c0_1 = vec4<f32>(); var c0_2 = vec4<f32>(); var c0_3 = vec4<f32>();
    var c1_0 = vec4<f32>(); var c1_1 = vec4<f32>(); var c1_2 = vec4<f32>(); var c1_3 = vec4<f32>();
    var c2_0 = vec4<f32>(); var c2_1 = vec4<f32>(); var c2_2 = vec4<f32>(); var c2_3 = vec4<f32>();
    var c3_0 = vec4<f32>(); var c3_1 = vec4<f32>(); var c3_2 = vec4<f32>(); var c3_3 = vec4<f32>();
    var c4_0 = vec4<f32>(); var c4_1 = vec4<f32>(); var c4_2 = vec4<f32>(); var c4_3 = vec4<f32>();
    var c5_0 = vec4<f32>(); var c5_1 = vec4<f32>(); var c5_2 = vec4<f32>(); var c5_3 = vec4<f32>();
    var c6_0 = vec4<f32>(); var c6_1 = vec4<f32>(); var c6_2 = vec4<f32>(); var c6_3 = vec4<f32>();
    var c7_0 = vec4<f32>(); var c7_1 = vec4<f32>(); var c7_2 = vec4<f32>(); var c7_3 = vec4<f32>();
    var c8_0 = vec4<f32>(); var c8_1 = vec4<f32>(); var c8_2 = vec4<f32>(); var c8_3 = vec4<f32>();
    var c9_0 = vec4<f32>(); var c9_1 = vec4<f32>(); var c9_2 = vec4<f32>(); var c9_3 = vec4<f32>();
    var c10_0 = vec4<f32>(); var c10_1 = vec4<f32>(); var c10_2 = vec4<f32>(); var c10_3 = vec4<f32>();
    var c11_0 = vec4<f32>(); var c11_1 = vec4<f32>(); var c11_2 = vec4<f32>(); var c11_3 = vec4<f32>();
    var c12_0 = vec4<f32>(); var c12_1 = vec4<f32>(); var c12_2 = vec4<f32>(); var c12_3 = vec4<f32>();
    var c13_0 = vec4<f32>(); var c13_1 = vec4<f32>(); var c13_2 = vec4<f32>(); var c13_3 = vec4<f32>();
    var c14_0 = vec4<f32>(); var c14_1 = vec4<f32>(); var c14_2 = vec4<f32>(); var c14_3 = vec4<f32>();
    var c15_0 = vec4<f32>(); var c15_1 = vec4<f32>(); var c15_2 = vec4<f32>(); var c15_3 = vec4<f32>();
    for (var kk = 0u; kk < p.k; kk++) {
        let bk = kk * n4;
        let b0 = B4[bk + bc0]; let b1 = B4[bk + bc1]; let b2 = B4[bk + bc2]; let b3 = B4[bk + bc3];
        // Each lane loads one row's A value; broadcasts hand all 16 to every lane.
        let alo = A[a_lo + kk * p.sa_k];
        let ahi = A[a_hi + kk * p.sa_k];
        let a0 = vec4<f32>(subgroupBroadcast(alo, 0u)); c0_0 = fma(a0, b0, c0_0); c0_1 = fma(a0, b1, c0_1); c0_2 = fma(a0, b2, c0_2); c0_3 = fma(a0, b3, c0_3);
        let a1 = vec4<f32>(subgroupBroadcast(alo, 1u)); c1_0 = fma(a1, b0, c1_0); c1_1 = fma(a1, b1, c1_1); c1_2 = fma(a1, b2, c1_2); c1_3 = fma(a1, b3, c1_3);
        let a2 = vec4<f32>(subgroupBroadcast(alo, 2u)); c2_0 = fma(a2, b0, c2_0); c2_1 = fma(a2, b1, c2_1); c2_2 = fma(a2, b2, c2_2); c2_3 = fma(a2, b3, c2_3);
        let a3 = vec4<f32>(subgroupBroadcast(alo, 3u)); c3_0 = fma(a3, b0, c3_0); c3_1 = fma(a3, b1, c3_1); c3_2 = fma(a3, b2, c3_2); c3_3 = fma(a3, b3, c3_3);
        let a4 = vec4<f32>(subgroupBroadcast(alo, 4u)); c4_0 = fma(a4, b0, c4_0); c4_1 = fma(a4, b1, c4_1); c4_2 = fma(a4, b2, c4_2); c4_3 = fma(a4, b3, c4_3);
        let a5 = vec4<f32>(subgroupBroadcast(alo, 5u)); c5_0 = fma(a5, b0, c5_0); c5_1 = fma(a5, b1, c5_1); c5_2 = fma(a5, b2, c5_2); c5_3 = fma(a5, b3, c5_3);
        let a6 = vec4<f32>(subgroupBroadcast(alo, 6u)); c6_0 = fma(a6, b0, c6_0); c6_1 = fma(a6, b1, c6_1); c6_2 = fma(a6, b2, c6_2); c6_3 = fma(a6, b3, c6_3);
        let a7 = vec4<f32>(subgroupBroadcast(alo, 7u)); c7_0 = fma(a7, b0, c7_0); c7_1 = fma(a7, b1, c7_1); c7_2 = fma(a7, b2, c7_2); c7_3 = fma(a7, b3, c7_3);
        let a8 = vec4<f32>(subgroupBroadcast(ahi, 0u)); c8_0 = fma(a8, b0, c8_0); c8_1 = fma(a8, b1, c8_1); c8_2 = fma(a8, b2, c8_2); c8_3 = fma(a8, b3, c8_3);
        let a9 = vec4<f32>(subgroupBroadcast(ahi, 1u)); c9_0 = fma(a9, b0, c9_0); c9_1 = fma(a9, b1, c9_1); c9_2 = fma(a9, b2, c9_2); c9_3 = fma(a9, b3, c9_3);
        let a10 = vec4<f32>(subgroupBroadcast(ahi, 2u)); c10_0 = fma(a10, b0, c10_0); c10_1 = fma(a10, b1, c10_1); c10_2 = fma(a10, b2, c10_2); c10_3 = fma(a10, b3, c10_3);
        let a11 = vec4<f32>(subgroupBroadcast(ahi, 3u)); c11_0 = fma(a11, b0, c11_0); c11_1 = fma(a11, b1, c11_1); c11_2 = fma(a11, b2, c11_2); c11_3 = fma(a11, b3, c11_3);
        let a12 = vec4<f32>(subgroupBroadcast(ahi, 4u)); c12_0 = fma(a12, b0, c12_0); c12_1 = fma(a12, b1, c12_1); c12_2 = fma(a12, b2, c12_2); c12_3 = fma(a12, b3, c12_3);
        let a13 = vec4<f32>(subgroupBroadcast(ahi, 5u)); c13_0 = fma(a13, b0, c13_0); c13_1 = fma(a13, b1, c13_1); c13_2 = fma(a13, b2, c13_2); c13_3 = fma(a13, b3, c13_3);
        let a14 = vec4<f32>(subgroupBroadcast(ahi, 6u)); c14_0 = fma(a14, b0, c14_0); c14_1 = fma(a14, b1, c14_1); c14_2 = fma(a14, b2, c14_2); c14_3 = fma(a14, b3, c14_3);
        let a15 = vec4<f32>(subgroupBroadcast(ahi, 7u)); c15_0 = fma(a15, b0, c15_0); c15_1 = fma(a15, b1, c15_1); c15_2 = fma(a15, b2, c15_2); c15_3 = fma(a15, b3, c15_3);
    }
    store4(batch, row0 + 0u, col0 + 0u, c0_0); store4(batch, row0 + 0u, col0 + 4u, c0_1); store4(batch, row0 + 0u, col0 + 8u, c0_2); store4(batch, row0 + 0u, col0 + 12u, c0_3);
    store4(batch, row0 + 1u, col0 + 0u, c1_0); store4(batch, row0 + 1u, col0 + 4u, c1_1); store4(batch, row0 + 1u, col0 + 8u, c1_2); store4(batch, row0 + 1u, col0 + 12u, c1_3);
    store4(batch, row0 + 2u, col0 + 0u, c2_0); store4(batch, row0 + 2u, col0 + 4u, c2_1); store4(batch, row0 + 2u, col0 + 8u, c2_2); store4(batch, row0 + 2u, col0 + 12u, c2_3);
    store4(batch, row0 + 3u, col0 + 0u, c3_0); store4(batch, row0 + 3u, col0 + 4u, c3_1); store4(batch, row0 + 3u, col0 + 8u, c3_2); store4(batch, row0 + 3u, col0 + 12u, c3_3);
    store4(batch, row0 + 4u, col0 + 0u, c4_0); store4(batch, row0 + 4u, col0 + 4u, c4_1); store4(batch, row0 + 4u, col0 + 8u, c4_2); store4(batch, row0 + 4u, col0 + 12u, c4_3);
    store4(batch, row0 + 5u, col0 + 0u, c5_0); store4(batch, row0 + 5u, col0 + 4u, c5_1); store4(batch, row0 + 5u, col0 + 8u, c5_2); store4(batch, row0 + 5u, col0 + 12u, c5_3);
    store4(batch, row0 + 6u, col0 + 0u, c6_0); store4(batch, row0 + 6u, col0 + 4u, c6_1); store4(batch, row0 + 6u, col0 + 8u, c6_2); store4(batch, row0 + 6u, col0 + 12u, c6_3);
    store4(batch, row0 + 7u, col0 + 0u, c7_0); store4(batch, row0 + 7u, col0 + 4u, c7_1); store4(batch, row0 + 7u, col0 + 8u, c7_2); store4(batch, row0 + 7u, col0 + 12u, c7_3);
    store4(batch, row0 + 8u, col0 + 0u, c8_0); store4(batch, row0 + 8u, col0 + 4u, c8_1); store4(batch, row0 + 8u, col0 + 8u, c8_2); store4(batch, row0 + 8u, col0 + 12u, c8_3);
    store4(batch, row0 + 9u, col0 + 0u, c9_0); store4(batch, row0 + 9u, col0 + 4u, c9_1); store4(batch, row0 + 9u, col0 + 8u, c9_2); store4(batch, row0 + 9u, col0 + 12u, c9_3);
    store4(batch, row0 + 10u, col0 + 0u, c10_0); store4(batch, row0 + 10u, col0 + 4u, c10_1); store4(batch, row0 + 10u, col0 + 8u, c10_2); store4(batch, row0 + 10u, col0 + 12u, c10_3);
    store4(batch, row0 + 11u, col0 + 0u, c11_0); store4(batch, row0 + 11u, col0 + 4u, c11_1); store4(batch, row0 + 11u, col0 + 8u, c11_2); store4(batch, row0 + 11u, col0 + 12u, c11_3);
    store4(batch, row0 + 12u, col0 + 0u, c12_0); store4(batch, row0 + 12u, col0 + 4u, c12_1); store4(batch, row0 + 12u, col0 + 8u, c12_2); store4(batch, row0 + 12u, col0 + 12u, c12_3);
    store4(batch, row0 + 13u, col0 + 0u, c13_0); store4(batch, row0 + 13u, col0 + 4u, c13_1); store4(batch, row0 + 13u, col0 + 8u, c13_2); store4(batch, row0 + 13u, col0 + 12u, c13_3);
    store4(batch, row0 + 14u, col0 + 0u, c14_0); store4(batch, row0 + 14u, col0 + 4u, c14_1); store4(batch, row0 + 14u, col0 + 8u, c14_2); store4(batch, row0 + 14u, col0 + 12u, c14_3);
    store4(batch, row0 + 15u, col0 + 0u, c15_0); store4(batch, row0 + 15u, col0 + 4u, c15_1); store4(batch, row0 + 15u, col0 + 8u, c15_2); store4(batch, row0 + 15u, col0 + 12u, c15_3);
}

// Any layout of B (e.g. A·Bᵀ): scalar loads.
@compute @workgroup_size(8)
fn matmul_register(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    // Row blocks run along x: consecutive workgroups reuse the same slab of B from cache.
    let batch = wg.z;
    let row0 = wg.x * 16u;
    let col0 = wg.y * 128u + lane * 16u;
    // Clamped indices keep every load in bounds with no branch in the loop; extra rows/cols are discarded.
    let a_lo = batch * p.sa_b + min(row0 + lane, p.m - 1u) * p.sa_m;
    let a_hi = batch * p.sa_b + min(row0 + 8u + lane, p.m - 1u) * p.sa_m;
    let b_base = batch * p.sb_b;
    let bc0 = b_base + min(col0 + 0u, p.n - 1u) * p.sb_n; let bc1 = b_base + min(col0 + 1u, p.n - 1u) * p.sb_n; let bc2 = b_base + min(col0 + 2u, p.n - 1u) * p.sb_n; let bc3 = b_base + min(col0 + 3u, p.n - 1u) * p.sb_n;
    let bc4 = b_base + min(col0 + 4u, p.n - 1u) * p.sb_n; let bc5 = b_base + min(col0 + 5u, p.n - 1u) * p.sb_n; let bc6 = b_base + min(col0 + 6u, p.n - 1u) * p.sb_n; let bc7 = b_base + min(col0 + 7u, p.n - 1u) * p.sb_n;
    let bc8 = b_base + min(col0 + 8u, p.n - 1u) * p.sb_n; let bc9 = b_base + min(col0 + 9u, p.n - 1u) * p.sb_n; let bc10 = b_base + min(col0 + 10u, p.n - 1u) * p.sb_n; let bc11 = b_base + min(col0 + 11u, p.n - 1u) * p.sb_n;
    let bc12 = b_base + min(col0 + 12u, p.n - 1u) * p.sb_n; let bc13 = b_base + min(col0 + 13u, p.n - 1u) * p.sb_n; let bc14 = b_base + min(col0 + 14u, p.n - 1u) * p.sb_n; let bc15 = b_base + min(col0 + 15u, p.n - 1u) * p.sb_n;
    var c0_0 = vec4<f32>(); var c0_1 = vec4<f32>(); var c0_2 = vec4<f32>(); var c0_3 = vec4<f32>();
    var c1_0 = vec4<f32>(); var c1_1 = vec4<f32>(); var c1_2 = vec4<f32>(); var c1_3 = vec4<f32>();
    var c2_0 = vec4<f32>(); var c2_1 = vec4<f32>(); var c2_2 = vec4<f32>(); var c2_3 = vec4<f32>();
    var c3_0 = vec4<f32>(); var c3_1 = vec4<f32>(); var c3_2 = vec4<f32>(); var c3_3 = vec4<f32>();
    var c4_0 = vec4<f32>(); var c4_1 = vec4<f32>(); var c4_2 = vec4<f32>(); var c4_3 = vec4<f32>();
    var c5_0 = vec4<f32>(); var c5_1 = vec4<f32>(); var c5_2 = vec4<f32>(); var c5_3 = vec4<f32>();
    var c6_0 = vec4<f32>(); var c6_1 = vec4<f32>(); var c6_2 = vec4<f32>(); var c6_3 = vec4<f32>();
    var c7_0 = vec4<f32>(); var c7_1 = vec4<f32>(); var c7_2 = vec4<f32>(); var c7_3 = vec4<f32>();
    var c8_0 = vec4<f32>(); var c8_1 = vec4<f32>(); var c8_2 = vec4<f32>(); var c8_3 = vec4<f32>();
    var c9_0 = vec4<f32>(); var c9_1 = vec4<f32>(); var c9_2 = vec4<f32>(); var c9_3 = vec4<f32>();
    var c10_0 = vec4<f32>(); var c10_1 = vec4<f32>(); var c10_2 = vec4<f32>(); var c10_3 = vec4<f32>();
    var c11_0 = vec4<f32>(); var c11_1 = vec4<f32>(); var c11_2 = vec4<f32>(); var c11_3 = vec4<f32>();
    var c12_0 = vec4<f32>(); var c12_1 = vec4<f32>(); var c12_2 = vec4<f32>(); var c12_3 = vec4<f32>();
    var c13_0 = vec4<f32>(); var c13_1 = vec4<f32>(); var c13_2 = vec4<f32>(); var c13_3 = vec4<f32>();
    var c14_0 = vec4<f32>(); var c14_1 = vec4<f32>(); var c14_2 = vec4<f32>(); var c14_3 = vec4<f32>();
    var c15_0 = vec4<f32>(); var c15_1 = vec4<f32>(); var c15_2 = vec4<f32>(); var c15_3 = vec4<f32>();
    for (var kk = 0u; kk < p.k; kk++) {
        let bk = kk * p.sb_k;
        let b0 = vec4<f32>(B[bk + bc0], B[bk + bc1], B[bk + bc2], B[bk + bc3]);
        let b1 = vec4<f32>(B[bk + bc4], B[bk + bc5], B[bk + bc6], B[bk + bc7]);
        let b2 = vec4<f32>(B[bk + bc8], B[bk + bc9], B[bk + bc10], B[bk + bc11]);
        let b3 = vec4<f32>(B[bk + bc12], B[bk + bc13], B[bk + bc14], B[bk + bc15]);
        // Each lane loads one row's A value; broadcasts hand all 16 to every lane.
        let alo = A[a_lo + kk * p.sa_k];
        let ahi = A[a_hi + kk * p.sa_k];
        let a0 = vec4<f32>(subgroupBroadcast(alo, 0u)); c0_0 = fma(a0, b0, c0_0); c0_1 = fma(a0, b1, c0_1); c0_2 = fma(a0, b2, c0_2); c0_3 = fma(a0, b3, c0_3);
        let a1 = vec4<f32>(subgroupBroadcast(alo, 1u)); c1_0 = fma(a1, b0, c1_0); c1_1 = fma(a1, b1, c1_1); c1_2 = fma(a1, b2, c1_2); c1_3 = fma(a1, b3, c1_3);
        let a2 = vec4<f32>(subgroupBroadcast(alo, 2u)); c2_0 = fma(a2, b0, c2_0); c2_1 = fma(a2, b1, c2_1); c2_2 = fma(a2, b2, c2_2); c2_3 = fma(a2, b3, c2_3);
        let a3 = vec4<f32>(subgroupBroadcast(alo, 3u)); c3_0 = fma(a3, b0, c3_0); c3_1 = fma(a3, b1, c3_1); c3_2 = fma(a3, b2, c3_2); c3_3 = fma(a3, b3, c3_3);
        let a4 = vec4<f32>(subgroupBroadcast(alo, 4u)); c4_0 = fma(a4, b0, c4_0); c4_1 = fma(a4, b1, c4_1); c4_2 = fma(a4, b2, c4_2); c4_3 = fma(a4, b3, c4_3);
        let a5 = vec4<f32>(subgroupBroadcast(alo, 5u)); c5_0 = fma(a5, b0, c5_0); c5_1 = fma(a5, b1, c5_1); c5_2 = fma(a5, b2, c5_2); c5_3 = fma(a5, b3, c5_3);
        let a6 = vec4<f32>(subgroupBroadcast(alo, 6u)); c6_0 = fma(a6, b0, c6_0); c6_1 = fma(a6, b1, c6_1); c6_2 = fma(a6, b2, c6_2); c6_3 = fma(a6, b3, c6_3);
        let a7 = vec4<f32>(subgroupBroadcast(alo, 7u)); c7_0 = fma(a7, b0, c7_0); c7_1 = fma(a7, b1, c7_1); c7_2 = fma(a7, b2, c7_2); c7_3 = fma(a7, b3, c7_3);
        let a8 = vec4<f32>(subgroupBroadcast(ahi, 0u)); c8_0 = fma(a8, b0, c8_0); c8_1 = fma(a8, b1, c8_1); c8_2 = fma(a8, b2, c8_2); c8_3 = fma(a8, b3, c8_3);
        let a9 = vec4<f32>(subgroupBroadcast(ahi, 1u)); c9_0 = fma(a9, b0, c9_0); c9_1 = fma(a9, b1, c9_1); c9_2 = fma(a9, b2, c9_2); c9_3 = fma(a9, b3, c9_3);
        let a10 = vec4<f32>(subgroupBroadcast(ahi, 2u)); c10_0 = fma(a10, b0, c10_0); c10_1 = fma(a10, b1, c10_1); c10_2 = fma(a10, b2, c10_2); c10_3 = fma(a10, b3, c10_3);
        let a11 = vec4<f32>(subgroupBroadcast(ahi, 3u)); c11_0 = fma(a11, b0, c11_0); c11_1 = fma(a11, b1, c11_1); c11_2 = fma(a11, b2, c11_2); c11_3 = fma(a11, b3, c11_3);
        let a12 = vec4<f32>(subgroupBroadcast(ahi, 4u)); c12_0 = fma(a12, b0, c12_0); c12_1 = fma(a12, b1, c12_1); c12_2 = fma(a12, b2, c12_2); c12_3 = fma(a12, b3, c12_3);
        let a13 = vec4<f32>(subgroupBroadcast(ahi, 5u)); c13_0 = fma(a13, b0, c13_0); c13_1 = fma(a13, b1, c13_1); c13_2 = fma(a13, b2, c13_2); c13_3 = fma(a13, b3, c13_3);
        let a14 = vec4<f32>(subgroupBroadcast(ahi, 6u)); c14_0 = fma(a14, b0, c14_0); c14_1 = fma(a14, b1, c14_1); c14_2 = fma(a14, b2, c14_2); c14_3 = fma(a14, b3, c14_3);
        let a15 = vec4<f32>(subgroupBroadcast(ahi, 7u)); c15_0 = fma(a15, b0, c15_0); c15_1 = fma(a15, b1, c15_1); c15_2 = fma(a15, b2, c15_2); c15_3 = fma(a15, b3, c15_3);
    }
    store4(batch, row0 + 0u, col0 + 0u, c0_0); store4(batch, row0 + 0u, col0 + 4u, c0_1); store4(batch, row0 + 0u, col0 + 8u, c0_2); store4(batch, row0 + 0u, col0 + 12u, c0_3);
    store4(batch, row0 + 1u, col0 + 0u, c1_0); store4(batch, row0 + 1u, col0 + 4u, c1_1); store4(batch, row0 + 1u, col0 + 8u, c1_2); store4(batch, row0 + 1u, col0 + 12u, c1_3);
    store4(batch, row0 + 2u, col0 + 0u, c2_0); store4(batch, row0 + 2u, col0 + 4u, c2_1); store4(batch, row0 + 2u, col0 + 8u, c2_2); store4(batch, row0 + 2u, col0 + 12u, c2_3);
    store4(batch, row0 + 3u, col0 + 0u, c3_0); store4(batch, row0 + 3u, col0 + 4u, c3_1); store4(batch, row0 + 3u, col0 + 8u, c3_2); store4(batch, row0 + 3u, col0 + 12u, c3_3);
    store4(batch, row0 + 4u, col0 + 0u, c4_0); store4(batch, row0 + 4u, col0 + 4u, c4_1); store4(batch, row0 + 4u, col0 + 8u, c4_2); store4(batch, row0 + 4u, col0 + 12u, c4_3);
    store4(batch, row0 + 5u, col0 + 0u, c5_0); store4(batch, row0 + 5u, col0 + 4u, c5_1); store4(batch, row0 + 5u, col0 + 8u, c5_2); store4(batch, row0 + 5u, col0 + 12u, c5_3);
    store4(batch, row0 + 6u, col0 + 0u, c6_0); store4(batch, row0 + 6u, col0 + 4u, c6_1); store4(batch, row0 + 6u, col0 + 8u, c6_2); store4(batch, row0 + 6u, col0 + 12u, c6_3);
    store4(batch, row0 + 7u, col0 + 0u, c7_0); store4(batch, row0 + 7u, col0 + 4u, c7_1); store4(batch, row0 + 7u, col0 + 8u, c7_2); store4(batch, row0 + 7u, col0 + 12u, c7_3);
    store4(batch, row0 + 8u, col0 + 0u, c8_0); store4(batch, row0 + 8u, col0 + 4u, c8_1); store4(batch, row0 + 8u, col0 + 8u, c8_2); store4(batch, row0 + 8u, col0 + 12u, c8_3);
    store4(batch, row0 + 9u, col0 + 0u, c9_0); store4(batch, row0 + 9u, col0 + 4u, c9_1); store4(batch, row0 + 9u, col0 + 8u, c9_2); store4(batch, row0 + 9u, col0 + 12u, c9_3);
    store4(batch, row0 + 10u, col0 + 0u, c10_0); store4(batch, row0 + 10u, col0 + 4u, c10_1); store4(batch, row0 + 10u, col0 + 8u, c10_2); store4(batch, row0 + 10u, col0 + 12u, c10_3);
    store4(batch, row0 + 11u, col0 + 0u, c11_0); store4(batch, row0 + 11u, col0 + 4u, c11_1); store4(batch, row0 + 11u, col0 + 8u, c11_2); store4(batch, row0 + 11u, col0 + 12u, c11_3);
    store4(batch, row0 + 12u, col0 + 0u, c12_0); store4(batch, row0 + 12u, col0 + 4u, c12_1); store4(batch, row0 + 12u, col0 + 8u, c12_2); store4(batch, row0 + 12u, col0 + 12u, c12_3);
    store4(batch, row0 + 13u, col0 + 0u, c13_0); store4(batch, row0 + 13u, col0 + 4u, c13_1); store4(batch, row0 + 13u, col0 + 8u, c13_2); store4(batch, row0 + 13u, col0 + 12u, c13_3);
    store4(batch, row0 + 14u, col0 + 0u, c14_0); store4(batch, row0 + 14u, col0 + 4u, c14_1); store4(batch, row0 + 14u, col0 + 8u, c14_2); store4(batch, row0 + 14u, col0 + 12u, c14_3);
    store4(batch, row0 + 15u, col0 + 0u, c15_0); store4(batch, row0 + 15u, col0 + 4u, c15_1); store4(batch, row0 + 15u, col0 + 8u, c15_2); store4(batch, row0 + 15u, col0 + 12u, c15_3);
}
