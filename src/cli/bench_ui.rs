//! `lambdachat bench ui`: how long the full-screen chat takes to draw a frame of a long
//! conversation, and how long a key takes to reach the screen while the model generates.
//!
//! Frames are drawn by the app's own `view::draw` through a crossterm backend writing to a sink,
//! so the figures include building the frame, diffing it and encoding the escape sequences; only
//! the terminal emulator's own work is left out. Keys go through `App::update` as in the event
//! loop, with the real worker streaming tokens from the real model meanwhile.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::Rect;
use ratatui::{Terminal, TerminalOptions, Viewport};
use tokio::sync::mpsc::unbounded_channel;

use super::RunArgs;
use crate::chat::{Role, code_blocks};
use crate::config::Config;
use crate::protocol::{Backend, Command, Event, Settings, ShownMessage};
use crate::tui::app::{App, Msg};
use crate::tui::keymap::Keymap;
use crate::tui::theme::Theme;
use crate::tui::view;
use crate::worker::{self, WorkerOptions};

#[derive(Args)]
pub struct UiArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Messages in the conversation
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Frames timed per scenario
    #[arg(long, default_value_t = 300)]
    pub frames: usize,
    /// Terminal size, COLSxROWS
    #[arg(long, default_value = "160x50")]
    pub size: String,
    /// Tokens the model generates while keys are timed (0 skips the model)
    #[arg(long, default_value_t = 200)]
    pub generate: usize,
}

type SinkTerminal = Terminal<CrosstermBackend<std::io::Sink>>;

fn terminal(cols: u16, rows: u16) -> Result<SinkTerminal> {
    let options = TerminalOptions {
        viewport: Viewport::Fixed(Rect::new(0, 0, cols, rows)),
    };
    Ok(Terminal::with_options(
        CrosstermBackend::new(std::io::sink()),
        options,
    )?)
}

/// Times one frame in microseconds.
fn frame(terminal: &mut SinkTerminal, app: &App) -> Result<f64> {
    let start = Instant::now();
    terminal.draw(|f| view::draw(f, app))?;
    Ok(start.elapsed().as_secs_f64() * 1e6)
}

/// `(median, p99, max)` of microsecond samples.
fn summary(mut us: Vec<f64>) -> (f64, f64, f64) {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), us[us.len() - 1])
}

fn print(label: &str, us: Vec<f64>) {
    let n = us.len();
    let (p50, p99, max) = summary(us);
    println!(
        "{label:<44} median {:>7.3} ms   p99 {:>7.3} ms   max {:>7.3} ms   ({n} samples)",
        p50 / 1e3,
        p99 / 1e3,
        max / 1e3
    );
}

/// A conversation of `n` messages of typical shapes: questions, prose, lists, code.
fn conversation(n: usize) -> Vec<ShownMessage> {
    let mut code_before = 0;
    (0..n)
        .map(|i| {
            let (role, content) = if i % 2 == 0 {
                (Role::User, format!("Question {i}: how do I sort a vector of structs by a field, and keep it stable?"))
            } else if i % 6 == 1 {
                (
                    Role::Assistant,
                    format!("Use `sort_by_key`, which is stable:\n\n```rust\nitems.sort_by_key(|item| item.field_{i});\n```\n\nIt keeps equal elements in their order."),
                )
            } else {
                (
                    Role::Assistant,
                    format!("Reply {i}. **Stable** sorting keeps equal elements in order.\n\n- `sort` is stable\n- `sort_unstable` is faster\n- both take O(n log n)\n\nSee the docs of `slice::sort` for details — 日本語 and emoji 🎉 wrap by width."),
                )
            };
            let m = ShownMessage {
                index: i,
                role,
                code_before,
                content,
            };
            code_before += code_blocks(&m.content).len();
            m
        })
        .collect()
}

pub fn run(args: UiArgs, config: &Config) -> Result<i32> {
    let (cols, rows) = args
        .size
        .split_once('x')
        .and_then(|(c, r)| Some((c.parse::<u16>().ok()?, r.parse::<u16>().ok()?)))
        .context("--size is COLSxROWS, for example 160x50")?;
    if args.frames == 0 {
        bail!("--frames must be at least 1");
    }
    let settings = args.run.settings(config)?;
    let mut app = App::new(Keymap::default(), Theme::default(), (cols, rows));
    app.update(Msg::Worker(Event::Ready {
        model: "bench".into(),
        settings: Settings {
            params: settings.lambda,
            sampling: settings.sampling.clone(),
            max_tokens: args.generate.max(1),
            recall: settings.recall,
            kv_type: settings.load_options.kv_type,
            raw: false,
            attention_view: true,
            server: None,
        },
    }));
    app.update(Msg::Worker(Event::Opened {
        id: None,
        title: "bench".into(),
        total: args.messages,
        messages: conversation(args.messages),
    }));
    let mut term = terminal(cols, rows)?;
    println!(
        "UI frames: {} messages, {cols}×{rows} terminal, visualizer on",
        args.messages
    );
    let first = frame(&mut term, &app)?;
    println!(
        "{:<44} {:>7.3} ms",
        "first frame (cold caches)",
        first / 1e3
    );
    let mut steady = Vec::new();
    for _ in 0..args.frames {
        // A changed title forces a real diff each frame.
        app.update(Msg::Worker(Event::Titled {
            id: 1,
            title: format!("frame {}", steady.len()),
        }));
        steady.push(frame(&mut term, &app)?);
    }
    print("following the bottom", steady);

    app.update(Msg::Worker(Event::Text(String::new())));
    let mut streaming = Vec::new();
    for i in 0..args.frames {
        app.update(Msg::Worker(Event::Text(format!("word{i} "))));
        streaming.push(frame(&mut term, &app)?);
    }
    print("streaming a reply (one token per frame)", streaming);

    app.conversation
        .scroll_up(app.conversation.messages.len() * 3 / 2);
    let first_scroll = frame(&mut term, &app)?;
    println!(
        "{:<44} {:>7.3} ms",
        "jump to the middle (renders what it passes)",
        first_scroll / 1e3
    );
    let mut scrolled = Vec::new();
    for i in 0..args.frames {
        if i % 2 == 0 {
            app.conversation.scroll_up(3);
        } else {
            app.conversation.scroll_down(3);
        }
        scrolled.push(frame(&mut term, &app)?);
    }
    print("scrolling in the middle", scrolled);

    if args.generate > 0 {
        key_latency(&args, settings, cols, rows)?;
    }
    Ok(0)
}

/// Types keys while the real model streams a reply; times each key from `update` to the end of
/// the frame that shows it.
fn key_latency(args: &UiArgs, settings: super::RunSettings, cols: u16, rows: u16) -> Result<()> {
    let (tx, mut rx) = unbounded_channel();
    let sampling = settings.sampling.clone();
    let recall = settings.recall_setup()?;
    let handle = worker::spawn(
        WorkerOptions {
            recall,
            load: Box::new(move |progress| settings.load_reporting(progress)),
            sampling,
            max_tokens: args.generate,
            system: None,
            store: None,
            resume: None,
            kv_budget: 0,
        },
        tx,
    )?;
    let mut app = App::new(Keymap::default(), Theme::default(), (cols, rows));
    app.update(Msg::Worker(Event::Opened {
        id: None,
        title: "bench".into(),
        total: args.messages,
        messages: conversation(args.messages),
    }));
    let mut term = terminal(cols, rows)?;
    // Wait for the model.
    loop {
        let e = rx.blocking_recv().context("the worker stopped")?;
        let ready = matches!(e, Event::Ready { .. });
        if let Event::LoadFailed { reason, .. } = &e {
            bail!("the model did not load: {reason}");
        }
        app.update(Msg::Worker(e));
        if ready {
            break;
        }
    }
    handle.send(Command::Send(
        "Write a long story about a lighthouse keeper, in many paragraphs.".into(),
    ));
    let mut latencies = Vec::new();
    let mut tokens = 0usize;
    let start = Instant::now();
    let mut next_key = Instant::now();
    let mut done = false;
    let mut esc_at: Option<Instant> = None;
    let mut stop_latency = None;
    while !done {
        // Worker events as the event loop batches them.
        while let Ok(e) = rx.try_recv() {
            if let Event::Text(_) = e {
                tokens += 1;
            }
            done |= matches!(e, Event::Finished { .. } | Event::Error(_));
            if done {
                stop_latency = esc_at.map(|t| t.elapsed());
            }
            app.update(Msg::Worker(e));
        }
        // Halfway through the reply, Esc: the time until the worker reports the reply ended.
        if esc_at.is_none() && tokens >= args.generate / 2 {
            esc_at = Some(Instant::now());
            let effects = app.update(Msg::Key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE)));
            if effects.contains(&crate::tui::app::Effect::Cancel) {
                handle.cancel();
            }
        }
        if Instant::now() >= next_key {
            let t0 = Instant::now();
            let c = if latencies.len() % 20 == 19 {
                KeyCode::Backspace
            } else {
                KeyCode::Char('x')
            };
            app.update(Msg::Key(KeyEvent::new(c, KeyModifiers::NONE)));
            term.draw(|f| view::draw(f, &app))?;
            latencies.push(t0.elapsed().as_secs_f64() * 1e6);
            // A fast typist: a key every 40 ms.
            next_key = t0 + Duration::from_millis(40);
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "key to screen while generating ({tokens} tokens streamed at {:.1} tok/s):",
        tokens as f64 / secs
    );
    print("  key → update → frame drawn", latencies);
    if let Some(t) = stop_latency {
        println!(
            "{:<44} {:>7.1} ms",
            "  esc → reply stopped (worker reports it)",
            t.as_secs_f64() * 1e3
        );
    }
    handle.send(Command::Shutdown);
    let _ = handle.thread.join();
    Ok(())
}
