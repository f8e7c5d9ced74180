//! GPT-2 shaped model configurations: presets, TOML files, and the Hugging Face `config.json` fields.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The shape of a GPT-2 style model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Context length (maximum positions).
    pub n_ctx: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
}

impl GptConfig {
    /// `tiny` trains in minutes on a software GPU; `small` is a laptop-GPU model; `gpt2` is the real 124M shape.
    pub fn preset(name: &str, vocab_size: usize) -> Result<GptConfig> {
        let (n_ctx, n_layer, n_head, n_embd) = match name {
            "tiny" => (128, 2, 4, 128),
            "small" => (256, 6, 6, 384),
            "gpt2" => (1024, 12, 12, 768),
            other => return Err(ModelError::Config(format!("unknown preset {other:?}: use tiny, small or gpt2"))),
        };
        let c = GptConfig { vocab_size, n_ctx, n_layer, n_head, n_embd };
        c.validate()?;
        Ok(c)
    }

    /// Read a TOML file with the five fields.
    pub fn from_toml(text: &str) -> Result<GptConfig> {
        let c: GptConfig = toml::from_str(text).map_err(|e| ModelError::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("vocab_size", self.vocab_size),
            ("n_ctx", self.n_ctx),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(ModelError::Config(format!("{name} must be at least 1")));
        }
        if self.n_embd % self.n_head != 0 {
            return Err(ModelError::Config(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        let head = self.n_embd / self.n_head;
        if head > kiln_engine::ops::attention::MAX_HEAD_SIZE {
            return Err(ModelError::Config(format!(
                "head size n_embd / n_head = {head} exceeds the attention kernel's maximum of {}",
                kiln_engine::ops::attention::MAX_HEAD_SIZE
            )));
        }
        if self.vocab_size > i32::MAX as usize {
            return Err(ModelError::Config(format!("vocab_size {} does not fit token ids (i32)", self.vocab_size)));
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Parameter count (lm_head tied to the token embedding, so not counted twice).
    pub fn num_params(&self) -> usize {
        let c = self.n_embd;
        let block = 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c);
        self.vocab_size * c + self.n_ctx * c + self.n_layer * block + 2 * c
    }

    /// The Hugging Face `config.json` of this shape (`model_type: gpt2`), so other GPT-2 tools can load it.
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": null,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": true,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        })
    }

    /// Read the shape from a Hugging Face GPT-2 `config.json` (`n_positions` or `n_ctx`).
    pub fn from_hf_json(v: &serde_json::Value) -> Result<GptConfig> {
        let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let need = |k: &str| get(k).ok_or_else(|| ModelError::Config(format!("config.json lacks {k}")));
        if let Some(t) = v.get("model_type").and_then(|x| x.as_str()) {
            if t != "gpt2" {
                return Err(ModelError::Config(format!("config.json model_type is {t:?}, Kiln reads gpt2")));
            }
        }
        if get("n_inner").is_some_and(|n| n != 4 * get("n_embd").unwrap_or(0)) {
            return Err(ModelError::Config("config.json n_inner must be 4·n_embd (GPT-2's MLP)".into()));
        }
        let c = GptConfig {
            vocab_size: need("vocab_size")?,
            n_ctx: get("n_positions")
                .or_else(|| get("n_ctx"))
                .ok_or_else(|| ModelError::Config("config.json lacks n_positions".into()))?,
            n_layer: need("n_layer")?,
            n_head: need("n_head")?,
            n_embd: need("n_embd")?,
        };
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_preset_has_124m_parameters() {
        let c = GptConfig::preset("gpt2", 50257).unwrap();
        assert_eq!(c.num_params(), 124_439_808);
    }

    #[test]
    fn bad_shapes_are_rejected_with_reasons() {
        let bad = GptConfig { vocab_size: 10, n_ctx: 8, n_layer: 1, n_head: 3, n_embd: 16 };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("divisible"), "{e}");
        assert!(GptConfig::preset("huge", 10).is_err());
        let zero = GptConfig { n_layer: 0, ..GptConfig::preset("tiny", 10).unwrap() };
        assert!(zero.validate().unwrap_err().to_string().contains("n_layer"));
        let toml_text = "vocab_size = 100\nn_ctx = 32\nn_layer = 2\nn_head = 2\nn_embd = 32\n";
        assert_eq!(GptConfig::from_toml(toml_text).unwrap().n_embd, 32);
        assert!(GptConfig::from_toml("vocab_size = 1").is_err());
    }

    #[test]
    fn hf_config_round_trips() {
        let c = GptConfig::preset("small", 4096).unwrap();
        assert_eq!(GptConfig::from_hf_json(&c.to_hf_json()).unwrap(), c);
    }
}
