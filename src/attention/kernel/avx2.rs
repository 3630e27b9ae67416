//! The score and value passes of [`attend_group`](super::attend_group) written for AVX2 (with
//! FMA and F16C), the widest vectors of many x86-64 CPUs without AVX-512.
//!
//! The portable passes, even compiled for AVX2, take one key at a time: a horizontal sum per
//! head and key in the score pass, and in the value pass a load and a store of every output per
//! key, while the widening of f16 rows went through a library call per row. With the window full
//! that made a decode step twice as slow as at an empty context. Here:
//! - scores run in blocks of 8 keys, in tiles of up to 3 heads × 4 keys ([`dot_tile`]: 7 loads
//!   per 12 multiply-adds, where one head at a time took 9 per 8), each head's 8 sums stored as
//!   one vector, hidden keys as −∞;
//! - values are widened to f32 a block of keys at a time (the block stays in L1), then added
//!   into up to 4 heads × 16 outputs held in registers over the block.
//!
//! Each key and value row is read from memory once per group, whatever its storage type.

use std::arch::x86_64::*;

use super::super::kv_store::KvRows;
use super::{PREFETCH_AHEAD, Placement, Segment};

/// Keys scored together: one vector of scores per head.
const KEYS: usize = 8;
/// Bytes of a block of value rows widened to f32: a quarter of a 32 KiB L1.
const VALUE_BLOCK_BYTES: usize = 8192;
/// Heads whose outputs a value pass holds: 4 heads × 2 vectors, 2 rows' values and a
/// broadcast probability stay within the 16 vector registers.
const HEADS: usize = 4;
/// Outputs per head a value pass holds (two vectors).
const SLICE: usize = 16;

/// Heads × 4 keys of one dot-product tile: 12 accumulators, 3 queries and a key in the 16
/// vector registers.
const TILE_HEADS: usize = 3;

/// The dot products of `H` query rows with 4 key rows (`head_dim` values each, a multiple of
/// 8): key `k`'s product with query `h` in lane `k` of result `h`. Each step loads `H + 4`
/// vectors for `4·H` multiply-adds.
///
/// # Safety
/// Every pointer must address `head_dim` values.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_tile<const H: usize>(
    queries: [*const f32; H],
    keys: [*const f32; 4],
    head_dim: usize,
) -> [__m128; H] {
    // SAFETY: the caller's contract covers every load.
    unsafe {
        let mut a = [[_mm256_setzero_ps(); 4]; H];
        for c in (0..head_dim).step_by(8) {
            let q = queries.map(|q| _mm256_loadu_ps(q.add(c)));
            for (k, key) in keys.iter().enumerate() {
                let key = _mm256_loadu_ps(key.add(c));
                for (a, q) in a.iter_mut().zip(q) {
                    a[k] = _mm256_fmadd_ps(q, key, a[k]);
                }
            }
        }
        a.map(|a| {
            let t0 = _mm256_hadd_ps(a[0], a[1]);
            let t1 = _mm256_hadd_ps(a[2], a[3]);
            let u = _mm256_hadd_ps(t0, t1);
            _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps::<1>(u))
        })
    }
}

/// All ones in lane `k` where bit `k` of `visible` is set.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn lane_mask(visible: u8) -> __m256 {
    let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let set = _mm256_and_si256(_mm256_set1_epi32(visible as i32), bits);
    _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, bits))
}

impl<F: Fn(usize) -> bool> Segment<'_, F> {
    /// Scores whole blocks of 8 keys; returns how many keys it scored (the caller scores the
    /// rest one by one). Needs `head_dim` a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) fn score_blocks_avx2<'d>(
        &self,
        keys: impl KvRows<'d>,
        scores: &mut [f32],
        at: Placement,
        scale: f32,
    ) -> usize {
        let Placement {
            base,
            n_keys,
            group,
            head_dim,
        } = at;
        let blocks = self.whole_score_blocks(keys, scores, at, KEYS);
        // Keys that are not f32 are widened once per block, not once per head.
        let mut widened = vec![
            0f32;
            if keys.f32s().is_some() {
                0
            } else {
                KEYS * head_dim
            }
        ];
        for block in 0..blocks {
            let j0 = KEYS * block;
            for k in 0..KEYS {
                self.rows
                    .prefetch(keys, j0 + 2 * PREFETCH_AHEAD + k, 0, head_dim);
            }
            let visible = self.visible_mask(j0, KEYS) as u8;
            if visible == 0 {
                continue; // the buffer starts at −∞
            }
            let rows: [*const f32; KEYS] = match keys.f32s() {
                Some(all) => std::array::from_fn(|k| all[self.rows.at(j0 + k)..].as_ptr()),
                None => {
                    // SAFETY: the assertion above checked these slots.
                    unsafe { self.widen(keys, j0, &mut widened, head_dim) };
                    std::array::from_fn(|k| widened[k * head_dim..].as_ptr())
                }
            };
            let shown = lane_mask(visible);
            let (low, high): ([*const f32; 4], [*const f32; 4]) = (
                std::array::from_fn(|k| rows[k]),
                std::array::from_fn(|k| rows[4 + k]),
            );
            let mut g = 0;
            while g < group {
                let h = (group - g).min(TILE_HEADS);
                let q = |x: usize| self.queries[(g + x) * head_dim..].as_ptr();
                let mut store = |x: usize, low: __m128, high: __m128| {
                    let s = _mm256_mul_ps(_mm256_set_m128(high, low), _mm256_set1_ps(scale));
                    let s = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), s, shown);
                    // SAFETY: 8 of the scores the assertion above checked.
                    unsafe {
                        _mm256_storeu_ps(scores.as_mut_ptr().add((g + x) * n_keys + base + j0), s)
                    };
                };
                // SAFETY: the query rows hold `head_dim` values from `q(x)` (`x < h`, checked
                // above), and so does every key row from its pointer.
                unsafe {
                    match h {
                        3 => {
                            let (l, r) = (
                                dot_tile([0, 1, 2].map(q), low, head_dim),
                                dot_tile([0, 1, 2].map(q), high, head_dim),
                            );
                            (0..3).for_each(|x| store(x, l[x], r[x]));
                        }
                        2 => {
                            let (l, r) = (
                                dot_tile([0, 1].map(q), low, head_dim),
                                dot_tile([0, 1].map(q), high, head_dim),
                            );
                            (0..2).for_each(|x| store(x, l[x], r[x]));
                        }
                        _ => {
                            let (l, r) = (
                                dot_tile([0].map(q), low, head_dim),
                                dot_tile([0].map(q), high, head_dim),
                            );
                            store(0, l[0], r[0]);
                        }
                    }
                }
                g += h;
            }
        }
        KEYS * blocks
    }

    /// Slots `first ..` of `data` (one row of `head_dim` values per `head_dim` of `into`)
    /// widened to f32 into `into`.
    ///
    /// # Safety
    /// `data` must hold `head_dim` values (a multiple of 8) of every slot widened
    /// ([`Rows::fits`](super::Rows::fits) up to the last).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn widen<'d>(
        &self,
        data: impl KvRows<'d>,
        first: usize,
        into: &mut [f32],
        head_dim: usize,
    ) {
        for (k, into) in into.chunks_exact_mut(head_dim).enumerate() {
            let row = self.rows.at(first + k);
            for c in (0..head_dim).step_by(8) {
                // SAFETY: 8 of the `head_dim` values of a slot the caller vouches for, and of
                // its place in `into`.
                unsafe { _mm256_storeu_ps(into.as_mut_ptr().add(c), data.load8(row + c)) };
            }
        }
    }

    /// The value pass: for each block of keys, their value rows widened to f32 (or read in
    /// place when f32), then every head's outputs summed over the block in registers, up to
    /// [`HEADS`] heads × [`SLICE`] outputs per sweep. Needs `head_dim` a multiple of 16.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) fn accumulate_avx2<'d>(
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
        assert!(head_dim.is_multiple_of(SLICE) && self.rows.fits(values, head_dim));
        assert!(out.len() >= group * head_dim);
        let len = self.rows.len;
        if group > 0 {
            assert!(probs.len() >= (group - 1) * n_keys + base + len);
        }
        let block = (VALUE_BLOCK_BYTES / (4 * head_dim)).max(KEYS);
        let mut widened = vec![
            0f32;
            if values.f32s().is_some() {
                0
            } else {
                block * head_dim
            }
        ];
        let mut start = 0;
        while start < len {
            let n = (len - start).min(block);
            for k in 0..n {
                self.rows.prefetch(values, start + block + k, 0, head_dim);
            }
            let (rows, stride) = match values.f32s() {
                Some(all) => (all[self.rows.at(start)..].as_ptr(), self.rows.stride),
                None => {
                    // SAFETY: the assertion above checked these slots.
                    unsafe { self.widen(values, start, &mut widened[..n * head_dim], head_dim) };
                    (widened.as_ptr(), head_dim)
                }
            };
            let mut g = 0;
            while g < group {
                let h = (group - g).min(HEADS);
                let probs = |x: usize| &probs[(g + x) * n_keys + base + start..][..n];
                let out = &mut out[g * head_dim..];
                for slice in (0..head_dim).step_by(SLICE) {
                    let rows = BlockRows {
                        first: rows,
                        stride,
                        len: n,
                        from: slice,
                    };
                    // SAFETY: `rows` holds `n` rows of `head_dim` values `stride` apart (the
                    // segment's rows checked above, or `widened`), `slice + SLICE ≤ head_dim`,
                    // and `out` holds `h` heads of `head_dim` outputs (asserted above).
                    unsafe {
                        match h {
                            4 => add_weighted(rows, [0, 1, 2, 3].map(probs), out, head_dim),
                            3 => add_weighted(rows, [0, 1, 2].map(probs), out, head_dim),
                            2 => add_weighted(rows, [0, 1].map(probs), out, head_dim),
                            _ => add_weighted(rows, [0].map(probs), out, head_dim),
                        }
                    }
                }
                g += h;
            }
            start += n;
        }
    }
}

/// `len` rows of f32 values `stride` apart from `first`, of which a pass reads the [`SLICE`]
/// values from `from`.
#[derive(Clone, Copy)]
struct BlockRows {
    first: *const f32,
    stride: usize,
    len: usize,
    from: usize,
}

/// Adds `Σ_j p_h[j] · v_j[from .. from + 16]` to head `h`'s outputs (`out[h · head_dim + from..]`)
/// for `H` heads.
///
/// # Safety
/// Each of the `rows.len` rows must hold values `from .. from + 16`; every `probs[h]` must hold
/// `rows.len` probabilities, `out` must hold `H · head_dim` values, and `from + 16 ≤ head_dim`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn add_weighted<const H: usize>(
    rows: BlockRows,
    probs: [&[f32]; H],
    out: &mut [f32],
    head_dim: usize,
) {
    // SAFETY: the caller's contract covers every load and store.
    unsafe {
        let at = |h: usize, c: usize| out.as_ptr().add(h * head_dim + rows.from + 8 * c);
        let mut acc: [[__m256; 2]; H] =
            std::array::from_fn(|h| [_mm256_loadu_ps(at(h, 0)), _mm256_loadu_ps(at(h, 1))]);
        for j in 0..rows.len {
            let v = rows.first.add(j * rows.stride + rows.from);
            let v = [_mm256_loadu_ps(v), _mm256_loadu_ps(v.add(8))];
            for (acc, p) in acc.iter_mut().zip(probs) {
                let p = _mm256_set1_ps(*p.get_unchecked(j));
                acc[0] = _mm256_fmadd_ps(p, v[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(p, v[1], acc[1]);
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add(h * head_dim + rows.from);
            _mm256_storeu_ps(o, acc[0]);
            _mm256_storeu_ps(o.add(8), acc[1]);
        }
    }
}
