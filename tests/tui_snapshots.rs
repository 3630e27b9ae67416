//! The screen, drawn through ratatui's `TestBackend` and compared with reviewed snapshots
//! (`tests/snapshots/`). States are built the way the running app builds them: worker events and
//! keys through `App::update`.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use lambdachat::protocol::{
    CacheStats, Event, InspectView, KvType, LambdaParams, Message, MessageMap, RecallParams, Role,
    SamplingParams, Settings, ShownMessage, StopReason, Timeline, TokenInfo, TokenState,
    code_blocks,
};
use lambdachat::tui::app::{App, Msg};
use lambdachat::tui::keymap::Keymap;
use lambdachat::tui::theme::Theme;
use lambdachat::tui::view;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::style::Modifier;

fn app(size: (u16, u16)) -> App {
    let mut app = App::new(Keymap::default(), Theme::default(), size);
    app.update(Msg::Worker(Event::Ready {
        model: "Qwen2.5 Coder 0.5B Instruct".into(),
        settings: Settings {
            params: LambdaParams::new(4, 32, None).unwrap(),
            sampling: SamplingParams::default(),
            max_tokens: 512,
            recall: None,
            kv_type: KvType::F16,
            raw: false,
            attention_view: true,
            server: None,
        },
    }));
    app
}

fn draw(app: &App) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(app.size.0, app.size.1)).unwrap();
    terminal.draw(|f| view::draw(f, app)).unwrap();
    terminal
}

fn key(app: &mut App, code: KeyCode) {
    app.update(Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)));
}

fn event(app: &mut App, e: Event) {
    app.update(Msg::Worker(e));
}

/// A finished conversation of `n` exchanges, as the worker reports it when opened.
fn conversation(app: &mut App, messages: Vec<Message>) {
    let mut code_before = 0;
    let shown = messages
        .into_iter()
        .enumerate()
        .map(|(index, m)| {
            let shown = ShownMessage {
                index,
                role: m.role,
                code_before,
                content: m.content,
            };
            code_before += code_blocks(&shown.content).len();
            shown
        })
        .collect::<Vec<_>>();
    event(
        app,
        Event::Opened {
            id: Some(1),
            title: "Rust questions".into(),
            total: shown.len(),
            messages: shown,
        },
    );
}

/// A timeline where message `i` covers tokens `10 i .. 10 i + 10`, `tokens` fed, G = 4, L = 32.
fn timeline(n_messages: u64, tokens: u64, pinned: Vec<std::ops::Range<u64>>) -> Timeline {
    let (g, l) = (4, 32);
    let window_start = (tokens + 1).saturating_sub(l);
    let messages = (0..n_messages)
        .map(|i| {
            let t = 10 * i..10 * i + 10;
            let state = if pinned.iter().any(|p| p.start < t.end && t.start < p.end) {
                TokenState::Pinned
            } else if t.end <= window_start && t.start >= g {
                TokenState::Evicted
            } else {
                TokenState::Window
            };
            MessageMap {
                index: i as usize,
                tokens: t,
                segments: vec![(0..1000, state)],
            }
        })
        .collect();
    let pinned_count: u64 = pinned.iter().map(|p| p.end - p.start).sum();
    let sinks = g.min(window_start);
    Timeline {
        stats: CacheStats {
            tokens_seen: tokens,
            window_start,
            attended_global: sinks + pinned_count,
            attended_window: tokens - window_start,
            pinned: pinned_count,
            evicted: window_start - sinks - pinned_count,
            recalled: 0,
            slots_in_use: 36 * 24,
            slot_capacity: 36 * 24,
            bytes: 36 * 24 * 1024,
        },
        n_global: g,
        n_local: l,
        pinned,
        recalled: Vec::new(),
        message_count: n_messages as usize,
        messages,
    }
}

#[test]
fn empty_chat() {
    let mut app = app((80, 24));
    app.visualizer = false;
    insta::assert_snapshot!(draw(&app).backend());
}

#[test]
fn streamed_reply_with_code() {
    let mut app = app((80, 30));
    app.visualizer = false;
    for c in "How do I read a file in Rust?".chars() {
        key(&mut app, KeyCode::Char(c));
    }
    key(&mut app, KeyCode::Enter);
    event(
        &mut app,
        Event::Prefill {
            done: 20,
            total: 20,
        },
    );
    let reply = "Use **`std::fs::read_to_string`**:\n\n```rust\nuse std::fs;\n\nfn main() -> std::io::Result<()> {\n    let text = fs::read_to_string(\"notes.txt\")?; // whole file\n    println!(\"{text}\");\n    Ok(())\n}\n```\n\n- It returns a `Result`\n- 日本語 and emoji 🎉 wrap by width";
    for piece in reply.split_inclusive(' ') {
        event(&mut app, Event::Text(piece.into()));
    }
    event(
        &mut app,
        Event::Progress {
            generated: 60,
            tok_s: 15.3,
            stats: timeline(2, 80, vec![]).stats,
        },
    );
    insta::assert_snapshot!(draw(&app).backend());
}

#[test]
fn visualizer_with_evicted_tokens() {
    let mut app = app((90, 30));
    let mut messages = Vec::new();
    for i in 0..6 {
        messages.push(Message::new(Role::User, format!("Question number {i}?")));
        messages.push(Message::new(Role::Assistant, format!("Answer number {i}.")));
    }
    conversation(&mut app, messages);
    event(
        &mut app,
        Event::Timeline(timeline(
            12,
            120,
            vec![std::ops::Range { start: 60, end: 70 }],
        )),
    );
    let terminal = draw(&app);
    insta::assert_snapshot!(terminal.backend());
    // Evicted text is dimmed; the pinned message is not.
    let buffer = terminal.backend().buffer();
    let row_of = |needle: &str| {
        (0..buffer.area.height)
            .find(|&y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect::<String>()
                    .contains(needle)
            })
            .unwrap()
    };
    let dim = |y| buffer[(4, y)].modifier.contains(Modifier::DIM);
    assert!(dim(row_of("Answer number 3.")), "evicted text is dimmed");
    assert!(!dim(row_of("Question number 3?")), "pinned text is not");
    assert!(!dim(row_of("Answer number 5.")), "window text is not");
}

/// Recall on: the status bar counts the recalled tokens, the visualizer's last row shows their
/// block, and their text has its own shade, not dimmed.
#[test]
fn visualizer_with_recalled_tokens() {
    let mut app = App::new(Keymap::default(), Theme::default(), (90, 30));
    app.update(Msg::Worker(Event::Ready {
        model: "Qwen2.5 Coder 0.5B Instruct".into(),
        settings: Settings {
            params: LambdaParams::new(4, 32, None).unwrap(),
            sampling: SamplingParams::default(),
            max_tokens: 512,
            recall: Some(RecallParams::default()),
            kv_type: KvType::F16,
            raw: false,
            attention_view: true,
            server: None,
        },
    }));
    let mut messages = Vec::new();
    for i in 0..6 {
        messages.push(Message::new(Role::User, format!("Question number {i}?")));
        messages.push(Message::new(Role::Assistant, format!("Answer number {i}.")));
    }
    conversation(&mut app, messages);
    let mut t = timeline(12, 120, vec![]);
    t.recalled = vec![std::ops::Range { start: 60, end: 70 }];
    t.stats.recalled = 10;
    t.messages[6].segments = vec![(0..1000, TokenState::Recalled)];
    event(&mut app, Event::Timeline(t));
    let terminal = draw(&app);
    insta::assert_snapshot!(terminal.backend());
    let buffer = terminal.backend().buffer();
    let text = |y| {
        (0..buffer.area.width)
            .map(|x| buffer[(x, y)].symbol().to_string())
            .collect::<String>()
    };
    let row_of = |needle: &str| {
        (0..buffer.area.height)
            .find(|&y| text(y).contains(needle))
            .unwrap()
    };
    let recalled = buffer[(4, row_of("Question number 3?"))].clone();
    assert!(
        !recalled.modifier.contains(Modifier::DIM),
        "recalled text is not dimmed"
    );
    assert_eq!(recalled.fg, Theme::default().recalled);
    assert!(text(buffer.area.height - 1).contains("recalled 10"));
}

#[test]
fn inspect_mode() {
    let mut app = app((80, 24));
    app.visualizer = false;
    conversation(
        &mut app,
        vec![
            Message::new(Role::User, "Say hi"),
            Message::new(Role::Assistant, "Hello there, friend!"),
        ],
    );
    event(&mut app, Event::Timeline(timeline(2, 20, vec![])));
    key(&mut app, KeyCode::F(3));
    let words = ["Hello", " there", ",", " friend", "!"];
    let shares = [0.30, 0.05, 0.02, 0.20, 0.10];
    let tokens = words
        .iter()
        .zip(shares)
        .enumerate()
        .map(|(i, (w, share))| TokenInfo {
            position: 12 + i as u64,
            id: 9000 + i as u32,
            text: w.to_string(),
            state: TokenState::Window,
            share,
        })
        .collect();
    event(&mut app, Event::Inspect(InspectView { message: 1, tokens }));
    key(&mut app, KeyCode::Left);
    key(&mut app, KeyCode::Left);
    insta::assert_snapshot!(draw(&app).backend());
}

#[test]
fn help_overlay() {
    let mut app = app((120, 36));
    key(&mut app, KeyCode::F(1));
    insta::assert_snapshot!(draw(&app).backend());
}

#[test]
fn tiny_terminal() {
    let app = app((30, 8));
    insta::assert_snapshot!(draw(&app).backend());
}

/// While the model loads the status says so, and Enter keeps the typed message.
#[test]
fn a_message_sent_while_loading_is_kept() {
    let mut app = App::new(Keymap::default(), Theme::default(), (80, 12));
    app.visualizer = false;
    event(
        &mut app,
        Event::Loading("loading qwen2.5-coder (Q4_K_M)…".into()),
    );
    for c in "hello".chars() {
        key(&mut app, KeyCode::Char(c));
    }
    key(&mut app, KeyCode::Enter);
    insta::assert_snapshot!(draw(&app).backend());
}

#[test]
fn load_failure_is_explained() {
    let mut app = App::new(Keymap::default(), Theme::default(), (80, 20));
    app.visualizer = false;
    event(
        &mut app,
        Event::LoadFailed {
            reason: "model.gguf: not a GGUF file (magic bytes 7f454c46)".into(),
            hint: "Check the --model path (a GGUF file).".into(),
        },
    );
    insta::assert_snapshot!(draw(&app).backend());
}

#[test]
fn a_stopped_reply_is_kept() {
    let mut app = app((60, 16));
    app.visualizer = false;
    for c in "Count to ten".chars() {
        key(&mut app, KeyCode::Char(c));
    }
    key(&mut app, KeyCode::Enter);
    event(&mut app, Event::Text("1, 2, 3,".into()));
    key(&mut app, KeyCode::Esc);
    event(
        &mut app,
        Event::Finished {
            stop: StopReason::Cancelled,
            prompt_tokens: 12,
            generated: 6,
            tok_s: 14.0,
            replied: true,
        },
    );
    insta::assert_snapshot!(draw(&app).backend());
}

#[test]
fn session_list() {
    use lambdachat::protocol::SessionSummary;
    let mut app = app((90, 24));
    app.visualizer = false;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let summary = |id, title: &str, messages, ago| SessionSummary {
        id,
        title: title.into(),
        model: "/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf".into(),
        messages,
        updated: now - ago,
    };
    event(
        &mut app,
        Event::Opened {
            id: Some(2),
            title: "Borrow checker".into(),
            total: 0,
            messages: vec![],
        },
    );
    event(
        &mut app,
        Event::Sessions(vec![
            summary(2, "Borrow checker", 14, 30),
            summary(1, "Haiku about autumn", 2, 7300),
            summary(3, "A very long conversation", 20_000, 3 * 86_400),
        ]),
    );
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Char('d'));
    insta::assert_snapshot!(draw(&app).backend());
}

/// Up on an empty box: the last message is in the box to edit, and the box says what Enter
/// and Esc do with it.
#[test]
fn editing_the_last_message() {
    let mut app = app((72, 14));
    app.visualizer = false;
    conversation(
        &mut app,
        vec![
            Message::new(Role::User, "What is a borrow?"),
            Message::new(Role::Assistant, "A reference that does not own its value."),
        ],
    );
    key(&mut app, KeyCode::Up);
    insta::assert_snapshot!(draw(&app).backend());
}

/// Through `--connect` to a server that is not lambdachat's: the title names the server, the
/// status bar counts nothing of a cache it cannot see, and the visualizer says why it is empty.
#[test]
fn connected_to_a_plain_openai_server() {
    let mut app = App::new(Keymap::default(), Theme::default(), (90, 24));
    app.update(Msg::Worker(Event::Ready {
        model: "llama3.2".into(),
        settings: Settings {
            params: LambdaParams {
                n_global: 0,
                n_local: 0,
                distance_limit: 0,
            },
            sampling: SamplingParams::default(),
            max_tokens: 512,
            recall: None,
            kv_type: KvType::F16,
            raw: false,
            attention_view: false,
            server: Some("http://gpu-box:11434".into()),
        },
    }));
    conversation(
        &mut app,
        vec![
            Message::new(Role::User, "Say hi"),
            Message::new(Role::Assistant, "Hello there, friend!"),
        ],
    );
    insta::assert_snapshot!(draw(&app).backend());
}
