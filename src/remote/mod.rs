//! The chat's other engine: a server reached over HTTP (`lambdachat --connect URL`). It speaks
//! the same protocol as the local worker ([`Command`]s in, [`Event`]s out), on a thread of its
//! own that owns the conversation's messages and their local copy, so the UI cannot tell the
//! two apart except by what the server can show.
//!
//! Any OpenAI-compatible server (Ollama, llama-server, vLLM, lambdachat) chats: each message
//! sends the whole conversation, as OpenAI's API asks, and a lambdachat server continues its
//! Λ cache from it without reading it again. A lambdachat server also answers its extension
//! routes, through which the visualizer, inspect mode and pins work; with another server the
//! chat says they are not available. Λ parameters and raw mode are the server's to set.

mod client;
mod saved;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

pub use client::{Client, ClientError, Piece, StreamEnd};

use crate::attention::{KvType, LambdaParams};
use crate::chat::{Message, Role, code_blocks};
use crate::protocol::{
    Command, EngineThread, Event, EventSender, Look, LookRequest, Looked, Notice, ServerInfo,
    Settings, ShownMessage, StopReason, Timeline,
};
use crate::sampling::SamplingParams;
use crate::store::{markdown_message, markdown_title, title_from};
use saved::SavedChats;

/// Least time between two progress events while a reply streams.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Messages an opened conversation shows at first, as the local chat's.
const OPEN_MESSAGES: usize = 200;

/// How to reach the server, and what the chat starts with.
pub struct RemoteOptions {
    pub url: String,
    pub api_key: Option<String>,
    /// The server's model to chat with (`--model`); the first it lists when `None`.
    pub model: Option<String>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub system: Option<String>,
    /// Where conversations are saved on this machine; `None` keeps nothing.
    pub store: Option<PathBuf>,
    /// Conversation to resume: `Some(None)` for the latest one.
    pub resume: Option<Option<i64>>,
}

/// Starts the remote backend's thread; it connects, then reports on `events`.
pub fn spawn(options: RemoteOptions, events: EventSender) -> std::io::Result<EngineThread> {
    let (commands, inbox) = channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let thread = std::thread::Builder::new()
        .name("lambdachat-remote".into())
        .spawn(move || {
            let emit = |e| {
                let _ = events.send(e);
            };
            run(options, &inbox, flag, &emit);
            emit(Event::Stopped);
        })?;
    Ok(EngineThread {
        commands,
        cancel,
        thread,
    })
}

/// Connects, then carries out commands until `Shutdown` (or until the UI is gone).
fn run(
    options: RemoteOptions,
    inbox: &Receiver<Command>,
    cancel: Arc<AtomicBool>,
    emit: &dyn Fn(Event),
) {
    emit(Event::Loading(format!("connecting to {}…", options.url)));
    let connected = Client::new(&options.url, options.api_key.clone()).and_then(|client| {
        let models = client.models()?;
        let info = client.info()?;
        Ok((client, models, info))
    });
    let (client, models, info) = match connected {
        Ok(c) => c,
        Err(e) => {
            let hint = match e.status() {
                Some(401) => {
                    "The server wants an API key: pass --api-key KEY (or set LAMBDACHAT_API_KEY)."
                }
                _ => {
                    "Check the address (http://HOST:PORT, as `lambdachat serve`, Ollama, llama-server or vLLM print it) and that the server is running."
                }
            };
            return fail(emit, inbox, e.to_string(), hint);
        }
    };
    let model = match (options.model, models.first()) {
        (Some(m), _) => m,
        (None, Some(first)) => first.clone(),
        (None, None) => {
            let reason = format!("{} serves no model", client.base());
            return fail(
                emit,
                inbox,
                reason,
                "Load a model on the server, or name one with --model.",
            );
        }
    };
    let params = info
        .as_ref()
        .and_then(|i| LambdaParams::new(i.n_global, i.n_local, Some(i.distance_limit)).ok())
        .unwrap_or(LambdaParams {
            n_global: 0,
            n_local: 0,
            distance_limit: 0,
        });
    let kv_type = info
        .as_ref()
        .and_then(|i| clap::ValueEnum::from_str(&i.kv_type, true).ok())
        .unwrap_or(KvType::F16);
    let max_tokens = match &info {
        Some(i) => options.max_tokens.min(i.max_tokens),
        None => options.max_tokens,
    };
    let settings = Settings {
        params,
        sampling: options.sampling,
        max_tokens,
        recall: None,
        kv_type,
        raw: false,
        attention_view: info.is_some(),
        server: Some(client.base().to_string()),
    };
    let saved = match options.store.as_deref().map(SavedChats::open).transpose() {
        Ok(s) => s,
        Err(e) => {
            emit(Event::Error(format!(
                "conversations will not be saved: {e}"
            )));
            None
        }
    };
    let mut remote = Remote {
        label: format!("{} @ {}", shown_name(&model), client.base()),
        client,
        model,
        info,
        settings,
        system: options.system,
        messages: Vec::new(),
        changed: 0,
        title: NEW_TITLE.into(),
        saved,
        timeline: Timeline::default(),
        cancel,
        emit,
    };
    remote.start_fresh();
    emit(Event::Ready {
        model: shown_name(&remote.model).to_string(),
        settings: remote.settings.clone(),
    });
    match options.resume {
        Some(which) => {
            let latest = || {
                remote
                    .saved
                    .as_ref()
                    .and_then(|s| s.store().latest().ok().flatten())
            };
            match which.or_else(latest) {
                Some(id) => remote.open(id),
                None => {
                    emit(Event::Notice(Notice::NoSessionToResume));
                    remote.opened();
                }
            }
        }
        None => remote.opened(),
    }
    while let Ok(command) = inbox.recv() {
        if command == Command::Shutdown {
            break;
        }
        remote.handle(command);
    }
}

/// Says why the chat cannot start, and waits for the UI to quit.
fn fail(emit: &dyn Fn(Event), inbox: &Receiver<Command>, reason: String, hint: &str) {
    emit(Event::LoadFailed {
        reason,
        hint: hint.to_string(),
    });
    while let Ok(c) = inbox.recv() {
        if c == Command::Shutdown {
            break;
        }
    }
}

const NEW_TITLE: &str = "New chat";

struct Remote<'a> {
    client: Client,
    /// The server's model the chat talks to.
    model: String,
    /// `model @ server`, as saved conversations name where they were held.
    label: String,
    /// A lambdachat server's Λ; `None` for another server.
    info: Option<ServerInfo>,
    settings: Settings,
    /// The system prompt of new conversations.
    system: Option<String>,
    /// The open conversation, its system prompt first when it has one: what every request
    /// sends, and what the chat's message indices count.
    messages: Vec<Message>,
    /// The first message that changed since the last save.
    changed: usize,
    title: String,
    saved: Option<SavedChats>,
    /// What the server last said of the conversation's Λ.
    timeline: Timeline,
    cancel: Arc<AtomicBool>,
    emit: &'a dyn Fn(Event),
}

impl Remote<'_> {
    fn handle(&mut self, command: Command) {
        self.cancel.store(false, Ordering::Relaxed);
        match command {
            Command::Send(text) => {
                self.messages.push(Message::new(Role::User, text));
                self.reply();
            }
            Command::ReplaceLast(text) => {
                let retitle = self.user_messages() == 1 && self.title == self.only_title();
                self.pop_if(Role::Assistant);
                self.pop_if(Role::User);
                if retitle {
                    self.retitle(title_from(&text));
                }
                (self.emit)(Event::TakenBack { text: text.clone() });
                self.messages.push(Message::new(Role::User, text));
                self.reply();
            }
            Command::Regenerate => {
                // A message the server never answered (it failed, say) is sent again as is.
                match self.messages.last().map(|m| m.role) {
                    Some(Role::Assistant) => {
                        self.pop_if(Role::Assistant);
                        (self.emit)(Event::Regenerating);
                        self.reply();
                    }
                    Some(Role::User) => self.reply(),
                    _ => (self.emit)(Event::Notice(Notice::NothingToRegenerate)),
                }
            }
            Command::SetSampling(p) => match p.validate() {
                Ok(()) => {
                    self.settings.sampling = p;
                    (self.emit)(Event::Settings(self.settings.clone()));
                }
                Err(e) => (self.emit)(Event::Error(e.to_string())),
            },
            Command::SetMaxTokens(n) => {
                let cap = self.info.as_ref().map_or(usize::MAX, |i| i.max_tokens);
                if n > cap {
                    (self.emit)(Event::Error(format!(
                        "the server allows replies of at most {cap} tokens"
                    )));
                } else {
                    self.settings.max_tokens = n;
                    (self.emit)(Event::Settings(self.settings.clone()));
                }
            }
            Command::SetLambda(_) => (self.emit)(Event::Error(
                "the Λ is the server's: start `lambdachat serve` with other --n-global/--n-local"
                    .into(),
            )),
            Command::SetRaw(_) => (self.emit)(Event::Error(
                "raw mode is not available through --connect; the server's /v1/completions \
                 continues raw text"
                    .into(),
            )),
            Command::SetSystem(text) => {
                self.system = Some(text.clone());
                let this_conversation = self.user_messages() == 0;
                if this_conversation {
                    self.start_fresh();
                    self.opened();
                }
                (self.emit)(Event::Notice(Notice::SystemPromptSet { this_conversation }));
            }
            Command::Pin(i) => self.look(Look::Pin(i)),
            Command::Unpin(i) => self.look(Look::Unpin(i)),
            Command::Inspect(i) => self.look(Look::Inspect(i)),
            Command::LoadMessages { before, count } => {
                let from = before.saturating_sub(count);
                let shown = self.shown(from..before.min(self.messages.len()));
                (self.emit)(Event::Messages(shown));
            }
            Command::Save => self.save(),
            Command::Export(path) => match self.export(&path) {
                Ok(()) => (self.emit)(Event::Notice(Notice::Exported(path))),
                Err(e) => (self.emit)(Event::Error(format!(
                    "cannot write {}: {e}",
                    path.display()
                ))),
            },
            Command::NewSession => {
                self.save();
                self.start_fresh();
                self.opened();
            }
            Command::OpenSession(id) => {
                self.save();
                self.open(id);
            }
            Command::ListSessions => self.list(),
            Command::RenameSession(id, title) => {
                if let Some(saved) = &self.saved {
                    match saved.store().rename(id, &title) {
                        Ok(()) if saved.id() == Some(id) => {
                            self.title = title.clone();
                            (self.emit)(Event::Titled { id, title });
                        }
                        Ok(()) => {}
                        Err(e) => (self.emit)(Event::Error(e.to_string())),
                    }
                }
                self.list();
            }
            Command::DeleteSession(id) => {
                if let Some(saved) = &mut self.saved {
                    let open = saved.id() == Some(id);
                    if let Err(e) = saved.delete(id) {
                        (self.emit)(Event::Error(e.to_string()));
                    } else if open {
                        self.start_fresh();
                    }
                }
                self.list();
            }
            Command::Shutdown => {}
        }
    }

    /// A new, empty conversation with the current system prompt (not yet saved).
    fn start_fresh(&mut self) {
        if let Some(saved) = &mut self.saved {
            saved.close();
        }
        self.messages = self
            .system
            .iter()
            .map(|s| Message::new(Role::System, s.clone()))
            .collect();
        self.changed = 0;
        self.title = NEW_TITLE.into();
        self.timeline = self.empty_timeline();
    }

    fn empty_timeline(&self) -> Timeline {
        let p = self.settings.params;
        Timeline {
            n_global: p.n_global as u64,
            n_local: p.n_local as u64,
            message_count: self.messages.len(),
            ..Timeline::default()
        }
    }

    fn pop_if(&mut self, role: Role) {
        if self.messages.last().is_some_and(|m| m.role == role) {
            self.messages.pop();
            self.changed = self.changed.min(self.messages.len());
        }
    }

    fn user_messages(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.role == Role::User)
            .count()
    }

    /// The title the first user message gives.
    fn only_title(&self) -> String {
        self.messages
            .iter()
            .find(|m| m.role == Role::User)
            .map_or_else(String::new, |m| title_from(&m.content))
    }

    fn shown(&self, range: std::ops::Range<usize>) -> Vec<ShownMessage> {
        let mut code_before = 0;
        let mut shown = Vec::new();
        for (index, m) in self.messages.iter().enumerate().take(range.end) {
            if index >= range.start {
                shown.push(ShownMessage {
                    index,
                    role: m.role,
                    content: m.content.clone(),
                    code_before,
                });
            }
            code_before += code_blocks(&m.content).len();
        }
        shown
    }

    /// Tells the UI what the open conversation is.
    fn opened(&mut self) {
        let total = self.messages.len();
        (self.emit)(Event::Opened {
            id: self.saved.as_ref().and_then(SavedChats::id),
            title: self.title.clone(),
            total,
            messages: self.shown(total.saturating_sub(OPEN_MESSAGES)..total),
        });
        self.refresh_timeline();
    }

    fn open(&mut self, id: i64) {
        let Some(saved) = &mut self.saved else {
            return (self.emit)(Event::Error("no conversation database".into()));
        };
        match saved.load(id) {
            Ok((title, messages)) => {
                self.messages = messages;
                self.changed = self.messages.len();
                self.title = title.clone();
                self.timeline = self.empty_timeline();
                self.opened();
                // The server still holds it (its cache goes on), or reads it with the next
                // message.
                (self.emit)(Event::Notice(Notice::ResumedRemote {
                    title,
                    held: self.timeline.stats.tokens_seen > 0,
                }));
            }
            Err(e) => (self.emit)(Event::Error(format!("cannot open: {e}"))),
        }
    }

    fn list(&self) {
        match self.saved.as_ref().map(SavedChats::list) {
            Some(Ok(list)) => (self.emit)(Event::Sessions(list)),
            Some(Err(e)) => (self.emit)(Event::Error(e.to_string())),
            None => (self.emit)(Event::Sessions(Vec::new())),
        }
    }

    fn retitle(&mut self, title: String) {
        if let Some(saved) = &self.saved
            && let Some(id) = saved.id()
        {
            match saved.store().rename(id, &title) {
                Ok(()) => (self.emit)(Event::Titled {
                    id,
                    title: title.clone(),
                }),
                Err(e) => return (self.emit)(Event::Error(e.to_string())),
            }
        }
        self.title = title;
    }

    /// Saves what changed; a conversation gets its row with its first message.
    fn save(&mut self) {
        let (users, title) = (self.user_messages(), self.only_title());
        let Some(saved) = &mut self.saved else { return };
        if saved.id().is_none() {
            if users == 0 {
                return;
            }
            match saved.create(&title, &self.label, self.settings.params) {
                Ok(id) => {
                    self.title = title.clone();
                    (self.emit)(Event::Titled { id, title });
                }
                Err(e) => {
                    return (self.emit)(Event::Error(format!("conversation not saved: {e}")));
                }
            }
        }
        let start = Instant::now();
        match saved.save(&self.messages, self.changed, self.settings.params) {
            Ok(()) => {
                self.changed = self.messages.len();
                (self.emit)(Event::Saved {
                    seconds: start.elapsed().as_secs_f64(),
                });
            }
            Err(e) => (self.emit)(Event::Error(format!("saving failed: {e}"))),
        }
    }

    fn export(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        markdown_title(&mut out, &self.title)?;
        for m in &self.messages {
            markdown_message(&mut out, m.role, &m.content)?;
        }
        out.flush()?;
        Ok(())
    }

    /// The request for a reply to the conversation as it stands.
    fn request_body(&self) -> serde_json::Value {
        let s = &self.settings.sampling;
        let mut body = serde_json::json!({
            "model": self.model,
            "messages": self.messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": self.settings.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        });
        // Only a lambdachat server knows the field (OpenAI's own refuses fields it does not).
        if self.info.is_some() {
            body["lambdachat"] = serde_json::json!({"inspect": true});
        }
        body
    }

    /// Streams the server's reply to the conversation, then saves and refreshes the timeline.
    fn reply(&mut self) {
        self.save();
        let body = self.request_body();
        let emit = self.emit;
        let stats = self.timeline.stats;
        let mut text = String::new();
        let mut pieces = 0usize;
        let mut first: Option<Instant> = None;
        let mut last_progress = Instant::now();
        let mut on_piece = |piece: Piece| match piece {
            Piece::Prefill { done, total } => emit(Event::Prefill { done, total }),
            Piece::Text(t) => {
                let start = *first.get_or_insert_with(Instant::now);
                pieces += 1;
                text.push_str(&t);
                emit(Event::Text(t));
                if last_progress.elapsed() >= PROGRESS_EVERY {
                    last_progress = Instant::now();
                    emit(Event::Progress {
                        generated: pieces,
                        tok_s: tok_s(pieces, start),
                        stats,
                    });
                }
            }
        };
        let streamed = self.client.stream_chat(&body, &self.cancel, &mut on_piece);
        let tok_s = first.map_or(0.0, |start| tok_s(pieces, start));
        match streamed {
            Ok(end) => {
                let server_tok_s = end.server_tok_s();
                let StreamEnd {
                    finish,
                    usage,
                    cancelled,
                    ..
                } = end;
                // Whatever came is the reply, a stopped one included: the conversation goes
                // on from what the user saw.
                self.messages.push(Message::new(Role::Assistant, text));
                let (prompt_tokens, generated) =
                    usage.map_or((0, pieces), |(p, c)| (p as usize, c as usize));
                let stop = if cancelled {
                    StopReason::Cancelled
                } else if finish.as_deref() == Some("length") {
                    StopReason::Length
                } else {
                    StopReason::EndOfTurn
                };
                emit(Event::Finished {
                    stop,
                    prompt_tokens,
                    generated,
                    tok_s: server_tok_s.unwrap_or(tok_s),
                    replied: true,
                });
            }
            Err(e) => {
                if !text.is_empty() {
                    self.messages.push(Message::new(Role::Assistant, text));
                }
                let retry = if e.status() == Some(429) {
                    " (the server is busy)"
                } else {
                    ""
                };
                emit(Event::Error(format!(
                    "{e}{retry}; /regen sends the conversation again"
                )));
            }
        }
        self.save();
        self.refresh_timeline();
    }

    /// Asks a lambdachat server for the conversation's Λ after a reply or a change.
    fn refresh_timeline(&mut self) {
        if self.info.is_none() {
            // Nothing is known of the server's cache: no message is shown as evicted.
            return;
        }
        if self.messages.iter().any(|m| m.role == Role::Assistant) {
            self.look(Look::Timeline);
        } else {
            self.timeline.message_count = self.messages.len();
            (self.emit)(Event::Timeline(self.timeline.clone()));
        }
    }

    /// A look through lambdachat's extension: pins, inspect mode and the timeline.
    fn look(&mut self, look: Look) {
        if self.info.is_none() {
            let what = match look {
                Look::Pin(_) | Look::Unpin(_) => "pins need",
                Look::Inspect(_) => "inspect mode needs",
                Look::Timeline => "the attention view needs",
            };
            return (self.emit)(Event::Error(format!(
                "{what} a lambdachat server; {} does not say what its cache holds",
                self.client.base()
            )));
        }
        let request = LookRequest {
            messages: self.messages.clone(),
            look,
        };
        match self.client.look(&request) {
            Ok(Some(looked)) => self.looked(look, looked),
            Ok(None) if look == Look::Timeline => {
                // The server holds no such conversation (a stopped reply, say): it reads it
                // with the next message. Until then nothing is in its cache.
                self.timeline = self.empty_timeline();
                (self.emit)(Event::Timeline(self.timeline.clone()));
            }
            Ok(None) => (self.emit)(Event::Error(
                "the server holds this conversation no more; it reads it again with your next \
                 message"
                    .into(),
            )),
            Err(e) => (self.emit)(Event::Error(e.to_string())),
        }
    }

    fn looked(&mut self, look: Look, looked: Looked) {
        let Looked {
            timeline,
            inspect,
            pinned,
        } = looked;
        match (look, pinned, inspect) {
            (Look::Pin(_), Some((0, _)), _) => (self.emit)(Event::Notice(Notice::NothingToPin)),
            (Look::Pin(_), Some((tokens, lost)), _) => {
                (self.emit)(Event::Notice(Notice::Pinned { tokens, lost }))
            }
            (Look::Unpin(_), _, _) => (self.emit)(Event::Notice(Notice::Unpinned)),
            (_, _, Some(view)) => (self.emit)(Event::Inspect(view)),
            _ => {}
        }
        self.timeline = timeline;
        (self.emit)(Event::Timeline(self.timeline.clone()));
    }
}

/// A model id as the title bar shows it: llama-server lists a model by its file's path, vLLM by
/// `ORG/NAME`; the last part says which model it is.
fn shown_name(id: &str) -> &str {
    id.rsplit('/').find(|part| !part.is_empty()).unwrap_or(id)
}

fn tok_s(pieces: usize, since: Instant) -> f64 {
    pieces as f64 / since.elapsed().as_secs_f64().max(1e-6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_shown_by_their_last_part() {
        assert_eq!(
            shown_name("/models/qwen2.5-coder-0.5b.gguf"),
            "qwen2.5-coder-0.5b.gguf"
        );
        assert_eq!(
            shown_name("Qwen/Qwen2.5-7B-Instruct"),
            "Qwen2.5-7B-Instruct"
        );
        assert_eq!(shown_name("llama3.2:latest"), "llama3.2:latest");
        assert_eq!(shown_name("odd/"), "odd");
    }
}
