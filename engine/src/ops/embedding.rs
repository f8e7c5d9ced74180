//! Token + position embedding (forward): out[b, t] = wte[tokens[b, t]] + wpe[t], the first op of a GPT.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::{fits_u32, grid_1d, nonempty, WG_1D};
use crate::shaders::EMBEDDING;
use crate::{DType, Error, Gpu, Result, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    t: u32,
    v: u32,
}

/// The two dims of a rank-2 tensor, or a Shape error naming the expected layout.
fn dims2(op: &'static str, what: &'static str, layout: &str, t: &Tensor) -> Result<(usize, usize)> {
    match *t.shape() {
        [a, b] => Ok((a, b)),
        _ => Err(Error::Shape { op, what, expected: layout.into(), got: format!("{:?}", t.shape()) }),
    }
}

/// `tokens` I32 [B, T], `wte` [V, C], `wpe` [maxT, C] → [B, T, C] = wte[token] + wpe[t]. T must be at most maxT.
/// A token id outside [0, V) makes its row NaN: ids live on the GPU and checking them on the host would cost a
/// readback every step, so the NaN detection downstream reports the step instead.
pub fn embedding(gpu: &Gpu, tokens: &Tensor, wte: &Tensor, wpe: &Tensor) -> Result<Tensor> {
    let op = "embedding";
    for (what, t, dtype) in [("tokens", tokens, DType::I32), ("wte", wte, DType::F32), ("wpe", wpe, DType::F32)] {
        nonempty(op, what, t)?;
        expect_dtype(op, what, t, dtype)?;
    }
    let (b, t) = dims2(op, "tokens", "[B, T]", tokens)?;
    let (v, c) = dims2(op, "wte", "[V, C]", wte)?;
    let (max_t, wpe_c) = dims2(op, "wpe", "[maxT, C]", wpe)?;
    if wpe_c != c {
        return Err(Error::Shape {
            op,
            what: "wpe",
            expected: format!("[maxT, {c}] (C of wte)"),
            got: format!("{:?}", wpe.shape()),
        });
    }
    if t > max_t {
        return Err(Error::Shape {
            op,
            what: "tokens",
            expected: format!("[B, T] with T <= {max_t} (the rows of wpe)"),
            got: format!("{:?}", tokens.shape()),
        });
    }
    fits_u32(op, "wte", wte.numel())?;
    let n = b * t * c;
    let params = Params { n: fits_u32(op, "output", n)?, c: c as u32, t: t as u32, v: v as u32 };
    let out = gpu.alloc(&[b, t, c], DType::F32)?;
    gpu.dispatch(&Launch {
        op,
        shader: &EMBEDDING,
        entry: "embedding",
        overrides: &[],
        args: &[tokens, wte, wpe, &out],
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(n, WG_1D),
    })?;
    Ok(out)
}

pub mod cpu {
    /// [B, T, C] flattened, for `tokens` [B, T] flattened; out-of-range ids give NaN rows, as the kernel.
    pub fn embedding(tokens: &[i32], t: usize, wte: &[f64], wpe: &[f64], c: usize) -> Vec<f64> {
        let v = wte.len() / c;
        let mut out = Vec::with_capacity(tokens.len() * c);
        for (i, &tok) in tokens.iter().enumerate() {
            let pos = &wpe[(i % t) * c..][..c];
            if tok < 0 || tok as usize >= v {
                out.extend(std::iter::repeat_n(f64::NAN, c));
            } else {
                out.extend(wte[tok as usize * c..][..c].iter().zip(pos).map(|(a, b)| a + b));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;
    use crate::testing::{gpu, random_vec, rng, to_f64};

    /// GPU output against the f64 reference rounded to f32. Exact: the f64 sum of two f32 values is exact here
    /// (both in [-1, 1)), so rounding it once gives the correctly rounded f32 add the GPU performs.
    fn assert_exact(got: &[f32], want: &[f64], what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(g == w as f32 || (g.is_nan() && w.is_nan()), "{what}: element {i} is {g}, want {w}");
        }
        assert_eq!(got.len(), want.len(), "{what}: length");
    }

    fn check(b: usize, t: usize, max_t: usize, v: usize, c: usize, seed: u64) {
        let gpu = gpu();
        let mut r = rng(seed);
        let tokens: Vec<i32> = (0..b * t).map(|_| r.random_range(0..v as i32)).collect();
        let (wte, wpe) = (random_vec(v * c, seed + 1), random_vec(max_t * c, seed + 2));
        let out = embedding(
            gpu,
            &gpu.upload_i32(&tokens, &[b, t]).unwrap(),
            &gpu.upload(&wte, &[v, c]).unwrap(),
            &gpu.upload(&wpe, &[max_t, c]).unwrap(),
        )
        .unwrap();
        assert_eq!(out.shape(), &[b, t, c]);
        let want = cpu::embedding(&tokens, t, &to_f64(&wte), &to_f64(&wpe), c);
        assert_exact(&gpu.read(&out).unwrap(), &want, &format!("embedding b={b} t={t} maxT={max_t} v={v} c={c}"));
    }

    #[test]
    fn matches_reference() {
        check(1, 1, 1, 1, 1, 0);
        check(2, 5, 7, 13, 3, 1);
        check(3, 17, 20, 101, 769, 2);
        check(4, 33, 64, 257, 65, 3);
        check(2, 129, 129, 50257, 7, 4);
    }

    #[test]
    fn out_of_range_tokens_give_nan_rows() {
        let gpu = gpu();
        let (b, t, v, c) = (2, 3, 5, 4);
        let tokens = [0, 5, 4, -1, 2, i32::MAX];
        let (wte, wpe) = (random_vec(v * c, 10), random_vec(t * c, 11));
        let out = embedding(
            gpu,
            &gpu.upload_i32(&tokens, &[b, t]).unwrap(),
            &gpu.upload(&wte, &[v, c]).unwrap(),
            &gpu.upload(&wpe, &[t, c]).unwrap(),
        )
        .unwrap();
        let got = gpu.read(&out).unwrap();
        for bad in [1, 3, 5] {
            assert!(got[bad * c..][..c].iter().all(|g| g.is_nan()), "row {bad} must be NaN");
        }
        assert_exact(&got, &cpu::embedding(&tokens, t, &to_f64(&wte), &to_f64(&wpe), c), "embedding with bad ids");
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let gpu = gpu();
        let tokens = gpu.upload_i32(&[0, 1, 2, 3], &[2, 2]).unwrap();
        let wte = gpu.upload(&random_vec(12, 1), &[4, 3]).unwrap();
        let wpe = gpu.upload(&random_vec(6, 2), &[2, 3]).unwrap();
        let err = |tk: &Tensor, te: &Tensor, pe: &Tensor| embedding(gpu, tk, te, pe).expect_err("must be refused");
        let float_tokens = gpu.upload(&[0.0; 4], &[2, 2]).unwrap();
        assert!(matches!(err(&float_tokens, &wte, &wpe), Error::DType { op: "embedding", what: "tokens", .. }));
        let int_wte = gpu.upload_i32(&[0; 12], &[4, 3]).unwrap();
        assert!(matches!(err(&tokens, &int_wte, &wpe), Error::DType { op: "embedding", what: "wte", .. }));
        let flat_tokens = gpu.upload_i32(&[0, 1], &[2]).unwrap();
        assert!(matches!(err(&flat_tokens, &wte, &wpe), Error::Shape { op: "embedding", what: "tokens", .. }));
        let flat_wte = gpu.upload(&random_vec(12, 1), &[12]).unwrap();
        assert!(matches!(err(&tokens, &flat_wte, &wpe), Error::Shape { op: "embedding", what: "wte", .. }));
        let narrow_wpe = gpu.upload(&random_vec(4, 3), &[2, 2]).unwrap();
        assert!(matches!(err(&tokens, &wte, &narrow_wpe), Error::Shape { op: "embedding", what: "wpe", .. }));
        // T = 3 positions but wpe holds only 2.
        let long = gpu.upload_i32(&[0; 6], &[2, 3]).unwrap();
        assert!(matches!(err(&long, &wte, &wpe), Error::Shape { op: "embedding", what: "tokens", .. }));
    }
}
