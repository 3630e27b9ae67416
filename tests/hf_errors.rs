//! Bad Hugging Face model directories through the real binary: each is a clear one-line error
//! naming what is wrong (the file, the architecture, the shard, the tensor), never a panic.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::cli::{assert_clean_error, run};
use common::tiny::write_gguf;

/// A converted tiny Llama directory, to be broken by each test.
fn tiny_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    write_gguf(&gguf, "llama");
    let dir = tmp.path().join("tiny-llama");
    lambdachat::convert::convert_gguf(&gguf, &dir, None).unwrap();
    (tmp, dir)
}

fn inspect(dir: &Path) -> std::process::Output {
    run(&["inspect", "--model", dir.to_str().unwrap()])
}

/// Rewrites `model.safetensors` after `edit` changes its tensors.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn the_intact_directory_loads() {
    let (_tmp, dir) = tiny_dir();
    let out = inspect(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("architecture    llama"), "{stdout}");
    assert!(stdout.contains("F32×"), "{stdout}");
}

#[test]
fn a_directory_without_config_or_weights() {
    let (_tmp, dir) = tiny_dir();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_clean_error(&inspect(&dir), "has no weights");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_clean_error(&inspect(&dir), "has no config.json");
    // A directory of GGUF files (the models dir, say) points at the file.
    std::fs::write(dir.join("m.gguf"), b"GGUF").unwrap();
    assert_clean_error(&inspect(&dir), "(for the GGUF file in it: --model ");
}

#[test]
fn an_unsupported_architecture_is_named() {
    let (_tmp, dir) = tiny_dir();
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"llama\"", "\"bert\"")).unwrap();
    assert_clean_error(
        &inspect(&dir),
        "config.json: unsupported model_type 'bert' (supported: llama, mistral, qwen2, qwen3, gemma3_text, phi3)",
    );
}

#[test]
fn a_shard_missing_from_the_index_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    write_gguf(&gguf, "qwen2");
    let dir = tmp.path().join("sharded");
    // Shards of at most 64 KiB: the tiny model needs several.
    let report = lambdachat::convert::convert_gguf(&gguf, &dir, Some(1 << 16)).unwrap();
    assert!(report.shards > 1, "{report:?}");
    assert!(
        inspect(&dir).status.success(),
        "the sharded directory loads"
    );
    std::fs::remove_file(dir.join(format!("model-00002-of-{:05}.safetensors", report.shards)))
        .unwrap();
    assert_clean_error(
        &inspect(&dir),
        &format!(
            "lists shard 'model-00002-of-{:05}.safetensors', which is missing",
            report.shards
        ),
    );
}

#[test]
fn a_tensor_of_the_wrong_shape_or_dtype_is_named() {
    let (_tmp, dir) = tiny_dir();
    let name = "model.layers.1.self_attn.k_proj.weight";
    rewrite_weights(&dir, |t| {
        let w = t[name].narrow(0, 0, 8).unwrap();
        t.insert(name.into(), w);
    });
    assert_clean_error(
        &inspect(&dir),
        "'model.layers.1.self_attn.k_proj.weight (llama.cpp: blk.1.attn_k.weight)': shape [8, 64], expected [32, 64]",
    );
    rewrite_weights(&dir, |t| {
        let w = Tensor::zeros((32, 64), DType::U8, &Device::Cpu).unwrap();
        t.insert(name.into(), w);
    });
    assert_clean_error(&inspect(&dir), "k_proj.weight': dtype U8");
}

#[test]
fn a_tokenizer_larger_than_the_embedding_table_is_refused() {
    let (_tmp, dir) = tiny_dir();
    rewrite_weights(&dir, |t| {
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let w = t[name].narrow(0, 0, 200).unwrap();
            t.insert(name.into(), w);
        }
    });
    assert_clean_error(
        &inspect(&dir),
        "the tokenizer has 280 tokens but the model's embedding table has 200 rows",
    );
}

#[test]
fn convert_refuses_an_existing_directory_and_leaves_nothing_on_failure() {
    let (tmp, dir) = tiny_dir();
    let gguf = tmp.path().join("tiny.gguf");
    let out = run(&["convert", gguf.to_str().unwrap(), dir.to_str().unwrap()]);
    assert_clean_error(&out, "already exists and is not empty");
    // A GGUF that is not one: an error, and no directory appears.
    let bad = tmp.path().join("bad.gguf");
    std::fs::write(&bad, b"not a model").unwrap();
    let target = tmp.path().join("never");
    assert_clean_error(
        &run(&["convert", bad.to_str().unwrap(), target.to_str().unwrap()]),
        "is not a GGUF file",
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!left.iter().any(|n| n.contains("never")), "{left:?}");
}
