//! Gemma 3 (llama.cpp arch `gemma3`): embeddings scaled by √hidden, per-head q/k RMS norms,
//! norms after attention and MLP as well as before, GELU(tanh) MLP, and five sliding-window layers
//! (RoPE base 10k, window 512 for 270M) for every full layer (RoPE base 1M, optional linear
//! scaling). Under Λ the sliding layers keep their window (capped by `n_local`) and no sinks; the
//! full layers get the Λ rule.

use candle_core::Tensor;
use candle_core::quantized::gguf_file::Value;
use candle_nn::RmsNorm;
use serde_json::{Map, Value as Json, json};

use super::arch::{
    Architecture, ConfigMetadata, ConfigResult, HeadCounts, Relayout, json_to_value,
};
use super::checkpoint::Checkpoint;
use super::gguf::GgufFile;
use super::layers::{
    Activation, GatedMlp, Linear, SelfAttention, forward_err, lm_head, norm, rms_norm,
};
use super::{LanguageModel, Logits, ModelError, ModelInfo, TokenEmbedding, common_info};
use crate::attention::{AttentionCache, LambdaParams, LayerGeometry, Rope, RopeStyle};

pub static ARCHITECTURE: Architecture = Architecture {
    name: "gemma3",
    gguf_aliases: &[],
    hf_types: &[("gemma3_text", "Gemma3ForCausalLM")],
    hf_modules: &[
        ("ffn_norm", "pre_feedforward_layernorm"),
        ("post_attention_norm", "post_attention_layernorm"),
        ("post_ffw_norm", "post_feedforward_layernorm"),
    ],
    relayout,
    read_config,
    write_config,
    config_tensors: &[],
    load: |ckpt, _| Ok(Box::new(Gemma3::load(ckpt)?)),
};

/// llama.cpp stores Gemma's norm weights as `1 + w`.
fn relayout(gguf: &str, _heads: HeadCounts) -> Relayout {
    if gguf.ends_with("norm.weight") {
        Relayout::PlusOne
    } else {
        Relayout::None
    }
}

/// The sliding window and how often a full layer comes.
fn read_config(config: &Json, meta: &mut ConfigMetadata<'_>) {
    if let Some(v) = config.get("sliding_window").and_then(json_to_value) {
        meta.set("attention.sliding_window", v);
    }
    if let Some(p) = sliding_pattern(config) {
        meta.set("attention.sliding_window_type", Value::U64(p as u64));
    }
}

/// Gemma 3's period of sliding layers: `layer_types` (newer configs) or `sliding_window_pattern`.
fn sliding_pattern(config: &Json) -> Option<usize> {
    if let Some(types) = config.get("layer_types").and_then(Json::as_array) {
        let first_full = types
            .iter()
            .position(|t| t.as_str() == Some("full_attention"))?;
        return Some(first_full + 1);
    }
    ["sliding_window_pattern", "_sliding_window_pattern"]
        .iter()
        .find_map(|k| config.get(*k).and_then(Json::as_u64))
        .map(|p| p as usize)
}

/// What transformers' and candle's Gemma 3 loaders require beyond the common fields.
fn write_config(gguf: &mut GgufFile, c: &mut Map<String, Json>) -> ConfigResult {
    let meta = &gguf.meta;
    let head_dim = c.get("head_dim").cloned().unwrap_or(Json::Null);
    c.entry("query_pre_attn_scalar").or_insert(head_dim);
    c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    c.insert("attention_bias".into(), json!(false));
    c.insert(
        "sliding_window".into(),
        json!(meta.usize("gemma3.attention.sliding_window")?),
    );
    c.insert(
        "sliding_window_pattern".into(),
        json!(
            meta.usize("gemma3.attention.sliding_window_type")
                .unwrap_or(6)
        ),
    );
    c.entry("rope_local_base_freq").or_insert(json!(10_000.0));
    c.insert("final_logit_softcapping".into(), Json::Null);
    c.insert("attn_logit_softcapping".into(), Json::Null);
    if let Ok(f) = meta.f64("gemma3.rope.scaling.factor")
        && f != 1.0
    {
        c.insert(
            "rope_scaling".into(),
            json!({"rope_type": "linear", "factor": f}),
        );
    }
    Ok(())
}

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
    fn load(ckpt: &mut Checkpoint) -> Result<Self, ModelError> {
        let mut info = common_info(ckpt, "gemma3")?;
        let meta = ckpt.meta();
        let eps = meta.f64("gemma3.attention.layer_norm_rms_epsilon")?;
        let sliding_window = meta.usize("gemma3.attention.sliding_window")?;
        let pattern = meta
            .usize("gemma3.attention.sliding_window_type")
            .unwrap_or(6)
            .max(1);
        let local_base = meta.f64("gemma3.rope.local_freq_base").unwrap_or(10_000.0);
        let scaling = meta.f64("gemma3.rope.scaling.factor").unwrap_or(1.0);
        // Gemma 3 scales queries by 1/√query_pre_attn_scalar, which is the head size for every
        // size but 27B; GGUF files do not record it.
        let scale = 1.0
            / meta
                .f64("gemma3.attention.query_pre_attn_scalar")
                .unwrap_or(info.head_dim as f64)
                .sqrt() as f32;
        let local_rope = Rope::new(info.head_dim, local_base, RopeStyle::Neox);
        let global_rope =
            Rope::new(info.head_dim, info.rope_theta, RopeStyle::Neox).scaled_linear(scaling);
        let (hidden, ffn, shape) = (info.hidden_size, info.ffn_size, info.head_shape());
        let embed = TokenEmbedding::load(ckpt, hidden)?;
        info.vocab_size = embed.rows();
        let mut blocks = Vec::with_capacity(info.n_layers);
        for i in 0..info.n_layers {
            let p = format!("blk.{i}");
            let sliding = (i + 1) % pattern != 0;
            let rope = if sliding { &local_rope } else { &global_rope };
            let mut norm = |name: &str| rms_norm(ckpt, &format!("{p}.{name}.weight"), hidden, eps);
            let (attn_norm, post_attn_norm) = (norm("attn_norm")?, norm("post_attention_norm")?);
            let (ffn_norm, post_ffn_norm) = (norm("ffn_norm")?, norm("post_ffw_norm")?);
            blocks.push(Block {
                attn_norm,
                attn: SelfAttention::load(ckpt, &p, shape, false, Some(eps), rope.clone(), scale)?,
                post_attn_norm,
                ffn_norm,
                mlp: GatedMlp::load(ckpt, &p, hidden, ffn, Activation::GeluTanh)?,
                post_ffn_norm,
                sliding,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_from_layer_types_or_number() {
        let j: Json = serde_json::json!({"layer_types": ["sliding_attention", "sliding_attention", "full_attention"]});
        assert_eq!(sliding_pattern(&j), Some(3));
        let j: Json = serde_json::json!({"sliding_window_pattern": 6});
        assert_eq!(sliding_pattern(&j), Some(6));
    }
}
