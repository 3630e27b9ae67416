//! Where a model comes from: a GGUF file or a Hugging Face safetensors directory. Architecture
//! files load through this one interface (llama.cpp names and layout for both), so the formats
//! differ only in how weights are read.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use super::ModelError;
use super::gguf::GgufFile;
use super::hf::HfModel;
use super::metadata::Metadata;
use crate::attention::KvType;
use crate::error::candle_msg;

/// An opened model file or directory, with the load options that decide how its weights are
/// held.
pub struct Checkpoint {
    pub source: Source,
    kernels: Kernels,
}

/// Where the weights come from.
pub enum Source {
    Gguf(GgufFile),
    Hf(HfModel),
}

/// Bytes of each tensor a fingerprint reads.
pub(crate) const FINGERPRINT_SAMPLE: usize = 256;

/// A model's fingerprint being computed: a sha256 over what is added.
#[derive(Default)]
pub(crate) struct Fingerprint(sha2::Sha256);

impl Fingerprint {
    pub(crate) fn add(&mut self, bytes: &[u8]) {
        use sha2::Digest;
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// The first 16 bytes of the hash, in hex: enough to tell models apart.
    pub(crate) fn finish(self) -> String {
        use sha2::Digest;
        self.0.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// How to load a checkpoint.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The dtype of safetensors weight matrices (GGUF keeps its quantization).
    pub dtype: DType,
    /// Where the weights go.
    pub device: Device,
    /// Who multiplies by a GGUF's quantized matrices.
    pub kernels: Kernels,
    /// How conversations' caches hold keys and values (the engine is what sessions ask).
    pub kv_type: KvType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            kernels: Kernels::Ours,
            kv_type: KvType::default(),
        }
    }
}

/// Who multiplies by a GGUF's quantized weight matrices. A load option rather than an
/// environment variable, so a benchmark or a test states what it measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Kernels {
    /// lambdachat's packed kernels for the formats they cover (`crate::kernels`: Q4_0, Q5_0,
    /// Q8_0, Q4_K and Q6_K on a CPU), candle's for the rest.
    #[default]
    Ours,
    /// candle's for every format (side-by-side measurements).
    Candle,
    /// Every matrix dequantized to f32 at load: no 8-bit activation quantization, so a forward
    /// is exact to float rounding (the exactness tests). Token tables stay quantized for lookups,
    /// which dequantize the same values.
    F32,
}

/// Whether `path` names a Hugging Face model (a directory, or a file inside one that is not GGUF).
fn is_hf_path(path: &Path) -> bool {
    path.is_dir()
        || path
            .extension()
            .is_some_and(|e| e == "safetensors" || e == "json")
}

impl Checkpoint {
    /// The model's fingerprint (see [`GgufFile::fingerprint`]): saved caches name the model
    /// that made them, and another model never resumes from them.
    pub fn fingerprint(&mut self) -> Result<String, ModelError> {
        match &mut self.source {
            Source::Gguf(g) => g.fingerprint(),
            Source::Hf(h) => h.fingerprint(),
        }
    }

    /// Opens a GGUF file, or an HF directory (also when given one of its files).
    pub fn open(path: &Path, options: &LoadOptions) -> Result<Self, ModelError> {
        if !path.exists() {
            return Err(ModelError::Io(
                path.to_path_buf(),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let source = if is_hf_path(path) {
            let dir = if path.is_dir() {
                path
            } else {
                path.parent().unwrap_or(Path::new("."))
            };
            Source::Hf(HfModel::open(dir, options.dtype, &options.device)?)
        } else {
            let mut gguf = GgufFile::open(path)?;
            gguf.load_onto(&options.device);
            Source::Gguf(gguf)
        };
        Ok(Self {
            source,
            kernels: options.kernels,
        })
    }

    /// Who multiplies by this checkpoint's quantized matrices.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn path(&self) -> &Path {
        match &self.source {
            Source::Gguf(g) => &g.path,
            Source::Hf(h) => &h.dir,
        }
    }

    pub fn meta(&self) -> &Metadata {
        match &self.source {
            Source::Gguf(g) => &g.meta,
            Source::Hf(h) => &h.meta,
        }
    }

    pub fn architecture(&self) -> Result<String, ModelError> {
        self.meta().string("general.architecture")
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        match &self.source {
            Source::Gguf(g) => g.has_tensor(name),
            Source::Hf(h) => h.has_tensor(name),
        }
    }

    /// A weight matrix `[rows, cols]` for `x · Wᵀ`: quantized for GGUF (see
    /// [`Self::multiplier`]), dense for safetensors.
    pub fn matrix(&mut self, name: &str, shape: (usize, usize)) -> Result<QMatMul, ModelError> {
        let m = match self.weight(name)? {
            QMatMul::QTensor(q) => self
                .multiplier(q)
                .map_err(|e| ModelError::Tensor(self.describe(name), candle_msg(&e)))?,
            dense => dense,
        };
        expect_shape(&self.describe(name), &weight_dims(&m), &[shape.0, shape.1])?;
        Ok(m)
    }

    /// A token table `[vocab, hidden]` for row lookups; GGUF rows stay quantized until looked up.
    pub fn table(&mut self, name: &str, hidden: usize) -> Result<QMatMul, ModelError> {
        let m = self.weight(name)?;
        let dims = weight_dims(&m);
        if dims.len() != 2 || dims[1] != hidden {
            return Err(ModelError::Tensor(
                self.describe(name),
                format!("shape {dims:?}, expected [vocab, {hidden}]"),
            ));
        }
        Ok(m)
    }

    /// A quantized matrix as the chosen kernels multiply it: dequantized to f32 for
    /// [`Kernels::F32`], else as candle's `QMatMul` holds it (dequantized for the types candle
    /// has no quantized kernel for).
    pub fn multiplier(&self, q: Arc<QTensor>) -> candle_core::Result<QMatMul> {
        match self.kernels {
            Kernels::F32 => Ok(QMatMul::Tensor(q.dequantize(&q.device())?)),
            Kernels::Ours | Kernels::Candle => QMatMul::from_arc(q),
        }
    }

    /// A 2-D weight as stored: a GGUF `QTensor`, or a safetensors tensor in the chosen dtype.
    fn weight(&mut self, name: &str) -> Result<QMatMul, ModelError> {
        Ok(match &mut self.source {
            Source::Gguf(g) => QMatMul::QTensor(Arc::new(g.qtensor(name)?)),
            Source::Hf(h) => QMatMul::Tensor(h.matrix(name)?),
        })
    }

    /// A vector (norm weight, bias) of `len` values as f32.
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Tensor, ModelError> {
        let t = match &mut self.source {
            Source::Gguf(g) => g.f32_tensor(name)?,
            Source::Hf(h) => h.tensor(name, DType::F32)?,
        };
        expect_shape(&self.describe(name), t.dims(), &[len])?;
        Ok(t)
    }

    /// A tensor's name as the user's files spell it (HF name, with llama.cpp's alongside).
    fn describe(&self, name: &str) -> String {
        match &self.source {
            Source::Gguf(_) => name.to_string(),
            Source::Hf(h) => match h.architecture().hf_tensor_name(name) {
                Some(hf) => format!("{hf} (llama.cpp: {name})"),
                None => name.to_string(),
            },
        }
    }

    /// Weight types and how many tensors use each, most common first (for `inspect`).
    pub fn weight_summary(&self) -> Vec<(String, usize)> {
        match &self.source {
            Source::Gguf(g) => g
                .quant_summary()
                .into_iter()
                .map(|(d, n)| (format!("{d:?}"), n))
                .collect(),
            Source::Hf(h) => h.dtype_summary(),
        }
    }
}

/// The shape of a weight, whichever form it has.
pub fn weight_dims(m: &QMatMul) -> Vec<usize> {
    match m {
        QMatMul::QTensor(q) => q.shape().dims().to_vec(),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims().to_vec(),
    }
}

fn expect_shape(name: &str, got: &[usize], want: &[usize]) -> Result<(), ModelError> {
    if got == want {
        Ok(())
    } else {
        Err(ModelError::Tensor(
            name.into(),
            format!("shape {got:?}, expected {want:?}"),
        ))
    }
}
