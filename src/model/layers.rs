//! Building blocks shared by every architecture file: quantized linear layers, RMS norm, the MLP
//! and the self-attention block that hands q/k/v to the Λ cache.
//!
//! Activations are 2-D `[tokens, features]` f32 tensors (batch size is always 1 in a chat).

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};
use candle_nn::RmsNorm;

use super::ModelError;
use super::checkpoint::{Checkpoint, Kernels};
use crate::attention::{AttentionCache, Rope, TensorInput};
use crate::error::candle_msg;
use crate::kernels::{Format, PackedMatrix};

pub type Result<T> = std::result::Result<T, ModelError>;

/// Converts candle errors inside a forward pass.
pub fn forward_err(e: candle_core::Error) -> ModelError {
    ModelError::Forward(candle_msg(&e))
}

/// A weight matrix (quantized, or dense in any dtype) with an optional f32 bias.
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// Who multiplies by a weight matrix.
enum Weight {
    /// candle: dense tensors, and the quantized types whose CPU kernels it vectorizes.
    Candle(QMatMul),
    /// Q4_0, Q5_0, Q8_0, Q4_K and Q6_K on the CPU: lambdachat's kernels (see `crate::kernels`);
    /// shared with the token table when the embeddings are tied.
    Packed(Arc<PackedMatrix>),
}

impl Weight {
    fn new(q: QMatMul, name: &str, kernels: Kernels) -> Result<Self> {
        match packed(&q, name, kernels)? {
            Some(m) => Ok(Self::Packed(Arc::new(m))),
            None => Ok(Self::Candle(q)),
        }
    }
}

/// Repacks a CPU matrix of a format our kernels take (`Format::of`) for them when `kernels` asks for ours (not for
/// candle's everywhere, nor for dense f32 weights). The caller drops `q` afterwards: the weights
/// are held once, in their packed order.
pub fn packed(q: &QMatMul, name: &str, kernels: Kernels) -> Result<Option<PackedMatrix>> {
    let QMatMul::QTensor(t) = q else {
        return Ok(None);
    };
    let ours = kernels == Kernels::Ours;
    let Some(format) = Format::of(t.dtype()).filter(|_| ours && t.device().is_cpu()) else {
        return Ok(None);
    };
    let tensor_err = |e: String| ModelError::Tensor(name.to_string(), e);
    let (rows, cols) = t.shape().dims2().map_err(|e| tensor_err(candle_msg(&e)))?;
    let bytes = t.data().map_err(|e| tensor_err(candle_msg(&e)))?;
    PackedMatrix::new(format, &bytes, rows, cols)
        .map(Some)
        .map_err(|e| tensor_err(e.to_string()))
}

impl Linear {
    /// `{name}.weight` of shape `[rows, cols]`, and `{name}.bias` when `with_bias`.
    pub fn load(
        ckpt: &mut Checkpoint,
        name: &str,
        shape: (usize, usize),
        with_bias: bool,
    ) -> Result<Self> {
        let weight_name = format!("{name}.weight");
        let matrix = ckpt.matrix(&weight_name, shape)?;
        let weight = Weight::new(matrix, &weight_name, ckpt.kernels())?;
        let bias = if with_bias {
            Some(ckpt.vector(&format!("{name}.bias"), shape.0)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// A layer over a matrix shared with something else (a tied output head shares the token
    /// table): candle multiplies it, so the bytes are not copied for a kernel of ours.
    pub fn from_qmatmul(weight: QMatMul) -> Self {
        Self {
            weight: Weight::Candle(weight),
            bias: None,
        }
    }

    /// A layer over a packed matrix shared with the token table (a tied output head).
    pub fn from_packed(weight: Arc<PackedMatrix>) -> Self {
        Self {
            weight: Weight::Packed(weight),
            bias: None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            // bf16/f16 safetensors weights: multiply in their dtype, keep activations f32.
            Weight::Candle(QMatMul::Tensor(w)) if w.dtype() != x.dtype() => x
                .to_dtype(w.dtype())
                .and_then(|x| x.matmul(&w.t()?))
                .and_then(|y| y.to_dtype(x.dtype()))
                .map_err(forward_err)?,
            Weight::Candle(w) => w.forward(x).map_err(forward_err)?,
            Weight::Packed(m) => packed_forward(m, x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b).map_err(forward_err),
            None => Ok(y),
        }
    }
}

/// An RMS norm over `len` features.
pub fn rms_norm(ckpt: &mut Checkpoint, name: &str, len: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new(ckpt.vector(name, len)?, eps))
}

pub fn norm(n: &RmsNorm, x: &Tensor) -> Result<Tensor> {
    n.forward(x).map_err(forward_err)
}

/// The activation of a gated MLP.
#[derive(Clone, Copy)]
pub enum Activation {
    Silu,
    GeluTanh,
}

/// `down(act(gate(x)) * up(x))`.
pub struct GatedMlp {
    gate_up: GateUp,
    down: Linear,
    act: Activation,
}

/// The gate and up projections: two matrices, or one fused `[gate; up]` matrix (Phi-3's
/// `ffn_up` / `gate_up_proj`).
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused { both: Linear, ffn: usize },
}

impl GatedMlp {
    /// `ffn_gate/up/down` under `prefix`, `hidden → ffn → hidden`.
    pub fn load(
        ckpt: &mut Checkpoint,
        prefix: &str,
        hidden: usize,
        ffn: usize,
        act: Activation,
    ) -> Result<Self> {
        let gate = Linear::load(ckpt, &format!("{prefix}.ffn_gate"), (ffn, hidden), false)?;
        let up = Linear::load(ckpt, &format!("{prefix}.ffn_up"), (ffn, hidden), false)?;
        Self::with(
            ckpt,
            prefix,
            GateUp::Separate { gate, up },
            hidden,
            ffn,
            act,
        )
    }

    /// Phi-3's MLP: `ffn_up` holds the gate rows, then the up rows.
    pub fn load_fused(
        ckpt: &mut Checkpoint,
        prefix: &str,
        hidden: usize,
        ffn: usize,
        act: Activation,
    ) -> Result<Self> {
        let both = Linear::load(ckpt, &format!("{prefix}.ffn_up"), (2 * ffn, hidden), false)?;
        Self::with(ckpt, prefix, GateUp::Fused { both, ffn }, hidden, ffn, act)
    }

    fn with(
        ckpt: &mut Checkpoint,
        prefix: &str,
        gate_up: GateUp,
        hidden: usize,
        ffn: usize,
        act: Activation,
    ) -> Result<Self> {
        let down = Linear::load(ckpt, &format!("{prefix}.ffn_down"), (hidden, ffn), false)?;
        Ok(Self { gate_up, down, act })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate, up } => (gate.forward(x)?, up.forward(x)?),
            GateUp::Fused { both, ffn } => {
                let y = both.forward(x)?;
                let half = |i: usize| y.narrow(1, i * ffn, *ffn).map_err(forward_err);
                (half(0)?, half(1)?)
            }
        };
        let gate = match self.act {
            Activation::Silu => candle_nn::ops::silu(&gate),
            Activation::GeluTanh => gate.gelu(),
        }
        .map_err(forward_err)?;
        self.down.forward(&(gate * up).map_err(forward_err)?)
    }
}

/// The q/k/v projections: three matrices (with optional biases), or one fused `[q; k; v]`
/// matrix (Phi-3's `attn_qkv` / `qkv_proj`).
enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// Self-attention: projections (with optional biases and per-head q/k norms), then the Λ cache
/// does rotation, masking, softmax and eviction, then the output projection.
pub struct SelfAttention {
    qkv: Qkv,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    shape: HeadShape,
    rope: Rope,
    scale: f32,
}

/// The head layout of an attention block.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl HeadShape {
    fn q_rows(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_rows(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

impl SelfAttention {
    /// Loads `attn_q/k/v/output` (llama.cpp names) under `prefix`, with q/k biases when
    /// `with_bias` and per-head q/k RMS norms when `qk_norm_eps` is set.
    pub fn load(
        ckpt: &mut Checkpoint,
        prefix: &str,
        shape: HeadShape,
        with_bias: bool,
        qk_norm_eps: Option<f64>,
        rope: Rope,
        scale: f32,
    ) -> Result<Self> {
        let (q_norm, k_norm) = match qk_norm_eps {
            Some(eps) => {
                let mut n = |which: &str| {
                    rms_norm(
                        ckpt,
                        &format!("{prefix}.attn_{which}_norm.weight"),
                        shape.head_dim,
                        eps,
                    )
                };
                (Some(n("q")?), Some(n("k")?))
            }
            None => (None, None),
        };
        let hidden = shape.hidden;
        let mut lin = |name: &str, rows: usize| {
            Linear::load(ckpt, &format!("{prefix}.{name}"), (rows, hidden), with_bias)
        };
        let qkv = Qkv::Separate {
            q: lin("attn_q", shape.q_rows())?,
            k: lin("attn_k", shape.kv_rows())?,
            v: lin("attn_v", shape.kv_rows())?,
        };
        let mut attn = Self::with(ckpt, prefix, qkv, shape, rope, scale)?;
        (attn.q_norm, attn.k_norm) = (q_norm, k_norm);
        Ok(attn)
    }

    /// Loads a fused `attn_qkv` and `attn_output` under `prefix` (Phi-3).
    pub fn load_fused(
        ckpt: &mut Checkpoint,
        prefix: &str,
        shape: HeadShape,
        rope: Rope,
        scale: f32,
    ) -> Result<Self> {
        let rows = shape.q_rows() + 2 * shape.kv_rows();
        let fused = Linear::load(
            ckpt,
            &format!("{prefix}.attn_qkv"),
            (rows, shape.hidden),
            false,
        )?;
        Self::with(ckpt, prefix, Qkv::Fused(fused), shape, rope, scale)
    }

    fn with(
        ckpt: &mut Checkpoint,
        prefix: &str,
        qkv: Qkv,
        shape: HeadShape,
        rope: Rope,
        scale: f32,
    ) -> Result<Self> {
        let o = Linear::load(
            ckpt,
            &format!("{prefix}.attn_output"),
            (shape.hidden, shape.q_rows()),
            false,
        )?;
        Ok(Self {
            qkv,
            o,
            q_norm: None,
            k_norm: None,
            shape,
            rope,
            scale,
        })
    }

    /// Per-head norm (if any), as `[tokens, heads · head_dim]`.
    fn heads(&self, y: Tensor, n_norm: Option<&RmsNorm>, heads: usize) -> Result<Tensor> {
        match n_norm {
            Some(n) => {
                let (t, width) = y.dims2().map_err(forward_err)?;
                let y = y
                    .reshape((t, heads, self.shape.head_dim))
                    .map_err(forward_err)?;
                norm(n, &y)?.reshape((t, width)).map_err(forward_err)
            }
            None => Ok(y),
        }
    }

    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut dyn AttentionCache,
    ) -> Result<Tensor> {
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x)?;
                let (qr, kvr) = (self.shape.q_rows(), self.shape.kv_rows());
                let part = |start, len| y.narrow(1, start, len).map_err(forward_err);
                (part(0, qr)?, part(qr, kvr)?, part(qr + kvr, kvr)?)
            }
        };
        let HeadShape {
            n_heads,
            n_kv_heads,
            ..
        } = self.shape;
        let q = self.heads(q, self.q_norm.as_ref(), n_heads)?;
        let k = self.heads(k, self.k_norm.as_ref(), n_kv_heads)?;
        let v = v.contiguous().map_err(forward_err)?;
        let input = TensorInput {
            q: &q,
            k: &k,
            v: &v,
            n_heads,
            rope: &self.rope,
            scale: self.scale,
        };
        let out = cache.attend_tensors(layer, &input)?;
        self.o.forward(&out)
    }
}

/// `x` `[tokens, cols]` (f32, on the CPU) times a packed matrix, without copying `x`.
fn packed_forward(m: &PackedMatrix, x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous().map_err(forward_err)?;
    let (t, cols) = x.dims2().map_err(forward_err)?;
    let y = {
        let (storage, layout) = x.storage_and_layout();
        let values = match &*storage {
            candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>().map_err(forward_err)?,
            _ => return Err(ModelError::Forward("CPU kernel given a GPU tensor".into())),
        };
        let start = layout.start_offset();
        m.matmul(&values[start..start + t * cols], t)
            .map_err(|e| ModelError::Forward(e.to_string()))?
    };
    Tensor::from_vec(y, (t, m.rows()), x.device()).map_err(forward_err)
}

/// Final norm and output projection, on the last row only when that is all the caller needs
/// (the vocabulary projection is the largest matmul of a decode step).
pub fn lm_head(
    out_norm: &RmsNorm,
    head: &Linear,
    x: &Tensor,
    logits: super::Logits,
) -> Result<Tensor> {
    let x = match logits {
        super::Logits::All => x.clone(),
        super::Logits::Last => {
            let (t, _) = x.dims2().map_err(forward_err)?;
            if t == 0 {
                return Err(ModelError::Forward(
                    "a forward needs at least one token".into(),
                ));
            }
            x.narrow(0, t - 1, 1).map_err(forward_err)?
        }
    };
    head.forward(&norm(out_norm, &x)?)
}
