//! The fenced code blocks of a message: the engine counts them (so blocks are numbered the same
//! wherever a conversation is shown from) and the chat screen shows and copies them.

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

/// The code blocks of `src` (Markdown), in order, as their text.
pub fn code_blocks(src: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for event in Parser::new_ext(src, Options::ENABLE_STRIKETHROUGH) {
        match event {
            Event::Start(Tag::CodeBlock(_)) => current = Some(String::new()),
            Event::Text(t) => {
                if let Some(c) = current.as_mut() {
                    c.push_str(&t);
                }
            }
            Event::End(TagEnd::CodeBlock) => blocks.extend(current.take()),
            _ => {}
        }
    }
    blocks
}
