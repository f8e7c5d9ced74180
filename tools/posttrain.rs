//! `kiln sft` and `kiln rl`: post-training from a checkpoint through the same training driver as pretraining
//! (progress bar, JSONL metrics, atomic checkpoints, run lock), with the task evaluation of
//! `kiln_model::eval::evaluate` along the way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kiln_engine::Gpu;
use kiln_model::arch::Model;
use kiln_model::checkpoint::{load_checkpoint, Checkpoint};
use kiln_model::data::chat::add_chat_tokens;
use kiln_model::data::read_shard;
use kiln_model::data::tasks::{read_rl_jsonl, read_sft_jsonl, reward, Example, Split, Task};
use kiln_model::data::tokenizer::Tokenizer;
use kiln_model::eval::evaluate::greedy_accuracy;
use kiln_model::train::driver::{drive, Evaluate, Evaluation, RunDir, Schedule};
use kiln_model::train::pretrain::{eval_loss, TrainConfig, Trainer};
use kiln_model::train::rl::{RlConfig, RlTrainer};
use kiln_model::train::sft::SftSource;

use crate::dist::Job;

/// Where examples come from: generated tasks (train split) or a JSONL file.
pub struct ExampleSource<'a> {
    pub tasks: &'a [String],
    pub data: Option<&'a Path>,
    /// Examples per task.
    pub per_task: usize,
    pub seed: u64,
}

impl ExampleSource<'_> {
    pub fn parsed_tasks(&self) -> Result<Vec<Task>> {
        self.tasks.iter().map(|t| Ok(Task::parse(t)?)).collect()
    }

    fn load(&self, rl: bool) -> Result<Vec<Example>> {
        if let Some(p) = self.data {
            return Ok(if rl { read_rl_jsonl(p)? } else { read_sft_jsonl(p)? });
        }
        let tasks = self.parsed_tasks()?;
        if tasks.is_empty() {
            bail!("give --task (addition[:digits], reverse[:words], count) or --data FILE.jsonl");
        }
        Ok(tasks.iter().flat_map(|t| t.examples(Split::Train, self.per_task, self.seed)).collect())
    }
}

/// A checkpoint's model and tokenizer, with the chat tokens added (and the embedding grown) where the tokenizer
/// lacks them, as for a pretrained GPT-2 or Llama from the Hub.
pub fn load_policy(dir: &Path) -> Result<(Checkpoint, Tokenizer)> {
    let mut ckpt = load_checkpoint(dir).with_context(|| format!("loading checkpoint {}", dir.display()))?;
    if ckpt.tokenizer_json.is_none() {
        bail!("{} has no tokenizer.json: post-training needs the tokenizer the model was trained with", dir.display());
    }
    let mut tok = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let vocab = ckpt.config.vocab_size;
    let added = add_chat_tokens(&mut ckpt, &mut tok)?;
    if !added.is_empty() {
        say!(
            "{}: added the chat tokens {} to its tokenizer (model vocabulary {vocab} → {}; new rows start at the \
             mean embedding)",
            dir.display(),
            added.join(" "),
            ckpt.config.vocab_size
        );
    }
    Ok((ckpt, tok))
}

/// Greedy accuracy on each task's eval split: (task name, accuracy) pairs.
pub fn task_accuracies(
    gpu: &Gpu,
    model: &Model,
    tok: &Tokenizer,
    tasks: &[Task],
    n: usize,
    max_new: usize,
) -> kiln_model::Result<Vec<(String, f64)>> {
    tasks
        .iter()
        .map(|t| {
            let ex = t.examples(Split::Eval, n, 1234);
            Ok((t.name(), greedy_accuracy(gpu, model, tok, &ex, max_new)?.value))
        })
        .collect()
}

pub struct SftOpts<'a> {
    pub init: &'a Path,
    pub out: &'a Path,
    pub examples: ExampleSource<'a>,
    /// Prepared pretraining data (val.bin for the general loss, train.bin for the mix).
    pub pretrain_data: Option<&'a Path>,
    pub mix: f64,
    pub resume: bool,
    pub eval_every: u64,
    pub eval_examples: usize,
    pub ckpt_every: u64,
    pub world: Job<'a>,
}

/// The evaluation fields of post-training: greedy accuracy per task (under `key`) and, given held-out text, the
/// general loss.
fn accuracy_eval(acc: Vec<(String, f64)>, key: &str, val_loss: Option<f32>) -> Evaluation {
    let summary = acc.iter().map(|(t, a)| format!("{t} {a:.2}")).collect::<Vec<_>>().join(" ");
    let mut fields = serde_json::Map::new();
    fields.insert(key.into(), serde_json::json!(acc.into_iter().collect::<BTreeMap<_, _>>()));
    if let Some(v) = val_loss {
        fields.insert("val_loss".into(), serde_json::json!(v));
    }
    Evaluation { fields, summary }
}

/// `kiln sft`.
pub fn sft_cmd(gpu: &Gpu, opts: &SftOpts, cfg: TrainConfig) -> Result<()> {
    let job = opts.world;
    // Only rank 0 of a data-parallel job writes the run directory.
    let mut out = if job.is_root() { Some(RunDir::open(opts.out, None)?) } else { None };
    let ckpt_dir = opts.out.join("checkpoint");
    let (start, tok) = if opts.resume { load_policy(&ckpt_dir)? } else { load_policy(opts.init)? };
    let examples = opts.examples.load(false)?;
    let tasks = opts.examples.parsed_tasks()?;
    let (val, train_tokens) = match opts.pretrain_data {
        Some(d) => (
            Some(read_shard(&d.join("val.bin")).context("reading val.bin of --pretrain-data")?.tokens),
            if opts.mix > 0.0 {
                Some(Arc::new(read_shard(&d.join("train.bin")).context("reading train.bin of --pretrain-data")?.tokens))
            } else {
                None
            },
        ),
        None if opts.mix > 0.0 => bail!("--mix-pretrain needs --pretrain-data DIR (the output of `kiln prepare`)"),
        None => (None, None),
    };
    let source =
        SftSource::new(&tok, &examples, cfg.batch, cfg.seq_len, cfg.seed, train_tokens.map(|t| (t, opts.mix)))?;
    say!(
        "sft: {} examples packed into {} rows of {} tokens ({} response tokens per epoch), {} steps of {}×{}×{}{} on {}",
        examples.len(),
        source.num_rows(),
        cfg.seq_len,
        source.trained_tokens(),
        cfg.steps,
        cfg.batch,
        cfg.seq_len,
        cfg.grad_accum,
        crate::commands::ranks_note(job),
        gpu.adapter_name()
    );
    let out_tok = start.tokenizer_json.clone();
    let mut trainer = if opts.resume {
        crate::commands::note_ranks_changed(&start, job.world.size, cfg.grad_accum, cfg.batch);
        Trainer::resume_with_source(gpu, start, cfg.clone(), Box::new(source))?
    } else {
        let model = Model::from_host(gpu, &start.config, start.model)?;
        Trainer::with_source(gpu, model, cfg.clone(), Box::new(source))?
    };
    if let Some(comm) = &job.world.comm {
        trainer.data_parallel(comm.clone(), job.zero, job.bucket_bytes)?;
    }
    if let Some(out) = out.as_mut() {
        out.set_tokenizer(out_tok);
    }
    let mut eval = |model: &Model| -> kiln_model::Result<Evaluation> {
        let acc = task_accuracies(gpu, model, &tok, &tasks, opts.eval_examples, 16)?;
        let t = cfg.seq_len.min(model.config.n_ctx);
        let val_loss = val.as_ref().map(|v| eval_loss(gpu, model, v, cfg.batch, t, 16)).transpose()?;
        Ok(accuracy_eval(acc, "accuracy", val_loss))
    };
    let schedule = Schedule { eval_every: opts.eval_every, ckpt_every: opts.ckpt_every };
    let eval: Option<&mut Evaluate> = if job.is_root() { Some(&mut eval) } else { None };
    let last = drive(&mut trainer, u64::MAX, schedule, eval, out.as_mut(), job.progress("sft").as_mut())?;
    let summary = last.map(|e| e.summary).unwrap_or_default();
    say!("sft: done; checkpoint in {} ({summary})", ckpt_dir.display());
    Ok(())
}

pub struct RlOpts<'a> {
    pub init: &'a Path,
    /// The frozen reference of the KL penalty (default: `init`).
    pub reference: Option<&'a Path>,
    pub out: &'a Path,
    pub examples: ExampleSource<'a>,
    pub resume: bool,
    pub eval_every: u64,
    pub eval_examples: usize,
    pub ckpt_every: u64,
    pub world: Job<'a>,
}

/// `kiln rl`.
pub fn rl_cmd(gpu: &Gpu, opts: &RlOpts, cfg: RlConfig) -> Result<()> {
    let job = opts.world;
    let mut out = if job.is_root() { Some(RunDir::open(opts.out, None)?) } else { None };
    let ckpt_dir = opts.out.join("checkpoint");
    let reference_dir: PathBuf = opts.reference.unwrap_or(opts.init).to_path_buf();
    let (reference, _) = load_policy(&reference_dir)?;
    let reference = Model::from_host(gpu, &reference.config, reference.model)
        .with_context(|| format!("loading the reference model {}", reference_dir.display()))?;
    let (start, tok) = if opts.resume { load_policy(&ckpt_dir)? } else { load_policy(opts.init)? };
    let examples = opts.examples.load(true)?;
    let tasks = opts.examples.parsed_tasks()?;
    if let Some(out) = out.as_mut() {
        out.set_tokenizer(start.tokenizer_json.clone());
    }
    let mut trainer = if opts.resume {
        crate::commands::note_ranks_changed(&start, job.world.size, 1, cfg.prompts_per_step);
        RlTrainer::resume(gpu, start, reference, tok.clone(), examples, reward, cfg.clone())?
    } else {
        let policy = Model::from_host(gpu, &start.config, start.model)?;
        RlTrainer::new(gpu, policy, reference, tok.clone(), examples, reward, cfg.clone())?
    };
    if let Some(comm) = &job.world.comm {
        trainer.data_parallel(comm.clone(), job.zero, job.bucket_bytes)?;
    }
    say!(
        "rl: {:?}, {} steps of {} prompts{} × {} samples (≤ {} new tokens), β = {}, ε = {}, {} pass(es) per batch on {}",
        cfg.algorithm,
        cfg.steps,
        cfg.prompts_per_step,
        crate::commands::ranks_note(job),
        cfg.group_size,
        cfg.max_new_tokens,
        cfg.beta,
        cfg.clip_eps,
        cfg.passes(),
        gpu.adapter_name()
    );
    let mut eval = |model: &Model| -> kiln_model::Result<Evaluation> {
        let acc = task_accuracies(gpu, model, &tok, &tasks, opts.eval_examples, cfg.max_new_tokens)?;
        Ok(accuracy_eval(acc, "eval_accuracy", None))
    };
    let eval: Option<&mut Evaluate> = if tasks.is_empty() || !job.is_root() { None } else { Some(&mut eval) };
    let schedule = Schedule { eval_every: opts.eval_every, ckpt_every: opts.ckpt_every };
    let last = drive(&mut trainer, u64::MAX, schedule, eval, out.as_mut(), job.progress("rl").as_mut())?;
    let summary = last.map(|e| e.summary).unwrap_or_default();
    say!("rl: done; checkpoint in {} ({summary})", ckpt_dir.display());
    Ok(())
}
