//! LM-Infinite's Λ-shaped attention over a bounded KV cache, independent of any model.
//!
//! The rule (docs/ALGORITHM.md): query `i` sees key `j` at its true distance when `i - j < L`
//! (the local window, itself included), sees a *global* key `j < G` that has left the window at
//! the clamped distance `D`, and sees nothing else. One softmax covers both branches. A model
//! forward hands each layer's projected q/k/v to an [`AttentionCache`]; the cache owns rotation,
//! storage and eviction, so model files never deal with positions beyond asking for them.

use candle_core::Tensor;

mod blocked;
mod host;
mod kernel;
mod kv_cache;
mod kv_store;
mod oracle;
mod persist;
pub mod recall;
mod rope;
mod snapshot;
mod tensor;

pub use host::{CacheStats, HostCache, HostLayerCache};
pub use kv_cache::KvCache;
pub use kv_store::KvType;
pub use oracle::{
    OracleCache, reference_lambda_attention, reference_lambda_attention_pinned,
    reference_lambda_attention_recalled,
};
pub use persist::{RewindPoint, SlotState};
pub use rope::{Rope, RopeStyle};
pub use snapshot::SnapshotError;
pub use tensor::TensorCache;

/// Defaults: 64 sinks (BOS, a system prompt and then some: the official code uses 10–100) and a
/// 4096-token window (the training length of the paper's models; capped at each model's own),
/// sinks seen at distance = the window.
pub const DEFAULT_N_GLOBAL: usize = 64;
pub const DEFAULT_N_LOCAL: usize = 4096;

/// What the app stores keys and values as unless told otherwise: f16. On the KJV it keeps
/// perplexity within 0.25 % of f32 for both models (docs/PERFORMANCE.md), with half the cache's
/// memory and a faster decode at a full window. [`KvType::default`] stays f32, exact: what
/// the library loads with and the oracle tests compare.
pub const DEFAULT_KV_TYPE: KvType = KvType::F16;

/// The Λ parameters of a conversation (before per-layer adjustments such as sliding windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LambdaParams {
    /// `G`: leading tokens every query attends to (attention sinks).
    pub n_global: usize,
    /// `L`: the window, the query itself included.
    pub n_local: usize,
    /// `D`: the distance at which evicted global tokens are seen.
    pub distance_limit: u64,
}

/// Invalid Λ parameters, reported before any model work starts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    #[error("n_local must be at least 1 (it is the window and includes the query itself)")]
    ZeroLocal,
    #[error(
        "distance_limit {0} must be between 1 and n_local ({1}): a global token is never closer than the window"
    )]
    BadDistance(u64, usize),
    #[error("n_global {0} is larger than n_local {1}: the sinks would outnumber the window")]
    GlobalTooLarge(usize, usize),
}

impl LambdaParams {
    /// Validates and fills the default `D = L` when `distance_limit` is `None`.
    pub fn new(
        n_global: usize,
        n_local: usize,
        distance_limit: Option<u64>,
    ) -> Result<Self, ParamsError> {
        if n_local == 0 {
            return Err(ParamsError::ZeroLocal);
        }
        let distance_limit = distance_limit.unwrap_or(n_local as u64);
        if distance_limit == 0 || distance_limit > n_local as u64 {
            return Err(ParamsError::BadDistance(distance_limit, n_local));
        }
        if n_global > n_local {
            return Err(ParamsError::GlobalTooLarge(n_global, n_local));
        }
        Ok(Self {
            n_global,
            n_local,
            distance_limit,
        })
    }
}

/// The first key position the query at `query` sees at its true distance under a window of
/// `window` tokens (itself included): keys `j` with `query − j < window`. The one place the
/// window's start is computed, for the cache's counters, the session's token states and the
/// visualizer's rows.
pub fn window_start(query: u64, window: u64) -> u64 {
    (query + 1).saturating_sub(window)
}

/// What the cache needs to know about one layer's attention geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerGeometry {
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Tokens this layer sees at true distance: `L`, or `min(sliding window, L)`.
    pub window: usize,
    /// Sinks of this layer: `G`, or 0 on sliding-window layers (they had no global branch).
    pub n_global: usize,
    pub distance_limit: u64,
    /// Whether pinned tokens apply (layers with a global branch; not model sliding layers).
    pub pinnable: bool,
}

impl LayerGeometry {
    /// Geometry of an ordinary (full-attention) layer under `params`.
    pub fn full(params: LambdaParams, n_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            n_kv_heads,
            head_dim,
            window: params.n_local,
            n_global: params.n_global,
            distance_limit: params.distance_limit,
            pinnable: true,
        }
    }

    /// Geometry of a model sliding-window layer: its own window capped by `L`, no sinks.
    pub fn sliding(
        params: LambdaParams,
        n_kv_heads: usize,
        head_dim: usize,
        window: usize,
    ) -> Self {
        let window = window.min(params.n_local).max(1);
        Self {
            n_kv_heads,
            head_dim,
            window,
            n_global: 0,
            distance_limit: window as u64,
            pinnable: false,
        }
    }
}

/// One layer's projected (not yet rotated) query, key and value rows for a chunk of tokens.
///
/// Layouts are row-major `[token][head][head_dim]`.
pub struct AttentionInput<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub n_tokens: usize,
    pub n_heads: usize,
    pub rope: &'a Rope,
    /// Logit scale, usually `1/√head_dim`.
    pub scale: f32,
}

/// [`AttentionInput`] as tensors on the model's device: `q [tokens, heads · head_dim]`,
/// `k`/`v [tokens, kv_heads · head_dim]`.
pub struct TensorInput<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub n_heads: usize,
    pub rope: &'a Rope,
    pub scale: f32,
}

/// Errors of the attention caches: misuse by a model file, never by the user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttentionError {
    #[error("layer {0} does not exist in this cache ({1} layers)")]
    NoSuchLayer(usize, usize),
    #[error("attention input has {got} values, expected {expected} ({what})")]
    Shape {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{0} query heads cannot share {1} KV heads")]
    Gqa(usize, usize),
    #[error("attention on the device failed: {0}")]
    Tensor(String),
    #[error("the conversation reached the last position a cache can hold ({MAX_POSITION})")]
    PositionLimit,
    #[error("recall runs on the CPU cache only: use --recall off on a GPU")]
    RecallOnDevice,
}

/// The furthest position a cache holds: 2^48 tokens, nine centuries of a chat at 10,000 tokens
/// a second. A forward past it is refused and a snapshot past it is not restored, so the
/// counters a forward adds to never wrap (found by fuzzing: a cache restored at `u64::MAX`
/// attended one token and saved a snapshot it then refused).
pub const MAX_POSITION: u64 = 1 << 48;

/// Refuses a forward of `n_tokens` that would take the cache past [`MAX_POSITION`].
pub(crate) fn check_position(next_position: u64, n_tokens: usize) -> Result<(), AttentionError> {
    match next_position.checked_add(n_tokens as u64) {
        Some(end) if end <= MAX_POSITION => Ok(()),
        _ => Err(AttentionError::PositionLimit),
    }
}

/// Where a model's attention layers keep their keys and values.
///
/// Both the bounded [`HostCache`] and the dense [`OracleCache`] (the oracle, and vanilla
/// attention) implement it, so one model forward serves both.
pub trait AttentionCache: Send {
    /// Attends the chunk's queries to everything the rule allows, stores the chunk's keys and
    /// values, and returns the output `[token][head][head_dim]`.
    fn attend(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
    ) -> Result<Vec<f32>, AttentionError>;

    /// [`Self::attend`] on tensors, returning `[tokens, heads · head_dim]` on their device. Host
    /// caches take this default (through host memory); a device cache keeps everything there.
    fn attend_tensors(
        &mut self,
        layer: usize,
        input: &TensorInput<'_>,
    ) -> Result<Tensor, AttentionError> {
        let err = |e: candle_core::Error| AttentionError::Tensor(crate::error::candle_msg(&e));
        let host = |x: &Tensor| {
            x.flatten_all()
                .and_then(|x| x.to_vec1::<f32>())
                .map_err(err)
        };
        let (q, k, v) = (host(input.q)?, host(input.k)?, host(input.v)?);
        let n_tokens = input.q.dim(0).map_err(err)?;
        let out = self.attend(
            layer,
            &AttentionInput {
                q: &q,
                k: &k,
                v: &v,
                n_tokens,
                n_heads: input.n_heads,
                rope: input.rope,
                scale: input.scale,
            },
        )?;
        let width = out.len() / n_tokens.max(1);
        Tensor::from_vec(out, (n_tokens, width), input.q.device()).map_err(err)
    }

    /// Absolute position of the next token (= tokens seen so far).
    fn next_position(&self) -> u64;

    /// Declares that a forward of `n` tokens finished in every layer.
    fn advance(&mut self, n: usize);
}

pub(crate) fn check_input(
    input: &AttentionInput<'_>,
    n_kv_heads: usize,
    head_dim: usize,
) -> Result<(), AttentionError> {
    let q_len = input.n_tokens * input.n_heads * head_dim;
    let kv_len = input.n_tokens * n_kv_heads * head_dim;
    for (what, got, expected) in [
        ("q", input.q.len(), q_len),
        ("k", input.k.len(), kv_len),
        ("v", input.v.len(), kv_len),
    ] {
        if got != expected {
            return Err(AttentionError::Shape {
                what,
                got,
                expected,
            });
        }
    }
    if n_kv_heads == 0 || !input.n_heads.is_multiple_of(n_kv_heads) {
        return Err(AttentionError::Gqa(input.n_heads, n_kv_heads));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_validation() {
        assert_eq!(LambdaParams::new(4, 0, None), Err(ParamsError::ZeroLocal));
        assert_eq!(
            LambdaParams::new(4, 8, Some(9)),
            Err(ParamsError::BadDistance(9, 8))
        );
        assert_eq!(
            LambdaParams::new(4, 8, Some(0)),
            Err(ParamsError::BadDistance(0, 8))
        );
        assert_eq!(
            LambdaParams::new(9, 8, None),
            Err(ParamsError::GlobalTooLarge(9, 8))
        );
        let p = LambdaParams::new(4, 8, None).unwrap();
        assert_eq!(p.distance_limit, 8);
    }

    #[test]
    fn sliding_layers_cap_their_window_and_drop_sinks() {
        let p = LambdaParams::new(4, 8, None).unwrap();
        let g = LayerGeometry::sliding(p, 1, 4, 512);
        assert_eq!((g.window, g.n_global, g.distance_limit), (8, 0, 8));
        let g = LayerGeometry::sliding(p, 1, 4, 3);
        assert_eq!(g.window, 3);
    }
}
