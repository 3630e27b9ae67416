//! Token embeddings kept quantized: rows are dequantized on lookup, so the table (151,936 × 896
//! for Qwen2.5-0.5B) costs its GGUF size in memory, not four bytes a weight.

use crate::model::candle_msg;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Tensor};

use super::ModelError;
use super::gguf::GgufFile;
use super::layers::{Linear, forward_err};

pub struct TokenEmbedding {
    table: Arc<QTensor>,
}

impl TokenEmbedding {
    pub fn load(gguf: &mut GgufFile) -> Result<Self, ModelError> {
        Ok(Self {
            table: Arc::new(gguf.qtensor("token_embd.weight")?),
        })
    }

    /// `[tokens, hidden]` rows for `ids`.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor, ModelError> {
        let ids = Tensor::new(ids, &Device::Cpu).map_err(forward_err)?;
        self.table.embedding(&ids).map_err(forward_err)
    }

    /// The output projection: `output.weight` when present, else the tied embedding table.
    pub fn output_head(&self, gguf: &mut GgufFile) -> Result<Linear, ModelError> {
        let weight = if gguf.has_tensor("output.weight") {
            QMatMul::from_qtensor(gguf.qtensor("output.weight")?)
        } else {
            QMatMul::from_arc(self.table.clone())
        }
        .map_err(|e| ModelError::Tensor("output.weight".into(), candle_msg(&e)))?;
        Ok(Linear::from_qmatmul(weight))
    }
}
