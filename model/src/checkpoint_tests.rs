use super::*;
use crate::arch::{import_hf, param_table};

use safetensors::tensor::TensorView;
use std::sync::atomic::{AtomicU64, Ordering};

/// A unique directory under the system temp dir, removed on drop (tests run in parallel in one process).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("kiln-ckpt-{tag}-{}-{nanos}-{n}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    param_table(config).into_iter().map(|s| (s.name, s.shape)).collect()
}

fn tiny_config() -> ModelConfig {
    ModelConfig::gpt2(11, 8, 2, 2, 8)
}

/// Deterministic weights in canonical order; `seed` makes checkpoints of different steps distinguishable.
fn tiny_model(config: &ModelConfig, seed: u64) -> Vec<HostTensor> {
    shapes(config)
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let data = (0..n).map(|i| ((i as f32 + 1.0) * 0.37 + k as f32 + seed as f32 * 0.01).sin()).collect();
            HostTensor { name, shape, data }
        })
        .collect()
}

fn full_checkpoint(step: u64) -> Checkpoint {
    let config = tiny_config();
    let model = tiny_model(&config, step);
    let optimizer = model
        .iter()
        .flat_map(|t| {
            let m = HostTensor {
                name: format!("{}.m", t.name),
                shape: t.shape.clone(),
                data: vec![step as f32; t.numel()],
            };
            let v = HostTensor { name: format!("{}.v", t.name), shape: t.shape.clone(), data: vec![0.5; t.numel()] };
            [m, v]
        })
        .collect();
    Checkpoint {
        config,
        model,
        optimizer,
        state: Some(TrainState {
            step,
            tokens_seen: step * 1024,
            sampler: serde_json::json!({"epoch": 1, "cursor": step * 3}),
            rng: serde_json::json!([1, 2, 3]),
            extra: serde_json::json!({"lr": {"peak": 6e-4, "warmup": 10}, "phase": "pretrain"}),
            ranks: 2,
        }),
        tokenizer_json: Some(r#"{"version":"1.0","model":{"type":"BPE"}}"#.to_string()),
    }
}

fn loaded_step(dir: &Path) -> u64 {
    load_checkpoint(dir).unwrap().state.unwrap().step
}

fn assert_bits_eq(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "element {i}: {x} vs {y}");
    }
}

#[test]
fn safetensors_round_trip_is_bit_exact_with_metadata() {
    let s = Scratch::new("st");
    let path = s.0.join("t.safetensors");
    let odd = vec![f32::from_bits(0x7fc0_1234), -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE / 8.0, 1e30];
    let tensors = vec![
        HostTensor::new("b.weird", vec![2, 3], odd),
        HostTensor::new("a.matrix", vec![3, 4], (0..12).map(|i| i as f32 * 0.1 - 0.3).collect()),
        HostTensor::new("c.scalar", vec![], vec![42.5]),
        HostTensor::new("d.empty", vec![0, 5], vec![]),
    ];
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("kiln.note".to_string(), "héllo, wörld".to_string());
    save_safetensors(&path, &tensors, &meta).unwrap();
    assert_eq!(s.entries(), vec!["t.safetensors"], "no temp file may remain");

    let (back, back_meta) = load_safetensors_with_metadata(&path).unwrap();
    assert_eq!(back_meta, meta);
    assert_eq!(back.len(), tensors.len());
    for t in &tensors {
        let b = back.iter().find(|b| b.name == t.name).unwrap_or_else(|| panic!("{} lost", t.name));
        assert_eq!(b.shape, t.shape);
        assert_bits_eq(&b.data, &t.data);
    }
    // Overwriting goes through a fresh temp file too, and empty metadata reads back empty.
    save_safetensors(&path, &tensors[1..2], &BTreeMap::new()).unwrap();
    let (back, back_meta) = load_safetensors_with_metadata(&path).unwrap();
    assert!(back_meta.is_empty());
    assert_eq!(back, tensors[1..2].to_vec());
    assert_eq!(s.entries(), vec!["t.safetensors"]);
}

#[test]
fn f16_and_bf16_files_load_as_f32_and_other_dtypes_are_named() {
    let s = Scratch::new("half");
    let path = s.0.join("half.safetensors");
    let f16_vals = [0.5f32, -2.0, 1.5, 65504.0, 0.0, -0.000_061_035_156];
    let bf16_vals = [1.0f32, -3.0, 2f32.powi(100), 0.15625];
    let f16_bytes: Vec<u8> = f16_vals.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let bf16_bytes: Vec<u8> = bf16_vals.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    let views = vec![
        ("h", TensorView::new(Dtype::F16, vec![2, 3], &f16_bytes).unwrap()),
        ("b", TensorView::new(Dtype::BF16, vec![4], &bf16_bytes).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let back = load_safetensors(&path).unwrap();
    let h = back.iter().find(|t| t.name == "h").unwrap();
    let b = back.iter().find(|t| t.name == "b").unwrap();
    assert_eq!(h.shape, vec![2, 3]);
    assert_eq!(b.shape, vec![4]);
    assert_bits_eq(&h.data, &f16_vals);
    assert_bits_eq(&b.data, &bf16_vals);

    let ints: Vec<u8> = [7i64, 8].iter().flat_map(|x| x.to_le_bytes()).collect();
    let bad = s.0.join("ints.safetensors");
    let views = vec![("position_ids", TensorView::new(Dtype::I64, vec![2], &ints).unwrap())];
    safetensors::serialize_to_file(views, None, &bad).unwrap();
    let e = load_safetensors(&bad).unwrap_err().to_string();
    assert!(e.contains("position_ids") && e.contains("I64") && e.contains("F32"), "{e}");
}

#[test]
fn unreadable_safetensors_files_say_why() {
    let s = Scratch::new("bad");
    let e = load_safetensors(&s.0.join("nope.safetensors")).unwrap_err().to_string();
    assert!(e.contains("missing file") && e.contains("nope.safetensors"), "{e}");
    let garbage = s.0.join("garbage.safetensors");
    fs::write(&garbage, b"this is not a tensor file at all, just text").unwrap();
    let e = load_safetensors(&garbage).unwrap_err().to_string();
    assert!(e.contains("not a safetensors file"), "{e}");
    fs::write(&garbage, b"").unwrap();
    assert!(load_safetensors(&garbage).unwrap_err().to_string().contains("not a safetensors file"));

    let short = [HostTensor::new("x", vec![2, 2], vec![1.0; 3])];
    let e = save_safetensors(&s.0.join("short.safetensors"), &short, &BTreeMap::new()).unwrap_err().to_string();
    assert!(e.contains("x") && e.contains("3 values"), "{e}");
    let twice = [HostTensor::new("x", vec![1], vec![1.0]), HostTensor::new("x", vec![1], vec![2.0])];
    let e = save_safetensors(&s.0.join("twice.safetensors"), &twice, &BTreeMap::new()).unwrap_err().to_string();
    assert!(e.contains("twice"), "{e}");
    assert_eq!(s.entries(), vec!["garbage.safetensors"], "failed saves leave nothing behind");
}

#[test]
fn checkpoint_round_trips_and_is_a_hugging_face_gpt2_directory() {
    let s = Scratch::new("rt");
    let dir = s.0.join("ckpt");
    let ckpt = full_checkpoint(7);
    save_checkpoint(&dir, &ckpt).unwrap();
    assert_eq!(s.entries(), vec!["ckpt"]);

    let mut back = load_checkpoint(&dir).unwrap();
    // Safetensors stores tensors sorted by name; the model comes back in canonical order, other files as stored.
    let mut expected = ckpt.clone();
    expected.optimizer.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(back.optimizer.windows(2).all(|w| w[0].name < w[1].name));
    back.optimizer.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(back.model == expected.model, "model tensors differ");
    assert!(back.optimizer == expected.optimizer, "optimizer tensors differ");
    assert_eq!(
        (back.config, back.state, back.tokenizer_json),
        (expected.config, expected.state, expected.tokenizer_json)
    );

    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(ModelConfig::from_hf_json(&config).unwrap(), ckpt.config);

    // The weights file holds exactly the HF parameters (no optimizer moments) and the metadata transformers wants.
    let (weights, meta) = load_safetensors_with_metadata(&dir.join("model.safetensors")).unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    import_hf(&ckpt.config, weights.clone()).unwrap();
    let opt = load_safetensors(&dir.join("optimizer.safetensors")).unwrap();
    assert_eq!(opt.len(), 2 * weights.len());
    let state: TrainState = serde_json::from_str(&fs::read_to_string(dir.join("train_state.json")).unwrap()).unwrap();
    assert_eq!(state.step, 7);
}

#[test]
fn weights_only_checkpoint_has_no_training_files() {
    let s = Scratch::new("wo");
    let dir = s.0.join("export");
    let config = tiny_config();
    let ckpt =
        Checkpoint { model: tiny_model(&config, 1), config, optimizer: vec![], state: None, tokenizer_json: None };
    save_checkpoint(&dir, &ckpt).unwrap();
    let mut files: Vec<String> =
        fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, vec!["config.json", "model.safetensors"]);
    assert!(load_checkpoint(&dir).unwrap() == ckpt, "weights-only checkpoint differs after loading");
}

#[test]
fn saving_over_a_checkpoint_replaces_it_and_leaves_no_temp_or_old_dirs() {
    let s = Scratch::new("over");
    let dir = s.0.join("latest");
    save_checkpoint(&dir, &full_checkpoint(1)).unwrap();
    save_checkpoint(&dir, &full_checkpoint(2)).unwrap();
    assert_eq!(loaded_step(&dir), 2);
    assert!(load_checkpoint(&dir).unwrap().model == full_checkpoint(2).model);
    assert_eq!(s.entries(), vec!["latest"]);
    // A relative-looking nested path whose parent does not exist yet is created.
    let nested = s.0.join("runs").join("a").join("step_3");
    save_checkpoint(&nested, &full_checkpoint(3)).unwrap();
    assert_eq!(loaded_step(&nested), 3);
}

#[test]
fn a_kill_at_any_stage_leaves_the_previous_or_the_new_checkpoint() {
    let stages = [
        (SaveStage::ModelWritten, 1),
        (SaveStage::TempComplete, 1),
        (SaveStage::OldMovedAside, 1),
        (SaveStage::NewInPlace, 2),
    ];
    for (stage, expect) in stages {
        let s = Scratch::new("kill");
        let dir = s.0.join("ck");
        save_checkpoint(&dir, &full_checkpoint(1)).unwrap();
        save_checkpoint_until(&dir, &full_checkpoint(2), Some(stage)).unwrap();
        assert_eq!(loaded_step(&dir), expect, "killed at {stage:?}");
        assert!(s.entries().len() > 1, "the simulated kill left its temp/old directory: {:?}", s.entries());
        // The next save (a restarted run) recovers and cleans every leftover.
        save_checkpoint(&dir, &full_checkpoint(3)).unwrap();
        assert_eq!(loaded_step(&dir), 3, "after {stage:?}");
        assert_eq!(s.entries(), vec!["ck"], "after {stage:?}");
    }

    // A first save killed before its rename leaves no checkpoint, and says so.
    for stage in [SaveStage::ModelWritten, SaveStage::TempComplete] {
        let s = Scratch::new("first");
        let dir = s.0.join("ck");
        save_checkpoint_until(&dir, &full_checkpoint(1), Some(stage)).unwrap();
        let e = load_checkpoint(&dir).unwrap_err().to_string();
        assert!(e.contains("no checkpoint"), "{e}");
    }
}

#[test]
fn stale_temp_dirs_are_ignored_and_a_complete_old_dir_is_found() {
    let s = Scratch::new("stale");
    let dir = s.0.join("ck");
    // The state after a kill between the two renames of an earlier run: DIR missing, DIR.old-456 complete,
    // plus garbage from other crashed runs.
    save_checkpoint(&s.0.join("staging"), &full_checkpoint(5)).unwrap();
    fs::rename(s.0.join("staging"), s.0.join("ck.old-456")).unwrap();
    let tmp = s.0.join("ck.tmp-123");
    fs::create_dir(&tmp).unwrap();
    fs::write(tmp.join("model.safetensors"), b"garbage").unwrap();
    fs::write(tmp.join("config.json"), b"{not json").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let broken_old = s.0.join("ck.old-789");
    fs::create_dir(&broken_old).unwrap();
    fs::write(broken_old.join("config.json"), b"{}").unwrap();

    assert_eq!(loaded_step(&dir), 5);
    let e = load_checkpoint(&s.0.join("other")).unwrap_err().to_string();
    assert!(e.contains("no checkpoint"), "{e}");

    save_checkpoint(&dir, &full_checkpoint(6)).unwrap();
    assert_eq!(loaded_step(&dir), 6);
    assert_eq!(s.entries(), vec!["ck"]);
}

#[test]
fn a_partial_temp_dir_never_shadows_a_good_checkpoint() {
    let s = Scratch::new("partial");
    let dir = s.0.join("ck");
    save_checkpoint(&dir, &full_checkpoint(1)).unwrap();
    // A complete-looking newer temp is still not trusted: only a rename makes a checkpoint.
    save_checkpoint(&s.0.join("newer"), &full_checkpoint(9)).unwrap();
    fs::rename(s.0.join("newer"), s.0.join("ck.tmp-999")).unwrap();
    let partial = s.0.join("ck.tmp-998");
    fs::create_dir(&partial).unwrap();
    fs::write(partial.join("model.safetensors"), &fs::read(dir.join("model.safetensors")).unwrap()[..100]).unwrap();
    assert_eq!(loaded_step(&dir), 1);
}

#[test]
fn save_refuses_to_clobber_other_data_or_write_bad_weights() {
    let s = Scratch::new("refuse");
    let dir = s.0.join("notes");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("thesis.txt"), b"precious").unwrap();
    let e = save_checkpoint(&dir, &full_checkpoint(1)).unwrap_err().to_string();
    assert!(e.contains("refusing to replace"), "{e}");
    assert_eq!(fs::read(dir.join("thesis.txt")).unwrap(), b"precious");

    let file = s.0.join("a_file");
    fs::write(&file, b"x").unwrap();
    assert!(save_checkpoint(&file, &full_checkpoint(1)).unwrap_err().to_string().contains("not a directory"));

    let mut bad = full_checkpoint(1);
    bad.model.pop();
    let e = save_checkpoint(&s.0.join("bad"), &bad).unwrap_err().to_string();
    assert!(e.contains("refusing to export") && e.contains("transformer.ln_f.bias"), "{e}");
    assert_eq!(s.entries(), vec!["a_file", "notes"]);
}

#[test]
fn load_errors_name_the_broken_file() {
    let s = Scratch::new("loaderr");
    let dir = s.0.join("ck");
    save_checkpoint(&dir, &full_checkpoint(1)).unwrap();

    fs::write(dir.join("config.json"), b"{\"model_type\": \"gpt2\", ").unwrap();
    let e = load_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
    fs::write(dir.join("config.json"), br#"{"model_type": "mamba", "vocab_size": 11}"#).unwrap();
    let e = load_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("mamba"), "{e}");
    fs::write(dir.join("config.json"), br#"{"model_type": "llama", "vocab_size": 11}"#).unwrap();
    let e = load_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("lacks hidden_size"), "{e}");
    fs::remove_file(dir.join("config.json")).unwrap();
    assert!(load_checkpoint(&dir).unwrap_err().to_string().contains("missing config.json"));

    // The config says 3 layers but the weights have 2.
    let bigger = ModelConfig { n_layer: 3, ..tiny_config() };
    fs::write(dir.join("config.json"), serde_json::to_vec(&bigger.to_hf_json()).unwrap()).unwrap();
    let e = load_checkpoint(&dir).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("missing (12)") && e.contains("transformer.h.2.ln_1.weight"),
        "{e}"
    );

    fs::write(dir.join("config.json"), serde_json::to_vec(&tiny_config().to_hf_json()).unwrap()).unwrap();
    assert_eq!(loaded_step(&dir), 1);
    fs::write(dir.join("train_state.json"), b"[]").unwrap();
    let e = load_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains("train_state.json"), "{e}");

    fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(load_checkpoint(&dir).unwrap_err().to_string().contains("missing model.safetensors"));
}

#[test]
fn a_hub_style_gpt2_directory_loads() {
    // GPT2Model-style names, the attention buffers of old transformers versions and a tied lm_head, with the
    // config.json fields the Hub's gpt2 repository carries.
    let s = Scratch::new("hub");
    let dir = s.0.join("gpt2");
    fs::create_dir(&dir).unwrap();
    let config = tiny_config();
    let canonical = tiny_model(&config, 0);
    let mut hub: Vec<HostTensor> = canonical
        .iter()
        .rev()
        .map(|t| HostTensor { name: t.name.trim_start_matches("transformer.").to_string(), ..t.clone() })
        .collect();
    for i in 0..config.n_layer {
        hub.push(HostTensor::zeros(format!("h.{i}.attn.bias"), vec![1, 1, config.n_ctx, config.n_ctx]));
        hub.push(HostTensor::new(format!("h.{i}.attn.masked_bias"), vec![], vec![-1e4]));
    }
    hub.push(HostTensor { name: "lm_head.weight".into(), ..canonical[0].clone() });
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(&dir.join("model.safetensors"), &hub, &meta).unwrap();
    let hf = serde_json::json!({
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": config.n_ctx, "n_embd": config.n_embd,
        "n_head": config.n_head, "n_layer": config.n_layer, "n_positions": config.n_ctx, "resid_pdrop": 0.1,
        "vocab_size": config.vocab_size
    });
    fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&hf).unwrap()).unwrap();
    fs::write(dir.join("tokenizer.json"), b"{}").unwrap();

    let ckpt = load_checkpoint(&dir).unwrap();
    assert_eq!(ckpt.config, config);
    assert!(ckpt.model == canonical, "normalised names, canonical order");
    assert!(ckpt.optimizer.is_empty() && ckpt.state.is_none());
    assert_eq!(ckpt.tokenizer_json.as_deref(), Some("{}"));
}

#[test]
fn normalize_handles_prefixes_buffers_and_tied_heads() {
    let config = tiny_config();
    let canonical = tiny_model(&config, 3);
    let mut mixed: Vec<HostTensor> = canonical
        .iter()
        .enumerate()
        .map(|(k, t)| {
            // Half with the prefix, half without: both spellings are accepted in one file.
            let name = if k % 2 == 0 { t.name.trim_start_matches("transformer.").to_string() } else { t.name.clone() };
            HostTensor { name, ..t.clone() }
        })
        .collect();
    mixed.insert(3, HostTensor::zeros("transformer.h.1.attn.bias", vec![1, 1, 8, 8]));
    mixed.insert(5, HostTensor::new("h.0.attn.masked_bias", vec![], vec![-1e4]));
    mixed.push(HostTensor { name: "lm_head.weight".into(), ..canonical[0].clone() });
    let normalized = import_hf(&config, mixed.clone()).unwrap();
    assert!(normalized == canonical);

    // The real c_attn bias is a parameter, not a buffer.
    assert!(normalized.iter().any(|t| t.name == "transformer.h.0.attn.c_attn.bias"));

    let mut untied = mixed.clone();
    untied.last_mut().unwrap().data[0] += 1.0;
    let e = import_hf(&config, untied).unwrap_err().to_string();
    assert!(e.contains("lm_head.weight differs"), "{e}");

    let mut doubled = mixed.clone();
    doubled.push(HostTensor { name: "transformer.wpe.weight".into(), ..canonical[1].clone() });
    doubled.push(HostTensor { name: "wpe.weight".into(), ..canonical[1].clone() });
    let e = import_hf(&config, doubled).unwrap_err().to_string();
    assert!(e.contains("wpe.weight"), "{e}");

    let headless = vec![HostTensor::new("lm_head.weight", vec![1], vec![0.0])];
    assert!(import_hf(&config, headless).unwrap_err().to_string().contains("wte"));

    // Names the schema does not know are reported, not dropped.
    let mut odd = canonical.clone();
    odd.push(HostTensor::new("score.weight", vec![1], vec![0.0]));
    let e = import_hf(&config, odd).unwrap_err().to_string();
    assert!(e.contains("unexpected (1): score.weight"), "{e}");
}

#[test]
fn check_reports_missing_unexpected_and_wrong_shapes_at_once() {
    let config = tiny_config();
    let mut tensors = tiny_model(&config, 0);
    import_hf(&config, tensors.clone()).unwrap();
    tensors.retain(|t| t.name != "transformer.h.1.ln_2.bias");
    tensors.push(HostTensor::zeros("transformer.h.2.ln_1.weight", vec![8]));
    let c_attn = tensors.iter_mut().find(|t| t.name == "transformer.h.0.attn.c_attn.weight").unwrap();
    c_attn.shape = vec![24, 8];
    let wpe = tensors.iter_mut().find(|t| t.name == "transformer.wpe.weight").unwrap();
    wpe.shape = vec![9, 8];
    wpe.data.extend([0.0; 8]);
    let ln = tensors.iter_mut().find(|t| t.name == "transformer.ln_f.weight").unwrap();
    ln.data.pop();
    tensors.push(tensors[0].clone());

    let e = import_hf(&config, tensors).unwrap_err().to_string();
    for needle in [
        "missing (1): transformer.h.1.ln_2.bias",
        "unexpected (1): transformer.h.2.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight is [24, 8], expected [8, 24], transposed: GPT-2's Conv1D stores [in, out]",
        "transformer.wpe.weight is [9, 8], expected [8, 8]",
        "transformer.ln_f.weight is [8] but holds 7 values",
        "duplicated (1): transformer.wte.weight",
    ] {
        assert!(e.contains(needle), "{needle:?} not in {e}");
    }
}

#[test]
fn gpt2_preset_shapes_sum_to_124m_in_fixed_order() {
    let config = ModelConfig::preset("gpt2", 50257).unwrap();
    let shapes = shapes(&config);
    let total: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(total, 124_439_808);
    assert_eq!(total, config.num_params());
    assert_eq!(shapes.len(), 2 + 12 * 12 + 2);
    assert_eq!(shapes[0], ("transformer.wte.weight".to_string(), vec![50257, 768]));
    assert_eq!(shapes[1], ("transformer.wpe.weight".to_string(), vec![1024, 768]));
    assert_eq!(shapes[2].0, "transformer.h.0.ln_1.weight");
    assert_eq!(shapes[4], ("transformer.h.0.attn.c_attn.weight".to_string(), vec![768, 2304]));
    assert_eq!(shapes[12], ("transformer.h.0.mlp.c_proj.weight".to_string(), vec![3072, 768]));
    assert_eq!(shapes.last().unwrap().0, "transformer.ln_f.bias");
}

fn llama_config() -> ModelConfig {
    ModelConfig { tie_embeddings: false, ..ModelConfig::llama(13, 16, 2, (4, 2), 8, 12) }
}

#[test]
fn llama_checkpoint_is_written_in_hugging_face_layout_and_reads_back_exactly() {
    let s = Scratch::new("llama");
    let config = llama_config();
    let model = tiny_model(&config, 5);
    let ckpt = Checkpoint {
        config: config.clone(),
        model: model.clone(),
        optimizer: vec![],
        state: None,
        tokenizer_json: None,
    };
    let dir = s.0.join("ck");
    save_checkpoint(&dir, &ckpt).unwrap();
    let json: serde_json::Value = serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["model_type"], "llama");
    assert_eq!(json["architectures"][0], "LlamaForCausalLM");
    assert_eq!((json["num_attention_heads"].as_u64(), json["num_key_value_heads"].as_u64()), (Some(4), Some(2)));
    assert_eq!(json["tie_word_embeddings"], false);
    // Separate q/k/v and gate/up tensors, [out, in], as LlamaForCausalLM holds them; nothing fused on disk.
    let file = load_safetensors(&dir.join(MODEL_FILE)).unwrap();
    let shape = |n: &str| file.iter().find(|t| t.name == n).map(|t| t.shape.clone());
    assert_eq!(shape("model.layers.0.self_attn.q_proj.weight"), Some(vec![8, 8]));
    assert_eq!(shape("model.layers.1.self_attn.k_proj.weight"), Some(vec![4, 8]));
    assert_eq!(shape("model.layers.0.mlp.gate_proj.weight"), Some(vec![12, 8]));
    assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), Some(vec![8, 12]));
    assert_eq!(shape("lm_head.weight"), Some(vec![13, 8]));
    assert!(file.iter().all(|t| !t.name.contains("qkv_proj") && !t.name.contains("gate_up")));
    assert_eq!(file.len(), 1 + 2 * 9 + 1 + 1);
    let back = load_checkpoint(&dir).unwrap();
    assert_eq!(back.config, config);
    assert!(back.model == model, "round trip must give Kiln's tensors back bit for bit");
}

/// Writes `tensors` as the Hub does for larger models: BF16, split over two shard files with an index.
fn write_sharded_bf16(dir: &Path, tensors: &[HostTensor]) {
    fs::create_dir_all(dir).unwrap();
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|t| t.data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()).collect();
    let mut weight_map = serde_json::Map::new();
    let half = tensors.len() / 2;
    for (k, range) in [0..half, half..tensors.len()].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let views: Vec<(String, TensorView)> = range
            .map(|i| {
                weight_map.insert(tensors[i].name.clone(), file.clone().into());
                (tensors[i].name.clone(), TensorView::new(Dtype::BF16, tensors[i].shape.clone(), &bytes[i]).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    fs::write(dir.join(INDEX_FILE), serde_json::to_vec_pretty(&index).unwrap()).unwrap();
}

#[test]
fn hub_style_sharded_bf16_llama_checkpoints_load() {
    let s = Scratch::new("hub");
    let config = ModelConfig { tie_embeddings: true, ..llama_config() };
    let model = tiny_model(&config, 9);
    let mut hf = crate::arch::export_hf(&config, &model).unwrap();
    // What Hub files also carry: a tied lm_head equal to the embedding, and old rotary buffers.
    let embed = hf.iter().find(|t| t.name == "model.embed_tokens.weight").unwrap().clone();
    hf.push(HostTensor { name: "lm_head.weight".into(), ..embed });
    hf.push(HostTensor::new("model.layers.0.self_attn.rotary_emb.inv_freq", vec![2], vec![1.0, 0.01]));
    let dir = s.0.join("hub");
    write_sharded_bf16(&dir, &hf);
    let mut json = config.to_hf_json();
    json["torch_dtype"] = "bfloat16".into();
    fs::write(dir.join("config.json"), serde_json::to_vec(&json).unwrap()).unwrap();
    let back = load_checkpoint(&dir).unwrap();
    assert_eq!(back.config, config);
    let rounded: Vec<HostTensor> = model
        .iter()
        .map(|t| HostTensor { data: t.data.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(), ..t.clone() })
        .collect();
    assert!(back.model == rounded, "BF16 shards must load as the BF16-rounded Kiln tensors");

    // A shard the index names but that is missing, and a tensor in the wrong shard, are named.
    fs::rename(dir.join("model-00002-of-00002.safetensors"), s.0.join("moved")).unwrap();
    let e = load_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("missing"), "{e}");
    fs::rename(s.0.join("moved"), dir.join("model-00002-of-00002.safetensors")).unwrap();
    let mut index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap();
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors".into();
    fs::write(dir.join(INDEX_FILE), serde_json::to_vec(&index).unwrap()).unwrap();
    let e = load_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains("model.norm.weight") && e.contains("weight_map"), "{e}");
}

#[test]
fn qwen2_configs_load_with_qkv_biases_and_unsupported_variants_are_refused() {
    let config = ModelConfig { qkv_bias: true, ..llama_config() };
    let json = config.to_hf_json();
    assert_eq!(json["model_type"], "qwen2");
    assert_eq!(ModelConfig::from_hf_json(&json).unwrap(), config);
    let hf = crate::arch::export_hf(&config, &tiny_model(&config, 1)).unwrap();
    assert!(hf.iter().any(|t| t.name == "model.layers.1.self_attn.v_proj.bias" && t.shape == vec![4]));
    assert!(hf.iter().all(|t| !t.name.contains("o_proj.bias")));
    let mut llama = llama_config().to_hf_json();
    for (key, value, needle) in [
        ("rope_scaling", serde_json::json!({"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
        ("hidden_act", "gelu".into(), "hidden_act"),
        ("attention_bias", true.into(), "attention_bias"),
    ] {
        let mut bad = llama.clone();
        bad[key] = value;
        let e = ModelConfig::from_hf_json(&bad).unwrap_err().to_string();
        assert!(e.contains(needle), "{key}: {e}");
    }
    llama["num_key_value_heads"] = 3.into();
    assert!(ModelConfig::from_hf_json(&llama).is_err());
}
