//! Qwen2 / Qwen2.5 (llama.cpp arch `qwen2`): the pre-norm decoder with q/k/v biases and NEOX
//! (half-split) RoPE.

use super::decoder::{DecoderVariant, PreNormDecoder};
use super::{GgufFile, ModelError, common_info};
use crate::attention::{Rope, RopeStyle};

pub fn load(gguf: &mut GgufFile) -> Result<PreNormDecoder, ModelError> {
    let info = common_info(gguf, "qwen2")?;
    let variant = DecoderVariant {
        qkv_bias: true,
        rope: Rope::new(info.head_dim, info.rope_theta, RopeStyle::Neox),
        rms_eps: gguf.f64("qwen2.attention.layer_norm_rms_epsilon")?,
    };
    PreNormDecoder::load(gguf, info, variant)
}
