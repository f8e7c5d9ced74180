//! Elementwise kernels: fill, copy, scale, residual add, GELU (tanh form) and SwiGLU with their backward passes (the
//! others' backward passes are these same kernels: a scale, a copy, an accumulate).

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
    inner: u32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { n, alpha, inner })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

fn launch(gpu: &Gpu, op: &'static str, entry: &'static str, args: &[&Tensor], alpha: f32) -> Result<()> {
    launch_n(gpu, op, entry, args, alpha, args[0].numel(), 0)
}

/// `n` invocations (the elements of args[0] for most kernels).
fn launch_n(
    gpu: &Gpu,
    op: &'static str,
    entry: &'static str,
    args: &[&Tensor],
    alpha: f32,
    n: usize,
    inner: usize,
) -> Result<()> {
    for t in args {
        nonempty(op, "input", t)?;
        expect_dtype(op, "input", t, DType::F32)?;
    }
    if args.iter().all(|t| t.numel() == n) && (n * 4) as u64 > gpu.max_binding() {
        // Larger than one binding (a GPT-2 token embedding's gradient on lavapipe): the same kernel over aligned
        // element ranges, each bound as a view. Every element is still computed by the same expression.
        for (lo, hi) in gpu.split_rows(op, n, 1)? {
            let views = args.iter().map(|t| t.view(lo, &[hi - lo])).collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = views.iter().collect();
            launch_n(gpu, op, entry, &refs, alpha, hi - lo, inner)?;
        }
        return Ok(());
    }
    let params = Params { n: fits_u32(op, "tensor", n)?, alpha, inner: inner as u32 };
    gpu.dispatch(&Launch {
        op,
        flops: 0,
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

/// dx = dy · gelu'(x) for the tanh-form [`gelu`], as a NEW tensor. `x` is the forward's input.
pub fn gelu_backward(gpu: &Gpu, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let op = "gelu_backward";
    nonempty(op, "x", x)?;
    expect_dtype(op, "x", x, DType::F32)?;
    expect_dtype(op, "dy", dy, DType::F32)?;
    same_shape(op, "dy", x, dy)?;
    let out = gpu.alloc(x.shape(), DType::F32)?;
    launch(gpu, op, "gelu_backward", &[x, dy, &out], 0.0)?;
    Ok(out)
}

/// [..., 2I] → (rows, I), or a Shape error: the fused gate/up projection's output must have an even last dim.
fn swiglu_dims(op: &'static str, gu: &Tensor) -> Result<(usize, usize)> {
    nonempty(op, "gu", gu)?;
    expect_dtype(op, "gu", gu, DType::F32)?;
    match gu.shape().last() {
        Some(&w) if w % 2 == 0 => Ok((gu.numel() / w, w / 2)),
        _ => Err(crate::Error::Shape {
            op,
            what: "gu",
            expected: "[..., 2I] (gate, then up)".into(),
            got: format!("{:?}", gu.shape()),
        }),
    }
}

/// SwiGLU of the fused gate/up projection `gu` [..., 2I] (gate = the first I columns, up = the last I, the
/// order of Kiln's fused gate_up_proj): silu(gate) · up, a NEW [..., I] tensor, as Llama's MLP before down_proj.
pub fn swiglu(gpu: &Gpu, gu: &Tensor) -> Result<Tensor> {
    let op = "swiglu";
    let (rows, inner) = swiglu_dims(op, gu)?;
    let mut shape = gu.shape().to_vec();
    *shape.last_mut().expect("checked: at least one dim") = inner;
    let out = gpu.alloc(&shape, DType::F32)?;
    launch_n(gpu, op, "swiglu", &[gu, &out], 0.0, rows * inner, inner)?;
    Ok(out)
}

/// Gradient of [`swiglu`]: dgu [..., 2I] (NEW) from the forward's input `gu` and the upstream `dy` [..., I].
pub fn swiglu_backward(gpu: &Gpu, gu: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let op = "swiglu_backward";
    let (rows, inner) = swiglu_dims(op, gu)?;
    expect_dtype(op, "dy", dy, DType::F32)?;
    let mut shape = gu.shape().to_vec();
    *shape.last_mut().expect("checked: at least one dim") = inner;
    crate::ops::shape_is(op, "dy", dy, &shape)?;
    let dgu = gpu.alloc(gu.shape(), DType::F32)?;
    launch_n(gpu, op, "swiglu_backward", &[gu, dy, &dgu], 0.0, rows * inner, inner)?;
    Ok(dgu)
}

pub mod cpu {
    fn sigmoid(z: f64) -> f64 {
        1.0 / (1.0 + (-z).exp())
    }

    /// silu(gate)·up per row of gu [N, 2I] (gate first): [N, I].
    pub fn swiglu(gu: &[f64], inner: usize) -> Vec<f64> {
        gu.chunks(2 * inner).flat_map(|r| (0..inner).map(move |j| r[j] * sigmoid(r[j]) * r[inner + j])).collect()
    }

    /// Gradient of [`swiglu`] by the chain rule: d gate = dy·up·silu'(g), silu' = σ(g)(1 + g(1 − σ(g))),
    /// d up = dy·silu(g).
    pub fn swiglu_backward(gu: &[f64], dy: &[f64], inner: usize) -> Vec<f64> {
        let mut out = vec![0.0; gu.len()];
        for (r, (row, d)) in gu.chunks(2 * inner).zip(dy.chunks(inner)).enumerate() {
            for j in 0..inner {
                let (g, u, s) = (row[j], row[inner + j], sigmoid(row[j]));
                out[r * 2 * inner + j] = d[j] * u * s * (1.0 + g * (1.0 - s));
                out[r * 2 * inner + inner + j] = d[j] * g * s;
            }
        }
        out
    }

    pub fn gelu(x: &[f64]) -> Vec<f64> {
        let s = (2.0 / std::f64::consts::PI).sqrt();
        x.iter().map(|&v| 0.5 * v * (1.0 + (s * (v + 0.044715 * v * v * v)).tanh())).collect()
    }

    /// dy · gelu'(x). With u = s(x + 0.044715x³), gelu = x·σ(2u) since 0.5(1 + tanh u) = σ(2u), so
    /// gelu' = σ(2u) + 2x·σ(2u)·σ(−2u)·u'. The tanh form 0.5(1 + t) + 0.5x(1 − t²)u' cancels in the tails: at
    /// u = −14.5 it keeps only 4 digits even in f64, fewer than the GPU's f32 result.
    pub fn gelu_backward(x: &[f64], dy: &[f64]) -> Vec<f64> {
        let s = (2.0 / std::f64::consts::PI).sqrt();
        let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
        x.iter()
            .zip(dy)
            .map(|(&v, &d)| {
                let u = s * (v + 0.044715 * v * v * v);
                let du = s * (1.0 + 3.0 * 0.044715 * v * v);
                d * (sigmoid(2.0 * u) + 2.0 * v * sigmoid(2.0 * u) * sigmoid(-2.0 * u) * du)
            })
            .collect()
    }

    pub fn add(x: &[f64], y: &[f64], alpha: f64) -> Vec<f64> {
        x.iter().zip(y).map(|(a, b)| a + alpha * b).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::norm::tests::{assert_within, dot, FD_ATOL, FD_H, FD_RTOL, FLUSH, U};
    use crate::testing::{assert_close, assert_close_f64, gpu, numeric_gradient, random_vec, to_f64, SIZES_1D};

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

    #[test]
    fn gelu_reference_backward_matches_finite_differences() {
        // Spans both tails and the minimum of gelu near x = -0.75, where gelu' changes sign.
        let x: Vec<f64> = random_vec(9, 50).iter().map(|&v| 4.0 * v as f64).chain([-0.75, 0.0, 2.5]).collect();
        let w = to_f64(&random_vec(x.len(), 51));
        let fd = numeric_gradient(|v| dot(&cpu::gelu(v), &w), &x, FD_H);
        assert_close_f64(&cpu::gelu_backward(&x, &w), &fd, FD_RTOL, FD_ATOL, "gelu backward");
    }

    fn check_gelu_backward(x: &[f32], dy: &[f32], shape: &[usize]) {
        let gpu = gpu();
        let tx = gpu.upload(x, shape).unwrap();
        let dx = gelu_backward(gpu, &tx, &gpu.upload(dy, shape).unwrap()).unwrap();
        assert_eq!(dx.shape(), shape);
        let want = cpu::gelu_backward(&to_f64(x), &to_f64(dy));
        // The kernel's σ form: e = exp(-2u) may err by 3 + 2|2u| ulp (Vulkan's bound) and a dozen more roundings
        // follow, each relative to one of the two terms σ and 2xσ(1-σ)u'; the bound is relative to their
        // magnitudes, not to their difference, which cancels near x = -0.75. Past the forward's clamp (|u| >= 15)
        // the kernel drops the second term (< 1e-11 there) and keeps σ(±30), 1e-13 off the f64 value: the allowance is
        // twice their sum.
        let s = (2.0 / std::f64::consts::PI).sqrt();
        let bound: Vec<f64> = x
            .iter()
            .zip(dy)
            .map(|(&v, &d)| {
                let v = v as f64;
                let raw = s * (v + 0.044715 * v * v * v);
                let u = raw.clamp(-15.0, 15.0);
                let sig = 1.0 / (1.0 + (-2.0 * u).exp());
                let second = (2.0 * v * sig * (1.0 - sig) * s * (1.0 + 3.0 * 0.044715 * v * v)).abs();
                let clamped = if raw.abs() > 14.9 { 2.0 * (second + 1e-13) } else { 0.0 };
                d.abs() as f64 * ((2.0 * (3.0 + 4.0 * u.abs()) + 12.0) * U * (sig + second) + clamped) + FLUSH
            })
            .collect();
        assert_within(&gpu.read(&dx).unwrap(), &want, &bound, &format!("gelu backward {shape:?}"));
    }

    #[test]
    fn gelu_backward_matches_reference() {
        for (i, &rows) in [1, 3, 17, 129].iter().enumerate() {
            for (j, &c) in [1, 7, 255, 769].iter().enumerate() {
                let seed = (60 + 10 * i + j) as u64;
                let x: Vec<f32> = random_vec(rows * c, seed).iter().map(|v| v * 8.0).collect();
                check_gelu_backward(&x, &random_vec(rows * c, seed + 1), &[rows, c]);
            }
        }
        // Zeros, gelu's minimum, both sides of the clamp, and |x| whose cube overflows f32.
        let x = [0.0, -0.0, -0.7517916, 6.8, 7.0, -6.8, -7.0, 15.0, -15.0, 1e20, -1e20, 3.0, -3.0];
        check_gelu_backward(&x, &random_vec(x.len(), 99), &[x.len()]);
    }

    #[test]
    fn swiglu_matches_reference_forward_and_backward() {
        let gpu = gpu();
        for (i, &rows) in [1, 3, 17, 129].iter().enumerate() {
            for (j, &inner) in [1, 7, 255, 769].iter().enumerate() {
                let seed = (300 + 10 * i + j) as u64;
                // Gates across silu's range: deep negative (σ ≈ 0), the minimum near −1.28, and large positive.
                let gu: Vec<f32> = random_vec(rows * 2 * inner, seed).iter().map(|v| v * 12.0).collect();
                let dy = random_vec(rows * inner, seed + 1);
                let tgu = gpu.upload(&gu, &[rows, 2 * inner]).unwrap();
                let y = swiglu(gpu, &tgu).unwrap();
                assert_eq!(y.shape(), &[rows, inner]);
                let dgu = swiglu_backward(gpu, &tgu, &gpu.upload(&dy, &[rows, inner]).unwrap()).unwrap();
                assert_eq!(dgu.shape(), &[rows, 2 * inner]);
                let (gd, dyd) = (to_f64(&gu), to_f64(&dy));
                let what = format!("swiglu rows={rows} I={inner}");
                // exp(−g) errs by 3 + 2|g| ulp (Vulkan's bound), σ = 1/(1 + e) carries it relative to (1 − σ),
                // so silu errs by (3 + 2|g|)·2u·σ(1 − σ)·|g|·|up| plus a few roundings of |silu·up|.
                let sig = |g: f64| 1.0 / (1.0 + (-g).exp());
                let bound: Vec<f64> = gd
                    .chunks(2 * inner)
                    .flat_map(|r| {
                        (0..inner).map(move |k| {
                            let (g, u, s) = (r[k], r[inner + k].abs(), sig(r[k]));
                            let e = (3.0 + 2.0 * g.abs()) * 2.0 * U;
                            (e * s * (1.0 - s) * g.abs() + 6.0 * U * s * g.abs()) * u + FLUSH
                        })
                    })
                    .collect();
                assert_within(&gpu.read(&y).unwrap(), &cpu::swiglu(&gd, inner), &bound, &what);
                // d gate = dy·up·σ(1 + g(1 − σ)) and d up = dy·g·σ: σ and 1 − σ each off by e relative (1 − σ is
                // exact given σ near 1, and σ itself near 0 carries the same relative error), a few roundings more.
                let bound: Vec<f64> = gd
                    .chunks(2 * inner)
                    .zip(dyd.chunks(inner))
                    .flat_map(|(r, d)| {
                        let (r, d) = (r.to_vec(), d.to_vec());
                        (0..2 * inner).map(move |k| {
                            let j = k % inner;
                            let (g, u, s) = (r[j], r[inner + j].abs(), sig(r[j]));
                            let e = (3.0 + 2.0 * g.abs()) * 2.0 * U + 8.0 * U;
                            let mag = if k < inner { u * s * (1.0 + g.abs() * (1.0 - s)) * 2.0 } else { g.abs() * s };
                            d[j].abs() * e * mag + FLUSH
                        })
                    })
                    .collect();
                let want = cpu::swiglu_backward(&gd, &dyd, inner);
                assert_within(&gpu.read(&dgu).unwrap(), &want, &bound, &format!("{what} backward"));
            }
        }
    }

    #[test]
    fn swiglu_reference_backward_matches_finite_differences() {
        let inner = 4;
        let mut gu: Vec<f64> = random_vec(3 * 2 * inner, 40).iter().map(|&v| 5.0 * v as f64).collect();
        // Gates at silu's minimum (−1.278) and at 0, besides random ones on both sides of it.
        (gu[0], gu[1]) = (-1.278, 0.0);
        let gu = &gu[..];
        let w = to_f64(&random_vec(3 * inner, 41));
        let fd = numeric_gradient(|v| dot(&cpu::swiglu(v, inner), &w), gu, FD_H);
        assert_close_f64(&cpu::swiglu_backward(gu, &w, inner), &fd, FD_RTOL, FD_ATOL, "swiglu backward");
    }

    #[test]
    fn swiglu_bad_inputs_are_typed_errors() {
        let gpu = gpu();
        let odd = gpu.upload(&[1.0; 6], &[2, 3]).unwrap();
        assert!(matches!(swiglu(gpu, &odd), Err(crate::Error::Shape { op: "swiglu", what: "gu", .. })));
        let gu = gpu.upload(&[1.0; 8], &[2, 4]).unwrap();
        let dy = gpu.upload(&[1.0; 6], &[2, 3]).unwrap();
        let e = swiglu_backward(gpu, &gu, &dy).unwrap_err();
        assert!(matches!(e, crate::Error::Shape { op: "swiglu_backward", what: "dy", .. }), "{e:?}");
        let i = gpu.upload_i32(&[1; 8], &[2, 4]).unwrap();
        assert!(matches!(swiglu(gpu, &i), Err(crate::Error::DType { .. })));
    }

    #[test]
    fn gelu_backward_bad_inputs_are_typed_errors() {
        let gpu = gpu();
        let x = gpu.upload(&[1.0, 2.0, 3.0], &[3]).unwrap();
        let x2 = gpu.upload(&[1.0, 2.0], &[2]).unwrap();
        let i = gpu.upload_i32(&[1, 2, 3], &[3]).unwrap();
        let op = "gelu_backward";
        assert!(matches!(gelu_backward(gpu, &i, &x), Err(crate::Error::DType { op: o, what: "x", .. }) if o == op));
        assert!(matches!(gelu_backward(gpu, &x, &i), Err(crate::Error::DType { op: o, what: "dy", .. }) if o == op));
        assert!(matches!(gelu_backward(gpu, &x, &x2), Err(crate::Error::Shape { op: o, what: "dy", .. }) if o == op));
    }
}
