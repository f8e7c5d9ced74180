//! What a study records, as `study.json` holds it (schema version [`SCHEMA`]): the plan, where it ran, every
//! evaluated checkpoint of every run of every seed with per-prompt results, and the training curves. The report is
//! drawn from this alone (`kiln study --report DIR`), so anything a table or figure shows is here.
//!
//! Units and directions, as every field name says: bits/byte and nats/token on held-out text; KL(ref ‖ π) in nats
//! per token, where ref is the base model (`kl_base_model_*`) or the run's starting model (`kl_start_model_*`, the
//! SFT model for RL), measured on task prompts continued by ref's own samples (`*_task_*`) and on held-out text.

use std::collections::BTreeMap;

use kiln_model::eval::evaluate::PromptScores;
use serde::{Deserialize, Serialize};

use super::plan::Plan;

pub const SCHEMA: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Study {
    pub schema: u32,
    /// `git describe` of the source tree that ran it (or "unknown").
    pub commit: String,
    pub adapter: String,
    pub plan: Plan,
    /// Every evaluated task: its role and its majority-answer baseline.
    pub tasks: BTreeMap<String, TaskInfo>,
    pub seeds: Vec<SeedRecord>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Post-trained on.
    Trained,
    /// A trained task at lengths never trained on.
    Shifted,
    /// A task family never trained on.
    HeldOut,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskInfo {
    pub role: Role,
    /// Distinct prompts in its fixed evaluation set.
    pub prompts: usize,
    /// The most common answer there and its share: the accuracy of answering it always (chance).
    pub majority_answer: String,
    pub chance: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedRecord {
    pub seed: u64,
    /// Tokens the base model was pretrained on (0 for a `--base` checkpoint: unknown here).
    pub base_tokens: u64,
    /// (step, held-out loss in nats/token on a fixed validation sample) along pretraining (empty for `--base`).
    #[serde(default)]
    pub pretrain_curve: Vec<(u64, f64)>,
    /// Greedy correctness per prompt of the base model prompted few-shot in plain text, per task.
    pub few_shot: BTreeMap<String, Vec<f64>>,
    pub base: Scores,
    pub runs: Vec<RunRecord>,
}

/// How a run post-trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// SFT on reference answers, from the base model.
    Sft,
    /// GRPO from an SFT model.
    Rl,
    /// From the branch point: more SFT on reference answers, GRPO, or SFT on the model's own accepted samples.
    BranchSft,
    BranchRl,
    BranchOnPolicy,
    /// SFT on one task alone (the transfer matrix).
    Transfer,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Rl => "rl",
            Method::BranchSft => "branch-sft",
            Method::BranchRl => "branch-rl",
            Method::BranchOnPolicy => "branch-onpolicy",
            Method::Transfer => "transfer",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub name: String,
    pub method: Method,
    /// The run's settings as trained (learning rate, steps, mix, β, group size, ...).
    pub settings: serde_json::Value,
    /// The model it started from: "base", an SFT run's name, or "NAME@STEP" for the branch point.
    pub start: String,
    pub trained_tasks: Vec<String>,
    /// The evaluated checkpoints, by step; the first is the starting model (step 0 of this run).
    pub points: Vec<Scores>,
    /// Every step's metrics line (loss, lr, reward, KL, entropy, clip fraction, ... as the trainer reports them).
    pub curve: Vec<serde_json::Value>,
    pub train_seconds: f64,
}

/// One checkpoint's evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scores {
    pub step: u64,
    /// Held-out loss over a fixed sample of the validation split, divided by the bytes of exactly the tokens
    /// predicted (`text_tokens` of them, `text_bytes` bytes).
    pub bits_per_byte: f64,
    pub nats_per_token: f64,
    pub text_tokens: usize,
    pub text_bytes: usize,
    /// Per task: each prompt's greedy correctness, sampled correct counts, and the evaluation-time entropy.
    pub tasks: BTreeMap<String, PromptScores>,
    pub kl_base_model_task_nats: f64,
    pub kl_base_model_text_nats: f64,
    /// KL(start ‖ π) from the run's starting model, on the starting model's samples (absent for SFT from base,
    /// where it equals the base KL).
    pub kl_start_model_task_nats: Option<f64>,
    pub kl_start_model_text_nats: Option<f64>,
}

impl Scores {
    /// Mean greedy accuracy over `tasks`.
    pub fn accuracy(&self, tasks: &[&str]) -> f64 {
        let accs: Vec<f64> = tasks.iter().filter_map(|t| self.tasks.get(*t)).map(|s| s.accuracy()).collect();
        accs.iter().sum::<f64>() / accs.len().max(1) as f64
    }
}
