//! The oracle: Λ attention computed the naive way, in f64, from the rule alone.
//!
//! Dense `T × T` logits with the explicit mask of docs/ALGORITHM.md, rotation computed directly
//! from `pos · inv_freq` in f64, one softmax per row. It shares nothing with the fast path except
//! the [`Rope`]'s frequencies, so the tests comparing the two check the cache, the chunking, the
//! eviction and the kernel. [`OracleCache`] wraps it for whole-model runs: it keeps every key,
//! which also makes it the "vanilla" full attention when `L` exceeds the sequence.

use std::ops::Range;

use super::{
    AttentionCache, AttentionError, AttentionInput, LambdaParams, LayerGeometry, Rope, RopeStyle,
    check_input,
};

/// Rotates one head vector to `pos`, in f64, straight from the definition.
fn rotate_f64(x: &[f32], pos: f64, rope: &Rope) -> Vec<f64> {
    let half = rope.half_dim();
    let mut out: Vec<f64> = x.iter().map(|v| *v as f64).collect();
    for (i, f) in rope.inv_freq().iter().enumerate() {
        let (s, c) = (pos * f).sin_cos();
        let (a, b) = match rope.style() {
            RopeStyle::Neox => (i, i + half),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (x0, x1) = (x[a] as f64, x[b] as f64);
        out[a] = x0 * c - x1 * s;
        out[b] = x0 * s + x1 * c;
    }
    out
}

/// Λ attention of rows `q_start..q_start + n_q` of a sequence against keys `0..n_k` of it.
#[allow(clippy::too_many_arguments)]
fn reference_rows(
    q: &[f32],
    q_start: usize,
    k: &[f32],
    v: &[f32],
    n_k: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    geometry: (usize, usize, u64),
    far: &dyn Fn(usize, usize) -> bool,
    rope: &Rope,
    scale: f32,
) -> Vec<f64> {
    let (g, l, d) = geometry;
    // Keys seen at the clamped distance once outside the window: sinks, and what `far` adds.
    let is_global = |i: usize, j: usize| j < g || far(i, j);
    let n_q = q.len() / (n_heads * head_dim);
    let group = n_heads / n_kv;
    let mut out = vec![0f64; q.len()];
    // R(j)·k_j for every key, and k_j itself for the global branch.
    let k_rot: Vec<Vec<f64>> = (0..n_k * n_kv)
        .map(|r| rotate_f64(&k[r * head_dim..][..head_dim], (r / n_kv) as f64, rope))
        .collect();
    for t in 0..n_q {
        let i = q_start + t;
        for h in 0..n_heads {
            let kv = h / group;
            let qv = &q[(t * n_heads + h) * head_dim..][..head_dim];
            let q_local = rotate_f64(qv, i as f64, rope);
            let q_global = rotate_f64(qv, d as f64, rope);
            let mut logits = vec![f64::NEG_INFINITY; n_k];
            for (j, logit) in logits.iter_mut().enumerate().take(i + 1) {
                let dot = if i - j < l {
                    let kr = &k_rot[j * n_kv + kv];
                    q_local.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>()
                } else if is_global(i, j) {
                    let kj = &k[(j * n_kv + kv) * head_dim..][..head_dim];
                    q_global
                        .iter()
                        .zip(kj)
                        .map(|(a, b)| a * *b as f64)
                        .sum::<f64>()
                } else {
                    continue;
                };
                *logit = dot * scale as f64;
            }
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = logits.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            let o = &mut out[(t * n_heads + h) * head_dim..][..head_dim];
            for (j, w) in weights.iter().enumerate() {
                if *w == 0.0 {
                    continue;
                }
                let vj = &v[(j * n_kv + kv) * head_dim..][..head_dim];
                for (a, b) in o.iter_mut().zip(vj) {
                    *a += w / sum * *b as f64;
                }
            }
        }
    }
    out
}

/// `reference_lambda_attention(q, k, v, G, L, D)` of docs/ALGORITHM.md (§4): the whole sequence of
/// `t` tokens at once. Layouts `[token][head][head_dim]`; returns f64 outputs.
#[allow(clippy::too_many_arguments)]
pub fn reference_lambda_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    params: LambdaParams,
    rope: &Rope,
    scale: f32,
) -> Vec<f64> {
    reference_lambda_attention_pinned(
        q,
        k,
        v,
        t,
        n_heads,
        n_kv,
        head_dim,
        params,
        &[],
        rope,
        scale,
    )
}

/// The oracle with a set P of pinned positions, treated like `j < G` (docs/ALGORITHM.md §5).
#[allow(clippy::too_many_arguments)]
pub fn reference_lambda_attention_pinned(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    params: LambdaParams,
    pinned: &[Range<u64>],
    rope: &Rope,
    scale: f32,
) -> Vec<f64> {
    reference_rows(
        q,
        0,
        k,
        v,
        t,
        n_heads,
        n_kv,
        head_dim,
        (params.n_global, params.n_local, params.distance_limit),
        &|_, j| pinned.iter().any(|r| r.contains(&(j as u64))),
        rope,
        scale,
    )
}

/// The oracle with recall (docs/ALGORITHM.md §10): query `i` also sees, at the clamped
/// distance, the positions `recalled(i)` names (the blocks the cache chose for that row's
/// pass), with the keys and values `k`/`v` hold for them (a test passes what the store gives
/// back). `recalled(i)` must lie outside row `i`'s window.
#[allow(clippy::too_many_arguments)]
pub fn reference_lambda_attention_recalled(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    params: LambdaParams,
    recalled: &dyn Fn(usize) -> Vec<u64>,
    rope: &Rope,
    scale: f32,
) -> Vec<f64> {
    let sets: Vec<Vec<u64>> = (0..t).map(recalled).collect();
    reference_rows(
        q,
        0,
        k,
        v,
        t,
        n_heads,
        n_kv,
        head_dim,
        (params.n_global, params.n_local, params.distance_limit),
        &|i, j| sets[i].contains(&(j as u64)),
        rope,
        scale,
    )
}

/// A cache that keeps every key and recomputes attention with the oracle: for whole-model
/// comparisons and for vanilla (unbounded) attention. Memory grows with the sequence, by design.
pub struct OracleCache {
    layers: Vec<(LayerGeometry, Vec<f32>, Vec<f32>)>,
    next_position: u64,
}

impl OracleCache {
    pub fn new(layers: Vec<LayerGeometry>) -> Self {
        Self {
            layers: layers
                .into_iter()
                .map(|g| (g, Vec::new(), Vec::new()))
                .collect(),
            next_position: 0,
        }
    }
}

impl AttentionCache for OracleCache {
    fn attend(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
    ) -> Result<Vec<f32>, AttentionError> {
        let n_layers = self.layers.len();
        let (geometry, keys, values) = self
            .layers
            .get_mut(layer)
            .ok_or(AttentionError::NoSuchLayer(layer, n_layers))?;
        check_input(input, geometry.n_kv_heads, geometry.head_dim)?;
        let row = geometry.n_kv_heads * geometry.head_dim;
        let q_start = keys.len() / row;
        keys.extend_from_slice(input.k);
        values.extend_from_slice(input.v);
        let out = reference_rows(
            input.q,
            q_start,
            keys,
            values,
            keys.len() / row,
            input.n_heads,
            geometry.n_kv_heads,
            geometry.head_dim,
            (geometry.n_global, geometry.window, geometry.distance_limit),
            &|_, _| false,
            input.rope,
            input.scale,
        );
        Ok(out.into_iter().map(|x| x as f32).collect())
    }

    fn next_position(&self) -> u64 {
        self.next_position
    }

    fn advance(&mut self, n: usize) {
        self.next_position += n as u64;
    }
}
