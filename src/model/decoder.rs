//! The plain pre-norm decoder that Qwen2, Qwen3, Llama and Phi-3 share: `x + attn(norm(x))`,
//! then `x + mlp(norm(x))`, every layer alike. Architecture files only say how to load it.

use candle_core::Tensor;
use candle_nn::RmsNorm;

use super::checkpoint::Checkpoint;
use super::layers::{
    Activation, GatedMlp, Linear, SelfAttention, forward_err, lm_head, norm, rms_norm,
};
use super::{LanguageModel, Logits, ModelError, ModelInfo, TokenEmbedding};
use crate::attention::{AttentionCache, LambdaParams, LayerGeometry, Rope};

struct Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ffn_norm: RmsNorm,
    mlp: GatedMlp,
}

pub struct PreNormDecoder {
    info: ModelInfo,
    embed: TokenEmbedding,
    blocks: Vec<Block>,
    out_norm: RmsNorm,
    head: Linear,
    sliding_window: Option<usize>,
}

/// What differs between the architectures that share this decoder.
pub struct DecoderVariant {
    pub qkv_bias: bool,
    /// Per-head RMS norms on q and k (Qwen3).
    pub qk_norm: bool,
    pub rope: Rope,
    pub rms_eps: f64,
    /// Fused `attn_qkv` and `[gate; up]` matrices (Phi-3).
    pub fused: bool,
    /// Multiplies the attention logits' 1/√head_dim (Phi-3's LongRoPE attention factor, squared).
    pub logit_scale: f32,
    /// Every layer attends through this sliding window (Phi-3 mini), capped by `n_local`.
    pub sliding_window: Option<usize>,
}

impl DecoderVariant {
    /// The plain variant: no biases, norms, fusion, scaling or window.
    pub fn plain(rope: Rope, rms_eps: f64) -> Self {
        Self {
            qkv_bias: false,
            qk_norm: false,
            rope,
            rms_eps,
            fused: false,
            logit_scale: 1.0,
            sliding_window: None,
        }
    }
}

impl PreNormDecoder {
    pub fn load(
        ckpt: &mut Checkpoint,
        mut info: ModelInfo,
        variant: DecoderVariant,
    ) -> Result<Self, ModelError> {
        let eps = variant.rms_eps;
        let hidden = info.hidden_size;
        let ffn = info.ffn_size;
        let shape = info.head_shape();
        let scale = variant.logit_scale / (info.head_dim as f32).sqrt();
        let embed = TokenEmbedding::load(ckpt, hidden)?;
        info.vocab_size = embed.rows();
        let mut blocks = Vec::with_capacity(info.n_layers);
        for i in 0..info.n_layers {
            let p = format!("blk.{i}");
            blocks.push(Block {
                attn_norm: rms_norm(ckpt, &format!("{p}.attn_norm.weight"), hidden, eps)?,
                attn: if variant.fused {
                    SelfAttention::load_fused(ckpt, &p, shape, variant.rope.clone(), scale)?
                } else {
                    SelfAttention::load(
                        ckpt,
                        &p,
                        shape,
                        variant.qkv_bias,
                        variant.qk_norm.then_some(eps),
                        variant.rope.clone(),
                        scale,
                    )?
                },
                ffn_norm: rms_norm(ckpt, &format!("{p}.ffn_norm.weight"), hidden, eps)?,
                mlp: if variant.fused {
                    GatedMlp::load_fused(ckpt, &p, hidden, ffn, Activation::Silu)?
                } else {
                    GatedMlp::load(ckpt, &p, hidden, ffn, Activation::Silu)?
                },
            });
        }
        let out_norm = rms_norm(ckpt, "output_norm.weight", hidden, eps)?;
        let head = embed.output_head(ckpt)?;
        Ok(Self {
            info,
            embed,
            blocks,
            out_norm,
            head,
            sliding_window: variant.sliding_window,
        })
    }
}

impl LanguageModel for PreNormDecoder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn layer_geometry(&self, params: LambdaParams) -> Vec<LayerGeometry> {
        let (kv, hd) = (self.info.n_kv_heads, self.info.head_dim);
        let g = match self.sliding_window {
            Some(w) => LayerGeometry::sliding(params, kv, hd, w),
            None => LayerGeometry::full(params, kv, hd),
        };
        vec![g; self.info.n_layers]
    }

    fn forward(
        &self,
        tokens: &[u32],
        cache: &mut dyn AttentionCache,
        logits: Logits,
    ) -> Result<Tensor, ModelError> {
        let mut x = self.embed.forward(tokens)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let a = b.attn.forward(&norm(&b.attn_norm, &x)?, i, cache)?;
            x = (x + a).map_err(forward_err)?;
            let m = b.mlp.forward(&norm(&b.ffn_norm, &x)?)?;
            x = (x + m).map_err(forward_err)?;
        }
        cache.advance(tokens.len());
        lm_head(&self.out_norm, &self.head, &x, logits)
    }
}
