//! Saved conversations: one SQLite database (`sessions.db` in the data dir).
//!
//! A session row holds its title, model, Λ parameters, messages and token bookkeeping; a
//! snapshot row beside it holds the bounded KV cache (safetensors bytes) and the token count it
//! was taken at. Every write is one transaction in WAL mode with `synchronous = FULL`, so killing
//! the process at any moment leaves either the old or the new version, never a mix. A snapshot
//! older than the messages is simply not used: the worker feeds the history again instead.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use crate::attention::LambdaParams;
use crate::chat::Role;
use crate::protocol::SessionSummary;
use crate::session::SessionState;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("session {0} does not exist")]
    NoSuchSession(i64),
    #[error("session {0} is damaged: {1}")]
    Damaged(i64, String),
}

/// A session as loaded from disk.
pub struct StoredSession {
    pub summary: SessionSummary,
    pub params: LambdaParams,
    pub state: SessionState,
    /// The KV snapshot and the token count it was taken at.
    pub snapshot: Option<(u64, Vec<u8>)>,
}

pub struct Store {
    db: Connection,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn u32_blob(x: &[u32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn u64_blob(x: &[usize]) -> Vec<u8> {
    x.iter().flat_map(|v| (*v as u64).to_le_bytes()).collect()
}

/// The part of a [`SessionState`] kept as JSON (tokens and offsets go to binary columns).
#[derive(serde::Serialize, serde::Deserialize)]
struct StateJson {
    messages: Vec<crate::chat::Message>,
    fed_text: String,
    spans: Vec<(usize, usize)>,
    pending: Vec<u32>,
    recent: Vec<u32>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS sessions (
                id INTEGER PRIMARY KEY,
                title TEXT NOT NULL,
                model TEXT NOT NULL,
                created INTEGER NOT NULL,
                updated INTEGER NOT NULL,
                message_count INTEGER NOT NULL,
                n_global INTEGER NOT NULL,
                n_local INTEGER NOT NULL,
                distance_limit INTEGER NOT NULL,
                state TEXT NOT NULL,
                tokens BLOB NOT NULL,
                offsets BLOB NOT NULL
            );
            CREATE TABLE IF NOT EXISTS snapshots (
                session_id INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
                tokens INTEGER NOT NULL,
                data BLOB NOT NULL
            );",
        )?;
        Ok(Self { db })
    }

    /// Creates an empty session and returns its id.
    pub fn create(&self, title: &str, model: &str, p: LambdaParams) -> Result<i64, StoreError> {
        let t = now();
        self.db.execute(
            "INSERT INTO sessions (title, model, created, updated, message_count, n_global,
                n_local, distance_limit, state, tokens, offsets)
             VALUES (?1, ?2, ?3, ?3, 0, ?4, ?5, ?6, '', x'', x'')",
            params![
                title,
                model,
                t,
                p.n_global as i64,
                p.n_local as i64,
                p.distance_limit as i64
            ],
        )?;
        Ok(self.db.last_insert_rowid())
    }

    /// Saves the conversation, and the KV snapshot when given (in the same transaction, so the
    /// two always agree). Without a snapshot, an older one stays but no longer matches.
    pub fn save(
        &mut self,
        id: i64,
        params: LambdaParams,
        state: &SessionState,
        snapshot: Option<(u64, &[u8])>,
    ) -> Result<(), StoreError> {
        let json = StateJson {
            messages: state.messages.clone(),
            fed_text: state.fed_text.clone(),
            spans: state.spans.iter().map(|r| (r.start, r.end)).collect(),
            pending: state.pending.clone(),
            recent: state.recent.clone(),
        };
        let json =
            serde_json::to_string(&json).map_err(|e| StoreError::Damaged(id, e.to_string()))?;
        let tx = self.db.transaction()?;
        let changed = tx.execute(
            "UPDATE sessions SET updated = ?2, message_count = ?3, n_global = ?4, n_local = ?5,
                distance_limit = ?6, state = ?7, tokens = ?8, offsets = ?9 WHERE id = ?1",
            params![
                id,
                now(),
                state.messages.len() as i64,
                params.n_global as i64,
                params.n_local as i64,
                params.distance_limit as i64,
                json,
                u32_blob(&state.tokens),
                u64_blob(&state.offsets)
            ],
        )?;
        if changed == 0 {
            return Err(StoreError::NoSuchSession(id));
        }
        if let Some((tokens, data)) = snapshot {
            tx.execute(
                "INSERT INTO snapshots (session_id, tokens, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT(session_id) DO UPDATE SET tokens = ?2, data = ?3",
                params![id, tokens as i64, data],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn load(&self, id: i64) -> Result<StoredSession, StoreError> {
        let row = self
            .db
            .query_row(
                "SELECT title, model, updated, message_count, n_global, n_local, distance_limit,
                    state, tokens, offsets FROM sessions WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        SessionSummary {
                            id,
                            title: r.get(0)?,
                            model: r.get(1)?,
                            updated: r.get(2)?,
                            messages: r.get::<_, i64>(3)? as usize,
                        },
                        (
                            r.get::<_, i64>(4)?,
                            r.get::<_, i64>(5)?,
                            r.get::<_, i64>(6)?,
                        ),
                        r.get::<_, String>(7)?,
                        r.get::<_, Vec<u8>>(8)?,
                        r.get::<_, Vec<u8>>(9)?,
                    ))
                },
            )
            .optional()?
            .ok_or(StoreError::NoSuchSession(id))?;
        let (summary, (g, l, d), json, tokens, offsets) = row;
        let damaged = |m: String| StoreError::Damaged(id, m);
        let params = LambdaParams::new(g as usize, l as usize, Some(d as u64))
            .map_err(|e| damaged(e.to_string()))?;
        let mut state = SessionState::default();
        if !json.is_empty() {
            let j: StateJson = serde_json::from_str(&json).map_err(|e| damaged(e.to_string()))?;
            state.messages = j.messages;
            state.fed_text = j.fed_text;
            state.spans = j.spans.into_iter().map(|(s, e)| s..e).collect();
            state.pending = j.pending;
            state.recent = j.recent;
        }
        state.tokens = tokens
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        state.offsets = offsets
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as usize)
            .collect();
        if state.offsets.len() != state.tokens.len() || state.spans.len() != state.messages.len() {
            return Err(damaged("token bookkeeping does not add up".into()));
        }
        let snapshot = self
            .db
            .query_row(
                "SELECT tokens, data FROM snapshots WHERE session_id = ?1",
                [id],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)),
            )
            .optional()?;
        Ok(StoredSession {
            summary,
            params,
            state,
            snapshot,
        })
    }

    /// Sessions, most recently updated first.
    pub fn list(&self) -> Result<Vec<SessionSummary>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT id, title, model, message_count, updated FROM sessions
             ORDER BY updated DESC, id DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(SessionSummary {
                id: r.get(0)?,
                title: r.get(1)?,
                model: r.get(2)?,
                messages: r.get::<_, i64>(3)? as usize,
                updated: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The most recently updated session, if any.
    pub fn latest(&self) -> Result<Option<i64>, StoreError> {
        Ok(self.list()?.first().map(|s| s.id))
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

    pub fn delete(&self, id: i64) -> Result<(), StoreError> {
        match self
            .db
            .execute("DELETE FROM sessions WHERE id = ?1", [id])?
        {
            0 => Err(StoreError::NoSuchSession(id)),
            _ => Ok(()),
        }
    }
}

/// The conversation as Markdown (for `/export`).
pub fn to_markdown(title: &str, messages: &[crate::chat::Message]) -> String {
    let mut out = format!("# {title}\n");
    for m in messages {
        let who = match m.role {
            Role::System => "System",
            Role::User => "You",
            Role::Assistant => "Assistant",
        };
        out.push_str(&format!("\n## {who}\n\n{}\n", m.content.trim_end()));
    }
    out
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
    use crate::chat::Message;

    fn state() -> SessionState {
        SessionState {
            messages: vec![
                Message::new(Role::User, "hi"),
                Message::new(Role::Assistant, "hello"),
            ],
            fed_text: "user: hi\nassistant: hello".into(),
            tokens: vec![1, 2, 3, 4],
            offsets: vec![0, 6, 9, 20],
            spans: vec![6..8, 20..25],
            pending: vec![4],
            recent: vec![3],
        }
    }

    #[test]
    fn save_load_list_rename_delete() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db")).unwrap();
        let p = LambdaParams::new(4, 64, None).unwrap();
        let a = store.create("first", "m.gguf", p).unwrap();
        let b = store.create("second", "m.gguf", p).unwrap();
        store
            .save(a, p, &state(), Some((3, b"kv".as_slice())))
            .unwrap();
        let loaded = store.load(a).unwrap();
        assert_eq!(loaded.state.tokens, state().tokens);
        assert_eq!(loaded.state.offsets, state().offsets);
        assert_eq!(loaded.state.spans, state().spans);
        assert_eq!(loaded.state.messages, state().messages);
        assert_eq!(loaded.snapshot, Some((3, b"kv".to_vec())));
        assert_eq!(loaded.params, p);
        assert_eq!(loaded.summary.messages, 2);
        // A later save without a snapshot keeps the old one (its token count tells it is stale).
        store.save(a, p, &state(), None).unwrap();
        assert_eq!(store.load(a).unwrap().snapshot.map(|s| s.0), Some(3));
        store.rename(b, "renamed").unwrap();
        let titles: Vec<String> = store.list().unwrap().into_iter().map(|s| s.title).collect();
        assert!(titles.contains(&"renamed".to_string()) && titles.len() == 2);
        store.delete(a).unwrap();
        assert!(matches!(store.load(a), Err(StoreError::NoSuchSession(_))));
        assert!(matches!(store.delete(a), Err(StoreError::NoSuchSession(_))));
        assert!(matches!(
            store.rename(a, "x"),
            Err(StoreError::NoSuchSession(_))
        ));
    }

    #[test]
    fn titles_and_markdown() {
        assert_eq!(title_from("\n  Hello there \nmore"), "Hello there");
        assert_eq!(title_from("   "), "Untitled");
        assert_eq!(title_from(&"x".repeat(70)).chars().count(), 61);
        let md = to_markdown("T", &state().messages);
        assert_eq!(md, "# T\n\n## You\n\nhi\n\n## Assistant\n\nhello\n");
    }
}
