//! How the host cache holds keys and values: f32, or f16 at half the bytes.
//!
//! With the window full, a decode step reads every key and value of the window once per layer
//! (the default model: 24 KiB per token in f32, about 100 MB per step at 4,096 tokens), so the
//! attention is bound by memory and halving the bytes is what speeds it up. Queries, scores and
//! sums stay f32: an f16 key or value is widened as it is loaded (AVX-512's `vcvtph2ps` inside
//! the kernels, a converted row elsewhere), so the only error is f16's rounding of what is stored
//! (a relative 2⁻¹¹), the same precision llama.cpp's default cache keeps.
//!
//! [`KvVec`] is the storage (one element type per cache, chosen by [`KvType`]); [`KvView`] is a
//! borrowed slice of it for the attention passes, which dispatch once per pass to code generic
//! over [`KvElem`].

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

/// The element type of a cache's keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvType {
    /// 4 bytes per value: exact.
    #[default]
    F32,
    /// 2 bytes per value: half the memory and the memory traffic of the attention.
    F16,
}

impl KvType {
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An element the attention kernels read keys and values as.
pub(super) trait KvElem: Copy + Send + Sync + 'static {
    /// `row` as f32: the row itself for f32, converted into `buf` otherwise.
    fn as_f32<'a>(row: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];

    /// `row` itself when it is f32 already.
    fn f32_row(row: &[Self]) -> Option<&[f32]>;

    /// Sixteen elements from `p`, widened to f32.
    ///
    /// # Safety
    /// `p` must point to 16 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    #[inline(always)]
    fn as_f32<'a>(row: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        row
    }

    #[inline(always)]
    fn f32_row(row: &[f32]) -> Option<&[f32]> {
        Some(row)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 16 readable floats.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn as_f32<'a>(row: &'a [f16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.resize(row.len(), 0.0);
        row.convert_to_f32_slice(buf);
        buf
    }

    #[inline(always)]
    fn f32_row(_: &[f16]) -> Option<&[f32]> {
        None
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm512_cvtph_ps};
        // SAFETY: the caller guarantees 16 readable halves (32 bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// Keys or values stored `[slot][kv_head][head_dim]` as one [`KvType`]. Rows go in and come
/// out as f32 (f16 → f32 → f16 is exact, so a row read and written back is unchanged).
#[derive(Debug, Clone)]
pub enum KvVec {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Default for KvVec {
    fn default() -> Self {
        KvVec::F32(Vec::new())
    }
}

/// `$body` with `$v` bound to the inner `Vec` of either type.
macro_rules! each {
    ($self:expr, $v:ident => $body:expr) => {
        match $self {
            KvVec::F32($v) => $body,
            KvVec::F16($v) => $body,
        }
    };
}

impl KvVec {
    pub fn new(kv_type: KvType) -> Self {
        match kv_type {
            KvType::F32 => KvVec::F32(Vec::new()),
            KvType::F16 => KvVec::F16(Vec::new()),
        }
    }

    pub fn kv_type(&self) -> KvType {
        match self {
            KvVec::F32(_) => KvType::F32,
            KvVec::F16(_) => KvType::F16,
        }
    }

    /// Values held (not bytes).
    pub fn len(&self) -> usize {
        each!(self, v => v.len())
    }

    /// Bytes allocated (capacity, not length).
    pub fn capacity_bytes(&self) -> usize {
        each!(self, v => v.capacity() * self.kv_type().bytes())
    }

    pub fn reserve_exact(&mut self, additional: usize) {
        each!(self, v => v.reserve_exact(additional))
    }

    /// Grows (with zeros) or shrinks to `len` values.
    pub fn resize(&mut self, len: usize) {
        match self {
            KvVec::F32(v) => v.resize(len, 0.0),
            KvVec::F16(v) => v.resize(len, f16::ZERO),
        }
    }

    pub fn truncate(&mut self, len: usize) {
        each!(self, v => v.truncate(len))
    }

    pub fn copy_within(&mut self, from: Range<usize>, to: usize) {
        each!(self, v => v.copy_within(from, to))
    }

    /// Overwrites the values from `at` with `src`.
    pub fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvVec::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvVec::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
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
        match self {
            KvVec::F32(v) => out.copy_from_slice(&v[range]),
            KvVec::F16(v) => v[range].convert_to_f32_slice(out),
        }
    }

    /// A copy of the values of `range`, in this vector's type (exact).
    pub fn slice(&self, range: Range<usize>) -> Self {
        match self {
            KvVec::F32(v) => KvVec::F32(v[range].to_vec()),
            KvVec::F16(v) => KvVec::F16(v[range].to_vec()),
        }
    }

    /// Overwrites the values from `at` with `src` (exact when both have one type).
    pub fn write_from(&mut self, at: usize, src: &KvVec) {
        match (self, src) {
            (KvVec::F32(v), KvVec::F32(s)) => v[at..at + s.len()].copy_from_slice(s),
            (KvVec::F16(v), KvVec::F16(s)) => v[at..at + s.len()].copy_from_slice(s),
            (this, other) => this.write(at, &other.to_f32(0..other.len())),
        }
    }

    /// The values of `range` as f32.
    pub fn to_f32(&self, range: Range<usize>) -> Vec<f32> {
        let mut out = vec![0f32; range.len()];
        self.read(range, &mut out);
        out
    }

    /// The same values held as `kv_type` (rounded to f16 when narrowing).
    pub fn converted(&self, kv_type: KvType) -> Self {
        if kv_type == self.kv_type() {
            return self.clone();
        }
        let mut out = KvVec::new(kv_type);
        out.reserve_exact(self.len());
        out.extend(&self.to_f32(0..self.len()));
        out
    }

    /// The values as little-endian bytes (what a snapshot stores).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            KvVec::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            KvVec::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Values of `kv_type` from little-endian bytes (`bytes.len()` a multiple of its size).
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
        }
    }

    pub fn view(&self) -> KvView<'_> {
        match self {
            KvVec::F32(v) => KvView::F32(v),
            KvVec::F16(v) => KvView::F16(v),
        }
    }

    /// Address of the first value (tests check that storage is never reallocated).
    #[cfg(test)]
    pub fn as_ptr(&self) -> *const u8 {
        each!(self, v => v.as_ptr() as *const u8)
    }
}

/// Borrowed keys or values of one type, for an attention pass.
#[derive(Debug, Clone, Copy)]
pub enum KvView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> KvView<'a> {
    /// The values from `at` on.
    pub fn from(self, at: usize) -> Self {
        match self {
            KvView::F32(v) => KvView::F32(&v[at..]),
            KvView::F16(v) => KvView::F16(&v[at..]),
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
    fn rows_round_trip_and_f16_rounds_to_its_precision() {
        let row: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.173).collect();
        for kv_type in [KvType::F32, KvType::F16] {
            let mut v = KvVec::new(kv_type);
            v.extend(&row);
            v.extend(&row);
            assert_eq!(v.len(), 128);
            assert!(v.capacity_bytes() >= 128 * kv_type.bytes());
            let back = v.to_f32(64..128);
            for (a, b) in row.iter().zip(&back) {
                let tolerance = if kv_type == KvType::F32 {
                    0.0
                } else {
                    a.abs() / 2048.0
                };
                assert!((a - b).abs() <= tolerance, "{kv_type}: {a} vs {b}");
            }
            // What was read writes back unchanged.
            v.write(0, &back);
            assert_eq!(v.to_f32(0..64), back);
            let bytes = v.to_le_bytes();
            assert_eq!(bytes.len(), 128 * kv_type.bytes());
            assert_eq!(
                KvVec::from_le_bytes(kv_type, &bytes).to_f32(0..128),
                v.to_f32(0..128)
            );
            assert_eq!(v.converted(KvType::F32).to_f32(0..128), v.to_f32(0..128));
        }
    }
}
