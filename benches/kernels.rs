//! Kernel benchmarks: WGSL matmul variants and attention, with the CPU sgemm of `matrixmultiply` on the same
//! sizes in the same run as the baseline. Throughput is reported in FLOPs (criterion prints GFLOP/s as elem/s
//! scaled: read "Gelem/s" as GFLOP/s). Run: `cargo bench --bench kernels`; filter: `cargo bench --bench kernels -- 1024`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_engine::ops::attention::attention_forward;
use kiln_engine::ops::matmul::{matmul_shape, matmul_with, MatmulSpec, MatmulVariant};
use kiln_engine::testing::{gpu, random_vec};
use kiln_engine::DType;

/// (name, m, n, k): square sizes and the GPT-2 MLP shape (B·T = 4096 tokens, C = 768, 4C = 3072).
const MATMUL_SIZES: &[(&str, usize, usize, usize)] = &[
    ("256", 256, 256, 256),
    ("512", 512, 512, 512),
    ("1024", 1024, 1024, 1024),
    ("2048", 2048, 2048, 2048),
    ("gpt_4096x768x3072", 4096, 3072, 768),
];

fn bench_matmul(c: &mut Criterion) {
    // matrixmultiply reads its thread count once per process; default to every core, as the baseline should.
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("MATMUL_NUM_THREADS", cores.to_string());
    }
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("matmul [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for &(name, m, n, k) in MATMUL_SIZES {
        let flops = 2 * (m * n * k) as u64;
        group.throughput(Throughput::Elements(flops));
        let av = random_vec(m * k, 1);
        let bv = random_vec(k * n, 2);
        let a = gpu.upload(&av, &[m, k]).unwrap();
        let b = gpu.upload(&bv, &[k, n]).unwrap();
        let out = gpu.alloc(&[m, n], DType::F32).unwrap();
        assert_eq!(matmul_shape(&a, &b, MatmulSpec::nn()).unwrap().flops(), flops);
        for v in MatmulVariant::all_available(gpu) {
            // The tiled design runs at a few GFLOP/s on a software GPU: past 1024³ one call takes many seconds
            // and says nothing new, so software adapters time it on the smaller sizes only.
            if gpu.is_software() && v == MatmulVariant::Tiled && m * n * k > 1 << 30 {
                continue;
            }
            group.bench_function(BenchmarkId::new(v.name(), name), |bch| {
                bch.iter_custom(|iters| {
                    gpu.sync().unwrap();
                    let t = Instant::now();
                    for _ in 0..iters {
                        matmul_with(gpu, v, &a, &b, None, &out, MatmulSpec::nn()).unwrap();
                    }
                    gpu.sync().unwrap(); // the GPU has finished inside the timed region
                    t.elapsed()
                })
            });
        }
        let mut cv = vec![0f32; m * n];
        group.bench_function(BenchmarkId::new("cpu_sgemm_matrixmultiply", name), |bch| {
            bch.iter(|| unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    av.as_ptr(),
                    k as isize,
                    1,
                    bv.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    cv.as_mut_ptr(),
                    n as isize,
                    1,
                )
            })
        });
    }
    group.finish();
}

/// Causal attention forward at GPT-2 width (C = 768, 12 heads): 2·T²·C FLOPs per sequence (QKᵀ and PV over the
/// lower triangle).
fn bench_attention(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("attention_forward [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let (b, ch, nh) = (1, 768, 12);
    for t in [256, 1024] {
        group.throughput(Throughput::Elements(2 * (b * t * t * ch) as u64));
        let qkv = gpu.upload(&random_vec(b * t * 3 * ch, 3), &[b, t, 3 * ch]).unwrap();
        group.bench_function(BenchmarkId::new("attention_forward", format!("B{b}_T{t}_C{ch}_NH{nh}")), |bch| {
            bch.iter_custom(|iters| {
                gpu.sync().unwrap();
                let start = Instant::now();
                for _ in 0..iters {
                    attention_forward(gpu, &qkv, nh).unwrap();
                }
                gpu.sync().unwrap();
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_matmul, bench_attention);
criterion_main!(benches);
