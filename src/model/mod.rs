//! Model forwards of our own, one file per architecture, all attending through the Λ cache.
//!
//! candle's model files keep their KV cache private; ours take an [`AttentionCache`] from the
//! caller, so the same forward runs the bounded Λ cache, the dense oracle, or vanilla attention.

mod decoder;
mod embedding;
mod gemma3;
pub mod gguf;
mod layers;
mod llama;
mod qwen2;

use std::path::{Path, PathBuf};

use candle_core::Tensor;

pub use embedding::TokenEmbedding;
pub use gguf::GgufFile;

use crate::attention::{AttentionCache, AttentionError, LambdaParams, LayerGeometry};

/// Architectures this build can run from GGUF.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["qwen2", "llama", "gemma3"];

/// Everything that can go wrong opening or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0} is not a GGUF file (it does not start with the GGUF magic)")]
    NotGguf(PathBuf),
    #[error("{0} is truncated or corrupt: {1}")]
    Truncated(PathBuf, String),
    #[error("{0} uses a quantization type this build cannot run: {1}")]
    UnsupportedQuant(PathBuf, String),
    #[error("unsupported architecture '{0}' (supported: {list})", list = SUPPORTED_ARCHITECTURES.join(", "))]
    UnsupportedArchitecture(String),
    #[error("{0} has no metadata key '{1}'")]
    MissingMetadata(PathBuf, String),
    #[error("{0} has no tensor '{1}'")]
    MissingTensor(PathBuf, String),
    #[error("tensor '{0}': {1}")]
    Tensor(String, String),
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

/// Loads a GGUF model, choosing the architecture file from `general.architecture`.
pub fn load_gguf(path: &Path) -> Result<(Box<dyn LanguageModel>, GgufFile), ModelError> {
    let mut gguf = GgufFile::open(path)?;
    let arch = gguf.architecture()?;
    let model: Box<dyn LanguageModel> = match arch.as_str() {
        "qwen2" => Box::new(qwen2::load(&mut gguf)?),
        "llama" | "mistral" => Box::new(llama::load(&mut gguf, &arch)?),
        "gemma3" => Box::new(gemma3::Gemma3::load(&mut gguf)?),
        other => return Err(ModelError::UnsupportedArchitecture(other.to_string())),
    };
    Ok((model, gguf))
}

/// A candle error's message without the backtrace candle appends when `RUST_BACKTRACE` is set:
/// users get one line.
pub fn candle_msg(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or_default().trim().to_string()
}

/// Reads the hyper-parameters every decoder-only GGUF shares, under the `{arch}.` prefix.
pub(crate) fn common_info(gguf: &GgufFile, arch: &str) -> Result<ModelInfo, ModelError> {
    let key = |k: &str| format!("{arch}.{k}");
    let hidden_size = gguf.usize(&key("embedding_length"))?;
    let n_heads = gguf.usize(&key("attention.head_count"))?;
    let n_kv_heads = gguf
        .usize(&key("attention.head_count_kv"))
        .unwrap_or(n_heads);
    let head_dim = gguf
        .usize(&key("attention.key_length"))
        .unwrap_or(hidden_size / n_heads.max(1));
    let vocab_size = match gguf.value("tokenizer.ggml.tokens") {
        Some(v) => v.to_vec().map(|v| v.len()).unwrap_or(0),
        None => 0,
    };
    let vocab_size = gguf.usize(&key("vocab_size")).unwrap_or(vocab_size);
    Ok(ModelInfo {
        architecture: arch.to_string(),
        name: gguf.string("general.name").unwrap_or_else(|_| {
            gguf.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        }),
        n_layers: gguf.usize(&key("block_count"))?,
        hidden_size,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size,
        context_length: gguf.usize(&key("context_length")).unwrap_or(4096),
        sliding_window: gguf.usize(&key("attention.sliding_window")).ok(),
        rope_theta: gguf.f64(&key("rope.freq_base")).unwrap_or(10_000.0),
    })
}
