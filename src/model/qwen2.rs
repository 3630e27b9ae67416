//! Qwen2 / Qwen2.5 (llama.cpp arch `qwen2`) and Qwen3 (`qwen3`): the pre-norm decoder with NEOX
//! (half-split) RoPE; Qwen2 has q/k/v biases, Qwen3 per-head q/k RMS norms instead.

use super::checkpoint::Checkpoint;
use super::decoder::{DecoderVariant, PreNormDecoder};
use super::{ModelError, common_info};
use crate::attention::{Rope, RopeStyle};

/// Loads `qwen2` or `qwen3`.
pub fn load(ckpt: &mut Checkpoint, arch: &str) -> Result<PreNormDecoder, ModelError> {
    let info = common_info(ckpt, arch)?;
    let qwen3 = arch == "qwen3";
    let rope = Rope::new(info.head_dim, info.rope_theta, RopeStyle::Neox);
    let eps = ckpt
        .meta()
        .f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))?;
    let variant = DecoderVariant {
        qkv_bias: !qwen3,
        qk_norm: qwen3,
        ..DecoderVariant::plain(rope, eps)
    };
    PreNormDecoder::load(ckpt, info, variant)
}
