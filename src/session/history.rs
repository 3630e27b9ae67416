//! Where a conversation lives beyond what the session keeps in memory. The session holds the
//! cache, the bookkeeping of what it attends, and a bounded tail of messages; everything else —
//! every message, every token with the byte it starts at, the cache piece by piece — goes to a
//! [`History`]: the store's (SQLite and a KV file, `crate::store`), or [`MemoryHistory`] for
//! one-shot commands and tests, which keeps it all in memory.

use std::ops::Range;

use candle_core::Device;

use crate::attention::{KvCache, LambdaParams, LayerGeometry};
use crate::chat::Role;

/// A message and where it sits in the conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MessageRecord {
    pub index: usize,
    pub role: Role,
    pub content: String,
    /// Token positions of its content.
    pub tokens: Range<u64>,
    /// Byte range of its content in the conversation's fed text (the rendered template and the
    /// replies, as fed).
    pub span: Range<u64>,
    /// Code blocks in the messages before it, so they are numbered the same wherever the
    /// conversation is shown from.
    pub code_before: usize,
}

/// Where a message sits, without its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessagePlace {
    pub index: usize,
    pub tokens: (u64, u64),
    pub span: (u64, u64),
}

impl MessageRecord {
    pub fn place(&self) -> MessagePlace {
        MessagePlace {
            index: self.index,
            tokens: (self.tokens.start, self.tokens.end),
            span: (self.span.start, self.span.end),
        }
    }
}

/// Token ids from position `first` on, each with the byte of the fed text where it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRun {
    pub first: u64,
    pub ids: Vec<u32>,
    pub offsets: Vec<u64>,
}

impl TokenRun {
    pub fn starting_at(first: u64) -> Self {
        Self {
            first,
            ..Self::default()
        }
    }

    /// Position after the last token.
    pub fn end(&self) -> u64 {
        self.first + self.ids.len() as u64
    }

    pub fn push(&mut self, id: u32, offset: u64) {
        self.ids.push(id);
        self.offsets.push(offset);
    }

    /// The part of the run inside `positions`.
    pub fn slice(&self, positions: Range<u64>) -> TokenRun {
        let from = positions.start.clamp(self.first, self.end());
        let to = positions.end.clamp(from, self.end());
        let (a, b) = ((from - self.first) as usize, (to - self.first) as usize);
        TokenRun {
            first: from,
            ids: self.ids[a..b].to_vec(),
            offsets: self.offsets[a..b].to_vec(),
        }
    }

    /// Drops the tokens from position `end` on.
    pub fn truncate(&mut self, end: u64) {
        let keep = end.saturating_sub(self.first).min(self.ids.len() as u64) as usize;
        self.ids.truncate(keep);
        self.offsets.truncate(keep);
    }

    /// Appends `other`, which must start where this run ends.
    pub fn extend(&mut self, other: &TokenRun) {
        debug_assert_eq!(other.first, self.end());
        self.ids.extend_from_slice(&other.ids);
        self.offsets.extend_from_slice(&other.offsets);
    }
}

/// What a session is between turns besides its messages, tokens and cache: all of it bounded
/// (the tail is the last exchange), and what a resume starts from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SessionHead {
    pub n_global: usize,
    pub n_local: usize,
    pub distance_limit: u64,
    /// Tokens run through the model (the cache's next position).
    pub tokens_fed: u64,
    /// Tokens recorded, fed or pending: the next token's position.
    pub token_count: u64,
    /// Tokens recorded but not fed, fed first by the next turn: the last token of a reply, or
    /// the rest of a prompt whose prefill was cancelled.
    pub pending: Vec<u32>,
    /// Recent tokens for the repeat penalty.
    pub recent: Vec<u32>,
    pub message_count: usize,
    /// Code blocks in all messages.
    pub code_count: usize,
    /// Bytes of fed text so far.
    pub fed_len: u64,
    /// The system prompt (message 0 when set), rendered at the start of every turn's template.
    pub system: Option<String>,
    /// The last exchange (from the last user message on): what the next turn renders.
    pub tail: Vec<MessageRecord>,
    /// The fed text from the start of the tail's first message's content (at `fed_tail_start`).
    pub fed_tail: String,
    pub fed_tail_start: u64,
    /// Pinned token ranges, sorted and disjoint.
    pub pinned: Vec<(u64, u64)>,
    /// The fingerprint of the model whose cache was saved with this head (see
    /// `Engine::fingerprint`): another model's resume reads the window again instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Raw text continuation: no chat template; each message's text follows the last as it is
    /// (a base model's way). Set before the first turn and kept for the conversation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw: bool,
}

impl SessionHead {
    pub fn new(params: LambdaParams, system: Option<String>) -> Self {
        Self {
            n_global: params.n_global,
            n_local: params.n_local,
            distance_limit: params.distance_limit,
            tokens_fed: 0,
            token_count: 0,
            pending: Vec::new(),
            recent: Vec::new(),
            message_count: 0,
            code_count: 0,
            fed_len: 0,
            system,
            tail: Vec::new(),
            fed_tail: String::new(),
            fed_tail_start: 0,
            pinned: Vec::new(),
            model: None,
            raw: false,
        }
    }

    /// A head read back, as a resume may trust it: its counts in order (or an error), and its
    /// pins clipped to the conversation, sorted and merged. A head is a file someone may have
    /// edited: a pin of 2^62 positions once hung the resume that walked it. Pins past the end
    /// are clipped rather than refused, as a pinned reply that was then regenerated shorter
    /// leaves one.
    pub fn checked(mut self) -> Result<Self, String> {
        use crate::attention::MAX_POSITION;
        if self.token_count > MAX_POSITION {
            return Err(format!(
                "{} tokens recorded, past the limit of {MAX_POSITION}",
                self.token_count
            ));
        }
        if self.tokens_fed > self.token_count {
            return Err(format!(
                "{} tokens fed of {} recorded",
                self.tokens_fed, self.token_count
            ));
        }
        let count = self.token_count;
        let mut pins: Vec<(u64, u64)> = self
            .pinned
            .iter()
            .map(|&(start, end)| (start, end.min(count)))
            .filter(|(start, end)| start < end)
            .collect();
        pins.sort_unstable();
        self.pinned = Vec::with_capacity(pins.len());
        for (start, end) in pins {
            match self.pinned.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => self.pinned.push((start, end)),
            }
        }
        Ok(self)
    }

    pub fn params(&self) -> Result<LambdaParams, crate::attention::ParamsError> {
        LambdaParams::new(self.n_global, self.n_local, Some(self.distance_limit))
    }
}

/// What a save appends: the messages and tokens recorded since the last one, and the head.
pub struct Batch<'a> {
    /// Drop every message from this index and every token from this position first (a
    /// regenerated reply replaces the old one).
    pub truncate: Option<(usize, u64)>,
    pub messages: &'a [MessageRecord],
    pub tokens: &'a TokenRun,
    pub head: &'a SessionHead,
}

/// What a history read from its KV store.
pub enum SavedKv {
    /// A whole cache at this position (the head's `tokens_fed` or earlier: the tokens after it
    /// are fed again from the history).
    Cache(u64, KvCache),
    /// Nothing usable: the window is read again from the tokens.
    Nothing(String),
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{0}")]
    Store(String),
    #[error("the history has no {0}")]
    Missing(String),
}

/// Where a conversation lives beyond the session's memory.
pub trait History: Send {
    /// The head saved last, if any (a resume starts from it).
    fn head(&self) -> Result<Option<SessionHead>, HistoryError>;

    /// Appends a batch in one transaction: after a crash the history holds all of it or none.
    fn append(&mut self, batch: &Batch<'_>) -> Result<(), HistoryError>;

    /// Saves the cache's slots of `positions` (in order), with any earlier position of the
    /// window ending there that the store does not hold, and, when given, its global stores;
    /// the KV store is then whole at `positions.end`. With `restart`, everything saved before
    /// is dropped first (new Λ parameters).
    fn save_kv(
        &mut self,
        cache: &KvCache,
        positions: Range<u64>,
        globals: Option<&[u8]>,
        restart: bool,
    ) -> Result<(), HistoryError>;

    /// Forgets, durably, the cache's slots from `position` on: called before a batch that
    /// truncates the conversation there is appended, so that no crash pairs the new tokens
    /// with the old ones' keys and values.
    fn forget_kv_from(&mut self, position: u64) -> Result<(), HistoryError>;

    /// The saved cache, rebuilt for `layers` under `params` on `device`.
    fn load_kv(
        &self,
        params: LambdaParams,
        layers: Vec<LayerGeometry>,
        device: &Device,
    ) -> Result<SavedKv, HistoryError>;

    /// Messages `range` (by index), in order.
    fn messages(&self, range: Range<usize>) -> Result<Vec<MessageRecord>, HistoryError>;

    /// Where the messages sit whose tokens overlap `positions`, in order.
    fn places(&self, positions: Range<u64>) -> Result<Vec<MessagePlace>, HistoryError>;

    /// The tokens of `positions` the history holds.
    fn tokens(&self, positions: Range<u64>) -> Result<TokenRun, HistoryError>;
}

/// A history in memory: every message and token, no KV store (a resume re-reads the window).
/// For commands that run one conversation and end (`ask`, the plain chat, benchmarks, tests).
#[derive(Default)]
pub struct MemoryHistory {
    head: Option<SessionHead>,
    messages: Vec<MessageRecord>,
    tokens: TokenRun,
}

impl History for MemoryHistory {
    fn head(&self) -> Result<Option<SessionHead>, HistoryError> {
        Ok(self.head.clone())
    }

    fn append(&mut self, batch: &Batch<'_>) -> Result<(), HistoryError> {
        if let Some((messages, tokens)) = batch.truncate {
            self.messages.truncate(messages);
            self.tokens.truncate(tokens);
        }
        self.messages.extend_from_slice(batch.messages);
        self.tokens.extend(batch.tokens);
        self.head = Some(batch.head.clone());
        Ok(())
    }

    fn save_kv(
        &mut self,
        _: &KvCache,
        _: Range<u64>,
        _: Option<&[u8]>,
        _: bool,
    ) -> Result<(), HistoryError> {
        Ok(())
    }

    fn forget_kv_from(&mut self, _: u64) -> Result<(), HistoryError> {
        Ok(())
    }

    fn load_kv(
        &self,
        _: LambdaParams,
        _: Vec<LayerGeometry>,
        _: &Device,
    ) -> Result<SavedKv, HistoryError> {
        Ok(SavedKv::Nothing("kept in memory only".into()))
    }

    fn messages(&self, range: Range<usize>) -> Result<Vec<MessageRecord>, HistoryError> {
        let end = range.end.min(self.messages.len());
        Ok(self.messages[range.start.min(end)..end].to_vec())
    }

    fn places(&self, positions: Range<u64>) -> Result<Vec<MessagePlace>, HistoryError> {
        Ok(self
            .messages
            .iter()
            .filter(|m| m.tokens.start < positions.end && positions.start < m.tokens.end)
            .map(MessageRecord::place)
            .collect())
    }

    fn tokens(&self, positions: Range<u64>) -> Result<TokenRun, HistoryError> {
        Ok(self.tokens.slice(positions))
    }
}
