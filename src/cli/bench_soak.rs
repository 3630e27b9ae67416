//! `lambdachat bench soak`: a long chat through the real worker, store and chat screen (drawn
//! to a test backend, no terminal), turn after turn, with the figures that must stay flat once
//! the window is full — the process's memory, the time to first token, the time a save takes,
//! the database's size — and the bytes written, which must grow with the tokens and no faster.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use crossterm::event::{KeyCode, KeyEvent};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::RunArgs;
use crate::config::Config;
use crate::eval::rss_bytes;
use crate::protocol::{Backend, Command, EngineThread, Event, Notice};
use crate::store;
use crate::tui::app::{App, Effect, Msg};
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
    /// Then this many rounds of one turn of the long conversation and one of a young one
    /// (10 turns old), alternating: their mean times to first token side by side
    #[arg(long, default_value_t = 0)]
    pub alternate: usize,
}

/// Turns the young conversation of `--alternate` has before the rounds start.
const YOUNG_TURNS: u64 = 10;

/// What `--alternate` measured.
#[derive(serde::Serialize)]
struct AlternateFigures {
    rounds: usize,
    /// The turn number the long conversation's rounds start at.
    long_turn: u64,
    young_turn: u64,
    long_ttft_ms: f64,
    young_ttft_ms: f64,
    /// Long over young.
    ratio: f64,
    long_range_ms: (f64, f64),
    young_range_ms: (f64, f64),
}

/// A counter of `/proc/self/io`, 0 where unknown.
fn io_counter(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes this process has had written to storage: `write_bytes`, counted by the page cache's
/// pages (or folios: a kernel with large folios counts a whole folio for a byte written).
fn written_bytes() -> u64 {
    io_counter("write_bytes")
}

/// Bytes this process handed to write calls (`wchar`): the files' bytes before the page cache
/// rounds them.
fn handed_bytes() -> u64 {
    io_counter("wchar")
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
    /// Bytes handed to write calls since the soak started.
    handed_bytes: u64,
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

/// The chat under test: the worker, the chat screen it feeds, and what the last turns showed.
struct Soak {
    worker: EngineThread,
    rx: UnboundedReceiver<Event>,
    app: App,
    term: Terminal<TestBackend>,
    /// Characters per prompt token, from the last turn (sizes the next message).
    chars_per_token: f64,
    /// Tokens fed in the open conversation.
    tokens: u64,
    /// The open conversation's database id.
    id: Option<i64>,
}

/// One turn's times.
struct Turn {
    ttft_ms: f64,
    save_ms: f64,
}

impl Soak {
    /// The next event, shown to the chat screen as the event loop would.
    fn next_event(&mut self) -> Result<Event> {
        let e = self.rx.blocking_recv().context("the worker stopped")?;
        self.app.update(Msg::Worker(e.clone()));
        Ok(e)
    }

    /// Sends a message of about `prompt_tokens` tokens, typed as a user would (pasted into
    /// the message box and sent with Enter, so the screen's side — the input history, the
    /// conversation — counts too), and waits until the reply is saved.
    fn turn(&mut self, number: u64, prompt_tokens: u64) -> Result<Turn> {
        let text = message(
            number,
            (prompt_tokens as f64 * self.chars_per_token) as usize,
        );
        let sent = Instant::now();
        self.app.update(Msg::Paste(text.clone()));
        for effect in self.app.update(Msg::Key(KeyEvent::from(KeyCode::Enter))) {
            match effect {
                Effect::Worker(c) => self.worker.send(c),
                other => bail!("turn {number}: the chat screen asked for {other:?}"),
            }
        }
        let mut first: Option<Duration> = None;
        let save_ms = loop {
            match self.next_event()? {
                // The prompt is read: the first token is drawn from these logits. (Its text may
                // come later: a token that ends inside a UTF-8 character shows nothing, and a
                // random tiny model emits such bytes for several tokens, more or fewer with
                // each conversation's history.)
                Event::Prefill { done, total } if done == total => {
                    first.get_or_insert(sent.elapsed());
                }
                Event::Text(_) => {
                    first.get_or_insert(sent.elapsed());
                }
                Event::Finished { prompt_tokens, .. } => {
                    first.get_or_insert(sent.elapsed());
                    if prompt_tokens > 0 {
                        self.chars_per_token = text.len() as f64 / prompt_tokens as f64;
                    }
                }
                Event::Titled { id, .. } => self.id = Some(id),
                Event::Timeline(t) => self.tokens = t.stats.tokens_seen,
                Event::Saved { seconds } => break seconds * 1e3,
                Event::Error(e) => bail!("turn {number}: {e}"),
                _ => {}
            }
        };
        // The screen as a user would see it (its memory counts).
        self.term.draw(|f| view::draw(f, &self.app))?;
        Ok(Turn {
            ttft_ms: first.unwrap_or_default().as_secs_f64() * 1e3,
            save_ms,
        })
    }

    /// Opens saved conversation `id` and waits until it is ready from its saved cache.
    fn open(&mut self, id: i64) -> Result<()> {
        self.worker.send(Command::OpenSession(id));
        loop {
            match self.next_event()? {
                Event::Timeline(t) => self.tokens = t.stats.tokens_seen,
                Event::Notice(Notice::Resumed { from_snapshot, .. }) => {
                    if !from_snapshot {
                        bail!("conversation {id} did not resume from its saved cache");
                    }
                    self.id = Some(id);
                    return Ok(());
                }
                Event::Error(e) => bail!("opening conversation {id}: {e}"),
                _ => {}
            }
        }
    }

    /// Starts a new conversation.
    fn new_conversation(&mut self) -> Result<()> {
        self.worker.send(Command::NewSession);
        while !matches!(self.next_event()?, Event::Opened { .. }) {}
        self.id = None;
        self.tokens = 0;
        Ok(())
    }
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
    let (tx, rx) = unbounded_channel();
    let sampling = settings.sampling.clone();
    let recall = settings.recall_setup()?;
    let worker = worker::spawn(
        WorkerOptions {
            recall,
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
    let mut soak = Soak {
        worker,
        rx,
        app: App::new(Keymap::default(), Theme::default(), (cols, rows)),
        term: Terminal::new(TestBackend::new(cols, rows))?,
        chars_per_token: 4.0,
        tokens: 0,
        id: None,
    };
    loop {
        match soak.next_event()? {
            Event::Ready { .. } => break,
            Event::LoadFailed { reason, .. } => bail!("the model did not load: {reason}"),
            _ => {}
        }
    }
    let every = args.every.unwrap_or(args.tokens / 10).max(1);
    let (written_at_start, handed_at_start) = (written_bytes(), handed_bytes());
    let (mut turns, mut mark) = (0u64, every);
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
    while soak.tokens < args.tokens {
        let t = soak.turn(turns, args.turn_tokens)?;
        ttft.push(t.ttft_ms);
        saves.push(t.save_ms);
        turns += 1;
        if soak.tokens >= mark || soak.tokens >= args.tokens {
            mark = (soak.tokens / every + 1) * every;
            let c = Checkpoint {
                tokens: soak.tokens,
                turns,
                rss_bytes: rss_bytes(),
                ttft_ms: mean(&std::mem::take(&mut ttft)),
                save_ms: mean(&std::mem::take(&mut saves)),
                db_bytes: store::disk_bytes(&db),
                kv_bytes: store::kv_bytes(&db),
                kv_token_bytes: store::kv_token_bytes(&db),
                written_bytes: written_bytes().saturating_sub(written_at_start),
                handed_bytes: handed_bytes().saturating_sub(handed_at_start),
            };
            print_checkpoint(&c, args.json)?;
        }
    }
    if args.alternate > 0 {
        alternate(&mut soak, &args, turns)?;
    }
    soak.worker.send(Command::Shutdown);
    while !matches!(soak.next_event()?, Event::Stopped) {}
    Ok(0)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn print_checkpoint(c: &Checkpoint, json: bool) -> Result<()> {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if json {
        println!("{}", serde_json::to_string(c)?);
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
    Ok(())
}

/// The long conversation's time to first token against a young one's (past its window, at
/// turn 10 or so), turn for turn in alternation, so that the machine's moods fall on both.
fn alternate(soak: &mut Soak, args: &SoakArgs, long_turns: u64) -> Result<()> {
    let long = soak.id.context("the long conversation was not saved")?;
    soak.new_conversation()?;
    let mut young_turns = 0;
    while young_turns < YOUNG_TURNS {
        soak.turn(young_turns, args.turn_tokens)?;
        young_turns += 1;
    }
    let young = soak.id.context("the young conversation was not saved")?;
    let (mut old_ttft, mut young_ttft) = (Vec::new(), Vec::new());
    for round in 0..args.alternate {
        soak.open(long)?;
        old_ttft.push(
            soak.turn(long_turns + round as u64, args.turn_tokens)?
                .ttft_ms,
        );
        soak.open(young)?;
        young_ttft.push(
            soak.turn(young_turns + round as u64, args.turn_tokens)?
                .ttft_ms,
        );
    }
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        (lo, hi)
    };
    let c = AlternateFigures {
        rounds: args.alternate,
        long_turn: long_turns,
        young_turn: young_turns,
        long_ttft_ms: mean(&old_ttft),
        young_ttft_ms: mean(&young_ttft),
        ratio: mean(&old_ttft) / mean(&young_ttft).max(1e-9),
        long_range_ms: spread(&old_ttft),
        young_range_ms: spread(&young_ttft),
    };
    if args.json {
        println!("{}", serde_json::to_string(&c)?);
    } else {
        println!(
            "time to first token, {} rounds alternating: turn {}+ {:.1} ms (min {:.1}, max {:.1}) \
             against a young conversation's turn {}+ {:.1} ms (min {:.1}, max {:.1}): {:.3}×",
            c.rounds,
            c.long_turn,
            c.long_ttft_ms,
            c.long_range_ms.0,
            c.long_range_ms.1,
            c.young_turn,
            c.young_ttft_ms,
            c.young_range_ms.0,
            c.young_range_ms.1,
            c.ratio
        );
    }
    Ok(())
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
