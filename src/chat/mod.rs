//! Conversation-level text: chat templates and the messages they render.

pub mod code;
pub mod template;

pub use code::code_blocks;
pub use template::{ChatTemplate, Message, Role, TemplateError};
