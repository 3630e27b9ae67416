//! Shell integration: completion scripts and the man page, printed by the binary without a
//! config file (a broken one does not stop them).

mod common;

use common::cli::lambdachat;

fn stdout_of(args: &[&str]) -> String {
    let out = lambdachat()
        .args(args)
        .env("LAMBDACHAT_CONFIG", "/nonexistent/dir/broken.toml")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completion_scripts_know_the_commands_and_bash_can_read_its_own() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&["completions", shell]);
        for command in ["serve", "ask", "sessions", "n-local"] {
            assert!(script.contains(command), "{shell} lacks {command}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lambdachat.bash");
    std::fs::write(&path, stdout_of(&["completions", "bash"])).unwrap();
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let unknown = lambdachat().args(["completions", "tcsh"]).output().unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("possible values"));
}

#[test]
fn the_man_page_is_roff_naming_every_command() {
    let page = stdout_of(&["man"]);
    assert!(
        page.contains(".TH lambdachat 1"),
        "{}",
        &page[..200.min(page.len())]
    );
    for command in ["serve", "ask", "bench", "completions"] {
        assert!(page.contains(command), "the man page lacks {command}");
    }
}
