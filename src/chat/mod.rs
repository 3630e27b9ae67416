//! Conversation-level text: chat templates and the messages they render.

pub mod template;

pub use template::{ChatTemplate, Message, Role, TemplateError};
