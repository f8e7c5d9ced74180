//! Peak probes: the adapter's FMA throughput and copy bandwidth, measured by kernels that do nothing else, so
//! `kiln profile` can say what fraction of the machine each kernel of a step reaches.

use std::time::Instant;

use crate::launch::Launch;
use crate::ops::grid_1d;
use crate::shaders::PROBE;
use crate::{DType, Gpu, Result, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    iters: u32,
    a: f32,
    b: f32,
}

#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { n, iters, a, b })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// The recurrence's constants: |x| stays bounded (a < 1), so no chain overflows however long it runs.
const A: f32 = 0.999;
const B: f32 = 0.001;

/// `invocations` vec4 outputs of the FMA probe, each the sum of 8 chains run `iters` steps.
pub fn fma_probe(gpu: &Gpu, invocations: usize, iters: u32) -> Result<Tensor> {
    let out = gpu.alloc(&[invocations, 4], DType::F32)?;
    let params = Params { n: invocations as u32, iters, a: A, b: B };
    gpu.dispatch(&Launch {
        op: "fma_probe",
        flops: 2 * 4 * 8 * iters as u64 * invocations as u64,
        shader: &PROBE,
        entry: "fma_peak",
        overrides: &[],
        args: &[&out],
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(invocations, 256),
    })?;
    Ok(out)
}

/// dst ← src, as vec4s (both [n, 4]).
pub fn copy_probe(gpu: &Gpu, src: &Tensor, dst: &Tensor) -> Result<()> {
    crate::ops::same_shape("copy_probe", "dst", src, dst)?;
    let n = src.numel() / 4;
    let params = Params { n: n as u32, iters: 0, a: 0.0, b: 0.0 };
    gpu.dispatch(&Launch {
        op: "copy_probe",
        flops: 0,
        shader: &PROBE,
        entry: "copy_peak",
        overrides: &[],
        args: &[src, dst],
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(n, 256),
    })
}

/// Measured peaks of one adapter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    pub gflops: f64,
    /// Bytes read plus bytes written per second, in GB/s.
    pub gbps: f64,
}

/// Best of three timed runs of each probe, sized to take a few milliseconds on a software GPU and to fill a real
/// one (software adapters get 64× less work).
pub fn measure(gpu: &Gpu) -> Result<Peak> {
    let scale = if gpu.is_software() { 1 } else { 64 };
    let (inv, iters) = (16_384 * scale, 256u32);
    let n4 = (1 << 20) * scale.min(16); // 16 MiB on software, 256 MiB of vec4s on a GPU
    let src = crate::ops::elementwise::zeros(gpu, &[n4, 4])?;
    let dst = gpu.alloc(&[n4, 4], DType::F32)?;
    let best = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        f()?; // builds the pipeline
        gpu.sync()?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            f()?;
            gpu.sync()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let fma_s = best(&|| fma_probe(gpu, inv, iters).map(drop))?;
    let copy_s = best(&|| copy_probe(gpu, &src, &dst))?;
    Ok(Peak {
        gflops: (2 * 4 * 8 * iters as u64 * inv as u64) as f64 / fma_s / 1e9,
        gbps: (2 * 16 * n4) as f64 / copy_s / 1e9,
    })
}

pub mod cpu {
    /// The FMA probe's output for invocation i, lane l, in f64.
    pub fn fma_probe(i: usize, lane: usize, n: usize, iters: u32) -> f64 {
        let (a, b) = (super::A as f64, super::B as f64);
        let base = (i as f64 + 0.25 * lane as f64) / n as f64;
        (0..8)
            .map(|j| {
                let mut x = base + j as f64;
                for _ in 0..iters {
                    x = x * a + b;
                }
                x
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random_vec};

    #[test]
    fn fma_probe_matches_reference() {
        let gpu = gpu();
        for (n, iters) in [(1, 1), (7, 3), (257, 100), (1000, 17)] {
            let got = gpu.read(&fma_probe(gpu, n, iters).unwrap()).unwrap();
            let want: Vec<f64> = (0..n * 4).map(|k| cpu::fma_probe(k / 4, k % 4, n, iters)).collect();
            // f32 chains of up to 100 steps of x·a + b with |x| < 8: a few ulps per step.
            assert_close(&got, &want, 1e-5, 1e-5 * iters as f64, &format!("n {n} iters {iters}"));
        }
    }

    #[test]
    fn copy_probe_copies_and_checks_shapes() {
        let gpu = gpu();
        for n in [1, 3, 1025] {
            let v = random_vec(4 * n, n as u64);
            let src = gpu.upload(&v, &[n, 4]).unwrap();
            let dst = gpu.alloc(&[n, 4], DType::F32).unwrap();
            copy_probe(gpu, &src, &dst).unwrap();
            assert_eq!(gpu.read(&dst).unwrap(), v);
        }
        let a = gpu.alloc(&[2, 4], DType::F32).unwrap();
        let b = gpu.alloc(&[3, 4], DType::F32).unwrap();
        assert!(copy_probe(gpu, &a, &b).is_err());
    }

    #[test]
    fn peaks_are_positive_and_finite() {
        let p = measure(gpu()).unwrap();
        assert!(p.gflops > 0.0 && p.gflops.is_finite() && p.gbps > 0.0 && p.gbps.is_finite(), "{p:?}");
    }
}
