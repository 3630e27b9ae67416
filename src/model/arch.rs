//! What the loaders and the converter know about one architecture, in one place. Every
//! architecture file defines one [`Architecture`] next to its forward; [`ARCHITECTURES`] lists
//! them. The GGUF loader picks one by `general.architecture`, the Hugging Face loader by
//! `config.json`'s `model_type` (translating names, values and config fields through it), and
//! `convert` writes the HF directory back through the same descriptor. Adding an architecture is
//! one file and one line in the list.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Tensor};
use serde_json::{Map, Value as Json, json};

use super::checkpoint::Checkpoint;
use super::gguf::GgufFile;
use super::{LanguageModel, ModelError, gemma3, llama, phi3, qwen2, qwen3};

/// Every architecture this build runs, from GGUF or safetensors, in the order messages list them.
pub static ARCHITECTURES: &[&Architecture] = &[
    &llama::ARCHITECTURE,
    &qwen2::ARCHITECTURE,
    &qwen3::ARCHITECTURE,
    &gemma3::ARCHITECTURE,
    &phi3::ARCHITECTURE,
];

/// One architecture as the loaders and the converter see it.
pub struct Architecture {
    /// llama.cpp's name (`general.architecture`), also the prefix of its metadata keys.
    pub name: &'static str,
    /// Other `general.architecture` values loaded the same way.
    pub gguf_aliases: &'static [&'static str],
    /// `config.json` `model_type`s with the class name each goes with (`architectures`); the
    /// converter writes the first.
    pub hf_types: &'static [(&'static str, &'static str)],
    /// HF module names (`self_attn.q_proj`) of llama.cpp modules (`attn_q`) where this
    /// architecture differs from [`COMMON_MODULES`] or adds to them.
    pub hf_modules: &'static [(&'static str, &'static str)],
    /// How llama.cpp's converter changed a tensor's values (see [`Relayout`]).
    pub relayout: fn(gguf: &str, heads: HeadCounts) -> Relayout,
    /// Reads the `config.json` fields of this architecture beyond [`crate::model::hf`]'s common
    /// ones into GGUF metadata.
    pub read_config: fn(config: &Json, meta: &mut ConfigMetadata<'_>),
    /// Writes the `config.json` fields HF loaders require of this architecture, beyond the
    /// common ones `convert` writes.
    pub write_config: fn(gguf: &mut GgufFile, config: &mut Map<String, Json>) -> ConfigResult,
    /// GGUF tensors that HF keeps in `config.json` instead (read there by `read_config`).
    pub config_tensors: &'static [&'static str],
    /// Builds the forward from a checkpoint whose metadata keys start with `prefix.`.
    pub load: fn(ckpt: &mut Checkpoint, prefix: &str) -> LoadResult,
}

pub type ConfigResult = Result<(), ModelError>;
pub type LoadResult = Result<Box<dyn LanguageModel>, ModelError>;

/// llama.cpp module names and their HF names, shared by every architecture.
pub const COMMON_MODULES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_qkv", "self_attn.qkv_proj"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// The architecture llama.cpp calls `name` (or one of its aliases).
pub fn by_gguf_name(name: &str) -> Option<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .copied()
        .find(|a| a.name == name || a.gguf_aliases.contains(&name))
}

/// The architecture of a `config.json` `model_type`.
pub fn by_hf_type(model_type: &str) -> Option<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .copied()
        .find(|a| a.hf_types.iter().any(|(t, _)| *t == model_type))
}

/// Every llama.cpp architecture name this build runs, for messages.
pub fn gguf_names() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|a| a.name).collect()
}

/// Every `config.json` `model_type` this build runs, for messages.
pub fn hf_types() -> Vec<&'static str> {
    ARCHITECTURES
        .iter()
        .flat_map(|a| a.hf_types.iter().map(|(t, _)| *t))
        .collect()
}

impl Architecture {
    /// The HF name of the llama.cpp tensor `gguf`, or `None` when it has no HF counterpart.
    pub fn hf_tensor_name(&self, gguf: &str) -> Option<String> {
        match gguf {
            "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
            "output_norm.weight" => return Some("model.norm.weight".into()),
            "output.weight" => return Some("lm_head.weight".into()),
            _ => {}
        }
        let rest = gguf.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (module, kind) = rest.rsplit_once('.')?;
        let hf = self
            .hf_modules
            .iter()
            .chain(COMMON_MODULES)
            .find(|(m, _)| *m == module)?
            .1;
        Some(format!("model.layers.{layer}.{hf}.{kind}"))
    }
}

/// Attention head counts, for relayouts that work per head.
#[derive(Debug, Clone, Copy)]
pub struct HeadCounts {
    pub n_heads: usize,
    pub n_kv_heads: usize,
}

/// How a tensor's values differ between the HF layout and llama.cpp's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayout {
    None,
    /// Llama q/k rows: HF keeps each head's rotary pairs half-split, llama.cpp interleaves them.
    InterleaveHeads(usize),
    /// Gemma norm weights: llama.cpp stores `1 + w`.
    PlusOne,
}

/// The relayout of architectures whose values llama.cpp keeps as HF has them.
pub fn no_relayout(_gguf: &str, _heads: HeadCounts) -> Relayout {
    Relayout::None
}

impl Relayout {
    /// HF values → llama.cpp values.
    pub fn to_gguf(self, t: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Relayout::None => Ok(t.clone()),
            Relayout::PlusOne => t.to_dtype(DType::F32)? + 1.0,
            Relayout::InterleaveHeads(heads) => {
                let (rows, cols) = t.dims2()?;
                t.reshape((heads, 2, rows / heads / 2, cols))?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((rows, cols))
            }
        }
    }

    /// llama.cpp values → HF values (the converter).
    pub fn to_hf(self, t: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Relayout::None => Ok(t.clone()),
            Relayout::PlusOne => t - 1.0,
            Relayout::InterleaveHeads(heads) => {
                let (rows, cols) = t.dims2()?;
                t.reshape((heads, rows / heads / 2, 2, cols))?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((rows, cols))
            }
        }
    }
}

/// GGUF metadata being built from a `config.json`, keys under the architecture's prefix.
pub struct ConfigMetadata<'a> {
    prefix: &'a str,
    map: &'a mut HashMap<String, Value>,
}

impl<'a> ConfigMetadata<'a> {
    pub fn new(prefix: &'a str, map: &'a mut HashMap<String, Value>) -> Self {
        Self { prefix, map }
    }

    /// Sets `{prefix}.{suffix}`.
    pub fn set(&mut self, suffix: &str, value: Value) {
        self.map.insert(format!("{}.{suffix}", self.prefix), value);
    }
}

/// A JSON value as GGUF metadata: integers stay integers, everything numeric else is f64.
pub fn json_to_value(v: &Json) -> Option<Value> {
    match v {
        Json::Bool(b) => Some(Value::Bool(*b)),
        Json::Number(n) => n
            .as_u64()
            .map(Value::U64)
            .or_else(|| n.as_f64().map(Value::F64)),
        Json::String(s) => Some(Value::String(s.clone())),
        _ => None,
    }
}

/// Architectures with no `config.json` fields of their own.
pub fn no_config_fields(_config: &Json, _meta: &mut ConfigMetadata<'_>) {}

/// The fields HF's SiLU decoders (Llama, Qwen2, Qwen3) need: the activation, whether q/k/v have
/// biases, and Qwen's switched-off sliding window (which its loaders still read).
pub fn write_silu_decoder_config(
    gguf: &GgufFile,
    config: &mut Map<String, Json>,
    attention_bias: bool,
) -> ConfigResult {
    let arch = gguf.architecture()?;
    let layers = gguf.meta.usize(&format!("{arch}.block_count"))?;
    config.insert("hidden_act".into(), json!("silu"));
    config.insert("attention_bias".into(), json!(attention_bias));
    let context = config
        .get("max_position_embeddings")
        .cloned()
        .unwrap_or(Json::Null);
    config.insert("use_sliding_window".into(), json!(false));
    config.insert("sliding_window".into(), context);
    config.insert("max_window_layers".into(), json!(layers));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(name: &str) -> &'static Architecture {
        by_gguf_name(name).unwrap()
    }

    #[test]
    fn names_map_to_hf_per_architecture() {
        let n = |a, g| arch(a).hf_tensor_name(g).unwrap();
        assert_eq!(
            n("qwen2", "blk.3.attn_q.bias"),
            "model.layers.3.self_attn.q_proj.bias"
        );
        assert_eq!(
            n("llama", "blk.0.ffn_norm.weight"),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            n("gemma3", "blk.0.ffn_norm.weight"),
            "model.layers.0.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            n("gemma3", "blk.1.post_attention_norm.weight"),
            "model.layers.1.post_attention_layernorm.weight"
        );
        assert_eq!(n("qwen3", "token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(arch("llama").hf_tensor_name("rope_freqs.weight"), None);
        assert_eq!(
            arch("llama").hf_tensor_name("blk.0.post_ffw_norm.weight"),
            None
        );
    }

    #[test]
    fn relayouts_invert_each_other() {
        let t = Tensor::arange(0f32, 8.0 * 3.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        for r in [Relayout::InterleaveHeads(2), Relayout::PlusOne] {
            let back = r.to_hf(&r.to_gguf(&t).unwrap()).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        }
        // One head of 4 rows (2 rotary pairs): HF rows [a0 a1 b0 b1] → llama.cpp [a0 b0 a1 b1].
        let g = Relayout::InterleaveHeads(2).to_gguf(&t).unwrap();
        let rows: Vec<f32> = g.to_vec2::<f32>().unwrap().iter().map(|r| r[0]).collect();
        assert_eq!(rows, vec![0.0, 6.0, 3.0, 9.0, 12.0, 18.0, 15.0, 21.0]);
    }

    #[test]
    fn every_name_and_type_finds_one_architecture() {
        for a in ARCHITECTURES {
            assert_eq!(by_gguf_name(a.name).unwrap().name, a.name);
            for alias in a.gguf_aliases {
                assert_eq!(by_gguf_name(alias).unwrap().name, a.name);
            }
            for (t, _) in a.hf_types {
                assert_eq!(by_hf_type(t).unwrap().name, a.name);
            }
        }
        assert_eq!(by_gguf_name("mistral").unwrap().name, "llama");
        assert_eq!(by_hf_type("gemma3_text").unwrap().name, "gemma3");
        assert!(by_gguf_name("bert").is_none());
    }
}
