//! `eval cost`: decode time per token and KV-cache bytes against context length, for each mode in
//! the same run. One pass per mode fills the context to each length in turn (chunked prefill),
//! then times a few greedy decode steps there: LM-Infinite's speed and memory ratios of Λ over
//! vanilla attention, measured on this machine.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use crate::attention::LambdaParams;
use crate::engine::Engine;
use crate::model::Logits;

use super::meter::Meter;
use super::output::{Csv, LineChart, Series, Table};
use super::{
    EvalError, Evaluation, Mode, RecallSetup, Report, RunContext, argmax, describe,
    document_tokens, feed, kv_bytes_at, last_row, new_cache, parse_length, passkey, read_text,
    rss_bytes, run_limit, short_count, sorted_lengths,
};

/// `eval cost`'s arguments.
#[derive(Args)]
pub struct CostArgs {
    /// Context lengths to measure at (k = 1024)
    #[arg(long, value_delimiter = ',', value_parser = parse_length, default_value = "1k,4k,16k,32k")]
    pub lengths: Vec<usize>,
    /// Attention modes: vanilla, lambda, window, recall
    #[arg(long, value_delimiter = ',', value_parser = Mode::parse, default_value = "vanilla,lambda")]
    pub modes: Vec<Mode>,
    /// Decode steps timed at each length
    #[arg(long, default_value_t = 16)]
    pub decode_tokens: usize,
    /// Tokens per prefill forward pass
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Text for the context [default: generated filler]
    #[arg(long)]
    pub text: Option<PathBuf>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

impl Evaluation for CostArgs {
    /// The context text (when given) and the checked lengths and modes.
    type Input = (Option<String>, Vec<usize>, Vec<Mode>);

    fn prepare(&self) -> Result<Self::Input, EvalError> {
        let lengths = sorted_lengths(&self.lengths)?;
        let modes = Mode::distinct(&self.modes)?;
        let text = self.text.as_deref().map(read_text).transpose()?;
        Ok((text, lengths, modes))
    }

    fn run(
        &self,
        (text, lengths, modes): Self::Input,
        run: &RunContext<'_>,
    ) -> Result<Report, EvalError> {
        let engine = run.engine;
        let context = match &text {
            Some(t) => document_tokens(engine, t)?,
            None => document_tokens(engine, &passkey::filler(64))?,
        };
        if context.is_empty() {
            return Err(EvalError::TooShort(0));
        }
        let plan = Plan {
            lambda: run.lambda,
            recall: &run.recall,
            lengths: &lengths,
            decode_tokens: self.decode_tokens.max(1),
            chunk: self.chunk.max(1),
            vanilla_budget: run.vanilla_budget,
        };
        let per_mode = lengths.last().copied().unwrap_or(0) + plan.decode_tokens * lengths.len();
        let mut meter = run.meter((per_mode * modes.len()) as u64, "tokens");
        let runs = modes
            .iter()
            .map(|&m| evaluate(engine, &context, m, &plan, &mut meter))
            .collect::<Result<Vec<_>, _>>()?;
        meter.finish();
        let notes: Vec<String> = runs.iter().filter_map(|r| r.1.clone()).collect();
        let points: Vec<Point> = runs.into_iter().flat_map(|r| r.0).collect();
        let mut csv = Csv::new(&[
            "mode",
            "length",
            "ms_per_token",
            "tok_s",
            "kv_bytes",
            "rss_bytes",
        ]);
        for p in &points {
            csv.row(&[
                p.mode.name().into(),
                p.length.to_string(),
                format!("{:.3}", p.ms_per_token),
                format!("{:.2}", 1000.0 / p.ms_per_token),
                p.kv_bytes.to_string(),
                p.rss_bytes.to_string(),
            ]);
        }
        let series = |value: &dyn Fn(&Point) -> f64| -> Vec<Series> {
            modes
                .iter()
                .map(|&m| Series {
                    name: m.name().into(),
                    points: points
                        .iter()
                        .filter(|p| p.mode == m)
                        .map(|p| (p.length as f64, value(p)))
                        .collect(),
                })
                .collect()
        };
        let name = run.model_name();
        let time_chart = LineChart {
            title: format!("Decode time per token: {name}"),
            x_label: "context length (tokens)".into(),
            y_label: "ms per token".into(),
            log_x: true,
            log_y: false,
            series: series(&|p| p.ms_per_token),
        };
        let memory_chart = LineChart {
            title: format!("KV cache: {name}"),
            x_label: "context length (tokens)".into(),
            y_label: "KV cache (MiB)".into(),
            log_x: true,
            log_y: true,
            series: series(&|p| mib(p.kv_bytes)),
        };
        let find = |m: Mode, l: usize| points.iter().find(|p| p.mode == m && p.length == l);
        let mut columns: Vec<String> = Vec::new();
        for m in &modes {
            columns.push(format!("{} ms/tok", m.name()));
        }
        for m in &modes {
            columns.push(format!("{} KV MiB", m.name()));
        }
        let ratio = modes.contains(&Mode::Vanilla) && modes.contains(&Mode::Lambda);
        if ratio {
            columns.push("speed-up".into());
            columns.push("memory ratio".into());
        }
        let mut table = Table::new("context", columns);
        for &l in &lengths {
            let mut row = vec![short_count(l)];
            for &m in &modes {
                row.push(find(m, l).map_or("—".into(), |p| format!("{:.2}", p.ms_per_token)));
            }
            for &m in &modes {
                row.push(find(m, l).map_or("—".into(), |p| format!("{:.1}", mib(p.kv_bytes))));
            }
            if ratio {
                match (find(Mode::Vanilla, l), find(Mode::Lambda, l)) {
                    (Some(v), Some(x)) => {
                        row.push(format!("{:.2}×", v.ms_per_token / x.ms_per_token));
                        row.push(format!("{:.2}×", v.kv_bytes as f64 / x.kv_bytes as f64));
                    }
                    _ => row.extend(["—".to_string(), "—".to_string()]),
                }
            }
            table.row(row);
        }
        let json = json!({"model": name, "points": points});
        Ok(Report {
            heading: format!(
                "decode cost against context, {name}, {} threads; lambda: {}; {} decode steps timed per length",
                candle_core::utils::get_num_threads(),
                describe(run.lambda),
                plan.decode_tokens
            ),
            table,
            notes,
            csv: vec![("cost.csv", csv)],
            charts: vec![
                ("cost-time.svg", time_chart),
                ("cost-memory.svg", memory_chart),
            ],
            json: json.as_object().cloned().unwrap_or_default(),
        })
    }
}

/// How the passes run.
pub struct Plan<'a> {
    pub lambda: LambdaParams,
    /// How the `recall` mode recalls.
    pub recall: &'a RecallSetup,
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
    let mut cache = new_cache(engine, mode, params, plan.recall)?;
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
