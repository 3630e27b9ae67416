//! Crash safety of saved sessions: a child process saves a growing conversation with its KV
//! snapshot in a loop and is killed (SIGKILL) at arbitrary moments. After every kill the
//! database must pass SQLite's integrity check and hold one consistent version: messages,
//! tokens and snapshot from the same save, never a mix.

use std::process::Command;
use std::time::Duration;

use lambdachat::attention::LambdaParams;
use lambdachat::chat::{Message, Role};
use lambdachat::session::SessionState;
use lambdachat::store::Store;

const WRITER_ENV: &str = "LAMBDACHAT_TEST_CRASH_WRITER";

fn params() -> LambdaParams {
    LambdaParams::new(4, 64, None).unwrap()
}

/// Save number `n`: `n` messages, `100 n` tokens, a 2 MiB snapshot filled with `n`.
fn version(n: usize) -> (SessionState, Vec<u8>) {
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(Role::User, format!("m{i}")))
        .collect();
    let state = SessionState {
        spans: vec![0..0; n],
        messages,
        tokens: vec![n as u32; 100 * n],
        offsets: vec![0; 100 * n],
        ..SessionState::default()
    };
    (state, vec![n as u8; 2 << 20])
}

fn writer(db: &str) -> ! {
    let mut store = Store::open(db.as_ref()).unwrap();
    let id = match store.latest().unwrap() {
        Some(id) => id,
        None => store.create("crash", "m", params()).unwrap(),
    };
    for n in 1.. {
        let (state, snapshot) = version(n % 250 + 1);
        let tokens = state.tokens.len() as u64;
        store
            .save(id, params(), &state, Some((tokens, &snapshot)))
            .unwrap();
    }
    unreachable!()
}

#[test]
fn killing_a_saving_process_never_corrupts_the_database() {
    if let Ok(db) = std::env::var(WRITER_ENV) {
        writer(&db);
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sessions.db");
    let exe = std::env::current_exe().unwrap();
    let mut versions = Vec::new();
    for round in 0..8u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "killing_a_saving_process_never_corrupts_the_database",
            ])
            .env(WRITER_ENV, &db)
            .spawn()
            .unwrap();
        // Kill at a different point of the save cycle each round.
        std::thread::sleep(Duration::from_millis(150 + 37 * round));
        child.kill().unwrap();
        child.wait().unwrap();

        let check = rusqlite::Connection::open(&db).unwrap();
        let integrity: String = check
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok", "round {round}");
        drop(check);
        let store = Store::open(&db).unwrap();
        let Some(id) = store.latest().unwrap() else {
            continue; // killed before the first commit
        };
        let saved = store.load(id).unwrap();
        let n = saved.state.messages.len();
        if n == 0 {
            continue;
        }
        assert_eq!(saved.state.tokens, vec![n as u32; 100 * n], "round {round}");
        let (tokens, bytes) = saved.snapshot.expect("saved with its snapshot");
        assert_eq!(
            tokens as usize,
            100 * n,
            "snapshot and messages from one save"
        );
        assert!(bytes.len() == 2 << 20 && bytes.iter().all(|b| *b == n as u8));
        versions.push(n);
    }
    // The kills landed while saves were going on, not before the first one.
    assert!(versions.len() >= 4, "saved versions seen: {versions:?}");
}
