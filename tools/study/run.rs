//! Running a study's plan for one seed: the base model (pretrained, or `--base`), then every run — SFT sweeps,
//! RL sweeps, the branch point's three arms, the transfer runs — each evaluated at its snapshots with the seed's
//! suite. Every finished run is written to OUT/seedN/RUN/record.json and its final weights to OUT/seedN/RUN/
//! checkpoint, so a killed study picks up at the first unfinished run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use kiln_engine::Gpu;
use kiln_model::arch::Model;
use kiln_model::checkpoint::{load_checkpoint, save_checkpoint, Checkpoint};
use kiln_model::data::chat::ChatTokens;
use kiln_model::data::tasks::{reward, Split, Task};
use kiln_model::data::tokenizer::Tokenizer;
use kiln_model::eval::evaluate::text_loss;
use kiln_model::train::driver::{drive, Evaluation, RunDir, Schedule, Stage};
use kiln_model::train::onpolicy::{accepted_source, rejection_sample};
use kiln_model::train::optim::OptimConfig;
use kiln_model::train::pretrain::{TrainConfig, Trainer};
use kiln_model::train::rl::{RlConfig, RlTrainer};
use kiln_model::train::sft::SftSource;
use kiln_model::ModelConfig;
use serde::Serialize;

use super::plan::{Plan, RlPoint, SftPoint};
use super::record::{Method, RunRecord, Scores, SeedRecord};
use super::suite::Suite;
use crate::progress::{say, spinner, Bar};

/// What every run of a seed shares.
pub struct SeedContext<'a> {
    pub gpu: &'a Gpu,
    pub plan: &'a Plan,
    pub tok: &'a Tokenizer,
    pub tok_json: &'a str,
    pub train: Arc<Vec<u32>>,
    pub seed: u64,
    pub dir: PathBuf,
    /// Runs finished over the whole study, out of its length (the overall progress).
    pub overall: indicatif::ProgressBar,
}

/// The study scores its own snapshots: the driver never evaluates, and checkpoints only at a run's last step.
const SCHEDULE: Schedule = Schedule { eval_every: u64::MAX, ckpt_every: u64::MAX };

/// Steps at which a run of `steps` takes its `n` snapshots, evenly spaced, the last at the end.
pub fn snapshot_steps(steps: u64, n: u64) -> Vec<u64> {
    let mut s: Vec<u64> = (1..=n).map(|i| (steps * i / n).max(1)).collect();
    s.dedup();
    s
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    kiln_model::atomic::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

fn read_json<T: for<'de> serde::Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not a study record", path.display()))?))
}

impl SeedContext<'_> {
    fn config(&self) -> Result<ModelConfig> {
        let preset = match (self.plan.preset.as_str(), self.plan.arch.as_str()) {
            ("", "llama") => "llama-tiny",
            ("", _) => "tiny",
            (p, _) => p,
        };
        Ok(ModelConfig::preset(preset, self.tok.vocab_size())?)
    }

    fn weights(&self, model: &Model) -> Result<Checkpoint> {
        Ok(Checkpoint {
            config: model.config.clone(),
            model: model.to_host(self.gpu)?,
            optimizer: Vec::new(),
            state: None,
            tokenizer_json: Some(self.tok_json.to_string()),
        })
    }

    fn load(&self, dir: &Path) -> Result<Model> {
        let ckpt = load_checkpoint(dir).with_context(|| format!("loading {}", dir.display()))?;
        Ok(Model::from_host(self.gpu, &ckpt.config, ckpt.model)?)
    }

    /// The base model (in OUT/base, shared by every seed): loaded when an earlier run of this study wrote it,
    /// else pretrained with seed 1 (or copied from `--base`).
    pub fn base(&self, val: &[u32]) -> Result<(Model, u64)> {
        let dir = self.dir.join("base");
        if dir.join("model.safetensors").exists() {
            let ckpt = load_checkpoint(&dir)?;
            let tokens = ckpt.state.as_ref().map_or(0, |s| s.tokens_seen);
            return Ok((Model::from_host(self.gpu, &ckpt.config, ckpt.model)?, tokens));
        }
        if let Some(path) = &self.plan.base {
            let ckpt = load_checkpoint(path).with_context(|| format!("loading --base {}", path.display()))?;
            let tokens = ckpt.state.as_ref().map_or(0, |s| s.tokens_seen);
            let model = Model::from_host(self.gpu, &ckpt.config, ckpt.model)?;
            save_checkpoint(&dir, &self.weights(&model)?)?;
            return Ok((model, tokens));
        }
        let p = &self.plan.pretrain;
        let cfg = TrainConfig {
            steps: p.steps,
            batch: p.batch,
            seq_len: p.seq_len,
            seed: self.seed,
            optim: OptimConfig { lr: p.lr, min_lr: p.min_lr, warmup: p.steps / 20 + 1, ..OptimConfig::default() },
            ..TrainConfig::default()
        };
        let model = Model::new(self.gpu, &self.config()?, self.seed)?;
        let n_ctx = model.config.n_ctx;
        let mut tr = Trainer::new(self.gpu, model, cfg, self.train.clone())?;
        let start = std::time::Instant::now();
        // Held-out loss ten times along the way, so the report can say whether it had flattened.
        let every = (p.steps / 10).max(1);
        let sample = &val[..val.len().min(16 * (n_ctx + 1))];
        let mut curve: Vec<(u64, f64)> = Vec::new();
        let mut evaluate = |m: &Model| -> kiln_model::Result<Evaluation> {
            let step = ((curve.len() as u64 + 1) * every).min(p.steps);
            let nats = text_loss(self.gpu, m, sample, 8, n_ctx)?.nats;
            curve.push((step, nats));
            Ok(Evaluation::default())
        };
        let schedule = Schedule { eval_every: every, ..SCHEDULE };
        drive(&mut tr, u64::MAX, schedule, Some(&mut evaluate), None, &mut Bar::transient("pretrain"))?;
        say(&format!(
            "  pretrain: {} steps, {} tokens in {:.0} s",
            p.steps,
            tr.tokens_seen,
            start.elapsed().as_secs_f64()
        ));
        // With the training state, so the record knows the tokens it saw.
        save_checkpoint(&dir, &tr.checkpoint(Some(self.tok_json.to_string()))?)?;
        write_json(&dir.join("pretrain_curve.json"), &curve)?;
        Ok((tr.model, tr.tokens_seen))
    }

    /// The base model's record (scores and few-shot baseline), cached in OUT/base/record.json.
    pub fn base_record(&self, suite: &Suite, base: &Model, base_tokens: u64) -> Result<SeedRecord> {
        let path = self.dir.join("base").join("record.json");
        if let Some(r) = read_json::<SeedRecord>(&path)? {
            return Ok(r);
        }
        let sp = spinner("evaluating the base model (and its few-shot baseline)".into());
        let scores = suite.score(base, None, 0)?;
        let few_shot = suite.few_shot(base)?;
        sp.finish_and_clear();
        print_scores("base", &scores, &self.trained());
        let pretrain_curve = read_json(&self.dir.join("base").join("pretrain_curve.json"))?.unwrap_or_default();
        let r = SeedRecord { seed: self.seed, base_tokens, pretrain_curve, few_shot, base: scores, runs: Vec::new() };
        write_json(&path, &r)?;
        Ok(r)
    }

    fn trained(&self) -> Vec<String> {
        self.plan.tasks.clone()
    }

    fn examples(&self, tasks: &[String], n: usize, salt: u64) -> Result<Vec<kiln_model::data::tasks::Example>> {
        let mut out = Vec::new();
        for t in tasks {
            out.extend(Task::parse(t)?.examples(Split::Train, n, self.seed * 1000 + salt));
        }
        Ok(out)
    }

    /// A run already finished by an earlier invocation, or None.
    fn finished(&self, name: &str) -> Result<Option<RunRecord>> {
        let r = read_json::<RunRecord>(&self.dir.join(run_dir_name(name)).join("record.json"))?;
        if r.is_some() {
            self.tick(name, "finished earlier");
        }
        Ok(r)
    }

    fn tick(&self, name: &str, what: &str) {
        self.overall.inc(1);
        let (done, total) = (self.overall.position(), self.overall.length().unwrap_or(0));
        say(&format!("  [{done}/{total}] seed {} {name}: {what}", self.seed));
    }

    /// Train `stage` to its end, stopping at `stops` (sorted) to score the model and then call `after_stop`; the
    /// metrics of every step go to OUT/seedN/RUN/metrics.jsonl and the final checkpoint to OUT/seedN/RUN/checkpoint.
    /// `start` is the starting model's evaluation (already measured where it was trained), and the model itself
    /// when the run measures KL(start ‖ π) (every run not from the base).
    fn train<S: Stage>(
        &self,
        suite: &Suite,
        stage: &mut S,
        meta: RunMeta,
        start: (Scores, Option<&Model>),
        stops: &[u64],
        mut after_stop: impl FnMut(&mut S, u64, &Scores) -> Result<()>,
    ) -> Result<RunRecord> {
        let dir = self.dir.join(run_dir_name(&meta.name));
        // A run killed part-way starts over: its metrics from before are not this run's.
        let _ = std::fs::remove_file(dir.join("metrics.jsonl"));
        let mut out = RunDir::open(&dir, Some(self.tok_json.to_string()))?;
        let (mut first, start_model) = start;
        first.step = 0;
        let start_rows = match start_model {
            Some(m) => {
                // KL(start ‖ start) is exactly 0.
                first.kl_start_model_task_nats = Some(0.0);
                first.kl_start_model_text_nats = Some(0.0);
                Some(suite.sampled_rows(m)?)
            }
            None => None,
        };
        let anchor = start_rows.as_ref().zip(start_model).map(|(rows, m)| (m, rows));
        let mut points = vec![first];
        let mut secs = 0.0;
        for &at in stops {
            let t0 = std::time::Instant::now();
            let mut bar = Bar::transient(&meta.name);
            drive(stage, at, SCHEDULE, None, Some(&mut out), &mut bar)?;
            secs += t0.elapsed().as_secs_f64();
            points.push(self.scored(suite, stage.model(), anchor, at, &format!("{}@{at}", meta.name))?);
            after_stop(stage, at, points.last().expect("just pushed"))?;
        }
        let curve = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let record = RunRecord {
            name: meta.name.clone(),
            method: meta.method,
            settings: meta.settings,
            start: meta.start,
            trained_tasks: meta.tasks,
            points,
            curve,
            train_seconds: secs,
        };
        write_json(&dir.join("record.json"), &record)?;
        self.tick(&meta.name, &format!("{} steps trained in {secs:.0} s", stage.total_steps()));
        Ok(record)
    }

    fn scored(
        &self,
        suite: &Suite,
        model: &Model,
        start: Option<(&Model, &super::suite::KlRows)>,
        step: u64,
        label: &str,
    ) -> Result<Scores> {
        let sp = spinner(format!("evaluating {label}"));
        let s = suite.score(model, start, step)?;
        sp.finish_and_clear();
        print_scores(label, &s, &self.trained());
        Ok(s)
    }

    /// The optimizer and shapes of `run` at learning rate `lr` for `steps`.
    fn sft_config(&self, run: &super::plan::SftRun, lr: f32, steps: u64) -> TrainConfig {
        TrainConfig {
            steps,
            batch: run.batch,
            seq_len: run.seq_len,
            seed: self.seed,
            optim: OptimConfig {
                lr,
                min_lr: lr * run.min_lr_fraction,
                warmup: run.warmup,
                weight_decay: run.weight_decay,
                ..OptimConfig::default()
            },
            ..TrainConfig::default()
        }
    }

    /// One SFT point from the base model; the branch point's weights are saved on the way when it is the run the
    /// branch starts from.
    pub fn sft(
        &self,
        suite: &Suite,
        base: (&Model, &Scores),
        point: &SftPoint,
        tasks: &[String],
        method: Method,
    ) -> Result<RunRecord> {
        let (base, base_scores) = base;
        if let Some(r) = self.finished(&point.name)? {
            return Ok(r);
        }
        let run = self.plan.sft.iter().find(|r| r.name == point.run).context("the point's run is in the plan")?;
        let cfg = self.sft_config(run, point.lr, point.steps);
        let examples = self.examples(tasks, run.examples, 1)?;
        let mix = (point.mix > 0.0).then(|| (self.train.clone(), point.mix));
        let source = SftSource::new(self.tok, &examples, cfg.batch, cfg.seq_len, self.seed, mix)?;
        let model = Model::from_host(self.gpu, &base.config, base.to_host(self.gpu)?)?;
        let mut tr = Trainer::with_source(self.gpu, model, cfg, Box::new(source))?;
        let branch = self.branch_source()?.filter(|b| b == &point.name).map(|_| self.plan.branch.at);
        let mut stops = snapshot_steps(point.steps, run.snapshots);
        if method == Method::Transfer {
            // The transfer matrix reads final checkpoints only.
            stops = vec![point.steps];
        }
        stops.extend(branch);
        stops.sort();
        stops.dedup();
        let branch_dir = self.dir.join(run_dir_name(&point.name)).join("branch-point");
        let trained = self.trained();
        let meta = RunMeta {
            name: point.name.clone(),
            method,
            settings: serde_json::to_value(point)?,
            start: "base".into(),
            tasks: tasks.to_vec(),
        };
        let mut branched = false;
        self.train(suite, &mut tr, meta, (base_scores.clone(), None), &stops, |tr, at, scores| {
            // The branch point: the first stop from `at` on where sampled reward is non-zero (on-policy SFT needs
            // accepted samples), else the run's end.
            let rewarded = rewarded(scores, &trained);
            if let Some(b) = branch.filter(|&b| !branched && is_branch_point(at, b, rewarded, point.steps)) {
                save_checkpoint(&branch_dir, &self.weights(&tr.model)?)?;
                write_json(&branch_dir.join("point.json"), scores)?;
                if at != b {
                    say(&format!("  branch point at step {at} (step {b} had no rewarded sample)"));
                }
                branched = true;
            }
            Ok(())
        })
    }

    /// The SFT point the branch starts from, when the plan has a branch.
    fn branch_source(&self) -> Result<Option<String>> {
        if !self.plan.branch.enabled {
            return Ok(None);
        }
        Ok(Some(self.plan.sft_parent(&self.plan.branch.from)?.1.name))
    }

    /// The RL settings of `run` (its shapes and optimizer) at `point`'s swept values.
    fn rl_config(&self, point: &RlPoint, run: &super::plan::RlRun) -> RlConfig {
        RlConfig {
            steps: point.steps,
            prompts_per_step: run.prompts_per_step,
            group_size: point.group_size,
            max_new_tokens: self.plan.eval.max_new_tokens,
            beta: point.beta,
            epochs: run.epochs,
            clip_eps: run.clip_eps,
            scale_by_std: run.scale_by_std,
            seed: self.seed,
            optim: OptimConfig {
                lr: point.lr,
                min_lr: point.lr * run.min_lr_fraction,
                warmup: run.warmup,
                weight_decay: 0.0,
                ..OptimConfig::default()
            },
            ..RlConfig::default()
        }
    }

    /// One RL point from `start_dir`'s weights (an SFT run's final checkpoint, or the branch point), that model as
    /// the reference of the KL penalty and of KL(start ‖ π).
    #[allow(clippy::too_many_arguments)]
    pub fn rl(
        &self,
        suite: &Suite,
        point: &RlPoint,
        start_dir: &Path,
        start: &str,
        method: Method,
        cfg: RlConfig,
        snapshots: u64,
        examples: usize,
    ) -> Result<RunRecord> {
        if let Some(r) = self.finished(&point.name)? {
            return Ok(r);
        }
        let policy = self.load(start_dir)?;
        let reference = self.load(start_dir)?;
        let anchor = self.load(start_dir)?;
        let start_scores = self.start_scores(start_dir)?;
        let examples = self.examples(&self.trained(), examples, 2)?;
        let mut tr = RlTrainer::new(self.gpu, policy, reference, self.tok.clone(), examples, reward, cfg)?;
        let meta = RunMeta {
            name: point.name.clone(),
            method,
            settings: serde_json::to_value(point)?,
            start: start.into(),
            tasks: self.trained(),
        };
        let stops = snapshot_steps(point.steps, snapshots);
        self.train(suite, &mut tr, meta, (start_scores, Some(&anchor)), &stops, |_, _, _| Ok(()))
    }

    /// The evaluation of a run's starting model: point.json beside a branch point, or the last point of the SFT
    /// run whose checkpoint it is.
    fn start_scores(&self, start_dir: &Path) -> Result<Scores> {
        if let Some(s) = read_json::<Scores>(&start_dir.join("point.json"))? {
            return Ok(s);
        }
        let run = start_dir.parent().context("a start checkpoint lies in a run directory")?;
        let record = read_json::<RunRecord>(&run.join("record.json"))?
            .with_context(|| format!("{} has no record.json: its run did not finish", run.display()))?;
        record.points.last().cloned().context("a finished run has points")
    }

    pub fn rl_point(&self, suite: &Suite, point: &RlPoint) -> Result<RunRecord> {
        let run = self.plan.rl.iter().find(|r| r.name == point.run).context("the point's run is in the plan")?;
        let cfg = self.rl_config(point, run);
        let start_dir = self.dir.join(run_dir_name(&point.from)).join("checkpoint");
        self.rl(suite, point, &start_dir, &point.from, Method::Rl, cfg, run.snapshots, run.examples)
    }

    /// The branch point's three arms, each from the same weights: SFT on reference answers, GRPO, and SFT on the
    /// model's own accepted samples (re-sampled from the current model at every snapshot interval).
    pub fn branch(&self, suite: &Suite) -> Result<Vec<RunRecord>> {
        let Some(from) = self.branch_source()? else { return Ok(Vec::new()) };
        let b = &self.plan.branch;
        let start_dir = self.dir.join(run_dir_name(&from)).join("branch-point");
        // The step the branch point was actually taken at (the first rewarded snapshot from `at` on).
        let start = format!("{from}@{}", self.start_scores(&start_dir)?.step);
        let (sft_run, parent) = self.plan.sft_parent(&b.from)?;
        // The SFT arms keep the parent's recipe (its pretraining mix), changing only what the branch compares.
        let mix = {
            let m = parent.mix;
            move || (m > 0.0).then(|| (self.train.clone(), m))
        };
        let mut out = Vec::new();

        // (a) More SFT on reference answers.
        let name = "branch-sft".to_string();
        if let Some(r) = self.finished(&name)? {
            out.push(r);
        } else {
            let cfg = self.sft_config(sft_run, b.sft_lr, b.sft_steps);
            // Fresh draws in a fresh order: the parent already trained on its own stream up to the branch point.
            let examples = self.examples(&self.trained(), sft_run.examples, 4)?;
            let source = SftSource::new(self.tok, &examples, cfg.batch, cfg.seq_len, self.seed + 1000, mix())?;
            let mut tr = Trainer::with_source(self.gpu, self.load(&start_dir)?, cfg, Box::new(source))?;
            let anchor = self.load(&start_dir)?;
            let start_scores = self.start_scores(&start_dir)?;
            let meta = RunMeta {
                name,
                method: Method::BranchSft,
                settings: serde_json::json!({ "lr": b.sft_lr, "steps": b.sft_steps, "mix": parent.mix }),
                start: start.clone(),
                tasks: self.trained(),
            };
            let stops = snapshot_steps(b.sft_steps, b.snapshots);
            out.push(self.train(suite, &mut tr, meta, (start_scores, Some(&anchor)), &stops, |_, _, _| Ok(()))?);
        }

        // (b) GRPO.
        let point = RlPoint {
            name: "branch-rl".into(),
            run: "branch".into(),
            from: start.clone(),
            lr: b.rl_lr,
            beta: b.beta,
            group_size: b.group_size,
            steps: b.rl_steps,
        };
        // The RL arm takes the first RL run's recipe (the defaults without one) at the branch's lr, β and group.
        let rl_run = self.plan.rl.first().cloned().unwrap_or_default();
        let cfg = self.rl_config(&point, &rl_run);
        out.push(self.rl(suite, &point, &start_dir, &start, Method::BranchRl, cfg, b.snapshots, rl_run.examples)?);

        // (c) On-policy SFT: the accepted samples of the current model, refreshed at every snapshot interval.
        let name = "branch-onpolicy".to_string();
        if let Some(r) = self.finished(&name)? {
            out.push(r);
        } else {
            let cfg = self.sft_config(sft_run, b.sft_lr, b.sft_steps);
            let prompts = self.examples(&self.trained(), b.prompts, 3)?;
            let end = ChatTokens::from_tokenizer(self.tok)?.end;
            let anchor = self.load(&start_dir)?;
            let first = rejection_sample(
                self.gpu,
                &anchor,
                self.tok,
                &prompts,
                b.samples,
                self.plan.eval.max_new_tokens,
                self.seed,
            )?;
            let mut rates = vec![first.rate()];
            if first.accepted == 0 {
                say(&format!(
                    "  seed {} branch-onpolicy: not run: the branch point's model solved none of {} samples (branch later: branch.at)",
                    self.seed, first.drawn
                ));
                self.tick("branch-onpolicy", "skipped");
                return Ok(out);
            }
            let source = accepted_source(first, end, cfg.batch, cfg.seq_len, self.seed, mix())?;
            let start_scores = self.start_scores(&start_dir)?;
            let mut tr = Trainer::with_source(self.gpu, self.load(&start_dir)?, cfg.clone(), Box::new(source))?;
            let meta_settings = |rates: &[f64]| {
                serde_json::json!({ "lr": b.sft_lr, "steps": b.sft_steps, "mix": parent.mix,
                                    "samples": b.samples, "prompts": b.prompts, "acceptance_per_round": rates })
            };
            let meta = RunMeta {
                name,
                method: Method::BranchOnPolicy,
                settings: meta_settings(&rates),
                start: start.clone(),
                tasks: self.trained(),
            };
            let stops = snapshot_steps(b.sft_steps, b.snapshots);
            let last = b.sft_steps;
            let mut record = self.train(suite, &mut tr, meta, (start_scores, Some(&anchor)), &stops, |tr, at, _| {
                // A new round: sample the model as trained so far; the optimizer and schedule carry on.
                if at < last {
                    let round = rates.len() as u64;
                    let acc = rejection_sample(
                        self.gpu,
                        &tr.model,
                        self.tok,
                        &prompts,
                        b.samples,
                        self.plan.eval.max_new_tokens,
                        self.seed + round,
                    )?;
                    rates.push(acc.rate());
                    // A round that accepts nothing keeps training on the previous round's samples.
                    if acc.accepted > 0 {
                        let src = accepted_source(acc, end, cfg.batch, cfg.seq_len, self.seed + round, mix())?;
                        tr.set_source(Box::new(src));
                    }
                }
                Ok(())
            })?;
            record.settings = meta_settings(&rates);
            write_json(&self.dir.join(run_dir_name(&record.name)).join("record.json"), &record)?;
            out.push(record);
        }
        Ok(out)
    }

    /// The transfer matrix's single-task runs: the first SFT point's settings on each trained task alone.
    pub fn transfer(&self, suite: &Suite, base: (&Model, &Scores)) -> Result<Vec<RunRecord>> {
        if !self.plan.transfer.enabled || self.plan.tasks.len() < 2 {
            return Ok(Vec::new());
        }
        // The recipe of the SFT point RL starts from (the study's main SFT), on one task at a time.
        let from = self.plan.rl.first().map_or("", |r| r.from.as_str());
        let mut p = self.plan.sft_parent(from)?.1;
        if self.plan.transfer.steps > 0 {
            p.steps = self.plan.transfer.steps;
        }
        let mut out = Vec::new();
        for t in &self.plan.tasks {
            let point = SftPoint { name: format!("transfer[{t}]"), ..p.clone() };
            out.push(self.sft(suite, base, &point, std::slice::from_ref(t), Method::Transfer)?);
        }
        Ok(out)
    }
}

/// Whether any sampled completion on a trained task was correct.
fn rewarded(scores: &Scores, trained: &[String]) -> bool {
    trained.iter().filter_map(|t| scores.tasks.get(t)).any(|x| x.correct.iter().any(|&c| c > 0))
}

/// Whether the snapshot at step `at` of an SFT run of `steps` becomes the branch point, asked from `from` on until
/// one does: the first with a rewarded sample (on-policy SFT needs accepted samples), else the run's last.
fn is_branch_point(at: u64, from: u64, rewarded: bool, steps: u64) -> bool {
    at >= from && (rewarded || at == steps)
}

pub struct RunMeta {
    pub name: String,
    pub method: Method,
    pub settings: serde_json::Value,
    pub start: String,
    pub tasks: Vec<String>,
}

/// A run's directory name: its name with characters a file system may refuse replaced.
pub fn run_dir_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.=,".contains(c) { c } else { '_' }).collect()
}

pub fn print_scores(label: &str, s: &Scores, trained: &[String]) {
    let tasks: Vec<&str> = trained.iter().map(String::as_str).collect();
    say(&format!(
        "  {label:<24} bits/byte {:.4}  accuracy {:.3}  KL(base‖π) task {:.4} text {:.4} nats/tok",
        s.bits_per_byte,
        s.accuracy(&tasks),
        s.kl_base_model_task_nats,
        s.kl_base_model_text_nats,
    ));
}

#[cfg(test)]
mod tests {
    #[test]
    fn snapshots_are_evenly_spaced_distinct_and_end_at_the_last_step() {
        assert_eq!(super::snapshot_steps(10, 3), vec![3, 6, 10]);
        assert_eq!(super::snapshot_steps(2, 4), vec![1, 2], "fewer steps than snapshots: each step once");
        assert_eq!(super::snapshot_steps(7, 1), vec![7]);
        assert_eq!(super::run_dir_name("sft[lr=0.001,mix=0.25]"), "sft_lr=0.001,mix=0.25_");
    }

    #[test]
    fn the_branch_point_is_the_first_rewarded_snapshot_from_at_on_else_the_end() {
        use super::is_branch_point;
        assert!(!is_branch_point(50, 100, true, 200), "before `at`, never");
        assert!(is_branch_point(100, 100, true, 200));
        assert!(!is_branch_point(100, 100, false, 200), "no rewarded sample yet: wait for a later snapshot");
        assert!(is_branch_point(200, 100, false, 200), "the run's end is the fallback");
        let mut s = crate::study::report::tests::point(10, 0, 2.0, 0.0);
        assert!(!super::rewarded(&s, &["count".to_string()]));
        s.tasks.get_mut("count").unwrap().correct[3] = 1;
        assert!(super::rewarded(&s, &["count".to_string()]));
        assert!(!super::rewarded(&s, &["addition:2".to_string()]), "only trained tasks count");
    }
}
