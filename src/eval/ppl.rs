//! `eval ppl`: the streaming negative log-likelihood of one long text under each mode, per
//! position bucket. One pass per mode feeds the text in chunks and scores every token from the
//! logits of the token before it, so token `p` is predicted with all `p` tokens before it in
//! the conversation (what the mode lets it attend), exactly as a chat would see them. The Λ and
//! window modes run at constant memory to any length; vanilla's cache grows with the text and
//! stops where the memory budget ends.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use crate::engine::Engine;
use crate::model::{Logits, ModelError};

use super::meter::{Meter, duration_text};
use super::nll::{Bucket, Buckets, token_nll};
use super::output::{Csv, LineChart, Series, Table};
use super::{
    EvalError, Evaluation, Mode, Report, RunContext, TextInput, TextPlan, TextTokens, describe,
    feed, kv_bytes_at, new_cache, parse_length, rss_bytes, run_limit, short_count,
};

/// `eval ppl`'s arguments.
#[derive(Args)]
pub struct PplArgs {
    /// The text (UTF-8), read as one document
    #[arg(long)]
    pub text: PathBuf,
    /// Bucket ends in tokens (k = 1024, m = 1024²); the text is read to the last one
    #[arg(long, value_delimiter = ',', value_parser = parse_length, default_value = "1k,2k,4k,8k,16k,32k")]
    pub lengths: Vec<usize>,
    /// Attention modes: vanilla, lambda, window, recall
    #[arg(long, value_delimiter = ',', value_parser = Mode::parse, default_value = "vanilla,lambda,window")]
    pub modes: Vec<Mode>,
    /// Tokens per forward pass
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
}

impl Evaluation for PplArgs {
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
        // The CSV is rewritten after each mode, so an hour-long run interrupted in its last mode
        // keeps the modes it finished (each write is whole: a temporary file renamed).
        let mut results = Vec::new();
        for &mode in &modes {
            results.push(evaluate(engine, &tokens, mode, &plan, &mut meter)?);
            run.out.write("ppl.csv", csv(&results).text())?;
        }
        meter.finish();
        notes.extend(results.iter().filter_map(|r| r.stopped.clone()));
        let chart = LineChart {
            title: format!("Perplexity against position: {}", run.model_name()),
            x_label: "position (tokens, bucket end)".into(),
            y_label: "perplexity of the bucket".into(),
            log_x: true,
            log_y: true,
            series: results
                .iter()
                .map(|r| Series {
                    name: r.mode.name().into(),
                    points: r
                        .buckets
                        .iter()
                        .map(|b| (b.bucket.end as f64, b.bucket.ppl))
                        .collect(),
                })
                .collect(),
        };
        let mut table = Table::new("positions", results.iter().map(|r| r.mode.name().into()));
        let mut start = 0;
        for &end in &ends {
            let mut row = vec![format!("{}–{}", short_count(start), short_count(end))];
            row.extend(results.iter().map(|r| {
                r.buckets
                    .iter()
                    .find(|b| b.bucket.end == end)
                    .map_or("—".into(), |b| format!("{:.3}", b.bucket.ppl))
            }));
            table.row(row);
            start = end;
        }
        let summary = |name: &str, cell: &dyn Fn(&ModeResult) -> String| {
            std::iter::once(name.to_string())
                .chain(results.iter().map(cell))
                .collect()
        };
        table.row(summary("all", &|r| {
            r.ppl.map_or("—".into(), |p| format!("{p:.3}"))
        }));
        table.row(summary("tokens", &|r| r.tokens.to_string()));
        table.row(summary("KV MiB at end", &|r| {
            r.buckets.last().map_or("—".into(), |b| {
                format!("{:.1}", b.kv_bytes as f64 / 1048576.0)
            })
        }));
        table.row(summary("time", &|r| duration_text(r.seconds)));
        let json = json!({
            "model": run.model_name(), "text": self.text, "text_tokens": tokens.len(),
            "results": results,
        });
        Ok(Report {
            heading: format!(
                "perplexity of {} ({} tokens), {}; lambda: {}",
                self.text.display(),
                tokens.len(),
                run.model_name(),
                describe(run.lambda)
            ),
            table,
            notes,
            csv: vec![("ppl.csv", csv(&results))],
            charts: vec![("ppl.svg", chart)],
            json: json.as_object().cloned().unwrap_or_default(),
        })
    }
}

/// `ppl.csv`: one row per mode and bucket.
fn csv(results: &[ModeResult]) -> Csv {
    let mut csv = Csv::new(&[
        "mode",
        "start",
        "end",
        "tokens",
        "mean_nll",
        "ppl",
        "kv_bytes",
        "rss_bytes",
        "seconds",
    ]);
    for r in results {
        for b in &r.buckets {
            csv.row(&[
                r.mode.name().into(),
                b.bucket.start.to_string(),
                b.bucket.end.to_string(),
                b.bucket.tokens.to_string(),
                format!("{:.6}", b.bucket.mean_nll),
                format!("{:.4}", b.bucket.ppl),
                b.kv_bytes.to_string(),
                b.rss_bytes.to_string(),
                format!("{:.1}", b.seconds),
            ]);
        }
    }
    csv
}

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
        recall,
    } = *plan;
    let (total, stopped) = run_limit(engine, mode, tokens.len(), vanilla_budget);
    let params = mode.params(lambda, total)?;
    let mut cache = new_cache(engine, mode, params, recall)?;
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
