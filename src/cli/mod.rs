//! Command line: `ask`, `bench`, `inspect`. Flags for the model, the Λ parameters and sampling
//! are shared by every command that runs a model (as llama.cpp's tools share theirs).

mod ask;
mod bench;
mod chat;
mod inspect;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::attention::{DEFAULT_N_GLOBAL, DEFAULT_N_LOCAL, LambdaParams};
use crate::engine::Engine;
use crate::fetch;
use crate::sampling::SamplingParams;

#[derive(Parser)]
#[command(
    name = "lambdachat",
    version,
    about = "Chat with a local LLM that never runs out of context (LM-Infinite Λ-attention over a bounded KV cache)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Chat in the terminal (the default when no command is given).
    Chat(chat::ChatArgs),
    /// Answer one prompt, streaming the reply to stdout.
    Ask(ask::AskArgs),
    /// Measure decode and prefill speed, cache size and memory.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print what a model file contains.
    Inspect(inspect::InspectArgs),
}

/// Which model to run.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF file to load [default: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, fetched on first use]
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
}

/// The Λ-attention parameters.
#[derive(Args, Clone, Debug)]
pub struct LambdaArgs {
    /// Leading tokens every query attends to (attention sinks: BOS, system prompt)
    #[arg(long, default_value_t = DEFAULT_N_GLOBAL)]
    pub n_global: usize,
    /// Window of recent tokens attended at their true distance (capped at the training length)
    #[arg(long, default_value_t = DEFAULT_N_LOCAL)]
    pub n_local: usize,
    /// Distance at which sinks outside the window are seen [default: n_local]
    #[arg(long)]
    pub distance_limit: Option<u64>,
}

/// Sampling flags.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// 0 = greedy
    #[arg(long, default_value_t = SamplingParams::default().temperature)]
    pub temperature: f32,
    /// 0 disables
    #[arg(long, default_value_t = SamplingParams::default().top_k)]
    pub top_k: usize,
    #[arg(long, default_value_t = SamplingParams::default().top_p)]
    pub top_p: f32,
    #[arg(long, default_value_t = SamplingParams::default().min_p)]
    pub min_p: f32,
    /// 1.0 disables
    #[arg(long, default_value_t = SamplingParams::default().repeat_penalty)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = SamplingParams::default().seed)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }
}

/// Everything a command that runs a model needs.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub lambda: LambdaArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

impl RunArgs {
    /// Validates the flags, then loads the model (fetching the default one if needed).
    pub fn load(&self) -> Result<(Arc<Engine>, LambdaParams)> {
        // Bad flags fail before any download or load.
        let requested = LambdaParams::new(
            self.lambda.n_global,
            self.lambda.n_local,
            self.lambda.distance_limit,
        )?;
        self.sampling.params().validate()?;
        let path = resolve_model(&self.model)?;
        let engine = Engine::load(&path)?;
        let params = cap_to_training_length(requested, engine.model.info().context_length)?;
        Ok((Arc::new(engine), params))
    }
}

/// `n_local` beyond the training length would show the model distances it never saw.
fn cap_to_training_length(p: LambdaParams, train_len: usize) -> Result<LambdaParams> {
    if p.n_local <= train_len {
        return Ok(p);
    }
    tracing::info!(
        n_local = p.n_local,
        train_len,
        "n_local capped at the training length"
    );
    let distance = p.distance_limit.min(train_len as u64);
    Ok(LambdaParams::new(
        p.n_global.min(train_len),
        train_len,
        Some(distance),
    )?)
}

/// Parses the command line; with no command (`lambdachat`, `lambdachat --model x.gguf`) the
/// chat starts.
pub fn parse() -> Cli {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let is_meta = matches!(first, "-h" | "--help" | "-V" | "--version" | "help");
    if !is_meta && (args.len() == 1 || first.starts_with('-')) {
        args.insert(1, "chat".into());
    }
    Cli::parse_from(args)
}

pub fn resolve_model(args: &ModelArgs) -> Result<PathBuf> {
    match &args.model {
        Some(p) => Ok(p.clone()),
        None => fetch::ensure(&fetch::DEFAULT_MODEL).context("fetching the default model"),
    }
}

pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Chat(c) => chat::run(c),
        Command::Ask(a) => ask::run(a),
        Command::Bench(b) => bench::run(b),
        Command::Inspect(i) => inspect::run(i),
    }
}
