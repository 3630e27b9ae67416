//! A loaded model with everything needed to chat with it: weights, tokenizer, chat template and
//! the token ids that end a turn. Loaded once, shared (read-only) by every session.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;

use crate::chat::template::END_OF_TURN_MARKERS;
use crate::chat::{ChatTemplate, TemplateError};
use crate::model::{LanguageModel, ModelError, load_gguf};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
}

pub struct Engine {
    pub model: Box<dyn LanguageModel>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Sampling any of these ends the assistant's turn.
    pub stop_ids: Vec<u32>,
    pub path: PathBuf,
    /// Quantization types of the weights and how many tensors use each.
    pub quant: Vec<(GgmlDType, usize)>,
    pub load_time: Duration,
}

impl Engine {
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let start = Instant::now();
        let (model, gguf) = load_gguf(path)?;
        let tokenizer = Tokenizer::for_gguf(&gguf)?;
        let token_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let fallback = ChatTemplate::fallback_for(|t| tokenizer.token_id(t).is_some());
        let template = ChatTemplate::new(
            gguf.string("tokenizer.chat_template").ok(),
            fallback,
            token_text(tokenizer.bos),
            token_text(tokenizer.eos),
        )?;
        let mut stop_ids: Vec<u32> = tokenizer.eos.into_iter().collect();
        if let Ok(eot) = gguf.usize("tokenizer.ggml.eot_token_id") {
            stop_ids.push(eot as u32);
        }
        for marker in END_OF_TURN_MARKERS {
            if template.source().contains(marker) {
                stop_ids.extend(tokenizer.token_id(marker));
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            quant: gguf.quant_summary(),
            model,
            tokenizer,
            template,
            stop_ids,
            path: path.to_path_buf(),
            load_time: start.elapsed(),
        })
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }
}
