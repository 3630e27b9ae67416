//! Saved conversations: one SQLite database (`sessions.db` in the data dir) and, beside it in
//! `kv/`, one KV file per conversation (`kv_file.rs`).
//!
//! The database holds a row per conversation (title, model, counters, and the session's head:
//! its bounded state between turns), a row per message, and a row of token ids and byte offsets
//! per save. A save appends: the new messages, the new tokens and the new head in one
//! transaction (WAL, `synchronous = FULL`), so a killed process leaves the last save or the one
//! before, never a mix; then the KV file gets the slots of the tokens fed since, and the row
//! records where the file is whole. Nothing is ever rewritten whole: the bytes a save writes
//! follow the new tokens, not the conversation's length.
//!
//! A database of the previous format (one row per conversation, its state as one JSON text and
//! its cache as one snapshot) is migrated when opened, in one transaction; one of a newer
//! format is refused with a message naming the file.

mod history;
mod kv_file;
mod token_rows;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

pub use history::StoreHistory;

use crate::attention::LambdaParams;
use crate::chat::{Role, code_blocks};
use crate::protocol::SessionSummary;
use crate::session::{MessageRecord, SessionHead};

/// The database format this build writes (`PRAGMA user_version`). Format 3 heads name the
/// system prompt and the last exchange by message (format 2's copied them, and still read).
const FORMAT: i32 = 3;
/// The WAL is truncated to this after a checkpoint (SQLite checkpoints every 1,000 pages).
const WAL_LIMIT: i64 = 64 << 20;
/// Pages of 1 KiB, not SQLite's 4 KiB: a save changes a score of pages, most of them only in
/// part (page 1, the session's row, the last leaf of each table and index, the new text and
/// token run), so smaller pages write fewer bytes per turn: 21 KiB of WAL rather than 50
/// (docs/PERFORMANCE.md). Takes effect when a database is created.
const PAGE_SIZE: i64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("session {0} does not exist")]
    NoSuchSession(i64),
    #[error("session {0} is damaged: {1}")]
    Damaged(i64, String),
    #[error(
        "{0} was written by a newer lambdachat (format {1}; this one reads format {FORMAT}): \
         update lambdachat, or move the file away to start afresh"
    )]
    Newer(PathBuf, i32),
    #[error("{0} could not be migrated from the previous format (it is unchanged): {1}")]
    Migration(PathBuf, String),
    #[error(
        "conversation {0} is open in another lambdachat: close it there first (or open another \
         conversation)"
    )]
    InUse(i64),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

pub struct Store {
    db: Connection,
    path: PathBuf,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Opens a connection to the database with the settings every connection uses.
fn connect(path: &Path) -> Result<Connection, StoreError> {
    // Conversations are private: the database is its owner's only (SQLite gives its WAL and
    // shared-memory files the database file's permissions).
    if !path.exists() {
        create_private(path).map_err(|e| StoreError::Io(path.to_path_buf(), e))?;
    }
    crate::durable::restrict_file(path);
    let db = Connection::open(path)?;
    db.busy_timeout(std::time::Duration::from_secs(5))?;
    db.pragma_update(None, "page_size", PAGE_SIZE)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.pragma_update(None, "foreign_keys", "ON")?;
    db.pragma_update(None, "journal_size_limit", WAL_LIMIT)?;
    Ok(db)
}

/// Creates an empty file only its owner can read and write.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

const SCHEMA: &str = "
    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT NOT NULL,
        created INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        message_count INTEGER NOT NULL,
        token_count INTEGER NOT NULL,
        head TEXT NOT NULL,
        -- 1 once the conversation's KV file holds a whole window and its table can be trusted.
        kv_whole INTEGER NOT NULL DEFAULT 0
    );
    -- Apart from the session's row, which every save updates: SQLite rewrites a whole row,
    -- and the global stores (a megabyte or more) change only while the sinks fill and on pins.
    CREATE TABLE kv_globals (
        session_id INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
        data BLOB NOT NULL
    );
    -- Keyed by what they are looked up by, without a rowid: one b-tree each (with a rowid, the
    -- primary key would be a second one), so a save touches as few pages as it can.
    CREATE TABLE messages (
        session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        token_start INTEGER NOT NULL,
        token_end INTEGER NOT NULL,
        span_start INTEGER NOT NULL,
        span_end INTEGER NOT NULL,
        code_before INTEGER NOT NULL,
        PRIMARY KEY (session_id, idx)
    ) WITHOUT ROWID;
    CREATE INDEX messages_by_token ON messages(session_id, token_start);
    CREATE TABLE tokens (
        session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        first INTEGER NOT NULL,
        last INTEGER NOT NULL,
        -- The ids and byte offsets of tokens first..last (token_rows.rs).
        data BLOB NOT NULL,
        PRIMARY KEY (session_id, first)
    ) WITHOUT ROWID;
    CREATE TABLE legacy_snapshots (
        session_id INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
        tokens INTEGER NOT NULL,
        data BLOB NOT NULL
    );
";

impl Store {
    /// Opens (creating or migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut db = connect(path)?;
        let version: i32 = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > FORMAT {
            return Err(StoreError::Newer(path.to_path_buf(), version));
        }
        if version < FORMAT {
            let old: bool = db
                .query_row(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'sessions'",
                    [],
                    |r| r.get(0),
                )
                .unwrap_or(false);
            let tx = db.transaction()?;
            match version {
                2 => {}
                _ if old => {
                    migrate_v1(&tx).map_err(|e| StoreError::Migration(path.to_path_buf(), e))?
                }
                _ => tx.execute_batch(SCHEMA)?,
            }
            tx.pragma_update(None, "user_version", FORMAT)?;
            tx.commit()?;
        }
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Where the KV files live.
    fn kv_dir(&self) -> PathBuf {
        kv_dir(&self.path)
    }

    /// Creates an empty session and returns its id.
    pub fn create(&self, title: &str, model: &str, p: LambdaParams) -> Result<i64, StoreError> {
        let t = now();
        let head = history::head_json(&SessionHead::new(p, None))
            .map_err(|e| StoreError::Damaged(0, e.to_string()))?;
        self.db.execute(
            "INSERT INTO sessions (title, model, created, updated, message_count, token_count,
                head) VALUES (?1, ?2, ?3, ?3, 0, 0, ?4)",
            params![title, model, t, head],
        )?;
        Ok(self.db.last_insert_rowid())
    }

    /// Session `id`'s history, for a session to read and append to; refused while another
    /// process has it open.
    pub fn history(&self, id: i64) -> Result<StoreHistory, StoreError> {
        self.summary(id)?;
        StoreHistory::open(&self.path, id)
    }

    /// One session's line of the list.
    pub fn summary(&self, id: i64) -> Result<SessionSummary, StoreError> {
        self.db
            .query_row(
                "SELECT id, title, model, message_count, updated FROM sessions WHERE id = ?1",
                [id],
                summary_row,
            )
            .optional()?
            .ok_or(StoreError::NoSuchSession(id))
    }

    /// Sessions, most recently updated first.
    pub fn list(&self) -> Result<Vec<SessionSummary>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT id, title, model, message_count, updated FROM sessions
             ORDER BY updated DESC, id DESC",
        )?;
        let rows = stmt.query_map([], summary_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The most recently updated session, if any.
    pub fn latest(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .query_row(
                "SELECT id FROM sessions ORDER BY updated DESC, id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn rename(&self, id: i64, title: &str) -> Result<(), StoreError> {
        match self.db.execute(
            "UPDATE sessions SET title = ?2 WHERE id = ?1",
            params![id, title],
        )? {
            0 => Err(StoreError::NoSuchSession(id)),
            _ => Ok(()),
        }
    }

    /// Deletes a session with its messages, tokens and KV file; refused while another process
    /// has it open.
    pub fn delete(&self, id: i64) -> Result<(), StoreError> {
        let lock = history::lock(&self.path, id)?;
        match self
            .db
            .execute("DELETE FROM sessions WHERE id = ?1", [id])?
        {
            0 => Err(StoreError::NoSuchSession(id)),
            _ => {
                let _ = std::fs::remove_file(history::kv_path(&self.path, id));
                drop(lock);
                let _ = std::fs::remove_file(history::lock_path(&self.path, id));
                Ok(())
            }
        }
    }

    /// Writes session `id` as Markdown to `out`, streaming its messages from the database (a
    /// million-token conversation in the memory of its longest message).
    pub fn export(&self, id: i64, out: &mut dyn Write) -> Result<(), StoreError> {
        let title = self.summary(id)?.title;
        let io = |e| StoreError::Io(PathBuf::from("export"), e);
        markdown_title(out, &title).map_err(io)?;
        // One message at a time, as SQLite reads them: memory holds the longest message,
        // whatever the conversation's length (a page of many messages would hold them all).
        let mut stmt = self
            .db
            .prepare("SELECT role, content FROM messages WHERE session_id = ?1 ORDER BY idx")?;
        let mut rows = stmt.query(params![id])?;
        while let Some(row) = rows.next()? {
            let role: String = row.get(0)?;
            let content: String = row.get(1)?;
            markdown_message(out, role_of(&role), &content).map_err(io)?;
        }
        Ok(())
    }

    /// Keeps the KV files of all sessions within `budget` bytes: the least recently updated
    /// sessions' files go first (never `keep`'s, nor one open elsewhere). A session whose file
    /// went resumes by reading its window again. Returns the bytes freed.
    pub fn enforce_kv_budget(&self, budget: u64, keep: Option<i64>) -> Result<u64, StoreError> {
        let dir = self.kv_dir();
        let mut files: Vec<(i64, u64)> = Vec::new();
        let mut stmt = self
            .db
            .prepare("SELECT id FROM sessions ORDER BY updated ASC, id ASC")?;
        let ids: Vec<i64> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for id in ids {
            if let Ok(m) = std::fs::metadata(dir.join(format!("{id}.kv"))) {
                files.push((id, m.len()));
            }
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        let mut freed = 0;
        for (id, bytes) in files {
            if total <= budget {
                break;
            }
            if Some(id) == keep {
                continue;
            }
            let Ok(lock) = history::lock(&self.path, id) else {
                continue; // open elsewhere
            };
            self.db
                .execute("UPDATE sessions SET kv_whole = 0 WHERE id = ?1", [id])?;
            self.db
                .execute("DELETE FROM kv_globals WHERE session_id = ?1", [id])?;
            let _ = std::fs::remove_file(history::kv_path(&self.path, id));
            drop(lock);
            total -= bytes;
            freed += bytes;
        }
        Ok(freed)
    }
}

/// Bytes of the database at `db` and its WAL on disk.
pub fn disk_bytes(db: &Path) -> u64 {
    let size = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    size(db.to_path_buf()) + size(PathBuf::from(format!("{}-wal", db.display())))
}

/// Bytes of the KV files beside the database at `db`.
pub fn kv_bytes(db: &Path) -> u64 {
    std::fs::read_dir(kv_dir(db)).map_or(0, |dir| {
        dir.filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// The most bytes one token takes in the KV files beside the database at `db` (0 when none).
pub fn kv_token_bytes(db: &Path) -> u64 {
    std::fs::read_dir(kv_dir(db)).map_or(0, |dir| {
        dir.filter_map(|e| kv_file::KvFile::token_bytes(&e.ok()?.path()))
            .max()
            .unwrap_or(0)
    })
}

fn kv_dir(db: &Path) -> PathBuf {
    db.parent().unwrap_or(Path::new(".")).join("kv")
}

fn summary_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionSummary> {
    Ok(SessionSummary {
        id: r.get(0)?,
        title: r.get(1)?,
        model: r.get(2)?,
        messages: r.get::<_, i64>(3)? as usize,
        updated: r.get(4)?,
    })
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

fn role_of(name: &str) -> Role {
    match name {
        "system" => Role::System,
        "assistant" => Role::Assistant,
        _ => Role::User,
    }
}

/// A conversation's row in the previous format.
struct RowV1 {
    id: i64,
    title: String,
    model: String,
    /// Created, updated.
    times: (i64, i64),
    /// n_global, n_local, distance_limit.
    params: (i64, i64, i64),
    state: String,
    tokens: Vec<u8>,
    offsets: Vec<u8>,
}

/// The previous format's state of a conversation.
#[derive(serde::Deserialize)]
struct StateV1 {
    messages: Vec<crate::chat::Message>,
    fed_text: String,
    spans: Vec<(usize, usize)>,
    pending: Vec<u32>,
    recent: Vec<u32>,
}

/// Rewrites format 1 (a `sessions` row with the state as JSON, tokens and offsets as blobs, and
/// a `snapshots` table) as format 2 inside the caller's transaction. The old snapshots are kept
/// for the sessions to resume from once (`legacy_snapshots`).
fn migrate_v1(tx: &rusqlite::Transaction<'_>) -> Result<(), String> {
    let sql = |e: rusqlite::Error| e.to_string();
    tx.execute_batch(
        "ALTER TABLE sessions RENAME TO sessions_v1;
         ALTER TABLE snapshots RENAME TO snapshots_v1;",
    )
    .map_err(sql)?;
    tx.execute_batch(SCHEMA).map_err(sql)?;
    let rows: Vec<RowV1> = {
        let mut stmt = tx
            .prepare(
                "SELECT id, title, model, created, updated, n_global, n_local, distance_limit,
                    state, tokens, offsets FROM sessions_v1",
            )
            .map_err(sql)?;
        stmt.query_map([], |r| {
            Ok(RowV1 {
                id: r.get(0)?,
                title: r.get(1)?,
                model: r.get(2)?,
                times: (r.get(3)?, r.get(4)?),
                params: (r.get(5)?, r.get(6)?, r.get(7)?),
                state: r.get(8)?,
                tokens: r.get(9)?,
                offsets: r.get(10)?,
            })
        })
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)?
    };
    for row in rows {
        let RowV1 {
            id,
            title,
            model,
            times: (created, updated),
            params: (g, l, d),
            state: json,
            tokens,
            offsets,
        } = row;
        let params = LambdaParams::new(g as usize, l as usize, Some(d as u64))
            .map_err(|e| format!("session {id}: {e}"))?;
        let state: StateV1 = if json.is_empty() {
            StateV1 {
                messages: Vec::new(),
                fed_text: String::new(),
                spans: Vec::new(),
                pending: Vec::new(),
                recent: Vec::new(),
            }
        } else {
            serde_json::from_str(&json).map_err(|e| format!("session {id}: {e}"))?
        };
        let ids: Vec<u32> = bytemuck::pod_collect_to_vec(&tokens);
        let offsets: Vec<u64> = bytemuck::pod_collect_to_vec(&offsets);
        if ids.len() != offsets.len() || state.spans.len() != state.messages.len() {
            return Err(format!("session {id}: token bookkeeping does not add up"));
        }
        let mut head = SessionHead::new(params, None);
        head.token_count = ids.len() as u64;
        head.tokens_fed = (ids.len() - state.pending.len().min(ids.len())) as u64;
        head.pending = state.pending;
        head.recent = state.recent;
        head.fed_len = state.fed_text.len() as u64;
        let mut records = Vec::new();
        for (index, (m, &(s, e))) in state.messages.iter().zip(&state.spans).enumerate() {
            let first = offsets.partition_point(|&o| o < s as u64) as u64;
            let end = offsets.partition_point(|&o| o < e as u64) as u64;
            records.push(MessageRecord {
                index,
                role: m.role,
                content: m.content.clone(),
                tokens: first..end,
                span: s as u64..e as u64,
                code_before: head.code_count,
            });
            head.code_count += code_blocks(&m.content).len();
        }
        head.message_count = records.len();
        head.system = records
            .first()
            .filter(|m| m.role == Role::System)
            .map(|m| m.content.clone());
        if let Some(last_user) = records.iter().rposition(|m| m.role == Role::User) {
            head.tail = records[last_user..].to_vec();
            let start = head.tail[0].span.start as usize;
            head.fed_tail = state.fed_text.get(start..).unwrap_or("").to_string();
            head.fed_tail_start = start as u64;
        }
        let head_json = history::head_json(&head).map_err(|e| e.to_string())?;
        tx.execute(
            "INSERT INTO sessions (id, title, model, created, updated, message_count,
                token_count, head) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                title,
                model,
                created,
                updated,
                records.len() as i64,
                ids.len() as i64,
                head_json
            ],
        )
        .map_err(sql)?;
        for m in &records {
            history::insert_message(tx, id, m).map_err(sql)?;
        }
        if !ids.is_empty() {
            history::insert_tokens(tx, id, 0, &ids, &offsets).map_err(sql)?;
        }
    }
    tx.execute_batch(
        "INSERT INTO legacy_snapshots (session_id, tokens, data)
             SELECT session_id, tokens, data FROM snapshots_v1;
         DROP TABLE snapshots_v1;
         DROP TABLE sessions_v1;",
    )
    .map_err(sql)?;
    Ok(())
}

/// The first line of a conversation exported as Markdown.
pub fn markdown_title(out: &mut dyn Write, title: &str) -> std::io::Result<()> {
    writeln!(out, "# {title}")
}

/// One message of a conversation exported as Markdown.
pub fn markdown_message(out: &mut dyn Write, role: Role, content: &str) -> std::io::Result<()> {
    let who = match role {
        Role::System => "System",
        Role::User => "You",
        Role::Assistant => "Assistant",
    };
    write!(out, "\n## {who}\n\n{}\n", content.trim_end())
}

/// A title for a new session: the first line of the first message, shortened.
pub fn title_from(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let mut title: String = line.chars().take(60).collect();
    if line.chars().count() > 60 {
        title.push('…');
    }
    if title.is_empty() {
        "Untitled".to_string()
    } else {
        title
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{
        AttentionCache, AttentionInput, HostCache, KvCache, LayerGeometry, Rope, RopeStyle,
    };
    use crate::session::{Batch, History, SavedKv, TokenRun};

    fn params() -> LambdaParams {
        LambdaParams::new(2, 8, None).unwrap()
    }

    fn geometry() -> Vec<LayerGeometry> {
        vec![LayerGeometry::full(params(), 1, 4); 2]
    }

    /// Feeds positions `from..to` of a fixed token stream.
    fn feed(cache: &mut HostCache, from: u64, to: u64) {
        feed_stream(cache, from, to, 7);
    }

    /// Feeds positions `from..to` of the token stream `stream` (another stream: another reply).
    fn feed_stream(cache: &mut HostCache, from: u64, to: u64, stream: u64) {
        let rope = Rope::new(4, 10_000.0, RopeStyle::Neox);
        for t in from..to {
            let x: Vec<f32> = (0..4)
                .map(|i| ((t * stream + i) % 13) as f32 / 6.0 - 1.0)
                .collect();
            let input = AttentionInput {
                q: &x,
                k: &x,
                v: &x,
                n_tokens: 1,
                n_heads: 1,
                rope: &rope,
                scale: 0.5,
            };
            for layer in 0..2 {
                cache.attend(layer, &input).unwrap();
            }
            cache.advance(1);
        }
    }

    fn message(index: usize, role: Role, text: &str, tokens: Range<u64>) -> MessageRecord {
        MessageRecord {
            index,
            role,
            content: text.into(),
            span: tokens.start * 3..tokens.end * 3,
            tokens,
            code_before: 0,
        }
    }

    fn run(first: u64, n: u64) -> TokenRun {
        TokenRun {
            first,
            ids: (first..first + n).map(|t| t as u32).collect(),
            offsets: (first..first + n).map(|t| t * 3).collect(),
        }
    }

    /// A turn of `n` tokens: its message, its tokens and the head after it.
    fn turn(history: &mut StoreHistory, head: &mut SessionHead, n: u64) {
        let first = head.token_count;
        let m = message(head.message_count, Role::User, "m", first..first + n);
        head.message_count += 1;
        head.token_count += n;
        head.tokens_fed = head.token_count;
        history
            .append(&Batch {
                truncate: None,
                messages: &[m],
                tokens: &run(first, n),
                head,
            })
            .unwrap();
    }

    use std::ops::Range;

    #[test]
    fn conversations_are_appended_read_listed_renamed_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path).unwrap();
        let a = store.create("first", "m.gguf", params()).unwrap();
        let b = store.create("second", "m.gguf", params()).unwrap();
        let mut history = store.history(a).unwrap();
        assert!(history.head().unwrap().is_none(), "nothing saved yet");
        let mut head = SessionHead::new(params(), None);
        turn(&mut history, &mut head, 5);
        turn(&mut history, &mut head, 7);
        assert_eq!(history.head().unwrap(), Some(head.clone()));
        let messages = history.messages(0..10).unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[1].tokens, 5..12);
        assert_eq!(history.tokens(3..9).unwrap(), run(3, 6), "across two runs");
        let places: Vec<usize> = history
            .places(6..8)
            .unwrap()
            .iter()
            .map(|p| p.index)
            .collect();
        assert_eq!(places, [1]);
        assert_eq!(history.places(0..12).unwrap().len(), 2);
        // A regenerated reply drops what follows the cut, a run straddling it included.
        history
            .append(&Batch {
                truncate: Some((1, 8)),
                messages: &[],
                tokens: &TokenRun::starting_at(8),
                head: &head,
            })
            .unwrap();
        assert_eq!(history.messages(0..10).unwrap().len(), 1);
        assert_eq!(history.tokens(0..20).unwrap(), run(0, 8));
        // One process at a time.
        assert!(matches!(store.history(a), Err(StoreError::InUse(_))));
        assert!(matches!(store.delete(a), Err(StoreError::InUse(_))));
        drop(history);
        store.rename(b, "renamed").unwrap();
        let titles: Vec<String> = store.list().unwrap().into_iter().map(|s| s.title).collect();
        assert!(titles.contains(&"renamed".to_string()) && titles.len() == 2);
        let mut md = Vec::new();
        store.export(a, &mut md).unwrap();
        assert_eq!(String::from_utf8(md).unwrap(), "# first\n\n## You\n\nm\n");
        store.delete(a).unwrap();
        assert!(matches!(
            store.summary(a),
            Err(StoreError::NoSuchSession(_))
        ));
        assert!(matches!(store.delete(a), Err(StoreError::NoSuchSession(_))));
        assert!(matches!(
            store.rename(a, "x"),
            Err(StoreError::NoSuchSession(_))
        ));
    }

    #[test]
    fn the_kv_file_takes_the_new_slots_and_gives_the_cache_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let id = store.create("kv", "m", params()).unwrap();
        let mut history = store.history(id).unwrap();
        let mut head = SessionHead::new(params(), None);
        let mut cache = HostCache::new(params(), geometry());
        chat_and_save(&mut history, &mut head, &mut cache, &[3, 9, 4, 1]);
        let SavedKv::Cache(at, back) = history
            .load_kv(params(), geometry(), &candle_core::Device::Cpu)
            .unwrap()
        else {
            panic!("a whole cache was saved");
        };
        assert_eq!(at, 17);
        assert_eq!(back.stats(), KvCache::Host(cache.clone()).stats());
        assert_eq!(slots(&back, 17), slots(&KvCache::Host(cache.clone()), 17));
        // The file holds the window and one slot more (9 slots of 2 layers' 4 keys and 4 values),
        // after 4 KiB of header and a page of slot table, whatever the conversation's length.
        let kv = std::fs::metadata(dir.path().join("kv").join(format!("{id}.kv"))).unwrap();
        assert_eq!(kv.len(), 8192 + 9 * 2 * 8 * 4);
    }

    /// Turns of `sizes` tokens, each fed to `cache` and saved (rows and KV) as the session does.
    fn chat_and_save(
        history: &mut StoreHistory,
        head: &mut SessionHead,
        cache: &mut HostCache,
        sizes: &[u64],
    ) {
        for &n in sizes {
            let saved = head.token_count;
            turn(history, head, n);
            feed(cache, saved, head.token_count);
            let kv = KvCache::Host(cache.clone());
            let globals = kv.globals_snapshot().unwrap();
            history
                .save_kv(&kv, saved..head.token_count, Some(&globals), saved == 0)
                .unwrap();
        }
    }

    /// The slots of `c` for positions `0..end`.
    fn slots(c: &KvCache, end: u64) -> Vec<(u64, Vec<f32>)> {
        let mut all = Vec::new();
        c.read_slots(0..end, |p, s, _| all.push((p, s.to_vec())))
            .unwrap();
        all
    }

    #[test]
    fn a_regenerated_reply_never_pairs_with_the_old_slots() {
        // The last reply (19..22) drawn again: the cache as it was at 19, then `n` tokens of
        // another reply. With 2, a window ending at 21 would find the old reply's 19 and 20 in
        // the file; with 1, the window 12..20 needs position 12, whose slot the old 21 took.
        for n in [2, 1] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("s.db")).unwrap();
            let id = store.create("regen", "m", params()).unwrap();
            let mut history = store.history(id).unwrap();
            let mut head = SessionHead::new(params(), None);
            let mut cache = HostCache::new(params(), geometry());
            chat_and_save(&mut history, &mut head, &mut cache, &[6, 6, 7, 3]);
            let end = 19 + n;
            let mut regen = HostCache::new(params(), geometry());
            feed(&mut regen, 0, 19);
            feed_stream(&mut regen, 19, end, 5);
            let regen = KvCache::Host(regen);
            let resume = |history: &StoreHistory| {
                history
                    .load_kv(params(), geometry(), &candle_core::Device::Cpu)
                    .unwrap()
            };
            let mut new_head = head.clone();
            new_head.token_count = end;
            new_head.tokens_fed = end;
            history.forget_kv_from(19).unwrap();
            history
                .append(&Batch {
                    truncate: Some((3, 19)),
                    messages: &[message(3, Role::Assistant, "again", 19..end)],
                    tokens: &run(19, n),
                    head: &new_head,
                })
                .unwrap();
            // Killed here, before the slots: what comes back holds none of the old reply.
            if let SavedKv::Cache(at, back) = resume(&history) {
                assert!(at <= 19, "a window ending at {at} (n = {n})");
                assert_eq!(slots(&back, at), slots(&regen, at));
            }
            // The save goes through: the new reply's slots, and those of the window the old
            // reply overwrote in the file.
            history.save_kv(&regen, 19..end, None, false).unwrap();
            let SavedKv::Cache(at, back) = resume(&history) else {
                panic!("a whole window was saved (n = {n})");
            };
            assert_eq!(at, end);
            assert_eq!(back.stats(), regen.stats());
            assert_eq!(slots(&back, end), slots(&regen, end));
        }
    }

    #[test]
    fn a_full_disk_fails_the_save_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let id = store.create("full", "m", params()).unwrap();
        let mut history = store.history(id).unwrap();
        let mut head = SessionHead::new(params(), None);
        turn(&mut history, &mut head, 4);
        let before = history.head().unwrap();
        history.limit_pages(0);
        let big = MessageRecord {
            content: "x".repeat(64 << 10),
            ..message(1, Role::User, "", 4..8)
        };
        let mut next = head.clone();
        next.message_count = 2;
        next.token_count = 8;
        let batch = Batch {
            truncate: None,
            messages: std::slice::from_ref(&big),
            tokens: &run(4, 4),
            head: &next,
        };
        let err = history.append(&batch).unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        assert_eq!(history.head().unwrap(), before, "the last save is intact");
        assert_eq!(history.messages(0..9).unwrap().len(), 1);
        // Room again: the same batch goes through.
        history.limit_pages(1 << 20);
        history.append(&batch).unwrap();
        assert_eq!(history.messages(0..9).unwrap().len(), 2);
    }

    /// A head row names its system prompt and last exchange (a save does not copy their text
    /// again), reads back whole, and a format-2 database's heads, which copied them, still read.
    #[test]
    fn heads_name_the_last_exchange_and_format_2_heads_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path).unwrap();
        let id = store.create("named", "m", params()).unwrap();
        let mut history = store.history(id).unwrap();
        let long = "a long prompt ".repeat(200);
        let system = MessageRecord {
            role: Role::System,
            ..message(0, Role::System, "be brief", 0..0)
        };
        let messages = [
            system,
            message(1, Role::User, &long, 0..6),
            message(2, Role::Assistant, "ok", 6..8),
        ];
        let mut head = SessionHead::new(params(), Some("be brief".into()));
        head.message_count = 3;
        head.token_count = 8;
        head.tokens_fed = 8;
        head.tail = messages[1..].to_vec();
        head.fed_tail = format!("{long}<|im_end|>\nok");
        head.fed_tail_start = messages[1].span.start;
        history
            .append(&Batch {
                truncate: None,
                messages: &messages,
                tokens: &run(0, 8),
                head: &head,
            })
            .unwrap();
        assert_eq!(history.head().unwrap().as_ref(), Some(&head));
        let row = |db: &Connection| -> String {
            db.query_row("SELECT head FROM sessions WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
        };
        let json = row(&store.db);
        assert!(
            json.len() < 1000 && !json.contains("a long prompt") && !json.contains("be brief"),
            "{json}"
        );
        drop(history);
        drop(store);

        // A format-2 database: the same rows, the head with its copies.
        let db = Connection::open(&path).unwrap();
        let old = serde_json::to_string(&head).unwrap();
        assert!(old.contains("a long prompt"));
        db.execute(
            "UPDATE sessions SET head = ?2 WHERE id = ?1",
            params![id, old],
        )
        .unwrap();
        db.pragma_update(None, "user_version", 2).unwrap();
        drop(db);
        let store = Store::open(&path).unwrap();
        let version: i32 = store
            .db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, FORMAT);
        let history = store.history(id).unwrap();
        assert_eq!(history.head().unwrap().as_ref(), Some(&head));

        // A head naming messages that are gone is refused, not read short.
        store
            .db
            .execute("DELETE FROM messages WHERE idx = 2", [])
            .unwrap();
        store
            .db
            .execute(
                "UPDATE sessions SET head = ?2 WHERE id = ?1",
                params![id, json],
            )
            .unwrap();
        let err = history.head().unwrap_err().to_string();
        assert!(err.contains("last exchange"), "{err}");
    }

    /// The lookups a turn makes by token position read a range of an index, never every
    /// message of the conversation (SQLite's plan, asked of SQLite).
    #[test]
    fn lookups_by_position_read_an_index_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        for (sql, range) in [
            (
                history::PLACES_SQL,
                "messages_by_token (session_id=? AND token_start>? AND token_start<?)",
            ),
            (
                history::TOKENS_SQL,
                "PRIMARY KEY (session_id=? AND first>? AND first<?)",
            ),
        ] {
            let mut stmt = store
                .db
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap();
            let plan: Vec<String> = stmt
                .query_map(params![1, 10, 20], |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(plan.iter().any(|l| l.ends_with(range)), "{plan:?}");
            assert!(!plan.iter().any(|l| l.starts_with("SCAN")), "{plan:?}");
        }
    }

    /// A turn of a real chat's size — a 500-token message of 2,600 bytes, its token run, the
    /// session's head — adds about 12.5 KiB to the WAL (39 KiB with SQLite's 4 KiB pages and
    /// the last exchange copied into the head). The checkpoint later copies the
    /// new pages once more; docs/PERFORMANCE.md has the whole turn's bytes.
    #[test]
    fn a_save_adds_little_to_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path).unwrap();
        let id = store.create("sized", "m", params()).unwrap();
        let mut history = store.history(id).unwrap();
        let mut head = SessionHead::new(params(), None);
        let wal = || std::fs::metadata(path.with_extension("db-wal")).map_or(0, |m| m.len());
        let text: String = (0..520).map(|i| format!("w{:03} ", i % 997)).collect();
        let (turns, mut grown) = (24u64, 0);
        for t in 0..turns {
            let first = head.token_count;
            let m = message(head.message_count, Role::User, &text, first..first + 500);
            head.message_count += 1;
            head.token_count += 500;
            head.tokens_fed = head.token_count;
            head.tail = vec![m.clone()];
            head.fed_tail = text.clone();
            let tokens = TokenRun {
                first,
                ids: (0..500)
                    .map(|i| 100_000 + (i * 7919 + t as u32) % 50_000)
                    .collect(),
                offsets: (0..500).map(|i| first * 5 + i * 5).collect(),
            };
            let before = wal();
            let batch = Batch {
                truncate: None,
                messages: std::slice::from_ref(&m),
                tokens: &tokens,
                head: &head,
            };
            history.append(&batch).unwrap();
            // The first turns build the tables' first pages; count the steady state.
            if t >= 4 {
                grown += wal() - before;
            }
        }
        let per_save = grown / (turns - 4);
        assert!(
            per_save > 0,
            "the WAL did not grow: were the saves checkpointed?"
        );
        assert!(per_save <= 20 << 10, "{per_save} bytes of WAL per save");
    }

    #[test]
    fn a_previous_format_database_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(
                "CREATE TABLE sessions (id INTEGER PRIMARY KEY, title TEXT NOT NULL,
                    model TEXT NOT NULL, created INTEGER NOT NULL, updated INTEGER NOT NULL,
                    message_count INTEGER NOT NULL, n_global INTEGER NOT NULL,
                    n_local INTEGER NOT NULL, distance_limit INTEGER NOT NULL,
                    state TEXT NOT NULL, tokens BLOB NOT NULL, offsets BLOB NOT NULL);
                 CREATE TABLE snapshots (session_id INTEGER PRIMARY KEY, tokens INTEGER NOT NULL,
                    data BLOB NOT NULL);",
            )
            .unwrap();
            let state = serde_json::json!({
                "messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello ```x```"}],
                "fed_text": "user: hi\nassistant: hello ```x```",
                "spans": [[6, 8], [20, 33]],
                "pending": [4],
                "recent": [3]
            });
            let ids: Vec<u8> = [1u32, 2, 3, 4]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let offsets: Vec<u8> = [0u64, 6, 20, 33]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            db.execute(
                "INSERT INTO sessions VALUES (7, 'old', 'm.gguf', 1, 2, 2, 4, 64, 64, ?1, ?2, ?3)",
                params![state.to_string(), ids, offsets],
            )
            .unwrap();
            db.execute("INSERT INTO snapshots VALUES (7, 3, x'00')", [])
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.summary(7).unwrap().title, "old");
        let history = store.history(7).unwrap();
        let head = history.head().unwrap().unwrap();
        assert_eq!((head.token_count, head.tokens_fed), (4, 3));
        assert_eq!(head.pending, [4]);
        assert_eq!(head.tail.len(), 2);
        let messages = history.messages(0..5).unwrap();
        assert_eq!(messages[1].tokens, 2..3);
        assert_eq!(messages[1].content, "hello ```x```");
        assert_eq!(history.tokens(0..4).unwrap().ids, [1, 2, 3, 4]);
        drop(history);
        drop(store);
        // A newer format is refused with the file named; the file is left as it is.
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", FORMAT + 1)
            .unwrap();
        let err = Store::open(&path).err().unwrap();
        assert!(matches!(err, StoreError::Newer(..)), "{err}");
        assert!(err.to_string().contains("s.db"), "{err}");
    }

    #[test]
    fn the_kv_budget_drops_the_least_recent_caches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let mut ids = Vec::new();
        for i in 0..3 {
            let id = store.create(&format!("s{i}"), "m", params()).unwrap();
            let mut history = store.history(id).unwrap();
            let mut head = SessionHead::new(params(), None);
            turn(&mut history, &mut head, 4);
            let mut cache = HostCache::new(params(), geometry());
            feed(&mut cache, 0, 4);
            let kv = KvCache::Host(cache);
            let globals = kv.globals_snapshot().unwrap();
            history.save_kv(&kv, 0..4, Some(&globals), true).unwrap();
            ids.push(id);
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        let one = std::fs::metadata(dir.path().join("kv").join(format!("{}.kv", ids[0])))
            .unwrap()
            .len();
        let freed = store.enforce_kv_budget(2 * one, Some(ids[0])).unwrap();
        assert_eq!(freed, one);
        let exists = |id: i64| dir.path().join("kv").join(format!("{id}.kv")).exists();
        assert!(exists(ids[0]), "kept: the open one");
        assert!(!exists(ids[1]), "the least recent other");
        assert!(exists(ids[2]));
        let history = store.history(ids[1]).unwrap();
        assert!(matches!(
            history
                .load_kv(params(), geometry(), &candle_core::Device::Cpu)
                .unwrap(),
            SavedKv::Nothing(_)
        ));
    }
}
