//! Pretraining end to end on the software GPU: a short run learns (validation loss well below the corpus's
//! unigram entropy), checkpoints round-trip exactly, and `resume` continues with bit-identical losses.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_engine::autograd::Tape;
use kiln_engine::testing::gpu;
use kiln_engine::Gpu;
use kiln_model::arch::Model;
use kiln_model::checkpoint::{load_checkpoint, save_checkpoint};
use kiln_model::data::tokenizer::Tokenizer;
use kiln_model::data::{bundled_corpus, unigram_entropy_bits};
use kiln_model::train::optim::OptimConfig;
use kiln_model::train::pretrain::{eval_loss, TrainConfig, Trainer};
use kiln_model::ModelConfig;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A small slice of the bundled corpus, tokenized with a small BPE vocabulary: (train, val, vocab).
fn tiny_data() -> (Vec<u32>, Vec<u32>, usize) {
    let text = bundled_corpus().unwrap();
    let text = &text[..300_000];
    let tok = Tokenizer::train(text, 512, &["<|endoftext|>"]).unwrap();
    let ids = tok.encode(text).unwrap();
    let cut = ids.len() * 9 / 10;
    (ids[..cut].to_vec(), ids[cut..].to_vec(), tok.vocab_size())
}

fn tiny_config(vocab: usize) -> ModelConfig {
    ModelConfig::gpt2(vocab, 64, 2, 2, 64)
}

fn train_cfg(steps: u64) -> TrainConfig {
    let optim = OptimConfig { lr: 3e-3, min_lr: 3e-4, warmup: 10, ..OptimConfig::default() };
    TrainConfig { steps, batch: 8, seq_len: 64, optim, ..TrainConfig::default() }
}

#[test]
fn short_run_beats_the_unigram_baseline() {
    let gpu = gpu();
    let (train, val, vocab) = tiny_data();
    let unigram_nats = unigram_entropy_bits(&train, vocab) * std::f64::consts::LN_2;
    let config = tiny_config(vocab);
    let model = Model::new(gpu, &config, 1).unwrap();
    let start = eval_loss(gpu, &model, &val, 8, 64, 8).unwrap();
    let mut tr = Trainer::new(gpu, model, train_cfg(250), Arc::new(train)).unwrap();
    for _ in 0..250 {
        tr.step().unwrap();
    }
    let end = eval_loss(gpu, &tr.model, &val, 8, 64, 8).unwrap();
    assert!((start - (vocab as f32).ln()).abs() < 0.5, "an untrained model is near uniform: {start}");
    assert!(
        (end as f64) < 0.85 * unigram_nats,
        "validation loss {end} should be well below the unigram entropy {unigram_nats} nats (start {start})"
    );
}

#[test]
fn resume_reproduces_an_uninterrupted_run_bit_for_bit() {
    let gpu = gpu();
    let (train, _, vocab) = tiny_data();
    let train = Arc::new(train);
    let config = tiny_config(vocab);
    let mut straight = Trainer::new(gpu, Model::new(gpu, &config, 2).unwrap(), train_cfg(6), train.clone()).unwrap();
    let full: Vec<f32> = (0..6).map(|_| straight.step().unwrap().loss).collect();

    let dir = scratch("resume");
    let mut first = Trainer::new(gpu, Model::new(gpu, &config, 2).unwrap(), train_cfg(6), train.clone()).unwrap();
    let mut losses: Vec<f32> = (0..3).map(|_| first.step().unwrap().loss).collect();
    save_checkpoint(&dir, &first.checkpoint(None).unwrap()).unwrap();
    drop(first);
    let mut second = Trainer::resume(gpu, load_checkpoint(&dir).unwrap(), train_cfg(6), train).unwrap();
    assert_eq!(second.step, 3);
    losses.extend((0..3).map(|_| second.step().unwrap().loss));
    assert_eq!(losses, full, "resumed losses must equal the uninterrupted run's");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkpoint_round_trip_gives_identical_logits() {
    let gpu = gpu();
    let config = tiny_config(97);
    let model = Model::new(gpu, &config, 3).unwrap();
    let tokens: Vec<i32> = (0..2 * 17).map(|i: i32| i * 31 % 97).collect();
    let logits = |m: &Model| {
        let mut tape = Tape::no_grad(gpu);
        let l = m.logits(&mut tape, &tokens, 2, 17).unwrap();
        gpu.read(tape.value(l)).unwrap()
    };
    let dir = scratch("roundtrip");
    let tr = Trainer::new(gpu, model, train_cfg(1), Arc::new((0..200).map(|i| i % 97).collect())).unwrap();
    save_checkpoint(&dir, &tr.checkpoint(None).unwrap()).unwrap();
    let ck = load_checkpoint(&dir).unwrap();
    assert_eq!(ck.config, config);
    let loaded = Model::from_host(gpu, &ck.config, ck.model).unwrap();
    assert_eq!(logits(&tr.model), logits(&loaded));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_training_step_is_two_submissions_and_allocates_no_new_buffers() {
    let gpu = kiln_engine::Gpu::new().unwrap(); // private: exact counts
    let (train, _, vocab) = tiny_data();
    let cfg = TrainConfig { grad_accum: 2, ..train_cfg(10) };
    let mut tr = Trainer::new(&gpu, Model::new(&gpu, &tiny_config(vocab), 7).unwrap(), cfg, Arc::new(train)).unwrap();
    tr.step().unwrap(); // warm-up: the pool learns the step's sizes
    let (submits, _) = gpu.submit_counts();
    let created = gpu.pool_stats().buffers_created;
    for _ in 0..3 {
        tr.step().unwrap();
    }
    assert_eq!(gpu.submit_counts().0 - submits, 6, "two command buffers per step, micro-batches included");
    assert_eq!(gpu.pool_stats().buffers_created, created, "steady-state steps reuse pooled buffers");
}

#[test]
fn bad_batches_are_clear_errors() {
    let gpu = gpu();
    let model = Model::new(gpu, &tiny_config(50), 4).unwrap();
    let mut tape = Tape::no_grad(gpu);
    let e = model.logits(&mut tape, &[1, 2, 99], 1, 3).err().unwrap().to_string();
    assert!(e.contains("99") && e.contains("vocabulary"), "{e}");
    let e = model.logits(&mut tape, &vec![1; 65], 1, 65).err().unwrap().to_string();
    assert!(e.contains("n_ctx"), "{e}");
    let short = Trainer::new(gpu, Model::new(gpu, &tiny_config(50), 4).unwrap(), train_cfg(1), Arc::new(vec![1; 10]));
    assert!(short.is_err(), "a shard shorter than one window must be refused");
    // A batch whose MLP activations exceed one storage binding is refused up front, naming the setting.
    let limit = gpu.max_binding() as usize;
    let huge = TrainConfig { batch: limit / (64 * 512 * 4) + 1, ..train_cfg(1) };
    let e = Trainer::new(gpu, Model::new(gpu, &tiny_config(50), 4).unwrap(), huge, Arc::new(vec![1; 100_000]))
        .err()
        .unwrap();
    assert!(e.to_string().contains("MLP activations") && e.to_string().contains("lower the batch"), "{e}");
}

#[test]
fn logits_larger_than_one_binding_train_anyway() {
    // [B·T, V] logits of 1.5 binding limits: the chunked classifier never forms them.
    let gpu = gpu();
    let v = 4099;
    let rows = (gpu.max_binding() as usize * 3 / 2) / (v * 4) + 1;
    let cfg = TrainConfig { batch: rows.div_ceil(64), seq_len: 64, ..train_cfg(1) };
    let data: Vec<u32> = (0..200_000u32).map(|i| i * 7 % v as u32).collect();
    let mut tr = Trainer::new(gpu, Model::new(gpu, &tiny_config(v), 4).unwrap(), cfg, Arc::new(data)).unwrap();
    let m = tr.step().unwrap();
    assert!((m.loss - (v as f32).ln()).abs() < 0.5, "{}", m.loss);
    assert!(m.memory.scratch <= 64 << 20, "{}", m.memory);
}

#[test]
fn text_loss_counts_every_token_once_whatever_the_length() {
    use kiln_model::eval::evaluate::text_loss;
    let gpu = gpu();
    let model = Model::new(gpu, &ModelConfig::gpt2(61, 16, 1, 2, 16), 3).unwrap();
    let tokens: Vec<u32> = (0..75).map(|i| (i * 13 % 61) as u32).collect();
    // Reference: each window alone, every target weighted equally across the text.
    let by_windows = |t: usize| -> f64 {
        let mut total = 0.0;
        for start in (0..tokens.len() - 1).step_by(t) {
            let end = (start + t).min(tokens.len() - 1);
            let (x, y): (Vec<i32>, Vec<i32>) = (start..end).map(|i| (tokens[i] as i32, tokens[i + 1] as i32)).unzip();
            let mut tape = Tape::no_grad(gpu);
            let targets = gpu.upload_i32(&y, &[1, y.len()]).unwrap();
            let weights = gpu.upload(&vec![1.0; y.len()], &[y.len()]).unwrap();
            let f = model.forward(&mut tape, &x, 1, x.len(), &targets, &weights).unwrap();
            total += gpu.read(tape.value(f.loss)).unwrap()[0] as f64;
        }
        total / (tokens.len() - 1) as f64
    };
    for (batch, t) in [(1, 16), (4, 16), (3, 7), (8, 100)] {
        let r = text_loss(gpu, &model, &tokens, batch, t).unwrap();
        let t_used = t.min(16);
        assert_eq!(r.tokens, 74);
        assert_eq!(r.windows, 74usize.div_ceil(t_used), "batch {batch} t {t}");
        let want = by_windows(t_used);
        assert!((r.nats - want).abs() < 1e-5 * want, "batch {batch} t {t}: {} vs {want}", r.nats);
    }
    // Two tokens are enough; one is not.
    assert_eq!(text_loss(gpu, &model, &tokens[..2], 8, 16).unwrap().tokens, 1);
    let e = text_loss(gpu, &model, &tokens[..1], 8, 16).unwrap_err().to_string();
    assert!(e.contains("at least 2 tokens"), "{e}");
}

/// Gradients of one forward/backward of a fixed batch with `recompute`, and the step's peak pool bytes.
fn grads_with(gpu: &Gpu, config: &ModelConfig, recompute: kiln_model::arch::Recompute) -> (Vec<Vec<f32>>, u64) {
    let mut model = Model::new(gpu, config, 3).unwrap();
    model.recompute = recompute;
    let (b, t) = (4, 32);
    let tokens: Vec<i32> = (0..b * t).map(|i| ((i * 37 + 5) % config.vocab_size) as i32).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| ((i * 11 + 1) % config.vocab_size) as i32).collect();
    let weights = kiln_engine::autograd::mean_weights(&targets);
    let (tt, wt) = (gpu.upload_i32(&targets, &[b, t]).unwrap(), gpu.upload(&weights, &[b * t]).unwrap());
    gpu.sync().unwrap();
    gpu.reset_peak();
    let mut tape = Tape::new(gpu);
    let f = model.forward(&mut tape, &tokens, b, t, &tt, &wt).unwrap();
    tape.backward(f.loss).unwrap();
    drop(tape);
    let peak = gpu.pool_stats().peak_bytes;
    (model.params.iter().map(|p| gpu.read(&p.grad).unwrap()).collect(), peak)
}

#[test]
fn recomputation_changes_memory_not_gradients() {
    use kiln_model::arch::Recompute;
    // A device of its own: the pool's peak is per device, and the shared test device serves concurrent tests.
    let gpu = Gpu::new().expect("an adapter (run tools/setup.sh)");
    for config in [ModelConfig::gpt2(97, 64, 3, 4, 64), ModelConfig::preset("llama-tiny", 97).unwrap()] {
        let (g_none, p_none) = grads_with(&gpu, &config, Recompute::None);
        let (g_gelu, p_gelu) = grads_with(&gpu, &config, Recompute::Gelu);
        let (g_block, p_block) = grads_with(&gpu, &config, Recompute::Block);
        let family = config.family.name();
        assert!(g_gelu == g_none, "{family}: recomputing the MLP activation changed the gradients");
        assert!(g_block == g_none, "{family}: recomputing whole blocks changed the gradients");
        println!("{family}: peak bytes none {p_none}, gelu {p_gelu}, block {p_block}");
        assert!(p_gelu < p_none && p_block < p_gelu, "{family}: peaks none {p_none}, gelu {p_gelu}, block {p_block}");
    }
}
