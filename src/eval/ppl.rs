//! `eval ppl`: the streaming negative log-likelihood of one long text under each mode, per
//! position bucket. One pass per mode feeds the text in chunks and scores every token from the
//! logits of the token before it, so token `p` is predicted with all `p` tokens before it in
//! the conversation (what the mode lets it attend), exactly as a chat would see them. The Λ and
//! window modes run at constant memory to any length; vanilla's cache grows with the text and
//! stops where the memory budget ends.

use std::time::Instant;

use crate::engine::Engine;
use crate::model::{Logits, ModelError};

use super::meter::Meter;
use super::nll::{Bucket, Buckets, token_nll};
use super::{EvalError, Mode, TextPlan, feed, kv_bytes_at, new_cache, rss_bytes, run_limit};

/// What one mode's pass measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeResult {
    pub mode: Mode,
    pub n_global: usize,
    pub n_local: usize,
    pub distance_limit: u64,
    pub buckets: Vec<BucketRow>,
    /// Perplexity over every scored token.
    pub ppl: Option<f64>,
    /// Tokens fed (the text, or less where vanilla stopped).
    pub tokens: usize,
    pub seconds: f64,
    /// Why the pass ended before the text did.
    pub stopped: Option<String>,
}

/// A bucket with the run's state after the chunk that reached its end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BucketRow {
    #[serde(flatten)]
    pub bucket: Bucket,
    /// Bytes of the keys and values the cache holds.
    pub kv_bytes: u64,
    /// Resident memory of the process.
    pub rss_bytes: u64,
    /// Seconds since the pass started.
    pub seconds: f64,
}

/// One pass of `mode` over `tokens`, scoring positions into the plan's buckets.
pub fn evaluate(
    engine: &Engine,
    tokens: &[u32],
    mode: Mode,
    plan: &TextPlan<'_>,
    meter: &mut Meter,
) -> Result<ModeResult, EvalError> {
    let TextPlan {
        lambda,
        ends,
        chunk,
        vanilla_budget,
    } = *plan;
    let (total, stopped) = run_limit(engine, mode, tokens.len(), vanilla_budget);
    let params = mode.params(lambda, total)?;
    let mut cache = new_cache(engine, params);
    let mut buckets = Buckets::new(ends);
    let mut marks: Vec<(u64, u64, f64)> = Vec::new();
    let start = Instant::now();
    meter.relabel(format!("ppl {}", mode.name()));
    let tokens = &tokens[..total];
    let err = |e: candle_core::Error| ModelError::Forward(crate::error::candle_msg(&e));
    feed(
        engine,
        &mut cache,
        tokens,
        chunk,
        Logits::All,
        |first, piece, logits, _| {
            let flat = logits
                .flatten_all()
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(err)?;
            let vocab = flat.len() / piece.len();
            for (r, row) in flat.chunks_exact(vocab).enumerate() {
                let target = first + r + 1;
                if let Some(&id) = tokens.get(target) {
                    buckets.add(target, token_nll(row, id));
                }
            }
            let fed = first + piece.len();
            // The state at each bucket end the chunk reached.
            while marks.len() < ends.len() && ends[marks.len()].min(total) <= fed {
                marks.push((
                    kv_bytes_at(engine, params, fed),
                    rss_bytes(),
                    start.elapsed().as_secs_f64(),
                ));
            }
            meter.advance(piece.len() as u64);
            Ok(())
        },
    )?;
    let rows = buckets
        .results()
        .into_iter()
        .map(|bucket| {
            let i = ends.partition_point(|&e| e < bucket.end);
            let (kv_bytes, rss_bytes, seconds) = marks.get(i).copied().unwrap_or_default();
            BucketRow {
                bucket,
                kv_bytes,
                rss_bytes,
                seconds,
            }
        })
        .collect();
    Ok(ModeResult {
        mode,
        n_global: params.n_global,
        n_local: params.n_local,
        distance_limit: params.distance_limit,
        buckets: rows,
        ppl: buckets.overall_ppl(),
        tokens: total,
        seconds: start.elapsed().as_secs_f64(),
        stopped,
    })
}
