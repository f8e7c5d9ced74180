//! The `kiln` binary end to end on a small corpus: prepare → pretrain → sft → rl → study, each step's files, and
//! the post-training commands' errors on bad input (a malformed JSONL line, a tokenizer without chat tokens).

use std::path::{Path, PathBuf};
use std::process::Command;

fn kiln(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("the kiln binary runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn ok(args: &[&str]) -> String {
    let (success, text) = kiln(args);
    assert!(success, "kiln {} failed:\n{text}", args.join(" "));
    text
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// ~120 kB of text with words, digits and arithmetic, so the tasks' characters are all in the vocabulary.
fn corpus(dir: &Path) -> PathBuf {
    let words = ["apple", "river", "stone", "king", "moon", "star", "rose", "wind", "fire", "gold", "tree", "sea"];
    let mut text = String::new();
    for i in 0..6000u32 {
        let w = words[(i as usize * 7) % words.len()];
        text += &format!("the {w} count {} and {}+{}={}\n", i % 10, i % 97, i % 13, i % 97 + i % 13);
    }
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn prepare_pretrain_sft_rl_study_end_to_end() {
    let dir = scratch("pipeline");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let data = dir.join("data");
    ok(&["prepare", "--input", &s(&corpus(&dir)), "--out", &s(&data), "--vocab", "320"]);
    let pre = dir.join("pre");
    ok(&["pretrain", "--data", &s(&data), "--out", &s(&pre), "--steps", "3", "--batch", "2", "--seq-len", "64"]);
    let init = s(&pre.join("checkpoint"));

    // A malformed JSONL line is named, and nothing is written.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\":\"1+1=\",\"response\":\"2\"}\n{\"prompt\":\"x\"}\n").unwrap();
    let sft = dir.join("sft");
    let (success, text) = kiln(&["sft", "--init", &init, "--out", &s(&sft), "--data", &s(&bad), "--steps", "2"]);
    assert!(!success && text.contains("bad.jsonl:2"), "{text}");
    assert!(!sft.join("checkpoint").exists());

    let text = ok(&[
        "sft",
        "--init",
        &init,
        "--out",
        &s(&sft),
        "--task",
        "addition:1",
        "--steps",
        "4",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--eval-every",
        "2",
        "--eval-examples",
        "3",
        "--pretrain-data",
        &s(&data),
        "--mix-pretrain",
        "0.25",
    ]);
    assert!(text.contains("sft: done"), "{text}");
    let metrics = std::fs::read_to_string(sft.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
    assert!(metrics.lines().nth(1).unwrap().contains("\"accuracy\""), "{metrics}");
    assert!(sft.join("checkpoint/model.safetensors").exists());

    let rl = dir.join("rl");
    let text = ok(&[
        "rl",
        "--init",
        &s(&sft.join("checkpoint")),
        "--out",
        &s(&rl),
        "--task",
        "addition:1",
        "--steps",
        "2",
        "--prompts",
        "2",
        "--group",
        "3",
        "--max-new-tokens",
        "3",
        "--eval-every",
        "2",
        "--eval-examples",
        "3",
    ]);
    assert!(text.contains("rl: done"), "{text}");
    let metrics = std::fs::read_to_string(rl.join("metrics.jsonl")).unwrap();
    for key in ["mean_reward", "kl", "clip_fraction", "entropy", "equal_reward_groups", "grad_norm", "eval_accuracy"] {
        assert!(metrics.contains(key), "{key} missing from {metrics}");
    }
    // Resume continues at step 3.
    ok(&[
        "rl",
        "--init",
        &s(&sft.join("checkpoint")),
        "--out",
        &s(&rl),
        "--task",
        "addition:1",
        "--steps",
        "3",
        "--prompts",
        "2",
        "--group",
        "3",
        "--max-new-tokens",
        "3",
        "--resume",
    ]);
    assert!(std::fs::read_to_string(rl.join("metrics.jsonl")).unwrap().lines().last().unwrap().contains("\"step\":3"));

    let study = dir.join("study");
    let args = [
        "study",
        "--out",
        &s(&study),
        "--data",
        &s(&data),
        "--quick",
        "--task",
        "addition:1",
        "--task",
        "count",
        "--pretrain-steps",
        "2",
        "--sft-steps",
        "2",
        "--rl-steps",
        "2",
        "--eval-prompts",
        "3",
        "--samples",
        "4",
        "--set",
        "rl.0.beta=[0.04, 0.0]",
        "--set",
        "transfer.enabled=true",
    ];
    let text = ok(&args);
    assert!(text.contains("Δ bits/byte") && text.contains("KL(base‖π) nats/tok"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("study.json")).unwrap()).unwrap();
    let runs: Vec<&str> =
        json["seeds"][0]["runs"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    for r in
        ["sft", "rl[beta=0.04]", "rl[beta=0]", "branch-sft", "branch-rl", "transfer[addition:1]", "transfer[count]"]
    {
        assert!(runs.contains(&r), "{r} missing: {runs:?}");
    }
    let base = &json["seeds"][0]["base"];
    assert_eq!(base["kl_base_model_text_nats"].as_f64().unwrap(), 0.0, "the base model's KL from itself is exactly 0");
    assert!(base["bits_per_byte"].as_f64().unwrap() > 0.0);
    assert_eq!(json["plan"]["pretrain"]["steps"].as_u64(), Some(2), "the record holds the plan as run");
    let md = std::fs::read_to_string(study.join("study.md")).unwrap();
    assert!(md.contains("## Transfer matrix") && md.contains("## What the numbers support"), "{md}");
    assert!(std::fs::metadata(study.join("frontier_bpb.png")).unwrap().len() > 1000);
    // Run again: every run is already finished, so nothing trains, and the report is the same.
    let again = ok(&args);
    assert!(again.contains("finished earlier") && !again.contains("pretrain:"), "{again}");
    assert_eq!(std::fs::read_to_string(study.join("study.md")).unwrap(), md);
    // Another plan into the same directory is refused; --report redraws without training.
    let (success, other) = kiln(&[&args[..], &["--set", "eval.samples=2"]].concat());
    assert!(!success && other.contains("different plan"), "{other}");
    assert!(ok(&["study", "--report", &s(&study)]).contains("redrawn"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sft_adds_chat_tokens_to_a_tokenizer_without_them() {
    let dir = scratch("nochat");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let tok = kiln_model::data::tokenizer::Tokenizer::train(&"the king 1+2=3\n".repeat(300), 280, &["<|endoftext|>"])
        .unwrap();
    let tok_path = dir.join("plain.json");
    tok.save(&tok_path).unwrap();
    let data = dir.join("data");
    ok(&["prepare", "--input", &s(&corpus(&dir)), "--out", &s(&data), "--tokenizer", &s(&tok_path)]);
    let pre = dir.join("pre");
    ok(&["pretrain", "--data", &s(&data), "--out", &s(&pre), "--steps", "1", "--batch", "1", "--seq-len", "16"]);
    let sft = dir.join("sft");
    let args = ["--task", "count", "--steps", "2", "--batch", "2", "--seq-len", "32", "--eval-examples", "2"];
    let text = ok(&[&["sft", "--init", &s(&pre.join("checkpoint")), "--out", &s(&sft)][..], &args].concat());
    assert!(text.contains("added the chat tokens <|user|> <|assistant|> <|end|>"), "{text}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sft.join("checkpoint/config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"].as_u64().unwrap() as usize, tok.vocab_size() + 3);
    let saved = kiln_model::data::tokenizer::Tokenizer::from_file(&sft.join("checkpoint/tokenizer.json")).unwrap();
    assert!(saved.token_id("<|assistant|>").is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn llama_tiny_runs_every_command() {
    let dir = scratch("llama");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let data = dir.join("data");
    ok(&["prepare", "--input", &s(&corpus(&dir)), "--out", &s(&data), "--vocab", "320"]);
    let pre = dir.join("pre");
    let small = ["--batch", "2", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "2"];
    let run = |steps: &str, extra: &[&str]| {
        let base = ["pretrain", "--data", &s(&data), "--out", &s(&pre), "--preset", "llama-tiny", "--steps", steps];
        ok(&[&base[..], &small, extra].concat())
    };
    let text = run("2", &[]);
    assert!(text.contains("llama: 2 layers, 4 heads (2 KV)"), "{text}");
    // Resume continues the same run to step 4.
    run("4", &["--resume"]);
    let metrics = std::fs::read_to_string(pre.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "{metrics}");
    let ckpt = pre.join("checkpoint");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["model_type"].as_str(), config["num_key_value_heads"].as_u64()), (Some("llama"), Some(2)));

    let text = ok(&["eval", "--checkpoint", &s(&ckpt), "--text", &s(&dir.join("corpus.txt")), "--seq-len", "32"]);
    assert!(text.contains("nats/token"), "{text}");
    // A text shorter than one window is evaluated whole (the last, partial window counts).
    std::fs::write(dir.join("short.txt"), "the king count 3 and 5+7=12").unwrap();
    let text = ok(&["eval", "--checkpoint", &s(&ckpt), "--text", &s(&dir.join("short.txt"))]);
    assert!(text.contains("in 1 windows of up to 128") && text.contains("loss "), "{text}");
    let text =
        ok(&["generate", "--checkpoint", &s(&ckpt), "--prompt", "the king", "--max-tokens", "8", "--samples", "2"]);
    assert!(text.starts_with("the king") && text.contains("--- sample 1 ---"), "{text}");

    let sft = dir.join("sft");
    let post = ["--task", "addition:1", "--eval-examples", "2", "--eval-every", "2"];
    let sft_args = ["sft", "--init", &s(&ckpt), "--out", &s(&sft), "--steps", "2", "--batch", "2", "--seq-len", "32"];
    assert!(ok(&[&sft_args[..], &post].concat()).contains("sft: done"));
    let rl = dir.join("rl");
    let rl_args = ["rl", "--init", &s(&sft.join("checkpoint")), "--out", &s(&rl), "--steps", "2", "--prompts", "2"];
    let text = ok(&[&rl_args[..], &post, &["--group", "2", "--max-new-tokens", "3"]].concat());
    assert!(text.contains("rl: done"), "{text}");
    assert_eq!(std::fs::read_to_string(rl.join("metrics.jsonl")).unwrap().lines().count(), 2);

    let study = dir.join("study");
    let text = ok(&[
        "study",
        "--arch",
        "llama",
        "--out",
        &s(&study),
        "--data",
        &s(&data),
        "--quick",
        "--task",
        "addition:1",
        "--pretrain-steps",
        "2",
        "--sft-steps",
        "2",
        "--rl-steps",
        "2",
        "--eval-prompts",
        "2",
        "--samples",
        "2",
    ]);
    assert!(text.contains("Δ bits/byte"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_run_into_a_live_runs_directory_is_refused() {
    let dir = scratch("lock");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let data = dir.join("data");
    ok(&["prepare", "--input", &s(&corpus(&dir)), "--out", &s(&data), "--vocab", "300"]);
    let out = dir.join("run");
    let args =
        ["pretrain", "--data", &s(&data), "--out", &s(&out), "--steps", "100000", "--batch", "1", "--seq-len", "16"];
    let mut first = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kiln starts");
    let lock = out.join("run.lock");
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.contains("pid")) {
        assert!(start.elapsed().as_secs() < 60, "the first run never took its directory");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (success, text) = kiln(&args);
    let _ = first.kill();
    let _ = first.wait();
    assert!(!success, "the second run must be refused:\n{text}");
    assert!(text.contains("in use by another Kiln run") && text.contains(&format!("pid {}", first.id())), "{text}");
    // Once the first run is gone, the directory is free.
    ok(&["pretrain", "--data", &s(&data), "--out", &s(&out), "--steps", "1", "--batch", "1", "--seq-len", "16"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// GPT-2 124M (the real shape: 50257 × 768 tied embedding, 12 layers) through every command on whatever adapter
/// runs the tests. On lavapipe its 154 MB embedding exceeds the 128 MiB storage binding; this is the test that it
/// trains (pretrain, SFT, RL), evaluates and generates there anyway. Smallest batches that prove the point.
#[test]
fn gpt2_124m_runs_every_command() {
    let dir = scratch("gpt2-124m");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let data = dir.join("data");
    ok(&["prepare", "--input", &s(&corpus(&dir)), "--out", &s(&data), "--vocab", "320"]);
    // The data's ids are a small subset of the 50257 rows; the table's size is what matters here.
    let toml = dir.join("gpt2-124m.toml");
    std::fs::write(&toml, "vocab_size = 50257\nn_ctx = 1024\nn_layer = 12\nn_head = 12\nn_embd = 768\n").unwrap();
    let pre = dir.join("pre");
    let text = ok(&[
        "pretrain",
        "--data",
        &s(&data),
        "--out",
        &s(&pre),
        "--config",
        &s(&toml),
        "--steps",
        "2",
        "--batch",
        "1",
        "--seq-len",
        "16",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--lr",
        "5e-5",
        "--min-lr",
        "5e-5",
        "--warmup",
        "0",
    ]);
    assert!(text.contains("124439808 parameters"), "{text}");
    let metrics = std::fs::read_to_string(pre.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let mem = &first["memory"];
    assert!(mem["parameters"].as_u64().unwrap() >= 4 * 124_439_808, "{first}");
    assert!(mem["scratch"].as_u64().unwrap() <= 64 << 20, "{first}");
    let ckpt = pre.join("checkpoint");
    std::fs::write(dir.join("short.txt"), "the king count 3 and 5+7=12\nthe moon count 4 and 6+1=7\n").unwrap();
    let text = ok(&["eval", "--checkpoint", &s(&ckpt), "--text", &s(&dir.join("short.txt"))]);
    assert!(text.contains("loss "), "{text}");
    let text = ok(&["generate", "--checkpoint", &s(&ckpt), "--prompt", "the king", "--max-tokens", "3"]);
    assert!(text.starts_with("the king"), "{text}");
    let sft = dir.join("sft");
    let post = ["--task", "addition:1", "--eval-examples", "1", "--eval-every", "1"];
    let sft_args = ["sft", "--init", &s(&ckpt), "--out", &s(&sft), "--steps", "1", "--batch", "1", "--seq-len", "32"];
    assert!(ok(&[&sft_args[..], &post].concat()).contains("sft: done"));
    let rl = dir.join("rl");
    let rl_args = ["rl", "--init", &s(&sft.join("checkpoint")), "--out", &s(&rl), "--steps", "1", "--prompts", "1"];
    let text = ok(&[&rl_args[..], &post, &["--group", "2", "--max-new-tokens", "2", "--recompute", "block"]].concat());
    assert!(text.contains("rl: done"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kiln profile` on a small step: every kernel of the step in the table and the JSON, shares adding up to one,
/// the matmul's FLOPs counted; bad settings are errors.
#[test]
fn profile_reports_every_kernel_of_a_step() {
    let dir = scratch("profile");
    let json = dir.join("profile.json");
    let text = ok(&["profile", "--batch", "2", "--seq-len", "16", "--steps", "1", "--json", json.to_str().unwrap()]);
    assert!(text.contains("peak probes") && text.contains("attention_backward_dkv"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let kernels = v["kernels"].as_array().unwrap();
    let names: Vec<&str> = kernels.iter().map(|k| k["kernel"].as_str().unwrap()).collect();
    // Entry points of either attention design (`attention_forward` or `attention_forward_register`, …).
    for want in ["attention_forward", "attention_backward_dq", "layernorm", "cross_entropy", "adamw", "embedding"] {
        assert!(names.iter().any(|n| n.starts_with(want)), "{want} missing from {names:?}");
    }
    let share: f64 = kernels.iter().map(|k| k["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-6, "shares add up to {share}");
    // Sorted by time, and the matmuls (whatever design ran) declare their FLOPs: 6·params·tokens is a lower bound
    // for forward + backward of the weight products.
    let ms: Vec<f64> = kernels.iter().map(|k| k["ms_per_step"].as_f64().unwrap()).collect();
    assert!(ms.windows(2).all(|w| w[0] >= w[1]), "{ms:?}");
    let matmul_gflop: f64 = kernels
        .iter()
        .filter(|k| k["kernel"].as_str().unwrap().starts_with("matmul"))
        .map(|k| k["gflop_per_step"].as_f64().unwrap())
        .sum();
    let params = v["params"].as_f64().unwrap();
    assert!(matmul_gflop * 1e9 > 0.5 * 6.0 * params * 32.0, "matmul {matmul_gflop} GFLOP for {params} params");
    assert!(v["peak_gflops"].as_f64().unwrap() > 0.0 && v["tokens_per_s"].as_f64().unwrap() > 0.0);
    let (success, text) = kiln(&["profile", "--seq-len", "100000"]);
    assert!(!success && text.contains("exceeds the model's context"), "{text}");
    let (success, text) = kiln(&["profile", "--steps", "0"]);
    assert!(!success && text.contains("--steps"), "{text}");
}
