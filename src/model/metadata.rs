//! Model hyper-parameters under llama.cpp's GGUF key names (`qwen2.embedding_length`, …).
//!
//! A GGUF carries them directly; a Hugging Face directory's `config.json` is translated into the
//! same keys (`model::hf`), so architecture files read one vocabulary whatever the format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;

use super::ModelError;

/// Key → value, remembering which file they came from for error messages.
pub struct Metadata {
    origin: PathBuf,
    values: HashMap<String, Value>,
}

impl Metadata {
    pub fn new(origin: &Path, values: HashMap<String, Value>) -> Self {
        Self {
            origin: origin.to_path_buf(),
            values,
        }
    }

    fn missing(&self, key: &str) -> ModelError {
        ModelError::MissingMetadata(self.origin.clone(), key.to_string())
    }

    pub fn value(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    pub fn string(&self, key: &str) -> Result<String, ModelError> {
        self.value(key)
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| self.missing(key))
    }

    /// An unsigned integer of any GGUF width.
    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        use Value::*;
        let v = self.value(key).ok_or_else(|| self.missing(key))?;
        let n = match v {
            U8(x) => *x as i128,
            I8(x) => *x as i128,
            U16(x) => *x as i128,
            I16(x) => *x as i128,
            U32(x) => *x as i128,
            I32(x) => *x as i128,
            U64(x) => *x as i128,
            I64(x) => *x as i128,
            _ => return Err(self.missing(key)),
        };
        usize::try_from(n).map_err(|_| self.missing(key))
    }

    pub fn f64(&self, key: &str) -> Result<f64, ModelError> {
        match self.value(key) {
            Some(Value::F32(x)) => Ok(*x as f64),
            Some(Value::F64(x)) => Ok(*x),
            Some(_) => self.usize(key).map(|x| x as f64),
            None => Err(self.missing(key)),
        }
    }

    /// An array of numbers.
    pub fn f64_array(&self, key: &str) -> Option<Vec<f64>> {
        let Value::Array(items) = self.value(key)? else {
            return None;
        };
        items
            .iter()
            .map(|v| match v {
                Value::F32(x) => Some(*x as f64),
                Value::F64(x) => Some(*x),
                _ => None,
            })
            .collect()
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.value(key).and_then(|v| v.to_bool().ok())
    }
}
