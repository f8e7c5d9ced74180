//! kiln-model: the GPT model, tokenizer, data pipeline, checkpoints, generation and trainers, built on
//! kiln-engine's kernels and autodiff tape.

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod evaluate;
pub mod generate;
pub mod gpt;
pub mod rl;
pub mod sft;
pub mod tasks;
pub mod tokenizer;
pub mod train;

#[cfg(test)]
mod test_util;

pub use config::GptConfig;
pub use error::{ModelError, Result};
