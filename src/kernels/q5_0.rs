//! Q5_0 weights × Q8_0 activations. Q5_0 is most of the default model's weights (133 of 170
//! matrices), and candle's CPU kernel for it is scalar: it was 87% of prefill time and half of
//! decode time. This one keeps the weights as GGUF stores them (22 bytes per 32 values) and
//! unpacks each block in registers once per tile of activation rows, as llama.cpp does.

use half::f16;

use super::q8_0::{BLOCK, Q8Rows};
use super::{KernelError, ROWS_PER_ITEM};

/// Bytes of one block: f16 scale, 4 bytes of fifth bits, 16 bytes of nibbles. Value `i` of a
/// block is `(nibble_i | fifth_bit_i << 4) − 16` times the scale, where values 0..16 are the
/// low nibbles of the 16 bytes and values 16..32 their high nibbles.
const BLOCK_BYTES: usize = 22;

/// A `rows × cols` Q5_0 matrix in GGUF's layout: row-major, `cols / 32` blocks per row.
pub struct Q5_0Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<u8>,
}

/// The output `t × n`, shared by the pool's workers: each writes the columns of its own
/// weight rows, in every output row.
#[derive(Clone, Copy)]
pub(super) struct Out {
    ptr: *mut f32,
    n: usize,
}
// SAFETY: workers write disjoint columns (see `matmul`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Writes `y[r][j]`.
    ///
    /// # Safety
    /// `(r, j)` must be inside the output, and no other worker may write column `j`.
    unsafe fn write(self, r: usize, j: usize, value: f32) {
        // SAFETY: the caller's promise.
        unsafe { *self.ptr.add(r * self.n + j) = value }
    }
}

impl Q5_0Matrix {
    pub fn new(blocks: Vec<u8>, rows: usize, cols: usize) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::Blocks { cols, block: BLOCK });
        }
        let expected = rows * cols / BLOCK * BLOCK_BYTES;
        if blocks.len() != expected {
            return Err(KernelError::Size {
                got: blocks.len(),
                expected,
                rows,
                cols,
            });
        }
        Ok(Self { rows, cols, blocks })
    }

    pub fn rows(&self) -> usize {
        self.rows
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
        let n = self.rows;
        let mut y = vec![0f32; t * n];
        let out = Out {
            ptr: y.as_mut_ptr(),
            n,
        };
        let kernel = Kernel::detect();
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(ROWS_PER_ITEM), |items| {
            for item in items {
                let rows = item * ROWS_PER_ITEM..((item + 1) * ROWS_PER_ITEM).min(n);
                // SAFETY: items own disjoint weight rows, i.e. disjoint columns of `y`.
                unsafe { kernel.rows(self, &xq, rows, out) };
            }
        });
        Ok(y)
    }

    fn row_blocks(&self, row: usize) -> &[u8] {
        let bytes = self.cols / BLOCK * BLOCK_BYTES;
        &self.blocks[row * bytes..(row + 1) * bytes]
    }
}

/// Which implementation this CPU runs, in order of capability (each needs the features of the
/// ones before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// Every implementation this CPU can run (for the tests): the variants up to the best.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let best = Self::detect();
        let mut all = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        all.extend(
            [Self::Avx2, Self::Avx512Vnni]
                .into_iter()
                .filter(|k| *k <= best),
        );
        all
    }

    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                return Self::Avx512Vnni;
            }
            return Self::Avx2;
        }
        Self::Scalar
    }

    /// Weight rows `rows` against every activation row: columns `rows` of `out`.
    ///
    /// # Safety
    /// `out` must be `x.rows × m.rows`, its columns `rows` written by no one else meanwhile.
    unsafe fn rows(self, m: &Q5_0Matrix, x: &Q8Rows, rows: std::ops::Range<usize>, out: Out) {
        // SAFETY: the caller's promise; `detect` saw the features of the SIMD kernels.
        unsafe {
            match self {
                Self::Scalar => scalar_rows(m, x, rows, out),
                #[cfg(target_arch = "x86_64")]
                Self::Avx2 => x86::rows(m, x, rows, out),
                #[cfg(target_arch = "x86_64")]
                Self::Avx512Vnni => x86::rows_vnni(m, x, rows, out),
            }
        }
    }
}

/// The reference arithmetic, in candle's order (integer block sums, then `× d_w × d_x`).
///
/// # Safety
/// As [`Kernel::rows`].
unsafe fn scalar_rows(m: &Q5_0Matrix, x: &Q8Rows, rows: std::ops::Range<usize>, out: Out) {
    let (t, blocks) = (x.rows, x.blocks_per_row());
    for j in rows {
        let w = m.row_blocks(j);
        for r in 0..t {
            let xs = &x.qs[r * x.cols..(r + 1) * x.cols];
            let mut sum = 0f32;
            for b in 0..blocks {
                let blk = &w[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let xb = &xs[b * BLOCK..(b + 1) * BLOCK];
                let mut isum = 0i32;
                for (i, q) in blk[6..].iter().enumerate() {
                    let lo = (q & 0x0F) as i32 | (((qh >> i) & 1) << 4) as i32;
                    let hi = (q >> 4) as i32 | (((qh >> (i + 16)) & 1) << 4) as i32;
                    isum += (lo - 16) * xb[i] as i32 + (hi - 16) * xb[i + 16] as i32;
                }
                sum += isum as f32 * d * x.d[r * blocks + b];
            }
            // SAFETY: the caller's promise.
            unsafe { out.write(r, j, sum) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Weights are unpacked to unsigned bytes `w + 16` (0..31), so one unsigned × signed
    //! multiply-add (`maddubs`, or VNNI's `dpbusd`) takes them straight against the activations;
    //! the `16 · Σx` this adds is taken off once per output from per-block sums. Each unpacked
    //! weight block serves a tile of activation rows, and each activation load two weight rows.

    use std::arch::x86_64::*;

    use half::f16;

    use super::{BLOCK, BLOCK_BYTES, Out, Q5_0Matrix, Q8Rows};

    /// Activation rows per tile.
    const TILE: usize = 4;

    /// How far ahead weights are prefetched: 160 blocks (3.5 KB) measured best, from 12 to 256.
    const PREFETCH_BLOCKS: usize = 160;

    /// 0xFF in byte `i` where bit `i` of `bits` is set (llama.cpp's `bytes_from_bits_32`).
    #[inline(always)]
    unsafe fn bytes_from_bits(bits: u32) -> __m256i {
        // SAFETY: AVX2, which every caller enables.
        unsafe {
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(bits as i32),
                _mm256_set_epi64x(
                    0x0303_0303_0303_0303,
                    0x0202_0202_0202_0202,
                    0x0101_0101_0101_0101,
                    0,
                ),
            );
            let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
            _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
        }
    }

    /// Block `b` of a row as 32 unsigned bytes `w + 16`, and its scale.
    #[inline(always)]
    unsafe fn unpack(row: &[u8], b: usize) -> (__m256i, f32) {
        let blk = &row[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        // SAFETY: AVX2; `blk[6..22]` is 16 bytes.
        unsafe {
            let low4 = _mm_set1_epi8(0x0F);
            let qs = _mm_loadu_si128(blk[6..].as_ptr() as *const __m128i);
            let nibbles = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(qs, 4), low4),
                _mm_and_si128(qs, low4),
            );
            let fifth = _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(0x10));
            (_mm256_or_si256(nibbles, fifth), d)
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: AVX, which every caller enables.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
        }
    }

    /// Generates a kernel for one multiply-add: `$dot(w_unsigned, x_signed) → 8 × i32`.
    macro_rules! kernel {
        ($name:ident, $features:literal, $dot:expr) => {
            /// # Safety
            /// The CPU must have these features; as [`super::Kernel::rows`] for `out`.
            #[target_feature(enable = $features)]
            pub unsafe fn $name(
                m: &Q5_0Matrix,
                x: &Q8Rows,
                rows: std::ops::Range<usize>,
                out: Out,
            ) {
                if x.rows == 1 {
                    // Decoding streams the weights from memory: one row at a time, prefetched,
                    // measured fastest (28 GB/s against 24 for pairs).
                    for j in rows {
                        // SAFETY: as below.
                        unsafe { tile::<1, 1>(m, x, j, 0, out) };
                    }
                    return;
                }
                let mut r0 = 0;
                while r0 < x.rows {
                    let n = (x.rows - r0).min(TILE);
                    let mut j = rows.start;
                    while j < rows.end {
                        let pair = rows.end - j >= 2;
                        // SAFETY: the caller's promises; `r0 + n ≤ x.rows`, `j (+ 1) < rows.end`.
                        unsafe {
                            match (n, pair) {
                                (4, true) => tile::<4, 2>(m, x, j, r0, out),
                                (3, true) => tile::<3, 2>(m, x, j, r0, out),
                                (2, true) => tile::<2, 2>(m, x, j, r0, out),
                                (_, true) => tile::<1, 2>(m, x, j, r0, out),
                                (4, false) => tile::<4, 1>(m, x, j, r0, out),
                                (3, false) => tile::<3, 1>(m, x, j, r0, out),
                                (2, false) => tile::<2, 1>(m, x, j, r0, out),
                                (_, false) => tile::<1, 1>(m, x, j, r0, out),
                            }
                        }
                        j += if pair { 2 } else { 1 };
                    }
                    r0 += n;
                }

                /// Activation rows `r0..r0 + R` against weight rows `j0..j0 + W`.
                #[target_feature(enable = $features)]
                unsafe fn tile<const R: usize, const W: usize>(
                    m: &Q5_0Matrix,
                    x: &Q8Rows,
                    j0: usize,
                    r0: usize,
                    out: Out,
                ) {
                    let blocks = x.blocks_per_row();
                    let w_rows: [&[u8]; W] = std::array::from_fn(|i| m.row_blocks(j0 + i));
                    let mut acc = [[_mm256_setzero_ps(); R]; W];
                    // Σ_b d_w · d_x · Σx: the offset's share (× 16), per output.
                    let mut taken = [[0f32; R]; W];
                    for b in 0..blocks {
                        // SAFETY: the features above; the loads stay inside `x.qs`.
                        unsafe {
                            // The hardware prefetcher alone left half the memory bandwidth
                            // unused; a row's blocks are contiguous, and so are the rows.
                            for row in &w_rows {
                                let ahead = (b + PREFETCH_BLOCKS) * BLOCK_BYTES;
                                _mm_prefetch::<_MM_HINT_T0>(
                                    row.as_ptr().wrapping_add(ahead) as *const i8
                                );
                            }
                            let w: [(__m256i, f32); W] =
                                std::array::from_fn(|i| unpack(w_rows[i], b));
                            for r in 0..R {
                                let row = r0 + r;
                                let xv =
                                    _mm256_loadu_si256(x.qs.as_ptr().add(row * x.cols + b * BLOCK)
                                        as *const __m256i);
                                let dx = x.d[row * blocks + b];
                                let sum = x.d_sums[row * blocks + b];
                                for i in 0..W {
                                    let dot: __m256i = $dot(w[i].0, xv);
                                    let scale = _mm256_set1_ps(w[i].1 * dx);
                                    acc[i][r] =
                                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[i][r]);
                                    taken[i][r] += w[i].1 * sum;
                                }
                            }
                        }
                    }
                    for i in 0..W {
                        for r in 0..R {
                            // SAFETY: the features above; the caller's promise for `out`.
                            unsafe {
                                out.write(r0 + r, j0 + i, hsum(acc[i][r]) - 16.0 * taken[i][r])
                            };
                        }
                    }
                }
            }
        };
    }

    kernel!(rows, "avx2,fma", |w, x| _mm256_madd_epi16(
        _mm256_maddubs_epi16(w, x),
        _mm256_set1_epi16(1)
    ));
    kernel!(rows_vnni, "avx2,fma,avx512vnni,avx512vl", |w, x| {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    /// A random Q5_0 matrix made by candle's quantizer: as raw GGUF bytes, as candle's
    /// matmul, and dequantized.
    fn random_matrix(rng: &mut StdRng, rows: usize, cols: usize) -> (Q5_0Matrix, QMatMul, Tensor) {
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&dense, GgmlDType::Q5_0).unwrap();
        let bytes = q.data().unwrap().into_owned();
        let dequantized = q.dequantize(&Device::Cpu).unwrap();
        let m = Q5_0Matrix::new(bytes, rows, cols).unwrap();
        (m, QMatMul::from_qtensor(q).unwrap(), dequantized)
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// Every implementation against candle's matmul (same quantization of the activations, so
    /// only the summation order differs) and against dequantize-then-multiply in f32 (the
    /// activation quantization's error, stated), on odd shapes and every tile remainder.
    #[test]
    fn matches_candle_and_the_dequantized_reference() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut worst_vs_f32 = 0f32;
        for (rows, cols) in [(1, 32), (5, 64), (37, 96), (67, 896)] {
            let (m, qmatmul, dequantized) = random_matrix(&mut rng, rows, cols);
            for t in [1, 2, 3, 4, 5, 9] {
                let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let xt = Tensor::from_vec(x.clone(), (t, cols), &Device::Cpu).unwrap();
                let candle = qmatmul
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let reference = xt
                    .matmul(&dequantized.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let kernels = Kernel::available();
                let xq = Q8Rows::quantize(&x, t, cols);
                for kernel in kernels {
                    let mut y = vec![0f32; t * rows];
                    let out = Out {
                        ptr: y.as_mut_ptr(),
                        n: rows,
                    };
                    // SAFETY: `y` is t × rows and only this call writes it.
                    unsafe { kernel.rows(&m, &xq, 0..rows, out) };
                    let what = format!("{kernel:?} {rows}×{cols}, t={t}");
                    assert!(
                        max_rel(&y, &candle) < 1e-5,
                        "{what} vs candle: {}",
                        max_rel(&y, &candle)
                    );
                    let vs_f32 = max_rel(&y, &reference);
                    assert!(vs_f32 < 2e-2, "{what} vs f32: {vs_f32}");
                    worst_vs_f32 = worst_vs_f32.max(vs_f32);
                }
                let y = m.matmul(&x, t).unwrap();
                assert!(max_rel(&y, &candle) < 1e-5, "matmul {rows}×{cols}, t={t}");
            }
        }
        // The 8-bit activations cost well under 1% against f32 arithmetic on these shapes.
        assert!(worst_vs_f32 > 0.0 && worst_vs_f32 < 1e-2, "{worst_vs_f32}");
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert_eq!(
            Q5_0Matrix::new(vec![0; 22], 1, 33).err(),
            Some(KernelError::Blocks {
                cols: 33,
                block: 32
            })
        );
        assert!(matches!(
            Q5_0Matrix::new(vec![0; 21], 1, 32),
            Err(KernelError::Size { .. })
        ));
        let m = Q5_0Matrix::new(vec![0; 22], 1, 32).unwrap();
        assert!(matches!(
            m.matmul(&[0.0; 31], 1),
            Err(KernelError::Input { .. })
        ));
    }
}
