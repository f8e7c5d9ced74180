//! The fixed evaluation suite of one seed, run on every checkpoint: each task's enumerated evaluation set (trained,
//! length-shifted and held-out tasks), a fixed sample of held-out text for bits/byte, and the positions KL is
//! measured on (task prompts continued by the reference model's own samples, and held-out text).

use std::collections::BTreeMap;

use anyhow::Result;
use kiln_engine::Gpu;
use kiln_model::arch::Model;
use kiln_model::data::chat::ChatTokens;
use kiln_model::data::tasks::{Example, Task};
use kiln_model::data::tokenizer::Tokenizer;
use kiln_model::eval::evaluate::{
    bits_per_byte, chat_prompts, continuation_rows, few_shot_greedy, mean_kl, score_prompts, TEMPERATURE_1,
};
use kiln_model::eval::generate::{rollouts, GenerateConfig};
use kiln_model::eval::stats::majority_answer;

use super::plan::Plan;
use super::record::{Role, Scores, TaskInfo};

/// Token rows and, per row, which positions are counted.
pub struct KlRows {
    rows: Vec<Vec<u32>>,
    counted: Vec<Vec<bool>>,
}

pub struct EvalTask {
    pub name: String,
    pub role: Role,
    pub examples: Vec<Example>,
}

/// The evaluated tasks: the trained ones, their length-shifted variants, the held-out families (each once).
pub fn eval_tasks(plan: &Plan) -> Result<Vec<EvalTask>> {
    let mut out: Vec<EvalTask> = Vec::new();
    let mut add = |task: Task, role: Role| {
        if !out.iter().any(|t| t.name == task.name()) {
            out.push(EvalTask { name: task.name(), role, examples: task.eval_set(plan.eval.prompts) });
        }
    };
    let trained = plan.tasks.iter().map(|t| Task::parse(t)).collect::<Result<Vec<_>, _>>()?;
    for &t in &trained {
        add(t, Role::Trained);
    }
    if plan.shifted {
        for &t in &trained {
            match t.shifted() {
                Some(s) => add(s, Role::Shifted),
                None => crate::progress::say(&format!("  {}: already at its longest, no shifted variant", t.name())),
            }
        }
    }
    for t in &plan.held_out {
        add(Task::parse(t)?, Role::HeldOut);
    }
    Ok(out)
}

pub fn task_infos(tasks: &[EvalTask]) -> BTreeMap<String, TaskInfo> {
    tasks
        .iter()
        .map(|t| {
            let answers: Vec<String> = t.examples.iter().map(|e| e.answer.clone()).collect();
            let (majority_answer, chance) = majority_answer(&answers);
            (t.name.clone(), TaskInfo { role: t.role, prompts: t.examples.len(), majority_answer, chance })
        })
        .collect()
}

pub struct Suite<'a> {
    gpu: &'a Gpu,
    tok: &'a Tokenizer,
    plan: &'a Plan,
    pub tasks: Vec<EvalTask>,
    val_sample: Vec<u32>,
    text: KlRows,
    base: &'a Model,
    base_rows: KlRows,
}

impl<'a> Suite<'a> {
    pub fn new(gpu: &'a Gpu, base: &'a Model, tok: &'a Tokenizer, plan: &'a Plan, val: &[u32]) -> Result<Suite<'a>> {
        let t = base.config.n_ctx;
        let windows: Vec<Vec<u32>> =
            val.chunks(t + 1).filter(|c| c.len() == t + 1).take(plan.eval.text_windows).map(|c| c.to_vec()).collect();
        if windows.is_empty() {
            anyhow::bail!("the validation split has fewer than n_ctx + 1 = {} tokens", t + 1);
        }
        // The windows laid end to end: the fixed sample bits/byte is measured on, every token after the first
        // predicted once.
        let val_sample: Vec<u32> = val[..(windows.len() * (t + 1)).min(val.len())].to_vec();
        let text = KlRows { counted: windows.iter().map(|r| vec![true; r.len()]).collect(), rows: windows };
        let tasks = eval_tasks(plan)?;
        let mut suite = Suite { gpu, tok, plan, tasks, val_sample, text, base, base_rows: KlRows::empty() };
        suite.base_rows = suite.sampled_rows(base)?;
        Ok(suite)
    }

    /// Each trained task's first `kl_prompts` evaluation prompts continued by `model`'s own samples (temperature
    /// 1), the continuation positions counted: the rows on which KL(model ‖ π) is the sequence-level KL per token.
    pub fn sampled_rows(&self, model: &Model) -> Result<KlRows> {
        let ct = ChatTokens::from_tokenizer(self.tok)?;
        let mut out = KlRows::empty();
        for t in self.tasks.iter().filter(|t| t.role == Role::Trained) {
            let ex = &t.examples[..self.plan.eval.kl_prompts.min(t.examples.len())];
            let prompts = chat_prompts(self.tok, ct, ex, model.config.n_ctx)?;
            let cfg = GenerateConfig {
                max_new_tokens: self.plan.eval.max_new_tokens,
                sampling: TEMPERATURE_1,
                seed: 5,
                stop_token: Some(ct.end),
                vocab_limit: Some(self.tok.vocab_size()),
            };
            let outs = rollouts(self.gpu, model, &prompts, 1, &cfg, |_, _, _| {})?;
            let (rows, counted) =
                continuation_rows(prompts.iter().zip(&outs).map(|(p, group)| (&p[..], &group[0].tokens[..])));
            out.rows.extend(rows);
            out.counted.extend(counted);
        }
        Ok(out)
    }

    /// Score one checkpoint; `start` is the run's starting model with its own sampled rows (KL(start ‖ π)).
    pub fn score(&self, model: &Model, start: Option<(&Model, &KlRows)>, step: u64) -> Result<Scores> {
        let (gpu, e) = (self.gpu, &self.plan.eval);
        let t = model.config.n_ctx;
        let text = bits_per_byte(gpu, model, self.tok, &self.val_sample, 8, t)?;
        let mut tasks = BTreeMap::new();
        for task in &self.tasks {
            // Sampling (pass@k, reward, entropy) on trained tasks; greedy accuracy everywhere.
            let sampled = if task.role == Role::Trained { e.sampled_prompts } else { 0 };
            let s = score_prompts(gpu, model, self.tok, &task.examples, sampled, e.samples, e.max_new_tokens, 42)?;
            tasks.insert(task.name.clone(), s);
        }
        let kl = |reference: &Model, rows: &KlRows| mean_kl(gpu, reference, model, &rows.rows, &rows.counted, 8);
        Ok(Scores {
            step,
            bits_per_byte: text.bits_per_byte,
            nats_per_token: text.nats_per_token,
            text_tokens: text.tokens,
            text_bytes: text.bytes,
            tasks,
            kl_base_model_task_nats: kl(self.base, &self.base_rows)?,
            kl_base_model_text_nats: kl(self.base, &self.text)?,
            kl_start_model_task_nats: start.map(|(m, rows)| kl(m, rows)).transpose()?,
            kl_start_model_text_nats: start.map(|(m, _)| kl(m, &self.text)).transpose()?,
        })
    }

    /// The base model prompted few-shot in plain text: per task, greedy correctness per prompt. The shots are
    /// training-split examples, so no evaluated prompt is shown its own answer.
    pub fn few_shot(&self, model: &Model) -> Result<BTreeMap<String, Vec<f64>>> {
        let mut out = BTreeMap::new();
        if self.plan.eval.few_shot == 0 {
            return Ok(out);
        }
        for task in &self.tasks {
            let shots =
                Task::parse(&task.name)?.examples(kiln_model::data::tasks::Split::Train, self.plan.eval.few_shot, 3);
            let r = few_shot_greedy(self.gpu, model, self.tok, &task.examples, &shots, self.plan.eval.max_new_tokens)?;
            out.insert(task.name.clone(), r);
        }
        Ok(out)
    }
}

impl KlRows {
    fn empty() -> KlRows {
        KlRows { rows: Vec::new(), counted: Vec::new() }
    }
}
