//! Phi-3, Phi-3.5 and Phi-4-mini (llama.cpp arch `phi3`): the pre-norm decoder with fused
//! `attn_qkv` and `[gate; up]` matrices, NEOX RoPE over the first `rope.dimension_count` dims
//! of each head (partial rotary), a sliding window on every layer when the model has one shorter
//! than its context (Phi-3 mini 4k: 2047), and LongRoPE for the 128k models.
//!
//! LongRoPE switches frequency factors at the original training length; Λ never shows the model a
//! distance beyond `n_local`, so the training length is taken to be the original one and only the
//! short factors are used, with the attention factor (which multiplies cos and sin, hence every
//! logit by its square) applied as a logit scale.

use candle_core::quantized::gguf_file::Value;
use serde_json::{Map, Value as Json, json};

use super::arch::{Architecture, ConfigMetadata, ConfigResult, json_to_value, no_relayout};
use super::checkpoint::Checkpoint;
use super::decoder::{DecoderVariant, PreNormDecoder};
use super::gguf::GgufFile;
use super::{ModelError, common_info};
use crate::attention::{Rope, RopeStyle};
use crate::error::candle_msg;

/// Phi-3's LongRoPE factors, which llama.cpp stores as tensors and HF in `config.json`.
const ROPE_FACTOR_TENSORS: &[&str] = &["rope_factors_long.weight", "rope_factors_short.weight"];

pub static ARCHITECTURE: Architecture = Architecture {
    name: "phi3",
    gguf_aliases: &[],
    hf_types: &[("phi3", "Phi3ForCausalLM")],
    hf_modules: &[("ffn_up", "mlp.gate_up_proj")],
    relayout: no_relayout,
    read_config,
    write_config,
    config_tensors: ROPE_FACTOR_TENSORS,
    load: |ckpt, _| Ok(Box::new(load(ckpt)?)),
};

/// The sliding window, partial rotary embeddings and LongRoPE's per-frequency factors.
fn read_config(config: &Json, meta: &mut ConfigMetadata<'_>) {
    if let Some(v) = config.get("sliding_window").and_then(json_to_value) {
        meta.set("attention.sliding_window", v);
    }
    // Partial rotary embeddings (Phi-3.5/4): llama.cpp records the rotated dims.
    if let Some(f) = config.get("partial_rotary_factor").and_then(Json::as_f64) {
        let hidden = config.get("hidden_size").and_then(Json::as_u64);
        let heads = config.get("num_attention_heads").and_then(Json::as_u64);
        let head_dim = config
            .get("head_dim")
            .and_then(Json::as_u64)
            .or(hidden.zip(heads).map(|(h, n)| h / n.max(1)));
        if let Some(d) = head_dim {
            meta.set(
                "rope.dimension_count",
                Value::U64((d as f64 * f).round() as u64),
            );
        }
    }
    let scaling = config.get("rope_scaling").filter(|s| s.is_object());
    for which in ["short_factor", "long_factor"] {
        if let Some(list) = scaling.and_then(|s| s.get(which)).and_then(Json::as_array) {
            let values = list.iter().filter_map(Json::as_f64).map(Value::F64);
            meta.set(
                &format!("rope.scaling.{which}"),
                Value::Array(values.collect()),
            );
        }
    }
}

/// The activation, partial rotary factor, sliding window and LongRoPE scaling as HF spells them.
fn write_config(gguf: &mut GgufFile, c: &mut Map<String, Json>) -> ConfigResult {
    let longrope = longrope_scaling(gguf)?;
    let meta = &gguf.meta;
    let hidden = meta.usize("phi3.embedding_length")?;
    let heads = meta.usize("phi3.attention.head_count")?;
    c.insert("hidden_act".into(), json!("silu"));
    let head_dim = hidden / heads.max(1);
    if let Ok(rot) = meta.usize("phi3.rope.dimension_count")
        && rot != head_dim
    {
        c.insert(
            "partial_rotary_factor".into(),
            json!(rot as f64 / head_dim as f64),
        );
    }
    if let Ok(w) = meta.usize("phi3.attention.sliding_window") {
        c.insert("sliding_window".into(), json!(w));
    }
    if let Some(scaling) = longrope {
        c.insert("rope_scaling".into(), scaling);
    }
    Ok(())
}

/// `{"type": "longrope", "short_factor": […], "long_factor": […]}` when the GGUF has them.
fn longrope_scaling(gguf: &mut GgufFile) -> Result<Option<Json>, ModelError> {
    if !ROPE_FACTOR_TENSORS.iter().all(|t| gguf.has_tensor(t)) {
        return Ok(None);
    }
    let mut factors = Vec::new();
    for name in ROPE_FACTOR_TENSORS {
        let v: Vec<f32> = gguf
            .f32_tensor(name)?
            .to_vec1()
            .map_err(|e| ModelError::Tensor(name.to_string(), candle_msg(&e)))?;
        factors.push(v);
    }
    let mut scaling = json!({
        "type": "longrope",
        "long_factor": factors[0],
        "short_factor": factors[1],
    });
    if let Ok(f) = gguf.meta.f64("phi3.rope.scaling.attn_factor") {
        scaling["attention_factor"] = json!(f);
    }
    Ok(Some(scaling))
}

fn load(ckpt: &mut Checkpoint) -> Result<PreNormDecoder, ModelError> {
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
