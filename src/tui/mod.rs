//! The full-screen chat: terminal setup and restore, and the event loop that turns terminal
//! input and worker events into [`app::Msg`]s, runs `update`, carries out the effects and
//! redraws.
//!
//! Redraws happen only when something changed, each inside a synchronized update so the terminal
//! never shows half a frame. Input (keys, paste, resize, wheel) is drawn at once; worker events
//! at most every [`FRAME`], batched: every pending event is applied before the next draw.

pub mod app;
pub mod attach;
pub mod commands;
pub mod editor;
pub mod highlight;
pub mod keymap;
pub mod markdown;
pub mod panels;
pub mod theme;
pub mod view;
pub mod widgets;
pub mod words;
pub mod wrap;

use std::io::{Write, stdout};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture,
    Event as TermEvent, EventStream, KeyEventKind, MouseEventKind,
};
use crossterm::terminal::{
    BeginSynchronizedUpdate, EndSynchronizedUpdate, EnterAlternateScreen, LeaveAlternateScreen,
    disable_raw_mode, enable_raw_mode,
};
use crossterm::{clipboard::CopyToClipboard, execute};
use futures::StreamExt;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use tokio::sync::mpsc::unbounded_channel;

use crate::protocol::Start;
use app::{App, Effect, Msg};

/// Shortest time between two frames (about 60 per second).
const FRAME: Duration = Duration::from_millis(16);
/// How long quitting waits for the worker to save.
const SAVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Puts the terminal back as it was: raw mode off, main screen, no mouse or paste capture.
pub fn restore_terminal() {
    let _ = disable_raw_mode();
    let _ = execute!(
        stdout(),
        EndSynchronizedUpdate,
        DisableBracketedPaste,
        DisableMouseCapture,
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

/// Restores the terminal when dropped, whatever path leaves the UI (error, early return).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Runs the chat until the user quits. The engine (`start`) loads the model while the UI is
/// already up.
pub fn run(app: App, start: Start) -> Result<()> {
    // A panic on this (the UI) thread restores the terminal before it is printed. A panic on any
    // other thread (the engine's, or a compute pool's) goes to the log only: the engine reports
    // it as an error and the UI stays usable.
    let ui_thread = std::thread::current().id();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != ui_thread {
            tracing::error!("panic off the UI thread: {info}");
            return;
        }
        restore_terminal();
        previous(info);
    }));
    enable_raw_mode().context("switching the terminal to raw mode")?;
    let _guard = TerminalGuard;
    execute!(
        stdout(),
        EnterAlternateScreen,
        EnableBracketedPaste,
        EnableMouseCapture
    )
    .context("setting up the terminal")?;
    // No `clear()`: it asks the terminal for the cursor position, which not every terminal
    // answers; the alternate screen starts blank and the first frame paints all of it.
    let mut terminal =
        Terminal::new(CrosstermBackend::new(stdout())).context("opening the terminal")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    runtime.block_on(event_loop(&mut terminal, app, start))
}

async fn event_loop(
    terminal: &mut Terminal<CrosstermBackend<std::io::Stdout>>,
    mut app: App,
    start: Start,
) -> Result<()> {
    let (events_tx, mut events) = unbounded_channel();
    let engine = start(events_tx).context("starting the generation worker")?;
    let mut input = EventStream::new();
    let mut terminate = signal_stream()?;
    let mut dirty = true;
    let mut last_draw = Instant::now() - FRAME;
    let mut quit_deadline: Option<Instant> = None;
    let mut urgent = false;
    loop {
        // Keys are drawn at once; streamed tokens at most once per frame.
        if dirty && (urgent || last_draw.elapsed() >= FRAME) {
            draw(terminal, &app)?;
            last_draw = Instant::now();
            dirty = false;
            urgent = false;
        }
        let wait = if dirty {
            FRAME.saturating_sub(last_draw.elapsed())
        } else if app.quitting {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(3600)
        };
        let mut msgs = Vec::new();
        tokio::select! {
            e = input.next() => match e {
                Some(Ok(e)) => msgs.extend(terminal_msg(e)),
                Some(Err(e)) => return Err(e).context("reading the terminal"),
                None => msgs.push(Msg::Terminate),
            },
            e = events.recv() => match e {
                Some(e) => msgs.push(Msg::Worker(e)),
                None => break,
            },
            _ = terminate.recv() => msgs.push(Msg::Terminate),
            _ = tokio::time::sleep(wait) => {}
        }
        // Batch: everything that arrived before this frame is applied before drawing.
        while let Ok(e) = events.try_recv() {
            msgs.push(Msg::Worker(e));
        }
        let mut queue = std::collections::VecDeque::from(msgs);
        while let Some(msg) = queue.pop_front() {
            dirty = true;
            urgent |= !matches!(msg, Msg::Worker(_));
            for effect in app.update(msg) {
                match effect {
                    Effect::Worker(c) => engine.send(c),
                    Effect::Cancel => engine.cancel(),
                    Effect::Copy(text) => {
                        let _ = execute!(stdout(), CopyToClipboard::to_clipboard_from(text));
                    }
                    Effect::Attach(path) => queue.push_back(Msg::Attached(attach::read(&path))),
                    Effect::Exit => return Ok(()),
                }
            }
        }
        if app.quitting {
            let deadline = *quit_deadline.get_or_insert_with(|| Instant::now() + SAVE_TIMEOUT);
            if Instant::now() > deadline {
                tracing::error!("the worker did not stop in time; quitting without waiting");
                break;
            }
        }
    }
    Ok(())
}

fn draw(terminal: &mut Terminal<CrosstermBackend<std::io::Stdout>>, app: &App) -> Result<()> {
    execute!(terminal.backend_mut(), BeginSynchronizedUpdate)?;
    terminal.draw(|f| view::draw(f, app))?;
    execute!(terminal.backend_mut(), EndSynchronizedUpdate)?;
    terminal.backend_mut().flush()?;
    Ok(())
}

fn terminal_msg(e: TermEvent) -> Option<Msg> {
    match e {
        TermEvent::Key(k) if k.kind != KeyEventKind::Release => Some(Msg::Key(k)),
        TermEvent::Paste(text) => Some(Msg::Paste(text)),
        TermEvent::Resize(w, h) => Some(Msg::Resize(w, h)),
        TermEvent::Mouse(m) => match m.kind {
            MouseEventKind::ScrollUp => Some(Msg::Wheel(-3)),
            MouseEventKind::ScrollDown => Some(Msg::Wheel(3)),
            _ => None,
        },
        _ => None,
    }
}

/// SIGTERM and SIGHUP as one stream (Ctrl-C arrives as a key in raw mode).
fn signal_stream() -> Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    let (tx, rx) = unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        for kind in [
            SignalKind::terminate(),
            SignalKind::hangup(),
            SignalKind::interrupt(),
        ] {
            let mut s = signal(kind).context("installing signal handlers")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
            });
        }
    }
    Ok(rx)
}
