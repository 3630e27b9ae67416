//! Recall (docs/ALGORITHM.md §10) through a whole session on a tiny model: the store fills as
//! the window slides, leaves no file behind, survives `/regen` exactly, starts again when the
//! Λ parameters change, and the timeline names what the next token recalls.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use common::tiny::write_gguf;
use lambdachat::attention::LambdaParams;
use lambdachat::attention::recall::RecallParams;
use lambdachat::engine::Engine;
use lambdachat::protocol::TokenState;
use lambdachat::sampling::SamplingParams;
use lambdachat::session::Session;

fn engine(dir: &std::path::Path) -> Arc<Engine> {
    let path = dir.join("tiny.gguf");
    write_gguf(&path, "qwen2");
    Arc::new(Engine::load(&path).unwrap())
}

/// A greedy session with a 16-token window and recall from the first layer, 2 blocks of 64,
/// chosen every 2 tokens, its stores in `stores`.
fn session(engine: &Arc<Engine>, stores: &std::path::Path) -> Session {
    let sampling = SamplingParams {
        temperature: 0.0,
        // Off, so that a reply drawn again matches one drawn once.
        repeat_penalty: 1.0,
        ..SamplingParams::default()
    };
    let mut s = Session::new(
        engine.clone(),
        LambdaParams::new(4, 16, None).unwrap(),
        sampling,
        None,
    )
    .unwrap();
    let recall = RecallParams {
        from_layer: 0,
        blocks: 2,
        every: 2,
        ..RecallParams::default()
    };
    s.set_recall(Some((recall, stores.to_path_buf()))).unwrap();
    s.set_prefill_chunk(7);
    s
}

fn turn(s: &mut Session, text: &str) -> String {
    let never = AtomicBool::new(false);
    s.turn(text, Some(8), &never, &mut |_| {}).unwrap().reply
}

const TEXT: &str = "the quick brown fox jumps over the lazy dog and keeps running far away";

#[test]
fn a_session_recalls_and_regenerates_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let stores = dir.path().join("recall");
    let engine = engine(dir.path());
    let mut s = session(&engine, &stores);
    for i in 0..6 {
        turn(&mut s, &format!("{i}: {TEXT}"));
    }
    let stats = s.recall_stats();
    let evicted = s.stats().evicted;
    assert!(
        stats.stored_tokens >= 128,
        "{} tokens stored",
        stats.stored_tokens
    );
    // Everything past the sinks that left the window is stored or waits in the partial block.
    assert!(stats.stored_tokens <= evicted && evicted - stats.stored_tokens < 64 + 16);
    assert_eq!(s.stats().recalled, stats.recalled_tokens);
    assert!(
        stats.recalled_tokens > 0,
        "the next token recalls something"
    );
    // The store's file has no name: a killed process leaves nothing in the folder.
    let names: Vec<_> = std::fs::read_dir(&stores).unwrap().collect();
    assert!(names.is_empty(), "{names:?}");

    // The timeline names the recalled tokens, which are evicted ones.
    let timeline = s.timeline().unwrap();
    assert!(!timeline.recalled.is_empty());
    let window_start = timeline.stats.window_start;
    assert!(timeline.recalled.iter().all(|r| r.end <= window_start));
    assert!(timeline.messages.iter().any(|m| {
        m.segments
            .iter()
            .any(|(_, state)| *state == TokenState::Recalled)
    }));

    // `/regen` draws the reply again from the same state: the same reply, the same store.
    let first = s
        .messages(s.message_count() - 1..s.message_count())
        .unwrap();
    let stored = s.recall_stats().stored_tokens;
    let never = AtomicBool::new(false);
    let again = s.regenerate(Some(8), &never, &mut |_| {}).unwrap().unwrap();
    assert_eq!(again.reply, first[0].content);
    assert_eq!(s.recall_stats().stored_tokens, stored);
    assert_eq!(s.recall_failure(), None);

    // New Λ parameters: a new cache and a new store, filled again as the window slides.
    s.set_params(LambdaParams::new(4, 24, None).unwrap());
    turn(&mut s, TEXT);
    assert!(s.recall_stats().stored_tokens < stored);
    for _ in 0..3 {
        turn(&mut s, TEXT);
    }
    assert!(s.recall_stats().stored_tokens > 0);
}
