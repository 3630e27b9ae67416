//! How far a decode speed is from the physics: at short context a decode step reads every weight
//! matrix once, so `read bandwidth / weight bytes per token` is the most tokens per second any
//! program can reach on this machine. `bench decode` prints both figures and the share of that
//! limit it reached.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Content;

/// Bytes of weights one decode step reads from a GGUF file: every tensor but the token table,
/// of which a step reads one row, unless the output head is tied to it (no `output.weight`),
/// in which case the head reads all of it.
pub fn weight_bytes_per_token(path: &Path) -> Result<u64> {
    let mut file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let content = Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), crate::error::candle_msg(&e)))?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let bytes = content
        .tensor_infos
        .iter()
        .filter(|(name, _)| tied || name.as_str() != "token_embd.weight")
        .map(|(_, info)| {
            let values = info.shape.elem_count();
            let dtype = info.ggml_dtype;
            (values / dtype.block_size() * dtype.type_size()) as u64
        })
        .sum();
    Ok(bytes)
}

/// The machine's read bandwidth in bytes per second, with the threads decoding uses: the best
/// of three passes summing a 512 MiB buffer (far larger than any cache) on candle's pool.
pub fn read_bandwidth() -> f64 {
    const WORDS: usize = 64 << 20;
    // Written, so that every page is really mapped before it is timed.
    let buffer: Vec<u64> = (0..WORDS as u64).collect();
    let chunks = 1024;
    let chunk = WORDS / chunks;
    let sink = std::sync::atomic::AtomicU64::new(0);
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        crate::kernels::pool_execute_chunked(chunks, |range| {
            let mut sum = 0u64;
            for c in range {
                // Eight lanes, so the compiler keeps several vector sums in flight.
                let mut lanes = [0u64; 8];
                for words in buffer[c * chunk..(c + 1) * chunk].chunks_exact(8) {
                    for (lane, w) in lanes.iter_mut().zip(words) {
                        *lane = lane.wrapping_add(*w);
                    }
                }
                sum = lanes.iter().fold(sum, |s, l| s.wrapping_add(*l));
            }
            sink.fetch_add(sum, std::sync::atomic::Ordering::Relaxed);
        });
        let rate = (WORDS * 8) as f64 / start.elapsed().as_secs_f64();
        best = best.max(rate);
    }
    std::hint::black_box(sink.into_inner());
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    use candle_core::{Device, Tensor};

    fn write(path: &Path, names: &[&str]) {
        let tensors: Vec<(&str, QTensor)> = names
            .iter()
            .map(|name| {
                let dense = Tensor::zeros((64, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
                (*name, QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap())
            })
            .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &[], &refs).unwrap();
    }

    /// A tied table counts whole; an untied one not at all (one row of it per token).
    #[test]
    fn the_token_table_counts_only_when_the_head_is_tied() {
        let dir = tempfile::tempdir().unwrap();
        let matrix = 64 * 34; // 64 rows of one Q8_0 block
        let tied = dir.path().join("tied.gguf");
        write(&tied, &["token_embd.weight", "blk.0.ffn_up.weight"]);
        assert_eq!(weight_bytes_per_token(&tied).unwrap(), 2 * matrix);
        let untied = dir.path().join("untied.gguf");
        write(
            &untied,
            &["token_embd.weight", "blk.0.ffn_up.weight", "output.weight"],
        );
        assert_eq!(weight_bytes_per_token(&untied).unwrap(), 2 * matrix);
        let head_only = dir.path().join("head.gguf");
        write(&head_only, &["token_embd.weight", "output.weight"]);
        assert_eq!(weight_bytes_per_token(&head_only).unwrap(), matrix);
    }

    #[test]
    fn bandwidth_is_a_plausible_rate() {
        let rate = read_bandwidth();
        // Between 100 MB/s and 10 TB/s: a figure, not a benchmark.
        assert!(rate > 1e8 && rate < 1e13, "{rate}");
    }
}
