//! The tokenizer: byte-level BPE (GPT-2's scheme) trained on a corpus, or loaded from a Hugging Face
//! `tokenizer.json` or GPT-2's original `encoder.json`/`vocab.bpe` pair. A thin wrapper over the `tokenizers`
//! crate that turns its errors into `ModelError`s naming the input, and encodes long texts in parallel pieces.

use std::path::Path;

use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::error::{io_err, ModelError, Result};

/// Pieces of about this many bytes are encoded independently (and in parallel): one multi-megabyte
/// `encode` call would run on one core and keep per-token strings and offsets for the whole text.
const PIECE_BYTES: usize = 1 << 16;

/// A byte-level tokenizer: every string encodes (no unknown tokens) and decodes back to itself.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Largest id + 1 over the model and added tokens: the embedding rows a model needs.
    vocab_size: usize,
    /// Whether splitting a text at whitespace boundaries and encoding the pieces separately gives exactly
    /// the ids of encoding it whole (true for GPT-2 style pre-tokenization; see `split_pieces`).
    splittable: bool,
}

fn tok_err(context: impl std::fmt::Display) -> impl FnOnce(tokenizers::Error) -> ModelError {
    move |e| ModelError::Tokenizer(format!("{context}: {e}"))
}

impl Tokenizer {
    /// Byte-level BPE (GPT-2 style pre-tokenizer, byte-level decoder) trained on `text` up to `vocab_size` tokens,
    /// with `special` tokens added (e.g. "<|endoftext|>"). Deterministic for the same input.
    ///
    /// The 256 byte tokens come first, then the merges, then the special tokens (so, as in GPT-2, a single
    /// `<|endoftext|>` is the last id). A corpus too small to yield enough merges gives a smaller vocabulary.
    pub fn train(text: &str, vocab_size: usize, special: &[&str]) -> Result<Tokenizer> {
        if text.is_empty() {
            return Err(ModelError::Tokenizer("cannot train on an empty corpus".into()));
        }
        let mut specials: Vec<&str> = Vec::new();
        for s in special {
            if s.is_empty() {
                return Err(ModelError::Tokenizer("a special token cannot be the empty string".into()));
            }
            if !specials.contains(s) {
                specials.push(s);
            }
        }
        let minimum = 256 + specials.len();
        if vocab_size < minimum {
            return Err(ModelError::Tokenizer(format!(
                "vocab_size {vocab_size} is too small for byte-level BPE: it needs at least {minimum} \
                 (256 byte tokens + {} special)",
                specials.len()
            )));
        }
        if vocab_size > i32::MAX as usize {
            return Err(ModelError::Tokenizer(format!("vocab_size {vocab_size} does not fit token ids (i32)")));
        }

        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(byte_level()));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner.with_post_processor(Some(byte_level()));
        // Specials are added after training rather than given to the trainer, which would put them at ids 0..
        // instead of after the merges as in GPT-2.
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size - specials.len())
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let pieces = split_pieces(text, PIECE_BYTES);
        inner.train(&mut trainer, pieces.into_iter()).map_err(tok_err("BPE training failed"))?;

        let mut tok = Tokenizer::wrap(inner);
        tok.add_special_tokens(&specials);
        Ok(tok)
    }

    /// Any `tokenizer.json` (a GPT-2 one included). Truncation and padding settings in the file are dropped:
    /// the data pipeline encodes whole documents.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Tokenizer(m) => ModelError::Tokenizer(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parse the contents of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Tokenizer> {
        let mut inner: tokenizers::Tokenizer =
            json.parse().map_err(|e| ModelError::Tokenizer(format!("not a valid tokenizer.json: {e}")))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(tok_err("cannot disable truncation"))?;
        let tok = Tokenizer::wrap(inner);
        if tok.vocab_size == 0 {
            return Err(ModelError::Tokenizer("the tokenizer has an empty vocabulary".into()));
        }
        Ok(tok)
    }

    /// GPT-2's original files: `encoder.json` (or a `vocab.json`: token → id) and `vocab.bpe` (or a
    /// `merges.txt`: one "a b" merge a line, an optional `#version` header). `<|endoftext|>`, when the vocabulary
    /// has it, becomes a special token as in Hugging Face's GPT-2 tokenizer.
    pub fn from_gpt2_files(vocab_json: &Path, merges_txt: &Path) -> Result<Tokenizer> {
        let vocab_text = std::fs::read_to_string(vocab_json).map_err(io_err(vocab_json))?;
        let vocab: serde_json::Map<String, Value> = serde_json::from_str(&vocab_text).map_err(|e| {
            ModelError::Tokenizer(format!("{}: not a JSON object of token ids: {e}", vocab_json.display()))
        })?;
        for (token, id) in &vocab {
            if id.as_u64().is_none_or(|id| id > u32::MAX as u64) {
                return Err(ModelError::Tokenizer(format!(
                    "{}: token {token:?} has id {id}, not an integer in 0..2^32",
                    vocab_json.display()
                )));
            }
        }
        if vocab.is_empty() {
            return Err(ModelError::Tokenizer(format!("{}: the vocabulary is empty", vocab_json.display())));
        }

        let merges_text = std::fs::read_to_string(merges_txt).map_err(io_err(merges_txt))?;
        let mut merges = Vec::new();
        for (n, line) in merges_text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || (n == 0 && line.starts_with("#version")) {
                continue;
            }
            let bad = |why: String| ModelError::Tokenizer(format!("{}:{}: {why}", merges_txt.display(), n + 1));
            let parts: Vec<&str> = line.split(' ').collect();
            let [a, b] = parts[..] else {
                return Err(bad(format!("expected two tokens separated by one space, found {line:?}")));
            };
            for t in [a, b, &format!("{a}{b}")] {
                if !vocab.contains_key(t) {
                    return Err(bad(format!("merge {line:?} uses {t:?}, which is not in {}", vocab_json.display())));
                }
            }
            merges.push(json!([a, b]));
        }

        // Built as the equivalent tokenizer.json so both loaders share one path.
        let json = json!({
            "version": "1.0",
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": merges},
        });
        let mut tok = Self::from_json(&json.to_string())
            .map_err(|e| ModelError::Tokenizer(format!("{} + {}: {e}", vocab_json.display(), merges_txt.display())))?;
        if tok.token_id("<|endoftext|>").is_some() {
            tok.add_special_tokens(&["<|endoftext|>"]);
        }
        Ok(tok)
    }

    /// Write `tokenizer.json` atomically (a crash leaves the old file or the new one, never half of one).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::data::write_atomic(path, self.to_json()?.as_bytes())
    }

    /// The `tokenizer.json` text (loadable by Hugging Face `tokenizers` too).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tok_err("cannot serialize the tokenizer"))
    }

    /// Token ids of `text`, without special-token insertion (a special token written literally in the text
    /// still maps to its id).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let pieces = if self.splittable { split_pieces(text, PIECE_BYTES) } else { vec![text] };
        let encodings = self.inner.encode_batch_fast(pieces, false).map_err(tok_err("encoding failed"))?;
        let mut ids = Vec::with_capacity(encodings.iter().map(|e| e.len()).sum());
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
        }
        Ok(ids)
    }

    /// The text of `ids`. Bytes that do not form valid UTF-8 (a sequence cut mid-character) become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(ModelError::Tokenizer(format!(
                "cannot decode token id {bad}: not in the vocabulary (size {})",
                self.vocab_size
            )));
        }
        self.inner.decode(ids, false).map_err(tok_err("decoding failed"))
    }

    /// Number of ids (largest id + 1), added tokens included: the model's embedding rows.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id (byte-level tokens show bytes as GPT-2's printable stand-ins, e.g. "Ġ" for space).
    pub fn id_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Add special tokens (the chat format of a later issue needs <|user|> etc.); returns their ids, in order.
    /// Tokens already present keep their ids; empty strings are skipped (no id can mean them).
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> Vec<u32> {
        let new: Vec<AddedToken> =
            tokens.iter().filter(|t| !t.is_empty()).map(|t| AddedToken::from(t.to_string(), true)).collect();
        // The added vocabulary only fails on a normalizer error; with none in these tokens, there is nothing to
        // report, and an id that did not come into being is simply left out below.
        let _ = self.inner.add_special_tokens(new);
        self.refresh();
        tokens.iter().filter_map(|t| self.inner.token_to_id(t)).collect()
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Tokenizer {
        let mut tok = Tokenizer { inner, vocab_size: 0, splittable: false };
        tok.refresh();
        tok
    }

    fn refresh(&mut self) {
        self.vocab_size = self.inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1);
        self.splittable = is_splittable(&self.inner);
    }
}

fn byte_level() -> ByteLevel {
    ByteLevel::new(false, true, true)
}

/// GPT-2's pre-tokenizer regex never puts a non-whitespace character and a following whitespace character in the
/// same piece, and looks ahead only one character past whitespace, so cutting there changes no piece. Anything
/// else before it (a normalizer, a prefix space added to every input, added tokens that swallow neighbouring
/// whitespace) would make the pieces' ids differ from the whole text's.
fn is_splittable(inner: &tokenizers::Tokenizer) -> bool {
    let byte_level_regex = matches!(inner.get_pre_tokenizer(),
        Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && !b.add_prefix_space);
    let plain_added = inner
        .get_added_tokens_decoder()
        .values()
        .all(|t| !t.lstrip && !t.rstrip && !t.single_word && !t.content.chars().any(char::is_whitespace));
    inner.get_normalizer().is_none() && byte_level_regex && plain_added
}

/// Cut `text` into pieces of about `target` bytes, each cut just before a whitespace character that follows a
/// non-whitespace one (see `is_splittable`). A text without such a place stays whole.
pub(crate) fn split_pieces(text: &str, target: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    while text.len() - start > target {
        let mut prev_ws = true;
        let cut = text[start..].char_indices().find_map(|(i, c)| {
            let ws = c.is_whitespace();
            let at = (i >= target && ws && !prev_ws).then_some(start + i);
            prev_ws = ws;
            at
        });
        match cut {
            Some(cut) => {
                pieces.push(&text[start..cut]);
                start = cut;
            }
            None => break,
        }
    }
    pieces.push(&text[start..]);
    pieces
}

#[cfg(test)]
#[path = "tokenizer_tests.rs"]
mod tests;
