//! kiln-model: language-model architectures (GPT-2, Llama family), tokenizer and data, checkpoints, training
//! stages (pretraining, SFT, RL), evaluation and generation, built on kiln-engine's kernels and autodiff tape.
//!
//! - `arch`: the model, defined once (parameter table + one block forward) for every family, and each family's
//!   Hugging Face schema.
//! - `data`: tokenizer, token shards and batches, chat format, synthetic tasks.
//! - `train`: the optimizer and the training stages.
//! - `eval`: evaluation suite and generation (KV cache, sampling, rollouts).
//! - `checkpoint`: the on-disk format and atomic directory writes (`atomic`: the crate's one atomic file writer).

pub mod arch;
pub mod atomic;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod train;

#[cfg(test)]
mod test_util;

pub use arch::config::{Family, ModelConfig};
pub use error::{ModelError, Result};
