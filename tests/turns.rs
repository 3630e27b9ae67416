//! A turn is a transaction, and a conversation cannot be broken by one: a prompt stopped
//! halfway merges with the next message (so a template that wants user and assistant turns to
//! alternate, as Gemma's does, keeps working), a prompt that fails puts everything back, and a
//! reply that fails leaves an empty reply. On a tiny model whose template refuses two user
//! turns in a row, with faults injected into the forward (the `faults` feature).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::gguf_file::Value;
use common::tiny::tiny_model;
use lambdachat::attention::LambdaParams;
use lambdachat::chat::{Message, Role};
use lambdachat::engine::Engine;
use lambdachat::faults::{Fault, arm_forward};
use lambdachat::protocol::StopReason;
use lambdachat::sampling::SamplingParams;
use lambdachat::session::{Session, TurnEvent};

/// Gemma's rule, in a ChatML-like template: roles alternate, or the template raises.
const STRICT: &str = "{{ bos_token }}{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

fn engine() -> Arc<Engine> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strict.gguf");
    let mut parts = tiny_model("qwen2");
    parts.metadata.extend([
        (
            "tokenizer.chat_template".to_string(),
            Value::String(STRICT.into()),
        ),
        (
            "tokenizer.ggml.add_space_prefix".to_string(),
            Value::Bool(false),
        ),
    ]);
    parts.write(&path);
    Arc::new(Engine::load(&path).unwrap())
}

fn session(engine: &Arc<Engine>) -> Session {
    let sampling = SamplingParams {
        temperature: 0.0,
        // Off, so that a reply drawn again matches one drawn once.
        repeat_penalty: 1.0,
        ..SamplingParams::default()
    };
    let mut s = Session::new(
        engine.clone(),
        LambdaParams::new(4, 32, None).unwrap(),
        sampling,
        None,
    )
    .unwrap();
    s.set_prefill_chunk(2);
    s
}

fn turn(s: &mut Session, text: &str) -> String {
    let never = AtomicBool::new(false);
    s.turn(text, Some(6), &never, &mut |_| {}).unwrap().reply
}

/// Everything a session holds that a turn changes.
fn state(s: &Session) -> (u64, usize, Vec<u32>, Vec<u32>, u64, Vec<String>) {
    let messages = s.messages(0..s.message_count()).unwrap();
    (
        s.token_count(),
        s.message_count(),
        s.tokens(0..s.token_count()).unwrap().ids,
        s.pending().to_vec(),
        s.stats().tokens_seen,
        messages.into_iter().map(|m| m.content).collect(),
    )
}

#[test]
fn a_stopped_prompt_merges_with_the_next_message() {
    let engine = engine();
    let mut s = session(&engine);
    let stop = AtomicBool::new(false);
    let report = s
        .turn("first message here", Some(6), &stop, &mut |e| {
            if let TurnEvent::Prefill { done, .. } = e
                && done >= 4
            {
                stop.store(true, Ordering::Relaxed);
            }
        })
        .unwrap();
    assert_eq!(report.stop, StopReason::Cancelled);
    assert!(!s.pending().is_empty(), "the rest of the message waits");
    // Without the merge, the next turn renders two user messages and the template refuses.
    turn(&mut s, "second");
    assert_eq!(s.message_count(), 3, "two user messages, one reply");
    let reply = s.message_tokens(2).unwrap();
    let prompt = s.tokens(0..reply.start).unwrap().ids;
    let merged = [Message::new(Role::User, "first message here\n\nsecond")];
    let expected = engine.template.render(&merged, true).unwrap();
    assert_eq!(engine.tokenizer.decode(&prompt).unwrap(), expected);
    assert_eq!(
        s.stats().tokens_seen,
        s.token_count() - s.pending().len() as u64
    );
    // And the conversation goes on.
    turn(&mut s, "third");
    assert_eq!(s.message_count(), 5);
}

#[test]
fn a_failed_prompt_puts_everything_back() {
    let engine = engine();
    let (mut failed, mut clean) = (session(&engine), session(&engine));
    for s in [&mut failed, &mut clean] {
        turn(s, "hello world");
    }
    let before = state(&failed);
    // The second chunk of the prompt fails after the cache took it.
    arm_forward(1, Fault::Error);
    let never = AtomicBool::new(false);
    let err = failed.turn("hello again", Some(6), &never, &mut |_| {});
    assert!(err.unwrap_err().to_string().contains("injected fault"));
    assert_eq!(state(&failed), before, "nothing of the failed turn is left");
    // The same turn again goes exactly as in a conversation that never failed.
    assert_eq!(
        turn(&mut failed, "hello again"),
        turn(&mut clean, "hello again")
    );
    assert_eq!(state(&failed), state(&clean));
}

#[test]
fn a_failed_reply_leaves_an_empty_reply_that_can_be_drawn_again() {
    let engine = engine();
    let (mut failed, mut clean) = (session(&engine), session(&engine));
    for s in [&mut failed, &mut clean] {
        turn(s, "hello world");
    }
    let never = AtomicBool::new(false);
    let mut prompt_forwards = 0;
    clean
        .turn("hello again", Some(6), &never, &mut |e| {
            if matches!(e, TurnEvent::Prefill { .. }) {
                prompt_forwards += 1;
            }
        })
        .unwrap();
    // The prompt's forwards, one for the first token of the reply, then the fault.
    arm_forward(prompt_forwards + 1, Fault::Error);
    let err = failed.turn("hello again", Some(6), &never, &mut |_| {});
    assert!(err.unwrap_err().to_string().contains("injected fault"));
    assert_eq!(
        failed.message_count(),
        4,
        "the user message and an empty reply"
    );
    let last = failed.messages(3..4).unwrap().remove(0);
    assert_eq!((last.role, last.content.as_str()), (Role::Assistant, ""));
    assert!(failed.can_regenerate());
    // Drawn again, the reply is the one a conversation that never failed got.
    let again = failed
        .regenerate(Some(6), &never, &mut |_| {})
        .unwrap()
        .unwrap();
    let clean_reply = clean.messages(3..4).unwrap().remove(0).content;
    assert_eq!(again.reply, clean_reply);
    assert_eq!(state(&failed).0, state(&clean).0);
    assert_eq!(state(&failed).2, state(&clean).2);
    // The conversation goes on.
    turn(&mut failed, "more");
    assert_eq!(failed.message_count(), 6);
}

/// A saved cache names the model that made it: resumed with other weights of the same shape
/// (another quantization, a fine-tune), the conversation reads its window again and says so.
#[test]
fn a_cache_saved_by_another_model_is_not_used() {
    use lambdachat::session::Resumed;
    use lambdachat::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, scale: f32| {
        let mut parts = tiny_model("qwen2");
        let mut rng = common::tiny::Rng::new(99);
        for (n, t) in parts.tensors.iter_mut() {
            if n == "blk.1.ffn_down.weight" && scale != 1.0 {
                *t = rng.tensor(t.shape().dims(), scale, 0.0);
            }
        }
        let path = dir.path().join(name);
        parts.write(&path);
        Arc::new(Engine::load(&path).unwrap())
    };
    let (a, b) = (write("a.gguf", 1.0), write("b.gguf", 0.5));
    assert_ne!(a.fingerprint, b.fingerprint);
    let store = Store::open(&dir.path().join("s.db")).unwrap();
    let params = LambdaParams::new(4, 32, None).unwrap();
    let id = store.create("t", "a.gguf", params).unwrap();
    {
        let mut s = Session::with_history(
            a.clone(),
            params,
            SamplingParams::default(),
            None,
            Box::new(store.history(id).unwrap()),
        )
        .unwrap();
        turn(&mut s, "hello world");
        s.save().unwrap();
    }
    let resume = |engine: &Arc<Engine>| {
        let history = Box::new(store.history(id).unwrap());
        Session::resume(engine.clone(), SamplingParams::default(), history)
            .unwrap()
            .1
    };
    assert!(matches!(resume(&a), Resumed::Saved { .. }));
    match resume(&b) {
        Resumed::Reread(why) => assert!(why.contains("another model"), "{why}"),
        other => panic!("{other:?}"),
    }
}
