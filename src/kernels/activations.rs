//! Activations quantized like llama.cpp's (and candle's) Q8_0: per block of 32 values a scale
//! `d = max|x| / 127`, stored as f16, and the values `round(x / d)` as i8 (computed with the
//! unrounded `d`, as the reference does, so results match candle's to rounding order).

use half::f16;

/// Values per block.
pub const BLOCK: usize = 32;

/// `rows` rows of `cols` activations in Q8_0: `qs[row · cols + i]`, `d[row · blocks + b]`,
/// and each block's `d · Σ qs` (for kernels that offset their weights to unsigned values).
pub struct Q8Rows {
    pub rows: usize,
    pub cols: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub d_sums: Vec<f32>,
}

impl Q8Rows {
    /// Quantizes `x` (`rows × cols`, row-major; `cols` a multiple of 32).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), rows * cols);
        debug_assert_eq!(cols % BLOCK, 0);
        let mut qs = vec![0i8; rows * cols];
        let mut d = vec![0f32; rows * cols / BLOCK];
        let mut d_sums = vec![0f32; rows * cols / BLOCK];
        let blocks = x
            .chunks_exact(BLOCK)
            .zip(qs.chunks_exact_mut(BLOCK))
            .zip(d.iter_mut().zip(&mut d_sums));
        for ((block, q), (scale, d_sum)) in blocks {
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
            *d_sum = *scale * q.iter().map(|v| *v as i32).sum::<i32>() as f32;
        }
        Self {
            rows,
            cols,
            qs,
            d,
            d_sums,
        }
    }
}
