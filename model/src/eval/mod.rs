//! Using a trained model: generation with a KV cache (sessions, sampling, batched rollouts) and the evaluation
//! suite (pass@k, bits per byte, KL between models).

pub mod evaluate;
pub mod generate;
pub mod stats;
