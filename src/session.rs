//! A conversation: the messages, the Λ cache that holds what the model still attends to, and the
//! bookkeeping that lets each turn feed only its new tokens.
//!
//! The history is never prefilled again: every turn renders the chat template over the whole
//! conversation, keeps only the text after what was already fed, and tokenizes that. So
//! time-to-first-token depends on the new message, not on the conversation's length.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::attention::{AttentionCache, CacheStats, LambdaCache, LambdaParams};
use crate::chat::{Message, Role, TemplateError};
use crate::engine::Engine;
use crate::model::{Logits, ModelError, candle_msg};
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

pub struct Session {
    engine: Arc<Engine>,
    cache: LambdaCache,
    messages: Vec<Message>,
    /// The rendered-template text of everything fed or pending.
    fed_text: String,
    /// Sampled tokens not yet run through the model (the last token of a reply).
    pending: Vec<u32>,
    /// Recent tokens for the repeat penalty.
    recent: Vec<u32>,
    sampler: Sampler,
}

impl Session {
    pub fn new(
        engine: Arc<Engine>,
        params: LambdaParams,
        sampling: SamplingParams,
        system: Option<String>,
    ) -> Result<Self, SessionError> {
        let cache = LambdaCache::new(params, engine.model.layer_geometry(params));
        let messages = system
            .map(|s| vec![Message::new(Role::System, s)])
            .unwrap_or_default();
        Ok(Self {
            engine,
            cache,
            messages,
            fed_text: String::new(),
            pending: Vec::new(),
            recent: Vec::new(),
            sampler: Sampler::new(sampling)?,
        })
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Runs tokens through the model in chunks and returns the last token's logits.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, SessionError> {
        let mut last = None;
        for chunk in ids.chunks(PREFILL_CHUNK) {
            last = Some(
                self.engine
                    .model
                    .forward(chunk, &mut self.cache, Logits::Last)?,
            );
        }
        let logits = last.ok_or_else(|| SessionError::Logits("nothing to feed".into()))?;
        logits
            .flatten_all()
            .and_then(|l| l.to_vec1::<f32>())
            .map_err(|e| SessionError::Logits(candle_msg(&e)))
    }

    /// Samples the next token and remembers it for the repeat penalty.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<u32, SessionError> {
        let id = self.sampler.sample(logits, &self.recent)?;
        self.recent.push(id);
        let keep = self.sampler.params().repeat_last_n.max(1);
        if self.recent.len() > 2 * keep {
            self.recent.drain(..self.recent.len() - keep);
        }
        Ok(id)
    }

    /// The tokens a new user message adds: the rendered template's text after what was fed.
    fn new_prompt_tokens(&mut self) -> Result<Vec<u32>, SessionError> {
        let full = self.engine.template.render(&self.messages, true)?;
        let common = common_prefix_len(&full, &self.fed_text);
        // A template that re-renders history differently (trimming, say) cannot change what the
        // cache holds; the model continues from the first difference.
        let delta = &full[common..];
        let tok = &self.engine.tokenizer;
        let mut ids = std::mem::take(&mut self.pending);
        if self.cache.next_position() == 0 && ids.is_empty() && tok.add_bos {
            let bos_text = tok.bos.and_then(|b| tok.id_to_token(b));
            if let (Some(bos), Some(text)) = (tok.bos, bos_text)
                && !delta.starts_with(&text)
            {
                ids.push(bos);
            }
        }
        ids.extend(tok.encode(delta)?);
        self.fed_text = full;
        Ok(ids)
    }

    /// One exchange: adds the user's message, streams the reply through `on_text`, and records
    /// it. `cancel` is checked between tokens; what was generated is kept.
    pub fn turn(
        &mut self,
        user: &str,
        max_tokens: Option<usize>,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<TurnReport, SessionError> {
        self.messages.push(Message::new(Role::User, user));
        let prompt = self.new_prompt_tokens()?;
        let start = Instant::now();
        let mut logits = self.feed(&prompt)?;
        let prefill_time = start.elapsed();

        let start = Instant::now();
        let engine = self.engine.clone();
        let mut stream = TextStream::new();
        let mut reply = String::new();
        let mut generated = 0;
        let stop = loop {
            if cancel.load(Ordering::Relaxed) {
                break StopReason::Cancelled;
            }
            if max_tokens.is_some_and(|m| generated >= m) {
                break StopReason::Length;
            }
            let id = self.sample(&mut logits)?;
            if engine.is_stop(id) {
                self.pending.push(id);
                break StopReason::EndOfTurn;
            }
            generated += 1;
            if let Some(text) = stream.push(&engine.tokenizer, id)? {
                on_text(&text);
                reply.push_str(&text);
            }
            if max_tokens.is_some_and(|m| generated >= m) || cancel.load(Ordering::Relaxed) {
                // Not fed now: the next turn feeds it first, so stopping costs no forward.
                self.pending.push(id);
                continue;
            }
            logits = self.feed(&[id])?;
        };
        if let Some(text) = stream.finish(&engine.tokenizer)? {
            on_text(&text);
            reply.push_str(&text);
        }
        self.fed_text.push_str(&reply);
        if stop == StopReason::EndOfTurn {
            let stop_text = self
                .pending
                .last()
                .and_then(|&id| engine.tokenizer.decode(&[id]).ok());
            self.fed_text.push_str(&stop_text.unwrap_or_default());
        }
        self.messages
            .push(Message::new(Role::Assistant, reply.clone()));
        Ok(TurnReport {
            prompt_tokens: prompt.len(),
            generated_tokens: generated,
            prefill_time,
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
