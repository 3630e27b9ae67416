//! The bounded Λ cache and its fused attention pass (CPU, f32).
//!
//! Per layer: a *global store* holding the first `G` tokens' keys unrotated (they are scored
//! against the query rotated to `D` once they leave the window), and a *ring* of `L` slots holding
//! the window's keys rotated at their true positions. Nothing else is kept, so the slots in use
//! never exceed `G + L` whatever the conversation's length. Storage grows until the ring is full
//! and is never reallocated after that.
//!
//! The attention pass (`kernel.rs`) runs one task per (token, KV group), reading keys and values
//! in place: no K/V copies, no `repeat_kv`.

use rayon::prelude::*;

use super::kernel::{Rows, Segment, attend_group};
use super::{
    AttentionCache, AttentionError, AttentionInput, LambdaParams, LayerGeometry, check_input,
};

/// One layer's bounded store.
#[derive(Debug, Clone)]
pub struct LayerCache {
    geometry: LayerGeometry,
    /// `[slot][kv_head][head_dim]`, unrotated keys of positions `0..global_len`.
    global_k: Vec<f32>,
    global_v: Vec<f32>,
    /// `[slot][kv_head][head_dim]`, rotated keys; slot of position `p` is `p % window`.
    ring_k: Vec<f32>,
    ring_v: Vec<f32>,
    /// Absolute position held by each ring slot.
    ring_pos: Vec<u64>,
    /// Tokens this layer has seen.
    seen: u64,
}

/// What the cache holds, for the status bar and the benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Tokens fed so far.
    pub tokens_seen: u64,
    /// Sinks attended by the next token (in the first full layer).
    pub attended_global: u64,
    /// Window tokens attended by the next token (in the first full layer).
    pub attended_window: u64,
    /// Tokens no longer attended by anything.
    pub evicted: u64,
    /// Cache slots in use, summed over layers.
    pub slots_in_use: u64,
    /// Slots the cache can ever hold, summed over layers.
    pub slot_capacity: u64,
    /// Bytes of K/V storage allocated now.
    pub bytes: u64,
}

impl LayerCache {
    pub fn new(geometry: LayerGeometry) -> Self {
        Self {
            geometry,
            global_k: Vec::new(),
            global_v: Vec::new(),
            ring_k: Vec::new(),
            ring_v: Vec::new(),
            ring_pos: Vec::new(),
            seen: 0,
        }
    }

    fn row(&self) -> usize {
        self.geometry.n_kv_heads * self.geometry.head_dim
    }

    pub fn global_len(&self) -> usize {
        self.global_k.len() / self.row()
    }

    /// Ring slots holding a token (they all hold the window once `seen ≥ window`).
    pub fn ring_len(&self) -> usize {
        self.ring_pos.len()
    }

    /// Slots in use: global store plus ring.
    pub fn slots_in_use(&self) -> usize {
        self.global_len() + self.ring_len()
    }

    /// Allocated bytes of K/V storage (capacity, not length: what the process really holds).
    pub fn bytes(&self) -> usize {
        4 * (self.global_k.capacity()
            + self.global_v.capacity()
            + self.ring_k.capacity()
            + self.ring_v.capacity())
            + 8 * self.ring_pos.capacity()
    }

    /// Positions currently in the ring, oldest first (for tests and the visualizer).
    pub fn ring_positions(&self) -> Vec<u64> {
        let mut p = self.ring_pos.clone();
        p.sort_unstable();
        p
    }

    /// Extends the ring to `slots` slots. Capacity doubles, as a `Vec`'s would, but stops at
    /// exactly `window` slots, so a full ring holds no slack whatever the window size.
    fn grow_ring(&mut self, slots: usize) {
        let row = self.row();
        if slots > self.ring_pos.capacity() {
            let window = self.geometry.window;
            let target = (2 * self.ring_pos.capacity()).clamp(slots, window);
            let extra = target - self.ring_pos.len();
            self.ring_pos.reserve_exact(extra);
            self.ring_k.reserve_exact(extra * row);
            self.ring_v.reserve_exact(extra * row);
        }
        self.ring_pos.resize(slots, u64::MAX);
        self.ring_k.resize(slots * row, 0.0);
        self.ring_v.resize(slots * row, 0.0);
    }

    /// Runs Λ attention for a chunk and stores it. See the module doc for the layout.
    pub fn attend(&mut self, input: &AttentionInput<'_>) -> Result<Vec<f32>, AttentionError> {
        let LayerGeometry {
            n_kv_heads,
            head_dim,
            window,
            n_global,
            distance_limit,
        } = self.geometry;
        check_input(input, n_kv_heads, head_dim)?;
        let n = input.n_tokens;
        if n == 0 {
            return Ok(Vec::new());
        }
        let pos0 = self.seen;
        let row = self.row();

        // 1. Sinks enter the global store unrotated (its storage is sized once, exactly).
        if pos0 < n_global as u64 && self.global_k.capacity() == 0 {
            self.global_k.reserve_exact(n_global * row);
            self.global_v.reserve_exact(n_global * row);
        }
        for t in 0..n {
            let pos = pos0 + t as u64;
            if (pos as usize) < n_global && self.global_len() == pos as usize {
                self.global_k
                    .extend_from_slice(&input.k[t * row..(t + 1) * row]);
                self.global_v
                    .extend_from_slice(&input.v[t * row..(t + 1) * row]);
            }
        }

        // 2. Rotate the chunk's keys and queries at their true positions; queries also at D when
        //    some sink may already be outside the window of some row.
        let mut k_rot = input.k.to_vec();
        input
            .rope
            .rotate_rows(&mut k_rot, n_kv_heads, head_dim, |t| pos0 + t as u64);
        let mut q_loc = input.q.to_vec();
        input
            .rope
            .rotate_rows(&mut q_loc, input.n_heads, head_dim, |t| pos0 + t as u64);
        let last = pos0 + n as u64 - 1;
        let needs_global = self.global_len() > 0 && last >= window as u64;
        let q_glob = if needs_global {
            let mut q = input.q.to_vec();
            input
                .rope
                .rotate_rows(&mut q, input.n_heads, head_dim, |_| distance_limit);
            Some(q)
        } else {
            None
        };

        // 3. One task per (token, KV group): every query head of the group is served by one
        //    read of the keys and values it may see.
        let group = input.n_heads / n_kv_heads;
        let width = group * head_dim;
        let mut out = vec![0f32; n * input.n_heads * head_dim];
        let this = &*self;
        let window = window as u64;
        out.par_chunks_mut(width)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (task, out)| {
                let (t, kv) = (task / n_kv_heads, task % n_kv_heads);
                let i = pos0 + t as u64;
                let q_off = task * width;
                let view = |keys, values, len| Rows {
                    keys,
                    values,
                    stride: row,
                    offset: kv * head_dim,
                    len,
                };
                let sinks = Segment {
                    rows: view(
                        &this.global_k,
                        &this.global_v,
                        if q_glob.is_some() {
                            this.global_len()
                        } else {
                            0
                        },
                    ),
                    queries: q_glob
                        .as_deref()
                        .map_or(&[][..], |q| &q[q_off..q_off + width]),
                    visible: |j: usize| j as u64 + window <= i,
                };
                let queries = &q_loc[q_off..q_off + width];
                let ring = Segment {
                    rows: view(&this.ring_k, &this.ring_v, this.ring_len()),
                    queries,
                    visible: |slot: usize| {
                        let j = this.ring_pos[slot];
                        j <= i && i - j < window
                    },
                };
                let chunk = Segment {
                    rows: view(&k_rot, input.v, n),
                    queries,
                    visible: |u: usize| u <= t && ((t - u) as u64) < window,
                };
                attend_group(
                    [&sinks, &ring, &chunk],
                    group,
                    head_dim,
                    input.scale,
                    out,
                    scratch,
                );
            });
        let window = window as usize;

        // 4. The chunk's last `window` tokens enter the ring, evicting what left the window.
        let first = n.saturating_sub(window);
        for t in first..n {
            let pos = pos0 + t as u64;
            let slot = (pos % window as u64) as usize;
            if slot >= self.ring_pos.len() {
                self.grow_ring((slot + 1).min(window));
            }
            self.ring_pos[slot] = pos;
            self.ring_k[slot * row..(slot + 1) * row]
                .copy_from_slice(&k_rot[t * row..(t + 1) * row]);
            self.ring_v[slot * row..(slot + 1) * row]
                .copy_from_slice(&input.v[t * row..(t + 1) * row]);
        }
        self.seen += n as u64;
        Ok(out)
    }
}

/// The bounded Λ cache of a whole model: one [`LayerCache`] per layer.
#[derive(Debug, Clone)]
pub struct LambdaCache {
    layers: Vec<LayerCache>,
    params: LambdaParams,
    next_position: u64,
}

impl LambdaCache {
    pub fn new(params: LambdaParams, layers: Vec<LayerGeometry>) -> Self {
        Self {
            layers: layers.into_iter().map(LayerCache::new).collect(),
            params,
            next_position: 0,
        }
    }

    /// Counts for the status bar: attended/evicted as seen by the next query of a full layer.
    pub fn stats(&self) -> CacheStats {
        let seen = self.next_position;
        let reference = self
            .layers
            .iter()
            .find(|l| l.geometry.window == self.params.n_local)
            .or(self.layers.first());
        let (g, w) = match reference {
            Some(l) => {
                let window = l.geometry.window as u64;
                let next = seen + 1;
                let in_window = next.min(window);
                let first_window = next - in_window;
                let sinks = (l.geometry.n_global as u64).min(first_window);
                (sinks, in_window.saturating_sub(1))
            }
            None => (0, 0),
        };
        CacheStats {
            tokens_seen: seen,
            attended_global: g,
            attended_window: w,
            evicted: seen - g - w,
            slots_in_use: self.layers.iter().map(|l| l.slots_in_use() as u64).sum(),
            slot_capacity: self
                .layers
                .iter()
                .map(|l| (l.geometry.n_global + l.geometry.window) as u64)
                .sum(),
            bytes: self.layers.iter().map(|l| l.bytes() as u64).sum(),
        }
    }
}

impl AttentionCache for LambdaCache {
    fn attend(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
    ) -> Result<Vec<f32>, AttentionError> {
        let n_layers = self.layers.len();
        self.layers
            .get_mut(layer)
            .ok_or(AttentionError::NoSuchLayer(layer, n_layers))?
            .attend(input)
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
    use crate::attention::{Rope, RopeStyle, reference_lambda_attention};
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    struct Case {
        t: usize,
        chunk: usize,
        g: usize,
        l: usize,
        d: Option<u64>,
        heads: usize,
        kv: usize,
    }

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn run(case: &Case, style: RopeStyle) -> f64 {
        let hd = 16;
        let mut rng = StdRng::seed_from_u64(
            (case.t * 31 + case.chunk * 7 + case.g * 3 + case.l + case.kv) as u64,
        );
        let q = random(&mut rng, case.t * case.heads * hd);
        // Large keys make softmax peaky, so a wrong mask shows up as a large error.
        let k: Vec<f32> = random(&mut rng, case.t * case.kv * hd)
            .iter()
            .map(|x| x * 3.0)
            .collect();
        let v = random(&mut rng, case.t * case.kv * hd);
        let rope = Rope::new(hd, 10_000.0, style);
        let params = LambdaParams::new(case.g, case.l, case.d).unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        let expected = reference_lambda_attention(
            &q, &k, &v, case.t, case.heads, case.kv, hd, params, &rope, scale,
        );
        let mut cache = LayerCache::new(LayerGeometry::full(params, case.kv, hd));
        let mut got = Vec::new();
        let mut start = 0;
        while start < case.t {
            let n = case.chunk.min(case.t - start);
            let qs = &q[start * case.heads * hd..(start + n) * case.heads * hd];
            let ks = &k[start * case.kv * hd..(start + n) * case.kv * hd];
            let vs = &v[start * case.kv * hd..(start + n) * case.kv * hd];
            let input = AttentionInput {
                q: qs,
                k: ks,
                v: vs,
                n_tokens: n,
                n_heads: case.heads,
                rope: &rope,
                scale,
            };
            got.extend(cache.attend(&input).unwrap());
            assert!(cache.slots_in_use() <= case.g.min(start + n) + case.l);
            start += n;
        }
        assert_eq!(
            cache.slots_in_use(),
            case.g.min(case.t) + case.l.min(case.t)
        );
        got.iter()
            .zip(&expected)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    /// Oracle test 1 of shared/ALGORITHM.md.
    #[test]
    fn matches_reference_on_the_oracle_grid() {
        let l = 16;
        let mut checked = 0;
        for t in [5, l, 4 + l, 100, 61] {
            for chunk in [1, 7, l, l + 9] {
                for g in [0, 1, 4, 16] {
                    for d in [None, Some(5)] {
                        for (heads, kv) in [(2, 2), (7, 1)] {
                            let case = Case {
                                t,
                                chunk,
                                g,
                                l,
                                d,
                                heads,
                                kv,
                            };
                            let style = if checked % 2 == 0 {
                                RopeStyle::Neox
                            } else {
                                RopeStyle::Interleaved
                            };
                            let err = run(&case, style);
                            assert!(
                                err <= 1e-5,
                                "T={t} chunk={chunk} G={g} L={l} D={d:?} heads={heads}/{kv}: max |Δ| = {err}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 5 * 4 * 4 * 2 * 2);
    }

    #[test]
    fn large_global_count_and_long_sequence() {
        // G = 100 as in the spec, with a window of 128 and a sequence far longer.
        let case = Case {
            t: 600,
            chunk: 37,
            g: 100,
            l: 128,
            d: None,
            heads: 4,
            kv: 2,
        };
        let err = run(&case, RopeStyle::Neox);
        assert!(err <= 1e-5, "max |Δ| = {err}");
    }

    /// Oracle test 3: the cache holds exactly min(T, G + L) entries and stops allocating.
    #[test]
    fn bounded_after_100k_tokens_without_reallocation() {
        let params = LambdaParams::new(4, 64, None).unwrap();
        let (hd, kv) = (8, 1);
        let mut cache = LayerCache::new(LayerGeometry::full(params, kv, hd));
        let rope = Rope::new(hd, 10_000.0, RopeStyle::Neox);
        let mut rng = StdRng::seed_from_u64(7);
        let mut bytes_when_full = None;
        let mut ring_ptr = None;
        for t in 0..100_000u64 {
            let x = random(&mut rng, hd);
            let input = AttentionInput {
                q: &x,
                k: &x,
                v: &x,
                n_tokens: 1,
                n_heads: 1,
                rope: &rope,
                scale: 1.0,
            };
            let out = cache.attend(&input).unwrap();
            assert!(out.iter().all(|o| o.is_finite()));
            let expected = (t + 1).min(4) + (t + 1).min(64);
            assert_eq!(cache.slots_in_use() as u64, expected);
            if t + 1 == 68 {
                // Exactly G + L slots of K and V (f32) and L positions: no slack.
                assert_eq!(cache.bytes(), (4 + 64) * 2 * hd * 4 + 64 * 8);
                bytes_when_full = Some(cache.bytes());
                ring_ptr = Some(cache.ring_k.as_ptr());
            }
            if t >= 68 {
                assert_eq!(Some(cache.bytes()), bytes_when_full);
                assert_eq!(Some(cache.ring_k.as_ptr()), ring_ptr);
            }
        }
        let positions = cache.ring_positions();
        assert_eq!(positions.first(), Some(&(100_000 - 64)));
        assert_eq!(positions.last(), Some(&99_999));
    }

    #[test]
    fn stats_split_attended_and_evicted() {
        let params = LambdaParams::new(2, 4, None).unwrap();
        let mut cache = LambdaCache::new(params, vec![LayerGeometry::full(params, 1, 2)]);
        let rope = Rope::new(2, 10_000.0, RopeStyle::Neox);
        for _ in 0..10 {
            let x = [0.5f32, -0.5];
            let input = AttentionInput {
                q: &x,
                k: &x,
                v: &x,
                n_tokens: 1,
                n_heads: 1,
                rope: &rope,
                scale: 1.0,
            };
            cache.attend(0, &input).unwrap();
            cache.advance(1);
        }
        let s = cache.stats();
        // The 11th token sees tokens 7..=9 in its window (plus itself) and the 2 sinks.
        assert_eq!(s.tokens_seen, 10);
        assert_eq!(s.attended_window, 3);
        assert_eq!(s.attended_global, 2);
        assert_eq!(s.evicted, 5);
        assert_eq!(s.slots_in_use, 6);
        assert_eq!(s.slot_capacity, 6);
    }

    #[test]
    fn rejects_bad_shapes() {
        let params = LambdaParams::new(0, 4, None).unwrap();
        let mut cache = LayerCache::new(LayerGeometry::full(params, 2, 4));
        let rope = Rope::new(4, 10_000.0, RopeStyle::Neox);
        let x = [0f32; 8];
        let input = AttentionInput {
            q: &x[..4],
            k: &x,
            v: &x,
            n_tokens: 1,
            n_heads: 3,
            rope: &rope,
            scale: 1.0,
        };
        assert!(matches!(
            cache.attend(&input),
            Err(AttentionError::Shape { what: "q", .. })
        ));
    }
}
