//! Between Kiln's parameter table and Hugging Face tensor files: exact name/shape checks with one error naming
//! every problem, and each family's import (HF names → table order) and export (table → HF names).

use std::collections::{HashMap, HashSet};

use super::config::{Family, ModelConfig};
use super::{gpt2, llama, ParamSpec};
use crate::checkpoint::HostTensor;
use crate::error::{ModelError, Result};

/// Stands in for a path in errors about tensors that did not come from a file (the loader adds the file).
pub(crate) const IN_MEMORY: &str = "(in-memory tensors)";

pub(crate) fn schema_err(message: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: IN_MEMORY.into(), message: message.into() }
}

/// Hugging Face tensors (names as on the Hub) → Kiln's table order for `config`, or one error naming every
/// missing, unexpected, misshapen or duplicated tensor.
pub fn import_hf(config: &ModelConfig, tensors: Vec<HostTensor>) -> Result<Vec<HostTensor>> {
    let internal = match config.family {
        Family::Gpt2 => gpt2::import(config, tensors)?,
        Family::Llama => llama::import(config, tensors)?,
    };
    let hint = match config.family {
        // Kiln keeps GPT-2's Conv1D layout; a [out, in] file was usually converted from a Linear-based port.
        Family::Gpt2 => Some("GPT-2's Conv1D stores [in, out]"),
        Family::Llama => None,
    };
    in_table_order(config, &super::param_table(config), internal, hint)
}

/// Kiln's tensors (table order, as `Model::to_host` returns them) → Hugging Face names and layouts.
pub fn export_hf(config: &ModelConfig, tensors: &[HostTensor]) -> Result<Vec<HostTensor>> {
    if let Some(m) = mismatch(config, &expected(&super::param_table(config)), tensors, None) {
        return Err(schema_err(format!("refusing to export: {m}")));
    }
    Ok(match config.family {
        Family::Gpt2 => tensors.to_vec(),
        Family::Llama => llama::export(config, tensors),
    })
}

fn expected(specs: &[ParamSpec]) -> Vec<(String, Vec<usize>)> {
    specs.iter().map(|s| (s.name.clone(), s.shape.clone())).collect()
}

/// `tensors` (Kiln names) checked against the table and returned in its order.
pub(crate) fn in_table_order(
    config: &ModelConfig,
    specs: &[ParamSpec],
    tensors: Vec<HostTensor>,
    transposed_hint: Option<&str>,
) -> Result<Vec<HostTensor>> {
    if let Some(m) = mismatch(config, &expected(specs), &tensors, transposed_hint) {
        return Err(schema_err(m));
    }
    let mut by_name: HashMap<String, HostTensor> = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    Ok(specs.iter().map(|s| by_name.remove(&s.name).expect("checked: every expected tensor is present")).collect())
}

fn name_list(names: &[String]) -> String {
    // A wrong n_layer makes hundreds of names missing; the first few say enough.
    const SHOWN: usize = 24;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", … and {} more", names.len() - SHOWN));
    }
    s
}

/// None when `tensors` hold exactly the `expected` names and shapes. `transposed_hint` is added to a wrong shape
/// that is the transpose of the expected one.
pub(crate) fn mismatch(
    config: &ModelConfig,
    expected: &[(String, Vec<usize>)],
    tensors: &[HostTensor],
    transposed_hint: Option<&str>,
) -> Option<String> {
    let want: HashMap<&str, &[usize]> = expected.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    let mut seen = HashSet::new();
    let (mut unexpected, mut wrong, mut duplicated) = (Vec::new(), Vec::new(), Vec::new());
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            duplicated.push(t.name.clone());
            continue;
        }
        let Some(&shape) = want.get(t.name.as_str()) else {
            unexpected.push(t.name.clone());
            continue;
        };
        if t.shape != shape {
            let transposed = t.shape.len() == 2 && shape.len() == 2 && t.shape[0] == shape[1] && t.shape[1] == shape[0];
            let hint = match transposed_hint {
                Some(h) if transposed => format!(", transposed: {h}"),
                _ => String::new(),
            };
            wrong.push(format!("{} is {:?}, expected {:?}{hint}", t.name, t.shape, shape));
        } else if t.data.len() != t.numel() {
            wrong.push(format!("{} is {:?} but holds {} values", t.name, t.shape, t.data.len()));
        }
    }
    let missing: Vec<String> =
        expected.iter().filter(|(n, _)| !seen.contains(n.as_str())).map(|(n, _)| n.clone()).collect();
    let mut parts = Vec::new();
    for (what, list) in
        [("missing", &missing), ("unexpected", &unexpected), ("wrong shape", &wrong), ("duplicated", &duplicated)]
    {
        if !list.is_empty() {
            parts.push(format!("{what} ({}): {}", list.len(), name_list(list)));
        }
    }
    (!parts.is_empty()).then(|| {
        let c = config;
        format!(
            "tensors do not match the {} config (vocab_size {}, n_ctx {}, n_layer {}, n_embd {}, n_head {}, \
             n_kv_head {}): {}",
            c.family.name(),
            c.vocab_size,
            c.n_ctx,
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.n_kv_head,
            parts.join("; ")
        )
    })
}

/// Drop an `lm_head.weight` that equals the tied embedding `embed`; error if it differs (an untied head under a
/// tied config) or the embedding is missing.
pub(crate) fn drop_tied_head(tensors: &mut Vec<HostTensor>, embed: &str) -> Result<()> {
    let Some(i) = tensors.iter().position(|t| t.name == "lm_head.weight") else { return Ok(()) };
    let head = tensors.remove(i);
    let Some(wte) = tensors.iter().find(|t| t.name == embed) else {
        return Err(schema_err(format!("lm_head.weight is present but {embed} is missing")));
    };
    let tied = wte.shape == head.shape
        && wte.data.len() == head.data.len()
        && wte.data.iter().zip(&head.data).all(|(a, b)| a.to_bits() == b.to_bits());
    if !tied {
        return Err(schema_err(format!(
            "lm_head.weight differs from {embed}, but the config ties the output head to the token embedding \
             (for the llama family set tie_word_embeddings: false in config.json)"
        )));
    }
    Ok(())
}
