//! Conversations on the real default model: saving and resuming through the store, regenerating,
//! stopping during a prompt, pinning, and the token ↔ text bookkeeping the UI relies on.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use common::engine;
use lambdachat::attention::LambdaParams;
use lambdachat::protocol::{Notice, StopReason, TokenState};
use lambdachat::sampling::SamplingParams;
use lambdachat::session::{Session, TurnEvent};
use lambdachat::store::Store;

fn greedy(params: LambdaParams) -> Session {
    let sampling = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    Session::new(engine(), params, sampling, None).unwrap()
}

fn small() -> LambdaParams {
    // A small window, so that a few turns evict tokens and clamp sinks.
    LambdaParams::new(8, 48, None).unwrap()
}

fn turn(s: &mut Session, text: &str) -> String {
    let never = AtomicBool::new(false);
    Device::Cpu
        .with_context(|| s.turn(text, Some(12), &never, &mut |_| {}))
        .unwrap()
        .reply
}

/// Saved with its KV snapshot and resumed, a conversation continues exactly as if never
/// interrupted: the same greedy reply, the same cache counters.
#[test]
fn a_resumed_session_continues_exactly() {
    let params = small();
    let mut original = greedy(params);
    turn(&mut original, "List three fruits.");
    turn(&mut original, "And three vegetables?");
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("s.db")).unwrap();
    let id = store.create("t", "m", params).unwrap();
    let snapshot = original.snapshot().unwrap();
    let tokens = original.stats().tokens_seen;
    store
        .save(id, params, original.state(), Some((tokens, &snapshot)))
        .unwrap();
    drop(store);

    let stored = Store::open(&dir.path().join("s.db"))
        .unwrap()
        .load(id)
        .unwrap();
    let (mut resumed, problem) = Session::restore(
        engine(),
        stored.params,
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stored.state,
        stored.snapshot.as_ref().map(|(_, b)| b.as_slice()),
    )
    .unwrap();
    assert!(problem.is_none(), "{problem:?}");
    assert_eq!(resumed.stats(), original.stats());
    assert!(
        resumed.stats().evicted > 0,
        "the test should reach eviction"
    );
    let a = turn(&mut original, "Which of them is red?");
    let b = turn(&mut resumed, "Which of them is red?");
    assert_eq!(a, b);
    assert_eq!(resumed.stats(), original.stats());
    assert_eq!(resumed.messages(), original.messages());
}

/// Without a usable snapshot the history is fed again, once, and the next turn feeds only
/// its own message.
#[test]
fn a_session_without_snapshot_feeds_its_history_once() {
    let params = small();
    let mut original = greedy(params);
    turn(&mut original, "Say hello.");
    let state = original.state().clone();
    let garbage = b"not a snapshot".as_slice();
    let (mut resumed, problem) = Session::restore(
        engine(),
        params,
        SamplingParams::default(),
        state,
        Some(garbage),
    )
    .unwrap();
    assert!(problem.is_some(), "a bad snapshot is reported, not used");
    assert_eq!(resumed.stats().tokens_seen, 0);
    let never = AtomicBool::new(false);
    let fed = Device::Cpu
        .with_context(|| resumed.catch_up(&never, &mut |_| {}))
        .unwrap();
    assert!(fed > 10, "{fed} tokens fed");
    assert_eq!(resumed.stats().tokens_seen as usize, fed);
    let before = resumed.stats().tokens_seen;
    let report = Device::Cpu
        .with_context(|| resumed.turn("Again.", Some(4), &never, &mut |_| {}))
        .unwrap();
    assert!(
        report.prompt_tokens < 20,
        "{} prompt tokens",
        report.prompt_tokens
    );
    assert!(resumed.stats().tokens_seen > before);
}

/// Regenerating restores the cache to its state after the prompt: greedy sampling without a
/// repeat penalty then gives the same reply and the same counters, so no trace of the first
/// reply remains. (With the penalty, the first reply's tokens are penalized: a new reply.)
#[test]
fn regenerate_starts_again_from_the_prompt() {
    let sampling = SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        ..SamplingParams::default()
    };
    let mut s = Session::new(engine(), small(), sampling, None).unwrap();
    let first = turn(&mut s, "Name a planet.");
    let stats = s.stats();
    let tokens = s.state().tokens.clone();
    let never = AtomicBool::new(false);
    let again = Device::Cpu
        .with_context(|| s.regenerate(Some(12), &never, &mut |_| {}))
        .unwrap()
        .unwrap();
    assert_eq!(again.reply, first);
    assert_eq!(s.stats(), stats);
    assert_eq!(s.state().tokens, tokens);
    assert_eq!(s.messages().len(), 2);
}

/// Esc during a long prompt stops between chunks; what was not read stays pending and the next
/// turn reads it first, so nothing typed is lost.
#[test]
fn stopping_during_the_prompt_keeps_the_rest_for_later() {
    let mut s = greedy(LambdaParams::new(8, 256, None).unwrap());
    s.set_prefill_chunk(4);
    let cancel = AtomicBool::new(false);
    let long = "Summarize: ".to_string() + &common::TEXT[..300];
    let report = Device::Cpu
        .with_context(|| {
            s.turn(&long, Some(8), &cancel, &mut |e| {
                if let TurnEvent::Prefill { done, .. } = e
                    && done >= 8
                {
                    cancel.store(true, Ordering::Relaxed);
                }
            })
        })
        .unwrap();
    assert_eq!(report.stop, StopReason::Cancelled);
    assert_eq!(report.generated_tokens, 0);
    let fed = s.stats().tokens_seen as usize;
    assert_eq!(fed, 8);
    assert_eq!(fed + s.state().pending.len(), s.state().tokens.len());
    cancel.store(false, Ordering::Relaxed);
    let report = Device::Cpu
        .with_context(|| s.turn("Thanks.", Some(4), &cancel, &mut |_| {}))
        .unwrap();
    assert!(report.prompt_tokens > s.state().tokens.len() / 2);
    assert_eq!(
        s.stats().tokens_seen as usize + s.state().pending.len(),
        s.state().tokens.len()
    );
}

/// Each message's tokens decode back to its text, and a pinned message stays attended after
/// it left the window, while its neighbours are evicted.
#[test]
fn message_tokens_and_pins() {
    let mut s = greedy(small());
    turn(&mut s, "Remember the code word: PINEAPPLE.");
    let code_word = s.message_tokens(0);
    let ids: Vec<u32> = (code_word.start..code_word.end)
        .map(|p| s.state().tokens[p as usize])
        .collect();
    let text = engine().tokenizer.decode(&ids).unwrap();
    assert_eq!(text, "Remember the code word: PINEAPPLE.");
    assert_eq!(
        s.pin(0),
        Notice::Pinned {
            tokens: code_word.end - code_word.start,
            lost: 0
        },
        "pinned while still in the window: nothing lost"
    );
    turn(&mut s, "Now count from one to twenty.");
    turn(&mut s, "Go on.");
    assert!(s.stats().evicted > 0);
    // The token states the inspect view shows, message by message.
    let states = |s: &Session, i: usize| -> Vec<TokenState> {
        s.inspect(i).tokens.iter().map(|t| t.state).collect()
    };
    assert_eq!(states(&s, 0).len() as u64, code_word.end - code_word.start);
    assert!(states(&s, 0).iter().all(|t| *t == TokenState::Pinned));
    assert!(states(&s, 1).contains(&TokenState::Evicted));
    assert!(s.stats().pinned >= code_word.end - code_word.start);
    s.unpin(0).unwrap();
    assert!(states(&s, 0).iter().all(|t| *t == TokenState::Evicted));
}
