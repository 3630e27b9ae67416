//! Faults through the real binary: a process killed (SIGKILL: no handler runs, nothing is
//! flushed) in the middle of writing a converted model or an evaluation's results never leaves
//! a file that a later run could take for a whole one, and what it left is cleaned by the next
//! run; a disk that fills up while they write fails them with a clear error and leaves nothing;
//! stdin closing while a reply is written ends the chat after that reply.
//! (Killing a saving chat: tests/store_crash.rs; a hangup in the TUI: tests/e2e_tui.rs.)

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cli::{assert_clean_error, lambdachat};
use common::tiny::write_gguf;

/// Waits up to `after` for `child` to finish by itself; kills it (SIGKILL) if it has not.
/// Returns whether it was killed.
fn kill_after(mut child: Child, after: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_killed_conversion_leaves_nothing_to_take_and_is_cleaned_up() {
    let model = common::default_model_path();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("converted");
    let convert = || {
        lambdachat()
            .args(["convert", model.to_str().unwrap(), out.to_str().unwrap()])
            .args(["--shard-mib", "256"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    for after_ms in [1500, 3500] {
        if kill_after(convert(), Duration::from_millis(after_ms)) {
            kills += 1;
            assert!(
                !out.exists(),
                "a conversion killed after {after_ms} ms left {}",
                out.display()
            );
        }
    }
    assert!(kills > 0, "every conversion finished before its kill");
    let leftovers = names(dir.path());
    assert!(
        leftovers.iter().any(|n| n.contains(".partial-")),
        "the killed runs left their staging directories: {leftovers:?}"
    );
    let status = convert().wait().unwrap();
    assert!(status.success());
    assert_eq!(
        names(dir.path()),
        ["converted"],
        "the finished run removed what the killed ones left"
    );
    let files = names(&out);
    for needed in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    ] {
        assert!(
            files.iter().any(|f| f == needed),
            "{needed} missing: {files:?}"
        );
    }
}

#[test]
fn a_killed_evaluation_never_leaves_a_partial_result() {
    let model = common::default_model_path();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "In the beginning was the word. ".repeat(200)).unwrap();
    let eval = || {
        lambdachat()
            .args(["eval", "ppl", "-m", model.to_str().unwrap()])
            .args([
                "--text",
                text.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(["--lengths", "128,512", "--modes", "vanilla,lambda"])
            .args(["--n-global", "4", "--n-local", "128"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    for after_ms in [300, 900, 1800] {
        kill_after(eval(), Duration::from_millis(after_ms));
        if out.exists() {
            for name in names(&out) {
                assert!(
                    !name.ends_with(".partial"),
                    "a killed evaluation's staging file is in place: {name}"
                );
            }
        }
    }
    let done = eval().wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let files = names(&out);
    assert!(
        files.iter().all(|n| !n.contains(".partial")),
        "what killed runs left was cleaned: {files:?}"
    );
    let csv = files.iter().find(|n| n.ends_with(".csv")).expect("a CSV");
    let rows = std::fs::read_to_string(out.join(csv)).unwrap();
    assert!(rows.lines().count() > 1, "{rows}");
}

/// `chat --plain` reads prompts from a pipe; the pipe closes while the reply is written: the
/// reply is finished, its counters are printed, and the chat exits with success.
#[test]
fn stdin_closing_during_a_reply_ends_the_chat_after_it() {
    let model = common::default_model_path();
    let mut child = lambdachat()
        .args(["chat", "--plain", "-m", model.to_str().unwrap()])
        .args(["--temperature", "0", "--max-tokens", "12"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Count from one to ten.\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.trim().is_empty(), "the reply was written: {stderr}");
    assert!(
        stderr.contains("tokens ·"),
        "its counters were printed: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Runs the binary with `args` on a disk with `kib` KiB free, as far as its writes can tell: a
/// write past the limit fails (EFBIG, with SIGXFSZ ignored) where a full disk fails with
/// ENOSPC; both reach the same error path.
fn on_a_disk_of(kib: u64, args: &[&str]) -> Output {
    let bin = lambdachat();
    Command::new("bash")
        .arg("-c")
        .arg(r#"trap "" XFSZ; ulimit -f "$0"; exec "$@""#)
        .arg(kib.to_string())
        .arg(bin.get_program())
        .args(args)
        .envs(bin.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_disk_filling_up_during_a_conversion_fails_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, "qwen2");
    let out = dir.path().join("converted");
    let args = ["convert", gguf.to_str().unwrap(), out.to_str().unwrap()];
    let full = on_a_disk_of(64, &args);
    assert_clean_error(&full, "File too large");
    assert!(!out.exists(), "a failed conversion left {}", out.display());
    assert_eq!(names(dir.path()), ["tiny.gguf"], "its staging was removed");
    let room = on_a_disk_of(1 << 20, &args);
    assert!(
        room.status.success(),
        "{}",
        String::from_utf8_lossy(&room.stderr)
    );
}

#[test]
fn a_disk_filling_up_while_an_evaluation_writes_fails_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, "qwen2");
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "In the beginning was the word. ".repeat(100)).unwrap();
    let out = dir.path().join("results");
    let args = [
        "eval",
        "ppl",
        "-m",
        gguf.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--lengths",
        "64",
        "--modes",
        "vanilla",
    ];
    let full = on_a_disk_of(1, &args);
    assert_clean_error(&full, "File too large");
    for name in names(&out) {
        assert!(
            !name.contains(".partial"),
            "a staging file was left: {name}"
        );
    }
    let room = on_a_disk_of(1 << 20, &args);
    assert!(
        room.status.success(),
        "{}",
        String::from_utf8_lossy(&room.stderr)
    );
}
