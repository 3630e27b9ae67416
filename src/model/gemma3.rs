//! Gemma 3 (llama.cpp arch `gemma3`): embeddings scaled by √hidden, per-head q/k RMS norms,
//! norms after attention and MLP as well as before, GELU(tanh) MLP, and five sliding-window layers
//! (RoPE base 10k, window 512 for 270M) for every full layer (RoPE base 1M, optional linear
//! scaling). Under Λ the sliding layers keep their window (capped by `n_local`) and no sinks; the
//! full layers get the Λ rule.

use candle_core::Tensor;
use candle_transformers::quantized_nn::RmsNorm;

use super::layers::{
    Activation, GatedMlp, Linear, SelfAttention, forward_err, lm_head, norm, rms_norm,
};
use super::{GgufFile, LanguageModel, Logits, ModelError, ModelInfo, TokenEmbedding, common_info};
use crate::attention::{AttentionCache, LambdaParams, LayerGeometry, Rope, RopeStyle};

struct Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    mlp: GatedMlp,
    post_ffn_norm: RmsNorm,
    sliding: bool,
}

pub struct Gemma3 {
    info: ModelInfo,
    embed: TokenEmbedding,
    blocks: Vec<Block>,
    out_norm: RmsNorm,
    head: Linear,
    sliding_window: usize,
}

impl Gemma3 {
    pub fn load(gguf: &mut GgufFile) -> Result<Self, ModelError> {
        let info = common_info(gguf, "gemma3")?;
        let eps = gguf.f64("gemma3.attention.layer_norm_rms_epsilon")?;
        let sliding_window = gguf.usize("gemma3.attention.sliding_window")?;
        let pattern = gguf
            .usize("gemma3.attention.sliding_window_type")
            .unwrap_or(6)
            .max(1);
        let local_base = gguf.f64("gemma3.rope.local_freq_base").unwrap_or(10_000.0);
        let scaling = gguf.f64("gemma3.rope.scaling.factor").unwrap_or(1.0);
        let local_rope = Rope::new(info.head_dim, local_base, RopeStyle::Neox);
        let global_rope =
            Rope::new(info.head_dim, info.rope_theta, RopeStyle::Neox).scaled_linear(scaling);
        let embed = TokenEmbedding::load(gguf)?;
        let mut blocks = Vec::with_capacity(info.n_layers);
        for i in 0..info.n_layers {
            let p = format!("blk.{i}");
            let sliding = (i + 1) % pattern != 0;
            let rope = if sliding { &local_rope } else { &global_rope };
            blocks.push(Block {
                attn_norm: rms_norm(gguf, &format!("{p}.attn_norm.weight"), eps)?,
                attn: SelfAttention::load(
                    gguf,
                    &p,
                    false,
                    Some(eps),
                    info.n_heads,
                    info.n_kv_heads,
                    info.head_dim,
                    rope.clone(),
                    1.0 / (info.head_dim as f32).sqrt(),
                )?,
                post_attn_norm: rms_norm(gguf, &format!("{p}.post_attention_norm.weight"), eps)?,
                ffn_norm: rms_norm(gguf, &format!("{p}.ffn_norm.weight"), eps)?,
                mlp: GatedMlp::load(gguf, &p, Activation::GeluTanh)?,
                post_ffn_norm: rms_norm(gguf, &format!("{p}.post_ffw_norm.weight"), eps)?,
                sliding,
            });
        }
        let out_norm = rms_norm(gguf, "output_norm.weight", eps)?;
        let head = embed.output_head(gguf)?;
        Ok(Self {
            info,
            embed,
            blocks,
            out_norm,
            head,
            sliding_window,
        })
    }
}

impl LanguageModel for Gemma3 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn layer_geometry(&self, params: LambdaParams) -> Vec<LayerGeometry> {
        let (kv, hd) = (self.info.n_kv_heads, self.info.head_dim);
        self.blocks
            .iter()
            .map(|b| {
                if b.sliding {
                    LayerGeometry::sliding(params, kv, hd, self.sliding_window)
                } else {
                    LayerGeometry::full(params, kv, hd)
                }
            })
            .collect()
    }

    fn forward(
        &self,
        tokens: &[u32],
        cache: &mut dyn AttentionCache,
        logits: Logits,
    ) -> Result<Tensor, ModelError> {
        let scale = (self.info.hidden_size as f64).sqrt();
        let mut x = (self.embed.forward(tokens)? * scale).map_err(forward_err)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let a = b.attn.forward(&norm(&b.attn_norm, &x)?, i, cache)?;
            x = (x + norm(&b.post_attn_norm, &a)?).map_err(forward_err)?;
            let m = b.mlp.forward(&norm(&b.ffn_norm, &x)?)?;
            x = (x + norm(&b.post_ffn_norm, &m)?).map_err(forward_err)?;
        }
        cache.advance(tokens.len());
        lm_head(&self.out_norm, &self.head, &x, logits)
    }
}
