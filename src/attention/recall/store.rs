//! The evicted-KV store: every token that left the Λ (past the sinks), its keys unrotated and
//! its values, in an append-only file of fixed-size blocks, read back by positioned reads
//! through a block cache of fixed size. RAM holds one partial block per layer and the cache;
//! the file holds the rest, so a conversation's RAM does not grow with its length.
//!
//! Layout: a 64-byte header, then block `b` (the store's tokens `b·B .. (b+1)·B`, in the order
//! they left) at `64 + b · block_bytes`; inside a block, per stored layer, the tokens' positions
//! (u64; a re-read conversation skips positions, so they are not implied), their keys
//! `[token][kv_head][dim]`, then their values, each key and value in the store's [`KvType`].
//! One layer of one block is one contiguous read. The whole file is never mapped.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::f16;

/// Bytes before the first block.
const HEADER_BYTES: u64 = 64;
const MAGIC: &[u8; 8] = b"LCRECALL";
const VERSION: u32 = 1;

/// How the store keeps each key and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    /// Half precision: half the bytes of the cache's f32 (the default).
    F16,
    /// Exact: for the tests that hold recall to the oracle.
    F32,
}

impl KvType {
    fn bytes(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }

    fn tag(self) -> u32 {
        match self {
            KvType::F16 => 1,
            KvType::F32 => 2,
        }
    }

    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            KvType::F16 => out.extend(values.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes())),
            KvType::F32 => out.extend(values.iter().flat_map(|x| x.to_le_bytes())),
        }
    }

    fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            KvType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            KvType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
        }
    }
}

/// The evicted-KV store's failures: the disk's, reported to the caller, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("recall store {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Shape of what is stored: the same for every block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreShape {
    /// Tokens per block (`B`).
    pub block_tokens: usize,
    /// Layers stored (those that recall).
    pub layers: usize,
    /// Floats of one token's keys in one layer: KV heads × head dim.
    pub row: usize,
    pub kv_type: KvType,
}

impl StoreShape {
    /// Bytes of the positions of one layer of one block.
    fn positions_bytes(&self) -> usize {
        8 * self.block_tokens
    }

    /// Bytes of the keys (or the values) of one layer of one block.
    fn half_bytes(&self) -> usize {
        self.block_tokens * self.row * self.kv_type.bytes()
    }

    /// Bytes of one layer of one block: positions, keys, values.
    fn layer_bytes(&self) -> usize {
        self.positions_bytes() + 2 * self.half_bytes()
    }

    fn block_bytes(&self) -> u64 {
        (self.layers * self.layer_bytes()) as u64
    }

    fn block_offset(&self, block: u64) -> u64 {
        HEADER_BYTES + block * self.block_bytes()
    }
}

/// One layer of one block, decoded: positions, keys `[token][row]` (unrotated) and values.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockKv {
    pub positions: Vec<u64>,
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

impl BlockKv {
    fn decode(bytes: &[u8], shape: &StoreShape) -> Self {
        let (pos, kv) = bytes.split_at(shape.positions_bytes());
        let (k, v) = kv.split_at(shape.half_bytes());
        let mut out = Self {
            positions: pos
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .collect(),
            keys: Vec::with_capacity(shape.block_tokens * shape.row),
            values: Vec::with_capacity(shape.block_tokens * shape.row),
        };
        shape.kv_type.decode(k, &mut out.keys);
        shape.kv_type.decode(v, &mut out.values);
        out
    }
}

/// A fixed budget of recently read blocks (least recently used leaves first).
struct BlockCache {
    budget: usize,
    used: usize,
    clock: u64,
    entries: HashMap<(u64, usize), (u64, Vec<u8>)>,
    by_age: BTreeMap<u64, (u64, usize)>,
    hits: u64,
    misses: u64,
}

impl BlockCache {
    fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            clock: 0,
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    fn get(&mut self, key: (u64, usize)) -> Option<&[u8]> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.get_mut(&key)?;
        self.by_age.remove(&entry.0);
        entry.0 = clock;
        self.by_age.insert(clock, key);
        self.hits += 1;
        Some(&entry.1)
    }

    fn put(&mut self, key: (u64, usize), bytes: Vec<u8>) {
        self.misses += 1;
        if bytes.len() > self.budget {
            return;
        }
        while self.used + bytes.len() > self.budget {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            if let Some((_, old)) = self.entries.remove(&oldest) {
                self.used -= old.len();
            }
        }
        self.clock += 1;
        self.used += bytes.len();
        self.by_age.insert(self.clock, key);
        self.entries.insert(key, (self.clock, bytes));
    }

    /// Drops the blocks from `block` on (a rewind rewrites them).
    fn drop_from(&mut self, block: u64) {
        let gone: Vec<_> = self
            .entries
            .keys()
            .filter(|(b, _)| *b >= block)
            .copied()
            .collect();
        for key in gone {
            if let Some((age, bytes)) = self.entries.remove(&key) {
                self.by_age.remove(&age);
                self.used -= bytes.len();
            }
        }
    }
}

/// The store of one conversation's evicted tokens.
pub struct EvictedStore {
    path: PathBuf,
    file: File,
    /// Whether the file goes with the store (a conversation without a saved home) and still
    /// has a name to remove: on Unix a temporary file loses its name as soon as it is open,
    /// so even a killed process leaves nothing behind.
    remove_on_drop: bool,
    shape: StoreShape,
    /// Complete blocks in the file.
    blocks: u64,
    /// Per stored layer, the tokens of the block being filled: positions, and keys and values
    /// encoded as the file keeps them.
    pending: Vec<Pending>,
    cache: BlockCache,
    bytes_written: u64,
}

/// One layer's tokens not yet in a complete block.
#[derive(Debug, Clone, Default)]
struct Pending {
    positions: Vec<u64>,
    keys: Vec<u8>,
    values: Vec<u8>,
}

impl Pending {
    fn truncate(&mut self, tokens: usize, token_bytes: usize) {
        self.positions.truncate(tokens);
        self.keys.truncate(tokens * token_bytes);
        self.values.truncate(tokens * token_bytes);
    }
}

impl EvictedStore {
    /// Creates (truncates) the store at `path`; `temporary` removes the file when the store
    /// goes (on Unix at once: the open file outlives its name).
    pub fn create(
        path: &Path,
        shape: StoreShape,
        cache_bytes: usize,
        temporary: bool,
    ) -> Result<Self, StoreError> {
        let io = |e| StoreError::Io(path.to_path_buf(), e);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        let mut header = Vec::with_capacity(HEADER_BYTES as usize);
        header.extend_from_slice(MAGIC);
        for x in [
            VERSION,
            shape.kv_type.tag(),
            shape.block_tokens as u32,
            shape.layers as u32,
            shape.row as u32,
        ] {
            header.extend_from_slice(&x.to_le_bytes());
        }
        header.resize(HEADER_BYTES as usize, 0);
        file.write_all_at(&header, 0).map_err(io)?;
        let named = temporary && !(cfg!(unix) && std::fs::remove_file(path).is_ok());
        Ok(Self {
            path: path.to_path_buf(),
            file,
            remove_on_drop: named,
            shape,
            blocks: 0,
            pending: vec![Pending::default(); shape.layers],
            cache: BlockCache::new(cache_bytes),
            bytes_written: HEADER_BYTES,
        })
    }

    pub fn shape(&self) -> StoreShape {
        self.shape
    }

    /// Complete blocks, the ones recall can choose from.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Tokens stored: the complete blocks' and the partial one's (of the first layer).
    pub fn len(&self) -> u64 {
        self.blocks * self.shape.block_tokens as u64 + self.pending_tokens(0) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn pending_tokens(&self, layer: usize) -> usize {
        self.pending.get(layer).map_or(0, |p| p.positions.len())
    }

    fn token_bytes(&self) -> usize {
        self.shape.row * self.shape.kv_type.bytes()
    }

    /// Bytes of the file.
    pub fn file_bytes(&self) -> u64 {
        self.shape.block_offset(self.blocks)
    }

    /// Bytes written since the store was created (blocks and header).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Bytes the block cache holds now, and its budget.
    pub fn cache_bytes(&self) -> (usize, usize) {
        (self.cache.used, self.cache.budget)
    }

    /// Block reads served by the cache and by the file.
    pub fn cache_hits_and_misses(&self) -> (u64, u64) {
        (self.cache.hits, self.cache.misses)
    }

    /// Appends one evicted token of stored layer `layer`: its position, its keys unrotated and
    /// its values, `row` floats each. Every layer gets the same tokens in the same order.
    pub fn push(&mut self, layer: usize, position: u64, keys: &[f32], values: &[f32]) {
        let p = &mut self.pending[layer];
        p.positions.push(position);
        self.shape.kv_type.encode(keys, &mut p.keys);
        self.shape.kv_type.encode(values, &mut p.values);
    }

    /// Writes out the blocks every layer has completed. Returns the blocks written, each as
    /// its per-layer keys (for the digests).
    pub fn flush(&mut self) -> Result<Vec<Vec<Vec<f32>>>, StoreError> {
        let b = self.shape.block_tokens;
        let complete = (0..self.shape.layers)
            .map(|l| self.pending_tokens(l) / b)
            .min()
            .unwrap_or(0);
        let mut written = Vec::with_capacity(complete);
        let half = self.shape.half_bytes();
        for _ in 0..complete {
            let mut record = Vec::with_capacity(self.shape.block_bytes() as usize);
            let mut keys = Vec::with_capacity(self.shape.layers);
            for p in &mut self.pending {
                for pos in p.positions.drain(..b) {
                    record.extend_from_slice(&pos.to_le_bytes());
                }
                let k: Vec<u8> = p.keys.drain(..half).collect();
                let mut floats = Vec::with_capacity(b * self.shape.row);
                self.shape.kv_type.decode(&k, &mut floats);
                keys.push(floats);
                record.extend_from_slice(&k);
                record.extend(p.values.drain(..half));
            }
            let at = self.shape.block_offset(self.blocks);
            self.file
                .write_all_at(&record, at)
                .map_err(|e| StoreError::Io(self.path.clone(), e))?;
            self.bytes_written += record.len() as u64;
            self.blocks += 1;
            written.push(keys);
        }
        Ok(written)
    }

    /// Stored layer `layer` of block `block`, through the block cache.
    pub fn read(&mut self, block: u64, layer: usize) -> Result<BlockKv, StoreError> {
        let key = (block, layer);
        if let Some(bytes) = self.cache.get(key) {
            return Ok(BlockKv::decode(bytes, &self.shape));
        }
        let bytes = self.read_layer(block, layer)?;
        let out = BlockKv::decode(&bytes, &self.shape);
        self.cache.put(key, bytes);
        Ok(out)
    }

    /// Layer `layer` of block `block` as the file holds it.
    fn read_layer(&self, block: u64, layer: usize) -> Result<Vec<u8>, StoreError> {
        let mut bytes = vec![0u8; self.shape.layer_bytes()];
        let at = self.shape.block_offset(block) + (layer * bytes.len()) as u64;
        self.file
            .read_exact_at(&mut bytes, at)
            .map_err(|e| StoreError::Io(self.path.clone(), e))?;
        Ok(bytes)
    }

    /// Forgets every token from the `len`-th on (a rewind): the file is cut to the whole blocks
    /// before it, and the partial block read back from the file when the cut falls inside one.
    pub fn truncate(&mut self, len: u64) -> Result<(), StoreError> {
        if len >= self.len() {
            return Ok(());
        }
        let b = self.shape.block_tokens as u64;
        let token_bytes = self.token_bytes();
        let (keep_blocks, keep_tokens) = (len / b, (len % b) as usize);
        if keep_blocks >= self.blocks {
            // The cut is inside the pending block.
            for p in &mut self.pending {
                p.truncate(keep_tokens, token_bytes);
            }
            return Ok(());
        }
        for l in 0..self.shape.layers {
            let bytes = self.read_layer(keep_blocks, l)?;
            let (pos, kv) = bytes.split_at(self.shape.positions_bytes());
            let (k, v) = kv.split_at(self.shape.half_bytes());
            let mut p = Pending {
                positions: pos
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                    .collect(),
                keys: k.to_vec(),
                values: v.to_vec(),
            };
            p.truncate(keep_tokens, token_bytes);
            self.pending[l] = p;
        }
        self.blocks = keep_blocks;
        self.cache.drop_from(keep_blocks);
        self.file
            .set_len(self.shape.block_offset(keep_blocks))
            .map_err(|e| StoreError::Io(self.path.clone(), e))
    }
}

impl Drop for EvictedStore {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(kv_type: KvType) -> StoreShape {
        StoreShape {
            block_tokens: 4,
            layers: 2,
            row: 3,
            kv_type,
        }
    }

    fn token(pos: u64, layer: usize, value: bool) -> Vec<f32> {
        (0..3)
            .map(|i| pos as f32 + layer as f32 * 0.25 + i as f32 * 0.125 + value as u8 as f32 * 0.5)
            .collect()
    }

    fn fill(store: &mut EvictedStore, from: u64, to: u64) {
        for pos in from..to {
            for l in 0..2 {
                store.push(l, pos, &token(pos, l, false), &token(pos, l, true));
            }
            store.flush().unwrap();
        }
    }

    #[test]
    fn blocks_read_back_as_written_through_a_small_cache() {
        let dir = tempfile::tempdir().unwrap();
        for kv_type in [KvType::F32, KvType::F16] {
            let path = dir.path().join("r.kv");
            // A cache of one layer-block: every second read misses.
            let mut store =
                EvictedStore::create(&path, shape(kv_type), 4 * 3 * 2 * 4, false).unwrap();
            fill(&mut store, 2, 2 + 11);
            assert_eq!((store.blocks(), store.len()), (2, 11));
            let layer_bytes = 4 * 8 + 2 * 4 * 3 * kv_type.bytes() as u64;
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                HEADER_BYTES + 2 * 2 * layer_bytes
            );
            for block in 0..2u64 {
                for l in 0..2 {
                    let kv = store.read(block, l).unwrap();
                    for t in 0..4 {
                        let pos = 2 + block * 4 + t as u64;
                        assert_eq!(kv.positions[t], pos);
                        // f16 keeps these values exactly (multiples of 1/8 below 16).
                        assert_eq!(kv.keys[t * 3..(t + 1) * 3], token(pos, l, false)[..]);
                        assert_eq!(kv.values[t * 3..(t + 1) * 3], token(pos, l, true)[..]);
                    }
                }
            }
            let (used, budget) = store.cache_bytes();
            assert!(used <= budget);
        }
    }

    #[test]
    fn a_truncate_inside_a_written_block_reads_its_start_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.kv");
        let mut store = EvictedStore::create(&path, shape(KvType::F32), 1 << 20, true).unwrap();
        fill(&mut store, 2, 2 + 10);
        store.read(1, 0).unwrap();
        store.truncate(6).unwrap();
        assert_eq!((store.blocks(), store.len()), (1, 6));
        // Feeding the same tokens again gives the same store.
        fill(&mut store, 2 + 6, 2 + 10);
        assert_eq!(store.blocks(), 2);
        let kv = store.read(1, 1).unwrap();
        assert_eq!(kv.positions, [6, 7, 8, 9]);
        assert_eq!(kv.keys[..3], token(6, 1, false)[..]);
        store.truncate(9).unwrap();
        assert_eq!(store.len(), 9);
        drop(store);
        assert!(!path.exists(), "a temporary store leaves no file");
    }
}
