//! Tests of the data pipeline: corpora, shard files, the train/val split, and the batch samplers.

use super::*;

use crate::test_util::Scratch;

fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn bundled_corpus_is_the_plays() {
    let text = bundled_corpus().unwrap();
    assert_eq!(text.len(), 5_057_282);
    assert!(text.is_ascii());
    assert!(text.contains("To be, or not to be"));
}

#[test]
fn read_corpus_joins_documents() {
    let dir = Scratch::new("data", "read_corpus");
    let (a, b) = (dir.path("a.txt"), dir.path("b.txt"));
    std::fs::write(&a, "\u{feff}first doc\nline two\n\n").unwrap();
    std::fs::write(&b, "second doc ✓").unwrap();
    assert_eq!(read_corpus(&[a.clone(), b.clone()]).unwrap(), "first doc\nline two\n\nsecond doc ✓");
    assert_eq!(read_corpus(std::slice::from_ref(&b)).unwrap(), "second doc ✓");
}

#[test]
fn read_corpus_errors_name_the_file() {
    let dir = Scratch::new("data", "read_corpus_errors");
    assert!(err(read_corpus(&[])).contains("no corpus"));
    let missing = dir.path("missing.txt");
    assert!(err(read_corpus(&[missing])).contains("missing.txt"));
    let empty = dir.path("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = err(read_corpus(&[empty]));
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let latin1 = dir.path("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
    let e = err(read_corpus(&[latin1]));
    assert!(e.contains("latin1.txt") && e.contains("UTF-8") && e.contains("offset 3"), "{e}");
}

#[test]
fn shard_round_trips_both_widths() {
    let dir = Scratch::new("data", "shard_round_trip");
    let path = dir.path("s.bin");
    for (vocab, tokens) in
        [(50257, vec![0, 1, 50256, 7, 65535 % 50257]), (65536, vec![65535, 0]), (70000, vec![69999, 3, 65536])]
    {
        write_shard(&path, &tokens, vocab).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let width = if vocab <= 65536 { 2 } else { 4 };
        assert_eq!(bytes.len(), 256 + width * tokens.len());
        assert_eq!(&bytes[..8], b"KILNTOK1");
        assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), width as u32);
        assert_eq!(read_shard(&path).unwrap(), Shard { vocab_size: vocab, tokens });
    }
    write_shard(&path, &[], 10).unwrap();
    assert_eq!(read_shard(&path).unwrap().tokens, Vec::<u32>::new());
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1, "no temporary file left");
}

#[test]
fn shard_rejects_corruption() {
    let dir = Scratch::new("data", "shard_corrupt");
    let path = dir.path("s.bin");
    write_shard(&path, &[1, 2, 3, 4], 100).unwrap();
    let good = std::fs::read(&path).unwrap();
    let check = |bytes: &[u8], want: &str| {
        std::fs::write(&path, bytes).unwrap();
        let e = err(read_shard(&path));
        assert!(e.contains("s.bin") && e.contains(want), "want {want:?} in {e}");
    };
    check(&good[..100], "header");
    check(&good[..good.len() - 1], "truncated");
    check(&[good.as_slice(), &[0, 0]].concat(), "truncated");
    let mut b = good.clone();
    b[0] = b'X';
    check(&b, "magic");
    let mut b = good.clone();
    b[8] = 2;
    check(&b, "version 2");
    let mut b = good.clone();
    b[12] = 4;
    check(&b, "width");
    let mut b = good.clone();
    b[24] = 200;
    check(&b, "200 tokens");
    let mut b = good.clone();
    b[100] = 1;
    check(&b, "reserved");
    let mut b = good.clone();
    b[256 + 2] = 100; // token 1 := 100, vocab is 100
    check(&b, "token 1 has id 100");
    let mut b = good.clone();
    b[16..24].copy_from_slice(&0u64.to_le_bytes());
    check(&b, "vocab_size 0");
    let mut b = good;
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    check(&b, "truncated");

    assert!(err(write_shard(&path, &[1, 100], 100)).contains("token 1 has id 100"));
    assert!(err(write_shard(&path, &[], 0)).contains("vocab_size 0"));
    assert!(err(read_shard(&dir.path("none.bin"))).contains("none.bin"));
}

fn small_tokenizer() -> Tokenizer {
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(20);
    Tokenizer::train(&text, 300, &["<|endoftext|>"]).unwrap()
}

#[test]
fn prepare_splits_across_the_corpus() {
    let dir = Scratch::new("data", "prepare");
    let tok = small_tokenizer();
    // Numbered lines: each encodes to distinct tokens, so where val came from is visible in its text.
    let text: String = (0..400).map(|i| format!("line {i} of the quick brown fox\n")).collect();
    let all = tok.encode(&text).unwrap();
    let report = prepare(&text, &tok, &dir.0, 0.1, 64).unwrap();
    assert_eq!(report.train_tokens + report.val_tokens, all.len());
    assert_eq!(report.vocab_size, tok.vocab_size());
    let train = read_shard(&dir.path("train.bin")).unwrap();
    let val = read_shard(&dir.path("val.bin")).unwrap();
    assert_eq!((train.tokens.len(), val.tokens.len()), (report.train_tokens, report.val_tokens));
    // Every 10th chunk of 64: chunks 9, 19, ...
    let want_val: Vec<u32> = all.chunks(64).skip(9).step_by(10).flatten().copied().collect();
    let want_train: Vec<u32> =
        all.chunks(64).enumerate().filter(|(i, _)| i % 10 != 9).flat_map(|(_, c)| c.to_vec()).collect();
    assert_eq!(val.tokens, want_val);
    assert_eq!(train.tokens, want_train);
    let frac = report.val_tokens as f64 / all.len() as f64;
    assert!((0.07..0.13).contains(&frac), "{frac}");
    let val_text = tok.decode(&val.tokens).unwrap();
    let lines: Vec<u32> = val_text.split("line ").filter_map(|s| s.split(' ').next()?.parse().ok()).collect();
    let (lo, hi) = (lines.iter().min().unwrap(), lines.iter().max().unwrap());
    assert!(*lo < 60 && *hi > 340, "val spans lines {lo}..{hi}");
    // Entropy: positive, below log2 of the distinct tokens used.
    let distinct = train.tokens.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(report.unigram_entropy_bits > 1.0 && report.unigram_entropy_bits <= (distinct as f64).log2() + 1e-9);
    assert_eq!(Tokenizer::from_file(&dir.path("tokenizer.json")).unwrap().encode(&text).unwrap(), all);
}

#[test]
fn prepare_small_corpus_shrinks_chunks() {
    let dir = Scratch::new("data", "prepare_small");
    let tok = small_tokenizer();
    let text: String = (0..10).map(|i| format!("line {i} of the fox\n")).collect();
    let n = tok.encode(&text).unwrap().len();
    let report = prepare(&text, &tok, &dir.0, 0.1, 4096).unwrap();
    assert_eq!(report.train_tokens + report.val_tokens, n);
    assert!(report.val_tokens > 0 && report.val_tokens <= n / 5, "{report:?} of {n}");
}

#[test]
fn prepare_errors() {
    let dir = Scratch::new("data", "prepare_errors");
    let tok = small_tokenizer();
    assert!(err(prepare("", &tok, &dir.0, 0.1, 64)).contains("empty"));
    assert!(err(prepare("the fox", &tok, &dir.0, 0.0, 64)).contains("val_fraction"));
    assert!(err(prepare("the fox", &tok, &dir.0, f64::NAN, 64)).contains("val_fraction"));
    assert!(err(prepare("the fox", &tok, &dir.0, 0.1, 0)).contains("chunk"));
    let e = err(prepare("the fox", &tok, &dir.0, 0.1, 64));
    assert!(e.contains("tokens") && e.contains("10"), "{e}");
}

#[test]
fn entropy_of_known_distributions() {
    assert_eq!(unigram_entropy_bits(&[], 4), 0.0);
    assert_eq!(unigram_entropy_bits(&[3, 3, 3], 4), 0.0);
    assert!((unigram_entropy_bits(&[0, 1, 2, 3], 4) - 2.0).abs() < 1e-12);
    assert!((unigram_entropy_bits(&[0, 0, 1, 2], 3) - 1.5).abs() < 1e-12);
}

fn ramp(n: u32) -> Arc<Vec<u32>> {
    Arc::new((0..n).collect())
}

#[test]
fn sampler_windows_and_reproducibility() {
    let tokens = ramp(1000);
    let (b, t) = (4, 16);
    let mut s = BatchSampler::new(tokens.clone(), b, t, 7).unwrap();
    let mut same = BatchSampler::new(tokens.clone(), b, t, 7).unwrap();
    let mut other = BatchSampler::new(tokens.clone(), b, t, 8).unwrap();
    let mut differs = false;
    for _ in 0..20 {
        let (x, y) = s.next_batch();
        assert_eq!((x.len(), y.len()), (b * t, b * t));
        for row in 0..b {
            let xs = &x[row * t..(row + 1) * t];
            let ys = &y[row * t..(row + 1) * t];
            // On a ramp a window is consecutive numbers, and targets are the inputs shifted by one.
            assert!(xs.windows(2).all(|w| w[1] == w[0] + 1));
            assert!(xs.iter().zip(ys).all(|(a, b)| *b == a + 1));
            assert!(*ys.last().unwrap() < 1000);
        }
        assert_eq!(same.next_batch(), (x.clone(), y));
        differs |= other.next_batch().0 != x;
    }
    assert!(differs, "another seed gives another stream");
}

#[test]
fn sampler_covers_both_ends() {
    // T + 1 == len: the only start is 0.
    let mut s = BatchSampler::new(ramp(9), 3, 8, 1).unwrap();
    let (x, y) = s.next_batch();
    assert_eq!(x, [0, 1, 2, 3, 4, 5, 6, 7].repeat(3));
    assert_eq!(y, [1, 2, 3, 4, 5, 6, 7, 8].repeat(3));
    // Starts 0..=2 all appear.
    let mut s = BatchSampler::new(ramp(6), 50, 3, 1).unwrap();
    let (x, _) = s.next_batch();
    let starts: std::collections::HashSet<i32> = x.chunks(3).map(|w| w[0]).collect();
    assert_eq!(starts, [0, 1, 2].into_iter().collect());
}

#[test]
fn sampler_restore_continues_the_stream() {
    let tokens = ramp(5000);
    let mut a = BatchSampler::new(tokens.clone(), 2, 32, 42).unwrap();
    for _ in 0..5 {
        a.next_batch();
    }
    let saved = a.state();
    let json = serde_json::to_string(&saved).unwrap();
    let expected: Vec<_> = (0..5).map(|_| a.next_batch()).collect();

    let mut b = BatchSampler::new(tokens.clone(), 2, 32, 0).unwrap();
    b.restore(&serde_json::from_str(&json).unwrap()).unwrap();
    let got: Vec<_> = (0..5).map(|_| b.next_batch()).collect();
    assert_eq!(got, expected);
    assert_eq!(b.state(), a.state());

    let mut wrong = BatchSampler::new(tokens, 4, 32, 42).unwrap();
    let e = err(wrong.restore(&saved));
    assert!(e.contains("batch 2") && e.contains("batch 4"), "{e}");
}

#[test]
fn sampler_errors() {
    let e = err(BatchSampler::new(ramp(10), 2, 10, 0));
    assert!(e.contains("10 tokens") && e.contains("needs 11"), "{e}");
    assert!(err(BatchSampler::new(ramp(10), 0, 4, 0)).contains("at least 1"));
    assert!(err(BatchSampler::new(ramp(10), 2, 0, 0)).contains("at least 1"));
    assert!(err(BatchSampler::new(Arc::new(Vec::new()), 1, 1, 0)).contains("0 tokens"));
}

#[test]
fn sequential_batches_cover_once() {
    let tokens: Vec<u32> = (0..100).collect();
    // 99 / 8 = 12 windows, 12 / 3 = 4 batches.
    let batches = sequential_batches(&tokens, 3, 8);
    assert_eq!(batches.len(), 4);
    for (i, (x, y)) in batches.iter().enumerate() {
        let start = (i * 24) as i32;
        assert_eq!(*x, (start..start + 24).collect::<Vec<_>>());
        assert_eq!(*y, (start + 1..start + 25).collect::<Vec<_>>());
    }
    // Exactly B·T + 1 tokens: one batch; one fewer: none.
    assert_eq!(sequential_batches(&tokens[..25], 3, 8).len(), 1);
    assert!(sequential_batches(&tokens[..24], 3, 8).is_empty());
    assert!(sequential_batches(&tokens, 0, 8).is_empty());
    assert!(sequential_batches(&tokens, 3, 0).is_empty());
    assert!(sequential_batches(&[], 1, 1).is_empty());
}
