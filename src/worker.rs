//! The generation worker: one OS thread that owns the model, the conversation (with its Λ cache)
//! and the session database. The UI talks to it only through the protocol's [`Command`]s and
//! [`Event`]s (`crate::protocol`), plain data with no tensors, so the UI never blocks on the
//! model and the worker never touches the terminal. The worker relays: what the Λ holds is the
//! session's to say, how it is shown the UI's.
//!
//! Stopping a reply does not go through the command queue (which is busy while generating): the
//! UI sets the shared cancel flag, which the session checks between tokens and prefill chunks.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::attention::LambdaParams;
use crate::attention::recall::RecallParams;
use crate::engine::Engine;
use crate::progress::{Progress, download_line};
use crate::protocol::{
    Command, EngineThread, Event, EventSender, Notice, Role, Settings, ShownMessage,
};
use crate::sampling::SamplingParams;
use crate::session::{MessageRecord, Resumed, Session, TurnEvent, TurnReport};
use crate::store::{Store, markdown_message, markdown_title, title_from};

/// Prompt tokens per forward while chatting: small enough that Esc stops a long paste's
/// prefill quickly, large enough to keep the matrix products efficient.
const INTERACTIVE_PREFILL_CHUNK: usize = 32;
/// Least time between two stats events while generating.
const STATS_EVERY: Duration = Duration::from_millis(250);
/// Messages an opened conversation shows at first; older ones come as the user scrolls up.
const OPEN_MESSAGES: usize = 200;

/// Fetches (reporting progress) and loads the model, on the worker thread.
pub type LoadModel =
    Box<dyn FnOnce(&dyn Progress) -> anyhow::Result<(Arc<Engine>, LambdaParams)> + Send>;

/// How to start the worker.
pub struct WorkerOptions {
    pub load: LoadModel,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub system: Option<String>,
    /// Session database; `None` keeps nothing.
    pub store: Option<PathBuf>,
    /// Session to resume: `Some(None)` for the latest one.
    pub resume: Option<Option<i64>>,
    /// Bytes the KV files of all saved sessions may take together.
    pub kv_budget: u64,
    /// Recall's parameters and the folder of its stores, when it is on.
    pub recall: Option<(RecallParams, PathBuf)>,
}

/// Name of the worker thread (in the log, and in a debugger's thread list).
const THREAD_NAME: &str = "lambdachat-worker";

/// Starts the worker thread.
pub fn spawn(options: WorkerOptions, events: EventSender) -> std::io::Result<EngineThread> {
    let (commands, inbox) = channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let thread = std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            let emit = Emitter(events);
            let work = std::panic::AssertUnwindSafe(|| {
                // Generation runs on candle's compute pool, a thread of which runs this.
                Device::Cpu.with_context(|| {
                    #[cfg(feature = "faults")]
                    crate::faults::arm_from_env();
                    run(options, inbox, flag, &emit)
                })
            });
            match std::panic::catch_unwind(work) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!("worker: {e:#}");
                    emit.send(Event::Error(format!("{e:#}")));
                }
                // The panic itself went to the log (see `tui::run`'s hook).
                Err(_) => emit.send(Event::Error(
                    "the generation worker crashed; the log file has the details".into(),
                )),
            }
            emit.send(Event::Stopped);
        })?;
    Ok(EngineThread {
        commands,
        cancel,
        thread,
    })
}

struct Emitter(EventSender);

impl Emitter {
    fn send(&self, e: Event) {
        let _ = self.0.send(e);
    }
}

struct Worker<'a> {
    engine: Arc<Engine>,
    session: Session,
    settings: Settings,
    system: Option<String>,
    /// New conversations continue raw text (`/raw on`).
    raw: bool,
    store: Option<Store>,
    /// Database id of the open conversation (created with its first message).
    id: Option<i64>,
    title: String,
    kv_budget: u64,
    recall: Option<(RecallParams, PathBuf)>,
    /// Whether the open conversation's recall failure was reported (once is enough).
    recall_failure_told: bool,
    cancel: Arc<AtomicBool>,
    emit: &'a Emitter,
}

/// Download progress while the model opens, shown on the chat's loading screen.
struct LoadingScreen<'a>(&'a Emitter);

impl Progress for LoadingScreen<'_> {
    fn note(&self, text: &str) {
        self.0.send(Event::Loading(text.to_string()));
    }

    fn bytes(&self, file: &str, done: u64, total: u64) {
        self.0
            .send(Event::Loading(download_line(file, done, total)));
    }
}

fn run(
    options: WorkerOptions,
    inbox: Receiver<Command>,
    cancel: Arc<AtomicBool>,
    emit: &Emitter,
) -> anyhow::Result<()> {
    emit.send(Event::Loading("loading the model…".into()));
    let (engine, params) = match (options.load)(&LoadingScreen(emit)) {
        Ok(loaded) => loaded,
        Err(e) => {
            emit.send(Event::LoadFailed {
                reason: format!("{e:#}"),
                hint: "Check --model (a GGUF file, a model directory or hf:ORG/REPO), or run \
                       without it to use the default model; `lambdachat inspect MODEL` shows \
                       what a model holds."
                    .into(),
            });
            // Stay until the UI quits, so it can show the reason.
            while let Ok(c) = inbox.recv() {
                if c == Command::Shutdown {
                    break;
                }
            }
            return Ok(());
        }
    };
    let store = match options.store.as_deref().map(Store::open).transpose() {
        Ok(s) => s,
        Err(e) => {
            emit.send(Event::Error(format!("sessions will not be saved: {e}")));
            None
        }
    };
    let settings = Settings {
        params,
        sampling: options.sampling.clone(),
        max_tokens: options.max_tokens,
        recall: options.recall.as_ref().map(|(p, _)| *p),
        kv_type: engine.kv_type,
        raw: false,
        attention_view: true,
        server: None,
    };
    let session = Session::new(
        engine.clone(),
        params,
        options.sampling,
        options.system.clone(),
    )?;
    let mut w = Worker {
        engine,
        session,
        settings,
        system: options.system,
        raw: false,
        store,
        id: None,
        title: "New chat".into(),
        kv_budget: options.kv_budget,
        recall: options.recall,
        recall_failure_told: false,
        cancel,
        emit,
    };
    w.prepare_session();
    emit.send(Event::Ready {
        model: w.engine.model.info().name.clone(),
        settings: w.settings.clone(),
    });
    match options.resume {
        Some(which) => {
            let id = match which {
                Some(id) => Some(id),
                None => w.store.as_ref().and_then(|s| s.latest().ok().flatten()),
            };
            match id {
                Some(id) => w.open(id),
                None => {
                    emit.send(Event::Notice(Notice::NoSessionToResume));
                    w.opened();
                }
            }
        }
        None => w.opened(),
    }
    if let Some(format) = w.session.borrowed_template() {
        emit.send(Event::Notice(Notice::NoOwnTemplate { format }));
    }
    while let Ok(command) = inbox.recv() {
        if command == Command::Shutdown {
            w.save();
            break;
        }
        // A panic in a command (a bug, on this thread or a compute pool's) ends that command,
        // not the worker: the conversation is opened again from its last save.
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.handle(command)));
        if let Err(panic) = handled {
            w.recover(&panic_text(panic.as_ref()));
        }
    }
    Ok(())
}

/// A panic's message, when it has one.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// A message as the UI shows it.
fn shown(m: MessageRecord) -> ShownMessage {
    ShownMessage {
        index: m.index,
        role: m.role,
        content: m.content,
        code_before: m.code_before,
    }
}

impl Worker<'_> {
    fn handle(&mut self, command: Command) {
        self.cancel.store(false, Ordering::Relaxed);
        match command {
            Command::Send(text) => self.reply(Some(text)),
            Command::ReplaceLast(text) => {
                // A title made from the message being replaced follows the new one.
                let retitle = self.only_message_title().is_some_and(|t| t == self.title);
                if self.session.take_back_exchange() {
                    if retitle {
                        self.retitle(title_from(&text));
                    }
                    self.emit.send(Event::TakenBack { text: text.clone() });
                    self.reply(Some(text));
                } else {
                    self.emit.send(Event::NotTakenBack { text });
                }
            }
            Command::Regenerate => {
                if self.session.can_regenerate() {
                    self.emit.send(Event::Regenerating);
                    self.reply(None);
                } else {
                    self.emit.send(Event::Notice(Notice::NothingToRegenerate));
                }
            }
            Command::SetSampling(p) => match self.session.set_sampling(p.clone()) {
                Ok(()) => {
                    self.settings.sampling = p;
                    self.emit.send(Event::Settings(self.settings.clone()));
                }
                Err(e) => self.emit.send(Event::Error(e.to_string())),
            },
            Command::SetMaxTokens(n) => {
                self.settings.max_tokens = n;
                self.emit.send(Event::Settings(self.settings.clone()));
            }
            Command::SetLambda(p) => self.set_lambda(p),
            Command::SetSystem(text) => {
                self.system = Some(text.clone());
                let this_conversation = self.session.set_system(text);
                self.emit
                    .send(Event::Notice(Notice::SystemPromptSet { this_conversation }));
                if this_conversation {
                    self.opened();
                }
            }
            Command::SetRaw(on) => {
                self.raw = on;
                let this_conversation = self.session.set_raw(on);
                self.emit.send(Event::Notice(Notice::RawSet {
                    on,
                    this_conversation,
                }));
                self.show_mode();
            }
            Command::Pin(i) => {
                match self.session.pin(i) {
                    Ok(notice) => self.emit.send(Event::Notice(notice)),
                    Err(e) => self.emit.send(Event::Error(format!("cannot pin: {e}"))),
                }
                self.timeline();
            }
            Command::Unpin(i) => {
                match self.session.unpin(i) {
                    Ok(()) => self.emit.send(Event::Notice(Notice::Unpinned)),
                    Err(e) => self.emit.send(Event::Error(format!("cannot unpin: {e}"))),
                }
                self.timeline();
            }
            Command::Inspect(i) => match self.session.inspect(i) {
                Ok(view) => self.emit.send(Event::Inspect(view)),
                Err(e) => self.emit.send(Event::Error(e.to_string())),
            },
            Command::LoadMessages { before, count } => {
                let from = before.saturating_sub(count);
                match self.session.messages(from..before) {
                    Ok(m) => self
                        .emit
                        .send(Event::Messages(m.into_iter().map(shown).collect())),
                    Err(e) => self.emit.send(Event::Error(e.to_string())),
                }
            }
            Command::Save => self.save(),
            Command::Export(path) => match self.export(&path) {
                Ok(()) => self.emit.send(Event::Notice(Notice::Exported(path))),
                Err(e) => self.emit.send(Event::Error(format!(
                    "cannot write {}: {e}",
                    path.display()
                ))),
            },
            Command::NewSession => {
                self.save();
                self.fresh_session(self.settings.params);
                self.id = None;
                self.title = "New chat".into();
                self.opened();
            }
            Command::OpenSession(id) => {
                self.save();
                self.open(id);
            }
            Command::ListSessions => self.list(),
            Command::RenameSession(id, title) => {
                if let Some(store) = &self.store {
                    match store.rename(id, &title) {
                        Ok(()) => {
                            if self.id == Some(id) {
                                self.emit.send(Event::Titled {
                                    id,
                                    title: title.clone(),
                                });
                                self.title = title;
                            }
                        }
                        Err(e) => self.emit.send(Event::Error(e.to_string())),
                    }
                }
                self.list();
            }
            Command::DeleteSession(id) => {
                if self.store.is_some() && self.id == Some(id) {
                    // The open conversation: let go of it first (its lock included).
                    self.fresh_session(self.settings.params);
                    self.id = None;
                    self.title = "New chat".into();
                }
                if let Some(Err(e)) = self.store.as_ref().map(|s| s.delete(id)) {
                    self.emit.send(Event::Error(e.to_string()));
                }
                self.list();
            }
            Command::Shutdown => {}
        }
    }

    /// After a panic in a command: the session may have stopped halfway through a forward, so
    /// it is dropped and the conversation opened again from the store, where every finished
    /// turn was saved (a conversation not saved yet starts again empty).
    fn recover(&mut self, what: &str) {
        tracing::error!("a command panicked: {what}");
        let id = self.id;
        self.fresh_session(self.settings.params);
        match id {
            Some(id) => self.open(id),
            None => self.opened(),
        }
        // Last, so that the reopening's own notes do not hide it.
        self.emit.send(Event::Error(format!(
            "generation failed unexpectedly ({what}); the conversation was reopened from its \
             last save — the log file has the details"
        )));
    }

    /// The chat's settings on the session: probing for inspect mode, small prefill chunks,
    /// recall.
    fn prepare_session(&mut self) {
        self.session.set_probe(true);
        self.session.set_prefill_chunk(INTERACTIVE_PREFILL_CHUNK);
        self.recall_failure_told = false;
        if let Err(e) = self.session.set_recall(self.recall.clone()) {
            self.emit.send(Event::Error(format!("recall is off: {e}")));
        }
    }

    fn fresh_session(&mut self, params: LambdaParams) {
        match Session::new(
            self.engine.clone(),
            params,
            self.settings.sampling.clone(),
            self.system.clone(),
        ) {
            Ok(s) => {
                self.session = s;
                self.session.set_raw(self.raw);
                self.prepare_session();
            }
            Err(e) => self.emit.send(Event::Error(e.to_string())),
        }
    }

    /// Tells the UI what the open conversation is: its title and its last messages.
    fn opened(&mut self) {
        let total = self.session.message_count();
        let messages = match self
            .session
            .messages(total.saturating_sub(OPEN_MESSAGES)..total)
        {
            Ok(m) => m.into_iter().map(shown).collect(),
            Err(e) => {
                self.emit.send(Event::Error(e.to_string()));
                Vec::new()
            }
        };
        self.emit.send(Event::Opened {
            id: self.id,
            title: self.title.clone(),
            total,
            messages,
        });
        self.show_mode();
        self.timeline();
    }

    /// Tells the UI whether the open conversation is raw, when that changed.
    fn show_mode(&mut self) {
        if self.settings.raw != self.session.is_raw() {
            self.settings.raw = self.session.is_raw();
            self.emit.send(Event::Settings(self.settings.clone()));
        }
    }

    fn list(&mut self) {
        match self.store.as_ref().map(Store::list) {
            Some(Ok(list)) => self.emit.send(Event::Sessions(list)),
            Some(Err(e)) => self.emit.send(Event::Error(e.to_string())),
            None => self.emit.send(Event::Sessions(Vec::new())),
        }
    }

    /// Writes the conversation as Markdown: from the store a page at a time when it is saved,
    /// else from the session.
    fn export(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        self.save();
        match (&self.store, self.id) {
            (Some(store), Some(id)) => store.export(id, &mut out)?,
            _ => {
                markdown_title(&mut out, &self.title)?;
                for m in self.session.messages(0..self.session.message_count())? {
                    markdown_message(&mut out, m.role, &m.content)?;
                }
            }
        }
        out.flush()?;
        Ok(())
    }

    /// Creates the store's row for a new conversation (with its first message) and moves the
    /// session onto it.
    /// The title the conversation's only user message would give it (`None` with more).
    fn only_message_title(&self) -> Option<String> {
        let count = self.session.message_count();
        let messages = self.session.messages(0..count).ok()?;
        let mut users = messages.iter().filter(|m| m.role == Role::User);
        let only = users.next()?;
        users.next().is_none().then(|| title_from(&only.content))
    }

    /// Renames the open conversation (saved or not yet).
    fn retitle(&mut self, title: String) {
        if let (Some(store), Some(id)) = (&self.store, self.id) {
            match store.rename(id, &title) {
                Ok(()) => self.emit.send(Event::Titled {
                    id,
                    title: title.clone(),
                }),
                Err(e) => return self.emit.send(Event::Error(e.to_string())),
            }
        }
        self.title = title;
    }

    fn create_saved(&mut self, first_message: &str) {
        let (Some(store), None) = (&self.store, self.id) else {
            return;
        };
        let title = title_from(first_message);
        let model = self.engine.path.display().to_string();
        let created = store
            .create(&title, &model, self.settings.params)
            .and_then(|id| Ok((id, store.history(id)?)));
        match created {
            Ok((id, history)) => {
                self.session.attach_history(Box::new(history));
                self.id = Some(id);
                self.emit.send(Event::Titled {
                    id,
                    title: title.clone(),
                });
                self.title = title;
            }
            Err(e) => self
                .emit
                .send(Event::Error(format!("session not saved: {e}"))),
        }
    }

    /// Runs a turn (or a regeneration when `text` is `None`), streaming events.
    fn reply(&mut self, text: Option<String>) {
        if let Some(t) = &text {
            self.create_saved(t);
        }
        let max = Some(self.settings.max_tokens);
        let cancel = self.cancel.clone();
        let emit = self.emit;
        let start = Instant::now();
        let mut last_stats = Instant::now();
        let mut generated = 0usize;
        let mut decode_start: Option<Instant> = None;
        let mut on_event = |e: TurnEvent<'_>| match e {
            TurnEvent::Prefill { done, total } => emit.send(Event::Prefill { done, total }),
            TurnEvent::Text(t) => {
                decode_start.get_or_insert_with(Instant::now);
                generated += 1;
                emit.send(Event::Text(t.to_string()));
            }
            TurnEvent::Stats(stats) => {
                if last_stats.elapsed() >= STATS_EVERY {
                    last_stats = Instant::now();
                    let secs = decode_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
                    emit.send(Event::Progress {
                        generated,
                        tok_s: generated as f64 / secs.max(1e-6),
                        stats,
                    });
                }
            }
        };
        let result: Result<Option<TurnReport>, _> = match text {
            Some(t) => self.session.turn(&t, max, &cancel, &mut on_event).map(Some),
            None => self.session.regenerate(max, &cancel, &mut on_event),
        };
        let replied = self
            .session
            .message(self.session.message_count().saturating_sub(1))
            .ok()
            .flatten()
            .is_some_and(|m| m.role == Role::Assistant);
        match result {
            Ok(Some(r)) => emit.send(Event::Finished {
                stop: r.stop,
                prompt_tokens: r.prompt_tokens,
                generated: r.generated_tokens,
                tok_s: r.decode_tok_s(),
                replied,
            }),
            Ok(None) => {}
            Err(e) => emit.send(Event::Error(e.to_string())),
        }
        tracing::info!(elapsed = ?start.elapsed(), "turn finished");
        self.timeline();
        self.save();
    }

    fn set_lambda(&mut self, params: LambdaParams) {
        let cap = self.engine.model.info().context_length;
        let params = match LambdaParams::new(
            params.n_global.min(cap),
            params.n_local.min(cap),
            Some(params.distance_limit.min(cap as u64)),
        ) {
            Ok(p) => p,
            Err(e) => return self.emit.send(Event::Error(e.to_string())),
        };
        self.session.set_params(params);
        self.settings.params = params;
        self.emit.send(Event::Settings(self.settings.clone()));
        self.emit.send(Event::Notice(Notice::LambdaChanged {
            n_global: params.n_global,
            n_local: params.n_local,
        }));
        self.catch_up();
    }

    /// Feeds what the cache lacks (after a resume or new Λ parameters), then saves.
    fn catch_up(&mut self) {
        let emit = self.emit;
        let cancel = self.cancel.clone();
        let mut on_event = |e: TurnEvent<'_>| {
            if let TurnEvent::Prefill { done, total } = e {
                emit.send(Event::Prefill { done, total });
            }
        };
        match self.session.catch_up(&cancel, &mut on_event) {
            Ok(tokens) => emit.send(Event::HistoryRead { tokens }),
            Err(e) => emit.send(Event::Error(e.to_string())),
        }
        self.timeline();
        self.save();
    }

    fn open(&mut self, id: i64) {
        let Some(store) = &self.store else {
            return self.emit.send(Event::Error("no session database".into()));
        };
        let opened = store.summary(id).and_then(|s| Ok((s, store.history(id)?)));
        let (summary, history) = match opened {
            Ok(o) => o,
            Err(e) => return self.emit.send(Event::Error(e.to_string())),
        };
        // The conversation being left lets go of its history (and lock) first.
        self.fresh_session(self.settings.params);
        self.id = None;
        match Session::resume(
            self.engine.clone(),
            self.settings.sampling.clone(),
            Box::new(history),
        ) {
            Ok((session, resumed)) => {
                self.session = session;
                self.prepare_session();
                self.settings.params = self.session.params();
                self.id = Some(id);
                self.title = summary.title;
                self.emit.send(Event::Settings(self.settings.clone()));
                self.opened();
                let from_snapshot = match &resumed {
                    Resumed::Saved { .. } => true,
                    Resumed::Reread(why) => {
                        tracing::warn!("saved cache not used: {why}");
                        false
                    }
                };
                self.emit.send(Event::Notice(Notice::Resumed {
                    title: self.title.clone(),
                    from_snapshot,
                }));
                if resumed != (Resumed::Saved { refeed: 0 }) {
                    self.catch_up();
                }
            }
            Err(e) => self.emit.send(Event::Error(format!("cannot resume: {e}"))),
        }
    }

    /// Saves what changed since the last save; a failure (a full disk) is said on the status
    /// line, and what was not saved stays to be saved next time.
    fn save(&mut self) {
        if self.id.is_none() {
            return;
        }
        let start = Instant::now();
        match self.session.save() {
            Ok(()) => {
                tracing::info!(elapsed = ?start.elapsed(), "session saved");
                self.emit.send(Event::Saved {
                    seconds: start.elapsed().as_secs_f64(),
                });
            }
            Err(e) => {
                tracing::error!("saving the session: {e}");
                return self.emit.send(Event::Error(format!("saving failed: {e}")));
            }
        }
        if let Some(store) = &self.store
            && let Err(e) = store.enforce_kv_budget(self.kv_budget, self.id)
        {
            tracing::warn!("keeping the saved caches within their budget: {e}");
        }
    }

    /// Sends where the conversation stands in the Λ.
    fn timeline(&mut self) {
        match self.session.timeline() {
            Ok(t) => self.emit.send(Event::Timeline(t)),
            Err(e) => self.emit.send(Event::Error(e.to_string())),
        }
        if !self.recall_failure_told
            && let Some(e) = self.session.recall_failure()
        {
            self.recall_failure_told = true;
            self.emit.send(Event::Error(format!(
                "recall stopped ({e}); the chat goes on with the Λ alone"
            )));
        }
    }
}
