// Reductions: sum / sum of squares of a whole tensor, and column sums of a [rows, cols] matrix.
// Every pass shrinks its input by a fixed factor into a partials buffer; the host repeats passes until one value
// (or one row) is left. The tree shape depends only on the sizes, never on scheduling: results are bit-reproducible.

struct Params {
    n: u32,          // elements (sum_blocks) or rows (sum_rows_blocks)
    cols: u32,       // sum_rows_blocks: columns
    col_blocks: u32, // sum_rows_blocks: workgroups across the columns
    square: u32,     // sum_blocks: 1 squares each element as it is loaded (first pass of sum_squares)
    scale: f32,      // multiplies the value written (1/n on the last pass of mean, else 1)
    root: u32,       // sum_blocks: 1 writes the square root (last pass of a norm)
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;
// Elements each thread adds before the workgroup tree (1, 2 or 4). The launcher uses 4; tests lower it to reach
// the folded grid with an input that still fits one storage binding on a software GPU.
override ITEMS: u32 = 4u;

var<workgroup> tree: array<f32, 256>;

// Workgroup index on a grid folded into x/y (one dimension holds at most 65535 workgroups).
fn group_index(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

fn load(i: u32) -> f32 {
    if (i >= p.n) {
        return 0.0;
    }
    let v = x[i];
    return select(v, v * v, p.square != 0u);
}

// out[block] = sum of x[block * WG * ITEMS ..][..WG * ITEMS]. Loads are strided by WG so neighbouring threads
// read neighbouring addresses; the ITEMS values a thread loads are added pairwise, then an 8-level tree.
@compute @workgroup_size(256)
fn sum_blocks(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let block = group_index(wg, nwg);
    let base = block * (WG * ITEMS) + lid;
    var s = load(base);
    if (ITEMS >= 2u) {
        s = s + load(base + WG);
    }
    if (ITEMS >= 4u) {
        s = s + (load(base + 2u * WG) + load(base + 3u * WG));
    }
    tree[lid] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride >> 1u) {
        if (lid < stride) {
            tree[lid] = tree[lid] + tree[lid + stride];
        }
        workgroupBarrier();
    }
    // The folded grid may hold a few workgroups past the last block.
    if (lid == 0u && block * (WG * ITEMS) < p.n) {
        let total = tree[0] * p.scale;
        out[block] = select(total, sqrt(total), p.root != 0u);
    }
}

// Column sums, RC columns by RR row lanes per workgroup; each lane adds ROW_ITEMS rows pairwise, then a tree over
// the lanes. Threads with consecutive lid read consecutive columns of one row (coalesced).
const RC: u32 = 32u;
const RR: u32 = 8u;
const ROW_ITEMS: u32 = 4u;
const ROWS_PER_BLOCK: u32 = 32u; // RR * ROW_ITEMS

fn load_rc(r: u32, c: u32) -> f32 {
    if (r >= p.n || c >= p.cols) {
        return 0.0;
    }
    return x[r * p.cols + c];
}

// out[row_block, c] = sum of x[row_block * ROWS_PER_BLOCK ..][..ROWS_PER_BLOCK, c].
@compute @workgroup_size(256)
fn sum_rows_blocks(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = group_index(wg, nwg);
    let col_block = id % p.col_blocks;
    let row_block = id / p.col_blocks;
    let c = col_block * RC + lid % RC;
    let r = row_block * ROWS_PER_BLOCK + lid / RC;
    let s = (load_rc(r, c) + load_rc(r + RR, c)) + (load_rc(r + 2u * RR, c) + load_rc(r + 3u * RR, c));
    tree[lid] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride >= RC; stride = stride >> 1u) {
        if (lid < stride) {
            tree[lid] = tree[lid] + tree[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid < RC && c < p.cols && row_block * ROWS_PER_BLOCK < p.n) {
        out[row_block * p.cols + c] = tree[lid] * p.scale;
    }
}
