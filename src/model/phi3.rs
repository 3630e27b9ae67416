//! Phi-3, Phi-3.5 and Phi-4-mini (llama.cpp arch `phi3`): the pre-norm decoder with fused
//! `attn_qkv` and `[gate; up]` matrices, NEOX RoPE over the first `rope.dimension_count` dims
//! of each head (partial rotary), a sliding window on every layer when the model has one shorter
//! than its context (Phi-3 mini 4k: 2047), and LongRoPE for the 128k models.
//!
//! LongRoPE switches frequency factors at the original training length; Λ never shows the model a
//! distance beyond `n_local`, so the training length is taken to be the original one and only the
//! short factors are used, with the attention factor (which multiplies cos and sin, hence every
//! logit by its square) applied as a logit scale.

use super::checkpoint::Checkpoint;
use super::decoder::{DecoderVariant, PreNormDecoder};
use super::{ModelError, candle_msg, common_info};
use crate::attention::{Rope, RopeStyle};

pub fn load(ckpt: &mut Checkpoint) -> Result<PreNormDecoder, ModelError> {
    let mut info = common_info(ckpt, "phi3")?;
    let meta = ckpt.meta();
    let eps = meta.f64("phi3.attention.layer_norm_rms_epsilon")?;
    let rope_dim = meta
        .usize("phi3.rope.dimension_count")
        .unwrap_or(info.head_dim);
    if rope_dim > info.head_dim || !rope_dim.is_multiple_of(2) {
        return Err(ModelError::Tensor(
            "phi3.rope.dimension_count".into(),
            format!("{rope_dim} rotary dims for heads of {}", info.head_dim),
        ));
    }
    let original = meta.usize("phi3.rope.scaling.original_context_length").ok();
    let attn_factor = meta.f64("phi3.rope.scaling.attn_factor").ok();
    let base = Rope::new(rope_dim, info.rope_theta, RopeStyle::Neox);
    let (rope, logit_scale) = match short_factors(ckpt, rope_dim / 2)? {
        None => (base, 1.0),
        Some(factors) => {
            let original = original.unwrap_or(info.context_length);
            let factor = attn_factor
                .unwrap_or_else(|| longrope_attention_factor(info.context_length, original));
            info.context_length = original;
            (base.divided_by(&factors), (factor * factor) as f32)
        }
    };
    let sliding_window = info.sliding_window.filter(|&w| w < info.context_length);
    let variant = DecoderVariant {
        fused: true,
        logit_scale,
        sliding_window,
        ..DecoderVariant::plain(rope, eps)
    };
    PreNormDecoder::load(ckpt, info, variant)
}

/// LongRoPE's short frequency factors: a GGUF tensor, or `rope_scaling.short_factor` of
/// `config.json`.
fn short_factors(ckpt: &mut Checkpoint, pairs: usize) -> Result<Option<Vec<f64>>, ModelError> {
    const TENSOR: &str = "rope_factors_short.weight";
    let factors = if ckpt.has_tensor(TENSOR) {
        ckpt.vector(TENSOR, pairs)?
            .to_vec1::<f32>()
            .map_err(|e| ModelError::Tensor(TENSOR.into(), candle_msg(&e)))?
            .into_iter()
            .map(f64::from)
            .collect()
    } else {
        match ckpt.meta().f64_array("phi3.rope.scaling.short_factor") {
            Some(f) => f,
            None => return Ok(None),
        }
    };
    if factors.len() != pairs {
        return Err(ModelError::Tensor(
            "rope short factors".into(),
            format!("{} factors for {pairs} rotary pairs", factors.len()),
        ));
    }
    Ok(Some(factors))
}

/// `√(1 + ln(scale) / ln(original))` for a context extended `scale` times (1 when not extended).
fn longrope_attention_factor(context: usize, original: usize) -> f64 {
    let scale = context as f64 / original.max(1) as f64;
    if scale <= 1.0 {
        1.0
    } else {
        (1.0 + scale.ln() / (original as f64).ln()).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_factor_of_phi35_mini() {
        // 131072 / 4096 = 32: √(1 + ln 32 / ln 4096) = √(1 + 5/12).
        let f = longrope_attention_factor(131_072, 4096);
        assert!((f - (1.0f64 + 5.0 / 12.0).sqrt()).abs() < 1e-12);
        assert_eq!(longrope_attention_factor(4096, 4096), 1.0);
    }
}
