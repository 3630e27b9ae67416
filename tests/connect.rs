//! The chat as a client of a server (`--connect`): the TUI's app, drawn through ratatui's
//! `TestBackend`, with the remote backend as its engine, as `lambdachat --connect URL` runs it.
//! Against a lambdachat server (in this process, on the tiny model) the attention view, pins
//! and the continued conversation work; against a plain OpenAI-compatible server (a few lines
//! of HTTP here) the chat works and the visualizer says it is not available; a stopped reply
//! stops at once; a server that is not there or wants a key says so.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::server::{Options, start};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use lambdachat::protocol::{Backend, Event, Role, SamplingParams, StopReason};
use lambdachat::remote::{RemoteOptions, spawn};
use lambdachat::tui::app::{App, Effect, Msg};
use lambdachat::tui::keymap::Keymap;
use lambdachat::tui::theme::Theme;
use lambdachat::tui::view;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const SIZE: (u16, u16) = (110, 30);

/// How the tests connect: greedy, short replies, a system prompt, conversations saved in `data`.
fn options(url: &str, key: Option<&str>, data: &Path) -> RemoteOptions {
    RemoteOptions {
        url: url.to_string(),
        api_key: key.map(str::to_string),
        model: None,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_tokens: 24,
        system: Some("be brief".into()),
        store: Some(data.join("remote.db")),
        resume: None,
    }
}

/// The app and its remote engine, wired as `tui::run` wires them.
struct Chat {
    app: App,
    remote: lambdachat::protocol::EngineThread,
    events: UnboundedReceiver<Event>,
    /// Every event the engine sent, in order.
    seen: Vec<Event>,
}

impl Chat {
    fn connect(url: &str, key: Option<&str>, data: &Path) -> Self {
        Self::start(options(url, key, data))
    }

    fn start(options: RemoteOptions) -> Self {
        let (tx, events) = unbounded_channel();
        let remote = spawn(options, tx).unwrap();
        Self {
            app: App::new(Keymap::default(), Theme::default(), SIZE),
            remote,
            events,
            seen: Vec::new(),
        }
    }

    fn apply(&mut self, msg: Msg) {
        for effect in self.app.update(msg) {
            match effect {
                Effect::Worker(c) => self.remote.send(c),
                Effect::Cancel => self.remote.cancel(),
                _ => {}
            }
        }
    }

    /// Feeds the engine's events to the app until `done` holds for one of them.
    fn until(&mut self, what: &str, done: impl Fn(&Event) -> bool) -> Event {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.events.try_recv() {
                Ok(e) => {
                    self.seen.push(e.clone());
                    self.apply(Msg::Worker(e.clone()));
                    if done(&e) {
                        return e;
                    }
                }
                Err(_) => {
                    assert!(
                        Instant::now() < deadline,
                        "timed out waiting for {what}; events: {:?}\nscreen:\n{}",
                        self.seen,
                        self.screen()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn ready(&mut self) {
        self.until("the connection", |e| matches!(e, Event::Ready { .. }));
        self.until("the conversation", |e| matches!(e, Event::Opened { .. }));
    }

    fn type_line(&mut self, text: &str) {
        for c in text.chars() {
            self.apply(Msg::Key(KeyEvent::new(
                KeyCode::Char(c),
                KeyModifiers::NONE,
            )));
        }
        self.apply(Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)));
    }

    fn finished(&mut self) -> Event {
        self.until("the reply", |e| matches!(e, Event::Finished { .. }))
    }

    fn screen(&self) -> String {
        let mut terminal = Terminal::new(TestBackend::new(SIZE.0, SIZE.1)).unwrap();
        terminal.draw(|f| view::draw(f, &self.app)).unwrap();
        let buffer = terminal.backend().buffer();
        let mut text = String::new();
        for y in 0..SIZE.1 {
            for x in 0..SIZE.0 {
                text.push_str(buffer[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }
}

fn replies(app: &App) -> usize {
    (0..)
        .map_while(|i| app.conversation.get(i))
        .filter(|m| m.role == Role::Assistant)
        .count()
}

#[test]
fn chats_with_a_lambdachat_server_with_the_attention_view_and_pins() {
    let base = start(Options::default());
    let data = tempfile::tempdir().unwrap();
    let mut chat = Chat::connect(&base, None, data.path());
    chat.ready();
    chat.type_line("hello there");
    chat.finished();
    chat.until(
        "the timeline after the reply",
        |e| matches!(e, Event::Timeline(t) if t.stats.tokens_seen > 0),
    );
    assert_eq!(replies(&chat.app), 1);
    let first_seen = chat.app.timeline.stats.tokens_seen;
    let screen = chat.screen();
    assert!(screen.contains(&format!("tiny @ {base}")), "{screen}");
    // The visualizer (shown from the start) draws the server's Λ.
    assert!(screen.contains("Λ = 4 sinks + 32-token window"), "{screen}");

    // The second message continues the server's cache: the server holds the conversation
    // with both replies, and its Λ has seen more.
    chat.type_line("and again");
    chat.finished();
    chat.until(
        "the timeline after the second reply",
        |e| matches!(e, Event::Timeline(t) if t.stats.tokens_seen > first_seen),
    );
    assert_eq!(replies(&chat.app), 2);

    // A pin goes to the server's cache and comes back in its timeline.
    chat.type_line("/pin 1");
    let pinned = chat.until("the pin", |e| {
        matches!(e, Event::Notice(_) | Event::Error(_))
    });
    assert!(
        matches!(pinned, Event::Notice(lambdachat::protocol::Notice::Pinned { tokens, .. }) if tokens > 0),
        "{pinned:?}"
    );
    let t = chat.until("the timeline after the pin", |e| {
        matches!(e, Event::Timeline(_))
    });
    let Event::Timeline(t) = t else {
        unreachable!()
    };
    assert!(!t.pinned.is_empty(), "{t:?}");

    // Inspect mode shows the server's tokens of a message.
    chat.remote.send(lambdachat::protocol::Command::Inspect(2));
    let view = chat.until("the inspect view", |e| {
        matches!(e, Event::Inspect(_) | Event::Error(_))
    });
    let Event::Inspect(view) = view else {
        panic!("{view:?}")
    };
    assert!(!view.tokens.is_empty());

    // The conversation was saved on this machine: system prompt, two exchanges.
    chat.remote.send(lambdachat::protocol::Command::Shutdown);
    chat.until("the end", |e| matches!(e, Event::Stopped));
    let store = lambdachat::store::Store::open(&data.path().join("remote.db")).unwrap();
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].messages, 5);
    assert_eq!(list[0].title, "hello there");
    drop(store);

    // Resumed later: the messages come back from this machine, and the server still holds
    // the conversation's cache.
    let mut resumed = Chat::start(RemoteOptions {
        resume: Some(None),
        ..options(&base, None, data.path())
    });
    let opened = resumed.until("the conversation", |e| matches!(e, Event::Opened { .. }));
    assert!(
        matches!(opened, Event::Opened { total: 5, .. }),
        "{opened:?}"
    );
    let notice = resumed.until("the notice", |e| matches!(e, Event::Notice(_)));
    assert!(
        matches!(
            notice,
            Event::Notice(lambdachat::protocol::Notice::ResumedRemote { held: true, .. })
        ),
        "{notice:?}"
    );
    // The next message continues it.
    resumed.type_line("one more");
    resumed.finished();
    let before = t.stats.tokens_seen;
    resumed.until(
        "the timeline after it",
        |e| matches!(e, Event::Timeline(t) if t.stats.tokens_seen > before),
    );
}

/// A minimal OpenAI-compatible server: `/v1/models` lists one model, the chat streams `words`
/// (then, with `hang`, keeps the connection open without a word more), everything else is 404.
/// Returns its base URL.
fn plain_server(words: &'static [&'static str], hang: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
                let reply = |stream: &mut std::net::TcpStream,
                             status: &str,
                             kind: &str,
                             body: &str| {
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(body.as_bytes());
                };
                match path.as_str() {
                    "/v1/models" => reply(
                        &mut stream,
                        "200 OK",
                        "application/json",
                        r#"{"object":"list","data":[{"id":"plain-model","object":"model"}]}"#,
                    ),
                    "/v1/chat/completions" => {
                        let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        assert_eq!(request["model"], "plain-model");
                        assert!(request.get("lambdachat").is_none(), "{request}");
                        let mut sse = String::new();
                        for w in words {
                            let chunk = serde_json::json!({"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]});
                            sse.push_str(&format!("data: {chunk}\n\n"));
                        }
                        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                        let _ = stream.write_all(head.as_bytes());
                        let _ = stream.write_all(sse.as_bytes());
                        let _ = stream.flush();
                        if hang {
                            std::thread::sleep(Duration::from_secs(30));
                        }
                        let end = serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
                        let _ =
                            stream.write_all(format!("data: {end}\n\ndata: [DONE]\n\n").as_bytes());
                    }
                    _ => reply(
                        &mut stream,
                        "404 Not Found",
                        "text/plain",
                        "404 page not found",
                    ),
                }
            });
        }
    });
    base
}

#[test]
fn chats_with_a_plain_openai_server_without_the_attention_view() {
    let base = plain_server(&["Hello", ", world"], false);
    let data = tempfile::tempdir().unwrap();
    let mut chat = Chat::connect(&format!("{base}/v1"), None, data.path());
    chat.ready();
    chat.type_line("hi");
    chat.finished();
    let screen = chat.screen();
    assert!(screen.contains("Hello, world"), "{screen}");
    assert!(
        screen.contains(&format!("plain-model @ {base}")),
        "{screen}"
    );
    // Nothing is said of a cache the server does not show: no counters, no evicted messages.
    assert!(!screen.contains("attending"), "{screen}");
    assert!(!screen.contains("evicted"), "{screen}");
    assert!(
        screen.contains(&format!("Not available for {base}")),
        "{screen}"
    );
    chat.type_line("/pin 1");
    let e = chat.until("the refusal", |e| matches!(e, Event::Error(_)));
    assert!(
        format!("{e:?}").contains("pins need a lambdachat server"),
        "{e:?}"
    );
}

#[test]
fn a_stopped_reply_stops_at_once_and_keeps_what_came() {
    let base = plain_server(&["partial"], true);
    let data = tempfile::tempdir().unwrap();
    let mut chat = Chat::connect(&base, None, data.path());
    chat.ready();
    chat.type_line("go on forever");
    chat.until("the first words", |e| matches!(e, Event::Text(_)));
    let stopped = Instant::now();
    chat.apply(Msg::Key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE)));
    let finished = chat.finished();
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopped.elapsed()
    );
    assert!(
        matches!(
            finished,
            Event::Finished {
                stop: StopReason::Cancelled,
                replied: true,
                ..
            }
        ),
        "{finished:?}"
    );
    assert!(chat.screen().contains("partial"));
}

#[test]
fn a_missing_server_or_key_is_said_with_what_to_do() {
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let data = tempfile::tempdir().unwrap();
    let mut chat = Chat::connect(&url, None, data.path());
    let failed = chat.until("the failure", |e| matches!(e, Event::LoadFailed { .. }));
    let Event::LoadFailed { reason, hint } = failed else {
        unreachable!()
    };
    assert!(reason.contains("did not answer"), "{reason}");
    assert!(hint.contains("Check the address"), "{hint}");

    let keyed = start(Options {
        key: Some("sesame"),
        ..Options::default()
    });
    let mut chat = Chat::connect(&keyed, None, data.path());
    let failed = chat.until("the refusal", |e| matches!(e, Event::LoadFailed { .. }));
    let Event::LoadFailed { reason, hint } = failed else {
        unreachable!()
    };
    assert!(reason.contains("401"), "{reason}");
    assert!(hint.contains("--api-key"), "{hint}");
    let mut chat = Chat::connect(&keyed, Some("sesame"), data.path());
    chat.ready();

    let mut bad = Chat::connect("localhost:8080", None, data.path());
    let failed = bad.until("the refusal", |e| matches!(e, Event::LoadFailed { .. }));
    assert!(format!("{failed:?}").contains("http://"), "{failed:?}");
}
