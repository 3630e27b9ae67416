//! Command line: `ask`, `bench`, `inspect`. Flags for the model, the Λ parameters and sampling
//! are shared by every command that runs a model (as llama.cpp's tools share theirs).

mod ask;
mod bench;
mod bench_bandwidth;
mod bench_serve;
mod bench_soak;
mod bench_ui;
mod chat;
mod eval;
mod inspect;
mod models;
mod serve;
mod sessions;
mod terminal_text;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::attention::recall::RecallParams;
use crate::attention::{
    AttentionError, DEFAULT_KV_TYPE, DEFAULT_N_GLOBAL, DEFAULT_N_LOCAL, KvType, LambdaParams,
};
use crate::config::Config;
use crate::device::{DeviceChoice, DeviceError};
use crate::engine::Engine;
use crate::fetch;
use crate::model::{Kernels, LoadOptions};
use crate::progress::{Progress, Stderr};
use crate::sampling::SamplingParams;

#[derive(Parser)]
#[command(
    name = "lambdachat",
    version,
    about = "Chat with a local LLM that never runs out of context (LM-Infinite Λ-attention over a bounded KV cache)"
)]
pub struct Cli {
    /// Config file [default: $LAMBDACHAT_CONFIG, else ~/.config/lambdachat/config.toml]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Chat in the terminal, full screen (the default when no command is given).
    Chat(chat::ChatArgs),
    /// Answer one prompt, streaming the reply to stdout.
    Ask(ask::AskArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat completions, streaming).
    Serve(serve::ServeArgs),
    /// Measure decode and prefill speed, cache size and memory.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Measure LM-Infinite's claims on a model: perplexity, passkey, attention entropy, cost.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Print what a model contains (GGUF file, model directory or hf: reference).
    Inspect(inspect::InspectArgs),
    /// List, download, locate or delete models (data dir and Hugging Face cache).
    Models {
        #[command(subcommand)]
        command: Option<models::ModelsCommand>,
    },
    /// Write a Hugging Face safetensors directory (f32) from a GGUF file.
    Convert(ConvertArgs),
    /// List, rename, delete or export saved conversations.
    Sessions {
        #[command(subcommand)]
        command: Option<sessions::SessionsCommand>,
    },
    /// Print a shell's completion script: `lambdachat completions bash > ~/.local/share/bash-completion/completions/lambdachat`
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff): `lambdachat man > ~/.local/share/man/man1/lambdachat.1`
    Man,
}

/// Which model to run.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face model directory (config.json + safetensors) to load
    /// [default: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, fetched on first use]
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// dtype of safetensors weight matrices (GGUF weights keep their quantization)
    /// [default: f32 on a CPU, bf16 on CUDA, f16 on Metal]
    #[arg(long, value_enum)]
    pub dtype: Option<WeightDtype>,
    /// Where to compute: auto, cpu, cuda[:N] or metal (this build: the CPU)
    #[arg(long, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Who multiplies by quantized weights: ours, candle (side-by-side measurements) or f32
    /// (dequantized at load: exact comparisons). For benchmarks and tests.
    #[arg(long, value_enum, default_value_t = Kernels::Ours, hide = true)]
    pub kernels: Kernels,
}

/// The dtypes safetensors weights can be held in.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

impl ModelArgs {
    /// The dtype and the device (checked now: a GPU this build cannot use is an error before
    /// anything is fetched or loaded).
    pub fn load_options(&self) -> Result<LoadOptions, DeviceError> {
        let device = self.device.select()?;
        // A CPU computes f32 fastest (candle has no bf16 CPU matmul); a GPU's tensor cores want
        // half precision, and Metal's bf16 support depends on the chip.
        let dtype = self.dtype.unwrap_or(match &device {
            candle_core::Device::Cpu => WeightDtype::F32,
            candle_core::Device::Cuda(_) => WeightDtype::Bf16,
            candle_core::Device::Metal(_) => WeightDtype::F16,
        });
        Ok(LoadOptions {
            dtype: match dtype {
                WeightDtype::F32 => candle_core::DType::F32,
                WeightDtype::F16 => candle_core::DType::F16,
                WeightDtype::Bf16 => candle_core::DType::BF16,
            },
            device,
            kernels: self.kernels,
            kv_type: KvType::default(),
        })
    }
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The GGUF file to convert
    pub gguf: PathBuf,
    /// The directory to create (must not exist, or be empty)
    pub out: PathBuf,
    /// Split the weights into shards of at most this many MiB, with an index
    #[arg(long, value_name = "MIB")]
    pub shard_mib: Option<u64>,
}

/// The Λ-attention parameters (flags beat the config file, which beats the defaults).
#[derive(Args, Clone, Debug)]
pub struct LambdaArgs {
    /// Leading tokens every query attends to (attention sinks: BOS, system prompt) [default: 64]
    #[arg(long)]
    pub n_global: Option<usize>,
    /// Window of recent tokens attended at their true distance, capped at the training length
    /// [default: 4096]
    #[arg(long)]
    pub n_local: Option<usize>,
    /// Distance at which sinks outside the window are seen [default: n_local]
    #[arg(long)]
    pub distance_limit: Option<u64>,
    /// How the cache holds keys and values: f16 halves its memory and the attention's reads,
    /// q8_0 takes about a quarter (heads of a multiple of 32), f32 is exact [default: f16]
    #[arg(long, value_enum)]
    pub kv_type: Option<KvType>,
}

/// Recall of evicted context, docs/ALGORITHM.md §10 (flags beat the config file, which beats
/// the defaults).
#[derive(Args, Clone, Debug, Default)]
pub struct RecallArgs {
    /// Recall evicted context: tokens leaving the window go to a file in blocks, and layers
    /// attend again to the blocks that best match their query [default: off]
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub recall: Option<bool>,
    #[command(flatten)]
    pub tuning: RecallTuning,
}

/// How recall recalls (what `eval`'s `recall` mode takes too).
#[derive(Args, Clone, Debug, Default)]
pub struct RecallTuning {
    /// Blocks of 64 tokens each layer recalls [default: 8]
    #[arg(long, value_name = "K")]
    pub recall_blocks: Option<usize>,
    /// The first layer that recalls [default: 4]
    #[arg(long, value_name = "N")]
    pub recall_from_layer: Option<usize>,
    /// Generated tokens between two choices of blocks (each prompt chunk chooses too)
    /// [default: 16]
    #[arg(long, value_name = "T")]
    pub recall_every: Option<usize>,
    /// MiB of recently read blocks kept in RAM [default: 32]
    #[arg(long, value_name = "M")]
    pub recall_cache_mib: Option<usize>,
}

impl RecallTuning {
    /// The flags over the config file over the defaults, checked.
    pub fn params(&self, config: &Config) -> Result<RecallParams> {
        let c = &config.recall;
        Ok(RecallParams::new(
            self.recall_blocks.or(c.blocks),
            self.recall_from_layer.or(c.from_layer),
            self.recall_every.or(c.every),
            self.recall_cache_mib.or(c.cache_mib),
        )?)
    }
}

/// `on` or `off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
fn parse_on_off(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("expected on or off, not `{text}`")),
    }
}

/// Sampling flags (flags beat the config file, which beats the defaults).
#[derive(Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// 0 = greedy [default: 0.7]
    #[arg(long)]
    pub temperature: Option<f32>,
    /// 0 disables [default: 40]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// [default: 0.9]
    #[arg(long)]
    pub top_p: Option<f32>,
    /// [default: 0.05]
    #[arg(long)]
    pub min_p: Option<f32>,
    /// 1.0 disables [default: 1.1]
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// [default: 1719258]
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Everything a command that runs a model needs.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub lambda: LambdaArgs,
    #[command(flatten)]
    pub recall: RecallArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// The model, Λ parameters and sampling after flags, config file and defaults are merged and
/// checked: what a command runs with.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub model: Option<PathBuf>,
    pub load_options: LoadOptions,
    pub lambda: LambdaParams,
    /// Recall's parameters when it is on.
    pub recall: Option<RecallParams>,
    pub sampling: SamplingParams,
}

/// The config file's `[lambda] kv_type`, checked: a name that is not a type is an error at its
/// line and column.
fn kv_type_of(config: &Config) -> Result<Option<KvType>> {
    let Some(name) = &config.lambda.kv_type else {
        return Ok(None);
    };
    KvType::from_str(name.get_ref(), false)
        .map(Some)
        .map_err(|_| {
            let names: Vec<String> = KvType::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value())
                .map(|v| v.get_name().to_string())
                .collect();
            let message = format!(
                "kv_type is \"{}\"; expected one of {}",
                name.get_ref(),
                names.join(", ")
            );
            config.error_at(name.span(), message).into()
        })
}

impl RunArgs {
    /// Merges flags over the config file over the defaults, and validates the result before
    /// any download or load.
    pub fn settings(&self, config: &Config) -> Result<RunSettings> {
        let (f, c) = (&self.lambda, &config.lambda);
        let lambda = LambdaParams::new(
            f.n_global.or(c.n_global).unwrap_or(DEFAULT_N_GLOBAL),
            f.n_local.or(c.n_local).unwrap_or(DEFAULT_N_LOCAL),
            f.distance_limit.or(c.distance_limit),
        )?;
        let recall_params = self.recall.tuning.params(config)?;
        let recall = self
            .recall
            .recall
            .or(config.recall.enabled)
            .unwrap_or(false)
            .then_some(recall_params);
        let (f, c, d) = (&self.sampling, &config.sampling, SamplingParams::default());
        let sampling = SamplingParams {
            temperature: f.temperature.or(c.temperature).unwrap_or(d.temperature),
            top_k: f.top_k.or(c.top_k).unwrap_or(d.top_k),
            top_p: f.top_p.or(c.top_p).unwrap_or(d.top_p),
            min_p: f.min_p.or(c.min_p).unwrap_or(d.min_p),
            repeat_penalty: f
                .repeat_penalty
                .or(c.repeat_penalty)
                .unwrap_or(d.repeat_penalty),
            seed: f.seed.or(c.seed).unwrap_or(d.seed),
            ..d
        };
        sampling.validate()?;
        let load_options = LoadOptions {
            kv_type: match self.lambda.kv_type {
                Some(t) => t,
                None => kv_type_of(config)?.unwrap_or(DEFAULT_KV_TYPE),
            },
            ..self.model.load_options()?
        };
        Ok(RunSettings {
            model: self.model.model.clone().or_else(|| config.model.clone()),
            load_options,
            lambda,
            recall,
            sampling,
        })
    }
}

impl RunSettings {
    /// Loads the model (fetching the default one if needed) and caps `n_local` to its training
    /// length.
    pub fn load(&self) -> Result<(Arc<Engine>, LambdaParams)> {
        self.load_reporting(&Stderr)
    }

    /// [`Self::load`], reporting download progress to `progress`.
    pub fn load_reporting(&self, progress: &dyn Progress) -> Result<(Arc<Engine>, LambdaParams)> {
        let path = resolve_model(self.model.as_deref(), progress)?;
        let engine = Engine::load_with(&path, self.load_options.clone())?;
        let params = cap_to_training_length(self.lambda, engine.model.info().context_length)?;
        if let Some(recall) = self.recall {
            recall.check_layers(&engine.model.layer_geometry(params))?;
            if !engine.device.is_cpu() {
                anyhow::bail!(AttentionError::RecallOnDevice);
            }
        }
        Ok((Arc::new(engine), params))
    }

    /// Recall's settings for a session: its parameters and the folder of its stores (in the
    /// data dir), when it is on.
    pub fn recall_setup(&self) -> Result<Option<(RecallParams, PathBuf)>> {
        self.recall.map(|p| Ok((p, recall_dir()?))).transpose()
    }
}

/// Where recall keeps its stores: `recall/` in the data dir (on disk, never a RAM-backed
/// temporary folder: the store is what keeps RAM flat).
pub fn recall_dir() -> Result<PathBuf> {
    Ok(fetch::data_dir()?.join("recall"))
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
    parse_from(std::env::args_os())
}

/// [`parse`] of `args` (the program's name first).
pub fn parse_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> Cli {
    let mut args: Vec<std::ffi::OsString> = args.into_iter().collect();
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let is_meta = matches!(first, "-h" | "--help" | "-V" | "--version" | "help");
    if !is_meta && (args.len() == 1 || first.starts_with('-')) {
        args.insert(1, "chat".into());
    }
    Cli::parse_from(args)
}

/// The local path of `--model`: a file or directory as given, an `hf:` reference resolved
/// through the Hugging Face cache (downloading what it lacks), or the default model.
pub fn resolve_model(model: Option<&std::path::Path>, progress: &dyn Progress) -> Result<PathBuf> {
    let reference = model
        .and_then(|p| p.to_str())
        .map(crate::hub::HubRef::parse);
    if let Some(r) = reference.transpose()?.flatten() {
        return Ok(crate::hub::resolve(&r, progress)?);
    }
    match model {
        Some(p) => Ok(p.to_path_buf()),
        None => fetch::ensure_with(&fetch::DEFAULT_MODEL, progress)
            .context("fetching the default model"),
    }
}

pub fn run(cli: Cli) -> Result<i32> {
    // What describes the command line needs no config file (nor a valid one).
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "lambdachat", &mut script);
            return print_all(&script);
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page)?;
            return print_all(&page);
        }
        _ => {}
    }
    let config = Config::load(cli.config.as_deref())?;
    // Every part of the file is checked before anything starts, whichever command runs.
    crate::tui::keymap::Keymap::from_config(&config)?;
    crate::tui::theme::Theme::from_config(&config)?;
    match cli.command {
        Command::Chat(c) => chat::run(c, &config),
        Command::Ask(a) => ask::run(a, &config),
        Command::Serve(s) => serve::run(s, &config),
        Command::Bench(b) => bench::run(b, &config),
        Command::Eval(e) => eval::run(e, &config),
        Command::Inspect(i) => inspect::run(i),
        Command::Convert(c) => convert(c),
        Command::Models { command } => models::run(command),
        Command::Sessions { command } => sessions::run(command),
        Command::Completions { .. } | Command::Man => unreachable!("handled before the config"),
    }
}

/// Writes `bytes` to stdout; a reader that stopped early (`| head`) is not an error.
fn print_all(bytes: &[u8]) -> Result<i32> {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(0),
    }
}

fn convert(args: ConvertArgs) -> Result<i32> {
    let start = std::time::Instant::now();
    let report = crate::convert::convert_gguf(
        &args.gguf,
        &args.out,
        args.shard_mib.map(|m| m.max(1) << 20),
    )?;
    eprintln!(
        "wrote {}: {} tensors, {:.1} MiB of f32 weights in {} file(s), {:.1} s",
        args.out.display(),
        report.tensors,
        report.bytes as f64 / (1 << 20) as f64,
        report.shards,
        start.elapsed().as_secs_f64()
    );
    Ok(0)
}
