//! Quantized weight matrices, repacked at load into tiles of 16 rows so that one SIMD
//! multiply-add produces 16 outputs at once: Q4_0, Q5_0 and Q8_0 here, the k-quants (Q4_K, Q6_K) in
//! `kquant`, which share the tile order and the work split.
//!
//! GGUF stores a matrix row by row, 32 values per block. Multiplying row-major blocks gives one
//! output per dot product, which then needs a horizontal sum and a scale per block and output:
//! the earlier Q5_0 kernel spent most of its time there (docs/PERFORMANCE.md). Here the bytes of
//! 16 consecutive rows are interleaved per block, 4 values of each row side by side, so one
//! `dpbusd` (AVX-512 VNNI) multiplies 4 values of 16 rows by 4 broadcast activations, the block
//! scales of 16 rows are one vector, and outputs leave the kernel as whole vectors. The packed
//! matrix has exactly the GGUF bytes, reordered (plus zero rows up to a whole tile): no second
//! copy of the weights is kept.
//!
//! One *tile block* covers rows `16·t .. 16·t + 16` and values `32·b .. 32·b + 32`, stored in
//! tile-major order (`t`, then `b`), each laid out as:
//! - bytes 0..32: the 16 rows' block scales, f16;
//! - Q4_0: bytes 32..288: 4 chunks of 64 bytes, byte `4r + j` of chunk `p` holding row `r`'s
//!   value `4p + j` in its low nibble and value `16 + 4p + j` in its high nibble (minus 8);
//! - Q5_0: bytes 32..96: for each group `g` of 4 values (8 groups) one u64 whose bit `4r + j` is
//!   the fifth bit of row `r`'s value `4g + j`; bytes 96..352: 4 chunks of 64 bytes, byte
//!   `4r + j` of chunk `p` holding row `r`'s value `4p + j` in its low nibble and value
//!   `16 + 4p + j` in its high nibble (the value is `nibble | fifth << 4`, minus 16);
//! - Q8_0: bytes 32..544: 8 groups of 64 bytes, byte `4r + j` of group `g` = row `r`'s value
//!   `4g + j` (i8).

use candle_core::quantized::GgmlDType;
use half::f16;

use super::activations::{BLOCK, Q8Rows};
use super::{DisjointRows, KernelError, kquant};

/// Rows per tile: one 512-bit vector of i32 or f32.
pub(super) const TILE_ROWS: usize = 16;

/// Bytes of the 16 block scales that open every tile block.
pub(super) const SCALES: usize = 2 * TILE_ROWS;

/// Bytes of the per-group fifth bits of a Q5_0 tile block.
pub(super) const Q5_HIGH_BITS: usize = 8 * 8;

/// A weight type the kernels take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Q4_0,
    Q5_0,
    Q8_0,
    /// The k-quants: super-blocks of 256 values (`kquant`).
    Q4K,
    Q6K,
}

impl Format {
    /// The kernels' format for a GGUF tensor type, if they have one.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    /// Values of one GGUF block (and of one tile block, per row).
    pub const fn block_values(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => BLOCK,
            Self::Q4K | Self::Q6K => kquant::SUPER,
        }
    }

    /// Bytes of one GGUF block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Bytes of one tile block (16 rows × one block of values): 16 GGUF blocks' bytes, but for
    /// Q4_K's unpacked scales (`kquant`).
    pub const fn tile_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => self.block_bytes() * TILE_ROWS,
            Self::Q4K => kquant::Q4K_TILE,
            Self::Q6K => kquant::Q6K_TILE,
        }
    }

    /// Whether this is a k-quant (super-blocks, `kquant`).
    pub const fn is_k(self) -> bool {
        matches!(self, Self::Q4K | Self::Q6K)
    }
}

/// A `rows × cols` matrix in tiles (see the module documentation).
pub struct PackedMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    tiles: Vec<u8>,
}

impl PackedMatrix {
    /// Repacks `gguf` (row-major GGUF blocks of `format`) into tiles.
    pub fn new(format: Format, gguf: &[u8], rows: usize, cols: usize) -> Result<Self, KernelError> {
        let block = format.block_values();
        if !cols.is_multiple_of(block) {
            return Err(KernelError::Blocks { cols, block });
        }
        let blocks = cols / block;
        let bb = format.block_bytes();
        let size_error = |expected| KernelError::Size {
            got: gguf.len(),
            expected,
            rows,
            cols,
        };
        // Checked: a crafted shape must not wrap to the size of a small buffer.
        let expected = rows
            .checked_mul(blocks)
            .and_then(|n| n.checked_mul(bb))
            .ok_or(size_error(usize::MAX))?;
        if gguf.len() != expected {
            return Err(size_error(expected));
        }
        let n_tiles = rows.div_ceil(TILE_ROWS);
        let tb = format.tile_bytes();
        let row_bytes = blocks * tb;
        let tiles_len = n_tiles
            .checked_mul(row_bytes)
            .ok_or(size_error(usize::MAX))?;
        let mut tiles = vec![0u8; tiles_len];
        let dst = DisjointRows::new(&mut tiles, row_bytes);
        // In parallel: packing is memory-bound, and the 151,936-row token table alone would
        // add a tenth of a second to the model's load on one core.
        super::pool_execute_chunked(n_tiles, |ts| {
            for t in ts {
                // SAFETY: tile rows are disjoint, `t < n_tiles`.
                let tile_row = unsafe { dst.row(t) };
                for (b, tile) in tile_row.chunks_exact_mut(tb).enumerate() {
                    for r in 0..TILE_ROWS.min(rows - t * TILE_ROWS) {
                        let row = t * TILE_ROWS + r;
                        let src = &gguf[(row * blocks + b) * bb..][..bb];
                        match format {
                            Format::Q4_0 => pack_q4_0(src, r, tile),
                            Format::Q5_0 => pack_q5_0(src, r, tile),
                            Format::Q8_0 => pack_q8_0(src, r, tile),
                            Format::Q4K | Format::Q6K => kquant::pack(format, src, r, tile),
                        }
                    }
                }
            }
        });
        Ok(Self {
            format,
            rows,
            cols,
            tiles,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Blocks of the format's values (32, or a k-quant's 256) per row.
    pub(super) fn blocks(&self) -> usize {
        self.cols / self.format.block_values()
    }

    /// Bytes of the tile blocks of tile `t` (all blocks of its 16 rows).
    pub(super) fn tile_row(&self, t: usize) -> &[u8] {
        let len = self.blocks() * self.format.tile_bytes();
        &self.tiles[t * len..(t + 1) * len]
    }

    /// `x · Wᵀ` for `x` of `t` rows of `cols` values: `t × rows` values, row-major.
    pub fn matmul(&self, x: &[f32], t: usize) -> Result<Vec<f32>, KernelError> {
        if x.len() != t * self.cols {
            return Err(KernelError::Input {
                got: x.len(),
                expected: t * self.cols,
                rows: t,
                cols: self.cols,
            });
        }
        let xq = Q8Rows::quantize(x, t, self.cols);
        let mut y = vec![0f32; t * self.rows];
        let out = DisjointRows::new(&mut y, self.rows);
        super::Kernel::detect().matmul(self, &xq, out);
        Ok(y)
    }

    /// Row `row` as f32 values (embedding lookups from a packed table).
    pub fn dequantize_row(&self, row: usize) -> Vec<f32> {
        let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
        let tb = self.format.tile_bytes();
        let mut values = Vec::with_capacity(self.cols);
        for tile in self.tile_row(t).chunks_exact(tb) {
            if self.format.is_k() {
                kquant::dequantize(self.format, tile, r, &mut values);
            } else {
                let d = scale(tile, r);
                values.extend((0..BLOCK).map(|i| d * self.value(tile, r, i) as f32));
            }
        }
        values
    }

    /// Value `i` (0..32) of row `r` (0..16) of a tile block, as the signed integer it stands for.
    #[inline]
    pub(super) fn value(&self, tile: &[u8], r: usize, i: usize) -> i32 {
        let (g, j) = (i / 4, i % 4);
        match self.format {
            Format::Q4_0 => {
                let byte = tile[SCALES + (g % 4) * 64 + 4 * r + j];
                let nibble = if g < 4 { byte & 0x0F } else { byte >> 4 } as i32;
                nibble - 8
            }
            Format::Q5_0 => {
                let high = u64::from_le_bytes(std::array::from_fn(|k| tile[SCALES + 8 * g + k]));
                let fifth = ((high >> (4 * r + j)) & 1) as i32;
                let byte = tile[SCALES + Q5_HIGH_BITS + (g % 4) * 64 + 4 * r + j];
                let nibble = if g < 4 { byte & 0x0F } else { byte >> 4 } as i32;
                (nibble | fifth << 4) - 16
            }
            Format::Q8_0 => tile[SCALES + g * 64 + 4 * r + j] as i8 as i32,
            Format::Q4K | Format::Q6K => unreachable!("k-quant values are read by kquant"),
        }
    }
}

/// Row `r`'s block scale in a tile block.
#[inline]
pub(super) fn scale(tile: &[u8], r: usize) -> f32 {
    f16::from_le_bytes([tile[2 * r], tile[2 * r + 1]]).to_f32()
}

/// Places GGUF Q4_0 block `src` (f16 scale, 16 bytes of nibbles laid out as Q5_0's) as row `r`
/// of `tile`.
fn pack_q4_0(src: &[u8], r: usize, tile: &mut [u8]) {
    tile[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
    for p in 0..4 {
        let at = SCALES + 64 * p + 4 * r;
        tile[at..at + 4].copy_from_slice(&src[2 + 4 * p..6 + 4 * p]);
    }
}

/// Places GGUF Q5_0 block `src` (f16 scale, u32 fifth bits, 16 bytes of nibbles: value `i` in
/// the low nibble of byte `i`, value `16 + i` in its high nibble) as row `r` of `tile`. GGUF's
/// nibble bytes are already what chunk `p` wants (values `4p + j` and `16 + 4p + j`), so they
/// move 4 at a time; the fifth bits move 4 at a time into each group's u64.
fn pack_q5_0(src: &[u8], r: usize, tile: &mut [u8]) {
    tile[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
    let high = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
    for g in 0..8 {
        let bits = ((high >> (4 * g)) & 0x0F) as u8;
        tile[SCALES + 8 * g + r / 2] |= bits << (4 * (r % 2));
    }
    for p in 0..4 {
        let at = SCALES + Q5_HIGH_BITS + 64 * p + 4 * r;
        tile[at..at + 4].copy_from_slice(&src[6 + 4 * p..10 + 4 * p]);
    }
}

/// Places GGUF Q8_0 block `src` (f16 scale, 32 × i8) as row `r` of `tile`, 4 values at a time.
fn pack_q8_0(src: &[u8], r: usize, tile: &mut [u8]) {
    tile[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
    for g in 0..8 {
        let at = SCALES + 64 * g + 4 * r;
        tile[at..at + 4].copy_from_slice(&src[2 + 4 * g..6 + 4 * g]);
    }
}

/// The reference arithmetic, in candle's order (integer block sums, then `× d_w × d_x`): tile
/// `t` against activation rows `rows`.
///
/// # Safety
/// `out` must be `x.rows × m.rows`, its block of tile `t` and `rows` written by no one else
/// meanwhile.
pub(super) unsafe fn scalar_unit(
    m: &PackedMatrix,
    x: &Q8Rows,
    t: usize,
    rows: std::ops::Range<usize>,
    out: DisjointRows,
) {
    if m.format.is_k() {
        // SAFETY: the caller's promise.
        return unsafe { kquant::scalar_unit(m, x, t, rows, out) };
    }
    let (blocks, tb) = (m.blocks(), m.format.tile_bytes());
    let tile_row = m.tile_row(t);
    for r in 0..TILE_ROWS.min(m.rows - t * TILE_ROWS) {
        for row in rows.clone() {
            let xs = &x.qs[row * x.cols..(row + 1) * x.cols];
            let mut sum = 0f32;
            for (b, tile) in tile_row.chunks_exact(tb).enumerate() {
                let isum: i32 = (0..BLOCK)
                    .map(|i| m.value(tile, r, i) * xs[b * BLOCK + i] as i32)
                    .sum();
                sum += isum as f32 * scale(tile, r) * x.d[row * blocks + b];
            }
            // SAFETY: the caller's promise.
            unsafe { out.write(row, t * TILE_ROWS + r, sum) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::activations::rounding_share;
    use super::super::{DisjointRows, Kernel};
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    /// A random matrix made by candle's quantizer: packed, as candle's matmul, and dequantized.
    fn random_matrix(
        rng: &mut StdRng,
        format: Format,
        rows: usize,
        cols: usize,
    ) -> (PackedMatrix, QMatMul, Tensor) {
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let dtype = match format {
            Format::Q4_0 => GgmlDType::Q4_0,
            Format::Q5_0 => GgmlDType::Q5_0,
            Format::Q8_0 => GgmlDType::Q8_0,
            Format::Q4K | Format::Q6K => unreachable!("kquant's tests cover these"),
        };
        let q = QTensor::quantize(&dense, dtype).unwrap();
        let m = PackedMatrix::new(format, &q.data().unwrap(), rows, cols).unwrap();
        let dequantized = q.dequantize(&Device::Cpu).unwrap();
        (m, QMatMul::from_qtensor(q).unwrap(), dequantized)
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    fn rows_of(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Every implementation against candle's matmul (same quantization of the activations, so
    /// only the summation order differs) and against dequantize-then-multiply in f32 (within
    /// the activation rounding's bound, `activations::rounding_share`), on partial tiles, odd
    /// shapes and every remainder of activation rows per work item.
    #[test]
    fn every_kernel_matches_candle_and_the_dequantized_reference() {
        let mut rng = StdRng::seed_from_u64(7);
        for format in [Format::Q4_0, Format::Q5_0, Format::Q8_0] {
            let mut worst_vs_f32 = 0f32;
            for (rows, cols) in [(1, 32), (5, 64), (16, 32), (37, 96), (67, 896)] {
                let (m, qmatmul, dequantized) = random_matrix(&mut rng, format, rows, cols);
                for t in [1, 2, 3, 4, 5, 6, 7, 13] {
                    let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let xt = Tensor::from_vec(x.clone(), (t, cols), &Device::Cpu).unwrap();
                    let candle = rows_of(&qmatmul.forward(&xt).unwrap());
                    let reference = rows_of(&xt.matmul(&dequantized.t().unwrap()).unwrap());
                    let w = rows_of(&dequantized);
                    let xq = Q8Rows::quantize(&x, t, cols);
                    for kernel in Kernel::available() {
                        let mut y = vec![f32::NAN; t * rows];
                        kernel.matmul(&m, &xq, DisjointRows::new(&mut y, rows));
                        let what = format!("{format:?} {kernel:?} {rows}×{cols}, t={t}");
                        let vs_candle = max_rel(&y, &candle);
                        assert!(vs_candle < 1e-5, "{what} vs candle: {vs_candle}");
                        let vs_f32 = rounding_share(&x, &w, cols, &y, &reference);
                        assert!(
                            vs_f32 < 1.01,
                            "{what} vs f32: {vs_f32} of the rounding bound"
                        );
                        worst_vs_f32 = worst_vs_f32.max(vs_f32);
                    }
                    let y = m.matmul(&x, t).unwrap();
                    assert!(max_rel(&y, &candle) < 1e-5, "matmul {rows}×{cols}, t={t}");
                }
            }
            // The rounding moves results by a good part of its bound, never past it.
            assert!(
                worst_vs_f32 > 0.05 && worst_vs_f32 < 1.01,
                "{format:?}: {worst_vs_f32}"
            );
        }
    }

    /// Extreme values: Q8_0's −128 and 127 against ±127 activations (the AVX2 path's 16-bit
    /// pair sums must not saturate), Q5_0's −16 and 15.
    #[test]
    fn extreme_values_do_not_saturate() {
        let cases = [
            (Format::Q8_0, -128i8, 127i8),
            (Format::Q5_0, -16, 15),
            (Format::Q4_0, -8, 7),
        ];
        for (format, lo, hi) in cases {
            let (rows, cols) = (16, 64);
            let blocks = cols / BLOCK;
            let mut gguf = Vec::new();
            for row in 0..rows {
                for _ in 0..blocks {
                    gguf.extend_from_slice(&f16::from_f32(1.0).to_le_bytes());
                    let v = if row % 2 == 0 { lo } else { hi };
                    match format {
                        Format::Q8_0 => gguf.extend(std::iter::repeat_n(v as u8, BLOCK)),
                        Format::Q5_0 => {
                            let u = (v as i32 + 16) as u8;
                            let high: u32 = if u & 0x10 != 0 { u32::MAX } else { 0 };
                            gguf.extend_from_slice(&high.to_le_bytes());
                            gguf.extend(std::iter::repeat_n((u & 0x0F) | (u & 0x0F) << 4, 16));
                        }
                        Format::Q4_0 => {
                            let u = (v as i32 + 8) as u8;
                            gguf.extend(std::iter::repeat_n(u | u << 4, 16));
                        }
                        Format::Q4K | Format::Q6K => unreachable!("kquant's tests cover these"),
                    }
                }
            }
            let m = PackedMatrix::new(format, &gguf, rows, cols).unwrap();
            let x = vec![-1f32; cols];
            for kernel in Kernel::available() {
                let xq = Q8Rows::quantize(&x, 1, cols);
                let mut y = vec![0f32; rows];
                kernel.matmul(&m, &xq, DisjointRows::new(&mut y, rows));
                for (row, got) in y.iter().enumerate() {
                    let v = if row % 2 == 0 { lo } else { hi };
                    // −1 quantizes to −127 × f16(1/127): 1 − 4e-5, the same in every kernel.
                    let want = -(v as f32) * cols as f32 * (127.0 * xq.d[0]);
                    let err = (got - want).abs() / want.abs();
                    assert!(
                        err < 1e-6,
                        "{format:?} {kernel:?} row {row}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_dequantize_as_candle_does() {
        let mut rng = StdRng::seed_from_u64(3);
        for format in [Format::Q4_0, Format::Q5_0, Format::Q8_0] {
            let (m, _, dequantized) = random_matrix(&mut rng, format, 21, 96);
            for row in [0, 7, 15, 16, 20] {
                let want = dequantized.get(row).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(m.dequantize_row(row), want, "{format:?} row {row}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert_eq!(
            PackedMatrix::new(Format::Q5_0, &[0; 22], 1, 33).err(),
            Some(KernelError::Blocks {
                cols: 33,
                block: 32
            })
        );
        assert!(matches!(
            PackedMatrix::new(Format::Q8_0, &[0; 33], 1, 32),
            Err(KernelError::Size { .. })
        ));
        let m = PackedMatrix::new(Format::Q5_0, &[0; 22], 1, 32).unwrap();
        assert!(matches!(
            m.matmul(&[0.0; 31], 1),
            Err(KernelError::Input { .. })
        ));
    }
}
