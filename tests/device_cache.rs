//! The GPU path — the tensor Λ cache (`TensorCache`) and the device sampler — gives what the CPU
//! path gives, through whole models: every architecture's tiny model (weights and cache on the
//! test device, `$LAMBDACHAT_TEST_DEVICE`, else the CPU) and the real default model, with
//! evictions; and a whole session on it decodes the same greedy tokens.

mod common;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use common::tiny::{ARCHITECTURES, tiny_model, write_gguf};
use common::{assert_rows_close, default_model_path, load_f32, text_tokens};
use lambdachat::attention::{AttentionCache, HostCache, LambdaParams, TensorCache};
use lambdachat::device::test_device;
use lambdachat::engine::Engine;
use lambdachat::model::{LoadOptions, Logits};
use lambdachat::sampling::SamplingParams;
use lambdachat::session::Session;

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
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        })
        .collect()
}

/// The CPU path (`cpu` engine, host cache) against the tensor cache on `on_device`'s device.
fn compare(
    cpu: &Engine,
    on_device: &Engine,
    params: LambdaParams,
    ids: &[u32],
    chunk: usize,
    tolerance: f32,
    what: &str,
) {
    let layers = cpu.model.layer_geometry(params);
    let mut host = HostCache::new(params, layers.clone());
    let mut tensor = TensorCache::new(params, layers, &on_device.device);
    let a = run(cpu, &mut host, ids, chunk);
    let b = run(on_device, &mut tensor, ids, chunk);
    assert_rows_close(&b, &a, tolerance, what);
}

fn load_on(path: &std::path::Path, device: &Device) -> Engine {
    let options = LoadOptions {
        dtype: DType::F32,
        device: device.clone(),
        ..LoadOptions::default()
    };
    Engine::load_with(path, options).unwrap()
}

#[test]
fn every_architecture_agrees_with_the_cpu_cache() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 5) % 280).collect();
    let device = test_device();
    for arch in ARCHITECTURES {
        let path = dir.path().join(format!("{arch}.gguf"));
        write_gguf(&path, arch);
        let cpu = Engine::load(&path).unwrap();
        let on_device = load_on(&path, &device);
        let params = LambdaParams::new(2, 6, None).unwrap();
        for chunk in [1, 7, 40] {
            compare(
                &cpu,
                &on_device,
                params,
                &ids,
                chunk,
                1e-4,
                &format!("{arch} chunk {chunk}"),
            );
        }
    }
}

/// Greedy decoding through `Session` (prefill, then sample and feed one token at a time).
fn greedy(session: &mut Session, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut logits = session.feed(prompt).unwrap();
    (0..n)
        .map(|_| {
            let id = session.sample(&logits).unwrap();
            logits = session.feed(&[id]).unwrap();
            id
        })
        .collect()
}

/// A whole session on the GPU path — tensor cache and, off the CPU, the device sampler — decodes
/// the CPU session's greedy tokens, past several evictions.
#[test]
fn a_session_on_the_tensor_cache_decodes_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device();
    let prompt: Vec<u32> = (0..20u32).map(|i| (i * 53 + 11) % 280).collect();
    let sampling = SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.3,
        ..SamplingParams::default()
    };
    for arch in ARCHITECTURES {
        let path = dir.path().join(format!("{arch}.gguf"));
        write_gguf(&path, arch);
        let params = LambdaParams::new(2, 8, None).unwrap();
        let mut cpu = Session::new(
            Arc::new(Engine::load(&path).unwrap()),
            params,
            sampling.clone(),
            None,
        )
        .unwrap();
        let mut gpu = Session::new(
            Arc::new(load_on(&path, &device)),
            params,
            sampling.clone(),
            None,
        )
        .unwrap();
        gpu.use_tensor_cache().unwrap();
        let want = greedy(&mut cpu, &prompt, 24);
        let got = greedy(&mut gpu, &prompt, 24);
        assert_eq!(got, want, "{arch}");
        assert_eq!(gpu.stats().tokens_seen, cpu.stats().tokens_seen, "{arch}");
        assert_eq!(gpu.stats().evicted, cpu.stats().evicted, "{arch}");
    }
}

/// Quantized GGUF weights (Q8_0, Q4_0) on the device: the GPU path's logits match the CPU's.
/// On the CPU device the kernels are the same, so the match is tight; a GPU quantizes the
/// activations differently (q8_1 blocks against the CPU's q8_0), which the looser bound covers.
#[test]
fn quantized_weights_run_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device();
    let mut parts = tiny_model("qwen2");
    for (i, (name, t)) in parts.tensors.iter_mut().enumerate() {
        if name.starts_with("blk.") && name.ends_with(".weight") && t.shape().dims().len() == 2 {
            let kind = [GgmlDType::Q8_0, GgmlDType::Q4_0][i % 2];
            let values = t.dequantize(&Device::Cpu).unwrap();
            *t = QTensor::quantize(&values, kind).unwrap();
        }
    }
    let path = dir.path().join("q.gguf");
    parts.write(&path);
    let cpu = Engine::load(&path).unwrap();
    let on_device = load_on(&path, &device);
    let quants: Vec<&str> = cpu.quant.iter().map(|(q, _)| q.as_str()).collect();
    assert!(quants.iter().any(|q| q.contains("Q4_0")), "{quants:?}");
    let ids: Vec<u32> = (0..30u32).map(|i| (i * 41 + 3) % 280).collect();
    let tolerance = if device.is_cpu() { 1e-4 } else { 5e-2 };
    let params = LambdaParams::new(2, 8, None).unwrap();
    for chunk in [1, 30] {
        compare(
            &cpu,
            &on_device,
            params,
            &ids,
            chunk,
            tolerance,
            &format!("Q8_0/Q4_0 chunk {chunk}"),
        );
    }
}

#[test]
fn the_default_model_agrees_with_the_cpu_cache_after_evictions() {
    // f32 weights keep 8-bit activation noise out of the comparison.
    let engine = load_f32(&default_model_path());
    let ids = text_tokens(&engine, 70);
    let params = LambdaParams::new(4, 32, None).unwrap();
    compare(&engine, &engine, params, &ids, 16, 1e-4, "qwen2.5-0.5b");
}
