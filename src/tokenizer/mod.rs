//! Tokenizers rebuilt from GGUF metadata, run by the `tokenizers` crate.
//!
//! A GGUF carries its vocabulary (`tokenizer.ggml.*`); we translate it into the equivalent
//! Hugging Face `tokenizer.json` and let `tokenizers` do the work, so byte-level BPE (with the
//! pre-tokenizer regex llama.cpp selects by `tokenizer.ggml.pre`) and SentencePiece BPE (with byte
//! fallback, merges recovered from the scores as HF's converter does) both behave as upstream.
//! A `tokenizer.json` beside the model file wins when present.

mod gguf_vocab;
pub mod hf_files;
mod stream;

use std::path::Path;

use tokenizers::models::ModelWrapper;

pub use hf_files::HfTokenizerFiles;
pub use stream::TextStream;

use crate::model::GgufFile;
use crate::model::metadata::Metadata;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the model has no tokenizer: {0}")]
    Missing(String),
    #[error("unsupported tokenizer model '{0}' (supported: gpt2 BPE, llama/gemma SentencePiece)")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Build(String),
    #[error("token id {0} is outside the vocabulary ({1} tokens)")]
    BadId(u32, usize),
}

/// The tokenizer of a model plus the ids that control generation.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special tokens read as plain text, for what people typed: a
    /// pasted `<|im_end|>` must not end a turn (see [`Tokenizer::encode_with_offsets`]).
    plain: tokenizers::Tokenizer,
    /// `plain` without the space SentencePiece puts before a text, for text that goes on from
    /// text already tokenized (see [`Tokenizer::encode_continuation`]).
    continuing: tokenizers::Tokenizer,
    /// Ids of the special (control) tokens, which only the template's scaffolding may produce.
    control: Vec<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Prepend BOS to a fresh sequence (from `tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    vocab_size: usize,
}

impl Tokenizer {
    /// Builds the tokenizer for a GGUF model: `tokenizer.json` next to it if present, else the
    /// GGUF's own vocabulary.
    pub fn for_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let beside = gguf
            .path
            .parent()
            .map(|d| d.join("tokenizer.json"))
            .filter(|p| p.is_file());
        match beside {
            Some(p) => {
                let meta = gguf_vocab::GgufVocab::read(&gguf.meta)?;
                let inner = load_json_file(&p)?;
                Ok(Self::assemble(inner, meta.bos, meta.eos, meta.add_bos))
            }
            None => Self::from_gguf_metadata(&gguf.meta),
        }
    }

    /// The tokenizer a GGUF's own vocabulary (`tokenizer.ggml.*` in `meta`) describes.
    pub fn from_gguf_metadata(meta: &Metadata) -> Result<Self, TokenizerError> {
        let meta = gguf_vocab::GgufVocab::read(meta)?;
        let inner = meta.build()?;
        Ok(Self::assemble(inner, meta.bos, meta.eos, meta.add_bos))
    }

    /// The tokenizer of a Hugging Face directory: `tokenizer.json` with the special tokens of
    /// `tokenizer_config.json`, falling back to `config.json`'s ids (`model_bos`/`model_eos`).
    /// Whether BOS is prepended is `add_bos_token`, or else what the tokenizer's own
    /// post-processor does.
    pub fn from_hf(
        files: &HfTokenizerFiles,
        model_bos: Option<u32>,
        model_eos: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let inner = load_json_file(&files.tokenizer_json)?;
        let id = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        let bos = id(&files.bos_token).or(model_bos);
        let eos = id(&files.eos_token).or(model_eos);
        let add_bos = match files.add_bos_token {
            Some(b) => b,
            None => {
                let probe = inner
                    .encode_fast("a", true)
                    .map_err(|e| TokenizerError::Build(e.to_string()))?;
                bos.is_some() && probe.get_ids().first().copied() == bos
            }
        };
        Ok(Self::assemble(inner, bos, eos, add_bos))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    ) -> Self {
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let continuing = without_space_prefix(&plain).unwrap_or_else(|| plain.clone());
        let mut control: Vec<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        control.sort_unstable();
        // The highest id + 1, not the count of distinct texts: a vocabulary that holds one text
        // twice (GGUF token lists do) has ids past that count, and every one of them is a row
        // of the model (found by fuzzing: tokens "\0\0", "", "", "\0" encoded to id 3 of "3").
        let vocab_size = inner
            .get_vocab(true)
            .into_values()
            .max()
            .map_or(0, |id| id as usize + 1)
            .max(inner.get_vocab_size(true));
        Self {
            inner,
            plain,
            continuing,
            control,
            bos,
            eos,
            add_bos,
            vocab_size,
        }
    }

    /// Whether `id` is a special (control) token: `<|im_start|>`, `<end_of_turn>`, BOS…
    pub fn is_control(&self, id: u32) -> bool {
        self.control.binary_search(&id).is_ok()
    }

    /// The special (control) tokens, in id order.
    pub fn control_ids(&self) -> &[u32] {
        &self.control
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (the converter).
    pub fn save_json(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner
            .save(path, false)
            .map_err(|e| TokenizerError::Build(format!("{}: {e}", path.display())))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Tokenizes plain text: special tokens' texts are read as the characters they are made of
    /// (evaluation texts, anything a person wrote). No BOS is added here: [`Tokenizer::add_bos`]
    /// says when the caller should.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.plain
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Build(e.to_string()))
    }

    /// Tokenizes plain text that continues a text already tokenized (raw completion's next
    /// part): as [`Tokenizer::encode`], but without the space a SentencePiece tokenizer
    /// otherwise puts before a text, which mid-text would be one space too many. Returns the
    /// ids and the byte offset where each starts.
    pub fn encode_continuation(
        &self,
        text: &str,
    ) -> Result<(Vec<u32>, Vec<usize>), TokenizerError> {
        encode_offsets(&self.continuing, text)
    }

    /// Tokenizes a rendered chat template in which `plain` (sorted, disjoint byte ranges) holds
    /// what people wrote: the scaffolding's special tokens are recognised, the messages' are not,
    /// so a pasted `<|im_end|>\n<|im_start|>system` stays text and cannot forge a turn. Returns
    /// the ids and the byte offset in `text` where each starts.
    ///
    /// The text is tokenized whole first (what Hugging Face's `apply_chat_template` does); only
    /// when a special token falls inside a message is it tokenized again piece by piece, so an
    /// ordinary message keeps exactly the tokens it always had.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        plain: &[std::ops::Range<usize>],
    ) -> Result<(Vec<u32>, Vec<usize>), TokenizerError> {
        let (ids, starts) = encode_offsets(&self.inner, text)?;
        let forged = ids.iter().zip(&starts).any(|(&id, &s)| {
            self.is_control(id) && plain.iter().any(|r| r.start <= s && s < r.end)
        });
        if !forged {
            return Ok((ids, starts));
        }
        let (mut ids, mut starts) = (Vec::new(), Vec::new());
        let mut at = 0;
        let mut piece = |tokenizer: &tokenizers::Tokenizer, range: std::ops::Range<usize>| {
            if range.is_empty() {
                return Ok(());
            }
            let (i, s) = encode_offsets(tokenizer, &text[range.clone()])?;
            ids.extend(i);
            starts.extend(s.into_iter().map(|s| s + range.start));
            Ok::<_, TokenizerError>(())
        };
        for r in plain {
            piece(&self.inner, at..r.start)?;
            piece(&self.plain, r.clone())?;
            at = r.end;
        }
        piece(&self.inner, at..text.len())?;
        Ok((ids, starts))
    }

    /// Decodes ids to text, skipping nothing (special tokens included as text).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(TokenizerError::BadId(*bad, self.vocab_size));
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Build(e.to_string()))
    }

    /// The id of a token's exact text, if it is one token.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Words whose merges a BPE model remembers: none. tokenizers 0.23 keeps them in a
/// thread-local map keyed by the model's id that outlives the model, so every tokenizer built
/// left its words behind for good (the gguf_vocab fuzzer's memory grew by ~4 KB per input until
/// it hit its 2 GiB limit; a chat that loads model after model would grow the same way). With
/// no cache a word's merges are computed each time, microseconds, and only new text is ever
/// encoded. (A `tokenizer.json` BPE keeps an empty entry of that map per load: its cache can
/// be sized, not removed.)
pub(crate) const BPE_CACHE_WORDS: usize = 0;

fn encode_offsets(
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
) -> Result<(Vec<u32>, Vec<usize>), TokenizerError> {
    let e = tokenizer
        .encode(text, false)
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let starts = e
        .get_offsets()
        .iter()
        .map(|(s, _)| (*s).min(text.len()))
        .collect();
    Ok((e.get_ids().to_vec(), starts))
}

/// `tokenizer` without the space SentencePiece tokenizers put before a text: a `Prepend`
/// normalizer, or a Metaspace pre-tokenizer's prepend scheme. `None` when it puts none.
fn without_space_prefix(tokenizer: &tokenizers::Tokenizer) -> Option<tokenizers::Tokenizer> {
    use serde_json::Value;
    /// Drops `Prepend` normalizers (at the top or in a sequence); sets Metaspace's prepending
    /// off. Returns whether anything changed.
    fn strip(v: &mut Value) -> bool {
        match v {
            Value::Array(items) => {
                let before = items.len();
                items.retain(|i| i.get("type").and_then(Value::as_str) != Some("Prepend"));
                let mut changed = items.len() != before;
                for i in items.iter_mut() {
                    changed |= strip(i);
                }
                changed
            }
            Value::Object(map) => {
                let mut changed = false;
                if map.get("type").and_then(Value::as_str) == Some("Metaspace") {
                    for (key, off) in [
                        ("prepend_scheme", Value::from("never")),
                        ("add_prefix_space", Value::from(false)),
                    ] {
                        if map.get(key).is_some_and(|old| *old != off) {
                            map.insert(key.to_string(), off);
                            changed = true;
                        }
                    }
                }
                for child in map.values_mut() {
                    changed |= strip(child);
                }
                changed
            }
            _ => false,
        }
    }
    let mut changed = false;
    let mut out = tokenizer.clone();
    if let Some(n) = tokenizer.get_normalizer() {
        let mut v = serde_json::to_value(n).ok()?;
        if v.get("type").and_then(Value::as_str) == Some("Prepend") {
            out.with_normalizer(None::<tokenizers::NormalizerWrapper>)
                .ok()?;
            changed = true;
        } else if strip(&mut v) {
            let n: tokenizers::NormalizerWrapper = serde_json::from_value(v).ok()?;
            out.with_normalizer(Some(n)).ok()?;
            changed = true;
        }
    }
    if let Some(p) = tokenizer.get_pre_tokenizer() {
        let mut v = serde_json::to_value(p).ok()?;
        if strip(&mut v) {
            let p: tokenizers::PreTokenizerWrapper = serde_json::from_value(v).ok()?;
            out.with_pre_tokenizer(Some(p));
            changed = true;
        }
    }
    changed.then_some(out)
}

fn load_json_file(path: &Path) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let mut tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| TokenizerError::Build(format!("{}: {e}", path.display())))?;
    if let ModelWrapper::BPE(_) = tokenizer.get_model() {
        let mut model = tokenizer.get_model().clone();
        model.resize_cache(BPE_CACHE_WORDS);
        tokenizer.with_model(model);
    }
    Ok(tokenizer)
}
