//! Generation: the KV-cache path gives the same logits as a full forward, and sampling is seeded.

use kiln_engine::autograd::Tape;
use kiln_engine::ops::sampling::SamplingParams;
use kiln_engine::testing::gpu;
use kiln_model::arch::Model;
use kiln_model::eval::generate::{generate, rollouts, GenerateConfig, Session};
use kiln_model::ModelConfig;

fn config() -> ModelConfig {
    ModelConfig::gpt2(53, 40, 2, 3, 24)
}

/// Logits through the KV cache (a prefill, then one token at a time) against the full forward of the same tokens.
fn check_cache_equals_full_forward(config: &ModelConfig, seed: u64) {
    let gpu = gpu();
    let model = Model::new(gpu, config, seed).unwrap();
    let (b, prompt, extra, v) = (2, 7, 5, config.vocab_size);
    let t = prompt + extra;
    let tokens: Vec<i32> = (0..b * t).map(|i| ((i * 13 + 3) % v) as i32).collect();
    let mut tape = Tape::no_grad(gpu);
    let full = model.logits(&mut tape, &tokens, b, t).unwrap();
    let full = gpu.read(tape.value(full)).unwrap();

    let mut session = Session::new(gpu, &model, b).unwrap();
    let rows = |from: usize, to: usize| -> Vec<i32> {
        (0..b).flat_map(|r| tokens[r * t + from..r * t + to].to_vec()).collect()
    };
    let first = gpu.read(&session.feed(gpu, &rows(0, prompt), prompt).unwrap()).unwrap();
    let mut cached = vec![vec![0f32; t * v]; b];
    for r in 0..b {
        cached[r][..prompt * v].copy_from_slice(&first[r * prompt * v..(r + 1) * prompt * v]);
    }
    for pos in prompt..t {
        let step = gpu.read(&session.feed(gpu, &rows(pos, pos + 1), 1).unwrap()).unwrap();
        for r in 0..b {
            cached[r][pos * v..(pos + 1) * v].copy_from_slice(&step[r * v..(r + 1) * v]);
        }
    }
    let spread = full.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(spread > 0.05, "{:?}: logits too flat to compare ({spread})", config.family);
    for r in 0..b {
        for (i, (c, f)) in cached[r].iter().zip(&full[r * t * v..(r + 1) * t * v]).enumerate() {
            // Same math in a different order (cached keys, one query at a time): f32 rounding only.
            assert!(
                (c - f).abs() <= 1e-5 * (1.0 + f.abs()),
                "{:?} row {r} logit {i}: cached {c}, full {f}",
                config.family
            );
        }
    }
    // The context is a hard limit.
    let n_ctx = config.n_ctx;
    assert!(session.feed(gpu, &vec![1; b * n_ctx], n_ctx).is_err());
}

#[test]
fn kv_cache_logits_equal_the_full_forward() {
    check_cache_equals_full_forward(&config(), 5);
}

#[test]
fn kv_cache_logits_equal_the_full_forward_for_llama() {
    // Grouped-query attention (4 query heads on 2 KV heads), rotary positions, SwiGLU, untied head with q/k/v
    // biases (Qwen2's variant), and the plain tied Llama.
    let llama = ModelConfig::llama(53, 40, 2, (4, 2), 32, 44);
    check_cache_equals_full_forward(&ModelConfig { tie_embeddings: false, qkv_bias: true, ..llama.clone() }, 7);
    check_cache_equals_full_forward(&ModelConfig { n_kv_head: 1, ..llama }, 8);
}

#[test]
fn generation_is_seeded_and_greedy_is_deterministic() {
    let gpu = gpu();
    let model = Model::new(gpu, &config(), 6).unwrap();
    let cfg = |seed, temperature| GenerateConfig {
        max_new_tokens: 12,
        sampling: SamplingParams { temperature, top_k: 0, top_p: 1.0 },
        seed,
        stop_token: None,
        vocab_limit: None,
    };
    let prompt = [1u32, 2, 3];
    let a = generate(gpu, &model, &prompt, 3, &cfg(1, 1.0), |_, _| {}).unwrap();
    let b = generate(gpu, &model, &prompt, 3, &cfg(1, 1.0), |_, _| {}).unwrap();
    assert_eq!(a, b, "same seed, same samples");
    assert!(a.iter().all(|s| s.len() == 12 && s.iter().all(|&t| t < 53)));
    let c = generate(gpu, &model, &prompt, 3, &cfg(2, 1.0), |_, _| {}).unwrap();
    assert_ne!(a, c, "another seed draws other tokens");
    let g = generate(gpu, &model, &prompt, 2, &cfg(9, 0.0), |_, _| {}).unwrap();
    assert_eq!(g[0], g[1], "greedy decoding ignores the random draws");
    // A tokenizer smaller than the model's vocabulary: no sample may leave it, greedy included.
    for t in [1.0, 0.0] {
        let limited = GenerateConfig { vocab_limit: Some(7), ..cfg(4, t) };
        let s = generate(gpu, &model, &prompt, 4, &limited, |_, _| {}).unwrap();
        assert!(s.iter().flatten().all(|&id| id < 7), "temperature {t}: {s:?} leaves the first 7 ids");
    }
    assert!(generate(gpu, &model, &[], 1, &cfg(1, 1.0), |_, _| {}).is_err());
    assert!(generate(gpu, &model, &[99], 1, &cfg(1, 1.0), |_, _| {}).is_err(), "token outside the vocabulary");
}

#[test]
fn batched_rollouts_equal_one_prompt_at_a_time_and_stop_per_sample() {
    let gpu = gpu();
    let model = Model::new(gpu, &config(), 8).unwrap();
    let cfg = |temperature| GenerateConfig {
        max_new_tokens: 9,
        sampling: SamplingParams { temperature, top_k: 0, top_p: 1.0 },
        seed: 3,
        stop_token: None,
        vocab_limit: None,
    };
    // Prompts 0 and 2 have one length (one batched session), prompt 1 another.
    let prompts = vec![vec![1u32, 2, 3], vec![4, 5, 6, 7, 8], vec![9, 10, 11]];
    let greedy = rollouts(gpu, &model, &prompts, 2, &cfg(0.0), |_, _, _| {}).unwrap();
    for (p, group) in prompts.iter().zip(&greedy) {
        let alone = generate(gpu, &model, p, 1, &cfg(0.0), |_, _| {}).unwrap();
        for c in group {
            assert_eq!(c.tokens, alone[0], "a prompt decodes the same batched with others as alone");
        }
    }
    // Sampled: sample s of prompt p follows its own stream, whatever shares its session.
    let a = rollouts(gpu, &model, &prompts, 3, &cfg(1.0), |_, _, _| {}).unwrap();
    let other = vec![prompts[0].clone(), prompts[1].clone(), vec![20, 21, 22]];
    let b = rollouts(gpu, &model, &other, 3, &cfg(1.0), |_, _, _| {}).unwrap();
    assert_eq!(a[0], b[0]);
    assert_eq!(a[1], b[1]);
    assert_ne!(a[0][0].tokens, a[0][1].tokens, "samples of one prompt draw different tokens");
    // A stop token ends each sample on its own and is kept.
    let stop = a[0][0].tokens[2];
    let s = rollouts(gpu, &model, &prompts, 3, &GenerateConfig { stop_token: Some(stop), ..cfg(1.0) }, |_, _, _| {})
        .unwrap();
    assert_eq!(s[0][0].tokens, a[0][0].tokens[..3].to_vec());
    assert!(s[0][0].stopped);
    for c in s.iter().flatten() {
        assert_eq!(c.stopped, c.tokens.contains(&stop));
        assert!(c.stopped || c.tokens.len() == 9);
    }
}
