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
    let text = ok(&[
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
        "--ablate-beta",
    ]);
    assert!(text.contains("general loss (bits/byte)") && text.contains("KL from base"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("study.json")).unwrap()).unwrap();
    let phases: Vec<&str> = json["runs"][0].as_array().unwrap().iter().map(|r| r["phase"].as_str().unwrap()).collect();
    for p in ["base", "sft", "rl", "rl-beta0"] {
        assert!(phases.contains(&p), "{p} missing: {phases:?}");
    }
    let base = &json["runs"][0][0];
    assert_eq!(base["kl_base_text"].as_f64().unwrap(), 0.0, "the base model's KL from itself is exactly 0");
    assert!(base["bits_per_byte"].as_f64().unwrap() > 0.0);
    assert!(std::fs::metadata(study.join("study.png")).unwrap().len() > 1000);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sft_refuses_a_tokenizer_without_chat_tokens() {
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
    let (success, text) =
        kiln(&["sft", "--init", &s(&pre.join("checkpoint")), "--out", &s(&dir.join("sft")), "--task", "count"]);
    assert!(!success && text.contains("<|user|>") && text.contains("kiln prepare"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
