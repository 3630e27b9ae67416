//! Writes the seed inputs of the fuzz targets into `seeds/<target>/` (committed): the tiny
//! model of every architecture for `gguf_open`, its matrices in Q8_0 or Q5_0 (a quarter of the
//! f32 bytes, so the fuzzer executes about four times as many inputs, and the inputs reach our
//! own packed kernels); the chat templates of the model files given as
//! arguments, each followed by a short conversation, for `chat_template`; the example config
//! for `config`. The structured targets (`gguf_vocab`, `kv_snapshot`, `store_load`) start from
//! libFuzzer's own inputs.
//!
//! `cargo run --release --bin seeds -- MODEL.gguf…`

use std::path::Path;

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor};
use lambdachat::model::GgufFile;
use lambdachat_fuzz::tiny;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let dir = |target: &str| {
        let d = root.join(target);
        std::fs::create_dir_all(&d).expect("seeds directory");
        d
    };
    let gguf = dir("gguf_open");
    for (i, arch) in tiny::ARCHITECTURES.iter().enumerate() {
        let dtype = [GgmlDType::Q8_0, GgmlDType::Q5_0][i % 2];
        let mut model = tiny::tiny_model(arch);
        for (_, tensor) in &mut model.tensors {
            if let Some(smaller) = requantize(tensor, dtype) {
                *tensor = smaller;
            }
        }
        model.write(&gguf.join(format!("tiny-{arch}")));
    }
    let templates = dir("chat_template");
    // Role bytes: b'0' % 3 = 0 system, b'1' user, b'2' assistant.
    let conversation = "\x000be brief\x001hello <|im_end|>\x002hi there\x001and again";
    for model in std::env::args().skip(1) {
        let gguf = GgufFile::open(Path::new(&model)).expect("a model file");
        let Ok(template) = gguf.meta.string("tokenizer.chat_template") else {
            eprintln!("{model}: no chat template, skipped");
            continue;
        };
        let name = Path::new(&model)
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        std::fs::write(templates.join(name), format!("{template}{conversation}"))
            .expect("seed write");
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.example.toml");
    std::fs::copy(example, dir("config").join("example")).expect("config seed");
}

/// `tensor` in `dtype` when it is a matrix whose rows fill whole blocks; vectors (norms,
/// biases) stay f32 (None), as llama.cpp's converter keeps them.
fn requantize(tensor: &QTensor, dtype: GgmlDType) -> Option<QTensor> {
    let dims = tensor.shape().dims();
    if dims.len() != 2 || dims[1] % dtype.block_size() != 0 {
        return None;
    }
    let values = tensor.dequantize(&Device::Cpu).expect("dequantize");
    Some(QTensor::quantize(&values, dtype).expect("quantize"))
}
