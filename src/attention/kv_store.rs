//! How the host cache holds keys and values: f32, f16 at half the bytes, or q8_0 at about a
//! quarter.
//!
//! With the window full, a decode step reads every key and value of the window once per layer
//! (the default model: 24 KiB per token in f32, about 100 MB per step at 4,096 tokens), so the
//! attention is bound by memory and shrinking the bytes is what speeds it up. Queries, scores and
//! sums stay f32: a stored key or value is widened as it is loaded (AVX-512's `vcvtph2ps`, or
//! q8_0's bytes converted and scaled, inside the kernels; a converted row elsewhere), so the only
//! error is the rounding of what is stored: f16's relative 2⁻¹¹ (llama.cpp's default cache),
//! or q8_0's half step of `max|x| / 127` per block of 32 values (llama.cpp's `-ctk q8_0`).
//!
//! [`KvVec`] is the storage (one element type per cache, chosen by [`KvType`]); [`KvView`] is a
//! borrowed slice of it for the attention passes, which dispatch once per pass to code generic
//! over [`KvRows`].

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Values per q8_0 block (one scale each): a q8_0 cache needs rows that are whole blocks.
pub const Q8_BLOCK: usize = 32;

/// The element type of a cache's keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvType {
    /// 4 bytes per value: exact.
    #[default]
    F32,
    /// 2 bytes per value: half the memory and the memory traffic of the attention.
    F16,
    /// 8-bit values with a scale per 32 (GGML's Q8_0): 1.125 bytes per value in memory
    /// (the scale kept as f32), 1.0625 on disk (as f16).
    #[value(name = "q8_0")]
    Q8_0,
}

impl KvType {
    /// Bytes `values` values take in memory (`values` a whole number of blocks for q8_0).
    pub fn bytes_for(self, values: usize) -> usize {
        match self {
            KvType::F32 => 4 * values,
            KvType::F16 => 2 * values,
            KvType::Q8_0 => values + 4 * values.div_ceil(Q8_BLOCK),
        }
    }

    /// Bytes `values` values take in a snapshot or a KV file (q8_0: GGML's 34-byte blocks).
    pub fn stored_bytes(self, values: usize) -> usize {
        match self {
            KvType::Q8_0 => values + 2 * values.div_ceil(Q8_BLOCK),
            other => other.bytes_for(values),
        }
    }

    /// `values` as this type's little-endian bytes, as a snapshot or a KV file stores them
    /// (`values` whole blocks for q8_0).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut v = KvVec::new(self);
        v.extend(values);
        v.to_le_bytes()
    }

    /// The values of [`Self::encode`]'s bytes.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let v = KvVec::from_le_bytes(self, bytes);
        v.to_f32(0..v.len())
    }

    /// Whether rows of `head_dim` values can be held as this type (q8_0: whole blocks).
    pub fn holds_rows_of(self, head_dim: usize) -> bool {
        self != KvType::Q8_0 || head_dim.is_multiple_of(Q8_BLOCK)
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Keys or values of one type as the attention kernels read them: rows are ranges of values,
/// widened to f32 as they are loaded (f32 itself is read in place).
pub(super) trait KvRows<'a>: Copy + Send + Sync {
    /// Values held.
    fn len(self) -> usize;

    /// All the values, when they are f32 already.
    fn f32s(self) -> Option<&'a [f32]>;

    /// Values `at .. at + out.len()` as f32 (`at` and the length whole blocks for q8_0).
    fn widen(self, at: usize, out: &mut [f32]);

    /// Asks the CPU to start loading values `at .. at + len` (a hint: never faults).
    fn prefetch(self, at: usize, len: usize);

    /// Sixteen values from `at`, widened to f32 (`at` a multiple of 16).
    ///
    /// # Safety
    /// Values `at .. at + 16` must exist, and the CPU must have AVX-512 F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(self, at: usize) -> std::arch::x86_64::__m512;

    /// Eight values from `at`, widened to f32 (`at` a multiple of 8).
    ///
    /// # Safety
    /// Values `at .. at + 8` must exist, and the CPU must have AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(self, at: usize) -> std::arch::x86_64::__m256;
}

/// Prefetches the cache lines of `len` elements of `T` from `p`.
#[inline(always)]
fn prefetch_lines<T>(p: *const T, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..len * size_of::<T>()).step_by(64) {
        // SAFETY: prefetch is a hint that never faults, whatever the address.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(line));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

impl<'a> KvRows<'a> for &'a [f32] {
    #[inline(always)]
    fn len(self) -> usize {
        <[f32]>::len(self)
    }

    #[inline(always)]
    fn f32s(self) -> Option<&'a [f32]> {
        Some(self)
    }

    #[inline(always)]
    fn widen(self, at: usize, out: &mut [f32]) {
        out.copy_from_slice(&self[at..at + out.len()]);
    }

    #[inline(always)]
    fn prefetch(self, at: usize, len: usize) {
        if at < self.len() {
            prefetch_lines(self[at..].as_ptr(), len);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(self, at: usize) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 16 values from `at` and AVX-512 F.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(self.as_ptr().add(at)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(self, at: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 values from `at` and AVX2.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(self.as_ptr().add(at)) }
    }
}

impl<'a> KvRows<'a> for &'a [f16] {
    #[inline(always)]
    fn len(self) -> usize {
        <[f16]>::len(self)
    }

    #[inline(always)]
    fn f32s(self) -> Option<&'a [f32]> {
        None
    }

    #[inline(always)]
    fn widen(self, at: usize, out: &mut [f32]) {
        self[at..at + out.len()].convert_to_f32_slice(out);
    }

    #[inline(always)]
    fn prefetch(self, at: usize, len: usize) {
        if at < self.len() {
            prefetch_lines(self[at..].as_ptr(), len);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(self, at: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm512_cvtph_ps};
        // SAFETY: the caller guarantees 16 halves (32 bytes) from `at` and AVX-512 F.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(self.as_ptr().add(at) as *const __m256i)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(self, at: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps};
        // SAFETY: the caller guarantees 8 halves (16 bytes) from `at` and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(self.as_ptr().add(at) as *const __m128i)) }
    }
}

/// Borrowed q8_0 values: `quants[i]` is value `i` in units of `scales[i / 32]`.
#[derive(Debug, Clone, Copy)]
pub struct Q8View<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
}

impl<'a> KvRows<'a> for Q8View<'a> {
    #[inline(always)]
    fn len(self) -> usize {
        self.quants.len()
    }

    #[inline(always)]
    fn f32s(self) -> Option<&'a [f32]> {
        None
    }

    #[inline(always)]
    fn widen(self, at: usize, out: &mut [f32]) {
        let quants = &self.quants[at..at + out.len()];
        let scales = &self.scales[at / Q8_BLOCK..];
        for ((o, q), d) in out
            .chunks_exact_mut(Q8_BLOCK)
            .zip(quants.chunks_exact(Q8_BLOCK))
            .zip(scales)
        {
            o.iter_mut().zip(q).for_each(|(o, &q)| *o = q as f32 * d);
        }
    }

    #[inline(always)]
    fn prefetch(self, at: usize, len: usize) {
        if at < self.quants.len() {
            prefetch_lines(self.quants[at..].as_ptr(), len);
            prefetch_lines(self.scales[at / Q8_BLOCK..].as_ptr(), len / Q8_BLOCK);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(self, at: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 values (bytes) from `at`, whose block has its scale,
        // and AVX-512 F.
        unsafe {
            let q = _mm_loadu_si128(self.quants.as_ptr().add(at) as *const __m128i);
            let d = _mm512_set1_ps(*self.scales.get_unchecked(at / Q8_BLOCK));
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d)
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(self, at: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 values (bytes) from `at`, whose block has its scale,
        // and AVX2.
        unsafe {
            let q = _mm_loadl_epi64(self.quants.as_ptr().add(at) as *const __m128i);
            let d = _mm256_set1_ps(*self.scales.get_unchecked(at / Q8_BLOCK));
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)
        }
    }
}

/// q8_0 storage: values `quants[i] · scales[i / 32]`. Scales are f16 numbers (what a file
/// stores) kept as f32, so that a kernel loads them without a conversion.
#[derive(Debug, Clone, Default)]
pub struct Q8Vec {
    quants: Vec<i8>,
    scales: Vec<f32>,
}

impl Q8Vec {
    /// Overwrites whole blocks from `at` with `src` quantized: `d = f16(max|x| / 127)`, values
    /// `round(x / d)`. With the rounded `d`, a row that was read from a q8_0 store quantizes
    /// back to the same bytes.
    fn write(&mut self, at: usize, src: &[f32]) {
        assert!(
            at.is_multiple_of(Q8_BLOCK) && src.len().is_multiple_of(Q8_BLOCK),
            "q8_0 writes whole blocks"
        );
        let quants = &mut self.quants[at..at + src.len()];
        let scales = &mut self.scales[at / Q8_BLOCK..];
        for ((x, q), d) in src
            .chunks_exact(Q8_BLOCK)
            .zip(quants.chunks_exact_mut(Q8_BLOCK))
            .zip(scales)
        {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            // A scale past f16's range (a model that blew up) holds zeros, never inf or NaN.
            let rounded = f16::from_f32(amax / 127.0).to_f32();
            *d = if rounded.is_finite() { rounded } else { 0.0 };
            let inverse = if *d > 0.0 { 1.0 / *d } else { 0.0 };
            for (q, v) in q.iter_mut().zip(x) {
                // Round to nearest by the float adder (no libm call in a portable build):
                // 1.5 · 2²³ pushes the fraction out of the mantissa.
                const ROUND: f32 = 12_582_912.0;
                *q = ((v * inverse).clamp(-127.0, 127.0) + ROUND - ROUND) as i8;
            }
        }
    }

    fn resize(&mut self, len: usize) {
        assert!(len.is_multiple_of(Q8_BLOCK), "q8_0 holds whole blocks");
        self.quants.resize(len, 0);
        self.scales.resize(len / Q8_BLOCK, 0.0);
    }

    fn view(&self) -> Q8View<'_> {
        Q8View {
            quants: &self.quants,
            scales: &self.scales,
        }
    }

    /// GGML's block layout: per 32 values the scale as f16, then the 32 bytes.
    fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(KvType::Q8_0.stored_bytes(self.quants.len()));
        for (q, d) in self.quants.chunks_exact(Q8_BLOCK).zip(&self.scales) {
            out.extend(f16::from_f32(*d).to_le_bytes());
            out.extend(q.iter().map(|&q| q as u8));
        }
        out
    }

    /// Whole 34-byte blocks of [`Self::to_le_bytes`]; a scale that is not finite (a damaged
    /// file) reads as 0, so the values stay finite.
    fn from_le_bytes(bytes: &[u8]) -> Self {
        let blocks = bytes.chunks_exact(2 + Q8_BLOCK);
        let mut v = Q8Vec {
            quants: Vec::with_capacity(blocks.len() * Q8_BLOCK),
            scales: Vec::with_capacity(blocks.len()),
        };
        for block in blocks {
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            v.scales.push(if d.is_finite() { d } else { 0.0 });
            v.quants.extend(block[2..].iter().map(|&b| b as i8));
        }
        v
    }
}

/// Keys or values stored `[slot][kv_head][head_dim]` as one [`KvType`]. Rows go in and come
/// out as f32; a row read and written back is unchanged (f16 → f32 → f16 is exact, and q8_0
/// requantizes a read row to the same bytes).
#[derive(Debug, Clone)]
pub enum KvVec {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8(Q8Vec),
}

impl Default for KvVec {
    fn default() -> Self {
        KvVec::F32(Vec::new())
    }
}

impl KvVec {
    pub fn new(kv_type: KvType) -> Self {
        match kv_type {
            KvType::F32 => KvVec::F32(Vec::new()),
            KvType::F16 => KvVec::F16(Vec::new()),
            KvType::Q8_0 => KvVec::Q8(Q8Vec::default()),
        }
    }

    pub fn kv_type(&self) -> KvType {
        match self {
            KvVec::F32(_) => KvType::F32,
            KvVec::F16(_) => KvType::F16,
            KvVec::Q8(_) => KvType::Q8_0,
        }
    }

    /// Values held (not bytes).
    pub fn len(&self) -> usize {
        match self {
            KvVec::F32(v) => v.len(),
            KvVec::F16(v) => v.len(),
            KvVec::Q8(v) => v.quants.len(),
        }
    }

    /// Bytes allocated (capacity, not length).
    pub fn capacity_bytes(&self) -> usize {
        match self {
            KvVec::F32(v) => 4 * v.capacity(),
            KvVec::F16(v) => 2 * v.capacity(),
            KvVec::Q8(v) => v.quants.capacity() + 4 * v.scales.capacity(),
        }
    }

    pub fn reserve_exact(&mut self, additional: usize) {
        match self {
            KvVec::F32(v) => v.reserve_exact(additional),
            KvVec::F16(v) => v.reserve_exact(additional),
            KvVec::Q8(v) => {
                v.quants.reserve_exact(additional);
                v.scales.reserve_exact(additional.div_ceil(Q8_BLOCK));
            }
        }
    }

    /// Grows (with zeros) or shrinks to `len` values.
    pub fn resize(&mut self, len: usize) {
        match self {
            KvVec::F32(v) => v.resize(len, 0.0),
            KvVec::F16(v) => v.resize(len, f16::ZERO),
            KvVec::Q8(v) => v.resize(len),
        }
    }

    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.resize(len);
        }
    }

    /// Copies the values of `from` to `to` (whole blocks for q8_0).
    pub fn copy_within(&mut self, from: Range<usize>, to: usize) {
        match self {
            KvVec::F32(v) => v.copy_within(from, to),
            KvVec::F16(v) => v.copy_within(from, to),
            KvVec::Q8(v) => {
                let blocks = from.start / Q8_BLOCK..from.end.div_ceil(Q8_BLOCK);
                v.scales.copy_within(blocks, to / Q8_BLOCK);
                v.quants.copy_within(from, to);
            }
        }
    }

    /// Overwrites the values from `at` with `src`.
    pub fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvVec::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvVec::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
            KvVec::Q8(v) => v.write(at, src),
        }
    }

    /// Appends `src`.
    pub fn extend(&mut self, src: &[f32]) {
        let at = self.len();
        self.resize(at + src.len());
        self.write(at, src);
    }

    /// Copies the values of `range` into `out` (of the same length).
    pub fn read(&self, range: Range<usize>, out: &mut [f32]) {
        assert_eq!(range.len(), out.len());
        match self {
            KvVec::F32(v) => v.as_slice().widen(range.start, out),
            KvVec::F16(v) => v.as_slice().widen(range.start, out),
            KvVec::Q8(v) => v.view().widen(range.start, out),
        }
    }

    /// A copy of the values of `range`, in this vector's type (exact).
    pub fn slice(&self, range: Range<usize>) -> Self {
        match self {
            KvVec::F32(v) => KvVec::F32(v[range].to_vec()),
            KvVec::F16(v) => KvVec::F16(v[range].to_vec()),
            KvVec::Q8(v) => KvVec::Q8(Q8Vec {
                scales: v.scales[range.start / Q8_BLOCK..range.end.div_ceil(Q8_BLOCK)].to_vec(),
                quants: v.quants[range].to_vec(),
            }),
        }
    }

    /// Overwrites the values from `at` with `src` (exact when both have one type).
    pub fn write_from(&mut self, at: usize, src: &KvVec) {
        match (self, src) {
            (KvVec::F32(v), KvVec::F32(s)) => v[at..at + s.len()].copy_from_slice(s),
            (KvVec::F16(v), KvVec::F16(s)) => v[at..at + s.len()].copy_from_slice(s),
            (KvVec::Q8(v), KvVec::Q8(s)) => {
                assert!(at.is_multiple_of(Q8_BLOCK), "q8_0 writes whole blocks");
                v.quants[at..at + s.quants.len()].copy_from_slice(&s.quants);
                v.scales[at / Q8_BLOCK..][..s.scales.len()].copy_from_slice(&s.scales);
            }
            (this, other) => this.write(at, &other.to_f32(0..other.len())),
        }
    }

    /// The values of `range` as f32.
    pub fn to_f32(&self, range: Range<usize>) -> Vec<f32> {
        let mut out = vec![0f32; range.len()];
        self.read(range, &mut out);
        out
    }

    /// The same values held as `kv_type` (rounded when narrowing).
    pub fn converted(&self, kv_type: KvType) -> Self {
        if kv_type == self.kv_type() {
            return self.clone();
        }
        let mut out = KvVec::new(kv_type);
        out.reserve_exact(self.len());
        out.extend(&self.to_f32(0..self.len()));
        out
    }

    /// The values as little-endian bytes (what a snapshot or a KV file stores).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            KvVec::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            KvVec::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            KvVec::Q8(v) => v.to_le_bytes(),
        }
    }

    /// Values of `kv_type` from little-endian bytes (whole values, or whole 34-byte blocks
    /// for q8_0; a remainder is ignored).
    pub fn from_le_bytes(kv_type: KvType, bytes: &[u8]) -> Self {
        match kv_type {
            KvType::F32 => KvVec::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            KvType::F16 => KvVec::F16(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            KvType::Q8_0 => KvVec::Q8(Q8Vec::from_le_bytes(bytes)),
        }
    }

    pub fn view(&self) -> KvView<'_> {
        match self {
            KvVec::F32(v) => KvView::F32(v),
            KvVec::F16(v) => KvView::F16(v),
            KvVec::Q8(v) => KvView::Q8(v.view()),
        }
    }

    /// Address of the first value (tests check that storage is never reallocated).
    #[cfg(test)]
    pub fn as_ptr(&self) -> *const u8 {
        match self {
            KvVec::F32(v) => v.as_ptr() as *const u8,
            KvVec::F16(v) => v.as_ptr() as *const u8,
            KvVec::Q8(v) => v.quants.as_ptr() as *const u8,
        }
    }
}

/// Borrowed keys or values of one type, for an attention pass.
#[derive(Debug, Clone, Copy)]
pub enum KvView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8(Q8View<'a>),
}

impl<'a> KvView<'a> {
    /// The values from `at` on (a whole block for q8_0).
    pub fn from(self, at: usize) -> Self {
        match self {
            KvView::F32(v) => KvView::F32(&v[at..]),
            KvView::F16(v) => KvView::F16(&v[at..]),
            KvView::Q8(v) => {
                assert!(at.is_multiple_of(Q8_BLOCK), "q8_0 rows start on a block");
                KvView::Q8(Q8View {
                    quants: &v.quants[at..],
                    scales: &v.scales[at / Q8_BLOCK..],
                })
            }
        }
    }

    /// Values `at .. at + out.len()` as f32.
    pub fn widen(self, at: usize, out: &mut [f32]) {
        match self {
            KvView::F32(v) => v.widen(at, out),
            KvView::F16(v) => v.widen(at, out),
            KvView::Q8(v) => v.widen(at, out),
        }
    }
}

impl<'a> From<&'a [f32]> for KvView<'a> {
    fn from(v: &'a [f32]) -> Self {
        KvView::F32(v)
    }
}

impl<'a> From<&'a Vec<f32>> for KvView<'a> {
    fn from(v: &'a Vec<f32>) -> Self {
        KvView::F32(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_within_their_type_s_precision() {
        let row: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.173).collect();
        for kv_type in [KvType::F32, KvType::F16, KvType::Q8_0] {
            let mut v = KvVec::new(kv_type);
            v.extend(&row);
            v.extend(&row);
            assert_eq!(v.len(), 128);
            assert!(v.capacity_bytes() >= kv_type.bytes_for(128));
            let back = v.to_f32(64..128);
            for (i, (a, b)) in row.iter().zip(&back).enumerate() {
                let block_max = row[i / 32 * 32..][..32]
                    .iter()
                    .fold(0f32, |m, x| m.max(x.abs()));
                let tolerance = match kv_type {
                    KvType::F32 => 0.0,
                    KvType::F16 => a.abs() / 2048.0,
                    // Half a step of max/127, the step itself rounded to f16.
                    KvType::Q8_0 => block_max / 254.0 * (1.0 + 1.0 / 1024.0),
                };
                assert!((a - b).abs() <= tolerance, "{kv_type}: {a} vs {b}");
            }
            // What was read writes back unchanged.
            v.write(0, &back);
            assert_eq!(v.to_f32(0..64), back);
            let bytes = v.to_le_bytes();
            assert_eq!(bytes.len(), kv_type.stored_bytes(128));
            let read = KvVec::from_le_bytes(kv_type, &bytes);
            assert_eq!(read.to_f32(0..128), v.to_f32(0..128));
            assert_eq!(read.to_le_bytes(), bytes);
            assert_eq!(v.converted(KvType::F32).to_f32(0..128), v.to_f32(0..128));
            // Slices, copies inside and views from a row keep the values.
            assert_eq!(v.slice(64..128).to_f32(0..64), back);
            let mut w = v.clone();
            w.copy_within(64..128, 0);
            w.truncate(64);
            assert_eq!(w.to_f32(0..64), back);
            let mut out = vec![0f32; 64];
            v.view().from(64).widen(0, &mut out);
            assert_eq!(out, back);
            let mut z = KvVec::new(kv_type);
            z.resize(128);
            z.write_from(64, &v.slice(0..64));
            assert_eq!(z.to_f32(64..128), back);
        }
    }

    #[test]
    fn q8_0_keeps_zero_and_overflowing_blocks_finite() {
        let mut v = KvVec::new(KvType::Q8_0);
        let mut row = vec![0f32; 96];
        row[32] = f32::INFINITY;
        row[33] = 1.0;
        row[64] = f32::NAN;
        row[65] = -2.0;
        v.extend(&row);
        let back = v.to_f32(0..96);
        assert!(back.iter().all(|x| x.is_finite()), "{back:?}");
        assert!(back[..32].iter().all(|&x| x == 0.0));
        assert!((back[65] + 2.0).abs() < 2.0 / 1000.0, "{}", back[65]);
        // A damaged file's scale (an f16 infinity) reads as zeros too.
        let mut bytes = v.to_le_bytes();
        bytes[..2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        bytes[2] = 100;
        let read = KvVec::from_le_bytes(KvType::Q8_0, &bytes);
        assert!(read.to_f32(0..96).iter().all(|x| x.is_finite()));
    }

    #[test]
    fn q8_0_reads_whole_blocks_only() {
        assert!(KvType::Q8_0.holds_rows_of(64));
        assert!(!KvType::Q8_0.holds_rows_of(48));
        assert!(KvType::F16.holds_rows_of(48));
        assert_eq!(KvType::Q8_0.bytes_for(64), 64 + 8);
        assert_eq!(KvType::Q8_0.stored_bytes(64), 68);
        assert_eq!(
            KvVec::from_le_bytes(KvType::Q8_0, &[0u8; 34 + 10]).len(),
            32
        );
    }
}
