//! `eval cost`: decode time per token and KV-cache bytes against context length, for each mode in
//! the same run. One pass per mode fills the context to each length in turn (chunked prefill),
//! then times a few greedy decode steps there: LM-Infinite's speed and memory ratios of Λ over
//! vanilla attention, measured on this machine.

use std::time::Instant;

use crate::attention::LambdaParams;
use crate::engine::Engine;
use crate::model::Logits;

use super::meter::Meter;
use super::{
    EvalError, Mode, argmax, feed, kv_bytes_at, last_row, new_cache, rss_bytes, run_limit,
};

/// How the passes run.
pub struct Plan<'a> {
    pub lambda: LambdaParams,
    /// Context lengths to measure at (sorted).
    pub lengths: &'a [usize],
    /// Decode steps timed at each length.
    pub decode_tokens: usize,
    /// Tokens per prefill forward.
    pub chunk: usize,
    pub vanilla_budget: u64,
}

/// One mode at one context length.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    pub mode: Mode,
    pub length: usize,
    /// Mean wall time of one decode step.
    pub ms_per_token: f64,
    pub kv_bytes: u64,
    pub rss_bytes: u64,
}

/// One mode's pass over the plan's lengths, the context taken from `context` (repeated if short).
/// Returns the points and, for vanilla, why it stopped early.
pub fn evaluate(
    engine: &Engine,
    context: &[u32],
    mode: Mode,
    plan: &Plan<'_>,
    meter: &mut Meter,
) -> Result<(Vec<Point>, Option<String>), EvalError> {
    let steps = plan.decode_tokens.max(1);
    let longest = plan.lengths.last().copied().unwrap_or(0) + steps;
    let mut lengths = plan.lengths.to_vec();
    let (limit, stopped) = run_limit(engine, mode, longest, plan.vanilla_budget);
    lengths.retain(|&l| l + steps <= limit);
    let params = mode.params(plan.lambda, longest)?;
    let mut cache = new_cache(engine, params);
    meter.relabel(format!("cost {}", mode.name()));
    let mut points = Vec::new();
    let mut fed = 0usize;
    let mut row = Vec::new();
    for &length in &lengths {
        // Context up to `length` (the decode steps of earlier lengths count as context).
        let need = length.saturating_sub(fed);
        let text: Vec<u32> = context
            .iter()
            .copied()
            .cycle()
            .skip(fed)
            .take(need)
            .collect();
        feed(
            engine,
            &mut cache,
            &text,
            plan.chunk,
            Logits::Last,
            |_, piece, logits, _| {
                row = last_row(&logits)?;
                meter.advance(piece.len() as u64);
                Ok(())
            },
        )?;
        fed += text.len();
        let start = Instant::now();
        for _ in 0..steps {
            let id = if row.is_empty() {
                context[0]
            } else {
                argmax(&row)
            };
            row = last_row(&engine.model.forward(&[id], &mut cache, Logits::Last)?)?;
        }
        engine
            .device
            .synchronize()
            .map_err(|e| crate::model::ModelError::Forward(crate::error::candle_msg(&e)))?;
        let ms_per_token = start.elapsed().as_secs_f64() * 1000.0 / steps as f64;
        fed += steps;
        meter.advance(steps as u64);
        points.push(Point {
            mode,
            length,
            ms_per_token,
            kv_bytes: kv_bytes_at(engine, params, fed),
            rss_bytes: rss_bytes(),
        });
    }
    Ok((points, stopped))
}
