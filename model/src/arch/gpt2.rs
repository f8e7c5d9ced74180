//! GPT-2: learned position embeddings, pre-LayerNorm blocks, GELU(tanh) MLP, biases everywhere, lm_head tied to
//! the token embedding. Kiln's names are Hugging Face's `GPT2LMHeadModel` names and its Conv1D weights are stored
//! as they are, [in, out] (y = x·W + b), so the schema is the identity but for name clean-up on import.

use std::collections::HashMap;

use kiln_engine::ops::matmul::MatmulSpec;

use super::config::{HfJson, ModelConfig};
use super::schema::{drop_tied_head, schema_err};
use super::{BlockLayout, Init, Layout, Linear, Norm, ParamSpec, TableBuilder};
use crate::checkpoint::HostTensor;
use crate::error::{ModelError, Result};

/// GPT-2 initialisation: weights N(0, 0.02), the two residual projections of each block N(0, 0.02/√(2L)) so the
/// residual stream's variance does not grow with depth, biases 0, LayerNorm gains 1. Matrices decay.
pub(crate) fn table(c: &ModelConfig) -> (Vec<ParamSpec>, Layout) {
    let (d, inner) = (c.n_embd, c.n_inner);
    let normal = Init::Normal { std: 0.02 };
    let resid = Init::Normal { std: 0.02 / (2.0 * c.n_layer as f32).sqrt() };
    let mut t = TableBuilder::default();
    let wte = t.push("transformer.wte.weight".into(), vec![c.vocab_size, d], normal, true);
    let wpe = t.push("transformer.wpe.weight".into(), vec![c.n_ctx, d], normal, true);
    let norm = |t: &mut TableBuilder, name: String| Norm::Layer {
        gamma: t.push(format!("{name}.weight"), vec![d], Init::Ones, false),
        beta: t.push(format!("{name}.bias"), vec![d], Init::Zeros, false),
    };
    let linear = |t: &mut TableBuilder, name: String, (i, o): (usize, usize), init: Init| Linear {
        w: t.push(format!("{name}.weight"), vec![i, o], init, true),
        b: Some(t.push(format!("{name}.bias"), vec![o], Init::Zeros, false)),
        spec: MatmulSpec::nn(),
    };
    let blocks = (0..c.n_layer)
        .map(|i| {
            let p = format!("transformer.h.{i}");
            BlockLayout {
                norm_1: norm(&mut t, format!("{p}.ln_1")),
                qkv: linear(&mut t, format!("{p}.attn.c_attn"), (d, 3 * d), normal),
                proj: linear(&mut t, format!("{p}.attn.c_proj"), (d, d), resid),
                norm_2: norm(&mut t, format!("{p}.ln_2")),
                up: linear(&mut t, format!("{p}.mlp.c_fc"), (d, inner), normal),
                down: linear(&mut t, format!("{p}.mlp.c_proj"), (inner, d), resid),
            }
        })
        .collect();
    let norm_f = norm(&mut t, "transformer.ln_f".into());
    let head = Linear { w: wte, b: None, spec: MatmulSpec::nt() };
    (t.specs, Layout { wte, wpe: Some(wpe), blocks, norm_f, head })
}

/// Names as Kiln expects them: files saved from GPT2Model on the Hub lack the "transformer." prefix ("h.0.ln_1.weight",
/// "wte.weight"); old files carry non-parameter buffers ("h.{i}.attn.bias", "h.{i}.attn.masked_bias") and sometimes
/// "lm_head.weight" (tied: dropped if equal to wte, else an error). Names it does not recognise pass through, for
/// the table check to report.
pub(crate) fn import(_config: &ModelConfig, tensors: Vec<HostTensor>) -> Result<Vec<HostTensor>> {
    let mut out: Vec<HostTensor> = Vec::with_capacity(tensors.len());
    let mut origin: HashMap<String, String> = HashMap::new();
    for mut t in tensors {
        let bare = t.name.strip_prefix("transformer.").unwrap_or(&t.name);
        if is_attn_buffer(bare) {
            continue;
        }
        let original = t.name.clone();
        if !t.name.starts_with("transformer.") && ["wte.", "wpe.", "h.", "ln_f."].iter().any(|p| t.name.starts_with(p))
        {
            t.name = format!("transformer.{}", t.name);
        }
        // Two spellings of one tensor is ambiguous; the same name twice is left for the table check to report.
        if let Some(first) = origin.insert(t.name.clone(), original.clone()) {
            if first != original {
                return Err(schema_err(format!("{first} and {original} both name {}", t.name)));
            }
        }
        out.push(t);
    }
    drop_tied_head(&mut out, "transformer.wte.weight")?;
    Ok(out)
}

fn is_attn_buffer(unprefixed: &str) -> bool {
    let Some(rest) = unprefixed.strip_prefix("h.") else { return false };
    let Some((layer, rest)) = rest.split_once('.') else { return false };
    !layer.is_empty() && layer.bytes().all(|b| b.is_ascii_digit()) && matches!(rest, "attn.bias" | "attn.masked_bias")
}

/// The Hugging Face `config.json` (`model_type: gpt2`).
pub(crate) fn to_hf_json(c: &ModelConfig) -> serde_json::Value {
    serde_json::json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size,
        "n_positions": c.n_ctx,
        "n_ctx": c.n_ctx,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": if c.n_inner == 4 * c.n_embd { serde_json::Value::Null } else { c.n_inner.into() },
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.norm_eps,
        "tie_word_embeddings": true,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    })
}

/// Read the shape from a GPT-2 `config.json` (`n_positions` or `n_ctx`; `n_inner` null = 4·n_embd).
pub(crate) fn from_hf_json(v: &serde_json::Value) -> Result<ModelConfig> {
    let j = HfJson(v);
    if let Some(act) = v.get("activation_function").and_then(|x| x.as_str()) {
        if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
            return Err(ModelError::Config(format!(
                "config.json activation_function is {act:?}; Kiln's GPT-2 uses the tanh GELU (gelu_new)"
            )));
        }
    }
    if j.bool("tie_word_embeddings") == Some(false) {
        return Err(ModelError::Config("config.json unties the GPT-2 head; Kiln's GPT-2 ties it".into()));
    }
    let n_embd = j.need("n_embd")?;
    let n_ctx = j.usize("n_positions").or_else(|| j.usize("n_ctx"));
    let n_ctx = n_ctx.ok_or_else(|| ModelError::Config("config.json lacks n_positions".into()))?;
    let mut c = ModelConfig::gpt2(j.need("vocab_size")?, n_ctx, j.need("n_layer")?, j.need("n_head")?, n_embd);
    c.n_inner = j.usize("n_inner").unwrap_or(4 * n_embd);
    c.norm_eps = j.f64("layer_norm_epsilon").unwrap_or(1e-5);
    Ok(c)
}
