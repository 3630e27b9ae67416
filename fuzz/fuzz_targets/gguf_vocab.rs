//! A vocabulary as a model file's metadata holds it, structured: tokens, types, scores and
//! merges of any length (mismatched ones included), special ids in and out of range →
//! build → encode → decode. Encoded ids must lie inside the vocabulary.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use arbitrary::Arbitrary;
use candle_core::quantized::gguf_file::Value;
use lambdachat::model::metadata::Metadata;
use lambdachat::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Kind {
    Llama,
    Gpt2,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Vocab {
    kind: Kind,
    pre: Option<String>,
    tokens: Vec<String>,
    types: Option<Vec<i32>>,
    scores: Option<Vec<f32>>,
    merges: Option<Vec<String>>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: Option<bool>,
    add_space_prefix: Option<bool>,
    text: String,
    ids: Vec<u32>,
}

fn array(values: impl IntoIterator<Item = Value>) -> Value {
    Value::Array(values.into_iter().collect())
}

fuzz_target!(|v: Vocab| {
    let model = match v.kind {
        Kind::Llama => "llama".to_string(),
        Kind::Gpt2 => "gpt2".to_string(),
        Kind::Other(s) => s,
    };
    let mut meta = HashMap::from([
        ("tokenizer.ggml.model".to_string(), Value::String(model)),
        (
            "tokenizer.ggml.tokens".to_string(),
            array(v.tokens.iter().cloned().map(Value::String)),
        ),
    ]);
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            meta.insert(format!("tokenizer.ggml.{key}"), value);
        }
    };
    put("pre", v.pre.map(Value::String));
    put(
        "token_type",
        v.types.map(|t| array(t.into_iter().map(Value::I32))),
    );
    put(
        "scores",
        v.scores.map(|s| array(s.into_iter().map(Value::F32))),
    );
    put(
        "merges",
        v.merges.map(|m| array(m.into_iter().map(Value::String))),
    );
    put("bos_token_id", v.bos.map(Value::U32));
    put("eos_token_id", v.eos.map(Value::U32));
    put("unknown_token_id", v.unk.map(Value::U32));
    put("add_bos_token", v.add_bos.map(Value::Bool));
    put("add_space_prefix", v.add_space_prefix.map(Value::Bool));
    let Ok(tokenizer) = Tokenizer::from_gguf_metadata(&Metadata::new(Path::new("fuzz.gguf"), meta))
    else {
        return;
    };
    let size = tokenizer.vocab_size();
    if let Ok(ids) = tokenizer.encode(&v.text) {
        assert!(
            ids.iter().all(|&id| (id as usize) < size),
            "{ids:?} past {size}"
        );
        let _ = tokenizer.decode(&ids);
    }
    let _ = tokenizer.decode(&v.ids);
    let _ = tokenizer.encode_with_offsets(&v.text, &[0..v.text.len()]);
});
