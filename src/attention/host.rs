//! The bounded Λ cache and its fused attention pass (CPU; keys and values f32 or f16,
//! `kv_store.rs`).
//!
//! Per layer: a *global store* holding the first `G` tokens' keys unrotated (they are scored
//! against the query rotated to `D` once they leave the window), and a *ring* of `L` slots holding
//! the window's keys rotated at their true positions. Nothing else is kept, so the slots in use
//! never exceed `G + L` whatever the conversation's length. Storage grows until the ring is full
//! and is never reallocated after that.
//!
//! The attention pass (`kernel.rs`) runs one task per (token, KV group), reading keys and values
//! in place: no K/V copies, no `repeat_kv`.

use std::ops::Range;

use super::blocked::{BlockScratch, BlockSegment, BlockShape, Visible, attend_block};
use super::kernel::{Rows, Segment, attend_group, mean_entropy, mean_probabilities, merge_parts};
use super::kv_store::{KvType, KvVec};
use super::persist::Undo;
use super::recall::{Recall, RecallStats, Recalled};
use crate::kernels::Kernel;
use crate::kernels::{DisjointRows, pool_execute_chunked};

/// Chunks of at least this many tokens attend as matrix products (`blocked.rs`); smaller ones
/// (decoding) take the per-row kernel.
const BLOCK_MIN_TOKENS: usize = 8;

/// Rings at least this long are split across the cores when a step has fewer rows than cores
/// (shorter ones are not worth a second task).
const SPLIT_MIN_KEYS: usize = 256;
/// Query tokens per block task: with Qwen2.5-0.5B's 7 heads per group, 112 rows.
const BLOCK_TOKENS: usize = 16;

/// Threads of candle's pool, asked once: `candle_core::utils::get_num_threads` reads and parses
/// /proc/cpuinfo on every call (0.1 ms here), and a decoded token asks once per layer.
fn pool_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// A block task's reused buffers.
#[derive(Default)]
struct BlockTaskScratch {
    q_loc: Vec<f32>,
    q_glob: Vec<f32>,
    entropy: Vec<f32>,
    block: BlockScratch,
}
use super::{
    AttentionCache, AttentionError, AttentionInput, LambdaParams, LayerGeometry, check_input,
    window_start,
};

/// One layer's bounded store.
#[derive(Debug, Clone)]
pub struct HostLayerCache {
    pub(super) geometry: LayerGeometry,
    /// `[slot][kv_head][head_dim]`, unrotated keys of the sinks and the pinned tokens.
    pub(super) global_k: KvVec,
    pub(super) global_v: KvVec,
    /// Absolute position of each global slot.
    pub(super) global_pos: Vec<u64>,
    /// `[slot][kv_head][head_dim]`, rotated keys; slot of position `p` is `p % window`.
    pub(super) ring_k: KvVec,
    pub(super) ring_v: KvVec,
    /// Absolute position held by each ring slot.
    pub(super) ring_pos: Vec<u64>,
    /// Tokens this layer has seen.
    pub(super) seen: u64,
    /// Positions kept like sinks (docs/ALGORITHM.md §5, the set P), sorted, disjoint.
    pub(super) pinned: Vec<Range<u64>>,
    /// Pins of tokens already in the ring: their keys are unrotated into the global store at the
    /// next `attend`, which has the layer's rotary embedding at hand.
    pub(super) pins_to_copy: bool,
    /// Whether single-token passes record [`Self::last_attention`].
    pub(super) probe: bool,
    pub(super) last_attention: Vec<(u64, f32)>,
    /// Whether passes record [`Self::last_entropy`].
    pub(super) entropy: bool,
    pub(super) last_entropy: Vec<f32>,
    /// What the passes since the cache's rewind point overwrote (`persist.rs`).
    /// Rewind points, the last set last: each keeps what was overwritten since it was set.
    pub(super) undo: Vec<Undo>,
    /// Whether tokens leaving the window are kept in [`Self::evicted`] (recall's store takes
    /// them after each pass).
    pub(super) keep_evicted: bool,
    pub(super) evicted: Evicted,
}

/// Tokens a pass evicted (past the sinks), in position order: keys unrotated, values.
#[derive(Debug, Clone, Default)]
pub struct Evicted {
    pub positions: Vec<u64>,
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

impl Evicted {
    /// Empties it, keeping the allocations for the next pass.
    fn clear(&mut self) {
        self.positions.clear();
        self.keys.clear();
        self.values.clear();
    }
}

/// What the cache holds, for the status bar and the benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    /// Tokens fed so far.
    pub tokens_seen: u64,
    /// First position inside the window of the next query (in the first full layer).
    pub window_start: u64,
    /// Sinks attended by the next token (in the first full layer).
    pub attended_global: u64,
    /// Window tokens attended by the next token (in the first full layer).
    pub attended_window: u64,
    /// Pinned tokens outside the window, attended like sinks (included in `attended_global`).
    pub pinned: u64,
    /// Tokens no longer attended by anything.
    pub evicted: u64,
    /// Evicted tokens the next query attends again through recall, in the first recalling
    /// layer (docs/ALGORITHM.md §10; 0 when recall is off or found nothing).
    pub recalled: u64,
    /// Cache slots in use, summed over layers.
    pub slots_in_use: u64,
    /// Slots the cache can ever hold, summed over layers.
    pub slot_capacity: u64,
    /// Bytes of K/V storage allocated now.
    pub bytes: u64,
}

impl HostLayerCache {
    pub fn new(geometry: LayerGeometry, kv_type: KvType) -> Self {
        Self {
            geometry,
            global_k: KvVec::new(kv_type),
            global_v: KvVec::new(kv_type),
            global_pos: Vec::new(),
            ring_k: KvVec::new(kv_type),
            ring_v: KvVec::new(kv_type),
            ring_pos: Vec::new(),
            seen: 0,
            pinned: Vec::new(),
            pins_to_copy: false,
            probe: false,
            last_attention: Vec::new(),
            entropy: false,
            last_entropy: Vec::new(),
            undo: Vec::new(),
            keep_evicted: false,
            evicted: Evicted::default(),
        }
    }

    /// Keeps the tokens at `positions` attended forever, like sinks (only on layers that have a
    /// global branch). Tokens not fed yet are stored when they arrive; tokens already evicted
    /// cannot come back and are ignored.
    pub fn set_pinned(&mut self, pinned: &[Range<u64>]) {
        if !self.geometry.pinnable {
            return;
        }
        self.pinned = pinned.to_vec();
        let n_global = self.geometry.n_global as u64;
        let row = self.row();
        // Unpinned tokens leave the global store (the sinks stay).
        let mut keep = 0;
        for slot in 0..self.global_pos.len() {
            let pos = self.global_pos[slot];
            if pos < n_global || is_pinned(&self.pinned, pos) {
                self.global_pos[keep] = pos;
                self.global_k
                    .copy_within(slot * row..(slot + 1) * row, keep * row);
                self.global_v
                    .copy_within(slot * row..(slot + 1) * row, keep * row);
                keep += 1;
            }
        }
        self.global_pos.truncate(keep);
        self.global_k.truncate(keep * row);
        self.global_v.truncate(keep * row);
        self.pins_to_copy = true;
    }

    /// Whether the token at `pos` is still attended by the next query (sink, pinned or window).
    pub fn holds(&self, pos: u64) -> bool {
        self.global_pos.contains(&pos) || self.ring_holds(pos)
    }

    fn ring_holds(&self, pos: u64) -> bool {
        !self.ring_pos.is_empty()
            && self.ring_pos[(pos % self.geometry.window as u64) as usize] == pos
            && pos + (self.geometry.window as u64) > self.seen
    }

    /// Makes single-token passes record which positions got how much attention.
    pub fn set_probe(&mut self, on: bool) {
        self.probe = on;
        if !on {
            self.last_attention = Vec::new();
        }
    }

    /// Makes every pass record the entropy of its attention distributions.
    pub fn set_entropy(&mut self, on: bool) {
        self.entropy = on;
        if !on {
            self.last_entropy = Vec::new();
        }
    }

    /// Per token of the last pass: the mean entropy (nats) of its heads' attention distributions
    /// (empty unless recording).
    pub fn last_entropy(&self) -> &[f32] {
        &self.last_entropy
    }

    /// `(position, probability)` of every key the last single-token query attended, averaged
    /// over heads (empty unless probing).
    pub fn last_attention(&self) -> &[(u64, f32)] {
        &self.last_attention
    }

    /// Copies the keys of pinned tokens that sit in the ring into the global store, unrotated.
    fn copy_pinned_from_ring(&mut self, rope: &super::Rope) {
        let row = self.row();
        let (n_kv, hd) = (self.geometry.n_kv_heads, self.geometry.head_dim);
        let n_global = self.geometry.n_global as u64;
        let mut positions: Vec<u64> = self
            .ring_pos
            .iter()
            .copied()
            .filter(|&p| {
                p != u64::MAX
                    && p >= n_global
                    && is_pinned(&self.pinned, p)
                    && !self.global_pos.contains(&p)
            })
            .collect();
        positions.sort_unstable();
        for pos in positions {
            let slot = (pos % self.geometry.window as u64) as usize;
            let mut k = self.ring_k.to_f32(slot * row..(slot + 1) * row);
            rope.unrotate_rows(&mut k, n_kv, hd, |_| pos);
            self.global_k.extend(&k);
            self.global_v
                .extend(&self.ring_v.to_f32(slot * row..(slot + 1) * row));
            self.global_pos.push(pos);
        }
        self.pins_to_copy = false;
    }

    fn row(&self) -> usize {
        self.geometry.n_kv_heads * self.geometry.head_dim
    }

    pub fn global_len(&self) -> usize {
        self.global_pos.len()
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
        self.global_k.capacity_bytes()
            + self.global_v.capacity_bytes()
            + self.ring_k.capacity_bytes()
            + self.ring_v.capacity_bytes()
            + 8 * (self.ring_pos.capacity() + self.global_pos.capacity())
    }

    pub fn kv_type(&self) -> KvType {
        self.ring_k.kv_type()
    }

    /// The same contents held as `kv_type` (f16 rounds what f32 held).
    pub(super) fn convert(&mut self, kv_type: KvType) {
        for v in [
            &mut self.global_k,
            &mut self.global_v,
            &mut self.ring_k,
            &mut self.ring_v,
        ] {
            *v = v.converted(kv_type);
        }
    }

    /// Positions currently in the ring, oldest first.
    #[cfg(test)]
    pub fn ring_positions(&self) -> Vec<u64> {
        let mut p = self.ring_pos.clone();
        p.sort_unstable();
        p
    }

    /// Extends the ring to `slots` slots. Capacity doubles, as a `Vec`'s would, but stops at
    /// exactly `window` slots, so a full ring holds no slack whatever the window size.
    pub(super) fn grow_ring(&mut self, slots: usize) {
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
        self.ring_k.resize(slots * row);
        self.ring_v.resize(slots * row);
    }

    /// Runs Λ attention for a chunk and stores it, in four steps: the chunk's sinks and pins
    /// enter the global store ([`Self::store_globals`]), its keys and queries are rotated
    /// ([`Self::rotate`]), its rows attend ([`Self::attend_rows`] when decoding,
    /// [`Self::attend_split`] when a step has fewer rows than cores, [`Self::attend_blocks`] for
    /// prefill chunks), and its last tokens enter the ring ([`Self::store_in_ring`]).
    pub fn attend(&mut self, input: &AttentionInput<'_>) -> Result<Vec<f32>, AttentionError> {
        self.attend_recalling(input, None)
    }

    /// [`Self::attend`] with recalled blocks as a third branch (docs/ALGORITHM.md §10): their
    /// keys, unrotated, are seen at the clamped distance like the sinks, in the same softmax.
    pub fn attend_recalling(
        &mut self,
        input: &AttentionInput<'_>,
        recalled: Option<&Recalled>,
    ) -> Result<Vec<f32>, AttentionError> {
        let (n_kv_heads, head_dim) = (self.geometry.n_kv_heads, self.geometry.head_dim);
        check_input(input, n_kv_heads, head_dim)?;
        let n = input.n_tokens;
        if n == 0 {
            return Ok(Vec::new());
        }
        if self.pins_to_copy {
            self.copy_pinned_from_ring(input.rope);
        }
        self.store_globals(input);
        let chunk = self.rotate(input, recalled.filter(|r| !r.is_empty()));
        let n_tasks = n * n_kv_heads;
        let mut out = vec![0f32; n * input.n_heads * head_dim];
        let mut entropies = vec![0f32; if self.entropy { n_tasks } else { 0 }];
        if n >= BLOCK_MIN_TOKENS {
            self.attend_blocks(&chunk, &mut out, &mut entropies);
        } else if let Some(parts) = self.split_parts(n_tasks) {
            let probe = self.probe && n == 1;
            let probes = self.attend_split(&chunk, parts, probe, &mut out);
            if probe {
                let recalled = chunk.recalled;
                self.record_attention(&probes, chunk.pos0, recalled);
            }
        } else {
            let probe = self.probe && n == 1;
            let probes = self.attend_rows(&chunk, probe, &mut out, &mut entropies);
            if probe {
                let recalled = chunk.recalled;
                self.record_attention(&probes, chunk.pos0, recalled);
            }
        }
        if self.entropy {
            self.last_entropy = entropies
                .chunks(n_kv_heads)
                .map(|h| h.iter().sum::<f32>() / n_kv_heads as f32)
                .collect();
        }
        self.store_in_ring(&chunk);
        self.seen += n as u64;
        Ok(out)
    }

    /// Step 1: the chunk's sinks and pinned tokens enter the global store unrotated (sized once
    /// for the sinks).
    fn store_globals(&mut self, input: &AttentionInput<'_>) {
        let (n_global, row, pos0) = (self.geometry.n_global, self.row(), self.seen);
        if pos0 < n_global as u64 && self.global_k.capacity_bytes() == 0 {
            self.global_k.reserve_exact(n_global * row);
            self.global_v.reserve_exact(n_global * row);
            self.global_pos.reserve_exact(n_global);
        }
        for t in 0..input.n_tokens {
            let pos = pos0 + t as u64;
            if (pos as usize) < n_global || is_pinned(&self.pinned, pos) {
                self.global_k.extend(&input.k[t * row..(t + 1) * row]);
                self.global_v.extend(&input.v[t * row..(t + 1) * row]);
                self.global_pos.push(pos);
            }
        }
    }

    /// Step 2: the chunk's keys and queries rotated at their true positions; the queries also
    /// at `D` when some sink may already be outside the window of some row.
    fn rotate<'a>(
        &self,
        input: &'a AttentionInput<'a>,
        recalled: Option<&'a Recalled>,
    ) -> RotatedChunk<'a> {
        let LayerGeometry {
            n_kv_heads,
            head_dim,
            window,
            distance_limit,
            ..
        } = self.geometry;
        let (n, pos0) = (input.n_tokens, self.seen);
        let mut keys = input.k.to_vec();
        input
            .rope
            .rotate_rows(&mut keys, n_kv_heads, head_dim, |t| pos0 + t as u64);
        let mut q_local = input.q.to_vec();
        input
            .rope
            .rotate_rows(&mut q_local, input.n_heads, head_dim, |t| pos0 + t as u64);
        let last = pos0 + n as u64 - 1;
        let needs_global = (self.global_len() > 0 && last >= window as u64) || recalled.is_some();
        let q_global = needs_global.then(|| {
            let mut q = input.q.to_vec();
            input
                .rope
                .rotate_rows(&mut q, input.n_heads, head_dim, |_| distance_limit);
            q
        });
        RotatedChunk {
            input,
            pos0,
            keys,
            q_local,
            q_global,
            recalled,
            group: input.n_heads / n_kv_heads,
        }
    }

    /// Step 3, decoding: one task per (token, KV group); every query head of the group is
    /// served by one read of the keys and values it may see. Returns each task's key
    /// probabilities when `probe` (else `None`s).
    fn attend_rows(
        &self,
        c: &RotatedChunk<'_>,
        probe: bool,
        out: &mut [f32],
        entropies: &mut [f32],
    ) -> Vec<Option<Vec<f32>>> {
        let n_tasks = c.input.n_tokens * self.geometry.n_kv_heads;
        let mut probes = vec![None; n_tasks];
        let outs = DisjointRows::new(out, c.width(&self.geometry));
        let probe_slots = DisjointRows::new(&mut probes, 1);
        let entropy_slots = DisjointRows::new(entropies, 1);
        pool_execute_chunked(n_tasks, |range| {
            #[cfg(feature = "faults")]
            crate::faults::on_pool_task();
            let mut scratch = Vec::new();
            for task in range {
                // SAFETY: every task index is run once, and task `task` owns these rows.
                let out = unsafe { outs.row(task) };
                let whole = Part {
                    ring: 0..self.ring_len(),
                    first: true,
                    last: true,
                };
                self.attend_part(c, task, whole, out, &mut scratch, None);
                if probe {
                    // SAFETY: as above.
                    let slot = unsafe { probe_slots.row(task) };
                    slot[0] = Some(mean_probabilities(&scratch, c.group));
                }
                if self.entropy {
                    // SAFETY: as above.
                    let slot = unsafe { entropy_slots.row(task) };
                    slot[0] = mean_entropy(&scratch, c.group);
                }
            }
        });
        probes
    }

    /// Step 3 when a step has fewer rows than cores (a decode step of a model with one KV
    /// head): each row's keys in `parts` ranges, one per core, merged into one softmax
    /// afterwards. With `probe`, also each row's key probabilities (as [`Self::attend_rows`]
    /// gives them): each part's softmax numerators, rescaled to the merged softmax.
    fn attend_split(
        &self,
        c: &RotatedChunk<'_>,
        parts: usize,
        probe: bool,
        out: &mut [f32],
    ) -> Vec<Option<Vec<f32>>> {
        let n_tasks = c.input.n_tokens * self.geometry.n_kv_heads;
        let width = c.width(&self.geometry);
        let each = width + 2 * c.group;
        let mut partials = vec![0f32; n_tasks * parts * each];
        let pieces = DisjointRows::new(&mut partials, each);
        let mut numerators = vec![Vec::new(); if probe { n_tasks * parts } else { 0 }];
        let kept = DisjointRows::new(&mut numerators, 1);
        let ring_len = self.ring_len();
        pool_execute_chunked(n_tasks * parts, |range| {
            let mut scratch = Vec::new();
            for item in range {
                let (task, p) = (item / parts, item % parts);
                let part = Part {
                    ring: ring_len * p / parts..ring_len * (p + 1) / parts,
                    first: p == 0,
                    last: p == parts - 1,
                };
                // SAFETY: every item index is run once and owns its piece.
                let (out, stats) = unsafe { pieces.row(item) }.split_at_mut(width);
                self.attend_part(c, task, part, out, &mut scratch, Some(stats));
                if probe {
                    // SAFETY: as above.
                    let slot = unsafe { kept.row(item) };
                    slot[0] = std::mem::take(&mut scratch);
                }
            }
        });
        let mut probes = vec![None; if probe { n_tasks } else { 0 }];
        for (task, out) in out.chunks_exact_mut(width).enumerate() {
            let task_parts = partials[task * parts * each..(task + 1) * parts * each]
                .chunks_exact(each)
                .map(|piece| piece.split_at(width));
            let (outs, stats): (Vec<&[f32]>, Vec<&[f32]>) = task_parts.unzip();
            merge_parts(&outs, &stats, self.geometry.head_dim, out);
            if probe {
                let scratches = &numerators[task * parts..(task + 1) * parts];
                probes[task] = Some(merged_probabilities(scratches, &stats, c.group));
            }
        }
        probes
    }

    /// One part of a row (task = token × KV group) against the keys the rule lets it see.
    /// Writes the group's outputs to `out`, and the part's softmax statistics to `partial` when
    /// the row is split.
    fn attend_part(
        &self,
        c: &RotatedChunk<'_>,
        task: usize,
        Part { ring, first, last }: Part,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
        partial: Option<&mut [f32]>,
    ) {
        let LayerGeometry {
            n_kv_heads,
            head_dim,
            window,
            ..
        } = self.geometry;
        let window = window as u64;
        let (row, width) = (self.row(), c.width(&self.geometry));
        let (t, kv) = (task / n_kv_heads, task % n_kv_heads);
        let i = c.pos0 + t as u64;
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
                self.global_k.view(),
                self.global_v.view(),
                if c.q_global.is_some() && first {
                    self.global_len()
                } else {
                    0
                },
            ),
            queries: c
                .q_global
                .as_deref()
                .map_or(&[][..], |q| &q[q_off..q_off + width]),
            visible: |j: usize| self.global_pos[j] + window <= i,
        };
        let recalled = c.recalled.filter(|_| first);
        let recall = Segment {
            rows: view(
                recalled.map_or(&[][..], |r| &r.keys).into(),
                recalled.map_or(&[][..], |r| &r.values).into(),
                recalled.map_or(0, Recalled::len),
            ),
            queries: sinks.queries,
            visible: |j: usize| recalled.is_some_and(|r| r.positions[j] + window <= i),
        };
        let queries = &c.q_local[q_off..q_off + width];
        let ring_start = ring.start;
        let ring = Segment {
            rows: view(
                self.ring_k.view().from(ring_start * row),
                self.ring_v.view().from(ring_start * row),
                ring.len(),
            ),
            queries,
            visible: |slot: usize| {
                let j = self.ring_pos[ring_start + slot];
                j <= i && i - j < window
            },
        };
        let chunk = Segment {
            rows: view(
                (&c.keys).into(),
                c.input.v.into(),
                if last { c.input.n_tokens } else { 0 },
            ),
            queries,
            visible: |u: usize| u <= t && ((t - u) as u64) < window,
        };
        attend_group(
            Kernel::detect(),
            [&sinks, &recall, &ring, &chunk],
            c.group,
            head_dim,
            c.input.scale,
            out,
            scratch,
            partial,
        );
    }

    /// Step 3 for prefill chunks: blocks of [`BLOCK_TOKENS`] tokens × one KV group as matrix
    /// products against blocks of keys (`blocked.rs`), the softmax carried across key blocks.
    fn attend_blocks(&self, c: &RotatedChunk<'_>, out: &mut [f32], entropies: &mut [f32]) {
        let LayerGeometry {
            n_kv_heads,
            head_dim,
            window,
            ..
        } = self.geometry;
        let window = window as u64;
        let (n, group, row) = (c.input.n_tokens, c.group, self.row());
        let width = c.width(&self.geometry);
        let input = c.input;
        let chunk_positions: Vec<u64> = (c.pos0..c.pos0 + n as u64).collect();
        let recall_rows = c.recalled;
        let blocks = n.div_ceil(BLOCK_TOKENS);
        let outs = DisjointRows::new(out, width);
        let entropy_slots = DisjointRows::new(entropies, 1);
        let block_task = |task: usize, scratch: &mut BlockTaskScratch| {
            let (b, kv) = (task / n_kv_heads, task % n_kv_heads);
            let (t0, t1) = (b * BLOCK_TOKENS, ((b + 1) * BLOCK_TOKENS).min(n));
            let rows = (t1 - t0) * group;
            // The block's queries for this group, packed `[row][head_dim]` and scaled.
            let pack = |q: &[f32], into: &mut Vec<f32>| {
                into.clear();
                for t in t0..t1 {
                    let from = t * input.n_heads * head_dim + kv * width;
                    into.extend(q[from..from + width].iter().map(|x| x * input.scale));
                }
            };
            pack(&c.q_local, &mut scratch.q_loc);
            if let Some(q) = &c.q_global {
                pack(q, &mut scratch.q_glob);
            }
            let segment = |keys, values, positions, slots, queries, visible| BlockSegment {
                keys,
                values,
                stride: row,
                offset: kv * head_dim,
                positions,
                slots,
                queries,
                visible,
            };
            let mut segments = Vec::with_capacity(4);
            if c.q_global.is_some() {
                segments.push(segment(
                    self.global_k.view(),
                    self.global_v.view(),
                    &self.global_pos,
                    0..self.global_len(),
                    &scratch.q_glob,
                    Visible::OutsideWindow(window),
                ));
            }
            if let Some(r) = recall_rows {
                segments.push(segment(
                    (&r.keys).into(),
                    (&r.values).into(),
                    &r.positions,
                    0..r.len(),
                    &scratch.q_glob,
                    Visible::OutsideWindow(window),
                ));
            }
            segments.push(segment(
                self.ring_k.view(),
                self.ring_v.view(),
                &self.ring_pos,
                0..self.ring_len(),
                &scratch.q_loc,
                Visible::Window(window),
            ));
            segments.push(segment(
                (&c.keys).into(),
                input.v.into(),
                &chunk_positions,
                window_start(t0 as u64, window) as usize..t1,
                &scratch.q_loc,
                Visible::Window(window),
            ));
            scratch.entropy.resize(rows, 0.0);
            let shape = BlockShape {
                rows,
                group,
                head_dim,
                first_position: c.pos0 + t0 as u64,
            };
            let entropy = self.entropy.then_some(&mut scratch.entropy[..]);
            let outputs = attend_block(&segments, shape, &mut scratch.block, entropy);
            for t in t0..t1 {
                let task = t * n_kv_heads + kv;
                let r = (t - t0) * group;
                // SAFETY: the rows of (token t, KV head kv) belong to this block task only.
                unsafe { outs.row(task) }
                    .copy_from_slice(&outputs[r * head_dim..(r + group) * head_dim]);
                if self.entropy {
                    // SAFETY: as above.
                    let slot = unsafe { entropy_slots.row(task) };
                    slot[0] = scratch.entropy[r..r + group].iter().sum::<f32>() / group as f32;
                }
            }
        };
        pool_execute_chunked(blocks * n_kv_heads, |range| {
            let mut scratch = BlockTaskScratch::default();
            for task in range {
                block_task(task, &mut scratch);
            }
        });
    }

    /// Step 4: the chunk's last `window` tokens enter the ring, evicting what left the window.
    fn store_in_ring(&mut self, c: &RotatedChunk<'_>) {
        let (window, row, n) = (self.geometry.window, self.row(), c.input.n_tokens);
        if self.keep_evicted {
            self.collect_evicted(c);
        }
        for t in n.saturating_sub(window)..n {
            let pos = c.pos0 + t as u64;
            let slot = (pos % window as u64) as usize;
            if slot >= self.ring_pos.len() {
                self.grow_ring((slot + 1).min(window));
            }
            self.keep_for_rewind(slot);
            self.ring_pos[slot] = pos;
            self.ring_k
                .write(slot * row, &c.keys[t * row..(t + 1) * row]);
            self.ring_v
                .write(slot * row, &c.input.v[t * row..(t + 1) * row]);
        }
    }

    /// The tokens this pass pushes out of the window, past the sinks, in position order: the
    /// ring's oldest (their keys unrotated, R(j)⁻¹ in f64) and the chunk's own first tokens
    /// when the chunk is longer than the window (their keys as given).
    fn collect_evicted(&mut self, c: &RotatedChunk<'_>) {
        let (window, row, n) = (self.geometry.window as u64, self.row(), c.input.n_tokens);
        // The ring keeps the last `window` tokens: what is older leaves it in this pass. What
        // was older than the window before the pass left before (or was skipped: a re-read
        // conversation's gap leaves stale slots that are not the window's).
        let start = (c.pos0 + n as u64).saturating_sub(window);
        let before = c
            .pos0
            .saturating_sub(window)
            .max(self.geometry.n_global as u64);
        let mut old: Vec<(u64, usize)> = self
            .ring_pos
            .iter()
            .enumerate()
            .filter(|&(_, &p)| p != u64::MAX && p >= before && p < start)
            .map(|(slot, &p)| (p, slot))
            .collect();
        old.sort_unstable();
        let e = &mut self.evicted;
        for (pos, slot) in old {
            let mut k = self.ring_k.to_f32(slot * row..(slot + 1) * row);
            c.input.rope.unrotate_rows(
                &mut k,
                self.geometry.n_kv_heads,
                self.geometry.head_dim,
                |_| pos,
            );
            e.positions.push(pos);
            e.keys.extend_from_slice(&k);
            e.values
                .extend_from_slice(&self.ring_v.to_f32(slot * row..(slot + 1) * row));
        }
        for t in 0..n {
            let pos = c.pos0 + t as u64;
            if pos >= before && pos < start {
                e.positions.push(pos);
                e.keys.extend_from_slice(&c.input.k[t * row..(t + 1) * row]);
                e.values
                    .extend_from_slice(&c.input.v[t * row..(t + 1) * row]);
            }
        }
    }

    /// Into how many parts each row's keys are split when there are fewer rows (`n_tasks`) than
    /// cores, or `None` to keep rows whole: when the cores would have work enough, the ring is
    /// short, or the entropy (which reads whole rows) is measured.
    fn split_parts(&self, n_tasks: usize) -> Option<usize> {
        let threads = pool_threads();
        let split = n_tasks < threads && self.ring_len() >= SPLIT_MIN_KEYS && !self.entropy;
        split.then(|| threads.div_ceil(n_tasks))
    }

    /// Averages the KV groups' key probabilities of a single-token pass and names each key by
    /// its position (keys are in segment order: global store, ring, the token itself).
    fn record_attention(
        &mut self,
        probes: &[Option<Vec<f32>>],
        pos0: u64,
        recalled: Option<&Recalled>,
    ) {
        let n_groups = probes.len() as f32;
        let recalled = recalled.map_or(&[][..], |r| &r.positions[..]);
        let mut mean = vec![0f32; self.global_len() + recalled.len() + self.ring_len() + 1];
        for p in probes.iter().flatten() {
            for (m, x) in mean.iter_mut().zip(p) {
                *m += x / n_groups;
            }
        }
        let positions = self
            .global_pos
            .iter()
            .chain(recalled)
            .chain(&self.ring_pos)
            .chain(std::iter::once(&pos0));
        self.last_attention = positions
            .zip(mean)
            .filter(|(_, p)| *p > 0.0)
            .map(|(pos, p)| (*pos, p))
            .collect();
    }
}

/// The probability each key of a split row got in the merged softmax, averaged over the group's
/// heads: part `p`'s numerators `e` (of its own maximum `m_p`, `scratches[p]` laid out as
/// [`attend_group`] leaves them) count `e · exp(m_p − M) / L`, where `M` is the largest part
/// maximum and `L = Σ_p l_p · exp(m_p − M)` (`stats[p]` holds `m_p, l_p` for each head).
/// Keys come out in part order, which is segment order: sinks, ring, the token itself.
fn merged_probabilities(scratches: &[Vec<f32>], stats: &[&[f32]], group: usize) -> Vec<f32> {
    let keys = |s: &Vec<f32>| (s.len() - group) / group;
    let mut mean = vec![0f32; scratches.iter().map(keys).sum()];
    for g in 0..group {
        let max = stats.iter().fold(f32::NEG_INFINITY, |m, s| m.max(s[2 * g]));
        if max == f32::NEG_INFINITY {
            continue;
        }
        let total: f32 = stats
            .iter()
            .map(|s| s[2 * g + 1] * (s[2 * g] - max).exp())
            .sum();
        let mut at = 0;
        for (scratch, s) in scratches.iter().zip(stats) {
            let n = keys(scratch);
            if s[2 * g] > f32::NEG_INFINITY {
                let w = (s[2 * g] - max).exp() / (total * group as f32);
                let e = &scratch[g * n..(g + 1) * n];
                mean[at..at + n]
                    .iter_mut()
                    .zip(e)
                    .for_each(|(m, e)| *m += e * w);
            }
            at += n;
        }
    }
    mean
}

/// One `attend` call's chunk after rotation: what every task of the call reads.
struct RotatedChunk<'a> {
    input: &'a AttentionInput<'a>,
    /// Position of the chunk's first token.
    pos0: u64,
    /// Keys rotated at their true positions, `[token][kv_head][head_dim]`.
    keys: Vec<f32>,
    /// Queries rotated at their true positions (scored against the window).
    q_local: Vec<f32>,
    /// Queries rotated to `D` (scored against the sinks outside the window), when a row needs
    /// them.
    q_global: Option<Vec<f32>>,
    /// Blocks recalled for this pass (none when empty), all outside every row's window.
    recalled: Option<&'a Recalled>,
    /// Query heads per KV head.
    group: usize,
}

impl RotatedChunk<'_> {
    /// Outputs of one (token, KV group) task: the group's heads.
    fn width(&self, geometry: &LayerGeometry) -> usize {
        self.group * geometry.head_dim
    }
}

/// The keys of a row one task scores: ring slots `ring`, the sinks with the first part and the
/// chunk with the last (a whole row is the one part with all of them).
struct Part {
    ring: Range<usize>,
    first: bool,
    last: bool,
}

/// Whether `pos` falls in one of the sorted, disjoint `ranges`.
pub(super) fn is_pinned(ranges: &[Range<u64>], pos: u64) -> bool {
    ranges.iter().any(|r| r.contains(&pos))
}

/// How many positions of `range` before `next` a cache no longer holds, when only `globals`
/// (sinks and pinned copies) can hold a position before `recent_from`. Counted over the
/// globals and the recent positions, never over the range itself: a pin read from a damaged
/// conversation can span 2^48 positions, and a walk over it hung the resume.
pub(super) fn evicted_in(
    range: Range<u64>,
    next: u64,
    recent_from: u64,
    globals: &[u64],
    holds: impl Fn(u64) -> bool,
) -> u64 {
    let end = range.end.min(next);
    if range.start >= end {
        return 0;
    }
    let early = range.start..end.min(recent_from);
    let mut kept: Vec<u64> = globals
        .iter()
        .copied()
        .filter(|&p| early.contains(&p) && holds(p))
        .collect();
    kept.sort_unstable();
    kept.dedup();
    let early_lost = (early.end.saturating_sub(early.start)).saturating_sub(kept.len() as u64);
    let recent_lost = (range.start.max(recent_from)..end)
        .filter(|&p| !holds(p))
        .count() as u64;
    early_lost + recent_lost
}

/// Adds `range` to the sorted, disjoint `ranges`, merging what overlaps or touches.
pub(super) fn add_range(ranges: &mut Vec<Range<u64>>, range: Range<u64>) {
    ranges.push(range);
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for r in ranges.drain(..) {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    *ranges = merged;
}

/// Removes every position of `range` from the sorted, disjoint `ranges`.
pub(super) fn remove_range(ranges: &mut Vec<Range<u64>>, range: Range<u64>) {
    *ranges = ranges
        .iter()
        .flat_map(|r| {
            [
                r.start..r.end.min(range.start),
                r.start.max(range.end)..r.end,
            ]
        })
        .filter(|r| !r.is_empty())
        .collect();
}

/// Per-layer probes (`(position, probability)` lists) averaged over `n_layers` layers, sorted
/// by position: what the inspect view shows.
pub(super) fn merge_shares<'a>(
    layers: impl Iterator<Item = &'a [(u64, f32)]>,
    n_layers: usize,
) -> Vec<(u64, f32)> {
    let mut all: Vec<(u64, f32)> = layers.flat_map(|l| l.iter().copied()).collect();
    all.sort_unstable_by_key(|(p, _)| *p);
    let n = n_layers.max(1) as f32;
    let mut out: Vec<(u64, f32)> = Vec::with_capacity(all.len());
    for (pos, p) in all {
        match out.last_mut() {
            Some((last, share)) if *last == pos => *share += p / n,
            _ => out.push((pos, p / n)),
        }
    }
    out
}

/// How a cache's layers look from the status bar's point of view.
pub(super) struct Occupancy<'a> {
    /// Tokens fed so far.
    pub seen: u64,
    /// The first full-attention layer's geometry and global-store positions.
    pub reference: Option<(&'a LayerGeometry, &'a [u64])>,
    pub slots_in_use: u64,
    pub slot_capacity: u64,
    pub bytes: u64,
}

impl CacheStats {
    /// Counts for the status bar: attended/evicted as seen by the next query of the reference
    /// layer.
    pub(super) fn measure(o: Occupancy<'_>) -> Self {
        let seen = o.seen;
        let (global, pinned, first_local) = match o.reference {
            Some((geometry, global_pos)) => {
                // The next query is the token at position `seen`.
                let first_local = window_start(seen, geometry.window as u64);
                let outside = |p: &&u64| **p < first_local;
                let global = global_pos.iter().filter(outside).count() as u64;
                let sinks = geometry.n_global as u64;
                let pinned = global_pos
                    .iter()
                    .filter(outside)
                    .filter(|p| **p >= sinks)
                    .count() as u64;
                (global, pinned, first_local)
            }
            None => (0, 0, seen),
        };
        let window = seen - first_local;
        CacheStats {
            tokens_seen: seen,
            window_start: first_local,
            attended_global: global,
            attended_window: window,
            pinned,
            evicted: seen - global - window,
            recalled: 0,
            slots_in_use: o.slots_in_use,
            slot_capacity: o.slot_capacity,
            bytes: o.bytes,
        }
    }
}

/// The bounded Λ cache of a whole model: one [`HostLayerCache`] per layer.
#[derive(Debug, Clone)]
pub struct HostCache {
    pub(super) layers: Vec<HostLayerCache>,
    pub(super) params: LambdaParams,
    pub(super) next_position: u64,
    pub(super) pinned: Vec<Range<u64>>,
    /// Changes of the global stores a length does not show (pins, rewinds): see
    /// `globals_version`.
    pub(super) globals_changes: u64,
    /// Where each [`Self::rewind`] goes back to, the last point set last.
    pub(super) mark_position: Vec<u64>,
    /// Recall of evicted tokens (docs/ALGORITHM.md §10), when on.
    pub(super) recall: RecallSlot,
}

/// A cache's recall. A copy of the cache does not copy the store on disk: it goes on without
/// recall (copies serve tests and snapshots, which recall's file outlives).
#[derive(Default)]
pub(super) struct RecallSlot(pub(super) Option<Box<Recall>>);

impl Clone for RecallSlot {
    fn clone(&self) -> Self {
        Self(None)
    }
}

impl std::fmt::Debug for RecallSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl HostCache {
    pub fn new(params: LambdaParams, layers: Vec<LayerGeometry>) -> Self {
        Self {
            layers: layers
                .into_iter()
                .map(|g| HostLayerCache::new(g, KvType::F32))
                .collect(),
            params,
            next_position: 0,
            pinned: Vec::new(),
            globals_changes: 0,
            mark_position: Vec::new(),
            recall: RecallSlot::default(),
        }
    }

    /// Holds keys and values as `kv_type` from now on (what is held is converted).
    pub fn set_kv_type(&mut self, kv_type: KvType) {
        self.layers.iter_mut().for_each(|l| l.convert(kv_type));
    }

    pub fn kv_type(&self) -> KvType {
        self.layers
            .first()
            .map_or(KvType::F32, HostLayerCache::kv_type)
    }

    /// Turns recall on: from now on, tokens leaving the window of a recalling layer go to
    /// `recall`'s store, and those layers attend to the blocks it chooses.
    pub fn set_recall(&mut self, recall: Recall) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.keep_evicted = recall.recalls(i);
        }
        self.recall = RecallSlot(Some(Box::new(recall)));
    }

    pub fn recall(&self) -> Option<&Recall> {
        self.recall.0.as_deref()
    }

    /// The blocks the first recalling layer attends to now, when recall is on.
    pub fn recalled_reference(&self) -> Option<&Recalled> {
        self.recall()?.first_recalled()
    }

    /// What recall holds and did (zeros when off).
    pub fn recall_stats(&self) -> RecallStats {
        self.recall().map(Recall::stats).unwrap_or_default()
    }

    pub fn params(&self) -> LambdaParams {
        self.params
    }

    /// The layer whose window is the conversation's `L` (the first full-attention layer): the
    /// one the status bar and the visualizer describe.
    fn reference_layer(&self) -> Option<&HostLayerCache> {
        self.layers
            .iter()
            .find(|l| l.geometry.pinnable)
            .or(self.layers.first())
    }

    /// Pins `range` (absolute positions): its tokens stay attended, like sinks, until unpinned.
    /// Returns how many of its tokens were already evicted and so cannot be pinned.
    pub fn pin(&mut self, range: Range<u64>) -> u64 {
        let lost = match self.reference_layer() {
            Some(l) => evicted_in(
                range.clone(),
                self.next_position,
                window_start(l.seen, l.geometry.window as u64),
                &l.global_pos,
                |p| self.holds(p),
            ),
            // No layer holds anything: every position already fed is lost.
            None => range
                .end
                .min(self.next_position)
                .saturating_sub(range.start),
        };
        add_range(&mut self.pinned, range);
        self.apply_pins();
        lost
    }

    /// Stops pinning every position of `range`; those outside the window are evicted at once.
    pub fn unpin(&mut self, range: Range<u64>) {
        remove_range(&mut self.pinned, range);
        self.apply_pins();
    }

    pub fn pinned(&self) -> &[Range<u64>] {
        &self.pinned
    }

    /// Hands the pins to every layer. The global stores change under a rewind point, so the
    /// point is dropped (a regeneration after a pin continues from the pinned cache instead).
    fn apply_pins(&mut self) {
        let before = self.globals_version();
        self.forget_marks();
        for layer in &mut self.layers {
            layer.set_pinned(&self.pinned);
        }
        if let Some(recall) = self.recall.0.as_mut() {
            // The global stores changed: the next pass chooses blocks without their tokens.
            recall.choose_again();
        }
        self.advance_globals_version_past(before);
    }

    /// Whether the next token attends to position `pos` (in the reference layer).
    pub fn holds(&self, pos: u64) -> bool {
        pos < self.next_position && self.reference_layer().is_some_and(|l| l.holds(pos))
    }

    /// Makes every layer record the attention of single-token passes (see [`Self::attention_shares`]).
    pub fn set_probe(&mut self, on: bool) {
        self.layers.iter_mut().for_each(|l| l.set_probe(on));
    }

    /// Makes every layer record the entropy of each pass's attention (see [`Self::entropies`]).
    pub fn set_entropy(&mut self, on: bool) {
        self.layers.iter_mut().for_each(|l| l.set_entropy(on));
    }

    /// Per layer, per token of the last forward: the mean attention entropy of its heads (nats).
    pub fn entropies(&self) -> Vec<&[f32]> {
        self.layers.iter().map(|l| l.last_entropy()).collect()
    }

    /// The share of attention the last single-token pass gave each position, averaged over heads
    /// and layers, sorted by position. Shares sum to 1 (up to rounding). Empty unless probing.
    pub fn attention_shares(&self) -> Vec<(u64, f32)> {
        merge_shares(
            self.layers.iter().map(|l| l.last_attention()),
            self.layers.len(),
        )
    }

    /// Counts for the status bar: attended/evicted as seen by the next query of a full layer.
    pub fn stats(&self) -> CacheStats {
        let recalled = self.recall_stats().recalled_tokens;
        let stats = CacheStats::measure(Occupancy {
            seen: self.next_position,
            reference: self
                .reference_layer()
                .map(|l| (&l.geometry, l.global_pos.as_slice())),
            slots_in_use: self.layers.iter().map(|l| l.slots_in_use() as u64).sum(),
            slot_capacity: self
                .layers
                .iter()
                .map(|l| (l.geometry.n_global + l.geometry.window) as u64)
                .sum(),
            bytes: self.layers.iter().map(|l| l.bytes() as u64).sum(),
        });
        CacheStats { recalled, ..stats }
    }
}

impl AttentionCache for HostCache {
    fn attend(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
    ) -> Result<Vec<f32>, AttentionError> {
        super::check_position(self.next_position, input.n_tokens)?;
        let n_layers = self.layers.len();
        let cache = self
            .layers
            .get_mut(layer)
            .ok_or(AttentionError::NoSuchLayer(layer, n_layers))?;
        let Some(recall) = self.recall.0.as_mut() else {
            let out = cache.attend(input);
            // A copy of a recalling cache has no store: what its layers keep goes.
            cache.evicted.clear();
            return out;
        };
        recall.listen(layer, input);
        if input.n_tokens > 0 && recall.due(self.next_position, input.n_tokens) {
            recall.refresh(layer, self.next_position, &cache.global_pos);
        }
        let out = cache.attend_recalling(input, recall.recalled(layer))?;
        let e = &cache.evicted;
        recall.evicted(layer, &e.positions, &e.keys, &e.values);
        cache.evicted.clear();
        Ok(out)
    }

    fn next_position(&self) -> u64 {
        self.next_position
    }

    fn advance(&mut self, n: usize) {
        if let Some(recall) = self.recall.0.as_mut() {
            recall.flush();
        }
        self.next_position += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{Rope, RopeStyle, reference_lambda_attention};
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    #[derive(Clone, Copy)]
    struct Case {
        t: usize,
        chunk: usize,
        g: usize,
        l: usize,
        d: Option<u64>,
        heads: usize,
        kv: usize,
        hd: usize,
    }

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The largest |Δ| against the oracle each storage type may show. f32 is exact up to the
    /// order of additions (seen: 3e-7). f16 rounds each stored key and value by up to 2⁻¹¹ of
    /// itself: on these inputs (keys up to 3, queries and values up to 1) outputs move by up to
    /// 4e-4 (seen over the whole grid). q8_0 moves each by up to half a step of its block's
    /// `max|x| / 127` (keys: 1.2e-2): outputs by up to 7e-3 (seen over the whole grid). A wrong mask, rotation or
    /// distance moves them by 1e-1.
    fn tolerance(kv_type: KvType) -> f64 {
        match kv_type {
            KvType::F32 => 1e-5,
            KvType::F16 => 2e-3,
            KvType::Q8_0 => 2e-2,
        }
    }

    const KV_TYPES: [KvType; 3] = [KvType::F32, KvType::F16, KvType::Q8_0];

    /// Max |Δ| of the cache's outputs against the oracle, and the tolerance of `kv_type`. A
    /// type that cannot hold the case's heads (q8_0: 16 values, half a block) runs it with
    /// heads of 32.
    fn run(case: &Case, style: RopeStyle, kv_type: KvType) -> f64 {
        let hd = if kv_type.holds_rows_of(case.hd) {
            case.hd
        } else {
            super::super::kv_store::Q8_BLOCK
        };
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
        let mut cache = HostLayerCache::new(LayerGeometry::full(params, case.kv, hd), kv_type);
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

    /// Oracle test 1 of docs/ALGORITHM.md (§4).
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
                                hd: 16,
                            };
                            let style = if checked % 2 == 0 {
                                RopeStyle::Neox
                            } else {
                                RopeStyle::Interleaved
                            };
                            for kv_type in KV_TYPES {
                                let err = run(&case, style, kv_type);
                                assert!(
                                    err <= tolerance(kv_type),
                                    "{kv_type} T={t} chunk={chunk} G={g} L={l} D={d:?} heads={heads}/{kv}: max |Δ| = {err}"
                                );
                            }
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
            hd: 16,
        };
        for kv_type in KV_TYPES {
            let err = run(&case, RopeStyle::Neox, kv_type);
            assert!(err <= tolerance(kv_type), "{kv_type}: max |Δ| = {err}");
        }
    }

    /// 64-dimensional heads take the kernels' register-blocked value pass (with AVX-512).
    #[test]
    fn heads_of_64_match_the_reference() {
        let case = Case {
            t: 300,
            chunk: 1,
            g: 4,
            l: 100,
            d: None,
            heads: 6,
            kv: 2,
            hd: 64,
        };
        for kv_type in KV_TYPES {
            for chunk in [1, 64] {
                let err = run(&Case { chunk, ..case }, RopeStyle::Neox, kv_type);
                assert!(
                    err <= tolerance(kv_type),
                    "{kv_type} chunk {chunk}: max |Δ| = {err}"
                );
            }
        }
    }

    /// Oracle test 3: the cache holds exactly min(T, G + L) entries and stops allocating.
    #[test]
    fn bounded_after_100k_tokens_without_reallocation() {
        let params = LambdaParams::new(4, 64, None).unwrap();
        let (hd, kv) = (8, 1);
        let mut cache = HostLayerCache::new(LayerGeometry::full(params, kv, hd), KvType::F32);
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
                // Exactly G + L slots of K and V (f32) and their positions: no slack.
                assert_eq!(cache.bytes(), (4 + 64) * 2 * hd * 4 + (4 + 64) * 8);
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

    /// Decoding with one KV head (fewer rows than cores) splits each row's keys across the
    /// cores once the ring is long enough, and merges them into one softmax: against the
    /// oracle, sinks at the clamped distance included.
    #[test]
    fn split_decode_rows_match_the_reference() {
        let case = Case {
            t: 700,
            chunk: 1,
            g: 4,
            l: 400,
            d: Some(200),
            heads: 4,
            kv: 1,
            hd: 16,
        };
        for kv_type in KV_TYPES {
            let err = run(&case, RopeStyle::Neox, kv_type);
            assert!(err <= tolerance(kv_type), "{kv_type}: max |Δ| = {err}");
        }
        // The split did happen (on any machine with two cores or more).
        let params = LambdaParams::new(case.g, case.l, case.d).unwrap();
        let mut cache = HostLayerCache::new(LayerGeometry::full(params, 1, 16), KvType::F32);
        let rope = Rope::new(16, 10_000.0, RopeStyle::Neox);
        let mut rng = StdRng::seed_from_u64(5);
        let x = random(&mut rng, SPLIT_MIN_KEYS * 16);
        let input = AttentionInput {
            q: &x,
            k: &x,
            v: &x,
            n_tokens: SPLIT_MIN_KEYS,
            n_heads: 1,
            rope: &rope,
            scale: 1.0,
        };
        cache.attend(&input).unwrap();
        let cores = pool_threads();
        assert_eq!(cache.split_parts(1), (cores > 1).then_some(cores));
    }

    /// Prefill chunks attend as matrix products over blocks of 512 keys with an online softmax:
    /// windows and sink stores longer than one key block, chunks of several token blocks, and a
    /// clamped distance, against the oracle.
    #[test]
    fn blocked_prefill_over_many_key_blocks_matches_the_reference() {
        for (t, chunk, g, l, d) in [(1400, 300, 3, 1100, Some(700)), (1300, 250, 600, 700, None)] {
            let case = Case {
                t,
                chunk,
                g,
                l,
                d,
                heads: 6,
                kv: 2,
                hd: 16,
            };
            for kv_type in KV_TYPES {
                let err = run(&case, RopeStyle::Neox, kv_type);
                assert!(
                    err <= tolerance(kv_type),
                    "{kv_type} T={t} chunk={chunk} G={g} L={l}: max |Δ| = {err}"
                );
            }
        }
    }

    /// The two kernels (per row for decoding, blocked for prefill) report the same entropies.
    #[test]
    fn blocked_and_per_row_entropies_agree() {
        let (hd, heads, kv, t) = (16, 4, 2, 1200);
        let params = LambdaParams::new(4, 900, None).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let q = random(&mut rng, t * heads * hd);
        let k: Vec<f32> = random(&mut rng, t * kv * hd)
            .iter()
            .map(|x| x * 2.0)
            .collect();
        let v = random(&mut rng, t * kv * hd);
        let rope = Rope::new(hd, 10_000.0, RopeStyle::Neox);
        let entropies = |chunk: usize| {
            let mut cache = HostLayerCache::new(LayerGeometry::full(params, kv, hd), KvType::F32);
            cache.set_entropy(true);
            let mut all = Vec::new();
            for start in (0..t).step_by(chunk) {
                let n = chunk.min(t - start);
                let input = AttentionInput {
                    q: &q[start * heads * hd..(start + n) * heads * hd],
                    k: &k[start * kv * hd..(start + n) * kv * hd],
                    v: &v[start * kv * hd..(start + n) * kv * hd],
                    n_tokens: n,
                    n_heads: heads,
                    rope: &rope,
                    scale: 0.25,
                };
                cache.attend(&input).unwrap();
                all.extend_from_slice(cache.last_entropy());
            }
            all
        };
        let (blocked, per_row) = (entropies(400), entropies(1));
        assert_eq!(blocked.len(), t);
        let worst = blocked
            .iter()
            .zip(&per_row)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "entropies differ by {worst}");
        // Past the window the entropy stops growing (the test's own sanity: it is not constant).
        assert!(blocked[100] < blocked[1100]);
    }

    /// Feeds `tokens` single-token passes of one constant head (`head_dim` 2) to `layers` layers.
    fn feed_constant(cache: &mut HostCache, layers: usize, tokens: usize) {
        let rope = Rope::new(2, 10_000.0, RopeStyle::Neox);
        let x = [0.5f32, -0.5];
        for _ in 0..tokens {
            let input = AttentionInput {
                q: &x,
                k: &x,
                v: &x,
                n_tokens: 1,
                n_heads: 1,
                rope: &rope,
                scale: 1.0,
            };
            for layer in 0..layers {
                cache.attend(layer, &input).unwrap();
            }
            cache.advance(1);
        }
    }

    #[test]
    fn stats_split_attended_and_evicted() {
        let params = LambdaParams::new(2, 4, None).unwrap();
        let mut cache = HostCache::new(params, vec![LayerGeometry::full(params, 1, 2)]);
        feed_constant(&mut cache, 1, 10);
        let s = cache.stats();
        // The 11th token sees tokens 7..=9 in its window (plus itself) and the 2 sinks.
        assert_eq!(s.tokens_seen, 10);
        assert_eq!(s.attended_window, 3);
        assert_eq!(s.attended_global, 2);
        assert_eq!(s.evicted, 5);
        assert_eq!(s.slots_in_use, 6);
        assert_eq!(s.slot_capacity, 6);
    }

    /// With zero queries every visible key scores the same, so each token's attention is uniform
    /// over what the rule lets it see and its entropy is ln(visible keys): the count checks the
    /// mask (window, then the clamped sink), the value checks the formula.
    #[test]
    fn entropy_is_ln_of_the_visible_keys_under_uniform_attention() {
        let params = LambdaParams::new(1, 4, None).unwrap();
        let mut cache = HostCache::new(params, vec![LayerGeometry::full(params, 1, 2); 2]);
        cache.set_entropy(true);
        let rope = Rope::new(2, 10_000.0, RopeStyle::Neox);
        let (q, kv) = (vec![0f32; 14], vec![0.25f32; 14]);
        let input = |n: usize, from: usize| AttentionInput {
            q: &q[..2 * n],
            k: &kv[2 * from..2 * (from + n)],
            v: &kv[2 * from..2 * (from + n)],
            n_tokens: n,
            n_heads: 1,
            rope: &rope,
            scale: 1.0,
        };
        let mut seen = Vec::new();
        for (n, from) in [(5, 0), (2, 5)] {
            for layer in 0..2 {
                cache.attend(layer, &input(n, from)).unwrap();
            }
            cache.advance(n);
            let per_layer = cache.entropies();
            assert_eq!(per_layer[0], per_layer[1]);
            seen.extend_from_slice(per_layer[0]);
        }
        // Tokens 0..3 see 1..4 keys; from token 4 on, the window's 4 and the clamped sink.
        let visible = [1, 2, 3, 4, 5, 5, 5];
        for (h, v) in seen.iter().zip(visible) {
            assert!((h - (v as f32).ln()).abs() < 1e-5, "{seen:?}");
        }
        cache.set_entropy(false);
        assert!(cache.entropies().iter().all(|e| e.is_empty()));
    }

    /// The probe no longer costs one-KV-head models their split decode: a split row reports
    /// the same probabilities as a whole one.
    #[test]
    fn a_split_row_reports_the_probabilities_of_a_whole_one() {
        let params = LambdaParams::new(3, 400, Some(200)).unwrap();
        let geometry = vec![LayerGeometry::full(params, 1, 16)];
        let mut rng = StdRng::seed_from_u64(11);
        let steps: Vec<Vec<f32>> = (0..520).map(|_| random(&mut rng, 16)).collect();
        let shares = |split: bool| {
            let mut cache = HostCache::new(params, geometry.clone());
            cache.set_probe(true);
            let rope = Rope::new(16, 10_000.0, RopeStyle::Neox);
            for x in &steps {
                // Entropy keeps rows whole: the reference.
                cache.layers[0].entropy = !split;
                let input = AttentionInput {
                    q: &x[..],
                    k: x,
                    v: x,
                    n_tokens: 1,
                    n_heads: 1,
                    rope: &rope,
                    scale: 0.25,
                };
                cache.layers[0].attend(&input).unwrap();
            }
            if split {
                let cores = pool_threads();
                assert_eq!(cache.layers[0].split_parts(1), (cores > 1).then_some(cores));
            }
            cache.attention_shares()
        };
        let (whole, split) = (shares(false), shares(true));
        assert_eq!(whole.len(), split.len());
        for (w, s) in whole.iter().zip(&split) {
            assert_eq!(w.0, s.0);
            assert!((w.1 - s.1).abs() < 1e-5, "{w:?} {s:?}");
        }
        let total: f32 = split.iter().map(|s| s.1).sum();
        assert!((total - 1.0).abs() < 1e-4, "{total}");
    }

    #[test]
    fn probe_reports_the_attention_distribution() {
        let params = LambdaParams::new(1, 4, None).unwrap();
        let mut cache = HostCache::new(params, vec![LayerGeometry::full(params, 1, 2); 2]);
        cache.set_probe(true);
        feed_constant(&mut cache, 2, 6);
        // Token 5 saw the sink 0 (clamped) and the window 2..=5.
        let shares = cache.attention_shares();
        let positions: Vec<u64> = shares.iter().map(|s| s.0).collect();
        assert_eq!(positions, [0, 2, 3, 4, 5]);
        let total: f32 = shares.iter().map(|s| s.1).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }

    #[test]
    fn rejects_bad_shapes() {
        let params = LambdaParams::new(0, 4, None).unwrap();
        let mut cache = HostLayerCache::new(LayerGeometry::full(params, 2, 4), KvType::F32);
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
