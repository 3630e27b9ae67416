//! `lambdachat chat` (the default command): a line-based conversation on stdin/stdout, one
//! session for as long as the user likes, with the Λ cache's counters after each reply.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;

use super::RunArgs;
use crate::session::Session;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// System prompt
    #[arg(long)]
    pub system: Option<String>,
    /// Longest reply, in tokens
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
}

pub fn run(args: ChatArgs) -> Result<i32> {
    let (engine, params) = args.run.load()?;
    let generating = Arc::new(AtomicBool::new(false));
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let (generating, cancel) = (generating.clone(), cancel.clone());
        // Ctrl-C stops a reply; at the prompt it quits.
        ctrlc::set_handler(move || {
            if generating.load(Ordering::Relaxed) {
                cancel.store(true, Ordering::Relaxed);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl-C handler")?;
    }
    eprintln!(
        "lambdachat — {} · Λ attention: {} sinks + {}-token window · Ctrl-C stops a reply, Ctrl-D quits",
        engine.model.info().name,
        params.n_global,
        params.n_local
    );
    let mut session = Session::new(engine, params, args.run.sampling.params(), args.system)?;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("\n> ");
        let Some(line) = lines.next() else { break };
        let message = line.context("reading stdin")?;
        if message.trim().is_empty() {
            continue;
        }
        cancel.store(false, Ordering::Relaxed);
        generating.store(true, Ordering::Relaxed);
        let report = Device::Cpu.with_context(|| {
            let mut out = std::io::stdout().lock();
            session.turn(&message, Some(args.max_tokens), &cancel, &mut |t| {
                let _ = out.write_all(t.as_bytes());
                let _ = out.flush();
            })
        });
        generating.store(false, Ordering::Relaxed);
        let report = report?;
        let s = session.stats();
        println!();
        eprintln!(
            "[{} tokens · attending {} sinks + {} window · {} evicted · KV {:.1} MiB · {:.1} tok/s]",
            s.tokens_seen,
            s.attended_global,
            s.attended_window,
            s.evicted,
            s.bytes as f64 / (1 << 20) as f64,
            report.decode_tok_s()
        );
    }
    Ok(0)
}
