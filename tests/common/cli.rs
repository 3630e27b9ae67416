//! Running the real binary in tests: no network, no user config, and the shape of a clean error.

use std::process::{Command, Output, Stdio};

pub fn lambdachat() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lambdachat"));
    // Never let a test reach for the network: the Hub probe fails at once.
    c.env("HF_ENDPOINT", "http://127.0.0.1:9");
    // Nor read the user's own config file (tests that need one set their own).
    c.env("LAMBDACHAT_CONFIG", "/dev/null");
    c
}

pub fn run(args: &[&str]) -> Output {
    lambdachat()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Exit ≠ 0, no panic, and the error is one line containing `needle`.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line: {stderr}");
    assert!(
        errors[0].contains(needle),
        "missing {needle:?} in: {stderr}"
    );
}
