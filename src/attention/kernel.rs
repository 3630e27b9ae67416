//! The attention arithmetic of one query row for one KV group, on the CPU.
//!
//! All query heads that share a KV head (GQA) are served together, so each key and value row is
//! read from memory once per group instead of once per head, and nothing is copied or repeated.
//! Three passes over a scratch buffer laid out head-major: scores (dot products; with AVX-512 in
//! blocks of 16 keys whose sums across lanes are taken together, with AVX2 in blocks of 8:
//! [`avx2`]), softmax (a branch-free exp that the compiler vectorizes), then the weighted value
//! sum (outputs held in registers across the keys: up to four heads × 64 with AVX-512, four
//! heads × 16 with AVX2). Scores of keys the rule hides are −∞ and contribute exactly zero.

use super::kv_store::{KvRows, KvView};
use crate::kernels::{Kernel, fast_exp};

#[cfg(target_arch = "x86_64")]
mod avx2;

/// How many slots ahead of use rows are prefetched.
const PREFETCH_AHEAD: usize = 8;

/// Keys and values stored `[slot][kv_head][head_dim]` (f32, f16 or q8_0), viewed for one KV
/// head.
pub(super) struct Rows<'a> {
    pub keys: KvView<'a>,
    pub values: KvView<'a>,
    /// Values between consecutive slots (`n_kv_heads · head_dim`).
    pub stride: usize,
    /// Offset of this KV head inside a slot.
    pub offset: usize,
    pub len: usize,
}

impl Rows<'_> {
    /// Index of slot `j`'s first value of this KV head.
    #[inline(always)]
    fn at(&self, j: usize) -> usize {
        j * self.stride + self.offset
    }

    /// Asks the CPU to start loading `d` values from `from` of slot `j` of `data` (each row is
    /// a few cache lines). Rows are strided and cross a 4 KiB page every few slots, where
    /// hardware prefetchers stop; without this, the pass waits on memory rather than computing.
    #[inline(always)]
    fn prefetch<'d>(&self, data: impl KvRows<'d>, j: usize, from: usize, d: usize) {
        if j < self.len {
            data.prefetch(self.at(j) + from, d);
        }
    }

    /// Whether `data` holds `head_dim` values of every slot (the unchecked loads rely on it).
    fn fits<'d>(&self, data: impl KvRows<'d>, head_dim: usize) -> bool {
        self.len == 0 || self.at(self.len - 1) + head_dim <= data.len()
    }
}

/// Values `at .. at + len` of `data` as f32: in place when they are f32, else widened into
/// `buf`.
#[inline(always)]
fn row_f32<'b, 'd: 'b>(
    data: impl KvRows<'d>,
    at: usize,
    len: usize,
    buf: &'b mut Vec<f32>,
) -> &'b [f32] {
    match data.f32s() {
        Some(all) => &all[at..at + len],
        None => {
            buf.resize(len, 0.0);
            data.widen(at, buf);
            buf
        }
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
///
/// With `partial`, the keys are one part of a row's keys ([`merge_parts`] combines the parts):
/// `out` is left unnormalized (`Σ e^(s − max) · v` per head) and `partial` gets each head's
/// `[max, sum]`. `kernel` is the instruction set the passes run with (`Kernel::detect`).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_group<const N: usize>(
    kernel: Kernel,
    segments: [&dyn SegmentView; N],
    group: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    partial: Option<&mut [f32]>,
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
        seg.score(kernel, scores, at, scale);
        at.base += seg.len();
    }
    // Pass 2: softmax numerators per head; `sums` keeps the denominators (a part's stats also
    // keep the maxima they are relative to).
    let mut partial = partial;
    for (g, sum) in sums.iter_mut().enumerate() {
        let row = &mut scores[g * n_keys..(g + 1) * n_keys];
        let (max, total) = kernel.vectorize(
            #[inline(always)]
            || softmax_numerators(row),
        );
        *sum = total;
        if let Some(stats) = partial.as_deref_mut() {
            stats[2 * g..2 * g + 2].copy_from_slice(&[max, total]);
        }
    }
    // Pass 3: weighted sum of values, each value row read once for the whole group.
    out.fill(0.0);
    at.base = 0;
    for seg in &segments {
        seg.accumulate(kernel, scores, at, out);
        at.base += seg.len();
    }
    if partial.is_some() {
        return; // the caller merges the parts (`merge_parts`) and normalizes
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

/// Combines the parts of a row's keys that [`attend_group`] scored separately: `outs[p]` the
/// unnormalized `group × head_dim` outputs of part `p`, `stats[p]` its `[max, sum]` per head.
/// Each part's share is rescaled to the overall max, so the result equals one softmax over all
/// the keys.
pub(super) fn merge_parts(outs: &[&[f32]], stats: &[&[f32]], head_dim: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (g, o) in out.chunks_exact_mut(head_dim).enumerate() {
        let max = stats.iter().fold(f32::NEG_INFINITY, |m, s| m.max(s[2 * g]));
        if max == f32::NEG_INFINITY {
            continue; // no key visible to this head in any part
        }
        let mut total = 0.0;
        for (part, s) in outs.iter().zip(stats) {
            let w = (s[2 * g] - max).exp();
            total += w * s[2 * g + 1];
            let from = &part[g * head_dim..(g + 1) * head_dim];
            o.iter_mut().zip(from).for_each(|(a, x)| *a += w * x);
        }
        let inv = 1.0 / total;
        o.iter_mut().for_each(|x| *x *= inv);
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
    fn score(&self, kernel: Kernel, scores: &mut [f32], at: Placement, scale: f32);
    /// Adds this segment's probability-weighted values to `out` (`group × head_dim`).
    fn accumulate(&self, kernel: Kernel, probs: &[f32], at: Placement, out: &mut [f32]);
}

impl<F: Fn(usize) -> bool> SegmentView for Segment<'_, F> {
    fn len(&self) -> usize {
        self.rows.len
    }

    fn score(&self, kernel: Kernel, scores: &mut [f32], at: Placement, scale: f32) {
        match self.rows.keys {
            KvView::F32(keys) => kernel.vectorize(
                #[inline(always)]
                || self.score_in(keys, scores, at, scale, kernel),
            ),
            KvView::F16(keys) => kernel.vectorize(
                #[inline(always)]
                || self.score_in(keys, scores, at, scale, kernel),
            ),
            KvView::Q8(keys) => kernel.vectorize(
                #[inline(always)]
                || self.score_in(keys, scores, at, scale, kernel),
            ),
        }
    }

    fn accumulate(&self, kernel: Kernel, probs: &[f32], at: Placement, out: &mut [f32]) {
        match self.rows.values {
            KvView::F32(values) => kernel.vectorize(
                #[inline(always)]
                || self.accumulate_in(values, probs, at, out, kernel),
            ),
            KvView::F16(values) => kernel.vectorize(
                #[inline(always)]
                || self.accumulate_in(values, probs, at, out, kernel),
            ),
            KvView::Q8(values) => kernel.vectorize(
                #[inline(always)]
                || self.accumulate_in(values, probs, at, out, kernel),
            ),
        }
    }
}

/// The passes are generic bodies inlined into [`Kernel::vectorize`]: compiled once per
/// instruction set and chosen at run time, so a portable binary runs the wide code where the
/// CPU has it. On x86-64, `kernel` adds the hand-written blocks: AVX-512's here, AVX2's in
/// [`avx2`].
impl<F: Fn(usize) -> bool> Segment<'_, F> {
    /// [`SegmentView::score`] over keys of one element type; whole blocks of keys go through
    /// `kernel`'s blocked pass first (16 keys with AVX-512, 8 with AVX2).
    #[inline(always)]
    fn score_in<'d>(
        &self,
        keys: impl KvRows<'d>,
        scores: &mut [f32],
        at: Placement,
        scale: f32,
        kernel: Kernel,
    ) {
        let Placement {
            base,
            n_keys,
            group,
            head_dim,
        } = at;
        let blocked = head_dim.is_multiple_of(16);
        let mut d = [0f32; 4];
        let mut widened = Vec::new();
        #[cfg(target_arch = "x86_64")]
        let first = match kernel {
            // SAFETY: `detect` chose these kernels because the CPU has their features.
            Kernel::Avx512Vnni => unsafe { self.score_blocks(keys, scores, at, scale) },
            Kernel::Avx2 => unsafe { self.score_blocks_avx2(keys, scores, at, scale) },
            Kernel::Scalar => 0,
        };
        #[cfg(not(target_arch = "x86_64"))]
        let first = {
            let _ = kernel;
            0
        };
        for j in first..self.rows.len {
            self.rows.prefetch(keys, j + PREFETCH_AHEAD, 0, head_dim);
            if !(self.visible)(j) {
                continue;
            }
            let k = row_f32(keys, self.rows.at(j), head_dim, &mut widened);
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

    /// [`SegmentView::accumulate`] over values of one element type: each value row added into
    /// every head's outputs, or with AVX-512 or AVX2 (`kernel`) the outputs held in registers.
    #[inline(always)]
    fn accumulate_in<'d>(
        &self,
        values: impl KvRows<'d>,
        probs: &[f32],
        at: Placement,
        out: &mut [f32],
        kernel: Kernel,
    ) {
        let Placement {
            base,
            n_keys,
            group,
            head_dim,
        } = at;
        #[cfg(target_arch = "x86_64")]
        match kernel {
            // SAFETY: `detect` chose these kernels because the CPU has their features.
            Kernel::Avx512Vnni if head_dim.is_multiple_of(SLICE) => {
                unsafe { self.accumulate_in_registers(values, probs, at, out) };
                return;
            }
            Kernel::Avx2 if head_dim.is_multiple_of(16) => {
                unsafe { self.accumulate_avx2(values, probs, at, out) };
                return;
            }
            _ => {}
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = kernel;
        let mut widened = Vec::new();
        for j in 0..self.rows.len {
            self.rows.prefetch(values, j + PREFETCH_AHEAD, 0, head_dim);
            let v = row_f32(values, self.rows.at(j), head_dim, &mut widened);
            for g in 0..group {
                let p = probs[g * n_keys + base + j];
                if p != 0.0 {
                    let o = &mut out[g * head_dim..(g + 1) * head_dim];
                    o.iter_mut().zip(v).for_each(|(a, x)| *a += p * x);
                }
            }
        }
    }
}

/// Output values per register-blocked pass over the value rows.
#[cfg(target_arch = "x86_64")]
const SLICE: usize = 64;

/// Where the transposed sum of [`Segment::score_blocks`] leaves key `k` of a block: lane
/// `4 · (k mod 4) + k / 4`.
#[cfg(target_arch = "x86_64")]
const KEY_LANES: [i32; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// The 16 lane sums of `a[0..16]` as one vector (`sum(a[k])` in lane `k`): four levels of
/// pairwise shuffles and adds, 45 operations for 16 sums where reducing each vector alone
/// takes about 8 apiece.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn transposed_sums(a: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: reads the 16 lane indices of `KEY_LANES`; everything else is registers.
    unsafe {
        // 128-bit lanes [x0+x2, x1+x3, y0+y2, y1+y3]: the first half sums to Σx, the second Σy.
        let b: [__m512; 8] = std::array::from_fn(|i| {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            )
        });
        // 128-bit lane m holds key 4i + m's four partial sums.
        let c: [__m512; 4] = std::array::from_fn(|i| {
            let (x, y) = (b[2 * i], b[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            )
        });
        // Within lane m: two partials of key 8i + m, two of key 8i + 4 + m.
        let d: [__m512; 2] = std::array::from_fn(|i| {
            let (x, y) = (c[2 * i], c[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(x, y),
                _mm512_shuffle_ps::<0xEE>(x, y),
            )
        });
        // Within lane m: keys m, 4 + m, 8 + m, 12 + m; then into key order.
        let e = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(d[0], d[1]),
            _mm512_shuffle_ps::<0xDD>(d[0], d[1]),
        );
        _mm512_permutexvar_ps(_mm512_loadu_si512(KEY_LANES.as_ptr() as *const _), e)
    }
}

impl<F: Fn(usize) -> bool> Segment<'_, F> {
    /// How many whole blocks of `width` keys a blocked score pass (AVX-512's or AVX2's, one
    /// key per vector lane) takes: none where the head is not whole vectors. Checks that the
    /// queries, `scores` and `keys` hold everything its unchecked loads and stores touch.
    #[inline(always)]
    fn whole_score_blocks<'d>(
        &self,
        keys: impl KvRows<'d>,
        scores: &[f32],
        at: Placement,
        width: usize,
    ) -> usize {
        let blocks = self.rows.len / width;
        if blocks == 0 || at.group == 0 || !at.head_dim.is_multiple_of(width) {
            return 0;
        }
        assert!(self.queries.len() >= at.group * at.head_dim);
        assert!(scores.len() >= (at.group - 1) * at.n_keys + at.base + blocks * width);
        assert!(self.rows.fits(keys, at.head_dim));
        blocks
    }

    /// Bit `k` set where key `j0 + k` is visible, for `n ≤ 16` keys.
    #[inline(always)]
    fn visible_mask(&self, j0: usize, n: usize) -> u16 {
        (0..n).fold(0, |m, k| m | (((self.visible)(j0 + k) as u16) << k))
    }

    /// Scores whole blocks of 16 keys (AVX-512): each head's 16 dot products are summed across
    /// lanes together ([`transposed_sums`]) and stored as one vector, hidden keys as −∞.
    /// Returns how many keys it scored; the caller scores the rest one by one.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn score_blocks<'d>(
        &self,
        keys: impl KvRows<'d>,
        scores: &mut [f32],
        at: Placement,
        scale: f32,
    ) -> usize {
        use std::arch::x86_64::*;
        let Placement {
            base,
            n_keys,
            group,
            head_dim,
        } = at;
        let blocks = self.whole_score_blocks(keys, scores, at, 16);
        // Keys that are not f32 are widened once per block here, not in every head's pass (7
        // conversions of each key for the default model's groups of 7 heads, the pass's
        // bottleneck); the block stays in L1.
        let mut widened = Vec::new();
        for block in 0..blocks {
            let j0 = 16 * block;
            for k in 0..16 {
                self.rows.prefetch(keys, j0 + 16 + k, 0, head_dim);
            }
            let visible = self.visible_mask(j0, 16);
            if visible == 0 {
                continue; // the buffer starts at −∞
            }
            let rows: [&[f32]; 16] = match keys.f32s() {
                Some(all) => std::array::from_fn(|k| &all[self.rows.at(j0 + k)..][..head_dim]),
                None => {
                    widened.resize(16 * head_dim, 0.0);
                    for (k, out) in widened.chunks_exact_mut(head_dim).enumerate() {
                        let row = self.rows.at(j0 + k);
                        for c in (0..head_dim).step_by(16) {
                            // SAFETY: 16 of the `head_dim` values of a slot the assertion
                            // above checked, and of its place in `widened`.
                            unsafe {
                                _mm512_storeu_ps(out.as_mut_ptr().add(c), keys.load16(row + c))
                            };
                        }
                    }
                    std::array::from_fn(|k| &widened[k * head_dim..(k + 1) * head_dim])
                }
            };
            for g in 0..group {
                let q = &self.queries[g * head_dim..(g + 1) * head_dim];
                // SAFETY: every load reads 16 of the `head_dim` values of `q` and of the key
                // rows, and the store writes 16 of the scores the assertion above checked.
                unsafe {
                    let mut a = [_mm512_setzero_ps(); 16];
                    for c in (0..head_dim).step_by(16) {
                        let qv = _mm512_loadu_ps(q.as_ptr().add(c));
                        for (a, key) in a.iter_mut().zip(rows) {
                            *a = _mm512_fmadd_ps(qv, _mm512_loadu_ps(key.as_ptr().add(c)), *a);
                        }
                    }
                    let s = _mm512_mul_ps(transposed_sums(a), _mm512_set1_ps(scale));
                    let s = _mm512_mask_blend_ps(visible, _mm512_set1_ps(f32::NEG_INFINITY), s);
                    _mm512_storeu_ps(scores.as_mut_ptr().add(g * n_keys + base + j0), s);
                }
            }
        }
        16 * blocks
    }

    /// The value pass with up to four heads × one 64-value slice of the outputs in registers
    /// over all the keys (16 vectors): adding into `out` per key was bound by its loads and
    /// stores. Each pass reads one slice of every value row.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn accumulate_in_registers<'d>(
        &self,
        values: impl KvRows<'d>,
        probs: &[f32],
        at: Placement,
        out: &mut [f32],
    ) {
        let Placement {
            base,
            n_keys,
            group,
            head_dim,
        } = at;
        let mut g = 0;
        while g < group {
            let n = (group - g).min(4);
            let probs = |h: usize| &probs[(g + h) * n_keys + base..][..self.rows.len];
            let out = &mut out[g * head_dim..];
            for slice in (0..head_dim).step_by(SLICE) {
                match n {
                    4 => self.add_weighted(values, [0, 1, 2, 3].map(probs), slice, head_dim, out),
                    3 => self.add_weighted(values, [0, 1, 2].map(probs), slice, head_dim, out),
                    2 => self.add_weighted(values, [0, 1].map(probs), slice, head_dim, out),
                    _ => self.add_weighted(values, [0].map(probs), slice, head_dim, out),
                }
            }
            g += n;
        }
    }

    /// Adds `Σ_j p_h[j] · v_j[slice .. slice + 64]` to head `h`'s outputs (those at
    /// `h · head_dim + slice`) for `H` heads, summed in 4 × 16 lanes per head (written with
    /// intrinsics: the compiler left a portable version scalar, with its sums on the stack).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn add_weighted<'d, const H: usize>(
        &self,
        values: impl KvRows<'d>,
        probs: [&[f32]; H],
        slice: usize,
        head_dim: usize,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        for p in probs {
            assert!(p.len() >= self.rows.len);
        }
        assert!(slice + SLICE <= head_dim && self.rows.fits(values, head_dim));
        // SAFETY: each load reads 16 of the 64 values from `slice` of a slot's `head_dim`
        // (checked above), and `j` is inside every `probs` (above).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); SLICE / 16]; H];
            for j in 0..self.rows.len {
                self.rows.prefetch(values, j + PREFETCH_AHEAD, slice, SLICE);
                let v = self.rows.at(j) + slice;
                let v: [__m512; SLICE / 16] = std::array::from_fn(|c| values.load16(v + 16 * c));
                for (h, acc) in acc.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*probs[h].get_unchecked(j));
                    for (a, v) in acc.iter_mut().zip(v) {
                        *a = _mm512_fmadd_ps(p, v, *a);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                let o = &mut out[h * head_dim + slice..][..SLICE];
                for (c, a) in acc.iter().enumerate() {
                    let at = o.as_mut_ptr().add(16 * c);
                    _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), *a));
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

#[inline(always)]
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

/// In place `x ← e^(x − max)` (−∞ → 0) over a row of scores; returns the max and the sum. Max
/// and sum run in 16 lanes so neither reduction is a serial chain.
#[inline(always)]
fn softmax_numerators(row: &mut [f32]) -> (f32, f32) {
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
    (max, tree_sum(sums) + tail)
}

#[cfg(test)]
mod tests {
    use super::super::kv_store::{KvType, KvVec};
    use super::*;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    /// `attend_group` against a direct softmax in f64, for head sizes and groups that take the
    /// blocked score and value passes (whole blocks of 16 keys plus a remainder, heads in fours
    /// and the rest) and the one-key-at-a-time paths (`head_dim` not a multiple of 16 or 64),
    /// over two segments with keys hidden in both.
    ///
    /// Every instruction set the CPU has, with keys and values stored as f32, f16 and q8_0
    /// (the random values are q8_0 blocks whose scales are powers of two, so all three hold
    /// the same numbers and share the tolerance).
    #[test]
    fn group_attention_matches_a_direct_softmax() {
        for kernel in Kernel::available() {
            for kv_type in [KvType::F32, KvType::F16, KvType::Q8_0] {
                group_attention_matches_a_direct_softmax_on(kernel, kv_type);
            }
        }
    }

    /// [`group_attention_matches_a_direct_softmax`] with one instruction set and storage.
    fn group_attention_matches_a_direct_softmax_on(kernel: Kernel, kv_type: KvType) {
        let mut rng = StdRng::seed_from_u64(11);
        for (group, head_dim, n_kv_heads) in [(7, 64, 2), (4, 256, 1), (3, 32, 2), (2, 24, 1)] {
            if !kv_type.holds_rows_of(head_dim) {
                continue;
            }
            let stride = n_kv_heads * head_dim;
            let lens = [5usize, 45];
            // Per block of 32: a scale 2⁻⁶…2⁻⁸ and values of ±127 steps, one at the block's
            // max, so every storage type holds them exactly.
            let mut random = |n: usize| -> Vec<f32> {
                let mut scale = 1.0;
                (0..n)
                    .map(|i| {
                        if i % 32 == 0 {
                            scale = [1.0 / 64.0, 1.0 / 128.0, 1.0 / 256.0][rng.random_range(0..3)];
                        }
                        let q = if i % 32 == 5 {
                            127
                        } else {
                            rng.random_range(-127..=127)
                        };
                        q as f32 * scale
                    })
                    .collect()
            };
            let keys: Vec<Vec<f32>> = lens.iter().map(|&n| random(n * stride)).collect();
            let values: Vec<Vec<f32>> = lens.iter().map(|&n| random(n * stride)).collect();
            let queries: Vec<Vec<f32>> = lens.iter().map(|_| random(group * head_dim)).collect();
            let store = |rows: &Vec<Vec<f32>>| -> Vec<KvVec> {
                rows.iter()
                    .map(|r| {
                        let mut v = KvVec::new(kv_type);
                        v.extend(r);
                        assert_eq!(&v.to_f32(0..r.len()), r, "{kv_type} holds them exactly");
                        v
                    })
                    .collect()
            };
            let (keys_held, values_held) = (store(&keys), store(&values));
            let kv = n_kv_heads - 1;
            let hidden = |s: usize, j: usize| (s == 0 && j == 2) || (s == 1 && j % 7 == 3);
            let segment = |s: usize| Segment {
                rows: Rows {
                    keys: keys_held[s].view(),
                    values: values_held[s].view(),
                    stride,
                    offset: kv * head_dim,
                    len: lens[s],
                },
                queries: &queries[s],
                visible: move |j: usize| !hidden(s, j),
            };
            let (first, second) = (segment(0), segment(1));
            let scale = 0.125;
            let mut out = vec![0f32; group * head_dim];
            let mut scratch = Vec::new();
            attend_group(
                kernel,
                [&first, &second],
                group,
                head_dim,
                scale,
                &mut out,
                &mut scratch,
                None,
            );
            // The same keys in two parts, merged: one softmax over both.
            let mut outs = vec![vec![0f32; group * head_dim]; 2];
            let mut stats = vec![vec![0f32; 2 * group]; 2];
            for (p, segment) in [&first, &second].into_iter().enumerate() {
                let (o, s) = (&mut outs[p], &mut stats[p]);
                let part = Some(&mut s[..]);
                attend_group(
                    kernel,
                    [segment],
                    group,
                    head_dim,
                    scale,
                    o,
                    &mut scratch,
                    part,
                );
            }
            let mut merged = vec![0f32; group * head_dim];
            let (outs, stats): (Vec<&[f32]>, Vec<&[f32]>) = outs
                .iter()
                .zip(&stats)
                .map(|(o, s)| (&o[..], &s[..]))
                .unzip();
            merge_parts(&outs, &stats, head_dim, &mut merged);
            let split = merged
                .iter()
                .zip(&out)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                split < 1e-5,
                "{kernel:?} {kv_type} group {group} head_dim {head_dim}: split {split}"
            );
            for g in 0..group {
                let mut weights = Vec::new();
                for s in 0..2 {
                    for j in (0..lens[s]).filter(|&j| !hidden(s, j)) {
                        let q = &queries[s][g * head_dim..(g + 1) * head_dim];
                        let k = &keys[s][j * stride + kv * head_dim..][..head_dim];
                        let dot: f64 = q.iter().zip(k).map(|(a, b)| (a * b) as f64).sum();
                        weights.push((s, j, dot * scale as f64));
                    }
                }
                let max = weights.iter().fold(f64::MIN, |m, w| m.max(w.2));
                let total: f64 = weights.iter().map(|w| (w.2 - max).exp()).sum();
                for d in 0..head_dim {
                    let want: f64 = weights
                        .iter()
                        .map(|&(s, j, w)| {
                            (w - max).exp() / total
                                * values[s][j * stride + kv * head_dim + d] as f64
                        })
                        .sum();
                    let got = out[g * head_dim + d] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{kernel:?} {kv_type} group {group} head_dim {head_dim}: head {g} \
                         value {d}: {got} vs {want}"
                    );
                }
            }
        }
    }

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
