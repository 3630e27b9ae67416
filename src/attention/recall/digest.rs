//! Block digests (Quest, arXiv 2406.10774): per block, stored layer and KV head, the minimum
//! and maximum of every channel of its unrotated keys. For a query `q`, `Σ_c max(q_c·min_c,
//! q_c·max_c)` is an upper bound of `q · k` over the block's keys, so the blocks with the
//! highest bounds are the ones that can hold the keys the query would attend to most.
//!
//! A KV group's query heads are summed into one vector before scoring (one bound per KV head
//! instead of one per query head: the cost of scoring stays that of one query per KV head),
//! and a block's score in a layer is the sum of its KV heads' bounds.

/// The digests of one stored layer: `[block][kv_head][min ‖ max]`, each `head_dim` floats.
#[derive(Debug, Clone, Default)]
pub struct LayerDigests {
    bounds: Vec<f32>,
}

impl LayerDigests {
    /// Adds the digest of the next block from its keys `[token][kv_head][head_dim]`.
    pub fn push(&mut self, keys: &[f32], n_kv: usize, head_dim: usize) {
        let row = n_kv * head_dim;
        for kv in 0..n_kv {
            let at = self.bounds.len();
            self.bounds.resize(at + 2 * head_dim, 0.0);
            let (lo, hi) = self.bounds[at..].split_at_mut(head_dim);
            lo.fill(f32::INFINITY);
            hi.fill(f32::NEG_INFINITY);
            for token in keys.chunks_exact(row) {
                let k = &token[kv * head_dim..(kv + 1) * head_dim];
                for c in 0..head_dim {
                    lo[c] = lo[c].min(k[c]);
                    hi[c] = hi[c].max(k[c]);
                }
            }
        }
    }

    /// Keeps the first `blocks` digests (a rewind).
    pub fn truncate(&mut self, blocks: usize, n_kv: usize, head_dim: usize) {
        self.bounds.truncate(blocks * n_kv * 2 * head_dim);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bounds.capacity() * 4
    }

    /// The score of every block for `queries` (`[kv_head][head_dim]`, each a group's query
    /// heads summed).
    pub fn scores(&self, queries: &[f32], n_kv: usize, head_dim: usize) -> Vec<f32> {
        self.bounds
            .chunks_exact(n_kv * 2 * head_dim)
            .map(|block| {
                let mut score = 0f32;
                for kv in 0..n_kv {
                    let (lo, hi) =
                        block[kv * 2 * head_dim..(kv + 1) * 2 * head_dim].split_at(head_dim);
                    let q = &queries[kv * head_dim..(kv + 1) * head_dim];
                    for c in 0..head_dim {
                        score += (q[c] * lo[c]).max(q[c] * hi[c]);
                    }
                }
                score
            })
            .collect()
    }
}

/// The `k` highest scores' indices, best first (ties: the later block, the more recent).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(b.cmp(&a)));
    order.truncate(k);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_never_below_any_key_of_the_block() {
        let (n_kv, hd) = (2, 4);
        let keys: Vec<f32> = (0..5 * n_kv * hd)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0)
            .collect();
        let mut d = LayerDigests::default();
        d.push(&keys, n_kv, hd);
        let q: Vec<f32> = (0..n_kv * hd).map(|i| (i as f32 - 3.5) / 2.0).collect();
        let bound = d.scores(&q, n_kv, hd)[0];
        for token in keys.chunks_exact(n_kv * hd) {
            let dot: f32 = token.iter().zip(&q).map(|(a, b)| a * b).sum();
            assert!(dot <= bound + 1e-5, "{dot} > {bound}");
        }
    }

    #[test]
    fn the_block_holding_the_matching_key_scores_highest() {
        let (n_kv, hd) = (1, 8);
        let mut d = LayerDigests::default();
        let needle: Vec<f32> = (0..hd).map(|c| if c == 3 { 5.0 } else { 0.0 }).collect();
        for b in 0..10 {
            let mut keys: Vec<f32> = (0..4 * hd).map(|i| ((i + b) % 5) as f32 * 0.1).collect();
            if b == 6 {
                keys[2 * hd..3 * hd].copy_from_slice(&needle);
            }
            d.push(&keys, n_kv, hd);
        }
        let scores = d.scores(&needle, n_kv, hd);
        assert_eq!(top_k(&scores, 3)[0], 6);
        assert_eq!(top_k(&scores, 30).len(), 10);
        d.truncate(4, n_kv, hd);
        assert_eq!(d.scores(&needle, n_kv, hd).len(), 4);
    }
}
