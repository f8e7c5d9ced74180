//! The driver's schedule (evaluations, metrics lines, checkpoints) on a real tiny trainer, and the run lock.

use std::sync::Arc;

use super::*;
use crate::arch::Model;
use crate::checkpoint::load_checkpoint;
use crate::train::pretrain::{TrainConfig, Trainer};
use crate::ModelConfig;

fn scratch(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("kiln-driver-{tag}-{}-{nanos}", std::process::id()))
}

fn trainer(steps: u64) -> Trainer<'static> {
    let gpu = kiln_engine::testing::gpu();
    let config = ModelConfig::gpt2(37, 16, 1, 2, 16);
    let tokens: Arc<Vec<u32>> = Arc::new((0..2000).map(|i| (i * 7 % 37) as u32).collect());
    let cfg = TrainConfig { steps, batch: 2, seq_len: 16, ..TrainConfig::default() };
    Trainer::new(gpu, Model::new(gpu, &config, 1).unwrap(), cfg, tokens).unwrap()
}

#[derive(Default)]
struct Recorder {
    started: Vec<(u64, u64)>,
    updates: Vec<(u64, String)>,
    finished: usize,
}

impl Progress for Recorder {
    fn start(&mut self, at: u64, total: u64) {
        self.started.push((at, total));
    }
    fn update(&mut self, step: u64, message: &str) {
        self.updates.push((step, message.to_string()));
    }
    fn finish(&mut self) {
        self.finished += 1;
    }
}

#[test]
fn evaluates_writes_metrics_and_checkpoints_on_the_schedule() {
    let dir = scratch("schedule");
    let mut tr = trainer(5);
    let mut evaluated_at = Vec::new();
    let mut eval = |m: &Model| -> Result<Evaluation> {
        evaluated_at.push(m.config.n_layer);
        let mut fields = serde_json::Map::new();
        fields.insert("val_loss".into(), serde_json::json!(1.5));
        Ok(Evaluation { fields, summary: "val 1.5".into() })
    };
    let mut out = RunDir::open(&dir, Some("{}".into())).unwrap();
    let mut progress = Recorder::default();
    let schedule = Schedule { eval_every: 2, ckpt_every: 3 };
    // Stop at 4 first (as the study does between snapshots), then run to the end.
    let last = drive(&mut tr, 4, schedule, Some(&mut eval), Some(&mut out), &mut progress).unwrap();
    assert!(last.is_some());
    assert_eq!(load_checkpoint(&out.checkpoint_dir()).unwrap().state.unwrap().step, 3);
    drive(&mut tr, u64::MAX, schedule, Some(&mut eval), Some(&mut out), &mut progress).unwrap();
    assert_eq!(evaluated_at.len(), 3, "evaluations at steps 2, 4 and the last, 5");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    let with_eval: Vec<u64> =
        lines.iter().filter(|l| l.get("val_loss").is_some()).map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(with_eval, [2, 4, 5]);
    assert_eq!(load_checkpoint(&out.checkpoint_dir()).unwrap().state.unwrap().step, 5, "the last step is saved");
    assert_eq!(progress.started, [(0, 5), (4, 5)]);
    assert_eq!(progress.finished, 2);
    assert!(progress.updates[0].1.starts_with("loss ") && !progress.updates[0].1.contains("val"));
    assert!(progress.updates[1].1.ends_with("| val 1.5"), "{:?}", progress.updates[1]);
    drop(out);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_run_into_a_live_runs_directory_is_refused_naming_it() {
    let dir = scratch("lock");
    let first = RunDir::open(&dir, None).unwrap();
    let e = RunDir::open(&dir, None).err().expect("the directory is taken");
    let msg = e.to_string();
    assert!(matches!(e, ModelError::RunDirBusy { .. }), "{msg}");
    assert!(msg.contains(&format!("pid {}", std::process::id())) && msg.contains("in use"), "{msg}");
    drop(first);
    // The lock goes with its holder: the directory is free again, and metrics append to what is there.
    let again = RunDir::open(&dir, None).unwrap();
    assert_eq!(again.path(), dir.as_path());
    drop(again);
    let _ = std::fs::remove_dir_all(&dir);
}
