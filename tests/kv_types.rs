//! A conversation keeps going across the cache's element types: saved with f16 keys and values
//! and resumed with f16 it continues bit for bit (the KV file widens f16 exactly), and resumed
//! with f32 — or saved with f32 and resumed with f16 — its cache is converted and it continues
//! within f16's rounding. On the tiny model, with a window small enough to evict. The KV file
//! stores what the cache holds: an f16 conversation's file takes half an f32 one's bytes, a
//! q8_0 one 17/32 of an f16 one's.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use lambdachat::attention::{KvType, LambdaParams};
use lambdachat::engine::Engine;
use lambdachat::model::LoadOptions;
use lambdachat::sampling::SamplingParams;
use lambdachat::session::{Resumed, Session};
use lambdachat::store::Store;

fn engine(path: &Path, kv_type: KvType) -> Arc<Engine> {
    let options = LoadOptions {
        kv_type,
        ..LoadOptions::default()
    };
    Arc::new(Engine::load_with(path, options).unwrap())
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        ..SamplingParams::default()
    }
}

/// The next logits after one more turn and one fixed token, and the bytes the cache holds
/// then (what tells its type).
fn next_logits(s: &mut Session) -> (Vec<f32>, u64) {
    let never = AtomicBool::new(false);
    s.turn("and then what happened", Some(5), &never, &mut |_| {})
        .unwrap();
    let logits = s.feed(&[7]).unwrap();
    let logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (logits, s.stats().bytes)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Each of `cases` within `relative` of the reference's largest logit (at least 1).
fn assert_near(reference: (&str, &[f32]), cases: &[(&str, &Vec<f32>)], relative: f32) {
    let (name, expected) = reference;
    let scale = expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (what, logits) in cases {
        let err = max_diff(expected, logits);
        assert!(
            err <= relative * scale.max(1.0),
            "{what}: max |Δ| = {err} against {name} (logits up to {scale})"
        );
    }
}

/// A conversation on a window of 16 that has evicted, saved by an engine of `saved_as` in its
/// own directory under `dir`; then either continued in place or resumed by `resumed`. The next
/// logits and the cache's bytes (see [`next_logits`]).
fn conversation(
    dir: &Path,
    name: &str,
    saved_as: &Arc<Engine>,
    resumed: Option<&Arc<Engine>>,
) -> (Vec<f32>, u64) {
    let params = LambdaParams::new(4, 16, None).unwrap();
    let never = AtomicBool::new(false);
    // A directory each: the KV files sit beside the database, named by session.
    let own = dir.join(name);
    std::fs::create_dir_all(&own).unwrap();
    let store = Store::open(&own.join("s.db")).unwrap();
    let id = store.create("t", "tiny", params).unwrap();
    let mut s = Session::with_history(
        saved_as.clone(),
        params,
        greedy(),
        None,
        Box::new(store.history(id).unwrap()),
    )
    .unwrap();
    s.turn(
        "hello world, a first question",
        Some(8),
        &never,
        &mut |_| {},
    )
    .unwrap();
    s.save().unwrap();
    assert!(s.stats().evicted > 0, "the window of 16 has evicted tokens");
    let Some(engine) = resumed else {
        return next_logits(&mut s);
    };
    drop(s);
    let history = Box::new(store.history(id).unwrap());
    let (mut s, how) = Session::resume(engine.clone(), greedy(), history).unwrap();
    assert!(matches!(how, Resumed::Saved { .. }), "{name}: {how:?}");
    s.catch_up(&never, &mut |_| {}).unwrap();
    next_logits(&mut s)
}

#[test]
fn a_conversation_resumes_across_kv_types() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    common::tiny::write_gguf(&model, "qwen2");
    let (f16, f32) = (engine(&model, KvType::F16), engine(&model, KvType::F32));
    let run = |name: &str, saved_as: &Arc<Engine>, resumed: Option<&Arc<Engine>>| {
        conversation(dir.path(), name, saved_as, resumed)
    };

    let (f16_straight, f16_bytes) = run("f16", &f16, None);
    let (f16_resumed, _) = run("f16-f16", &f16, Some(&f16));
    assert_eq!(f16_straight, f16_resumed, "f16 → file → f16 is exact");

    let (f32_straight, f32_bytes) = run("f32", &f32, None);
    let file_bytes =
        |name: &str| lambdachat::store::kv_token_bytes(&dir.path().join(name).join("s.db"));
    assert!(file_bytes("f32") > 0);
    assert_eq!(2 * file_bytes("f16"), file_bytes("f32"));
    // Bytes allocated (capacities, which grow unevenly): an f16 cache holds about half.
    let is_f16 = |bytes: u64| (bytes as f64) < 0.6 * f32_bytes as f64;
    assert!(is_f16(f16_bytes), "{f16_bytes} against {f32_bytes}");
    let (f16_in_f32, bytes) = run("f16-f32", &f16, Some(&f32));
    assert!(
        !is_f16(bytes),
        "an f16 cache resumed by an f32 engine is f32: {bytes}"
    );
    let (f32_in_f16, bytes) = run("f32-f16", &f32, Some(&f16));
    assert!(
        is_f16(bytes),
        "an f32 cache resumed by an f16 engine is f16: {bytes}"
    );
    assert_near(
        ("f32", &f32_straight),
        &[
            ("f16 straight", &f16_straight),
            ("f16 resumed as f32", &f16_in_f32),
            ("f32 resumed as f16", &f32_in_f16),
        ],
        1e-2,
    );
    assert_ne!(f16_straight, f32_straight, "the types do differ");
}

/// q8_0 needs heads of whole 32-value blocks: the tiny Qwen3 (heads of 32) saves and resumes
/// a q8_0 conversation bit for bit (the KV file holds GGML's q8_0 blocks, which a q8_0 cache
/// reads back to the same bytes) in 17/32 of an f16 file's bytes (34 bytes per 32 values
/// against 64), and a resume by an f16 engine converts it; the tiny Qwen2 (heads of 16) is
/// refused at load with the reason.
#[test]
fn a_q8_0_conversation_resumes_and_takes_17_32_of_f16() {
    let dir = tempfile::tempdir().unwrap();
    let narrow = dir.path().join("tiny-qwen2.gguf");
    common::tiny::write_gguf(&narrow, "qwen2");
    let options = LoadOptions {
        kv_type: KvType::Q8_0,
        ..LoadOptions::default()
    };
    let refused = Engine::load_with(&narrow, options)
        .err()
        .expect("heads of 16 refused");
    assert!(
        refused.to_string().contains("multiple of 32") && refused.to_string().contains("16"),
        "{refused}"
    );

    let model = dir.path().join("tiny-qwen3.gguf");
    common::tiny::write_gguf(&model, "qwen3");
    let (q8, f16) = (engine(&model, KvType::Q8_0), engine(&model, KvType::F16));
    let (q8_straight, q8_bytes) = conversation(dir.path(), "q8", &q8, None);
    let (q8_resumed, _) = conversation(dir.path(), "q8-q8", &q8, Some(&q8));
    assert_eq!(q8_straight, q8_resumed, "q8_0 → file → q8_0 is exact");

    let (f16_straight, f16_bytes) = conversation(dir.path(), "f16", &f16, None);
    let file_bytes =
        |name: &str| lambdachat::store::kv_token_bytes(&dir.path().join(name).join("s.db"));
    assert!(file_bytes("q8") > 0);
    assert_eq!(32 * file_bytes("q8"), 17 * file_bytes("f16"));
    assert!(
        (q8_bytes as f64) < 0.7 * f16_bytes as f64,
        "a q8_0 cache holds about 9/16 of an f16 one: {q8_bytes} against {f16_bytes}"
    );
    let (q8_in_f16, bytes) = conversation(dir.path(), "q8-f16", &q8, Some(&f16));
    assert!(
        (bytes as f64) > 0.8 * f16_bytes as f64,
        "a q8_0 cache resumed by an f16 engine is f16: {bytes}"
    );
    assert_near(
        ("f16", &f16_straight),
        &[
            ("q8_0 straight", &q8_straight),
            ("q8_0 resumed as f16", &q8_in_f16),
        ],
        5e-2,
    );
    assert_ne!(q8_straight, f16_straight, "the types do differ");
}
