//! `hf:` downloads against a small Hub stand-in on localhost (the real Hub is not reachable
//! here): the repo listing, `resolve/` with the headers hf-hub reads (commit, etag, size by
//! range), files fetched once into `$HF_HOME`, then opened offline from the cache.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::cli::{assert_clean_error, lambdachat};
use common::tiny::write_gguf;
use sha2::{Digest, Sha256};

/// Serves `repos` (repo id → file name → bytes) the way the Hub's HTTP API does; counts the
/// file bodies it sent.
fn serve(repos: HashMap<String, HashMap<String, Vec<u8>>>) -> (u16, Arc<Mutex<usize>>) {
    serve_stalling(repos, Arc::new(AtomicBool::new(false)))
}

/// As [`serve`]; while `stall` is set, a file body stops after its first half and the
/// connection is held open without another byte.
fn serve_stalling(
    repos: HashMap<String, HashMap<String, Vec<u8>>>,
    stall: Arc<AtomicBool>,
) -> (u16, Arc<Mutex<usize>>) {
    let mut held = Vec::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(0));
    let sent = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let mut range_start = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(r) = lower.strip_prefix("range: bytes=") {
                    range_start = Some(r.trim().to_string());
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let head = |status: &str, length: usize, headers: &str| {
                format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {length}\r\nConnection: close\r\n{headers}\r\n"
                )
            };
            let respond =
                |stream: &mut std::net::TcpStream, status: &str, headers: &str, body: &[u8]| {
                    let _ = stream.write_all(head(status, body.len(), headers).as_bytes());
                    let _ = stream.write_all(body);
                };
            // /api/models/ORG/REPO/revision/main
            if let Some(rest) = path.strip_prefix("/api/models/") {
                let repo = rest.split("/revision/").next().unwrap_or("");
                match repos.get(repo) {
                    Some(files) => {
                        let siblings: Vec<_> = files
                            .keys()
                            .map(|f| serde_json::json!({ "rfilename": f }))
                            .collect();
                        let body = serde_json::json!({"siblings": siblings, "sha": "c0ffee"});
                        respond(
                            &mut stream,
                            "200 OK",
                            "Content-Type: application/json\r\n",
                            body.to_string().as_bytes(),
                        );
                    }
                    None => respond(&mut stream, "404 Not Found", "", b"{}"),
                }
                continue;
            }
            // /ORG/REPO/resolve/main/FILE
            let found = path.split_once("/resolve/").and_then(|(repo, rest)| {
                let file = rest.split_once('/')?.1;
                repos.get(repo.trim_start_matches('/'))?.get(file)
            });
            let Some(data) = found else {
                respond(&mut stream, "404 Not Found", "", b"");
                continue;
            };
            // The Hub's etag is the content hash; hf-hub names cache blobs by it.
            let etag: String = Sha256::digest(data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let (start, end) = match range_start.as_deref() {
                Some("0-0") => (0, 1.min(data.len())),
                Some(r) => (r.trim_end_matches('-').parse().unwrap_or(0), data.len()),
                None => (0, data.len()),
            };
            if end - start > 1 {
                *sent.lock().unwrap() += 1;
            }
            let headers = format!(
                "ETag: \"{etag}\"\r\nX-Repo-Commit: c0ffee\r\nContent-Range: bytes {start}-{}/{}\r\n",
                end.max(1) - 1,
                data.len()
            );
            let body = &data[start..end];
            if body.len() > 1 && stall.load(Ordering::SeqCst) {
                // The head promises the whole range; half of it comes, then nothing.
                let head = head("206 Partial Content", body.len(), &headers);
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body[..body.len() / 2]);
                let _ = stream.flush();
                held.push(stream);
                continue;
            }
            respond(&mut stream, "206 Partial Content", &headers, body);
        }
    });
    (port, bodies)
}

fn files_of(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let mut bytes = Vec::new();
            std::fs::File::open(e.path())
                .unwrap()
                .read_to_end(&mut bytes)
                .unwrap();
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

fn run(home: &Path, endpoint: &str, args: &[&str]) -> Output {
    lambdachat()
        .env("HF_HOME", home)
        .env("HF_ENDPOINT", endpoint)
        .env("LAMBDACHAT_DATA_DIR", home.join("data"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_sharded_repo_downloads_once_then_opens_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    write_gguf(&gguf, "gemma3");
    let model = tmp.path().join("model");
    let report = lambdachat::convert::convert_gguf(&gguf, &model, Some(1 << 16)).unwrap();
    assert!(report.shards > 1);
    let mut two_ggufs = HashMap::new();
    two_ggufs.insert("a.gguf".to_string(), b"x".to_vec());
    two_ggufs.insert("b.gguf".to_string(), b"y".to_vec());
    // A repository whose index sends a shard outside the cache.
    let mut evil = files_of(&model);
    evil.insert(
        "model.safetensors.index.json".to_string(),
        br#"{"weight_map": {"w": "../../../../escaped.safetensors"}}"#.to_vec(),
    );
    let repos = HashMap::from([
        ("org/tiny".to_string(), files_of(&model)),
        ("org/two".to_string(), two_ggufs),
        ("org/evil".to_string(), evil),
    ]);
    let (port, bodies) = serve(repos);
    let endpoint = format!("http://127.0.0.1:{port}");
    let home = tmp.path().join("hf");

    let out = run(&home, &endpoint, &["models", "pull", "hf:org/tiny"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("downloading model-00001-of-"), "{stderr}");
    assert!(stderr.contains("100%"), "{stderr}");
    let fetched = *bodies.lock().unwrap();
    assert_eq!(fetched, files_of(&model).len(), "every file once");

    // Offline now: the Hub address refuses connections, the cache answers.
    let out = run(
        &home,
        "http://127.0.0.1:9",
        &["inspect", "--model", "hf:org/tiny"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("architecture    gemma3"));
    // A second pull downloads nothing.
    assert!(
        run(&home, &endpoint, &["models", "pull", "hf:org/tiny"])
            .status
            .success()
    );
    assert_eq!(*bodies.lock().unwrap(), fetched);

    assert_clean_error(
        &run(&home, &endpoint, &["inspect", "--model", "hf:org/two"]),
        "hf:org/two holds several GGUF files; name one: a.gguf, b.gguf",
    );
    assert_clean_error(
        &run(
            &home,
            &endpoint,
            &["inspect", "--model", "hf:org/tiny:absent.gguf"],
        ),
        "hf:org/tiny: absent.gguf:",
    );
    assert_clean_error(
        &run(&home, &endpoint, &["inspect", "--model", "hf:org/nowhere"]),
        "(no such repo, revision or file)",
    );
    assert_clean_error(
        &run(&home, &endpoint, &["inspect", "--model", "hf:org/evil"]),
        "hf:org/evil: '../../../../escaped.safetensors' is not a file name inside the repository",
    );
    assert!(!tmp.path().join("escaped.safetensors").exists());
    assert_clean_error(
        &run(
            &home,
            &endpoint,
            &["inspect", "--model", "hf:org/tiny:../../escaped.gguf"],
        ),
        "is not a model reference",
    );
}

/// A Hub that accepts the connection and then sends nothing: the download gives up after the
/// stall limit with a clear error, instead of hanging forever.
#[test]
fn a_stalled_download_gives_up() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream); // never answered
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let start = std::time::Instant::now();
    let out = lambdachat()
        .env("HF_HOME", tmp.path().join("hf"))
        .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("LAMBDACHAT_DATA_DIR", tmp.path().join("data"))
        .env("LAMBDACHAT_HUB_STALL_SECS", "2")
        .args(["inspect", "--model", "hf:org/slow:model.gguf"])
        .output()
        .unwrap();
    assert_clean_error(&out, "the download stalled (no data for 2 s");
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
}

/// SIGKILL while a model downloads from the Hub (half its bytes arrived, the rest never
/// comes): nothing in the cache's snapshot names the half file, so the next run does not take
/// it for the model; that run downloads the whole file and opens it.
#[test]
fn a_download_killed_halfway_is_never_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    write_gguf(&gguf, "qwen2");
    let bytes = std::fs::read(&gguf).unwrap();
    let repos = HashMap::from([(
        "org/tiny".to_string(),
        HashMap::from([("model.gguf".to_string(), bytes.clone())]),
    )]);
    let stall = Arc::new(AtomicBool::new(true));
    let (port, _) = serve_stalling(repos, stall.clone());
    let endpoint = format!("http://127.0.0.1:{port}");
    let home = tmp.path().join("hf");
    let mut child = lambdachat()
        .env("HF_HOME", &home)
        .env("HF_ENDPOINT", &endpoint)
        .env("LAMBDACHAT_DATA_DIR", home.join("data"))
        .args(["inspect", "--model", "hf:org/tiny:model.gguf"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first half is on disk, then kill: no handler runs.
    let repo = home.join("hub").join("models--org--tiny");
    let start = std::time::Instant::now();
    let arrived = || {
        let blobs = repo.join("blobs");
        std::fs::read_dir(blobs)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.metadata()
                    .is_ok_and(|m| m.len() >= bytes.len() as u64 / 2)
            })
    };
    while !arrived() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "the first half never arrived"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the download ended early"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let snapshot = repo.join("snapshots").join("c0ffee").join("model.gguf");
    assert!(!snapshot.exists(), "the half file is named as the model");

    stall.store(false, Ordering::SeqCst);
    let out = run(
        &home,
        &endpoint,
        &["inspect", "--model", "hf:org/tiny:model.gguf"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&snapshot).unwrap(),
        bytes,
        "the whole file, fetched again"
    );
}
