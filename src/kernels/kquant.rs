//! Q4_K and Q6_K ("k-quants", the matrices of almost every Q4_K_M file people download) in
//! tiles of 16 rows, like Q5_0 and Q8_0 (`packed`), but one tile block covers a whole GGUF
//! super-block of 256 values, because that is where the k-quants keep their scales.
//!
//! GGUF packs the 8 sub-block scales of a Q4_K super-block into 12 bytes of 6-bit fields and
//! spreads a Q6_K value over two places (4 low bits, 2 high bits). Here every field a kernel
//! needs is one byte, stored per tile so that one vector load holds it for 16 rows, and the
//! values are laid out as in Q5_0's tiles: byte `4r + j` of a 64-byte chunk holds 4 values of
//! each row side by side, so one unsigned × signed multiply-add (`dpbusd`) against 4 broadcast
//! activations advances 16 dot products. Activations stay Q8_0 (one scale per 32 values, finer
//! than llama.cpp's Q8_K), so a sub-block of 32 values is one activation block.
//!
//! A Q4_K tile block (16 rows × 256 values, 2,368 bytes; GGUF's are 2,304, 2.8 % less):
//! - bytes 0..32: `d` of the 16 rows (f16); 32..64: `dmin` (f16);
//! - then per sub-block `s` (0..8), 288 bytes at `64 + 288 s`: 16 scales (u8, 0..63), 16 mins
//!   (u8, 0..63), and 4 chunks of 64 bytes, byte `4r + j` of chunk `p` holding row `r`'s value
//!   `4p + j` of the sub-block in its low nibble and value `16 + 4p + j` in its high nibble.
//!   Row `r`'s value `i` is `d·scale·q − dmin·min`.
//!
//! A Q6_K tile block (3,360 bytes, exactly GGUF's):
//! - bytes 0..32: `d` of the 16 rows (f16);
//! - then per sub-block `s`, 416 bytes at `32 + 416 s`: 16 scales of values 0..16 (i8), 16
//!   scales of values 16..32 (i8), 4 chunks of low nibbles as for Q4_K, and 2 chunks of 64
//!   bytes of high bits: bits `2k, 2k + 1` of byte `4r + j` of chunk `c` are the high bits of
//!   row `r`'s value `4(4c + k) + j`. Row `r`'s value `i` is `d·scale·(q − 32)`, `q` in 0..64.

use half::f16;

use super::DisjointRows;
use super::activations::{BLOCK, Q8Rows};
use super::packed::{Format, PackedMatrix, TILE_ROWS};

/// Values per super-block.
pub const SUPER: usize = 256;

/// Sub-blocks (of 32 values, one activation block each) per super-block.
pub(super) const SUBS: usize = SUPER / BLOCK;

/// Bytes of a tile block's 16 f16 values (`d`, `dmin`).
const HALVES: usize = 2 * TILE_ROWS;

/// Bytes of a sub-block's values' low nibbles: 4 chunks of 64.
const NIBBLES: usize = 4 * 64;

pub(super) const Q4K_HEAD: usize = 2 * HALVES;
/// Bytes of one Q4_K sub-block: scales, mins, nibbles.
pub(super) const Q4K_SUB: usize = 2 * TILE_ROWS + NIBBLES;
pub(super) const Q6K_HEAD: usize = HALVES;
/// Bytes of one Q6_K sub-block: two scales, nibbles, high bits.
pub(super) const Q6K_SUB: usize = 2 * TILE_ROWS + NIBBLES + 2 * 64;
/// Offset of a Q6_K sub-block's high-bit chunks.
pub(super) const Q6K_HIGH: usize = 2 * TILE_ROWS + NIBBLES;

pub(super) const Q4K_TILE: usize = Q4K_HEAD + SUBS * Q4K_SUB;
pub(super) const Q6K_TILE: usize = Q6K_HEAD + SUBS * Q6K_SUB;

/// A row's super-block as GGUF stores it, unpacked to one value or field per byte.
struct Unpacked {
    /// `d` and (Q4_K) `dmin`, as their f16 bytes.
    d: [u8; 2],
    dmin: [u8; 2],
    /// Per sub-block: Q4_K's scale and min; Q6_K's two scales (as i8 bytes).
    fields: [[u8; 2]; SUBS],
    /// The 256 values: Q4_K's 0..16, Q6_K's 0..64 (before the −32).
    q: [u8; SUPER],
}

/// Q4_K's 6-bit scale and min of sub-block `j` from the 12 packed bytes (llama.cpp's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// GGUF Q4_K block (`d`, `dmin`, 12 bytes of scales, 128 bytes of nibbles: sub-blocks `2k`
/// and `2k + 1` share bytes `32k..32k + 32`, low and high nibble).
fn unpack_q4k(src: &[u8]) -> Unpacked {
    let (scales, qs) = (&src[4..16], &src[16..144]);
    Unpacked {
        d: [src[0], src[1]],
        dmin: [src[2], src[3]],
        fields: std::array::from_fn(|j| {
            let (sc, m) = scale_min_k4(j, scales);
            [sc, m]
        }),
        q: std::array::from_fn(|i| {
            let (s, l) = (i / BLOCK, i % BLOCK);
            let byte = qs[32 * (s / 2) + l];
            if s % 2 == 0 { byte & 0x0F } else { byte >> 4 }
        }),
    }
}

/// GGUF Q6_K block (128 bytes of low nibbles, 64 of high bits, 16 i8 scales of 16 values,
/// `d`), in the order of llama.cpp's `dequantize_row_q6_K`.
fn unpack_q6k(src: &[u8]) -> Unpacked {
    let (ql, qh, scales) = (&src[..128], &src[128..192], &src[192..208]);
    let mut q = [0u8; SUPER];
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        let y = &mut q[128 * half..];
        for l in 0..32 {
            y[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    Unpacked {
        d: [src[208], src[209]],
        dmin: [0, 0],
        fields: std::array::from_fn(|s| [scales[2 * s], scales[2 * s + 1]]),
        q,
    }
}

/// Places row `r`'s 32 values `q` of one sub-block: low nibbles into the 4 chunks at `nibbles`.
fn place_nibbles(q: &[u8], r: usize, nibbles: &mut [u8]) {
    for p in 0..4 {
        for j in 0..4 {
            let (lo, hi) = (q[4 * p + j] & 0x0F, q[16 + 4 * p + j] & 0x0F);
            nibbles[64 * p + 4 * r + j] = lo | hi << 4;
        }
    }
}

/// Places GGUF block `src` of `format` (Q4_K or Q6_K) as row `r` of `tile`.
pub(super) fn pack(format: Format, src: &[u8], r: usize, tile: &mut [u8]) {
    let u = match format {
        Format::Q4K => unpack_q4k(src),
        Format::Q6K => unpack_q6k(src),
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => unreachable!("not a k-quant: {format:?}"),
    };
    tile[2 * r..2 * r + 2].copy_from_slice(&u.d);
    let (head, sub_bytes) = match format {
        Format::Q4K => {
            tile[HALVES + 2 * r..HALVES + 2 * r + 2].copy_from_slice(&u.dmin);
            (Q4K_HEAD, Q4K_SUB)
        }
        _ => (Q6K_HEAD, Q6K_SUB),
    };
    for (s, q) in u.q.chunks_exact(BLOCK).enumerate() {
        let sub = &mut tile[head + s * sub_bytes..][..sub_bytes];
        sub[r] = u.fields[s][0];
        sub[TILE_ROWS + r] = u.fields[s][1];
        place_nibbles(q, r, &mut sub[2 * TILE_ROWS..]);
        if format == Format::Q6K {
            for (i, v) in q.iter().enumerate() {
                let (g, j) = (i / 4, i % 4);
                let (c, k) = (g / 4, g % 4);
                sub[Q6K_HIGH + 64 * c + 4 * r + j] |= (v >> 4) << (2 * k);
            }
        }
    }
}

/// Row `r`'s `d` (or, at `HALVES`, `dmin`) in a tile block.
#[inline]
fn half_at(tile: &[u8], at: usize, r: usize) -> f32 {
    f16::from_le_bytes([tile[at + 2 * r], tile[at + 2 * r + 1]]).to_f32()
}

/// Row `r`'s value `i` (0..32) of sub-block `sub`: Q4_K's 0..16, Q6_K's 0..64 (before −32).
#[inline]
fn value(format: Format, sub: &[u8], r: usize, i: usize) -> u8 {
    let (g, j) = (i / 4, i % 4);
    let byte = sub[2 * TILE_ROWS + 64 * (g % 4) + 4 * r + j];
    let low = if g < 4 { byte & 0x0F } else { byte >> 4 };
    match format {
        Format::Q6K => {
            let high = (sub[Q6K_HIGH + 64 * (g / 4) + 4 * r + j] >> (2 * (g % 4))) & 3;
            low | high << 4
        }
        _ => low,
    }
}

/// The sub-blocks of tile block `tile`, each with its bytes.
fn subs(format: Format, tile: &[u8]) -> impl Iterator<Item = &[u8]> {
    let (head, sub_bytes) = match format {
        Format::Q4K => (Q4K_HEAD, Q4K_SUB),
        _ => (Q6K_HEAD, Q6K_SUB),
    };
    tile[head..].chunks_exact(sub_bytes)
}

/// Row `r` of a tile block's 256 values as f32, in candle's arithmetic (so a packed token
/// table looks up exactly what candle's dequantization gives).
pub(super) fn dequantize(format: Format, tile: &[u8], r: usize, values: &mut Vec<f32>) {
    let d = half_at(tile, 0, r);
    for sub in subs(format, tile) {
        match format {
            Format::Q4K => {
                let d1 = d * sub[r] as f32;
                let m1 = half_at(tile, HALVES, r) * sub[TILE_ROWS + r] as f32;
                values.extend((0..BLOCK).map(|i| d1 * value(format, sub, r, i) as f32 - m1));
            }
            _ => values.extend((0..BLOCK).map(|i| {
                let sc = sub[(i / 16) * TILE_ROWS + r] as i8;
                let q = value(format, sub, r, i) as i8 - 32;
                d * sc as f32 * q as f32
            })),
        }
    }
}

/// The reference arithmetic: tile `t` against activation rows `rows`, per sub-block an integer
/// dot product, scaled as the SIMD kernels do.
///
/// # Safety
/// As `packed::scalar_unit`.
pub(super) unsafe fn scalar_unit(
    m: &PackedMatrix,
    x: &Q8Rows,
    t: usize,
    rows: std::ops::Range<usize>,
    out: DisjointRows,
) {
    let format = m.format();
    let (blocks, tb) = (m.blocks(), format.tile_bytes());
    let tile_row = m.tile_row(t);
    for r in 0..TILE_ROWS.min(m.rows() - t * TILE_ROWS) {
        for row in rows.clone() {
            let xs = &x.qs[row * x.cols..(row + 1) * x.cols];
            let mut sum = 0f32;
            for (b, tile) in tile_row.chunks_exact(tb).enumerate() {
                let (mut scaled, mut mins) = (0f32, 0f32);
                for (s, sub) in subs(format, tile).enumerate() {
                    let k = (row * blocks + b) * SUBS + s;
                    let xs = &xs[(b * SUBS + s) * BLOCK..][..BLOCK];
                    let dot = |range: std::ops::Range<usize>| -> i32 {
                        range
                            .map(|i| value(format, sub, r, i) as i32 * xs[i] as i32)
                            .sum()
                    };
                    match format {
                        Format::Q4K => {
                            scaled += (dot(0..BLOCK) * sub[r] as i32) as f32 * x.d[k];
                            mins += sub[TILE_ROWS + r] as f32 * x.d_sums[k];
                        }
                        _ => {
                            let lo = dot(0..16) - 32 * x.half_sums[2 * k];
                            let hi = dot(16..32) - 32 * x.half_sums[2 * k + 1];
                            let (s_lo, s_hi) =
                                (sub[r] as i8 as i32, sub[TILE_ROWS + r] as i8 as i32);
                            scaled += (lo * s_lo + hi * s_hi) as f32 * x.d[k];
                        }
                    }
                }
                sum += half_at(tile, 0, r) * scaled;
                if format == Format::Q4K {
                    sum -= half_at(tile, HALVES, r) * mins;
                }
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
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn dtype(format: Format) -> GgmlDType {
        match format {
            Format::Q4K => GgmlDType::Q4K,
            Format::Q6K => GgmlDType::Q6K,
            _ => unreachable!(),
        }
    }

    /// A random matrix quantized by candle: packed, as candle's matmul, and dequantized.
    fn random_matrix(
        rng: &mut StdRng,
        format: Format,
        rows: usize,
        cols: usize,
    ) -> (PackedMatrix, QMatMul, Tensor) {
        // Rows of different magnitudes and offsets, so scales and mins vary across a tile.
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let row = (i / cols) as f32;
                rng.random_range(-1.0..1.0) * (1.0 + row % 5.0) + (row % 3.0 - 1.0) * 0.3
            })
            .collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&dense, dtype(format)).unwrap();
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

    /// Every SIMD kernel against the scalar reference (the same arithmetic, summed in another
    /// order), and all of them against dequantize-then-multiply in f32 (within the activation
    /// rounding's bound, `activations::rounding_share`) and against candle's kernel (which
    /// quantizes activations per 256 values, ours per 32), on partial tiles and every
    /// remainder of activation rows per work item.
    #[test]
    fn every_kernel_matches_the_reference_candle_and_f32() {
        let mut rng = StdRng::seed_from_u64(11);
        for format in [Format::Q4K, Format::Q6K] {
            let (mut worst_vs_f32, mut candle_vs_f32) = (0f32, 0f32);
            for (rows, cols) in [(1, 256), (16, 256), (21, 512), (67, 1536)] {
                let (m, qmatmul, dequantized) = random_matrix(&mut rng, format, rows, cols);
                for t in [1, 2, 3, 5, 6, 7, 13] {
                    let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let xt = Tensor::from_vec(x.clone(), (t, cols), &Device::Cpu).unwrap();
                    let candle = rows_of(&qmatmul.forward(&xt).unwrap());
                    let reference = rows_of(&xt.matmul(&dequantized.t().unwrap()).unwrap());
                    let w = rows_of(&dequantized);
                    let share = |y: &[f32]| rounding_share(&x, &w, cols, y, &reference);
                    candle_vs_f32 = candle_vs_f32.max(share(&candle));
                    let xq = Q8Rows::quantize(&x, t, cols);
                    let mut scalar = vec![f32::NAN; t * rows];
                    Kernel::Scalar.matmul(&m, &xq, DisjointRows::new(&mut scalar, rows));
                    for kernel in Kernel::available() {
                        let mut y = vec![f32::NAN; t * rows];
                        kernel.matmul(&m, &xq, DisjointRows::new(&mut y, rows));
                        let what = format!("{format:?} {kernel:?} {rows}×{cols}, t={t}");
                        let vs_scalar = max_rel(&y, &scalar);
                        assert!(vs_scalar < 1e-5, "{what} vs scalar: {vs_scalar}");
                        let vs_f32 = share(&y);
                        assert!(
                            vs_f32 < 1.01,
                            "{what} vs f32: {vs_f32} of the rounding bound"
                        );
                        worst_vs_f32 = worst_vs_f32.max(vs_f32);
                    }
                    let y = m.matmul(&x, t).unwrap();
                    assert!(max_rel(&y, &scalar) < 1e-5, "matmul {rows}×{cols}, t={t}");
                }
            }
            // 8-bit activations per 32 values: within the rounding's bound of exact f32
            // arithmetic on the dequantized weights, and closer to it than candle's kernel with
            // its activations quantized per 256 values (Q8_K).
            assert!(worst_vs_f32 > 0.05, "{format:?} vs f32: {worst_vs_f32}");
            assert!(
                worst_vs_f32 <= candle_vs_f32,
                "{format:?}: ours {worst_vs_f32} off f32, candle's {candle_vs_f32}"
            );
        }
    }

    /// The largest values against ±127 activations: Q6_K's 63 (the AVX2 path's 16-bit pair
    /// sums must not saturate) with scales ±127 and Q4_K's 15 with scale and min 63.
    #[test]
    fn extreme_values_do_not_saturate() {
        let (rows, cols) = (16, 512);
        let one = f16::from_f32(1.0).to_le_bytes();
        let mut q6 = Vec::new();
        let mut q4 = Vec::new();
        for row in 0..rows {
            for _ in 0..cols / SUPER {
                let sc: i8 = if row % 2 == 0 { 127 } else { -128 };
                q6.extend(std::iter::repeat_n(0xFFu8, 128 + 64));
                q6.extend(std::iter::repeat_n(sc as u8, 16));
                q6.extend_from_slice(&one);
                q4.extend_from_slice(&one);
                q4.extend_from_slice(&one);
                q4.extend(std::iter::repeat_n(0xFFu8, 12 + 128));
            }
        }
        for (format, gguf) in [(Format::Q6K, q6), (Format::Q4K, q4)] {
            let m = PackedMatrix::new(format, &gguf, rows, cols).unwrap();
            let x = vec![-1f32; cols];
            let xq = Q8Rows::quantize(&x, 1, cols);
            let dx = 127.0 * xq.d[0];
            for kernel in Kernel::available() {
                let mut y = vec![0f32; rows];
                kernel.matmul(&m, &xq, DisjointRows::new(&mut y, rows));
                for (row, got) in y.iter().enumerate() {
                    let want = match format {
                        // (63 − 32) · scale per value.
                        Format::Q6K => {
                            let sc = if row % 2 == 0 { 127.0 } else { -128.0 };
                            -31.0 * sc * cols as f32 * dx
                        }
                        // 63 · 15 − 63 per value.
                        _ => -(63.0 * 15.0 - 63.0) * cols as f32 * dx,
                    };
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
        let mut rng = StdRng::seed_from_u64(5);
        for format in [Format::Q4K, Format::Q6K] {
            let (m, _, dequantized) = random_matrix(&mut rng, format, 21, 512);
            for row in [0, 7, 15, 16, 20] {
                let want = dequantized.get(row).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(m.dequantize_row(row), want, "{format:?} row {row}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(matches!(
            PackedMatrix::new(Format::Q4K, &[0; 144], 1, 128),
            Err(super::super::KernelError::Blocks {
                cols: 128,
                block: 256
            })
        ));
        assert!(matches!(
            PackedMatrix::new(Format::Q6K, &[0; 209], 1, 256),
            Err(super::super::KernelError::Size { .. })
        ));
    }
}
