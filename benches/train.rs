//! Throughput of training and post-training on the presets (GPT-2 and Llama families), one criterion group per adapter. Run:
//! `cargo bench --bench train` (or `-- train_step`, `-- rollout`, `-- sft_step`, `-- rl_step` for one group).
//!
//! - `train_step`: a pretraining step (forward, backward, clipping, AdamW through the trainer), in tokens/s, with
//!   the step's peak memory split printed. GPT-2 124M at B=1, T=256 under each `--recompute` setting on every
//!   adapter; at B=4, T=1024 on hardware GPUs (a software one takes minutes per step: `--bench memory` runs it).
//! - `classifier`: the chunked output layer + loss (forward and backward) against the unchunked one.
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
use kiln_model::arch::{Model, Recompute};
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
    // (preset, vocab, batch, seq_len, recompute)
    let mut rows = vec![
        ("tiny", 2048, 8, 128, Recompute::None),
        ("llama-tiny", 2048, 8, 128, Recompute::None),
        ("small", 4096, 4, 256, Recompute::None),
    ];
    for r in [Recompute::None, Recompute::Gelu, Recompute::Block] {
        rows.push(("gpt2", 50257, 1, 256, r));
    }
    if gpu.is_software() {
        eprintln!(
            "train_step/gpt2 B4 T1024: not run on a software adapter (minutes per step; `--bench memory` runs it once)"
        );
    } else {
        for r in [Recompute::None, Recompute::Gelu, Recompute::Block] {
            rows.push(("gpt2", 50257, 4, 1024, r));
        }
    }
    for (preset, vocab, batch, seq_len, recompute) in rows {
        let config = ModelConfig::preset(preset, vocab).unwrap();
        if let Err(e) = check_fits(gpu, &config, batch, seq_len) {
            eprintln!("train_step/{preset}: skipped: {e}");
            continue;
        }
        let tokens: Vec<u32> = (0..200_000u32).map(|i| i.wrapping_mul(2_654_435_761) % vocab as u32).collect();
        let cfg = TrainConfig { steps: 1_000_000, batch, seq_len, recompute, ..TrainConfig::default() };
        let model = Model::new(gpu, &config, 1).unwrap();
        let mut trainer = Trainer::new(gpu, model, cfg, Arc::new(tokens)).unwrap();
        group.throughput(Throughput::Elements((batch * seq_len) as u64));
        let id = format!("{preset}_{}params_B{batch}_T{seq_len}_recompute-{recompute:?}", config.num_params());
        let mut last = None;
        group.bench_function(BenchmarkId::new("fwd_bwd_adamw", &id), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    last = Some(trainer.step().unwrap()); // ends with a GPU sync
                }
                start.elapsed()
            })
        });
        if let Some(m) = last {
            eprintln!("train_step/{id}: peak {:.1} MiB: {}", m.peak_bytes as f64 / (1u64 << 20) as f64, m.memory);
        }
    }
    group.finish();
}

/// The output layer and its loss, forward and backward, at the tiny preset's shape (B·T = 1024 rows, C = 128, V =
/// 2048) and at GPT-2's (C = 768, V = 50257, 128 rows): the chunked
/// classifier (default chunk, and forced 64-row chunks) against the unchunked path (full logits matmul,
/// cross-entropy, its backward, dX and dW matmuls), in rows/s.
fn bench_classifier(c: &mut Criterion) {
    use kiln_engine::autograd::Param;
    use kiln_engine::ops::matmul::{matmul, matmul_into, MatmulSpec};
    use kiln_engine::ops::{classifier, elementwise, loss};
    let gpu = gpu();
    let mut group = c.benchmark_group(format!("classifier [{}]", gpu.adapter_name()));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    for (name, n, ch, v) in [("tiny", 1024, 128, 2048), ("gpt2", 128, 768, 50257)] {
        let x = gpu.upload(&kiln_engine::testing::random_vec(n * ch, 1), &[n, ch]).unwrap();
        let w =
            Param::new(gpu, "w", gpu.upload(&kiln_engine::testing::random_vec(v * ch, 2), &[v, ch]).unwrap()).unwrap();
        let targets: Vec<i32> = (0..n).map(|i| (i * 7919 % v) as i32).collect();
        let t = gpu.upload_i32(&targets, &[n]).unwrap();
        let dloss = gpu.upload(&vec![1.0 / n as f32; n], &[n]).unwrap();
        group.throughput(Throughput::Elements(n as u64));
        let step = classifier::row_step(gpu);
        for (label, chunk) in [("chunked", classifier::chunk_rows(gpu, v)), ("chunked64", step.max(64) / step * step)] {
            group.bench_function(BenchmarkId::new(label, format!("{name}_N{n}_C{ch}_V{v}")), |b| {
                b.iter(|| {
                    let keep = classifier::KEEP_BYTES;
                    let (_, saved) = classifier::loss(gpu, &x, &w.value, &t, chunk, keep).unwrap();
                    let dx = classifier::loss_backward(gpu, &x, &w.value, &t, saved, &dloss, &w.grad, chunk).unwrap();
                    gpu.read(&dx.rows(0, 1).unwrap()).unwrap()
                })
            });
        }
        if w.value.bytes() > gpu.max_binding() {
            eprintln!("classifier/unchunked/{name}: not run: W ({} bytes) exceeds one binding", w.value.bytes());
            continue;
        }
        group.bench_function(BenchmarkId::new("unchunked", format!("{name}_N{n}_C{ch}_V{v}")), |b| {
            b.iter(|| {
                let logits = matmul(gpu, &x, &w.value, None, MatmulSpec::nt()).unwrap();
                let (_, lse) = loss::cross_entropy(gpu, &logits, &t).unwrap();
                let dl = loss::cross_entropy_backward(gpu, &logits, &t, &lse, &dloss).unwrap();
                let dx = matmul(gpu, &dl, &w.value, None, MatmulSpec::nn()).unwrap();
                let acc = MatmulSpec { trans_a: true, beta: 1.0, ..MatmulSpec::nn() };
                matmul_into(gpu, &dl, &x, None, &w.grad, acc).unwrap();
                gpu.read(&dx.rows(0, 1).unwrap()).unwrap()
            })
        });
        elementwise::fill(gpu, &w.grad, 0.0).unwrap();
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
    Task::addition(3)
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
    targets = bench_presets, bench_classifier, bench_rollouts, bench_sft, bench_rl
}
criterion_main!(benches);
