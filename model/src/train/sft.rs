//! Supervised fine-tuning batches: chat-formatted (prompt, response) examples packed into rows of seq_len
//! positions with the loss on responses only (chat.rs), served in a seeded shuffled order, epoch after epoch, and
//! optionally mixed with windows of pretraining text (every target trained) so a user can measure what keeping
//! some general text in the mix does to the general loss. The optimiser, schedule, metrics and checkpoints are
//! pretraining's (`Trainer::with_source`).

use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::chat::{encode_example, pack, ChatSequence, ChatTokens, PackedRow};
use crate::data::tasks::Example;
use crate::data::tokenizer::Tokenizer;
use crate::data::{BatchSampler, SamplerState};
use crate::error::{ModelError, Result};
use crate::train::pretrain::{Batch, BatchSource};

/// Position of an [`SftSource`]: what a checkpoint saves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftState {
    pub seed: u64,
    pub rows: usize,
    /// Rows served so far: fine-tuning rows and pretraining windows.
    pub sft_drawn: u64,
    pub mix_drawn: u64,
    pub mix: Option<SamplerState>,
}

/// Batches of packed chat rows. Row k of the stream is a pretraining window when ⌊(k+1)·f⌋ > ⌊k·f⌋ for the mix
/// fraction f, so exactly a fraction f of rows is general text, spread evenly, reproducibly.
pub struct SftSource {
    rows: Vec<PackedRow>,
    batch: usize,
    time: usize,
    seed: u64,
    sft_drawn: u64,
    /// The epoch whose permutation `order` holds.
    epoch: u64,
    order: Vec<usize>,
    mix: Option<(BatchSampler, f64)>,
    mix_drawn: u64,
}

impl SftSource {
    /// Encode and pack `examples` (shuffled by `seed` first, so rows mix tasks) into rows of `time` positions.
    /// `mix` = (pretraining tokens, fraction of rows in [0, 1)). Errors on an empty example list, an example longer
    /// than time + 1 tokens, or a fraction outside [0, 1).
    pub fn new(
        tok: &Tokenizer,
        examples: &[Example],
        batch: usize,
        time: usize,
        seed: u64,
        mix: Option<(Arc<Vec<u32>>, f64)>,
    ) -> Result<SftSource> {
        let ct = ChatTokens::from_tokenizer(tok)?;
        let seqs =
            examples.iter().map(|e| encode_example(tok, ct, &e.prompt, &e.answer)).collect::<Result<Vec<_>>>()?;
        SftSource::from_sequences(seqs, ct.end, batch, time, seed, mix)
    }

    /// The same from sequences already in tokens (`trained` marks what the loss sees), padded with `pad`: on-policy
    /// fine-tuning trains on the exact tokens the model sampled, not a re-tokenization of their text.
    pub fn from_sequences(
        mut seqs: Vec<ChatSequence>,
        pad: u32,
        batch: usize,
        time: usize,
        seed: u64,
        mix: Option<(Arc<Vec<u32>>, f64)>,
    ) -> Result<SftSource> {
        if seqs.is_empty() {
            return Err(ModelError::Data("fine-tuning needs at least one example".into()));
        }
        seqs.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5f7));
        let rows = pack(&seqs, time, pad)?;
        let mix = match mix {
            None => None,
            Some((_, 0.0)) => None,
            Some((tokens, f)) => {
                if !(0.0..1.0).contains(&f) {
                    return Err(ModelError::Config(format!(
                        "the pretraining mix fraction must lie in [0, 1), got {f}"
                    )));
                }
                Some((BatchSampler::new(tokens, 1, time, seed ^ 0x6d69)?, f))
            }
        };
        let mut s = SftSource { rows, batch, time, seed, sft_drawn: 0, epoch: 0, order: Vec::new(), mix, mix_drawn: 0 };
        s.shuffle_epoch(0);
        Ok(s)
    }

    /// Packed rows per epoch.
    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// Trained (response) tokens per epoch.
    pub fn trained_tokens(&self) -> usize {
        self.rows.iter().map(|r| r.targets.iter().filter(|&&x| x >= 0).count()).sum()
    }

    fn shuffle_epoch(&mut self, epoch: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch);
        self.order = (0..self.rows.len()).collect();
        self.order.shuffle(&mut rng);
        self.epoch = epoch;
    }

    fn next_row(&mut self) -> PackedRow {
        let k = self.sft_drawn + self.mix_drawn;
        if let Some((sampler, f)) = &mut self.mix {
            if ((k + 1) as f64 * *f).floor() > (k as f64 * *f).floor() {
                self.mix_drawn += 1;
                let (inputs, targets) = sampler.next_batch();
                return PackedRow { inputs, targets, lengths: vec![self.time] };
            }
        }
        let n = self.rows.len() as u64;
        let epoch = self.sft_drawn / n;
        if epoch != self.epoch {
            self.shuffle_epoch(epoch);
        }
        let row = self.order[(self.sft_drawn % n) as usize];
        self.sft_drawn += 1;
        self.rows[row].clone()
    }
}

impl BatchSource for SftSource {
    fn next_batch(&mut self) -> Batch {
        let mut b = Batch { inputs: Vec::new(), targets: Vec::new(), packed: Some(Vec::with_capacity(self.batch)) };
        for _ in 0..self.batch {
            let row = self.next_row();
            b.inputs.extend(row.inputs);
            b.targets.extend(row.targets);
            b.packed.as_mut().expect("set above").push(row.lengths);
        }
        b
    }

    fn state(&self) -> Result<serde_json::Value> {
        let s = SftState {
            seed: self.seed,
            rows: self.rows.len(),
            sft_drawn: self.sft_drawn,
            mix_drawn: self.mix_drawn,
            mix: self.mix.as_ref().map(|(m, _)| m.state()),
        };
        serde_json::to_value(s).map_err(|e| ModelError::Data(e.to_string()))
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<()> {
        let s: SftState = serde_json::from_value(state)
            .map_err(|e| ModelError::Data(format!("not a fine-tuning data position: {e}")))?;
        if s.rows != self.rows.len() || s.seed != self.seed || s.mix.is_some() != self.mix.is_some() {
            return Err(ModelError::Data(format!(
                "cannot resume the fine-tuning stream: it was {} packed rows with seed {} (pretraining mix: {}), \
                 this run has {} rows with seed {} (mix: {}); use the same data and flags",
                s.rows,
                s.seed,
                s.mix.is_some(),
                self.rows.len(),
                self.seed,
                self.mix.is_some()
            )));
        }
        if let (Some(saved), Some((sampler, _))) = (&s.mix, &mut self.mix) {
            sampler.restore(saved)?;
        }
        self.sft_drawn = s.sft_drawn;
        self.mix_drawn = s.mix_drawn;
        let epoch = s.sft_drawn / self.rows.len() as u64;
        self.shuffle_epoch(epoch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chat::SPECIAL_TOKENS;
    use crate::data::tasks::{Split, Task};

    fn tokenizer() -> Tokenizer {
        Tokenizer::train(&"12+34=46\n7+8=15\nthe king\n".repeat(30), 300, &SPECIAL_TOKENS).unwrap()
    }

    #[test]
    fn stream_covers_every_row_per_epoch_mixes_exactly_and_resumes() {
        let tok = tokenizer();
        let ex = Task::addition(2).examples(Split::Train, 40, 1);
        let text: Arc<Vec<u32>> = Arc::new(tok.encode(&"the king 12 ".repeat(50)).unwrap());
        let mut a = SftSource::new(&tok, &ex, 3, 32, 9, Some((text.clone(), 0.25))).unwrap();
        let n = a.num_rows();
        let mut seen = Vec::new();
        let mut general = 0;
        for _ in 0..8 {
            let t = a.next_batch().targets;
            for row in t.chunks(32) {
                if row.iter().all(|&x| x >= 0) {
                    general += 1; // pretraining windows train every target
                } else {
                    seen.push(row.to_vec());
                }
            }
        }
        assert_eq!(general, 6, "a quarter of 24 rows is pretraining text");
        // The first epoch's rows are all different rows of the packed set.
        let first: Vec<_> = seen.iter().take(n.min(seen.len())).collect();
        let unique: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(unique.len(), first.len());
        // Resume from a saved position continues the same stream.
        let state = a.state().unwrap();
        let next = a.next_batch();
        let mut b = SftSource::new(&tok, &ex, 3, 32, 9, Some((text, 0.25))).unwrap();
        b.restore(state.clone()).unwrap();
        assert_eq!(b.next_batch(), next);
        let mut c = SftSource::new(&tok, &ex, 3, 32, 10, None).unwrap();
        assert!(c.restore(state).unwrap_err().to_string().contains("same data"));
        assert!(SftSource::new(&tok, &ex, 3, 32, 9, Some((Arc::new(vec![1; 100]), 1.5))).is_err());
    }
}
