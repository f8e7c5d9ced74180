//! The study's report, drawn from its record alone: `study.md` (settings, the summary table with intervals, the
//! per-task table, the transfer matrix, the learning–forgetting frontier and the comparison at matched gain, the
//! forgetting-vs-KL fit, pass@k, and what the numbers do and do not support) and the PNG figures beside it.
//!
//! Gains are chance-corrected greedy accuracy, mean over the trained tasks, minus the base model's on the same
//! prompts (paired), with 95% bootstrap intervals over prompts and seeds; costs are Δ bits/byte on held-out text
//! (t intervals over seeds) and KL(base ‖ π) in nats/token.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use kiln_model::eval::evaluate::Estimate;
use kiln_model::eval::stats::{
    chance_corrected, cost_at_gain, paired_bootstrap, pareto_front, poly_fit, t_interval, Point,
};

use super::figures;
use super::record::{Method, Role, RunRecord, Scores, SeedRecord, Study};

/// Per-prompt chance-corrected change in greedy correctness from the base model, one list per task in `tasks`.
pub fn gain_strata(study: &Study, seed: &SeedRecord, s: &Scores, tasks: &[String]) -> Vec<Vec<f64>> {
    tasks
        .iter()
        .filter_map(|t| {
            let (now, base) = (s.tasks.get(t)?, seed.base.tasks.get(t)?);
            let chance = study.tasks.get(t).map_or(0.0, |i| i.chance);
            let scale = if chance < 1.0 { 1.0 / (1.0 - chance) } else { 0.0 };
            Some(now.greedy.iter().zip(&base.greedy).map(|(a, b)| (a - b) * scale).collect())
        })
        .collect()
}

/// Per-prompt change in mean sampled reward from the base model, one list per task.
fn reward_strata(seed: &SeedRecord, s: &Scores, tasks: &[String]) -> Vec<Vec<f64>> {
    tasks
        .iter()
        .filter_map(|t| {
            let (now, base) = (s.tasks.get(t)?, seed.base.tasks.get(t)?);
            Some(now.reward().iter().zip(base.reward()).map(|(a, b)| a - b).collect())
        })
        .collect()
}

/// The tasks of one role.
pub fn tasks_of(study: &Study, role: Role) -> Vec<String> {
    study.tasks.iter().filter(|(_, i)| i.role == role).map(|(n, _)| n.clone()).collect()
}

/// The run named `name` in every seed, with its seed.
fn across_seeds<'s>(study: &'s Study, name: &str) -> Vec<(&'s SeedRecord, &'s RunRecord)> {
    study.seeds.iter().filter_map(|s| s.runs.iter().find(|r| r.name == name).map(|r| (s, r))).collect()
}

/// Run names in plan order (from the first seed that has them all).
fn run_names(study: &Study) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for s in &study.seeds {
        for r in &s.runs {
            if !names.contains(&r.name) {
                names.push(r.name.clone());
            }
        }
    }
    names
}

/// One checkpoint (a run's point at one step) summarised over seeds.
#[derive(Clone, Debug)]
pub struct Summary {
    pub run: String,
    pub method: Method,
    pub step: u64,
    /// Chance-corrected accuracy gain on trained tasks over the base, bootstrap over prompts and seeds.
    pub gain: Estimate,
    /// The checkpoint's own chance-corrected accuracy (mean over trained tasks and seeds): below 0 it does worse
    /// than always giving the majority answer.
    pub corrected: f64,
    pub reward_gain: Estimate,
    /// Δ bits/byte from the base (t interval over seeds).
    pub dbpb: Estimate,
    pub kl_base_task: Estimate,
    pub kl_base_text: Estimate,
    pub kl_start_task: Option<Estimate>,
    pub entropy: f64,
    /// Per seed: (Δ bits/byte, accuracy gain, KL(base‖π) task, reward gain).
    pub per_seed: Vec<(f64, f64, f64, f64)>,
}

/// Every checkpoint of every run, summarised over seeds (points at the same index across seeds pool together).
pub fn summaries(study: &Study) -> Vec<Summary> {
    let trained = tasks_of(study, Role::Trained);
    let b = study.plan.eval.bootstrap;
    let mut out = Vec::new();
    for name in run_names(study) {
        let runs = across_seeds(study, &name);
        let n_points = runs.iter().map(|(_, r)| r.points.len()).min().unwrap_or(0);
        for i in 0..n_points {
            let pts: Vec<(&SeedRecord, &Scores)> = runs.iter().map(|(s, r)| (*s, &r.points[i])).collect();
            let diffs: Vec<Vec<Vec<f64>>> = pts.iter().map(|(s, p)| gain_strata(study, s, p, &trained)).collect();
            let rewards: Vec<Vec<Vec<f64>>> = pts.iter().map(|(s, p)| reward_strata(s, p, &trained)).collect();
            let mean_of = |d: &Vec<Vec<f64>>| {
                d.iter().map(|t| t.iter().sum::<f64>() / t.len().max(1) as f64).sum::<f64>() / d.len().max(1) as f64
            };
            let per_seed: Vec<(f64, f64, f64, f64)> = pts
                .iter()
                .zip(diffs.iter().zip(&rewards))
                .map(|((s, p), (d, r))| {
                    (p.bits_per_byte - s.base.bits_per_byte, mean_of(d), p.kl_base_model_task_nats, mean_of(r))
                })
                .collect();
            let of = |f: &dyn Fn(&Scores) -> f64| t_interval(&pts.iter().map(|(_, p)| f(p)).collect::<Vec<_>>());
            let ent: Vec<f64> = pts
                .iter()
                .flat_map(|(_, p)| trained.iter().filter_map(|t| p.tasks.get(t).and_then(|x| x.entropy)))
                .collect();
            let corrected: Vec<f64> = pts
                .iter()
                .map(|(_, p)| {
                    let v: Vec<f64> = trained
                        .iter()
                        .filter_map(|t| {
                            let chance = study.tasks.get(t).map_or(0.0, |i| i.chance);
                            p.tasks.get(t).map(|x| chance_corrected(x.accuracy(), chance))
                        })
                        .collect();
                    v.iter().sum::<f64>() / v.len().max(1) as f64
                })
                .collect();
            out.push(Summary {
                run: name.clone(),
                corrected: corrected.iter().sum::<f64>() / corrected.len().max(1) as f64,
                method: runs[0].1.method,
                step: runs[0].1.points[i].step,
                gain: paired_bootstrap(&diffs, b, 11),
                reward_gain: paired_bootstrap(&rewards, b, 12),
                dbpb: t_interval(&per_seed.iter().map(|p| p.0).collect::<Vec<_>>()),
                kl_base_task: of(&|p| p.kl_base_model_task_nats),
                kl_base_text: of(&|p| p.kl_base_model_text_nats),
                kl_start_task: pts[0]
                    .1
                    .kl_start_model_task_nats
                    .map(|_| of(&|p| p.kl_start_model_task_nats.unwrap_or(f64::NAN))),
                entropy: ent.iter().sum::<f64>() / ent.len().max(1) as f64,
                per_seed,
            });
        }
    }
    out
}

fn fmt_est(e: &Estimate, digits: usize) -> String {
    if e.lo.is_finite() && e.hi.is_finite() && e.hi > e.lo {
        format!("{:+.d$} [{:+.d$}, {:+.d$}]", e.value, e.lo, e.hi, d = digits)
    } else {
        format!("{:+.d$}", e.value, d = digits)
    }
}

fn fmt_plain(e: &Estimate, digits: usize) -> String {
    if e.lo.is_finite() && e.hi.is_finite() && e.hi > e.lo {
        format!("{:.d$} [{:.d$}, {:.d$}]", e.value, e.lo, e.hi, d = digits)
    } else {
        format!("{:.d$}", e.value, d = digits)
    }
}

/// Whether an interval excludes zero (a change the data supports), and which way.
fn sign(e: &Estimate) -> Option<f64> {
    if !(e.lo.is_finite() && e.hi.is_finite()) {
        return None;
    }
    if e.lo > 0.0 {
        Some(1.0)
    } else if e.hi < 0.0 {
        Some(-1.0)
    } else {
        Some(0.0)
    }
}

/// What a frontier counts as gain: greedy accuracy (chance-corrected) or mean sampled reward, both over the base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gain {
    Accuracy,
    Reward,
}

impl Gain {
    pub fn name(self) -> &'static str {
        match self {
            Gain::Accuracy => "chance-corrected greedy accuracy",
            Gain::Reward => "mean sampled reward",
        }
    }
}

/// A method's Pareto front of (cost, gain) over its checkpoints, for cost = Δ bits/byte (`kl` false) or
/// KL(base ‖ π) on task inputs, using one seed's values (`Some(i)`) or the seed means (`None`).
pub fn front(sums: &[Summary], method: Method, kl: bool, by: Gain, seed: Option<usize>) -> Vec<Point> {
    let pts: Vec<Point> = sums
        .iter()
        .filter(|s| s.method == method)
        .filter_map(|s| {
            let (cost, acc, reward) = match seed {
                Some(i) => {
                    let p = s.per_seed.get(i)?;
                    (if kl { p.2 } else { p.0 }, p.1, p.3)
                }
                None => (if kl { s.kl_base_task.value } else { s.dbpb.value }, s.gain.value, s.reward_gain.value),
            };
            Some(Point { cost, gain: if by == Gain::Accuracy { acc } else { reward } })
        })
        .collect();
    pareto_front(&pts)
}

/// The cost each method pays for the same gain, compared within each seed: in seed s the methods' fronts share
/// the gains [lo_s, hi_s] (the highest of their lowest gains to the lowest of their highest), and each method's
/// cost is interpolated at the same gain g_s = lo_s + q·(hi_s − lo_s), for q = ¼, ½, ¾, 1. Returns, per q, the mean
/// of g_s and per method the costs of the seeds where the fronts overlap (the same seeds for every method, so two
/// methods' costs pair up: same base, data and seed); None when no seed's fronts overlap.
pub fn matched_gain(
    sums: &[Summary],
    methods: &[Method],
    kl: bool,
    by: Gain,
    seeds: usize,
) -> Vec<(f64, Vec<Option<Vec<f64>>>)> {
    let ranges: Vec<Option<(f64, f64)>> = (0..seeds)
        .map(|i| {
            let fronts: Vec<Vec<Point>> = methods.iter().map(|&m| front(sums, m, kl, by, Some(i))).collect();
            if fronts.iter().any(|f| f.len() < 2) {
                return None;
            }
            let lo = fronts.iter().map(|f| f[0].gain).fold(f64::MIN, f64::max);
            let hi = fronts.iter().map(|f| f[f.len() - 1].gain).fold(f64::MAX, f64::min);
            (hi > lo).then_some((lo, hi))
        })
        .collect();
    if ranges.iter().all(Option::is_none) {
        return Vec::new();
    }
    [0.25, 0.5, 0.75, 1.0]
        .iter()
        .map(|q| {
            let at: Vec<(usize, f64)> =
                ranges.iter().enumerate().filter_map(|(i, r)| r.map(|(lo, hi)| (i, lo + q * (hi - lo)))).collect();
            let gain = at.iter().map(|p| p.1).sum::<f64>() / at.len() as f64;
            let costs = methods
                .iter()
                .map(|&m| {
                    at.iter()
                        .map(|&(i, g)| cost_at_gain(&front(sums, m, kl, by, Some(i)), g))
                        .collect::<Option<Vec<f64>>>()
                })
                .collect();
            (gain, costs)
        })
        .collect()
}

/// Write study.md and the figures into `dir`; returns the summary table for the terminal.
pub fn write_report(study: &Study, dir: &Path) -> Result<String> {
    let sums = summaries(study);
    let trained = tasks_of(study, Role::Trained);
    let n_seeds = study.seeds.len();
    let mut md = String::new();
    let p = &study.plan;
    writeln!(md, "# Kiln study\n")?;
    writeln!(
        md,
        "Commit `{}` on {}; {} seed(s); {} model; trained tasks {}; held-out {}; length-shifted variants {}.\n",
        study.commit,
        study.adapter,
        n_seeds,
        p.arch,
        trained.join(", "),
        tasks_of(study, Role::HeldOut).join(", "),
        if p.shifted { "evaluated" } else { "not evaluated" }
    )?;
    let base_tokens = study.seeds.first().map_or(0, |s| s.base_tokens);
    writeln!(
        md,
        "Base model: {} ({} pretraining tokens; one base for every seed: seeds resample post-training). Gains are chance-corrected greedy accuracy (0 = always \
         the majority answer, 1 = perfect), mean over trained tasks, minus the base model's on the same prompts, \
         with 95% paired bootstrap intervals over prompts and seeds ({} resamples). Costs: Δ bits/byte on a fixed \
         sample of held-out text ({} tokens; t intervals over seeds) and KL(base‖π) in nats/token on task prompts \
         continued by the base model's own samples.\n",
        p.base.as_ref().map_or("pretrained here".to_string(), |b| format!("`{}`", b.display())),
        if base_tokens > 0 { base_tokens.to_string() } else { "unknown".to_string() },
        p.eval.bootstrap,
        study.seeds.first().map_or(0, |s| s.base.text_tokens),
    )?;
    if let Some(line) = flattening(study) {
        writeln!(md, "{line}\n")?;
    }
    writeln!(md, "## Tasks\n\n| task | role | prompts | majority answer | chance |\n|---|---|---|---|---|")?;
    for (name, t) in &study.tasks {
        writeln!(md, "| {name} | {:?} | {} | `{}` | {:.3} |", t.role, t.prompts, t.majority_answer, t.chance)?;
    }

    // The summary table: every run's final checkpoint.
    let finals: Vec<&Summary> = {
        let mut v: Vec<&Summary> = Vec::new();
        for s in &sums {
            match v.iter_mut().find(|x| x.run == s.run) {
                Some(slot) if s.step >= slot.step => *slot = s,
                Some(_) => {}
                None => v.push(s),
            }
        }
        v
    };
    let mut table = String::new();
    writeln!(
        table,
        "| run | method | steps | accuracy (chance-corr.) | Δ accuracy (chance-corr.) | Δ reward | Δ bits/byte | KL(base‖π) nats/tok, task | KL(base‖π) nats/tok, text | KL(start‖π) nats/tok, task | entropy nats/tok |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    for s in &finals {
        writeln!(
            table,
            "| {} | {} | {} | {:+.3} | {} | {} | {} | {} | {} | {} | {:.3} |",
            s.run,
            s.method.name(),
            s.step,
            s.corrected,
            fmt_est(&s.gain, 3),
            fmt_est(&s.reward_gain, 3),
            fmt_est(&s.dbpb, 4),
            fmt_plain(&s.kl_base_task, 4),
            fmt_plain(&s.kl_base_text, 4),
            s.kl_start_task.as_ref().map_or("—".into(), |e| fmt_plain(e, 4)),
            s.entropy
        )?;
    }
    writeln!(md, "\n## Summary (every run's last checkpoint, change from base)\n\n{table}")?;
    let base_bpb = t_interval(&study.seeds.iter().map(|s| s.base.bits_per_byte).collect::<Vec<_>>());
    writeln!(md, "Base model held-out loss: {} bits/byte.\n", fmt_plain(&base_bpb, 4))?;

    per_task_table(&mut md, study, &finals)?;
    few_shot_section(&mut md, study)?;
    transfer_section(&mut md, study)?;
    frontier_section(&mut md, &sums, n_seeds)?;
    kl_fit_section(&mut md, &sums)?;
    pass_at_k_section(&mut md, study)?;
    writeln!(md, "## What the numbers support\n")?;
    for line in statements(study, &sums, &finals) {
        writeln!(md, "- {line}")?;
    }
    writeln!(md, "\n## Figures\n")?;
    for f in figures::draw_all(study, &sums, dir)? {
        writeln!(md, "![{f}]({f})")?;
    }
    writeln!(md, "\n## Plan\n\n```toml\n{}```", study.plan.to_toml()?)?;
    let path = dir.join("study.md");
    kiln_model::atomic::write_atomic(&path, md.as_bytes())?;
    Ok(table)
}

/// Whether the base's held-out loss had flattened: its fall over the last 30% of pretraining, against 2% of its
/// value (the ten measurements along pretraining).
pub fn flattening(study: &Study) -> Option<String> {
    let curve = &study.seeds.first()?.pretrain_curve;
    let (&(last_step, last), total) = (curve.last()?, curve.last()?.0 as f64);
    let &(from_step, from) = curve.iter().find(|(s, _)| *s as f64 >= 0.7 * total)?;
    let change = last - from;
    let verdict = if -change < 0.02 * last {
        "it had flattened (less than 2% in the last 30% of pretraining)"
    } else {
        "it was still falling: a longer-trained base (`pretrain.steps`, or `--base`) would be a fairer one to study"
    };
    Some(format!(
        "Held-out loss of the base during pretraining: {from:.3} nats/token at step {from_step}, {last:.3} at step \
         {last_step} ({change:+.3}); {verdict}."
    ))
}

fn per_task_table(md: &mut String, study: &Study, finals: &[&Summary]) -> Result<()> {
    let names: Vec<&String> = study.tasks.keys().collect();
    write!(md, "## Greedy accuracy per task (mean over seeds)\n\n| checkpoint |")?;
    for n in &names {
        write!(md, " {n} ({:?}) |", study.tasks[*n].role)?;
    }
    writeln!(md, "\n|---|{}", "---|".repeat(names.len()))?;
    let mean_acc = |scores: Vec<&Scores>, t: &str| {
        let v: Vec<f64> = scores.iter().filter_map(|s| s.tasks.get(t).map(|x| x.accuracy())).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    write!(md, "| base |")?;
    for n in &names {
        write!(md, " {:.3} |", mean_acc(study.seeds.iter().map(|s| &s.base).collect(), n))?;
    }
    writeln!(md)?;
    for f in finals {
        write!(md, "| {}@{} |", f.run, f.step)?;
        let pts: Vec<&Scores> = across_seeds(study, &f.run)
            .iter()
            .filter_map(|(_, r)| r.points.iter().find(|p| p.step == f.step))
            .collect();
        for n in &names {
            write!(md, " {:.3} |", mean_acc(pts.clone(), n))?;
        }
        writeln!(md)?;
    }
    writeln!(md)?;
    Ok(())
}

fn few_shot_section(md: &mut String, study: &Study) -> Result<()> {
    if study.seeds.iter().all(|s| s.few_shot.is_empty()) {
        return Ok(());
    }
    writeln!(
        md,
        "## Few-shot baseline\n\nThe base model prompted in plain text with {} solved examples (no chat format), \
         greedy accuracy: what the base can already do once shown the format.\n\n| task | chat format | few-shot |\n|---|---|---|",
        study.plan.eval.few_shot
    )?;
    for t in study.tasks.keys() {
        let chat: Vec<f64> = study.seeds.iter().filter_map(|s| s.base.tasks.get(t).map(|x| x.accuracy())).collect();
        let few: Vec<f64> = study
            .seeds
            .iter()
            .filter_map(|s| s.few_shot.get(t).map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64))
            .collect();
        writeln!(md, "| {t} | {:.3} | {:.3} |", t_interval(&chat).value, t_interval(&few).value)?;
    }
    writeln!(md)?;
    Ok(())
}

/// Rows: the transfer runs (one trained task each) and the main SFT run (all tasks); columns: every evaluated
/// task; cells: chance-corrected accuracy gain over the base with its interval.
/// (row names, column names, cells[row][column]).
pub type Matrix = (Vec<String>, Vec<String>, Vec<Vec<Estimate>>);

pub fn transfer_matrix(study: &Study) -> Option<Matrix> {
    // "All tasks": the SFT point RL starts from, whose recipe the single-task runs share.
    let main = study.plan.rl.first().map_or("", |r| r.from.as_str());
    let first_sft = study.plan.sft_parent(main).ok()?.1.name;
    let mut rows: Vec<String> = run_names(study)
        .into_iter()
        .filter(|n| across_seeds(study, n).first().is_some_and(|r| r.1.method == Method::Transfer))
        .collect();
    if rows.is_empty() {
        return None;
    }
    rows.push(first_sft);
    let cols: Vec<String> = study.tasks.keys().cloned().collect();
    let cells = rows
        .iter()
        .map(|row| {
            let runs = across_seeds(study, row);
            cols.iter()
                .map(|c| {
                    let diffs: Vec<Vec<Vec<f64>>> = runs
                        .iter()
                        .filter_map(|(s, r)| r.points.last().map(|p| gain_strata(study, s, p, std::slice::from_ref(c))))
                        .collect();
                    paired_bootstrap(&diffs, study.plan.eval.bootstrap, 21)
                })
                .collect()
        })
        .collect();
    Some((rows, cols, cells))
}

fn transfer_section(md: &mut String, study: &Study) -> Result<()> {
    let Some((rows, cols, cells)) = transfer_matrix(study) else { return Ok(()) };
    writeln!(
        md,
        "## Transfer matrix\n\nSFT on each task alone (and on all: the SFT run RL starts from, same recipe; steps: {}), \
         final checkpoint; each cell is the chance-corrected accuracy gain over the base on that column's task.\n",
        rows.iter()
            .map(|r| format!("{r} {}", study.seeds.first().and_then(|s| s.runs.iter().find(|x| &x.name == r)).and_then(|x| x.points.last()).map_or(0, |p| p.step)))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    write!(md, "| trained on ↓ / evaluated on → |")?;
    for c in &cols {
        write!(md, " {c} ({:?}) |", study.tasks[c].role)?;
    }
    writeln!(md, "\n|---|{}", "---|".repeat(cols.len()))?;
    for (r, row) in rows.iter().zip(&cells) {
        write!(md, "| {r} |")?;
        for e in row {
            write!(md, " {} |", fmt_est(e, 3))?;
        }
        writeln!(md)?;
    }
    writeln!(md)?;
    Ok(())
}

fn frontier_section(md: &mut String, sums: &[Summary], seeds: usize) -> Result<()> {
    writeln!(
        md,
        "## Learning–forgetting frontier\n\nEvery checkpoint is a point (cost, gain); each method's Pareto front \
         joins the checkpoints no other checkpoint of it beats on both. Methods are compared at matched gain within \
         each seed, interpolating along that seed's fronts at the same gain for every method, at ¼, ½, ¾ and all \
         of the range of gain the fronts share in that seed (the gain column is its mean over seeds; t intervals \
         over seeds).\n"
    )?;
    for by in [Gain::Accuracy, Gain::Reward] {
        for (title, kl) in [("Δ bits/byte", false), ("KL(base‖π) nats/tok, task", true)] {
            for group in
                [&[Method::Sft, Method::Rl][..], &[Method::BranchSft, Method::BranchRl, Method::BranchOnPolicy][..]]
            {
                matched_table(md, sums, group, kl, by, seeds, title)?;
            }
        }
    }
    Ok(())
}

/// One matched-gain table: each method's cost (t interval over seeds) at the gains its fronts share.
fn matched_table(
    md: &mut String,
    sums: &[Summary],
    group: &[Method],
    kl: bool,
    by: Gain,
    seeds: usize,
    title: &str,
) -> Result<()> {
    let rows = matched_gain(sums, group, kl, by, seeds);
    if rows.is_empty() {
        return Ok(());
    }
    write!(md, "Cost in {title} at matched gain in {}:\n\n| gain | seeds where the fronts overlap |", by.name())?;
    for m in group {
        write!(md, " {} |", m.name())?;
    }
    writeln!(md, "\n|---|---|{}", "---|".repeat(group.len()))?;
    for (g, costs) in rows {
        let n = costs.iter().flatten().map(Vec::len).max().unwrap_or(0);
        write!(md, "| {g:.3} | {n} of {seeds} |")?;
        for c in costs {
            write!(md, " {} |", c.map_or("—".into(), |per| fmt_est(&t_interval(&per), 4)))?;
        }
        writeln!(md)?;
    }
    writeln!(md)?;
    Ok(())
}

/// Fits of Δ bits/byte against KL(base ‖ π) on task inputs over every checkpoint and seed: per method and pooled.
pub fn kl_fits(
    sums: &[Summary],
) -> Vec<(String, Option<kiln_model::eval::stats::Fit>, Option<kiln_model::eval::stats::Fit>)> {
    let mut groups: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    // Each run's step 0 is its starting model, already a point elsewhere (the base, an SFT end, the branch point):
    // counted once, as the base (0, 0) per seed in the pooled fit.
    let seeds = sums.iter().map(|s| s.per_seed.len()).max().unwrap_or(0);
    let pooled = groups.entry("pooled".to_string()).or_default();
    pooled.0.extend(std::iter::repeat_n(0.0, seeds));
    pooled.1.extend(std::iter::repeat_n(0.0, seeds));
    for s in sums.iter().filter(|s| s.step > 0) {
        for &(dbpb, _, kl, _) in &s.per_seed {
            for key in [s.method.name().to_string(), "pooled".to_string()] {
                let g = groups.entry(key).or_default();
                g.0.push(kl);
                g.1.push(dbpb);
            }
        }
    }
    // A fit through as many points as it has coefficients is exact and says nothing: one more point at least.
    let fit = |x: &[f64], y: &[f64], d: usize| if x.len() > d + 1 { poly_fit(x, y, d) } else { None };
    groups.into_iter().map(|(k, (x, y))| (k, fit(&x, &y, 1), fit(&x, &y, 2))).collect()
}

fn kl_fit_section(md: &mut String, sums: &[Summary]) -> Result<()> {
    writeln!(
        md,
        "## Forgetting against KL\n\nΔ bits/byte fitted against KL(base‖π) in nats/token on task inputs, every \
         checkpoint of every seed a point.\n\n| checkpoints of | n | linear: slope, R² | quadratic R² |\n|---|---|---|---|"
    )?;
    for (name, lin, quad) in kl_fits(sums) {
        let n = lin.as_ref().or(quad.as_ref()).map_or(0, |f| f.n);
        let lin = lin.map_or("—".into(), |f| format!("{:.4} bits/byte per nat, R² {:.3}", f.coef[1], f.r2));
        let quad = quad.map_or("—".into(), |f| format!("{:.3}", f.r2));
        writeln!(md, "| {name} | {n} | {lin} | {quad} |")?;
    }
    writeln!(md)?;
    Ok(())
}

fn pass_at_k_section(md: &mut String, study: &Study) -> Result<()> {
    let samples = study.plan.eval.samples;
    let ks: Vec<usize> = [1, 2, 4, 8, 16, 32, 64, 128].into_iter().filter(|&k| k <= samples).collect();
    let trained = tasks_of(study, Role::Trained);
    write!(md, "## pass@k on trained tasks (unbiased estimator, {samples} samples per prompt)\n\n| checkpoint |")?;
    for k in &ks {
        write!(md, " k={k} |")?;
    }
    writeln!(md, "\n|---|{}", "---|".repeat(ks.len()))?;
    let row = |pts: Vec<&Scores>, k: usize| {
        let v: Vec<f64> = pts
            .iter()
            .flat_map(|p| {
                trained.iter().filter_map(|t| p.tasks.get(t)).map(|x| {
                    let per = x.pass_at(k);
                    per.iter().sum::<f64>() / per.len().max(1) as f64
                })
            })
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let mut lines: Vec<(String, Vec<&Scores>)> = vec![("base".into(), study.seeds.iter().map(|s| &s.base).collect())];
    for name in run_names(study) {
        let runs = across_seeds(study, &name);
        if runs.first().is_some_and(|r| r.1.method != Method::Transfer) {
            lines.push((name.clone(), runs.iter().filter_map(|(_, r)| r.points.last()).collect()));
        }
    }
    for (name, pts) in lines {
        write!(md, "| {name} |")?;
        for &k in &ks {
            write!(md, " {:.3} |", row(pts.clone(), k))?;
        }
        writeln!(md)?;
    }
    writeln!(md)?;
    Ok(())
}

/// Plain statements of what the intervals support, and what they do not.
pub fn statements(study: &Study, sums: &[Summary], finals: &[&Summary]) -> Vec<String> {
    let mut out = Vec::new();
    let seeds = study.seeds.len();
    let over = if seeds < 2 { "interval over prompts only, one seed" } else { "interval excludes 0" };
    for f in finals {
        let gain = match sign(&f.gain) {
            Some(1.0) => format!("raised trained-task accuracy by {} ({over})", fmt_est(&f.gain, 3)),
            Some(-1.0) => format!("lowered trained-task accuracy by {} ({over})", fmt_est(&f.gain, 3)),
            _ => format!(
                "changed trained-task accuracy by {}, which the intervals do not tell from no change",
                fmt_est(&f.gain, 3)
            ),
        };
        let cost = match (seeds > 1, sign(&f.dbpb)) {
            (true, Some(1.0)) => format!("raised held-out loss by {} bits/byte", fmt_est(&f.dbpb, 4)),
            (true, Some(-1.0)) => format!("lowered held-out loss by {} bits/byte", fmt_est(&f.dbpb, 4)),
            (true, _) => format!("left held-out loss within its interval ({} bits/byte)", fmt_est(&f.dbpb, 4)),
            (false, _) => format!("moved held-out loss by {:+.4} bits/byte (one seed: no interval)", f.dbpb.value),
        };
        let level = if f.corrected < 0.0 {
            format!(
                "its chance-corrected accuracy, {:+.3}, is still below always giving the majority answer",
                f.corrected
            )
        } else {
            format!("its chance-corrected accuracy is {:+.3}", f.corrected)
        };
        out.push(format!("{} ({}): {gain}; {level}; {cost}.", f.run, f.method.name()));
    }
    for by in [Gain::Accuracy, Gain::Reward] {
        for (group, what) in [
            (&[Method::Sft, Method::Rl][..], "SFT and RL"),
            (
                &[Method::BranchSft, Method::BranchRl, Method::BranchOnPolicy][..],
                "the branch arms (SFT, RL, on-policy SFT)",
            ),
        ] {
            let rows = matched_gain(sums, group, false, by, seeds);
            let Some((g, costs)) = rows.iter().rev().find(|(_, c)| c.iter().all(Option::is_some)) else {
                if group.iter().all(|m| sums.iter().any(|s| s.method == *m)) {
                    // Say why: a method whose front is its starting point alone never gained beyond where it began.
                    let stuck: Vec<String> = group
                        .iter()
                        .filter_map(|&m| {
                            let n = (0..seeds).filter(|&i| front(sums, m, false, by, Some(i)).len() < 2).count();
                            (n > 0).then(|| {
                                format!("{} never rose above its starting gain in {n} of {seeds} seeds", m.name())
                            })
                        })
                        .collect();
                    let why = if stuck.is_empty() { String::new() } else { format!(" ({})", stuck.join("; ")) };
                    out.push(format!(
                        "{what}, by {}: their fronts share no range of gain in any seed{why}, so they cannot be compared at matched gain.",
                        by.name()
                    ));
                }
                continue;
            };
            let costs: Vec<&Vec<f64>> = costs.iter().flatten().collect();
            let listed: Vec<String> =
                group.iter().zip(&costs).map(|(m, c)| format!("{} {}", m.name(), fmt_est(&t_interval(c), 4))).collect();
            let overlap = costs.first().map_or(0, |c| c.len());
            let mut line = format!(
                "At matched gain {g:.3} in {} (fronts overlapping in {overlap} of {seeds} seeds), Δ bits/byte: {}.",
                by.name(),
                listed.join(", ")
            );
            if overlap < 2 {
                line += " With fewer than two seeds there are no intervals, so no ordering is supported.";
            } else {
                // Pairwise, within seeds: the t interval of the per-seed difference in cost.
                for i in 0..group.len() {
                    for j in i + 1..group.len() {
                        let d: Vec<f64> = costs[i].iter().zip(costs[j]).map(|(a, b)| a - b).collect();
                        let e = t_interval(&d);
                        let (a, b) = (group[i].name(), group[j].name());
                        line += &match sign(&e) {
                            Some(1.0) => {
                                format!(" {a} forgets more than {b} ({} bits/byte, paired over seeds).", fmt_est(&e, 4))
                            }
                            Some(-1.0) => {
                                format!(" {a} forgets less than {b} ({} bits/byte, paired over seeds).", fmt_est(&e, 4))
                            }
                            _ => format!(
                                " {a} and {b} are not distinguished ({} bits/byte, paired over seeds).",
                                fmt_est(&e, 4)
                            ),
                        };
                    }
                }
            }
            out.push(line);
        }
    }
    // Runs missing from some seeds (an on-policy arm whose branch point solved nothing there).
    for name in run_names(study) {
        let n = across_seeds(study, &name).len();
        if n < seeds {
            out.push(format!("{name} ran in {n} of {seeds} seeds; its intervals and fronts cover those seeds only."));
        }
    }
    if let Some((rows, cols, cells)) = transfer_matrix(study) {
        for (r, row) in rows.iter().zip(&cells).take(rows.len() - 1) {
            let Some(task) = r.strip_prefix("transfer[").and_then(|s| s.strip_suffix(']')) else { continue };
            let own = cols.iter().position(|c| c == task).map(|i| row[i]);
            let others: Vec<&Estimate> =
                cols.iter().zip(row).filter(|(c, _)| c.as_str() != task).map(|(_, e)| e).collect();
            let helped = others.iter().filter(|e| sign(e) == Some(1.0)).count();
            let hurt = others.iter().filter(|e| sign(e) == Some(-1.0)).count();
            if let Some(own) = own {
                out.push(format!(
                    "Training on {task} alone: {} on {task}; of the {} other evaluated tasks, {helped} gained and {hurt} lost beyond their intervals.",
                    fmt_est(&own, 3),
                    others.len()
                ));
            }
        }
    }
    for (name, lin, _) in kl_fits(sums) {
        if name == "pooled" {
            if let Some(f) = lin {
                out.push(format!(
                    "Across all {} checkpoints, KL(base‖π) on task inputs explains R² = {:.2} of the variance in Δ bits/byte (linear).",
                    f.n, f.r2
                ));
            }
        }
    }
    out.push(format!(
        "Scale: a {} model on {}; these results say what this engine measures at this scale, not what holds for large models.",
        study.plan.arch, study.adapter
    ));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::study::plan::Plan;
    use crate::study::record::{TaskInfo, SCHEMA};
    use kiln_model::eval::evaluate::PromptScores;

    /// One checkpoint with `correct` of 10 "count" prompts right (greedy; sampled: 2 of 4 on those).
    pub(crate) fn point(step: u64, correct: usize, bpb: f64, kl: f64) -> Scores {
        let greedy: Vec<f64> = (0..10).map(|i| f64::from(u8::from(i < correct))).collect();
        let sampled = PromptScores {
            correct: greedy.iter().map(|&g| if g > 0.0 { 2 } else { 0 }).collect(),
            greedy,
            samples: 4,
            entropy: Some(1.5),
        };
        Scores {
            step,
            bits_per_byte: bpb,
            nats_per_token: bpb,
            text_tokens: 100,
            text_bytes: 300,
            tasks: [("count".to_string(), sampled)].into_iter().collect(),
            kl_base_model_task_nats: kl,
            kl_base_model_text_nats: kl / 2.0,
            kl_start_model_task_nats: None,
            kl_start_model_text_nats: None,
        }
    }

    fn run(name: &str, method: Method, points: Vec<Scores>) -> RunRecord {
        RunRecord {
            name: name.into(),
            method,
            settings: serde_json::json!({}),
            start: "base".into(),
            trained_tasks: vec!["count".into()],
            points,
            curve: vec![serde_json::json!({"step": 1, "mean_reward": 0.1, "kl": 0.0})],
            train_seconds: 1.0,
        }
    }

    /// Two seeds alike: SFT reaches gain 1.0 (chance-corrected: half the prompts at chance 0.5) at Δ 0.2 bits/byte
    /// and 2.0 at Δ 0.6; RL reaches 2.0 at Δ 0.1. At matched gain 1.0 SFT costs 0.2 and RL 0.05 (interpolated).
    fn study() -> Study {
        let mut plan = Plan::preset(true);
        plan.tasks = vec!["count".into()];
        plan.eval.samples = 4;
        plan.eval.bootstrap = 200;
        let seed = |s: u64| SeedRecord {
            seed: s,
            base_tokens: 1000,
            pretrain_curve: vec![(5, 3.0), (8, 2.5), (10, 2.49)],
            few_shot: [("count".to_string(), vec![0.0; 10])].into_iter().collect(),
            base: point(0, 0, 2.0, 0.0),
            runs: vec![
                run("sft", Method::Sft, vec![point(0, 0, 2.0, 0.0), point(10, 5, 2.2, 1.0), point(20, 10, 2.6, 2.0)]),
                run("rl", Method::Rl, vec![point(0, 0, 2.0, 0.0), point(10, 10, 2.1, 0.5)]),
            ],
        };
        let info = TaskInfo { role: Role::Trained, prompts: 10, majority_answer: "0".into(), chance: 0.5 };
        Study {
            schema: SCHEMA,
            commit: "test".into(),
            adapter: "none".into(),
            plan,
            tasks: [("count".to_string(), info)].into_iter().collect(),
            seeds: vec![seed(1), seed(2)],
        }
    }

    #[test]
    fn matched_gain_interpolates_each_front_and_the_report_says_what_it_supports() {
        let study = study();
        let sums = summaries(&study);
        let last_sft = sums.iter().find(|s| s.run == "sft" && s.step == 20).unwrap();
        assert!((last_sft.gain.value - 2.0).abs() < 1e-12, "all 10 right at chance 0.5: {:?}", last_sft.gain);
        assert!((last_sft.dbpb.value - 0.6).abs() < 1e-12);
        assert!((last_sft.corrected - 1.0).abs() < 1e-12, "perfect accuracy is 1 chance-corrected");
        let rows = matched_gain(&sums, &[Method::Sft, Method::Rl], false, Gain::Accuracy, 2);
        let (g, costs) = &rows[1];
        assert!((g - 1.0).abs() < 1e-12, "the middle of the common range [0, 2]: {g}");
        let (sft, rl) = (costs[0].as_ref().unwrap(), costs[1].as_ref().unwrap());
        assert!(
            sft.iter().all(|c| (c - 0.2).abs() < 1e-12) && rl.iter().all(|c| (c - 0.05).abs() < 1e-12),
            "{costs:?}"
        );

        let dir = crate::study::tests::scratch("report");
        let text = write_report(&study, &dir).unwrap();
        assert!(text.contains("| sft | sft | 20 |"), "{text}");
        let md = std::fs::read_to_string(dir.join("study.md")).unwrap();
        for section in
            ["## Summary", "## Transfer matrix", "## Learning–forgetting frontier", "## Forgetting against KL"]
        {
            if section == "## Transfer matrix" {
                assert!(!md.contains(section), "no transfer runs, no matrix");
            } else {
                assert!(md.contains(section), "{section} missing:\n{md}");
            }
        }
        assert!(md.contains("sft forgets more than rl (+0.5000"), "paired over two identical seeds:\n{md}");
        assert!(md.contains("in mean sampled reward"), "the frontier by reward too:\n{md}");
        assert!(md.contains("KL(base‖π)") && md.contains("nats/tok"));
        assert!(md.contains("2.500 nats/token at step 8, 2.490 at step 10") && md.contains("had flattened"), "{md}");
        for png in ["frontier_bpb.png", "frontier_kl.png", "kl_fit.png", "rl_curves.png"] {
            assert_eq!(&std::fs::read(dir.join(png)).unwrap()[..4], b"\x89PNG", "{png}");
        }
        // --report redraws the same from study.json alone.
        std::fs::write(dir.join("study.json"), serde_json::to_string(&study).unwrap()).unwrap();
        std::fs::remove_file(dir.join("study.md")).unwrap();
        crate::study::report_cmd(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("study.md")).unwrap(), md);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn transfer_rows_and_a_single_seed_support_no_ordering() {
        let mut study = study();
        study.seeds.truncate(1);
        let t = run("transfer[count]", Method::Transfer, vec![point(0, 0, 2.0, 0.0), point(10, 4, 2.1, 0.3)]);
        study.seeds[0].runs.push(t);
        let (rows, cols, cells) = transfer_matrix(&study).unwrap();
        assert_eq!(rows, vec!["transfer[count]".to_string(), "sft".to_string()]);
        assert_eq!(cols, vec!["count".to_string()]);
        assert!((cells[0][0].value - 0.8).abs() < 1e-12, "4 of 10 at chance 0.5: {:?}", cells[0][0]);
        let sums = summaries(&study);
        let finals: Vec<&Summary> = sums.iter().filter(|s| s.step == 20 || (s.run == "rl" && s.step == 10)).collect();
        let said = statements(&study, &sums, &finals).join("\n");
        assert!(said.contains("one seed: no interval") && said.contains("no ordering is supported"), "{said}");
    }
}
