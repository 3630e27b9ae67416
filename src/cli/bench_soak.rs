//! `lambdachat bench soak`: a long chat through the real worker, store and chat screen (drawn
//! to a test backend, no terminal), turn after turn, with the figures that must stay flat once
//! the window is full — the process's memory, the time to first token, the time a save takes,
//! the database's size — and the bytes written, which must grow with the tokens and no faster.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use tokio::sync::mpsc::unbounded_channel;

use super::RunArgs;
use crate::config::Config;
use crate::eval::rss_bytes;
use crate::protocol::{Backend, Command, Event};
use crate::store;
use crate::tui::app::{App, Msg};
use crate::tui::keymap::Keymap;
use crate::tui::theme::Theme;
use crate::tui::view;
use crate::worker::{self, WorkerOptions};

#[derive(Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Tokens to chat through (prompts and replies)
    #[arg(long, default_value_t = 100_000)]
    pub tokens: u64,
    /// Tokens per user message (about: the text is sized by the tokens the last one took)
    #[arg(long, default_value_t = 500)]
    pub turn_tokens: u64,
    /// Longest reply, in tokens
    #[arg(long, default_value_t = 16)]
    pub reply_tokens: usize,
    /// Print a checkpoint every this many tokens [default: tokens / 10]
    #[arg(long)]
    pub every: Option<u64>,
    /// One JSON object per checkpoint instead of a table
    #[arg(long)]
    pub json: bool,
    /// Where the session database goes [default: a temporary directory, removed after]
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Bytes this process has had written to storage (`/proc/self/io`), 0 where unknown.
fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One checkpoint: the state after `turns` turns.
#[derive(serde::Serialize)]
struct Checkpoint {
    tokens: u64,
    turns: u64,
    rss_bytes: u64,
    /// Mean over the turns since the last checkpoint.
    ttft_ms: f64,
    save_ms: f64,
    /// The database and its WAL.
    db_bytes: u64,
    kv_bytes: u64,
    /// One token's keys and values over every layer, as the KV file keeps them.
    kv_token_bytes: u64,
    /// Since the soak started (the model's load excluded).
    written_bytes: u64,
}

/// A user message of about `chars` characters, different each turn.
fn message(turn: u64, chars: usize) -> String {
    const WORDS: &str = "the river runs from the mountains to the sea and carries the snow of \
                         each spring past towns and fields where people fish and talk ";
    let mut text = format!("Turn {turn}: please summarise this. ");
    while text.len() < chars {
        text.push_str(WORDS);
    }
    text.truncate(chars.max(16));
    text
}

pub fn run(args: SoakArgs, config: &Config) -> Result<i32> {
    if args.turn_tokens == 0 || args.tokens == 0 {
        bail!("--tokens and --turn-tokens must be at least 1");
    }
    let settings = args.run.settings(config)?;
    let mut _removed_after = None;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => _removed_after.insert(TempDir::new()?).0.clone(),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let db = dir.join("sessions.db");
    let (tx, mut rx) = unbounded_channel();
    let sampling = settings.sampling.clone();
    let worker = worker::spawn(
        WorkerOptions {
            load: Box::new(move |progress| settings.load_reporting(progress)),
            sampling,
            max_tokens: args.reply_tokens.max(1),
            system: None,
            store: Some(db.clone()),
            resume: None,
            kv_budget: u64::MAX,
        },
        tx,
    )?;
    let (cols, rows) = (120, 40);
    let mut app = App::new(Keymap::default(), Theme::default(), (cols, rows));
    let mut term = Terminal::new(TestBackend::new(cols, rows))?;
    let mut next_event = |app: &mut App| -> Result<Event> {
        let e = rx.blocking_recv().context("the worker stopped")?;
        app.update(Msg::Worker(e.clone()));
        Ok(e)
    };
    loop {
        match next_event(&mut app)? {
            Event::Ready { .. } => break,
            Event::LoadFailed { reason, .. } => bail!("the model did not load: {reason}"),
            _ => {}
        }
    }
    let every = args.every.unwrap_or(args.tokens / 10).max(1);
    let written_at_start = written_bytes();
    let mut chars_per_token = 4.0f64;
    let (mut tokens, mut turns, mut mark) = (0u64, 0u64, every);
    let (mut ttft, mut saves) = (Vec::new(), Vec::new());
    if !args.json {
        println!(
            "soak: {} tokens in turns of ~{} prompt tokens and ≤ {} reply tokens; store in {}",
            args.tokens,
            args.turn_tokens,
            args.reply_tokens,
            dir.display()
        );
        println!(
            "{:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
            "tokens", "turns", "RSS MiB", "TTFT ms", "save ms", "DB MiB", "KV MiB", "written MiB"
        );
    }
    while tokens < args.tokens {
        let chars = (args.turn_tokens as f64 * chars_per_token) as usize;
        let text = message(turns, chars);
        let sent = Instant::now();
        worker.send(Command::Send(text.clone()));
        let mut first: Option<Duration> = None;
        loop {
            match next_event(&mut app)? {
                Event::Text(_) => {
                    first.get_or_insert(sent.elapsed());
                }
                Event::Finished { prompt_tokens, .. } => {
                    first.get_or_insert(sent.elapsed());
                    if prompt_tokens > 0 {
                        chars_per_token = text.len() as f64 / prompt_tokens as f64;
                    }
                }
                Event::Timeline(t) => tokens = t.stats.tokens_seen,
                Event::Saved { seconds } => {
                    saves.push(seconds * 1e3);
                    break;
                }
                Event::Error(e) => bail!("turn {turns}: {e}"),
                _ => {}
            }
        }
        ttft.push(first.unwrap_or_default().as_secs_f64() * 1e3);
        turns += 1;
        // The screen as a user would see it (its memory counts).
        term.draw(|f| view::draw(f, &app))?;
        if tokens >= mark || tokens >= args.tokens {
            mark = (tokens / every + 1) * every;
            let mean = |v: &mut Vec<f64>| {
                let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
                v.clear();
                m
            };
            let c = Checkpoint {
                tokens,
                turns,
                rss_bytes: rss_bytes(),
                ttft_ms: mean(&mut ttft),
                save_ms: mean(&mut saves),
                db_bytes: store::disk_bytes(&db),
                kv_bytes: store::kv_bytes(&db),
                kv_token_bytes: store::kv_token_bytes(&db),
                written_bytes: written_bytes().saturating_sub(written_at_start),
            };
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            if args.json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                println!(
                    "{:>10} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>11.1}",
                    c.tokens,
                    c.turns,
                    mib(c.rss_bytes),
                    c.ttft_ms,
                    c.save_ms,
                    mib(c.db_bytes),
                    mib(c.kv_bytes),
                    mib(c.written_bytes)
                );
            }
        }
    }
    worker.send(Command::Shutdown);
    while !matches!(next_event(&mut app)?, Event::Stopped) {}
    Ok(0)
}

/// A fresh directory under the system's temporary one, removed when dropped (also when the
/// soak fails half-way).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lambdachat-soak-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
