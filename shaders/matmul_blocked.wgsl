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
// THREAD_N ∈ {4, 8, 16}; BLOCK_M % THREAD_M == 0; BLOCK_N % THREAD_N == 0; BLOCK_K % 4 == 0;
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

// The register block: up to 16 rows (r0..r15) of up to 16 columns (four vec4s c0..c3 per row). Named fields, not
// arrays: llvmpipe keeps an array indexed in loops in memory (5× slower, see matmul_register.wgsl), while fields
// read with constant names become registers on every compiler. Rows and columns past THREAD_M, THREAD_N are never
// touched (the guards fold away: the overrides are constants by the time the driver compiles the pipeline).
struct Row { c0: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32> }
struct Acc {
    r0: Row, r1: Row, r2: Row, r3: Row, r4: Row, r5: Row, r6: Row, r7: Row,
    r8: Row, r9: Row, r10: Row, r11: Row, r12: Row, r13: Row, r14: Row, r15: Row,
}
// Up to 16 consecutive values of A's column or B's row, as vec4s.
struct Frag { v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32> }

fn row_fma(a: f32, b: Frag, r: Row) -> Row {
    var o = r;
    let av = vec4<f32>(a);
    o.c0 = fma(av, b.v0, o.c0);
    if (THREAD_N > 4u) { o.c1 = fma(av, b.v1, o.c1); }
    if (THREAD_N > 8u) { o.c2 = fma(av, b.v2, o.c2); o.c3 = fma(av, b.v3, o.c3); }
    return o;
}

// THREAD_N values of B's slab row starting at vec4 index i (A's fragment: `frag_a`, in matmul_blocked_a*.wgsl).
fn frag_b(i: u32) -> Frag {
    var f: Frag;
    f.v0 = Sb[i];
    if (THREAD_N > 4u) { f.v1 = Sb[i + 1u]; }
    if (THREAD_N > 8u) { f.v2 = Sb[i + 2u]; f.v3 = Sb[i + 3u]; }
    return f;
}

// BLOCK_K steps of the register block: per step THREAD_M values of A's column and THREAD_N of B's row (vec4 reads
// of workgroup memory) feed THREAD_M·THREAD_N FMAs. The bigger the block, the fewer reads per FMA: what a software
// GPU, which reads workgroup memory lane by lane, is bound by.
fn multiply_slab(tx: u32, ty: u32, acc_in: Acc) -> Acc {
    var acc = acc_in;
    for (var kk = 0u; kk < BLOCK_K; kk++) {
        let a = frag_a((kk * BLOCK_M + ty * THREAD_M) / 4u, tx);
        let b = frag_b((kk * BLOCK_N + tx * THREAD_N) / 4u);
        acc.r0 = row_fma(a.v0.x, b, acc.r0);
        acc.r1 = row_fma(a.v0.y, b, acc.r1);
        acc.r2 = row_fma(a.v0.z, b, acc.r2);
        acc.r3 = row_fma(a.v0.w, b, acc.r3);
        if (THREAD_M > 4u) {
            acc.r4 = row_fma(a.v1.x, b, acc.r4);
            acc.r5 = row_fma(a.v1.y, b, acc.r5);
            acc.r6 = row_fma(a.v1.z, b, acc.r6);
            acc.r7 = row_fma(a.v1.w, b, acc.r7);
        }
        if (THREAD_M > 8u) {
            acc.r8 = row_fma(a.v2.x, b, acc.r8);
            acc.r9 = row_fma(a.v2.y, b, acc.r9);
            acc.r10 = row_fma(a.v2.z, b, acc.r10);
            acc.r11 = row_fma(a.v2.w, b, acc.r11);
            acc.r12 = row_fma(a.v3.x, b, acc.r12);
            acc.r13 = row_fma(a.v3.y, b, acc.r13);
            acc.r14 = row_fma(a.v3.z, b, acc.r14);
            acc.r15 = row_fma(a.v3.w, b, acc.r15);
        }
    }
    return acc;
}

fn store4(batch: u32, row: u32, col: u32, v: vec4<f32>) {
    store(batch, row, col, v.x);
    store(batch, row, col + 1u, v.y);
    store(batch, row, col + 2u, v.z);
    store(batch, row, col + 3u, v.w);
}

fn store_row(batch: u32, r: u32, c: u32, row: Row) {
    store4(batch, r, c, row.c0);
    if (THREAD_N > 4u) { store4(batch, r, c + 4u, row.c1); }
    if (THREAD_N > 8u) { store4(batch, r, c + 8u, row.c2); store4(batch, r, c + 12u, row.c3); }
}

fn store_block(batch: u32, r: u32, c: u32, acc: Acc) {
    store_row(batch, r, c, acc.r0);
    store_row(batch, r + 1u, c, acc.r1);
    store_row(batch, r + 2u, c, acc.r2);
    store_row(batch, r + 3u, c, acc.r3);
    if (THREAD_M > 4u) {
        store_row(batch, r + 4u, c, acc.r4);
        store_row(batch, r + 5u, c, acc.r5);
        store_row(batch, r + 6u, c, acc.r6);
        store_row(batch, r + 7u, c, acc.r7);
    }
    if (THREAD_M > 8u) {
        store_row(batch, r + 8u, c, acc.r8);
        store_row(batch, r + 9u, c, acc.r9);
        store_row(batch, r + 10u, c, acc.r10);
        store_row(batch, r + 11u, c, acc.r11);
        store_row(batch, r + 12u, c, acc.r12);
        store_row(batch, r + 13u, c, acc.r13);
        store_row(batch, r + 14u, c, acc.r14);
        store_row(batch, r + 15u, c, acc.r15);
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
        acc = multiply_slab(tx, ty, acc);
        workgroupBarrier();
    }
    store_block(batch, row0 + ty * THREAD_M, col0 + tx * THREAD_N, acc);
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
        acc = multiply_slab(tx, ty, acc);
        workgroupBarrier();
    }
    store_block(batch, row0 + ty * THREAD_M, col0 + tx * THREAD_N, acc);
}
