//! Shared helpers for the integration tests: the real default model (fetched once into the data
//! dir, as `lambdachat` itself does) and logits comparisons.

#![allow(dead_code)]

pub mod cli;
pub mod server;
pub mod tiny;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use lambdachat::engine::Engine;
use lambdachat::fetch::{DEFAULT_MODEL, ensure};
use lambdachat::model::{Kernels, LoadOptions};

pub fn default_model_path() -> PathBuf {
    ensure(&DEFAULT_MODEL).expect("the default model can be fetched")
}

/// `path` loaded with every weight matrix dequantized to f32 at load ([`Kernels::F32`]): no 8-bit
/// activation quantization amplifies rounding noise, so exact comparisons hold to ~1e-6.
pub fn load_f32(path: &Path) -> Engine {
    let options = LoadOptions {
        kernels: Kernels::F32,
        ..LoadOptions::default()
    };
    Engine::load_with(path, options).expect("model loads")
}

/// Writes a copy of the GGUF at `from` with every tensor dequantized to f32, for a model of
/// someone else's (candle-transformers') that multiplies by whatever the file holds.
pub fn write_f32_gguf(from: &Path, to: &Path) {
    let mut file = std::fs::File::open(from).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            let dense = q.dequantize(&Device::Cpu).unwrap();
            (
                name.clone(),
                QTensor::quantize(&dense, GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(to).unwrap());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
}

pub fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| Arc::new(Engine::load(&default_model_path()).expect("model loads")))
        .clone()
}

/// max |a − b| / max |b|: a scale-free distance between two logit vectors.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// Asserts that each row of `got` is within `tolerance` of the same row of `want`, by
/// [`rel_err`] (relative to `want`'s scale); `what` names the comparison in the message.
pub fn assert_rows_close(got: &[Vec<f32>], want: &[Vec<f32>], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row counts differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = rel_err(g, w);
        assert!(err < tolerance, "{what} row {i}: relative error {err}");
    }
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

pub const TEXT: &str = "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God said, Let there be light: and there was light. And God saw the light, that it was good: and God divided the light from the darkness. And God called the light Day, and the darkness he called Night. And the evening and the morning were the first day.";

/// The first `n` tokens of [`TEXT`].
pub fn text_tokens(engine: &Engine, n: usize) -> Vec<u32> {
    let ids = engine.tokenizer.encode(TEXT).unwrap();
    assert!(ids.len() >= n, "test text has only {} tokens", ids.len());
    ids[..n].to_vec()
}

/// Logits `[rows, vocab]` as nested vectors.
pub fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}
