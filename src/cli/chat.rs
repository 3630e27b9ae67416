//! `lambdachat chat` (the default command): the full-screen chat, or with `--plain` (or without
//! a terminal) a line-based conversation on stdin/stdout.

use std::io::BufRead;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::io::IsTerminal;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::Device;
use clap::Args;

use super::{RunArgs, RunSettings};
use crate::config::Config;
use crate::session::{Session, TurnEvent};
use crate::tui::app::App;
use crate::tui::keymap::Keymap;
use crate::tui::theme::Theme;
use crate::worker::WorkerOptions;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// System prompt of a new conversation
    #[arg(long)]
    pub system: Option<String>,
    /// Longest reply, in tokens [default: 2048]
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Resume a saved conversation: the latest, or the one with this id
    #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<String>,
    /// Line-based chat on stdin/stdout instead of the full-screen UI (also used when either is
    /// not a terminal)
    #[arg(long)]
    pub plain: bool,
    /// Chat with a model on a server instead: a lambdachat server (the attention view
    /// included) or any OpenAI-compatible one (Ollama, llama-server, vLLM), e.g.
    /// http://gpu-box:8080; --model then names the server's model [default: the first it lists]
    #[arg(long, value_name = "URL")]
    pub connect: Option<String>,
    /// Key the server wants, sent as `Authorization: Bearer KEY` (with --connect)
    #[arg(long, env = "LAMBDACHAT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Longest reply when neither the flag nor the config file says.
const DEFAULT_MAX_TOKENS: usize = 2048;
/// MiB of saved KV caches (all conversations together) when the config file does not say: 20
/// conversations of the default model at a full window.
pub const DEFAULT_SNAPSHOT_BUDGET_MIB: u64 = 2048;

pub fn run(args: ChatArgs, config: &Config) -> Result<i32> {
    if let Some(url) = args.connect.clone() {
        return connect(args, url, config);
    }
    let settings = args.run.settings(config)?;
    let max_tokens = max_tokens(&args, config)?;
    let system = args.system.clone().or_else(|| config.system.clone());
    let resume = resume(&args)?;
    let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    if args.plain || !terminal {
        if resume.is_some() {
            bail!("--resume needs the full-screen chat (a terminal, without --plain)");
        }
        return plain(settings, system, max_tokens);
    }
    let app = app(config)?;
    let store = store_path("sessions.db");
    let recall = settings.recall_setup()?;
    let options = WorkerOptions {
        recall,
        load: Box::new(move |progress| settings.load_reporting(progress)),
        sampling: args.run.settings(config)?.sampling,
        max_tokens,
        system,
        store,
        resume,
        kv_budget: config
            .snapshot_budget_mib
            .unwrap_or(DEFAULT_SNAPSHOT_BUDGET_MIB)
            .saturating_mul(1 << 20),
    };
    let start: crate::protocol::Start = Box::new(move |events| {
        let worker = crate::worker::spawn(options, events)?;
        Ok(Box::new(worker) as Box<dyn crate::protocol::Backend>)
    });
    crate::tui::run(app, start)?;
    Ok(0)
}

fn max_tokens(args: &ChatArgs, config: &Config) -> Result<usize> {
    let max_tokens = args
        .max_tokens
        .or(config.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    Ok(max_tokens)
}

/// `--resume`: `None` (start anew), `Some(None)` (the latest) or `Some(Some(id))`.
fn resume(args: &ChatArgs) -> Result<Option<Option<i64>>> {
    Ok(match args.resume.as_deref() {
        None => None,
        Some("latest") => Some(None),
        Some(id) => Some(Some(id.parse::<i64>().map_err(|_| {
            anyhow!("--resume takes a session id (a number), not \"{id}\"; `lambdachat sessions` lists them")
        })?)),
    })
}

/// `--connect URL`: the full-screen chat with a server as its engine. Conversations are saved
/// in `remote.db` beside the local ones.
fn connect(args: ChatArgs, url: String, config: &Config) -> Result<i32> {
    let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    if args.plain || !terminal {
        bail!("--connect needs the full-screen chat (a terminal, without --plain)");
    }
    let app = app(config)?;
    let options = crate::remote::RemoteOptions {
        url,
        api_key: args.api_key.clone(),
        model: args
            .run
            .model
            .model
            .as_ref()
            .map(|m| m.display().to_string()),
        sampling: args.run.settings(config)?.sampling,
        max_tokens: max_tokens(&args, config)?,
        system: args.system.clone().or_else(|| config.system.clone()),
        store: store_path("remote.db"),
        resume: resume(&args)?,
    };
    let start: crate::protocol::Start = Box::new(move |events| {
        let remote = crate::remote::spawn(options, events)?;
        Ok(Box::new(remote) as Box<dyn crate::protocol::Backend>)
    });
    crate::tui::run(app, start)?;
    Ok(0)
}

/// The chat screen as the config file sets it up: bad keymap or theme entries stop here,
/// before the screen changes.
fn app(config: &Config) -> Result<App> {
    let keymap = Keymap::from_config(config)?;
    let theme = Theme::from_config(config)?;
    let size = crossterm::terminal::size().unwrap_or((80, 24));
    Ok(App::new(keymap, theme, size))
}

/// A database in the data dir (created, private), when there is a data dir.
fn store_path(name: &str) -> Option<std::path::PathBuf> {
    crate::fetch::data_dir().ok().map(|d| {
        let _ = std::fs::create_dir_all(&d);
        crate::durable::restrict_dir(&d);
        d.join(name)
    })
}

/// ` + N recalled` when recall is on (0 said plainly: nothing scored, nothing remembered).
fn recalled_note(session: &Session) -> String {
    match session.recall() {
        Some(_) => format!(" + {} recalled", session.stats().recalled),
        None => String::new(),
    }
}

/// The line-based chat: one conversation on stdin/stdout, the cache's counters after each reply.
fn plain(settings: RunSettings, system: Option<String>, max_tokens: usize) -> Result<i32> {
    let (engine, params) = settings.load()?;
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
                crate::logging::finish();
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
    let mut session = Session::new(engine, params, settings.sampling.clone(), system)?;
    session.set_recall(settings.recall_setup()?)?;
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
            let mut out = super::terminal_text::ReplyOut::stdout();
            session.turn(&message, Some(max_tokens), &cancel, &mut |e| {
                if let TurnEvent::Text(t) = e {
                    out.write(t);
                }
            })
        });
        generating.store(false, Ordering::Relaxed);
        let report = report?;
        let s = session.stats();
        println!();
        eprintln!(
            "[{} tokens · attending {} sinks + {} window{} · {} evicted · KV {:.1} MiB · {:.1} tok/s]",
            s.tokens_seen,
            s.attended_global,
            s.attended_window,
            recalled_note(&session),
            s.evicted,
            s.bytes as f64 / (1 << 20) as f64,
            report.decode_tok_s()
        );
    }
    Ok(0)
}
