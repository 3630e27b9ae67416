//! Token embeddings. GGUF tables stay quantized (rows are dequantized on lookup), so the table
//! (151,936 × 896 for Qwen2.5-0.5B) costs its file size in memory, not four bytes a weight. A
//! table our kernels take (Q8_0, Q6_K and the others of `kernels::Format` on the CPU) is packed for them and shared with a tied
//! output head, so the largest matrix of a decode step runs on our kernel and is held once.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};

use super::ModelError;
use super::checkpoint::{Checkpoint, weight_dims};
use super::layers::{Linear, forward_err, packed};
use crate::error::candle_msg;
use crate::kernels::PackedMatrix;

/// Where the rows come from.
enum Table {
    Candle(QMatMul),
    Packed(Arc<PackedMatrix>),
}

pub struct TokenEmbedding {
    table: Table,
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
        let table = match packed(&table, "token_embd.weight", ckpt.kernels())? {
            Some(m) => Table::Packed(Arc::new(m)),
            None => Table::Candle(table),
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
        match &self.table {
            Table::Candle(table) => {
                let ids = Tensor::new(ids, &self.device).map_err(forward_err)?;
                table
                    .embedding(&ids)
                    .and_then(|x| x.to_dtype(DType::F32))
                    .map_err(forward_err)
            }
            Table::Packed(table) => {
                let values = ids
                    .iter()
                    .flat_map(|&id| table.dequantize_row(id as usize))
                    .collect();
                Tensor::from_vec(values, (ids.len(), self.hidden), &self.device)
                    .map_err(forward_err)
            }
        }
    }

    /// The output projection: `output.weight` when present, else the tied embedding table.
    pub fn output_head(&self, ckpt: &mut Checkpoint) -> Result<Linear, ModelError> {
        if ckpt.has_tensor("output.weight") {
            return Linear::load(ckpt, "output", (self.rows, self.hidden), false);
        }
        let weight = match &self.table {
            Table::Packed(table) => return Ok(Linear::from_packed(table.clone())),
            Table::Candle(QMatMul::QTensor(q)) => ckpt
                .multiplier(q.clone())
                .map_err(|e| ModelError::Tensor("output.weight".into(), candle_msg(&e)))?,
            Table::Candle(dense) => dense.clone(),
        };
        Ok(Linear::from_qmatmul(weight))
    }
}
