//! The attention of a chunk of query tokens (prefill), as matrix products.
//!
//! The per-row kernel (`kernel.rs`) scores one token's group of heads against every key it may
//! see: right for decoding, where one row meets each key once, but in a prefill chunk every key
//! is met by every token, and the per-key horizontal sums cost more than the multiplications. Here
//! a block of tokens × one KV group is one matrix: scores are `Q · Kᵀ` and outputs `P · V`,
//! products run by the `gemm` crate (candle's own f32 kernels) over blocks of keys, with an
//! online softmax (running max, sum and rescaled outputs: the flash-attention recurrence) so
//! scores never leave the cache. The Λ rule becomes, per segment, an interval of visible key
//! positions per query row: `(i − window, i]` at true distance, `[0, i − window]` for the sinks.

use gemm::{Parallelism, gemm};

use super::kv_store::KvView;
use super::window_start;
use crate::kernels::{Kernel, fast_exp};

/// Keys scored per step: `rows × KEY_BLOCK` scores stay in the L2 cache.
const KEY_BLOCK: usize = 512;
/// Independent accumulators per row pass, so reductions vectorize.
const LANES: usize = 16;

/// Which positions of a segment a query at position `i` sees.
#[derive(Clone, Copy)]
pub(super) enum Visible {
    /// `i − window < p ≤ i`: the window, at true distance.
    Window(u64),
    /// `p + window ≤ i`: sinks and pinned tokens that left the window, at the clamped distance.
    OutsideWindow(u64),
}

impl Visible {
    /// The inclusive range of visible positions for a query at `i` (`None`: nothing).
    fn bounds(self, i: u64) -> Option<(u64, u64)> {
        match self {
            Visible::Window(w) => Some((window_start(i, w), i)),
            Visible::OutsideWindow(w) => i.checked_sub(w).map(|hi| (0, hi)),
        }
    }
}

/// One segment of keys for a block: rows `[slot][kv_head][head_dim]` viewed for one KV head,
/// each slot's absolute position, the packed queries it is scored with, and its rule.
pub(super) struct BlockSegment<'a> {
    pub keys: KvView<'a>,
    pub values: KvView<'a>,
    /// Values between consecutive slots.
    pub stride: usize,
    /// Offset of this KV head inside a slot.
    pub offset: usize,
    /// Position of each slot (`u64::MAX`: empty).
    pub positions: &'a [u64],
    /// The slots to consider (others are invisible to every row of the block).
    pub slots: std::ops::Range<usize>,
    /// `[row][head_dim]`, already scaled.
    pub queries: &'a [f32],
    pub visible: Visible,
}

/// Reused buffers of one worker.
#[derive(Default)]
pub(super) struct BlockScratch {
    scores: Vec<f32>,
    out: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    /// `Σ e·s` per row, for the entropy.
    weighted: Vec<f64>,
    /// A narrow segment's block of keys or values widened to f32, `[key][head_dim]`.
    widened: Vec<f32>,
}

/// A block of `n` slots from `start` of one KV head's rows as the `gemm` crate reads them:
/// a pointer and the stride between slots. f32 rows are read in place; f16 and q8_0 rows are
/// widened into `buf` first (`n × head_dim` conversions against `rows × n × head_dim`
/// multiplications).
fn block_rows(
    rows: KvView<'_>,
    seg: &BlockSegment<'_>,
    start: usize,
    n: usize,
    head_dim: usize,
    buf: &mut Vec<f32>,
) -> (*const f32, usize) {
    let first = start * seg.stride + seg.offset;
    match rows {
        KvView::F32(v) => (v[first..].as_ptr(), seg.stride),
        narrow => {
            buf.resize(n * head_dim, 0.0);
            for (j, out) in buf.chunks_exact_mut(head_dim).enumerate() {
                narrow.widen(first + j * seg.stride, out);
            }
            (buf.as_ptr(), head_dim)
        }
    }
}

/// Where a block's rows are: `rows = tokens × group`, row `r` is token `r / group` at absolute
/// position `first_position + r / group`.
#[derive(Clone, Copy)]
pub(super) struct BlockShape {
    pub rows: usize,
    pub group: usize,
    pub head_dim: usize,
    pub first_position: u64,
}

/// Attends the block's rows to every segment; returns the outputs `[row][head_dim]` (in
/// `scratch`) and, when `entropy` is given, writes each row's attention entropy there.
pub(super) fn attend_block<'s>(
    segments: &[BlockSegment<'_>],
    shape: BlockShape,
    scratch: &'s mut BlockScratch,
    mut entropy: Option<&mut [f32]>,
) -> &'s [f32] {
    let BlockShape {
        rows,
        group,
        head_dim: d,
        first_position,
    } = shape;
    let s = scratch;
    let kernel = Kernel::detect();
    s.out.clear();
    s.out.resize(rows * d, 0.0);
    s.max.clear();
    s.max.resize(rows, f32::NEG_INFINITY);
    s.sum.clear();
    s.sum.resize(rows, 0.0);
    s.weighted.clear();
    s.weighted.resize(rows, 0.0);
    s.scores.resize(rows * KEY_BLOCK, 0.0);
    for seg in segments {
        let mut start = seg.slots.start;
        while start < seg.slots.end {
            let n = (seg.slots.end - start).min(KEY_BLOCK);
            let (keys, key_stride) = block_rows(seg.keys, seg, start, n, d, &mut s.widened);
            // S = Q · Kᵀ for keys start..start + n (row stride n).
            // SAFETY: every pointer and stride below describes memory inside the slices: `n`
            // keys from `start`, `head_dim` floats each, rows `key_stride` floats apart (in the
            // segment at `offset`, or in the widened copy).
            unsafe {
                gemm(
                    rows,
                    n,
                    d,
                    s.scores.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    seg.queries.as_ptr(),
                    1,
                    d as isize,
                    keys,
                    key_stride as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            let positions = &seg.positions[start..start + n];
            let mut any = false;
            for r in 0..rows {
                let row = &mut s.scores[r * n..(r + 1) * n];
                let i = first_position + (r / group) as u64;
                let (max, sum) = (&mut s.max[r], &mut s.sum[r]);
                let weighted = entropy.is_some().then_some(&mut s.weighted[r]);
                let out = &mut s.out[r * d..(r + 1) * d];
                let bounds = seg.visible.bounds(i);
                let seen = kernel.vectorize(
                    #[inline(always)]
                    || update_row(row, positions, bounds, max, sum, weighted, out),
                );
                any |= seen;
            }
            if any {
                let (values, value_stride) =
                    block_rows(seg.values, seg, start, n, d, &mut s.widened);
                // O += P · V.
                // SAFETY: as above, for the values.
                unsafe {
                    gemm(
                        rows,
                        d,
                        n,
                        s.out.as_mut_ptr(),
                        1,
                        d as isize,
                        true,
                        s.scores.as_ptr(),
                        1,
                        n as isize,
                        values,
                        1,
                        value_stride as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
            start += n;
        }
    }
    for r in 0..rows {
        let sum = s.sum[r];
        if sum > 0.0 {
            let inv = 1.0 / sum;
            s.out[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
        }
        if let Some(h) = entropy.as_deref_mut() {
            // H = ln l + m − Σ e·s / l, with e = exp(s − m) and l = Σ e.
            h[r] = if sum > 0.0 {
                ((sum as f64).ln() + s.max[r] as f64 - s.weighted[r] / sum as f64) as f32
            } else {
                0.0
            };
        }
    }
    &s.out
}

/// One row of one key block: masks what the rule hides, moves the running max, rescales the
/// row's sum, output and entropy term, and turns the scores into `exp(s − max)` (0 where
/// hidden) for the `P · V` product. Returns whether any key was visible. Inlined into
/// [`Kernel::vectorize`] by its caller, so it runs at the CPU's vector width.
#[inline(always)]
fn update_row(
    row: &mut [f32],
    positions: &[u64],
    bounds: Option<(u64, u64)>,
    max: &mut f32,
    sum: &mut f32,
    mut weighted: Option<&mut f64>,
    out: &mut [f32],
) -> bool {
    let Some((lo, hi)) = bounds else {
        row.fill(0.0);
        return false;
    };
    // Mask and max in 16 lanes (no serial chain: the loop vectorizes).
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for (c, p) in row.chunks_mut(LANES).zip(positions.chunks(LANES)) {
        for l in 0..c.len() {
            let keep = lo <= p[l] && p[l] <= hi;
            c[l] = if keep { c[l] } else { f32::NEG_INFINITY };
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    let block_max = lanes.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    if block_max == f32::NEG_INFINITY {
        row.fill(0.0);
        return false;
    }
    let new_max = max.max(block_max);
    // Earlier blocks were weighed against the old max: bring them to the new one (nothing to
    // rescale before the first visible key: sum, output and entropy term are still 0).
    if *max != f32::NEG_INFINITY && new_max > *max {
        let c = fast_exp(*max - new_max);
        *sum *= c;
        out.iter_mut().for_each(|o| *o *= c);
        if let Some(w) = weighted.as_deref_mut() {
            *w *= c as f64;
        }
    }
    *max = new_max;
    let mut sums = [0f32; LANES];
    let mut weighted_sums = [0f32; LANES];
    let with_entropy = weighted.is_some();
    for c in row.chunks_mut(LANES) {
        for l in 0..c.len() {
            let x = c[l];
            let hidden = x == f32::NEG_INFINITY;
            let e = if hidden { 0.0 } else { fast_exp(x - new_max) };
            if with_entropy {
                weighted_sums[l] += if hidden { 0.0 } else { e * x };
            }
            c[l] = e;
            sums[l] += e;
        }
    }
    let total: f32 = sums.iter().sum();
    if let Some(w) = weighted {
        *w += weighted_sums.iter().map(|&x| x as f64).sum::<f64>();
    }
    *sum += total;
    true
}
