// Peak probes for the profiler's "% of peak" column: how fast this adapter does FMAs and moves memory, measured
// with kernels that do nothing else. `fma_peak`: 8 independent vec4 FMA chains per invocation (enough to hide
// the FMA latency), 2·4·8·iters FLOPs each. `copy_peak`: one vec4 read and one vec4 write per invocation.

struct Params {
    n: u32,
    iters: u32,
    a: f32,
    b: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
// fma_peak binds its output alone, at binding 0 (entry points may share a binding number with other types).
@group(0) @binding(0) var<storage, read_write> fma_out: array<vec4<f32>>;

const WG: u32 = 256u;

fn index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * WG + lid;
}

// x ← x·a + b on every chain; chain j starts at (i + j) / n so no two are equal and none is constant-folded.
@compute @workgroup_size(256)
fn fma_peak(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let a = vec4<f32>(p.a);
    let b = vec4<f32>(p.b);
    let base = vec4<f32>(f32(i), f32(i) + 0.25, f32(i) + 0.5, f32(i) + 0.75) / f32(p.n);
    var x0 = base; var x1 = base + 1.0; var x2 = base + 2.0; var x3 = base + 3.0;
    var x4 = base + 4.0; var x5 = base + 5.0; var x6 = base + 6.0; var x7 = base + 7.0;
    for (var k = 0u; k < p.iters; k++) {
        x0 = fma(x0, a, b); x1 = fma(x1, a, b); x2 = fma(x2, a, b); x3 = fma(x3, a, b);
        x4 = fma(x4, a, b); x5 = fma(x5, a, b); x6 = fma(x6, a, b); x7 = fma(x7, a, b);
    }
    fma_out[i] = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
}

@compute @workgroup_size(256)
fn copy_peak(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { dst[i] = src[i]; }
}
