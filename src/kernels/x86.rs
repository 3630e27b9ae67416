//! AVX-512 VNNI and AVX2 kernels over packed tiles (`packed`). A tile block's values become 8
//! vectors of unsigned bytes, one per group of 4 values: byte `4r + j` is row `r`'s value
//! `4g + j` plus an offset (8 for Q4_0, 16 for Q5_0, 128 for Q8_0), so an unsigned × signed
//! multiply-add against 4 broadcast activations gives row `r`'s partial dot product in lane
//! `r`. The offset's share, `offset · Σx`, is taken off once per block from the activations'
//! block sums.

use std::arch::x86_64::*;

use super::activations::{BLOCK, Q8Rows};
use super::packed::{Format, PackedMatrix, Q5_HIGH_BITS, SCALES, TILE_ROWS};
use super::{DisjointRows, ROWS_PER_ITEM};

/// How far ahead weights are prefetched when one activation row streams them from memory
/// (decode): about ten tile blocks, as the row-major kernel measured best (3.5 KB).
const PREFETCH_BYTES: usize = 3584;

pub fn avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub fn avx512_vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vnni")
}

/// `f()` built with AVX-512 (F, BW, VL, DQ) and AVX2, FMA, F16C enabled (`Kernel::vectorize`):
/// VL and DQ let the compiler use AVX-512's registers and masks for narrower vectors too.
///
/// # Safety
/// The CPU must have [`avx512_vnni`]'s and [`avx2`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f()` built with AVX2, FMA and F16C enabled (`Kernel::vectorize`).
///
/// # Safety
/// The CPU must have [`avx2`]'s features.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// A weight format's tile block as vectors.
trait Tile {
    const FORMAT: Format;
    /// What [`Tile::groups512`] adds to every value.
    const OFFSET_512: f32;
    /// What [`Tile::groups256`] adds to every value.
    const OFFSET_256: f32;
    /// The 8 groups of the 16 rows, as unsigned bytes.
    unsafe fn groups512(tile: *const u8) -> [__m512i; 8];
    /// The 8 groups of rows `8·half .. 8·half + 8`, as [`Tile::dot256`] takes them.
    unsafe fn groups256(tile: *const u8, half: usize) -> [__m256i; 8];
    /// `acc + Σ` of 4 byte products per i32 lane, of weights from [`Tile::groups256`].
    unsafe fn dot256(acc: __m256i, w: __m256i, x: __m256i) -> __m256i;
}

struct Q4_0;
struct Q5_0;
struct Q8_0;

/// `acc + Σ` of 4 products of unsigned `w` and signed `x` bytes per lane, without VNNI (the
/// 16-bit pair sums cannot saturate: |w| ≤ 31 here).
#[inline(always)]
pub(super) unsafe fn dot_unsigned256(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    // SAFETY: AVX2, which every caller enables.
    unsafe {
        let pairs = _mm256_maddubs_epi16(w, x);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

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

impl Tile for Q4_0 {
    const FORMAT: Format = Format::Q4_0;
    const OFFSET_512: f32 = 8.0;
    const OFFSET_256: f32 = 8.0;

    #[inline(always)]
    unsafe fn groups512(tile: *const u8) -> [__m512i; 8] {
        // SAFETY: as the caller's; a Q4_0 tile block's chunks follow its scales.
        unsafe { nibbles512(tile.add(SCALES)) }
    }

    #[inline(always)]
    unsafe fn groups256(tile: *const u8, half: usize) -> [__m256i; 8] {
        // SAFETY: as the caller's.
        unsafe { nibbles256(tile.add(SCALES), half) }
    }

    #[inline(always)]
    unsafe fn dot256(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: as the caller's.
        unsafe { dot_unsigned256(acc, w, x) }
    }
}

/// 4 chunks of 64 bytes of nibbles at `chunks` (byte `4r + j` of chunk `p`: row `r`'s value
/// `4p + j` in the low nibble, `16 + 4p + j` in the high one) as the 8 groups of 16 rows: the
/// layout of Q4_0's tile blocks and of the k-quants' sub-blocks.
#[inline(always)]
pub(super) unsafe fn nibbles512(chunks: *const u8) -> [__m512i; 8] {
    // SAFETY: AVX-512 BW, which every caller enables; the caller's 256 bytes at `chunks`.
    unsafe {
        let low4 = _mm512_set1_epi8(0x0F);
        let mut w = [_mm512_setzero_si512(); 8];
        for p in 0..4 {
            let v = _mm512_loadu_si512(chunks.add(64 * p) as *const _);
            w[p] = _mm512_and_si512(v, low4);
            w[p + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        w
    }
}

/// Rows `8·half .. 8·half + 8` of [`nibbles512`].
#[inline(always)]
pub(super) unsafe fn nibbles256(chunks: *const u8, half: usize) -> [__m256i; 8] {
    // SAFETY: AVX2, which every caller enables; the caller's 256 bytes at `chunks`.
    unsafe {
        let low4 = _mm256_set1_epi8(0x0F);
        let mut w = [_mm256_setzero_si256(); 8];
        for p in 0..4 {
            let v = _mm256_loadu_si256(chunks.add(64 * p + 32 * half) as *const __m256i);
            w[p] = _mm256_and_si256(v, low4);
            w[p + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
        w
    }
}

impl Tile for Q5_0 {
    const FORMAT: Format = Format::Q5_0;
    const OFFSET_512: f32 = 16.0;
    const OFFSET_256: f32 = 16.0;

    #[inline(always)]
    unsafe fn groups512(tile: *const u8) -> [__m512i; 8] {
        // SAFETY: AVX-512 BW, which every caller enables; a Q5_0 tile block is 352 bytes.
        unsafe {
            let low4 = _mm512_set1_epi8(0x0F);
            let fifth = _mm512_set1_epi8(0x10);
            let high = tile.add(SCALES) as *const u64;
            let mut w = [_mm512_setzero_si512(); 8];
            for p in 0..4 {
                let v = _mm512_loadu_si512(tile.add(SCALES + Q5_HIGH_BITS + 64 * p) as *const _);
                let lo = _mm512_and_si512(v, low4);
                let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                w[p] = _mm512_mask_add_epi8(lo, high.add(p).read_unaligned(), lo, fifth);
                w[p + 4] = _mm512_mask_add_epi8(hi, high.add(p + 4).read_unaligned(), hi, fifth);
            }
            w
        }
    }

    #[inline(always)]
    unsafe fn groups256(tile: *const u8, half: usize) -> [__m256i; 8] {
        // SAFETY: AVX2, which every caller enables; a Q5_0 tile block is 352 bytes.
        unsafe {
            let low4 = _mm256_set1_epi8(0x0F);
            let fifth = _mm256_set1_epi8(0x10);
            let high = |g: usize| {
                let bits = (tile.add(SCALES + 8 * g + 4 * half) as *const u32).read_unaligned();
                _mm256_and_si256(bytes_from_bits(bits), fifth)
            };
            let mut w = [_mm256_setzero_si256(); 8];
            for p in 0..4 {
                let at = SCALES + Q5_HIGH_BITS + 64 * p + 32 * half;
                let v = _mm256_loadu_si256(tile.add(at) as *const __m256i);
                let lo = _mm256_and_si256(v, low4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                w[p] = _mm256_or_si256(lo, high(p));
                w[p + 4] = _mm256_or_si256(hi, high(p + 4));
            }
            w
        }
    }

    #[inline(always)]
    unsafe fn dot256(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: as the caller's.
        unsafe { dot_unsigned256(acc, w, x) }
    }
}

impl Tile for Q8_0 {
    const FORMAT: Format = Format::Q8_0;
    const OFFSET_512: f32 = 128.0;
    /// AVX2 takes the signed weights as they are (see `dot256`).
    const OFFSET_256: f32 = 0.0;

    #[inline(always)]
    unsafe fn groups512(tile: *const u8) -> [__m512i; 8] {
        // SAFETY: AVX-512 F, which every caller enables; a Q8_0 tile block is 544 bytes.
        unsafe {
            let flip = _mm512_set1_epi8(i8::MIN);
            std::array::from_fn(|g| {
                let v = _mm512_loadu_si512(tile.add(SCALES + 64 * g) as *const _);
                _mm512_xor_si512(v, flip)
            })
        }
    }

    #[inline(always)]
    unsafe fn groups256(tile: *const u8, half: usize) -> [__m256i; 8] {
        // SAFETY: AVX, which every caller enables; a Q8_0 tile block is 544 bytes.
        unsafe {
            std::array::from_fn(|g| {
                _mm256_loadu_si256(tile.add(SCALES + 64 * g + 32 * half) as *const __m256i)
            })
        }
    }

    /// Signed × signed through `maddubs` as `|w| · (x · sign w)`: with `w + 128` as unsigned
    /// bytes the 16-bit pair sums would saturate (255 · 127 · 2 > 32,767).
    #[inline(always)]
    unsafe fn dot256(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: AVX2, which every caller enables.
        unsafe { dot_unsigned256(acc, _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)) }
    }
}

/// Asks for the `bytes` at `PREFETCH_BYTES` past `tile`, every cache line of them: without
/// this a single activation row waits on memory (the hardware prefetcher alone left half the
/// bandwidth unused). The k-quant kernels call it per sub-block (288 or 416 bytes), so that
/// their 2–3 KB tile blocks do not ask for 40–50 lines in one burst.
#[inline(always)]
pub(super) unsafe fn prefetch(tile: *const u8, bytes: usize) {
    let ahead = tile.wrapping_add(PREFETCH_BYTES);
    for line in (0..bytes).step_by(64) {
        // SAFETY: SSE; prefetches never fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8) };
    }
}

/// Four activation bytes `xs[at..at + 4]` in every i32 lane.
#[inline(always)]
pub(super) unsafe fn broadcast512(xs: *const i8, at: usize) -> __m512i {
    // SAFETY: AVX-512 F; the caller keeps `at + 4` inside the row.
    unsafe { _mm512_set1_epi32((xs.add(at) as *const i32).read_unaligned()) }
}

#[inline(always)]
pub(super) unsafe fn broadcast256(xs: *const i8, at: usize) -> __m256i {
    // SAFETY: AVX; the caller keeps `at + 4` inside the row.
    unsafe { _mm256_set1_epi32((xs.add(at) as *const i32).read_unaligned()) }
}

/// Chooses the const row count of a unit by the rows it got (the last item may have fewer).
macro_rules! by_rows {
    ($f:ident::<$t:ty>($n:expr, $($arg:expr),*)) => {
        match $n {
            1 => $f::<$t, 1>($($arg),*),
            2 => $f::<$t, 2>($($arg),*),
            3 => $f::<$t, 3>($($arg),*),
            4 => $f::<$t, 4>($($arg),*),
            5 => $f::<$t, 5>($($arg),*),
            6 => $f::<$t, 6>($($arg),*),
            7 => $f::<$t, 7>($($arg),*),
            _ => $f::<$t, ROWS_PER_ITEM>($($arg),*),
        }
    };
}

/// Tile `t` against activation rows `rows` (at most `ROWS_PER_ITEM`), AVX-512 VNNI.
///
/// # Safety
/// The CPU must have [`avx512_vnni`]'s features; as `Kernel::unit` for `out`.
pub unsafe fn unit_avx512(
    m: &PackedMatrix,
    x: &Q8Rows,
    t: usize,
    rows: std::ops::Range<usize>,
    out: DisjointRows,
) {
    let n = rows.len();
    // SAFETY: the caller's promises.
    unsafe {
        match m.format() {
            Format::Q4_0 => by_rows!(tile512::<Q4_0>(n, m, x, t, rows.start, out)),
            Format::Q5_0 => by_rows!(tile512::<Q5_0>(n, m, x, t, rows.start, out)),
            Format::Q8_0 => by_rows!(tile512::<Q8_0>(n, m, x, t, rows.start, out)),
            Format::Q4K | Format::Q6K => super::x86_kquant::unit_avx512(m, x, t, rows, out),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn tile512<T: Tile, const R: usize>(
    m: &PackedMatrix,
    x: &Q8Rows,
    t: usize,
    r0: usize,
    out: DisjointRows,
) {
    debug_assert_eq!(m.format(), T::FORMAT);
    let blocks = m.blocks();
    let tb = T::FORMAT.tile_bytes();
    let tile_row = m.tile_row(t).as_ptr();
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..blocks {
        // SAFETY: the features above; every load stays inside the tile row and `x`.
        unsafe {
            let tile = tile_row.add(b * tb);
            if R == 1 {
                prefetch(tile, tb);
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tile as *const __m256i));
            let w = T::groups512(tile);
            for (i, acc) in acc.iter_mut().enumerate() {
                let row = r0 + i;
                let xs = x.qs.as_ptr().add(row * x.cols + b * BLOCK);
                // Two chains, so a single row does not wait on each multiply-add's latency.
                let mut even = _mm512_setzero_si512();
                let mut odd = _mm512_setzero_si512();
                for g in (0..8).step_by(2) {
                    even = _mm512_dpbusd_epi32(even, w[g], broadcast512(xs, 4 * g));
                    odd = _mm512_dpbusd_epi32(odd, w[g + 1], broadcast512(xs, 4 * g + 4));
                }
                let k = row * blocks + b;
                let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
                let offset = _mm512_set1_ps(T::OFFSET_512 * x.d_sums[k]);
                let scaled = _mm512_fmsub_ps(dot, _mm512_set1_ps(x.d[k]), offset);
                *acc = _mm512_fmadd_ps(dw, scaled, *acc);
            }
        }
    }
    let valid = TILE_ROWS.min(m.rows() - t * TILE_ROWS);
    let mask = (((1u32 << valid) - 1) & 0xFFFF) as __mmask16;
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: the caller's promise for `out`; the mask keeps to the matrix's rows.
        unsafe { _mm512_mask_storeu_ps(out.at(r0 + i, t * TILE_ROWS), mask, *acc) };
    }
}

/// Tile `t` against activation rows `rows` (at most `ROWS_PER_ITEM`), AVX2.
///
/// # Safety
/// The CPU must have [`avx2`]'s features; as `Kernel::unit` for `out`.
pub unsafe fn unit_avx2(
    m: &PackedMatrix,
    x: &Q8Rows,
    t: usize,
    rows: std::ops::Range<usize>,
    out: DisjointRows,
) {
    let n = rows.len();
    // SAFETY: the caller's promises.
    unsafe {
        match m.format() {
            Format::Q4_0 => by_rows!(tile256::<Q4_0>(n, m, x, t, rows.start, out)),
            Format::Q5_0 => by_rows!(tile256::<Q5_0>(n, m, x, t, rows.start, out)),
            Format::Q8_0 => by_rows!(tile256::<Q8_0>(n, m, x, t, rows.start, out)),
            Format::Q4K | Format::Q6K => super::x86_kquant::unit_avx2(m, x, t, rows, out),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile256<T: Tile, const R: usize>(
    m: &PackedMatrix,
    x: &Q8Rows,
    t: usize,
    r0: usize,
    out: DisjointRows,
) {
    debug_assert_eq!(m.format(), T::FORMAT);
    let blocks = m.blocks();
    let tb = T::FORMAT.tile_bytes();
    let tile_row = m.tile_row(t).as_ptr();
    let valid = TILE_ROWS.min(m.rows() - t * TILE_ROWS);
    // Half a tile (8 rows) at a time: 16 vector registers hold one half's groups and sums.
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            // SAFETY: the features above; every load stays inside the tile row and `x`.
            unsafe {
                let tile = tile_row.add(b * tb);
                if R == 1 && half == 0 {
                    prefetch(tile, tb);
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(16 * half) as *const __m128i));
                let w = T::groups256(tile, half);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let row = r0 + i;
                    let xs = x.qs.as_ptr().add(row * x.cols + b * BLOCK);
                    let mut even = _mm256_setzero_si256();
                    let mut odd = _mm256_setzero_si256();
                    for g in (0..8).step_by(2) {
                        even = T::dot256(even, w[g], broadcast256(xs, 4 * g));
                        odd = T::dot256(odd, w[g + 1], broadcast256(xs, 4 * g + 4));
                    }
                    let k = row * blocks + b;
                    let dot = _mm256_cvtepi32_ps(_mm256_add_epi32(even, odd));
                    let offset = _mm256_set1_ps(T::OFFSET_256 * x.d_sums[k]);
                    let scaled = _mm256_fmsub_ps(dot, _mm256_set1_ps(x.d[k]), offset);
                    *acc = _mm256_fmadd_ps(dw, scaled, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let mut lanes = [0f32; 8];
            // SAFETY: AVX; `lanes` is 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *acc) };
            for (r, v) in lanes
                .iter()
                .enumerate()
                .take(valid.saturating_sub(8 * half))
            {
                // SAFETY: the caller's promise for `out`; `r < valid` keeps to the matrix.
                unsafe { out.write(r0 + i, t * TILE_ROWS + 8 * half + r, *v) };
            }
        }
    }
}
