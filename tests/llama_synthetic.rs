//! A tiny Llama written by the test as GGUF (random f32 weights, a SentencePiece vocabulary):
//! our `llama` forward against candle-transformers' independent `quantized_llama` (interleaved
//! RoPE, GQA), and the SentencePiece tokenizer path (▁ spaces, merges from scores, byte
//! fallback, BOS).

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::tiny::write_gguf;
use lambdachat::attention::{HostCache, LambdaParams};
use lambdachat::engine::Engine;
use lambdachat::model::Logits;

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn tiny_llama_matches_candle_quantized_llama() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    write_gguf(&path, "llama");
    let engine = Engine::load(&path).unwrap();
    assert_eq!(engine.model.info().architecture, "llama");

    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut theirs = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();

    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % 280).collect();
    let params = LambdaParams::new(4, 256, None).unwrap();
    let mut cache = HostCache::new(params, engine.model.layer_geometry(params));
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
    write_gguf(&path, "llama");
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
    // Control tokens in a template's scaffolding are recognised whole; in what people wrote,
    // or in plain text, they are text.
    let scaffold = tok.encode_with_offsets("<s>hello", &[]).unwrap().0;
    assert_eq!(scaffold[0], 1);
    let typed = tok
        .encode_with_offsets("<s>hello", std::slice::from_ref(&(0..8)))
        .unwrap()
        .0;
    assert!(!typed.iter().any(|&id| tok.is_control(id)), "{typed:?}");
    assert_eq!(typed, tok.encode("<s>hello").unwrap());
    assert_eq!(tok.decode(&typed).unwrap(), "<s>hello");
}
