//! Kernel benchmarks: WGSL matmul variants (forward and the backward's transposed products), attention forward
//! and backward (multi-head and grouped-query), the Llama row kernels beside GPT-2's, and a one-block training step
//! in tokens/s, with the CPU sgemm of `matrixmultiply` on the same
//! sizes in the same run as the baseline. Throughput is reported in FLOPs (criterion prints GFLOP/s as elem/s
//! scaled: read "Gelem/s" as GFLOP/s). Run: `cargo bench --bench kernels`; filter: `cargo bench --bench kernels -- 1024`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_engine::autograd::{mean_weights, Param, Tape, Var};
use kiln_engine::ops::adamw::{adamw_step, AdamW};
use kiln_engine::ops::attention::{attention_backward, attention_forward, AttentionDesign};
use kiln_engine::ops::elementwise::zeros;
use kiln_engine::ops::matmul::{matmul_shape, matmul_with, MatmulSpec, MatmulVariant};
use kiln_engine::testing::{gpu, random_vec};
use kiln_engine::{DType, Tensor};

/// Wall time of `iters` calls recorded back to back, from an idle GPU until the GPU has finished them all.
fn gpu_time(iters: u64, mut call: impl FnMut()) -> Duration {
    let gpu = gpu();
    gpu.sync().unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        call();
    }
    gpu.sync().unwrap();
    start.elapsed()
}

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
            group.bench_function(BenchmarkId::new(v.to_string(), name), |bch| {
                bch.iter_custom(|iters| {
                    gpu_time(iters, || {
                        matmul_with(gpu, v, &a, &b, None, &out, MatmulSpec::nn()).unwrap();
                    })
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
/// lower triangle). Each design the adapter can run, in one process (tiled and register on 8-lane lavapipe).
fn bench_attention(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("attention_forward [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let (b, ch, nh) = (1, 768, 12);
    for t in [256, 1024] {
        group.throughput(Throughput::Elements(2 * (b * t * t * ch) as u64));
        let qkv = gpu.upload(&random_vec(b * t * 3 * ch, 3), &[b, t, 3 * ch]).unwrap();
        for design in AttentionDesign::ALL.into_iter().filter(|d| d.available(gpu, ch / nh)) {
            let id = BenchmarkId::new(format!("attention_forward_{design:?}"), format!("B{b}_T{t}_C{ch}_NH{nh}"));
            group.bench_function(id, |bch| {
                bch.iter_custom(|iters| {
                    design.with(|| {
                        gpu_time(iters, || {
                            attention_forward(gpu, &qkv, nh).unwrap();
                        })
                    })
                })
            });
        }
    }
    group.finish();
}

/// Weight-gradient and input-gradient products of the GPT-2 MLP (X [4096, 768], W [768, 3072], dY [4096, 3072]):
/// dX = dY·Wᵀ and dW = Xᵀ·dY read the stored operands transposed, never copying them. CPU sgemm gets the same
/// strided operands.
fn bench_matmul_backward(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("matmul_backward [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let (tokens, ch, hidden) = (4096, 768, 3072);
    let x = random_vec(tokens * ch, 4);
    let w = random_vec(ch * hidden, 5);
    let dy = random_vec(tokens * hidden, 6);
    let (tx, tw, tdy) = (
        gpu.upload(&x, &[tokens, ch]).unwrap(),
        gpu.upload(&w, &[ch, hidden]).unwrap(),
        gpu.upload(&dy, &[tokens, hidden]).unwrap(),
    );
    let dx = gpu.alloc(&[tokens, ch], DType::F32).unwrap();
    let dw = gpu.alloc(&[ch, hidden], DType::F32).unwrap();
    // (name, A, B, out, spec, m, n, k, A strides (row, col) as sgemm reads op(A), B strides likewise, host A, host B)
    let cases = [
        (
            "dX=dY·Wᵀ_4096x768x3072",
            &tdy,
            &tw,
            &dx,
            MatmulSpec::nt(),
            tokens,
            ch,
            hidden,
            (hidden, 1),
            (1, hidden),
            &dy,
            &w,
        ),
        ("dW=Xᵀ·dY_768x3072x4096", &tx, &tdy, &dw, MatmulSpec::tn(), ch, hidden, tokens, (1, ch), (hidden, 1), &x, &dy),
    ];
    for (name, a, b, out, spec, m, n, k, sa, sb, ha, hb) in cases {
        group.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        for v in MatmulVariant::all_available(gpu) {
            if gpu.is_software() && v == MatmulVariant::Tiled {
                continue; // seconds per call on a software GPU (see bench_matmul)
            }
            group.bench_function(BenchmarkId::new(v.to_string(), name), |bch| {
                bch.iter_custom(|iters| {
                    gpu_time(iters, || {
                        matmul_with(gpu, v, a, b, None, out, spec).unwrap();
                    })
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
                    ha.as_ptr(),
                    sa.0 as isize,
                    sa.1 as isize,
                    hb.as_ptr(),
                    sb.0 as isize,
                    sb.1 as isize,
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

/// Flash attention backward (dQ, dK, dV from the recomputed probabilities): counted as 5·T²·C FLOPs per sequence
/// (QKᵀ recomputed, dO·Vᵀ, Pᵀ·dO, dS·K, dSᵀ·Q over the causal half). Each design the adapter can run.
fn bench_attention_backward(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("attention_backward [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let (b, ch, nh) = (1, 768, 12);
    for t in [256, 1024] {
        group.throughput(Throughput::Elements(5 * (b * t * t * ch) as u64));
        let qkv = gpu.upload(&random_vec(b * t * 3 * ch, 7), &[b, t, 3 * ch]).unwrap();
        let dy = gpu.upload(&random_vec(b * t * ch, 8), &[b, t, ch]).unwrap();
        let (y, lse) = attention_forward(gpu, &qkv, nh).unwrap();
        for design in AttentionDesign::ALL.into_iter().filter(|d| d.available(gpu, ch / nh)) {
            let id = BenchmarkId::new(format!("attention_backward_{design:?}"), format!("B{b}_T{t}_C{ch}_NH{nh}"));
            group.bench_function(id, |bch| {
                bch.iter_custom(|iters| {
                    design.with(|| {
                        gpu_time(iters, || {
                            attention_backward(gpu, &qkv, &y, &lse, &dy, nh).unwrap();
                        })
                    })
                })
            });
        }
    }
    group.finish();
}

/// One training step (forward, backward, AdamW) of a one-block transformer through the autodiff tape, in
/// tokens/s: embedding → LN → attention → residual → LN → MLP → residual → LN → tied lm_head → cross-entropy.
fn bench_block_step(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("block_step [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let (b, t, ch, nh, vocab) = (4, 128, 128, 4, 512);
    let shapes: [(&str, Vec<usize>); 13] = [
        ("wte", vec![vocab, ch]),
        ("wpe", vec![t, ch]),
        ("ln1_g", vec![ch]),
        ("ln1_b", vec![ch]),
        ("w_qkv", vec![ch, 3 * ch]),
        ("b_qkv", vec![3 * ch]),
        ("w_proj", vec![ch, ch]),
        ("b_proj", vec![ch]),
        ("ln2_g", vec![ch]),
        ("ln2_b", vec![ch]),
        ("w_fc", vec![ch, 4 * ch]),
        ("b_fc", vec![4 * ch]),
        ("w_fp", vec![4 * ch, ch]),
    ];
    let params: Vec<Param> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, s))| {
            let n: usize = s.iter().product();
            let v: Vec<f32> = random_vec(n, 20 + i as u64)
                .iter()
                .map(|x| if name.ends_with("_g") { 1.0 } else { 0.02 * x })
                .collect();
            Param::new(gpu, *name, gpu.upload(&v, s).unwrap()).unwrap()
        })
        .collect();
    let moments: Vec<(Tensor, Tensor)> =
        params.iter().map(|p| (zeros(gpu, p.value.shape()).unwrap(), zeros(gpu, p.value.shape()).unwrap())).collect();
    let tokens: Vec<i32> = (0..b * t).map(|i| ((i * 7919) % vocab) as i32).collect();
    let targets_host: Vec<i32> = (0..b * t).map(|i| ((i * 104_729 + 1) % vocab) as i32).collect();
    let targets = gpu.upload_i32(&targets_host, &[b, t]).unwrap();
    let weights = gpu.upload(&mean_weights(&targets_host), &[b * t]).unwrap();
    let cfg = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 };
    let nn = MatmulSpec::nn();
    let mut step = 0u32;
    let mut run_step = || {
        step += 1;
        let mut tape = Tape::new(gpu);
        let v: Vec<Var> = params[2..].iter().map(|p| tape.param(p)).collect();
        let x = tape.embedding(&tokens, b, t, &params[0], &params[1]).unwrap();
        let h = tape.layernorm(x, v[0], v[1], 1e-5).unwrap();
        let qkv = tape.matmul(h, v[2], Some(v[3]), nn).unwrap();
        let a = tape.attention(qkv, nh).unwrap();
        let a = tape.matmul(a, v[4], Some(v[5]), nn).unwrap();
        let x = tape.add(x, a).unwrap();
        let h = tape.layernorm(x, v[6], v[7], 1e-5).unwrap();
        let f = tape.matmul(h, v[8], Some(v[9]), nn).unwrap();
        let f = tape.gelu(f).unwrap();
        let f = tape.matmul(f, v[10], None, nn).unwrap();
        let x = tape.add(x, f).unwrap();
        let h = tape.layernorm(x, v[6], v[7], 1e-5).unwrap();
        let wte = tape.param(&params[0]);
        let logits = tape.matmul(h, wte, None, MatmulSpec::nt()).unwrap();
        let losses = tape.cross_entropy(logits, &targets).unwrap();
        let loss = tape.weighted_sum(losses, &weights).unwrap();
        tape.backward(loss).unwrap();
        for (p, (m, v)) in params.iter().zip(&moments) {
            adamw_step(gpu, &p.value, &p.grad, m, v, &cfg, step).unwrap();
            p.zero_grad(gpu).unwrap();
        }
    };
    group.throughput(Throughput::Elements((b * t) as u64));
    group.bench_function(BenchmarkId::new("fwd_bwd_adamw", format!("B{b}_T{t}_C{ch}_NH{nh}_V{vocab}")), |bch| {
        bch.iter_custom(|iters| {
            gpu_time(iters, || {
                run_step();
            })
        })
    });
    group.finish();
}

/// The Llama family's row kernels beside the GPT-2 ones they replace, on the same data in the same run: RMSNorm vs
/// LayerNorm and SwiGLU vs GELU (forward + backward), and rotary embeddings, in GB/s of the bytes each kernel must
/// move at least (inputs read once, outputs written once). SmolLM2-135M's shapes: C = 576, MLP 1536, 9 query heads
/// and 3 KV heads of 64, B·T = 1024 tokens.
fn bench_llama_rows(c: &mut Criterion) {
    use kiln_engine::ops::elementwise::{gelu, gelu_backward, swiglu, swiglu_backward};
    use kiln_engine::ops::norm::{layernorm, layernorm_backward, rmsnorm, rmsnorm_backward};
    use kiln_engine::ops::rope::{rope, RopeTable};
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("llama_rows [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let (n, ch, inner) = (1024, 576, 1536);
    let x = gpu.upload(&random_vec(n * ch, 1), &[n, ch]).unwrap();
    let dy = gpu.upload(&random_vec(n * ch, 2), &[n, ch]).unwrap();
    let g = gpu.upload(&vec![1.0; ch], &[ch]).unwrap();
    let beta = gpu.upload(&vec![0.0; ch], &[ch]).unwrap();
    let f32s = |elems: usize| (elems * 4) as u64;
    // Forward reads x, writes y; backward reads x and dy, writes dx (plus the per-row statistics, negligible).
    group.throughput(Throughput::Bytes(f32s(5 * n * ch)));
    group.bench_function(BenchmarkId::new("rmsnorm_fwd_bwd", format!("N{n}_C{ch}")), |bch| {
        bch.iter_custom(|iters| {
            gpu_time(iters, || {
                let (_, rstd) = rmsnorm(gpu, &x, &g, 1e-5).unwrap();
                rmsnorm_backward(gpu, &dy, &x, &g, &rstd).unwrap();
            })
        })
    });
    group.bench_function(BenchmarkId::new("layernorm_fwd_bwd", format!("N{n}_C{ch}")), |bch| {
        bch.iter_custom(|iters| {
            gpu_time(iters, || {
                let (_, mean, rstd) = layernorm(gpu, &x, &g, &beta, 1e-5).unwrap();
                layernorm_backward(gpu, &dy, &x, &g, &mean, &rstd).unwrap();
            })
        })
    });
    // SwiGLU: forward reads [N, 2I], writes [N, I]; backward reads both and dy, writes [N, 2I]. GELU on [N, 2I] is
    // the same number of pre-activations (GPT-2's MLP at this width).
    let gu = gpu.upload(&random_vec(n * 2 * inner, 3), &[n, 2 * inner]).unwrap();
    let dh = gpu.upload(&random_vec(n * inner, 4), &[n, inner]).unwrap();
    let dgu = gpu.upload(&random_vec(n * 2 * inner, 5), &[n, 2 * inner]).unwrap();
    group.throughput(Throughput::Bytes(f32s(8 * n * inner)));
    group.bench_function(BenchmarkId::new("swiglu_fwd_bwd", format!("N{n}_I{inner}")), |bch| {
        bch.iter_custom(|iters| {
            gpu_time(iters, || {
                swiglu(gpu, &gu).unwrap();
                swiglu_backward(gpu, &gu, &dh).unwrap();
            })
        })
    });
    group.throughput(Throughput::Bytes(f32s(10 * n * inner)));
    group.bench_function(BenchmarkId::new("gelu_fwd_bwd", format!("N{n}_{}", 2 * inner)), |bch| {
        bch.iter_custom(|iters| {
            gpu_time(iters, || {
                gelu(gpu, &gu).unwrap();
                gelu_backward(gpu, &gu, &dgu).unwrap();
            })
        })
    });
    let (nh, nkv, hs) = (9, 3, 64);
    let w = (nh + 2 * nkv) * hs;
    let table = RopeTable::new(gpu, hs, 2048, 100_000.0).unwrap();
    let qkv = gpu.upload(&random_vec(n * w, 6), &[n, w]).unwrap();
    let pos = gpu.upload_i32(&(0..n as i32).collect::<Vec<_>>(), &[n]).unwrap();
    group.throughput(Throughput::Bytes(f32s(2 * n * w)));
    group.bench_function(BenchmarkId::new("rope_fwd", format!("N{n}_W{w}")), |bch| {
        bch.iter_custom(|iters| {
            gpu_time(iters, || {
                rope(gpu, &qkv, &pos, &table, (nh, nkv)).unwrap();
            })
        })
    });
    group.finish();
}

/// Grouped-query attention (SmolLM2: 9 query heads sharing 3 KV heads of 64) beside multi-head attention with the
/// same query heads, forward + backward, counted as 7·T²·C FLOPs (2 forward products and 5 backward, causal half).
fn bench_gqa_attention(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("gqa_attention [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let (b, t, nh, hs) = (1, 256, 9, 64);
    let ch = nh * hs;
    group.throughput(Throughput::Elements(7 * (b * t * t * ch) as u64));
    for nkv in [3, 9] {
        let w = (nh + 2 * nkv) * hs;
        let qkv = gpu.upload(&random_vec(b * t * w, 7), &[b, t, w]).unwrap();
        let dy = gpu.upload(&random_vec(b * t * ch, 8), &[b, t, ch]).unwrap();
        group.bench_function(BenchmarkId::new("fwd_bwd", format!("T{t}_NH{nh}_NKV{nkv}_HS{hs}")), |bch| {
            bch.iter_custom(|iters| {
                gpu_time(iters, || {
                    let (y, lse) = attention_forward(gpu, &qkv, (nh, nkv)).unwrap();
                    attention_backward(gpu, &qkv, &y, &lse, &dy, (nh, nkv)).unwrap();
                })
            })
        });
    }
    group.finish();
}

criterion_group!(
    name = benches;
    // Criterion's charts need a system font that containers and CI machines often lack; the numbers are printed.
    config = Criterion::default().without_plots();
    targets = bench_matmul,
    bench_matmul_backward,
    bench_attention,
    bench_attention_backward,
    bench_block_step,
    bench_llama_rows,
    bench_gqa_attention
);
criterion_main!(benches);
