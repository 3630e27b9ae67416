//! A conversation: the messages, the Λ cache that holds what the model still attends to, and the
//! bookkeeping that lets each turn feed only its new tokens.
//!
//! The history is never prefilled again: every turn renders the chat template over the whole
//! conversation, keeps only the text after what was already fed, and tokenizes that. So
//! time-to-first-token depends on the new message, not on the conversation's length.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::attention::{
    AttentionCache, AttentionError, CacheStats, KvCache, LambdaParams, SnapshotError,
};
use crate::chat::{Message, Role, TemplateError};
use crate::engine::Engine;
use crate::error::candle_msg;
use crate::model::{Logits, ModelError};
use crate::protocol::{
    InspectView, MessageMap, Notice, StopReason, Timeline, TokenInfo, TokenState,
};
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use crate::tokenizer::{TextStream, TokenizerError};

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

/// Everything about a conversation but the cache: what `save`/`restore` persist beside it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SessionState {
    pub messages: Vec<Message>,
    /// The rendered-template text of everything fed or pending.
    pub fed_text: String,
    /// Every token fed or pending, in order: token `i` sits at position `i`.
    pub tokens: Vec<u32>,
    /// Byte offset in `fed_text` where each token starts.
    pub offsets: Vec<usize>,
    /// Byte range of each message's content in `fed_text` (empty when not found).
    pub spans: Vec<Range<usize>>,
    /// Tokens not yet run through the model, fed first by the next turn: the last token of a
    /// reply, or the rest of a prompt whose prefill was cancelled.
    pub pending: Vec<u32>,
    /// Recent tokens for the repeat penalty.
    pub recent: Vec<u32>,
}

/// The state after a prompt's prefill, kept so `regenerate` can draw another reply.
struct Checkpoint {
    cache: KvCache,
    state: SessionState,
    logits: Tensor,
}

pub struct Session {
    engine: Arc<Engine>,
    cache: KvCache,
    state: SessionState,
    sampler: Sampler,
    checkpoint: Option<Checkpoint>,
    /// Tokens per prefill forward of a turn: smaller chunks answer a cancel sooner.
    prefill_chunk: usize,
}

impl Session {
    pub fn new(
        engine: Arc<Engine>,
        params: LambdaParams,
        sampling: SamplingParams,
        system: Option<String>,
    ) -> Result<Self, SessionError> {
        let cache = KvCache::new(params, engine.model.layer_geometry(params), &engine.device);
        let mut state = SessionState::default();
        if let Some(s) = system {
            state.messages.push(Message::new(Role::System, s));
            state.spans.push(0..0);
        }
        Ok(Self {
            engine,
            cache,
            state,
            sampler: Sampler::new(sampling)?,
            checkpoint: None,
            prefill_chunk: PREFILL_CHUNK,
        })
    }

    /// Resumes a saved conversation. With the cache snapshot it continues exactly where it
    /// stopped; without one (or one that does not fit), the history is fed again.
    pub fn restore(
        engine: Arc<Engine>,
        params: LambdaParams,
        sampling: SamplingParams,
        state: SessionState,
        snapshot: Option<&[u8]>,
    ) -> Result<(Self, Option<SnapshotError>), SessionError> {
        let layers = engine.model.layer_geometry(params);
        let restored =
            snapshot.map(|b| KvCache::from_snapshot(b, params, layers.clone(), &engine.device));
        let (cache, problem) = match restored {
            Some(Ok(c))
                if c.next_position() as usize + state.pending.len() == state.tokens.len() =>
            {
                (Some(c), None)
            }
            Some(Ok(_)) => (
                None,
                Some(SnapshotError::Mismatch(
                    "token count differs from the messages".into(),
                )),
            ),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        let mut session = Self {
            cache: KvCache::new(params, layers, &engine.device),
            engine,
            state: SessionState::default(),
            sampler: Sampler::new(sampling)?,
            checkpoint: None,
            prefill_chunk: PREFILL_CHUNK,
        };
        match cache {
            Some(c) => {
                session.cache = c;
                session.state = state;
            }
            None => {
                // Keep the messages; the next turn renders and feeds them all.
                session.state.spans = vec![0..0; state.messages.len()];
                session.state.messages = state.messages;
            }
        }
        Ok((session, problem))
    }

    /// Sets the tokens per prefill forward of a turn (at least 1).
    pub fn set_prefill_chunk(&mut self, tokens: usize) {
        self.prefill_chunk = tokens.max(1);
    }

    pub fn messages(&self) -> &[Message] {
        &self.state.messages
    }

    pub fn state(&self) -> &SessionState {
        &self.state
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

    /// The cache as a safetensors snapshot (see [`crate::attention::HostCache::to_snapshot`]).
    pub fn snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        self.cache.to_snapshot()
    }

    /// Makes the cache record attention shares of each decoded token (for the inspect view).
    pub fn set_probe(&mut self, on: bool) {
        self.cache.set_probe(on);
    }

    /// Sets the system prompt of a conversation that has not started yet. Once tokens were
    /// fed, the old prompt is part of the cache, and changing the text would make the next turn
    /// feed the whole history again: then nothing changes and `false` is returned.
    pub fn set_system(&mut self, text: String) -> bool {
        if !self.state.tokens.is_empty() {
            return false;
        }
        match self.state.messages.first_mut() {
            Some(m) if m.role == Role::System => m.content = text,
            _ => {
                self.state
                    .messages
                    .insert(0, Message::new(Role::System, text));
                self.state.spans.insert(0, 0..0);
            }
        }
        true
    }

    /// Token positions of message `index`'s content.
    pub fn message_tokens(&self, index: usize) -> Range<u64> {
        let Some(span) = self.state.spans.get(index) else {
            return 0..0;
        };
        let offsets = &self.state.offsets;
        let start = offsets.partition_point(|&o| o < span.start);
        let end = offsets.partition_point(|&o| o < span.end);
        start as u64..end as u64
    }

    /// First position inside the window of the next token.
    fn window_start(&self) -> u64 {
        self.cache.stats().window_start
    }

    /// Whether the next token (whose window starts at `window_start`) attends to the token at
    /// `pos`, and why.
    fn token_state(&self, pos: u64, window_start: u64) -> TokenState {
        let fed = self.cache.next_position();
        let sinks = self.cache.params().n_global as u64;
        if pos >= window_start || pos >= fed {
            TokenState::Window
        } else if !self.cache.holds(pos) {
            TokenState::Evicted
        } else if pos < sinks {
            TokenState::Global
        } else {
            TokenState::Pinned
        }
    }

    /// Where every message stands in the Λ: each one's token span and the state of its text,
    /// byte range by byte range (for the visualizer and the dimming of evicted text).
    pub fn timeline(&self) -> Timeline {
        let stats = self.stats();
        let params = self.params();
        let window_start = stats.window_start;
        let offsets = &self.state.offsets;
        let messages = (0..self.state.messages.len())
            .map(|i| {
                let tokens = self.message_tokens(i);
                let span = self.state.spans.get(i).cloned().unwrap_or(0..0);
                let mut segments: Vec<(Range<usize>, TokenState)> = Vec::new();
                let uniform = tokens.start >= params.n_global as u64
                    && (tokens.start >= window_start || tokens.end <= window_start)
                    && !self
                        .pinned()
                        .iter()
                        .any(|p| p.start < tokens.end && tokens.start < p.end);
                if tokens.is_empty() || uniform {
                    let state = if tokens.is_empty() {
                        TokenState::Window
                    } else {
                        self.token_state(tokens.start, window_start)
                    };
                    segments.push((0..span.len(), state));
                } else {
                    for pos in tokens.clone() {
                        let state = self.token_state(pos, window_start);
                        if segments.last().map(|(_, st)| *st) == Some(state) {
                            continue;
                        }
                        let at = offsets[pos as usize]
                            .saturating_sub(span.start)
                            .min(span.len());
                        let start = if segments.is_empty() { 0 } else { at };
                        if let Some((r, _)) = segments.last_mut() {
                            r.end = at;
                        }
                        segments.push((start..span.len(), state));
                    }
                }
                MessageMap { tokens, segments }
            })
            .collect();
        Timeline {
            stats,
            n_global: params.n_global as u64,
            n_local: params.n_local as u64,
            pinned: self.pinned().to_vec(),
            messages,
        }
    }

    /// Message `index` token by token: id, text, state and the share of attention the last
    /// decoded token gave it (needs [`Self::set_probe`]).
    pub fn inspect(&self, index: usize) -> InspectView {
        let shares = self.cache.attention_shares();
        let share_of = |pos: u64| {
            shares
                .binary_search_by_key(&pos, |(p, _)| *p)
                .map_or(0.0, |i| shares[i].1)
        };
        let window_start = self.window_start();
        let ids = &self.state.tokens;
        let tokens = self
            .message_tokens(index)
            .filter_map(|pos| {
                let id = *ids.get(pos as usize)?;
                let text = self.engine.tokenizer.decode(&[id]).unwrap_or_default();
                Some(TokenInfo {
                    position: pos,
                    id,
                    text,
                    state: self.token_state(pos, window_start),
                    share: share_of(pos),
                })
            })
            .collect();
        InspectView {
            message: index,
            tokens,
        }
    }

    /// Pins message `index`: its tokens stay attended (like sinks) until unpinned. Says how
    /// many it has, and how many of them were already evicted and cannot be brought back.
    pub fn pin(&mut self, index: usize) -> Notice {
        let range = self.message_tokens(index);
        if range.is_empty() {
            return Notice::NothingToPin;
        }
        Notice::Pinned {
            tokens: range.end - range.start,
            lost: self.cache.pin(range),
        }
    }

    pub fn unpin(&mut self, index: usize) -> Result<(), SessionError> {
        let range = self.message_tokens(index);
        if !range.is_empty() {
            self.cache.unpin(range)?;
        }
        Ok(())
    }

    /// Runs the rest of the conversation on the tensor cache (the one a GPU uses) on the
    /// engine's device, contents kept: how the GPU path is checked against the CPU one.
    pub fn use_tensor_cache(&mut self) -> Result<(), SessionError> {
        let device = self.engine.device.clone();
        self.cache = self.cache.to_device(&device)?;
        if let Some(c) = &mut self.checkpoint {
            c.cache = c.cache.to_device(&device)?;
        }
        Ok(())
    }

    /// Positions pinned now.
    fn pinned(&self) -> &[Range<u64>] {
        self.cache.pinned()
    }

    /// Runs tokens through the model in chunks of `chunk` and returns the last token's logits
    /// `[vocab]`, on the model's device. When `cancel` is set between chunks, the rest is kept
    /// in `pending` and `None` returned.
    fn feed_cancellable(
        &mut self,
        ids: &[u32],
        chunk: usize,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<Option<Tensor>, SessionError> {
        let mut done = 0;
        let mut last = None;
        for piece in ids.chunks(chunk.max(1)) {
            if cancel.load(Ordering::Relaxed) {
                self.state.pending = ids[done..].to_vec();
                return Ok(None);
            }
            last = Some(
                self.engine
                    .model
                    .forward(piece, &mut self.cache, Logits::Last)?,
            );
            done += piece.len();
            on_event(TurnEvent::Prefill {
                done,
                total: ids.len(),
            });
            on_event(TurnEvent::Stats(self.cache.stats()));
        }
        let logits = last.ok_or_else(|| SessionError::Logits("nothing to feed".into()))?;
        logits
            .flatten_all()
            .map(Some)
            .map_err(|e| SessionError::Logits(candle_msg(&e)))
    }

    /// Runs tokens through the model in chunks and returns the last token's logits `[vocab]`.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Tensor, SessionError> {
        let never = AtomicBool::new(false);
        self.feed_cancellable(ids, self.prefill_chunk, &never, &mut |_| {})?
            .ok_or_else(|| SessionError::Logits("nothing to feed".into()))
    }

    /// Samples the next token (on the logits' device) and remembers it for the repeat penalty.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32, SessionError> {
        let id = self.sampler.sample_tensor(logits, &self.state.recent)?;
        self.state.recent.push(id);
        let keep = self.sampler.params().repeat_last_n.max(1);
        if self.state.recent.len() > 2 * keep {
            self.state.recent.drain(..self.state.recent.len() - keep);
        }
        Ok(id)
    }

    /// Records tokens (fed or pending) that start at byte offsets `starts` of `fed_text`.
    fn record_tokens(&mut self, ids: &[u32], starts: impl IntoIterator<Item = usize>) {
        self.state.tokens.extend_from_slice(ids);
        self.state.offsets.extend(starts);
    }

    /// The tokens the new messages add: the rendered template's text after what was fed.
    fn new_prompt_tokens(&mut self) -> Result<Vec<u32>, SessionError> {
        let full = self.engine.template.render(&self.state.messages, true)?;
        let common = common_prefix_len(&full, &self.state.fed_text);
        // A template that re-renders history differently (trimming, say) cannot change what the
        // cache holds; the model continues from the first difference.
        let delta = &full[common..];
        let tok = &self.engine.tokenizer;
        let mut ids = std::mem::take(&mut self.state.pending);
        let mut bos = None;
        if self.cache.next_position() == 0 && ids.is_empty() && tok.add_bos {
            let bos_text = tok.bos.and_then(|b| tok.id_to_token(b));
            if let (Some(b), Some(text)) = (tok.bos, bos_text)
                && !delta.starts_with(&text)
            {
                bos = Some(b);
            }
        }
        let (new_ids, starts) = tok.encode_with_offsets(delta)?;
        // Locate the contents of messages not yet placed, in order, inside the new text.
        let mut cursor = common;
        for (i, m) in self.state.messages.iter().enumerate() {
            if self.state.spans.len() <= i {
                self.state.spans.push(0..0);
            }
            if self.state.spans[i].is_empty()
                && !m.content.is_empty()
                && let Some(at) = full[cursor..].find(&m.content)
            {
                let start = cursor + at;
                self.state.spans[i] = start..start + m.content.len();
                cursor = start + m.content.len();
            }
        }
        ids.extend(bos);
        if let Some(b) = bos {
            self.record_tokens(&[b], [common]);
        }
        ids.extend(&new_ids);
        self.record_tokens(&new_ids, starts.into_iter().map(|s| common + s));
        self.state.fed_text = full;
        Ok(ids)
    }

    /// One exchange: adds the user's message, streams the reply through `on_event`, and records
    /// it. `cancel` is checked between prefill chunks and between tokens; what was generated is
    /// kept, and a prompt cut short is finished by the next turn.
    pub fn turn(
        &mut self,
        user: &str,
        max_tokens: Option<usize>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<TurnReport, SessionError> {
        self.state.messages.push(Message::new(Role::User, user));
        self.state.spans.push(0..0);
        let prompt = self.new_prompt_tokens()?;
        let start = Instant::now();
        let logits = self.feed_cancellable(&prompt, self.prefill_chunk, cancel, on_event)?;
        let prefill_time = start.elapsed();
        let Some(logits) = logits else {
            self.checkpoint = None;
            return Ok(TurnReport {
                prompt_tokens: prompt.len() - self.state.pending.len(),
                generated_tokens: 0,
                prefill_time,
                decode_time: Duration::ZERO,
                stop: StopReason::Cancelled,
                reply: String::new(),
            });
        };
        self.checkpoint = Some(Checkpoint {
            cache: self.cache.clone(),
            state: self.state.clone(),
            logits: logits.clone(),
        });
        let mut report = self.generate(logits, max_tokens, cancel, on_event)?;
        report.prompt_tokens = prompt.len();
        report.prefill_time = prefill_time;
        Ok(report)
    }

    /// Feeds the history of a conversation restored without its cache (rendered without a
    /// generation prompt), so the next turn feeds only its own message. Cancellable like a
    /// prefill: what is left stays pending. Returns the number of tokens fed.
    pub fn catch_up(
        &mut self,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<usize, SessionError> {
        if self.state.messages.is_empty() || !self.state.fed_text.is_empty() {
            return Ok(0);
        }
        let full = self.engine.template.render(&self.state.messages, false)?;
        let engine = self.engine.clone();
        let tok = &engine.tokenizer;
        let mut ids = Vec::new();
        if tok.add_bos
            && let (Some(b), Some(text)) = (tok.bos, tok.bos.and_then(|b| tok.id_to_token(b)))
            && !full.starts_with(&text)
        {
            ids.push(b);
            self.record_tokens(&[b], [0]);
        }
        let (new_ids, starts) = tok.encode_with_offsets(&full)?;
        ids.extend(&new_ids);
        self.record_tokens(&new_ids, starts);
        let mut cursor = 0;
        for (i, m) in self.state.messages.iter().enumerate() {
            if !m.content.is_empty()
                && let Some(at) = full[cursor..].find(&m.content)
            {
                self.state.spans[i] = cursor + at..cursor + at + m.content.len();
                cursor += at + m.content.len();
            }
        }
        self.state.fed_text = full;
        self.feed_cancellable(&ids, self.prefill_chunk, cancel, on_event)?;
        Ok(ids.len() - self.state.pending.len())
    }

    /// Whether [`Self::regenerate`] can replace the last reply.
    pub fn can_regenerate(&self) -> bool {
        self.checkpoint.is_some()
            && self
                .state
                .messages
                .last()
                .is_some_and(|m| m.role == Role::Assistant)
    }

    /// Draws a new reply to the last prompt: the cache goes back to its state after that
    /// prompt's prefill (a copy kept for this), so the old reply leaves no trace.
    pub fn regenerate(
        &mut self,
        max_tokens: Option<usize>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(TurnEvent<'_>),
    ) -> Result<Option<TurnReport>, SessionError> {
        if !self.can_regenerate() {
            return Ok(None);
        }
        let Some(c) = &self.checkpoint else {
            return Ok(None);
        };
        self.cache = c.cache.clone();
        let recent = std::mem::take(&mut self.state.recent);
        self.state = c.state.clone();
        // Keep the repeat history of the rejected reply: it should not be drawn again.
        self.state.recent = recent;
        let logits = c.logits.clone();
        self.generate(logits, max_tokens, cancel, on_event)
            .map(Some)
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
        let base = self.state.fed_text.len();
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
                self.state.pending.push(id);
                break StopReason::EndOfTurn;
            }
            generated += 1;
            self.record_tokens(&[id], [base + reply.len()]);
            if let Some(text) = stream.push(&engine.tokenizer, id)? {
                on_event(TurnEvent::Text(&text));
                reply.push_str(&text);
            }
            if max_tokens.is_some_and(|m| generated >= m) || cancel.load(Ordering::Relaxed) {
                // Not fed now: the next turn feeds it first, so stopping costs no forward.
                self.state.pending.push(id);
                continue;
            }
            logits = self.feed(&[id])?;
            on_event(TurnEvent::Stats(self.cache.stats()));
        };
        if let Some(text) = stream.finish(&engine.tokenizer)? {
            on_event(TurnEvent::Text(&text));
            reply.push_str(&text);
        }
        self.state.fed_text.push_str(&reply);
        if stop == StopReason::EndOfTurn {
            let stop_id = self.state.pending.last().copied();
            let stop_text = stop_id.and_then(|id| engine.tokenizer.decode(&[id]).ok());
            if let Some(id) = stop_id {
                self.record_tokens(&[id], [self.state.fed_text.len()]);
            }
            self.state.fed_text.push_str(&stop_text.unwrap_or_default());
        }
        self.state
            .messages
            .push(Message::new(Role::Assistant, reply.clone()));
        self.state.spans.push(base..base + reply.len());
        Ok(TurnReport {
            prompt_tokens: 0,
            generated_tokens: generated,
            prefill_time: Duration::ZERO,
            decode_time: start.elapsed(),
            stop,
            reply,
        })
    }
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return i;
        }
        n = i + ca.len_utf8();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::common_prefix_len;

    #[test]
    fn common_prefix_respects_char_boundaries() {
        assert_eq!(common_prefix_len("héllo", "héllp"), 5);
        assert_eq!(common_prefix_len("abc", "abc"), 3);
        assert_eq!(common_prefix_len("abc", ""), 0);
        assert_eq!(common_prefix_len("日本", "日x"), 3);
    }
}
