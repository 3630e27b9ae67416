//! The Λ cache in candle tensors, on whatever device the model runs: the path a GPU takes.
//!
//! [`LambdaCache`](super::LambdaCache) is the CPU's: host memory, a ring written in place, a
//! hand-written kernel. This one keeps each layer's keys and values as device tensors and does
//! the rule with tensor operations — rotation, two score blocks (the window at true distances,
//! the sinks at distance D), one softmax over both, one weighted sum — so nothing crosses to the
//! host during a forward but the rotation tables and masks it uploads (positions are host data).
//! It follows shared/ALGORITHM.md exactly and is tested against the oracle on the CPU device.
//!
//! Not here (the CPU cache has them): pinned tokens, the attention probe, snapshots.

use candle_core::{D, Device, Tensor};

use super::{
    AttentionCache, AttentionError, AttentionInput, LayerGeometry, Rope, RopeStyle, TensorInput,
};

fn tensor_err(e: candle_core::Error) -> AttentionError {
    AttentionError::Tensor(crate::model::candle_msg(&e))
}

type Result<T> = std::result::Result<T, AttentionError>;

/// One layer. Its window holds the last `min(tokens seen, window)` positions, in order, so the
/// positions need not be stored.
struct DeviceLayer {
    geometry: LayerGeometry,
    stores: Stores,
}

pub struct DeviceCache {
    layers: Vec<DeviceLayer>,
    device: Device,
    next_position: u64,
}

impl DeviceCache {
    pub fn new(layers: Vec<LayerGeometry>, device: &Device) -> Self {
        Self {
            layers: layers
                .into_iter()
                .map(|geometry| DeviceLayer {
                    geometry,
                    stores: Stores::default(),
                })
                .collect(),
            device: device.clone(),
            next_position: 0,
        }
    }

    /// Entries held by `layer` (sinks + window).
    pub fn slots_in_use(&self, layer: usize) -> usize {
        let s = &self.layers[layer].stores;
        let n = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.dims()[1]);
        n(&s.sink_k) + n(&s.window_k)
    }

    fn geometry(&self, layer: usize) -> Result<LayerGeometry> {
        self.layers
            .get(layer)
            .map(|l| l.geometry)
            .ok_or(AttentionError::NoSuchLayer(layer, self.layers.len()))
    }

    /// cos/sin `[rows, 1, half]` of each row's position.
    fn angles(&self, rope: &Rope, positions: &[u64]) -> Result<(Tensor, Tensor)> {
        let half = rope.half_dim();
        let (mut cos, mut sin) = (
            vec![0f32; positions.len() * half],
            vec![0f32; positions.len() * half],
        );
        for (i, &p) in positions.iter().enumerate() {
            let r = i * half..(i + 1) * half;
            rope.angles(p, &mut cos[r.clone()], &mut sin[r]);
        }
        let shape = (positions.len(), 1, half);
        let cos = Tensor::from_vec(cos, shape, &self.device).map_err(tensor_err)?;
        let sin = Tensor::from_vec(sin, shape, &self.device).map_err(tensor_err)?;
        Ok((cos, sin))
    }

    /// A `[rows, 1, cols]` additive mask: 0 where `allowed(row, col)`, −∞ elsewhere.
    fn mask(
        &self,
        rows: usize,
        cols: usize,
        allowed: impl Fn(usize, usize) -> bool,
    ) -> Result<Tensor> {
        let m: Vec<f32> = (0..rows * cols)
            .map(|i| {
                if allowed(i / cols, i % cols) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Tensor::from_vec(m, (rows, 1, cols), &self.device).map_err(tensor_err)
    }
}

/// Rotates `x` `[rows, heads, head_dim]` by per-row `cos`/`sin` `[rows, 1, half]`; dims past
/// `2 · half` (partial rotary) are left as they are.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> candle_core::Result<Tensor> {
    let (rows, heads, hd) = x.dims3()?;
    let half = cos.dim(D::Minus1)?;
    let rot = x.narrow(2, 0, 2 * half)?;
    let (cos, sin) = (
        cos.broadcast_as((rows, heads, half))?,
        sin.broadcast_as((rows, heads, half))?,
    );
    let turned = match style {
        RopeStyle::Neox => {
            let (a, b) = (rot.narrow(2, 0, half)?, rot.narrow(2, half, half)?);
            let ra = ((&a * &cos)? - (&b * &sin)?)?;
            let rb = ((&a * &sin)? + (&b * &cos)?)?;
            Tensor::cat(&[ra, rb], 2)?
        }
        RopeStyle::Interleaved => {
            let pairs = rot.reshape((rows, heads, half, 2))?;
            let (a, b) = (
                pairs.narrow(3, 0, 1)?.squeeze(3)?,
                pairs.narrow(3, 1, 1)?.squeeze(3)?,
            );
            let ra = ((&a * &cos)? - (&b * &sin)?)?;
            let rb = ((&a * &sin)? + (&b * &cos)?)?;
            Tensor::stack(&[ra, rb], 3)?.reshape((rows, heads, 2 * half))?
        }
    };
    if 2 * half == hd {
        Ok(turned)
    } else {
        Tensor::cat(&[turned, x.narrow(2, 2 * half, hd - 2 * half)?], 2)
    }
}

/// Appends `new` `[kv, n, hd]` to `store` along the token axis.
fn append(store: &Option<Tensor>, new: &Tensor) -> candle_core::Result<Tensor> {
    match store {
        Some(s) => Tensor::cat(&[s, new], 1),
        None => Ok(new.clone()),
    }
}

/// What one layer holds: sinks (unrotated) and window (rotated), `[kv_heads, n, head_dim]`.
#[derive(Clone, Default)]
struct Stores {
    sink_k: Option<Tensor>,
    sink_v: Option<Tensor>,
    window_k: Option<Tensor>,
    window_v: Option<Tensor>,
}

/// One chunk's inputs to [`lambda_step`], all on the device.
struct Step<'a> {
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    n_heads: usize,
    style: RopeStyle,
    scale: f32,
    /// Rotation to each token's own position, and to the distance limit D.
    rot: (Tensor, Tensor),
    rot_d: (Tensor, Tensor),
    /// Leading tokens of the chunk that are sinks.
    new_sinks: usize,
    /// Additive masks `[tokens, 1, keys]` of the sink and the window blocks (one row per token,
    /// shared by the heads of a group).
    sink_mask: Tensor,
    window_mask: Tensor,
}

/// The Λ rule for one chunk: returns the output `[tokens, heads · head_dim]` and the stores
/// after it (chunk added, window trimmed to `window`).
fn lambda_step(
    stores: &Stores,
    geometry: &LayerGeometry,
    step: &Step<'_>,
) -> candle_core::Result<(Tensor, Stores)> {
    let (kv, hd, group) = (
        geometry.n_kv_heads,
        geometry.head_dim,
        step.n_heads / geometry.n_kv_heads,
    );
    let t = step.q.dim(0)?;
    let q = step.q.reshape((t, step.n_heads, hd))?;
    let k = step.k.reshape((t, kv, hd))?;
    let v = step.v.reshape((t, kv, hd))?.transpose(0, 1)?.contiguous()?;
    // [t, heads, hd] → [kv, t · group, hd]: row r is token r / group.
    let grouped = |x: Tensor| {
        x.reshape((t, kv, group, hd))?
            .permute((1, 0, 2, 3))?
            .reshape((kv, t * group, hd))
    };
    let q_local = grouped(rotate(&q, &step.rot.0, &step.rot.1, step.style)?)?;
    let q_sink = grouped(rotate(&q, &step.rot_d.0, &step.rot_d.1, step.style)?)?;
    let k_rot = rotate(&k, &step.rot.0, &step.rot.1, step.style)?
        .transpose(0, 1)?
        .contiguous()?;
    let mut next = stores.clone();
    // The chunk's sinks join the global store (unrotated) before anyone attends.
    if step.new_sinks > 0 {
        let ks = k
            .narrow(0, 0, step.new_sinks)?
            .transpose(0, 1)?
            .contiguous()?;
        let vs = v.narrow(1, 0, step.new_sinks)?.contiguous()?;
        next.sink_k = Some(append(&stores.sink_k, &ks)?);
        next.sink_v = Some(append(&stores.sink_v, &vs)?);
    }
    let keys = append(&stores.window_k, &k_rot)?;
    let values = append(&stores.window_v, &v)?;
    let scores = |q: &Tensor, k: &Tensor, mask: &Tensor| {
        let s = (q.matmul(&k.transpose(1, 2)?.contiguous()?)? * step.scale as f64)?;
        let keys = s.dim(2)?;
        s.reshape((kv, t, group, keys))?
            .broadcast_add(mask)?
            .reshape((kv, t * group, keys))
    };
    let window_scores = scores(&q_local, &keys, &step.window_mask)?;
    let out = match (&next.sink_k, &next.sink_v) {
        (Some(sk), Some(sv)) => {
            let n_sink = sk.dim(1)?;
            let all = Tensor::cat(&[scores(&q_sink, sk, &step.sink_mask)?, window_scores], 2)?;
            let p = candle_nn::ops::softmax_last_dim(&all)?;
            let n_window = p.dim(2)? - n_sink;
            (p.narrow(2, 0, n_sink)?.contiguous()?.matmul(sv)?
                + p.narrow(2, n_sink, n_window)?
                    .contiguous()?
                    .matmul(&values)?)?
        }
        _ => candle_nn::ops::softmax_last_dim(&window_scores)?.matmul(&values)?,
    };
    let out = out
        .reshape((kv, t, group, hd))?
        .permute((1, 0, 2, 3))?
        .reshape((t, step.n_heads * hd))?;
    // Eviction: only the last `window` entries stay.
    let last = |x: Tensor| -> candle_core::Result<Tensor> {
        let n = x.dim(1)?;
        let w = geometry.window;
        if n > w {
            x.narrow(1, n - w, w)?.contiguous()
        } else {
            Ok(x)
        }
    };
    next.window_k = Some(last(keys)?);
    next.window_v = Some(last(values)?);
    Ok((out, next))
}

impl AttentionCache for DeviceCache {
    fn attend(&mut self, layer: usize, input: &AttentionInput<'_>) -> Result<Vec<f32>> {
        let geometry = self.geometry(layer)?;
        super::check_input(input, geometry.n_kv_heads, geometry.head_dim)?;
        let (t, hd) = (input.n_tokens, geometry.head_dim);
        let tensor = |x: &[f32], heads: usize| {
            Tensor::from_slice(x, (t, heads * hd), &self.device).map_err(tensor_err)
        };
        let (q, k, v) = (
            tensor(input.q, input.n_heads)?,
            tensor(input.k, geometry.n_kv_heads)?,
            tensor(input.v, geometry.n_kv_heads)?,
        );
        let tensors = TensorInput {
            q: &q,
            k: &k,
            v: &v,
            n_heads: input.n_heads,
            rope: input.rope,
            scale: input.scale,
        };
        let out = self.attend_tensors(layer, &tensors)?;
        out.flatten_all()
            .and_then(|o| o.to_vec1::<f32>())
            .map_err(tensor_err)
    }

    fn attend_tensors(&mut self, layer: usize, input: &TensorInput<'_>) -> Result<Tensor> {
        let TensorInput {
            q,
            k,
            v,
            n_heads,
            rope,
            scale,
        } = *input;
        let geometry = self.geometry(layer)?;
        let kv = geometry.n_kv_heads;
        if kv == 0 || !n_heads.is_multiple_of(kv) {
            return Err(AttentionError::Gqa(n_heads, kv));
        }
        let t = q.dim(0).map_err(tensor_err)?;
        let p0 = self.next_position;
        let positions: Vec<u64> = (p0..p0 + t as u64).collect();
        let l = &self.layers[layer];
        let new_sinks = (geometry.n_global as u64).saturating_sub(p0).min(t as u64) as usize;
        let n_sinks = l.stores.sink_k.as_ref().map_or(0, |s| s.dims()[1]) + new_sinks;
        let w = geometry.window as u64;
        // The window's keys are positions `first_key..p0` (what it holds) then the chunk's.
        let first_key = p0 - p0.min(w);
        let n_keys = (p0 - first_key) as usize + t;
        let window_mask = self.mask(t, n_keys, |r, j| {
            let (i, pj) = (positions[r], first_key + j as u64);
            pj <= i && i - pj < w
        })?;
        let sink_mask = self.mask(t, n_sinks, |r, j| positions[r] >= j as u64 + w)?;
        let step = Step {
            q,
            k,
            v,
            n_heads,
            style: rope.style(),
            scale,
            rot: self.angles(rope, &positions)?,
            rot_d: self.angles(rope, &[geometry.distance_limit])?,
            new_sinks,
            sink_mask,
            window_mask,
        };
        let (out, stores) = lambda_step(&l.stores, &geometry, &step).map_err(tensor_err)?;
        self.layers[layer].stores = stores;
        Ok(out)
    }

    fn next_position(&self) -> u64 {
        self.next_position
    }

    fn advance(&mut self, n: usize) {
        self.next_position += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{LambdaParams, reference_lambda_attention};
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    /// Oracle test 1 of shared/ALGORITHM.md for the device cache (on the CPU device): every
    /// chunking, sink count, distance limit, GQA grouping and RoPE style of the grid, with
    /// partial rotary on half the cases.
    #[test]
    fn matches_reference_on_the_oracle_grid() {
        let (l, hd) = (16, 16);
        let mut checked = 0;
        for t in [5, l, 4 + l, 61] {
            for chunk in [1, 7, l + 9] {
                for g in [0, 1, 4, 16] {
                    for d in [None, Some(5)] {
                        for (heads, kv) in [(2, 2), (7, 1)] {
                            let style = [RopeStyle::Neox, RopeStyle::Interleaved][checked % 2];
                            let rot_dims = if checked % 4 < 2 { hd } else { hd / 2 };
                            let mut rng = StdRng::seed_from_u64(checked as u64);
                            let mut random = |n: usize, scale: f32| -> Vec<f32> {
                                (0..n)
                                    .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                                    .collect()
                            };
                            let q = random(t * heads * hd, 1.0);
                            let k = random(t * kv * hd, 3.0);
                            let v = random(t * kv * hd, 1.0);
                            let rope = Rope::new(rot_dims, 10_000.0, style);
                            let params = LambdaParams::new(g, l, d).unwrap();
                            let scale = 1.0 / (hd as f32).sqrt();
                            let expected = reference_lambda_attention(
                                &q, &k, &v, t, heads, kv, hd, params, &rope, scale,
                            );
                            let geometry = LayerGeometry::full(params, kv, hd);
                            let mut cache = DeviceCache::new(vec![geometry], &Device::Cpu);
                            let mut got = Vec::new();
                            for start in (0..t).step_by(chunk) {
                                let n = chunk.min(t - start);
                                let rows = |x: &[f32], h: usize| {
                                    x[start * h * hd..(start + n) * h * hd].to_vec()
                                };
                                let (qs, ks, vs) = (rows(&q, heads), rows(&k, kv), rows(&v, kv));
                                let input = AttentionInput {
                                    q: &qs,
                                    k: &ks,
                                    v: &vs,
                                    n_tokens: n,
                                    n_heads: heads,
                                    rope: &rope,
                                    scale,
                                };
                                got.extend(cache.attend(0, &input).unwrap());
                                cache.advance(n);
                                assert!(cache.slots_in_use(0) <= g.min(start + n) + l);
                            }
                            assert_eq!(cache.slots_in_use(0), g.min(t) + l.min(t));
                            let err = got
                                .iter()
                                .zip(&expected)
                                .map(|(a, b)| (*a as f64 - b).abs())
                                .fold(0.0, f64::max);
                            assert!(
                                err <= 1e-5,
                                "T={t} chunk={chunk} G={g} D={d:?} heads={heads}/{kv} {style:?} rot={rot_dims}: max |Δ| = {err}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 4 * 3 * 4 * 2 * 2);
    }
}
