//! OpenAI's wire formats for chat completions and (raw text) completions: the requests as
//! clients send them, checked into what the generator runs, and the responses and errors as
//! clients expect them.
//!
//! Unknown request fields are ignored, as OpenAI-compatible servers do (clients send `user`,
//! `frequency_penalty`, `logprobs` …); fields that would change the answer and that this server
//! cannot honour (`n` > 1, tools) are refused rather than ignored.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::chat::{Message, Role};
use crate::sampling::SamplingParams;

/// A chat-completions request. Its `model` is not read: the server runs one model, whatever a
/// client names (as llama-server does).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<WireMessage>,
    #[serde(flatten)]
    pub shared: Shared,
    /// OpenAI's newer name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub tools: Option<serde_json::Value>,
}

/// The fields both kinds of request have, checked the same way.
#[derive(Debug, Deserialize)]
pub struct Shared {
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// lambdachat's own options (other servers ignore the field).
    #[serde(default)]
    pub lambdachat: Option<Extension>,
}

/// A request's `lambdachat` field.
#[derive(Debug, Default, Deserialize)]
pub struct Extension {
    /// Record the attention of the reply's last token, for inspect mode (`--connect` asks).
    #[serde(default)]
    pub inspect: bool,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// A message's content: a string, or parts of which only text ones are understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// At most this many stop sequences, as OpenAI allows.
const MAX_STOPS: usize = 4;

/// A (legacy) completions request: a text to continue, with no chat template, for base
/// models (as llama.cpp's completion tool and Ollama's `raw` do).
#[derive(Debug, Deserialize)]
pub struct TextRequest {
    pub prompt: TextPrompt,
    #[serde(flatten)]
    pub shared: Shared,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub logprobs: Option<u32>,
}

/// A prompt: a string, or a list holding one (OpenAI's batch of prompts, of which one is
/// served).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TextPrompt {
    One(String),
    Many(Vec<String>),
}

/// OpenAI's default length of a completion when the request does not say.
const TEXT_DEFAULT_MAX_TOKENS: usize = 16;

/// What a request asks to be continued.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A conversation, rendered by the model's chat template.
    Chat(Vec<Message>),
    /// A text continued as it is; `echo` sends the prompt before the completion.
    Text { prompt: String, echo: bool },
}

/// A request checked: what the generator runs.
#[derive(Debug, Clone)]
pub struct Checked {
    pub input: Input,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Record what the reply's last token attends (for a look with [`crate::protocol::Look::Inspect`]).
    pub probe: bool,
}

impl ChatRequest {
    /// Checks the request against what the server can do: `defaults` are the server's sampling
    /// flags, `max_tokens_cap` its limit on a reply's length.
    pub fn check(
        self,
        defaults: &SamplingParams,
        max_tokens_cap: usize,
    ) -> Result<Checked, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
        }
        if self
            .tools
            .as_ref()
            .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::invalid(
                "tools are not supported by this server",
                Some("tools"),
            ));
        }
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.check(i))
            .collect::<Result<Vec<_>, _>>()?;
        check_order(&messages)?;
        let mut shared = self.shared;
        shared.max_tokens = self.max_completion_tokens.or(shared.max_tokens);
        shared.check(
            Input::Chat(messages),
            defaults,
            max_tokens_cap,
            max_tokens_cap,
        )
    }
}

impl TextRequest {
    /// Checks the request as [`ChatRequest::check`] does; a completion without `max_tokens`
    /// gets OpenAI's 16 tokens (within the cap).
    pub fn check(
        self,
        defaults: &SamplingParams,
        max_tokens_cap: usize,
    ) -> Result<Checked, ApiError> {
        if self.n.is_some_and(|n| n != 1) || self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "only n = 1 (and best_of = 1) is supported",
                Some("n"),
            ));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                "suffix (insertion) is not supported",
                Some("suffix"),
            ));
        }
        if self.logprobs.is_some_and(|n| n > 0) {
            return Err(ApiError::invalid(
                "logprobs are not supported",
                Some("logprobs"),
            ));
        }
        let prompt = match self.prompt {
            TextPrompt::One(p) => p,
            TextPrompt::Many(mut v) if v.len() == 1 => v.remove(0),
            TextPrompt::Many(_) => {
                return Err(ApiError::invalid(
                    "prompt must be one string (a batch of prompts is not supported)",
                    Some("prompt"),
                ));
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                "prompt is empty: give the text to continue",
                Some("prompt"),
            ));
        }
        let input = Input::Text {
            prompt,
            echo: self.echo,
        };
        let default_length = TEXT_DEFAULT_MAX_TOKENS.min(max_tokens_cap);
        self.shared
            .check(input, defaults, max_tokens_cap, default_length)
    }
}

impl Shared {
    /// `input` with these fields checked: `max_tokens` within the cap (`default_length` when
    /// not given), the stop sequences, the sampling over the server's `defaults`.
    fn check(
        self,
        input: Input,
        defaults: &SamplingParams,
        max_tokens_cap: usize,
        default_length: usize,
    ) -> Result<Checked, ApiError> {
        let max_tokens = match self.max_tokens {
            Some(0) => {
                return Err(ApiError::invalid(
                    "max_tokens must be at least 1",
                    Some("max_tokens"),
                ));
            }
            Some(n) if n > max_tokens_cap => {
                return Err(ApiError::invalid(
                    &format!("max_tokens is {n}; this server allows at most {max_tokens_cap}"),
                    Some("max_tokens"),
                ));
            }
            Some(n) => n,
            None => default_length,
        };
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                &format!("stop takes up to {MAX_STOPS} non-empty strings"),
                Some("stop"),
            ));
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            seed: self.seed.unwrap_or(defaults.seed),
            ..defaults.clone()
        };
        sampling
            .validate()
            .map_err(|e| ApiError::invalid(&e.to_string(), None))?;
        Ok(Checked {
            input,
            sampling,
            max_tokens,
            stop,
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            probe: self.lambdachat.is_some_and(|e| e.inspect),
        })
    }
}

impl WireMessage {
    fn check(self, index: usize) -> Result<Message, ApiError> {
        let param = format!("messages[{index}]");
        let role = match self.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    &format!(
                        "{param}: role \"{other}\" is not supported (system, user, assistant)"
                    ),
                    Some(&param),
                ));
            }
        };
        let content = match self.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                &format!(
                                    "{param}: content parts of type \"{kind}\" are not supported"
                                ),
                                Some(&param),
                            ));
                        }
                    }
                }
                text
            }
        };
        Ok(Message::new(role, content))
    }
}

/// A conversation the session can read: a system message only first, every assistant message
/// after a user message, and a user message last.
fn check_order(messages: &[Message]) -> Result<(), ApiError> {
    let mut after_user = false;
    for (i, m) in messages.iter().enumerate() {
        match m.role {
            Role::System if i > 0 => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}]: a system message may only come first"),
                    Some("messages"),
                ));
            }
            Role::Assistant if !after_user => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}]: an assistant message must follow a user message"),
                    Some("messages"),
                ));
            }
            _ => {}
        }
        after_user = m.role == Role::User;
    }
    if !after_user {
        return Err(ApiError::invalid(
            "the last message must be the user's",
            Some("messages"),
        ));
    }
    Ok(())
}

/// How a reply ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

/// Token counts: OpenAI's three, and what the Λ cache did under `lambdachat`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Usage {
    /// Tokens of the conversation before the reply (reused and fed).
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub lambdachat: LambdaUsage,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LambdaUsage {
    /// The request continued a conversation the server held.
    pub continued: bool,
    /// That conversation came back from disk (it had been idle), in `restore_s` seconds.
    pub restored: bool,
    pub restore_s: f64,
    /// Tokens of the conversation that were already in the cache.
    pub tokens_reused: u64,
    /// Tokens run through the model for the request's messages.
    pub tokens_fed: u64,
    /// Every token the conversation has seen.
    pub tokens_seen: u64,
    /// Tokens the next query attends (sinks, pins and window).
    pub tokens_attended: u64,
    pub tokens_evicted: u64,
    pub kv_bytes: u64,
    /// Seconds spent feeding the request's messages, and generating the reply.
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Generated tokens per second of `decode_s`, measured where they are made.
    pub decode_tok_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<Choice<'a>>,
    pub usage: &'a Usage,
}

#[derive(Debug, Serialize)]
pub struct Choice<'a> {
    pub index: u32,
    pub message: ReplyMessage<'a>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Serialize)]
pub struct ReplyMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

/// A text completion, whole or (`object: "text_completion"` all the same) one streamed piece
/// of it.
#[derive(Debug, Serialize)]
pub struct TextCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<TextChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<&'a Usage>,
}

#[derive(Debug, Serialize)]
pub struct TextChoice<'a> {
    pub text: &'a str,
    pub index: u32,
    /// Always null: log-probabilities are refused when asked for.
    pub logprobs: Option<()>,
    pub finish_reason: Option<FinishReason>,
}

/// An error as OpenAI sends it: a status and `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A request the server cannot take (400), naming the field at fault when there is one.
    pub fn invalid(message: &str, param: Option<&str>) -> Self {
        Self {
            param: param.map(str::to_string),
            ..Self::unreadable(StatusCode::BAD_REQUEST, message.to_string())
        }
    }

    /// A request body that could not be read or parsed, with the status that says why.
    pub fn unreadable(status: StatusCode, message: String) -> Self {
        Self {
            status,
            message,
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: &str) -> Self {
        Self {
            status,
            message: message.to_string(),
            kind,
            param: None,
            code: Some(code),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: serde_json::Value) -> Result<Checked, ApiError> {
        serde_json::from_value::<ChatRequest>(json)
            .unwrap()
            .check(&SamplingParams::default(), 512)
    }

    #[test]
    fn a_plain_request_takes_the_server_defaults() {
        let c = check(serde_json::json!({
            "model": "x", "messages": [{"role": "user", "content": "hi"}], "user": "ignored"
        }))
        .unwrap();
        assert_eq!(c.input, Input::Chat(vec![Message::new(Role::User, "hi")]));
        assert_eq!(c.max_tokens, 512);
        assert_eq!(c.sampling, SamplingParams::default());
        assert!(!c.stream && !c.include_usage && c.stop.is_empty());
    }

    #[test]
    fn fields_are_read_and_parts_joined() {
        let c = check(serde_json::json!({
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null},
                {"role": "user", "content": "c"}
            ],
            "temperature": 0.0, "top_p": 0.5, "seed": 7, "max_completion_tokens": 9,
            "stop": "END", "stream": true, "stream_options": {"include_usage": true}
        }))
        .unwrap();
        let Input::Chat(messages) = &c.input else {
            panic!("a chat request reads as a chat")
        };
        assert_eq!(messages[0], Message::new(Role::System, "be brief"));
        assert_eq!(messages[1].content, "ab");
        assert_eq!(messages[2], Message::new(Role::Assistant, ""));
        assert_eq!(
            (c.sampling.temperature, c.sampling.top_p, c.sampling.seed),
            (0.0, 0.5, 7)
        );
        assert_eq!(c.max_tokens, 9);
        assert_eq!(c.stop, vec!["END".to_string()]);
        assert!(c.stream && c.include_usage);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let user = serde_json::json!([{"role": "user", "content": "hi"}]);
        let refused = |extra: serde_json::Value| {
            let mut req = serde_json::json!({"messages": user});
            req.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let e = check(req).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            e.message
        };
        assert!(refused(serde_json::json!({"n": 2})).contains("n = 1"));
        assert!(refused(serde_json::json!({"tools": [{"type": "function"}]})).contains("tools"));
        assert!(refused(serde_json::json!({"max_tokens": 513})).contains("at most 512"));
        assert!(refused(serde_json::json!({"max_tokens": 0})).contains("at least 1"));
        assert!(refused(serde_json::json!({"stop": ["a", "b", "c", "d", "e"]})).contains("stop"));
        assert!(refused(serde_json::json!({"stop": [""]})).contains("stop"));
        assert!(refused(serde_json::json!({"temperature": -1.0})).contains("emperature"));
        let order = |messages: serde_json::Value| {
            check(serde_json::json!({"messages": messages}))
                .unwrap_err()
                .message
        };
        assert!(order(serde_json::json!([])).contains("last message"));
        assert!(
            order(serde_json::json!([{"role": "assistant", "content": "x"}]))
                .contains("follow a user")
        );
        assert!(order(serde_json::json!([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "user", "content": "y"}])).contains("only come first"));
        assert!(order(serde_json::json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])).contains("last message"));
        assert!(order(serde_json::json!([{"role": "tool", "content": "x"}])).contains("\"tool\""));
        assert!(
            order(serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]))
                .contains("image_url")
        );
    }

    fn check_text(json: serde_json::Value) -> Result<Checked, ApiError> {
        serde_json::from_value::<TextRequest>(json)
            .unwrap()
            .check(&SamplingParams::default(), 512)
    }

    #[test]
    fn a_text_request_continues_its_prompt_for_16_tokens_unless_told() {
        let c = check_text(serde_json::json!({"model": "x", "prompt": "Once"})).unwrap();
        let prompt = "Once".to_string();
        assert_eq!(
            c.input,
            Input::Text {
                prompt: prompt.clone(),
                echo: false
            }
        );
        assert_eq!(c.max_tokens, 16);
        let c = check_text(serde_json::json!({
            "prompt": ["Once"], "echo": true, "max_tokens": 40, "stop": ["\n"], "suffix": ""
        }))
        .unwrap();
        assert_eq!(c.input, Input::Text { prompt, echo: true });
        assert_eq!((c.max_tokens, c.stop.len()), (40, 1));
        let small = serde_json::from_value::<TextRequest>(serde_json::json!({"prompt": "a"}))
            .unwrap()
            .check(&SamplingParams::default(), 8)
            .unwrap();
        assert_eq!(small.max_tokens, 8, "the default stays within the cap");
    }

    #[test]
    fn a_text_request_refuses_what_it_cannot_honour_by_name() {
        let refused = |json: serde_json::Value| check_text(json).unwrap_err();
        let e = refused(serde_json::json!({"prompt": ""}));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = refused(serde_json::json!({"prompt": ["a", "b"]}));
        assert!(e.message.contains("one string"), "{}", e.message);
        assert!(
            refused(serde_json::json!({"prompt": "a", "n": 3}))
                .message
                .contains("n = 1")
        );
        assert!(
            refused(serde_json::json!({"prompt": "a", "best_of": 2}))
                .message
                .contains("best_of")
        );
        assert!(
            refused(serde_json::json!({"prompt": "a", "suffix": "z"}))
                .message
                .contains("suffix")
        );
        assert!(
            refused(serde_json::json!({"prompt": "a", "logprobs": 2}))
                .message
                .contains("logprobs")
        );
        assert!(
            refused(serde_json::json!({"prompt": "a", "max_tokens": 600}))
                .message
                .contains("at most 512")
        );
    }

    #[test]
    fn errors_have_openais_shape() {
        let body = ApiError::invalid("bad", Some("stop")).body();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "stop", "code": null}})
        );
    }
}
