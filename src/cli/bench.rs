//! `lambdachat bench`: speed, cache size and memory, printed as figures (never asserted).

use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use clap::{Args, Subcommand};

use super::RunArgs;
use crate::attention::LambdaParams;
use crate::config::Config;
use crate::eval::rss_bytes;
use crate::session::Session;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Generate N tokens in one session; print tok/s, cache slots and RSS at checkpoints.
    Decode(DecodeArgs),
    /// Time the prefill of a prompt of N tokens.
    Prefill(PrefillArgs),
    /// Time the chat screen: frames of a long conversation, keys while the model generates.
    Ui(super::bench_ui::UiArgs),
    /// Chat N tokens through the worker, the store and the screen: memory, time to first
    /// token, save time, database size and bytes written at checkpoints.
    Soak(super::bench_soak::SoakArgs),
    /// Drive `lambdachat serve` over HTTP in this process: time to first token turn after turn
    /// of a continued conversation, and decode speed through SSE against in-process decoding.
    Serve(super::bench_serve::ServeBenchArgs),
}

#[derive(Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Tokens to generate
    #[arg(long, default_value_t = 1000)]
    pub tokens: usize,
    /// Print a checkpoint every this many tokens [default: tokens / 10]
    #[arg(long)]
    pub every: Option<usize>,
    /// Prefill this many tokens of filler text first, to measure decoding at that depth
    /// (as llama-bench's `-d`)
    #[arg(long, default_value_t = 0)]
    pub context: usize,
    /// One JSON object per checkpoint instead of a table
    #[arg(long)]
    pub json: bool,
    /// Also time candle-transformers' own quantized_qwen2 on the same file and prompt, in the
    /// same run, as the peer to beat (qwen2 models only)
    #[arg(long)]
    pub compare_candle: bool,
    /// Record each token's attention shares, as the chat does for its inspect mode
    #[arg(long)]
    pub probe: bool,
}

#[derive(Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Prompt length in tokens
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Timed repetitions (each in a fresh session)
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Tokens per forward pass (the chat uses 32, so that Esc stops a long prompt quickly)
    #[arg(long, default_value_t = crate::session::PREFILL_CHUNK)]
    pub chunk: usize,
    #[arg(long)]
    pub json: bool,
}

const FILLER: &str = "The history of the long river begins in the mountains, where snow melts each spring and feeds a thousand streams. ";

pub fn run(cmd: BenchCommand, config: &Config) -> Result<i32> {
    match cmd {
        BenchCommand::Decode(a) => decode(a, config),
        BenchCommand::Prefill(a) => prefill(a, config),
        BenchCommand::Ui(a) => super::bench_ui::run(a, config),
        BenchCommand::Soak(a) => super::bench_soak::run(a, config),
        BenchCommand::Serve(a) => super::bench_serve::run(a, config),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn decode(args: DecodeArgs, config: &Config) -> Result<i32> {
    let settings = args.run.settings(config)?;
    let (engine, params) = settings.load()?;
    let every = args.every.unwrap_or((args.tokens / 10).max(1)).max(1);
    let mut session = Session::new(engine.clone(), params, settings.sampling.clone(), None)?;
    session.set_probe(args.probe);
    session.set_recall(settings.recall_setup()?)?;
    let recall = session.recall().is_some();
    let prompt = filler_tokens(&engine, args.context.max(1))?;
    let limit = bandwidth_limit(&engine)?;
    if !args.json {
        println!(
            "decode benchmark: {}, after {} prompt tokens",
            setup(&engine, params),
            prompt.len()
        );
        if let Some(l) = &limit {
            println!(
                "weights read per token {:.1} MB, read bandwidth {:.1} GB/s (best of 3 passes): at most {:.1} tok/s",
                l.bytes_per_token as f64 / 1e6,
                l.bandwidth / 1e9,
                l.tok_s()
            );
        }
        print!(
            "{:>10} {:>10} {:>9} {:>12} {:>10} {:>10}",
            "token", "tok/s", "of limit", "cache slots", "KV MiB", "RSS MiB"
        );
        if recall {
            print!(
                " {:>9} {:>10} {:>11} {:>10}",
                "recalled", "store MiB", "recall MiB", "cache hit"
            );
        }
        println!();
    }
    let mut started = Instant::now();
    Device::Cpu.with_context(|| -> Result<()> {
        let mut logits = session.feed(&prompt)?;
        started = Instant::now();
        let mut mark = Instant::now();
        for t in 1..=args.tokens {
            let id = session.sample(&logits)?;
            logits = session.feed(&[id])?;
            if t % every == 0 || t == args.tokens {
                let span = (t - 1) % every + 1;
                let tok_s = span as f64 / mark.elapsed().as_secs_f64();
                let s = session.stats();
                let r = session.recall_stats();
                let rss = rss_bytes();
                let share = limit.as_ref().map(|l| tok_s / l.tok_s());
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"token": t, "tok_s": tok_s, "cache_slots": s.slots_in_use,
                            "kv_bytes": s.bytes, "rss_bytes": rss, "tokens_seen": s.tokens_seen,
                            "weight_bytes_per_token": limit.as_ref().map(|l| l.bytes_per_token),
                            "read_bandwidth": limit.as_ref().map(|l| l.bandwidth),
                            "share_of_limit": share,
                            "recall": recall.then_some(r)})
                    );
                } else {
                    let share = share.map_or("-".to_string(), |s| format!("{:.0}%", 100.0 * s));
                    print!(
                        "{t:>10} {tok_s:>10.2} {share:>9} {:>12} {:>10.1} {:>10.1}",
                        s.slots_in_use,
                        mib(s.bytes),
                        mib(rss)
                    );
                    if recall {
                        let reads = (r.cache_hits + r.cache_misses).max(1);
                        print!(
                            " {:>9} {:>10.1} {:>11.1} {:>9.0}%",
                            r.recalled_tokens,
                            mib(r.file_bytes),
                            mib(r.ram_bytes),
                            100.0 * r.cache_hits as f64 / reads as f64
                        );
                    }
                    println!();
                }
                mark = Instant::now();
            }
        }
        Ok(())
    })?;
    if args.compare_candle {
        let ours = args.tokens as f64 / started.elapsed().as_secs_f64();
        let theirs =
            Device::Cpu.with_context(|| candle_decode(&engine.path, &prompt, args.tokens))?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"ours_tok_s": ours, "candle_tok_s": theirs, "ratio": ours / theirs})
            );
        } else {
            println!(
                "whole run: lambdachat {ours:.2} tok/s, candle quantized_qwen2 {theirs:.2} tok/s, ratio {:.2}",
                ours / theirs
            );
        }
    }
    Ok(0)
}

/// What a benchmark runs on, for its first line: the model, its file, the threads, the Λ and
/// the K/V type.
pub(super) fn setup(engine: &crate::engine::Engine, params: LambdaParams) -> String {
    format!(
        "{} ({}), {} threads, n_global {}, n_local {}, {} keys and values",
        engine.model.info().name,
        engine.path.display(),
        candle_core::utils::get_num_threads(),
        params.n_global,
        params.n_local,
        engine.kv_type,
    )
}

/// The bandwidth bound of a decode step (`bench_bandwidth`).
struct Limit {
    bytes_per_token: u64,
    bandwidth: f64,
}

impl Limit {
    fn tok_s(&self) -> f64 {
        self.bandwidth / self.bytes_per_token as f64
    }
}

/// The bound for a GGUF model decoding on the CPU; none for safetensors or a GPU.
fn bandwidth_limit(engine: &crate::engine::Engine) -> Result<Option<Limit>> {
    let gguf = engine.path.extension().is_some_and(|e| e == "gguf");
    if !gguf || !engine.device.is_cpu() {
        return Ok(None);
    }
    Ok(Some(Limit {
        bytes_per_token: super::bench_bandwidth::weight_bytes_per_token(&engine.path)?,
        bandwidth: Device::Cpu.with_context(super::bench_bandwidth::read_bandwidth),
    }))
}

/// candle-transformers' quantized Qwen2 decoding `n` greedy tokens after `prompt`: tok/s.
fn candle_decode(path: &std::path::Path, prompt: &[u32], n: usize) -> Result<f64> {
    use candle_transformers::models::quantized_qwen2::ModelWeights;
    let mut file = std::fs::File::open(path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!(crate::error::candle_msg(&e)))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok());
    if arch.map(String::as_str) != Some("qwen2") {
        anyhow::bail!("--compare-candle needs a qwen2 model");
    }
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let input = candle_core::Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let mut logits = model.forward(&input, 0)?;
    let start = Instant::now();
    for t in 0..n {
        let id = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        let input = candle_core::Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
        logits = model.forward(&input, prompt.len() + t)?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// `n` tokens of repeated filler text.
fn filler_tokens(engine: &crate::engine::Engine, n: usize) -> Result<Vec<u32>> {
    let one = engine.tokenizer.encode(FILLER)?;
    Ok(one.iter().copied().cycle().take(n.max(1)).collect())
}

fn prefill(args: PrefillArgs, config: &Config) -> Result<i32> {
    let settings = args.run.settings(config)?;
    let (engine, params) = settings.load()?;
    let ids = filler_tokens(&engine, args.tokens)?;
    let mut rates = Vec::new();
    Device::Cpu.with_context(|| -> Result<()> {
        for _ in 0..args.repeats.max(1) {
            let mut session =
                Session::new(engine.clone(), params, settings.sampling.clone(), None)?;
            session.set_prefill_chunk(args.chunk);
            let start = Instant::now();
            session.feed(&ids)?;
            // A GPU queues the work and returns at once: the time is the device's, not the queue's.
            engine.device.synchronize()?;
            rates.push(ids.len() as f64 / start.elapsed().as_secs_f64());
        }
        Ok(())
    })?;
    let best = rates.iter().cloned().fold(0.0, f64::max);
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"tokens": ids.len(), "chunk": args.chunk, "best_tok_s": best, "mean_tok_s": mean, "runs": rates})
        );
    } else {
        println!(
            "prefill {} tokens in chunks of {} ({}, {} threads): best {best:.1} tok/s, mean {mean:.1} tok/s over {} runs",
            ids.len(),
            args.chunk,
            engine.model.info().name,
            candle_core::utils::get_num_threads(),
            rates.len()
        );
    }
    Ok(0)
}
