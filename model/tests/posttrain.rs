//! Post-training end to end on the software GPU: a short SFT run on 1-digit addition lifts greedy exact-match
//! accuracy on the held-out prompts from 0 to ~1 (measured: 0.00 → 1.00), a short GRPO run from that model raises
//! its mean sampled reward, and bad RL inputs are clear errors.

use std::sync::OnceLock;

use kiln_engine::autograd::Tape;
use kiln_engine::testing::gpu;
use kiln_model::arch::Model;
use kiln_model::checkpoint::HostTensor;
use kiln_model::data::chat::SPECIAL_TOKENS;
use kiln_model::data::tasks::{reward, Example, Split, Task};
use kiln_model::data::tokenizer::Tokenizer;
use kiln_model::eval::evaluate::{greedy_accuracy, sampled_scores, TEMPERATURE_1};
use kiln_model::eval::generate::GenerateConfig;
use kiln_model::train::optim::OptimConfig;
use kiln_model::train::pretrain::{TrainConfig, Trainer};
use kiln_model::train::rl::{RlConfig, RlTrainer};
use kiln_model::train::sft::SftSource;
use kiln_model::ModelConfig;

const TASK: Task = Task::addition(1);

/// A byte-level tokenizer with the chat tokens and only a few merges, so digits stay single tokens.
fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let text: String =
            TASK.examples(Split::Train, 300, 5).iter().map(|e| format!("{}{}\n", e.prompt, e.answer)).collect();
        Tokenizer::train(&text, 264, &SPECIAL_TOKENS).unwrap()
    })
}

fn config() -> ModelConfig {
    ModelConfig::gpt2(tokenizer().vocab_size(), 32, 2, 4, 64)
}

/// The SFT checkpoint RL starts from: an early one, whose sampled reward (~0.3 measured) leaves room to improve;
/// the final SFT model samples the right answer ~99% of the time.
const RL_FROM_STEP: u64 = 100;

struct SftRun {
    early: Vec<HostTensor>,
    before: f64,
    after: f64,
}

/// A short SFT run on addition: its checkpoint at RL_FROM_STEP, and held-out accuracy before and after (trained
/// once, shared by the tests).
fn sft_model() -> &'static SftRun {
    static SFT: OnceLock<SftRun> = OnceLock::new();
    SFT.get_or_init(|| {
        let gpu = gpu();
        let tok = tokenizer();
        let train = TASK.examples(Split::Train, 2000, 1);
        let eval = held_out();
        let model = Model::new(gpu, &config(), 3).unwrap();
        let before = greedy_accuracy(gpu, &model, tok, &eval, 4).unwrap().value;
        let cfg = TrainConfig {
            steps: 300,
            batch: 16,
            seq_len: 32,
            optim: OptimConfig { lr: 3e-3, min_lr: 3e-4, warmup: 10, ..OptimConfig::default() },
            ..TrainConfig::default()
        };
        let source = SftSource::new(tok, &train, cfg.batch, cfg.seq_len, 7, None).unwrap();
        let mut tr = Trainer::with_source(gpu, model, cfg.clone(), Box::new(source)).unwrap();
        let (mut first, mut early) = (0.0, Vec::new());
        for i in 0..cfg.steps {
            let m = tr.step().unwrap();
            if i == 0 {
                first = m.loss;
            }
            assert!(m.trained_tokens > 0 && m.trained_tokens < (cfg.batch * cfg.seq_len) as u64 / 2);
            if m.step == RL_FROM_STEP {
                early = tr.model.to_host(gpu).unwrap();
            }
        }
        let after = greedy_accuracy(gpu, &tr.model, tok, &eval, 4).unwrap().value;
        eprintln!("SFT: first loss {first:.3}, held-out greedy accuracy {before:.3} → {after:.3}");
        SftRun { early, before, after }
    })
}

/// Every prompt of the task outside the training split (1-digit addition has 100 prompts in all).
fn held_out() -> Vec<Example> {
    let mut e = TASK.examples(Split::Eval, 60, 11);
    e.sort_by(|a, b| a.prompt.cmp(&b.prompt));
    e.dedup();
    e
}

#[test]
fn short_sft_lifts_addition_accuracy() {
    let SftRun { before, after, .. } = sft_model();
    assert!(*before < 0.1, "an untrained model should not add: {before}");
    assert!(*after > 0.3, "SFT should teach 1-digit addition, accuracy only {after}");
}

#[test]
fn short_rl_from_the_sft_model_raises_mean_reward() {
    let gpu = gpu();
    let tok = tokenizer();
    let weights = &sft_model().early;
    let policy = Model::from_host(gpu, &config(), weights.clone()).unwrap();
    let reference = Model::from_host(gpu, &config(), weights.clone()).unwrap();
    let prompts = TASK.examples(Split::Train, 200, 21);
    let probe: Vec<Example> = prompts[..48].to_vec();
    let gen =
        GenerateConfig { max_new_tokens: 4, sampling: TEMPERATURE_1, seed: 99, stop_token: None, vocab_limit: None };
    let before = sampled_scores(gpu, &policy, tok, &probe, 8, &[1], gen).unwrap().mean_reward;
    let cfg = RlConfig {
        steps: 30,
        prompts_per_step: 32,
        group_size: 8,
        max_new_tokens: 4,
        optim: OptimConfig { lr: 3e-4, min_lr: 1e-5, warmup: 10, weight_decay: 0.0, ..OptimConfig::default() },
        beta: 0.0,
        epochs: 2,
        ..RlConfig::default()
    };
    let mut tr = RlTrainer::new(gpu, policy, reference, tok.clone(), prompts, reward, cfg.clone()).unwrap();
    let mut log = Vec::new();
    for _ in 0..cfg.steps {
        let m = tr.step().unwrap();
        assert!(m.kl.is_finite() && m.entropy > 0.0 && (0.0..=1.0).contains(&m.clip_fraction), "{m:?}");
        log.push(m.mean_reward);
    }
    let after = sampled_scores(gpu, &tr.policy, tok, &probe, 8, &[1], gen).unwrap().mean_reward;
    eprintln!("RL: mean reward {before:.3} → {after:.3}; per step {log:?}");
    // Measured on lavapipe: 0.318 → 0.375 (the probe is 384 seeded samples, so this is deterministic per device).
    assert!(after > before + 0.04, "RL should raise the mean reward: {before:.3} → {after:.3}");
}

#[test]
fn groups_with_equal_rewards_give_exactly_zero_gradient() {
    let gpu = gpu();
    let tok = tokenizer();
    let prompts = TASK.examples(Split::Train, 10, 2);
    let cfg =
        RlConfig { steps: 2, prompts_per_step: 3, group_size: 4, max_new_tokens: 3, beta: 0.0, ..RlConfig::default() };
    let model = || Model::new(gpu, &config(), 4).unwrap();
    let mut tr = RlTrainer::new(gpu, model(), model(), tok.clone(), prompts.clone(), |_, _| 1.0, cfg.clone()).unwrap();
    let m = tr.step().unwrap();
    assert_eq!(m.equal_reward_groups, 1.0);
    assert_eq!(m.grad_norm, 0.0, "equal rewards carry no signal: every gradient must be exactly zero");
    // With rewards that differ within groups the same batch does produce a gradient.
    let mut tr = RlTrainer::new(gpu, model(), model(), tok.clone(), prompts, |c, _| c.len() as f32, cfg).unwrap();
    let m = tr.step().unwrap();
    assert!(m.grad_norm > 0.0 && m.equal_reward_groups < 1.0, "{m:?}");
}

#[test]
fn rl_resumes_exactly_from_a_checkpoint() {
    let gpu = gpu();
    let tok = tokenizer();
    let prompts = TASK.examples(Split::Train, 20, 3);
    let cfg = RlConfig {
        steps: 3,
        prompts_per_step: 3,
        group_size: 4,
        max_new_tokens: 3,
        epochs: 2,
        optim: OptimConfig { lr: 1e-3, ..RlConfig::default().optim },
        ..RlConfig::default()
    };
    let model = || Model::new(gpu, &config(), 5).unwrap();
    let mut a = RlTrainer::new(gpu, model(), model(), tok.clone(), prompts.clone(), reward, cfg.clone()).unwrap();
    let straight: Vec<_> = (0..3).map(|_| a.step().unwrap()).collect();
    let mut b = RlTrainer::new(gpu, model(), model(), tok.clone(), prompts.clone(), reward, cfg.clone()).unwrap();
    b.step().unwrap();
    b.step().unwrap();
    let ckpt = b.checkpoint(None).unwrap();
    drop(b);
    let mut c = RlTrainer::resume(gpu, ckpt, model(), tok.clone(), prompts, reward, cfg).unwrap();
    let resumed = c.step().unwrap();
    assert_eq!(resumed.step, 3);
    assert_eq!(
        (resumed.mean_reward, resumed.objective, resumed.grad_norm, resumed.kl),
        (straight[2].mean_reward, straight[2].objective, straight[2].grad_norm, straight[2].kl),
        "the resumed step must equal the uninterrupted one"
    );
}

#[test]
fn rl_rejects_bad_inputs_clearly() {
    let gpu = gpu();
    let tok = tokenizer();
    let policy = || Model::new(gpu, &config(), 1).unwrap();
    let prompts = TASK.examples(Split::Train, 10, 2);
    let cfg = RlConfig { steps: 1, prompts_per_step: 2, group_size: 2, max_new_tokens: 2, ..RlConfig::default() };
    // A reference of another shape.
    let other = Model::new(gpu, &ModelConfig { n_embd: 32, ..config() }, 1).unwrap();
    let e = RlTrainer::new(gpu, policy(), other, tok.clone(), prompts.clone(), reward, cfg.clone()).err().unwrap();
    assert!(e.to_string().contains("reference"), "{e}");
    // A prompt longer than the context.
    let long = vec![Example { prompt: "1+".repeat(40), answer: "0".into() }];
    let e = RlTrainer::new(gpu, policy(), policy(), tok.clone(), long, reward, cfg.clone()).err().unwrap();
    assert!(e.to_string().contains("n_ctx"), "{e}");
    // A reward function that returns NaN: the step fails and says so.
    let mut tr = RlTrainer::new(gpu, policy(), policy(), tok.clone(), prompts, |_, _| f32::NAN, cfg).unwrap();
    let e = tr.step().unwrap_err().to_string();
    assert!(e.contains("reward function returned NaN at step 1"), "{e}");
    // A tokenizer without the chat tokens.
    let plain = Tokenizer::train(&"1+2=3\n".repeat(20), 260, &["<|endoftext|>"]).unwrap();
    let e =
        RlTrainer::new(gpu, policy(), policy(), plain, TASK.examples(Split::Train, 4, 1), reward, RlConfig::default())
            .err()
            .unwrap();
    assert!(e.to_string().contains("<|user|>"), "{e}");
}

#[test]
fn packed_examples_compute_what_they_would_alone() {
    use kiln_engine::autograd::Tape;
    use kiln_model::data::chat::{encode_example, pack, ChatTokens};
    let gpu = gpu();
    let tok = tokenizer();
    let ct = ChatTokens::from_tokenizer(tok).unwrap();
    let model = Model::new(gpu, &config(), 9).unwrap();
    let seqs: Vec<_> = [("3+4=", "7"), ("9+9=", "18"), ("0+5=", "5")]
        .iter()
        .map(|(p, a)| encode_example(tok, ct, p, a).unwrap())
        .collect();
    let t = config().n_ctx;
    let rows = pack(&seqs, t, ct.end).unwrap();
    assert_eq!(rows.len(), 1, "the three examples fit one row");
    // Per-token losses and the gradient of their sum, for one row with its packing layout.
    let run = |inputs: &[i32], targets: &[i32], lengths: &[usize]| {
        model.zero_grad(gpu).unwrap();
        let mut tape = Tape::new(gpu);
        let targets_t = gpu.upload_i32(targets, &[1, t]).unwrap();
        let w = gpu.upload(&vec![1.0; t], &[t]).unwrap();
        let layout = [lengths.to_vec()];
        let f = model.forward_packed(&mut tape, inputs, 1, t, Some(&layout), &targets_t, &w).unwrap();
        let losses = gpu.read(tape.value(f.losses)).unwrap();
        tape.backward(f.loss).unwrap();
        let grads: Vec<Vec<f32>> = model.params.iter().map(|p| gpu.read(&p.grad).unwrap()).collect();
        (losses, grads)
    };
    let packed = &rows[0];
    let (losses, grads) = run(&packed.inputs, &packed.targets, &packed.lengths);
    let mut offset = 0;
    let mut alone_grads: Vec<Vec<f32>> = grads.iter().map(|g| vec![0.0; g.len()]).collect();
    for s in &seqs {
        let alone = &pack(std::slice::from_ref(s), t, ct.end).unwrap()[0];
        let (l, g) = run(&alone.inputs, &alone.targets, &alone.lengths);
        for i in 0..s.tokens.len() - 1 {
            assert!(
                (losses[offset + i] - l[i]).abs() < 1e-4,
                "token {i}: packed {} alone {}",
                losses[offset + i],
                l[i]
            );
        }
        for (acc, g) in alone_grads.iter_mut().zip(&g) {
            acc.iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
        offset += s.tokens.len();
    }
    for ((p, g), want) in model.params.iter().zip(&grads).zip(&alone_grads) {
        let scale = want.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        let err = g.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-3 * scale, "{}: packed gradient differs from the sum of alone gradients by {err}", p.name);
    }
}

#[test]
fn chat_tokens_are_added_to_a_tokenizer_without_them_and_old_logits_stay() {
    use kiln_model::checkpoint::Checkpoint;
    use kiln_model::data::chat::{add_chat_tokens, ChatTokens};
    let gpu = gpu();
    let tok = Tokenizer::train(&"12+34=46 the king said\n".repeat(40), 300, &["<|endoftext|>"]).unwrap();
    assert!(ChatTokens::from_tokenizer(&tok).is_err());
    let v = tok.vocab_size();
    for config in [
        ModelConfig::gpt2(v, 32, 1, 2, 16),
        ModelConfig { tie_embeddings: false, ..ModelConfig::llama(v, 32, 1, (2, 1), 16, 24) },
    ] {
        let mut tok = tok.clone();
        let model = Model::new(gpu, &config, 3).unwrap();
        let ids: Vec<i32> = tok.encode("12+34=46 the king").unwrap().iter().map(|&x| x as i32).collect();
        let logits = |m: &Model| {
            let mut tape = Tape::no_grad(gpu);
            let l = m.logits(&mut tape, &ids, 1, ids.len()).unwrap();
            gpu.read(tape.value(l)).unwrap()
        };
        let before = logits(&model);
        let mut ckpt = Checkpoint {
            config: config.clone(),
            model: model.to_host(gpu).unwrap(),
            optimizer: vec![],
            state: None,
            tokenizer_json: Some(tok.to_json().unwrap()),
        };
        let added = add_chat_tokens(&mut ckpt, &mut tok).unwrap();
        assert_eq!(added, ["<|user|>", "<|assistant|>", "<|end|>"]);
        let ct = ChatTokens::from_tokenizer(&tok).unwrap();
        assert_eq!((ct.user as usize, ct.end as usize), (v, v + 2), "new ids follow the old vocabulary");
        assert_eq!(ckpt.config.vocab_size, v + 3);
        assert!(ckpt.tokenizer_json.as_ref().unwrap().contains("<|assistant|>"));
        let grown = Model::from_host(gpu, &ckpt.config, ckpt.model.clone()).unwrap();
        let after = logits(&grown);
        for (t, (old, new)) in before.chunks(v).zip(after.chunks(v + 3)).enumerate() {
            // The same weights for every old token and the same hidden states: the old logits are the same bits.
            assert_eq!(old, &new[..v], "{:?} position {t}", config.family);
        }
        // Once they are there, nothing changes.
        assert!(add_chat_tokens(&mut ckpt, &mut tok).unwrap().is_empty());
        assert_eq!(ckpt.config.vocab_size, v + 3);
    }
}
