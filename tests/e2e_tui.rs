//! End to end, as a person uses it: the real binary with the real default model in a
//! pseudo-terminal. Type a message, wait for the reply on screen, quit, start again with
//! `--resume`, and see the conversation restored from its saved KV snapshot.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{Child, CommandBuilder, PtySize, native_pty_system};

const ROWS: u16 = 32;
const COLS: u16 = 100;

struct Screen {
    parser: Arc<Mutex<vt100::Parser>>,
    writer: Box<dyn Write + Send>,
    child: Box<dyn Child + Send + Sync>,
}

impl Screen {
    fn start(args: &[&str], data_dir: &std::path::Path) -> Self {
        Self::spawn(env!("CARGO_BIN_EXE_lambdachat"), args, data_dir, &[])
    }

    /// The chat run by this test binary (see [`app_with_faults`]), with `env`.
    fn start_with_faults(args: &[&str], data_dir: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let exe = std::env::current_exe().unwrap();
        let harness = [
            "--exact",
            "app_with_faults",
            "--nocapture",
            "--test-threads=1",
        ];
        let mut env = env.to_vec();
        let joined = args.join("\u{1f}");
        env.push(("LAMBDACHAT_E2E_ARGS", &joined));
        Self::spawn(exe.to_str().unwrap(), &harness, data_dir, &env)
    }

    fn spawn(
        program: &str,
        args: &[&str],
        data_dir: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Self {
        let pty = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
        let mut cmd = CommandBuilder::new(program);
        cmd.args(args);
        cmd.env("LAMBDACHAT_DATA_DIR", data_dir);
        // An empty config file: the user's own config must not change what this test sees.
        cmd.env("LAMBDACHAT_CONFIG", "/dev/null");
        cmd.env("TERM", "xterm-256color");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = pty.slave.spawn_command(cmd).unwrap();
        drop(pty.slave);
        let parser = Arc::new(Mutex::new(vt100::Parser::new(
            std::num::NonZero::new(ROWS).unwrap(),
            std::num::NonZero::new(COLS).unwrap(),
            0,
        )));
        let mut reader = pty.master.try_clone_reader().unwrap();
        let sink = parser.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().process(&buf[..n]);
            }
        });
        let writer = pty.master.take_writer().unwrap();
        // Keep the master open as long as the writer (dropping it would hang up the child).
        std::mem::forget(pty.master);
        Self {
            parser,
            writer,
            child,
        }
    }

    fn text(&self) -> String {
        self.parser.lock().unwrap().screen().contents()
    }

    fn wait_for(&self, what: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let text = self.text();
            if ok(&text) {
                return text;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; the screen shows:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
        self.writer.flush().unwrap();
    }

    fn type_text(&mut self, text: &str) {
        for c in text.chars() {
            let mut b = [0u8; 4];
            self.send(c.encode_utf8(&mut b).as_bytes());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Ctrl-Q, then the exit status.
    fn quit(mut self) -> bool {
        self.send(&[0x11]);
        self.exit_status()
    }

    /// SIGTERM, as a system shutdown sends it, then the exit status.
    fn terminate(self) -> bool {
        self.signal("TERM")
    }

    /// Sends signal `name` (`TERM`, `HUP`), then waits for the exit status.
    fn signal(mut self, name: &str) -> bool {
        let pid = self.child.process_id().unwrap();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        self.exit_status()
    }

    fn exit_status(&mut self) -> bool {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "did not quit:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn chat_quit_and_resume() {
    let model = common::default_model_path();
    let model = model.to_str().unwrap();
    let data = tempfile::tempdir().unwrap();
    let args = ["-m", model, "--temperature", "0", "--max-tokens", "24"];
    let minute = Duration::from_secs(60);

    let mut screen = Screen::start(&args, data.path());
    screen.wait_for("the model to load", minute, |t| {
        t.contains("Chat for as long as you like") && t.contains("ready")
    });
    screen.type_text("What is the capital of France? Answer with one word.");
    screen.send(b"\r");
    let shown = screen.wait_for("the reply", minute, |t| {
        t.contains("Assistant") && t.contains("Paris") && t.contains("ready · last")
    });
    assert!(shown.contains("What is the capital of France?"));
    assert!(screen.quit(), "a clean exit after saving");

    let mut resume_args = args.to_vec();
    resume_args.push("--resume");
    let screen = Screen::start(&resume_args, data.path());
    let shown = screen.wait_for("the restored conversation", minute, |t| {
        t.contains("resumed") && t.contains("Paris")
    });
    assert!(shown.contains("What is the capital of France?"));
    assert!(shown.contains("from its KV snapshot"), "{shown}");

    // A second question in the resumed conversation, then SIGTERM: saved before exiting.
    let mut screen = screen;
    screen.type_text("And of Italy?");
    screen.send(b"\r");
    screen.wait_for("the second reply", minute, |t| {
        t.contains("Rome") && t.contains("ready · last")
    });
    assert!(screen.terminate(), "SIGTERM saves and exits cleanly");
    let screen = Screen::start(&resume_args, data.path());
    let shown = screen.wait_for("both exchanges restored", minute, |t| {
        t.contains("resumed") && t.contains("Paris") && t.contains("Rome")
    });
    assert!(shown.contains("And of Italy?"));
    assert!(screen.quit());
}

/// Up on the empty box, the message edited, Enter: the old exchange leaves the screen and the
/// saved conversation, the new one takes its place (and a resume shows only it).
#[test]
fn editing_the_last_message_replaces_the_exchange() {
    let model = common::default_model_path();
    let model = model.to_str().unwrap();
    let data = tempfile::tempdir().unwrap();
    let args = ["-m", model, "--temperature", "0", "--max-tokens", "24"];
    let minute = Duration::from_secs(60);
    let mut screen = Screen::start(&args, data.path());
    screen.wait_for("the model to load", minute, |t| t.contains("ready"));
    let france = "What is the capital of France? Answer with one word.";
    screen.type_text(france);
    screen.send(b"\r");
    screen.wait_for("the reply", minute, |t| {
        t.contains("Paris") && t.contains("ready · last")
    });
    screen.send(b"\x1b[A"); // Up
    screen.wait_for("the message to edit", minute, |t| {
        t.contains("editing your last message")
    });
    for _ in france.chars() {
        screen.send(b"\x7f");
    }
    screen.type_text("What is the capital of Italy? Answer with one word.");
    screen.send(b"\r");
    let shown = screen.wait_for("the new reply", minute, |t| {
        t.contains("Rome") && t.contains("ready · last")
    });
    assert!(
        !shown.contains("France") && !shown.contains("Paris"),
        "{shown}"
    );
    assert!(screen.quit());
    let mut resume_args = args.to_vec();
    resume_args.push("--resume");
    let screen = Screen::start(&resume_args, data.path());
    let shown = screen.wait_for("the conversation restored", minute, |t| {
        t.contains("resumed") && t.contains("Rome")
    });
    assert!(
        !shown.contains("France") && !shown.contains("Paris"),
        "{shown}"
    );
    assert!(screen.quit());
}

/// Not a test of its own: the chat, run inside this test binary when a test starts it in a
/// pseudo-terminal with `LAMBDACHAT_E2E_ARGS` (its arguments, separated by U+001F). This
/// binary's library has the test-only `faults` feature; the `lambdachat` binary never has.
#[test]
fn app_with_faults() {
    let Ok(args) = std::env::var("LAMBDACHAT_E2E_ARGS") else {
        return;
    };
    let args = std::iter::once("lambdachat".to_string())
        .chain(args.split('\u{1f}').map(String::from))
        .map(std::ffi::OsString::from);
    lambdachat::logging::init();
    let code = lambdachat::cli::run(lambdachat::cli::parse_from(args)).unwrap_or(1);
    lambdachat::logging::finish();
    std::process::exit(code);
}

/// A panic in generation — on the worker's thread or in a compute pool's task (injected through
/// the test-only `faults` feature) — ends that turn only: the terminal stays as it was, the
/// chat says what happened and goes on, and the turns before are in the database.
#[test]
fn a_panic_in_generation_keeps_the_terminal_and_the_saved_turns() {
    let model = common::default_model_path();
    let model = model.to_str().unwrap();
    let minute = Duration::from_secs(60);
    for fault in ["turn-panic:2", "pool-panic:2"] {
        let data = tempfile::tempdir().unwrap();
        let args = ["-m", model, "--temperature", "0", "--max-tokens", "8"];
        let mut screen =
            Screen::start_with_faults(&args, data.path(), &[("LAMBDACHAT_FAULT", fault)]);
        screen.wait_for("the model to load", minute, |t| {
            t.contains("Qwen2.5") && t.contains("ready")
        });
        screen.type_text("Say hello.");
        screen.send(b"\r");
        screen.wait_for("the first reply", minute, |t| t.contains("ready · last"));
        screen.type_text("Say goodbye.");
        screen.send(b"\r");
        let shown = screen.wait_for("the panic's report", minute, |t| {
            t.contains("failed unexpectedly")
        });
        assert!(
            shown.contains("Say hello."),
            "{fault}: the chat is still drawn:\n{shown}"
        );
        // The chat goes on.
        screen.type_text("What is 2 + 2?");
        screen.send(b"\r");
        screen.wait_for("a reply after the panic", minute, |t| {
            t.split("What is 2 + 2?")
                .nth(1)
                .is_some_and(|after| after.contains("Assistant"))
                && t.contains("ready · last")
        });
        assert!(screen.quit(), "{fault}: a clean exit");
        let mut resume = args.to_vec();
        resume.push("--resume");
        let screen = Screen::start(&resume, data.path());
        let shown = screen.wait_for("the saved turns", minute, |t| {
            t.contains("resumed") && t.contains("What is 2 + 2?")
        });
        assert!(shown.contains("Say hello."), "{fault}:\n{shown}");
        assert!(screen.quit());
    }
}

/// SIGHUP (the terminal window closed, the SSH connection dropped) in the middle of a reply:
/// the reply stops, the exchange so far is saved, and the process exits cleanly.
#[test]
fn a_hangup_during_a_reply_saves_the_exchange() {
    let model = common::default_model_path();
    let model = model.to_str().unwrap();
    let minute = Duration::from_secs(60);
    let data = tempfile::tempdir().unwrap();
    let args = ["-m", model, "--temperature", "0", "--max-tokens", "400"];
    let mut screen = Screen::start(&args, data.path());
    screen.wait_for("the model to load", minute, |t| t.contains("ready"));
    screen.type_text("Write a long story about a lighthouse keeper.");
    screen.send(b"\r");
    screen.wait_for("the reply to begin", minute, |t| {
        t.contains("replying · ") && !t.contains("replying · 0 tok")
    });
    assert!(screen.signal("HUP"), "SIGHUP saves and exits cleanly");
    let mut resume = args.to_vec();
    resume.push("--resume");
    let screen = Screen::start(&resume, data.path());
    let shown = screen.wait_for("the saved exchange", minute, |t| {
        t.contains("resumed") && t.contains("lighthouse keeper")
    });
    assert!(
        shown.contains("Assistant"),
        "the partial reply is kept:\n{shown}"
    );
    assert!(screen.quit());
}
