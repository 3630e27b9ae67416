//! Tiny random models of every architecture, written as GGUF exactly as llama.cpp's converter
//! would lay them out (llama.cpp tensor names, Gemma norms stored as `1 + w`), with a small
//! SentencePiece vocabulary. Weights are f32 so that both loaders see the same numbers.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};

pub const HIDDEN: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const LAYERS: usize = 2;
pub const FFN: usize = 96;
/// Gemma's sliding window in the tiny model.
pub const WINDOW: usize = 16;

pub const ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "gemma3", "phi3"];

/// `<unk> <s> </s>`, the 256 byte tokens, then word pieces with scores (longer = better).
pub fn vocabulary() -> (Vec<String>, Vec<f32>, Vec<i32>) {
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

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    pub fn tensor(&mut self, shape: &[usize], scale: f32, offset: f32) -> QTensor {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.next() * scale + offset).collect();
        let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::F32).unwrap()
    }
}

/// The head size of `arch`'s tiny model (Qwen3 and Gemma 3 decouple it from hidden / heads).
pub fn head_dim(arch: &str) -> usize {
    match arch {
        "qwen3" | "gemma3" => 32,
        _ => HIDDEN / HEADS,
    }
}

/// Rotated dims per head: Phi-3's tiny model rotates half of each head (partial rotary).
pub fn rope_dim(arch: &str) -> usize {
    match arch {
        "phi3" => head_dim(arch) / 2,
        _ => head_dim(arch),
    }
}

/// A GGUF's metadata and tensors, before writing.
pub struct GgufParts {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<(String, QTensor)>,
}

impl GgufParts {
    pub fn write(&self, path: &Path) {
        let md: Vec<(&str, &Value)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &md, &ts).unwrap();
    }
}

/// Writes the tiny `arch` model to `path`.
pub fn write_gguf(path: &Path, arch: &str) {
    tiny_model(arch).write(path);
}

/// The tiny `arch` model.
pub fn tiny_model(arch: &str) -> GgufParts {
    let (tokens, scores, types) = vocabulary();
    let vocab = tokens.len();
    let hd = head_dim(arch);
    let gemma = arch == "gemma3";
    let mut rng = Rng::new(42);
    // Norm weights are random around 1 (GGUF Gemma stores 1 + w, so its w is random around 0).
    let norm = |rng: &mut Rng, n: usize| rng.tensor(&[n], 0.4, 1.0);
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            rng.tensor(&[vocab, HIDDEN], 2.0, 0.0),
        ),
        ("output_norm.weight".into(), norm(&mut rng, HIDDEN)),
    ];
    // Llama and Phi-3 keep a separate output head; the others tie it to the embeddings.
    if arch == "llama" || arch == "phi3" {
        tensors.push((
            "output.weight".into(),
            rng.tensor(&[vocab, HIDDEN], 1.0, 0.0),
        ));
    }
    for l in 0..LAYERS {
        let p = format!("blk.{l}");
        let (q, kv) = (HEADS * hd, KV_HEADS * hd);
        // Phi-3 fuses q/k/v into one matrix and gate/up into another.
        let projections: Vec<(&str, [usize; 2])> = if arch == "phi3" {
            vec![
                ("attn_qkv", [q + 2 * kv, HIDDEN]),
                ("attn_output", [HIDDEN, q]),
                ("ffn_up", [2 * FFN, HIDDEN]),
                ("ffn_down", [HIDDEN, FFN]),
            ]
        } else {
            vec![
                ("attn_q", [q, HIDDEN]),
                ("attn_k", [kv, HIDDEN]),
                ("attn_v", [kv, HIDDEN]),
                ("attn_output", [HIDDEN, q]),
                ("ffn_gate", [FFN, HIDDEN]),
                ("ffn_up", [FFN, HIDDEN]),
                ("ffn_down", [HIDDEN, FFN]),
            ]
        };
        for (name, shape) in projections {
            tensors.push((format!("{p}.{name}.weight"), rng.tensor(&shape, 0.5, 0.0)));
        }
        if arch == "qwen2" {
            for (name, n) in [("attn_q", q), ("attn_k", kv), ("attn_v", kv)] {
                tensors.push((format!("{p}.{name}.bias"), rng.tensor(&[n], 0.5, 0.0)));
            }
        }
        if arch == "qwen3" || gemma {
            tensors.push((format!("{p}.attn_q_norm.weight"), norm(&mut rng, hd)));
            tensors.push((format!("{p}.attn_k_norm.weight"), norm(&mut rng, hd)));
        }
        let mut norms = vec!["attn_norm", "ffn_norm"];
        if gemma {
            norms.extend(["post_attention_norm", "post_ffw_norm"]);
        }
        for n in norms {
            tensors.push((format!("{p}.{n}.weight"), norm(&mut rng, HIDDEN)));
        }
    }
    let strs = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let k = |s: &str| format!("{arch}.{s}");
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(format!("tiny-{arch}"))),
        (k("context_length"), Value::U32(256)),
        (k("embedding_length"), Value::U32(HIDDEN as u32)),
        (k("block_count"), Value::U32(LAYERS as u32)),
        (k("feed_forward_length"), Value::U32(FFN as u32)),
        (k("attention.head_count"), Value::U32(HEADS as u32)),
        (k("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (k("attention.key_length"), Value::U32(hd as u32)),
        (k("attention.value_length"), Value::U32(hd as u32)),
        (k("rope.dimension_count"), Value::U32(rope_dim(arch) as u32)),
        (
            k("rope.freq_base"),
            Value::F32(if gemma { 1_000_000.0 } else { 10_000.0 }),
        ),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), strs(&tokens)),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.iter().map(|s| Value::F32(*s)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
    ];
    if gemma {
        metadata.extend([
            (k("attention.sliding_window"), Value::U32(WINDOW as u32)),
            // Layer 0 slides, layer 1 is global.
            (k("attention.sliding_window_type"), Value::U32(2)),
            (k("rope.local_freq_base"), Value::F32(10_000.0)),
        ]);
    }
    GgufParts { metadata, tensors }
}
