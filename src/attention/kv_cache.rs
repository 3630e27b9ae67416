//! The Λ cache of one conversation, wherever the model runs: one face for the session over the
//! two implementations of the rule.
//!
//! On a CPU the host cache ([`HostCache`]) is the fast path: a ring written in place and a
//! fused kernel. On a GPU the tensor cache ([`TensorCache`]) keeps keys, values and the attention
//! itself on the device, so a decode step sends nothing back but the sampled id. Both follow
//! docs/ALGORITHM.md, pins and probe included, and share one snapshot format.

use std::ops::Range;

use candle_core::{Device, Tensor};

use super::recall::{Recall, RecallStats};
use super::{
    AttentionCache, AttentionError, AttentionInput, CacheStats, HostCache, KvType, LambdaParams,
    LayerGeometry, RewindPoint, SlotState, SnapshotError, TensorCache, TensorInput,
};

#[derive(Clone)]
pub enum KvCache {
    Host(HostCache),
    Tensor(TensorCache),
}

impl KvCache {
    /// The cache that suits `device`: the host cache on a CPU, the tensor cache elsewhere.
    pub fn new(params: LambdaParams, layers: Vec<LayerGeometry>, device: &Device) -> Self {
        if device.is_cpu() {
            Self::Host(HostCache::new(params, layers))
        } else {
            Self::Tensor(TensorCache::new(params, layers, device))
        }
    }

    /// Rebuilds a cache saved by [`Self::to_snapshot`] (from either kind) for `device`.
    pub fn from_snapshot(
        bytes: &[u8],
        params: LambdaParams,
        layers: Vec<LayerGeometry>,
        device: &Device,
    ) -> Result<Self, SnapshotError> {
        Self::on(HostCache::from_snapshot(bytes, params, layers)?, device)
    }

    /// `host` as the cache that suits `device`.
    fn on(host: HostCache, device: &Device) -> Result<Self, SnapshotError> {
        if device.is_cpu() {
            Ok(Self::Host(host))
        } else {
            Ok(Self::Tensor(
                TensorCache::from_host(&host, device).map_err(device_err)?,
            ))
        }
    }

    pub fn to_snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        match self {
            Self::Host(c) => c.to_snapshot(),
            Self::Tensor(c) => c.to_host().map_err(device_err)?.to_snapshot(),
        }
    }

    /// The same contents in the tensor cache on `device` (what a GPU runs; on a CPU, the way to
    /// check the GPU path against the host one).
    pub fn to_device(&self, device: &Device) -> Result<Self, AttentionError> {
        match self {
            Self::Host(c) => Ok(Self::Tensor(TensorCache::from_host(c, device)?)),
            device_cache => Ok(device_cache.clone()),
        }
    }

    /// Holds keys and values as `kv_type` from now on (what is held is converted). The host
    /// cache only: the tensor cache keeps the model's dtype, and says so in the log.
    pub fn set_kv_type(&mut self, kv_type: KvType) {
        match self {
            Self::Host(c) => c.set_kv_type(kv_type),
            Self::Tensor(_) if kv_type != KvType::F32 => {
                tracing::warn!(
                    "kv type {kv_type} applies to the CPU cache; the device keeps its own"
                )
            }
            Self::Tensor(_) => {}
        }
    }

    /// How keys and values are held (the tensor cache: as f32 when read back).
    pub fn kv_type(&self) -> KvType {
        match self {
            Self::Host(c) => c.kv_type(),
            Self::Tensor(_) => KvType::F32,
        }
    }

    pub fn params(&self) -> LambdaParams {
        match self {
            Self::Host(c) => c.params(),
            Self::Tensor(c) => c.params(),
        }
    }

    pub fn stats(&self) -> CacheStats {
        match self {
            Self::Host(c) => c.stats(),
            Self::Tensor(c) => c.stats(),
        }
    }

    /// Turns recall on (docs/ALGORITHM.md §10). Only the host cache recalls: the tensor
    /// cache refuses, so a GPU run says so instead of silently forgetting.
    pub fn set_recall(&mut self, recall: Recall) -> Result<(), AttentionError> {
        match self {
            Self::Host(c) => {
                c.set_recall(recall);
                Ok(())
            }
            Self::Tensor(_) => Err(AttentionError::RecallOnDevice),
        }
    }

    /// What recall holds and did (zeros when it is off).
    pub fn recall_stats(&self) -> RecallStats {
        match self {
            Self::Host(c) => c.recall_stats(),
            Self::Tensor(_) => RecallStats::default(),
        }
    }

    /// The positions recall brings back for the next token in the first recalling layer, as
    /// sorted ranges (empty when recall is off or chose nothing).
    pub fn recalled_ranges(&self) -> Vec<Range<u64>> {
        let Self::Host(c) = self else {
            return Vec::new();
        };
        let Some(recalled) = c.recalled_reference() else {
            return Vec::new();
        };
        let mut positions = recalled.positions.clone();
        positions.sort_unstable();
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for p in positions {
            match ranges.last_mut() {
                Some(r) if r.end == p => r.end = p + 1,
                _ => ranges.push(p..p + 1),
            }
        }
        ranges
    }

    /// The first I/O failure of the recall store, if any (recall then stopped growing).
    pub fn recall_failure(&self) -> Option<String> {
        match self {
            Self::Host(c) => c.recall().and_then(|r| r.failure()).map(str::to_string),
            Self::Tensor(_) => None,
        }
    }

    /// Whether the next token attends to position `pos`.
    pub fn holds(&self, pos: u64) -> bool {
        match self {
            Self::Host(c) => c.holds(pos),
            Self::Tensor(c) => c.holds(pos),
        }
    }

    /// Pins `range`; returns how many of its tokens were already evicted.
    pub fn pin(&mut self, range: Range<u64>) -> u64 {
        match self {
            Self::Host(c) => c.pin(range),
            Self::Tensor(c) => c.pin(range),
        }
    }

    pub fn unpin(&mut self, range: Range<u64>) -> Result<(), AttentionError> {
        match self {
            Self::Host(c) => {
                c.unpin(range);
                Ok(())
            }
            Self::Tensor(c) => c.unpin(range),
        }
    }

    pub fn pinned(&self) -> &[Range<u64>] {
        match self {
            Self::Host(c) => c.pinned(),
            Self::Tensor(c) => c.pinned(),
        }
    }

    pub fn set_probe(&mut self, on: bool) {
        match self {
            Self::Host(c) => c.set_probe(on),
            Self::Tensor(c) => c.set_probe(on),
        }
    }

    pub fn attention_shares(&self) -> Vec<(u64, f32)> {
        match self {
            Self::Host(c) => c.attention_shares(),
            Self::Tensor(c) => c.attention_shares(),
        }
    }

    /// Floats of one token's keys and values over every layer (see [`HostCache::slot_floats`]).
    pub fn slot_floats(&self) -> usize {
        match self {
            Self::Host(c) => c.slot_floats(),
            Self::Tensor(c) => c.slot_floats(),
        }
    }

    /// Calls `each` with the slot of every position of `positions` the cache holds, in order
    /// (the tensor cache is read back once for all of them).
    pub fn read_slots(
        &self,
        positions: Range<u64>,
        mut each: impl FnMut(u64, &[f32], SlotState),
    ) -> Result<(), AttentionError> {
        let host;
        let cache = match self {
            Self::Host(c) => c,
            Self::Tensor(c) => {
                host = c.to_host()?;
                &host
            }
        };
        let mut slot = vec![0f32; cache.slot_floats()];
        for pos in positions {
            let state = cache.read_slot(pos, &mut slot);
            if state != SlotState::Missing {
                each(pos, &slot, state);
            }
        }
        Ok(())
    }

    /// See [`HostCache::globals_version`].
    pub fn globals_version(&self) -> u64 {
        match self {
            Self::Host(c) => c.globals_version(),
            Self::Tensor(c) => c.globals_version(),
        }
    }

    /// See [`HostCache::globals_snapshot`].
    pub fn globals_snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        match self {
            Self::Host(c) => c.globals_snapshot(),
            Self::Tensor(c) => c.to_host().map_err(device_err)?.globals_snapshot(),
        }
    }

    /// Rebuilds a cache from its global stores and window slots ([`HostCache::from_parts`]),
    /// for `device`.
    pub fn from_parts(
        globals: &[u8],
        params: LambdaParams,
        layers: Vec<LayerGeometry>,
        device: &Device,
        next_position: u64,
        slot: impl FnMut(u64) -> Option<Vec<f32>>,
    ) -> Result<Self, SnapshotError> {
        let host = HostCache::from_parts(globals, params, layers, next_position, slot)?;
        Self::on(host, device)
    }

    /// A rewind point here: what [`Self::rewind`] goes back to.
    pub fn mark(&mut self) -> RewindPoint {
        match self {
            Self::Host(c) => {
                c.mark();
                RewindPoint::Host
            }
            Self::Tensor(c) => RewindPoint::Tensor(Box::new(c.clone())),
        }
    }

    /// Goes back to `point`; `false` when the cache dropped it (pins changed since).
    pub fn rewind(&mut self, point: RewindPoint) -> bool {
        match (self, point) {
            (Self::Host(c), RewindPoint::Host) => c.rewind(),
            (Self::Tensor(c), RewindPoint::Tensor(saved)) => {
                // The global stores went back: the version must move on, not back.
                let after = c.globals_version();
                *c = *saved;
                c.advance_globals_version_past(after);
                true
            }
            _ => false,
        }
    }

    /// Drops a rewind point's records.
    pub fn forget(&mut self, point: RewindPoint) {
        if let (Self::Host(c), RewindPoint::Host) = (self, point) {
            c.forget_mark();
        }
    }

    fn inner(&mut self) -> &mut dyn AttentionCache {
        match self {
            Self::Host(c) => c,
            Self::Tensor(c) => c,
        }
    }
}

fn device_err(e: AttentionError) -> SnapshotError {
    SnapshotError::Device(e.to_string())
}

impl AttentionCache for KvCache {
    fn attend(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
    ) -> Result<Vec<f32>, AttentionError> {
        self.inner().attend(layer, input)
    }

    fn attend_tensors(
        &mut self,
        layer: usize,
        input: &TensorInput<'_>,
    ) -> Result<Tensor, AttentionError> {
        self.inner().attend_tensors(layer, input)
    }

    fn next_position(&self) -> u64 {
        match self {
            Self::Host(c) => c.next_position(),
            Self::Tensor(c) => c.next_position(),
        }
    }

    fn advance(&mut self, n: usize) {
        self.inner().advance(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{MAX_POSITION, Rope, RopeStyle, reference_lambda_attention_pinned};
    use crate::device::test_device;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect()
    }

    /// Pinned tokens (set P) match the oracle in both caches, whether pinned before they arrive
    /// or while they are still in the window; both caches' probes, stats and unpinning agree, and
    /// the tensor cache survives a move through host memory with a pin copy still pending.
    #[test]
    fn pinned_tokens_match_the_reference_in_both_caches() {
        let (hd, heads, kv, t) = (16, 4, 2, 90);
        let params = LambdaParams::new(2, 16, None).unwrap();
        let pins = [3..4u64, 20..26, 40..43];
        let mut rng = StdRng::seed_from_u64(11);
        let q = random(&mut rng, t * heads * hd, 1.0);
        // Large keys make softmax peaky, so a wrong mask shows up as a large error.
        let k = random(&mut rng, t * kv * hd, 3.0);
        let v = random(&mut rng, t * kv * hd, 1.0);
        let device = test_device();
        for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
            let rope = Rope::new(hd, 10_000.0, style);
            let scale = 1.0 / (hd as f32).sqrt();
            let oracle = |pins: &[Range<u64>]| {
                reference_lambda_attention_pinned(
                    &q, &k, &v, t, heads, kv, hd, params, pins, &rope, scale,
                )
            };
            // Token 3 is evicted before its pin (which comes at 44), so no row ever sees it: rows
            // from 19 on (where the oracle would see it at distance D) follow an oracle without it.
            let (expected, expected_late) = (oracle(&pins), oracle(&pins[1..]));
            let layers = vec![LayerGeometry::full(params, kv, hd)];
            let mut caches = [
                KvCache::Host(HostCache::new(params, layers.clone())),
                KvCache::Tensor(TensorCache::new(params, layers, &device)),
            ];
            let mut outputs = [Vec::new(), Vec::new()];
            for cache in &mut caches {
                cache.pin(pins[1].clone());
                cache.set_probe(true);
            }
            for (pos, chunk) in [(0, 30), (30, 1), (31, 13), (44, 1), (45, 45)] {
                for (cache, out) in caches.iter_mut().zip(&mut outputs) {
                    if pos == 44 {
                        // Tokens 40..43 are still in the window: pinning them loses nothing.
                        assert_eq!(cache.pin(pins[2].clone()), 0);
                        // Token 3 has left it, and the sinks' store never held it: lost.
                        assert_eq!(cache.pin(pins[0].clone()), 1);
                        if let KvCache::Tensor(d) = cache {
                            let host = d.to_host().unwrap();
                            *d = TensorCache::from_host(&host, &device).unwrap();
                        }
                    }
                    let rows =
                        |x: &[f32], h: usize| x[pos * h * hd..(pos + chunk) * h * hd].to_vec();
                    let (qs, ks, vs) = (rows(&q, heads), rows(&k, kv), rows(&v, kv));
                    let input = AttentionInput {
                        q: &qs,
                        k: &ks,
                        v: &vs,
                        n_tokens: chunk,
                        n_heads: heads,
                        rope: &rope,
                        scale,
                    };
                    out.extend(cache.attend(0, &input).unwrap());
                    cache.advance(chunk);
                }
                if chunk == 1 {
                    let [host, tensor] = &caches;
                    let (a, b) = (host.attention_shares(), tensor.attention_shares());
                    assert_eq!(a.len(), b.len(), "{style:?} probe at {pos}");
                    for ((pa, sa), (pb, sb)) in a.iter().zip(&b) {
                        assert!(
                            pa == pb && (sa - sb).abs() < 1e-5,
                            "{style:?} probe at {pos}"
                        );
                    }
                }
            }
            let row = heads * hd;
            for (cache, got) in caches.iter_mut().zip(&outputs) {
                let err = got
                    .iter()
                    .enumerate()
                    .map(|(x, a)| {
                        let e = if x < 19 * row {
                            expected[x]
                        } else {
                            expected_late[x]
                        };
                        (*a as f64 - e).abs()
                    })
                    .fold(0.0, f64::max);
                let kind = match cache {
                    KvCache::Host(_) => "host",
                    KvCache::Tensor(_) => "tensor",
                };
                assert!(err <= 1e-5, "{kind} {style:?}: max |Δ| = {err}");
                let s = cache.stats();
                assert_eq!(s.pinned, 6 + 3, "{kind}");
                assert_eq!(s.attended_global, 2 + 9, "{kind}");
                assert_eq!(s.attended_window, 15, "{kind}");
                assert_eq!(s.evicted, 90 - 11 - 15, "{kind}");
                assert_eq!(s.slots_in_use, 2 + 9 + 16, "{kind}");
                cache.unpin(21..41).unwrap();
                // The range of token 3 stays recorded (the message is pinned) though not held.
                assert_eq!(cache.pinned(), &[3..4, 20..21, 41..43], "{kind}");
                assert_eq!(cache.stats().pinned, 3, "{kind}");
                assert!(cache.holds(20) && !cache.holds(22) && cache.holds(1) && cache.holds(89));
            }
        }
    }

    /// A snapshot written by either cache restores into either, and the restored caches go on
    /// exactly as the original.
    #[test]
    fn snapshots_move_between_the_caches() {
        let (hd, heads, kv) = (8, 2, 1);
        let params = LambdaParams::new(2, 8, None).unwrap();
        let layers = vec![LayerGeometry::full(params, kv, hd); 2];
        let rope = Rope::new(hd, 10_000.0, RopeStyle::Neox);
        let mut rng = StdRng::seed_from_u64(5);
        let (q, k, v) = (
            random(&mut rng, 30 * heads * hd, 1.0),
            random(&mut rng, 30 * kv * hd, 2.0),
            random(&mut rng, 30 * kv * hd, 1.0),
        );
        let feed = |cache: &mut KvCache, range: Range<usize>| -> Vec<f32> {
            let n = range.len();
            let rows = |x: &[f32], h: usize| x[range.start * h * hd..range.end * h * hd].to_vec();
            let (qs, ks, vs) = (rows(&q, heads), rows(&k, kv), rows(&v, kv));
            let input = AttentionInput {
                q: &qs,
                k: &ks,
                v: &vs,
                n_tokens: n,
                n_heads: heads,
                rope: &rope,
                scale: 0.3,
            };
            let out = (0..2)
                .flat_map(|layer| cache.attend(layer, &input).unwrap())
                .collect();
            cache.advance(n);
            out
        };
        let device = test_device();
        let mut original = KvCache::new(params, layers.clone(), &device)
            .to_device(&device)
            .unwrap();
        feed(&mut original, 0..19);
        original.pin(12..14);
        let snapshot = original.to_snapshot().unwrap();
        let want = feed(&mut original.clone(), 19..30);
        for target in [Device::Cpu, device.clone()] {
            let mut restored =
                KvCache::from_snapshot(&snapshot, params, layers.clone(), &target).unwrap();
            assert_eq!(restored.next_position(), 19);
            assert_eq!(restored.pinned(), std::slice::from_ref(&(12..14)));
            let got = feed(&mut restored, 19..30);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err <= 1e-5, "restored on {target:?}: max |Δ| = {err}");
        }
    }

    /// What a pin reports lost is counted over the cache, not the range: a pin of every
    /// position a cache can reach (a damaged saved conversation held one; walking it hung the
    /// resume) answers at once, and every pin reports what a walk over its range would.
    #[test]
    fn a_pin_of_every_position_counts_its_losses_without_walking_them() {
        let (hd, heads, kv, t) = (8, 2, 1, 90);
        let params = LambdaParams::new(2, 16, None).unwrap();
        let rope = Rope::new(hd, 10_000.0, RopeStyle::Neox);
        let mut rng = StdRng::seed_from_u64(3);
        let (q, k, v) = (
            random(&mut rng, t * heads * hd, 1.0),
            random(&mut rng, t * kv * hd, 1.0),
            random(&mut rng, t * kv * hd, 1.0),
        );
        let layers = vec![LayerGeometry::full(params, kv, hd)];
        let device = test_device();
        for mut cache in [
            KvCache::Host(HostCache::new(params, layers.clone())),
            KvCache::Tensor(TensorCache::new(params, layers, &device)),
        ] {
            cache.pin(20..26);
            let input = AttentionInput {
                q: &q,
                k: &k,
                v: &v,
                n_tokens: t,
                n_heads: heads,
                rope: &rope,
                scale: 0.3,
            };
            cache.attend(0, &input).unwrap();
            cache.advance(t);
            let walked = |cache: &KvCache, r: &Range<u64>| {
                (r.start..r.end.min(t as u64))
                    .filter(|&p| !cache.holds(p))
                    .count() as u64
            };
            // 90 fed; held: 2 sinks, 6 pinned, and the 15 keys the next query's window of 16
            // (itself included) sees.
            assert_eq!(walked(&cache, &(0..MAX_POSITION)), 90 - 23);
            for r in [10..30, 70..200, 0..2, 85..86, 95..99, 0..MAX_POSITION] {
                let want = walked(&cache, &r);
                assert_eq!(cache.pin(r.clone()), want, "{r:?}");
            }
        }
    }
}
