//! The pretraining data pipeline: the bundled and user corpora, token shard files, the deterministic train/val
//! split with its unigram baseline, and the (B, T) batches the trainer and evaluation draw from a shard.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::tokenizer::Tokenizer;
use crate::error::{io_err, ModelError, Result};

/// The bundled corpus (data/README.md): 42 Shakespeare plays, 5 MB of ASCII.
pub fn bundled_corpus() -> Result<String> {
    static GZ: &[u8] = include_bytes!("../../../data/shakespeare.txt.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(GZ)
        .read_to_string(&mut text)
        .map_err(|e| ModelError::Data(format!("bundled corpus data/shakespeare.txt.gz is corrupt: {e}")))?;
    Ok(text)
}

/// Concatenate user text files, documents separated by "\n\n" (a file's trailing newlines and leading byte-order
/// mark are dropped so the separator is exactly one blank line). Errors name the file: missing, empty, not UTF-8
/// (with the byte offset of the first bad sequence).
pub fn read_corpus(paths: &[PathBuf]) -> Result<String> {
    if paths.is_empty() {
        return Err(ModelError::Data("no corpus files given".into()));
    }
    let mut out = String::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let e = e.utf8_error();
            ModelError::Data(format!(
                "{}: not UTF-8 text: invalid byte sequence at byte offset {}",
                path.display(),
                e.valid_up_to()
            ))
        })?;
        let doc = text.strip_prefix('\u{feff}').unwrap_or(&text).trim_end_matches(['\n', '\r']);
        if doc.trim().is_empty() {
            return Err(ModelError::Data(format!("{}: the file is empty (no text)", path.display())));
        }
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(doc);
    }
    Ok(out)
}

pub(crate) use crate::atomic::write_atomic;

const SHARD_MAGIC: &[u8; 8] = b"KILNTOK1";
const SHARD_VERSION: u32 = 1;
const SHARD_HEADER: usize = 256;

/// A token shard in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub vocab_size: usize,
    pub tokens: Vec<u32>,
}

fn shard_width(vocab_size: usize) -> usize {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Token shard file: 256-byte little-endian header (magic b"KILNTOK1", version u32 = 1, token byte width u32 (2 if
/// vocab ≤ 65536 else 4), vocab_size u64, num_tokens u64, rest zero) followed by the tokens. Written atomically.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    let bad = |why: String| ModelError::Data(format!("{}: cannot write shard: {why}", path.display()));
    if vocab_size == 0 || vocab_size > u32::MAX as usize + 1 {
        return Err(bad(format!("vocab_size {vocab_size} is not in 1..=2^32")));
    }
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab_size) {
        return Err(bad(format!("token {i} has id {t}, not below vocab_size {vocab_size}")));
    }
    let width = shard_width(vocab_size);
    let mut buf = Vec::with_capacity(SHARD_HEADER + tokens.len() * width);
    buf.extend_from_slice(SHARD_MAGIC);
    buf.extend_from_slice(&SHARD_VERSION.to_le_bytes());
    buf.extend_from_slice(&(width as u32).to_le_bytes());
    buf.extend_from_slice(&(vocab_size as u64).to_le_bytes());
    buf.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    buf.resize(SHARD_HEADER, 0);
    if width == 2 {
        tokens.iter().for_each(|&t| buf.extend_from_slice(&(t as u16).to_le_bytes()));
    } else {
        tokens.iter().for_each(|&t| buf.extend_from_slice(&t.to_le_bytes()));
    }
    write_atomic(path, &buf)
}

/// Read a shard written by `write_shard`, checking magic, version, width, length and that every id is below
/// the vocabulary size, so a corrupt or truncated file is an error here rather than garbage in training.
pub fn read_shard(path: &Path) -> Result<Shard> {
    let buf = std::fs::read(path).map_err(io_err(path))?;
    let bad = |why: String| ModelError::Data(format!("{}: not a valid token shard: {why}", path.display()));
    if buf.len() < SHARD_HEADER {
        return Err(bad(format!("{} bytes, shorter than the {SHARD_HEADER}-byte header", buf.len())));
    }
    if &buf[..8] != SHARD_MAGIC {
        return Err(bad(format!("magic is {:?}, expected \"KILNTOK1\"", String::from_utf8_lossy(&buf[..8]))));
    }
    let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
    let (version, width, vocab_size, num_tokens) = (u32_at(8), u32_at(12), u64_at(16), u64_at(24));
    if version != SHARD_VERSION {
        return Err(bad(format!("version {version}, this build reads version {SHARD_VERSION}")));
    }
    if vocab_size == 0 || vocab_size > u32::MAX as u64 + 1 {
        return Err(bad(format!("vocab_size {vocab_size} is not in 1..=2^32")));
    }
    if width as usize != shard_width(vocab_size as usize) {
        return Err(bad(format!("token width {width} bytes does not match vocab_size {vocab_size}")));
    }
    if buf[32..SHARD_HEADER].iter().any(|&b| b != 0) {
        return Err(bad("reserved header bytes 32..256 are not zero".into()));
    }
    let body = (buf.len() - SHARD_HEADER) as u64;
    if num_tokens.checked_mul(width as u64) != Some(body) {
        return Err(bad(format!(
            "header says {num_tokens} tokens of {width} bytes, but {body} bytes follow the header (truncated?)"
        )));
    }
    let body = &buf[SHARD_HEADER..];
    let tokens: Vec<u32> = if width == 2 {
        body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect()
    } else {
        body.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t as u64 >= vocab_size) {
        return Err(bad(format!("token {i} has id {t}, not below vocab_size {vocab_size}")));
    }
    Ok(Shard { vocab_size: vocab_size as usize, tokens })
}

/// What `prepare` wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareReport {
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub vocab_size: usize,
    /// Entropy of the train token distribution in bits per token: the loss (× ln 2 for nats) of a model that
    /// ignores context, which training must beat.
    pub unigram_entropy_bits: f64,
}

/// Tokenize `text` and split deterministically into train/val: the token stream cut into chunks of `chunk` tokens
/// (e.g. 4096), every k-th chunk (k = round(1/val_fraction)) to val, so val spans the whole corpus. Writes
/// out_dir/train.bin, out_dir/val.bin, out_dir/tokenizer.json.
///
/// A corpus of fewer than k chunks would leave val empty, so there the chunk shrinks to tokens / k: val is
/// still about `val_fraction` of the corpus, from across it.
pub fn prepare(
    text: &str,
    tokenizer: &Tokenizer,
    out_dir: &Path,
    val_fraction: f64,
    chunk: usize,
) -> Result<PrepareReport> {
    if !(val_fraction > 0.0 && val_fraction <= 0.5) {
        return Err(ModelError::Data(format!("val_fraction {val_fraction} must be in (0, 0.5]")));
    }
    if chunk == 0 {
        return Err(ModelError::Data("chunk must be at least 1 token".into()));
    }
    if text.is_empty() {
        return Err(ModelError::Data("the corpus is empty".into()));
    }
    let k = (1.0 / val_fraction).round() as usize;
    let tokens = tokenizer.encode(text)?;
    if tokens.len() < k {
        return Err(ModelError::Data(format!(
            "the corpus is only {} tokens: splitting off 1/{k} for validation needs at least {k}",
            tokens.len()
        )));
    }
    let chunk = chunk.min(tokens.len() / k);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, c) in tokens.chunks(chunk).enumerate() {
        if i % k == k - 1 { &mut val } else { &mut train }.extend_from_slice(c);
    }

    let vocab_size = tokenizer.vocab_size();
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    write_shard(&out_dir.join("train.bin"), &train, vocab_size)?;
    write_shard(&out_dir.join("val.bin"), &val, vocab_size)?;
    tokenizer.save(&out_dir.join("tokenizer.json"))?;
    Ok(PrepareReport {
        train_tokens: train.len(),
        val_tokens: val.len(),
        vocab_size,
        unigram_entropy_bits: unigram_entropy_bits(&train, vocab_size),
    })
}

/// Entropy in bits of the token frequency distribution (`vocab_size` only sizes the count table).
pub fn unigram_entropy_bits(tokens: &[u32], vocab_size: usize) -> f64 {
    let size = tokens.iter().max().map_or(0, |&m| m as usize + 1).max(vocab_size);
    let mut counts = vec![0u64; size];
    tokens.iter().for_each(|&t| counts[t as usize] += 1);
    let n = tokens.len() as f64;
    counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n).map(|p| -p * p.log2()).sum::<f64>().max(0.0)
}

/// Where a `BatchSampler` stands, to save with a checkpoint. Batch shape and shard length are kept so that
/// restoring into a different setup is an error instead of a silently different stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    pub batches_drawn: u64,
    pub batch: usize,
    pub time: usize,
    pub num_tokens: usize,
}

/// Seeded, reproducible (B, T) windows: inputs tokens[s..s+T], targets tokens[s+1..s+T+1] for random starts s.
///
/// Batch i draws its starts from ChaCha8 stream i of the seed, so a batch depends only on (seed, i): restoring
/// is O(1) and resumes exactly the stream an uninterrupted run would have seen.
#[derive(Clone, Debug)]
pub struct BatchSampler {
    tokens: Arc<Vec<u32>>,
    batch: usize,
    time: usize,
    seed: u64,
    batches_drawn: u64,
}

impl BatchSampler {
    /// Errors if B or T is 0 or the shard is shorter than T + 1 tokens.
    pub fn new(tokens: Arc<Vec<u32>>, batch: usize, time: usize, seed: u64) -> Result<BatchSampler> {
        if batch == 0 || time == 0 {
            return Err(ModelError::Data(format!("batch ({batch}) and time ({time}) must be at least 1")));
        }
        if tokens.len() < time + 1 {
            return Err(ModelError::Data(format!(
                "the shard has {} tokens, but one window of time {time} needs {} (inputs plus the shifted target)",
                tokens.len(),
                time + 1
            )));
        }
        Ok(BatchSampler { tokens, batch, time, seed, batches_drawn: 0 })
    }

    /// (inputs B*T, targets B*T), row-major.
    pub fn next_batch(&mut self) -> (Vec<i32>, Vec<i32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.batches_drawn);
        self.batches_drawn += 1;
        let (b, t) = (self.batch, self.time);
        let last_start = self.tokens.len() - t - 1;
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for _ in 0..b {
            let s = rng.random_range(0..=last_start);
            inputs.extend(self.tokens[s..s + t].iter().map(|&x| x as i32));
            targets.extend(self.tokens[s + 1..s + t + 1].iter().map(|&x| x as i32));
        }
        (inputs, targets)
    }

    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.seed,
            batches_drawn: self.batches_drawn,
            batch: self.batch,
            time: self.time,
            num_tokens: self.tokens.len(),
        }
    }

    /// Continue the stream `s` was taken from. The batch shape and shard length must match the saved ones.
    pub fn restore(&mut self, s: &SamplerState) -> Result<()> {
        let here = (self.batch, self.time, self.tokens.len());
        if (s.batch, s.time, s.num_tokens) != here {
            return Err(ModelError::Data(format!(
                "cannot resume the batch stream: it was for batch {}, time {} over a shard of {} tokens, \
                 this run has batch {}, time {}, {} tokens",
                s.batch, s.time, s.num_tokens, here.0, here.1, here.2
            )));
        }
        self.seed = s.seed;
        self.batches_drawn = s.batches_drawn;
        Ok(())
    }
}

/// Sequential, non-overlapping (B, T) windows covering a shard once (for validation loss / eval): window j has
/// inputs tokens[jT..jT+T] and targets one further. A last partial window, and a last batch of fewer than B
/// windows, are dropped (the model runs fixed shapes), so a shard under B·T + 1 tokens gives no batch.
pub fn sequential_batches(tokens: &[u32], batch: usize, time: usize) -> Vec<(Vec<i32>, Vec<i32>)> {
    if batch == 0 || time == 0 || tokens.len() < time + 1 {
        return Vec::new();
    }
    let windows = (tokens.len() - 1) / time;
    (0..windows / batch)
        .map(|i| {
            let start = i * batch * time;
            let inputs = tokens[start..start + batch * time].iter().map(|&x| x as i32).collect();
            let targets = tokens[start + 1..start + batch * time + 1].iter().map(|&x| x as i32).collect();
            (inputs, targets)
        })
        .collect()
}

#[cfg(test)]
#[path = "shards_tests.rs"]
mod tests;
