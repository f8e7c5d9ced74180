//! The training loop, once. Every stage (pretraining, SFT, RL) and every caller (the `kiln` commands, the study)
//! runs its steps through [`drive`]: step, evaluate on the schedule, append the metrics line, checkpoint on the
//! schedule, report progress. A stage only says how to take one step and what a checkpoint of it holds.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::arch::Model;
use crate::checkpoint::{save_checkpoint, Checkpoint};
use crate::error::{io_err, ModelError, Result};

/// What one step reports: the metrics line (a JSON object) and a one-line progress message.
pub struct StepReport {
    pub step: u64,
    pub metrics: serde_json::Value,
    pub message: String,
}

/// A training stage the driver can run.
pub trait Stage {
    /// Steps taken so far (a resumed run starts past 0).
    fn step_count(&self) -> u64;
    /// The run's length in steps.
    fn total_steps(&self) -> u64;
    fn step(&mut self) -> Result<StepReport>;
    /// The model being trained (what evaluation scores).
    fn model(&self) -> &Model;
    /// Everything needed to resume exactly. In a data-parallel job it is a collective: every rank calls it.
    fn checkpoint(&self, tokenizer_json: Option<String>) -> Result<Checkpoint>;
    /// Ranks of the data-parallel job the stage trains in (1 alone).
    fn ranks(&self) -> usize {
        1
    }
}

/// An evaluation's result: fields for the metrics line and a short summary for the progress line.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    pub fields: serde_json::Map<String, serde_json::Value>,
    pub summary: String,
}

/// Scores the model between steps.
pub type Evaluate<'e> = dyn FnMut(&Model) -> Result<Evaluation> + 'e;

/// When the driver evaluates and checkpoints: every so many steps, and always at the run's last step.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub eval_every: u64,
    pub ckpt_every: u64,
}

/// Where progress is shown (an indicatif bar in the CLI, nothing in tests).
pub trait Progress {
    fn start(&mut self, _at: u64, _total: u64) {}
    fn update(&mut self, _step: u64, _message: &str) {}
    fn finish(&mut self) {}
}

/// No progress display.
pub struct Quiet;
impl Progress for Quiet {}

/// A run's output directory, held for the run's lifetime: an advisory lock on OUT/run.lock (released by the OS
/// however the process ends) naming the owning process, OUT/metrics.jsonl opened for appending, and OUT/checkpoint.
pub struct RunDir {
    dir: PathBuf,
    metrics: File,
    tokenizer_json: Option<String>,
    _lock: File,
}

/// The lock file's name inside a run directory.
pub const LOCK_FILE: &str = "run.lock";

impl RunDir {
    /// Take `dir` for this process (created if missing). Refused, naming the other process, while another live
    /// run holds it: two runs appending to one metrics.jsonl and overwriting one checkpoint would corrupt both.
    pub fn open(dir: &Path, tokenizer_json: Option<String>) -> Result<RunDir> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut owner = String::new();
                let _ = lock.read_to_string(&mut owner);
                let owner = owner.trim();
                let owner = if owner.is_empty() { "owner unknown".to_string() } else { owner.to_string() };
                return Err(ModelError::RunDirBusy { dir: dir.to_path_buf(), owner });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let command: Vec<String> = std::env::args().collect();
        let note = format!("pid {}: {}\n", std::process::id(), command.join(" "));
        lock.set_len(0)
            .and_then(|()| lock.seek(SeekFrom::Start(0)))
            .and_then(|_| lock.write_all(note.as_bytes()))
            .and_then(|()| lock.sync_all())
            .map_err(io_err(&lock_path))?;
        let metrics_path = dir.join("metrics.jsonl");
        let metrics =
            OpenOptions::new().create(true).append(true).open(&metrics_path).map_err(io_err(&metrics_path))?;
        Ok(RunDir { dir: dir.to_path_buf(), metrics, tokenizer_json, _lock: lock })
    }

    /// The tokenizer.json every checkpoint of this run carries (known once the starting checkpoint is read).
    pub fn set_tokenizer(&mut self, tokenizer_json: Option<String>) {
        self.tokenizer_json = tokenizer_json;
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn append(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.metrics, "{record}").map_err(io_err(self.dir.join("metrics.jsonl")))
    }

    /// Write the stage's checkpoint to OUT/checkpoint (atomically: see `save_checkpoint`).
    pub fn save(&self, stage: &dyn Stage) -> Result<()> {
        save_checkpoint(&self.checkpoint_dir(), &stage.checkpoint(self.tokenizer_json.clone())?)
    }
}

/// Run `stage` until it has taken `until` steps (at most its total). Evaluates every `eval_every` steps and at
/// the last step of the run, writes every step's metrics (with the evaluation's fields) and checkpoints every
/// `ckpt_every` steps and at the last step when `out` is given. Returns the last evaluation, if any ran. In a
/// data-parallel job every rank runs it; only rank 0 passes `out` (and an evaluation and a progress display).
pub fn drive(
    stage: &mut dyn Stage,
    until: u64,
    schedule: Schedule,
    mut evaluate: Option<&mut Evaluate>,
    mut out: Option<&mut RunDir>,
    progress: &mut dyn Progress,
) -> Result<Option<Evaluation>> {
    let total = stage.total_steps();
    let until = until.min(total);
    let (eval_every, ckpt_every) = (schedule.eval_every.max(1), schedule.ckpt_every.max(1));
    progress.start(stage.step_count(), total);
    let mut last: Option<Evaluation> = None;
    while stage.step_count() < until {
        let r = stage.step()?;
        let mut record = r.metrics;
        if let Some(eval) = evaluate.as_deref_mut().filter(|_| r.step % eval_every == 0 || r.step == total) {
            let e = eval(stage.model())?;
            if let Some(obj) = record.as_object_mut() {
                obj.extend(e.fields.clone());
            }
            last = Some(e);
        }
        let at_checkpoint = r.step % ckpt_every == 0 || r.step == total;
        if let Some(out) = out.as_deref_mut() {
            out.append(&record)?;
            if at_checkpoint {
                out.save(stage)?;
            }
        } else if at_checkpoint && stage.ranks() > 1 {
            // A rank that writes nothing still takes its part in the checkpoint's collectives (the replica
            // check, gathering sharded moments) while rank 0 writes.
            stage.checkpoint(None)?;
        }
        let summary = last.as_ref().map(|e| e.summary.as_str()).unwrap_or("");
        let message = if summary.is_empty() { r.message } else { format!("{} | {summary}", r.message) };
        progress.update(r.step, &message);
    }
    progress.finish();
    Ok(last)
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
