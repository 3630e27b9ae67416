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
        let meta = gguf_vocab::GgufVocab::read(&gguf.meta)?;
        let beside = gguf
            .path
            .parent()
            .map(|d| d.join("tokenizer.json"))
            .filter(|p| p.is_file());
        let inner = match beside {
            Some(p) => load_json_file(&p)?,
            None => meta.build()?,
        };
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            bos: meta.bos,
            eos: meta.eos,
            add_bos: meta.add_bos,
            vocab_size,
        })
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
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos,
            vocab_size,
        })
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

    /// Tokenizes text in which special tokens (`<|im_start|>`…) are recognised, as rendered
    /// chat templates need. No BOS is added here: [`Tokenizer::add_bos`] says when the caller should.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Build(e.to_string()))
    }

    /// [`Self::encode`], plus the byte offset in `text` where each token starts (for mapping
    /// tokens back to the characters the conversation pane shows).
    pub fn encode_with_offsets(
        &self,
        text: &str,
    ) -> Result<(Vec<u32>, Vec<usize>), TokenizerError> {
        let e = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let starts = e
            .get_offsets()
            .iter()
            .map(|(s, _)| (*s).min(text.len()))
            .collect();
        Ok((e.get_ids().to_vec(), starts))
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

/// Words whose merges a BPE model remembers (per thread). The library's default, 10,000 words
/// of up to 256 bytes, lets the new words of an endless chat (names, numbers, identifiers) pile
/// up to megabytes that are never let go; a thousand keeps the common ones.
pub(crate) const BPE_CACHE_WORDS: usize = 1_000;

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
