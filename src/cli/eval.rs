//! `lambdachat eval`: the measurements of LM-Infinite's claims (see `crate::eval`), printed as
//! tables (or JSON), written as CSV files and SVG plots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Args, Subcommand};

use super::{LambdaArgs, ModelArgs, RunArgs};
use crate::attention::LambdaParams;
use crate::config::Config;
use crate::engine::Engine;
use crate::eval::meter::{Meter, duration_text};
use crate::eval::output::{Csv, LineChart, OutDir, Series};
use crate::eval::{self, Mode, TextPlan, cost, entropy, passkey, ppl};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity of a long text per position bucket: vanilla, Λ and window attention.
    Ppl(PplArgs),
    /// Passkey retrieval: a number hidden in filler text at a given depth, asked for at the end.
    Passkey(PasskeyArgs),
    /// Mean attention entropy per layer against position, vanilla against Λ.
    Entropy(EntropyArgs),
    /// Decode time per token and KV-cache bytes against context length, vanilla against Λ.
    Cost(CostArgs),
}

/// What every evaluation takes.
#[derive(Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub lambda: LambdaArgs,
    /// Directory for the CSV files and plots (created if needed)
    #[arg(long, default_value = "lambdachat-eval")]
    pub out: PathBuf,
    /// Print the results as JSON on stdout instead of a table
    #[arg(long)]
    pub json: bool,
    /// No progress lines on stderr
    #[arg(long)]
    pub quiet: bool,
    /// MiB vanilla attention's KV cache may take before it stops [default: 80% of the memory
    /// available when the model is loaded]
    #[arg(long, value_name = "MIB")]
    pub vanilla_memory: Option<u64>,
}

#[derive(Args)]
pub struct PplArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The text (UTF-8), read as one document
    #[arg(long)]
    pub text: PathBuf,
    /// Bucket ends in tokens (k = 1024, m = 1024²); the text is read to the last one
    #[arg(long, default_value = "1k,2k,4k,8k,16k,32k")]
    pub lengths: String,
    /// Attention modes: vanilla, lambda, window
    #[arg(long, default_value = "vanilla,lambda,window")]
    pub modes: String,
    /// Tokens per forward pass
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
}

#[derive(Args)]
pub struct PasskeyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Prompt lengths in tokens (k = 1024)
    #[arg(long, default_value = "1k,4k,8k")]
    pub lengths: String,
    /// Where the key sits in the filler: 0 = start, 1 = end
    #[arg(long, default_value = "0.1,0.5,0.9")]
    pub depths: String,
    /// Prompts per length and depth (each with its own key)
    #[arg(long, default_value_t = 2)]
    pub trials: usize,
    /// Attention modes: vanilla, lambda, window
    #[arg(long, default_value = "vanilla,lambda,window")]
    pub modes: String,
    /// Seed of the keys
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args)]
pub struct EntropyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The text (UTF-8), read as one document
    #[arg(long)]
    pub text: PathBuf,
    /// Bucket ends of query positions (k = 1024); the text is read to the last one
    #[arg(long, default_value = "256,512,1k,2k,4k,8k")]
    pub lengths: String,
    /// Attention modes: vanilla, lambda, window
    #[arg(long, default_value = "vanilla,lambda")]
    pub modes: String,
    /// Tokens per forward pass
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
}

#[derive(Args)]
pub struct CostArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Context lengths to measure at (k = 1024)
    #[arg(long, default_value = "1k,4k,16k,32k")]
    pub lengths: String,
    /// Attention modes: vanilla, lambda, window
    #[arg(long, default_value = "vanilla,lambda")]
    pub modes: String,
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

pub fn run(cmd: EvalCommand, config: &Config) -> Result<i32> {
    match cmd {
        EvalCommand::Ppl(a) => run_ppl(a, config),
        EvalCommand::Passkey(a) => run_passkey(a, config),
        EvalCommand::Entropy(a) => run_entropy(a, config),
        EvalCommand::Cost(a) => run_cost(a, config),
    }
}

/// The loaded model, its Λ, the results directory and vanilla's memory budget, after every
/// argument was checked.
struct Setup {
    engine: Arc<Engine>,
    lambda: LambdaParams,
    out: OutDir,
    vanilla_budget: u64,
}

impl CommonArgs {
    /// Checks the output directory first (a run must not fail at its end), then loads.
    fn setup(&self, config: &Config) -> Result<Setup> {
        let out = OutDir::prepare(&self.out)?;
        let run = RunArgs {
            model: self.model.clone(),
            lambda: self.lambda.clone(),
            sampling: Default::default(),
        };
        let (engine, lambda) = run.settings(config)?.load()?;
        let vanilla_budget = match self.vanilla_memory {
            Some(mib) => mib << 20,
            None => eval::available_memory().map_or(u64::MAX, |b| b / 5 * 4),
        };
        Ok(Setup {
            engine,
            lambda,
            out,
            vanilla_budget,
        })
    }

    fn meter(&self, total: u64, unit: &'static str) -> Meter {
        let meter = Meter::new("", total, unit);
        if self.quiet { meter.silent() } else { meter }
    }
}

/// What an evaluation over a text starts from: the model, the text's tokens up to the last
/// length, the bucket ends, and a note when the text is shorter than the lengths asked for.
struct TextRun {
    setup: Setup,
    tokens: Vec<u32>,
    ends: Vec<usize>,
    notes: Vec<String>,
}

impl TextRun {
    /// Checks the lengths and the text before loading anything, then tokenizes.
    fn prepare(common: &CommonArgs, text: &Path, lengths: &str, config: &Config) -> Result<Self> {
        let lengths = eval::parse_lengths(lengths)?;
        let text = eval::read_text(text)?;
        let setup = common.setup(config)?;
        let mut tokens = eval::document_tokens(&setup.engine, &text)?;
        if tokens.len() < 2 {
            return Err(eval::EvalError::TooShort(tokens.len()).into());
        }
        let (ends, cut) = eval::fit_lengths(&lengths, tokens.len());
        let mut notes = Vec::new();
        if cut {
            notes.push(format!(
                "the text is {} tokens long: lengths past it are cut, the last bucket ends there",
                tokens.len()
            ));
        }
        tokens.truncate(*ends.last().context("no lengths")?);
        Ok(Self {
            setup,
            tokens,
            ends,
            notes,
        })
    }
}

fn run_ppl(args: PplArgs, config: &Config) -> Result<i32> {
    let modes = Mode::parse_list(&args.modes)?;
    let TextRun {
        setup:
            Setup {
                engine,
                lambda,
                out,
                vanilla_budget,
            },
        tokens,
        ends,
        mut notes,
    } = TextRun::prepare(&args.common, &args.text, &args.lengths, config)?;
    let plan = TextPlan {
        lambda,
        ends: &ends,
        chunk: args.chunk.max(1),
        vanilla_budget,
    };
    let mut meter = args
        .common
        .meter((tokens.len() * modes.len()) as u64, "tokens");
    // The CSV is rewritten after each mode, so an hour-long run interrupted in its last mode
    // keeps the modes it finished (each write is whole: a temporary file renamed).
    let results = Device::Cpu.with_context(|| {
        let mut done = Vec::new();
        for &mode in &modes {
            done.push(ppl::evaluate(&engine, &tokens, mode, &plan, &mut meter)?);
            out.write("ppl.csv", ppl_csv(&done).text())?;
        }
        Ok::<_, eval::EvalError>(done)
    })?;
    meter.finish();
    notes.extend(results.iter().filter_map(|r| r.stopped.clone()));

    let chart = LineChart {
        title: format!("Perplexity against position: {}", engine.model.info().name),
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
    let written = [out.path("ppl.csv"), out.plot("ppl.svg", &chart)?];

    if args.common.json {
        println!(
            "{}",
            serde_json::json!({
                "model": engine.model.info().name, "text": args.text, "text_tokens": tokens.len(),
                "results": results, "notes": notes, "files": written,
            })
        );
        return Ok(0);
    }
    println!(
        "perplexity of {} ({} tokens), {}; lambda: {}",
        args.text.display(),
        tokens.len(),
        engine.model.info().name,
        eval::describe(lambda)
    );
    print!("{:<18}", "positions");
    for r in &results {
        print!("{:>12}", r.mode.name());
    }
    println!();
    let mut start = 0;
    for &end in &ends {
        print!(
            "{:<18}",
            format!("{}–{}", eval::short_count(start), eval::short_count(end))
        );
        for r in &results {
            match r.buckets.iter().find(|b| b.bucket.end == end) {
                Some(b) => print!("{:>12.3}", b.bucket.ppl),
                None => print!("{:>12}", "—"),
            }
        }
        println!();
        start = end;
    }
    let row = |name: &str, cell: &dyn Fn(&ppl::ModeResult) -> String| {
        print!("{name:<18}");
        for r in &results {
            print!("{:>12}", cell(r));
        }
        println!();
    };
    row("all", &|r| {
        r.ppl.map_or("—".into(), |p| format!("{p:.3}"))
    });
    row("tokens", &|r| r.tokens.to_string());
    row("KV MiB at end", &|r| {
        r.buckets.last().map_or("—".into(), |b| {
            format!("{:.1}", b.kv_bytes as f64 / 1048576.0)
        })
    });
    row("time", &|r| duration_text(r.seconds));
    for n in &notes {
        println!("note: {n}");
    }
    for w in &written {
        println!("wrote {}", w.display());
    }
    Ok(0)
}

/// `ppl.csv`: one row per mode and bucket.
fn ppl_csv(results: &[ppl::ModeResult]) -> Csv {
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

/// A table with a left column of row names and one right-aligned column per series.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(first: &str, columns: impl IntoIterator<Item = String>) -> Self {
        Self {
            header: std::iter::once(first.to_string()).chain(columns).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn print(&self) {
        let n = self.header.len();
        let width = |i: usize| {
            std::iter::once(&self.header)
                .chain(&self.rows)
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..n).map(width).collect();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i == 0 {
                    line += &format!("{c:<w$}", w = widths[0]);
                } else {
                    line += &format!("  {c:>w$}", w = widths[i]);
                }
            }
            println!("{}", line.trim_end());
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn parse_depths(list: &str) -> Result<Vec<f64>, eval::EvalError> {
    let mut depths = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<f64>() {
            Ok(d) if (0.0..=1.0).contains(&d) => depths.push(d),
            _ => return Err(eval::EvalError::BadDepth(item.to_string())),
        }
    }
    if depths.is_empty() {
        return Err(eval::EvalError::BadDepth(String::new()));
    }
    Ok(depths)
}

fn print_files(notes: &[String], written: &[PathBuf]) {
    for n in notes {
        println!("note: {n}");
    }
    for w in written {
        println!("wrote {}", w.display());
    }
}

fn run_passkey(args: PasskeyArgs, config: &Config) -> Result<i32> {
    let modes = Mode::parse_list(&args.modes)?;
    let lengths = eval::parse_lengths(&args.lengths)?;
    let depths = parse_depths(&args.depths)?;
    if args.trials == 0 {
        return Err(eval::EvalError::Invalid("--trials must be at least 1".into()).into());
    }
    let Setup {
        engine,
        lambda,
        out,
        ..
    } = args.common.setup(config)?;
    let plan = passkey::Plan {
        lambda,
        lengths: &lengths,
        depths: &depths,
        trials: args.trials,
        seed: args.seed,
    };
    let per_mode = lengths.len() * depths.len() * args.trials;
    let mut meter = args.common.meter((per_mode * modes.len()) as u64, "trials");
    let cells = Device::Cpu.with_context(|| {
        modes
            .iter()
            .map(|&m| passkey::evaluate(&engine, m, &plan, &mut meter))
            .collect::<Result<Vec<_>, _>>()
    })?;
    meter.finish();
    let cells: Vec<passkey::Cell> = cells.into_iter().flatten().collect();
    let mut csv = Csv::new(&[
        "mode",
        "length",
        "depth",
        "trials",
        "correct",
        "accuracy",
        "key_distance",
        "key_attended",
    ]);
    for c in &cells {
        csv.row(&[
            c.mode.name().into(),
            c.length.to_string(),
            c.depth.to_string(),
            c.trials.to_string(),
            c.correct.to_string(),
            format!("{:.3}", c.correct as f64 / c.trials as f64),
            format!("{:.0}", c.key_distance),
            c.key_attended.to_string(),
        ]);
    }
    let chart = LineChart {
        title: format!("Passkey retrieval: {}", engine.model.info().name),
        x_label: "tokens between the key and the question".into(),
        y_label: "accuracy".into(),
        log_x: true,
        log_y: false,
        series: modes
            .iter()
            .map(|&m| {
                let mut points: Vec<(f64, f64)> = cells
                    .iter()
                    .filter(|c| c.mode == m)
                    .map(|c| (c.key_distance, c.correct as f64 / c.trials as f64))
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series {
                    name: m.name().into(),
                    points,
                }
            })
            .collect(),
    };
    let written = [
        out.write("passkey.csv", csv.text())?,
        out.plot("passkey.svg", &chart)?,
    ];
    if args.common.json {
        println!(
            "{}",
            serde_json::json!({"model": engine.model.info().name, "cells": cells, "files": written})
        );
        return Ok(0);
    }
    println!(
        "passkey retrieval, {}; lambda: {}; {} trial(s) per cell, greedy",
        engine.model.info().name,
        eval::describe(lambda),
        args.trials
    );
    let mut table = Table::new(
        "length  depth  key distance",
        modes.iter().map(|m| m.name().to_string()),
    );
    let per_mode: Vec<Vec<&passkey::Cell>> = modes
        .iter()
        .map(|&m| cells.iter().filter(|c| c.mode == m).collect())
        .collect();
    for (i, first) in per_mode[0].iter().enumerate() {
        let mut row = vec![format!(
            "{:<6}  {:<5}  {:>12.0}",
            eval::short_count(first.length),
            first.depth,
            first.key_distance
        )];
        for cells in &per_mode {
            let c = cells[i];
            let mark = if c.key_attended { "" } else { " (evicted)" };
            row.push(format!("{}/{}{mark}", c.correct, c.trials));
        }
        table.row(row);
    }
    table.print();
    let misses: Vec<String> = cells
        .iter()
        .filter_map(|c| {
            c.example_miss.as_ref().map(|a| {
                format!(
                    "{} at {} depth {}: answered {a:?}",
                    c.mode.name(),
                    eval::short_count(c.length),
                    c.depth
                )
            })
        })
        .take(5)
        .collect();
    print_files(&misses, &written);
    Ok(0)
}

fn run_entropy(args: EntropyArgs, config: &Config) -> Result<i32> {
    let modes = Mode::parse_list(&args.modes)?;
    let TextRun {
        setup:
            Setup {
                engine,
                lambda,
                out,
                vanilla_budget,
            },
        tokens,
        ends,
        mut notes,
    } = TextRun::prepare(&args.common, &args.text, &args.lengths, config)?;
    let plan = TextPlan {
        lambda,
        ends: &ends,
        chunk: args.chunk.max(1),
        vanilla_budget,
    };
    let mut meter = args
        .common
        .meter((tokens.len() * modes.len()) as u64, "tokens");
    let results = Device::Cpu.with_context(|| {
        modes
            .iter()
            .map(|&m| entropy::evaluate(&engine, &tokens, m, &plan, &mut meter))
            .collect::<Result<Vec<_>, _>>()
    })?;
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
            engine.model.info().name
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
    let written = [
        out.write("entropy.csv", csv.text())?,
        out.plot("entropy.svg", &chart)?,
    ];
    if args.common.json {
        println!(
            "{}",
            serde_json::json!({"model": engine.model.info().name, "results": results, "notes": notes, "files": written})
        );
        return Ok(0);
    }
    println!(
        "attention entropy (nats, mean over the {} full-attention layers) of {}, {}; lambda: {}",
        results.first().map_or(0, |r| r.full_layers.len()),
        args.text.display(),
        engine.model.info().name,
        eval::describe(lambda)
    );
    let mut table = Table::new("positions", modes.iter().map(|m| m.name().to_string()));
    let means: Vec<Vec<f64>> = results
        .iter()
        .map(|r| r.mean_over(&r.full_layers))
        .collect();
    let mut start = 0;
    for (b, &end) in ends.iter().enumerate() {
        let mut row = vec![format!(
            "{}–{}",
            eval::short_count(start),
            eval::short_count(end)
        )];
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
    table.print();
    print_files(&notes, &written);
    Ok(0)
}

fn run_cost(args: CostArgs, config: &Config) -> Result<i32> {
    let modes = Mode::parse_list(&args.modes)?;
    let lengths = eval::parse_lengths(&args.lengths)?;
    let text = args.text.as_deref().map(eval::read_text).transpose()?;
    let Setup {
        engine,
        lambda,
        out,
        vanilla_budget,
    } = args.common.setup(config)?;
    let context = match &text {
        Some(t) => eval::document_tokens(&engine, t)?,
        None => eval::document_tokens(&engine, &passkey::filler(64))?,
    };
    if context.is_empty() {
        return Err(eval::EvalError::TooShort(0).into());
    }
    let plan = cost::Plan {
        lambda,
        lengths: &lengths,
        decode_tokens: args.decode_tokens.max(1),
        chunk: args.chunk.max(1),
        vanilla_budget,
    };
    let per_mode = lengths.last().copied().unwrap_or(0) + plan.decode_tokens * lengths.len();
    let mut meter = args.common.meter((per_mode * modes.len()) as u64, "tokens");
    let runs = Device::Cpu.with_context(|| {
        modes
            .iter()
            .map(|&m| cost::evaluate(&engine, &context, m, &plan, &mut meter))
            .collect::<Result<Vec<_>, _>>()
    })?;
    meter.finish();
    let notes: Vec<String> = runs.iter().filter_map(|r| r.1.clone()).collect();
    let points: Vec<cost::Point> = runs.into_iter().flat_map(|r| r.0).collect();
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
    let series = |value: &dyn Fn(&cost::Point) -> f64| -> Vec<Series> {
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
    let name = &engine.model.info().name;
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
    let written = [
        out.write("cost.csv", csv.text())?,
        out.plot("cost-time.svg", &time_chart)?,
        out.plot("cost-memory.svg", &memory_chart)?,
    ];
    if args.common.json {
        println!(
            "{}",
            serde_json::json!({"model": name, "points": points, "notes": notes, "files": written})
        );
        return Ok(0);
    }
    println!(
        "decode cost against context, {name}, {} threads; lambda: {}; {} decode steps timed per length",
        candle_core::utils::get_num_threads(),
        eval::describe(lambda),
        plan.decode_tokens
    );
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
        let mut row = vec![eval::short_count(l)];
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
    table.print();
    print_files(&notes, &written);
    Ok(0)
}
