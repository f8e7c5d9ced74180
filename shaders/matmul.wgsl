// Batched matmul: C[b] = alpha * op(A[b]) · op(B[b]) + beta * C[b] + bias, op = optional transpose.
// Transposes and batch broadcast are expressed as element strides, so Aᵀ·B and A·Bᵀ (the backward pass) need no
// transpose copies. Two designs for two kinds of hardware, picked per adapter in engine/src/ops/matmul.rs:
//  - matmul_tiled (here): 64×64 workgroup tile staged in workgroup memory, 4×4 outputs per invocation (real GPUs).
//  - matmul_register(_v4) (matmul_register.wgsl): register tiles, no workgroup memory, for software GPUs.

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
