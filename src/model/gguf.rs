//! Opening a GGUF file: header, metadata, tensor table, with every failure named.
//!
//! candle's reader parses the header; this module checks what it does not (the file is really
//! GGUF, the tensor data is all there, the quantization types are ones we can run) so that a bad
//! file fails at open with a one-line reason, before any weight is read.

use crate::error::candle_msg;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};

use super::ModelError;
use super::checkpoint::{FINGERPRINT_SAMPLE, Fingerprint};
use super::metadata::Metadata;

/// An opened GGUF file: parsed header plus a reader for its tensors.
pub struct GgufFile {
    pub path: PathBuf,
    /// The header's key/value pairs.
    pub meta: Metadata,
    /// The tensor table (its metadata moved to `meta`).
    content: gguf_file::Content,
    reader: BufReader<File>,
    pub file_len: u64,
    /// Where tensors are loaded (the CPU unless [`GgufFile::load_onto`] says otherwise).
    device: Device,
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// The `.gguf` files directly in `dir`, sorted by name.
pub fn gguf_files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    v.sort();
    v
}

/// Limits on tensor shapes, far above any real model's (the largest vocabularies have about
/// 260,000 rows, the widest layers under 100,000 values) and far below where sizes overflow.
const MAX_RANK: usize = 4;
const MAX_DIM: usize = 1 << 24;
const MAX_ELEMENTS: usize = 1 << 40;

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |e: std::io::Error| ModelError::Io(path.to_path_buf(), e);
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 4];
        if reader.read_exact(&mut magic).is_err() || &magic != GGUF_MAGIC {
            return Err(ModelError::NotGguf(path.to_path_buf()));
        }
        reader.rewind().map_err(io)?;
        let mut content = gguf_file::Content::read(&mut reader).map_err(|e| {
            let msg = candle_msg(&e);
            if msg.contains("unknown dtype") || msg.contains("dtype") {
                ModelError::UnsupportedQuant(path.to_path_buf(), msg)
            } else {
                ModelError::Truncated(path.to_path_buf(), msg)
            }
        })?;
        let meta = Metadata::new(path, std::mem::take(&mut content.metadata));
        let gguf = Self {
            path: path.to_path_buf(),
            meta,
            content,
            reader,
            file_len,
            device: Device::Cpu,
        };
        gguf.check_tensor_data()?;
        Ok(gguf)
    }

    /// Every tensor's shape must be sane and its bytes inside the file: a truncated download
    /// fails here, not halfway through loading, and a crafted shape (dimensions whose product
    /// wraps around, a table of 2^63 rows) never reaches the code that sizes buffers by it.
    /// All arithmetic is checked.
    fn check_tensor_data(&self) -> Result<(), ModelError> {
        for (name, info) in &self.content.tensor_infos {
            let bad = |why: String| ModelError::BadTensor(self.path.clone(), name.clone(), why);
            let dims = info.shape.dims();
            if dims.is_empty() || dims.len() > MAX_RANK {
                return Err(bad(format!("{} dimensions", dims.len())));
            }
            if let Some(d) = dims.iter().find(|&&d| d == 0 || d > MAX_DIM) {
                return Err(bad(format!("a dimension of {d} (at most {MAX_DIM})")));
            }
            let elems = dims
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .filter(|&n| n <= MAX_ELEMENTS)
                .ok_or_else(|| bad(format!("{dims:?} is too many values")))?;
            let dtype = info.ggml_dtype;
            let block = dtype.block_size();
            if !dims[dims.len() - 1].is_multiple_of(block) {
                return Err(bad(format!(
                    "rows of {} values, not whole blocks of {block} ({dtype:?})",
                    dims[dims.len() - 1]
                )));
            }
            let bytes = (elems / block)
                .checked_mul(dtype.type_size())
                .ok_or_else(|| bad("its size overflows".into()))?;
            let end = self
                .content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|o| o.checked_add(bytes as u64));
            match end {
                Some(end) if end <= self.file_len => {}
                _ => {
                    return Err(ModelError::Truncated(
                        self.path.clone(),
                        format!(
                            "tensor '{name}' ends at byte {} but the file has {} bytes",
                            end.map_or("beyond 2^64".to_string(), |e| e.to_string()),
                            self.file_len
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn architecture(&self) -> Result<String, ModelError> {
        self.meta.string("general.architecture")
    }

    /// Loads tensors onto `device` from now on.
    pub fn load_onto(&mut self, device: &Device) {
        self.device = device.clone();
    }

    pub fn tensor_names(&self) -> Vec<String> {
        self.content.tensor_infos.keys().cloned().collect()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn qtensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        if !self.has_tensor(name) {
            return Err(ModelError::MissingTensor(
                self.path.clone(),
                name.to_string(),
            ));
        }
        self.content
            .tensor(&mut self.reader, name, &self.device)
            .map_err(|e| ModelError::Tensor(name.to_string(), candle_msg(&e)))
    }

    /// A small tensor (norm weight, bias) dequantized to f32.
    pub fn f32_tensor(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let q = self.qtensor(name)?;
        q.dequantize(&self.device)
            .map_err(|e| ModelError::Tensor(name.to_string(), candle_msg(&e)))
    }

    /// What tells this model's weights from another's of the same shape (another quantization,
    /// a fine-tune): the tensor table (names, shapes, types, offsets) and the first bytes of
    /// every tensor, hashed. Reads a few hundred kilobytes.
    pub fn fingerprint(&mut self) -> Result<String, ModelError> {
        let io = |e: std::io::Error| ModelError::Io(self.path.clone(), e);
        let mut infos: Vec<_> = self.content.tensor_infos.iter().collect();
        infos.sort_by(|a, b| a.0.cmp(b.0));
        let mut hash = Fingerprint::default();
        let mut sample = vec![0u8; FINGERPRINT_SAMPLE];
        for (name, info) in infos {
            hash.add(
                format!(
                    "{name} {:?} {:?} {}",
                    info.shape.dims(),
                    info.ggml_dtype,
                    info.offset
                )
                .as_bytes(),
            );
            let at = self.content.tensor_data_offset + info.offset;
            let n = (self.file_len.saturating_sub(at) as usize).min(sample.len());
            self.reader.seek(std::io::SeekFrom::Start(at)).map_err(io)?;
            self.reader.read_exact(&mut sample[..n]).map_err(io)?;
            hash.add(&sample[..n]);
        }
        Ok(hash.finish())
    }

    /// Quantization types and how many tensors use each, most common first.
    pub fn quant_summary(&self) -> Vec<(GgmlDType, usize)> {
        let mut counts: Vec<(GgmlDType, usize)> = Vec::new();
        for info in self.content.tensor_infos.values() {
            match counts.iter_mut().find(|(d, _)| *d == info.ggml_dtype) {
                Some((_, n)) => *n += 1,
                None => counts.push((info.ggml_dtype, 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
    }
}
