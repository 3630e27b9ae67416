//! Which text a turn feeds: the chat template rendered over a bounded tail of the conversation,
//! not over all of it.
//!
//! A turn renders the system prompt, the last exchange (from the last user message on) and the
//! new message, finds the end of the last exchange's first content in that text, and feeds what
//! follows minus what was already fed after that point (the previous reply and its end token).
//! That is exact when the template is *local*: a message's rendering does not depend on the
//! messages before the last exchange. ChatML, Llama 3, Gemma and Phi templates are; a template
//! that numbers turns, or renders old replies differently, is not. [`TemplateCheck`] tells which
//! by running both ways on a probe conversation when a session starts; a template that is not
//! local is rendered over the whole conversation (read from the history), which costs time in
//! proportion to the conversation but stays exact.

use crate::chat::{ChatTemplate, Message, Role, TemplateError};

/// How a session renders its turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateMode {
    /// The system prompt, the last exchange and the new message: bounded work per turn.
    Tail,
    /// Every message of the conversation (a template that is not local).
    Full,
}

/// `messages` with each run of consecutive user messages as one, their contents joined by a
/// blank line (templates such as Gemma's require user and assistant turns to alternate).
pub fn merge_user_runs(messages: &[Message]) -> Vec<Message> {
    let mut merged: Vec<Message> = Vec::with_capacity(messages.len());
    for m in messages {
        match merged.last_mut() {
            Some(last) if last.role == Role::User && m.role == Role::User => {
                last.content.push_str("\n\n");
                last.content.push_str(&m.content);
            }
            _ => merged.push(m.clone()),
        }
    }
    merged
}

/// Where `contents` sit in `rendered`, in order (`None` for one not found after the previous,
/// or empty).
pub fn locate(rendered: &str, contents: &[&str]) -> Vec<Option<std::ops::Range<usize>>> {
    let mut cursor = 0;
    contents
        .iter()
        .map(|c| {
            if c.is_empty() {
                return None;
            }
            let at = cursor + rendered[cursor..].find(c)?;
            cursor = at + c.len();
            Some(at..cursor)
        })
        .collect()
}

/// Where a turn's new text starts in `rendered` (the template over `messages` with the
/// generation prompt): after the end of message `anchor`'s content and the part of
/// `fed_after_anchor` the rendering repeats. `None` when the anchor's content is not in the
/// rendering.
pub fn delta_start(
    rendered: &str,
    messages: &[Message],
    anchor: usize,
    fed_after_anchor: &str,
) -> Option<usize> {
    let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    let at = locate(rendered, &contents[..=anchor]).pop().flatten()?.end;
    Some(at + common_prefix_len(&rendered[at..], fed_after_anchor))
}

pub fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return i;
        }
        n = i + ca.len_utf8();
    }
    n
}

/// Whether a template is local, found by feeding a probe conversation both ways.
pub struct TemplateCheck;

impl TemplateCheck {
    /// Runs four turns of a probe conversation (with the system prompt `system`, as the session
    /// has it) through the whole-conversation rendering and the tail rendering; the tail is used
    /// when every turn's text is the same both ways. `end_of_turn` is the text the model's stop
    /// token adds after a reply.
    pub fn mode(template: &ChatTemplate, system: Option<&str>, end_of_turn: &str) -> TemplateMode {
        match Self::agree(template, system, end_of_turn) {
            Ok(true) => TemplateMode::Tail,
            _ => TemplateMode::Full,
        }
    }

    fn agree(
        template: &ChatTemplate,
        system: Option<&str>,
        end_of_turn: &str,
    ) -> Result<bool, TemplateError> {
        let mut all: Vec<Message> = system
            .map(|s| Message::new(Role::System, s))
            .into_iter()
            .collect();
        let mut fed = String::new();
        for turn in 0..4 {
            let user = Message::new(
                Role::User,
                format!("probe question {turn}: what is {turn}?"),
            );
            // The old way: the whole conversation, after everything fed.
            let mut whole = all.clone();
            whole.push(user.clone());
            let full = template.render(&whole, true)?;
            let old = full[common_prefix_len(&full, &fed)..].to_string();
            // The tail way: the system prompt, the last exchange, the new message.
            let last_user = all.iter().rposition(|m| m.role == Role::User);
            let mut tail: Vec<Message> = all
                .iter()
                .filter(|m| m.role == Role::System)
                .cloned()
                .collect();
            let anchor = last_user.map(|i| {
                tail.extend(all[i..].iter().cloned());
                tail.len() - (all.len() - i)
            });
            tail.push(user.clone());
            let rendered = template.render(&tail, true)?;
            let new = match anchor {
                None => rendered[common_prefix_len(&rendered, &fed)..].to_string(),
                Some(a) => {
                    let anchor_end = fed_anchor_end(&fed, &all, last_user.unwrap_or(0));
                    match (anchor_end, delta_of(&rendered, &tail, a, &fed, anchor_end)) {
                        (Some(_), Some(d)) => d,
                        _ => return Ok(false),
                    }
                }
            };
            if new != old {
                return Ok(false);
            }
            fed.push_str(&old);
            let reply = format!("probe answer {turn}.");
            fed.push_str(&reply);
            fed.push_str(end_of_turn);
            all.push(user);
            all.push(Message::new(Role::Assistant, reply));
        }
        Ok(true)
    }
}

/// Where message `index`'s content ends in the probe's fed text.
fn fed_anchor_end(fed: &str, messages: &[Message], index: usize) -> Option<usize> {
    let contents: Vec<&str> = messages[..=index]
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    locate(fed, &contents).pop().flatten().map(|r| r.end)
}

fn delta_of(
    rendered: &str,
    messages: &[Message],
    anchor: usize,
    fed: &str,
    anchor_end: Option<usize>,
) -> Option<String> {
    let start = delta_start(rendered, messages, anchor, &fed[anchor_end?..])?;
    Some(rendered[start..].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::template::{CHATML, GEMMA};

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(Some(source.into()), CHATML, "<s>".into(), "</s>".into()).unwrap()
    }

    #[test]
    fn consecutive_user_messages_merge() {
        let m = |role, text: &str| Message::new(role, text);
        let messages = [
            m(Role::System, "s"),
            m(Role::User, "a"),
            m(Role::User, "b"),
            m(Role::Assistant, "c"),
            m(Role::User, "d"),
            m(Role::User, "e"),
            m(Role::User, "f"),
        ];
        assert_eq!(
            merge_user_runs(&messages),
            [
                m(Role::System, "s"),
                m(Role::User, "a\n\nb"),
                m(Role::Assistant, "c"),
                m(Role::User, "d\n\ne\n\nf"),
            ]
        );
    }

    #[test]
    fn common_prefix_respects_char_boundaries() {
        assert_eq!(common_prefix_len("héllo", "héllp"), 5);
        assert_eq!(common_prefix_len("abc", "abc"), 3);
        assert_eq!(common_prefix_len("abc", ""), 0);
        assert_eq!(common_prefix_len("日本", "日x"), 3);
    }

    #[test]
    fn local_templates_render_their_tail() {
        for (source, end) in [(CHATML, "<|im_end|>"), (GEMMA, "<end_of_turn>")] {
            let t = template(source);
            assert_eq!(TemplateCheck::mode(&t, None, end), TemplateMode::Tail);
            assert_eq!(
                TemplateCheck::mode(&t, Some("Be brief."), end),
                TemplateMode::Tail
            );
        }
    }

    #[test]
    fn a_template_that_numbers_turns_renders_everything() {
        let numbered = "{% for m in messages %}[{{ loop.index }}] {{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";
        assert_eq!(
            TemplateCheck::mode(&template(numbered), None, ""),
            TemplateMode::Full
        );
    }

    #[test]
    fn the_delta_follows_the_anchor() {
        let t = template(CHATML);
        let messages = vec![
            Message::new(Role::User, "hi"),
            Message::new(Role::Assistant, "hello"),
            Message::new(Role::User, "again"),
        ];
        let rendered = t.render(&messages, true).unwrap();
        // Fed after "hi": the rest of the first exchange, the stop token's text included.
        let fed_after = "<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>";
        let start = delta_start(&rendered, &messages, 0, fed_after).unwrap();
        assert_eq!(
            &rendered[start..],
            "\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
