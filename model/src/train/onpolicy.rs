//! On-policy supervised fine-tuning (rejection-sampling fine-tuning): sample completions from the current model,
//! keep those the reward accepts, and fine-tune on exactly those tokens. It has RL's data (the model's own
//! samples, filtered by the reward) with SFT's loss, so comparing it with GRPO and with SFT on reference answers
//! separates "RL" from "on-policy data" (Retaining by Doing, arXiv 2510.18874).

use std::sync::Arc;

use crate::arch::Model;
use crate::data::chat::{ChatSequence, ChatTokens};
use crate::data::tasks::Example;
use crate::data::tokenizer::Tokenizer;
use crate::error::{ModelError, Result};
use crate::eval::evaluate::{chat_prompts, sample_rewards, TEMPERATURE_1};
use crate::eval::generate::{Completion, GenerateConfig};
use crate::train::sft::SftSource;
use kiln_engine::Gpu;

/// The accepted samples of one round, ready to train on.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    pub sequences: Vec<ChatSequence>,
    /// Completions drawn and accepted this round.
    pub drawn: usize,
    pub accepted: usize,
}

impl Accepted {
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.drawn.max(1) as f64
    }
}

/// The completions with reward ≥ 1 as training sequences: the prompt untrained, the sampled tokens trained (and
/// the end marker, appended where the sample ran out of tokens before emitting it, so the model learns to stop).
pub fn accepted_sequences(prompts: &[Vec<u32>], outs: &[Vec<Completion>], rewards: &[Vec<f32>], end: u32) -> Accepted {
    let mut sequences = Vec::new();
    let mut drawn = 0;
    for ((prompt, group), scores) in prompts.iter().zip(outs).zip(rewards) {
        for (c, &r) in group.iter().zip(scores) {
            drawn += 1;
            if r < 1.0 {
                continue;
            }
            let mut completion: Vec<u32> = c.tokens.iter().copied().take_while(|&t| t != end).collect();
            completion.push(end);
            let mut tokens = prompt.clone();
            let mut trained = vec![false; prompt.len()];
            trained.extend(std::iter::repeat_n(true, completion.len()));
            tokens.extend(completion);
            sequences.push(ChatSequence { tokens, trained });
        }
    }
    let accepted = sequences.len();
    Accepted { sequences, drawn, accepted }
}

/// One round of rejection sampling: `samples` completions per example from `model` at temperature 1 (seeded by
/// `seed`), the accepted ones kept.
pub fn rejection_sample(
    gpu: &Gpu,
    model: &Model,
    tok: &Tokenizer,
    examples: &[Example],
    samples: usize,
    max_new_tokens: usize,
    seed: u64,
) -> Result<Accepted> {
    let ct = ChatTokens::from_tokenizer(tok)?;
    let prompts = chat_prompts(tok, ct, examples, model.config.n_ctx)?;
    let gen = GenerateConfig { max_new_tokens, sampling: TEMPERATURE_1, seed, stop_token: None, vocab_limit: None };
    let (rewards, outs) = sample_rewards(gpu, model, tok, examples, samples, gen)?;
    Ok(accepted_sequences(&prompts, &outs, &rewards, ct.end))
}

/// A fine-tuning stream over one round's accepted samples; an error that says so when the reward accepted none
/// (on-policy fine-tuning needs a starting model that already solves some prompts).
pub fn accepted_source(
    accepted: Accepted,
    end: u32,
    batch: usize,
    time: usize,
    seed: u64,
    mix: Option<(Arc<Vec<u32>>, f64)>,
) -> Result<SftSource> {
    if accepted.sequences.is_empty() {
        return Err(ModelError::Data(format!(
            "on-policy fine-tuning: the reward accepted none of {} samples; start from a model with non-zero reward",
            accepted.drawn
        )));
    }
    SftSource::from_sequences(accepted.sequences, end, batch, time, seed, mix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::pretrain::BatchSource;

    #[test]
    fn only_accepted_samples_are_trained_on_and_only_their_completions() {
        let end = 99;
        let prompts = vec![vec![1, 2, 3], vec![4, 5]];
        let c = |tokens: &[u32]| Completion { tokens: tokens.to_vec(), stopped: tokens.contains(&end) };
        let outs = vec![vec![c(&[10, 11, end]), c(&[12, end]), c(&[13, 14])], vec![c(&[20, end]), c(&[21, 22])]];
        let rewards = vec![vec![1.0, 0.0, 1.0], vec![0.0, 0.0]];
        let a = accepted_sequences(&prompts, &outs, &rewards, end);
        assert_eq!((a.drawn, a.accepted), (5, 2));
        assert_eq!(a.sequences[0].tokens, vec![1, 2, 3, 10, 11, end]);
        assert_eq!(a.sequences[0].trained, vec![false, false, false, true, true, true]);
        // A sample cut off before its end marker gets one, so the model learns to stop.
        assert_eq!(a.sequences[1].tokens, vec![1, 2, 3, 13, 14, end]);
        // The stream built from them trains exactly the accepted completions' tokens, nothing else.
        let mut src = accepted_source(a.clone(), end, 2, 8, 1, None).unwrap();
        let b = src.next_batch();
        let mut trained: Vec<i32> = b.targets.iter().copied().filter(|&t| t >= 0).collect();
        trained.sort();
        assert_eq!(trained, vec![10, 11, 13, 14, end as i32, end as i32]);
        assert!(a.rate() == 0.4);
        let none = accepted_sequences(&prompts, &outs, &[vec![0.0; 3], vec![0.0; 2]], end);
        let e = accepted_source(none, end, 2, 8, 1, None).err().unwrap().to_string();
        assert!(e.contains("accepted none of 5"), "{e}");
    }
}
