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

/// A template's errors name the template (the model file it came from), since a template is
/// code someone else wrote.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the chat template of {origin} does not parse: {message}")]
    Parse { origin: String, message: String },
    #[error("the chat template of {origin} failed: {message}")]
    Render { origin: String, message: String },
    #[error(
        "the chat template of {origin} went past its limit ({what}): it loops or grows without end; \
         give the model a template that works (a `tokenizer.json`/`tokenizer_config.json` beside it)"
    )]
    Limit { origin: String, what: String },
}

/// Instructions (and about 64 bytes of values each) a render may use: a budget for the
/// template's own work plus one in proportion to the conversation it renders.
const FUEL_BASE: u64 = 2_000_000;
const FUEL_PER_MESSAGE: u64 = 20_000;
/// Nesting of macros and includes: HF's templates nest a few levels; a runaway recursion stops
/// here, not with a stack overflow.
const RECURSION_LIMIT: usize = 64;
/// Output a render may write: the contents, plus this much per message and once.
const OUTPUT_PER_MESSAGE: usize = 64 * 1024;
const OUTPUT_BASE: usize = 1 << 20;

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
    source: String,
    bos_token: String,
    eos_token: String,
    is_fallback: bool,
    origin: String,
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
        Self::from_model(source, fallback, bos_token, eos_token, "the model")
    }

    /// [`Self::new`] for the template of `origin` (the model file), which its errors name.
    pub fn from_model(
        source: Option<String>,
        fallback: &str,
        bos_token: String,
        eos_token: String,
        origin: &str,
    ) -> Result<Self, TemplateError> {
        let is_fallback = source.is_none();
        let template = Self {
            source: source.unwrap_or_else(|| fallback.to_string()),
            bos_token,
            eos_token,
            is_fallback,
            origin: origin.to_string(),
        };
        template.environment(0)?;
        Ok(template)
    }

    /// A fresh environment with the template compiled and `fuel` to spend (0: none needed,
    /// nothing is rendered). Built for each render, so that the budget follows the size of the
    /// conversation; compiling a chat template takes microseconds.
    fn environment(&self, fuel: u64) -> Result<Environment<'static>, TemplateError> {
        let parse = |e: Error| TemplateError::Parse {
            origin: self.origin.clone(),
            message: format!("{e:#}"),
        };
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(parse)?;
        env.set_syntax(syntax);
        env.set_fuel(Some(fuel.max(1)));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, self.source.clone())
            .map_err(parse)?;
        Ok(env)
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

    /// True when the model had no template and a fallback (ChatML or Gemma's) is used.
    pub fn is_fallback(&self) -> bool {
        self.is_fallback
    }

    /// The fallback's name, for telling people which format their turns are written in.
    pub fn fallback_name(&self) -> &'static str {
        if self.source == GEMMA {
            "Gemma's turn format"
        } else {
            "ChatML"
        }
    }

    /// Renders `messages`, within a budget of work and output that grows with them: a template
    /// that loops or grows without end stops with [`TemplateError::Limit`].
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let content: usize = messages.iter().map(|m| m.content.len()).sum();
        let fuel =
            FUEL_BASE + FUEL_PER_MESSAGE * messages.len() as u64 + (content as u64).div_ceil(16);
        let cap = OUTPUT_BASE + 2 * content + OUTPUT_PER_MESSAGE * messages.len();
        let env = self.environment(fuel)?;
        let tmpl = env.get_template(NAME).map_err(|e| TemplateError::Parse {
            origin: self.origin.clone(),
            message: e.to_string(),
        })?;
        let mut out = CappedOutput {
            text: Vec::new(),
            cap,
        };
        let rendered = tmpl.render_captured_to(
            context! {
                messages => Value::from(Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
            &mut out,
        );
        if let Err(e) = rendered {
            let limit = match e.kind() {
                ErrorKind::OutOfFuel => Some(format!("{fuel} steps")),
                ErrorKind::WriteFailure => Some(format!("{cap} bytes of output")),
                _ if e.to_string().contains("recursion limit") => {
                    Some(format!("{RECURSION_LIMIT} levels of recursion"))
                }
                _ => None,
            };
            let origin = self.origin.clone();
            return Err(match limit {
                Some(what) => TemplateError::Limit { origin, what },
                None => TemplateError::Render {
                    origin,
                    message: format!("{e:#}"),
                },
            });
        }
        String::from_utf8(out.text).map_err(|e| TemplateError::Render {
            origin: self.origin.clone(),
            message: e.to_string(),
        })
    }
}

/// A render's output, refused past `cap` bytes.
struct CappedOutput {
    text: Vec<u8>,
    cap: usize,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.cap {
            return Err(std::io::Error::other("the template's output is too long"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
            Err(TemplateError::Parse { .. })
        ));
    }

    /// Templates are code from the model file: one that loops, grows or recurses without end
    /// stops with an error naming the file, quickly.
    #[test]
    fn runaway_templates_stop_at_their_limits() {
        let cases = [
            // Loops forever (as far as anyone waiting can tell).
            "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}{% endfor %}{% endfor %}{% endfor %}",
            // Doubles a string until memory runs out.
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            // Writes without end.
            "{% for i in range(10000) %}{% for j in range(10000) %}{{ messages[0].content }}{% endfor %}{% endfor %}",
            // Recurses without end.
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        ];
        for source in cases {
            let t = ChatTemplate::from_model(
                Some(source.into()),
                CHATML,
                String::new(),
                String::new(),
                "/models/evil.gguf",
            )
            .unwrap();
            let start = std::time::Instant::now();
            let err = t
                .render(&[Message::new(Role::User, "hello")], true)
                .unwrap_err();
            assert!(
                matches!(err, TemplateError::Limit { .. }),
                "{source}: {err}"
            );
            assert!(err.to_string().contains("/models/evil.gguf"), "{err}");
            assert!(
                start.elapsed().as_secs() < 10,
                "{source}: took {:?}",
                start.elapsed()
            );
        }
    }

    /// The budget grows with the conversation: a long one renders.
    #[test]
    fn long_conversations_render_within_the_budget() {
        let t = ChatTemplate::new(None, CHATML, String::new(), String::new()).unwrap();
        let messages: Vec<Message> = (0..20_000)
            .map(|i| {
                Message::new(
                    if i % 2 == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    },
                    "x".repeat(100),
                )
            })
            .collect();
        let out = t.render(&messages, true).unwrap();
        assert!(out.len() > 20_000 * 100);
    }
}
