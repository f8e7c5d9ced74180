//! The training-side commands: prepare, pretrain, eval, generate, and the quickstart that strings them together.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kiln_engine::ops::sampling::SamplingParams;
use kiln_engine::Gpu;
use kiln_model::arch::Model;
use kiln_model::checkpoint::load_checkpoint;
use kiln_model::data::tokenizer::Tokenizer;
use kiln_model::data::{bundled_corpus, prepare, read_corpus, read_shard, PrepareReport};
use kiln_model::eval::evaluate::text_loss;
use kiln_model::eval::generate::{generate, GenerateConfig};
use kiln_model::train::driver::{drive, Evaluation, RunDir, Schedule};
use kiln_model::train::optim::OptimConfig;
use kiln_model::train::pretrain::{eval_loss, TrainConfig, Trainer};
use kiln_model::ModelConfig;

use crate::dist::Job;

/// Where `prepare` gets its tokenizer: trained on the corpus, a tokenizer.json, or GPT-2's vocab.json + merges.txt.
pub enum TokenizerSource<'a> {
    Train(usize),
    Json(&'a Path),
    Gpt2 { vocab_json: &'a Path, merges: &'a Path },
}

/// `kiln prepare`: train (or load) a tokenizer and write train/val token shards.
pub fn prepare_cmd(
    inputs: &[PathBuf],
    out: &Path,
    source: TokenizerSource,
    val_fraction: f64,
) -> Result<PrepareReport> {
    let text = if inputs.is_empty() {
        say!("prepare: using the bundled corpus (Shakespeare's plays, data/README.md)");
        bundled_corpus()?
    } else {
        read_corpus(inputs)?
    };
    let tok = match source {
        TokenizerSource::Json(p) => {
            Tokenizer::from_file(p).with_context(|| format!("loading tokenizer {}", p.display()))?
        }
        TokenizerSource::Gpt2 { vocab_json, merges } => Tokenizer::from_gpt2_files(vocab_json, merges)
            .with_context(|| format!("loading {} and {}", vocab_json.display(), merges.display()))?,
        TokenizerSource::Train(vocab) => {
            say!("prepare: training a byte-level BPE tokenizer with {vocab} tokens on {} bytes", text.len());
            Tokenizer::train(&text, vocab, &kiln_model::data::chat::SPECIAL_TOKENS)?
        }
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let report = prepare(&text, &tok, out, val_fraction, 4096)?;
    say!(
        "prepare: {} train / {} val tokens, vocab {}, unigram entropy {:.3} bits/token → {}",
        report.train_tokens,
        report.val_tokens,
        report.vocab_size,
        report.unigram_entropy_bits,
        out.display()
    );
    Ok(report)
}

/// Options of `kiln pretrain` beyond the optimisation settings.
pub struct PretrainOpts<'a> {
    pub data: &'a Path,
    pub out: &'a Path,
    pub model: ModelChoice<'a>,
    pub resume: bool,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub ckpt_every: u64,
    pub world: Job<'a>,
}

pub enum ModelChoice<'a> {
    Preset(&'a str),
    Toml(&'a Path),
}

/// `kiln pretrain`; returns the final validation loss (NaN on ranks other than 0 of a data-parallel job, which
/// do not evaluate).
pub fn pretrain_cmd(gpu: &Gpu, opts: &PretrainOpts, cfg: TrainConfig) -> Result<f32> {
    let job = opts.world;
    let tok_json = std::fs::read_to_string(opts.data.join("tokenizer.json")).with_context(|| {
        format!("reading {} (run `kiln prepare` first)", opts.data.join("tokenizer.json").display())
    })?;
    // Take the output directory before reading anything from it: a live run there keeps it. Only rank 0 of a
    // data-parallel job writes there (the others read the checkpoint to resume).
    let mut out = if job.is_root() { Some(RunDir::open(opts.out, Some(tok_json))?) } else { None };
    let ckpt_dir = opts.out.join("checkpoint");
    let train = read_shard(&opts.data.join("train.bin")).context("reading train.bin (run `kiln prepare` first)")?;
    let val = read_shard(&opts.data.join("val.bin")).context("reading val.bin")?;
    let config = match opts.model {
        ModelChoice::Preset(name) => ModelConfig::preset(name, train.vocab_size)?,
        ModelChoice::Toml(p) => {
            ModelConfig::from_toml(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)?
        }
    };
    if config.vocab_size < train.vocab_size {
        bail!(
            "the model's vocab_size {} is smaller than the data's vocabulary {}",
            config.vocab_size,
            train.vocab_size
        );
    }
    let train_tokens = Arc::new(train.tokens);
    let mut trainer = if opts.resume {
        let dir = &ckpt_dir;
        let ckpt = load_checkpoint(dir).with_context(|| format!("resuming from {}", dir.display()))?;
        say!("pretrain: resuming at step {}", ckpt.state.as_ref().map_or(0, |s| s.step));
        note_ranks_changed(&ckpt, job.world.size, cfg.grad_accum, cfg.batch);
        Trainer::resume(gpu, ckpt, cfg.clone(), train_tokens)?
    } else {
        Trainer::new(gpu, Model::new(gpu, &config, cfg.seed)?, cfg.clone(), train_tokens)?
    };
    if let Some(comm) = &job.world.comm {
        trainer.data_parallel(comm.clone(), job.zero, job.bucket_bytes)?;
    }
    let c = &trainer.model.config;
    say!(
        "pretrain: {} parameters ({}: {} layers, {} heads{}, width {}, context {}), batch {}×{}×{}{} tokens, {} steps on {}",
        c.num_params(),
        c.family.name(),
        c.n_layer,
        c.n_head,
        if c.n_kv_head != c.n_head { format!(" ({} KV)", c.n_kv_head) } else { String::new() },
        c.n_embd,
        c.n_ctx,
        cfg.batch,
        cfg.seq_len,
        cfg.grad_accum,
        ranks_note(job),
        cfg.steps,
        gpu.adapter_name()
    );
    let mut val_eval = |model: &Model| -> kiln_model::Result<Evaluation> {
        let loss = eval_loss(gpu, model, &val.tokens, cfg.batch, cfg.seq_len, opts.eval_batches)?;
        let mut fields = serde_json::Map::new();
        fields.insert("val_loss".into(), serde_json::json!(loss));
        Ok(Evaluation { fields, summary: format!("val {loss:.3}") })
    };
    let schedule = Schedule { eval_every: opts.eval_every, ckpt_every: opts.ckpt_every };
    let eval: Option<&mut kiln_model::train::driver::Evaluate> = if job.is_root() { Some(&mut val_eval) } else { None };
    let last = drive(&mut trainer, u64::MAX, schedule, eval, out.as_mut(), job.progress("pretrain").as_mut())?;
    if !job.is_root() {
        return Ok(f32::NAN);
    }
    let val_loss = match last {
        Some(e) => e.fields["val_loss"].as_f64().unwrap_or(f64::NAN) as f32,
        None => eval_loss(gpu, &trainer.model, &val.tokens, cfg.batch, cfg.seq_len, opts.eval_batches)?,
    };
    say!("pretrain: final validation loss {val_loss:.4} nats/token; checkpoint in {}", ckpt_dir.display());
    Ok(val_loss)
}

/// " × N ranks" in a data-parallel job's banner.
pub fn ranks_note(job: Job) -> String {
    match job.world.size {
        1 => String::new(),
        n => format!(" × {n} ranks{}", if job.zero { " (ZeRO-1)" } else { "" }),
    }
}

/// Say so when a run resumes on another number of ranks: the data stream continues where it stopped, but each
/// step's global batch (ranks × grad_accum micro-batches) is not the one the run started with.
pub fn note_ranks_changed(ckpt: &kiln_model::checkpoint::Checkpoint, ranks: usize, accum: usize, batch: usize) {
    if let Some(state) = &ckpt.state {
        if state.ranks != ranks {
            say!(
                "note: this run was trained on {} rank(s) and resumes on {ranks}: the data continues from its saved                  position, but a step now takes {} rows instead of {} (same --batch and --grad-accum); for the same                  global batch use --grad-accum so that ranks × grad_accum is unchanged",
                state.ranks,
                ranks * accum * batch,
                state.ranks * accum * batch
            );
        }
    }
}

pub(crate) fn load_model(gpu: &Gpu, dir: &Path) -> Result<(Model, Tokenizer)> {
    let ckpt = load_checkpoint(dir).with_context(|| format!("loading checkpoint {}", dir.display()))?;
    let tok = match &ckpt.tokenizer_json {
        Some(_) => Tokenizer::from_file(&dir.join("tokenizer.json"))?,
        None => bail!("{} has no tokenizer.json", dir.display()),
    };
    Ok((Model::from_host(gpu, &ckpt.config, ckpt.model)?, tok))
}

/// `kiln eval`: mean per-token loss and perplexity of a checkpoint on a text file: every token after the first is
/// predicted once, in consecutive windows of the model's context (or `--seq-len`), the last window shorter.
pub fn eval_cmd(gpu: &Gpu, checkpoint: &Path, text: &Path, batch: usize, seq_len: Option<usize>) -> Result<()> {
    let (model, tok) = load_model(gpu, checkpoint)?;
    let body = read_corpus(&[text.to_path_buf()])?;
    let ids = tok.encode(&body)?;
    let t = seq_len.unwrap_or(model.config.n_ctx).min(model.config.n_ctx);
    let r = text_loss(gpu, &model, &ids, batch, t).with_context(|| format!("evaluating {}", text.display()))?;
    say!(
        "{}: {} tokens predicted (of {}) in {} windows of up to {t}, loss {:.6} nats/token, perplexity {:.2}, \
         {:.4} bits/byte",
        text.display(),
        r.tokens,
        ids.len(),
        r.windows,
        r.nats,
        r.nats.exp(),
        // bits per byte: nats → bits, scaled by tokens per byte of this text.
        r.nats / std::f64::consts::LN_2 * ids.len() as f64 / body.len() as f64
    );
    Ok(())
}

/// `kiln generate`: sample continuations of a prompt, streaming the first sample.
pub fn generate_cmd(gpu: &Gpu, checkpoint: &Path, prompt: &str, samples: usize, cfg: GenerateConfig) -> Result<()> {
    let (model, tok) = load_model(gpu, checkpoint)?;
    let cfg = GenerateConfig { vocab_limit: Some(tok.vocab_size()), ..cfg };
    let ids = tok.encode(prompt)?;
    print!("{prompt}");
    std::io::stdout().flush()?;
    let mut shown = Vec::new();
    let outs = generate(gpu, &model, &ids, samples, &cfg, |s, id| {
        if s == 0 {
            // Decode the growing sample and print what is new: byte-level tokens may split a character.
            shown.push(id);
            if let Ok(text) = tok.decode(&shown) {
                if !text.ends_with('\u{fffd}') {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                    shown.clear();
                }
            }
        }
    })?;
    say!();
    for (i, o) in outs.iter().enumerate().skip(1) {
        say!("--- sample {i} ---\n{prompt}{}", tok.decode(o)?);
    }
    Ok(())
}

pub fn default_sampling() -> SamplingParams {
    SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95 }
}

/// `kiln quickstart`: prepare the bundled corpus, pretrain the tiny preset briefly, compare with the unigram
/// baseline, and sample.
pub fn quickstart_cmd(gpu: &Gpu, out: &Path, steps: u64) -> Result<()> {
    say!("Kiln quickstart on {}\n", gpu.report());
    let data = out.join("data");
    let report =
        if data.join("train.bin").exists() && data.join("val.bin").exists() && data.join("tokenizer.json").exists() {
            say!("quickstart: reusing the prepared data in {}", data.display());
            None
        } else {
            Some(prepare_cmd(&[], &data, TokenizerSource::Train(2048), 0.1)?)
        };
    let cfg = TrainConfig {
        steps,
        batch: 8,
        seq_len: 128,
        optim: OptimConfig { lr: 3e-3, min_lr: 3e-4, warmup: steps / 20 + 1, ..OptimConfig::default() },
        ..TrainConfig::default()
    };
    let run = out.join("tiny");
    let _ = std::fs::remove_file(run.join("metrics.jsonl"));
    let world = crate::dist::World::alone();
    let opts = PretrainOpts {
        world: Job::alone(&world),
        data: &data,
        out: &run,
        model: ModelChoice::Preset("tiny"),
        resume: false,
        eval_every: (steps / 5).max(1),
        eval_batches: 16,
        ckpt_every: steps,
    };
    let val = pretrain_cmd(gpu, &opts, cfg)?;
    if let Some(r) = report {
        let unigram_nats = r.unigram_entropy_bits * std::f64::consts::LN_2;
        say!(
            "quickstart: validation loss {val:.3} nats/token vs the unigram baseline {unigram_nats:.3} ({:.1}% lower)",
            100.0 * (1.0 - val as f64 / unigram_nats)
        );
    }
    crate::plot::plot_cmd(&run.join("metrics.jsonl"), &run.join("loss.png"))?;
    say!("\nquickstart: a sample from the model (temperature 0.8, top-k 40):\n");
    let cfg = GenerateConfig {
        max_new_tokens: 120,
        sampling: default_sampling(),
        seed: 7,
        stop_token: None,
        vocab_limit: None,
    };
    generate_cmd(gpu, &run.join("checkpoint"), "ROMEO.\n", 1, cfg)?;
    say!("\nNext: `kiln generate --checkpoint {} --prompt \"...\"`", run.join("checkpoint").display());
    Ok(())
}

/// `kiln inspect`: logits, loss and every parameter's gradient for one token batch, as safetensors, so Kiln can be
/// compared with another implementation. `tokens` is a JSON array of equal-length rows; inputs are row[..-1],
/// targets row[1..]; the loss is the mean over all positions.
pub fn inspect_cmd(gpu: &Gpu, checkpoint: &Path, tokens: &Path, out: &Path) -> Result<()> {
    use kiln_engine::autograd::{mean_weights, Tape};
    use kiln_model::checkpoint::{save_safetensors, HostTensor};
    let (model, _) = load_model(gpu, checkpoint)?;
    let text = std::fs::read_to_string(tokens).with_context(|| format!("reading {}", tokens.display()))?;
    let rows: Vec<Vec<i64>> = serde_json::from_str(&text).with_context(|| {
        format!("{}: expected a JSON array of token-id rows, e.g. [[1,2,3],[4,5,6]]", tokens.display())
    })?;
    let len = rows.first().map_or(0, |r| r.len());
    if rows.is_empty() || len < 2 || rows.iter().any(|r| r.len() != len) {
        bail!(
            "{}: need at least one row, all of the same length ≥ 2 (inputs row[..-1], targets row[1..])",
            tokens.display()
        );
    }
    let (b, t) = (rows.len(), len - 1);
    let to_i32 = |v: i64| i32::try_from(v).map_err(|_| anyhow::anyhow!("token id {v} does not fit i32"));
    let inputs: Vec<i32> = rows.iter().flat_map(|r| r[..t].iter().map(|&v| to_i32(v))).collect::<Result<_>>()?;
    let targets: Vec<i32> = rows.iter().flat_map(|r| r[1..].iter().map(|&v| to_i32(v))).collect::<Result<_>>()?;
    model.check_tokens(&targets, b, t)?;
    let targets_t = gpu.upload_i32(&targets, &[b, t])?;
    let weights = gpu.upload(&mean_weights(&targets), &[b * t])?;
    // The logits from a forward of their own: training's forward (the chunked classifier) never forms them.
    let logits = {
        let mut tape = Tape::no_grad(gpu);
        let l = model.logits(&mut tape, &inputs, b, t)?;
        gpu.read(tape.value(l))?
    };
    model.zero_grad(gpu)?;
    let mut tape = Tape::new(gpu);
    let f = model.forward(&mut tape, &inputs, b, t, &targets_t, &weights)?;
    let v = model.config.vocab_size;
    let mut tensors = vec![
        HostTensor::new("logits", vec![b, t, v], logits),
        HostTensor::new("loss", vec![1], gpu.read(tape.value(f.loss))?),
    ];
    tape.backward(f.loss)?;
    // Gradients under the Hugging Face names and layouts the checkpoint uses (a fused Llama qkv_proj split back
    // into q/k/v_proj), so they compare name by name with `param.grad` in transformers.
    let grads = model
        .params
        .iter()
        .map(|p| Ok(HostTensor::new(p.name.clone(), p.grad.shape().to_vec(), gpu.read(&p.grad)?)))
        .collect::<Result<Vec<_>>>()?;
    let grads = kiln_model::arch::export_hf(&model.config, &grads)?;
    let n_grads = grads.len();
    tensors.extend(grads);
    let meta = [
        ("format".to_string(), "pt".to_string()),
        ("contents".to_string(), "logits, loss, gradients by parameter name".to_string()),
    ]
    .into_iter()
    .collect();
    save_safetensors(out, &tensors, &meta)?;
    say!(
        "inspect: loss {:.6} over {b}×{t} tokens; logits and {n_grads} gradients → {}",
        tensors[1].data[0],
        out.display()
    );
    Ok(())
}
