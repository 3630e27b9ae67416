//! The CPU hot path's own kernels, for the weight types whose candle kernels a profiler showed to
//! be slow (docs/PERFORMANCE.md). Each multiplies f32 activations by a quantized weight matrix
//! the way llama.cpp does — activations quantized once per row to the weight's partner type —
//! with SIMD chosen at run time and a scalar fallback, on candle's own thread pool (so the two
//! never compete for cores).

mod exp;
mod q5_0;
mod q8_0;

pub use exp::fast_exp;
pub use q5_0::Q5_0Matrix;
pub use q8_0::Q8Rows;

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

/// Work items of about this many weight rows: small enough to balance two threads over a
/// 896-row matrix, large enough that a tile of activations is reused across many rows.
const ROWS_PER_ITEM: usize = 16;
