//! `lambdachat ask`: one prompt in, the reply streamed to stdout.

use std::io::{IsTerminal, Read};
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
    /// Print one JSON object when the reply is done (reply, usage, stop reason, timings)
    /// instead of streaming the text
    #[arg(long)]
    pub json: bool,
    /// Continue the prompt as raw text, with no chat template (for base models, which were
    /// never taught a turn format)
    #[arg(long)]
    pub raw: bool,
    /// The prompt; `-` or nothing reads it from stdin. With a prompt, text piped to stdin is
    /// appended to it as a fenced block (`git diff | lambdachat ask "review this"`)
    pub prompt: Option<String>,
}

/// The most text read from stdin: more is surely not meant for a prompt.
const MAX_STDIN: u64 = 8 << 20;

/// Everything on stdin, as UTF-8.
fn read_stdin() -> Result<String> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut bytes)
        .context("reading stdin")?;
    if bytes.len() as u64 > MAX_STDIN {
        bail!(
            "stdin holds more than {} MiB; a prompt that long is not read",
            MAX_STDIN >> 20
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "the text on stdin is not valid UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// The prompt: the argument, stdin, or the argument with piped stdin appended as a block.
fn read_prompt(arg: Option<String>, stdin_is_terminal: bool) -> Result<String> {
    let text = match arg.as_deref() {
        Some("-") | None => read_stdin()?,
        Some(p) if stdin_is_terminal => p.to_string(),
        Some(p) => {
            let piped = read_stdin()?;
            if piped.trim().is_empty() {
                p.to_string()
            } else {
                format!("{p}\n\n{}", crate::tui::attach::fenced(&piped, ""))
            }
        }
    };
    if text.trim().is_empty() {
        bail!("the prompt is empty");
    }
    Ok(text)
}

/// What to tell someone who chats with a model that brought no chat template: its turns are
/// in a borrowed format, which a base model was never taught; raw mode continues text instead.
pub fn no_template_note(session: &Session) -> Option<String> {
    session.borrowed_template().map(|format| {
        format!(
            "this model has no chat template of its own; its turns are written in {format}. \
             A base model answers better in raw mode (ask --raw, or /raw on in the chat), \
             which continues the text as written"
        )
    })
}

fn stop_name(stop: StopReason) -> &'static str {
    match stop {
        StopReason::EndOfTurn => "end_of_turn",
        StopReason::Length => "length",
        StopReason::Cancelled => "cancelled",
    }
}

pub fn run(args: AskArgs, config: &Config) -> Result<i32> {
    let settings = args.run.settings(config)?;
    let prompt = read_prompt(args.prompt.clone(), std::io::stdin().is_terminal())?;
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
    let engine_load_s = engine.load_time.as_secs_f64();
    let model_name = engine.model.info().name.clone();
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
    session.set_raw(args.raw);
    if std::io::stderr().is_terminal()
        && let Some(note) = no_template_note(&session)
    {
        eprintln!("note: {note}");
    }
    let report = Device::Cpu.with_context(|| {
        let mut out = (!args.json).then(super::terminal_text::ReplyOut::stdout);
        session.turn(&prompt, Some(args.max_tokens), &cancel, &mut |e| {
            if let (TurnEvent::Text(text), Some(out)) = (e, out.as_mut()) {
                out.write(text);
            }
        })
    })?;
    if args.json {
        let s = session.stats();
        let object = serde_json::json!({
            "reply": report.reply,
            "stop": stop_name(report.stop),
            "usage": {
                "prompt_tokens": report.prompt_tokens,
                "completion_tokens": report.generated_tokens,
                "tokens_seen": s.tokens_seen,
                "tokens_attended": s.attended_global + s.attended_window,
                "tokens_evicted": s.evicted,
                "kv_bytes": s.bytes,
            },
            "timings": {
                "load_s": engine_load_s,
                "prefill_s": report.prefill_time.as_secs_f64(),
                "decode_s": report.decode_time.as_secs_f64(),
                "prefill_tok_s": report.prefill_tok_s(),
                "decode_tok_s": report.decode_tok_s(),
            },
            "model": model_name,
        });
        println!("{object}");
    } else {
        println!();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_argument_is_the_prompt_when_stdin_is_a_terminal() {
        assert_eq!(read_prompt(Some("hi".into()), true).unwrap(), "hi");
        assert!(read_prompt(Some("  ".into()), true).is_err());
    }
}
