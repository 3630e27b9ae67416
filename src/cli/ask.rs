//! `lambdachat ask`: one prompt in, the reply streamed to stdout.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::Args;

use super::RunArgs;
use crate::config::Config;
use crate::protocol::StopReason;
use crate::session::{Session, TurnEvent};

#[derive(Args)]
pub struct AskArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// System prompt
    #[arg(long)]
    pub system: Option<String>,
    /// Stop after this many generated tokens
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Print timing and cache statistics to stderr
    #[arg(long, short)]
    pub verbose: bool,
    /// The prompt; `-` or nothing reads it from stdin
    pub prompt: Option<String>,
}

fn read_prompt(arg: Option<String>) -> Result<String> {
    let text = match arg.as_deref() {
        Some("-") | None => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("reading the prompt from stdin")?;
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "the prompt on stdin is not valid UTF-8 (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                )
            })?
        }
        Some(p) => p.to_string(),
    };
    if text.trim().is_empty() {
        bail!("the prompt is empty");
    }
    Ok(text)
}

pub fn run(args: AskArgs, config: &Config) -> Result<i32> {
    let settings = args.run.settings(config)?;
    let prompt = read_prompt(args.prompt.clone())?;
    let (engine, params) = settings.load()?;
    if args.verbose {
        eprintln!(
            "model {} ({}) loaded in {:.2}s; Λ: n_global {}, n_local {}, distance_limit {}",
            engine.model.info().name,
            engine.path.display(),
            engine.load_time.as_secs_f64(),
            params.n_global,
            params.n_local,
            params.distance_limit
        );
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;
    let mut session = Session::new(
        engine,
        params,
        settings.sampling.clone(),
        args.system.clone().or_else(|| config.system.clone()),
    )?;
    session.set_recall(settings.recall_setup()?)?;
    let report = Device::Cpu.with_context(|| {
        let mut out = super::terminal_text::ReplyOut::stdout();
        session.turn(&prompt, Some(args.max_tokens), &cancel, &mut |e| {
            if let TurnEvent::Text(text) = e {
                out.write(text);
            }
        })
    })?;
    println!();
    if args.verbose {
        let s = session.stats();
        eprintln!(
            "prompt {} tok in {:.2}s ({:.1} tok/s); generated {} tok in {:.2}s ({:.1} tok/s); stop: {:?}",
            report.prompt_tokens,
            report.prefill_time.as_secs_f64(),
            report.prefill_tok_s(),
            report.generated_tokens,
            report.decode_time.as_secs_f64(),
            report.decode_tok_s(),
            report.stop
        );
        eprintln!(
            "cache: {} tokens seen, attending {} global + {} window, {} evicted, {} slots, {:.1} MiB",
            s.tokens_seen,
            s.attended_global,
            s.attended_window,
            s.evicted,
            s.slots_in_use,
            s.bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(if report.stop == StopReason::Cancelled {
        130
    } else {
        0
    })
}
