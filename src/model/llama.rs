//! Llama 2/3, Mistral, TinyLlama, SmolLM (llama.cpp arch `llama`): the pre-norm decoder without
//! biases, with interleaved RoPE (llama.cpp's converter permutes q/k for it; `model::hf` does the
//! same for safetensors). Llama-3 rope scaling arrives either as the per-frequency divisors
//! `rope_freqs.weight` that llama.cpp's converter writes, or as `rope_scaling` in `config.json`,
//! from which the same divisors are computed.

use std::f64::consts::PI;

use super::arch::{
    Architecture, HeadCounts, LoadResult, Relayout, no_config_fields, write_silu_decoder_config,
};
use super::checkpoint::Checkpoint;
use super::decoder::{DecoderVariant, PreNormDecoder};
use super::{ModelError, ModelInfo, common_info};
use crate::attention::{Rope, RopeStyle};
use crate::error::candle_msg;

pub static ARCHITECTURE: Architecture = Architecture {
    name: "llama",
    gguf_aliases: &["mistral"],
    hf_types: &[
        ("llama", "LlamaForCausalLM"),
        ("mistral", "MistralForCausalLM"),
    ],
    hf_modules: &[],
    relayout,
    read_config: no_config_fields,
    write_config: |gguf, config| write_silu_decoder_config(gguf, config, false),
    config_tensors: &[],
    load,
};

fn load(ckpt: &mut Checkpoint, prefix: &str) -> LoadResult {
    let info = common_info(ckpt, prefix)?;
    let eps = ckpt
        .meta()
        .f64(&format!("{prefix}.attention.layer_norm_rms_epsilon"))?;
    let variant = DecoderVariant::plain(rope(ckpt, prefix, &info)?, eps);
    Ok(Box::new(PreNormDecoder::load(ckpt, info, variant)?))
}

/// llama.cpp's converter permutes q/k rows for interleaved RoPE: HF keeps each head's rotary
/// pairs half-split.
fn relayout(gguf: &str, heads: HeadCounts) -> Relayout {
    if gguf.ends_with("attn_q.weight") {
        Relayout::InterleaveHeads(heads.n_heads)
    } else if gguf.ends_with("attn_k.weight") {
        Relayout::InterleaveHeads(heads.n_kv_heads)
    } else {
        Relayout::None
    }
}

fn rope(ckpt: &mut Checkpoint, arch: &str, info: &ModelInfo) -> Result<Rope, ModelError> {
    let base = Rope::new(info.head_dim, info.rope_theta, RopeStyle::Interleaved);
    let meta = ckpt.meta();
    let key = |k: &str| format!("{arch}.rope.scaling.{k}");
    let kind = meta.string(&key("type")).unwrap_or_default();
    let divisors: Vec<f64> = if ckpt.has_tensor("rope_freqs.weight") {
        ckpt.vector("rope_freqs.weight", base.half_dim())?
            .to_vec1::<f32>()
            .map_err(|e| ModelError::Tensor("rope_freqs.weight".into(), candle_msg(&e)))?
            .into_iter()
            .map(f64::from)
            .collect()
    } else if kind == "llama3" {
        let scaling = Llama3Scaling {
            factor: meta.f64(&key("factor"))?,
            low_freq_factor: meta.f64(&key("low_freq_factor"))?,
            high_freq_factor: meta.f64(&key("high_freq_factor"))?,
            original_context: meta.f64(&key("original_context_length"))?,
        };
        scaling.divisors(base.inv_freq())
    } else if kind == "linear" {
        return Ok(base.scaled_linear(meta.f64(&key("factor"))?));
    } else {
        return Ok(base);
    };
    Ok(base.divided_by(&divisors))
}

/// Llama 3.1's `rope_scaling` (`rope_type: llama3`).
struct Llama3Scaling {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_context: f64,
}

impl Llama3Scaling {
    /// What each frequency is divided by: 1 for short wavelengths, `factor` for long ones, a
    /// smooth blend between (as transformers' `_compute_llama3_parameters`).
    fn divisors(&self, inv_freq: &[f64]) -> Vec<f64> {
        let low_wavelen = self.original_context / self.low_freq_factor;
        let high_wavelen = self.original_context / self.high_freq_factor;
        inv_freq
            .iter()
            .map(|&f| {
                let wavelen = 2.0 * PI / f;
                let scaled = if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / self.factor
                } else {
                    let smooth = (self.original_context / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    (1.0 - smooth) * f / self.factor + smooth * f
                };
                f / scaled
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_divisors_span_one_to_factor() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192.0,
        };
        let rope = Rope::new(128, 500_000.0, RopeStyle::Interleaved);
        let d = s.divisors(rope.inv_freq());
        assert_eq!(d[0], 1.0, "the fastest frequency is kept");
        assert!(
            (d[63] - 8.0).abs() < 1e-12,
            "the slowest is divided by the factor"
        );
        assert!(
            d.windows(2).all(|w| w[0] <= w[1] + 1e-12),
            "monotone: {d:?}"
        );
        // Llama 3.1 8B: the frequencies with wavelengths between 2048 and 8192 are blended.
        assert!(d.iter().any(|&x| x > 1.0 && x < 8.0));
    }
}
