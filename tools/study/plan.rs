//! The study plan: every setting of a study in one TOML document. Two plans are built in (`--quick` and the
//! default); a user's `--plan FILE` and `--set key=value` flags are merged over the chosen one (tables merge key by
//! key, anything else replaces), then the whole is checked: unknown fields, empty sweeps and runs that name a
//! missing parent are errors that say where. Sweep fields take one value or a list; a list expands into one run
//! per combination.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One value, or a list of values to sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Sweep<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> Sweep<T> {
    pub fn values(&self) -> Vec<T> {
        match self {
            Sweep::One(v) => vec![v.clone()],
            Sweep::Many(v) => v.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Sweep::Many(v) if v.is_empty())
    }

    fn is_sweep(&self) -> bool {
        matches!(self, Sweep::Many(v) if v.len() > 1)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Model family of a pretrained base: "gpt2" (the `tiny` preset) or "llama" (`llama-tiny`).
    pub arch: String,
    /// The pretrained base's preset instead of the family's tiny one ("small" on a GPU); empty: by `arch`.
    #[serde(default)]
    pub preset: String,
    /// Seeds 1..=seeds: every run repeats per seed.
    pub seeds: u64,
    /// Tasks post-trained on and evaluated.
    pub tasks: Vec<String>,
    /// Task families evaluated, never trained on.
    pub held_out: Vec<String>,
    /// Also evaluate each trained task's length-shifted variant (more digits, more words).
    pub shifted: bool,
    /// Start every seed from this checkpoint instead of pretraining one (a Hub or `kiln pretrain` model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    pub pretrain: PretrainPlan,
    pub eval: EvalPlan,
    pub sft: Vec<SftRun>,
    pub rl: Vec<RlRun>,
    pub branch: BranchPlan,
    pub transfer: TransferPlan,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainPlan {
    pub steps: u64,
    pub lr: f32,
    pub min_lr: f32,
    pub batch: usize,
    pub seq_len: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalPlan {
    /// Greedy-scored prompts per task: this many distinct eval prompts, or every one where a task has fewer.
    pub prompts: usize,
    /// Of those, the first this many are also sampled `samples` times (pass@k up to k = samples, mean reward).
    pub sampled_prompts: usize,
    pub samples: usize,
    pub max_new_tokens: usize,
    /// Task prompts per task continued by the reference model's samples, for KL(reference ‖ π).
    pub kl_prompts: usize,
    /// Held-out text windows (n_ctx + 1 tokens each) for bits/byte and the text KL.
    pub text_windows: usize,
    /// Solved examples in the base model's few-shot prompt (0: no few-shot baseline).
    pub few_shot: usize,
    /// Bootstrap resamples per interval.
    pub bootstrap: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftRun {
    pub name: String,
    pub lr: Sweep<f32>,
    pub steps: Sweep<u64>,
    /// Fraction of rows that are pretraining text, in [0, 1).
    pub mix: Sweep<f64>,
    pub batch: usize,
    pub seq_len: usize,
    pub warmup: u64,
    /// The cosine schedule ends at lr × this.
    pub min_lr_fraction: f32,
    pub weight_decay: f32,
    /// Checkpoints evaluated, evenly spaced, the last at the end.
    pub snapshots: u64,
    /// Training examples drawn per task.
    pub examples: usize,
}

impl Default for SftRun {
    fn default() -> Self {
        SftRun {
            name: "sft".into(),
            lr: Sweep::One(3e-4),
            steps: Sweep::One(300),
            mix: Sweep::One(0.0),
            batch: 16,
            seq_len: 64,
            warmup: 10,
            min_lr_fraction: 0.1,
            weight_decay: 0.1,
            snapshots: 3,
            examples: 4000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlRun {
    pub name: String,
    /// The SFT run or sweep point it starts from (its final checkpoint); empty: the first SFT run's first point.
    pub from: String,
    pub lr: Sweep<f32>,
    pub beta: Sweep<f32>,
    pub group_size: Sweep<usize>,
    pub steps: Sweep<u64>,
    pub prompts_per_step: usize,
    pub epochs: usize,
    pub warmup: u64,
    pub min_lr_fraction: f32,
    /// PPO-style ratio clip ε.
    pub clip_eps: f32,
    /// GRPO divides advantages by the group's reward std; false: Dr. GRPO-style mean-centring only.
    pub scale_by_std: bool,
    pub snapshots: u64,
    pub examples: usize,
}

impl Default for RlRun {
    fn default() -> Self {
        RlRun {
            name: "rl".into(),
            from: String::new(),
            lr: Sweep::One(1e-4),
            beta: Sweep::One(0.04),
            group_size: Sweep::One(8),
            steps: Sweep::One(40),
            prompts_per_step: 16,
            epochs: 2,
            warmup: 5,
            min_lr_fraction: 0.1,
            clip_eps: 0.2,
            scale_by_std: true,
            snapshots: 3,
            examples: 2000,
        }
    }
}

/// The common branch point: one early SFT checkpoint continued three ways, all evaluated on the same snapshots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BranchPlan {
    pub enabled: bool,
    /// The SFT run or sweep point branched from (empty: the first), and the step of it from which the branch point
    /// is taken (the first snapshot from there on with a rewarded sample).
    pub from: String,
    pub at: u64,
    /// SFT steps of the reference-answer and on-policy arms; RL steps of the RL arm.
    pub sft_steps: u64,
    pub rl_steps: u64,
    pub sft_lr: f32,
    pub rl_lr: f32,
    pub beta: f32,
    pub group_size: usize,
    /// On-policy arm: completions sampled per training prompt, over this many prompts per round (one round per
    /// snapshot interval, sampled from the model as it is then).
    pub samples: usize,
    pub prompts: usize,
    pub snapshots: u64,
}

impl Default for BranchPlan {
    fn default() -> Self {
        BranchPlan {
            enabled: true,
            from: String::new(),
            at: 100,
            sft_steps: 200,
            rl_steps: 40,
            sft_lr: 3e-4,
            rl_lr: 1e-4,
            beta: 0.04,
            group_size: 8,
            samples: 8,
            prompts: 256,
            snapshots: 3,
        }
    }
}

/// The transfer matrix: the first SFT run's settings (its first sweep values) on each task alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransferPlan {
    pub enabled: bool,
    /// SFT steps of each single-task run (0: the first SFT run's).
    pub steps: u64,
}

impl Default for TransferPlan {
    fn default() -> Self {
        TransferPlan { enabled: true, steps: 0 }
    }
}

impl Plan {
    /// The built-in plans: `quick` finishes in minutes on a software GPU, the default within the hour there.
    pub fn preset(quick: bool) -> Plan {
        let tasks = vec!["addition:2".into(), "reverse:3".into(), "count".into()];
        if quick {
            return Plan {
                arch: "gpt2".into(),
                preset: String::new(),
                seeds: 1,
                tasks,
                held_out: vec!["last:3".into()],
                shifted: true,
                base: None,
                pretrain: PretrainPlan { steps: 150, lr: 3e-3, min_lr: 3e-4, batch: 8, seq_len: 128 },
                eval: EvalPlan {
                    prompts: 32,
                    sampled_prompts: 16,
                    samples: 8,
                    max_new_tokens: 12,
                    kl_prompts: 16,
                    text_windows: 16,
                    few_shot: 3,
                    bootstrap: 500,
                },
                sft: vec![SftRun {
                    lr: Sweep::One(1e-3),
                    steps: Sweep::One(120),
                    mix: Sweep::One(0.25),
                    snapshots: 2,
                    ..SftRun::default()
                }],
                rl: vec![RlRun { lr: Sweep::One(3e-4), steps: Sweep::One(8), snapshots: 2, ..RlRun::default() }],
                branch: BranchPlan {
                    at: 60,
                    sft_steps: 40,
                    rl_steps: 6,
                    sft_lr: 1e-3,
                    rl_lr: 3e-4,
                    prompts: 64,
                    snapshots: 2,
                    ..BranchPlan::default()
                },
                transfer: TransferPlan { enabled: false, ..TransferPlan::default() },
            };
        }
        // The default: three seeds within the hour on a software GPU (2 cores), every part of the study present.
        let main_sft = "sft[lr=0.001,mix=0.25]".to_string();
        Plan {
            arch: "gpt2".into(),
            preset: String::new(),
            seeds: 3,
            tasks,
            held_out: vec!["last:3".into()],
            shifted: true,
            base: None,
            pretrain: PretrainPlan { steps: 600, lr: 3e-3, min_lr: 3e-4, batch: 8, seq_len: 128 },
            eval: EvalPlan {
                prompts: 500,
                sampled_prompts: 32,
                samples: 16,
                max_new_tokens: 16,
                kl_prompts: 32,
                text_windows: 48,
                few_shot: 3,
                bootstrap: 1000,
            },
            sft: vec![SftRun {
                lr: Sweep::Many(vec![3e-4, 1e-3]),
                mix: Sweep::Many(vec![0.0, 0.25]),
                steps: Sweep::One(200),
                snapshots: 2,
                ..SftRun::default()
            }],
            rl: vec![RlRun {
                from: main_sft.clone(),
                lr: Sweep::One(3e-4),
                beta: Sweep::Many(vec![0.04, 0.0]),
                steps: Sweep::One(24),
                snapshots: 2,
                ..RlRun::default()
            }],
            branch: BranchPlan {
                from: main_sft,
                at: 100,
                sft_steps: 100,
                rl_steps: 24,
                sft_lr: 1e-3,
                rl_lr: 3e-4,
                prompts: 128,
                snapshots: 2,
                ..BranchPlan::default()
            },
            transfer: TransferPlan { enabled: true, steps: 100 },
        }
    }

    /// The preset with `file` (TOML text) and then each `key=value` override merged over it, checked.
    pub fn load(quick: bool, file: Option<(&str, &str)>, sets: &[String]) -> Result<Plan> {
        let mut doc = toml::Value::try_from(Plan::preset(quick)).context("serialising the built-in plan")?;
        if let Some((name, text)) = file {
            let user: toml::Value = toml::from_str(text).with_context(|| format!("study plan {name}"))?;
            merge(&mut doc, user);
        }
        for s in sets {
            let (key, value) = s.split_once('=').with_context(|| format!("--set {s:?}: expected key=value"))?;
            set(&mut doc, key.trim(), parse_value(value.trim())).with_context(|| format!("--set {s:?}"))?;
        }
        let origin = file.map_or("the built-in plan".to_string(), |(n, _)| format!("study plan {n}"));
        // Through text, so a type error quotes the offending line of the merged plan (with its key).
        let merged = toml::to_string(&doc).context("writing the merged plan")?;
        let mut plan: Plan = toml::from_str(&merged).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        // Tasks by their canonical names ("addition" is "addition:3"), the names scores are recorded under.
        let canonical = |list: &[String]| -> Result<Vec<String>> {
            list.iter().map(|t| Ok(kiln_model::data::tasks::Task::parse(t)?.name())).collect()
        };
        plan.tasks = canonical(&plan.tasks).with_context(|| origin.clone())?;
        plan.held_out = canonical(&plan.held_out).with_context(|| origin.clone())?;
        plan.check().with_context(|| origin.clone())?;
        Ok(plan)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    fn check(&self) -> Result<()> {
        if self.seeds == 0 {
            bail!("seeds must be at least 1");
        }
        if self.tasks.is_empty() {
            bail!("tasks is empty: name at least one task to post-train on");
        }
        if self.sft.is_empty() {
            bail!("sft lists no runs: the study needs at least one SFT run");
        }
        let e = &self.eval;
        if e.prompts == 0 || e.samples == 0 || e.max_new_tokens == 0 || e.kl_prompts == 0 || e.text_windows == 0 {
            bail!("eval: prompts, samples, max_new_tokens, kl_prompts and text_windows must be at least 1");
        }
        if !["gpt2", "llama"].contains(&self.arch.as_str()) {
            bail!("arch {:?}: use gpt2 or llama", self.arch);
        }
        if !self.preset.is_empty() {
            kiln_model::ModelConfig::preset(&self.preset, 512).with_context(|| format!("preset {:?}", self.preset))?;
        }
        let mut names = BTreeSet::new();
        for r in &self.sft {
            for (field, empty) in [("lr", r.lr.is_empty()), ("steps", r.steps.is_empty()), ("mix", r.mix.is_empty())] {
                if empty {
                    bail!("sft run {:?}: the sweep {field} = [] is empty: give it at least one value", r.name);
                }
            }
            if let Some(m) = r.mix.values().into_iter().find(|m| !(0.0..1.0).contains(m)) {
                bail!("sft run {:?}: mix {m} is outside [0, 1)", r.name);
            }
            if r.steps.values().contains(&0) || r.snapshots == 0 || r.batch == 0 || r.seq_len == 0 {
                bail!("sft run {:?}: steps, snapshots, batch and seq_len must be at least 1", r.name);
            }
            names.insert(r.name.clone());
        }
        for r in &self.rl {
            let empties = [
                ("lr", r.lr.is_empty()),
                ("beta", r.beta.is_empty()),
                ("group_size", r.group_size.is_empty()),
                ("steps", r.steps.is_empty()),
            ];
            if let Some((field, _)) = empties.iter().find(|(_, e)| *e) {
                bail!("rl run {:?}: the sweep {field} = [] is empty: give it at least one value", r.name);
            }
            if r.steps.values().contains(&0) || r.group_size.values().iter().any(|&g| g < 2) || r.snapshots == 0 {
                bail!("rl run {:?}: steps and snapshots must be at least 1, group_size at least 2", r.name);
            }
            self.sft_parent(&r.from).with_context(|| format!("rl run {:?}", r.name))?;
        }
        if self.branch.enabled {
            let b = &self.branch;
            let steps = self.sft_parent(&b.from).context("branch")?.1.steps;
            if b.at == 0 || b.at >= steps {
                bail!("branch: at = {} must lie inside the SFT run it branches from (1..{steps})", b.at);
            }
            if b.snapshots == 0 || b.samples == 0 || b.prompts == 0 || b.group_size < 2 {
                bail!("branch: snapshots, samples and prompts must be at least 1, group_size at least 2");
            }
        }
        let all_runs: Vec<String> =
            self.sft.iter().map(|r| r.name.clone()).chain(self.rl.iter().map(|r| r.name.clone())).collect();
        let distinct: BTreeSet<&String> = all_runs.iter().collect();
        if distinct.len() != all_runs.len() {
            bail!("run names must be distinct: {all_runs:?}");
        }
        if let Some(r) =
            all_runs.iter().find(|n| n.starts_with("branch-") || n.starts_with("transfer[") || n.as_str() == "base")
        {
            bail!("run name {r:?} is reserved (base, branch-*, transfer[..] are the study's own runs)");
        }
        // Every run's directory is its name with unusual characters replaced: two names must not share one.
        let mut points: Vec<String> = self.sft.iter().flat_map(|r| r.points()).map(|p| p.name).collect();
        for r in &self.rl {
            points.extend(r.points(self)?.into_iter().map(|p| p.name));
        }
        let mut dirs = std::collections::BTreeMap::new();
        for p in &points {
            if let Some(other) = dirs.insert(super::run::run_dir_name(p), p) {
                bail!(
                    "runs {other:?} and {p:?} would share the directory {:?}: rename one",
                    super::run::run_dir_name(p)
                );
            }
        }
        Ok(())
    }

    /// The SFT point `from` names: a point of a sweep by its full name ("sft[lr=0.001,mix=0.25]"), a run by its
    /// name (its first point), or, empty, the first run's first point; with the run it belongs to.
    pub fn sft_parent(&self, from: &str) -> Result<(&SftRun, SftPoint)> {
        let first = |r: &SftRun| r.points().into_iter().next().expect("a checked run has a point");
        if from.is_empty() {
            let r = self.sft.first().context("no SFT run to start from")?;
            return Ok((r, first(r)));
        }
        if let Some(r) = self.sft.iter().find(|r| r.name == from) {
            return Ok((r, first(r)));
        }
        for r in &self.sft {
            if let Some(p) = r.points().into_iter().find(|p| p.name == from) {
                return Ok((r, p));
            }
        }
        let names: Vec<String> = self.sft.iter().flat_map(|r| r.points()).map(|p| p.name).collect();
        bail!("from = {from:?} names no SFT run or sweep point (there are {names:?})")
    }
}

/// One SFT run of a sweep, every value fixed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftPoint {
    /// "sft" alone, or "sft[lr=0.0003,mix=0.25]" naming the swept values.
    pub name: String,
    /// The plan entry it expands from.
    pub run: String,
    pub lr: f32,
    pub steps: u64,
    pub mix: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RlPoint {
    pub name: String,
    pub run: String,
    /// The SFT point it starts from.
    pub from: String,
    pub lr: f32,
    pub beta: f32,
    pub group_size: usize,
    pub steps: u64,
}

fn label(run: &str, parts: &[(bool, &str, String)]) -> String {
    let swept: Vec<String> = parts.iter().filter(|p| p.0).map(|p| format!("{}={}", p.1, p.2)).collect();
    if swept.is_empty() {
        run.to_string()
    } else {
        format!("{run}[{}]", swept.join(","))
    }
}

impl SftRun {
    pub fn points(&self) -> Vec<SftPoint> {
        let mut out = Vec::new();
        for lr in self.lr.values() {
            for steps in self.steps.values() {
                for mix in self.mix.values() {
                    let name = label(
                        &self.name,
                        &[
                            (self.lr.is_sweep(), "lr", lr.to_string()),
                            (self.steps.is_sweep(), "steps", steps.to_string()),
                            (self.mix.is_sweep(), "mix", mix.to_string()),
                        ],
                    );
                    out.push(SftPoint { name, run: self.name.clone(), lr, steps, mix });
                }
            }
        }
        out
    }
}

impl RlRun {
    pub fn points(&self, plan: &Plan) -> Result<Vec<RlPoint>> {
        let from = plan.sft_parent(&self.from)?.1.name;
        let mut out = Vec::new();
        for lr in self.lr.values() {
            for beta in self.beta.values() {
                for group_size in self.group_size.values() {
                    for steps in self.steps.values() {
                        let name = label(
                            &self.name,
                            &[
                                (self.lr.is_sweep(), "lr", lr.to_string()),
                                (self.beta.is_sweep(), "beta", beta.to_string()),
                                (self.group_size.is_sweep(), "group", group_size.to_string()),
                                (self.steps.is_sweep(), "steps", steps.to_string()),
                            ],
                        );
                        out.push(RlPoint {
                            name,
                            run: self.name.clone(),
                            from: from.clone(),
                            lr,
                            beta,
                            group_size,
                            steps,
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Tables merge key by key; anything else in `over` replaces what `base` had.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// A `--set` value as TOML (a number, a list, a boolean), or as a plain string when it does not parse.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// Set the dotted `key` (table keys, or indices into lists: `sft.0.lr`) of `doc` to `value`, creating missing
/// table keys (so unknown ones reach the field check and are reported there).
fn set(doc: &mut toml::Value, key: &str, value: toml::Value) -> Result<()> {
    let mut at = doc;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        at = match at {
            toml::Value::Table(t) => {
                if last {
                    t.insert(part.to_string(), value);
                    return Ok(());
                }
                t.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            toml::Value::Array(a) => {
                let n: usize = part.parse().with_context(|| format!("{part:?} indexes a list: use a number"))?;
                let len = a.len();
                let slot = a.get_mut(n).with_context(|| format!("index {n} is past the list's {len} entries"))?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            _ => bail!("{} is not a table or a list", parts[..i].join(".")),
        };
    }
    bail!("empty key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_plans_are_valid_and_round_trip_through_toml() {
        for quick in [true, false] {
            let p = Plan::load(quick, None, &[]).unwrap();
            assert_eq!(p, Plan::preset(quick));
            let text = p.to_toml().unwrap();
            assert_eq!(
                Plan::load(!quick, Some(("x.toml", &text)), &[]).unwrap(),
                p,
                "a written plan reloads as itself"
            );
        }
    }

    #[test]
    fn files_and_flags_merge_over_the_preset_and_sweeps_expand() {
        let file = "seeds = 2\n[pretrain]\nsteps = 7\n[[sft]]\nname = \"a\"\nlr = [1e-4, 3e-4]\nmix = [0.0, 0.5]\n";
        let p = Plan::load(true, Some(("p.toml", file)), &["eval.samples=4".into(), "rl.0.beta=[0.1, 0.0]".into()])
            .unwrap();
        assert_eq!((p.seeds, p.pretrain.steps, p.pretrain.lr, p.eval.samples), (2, 7, 3e-3, 4));
        let sft = p.sft[0].points();
        assert_eq!(sft.len(), 4);
        assert_eq!(sft[1].name, "a[lr=0.0001,mix=0.5]");
        assert_eq!(sft[1].steps, SftRun::default().steps.values()[0], "unset fields of a listed run take the defaults");
        let rl = p.rl[0].points(&p).unwrap();
        assert_eq!(rl.iter().map(|r| r.beta).collect::<Vec<_>>(), vec![0.1, 0.0]);
        assert_eq!(rl[0].from, "a[lr=0.0001,mix=0]", "RL named by run starts from its first sweep point");
        assert_eq!(rl[1].name, "rl[beta=0]");
    }

    #[test]
    fn the_gpu_plan_example_loads_and_expands() {
        let text = include_str!("../../examples/study-full.toml");
        let p = Plan::load(false, Some(("examples/study-full.toml", text)), &[]).unwrap();
        assert_eq!((p.preset.as_str(), p.eval.samples), ("small", 64));
        assert_eq!(p.sft[0].points().len(), 12);
        assert_eq!(p.rl[0].points(&p).unwrap().len(), 12);
        assert_eq!(p.sft_parent(&p.branch.from).unwrap().1.mix, 0.25);
    }

    #[test]
    fn bad_plans_say_what_is_wrong() {
        let err = |file: &str, sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            format!("{:#}", Plan::load(true, Some(("p.toml", file)), &sets).unwrap_err())
        };
        let e = err("[pretrain]\nstepz = 3\n", &[]);
        assert!(e.contains("unknown field") && e.contains("stepz") && e.contains("p.toml"), "{e}");
        let e = err("[[sft]]\nlr = []\n", &[]);
        assert!(e.contains("lr = [] is empty"), "{e}");
        let e = err("[[rl]]\nfrom = \"nope\"\n", &[]);
        assert!(e.contains("nope") && e.contains("names no SFT run"), "{e}");
        let p = Plan::load(false, None, &["rl.0.from=\"sft[lr=0.001,mix=0.25]\"".into()]).unwrap();
        assert_eq!(p.rl[0].points(&p).unwrap()[0].from, "sft[lr=0.001,mix=0.25]", "a sweep point by name");
        let e = err("", &["eval.bogus=1"]);
        assert!(e.contains("bogus"), "{e}");
        let e = err("", &["sft.3.lr=1"]);
        assert!(e.contains("past the list"), "{e}");
        let e = err("", &["seeds"]);
        assert!(e.contains("key=value"), "{e}");
        let e = err("seeds = \"three\"\n", &[]);
        assert!(e.contains("seeds") || e.contains("integer"), "{e}");
        let e = err("", &["branch.at=100000"]);
        assert!(e.contains("branch"), "{e}");
        let e = err("[[sft]]\nmix = 1.5\n", &[]);
        assert!(e.contains("outside [0, 1)"), "{e}");
        let e = err("tasks = []\n", &[]);
        assert!(e.contains("tasks is empty"), "{e}");
        assert!(err("sft = []\n", &[]).contains("no runs"));
        assert!(err("[[rl]]\nname = \"branch-rl\"\n", &[]).contains("reserved"));
        let e = err("[[sft]]\nname = \"a[x]\"\n[[rl]]\nname = \"a_x_\"\n", &[]);
        assert!(e.contains("share the directory"), "{e}");
        let p = Plan::load(true, None, &["tasks=[\"addition\", \"count:1\"]".into()]).unwrap();
        assert_eq!(p.tasks, vec!["addition:3", "count"], "tasks are kept by their canonical names");
    }
}
