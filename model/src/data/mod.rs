//! Text and tasks: the byte-level BPE tokenizer, corpus shards and batch samplers, the chat format of
//! fine-tuning, and the synthetic tasks the post-training study scores.

pub mod chat;
mod shards;
pub mod tasks;
pub mod tokenizer;

pub use shards::*;
