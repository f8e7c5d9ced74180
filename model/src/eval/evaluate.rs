//! The post-training evaluation suite: task accuracy (greedy pass@1, sampled pass@k with confidence intervals,
//! mean reward), general text loss in bits per byte, and the exact KL divergence between two models over the full
//! vocabulary at chosen positions. `kiln study` runs it on every checkpoint; `kiln sft`/`kiln rl` use parts.

use serde::Serialize;

use kiln_engine::autograd::Tape;
use kiln_engine::ops::elementwise;
use kiln_engine::ops::policy::{kl_rows, token_entropy};
use kiln_engine::ops::sampling::SamplingParams;

use crate::arch::Model;
use crate::data::chat::{prompt_tokens, ChatTokens};
use crate::data::tasks::{reward, Example};
use crate::data::tokenizer::Tokenizer;
use crate::error::{ModelError, Result};
use crate::eval::generate::{rollouts, Completion, GenerateConfig};
use kiln_engine::Gpu;

/// A proportion with its 95% confidence interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

/// Wilson score interval (95%) of a proportion `p` observed over `n` trials: unlike p ± 1.96·SE it stays inside
/// [0, 1] and is sensible at p = 0 or 1, which small evaluation sets hit.
pub fn wilson(p: f64, n: usize) -> Estimate {
    if n == 0 {
        return Estimate { value: f64::NAN, lo: 0.0, hi: 1.0 };
    }
    let z = 1.96f64;
    let n = n as f64;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    Estimate { value: p, lo: (centre - half).max(0.0), hi: (centre + half).min(1.0) }
}

/// Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 − C(n−c, k)/C(n, k).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // Π_{i=n−c+1}^{n} (1 − k/i): the ratio of binomials without overflow.
    1.0 - (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// A completion as text: its tokens without the end marker.
pub fn completion_text(tok: &Tokenizer, ct: ChatTokens, c: &Completion) -> Result<String> {
    let ids: Vec<u32> = c.tokens.iter().copied().filter(|&t| t != ct.end).collect();
    tok.decode(&ids)
}

/// Chat prompts of `examples` as tokens, each checked to leave room in the context.
pub fn chat_prompts(tok: &Tokenizer, ct: ChatTokens, examples: &[Example], n_ctx: usize) -> Result<Vec<Vec<u32>>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let p = prompt_tokens(tok, ct, &e.prompt)?;
            if p.len() >= n_ctx {
                return Err(ModelError::Data(format!(
                    "prompt {i} ({:?}) is {} tokens in the chat format, but the model's context is n_ctx = {n_ctx}",
                    e.prompt,
                    p.len()
                )));
            }
            Ok(p)
        })
        .collect()
}

/// Rewards [prompt][sample] and the completions they score.
pub type Scored = (Vec<Vec<f32>>, Vec<Vec<Completion>>);

/// Rewards [prompt][sample] of `samples` completions per example (the completions too), generated with `gen`
/// (its stop token is set to the chat end marker).
pub fn sample_rewards(
    gpu: &Gpu,
    model: &Model,
    tok: &Tokenizer,
    examples: &[Example],
    samples: usize,
    gen: GenerateConfig,
) -> Result<Scored> {
    let ct = ChatTokens::from_tokenizer(tok)?;
    let prompts = chat_prompts(tok, ct, examples, model.config.n_ctx)?;
    let cfg = GenerateConfig { stop_token: Some(ct.end), vocab_limit: Some(tok.vocab_size()), ..gen };
    let outs = rollouts(gpu, model, &prompts, samples, &cfg, |_, _, _| {})?;
    let mut rewards = Vec::with_capacity(examples.len());
    for (e, group) in examples.iter().zip(&outs) {
        let r =
            group.iter().map(|c| Ok(reward(&completion_text(tok, ct, c)?, &e.answer))).collect::<Result<Vec<f32>>>()?;
        rewards.push(r);
    }
    Ok((rewards, outs))
}

/// Accuracy of greedy decoding (pass@1 at temperature 0) on `examples`, with its Wilson interval.
pub fn greedy_accuracy(
    gpu: &Gpu,
    model: &Model,
    tok: &Tokenizer,
    examples: &[Example],
    max_new_tokens: usize,
) -> Result<Estimate> {
    let gen = GenerateConfig {
        max_new_tokens,
        sampling: SamplingParams::GREEDY,
        seed: 0,
        stop_token: None,
        vocab_limit: None,
    };
    let (rewards, _) = sample_rewards(gpu, model, tok, examples, 1, gen)?;
    let correct = rewards.iter().filter(|r| r[0] >= 1.0).count();
    Ok(wilson(correct as f64 / examples.len().max(1) as f64, examples.len()))
}

/// pass@k and the mean reward of sampled completions.
#[derive(Clone, Debug, Serialize)]
pub struct SampledScores {
    pub pass_at: Vec<(usize, Estimate)>,
    pub mean_reward: f64,
}

/// Plain sampling at temperature 1: the policy's own distribution, what pass@k and RL rewards are measured on.
pub const TEMPERATURE_1: SamplingParams = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0 };

/// pass@k for k in `ks` (those ≤ `samples`) from `samples` completions per prompt drawn with `gen` (use
/// [`TEMPERATURE_1`]), and the mean reward of those samples. The interval of each pass@k treats the per-prompt
/// estimates as trials of a proportion (Wilson).
pub fn sampled_scores(
    gpu: &Gpu,
    model: &Model,
    tok: &Tokenizer,
    examples: &[Example],
    samples: usize,
    ks: &[usize],
    gen: GenerateConfig,
) -> Result<SampledScores> {
    let (rewards, _) = sample_rewards(gpu, model, tok, examples, samples, gen)?;
    let n = examples.len().max(1);
    let pass_at = ks
        .iter()
        .filter(|&&k| k >= 1 && k <= samples)
        .map(|&k| {
            let mean =
                rewards.iter().map(|r| pass_at_k(samples, r.iter().filter(|&&x| x >= 1.0).count(), k)).sum::<f64>()
                    / n as f64;
            (k, wilson(mean, examples.len()))
        })
        .collect();
    let mean_reward = rewards.iter().flatten().map(|&r| r as f64).sum::<f64>() / (n * samples) as f64;
    Ok(SampledScores { pass_at, mean_reward })
}

/// What [`text_loss`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TextLoss {
    /// Mean next-token loss, nats per token.
    pub nats: f64,
    /// Targets counted: every token after the first.
    pub tokens: usize,
    /// Windows run (the last may be shorter than the others).
    pub windows: usize,
}

/// Mean next-token loss over the whole of `tokens` (at least 2): consecutive windows of `time` positions from the
/// start, the last one shorter where the text does not divide evenly, so every token after the first is predicted
/// exactly once, from the tokens before it in its window. Full windows run `batch` at a time; the losses are summed
/// on the GPU and read back once.
pub fn text_loss(gpu: &Gpu, model: &Model, tokens: &[u32], batch: usize, time: usize) -> Result<TextLoss> {
    if tokens.len() < 2 {
        return Err(ModelError::Data(format!(
            "evaluation needs at least 2 tokens (one to predict from, one to predict), the text has {}",
            tokens.len()
        )));
    }
    let (time, batch) = (time.clamp(1, model.config.n_ctx), batch.max(1));
    let targets = tokens.len() - 1;
    // Windows as (start, length); full ones first, grouped into batches of equal length.
    let full = targets / time;
    let mut groups: Vec<(usize, usize, usize)> = Vec::new(); // (first window, windows, length)
    for first in (0..full).step_by(batch) {
        groups.push((first, batch.min(full - first), time));
    }
    if !targets.is_multiple_of(time) {
        groups.push((full, 1, targets % time));
    }
    let total = elementwise::zeros(gpu, &[1])?;
    let w = 1.0 / targets as f32;
    for &(first, rows, len) in &groups {
        let (mut inputs, mut outs) = (Vec::with_capacity(rows * len), Vec::with_capacity(rows * len));
        for r in 0..rows {
            let start = (first + r) * time;
            inputs.extend(tokens[start..start + len].iter().map(|&x| x as i32));
            outs.extend(tokens[start + 1..start + len + 1].iter().map(|&x| x as i32));
        }
        let targets_t = gpu.upload_i32(&outs, &[rows, len])?;
        let weights = gpu.upload(&vec![w; rows * len], &[rows * len])?;
        let mut tape = Tape::no_grad(gpu);
        let f = model.forward(&mut tape, &inputs, rows, len, &targets_t, &weights)?;
        elementwise::add_inplace(gpu, &total, tape.value(f.loss), 1.0)?;
    }
    let nats = gpu.read(&total)?[0] as f64;
    Ok(TextLoss { nats, tokens: targets, windows: full + usize::from(!targets.is_multiple_of(time)) })
}

/// What [`bits_per_byte`] measured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TextBits {
    pub bits_per_byte: f64,
    /// Mean next-token loss over the same targets, nats per token.
    pub nats_per_token: f64,
    /// Targets predicted: every token after the first.
    pub tokens: usize,
    /// UTF-8 bytes of exactly those targets.
    pub bytes: usize,
}

/// Held-out loss in bits per byte over the whole of `tokens` (at least 2): every token after the first is
/// predicted once ([`text_loss`]), and the total bits are divided by the bytes of exactly those tokens — the
/// text's bytes less the first token's — so models with different tokenizers compare on the same text.
pub fn bits_per_byte(
    gpu: &Gpu,
    model: &Model,
    tok: &Tokenizer,
    tokens: &[u32],
    batch: usize,
    time: usize,
) -> Result<TextBits> {
    let loss = text_loss(gpu, model, tokens, batch, time)?;
    let bytes = tok.decode(tokens)?.len().saturating_sub(tok.decode(&tokens[..1])?.len());
    if bytes == 0 {
        return Err(ModelError::Data("bits per byte: the predicted tokens decode to no bytes".into()));
    }
    let bits = loss.nats * loss.tokens as f64 / std::f64::consts::LN_2;
    Ok(TextBits { bits_per_byte: bits / bytes as f64, nats_per_token: loss.nats, tokens: loss.tokens, bytes })
}

/// Mean exact KL(reference ‖ policy) per position, in nats per token: Σ_v p_ref(v) (ln p_ref(v) − ln p_policy(v))
/// over the full vocabulary, averaged over the counted positions. This is the direction the forgetting
/// literature uses (RL's Razor, arXiv 2509.04259: E_{x∼task}[KL(π₀‖π)]), so `rows` should be continuations
/// sampled from `reference` itself (π₀ for forgetting, π_SFT for an RL run started from SFT): on those, the
/// per-token terms summed along a continuation are the sequence-level KL(reference ‖ policy).
/// Rows are token sequences (any lengths ≤ n_ctx + 1), and `counted[r][i]` says whether position i of row r
/// (whose distribution predicts token i + 1) is counted. Rows run `batch` at a time, padded to the longest.
pub fn mean_kl<'a>(
    gpu: &'a Gpu,
    reference: &'a Model,
    policy: &'a Model,
    rows: &[Vec<u32>],
    counted: &[Vec<bool>],
    batch: usize,
) -> Result<f64> {
    if reference.config != policy.config {
        return Err(ModelError::Config(format!(
            "KL needs two models of one shape: {:?} vs {:?}",
            reference.config, policy.config
        )));
    }
    let kl = per_position(gpu, rows, counted, batch, |tape, inputs, b, t| {
        let p = reference.logits(tape, inputs, b, t)?;
        let q = policy.logits(tape, inputs, b, t)?;
        // kl_rows(P, Q) = KL(P‖Q): the reference's distribution first.
        Ok(gpu.read(&kl_rows(gpu, tape.value(p), tape.value(q))?)?)
    })?;
    mean_of(&kl, "KL")
}

/// Mean entropy (nats) of `model`'s next-token distribution over the counted positions of `rows` (as in
/// [`mean_kl`]): on the model's own samples, how spread its policy still is.
pub fn mean_entropy<'a>(
    gpu: &'a Gpu,
    model: &'a Model,
    rows: &[Vec<u32>],
    counted: &[Vec<bool>],
    batch: usize,
) -> Result<f64> {
    let h = per_position(gpu, rows, counted, batch, |tape, inputs, b, t| {
        let l = model.logits(tape, inputs, b, t)?;
        Ok(gpu.read(&token_entropy(gpu, tape.value(l))?)?)
    })?;
    mean_of(&h, "entropy")
}

fn mean_of(values: &[Vec<f64>], what: &str) -> Result<f64> {
    let n: usize = values.iter().map(Vec::len).sum();
    if n == 0 {
        return Err(ModelError::Data(format!("{what}: no positions were selected")));
    }
    Ok(values.iter().flatten().sum::<f64>() / n as f64)
}

/// A per-position quantity on the counted positions of `rows`, row by row: rows run `batch` at a time, padded to
/// the longest, and `f(tape, inputs, b, t)` returns the quantity at each of the b·t positions.
fn per_position<'a>(
    gpu: &'a Gpu,
    rows: &[Vec<u32>],
    counted: &[Vec<bool>],
    batch: usize,
    mut f: impl FnMut(&mut Tape<'a>, &[i32], usize, usize) -> Result<Vec<f32>>,
) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(rows.len());
    for (chunk, mask) in rows.chunks(batch.max(1)).zip(counted.chunks(batch.max(1))) {
        let t = chunk.iter().map(|r| r.len().saturating_sub(1)).max().unwrap_or(0).max(1);
        let b = chunk.len();
        let mut inputs = vec![0i32; b * t];
        for (r, row) in chunk.iter().enumerate() {
            for (i, &id) in row.iter().take(t).enumerate() {
                inputs[r * t + i] = id as i32;
            }
        }
        let mut tape = Tape::no_grad(gpu);
        let values = f(&mut tape, &inputs, b, t)?;
        for (r, m) in mask.iter().enumerate() {
            let row = m.iter().enumerate().take(t).filter(|&(i, &c)| c && i + 1 < chunk[r].len());
            out.push(row.map(|(i, _)| values[r * t + i] as f64).collect());
        }
    }
    Ok(out)
}

/// The plain-text few-shot prompt of `prompt` with `shots` solved examples before it, one per line as
/// "prompt => answer": no chat markers, so a base model that never saw the chat format can still show the skill.
pub fn few_shot_text(shots: &[Example], prompt: &str) -> String {
    let mut text: String = shots.iter().map(|s| format!("{} => {}\n", s.prompt, s.answer)).collect();
    text += &format!("{prompt} =>");
    text
}

/// Greedy correctness (1/0) per example of `model` prompted few-shot ([`few_shot_text`]) instead of in the chat
/// format: the baseline that tells learning the format apart from learning the skill. The continuation's first
/// line is scored with the task reward.
pub fn few_shot_greedy(
    gpu: &Gpu,
    model: &Model,
    tok: &Tokenizer,
    examples: &[Example],
    shots: &[Example],
    max_new_tokens: usize,
) -> Result<Vec<f64>> {
    let n_ctx = model.config.n_ctx;
    let prompts = examples
        .iter()
        .map(|e| {
            let ids = tok.encode(&few_shot_text(shots, &e.prompt))?;
            if ids.len() + max_new_tokens > n_ctx {
                return Err(ModelError::Data(format!(
                    "the few-shot prompt of {:?} with {} shots is {} tokens, too long for n_ctx = {n_ctx} with {max_new_tokens} new tokens; use fewer shots",
                    e.prompt,
                    shots.len(),
                    ids.len()
                )));
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = GenerateConfig {
        max_new_tokens,
        sampling: SamplingParams::GREEDY,
        seed: 0,
        stop_token: None,
        vocab_limit: Some(tok.vocab_size()),
    };
    let outs = rollouts(gpu, model, &prompts, 1, &cfg, |_, _, _| {})?;
    examples
        .iter()
        .zip(&outs)
        .map(|(e, group)| Ok(f64::from(reward(&tok.decode(&group[0].tokens)?, &e.answer))))
        .collect()
}

/// Prompts continued by completions as token rows, each with the positions that predict the completion counted
/// (position i predicts token i + 1): the rows [`mean_kl`] and [`mean_entropy`] take. Empty completions are
/// skipped (they predict nothing).
pub fn continuation_rows<'a>(pairs: impl Iterator<Item = (&'a [u32], &'a [u32])>) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let (mut rows, mut counted) = (Vec::new(), Vec::new());
    for (prompt, completion) in pairs.filter(|(_, c)| !c.is_empty()) {
        let row: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        counted.push((0..row.len()).map(|i| i + 1 >= prompt.len()).collect());
        rows.push(row);
    }
    (rows, counted)
}

/// One task's evaluation set scored prompt by prompt: what paired statistics across checkpoints need.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct PromptScores {
    /// 1 where the greedy completion is correct, else 0, per prompt.
    pub greedy: Vec<f64>,
    /// Correct completions per prompt among `samples` drawn at temperature 1 (the first prompts only, as many as
    /// were sampled).
    pub correct: Vec<usize>,
    pub samples: usize,
    /// Mean per-token entropy (nats) of the model along its own sampled completions (None where none was sampled).
    pub entropy: Option<f64>,
}

impl PromptScores {
    pub fn accuracy(&self) -> f64 {
        self.greedy.iter().sum::<f64>() / self.greedy.len().max(1) as f64
    }

    /// Unbiased pass@k per prompt (NaN for k > samples).
    pub fn pass_at(&self, k: usize) -> Vec<f64> {
        self.correct.iter().map(|&c| pass_at_k(self.samples, c, k)).collect()
    }

    /// Mean sampled reward (rewards are exact-match 0/1, so the fraction of correct samples) per prompt.
    pub fn reward(&self) -> Vec<f64> {
        self.correct.iter().map(|&c| c as f64 / self.samples.max(1) as f64).collect()
    }
}

/// Score `examples` prompt by prompt: greedy correctness of every one, and for the first `sampled` of them (none:
/// greedy only) `samples` completions at temperature 1 (seeded by `seed`, each sample its own stream) counted correct, with the
/// model's entropy along those completions.
#[allow(clippy::too_many_arguments)]
pub fn score_prompts(
    gpu: &Gpu,
    model: &Model,
    tok: &Tokenizer,
    examples: &[Example],
    sampled: usize,
    samples: usize,
    max_new_tokens: usize,
    seed: u64,
) -> Result<PromptScores> {
    let greedy_cfg = GenerateConfig {
        max_new_tokens,
        sampling: SamplingParams::GREEDY,
        seed: 0,
        stop_token: None,
        vocab_limit: None,
    };
    let (g, _) = sample_rewards(gpu, model, tok, examples, 1, greedy_cfg)?;
    let cfg = GenerateConfig { max_new_tokens, sampling: TEMPERATURE_1, seed, stop_token: None, vocab_limit: None };
    let examples = &examples[..sampled.min(examples.len())];
    let (rewards, outs) = if examples.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        sample_rewards(gpu, model, tok, examples, samples, cfg)?
    };
    let ct = ChatTokens::from_tokenizer(tok)?;
    let prompts = chat_prompts(tok, ct, examples, model.config.n_ctx)?;
    let pairs = prompts.iter().zip(&outs).flat_map(|(p, group)| group.iter().map(move |c| (&p[..], &c.tokens[..])));
    let (rows, counted) = continuation_rows(pairs);
    let entropy = if rows.is_empty() { None } else { Some(mean_entropy(gpu, model, &rows, &counted, 16)?) };
    Ok(PromptScores {
        greedy: g.iter().map(|r| f64::from(u8::from(r[0] >= 1.0))).collect(),
        correct: rewards.iter().map(|r| r.iter().filter(|&&x| x >= 1.0).count()).collect(),
        samples,
        entropy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_matches_its_definition() {
        // All correct, none correct, and a hand-checked middle case: n = 4, c = 1, k = 2 → 1 − C(3,2)/C(4,2) = 1/2.
        assert_eq!(pass_at_k(4, 4, 2), 1.0);
        assert_eq!(pass_at_k(4, 0, 2), 0.0);
        assert!((pass_at_k(4, 1, 2) - 0.5).abs() < 1e-12);
        assert!((pass_at_k(16, 3, 1) - 3.0 / 16.0).abs() < 1e-12, "pass@1 is the fraction correct");
        assert!(pass_at_k(4, 1, 5).is_nan(), "k > n cannot be estimated");
    }

    /// A tiny GPT whose token embedding (tied to the output) is scaled by `sharpen`: two seeds and two scales give
    /// distributions of different sharpness, so KL(P‖Q) and KL(Q‖P) differ several-fold (1.07 against 5.86 nats
    /// here). Much larger scales make both one-hot on the input token, and every KL vanishes.
    fn peaky_model(gpu: &Gpu, seed: u64, sharpen: f32) -> Model {
        let config = crate::arch::config::ModelConfig::preset("tiny", 64).unwrap();
        let mut host = Model::new(gpu, &config, seed).unwrap().to_host(gpu).unwrap();
        for t in host.iter_mut().filter(|t| t.name.contains("wte")) {
            t.data.iter_mut().for_each(|v| *v *= sharpen);
        }
        Model::from_host(gpu, &config, host).unwrap()
    }

    /// KL(P‖Q) per position from the two models' logits, in f64 on the host.
    fn host_kl(gpu: &Gpu, p: &Model, q: &Model, tokens: &[i32], b: usize, t: usize) -> Vec<f64> {
        let mut tape = Tape::no_grad(gpu);
        let (lp, lq) = (p.logits(&mut tape, tokens, b, t).unwrap(), q.logits(&mut tape, tokens, b, t).unwrap());
        let (lp, lq) = (gpu.read(tape.value(lp)).unwrap(), gpu.read(tape.value(lq)).unwrap());
        let v = p.config.vocab_size;
        let log_softmax = |row: &[f32]| {
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let z = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
            row.iter().map(|&x| x as f64 - z).collect::<Vec<_>>()
        };
        lp.chunks(v)
            .zip(lq.chunks(v))
            .map(|(a, b)| {
                let (la, lb) = (log_softmax(a), log_softmax(b));
                la.iter().zip(&lb).map(|(x, y)| x.exp() * (x - y)).sum()
            })
            .collect()
    }

    #[test]
    fn mean_kl_is_kl_of_reference_from_policy_over_counted_positions() {
        let gpu = kiln_engine::testing::gpu();
        let (reference, policy) = (peaky_model(gpu, 1, 6.0), peaky_model(gpu, 2, 2.0));
        // Two rows of different lengths (the shorter one padded) with a few positions counted.
        let rows: Vec<Vec<u32>> = vec![(0..9).map(|i| (i * 7 + 3) % 64).collect(), vec![5, 60, 2, 33, 17]];
        let counted =
            vec![vec![false, true, true, false, true, true, true, false, true], vec![true, false, true, true, true]];
        let (b, t) = (2, 8);
        let mut tokens = vec![0i32; b * t];
        for (r, row) in rows.iter().enumerate() {
            for (i, &id) in row.iter().take(t).enumerate() {
                tokens[r * t + i] = id as i32;
            }
        }
        let forward = host_kl(gpu, &reference, &policy, &tokens, b, t);
        let reverse = host_kl(gpu, &policy, &reference, &tokens, b, t);
        // Counted positions that predict a real next token (position i predicts token i + 1 of its row).
        let picked: Vec<usize> = (0..b)
            .flat_map(|r| (0..t).map(move |i| (r, i)))
            .filter(|&(r, i)| i + 1 < rows[r].len() && counted[r][i])
            .map(|(r, i)| r * t + i)
            .collect();
        let mean = |kl: &[f64]| picked.iter().map(|&at| kl[at]).sum::<f64>() / picked.len() as f64;
        let (want, swapped) = (mean(&forward), mean(&reverse));
        assert!((want - swapped).abs() > 0.1 * want, "the models are too alike to tell the directions apart");
        for batch in [1, 2] {
            let got = mean_kl(gpu, &reference, &policy, &rows, &counted, batch).unwrap();
            // Same f32 logits on both sides: only kl_rows' f32 sums differ (~1e-6 nats per row at V = 64).
            assert!((got - want).abs() < 1e-5 + 1e-5 * want, "batch {batch}: mean_kl {got}, KL(ref‖policy) {want}");
            assert!((got - swapped).abs() > 0.05 * want, "batch {batch}: {got} is the reverse KL {swapped}");
        }
        let none = vec![vec![false; 9], vec![false; 5]];
        assert!(mean_kl(gpu, &reference, &policy, &rows, &none, 2).is_err(), "no counted positions is an error");
    }

    #[test]
    fn mean_entropy_is_the_models_entropy_over_counted_positions() {
        let gpu = kiln_engine::testing::gpu();
        let model = peaky_model(gpu, 3, 3.0);
        let rows: Vec<Vec<u32>> = vec![vec![1, 9, 30, 4, 4, 61], vec![7, 2, 40]];
        let counted = vec![vec![true, false, true, true, true, true], vec![false, true, true]];
        let (b, t, v) = (2, 5, 64);
        let mut tokens = vec![0i32; b * t];
        for (r, row) in rows.iter().enumerate() {
            for (i, &id) in row.iter().take(t).enumerate() {
                tokens[r * t + i] = id as i32;
            }
        }
        let mut tape = Tape::no_grad(gpu);
        let l = model.logits(&mut tape, &tokens, b, t).unwrap();
        let logits = gpu.read(tape.value(l)).unwrap();
        let entropy = |row: &[f32]| {
            let m = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
            let z = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
            -row.iter().map(|&x| (x as f64 - z).exp() * (x as f64 - z)).sum::<f64>()
        };
        let picked = [(0, 0), (0, 2), (0, 3), (0, 4), (1, 1)];
        let want = picked.iter().map(|&(r, i)| entropy(&logits[(r * t + i) * v..][..v])).sum::<f64>() / 5.0;
        let got = mean_entropy(gpu, &model, &rows, &counted, 2).unwrap();
        assert!((got - want).abs() < 1e-4 * want.max(1.0), "mean_entropy {got}, host {want}");
        assert!(want > 0.1 && want < (64f64).ln(), "{want}: neither one-hot nor uniform, so the test can fail");
    }

    #[test]
    fn bits_per_byte_counts_every_target_and_exactly_its_bytes() {
        // A model with every weight zero predicts the uniform distribution: ln V nats per token, exactly.
        let gpu = kiln_engine::testing::gpu();
        let text = "the cat sat on the mat. the dog sat on the log. ".repeat(6);
        let tok = Tokenizer::train(&text, 300, &[]).unwrap();
        let config = crate::arch::config::ModelConfig::preset("tiny", tok.vocab_size()).unwrap();
        let zero: Vec<_> = Model::new(gpu, &config, 1)
            .unwrap()
            .to_host(gpu)
            .unwrap()
            .into_iter()
            .map(|mut t| {
                t.data.iter_mut().for_each(|v| *v = 0.0);
                t
            })
            .collect();
        let model = Model::from_host(gpu, &config, zero).unwrap();
        let tokens = tok.encode(&text).unwrap();
        let first = tok.decode(&tokens[..1]).unwrap();
        assert!(text.starts_with(&first) && !first.is_empty());
        // Windows of 16 with batch 3: several batches and a short last window, all of them counted.
        let got = bits_per_byte(gpu, &model, &tok, &tokens, 3, 16).unwrap();
        let (n, bytes) = (tokens.len() - 1, text.len() - first.len());
        let ln_v = (tok.vocab_size() as f64).ln();
        assert_eq!((got.tokens, got.bytes), (n, bytes));
        assert!((got.nats_per_token - ln_v).abs() < 1e-5, "{got:?}, ln V = {ln_v}");
        let want = n as f64 * ln_v / std::f64::consts::LN_2 / bytes as f64;
        assert!((got.bits_per_byte - want).abs() < 1e-5 * want, "{got:?}, want {want}");
        assert!(bits_per_byte(gpu, &model, &tok, &tokens[..1], 3, 16).is_err(), "one token predicts nothing");
    }

    #[test]
    fn wilson_interval_is_inside_unit_range_and_shrinks_with_n() {
        let a = wilson(0.0, 10);
        assert_eq!(a.lo, 0.0);
        assert!(a.hi > 0.2 && a.hi < 0.35, "{a:?}"); // 0.278 for 0/10
        let b = wilson(0.5, 100);
        let c = wilson(0.5, 1000);
        assert!(b.lo < 0.5 && b.hi > 0.5);
        assert!(c.hi - c.lo < b.hi - b.lo);
    }
}
