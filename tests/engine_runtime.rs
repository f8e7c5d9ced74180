//! The runtime's promises, tested on a private device each (the shared one is busy with parallel tests, which
//! would blur counts): recording batches into one submission, steady-state steps allocating nothing, the
//! profiler, adapter selection errors and shader compilation errors.

use kiln_engine::ops::{elementwise, matmul};
use kiln_engine::shaders::ShaderSource;
use kiln_engine::testing::random_vec;
use kiln_engine::{DType, Error, Gpu, Launch};

fn private_gpu() -> Gpu {
    Gpu::new().unwrap_or_else(|e| panic!("{e}"))
}

/// A small stand-in for a training step: a few kernels whose temporaries are dropped at the end.
fn step(gpu: &Gpu, x: &kiln_engine::Tensor, w: &kiln_engine::Tensor) -> kiln_engine::Tensor {
    let h = matmul::matmul(gpu, x, w, None, matmul::MatmulSpec::nn()).unwrap();
    let g = elementwise::gelu(gpu, &h).unwrap();
    let y = elementwise::add(gpu, &g, &h, 1.0).unwrap();
    elementwise::scale(gpu, &y, 0.5).unwrap()
}

#[test]
fn kernels_are_batched_into_one_submission() {
    let gpu = private_gpu();
    let x = gpu.upload(&random_vec(37 * 19, 1), &[37, 19]).unwrap();
    let w = gpu.upload(&random_vec(19 * 23, 2), &[19, 23]).unwrap();
    gpu.sync().unwrap();
    let (s0, d0) = gpu.submit_counts();
    let mut outs = Vec::new();
    for _ in 0..5 {
        outs.push(step(&gpu, &x, &w));
    }
    let (s1, d1) = gpu.submit_counts();
    assert_eq!(s1, s0, "recording kernels must not submit");
    assert_eq!(d1 - d0, 20, "5 steps × 4 kernels recorded");
    gpu.flush().unwrap();
    assert_eq!(gpu.submit_counts().0, s0 + 1, "one flush, one command buffer");
    let first = gpu.read(&outs[0]).unwrap();
    assert!(outs.iter().all(|o| gpu.read(o).unwrap() == first), "same inputs, same outputs");
}

#[test]
fn steady_state_steps_create_no_buffers() {
    let gpu = private_gpu();
    let x = gpu.upload(&random_vec(64 * 48, 3), &[64, 48]).unwrap();
    let w = gpu.upload(&random_vec(48 * 96, 4), &[48, 96]).unwrap();
    drop(step(&gpu, &x, &w)); // warm-up: the pool learns the step's sizes
    gpu.sync().unwrap();
    let before = gpu.pool_stats();
    for _ in 0..10 {
        drop(step(&gpu, &x, &w));
    }
    gpu.sync().unwrap();
    let after = gpu.pool_stats();
    assert_eq!(after.buffers_created, before.buffers_created, "a steady-state step must reuse pooled buffers");
    assert_eq!(after.live_bytes, before.live_bytes, "temporaries return to the pool");
    assert!(after.reuses >= before.reuses + 40);

    // With reuse switched off (bug hunting), every allocation is fresh and nothing is kept.
    gpu.set_buffer_reuse(false);
    let created = gpu.pool_stats().buffers_created;
    let out = step(&gpu, &x, &w);
    assert_eq!(gpu.pool_stats().buffers_created, created + 4);
    let reference = step(&gpu, &x, &w);
    assert_eq!(gpu.read(&out).unwrap(), gpu.read(&reference).unwrap());
}

#[test]
fn pool_reports_peak_bytes() {
    let gpu = private_gpu();
    gpu.reset_peak();
    let base = gpu.pool_stats().live_bytes;
    {
        let _a = gpu.alloc(&[1 << 20], DType::F32).unwrap();
        let _b = gpu.alloc(&[1 << 20], DType::F32).unwrap();
    }
    let s = gpu.pool_stats();
    assert_eq!(s.live_bytes, base);
    assert_eq!(s.peak_bytes, base + 2 * (4 << 20), "two 4 MiB tensors were alive at once");
}

#[test]
fn profiler_times_each_kernel() {
    let gpu = private_gpu();
    let x = gpu.upload(&random_vec(128 * 128, 5), &[128, 128]).unwrap();
    gpu.profile_start().unwrap();
    for _ in 0..3 {
        drop(step(&gpu, &x, &x));
    }
    let times = gpu.profile_stop().unwrap();
    let names: Vec<&str> = times.iter().map(|t| t.name).collect();
    for want in ["gelu", "add", "scale"] {
        let t = times.iter().find(|t| t.name == want).unwrap_or_else(|| panic!("{want} missing from {names:?}"));
        assert_eq!(t.calls, 3, "{want}");
        assert!(t.total_ms >= 0.0 && t.total_ms.is_finite());
    }
    let mm = times.iter().find(|t| t.name.starts_with("matmul")).expect("a matmul entry");
    assert_eq!(mm.calls, 3);
    assert!(mm.total_ms > 0.0, "a 128³ matmul takes measurable time ({} timestamps)", gpu.profiler_uses_timestamps());
    // Stopped: nothing more is recorded.
    drop(step(&gpu, &x, &x));
    gpu.profile_start().unwrap();
    assert!(gpu.profile_stop().unwrap().is_empty());
}

#[test]
fn unknown_adapter_names_the_available_ones() {
    match Gpu::open(Some("no-such-adapter-zzz")) {
        Err(Error::AdapterNotFound { wanted, available }) => {
            assert_eq!(wanted, "no-such-adapter-zzz");
            assert!(!available.is_empty());
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("an adapter matched a name nobody has"),
    }
}

#[test]
fn no_adapter_error_says_how_to_fix_it() {
    let msg = Error::NoAdapter { detail: "none".into() }.to_string();
    assert!(msg.contains("tools/setup.sh") && msg.contains("mesa-vulkan-drivers"), "{msg}");
}

#[test]
fn broken_shader_is_a_typed_error() {
    static BROKEN: ShaderSource = ShaderSource {
        name: "broken.wgsl",
        source: "@compute @workgroup_size(1) fn main() { let x: f32 = undefined_thing; }",
        trusted: false,
    };
    let gpu = private_gpu();
    let t = gpu.alloc(&[4], DType::F32).unwrap();
    let r = gpu.dispatch(&Launch {
        op: "broken",
        shader: &BROKEN,
        entry: "main",
        overrides: &[],
        args: &[&t],
        params: &[],
        groups: [1, 1, 1],
        flops: 0,
    });
    assert!(matches!(r, Err(Error::Gpu { context: "shader compilation", .. })), "{r:?}");
    // The device stays usable.
    elementwise::fill(&gpu, &t, 1.0).unwrap();
    assert_eq!(gpu.read(&t).unwrap(), vec![1.0; 4]);
}

#[test]
fn uploads_between_kernels_keep_program_order_without_submitting() {
    let gpu = private_gpu();
    let t = gpu.upload(&[1.0, 2.0, 3.0], &[3]).unwrap();
    let before = elementwise::scale(&gpu, &t, 10.0).unwrap(); // recorded, reads t = [1, 2, 3]
    let (s0, _) = gpu.submit_counts();
    gpu.write(&t, &[5.0, 6.0, 7.0]).unwrap(); // recorded after the scale: must not change what it read
    let after = elementwise::scale(&gpu, &t, 10.0).unwrap();
    assert_eq!(gpu.submit_counts().0, s0, "an upload mid-recording must not submit");
    assert_eq!(gpu.read(&before).unwrap(), vec![10.0, 20.0, 30.0]);
    assert_eq!(gpu.read(&after).unwrap(), vec![50.0, 60.0, 70.0]);
}
