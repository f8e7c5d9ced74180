//! Data-parallel training under `mpirun -np 2` on one machine (both ranks on lavapipe): the same losses as one
//! process accumulating over the same global batch, ZeRO-1 the same again, RL across ranks, exact resume on two
//! ranks, and a killed rank ending the whole job quickly with the last checkpoint intact. Built only with
//! `--features mpi` (`.ci/run` runs it; `tools/setup.sh --mpi` installs Open MPI).
#![cfg(feature = "mpi")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// `mpirun -np 2` with what a root CI container needs: running as root allowed, shared-memory transport without
/// the ptrace-based single copy that containers forbid, and no binding (two ranks share two cores with lavapipe's
/// threads).
fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--bind-to", "none", "-np", &ranks.to_string(), KILN])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl", "self,vader")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

fn run<S: AsRef<std::ffi::OsStr>>(mut c: Command, args: &[S]) -> (bool, String) {
    let out = c.args(args).output().expect("mpirun runs (install Open MPI with tools/setup.sh --mpi)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn ok<S: AsRef<std::ffi::OsStr>>(c: Command, args: &[S]) -> String {
    let (success, text) = run(c, args);
    let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    assert!(success, "{} failed:\n{text}", shown.join(" "));
    text
}

fn alone() -> Command {
    Command::new(KILN)
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-mpi-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Prepared shards of a small synthetic corpus with the chat tokens (for SFT and RL).
fn data(dir: &Path) -> PathBuf {
    let words = ["apple", "river", "stone", "king", "moon", "star", "rose", "wind", "fire", "gold"];
    let mut text = String::new();
    for i in 0..4000u32 {
        let w = words[(i as usize * 7) % words.len()];
        text += &format!("the {w} count {} and {}+{}={}\n", i % 10, i % 97, i % 13, i % 97 + i % 13);
    }
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    let out = dir.join("data");
    ok(alone(), &["prepare", "--input", &s(&dir.join("corpus.txt")), "--out", &s(&out), "--vocab", "300"]);
    out
}

/// Every line of a metrics.jsonl.
fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// (loss, grad_norm) of every step in a metrics.jsonl, with the step's comm record if any.
fn steps(path: &Path) -> Vec<(f64, f64, Option<serde_json::Value>)> {
    let row =
        |v: &serde_json::Value| (v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap(), v.get("comm").cloned());
    metrics(path).iter().map(row).collect()
}

/// A constant learning rate after one warmup step, so a run cut short and resumed follows the same schedule.
fn pretrain_args(data: &str, out: &Path, steps: &str, accum: &str) -> Vec<String> {
    let out = s(out);
    let mut v: Vec<String> =
        ["pretrain", "--data", data, "--out", &out, "--steps", steps, "--grad-accum", accum].map(String::from).to_vec();
    let fixed = "--batch 2 --seq-len 32 --warmup 1 --lr 2e-3 --min-lr 2e-3 --eval-every 1000 --ckpt-every 2";
    v.extend(fixed.split(' ').map(String::from));
    v
}

/// Losses and gradient norms of two runs agree step by step within 1e-4 (relative): the sum over ranks adds the same terms in
/// another order than one process's accumulation, so bits may differ, values may not.
fn assert_same(a: &[(f64, f64, Option<serde_json::Value>)], b: &[(f64, f64, Option<serde_json::Value>)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let close = |p: f64, q: f64| (p - q).abs() <= 1e-4 * p.abs().max(1.0);
        assert!(close(x.0, y.0) && close(x.1, y.1), "{what}: step {} loss/norm {:?} vs {:?}", i + 1, x, y);
    }
}

#[test]
fn two_ranks_train_like_one_process_accumulating_the_same_batch() {
    let dir = scratch("equal");
    let data = s(&data(&dir));
    let one = dir.join("one");
    ok(alone(), &pretrain_args(&data, &one, "4", "2"));
    let two = dir.join("two");
    // Small buckets, so the gradients go in several all-reduces that start during the backward.
    let mut args = pretrain_args(&data, &two, "4", "1");
    args.extend(["--bucket-mib".into(), "0.1".into()]);
    let text = ok(mpirun(2), &args);
    assert!(text.contains("× 2 ranks"), "{text}");
    assert_eq!(text.matches("pretrain: final validation loss").count(), 1, "only rank 0 prints:\n{text}");
    let (a, b) = (steps(&one.join("metrics.jsonl")), steps(&two.join("metrics.jsonl")));
    assert_same(&a, &b, "2 ranks vs 1 process with --grad-accum 2");
    let comm = b[0].2.as_ref().expect("data-parallel steps report their communication");
    assert!(comm["buckets"].as_u64().unwrap() > 1 && comm["bytes"].as_u64().unwrap() > 0, "{comm}");
    assert!(a[0].2.is_none());
    // Every checkpoint passed the replica check (a mismatch is an error); rank 0's files are the usual ones.
    assert!(two.join("checkpoint").join("model.safetensors").exists());

    // ZeRO-1: the same losses, half the optimizer memory per rank.
    let zero = dir.join("zero");
    let mut args = pretrain_args(&data, &zero, "4", "1");
    args.extend(["--zero".into(), "1".into()]);
    ok(mpirun(2), &args);
    assert_same(&a, &steps(&zero.join("metrics.jsonl")), "ZeRO-1 vs 1 process");
    let optimizer =
        |p: &Path| metrics(&p.join("metrics.jsonl")).last().unwrap()["memory"]["optimizer"].as_u64().unwrap();
    assert!(optimizer(&zero) * 10 < optimizer(&two) * 6, "{} vs {}", optimizer(&zero), optimizer(&two));

    // A resumed two-rank run continues exactly where a straight one went (checkpoint at step 2, then 2 more).
    let cut = dir.join("cut");
    ok(mpirun(2), &pretrain_args(&data, &cut, "2", "1"));
    let mut args = pretrain_args(&data, &cut, "4", "1");
    args.push("--resume".into());
    ok(mpirun(2), &args);
    let straight = dir.join("straight");
    ok(mpirun(2), &pretrain_args(&data, &straight, "4", "1"));
    let (c, t) = (steps(&cut.join("metrics.jsonl")), steps(&straight.join("metrics.jsonl")));
    assert_eq!(c.len(), 4);
    for (x, y) in c.iter().zip(&t) {
        assert_eq!((x.0, x.1), (y.0, y.1), "resume on 2 ranks is exact");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rl_and_sft_train_across_two_ranks() {
    let dir = scratch("post");
    let data = s(&data(&dir));
    let pre = dir.join("pre");
    ok(alone(), &pretrain_args(&data, &pre, "2", "1"));
    let init = s(&pre.join("checkpoint"));
    let sft = dir.join("sft");
    let sft_args = [
        "sft",
        "--init",
        &init,
        "--out",
        &s(&sft),
        "--task",
        "addition:1",
        "--examples",
        "64",
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--eval-examples",
        "2",
    ];
    let text = ok(mpirun(2), &sft_args);
    assert!(text.contains("sft: done"), "{text}");
    let rl = dir.join("rl");
    let rl_args = [
        "rl",
        "--init",
        &s(&sft.join("checkpoint")),
        "--out",
        &s(&rl),
        "--task",
        "addition:1",
        "--examples",
        "64",
        "--steps",
        "2",
        "--prompts",
        "2",
        "--group",
        "3",
        "--max-new-tokens",
        "4",
        "--eval-examples",
        "2",
        "--zero",
        "1",
    ];
    let text = ok(mpirun(2), &rl_args);
    assert!(text.contains("rl: done") && text.contains("2 prompts × 2 ranks (ZeRO-1) × 3 samples"), "{text}");
    let lines = metrics(&rl.join("metrics.jsonl"));
    assert_eq!(lines.len(), 2, "rank 0 alone writes the metrics");
    for m in &lines {
        // 2 ranks × 2 prompts × 3 samples: fractions of 12 completions and of 4 groups.
        let reward = m["mean_reward"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&reward) && m["grad_norm"].as_f64().unwrap().is_finite(), "{m}");
        assert!(m["comm"]["bytes"].as_u64().unwrap() > 0, "{m}");
        let groups = m["equal_reward_groups"].as_f64().unwrap() * 4.0;
        assert!((groups - groups.round()).abs() < 1e-9, "{m}");
    }
    assert!(rl.join("checkpoint").join("model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_rank_ends_the_job_quickly_and_the_last_checkpoint_survives() {
    let dir = scratch("kill");
    let data = s(&data(&dir));
    let out = dir.join("run");
    let mut args = pretrain_args(&data, &out, "100000", "1");
    let every = args.iter().position(|a| a == "--ckpt-every").unwrap() + 1;
    args[every] = "1".into();
    let mut child = mpirun(2).args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Anywhere in the line: mpirun may put another rank's output before it.
            if let Some((_, rest)) = line.split_once("rank 1 of 2 (pid ") {
                if let Some(Ok(pid)) = rest.split(')').next().map(str::parse::<u32>) {
                    let _ = tx.send(pid);
                }
            }
            all += &line;
            all.push('\n');
        }
        all
    });
    let pid = rx.recv_timeout(Duration::from_secs(300)).expect("rank 1 announces its pid");
    // Let a checkpoint land, then kill rank 1 as the OOM killer or a lost node would.
    let metrics = out.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        assert!(Instant::now() < deadline, "no training steps within 5 minutes");
        std::thread::sleep(Duration::from_millis(200));
    }
    let killed = Instant::now();
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the job still runs a minute after rank 1 died: it hangs");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = reader.join().unwrap();
    assert!(!status.success(), "the job must fail when a rank dies:\n{text}");
    assert!(text.contains("rank 1") || text.contains("signal 9"), "mpirun names the dead rank:\n{text}");
    // The checkpoint rank 0 wrote last is whole: it loads and generates.
    let ckpt = s(&out.join("checkpoint"));
    let (success, text) = run(alone(), &["generate", "--checkpoint", &ckpt, "--max-tokens", "3", "--prompt", "the"]);
    assert!(success, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_error_on_a_rank_stops_every_rank_with_its_message() {
    // `kiln eval` does not train data-parallel: each rank refuses, and the job ends (no rank waits forever).
    let dir = scratch("error");
    let started = Instant::now();
    let (success, text) = run(mpirun(2), &["eval", "--checkpoint", &s(&dir), "--text", &s(&dir)]);
    assert!(!success, "{text}");
    assert!(text.contains("of 2: ") && text.contains("runs in one process"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);
}
