//! Token embeddings. GGUF tables stay quantized (rows are dequantized on lookup), so the table
//! (151,936 × 896 for Qwen2.5-0.5B) costs its file size in memory, not four bytes a weight.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};

use super::ModelError;
use super::checkpoint::{Checkpoint, weight_dims};
use super::layers::{Linear, forward_err};
use crate::model::candle_msg;

pub struct TokenEmbedding {
    table: QMatMul,
    rows: usize,
    hidden: usize,
    /// Where the table lives: token ids are made there.
    device: Device,
}

impl TokenEmbedding {
    pub fn load(ckpt: &mut Checkpoint, hidden: usize) -> Result<Self, ModelError> {
        let table = ckpt.table("token_embd.weight", hidden)?;
        let rows = weight_dims(&table)[0];
        let device = match &table {
            QMatMul::QTensor(q) => q.device(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.device().clone(),
        };
        Ok(Self {
            table,
            rows,
            hidden,
            device,
        })
    }

    /// Rows of the table (the model's vocabulary, padding included).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `[tokens, hidden]` f32 rows for `ids`.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor, ModelError> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(ModelError::Forward(format!(
                "token id {bad} is outside the embedding table ({} rows)",
                self.rows
            )));
        }
        let ids = Tensor::new(ids, &self.device).map_err(forward_err)?;
        self.table
            .embedding(&ids)
            .and_then(|x| x.to_dtype(DType::F32))
            .map_err(forward_err)
    }

    /// The output projection: `output.weight` when present, else the tied embedding table.
    pub fn output_head(&self, ckpt: &mut Checkpoint) -> Result<Linear, ModelError> {
        if ckpt.has_tensor("output.weight") {
            return Linear::load(ckpt, "output", (self.rows, self.hidden), false);
        }
        let weight = match &self.table {
            QMatMul::QTensor(q) => QMatMul::from_arc(q.clone())
                .map_err(|e| ModelError::Tensor("output.weight".into(), candle_msg(&e)))?,
            dense => dense.clone(),
        };
        Ok(Linear::from_qmatmul(weight))
    }
}
