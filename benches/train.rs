//! Throughput of training and post-training on the presets (GPT-2 and Llama families), one criterion group per adapter. Run:
//! `cargo bench --bench train` (or `-- train_step`, `-- rollout`, `-- sft_step`, `-- rl_step` for one group).
//!
//! - `train_step`: a pretraining step (forward, backward, clipping, AdamW through the trainer), in tokens/s. The
//!   GPT-2 124M step (B=4, T=1024) runs only where the adapter's storage-binding limit holds its [4·1024, 50257]
//!   logits (823 MB): not on lavapipe (128 MiB).
//! - `rollout`: RL-style sampling, P prompts × G samples with the KV cache (`generate::rollouts`: each prompt
//!   prefilled once and fanned out), in generated tokens/s; every completion runs to max_new_tokens (no stop token)
//!   so each iteration does fixed work. Beside it, the same sampling without the cache (the full forward re-run over
//!   the growing sequences for every new token), which is what the cache buys.
//! - `sft_step`: one SFT optimiser step on chat-formatted 3-digit additions (loss on responses only), in
//!   positions/s (batch·seq_len per step); the trained response tokens per step are printed.
//! - `rl_step`: one GRPO step (rollouts, reference and policy forward, backward, AdamW), timed per step; the
//!   trainer's rollout tokens/s are printed.
//!
//! Groups whose tensors exceed the adapter's storage-binding limit are skipped with the reason printed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_engine::autograd::Tape;
use kiln_engine::ops::sampling::{sample, SamplingParams};
use kiln_engine::testing::gpu;
use kiln_engine::{DType, Gpu};
use kiln_model::arch::Model;
use kiln_model::data::chat::SPECIAL_TOKENS;
use kiln_model::data::tasks::{reward, Example, Split, Task};
use kiln_model::data::tokenizer::Tokenizer;
use kiln_model::eval::generate::{rollouts, GenerateConfig};
use kiln_model::train::pretrain::{check_fits, TrainConfig, Trainer};
use kiln_model::train::rl::{RlConfig, RlTrainer};
use kiln_model::train::sft::SftSource;
use kiln_model::ModelConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn bench_presets(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("train_step [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    // (preset, vocab, batch, seq_len)
    for (preset, vocab, batch, seq_len) in
        [("tiny", 2048, 8, 128), ("llama-tiny", 2048, 8, 128), ("small", 4096, 4, 256), ("gpt2", 50257, 4, 1024)]
    {
        let config = ModelConfig::preset(preset, vocab).unwrap();
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
        let model = Model::new(gpu, &config, 1).unwrap();
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

/// Sampling at temperature 1 over the full vocabulary, as RL rollouts do.
const TEMPERATURE_1: SamplingParams = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0 };

/// A byte-level BPE tokenizer with the chat tokens, trained once per vocabulary size on 3-digit additions (one per
/// line) and the first 200 k characters of the bundled corpus.
fn tokenizer(vocab: usize) -> &'static Tokenizer {
    static CACHE: Mutex<Vec<(usize, &'static Tokenizer)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap();
    if let Some((_, tok)) = cache.iter().find(|(v, _)| *v == vocab) {
        return tok;
    }
    let mut text: String =
        addition().examples(Split::Train, 2000, 5).iter().map(|e| format!("{}{}\n", e.prompt, e.answer)).collect();
    text.extend(kiln_model::data::bundled_corpus().unwrap().chars().take(200_000));
    let tok: &'static Tokenizer = Box::leak(Box::new(Tokenizer::train(&text, vocab, &SPECIAL_TOKENS).unwrap()));
    cache.push((vocab, tok));
    tok
}

fn addition() -> Task {
    Task::Addition { digits: 3 }
}

/// Pseudo-random prompts of `len` tokens below `vocab` (what the tokens are does not change the work).
fn synthetic_prompts(n: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|p| (0..len).map(|i| ((p * len + i) as u32).wrapping_mul(2_654_435_761) % vocab as u32).collect())
        .collect()
}

/// Sampling without a KV cache, the naive way: every prompt repeated `samples` times, and for each new token the
/// whole forward (`Model::logits`, all positions) re-run over the grown sequences, the last position's logits
/// sampled on the GPU and read back. All prompts must have the same length. Returns the tokens generated.
fn generate_without_cache(
    gpu: &Gpu,
    model: &Model,
    prompts: &[Vec<u32>],
    samples: usize,
    new_tokens: usize,
    seed: u64,
) -> kiln_model::Result<usize> {
    let v = model.config.vocab_size;
    let rows = prompts.len() * samples;
    let mut seqs: Vec<Vec<i32>> =
        prompts.iter().flat_map(|p| std::iter::repeat_n(p.iter().map(|&t| t as i32).collect(), samples)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..new_tokens {
        let len = seqs[0].len();
        let tokens: Vec<i32> = seqs.concat();
        let mut tape = Tape::no_grad(gpu);
        let logits = model.logits(&mut tape, &tokens, rows, len)?;
        let last = gpu.alloc(&[rows, v], DType::F32)?;
        for r in 0..rows {
            gpu.copy_elements(tape.value(logits), (r * len + len - 1) * v, &last, r * v, v)?;
        }
        let u: Vec<f32> = (0..rows).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let ids = sample(gpu, &last, &gpu.upload(&u, &[rows])?, TEMPERATURE_1)?;
        for (seq, id) in seqs.iter_mut().zip(gpu.read_i32(&ids)?) {
            seq.push(id);
        }
    }
    Ok(rows * new_tokens)
}

fn bench_rollouts(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("rollout [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    const PROMPT_LEN: usize = 16;
    // (preset, vocab, prompts P, samples G, new tokens, KV cache)
    let cases = [
        ("tiny", 2048, 1, 8, 32, true),
        ("tiny", 2048, 8, 8, 32, true),
        ("tiny", 2048, 16, 16, 32, true),
        // The no-cache baseline re-runs whole sequences per token, so it gets fewer new tokens; the cached run of
        // the same shape is the like-for-like comparison.
        ("tiny", 2048, 8, 8, 16, true),
        ("tiny", 2048, 8, 8, 16, false),
        // Fewer new tokens for small: at 32 one iteration takes ~45 s on lavapipe, too long for ten samples.
        ("small", 4096, 8, 8, 8, true),
    ];
    for (preset, vocab, p, g, new, cached) in cases {
        let config = ModelConfig::preset(preset, vocab).unwrap();
        let name = format!("{preset}_P{p}_G{g}_new{new}");
        let kind = if cached { "kv_cache" } else { "no_cache" };
        // Cached: the prefill's [prompt, V] logits and each step's [G, V]; uncached: [P·G, prompt + new, V].
        let fits = if cached {
            check_fits(gpu, &config, 1, PROMPT_LEN).and_then(|_| check_fits(gpu, &config, g, 1))
        } else {
            check_fits(gpu, &config, p * g, PROMPT_LEN + new)
        };
        if let Err(e) = fits {
            eprintln!("rollout/{kind}/{name}: skipped: {e}");
            continue;
        }
        let prompts = synthetic_prompts(p, PROMPT_LEN, vocab);
        let mut model = None; // built on first use, so a filtered-out case costs nothing
        group.throughput(Throughput::Elements((p * g * new) as u64));
        group.bench_function(BenchmarkId::new(kind, &name), |b| {
            let model = model.get_or_insert_with(|| Model::new(gpu, &config, 1).unwrap());
            b.iter_custom(|iters| {
                let start = Instant::now();
                for i in 0..iters {
                    // Both end with a readback of the last sampled tokens: the GPU is idle when the clock stops.
                    let generated = if cached {
                        let cfg = GenerateConfig {
                            max_new_tokens: new,
                            sampling: TEMPERATURE_1,
                            seed: i,
                            stop_token: None,
                            vocab_limit: None,
                        };
                        let out = rollouts(gpu, model, &prompts, g, &cfg, |_, _, _| {}).unwrap();
                        out.iter().flatten().map(|c| c.tokens.len()).sum()
                    } else {
                        generate_without_cache(gpu, model, &prompts, g, new, i).unwrap()
                    };
                    assert_eq!(generated, p * g * new);
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

fn bench_sft(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("sft_step [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    // (preset, tokenizer vocab, batch, seq_len): the shapes of `train_step`, so the two compare directly.
    for (preset, vocab, batch, seq_len) in [("tiny", 2048, 8, 128), ("small", 4096, 4, 256)] {
        let name = format!("{preset}_B{batch}_T{seq_len}");
        if let Err(e) = check_fits(gpu, &ModelConfig::preset(preset, vocab).unwrap(), batch, seq_len) {
            eprintln!("sft_step/{name}: skipped: {e}");
            continue;
        }
        let mut trainer = None;
        let mut trained = Vec::new();
        group.throughput(Throughput::Elements((batch * seq_len) as u64));
        group.bench_function(BenchmarkId::new("fwd_bwd_adamw", &name), |b| {
            let trainer = trainer.get_or_insert_with(|| {
                let tok = tokenizer(vocab);
                let config = ModelConfig::preset(preset, tok.vocab_size()).unwrap();
                let examples = addition().examples(Split::Train, 4000, 1);
                let source = SftSource::new(tok, &examples, batch, seq_len, 7, None).unwrap();
                let cfg = TrainConfig { steps: 1_000_000, batch, seq_len, ..TrainConfig::default() };
                Trainer::with_source(gpu, Model::new(gpu, &config, 1).unwrap(), cfg, Box::new(source)).unwrap()
            });
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    trained.push(trainer.step().unwrap().trained_tokens); // ends with a GPU sync
                }
                start.elapsed()
            })
        });
        if let Some(tr) = &trainer {
            let mean = trained.iter().sum::<u64>() as f64 / trained.len().max(1) as f64;
            eprintln!(
                "sft_step/{name}: vocab {}, {mean:.0} trained (response) tokens per step of {} positions ({:.1}%), \
                 mean over {} steps",
                tr.model.config.vocab_size,
                batch * seq_len,
                100.0 * mean / (batch * seq_len) as f64,
                trained.len()
            );
        }
    }
    group.finish();
}

fn bench_rl(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("rl_step [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    let (preset, vocab) = ("tiny", 2048);
    let cfg =
        RlConfig { steps: 1_000_000, prompts_per_step: 8, group_size: 8, max_new_tokens: 16, ..RlConfig::default() };
    let examples: Vec<Example> = addition().examples(Split::Train, 1000, 21);
    // A chat prompt is at most its bytes plus the two markers (byte-level BPE never yields more tokens than bytes).
    let longest = examples.iter().map(|e| e.prompt.len() + 2).max().unwrap() + cfg.max_new_tokens;
    let rows = cfg.prompts_per_step * cfg.group_size;
    let name = format!("{preset}_P{}_G{}_new{}", cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens);
    if let Err(e) = check_fits(gpu, &ModelConfig::preset(preset, vocab).unwrap(), rows, longest) {
        eprintln!("rl_step/{name}: skipped: {e}");
        group.finish();
        return;
    }
    let mut trainer = None;
    let mut metrics = Vec::new();
    group.bench_function(BenchmarkId::new("grpo", &name), |b| {
        let trainer = trainer.get_or_insert_with(|| {
            let tok = tokenizer(vocab);
            let config = ModelConfig::preset(preset, tok.vocab_size()).unwrap();
            let (policy, reference) = (Model::new(gpu, &config, 1).unwrap(), Model::new(gpu, &config, 1).unwrap());
            RlTrainer::new(gpu, policy, reference, tok.clone(), examples.clone(), reward, cfg.clone()).unwrap()
        });
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                metrics.push(trainer.step().unwrap()); // ends with the metrics readback
            }
            start.elapsed()
        })
    });
    if !metrics.is_empty() {
        let n = metrics.len() as f64;
        let mean = |f: fn(&kiln_model::train::rl::RlMetrics) -> f64| metrics.iter().map(f).sum::<f64>() / n;
        let (len, tps, ms) =
            (mean(|m| m.mean_completion_len), mean(|m| m.rollout_tokens_per_s), mean(|m| m.ms_per_step));
        // The trainer's rollout tokens/s is completion tokens over the rollout's wall time, so this inverts it.
        let rollout_ms = len * rows as f64 / tps * 1e3;
        eprintln!(
            "rl_step/{name}: mean over {} steps: {tps:.0} rollout tokens/s, {len:.2} tokens per completion, rollout \
             ≈ {rollout_ms:.0} ms of {ms:.0} ms per step",
            metrics.len()
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // No plots: criterion's plotters backend panics (FontUnavailable) on machines without system fonts, the CI
    // machine among them, and the numbers are what matters here.
    config = Criterion::default().without_plots();
    targets = bench_presets, bench_rollouts, bench_sft, bench_rl
}
criterion_main!(benches);
