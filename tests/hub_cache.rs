//! `hf:` references against a directory laid out like the Hugging Face cache, with the Hub
//! unreachable: a cached repo opens offline (safetensors directory or GGUF file), a missing one
//! is a clear error naming the repo and the file, and `lambdachat models` lists, locates and
//! removes cached repos.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::cli::{assert_clean_error, lambdachat};
use common::tiny::write_gguf;

/// `$HF_HOME` with `org/tiny` (a converted safetensors directory) and `org/tiny-gguf` (one GGUF
/// file), each at revision `main` → commit `c0ffee`.
fn hf_home() -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let snapshot = |repo: &str| -> PathBuf {
        let dir = home.path().join("hub").join(format!("models--org--{repo}"));
        std::fs::create_dir_all(dir.join("refs")).unwrap();
        std::fs::write(dir.join("refs/main"), "c0ffee").unwrap();
        std::fs::create_dir_all(dir.join("blobs")).unwrap();
        dir.join("snapshots/c0ffee")
    };
    let gguf_dir = snapshot("tiny-gguf");
    std::fs::create_dir_all(&gguf_dir).unwrap();
    write_gguf(&gguf_dir.join("tiny.gguf"), "qwen3");
    lambdachat::convert::convert_gguf(&gguf_dir.join("tiny.gguf"), &snapshot("tiny"), None)
        .unwrap();
    home
}

fn run(home: &Path, args: &[&str]) -> Output {
    lambdachat()
        .env("HF_HOME", home)
        .env("LAMBDACHAT_DATA_DIR", home.join("data"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn cached_repos_open_offline() {
    let home = hf_home();
    for model in [
        "hf:org/tiny",
        "hf:org/tiny@c0ffee",
        "hf:org/tiny-gguf",
        "hf:org/tiny-gguf:tiny.gguf",
    ] {
        let out = stdout(&run(home.path(), &["inspect", "--model", model]));
        assert!(out.contains("architecture    qwen3"), "{model}: {out}");
        if !model.contains("gguf") {
            assert!(out.contains("name            org/tiny"), "{out}");
        }
    }
}

#[test]
fn missing_repos_files_and_revisions_are_named() {
    let home = hf_home();
    let h = home.path();
    assert_clean_error(
        &run(h, &["inspect", "--model", "hf:org/absent"]),
        "hf:org/absent: config.json is not in the Hugging Face cache",
    );
    assert_clean_error(
        &run(h, &["inspect", "--model", "hf:org/tiny:nope.gguf"]),
        "hf:org/tiny: nope.gguf is not in the Hugging Face cache",
    );
    assert_clean_error(
        &run(h, &["ask", "--model", "hf:org/tiny@v2", "hi"]),
        "hf:org/tiny: config.json is not in the Hugging Face cache",
    );
    assert_clean_error(
        &run(h, &["ask", "--model", "hf:tiny", "hi"]),
        "'hf:tiny' is not a model reference: write hf:ORG/REPO[@REVISION][:FILE]",
    );
}

#[test]
fn models_lists_locates_and_removes_cached_repos() {
    let home = hf_home();
    let h = home.path();
    let list = stdout(&run(h, &["models", "list"]));
    assert!(list.contains("hf:org/tiny "), "{list}");
    assert!(list.contains("hf:org/tiny-gguf"), "{list}");
    let path = stdout(&run(h, &["models", "path", "hf:org/tiny"]));
    assert!(
        path.trim().ends_with("models--org--tiny/snapshots/c0ffee"),
        "{path}"
    );
    stdout(&run(h, &["models", "rm", "hf:org/tiny"]));
    assert_clean_error(
        &run(h, &["models", "path", "hf:org/tiny"]),
        "hf:org/tiny is not in the Hugging Face cache",
    );
    assert!(!stdout(&run(h, &["models"])).contains("hf:org/tiny "));
    assert_clean_error(
        &run(h, &["models", "rm", "nothing-here"]),
        "no model 'nothing-here'",
    );
}
