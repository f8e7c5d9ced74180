//! Row kernels over the last dimension: LayerNorm (forward, returning the per-row mean and rstd its backward pass
//! reuses) and softmax. Leading dimensions are flattened into rows.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::{fits_u32, grid_1d, nonempty, shape_is};
use crate::shaders::NORM;
use crate::{DType, Error, Gpu, Result, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    c: u32,
    eps: f32,
}

/// (rows, last dim) of an F32 tensor seen as [N, C] with its leading dims flattened. Shared by the row kernels.
pub(crate) fn rows_cols(op: &'static str, what: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    nonempty(op, what, t)?;
    expect_dtype(op, what, t, DType::F32)?;
    let Some(&c) = t.shape().last() else {
        // Only a reshape to [] makes a rank-0 tensor; a row kernel needs a last dimension.
        return Err(Error::Shape { op, what, expected: "at least one dimension".into(), got: "[]".into() });
    };
    fits_u32(op, what, t.numel())?;
    Ok((t.numel() / c, c))
}

/// One workgroup per row; `grid_1d` folds the row count over x/y beyond 65535 rows.
pub(crate) fn row_grid(rows: usize) -> [u32; 3] {
    grid_1d(rows, 1)
}

/// LayerNorm over the last dim of `x` ([N, C], or any leading dims), with `gamma`/`beta` of shape [C]. Returns
/// (y shaped like x, mean [N], rstd [N]) where rstd = 1/sqrt(var + eps) with the biased variance, as PyTorch and
/// GPT-2 (which uses eps = 1e-5).
pub fn layernorm(gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "layernorm";
    let (rows, c) = rows_cols(op, "x", x)?;
    for (what, t) in [("gamma", gamma), ("beta", beta)] {
        expect_dtype(op, what, t, DType::F32)?;
        shape_is(op, what, t, &[c])?;
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Invalid { op, message: format!("eps must be finite and >= 0, got {eps}") });
    }
    let y = gpu.alloc(x.shape(), DType::F32)?;
    let mean = gpu.alloc(&[rows], DType::F32)?;
    let rstd = gpu.alloc(&[rows], DType::F32)?;
    let params = Params { rows: rows as u32, c: c as u32, eps };
    gpu.dispatch(&Launch {
        op,
        shader: &NORM,
        entry: "layernorm",
        overrides: &[],
        args: &[x, gamma, beta, &y, &mean, &rstd],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok((y, mean, rstd))
}

/// Numerically stable softmax over the last dim (the row max is subtracted before exponentiating).
pub fn softmax(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let op = "softmax";
    let (rows, c) = rows_cols(op, "x", x)?;
    let out = gpu.alloc(x.shape(), DType::F32)?;
    let params = Params { rows: rows as u32, c: c as u32, eps: 0.0 };
    gpu.dispatch(&Launch {
        op,
        shader: &NORM,
        entry: "softmax",
        overrides: &[],
        args: &[x, &out],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok(out)
}

pub mod cpu {
    /// LayerNorm of rows of length `gamma.len()`: (y, mean, rstd), biased variance.
    pub fn layernorm(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let c = gamma.len();
        let (mut y, mut means, mut rstds) = (Vec::with_capacity(x.len()), Vec::new(), Vec::new());
        for row in x.chunks(c) {
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            y.extend(row.iter().zip(gamma).zip(beta).map(|((v, g), b)| (v - mean) * rstd * g + b));
            means.push(mean);
            rstds.push(rstd);
        }
        (y, means, rstds)
    }

    /// Softmax of each row of length `c`.
    pub fn softmax(x: &[f64], c: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(c) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
            out.extend(row.iter().map(|v| (v - m).exp() / s));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random_vec, to_f64};

    /// Row counts and row lengths that are not multiples of the 256-thread workgroup (1 and 7 leave most threads
    /// idle, 769 makes threads take unequal strides).
    const ROWS: &[usize] = &[1, 3, 17, 129, 300];
    const COLS: &[usize] = &[1, 7, 64, 255, 769];
    /// GPT-2's vocabulary size: the longest rows a GPT sees.
    const VOCAB: usize = 50257;

    fn check_layernorm(rows: usize, c: usize, offset: f32, seed: u64, tol: (f64, f64)) {
        let gpu = gpu();
        let x: Vec<f32> = random_vec(rows * c, seed).iter().map(|v| v + offset).collect();
        let g: Vec<f32> = random_vec(c, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect();
        let b = random_vec(c, seed + 2);
        let tx = gpu.upload(&x, &[rows, c]).unwrap();
        let (tg, tb) = (gpu.upload(&g, &[c]).unwrap(), gpu.upload(&b, &[c]).unwrap());
        let (y, mean, rstd) = layernorm(gpu, &tx, &tg, &tb, 1e-5).unwrap();
        let (wy, wm, wr) = cpu::layernorm(&to_f64(&x), &to_f64(&g), &to_f64(&b), 1e-5);
        let what = format!("layernorm rows={rows} c={c} offset={offset}");
        assert_close(&gpu.read(&y).unwrap(), &wy, tol.0, tol.1, &format!("{what} y"));
        // The mean is an f32 sum of C values over C: rounding grows like sqrt(C/256 + 8) eps in practice, ~1e-7 of
        // the mean's scale (|x| < 1, or 100 with the offset), well inside 1e-6 absolute plus 1e-6 relative.
        assert_close(&gpu.read(&mean).unwrap(), &wm, 1e-6, 1e-6, &format!("{what} mean"));
        // rstd carries the variance's sum error halved by the sqrt, plus sqrt and divide roundings.
        assert_close(&gpu.read(&rstd).unwrap(), &wr, 1e-5, 0.0, &format!("{what} rstd"));
    }

    #[test]
    fn layernorm_matches_reference() {
        for (i, &rows) in ROWS.iter().enumerate() {
            for (j, &c) in COLS.iter().enumerate() {
                // |y| <= ~3 (unit-variance rows times gamma <= 1.5 plus beta): a few f32 roundings of
                // (x - mean) * rstd * gamma + beta, with rstd known to 1e-5 relative.
                check_layernorm(rows, c, 0.0, (10 * i + j) as u64, (1e-5, 1e-5));
            }
        }
    }

    #[test]
    fn layernorm_long_rows_and_large_mean() {
        // Vocabulary-length rows: each thread sums ~200 values before the tree, error ~200 eps relative.
        check_layernorm(2, VOCAB, 0.0, 7, (1e-5, 1e-5));
        // |mean| = 100 >> std ~ 0.58: two passes keep var accurate (a one-pass E[x^2] - E[x]^2 in f32 would lose
        // ~1e-2 of it); what remains is the mean's rounding, ~1e-5 absolute, scaled by rstd ~ 1.7.
        check_layernorm(17, 769, 100.0, 8, (1e-4, 1e-4));
    }

    fn check_softmax(rows: usize, c: usize, scale: f32, seed: u64) {
        let gpu = gpu();
        let x: Vec<f32> = random_vec(rows * c, seed).iter().map(|v| v * scale).collect();
        let out = softmax(gpu, &gpu.upload(&x, &[rows, c]).unwrap()).unwrap();
        // Each probability is exp (a few ulp) times 1/sum, the sum of C terms in (0, 1] off by ~(C/256 + 8) eps
        // relative; 1e-5 relative covers it and 1e-12 absolute admits terms that underflow to zero in f32.
        assert_close(
            &gpu.read(&out).unwrap(),
            &cpu::softmax(&to_f64(&x), c),
            1e-5,
            1e-12,
            &format!("softmax rows={rows} c={c} scale={scale}"),
        );
    }

    #[test]
    fn softmax_matches_reference() {
        for (i, &rows) in ROWS.iter().enumerate() {
            for (j, &c) in COLS.iter().enumerate() {
                check_softmax(rows, c, 4.0, (100 + 10 * i + j) as u64);
            }
        }
        check_softmax(3, VOCAB, 4.0, 200);
        // Logits in +-100: exp overflows f32 past 88.7 and underflows to 0 below -103, so only the max
        // subtraction keeps these rows finite.
        check_softmax(17, 769, 100.0, 201);
        check_softmax(2, VOCAB, 100.0, 202);
    }

    #[test]
    fn rows_beyond_one_grid_dimension() {
        // 65537 rows need a second grid row of workgroups; rows differ (row r is [(r mod 50) / 10, 0]), so a
        // skipped or misplaced row shows.
        let (rows, c) = (65_537, 2);
        let x: Vec<f32> = (0..rows).flat_map(|r| [(r % 50) as f32 * 0.1, 0.0]).collect();
        let gpu = gpu();
        let out = softmax(gpu, &gpu.upload(&x, &[rows, c]).unwrap()).unwrap();
        // Two-term softmax: exp and one division, a few ulp.
        assert_close(&gpu.read(&out).unwrap(), &cpu::softmax(&to_f64(&x), c), 1e-6, 1e-7, "softmax 65537 rows");
    }

    #[test]
    fn leading_dims_flatten_into_rows() {
        let gpu = gpu();
        let (b, t, c) = (2, 3, 5);
        let x = random_vec(b * t * c, 300);
        let tx = gpu.upload(&x, &[b, t, c]).unwrap();
        let (g, beta) = (gpu.upload(&[1.0; 5], &[c]).unwrap(), gpu.upload(&[0.0; 5], &[c]).unwrap());
        let (y, mean, rstd) = layernorm(gpu, &tx, &g, &beta, 1e-5).unwrap();
        assert_eq!((y.shape(), mean.shape(), rstd.shape()), (&[b, t, c][..], &[b * t][..], &[b * t][..]));
        assert_eq!(softmax(gpu, &tx).unwrap().shape(), &[b, t, c]);
        let (wy, _, _) = cpu::layernorm(&to_f64(&x), &[1.0; 5], &[0.0; 5], 1e-5);
        // Same bound as layernorm_matches_reference.
        assert_close(&gpu.read(&y).unwrap(), &wy, 1e-5, 1e-5, "layernorm [B, T, C]");
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let gpu = gpu();
        let x = gpu.upload(&random_vec(12, 1), &[3, 4]).unwrap();
        let g4 = gpu.upload(&[1.0; 4], &[4]).unwrap();
        let g3 = gpu.upload(&[1.0; 3], &[3]).unwrap();
        let g22 = gpu.upload(&[1.0; 4], &[2, 2]).unwrap();
        let gi = gpu.upload_i32(&[1; 4], &[4]).unwrap();
        let xi = gpu.upload_i32(&[1; 12], &[3, 4]).unwrap();
        let shape = |r: Result<(Tensor, Tensor, Tensor)>, what: &str| {
            assert!(matches!(r, Err(Error::Shape { op: "layernorm", what: w, .. }) if w == what), "{what}");
        };
        shape(layernorm(gpu, &x, &g3, &g4, 1e-5), "gamma");
        shape(layernorm(gpu, &x, &g4, &g3, 1e-5), "beta");
        shape(layernorm(gpu, &x, &g22, &g4, 1e-5), "gamma");
        let scalar = gpu.upload(&[1.0], &[1]).unwrap().reshape(&[]).unwrap();
        shape(layernorm(gpu, &scalar, &g4, &g4, 1e-5), "x");
        assert!(matches!(layernorm(gpu, &x, &gi, &g4, 1e-5), Err(Error::DType { what: "gamma", .. })));
        assert!(matches!(layernorm(gpu, &xi, &g4, &g4, 1e-5), Err(Error::DType { what: "x", .. })));
        assert!(matches!(layernorm(gpu, &x, &g4, &g4, f32::NAN), Err(Error::Invalid { op: "layernorm", .. })));
        assert!(matches!(layernorm(gpu, &x, &g4, &g4, -1.0), Err(Error::Invalid { op: "layernorm", .. })));
        assert!(matches!(softmax(gpu, &xi), Err(Error::DType { op: "softmax", .. })));
        assert!(matches!(softmax(gpu, &scalar), Err(Error::Shape { op: "softmax", .. })));
    }
}
