//! Training stages on one optimizer and one loop: pretraining, supervised fine-tuning, policy-gradient RL.

pub mod collective;
pub mod data_parallel;
pub mod driver;
pub mod onpolicy;
pub mod optim;
pub mod pretrain;
pub mod rl;
pub mod sft;
