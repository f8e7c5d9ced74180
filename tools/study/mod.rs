//! `kiln study`: what post-training buys and costs, measured. A plan (built in, or TOML with `--plan`/`--set`)
//! lists the runs: SFT sweeps from a base model, RL sweeps from SFT models, a common branch point continued by
//! SFT, RL and on-policy SFT, and single-task runs for a transfer matrix. Every checkpoint of every run and seed is
//! scored by one suite (task accuracy per prompt, pass@k, entropy, bits/byte on held-out text, KL(base ‖ π) and
//! KL(start ‖ π) in nats/token), recorded in `study.json`, and reported in `study.md` with figures beside it.

pub mod figures;
pub mod plan;
pub mod record;
pub mod report;
pub mod run;
pub mod suite;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use kiln_engine::Gpu;
use kiln_model::data::chat::ChatTokens;
use kiln_model::data::read_shard;
use kiln_model::data::tokenizer::Tokenizer;

use crate::commands::{prepare_cmd, TokenizerSource};
use plan::Plan;
use record::{SeedRecord, Study, SCHEMA};
use run::SeedContext;

pub struct StudyOpts {
    pub out: PathBuf,
    pub plan: Plan,
    /// Prepared data (`kiln prepare` output) instead of preparing the bundled corpus into OUT/data.
    pub data: Option<PathBuf>,
}

/// The `git describe` of the tree this binary was built from (build.rs), "unknown" outside a git checkout.
fn commit() -> String {
    env!("KILN_COMMIT").to_string()
}

/// OUT/plan.toml holds the plan a study started with: resuming with another plan would mix two studies' runs.
fn pin_plan(out: &Path, plan: &Plan) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join("plan.toml");
    let text = plan.to_toml()?;
    if path.exists() {
        let old = std::fs::read_to_string(&path)?;
        if old != text {
            anyhow::bail!(
                "{} holds a study with a different plan ({}); resume it with the same plan and flags, or use another --out",
                out.display(),
                path.display()
            );
        }
        crate::progress::say(&format!("resuming the study in {} (finished runs are kept)", out.display()));
        return Ok(());
    }
    kiln_model::atomic::write_atomic(&path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// OUT/suite.json holds a fingerprint of every evaluation set and the commit that made them: a resumed study
/// pairs new checkpoints with records scored earlier prompt by prompt, so the prompts must be the same ones.
fn pin_suite(out: &Path, tasks: &[suite::EvalTask]) -> Result<()> {
    let fnv = kiln_model::data::tasks::fnv1a;
    let sets: std::collections::BTreeMap<String, String> = tasks
        .iter()
        .map(|t| {
            let text: String = t.examples.iter().map(|e| format!("{}\u{1f}{}\u{1e}", e.prompt, e.answer)).collect();
            (t.name.clone(), format!("{:016x}", fnv(&text)))
        })
        .collect();
    let now = serde_json::json!({ "commit": commit(), "eval_sets": sets });
    let path = out.join("suite.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let before: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if before["eval_sets"] != now["eval_sets"] {
            anyhow::bail!(
                "{}: the evaluation sets differ from those its finished runs were scored on (recorded by commit {}): \
                 results could not be paired prompt by prompt; use another --out",
                out.display(),
                before["commit"]
            );
        }
        if before["commit"] != now["commit"] {
            crate::progress::say(&format!(
                "note: the finished runs in {} were made by commit {}, this is {}",
                out.display(),
                before["commit"],
                now["commit"]
            ));
        }
        return Ok(());
    }
    kiln_model::atomic::write_atomic(&path, serde_json::to_string_pretty(&now)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Prepared data for the study: `--data`, or the bundled corpus prepared into OUT/data (with the `--base`
/// checkpoint's tokenizer when there is one).
fn data_dir(opts: &StudyOpts) -> Result<PathBuf> {
    let data = opts.data.clone().unwrap_or_else(|| opts.out.join("data"));
    let prepared = ["train.bin", "val.bin", "tokenizer.json"].iter().all(|f| data.join(f).exists());
    if opts.data.is_some() && !prepared {
        anyhow::bail!("{} lacks train.bin, val.bin or tokenizer.json: run `kiln prepare --out` there", data.display());
    }
    if !prepared {
        match &opts.plan.base {
            Some(base) => {
                let ckpt = kiln_model::checkpoint::load_checkpoint(base)
                    .with_context(|| format!("loading --base {}", base.display()))?;
                let json = ckpt.tokenizer_json.with_context(|| {
                    format!("--base {} has no tokenizer.json: the study needs the model's tokenizer", base.display())
                })?;
                std::fs::create_dir_all(&data)?;
                let tok_path = data.join("base-tokenizer.json");
                std::fs::write(&tok_path, json)?;
                prepare_cmd(&[], &data, TokenizerSource::Json(&tok_path), 0.1)?;
            }
            None => {
                prepare_cmd(&[], &data, TokenizerSource::Train(2048), 0.1)?;
            }
        }
    }
    Ok(data)
}

pub fn study_cmd(gpu: &Gpu, opts: &StudyOpts) -> Result<()> {
    let plan = &opts.plan;
    let sft: Vec<_> = plan.sft.iter().flat_map(|r| r.points()).collect();
    let rl: Vec<_> = plan.rl.iter().map(|r| r.points(plan)).collect::<Result<Vec<_>>>()?.concat();
    let per_seed = sft.len()
        + rl.len()
        + if plan.branch.enabled { 3 } else { 0 }
        + if plan.transfer.enabled && plan.tasks.len() > 1 { plan.tasks.len() } else { 0 };
    println!(
        "Kiln study on {}: {} seed(s) × ({} SFT, {} RL{}{}) runs; tasks {}",
        gpu.report(),
        plan.seeds,
        sft.len(),
        rl.len(),
        if plan.branch.enabled { ", 3 branch arms" } else { "" },
        if plan.transfer.enabled { ", transfer" } else { "" },
        plan.tasks.join(", ")
    );
    pin_plan(&opts.out, plan)?;
    pin_suite(&opts.out, &suite::eval_tasks(plan)?)?;
    let data = data_dir(opts)?;
    let tok_json = std::fs::read_to_string(data.join("tokenizer.json"))?;
    let tok = Tokenizer::from_file(&data.join("tokenizer.json"))?;
    // Fail before pretraining, not after, when the tokenizer cannot hold the chat format.
    ChatTokens::from_tokenizer(&tok)?;
    let train = Arc::new(read_shard(&data.join("train.bin"))?.tokens);
    let val = read_shard(&data.join("val.bin"))?.tokens;
    let tasks = suite::task_infos(&suite::eval_tasks(plan)?);
    let mut seeds = Vec::new();
    // One base model for every seed: the seeds resample post-training (data order, sampling, initial steps), and
    // pairing each run with the same base on the same prompts is what the bootstrap relies on.
    let mut base_ctx = SeedContext {
        gpu,
        plan,
        tok: &tok,
        tok_json: &tok_json,
        train: train.clone(),
        seed: 1,
        dir: opts.out.clone(),
        overall: crate::progress::overall("study", (per_seed * plan.seeds as usize) as u64),
    };
    crate::progress::say("base model:");
    let (base, tokens) = base_ctx.base(&val)?;
    let sp = crate::progress::spinner("building the evaluation suite (base samples for the KL positions)".into());
    let suite = suite::Suite::new(gpu, &base, &tok, plan, &val)?;
    sp.finish_and_clear();
    let base_rec = base_ctx.base_record(&suite, &base, tokens)?;
    let base_scores = base_rec.base.clone();
    for seed in 1..=plan.seeds {
        crate::progress::say(&format!("seed {seed}:"));
        let ctx = SeedContext { seed, dir: opts.out.join(format!("seed{seed}")), ..base_ctx };
        let record = (|| -> Result<_> {
            let mut rec = SeedRecord { seed, runs: Vec::new(), ..base_rec.clone() };
            for p in &sft {
                rec.runs.push(ctx.sft(&suite, (&base, &base_scores), p, &plan.tasks, record::Method::Sft)?);
            }
            for p in &rl {
                rec.runs.push(ctx.rl_point(&suite, p)?);
            }
            rec.runs.extend(ctx.branch(&suite)?);
            rec.runs.extend(ctx.transfer(&suite, (&base, &base_scores))?);
            Ok(rec)
        })()
        .with_context(|| format!("study seed {seed}"))?;
        base_ctx = ctx;
        seeds.push(record);
    }
    base_ctx.overall.finish_and_clear();
    let study = Study {
        schema: SCHEMA,
        commit: commit(),
        adapter: gpu.adapter_name().to_string(),
        plan: plan.clone(),
        tasks,
        seeds,
    };
    let json_path = opts.out.join("study.json");
    kiln_model::atomic::write_atomic(&json_path, serde_json::to_string_pretty(&study)?.as_bytes())
        .with_context(|| format!("writing {}", json_path.display()))?;
    let summary = report::write_report(&study, &opts.out)?;
    println!("\n{summary}");
    println!(
        "study: {}, {} and figures in {}",
        json_path.display(),
        opts.out.join("study.md").display(),
        opts.out.display()
    );
    Ok(())
}

/// `kiln study --report DIR`: redraw study.md and the figures from DIR/study.json, without training.
pub fn report_cmd(dir: &Path) -> Result<()> {
    let path = dir.join("study.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let study: Study =
        serde_json::from_str(&text).with_context(|| format!("{} is not a study record", path.display()))?;
    if study.schema != SCHEMA {
        anyhow::bail!("{} has schema {}, this kiln reads schema {SCHEMA}", path.display(), study.schema);
    }
    let summary = report::write_report(&study, dir)?;
    println!("{summary}");
    println!("study: {} redrawn", dir.join("study.md").display());
    Ok(())
}

#[cfg(test)]
pub mod tests {
    #[test]
    fn the_recorded_commit_is_the_builds() {
        let c = super::commit();
        assert!(!c.is_empty() && c == env!("KILN_COMMIT"), "{c}");
        println!("built from {c}");
    }

    /// A fresh scratch directory for a test.
    pub fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-study-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
