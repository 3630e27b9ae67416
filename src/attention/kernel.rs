//! The attention arithmetic of one query row for one KV group, on the CPU.
//!
//! All query heads that share a KV head (GQA) are served together, so each key and value row is
//! read from memory once per group instead of once per head, and nothing is copied or repeated.
//! Three passes over a scratch buffer laid out head-major: scores (dot products), softmax (a
//! branch-free exp that the compiler vectorizes), then the weighted value sum. Scores of keys
//! the rule hides are −∞ and contribute exactly zero.

use crate::kernels::fast_exp;

/// How many slots ahead of use rows are prefetched.
const PREFETCH_AHEAD: usize = 8;

/// Keys and values stored `[slot][kv_head][head_dim]`, viewed for one KV head.
pub(super) struct Rows<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    /// Floats between consecutive slots (`n_kv_heads · head_dim`).
    pub stride: usize,
    /// Offset of this KV head inside a slot.
    pub offset: usize,
    pub len: usize,
}

impl Rows<'_> {
    /// Asks the CPU to start loading slot `j` of `data` (each row is a few cache lines). Rows are
    /// strided and cross a 4 KiB page every few slots, where hardware prefetchers stop; without
    /// this, the pass waits on memory rather than computing.
    #[inline(always)]
    fn prefetch(&self, data: &[f32], j: usize, d: usize) {
        #[cfg(target_arch = "x86_64")]
        if j < self.len {
            let start = j * self.stride + self.offset;
            for line in (0..d).step_by(16) {
                // SAFETY: prefetch is a hint that never faults; the address is inside `data`.
                unsafe {
                    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                    _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(start + line) as *const i8);
                }
            }
        }
    }

    #[inline]
    fn key(&self, j: usize, d: usize) -> &[f32] {
        &self.keys[j * self.stride + self.offset..][..d]
    }

    #[inline]
    fn value(&self, j: usize, d: usize) -> &[f32] {
        &self.values[j * self.stride + self.offset..][..d]
    }
}

/// One segment of keys a row may see, the queries it is scored with, and which slots are visible.
pub(super) struct Segment<'a, F: Fn(usize) -> bool> {
    pub rows: Rows<'a>,
    /// `group × head_dim` queries, rotated as this segment needs (true distance or clamped).
    pub queries: &'a [f32],
    pub visible: F,
}

/// Scores every visible key of `segments` against its queries (scaled), softmax per head, and
/// writes the `group × head_dim` outputs to `out`. `scratch` is reused between calls.
pub(super) fn attend_group<const N: usize>(
    segments: [&dyn SegmentView; N],
    group: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let n_keys: usize = segments.iter().map(|s| s.len()).sum();
    scratch.clear();
    scratch.resize(group * n_keys + group, f32::NEG_INFINITY);
    let (scores, sums) = scratch.split_at_mut(group * n_keys);
    // Pass 1: scores, head-major (`scores[g * n_keys + j]`).
    let mut at = Placement {
        base: 0,
        n_keys,
        group,
        head_dim,
    };
    for seg in &segments {
        seg.score(scores, at, scale);
        at.base += seg.len();
    }
    // Pass 2: softmax numerators per head; `sums` keeps the denominators.
    for (g, sum) in sums.iter_mut().enumerate() {
        *sum = softmax_numerators(&mut scores[g * n_keys..(g + 1) * n_keys]);
    }
    // Pass 3: weighted sum of values, each value row read once for the whole group.
    out.fill(0.0);
    at.base = 0;
    for seg in &segments {
        seg.accumulate(scores, at, out);
        at.base += seg.len();
    }
    for (g, sum) in sums.iter().enumerate() {
        if *sum > 0.0 {
            let inv = 1.0 / sum;
            out[g * head_dim..(g + 1) * head_dim]
                .iter_mut()
                .for_each(|x| *x *= inv);
        }
    }
}

/// The probability each key got, averaged over the group's heads, read back from the scratch
/// buffer of the last [`attend_group`] call (keys in segment order). For the inspect view.
pub(super) fn mean_probabilities(scratch: &[f32], group: usize) -> Vec<f32> {
    let n_keys = (scratch.len() - group) / group;
    let (scores, sums) = scratch.split_at(group * n_keys);
    let mut mean = vec![0f32; n_keys];
    for (g, sum) in sums.iter().enumerate() {
        if *sum > 0.0 {
            let w = 1.0 / (sum * group as f32);
            for (m, p) in mean.iter_mut().zip(&scores[g * n_keys..(g + 1) * n_keys]) {
                *m += p * w;
            }
        }
    }
    mean
}

/// Mean Shannon entropy (nats) of the group heads' attention distributions, read back from the
/// scratch buffer of the last [`attend_group`] call: `H = ln S − Σ e·ln e / S` over the softmax
/// numerators `e` and their sum `S`. For `eval entropy` (LM-Infinite's ln n growth).
pub(super) fn mean_entropy(scratch: &[f32], group: usize) -> f32 {
    let n_keys = (scratch.len() - group) / group;
    let (numerators, sums) = scratch.split_at(group * n_keys);
    let mut total = 0f64;
    for (g, &sum) in sums.iter().enumerate() {
        if sum > 0.0 {
            let e_ln_e: f64 = numerators[g * n_keys..(g + 1) * n_keys]
                .iter()
                .filter(|&&e| e > 0.0)
                .map(|&e| (e * e.ln()) as f64)
                .sum();
            total += (sum as f64).ln() - e_ln_e / sum as f64;
        }
    }
    (total / group as f64) as f32
}

/// Where a segment's keys sit in the head-major score buffer of one kernel call.
#[derive(Clone, Copy)]
pub(super) struct Placement {
    /// Index of the segment's first key among all keys of the call.
    base: usize,
    /// Keys of the call (the stride between heads in the buffer).
    n_keys: usize,
    group: usize,
    head_dim: usize,
}

/// Type-erased view of a [`Segment`], so that segments with different visibility rules share
/// one kernel call.
pub(super) trait SegmentView {
    fn len(&self) -> usize;
    /// Writes this segment's scaled scores; hidden keys keep their −∞.
    fn score(&self, scores: &mut [f32], at: Placement, scale: f32);
    /// Adds this segment's probability-weighted values to `out` (`group × head_dim`).
    fn accumulate(&self, probs: &[f32], at: Placement, out: &mut [f32]);
}

impl<F: Fn(usize) -> bool> SegmentView for Segment<'_, F> {
    fn len(&self) -> usize {
        self.rows.len
    }

    fn score(&self, scores: &mut [f32], at: Placement, scale: f32) {
        let Placement {
            base,
            n_keys,
            group,
            head_dim,
        } = at;
        let blocked = head_dim.is_multiple_of(16);
        let mut d = [0f32; 4];
        for j in 0..self.rows.len {
            self.rows
                .prefetch(self.rows.keys, j + PREFETCH_AHEAD, head_dim);
            if !(self.visible)(j) {
                continue;
            }
            let k = self.rows.key(j, head_dim);
            // Up to four heads per sweep over the key: independent FMA chains, one key load.
            let mut g = 0;
            while g < group {
                let n = (group - g).min(4);
                let q = &self.queries[g * head_dim..(g + n) * head_dim];
                match (blocked, n) {
                    (true, 4) => d = dots::<4>(q, k, head_dim),
                    (true, 3) => d[..3].copy_from_slice(&dots::<3>(q, k, head_dim)),
                    (true, 2) => d[..2].copy_from_slice(&dots::<2>(q, k, head_dim)),
                    _ => {
                        for (x, dx) in d.iter_mut().enumerate().take(n) {
                            *dx = dot(&q[x * head_dim..(x + 1) * head_dim], k);
                        }
                    }
                }
                for (x, dx) in d.iter().enumerate().take(n) {
                    scores[(g + x) * n_keys + base + j] = dx * scale;
                }
                g += n;
            }
        }
    }

    fn accumulate(&self, probs: &[f32], at: Placement, out: &mut [f32]) {
        let Placement {
            base,
            n_keys,
            group,
            head_dim,
        } = at;
        for j in 0..self.rows.len {
            self.rows
                .prefetch(self.rows.values, j + PREFETCH_AHEAD, head_dim);
            let v = self.rows.value(j, head_dim);
            for g in 0..group {
                let p = probs[g * n_keys + base + j];
                if p != 0.0 {
                    let o = &mut out[g * head_dim..(g + 1) * head_dim];
                    for (a, x) in o.iter_mut().zip(v) {
                        *a += p * x;
                    }
                }
            }
        }
    }
}

/// Sum of 16 lanes as a tree (4 dependent adds, not 15), so reductions do not serialize.
#[inline(always)]
fn tree_sum(l: [f32; 16]) -> f32 {
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = l[i] + l[i + 8];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `N` dot products of consecutive query rows with one key, in 16-lane blocks (`head_dim` a
/// multiple of 16).
#[inline(always)]
fn dots<const N: usize>(q: &[f32], k: &[f32], head_dim: usize) -> [f32; N] {
    let mut acc = [[0f32; 16]; N];
    for (c, kc) in k.chunks_exact(16).enumerate() {
        for (g, a) in acc.iter_mut().enumerate() {
            let qc = &q[g * head_dim + c * 16..g * head_dim + c * 16 + 16];
            for l in 0..16 {
                a[l] += qc[l] * kc[l];
            }
        }
    }
    acc.map(tree_sum)
}

#[inline]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Sixteen independent lanes vectorize without reassociation flags.
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    tree_sum(lanes) + tail
}

/// In place `x ← e^(x − max)` (−∞ → 0) over a row of scores; returns the sum. Max and sum run
/// in 16 lanes so neither reduction is a serial chain.
fn softmax_numerators(row: &mut [f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let chunks = row.chunks_exact(16);
    let tail_max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    for c in chunks {
        for l in 0..16 {
            m[l] = m[l].max(c[l]);
        }
    }
    let max = m.iter().fold(tail_max, |a, &x| a.max(x));
    let mut sums = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for l in 0..16 {
            let p = if c[l] == f32::NEG_INFINITY {
                0.0
            } else {
                fast_exp(c[l] - max)
            };
            c[l] = p;
            sums[l] += p;
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = if *x == f32::NEG_INFINITY {
            0.0
        } else {
            fast_exp(*x - max)
        };
        tail += *x;
    }
    tree_sum(sums) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entropy from softmax numerators: two heads, one with p = (a, 1 − a), one uniform over 3.
    #[test]
    fn entropy_from_numerators() {
        let e = (-1.5f32).exp();
        let scratch = [1.0, e, 0.0, 1.0, 1.0, 1.0, 1.0 + e, 3.0];
        let a = 1.0 / (1.0 + e as f64);
        let h0 = -(a * a.ln() + (1.0 - a) * (1.0 - a).ln());
        let expected = (h0 + 3f64.ln()) / 2.0;
        assert!((mean_entropy(&scratch, 2) as f64 - expected).abs() < 1e-6);
    }
}
