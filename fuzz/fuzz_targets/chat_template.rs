//! A chat template as a model file may carry one, with any conversation → compile → render,
//! within its fuel: a template that loops, recurses or grows without end must stop with an
//! error in bounded time and memory (the fuzzer's time-out and memory limit are the check).
//!
//! Input: the template, then NUL-separated messages whose first byte picks the role — so the
//! seeds are real templates followed by a conversation, written as plain bytes.
#![no_main]

use lambdachat::chat::{ChatTemplate, Message, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let source = parts.next().unwrap_or_default().to_string();
    let messages: Vec<Message> = parts
        .take(16)
        .map(|m| {
            let role = match m.bytes().next().unwrap_or(b'u') % 3 {
                0 => Role::System,
                1 => Role::User,
                _ => Role::Assistant,
            };
            Message::new(role, m.get(1..).unwrap_or_default())
        })
        .collect();
    let Ok(template) = ChatTemplate::new(
        Some(source),
        ChatTemplate::fallback_for(|_| false),
        "<s>".into(),
        "</s>".into(),
    ) else {
        return;
    };
    let _ = template.render(&messages, data.len() % 2 == 0);
});
