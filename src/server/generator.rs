//! The one thread that runs the model for the server, and the conversations it keeps alive.
//!
//! HTTP handlers never wait on the model: they queue a [`Job`] (a bounded queue: when it is
//! full the request is answered 429 at once) and read its [`Event`]s from a channel. The
//! thread owns every live [`Session`]; a request whose messages extend one of them continues
//! its Λ cache and feeds only the new messages, as llama-server's prompt cache matches on the
//! prompt's prefix. At most `conversations` stay live, the least recently used going first.
//!
//! A client that goes away closes its channel; the next token's send fails and generation
//! stops there. A panic inside a job fails that job alone: its conversation is dropped and
//! the thread goes on.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};

use candle_core::Device;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedSender;

use super::openai::{Checked, FinishReason, Input, LambdaUsage, Usage};
use crate::attention::KvType;
use crate::attention::LambdaParams;
use crate::attention::recall::RecallParams;
use crate::chat::{Message, Role};
use crate::engine::Engine;
use crate::protocol::{Look, LookRequest, Looked, Notice, StopReason};
use crate::sampling::SamplingParams;
use crate::session::{Resumed, Session, SessionError, TurnEvent};
use crate::store::{Store, StoreError};

/// What a job sends back while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Reply text, in order.
    Text(String),
    /// The reply ended.
    Done(FinishReason, Usage),
    /// The job failed (nothing more follows).
    Failed(String),
    /// Prompt tokens read so far, of `total`, before the reply's first token.
    Prefill { done: usize, total: usize },
    /// A look's answer (the job's only event).
    Looked(Looked),
    /// The look's conversation is not held (never was, or was dropped).
    NotHeld,
}

/// What a job asks of the generator.
enum Work {
    /// A completion.
    Reply(Checked),
    /// A look at a conversation (the lambdachat extension).
    Look(LookRequest),
}

/// Work and where its events go.
struct Job {
    work: Work,
    events: UnboundedSender<Event>,
    slot: Slot,
}

/// A job's place among those the generator accepts (the one running and the `queue` waiting):
/// given back once, when its reply is sent in full or when the job ends otherwise, so a request
/// that follows a finished reply is never refused while the generator tidies up after it.
struct Slot(Arc<AtomicUsize>, bool);

impl Slot {
    fn release(&mut self) {
        if !std::mem::replace(&mut self.1, true) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

/// How the generator runs.
#[derive(Debug, Clone)]
pub struct GeneratorOptions {
    pub params: LambdaParams,
    /// Conversations kept live (each holds one bounded cache).
    pub conversations: usize,
    /// Requests that may wait while one runs; more are refused.
    pub queue: usize,
    /// Recall's parameters and the folder of its stores, when it is on.
    pub recall: Option<(RecallParams, PathBuf)>,
    /// Where conversations beyond `conversations` wait on disk, when they do (else they are
    /// dropped).
    pub saved: Option<SavedOptions>,
}

/// Idle conversations kept on disk: a session store of their own, and how many it keeps.
#[derive(Debug, Clone)]
pub struct SavedOptions {
    /// The store's database (its KV files go beside it).
    pub db: PathBuf,
    /// Conversations kept there at most; the least recently used go first.
    pub max: usize,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full.
    Busy,
    /// The generation thread is gone.
    Gone,
}

/// The handle the HTTP side queues jobs through.
#[derive(Clone)]
pub struct Generator {
    jobs: Sender<Job>,
    /// The Λ every conversation runs with.
    pub params: LambdaParams,
    /// How the caches hold keys and values.
    pub kv_type: KvType,
    /// Jobs accepted and not done: at most `limit` (one running, `queue` waiting).
    taken: Arc<AtomicUsize>,
    limit: usize,
}

impl Generator {
    /// Starts the generation thread.
    pub fn start(engine: Arc<Engine>, options: GeneratorOptions) -> std::io::Result<Self> {
        let (jobs, queue) = channel();
        let limit = options.queue + 1;
        let (params, kv_type) = (options.params, engine.kv_type);
        std::thread::Builder::new()
            .name("generation".into())
            .spawn(move || run(Conversations::new(engine, options), queue))?;
        Ok(Self {
            jobs,
            params,
            kv_type,
            taken: Arc::new(AtomicUsize::new(0)),
            limit,
        })
    }

    /// Queues `request`, whose events go to `events`; refused when one job runs and `queue`
    /// wait already.
    pub fn submit(&self, request: Checked, events: UnboundedSender<Event>) -> Result<(), Refused> {
        self.queue(Work::Reply(request), events)
    }

    /// Queues a look at a conversation, as [`Self::submit`] queues a request: in turn with
    /// the replies (the thread owns the conversations).
    pub fn look(
        &self,
        request: LookRequest,
        events: UnboundedSender<Event>,
    ) -> Result<(), Refused> {
        self.queue(Work::Look(request), events)
    }

    fn queue(&self, work: Work, events: UnboundedSender<Event>) -> Result<(), Refused> {
        if self.taken.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Busy);
        }
        let slot = Slot(self.taken.clone(), false);
        self.jobs
            .send(Job { work, events, slot })
            .map_err(|_| Refused::Gone) // the job, and so its slot, came back and was dropped
    }
}

fn run(mut conversations: Conversations, queue: Receiver<Job>) {
    for job in queue {
        // A client that left while its job waited costs nothing.
        if job.events.is_closed() {
            continue;
        }
        let events = job.events.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Device::Cpu.with_context(|| conversations.answer(job))
        }));
        let failure = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "internal error: generation panicked (see the log)".to_string(),
        };
        tracing::warn!("request failed: {failure}");
        let _ = events.send(Event::Failed(failure));
    }
}

/// A conversation the generator holds in RAM: what the client knows of it, its session, and
/// its row in the saved store once it was saved there.
struct Live {
    known: Known,
    session: Session,
    stored: Option<i64>,
    used: u64,
    /// It came back from disk for this request.
    restored: bool,
}

/// Why a conversation could not go to disk or come back from it.
#[derive(Debug, thiserror::Error)]
enum SavedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// A conversation waiting on disk (its row in the saved store).
struct Saved {
    known: Known,
    id: i64,
    used: u64,
}

/// A conversation as the client sees it, which a later request may extend: a digest, not the
/// text, so a conversation costs the same few bytes however long it grew (the client sends the
/// text again with every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// The digest of the first `messages` messages, every reply as it was sent.
    Chat { digest: [u8; 32], messages: usize },
    /// The digest of a raw text's first `bytes` bytes: the prompts and completions as sent.
    Text { digest: [u8; 32], bytes: usize },
}

/// The digests of a chat's first 0, 1, … n messages: each chains the one before with a
/// message's role and content, so equal digests mean equal prefixes.
fn chat_digests(messages: &[Message]) -> Vec<[u8; 32]> {
    let mut digests = Vec::with_capacity(messages.len() + 1);
    let mut d: [u8; 32] = Sha256::digest(b"lambdachat chat").into();
    digests.push(d);
    for m in messages {
        let mut h = Sha256::new();
        h.update(d);
        h.update([m.role as u8]);
        h.update((m.content.len() as u64).to_le_bytes());
        h.update(m.content.as_bytes());
        d = h.finalize().into();
        digests.push(d);
    }
    digests
}

fn text_digest(text: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"lambdachat text");
    h.update(text.as_bytes());
    h.finalize().into()
}

/// A request's input with the digests its prefixes are matched by.
struct Prefixes<'a> {
    input: &'a Input,
    chat: Vec<[u8; 32]>,
}

impl<'a> Prefixes<'a> {
    fn of(input: &'a Input) -> Self {
        let chat = match input {
            Input::Chat(messages) => chat_digests(messages),
            Input::Text { .. } => Vec::new(),
        };
        Self { input, chat }
    }
}

impl Known {
    fn of_chat(messages: &[Message]) -> Self {
        Self::Chat {
            digest: chat_digests(messages)[messages.len()],
            messages: messages.len(),
        }
    }

    fn of_text(text: &str) -> Self {
        Self::Text {
            digest: text_digest(text),
            bytes: text.len(),
        }
    }

    /// How much of the input this conversation already holds (messages or bytes), when the
    /// input extends it: a chat by at least one message, a text by at least one byte.
    fn extended_by(&self, p: &Prefixes<'_>) -> Option<usize> {
        match (*self, p.input) {
            (Self::Chat { digest, messages }, Input::Chat(all)) => {
                (messages < all.len() && p.chat[messages] == digest).then_some(messages)
            }
            (Self::Text { digest, bytes }, Input::Text { prompt, .. }) => (bytes < prompt.len()
                && prompt.is_char_boundary(bytes)
                && text_digest(&prompt[..bytes]) == digest)
                .then_some(bytes),
            _ => None,
        }
    }

    /// The title a saved conversation's row carries: how it is found again after a restart.
    fn title(&self) -> String {
        let hex = |d: &[u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        match self {
            Self::Chat { digest, messages } => format!("chat {messages} {}", hex(digest)),
            Self::Text { digest, bytes } => format!("text {bytes} {}", hex(digest)),
        }
    }

    fn from_title(title: &str) -> Option<Self> {
        let mut parts = title.split(' ');
        let (kind, n, hex) = (parts.next()?, parts.next()?, parts.next()?);
        let n: usize = n.parse().ok()?;
        if hex.len() != 64 || parts.next().is_some() {
            return None;
        }
        let mut digest = [0u8; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        match kind {
            "chat" => Some(Self::Chat {
                digest,
                messages: n,
            }),
            "text" => Some(Self::Text { digest, bytes: n }),
            _ => None,
        }
    }
}

struct Conversations {
    engine: Arc<Engine>,
    options: GeneratorOptions,
    live: Vec<Live>,
    /// Conversations waiting on disk, and their store (none when they are not kept).
    saved: Vec<Saved>,
    store: Option<Store>,
    clock: u64,
}

impl Conversations {
    /// The generator's conversations: none live, and those a previous server left in the saved
    /// store (found again by their titles) waiting on disk.
    fn new(engine: Arc<Engine>, options: GeneratorOptions) -> Self {
        let mut this = Self {
            engine,
            store: None,
            saved: Vec::new(),
            live: Vec::new(),
            clock: 0,
            options,
        };
        if let Some(saved) = this.options.saved.clone() {
            match this.open_saved(&saved.db) {
                Ok(()) => this.trim_saved(),
                Err(e) => tracing::warn!(
                    "idle conversations will be dropped, not kept on disk ({}): {e}",
                    saved.db.display()
                ),
            }
        }
        this
    }

    fn open_saved(&mut self, db: &std::path::Path) -> Result<(), StoreError> {
        if let Some(dir) = db.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(dir.to_path_buf(), e))?;
        }
        let store = Store::open(db)?;
        let mut rows = store.list()?;
        rows.sort_by_key(|r| r.updated);
        for row in rows {
            match Known::from_title(&row.title) {
                Some(known) => {
                    self.clock += 1;
                    self.saved.push(Saved {
                        known,
                        id: row.id,
                        used: self.clock,
                    });
                }
                None => {
                    let _ = store.delete(row.id);
                }
            }
        }
        self.store = Some(store);
        Ok(())
    }

    /// The conversation that `input` extends (the longest such), live or restored from disk.
    fn take_prefix_of(&mut self, input: &Input) -> Option<Live> {
        let prefixes = Prefixes::of(input);
        let live = self
            .live
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.known.extended_by(&prefixes).map(|n| (n, i)))
            .max();
        let saved = self
            .saved
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.known.extended_by(&prefixes).map(|n| (n, i)))
            .max();
        match (live, saved) {
            (Some((n, i)), saved) if saved.is_none_or(|(m, _)| n >= m) => {
                Some(self.live.swap_remove(i))
            }
            (_, Some((_, i))) => {
                let saved = self.saved.swap_remove(i);
                self.restore(saved)
            }
            _ => None,
        }
    }

    /// A saved conversation back in RAM: its session resumed from the store (its cache from
    /// the KV file, or its window read again). `None`, and the row deleted, when that fails.
    fn restore(&mut self, saved: Saved) -> Option<Live> {
        let store = self.store.as_ref()?;
        let resumed = store
            .history(saved.id)
            .map_err(SavedError::from)
            .and_then(|h| {
                let engine = self.engine.clone();
                Ok(Session::resume(
                    engine,
                    SamplingParams::default(),
                    Box::new(h),
                )?)
            })
            .and_then(|(mut session, how)| {
                if let Resumed::Reread(why) = &how {
                    tracing::info!("a saved conversation's cache is read again: {why}");
                }
                session.catch_up(&AtomicBool::new(false), &mut |_| {})?;
                session.set_recall(self.options.recall.clone())?;
                Ok(session)
            });
        match resumed {
            Ok(session) => Some(Live {
                known: saved.known,
                session,
                stored: Some(saved.id),
                used: saved.used,
                restored: true,
            }),
            Err(e) => {
                tracing::warn!("a saved conversation could not be restored (read anew): {e}");
                let _ = store.delete(saved.id);
                None
            }
        }
    }

    /// Keeps `live`; beyond the limit the least recently used conversations go to disk (or
    /// are dropped when none are kept there).
    fn keep(&mut self, mut live: Live) {
        self.clock += 1;
        live.used = self.clock;
        self.live.push(live);
        while self.live.len() > self.options.conversations.max(1) {
            if let Some(oldest) = self
                .live
                .iter()
                .enumerate()
                .min_by_key(|(_, l)| l.used)
                .map(|(i, _)| i)
            {
                let idle = self.live.swap_remove(oldest);
                self.put_away(idle);
            }
        }
    }

    /// Saves an idle conversation to the store (only what changed since it was last there)
    /// and lets go of its RAM.
    fn put_away(&mut self, mut idle: Live) {
        let Some(store) = &self.store else { return };
        let saved = (|| -> Result<i64, SavedError> {
            let id = match idle.stored {
                Some(id) => id,
                None => {
                    let model = &self.engine.model.info().name;
                    let id = store.create(&idle.known.title(), model, idle.session.params())?;
                    idle.stored = Some(id);
                    idle.session.attach_history(Box::new(store.history(id)?));
                    id
                }
            };
            store.rename(id, &idle.known.title())?;
            idle.session.save()?;
            Ok(id)
        })();
        let (stored, known) = (idle.stored, idle.known);
        drop(idle); // the session lets go of its history (and its lock)
        match saved {
            Ok(id) => {
                self.saved.push(Saved {
                    known,
                    id,
                    used: self.clock,
                });
                self.trim_saved();
            }
            Err(e) => {
                tracing::warn!("an idle conversation could not be saved (dropped): {e}");
                if let Some(id) = stored {
                    let _ = store.delete(id);
                }
            }
        }
    }

    /// Deletes the least recently used saved conversations beyond the limit.
    fn trim_saved(&mut self) {
        let (Some(store), Some(options)) = (&self.store, &self.options.saved) else {
            return;
        };
        while self.saved.len() > options.max {
            let oldest = (0..self.saved.len()).min_by_key(|&i| self.saved[i].used);
            if let Some(i) = oldest {
                let gone = self.saved.swap_remove(i);
                if let Err(e) = store.delete(gone.id) {
                    tracing::warn!("a saved conversation could not be deleted: {e}");
                }
            }
        }
    }

    /// A conversation that will not be continued: its saved row (stale now) goes too.
    fn forget(&self, live: Live) {
        let stored = live.stored;
        drop(live);
        if let (Some(store), Some(id)) = (&self.store, stored) {
            let _ = store.delete(id);
        }
    }

    /// A new conversation for `input`: a chat's system message is its system prompt, a text
    /// is continued raw.
    fn fresh(&self, input: &Input) -> Result<Live, SessionError> {
        let system = match input {
            Input::Chat(messages) => messages
                .first()
                .filter(|m| m.role == Role::System)
                .map(|m| m.content.clone()),
            Input::Text { .. } => None,
        };
        let mut session = Session::new(
            self.engine.clone(),
            self.options.params,
            SamplingParams::default(),
            system.clone(),
        )?;
        session.set_raw(matches!(input, Input::Text { .. }));
        session.set_recall(self.options.recall.clone())?;
        let known = match input {
            Input::Chat(messages) => Known::of_chat(&messages[..system.is_some() as usize]),
            Input::Text { .. } => Known::of_text(""),
        };
        Ok(Live {
            known,
            session,
            stored: None,
            used: 0,
            restored: false,
        })
    }

    /// Takes a look at the conversation held for `request.messages` exactly, live or on disk;
    /// it then counts as used.
    fn look(&mut self, request: LookRequest) -> Result<Event, SessionError> {
        let known = Known::of_chat(&request.messages);
        let held = match self.live.iter().position(|l| l.known == known) {
            Some(i) => Some(self.live.swap_remove(i)),
            None => match self.saved.iter().position(|s| s.known == known) {
                Some(i) => {
                    let saved = self.saved.swap_remove(i);
                    self.restore(saved)
                }
                None => None,
            },
        };
        let Some(mut live) = held else {
            return Ok(Event::NotHeld);
        };
        let looked = look_at(&mut live.session, request.look);
        self.keep(live);
        Ok(Event::Looked(looked?))
    }

    fn answer(&mut self, job: Job) -> Result<(), SessionError> {
        let Job {
            work,
            events,
            mut slot,
        } = job;
        let request = match work {
            Work::Reply(request) => request,
            Work::Look(look) => {
                let _ = events.send(self.look(look)?);
                return Ok(());
            }
        };
        let restore_start = std::time::Instant::now();
        let continued = self.take_prefix_of(&request.input);
        let is_continued = continued.is_some();
        let mut live = match continued {
            Some(l) => l,
            None => self.fresh(&request.input)?,
        };
        let restore_s = restore_start.elapsed().as_secs_f64();
        match reply(
            &mut live,
            &request,
            &events,
            is_continued,
            restore_s,
            &mut slot,
        ) {
            Ok(Some(known)) => {
                live.known = known;
                live.restored = false;
                self.keep(live);
                Ok(())
            }
            // Nobody knows this conversation as the cache holds it: no request will continue it.
            Ok(None) => {
                self.forget(live);
                Ok(())
            }
            Err(e) => {
                self.forget(live);
                Err(e)
            }
        }
    }
}

/// What `look` asks of `session`, and its timeline after it.
fn look_at(session: &mut Session, look: Look) -> Result<Looked, SessionError> {
    let mut inspect = None;
    let mut pinned = None;
    match look {
        Look::Timeline => {}
        Look::Inspect(i) => inspect = Some(session.inspect(i)?),
        Look::Pin(i) => {
            pinned = Some(match session.pin(i)? {
                Notice::Pinned { tokens, lost } => (tokens, lost),
                _ => (0, 0),
            })
        }
        Look::Unpin(i) => session.unpin(i)?,
    }
    Ok(Looked {
        timeline: session.timeline()?,
        inspect,
        pinned,
    })
}

/// Feeds what `request` adds to `live` and generates the reply, sending its events. Returns
/// what the client then knows of the conversation, or `None` when that is not what the cache
/// holds (it left before the end, or a stop sequence cut the reply short).
fn reply(
    live: &mut Live,
    request: &Checked,
    events: &UnboundedSender<Event>,
    is_continued: bool,
    restore_s: f64,
    slot: &mut Slot,
) -> Result<Option<Known>, SessionError> {
    let session = &mut live.session;
    session.set_sampling(request.sampling.clone())?;
    // What inspect mode shows of the reply's last token, when the client asked for it.
    session.set_probe(request.probe);
    let reused = session.token_count();
    let start = std::time::Instant::now();
    let (fed, user) = match (live.known, &request.input) {
        (
            Known::Chat {
                messages: known, ..
            },
            Input::Chat(messages),
        ) => read_exchanges(session, &messages[known..])?,
        (Known::Text { bytes, .. }, Input::Text { prompt, echo }) => {
            if *echo {
                let _ = events.send(Event::Text(prompt.clone()));
            }
            (0, prompt[bytes..].to_string())
        }
        _ => unreachable!("a conversation is continued only by input of its kind"),
    };
    let cancel = AtomicBool::new(false);
    let mut stops = StopMatcher::new(request.stop.clone());
    let mut sent = String::new();
    let send = |text: String, sent: &mut String| {
        if text.is_empty() {
            return;
        }
        sent.push_str(&text);
        if events.send(Event::Text(text)).is_err() {
            cancel.store(true, Ordering::Relaxed); // the client went away
        }
    };
    let report = session.turn(&user, Some(request.max_tokens), &cancel, &mut |e| {
        // Every prefill chunk and every token reports: a client that left is noticed
        // within one, whether or not the token showed text.
        if events.is_closed() {
            cancel.store(true, Ordering::Relaxed);
        }
        match e {
            TurnEvent::Text(t) => {
                let (text, hit) = stops.push(t);
                send(text, &mut sent);
                if hit {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
            TurnEvent::Prefill { done, total } => {
                let _ = events.send(Event::Prefill { done, total });
            }
            TurnEvent::Stats(_) => {}
        }
    })?;
    if !stops.hit {
        send(stops.finish(), &mut sent);
    }
    // Nothing is regenerated here: the cache need not keep copies of what it overwrote.
    session.drop_rewind_points();
    let finish = match report.stop {
        StopReason::Length if !stops.hit => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    let stats = session.stats();
    let fed = (fed + report.prompt_tokens) as u64;
    let usage = Usage {
        prompt_tokens: reused + fed,
        completion_tokens: report.generated_tokens as u64,
        total_tokens: reused + fed + report.generated_tokens as u64,
        lambdachat: LambdaUsage {
            continued: is_continued,
            restored: live.restored,
            restore_s: if live.restored { restore_s } else { 0.0 },
            tokens_reused: reused,
            tokens_fed: fed,
            tokens_seen: stats.tokens_seen,
            tokens_attended: stats.attended_global + stats.attended_window,
            tokens_evicted: stats.evicted,
            kv_bytes: stats.bytes,
            // What the earlier exchanges took counts as prefill too.
            prefill_s: start.elapsed().as_secs_f64() - report.decode_time.as_secs_f64(),
            decode_s: report.decode_time.as_secs_f64(),
            decode_tok_s: report.decode_tok_s(),
        },
    };
    tracing::info!(
        continued = is_continued,
        reused,
        fed,
        generated = report.generated_tokens,
        raw = session.is_raw(),
        "completion"
    );
    // The reply is complete for the client: the next request may take this job's place.
    slot.release();
    let _ = events.send(Event::Done(finish, usage));
    // A client that left knows no reply; one whose stop sequence ended it knows less of the
    // reply than the cache read (the stop and what came with it): neither can be continued.
    if report.stop == StopReason::Cancelled || stops.hit {
        return Ok(None);
    }
    Ok(Some(match &request.input {
        Input::Chat(messages) => {
            let mut messages = messages.clone();
            messages.push(Message::new(Role::Assistant, sent));
            Known::of_chat(&messages)
        }
        // What the client can send back: the prompt and the completion it was sent.
        Input::Text { prompt, .. } => Known::of_text(&format!("{prompt}{sent}")),
    }))
}

/// Reads what follows the known part of a chat into `session`: exchanges with their given
/// replies. Returns the tokens fed and the new prompt (consecutive user messages read as one,
/// as the session renders them).
fn read_exchanges(
    session: &mut Session,
    messages: &[Message],
) -> Result<(usize, String), SessionError> {
    let mut fed = 0;
    let mut user = String::new();
    for m in messages {
        match m.role {
            Role::User => {
                if !user.is_empty() {
                    user.push_str("\n\n");
                }
                user.push_str(&m.content);
            }
            Role::Assistant => {
                fed += session.exchange(&std::mem::take(&mut user), &m.content)?;
            }
            Role::System => {}
        }
    }
    Ok((fed, user))
}

/// Finds stop sequences in streamed text: text that may be the start of one is held back
/// until the next piece tells, so nothing of a stop sequence is ever sent.
struct StopMatcher {
    stops: Vec<String>,
    held: String,
    hit: bool,
}

impl StopMatcher {
    fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
            hit: false,
        }
    }

    /// The text that can be sent now, and whether a stop sequence was reached (the text is
    /// then what came before it, and nothing more is to be sent).
    fn push(&mut self, text: &str) -> (String, bool) {
        if self.hit {
            return (String::new(), true);
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.hit = true;
            self.held.truncate(at);
            return (std::mem::take(&mut self.held), true);
        }
        // Keep the longest tail of the held text that a stop sequence starts with.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&n| s.is_char_boundary(n) && self.held.ends_with(&s[..n]))
                    .take(1)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let rest = self.held.split_off(cut);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// What was held back when the reply ends.
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, hit) = m.push(p);
            out.push_str(&text);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_sequence_split_over_pieces_is_never_sent() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D and more"]),
            ("hello ".into(), true)
        );
        assert_eq!(
            run(&["END"], &["hello E", "NX"]),
            ("hello ENX".into(), false)
        );
        assert_eq!(run(&["END"], &["hello EN"]), ("hello EN".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        // The earliest of several; multibyte text around it.
        assert_eq!(run(&["ß!", "x"], &["aßb", "ß", "!x"]), ("aßb".into(), true));
        assert_eq!(run(&["\n\n"], &["one\n", "\ntwo"]), ("one".into(), true));
    }

    #[test]
    fn held_text_waits_only_as_long_as_it_may_start_a_stop() {
        let mut m = StopMatcher::new(vec!["<stop>".into()]);
        assert_eq!(m.push("a <st"), ("a ".into(), false));
        assert_eq!(m.push("ar"), ("<star".into(), false));
    }
}
