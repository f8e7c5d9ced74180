//! `kiln study`: pretrain → SFT → RL on the bundled corpus and tasks, every checkpoint scored with one evaluation
//! suite, so the user sees what each phase buys (task accuracy, reward) and costs (held-out general loss in bits
//! per byte, exact KL(base ‖ model) in nats/token). Writes a table to stdout, `study.json`, and `study.png` (task gain
//! against general-loss increase per checkpoint: SFT and RL compared at matched accuracy, not matched steps).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use kiln_engine::Gpu;
use kiln_model::arch::Model;
use kiln_model::checkpoint::{save_checkpoint, HostTensor};
use kiln_model::data::chat::ChatTokens;
use kiln_model::data::read_shard;
use kiln_model::data::tasks::{reward, Split, Task};
use kiln_model::data::tokenizer::Tokenizer;
use kiln_model::eval::evaluate::{
    bits_per_byte, chat_prompts, greedy_accuracy, mean_kl, sampled_scores, TEMPERATURE_1,
};
use kiln_model::eval::generate::{rollouts, GenerateConfig};
use kiln_model::train::driver::{drive, Quiet, Schedule, Stage};
use kiln_model::train::optim::OptimConfig;
use kiln_model::train::pretrain::{TrainConfig, Trainer};
use kiln_model::train::rl::{RlConfig, RlTrainer};
use kiln_model::train::sft::SftSource;
use kiln_model::ModelConfig;
use serde::Serialize;

use crate::commands::{prepare_cmd, TokenizerSource};
use crate::progress::{spinner, Bar};

pub struct StudyOpts {
    pub out: std::path::PathBuf,
    /// The model family studied: its small preset (GPT-2 `tiny` or `llama-tiny`).
    pub arch: kiln_model::Family,
    pub quick: bool,
    pub seeds: u64,
    pub tasks: Vec<Task>,
    /// Also run RL with β = 0 (the main run uses `beta`).
    pub ablate_beta: bool,
    /// Also run SFT with this fraction of pretraining rows mixed in.
    pub ablate_mix: Option<f64>,
    pub beta: f32,
    /// Prepared data (`kiln prepare` output) instead of preparing the bundled corpus into OUT/data.
    pub data: Option<std::path::PathBuf>,
    pub sizes: Sizes,
}

/// Overrides of the run sizes (`None` keeps the `--quick` or default value).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sizes {
    pub pretrain_steps: Option<u64>,
    pub sft_steps: Option<u64>,
    pub rl_steps: Option<u64>,
    pub eval_prompts: Option<usize>,
    pub samples: Option<usize>,
}

/// Run sizes: `--quick` finishes in a few minutes on a software GPU, the default in well under an hour there.
struct Plan {
    pretrain_steps: u64,
    sft_steps: u64,
    rl_steps: u64,
    /// Snapshots evaluated per phase (evenly spaced, the last at the end).
    snapshots: u64,
    eval_prompts: usize,
    samples: usize,
    /// Held-out text for bits/byte, in windows of n_ctx tokens: 8 · text_batches of them (a fixed sample).
    text_batches: usize,
    kl_rows: usize,
}

impl Plan {
    fn new(quick: bool, o: Sizes) -> Plan {
        let mut p = Plan::preset(quick);
        p.pretrain_steps = o.pretrain_steps.unwrap_or(p.pretrain_steps).max(1);
        p.sft_steps = o.sft_steps.unwrap_or(p.sft_steps).max(1);
        p.rl_steps = o.rl_steps.unwrap_or(p.rl_steps).max(1);
        p.eval_prompts = o.eval_prompts.unwrap_or(p.eval_prompts).max(1);
        p.samples = o.samples.unwrap_or(p.samples).max(1);
        p.kl_rows = p.kl_rows.min(p.eval_prompts.max(4));
        p
    }

    fn preset(quick: bool) -> Plan {
        if quick {
            Plan {
                pretrain_steps: 100,
                sft_steps: 150,
                rl_steps: 12,
                snapshots: 2,
                eval_prompts: 24,
                samples: 8,
                text_batches: 4,
                kl_rows: 16,
            }
        } else {
            Plan {
                pretrain_steps: 600,
                sft_steps: 500,
                rl_steps: 60,
                snapshots: 4,
                eval_prompts: 64,
                samples: 16,
                text_batches: 16,
                kl_rows: 48,
            }
        }
    }
}

/// Everything measured on one checkpoint.
#[derive(Clone, Debug, Serialize)]
struct Scores {
    label: String,
    /// "base", "sft", "sft-mix", "rl", "rl-beta0".
    phase: String,
    step: u64,
    /// Held-out loss over the first `text_tokens` + 1 tokens of the validation split, divided by the bytes of
    /// exactly the `text_tokens` predicted (`text_bytes`).
    bits_per_byte: f64,
    text_tokens: usize,
    text_bytes: usize,
    /// task → greedy pass@1 (with Wilson interval), pass@k, mean sampled reward.
    tasks: BTreeMap<String, TaskScores>,
    /// Mean greedy accuracy over the tasks.
    accuracy: f64,
    mean_reward: f64,
    /// KL(base ‖ model) in nats/token on task prompts continued by the base model's own samples (the forgetting
    /// predictor of RL's Razor).
    #[serde(rename = "kl_base_model_task_nats")]
    kl_base_task: f64,
    /// KL(base ‖ model) in nats/token on held-out text.
    #[serde(rename = "kl_base_model_text_nats")]
    kl_base_text: f64,
    /// KL(SFT ‖ model) in nats/token on task prompts continued by the SFT model's own samples (RL checkpoints).
    #[serde(rename = "kl_sft_model_task_nats")]
    kl_sft_task: Option<f64>,
    /// KL(SFT ‖ model) in nats/token on held-out text (RL checkpoints).
    #[serde(rename = "kl_sft_model_text_nats")]
    kl_sft_text: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
struct TaskScores {
    greedy: kiln_model::eval::evaluate::Estimate,
    pass_at: Vec<(usize, kiln_model::eval::evaluate::Estimate)>,
    mean_reward: f64,
}

/// The fixed evaluation suite of one seed: held-out text, eval prompts, and the positions KL is measured on.
struct Suite<'a> {
    base: &'a Model,
    tok: &'a Tokenizer,
    tasks: &'a [Task],
    val: &'a [u32],
    plan: &'a Plan,
    /// Task prompts continued by the base model's own samples, with the continuation positions counted.
    task_rows: Vec<Vec<u32>>,
    task_counted: Vec<Vec<bool>>,
    /// Windows of held-out text, every position counted.
    text_rows: Vec<Vec<u32>>,
    text_counted: Vec<Vec<bool>>,
}

const MAX_NEW: usize = 16;

impl<'a> Suite<'a> {
    /// The fixed sample of the validation split that bits/byte is measured on: its first
    /// `text_batches` · 8 · n_ctx + 1 tokens (all of it when shorter), the same for every checkpoint.
    fn val_sample(&self) -> &'a [u32] {
        let n = self.plan.text_batches * 8 * self.base.config.n_ctx + 1;
        &self.val[..n.min(self.val.len())]
    }

    fn new(
        gpu: &Gpu,
        base: &'a Model,
        tok: &'a Tokenizer,
        tasks: &'a [Task],
        val: &'a [u32],
        plan: &'a Plan,
    ) -> Result<Suite<'a>> {
        let (task_rows, task_counted) = sampled_rows(gpu, base, tok, tasks, plan)?;
        let t = base.config.n_ctx;
        let text_rows: Vec<Vec<u32>> =
            val.chunks(t + 1).filter(|c| c.len() == t + 1).take(plan.kl_rows).map(|c| c.to_vec()).collect();
        let text_counted = text_rows.iter().map(|r| vec![true; r.len()]).collect();
        Ok(Suite { base, tok, tasks, val, plan, task_rows, task_counted, text_rows, text_counted })
    }

    fn score(
        &self,
        gpu: &Gpu,
        model: &Model,
        sft: Option<&Model>,
        label: &str,
        phase: &str,
        step: u64,
    ) -> Result<Scores> {
        let p = self.plan;
        let t = model.config.n_ctx;
        let text = bits_per_byte(gpu, model, self.tok, self.val_sample(), 8, t)?;
        let mut tasks = BTreeMap::new();
        let ks: Vec<usize> = [1, 4, 16].into_iter().filter(|&k| k <= p.samples).collect();
        for task in self.tasks {
            let ex = task.examples(Split::Eval, p.eval_prompts, 1234);
            let greedy = greedy_accuracy(gpu, model, self.tok, &ex, MAX_NEW)?;
            let gen = GenerateConfig {
                max_new_tokens: MAX_NEW,
                sampling: TEMPERATURE_1,
                seed: 42,
                stop_token: None,
                vocab_limit: None,
            };
            let s = sampled_scores(gpu, model, self.tok, &ex, p.samples, &ks, gen)?;
            tasks.insert(task.name(), TaskScores { greedy, pass_at: s.pass_at, mean_reward: s.mean_reward });
        }
        let n = tasks.len().max(1) as f64;
        // KL(reference ‖ this model), nats/token, on the reference's own samples (RL's Razor's direction).
        let kl = |reference: &Model, rows: &[Vec<u32>], counted: &[Vec<bool>]| {
            mean_kl(gpu, reference, model, rows, counted, 8)
        };
        Ok(Scores {
            label: label.into(),
            phase: phase.into(),
            step,
            bits_per_byte: text.bits_per_byte,
            text_tokens: text.tokens,
            text_bytes: text.bytes,
            accuracy: tasks.values().map(|s| s.greedy.value).sum::<f64>() / n,
            mean_reward: tasks.values().map(|s| s.mean_reward).sum::<f64>() / n,
            tasks,
            kl_base_task: kl(self.base, &self.task_rows, &self.task_counted)?,
            kl_base_text: kl(self.base, &self.text_rows, &self.text_counted)?,
            // From SFT on the SFT model's own samples, which is what an RL run started from it explores.
            kl_sft_task: match sft {
                Some(s) => {
                    let (rows, counted) = sampled_rows(gpu, s, self.tok, self.tasks, self.plan)?;
                    Some(kl(s, &rows, &counted)?)
                }
                None => None,
            },
            kl_sft_text: sft.map(|s| kl(s, &self.text_rows, &self.text_counted)).transpose()?,
        })
    }
}

/// Token rows and, per row, which positions are counted.
type KlRows = (Vec<Vec<u32>>, Vec<Vec<bool>>);

/// Each task's KL prompts continued by `model`'s own samples (temperature 1), with the positions that predict the
/// continuation counted: the rows on which KL(model ‖ π) is the sequence-level KL per token.
fn sampled_rows(gpu: &Gpu, model: &Model, tok: &Tokenizer, tasks: &[Task], plan: &Plan) -> Result<KlRows> {
    let ct = ChatTokens::from_tokenizer(tok)?;
    let (mut task_rows, mut task_counted) = (Vec::new(), Vec::new());
    for t in tasks {
        let ex = t.examples(Split::Eval, plan.kl_rows, 77);
        let prompts = chat_prompts(tok, ct, &ex, model.config.n_ctx)?;
        let cfg = GenerateConfig {
            max_new_tokens: MAX_NEW,
            sampling: TEMPERATURE_1,
            seed: 5,
            stop_token: Some(ct.end),
            vocab_limit: Some(tok.vocab_size()),
        };
        let outs = rollouts(gpu, model, &prompts, 1, &cfg, |_, _, _| {})?;
        for (p, group) in prompts.iter().zip(outs) {
            let row: Vec<u32> = p.iter().chain(&group[0].tokens).copied().collect();
            // Position i predicts token i + 1: count the positions that predict the continuation.
            task_counted.push((0..row.len()).map(|i| i + 1 >= p.len()).collect());
            task_rows.push(row);
        }
    }
    Ok((task_rows, task_counted))
}

/// Steps at which a phase of `steps` takes its snapshots.
fn snapshot_steps(steps: u64, n: u64) -> Vec<u64> {
    (1..=n).map(|i| (steps * i / n).max(1)).collect()
}

/// The study scores its own snapshots: the driver neither evaluates nor writes (the phases save their final
/// weights themselves).
const NO_EVAL: Schedule = Schedule { eval_every: u64::MAX, ckpt_every: u64::MAX };

/// Train `stage` through the driver, stopping at each of `n` evenly spaced snapshots to call `at_snapshot` (with
/// the progress bar out of the way); returns the seconds spent training.
fn snapshots(
    stage: &mut dyn Stage,
    n: u64,
    label: &str,
    at_snapshot: &mut dyn FnMut(&Model, u64) -> Result<()>,
) -> Result<f64> {
    let mut secs = 0.0;
    for at in snapshot_steps(stage.total_steps(), n) {
        let start = std::time::Instant::now();
        drive(stage, at, NO_EVAL, None, None, &mut Quiet)?;
        secs += start.elapsed().as_secs_f64();
        let bar = Bar::transient(label);
        bar.suspend(|| at_snapshot(stage.model(), at))?;
    }
    Ok(secs)
}

/// One seed: the whole pipeline and every checkpoint's scores.
fn run_seed(gpu: &Gpu, opts: &StudyOpts, plan: &Plan, data: &Path, seed: u64) -> Result<Vec<Scores>> {
    let tok = Tokenizer::from_file(&data.join("tokenizer.json"))?;
    let tok_json = std::fs::read_to_string(data.join("tokenizer.json"))?;
    let train = Arc::new(read_shard(&data.join("train.bin"))?.tokens);
    let val = read_shard(&data.join("val.bin"))?.tokens;
    let preset = match opts.arch {
        kiln_model::Family::Gpt2 => "tiny",
        kiln_model::Family::Llama => "llama-tiny",
    };
    let config = ModelConfig::preset(preset, tok.vocab_size())?;
    let dir = opts.out.join(format!("seed{seed}"));
    let save = |name: &str, model: &Model| -> Result<()> {
        let ckpt = kiln_model::checkpoint::Checkpoint {
            config: model.config.clone(),
            model: model.to_host(gpu)?,
            optimizer: Vec::new(),
            state: None,
            tokenizer_json: Some(tok_json.clone()),
        };
        Ok(save_checkpoint(&dir.join(name), &ckpt)?)
    };

    // Pretraining.
    let cfg = TrainConfig {
        steps: plan.pretrain_steps,
        batch: 8,
        seq_len: 128,
        seed,
        optim: OptimConfig { lr: 3e-3, min_lr: 3e-4, warmup: plan.pretrain_steps / 20 + 1, ..OptimConfig::default() },
        ..TrainConfig::default()
    };
    let mut tr = Trainer::new(gpu, Model::new(gpu, &config, seed)?, cfg.clone(), train.clone())?;
    let start = std::time::Instant::now();
    drive(&mut tr, u64::MAX, NO_EVAL, None, None, &mut Bar::transient("pretrain"))?;
    println!("  pretrain: {} steps in {:.0} s", cfg.steps, start.elapsed().as_secs_f64());
    let base = tr.model;
    save("base", &base)?;
    let base_host = base.to_host(gpu)?;

    let sp = spinner("building the evaluation suite (base samples for the KL positions)".into());
    let suite = Suite::new(gpu, &base, &tok, &opts.tasks, &val, plan)?;
    sp.finish_and_clear();
    let mut scores = Vec::new();
    let score = |model: &Model, sft: Option<&Model>, label: &str, phase: &str, step: u64| -> Result<Scores> {
        let sp = spinner(format!("evaluating {label}"));
        let start = std::time::Instant::now();
        let s = suite.score(gpu, model, sft, label, phase, step)?;
        sp.finish_and_clear();
        println!(
            "  {label:<14} bits/byte {:.4}  accuracy {:.3}  reward {:.3}  KL(base‖π) task {:.4} text {:.4} nats/tok ({:.0} s)",
            s.bits_per_byte,
            s.accuracy,
            s.mean_reward,
            s.kl_base_task,
            s.kl_base_text,
            start.elapsed().as_secs_f64()
        );
        Ok(s)
    };
    scores.push(score(&base, None, "base", "base", 0)?);

    // SFT (and the mix ablation).
    let examples: Vec<_> = opts.tasks.iter().flat_map(|t| t.examples(Split::Train, 4000, seed)).collect();
    let sft_cfg = TrainConfig {
        steps: plan.sft_steps,
        batch: 16,
        seq_len: 64,
        seed,
        optim: OptimConfig { lr: 1e-3, min_lr: 1e-4, warmup: 10, ..OptimConfig::default() },
        ..TrainConfig::default()
    };
    let mut sft_final = None;
    let mixes: Vec<(f64, &str)> =
        std::iter::once((0.0, "sft")).chain(opts.ablate_mix.map(|f| (f, "sft-mix"))).collect();
    for (mix, phase) in mixes {
        let mix_src = (mix > 0.0).then(|| (train.clone(), mix));
        let source = SftSource::new(&tok, &examples, sft_cfg.batch, sft_cfg.seq_len, seed, mix_src)?;
        let model = Model::from_host(gpu, &config, base_host.clone())?;
        let mut tr = Trainer::with_source(gpu, model, sft_cfg.clone(), Box::new(source))?;
        let train_secs = snapshots(&mut tr, plan.snapshots, phase, &mut |model: &Model, at| {
            scores.push(score(model, None, &format!("{phase}@{at}"), phase, at)?);
            Ok(())
        })?;
        println!("  {phase}: {} steps trained in {train_secs:.0} s", sft_cfg.steps);
        if phase == "sft" {
            save("sft", &tr.model)?;
            sft_final = Some(tr.model.to_host(gpu)?);
        }
    }
    let sft_host: Vec<HostTensor> = sft_final.expect("the main SFT run always happens");
    let sft = Model::from_host(gpu, &config, sft_host.clone())?;

    // RL from the SFT model, the SFT model as reference (and the β = 0 ablation).
    let rl_examples: Vec<_> = opts.tasks.iter().flat_map(|t| t.examples(Split::Train, 2000, seed + 1)).collect();
    let betas: Vec<(f32, &str)> =
        std::iter::once((opts.beta, "rl")).chain(opts.ablate_beta.then_some((0.0, "rl-beta0"))).collect();
    for (beta, phase) in betas {
        let rl_cfg = RlConfig {
            steps: plan.rl_steps,
            prompts_per_step: 16,
            group_size: 8,
            max_new_tokens: MAX_NEW,
            beta,
            epochs: 2,
            seed,
            optim: OptimConfig { lr: 3e-4, min_lr: 3e-5, warmup: 10, weight_decay: 0.0, ..OptimConfig::default() },
            ..RlConfig::default()
        };
        let policy = Model::from_host(gpu, &config, sft_host.clone())?;
        let reference = Model::from_host(gpu, &config, sft_host.clone())?;
        let mut tr = RlTrainer::new(gpu, policy, reference, tok.clone(), rl_examples.clone(), reward, rl_cfg.clone())?;
        let train_secs = snapshots(&mut tr, plan.snapshots, phase, &mut |model: &Model, at| {
            scores.push(score(model, Some(&sft), &format!("{phase}@{at}"), phase, at)?);
            Ok(())
        })?;
        println!("  {phase}: {} steps trained in {train_secs:.0} s", rl_cfg.steps);
        if phase == "rl" {
            save("rl", &tr.policy)?;
        }
    }
    Ok(scores)
}

/// Mean and sample standard deviation.
fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// The final checkpoint of a phase in one seed's scores.
fn last<'s>(scores: &'s [Scores], phase: &str) -> Option<&'s Scores> {
    scores.iter().rev().find(|s| s.phase == phase)
}

/// Rows: metrics; columns: base, SFT, RL (each with its change from base); mean ± std over seeds.
fn table(runs: &[Vec<Scores>], tasks: &[Task]) -> String {
    type Metric = Box<dyn Fn(&Scores) -> Option<f64>>;
    let mut metrics: Vec<(String, Metric)> =
        vec![("general loss (bits/byte)".into(), Box::new(|s: &Scores| Some(s.bits_per_byte)))];
    for t in tasks {
        let name = t.name();
        let n = name.clone();
        metrics.push((
            format!("{name} greedy pass@1"),
            Box::new(move |s: &Scores| s.tasks.get(&n).map(|x| x.greedy.value)),
        ));
        let n = name.clone();
        metrics.push((
            format!("{name} pass@k (largest k)"),
            Box::new(move |s: &Scores| s.tasks.get(&n).and_then(|x| x.pass_at.last().map(|p| p.1.value))),
        ));
        let n = name.clone();
        metrics
            .push((format!("{name} mean reward"), Box::new(move |s: &Scores| s.tasks.get(&n).map(|x| x.mean_reward))));
    }
    metrics.push(("KL(base‖π) nats/tok, task".into(), Box::new(|s: &Scores| Some(s.kl_base_task))));
    metrics.push(("KL(base‖π) nats/tok, text".into(), Box::new(|s: &Scores| Some(s.kl_base_text))));
    metrics.push(("KL(SFT‖π) nats/tok, task".into(), Box::new(|s: &Scores| s.kl_sft_task)));
    metrics.push(("KL(SFT‖π) nats/tok, text".into(), Box::new(|s: &Scores| s.kl_sft_text)));
    let phases = ["base", "sft", "rl"];
    let mut out = format!("{:<32}", "metric");
    for p in phases {
        out += &format!(" | {:>28}", p);
    }
    out += "\n";
    let cell = |vals: &[f64]| {
        let (m, s) = mean_std(vals);
        if vals.len() > 1 {
            format!("{m:.4}±{s:.4}")
        } else {
            format!("{m:.4}")
        }
    };
    for (name, f) in &metrics {
        out += &format!("{name:<32}");
        for p in phases {
            let vals: Vec<f64> = runs.iter().filter_map(|r| last(r, p).and_then(f)).collect();
            // The change from base, where the base model has the metric (it has no KL from SFT).
            let deltas: Vec<f64> = runs.iter().filter_map(|r| Some(f(last(r, p)?)? - f(last(r, "base")?)?)).collect();
            let text = if vals.is_empty() {
                "—".to_string()
            } else if p == "base" || deltas.is_empty() {
                cell(&vals)
            } else {
                format!("{} ({:+.4})", cell(&vals), mean_std(&deltas).0)
            };
            out += &format!(" | {text:>28}");
        }
        out += "\n";
    }
    out
}

/// Task gain (mean greedy accuracy − base) against general-loss increase (bits/byte − base), one line per phase
/// and seed, so SFT and RL are compared at matched accuracy.
fn plot(runs: &[Vec<Scores>], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    crate::plot::register_font()?;
    let mut series: BTreeMap<(usize, String), Vec<(f64, f64)>> = BTreeMap::new();
    for (i, r) in runs.iter().enumerate() {
        let Some(base) = last(r, "base") else { continue };
        let sft_end = last(r, "sft");
        for s in r {
            let key = (i, s.phase.clone());
            let line = series.entry(key).or_default();
            if line.is_empty() {
                // Each line starts where its phase started: SFT from the base, RL from the final SFT model.
                let origin = if s.phase.starts_with("rl") { sft_end.unwrap_or(base) } else { base };
                line.push((origin.bits_per_byte - base.bits_per_byte, origin.accuracy - base.accuracy));
            }
            line.push((s.bits_per_byte - base.bits_per_byte, s.accuracy - base.accuracy));
        }
    }
    let pts: Vec<(f64, f64)> = series.values().flatten().copied().collect();
    let (x0, x1) = pts.iter().fold((0.0f64, 0.0f64), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts.iter().fold((0.0f64, 0.0f64), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (px, py) = (((x1 - x0) * 0.1).max(1e-3), ((y1 - y0) * 0.1).max(1e-2));
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Kiln study: task gain vs general-loss increase per checkpoint", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("general loss increase vs base (bits/byte)")
        .y_desc("task accuracy gain vs base (greedy, mean over tasks)")
        .draw()
        .map_err(|e| err(&e))?;
    let colour = |phase: &str| match phase {
        "sft" => BLUE,
        "sft-mix" => CYAN,
        "rl" => RED,
        "rl-beta0" => MAGENTA,
        _ => BLACK,
    };
    let mut labelled = std::collections::HashSet::new();
    for ((_, phase), line) in &series {
        let c = colour(phase);
        let s = chart.draw_series(LineSeries::new(line.iter().copied(), c.stroke_width(2))).map_err(|e| err(&e))?;
        if labelled.insert(phase.clone()) {
            s.label(phase.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 4, c.filled()))).map_err(|e| err(&e))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

pub fn study_cmd(gpu: &Gpu, opts: &StudyOpts) -> Result<()> {
    let plan = Plan::new(opts.quick, opts.sizes);
    println!(
        "Kiln study on {}: pretrain {} steps → SFT {} → RL {} (β = {}), {} seed(s), tasks {}",
        gpu.report(),
        plan.pretrain_steps,
        plan.sft_steps,
        plan.rl_steps,
        opts.beta,
        opts.seeds,
        opts.tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
    );
    let data = opts.data.clone().unwrap_or_else(|| opts.out.join("data"));
    let prepared = ["train.bin", "val.bin", "tokenizer.json"].iter().all(|f| data.join(f).exists());
    if opts.data.is_some() && !prepared {
        anyhow::bail!("{} lacks train.bin, val.bin or tokenizer.json: run `kiln prepare --out` there", data.display());
    }
    if !prepared {
        prepare_cmd(&[], &data, TokenizerSource::Train(2048), 0.1)?;
    }
    // Fail before pretraining, not after, when the tokenizer cannot hold the chat format.
    ChatTokens::from_tokenizer(&Tokenizer::from_file(&data.join("tokenizer.json"))?)?;
    let mut runs = Vec::new();
    for seed in 1..=opts.seeds {
        println!("seed {seed}:");
        runs.push(run_seed(gpu, opts, &plan, &data, seed).with_context(|| format!("study seed {seed}"))?);
    }
    let text = table(&runs, &opts.tasks);
    println!("\n{text}");
    let json = serde_json::json!({
        "device": gpu.adapter_name(),
        "quick": opts.quick,
        "seeds": opts.seeds,
        "beta": opts.beta,
        "ablate_beta": opts.ablate_beta,
        "ablate_mix": opts.ablate_mix,
        "tasks": opts.tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "runs": runs,
    });
    let json_path = opts.out.join("study.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let png = opts.out.join("study.png");
    plot(&runs, &png)?;
    println!("study: {} and {}; checkpoints under {}", json_path.display(), png.display(), opts.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(phase: &str, bpb: f64, acc: f64) -> Scores {
        let greedy = kiln_model::eval::evaluate::wilson(acc, 10);
        let task = TaskScores { greedy, pass_at: vec![(4, greedy)], mean_reward: acc };
        Scores {
            label: phase.into(),
            phase: phase.into(),
            step: 1,
            bits_per_byte: bpb,
            text_tokens: 100,
            text_bytes: 400,
            tasks: [("count".to_string(), task)].into_iter().collect(),
            accuracy: acc,
            mean_reward: acc,
            kl_base_task: 0.0,
            kl_base_text: 0.0,
            kl_sft_task: (phase == "rl").then_some(0.5),
            kl_sft_text: None,
        }
    }

    #[test]
    fn table_gives_mean_and_spread_over_seeds_and_change_from_base() {
        let runs = vec![
            vec![scores("base", 2.0, 0.0), scores("sft", 3.0, 0.5), scores("rl", 3.5, 0.7)],
            vec![scores("base", 2.0, 0.0), scores("sft", 4.0, 0.7), scores("rl", 4.5, 0.9)],
        ];
        let text = table(&runs, &[Task::CountLetter]);
        let bpb = text.lines().find(|l| l.starts_with("general loss")).unwrap();
        // SFT: mean 3.5, sample std 0.7071, change from base +1.5.
        assert!(bpb.contains("3.5000±0.7071 (+1.5000)"), "{bpb}");
        let kl = text.lines().find(|l| l.starts_with("KL(SFT‖π) nats/tok, task")).unwrap();
        assert!(kl.contains("0.5000±0.0000") && !kl.contains("NaN"), "{kl}");
        assert_eq!(mean_std(&[1.0]), (1.0, 0.0));
        assert_eq!(snapshot_steps(10, 3), vec![3, 6, 10]);
    }
}
