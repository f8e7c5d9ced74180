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

/// A task family. Each generates prompts whose answer is checked by exact match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// "12+345=" → "357": two numbers of 1..=digits digits.
    Addition { digits: u32 },
    /// "reverse: a b c" → "c b a": a list of 2..=words words.
    Reverse { words: usize },
    /// "count r in river" → "2": occurrences of a letter in `words` words (the letter may be absent).
    CountLetter { words: usize },
    /// "last: a b c" → "c": the last of 2..=words words (the study's held-out family: evaluated, never trained).
    LastWord { words: usize },
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
fn fnv1a(s: &str) -> u64 {
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
    /// Parse "addition", "addition:5", "reverse", "reverse:4", "count", "count:2", "last", "last:3".
    pub fn parse(spec: &str) -> Result<Task> {
        let (name, arg) = spec.split_once(':').map_or((spec, None), |(n, a)| (n, Some(a)));
        let num = |default: u64| -> Result<u64> {
            arg.map_or(Ok(default), |a| {
                a.parse().map_err(|_| ModelError::Data(format!("task {spec:?}: {a:?} is not a number")))
            })
        };
        match name {
            "addition" => Ok(Task::Addition { digits: num(3)?.clamp(1, 9) as u32 }),
            "reverse" => Ok(Task::Reverse { words: num(4)?.clamp(2, 12) as usize }),
            "count" => Ok(Task::CountLetter { words: num(1)?.clamp(1, 6) as usize }),
            "last" => Ok(Task::LastWord { words: num(4)?.clamp(2, 12) as usize }),
            _ => Err(ModelError::Data(format!(
                "unknown task {spec:?}: use addition[:digits], reverse[:words], count[:words] or last[:words]"
            ))),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Task::Addition { digits } => format!("addition:{digits}"),
            Task::Reverse { words } => format!("reverse:{words}"),
            Task::CountLetter { words: 1 } => "count".into(),
            Task::CountLetter { words } => format!("count:{words}"),
            Task::LastWord { words } => format!("last:{words}"),
        }
    }

    /// The same skill at a length never trained on: two more digits, three more words, one more word to count in.
    /// Evaluating it tells a skill that generalises from one fitted to the trained lengths.
    pub fn shifted(&self) -> Task {
        match *self {
            Task::Addition { digits } => Task::Addition { digits: (digits + 2).min(9) },
            Task::Reverse { words } => Task::Reverse { words: (words + 3).min(12) },
            Task::CountLetter { words } => Task::CountLetter { words: (words + 1).min(6) },
            Task::LastWord { words } => Task::LastWord { words: (words + 3).min(12) },
        }
    }

    fn draw(&self, rng: &mut ChaCha8Rng) -> Example {
        match *self {
            Task::Addition { digits } => {
                let max = 10u64.pow(digits);
                let (a, b) = (rng.random_range(0..max), rng.random_range(0..max));
                Example { prompt: format!("{a}+{b}="), answer: (a + b).to_string() }
            }
            Task::Reverse { words } => {
                let n = rng.random_range(2..=words);
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
            Task::LastWord { words } => {
                let n = rng.random_range(2..=words);
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

    const ALL: [Task; 5] = [
        Task::Addition { digits: 3 },
        Task::Reverse { words: 4 },
        Task::CountLetter { words: 1 },
        Task::CountLetter { words: 2 },
        Task::LastWord { words: 3 },
    ];

    #[test]
    fn answers_are_right_and_rewards_exact() {
        for e in (Task::Addition { digits: 4 }).examples(Split::Train, 200, 1) {
            let (a, b) = e.prompt.trim_end_matches('=').split_once('+').unwrap();
            assert_eq!(a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap(), e.answer.parse::<u64>().unwrap());
            assert_eq!(reward(&format!(" {}\nmore text", e.answer), &e.answer), 1.0);
            assert_eq!(reward(&format!("{}0", e.answer), &e.answer), 0.0);
        }
        for e in (Task::Reverse { words: 5 }).examples(Split::Eval, 50, 2) {
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
        for e in (Task::LastWord { words: 4 }).examples(Split::Eval, 50, 4) {
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
        assert_eq!(Task::parse("addition:5").unwrap(), Task::Addition { digits: 5 });
        assert_eq!(Task::parse("reverse").unwrap(), Task::Reverse { words: 4 });
        assert_eq!(Task::parse("count").unwrap(), Task::CountLetter { words: 1 });
        assert_eq!(Task::parse("count:2").unwrap().name(), "count:2");
        assert_eq!(Task::parse("last").unwrap(), Task::LastWord { words: 4 });
        for t in ALL {
            assert_eq!(Task::parse(&t.name()).unwrap(), t, "a task's name parses back to it");
        }
        assert_eq!(Task::parse("addition:3").unwrap().shifted(), Task::Addition { digits: 5 });
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
        assert_eq!((Task::Addition { digits: 3 }).eval_set(500).len(), 500);
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
