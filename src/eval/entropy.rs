//! `eval entropy`: the mean entropy of the attention distributions per layer against position.
//! LM-Infinite's second failure factor: under vanilla attention the entropy keeps growing with
//! the number of attended tokens (like ln n), past anything seen in training; under Λ it stops
//! growing once the window is full.

use crate::attention::KvCache;
use crate::engine::Engine;
use crate::model::Logits;

use super::meter::Meter;
use super::{EvalError, Mode, TextPlan, feed, new_cache, run_limit};

/// One mode's curves.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeEntropy {
    pub mode: Mode,
    /// Bucket `[start, end)` of query positions.
    pub buckets: Vec<(usize, usize)>,
    /// `[layer][bucket]`: mean entropy in nats (NaN where the run did not reach the bucket).
    pub per_layer: Vec<Vec<f64>>,
    /// Layers with a global branch (not a model's sliding-window layers).
    pub full_layers: Vec<usize>,
    /// Tokens fed.
    pub tokens: usize,
    pub seconds: f64,
    pub stopped: Option<String>,
}

impl ModeEntropy {
    /// Mean over `layers` per bucket.
    pub fn mean_over(&self, layers: &[usize]) -> Vec<f64> {
        (0..self.buckets.len())
            .map(|b| {
                layers.iter().map(|&l| self.per_layer[l][b]).sum::<f64>() / layers.len() as f64
            })
            .collect()
    }
}

/// Feeds `tokens` under `mode`, recording every token's attention entropy in every layer.
/// Runs on the CPU's cache, the one that records entropies.
pub fn evaluate(
    engine: &Engine,
    tokens: &[u32],
    mode: Mode,
    plan: &TextPlan<'_>,
    meter: &mut Meter,
) -> Result<ModeEntropy, EvalError> {
    let (limit, stopped) = run_limit(engine, mode, tokens.len(), plan.vanilla_budget);
    let tokens = &tokens[..limit];
    let params = mode.params(plan.lambda, tokens.len())?;
    let mut cache = new_cache(engine, params);
    match &mut cache {
        KvCache::Host(c) => c.set_entropy(true),
        KvCache::Tensor(_) => {
            return Err(EvalError::Invalid(
                "eval entropy runs on the CPU (--device cpu): the GPU cache does not record entropies"
                    .into(),
            ));
        }
    }
    let geometry = engine.model.layer_geometry(params);
    let n_layers = geometry.len();
    let ends = plan.ends;
    let mut sums = vec![vec![0f64; ends.len()]; n_layers];
    let mut counts = vec![0usize; ends.len()];
    meter.relabel(format!("entropy {}", mode.name()));
    let start = std::time::Instant::now();
    feed(
        engine,
        &mut cache,
        tokens,
        plan.chunk,
        Logits::Last,
        |first, piece, _, cache| {
            let KvCache::Host(c) = cache else {
                unreachable!("checked above")
            };
            let per_layer = c.entropies();
            for t in 0..piece.len() {
                let b = ends.partition_point(|&e| e <= first + t);
                if b == ends.len() {
                    continue;
                }
                counts[b] += 1;
                for (layer, h) in per_layer.iter().enumerate() {
                    sums[layer][b] += h[t] as f64;
                }
            }
            meter.advance(piece.len() as u64);
            Ok(())
        },
    )?;
    let starts = std::iter::once(0).chain(ends.iter().copied());
    Ok(ModeEntropy {
        mode,
        buckets: starts.zip(ends.iter().copied()).collect(),
        per_layer: sums
            .iter()
            .map(|row| {
                row.iter()
                    .zip(&counts)
                    .map(|(s, &n)| if n > 0 { s / n as f64 } else { f64::NAN })
                    .collect()
            })
            .collect(),
        full_layers: (0..n_layers).filter(|&l| geometry[l].pinnable).collect(),
        tokens: tokens.len(),
        seconds: start.elapsed().as_secs_f64(),
        stopped,
    })
}
