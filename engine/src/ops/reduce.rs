//! Reductions: sum, mean and sum of squares of a whole tensor, and column sums (`sum_rows`, the bias gradient).
//! Multi-pass trees with a fixed shape, so the same input always gives bit-identical results.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::{fits_u32, grid_1d, nonempty};
use crate::shaders::REDUCE;
use crate::{DType, Error, Gpu, Result, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    cols: u32,
    col_blocks: u32,
    square: u32,
    scale: f32,
    root: u32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { n, cols, col_blocks, square, scale, root })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// Threads per workgroup (`WG` in the WGSL).
const WG: usize = 256;
/// Elements each thread of `sum_blocks` adds before the tree (`ITEMS` override); 1024 elements per workgroup.
pub(crate) const ITEMS: usize = 4;
/// Columns and rows one `sum_rows_blocks` workgroup covers (`RC`, `ROWS_PER_BLOCK` in the WGSL).
const ROW_COLS: usize = 32;
const ROWS_PER_BLOCK: usize = 32;

/// Sum of all elements → a [1] tensor. Deterministic (fixed reduction tree, no atomics): the same input gives
/// bit-identical output on every run.
pub fn sum(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    reduce_all(gpu, "sum", x, false, 1.0, ITEMS, false)
}

/// Mean of all elements → [1]: the tree sum times 1/n (rounded to f32 once).
pub fn mean(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let scale = (1.0 / x.numel().max(1) as f64) as f32;
    reduce_all(gpu, "mean", x, false, scale, ITEMS, false)
}

/// Sum of squares of all elements → [1] (gradient-norm clipping builds on it).
pub fn sum_squares(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    reduce_all(gpu, "sum_squares", x, true, 1.0, ITEMS, false)
}

/// `items` is the per-thread count of the first-level loads (1, 2 or 4); only tests pick anything but `ITEMS`.
#[allow(clippy::too_many_arguments)]
fn reduce_all(
    gpu: &Gpu,
    op: &'static str,
    x: &Tensor,
    square: bool,
    scale: f32,
    items: usize,
    root: bool,
) -> Result<Tensor> {
    nonempty(op, "input", x)?;
    expect_dtype(op, "input", x, DType::F32)?;
    if x.bytes() > gpu.max_binding() {
        // Larger than one binding: one partial per aligned range, then the same tree over the partials. Still a
        // fixed order, so still deterministic.
        let parts = gpu.split_rows(op, x.numel(), 1)?;
        let partials = gpu.alloc(&[parts.len()], DType::F32)?;
        for (i, &(lo, hi)) in parts.iter().enumerate() {
            let s = reduce_all(gpu, op, &x.view(lo, &[hi - lo])?, square, 1.0, items, false)?;
            gpu.copy_elements(&s, 0, &partials, i, 1)?;
        }
        return reduce_all(gpu, op, &partials, false, scale, ITEMS, root);
    }
    let mut n = fits_u32(op, "input", x.numel())? as usize;
    let mut cur = x.clone();
    let mut first = true;
    loop {
        let per_group = WG * if first { items } else { ITEMS };
        let blocks = n.div_ceil(per_group);
        let out = gpu.alloc(&[blocks], DType::F32)?;
        let params = Params {
            n: n as u32,
            cols: 0,
            col_blocks: 0,
            square: (square && first) as u32,
            scale: if blocks == 1 { scale } else { 1.0 },
            root: (root && blocks == 1) as u32,
        };
        let overrides = [("ITEMS", (per_group / WG) as f64)];
        gpu.dispatch(&Launch {
            op,
            flops: 0,
            shader: &REDUCE,
            entry: "sum_blocks",
            overrides: &overrides,
            args: &[&cur, &out],
            params: bytemuck::bytes_of(&params),
            groups: grid_1d(n, per_group as u32),
        })?;
        if blocks == 1 {
            return Ok(out);
        }
        // Dropping the previous partials is safe mid-encoder: commands run in record order and wgpu keeps
        // recorded buffers alive until they finish.
        (cur, n, first) = (out, blocks, false);
    }
}

/// The global L2 norm of several tensors (all of a model's gradients) → [1], entirely on the GPU: a sum of squares
/// per tensor, each copied into its slot of a [P] vector, then one more tree with a square root. No readback, so
/// gradient clipping can scale by it inside the step. Deterministic like the other reductions.
pub fn global_norm(gpu: &Gpu, tensors: &[&Tensor]) -> Result<Tensor> {
    let op = "global_norm";
    if tensors.is_empty() {
        return Err(Error::Invalid { op, message: "no tensors given".into() });
    }
    let partials = gpu.alloc(&[tensors.len()], DType::F32)?;
    for (i, t) in tensors.iter().enumerate() {
        let s = sum_squares(gpu, t)?;
        gpu.copy_elements(&s, 0, &partials, i, 1)?;
    }
    reduce_all(gpu, op, &partials, false, 1.0, ITEMS, true)
}

/// Column sums of a [N, C] tensor (leading dims flattened) → [C]; the matmul backward uses this for dbias.
/// Deterministic. Rank-1 inputs are refused: whether [C] means one row or one column is the caller's call.
pub fn sum_rows(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let op = "sum_rows";
    nonempty(op, "input", x)?;
    expect_dtype(op, "input", x, DType::F32)?;
    let shape = x.shape();
    if shape.len() < 2 {
        return Err(Error::Shape {
            op,
            what: "input rank",
            expected: "[N, C] or more dimensions".into(),
            got: format!("{shape:?}"),
        });
    }
    fits_u32(op, "input", x.numel())?;
    let cols = shape[shape.len() - 1];
    let mut rows = x.numel() / cols;
    let col_blocks = cols.div_ceil(ROW_COLS);
    let mut cur = x.clone();
    loop {
        let row_blocks = rows.div_ceil(ROWS_PER_BLOCK);
        let out = gpu.alloc(&[row_blocks, cols], DType::F32)?;
        let params =
            Params { n: rows as u32, cols: cols as u32, col_blocks: col_blocks as u32, square: 0, scale: 1.0, root: 0 };
        gpu.dispatch(&Launch {
            op,
            flops: 0,
            shader: &REDUCE,
            entry: "sum_rows_blocks",
            overrides: &[],
            args: &[&cur, &out],
            params: bytemuck::bytes_of(&params),
            groups: grid_1d(row_blocks * col_blocks, 1),
        })?;
        if row_blocks == 1 {
            return out.reshape(&[cols]);
        }
        (cur, rows) = (out, row_blocks);
    }
}

pub mod cpu {
    pub fn sum(x: &[f64]) -> f64 {
        x.iter().sum()
    }

    pub fn mean(x: &[f64]) -> f64 {
        sum(x) / x.len() as f64
    }

    pub fn sum_squares(x: &[f64]) -> f64 {
        x.iter().map(|v| v * v).sum()
    }

    /// Column sums of row-major [rows, cols].
    pub fn global_norm(tensors: &[&[f64]]) -> f64 {
        tensors.iter().map(|t| sum_squares(t)).sum::<f64>().sqrt()
    }

    pub fn sum_rows(x: &[f64], cols: usize) -> Vec<f64> {
        let mut out = vec![0.0; cols];
        for row in x.chunks(cols) {
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{gpu, random_vec, to_f64, SIZES_1D};

    /// A summation tree of depth d over values x_i errs by at most d·u·Σ|x_i| (u = 2^-24, one rounding per level).
    /// Depth here is ceil(log2 n) plus one level per pass for the partial that covers a ragged tail; `extra`
    /// counts further roundings (a square, the 1/n scale) relative to the result itself.
    fn assert_tree_error(got: f32, want: f64, abs_sum: f64, n: usize, extra: f64, what: &str) {
        let u = f32::EPSILON as f64 / 2.0;
        let depth = (n as f64).log2().ceil() + 4.0;
        let bound = depth * u * abs_sum + extra * u * want.abs() + f64::from(f32::MIN_POSITIVE);
        let err = (got as f64 - want).abs();
        assert!(err <= bound, "{what} n={n}: got {got}, f64 reference {want}, error {err:e} > bound {bound:e}");
    }

    fn check_all(x: &[f32], items: usize) {
        let gpu = gpu();
        let n = x.len();
        let t = gpu.upload(x, &[n]).unwrap();
        let xd = to_f64(x);
        let abs: Vec<f64> = xd.iter().map(|v| v.abs()).collect();
        let got = gpu.read(&reduce_all(gpu, "sum", &t, false, 1.0, items, false).unwrap()).unwrap();
        assert_eq!(got.len(), 1);
        assert_tree_error(got[0], cpu::sum(&xd), cpu::sum(&abs), n, 0.0, "sum");
        let got = gpu.read(&mean(gpu, &t).unwrap()).unwrap()[0];
        // Mean adds two roundings (1/n to f32, then the product) relative to the result.
        assert_tree_error(got, cpu::mean(&xd), cpu::mean(&abs), n, 2.0, "mean");
        let got = gpu.read(&sum_squares(gpu, &t).unwrap()).unwrap()[0];
        // All terms are positive, so the bound is relative; squaring rounds once more per element.
        let sq = cpu::sum_squares(&xd);
        assert_tree_error(got, sq, sq, n, 1.0, "sum_squares");
    }

    #[test]
    fn sum_mean_sum_squares_match_reference() {
        for (case, &n) in SIZES_1D.iter().chain(&[1024, 1025, 1_048_576 + 1, 2_000_003]).enumerate() {
            check_all(&random_vec(n, 300 + case as u64), ITEMS);
        }
        // Ones: every partial is an integer below 2^24, so the sum is exact and one lost element shows.
        let n = 3_000_001;
        let gpu = gpu();
        let t = gpu.upload(&vec![1.0; n], &[n]).unwrap();
        assert_eq!(gpu.read(&sum(gpu, &t).unwrap()).unwrap(), [n as f32]);
        assert_eq!(gpu.read(&sum_squares(gpu, &t).unwrap()).unwrap(), [n as f32]);
        // 1/n rounds to f32 once and the product once more: within 1 ulp of 1.
        assert!((gpu.read(&mean(gpu, &t).unwrap()).unwrap()[0] - 1.0).abs() <= f32::EPSILON);
    }

    #[test]
    fn sum_folds_grid_past_65535_workgroups() {
        // One element per thread puts 65536 * 256 + 1 elements (64 MiB, under lavapipe's 128 MiB binding) on a
        // grid of 65537 workgroups, so the first pass runs folded into y.
        let n: usize = 65_536 * WG + 1;
        assert!(n.div_ceil(WG) > 65_535);
        // Odd blocks hold ones, even blocks zeros, the last element 1: every partial is an integer below 2^24, so
        // the sum is exact and a lost or doubled block (the last two live in grid row y = 1) changes it.
        let mut x: Vec<f32> = (0..n).map(|i| ((i / WG) % 2) as f32).collect();
        x[n - 1] = 1.0;
        let want = (WG * 32_768 + 1) as f32;
        let gpu = gpu();
        let t = gpu.upload(&x, &[n]).unwrap();
        assert_eq!(gpu.read(&reduce_all(gpu, "sum", &t, false, 1.0, 1, false).unwrap()).unwrap(), [want]);
        assert_eq!(gpu.read(&reduce_all(gpu, "sum_squares", &t, true, 1.0, 1, false).unwrap()).unwrap(), [want]);
    }

    #[test]
    fn sum_is_bit_identical_across_runs() {
        let gpu = gpu();
        let n = 1 << 20;
        let t = gpu.upload(&random_vec(n, 7), &[n]).unwrap();
        let a = gpu.read(&sum(gpu, &t).unwrap()).unwrap()[0];
        let b = gpu.read(&sum(gpu, &t).unwrap()).unwrap()[0];
        assert_eq!(a.to_bits(), b.to_bits());
    }

    fn check_rows(shape: &[usize], seed: u64) {
        let gpu = gpu();
        let n: usize = shape.iter().product();
        let cols = shape[shape.len() - 1];
        let rows = n / cols;
        let x = random_vec(n, seed);
        let got = gpu.read(&sum_rows(gpu, &gpu.upload(&x, shape).unwrap()).unwrap()).unwrap();
        assert_eq!(got.len(), cols);
        let xd = to_f64(&x);
        let want = cpu::sum_rows(&xd, cols);
        let abs = cpu::sum_rows(&xd.iter().map(|v| v.abs()).collect::<Vec<_>>(), cols);
        for c in 0..cols {
            assert_tree_error(got[c], want[c], abs[c], rows, 0.0, &format!("sum_rows {shape:?} column {c}"));
        }
    }

    #[test]
    fn sum_rows_matches_reference() {
        for (case, &(n, c)) in [(1, 1), (3, 7), (129, 65), (1000, 3), (17, 769), (2048, 33)].iter().enumerate() {
            check_rows(&[n, c], 400 + case as u64);
        }
        check_rows(&[2, 3, 5, 40], 410); // leading dims flatten to 30 rows
    }

    #[test]
    fn sum_rows_folds_grid_past_65535_workgroups() {
        // One column: each row block is one workgroup, so 65537 blocks need the x/y fold. Exact data as in
        // `sum_folds_grid_past_65535_workgroups`: ones in odd row blocks and the last row.
        let rows = 65_536 * ROWS_PER_BLOCK + 1;
        let mut x: Vec<f32> = (0..rows).map(|r| ((r / ROWS_PER_BLOCK) % 2) as f32).collect();
        x[rows - 1] = 1.0;
        let gpu = gpu();
        let got = gpu.read(&sum_rows(gpu, &gpu.upload(&x, &[rows, 1]).unwrap()).unwrap()).unwrap();
        assert_eq!(got, [(ROWS_PER_BLOCK * 32_768 + 1) as f32]);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let gpu = gpu();
        let i = gpu.upload_i32(&[1, 2, 3], &[3]).unwrap();
        assert!(matches!(sum(gpu, &i), Err(Error::DType { op: "sum", .. })));
        assert!(matches!(mean(gpu, &i), Err(Error::DType { op: "mean", .. })));
        assert!(matches!(sum_squares(gpu, &i), Err(Error::DType { op: "sum_squares", .. })));
        let i2 = i.reshape(&[3, 1]).unwrap();
        assert!(matches!(sum_rows(gpu, &i2), Err(Error::DType { op: "sum_rows", .. })));
        let v = gpu.upload(&[1.0, 2.0], &[2]).unwrap();
        assert!(matches!(sum_rows(gpu, &v), Err(Error::Shape { op: "sum_rows", what: "input rank", .. })));
    }

    #[test]
    fn global_norm_matches_reference() {
        let gpu = gpu();
        let sizes = [1usize, 7, 1000, 65_537];
        let data: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| random_vec(n, 40 + i as u64)).collect();
        let ts: Vec<Tensor> = data.iter().map(|d| gpu.upload(d, &[d.len()]).unwrap()).collect();
        let refs: Vec<&Tensor> = ts.iter().collect();
        let norm = gpu.read(&global_norm(gpu, &refs).unwrap()).unwrap()[0] as f64;
        let d64: Vec<Vec<f64>> = data.iter().map(|d| to_f64(d)).collect();
        let want = cpu::global_norm(&d64.iter().map(|d| d.as_slice()).collect::<Vec<_>>());
        // Tree sums of positive squares: relative error ~log2(n)·2^-24, plus the sqrt's rounding.
        assert!((norm - want).abs() <= 1e-5 * want, "norm {norm} vs {want}");
        assert!(matches!(global_norm(gpu, &[]), Err(Error::Invalid { .. })));
    }
}
