//! `lambdachat eval`: the measurements of LM-Infinite's claims (see `crate::eval`). One run loop
//! serves every evaluation: check its arguments and the output directory, load the model, run,
//! then write the report's CSV files and plots and print its table (or JSON).

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::{Args, Subcommand};

use super::{LambdaArgs, ModelArgs, RecallTuning, RunArgs};
use crate::config::Config;
use crate::eval::cost::CostArgs;
use crate::eval::entropy::EntropyArgs;
use crate::eval::facts::FactsArgs;
use crate::eval::output::OutDir;
use crate::eval::passkey::PasskeyArgs;
use crate::eval::ppl::PplArgs;
use crate::eval::{self, Evaluation, RecallSetup, RunContext};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity of a long text per position bucket: vanilla, Λ and window attention.
    Ppl(EvalArgs<PplArgs>),
    /// Passkey retrieval: a number hidden in filler text at a given depth, asked for at the end.
    Passkey(EvalArgs<PasskeyArgs>),
    /// Facts stated in a long chat (through the session and chat template), then asked for.
    Facts(EvalArgs<FactsArgs>),
    /// Mean attention entropy per layer against position, vanilla against Λ.
    Entropy(EvalArgs<EntropyArgs>),
    /// Decode time per token and KV-cache bytes against context length, vanilla against Λ.
    Cost(EvalArgs<CostArgs>),
}

/// An evaluation's own arguments and those every evaluation takes.
#[derive(Args)]
pub struct EvalArgs<E: Args> {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub eval: E,
}

/// What every evaluation takes.
#[derive(Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub lambda: LambdaArgs,
    #[command(flatten)]
    pub recall: RecallTuning,
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

pub fn run(cmd: EvalCommand, config: &Config) -> Result<i32> {
    match cmd {
        EvalCommand::Ppl(a) => run_one(a, config),
        EvalCommand::Passkey(a) => run_one(a, config),
        EvalCommand::Facts(a) => run_one(a, config),
        EvalCommand::Entropy(a) => run_one(a, config),
        EvalCommand::Cost(a) => run_one(a, config),
    }
}

/// Checks the evaluation's arguments, then the output directory (a run must not fail at its
/// end), loads the model, runs, writes the report and prints it.
fn run_one<E: Evaluation + Args>(args: EvalArgs<E>, config: &Config) -> Result<i32> {
    let EvalArgs { common, eval } = args;
    let input = eval.prepare()?;
    let out = OutDir::prepare(&common.out)?;
    let run = RunArgs {
        model: common.model.clone(),
        lambda: common.lambda.clone(),
        recall: Default::default(),
        sampling: Default::default(),
    };
    let recall = RecallSetup {
        params: common.recall.params(config)?,
        dir: super::recall_dir()?,
    };
    let (engine, lambda) = run.settings(config)?.load()?;
    let vanilla_budget = match common.vanilla_memory {
        Some(mib) => mib << 20,
        None => eval::available_memory().map_or(u64::MAX, |b| b / 5 * 4),
    };
    let context = RunContext {
        engine: &engine,
        lambda,
        vanilla_budget,
        recall,
        out: &out,
        quiet: common.quiet,
    };
    let report = Device::Cpu.with_context(|| eval.run(input, &context))?;
    let mut files = Vec::new();
    for (name, csv) in &report.csv {
        files.push(out.write(name, csv.text())?);
    }
    for (name, chart) in &report.charts {
        files.push(out.plot(name, chart)?);
    }
    if common.json {
        let mut json = report.json;
        json.insert("notes".into(), serde_json::json!(report.notes));
        json.insert("files".into(), serde_json::json!(files));
        println!("{}", serde_json::Value::Object(json));
        return Ok(0);
    }
    println!("{}", report.heading);
    print!("{}", report.table.text());
    for n in &report.notes {
        println!("note: {n}");
    }
    for f in &files {
        println!("wrote {}", f.display());
    }
    Ok(0)
}
