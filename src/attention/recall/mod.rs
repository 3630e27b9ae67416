//! Recall of evicted context (docs/ALGORITHM.md §10): the tokens that left the Λ go to an
//! evicted-KV store on disk ([`store`]), each block of them summarized by a digest in RAM
//! ([`digest`]); every few steps each recalling layer scores the blocks against its current
//! query and attends to the best `k` as a third branch of the same softmax, at the clamped
//! distance `D` like the sinks. RAM holds the window, the digests, a fixed block cache and the
//! `k` recalled blocks per layer, whatever the conversation's length.

mod digest;
mod store;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use digest::{LayerDigests, top_k};
pub use store::{BlockKv, EvictedStore, KvType, StoreError, StoreShape};

use super::{AttentionInput, LayerGeometry};

/// How recall behaves: what the `--recall-*` flags set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecallParams {
    /// Blocks each layer recalls (`k`).
    pub blocks: usize,
    /// The first layer that recalls (LM-Infinite's later version: from layer 4 up).
    pub from_layer: usize,
    /// Generated tokens between two choices of blocks (a prefill chunk always chooses).
    pub every: usize,
    /// Tokens per block (`B`).
    pub block_tokens: usize,
    /// Bytes of the block cache.
    pub cache_bytes: usize,
    pub kv_type: KvType,
}

impl Default for RecallParams {
    fn default() -> Self {
        Self {
            blocks: 8,
            from_layer: 4,
            every: 16,
            block_tokens: 64,
            cache_bytes: 32 << 20,
            kv_type: KvType::F16,
        }
    }
}

/// The last queries whose scores add up to choose the blocks: a question's words, not only its
/// final token (a chat prompt ends with template tokens that ask for nothing).
const VOTING_QUERIES: usize = 16;

/// Most blocks a layer may recall: 256 blocks of 64 tokens is four times a 4K window.
pub const MAX_BLOCKS: usize = 256;
/// Largest block cache, in MiB.
pub const MAX_CACHE_MIB: usize = 4096;

/// Recall settings that cannot work, named by the flag that sets them.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecallParamsError {
    #[error("--recall-blocks must be 1 to {MAX_BLOCKS}, not {0} (--recall off turns recall off)")]
    Blocks(usize),
    #[error("--recall-every must be at least 1")]
    Every,
    #[error("--recall-cache-mib must be at most {MAX_CACHE_MIB}, not {0}")]
    CacheMib(usize),
    #[error(
        "--recall-from-layer {from}: no layer from there on can recall (the model has {layers} \
         layers{sliding})"
    )]
    FromLayer {
        from: usize,
        layers: usize,
        sliding: &'static str,
    },
}

impl RecallParams {
    /// The defaults with the given settings over them, checked.
    pub fn new(
        blocks: Option<usize>,
        from_layer: Option<usize>,
        every: Option<usize>,
        cache_mib: Option<usize>,
    ) -> Result<Self, RecallParamsError> {
        let d = Self::default();
        let blocks = blocks.unwrap_or(d.blocks);
        if !(1..=MAX_BLOCKS).contains(&blocks) {
            return Err(RecallParamsError::Blocks(blocks));
        }
        let every = every.unwrap_or(d.every);
        if every == 0 {
            return Err(RecallParamsError::Every);
        }
        let cache_bytes = match cache_mib {
            Some(m) if m > MAX_CACHE_MIB => return Err(RecallParamsError::CacheMib(m)),
            Some(m) => m << 20,
            None => d.cache_bytes,
        };
        Ok(Self {
            blocks,
            from_layer: from_layer.unwrap_or(d.from_layer),
            every,
            cache_bytes,
            ..d
        })
    }

    /// Checks that some layer of a model of `layers` recalls: one with a global branch
    /// (sliding-window layers never recall) from `from_layer` on.
    pub fn check_layers(&self, layers: &[LayerGeometry]) -> Result<(), RecallParamsError> {
        if layers.iter().skip(self.from_layer).any(|g| g.pinnable) {
            return Ok(());
        }
        Err(RecallParamsError::FromLayer {
            from: self.from_layer,
            layers: layers.len(),
            sliding: if layers.iter().any(|g| !g.pinnable) {
                ", some of them sliding-window layers, which never recall"
            } else {
                ""
            },
        })
    }
}

/// The blocks one layer attends to now, decoded: keys unrotated `[slot][kv_head][dim]`.
#[derive(Debug, Clone, Default)]
pub struct Recalled {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    pub positions: Vec<u64>,
    /// `(block, score)` of each block, best first.
    pub blocks: Vec<(u64, f32)>,
}

impl Recalled {
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// Recall's state at a rewind point.
#[derive(Debug, Clone)]
struct Mark {
    /// Tokens stored.
    stored: u64,
    last_refresh: Option<u64>,
    recalled: Vec<Arc<Recalled>>,
    voters: Vec<VecDeque<Vec<f32>>>,
}

/// What recall did, for the status bar and `bench`.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RecallStats {
    /// Tokens the next query attends through recall (in the first recalling layer).
    pub recalled_tokens: u64,
    /// Tokens in the evicted store.
    pub stored_tokens: u64,
    pub file_bytes: u64,
    pub bytes_written: u64,
    /// Bytes of the digests, the block cache and the recalled blocks, in RAM.
    pub ram_bytes: u64,
    pub refreshes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

/// One conversation's recall: its store, digests and the blocks each layer recalls.
pub struct Recall {
    params: RecallParams,
    path: PathBuf,
    /// Created at the first evicted token (a conversation that never leaves its window never
    /// writes a file).
    store: Option<EvictedStore>,
    /// For each cache layer, its index among the stored layers (`None`: it does not recall).
    slot: Vec<Option<usize>>,
    geometry: Vec<LayerGeometry>,
    digests: Vec<LayerDigests>,
    /// Shared, so a rewind point keeps the blocks chosen when it was set without a copy.
    recalled: Vec<Arc<Recalled>>,
    /// Per stored layer, the last queries (rotated to `D`, summed per KV group) that choose.
    voters: Vec<VecDeque<Vec<f32>>>,
    /// Position of the last pass that chose blocks.
    last_refresh: Option<u64>,
    refreshes: u64,
    /// What the cache's rewind point goes back to.
    /// Rewind points, the last set last.
    marks: Vec<Mark>,
    /// The first I/O error, kept for the caller (recall stops; attention goes on without it).
    failure: Option<String>,
}

impl std::fmt::Debug for Recall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recall")
            .field("params", &self.params)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Recall {
    /// Recall for a cache of `layers`, its store a temporary file at `path`. Layers with a
    /// global branch from `params.from_layer` on recall; sliding layers never.
    fn new(params: RecallParams, layers: &[LayerGeometry], path: PathBuf) -> Self {
        let mut next = 0;
        let slot: Vec<Option<usize>> = layers
            .iter()
            .enumerate()
            .map(|(i, g)| {
                (g.pinnable && i >= params.from_layer).then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        let geometry: Vec<LayerGeometry> = slot
            .iter()
            .zip(layers)
            .filter(|(s, _)| s.is_some())
            .map(|(_, g)| *g)
            .collect();
        Self {
            params,
            path,
            store: None,
            digests: vec![LayerDigests::default(); geometry.len()],
            recalled: vec![Arc::default(); geometry.len()],
            voters: vec![VecDeque::new(); geometry.len()],
            slot,
            geometry,
            last_refresh: None,
            refreshes: 0,
            marks: Vec::new(),
            failure: None,
        }
    }

    /// Recall whose store is a fresh temporary file in `dir`, named by the process and a
    /// counter (on Unix the name is gone once the file is open: a killed process leaves
    /// nothing behind).
    pub fn temporary_in(params: RecallParams, layers: &[LayerGeometry], dir: &Path) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("recall-{}-{n}.lkv", std::process::id());
        Self::new(params, layers, dir.join(name))
    }

    /// Whether cache layer `layer` keeps its evicted tokens and recalls.
    pub fn recalls(&self, layer: usize) -> bool {
        self.slot.get(layer).copied().flatten().is_some()
    }

    /// Whether the pass of `n_tokens` at `position` chooses blocks anew.
    pub fn due(&self, position: u64, n_tokens: usize) -> bool {
        // Every layer of a pass chooses: the first one sets `last_refresh` to this position.
        n_tokens > 1
            || self
                .last_refresh
                .is_none_or(|last| last == position || position >= last + self.params.every as u64)
    }

    /// The blocks cache layer `layer` attends to now (empty when it does not recall).
    pub fn recalled(&self, layer: usize) -> Option<&Recalled> {
        self.slot
            .get(layer)
            .copied()
            .flatten()
            .map(|s| self.recalled[s].as_ref())
    }

    /// Hears the pass of `input` in layer `layer`: its last queries, rotated to `D` (recalled
    /// keys are seen at the clamped distance), each KV group's heads summed, join the voters
    /// that choose the layer's blocks (the last [`VOTING_QUERIES`] of the conversation).
    pub fn listen(&mut self, layer: usize, input: &AttentionInput<'_>) {
        let Some(s) = self.slot.get(layer).copied().flatten() else {
            return;
        };
        let g = self.geometry[s];
        let (n_kv, hd) = (g.n_kv_heads, g.head_dim);
        let width = input.n_heads * hd;
        let rows = input.n_tokens.saturating_sub(VOTING_QUERIES)..input.n_tokens;
        let mut q = input.q[rows.start * width..rows.end * width].to_vec();
        input
            .rope
            .rotate_rows(&mut q, input.n_heads, hd, |_| g.distance_limit);
        let group = input.n_heads / n_kv;
        let voters = &mut self.voters[s];
        for row in q.chunks_exact(width) {
            let mut summed = vec![0f32; n_kv * hd];
            for (h, head) in row.chunks_exact(hd).enumerate() {
                let kv = h / group;
                for (s, x) in summed[kv * hd..(kv + 1) * hd].iter_mut().zip(head) {
                    *s += x;
                }
            }
            if voters.len() == VOTING_QUERIES {
                voters.pop_front();
            }
            voters.push_back(summed);
        }
    }

    /// Chooses layer `layer`'s blocks at `position`: each voter's digest bounds summed per
    /// block, the best `k` read. Positions in `exclude` (the layer's global store: pinned
    /// tokens) are left out, so no key is counted twice.
    pub fn refresh(&mut self, layer: usize, position: u64, exclude: &[u64]) {
        let Some(s) = self.slot.get(layer).copied().flatten() else {
            return;
        };
        self.last_refresh = Some(position);
        let Some(store) = self.store.as_mut() else {
            return;
        };
        if s == 0 {
            self.refreshes += 1;
        }
        let g = self.geometry[s];
        let (n_kv, hd) = (g.n_kv_heads, g.head_dim);
        let mut scores: Vec<f32> = Vec::new();
        for summed in &self.voters[s] {
            let voter = self.digests[s].scores(summed, n_kv, hd);
            if scores.is_empty() {
                scores = voter;
            } else {
                scores.iter_mut().zip(voter).for_each(|(t, x)| *t += x);
            }
        }
        let chosen = top_k(&scores, self.params.blocks);
        let row = store.shape().row;
        let read: Result<Vec<BlockKv>, StoreError> = chosen
            .iter()
            .map(|&block| store.read(block as u64, s))
            .collect();
        let blocks = match read {
            Ok(blocks) => blocks,
            Err(e) => return self.stop(e),
        };
        let mut recalled = Recalled::default();
        for (kv, &block) in blocks.iter().zip(&chosen) {
            for (t, &pos) in kv.positions.iter().enumerate() {
                if !exclude.contains(&pos) {
                    recalled.positions.push(pos);
                    recalled
                        .keys
                        .extend_from_slice(&kv.keys[t * row..(t + 1) * row]);
                    recalled
                        .values
                        .extend_from_slice(&kv.values[t * row..(t + 1) * row]);
                }
            }
            recalled.blocks.push((block as u64, scores[block]));
        }
        self.recalled[s] = Arc::new(recalled);
    }

    /// Hands layer `layer`'s evicted tokens (`positions`, unrotated keys and values, `row`
    /// floats each) to the store.
    pub fn evicted(&mut self, layer: usize, positions: &[u64], keys: &[f32], values: &[f32]) {
        let Some(s) = self.slot.get(layer).copied().flatten() else {
            return;
        };
        if positions.is_empty() || self.failure.is_some() {
            return;
        }
        if self.store.is_none() {
            let g = self.geometry[s];
            let shape = StoreShape {
                block_tokens: self.params.block_tokens,
                layers: self.geometry.len(),
                row: g.n_kv_heads * g.head_dim,
                kv_type: self.params.kv_type,
            };
            match EvictedStore::create(&self.path, shape, self.params.cache_bytes, true) {
                Ok(store) => self.store = Some(store),
                Err(e) => return self.stop(e),
            }
        }
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let row = store.shape().row;
        for (t, &pos) in positions.iter().enumerate() {
            store.push(
                s,
                pos,
                &keys[t * row..(t + 1) * row],
                &values[t * row..(t + 1) * row],
            );
        }
    }

    /// After a forward through every layer: writes the completed blocks and digests them.
    pub fn flush(&mut self) {
        let Some(store) = self.store.as_mut() else {
            return;
        };
        match store.flush() {
            Ok(blocks) => {
                for block in blocks {
                    for (s, keys) in block.iter().enumerate() {
                        let g = self.geometry[s];
                        self.digests[s].push(keys, g.n_kv_heads, g.head_dim);
                    }
                }
            }
            Err(e) => self.stop(e),
        }
    }

    /// The first failure of the store, if any: recall stopped there.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Stops recall for good after a failure of the store (a full disk, an unreadable block):
    /// the store and what it chose go, the attention goes on as Λ alone, the failure stays
    /// for the caller to report.
    fn stop(&mut self, e: StoreError) {
        tracing::warn!("recall stopped: {e}");
        self.failure.get_or_insert(e.to_string());
        self.store = None;
        self.marks.clear();
        self.digests
            .iter_mut()
            .for_each(|d| *d = LayerDigests::default());
        self.recalled.iter_mut().for_each(|r| *r = Arc::default());
    }

    /// Remembers how much is stored and what each layer recalls, for [`Self::rewind`].
    pub fn mark(&mut self) {
        self.marks.push(Mark {
            stored: self.store.as_ref().map_or(0, EvictedStore::len),
            last_refresh: self.last_refresh,
            recalled: self.recalled.clone(),
            voters: self.voters.clone(),
        });
    }

    /// Forgets what was stored since [`Self::mark`]: those tokens are back in the window.
    pub fn rewind(&mut self) {
        let Some(mark) = self.marks.pop() else { return };
        // The passes after the mark go as they went the first time: the same blocks, chosen
        // again at the same positions.
        self.recalled = mark.recalled;
        self.voters = mark.voters;
        self.last_refresh = mark.last_refresh;
        let len = mark.stored;
        let Some(store) = self.store.as_mut() else {
            return;
        };
        if let Err(e) = store.truncate(len) {
            return self.stop(e);
        }
        let blocks = store.blocks();
        for (s, d) in self.digests.iter_mut().enumerate() {
            let g = self.geometry[s];
            d.truncate(blocks as usize, g.n_kv_heads, g.head_dim);
        }
    }

    /// Makes the next pass choose blocks, whatever the interval.
    pub fn choose_again(&mut self) {
        self.last_refresh = None;
    }

    pub fn forget_mark(&mut self) {
        self.marks.pop();
    }

    pub fn forget_marks(&mut self) {
        self.marks.clear();
    }

    /// The blocks the first recalling layer attends to now (what the status bar counts).
    pub fn first_recalled(&self) -> Option<&Recalled> {
        self.recalled.first().map(Arc::as_ref)
    }

    /// Counts for the status bar, recalled tokens those of the first recalling layer.
    pub fn stats(&self) -> RecallStats {
        let store = self.store.as_ref();
        let (cache_used, _) = store.map_or((0, 0), EvictedStore::cache_bytes);
        let (hits, misses) = store.map_or((0, 0), EvictedStore::cache_hits_and_misses);
        let recalled_ram: usize = self
            .recalled
            .iter()
            .map(|r| 4 * (r.keys.capacity() + r.values.capacity()) + 8 * r.positions.capacity())
            .sum();
        let digest_ram: usize = self.digests.iter().map(LayerDigests::bytes).sum();
        RecallStats {
            recalled_tokens: self.first_recalled().map_or(0, |r| r.len() as u64),
            stored_tokens: store.map_or(0, EvictedStore::len),
            file_bytes: store.map_or(0, EvictedStore::file_bytes),
            bytes_written: store.map_or(0, EvictedStore::bytes_written),
            ram_bytes: (cache_used + recalled_ram + digest_ram) as u64,
            refreshes: self.refreshes,
            cache_hits: hits,
            cache_misses: misses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{
        AttentionCache, HostCache, LambdaParams, Rope, RopeStyle,
        reference_lambda_attention_recalled,
    };
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// Runs `t` tokens through a one-layer cache with recall, in `chunks` (repeated), and
    /// returns the largest difference from the oracle given the blocks each pass chose, and how
    /// many rows attended to recalled tokens.
    fn against_oracle(
        t: usize,
        chunks: &[usize],
        d: Option<u64>,
        style: RopeStyle,
    ) -> (f64, usize) {
        let (heads, kv, hd) = (4, 2, 16);
        let params = LambdaParams::new(2, 16, d).unwrap();
        let mut rng = StdRng::seed_from_u64(t as u64 * 13 + chunks.len() as u64);
        let q = random(&mut rng, t * heads * hd, 1.0);
        // Large keys make the softmax peaky: a block attended wrongly shows as a large error.
        let k = random(&mut rng, t * kv * hd, 3.0);
        let v = random(&mut rng, t * kv * hd, 1.0);
        let rope = Rope::new(hd, 10_000.0, style);
        let scale = 1.0 / (hd as f32).sqrt();
        let geometry = LayerGeometry::full(params, kv, hd);
        let mut cache = HostCache::new(params, vec![geometry]);
        let dir = tempfile::tempdir().unwrap();
        let recall_params = RecallParams {
            blocks: 2,
            from_layer: 0,
            every: 3,
            block_tokens: 4,
            // Two blocks of one layer: the cache evicts, so reads come from the file too.
            cache_bytes: 2 * 4 * 2 * kv * hd * 4,
            kv_type: KvType::F32,
        };
        cache.set_recall(Recall::temporary_in(recall_params, &[geometry], dir.path()));
        let mut sets: Vec<Vec<u64>> = Vec::new();
        let mut got = Vec::new();
        let mut start = 0;
        for &chunk in chunks.iter().cycle() {
            if start >= t {
                break;
            }
            let n = chunk.min(t - start);
            let input = AttentionInput {
                q: &q[start * heads * hd..(start + n) * heads * hd],
                k: &k[start * kv * hd..(start + n) * kv * hd],
                v: &v[start * kv * hd..(start + n) * kv * hd],
                n_tokens: n,
                n_heads: heads,
                rope: &rope,
                scale,
            };
            got.extend(cache.attend(0, &input).unwrap());
            let chosen = cache
                .recall()
                .unwrap()
                .recalled(0)
                .unwrap()
                .positions
                .clone();
            sets.extend(std::iter::repeat_n(chosen, n));
            cache.advance(n);
            start += n;
        }
        let recall = cache.recall().unwrap();
        assert!(recall.failure().is_none(), "{:?}", recall.failure());
        // Everything past the sinks that left the window is stored, in whole blocks.
        let evicted = t.saturating_sub(2 + 16) as u64;
        assert_eq!(recall.stats().stored_tokens, evicted / 4 * 4);
        let expected = reference_lambda_attention_recalled(
            &q,
            &k,
            &v,
            t,
            heads,
            kv,
            hd,
            params,
            &|i| sets[i].clone(),
            &rope,
            scale,
        );
        let err = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        (err, sets.iter().filter(|s| !s.is_empty()).count())
    }

    /// A cache with recall (F32 store, blocks of 4) over one layer of 2 KV heads.
    fn recalling_cache(dir: &Path) -> (HostCache, Rope) {
        let params = LambdaParams::new(2, 16, None).unwrap();
        let geometry = LayerGeometry::full(params, 2, 16);
        let mut cache = HostCache::new(params, vec![geometry]);
        let recall = RecallParams {
            blocks: 2,
            from_layer: 0,
            every: 3,
            block_tokens: 4,
            cache_bytes: 1 << 20,
            kv_type: KvType::F32,
        };
        cache.set_recall(Recall::temporary_in(recall, &[geometry], dir));
        (cache, Rope::new(16, 10_000.0, RopeStyle::Neox))
    }

    /// Feeds `tokens` random tokens (seeded by `seed`) one by one; returns the outputs.
    fn feed(cache: &mut HostCache, rope: &Rope, seed: u64, tokens: usize) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        for _ in 0..tokens {
            let q = random(&mut rng, 4 * 16, 1.0);
            let k = random(&mut rng, 2 * 16, 3.0);
            let v = random(&mut rng, 2 * 16, 1.0);
            let input = AttentionInput {
                q: &q,
                k: &k,
                v: &v,
                n_tokens: 1,
                n_heads: 4,
                rope,
                scale: 0.25,
            };
            out.extend(cache.attend(0, &input).unwrap());
            cache.advance(1);
        }
        out
    }

    /// A rewound reply takes its evicted tokens out of the store: what follows is what it
    /// would have been without the reply (the `/regen` path).
    #[test]
    fn a_rewind_forgets_what_the_discarded_passes_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut straight, rope) = recalling_cache(dir.path());
        feed(&mut straight, &rope, 1, 61);
        let expected = feed(&mut straight, &rope, 3, 30);
        let (mut detour, _) = recalling_cache(dir.path());
        feed(&mut detour, &rope, 1, 61);
        detour.mark();
        // 29 tokens: the store's cut falls inside a written block.
        feed(&mut detour, &rope, 2, 29);
        assert!(detour.rewind());
        let got = feed(&mut detour, &rope, 3, 30);
        assert_eq!(got, expected);
        let (a, b) = (detour.recall_stats(), straight.recall_stats());
        assert_eq!(
            (a.stored_tokens, a.file_bytes, a.recalled_tokens),
            (b.stored_tokens, b.file_bytes, b.recalled_tokens)
        );
    }

    /// A store that cannot be created (its folder is a file) stops recall with a reason; the
    /// attention goes on as Λ alone.
    #[test]
    fn a_failed_store_stops_recall_and_leaves_lambda() {
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("not-a-folder");
        std::fs::write(&blocked, b"").unwrap();
        let (mut failing, rope) = recalling_cache(&blocked);
        let params = LambdaParams::new(2, 16, None).unwrap();
        let mut plain = HostCache::new(params, vec![LayerGeometry::full(params, 2, 16)]);
        let got = feed(&mut failing, &rope, 5, 60);
        let expected = feed(&mut plain, &rope, 5, 60);
        assert_eq!(got, expected);
        let failure = failing.recall().unwrap().failure().unwrap().to_string();
        assert!(failure.contains("not-a-folder"), "{failure}");
        assert_eq!(failing.recall_stats().stored_tokens, 0);
    }

    /// Oracle test of docs/ALGORITHM.md §10: with the blocks the cache chose, the output is the
    /// dense oracle's, whatever the chunking (single-token steps split keys across cores;
    /// long chunks attend as matrix products).
    #[test]
    fn recall_matches_the_oracle_given_the_chosen_blocks() {
        let cases: [(&[usize], Option<u64>); 4] = [
            (&[1], None),
            (&[7, 1, 1, 1], Some(5)),
            (&[40, 1, 3], None),
            (&[64, 64, 1], Some(9)),
        ];
        for (i, (chunks, d)) in cases.into_iter().enumerate() {
            let style = [RopeStyle::Neox, RopeStyle::Interleaved][i % 2];
            let (err, recalled_rows) = against_oracle(150, chunks, d, style);
            assert!(err <= 1e-5, "chunks {chunks:?} D={d:?}: max |Δ| = {err}");
            assert!(
                recalled_rows > 50,
                "chunks {chunks:?}: only {recalled_rows} rows recalled"
            );
        }
    }
}
