//! `kiln gpu-bench`: Kiln's side of `tools/gpu-bench.sh` — the matmul (autotuned design), causal attention
//! forward + backward and a whole training step, each timed on this adapter and written as JSON with its exact
//! shapes, so `benches/torch_bench.py` runs the same work in PyTorch in the same session and prints the ratio.
//! `--quick` takes shapes a software GPU finishes in about a minute (the default is what a real GPU is measured at).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use kiln_engine::ops::{attention, matmul, matmul_tune};
use kiln_engine::testing::random_vec;
use kiln_engine::{DType, Gpu};
use kiln_model::arch::config::ModelConfig;
use kiln_model::arch::Model;
use kiln_model::train::pretrain::{check_fits, TrainConfig, Trainer};
use serde::Serialize;

#[derive(Serialize)]
struct MatmulRow {
    name: String,
    m: usize,
    n: usize,
    k: usize,
    variant: String,
    ms: f64,
    gflops: f64,
}

#[derive(Serialize)]
struct AttentionRow {
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    /// Forward + backward, per call.
    ms: f64,
    /// Causal FLOPs counted as FlashAttention-2 does: forward 2 T×T×HS products, backward 5 (S recomputed, dV,
    /// dP, dQ, dK); PyTorch's side uses the same count.
    gflops: f64,
}

#[derive(Serialize)]
struct StepRow {
    preset: String,
    vocab: usize,
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    n_ctx: usize,
    params: usize,
    batch: usize,
    seq_len: usize,
    ms: f64,
    tokens_per_s: f64,
}

#[derive(Serialize)]
struct Report {
    adapter: String,
    driver: String,
    software: bool,
    quick: bool,
    matmul: Vec<MatmulRow>,
    attention: Vec<AttentionRow>,
    step: Vec<StepRow>,
}

/// Seconds per call: one untimed call (pipelines, tuning), one timed alone for an estimate, then enough calls
/// recorded back to back to fill about `min_s` (at least `min_reps`) and one sync: calls only record into the
/// encoder, so the sync is where the GPU's time is paid, and a sync per call would add its latency to each.
fn time_calls(gpu: &Gpu, min_s: f64, min_reps: usize, mut call: impl FnMut() -> Result<()>) -> Result<f64> {
    call()?;
    gpu.sync()?;
    let t = Instant::now();
    call()?;
    gpu.sync()?;
    let estimate = t.elapsed().as_secs_f64();
    let reps = ((min_s / estimate).ceil() as usize).clamp(min_reps, 10_000);
    let start = Instant::now();
    for _ in 0..reps {
        call()?;
    }
    gpu.sync()?;
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

pub fn gpu_bench_cmd(gpu: &Gpu, quick: bool, json: &Path) -> Result<()> {
    // (name, m, n, k): square products and GPT-2 124M's at B·T = 4096 tokens (QKV, attention out, MLP up, down).
    let mm: Vec<(&str, usize, usize, usize)> = if quick {
        vec![("256", 256, 256, 256), ("512", 512, 512, 512), ("gpt2_qkv_512tok", 512, 2304, 768)]
    } else {
        vec![
            ("1024", 1024, 1024, 1024),
            ("4096", 4096, 4096, 4096),
            ("gpt2_qkv", 4096, 2304, 768),
            ("gpt2_attn_proj", 4096, 768, 768),
            ("gpt2_mlp_up", 4096, 3072, 768),
            ("gpt2_mlp_down", 4096, 768, 3072),
        ]
    };
    let attn: Vec<(usize, usize, usize, usize)> =
        if quick { vec![(1, 256, 768, 12)] } else { vec![(4, 1024, 768, 12), (1, 4096, 768, 12)] };
    let steps: Vec<(&str, usize, usize, usize)> =
        if quick { vec![("tiny", 2048, 8, 128)] } else { vec![("gpt2", 50257, 4, 1024)] };
    let min_s = if quick { 0.3 } else { 1.0 };

    let mut report = Report {
        adapter: gpu.adapter_name().to_string(),
        driver: format!("{} {}", gpu.info().driver, gpu.info().driver_info),
        software: gpu.is_software(),
        quick,
        matmul: Vec::new(),
        attention: Vec::new(),
        step: Vec::new(),
    };
    for (name, m, n, k) in mm {
        let a = gpu.upload(&random_vec(m * k, 1), &[m, k])?;
        let b = gpu.upload(&random_vec(k * n, 2), &[k, n])?;
        let out = gpu.alloc(&[m, n], DType::F32)?;
        let spec = matmul::MatmulSpec::nn();
        let shape = matmul::matmul_shape(&a, &b, spec)?;
        let variant = matmul_tune::variant_for(gpu, &shape, spec)?;
        let secs = time_calls(gpu, min_s, 3, || Ok(matmul::matmul_into(gpu, &a, &b, None, &out, spec)?))?;
        let gflops = shape.flops() as f64 / secs / 1e9;
        eprintln!("matmul {name}: {variant}, {gflops:.1} GFLOP/s");
        report.matmul.push(MatmulRow {
            name: name.into(),
            m,
            n,
            k,
            variant: variant.to_string(),
            ms: secs * 1e3,
            gflops,
        });
    }
    for (b, t, c, nh) in attn {
        let qkv = gpu.upload(&random_vec(b * t * 3 * c, 3), &[b, t, 3 * c])?;
        let dy = gpu.upload(&random_vec(b * t * c, 4), &[b, t, c])?;
        let secs = time_calls(gpu, min_s, 2, || {
            let (y, lse) = attention::attention_forward(gpu, &qkv, nh)?;
            attention::attention_backward(gpu, &qkv, &y, &lse, &dy, nh)?;
            Ok(())
        })?;
        let products = 7.0 * (b * nh * t * (t + 1) * (c / nh)) as f64;
        let gflops = products / secs / 1e9;
        eprintln!("attention B{b} T{t} C{c} NH{nh}: {:.1} ms, {gflops:.1} GFLOP/s", secs * 1e3);
        report.attention.push(AttentionRow { b, t, c, nh, ms: secs * 1e3, gflops });
    }
    for (preset, vocab, batch, seq_len) in steps {
        let config = ModelConfig::preset(preset, vocab)?;
        if let Err(e) = check_fits(gpu, &config, batch, seq_len) {
            eprintln!("step {preset} B{batch} T{seq_len}: skipped: {e}");
            continue;
        }
        let tokens: Vec<u32> = (0..(batch * (seq_len + 1) * 16) as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) % vocab as u64) as u32)
            .collect();
        let cfg = TrainConfig { steps: u64::MAX / 2, batch, seq_len, ..TrainConfig::default() };
        let mut trainer = Trainer::new(gpu, Model::new(gpu, &config, 1)?, cfg, Arc::new(tokens))?;
        // A step ends in a sync (its loss is read back), so wall clock is the step's time.
        let secs = time_calls(gpu, min_s * 3.0, 3, || Ok(trainer.step().map(drop)?))?;
        let tokens_per_s = (batch * seq_len) as f64 / secs;
        eprintln!("step {preset} B{batch} T{seq_len}: {:.1} ms, {tokens_per_s:.0} tokens/s", secs * 1e3);
        report.step.push(StepRow {
            preset: preset.into(),
            vocab,
            n_layer: config.n_layer,
            n_head: config.n_head,
            n_embd: config.n_embd,
            n_ctx: config.n_ctx,
            params: config.num_params(),
            batch,
            seq_len,
            ms: secs * 1e3,
            tokens_per_s,
        });
    }
    let text = serde_json::to_string_pretty(&report)?;
    kiln_model::atomic::write_atomic(json, text.as_bytes()).with_context(|| format!("writing {}", json.display()))?;
    println!("{}", json.display());
    Ok(())
}
