//! One conversation's history in the store: its rows in the database and its KV file, held by
//! one process at a time (a lock file beside the KV file).

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::Device;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::kv_file::{KvFile, KvFileError};
use super::token_rows;
use super::{StoreError, connect, kv_dir, now, role_name, role_of};
use crate::attention::{KvCache, LambdaParams, LayerGeometry, MAX_POSITION, SlotState};
use crate::session::{
    Batch, History, HistoryError, MessagePlace, MessageRecord, SavedKv, SessionHead, TokenRun,
};

pub(super) fn kv_path(db: &Path, id: i64) -> PathBuf {
    kv_dir(db).join(format!("{id}.kv"))
}

pub(super) fn lock_path(db: &Path, id: i64) -> PathBuf {
    kv_dir(db).join(format!("{id}.lock"))
}

/// A session's head as its row keeps it. The system prompt (message 0) and the last exchange
/// are rows of `messages`, written in the same transaction, so the row names them instead of
/// copying their text into every save (a 500-token prompt's 2.6 KB twice — as a message and
/// at the start of the fed text —, a long system prompt). A head written before this form
/// carries them inline and reads as it is.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredHead {
    #[serde(flatten)]
    head: SessionHead,
    /// The last exchange: messages `tail_messages.0..tail_messages.1`, when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tail_messages: Option<(usize, usize)>,
    /// The system prompt is message 0's text, left out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    system_is_message_0: bool,
    /// The fed tail begins with the last exchange's first message, left out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    fed_tail_after_first: bool,
}

/// `head` as its row keeps it (see [`StoredHead`]).
pub(super) fn head_json(head: &SessionHead) -> serde_json::Result<String> {
    let mut head = head.clone();
    let tail = std::mem::take(&mut head.tail);
    let contiguous = tail.windows(2).all(|w| w[0].index + 1 == w[1].index);
    let fed_tail_after_first = contiguous
        && tail.first().is_some_and(|first| {
            head.fed_tail_start == first.span.start && head.fed_tail.starts_with(&first.content)
        });
    if fed_tail_after_first {
        head.fed_tail.drain(..tail[0].content.len());
    }
    let stored = StoredHead {
        tail_messages: match (tail.first(), tail.last()) {
            (Some(first), Some(last)) if contiguous => Some((first.index, last.index + 1)),
            _ => {
                head.tail = tail;
                None
            }
        },
        system_is_message_0: head.system.take().is_some(),
        fed_tail_after_first,
        head,
    };
    serde_json::to_string(&stored)
}

/// Reads a head row back, taking the system prompt and the last exchange it names from
/// `messages`.
fn parse_head(history: &StoreHistory, json: &str) -> Result<SessionHead, HistoryError> {
    let damaged = |what: String| HistoryError::Store(format!("session {}: {what}", history.id));
    let stored: StoredHead = serde_json::from_str(json).map_err(|e| damaged(e.to_string()))?;
    let mut head = stored.head;
    if let Some((from, to)) = stored.tail_messages {
        head.tail = history.messages(from..to)?;
        if head.tail.len() != to - from {
            return Err(damaged(format!(
                "messages {from}..{to} of its last exchange are missing"
            )));
        }
        if stored.fed_tail_after_first {
            head.fed_tail.insert_str(0, &head.tail[0].content);
        }
    }
    if stored.system_is_message_0 {
        match history.messages(0..1)?.pop() {
            Some(m) if m.role == crate::protocol::Role::System => head.system = Some(m.content),
            _ => return Err(damaged("its system prompt (message 0) is missing".into())),
        }
    }
    Ok(head)
}

/// The messages holding token positions `?2..?3` of session `?1`: from the last message
/// starting at or before `?2` (messages' tokens come in order) to the last one starting before
/// `?3` — a range of `messages_by_token`, whatever the conversation's length. The index is
/// named and the order is its own, so the plan does not hang on SQLite's version: ordered by
/// `idx`, SQLite 3.40 walks every message of the session instead (3.54, bundled, sorts).
pub(super) const PLACES_SQL: &str = "
    SELECT idx, token_start, token_end, span_start, span_end
    FROM messages INDEXED BY messages_by_token
    WHERE session_id = ?1 AND token_start < ?3 AND token_start >= COALESCE(
        (SELECT MAX(token_start) FROM messages WHERE session_id = ?1 AND token_start <= ?2), 0)
    ORDER BY token_start, idx";

/// The token runs covering positions `?2..?3` of session `?1`: a range of the primary key.
pub(super) const TOKENS_SQL: &str = "
    SELECT first, data FROM tokens
    WHERE session_id = ?1 AND first < ?3 AND first >= COALESCE(
        (SELECT MAX(first) FROM tokens WHERE session_id = ?1 AND first <= ?2), 0)
    ORDER BY first";

/// Takes session `id`'s lock, or says another process holds it.
pub(super) fn lock(db: &Path, id: i64) -> Result<File, StoreError> {
    let dir = kv_dir(db);
    std::fs::create_dir_all(&dir).map_err(|e| StoreError::Io(dir.clone(), e))?;
    crate::durable::restrict_dir(&dir);
    let path = lock_path(db, id);
    let file = File::create(&path).map_err(|e| StoreError::Io(path.clone(), e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse(id)),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Io(path, e)),
    }
}

pub(super) fn insert_message(
    tx: &Transaction<'_>,
    id: i64,
    m: &MessageRecord,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO messages (session_id, idx, role, content, token_start, token_end,
            span_start, span_end, code_before) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            id,
            m.index as i64,
            role_name(m.role),
            m.content,
            m.tokens.start as i64,
            m.tokens.end as i64,
            m.span.start as i64,
            m.span.end as i64,
            m.code_before as i64
        ],
    )?;
    Ok(())
}

pub(super) fn insert_tokens(
    tx: &Transaction<'_>,
    id: i64,
    first: u64,
    ids: &[u32],
    offsets: &[u64],
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO tokens (session_id, first, last, data) VALUES (?1, ?2, ?3, ?4)",
        params![
            id,
            first as i64,
            (first + ids.len() as u64) as i64,
            token_rows::encode(ids, offsets)
        ],
    )?;
    Ok(())
}

/// A token row's run, or the conversation is damaged.
fn decode_run(id: i64, first: i64, data: &[u8]) -> Result<TokenRun, HistoryError> {
    // A negative start (or one near u64::MAX once cast) would wrap the run's end: refused with
    // the other damage (found by the `store_load` fuzz target).
    let start = u64::try_from(first).ok().filter(|&f| f <= MAX_POSITION);
    start
        .and_then(|f| token_rows::decode(f, data))
        .ok_or_else(|| {
            HistoryError::Store(
                StoreError::Damaged(id, format!("the token run at {first} does not decode"))
                    .to_string(),
            )
        })
}

pub struct StoreHistory {
    db: Connection,
    path: PathBuf,
    id: i64,
    /// Held while this process has the session open.
    _lock: File,
}

fn sql(e: rusqlite::Error) -> HistoryError {
    HistoryError::Store(format!("session database: {e}"))
}

fn kv_err(e: KvFileError) -> HistoryError {
    HistoryError::Store(e.to_string())
}

impl StoreHistory {
    pub(super) fn open(db: &Path, id: i64) -> Result<Self, StoreError> {
        let lock = lock(db, id)?;
        Ok(Self {
            db: connect(db)?,
            path: db.to_path_buf(),
            id,
            _lock: lock,
        })
    }

    /// The session's id in the store.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Caps the database at its size now plus `extra` pages (SQLite's `max_page_count`): how
    /// the tests fill the disk.
    #[cfg(test)]
    pub(super) fn limit_pages(&self, extra: i64) {
        let pages: i64 = self
            .db
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("a page count");
        self.db
            .pragma_update(None, "max_page_count", pages + extra)
            .expect("a page limit");
    }
}

impl History for StoreHistory {
    fn head(&self) -> Result<Option<SessionHead>, HistoryError> {
        let json: Option<String> = self
            .db
            .query_row("SELECT head FROM sessions WHERE id = ?1", [self.id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql)?;
        let Some(json) = json else {
            return Err(HistoryError::Missing(format!("session {}", self.id)));
        };
        let head = parse_head(self, &json)?;
        Ok((head.token_count > 0 || head.message_count > 0).then_some(head))
    }

    fn append(&mut self, batch: &Batch<'_>) -> Result<(), HistoryError> {
        let head = head_json(batch.head).map_err(|e| HistoryError::Store(e.to_string()))?;
        let tx = self.db.transaction().map_err(sql)?;
        if let Some((messages, tokens)) = batch.truncate {
            tx.execute(
                "DELETE FROM messages WHERE session_id = ?1 AND idx >= ?2",
                params![self.id, messages as i64],
            )
            .map_err(sql)?;
            // A run that straddles the cut keeps its part before it.
            let straddling: Option<(i64, Vec<u8>)> = tx
                .query_row(
                    "SELECT first, data FROM tokens
                     WHERE session_id = ?1 AND first < ?2 AND last > ?2",
                    params![self.id, tokens as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(sql)?;
            tx.execute(
                "DELETE FROM tokens WHERE session_id = ?1 AND first >= ?2",
                params![self.id, tokens as i64],
            )
            .map_err(sql)?;
            if let Some((first, data)) = straddling {
                let mut run = decode_run(self.id, first, &data)?;
                run.truncate(tokens);
                insert_tokens(&tx, self.id, run.first, &run.ids, &run.offsets).map_err(sql)?;
            }
        }
        for m in batch.messages {
            insert_message(&tx, self.id, m).map_err(sql)?;
        }
        if !batch.tokens.ids.is_empty() {
            let t = batch.tokens;
            insert_tokens(&tx, self.id, t.first, &t.ids, &t.offsets).map_err(sql)?;
        }
        let changed = tx
            .execute(
                "UPDATE sessions SET updated = ?2, message_count = ?3, token_count = ?4,
                    head = ?5 WHERE id = ?1",
                params![
                    self.id,
                    now(),
                    batch.head.message_count as i64,
                    batch.head.token_count as i64,
                    head
                ],
            )
            .map_err(sql)?;
        if changed == 0 {
            return Err(HistoryError::Missing(format!("session {}", self.id)));
        }
        tx.commit().map_err(sql)
    }

    fn save_kv(
        &mut self,
        cache: &KvCache,
        positions: Range<u64>,
        globals: Option<&[u8]>,
        restart: bool,
    ) -> Result<(), HistoryError> {
        let slots = cache.params().n_local as u64 + 1;
        let floats = cache.slot_floats();
        let kv_type = cache.kv_type();
        let path = kv_path(&self.path, self.id);
        let existing = if restart {
            None
        } else {
            KvFile::open_as(&path, floats, slots, kv_type).map_err(kv_err)?
        };
        let window = positions.end.saturating_sub(slots - 1);
        let created = existing.is_none();
        let (mut file, positions) = match existing {
            Some(f) => {
                // Positions of the window the file lacks (a regenerated reply's predecessor
                // overwrote their slots) go with the new ones.
                let start = (window..positions.start)
                    .find(|&p| f.entry(p).position != p)
                    .unwrap_or(positions.start);
                (f, start..positions.end)
            }
            None => {
                // A new file (or another layout or type): it is whole only once the window is
                // in it.
                self.db
                    .execute("UPDATE sessions SET kv_whole = 0 WHERE id = ?1", [self.id])
                    .map_err(sql)?;
                let f = KvFile::create(&path, floats, slots, kv_type).map_err(kv_err)?;
                (f, window..positions.end)
            }
        };
        let mut failed = None;
        cache
            .read_slots(positions.clone(), |pos, data, state| {
                // A turn longer than the window: its first tokens are gone already.
                if state != SlotState::Missing
                    && failed.is_none()
                    && let Err(e) = file.write(pos, data, state == SlotState::Complete)
                {
                    failed = Some(e);
                }
            })
            .map_err(|e| HistoryError::Store(e.to_string()))?;
        if let Some(e) = failed {
            return Err(kv_err(e));
        }
        file.sync().map_err(kv_err)?;
        // The usual save ends here: the file's table says which window it holds, and the
        // database is not written again.
        if globals.is_none() && !created {
            return Ok(());
        }
        let tx = self.db.transaction().map_err(sql)?;
        if let Some(g) = globals {
            tx.execute(
                "INSERT OR REPLACE INTO kv_globals (session_id, data) VALUES (?1, ?2)",
                params![self.id, g],
            )
            .map_err(sql)?;
        }
        if created {
            // From here on the file's table is to be trusted.
            tx.execute("UPDATE sessions SET kv_whole = 1 WHERE id = ?1", [self.id])
                .map_err(sql)?;
            // A format-1 snapshot served its one resume.
            tx.execute(
                "DELETE FROM legacy_snapshots WHERE session_id = ?1",
                [self.id],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    fn forget_kv_from(&mut self, position: u64) -> Result<(), HistoryError> {
        KvFile::forget_from(&kv_path(&self.path, self.id), position).map_err(kv_err)
    }

    fn load_kv(
        &self,
        params: LambdaParams,
        layers: Vec<LayerGeometry>,
        device: &Device,
    ) -> Result<SavedKv, HistoryError> {
        let head = self
            .head()?
            .unwrap_or_else(|| SessionHead::new(params, None));
        let row: Option<(i64, Option<Vec<u8>>)> = self
            .db
            .query_row(
                "SELECT kv_whole, (SELECT data FROM kv_globals WHERE session_id = ?1)
                 FROM sessions WHERE id = ?1",
                [self.id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql)?;
        let (whole, globals) = row.unwrap_or((0, None));
        let legacy: Option<(i64, Vec<u8>)> = self
            .db
            .query_row(
                "SELECT tokens, data FROM legacy_snapshots WHERE session_id = ?1",
                [self.id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql)?;
        if let Some((tokens, data)) = legacy {
            return Ok(
                match KvCache::from_snapshot(&data, params, layers, device) {
                    Ok(cache) if tokens as u64 == head.tokens_fed => {
                        SavedKv::Cache(tokens as u64, cache)
                    }
                    Ok(_) => SavedKv::Nothing("the snapshot is older than the messages".into()),
                    Err(e) => SavedKv::Nothing(e.to_string()),
                },
            );
        }
        let (Some(globals), true) = (globals, whole == 1) else {
            return Ok(SavedKv::Nothing("no saved cache".into()));
        };
        let host = KvCache::Host(crate::attention::HostCache::new(params, layers.clone()));
        let slots = params.n_local as u64 + 1;
        let Some(file) = KvFile::open(&kv_path(&self.path, self.id), host.slot_floats(), slots)
            .map_err(kv_err)?
        else {
            return Ok(SavedKv::Nothing("the saved cache's file is missing".into()));
        };
        let widest = layers.iter().map(|g| g.window as u64).max().unwrap_or(0);
        let narrowest = layers.iter().map(|g| g.window as u64).min().unwrap_or(0);
        let Some(end) = file.best_end(0, head.tokens_fed, widest, narrowest) else {
            return Ok(SavedKv::Nothing(
                "the saved cache's window is incomplete".into(),
            ));
        };
        match KvCache::from_parts(&globals, params, layers, device, end, |p| file.read(p)) {
            Ok(cache) => Ok(SavedKv::Cache(end, cache)),
            Err(e) => Ok(SavedKv::Nothing(e.to_string())),
        }
    }

    fn messages(&self, range: Range<usize>) -> Result<Vec<MessageRecord>, HistoryError> {
        let mut stmt = self
            .db
            .prepare_cached(
                "SELECT idx, role, content, token_start, token_end, span_start, span_end,
                    code_before FROM messages WHERE session_id = ?1 AND idx >= ?2 AND idx < ?3
                 ORDER BY idx",
            )
            .map_err(sql)?;
        let rows = stmt
            .query_map(
                params![self.id, range.start as i64, range.end as i64],
                |r| {
                    Ok(MessageRecord {
                        index: r.get::<_, i64>(0)? as usize,
                        role: role_of(&r.get::<_, String>(1)?),
                        content: r.get(2)?,
                        tokens: r.get::<_, i64>(3)? as u64..r.get::<_, i64>(4)? as u64,
                        span: r.get::<_, i64>(5)? as u64..r.get::<_, i64>(6)? as u64,
                        code_before: r.get::<_, i64>(7)? as usize,
                    })
                },
            )
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    fn places(&self, positions: Range<u64>) -> Result<Vec<MessagePlace>, HistoryError> {
        let mut stmt = self.db.prepare_cached(PLACES_SQL).map_err(sql)?;
        let rows = stmt
            .query_map(
                params![self.id, positions.start as i64, positions.end as i64],
                |r| {
                    Ok(MessagePlace {
                        index: r.get::<_, i64>(0)? as usize,
                        tokens: (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
                        span: (r.get::<_, i64>(3)? as u64, r.get::<_, i64>(4)? as u64),
                    })
                },
            )
            .map_err(sql)?;
        let places: Vec<MessagePlace> = rows.collect::<Result<_, _>>().map_err(sql)?;
        Ok(places
            .into_iter()
            .filter(|p| p.tokens.0 < positions.end && positions.start < p.tokens.1)
            .collect())
    }

    fn tokens(&self, positions: Range<u64>) -> Result<TokenRun, HistoryError> {
        let mut stmt = self.db.prepare_cached(TOKENS_SQL).map_err(sql)?;
        let rows = stmt
            .query_map(
                params![self.id, positions.start as i64, positions.end as i64],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )
            .map_err(sql)?;
        let mut out = TokenRun::starting_at(positions.start);
        for row in rows {
            let (first, data) = row.map_err(sql)?;
            let run = decode_run(self.id, first, &data)?;
            let part = run.slice(positions.clone());
            if out.ids.is_empty() {
                out = part;
            } else if part.first == out.end() {
                out.extend(&part);
            }
        }
        Ok(out)
    }
}
