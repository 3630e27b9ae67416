//! The tokenizers rebuilt from the real GGUF files: exact token ids against llama.cpp's own
//! tokenizer (`llama-tokenize`, llama.cpp from llama-cpp-python 0.3.36, run on the same GGUF
//! files; ids written here), lossless round trips, and streaming detokenization that emits only
//! complete UTF-8.

mod common;

use lambdachat::engine::Engine;
use lambdachat::fetch::{GEMMA3_270M, ensure};
use lambdachat::tokenizer::{TextStream, Tokenizer};

const SAMPLES: &[&str] = &[
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキストと中文文本",
    "emoji 🦀🎉👩‍💻 done",
    "fn main() {\n    let x = 42;\n    println!(\"{x}\");\n}\n",
    "I'm   here\t\ttabs  123456789 it's\n\n\nEND",
];

/// `llama-tokenize -m MODEL -f SAMPLE --ids --no-bos`, for each of SAMPLES in order.
const QWEN2_IDS: &[&[u32]] = &[
    &[9707, 1879],
    &[785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13],
    &[
        101059, 102819, 15767, 56833, 61803, 70534, 19182, 104811, 108704,
    ],
    &[
        37523, 11162, 99, 222, 144841, 145233, 378, 235, 145851, 2814,
    ],
    &[
        8822, 1887, 368, 341, 262, 1077, 856, 284, 220, 19, 17, 280, 262, 13751, 88928, 87, 20305,
        532,
    ],
    &[
        40, 2776, 256, 1588, 197, 3244, 3435, 220, 220, 16, 17, 18, 19, 20, 21, 22, 23, 24, 432,
        594, 1406, 4689,
    ],
];
const GEMMA3_IDS: &[&[u32]] = &[
    &[9259, 1902],
    &[
        818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761,
    ],
    &[94951, 236945, 95830, 237032, 55041, 57489],
    &[67906, 236743, 248714, 242061, 243767, 237243, 244862, 3028],
    &[
        15059, 1689, 825, 642, 107, 140, 1184, 1123, 578, 236743, 236812, 236778, 236793, 107, 140,
        4629, 196439, 236781, 51324, 107, 236783, 107,
    ],
    &[
        236777, 236789, 236757, 139, 8472, 255969, 39218, 138, 236770, 236778, 236800, 236812,
        236810, 236825, 236832, 236828, 236819, 625, 236789, 236751, 109, 8516,
    ],
];

fn same_ids_as_llama_cpp(tok: &Tokenizer, expected: &[&[u32]]) {
    for (text, ids) in SAMPLES.iter().zip(expected) {
        assert_eq!(&tok.encode(text).unwrap(), ids, "ids of {text:?}");
    }
}

#[test]
fn qwen2_ids_match_llama_cpp() {
    same_ids_as_llama_cpp(&common::engine().tokenizer, QWEN2_IDS);
}

#[test]
fn gemma3_ids_match_llama_cpp() {
    let engine = Engine::load(&ensure(&GEMMA3_270M).unwrap()).unwrap();
    same_ids_as_llama_cpp(&engine.tokenizer, GEMMA3_IDS);
}

fn round_trip_and_stream(tok: &Tokenizer) {
    for text in SAMPLES {
        let ids = tok.encode(text).unwrap();
        assert_eq!(&tok.decode(&ids).unwrap(), text, "round trip of {text:?}");
        // The offsets the chat maps tokens to characters with: same ids, and each token's text
        // starts where its offset says.
        let (with_offsets, starts) = tok
            .encode_with_offsets(text, std::slice::from_ref(&(0..text.len())))
            .unwrap();
        assert_eq!(with_offsets, ids);
        assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
        let mut ends = starts[1..].to_vec();
        ends.push(text.len());
        for ((id, start), end) in ids.iter().zip(&starts).zip(&ends) {
            let piece = tok.decode(&[*id]).unwrap();
            if start < end && !piece.contains('\u{FFFD}') {
                assert_eq!(&text[*start..*end], piece, "token {id} of {text:?}");
            }
        }
        let mut stream = TextStream::new();
        let mut out = String::new();
        for id in &ids {
            if let Some(piece) = stream.push(tok, *id).unwrap() {
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "incomplete character in {piece:?}"
                );
                out.push_str(&piece);
            }
        }
        out.push_str(&stream.finish(tok).unwrap().unwrap_or_default());
        assert_eq!(&out, text, "streamed {text:?}");
    }
}

#[test]
fn qwen2_byte_level_bpe_round_trips_and_streams() {
    let engine = common::engine();
    round_trip_and_stream(&engine.tokenizer);
}

#[test]
fn gemma3_sentencepiece_round_trips_and_streams() {
    let engine = Engine::load(&ensure(&GEMMA3_270M).unwrap()).unwrap();
    round_trip_and_stream(&engine.tokenizer);
}

#[test]
fn streaming_never_panics_on_arbitrary_ids() {
    let engine = common::engine();
    let tok = &engine.tokenizer;
    let mut stream = TextStream::new();
    // Lone UTF-8 continuation bytes and a truncated emoji: held back, then flushed lossily.
    let emoji = tok.encode("🦀").unwrap();
    for id in emoji
        .iter()
        .take(emoji.len() - 1)
        .chain([0u32, 1, 2].iter())
    {
        let _ = stream.push(tok, *id).unwrap();
    }
    let _ = stream.finish(tok).unwrap();
    assert!(tok.decode(&[u32::MAX]).is_err());
}

/// Text that goes on from text already tokenized gets no space put before it: on a
/// SentencePiece vocabulary that adds one (the tiny test model's) the two parts decode to the
/// text itself, where the plain encoding adds a space; on the real models (Qwen's byte-level
/// BPE, Gemma's SentencePiece without the prefix) continuing and plain encodings agree.
#[test]
fn a_continuation_gets_no_space_put_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny.gguf");
    common::tiny::write_gguf(&tiny, "qwen2");
    let gemma = ensure(&GEMMA3_270M).unwrap();
    let (first, next) = ("once upon", " a time,no space");
    for (path, adds_prefix) in [
        (tiny, true),
        (common::default_model_path(), false),
        (gemma, false),
    ] {
        let tok = Engine::load(&path).unwrap().tokenizer;
        let mut ids = tok.encode(first).unwrap();
        let plain = tok.encode(next).unwrap();
        let (continued, starts) = tok.encode_continuation(next).unwrap();
        assert_eq!(starts.len(), continued.len());
        assert_eq!(continued != plain, adds_prefix, "{}", path.display());
        ids.extend(&continued);
        let text = tok.decode(&ids).unwrap();
        assert!(
            text.ends_with(&format!("{first}{next}")),
            "{}: {text:?}",
            path.display()
        );
    }
}
