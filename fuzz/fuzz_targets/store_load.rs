//! A saved conversation as the database and KV file hold it, altered: a real conversation of
//! the tiny model (three turns, saved), then arbitrary edits to its head, its message rows,
//! its token rows and its KV file → open → resume → catch up → timeline → one more turn, when
//! the input asks for it. A damaged conversation ends in an error or reads again from text,
//! never a panic.
//!
//! The turn (a prefill, a token, a save) costs more than all the loading before it, so it is
//! the input's choice: the fuzzer keeps inputs of both kinds, and most executions spend their
//! time on the loading, where a damaged file can do harm. Run with `RAYON_NUM_THREADS=1`
//! (`scripts/fuzz.sh` does): candle's pool spinning on a second core is a third of the time.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;

use arbitrary::Arbitrary;
use lambdachat::attention::LambdaParams;
use lambdachat::sampling::SamplingParams;
use lambdachat::session::Session;
use lambdachat::store::Store;
use lambdachat_fuzz::{scratch, tiny_engine};
use libfuzzer_sys::fuzz_target;
use rusqlite::{Connection, params};
use serde_json::Value;

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Big(u64),
    Float(f64),
    Text(String),
    Ints(Vec<i64>),
    Pairs(Vec<(u64, u64)>),
}

#[derive(Arbitrary, Debug)]
enum Edit {
    /// The head replaced by any text.
    Head(String),
    /// One field of the head (by index among its keys) set to any value.
    HeadField(u8, Json),
    /// One field of one message of the head's tail.
    TailField(u8, u8, Json),
    /// A column of a message row: 0 idx, 1 token_start, 2 token_end, 3 span_start, 4 span_end.
    MessageNumber(u8, u8, i64),
    MessageRole(u8, String),
    MessageContent(u8, String),
    DeleteMessage(u8),
    TokenData(u8, Vec<u8>),
    TokenBounds(u8, i64, i64),
    DeleteTokens(u8),
    /// Bytes written into the KV file at an offset, or the file cut short.
    KvBytes(u32, Vec<u8>),
    KvTruncate(u32),
}

#[derive(Arbitrary, Debug)]
struct Damage {
    edits: Vec<Edit>,
    /// One more turn after the resume, with this prompt.
    turn: Option<String>,
}

/// The saved conversation every execution starts from, made once per process.
fn template() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("template");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("template dir");
        let store = Store::open(&dir.join("s.db")).expect("store");
        let params = LambdaParams::new(4, 16, None).expect("params");
        let id = store.create("t", "tiny", params).expect("session");
        let mut s = Session::with_history(
            tiny_engine(),
            params,
            SamplingParams::default(),
            Some("be brief".into()),
            Box::new(store.history(id).expect("history")),
        )
        .expect("session");
        let never = AtomicBool::new(false);
        for text in [
            "hello world",
            "a second question",
            "and a third, longer one",
        ] {
            s.turn(text, Some(6), &never, &mut |_| {}).expect("turn");
            s.save().expect("save");
        }
        dir
    })
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("copy");
    for entry in std::fs::read_dir(from).expect("copy").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            // libFuzzer's timers (SIGALRM) can interrupt the kernel copy; that is the
            // harness's own business, not a finding (the input then runs clean alone).
            while let Err(e) = std::fs::copy(entry.path(), &target) {
                assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "copy: {e}");
            }
        }
    }
}

fn json(v: Json) -> Value {
    match v {
        Json::Null => Value::Null,
        Json::Bool(b) => b.into(),
        Json::Int(i) => i.into(),
        Json::Big(u) => u.into(),
        Json::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        Json::Text(s) => s.into(),
        Json::Ints(v) => v.into(),
        Json::Pairs(v) => v
            .into_iter()
            .map(|(a, b)| Value::from(vec![a, b]))
            .collect(),
    }
}

fn set_field(object: &mut Value, key: u8, value: Value) {
    if let Some(map) = object.as_object_mut() {
        if map.is_empty() {
            return;
        }
        let name = map.keys().nth(key as usize % map.len()).cloned();
        if let Some(name) = name {
            map.insert(name, value);
        }
    }
}

fn apply(db: &Connection, kv: &Path, edit: Edit) -> rusqlite::Result<()> {
    let nth = |table: &str, key: &str, n: u8| -> rusqlite::Result<Option<i64>> {
        let count: i64 =
            db.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
        if count == 0 {
            return Ok(None);
        }
        db.query_row(
            &format!("SELECT {key} FROM {table} ORDER BY {key} LIMIT 1 OFFSET ?1"),
            [n as i64 % count],
            |r| r.get(0),
        )
        .map(Some)
    };
    let head = || -> rusqlite::Result<Value> {
        let text: String = db.query_row("SELECT head FROM sessions", [], |r| r.get(0))?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    };
    let put_head = |v: &Value| {
        db.execute("UPDATE sessions SET head = ?1", [v.to_string()])
            .map(|_| ())
    };
    match edit {
        Edit::Head(text) => {
            db.execute("UPDATE sessions SET head = ?1", [text])?;
        }
        Edit::HeadField(key, value) => {
            let mut h = head()?;
            set_field(&mut h, key, json(value));
            put_head(&h)?;
        }
        Edit::TailField(message, key, value) => {
            let mut h = head()?;
            if let Some(tail) = h.get_mut("tail").and_then(Value::as_array_mut) {
                let len = tail.len();
                if len > 0 {
                    set_field(&mut tail[message as usize % len], key, json(value));
                }
            }
            put_head(&h)?;
        }
        Edit::MessageNumber(row, column, value) => {
            if let Some(idx) = nth("messages", "idx", row)? {
                let col = ["idx", "token_start", "token_end", "span_start", "span_end"]
                    [column as usize % 5];
                db.execute(
                    &format!("UPDATE OR IGNORE messages SET {col} = ?1 WHERE idx = ?2"),
                    params![value, idx],
                )?;
            }
        }
        Edit::MessageRole(row, role) => {
            if let Some(idx) = nth("messages", "idx", row)? {
                db.execute(
                    "UPDATE messages SET role = ?1 WHERE idx = ?2",
                    params![role, idx],
                )?;
            }
        }
        Edit::MessageContent(row, content) => {
            if let Some(idx) = nth("messages", "idx", row)? {
                db.execute(
                    "UPDATE messages SET content = ?1 WHERE idx = ?2",
                    params![content, idx],
                )?;
            }
        }
        Edit::DeleteMessage(row) => {
            if let Some(idx) = nth("messages", "idx", row)? {
                db.execute("DELETE FROM messages WHERE idx = ?1", [idx])?;
            }
        }
        Edit::TokenData(row, data) => {
            if let Some(first) = nth("tokens", "first", row)? {
                db.execute(
                    "UPDATE tokens SET data = ?1 WHERE first = ?2",
                    params![data, first],
                )?;
            }
        }
        Edit::TokenBounds(row, first, last) => {
            if let Some(at) = nth("tokens", "first", row)? {
                db.execute(
                    "UPDATE OR IGNORE tokens SET first = ?1, last = ?2 WHERE first = ?3",
                    params![first, last, at],
                )?;
            }
        }
        Edit::DeleteTokens(row) => {
            if let Some(first) = nth("tokens", "first", row)? {
                db.execute("DELETE FROM tokens WHERE first = ?1", [first])?;
            }
        }
        Edit::KvBytes(offset, bytes) => {
            use std::io::{Seek, SeekFrom, Write};
            if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(kv) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0).max(1);
                let _ = f.seek(SeekFrom::Start(offset as u64 % len));
                let _ = f.write_all(&bytes);
            }
        }
        Edit::KvTruncate(len) => {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(kv) {
                let size = f.metadata().map(|m| m.len()).unwrap_or(0).max(1);
                let _ = f.set_len(len as u64 % size);
            }
        }
    }
    Ok(())
}

fuzz_target!(|damage: Damage| {
    let run = scratch("run");
    let _ = std::fs::remove_dir_all(&run);
    copy_tree(template(), &run);
    let db_path = run.join("s.db");
    {
        let db = Connection::open(&db_path).expect("open the copy");
        for edit in damage.edits.into_iter().take(6) {
            let _ = apply(&db, &run.join("kv").join("1.kv"), edit);
        }
    }
    let Ok(store) = Store::open(&db_path) else {
        return;
    };
    let _ = store.list();
    let _ = store.export(1, &mut std::io::sink());
    let Ok(history) = store.history(1) else {
        return;
    };
    let Ok((mut session, _)) =
        Session::resume(tiny_engine(), SamplingParams::default(), Box::new(history))
    else {
        return;
    };
    let never = AtomicBool::new(false);
    if session.catch_up(&never, &mut |_| {}).is_err() {
        return;
    }
    let _ = session.timeline();
    let count = session.message_count();
    let _ = session.messages(0..count);
    for i in 0..count.min(8) {
        let _ = session.inspect(i);
    }
    let _ = session.tokens(0..session.token_count());
    if let Some(prompt) = damage.turn
        && session.turn(&prompt, Some(1), &never, &mut |_| {}).is_ok()
    {
        let _ = session.save();
    }
});
