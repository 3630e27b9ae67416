//! `eval entropy`: the mean entropy of the attention distributions per layer against position.
//! LM-Infinite's second failure factor: under vanilla attention the entropy keeps growing with
//! the number of attended tokens (like ln n), past anything seen in training; under Λ it stops
//! growing once the window is full.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::attention::KvCache;
use crate::engine::Engine;
use crate::model::Logits;

use super::meter::{Meter, duration_text};
use super::output::{Csv, LineChart, Series, Table};
use super::{
    EvalError, Evaluation, Mode, Report, RunContext, TextInput, TextPlan, TextTokens, describe,
    feed, new_cache, parse_length, run_limit, short_count,
};

/// `eval entropy`'s arguments.
#[derive(Args)]
pub struct EntropyArgs {
    /// The text (UTF-8), read as one document
    #[arg(long)]
    pub text: PathBuf,
    /// Bucket ends of query positions (k = 1024); the text is read to the last one
    #[arg(long, value_delimiter = ',', value_parser = parse_length, default_value = "256,512,1k,2k,4k,8k")]
    pub lengths: Vec<usize>,
    /// Attention modes: vanilla, lambda, window, recall
    #[arg(long, value_delimiter = ',', value_parser = Mode::parse, default_value = "vanilla,lambda")]
    pub modes: Vec<Mode>,
    /// Tokens per forward pass
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
}

impl Evaluation for EntropyArgs {
    type Input = TextInput;

    fn prepare(&self) -> Result<TextInput, EvalError> {
        TextInput::read(&self.text, &self.lengths, &self.modes)
    }

    fn run(&self, input: TextInput, run: &RunContext<'_>) -> Result<Report, EvalError> {
        let engine = run.engine;
        let TextTokens {
            tokens,
            ends,
            mut notes,
        } = TextTokens::new(engine, &input)?;
        let modes = input.modes;
        let plan = TextPlan::new(run, &ends, self.chunk);
        let mut meter = run.meter((tokens.len() * modes.len()) as u64, "tokens");
        let results = modes
            .iter()
            .map(|&m| evaluate(engine, &tokens, m, &plan, &mut meter))
            .collect::<Result<Vec<_>, _>>()?;
        meter.finish();
        notes.extend(results.iter().filter_map(|r| r.stopped.clone()));
        let mut csv = Csv::new(&["mode", "layer", "start", "end", "entropy"]);
        for r in &results {
            for (layer, row) in r.per_layer.iter().enumerate() {
                for ((start, end), h) in r.buckets.iter().zip(row) {
                    if h.is_finite() {
                        csv.row(&[
                            r.mode.name().into(),
                            layer.to_string(),
                            start.to_string(),
                            end.to_string(),
                            format!("{h:.5}"),
                        ]);
                    }
                }
            }
        }
        let chart = LineChart {
            title: format!(
                "Attention entropy (mean of full layers): {}",
                run.model_name()
            ),
            x_label: "query position (tokens, bucket end)".into(),
            y_label: "entropy (nats)".into(),
            log_x: true,
            log_y: false,
            series: results
                .iter()
                .map(|r| Series {
                    name: r.mode.name().into(),
                    points: r
                        .buckets
                        .iter()
                        .zip(r.mean_over(&r.full_layers))
                        .map(|((_, end), h)| (*end as f64, h))
                        .collect(),
                })
                .collect(),
        };
        let mut table = Table::new("positions", modes.iter().map(|m| m.name().to_string()));
        let means: Vec<Vec<f64>> = results
            .iter()
            .map(|r| r.mean_over(&r.full_layers))
            .collect();
        let mut start = 0;
        for (b, &end) in ends.iter().enumerate() {
            let mut row = vec![format!("{}–{}", short_count(start), short_count(end))];
            row.extend(means.iter().map(|m| {
                if m[b].is_finite() {
                    format!("{:.3}", m[b])
                } else {
                    "—".into()
                }
            }));
            table.row(row);
            start = end;
        }
        table.row(
            std::iter::once("time".to_string())
                .chain(results.iter().map(|r| duration_text(r.seconds)))
                .collect(),
        );
        let json = json!({"model": run.model_name(), "results": results});
        Ok(Report {
            heading: format!(
                "attention entropy (nats, mean over the {} full-attention layers) of {}, {}; lambda: {}",
                results.first().map_or(0, |r| r.full_layers.len()),
                self.text.display(),
                run.model_name(),
                describe(run.lambda)
            ),
            table,
            notes,
            csv: vec![("entropy.csv", csv)],
            charts: vec![("entropy.svg", chart)],
            json: json.as_object().cloned().unwrap_or_default(),
        })
    }
}

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
    let mut cache = new_cache(engine, mode, params, plan.recall)?;
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
