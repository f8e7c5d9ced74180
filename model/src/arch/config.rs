//! The shape of a model: its family (GPT-2 or Llama), sizes, presets and TOML files. Each family reads and writes
//! its own Hugging Face `config.json` (arch/gpt2.rs, arch/llama.rs).

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Architecture families. Both run the same block (arch/mod.rs); they differ in the parts it is built from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Learned positions, LayerNorm with biases, GELU(tanh) MLP, biases everywhere, tied head.
    #[default]
    Gpt2,
    /// Rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases (Qwen2: q/k/v biases),
    /// tied or untied head.
    Llama,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
        }
    }
}

/// The shape of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub family: Family,
    pub vocab_size: usize,
    /// Context length (maximum positions).
    pub n_ctx: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Key/value heads (grouped-query attention when < n_head). GPT-2: n_head.
    pub n_kv_head: usize,
    /// Hidden width of the MLP. GPT-2: 4·n_embd.
    pub n_inner: usize,
    /// Rotary base (Llama family only).
    pub rope_theta: f64,
    /// LayerNorm / RMSNorm epsilon.
    pub norm_eps: f64,
    /// The output head is the token embedding (always for GPT-2).
    pub tie_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2); GPT-2 has biases everywhere regardless.
    pub qkv_bias: bool,
}

/// What a TOML file may say: the family and five sizes are required, the rest default by family.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    family: Family,
    vocab_size: usize,
    n_ctx: usize,
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    n_kv_head: Option<usize>,
    n_inner: Option<usize>,
    rope_theta: Option<f64>,
    norm_eps: Option<f64>,
    tie_embeddings: Option<bool>,
    qkv_bias: Option<bool>,
}

impl ModelConfig {
    /// A GPT-2 shape (MLP 4C, LayerNorm eps 1e-5, tied head).
    pub fn gpt2(vocab_size: usize, n_ctx: usize, n_layer: usize, n_head: usize, n_embd: usize) -> ModelConfig {
        ModelConfig {
            family: Family::Gpt2,
            vocab_size,
            n_ctx,
            n_layer,
            n_head,
            n_embd,
            n_kv_head: n_head,
            n_inner: 4 * n_embd,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            qkv_bias: false,
        }
    }

    /// A Llama shape with `n_kv_head` key/value heads and MLP width `n_inner` (RMSNorm eps 1e-5, θ = 10000,
    /// tied head, no biases: change the fields for other variants).
    pub fn llama(
        vocab_size: usize,
        n_ctx: usize,
        n_layer: usize,
        (n_head, n_kv_head): (usize, usize),
        n_embd: usize,
        n_inner: usize,
    ) -> ModelConfig {
        ModelConfig {
            family: Family::Llama,
            n_kv_head,
            n_inner,
            ..ModelConfig::gpt2(vocab_size, n_ctx, n_layer, n_head, n_embd)
        }
    }

    /// GPT-2 presets: `tiny` trains in minutes on a software GPU; `small` is a laptop-GPU model; `gpt2` is the
    /// real 124M shape. Llama family: `llama-tiny` (minutes on a software GPU) and `smollm2-135m` (SmolLM2-135M's
    /// real shape: 30 layers, width 576, 9 heads, 3 KV heads, MLP 1536, θ = 100000, tied).
    pub fn preset(name: &str, vocab_size: usize) -> Result<ModelConfig> {
        let c = match name {
            "tiny" => ModelConfig::gpt2(vocab_size, 128, 2, 4, 128),
            "small" => ModelConfig::gpt2(vocab_size, 256, 6, 6, 384),
            "gpt2" => ModelConfig::gpt2(vocab_size, 1024, 12, 12, 768),
            "llama-tiny" => ModelConfig::llama(vocab_size, 128, 2, (4, 2), 128, 352),
            "smollm2-135m" => {
                ModelConfig { rope_theta: 100_000.0, ..ModelConfig::llama(vocab_size, 2048, 30, (9, 3), 576, 1536) }
            }
            other => return Err(ModelError::Config(format!("unknown preset {other:?}: use {}", PRESETS.join(", ")))),
        };
        c.validate()?;
        Ok(c)
    }

    /// Read a TOML file: `family` ("gpt2" or "llama", default gpt2), vocab_size, n_ctx, n_layer, n_head, n_embd,
    /// and optionally n_kv_head, n_inner, rope_theta, norm_eps, tie_embeddings, qkv_bias.
    pub fn from_toml(text: &str) -> Result<ModelConfig> {
        let f: ConfigFile = toml::from_str(text).map_err(|e| ModelError::Config(e.to_string()))?;
        let base = match f.family {
            Family::Gpt2 => ModelConfig::gpt2(f.vocab_size, f.n_ctx, f.n_layer, f.n_head, f.n_embd),
            Family::Llama => {
                let inner = f.n_inner.unwrap_or(f.n_embd * 8 / 3);
                ModelConfig::llama(f.vocab_size, f.n_ctx, f.n_layer, (f.n_head, f.n_head), f.n_embd, inner)
            }
        };
        let c = ModelConfig {
            n_kv_head: f.n_kv_head.unwrap_or(base.n_kv_head),
            n_inner: f.n_inner.unwrap_or(base.n_inner),
            rope_theta: f.rope_theta.unwrap_or(base.rope_theta),
            norm_eps: f.norm_eps.unwrap_or(base.norm_eps),
            tie_embeddings: f.tie_embeddings.unwrap_or(base.tie_embeddings),
            qkv_bias: f.qkv_bias.unwrap_or(base.qkv_bias),
            ..base
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        let fields = [
            ("vocab_size", self.vocab_size),
            ("n_ctx", self.n_ctx),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("n_kv_head", self.n_kv_head),
            ("n_inner", self.n_inner),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be at least 1"));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!("n_embd ({}) must be divisible by n_head ({})", self.n_embd, self.n_head));
        }
        let head = self.head_size();
        if head > kiln_engine::ops::attention::MAX_HEAD_SIZE {
            return bad(format!(
                "head size n_embd / n_head = {head} exceeds the attention kernel's maximum of {}",
                kiln_engine::ops::attention::MAX_HEAD_SIZE
            ));
        }
        if self.vocab_size > i32::MAX as usize {
            return bad(format!("vocab_size {} does not fit token ids (i32)", self.vocab_size));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return bad(format!("norm_eps must be positive, got {}", self.norm_eps));
        }
        match self.family {
            Family::Gpt2 => {
                if self.n_kv_head != self.n_head || !self.tie_embeddings || self.qkv_bias {
                    return bad("GPT-2 has n_kv_head = n_head, a tied head and biases everywhere: \
                                n_kv_head, tie_embeddings and qkv_bias belong to the llama family"
                        .into());
                }
            }
            Family::Llama => {
                if !self.n_head.is_multiple_of(self.n_kv_head) {
                    return bad(format!(
                        "n_kv_head ({}) must divide n_head ({}): each key/value head serves a whole group",
                        self.n_kv_head, self.n_head
                    ));
                }
                if !head.is_multiple_of(2) {
                    return bad(format!("rotary embeddings need an even head size, n_embd / n_head = {head}"));
                }
                if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
                    return bad(format!("rope_theta must be positive, got {}", self.rope_theta));
                }
            }
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Width of the fused q/k/v projection: (n_head + 2·n_kv_head)·head_size.
    pub fn qkv_width(&self) -> usize {
        (self.n_head + 2 * self.n_kv_head) * self.head_size()
    }

    /// Parameter count (a tied head is not counted twice).
    pub fn num_params(&self) -> usize {
        super::param_table(self).iter().map(|p| p.shape.iter().product::<usize>()).sum()
    }

    /// The Hugging Face `config.json` of this shape (`gpt2`, `llama` or `qwen2`).
    pub fn to_hf_json(&self) -> serde_json::Value {
        match self.family {
            Family::Gpt2 => super::gpt2::to_hf_json(self),
            Family::Llama => super::llama::to_hf_json(self),
        }
    }

    /// Read a Hugging Face `config.json` by its `model_type` (gpt2 when absent, as in old GPT-2 files).
    pub fn from_hf_json(v: &serde_json::Value) -> Result<ModelConfig> {
        let c = match v.get("model_type").and_then(|x| x.as_str()).unwrap_or("gpt2") {
            "gpt2" => super::gpt2::from_hf_json(v)?,
            "llama" | "qwen2" => super::llama::from_hf_json(v)?,
            other => {
                return Err(ModelError::Config(format!(
                    "config.json model_type is {other:?}; Kiln reads gpt2, llama and qwen2"
                )))
            }
        };
        c.validate()?;
        Ok(c)
    }
}

/// Every preset name, for help texts and errors.
pub const PRESETS: [&str; 5] = ["tiny", "small", "gpt2", "llama-tiny", "smollm2-135m"];

/// Reading a field of a Hugging Face config.json.
pub(crate) struct HfJson<'a>(pub &'a serde_json::Value);

impl HfJson<'_> {
    pub(crate) fn usize(&self, k: &str) -> Option<usize> {
        self.0.get(k).and_then(|x| x.as_u64()).map(|x| x as usize)
    }
    pub(crate) fn need(&self, k: &str) -> Result<usize> {
        self.usize(k).ok_or_else(|| ModelError::Config(format!("config.json lacks {k}")))
    }
    pub(crate) fn f64(&self, k: &str) -> Option<f64> {
        self.0.get(k).and_then(|x| x.as_f64())
    }
    pub(crate) fn bool(&self, k: &str) -> Option<bool> {
        self.0.get(k).and_then(|x| x.as_bool())
    }
    /// Present and neither null nor false.
    pub(crate) fn set(&self, k: &str) -> bool {
        self.0.get(k).is_some_and(|x| !x.is_null() && x.as_bool() != Some(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_their_published_parameter_counts() {
        assert_eq!(ModelConfig::preset("gpt2", 50257).unwrap().num_params(), 124_439_808);
        // SmolLM2-135M: 134,515,008 parameters (tied embeddings).
        assert_eq!(ModelConfig::preset("smollm2-135m", 49152).unwrap().num_params(), 134_515_008);
        for p in PRESETS {
            ModelConfig::preset(p, 300).unwrap();
        }
    }

    #[test]
    fn bad_shapes_are_rejected_with_reasons() {
        let bad = ModelConfig::gpt2(10, 8, 1, 3, 16);
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("divisible"), "{e}");
        assert!(ModelConfig::preset("huge", 10).unwrap_err().to_string().contains("llama-tiny"));
        let zero = ModelConfig { n_layer: 0, ..ModelConfig::preset("tiny", 10).unwrap() };
        assert!(zero.validate().unwrap_err().to_string().contains("n_layer"));
        let toml_text = "vocab_size = 100\nn_ctx = 32\nn_layer = 2\nn_head = 2\nn_embd = 32\n";
        assert_eq!(ModelConfig::from_toml(toml_text).unwrap(), ModelConfig::gpt2(100, 32, 2, 2, 32));
        assert!(ModelConfig::from_toml("vocab_size = 1").is_err());
        let gqa = ModelConfig { n_kv_head: 3, ..ModelConfig::preset("llama-tiny", 10).unwrap() };
        assert!(gqa.validate().unwrap_err().to_string().contains("divide"));
        let gpt_gqa = ModelConfig { n_kv_head: 2, ..ModelConfig::preset("tiny", 10).unwrap() };
        assert!(gpt_gqa.validate().unwrap_err().to_string().contains("llama"));
        let odd = ModelConfig::llama(10, 8, 1, (4, 4), 12, 16);
        assert!(odd.validate().unwrap_err().to_string().contains("even"));
    }

    #[test]
    fn llama_toml_fills_family_defaults() {
        let text = "family = \"llama\"\nvocab_size = 100\nn_ctx = 32\nn_layer = 2\nn_head = 4\nn_kv_head = 2\n\
                    n_embd = 32\nrope_theta = 500000.0\n";
        let c = ModelConfig::from_toml(text).unwrap();
        assert_eq!((c.family, c.n_kv_head, c.n_inner, c.rope_theta), (Family::Llama, 2, 85, 500000.0));
        assert!(ModelConfig::from_toml(&format!("{text}bogus = 1\n")).unwrap_err().to_string().contains("bogus"));
    }

    #[test]
    fn hf_config_round_trips() {
        for (p, v) in [("small", 4096), ("llama-tiny", 300), ("smollm2-135m", 49152)] {
            let c = ModelConfig::preset(p, v).unwrap();
            assert_eq!(ModelConfig::from_hf_json(&c.to_hf_json()).unwrap(), c, "{p}");
        }
        let untied_qwen =
            ModelConfig { tie_embeddings: false, qkv_bias: true, ..ModelConfig::preset("llama-tiny", 300).unwrap() };
        let json = untied_qwen.to_hf_json();
        assert_eq!(json["model_type"], "qwen2");
        assert_eq!(ModelConfig::from_hf_json(&json).unwrap(), untied_qwen);
    }
}
