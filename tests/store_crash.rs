//! Crash safety of saved sessions: a child process saves a growing conversation turn by turn —
//! its messages and tokens, then its cache's new slots in the KV file — and is killed (SIGKILL)
//! at arbitrary moments. After every kill the database must pass SQLite's integrity check and
//! hold one consistent save (the head, the messages and the tokens of the same turn), and the
//! KV file must give back a whole cache no more than one turn behind, equal to the cache of the
//! same tokens fed afresh.

use std::process::Command;
use std::time::Duration;

use candle_core::Device;
use lambdachat::attention::{
    AttentionCache, AttentionInput, HostCache, KvCache, LambdaParams, LayerGeometry, Rope,
    RopeStyle,
};
use lambdachat::chat::Role;
use lambdachat::session::{Batch, History, MessageRecord, SavedKv, SessionHead, TokenRun};
use lambdachat::store::Store;

const WRITER_ENV: &str = "LAMBDACHAT_TEST_CRASH_WRITER";
/// Tokens per turn.
const TURN: u64 = 100;

fn params() -> LambdaParams {
    LambdaParams::new(4, 256, None).unwrap()
}

fn geometry() -> Vec<LayerGeometry> {
    vec![LayerGeometry::full(params(), 2, 64); 4]
}

/// Feeds positions `from..to` of a fixed stream of keys and values.
fn feed(cache: &mut HostCache, from: u64, to: u64) {
    let rope = Rope::new(64, 10_000.0, RopeStyle::Neox);
    for t in from..to {
        let x: Vec<f32> = (0..128)
            .map(|i| ((t * 31 + i) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let input = AttentionInput {
            q: &x,
            k: &x,
            v: &x,
            n_tokens: 1,
            n_heads: 2,
            rope: &rope,
            scale: 0.125,
        };
        for layer in 0..4 {
            cache.attend(layer, &input).unwrap();
        }
        cache.advance(1);
    }
}

fn writer(db: &str) -> ! {
    let store = Store::open(db.as_ref()).unwrap();
    let id = match store.latest().unwrap() {
        Some(id) => id,
        None => store.create("crash", "m", params()).unwrap(),
    };
    let mut history = store.history(id).unwrap();
    let mut head = history
        .head()
        .unwrap()
        .unwrap_or_else(|| SessionHead::new(params(), None));
    let mut cache = HostCache::new(params(), geometry());
    feed(&mut cache, 0, head.tokens_fed);
    // As a session does: the KV file is whole up to where a resume finds it; the next save
    // writes from there.
    let mut saved = match history.load_kv(params(), geometry(), &Device::Cpu).unwrap() {
        SavedKv::Cache(at, _) => at,
        SavedKv::Nothing(_) => 0,
    };
    loop {
        let first = head.token_count;
        let message = MessageRecord {
            index: head.message_count,
            role: Role::User,
            content: format!("m{}", head.message_count),
            tokens: first..first + TURN,
            span: first..first + TURN,
            code_before: 0,
        };
        let tokens = TokenRun {
            first,
            ids: (first..first + TURN).map(|t| t as u32).collect(),
            offsets: (first..first + TURN).collect(),
        };
        head.message_count += 1;
        head.token_count += TURN;
        head.tokens_fed = head.token_count;
        feed(&mut cache, first, head.token_count);
        history
            .append(&Batch {
                truncate: None,
                messages: std::slice::from_ref(&message),
                tokens: &tokens,
                head: &head,
            })
            .unwrap();
        let kv = KvCache::Host(cache.clone());
        let globals = kv.globals_snapshot().unwrap();
        history
            .save_kv(&kv, saved..head.token_count, Some(&globals), saved == 0)
            .unwrap();
        saved = head.token_count;
    }
}

#[test]
fn killing_a_saving_process_never_corrupts_the_database() {
    if let Ok(db) = std::env::var(WRITER_ENV) {
        writer(&db);
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sessions.db");
    let exe = std::env::current_exe().unwrap();
    let mut seen = Vec::new();
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
        let history = store.history(id).unwrap();
        let Some(head) = history.head().unwrap() else {
            continue;
        };
        let n = head.message_count;
        let messages = history.messages(0..n + 5).unwrap();
        assert_eq!(
            messages.len(),
            n,
            "round {round}: the head and the messages agree"
        );
        assert_eq!(messages[n - 1].content, format!("m{}", n - 1));
        let tokens = history.tokens(0..head.token_count + 500).unwrap();
        assert_eq!(tokens.ids.len() as u64, head.token_count, "round {round}");
        assert_eq!(head.token_count, TURN * n as u64);
        match history.load_kv(params(), geometry(), &Device::Cpu).unwrap() {
            SavedKv::Cache(at, cache) => {
                assert!(
                    at <= head.tokens_fed && at + TURN >= head.tokens_fed,
                    "round {round}: a cache at {at} for {} tokens",
                    head.tokens_fed
                );
                let mut fresh = HostCache::new(params(), geometry());
                feed(&mut fresh, 0, at);
                let fresh = KvCache::Host(fresh);
                assert_eq!(cache.stats(), fresh.stats(), "round {round}");
                let slots = |c: &KvCache| {
                    let mut all = Vec::new();
                    c.read_slots(0..at, |p, s, _| all.push((p, s.to_vec())))
                        .unwrap();
                    all
                };
                assert!(
                    slots(&cache) == slots(&fresh),
                    "round {round}: the same cache"
                );
            }
            SavedKv::Nothing(why) => {
                assert!(head.token_count <= TURN, "round {round}: no cache ({why})")
            }
        }
        seen.push(n);
    }
    // The kills landed while saves were going on, not before the first one.
    assert!(seen.len() >= 4, "saved versions seen: {seen:?}");
}
