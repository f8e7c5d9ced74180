//! Training stages on one optimizer and one loop: pretraining, supervised fine-tuning, policy-gradient RL.

pub mod driver;
pub mod optim;
pub mod pretrain;
pub mod rl;
pub mod sft;
