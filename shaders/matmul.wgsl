// Batched matmul: C[b] = alpha * op(A[b]) · op(B[b]) + beta * C[b] + bias, op = optional transpose.
// Transposes and batch broadcast are expressed as element strides, so Aᵀ·B and A·Bᵀ (the backward pass) need no
// transpose copies. Two designs for two kinds of hardware, picked per adapter in engine/src/ops/matmul.rs:
//  - matmul_tiled: 64×64 workgroup tile staged in workgroup memory, 4×4 outputs per invocation (real GPUs).
//  - matmul_register: no workgroup memory, no barriers; 8 invocations each own 16×8 outputs in registers and every
//    A load has a workgroup-uniform address (software GPUs such as lavapipe, where non-uniform loads are scalar
//    loops over the SIMD lanes and barriers split the shader).

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    sa_b: u32, sa_m: u32, sa_k: u32,
    sb_b: u32, sb_k: u32, sb_n: u32,
    sc_b: u32, has_bias: u32,
    alpha: f32, beta: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> A: array<f32>;
@group(0) @binding(1) var<storage, read> B: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> C: array<f32>;

fn store(batch: u32, row: u32, col: u32, v: f32) {
    if (row >= p.m || col >= p.n) { return; }
    let i = batch * p.sc_b + row * p.n + col;
    var r = p.alpha * v;
    if (p.has_bias != 0u) { r += bias[col]; }
    // beta == 0 must not read C: it may hold NaN from an earlier use of the buffer.
    if (p.beta != 0.0) { r += p.beta * C[i]; }
    C[i] = r;
}

// ---- tiled (workgroup memory) ----------------------------------------------------------------------------
const TILE: u32 = 64u;
const BK: u32 = 16u;
var<workgroup> As: array<f32, 1024>; // [BK][TILE]: As[kk * TILE + row]
var<workgroup> Bs: array<f32, 1024>; // [BK][TILE]: Bs[kk * TILE + col]

@compute @workgroup_size(16, 16)
fn matmul_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let batch = wg.z;
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    let a_base = batch * p.sa_b;
    let b_base = batch * p.sb_b;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var e = lid; e < TILE * BK; e += 256u) {
            // A tile: consecutive invocations walk k when A is row-major (sa_k == 1), m when transposed.
            var kk = e % BK;
            var mm = e / BK;
            if (p.sa_k != 1u) { kk = e / TILE; mm = e % TILE; }
            let ar = row0 + mm;
            let ac = k0 + kk;
            var av = 0.0;
            if (ar < p.m && ac < p.k) { av = A[a_base + ar * p.sa_m + ac * p.sa_k]; }
            As[kk * TILE + mm] = av;
            var bk = e / TILE;
            var bn = e % TILE;
            if (p.sb_n != 1u) { bk = e % BK; bn = e / BK; }
            let br = k0 + bk;
            let bc = col0 + bn;
            var bv = 0.0;
            if (br < p.k && bc < p.n) { bv = B[b_base + br * p.sb_k + bc * p.sb_n]; }
            Bs[bk * TILE + bn] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = As[kk * TILE + lid3.y + 16u * i];
                b[i] = Bs[kk * TILE + lid3.x + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] = fma(a[i], b[j], acc[i * 4u + j]);
                }
            }
        }
        workgroupBarrier();
    }
    // Rows/cols interleaved by 16 so neighbouring invocations touch neighbouring workgroup-memory words.
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            store(batch, row0 + lid3.y + 16u * i, col0 + lid3.x + 16u * j, acc[i * 4u + j]);
        }
    }
}

// ---- register tiles, no workgroup memory ------------------------------------------------------------------
const RM: u32 = 16u; // rows per workgroup (uniform across its 8 invocations)
const RN: u32 = 8u;  // columns per invocation; a workgroup covers 64 columns

@compute @workgroup_size(8)
fn matmul_register(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let batch = wg.z;
    let row0 = wg.y * RM;
    let col0 = wg.x * (RN * 8u) + lid * RN;
    // Clamped indices keep every load in bounds without branches in the inner loop; the extra rows and columns
    // compute garbage that `store` discards. Addresses are recomputed rather than kept in private arrays: a
    // private array is per-lane memory to llvmpipe, and loads through it lose their proven uniformity.
    let a_base = batch * p.sa_b;
    let b_base = batch * p.sb_b;
    let mlast = p.m - 1u;
    let nlast = p.n - 1u;
    var acc: array<vec4<f32>, 32>; // row r: acc[2r] = cols 0..3, acc[2r+1] = cols 4..7
    for (var kk = 0u; kk < p.k; kk++) {
        let bk = b_base + kk * p.sb_k;
        let b0 = vec4<f32>(B[bk + min(col0, nlast) * p.sb_n], B[bk + min(col0 + 1u, nlast) * p.sb_n],
                           B[bk + min(col0 + 2u, nlast) * p.sb_n], B[bk + min(col0 + 3u, nlast) * p.sb_n]);
        let b1 = vec4<f32>(B[bk + min(col0 + 4u, nlast) * p.sb_n], B[bk + min(col0 + 5u, nlast) * p.sb_n],
                           B[bk + min(col0 + 6u, nlast) * p.sb_n], B[bk + min(col0 + 7u, nlast) * p.sb_n]);
        let ak = a_base + kk * p.sa_k;
        for (var r = 0u; r < RM; r++) {
            let a = vec4<f32>(A[ak + min(row0 + r, mlast) * p.sa_m]);
            acc[2u * r] = fma(a, b0, acc[2u * r]);
            acc[2u * r + 1u] = fma(a, b1, acc[2u * r + 1u]);
        }
    }
    for (var r = 0u; r < RM; r++) {
        for (var j = 0u; j < 4u; j++) {
            store(batch, row0 + r, col0 + j, acc[2u * r][j]);
            store(batch, row0 + r, col0 + 4u + j, acc[2u * r + 1u][j]);
        }
    }
}
