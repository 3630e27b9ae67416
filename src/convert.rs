//! `lambdachat convert GGUF OUTDIR`: a Hugging Face safetensors model directory from a GGUF file
//! — dequantized f32 weights under HF names (llama.cpp's relayouts undone), `config.json`,
//! `tokenizer.json`, `tokenizer_config.json` (chat template, special tokens) and
//! `generation_config.json`. It is how the tests get a real safetensors model without the Hub.
//!
//! The directory is written beside its final name, synced, and renamed into place when complete
//! (see [`crate::durable`]), so an interrupted conversion or a power loss never leaves something
//! that looks like a model; what killed conversions left beside it is removed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_core::quantized::gguf_file::Value;
use serde_json::{Map, Value as Json, json};

use crate::error::candle_msg;
use crate::model::arch::{self, Architecture, HeadCounts};
use crate::model::hf::CONFIG_KEYS;
use crate::model::{GgufFile, ModelError};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{0} already exists and is not empty: choose a new directory")]
    OutputExists(PathBuf),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, String),
    #[error("convert does not handle architecture '{0}' (it handles {list})", list = convertible().join(", "))]
    Architecture(String),
    #[error("tensor '{0}' has no Hugging Face counterpart for {1}")]
    UnmappedTensor(String, String),
}

fn convertible() -> Vec<&'static str> {
    arch::gguf_names()
}

/// What a conversion wrote.
#[derive(Debug)]
pub struct ConvertReport {
    pub tensors: usize,
    pub bytes: u64,
    pub shards: usize,
}

/// Converts `gguf_path` into the new directory `out`; shards the weights into files of at most
/// `max_shard_bytes` (one `model.safetensors` when `None`).
pub fn convert_gguf(
    gguf_path: &Path,
    out: &Path,
    max_shard_bytes: Option<u64>,
) -> Result<ConvertReport, ConvertError> {
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(ConvertError::OutputExists(out.to_path_buf()));
    }
    let mut gguf = GgufFile::open(gguf_path)?;
    let name = gguf.architecture()?;
    let arch = arch::by_gguf_name(&name).ok_or_else(|| ConvertError::Architecture(name.clone()))?;
    let meta = &gguf.meta;
    let n_heads = meta.usize(&format!("{name}.attention.head_count"))?;
    let heads = HeadCounts {
        n_heads,
        n_kv_heads: meta
            .usize(&format!("{name}.attention.head_count_kv"))
            .unwrap_or(n_heads),
    };

    let staging = staging_dir(out);
    let _ = std::fs::remove_dir_all(&staging);
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::durable::remove_abandoned(parent);
    }
    let write_err =
        |p: &Path, e: &dyn std::fmt::Display| ConvertError::Write(p.to_path_buf(), e.to_string());
    std::fs::create_dir_all(&staging).map_err(|e| write_err(&staging, &e))?;
    let result = (|| {
        let mut names = gguf.tensor_names();
        names.sort();
        let mut tensors = BTreeMap::new();
        for tensor in &names {
            if arch.config_tensors.contains(&tensor.as_str()) {
                continue; // written into config.json by the architecture
            }
            let hf = arch
                .hf_tensor_name(tensor)
                .ok_or_else(|| ConvertError::UnmappedTensor(tensor.clone(), name.clone()))?;
            let err = |e: candle_core::Error| ModelError::Tensor(tensor.clone(), candle_msg(&e));
            let t = gguf.f32_tensor(tensor)?;
            let t = (arch.relayout)(tensor, heads).to_hf(&t).map_err(err)?;
            tensors.insert(hf, t);
        }
        let vocab = tensors
            .get("model.embed_tokens.weight")
            .map(|t| t.dims()[0])
            .ok_or_else(|| {
                ModelError::MissingTensor(gguf.path.clone(), "token_embd.weight".into())
            })?;
        let tied = !tensors.contains_key("lm_head.weight");
        let report = write_weights(&staging, tensors, max_shard_bytes)?;

        let config = config_json(&mut gguf, arch, vocab, tied)?;
        write_json(&staging.join("config.json"), &config)?;
        let tokenizer = Tokenizer::for_gguf(&gguf)?;
        tokenizer.save_json(&staging.join("tokenizer.json"))?;
        let text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
        let mut tok_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": text(tokenizer.bos),
            "eos_token": text(tokenizer.eos),
            "add_bos_token": tokenizer.add_bos,
            "model_max_length": config["max_position_embeddings"],
        });
        if let Ok(t) = gguf.meta.string("tokenizer.chat_template") {
            tok_config["chat_template"] = Json::String(t);
        }
        write_json(&staging.join("tokenizer_config.json"), &tok_config)?;
        let mut eos: Vec<u32> = tokenizer.eos.into_iter().collect();
        if let Ok(eot) = gguf.meta.usize("tokenizer.ggml.eot_token_id") {
            eos.push(eot as u32);
        }
        eos.dedup();
        write_json(
            &staging.join("generation_config.json"),
            &json!({"bos_token_id": tokenizer.bos, "eos_token_id": eos}),
        )?;
        Ok(report)
    })();
    match result {
        Ok(report) => {
            if out.exists() {
                std::fs::remove_dir(out).map_err(|e| write_err(out, &e))?;
            }
            // Every file on disk before the name says the model is there.
            crate::durable::sync_tree(&staging).map_err(|e| write_err(&staging, &e))?;
            crate::durable::rename(&staging, out).map_err(|e| write_err(out, &e))?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn staging_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn write_json(path: &Path, value: &Json) -> Result<(), ConvertError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|e| ConvertError::Write(path.into(), e.to_string()))
}

/// Writes the tensors as one file or as shards in name order, with an index.
fn write_weights(
    dir: &Path,
    tensors: BTreeMap<String, Tensor>,
    max_shard_bytes: Option<u64>,
) -> Result<ConvertReport, ConvertError> {
    let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let total: u64 = tensors.values().map(size).sum();
    let count = tensors.len();
    let mut shards: Vec<HashMap<String, Tensor>> = vec![HashMap::new()];
    let mut current = 0u64;
    for (name, t) in tensors {
        let s = size(&t);
        let full = max_shard_bytes.is_some_and(|max| current > 0 && current + s > max);
        if full {
            shards.push(HashMap::new());
            current = 0;
        }
        current += s;
        shards.last_mut().expect("one shard").insert(name, t);
    }
    let n = shards.len();
    let save = |path: &Path, shard: &HashMap<String, Tensor>| {
        candle_core::safetensors::save(shard, path)
            .map_err(|e| ConvertError::Write(path.into(), candle_msg(&e)))
    };
    if n == 1 {
        save(&dir.join("model.safetensors"), &shards[0])?;
    } else {
        let mut weight_map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            save(&dir.join(&file), shard)?;
            for name in shard.keys() {
                weight_map.insert(name.clone(), file.clone());
            }
        }
        write_json(
            &dir.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    Ok(ConvertReport {
        tensors: count,
        bytes: total,
        shards: n,
    })
}

/// `config.json` from the GGUF metadata: the keys `model::hf` reads back, then what HF loaders
/// (transformers, candle-transformers) require of the architecture.
fn config_json(
    gguf: &mut GgufFile,
    arch: &Architecture,
    vocab: usize,
    tied: bool,
) -> Result<Json, ConvertError> {
    let (model_type, class) = arch.hf_types[0];
    let name = gguf.architecture()?;
    let meta = &gguf.meta;
    let mut c = Map::new();
    c.insert("architectures".into(), json!([class]));
    c.insert("model_type".into(), json!(model_type));
    c.insert("torch_dtype".into(), json!("float32"));
    for (hf, key) in CONFIG_KEYS {
        let key = format!("{name}.{key}");
        match meta.value(&key) {
            // f32 values are written as their shortest decimal (1e-6, not 9.99999997e-7).
            Some(Value::F32(x)) => {
                let shortest: f64 = x.to_string().parse().unwrap_or(*x as f64);
                c.insert((*hf).into(), json!(shortest));
            }
            Some(Value::F64(x)) => {
                c.insert((*hf).into(), json!(x));
            }
            Some(_) => {
                if let Ok(n) = meta.usize(&key) {
                    c.insert((*hf).into(), json!(n));
                }
            }
            None => {}
        }
    }
    let hidden = meta.usize(&format!("{name}.embedding_length"))?;
    let heads = meta.usize(&format!("{name}.attention.head_count"))?;
    c.insert("vocab_size".into(), json!(vocab));
    c.entry("head_dim").or_insert(json!(hidden / heads.max(1)));
    c.entry("num_key_value_heads").or_insert(json!(heads));
    c.entry("max_position_embeddings").or_insert(json!(4096));
    c.entry("rope_theta").or_insert(json!(10_000.0));
    c.insert("tie_word_embeddings".into(), json!(tied));
    for (hf, key) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Ok(id) = meta.usize(key) {
            c.insert(hf.into(), json!(id));
        }
    }
    (arch.write_config)(gguf, &mut c)?;
    Ok(Json::Object(c))
}
