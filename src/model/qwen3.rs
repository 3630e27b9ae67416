//! Qwen3 (llama.cpp arch `qwen3`): Qwen2's decoder with per-head q/k RMS norms instead of q/k/v
//! biases.

use super::arch::{
    Architecture, LoadResult, no_config_fields, no_relayout, write_silu_decoder_config,
};
use super::checkpoint::Checkpoint;
use super::decoder::{DecoderVariant, PreNormDecoder};
use super::{common_info, qwen2};

pub static ARCHITECTURE: Architecture = Architecture {
    name: "qwen3",
    gguf_aliases: &[],
    hf_types: &[("qwen3", "Qwen3ForCausalLM")],
    hf_modules: &[],
    relayout: no_relayout,
    read_config: no_config_fields,
    write_config: |gguf, config| write_silu_decoder_config(gguf, config, false),
    config_tensors: &[],
    load,
};

fn load(ckpt: &mut Checkpoint, prefix: &str) -> LoadResult {
    let info = common_info(ckpt, prefix)?;
    let variant = DecoderVariant {
        qk_norm: true,
        ..qwen2::neox_variant(ckpt, prefix, &info)?
    };
    Ok(Box::new(PreNormDecoder::load(ckpt, info, variant)?))
}
