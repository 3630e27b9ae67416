//! The HTTP side of `--connect`: OpenAI's `/v1/models` and streamed `/v1/chat/completions`,
//! which every OpenAI-compatible server answers, and lambdachat's extension routes, which only
//! a lambdachat server answers. Blocking (ureq) on the remote backend's own thread, as the
//! local worker blocks on the model: the UI never waits on either.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::protocol::{LookRequest, Looked, ServerInfo};

/// How long connecting may take; a reply then streams for as long as it streams.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request that is not streamed may take in all.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a stream that says nothing checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// Why the server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("\"{0}\" is not a server address: give one starting with http:// or https://")]
    BadUrl(String),
    #[error("{url} did not answer: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url} sent something that is not {what}: {reason}")]
    Garbled {
        url: String,
        what: &'static str,
        reason: String,
    },
    #[error("the server failed while replying: {0}")]
    Failed(String),
}

impl ClientError {
    /// The HTTP status the server answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What a streamed reply brings, piece by piece.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    /// A lambdachat server's progress through the prompt (an SSE comment).
    Prefill {
        done: usize,
        total: usize,
    },
}

/// How a streamed reply ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamEnd {
    /// OpenAI's `finish_reason` (`stop`, `length`), when the server sent one.
    pub finish: Option<String>,
    /// `usage.prompt_tokens` and `usage.completion_tokens`, when the server sent them.
    pub usage: Option<(u64, u64)>,
    /// A lambdachat server's `usage.lambdachat` (tokens reused and fed, decode speed…).
    pub extension: Option<serde_json::Value>,
    /// Stopped by the caller; the connection was dropped, which stops the server's generation.
    pub cancelled: bool,
}

/// A server at a base address (`http://host:port`, with or without a trailing `/v1`).
pub struct Client {
    agent: ureq::Agent,
    base: String,
    key: Option<String>,
}

impl StreamEnd {
    /// Tokens per second as a lambdachat server measured them where they were made.
    pub fn server_tok_s(&self) -> Option<f64> {
        self.extension.as_ref()?.get("decode_tok_s")?.as_f64()
    }
}

impl Client {
    pub fn new(url: &str, key: Option<String>) -> Result<Self, ClientError> {
        let trimmed = url.trim().trim_end_matches('/');
        if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
            return Err(ClientError::BadUrl(url.to_string()));
        }
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .build();
        Ok(Self {
            agent,
            base,
            key: key.filter(|k| !k.is_empty()),
        })
    }

    /// The address the chat shows: the base, without a trailing `/v1`.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.key {
            Some(key) => request.set("Authorization", &format!("Bearer {key}")),
            None => request,
        }
    }

    /// The ids of the models the server serves (`GET /v1/models`), in its order.
    pub fn models(&self) -> Result<Vec<String>, ClientError> {
        #[derive(serde::Deserialize)]
        struct List {
            data: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            id: String,
        }
        let response = self.call(self.request("GET", "/v1/models"), None::<&()>)?;
        let list: List = self.parse(response, "a model list")?;
        Ok(list.data.into_iter().map(|e| e.id).collect())
    }

    /// A lambdachat server's Λ; `None` from a server without the extension.
    pub fn info(&self) -> Result<Option<ServerInfo>, ClientError> {
        let request = self.request("GET", "/lambdachat/v1/info");
        match self.call(request, None::<&()>) {
            Ok(response) => self.parse(response, "lambdachat's server info").map(Some),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A look at the conversation the server holds for `look.messages`; `None` when it holds
    /// none (it reads the conversation anew with the next message).
    pub fn look(&self, look: &LookRequest) -> Result<Option<Looked>, ClientError> {
        let request = self.request("POST", "/lambdachat/v1/conversation");
        match self.call(request, Some(look)) {
            Ok(response) => self.parse(response, "a conversation look").map(Some),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends a request that is not streamed, and turns any answer but 2xx into an error that
    /// carries the server's own message.
    fn call(
        &self,
        request: ureq::Request,
        body: Option<&impl Serialize>,
    ) -> Result<ureq::Response, ClientError> {
        let request = request.timeout(CALL_TIMEOUT);
        let sent = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        self.answered(sent)
    }

    fn answered(
        &self,
        sent: Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response, ClientError> {
        match sent {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, response)) => Err(ClientError::Status {
                url: response.get_url().to_string(),
                status,
                message: error_message(response.into_string().unwrap_or_default()),
            }),
            Err(ureq::Error::Transport(t)) => Err(ClientError::Unreachable {
                url: self.base.clone(),
                reason: t.to_string(),
            }),
        }
    }

    fn parse<T: DeserializeOwned>(
        &self,
        response: ureq::Response,
        what: &'static str,
    ) -> Result<T, ClientError> {
        let url = response.get_url().to_string();
        response.into_json().map_err(|e| ClientError::Garbled {
            url,
            what,
            reason: e.to_string(),
        })
    }

    /// Streams a chat completion (`body` as OpenAI's, `stream: true`), handing each piece to
    /// `on_piece`. Returns when the reply ends, or within [`CANCEL_POLL`] of `cancel` being
    /// set: the connection is then dropped, which is how a server learns to stop.
    pub fn stream_chat(
        &self,
        body: &serde_json::Value,
        cancel: &AtomicBool,
        on_piece: &mut dyn FnMut(Piece),
    ) -> Result<StreamEnd, ClientError> {
        let response =
            self.answered(self.request("POST", "/v1/chat/completions").send_json(body))?;
        let url = response.get_url().to_string();
        // The socket is read on a thread of its own, so a server that says nothing for a while
        // (a long prompt) never keeps a cancel waiting. Once the receiver is gone, the reader
        // ends at its next line and drops the connection.
        let (lines, received) = channel();
        let reader = BufReader::new(response.into_reader());
        std::thread::Builder::new()
            .name("lambdachat-remote-read".into())
            .spawn(move || {
                for line in reader.lines() {
                    let failed = line.is_err();
                    if lines.send(line).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                reason: format!("no thread to read the reply on: {e}"),
            })?;
        let mut events = SseParser::default();
        let mut end = StreamEnd::default();
        loop {
            if cancel.load(Ordering::Relaxed) {
                end.cancelled = true;
                return Ok(end);
            }
            let line = match received.recv_timeout(CANCEL_POLL) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => {
                    return Err(ClientError::Unreachable {
                        url,
                        reason: format!("the reply broke off: {e}"),
                    });
                }
                Err(RecvTimeoutError::Timeout) => continue,
                // The server closed the stream without `[DONE]` (some do): the reply ended.
                Err(RecvTimeoutError::Disconnected) => return Ok(end),
            };
            match events.line(&line) {
                Some(SseEvent::Comment(c)) => {
                    if let Some(p) = prefill_note(&c) {
                        on_piece(p);
                    }
                }
                Some(SseEvent::Data(data)) if data == "[DONE]" => return Ok(end),
                Some(SseEvent::Data(data)) => {
                    let chunk: serde_json::Value =
                        serde_json::from_str(&data).map_err(|e| ClientError::Garbled {
                            url: url.clone(),
                            what: "a chat completion chunk",
                            reason: e.to_string(),
                        })?;
                    if let Some(text) = read_chunk(&chunk, &mut end)? {
                        on_piece(Piece::Text(text));
                    }
                }
                None => {}
            }
        }
    }
}

/// The message in an error body of OpenAI's shape (`{"error": {"message": …}}`, or Ollama's
/// `{"error": "…"}`), else the body itself, shortened.
fn error_message(body: String) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let message = parsed.as_ref().and_then(|v| message_of(v.get("error")?));
    message.unwrap_or_else(|| {
        let body = body.trim();
        match body.char_indices().nth(200) {
            Some((cut, _)) => format!("{}…", &body[..cut]),
            None => body.to_string(),
        }
    })
}

/// An error object's message: OpenAI's `{"message": …}`, or a plain string.
fn message_of(error: &serde_json::Value) -> Option<String> {
    error
        .get("message")
        .and_then(|m| m.as_str())
        .or_else(|| error.as_str())
        .map(str::to_string)
}

/// A chunk's text, finish reason and usage (the last two go into `end`); an error object
/// sent in the stream ends it.
fn read_chunk(
    chunk: &serde_json::Value,
    end: &mut StreamEnd,
) -> Result<Option<String>, ClientError> {
    if let Some(e) = chunk.get("error") {
        return Err(ClientError::Failed(
            message_of(e).unwrap_or_else(|| e.to_string()),
        ));
    }
    if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
        let n = |k: &str| usage.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        end.usage = Some((n("prompt_tokens"), n("completion_tokens")));
        end.extension = usage.get("lambdachat").cloned();
    }
    let choice = chunk.get("choices").and_then(|c| c.get(0));
    let Some(choice) = choice else {
        return Ok(None);
    };
    if let Some(f) = choice.get("finish_reason").and_then(|f| f.as_str()) {
        end.finish = Some(f.to_string());
    }
    let text = choice
        .get("delta")
        .and_then(|d| d.get("content"))
        .and_then(|c| c.as_str())
        .filter(|t| !t.is_empty());
    Ok(text.map(str::to_string))
}

/// `prefill DONE/TOTAL`, a lambdachat server's comment while it reads the prompt.
fn prefill_note(comment: &str) -> Option<Piece> {
    let (done, total) = comment.trim().strip_prefix("prefill ")?.split_once('/')?;
    Some(Piece::Prefill {
        done: done.parse().ok()?,
        total: total.parse().ok()?,
    })
}

/// One event of a server-sent event stream.
#[derive(Debug, Clone, PartialEq)]
enum SseEvent {
    /// Its `data:` lines, joined by newlines.
    Data(String),
    /// A `:` line, which OpenAI clients skip.
    Comment(String),
}

/// Server-sent events from lines (WHATWG's rules, as far as chat streams use them): `data:`
/// lines gather until a blank line ends the event; `:` lines are comments; other fields
/// (`event:`, `id:`, `retry:`) are skipped.
#[derive(Default)]
struct SseParser {
    data: Option<String>,
}

impl SseParser {
    fn line(&mut self, line: &str) -> Option<SseEvent> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            return self.data.take().map(SseEvent::Data);
        }
        if let Some(comment) = line.strip_prefix(':') {
            return Some(SseEvent::Comment(comment.trim_start().to_string()));
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &str) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        text.lines().filter_map(|l| parser.line(l)).collect()
    }

    #[test]
    fn events_gather_data_lines_until_a_blank_line() {
        let stream = ": prefill 32/100\r\n\r\ndata: {\"a\":1}\r\n\r\nevent: x\ndata: one\ndata:two\n\ndata: [DONE]\n\n";
        assert_eq!(
            events(stream),
            [
                SseEvent::Comment("prefill 32/100".into()),
                SseEvent::Data("{\"a\":1}".into()),
                SseEvent::Data("one\ntwo".into()),
                SseEvent::Data("[DONE]".into()),
            ]
        );
        // An event not ended by a blank line is not dispatched.
        assert_eq!(events("data: half"), []);
    }

    #[test]
    fn chunks_give_text_finish_and_usage() {
        let mut end = StreamEnd::default();
        let chunk =
            serde_json::json!({"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]});
        assert_eq!(read_chunk(&chunk, &mut end).unwrap(), Some("Hi".into()));
        let role =
            serde_json::json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]});
        assert_eq!(read_chunk(&role, &mut end).unwrap(), None);
        let last = serde_json::json!({"choices": [{"delta": {}, "finish_reason": "length"}]});
        assert_eq!(read_chunk(&last, &mut end).unwrap(), None);
        let usage = serde_json::json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}});
        read_chunk(&usage, &mut end).unwrap();
        assert_eq!(end.finish.as_deref(), Some("length"));
        assert_eq!(end.usage, Some((12, 3)));
        let failed =
            serde_json::json!({"error": {"message": "out of memory", "type": "server_error"}});
        let e = read_chunk(&failed, &mut end).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the server failed while replying: out of memory"
        );
    }

    #[test]
    fn error_bodies_give_their_message() {
        let openai = r#"{"error": {"message": "bad key", "type": "authentication_error"}}"#;
        assert_eq!(error_message(openai.into()), "bad key");
        assert_eq!(
            error_message(r#"{"error": "model not found"}"#.into()),
            "model not found"
        );
        assert_eq!(error_message("  Not Found \n".into()), "Not Found");
        assert_eq!(error_message("x".repeat(300)).chars().count(), 201);
    }

    #[test]
    fn prefill_comments_are_read_and_others_skipped() {
        assert_eq!(
            prefill_note("prefill 32/100"),
            Some(Piece::Prefill {
                done: 32,
                total: 100
            })
        );
        assert_eq!(prefill_note("keep-alive"), None);
        assert_eq!(prefill_note("prefill x/1"), None);
    }

    #[test]
    fn addresses_lose_a_trailing_v1_and_need_a_scheme() {
        let c = Client::new("http://localhost:11434/v1/", None).unwrap();
        assert_eq!(c.base(), "http://localhost:11434");
        assert!(matches!(
            Client::new("localhost:8080", None),
            Err(ClientError::BadUrl(_))
        ));
    }
}
