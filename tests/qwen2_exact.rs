//! Exact whole-model checks on the real default model with every weight dequantized to f32
//! (`Kernels::F32`), so that no 8-bit activation quantization amplifies rounding noise:
//! oracle test 2 of docs/ALGORITHM.md, agreement with candle-transformers' independent
//! `quantized_qwen2` to 1e-3 relative, and independence from the prefill chunking.

mod common;

use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_qwen2::ModelWeights;
use common::{argmax, default_model_path, load_f32, rel_err, rows, text_tokens, write_f32_gguf};
use lambdachat::attention::{HostCache, LambdaParams, OracleCache};
use lambdachat::engine::Engine;
use lambdachat::model::Logits;

/// The f32 engine.
fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| Arc::new(load_f32(&default_model_path())))
        .clone()
}

fn tokens(n: usize) -> Vec<u32> {
    text_tokens(&engine(), n)
}

/// For T ≤ n_local nothing is evicted or clamped: our logits equal ordinary causal attention as
/// computed by candle-transformers' own quantized Qwen2 (prefill, then one token at a time).
#[test]
fn matches_candle_quantized_qwen2_when_nothing_is_evicted() {
    let engine = engine();
    let ids = tokens(48);
    let (prompt, rest) = ids.split_at(40);

    // candle's model multiplies by what the file holds: an f32 copy of the GGUF makes it as
    // exact as ours.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f32.gguf");
    write_f32_gguf(&default_model_path(), &path);
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut theirs = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();

    let params = LambdaParams::new(64, 4096, None).unwrap();
    let mut cache = HostCache::new(params, engine.model.layer_geometry(params));
    let mut worst = 0f32;
    let mut pos = 0;
    for chunk in std::iter::once(prompt).chain(rest.chunks(1)) {
        let ours = engine
            .model
            .forward(chunk, &mut cache, Logits::Last)
            .unwrap();
        let input = Tensor::new(chunk, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let reference = theirs.forward(&input, pos).unwrap();
        pos += chunk.len();
        let (a, b) = (&rows(&ours)[0], &rows(&reference)[0]);
        let err = rel_err(a, b);
        assert_eq!(argmax(a), argmax(b), "argmax differs at position {pos}");
        worst = worst.max(err);
    }
    assert!(worst <= 1e-3, "relative logit error {worst} > 1e-3");
}

/// Oracle test 2: the incremental Λ-cache run (prefill, then one token at a time, with evictions
/// and clamped sinks) equals a full-sequence forward through the dense reference mask.
#[test]
fn incremental_lambda_cache_equals_full_sequence_reference() {
    let engine = engine();
    let ids = tokens(72);
    // Tiny window so that most of the sequence is evicted and the sinks are clamped.
    let params = LambdaParams::new(4, 24, Some(20)).unwrap();
    let geometry = engine.model.layer_geometry(params);

    let mut reference = OracleCache::new(geometry.clone());
    let full = rows(
        &engine
            .model
            .forward(&ids, &mut reference, Logits::All)
            .unwrap(),
    );

    let mut cache = HostCache::new(params, geometry);
    let prefill = 30;
    let mut worst = 0f32;
    let first = engine
        .model
        .forward(&ids[..prefill], &mut cache, Logits::Last)
        .unwrap();
    worst = worst.max(rel_err(&rows(&first)[0], &full[prefill - 1]));
    for (t, id) in ids.iter().enumerate().skip(prefill) {
        let step = engine
            .model
            .forward(&[*id], &mut cache, Logits::Last)
            .unwrap();
        worst = worst.max(rel_err(&rows(&step)[0], &full[t]));
    }
    // f32 cache vs f64 oracle through 24 layers (measured: ~1e-6).
    assert!(worst <= 1e-4, "relative logit error {worst}");
    // The bounded cache really evicted: 4 sinks + 24 window slots per layer.
    assert_eq!(cache.stats().slots_in_use, 24 * 28);
}

/// Results must not depend on the prefill chunking.
#[test]
fn chunking_does_not_change_logits() {
    let engine = engine();
    let ids = tokens(60);
    let params = LambdaParams::new(4, 16, None).unwrap();
    let run = |chunk: usize| {
        let mut cache = HostCache::new(params, engine.model.layer_geometry(params));
        let mut out = Vec::new();
        for c in ids.chunks(chunk) {
            let l = engine.model.forward(c, &mut cache, Logits::All).unwrap();
            out.extend(rows(&l));
        }
        out
    };
    let whole = run(60);
    for chunk in [1, 7, 16] {
        let other = run(chunk);
        for (a, b) in other.iter().zip(&whole) {
            assert!(rel_err(a, b) < 1e-4, "chunk {chunk}");
        }
    }
}
