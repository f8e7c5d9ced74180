//! Kiln's Llama-family model against an independent Llama written here in plain f64 loops from Hugging Face's
//! `modeling_llama.py` (separate q/k/v/gate/up projections, repeat_kv, rotate_half, RMSNorm), reading the tensors
//! Kiln exports under their Hugging Face names: the logits match, and every parameter's gradient matches central
//! finite differences of this reference's loss.

use std::collections::HashMap;

use kiln_engine::autograd::Tape;
use kiln_engine::testing::{gpu, random_vec};
use kiln_model::arch::{export_hf, import_hf, param_table, Attend, Model};
use kiln_model::checkpoint::HostTensor;
use kiln_model::ModelConfig;

struct Weights(HashMap<String, Vec<f64>>);

impl Weights {
    fn from_hf(tensors: &[HostTensor]) -> Weights {
        Weights(tensors.iter().map(|t| (t.name.clone(), t.data.iter().map(|&v| v as f64).collect())).collect())
    }

    fn get(&self, name: &str) -> &[f64] {
        self.0.get(name).unwrap_or_else(|| panic!("missing {name}"))
    }

    fn opt(&self, name: &str) -> Option<&[f64]> {
        self.0.get(name).map(Vec::as_slice)
    }
}

fn rmsnorm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    x.chunks(g.len())
        .flat_map(|row| {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / g.len() as f64 + eps).sqrt();
            row.iter().zip(g).map(move |(v, g)| g * (v * r)).collect::<Vec<_>>()
        })
        .collect()
}

/// nn.Linear: x [n, k] · Wᵀ (W [m, k]) + b.
fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>, k: usize) -> Vec<f64> {
    let m = w.len() / k;
    x.chunks(k)
        .flat_map(|row| {
            (0..m).map(move |j| b.map_or(0.0, |b| b[j]) + (0..k).map(|p| row[p] * w[j * k + p]).sum::<f64>())
        })
        .collect()
}

/// apply_rotary_pos_emb on one head vector at position `pos`: x·cos + rotate_half(x)·sin.
fn rotate(v: &[f64], pos: usize, theta: f64) -> Vec<f64> {
    let (hs, half) = (v.len(), v.len() / 2);
    (0..hs)
        .map(|d| {
            let inv_freq = 1.0 / theta.powf((2 * (d % half)) as f64 / hs as f64);
            let angle = pos as f64 * inv_freq;
            let rotated = if d < half { -v[d + half] } else { v[d - half] };
            v[d] * angle.cos() + rotated * angle.sin()
        })
        .collect()
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// LlamaForCausalLM's logits [T, V] for one sequence at positions 0..T.
fn reference_logits(w: &Weights, cfg: &ModelConfig, tokens: &[usize]) -> Vec<f64> {
    let (c, t, nh, nkv) = (cfg.n_embd, tokens.len(), cfg.n_head, cfg.n_kv_head);
    let hs = c / nh;
    let eps = cfg.norm_eps;
    let embed = w.get("model.embed_tokens.weight");
    let mut x: Vec<f64> = tokens.iter().flat_map(|&tok| embed[tok * c..(tok + 1) * c].to_vec()).collect();
    for l in 0..cfg.n_layer {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let h = rmsnorm(&x, w.get(&p("input_layernorm.weight")), eps);
        let proj = |name: &str| {
            linear(&h, w.get(&p(&format!("self_attn.{name}.weight"))), w.opt(&p(&format!("self_attn.{name}.bias"))), c)
        };
        let (q, k, v) = (proj("q_proj"), proj("k_proj"), proj("v_proj"));
        let head = |m: &[f64], heads: usize, i: usize, h: usize| m[i * heads * hs + h * hs..][..hs].to_vec();
        let mut att = vec![0.0; t * c];
        for h in 0..nh {
            let kv = h / (nh / nkv); // repeat_kv
            let keys: Vec<Vec<f64>> = (0..t).map(|j| rotate(&head(&k, nkv, j, kv), j, cfg.rope_theta)).collect();
            for i in 0..t {
                let qi = rotate(&head(&q, nh, i, h), i, cfg.rope_theta);
                let scores: Vec<f64> = (0..=i)
                    .map(|j| qi.iter().zip(&keys[j]).map(|(a, b)| a * b).sum::<f64>() / (hs as f64).sqrt())
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let pj = (s - m).exp() / z;
                    for d in 0..hs {
                        att[i * c + h * hs + d] += pj * v[j * nkv * hs + kv * hs + d];
                    }
                }
            }
        }
        let o = linear(&att, w.get(&p("self_attn.o_proj.weight")), None, c);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        let h = rmsnorm(&x, w.get(&p("post_attention_layernorm.weight")), eps);
        let gate = linear(&h, w.get(&p("mlp.gate_proj.weight")), None, c);
        let up = linear(&h, w.get(&p("mlp.up_proj.weight")), None, c);
        let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
        let down = linear(&act, w.get(&p("mlp.down_proj.weight")), None, cfg.n_inner);
        x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
    }
    let h = rmsnorm(&x, w.get("model.norm.weight"), eps);
    let head = w.opt("lm_head.weight").unwrap_or(embed);
    linear(&h, head, None, c)
}

/// Mean cross-entropy of next-token targets over all sequences.
fn reference_loss(w: &Weights, cfg: &ModelConfig, tokens: &[usize], targets: &[usize], t: usize) -> f64 {
    let v = cfg.vocab_size;
    let mut total = 0.0;
    for (seq, tgt) in tokens.chunks(t).zip(targets.chunks(t)) {
        let logits = reference_logits(w, cfg, seq);
        for (row, &y) in logits.chunks(v).zip(tgt) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            total += m + row.iter().map(|l| (l - m).exp()).sum::<f64>().ln() - row[y];
        }
    }
    total / tokens.len() as f64
}

/// Kiln tensors for `cfg` with weights far from the 0.02 init (so every path shows in the logits), norm gains
/// near 1.
fn weights(cfg: &ModelConfig, amp: f32, seed: u64) -> Vec<HostTensor> {
    param_table(cfg)
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let n = spec.shape.iter().product();
            let r = random_vec(n, seed + i as u64);
            let data = if spec.name.ends_with("norm.weight") || spec.name.ends_with("layernorm.weight") {
                r.iter().map(|v| 1.0 + 0.3 * v).collect()
            } else {
                r.iter().map(|v| amp * v).collect()
            };
            HostTensor { name: spec.name, shape: spec.shape, data }
        })
        .collect()
}

/// Variants: tied GQA (SmolLM2's kind), untied with q/k/v biases (Qwen2's), multi-query with an odd MLP width.
fn configs() -> Vec<ModelConfig> {
    let base = ModelConfig::llama(41, 32, 2, (4, 2), 24, 36);
    vec![
        ModelConfig { rope_theta: 100_000.0, ..base.clone() },
        ModelConfig { tie_embeddings: false, qkv_bias: true, norm_eps: 1e-6, ..base.clone() },
        ModelConfig { n_kv_head: 1, n_inner: 29, ..base },
    ]
}

#[test]
fn logits_match_an_independent_llama_reading_the_hf_tensors() {
    let gpu = gpu();
    for (case, cfg) in configs().iter().enumerate() {
        let model = Model::from_host(gpu, cfg, weights(cfg, 0.3, 70 + 20 * case as u64)).unwrap();
        let hf = export_hf(cfg, &model.to_host(gpu).unwrap()).unwrap();
        assert!(hf.iter().any(|t| t.name.ends_with("q_proj.weight")), "the export must hold HF's separate tensors");
        let w = Weights::from_hf(&hf);
        let (b, t) = (2, 19);
        let tokens: Vec<usize> = (0..b * t).map(|i| (i * 37 + 5 + case) % cfg.vocab_size).collect();
        let ids: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
        let mut tape = Tape::no_grad(gpu);
        let l = model.logits(&mut tape, &ids, b, t).unwrap();
        let got = gpu.read(tape.value(l)).unwrap();
        let spread = got.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 1.0, "case {case}: logits should be O(1) or larger, max |logit| = {spread}");
        let v = cfg.vocab_size;
        for s in 0..b {
            let want = reference_logits(&w, cfg, &tokens[s * t..(s + 1) * t]);
            for (i, (g, r)) in got[s * t * v..(s + 1) * t * v].iter().zip(&want).enumerate() {
                // f32 through two blocks with O(1) activations: a few 1e-6 relative per op, as the GPT-2 test.
                assert!((*g as f64 - r).abs() <= 1e-4 * (1.0 + r.abs()), "case {case} seq {s} logit {i}: {g} vs {r}");
            }
        }
    }
}

#[test]
fn every_gradient_matches_finite_differences_of_the_reference() {
    let gpu = gpu();
    for (case, cfg) in configs().iter().enumerate() {
        let cfg = ModelConfig { n_embd: 16, n_inner: 20 + case, vocab_size: 23, ..cfg.clone() };
        let model = Model::from_host(gpu, &cfg, weights(&cfg, 0.4, 300 + 20 * case as u64)).unwrap();
        let (b, t) = (2, 6);
        let tokens: Vec<usize> = (0..b * t).map(|i| (i * 7 + 3 * case) % cfg.vocab_size).collect();
        let targets: Vec<usize> = (0..b * t).map(|i| (i * 5 + 1) % cfg.vocab_size).collect();
        let ids: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
        let tgt: Vec<i32> = targets.iter().map(|&x| x as i32).collect();
        let mut tape = Tape::new(gpu);
        let target_t = gpu.upload_i32(&tgt, &[b, t]).unwrap();
        let weights_t = gpu.upload(&vec![1.0 / (b * t) as f32; b * t], &[b * t]).unwrap();
        let f = model.forward(&mut tape, &ids, b, t, &target_t, &weights_t).unwrap();
        let kiln_loss = gpu.read(tape.value(f.loss)).unwrap()[0] as f64;
        tape.backward(f.loss).unwrap();
        let grads: Vec<HostTensor> = model
            .params
            .iter()
            .map(|p| HostTensor::new(p.name.clone(), p.value.shape().to_vec(), gpu.read(&p.grad).unwrap()))
            .collect();

        // Finite differences of the reference over every Hugging Face tensor, then stacked into Kiln's layout by
        // the same import a checkpoint load uses (the gradient of a fused tensor is its parts' gradients stacked).
        let hf = export_hf(&cfg, &model.to_host(gpu).unwrap()).unwrap();
        let mut w = Weights::from_hf(&hf);
        let want_loss = reference_loss(&w, &cfg, &tokens, &targets, t);
        assert!((kiln_loss - want_loss).abs() <= 1e-5 * want_loss, "case {case}: loss {kiln_loss} vs {want_loss}");
        let h = 1e-5;
        let mut numeric = Vec::new();
        for tensor in &hf {
            let mut g = vec![0.0f32; tensor.data.len()];
            for (k, gk) in g.iter_mut().enumerate() {
                let orig = w.0[&tensor.name][k];
                w.0.get_mut(&tensor.name).unwrap()[k] = orig + h;
                let up = reference_loss(&w, &cfg, &tokens, &targets, t);
                w.0.get_mut(&tensor.name).unwrap()[k] = orig - h;
                let down = reference_loss(&w, &cfg, &tokens, &targets, t);
                w.0.get_mut(&tensor.name).unwrap()[k] = orig;
                *gk = ((up - down) / (2.0 * h)) as f32;
            }
            numeric.push(HostTensor::new(tensor.name.clone(), tensor.shape.clone(), g));
        }
        if cfg.tie_embeddings {
            // The head's share of the tied embedding's gradient flows through the same tensor: nothing to add.
            assert!(numeric.iter().all(|t| t.name != "lm_head.weight"));
        }
        let numeric = import_hf(&cfg, numeric).unwrap();
        for (got, want) in grads.iter().zip(&numeric) {
            assert_eq!(got.name, want.name);
            // f32 forward and backward through the whole model against f64 differences (truncation ~h² ≈ 1e-10):
            // ~1e-4 of the tensor's largest entry, as the GPT tape test.
            let scale = want.data.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            for (j, (g, n)) in got.data.iter().zip(&want.data).enumerate() {
                assert!(
                    (g - n).abs() <= 3e-4 * scale,
                    "case {case} d{}[{j}]: Kiln {g}, finite differences {n} (largest |grad| {scale})",
                    got.name
                );
            }
        }
    }
}

#[test]
fn packed_rows_restart_rotary_positions() {
    // Two sequences packed into one row compute exactly what each computes alone at positions 0..: RoPE reads
    // the per-row position ids and attention stays inside each segment.
    let gpu = gpu();
    let cfg = &configs()[0];
    let model = Model::from_host(gpu, cfg, weights(cfg, 0.3, 500)).unwrap();
    let (a, b) = ([3, 9, 4, 1, 7], [2, 8, 8, 5, 6, 0, 11]);
    let v = cfg.vocab_size;
    let run = |tokens: &[i32], attend: Attend| {
        let mut tape = Tape::no_grad(gpu);
        let l = model.forward_logits(&mut tape, tokens, 1, tokens.len(), attend).unwrap();
        gpu.read(tape.value(l)).unwrap()
    };
    let packed: Vec<i32> = a.iter().chain(&b).copied().collect();
    let lengths = [vec![a.len(), b.len()]];
    let together = run(&packed, Attend::Packed(&lengths));
    let alone = [run(&a, Attend::Causal), run(&b, Attend::Causal)].concat();
    for (i, (x, y)) in together.iter().zip(&alone).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "logit {i} (position {}): packed {x}, alone {y}", i / v);
    }
    // Without the restart the second sequence would see other angles: causal attention over the packed row differs.
    let causal = run(&packed, Attend::Causal);
    assert!(causal[a.len() * v..].iter().zip(&alone[a.len() * v..]).any(|(x, y)| (x - y).abs() > 1e-3));
}
