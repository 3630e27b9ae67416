//! The real binary's `serve`, driven by OpenAI's own Python client (tests/clients/openai_client.py):
//! streaming, non-streaming, a continued conversation, errors, 429 under load and a client that
//! disconnects. The client is installed once, pinned, into a virtualenv in the data dir (outside
//! the repository), as the default model is fetched: python3 with venv and pip is needed, as it
//! is for the model.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::cli::lambdachat;

const OPENAI: &str = "openai==3.60.0";

/// The virtualenv's python, made when missing.
fn python() -> PathBuf {
    let venv = lambdachat::fetch::data_dir()
        .unwrap()
        .join("test-clients")
        .join(OPENAI.replace("==", "-"));
    let python = venv.join("bin").join("python");
    if python.exists() {
        return python;
    }
    let partial = venv.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let run = |c: &mut Command| {
        let out = c.output().expect("python3 is needed for this test");
        assert!(
            out.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&partial));
    run(Command::new(partial.join("bin").join("pip")).args([
        "install",
        "--quiet",
        "--only-binary=:all:",
        OPENAI,
    ]));
    // The venv's scripts name its folder: it is used where it was made, then moved whole.
    std::fs::rename(&partial, &venv).unwrap();
    let _ = std::fs::remove_dir_all(&partial);
    python
}

/// `lambdachat serve` on the tiny model on a free port, and its base URL.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(model: &Path, extra: &[&str]) -> (Server, String) {
    let mut child = lambdachat()
        .arg("serve")
        .arg("--model")
        .arg(model)
        .args([
            "--port",
            "0",
            "--temperature",
            "0",
            "--n-local",
            "32",
            "--n-global",
            "4",
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("the server printed its address")
            .unwrap();
        if let Some(at) = line.find("http://") {
            break line[at..].split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep reading its stderr, so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (server, url)
}

fn client(python: &Path, mode: &str, url: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .args([mode, url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{mode}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn openais_python_client_talks_to_lambdachat_serve() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    common::tiny::write_gguf(&model, "qwen2");
    let (_server, url) = serve(&model, &[]);
    client(&python, "basics", &url);
    let (_busy, url) = serve(&model, &["--queue", "0", "--max-tokens", "1000000"]);
    client(&python, "load", &url);
}
