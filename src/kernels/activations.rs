//! Activations quantized like llama.cpp's (and candle's) Q8_0: per block of 32 values a scale
//! `d = max|x| / 127`, stored as f16, and the values `round(x / d)` as i8 (computed with the
//! unrounded `d`, as the reference does, so results match candle's to rounding order).

use half::f16;

/// Values per block.
pub const BLOCK: usize = 32;

/// `rows` rows of `cols` activations in Q8_0: `qs[row · cols + i]`, `d[row · blocks + b]`,
/// each block's `d · Σ qs` (for kernels that offset their weights to unsigned values), and
/// the integer `Σ qs` of each half block (Q6_K, whose scales cover 16 values).
pub struct Q8Rows {
    pub rows: usize,
    pub cols: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub d_sums: Vec<f32>,
    pub half_sums: Vec<i32>,
}

impl Q8Rows {
    /// Quantizes `x` (`rows × cols`, row-major; `cols` a multiple of 32), vectorized for the
    /// CPU (`Kernel::vectorize`: in a portable build the baseline's `round` is a libm call per
    /// value).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        super::Kernel::detect().vectorize(
            #[inline(always)]
            || Self::quantize_here(x, rows, cols),
        )
    }

    #[inline(always)]
    fn quantize_here(x: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), rows * cols);
        debug_assert_eq!(cols % BLOCK, 0);
        let mut qs = vec![0i8; rows * cols];
        let mut d = vec![0f32; rows * cols / BLOCK];
        let mut d_sums = vec![0f32; rows * cols / BLOCK];
        let mut half_sums = vec![0i32; 2 * rows * cols / BLOCK];
        let blocks = x
            .chunks_exact(BLOCK)
            .zip(qs.chunks_exact_mut(BLOCK))
            .zip(d.iter_mut().zip(&mut d_sums))
            .zip(half_sums.chunks_exact_mut(2));
        for (((block, q), (scale, d_sum)), halves) in blocks {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let unrounded = amax / 127.0;
            let inverse = if unrounded != 0.0 {
                1.0 / unrounded
            } else {
                0.0
            };
            for (q, v) in q.iter_mut().zip(block) {
                *q = (v * inverse).round() as i8;
            }
            *scale = f16::from_f32(unrounded).to_f32();
            for (half, sum) in q.chunks_exact(BLOCK / 2).zip(halves.iter_mut()) {
                *sum = half.iter().map(|v| *v as i32).sum();
            }
            *d_sum = *scale * (halves[0] + halves[1]) as f32;
        }
        Self {
            rows,
            cols,
            qs,
            d,
            d_sums,
            half_sums,
        }
    }
}

/// How far `y` (a kernel's `x · Wᵀ`, `t × rows`) is from `reference` (the same in f32
/// arithmetic on the dequantized weights `w`, `rows × cols`), as a share of the most the
/// activations' 8-bit rounding can move it: each activation moves by at most half a step plus
/// the f16 rounding of its block's scale, `max|x| · (1/254 + 1/2048)`, so output `j` by at most
/// that times `Σ|w_j|`. A kernel is right when this stays below 1 (plus float summation slack);
/// a wrong value anywhere goes far past it. Unlike a relative error, it does not depend on
/// whether an output happens to be small.
#[cfg(test)]
pub(super) fn rounding_share(
    x: &[f32],
    w: &[f32],
    cols: usize,
    y: &[f32],
    reference: &[f32],
) -> f32 {
    let rows = w.len() / cols;
    let w_sums: Vec<f32> = w
        .chunks_exact(cols)
        .map(|row| row.iter().map(|v| v.abs()).sum())
        .collect();
    let mut worst = 0f32;
    for (r, xs) in x.chunks_exact(cols).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = amax * (1.0 / 254.0 + 1.0 / 2048.0);
        for j in 0..rows {
            let bound = step * w_sums[j] + 1e-6;
            worst = worst.max((y[r * rows + j] - reference[r * rows + j]).abs() / bound);
        }
    }
    worst
}
