//! Every architecture through both loaders: a tiny random model written as GGUF (llama.cpp's
//! layout), converted by `lambdachat::convert` into a Hugging Face directory, then
//! - our GGUF path and our safetensors path give the same logits, also after evictions;
//! - candle-transformers' own safetensors models (independent readers of HF names, layouts and
//!   `config.json`) agree with ours on the converted directory, which checks the converter's
//!   names, the un-permuted Llama q/k and Gemma's `1 + w` norms against a third party;
//! - the SentencePiece tokenizer survives the trip through `tokenizer.json`.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{gemma3, llama, phi3, qwen2, qwen3};
use common::tiny::{ARCHITECTURES, Rng, WINDOW, rope_dim, tiny_model, write_gguf};
use common::{assert_rows_close, rel_err};
use lambdachat::attention::{HostCache, LambdaParams};
use lambdachat::engine::Engine;
use lambdachat::model::Logits;

struct Tiny {
    _dir: tempfile::TempDir,
    gguf: PathBuf,
    hf: PathBuf,
}

fn tiny(arch: &str) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join(format!("tiny-{arch}.gguf"));
    write_gguf(&gguf, arch);
    let hf = dir.path().join(format!("tiny-{arch}"));
    lambdachat::convert::convert_gguf(&gguf, &hf, None).unwrap();
    Tiny {
        _dir: dir,
        gguf,
        hf,
    }
}

fn ids() -> Vec<u32> {
    (0..30u32).map(|i| (i * 37 + 5) % 280).collect()
}

/// Last-token logits of `engine` over `ids` fed as one chunk of 10 then one by one.
fn our_logits(engine: &Engine, params: LambdaParams, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = HostCache::new(params, engine.model.layer_geometry(params));
    std::iter::once(&ids[..10])
        .chain(ids[10..].chunks(1))
        .map(|chunk| {
            let t = engine
                .model
                .forward(chunk, &mut cache, Logits::Last)
                .unwrap();
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

/// A tiny model exists for every architecture the build registers, so each one is tested here.
#[test]
fn every_registered_architecture_has_a_tiny_model() {
    let mut registered = lambdachat::model::arch::gguf_names();
    let mut tiny_ones = ARCHITECTURES.to_vec();
    registered.sort_unstable();
    tiny_ones.sort_unstable();
    assert_eq!(tiny_ones, registered);
}

#[test]
fn gguf_and_safetensors_loaders_agree_for_every_architecture() {
    for arch in ARCHITECTURES {
        let t = tiny(arch);
        let (g, h) = (Engine::load(&t.gguf).unwrap(), Engine::load(&t.hf).unwrap());
        assert_eq!(h.model.info().architecture, *arch);
        assert_eq!(h.model.info().vocab_size, g.model.info().vocab_size);
        // Two sinks and a window of 6: most of the 30 tokens are evicted.
        let params = LambdaParams::new(2, 6, None).unwrap();
        let (a, b) = (
            our_logits(&g, params, &ids()),
            our_logits(&h, params, &ids()),
        );
        assert_rows_close(&b, &a, 1e-5, &format!("{arch} loaders"));
    }
}

/// candle-transformers' model for `arch` read from the HF directory: last-token logits over
/// the same chunks as [`our_logits`].
fn candle_logits(arch: &str, dir: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)
    }
    .unwrap();
    let chunks: Vec<&[u32]> = std::iter::once(&ids[..10])
        .chain(ids[10..].chunks(1))
        .collect();
    let input = |c: &[u32]| Tensor::new(c, &dev).unwrap().unsqueeze(0).unwrap();
    let last = |t: Tensor| -> Vec<f32> {
        let t = t.squeeze(0).unwrap();
        let t = if t.rank() == 2 {
            t.get(t.dim(0).unwrap() - 1).unwrap()
        } else {
            t
        };
        t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    };
    // Feeds the chunks through a model's `forward(input, position)`, keeping last-token logits.
    let feed = |forward: &mut dyn FnMut(&Tensor, usize) -> candle_core::Result<Tensor>| {
        let mut pos = 0;
        chunks
            .iter()
            .map(|c| {
                let logits = forward(&input(c), pos).unwrap();
                pos += c.len();
                last(logits)
            })
            .collect::<Vec<_>>()
    };
    match arch {
        "llama" => {
            let cfg: llama::LlamaConfig = serde_json::from_str(&config).unwrap();
            let cfg = cfg.into_config(false);
            let model = llama::Llama::load(vb, &cfg).unwrap();
            let mut cache = llama::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
            feed(&mut |x, pos| model.forward(x, pos, &mut cache))
        }
        "qwen2" => {
            let cfg: qwen2::Config = serde_json::from_str(&config).unwrap();
            let mut model = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
            feed(&mut |x, pos| model.forward(x, pos))
        }
        "qwen3" => {
            let cfg: qwen3::Config = serde_json::from_str(&config).unwrap();
            let mut model = qwen3::ModelForCausalLM::new(&cfg, vb).unwrap();
            feed(&mut |x, pos| model.forward(x, pos))
        }
        "phi3" => {
            let cfg: phi3::Config = serde_json::from_str(&config).unwrap();
            let mut model = phi3::Model::new(&cfg, vb).unwrap();
            feed(&mut |x, pos| model.forward(x, pos))
        }
        "gemma3" => {
            let cfg: gemma3::Config = serde_json::from_str(&config).unwrap();
            let mut model = gemma3::Model::new(false, &cfg, vb).unwrap();
            // candle's Gemma 3 appends non-contiguous values to its KV cache when a chunk has
            // several tokens and several KV heads ("slice-set only supports contiguous
            // tensors"), so it is fed one token at a time.
            feed(&mut |x, pos| {
                let ids = x.squeeze(0)?.to_vec1::<u32>()?;
                let mut logits = None;
                for (i, id) in ids.iter().enumerate() {
                    logits = Some(model.forward(&input(&[*id]), pos + i)?);
                }
                Ok(logits.expect("chunks are not empty"))
            })
        }
        other => panic!("no candle model for {other}"),
    }
}

#[test]
fn converted_directories_match_candle_transformers_models() {
    for arch in ARCHITECTURES {
        let t = tiny(arch);
        let ours = Engine::load(&t.hf).unwrap();
        // Inside the training length and, for Gemma, inside its sliding window: Λ = full.
        let ids = &ids()[..WINDOW - 2];
        let params = LambdaParams::new(4, 256, None).unwrap();
        let a = our_logits(&ours, params, ids);
        let b = candle_logits(arch, &t.hf, ids);
        assert_rows_close(&a, &b, 1e-4, &format!("{arch} against candle"));
    }
}

#[test]
fn sentencepiece_tokenizer_survives_conversion() {
    let t = tiny("llama");
    let (g, h) = (Engine::load(&t.gguf).unwrap(), Engine::load(&t.hf).unwrap());
    for text in ["hello world", "hé !", "<s>hello", "  two  spaces"] {
        let ids = g.tokenizer.encode(text).unwrap();
        assert_eq!(h.tokenizer.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(
            h.tokenizer.decode(&ids).unwrap(),
            g.tokenizer.decode(&ids).unwrap()
        );
    }
    assert_eq!((h.tokenizer.bos, h.tokenizer.eos), (Some(1), Some(2)));
    assert!(h.tokenizer.add_bos);
    assert_eq!(h.stop_ids, g.stop_ids);
}

/// Phi-3 with LongRoPE (factors as llama.cpp stores them: two tensors and an attention factor)
/// reads the same through `config.json`'s `rope_scaling` after conversion, and the factors do
/// change the logits.
#[test]
fn phi3_longrope_survives_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.gguf");
    write_gguf(&plain, "phi3");
    let mut parts = tiny_model("phi3");
    let pairs = rope_dim("phi3") / 2;
    let mut rng = Rng::new(7);
    for name in ["rope_factors_long.weight", "rope_factors_short.weight"] {
        parts
            .tensors
            .push((name.into(), rng.tensor(&[pairs], 4.0, 3.0)));
    }
    parts.metadata.extend([
        (
            "phi3.rope.scaling.original_context_length".into(),
            Value::U32(64),
        ),
        ("phi3.rope.scaling.attn_factor".into(), Value::F32(1.19)),
    ]);
    let gguf = dir.path().join("longrope.gguf");
    parts.write(&gguf);
    let hf = dir.path().join("longrope");
    lambdachat::convert::convert_gguf(&gguf, &hf, None).unwrap();
    let config = std::fs::read_to_string(hf.join("config.json")).unwrap();
    assert!(
        config.contains("longrope") && config.contains("short_factor"),
        "{config}"
    );

    let params = LambdaParams::new(2, 6, None).unwrap();
    let g = Engine::load(&gguf).unwrap();
    let h = Engine::load(&hf).unwrap();
    // Λ never shows more than the original length: the model reports it as its training length.
    assert_eq!(g.model.info().context_length, 64);
    let (a, b) = (
        our_logits(&g, params, &ids()),
        our_logits(&h, params, &ids()),
    );
    assert_rows_close(&b, &a, 1e-5, "phi3 LongRoPE loaders");
    let without = our_logits(&Engine::load(&plain).unwrap(), params, &ids());
    assert!(
        rel_err(&without[5], &a[5]) > 1e-2,
        "the factors change nothing"
    );
}
