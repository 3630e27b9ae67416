//! What keeping a cache on disk piece by piece, and rewinding it, needs: one token's keys and
//! values over every layer as a *slot* (so a save writes only the tokens that arrived since the
//! last one), the global store on its own (it changes only while the sinks fill and when pins
//! change), a cache rebuilt from the two, and a rewind point that remembers only what the
//! passes after it overwrite (so regenerating a reply keeps the slots the reply wrote, not a
//! copy of the cache).

use std::collections::HashSet;

use super::kv_store::KvVec;
use super::snapshot::SnapshotError;
use super::{HostCache, HostLayerCache, LambdaParams, LayerGeometry, TensorCache};

/// Whether a cache still holds a token's keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Every layer holds it.
    Complete,
    /// Only some layers do (a model's sliding layers already evicted it): enough to continue
    /// from a later window end, not from this one.
    Partial,
    /// No layer holds it.
    Missing,
}

/// What a layer's ring held before the passes after a rewind point.
#[derive(Debug, Clone)]
pub(super) struct Undo {
    seen: u64,
    global_len: usize,
    ring_len: usize,
    /// Ring slots overwritten since the mark, with the position, keys and values they held,
    /// each slot once.
    /// (In the ring's own type: a copy of f16 slots takes half an f32 one.)
    saved: Vec<(usize, u64, KvVec, KvVec)>,
    saved_slots: HashSet<usize>,
}

impl HostLayerCache {
    /// Floats of one token's keys (as the ring holds them: rotated) and values in this layer.
    fn slot_floats(&self) -> usize {
        2 * self.geometry.n_kv_heads * self.geometry.head_dim
    }

    /// Copies position `pos`'s keys and values into `out` when the ring holds it.
    fn read_slot(&self, pos: u64, out: &mut [f32]) -> bool {
        let row = self.geometry.n_kv_heads * self.geometry.head_dim;
        let slot = (pos % self.geometry.window as u64) as usize;
        if self.ring_pos.get(slot) != Some(&pos) {
            return false;
        }
        self.ring_k
            .read(slot * row..(slot + 1) * row, &mut out[..row]);
        self.ring_v
            .read(slot * row..(slot + 1) * row, &mut out[row..]);
        true
    }

    /// Remembers ring slot `slot` before it is overwritten, when a rewind point is set and the
    /// slot held something at the mark.
    pub(super) fn keep_for_rewind(&mut self, slot: usize) {
        let row = self.geometry.n_kv_heads * self.geometry.head_dim;
        for undo in &mut self.undo {
            if slot >= undo.ring_len || !undo.saved_slots.insert(slot) {
                continue;
            }
            undo.saved.push((
                slot,
                self.ring_pos[slot],
                self.ring_k.slice(slot * row..(slot + 1) * row),
                self.ring_v.slice(slot * row..(slot + 1) * row),
            ));
        }
    }

    fn mark(&mut self) {
        self.undo.push(Undo {
            seen: self.seen,
            global_len: self.global_pos.len(),
            ring_len: self.ring_pos.len(),
            saved: Vec::new(),
            saved_slots: HashSet::new(),
        });
    }

    fn rewind(&mut self) {
        let Some(undo) = self.undo.pop() else { return };
        let row = self.geometry.n_kv_heads * self.geometry.head_dim;
        for (slot, pos, k, v) in undo.saved {
            self.ring_pos[slot] = pos;
            self.ring_k.write_from(slot * row, &k);
            self.ring_v.write_from(slot * row, &v);
        }
        self.ring_pos.truncate(undo.ring_len);
        self.ring_k.truncate(undo.ring_len * row);
        self.ring_v.truncate(undo.ring_len * row);
        self.global_pos.truncate(undo.global_len);
        self.global_k.truncate(undo.global_len * row);
        self.global_v.truncate(undo.global_len * row);
        self.seen = undo.seen;
    }
}

impl HostCache {
    /// Floats of one token's keys and values over every layer (a slot): per layer, the keys as
    /// the ring holds them, then the values.
    pub fn slot_floats(&self) -> usize {
        self.layers.iter().map(HostLayerCache::slot_floats).sum()
    }

    /// Copies position `pos`'s slot into `out` (`slot_floats` long); layers that no longer hold
    /// it leave zeros.
    pub fn read_slot(&self, pos: u64, out: &mut [f32]) -> SlotState {
        let (mut held, mut at) = (0, 0);
        for layer in &self.layers {
            let n = layer.slot_floats();
            let part = &mut out[at..at + n];
            if layer.read_slot(pos, part) {
                held += 1;
            } else {
                part.fill(0.0);
            }
            at += n;
        }
        match held {
            0 => SlotState::Missing,
            h if h == self.layers.len() => SlotState::Complete,
            _ => SlotState::Partial,
        }
    }

    /// A counter that changes whenever any layer's global store (sinks, pins) or the pinned
    /// ranges change: a save writes the global store again only when it moved.
    pub fn globals_version(&self) -> u64 {
        let lengths: u64 = self.layers.iter().map(|l| l.global_pos.len() as u64).sum();
        lengths + self.globals_changes
    }

    /// Makes [`Self::globals_version`] larger than `version`, which the global stores had
    /// before they shrank (a rewind, an unpin): the version never comes back to a value a save
    /// has seen with other contents.
    pub(super) fn advance_globals_version_past(&mut self, version: u64) {
        self.globals_changes += version + 1 - self.globals_version().min(version + 1);
    }

    /// The global store of every layer, the Λ parameters, the pins and the position, in the
    /// snapshot format with empty rings: what [`Self::from_parts`] takes beside the slots.
    pub fn globals_snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        let mut globals = self.clone();
        for layer in &mut globals.layers {
            layer.ring_k = KvVec::new(layer.kv_type());
            layer.ring_v = KvVec::new(layer.kv_type());
            layer.ring_pos = Vec::new();
        }
        globals.to_snapshot()
    }

    /// Rebuilds a cache at `next_position` from a [`Self::globals_snapshot`] and the slots of
    /// the window positions, read through `slot` (each layer takes the positions its window
    /// holds). A position `slot` cannot give is an error: the caller re-reads the window.
    pub fn from_parts(
        globals: &[u8],
        params: LambdaParams,
        layers: Vec<LayerGeometry>,
        next_position: u64,
        mut slot: impl FnMut(u64) -> Option<Vec<f32>>,
    ) -> Result<Self, SnapshotError> {
        let mut cache = Self::from_snapshot(globals, params, layers)?;
        // The sinks the global stores hold must be the ones a cache at `next_position` holds.
        let sinks = params.n_global as u64;
        if cache.next_position.min(sinks) != next_position.min(sinks) {
            return Err(SnapshotError::Mismatch(format!(
                "the saved sinks were taken at token {}, the window ends at {next_position}",
                cache.next_position
            )));
        }
        let widest = cache
            .layers
            .iter()
            .map(|l| l.geometry.window as u64)
            .max()
            .unwrap_or(0);
        let first = next_position.saturating_sub(widest);
        for pos in first..next_position {
            let data = slot(pos).ok_or_else(|| {
                SnapshotError::Mismatch(format!("the saved window lacks position {pos}"))
            })?;
            if data.len() != cache.slot_floats() {
                return Err(SnapshotError::Mismatch(format!(
                    "a slot of {} floats, expected {}",
                    data.len(),
                    cache.slot_floats()
                )));
            }
            let mut at = 0;
            for layer in &mut cache.layers {
                let n = layer.slot_floats();
                if pos + layer.geometry.window as u64 >= next_position {
                    layer.put_slot(pos, &data[at..at + n]);
                }
                at += n;
            }
        }
        for layer in &mut cache.layers {
            layer.seen = next_position;
        }
        cache.next_position = next_position;
        Ok(cache)
    }

    /// Moves on to `position` without storing the tokens before it: they count as evicted
    /// (a conversation read again from its sinks, pins and window). The ring's older entries
    /// stay invisible: they are outside every later query's window.
    pub fn skip_to(&mut self, position: u64) {
        if position <= self.next_position {
            return;
        }
        self.forget_marks();
        self.next_position = position;
        for layer in &mut self.layers {
            layer.seen = position;
        }
    }

    /// Starts remembering what the passes from now on overwrite, so [`Self::rewind`] can put
    /// the cache back here. Points nest: a rewind (or a forget) takes the last point set, and
    /// the one before stays good (a turn keeps one before its prompt and one after).
    pub fn mark(&mut self) {
        self.mark_position.push(self.next_position);
        self.layers.iter_mut().for_each(HostLayerCache::mark);
        if let Some(recall) = self.recall.0.as_mut() {
            recall.mark();
        }
    }

    /// Puts the cache back where [`Self::mark`] was set (the mark is used up); `false` when
    /// there is no mark (none set, or pins changed since).
    pub fn rewind(&mut self) -> bool {
        let Some(next) = self.mark_position.pop() else {
            return false;
        };
        let before = self.globals_version();
        self.layers.iter_mut().for_each(HostLayerCache::rewind);
        if let Some(recall) = self.recall.0.as_mut() {
            recall.rewind();
        }
        self.next_position = next;
        // The global stores went back: the next save writes them again.
        self.advance_globals_version_past(before);
        true
    }

    /// Drops the last rewind point set (and what it kept).
    pub fn forget_mark(&mut self) {
        self.mark_position.pop();
        self.layers.iter_mut().for_each(|l| {
            l.undo.pop();
        });
        if let Some(recall) = self.recall.0.as_mut() {
            recall.forget_mark();
        }
    }

    /// Drops every rewind point: the cache changed in a way they cannot undo.
    pub fn forget_marks(&mut self) {
        self.mark_position.clear();
        self.layers.iter_mut().for_each(|l| l.undo.clear());
        if let Some(recall) = self.recall.0.as_mut() {
            recall.forget_marks();
        }
    }
}

impl HostLayerCache {
    /// Puts position `pos`'s keys and values into its ring slot, growing the ring as needed.
    fn put_slot(&mut self, pos: u64, data: &[f32]) {
        let row = self.geometry.n_kv_heads * self.geometry.head_dim;
        let window = self.geometry.window;
        let slot = (pos % window as u64) as usize;
        if slot >= self.ring_pos.len() {
            self.grow_ring((slot + 1).min(window));
        }
        self.ring_pos[slot] = pos;
        self.ring_k.write(slot * row, &data[..row]);
        self.ring_v.write(slot * row, &data[row..]);
    }
}

/// A cache's rewind point: the host cache keeps a log of what it overwrites; the tensor cache a
/// copy (device memory).
pub enum RewindPoint {
    Host,
    Tensor(Box<TensorCache>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{AttentionCache, AttentionInput, CacheStats, Rope, RopeStyle};

    /// One full layer (window 8) and one sliding layer (window 3).
    fn geometry(params: LambdaParams) -> Vec<LayerGeometry> {
        vec![
            LayerGeometry::full(params, 1, 4),
            LayerGeometry::sliding(params, 1, 4, 3),
        ]
    }

    fn tokens(n: usize) -> Vec<f32> {
        (0..4 * n)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 5.0)
            .collect()
    }

    fn feed(cache: &mut HostCache, values: &[f32]) -> Vec<f32> {
        let rope = Rope::new(4, 10_000.0, RopeStyle::Neox);
        let mut out = Vec::new();
        for x in values.chunks(4) {
            let input = AttentionInput {
                q: x,
                k: x,
                v: x,
                n_tokens: 1,
                n_heads: 1,
                rope: &rope,
                scale: 0.5,
            };
            for layer in 0..2 {
                out.extend(cache.attend(layer, &input).unwrap());
            }
            cache.advance(1);
        }
        out
    }

    #[test]
    fn a_cache_rebuilt_from_globals_and_slots_continues_exactly() {
        let params = LambdaParams::new(2, 8, None).unwrap();
        let all = tokens(40);
        let mut original = HostCache::new(params, geometry(params));
        feed(&mut original, &all[..4 * 25]);
        original.pin(14..16);
        feed(&mut original, &all[4 * 25..4 * 27]);
        // What a save keeps: the global stores, and every slot as it arrived.
        let globals = original.globals_snapshot().unwrap();
        let mut saved = std::collections::HashMap::new();
        let mut slot = vec![0f32; original.slot_floats()];
        for pos in 0..27 {
            if original.read_slot(pos, &mut slot) != SlotState::Missing {
                saved.insert(pos, slot.clone());
            }
        }
        assert_eq!(original.read_slot(26, &mut slot), SlotState::Complete);
        assert_eq!(
            original.read_slot(22, &mut slot),
            SlotState::Partial,
            "the sliding layer evicted it"
        );
        assert_eq!(original.read_slot(3, &mut slot), SlotState::Missing);
        let mut rebuilt = HostCache::from_parts(&globals, params, geometry(params), 27, |p| {
            saved.get(&p).cloned()
        })
        .unwrap();
        assert_eq!(rebuilt.stats(), original.stats());
        assert_eq!(rebuilt.pinned(), original.pinned());
        assert_eq!(
            feed(&mut rebuilt, &all[4 * 27..]),
            feed(&mut original, &all[4 * 27..])
        );
        // A window with a hole is refused, not half-used.
        let err = HostCache::from_parts(&globals, params, geometry(params), 27, |p| {
            (p != 24).then(|| saved[&p].clone())
        });
        assert!(matches!(err, Err(SnapshotError::Mismatch(_))));
        // Global stores saved before the sinks filled do not serve a later window.
        let mut young = HostCache::new(params, geometry(params));
        feed(&mut young, &all[..4]);
        let early = young.globals_snapshot().unwrap();
        let err = HostCache::from_parts(&early, params, geometry(params), 27, |p| {
            saved.get(&p).cloned()
        });
        assert!(matches!(err, Err(SnapshotError::Mismatch(_))));
    }

    #[test]
    fn rewinding_puts_back_exactly_what_the_passes_overwrote() {
        let params = LambdaParams::new(2, 8, None).unwrap();
        let all = tokens(30);
        for start in [1, 5, 12] {
            let mut cache = HostCache::new(params, geometry(params));
            feed(&mut cache, &all[..4 * start]);
            let copy = cache.clone();
            let version = cache.globals_version();
            cache.mark();
            feed(&mut cache, &all[4 * start..4 * (start + 9)]);
            let replied = cache.globals_version();
            assert!(cache.rewind());
            assert!(!cache.rewind(), "a mark is used once");
            // Never a version a save has seen with other global stores: the next save
            // rewrites them.
            assert!(
                cache.globals_version() > replied.max(version),
                "start {start}"
            );
            let mut twin = copy.clone();
            // Everything but the allocation, which keeps what the passes grew (up to the window).
            let counts = |c: &HostCache| CacheStats {
                bytes: 0,
                ..c.stats()
            };
            assert_eq!(counts(&cache), counts(&twin), "start {start}");
            let rest = &all[4 * start..4 * (start + 6)];
            assert_eq!(
                feed(&mut cache, rest),
                feed(&mut twin, rest),
                "start {start}"
            );
        }
    }

    /// Two points, one inside the other (a turn's before its prompt and after it): rewinding
    /// the inner one and then the outer one puts the cache back where the outer one was set,
    /// whatever the passes between them overwrote.
    #[test]
    fn nested_rewind_points_go_back_in_turn() {
        let params = LambdaParams::new(2, 8, None).unwrap();
        let all = tokens(40);
        let counts = |c: &HostCache| CacheStats {
            bytes: 0,
            ..c.stats()
        };
        for (start, prompt) in [(1, 2), (5, 1), (12, 7)] {
            let mut cache = HostCache::new(params, geometry(params));
            feed(&mut cache, &all[..4 * start]);
            let outer = cache.clone();
            cache.mark();
            feed(&mut cache, &all[4 * start..4 * (start + prompt)]);
            let inner = cache.clone();
            cache.mark();
            feed(
                &mut cache,
                &all[4 * (start + prompt)..4 * (start + prompt + 4)],
            );
            assert!(cache.rewind());
            assert_eq!(counts(&cache), counts(&inner), "start {start}");
            // The inner point can be set again and used again (a second regeneration).
            cache.mark();
            feed(&mut cache, &all[4 * start..4 * (start + 2)]);
            assert!(cache.rewind());
            assert!(cache.rewind());
            assert!(!cache.rewind(), "two points, two rewinds");
            assert_eq!(counts(&cache), counts(&outer), "start {start}");
            let mut twin = outer.clone();
            let rest = &all[4 * start..4 * (start + 6)];
            assert_eq!(
                feed(&mut cache, rest),
                feed(&mut twin, rest),
                "start {start}"
            );
        }
    }

    #[test]
    fn pins_drop_the_rewind_point() {
        let params = LambdaParams::new(2, 8, None).unwrap();
        let mut cache = HostCache::new(params, geometry(params));
        feed(&mut cache, &tokens(10));
        cache.mark();
        feed(&mut cache, &tokens(3));
        let version = cache.globals_version();
        cache.pin(4..6);
        let pinned = cache.globals_version();
        assert!(pinned > version);
        assert!(!cache.rewind());
        cache.unpin(4..6);
        assert!(
            cache.globals_version() > pinned,
            "an unpin shrinks the stores"
        );
    }
}
