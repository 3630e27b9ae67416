//! Building blocks shared by every architecture file: quantized linear layers, RMS norm, the MLP
//! and the self-attention block that hands q/k/v to the Λ cache.
//!
//! Activations are 2-D `[tokens, features]` f32 tensors (batch size is always 1 in a chat).

use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};
use candle_nn::RmsNorm;

use super::ModelError;
use super::checkpoint::Checkpoint;
use crate::attention::{AttentionCache, AttentionInput, Rope};
use crate::model::candle_msg;

pub type Result<T> = std::result::Result<T, ModelError>;

/// Converts candle errors inside a forward pass.
pub fn forward_err(e: candle_core::Error) -> ModelError {
    ModelError::Forward(candle_msg(&e))
}

/// A quantized weight matrix with an optional f32 bias.
pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    /// `{name}.weight` of shape `[rows, cols]`, and `{name}.bias` when `with_bias`.
    pub fn load(
        ckpt: &mut Checkpoint,
        name: &str,
        shape: (usize, usize),
        with_bias: bool,
    ) -> Result<Self> {
        let weight = ckpt.matrix(&format!("{name}.weight"), shape)?;
        let bias = if with_bias {
            Some(ckpt.vector(&format!("{name}.bias"), shape.0)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn from_qmatmul(weight: QMatMul) -> Self {
        Self { weight, bias: None }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            // bf16/f16 safetensors weights: multiply in their dtype, keep activations f32.
            QMatMul::Tensor(w) if w.dtype() != x.dtype() => x
                .to_dtype(w.dtype())
                .and_then(|x| x.matmul(&w.t()?))
                .and_then(|y| y.to_dtype(x.dtype())),
            w => w.forward(x),
        }
        .map_err(forward_err)?;
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
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
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
        Ok(Self {
            gate: Linear::load(ckpt, &format!("{prefix}.ffn_gate"), (ffn, hidden), false)?,
            up: Linear::load(ckpt, &format!("{prefix}.ffn_up"), (ffn, hidden), false)?,
            down: Linear::load(ckpt, &format!("{prefix}.ffn_down"), (hidden, ffn), false)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate.forward(x)?;
        let gate = match self.act {
            Activation::Silu => candle_nn::ops::silu(&gate),
            Activation::GeluTanh => gate.gelu(),
        }
        .map_err(forward_err)?;
        let up = self.up.forward(x)?;
        self.down.forward(&(gate * up).map_err(forward_err)?)
    }
}

/// Self-attention: projections (with optional biases and per-head q/k norms), then the Λ cache
/// does rotation, masking, softmax and eviction, then the output projection.
pub struct SelfAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope: Rope,
    pub scale: f32,
}

/// The head layout of an attention block.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
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
        let HeadShape {
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
        } = shape;
        let (q_norm, k_norm) = match qk_norm_eps {
            Some(eps) => (
                Some(rms_norm(
                    ckpt,
                    &format!("{prefix}.attn_q_norm.weight"),
                    head_dim,
                    eps,
                )?),
                Some(rms_norm(
                    ckpt,
                    &format!("{prefix}.attn_k_norm.weight"),
                    head_dim,
                    eps,
                )?),
            ),
            None => (None, None),
        };
        let (q_rows, kv_rows) = (n_heads * head_dim, n_kv_heads * head_dim);
        Ok(Self {
            q: Linear::load(
                ckpt,
                &format!("{prefix}.attn_q"),
                (q_rows, hidden),
                with_bias,
            )?,
            k: Linear::load(
                ckpt,
                &format!("{prefix}.attn_k"),
                (kv_rows, hidden),
                with_bias,
            )?,
            v: Linear::load(
                ckpt,
                &format!("{prefix}.attn_v"),
                (kv_rows, hidden),
                with_bias,
            )?,
            o: Linear::load(
                ckpt,
                &format!("{prefix}.attn_output"),
                (hidden, q_rows),
                false,
            )?,
            q_norm,
            k_norm,
            n_heads,
            n_kv_heads,
            head_dim,
            rope,
            scale,
        })
    }

    fn project(
        &self,
        lin: &Linear,
        n_norm: Option<&RmsNorm>,
        x: &Tensor,
        heads: usize,
    ) -> Result<Vec<f32>> {
        let y = lin.forward(x)?;
        let y = match n_norm {
            Some(n) => {
                let (t, _) = y.dims2().map_err(forward_err)?;
                let y = y.reshape((t, heads, self.head_dim)).map_err(forward_err)?;
                norm(n, &y)?
            }
            None => y,
        };
        y.flatten_all()
            .and_then(|y| y.to_vec1::<f32>())
            .map_err(forward_err)
    }

    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut dyn AttentionCache,
    ) -> Result<Tensor> {
        let (n_tokens, _) = x.dims2().map_err(forward_err)?;
        let q = self.project(&self.q, self.q_norm.as_ref(), x, self.n_heads)?;
        let k = self.project(&self.k, self.k_norm.as_ref(), x, self.n_kv_heads)?;
        let v = self.project(&self.v, None, x, self.n_kv_heads)?;
        let out = cache.attend(
            layer,
            &AttentionInput {
                q: &q,
                k: &k,
                v: &v,
                n_tokens,
                n_heads: self.n_heads,
                rope: &self.rope,
                scale: self.scale,
            },
        )?;
        let out = Tensor::from_vec(out, (n_tokens, self.n_heads * self.head_dim), x.device())
            .map_err(forward_err)?;
        self.o.forward(&out)
    }
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
