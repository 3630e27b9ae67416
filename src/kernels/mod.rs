//! The CPU hot path's own kernels, for the weight types whose candle kernels a profiler showed to
//! be slow (docs/PERFORMANCE.md): Q5_0 (candle's is scalar), Q8_0 (candle's is not repacked
//! for rows that are not a multiple of 256 values, which is every Q8_0 matrix of the default
//! model, its 151,936-row output projection included), and Q4_K and Q6_K, the matrices of most
//! downloaded models (candle's repacking keeps a second, larger copy of the weights: f32
//! scales, one byte per Q6_K value). Each multiplies f32 activations by a
//! weight matrix repacked at load (`packed`) the way llama.cpp does — activations quantized once
//! per row to Q8_0 — with SIMD chosen at run time and a scalar fallback, on candle's own thread
//! pool (so the two never compete for cores).

mod activations;
mod exp;
mod kquant;
mod packed;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_kquant;

pub use activations::Q8Rows;
pub use exp::fast_exp;
use packed::TILE_ROWS;
pub use packed::{Format, PackedMatrix};

/// A weight matrix the kernels cannot take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("{cols} columns are not a whole number of {block}-value blocks")]
    Blocks { cols: usize, block: usize },
    #[error("{got} bytes of weights, expected {expected} for {rows}×{cols}")]
    Size {
        got: usize,
        expected: usize,
        rows: usize,
        cols: usize,
    },
    #[error("activations have {got} values, expected {expected} ({rows} rows of {cols})")]
    Input {
        got: usize,
        expected: usize,
        rows: usize,
        cols: usize,
    },
}

/// Activation rows per work item: each unpacked tile block serves this many (measured on the
/// default model's 512-token prefill: 700 tok/s with 4, 710 with 6, 652 with 8).
const ROWS_PER_ITEM: usize = 6;

/// A row-major buffer of rows of `n` values shared by the pool's workers, each of which writes
/// only its own places (a matmul's tile of columns in its activation rows, a packed tile row, an
/// attention task's outputs, probe and entropy, a part of a split attention row).
pub(crate) struct DisjointRows<T = f32> {
    ptr: *mut T,
    n: usize,
    /// Elements in the buffer: every place handed out is checked against it, so a wrong row
    /// count (a hostile model's shape) panics instead of writing past the buffer.
    len: usize,
}
// A pointer and a length: copyable whatever `T` is (a derive would ask `T: Copy`).
impl<T> Clone for DisjointRows<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DisjointRows<T> {}
// SAFETY: workers write disjoint places (see `Kernel::matmul`, `PackedMatrix::new`, and the
// attention tasks of `attention::host`).
unsafe impl<T> Send for DisjointRows<T> {}
unsafe impl<T> Sync for DisjointRows<T> {}

impl<T> DisjointRows<T> {
    pub(crate) fn new(y: &mut [T], n: usize) -> Self {
        Self {
            ptr: y.as_mut_ptr(),
            n,
            len: y.len(),
        }
    }

    /// Row `r`, whole.
    ///
    /// # Safety
    /// No other worker may touch row `r` meanwhile. (A row outside the buffer panics.)
    pub(crate) unsafe fn row<'a>(self, r: usize) -> &'a mut [T] {
        let end = r.checked_add(1).and_then(|e| e.checked_mul(self.n));
        assert!(
            end.is_some_and(|e| e <= self.len),
            "row {r} of {} outside a buffer of {}",
            self.n,
            self.len
        );
        // SAFETY: inside the buffer (checked), and the caller's promise of exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.n), self.n) }
    }

    /// Where `y[r][j]` lives.
    ///
    /// # Safety
    /// The caller writes only inside the output from here. (A place outside it panics.)
    unsafe fn at(self, r: usize, j: usize) -> *mut T {
        let at = r.checked_mul(self.n).and_then(|o| o.checked_add(j));
        assert!(
            at.is_some_and(|a| a < self.len),
            "place ({r}, {j}) outside a buffer of {}",
            self.len
        );
        // SAFETY: inside the buffer (checked).
        unsafe { self.ptr.add(r * self.n + j) }
    }

    /// Writes `y[r][j]`.
    ///
    /// # Safety
    /// `(r, j)` must be inside the output, and no other worker may write it.
    unsafe fn write(self, r: usize, j: usize, value: T) {
        // SAFETY: the caller's promise.
        unsafe { *self.at(r, j) = value }
    }
}

/// Runs `f` over `0..n_items`, in chunks, on candle's compute pool: the one its own kernels use
/// (a second pool's threads would compete with its spinning workers for the cores; measured:
/// attention at half speed).
///
/// A task's panic is caught here and raised again once the pool is done: candle's pool re-raises
/// it while holding its call lock, which poisons the lock and breaks the pool for good — every
/// later call would panic, and the chat could not go on after a bug in one task.
pub(crate) fn pool_execute_chunked<F: Fn(std::ops::Range<usize>) + Sync>(n_items: usize, f: F) {
    let caught: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>> =
        std::sync::Mutex::new(None);
    candle_core::utils::barrier_pool().execute_chunked(n_items, |range| {
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(range))) {
            let mut first = caught.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(payload);
        }
    });
    let payload = caught.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(payload) = payload {
        std::panic::resume_unwind(payload);
    }
}

/// Which implementation this CPU runs, in order of capability (each needs the features of the
/// ones before it): of the matrix products here and of the attention (`attention::kernel`,
/// `attention::blocked`), so one `LAMBDACHAT_KERNELS` caps them all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// Every implementation this CPU can run (for the tests): the variants up to the best.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
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

    /// The best implementation this CPU runs, capped by `LAMBDACHAT_KERNELS` (`scalar`, `avx2`)
    /// when set: the test suite runs with the wider paths forced off, as on an older CPU.
    pub(crate) fn detect() -> Self {
        static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let cap = std::env::var("LAMBDACHAT_KERNELS").ok();
            Self::cpu_best().min(Self::cap(cap.as_deref()))
        })
    }

    fn cpu_best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if x86::avx2() {
            return if x86::avx512_vnni() {
                Self::Avx512Vnni
            } else {
                Self::Avx2
            };
        }
        Self::Scalar
    }

    /// The most capable implementation a `LAMBDACHAT_KERNELS` value allows (anything else,
    /// or nothing, allows all).
    fn cap(value: Option<&str>) -> Self {
        match value {
            Some("scalar") => Self::Scalar,
            #[cfg(target_arch = "x86_64")]
            Some("avx2") => Self::Avx2,
            #[cfg(target_arch = "x86_64")]
            _ => Self::Avx512Vnni,
            #[cfg(not(target_arch = "x86_64"))]
            _ => Self::Scalar,
        }
    }

    /// Runs `f` compiled for this implementation's instruction set: `f` is inlined into a
    /// function built with those features, so the compiler vectorizes its plain loops (and
    /// whatever `f` inlines) for them — AVX-512 or AVX2 in a portable binary whose baseline
    /// is SSE2. `f` and its callees should be `#[inline(always)]`, or they are compiled for
    /// the baseline.
    #[inline(always)]
    pub(crate) fn vectorize<R>(self, f: impl FnOnce() -> R) -> R {
        match self {
            // SAFETY: `detect` chose this implementation because the CPU has its features.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => unsafe { x86::with_avx512(f) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { x86::with_avx2(f) },
            Self::Scalar => f(),
        }
    }

    /// `out = x · mᵀ`, work items of one tile of weight rows × `ROWS_PER_ITEM` activation rows,
    /// tile-major (a worker keeps one tile's weights in L1 while it walks the activations).
    fn matmul(self, m: &PackedMatrix, x: &Q8Rows, out: DisjointRows) {
        let n_tiles = m.rows().div_ceil(TILE_ROWS);
        let row_items = x.rows.div_ceil(ROWS_PER_ITEM);
        pool_execute_chunked(n_tiles * row_items, |items| {
            for item in items {
                let t = item / row_items;
                let r0 = (item % row_items) * ROWS_PER_ITEM;
                let rows = r0..(r0 + ROWS_PER_ITEM).min(x.rows);
                // SAFETY: items own disjoint (tile, rows) blocks of `out`, which is
                // `x.rows × m.rows()` (`PackedMatrix::matmul`).
                unsafe { self.unit(m, x, t, rows, out) };
            }
        });
    }

    /// Tile `t` of `m` against activation rows `rows`.
    ///
    /// # Safety
    /// `out` must be `x.rows × m.rows()`, that block written by no one else meanwhile.
    unsafe fn unit(
        self,
        m: &PackedMatrix,
        x: &Q8Rows,
        t: usize,
        rows: std::ops::Range<usize>,
        out: DisjointRows,
    ) {
        // SAFETY: the caller's promise; `detect` saw the features of the SIMD kernels.
        unsafe {
            match self {
                Self::Scalar => packed::scalar_unit(m, x, t, rows, out),
                #[cfg(target_arch = "x86_64")]
                Self::Avx2 => x86::unit_avx2(m, x, t, rows, out),
                #[cfg(target_arch = "x86_64")]
                Self::Avx512Vnni => x86::unit_avx512(m, x, t, rows, out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Kernel, pool_execute_chunked};

    /// A task that panics makes the call panic, and the pool still works afterwards (candle's
    /// own re-raise poisons its call lock: every later call panicked).
    #[test]
    fn the_environment_caps_the_kernel() {
        assert_eq!(Kernel::cap(Some("scalar")), Kernel::Scalar);
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(Kernel::cap(Some("avx2")), Kernel::Avx2);
            assert_eq!(Kernel::cap(None), Kernel::Avx512Vnni);
            assert_eq!(Kernel::cap(Some("anything")), Kernel::Avx512Vnni);
        }
        assert!(Kernel::detect() <= Kernel::cpu_best());
    }

    #[test]
    fn a_panicking_task_leaves_the_pool_usable() {
        let failed = std::panic::catch_unwind(|| {
            pool_execute_chunked(64, |range| {
                if range.contains(&5) {
                    panic!("a task's bug");
                }
            })
        });
        assert!(failed.is_err());
        let done = std::sync::atomic::AtomicUsize::new(0);
        pool_execute_chunked(64, |range| {
            done.fetch_add(range.len(), std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(done.into_inner(), 64);
    }
}
