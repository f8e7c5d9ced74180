//! Tasks with verifiable answers for post-training: seeded generators of (prompt, answer) pairs, an exact-match
//! reward, and disjoint train/eval splits; plus user data as JSONL ({"prompt","response"} for SFT,
//! {"prompt","answer"} for RL) with errors that name the line.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::error::{io_err, ModelError, Result};

/// Word list for the text tasks: short, common, and made of lowercase ASCII letters only.
const WORDS: &[&str] = &[
    "apple", "river", "stone", "cloud", "bread", "light", "horse", "sword", "crown", "night", "green", "water",
    "flame", "heart", "ghost", "queen", "tower", "storm", "field", "bird", "king", "moon", "star", "rose", "wind",
    "fire", "gold", "iron", "salt", "wolf", "tree", "sea",
];

/// A task family. Each generates prompts whose answer is checked by exact match. `min` bounds a length from below
/// (the length-shifted variants the study evaluates have every prompt longer than any trained one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// "12+345=" → "357": two numbers of min..=digits digits (min 1 includes 0).
    Addition { min: u32, digits: u32 },
    /// "reverse: a b c" → "c b a": a list of min..=words words (min at least 2).
    Reverse { min: usize, words: usize },
    /// "count r in river" → "2": occurrences of a letter in `words` words (the letter may be absent).
    CountLetter { words: usize },
    /// "last: a b c" → "c": the last of min..=words words (the study's held-out family: evaluated, never trained).
    LastWord { min: usize, words: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub answer: String,
}

/// FNV-1a: a fixed hash (std's is randomly seeded per process), so a prompt's split never changes.
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// One prompt in ten belongs to eval, decided by the prompt text itself: the splits are disjoint by construction.
pub fn split_of(prompt: &str) -> Split {
    if fnv1a(prompt).is_multiple_of(10) {
        Split::Eval
    } else {
        Split::Train
    }
}

impl Task {
    pub const fn addition(digits: u32) -> Task {
        Task::Addition { min: 1, digits }
    }

    pub const fn reverse(words: usize) -> Task {
        Task::Reverse { min: 2, words }
    }

    /// Parse "addition", "addition:5", "addition:3-4", "reverse", "reverse:4", "reverse:4-6", "count", "count:2",
    /// "last", "last:3", "last:4-6" (a range gives the shortest and longest length).
    pub fn parse(spec: &str) -> Result<Task> {
        let (name, arg) = spec.split_once(':').map_or((spec, None), |(n, a)| (n, Some(a)));
        let number = |a: &str| -> Result<u64> {
            a.parse().map_err(|_| ModelError::Data(format!("task {spec:?}: {a:?} is not a number")))
        };
        // (shortest, longest), the shortest defaulting to `lo`.
        let range = |lo: u64, default: u64, hi: u64| -> Result<(u64, u64)> {
            let (a, b) = match arg {
                None => (lo, default),
                Some(a) => match a.split_once('-') {
                    Some((x, y)) => (number(x)?, number(y)?),
                    None => (lo, number(a)?),
                },
            };
            let (a, b) = (a.clamp(lo, hi), b.clamp(lo, hi));
            if a > b {
                return Err(ModelError::Data(format!("task {spec:?}: the range {a}-{b} is empty")));
            }
            Ok((a, b))
        };
        match name {
            "addition" => range(1, 3, 9).map(|(a, b)| Task::Addition { min: a as u32, digits: b as u32 }),
            "reverse" => range(2, 4, 12).map(|(a, b)| Task::Reverse { min: a as usize, words: b as usize }),
            "count" => Ok(Task::CountLetter { words: number(arg.unwrap_or("1"))?.clamp(1, 6) as usize }),
            "last" => range(2, 4, 12).map(|(a, b)| Task::LastWord { min: a as usize, words: b as usize }),
            _ => Err(ModelError::Data(format!(
                "unknown task {spec:?}: use addition[:digits], reverse[:words], count[:words] or last[:words] \
                 (digits and words may be a range, e.g. reverse:4-6)"
            ))),
        }
    }

    pub fn name(&self) -> String {
        let range = |name: &str, min: usize, lo: usize, max: usize| {
            if min == lo {
                format!("{name}:{max}")
            } else {
                format!("{name}:{min}-{max}")
            }
        };
        match *self {
            Task::Addition { min, digits } => range("addition", min as usize, 1, digits as usize),
            Task::Reverse { min, words } => range("reverse", min, 2, words),
            Task::CountLetter { words: 1 } => "count".into(),
            Task::CountLetter { words } => format!("count:{words}"),
            Task::LastWord { min, words } => range("last", min, 2, words),
        }
    }

    /// The same skill at lengths never trained on: every prompt longer than the longest trained one (one or two
    /// more digits, one to three more words, one more word to count in). Evaluating it tells a skill that
    /// generalises from one fitted to the trained lengths. `None` where the task is already at its longest.
    pub fn shifted(&self) -> Option<Task> {
        let t = match *self {
            Task::Addition { digits, .. } if digits + 2 <= 9 => Task::Addition { min: digits + 1, digits: digits + 2 },
            Task::Reverse { words, .. } if words + 3 <= 12 => Task::Reverse { min: words + 1, words: words + 3 },
            Task::CountLetter { words } if words < 6 => Task::CountLetter { words: words + 1 },
            Task::LastWord { words, .. } if words + 3 <= 12 => Task::LastWord { min: words + 1, words: words + 3 },
            _ => return None,
        };
        Some(t)
    }

    fn draw(&self, rng: &mut ChaCha8Rng) -> Example {
        match *self {
            Task::Addition { min, digits } => {
                let lo = if min <= 1 { 0 } else { 10u64.pow(min - 1) };
                let max = 10u64.pow(digits);
                let (a, b) = (rng.random_range(lo..max), rng.random_range(lo..max));
                Example { prompt: format!("{a}+{b}="), answer: (a + b).to_string() }
            }
            Task::Reverse { min, words } => {
                let n = rng.random_range(min..=words);
                let list: Vec<&str> = (0..n).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
                let rev: Vec<&str> = list.iter().rev().copied().collect();
                Example { prompt: format!("reverse: {}", list.join(" ")), answer: rev.join(" ") }
            }
            Task::CountLetter { words } => {
                let text = (0..words).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect::<Vec<_>>().join(" ");
                // Half the time a letter of the text, so the answers are not mostly zero.
                let letter = if rng.random_bool(0.5) {
                    let letters: Vec<char> = text.chars().filter(|c| *c != ' ').collect();
                    letters[rng.random_range(0..letters.len())]
                } else {
                    (b'a' + rng.random_range(0..26u8)) as char
                };
                let count = text.chars().filter(|&c| c == letter).count();
                Example { prompt: format!("count {letter} in {text}"), answer: count.to_string() }
            }
            Task::LastWord { min, words } => {
                let n = rng.random_range(min..=words);
                let list: Vec<&str> = (0..n).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
                Example { prompt: format!("last: {}", list.join(" ")), answer: list[n - 1].to_string() }
            }
        }
    }

    /// `n` examples of `split`, reproducible from `seed`. Draws that fall in the other split are skipped, so no
    /// eval prompt is ever trained on. Small spaces (count) may repeat prompts within a split.
    pub fn examples(&self, split: Split, n: usize, seed: u64) -> Vec<Example> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(&self.name()));
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let e = self.draw(&mut rng);
            if split_of(&e.prompt) == split {
                out.push(e);
            }
        }
        out
    }

    /// The fixed evaluation set: `max` distinct eval-split prompts, the same on every call, or every distinct
    /// eval-split prompt where the task has fewer. Repeats would weight some prompts twice and shrink the
    /// intervals for nothing.
    pub fn eval_set(&self, max: usize) -> Vec<Example> {
        let mut rng = ChaCha8Rng::seed_from_u64(0x65_76_61_6c ^ fnv1a(&self.name()));
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        // A draw repeats a seen prompt ever more often as the space runs out: stop when 64 draws in a row add
        // nothing after the space has had ample chances to show every prompt (coupon collector).
        let (mut misses, mut draws) = (0usize, 0usize);
        while out.len() < max && !(misses >= 64 && draws > 50 * (out.len() + 1) + 20_000) {
            let e = self.draw(&mut rng);
            draws += 1;
            if split_of(&e.prompt) == Split::Eval && seen.insert(e.prompt.clone()) {
                out.push(e);
                misses = 0;
            } else {
                misses += 1;
            }
        }
        out
    }
}

/// 1.0 when the completion's first line, trimmed, equals the answer; else 0.0. Never NaN.
pub fn reward(completion: &str, answer: &str) -> f32 {
    let first = completion.lines().next().unwrap_or("").trim();
    if first == answer.trim() {
        1.0
    } else {
        0.0
    }
}

#[derive(Deserialize)]
struct SftLine {
    prompt: String,
    response: String,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path, fields: &str) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let item = serde_json::from_str(line).map_err(|e| {
            ModelError::Data(format!("{}:{}: expected a JSON object with {fields}: {e}", path.display(), i + 1))
        })?;
        out.push(item);
    }
    if out.is_empty() {
        return Err(ModelError::Data(format!("{}: no examples", path.display())));
    }
    Ok(out)
}

/// SFT data: one {"prompt": ..., "response": ...} object per line; the response is the answer to learn.
pub fn read_sft_jsonl(path: &Path) -> Result<Vec<Example>> {
    let lines: Vec<SftLine> = read_jsonl(path, "string fields \"prompt\" and \"response\"")?;
    Ok(lines.into_iter().map(|l| Example { prompt: l.prompt, answer: l.response }).collect())
}

/// RL data: one {"prompt": ..., "answer": ...} object per line; rewards are exact matches against the answer.
pub fn read_rl_jsonl(path: &Path) -> Result<Vec<Example>> {
    read_jsonl(path, "string fields \"prompt\" and \"answer\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Scratch;

    const ALL: [Task; 7] = [
        Task::addition(3),
        Task::reverse(4),
        Task::Addition { min: 4, digits: 5 },
        Task::Reverse { min: 5, words: 7 },
        Task::CountLetter { words: 1 },
        Task::CountLetter { words: 2 },
        Task::LastWord { min: 2, words: 3 },
    ];

    #[test]
    fn answers_are_right_and_rewards_exact() {
        for e in Task::addition(4).examples(Split::Train, 200, 1) {
            let (a, b) = e.prompt.trim_end_matches('=').split_once('+').unwrap();
            assert_eq!(a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap(), e.answer.parse::<u64>().unwrap());
            assert_eq!(reward(&format!(" {}\nmore text", e.answer), &e.answer), 1.0);
            assert_eq!(reward(&format!("{}0", e.answer), &e.answer), 0.0);
        }
        for e in Task::reverse(5).examples(Split::Eval, 50, 2) {
            let words: Vec<&str> = e.prompt.trim_start_matches("reverse: ").split(' ').collect();
            let rev: Vec<&str> = e.answer.split(' ').rev().collect();
            assert_eq!(words, rev);
        }
        for words in [1, 3] {
            for e in (Task::CountLetter { words }).examples(Split::Train, 100, 3) {
                let parts: Vec<&str> = e.prompt.split(' ').collect(); // count L in WORD...
                let letter = parts[1].chars().next().unwrap();
                assert_eq!(parts.len(), 3 + words);
                let n: usize = parts[3..].iter().map(|w| w.chars().filter(|&c| c == letter).count()).sum();
                assert_eq!(n.to_string(), e.answer);
            }
        }
        for e in (Task::LastWord { min: 2, words: 4 }).examples(Split::Eval, 50, 4) {
            assert_eq!(e.prompt.rsplit(' ').next().unwrap(), e.answer);
        }
        assert_eq!(reward("", "5"), 0.0);
    }

    #[test]
    fn splits_are_disjoint_and_seeded() {
        for task in ALL {
            let train = task.examples(Split::Train, 300, 7);
            let eval = task.examples(Split::Eval, 100, 7);
            assert!(train.iter().all(|e| split_of(&e.prompt) == Split::Train));
            assert!(eval.iter().all(|e| !train.iter().any(|t| t.prompt == e.prompt)), "{task:?} leaks eval prompts");
            assert_eq!(train, task.examples(Split::Train, 300, 7), "same seed, same examples");
            assert_ne!(train, task.examples(Split::Train, 300, 8));
        }
    }

    #[test]
    fn task_specs_parse_and_bad_ones_are_named() {
        assert_eq!(Task::parse("addition:5").unwrap(), Task::addition(5));
        assert_eq!(Task::parse("reverse").unwrap(), Task::reverse(4));
        assert_eq!(Task::parse("reverse:4-6").unwrap(), Task::Reverse { min: 4, words: 6 });
        assert!(Task::parse("reverse:6-4").unwrap_err().to_string().contains("empty"));
        assert_eq!(Task::parse("count").unwrap(), Task::CountLetter { words: 1 });
        assert_eq!(Task::parse("count:2").unwrap().name(), "count:2");
        assert_eq!(Task::parse("last").unwrap(), Task::LastWord { min: 2, words: 4 });
        for t in ALL {
            assert_eq!(Task::parse(&t.name()).unwrap(), t, "a task's name parses back to it");
        }
        assert_eq!(Task::parse("addition:3").unwrap().shifted(), Some(Task::Addition { min: 4, digits: 5 }));
        assert_eq!(Task::parse("count:6").unwrap().shifted(), None, "already at its longest");
        // Every prompt of a shifted variant is longer than any trained one: operands in digits, lists in words.
        let sizes = |e: &Example| -> Vec<usize> {
            match e.prompt.strip_suffix('=') {
                Some(sum) => sum.split('+').map(str::len).collect(),
                None => vec![e.prompt.split(' ').count()],
            }
        };
        for t in
            [Task::addition(2), Task::reverse(3), Task::CountLetter { words: 1 }, Task::LastWord { min: 2, words: 3 }]
        {
            let trained = t.examples(Split::Train, 300, 1).iter().flat_map(sizes).max().unwrap();
            let shifted = t.shifted().unwrap().examples(Split::Train, 300, 1).iter().flat_map(sizes).min().unwrap();
            assert!(shifted > trained, "{t:?}: shortest shifted {shifted} vs longest trained {trained}");
        }
        assert!(Task::parse("sorting").unwrap_err().to_string().contains("sorting"));
        assert!(Task::parse("addition:x").is_err());
    }

    #[test]
    fn eval_sets_are_fixed_distinct_eval_prompts_and_enumerate_small_tasks() {
        for task in ALL {
            let set = task.eval_set(500);
            assert_eq!(set, task.eval_set(500), "{task:?}: the same set every time");
            let distinct: std::collections::HashSet<_> = set.iter().map(|e| &e.prompt).collect();
            assert_eq!(distinct.len(), set.len(), "{task:?} repeats a prompt");
            assert!(set.iter().all(|e| split_of(&e.prompt) == Split::Eval));
        }
        // count (one word) has 32 words × 26 letters = 832 prompts: the set is every eval one among them.
        let count = Task::CountLetter { words: 1 };
        let mut every = 0;
        for w in WORDS {
            for l in 'a'..='z' {
                every += usize::from(split_of(&format!("count {l} in {w}")) == Split::Eval);
            }
        }
        assert_eq!(count.eval_set(500).len(), every);
        assert!(every > 40 && every < 500, "{every}");
        assert_eq!(Task::addition(3).eval_set(500).len(), 500);
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = Scratch::new("tasks", "jsonl");
        let good = dir.path("sft.jsonl");
        std::fs::write(&good, "{\"prompt\":\"1+1=\",\"response\":\"2\"}\n\n{\"prompt\":\"a\",\"response\":\"b\"}\n")
            .unwrap();
        assert_eq!(read_sft_jsonl(&good).unwrap().len(), 2);
        let bad = dir.path("rl.jsonl");
        std::fs::write(&bad, "{\"prompt\":\"1+1=\",\"answer\":\"2\"}\n{\"prompt\":\"x\"}\n").unwrap();
        let e = read_rl_jsonl(&bad).unwrap_err().to_string();
        assert!(e.contains("rl.jsonl:2"), "{e}");
        std::fs::write(&bad, "\n").unwrap();
        assert!(read_rl_jsonl(&bad).unwrap_err().to_string().contains("no examples"));
    }
}
