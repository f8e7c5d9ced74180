//! Step memory of GPT-2 124M, measured: Kiln's buffer-pool peak during one training step, split into parameters,
//! gradients, optimizer state, activations and scratch, for each `--recompute` setting; beside it, in the same
//! run, the peak memory of the same step in PyTorch eager fp32 on the CPU (`benches/torch_step_memory.py` in a
//! child process: forward, `F.cross_entropy` on the full logits, backward, clipping, AdamW). Memory is not timed,
//! so this is a plain program, not criterion; tokens/s of the same steps are in `cargo bench --bench train`.
//!
//! `cargo bench --bench memory` (shapes B=1,T=256 and B=4,T=1024), or `-- B,T ...` for others. `KILN_TORCH_PYTHON`
//! names the Python with torch and transformers (default `python3`); without it the PyTorch column says why.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use kiln_engine::testing::gpu;
use kiln_model::arch::{Model, Recompute};
use kiln_model::train::pretrain::{StepMemory, TrainConfig, Trainer};
use kiln_model::ModelConfig;

const MIB: f64 = (1u64 << 20) as f64;

fn kiln_step(batch: usize, seq_len: usize, recompute: Recompute) -> (StepMemory, u64, f64) {
    let gpu = gpu();
    let config = ModelConfig::preset("gpt2", 50257).unwrap();
    let tokens: Vec<u32> = (0..(batch * seq_len * 4) as u32).map(|i| i.wrapping_mul(2_654_435_761) % 50257).collect();
    let cfg = TrainConfig { steps: 10, batch, seq_len, recompute, ..TrainConfig::default() };
    let mut tr = Trainer::new(gpu, Model::new(gpu, &config, 1).unwrap(), cfg, Arc::new(tokens)).unwrap();
    let start = Instant::now();
    let m = tr.step().unwrap();
    (m.memory, m.peak_bytes, start.elapsed().as_secs_f64())
}

fn torch_step(batch: usize, seq_len: usize) -> Result<serde_json::Value, String> {
    let python = std::env::var("KILN_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_step_memory.py");
    let out = Command::new(&python)
        .args([script, "--batch", &batch.to_string(), "--seq-len", &seq_len.to_string()])
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{python} failed: {}", err.lines().last().unwrap_or("")));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let shapes: Vec<(usize, usize)> = if args.is_empty() {
        vec![(1, 256), (4, 1024)]
    } else {
        args.iter()
            .map(|a| {
                let (b, t) = a.split_once(',').expect("shapes are B,T");
                (b.parse().unwrap(), t.parse().unwrap())
            })
            .collect()
    };
    let gpu = gpu();
    println!("GPT-2 124M step memory on {} (Kiln: buffer-pool peak; MiB)\n", gpu.adapter_name());
    println!(
        "| B×T | recompute | params | grads | AdamW | activations | scratch | Kiln peak | Kiln step s | PyTorch \
         eager fp32 peak RSS (step only) | Kiln / PyTorch |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (b, t) in shapes {
        let torch = torch_step(b, t);
        let (torch_cell, torch_step_bytes) = match &torch {
            Ok(j) => {
                let (peak, step) = (j["peak_rss_bytes"].as_f64().unwrap(), j["step_bytes"].as_f64().unwrap());
                (
                    format!("{:.0} ({:.0}), torch {}", peak / MIB, step / MIB, j["torch"].as_str().unwrap_or("?")),
                    Some(step),
                )
            }
            Err(e) => (format!("not measured: {e}"), None),
        };
        for r in [Recompute::None, Recompute::Gelu, Recompute::Block] {
            let (m, peak, secs) = kiln_step(b, t, r);
            let ratio = torch_step_bytes.map_or("–".into(), |s| format!("{:.2}", peak as f64 / s));
            println!(
                "| {b}×{t} | {r:?} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {secs:.1} | {torch_cell} | {ratio} |",
                m.parameters as f64 / MIB,
                m.gradients as f64 / MIB,
                m.optimizer as f64 / MIB,
                m.activations as f64 / MIB,
                m.scratch as f64 / MIB,
                peak as f64 / MIB,
            );
        }
    }
}
