//! Translation of `tokenizer.ggml.*` metadata into an HF `tokenizer.json` document.

use std::collections::HashMap;

use ahash::AHashMap;
use serde_json::{Value, json};
use tokenizers::AddedToken;
use tokenizers::models::bpe::BPE;

use super::TokenizerError;
use crate::model::metadata::Metadata;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// Qwen2's pre-tokenizer split (HF tokenizer.json of Qwen2/Qwen2.5, llama.cpp `qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's (llama.cpp `llama3` / `llama-bpe`): digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Longest piece, in bytes, that SentencePiece merges are recovered for (see
/// [`GgufVocab::sentencepiece_merges`]).
const MAX_MERGED_PIECE: usize = 128;

/// The vocabulary as the GGUF stores it.
pub struct GgufVocab {
    model: String,
    pre: Option<String>,
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    unk: Option<u32>,
    pub add_bos: bool,
    add_space_prefix: bool,
}

fn strings(gguf: &Metadata, key: &str) -> Vec<String> {
    gguf.value(key)
        .and_then(|v| v.to_vec().ok())
        .map(|v| {
            v.iter()
                .map(|s| s.to_string().cloned().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

fn numbers<T>(
    gguf: &Metadata,
    key: &str,
    f: impl Fn(&candle_core::quantized::gguf_file::Value) -> Option<T>,
) -> Vec<T> {
    gguf.value(key)
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().filter_map(&f).collect())
        .unwrap_or_default()
}

impl GgufVocab {
    pub fn read(gguf: &Metadata) -> Result<Self, TokenizerError> {
        let model = gguf
            .string("tokenizer.ggml.model")
            .map_err(|e| TokenizerError::Missing(e.to_string()))?;
        let tokens = strings(gguf, "tokenizer.ggml.tokens");
        if tokens.is_empty() {
            return Err(TokenizerError::Missing(
                "tokenizer.ggml.tokens is empty".into(),
            ));
        }
        let flag = |k: &str, default: bool| {
            gguf.value(k)
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(default)
        };
        let is_spm = model == "llama";
        let scores = numbers(gguf, "tokenizer.ggml.scores", |v| v.to_f32().ok());
        let types = numbers(gguf, "tokenizer.ggml.token_type", |v| v.to_i32().ok());
        for (key, len) in [("scores", scores.len()), ("token_type", types.len())] {
            if len > tokens.len() {
                return Err(TokenizerError::Build(format!(
                    "tokenizer.ggml.{key} has {len} entries for {} tokens",
                    tokens.len()
                )));
            }
        }
        let id = |k: &str| match gguf.usize(k) {
            Ok(v) if v >= tokens.len() => Err(TokenizerError::Build(format!(
                "{k} is {v}, outside the {} tokens",
                tokens.len()
            ))),
            Ok(v) => Ok(Some(v as u32)),
            Err(_) => Ok(None),
        };
        Ok(Self {
            pre: gguf.string("tokenizer.ggml.pre").ok(),
            scores,
            types,
            merges: strings(gguf, "tokenizer.ggml.merges"),
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token", is_spm),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", is_spm),
            model,
            tokens,
        })
    }

    /// Control and user-defined tokens become added tokens (matched whole, never split).
    fn added_tokens(&self) -> (Vec<AddedToken>, Vec<AddedToken>) {
        let (mut special, mut user) = (Vec::new(), Vec::new());
        for (id, t) in self.types.iter().enumerate() {
            let token =
                || AddedToken::from(self.tokens[id].clone(), *t == TYPE_CONTROL).normalized(false);
            match *t {
                TYPE_CONTROL => special.push(token()),
                TYPE_USER_DEFINED => user.push(token()),
                _ => {}
            }
        }
        (special, user)
    }

    /// The tokenizer: normalizer, pre-tokenizer and decoder from a small `tokenizer.json`
    /// document, the BPE model built directly from the vocabulary (a JSON round trip of 262k
    /// tokens and their merges would cost a second at every start).
    pub fn build(&self) -> Result<tokenizers::Tokenizer, TokenizerError> {
        let err = |e: tokenizers::Error| TokenizerError::Build(e.to_string());
        let (shell, merges, spm) = match self.model.as_str() {
            "gpt2" => (self.byte_level_shell(), self.gpt2_merges(), false),
            "llama" => (
                self.sentencepiece_shell(),
                self.sentencepiece_merges(),
                true,
            ),
            other => return Err(TokenizerError::Unsupported(other.to_string())),
        };
        let mut tok =
            tokenizers::Tokenizer::from_bytes(shell.to_string().as_bytes()).map_err(err)?;
        let vocab: AHashMap<String, u32> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .cache_capacity(super::BPE_CACHE_WORDS);
        if spm {
            builder = builder.byte_fallback(true).fuse_unk(true);
            if let Some(unk) = self.unk.and_then(|u| self.tokens.get(u as usize)) {
                builder = builder.unk_token(unk.clone());
            }
        }
        tok.with_model(builder.build().map_err(err)?);
        let (special, user) = self.added_tokens();
        tok.add_special_tokens(special).map_err(err)?;
        tok.add_tokens(user).map_err(err)?;
        Ok(tok)
    }

    fn gpt2_merges(&self) -> Vec<(String, String)> {
        self.merges
            .iter()
            .filter_map(|m| m.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// GPT-2-style byte-level BPE, with the split llama.cpp uses for `tokenizer.ggml.pre`.
    fn byte_level_shell(&self) -> Value {
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        let (normalizer, pre_tokenizer) = match self.pre.as_deref() {
            Some("qwen2") => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            ),
            Some("llama3" | "llama-bpe" | "llama-v3") => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            ),
            Some("smollm" | "starcoder" | "refact") => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            ),
            _ => (Value::Null, byte_level(true)),
        };
        shell(normalizer, pre_tokenizer, byte_level(true))
    }

    /// SentencePiece BPE merges (llama, mistral, gemma), recovered from the piece scores as HF's
    /// `SentencePieceExtractor` does: every split of a piece into two pieces of the vocabulary,
    /// ordered by the merged piece's score.
    fn sentencepiece_merges(&self) -> Vec<(String, String)> {
        let index: HashMap<&str, usize> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let score = |i: usize| self.scores.get(i).copied().unwrap_or(0.0);
        let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
        for (id, piece) in self.tokens.iter().enumerate() {
            let is_normal = self.types.get(id).is_none_or(|t| *t == 1);
            // Each split hashes its halves: a piece costs its length squared. Real pieces are
            // short (SentencePiece's limit is 16 characters); a longer one is kept whole.
            if !is_normal || piece.len() > MAX_MERGED_PIECE {
                continue;
            }
            for (cut, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(cut);
                if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                    merges.push((score(id), id, li, ri));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        merges
            .iter()
            .map(|(_, _, l, r)| (self.tokens[*l].clone(), self.tokens[*r].clone()))
            .collect()
    }

    /// SentencePiece's text handling: `▁` for spaces (and a dummy prefix where the model adds
    /// one), byte fallback in decoding.
    fn sentencepiece_shell(&self) -> Value {
        let mut normalizers = Vec::new();
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.add_space_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
        shell(
            json!({"type": "Sequence", "normalizers": normalizers}),
            Value::Null,
            json!({"type": "Sequence", "decoders": decoders}),
        )
    }
}

/// A `tokenizer.json` with everything but the vocabulary, which [`GgufVocab::build`] adds.
fn shell(normalizer: Value, pre_tokenizer: Value, decoder: Value) -> Value {
    json!({
        "version": "1.0",
        "added_tokens": [],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": decoder,
        "model": {"type": "BPE", "vocab": {}, "merges": []}
    })
}
