//! kiln-model: the GPT model, tokenizer, data pipeline, checkpoints, generation and trainers, built on
//! kiln-engine's kernels and autodiff tape.

pub mod config;
pub mod error;

pub use config::GptConfig;
pub use error::{ModelError, Result};
