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

    /// Every tensor's bytes must lie inside the file: a truncated download fails here, not
    /// halfway through loading.
    fn check_tensor_data(&self) -> Result<(), ModelError> {
        for (name, info) in &self.content.tensor_infos {
            let dtype = info.ggml_dtype;
            let elems = info.shape.elem_count();
            let bytes = elems / dtype.block_size() * dtype.type_size();
            let end = self.content.tensor_data_offset + info.offset + bytes as u64;
            if end > self.file_len {
                return Err(ModelError::Truncated(
                    self.path.clone(),
                    format!(
                        "tensor '{name}' ends at byte {end} but the file has {} bytes",
                        self.file_len
                    ),
                ));
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
