//! Model forwards of our own, one file per architecture, all attending through the Λ cache.
//!
//! candle's model files keep their KV cache private; ours take an [`AttentionCache`] from the
//! caller, so the same forward runs the bounded Λ cache, the dense oracle, or vanilla attention.

pub mod arch;
pub mod checkpoint;
mod decoder;
mod embedding;
mod gemma3;
pub mod gguf;
pub mod hf;
mod layers;
mod llama;
pub mod metadata;
mod phi3;
mod qwen2;
mod qwen3;

use std::path::PathBuf;

use candle_core::Tensor;

pub use checkpoint::{Checkpoint, Kernels, LoadOptions, Source};
pub use embedding::TokenEmbedding;
pub use gguf::GgufFile;

use crate::attention::{AttentionCache, AttentionError, LambdaParams, LayerGeometry};

/// Everything that can go wrong opening or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0} is not a GGUF file (it does not start with the GGUF magic)")]
    NotGguf(PathBuf),
    #[error("{0} is truncated or corrupt: {1}")]
    Truncated(PathBuf, String),
    #[error("{0} is corrupt: tensor '{1}' has {2}")]
    BadTensor(PathBuf, String, String),
    #[error("{0} uses a quantization type this build cannot run: {1}")]
    UnsupportedQuant(PathBuf, String),
    #[error("unsupported architecture '{0}' (supported: {list})", list = arch::gguf_names().join(", "))]
    UnsupportedArchitecture(String),
    #[error("{0} has no metadata key '{1}'")]
    MissingMetadata(PathBuf, String),
    #[error("{0} has no tensor '{1}'")]
    MissingTensor(PathBuf, String),
    #[error("tensor '{0}': {1}")]
    Tensor(String, String),
    #[error(
        "{0} = {1} is beyond {2}, the most this program accepts (a damaged or hostile model file)"
    )]
    OutOfRange(String, usize, usize),
    #[error("config.json: unsupported model_type '{0}' (supported: {list}){hint}",
        list = arch::hf_types().join(", "),
        hint = if .0 == "gemma3" { "; this is a multimodal Gemma 3 checkpoint, use its text-only model" } else { "" })]
    UnsupportedModelType(String),
    #[error("{0} has no config.json: a Hugging Face model directory needs one{hint}",
        hint = .1.as_ref().map(|g| format!(" (for the GGUF file in it: --model {})", g.display())).unwrap_or_default())]
    NoConfig(PathBuf, Option<PathBuf>),
    #[error("{0}: {1}")]
    BadConfig(PathBuf, String),
    #[error("{0} has no weights (no model.safetensors, index or *.safetensors file)")]
    NoWeights(PathBuf),
    #[error("{0} lists shard '{1}', which is missing")]
    MissingShard(PathBuf, String),
    #[error("forward pass failed: {0}")]
    Forward(String),
    #[error(transparent)]
    Attention(#[from] AttentionError),
}

/// Static facts about a loaded model, for `inspect`, the status bar and cache sizing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub architecture: String,
    pub name: String,
    pub n_layers: usize,
    pub hidden_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Inner size of the MLP.
    pub ffn_size: usize,
    /// Training context length from the metadata.
    pub context_length: usize,
    /// Sliding window of the model's local layers, if it has them.
    pub sliding_window: Option<usize>,
    pub rope_theta: f64,
}

/// Which rows of logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (perplexity, tests).
    All,
}

/// A causal language model whose attention goes through a caller-owned cache.
pub trait LanguageModel: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Per-layer attention geometry under the Λ parameters (sliding layers keep their window).
    fn layer_geometry(&self, params: LambdaParams) -> Vec<LayerGeometry>;

    /// Runs `tokens` (the next ones of the conversation held by `cache`) and returns logits
    /// `[rows, vocab]` as f32.
    fn forward(
        &self,
        tokens: &[u32],
        cache: &mut dyn AttentionCache,
        logits: Logits,
    ) -> Result<Tensor, ModelError>;
}

/// Loads a model from a GGUF file or an HF directory, choosing the architecture file from
/// `general.architecture` (or `config.json`'s `model_type`).
pub fn load(ckpt: &mut Checkpoint) -> Result<Box<dyn LanguageModel>, ModelError> {
    let name = ckpt.architecture()?;
    let arch =
        arch::by_gguf_name(&name).ok_or(ModelError::UnsupportedArchitecture(name.clone()))?;
    (arch.load)(ckpt, &name)
}

impl ModelInfo {
    pub(crate) fn head_shape(&self) -> layers::HeadShape {
        layers::HeadShape {
            hidden: self.hidden_size,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// The largest hyper-parameters a model file may declare: several times any model published
/// today, and small enough that the tables sized by them (RoPE frequencies, per-layer state)
/// stay small. A file past them is refused before anything is allocated from them (a fuzzed
/// `attention.key_length` of four billion asked for a 16 GB RoPE table).
const MAX_HIDDEN: usize = 1 << 17;
const MAX_HEADS: usize = 1 << 12;
const MAX_HEAD_DIM: usize = 1 << 12;
const MAX_LAYERS: usize = 1 << 12;
const MAX_FFN: usize = 1 << 20;

/// `value` of metadata key `key`, refused past `max`.
fn capped(key: String, value: usize, max: usize) -> Result<usize, ModelError> {
    if value > max {
        return Err(ModelError::OutOfRange(key, value, max));
    }
    Ok(value)
}

/// Reads the hyper-parameters every decoder-only model shares, under the `{arch}.` prefix.
/// The vocabulary size is the embedding table's, set by the loader.
pub(crate) fn common_info(ckpt: &Checkpoint, arch: &str) -> Result<ModelInfo, ModelError> {
    let meta = ckpt.meta();
    let key = |k: &str| format!("{arch}.{k}");
    let read = |k: &str, max: usize| capped(key(k), meta.usize(&key(k))?, max);
    let hidden_size = read("embedding_length", MAX_HIDDEN)?;
    let n_heads = read("attention.head_count", MAX_HEADS)?;
    if n_heads == 0 {
        return Err(ModelError::Tensor(
            key("attention.head_count"),
            "zero attention heads".into(),
        ));
    }
    let n_kv_heads = meta
        .usize(&key("attention.head_count_kv"))
        .unwrap_or(n_heads);
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(ModelError::Tensor(
            key("attention.head_count_kv"),
            format!("{n_kv_heads} key/value heads do not divide {n_heads} heads"),
        ));
    }
    let head_dim = match meta.usize(&key("attention.key_length")) {
        Ok(d) => capped(key("attention.key_length"), d, MAX_HEAD_DIM)?,
        Err(_) => hidden_size / n_heads,
    };
    Ok(ModelInfo {
        architecture: arch.to_string(),
        name: meta.string("general.name").unwrap_or_else(|_| {
            ckpt.path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        }),
        n_layers: read("block_count", MAX_LAYERS)?,
        hidden_size,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size: 0,
        ffn_size: read("feed_forward_length", MAX_FFN)?,
        context_length: meta.usize(&key("context_length")).unwrap_or(4096),
        sliding_window: meta.usize(&key("attention.sliding_window")).ok(),
        rope_theta: meta.f64(&key("rope.freq_base")).unwrap_or(10_000.0),
    })
}
