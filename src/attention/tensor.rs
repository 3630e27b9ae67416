//! The Λ cache in candle tensors, on whatever device the model runs: the path a GPU takes.
//!
//! [`HostCache`] is the CPU's: host memory, a ring written in place, a hand-written kernel.
//! This one keeps each layer's keys and values as device tensors and does the rule with tensor
//! operations — rotation, two score blocks (the window at true distances, the global store at
//! distance D), one softmax over both, one weighted sum — so nothing crosses to the host during a
//! forward but the rotation tables and masks it uploads (positions are host data). It follows
//! docs/ALGORITHM.md exactly, pinned tokens (the set P) included, and is tested against the
//! oracle on the CPU device.
//!
//! Snapshots go through the host cache ([`TensorCache::to_host`], [`TensorCache::from_host`]):
//! one file format, and a conversation saved on a GPU resumes on a CPU.

use std::collections::HashSet;
use std::ops::Range;

use candle_core::{D, DType, Device, Tensor};

use super::host::{
    CacheStats, HostCache, Occupancy, add_range, evicted_in, is_pinned, merge_shares, remove_range,
};
use super::kv_store::KvVec;
use super::{
    AttentionCache, AttentionError, AttentionInput, LambdaParams, LayerGeometry, Rope, RopeStyle,
    TensorInput, window_start,
};

fn tensor_err(e: candle_core::Error) -> AttentionError {
    AttentionError::Tensor(crate::error::candle_msg(&e))
}

type Result<T> = std::result::Result<T, AttentionError>;

/// One layer. Its window holds the last `min(tokens seen, window)` positions, in order, so the
/// window's positions need not be stored.
#[derive(Clone)]
struct DeviceLayer {
    geometry: LayerGeometry,
    stores: Stores,
    /// Pins changed: pinned tokens still in the window are copied, unrotated, into the global
    /// store at the next attend, which has the layer's rotary embedding at hand.
    copy_pins: bool,
    /// `(position, probability)` of the last single-token pass, averaged over heads (probing).
    last_attention: Vec<(u64, f32)>,
}

#[derive(Clone)]
pub struct TensorCache {
    layers: Vec<DeviceLayer>,
    device: Device,
    params: LambdaParams,
    next_position: u64,
    /// Positions kept like sinks (docs/ALGORITHM.md §5, the set P), sorted, disjoint.
    pinned: Vec<Range<u64>>,
    probe: bool,
    /// Rotation tables and masks of the forward under way, shared by the layers that ask for
    /// the same ones (usually all): one upload per forward, not one per layer.
    tables: Vec<(TableKey, Tables)>,
    /// Pin changes, which the global stores' lengths do not show: see `globals_version`.
    globals_changes: u64,
}

/// What a forward's tables depend on.
#[derive(Clone)]
struct TableKey {
    p0: u64,
    tokens: usize,
    inv_freq: Vec<f64>,
    style: RopeStyle,
    window: usize,
    distance_limit: u64,
    global_pos: Vec<u64>,
}

impl TableKey {
    /// Whether these tables serve a layer with `rope`, `geometry` and global store `global_pos`
    /// in the same forward (checked without building a key: this runs for every layer).
    fn is_for(&self, rope: &Rope, geometry: &LayerGeometry, global_pos: &[u64]) -> bool {
        self.inv_freq == rope.inv_freq()
            && self.style == rope.style()
            && self.window == geometry.window
            && self.distance_limit == geometry.distance_limit
            && self.global_pos == global_pos
    }
}

/// A forward's uploads for one [`TableKey`]; see [`Step`].
#[derive(Clone)]
struct Tables {
    rot: (Tensor, Tensor),
    rot_d: (Tensor, Tensor),
    global_mask: Option<Tensor>,
    window_mask: Option<Tensor>,
}

impl TensorCache {
    pub fn new(params: LambdaParams, layers: Vec<LayerGeometry>, device: &Device) -> Self {
        Self {
            layers: layers
                .into_iter()
                .map(|geometry| DeviceLayer {
                    geometry,
                    stores: Stores::default(),
                    copy_pins: false,
                    last_attention: Vec::new(),
                })
                .collect(),
            device: device.clone(),
            params,
            next_position: 0,
            pinned: Vec::new(),
            probe: false,
            tables: Vec::new(),
            globals_changes: 0,
        }
    }

    /// A counter that changes whenever a global store or the pins change (see
    /// [`HostCache::globals_version`]).
    pub fn globals_version(&self) -> u64 {
        let lengths: u64 = self
            .layers
            .iter()
            .map(|l| l.stores.global_pos.len() as u64)
            .sum();
        lengths + self.globals_changes
    }

    /// Makes [`Self::globals_version`] larger than `version` (after a rewind put the global
    /// stores back).
    pub fn advance_globals_version_past(&mut self, version: u64) {
        self.globals_changes += version + 1 - self.globals_version().min(version + 1);
    }

    /// Floats of one token's keys and values over every layer (see
    /// [`HostCache::slot_floats`]).
    pub fn slot_floats(&self) -> usize {
        self.layers
            .iter()
            .map(|l| 2 * l.geometry.n_kv_heads * l.geometry.head_dim)
            .sum()
    }

    pub fn params(&self) -> LambdaParams {
        self.params
    }

    /// Entries held by `layer` (global store + window).
    pub fn slots_in_use(&self, layer: usize) -> usize {
        let s = &self.layers[layer].stores;
        s.global_pos.len() + s.window_len()
    }

    fn geometry(&self, layer: usize) -> Result<LayerGeometry> {
        self.layers
            .get(layer)
            .map(|l| l.geometry)
            .ok_or(AttentionError::NoSuchLayer(layer, self.layers.len()))
    }

    /// The layer whose window is the conversation's `L` (the first full-attention layer).
    fn reference_layer(&self) -> Option<&DeviceLayer> {
        self.layers
            .iter()
            .find(|l| l.geometry.pinnable)
            .or(self.layers.first())
    }

    /// First position a `window`-token window holds before a chunk starting at `p0`.
    fn first_key(p0: u64, window: usize) -> u64 {
        p0 - p0.min(window as u64)
    }

    /// Whether the next token attends to position `pos` (in the reference layer).
    pub fn holds(&self, pos: u64) -> bool {
        pos < self.next_position
            && self.reference_layer().is_some_and(|l| {
                pos >= window_start(self.next_position, l.geometry.window as u64)
                    || l.stores.global_pos.contains(&pos)
            })
    }

    /// Pins `range`: its tokens stay attended, like sinks, until unpinned. Returns how many were
    /// already evicted and cannot come back.
    pub fn pin(&mut self, range: Range<u64>) -> u64 {
        let lost = match self.reference_layer() {
            Some(l) => evicted_in(
                range.clone(),
                self.next_position,
                window_start(self.next_position, l.geometry.window as u64),
                &l.stores.global_pos,
                |p| self.holds(p),
            ),
            // No layer holds anything: every position already fed is lost.
            None => range
                .end
                .min(self.next_position)
                .saturating_sub(range.start),
        };
        let before = self.globals_version();
        add_range(&mut self.pinned, range);
        self.schedule_pin_copies();
        self.advance_globals_version_past(before);
        lost
    }

    /// Stops pinning `range`; its tokens outside the window are evicted at once.
    pub fn unpin(&mut self, range: Range<u64>) -> Result<()> {
        let before = self.globals_version();
        remove_range(&mut self.pinned, range);
        self.drop_unpinned()?;
        self.schedule_pin_copies();
        self.advance_globals_version_past(before);
        Ok(())
    }

    pub fn pinned(&self) -> &[Range<u64>] {
        &self.pinned
    }

    /// Newly pinned tokens still in the window are copied into the global store at the next
    /// attend of each layer.
    fn schedule_pin_copies(&mut self) {
        for l in self.layers.iter_mut().filter(|l| l.geometry.pinnable) {
            l.copy_pins = true;
        }
    }

    /// Drops unpinned tokens from the global stores (the sinks stay).
    fn drop_unpinned(&mut self) -> Result<()> {
        for l in self.layers.iter_mut().filter(|l| l.geometry.pinnable) {
            let n_global = l.geometry.n_global as u64;
            let s = &mut l.stores;
            let keep: Vec<u32> = (0..s.global_pos.len() as u32)
                .filter(|&j| {
                    let p = s.global_pos[j as usize];
                    p < n_global || is_pinned(&self.pinned, p)
                })
                .collect();
            if keep.len() == s.global_pos.len() {
                continue;
            }
            let idx = Tensor::new(keep.as_slice(), &self.device).map_err(tensor_err)?;
            let pick = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
                t.as_ref()
                    .map(|t| t.index_select(&idx, 1).map_err(tensor_err))
                    .transpose()
            };
            s.global_k = pick(&s.global_k)?;
            s.global_v = pick(&s.global_v)?;
            s.global_pos = keep.iter().map(|&j| s.global_pos[j as usize]).collect();
        }
        Ok(())
    }

    /// Copies pinned tokens of `layer`'s window into its global store, unrotated.
    fn copy_window_pins(&mut self, layer: usize, rope: &Rope) -> Result<()> {
        let p0 = self.next_position;
        let l = &self.layers[layer];
        let first_key = Self::first_key(p0, l.geometry.window);
        let held: HashSet<u64> = l.stores.global_pos.iter().copied().collect();
        let n_global = l.geometry.n_global as u64;
        let positions: Vec<u64> = (first_key..p0)
            .filter(|&p| p >= n_global && is_pinned(&self.pinned, p) && !held.contains(&p))
            .collect();
        let stores = match (&l.stores.window_k, &l.stores.window_v) {
            (Some(wk), Some(wv)) if !positions.is_empty() => {
                let rows: Vec<u32> = positions.iter().map(|p| (p - first_key) as u32).collect();
                let idx = Tensor::new(rows.as_slice(), &self.device).map_err(tensor_err)?;
                let (cos, sin) = self.angles(rope, &positions)?;
                let unrotate = || -> candle_core::Result<(Tensor, Tensor)> {
                    let k = wk.index_select(&idx, 1)?.transpose(0, 1)?.contiguous()?;
                    let k = rotate(&k, &cos, &sin.neg()?, rope.style())?
                        .transpose(0, 1)?
                        .contiguous()?;
                    Ok((k, wv.index_select(&idx, 1)?))
                };
                let (k, v) = unrotate().map_err(tensor_err)?;
                let mut s = l.stores.clone();
                s.global_k = Some(append(&s.global_k, &k).map_err(tensor_err)?);
                s.global_v = Some(append(&s.global_v, &v).map_err(tensor_err)?);
                s.global_pos.extend(&positions);
                Some(s)
            }
            _ => None,
        };
        let l = &mut self.layers[layer];
        if let Some(s) = stores {
            l.stores = s;
        }
        l.copy_pins = false;
        Ok(())
    }

    /// Makes single-token passes record which positions got how much attention (one download
    /// of the attention row per layer: the inspect view's price, paid only while it is open).
    pub fn set_probe(&mut self, on: bool) {
        self.probe = on;
        if !on {
            self.layers
                .iter_mut()
                .for_each(|l| l.last_attention = Vec::new());
        }
    }

    /// See [`HostCache::attention_shares`].
    pub fn attention_shares(&self) -> Vec<(u64, f32)> {
        merge_shares(
            self.layers.iter().map(|l| l.last_attention.as_slice()),
            self.layers.len(),
        )
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats::measure(Occupancy {
            seen: self.next_position,
            reference: self
                .reference_layer()
                .map(|l| (&l.geometry, l.stores.global_pos.as_slice())),
            slots_in_use: (0..self.layers.len())
                .map(|i| self.slots_in_use(i) as u64)
                .sum(),
            slot_capacity: self
                .layers
                .iter()
                .map(|l| (l.geometry.n_global + l.geometry.window) as u64)
                .sum(),
            bytes: self.layers.iter().map(|l| l.stores.bytes()).sum(),
        })
    }

    /// The same cache in host memory (for a snapshot, or to go on on a CPU).
    pub fn to_host(&self) -> Result<HostCache> {
        let geometries = self.layers.iter().map(|l| l.geometry).collect();
        let mut cache = HostCache::new(self.params, geometries);
        cache.next_position = self.next_position;
        cache.pinned = self.pinned.clone();
        let rows = |t: &Option<Tensor>| -> Result<Vec<f32>> {
            t.as_ref().map_or(Ok(Vec::new()), |t| {
                t.transpose(0, 1)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(tensor_err)
            })
        };
        for (host, l) in cache.layers.iter_mut().zip(&self.layers) {
            let g = &l.geometry;
            let row = g.n_kv_heads * g.head_dim;
            host.global_k = KvVec::F32(rows(&l.stores.global_k)?);
            host.global_v = KvVec::F32(rows(&l.stores.global_v)?);
            host.global_pos = l.stores.global_pos.clone();
            // Window row r is position first_key + r; the ring keeps it in slot p % window.
            let (k, v) = (rows(&l.stores.window_k)?, rows(&l.stores.window_v)?);
            let n = l.stores.window_len();
            let first_key = Self::first_key(self.next_position, g.window);
            host.ring_pos = vec![u64::MAX; n];
            host.ring_k = KvVec::F32(vec![0.0; n * row]);
            host.ring_v = KvVec::F32(vec![0.0; n * row]);
            for r in 0..n {
                let pos = first_key + r as u64;
                let slot = (pos % g.window as u64) as usize;
                host.ring_pos[slot] = pos;
                host.ring_k.write(slot * row, &k[r * row..(r + 1) * row]);
                host.ring_v.write(slot * row, &v[r * row..(r + 1) * row]);
            }
            host.seen = self.next_position;
            host.probe = self.probe;
            if g.pinnable {
                host.pinned = self.pinned.clone();
                host.pins_to_copy = l.copy_pins;
            }
        }
        Ok(cache)
    }

    /// A host cache moved onto `device`.
    pub fn from_host(cache: &HostCache, device: &Device) -> Result<Self> {
        let geometries = cache.layers.iter().map(|l| l.geometry).collect();
        let mut out = Self::new(cache.params, geometries, device);
        out.next_position = cache.next_position;
        out.pinned = cache.pinned.clone();
        out.probe = cache.layers.iter().any(|l| l.probe);
        for (l, host) in out.layers.iter_mut().zip(&cache.layers) {
            let g = host.geometry;
            let upload = |data: Vec<f32>, n: usize| -> Result<Option<Tensor>> {
                if n == 0 {
                    return Ok(None);
                }
                Tensor::from_vec(data, (n, g.n_kv_heads, g.head_dim), device)
                    .and_then(|t| t.transpose(0, 1)?.contiguous())
                    .map(Some)
                    .map_err(tensor_err)
            };
            let row = g.n_kv_heads * g.head_dim;
            let mut slots: Vec<(u64, usize)> = (host.ring_pos.iter().copied().enumerate())
                .filter(|(_, p)| *p != u64::MAX)
                .map(|(s, p)| (p, s))
                .collect();
            slots.sort_unstable();
            let first_key = Self::first_key(cache.next_position, g.window);
            let in_order = slots
                .iter()
                .enumerate()
                .all(|(r, (p, _))| *p == first_key + r as u64);
            if !in_order || first_key + slots.len() as u64 != cache.next_position {
                return Err(AttentionError::Tensor(format!(
                    "the host cache's window does not hold the last {} positions",
                    g.window
                )));
            }
            let gather = |ring: &KvVec| -> Vec<f32> {
                slots
                    .iter()
                    .flat_map(|(_, s)| ring.to_f32(s * row..(s + 1) * row))
                    .collect()
            };
            let n_global = host.global_pos.len();
            let all = |v: &KvVec| v.to_f32(0..v.len());
            l.stores = Stores {
                global_k: upload(all(&host.global_k), n_global)?,
                global_v: upload(all(&host.global_v), n_global)?,
                global_pos: host.global_pos.clone(),
                window_k: upload(gather(&host.ring_k), slots.len())?,
                window_v: upload(gather(&host.ring_v), slots.len())?,
            };
            l.copy_pins = host.pins_to_copy;
        }
        Ok(out)
    }

    /// Rotations and masks of a chunk of `key.tokens` tokens from `key.p0`.
    fn tables_for(&self, key: &TableKey, rope: &Rope) -> Result<Tables> {
        let (p0, t, w) = (key.p0, key.tokens, key.window as u64);
        let positions: Vec<u64> = (p0..p0 + t as u64).collect();
        // The window's keys are positions `first_key..p0` (what it holds) then the chunk's.
        let first_key = Self::first_key(p0, key.window);
        let n_keys = (p0 - first_key) as usize + t;
        let global_pos = &key.global_pos;
        Ok(Tables {
            rot: self.angles(rope, &positions)?,
            rot_d: self.angles(rope, &[key.distance_limit])?,
            window_mask: self.mask(t, n_keys, |r, j| {
                let (i, pj) = (positions[r], first_key + j as u64);
                pj <= i && i - pj < w
            })?,
            global_mask: self.mask(t, global_pos.len(), |r, j| {
                positions[r] >= global_pos[j] + w
            })?,
        })
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

    /// A `[rows, 1, cols]` additive mask: 0 where `allowed(row, col)`, −∞ elsewhere; `None`
    /// when everything is allowed (a decode step's window) or there is nothing to mask.
    fn mask(
        &self,
        rows: usize,
        cols: usize,
        allowed: impl Fn(usize, usize) -> bool,
    ) -> Result<Option<Tensor>> {
        let m: Vec<f32> = (0..rows * cols)
            .map(|i| {
                if allowed(i / cols, i % cols) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        if m.iter().all(|x| *x == 0.0) {
            return Ok(None);
        }
        Tensor::from_vec(m, (rows, 1, cols), &self.device)
            .map(Some)
            .map_err(tensor_err)
    }
}

/// Rotates `x` `[rows, heads, head_dim]` by per-row `cos`/`sin` `[rows, 1, half]`, or by one
/// shared row `[1, 1, half]`; dims past `2 · half` (partial rotary) are left as they are. One
/// fused candle kernel per call (`rope` / `rope_i`), not a dozen elementwise ones.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> candle_core::Result<Tensor> {
    let (rows, heads, hd) = x.dims3()?;
    let half = cos.dim(D::Minus1)?;
    let rot = x.narrow(2, 0, 2 * half)?.contiguous()?;
    // The kernels take [batch, heads, tokens, dim] with tables [batch, tokens, half] or
    // [tokens, half]: a row per batch, or one row for everything.
    let (xs, cos, sin) = if cos.dim(0)? == rows {
        (
            rot.reshape((rows, heads, 1, 2 * half))?,
            cos.clone(),
            sin.clone(),
        )
    } else {
        (
            rot.reshape((1, rows * heads, 1, 2 * half))?,
            cos.reshape((1, half))?,
            sin.reshape((1, half))?,
        )
    };
    let turned = match style {
        RopeStyle::Neox => candle_nn::rotary_emb::rope(&xs, &cos, &sin)?,
        RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&xs, &cos, &sin)?,
    }
    .reshape((rows, heads, 2 * half))?;
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

/// What one layer holds, `[kv_heads, n, head_dim]`: the global store (sinks and pinned tokens,
/// unrotated, with their positions) and the window (rotated, in position order). Tensors are
/// never written in place, so a clone is a cheap, independent copy.
#[derive(Clone, Default)]
struct Stores {
    global_k: Option<Tensor>,
    global_v: Option<Tensor>,
    global_pos: Vec<u64>,
    window_k: Option<Tensor>,
    window_v: Option<Tensor>,
}

impl Stores {
    fn window_len(&self) -> usize {
        self.window_k.as_ref().map_or(0, |t| t.dims()[1])
    }

    fn bytes(&self) -> u64 {
        let size = |t: &Option<Tensor>| {
            t.as_ref()
                .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
        };
        (size(&self.global_k)
            + size(&self.global_v)
            + size(&self.window_k)
            + size(&self.window_v)
            + 8 * self.global_pos.len()) as u64
    }
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
    /// Rows of the chunk that join the global store (sinks and pinned tokens).
    joining: Option<Tensor>,
    /// Additive masks `[tokens, 1, keys]` of the global and the window blocks (one row per
    /// token, shared by the heads of a group); `None` where every key is visible.
    global_mask: Option<Tensor>,
    window_mask: Option<Tensor>,
    /// Return the attention row averaged over heads (single-token passes, probing).
    probe: bool,
}

/// What [`lambda_step`] returns: the output `[tokens, heads · head_dim]`, the stores after the
/// chunk (added, window trimmed), and the probe's row (global keys, then window keys).
type StepOutput = (Tensor, Stores, Option<Tensor>);

/// The Λ rule for one chunk.
fn lambda_step(
    stores: &Stores,
    geometry: &LayerGeometry,
    step: &Step<'_>,
) -> candle_core::Result<StepOutput> {
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
    let k_rot = rotate(&k, &step.rot.0, &step.rot.1, step.style)?
        .transpose(0, 1)?
        .contiguous()?;
    let mut next = stores.clone();
    // The chunk's sinks and pinned tokens join the global store (unrotated) before anyone
    // attends: the masks decide who sees them.
    if let Some(rows) = &step.joining {
        let ks = k.index_select(rows, 0)?.transpose(0, 1)?.contiguous()?;
        next.global_k = Some(append(&stores.global_k, &ks)?);
        next.global_v = Some(append(&stores.global_v, &v.index_select(rows, 1)?)?);
    }
    let keys = append(&stores.window_k, &k_rot)?;
    let values = append(&stores.window_v, &v)?;
    let scores = |q: &Tensor, k: &Tensor, mask: &Option<Tensor>| {
        // The transposed keys go to the matmul as a strided view: no copy of the window.
        let s = (q.matmul(&k.transpose(1, 2)?)? * step.scale as f64)?;
        match mask {
            Some(mask) => {
                let keys = s.dim(2)?;
                s.reshape((kv, t, group, keys))?
                    .broadcast_add(mask)?
                    .reshape((kv, t * group, keys))
            }
            None => Ok(s),
        }
    };
    let window_scores = scores(&q_local, &keys, &step.window_mask)?;
    let (out, p) = match (&next.global_k, &next.global_v) {
        (Some(gk), Some(gv)) => {
            let q_global = grouped(rotate(&q, &step.rot_d.0, &step.rot_d.1, step.style)?)?;
            let n_global = gk.dim(1)?;
            let all = Tensor::cat(
                &[scores(&q_global, gk, &step.global_mask)?, window_scores],
                2,
            )?;
            let p = candle_nn::ops::softmax_last_dim(&all)?;
            let n_window = p.dim(2)? - n_global;
            let out = (p.narrow(2, 0, n_global)?.contiguous()?.matmul(gv)?
                + p.narrow(2, n_global, n_window)?
                    .contiguous()?
                    .matmul(&values)?)?;
            (out, p)
        }
        _ => {
            let p = candle_nn::ops::softmax_last_dim(&window_scores)?;
            (p.matmul(&values)?, p)
        }
    };
    let probe = if step.probe {
        let n_keys = p.dim(2)?;
        Some(p.reshape((kv * t * group, n_keys))?.mean(0)?)
    } else {
        None
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
    Ok((out, next, probe))
}

impl AttentionCache for TensorCache {
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
        let t = q.dim(0).map_err(tensor_err)?;
        super::check_position(self.next_position, t)?;
        let geometry = self.geometry(layer)?;
        let kv = geometry.n_kv_heads;
        if kv == 0 || !n_heads.is_multiple_of(kv) {
            return Err(AttentionError::Gqa(n_heads, kv));
        }
        if self.layers[layer].copy_pins {
            self.copy_window_pins(layer, rope)?;
        }
        let p0 = self.next_position;
        let pins: &[Range<u64>] = if geometry.pinnable { &self.pinned } else { &[] };
        let joining: Vec<u32> = (0..t as u32)
            .filter(|&r| {
                let p = p0 + r as u64;
                p < geometry.n_global as u64 || is_pinned(pins, p)
            })
            .collect();
        let mut global_pos = self.layers[layer].stores.global_pos.clone();
        global_pos.extend(joining.iter().map(|&r| p0 + r as u64));
        let first_key = Self::first_key(p0, geometry.window);
        self.tables.retain(|(k, _)| k.p0 == p0 && k.tokens == t);
        let hit = self
            .tables
            .iter()
            .find(|(k, _)| k.is_for(rope, &geometry, &global_pos))
            .map(|(_, tables)| tables.clone());
        let tables = match hit {
            Some(tables) => tables,
            None => {
                let key = TableKey {
                    p0,
                    tokens: t,
                    inv_freq: rope.inv_freq().to_vec(),
                    style: rope.style(),
                    window: geometry.window,
                    distance_limit: geometry.distance_limit,
                    global_pos: global_pos.clone(),
                };
                let tables = self.tables_for(&key, rope)?;
                self.tables.push((key, tables.clone()));
                tables
            }
        };
        let joining = match joining.len() {
            0 => None,
            _ => Some(Tensor::new(joining.as_slice(), &self.device).map_err(tensor_err)?),
        };
        let step = Step {
            q,
            k,
            v,
            n_heads,
            style: rope.style(),
            scale,
            rot: tables.rot,
            rot_d: tables.rot_d,
            joining,
            global_mask: tables.global_mask,
            window_mask: tables.window_mask,
            probe: self.probe && t == 1,
        };
        let l = &self.layers[layer];
        let (out, mut stores, probe) =
            lambda_step(&l.stores, &geometry, &step).map_err(tensor_err)?;
        let l = &mut self.layers[layer];
        if let Some(p) = probe {
            let p = p.to_vec1::<f32>().map_err(tensor_err)?;
            let window = first_key..p0 + 1;
            l.last_attention = global_pos
                .iter()
                .copied()
                .chain(window)
                .zip(p)
                .filter(|(_, p)| *p > 0.0)
                .collect();
        }
        stores.global_pos = global_pos;
        l.stores = stores;
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
    use crate::device::test_device;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    /// Oracle test 1 of docs/ALGORITHM.md (§4) for the tensor cache (on the test device): every
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
                            let mut cache =
                                TensorCache::new(params, vec![geometry], &test_device());
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
