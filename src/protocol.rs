//! The seam between the chat's front end and the engine behind it: the [`Command`]s a front end
//! sends, the [`Event`]s it receives, and everything they carry, as plain data (no tensors, no
//! handles, no English the engine wrote for a particular screen).
//!
//! The TUI imports this module and the config, never the session, store, engine, attention or
//! model: the few plain types of those it shows (Λ parameters, cache counters, sampling
//! settings, messages) are re-exported here as part of the protocol's vocabulary. The local
//! worker (`crate::worker`) is one side of it; a remote backend is another.

use std::ops::Range;
use std::path::PathBuf;

pub use crate::attention::recall::RecallParams;
pub use crate::attention::{CacheStats, KvType, LambdaParams, window_start};
pub use crate::chat::{Message, Role, code_blocks};
pub use crate::sampling::SamplingParams;

/// A running engine as a front end drives it. Commands are carried out in order; a stop request
/// overtakes them (the queue is busy while a reply streams). Events come back on the channel
/// the front end handed over when it started the engine ([`Start`]).
pub trait Backend {
    fn send(&self, command: Command);
    /// Stops the reply or prefill in progress at once (what was written stays).
    fn cancel(&self);
}

/// An engine on a thread of its own (the local worker, the remote backend): commands queue on a
/// channel and are carried out in order; a stop goes through a flag the engine checks between
/// tokens (and between prefill chunks), as the queue is busy while a reply streams.
pub struct EngineThread {
    pub commands: std::sync::mpsc::Sender<Command>,
    pub cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub thread: std::thread::JoinHandle<()>,
}

impl Backend for EngineThread {
    fn send(&self, command: Command) {
        // An engine that has stopped already reported why.
        let _ = self.commands.send(command);
    }

    fn cancel(&self) {
        self.cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts an engine that reports on the given channel.
pub type Start = Box<dyn FnOnce(EventSender) -> std::io::Result<Box<dyn Backend>>>;

/// Where an engine sends its events.
pub type EventSender = tokio::sync::mpsc::UnboundedSender<Event>;

/// What the front end asks of the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// A user message: prefill it and stream a reply.
    Send(String),
    /// The last user message edited: take back it and its reply (the cache rewound to before
    /// it), then send this one in its place.
    ReplaceLast(String),
    /// Replace the last reply with a new one.
    Regenerate,
    SetSampling(SamplingParams),
    /// New Λ parameters: the cache is rebuilt and the history fed again.
    SetLambda(LambdaParams),
    SetMaxTokens(usize),
    /// Replace the system prompt (applies to what is fed from now on).
    SetSystem(String),
    /// Raw text continuation (no chat template) on or off: for this conversation when it has
    /// not started, and for new ones.
    SetRaw(bool),
    /// Pin message `i` (0-based): its tokens stay attended.
    Pin(usize),
    Unpin(usize),
    /// Token-by-token view of message `i`.
    Inspect(usize),
    /// The `count` messages before message `before` (scrolling up past what is loaded).
    LoadMessages {
        before: usize,
        count: usize,
    },
    /// Save the session with its KV snapshot now.
    Save,
    /// Write the conversation as Markdown to a file.
    Export(PathBuf),
    NewSession,
    OpenSession(i64),
    ListSessions,
    RenameSession(i64, String),
    DeleteSession(i64),
    /// Save and stop.
    Shutdown,
}

/// What the engine tells the front end.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Loading or fetching the model.
    Loading(String),
    /// The model is loaded; a conversation is open.
    Ready {
        model: String,
        settings: Settings,
    },
    /// The model could not be loaded: the reason and what to do.
    LoadFailed {
        reason: String,
        hint: String,
    },
    /// A conversation was opened (new or resumed): its title, its message count and its last
    /// messages (older ones come with [`Command::LoadMessages`]).
    Opened {
        id: Option<i64>,
        title: String,
        total: usize,
        messages: Vec<ShownMessage>,
    },
    /// Messages asked for with [`Command::LoadMessages`], in order.
    Messages(Vec<ShownMessage>),
    /// The open conversation got its database id and title (with its first message).
    Titled {
        id: i64,
        title: String,
    },
    Prefill {
        done: usize,
        total: usize,
    },
    Text(String),
    /// Counters while generating.
    Progress {
        generated: usize,
        tok_s: f64,
        stats: CacheStats,
    },
    /// The reply ended.
    Finished {
        stop: StopReason,
        prompt_tokens: usize,
        generated: usize,
        tok_s: f64,
        /// Whether an assistant message was added (not when stopped during the prompt).
        replied: bool,
    },
    /// The history of a resumed conversation (or one with new Λ parameters) was fed again.
    HistoryRead {
        tokens: usize,
    },
    /// The regenerated reply starts: the front end drops the last assistant message.
    Regenerating,
    /// The last exchange was taken back for `text`, whose reply follows.
    TakenBack {
        text: String,
    },
    /// The last exchange cannot be taken back any more (the cache's state before it is gone:
    /// the conversation was opened since, or a pin changed the cache); `text` was not sent.
    NotTakenBack {
        text: String,
    },
    Timeline(Timeline),
    Inspect(InspectView),
    Sessions(Vec<SessionSummary>),
    Settings(Settings),
    /// The conversation was saved (after a turn, a resume or on request), in `seconds`.
    Saved {
        seconds: f64,
    },
    /// Something worth telling the user; the front end words it.
    Notice(Notice),
    Error(String),
    /// The engine has stopped (after `Shutdown`, everything saved).
    Stopped,
}

/// What happened, for the status line: typed, so the words (and the commands they suggest)
/// belong to the front end.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// `Regenerate` arrived before any reply.
    NothingToRegenerate,
    /// The system prompt was set: for this conversation (it had not started), or for new ones.
    SystemPromptSet {
        this_conversation: bool,
    },
    /// Raw mode was set: for this conversation too, or (it had started in the other mode) for
    /// new ones only.
    RawSet {
        on: bool,
        this_conversation: bool,
    },
    /// The model brought no chat template: its turns are written in `format`, which a base
    /// model was never taught.
    NoOwnTemplate {
        format: &'static str,
    },
    /// A message was pinned: `tokens` of it, `lost` of which had already been evicted.
    Pinned {
        tokens: u64,
        lost: u64,
    },
    /// The message to pin has no tokens in the model yet.
    NothingToPin,
    Unpinned,
    Exported(PathBuf),
    /// A resume was asked for, and there is no saved conversation.
    NoSessionToResume,
    /// New Λ parameters; the history is being fed again.
    LambdaChanged {
        n_global: usize,
        n_local: usize,
    },
    /// A saved conversation was opened: continued from its KV snapshot, or its history is
    /// being fed again.
    Resumed {
        title: String,
        from_snapshot: bool,
    },
    /// A conversation saved through `--connect` was opened: the server still holds it (its
    /// cache goes on), or reads it anew with the next message.
    ResumedRemote {
        title: String,
        held: bool,
    },
}

/// A message as a front end shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShownMessage {
    /// Its index in the conversation.
    pub index: usize,
    pub role: Role,
    pub content: String,
    /// Code blocks in the messages before it (blocks are numbered across the conversation).
    pub code_before: usize,
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StopReason {
    /// The model ended its turn.
    EndOfTurn,
    /// `max_tokens` was reached.
    Length,
    /// The caller cancelled (Esc, Ctrl-C).
    Cancelled,
}

/// Whether a token is attended by the next query, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TokenState {
    /// One of the first `n_global` tokens (attention sinks), outside the window.
    Global,
    /// Pinned by the user, outside the window.
    Pinned,
    /// Inside the window of the last `n_local` tokens.
    Window,
    /// Left the Λ: nothing attends to it any more.
    Evicted,
    /// Left the Λ, attended again by the next token through recall (in the first recalling
    /// layer; docs/ALGORITHM.md §10).
    Recalled,
}

/// The state of one message's characters, for dimming evicted text.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MessageMap {
    /// The message's index in the conversation.
    pub index: usize,
    /// Token positions of the message's content.
    pub tokens: Range<u64>,
    /// Byte ranges of the content and the state of their tokens, in order.
    pub segments: Vec<(Range<usize>, TokenState)>,
}

/// What the next query attends to, over the whole conversation.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timeline {
    /// The cache's counters, the next query's window start among them.
    pub stats: CacheStats,
    pub n_global: u64,
    pub n_local: u64,
    pub pinned: Vec<Range<u64>>,
    /// Evicted positions recall brings back for the next token (first recalling layer).
    pub recalled: Vec<Range<u64>>,
    /// Messages in the conversation.
    pub message_count: usize,
    /// The messages the Λ treats unevenly (tokens among the sinks, in the window or pinned)
    /// and the last exchange, by index; every other message is wholly evicted.
    pub messages: Vec<MessageMap>,
}

/// One token in the inspect view.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenInfo {
    pub position: u64,
    pub id: u32,
    pub text: String,
    pub state: TokenState,
    /// Share of attention the last generated token gave it (mean over heads and layers).
    pub share: f32,
}

/// A message's tokens as the model holds them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InspectView {
    pub message: usize,
    pub tokens: Vec<TokenInfo>,
}

/// Settings the front end shows and edits.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub params: LambdaParams,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Recall's parameters when it is on (the status bar then counts recalled tokens).
    pub recall: Option<RecallParams>,
    /// How the cache holds keys and values (the status bar names it beside the KV size).
    pub kv_type: KvType,
    /// The open conversation continues raw text (no chat template).
    pub raw: bool,
    /// The engine says what its cache attends (the visualizer, inspect mode, pins): the local
    /// worker and a lambdachat server do; another OpenAI-compatible server does not.
    pub attention_view: bool,
    /// The server chatted through (`--connect`), when the engine is remote.
    pub server: Option<String>,
}

/// One line of the session list.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSummary {
    pub id: i64,
    pub title: String,
    pub model: String,
    pub messages: usize,
    /// Seconds since the Unix epoch.
    pub updated: i64,
}

/// What `GET /lambdachat/v1/info` answers: a lambdachat server's Λ, for a front end connected
/// with `--connect` (another OpenAI-compatible server has no such route).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServerInfo {
    pub model: String,
    pub n_global: usize,
    pub n_local: usize,
    pub distance_limit: u64,
    /// How the server's caches hold keys and values (`f32`, `f16`).
    pub kv_type: String,
    /// The longest reply a request may ask for.
    pub max_tokens: usize,
}

/// `POST /lambdachat/v1/conversation`: a look at (or a pin in) the conversation a lambdachat
/// server holds for `messages` exactly (every reply as the server sent it), found as a request
/// that continues it would find it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LookRequest {
    pub messages: Vec<Message>,
    pub look: Look,
}

/// What to do with the conversation; message indices count the system prompt as message 0
/// when there is one, as the chat's do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Look {
    Timeline,
    Inspect(usize),
    Pin(usize),
    Unpin(usize),
}

/// The answer to a [`LookRequest`]: the conversation's timeline after the look, and what the
/// look asked for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Looked {
    pub timeline: Timeline,
    #[serde(default)]
    pub inspect: Option<InspectView>,
    /// A pin's tokens and how many of them had already been evicted (0 tokens: the message
    /// has none in the model).
    #[serde(default)]
    pub pinned: Option<(u64, u64)>,
}
