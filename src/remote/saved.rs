//! Conversations held through `--connect`, saved on this machine: a session store of their own
//! (`remote.db` in the data dir), listed, opened, renamed, exported and deleted like local ones.
//! They are kept apart from the local chat's store because they hold messages only: the server
//! has the tokens and the cache, so a local model could not resume them.

use std::path::Path;

use crate::attention::LambdaParams;
use crate::chat::{Message, Role, code_blocks};
use crate::protocol::SessionSummary;
use crate::session::{Batch, History, MessageRecord, SessionHead, TokenRun};
use crate::store::{Store, StoreError, StoreHistory};

/// The open conversation's row, and how many of its messages the row holds.
struct Open {
    id: i64,
    history: StoreHistory,
    saved: usize,
}

pub struct SavedChats {
    store: Store,
    open: Option<Open>,
}

impl SavedChats {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            store: Store::open(path)?,
            open: None,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The open conversation's id, once it has a row.
    pub fn id(&self) -> Option<i64> {
        self.open.as_ref().map(|o| o.id)
    }

    /// A new row for the open conversation (with its first message), named `title`; `model`
    /// says which server and model it was held with.
    pub fn create(
        &mut self,
        title: &str,
        model: &str,
        params: LambdaParams,
    ) -> Result<i64, StoreError> {
        let id = self.store.create(title, model, params)?;
        let history = self.store.history(id)?;
        self.open = Some(Open {
            id,
            history,
            saved: 0,
        });
        Ok(id)
    }

    /// Lets go of the open conversation (a new one starts without a row).
    pub fn close(&mut self) {
        self.open = None;
    }

    /// Writes what changed since the last save: the messages from `changed` on (those before
    /// it are as saved) replace the row's from there.
    pub fn save(
        &mut self,
        messages: &[Message],
        changed: usize,
        params: LambdaParams,
    ) -> Result<(), StoreError> {
        let Some(open) = &mut self.open else {
            return Ok(());
        };
        let from = changed.min(open.saved);
        let system = messages
            .first()
            .filter(|m| m.role == Role::System)
            .map(|m| m.content.clone());
        let mut head = SessionHead::new(params, system);
        head.message_count = messages.len();
        let mut code_before = 0;
        let mut records = Vec::new();
        for (index, m) in messages.iter().enumerate() {
            if index >= from {
                records.push(MessageRecord {
                    index,
                    role: m.role,
                    content: m.content.clone(),
                    tokens: 0..0,
                    span: 0..0,
                    code_before,
                });
            }
            code_before += code_blocks(&m.content).len();
        }
        head.code_count = code_before;
        let batch = Batch {
            truncate: (from < open.saved).then_some((from, 0)),
            messages: &records,
            tokens: &TokenRun::default(),
            head: &head,
        };
        open.history
            .append(&batch)
            .map_err(|e| StoreError::Damaged(open.id, e.to_string()))?;
        open.saved = messages.len();
        Ok(())
    }

    /// Opens conversation `id`: its title and messages.
    pub fn load(&mut self, id: i64) -> Result<(String, Vec<Message>), StoreError> {
        self.open = None;
        let title = self.store.summary(id)?.title;
        let history = self.store.history(id)?;
        let damaged = |e: crate::session::HistoryError| StoreError::Damaged(id, e.to_string());
        let count = history
            .head()
            .map_err(damaged)?
            .map_or(0, |h| h.message_count);
        let messages: Vec<Message> = history
            .messages(0..count)
            .map_err(damaged)?
            .into_iter()
            .map(|r| Message::new(r.role, r.content))
            .collect();
        self.open = Some(Open {
            id,
            history,
            saved: messages.len(),
        });
        Ok((title, messages))
    }

    pub fn list(&self) -> Result<Vec<SessionSummary>, StoreError> {
        self.store.list()
    }

    /// Deletes conversation `id` (the open one is let go of first).
    pub fn delete(&mut self, id: i64) -> Result<(), StoreError> {
        if self.id() == Some(id) {
            self.open = None;
        }
        self.store.delete(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> LambdaParams {
        LambdaParams::new(4, 64, None).unwrap()
    }

    #[test]
    fn a_conversation_comes_back_as_saved_and_edits_replace_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("remote.db");
        let mut chats = SavedChats::open(&db).unwrap();
        let mut messages = vec![
            Message::new(Role::System, "be brief"),
            Message::new(Role::User, "hi"),
            Message::new(Role::Assistant, "```\ncode\n```"),
        ];
        let id = chats.create("hi", "tiny @ http://x", params()).unwrap();
        chats.save(&messages, 0, params()).unwrap();
        // The reply regenerated: from message 2 on.
        messages[2].content = "hello".into();
        messages.push(Message::new(Role::User, "again"));
        messages.push(Message::new(Role::Assistant, "sure"));
        chats.save(&messages, 2, params()).unwrap();
        chats.close();
        let mut again = SavedChats::open(&db).unwrap();
        let (title, loaded) = again.load(id).unwrap();
        assert_eq!(title, "hi");
        assert_eq!(loaded, messages);
        assert_eq!(again.list().unwrap()[0].messages, 5);
        again.delete(id).unwrap();
        assert!(again.list().unwrap().is_empty());
    }
}
