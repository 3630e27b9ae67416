//! Chat templates: the model's own Jinja template (`tokenizer.chat_template`) rendered with
//! minijinja as Hugging Face renders it (trim/lstrip blocks, Python string methods,
//! `raise_exception`, `tojson`), or ChatML when the model has none.

use minijinja::value::{Serde, Value};
use minijinja::{Environment, Error, ErrorKind, context};
use serde::Serialize;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model's chat template does not parse: {0}")]
    Parse(String),
    #[error("the model's chat template failed: {0}")]
    Render(String),
}

/// ChatML, for models that ship no template.
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Gemma's turn format, for Gemma models that ship no template (base checkpoints): the
/// vocabulary has the turn tokens, ChatML's would be split into plain text.
pub const GEMMA: &str = "{{ bos_token }}{% for message in messages %}{% if message.role == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = 'user' %}{% endif %}<start_of_turn>{{ role }}\n{{ message.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

/// End-of-turn markers of the common template families; those that appear in a template and in
/// the vocabulary end generation.
pub const END_OF_TURN_MARKERS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
];

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    is_fallback: bool,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; when `None`, `fallback` (ChatML or Gemma's format, see
    /// [`ChatTemplate::fallback_for`]).
    pub fn new(
        source: Option<String>,
        fallback: &str,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, TemplateError> {
        let is_fallback = source.is_none();
        let source = source.unwrap_or_else(|| fallback.to_string());
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Parse(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| TemplateError::Parse(e.to_string()))?;
        Ok(Self {
            env,
            source,
            bos_token,
            eos_token,
            is_fallback,
        })
    }

    /// The format to use when a model ships no template: Gemma's when its vocabulary has
    /// Gemma's turn tokens, else ChatML.
    pub fn fallback_for(has_token: impl Fn(&str) -> bool) -> &'static str {
        if has_token("<start_of_turn>") && has_token("<end_of_turn>") {
            GEMMA
        } else {
            CHATML
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when the model had no template and ChatML is used.
    pub fn is_fallback(&self) -> bool {
        self.is_fallback
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Parse(e.to_string()))?;
        tmpl.render(context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| TemplateError::Render(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None, CHATML, String::new(), String::new()).unwrap();
        assert!(t.is_fallback());
        let s = t.render(&[Message::new(Role::User, "hi")], true).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_tojson_and_raise_exception() {
        let src = "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.role | tojson }}{% endfor %}{% if messages|length > 1 %}{{ raise_exception('only one') }}{% endif %}";
        let t = ChatTemplate::new(Some(src.into()), CHATML, "<s>".into(), "</s>".into()).unwrap();
        let one = [Message::new(Role::User, "  hi ")];
        assert_eq!(t.render(&one, false).unwrap(), "HI|\"user\"");
        let two = [one[0].clone(), Message::new(Role::Assistant, "x")];
        let err = t.render(&two, false).unwrap_err().to_string();
        assert!(err.contains("only one"), "{err}");
    }

    #[test]
    fn trim_and_lstrip_blocks_as_in_hf() {
        let src = "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}";
        let t = ChatTemplate::new(Some(src.into()), CHATML, String::new(), String::new()).unwrap();
        assert_eq!(
            t.render(&[Message::new(Role::User, "a")], false).unwrap(),
            "    a\n"
        );
    }

    #[test]
    fn gemma_fallback_when_the_vocabulary_has_turn_tokens() {
        let gemma = |t: &str| t == "<start_of_turn>" || t == "<end_of_turn>";
        assert_eq!(ChatTemplate::fallback_for(gemma), GEMMA);
        assert_eq!(ChatTemplate::fallback_for(|_| false), CHATML);
        let t = ChatTemplate::new(None, GEMMA, "<bos>".into(), "<eos>".into()).unwrap();
        let msgs = [
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello"),
            Message::new(Role::User, "Bye"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn bad_template_is_an_error() {
        assert!(matches!(
            ChatTemplate::new(
                Some("{% for %}".into()),
                CHATML,
                String::new(),
                String::new()
            ),
            Err(TemplateError::Parse(_))
        ));
    }
}
