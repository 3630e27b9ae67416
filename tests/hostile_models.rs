//! Model files are input someone else wrote: crafted shapes and vocabularies end in a clear
//! error (or load in reasonable time), never a panic, a hang, or a write out of bounds.

mod common;

use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::Value;
use common::tiny::tiny_model;
use lambdachat::engine::Engine;

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A GGUF v3 file written byte by byte: one string of metadata and one Q8_0 tensor whose
/// dimensions (innermost first, as GGUF stores them) are `dims`, with `data` bytes after it.
fn raw_gguf(dims: &[u64], data: usize) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(1u64.to_le_bytes()); // tensors
    out.extend(1u64.to_le_bytes()); // metadata
    gguf_string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes()); // string
    gguf_string(&mut out, "qwen2");
    gguf_string(&mut out, "token_embd.weight");
    out.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend(d.to_le_bytes());
    }
    out.extend(8u32.to_le_bytes()); // Q8_0
    out.extend(0u64.to_le_bytes()); // offset
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(std::iter::repeat_n(0u8, data));
    out
}

fn load_error(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.gguf");
    std::fs::write(&path, bytes).unwrap();
    match Engine::load(&path) {
        Ok(_) => panic!("a hostile file loaded"),
        Err(e) => format!("{e:#}"),
    }
}

/// 2^63 + 16 rows of 32 values: their byte count wraps to 34 × 16 bytes in unchecked
/// arithmetic, which the file holds — and repacking would write 2^63 rows.
#[test]
fn a_shape_whose_size_wraps_is_refused() {
    let err = load_error(&raw_gguf(&[32, (1u64 << 63) + 16], 34 * 16));
    assert!(
        err.contains("token_embd.weight") && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn shapes_past_the_limits_or_the_file_are_refused() {
    for (dims, data, needle) in [
        (vec![32, 1 << 30], 34, "dimension"),
        (vec![32, 4], 34, "truncated"),
        (vec![48, 4], 34 * 8, "blocks"),
        (vec![0, 4], 0, "dimension"),
    ] {
        let err = load_error(&raw_gguf(&dims, data));
        assert!(err.contains(needle), "{dims:?}: {err}");
    }
}

fn with_metadata(key: &str, value: Value) -> std::path::PathBuf {
    let mut parts = tiny_model("qwen2");
    let entry = parts.metadata.iter_mut().find(|(k, _)| k == key).unwrap();
    entry.1 = value;
    let path = std::env::temp_dir().join(format!(
        "lambdachat-hostile-{}-{key}.gguf",
        std::process::id()
    ));
    parts.write(&path);
    path
}

fn metadata_array(key: &str) -> Vec<Value> {
    let parts = tiny_model("qwen2");
    match parts
        .metadata
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap()
        .1
    {
        Value::Array(v) => v,
        _ => unreachable!(),
    }
}

#[test]
fn token_types_longer_than_the_vocabulary_are_refused() {
    let mut types = metadata_array("tokenizer.ggml.token_type");
    types.extend([Value::I32(3), Value::I32(3)]);
    let path = with_metadata("tokenizer.ggml.token_type", Value::Array(types));
    let err = format!("{:#}", Engine::load(&path).err().unwrap());
    std::fs::remove_file(&path).ok();
    assert!(err.contains("token_type has"), "{err}");
}

#[test]
fn a_special_token_id_outside_the_vocabulary_is_refused() {
    let path = with_metadata("tokenizer.ggml.eos_token_id", Value::U32(1_000_000));
    let err = format!("{:#}", Engine::load(&path).err().unwrap());
    std::fs::remove_file(&path).ok();
    assert!(err.contains("eos_token_id"), "{err}");
}

/// SentencePiece merges are recovered by splitting each piece: one 10 MB piece used to cost
/// its length squared (hours). It loads in moments, and the rest of the vocabulary works.
#[test]
fn a_huge_token_does_not_hang_the_load() {
    let mut parts = tiny_model("qwen2");
    for (key, extra) in [
        ("tokenizer.ggml.tokens", Value::String("a".repeat(10 << 20))),
        ("tokenizer.ggml.scores", Value::F32(-1.0)),
        ("tokenizer.ggml.token_type", Value::I32(1)),
    ] {
        if let Some((_, Value::Array(v))) = parts.metadata.iter_mut().find(|(k, _)| k == key) {
            v.push(extra);
        }
    }
    // The embedding table grows by the new token's row.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge-token.gguf");
    let vocab = common::tiny::vocabulary().0.len() + 1;
    let mut rng = common::tiny::Rng::new(7);
    for (name, t) in parts.tensors.iter_mut() {
        if name == "token_embd.weight" {
            *t = rng.tensor(&[vocab, common::tiny::HIDDEN], 2.0, 0.0);
        }
    }
    parts.write(&path);
    let start = Instant::now();
    let engine = Engine::load(&path).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    let ids = engine.tokenizer.encode("hello world").unwrap();
    assert_eq!(engine.tokenizer.decode(&ids).unwrap(), "hello world");
}
