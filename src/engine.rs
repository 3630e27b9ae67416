//! A loaded model with everything needed to chat with it: weights, tokenizer, chat template and
//! the token ids that end a turn. Loaded once, shared (read-only) by every session.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::attention::{KvCache, KvType, LambdaParams};
use crate::chat::template::END_OF_TURN_MARKERS;
use crate::chat::{ChatTemplate, TemplateError};
use crate::model::{Checkpoint, LanguageModel, LoadOptions, ModelError, Source};
use crate::tokenizer::{HfTokenizerFiles, Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(
        "the tokenizer has {tokenizer} tokens but the model's embedding table has {model} rows: \
         they do not belong together"
    )]
    VocabMismatch { tokenizer: usize, model: usize },
    #[error(
        "{kv_type} keys and values need a head size that is a multiple of 32, and this model's \
         is {head_dim}: use --kv-type f16"
    )]
    KvType { kv_type: KvType, head_dim: usize },
}

pub struct Engine {
    pub model: Box<dyn LanguageModel>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Sampling any of these ends the assistant's turn.
    pub stop_ids: Vec<u32>,
    pub path: PathBuf,
    /// Weight types (quantizations or dtypes) and how many tensors use each.
    pub quant: Vec<(String, usize)>,
    pub load_time: Duration,
    /// Where the weights live and the forwards run.
    pub device: Device,
    /// Tells these weights from any others of the same shape (saved caches carry it).
    pub fingerprint: String,
    /// How conversations' Λ caches hold keys and values.
    pub kv_type: KvType,
}

impl Engine {
    /// An empty cache for this model under `params`, on the engine's device, holding keys and
    /// values as the engine was loaded to (`--kv-type`): every conversation and evaluation
    /// starts from one.
    pub fn empty_cache(&self, params: LambdaParams) -> KvCache {
        let mut cache = KvCache::new(params, self.model.layer_geometry(params), &self.device);
        cache.set_kv_type(self.kv_type);
        cache
    }

    /// Loads a GGUF file or a Hugging Face directory with the default options.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        Self::load_with(path, LoadOptions::default())
    }

    pub fn load_with(path: &Path, options: LoadOptions) -> Result<Self, EngineError> {
        let start = Instant::now();
        let mut ckpt = Checkpoint::open(path, &options)?;
        let fingerprint = ckpt.fingerprint()?;
        let model = crate::model::load(&mut ckpt)?;
        let (tokenizer, template_source, mut stop_ids) = match &ckpt.source {
            Source::Gguf(gguf) => {
                let tokenizer = Tokenizer::for_gguf(gguf)?;
                let eot = gguf.meta.usize("tokenizer.ggml.eot_token_id").ok();
                let template = gguf.meta.string("tokenizer.chat_template").ok();
                (
                    tokenizer,
                    template,
                    eot.map(|i| i as u32).into_iter().collect(),
                )
            }
            Source::Hf(hf) => {
                let files = HfTokenizerFiles::read(&hf.dir)?;
                let id = |k: &str| hf.meta.usize(k).ok().map(|i| i as u32);
                let tokenizer = Tokenizer::from_hf(
                    &files,
                    id("tokenizer.ggml.bos_token_id"),
                    id("tokenizer.ggml.eos_token_id"),
                )?;
                (tokenizer, files.chat_template, files.eos_ids)
            }
        };
        let head_dim = model.info().head_dim;
        if !options.kv_type.holds_rows_of(head_dim) {
            return Err(EngineError::KvType {
                kv_type: options.kv_type,
                head_dim,
            });
        }
        let rows = model.info().vocab_size;
        if tokenizer.vocab_size() > rows {
            return Err(EngineError::VocabMismatch {
                tokenizer: tokenizer.vocab_size(),
                model: rows,
            });
        }
        let token_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let fallback = ChatTemplate::fallback_for(|t| tokenizer.token_id(t).is_some());
        let template = ChatTemplate::from_model(
            template_source,
            fallback,
            token_text(tokenizer.bos),
            token_text(tokenizer.eos),
            &path.display().to_string(),
        )?;
        stop_ids.extend(tokenizer.eos);
        for marker in END_OF_TURN_MARKERS {
            if template.source().contains(marker) {
                stop_ids.extend(tokenizer.token_id(marker));
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            quant: ckpt.weight_summary(),
            model,
            tokenizer,
            template,
            stop_ids,
            path: path.to_path_buf(),
            load_time: start.elapsed(),
            device: options.device,
            fingerprint,
            kv_type: options.kv_type,
        })
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// The token a reply ends with in this model's template (its end-of-turn marker, else the
    /// end of text): what closes a reply that was given rather than generated.
    pub fn end_of_turn(&self) -> Option<u32> {
        END_OF_TURN_MARKERS
            .iter()
            .filter(|m| self.template.source().contains(*m))
            .find_map(|m| self.tokenizer.token_id(m))
            .or(self.tokenizer.eos)
    }
}
