//! Tests of the tokenizer: round trips, determinism, persistence, the GPT-2 file formats and bad input.

use super::*;

const SAMPLE: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n\
First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n\
First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n";

use std::path::PathBuf;

use crate::test_util::Scratch;

fn sample_tokenizer() -> Tokenizer {
    Tokenizer::train(&SAMPLE.repeat(4), 300, &["<|endoftext|>"]).unwrap()
}

#[test]
fn round_trips_text_unicode_and_whitespace() {
    let tok = sample_tokenizer();
    let texts = [
        SAMPLE,
        "",
        " ",
        "   leading and trailing   ",
        "tabs\t\tand\n\n\n newlines \r\n mixed  \u{a0} spaces",
        "unicode: héllo wörld — ✓ 日本語 🦀 ﬁ",
        "digits 12345 and 'quotes' it's they're",
        "<|endoftext|> between <|endoftext|>docs",
    ];
    for text in texts {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "ids {ids:?}");
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
    }
}

#[test]
fn trained_vocab_layout() {
    let tok = sample_tokenizer();
    assert_eq!(tok.vocab_size(), 300);
    // Bytes first, merges next, the special last.
    assert_eq!(tok.token_id("<|endoftext|>"), Some(299));
    assert_eq!(tok.encode("<|endoftext|>").unwrap(), vec![299]);
    let single_bytes = (0..256).filter(|&id| tok.id_token(id).is_some_and(|t| t.chars().count() == 1)).count();
    assert_eq!(single_bytes, 256);
    // Frequent words became single tokens.
    assert_eq!(tok.encode(" Citizen").unwrap().len(), 1);
}

#[test]
fn small_corpus_gives_smaller_vocab() {
    let tok = Tokenizer::train("ab ab ab", 1000, &["<|endoftext|>"]).unwrap();
    assert!(tok.vocab_size() < 1000 && tok.vocab_size() > 256, "{}", tok.vocab_size());
    assert_eq!(tok.decode(&tok.encode("ab ab ba").unwrap()).unwrap(), "ab ab ba");
}

#[test]
fn training_is_deterministic() {
    let text = SAMPLE.repeat(3);
    let a = Tokenizer::train(&text, 350, &["<|endoftext|>"]).unwrap().to_json().unwrap();
    for _ in 0..3 {
        let b = Tokenizer::train(&text, 350, &["<|endoftext|>"]).unwrap().to_json().unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn save_and_load_give_identical_ids() {
    let dir = Scratch::new("tok", "save_load");
    let tok = sample_tokenizer();
    let path = dir.path("tokenizer.json");
    tok.save(&path).unwrap();
    let back = Tokenizer::from_file(&path).unwrap();
    let text = format!("{SAMPLE} ünïcode 🦀 <|endoftext|>");
    assert_eq!(back.encode(&text).unwrap(), tok.encode(&text).unwrap());
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.to_json().unwrap(), tok.to_json().unwrap());
    // No temporary file is left beside it.
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
}

#[test]
fn pieces_encode_like_the_whole_text() {
    let tok = sample_tokenizer();
    let text = format!("{}x  \n\n  y\t\tz<|endoftext|> w é\u{a0}ü \u{3000}日本 🦀  ", SAMPLE.repeat(50));
    let whole = tok.inner.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
    for target in [1, 7, 64, 1000] {
        let pieces = split_pieces(&text, target);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.len() > 1);
        let ids: Vec<u32> =
            pieces.iter().flat_map(|p| tok.inner.encode_fast(*p, false).unwrap().get_ids().to_vec()).collect();
        assert_eq!(ids, whole, "target {target}");
    }
    assert_eq!(tok.encode(&text).unwrap(), whole);
    assert_eq!(split_pieces("nowhitespaceatall", 2), vec!["nowhitespaceatall"]);
}

#[test]
fn add_special_tokens_returns_ids() {
    let mut tok = sample_tokenizer();
    let before = tok.vocab_size();
    let ids = tok.add_special_tokens(&["<|user|>", "<|assistant|>", "<|endoftext|>"]);
    assert_eq!(ids, vec![before as u32, before as u32 + 1, tok.token_id("<|endoftext|>").unwrap()]);
    assert_eq!(tok.vocab_size(), before + 2);
    let ids = tok.encode("<|user|>hi<|assistant|>").unwrap();
    assert_eq!(ids[0], before as u32);
    assert_eq!(tok.decode(&ids).unwrap(), "<|user|>hi<|assistant|>");
}

/// Byte-level stand-ins GPT-2 uses: 'Ġ' is the space byte.
fn write_gpt2_files(dir: &Scratch, merges_header: bool) -> (PathBuf, PathBuf) {
    let vocab = r#"{"h": 0, "e": 1, "l": 2, "o": 3, "Ġ": 4, "w": 5, "r": 6, "d": 7,
        "he": 8, "ll": 9, "hell": 10, "hello": 11, "Ġw": 12, "or": 13, "Ġwor": 14, "<|endoftext|>": 15}"#;
    let merges = "h e\nl l\nhe ll\nhell o\nĠ w\no r\nĠw or\n";
    let merges = if merges_header { format!("#version: 0.2\n{merges}") } else { merges.to_string() };
    let (v, m) = (dir.path("vocab.json"), dir.path("merges.txt"));
    std::fs::write(&v, vocab).unwrap();
    std::fs::write(&m, merges).unwrap();
    (v, m)
}

#[test]
fn gpt2_vocab_and_merges_load_and_encode() {
    let dir = Scratch::new("tok", "gpt2_files");
    for header in [true, false] {
        let (v, m) = write_gpt2_files(&dir, header);
        let tok = Tokenizer::from_gpt2_files(&v, &m).unwrap();
        assert_eq!(tok.vocab_size(), 16);
        assert_eq!(tok.encode("hello world").unwrap(), vec![11, 14, 2, 7]);
        assert_eq!(tok.encode("hello<|endoftext|>").unwrap(), vec![11, 15]);
        assert_eq!(tok.decode(&[11, 14, 2, 7]).unwrap(), "hello world");
        // Save and reload as tokenizer.json: same ids.
        let json = dir.path("tokenizer.json");
        tok.save(&json).unwrap();
        assert_eq!(Tokenizer::from_file(&json).unwrap().encode("hello world").unwrap(), vec![11, 14, 2, 7]);
    }
}

/// A hand-written tokenizer.json in GPT-2's layout with the merges as `merges_json`.
fn gpt2_style_json(merges_json: &str) -> String {
    format!(
        r#"{{"version": "1.0", "truncation": {{"direction": "Right", "max_length": 2, "strategy": "LongestFirst",
          "stride": 0}}, "padding": null,
          "added_tokens": [{{"id": 15, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": true, "special": true}}],
          "normalizer": null,
          "pre_tokenizer": {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}},
          "post_processor": {{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}},
          "decoder": {{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}},
          "model": {{"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false,
            "vocab": {{"h": 0, "e": 1, "l": 2, "o": 3, "Ġ": 4, "w": 5, "r": 6, "d": 7, "he": 8, "ll": 9,
              "hell": 10, "hello": 11, "Ġw": 12, "or": 13, "Ġwor": 14, "<|endoftext|>": 15}},
            "merges": {merges_json}}}}}"#
    )
}

#[test]
fn tokenizer_json_merges_as_strings_and_as_pairs() {
    let dir = Scratch::new("tok", "merges_variants");
    let strings = r#"["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or"]"#;
    let pairs = r#"[["h","e"], ["l","l"], ["he","ll"], ["hell","o"], ["Ġ","w"], ["o","r"], ["Ġw","or"]]"#;
    for (name, merges) in [("strings.json", strings), ("pairs.json", pairs)] {
        let path = dir.path(name);
        std::fs::write(&path, gpt2_style_json(merges)).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        assert_eq!(tok.vocab_size(), 16, "{name}");
        // The file's truncation to 2 tokens is dropped.
        assert_eq!(tok.encode("hello world<|endoftext|>").unwrap(), vec![11, 14, 2, 7, 15], "{name}");
        assert_eq!(tok.decode(&[11, 14, 2, 7]).unwrap(), "hello world");
    }
}

#[test]
fn bad_input_gives_errors() {
    let msg = |r: Result<Tokenizer>| r.unwrap_err().to_string();
    assert!(msg(Tokenizer::train("", 300, &[])).contains("empty"));
    let e = msg(Tokenizer::train("abc", 256, &["<|endoftext|>"]));
    assert!(e.contains("at least 257"), "{e}");
    assert!(msg(Tokenizer::train("abc", 300, &[""])).contains("empty"));

    let tok = sample_tokenizer();
    let e = tok.decode(&[5, 300]).unwrap_err().to_string();
    assert!(e.contains("300") && e.contains("vocabulary"), "{e}");

    let dir = Scratch::new("tok", "bad_input");
    let missing = dir.path("missing.json");
    assert!(msg(Tokenizer::from_file(&missing)).contains("missing.json"));
    let garbage = dir.path("garbage.json");
    std::fs::write(&garbage, "{\"not\": \"a tokenizer\"}").unwrap();
    assert!(msg(Tokenizer::from_file(&garbage)).contains("garbage.json"));

    let (v, m) = write_gpt2_files(&dir, true);
    std::fs::write(&m, "#version: 0.2\nh e\nl l x\n").unwrap();
    let e = msg(Tokenizer::from_gpt2_files(&v, &m));
    assert!(e.contains("merges.txt:3"), "{e}");
    std::fs::write(&m, "h e\nq z\n").unwrap();
    let e = msg(Tokenizer::from_gpt2_files(&v, &m));
    assert!(e.contains("merges.txt:2") && e.contains("\"q\""), "{e}");
    std::fs::write(&v, "[1, 2]").unwrap();
    assert!(msg(Tokenizer::from_gpt2_files(&v, &m)).contains("vocab.json"));
    std::fs::write(&v, r#"{"a": -1}"#).unwrap();
    assert!(msg(Tokenizer::from_gpt2_files(&v, &m)).contains("\"a\""));
}

/// The one test on the real corpus: a 400 KB slice, vocab 1024.
#[test]
fn trains_on_bundled_corpus_slice() {
    let corpus = crate::data::bundled_corpus().unwrap();
    let slice = &corpus[..400_000];
    let tok = Tokenizer::train(slice, 1024, &["<|endoftext|>"]).unwrap();
    assert_eq!(tok.vocab_size(), 1024);
    let ids = tok.encode(slice).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), slice);
    let bytes_per_token = slice.len() as f64 / ids.len() as f64;
    assert!(bytes_per_token > 2.2, "compression {bytes_per_token:.2} bytes/token");
}
