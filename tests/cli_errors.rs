//! Bad input through the real binary: each case is a clear one-line error with a non-zero exit,
//! no panic, and no file left that could be taken for a model.

mod common;

use common::cli::{assert_clean_error, lambdachat, run};

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};

#[test]
fn missing_model_path() {
    let out = run(&["ask", "--model", "/nonexistent/model.gguf", "hi"]);
    assert_clean_error(&out, "cannot read /nonexistent/model.gguf");
}

#[test]
fn a_file_that_is_not_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, "just some text, not a model").unwrap();
    let out = run(&["ask", "--model", path.to_str().unwrap(), "hi"]);
    assert_clean_error(&out, "is not a GGUF file");
}

#[test]
fn a_truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.gguf");
    let mut src = std::fs::File::open(common::default_model_path()).unwrap();
    let mut head = vec![0u8; 20 << 20];
    src.read_exact(&mut head).unwrap();
    std::fs::write(&path, head).unwrap();
    let out = run(&["ask", "--model", path.to_str().unwrap(), "hi"]);
    assert_clean_error(&out, "is truncated or corrupt");
}

#[test]
fn an_unsupported_architecture_lists_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bert.gguf");
    let t = QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String("bert".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("w", &t)]).unwrap();
    let out = run(&["ask", "--model", path.to_str().unwrap(), "hi"]);
    assert_clean_error(
        &out,
        "unsupported architecture 'bert' (supported: llama, qwen2, qwen3, gemma3, phi3)",
    );
}

/// A GGUF v3 with one tensor of ggml type 99, which no build knows.
fn write_gguf_with_unknown_type(path: &Path) {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    s(&mut b, "qwen2");
    s(&mut b, "w");
    b.extend(1u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(99u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().div_ceil(32) * 32 + 256, 0);
    std::fs::write(path, b).unwrap();
}

#[test]
fn an_unsupported_quantization_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.gguf");
    write_gguf_with_unknown_type(&path);
    let out = run(&["ask", "--model", path.to_str().unwrap(), "hi"]);
    assert_clean_error(&out, "uses a quantization type this build cannot run");
}

#[test]
fn nonsensical_lambda_parameters_fail_before_loading() {
    let model = ["--model", "/nonexistent.gguf"];
    let cases: &[(&[&str], &str)] = &[
        (&["--n-local", "0"], "n_local must be at least 1"),
        (
            &["--distance-limit", "0"],
            "distance_limit 0 must be between 1 and n_local",
        ),
        (
            &["--n-local", "100", "--distance-limit", "101"],
            "distance_limit 101 must be between 1 and n_local (100)",
        ),
        (
            &["--n-local", "10", "--n-global", "11"],
            "n_global 11 is larger than n_local 10",
        ),
        (&["--n-local=-3"], "invalid value '-3'"),
        (&["--temperature=-1"], "temperature must be a finite number"),
        (&["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (&["--recall", "maybe"], "expected on or off, not `maybe`"),
        (
            &["--recall-blocks", "0"],
            "--recall-blocks must be 1 to 256, not 0",
        ),
        (
            &["--recall-every", "0"],
            "--recall-every must be at least 1",
        ),
        (
            &["--recall-cache-mib", "5000"],
            "--recall-cache-mib must be at most 4096, not 5000",
        ),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["ask"];
        args.extend_from_slice(&model);
        args.extend_from_slice(flags);
        args.push("hi");
        assert_clean_error(&run(&args), needle);
    }
}

#[test]
fn a_prompt_on_stdin_that_is_not_utf8() {
    let mut child = lambdachat()
        .args(["ask", "--model", "/nonexistent.gguf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"caf\xe9 au lait")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_clean_error(&out, "not valid UTF-8 (invalid byte at offset 3)");
}

/// A fetch that cannot complete (no Hub, no pip) leaves no model file behind, and a half
/// download left by an earlier interrupted run is never taken for the model.
#[test]
fn an_interrupted_default_model_download_is_never_used() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let name = lambdachat::fetch::DEFAULT_MODEL.file_name;
    std::fs::write(models.join(format!("{name}.partial")), vec![0u8; 1000]).unwrap();
    let out = lambdachat()
        .args(["ask", "hi"])
        .env("LAMBDACHAT_DATA_DIR", dir.path())
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_clean_error(&out, "fetching the default model");
    // Nothing is left behind: no model, no half download, old or new.
    let left: Vec<_> = std::fs::read_dir(&models).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Ctrl-C during generation stops cleanly: exit 130, and what was generated is printed.
#[test]
fn ctrl_c_during_generation_keeps_the_text() {
    let model = common::default_model_path();
    let mut child = lambdachat()
        .args([
            "ask",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "4000",
        ])
        .arg("Write a very long story about a lighthouse keeper.")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let mut stdout = child.stdout.take().unwrap();
    let start = Instant::now();
    let mut text = Vec::new();
    let mut buf = [0u8; 256];
    let mut signalled = false;
    loop {
        let n = stdout.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
        if !signalled && text.len() > 40 {
            signalled = true;
            Command::new("kill").args(["-INT", &pid]).status().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no end after Ctrl-C"
        );
    }
    let status = child.wait().unwrap();
    assert!(signalled, "the model wrote too little to interrupt");
    assert_eq!(status.code(), Some(130));
    let text = String::from_utf8(text).unwrap();
    assert!(text.trim().len() > 20, "generated text lost: {text:?}");
}

fn with_config(text: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    lambdachat()
        .args(args)
        .env("LAMBDACHAT_CONFIG", &path)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn an_invalid_config_names_line_and_column_and_nothing_starts() {
    let out = with_config("[lambda]\nn_global = 4\nn_locl = 5\n", &["ask", "hi"]);
    assert_clean_error(&out, "config.toml:3:1: unknown field `n_locl`");
    let out = with_config("[keymap]\nsend = \"ctrl+enterr\"\n", &["chat", "--plain"]);
    assert_clean_error(&out, "config.toml:2:8: unknown key \"ctrl+enterr\"");
    let out = with_config("[theme]\nuser = \"blurple\"\n", &["ask", "hi"]);
    assert_clean_error(&out, "config.toml:2:8: \"blurple\" is not a colour");
    let out = with_config("[lambda]\nkv_type = \"q8\"\n", &["ask", "hi"]);
    assert_clean_error(
        &out,
        "config.toml:2:11: kv_type is \"q8\"; expected one of f32, f16",
    );
    let out = lambdachat()
        .args(["ask", "hi"])
        .env("LAMBDACHAT_CONFIG", "/nonexistent/config.toml")
        .output()
        .unwrap();
    assert_clean_error(&out, "config file /nonexistent/config.toml does not exist");
}

#[test]
fn flags_beat_the_config_file() {
    // The file's top_p is invalid; the flag replaces it, so the run gets as far as the model.
    let config = "[sampling]\ntop_p = 2.0\n";
    let out = with_config(config, &["ask", "--model", "/nonexistent/m.gguf", "hi"]);
    assert_clean_error(&out, "top_p must be in (0, 1], got 2");
    let args = [
        "ask",
        "--top-p",
        "0.5",
        "--model",
        "/nonexistent/m.gguf",
        "hi",
    ];
    let out = with_config(config, &args);
    assert_clean_error(&out, "cannot read /nonexistent/m.gguf");
    // A bad kv_type in the file is not looked at when the flag sets one.
    let config = "[lambda]\nkv_type = \"q8\"\n";
    let args = [
        "ask",
        "--kv-type",
        "f16",
        "--model",
        "/nonexistent/m.gguf",
        "hi",
    ];
    assert_clean_error(
        &with_config(config, &args),
        "cannot read /nonexistent/m.gguf",
    );
    // And the file's model is used when no flag names one.
    let out = with_config(
        "model = \"/nonexistent/from-config.gguf\"\n",
        &["ask", "hi"],
    );
    assert_clean_error(&out, "cannot read /nonexistent/from-config.gguf");
}

#[test]
fn resume_takes_a_number() {
    let out = run(&["chat", "--resume", "yesterday"]);
    assert_clean_error(&out, "--resume takes a session id");
}

#[test]
fn sessions_of_an_empty_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let sessions = |args: &[&str]| {
        lambdachat()
            .arg("sessions")
            .args(args)
            .env("LAMBDACHAT_DATA_DIR", dir.path())
            .output()
            .unwrap()
    };
    let out = sessions(&[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no saved conversations yet"));
    assert_clean_error(&sessions(&["delete", "7"]), "session 7 does not exist");
    assert_clean_error(&sessions(&["export", "7"]), "session 7 does not exist");
}

#[test]
fn a_gpu_device_in_a_cpu_build_is_refused_before_loading() {
    assert_clean_error(
        &run(&[
            "ask",
            "--device",
            "cuda",
            "--model",
            "/nonexistent.gguf",
            "hi",
        ]),
        "--device cuda:0: this lambdachat was built without cuda support (build it with `--features cuda`)",
    );
    let out = run(&["ask", "--device", "tpu", "hi"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use auto, cpu, cuda, cuda:N or metal"));
}

/// A server reachable from other machines never starts without a key, and says how to give
/// one, before any model is fetched or loaded.
#[test]
fn an_exposed_server_without_a_key_does_not_start() {
    let out = lambdachat()
        .args(["serve", "--host", "0.0.0.0", "--model", "/nonexistent.gguf"])
        .env_remove("LAMBDACHAT_API_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_clean_error(&out, "--api-key");
}

#[test]
fn connect_needs_the_full_screen_chat() {
    // Piped (no terminal), as with --plain: the remote chat is full-screen only.
    let out = run(&["chat", "--connect", "http://127.0.0.1:9", "--plain"]);
    assert_clean_error(&out, "--connect needs the full-screen chat");
}
