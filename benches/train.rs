//! Training-step throughput of the GPT presets (forward, backward, clipping, AdamW through the trainer), in
//! tokens/s. Run: `cargo bench --bench train`. The GPT-2 124M step (B=4, T=1024) runs only where the adapter's
//! storage-binding limit holds its [4·1024, 50257] logits (823 MB): not on lavapipe (128 MiB).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_engine::testing::gpu;
use kiln_model::gpt::Gpt;
use kiln_model::train::{TrainConfig, Trainer};
use kiln_model::GptConfig;

fn bench_presets(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("train_step [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    // (preset, vocab, batch, seq_len)
    for (preset, vocab, batch, seq_len) in [("tiny", 2048, 8, 128), ("small", 4096, 4, 256), ("gpt2", 50257, 4, 1024)] {
        let config = GptConfig::preset(preset, vocab).unwrap();
        let logits_bytes = (batch * seq_len * vocab * 4) as u64;
        if logits_bytes > gpu.limits().max_storage_buffer_binding_size {
            eprintln!(
                "train_step/{preset}: skipped, its logits ({logits_bytes} bytes) exceed this adapter's storage binding \
                 limit ({} bytes)",
                gpu.limits().max_storage_buffer_binding_size
            );
            continue;
        }
        let tokens: Vec<u32> = (0..200_000u32).map(|i| i.wrapping_mul(2_654_435_761) % vocab as u32).collect();
        let cfg = TrainConfig { steps: 1_000_000, batch, seq_len, ..TrainConfig::default() };
        let model = Gpt::new(gpu, &config, 1).unwrap();
        let mut trainer = Trainer::new(gpu, model, cfg, Arc::new(tokens)).unwrap();
        group.throughput(Throughput::Elements((batch * seq_len) as u64));
        let id = format!("{preset}_{}params_B{batch}_T{seq_len}", config.num_params());
        group.bench_function(BenchmarkId::new("fwd_bwd_adamw", id), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    trainer.step().unwrap(); // ends with a GPU sync
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_presets);
criterion_main!(benches);
