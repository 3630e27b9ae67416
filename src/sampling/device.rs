//! The sampler in tensor operations, for logits that live on a GPU: the same rules as the host
//! sampler (repeat penalty, then temperature, top-k, top-p, min-p), and only the sampled id comes
//! back to the host.
//!
//! Candle has no device sort for a 150k-entry vocabulary, so the cut-offs are found by bisection
//! instead: the top-k threshold over logit values, the top-p threshold over probabilities, and
//! the sampled index over the running sum (inverse-CDF sampling in index order with one uniform
//! number drawn from the seeded host generator, so a seed still reproduces a reply). Each step is
//! a handful of elementwise ops and one reduction, all queued on the device without waiting.
//! Ties with the k-th logit keep every tied token, where the host sampler keeps exactly k.

use candle_core::{DType, Tensor};

use super::{SamplingError, SamplingParams};

/// Bisection steps over logit and probability values: the interval shrinks to 2^-32 of the
/// spread, below the spacing of distinct f32 logits that matter.
const VALUE_STEPS: usize = 32;

type Result<T> = std::result::Result<T, candle_core::Error>;

/// Picks a token from `logits` `[vocab]` with `params`, given the distinct recent tokens (the
/// repeat penalty's) and a uniform number `u` in `[0, 1)`.
pub(super) fn sample(
    logits: &Tensor,
    params: &SamplingParams,
    recent: &[u32],
    u: f32,
) -> std::result::Result<u32, SamplingError> {
    draw(logits, params, recent, u)
        .map_err(SamplingError::device)?
        .ok_or(SamplingError::Empty)
}

fn draw(logits: &Tensor, p: &SamplingParams, recent: &[u32], u: f32) -> Result<Option<u32>> {
    let mut l = logits.flatten_all()?.to_dtype(DType::F32)?;
    let vocab = l.dim(0)?;
    if vocab == 0 {
        return Ok(None);
    }
    // NaN never wins (the host sampler skips it too).
    let neg_inf = Tensor::full(f32::NEG_INFINITY, vocab, l.device())?;
    l = l.eq(&l)?.where_cond(&l, &neg_inf)?;
    if p.repeat_penalty != 1.0 {
        let ids: Vec<u32> = recent
            .iter()
            .copied()
            .filter(|&id| (id as usize) < vocab)
            .collect();
        if !ids.is_empty() {
            let ids = Tensor::new(ids.as_slice(), l.device())?;
            let seen = l.index_select(&ids, 0)?;
            let penalized = seen.gt(0f64)?.where_cond(
                &(&seen / p.repeat_penalty as f64)?,
                &(&seen * p.repeat_penalty as f64)?,
            )?;
            // Written twice when an id repeats: the same value, so the order does not matter.
            l = l.scatter(&ids, &penalized, 0)?;
        }
    }
    if p.temperature == 0.0 {
        return Ok(Some(l.argmax(0)?.to_scalar::<u32>()?));
    }
    let zero = l.zeros_like()?;
    let max = l.max_keepdim(0)?;
    let mut keep = l.ones_like()?;
    if p.top_k > 0 && p.top_k < vocab {
        // Largest t with count(l ≥ t) ≥ k. Below max − 110·T a token's probability is 0 in f32
        // (e^-110 is under the smallest f32), so the search starts there, whatever the outliers.
        let count = |t: &Tensor| l.broadcast_ge(t)?.to_dtype(DType::F32)?.sum_keepdim(0);
        let lo = (&max - (110.0 * p.temperature as f64 + 1.0))?;
        let hi = (&max + 1.0)?;
        let threshold = bisect(lo, hi, VALUE_STEPS, false, |mid| {
            count(mid)?.ge(p.top_k as f64)
        })?;
        keep = l.broadcast_ge(&threshold)?.where_cond(&keep, &zero)?;
    }
    // Probabilities over what top-k kept, at the temperature.
    let scaled = (l.broadcast_sub(&max)? / p.temperature as f64)?;
    let weights = (scaled.exp()? * &keep)?;
    let probs = weights.broadcast_div(&weights.sum_keepdim(0)?)?;
    let best = probs.max_keepdim(0)?;
    if p.top_p < 1.0 {
        // Largest t whose tokens with probability ≥ t carry at least top_p of the mass.
        let mass = |t: &Tensor| {
            let above = probs.broadcast_ge(t)?.to_dtype(DType::F32)?;
            (&probs * above)?.sum_keepdim(0)
        };
        let lo = best.zeros_like()?;
        let hi = (&best * 2.0)?;
        let threshold = bisect(lo, hi, VALUE_STEPS, false, |mid| {
            mass(mid)?.ge(p.top_p as f64)
        })?;
        keep = probs.broadcast_ge(&threshold)?.where_cond(&keep, &zero)?;
    }
    if p.min_p > 0.0 {
        let floor = (&best * p.min_p as f64)?;
        keep = probs.broadcast_ge(&floor)?.where_cond(&keep, &zero)?;
    }
    let kept = (&probs * &keep)?;
    // Inverse CDF: the smallest index whose running sum passes u · total.
    let target = (kept.sum_keepdim(0)? * u as f64)?;
    let index = Tensor::arange(0u32, vocab as u32, l.device())?.to_dtype(DType::F32)?;
    let running = |m: &Tensor| {
        let upto = index.broadcast_le(m)?.to_dtype(DType::F32)?;
        (&kept * upto)?.sum_keepdim(0)
    };
    let lo = Tensor::new(&[-1f32], l.device())?;
    let hi = Tensor::new(&[vocab as f32 - 1.0], l.device())?;
    let steps = (usize::BITS - vocab.leading_zeros()) as usize + 1;
    // Largest m with running(m) ≤ target; the answer is m + 1 (kept by `hi`).
    let below = bisect(lo, hi, steps, true, |mid| {
        running(mid)?.broadcast_le(&target)
    })?;
    let id = (below + 1.0)?
        .minimum(vocab as f64 - 1.0)?
        .to_dtype(DType::U32)?;
    Ok(Some(id.flatten_all()?.to_vec1::<u32>()?[0]))
}

/// Bisection on a `[1]` interval: `lo` always satisfies `ok`, `hi` never does; returns `lo`.
/// With `integers`, midpoints are rounded down (indices held in f32, exact below 2^24).
fn bisect(
    mut lo: Tensor,
    mut hi: Tensor,
    steps: usize,
    integers: bool,
    ok: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    for _ in 0..steps {
        let mut mid = ((&lo + &hi)? * 0.5)?;
        if integers {
            mid = mid.floor()?;
        }
        let yes = ok(&mid)?;
        lo = yes.where_cond(&mid, &lo)?;
        hi = yes.where_cond(&hi, &mid)?;
    }
    Ok(lo)
}
