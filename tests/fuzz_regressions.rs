//! Inputs the fuzz targets (fuzz/, scripts/fuzz.sh) found to break something, each kept as a
//! test through the public API so that the fix stays. docs/RELIABILITY.md lists them.

mod common;

use candle_core::quantized::gguf_file::Value;
use lambdachat::attention::{
    AttentionCache, AttentionError, AttentionInput, HostCache, LambdaParams, LayerGeometry,
    MAX_POSITION, Rope, RopeStyle,
};
use lambdachat::model::metadata::Metadata;
use lambdachat::tokenizer::Tokenizer;
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

/// `bytes` (a KV snapshot) with the numbers of its Λ header changed by `edit`.
fn with_header(bytes: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).unwrap();
    let mut info = metadata.metadata().clone().unwrap();
    let mut header: serde_json::Value = serde_json::from_str(&info["lambda"]).unwrap();
    edit(&mut header);
    info.insert("lambda".into(), header.to_string());
    let tensors = SafeTensors::deserialize(bytes).unwrap();
    let views: Vec<(String, TensorView<'_>)> = tensors.tensors();
    safetensors::serialize(views, Some(info)).unwrap()
}

/// kv_snapshot, crash-7a64de8e: a snapshot whose next position was `u64::MAX` restored; one
/// attended token wrapped the counter, and the cache then saved a snapshot it refused itself
/// ("a layer has seen 1 tokens, the cache 0"). Positions past 2^48 are now refused at restore.
/// crash-662a1b1a: restored exactly at that limit, one more token went past it; a forward
/// there is now refused, and the cache still saves what restores.
#[test]
fn a_snapshot_at_the_end_of_the_position_range_is_refused() {
    let params = LambdaParams::new(4, 10, None).unwrap();
    let layers = vec![LayerGeometry::full(params, 1, 4)];
    let empty = HostCache::new(params, layers.clone())
        .to_snapshot()
        .unwrap();
    let at = |next: u64| {
        with_header(&empty, |h| {
            h["next_position"] = next.into();
        })
    };
    let Err(err) = HostCache::from_snapshot(&at(u64::MAX), params, layers.clone()) else {
        panic!("a snapshot at u64::MAX restored");
    };
    assert!(err.to_string().contains("past the limit"), "{err}");
    let pinned_far = with_header(&empty, |h| {
        h["pinned"] = serde_json::json!([[5, u64::MAX]]);
    });
    assert!(HostCache::from_snapshot(&pinned_far, params, layers.clone()).is_err());

    let rope = Rope::new(4, 10_000.0, RopeStyle::Neox);
    let (q, kv) = ([0.25f32; 8], [0.5f32; 4]);
    let input = AttentionInput {
        q: &q,
        k: &kv,
        v: &kv,
        n_tokens: 1,
        n_heads: 2,
        rope: &rope,
        scale: 0.5,
    };
    let mut at_limit = HostCache::from_snapshot(&at(MAX_POSITION), params, layers.clone()).unwrap();
    let refused = at_limit.attend(0, &input);
    assert!(
        matches!(refused, Err(AttentionError::PositionLimit)),
        "{refused:?}"
    );
    let saved = at_limit.to_snapshot().unwrap();
    HostCache::from_snapshot(&saved, params, layers.clone())
        .expect("a cache at the limit restores");

    // A far but possible position still restores, attends, saves and restores.
    let mut cache = HostCache::from_snapshot(&at(1 << 40), params, layers.clone()).unwrap();
    let out = cache.attend(0, &input).unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
    cache.advance(1);
    let again = cache.to_snapshot().unwrap();
    HostCache::from_snapshot(&again, params, layers).expect("what was saved restores");
}

/// gguf_vocab, crash-662df924: a SentencePiece vocabulary holding one text twice ("" at ids 1
/// and 2) counted its distinct texts (3) as its size, so the encoder's id 3 — a real row of
/// the model — was past it, and decoding a sampled id 3 failed. The size is now the highest id
/// + 1.
#[test]
fn a_vocabulary_with_a_repeated_token_counts_every_id() {
    let tokens = ["\0\0", "", "", "\0"].map(|t| Value::String(t.into()));
    let meta = std::collections::HashMap::from([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.to_vec()),
        ),
    ]);
    let tokenizer =
        Tokenizer::from_gguf_metadata(&Metadata::new(std::path::Path::new("dup.gguf"), meta))
            .unwrap();
    assert_eq!(tokenizer.vocab_size(), 4);
    let ids = tokenizer.encode("\0\0red_t\0\u{1}\u{1}").unwrap();
    assert!(ids.iter().all(|&id| id < 4), "{ids:?}");
    assert!(ids.contains(&3), "{ids:?}");
    tokenizer.decode(&ids).expect("every encoded id decodes");
}

/// gguf_open, oom-c528fcbc: a tiny model whose `attention.key_length` read about four billion
/// asked for a 16 GB table of RoPE frequencies (libFuzzer's out-of-memory). Every size the
/// decoder is built from is now capped, and a file past a cap is a clear error, for each of
/// them.
#[test]
fn a_model_file_with_giant_dimensions_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("qwen2.attention.key_length", 4_194_304_016u64),
        ("qwen2.embedding_length", 1 << 40),
        ("qwen2.attention.head_count", 1 << 30),
        ("qwen2.block_count", 1 << 33),
        ("qwen2.feed_forward_length", 1 << 36),
    ] {
        let mut model = common::tiny::tiny_model("qwen2");
        model.metadata.retain(|(k, _)| k != key);
        model.metadata.push((key.to_string(), Value::U64(value)));
        let path = dir.path().join("giant.gguf");
        model.write(&path);
        let Err(err) = lambdachat::engine::Engine::load(&path) else {
            panic!("{key} = {value} loaded");
        };
        let msg = err.to_string();
        assert!(msg.contains(key) && msg.contains("beyond"), "{key}: {msg}");
    }
}

/// gguf_vocab, out of its 2 GiB after 510,273 inputs: tokenizers 0.23 keeps each BPE model's
/// word cache in a thread-local map keyed by the model's id, which outlives the model, so every
/// tokenizer built and dropped left its words behind. GGUF tokenizers are now built without
/// that cache: building and dropping many, each encoding new words, leaves the memory flat.
#[test]
fn tokenizers_built_and_dropped_leave_no_memory_behind() {
    let (tokens, _, _) = common::tiny::vocabulary();
    let meta = || {
        std::collections::HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(tokens.iter().cloned().map(Value::String).collect()),
            ),
        ])
    };
    let round = |r: usize| {
        let tokenizer =
            Tokenizer::from_gguf_metadata(&Metadata::new(std::path::Path::new("t.gguf"), meta()))
                .unwrap();
        // 200 words never seen before, 40–60 bytes each: ~10 KB of cache per tokenizer.
        let text: String = (0..200)
            .map(|w| format!("w{r}x{w}{} ", "abcdefghij".repeat(4)))
            .collect();
        tokenizer.encode(&text).unwrap();
    };
    for r in 0..50 {
        round(r);
    }
    let before = lambdachat::eval::rss_bytes();
    for r in 50..1050 {
        round(r);
    }
    let grown = lambdachat::eval::rss_bytes().saturating_sub(before);
    // With the cache, 1,000 tokenizers left about 40 MB behind.
    assert!(
        grown < 4 << 20,
        "{} KB more after 1,000 tokenizers",
        grown >> 10
    );
}
