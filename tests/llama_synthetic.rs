//! A tiny Llama written by the test as GGUF (random f32 weights, a SentencePiece vocabulary):
//! our `llama` forward against candle-transformers' independent `quantized_llama` (interleaved
//! RoPE, GQA), and the SentencePiece tokenizer path (▁ spaces, merges from scores, byte
//! fallback, BOS).

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use lambdachat::attention::{LambdaCache, LambdaParams};
use lambdachat::engine::Engine;
use lambdachat::model::Logits;

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;
const FFN: usize = 96;

/// `<unk> <s> </s>`, the 256 byte tokens, then word pieces with scores (longer = better).
fn vocabulary() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let mut scores = vec![0.0; tokens.len()];
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "▁hel", "▁hell", "▁hello", "▁w",
        "▁wo", "▁wor", "▁worl", "▁world", "ll", "lo", "▁!",
    ];
    for p in pieces {
        tokens.push(p.to_string());
        scores.push(p.chars().count() as f32);
        types.push(1);
    }
    (tokens, scores, types)
}

fn weight(rng: &mut u64, shape: (usize, usize), scale: f32) -> QTensor {
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            *rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect();
    let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
    QTensor::quantize(&t, GgmlDType::F32).unwrap()
}

fn norm_weight(n: usize) -> QTensor {
    let t = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    QTensor::quantize(&t, GgmlDType::F32).unwrap()
}

fn write_model(path: &Path) {
    let (tokens, scores, types) = vocabulary();
    let vocab = tokens.len();
    let head_dim = HIDDEN / HEADS;
    let mut rng = 42u64;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            weight(&mut rng, (vocab, HIDDEN), 2.0),
        ),
        ("output_norm.weight".into(), norm_weight(HIDDEN)),
        (
            "output.weight".into(),
            weight(&mut rng, (vocab, HIDDEN), 1.0),
        ),
    ];
    for l in 0..LAYERS {
        let p = format!("blk.{l}");
        let kv = KV_HEADS * head_dim;
        for (name, shape) in [
            ("attn_q", (HIDDEN, HIDDEN)),
            ("attn_k", (kv, HIDDEN)),
            ("attn_v", (kv, HIDDEN)),
            ("attn_output", (HIDDEN, HIDDEN)),
            ("ffn_gate", (FFN, HIDDEN)),
            ("ffn_up", (FFN, HIDDEN)),
            ("ffn_down", (HIDDEN, FFN)),
        ] {
            tensors.push((format!("{p}.{name}.weight"), weight(&mut rng, shape, 1.0)));
        }
        tensors.push((format!("{p}.attn_norm.weight"), norm_weight(HIDDEN)));
        tensors.push((format!("{p}.ffn_norm.weight"), norm_weight(HIDDEN)));
    }
    let strs = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny-llama-test".into())),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.dimension_count", Value::U32(head_dim as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.iter().map(|s| Value::F32(*s)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn tiny_llama_matches_candle_quantized_llama() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    write_model(&path);
    let engine = Engine::load(&path).unwrap();
    assert_eq!(engine.model.info().architecture, "llama");

    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut theirs = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();

    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % 280).collect();
    let params = LambdaParams::new(4, 256, None).unwrap();
    let mut cache = LambdaCache::new(params, engine.model.layer_geometry(params));
    let mut pos = 0;
    for chunk in std::iter::once(&ids[..16]).chain(ids[16..].chunks(1)) {
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
        let (a, b) = (
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            reference.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let err = max_rel(&a, &b);
        assert!(err < 1e-4, "position {pos}: relative error {err}");
    }
}

#[test]
fn sentencepiece_tokenizer_from_gguf_scores() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    write_model(&path);
    let engine = Engine::load(&path).unwrap();
    let tok = &engine.tokenizer;
    let id = |s: &str| tok.token_id(s).unwrap();
    assert!(tok.add_bos);
    assert_eq!(tok.bos, Some(1));
    // A dummy prefix space, then the highest-scoring merges.
    assert_eq!(
        tok.encode("hello world").unwrap(),
        vec![id("▁hello"), id("▁world")]
    );
    // é is not in the vocabulary: UTF-8 byte fallback.
    let ids = tok.encode("hé").unwrap();
    assert_eq!(ids, vec![id("▁h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&ids).unwrap(), "hé");
    assert_eq!(
        tok.decode(&tok.encode("hello world").unwrap()).unwrap(),
        "hello world"
    );
    // Control tokens in text are recognised whole (as rendered templates need).
    assert_eq!(tok.encode("<s>hello").unwrap()[0], 1);
}
