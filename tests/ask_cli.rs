//! `lambdachat ask` as a script uses it, on the tiny model: `--json` prints one object, and text
//! piped beside a prompt is appended to it as a fenced block.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::cli::lambdachat;
use serde_json::Value;

/// `lambdachat` with `args`, its stdin, stdout and stderr piped; the child and its stdin.
fn spawn_piped(args: &[&std::ffi::OsStr]) -> (std::process::Child, std::process::ChildStdin) {
    let mut child = lambdachat()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = child.stdin.take().unwrap();
    (child, input)
}

fn ask(model: &std::path::Path, prompt: &str, stdin: Option<&[u8]>) -> (Value, String) {
    let fixed = [
        "ask",
        "--json",
        "--temperature",
        "0",
        "--max-tokens",
        "3",
        "--model",
    ];
    let mut args: Vec<&std::ffi::OsStr> = fixed.iter().map(std::ffi::OsStr::new).collect();
    args.push(model.as_os_str());
    args.push(std::ffi::OsStr::new(prompt));
    let (child, mut input) = spawn_piped(&args);
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one line of JSON: {stdout}");
    (serde_json::from_str(&stdout).unwrap(), stderr)
}

#[test]
fn json_output_and_piped_text_beside_a_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    common::tiny::write_gguf(&model, "qwen2");
    let (alone, _) = ask(&model, "review this", None);
    assert!(alone["reply"].is_string());
    assert!(["end_of_turn", "length"].contains(&alone["stop"].as_str().unwrap()));
    let usage = &alone["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 3);
    assert!(alone["timings"]["decode_s"].is_number());
    let alone_prompt = usage["prompt_tokens"].as_u64().unwrap();
    let diff = b"--- a/x\n+++ b/x\n@@ -1 +1 @@\n-old line\n+new line\n";
    let (with_diff, _) = ask(&model, "review this", Some(diff));
    let with_prompt = with_diff["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        with_prompt > alone_prompt + 10,
        "the diff is in the prompt: {with_prompt} against {alone_prompt}"
    );
    // Piped whitespace adds nothing.
    let (blank, _) = ask(&model, "review this", Some(b"\n  \n"));
    assert_eq!(blank["usage"]["prompt_tokens"], usage["prompt_tokens"]);
    // Too much on stdin is refused before anything loads.
    let args = ["ask", "--model", "/nonexistent.gguf", "hi"].map(std::ffi::OsStr::new);
    let (child, mut input) = spawn_piped(&args);
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..9 {
            if input.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    common::cli::assert_clean_error(&out, "more than 8 MiB");
}

/// `ask --raw` on Gemma 3 270M (a base model with no chat template) continues the text itself:
/// the BOS and the prompt's own tokens only, and a sensible continuation where the borrowed turn
/// format made the model answer "devenue".
#[test]
fn raw_mode_continues_a_base_models_text() {
    let gemma = lambdachat::fetch::ensure(&lambdachat::fetch::GEMMA3_270M).unwrap();
    let run = |raw: bool| {
        let mut cmd = lambdachat();
        cmd.args(["ask", "--json", "--temperature", "0", "--max-tokens", "6"]);
        if raw {
            cmd.arg("--raw");
        }
        let out = cmd
            .arg("--model")
            .arg(&gemma)
            .arg("The capital of France is")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let raw = run(true);
    // <bos> The capital of France is
    assert_eq!(raw["usage"]["prompt_tokens"], 6, "{raw}");
    let reply = raw["reply"].as_str().unwrap();
    assert!(reply.starts_with(" the capital of"), "{reply:?}");
    let chat = run(false);
    assert!(
        chat["usage"]["prompt_tokens"].as_u64().unwrap() > 6,
        "{chat}"
    );
}
