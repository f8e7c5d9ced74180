//! Elementwise kernels: fill, copy, scale, residual add, GELU (tanh form). Forward only here; their backward
//! passes are elementwise too and arrive with the autodiff engine.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::{fits_u32, grid_1d, nonempty, same_shape, WG_1D};
use crate::shaders::ELEMENTWISE;
use crate::{DType, Gpu, Result, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    alpha: f32,
}

fn launch(gpu: &Gpu, op: &'static str, entry: &'static str, args: &[&Tensor], alpha: f32) -> Result<()> {
    for t in args {
        nonempty(op, "input", t)?;
        expect_dtype(op, "input", t, DType::F32)?;
    }
    let n = args[0].numel();
    let params = Params { n: fits_u32(op, "tensor", n)?, alpha };
    gpu.dispatch(&Launch {
        op,
        shader: &ELEMENTWISE,
        entry,
        overrides: &[],
        args,
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(n, WG_1D),
    })
}

/// Set every element of `t` to `value`.
pub fn fill(gpu: &Gpu, t: &Tensor, value: f32) -> Result<()> {
    launch(gpu, "fill", "fill", &[t], value)
}

/// A new tensor of zeros.
pub fn zeros(gpu: &Gpu, shape: &[usize]) -> Result<Tensor> {
    let t = gpu.alloc(shape, DType::F32)?;
    fill(gpu, &t, 0.0)?;
    Ok(t)
}

/// dst = src (same shape).
pub fn copy(gpu: &Gpu, src: &Tensor, dst: &Tensor) -> Result<()> {
    same_shape("copy", "destination", src, dst)?;
    launch(gpu, "copy", "copy", &[src, dst], 0.0)
}

/// alpha * x, as a new tensor.
pub fn scale(gpu: &Gpu, x: &Tensor, alpha: f32) -> Result<Tensor> {
    let out = gpu.alloc(x.shape(), DType::F32)?;
    launch(gpu, "scale", "scale", &[x, &out], alpha)?;
    Ok(out)
}

/// x *= alpha, in place.
pub fn scale_inplace(gpu: &Gpu, x: &Tensor, alpha: f32) -> Result<()> {
    launch(gpu, "scale_inplace", "scale_inplace", &[x], alpha)
}

/// x + alpha * y, as a new tensor (the residual connection uses alpha = 1).
pub fn add(gpu: &Gpu, x: &Tensor, y: &Tensor, alpha: f32) -> Result<Tensor> {
    same_shape("add", "y", x, y)?;
    let out = gpu.alloc(x.shape(), DType::F32)?;
    launch(gpu, "add", "add", &[x, y, &out], alpha)?;
    Ok(out)
}

/// acc += alpha * src, in place (gradient accumulation).
pub fn add_inplace(gpu: &Gpu, acc: &Tensor, src: &Tensor, alpha: f32) -> Result<()> {
    same_shape("add_inplace", "src", acc, src)?;
    launch(gpu, "add_inplace", "add_inplace", &[acc, src], alpha)
}

/// GELU with the tanh approximation, as GPT-2.
pub fn gelu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let out = gpu.alloc(x.shape(), DType::F32)?;
    launch(gpu, "gelu", "gelu", &[x, &out], 0.0)?;
    Ok(out)
}

pub mod cpu {
    pub fn gelu(x: &[f64]) -> Vec<f64> {
        let s = (2.0 / std::f64::consts::PI).sqrt();
        x.iter().map(|&v| 0.5 * v * (1.0 + (s * (v + 0.044715 * v * v * v)).tanh())).collect()
    }

    pub fn add(x: &[f64], y: &[f64], alpha: f64) -> Vec<f64> {
        x.iter().zip(y).map(|(a, b)| a + alpha * b).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random_vec, to_f64, SIZES_1D};

    #[test]
    fn fill_copy_scale_match_reference() {
        let gpu = gpu();
        for (case, &n) in SIZES_1D.iter().enumerate() {
            let x = random_vec(n, case as u64);
            let tx = gpu.upload(&x, &[n]).unwrap();
            let t = gpu.alloc(&[n], DType::F32).unwrap();
            fill(gpu, &t, 2.5).unwrap();
            assert!(gpu.read(&t).unwrap().iter().all(|&v| v == 2.5), "fill n={n}");
            copy(gpu, &tx, &t).unwrap();
            assert_eq!(gpu.read(&t).unwrap(), x, "copy n={n}");
            let s = scale(gpu, &tx, -3.0).unwrap();
            // Exact: one f32 multiply on both sides.
            let want: Vec<f32> = x.iter().map(|v| -3.0 * v).collect();
            assert_eq!(gpu.read(&s).unwrap(), want, "scale n={n}");
            scale_inplace(gpu, &s, 0.5).unwrap();
            let want: Vec<f32> = want.iter().map(|v| 0.5 * v).collect();
            assert_eq!(gpu.read(&s).unwrap(), want, "scale_inplace n={n}");
        }
    }

    #[test]
    fn add_and_gelu_match_reference() {
        let gpu = gpu();
        for (case, &n) in SIZES_1D.iter().enumerate() {
            let x = random_vec(n, 100 + case as u64);
            let y = random_vec(n, 200 + case as u64);
            let (tx, ty) = (gpu.upload(&x, &[n]).unwrap(), gpu.upload(&y, &[n]).unwrap());
            let out = add(gpu, &tx, &ty, 0.75).unwrap();
            // One rounding of a multiply-add in f32: relative 1e-6 bounds it.
            assert_close(&gpu.read(&out).unwrap(), &cpu::add(&to_f64(&x), &to_f64(&y), 0.75), 1e-6, 1e-6, "add");
            add_inplace(gpu, &tx, &ty, -1.0).unwrap();
            assert_close(&gpu.read(&tx).unwrap(), &cpu::add(&to_f64(&x), &to_f64(&y), -1.0), 1e-6, 1e-6, "add_inplace");
            let big: Vec<f32> = x.iter().map(|v| v * 8.0).collect(); // reach the saturated tails of tanh
            let g = gelu(gpu, &gpu.upload(&big, &[n]).unwrap()).unwrap();
            // f32 tanh and cubic: a few ulps of the result, so 1e-5 relative plus 1e-6 absolute near zero.
            assert_close(&gpu.read(&g).unwrap(), &cpu::gelu(&to_f64(&big)), 1e-5, 1e-6, "gelu");
        }
    }

    #[test]
    fn mismatched_and_empty_shapes_are_typed_errors() {
        let gpu = gpu();
        let a = gpu.upload(&[1.0, 2.0, 3.0], &[3]).unwrap();
        let b = gpu.upload(&[1.0, 2.0], &[2]).unwrap();
        assert!(matches!(add(gpu, &a, &b, 1.0), Err(crate::Error::Shape { op: "add", .. })));
        assert!(matches!(gpu.alloc(&[0, 4], DType::F32), Err(crate::Error::Empty { .. })));
        let i = gpu.upload_i32(&[1, 2, 3], &[3]).unwrap();
        assert!(matches!(gelu(gpu, &i), Err(crate::Error::DType { .. })));
    }
}
