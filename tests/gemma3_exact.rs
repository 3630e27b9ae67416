//! Gemma 3 270M (real GGUF, every weight dequantized to f32 so no 8-bit activation quantization
//! amplifies rounding noise): the per-layer Λ geometry and oracle test 2 with the sliding layers.
//!
//! candle-transformers' `quantized_gemma3` cannot serve as the independent implementation here:
//! its MLP uses SiLU where Gemma 3 uses GELU (tanh), as HF's config and llama.cpp do. The
//! independent check is llama.cpp's perplexity instead (tests/perplexity_llamacpp.rs).

mod common;

use std::sync::{Arc, OnceLock};

use common::{TEXT, load_f32, rel_err, rows};
use lambdachat::attention::{HostCache, LambdaParams, LayerGeometry, OracleCache};
use lambdachat::engine::Engine;
use lambdachat::fetch::{GEMMA3_270M, ensure};
use lambdachat::model::Logits;

fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| Arc::new(load_f32(&ensure(&GEMMA3_270M).unwrap())))
        .clone()
}

fn tokens(n: usize) -> Vec<u32> {
    let e = engine();
    let mut ids: Vec<u32> = e.tokenizer.bos.into_iter().collect();
    ids.extend(e.tokenizer.encode(TEXT).unwrap());
    ids.truncate(n);
    assert_eq!(ids.len(), n);
    ids
}

#[test]
fn sliding_layers_keep_their_window_and_full_layers_get_lambda() {
    let e = engine();
    let info = e.model.info();
    assert_eq!(info.architecture, "gemma3");
    assert_eq!(info.sliding_window, Some(512));
    let params = LambdaParams::new(4, 1024, None).unwrap();
    let geometry = e.model.layer_geometry(params);
    let full: Vec<usize> = (0..geometry.len())
        .filter(|&i| geometry[i].window == 1024)
        .collect();
    // Every sixth layer is global; the others slide over 512 tokens with no sinks.
    assert_eq!(full, vec![5, 11, 17]);
    assert!(
        geometry
            .iter()
            .enumerate()
            .all(|(i, g): (usize, &LayerGeometry)| {
                full.contains(&i) || (g.window == 512 && g.n_global == 0)
            })
    );
}

#[test]
fn incremental_lambda_cache_equals_full_sequence_reference() {
    let e = engine();
    let ids = tokens(64);
    let params = LambdaParams::new(4, 24, Some(16)).unwrap();
    let geometry = e.model.layer_geometry(params);
    let mut reference = OracleCache::new(geometry.clone());
    let full = rows(&e.model.forward(&ids, &mut reference, Logits::All).unwrap());
    let mut cache = HostCache::new(params, geometry);
    let prefill = 20;
    let first = rows(
        &e.model
            .forward(&ids[..prefill], &mut cache, Logits::Last)
            .unwrap(),
    );
    let mut worst = rel_err(&first[0], &full[prefill - 1]);
    for (t, id) in ids.iter().enumerate().skip(prefill) {
        let step = rows(&e.model.forward(&[*id], &mut cache, Logits::Last).unwrap());
        worst = worst.max(rel_err(&step[0], &full[t]));
    }
    assert!(worst <= 1e-4, "relative logit error {worst}");
}
