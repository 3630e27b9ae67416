//! AVX-512 VNNI and AVX2 kernels over Q4_K and Q6_K tiles (`kquant`). As for Q5_0 (`x86`), a
//! sub-block's values become 8 vectors of unsigned bytes, one per group of 4 values, and an
//! unsigned × signed multiply-add against 4 broadcast activations gives row `r`'s partial dot
//! product in lane `r`. Per sub-block the integer sums are scaled by the rows' 6- or 8-bit
//! scales (still integers), then by the activation block's scale; the super-block's `d` (and
//! Q4_K's `dmin · min · Σx` term) is applied once per super-block.

use std::arch::x86_64::*;

use super::activations::{BLOCK, Q8Rows};
use super::kquant::{Q4K_HEAD, Q4K_SUB, Q6K_HEAD, Q6K_HIGH, Q6K_SUB, SUBS};
use super::packed::{Format, PackedMatrix, TILE_ROWS};
use super::x86::{broadcast256, broadcast512, dot_unsigned256, nibbles256, nibbles512, prefetch};
use super::{DisjointRows, ROWS_PER_ITEM};

/// Offset of a sub-block's nibble chunks (after its two rows of 16 scale bytes).
const NIBBLES_AT: usize = 2 * TILE_ROWS;

/// Chooses the const row count of a unit by the rows it got (the last item may have fewer).
macro_rules! by_rows {
    ($f:ident($n:expr, $($arg:expr),*)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            _ => $f::<ROWS_PER_ITEM>($($arg),*),
        }
    };
}

/// Tile `t` of a k-quant matrix against activation rows `rows`, AVX-512 VNNI.
///
/// # Safety
/// The CPU must have `x86::avx512_vnni`'s features; as `Kernel::unit` for `out`.
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
            Format::Q4K => by_rows!(q4k512(n, m, x, t, rows.start, out)),
            Format::Q6K => by_rows!(q6k512(n, m, x, t, rows.start, out)),
            f => unreachable!("not a k-quant: {f:?}"),
        }
    }
}

/// Tile `t` of a k-quant matrix against activation rows `rows`, AVX2.
///
/// # Safety
/// The CPU must have `x86::avx2`'s features; as `Kernel::unit` for `out`.
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
            Format::Q4K => by_rows!(q4k256(n, m, x, t, rows.start, out)),
            Format::Q6K => by_rows!(q6k256(n, m, x, t, rows.start, out)),
            f => unreachable!("not a k-quant: {f:?}"),
        }
    }
}

/// Q6_K's high bits of group `4c + k` moved to bits 4 and 5 of each byte, from chunk `c`
/// (16-bit shifts: bits 4–5 of a byte come from its own bits `2k`, `2k + 1`).
macro_rules! high_bits {
    ($v:expr, $k:expr, $mask:expr, $slli:ident, $srli:ident, $and:ident) => {
        match $k {
            0 => $and($slli($v, 4), $mask),
            1 => $and($slli($v, 2), $mask),
            2 => $and($v, $mask),
            _ => $and($srli($v, 2), $mask),
        }
    };
}

/// A Q6_K sub-block's 32 values (0..64) as 8 groups.
#[inline(always)]
unsafe fn q6k_groups512(sub: *const u8) -> [__m512i; 8] {
    // SAFETY: AVX-512 BW, which every caller enables; a Q6_K sub-block is 416 bytes.
    unsafe {
        let mut w = nibbles512(sub.add(NIBBLES_AT));
        let mask = _mm512_set1_epi8(0x30);
        for c in 0..2 {
            let h = _mm512_loadu_si512(sub.add(Q6K_HIGH + 64 * c) as *const _);
            for k in 0..4 {
                let bits = high_bits!(
                    h,
                    k,
                    mask,
                    _mm512_slli_epi16,
                    _mm512_srli_epi16,
                    _mm512_and_si512
                );
                w[4 * c + k] = _mm512_or_si512(w[4 * c + k], bits);
            }
        }
        w
    }
}

/// Rows `8·half .. 8·half + 8` of [`q6k_groups512`].
#[inline(always)]
unsafe fn q6k_groups256(sub: *const u8, half: usize) -> [__m256i; 8] {
    // SAFETY: AVX2, which every caller enables; a Q6_K sub-block is 416 bytes.
    unsafe {
        let mut w = nibbles256(sub.add(NIBBLES_AT), half);
        let mask = _mm256_set1_epi8(0x30);
        for c in 0..2 {
            let h = _mm256_loadu_si256(sub.add(Q6K_HIGH + 64 * c + 32 * half) as *const _);
            for k in 0..4 {
                let bits = high_bits!(
                    h,
                    k,
                    mask,
                    _mm256_slli_epi16,
                    _mm256_srli_epi16,
                    _mm256_and_si256
                );
                w[4 * c + k] = _mm256_or_si256(w[4 * c + k], bits);
            }
        }
        w
    }
}

/// 16 bytes of per-row fields at `at` as i32 lanes, unsigned (Q4_K) or signed (Q6_K).
#[inline(always)]
unsafe fn fields512(at: *const u8, signed: bool) -> __m512i {
    // SAFETY: AVX-512 F, which every caller enables; the caller keeps 16 bytes inside the tile.
    unsafe {
        let v = _mm_loadu_si128(at as *const __m128i);
        if signed {
            _mm512_cvtepi8_epi32(v)
        } else {
            _mm512_cvtepu8_epi32(v)
        }
    }
}

/// 8 bytes of per-row fields at `at` as i32 lanes.
#[inline(always)]
unsafe fn fields256(at: *const u8, signed: bool) -> __m256i {
    // SAFETY: AVX2, which every caller enables; the caller keeps 8 bytes inside the tile.
    unsafe {
        let v = _mm_loadl_epi64(at as *const __m128i);
        if signed {
            _mm256_cvtepi8_epi32(v)
        } else {
            _mm256_cvtepu8_epi32(v)
        }
    }
}

/// Writes 8 lanes of `acc` as outputs `8·half ..` of tile `t` in activation row `row`, as far
/// as the matrix has rows.
#[inline(always)]
unsafe fn store_half(
    acc: __m256,
    out: DisjointRows,
    row: usize,
    t: usize,
    half: usize,
    valid: usize,
) {
    let mut lanes = [0f32; 8];
    // SAFETY: AVX; `lanes` is 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    for (r, v) in lanes
        .iter()
        .enumerate()
        .take(valid.saturating_sub(8 * half))
    {
        // SAFETY: the caller's promise for `out`; `r < valid` keeps to the matrix.
        unsafe { out.write(row, t * TILE_ROWS + 8 * half + r, *v) };
    }
}

/// Writes the 16 lanes of each activation row's sums, as far as the matrix has rows.
#[inline(always)]
unsafe fn store512<const R: usize>(
    acc: &[__m512; R],
    m: &PackedMatrix,
    t: usize,
    r0: usize,
    out: DisjointRows,
) {
    let valid = TILE_ROWS.min(m.rows() - t * TILE_ROWS);
    let mask = (((1u32 << valid) - 1) & 0xFFFF) as __mmask16;
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: the caller's promise for `out`; the mask keeps to the matrix's rows.
        unsafe { _mm512_mask_storeu_ps(out.at(r0 + i, t * TILE_ROWS), mask, *acc) };
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k512<const R: usize>(
    m: &PackedMatrix,
    x: &Q8Rows,
    t: usize,
    r0: usize,
    out: DisjointRows,
) {
    let tb = Format::Q4K.tile_bytes();
    let x_blocks = x.cols / BLOCK;
    let tile_row = m.tile_row(t).as_ptr();
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..m.blocks() {
        // SAFETY: the features above; every load stays inside the tile row and `x`.
        unsafe {
            let tile = tile_row.add(b * tb);
            let mut scaled = [_mm512_setzero_ps(); R];
            let mut mins = [_mm512_setzero_ps(); R];
            for s in 0..SUBS {
                let sub = tile.add(Q4K_HEAD + s * Q4K_SUB);
                if R == 1 {
                    prefetch(sub, Q4K_SUB);
                }
                let sc = fields512(sub, false);
                let mn = _mm512_cvtepi32_ps(fields512(sub.add(TILE_ROWS), false));
                let w = nibbles512(sub.add(NIBBLES_AT));
                for (i, (scaled, mins)) in scaled.iter_mut().zip(&mut mins).enumerate() {
                    let k = (r0 + i) * x_blocks + b * SUBS + s;
                    let xs = x.qs.as_ptr().add(k * BLOCK);
                    let mut even = _mm512_setzero_si512();
                    let mut odd = _mm512_setzero_si512();
                    for g in (0..8).step_by(2) {
                        even = _mm512_dpbusd_epi32(even, w[g], broadcast512(xs, 4 * g));
                        odd = _mm512_dpbusd_epi32(odd, w[g + 1], broadcast512(xs, 4 * g + 4));
                    }
                    let dot = _mm512_mullo_epi32(_mm512_add_epi32(even, odd), sc);
                    *scaled =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(x.d[k]), *scaled);
                    *mins = _mm512_fmadd_ps(mn, _mm512_set1_ps(x.d_sums[k]), *mins);
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile as *const __m256i));
            let dmin =
                _mm512_cvtph_ps(_mm256_loadu_si256(tile.add(2 * TILE_ROWS) as *const __m256i));
            for (acc, (scaled, mins)) in acc.iter_mut().zip(scaled.iter().zip(&mins)) {
                *acc = _mm512_fnmadd_ps(dmin, *mins, _mm512_fmadd_ps(d, *scaled, *acc));
            }
        }
    }
    // SAFETY: the caller's promise for `out`.
    unsafe { store512(&acc, m, t, r0, out) };
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k512<const R: usize>(
    m: &PackedMatrix,
    x: &Q8Rows,
    t: usize,
    r0: usize,
    out: DisjointRows,
) {
    let tb = Format::Q6K.tile_bytes();
    let x_blocks = x.cols / BLOCK;
    let tile_row = m.tile_row(t).as_ptr();
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..m.blocks() {
        // SAFETY: the features above; every load stays inside the tile row and `x`.
        unsafe {
            let tile = tile_row.add(b * tb);
            let mut scaled = [_mm512_setzero_ps(); R];
            for s in 0..SUBS {
                let sub = tile.add(Q6K_HEAD + s * Q6K_SUB);
                if R == 1 {
                    prefetch(sub, Q6K_SUB);
                }
                let s_lo = fields512(sub, true);
                let s_hi = fields512(sub.add(TILE_ROWS), true);
                let w = q6k_groups512(sub);
                for (i, scaled) in scaled.iter_mut().enumerate() {
                    let k = (r0 + i) * x_blocks + b * SUBS + s;
                    let xs = x.qs.as_ptr().add(k * BLOCK);
                    // Values 0..16 and 16..32 have their own scales: one chain each.
                    let mut lo = _mm512_set1_epi32(-32 * x.half_sums[2 * k]);
                    let mut hi = _mm512_set1_epi32(-32 * x.half_sums[2 * k + 1]);
                    for g in 0..4 {
                        lo = _mm512_dpbusd_epi32(lo, w[g], broadcast512(xs, 4 * g));
                        hi = _mm512_dpbusd_epi32(hi, w[g + 4], broadcast512(xs, 4 * g + 16));
                    }
                    let dot = _mm512_add_epi32(
                        _mm512_mullo_epi32(lo, s_lo),
                        _mm512_mullo_epi32(hi, s_hi),
                    );
                    *scaled =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(x.d[k]), *scaled);
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile as *const __m256i));
            for (acc, scaled) in acc.iter_mut().zip(&scaled) {
                *acc = _mm512_fmadd_ps(d, *scaled, *acc);
            }
        }
    }
    // SAFETY: the caller's promise for `out`.
    unsafe { store512(&acc, m, t, r0, out) };
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k256<const R: usize>(
    m: &PackedMatrix,
    x: &Q8Rows,
    t: usize,
    r0: usize,
    out: DisjointRows,
) {
    let tb = Format::Q4K.tile_bytes();
    let x_blocks = x.cols / BLOCK;
    let tile_row = m.tile_row(t).as_ptr();
    let valid = TILE_ROWS.min(m.rows() - t * TILE_ROWS);
    // Half a tile (8 rows) at a time, as the Q5_0 kernel: 16 vector registers.
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..m.blocks() {
            // SAFETY: the features above; every load stays inside the tile row and `x`.
            unsafe {
                let tile = tile_row.add(b * tb);
                let mut scaled = [_mm256_setzero_ps(); R];
                let mut mins = [_mm256_setzero_ps(); R];
                for s in 0..SUBS {
                    let sub = tile.add(Q4K_HEAD + s * Q4K_SUB);
                    if R == 1 && half == 0 {
                        prefetch(sub, Q4K_SUB);
                    }
                    let sc = fields256(sub.add(8 * half), false);
                    let mn = _mm256_cvtepi32_ps(fields256(sub.add(TILE_ROWS + 8 * half), false));
                    let w = nibbles256(sub.add(NIBBLES_AT), half);
                    for (i, (scaled, mins)) in scaled.iter_mut().zip(&mut mins).enumerate() {
                        let k = (r0 + i) * x_blocks + b * SUBS + s;
                        let xs = x.qs.as_ptr().add(k * BLOCK);
                        let mut even = _mm256_setzero_si256();
                        let mut odd = _mm256_setzero_si256();
                        for g in (0..8).step_by(2) {
                            even = dot_unsigned256(even, w[g], broadcast256(xs, 4 * g));
                            odd = dot_unsigned256(odd, w[g + 1], broadcast256(xs, 4 * g + 4));
                        }
                        let dot = _mm256_mullo_epi32(_mm256_add_epi32(even, odd), sc);
                        *scaled = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(dot),
                            _mm256_set1_ps(x.d[k]),
                            *scaled,
                        );
                        *mins = _mm256_fmadd_ps(mn, _mm256_set1_ps(x.d_sums[k]), *mins);
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(16 * half) as *const __m128i));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(
                    tile.add(2 * TILE_ROWS + 16 * half) as *const __m128i
                ));
                for (acc, (scaled, mins)) in acc.iter_mut().zip(scaled.iter().zip(&mins)) {
                    *acc = _mm256_fnmadd_ps(dmin, *mins, _mm256_fmadd_ps(d, *scaled, *acc));
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: the caller's promise for `out`.
            unsafe { store_half(*acc, out, r0 + i, t, half, valid) };
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k256<const R: usize>(
    m: &PackedMatrix,
    x: &Q8Rows,
    t: usize,
    r0: usize,
    out: DisjointRows,
) {
    let tb = Format::Q6K.tile_bytes();
    let x_blocks = x.cols / BLOCK;
    let tile_row = m.tile_row(t).as_ptr();
    let valid = TILE_ROWS.min(m.rows() - t * TILE_ROWS);
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..m.blocks() {
            // SAFETY: the features above; every load stays inside the tile row and `x`.
            unsafe {
                let tile = tile_row.add(b * tb);
                let mut scaled = [_mm256_setzero_ps(); R];
                for s in 0..SUBS {
                    let sub = tile.add(Q6K_HEAD + s * Q6K_SUB);
                    if R == 1 && half == 0 {
                        prefetch(sub, Q6K_SUB);
                    }
                    let s_lo = fields256(sub.add(8 * half), true);
                    let s_hi = fields256(sub.add(TILE_ROWS + 8 * half), true);
                    let w = q6k_groups256(sub, half);
                    for (i, scaled) in scaled.iter_mut().enumerate() {
                        let k = (r0 + i) * x_blocks + b * SUBS + s;
                        let xs = x.qs.as_ptr().add(k * BLOCK);
                        let mut lo = _mm256_set1_epi32(-32 * x.half_sums[2 * k]);
                        let mut hi = _mm256_set1_epi32(-32 * x.half_sums[2 * k + 1]);
                        for g in 0..4 {
                            lo = dot_unsigned256(lo, w[g], broadcast256(xs, 4 * g));
                            hi = dot_unsigned256(hi, w[g + 4], broadcast256(xs, 4 * g + 16));
                        }
                        let dot = _mm256_add_epi32(
                            _mm256_mullo_epi32(lo, s_lo),
                            _mm256_mullo_epi32(hi, s_hi),
                        );
                        *scaled = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(dot),
                            _mm256_set1_ps(x.d[k]),
                            *scaled,
                        );
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(16 * half) as *const __m128i));
                for (acc, scaled) in acc.iter_mut().zip(&scaled) {
                    *acc = _mm256_fmadd_ps(d, *scaled, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: the caller's promise for `out`.
            unsafe { store_half(*acc, out, r0 + i, t, half, valid) };
        }
    }
}
