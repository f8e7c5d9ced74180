// Blocked matmul for real GPUs: appended to matmul.wgsl at load time (engine/src/shaders.rs), so it shares Params,
// the bindings and `store`. The design of Boehm's CUDA kernel 9 ("How to optimize a CUDA matmul kernel"):
//  - a workgroup computes a BLOCK_M×BLOCK_N tile of C, staging BLOCK_K-deep slabs of A and B in workgroup memory, A transposed
//    (Sa[k][m]) so both slabs are read along their contiguous dimension as vec4s;
//  - each invocation owns a THREAD_M×THREAD_N block of outputs in registers (2D register blocking): per k it reads THREAD_M + THREAD_N
//    values from workgroup memory for THREAD_M·THREAD_N FMAs, which is what moves a matmul from memory- to compute-bound;
//  - `matmul_blocked_v4` reads the slabs from global memory as vec4 along each operand's contiguous dimension
//    (either transpose), `matmul_blocked` one float at a time for shapes whose rows are not whole vec4s.
// The tile sizes are override constants, so one source gives every candidate the autotuner times
// (engine/src/ops/matmul.rs `BlockedConfig`: bm, bn, bk, tm, tn). Limits the launcher guarantees: THREAD_M and
// THREAD_N ∈ {4, 8}; BLOCK_M % THREAD_M == 0; BLOCK_N % THREAD_N == 0; BLOCK_K % 4 == 0;
// INVOCATIONS == (BLOCK_M / THREAD_M) · (BLOCK_N / THREAD_N); BLOCK_K·BLOCK_M and BLOCK_K·BLOCK_N ≤ 2048.

override BLOCK_M: u32 = 64u;
override BLOCK_N: u32 = 64u;
override BLOCK_K: u32 = 16u;
override THREAD_M: u32 = 4u;
override THREAD_N: u32 = 4u;
override INVOCATIONS: u32 = 256u;

@group(0) @binding(0) var<storage, read> A4: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> B4: array<vec4<f32>>;

// Sized for the largest candidate: 2 × 8 KiB, within WebGPU's default 16 KiB of workgroup memory.
var<workgroup> Sa: array<vec4<f32>, 512>; // Sa[(k * BLOCK_M + m) / 4]: A's slab, transposed
var<workgroup> Sb: array<vec4<f32>, 512>; // Sb[(k * BLOCK_N + n) / 4]

// The register block: rows 0..7, columns 0..3 in c*, 4..7 in d*. Named fields, not an array: llvmpipe keeps an
// array indexed in loops in memory (5× slower, see matmul_register.wgsl), while fields read with constant names
// become registers on every compiler. Blocks of 4 rows or columns leave the rest untouched (folded away, since
// THREAD_M and THREAD_N are constants by the time the driver compiles the pipeline).
struct Acc {
    c0: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32>, c4: vec4<f32>, c5: vec4<f32>, c6: vec4<f32>, c7: vec4<f32>,
    d0: vec4<f32>, d1: vec4<f32>, d2: vec4<f32>, d3: vec4<f32>, d4: vec4<f32>, d5: vec4<f32>, d6: vec4<f32>, d7: vec4<f32>,
}

// BLOCK_K steps of the register block: per step THREAD_M values of A's column and THREAD_N of B's row (vec4 reads
// of workgroup memory) feed THREAD_M·THREAD_N FMAs.
fn multiply_slab(tx: u32, ty: u32, acc: ptr<function, Acc>) {
    for (var kk = 0u; kk < BLOCK_K; kk++) {
        let ia = (kk * BLOCK_M + ty * THREAD_M) / 4u;
        let ib = (kk * BLOCK_N + tx * THREAD_N) / 4u;
        let a0 = Sa[ia];
        let b0 = Sb[ib];
        var a1 = vec4<f32>();
        var b1 = vec4<f32>();
        if (THREAD_M == 8u) { a1 = Sa[ia + 1u]; }
        if (THREAD_N == 8u) { b1 = Sb[ib + 1u]; }
        (*acc).c0 = (*acc).c0 + vec4<f32>(a0.x) * b0;
        (*acc).c1 = (*acc).c1 + vec4<f32>(a0.y) * b0;
        (*acc).c2 = (*acc).c2 + vec4<f32>(a0.z) * b0;
        (*acc).c3 = (*acc).c3 + vec4<f32>(a0.w) * b0;
        if (THREAD_N == 8u) {
            (*acc).d0 = (*acc).d0 + vec4<f32>(a0.x) * b1;
            (*acc).d1 = (*acc).d1 + vec4<f32>(a0.y) * b1;
            (*acc).d2 = (*acc).d2 + vec4<f32>(a0.z) * b1;
            (*acc).d3 = (*acc).d3 + vec4<f32>(a0.w) * b1;
        }
        if (THREAD_M == 8u) {
            (*acc).c4 = (*acc).c4 + vec4<f32>(a1.x) * b0;
            (*acc).c5 = (*acc).c5 + vec4<f32>(a1.y) * b0;
            (*acc).c6 = (*acc).c6 + vec4<f32>(a1.z) * b0;
            (*acc).c7 = (*acc).c7 + vec4<f32>(a1.w) * b0;
            if (THREAD_N == 8u) {
                (*acc).d4 = (*acc).d4 + vec4<f32>(a1.x) * b1;
                (*acc).d5 = (*acc).d5 + vec4<f32>(a1.y) * b1;
                (*acc).d6 = (*acc).d6 + vec4<f32>(a1.z) * b1;
                (*acc).d7 = (*acc).d7 + vec4<f32>(a1.w) * b1;
            }
        }
    }
}

fn store4(batch: u32, row: u32, col: u32, v: vec4<f32>) {
    store(batch, row, col, v.x);
    store(batch, row, col + 1u, v.y);
    store(batch, row, col + 2u, v.z);
    store(batch, row, col + 3u, v.w);
}

fn store_block(batch: u32, r: u32, c: u32, acc: ptr<function, Acc>) {
    store4(batch, r, c, (*acc).c0);
    store4(batch, r + 1u, c, (*acc).c1);
    store4(batch, r + 2u, c, (*acc).c2);
    store4(batch, r + 3u, c, (*acc).c3);
    if (THREAD_N == 8u) {
        store4(batch, r, c + 4u, (*acc).d0);
        store4(batch, r + 1u, c + 4u, (*acc).d1);
        store4(batch, r + 2u, c + 4u, (*acc).d2);
        store4(batch, r + 3u, c + 4u, (*acc).d3);
    }
    if (THREAD_M == 8u) {
        store4(batch, r + 4u, c, (*acc).c4);
        store4(batch, r + 5u, c, (*acc).c5);
        store4(batch, r + 6u, c, (*acc).c6);
        store4(batch, r + 7u, c, (*acc).c7);
        if (THREAD_N == 8u) {
            store4(batch, r + 4u, c + 4u, (*acc).d4);
            store4(batch, r + 5u, c + 4u, (*acc).d5);
            store4(batch, r + 6u, c + 4u, (*acc).d6);
            store4(batch, r + 7u, c + 4u, (*acc).d7);
        }
    }
}

// Writes one float of the transposed A slab / the B slab (a scatter when the operand's contiguous dimension is
// the other one).
fn put_a(kk: u32, mm: u32, v: f32) { Sa[(kk * BLOCK_M + mm) / 4u][mm % 4u] = v; }
fn put_b(kk: u32, nn: u32, v: f32) { Sb[(kk * BLOCK_N + nn) / 4u][nn % 4u] = v; }

@compute @workgroup_size(INVOCATIONS)
fn matmul_blocked_v4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let batch = wg.z;
    let row0 = wg.y * BLOCK_M;
    let col0 = wg.x * BLOCK_N;
    let tx = tid % (BLOCK_N / THREAD_N);
    let ty = tid / (BLOCK_N / THREAD_N);
    let a_base = batch * p.sa_b;
    let b_base = batch * p.sb_b;
    var acc: Acc;
    for (var k0 = 0u; k0 < p.k; k0 += BLOCK_K) {
        // A slab, BLOCK_M×BLOCK_K: vec4s along k (row-major A: scattered into the transposed slab) or along m (stored Aᵀ).
        for (var e = tid; e < BLOCK_M * BLOCK_K / 4u; e += INVOCATIONS) {
            if (p.sa_k == 1u) {
                let mm = e / (BLOCK_K / 4u);
                let kk = 4u * (e % (BLOCK_K / 4u));
                var v = vec4<f32>();
                if (row0 + mm < p.m && k0 + kk < p.k) { v = A4[(a_base + (row0 + mm) * p.sa_m + k0 + kk) / 4u]; }
                put_a(kk, mm, v.x); put_a(kk + 1u, mm, v.y); put_a(kk + 2u, mm, v.z); put_a(kk + 3u, mm, v.w);
            } else {
                let kk = e / (BLOCK_M / 4u);
                let mm = 4u * (e % (BLOCK_M / 4u));
                var v = vec4<f32>();
                if (k0 + kk < p.k && row0 + mm < p.m) { v = A4[(a_base + (k0 + kk) * p.sa_k + row0 + mm) / 4u]; }
                Sa[(kk * BLOCK_M + mm) / 4u] = v;
            }
        }
        // B slab, BLOCK_K×BLOCK_N: vec4s along n (row-major B) or along k (stored Bᵀ: scattered).
        for (var e = tid; e < BLOCK_N * BLOCK_K / 4u; e += INVOCATIONS) {
            if (p.sb_n == 1u) {
                let kk = e / (BLOCK_N / 4u);
                let nn = 4u * (e % (BLOCK_N / 4u));
                var v = vec4<f32>();
                if (k0 + kk < p.k && col0 + nn < p.n) { v = B4[(b_base + (k0 + kk) * p.sb_k + col0 + nn) / 4u]; }
                Sb[(kk * BLOCK_N + nn) / 4u] = v;
            } else {
                let nn = e / (BLOCK_K / 4u);
                let kk = 4u * (e % (BLOCK_K / 4u));
                var v = vec4<f32>();
                if (col0 + nn < p.n && k0 + kk < p.k) { v = B4[(b_base + (col0 + nn) * p.sb_n + k0 + kk) / 4u]; }
                put_b(kk, nn, v.x); put_b(kk + 1u, nn, v.y); put_b(kk + 2u, nn, v.z); put_b(kk + 3u, nn, v.w);
            }
        }
        workgroupBarrier();
        multiply_slab(tx, ty, &acc);
        workgroupBarrier();
    }
    store_block(batch, row0 + ty * THREAD_M, col0 + tx * THREAD_N, &acc);
}

@compute @workgroup_size(INVOCATIONS)
fn matmul_blocked(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let batch = wg.z;
    let row0 = wg.y * BLOCK_M;
    let col0 = wg.x * BLOCK_N;
    let tx = tid % (BLOCK_N / THREAD_N);
    let ty = tid / (BLOCK_N / THREAD_N);
    let a_base = batch * p.sa_b;
    let b_base = batch * p.sb_b;
    var acc: Acc;
    for (var k0 = 0u; k0 < p.k; k0 += BLOCK_K) {
        // Consecutive invocations walk each operand's contiguous dimension, so global reads coalesce.
        for (var e = tid; e < BLOCK_M * BLOCK_K; e += INVOCATIONS) {
            var kk = e % BLOCK_K;
            var mm = e / BLOCK_K;
            if (p.sa_k != 1u) { kk = e / BLOCK_M; mm = e % BLOCK_M; }
            var v = 0.0;
            if (row0 + mm < p.m && k0 + kk < p.k) { v = A[a_base + (row0 + mm) * p.sa_m + (k0 + kk) * p.sa_k]; }
            put_a(kk, mm, v);
        }
        for (var e = tid; e < BLOCK_N * BLOCK_K; e += INVOCATIONS) {
            var kk = e / BLOCK_N;
            var nn = e % BLOCK_N;
            if (p.sb_n != 1u) { kk = e % BLOCK_K; nn = e / BLOCK_K; }
            var v = 0.0;
            if (k0 + kk < p.k && col0 + nn < p.n) { v = B[b_base + (k0 + kk) * p.sb_k + (col0 + nn) * p.sb_n]; }
            put_b(kk, nn, v);
        }
        workgroupBarrier();
        multiply_slab(tx, ty, &acc);
        workgroupBarrier();
    }
    store_block(batch, row0 + ty * THREAD_M, col0 + tx * THREAD_N, &acc);
}
