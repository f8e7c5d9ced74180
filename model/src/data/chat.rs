//! The chat format of supervised fine-tuning: `<|user|>` prompt `<|assistant|>` response `<|end|>`, with the loss
//! on the response and the end token only, and packing of whole examples into fixed-length rows.
//!
//! Packing puts several examples in one row. The loss mask is exact (a target is trained only where the token it
//! predicts belongs to a response or its end token), and each row carries the lengths of the examples in it, so
//! the model restarts positions at 0 for every example and attention stays inside each example (block-diagonal
//! causal mask): a packed example computes exactly what it would alone.

use crate::arch::grow_vocab;
use crate::checkpoint::Checkpoint;
use crate::data::tokenizer::Tokenizer;
use crate::error::{ModelError, Result};

pub const USER: &str = "<|user|>";
pub const ASSISTANT: &str = "<|assistant|>";
pub const END: &str = "<|end|>";
/// Every special token Kiln's tokenizers reserve: GPT-2's document separator and the chat markers.
pub const SPECIAL_TOKENS: [&str; 4] = ["<|endoftext|>", USER, ASSISTANT, END];

/// Ids of the chat markers in one tokenizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatTokens {
    pub user: u32,
    pub assistant: u32,
    pub end: u32,
}

impl ChatTokens {
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<ChatTokens> {
        let id = |t: &str| {
            tok.token_id(t).ok_or_else(|| {
                ModelError::Tokenizer(format!(
                    "the tokenizer lacks the chat token {t}: fine-tuning needs the chat tokens ({}); `kiln prepare` \
                     adds them when it trains a tokenizer, and `kiln sft` adds them to a checkpoint that lacks them",
                    SPECIAL_TOKENS[1..].join(" ")
                ))
            })
        };
        Ok(ChatTokens { user: id(USER)?, assistant: id(ASSISTANT)?, end: id(END)? })
    }
}

/// Make `ckpt`'s tokenizer carry the chat tokens: those it lacks are added as special tokens and, where that takes
/// the vocabulary past the model's, the embedding (and an untied head) grow to match (`arch::grow_vocab`), and
/// the checkpoint's tokenizer.json is replaced. Returns the tokens added (empty when all were there).
pub fn add_chat_tokens(ckpt: &mut Checkpoint, tok: &mut Tokenizer) -> Result<Vec<&'static str>> {
    let missing: Vec<&'static str> =
        SPECIAL_TOKENS[1..].iter().copied().filter(|t| tok.token_id(t).is_none()).collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    tok.add_special_tokens(&missing);
    ChatTokens::from_tokenizer(tok)?;
    if tok.vocab_size() > ckpt.config.vocab_size {
        let (config, tensors) = grow_vocab(&ckpt.config, std::mem::take(&mut ckpt.model), tok.vocab_size())?;
        ckpt.config = config;
        ckpt.model = tensors;
        // Moments of the old shapes cannot continue: post-training starts a fresh optimizer anyway.
        ckpt.optimizer.clear();
        ckpt.state = None;
    }
    ckpt.tokenizer_json = Some(tok.to_json()?);
    Ok(missing)
}

/// One example as tokens, with `trained[i]` true where token i belongs to the response or the end marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatSequence {
    pub tokens: Vec<u32>,
    pub trained: Vec<bool>,
}

/// `<|user|>` prompt `<|assistant|>`: what generation continues from.
pub fn prompt_tokens(tok: &Tokenizer, ct: ChatTokens, prompt: &str) -> Result<Vec<u32>> {
    let mut ids = vec![ct.user];
    ids.extend(tok.encode(prompt)?);
    ids.push(ct.assistant);
    Ok(ids)
}

/// The full example, with the response and `<|end|>` marked as trained (the model learns to stop).
pub fn encode_example(tok: &Tokenizer, ct: ChatTokens, prompt: &str, response: &str) -> Result<ChatSequence> {
    let mut tokens = prompt_tokens(tok, ct, prompt)?;
    let mut trained = vec![false; tokens.len()];
    let answer = tok.encode(response)?;
    trained.extend(std::iter::repeat_n(true, answer.len() + 1));
    tokens.extend(answer);
    tokens.push(ct.end);
    Ok(ChatSequence { tokens, trained })
}

/// One packed row: `time` inputs, their targets (-1 where untrained or padding), and the lengths of the sequences
/// laid end to end in the inputs (the padding after them, if any, is not listed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedRow {
    pub inputs: Vec<i32>,
    pub targets: Vec<i32>,
    pub lengths: Vec<usize>,
}

/// Pack whole sequences into rows of `time` positions, targets -1 wherever the predicted token is not trained and
/// on padding. A sequence never straddles two rows; one longer than `time + 1` tokens is an error naming it.
pub fn pack(seqs: &[ChatSequence], time: usize, pad: u32) -> Result<Vec<PackedRow>> {
    let mut rows = Vec::new();
    let (mut tokens, mut trained): (Vec<u32>, Vec<bool>) = (Vec::new(), Vec::new());
    let mut lengths: Vec<usize> = Vec::new();
    let mut flush = |tokens: &mut Vec<u32>, trained: &mut Vec<bool>, lengths: &mut Vec<usize>| {
        if tokens.is_empty() {
            return;
        }
        tokens.resize(time + 1, pad);
        trained.resize(time + 1, false);
        let inputs = tokens[..time].iter().map(|&t| t as i32).collect();
        let targets = (0..time).map(|i| if trained[i + 1] { tokens[i + 1] as i32 } else { -1 }).collect();
        // A last sequence of time + 1 tokens has its final token only as a target.
        let mut lens = std::mem::take(lengths);
        let total: usize = lens.iter().sum();
        if total > time {
            *lens.last_mut().expect("a row holds a sequence") -= total - time;
        }
        rows.push(PackedRow { inputs, targets, lengths: lens });
        tokens.clear();
        trained.clear();
    };
    for (i, s) in seqs.iter().enumerate() {
        if s.tokens.len() > time + 1 {
            return Err(ModelError::Data(format!(
                "example {i} is {} tokens long, more than the context allows ({} = seq_len + 1)",
                s.tokens.len(),
                time + 1
            )));
        }
        if tokens.len() + s.tokens.len() > time + 1 {
            flush(&mut tokens, &mut trained, &mut lengths);
        }
        tokens.extend(&s.tokens);
        trained.extend(&s.trained);
        lengths.push(s.tokens.len());
    }
    flush(&mut tokens, &mut trained, &mut lengths);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> (Tokenizer, ChatTokens) {
        let text = "1+1=2\n12+30=42\nreverse: a b\nb a\n".repeat(20);
        let tok = Tokenizer::train(&text, 300, &SPECIAL_TOKENS).unwrap();
        let ct = ChatTokens::from_tokenizer(&tok).unwrap();
        (tok, ct)
    }

    #[test]
    fn only_response_and_end_tokens_are_trained() {
        let (tok, ct) = tokenizer();
        let s = encode_example(&tok, ct, "12+30=", "42").unwrap();
        let prompt_len = prompt_tokens(&tok, ct, "12+30=").unwrap().len();
        assert!(s.trained[..prompt_len].iter().all(|t| !t), "prompt tokens must not be trained");
        assert!(s.trained[prompt_len..].iter().all(|t| *t));
        assert_eq!(*s.tokens.last().unwrap(), ct.end);
        let rows = pack(std::slice::from_ref(&s), 16, ct.end).unwrap();
        let (inputs, targets) = (&rows[0].inputs, &rows[0].targets);
        assert_eq!(inputs.len(), 16);
        assert_eq!(rows[0].lengths, vec![s.tokens.len()]);
        for (i, &t) in targets.iter().enumerate() {
            // Position i predicts token i+1: trained exactly when that token is in the response or the end marker.
            let want = if i + 1 < s.tokens.len() && s.trained[i + 1] { s.tokens[i + 1] as i32 } else { -1 };
            assert_eq!(t, want, "target {i}");
        }
        // The response really is decoded from the trained targets.
        let trained: Vec<u32> = targets.iter().filter(|&&t| t >= 0 && t as u32 != ct.end).map(|&t| t as u32).collect();
        assert_eq!(tok.decode(&trained).unwrap(), "42");
    }

    #[test]
    fn packing_keeps_examples_whole_and_rejects_long_ones() {
        let (tok, ct) = tokenizer();
        let seqs: Vec<ChatSequence> =
            (0..10).map(|i| encode_example(&tok, ct, &format!("{i}+1="), &(i + 1).to_string()).unwrap()).collect();
        let len = seqs[0].tokens.len();
        let rows = pack(&seqs, 2 * len, ct.end).unwrap();
        let trained_targets: usize = rows.iter().map(|r| r.targets.iter().filter(|&&x| x >= 0).count()).sum();
        // Every example is in exactly one row, whole.
        assert!(rows.iter().all(|r| r.lengths.len() == 2 && r.lengths.iter().all(|&l| l == len)));
        let expected: usize = seqs.iter().map(|s| s.trained.iter().filter(|&&t| t).count()).sum();
        assert_eq!(trained_targets, expected, "every response token is trained exactly once");
        let e = pack(&seqs, len - 2, ct.end).unwrap_err().to_string();
        assert!(e.contains("example 0"), "{e}");
    }

    #[test]
    fn a_tokenizer_without_chat_tokens_is_a_clear_error() {
        let tok = Tokenizer::train(&"abc def ".repeat(50), 280, &["<|endoftext|>"]).unwrap();
        let e = ChatTokens::from_tokenizer(&tok).unwrap_err().to_string();
        assert!(e.contains("<|user|>") && e.contains("kiln prepare"), "{e}");
    }
}
