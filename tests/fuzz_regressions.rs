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

/// A saved conversation of the tiny model (one turn) in `dir/saved`, and the engine that made
/// it: what the store_load regressions damage.
fn saved_conversation(
    dir: &std::path::Path,
) -> (
    std::sync::Arc<lambdachat::engine::Engine>,
    std::path::PathBuf,
    i64,
) {
    use lambdachat::sampling::SamplingParams;
    use lambdachat::session::Session;
    use lambdachat::store::Store;
    use std::sync::atomic::AtomicBool;

    let model = dir.join("tiny.gguf");
    common::tiny::write_gguf(&model, "qwen2");
    let engine = std::sync::Arc::new(lambdachat::engine::Engine::load(&model).unwrap());
    let saved = dir.join("saved");
    std::fs::create_dir(&saved).unwrap();
    let store = Store::open(&saved.join("s.db")).unwrap();
    let params = LambdaParams::new(4, 16, None).unwrap();
    let id = store.create("t", "tiny", params).unwrap();
    let history = Box::new(store.history(id).unwrap());
    let mut session = Session::with_history(
        engine.clone(),
        params,
        SamplingParams::default(),
        None,
        history,
    )
    .unwrap();
    let never = AtomicBool::new(false);
    session.turn("hello", Some(4), &never, &mut |_| {}).unwrap();
    session.save().unwrap();
    (engine, saved, id)
}

/// The database and its KV files, copied.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// store_load, a panic after 51,511 inputs: a token row whose `first` was set to −1 read back
/// as position 2^64 − 1, and the run's end wrapped to 100 (`clamp` with min > max when the
/// message was inspected). A run that starts below 0 or ends past the position limit is now
/// damage, reported like a blob that does not decode.
#[test]
fn a_token_row_before_position_zero_is_damage_not_a_panic() {
    use lambdachat::sampling::SamplingParams;
    use lambdachat::session::Session;
    use lambdachat::store::Store;

    let dir = tempfile::tempdir().unwrap();
    let (engine, saved, id) = saved_conversation(dir.path());
    for first in [-1i64, i64::MIN] {
        let copy = dir.path().join(format!("damaged{first}"));
        copy_tree(&saved, &copy);
        let db = copy.join("s.db");
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute("UPDATE tokens SET first = ?1 WHERE first = 0", [first])
            .unwrap();
        let store = Store::open(&db).unwrap();
        let history = Box::new(store.history(id).unwrap());
        let Ok((session, _)) = Session::resume(engine.clone(), SamplingParams::default(), history)
        else {
            continue; // refused at resume: as good as later
        };
        let err = (0..session.message_count())
            .map(|i| session.inspect(i).map(|_| ()))
            .chain([session.tokens(0..session.token_count()).map(|_| ())])
            .find_map(Result::err)
            .unwrap_or_else(|| panic!("first = {first}: the damaged run was read as good"));
        assert!(
            err.to_string().contains("token run"),
            "first = {first}: {err}"
        );
    }
}

/// store_load, a timeout (15 s on one input) after 258,791 inputs: a head whose pins were
/// edited to span about 2^64 positions; the resume's pin counted the tokens it had lost by
/// walking the range. The count now walks the cache, and a resume clips a head's pins to the
/// conversation (sorted, merged) and refuses counts out of order.
#[test]
fn a_head_pinning_every_position_resumes_at_once() {
    use lambdachat::sampling::SamplingParams;
    use lambdachat::session::Session;
    use lambdachat::store::Store;
    use std::sync::atomic::AtomicBool;

    let dir = tempfile::tempdir().unwrap();
    let (engine, saved, id) = saved_conversation(dir.path());
    let edit = |name: &str, change: &dyn Fn(&mut serde_json::Value)| {
        let copy = dir.path().join(name);
        copy_tree(&saved, &copy);
        let db = copy.join("s.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        let text: String = conn
            .query_row("SELECT head FROM sessions", [], |r| r.get(0))
            .unwrap();
        let mut head: serde_json::Value = serde_json::from_str(&text).unwrap();
        change(&mut head);
        conn.execute("UPDATE sessions SET head = ?1", [head.to_string()])
            .unwrap();
        // Without its KV file the resume reads the window again, pins first.
        std::fs::remove_dir_all(copy.join("kv")).unwrap();
        let store = Store::open(&db).unwrap();
        let history = Box::new(store.history(id).unwrap());
        Session::resume(engine.clone(), SamplingParams::default(), history)
    };
    let never = AtomicBool::new(false);
    for pins in [
        serde_json::json!([[0u64, u64::MAX]]),
        serde_json::json!([[3u64, 1u64 << 62], [1, 5], [9, 9]]),
    ] {
        let (mut session, _) = edit("pins", &|h| h["pinned"] = pins.clone()).unwrap();
        session.catch_up(&never, &mut |_| {}).unwrap();
        let stats = session.stats();
        assert!(
            stats.tokens_seen > 20,
            "the window of 16 holds less than the conversation"
        );
        assert_eq!(stats.evicted, 0, "{pins}: every token is pinned, none lost");
        session.turn("more", Some(2), &never, &mut |_| {}).unwrap();
        std::fs::remove_dir_all(dir.path().join("pins")).unwrap();
    }
    let err = edit("counts", &|h| h["tokens_fed"] = (u64::MAX / 2).into())
        .err()
        .expect("more tokens fed than recorded is damage");
    assert!(err.to_string().contains("tokens fed of"), "{err}");
}
