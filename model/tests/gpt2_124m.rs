//! GPT-2 124M on the software GPU. Its 154 MB token embedding is larger than lavapipe's 128 MiB storage binding, and
//! its [B·T, 50257] logits would be too at any useful batch: the embedding, the tied head, the gradient norm and
//! AdamW work on the table in parts, and the chunked classifier never forms the logits. One repeated batch, three
//! steps: the loss must fall, and the step's memory must not hold anything of B·T·V size.

use std::sync::Arc;

use kiln_engine::autograd::Tape;
use kiln_engine::testing::gpu;
use kiln_model::arch::Model;
use kiln_model::train::optim::OptimConfig;
use kiln_model::train::pretrain::{TrainConfig, Trainer};
use kiln_model::ModelConfig;

#[test]
fn gpt2_124m_trains_and_decodes_on_this_adapter() {
    let gpu = gpu();
    let config = ModelConfig::preset("gpt2", 50257).unwrap();
    let model = Model::new(gpu, &config, 1).unwrap();
    let n_params: usize = model.params.iter().map(|p| p.value.numel()).sum();
    assert_eq!(n_params, 124_439_808, "GPT-2 small's parameter count (tied head)");
    let wte = model.params[0].value.bytes();
    println!("wte {wte} bytes; max binding {} on {}", gpu.max_binding(), gpu.adapter_name());

    // Exactly one window of data: every batch is the same 1×16 tokens.
    let (b, t) = (1, 16);
    let train: Vec<u32> = (0..=t as u32).map(|i| (i * 2957 + 11) % 50257).collect();
    let optim = OptimConfig { lr: 5e-5, min_lr: 5e-5, warmup: 0, ..OptimConfig::default() };
    let cfg = TrainConfig { steps: 3, batch: b, seq_len: t, optim, ..TrainConfig::default() };
    let mut tr = Trainer::new(gpu, model, cfg, Arc::new(train.clone())).unwrap();
    let persistent = gpu.pool_stats().live_bytes;
    let mut losses = Vec::new();
    for _ in 0..3 {
        let m = tr.step().unwrap();
        println!("step {}: loss {:.4}, {:.0} ms, peak {}", m.step, m.loss, m.ms_per_step, m.memory);
        losses.push(m.loss);
        let mem = m.memory;
        assert_eq!(mem.parameters + mem.gradients + mem.optimizer + mem.activations + mem.scratch, m.peak_bytes);
        // Parameters, gradients and two moments: 4 × 498 MB (size classes round up by at most 1/8).
        let p = 4 * n_params as u64;
        assert!(mem.parameters >= p && mem.parameters <= p + p / 8, "{mem}");
        assert_eq!((mem.gradients, mem.optimizer), (mem.parameters, 2 * mem.parameters), "{mem}");
        // The classifier's scratch is a few chunks of rows × V, never [B·T, V] logits with their gradient.
        assert!(mem.scratch <= 64 << 20, "scratch {mem}");
        assert!(m.peak_bytes - persistent <= (96 << 20), "step {}: {mem}", m.step);
    }
    assert!((losses[0] - (50257f32).ln()).abs() < 1.0, "an untrained GPT-2 is near uniform: {}", losses[0]);
    assert!(losses[1] < losses[0] && losses[2] < losses[1], "loss must fall on a repeated batch: {losses:?}");

    // Decoding through the same model: full logits of the last positions come from the head in parts.
    let ids: Vec<i32> = train[..t].iter().map(|&x| x as i32).collect();
    let mut tape = Tape::no_grad(gpu);
    let logits = tr.model.logits(&mut tape, &ids, b, t).unwrap();
    let l = gpu.read(tape.value(logits)).unwrap();
    assert_eq!(l.len(), t * 50257);
    assert!(l.iter().all(|x| x.is_finite()));
}
