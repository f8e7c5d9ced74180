// Column blocks for the chunked classifier (engine/src/ops/classifier.rs): when the output weight W [V, C] is larger
// than one storage binding it is used in row parts, and each part's logits [R, Vp] are a column block of the
// chunk's logits [R, V]. dst[r, dst_col + j] = src[r, src_col + j] for r < rows, j < cols; one invocation per
// element, 1-D folded into x/y (one grid dimension holds at most 65535 workgroups).

struct Params {
    rows: u32,
    cols: u32,
    src_ld: u32,
    src_col: u32,
    dst_ld: u32,
    dst_col: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn copy_columns(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * WG + lid;
    if (i >= p.rows * p.cols) { return; }
    let r = i / p.cols;
    let j = i % p.cols;
    dst[r * p.dst_ld + p.dst_col + j] = src[r * p.src_ld + p.src_col + j];
}
