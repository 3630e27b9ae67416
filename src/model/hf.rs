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

use super::ModelError;
use super::arch::{self, Architecture, ConfigMetadata, HeadCounts, Relayout, json_to_value};
use super::metadata::Metadata;
use crate::error::candle_msg;

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

/// An opened HF model directory.
pub struct HfModel {
    pub dir: PathBuf,
    pub meta: Metadata,
    arch: &'static Architecture,
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

/// Translates `config.json` into GGUF metadata for `arch`: the fields every architecture shares,
/// then the architecture's own.
fn config_metadata(config: &Json, arch: &Architecture, name: &str) -> HashMap<String, Value> {
    let mut m = HashMap::new();
    m.insert(
        "general.architecture".into(),
        Value::String(arch.name.into()),
    );
    m.insert("general.name".into(), Value::String(name.into()));
    for (hf, gguf) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Some(v) = config.get(hf).and_then(json_to_value) {
            m.insert(gguf.into(), v);
        }
    }
    let mut meta = ConfigMetadata::new(arch.name, &mut m);
    for (hf, gguf) in CONFIG_KEYS {
        if let Some(v) = config.get(*hf).and_then(json_to_value) {
            meta.set(gguf, v);
        }
    }
    if let Some(s) = config.get("rope_scaling").filter(|s| s.is_object()) {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Json::as_str)
            .unwrap_or("linear");
        meta.set("rope.scaling.type", Value::String(kind.into()));
        for (hf, gguf) in ROPE_SCALING_KEYS {
            if let Some(v) = s.get(*hf).and_then(json_to_value) {
                meta.set(gguf, v);
            }
        }
    }
    (arch.read_config)(config, &mut meta);
    m
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
    /// What tells this model's weights from another's of the same shape: its configuration,
    /// the tensor table and the first bytes of every tensor, hashed (see
    /// [`super::GgufFile::fingerprint`]).
    pub fn fingerprint(&self) -> Result<String, ModelError> {
        let mut hash = super::checkpoint::Fingerprint::default();
        let config = self.dir.join("config.json");
        hash.add(&std::fs::read(&config).map_err(|e| ModelError::Io(config.clone(), e))?);
        let mut tensors = self.weights.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in tensors {
            hash.add(format!("{name} {:?} {:?}", view.shape(), view.dtype()).as_bytes());
            let data = view.data();
            hash.add(&data[..data.len().min(super::checkpoint::FINGERPRINT_SAMPLE)]);
        }
        Ok(hash.finish())
    }

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
        let arch = arch::by_hf_type(model_type)
            .ok_or_else(|| ModelError::UnsupportedModelType(model_type.to_string()))?;
        let name = model_name(dir);
        let meta = Metadata::new(&config_path, config_metadata(&config, arch, &name));
        let n_heads = meta.usize(&format!("{}.attention.head_count", arch.name))?;
        let n_kv_heads = meta
            .usize(&format!("{}.attention.head_count_kv", arch.name))
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

    pub fn architecture(&self) -> &'static Architecture {
        self.arch
    }

    pub fn has_tensor(&self, gguf: &str) -> bool {
        self.arch
            .hf_tensor_name(gguf)
            .is_some_and(|hf| self.weights.get(&hf).is_ok())
    }

    /// The tensor llama.cpp calls `gguf`, in llama.cpp's layout, as `dtype`.
    pub fn tensor(&self, gguf: &str, dtype: DType) -> Result<Tensor, ModelError> {
        let hf = self
            .arch
            .hf_tensor_name(gguf)
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
        let heads = HeadCounts {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
        };
        let r = (self.arch.relayout)(gguf, heads);
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
    fn cache_snapshots_are_named_by_their_repo() {
        let snap = Path::new("/h/hub/models--Qwen--Qwen3-0.6B/snapshots/0a1b2c");
        assert_eq!(model_name(snap), "Qwen/Qwen3-0.6B");
        assert_eq!(model_name(Path::new("/models/my-model")), "my-model");
    }
}
