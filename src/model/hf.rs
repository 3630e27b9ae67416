//! Hugging Face model directories: `config.json`, safetensors weights (one file, or shards listed
//! by `model.safetensors.index.json`), memory-mapped.
//!
//! Architecture files ask for hyper-parameters and tensors under llama.cpp's names; this module
//! answers from the HF layout: `config.json` becomes GGUF metadata keys, tensor names are mapped
//! (`blk.3.attn_q.weight` ↔ `model.layers.3.self_attn.q_proj.weight`), and the two places where
//! llama.cpp's converter changes values are undone here and redone in `convert`: Llama's q/k rows
//! are permuted for interleaved RoPE, and Gemma's norm weights are stored as `1 + w`. So one
//! forward per architecture serves both formats.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;

use super::metadata::Metadata;
use super::{ModelError, candle_msg};

/// `config.json` keys and the GGUF key suffixes (after `{arch}.`) they become.
pub const CONFIG_KEYS: &[(&str, &str)] = &[
    ("hidden_size", "embedding_length"),
    ("num_hidden_layers", "block_count"),
    ("intermediate_size", "feed_forward_length"),
    ("num_attention_heads", "attention.head_count"),
    ("num_key_value_heads", "attention.head_count_kv"),
    ("head_dim", "attention.key_length"),
    ("max_position_embeddings", "context_length"),
    ("rope_theta", "rope.freq_base"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
    ("vocab_size", "vocab_size"),
    ("rope_local_base_freq", "rope.local_freq_base"),
    ("query_pre_attn_scalar", "attention.query_pre_attn_scalar"),
    (
        "original_max_position_embeddings",
        "rope.scaling.original_context_length",
    ),
];

/// `rope_scaling` fields and their GGUF key suffixes.
pub const ROPE_SCALING_KEYS: &[(&str, &str)] = &[
    ("factor", "rope.scaling.factor"),
    ("low_freq_factor", "rope.scaling.low_freq_factor"),
    ("high_freq_factor", "rope.scaling.high_freq_factor"),
    ("attention_factor", "rope.scaling.attn_factor"),
    (
        "original_max_position_embeddings",
        "rope.scaling.original_context_length",
    ),
];

/// The llama.cpp architecture name for a `config.json` `model_type`, and the HF class name that
/// the converter writes back.
pub const ARCHITECTURES: &[(&str, &str, &str)] = &[
    ("llama", "llama", "LlamaForCausalLM"),
    ("mistral", "llama", "MistralForCausalLM"),
    ("qwen2", "qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "qwen3", "Qwen3ForCausalLM"),
    ("gemma3_text", "gemma3", "Gemma3ForCausalLM"),
    ("phi3", "phi3", "Phi3ForCausalLM"),
];

/// The HF name of a llama.cpp tensor name for `arch`, or `None` when it has no HF counterpart.
pub fn hf_tensor_name(arch: &str, gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match (module, arch) {
        ("attn_norm", _) => "input_layernorm",
        ("attn_qkv", _) => "self_attn.qkv_proj",
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("attn_q_norm", _) => "self_attn.q_norm",
        ("attn_k_norm", _) => "self_attn.k_norm",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", "phi3") => "mlp.gate_up_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        ("ffn_norm", "gemma3") => "pre_feedforward_layernorm",
        ("ffn_norm", _) => "post_attention_layernorm",
        ("post_attention_norm", "gemma3") => "post_attention_layernorm",
        ("post_ffw_norm", "gemma3") => "post_feedforward_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
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

/// The relayout `arch` applies to the llama.cpp tensor `gguf`, given the head counts.
pub fn relayout(arch: &str, gguf: &str, n_heads: usize, n_kv_heads: usize) -> Relayout {
    match arch {
        "llama" if gguf.ends_with("attn_q.weight") => Relayout::InterleaveHeads(n_heads),
        "llama" if gguf.ends_with("attn_k.weight") => Relayout::InterleaveHeads(n_kv_heads),
        "gemma3" if gguf.ends_with("norm.weight") => Relayout::PlusOne,
        _ => Relayout::None,
    }
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

/// An opened HF model directory.
pub struct HfModel {
    pub dir: PathBuf,
    pub meta: Metadata,
    arch: String,
    weights: MmapedSafetensors,
    /// Weight matrices are converted to this dtype (norms, biases and activations stay f32).
    dtype: DType,
    device: Device,
    n_heads: usize,
    n_kv_heads: usize,
}

fn read_json(path: &Path) -> Result<Json, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io(path.to_path_buf(), e))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::BadConfig(path.to_path_buf(), e.to_string()))
}

/// A JSON value as GGUF metadata: integers stay integers, everything numeric else is f64.
fn json_to_value(v: &Json) -> Option<Value> {
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

/// Translates `config.json` into GGUF metadata for the llama.cpp architecture `arch`.
fn config_metadata(config: &Json, arch: &str, name: &str) -> HashMap<String, Value> {
    let mut m = HashMap::new();
    m.insert("general.architecture".into(), Value::String(arch.into()));
    m.insert("general.name".into(), Value::String(name.into()));
    for (hf, gguf) in CONFIG_KEYS {
        if let Some(v) = config.get(*hf).and_then(json_to_value) {
            m.insert(format!("{arch}.{gguf}"), v);
        }
    }
    if let Some(s) = config.get("rope_scaling").filter(|s| s.is_object()) {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Json::as_str)
            .unwrap_or("linear");
        m.insert(
            format!("{arch}.rope.scaling.type"),
            Value::String(kind.into()),
        );
        for (hf, gguf) in ROPE_SCALING_KEYS {
            if let Some(v) = s.get(*hf).and_then(json_to_value) {
                m.insert(format!("{arch}.{gguf}"), v);
            }
        }
        // LongRoPE's per-frequency factors (Phi-3).
        for which in ["short_factor", "long_factor"] {
            if let Some(list) = s.get(which).and_then(Json::as_array) {
                let values = list.iter().filter_map(Json::as_f64).map(Value::F64);
                m.insert(
                    format!("{arch}.rope.scaling.{which}"),
                    Value::Array(values.collect()),
                );
            }
        }
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
            m.insert(
                format!("{arch}.rope.dimension_count"),
                Value::U64((d as f64 * f).round() as u64),
            );
        }
    }
    // Qwen2 configs name a window they do not use; Phi-3's and Gemma's are real.
    if arch == "phi3"
        && let Some(v) = config.get("sliding_window").and_then(json_to_value)
    {
        m.insert(format!("{arch}.attention.sliding_window"), v);
    }
    if arch == "gemma3" {
        if let Some(v) = config.get("sliding_window").and_then(json_to_value) {
            m.insert(format!("{arch}.attention.sliding_window"), v);
        }
        if let Some(p) = gemma_sliding_pattern(config) {
            m.insert(
                format!("{arch}.attention.sliding_window_type"),
                Value::U64(p as u64),
            );
        }
    }
    for (hf, gguf) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Some(v) = config.get(hf).and_then(json_to_value) {
            m.insert(gguf.into(), v);
        }
    }
    m
}

/// Gemma 3's period of sliding layers: `layer_types` (newer configs) or `sliding_window_pattern`.
fn gemma_sliding_pattern(config: &Json) -> Option<usize> {
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

/// The directory's name, or `ORG/REPO` for a snapshot in the Hugging Face cache
/// (`models--ORG--REPO/snapshots/COMMIT`).
fn model_name(dir: &Path) -> String {
    let name = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let parent = dir.parent();
    if name(parent) == "snapshots"
        && let Some(repo) = name(parent.and_then(Path::parent)).strip_prefix("models--")
    {
        return repo.replacen("--", "/", 1);
    }
    name(Some(dir))
}

/// The safetensors files of `dir`: the shards an index lists (each must exist), else
/// `model.safetensors`, else every `*.safetensors` file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Json::as_object)
            .ok_or_else(|| ModelError::BadConfig(index.clone(), "no \"weight_map\"".into()))?;
        let files: BTreeSet<&str> = map.values().filter_map(Json::as_str).collect();
        let mut paths = Vec::new();
        for f in files {
            let p = dir.join(f);
            if !p.is_file() {
                return Err(ModelError::MissingShard(index.clone(), f.to_string()));
            }
            paths.push(p);
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::Io(dir.to_path_buf(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    all.sort();
    if all.is_empty() {
        return Err(ModelError::NoWeights(dir.to_path_buf()));
    }
    Ok(all)
}

impl HfModel {
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            let gguf = super::gguf::gguf_files_in(dir).into_iter().next();
            return Err(ModelError::NoConfig(dir.to_path_buf(), gguf));
        }
        let config = read_json(&config_path)?;
        let model_type = config
            .get("model_type")
            .and_then(Json::as_str)
            .ok_or_else(|| {
                ModelError::BadConfig(config_path.clone(), "no \"model_type\"".into())
            })?;
        let arch = ARCHITECTURES
            .iter()
            .find(|(hf, _, _)| *hf == model_type)
            .map(|(_, arch, _)| arch.to_string())
            .ok_or_else(|| ModelError::UnsupportedModelType(model_type.to_string()))?;
        let name = model_name(dir);
        let meta = Metadata::new(&config_path, config_metadata(&config, &arch, &name));
        let n_heads = meta.usize(&format!("{arch}.attention.head_count"))?;
        let n_kv_heads = meta
            .usize(&format!("{arch}.attention.head_count_kv"))
            .unwrap_or(n_heads);
        let files = weight_files(dir)?;
        // SAFETY: the files are mapped read-only; like every memory-mapped model loader we rely
        // on nobody truncating them while they are open.
        let weights = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| ModelError::Truncated(files[0].clone(), candle_msg(&e)))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            arch,
            weights,
            dtype,
            device: device.clone(),
            n_heads,
            n_kv_heads,
        })
    }

    pub fn architecture(&self) -> &str {
        &self.arch
    }

    pub fn has_tensor(&self, gguf: &str) -> bool {
        hf_tensor_name(&self.arch, gguf).is_some_and(|hf| self.weights.get(&hf).is_ok())
    }

    /// The tensor llama.cpp calls `gguf`, in llama.cpp's layout, as `dtype`.
    pub fn tensor(&self, gguf: &str, dtype: DType) -> Result<Tensor, ModelError> {
        let hf = hf_tensor_name(&self.arch, gguf)
            .ok_or_else(|| ModelError::MissingTensor(self.dir.clone(), gguf.to_string()))?;
        let view = self.weights.get(&hf).map_err(|_| {
            ModelError::MissingTensor(self.dir.clone(), format!("{hf} (llama.cpp: {gguf})"))
        })?;
        use safetensors::Dtype as St;
        if !matches!(view.dtype(), St::F32 | St::F16 | St::BF16) {
            return Err(ModelError::Tensor(
                hf,
                format!(
                    "dtype {:?}; lambdachat reads f32, f16 and bf16 safetensors weights",
                    view.dtype()
                ),
            ));
        }
        let err = |e: candle_core::Error| {
            ModelError::Tensor(format!("{hf} (llama.cpp: {gguf})"), candle_msg(&e))
        };
        let t = self.weights.load(&hf, &self.device).map_err(err)?;
        let r = relayout(&self.arch, gguf, self.n_heads, self.n_kv_heads);
        let t = if r == Relayout::None {
            t
        } else {
            r.to_gguf(&t.to_dtype(DType::F32).map_err(err)?)
                .map_err(err)?
        };
        t.to_dtype(dtype).map_err(err)
    }

    /// A weight matrix, in the dtype chosen at open.
    pub fn matrix(&self, gguf: &str) -> Result<Tensor, ModelError> {
        self.tensor(gguf, self.dtype)
    }

    /// Weight dtypes as stored, and how many tensors use each, most common first.
    pub fn dtype_summary(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for (_, view) in self.weights.tensors() {
            *counts.entry(format!("{:?}", view.dtype())).or_default() += 1;
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf_per_architecture() {
        let n = |a, g| hf_tensor_name(a, g).unwrap();
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
        assert_eq!(hf_tensor_name("llama", "rope_freqs.weight"), None);
        assert_eq!(hf_tensor_name("llama", "blk.0.post_ffw_norm.weight"), None);
    }

    #[test]
    fn relayouts_invert_each_other() {
        let t = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
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
    fn cache_snapshots_are_named_by_their_repo() {
        let snap = Path::new("/h/hub/models--Qwen--Qwen3-0.6B/snapshots/0a1b2c");
        assert_eq!(model_name(snap), "Qwen/Qwen3-0.6B");
        assert_eq!(model_name(Path::new("/models/my-model")), "my-model");
    }

    #[test]
    fn gemma_pattern_from_layer_types_or_number() {
        let j: Json = serde_json::json!({"layer_types": ["sliding_attention", "sliding_attention", "full_attention"]});
        assert_eq!(gemma_sliding_pattern(&j), Some(3));
        let j: Json = serde_json::json!({"sliding_window_pattern": 6});
        assert_eq!(gemma_sliding_pattern(&j), Some(6));
    }
}
