//! Llama 2/3, Mistral, TinyLlama, SmolLM (llama.cpp arch `llama`): the pre-norm decoder without
//! biases, with interleaved RoPE (the GGUF converter permutes q/k for it). Llama-3 rope scaling
//! arrives as the per-frequency divisors `rope_freqs.weight` that llama.cpp's converter writes.

use super::decoder::{DecoderVariant, PreNormDecoder};
use super::{GgufFile, ModelError, ModelInfo, common_info};
use crate::attention::{Rope, RopeStyle};
use crate::model::candle_msg;

pub fn load(gguf: &mut GgufFile, arch: &str) -> Result<PreNormDecoder, ModelError> {
    let info = common_info(gguf, arch)?;
    let variant = DecoderVariant {
        qkv_bias: false,
        rope: rope(gguf, &info)?,
        rms_eps: gguf.f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))?,
    };
    PreNormDecoder::load(gguf, info, variant)
}

fn rope(gguf: &mut GgufFile, info: &ModelInfo) -> Result<Rope, ModelError> {
    let base = Rope::new(info.head_dim, info.rope_theta, RopeStyle::Interleaved);
    if !gguf.has_tensor("rope_freqs.weight") {
        return Ok(base);
    }
    let factors = gguf
        .f32_tensor("rope_freqs.weight")?
        .to_vec1::<f32>()
        .map_err(|e| ModelError::Tensor("rope_freqs.weight".into(), candle_msg(&e)))?;
    if factors.len() != base.half_dim() {
        return Err(ModelError::Tensor(
            "rope_freqs.weight".into(),
            format!(
                "{} factors for {} rotary pairs",
                factors.len(),
                base.half_dim()
            ),
        ));
    }
    let inv_freq = base
        .inv_freq()
        .iter()
        .zip(&factors)
        .map(|(f, s)| f / *s as f64)
        .collect();
    Ok(Rope::from_inv_freq(inv_freq, RopeStyle::Interleaved))
}
