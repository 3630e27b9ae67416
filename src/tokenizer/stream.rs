//! Streaming detokenization: text is emitted as soon as it is valid UTF-8.
//!
//! A character can span several tokens (byte-level BPE splits emoji and CJK into bytes;
//! SentencePiece falls back to `<0xNN>` tokens), and decoders such as SentencePiece's strip or
//! merge spaces depending on context. So each step decodes a short window of recent ids twice,
//! with and without the newest, and emits the difference once it no longer ends in an incomplete
//! character (U+FFFD).

use super::{Tokenizer, TokenizerError};

#[derive(Debug, Default, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the context window decoded with each new id.
    prefix: usize,
    /// End of the text already emitted.
    read: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one generated id; returns the text that became complete, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len()
            && !after.ends_with('\u{FFFD}')
            && let Some(delta) = after.get(before.len()..)
        {
            let delta = delta.to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(Some(delta));
        }
        Ok(None)
    }

    /// Text still held back (an incomplete character at the end of generation), lossy.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>, TokenizerError> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(after
            .get(before.len()..)
            .filter(|d| !d.is_empty())
            .map(str::to_string))
    }
}
