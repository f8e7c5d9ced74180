//! `kiln profile`: where one training step's time goes, kernel by kernel — calls, time, FLOPs and bytes each
//! launch declared, achieved GFLOP/s and GB/s, and the share of this adapter's measured peak (a short FMA and
//! copy probe run first), sorted by time; also written as JSON.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use kiln_engine::ops::probe;
use kiln_engine::Gpu;
use kiln_model::arch::config::ModelConfig;
use kiln_model::arch::Model;
use kiln_model::train::pretrain::{check_fits, TrainConfig, Trainer};
use serde::Serialize;

pub struct ProfileOpts<'a> {
    pub checkpoint: Option<&'a Path>,
    pub preset: &'a str,
    pub vocab: usize,
    pub batch: usize,
    pub seq_len: usize,
    /// Steps profiled (after one untimed warm-up step that builds pipelines and tunes the matmul).
    pub steps: u64,
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct KernelRow {
    kernel: String,
    calls: u64,
    ms_per_step: f64,
    share: f64,
    gflop_per_step: f64,
    gb_per_step: f64,
    gflops: Option<f64>,
    gbps: f64,
    pct_peak_flops: Option<f64>,
    pct_peak_bandwidth: f64,
}

#[derive(Serialize)]
struct Report {
    adapter: String,
    timestamps: bool,
    model: String,
    params: usize,
    batch: usize,
    seq_len: usize,
    steps: u64,
    step_ms: f64,
    tokens_per_s: f64,
    kernel_ms_per_step: f64,
    peak_gflops: f64,
    peak_gbps: f64,
    kernels: Vec<KernelRow>,
}

pub fn profile_cmd(gpu: &Gpu, o: &ProfileOpts) -> Result<()> {
    let (model, name) = match o.checkpoint {
        Some(dir) => (crate::commands::load_model(gpu, dir)?.0, dir.display().to_string()),
        None => {
            let config = ModelConfig::preset(o.preset, o.vocab)?;
            (Model::new(gpu, &config, 1)?, format!("preset {} (vocab {})", o.preset, o.vocab))
        }
    };
    let config = model.config.clone();
    anyhow::ensure!(o.steps >= 1, "--steps must be at least 1");
    anyhow::ensure!(
        o.seq_len <= config.n_ctx,
        "--seq-len {} exceeds the model's context of {} positions",
        o.seq_len,
        config.n_ctx
    );
    check_fits(gpu, &config, o.batch, o.seq_len)?;
    // Token ids spread over the vocabulary: a profile measures kernels, whose time does not depend on the text.
    let vocab = config.vocab_size as u64;
    let tokens: Vec<u32> =
        (0..(o.batch * (o.seq_len + 1) * 64) as u64).map(|i| (i.wrapping_mul(2_654_435_761) % vocab) as u32).collect();
    let cfg = TrainConfig { steps: u64::MAX / 2, batch: o.batch, seq_len: o.seq_len, ..TrainConfig::default() };
    let mut trainer = Trainer::new(gpu, model, cfg, Arc::new(tokens))?;
    eprintln!("measuring the adapter's peaks, then a warm-up step…");
    let peak = probe::measure(gpu)?;
    trainer.step()?; // builds every pipeline, tunes the matmul classes this model uses
                     // Unprofiled steps for the step time (timestamps add a little per kernel; wall clock a sync per kernel).
    let t = Instant::now();
    for _ in 0..o.steps {
        trainer.step()?;
    }
    let step_ms = t.elapsed().as_secs_f64() * 1e3 / o.steps as f64;
    gpu.profile_start()?;
    for _ in 0..o.steps {
        trainer.step()?;
    }
    let times = gpu.profile_stop()?;
    let per = o.steps as f64;
    let kernel_ms: f64 = times.iter().map(|k| k.total_ms).sum::<f64>() / per;
    let kernels: Vec<KernelRow> = times
        .iter()
        .map(|k| {
            let secs = k.total_ms / 1e3;
            let gflops = (k.flops > 0).then(|| k.flops as f64 / secs / 1e9);
            let gbps = k.bytes as f64 / secs / 1e9;
            KernelRow {
                kernel: k.name.to_string(),
                calls: (k.calls as f64 / per).round() as u64,
                ms_per_step: k.total_ms / per,
                share: k.total_ms / per / kernel_ms,
                gflop_per_step: k.flops as f64 / per / 1e9,
                gb_per_step: k.bytes as f64 / per / 1e9,
                gflops,
                gbps,
                pct_peak_flops: gflops.map(|g| 100.0 * g / peak.gflops),
                pct_peak_bandwidth: 100.0 * gbps / peak.gbps,
            }
        })
        .collect();
    let report = Report {
        adapter: gpu.report(),
        timestamps: gpu.profiler_uses_timestamps(),
        model: name,
        params: config.num_params(),
        batch: o.batch,
        seq_len: o.seq_len,
        steps: o.steps,
        step_ms,
        tokens_per_s: (o.batch * o.seq_len) as f64 / (step_ms / 1e3),
        kernel_ms_per_step: kernel_ms,
        peak_gflops: peak.gflops,
        peak_gbps: peak.gbps,
        kernels,
    };
    print_report(&report);
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&report)?;
        kiln_model::atomic::write_atomic(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("JSON: {}", path.display());
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!("Kiln profile on {} ({})", r.adapter, if r.timestamps { "GPU timestamps" } else { "wall clock" });
    println!(
        "{}: {} parameters, B={} T={}; step {:.1} ms, {:.0} tokens/s; kernels {:.1} ms per step",
        r.model, r.params, r.batch, r.seq_len, r.step_ms, r.tokens_per_s, r.kernel_ms_per_step
    );
    println!("peak probes: {:.1} GFLOP/s (FMA), {:.1} GB/s (copy)\n", r.peak_gflops, r.peak_gbps);
    println!(
        "{:<34} {:>6} {:>9} {:>6} {:>9} {:>8} {:>9} {:>8} {:>7} {:>7}",
        "kernel", "calls", "ms/step", "share", "GFLOP", "GB", "GFLOP/s", "GB/s", "%FMA", "%copy"
    );
    for k in &r.kernels {
        let opt = |v: Option<f64>, w: usize, p: usize| v.map_or(format!("{:>w$}", "-"), |v| format!("{v:>w$.p$}"));
        println!(
            "{:<34} {:>6} {:>9.3} {:>5.1}% {:>9.4} {:>8.4} {} {:>8.2} {} {:>7.1}",
            k.kernel,
            k.calls,
            k.ms_per_step,
            100.0 * k.share,
            k.gflop_per_step,
            k.gb_per_step,
            opt(k.gflops, 9, 2),
            k.gbps,
            opt(k.pct_peak_flops, 7, 1),
            k.pct_peak_bandwidth
        );
    }
    println!("\nBytes are those of the buffers each launch binds (each read or written once): the ideal traffic.");
}
