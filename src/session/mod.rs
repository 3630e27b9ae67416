//! A conversation: the Λ cache that holds what the model still attends to, the bookkeeping that
//! lets each turn feed only its new tokens, and a bounded tail of it in memory — everything
//! older lives in a [`History`] (the store's, or one in memory).
//!
//! The history is never prefilled again: a turn renders the chat template over the system
//! prompt, the last exchange and the new message (`render.rs`), keeps only the text after what
//! was already fed, and tokenizes that. So the work of a turn, its memory and its time to first
//! token depend on the new message and the window, not on the conversation's length.

mod history;
mod render;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Tensor;

pub use history::{
    Batch, History, HistoryError, MemoryHistory, MessagePlace, MessageRecord, SavedKv, SessionHead,
    TokenRun,
};
pub use render::TemplateMode;

use crate::attention::{
    AttentionCache, AttentionError, CacheStats, HostCache, KvCache, LambdaParams, ParamsError,
    RewindPoint, SnapshotError,
    recall::{Recall, RecallParams, RecallStats},
};
use crate::chat::{Message, Role, TemplateError, code_blocks};
use crate::engine::Engine;
use crate::error::candle_msg;
use crate::model::{Logits, ModelError};
use crate::protocol::{
    InspectView, MessageMap, Notice, StopReason, Timeline, TokenInfo, TokenState,
};
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use crate::tokenizer::{TextStream, TokenizerError};
use render::{TemplateCheck, common_prefix_len, locate};

/// Tokens per prefill forward: bounds the temporary memory of a long paste.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("logits: {0}")]
    Logits(String),
    #[error(transparent)]
    Attention(#[from] AttentionError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("the saved conversation is damaged: {0}")]
    Damaged(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl From<ParamsError> for SessionError {
    fn from(e: ParamsError) -> Self {
        Self::Damaged(e.to_string())
    }
}

/// What one turn did, for `--verbose` and the status bar.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TurnReport {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub stop: StopReason,
    pub reply: String,
}

impl TurnReport {
    pub fn decode_tok_s(&self) -> f64 {
        self.generated_tokens as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }

    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
}

/// What a turn reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEvent<'a> {
    /// `done` of `total` prompt tokens have been run through the model.
    Prefill { done: usize, total: usize },
    /// New reply text.
    Text(&'a str),
    /// The cache after a prompt chunk or a generated token went through the model.
    Stats(CacheStats),
}

/// How a resumed conversation got its cache back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    /// From the saved cache; `refeed` tokens after it are fed again by [`Session::catch_up`].
    Saved { refeed: u64 },
    /// The saved cache could not be used (the reason): [`Session::catch_up`] reads the sinks,
    /// the pins and the window again from the history.
    Reread(String),
}

/// What the history has not received yet.
struct Unsaved {
    /// Messages from this index and tokens from this position are to be dropped from the
    /// history first (a regenerated reply).
    truncate: Option<(usize, u64)>,
    messages: Vec<MessageRecord>,
    tokens: TokenRun,
}

impl Unsaved {
    fn at(tokens: u64) -> Self {
        Self {
            truncate: None,
            messages: Vec::new(),
            tokens: TokenRun::starting_at(tokens),
        }
    }
}

/// Where the history's KV store stands.
struct KvSaved {
    /// The KV store is whole at this position.
    upto: u64,
    /// The global stores' version saved last.
    globals: Option<u64>,
    /// The next save writes the whole window again (new parameters).
    restart: bool,
    /// The next save first makes the KV store forget the slots from here on (a regenerated
    /// reply takes their positions).
    forget_from: Option<u64>,
}

impl KvSaved {
    fn none() -> Self {
        Self {
            upto: 0,
            globals: None,
            restart: true,
            forget_from: None,
        }
    }
}

/// The state after a prompt's prefill, kept so `regenerate` can draw another reply: the cache's
/// rewind point (which logs only what the reply overwrites), the head and the logits.
struct Regen {
    point: RewindPoint,
    head: SessionHead,
    logits: Tensor,
    /// The state before the prompt (a point set before the reply's), kept so the whole
    /// exchange can be taken back.
    before_prompt: (RewindPoint, SessionHead),
}

/// What a turn renders: see [`Session::rendered_messages`].
struct Rendered {
    render: Vec<Message>,
    located: Vec<Message>,
    anchor: Option<usize>,
}

/// How a turn's prompt went.
enum Prefilled {
    /// Fed whole: the last token's logits and the prompt's length.
    Ready(Tensor, usize),
    /// Stopped after this many tokens.
    Stopped(usize),
}

/// What a failed turn puts back.
struct Checkpoint {
    head: SessionHead,
    messages: usize,
    tokens: u64,
}

pub struct Session {
    engine: Arc<Engine>,
    cache: KvCache,
    sampler: Sampler,
    history: Box<dyn History>,
    head: SessionHead,
    unsaved: Unsaved,
    kv: KvSaved,
    regen: Option<Regen>,
    template: TemplateMode,
    /// Tokens per prefill forward of a turn: smaller chunks answer a cancel sooner.
    prefill_chunk: usize,
    /// Recall of evicted tokens (docs/ALGORITHM.md §10) and the folder of its stores: every
    /// cache the session makes gets a fresh store there.
    recall: Option<(RecallParams, PathBuf)>,
}

impl Session {
    /// A new conversation whose history is kept in memory.
    pub fn new(
        engine: Arc<Engine>,
        params: LambdaParams,
        sampling: SamplingParams,
        system: Option<String>,
    ) -> Result<Self, SessionError> {
        Self::with_history(
            engine,
            params,
            sampling,
            system,
            Box::new(MemoryHistory::default()),
        )
    }

    /// A new conversation kept in `history`.
    pub fn with_history(
        engine: Arc<Engine>,
        params: LambdaParams,
        sampling: SamplingParams,
        system: Option<String>,
        history: Box<dyn History>,
    ) -> Result<Self, SessionError> {
        let cache = engine.empty_cache(params);
        let mut session = Self {
            template: template_mode(&engine, system.as_deref()),
            cache,
            sampler: Sampler::new(sampling)?,
            history,
            head: SessionHead::new(params, None),
            unsaved: Unsaved::at(0),
            kv: KvSaved::none(),
            regen: None,
            prefill_chunk: PREFILL_CHUNK,
            recall: None,
            engine,
        };
        if let Some(s) = system {
            session.set_system(s);
        }
        Ok(session)
    }

    /// Moves a conversation that has saved nothing yet onto `history` (a store's, once the
    /// conversation gets its row there).
    pub fn attach_history(&mut self, history: Box<dyn History>) {
        self.history = history;
        self.kv = KvSaved::none();
    }

    /// Resumes the conversation saved in `history`. The cache comes from the history's KV store
    /// when it has a whole one; [`Self::catch_up`] then feeds what the store lacks (the tokens
    /// after it, or — with no usable store — the sinks, pins and window again).
    pub fn resume(
        engine: Arc<Engine>,
        sampling: SamplingParams,
        history: Box<dyn History>,
    ) -> Result<(Self, Resumed), SessionError> {
        let head = history
            .head()?
            .ok_or_else(|| SessionError::Damaged("no saved state".into()))?
            .checked()
            .map_err(SessionError::Damaged)?;
        // Saved parameters get the cap a new conversation gets: never past the training length.
        let saved = head.params()?;
        let cap = engine.model.info().context_length;
        let params = LambdaParams::new(
            saved.n_global.min(cap),
            saved.n_local.min(cap),
            Some(saved.distance_limit.min(cap as u64)),
        )?;
        let layers = engine.model.layer_geometry(params);
        let mut session = Self {
            template: template_mode(&engine, head.system.as_deref()),
            cache: engine.empty_cache(params),
            sampler: Sampler::new(sampling)?,
            unsaved: Unsaved::at(head.token_count),
            kv: KvSaved::none(),
            regen: None,
            prefill_chunk: PREFILL_CHUNK,
            recall: None,
            head,
            history,
            engine,
        };
        let saved_by = session.head.model.clone();
        let loaded = match saved_by {
            Some(m) if m == session.engine.fingerprint => {
                session
                    .history
                    .load_kv(params, layers, &session.engine.device)?
            }
            Some(_) => SavedKv::Nothing(
                "the saved cache was made by another model file (other weights of the same \
                 shape)"
                    .into(),
            ),
            None => SavedKv::Nothing("the saved cache does not name the model that made it".into()),
        };
        let resumed = match loaded {
            SavedKv::Cache(at, cache)
                if params == saved && at <= session.head.tokens_fed && at > 0 =>
            {
                session.kv = KvSaved {
                    upto: at,
                    globals: Some(cache.globals_version()),
                    restart: false,
                    forget_from: None,
                };
                session.cache = cache;
                // A cache saved as another type (the setting changed since) is converted.
                session.cache.set_kv_type(session.engine.kv_type);
                Resumed::Saved {
                    refeed: session.head.tokens_fed - at,
                }
            }
            SavedKv::Cache(..) if params != saved => {
                Resumed::Reread("the Λ parameters were capped at the training length".into())
            }
            SavedKv::Cache(at, _) => Resumed::Reread(format!(
                "the saved cache is at token {at}, the conversation at {}",
                session.head.tokens_fed
            )),
            SavedKv::Nothing(why) => Resumed::Reread(why),
        };
        session.head.n_global = params.n_global;
        session.head.n_local = params.n_local;
        session.head.distance_limit = params.distance_limit;
        Ok((session, resumed))
    }

    /// Turns recall on (with its parameters and the folder of its store) or off. The tokens
    /// evicted from now on can be recalled; those evicted before are not (the store starts
    /// empty, and a resumed conversation starts a new one).
    pub fn set_recall(
        &mut self,
        recall: Option<(RecallParams, PathBuf)>,
    ) -> Result<(), SessionError> {
        self.recall = recall;
        self.install_recall()
    }

    /// What recall holds and did (zeros when it is off).
    pub fn recall_stats(&self) -> RecallStats {
        self.cache.recall_stats()
    }

    /// The first failure of the recall store (a full disk, say), if any: recall then stopped
    /// growing and choosing, the conversation goes on without it.
    pub fn recall_failure(&self) -> Option<String> {
        self.cache.recall_failure()
    }

    /// Recall's parameters, when it is on.
    pub fn recall(&self) -> Option<RecallParams> {
        self.recall.as_ref().map(|(p, _)| *p)
    }

    /// Gives the current cache a fresh recall store, when recall is on.
    fn install_recall(&mut self) -> Result<(), SessionError> {
        let Some((params, dir)) = &self.recall else {
            return Ok(());
        };
        let layers = self.engine.model.layer_geometry(self.params());
        self.cache
            .set_recall(Recall::temporary_in(*params, &layers, dir))?;
        Ok(())
    }

    /// Sets the tokens per prefill forward of a turn (at least 1).
    pub fn set_prefill_chunk(&mut self, tokens: usize) {
        self.prefill_chunk = tokens.max(1);
    }

    /// How turns are rendered (see `render.rs`).
    pub fn template_mode(&self) -> TemplateMode {
        self.template
    }

    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    pub fn params(&self) -> LambdaParams {
        self.cache.params()
    }

    pub fn set_sampling(&mut self, params: SamplingParams) -> Result<(), SessionError> {
        self.sampler = Sampler::new(params)?;
        Ok(())
    }

    /// Makes the cache record attention shares of each decoded token (for the inspect view).
    pub fn set_probe(&mut self, on: bool) {
        self.cache.set_probe(on);
    }

    /// Messages in the conversation.
    pub fn message_count(&self) -> usize {
        self.head.message_count
    }

    /// Tokens recorded, fed or pending: the next token's position.
    pub fn token_count(&self) -> u64 {
        self.head.token_count
    }

    /// Tokens recorded but not yet run through the model.
    pub fn pending(&self) -> &[u32] {
        &self.head.pending
    }

    /// Sets the system prompt of a conversation that has not started yet. Once tokens were
    /// fed, the old prompt is part of the cache: then nothing changes and `false` is returned.
    pub fn set_system(&mut self, text: String) -> bool {
        if self.head.token_count > 0 {
            return false;
        }
        let record = MessageRecord {
            index: 0,
            role: Role::System,
            content: text.clone(),
            tokens: 0..0,
            span: 0..0,
            code_before: 0,
        };
        match self.unsaved.messages.first_mut() {
            Some(m) if m.role == Role::System => *m = record,
            _ => {
                for m in &mut self.unsaved.messages {
                    m.index += 1;
                }
                self.unsaved.messages.insert(0, record);
                self.head.message_count += 1;
            }
        }
        self.head.code_count = self
            .unsaved
            .messages
            .iter()
            .map(|m| code_blocks(&m.content).len())
            .sum();
        self.template = template_mode(&self.engine, Some(&text));
        self.head.system = Some(text);
        true
    }

    /// Makes the conversation raw text continuation (or a chat again): the template is not
    /// used, each message's text is fed as it is, right after the last, and a reply ends only
    /// at the end of the text (which is not fed on). Only before the first turn: `false`, and
    /// nothing changes, once tokens were recorded.
    pub fn set_raw(&mut self, raw: bool) -> bool {
        if self.head.token_count > 0 {
            return self.head.raw == raw;
        }
        self.head.raw = raw;
        true
    }

    pub fn is_raw(&self) -> bool {
        self.head.raw
    }

    /// The name of the turn format a chat borrows because the model brought no template
    /// ("ChatML", or "Gemma's turn format"), or `None` when it has its own (or the
    /// conversation is raw).
    pub fn borrowed_template(&self) -> Option<&'static str> {
        let template = &self.engine.template;
        (!self.head.raw && template.is_fallback()).then(|| template.fallback_name())
    }

    /// Messages `range` (by index), from memory or the history.
    pub fn messages(&self, range: Range<usize>) -> Result<Vec<MessageRecord>, SessionError> {
        let range = range.start..range.end.min(self.head.message_count);
        let first_unsaved = self
            .unsaved
            .messages
            .first()
            .map_or(self.head.message_count, |m| m.index);
        let mut out = if range.start < first_unsaved {
            self.history
                .messages(range.start..range.end.min(first_unsaved))?
        } else {
            Vec::new()
        };
        out.extend(
            self.unsaved
                .messages
                .iter()
                .filter(|m| range.contains(&m.index))
                .cloned(),
        );
        Ok(out)
    }

    /// Message `index`, when it exists.
    pub fn message(&self, index: usize) -> Result<Option<MessageRecord>, SessionError> {
        Ok(self.messages(index..index + 1)?.pop())
    }

    /// Token positions of message `index`'s content.
    pub fn message_tokens(&self, index: usize) -> Result<Range<u64>, SessionError> {
        Ok(self.message(index)?.map_or(0..0, |m| m.tokens))
    }

    /// The recorded tokens of `positions`, from memory or the history.
    pub fn tokens(&self, positions: Range<u64>) -> Result<TokenRun, SessionError> {
        let split = self.unsaved.tokens.first;
        let mut run = if positions.start < split {
            self.history
                .tokens(positions.start..positions.end.min(split))?
        } else {
            TokenRun::starting_at(positions.start)
        };
        if positions.end > split {
            let mine = self
                .unsaved
                .tokens
                .slice(positions.start.max(split)..positions.end);
            if run.end() == mine.first {
                run.extend(&mine);
            } else {
                run = mine;
            }
        }
        Ok(run)
    }

    /// Where the messages sit whose tokens overlap `positions`.
    fn places(&self, positions: Range<u64>) -> Result<Vec<MessagePlace>, SessionError> {
        let mut places: BTreeMap<usize, MessagePlace> = self
            .history
            .places(positions.clone())?
            .into_iter()
            .map(|p| (p.index, p))
            .collect();
        for m in &self.unsaved.messages {
            if m.tokens.start < positions.end && positions.start < m.tokens.end {
                places.insert(m.index, m.place());
            }
        }
        Ok(places.into_values().collect())
    }

    /// First position inside the window of the next token.
    fn window_start(&self) -> u64 {
        self.cache.stats().window_start
    }

    /// Whether the next token (whose window starts at `window_start`) attends to the token at
    /// `pos`, and why.
    fn token_state(&self, pos: u64, window_start: u64, recalled: &[Range<u64>]) -> TokenState {
        let fed = self.cache.next_position();
        let sinks = self.cache.params().n_global as u64;
        if pos >= window_start || pos >= fed {
            TokenState::Window
        } else if !self.cache.holds(pos) {
            if recalled.iter().any(|r| r.contains(&pos)) {
                TokenState::Recalled
            } else {
                TokenState::Evicted
            }
        } else if pos < sinks {
            TokenState::Global
        } else {
            TokenState::Pinned
        }
    }

    /// The state of a message's text, byte range by byte range.
    fn map(
        &self,
        place: &MessagePlace,
        window_start: u64,
        recalled: &[Range<u64>],
    ) -> Result<MessageMap, SessionError> {
        let params = self.params();
        let tokens = place.tokens.0..place.tokens.1;
        let span = place.span.0..place.span.1;
        let len = (span.end - span.start) as usize;
        let mut segments: Vec<(Range<usize>, TokenState)> = Vec::new();
        let uniform = tokens.start >= params.n_global as u64
            && (tokens.start >= window_start || tokens.end <= window_start)
            && !self
                .cache
                .pinned()
                .iter()
                .chain(recalled)
                .any(|p| p.start < tokens.end && tokens.start < p.end);
        if tokens.is_empty() || uniform {
            let state = if tokens.is_empty() {
                TokenState::Window
            } else {
                self.token_state(tokens.start, window_start, recalled)
            };
            segments.push((0..len, state));
        } else {
            let run = self.tokens(tokens.clone())?;
            for (pos, &offset) in (run.first..).zip(&run.offsets) {
                let state = self.token_state(pos, window_start, recalled);
                if segments.last().map(|(_, st)| *st) == Some(state) {
                    continue;
                }
                let at = (offset.saturating_sub(span.start) as usize).min(len);
                let start = if segments.is_empty() { 0 } else { at };
                if let Some((r, _)) = segments.last_mut() {
                    r.end = at;
                }
                segments.push((start..len, state));
            }
        }
        Ok(MessageMap {
            index: place.index,
            tokens,
            segments,
        })
    }

    /// Where the conversation stands in the Λ: the state of the text of every message the
    /// rule treats unevenly — those with tokens among the sinks, in the window or pinned, and
    /// the last exchange. Every other message of the conversation is wholly evicted. Bounded
    /// by the Λ, not by the conversation's length.
    pub fn timeline(&self) -> Result<Timeline, SessionError> {
        let stats = self.stats();
        let params = self.params();
        let window_start = stats.window_start;
        let count = self.head.token_count;
        let recalled = self.cache.recalled_ranges();
        let mut ranges = vec![0..(params.n_global as u64).min(count), window_start..count];
        ranges.extend(self.cache.pinned().iter().cloned());
        ranges.extend(recalled.iter().cloned());
        let mut places: BTreeMap<usize, MessagePlace> = BTreeMap::new();
        for r in ranges.into_iter().filter(|r| !r.is_empty()) {
            places.extend(self.places(r)?.into_iter().map(|p| (p.index, p)));
        }
        for m in self.head.tail.iter().chain(&self.unsaved.messages) {
            places.insert(m.index, m.place());
        }
        let messages = places
            .values()
            .map(|p| self.map(p, window_start, &recalled))
            .collect::<Result<_, _>>()?;
        Ok(Timeline {
            stats,
            n_global: params.n_global as u64,
            n_local: params.n_local as u64,
            pinned: self.cache.pinned().to_vec(),
            recalled,
            message_count: self.head.message_count,
            messages,
        })
    }

    /// Message `index` token by token: id, text, state and the share of attention the last
    /// decoded token gave it (needs [`Self::set_probe`]).
    pub fn inspect(&self, index: usize) -> Result<InspectView, SessionError> {
        let shares = self.cache.attention_shares();
        let share_of = |pos: u64| {
            shares
                .binary_search_by_key(&pos, |(p, _)| *p)
                .map_or(0.0, |i| shares[i].1)
        };
        let window_start = self.window_start();
        let recalled = self.cache.recalled_ranges();
        let run = self.tokens(self.message_tokens(index)?)?;
        let tokens = (run.first..)
            .zip(&run.ids)
            .map(|(pos, &id)| TokenInfo {
                position: pos,
                id,
                text: self.engine.tokenizer.decode(&[id]).unwrap_or_default(),
                state: self.token_state(pos, window_start, &recalled),
                share: share_of(pos),
            })
            .collect();
        Ok(InspectView {
            message: index,
            tokens,
        })
    }

    /// Pins message `index`: its tokens stay attended (like sinks) until unpinned. Says how
    /// many it has, and how many of them were already evicted and cannot be brought back.
    pub fn pin(&mut self, index: usize) -> Result<Notice, SessionError> {
        let range = self.message_tokens(index)?;
        if range.is_empty() {
            return Ok(Notice::NothingToPin);
        }
        let lost = self.cache.pin(range.clone());
        self.regen = None;
        self.head.pinned = self.pins();
        Ok(Notice::Pinned {
            tokens: range.end - range.start,
            lost,
        })
    }

    pub fn unpin(&mut self, index: usize) -> Result<(), SessionError> {
        let range = self.message_tokens(index)?;
        if !range.is_empty() {
            self.cache.unpin(range)?;
            self.regen = None;
            self.head.pinned = self.pins();
        }
        Ok(())
    }

    fn pins(&self) -> Vec<(u64, u64)> {
        self.cache
            .pinned()
            .iter()
            .map(|r| (r.start, r.end))
            .collect()
    }

    /// Runs the rest of the conversation on the tensor cache (the one a GPU uses) on the
    /// engine's device, contents kept: how the GPU path is checked against the CPU one.
    pub fn use_tensor_cache(&mut self) -> Result<(), SessionError> {
        self.cache = self.cache.to_device(&self.engine.device)?;
        self.regen = None;
        Ok(())
    }

    /// New Λ parameters: a new cache, filled by [`Self::catch_up`] from the history (the sinks,
    /// the pins and the window, never the whole conversation).
    pub fn set_params(&mut self, params: LambdaParams) {
        self.cache = self.engine.empty_cache(params);
        self.regen = None;
        self.kv = KvSaved::none();
        self.head.n_global = params.n_global;
        self.head.n_local = params.n_local;
        self.head.distance_limit = params.distance_limit;
        // On a CPU, where recall was on: the setting stood, so its install cannot fail.
        if let Err(e) = self.install_recall() {
            tracing::warn!("recall is off for this cache: {e}");
        }
    }

    /// Runs tokens through the model in chunks of `chunk` and returns the last token's logits
    /// `[vocab]`, on the model's device. When `cancel` is set between chunks, the rest is
    /// handed back unfed with `None`.
    fn feed_cancellable(
        &mut self,
        ids: &[u32],
        chunk: usize,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<(Option<Tensor>, usize), SessionError> {
        let mut done = 0;
        let mut last = None;
        for piece in ids.chunks(chunk.max(1)) {
            if cancel.load(Ordering::Relaxed) {
                return Ok((None, done));
            }
            last = Some(
                self.engine
                    .model
                    .forward(piece, &mut self.cache, Logits::Last)?,
            );
            // After the cache took the chunk: a fault here is one in the middle of a forward.
            #[cfg(feature = "faults")]
            crate::faults::on_forward().map_err(SessionError::Logits)?;
            done += piece.len();
            on_event(TurnEvent::Prefill {
                done,
                total: ids.len(),
            });
            on_event(TurnEvent::Stats(self.cache.stats()));
        }
        let logits = last
            .ok_or_else(|| SessionError::Logits("nothing to feed".into()))?
            .flatten_all()
            .map_err(|e| SessionError::Logits(candle_msg(&e)))?;
        Ok((Some(logits), done))
    }

    /// Runs tokens through the model in chunks and returns the last token's logits `[vocab]`.
    /// Raw: the tokens are not recorded in the conversation (benchmarks, tests).
    pub fn feed(&mut self, ids: &[u32]) -> Result<Tensor, SessionError> {
        let never = AtomicBool::new(false);
        self.feed_cancellable(ids, self.prefill_chunk, &never, &mut |_| {})?
            .0
            .ok_or_else(|| SessionError::Logits("nothing to feed".into()))
    }

    /// Samples the next token (on the logits' device) and remembers it for the repeat penalty.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32, SessionError> {
        let id = self.sampler.sample_tensor(logits, &self.head.recent)?;
        self.remember_recent(&[id]);
        Ok(id)
    }

    /// Remembers reply tokens for the repeat penalty, which looks at the last `repeat_last_n`
    /// (kept to at most twice that, trimmed in batches).
    fn remember_recent(&mut self, ids: &[u32]) {
        let keep = self.sampler.params().repeat_last_n.max(1);
        let recent = &mut self.head.recent;
        recent.extend(&ids[ids.len().saturating_sub(keep)..]);
        if recent.len() > 2 * keep {
            recent.drain(..recent.len() - keep);
        }
    }

    /// Records a token (fed or pending) that starts at byte `offset` of the fed text.
    fn record(&mut self, id: u32, offset: u64) {
        self.unsaved.tokens.push(id, offset);
        self.head.token_count += 1;
    }

    /// Adds a finished message to the conversation.
    fn add_message(&mut self, record: MessageRecord) {
        self.head.message_count = record.index + 1;
        self.head.code_count = record.code_before + code_blocks(&record.content).len();
        self.unsaved.messages.push(record);
    }

    /// The messages a turn renders, the messages its anchor is found by (the same, before
    /// consecutive user messages were merged), and which of them is the anchor (the last
    /// exchange's first message, whose content the fed text is matched from).
    ///
    /// Templates such as Gemma's refuse two user messages in a row, which a turn stopped during
    /// its prompt leaves: the conversation goes on with one user message holding both (a stopped
    /// prompt keeps nothing fed after its message's content, so the merged text follows on).
    /// A conversation saved before that rule, whose stopped turn fed the reply's opening, reads
    /// as an empty reply instead.
    fn rendered_messages(&self, user: &str) -> Result<Rendered, SessionError> {
        let as_message = |m: &MessageRecord| Message::new(m.role, m.content.clone());
        let mut messages = Vec::new();
        let anchor;
        match self.template {
            TemplateMode::Tail => {
                messages.extend(
                    self.head
                        .system
                        .as_ref()
                        .map(|s| Message::new(Role::System, s.clone())),
                );
                anchor = (!self.head.tail.is_empty()).then_some(messages.len());
                messages.extend(self.head.tail.iter().map(as_message));
                let unanswered = self.head.tail.last().filter(|m| m.role == Role::User);
                if let Some(last) = unanswered
                    && !self.fed_after(last).is_empty()
                {
                    messages.push(Message::new(Role::Assistant, ""));
                }
            }
            TemplateMode::Full => {
                let all = self.messages(0..self.head.message_count)?;
                anchor = self.head.tail.first().map(|t| t.index);
                messages.extend(all.iter().map(as_message));
            }
        }
        messages.push(Message::new(Role::User, user));
        Ok(Rendered {
            render: render::merge_user_runs(&messages),
            located: messages,
            anchor,
        })
    }

    /// The text fed after message `m`'s content (`m` in the tail).
    fn fed_after(&self, m: &MessageRecord) -> &str {
        let from = m.span.end.saturating_sub(self.head.fed_tail_start) as usize;
        let fed_after = self.head.fed_tail.get(from..).unwrap_or("");
        if m.span.is_empty() {
            // Not found in its rendering: whatever followed it counts as fed.
            return self.head.fed_tail.as_str();
        }
        fed_after
    }

    /// The turn of `user` rendered by the chat template, and where in it the text not fed yet
    /// starts.
    fn rendered_delta(&self, user: &str) -> Result<(String, usize), SessionError> {
        let Rendered {
            render,
            located,
            anchor,
        } = self.rendered_messages(user)?;
        let rendered = self.engine.template.render(&render, true)?;
        let anchored = anchor.and_then(|a| {
            let fed_after = self.fed_after(&self.head.tail[0]);
            render::delta_start(&rendered, &located, a, fed_after)
        });
        // Without an anchor (the first turn), or when the anchor is not in the rendering (a
        // template that re-renders history differently), the text after what it shares with the
        // fed tail is new.
        let delta_at =
            anchored.unwrap_or_else(|| common_prefix_len(&rendered, &self.head.fed_tail));
        Ok((rendered, delta_at))
    }

    /// Renders the turn of `user`, tokenizes the new text and records it: returns the ids to
    /// feed (pending ones first) and the user message's record.
    fn prompt(&mut self, user: &str) -> Result<(Vec<u32>, MessageRecord), SessionError> {
        // The system prompt when this turn places it (the first): its content is located in
        // the new text like the message's.
        let system = self
            .unsaved
            .messages
            .first()
            .filter(|m| m.role == Role::System && m.tokens.is_empty() && m.span.is_empty())
            .map(|m| m.content.clone());
        let (rendered, delta_at) = if self.head.raw {
            // Raw text: the new text is the message itself, after the system prompt once.
            (format!("{}{user}", system.as_deref().unwrap_or("")), 0)
        } else {
            self.rendered_delta(user)?
        };
        let delta = &rendered[delta_at..];
        let engine = self.engine.clone();
        let tok = &engine.tokenizer;
        let mut ids = std::mem::take(&mut self.head.pending);
        let base = self.head.fed_len;
        if self.head.token_count == 0 && tok.add_bos {
            let bos_text = tok.bos.and_then(|b| tok.id_to_token(b));
            if let (Some(b), Some(text)) = (tok.bos, bos_text)
                && !delta.starts_with(&text)
            {
                ids.push(b);
                self.record(b, base);
            }
        }
        // The contents this text places: the system prompt (first turn) and the new message.
        // What people wrote is tokenized as plain text, the scaffolding around it with its
        // special tokens.
        let mut contents: Vec<&str> = system.iter().map(String::as_str).collect();
        contents.push(user);
        let places = locate(delta, &contents);
        let typed: Vec<Range<usize>> = places.iter().flatten().cloned().collect();
        let first_new = self.head.token_count;
        // A raw text's next part goes on from the text before it (no space put before it).
        let (new_ids, starts) = if self.head.raw && base > 0 {
            tok.encode_continuation(delta)?
        } else {
            tok.encode_with_offsets(delta, &typed)?
        };
        for (&id, &s) in new_ids.iter().zip(&starts) {
            self.record(id, base + s as u64);
        }
        ids.extend(&new_ids);
        let token_range = |span: &Range<u64>| {
            let first = starts.partition_point(|&s| base + (s as u64) < span.start);
            let end = starts.partition_point(|&s| base + (s as u64) < span.end);
            first_new + first as u64..first_new + end as u64
        };
        let span_of = |place: &Option<Range<usize>>| match place {
            Some(r) => base + r.start as u64..base + r.end as u64,
            None => base + delta.len() as u64..base + delta.len() as u64,
        };
        if system.is_some()
            && let Some(m) = self.unsaved.messages.first_mut()
        {
            m.span = span_of(&places[0]);
            m.tokens = token_range(&m.span);
        }
        let span = span_of(places.last().unwrap_or(&None));
        let record = MessageRecord {
            index: self.head.message_count,
            role: Role::User,
            content: user.to_string(),
            tokens: token_range(&span),
            span: span.clone(),
            code_before: self.head.code_count,
        };
        // The fed text grows by the new text; the new exchange starts at this message.
        self.head.fed_len = base + delta.len() as u64;
        let from = (span.start - base) as usize;
        self.head.fed_tail = delta.get(from..).unwrap_or(delta).to_string();
        self.head.fed_tail_start = if delta.get(from..).is_some() {
            span.start
        } else {
            base
        };
        self.head.tail = vec![record.clone()];
        Ok((ids, record))
    }

    /// One exchange: adds the user's message, streams the reply through `on_event`, and records
    /// it. `cancel` is checked between prefill chunks and between tokens; what was generated is
    /// kept, and a prompt cut short is finished by the next turn.
    ///
    /// A turn is a transaction: when the prompt fails, the conversation and the cache are put
    /// back as they were before it; when the reply fails, as they were after the prompt, with an
    /// empty reply (which can be regenerated).
    pub fn turn(
        &mut self,
        user: &str,
        max_tokens: Option<usize>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<TurnReport, SessionError> {
        #[cfg(feature = "faults")]
        crate::faults::on_turn();
        self.drop_rewind_points();
        let before = self.checkpoint();
        let point = self.cache.mark();
        let start = Instant::now();
        let prefilled = match self.prompt_and_prefill(user, cancel, on_event) {
            Ok(p) => p,
            Err(e) => {
                self.cache.rewind(point);
                self.restore(before);
                return Err(e);
            }
        };
        let prefill_time = start.elapsed();
        let (logits, prompt_tokens) = match prefilled {
            Prefilled::Ready(logits, n) => (logits, n),
            Prefilled::Stopped(done) => {
                self.cache.forget(point);
                return Ok(TurnReport {
                    prompt_tokens: done,
                    generated_tokens: 0,
                    prefill_time,
                    decode_time: Duration::ZERO,
                    stop: StopReason::Cancelled,
                    reply: String::new(),
                });
            }
        };
        self.regen = Some(Regen {
            point: self.cache.mark(),
            head: self.head.clone(),
            logits: logits.clone(),
            before_prompt: (point, before.head),
        });
        let mut report = self.generate_or_undo(logits, max_tokens, cancel, on_event)?;
        report.prompt_tokens = prompt_tokens;
        report.prefill_time = prefill_time;
        Ok(report)
    }

    /// One exchange whose reply is given, not generated: a conversation a client sends whole (an
    /// OpenAI-style request holds every earlier reply) is read into the session this way. The
    /// user's message is fed as a turn's prompt, then the reply as plain text; the conversation
    /// then stands as after a generated reply that ended its turn. A transaction like
    /// [`Self::turn`]: on an error nothing of it stays. Returns the tokens fed.
    pub fn exchange(&mut self, user: &str, reply: &str) -> Result<usize, SessionError> {
        self.drop_rewind_points();
        let before = self.checkpoint();
        let point = self.cache.mark();
        let never = AtomicBool::new(false);
        let fed = match self.prompt_and_prefill(user, &never, &mut |_| {}) {
            Ok(Prefilled::Ready(_, prompt)) => self.given_reply(reply).map(|n| prompt + n),
            Ok(Prefilled::Stopped(_)) => Err(SessionError::Logits("a prompt stopped".into())),
            Err(e) => Err(e),
        };
        match fed {
            Ok(n) => {
                self.cache.forget(point);
                Ok(n)
            }
            Err(e) => {
                self.cache.rewind(point);
                self.restore(before);
                Err(e)
            }
        }
    }

    /// Records the user's message and feeds its prompt: the text up to the end of the message's
    /// content can be stopped between chunks, the template's few tokens after it (the end of
    /// the turn, the reply's opening) are fed with it or not at all. A stopped prompt forgets
    /// those — never fed, they are the last tokens recorded, so no position moves — and keeps
    /// the unread part of the message pending, so the fed text ends with the message and the
    /// next turn can merge its own message into it.
    fn prompt_and_prefill(
        &mut self,
        user: &str,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<Prefilled, SessionError> {
        let (prompt, record) = self.prompt(user)?;
        self.add_message(record.clone());
        let first = self.head.token_count - prompt.len() as u64;
        let content_end = if record.span.is_empty() {
            prompt.len()
        } else {
            (record.tokens.end.saturating_sub(first) as usize).min(prompt.len())
        };
        let total = prompt.len();
        let (message, closing) = prompt.split_at(content_end);
        let mut logits = None;
        if !message.is_empty() {
            let (l, done) = self.feed_cancellable(message, self.prefill_chunk, cancel, on_event)?;
            self.head.tokens_fed = self.cache.next_position();
            if l.is_none() {
                self.unsaved.tokens.truncate(first + content_end as u64);
                self.head.token_count = first + content_end as u64;
                self.head.pending = message[done..].to_vec();
                if !record.span.is_empty() {
                    self.head.fed_len = record.span.end;
                    let keep = (record.span.end - self.head.fed_tail_start) as usize;
                    self.head.fed_tail.truncate(keep);
                }
                return Ok(Prefilled::Stopped(done));
            }
            logits = l;
        }
        if !closing.is_empty() {
            let never = AtomicBool::new(false);
            let mut progress = |e: TurnEvent<'_>| match e {
                TurnEvent::Prefill { done, .. } => on_event(TurnEvent::Prefill {
                    done: content_end + done,
                    total,
                }),
                other => on_event(other),
            };
            logits = self
                .feed_cancellable(closing, self.prefill_chunk, &never, &mut progress)?
                .0;
            self.head.tokens_fed = self.cache.next_position();
        }
        let logits = logits.ok_or_else(|| SessionError::Logits("nothing to feed".into()))?;
        Ok(Prefilled::Ready(logits, total))
    }

    /// The conversation's state in memory, to put back when a turn fails.
    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            head: self.head.clone(),
            messages: self.unsaved.messages.len(),
            tokens: self.unsaved.tokens.end(),
        }
    }

    fn restore(&mut self, c: Checkpoint) {
        self.head = c.head;
        self.unsaved.messages.truncate(c.messages);
        self.unsaved.tokens.truncate(c.tokens);
    }

    /// Generates the reply; when that fails, puts the prompt's state back with an empty reply
    /// in place of the failed one, and returns the error.
    fn generate_or_undo(
        &mut self,
        logits: Tensor,
        max_tokens: Option<usize>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<TurnReport, SessionError> {
        match self.generate(logits, max_tokens, cancel, on_event) {
            Ok(report) => Ok(report),
            Err(e) => {
                if let Some(logits) = self.undo_reply() {
                    let never = AtomicBool::new(false);
                    self.generate(logits, Some(0), &never, &mut |_| {})?;
                }
                Err(e)
            }
        }
    }

    /// Drops what regenerating or taking back the last exchange needs (the cache's rewind
    /// points, the last set first): the cache keeps no copies of what it overwrites after that.
    pub fn drop_rewind_points(&mut self) {
        if let Some(r) = self.regen.take() {
            self.cache.forget(r.point);
            self.cache.forget(r.before_prompt.0);
        }
    }

    /// Whether [`Self::take_back_exchange`] can take the last exchange back.
    pub fn can_take_back(&self) -> bool {
        self.regen.is_some()
    }

    /// Takes the last exchange back — the user's message and its reply — as if it had never
    /// been sent: the cache returns to its state before the message (undoing what the prompt
    /// and the reply overwrote), the conversation too, and the saved history forgets them at
    /// its next save. `false`, and nothing changes, when that state is not kept (no exchange
    /// since the conversation was opened, or a pin changed the cache since).
    pub fn take_back_exchange(&mut self) -> bool {
        let Some(r) = self.regen.take() else {
            return false;
        };
        let (before, head) = r.before_prompt;
        if !self.cache.rewind(r.point) || !self.cache.rewind(before) {
            // The points were dropped with a pin: the cache is as it was, with no way back.
            return false;
        }
        self.head = head;
        self.forget_after_head();
        true
    }

    /// After the head went back: drops what the conversation recorded past it from the
    /// unsaved part, has the history forget it at the next save, and has the KV file rewrite
    /// from the cache's position on.
    fn forget_after_head(&mut self) {
        let (messages, tokens) = (self.head.message_count, self.head.token_count);
        self.unsaved.messages.retain(|m| m.index < messages);
        if self.unsaved.tokens.first > tokens {
            self.unsaved.tokens = TokenRun::starting_at(tokens);
        } else {
            self.unsaved.tokens.truncate(tokens);
        }
        let truncate = self.unsaved.truncate.map_or((messages, tokens), |(m, t)| {
            (m.min(messages), t.min(tokens))
        });
        self.unsaved.truncate = Some(truncate);
        // The KV store may hold what was taken back: the next save forgets it before new
        // tokens take its positions, and writes from there (with any slot of the window that
        // was overwritten in the file).
        let mark = self.cache.next_position();
        self.kv.forget_from = Some(self.kv.forget_from.map_or(mark, |f| f.min(mark)));
        self.kv.upto = self.kv.upto.min(mark);
    }

    /// Feeds what a resumed conversation's cache lacks: the tokens after the saved cache, or —
    /// without one, or with new Λ parameters — the sinks, the pins and the window, read from
    /// the history (the tokens between them stay evicted, as they were). Cancellable like a
    /// prefill: what is left stays pending. Returns the number of tokens fed.
    pub fn catch_up(
        &mut self,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<usize, SessionError> {
        let fed = self.head.tokens_fed;
        let next = self.cache.next_position();
        if next >= fed {
            return Ok(0);
        }
        if next > 0 {
            // The saved cache, then the tokens after it.
            let ids = self.tokens(next..fed)?.ids;
            return self.feed_rest(&ids, fed, cancel, on_event);
        }
        let params = self.params();
        let pins: Vec<Range<u64>> = self.head.pinned.iter().map(|&(s, e)| s..e).collect();
        let layers = self.engine.model.layer_geometry(params);
        // Filled on the host (a window with a gap before it is the host cache's to hold), then
        // moved to the engine's device.
        let mut cache = KvCache::Host(HostCache::new(params, layers));
        cache.set_kv_type(self.engine.kv_type);
        for p in &pins {
            cache.pin(p.clone());
        }
        std::mem::swap(&mut self.cache, &mut cache);
        self.install_recall()?;
        let window = fed.saturating_sub(params.n_local as u64)..fed;
        let mut ranges = Vec::new();
        ranges.push(0..(params.n_global as u64).min(window.start));
        for p in &pins {
            let r = p.start.max(params.n_global as u64)..p.end.min(window.start);
            if !r.is_empty() {
                ranges.push(r);
            }
        }
        let mut total = 0;
        for r in ranges.into_iter().filter(|r| !r.is_empty()) {
            self.skip_to(r.start);
            let ids = self.tokens(r)?.ids;
            self.feed_cancellable(
                &ids,
                self.prefill_chunk,
                &AtomicBool::new(false),
                &mut |_| {},
            )?;
            total += ids.len();
        }
        self.skip_to(window.start);
        let ids = self.tokens(window)?.ids;
        let n = self.feed_rest(&ids, fed, cancel, on_event)?;
        if !self.engine.device.is_cpu() {
            self.cache = self.cache.to_device(&self.engine.device)?;
        }
        Ok(total + n)
    }

    /// Moves the cache on to `position` without feeding what lies before it (evicted).
    fn skip_to(&mut self, position: u64) {
        if let KvCache::Host(c) = &mut self.cache
            && position > c.next_position()
        {
            c.skip_to(position);
        }
    }

    /// Feeds `ids`, which end at `fed`; a cancel leaves the rest pending.
    fn feed_rest(
        &mut self,
        ids: &[u32],
        fed: u64,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<usize, SessionError> {
        let (_, done) = self.feed_cancellable(ids, self.prefill_chunk, cancel, on_event)?;
        if done < ids.len() {
            let mut pending = ids[done..].to_vec();
            pending.append(&mut self.head.pending);
            self.head.pending = pending;
        }
        self.head.tokens_fed = fed - (ids.len() - done) as u64;
        Ok(done)
    }

    /// Whether [`Self::regenerate`] can replace the last reply.
    pub fn can_regenerate(&self) -> bool {
        self.regen.is_some()
            && self
                .head
                .tail
                .last()
                .is_some_and(|m| m.role == Role::Assistant)
    }

    /// Draws a new reply to the last prompt: the cache goes back to its state after that
    /// prompt's prefill (undoing what the reply overwrote), so the old reply leaves no trace.
    pub fn regenerate(
        &mut self,
        max_tokens: Option<usize>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<Option<TurnReport>, SessionError> {
        if !self.can_regenerate() {
            return Ok(None);
        }
        let Some(logits) = self.undo_reply() else {
            return Ok(None);
        };
        self.generate_or_undo(logits, max_tokens, cancel, on_event)
            .map(Some)
    }

    /// Takes the last reply back: the cache returns to its state after the prompt's prefill
    /// (undoing what the reply overwrote) and the conversation to its state then. Returns the
    /// prompt's logits, or `None` when there is no reply to take back.
    fn undo_reply(&mut self) -> Option<Tensor> {
        let r = self.regen.take()?;
        if !self.cache.rewind(r.point) {
            return None;
        }
        // Keep the repeat history of the rejected reply: it should not be drawn again.
        let recent = std::mem::take(&mut self.head.recent);
        self.head = r.head.clone();
        self.head.recent = recent;
        self.forget_after_head();
        self.regen = Some(Regen {
            point: self.cache.mark(),
            head: r.head,
            logits: r.logits.clone(),
            before_prompt: r.before_prompt,
        });
        Some(r.logits)
    }

    /// Samples a reply after a prefill and records it as the assistant's message.
    fn generate(
        &mut self,
        mut logits: Tensor,
        max_tokens: Option<usize>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<TurnReport, SessionError> {
        let start = Instant::now();
        let engine = self.engine.clone();
        let mut stream = TextStream::new();
        let mut reply = String::new();
        let base = self.head.fed_len;
        let first = self.head.token_count;
        let mut generated = 0;
        let stop = loop {
            if cancel.load(Ordering::Relaxed) {
                break StopReason::Cancelled;
            }
            if max_tokens.is_some_and(|m| generated >= m) {
                break StopReason::Length;
            }
            let id = self.sample(&logits)?;
            if engine.is_stop(id) {
                // A chat's turn ends with the stop token, fed by the next turn; a raw text's
                // end is not part of the text that may follow it.
                if !self.head.raw {
                    self.head.pending.push(id);
                }
                break StopReason::EndOfTurn;
            }
            generated += 1;
            self.record(id, base + reply.len() as u64);
            if let Some(text) = stream.push(&engine.tokenizer, id)? {
                on_event(TurnEvent::Text(&text));
                reply.push_str(&text);
            }
            if max_tokens.is_some_and(|m| generated >= m) || cancel.load(Ordering::Relaxed) {
                // Not fed now: the next turn feeds it first, so stopping costs no forward.
                self.head.pending.push(id);
                continue;
            }
            logits = self.feed(&[id])?;
            self.head.tokens_fed = self.cache.next_position();
            on_event(TurnEvent::Stats(self.cache.stats()));
        };
        if let Some(text) = stream.finish(&engine.tokenizer)? {
            on_event(TurnEvent::Text(&text));
            reply.push_str(&text);
        }
        let stop_id = if stop == StopReason::EndOfTurn && !self.head.raw {
            self.head.pending.last().copied()
        } else {
            None
        };
        self.close_reply(base, first, &reply, stop_id);
        Ok(TurnReport {
            prompt_tokens: 0,
            generated_tokens: generated,
            prefill_time: Duration::ZERO,
            decode_time: start.elapsed(),
            stop,
            reply,
        })
    }

    /// Records a reply whose tokens from `first` on were recorded (its text `reply`, at byte
    /// `base` of the fed text) as the conversation's next message, with the end-of-turn token
    /// `stop` that closes it (pending: the next turn feeds it first).
    fn close_reply(&mut self, base: u64, first: u64, reply: &str, stop: Option<u32>) {
        let end = self.head.token_count;
        let mut fed_added = reply.to_string();
        if let Some(id) = stop {
            self.record(id, base + reply.len() as u64);
            let text = self.engine.tokenizer.decode(&[id]).ok();
            fed_added.push_str(&text.unwrap_or_default());
        }
        self.head.fed_len = base + fed_added.len() as u64;
        self.head.fed_tail.push_str(&fed_added);
        let record = MessageRecord {
            index: self.head.message_count,
            role: Role::Assistant,
            content: reply.to_string(),
            tokens: first..end,
            span: base..base + reply.len() as u64,
            code_before: self.head.code_count,
        };
        self.head.tail.push(record.clone());
        self.add_message(record);
    }

    /// Feeds a reply that was given rather than generated: its text as plain text (no control
    /// token inside), remembered for the repeat penalty as a generated one is, then closed by
    /// the template's end-of-turn token. Returns the tokens fed.
    fn given_reply(&mut self, reply: &str) -> Result<usize, SessionError> {
        let engine = self.engine.clone();
        let base = self.head.fed_len;
        let first = self.head.token_count;
        let whole = 0..reply.len();
        let (ids, starts) = engine
            .tokenizer
            .encode_with_offsets(reply, std::slice::from_ref(&whole))?;
        for (&id, &s) in ids.iter().zip(&starts) {
            self.record(id, base + s as u64);
        }
        if !ids.is_empty() {
            let never = AtomicBool::new(false);
            self.feed_cancellable(&ids, self.prefill_chunk, &never, &mut |_| {})?;
            self.head.tokens_fed = self.cache.next_position();
        }
        self.remember_recent(&ids);
        let stop = engine.end_of_turn().filter(|_| !self.head.raw);
        self.head.pending.extend(stop);
        self.close_reply(base, first, reply, stop);
        Ok(ids.len())
    }

    /// Hands what changed since the last save to the history: the new messages and tokens with
    /// the head (one transaction), then the cache's slots of the tokens fed since (and its
    /// global stores when they changed). What fails stays to be saved next time.
    pub fn save(&mut self) -> Result<(), SessionError> {
        if self.head.token_count == 0 {
            return Ok(()); // nothing fed: nothing to keep
        }
        self.head.pinned = self.pins();
        self.head.model = Some(self.engine.fingerprint.clone());
        if let Some(position) = self.kv.forget_from {
            self.history.forget_kv_from(position)?;
        }
        let batch = Batch {
            truncate: self.unsaved.truncate,
            messages: &self.unsaved.messages,
            tokens: &self.unsaved.tokens,
            head: &self.head,
        };
        self.history.append(&batch)?;
        self.unsaved = Unsaved::at(self.head.token_count);
        let next = self.cache.next_position();
        let widest = self.params().n_local as u64;
        let from = if self.kv.restart {
            next.saturating_sub(widest)
        } else {
            self.kv.upto.max(next.saturating_sub(widest))
        };
        let version = self.cache.globals_version();
        let globals = if self.kv.restart || self.kv.globals != Some(version) {
            Some(self.cache.globals_snapshot()?)
        } else {
            None
        };
        self.history
            .save_kv(&self.cache, from..next, globals.as_deref(), self.kv.restart)?;
        self.kv = KvSaved {
            upto: next,
            globals: Some(version),
            restart: false,
            forget_from: None,
        };
        Ok(())
    }
}

/// How `engine`'s template renders a conversation with the system prompt `system`.
fn template_mode(engine: &Engine, system: Option<&str>) -> TemplateMode {
    let tok = &engine.tokenizer;
    // The text a reply's stop token adds: the first stop token the template itself uses.
    let end = engine
        .stop_ids
        .iter()
        .filter_map(|&id| tok.decode(&[id]).ok())
        .find(|t| !t.is_empty() && engine.template.source().contains(t.as_str()))
        .unwrap_or_default();
    TemplateCheck::mode(&engine.template, system, &end)
}
