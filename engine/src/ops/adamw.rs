//! AdamW (decoupled weight decay, as torch.optim.AdamW): one fused kernel that updates a parameter and its two
//! moment buffers in place, with an f64 reference that runs the same steps.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::{fits_u32, grid_1d, nonempty, same_shape, WG_1D};
use crate::shaders::OPTIMIZER;
use crate::{DType, Error, Gpu, Result, Tensor};

/// AdamW hyperparameters. GPT-2-style training uses lr 6e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bias_correction1: f32,
    bias_correction2: f32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { n, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2 })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// 1 - beta^step in f64, so the correction stays accurate for any step count.
fn bias_correction(beta: f32, step: u32) -> f64 {
    1.0 - (beta as f64).powf(step as f64)
}

fn validate(param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor, cfg: &AdamW, step: u32) -> Result<u32> {
    let op = "adamw_step";
    let invalid = |message: String| Err(Error::Invalid { op, message });
    if step == 0 {
        return invalid("step is 1-based (the first update is step 1); got 0".into());
    }
    for (what, beta) in [("beta1", cfg.beta1), ("beta2", cfg.beta2)] {
        // beta = 1 makes the bias correction 1 - beta^t zero.
        if !(0.0..1.0).contains(&beta) {
            return invalid(format!("{what} must be in [0, 1); got {beta}"));
        }
    }
    for (what, x) in [("lr", cfg.lr), ("eps", cfg.eps), ("weight_decay", cfg.weight_decay)] {
        if !x.is_finite() {
            return invalid(format!("{what} must be finite; got {x}"));
        }
    }
    for (what, t) in [("param", param), ("grad", grad), ("m", m), ("v", v)] {
        nonempty(op, what, t)?;
        expect_dtype(op, what, t, DType::F32)?;
    }
    same_shape(op, "grad", param, grad)?;
    same_shape(op, "m", param, m)?;
    same_shape(op, "v", param, v)?;
    let ids = [param.buffer_id(), grad.buffer_id(), m.buffer_id(), v.buffer_id()];
    if (1..4).any(|i| ids[..i].contains(&ids[i])) {
        // One buffer bound twice, once read_write, is a data race inside the kernel (and a wgpu usage conflict).
        return invalid("param, grad, m and v must be four distinct buffers".into());
    }
    fits_u32(op, "param", param.numel())
}

/// In-place AdamW (decoupled weight decay, as PyTorch's torch.optim.AdamW) with bias correction for step `step`
/// (1-based; step 0 is an Error::Invalid): m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
/// p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * p). param, grad, m, v all the same shape, f32.
pub fn adamw_step(
    gpu: &Gpu,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    cfg: &AdamW,
    step: u32,
) -> Result<()> {
    let n = validate(param, grad, m, v, cfg, step)?;
    if param.bytes() > gpu.max_binding() {
        // Elementwise: the same update over aligned ranges, each bound as a view (tensors above one binding).
        for (lo, hi) in gpu.split_rows("adamw_step", n as usize, 1)? {
            let part = |t: &Tensor| t.view(lo, &[hi - lo]);
            adamw_step(gpu, &part(param)?, &part(grad)?, &part(m)?, &part(v)?, cfg, step)?;
        }
        return Ok(());
    }
    let params = Params {
        n,
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        bias_correction1: bias_correction(cfg.beta1, step) as f32,
        bias_correction2: bias_correction(cfg.beta2, step) as f32,
    };
    gpu.dispatch(&Launch {
        op: "adamw_step",
        flops: 0,
        shader: &OPTIMIZER,
        entry: "adamw",
        overrides: &[],
        args: &[param, grad, m, v],
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(n as usize, WG_1D),
    })
}

pub mod cpu {
    use super::AdamW;

    /// One AdamW step in f64, in place.
    pub fn adamw_step(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], cfg: &AdamW, step: u32) {
        let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
        let (lr, eps, wd) = (cfg.lr as f64, cfg.eps as f64, cfg.weight_decay as f64);
        let bc1 = 1.0 - b1.powf(step as f64);
        let bc2 = 1.0 - b2.powf(step as f64);
        for i in 0..p.len() {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            p[i] -= lr * (m[i] / bc1 / ((v[i] / bc2).sqrt() + eps) + wd * p[i]);
        }
    }

    /// Consecutive steps `first_step`, `first_step + 1`, ... one per gradient; returns (param, m, v).
    pub fn adamw_steps(
        p: &[f64],
        grads: &[Vec<f64>],
        m: &[f64],
        v: &[f64],
        cfg: &AdamW,
        first_step: u32,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut p, mut m, mut v) = (p.to_vec(), m.to_vec(), v.to_vec());
        for (k, g) in grads.iter().enumerate() {
            adamw_step(&mut p, g, &mut m, &mut v, cfg, first_step + k as u32);
        }
        (p, m, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random_vec, to_f64};

    const CFG: AdamW = AdamW { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

    fn check_steps(n: usize, cfg: &AdamW, first_step: u32, seed: u64) {
        let gpu = gpu();
        let p0 = random_vec(n, seed);
        let grads: Vec<Vec<f32>> = (0..5).map(|k| random_vec(n, seed + 1 + k)).collect();
        let p = gpu.upload(&p0, &[n]).unwrap();
        let g = gpu.alloc(&[n], DType::F32).unwrap();
        let m = gpu.upload(&vec![0.0; n], &[n]).unwrap();
        let v = gpu.upload(&vec![0.0; n], &[n]).unwrap();
        for (k, gk) in grads.iter().enumerate() {
            gpu.write(&g, gk).unwrap();
            adamw_step(gpu, &p, &g, &m, &v, cfg, first_step + k as u32).unwrap();
        }
        let zeros = vec![0.0; n];
        let grads64: Vec<Vec<f64>> = grads.iter().map(|g| to_f64(g)).collect();
        let (wp, wm, wv) = cpu::adamw_steps(&to_f64(&p0), &grads64, &zeros, &zeros, cfg, first_step);
        let what = format!("n={n} wd={} steps {first_step}..", cfg.weight_decay);
        // m mixes gradients in [-1, 1] with a few f32 roundings per step; signs can cancel, so the error is
        // bounded in absolute terms by the gradient scale: 5 steps x a few ulps of 1.
        assert_close(&gpu.read(&m).unwrap(), &wm, 1e-6, 1e-6, &format!("m {what}"));
        // v sums positive terms only, so its error stays relative: 5 steps x ~3 roundings ≈ 1e-6.
        assert_close(&gpu.read(&v).unwrap(), &wv, 2e-6, 1e-12, &format!("v {what}"));
        // p: one rounding of |p| <= 1 per step, plus lr x (the few-ulp error of m/(sqrt(v)+eps), which is O(1)).
        assert_close(&gpu.read(&p).unwrap(), &wp, 1e-6, 2e-7, &format!("param {what}"));
    }

    #[test]
    fn five_steps_match_reference_with_and_without_weight_decay() {
        for (case, &n) in [1usize, 7, 255, 257, 4099, 65_537].iter().enumerate() {
            let seed = 500 + 10 * case as u64;
            check_steps(n, &CFG, 1, seed);
            check_steps(n, &AdamW { weight_decay: 0.0, ..CFG }, 1, seed);
        }
        // Late in training the bias corrections are ~1; checks the f64 host computation of 1 - beta^t.
        check_steps(1000, &CFG, 10_000, 600);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let gpu = gpu();
        let t = |n: usize| gpu.upload(&vec![0.5; n], &[n]).unwrap();
        let (p, g, m, v) = (t(4), t(4), t(4), t(4));
        let err = |r: Result<()>| r.unwrap_err();
        assert!(matches!(err(adamw_step(gpu, &p, &g, &m, &v, &CFG, 0)), Error::Invalid { op: "adamw_step", .. }));
        let short = t(3);
        for (gg, mm, vv, what) in [(&short, &m, &v, "grad"), (&g, &short, &v, "m"), (&g, &m, &short, "v")] {
            let e = err(adamw_step(gpu, &p, gg, mm, vv, &CFG, 1));
            assert!(matches!(e, Error::Shape { op: "adamw_step", what: w, .. } if w == what), "{what}: {e}");
        }
        let reshaped = g.reshape(&[2, 2]).unwrap();
        assert!(matches!(err(adamw_step(gpu, &p, &reshaped, &m, &v, &CFG, 1)), Error::Shape { .. }));
        let i = gpu.upload_i32(&[1, 2, 3, 4], &[4]).unwrap();
        assert!(matches!(err(adamw_step(gpu, &p, &i, &m, &v, &CFG, 1)), Error::DType { what: "grad", .. }));
        assert!(matches!(err(adamw_step(gpu, &p, &g, &m, &m, &CFG, 1)), Error::Invalid { .. }));
        assert!(matches!(err(adamw_step(gpu, &p, &p.clone(), &m, &v, &CFG, 1)), Error::Invalid { .. }));
        let bad_beta = AdamW { beta2: 1.0, ..CFG };
        assert!(matches!(err(adamw_step(gpu, &p, &g, &m, &v, &bad_beta, 1)), Error::Invalid { .. }));
        let bad_lr = AdamW { lr: f32::NAN, ..CFG };
        assert!(matches!(err(adamw_step(gpu, &p, &g, &m, &v, &bad_lr, 1)), Error::Invalid { .. }));
        // Nothing was dispatched: the parameter is untouched.
        assert_eq!(gpu.read(&p).unwrap(), vec![0.5; 4]);
    }
}
