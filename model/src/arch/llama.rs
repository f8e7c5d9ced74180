//! The Llama family (Llama, SmolLM2, TinyLlama; Qwen2 adds q/k/v biases): RMSNorm, rotary positions (rotate-half),
//! grouped-query attention, SwiGLU MLP, tied or untied head, no other biases.
//!
//! Kiln fuses what one product can compute: q_proj, k_proj and v_proj are one `qkv_proj` [W, C] (their rows
//! stacked, so x·Wᵀ is the packed [q | k | v] the attention kernels read), and gate_proj and up_proj one
//! `gate_up_proj` [2I, C] (gate rows first, as the SwiGLU kernel reads it). Weights stay nn.Linear's [out, in].
//! The schema splits them back on export, so files load in `transformers.LlamaForCausalLM` as they are.

use kiln_engine::ops::matmul::MatmulSpec;

use super::config::{HfJson, ModelConfig};
use super::schema::{drop_tied_head, mismatch, schema_err};
use super::{BlockLayout, Init, Layout, Linear, Norm, ParamSpec, TableBuilder};
use crate::checkpoint::HostTensor;
use crate::error::{ModelError, Result};

/// Init as Hugging Face's LlamaPreTrainedModel (N(0, 0.02), norm gains 1), with GPT-2's depth scaling of the two
/// residual projections (o_proj, down_proj) so deeper models start as stable as shallow ones.
pub(crate) fn table(c: &ModelConfig) -> (Vec<ParamSpec>, Layout) {
    let (d, inner, w) = (c.n_embd, c.n_inner, c.qkv_width());
    let normal = Init::Normal { std: 0.02 };
    let resid = Init::Normal { std: 0.02 / (2.0 * c.n_layer as f32).sqrt() };
    let mut t = TableBuilder::default();
    let wte = t.push("model.embed_tokens.weight".into(), vec![c.vocab_size, d], normal, true);
    let rms = |t: &mut TableBuilder, name: String| Norm::Rms { gamma: t.push(name, vec![d], Init::Ones, false) };
    // nn.Linear [out, in]: y = x·Wᵀ.
    let linear = |t: &mut TableBuilder, name: String, (o, i): (usize, usize), init: Init, bias: bool| Linear {
        w: t.push(format!("{name}.weight"), vec![o, i], init, true),
        b: bias.then(|| t.push(format!("{name}.bias"), vec![o], Init::Zeros, false)),
        spec: MatmulSpec::nt(),
    };
    let blocks = (0..c.n_layer)
        .map(|i| {
            let p = format!("model.layers.{i}");
            BlockLayout {
                norm_1: rms(&mut t, format!("{p}.input_layernorm.weight")),
                qkv: linear(&mut t, format!("{p}.self_attn.qkv_proj"), (w, d), normal, c.qkv_bias),
                proj: linear(&mut t, format!("{p}.self_attn.o_proj"), (d, d), resid, false),
                norm_2: rms(&mut t, format!("{p}.post_attention_layernorm.weight")),
                up: linear(&mut t, format!("{p}.mlp.gate_up_proj"), (2 * inner, d), normal, false),
                down: linear(&mut t, format!("{p}.mlp.down_proj"), (d, inner), resid, false),
            }
        })
        .collect();
    let norm_f = rms(&mut t, "model.norm.weight".into());
    let head = if c.tie_embeddings {
        Linear { w: wte, b: None, spec: MatmulSpec::nt() }
    } else {
        linear(&mut t, "lm_head".into(), (c.vocab_size, d), normal, false)
    };
    (t.specs, Layout { wte, wpe: None, blocks, norm_f, head })
}

/// The fused Kiln tensors and the Hugging Face tensors they hold, row blocks in order.
fn fusions(c: &ModelConfig) -> Vec<(String, Vec<(String, usize)>)> {
    let hs = c.head_size();
    let (q, kv, inner) = (c.n_head * hs, c.n_kv_head * hs, c.n_inner);
    let mut out = Vec::new();
    for i in 0..c.n_layer {
        let a = format!("model.layers.{i}.self_attn");
        let mut suffixes = vec!["weight"];
        if c.qkv_bias {
            suffixes.push("bias");
        }
        for s in suffixes {
            let parts = [("q_proj", q), ("k_proj", kv), ("v_proj", kv)];
            out.push((format!("{a}.qkv_proj.{s}"), parts.iter().map(|(n, r)| (format!("{a}.{n}.{s}"), *r)).collect()));
        }
        let m = format!("model.layers.{i}.mlp");
        let parts = [("gate_proj", inner), ("up_proj", inner)];
        out.push((
            format!("{m}.gate_up_proj.weight"),
            parts.iter().map(|(n, r)| (format!("{m}.{n}.weight"), *r)).collect(),
        ));
    }
    out
}

/// The Hugging Face names and shapes `c` implies (what `import` demands and `export` writes).
pub fn hf_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let fused = fusions(c);
    let mut out = Vec::new();
    for s in super::param_table(c) {
        match fused.iter().find(|(name, _)| *name == s.name) {
            None => out.push((s.name, s.shape)),
            Some((_, parts)) => {
                let cols: Vec<usize> = s.shape[1..].to_vec();
                out.extend(parts.iter().map(|(n, rows)| (n.clone(), [vec![*rows], cols.clone()].concat())));
            }
        }
    }
    out
}

/// Hub tensors → Kiln's: names without the "model." prefix (saved from LlamaModel) get it, rotary inv_freq buffers
/// are dropped, a tied lm_head equal to the embedding is dropped, and q/k/v and gate/up are stacked.
pub(crate) fn import(c: &ModelConfig, tensors: Vec<HostTensor>) -> Result<Vec<HostTensor>> {
    let mut hf: Vec<HostTensor> = Vec::with_capacity(tensors.len());
    for mut t in tensors {
        if t.name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if ["embed_tokens.", "layers.", "norm."].iter().any(|p| t.name.starts_with(p)) {
            t.name = format!("model.{}", t.name);
        }
        hf.push(t);
    }
    if c.tie_embeddings {
        drop_tied_head(&mut hf, "model.embed_tokens.weight")?;
    }
    if let Some(m) = mismatch(c, &hf_shapes(c), &hf, Some("nn.Linear stores [out, in]")) {
        return Err(schema_err(m));
    }
    let mut by_name: std::collections::HashMap<String, HostTensor> =
        hf.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut out: Vec<HostTensor> = Vec::new();
    for (fused, parts) in fusions(c) {
        let pieces: Vec<HostTensor> =
            parts.iter().map(|(n, _)| by_name.remove(n).expect("checked against hf_shapes")).collect();
        let rows: usize = pieces.iter().map(|p| p.shape[0]).sum();
        let shape = [vec![rows], pieces[0].shape[1..].to_vec()].concat();
        out.push(HostTensor { name: fused, shape, data: pieces.into_iter().flat_map(|p| p.data).collect() });
    }
    out.extend(by_name.into_values());
    Ok(out)
}

/// Kiln tensors (checked, table order) → Hugging Face names, fused tensors split by rows.
pub(crate) fn export(c: &ModelConfig, tensors: &[HostTensor]) -> Vec<HostTensor> {
    let fused = fusions(c);
    let mut out = Vec::new();
    for t in tensors {
        match fused.iter().find(|(name, _)| *name == t.name) {
            None => out.push(t.clone()),
            Some((_, parts)) => {
                let cols: usize = t.shape[1..].iter().product();
                let mut at = 0;
                for (name, rows) in parts {
                    let shape = [vec![*rows], t.shape[1..].to_vec()].concat();
                    out.push(HostTensor { name: name.clone(), shape, data: t.data[at..at + rows * cols].to_vec() });
                    at += rows * cols;
                }
            }
        }
    }
    out
}

/// The Hugging Face `config.json`: `llama`, or `qwen2` when q/k/v carry biases (Qwen2's only difference).
pub(crate) fn to_hf_json(c: &ModelConfig) -> serde_json::Value {
    let (model_type, arch) = if c.qkv_bias { ("qwen2", "Qwen2ForCausalLM") } else { ("llama", "LlamaForCausalLM") };
    let mut v = serde_json::json!({
        "model_type": model_type,
        "architectures": [arch],
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.n_inner,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_size(),
        "max_position_embeddings": c.n_ctx,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": null,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    });
    if c.qkv_bias {
        v["use_sliding_window"] = false.into();
    } else {
        v["attention_bias"] = false.into();
        v["mlp_bias"] = false.into();
    }
    v
}

/// Read a `llama` or `qwen2` config.json; what Kiln cannot run (rope scaling, o_proj/MLP biases, another head_dim,
/// sliding windows, another activation) is refused by name rather than computed wrongly.
pub(crate) fn from_hf_json(v: &serde_json::Value) -> Result<ModelConfig> {
    let j = HfJson(v);
    let qwen = v.get("model_type").and_then(|x| x.as_str()) == Some("qwen2");
    let unsupported =
        |what: &str| Err(ModelError::Config(format!("config.json sets {what}, which Kiln does not support")));
    if j.set("rope_scaling") {
        return unsupported(&format!("rope_scaling = {}", v["rope_scaling"]));
    }
    if !qwen && j.set("attention_bias") {
        return unsupported("attention_bias (biases on all four attention projections)");
    }
    if j.set("mlp_bias") {
        return unsupported("mlp_bias");
    }
    if qwen && j.set("use_sliding_window") {
        return unsupported("use_sliding_window");
    }
    if let Some(act) = v.get("hidden_act").and_then(|x| x.as_str()).filter(|a| *a != "silu") {
        return unsupported(&format!("hidden_act = {act:?} (Kiln's SwiGLU uses silu)"));
    }
    let (n_embd, n_head) = (j.need("hidden_size")?, j.need("num_attention_heads")?);
    if let Some(hd) = j.usize("head_dim").filter(|&hd| n_head == 0 || hd * n_head != n_embd) {
        return unsupported(&format!("head_dim = {hd} ≠ hidden_size / num_attention_heads"));
    }
    let n_kv = j.usize("num_key_value_heads").unwrap_or(n_head);
    let mut c = ModelConfig::llama(
        j.need("vocab_size")?,
        j.need("max_position_embeddings")?,
        j.need("num_hidden_layers")?,
        (n_head, n_kv),
        n_embd,
        j.need("intermediate_size")?,
    );
    c.norm_eps = j.f64("rms_norm_eps").unwrap_or(1e-6);
    c.rope_theta = j.f64("rope_theta").unwrap_or(10_000.0);
    // transformers' LlamaConfig and Qwen2Config default to an untied head.
    c.tie_embeddings = j.bool("tie_word_embeddings").unwrap_or(false);
    c.qkv_bias = qwen;
    Ok(c)
}
