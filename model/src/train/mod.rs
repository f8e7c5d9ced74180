//! Training stages on one optimizer: pretraining, supervised fine-tuning, policy-gradient RL.

pub mod pretrain;
pub mod rl;
pub mod sft;
