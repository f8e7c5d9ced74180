//! Kiln's GPT logits against an independent GPT-2 written here in plain f64 loops, loading the same
//! model.safetensors by its Hugging Face names (the way llm.c checks itself against PyTorch).

use std::collections::HashMap;

use kiln_engine::autograd::Tape;
use kiln_engine::testing::{gpu, random_vec};
use kiln_model::arch::{param_table, Model};
use kiln_model::checkpoint::{load_safetensors, save_checkpoint, Checkpoint, HostTensor, MODEL_FILE};
use kiln_model::ModelConfig;

struct Weights(HashMap<String, (Vec<usize>, Vec<f64>)>);

impl Weights {
    fn get(&self, name: &str) -> &[f64] {
        &self.0.get(&format!("transformer.{name}")).unwrap_or_else(|| panic!("missing {name}")).1
    }
}

fn layernorm(x: &[f64], g: &[f64], b: &[f64]) -> Vec<f64> {
    let c = g.len();
    x.chunks(c)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            let r = 1.0 / (var + 1e-5).sqrt();
            row.iter().enumerate().map(move |(i, v)| (v - mean) * r * g[i] + b[i]).collect::<Vec<_>>()
        })
        .collect()
}

/// x [n, k] · W [k, m] + b, W stored [in, out] like GPT-2's Conv1D.
fn conv1d(x: &[f64], w: &[f64], b: &[f64], k: usize) -> Vec<f64> {
    let m = b.len();
    x.chunks(k).flat_map(|row| (0..m).map(move |j| b[j] + (0..k).map(|p| row[p] * w[p * m + j]).sum::<f64>())).collect()
}

fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
}

/// GPT-2 forward for one sequence: logits [T, V].
fn reference_logits(w: &Weights, cfg: &ModelConfig, tokens: &[usize]) -> Vec<f64> {
    let (c, t, nh) = (cfg.n_embd, tokens.len(), cfg.n_head);
    let hs = c / nh;
    let (wte, wpe) = (w.get("wte.weight"), w.get("wpe.weight"));
    let mut x: Vec<f64> = (0..t).flat_map(|i| (0..c).map(move |j| wte[tokens[i] * c + j] + wpe[i * c + j])).collect();
    for l in 0..cfg.n_layer {
        let p = |s: &str| w.get(&format!("h.{l}.{s}")).to_vec();
        let h = layernorm(&x, &p("ln_1.weight"), &p("ln_1.bias"));
        let qkv = conv1d(&h, &p("attn.c_attn.weight"), &p("attn.c_attn.bias"), c);
        let mut att = vec![0.0; t * c];
        for head in 0..nh {
            for i in 0..t {
                let q = &qkv[i * 3 * c + head * hs..][..hs];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        q.iter().zip(&qkv[j * 3 * c + c + head * hs..][..hs]).map(|(a, b)| a * b).sum::<f64>()
                            / (hs as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hs {
                    att[i * c + head * hs + d] =
                        (0..=i).map(|j| e[j] / z * qkv[j * 3 * c + 2 * c + head * hs + d]).sum();
                }
            }
        }
        let a = conv1d(&att, &p("attn.c_proj.weight"), &p("attn.c_proj.bias"), c);
        x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
        let h = layernorm(&x, &p("ln_2.weight"), &p("ln_2.bias"));
        let f: Vec<f64> = conv1d(&h, &p("mlp.c_fc.weight"), &p("mlp.c_fc.bias"), c).into_iter().map(gelu).collect();
        let f = conv1d(&f, &p("mlp.c_proj.weight"), &p("mlp.c_proj.bias"), 4 * c);
        x.iter_mut().zip(&f).for_each(|(x, f)| *x += f);
    }
    let h = layernorm(&x, w.get("ln_f.weight"), w.get("ln_f.bias"));
    // Tied lm_head: logits = h · wteᵀ.
    h.chunks(c)
        .flat_map(|row| (0..cfg.vocab_size).map(move |v| (0..c).map(|j| row[j] * wte[v * c + j]).sum::<f64>()))
        .collect()
}

#[test]
fn logits_match_an_independent_gpt2_reading_the_same_safetensors() {
    let gpu = gpu();
    let cfg = ModelConfig::gpt2(61, 32, 2, 3, 48);
    // Weights far larger than GPT-2's 0.02 initialisation, so every path contributes visibly to the logits.
    let tensors: Vec<HostTensor> = param_table(&cfg)
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let (name, shape) = (spec.name, spec.shape);
            let n = shape.iter().product();
            let r = random_vec(n, 50 + i as u64);
            let data = if name.contains("ln_") && name.ends_with("weight") {
                r.iter().map(|v| 1.0 + 0.3 * v).collect()
            } else {
                r.iter().map(|v| 0.3 * v).collect()
            };
            HostTensor { name, shape, data }
        })
        .collect();
    let model = Model::from_host(gpu, &cfg, tensors).unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-test-reference-{}", std::process::id()));
    let ckpt = Checkpoint {
        config: cfg.clone(),
        model: model.to_host(gpu).unwrap(),
        optimizer: vec![],
        state: None,
        tokenizer_json: None,
    };
    save_checkpoint(&dir, &ckpt).unwrap();
    let file = load_safetensors(&dir.join(MODEL_FILE)).unwrap();
    let w =
        Weights(file.into_iter().map(|t| (t.name, (t.shape, t.data.iter().map(|&v| v as f64).collect()))).collect());
    let (b, t) = (2, 19);
    let tokens: Vec<usize> = (0..b * t).map(|i| (i * 37 + 5) % cfg.vocab_size).collect();
    let ids: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
    let mut tape = Tape::no_grad(gpu);
    let l = model.logits(&mut tape, &ids, b, t).unwrap();
    let got = gpu.read(tape.value(l)).unwrap();
    let spread = got.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 1.0, "logits should be O(1) or larger for a meaningful comparison, max |logit| = {spread}");
    for s in 0..b {
        let want = reference_logits(&w, &cfg, &tokens[s * t..(s + 1) * t]);
        for (i, (g, r)) in got[s * t * cfg.vocab_size..(s + 1) * t * cfg.vocab_size].iter().zip(&want).enumerate() {
            // f32 through two blocks with O(1) activations and logits of O(1–10): a few 1e-6 relative per op.
            assert!((*g as f64 - r).abs() < 1e-4 * (1.0 + r.abs()), "sequence {s}, logit {i}: kiln {g}, reference {r}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
