//! The device cache (`DeviceCache`: the Λ rule in candle tensor operations, the path a GPU takes)
//! gives the same logits as the CPU cache through whole models, on the CPU device: every
//! architecture's tiny model and the real default model, with evictions.

mod common;

use candle_core::Device;
use common::tiny::{ARCHITECTURES, write_gguf};
use common::{assert_rows_close, default_model_path, text_tokens};
use lambdachat::attention::{AttentionCache, DeviceCache, LambdaCache, LambdaParams};
use lambdachat::engine::Engine;
use lambdachat::model::Logits;

/// All-rows logits of `ids` fed in chunks of `chunk` through `cache`.
fn run(
    engine: &Engine,
    cache: &mut dyn AttentionCache,
    ids: &[u32],
    chunk: usize,
) -> Vec<Vec<f32>> {
    ids.chunks(chunk)
        .flat_map(|c| {
            engine
                .model
                .forward(c, cache, Logits::All)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        })
        .collect()
}

fn compare(
    engine: &Engine,
    params: LambdaParams,
    ids: &[u32],
    chunk: usize,
    tolerance: f32,
    what: &str,
) {
    let layers = engine.model.layer_geometry(params);
    let mut cpu = LambdaCache::new(params, layers.clone());
    let mut device = DeviceCache::new(layers, &Device::Cpu);
    let a = run(engine, &mut cpu, ids, chunk);
    let b = run(engine, &mut device, ids, chunk);
    assert_rows_close(&b, &a, tolerance, what);
}

#[test]
fn every_architecture_agrees_with_the_cpu_cache() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 5) % 280).collect();
    for arch in ARCHITECTURES {
        let path = dir.path().join(format!("{arch}.gguf"));
        write_gguf(&path, arch);
        let engine = Engine::load(&path).unwrap();
        let params = LambdaParams::new(2, 6, None).unwrap();
        for chunk in [1, 7, 40] {
            compare(
                &engine,
                params,
                &ids,
                chunk,
                1e-4,
                &format!("{arch} chunk {chunk}"),
            );
        }
    }
}

#[test]
fn the_default_model_agrees_with_the_cpu_cache_after_evictions() {
    // SAFETY: set before any model is built, in the only test of this binary that loads one
    // from this environment; f32 weights keep 8-bit activation noise out of the comparison.
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    let engine = Engine::load(&default_model_path()).unwrap();
    let ids = text_tokens(&engine, 70);
    let params = LambdaParams::new(4, 32, None).unwrap();
    compare(&engine, params, &ids, 16, 1e-4, "qwen2.5-0.5b");
}
