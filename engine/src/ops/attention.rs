//! Causal multi-head self-attention, forward: a flash-style kernel that reads q, k, v straight from GPT-2's packed
//! c_attn output and never materializes the T×T score matrix, plus its plain f64 reference.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::{fits_u32, nonempty};
use crate::shaders::ATTENTION;
use crate::{DType, Error, Gpu, Result, Tensor};

/// Largest head size the kernel holds in its private arrays (`4 * MAX_HS4` in the WGSL).
pub const MAX_HEAD_SIZE: usize = 128;
/// Query rows per workgroup (the `BR` override).
const BR: u32 = 64;
/// vec4s per K (and per V) tile in workgroup memory, and the most keys per block (`TILE4`, `MAX_BC` in the WGSL).
const TILE4: usize = 512;
const MAX_BC: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    b: u32,
    t: u32,
    c: u32,
    nh: u32,
    hs: u32,
    bc: u32,
    scale: f32,
}

/// qkv: [B, T, 3C] f32 exactly as GPT-2's c_attn produces it (per position: q for all heads, then k, then v; head h
/// uses channels h*HS..(h+1)*HS of each part), n_head divides C.
/// Returns (y [B, T, C] with heads merged back as GPT-2 expects, lse [B, NH, T] = per-row log-sum-exp of the scaled
/// scores, which the backward pass will need).
pub fn attention_forward(gpu: &Gpu, qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention_forward";
    expect_dtype(OP, "qkv", qkv, DType::F32)?;
    let &[b, t, c3] = qkv.shape() else {
        return Err(Error::Shape {
            op: OP,
            what: "qkv",
            expected: "3-D [B, T, 3C]".into(),
            got: format!("{:?}", qkv.shape()),
        });
    };
    nonempty(OP, "qkv", qkv)?;
    if c3 % 3 != 0 {
        return Err(Error::Shape {
            op: OP,
            what: "qkv last dimension",
            expected: "a multiple of 3 ([q | k | v])".into(),
            got: format!("{c3} (shape {:?})", qkv.shape()),
        });
    }
    let c = c3 / 3;
    if n_head == 0 || c % n_head != 0 {
        let message = format!("n_head = {n_head} must be at least 1 and divide the channel count C = {c}");
        return Err(Error::Invalid { op: OP, message });
    }
    let hs = c / n_head;
    if hs > MAX_HEAD_SIZE {
        let message =
            format!("head size {hs} (C = {c} / n_head = {n_head}) exceeds the kernel's max of {MAX_HEAD_SIZE}");
        return Err(Error::Invalid { op: OP, message });
    }
    fits_u32(OP, "qkv", qkv.numel())?;
    // The head loops' trip count in vec4s, an override so the shader compiler can unroll them (`HS4` in the WGSL).
    let hs4 = hs.next_power_of_two().div_ceil(4);
    let params = Params {
        b: b as u32,
        t: t as u32,
        c: c as u32,
        nh: n_head as u32,
        hs: hs as u32,
        bc: (TILE4 / hs4).min(MAX_BC) as u32,
        scale: 1.0 / (hs as f32).sqrt(),
    };
    let y = gpu.alloc(&[b, t, c], DType::F32)?;
    let lse = gpu.alloc(&[b, n_head, t], DType::F32)?;
    gpu.dispatch(&Launch {
        op: OP,
        shader: &ATTENTION,
        entry: "attention_forward",
        overrides: &[("BR", BR as f64), ("HS4", hs4 as f64)],
        args: &[qkv, &y, &lse],
        params: bytemuck::bytes_of(&params),
        groups: [(t as u32).div_ceil(BR), n_head as u32, b as u32],
    })?;
    Ok((y, lse))
}

pub mod cpu {
    /// softmax(q·kᵀ/sqrt(HS) + causal mask)·v per (batch, head), the textbook way: the full score row, then its max,
    /// sum and weighted average. Returns (y [B, T, C], lse [B, NH, T]).
    pub fn attention_forward(qkv: &[f64], b: usize, t: usize, c: usize, n_head: usize) -> (Vec<f64>, Vec<f64>) {
        assert_eq!(qkv.len(), b * t * 3 * c, "qkv length");
        let hs = c / n_head;
        let scale = 1.0 / (hs as f64).sqrt();
        let at = |bi: usize, ti: usize, part: usize, h: usize| (bi * t + ti) * 3 * c + part * c + h * hs;
        let mut y = vec![0.0; b * t * c];
        let mut lse = vec![0.0; b * n_head * t];
        let mut scores = vec![0.0; t];
        for bi in 0..b {
            for h in 0..n_head {
                for i in 0..t {
                    let q = &qkv[at(bi, i, 0, h)..][..hs];
                    for (j, s) in scores[..=i].iter_mut().enumerate() {
                        let k = &qkv[at(bi, j, 1, h)..][..hs];
                        *s = q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale;
                    }
                    let m = scores[..=i].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores[..=i].iter().map(|s| (s - m).exp()).sum();
                    lse[(bi * n_head + h) * t + i] = m + sum.ln();
                    let out = &mut y[(bi * t + i) * c + h * hs..][..hs];
                    for (j, s) in scores[..=i].iter().enumerate() {
                        let p = (s - m).exp() / sum;
                        let v = &qkv[at(bi, j, 2, h)..][..hs];
                        out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
                    }
                }
            }
        }
        (y, lse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random_vec, to_f64};

    /// Worst-case f32 error of one output, u = 2^-24 and amp = the largest |q| (k, v lie in [-1, 1)): a score sums
    /// HS products after scaling by 1/sqrt(HS), so it is off by at most amp·HS^1.5·u; y and l sum T terms, plus one
    /// rounding per rescaled block (fewer than T), so they are off by T·u relative; exp/log on the GPU add a few ulps.
    /// f32::EPSILON = 2u doubles that bound for margin.
    fn tol(t: usize, hs: usize, amp: f64) -> f64 {
        (amp * (hs as f64).powf(1.5) + 2.0 * t as f64) * f32::EPSILON as f64 + 1e-6
    }

    /// Random qkv with q multiplied by `amp`: a large amp makes the softmax peaky, so the running max moves between
    /// key blocks and the online rescaling is exercised for real.
    fn random_qkv(b: usize, t: usize, c: usize, amp: f32, seed: u64) -> Vec<f32> {
        let mut x = random_vec(b * t * 3 * c, seed);
        x.chunks_mut(3 * c).for_each(|row| row[..c].iter_mut().for_each(|v| *v *= amp));
        x
    }

    fn check(gpu: &Gpu, (b, t, c, nh): (usize, usize, usize, usize), amp: f32, seed: u64) {
        let x = random_qkv(b, t, c, amp, seed);
        let (y, lse) = attention_forward(gpu, &gpu.upload(&x, &[b, t, 3 * c]).unwrap(), nh).unwrap();
        assert_eq!((y.shape(), lse.shape()), (&[b, t, c][..], &[b, nh, t][..]));
        let (want_y, want_lse) = cpu::attention_forward(&to_f64(&x), b, t, c, nh);
        let atol = tol(t, c / nh, amp as f64);
        let what = format!("(B,T,C,NH)=({b},{t},{c},{nh}) amp {amp}");
        // |y| <= max|v| < 1 (a convex combination of v rows), so the absolute bound is the right measure.
        assert_close(&gpu.read(&y).unwrap(), &want_y, 0.0, atol, &format!("y {what}"));
        // lse = m + log(l) adds one rounding relative to |lse| on top of the same bound.
        assert_close(&gpu.read(&lse).unwrap(), &want_lse, f32::EPSILON as f64, atol, &format!("lse {what}"));
    }

    #[test]
    fn matches_reference_on_odd_shapes() {
        let gpu = gpu();
        let shapes = [
            (1, 1, 8, 1),
            (2, 7, 12, 3),
            (1, 33, 48, 2),
            (3, 65, 64, 4),
            (1, 200, 96, 3),
            (2, 129, 32, 1),
            (1, 70, 128, 2), // HS = 64, GPT-2's head size: 32-key blocks
            (1, 40, 256, 2), // HS = 128, the kernel's max: 16-key blocks
            (2, 19, 15, 3),  // HS = 5, odd
        ];
        for (case, &shape) in shapes.iter().enumerate() {
            check(gpu, shape, 1.0, case as u64);
            check(gpu, shape, 6.0, 100 + case as u64);
        }
    }

    #[test]
    fn long_sequence_matches_and_allocates_only_outputs() {
        // A private Gpu: the shared one's pool is used by tests running in parallel threads, which would make the
        // peak-bytes assertion racy.
        let gpu = Gpu::new().unwrap();
        let (b, t, c, nh) = (1, 1024, 32, 2);
        let x = random_qkv(b, t, c, 3.0, 7);
        let qkv = gpu.upload(&x, &[b, t, 3 * c]).unwrap();
        gpu.sync().unwrap();
        let before = gpu.pool_stats().live_bytes;
        gpu.reset_peak();
        let (y, lse) = attention_forward(&gpu, &qkv, nh).unwrap();
        gpu.sync().unwrap();
        let added = gpu.pool_stats().peak_bytes - before;
        let outputs = y.bytes() + lse.bytes();
        // Size classes round up by at most 12.5%; a T×T score matrix for even one head would be 4 MiB here.
        assert!(added <= outputs * 9 / 8, "attention allocated {added} bytes beyond its outputs' {outputs}");
        assert!(added < (t * t * 4) as u64 / 16);
        let (want_y, want_lse) = cpu::attention_forward(&to_f64(&x), b, t, c, nh);
        let atol = tol(t, c / nh, 3.0); // same bound as above, dominated by the 2·T·eps term here
        assert_close(&gpu.read(&y).unwrap(), &want_y, 0.0, atol, "y T=1024");
        assert_close(&gpu.read(&lse).unwrap(), &want_lse, f32::EPSILON as f64, atol, "lse T=1024");
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let gpu = gpu();
        let up = |shape: &[usize]| gpu.upload(&vec![0.0; shape.iter().product()], shape).unwrap();
        let invalid = |r: Result<(Tensor, Tensor)>, needle: &str| match r {
            Err(Error::Invalid { op: "attention_forward", message }) => assert!(message.contains(needle), "{message}"),
            other => panic!("expected Invalid mentioning {needle:?}, got {:?}", other.map(|_| ())),
        };
        invalid(attention_forward(gpu, &up(&[1, 4, 30]), 3), "divide"); // C = 10, 3 heads
        invalid(attention_forward(gpu, &up(&[1, 4, 30]), 0), "at least 1");
        invalid(attention_forward(gpu, &up(&[1, 2, 768]), 1), "128"); // head size 256
        let shape_err =
            |r: Result<(Tensor, Tensor)>| assert!(matches!(r, Err(Error::Shape { op: "attention_forward", .. })));
        shape_err(attention_forward(gpu, &up(&[1, 4, 10]), 1)); // not [q | k | v]
        shape_err(attention_forward(gpu, &up(&[4, 24]), 1)); // 2-D
        let ints = gpu.upload_i32(&[0; 24], &[1, 2, 12]).unwrap();
        assert!(matches!(attention_forward(gpu, &ints, 1), Err(Error::DType { .. })));
        // Empty tensors cannot be built (`alloc` and `reshape` refuse them), so `nonempty` is a guard only.
    }
}
