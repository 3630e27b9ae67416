//! Qwen2 / Qwen2.5 (llama.cpp arch `qwen2`): the pre-norm decoder with q/k/v biases and NEOX
//! (half-split) RoPE.

use super::arch::{
    Architecture, LoadResult, no_config_fields, no_relayout, write_silu_decoder_config,
};
use super::checkpoint::Checkpoint;
use super::decoder::{DecoderVariant, PreNormDecoder};
use super::{ModelError, ModelInfo, common_info};
use crate::attention::{Rope, RopeStyle};

pub static ARCHITECTURE: Architecture = Architecture {
    name: "qwen2",
    gguf_aliases: &[],
    hf_types: &[("qwen2", "Qwen2ForCausalLM")],
    hf_modules: &[],
    relayout: no_relayout,
    read_config: no_config_fields,
    write_config: |gguf, config| write_silu_decoder_config(gguf, config, true),
    config_tensors: &[],
    load,
};

fn load(ckpt: &mut Checkpoint, prefix: &str) -> LoadResult {
    let info = common_info(ckpt, prefix)?;
    let variant = DecoderVariant {
        qkv_bias: true,
        ..neox_variant(ckpt, prefix, &info)?
    };
    Ok(Box::new(PreNormDecoder::load(ckpt, info, variant)?))
}

/// The plain decoder with NEOX RoPE at the model's base, as Qwen2 and Qwen3 have it.
pub(super) fn neox_variant(
    ckpt: &Checkpoint,
    prefix: &str,
    info: &ModelInfo,
) -> Result<DecoderVariant, ModelError> {
    let rope = Rope::new(info.head_dim, info.rope_theta, RopeStyle::Neox);
    let eps = ckpt
        .meta()
        .f64(&format!("{prefix}.attention.layer_norm_rms_epsilon"))?;
    Ok(DecoderVariant::plain(rope, eps))
}
