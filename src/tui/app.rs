//! The UI's state and its update function (The Elm Architecture): every key, paste, resize and
//! worker event becomes a [`Msg`]; [`App::update`] changes the state and returns [`Effect`]s for
//! the event loop to carry out (commands to the worker, the clipboard, quitting). It does no I/O,
//! so it is tested without a terminal or a model.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::commands::{self, SlashCommand};
use super::editor::Editor;
use super::keymap::{Action, Context, Key, Keymap};
use super::panels::conversation::Conversation;
use super::panels::input;
use super::panels::inspect::{Inspect, Move};
use super::panels::sessions::{ListOutcome, SessionList};
use super::theme::Theme;
use crate::protocol::{Command, Event, Role, Settings, StopReason, Timeline, TokenState};

/// Messages asked for at a time when scrolling up past what is loaded.
const OLDER_PAGE: usize = 100;

#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    Key(KeyEvent),
    Paste(String),
    /// Mouse wheel: rows, negative up.
    Wheel(i32),
    Resize(u16, u16),
    Worker(Event),
    /// SIGTERM / SIGHUP: save and quit.
    Terminate,
    /// A `/file` read: the block to insert, or why not.
    Attached(Result<String, String>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Worker(Command),
    /// Stop the reply in progress (sets the worker's cancel flag at once).
    Cancel,
    /// Put text on the clipboard (OSC 52).
    Copy(String),
    /// Read a text file for the input (`/file`): answered by [`Msg::Attached`].
    Attach(String),
    /// Leave the event loop (the worker has saved and stopped).
    Exit,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Loading(String),
    Failed { reason: String, hint: String },
    Ready,
}

/// A reply in progress.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generation {
    /// Prompt tokens run through the model, of all.
    pub prefill: Option<(usize, usize)>,
    pub generated: usize,
    pub tok_s: f64,
    /// Whether the reply's assistant message exists yet.
    pub streaming: bool,
}

/// The status line's message.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusNote {
    pub text: String,
    pub error: bool,
    /// "stopping…": cleared when the reply ends.
    pub stopping: bool,
}

/// A panel in front of the chat, taking every key.
pub enum Overlay {
    Help,
    Sessions(SessionList),
}

pub struct App {
    pub keymap: Keymap,
    pub theme: Theme,
    pub model: String,
    pub phase: Phase,
    pub settings: Option<Settings>,
    pub conversation: Conversation,
    pub input: Editor,
    pub generation: Option<Generation>,
    pub timeline: Timeline,
    pub visualizer: bool,
    pub inspect: Option<Inspect>,
    pub overlay: Option<Overlay>,
    pub notice: Option<StatusNote>,
    pub session_id: Option<i64>,
    pub title: String,
    /// Decode speed of the last reply.
    pub last_tok_s: Option<f64>,
    /// Terminal size.
    pub size: (u16, u16),
    /// Saving and stopping; the loop exits when the worker reports it stopped.
    pub quitting: bool,
    /// False once the worker has stopped on its own (it crashed): quitting then exits at once.
    pub worker_alive: bool,
    /// Older messages were asked for and have not arrived yet.
    loading_older: bool,
    /// The message box holds the last user message to replace it (Up on an empty box).
    pub replacing: bool,
}

impl App {
    pub fn new(keymap: Keymap, theme: Theme, size: (u16, u16)) -> Self {
        Self {
            keymap,
            theme,
            model: String::new(),
            phase: Phase::Loading("starting…".into()),
            settings: None,
            conversation: Conversation::default(),
            input: Editor::default(),
            generation: None,
            timeline: Timeline::default(),
            visualizer: true,
            inspect: None,
            overlay: None,
            notice: None,
            session_id: None,
            title: "New chat".into(),
            last_tok_s: None,
            size,
            quitting: false,
            worker_alive: true,
            loading_older: false,
            replacing: false,
        }
    }

    fn note(&mut self, text: impl Into<String>) {
        self.notice = Some(StatusNote {
            text: text.into(),
            error: false,
            stopping: false,
        });
    }

    fn error(&mut self, text: impl Into<String>) {
        self.notice = Some(StatusNote {
            text: text.into(),
            error: true,
            stopping: false,
        });
    }

    /// Rows of the conversation pane that a page key scrolls.
    fn page(&self) -> usize {
        (self.size.1 as usize).saturating_sub(8).max(1)
    }

    pub fn update(&mut self, msg: Msg) -> Vec<Effect> {
        match msg {
            Msg::Key(k) => self.key(k),
            Msg::Paste(text) => {
                match &mut self.overlay {
                    Some(Overlay::Sessions(SessionList {
                        renaming: Some(editor),
                        ..
                    })) => editor.insert_str(&text.replace(['\n', '\r'], " ")),
                    _ => self.input.insert_str(&text),
                }
                Vec::new()
            }
            Msg::Attached(Ok(block)) => {
                self.input.insert_str(&block);
                let label = block.lines().next().unwrap_or("");
                let name = label.trim_start_matches("File ").trim_end_matches(':');
                self.note(format!("inserted {name}; Enter sends"));
                Vec::new()
            }
            Msg::Attached(Err(e)) => {
                self.error(e);
                Vec::new()
            }
            Msg::Wheel(rows) if rows < 0 => {
                self.conversation.scroll_up(rows.unsigned_abs() as usize);
                self.load_older()
            }
            Msg::Wheel(rows) => {
                self.conversation.scroll_down(rows as usize);
                Vec::new()
            }
            Msg::Resize(w, h) => {
                self.size = (w, h);
                Vec::new()
            }
            Msg::Worker(e) => self.worker_event(e),
            Msg::Terminate => self.quit(),
        }
    }

    fn quit(&mut self) -> Vec<Effect> {
        if !self.worker_alive {
            return vec![Effect::Exit];
        }
        if self.quitting {
            return Vec::new();
        }
        self.quitting = true;
        self.note("saving…");
        vec![Effect::Cancel, Effect::Worker(Command::Shutdown)]
    }

    /// Routes a key to the panel in front: an overlay takes every key; inspect mode its own,
    /// letting the rest through to the chat; the chat's actions, then the message box.
    fn key(&mut self, event: KeyEvent) -> Vec<Effect> {
        let key = Key::from_event(&event);
        let action = self
            .keymap
            .action(Context::Chat, &key)
            .filter(|_| !key.is_printable() || self.input.is_empty());
        if action == Some(Action::Quit) {
            return self.quit();
        }
        if self.quitting {
            return Vec::new();
        }
        if let Phase::Failed { .. } = self.phase {
            return Vec::new();
        }
        match &mut self.overlay {
            // Help: any key closes it.
            Some(Overlay::Help) => {
                self.overlay = None;
                return Vec::new();
            }
            Some(Overlay::Sessions(list)) => {
                return match list.key(&self.keymap, &key, action) {
                    ListOutcome::Stay => Vec::new(),
                    ListOutcome::Command(c) => vec![Effect::Worker(c)],
                    ListOutcome::Close(c) => {
                        self.overlay = None;
                        c.into_iter().map(Effect::Worker).collect()
                    }
                };
            }
            None => {}
        }
        if self.inspect.is_some()
            && let Some(effects) = self.inspect_key(&key, action)
        {
            return effects;
        }
        match action {
            Some(a) => self.action(a),
            None => {
                self.type_key(&key);
                Vec::new()
            }
        }
    }

    fn action(&mut self, action: Action) -> Vec<Effect> {
        let page = self.page();
        match action {
            Action::Send => return self.send(),
            Action::Stop if self.replacing && self.generation.is_none() => {
                self.replacing = false;
                self.input.set("");
                self.note("not replaced: your last message stays as it was");
            }
            Action::HistoryPrev if self.may_start_replacing() => self.start_replacing(),
            Action::Stop => {
                if self.generation.is_some() {
                    self.notice = Some(StatusNote {
                        text: "stopping…".into(),
                        error: false,
                        stopping: true,
                    });
                    return vec![Effect::Cancel];
                }
                self.notice = None;
            }
            Action::Quit => return self.quit(),
            Action::Help => self.overlay = Some(Overlay::Help),
            Action::Visualizer => self.visualizer = !self.visualizer,
            Action::Inspect => return self.start_inspect(),
            Action::Sessions => return vec![Effect::Worker(Command::ListSessions)],
            Action::Regenerate => return self.regenerate(),
            Action::ScrollUp | Action::PageUp | Action::Top => {
                self.conversation.scroll_by(action, page);
                return self.load_older();
            }
            other => {
                if !self.conversation.scroll_by(other, page) {
                    let cursor = self.input.cursor();
                    input::act(&mut self.input, other);
                    if self.input.is_browsing() && self.replacing {
                        // Off to the history of sent messages: no longer a replacement, and
                        // the way back leads to the empty box it started from.
                        self.replacing = false;
                        self.input.forget_draft();
                    } else if self.replacing
                        && other == Action::HistoryNext
                        && self.input.cursor() == cursor
                    {
                        // Down past the message being edited: back to the empty box.
                        self.replacing = false;
                        self.input.set("");
                    }
                }
            }
        }
        Vec::new()
    }

    /// A key no chat action took: an editing key, or a character typed into the message.
    fn type_key(&mut self, key: &Key) {
        if let Some(action) = self.keymap.editing(key) {
            self.input.edit(action);
        } else if let KeyCode::Char(c) = key.code
            && !key
                .modifiers
                .intersects(KeyModifiers::CONTROL | KeyModifiers::ALT)
        {
            self.input.insert_char(c);
        }
    }

    fn send(&mut self) -> Vec<Effect> {
        if self.input.text().trim().is_empty() {
            return Vec::new();
        }
        if self.input.text().starts_with('/') {
            let line = self.input.text().to_string();
            let Some(settings) = self.settings.clone() else {
                self.error("the model is still loading");
                return Vec::new();
            };
            return match commands::parse(&line, &settings) {
                Ok(c) => {
                    self.input.take();
                    self.slash(c)
                }
                Err(e) => {
                    self.error(e);
                    Vec::new()
                }
            };
        }
        if self.phase != Phase::Ready {
            self.error("the model is still loading; your message is kept");
            return Vec::new();
        }
        if self.generation.is_some() {
            self.error("a reply is in progress: Esc stops it; your message is kept");
            return Vec::new();
        }
        let text = self.input.take();
        self.generation = Some(Generation::default());
        self.notice = None;
        if std::mem::take(&mut self.replacing) {
            // The worker says whether the exchange was taken back; the pane follows then.
            return vec![Effect::Worker(Command::ReplaceLast(text))];
        }
        self.conversation.push(Role::User, text.clone());
        self.conversation.to_bottom();
        vec![Effect::Worker(Command::Send(text))]
    }

    /// Up on an empty message box, with no reply streaming, after a message of the user's:
    /// the box takes that message, to edit and send in its place.
    fn may_start_replacing(&self) -> bool {
        self.input.text().is_empty()
            && !self.replacing
            && self.generation.is_none()
            && self.phase == Phase::Ready
            && self.last_user_message().is_some()
    }

    /// The user's message of the last exchange (the last message, or the one before a reply).
    fn last_user_message(&self) -> Option<&str> {
        let messages = &self.conversation.messages;
        let last = messages.last()?;
        let user = match last.role {
            Role::User => last,
            _ => messages
                .iter()
                .rev()
                .nth(1)
                .filter(|m| m.role == Role::User)?,
        };
        Some(&user.content)
    }

    fn start_replacing(&mut self) {
        let Some(text) = self.last_user_message().map(str::to_string) else {
            return;
        };
        self.input.set(&text);
        self.replacing = true;
    }

    fn regenerate(&mut self) -> Vec<Effect> {
        if self.generation.is_some() {
            self.error("a reply is in progress");
            return Vec::new();
        }
        vec![Effect::Worker(Command::Regenerate)]
    }

    /// Message index from a 1-based number, or the default.
    fn message_index(&self, n: Option<usize>, default: Option<usize>) -> Option<usize> {
        match n {
            Some(n) if n <= self.conversation.total => Some(n - 1),
            Some(_) => None,
            None => default,
        }
    }

    fn slash(&mut self, command: SlashCommand) -> Vec<Effect> {
        let busy = self.generation.is_some();
        let worker = |c| vec![Effect::Worker(c)];
        match command {
            SlashCommand::Help => self.overlay = Some(Overlay::Help),
            SlashCommand::Quit => return self.quit(),
            SlashCommand::Sessions => return worker(Command::ListSessions),
            SlashCommand::Copy(n) => return self.copy(n),
            SlashCommand::ShowSettings => {
                if let Some(s) = &self.settings {
                    let p = &s.sampling;
                    let text = format!(
                        "temperature {} · top_p {} · top_k {} · min_p {} · repeat_penalty {} · max_tokens {} · n_global {} · n_local {} · D {}",
                        p.temperature,
                        p.top_p,
                        p.top_k,
                        p.min_p,
                        p.repeat_penalty,
                        s.max_tokens,
                        s.params.n_global,
                        s.params.n_local,
                        s.params.distance_limit
                    );
                    self.note(text);
                }
            }
            _ if busy => self.error("wait for the reply to finish (Esc stops it)"),
            SlashCommand::New => return worker(Command::NewSession),
            SlashCommand::Clear => {
                let mut effects = Vec::new();
                if let Some(id) = self.session_id {
                    effects.push(Effect::Worker(Command::DeleteSession(id)));
                }
                effects.push(Effect::Worker(Command::NewSession));
                return effects;
            }
            SlashCommand::System(text) => return worker(Command::SetSystem(text)),
            SlashCommand::Raw(on) => return worker(Command::SetRaw(on)),
            SlashCommand::SetSampling(p) => return worker(Command::SetSampling(p)),
            SlashCommand::SetMaxTokens(n) => return worker(Command::SetMaxTokens(n)),
            SlashCommand::SetLambda(p) => return worker(Command::SetLambda(p)),
            SlashCommand::Regen => return self.regenerate(),
            SlashCommand::Pin(n) => {
                let last = self.conversation.total.checked_sub(1);
                match self.message_index(n, last) {
                    Some(i) => return worker(Command::Pin(i)),
                    None => self.error("no such message"),
                }
            }
            SlashCommand::Unpin(n) => {
                let last_pinned = self
                    .conversation
                    .messages
                    .iter()
                    .rfind(|m| m.pinned)
                    .map(|m| m.index);
                match self.message_index(n, last_pinned) {
                    Some(i) => return worker(Command::Unpin(i)),
                    None => self.error("no pinned message"),
                }
            }
            SlashCommand::File(path) => return vec![Effect::Attach(path)],
            SlashCommand::Export(file) => {
                let name = file.unwrap_or_else(|| match self.session_id {
                    Some(id) => format!("lambdachat-{id}.md"),
                    None => "lambdachat.md".into(),
                });
                return worker(Command::Export(name.into()));
            }
        }
        Vec::new()
    }

    fn copy(&mut self, n: Option<usize>) -> Vec<Effect> {
        let (text, what) = match n {
            Some(n) => match self.conversation.code_block(n) {
                Some(code) => (code.to_string(), format!("code block {n}")),
                None => {
                    let count = self.conversation.code_count();
                    self.error(format!("no code block {n} (there are {count})"));
                    return Vec::new();
                }
            },
            None => match self
                .conversation
                .messages
                .iter()
                .rev()
                .find(|m| m.role == Role::Assistant)
            {
                Some(m) => (m.content.clone(), "the last reply".to_string()),
                None => {
                    self.error("nothing to copy yet");
                    return Vec::new();
                }
            },
        };
        self.note(format!(
            "copied {what} ({} lines) to the clipboard (OSC 52)",
            text.lines().count()
        ));
        vec![Effect::Copy(text)]
    }

    fn start_inspect(&mut self) -> Vec<Effect> {
        let Some(message) = self.conversation.total.checked_sub(1) else {
            self.error("nothing to inspect yet");
            return Vec::new();
        };
        self.inspect = Some(Inspect::open(message));
        self.conversation
            .inspect(Some(message), self.size.0, &self.theme);
        vec![Effect::Worker(Command::Inspect(message))]
    }

    /// A key in inspect mode; `None` lets it through to the chat (the chat's own inspect key
    /// leaves the mode).
    fn inspect_key(&mut self, key: &Key, chat: Option<Action>) -> Option<Vec<Effect>> {
        let messages = self.conversation.total;
        let inspect = self.inspect.as_mut()?;
        let moved = match self.keymap.action(Context::Inspect, key) {
            Some(action) => inspect.act(action, messages),
            None if chat == Some(Action::Inspect) => Some(Move::Leave),
            None => None,
        };
        match moved? {
            Move::Stay => Some(Vec::new()),
            Move::ToMessage(m) => {
                self.conversation.inspect(Some(m), self.size.0, &self.theme);
                Some(vec![Effect::Worker(Command::Inspect(m))])
            }
            Move::Leave => {
                self.inspect = None;
                self.conversation.inspect(None, self.size.0, &self.theme);
                self.conversation.to_bottom();
                Some(Vec::new())
            }
        }
    }

    fn worker_event(&mut self, event: Event) -> Vec<Effect> {
        match event {
            Event::Loading(s) => self.phase = Phase::Loading(s),
            Event::Ready { model, settings } => {
                self.phase = Phase::Ready;
                self.model = model;
                self.settings = Some(settings);
            }
            Event::LoadFailed { reason, hint } => self.phase = Phase::Failed { reason, hint },
            Event::Opened {
                id,
                title,
                total,
                messages,
            } => {
                self.session_id = id;
                self.title = title;
                self.conversation = Conversation::opened(total, messages);
                self.loading_older = false;
                self.inspect = None;
                self.generation = None;
            }
            Event::Messages(older) => {
                self.conversation.prepend(older);
                self.loading_older = false;
                // Older messages are dimmed by the map already held, like those loaded first.
                self.mark_messages();
            }
            Event::Titled { id, title } => {
                self.session_id = Some(id);
                self.title = title;
            }
            Event::Prefill { done, total } => {
                let g = self.generation.get_or_insert_with(Generation::default);
                g.prefill = Some((done, total));
            }
            Event::Text(t) => {
                let g = self.generation.get_or_insert_with(Generation::default);
                g.generated += 1;
                if !g.streaming {
                    g.streaming = true;
                    self.conversation.push(Role::Assistant, String::new());
                }
                let width = self.size.0;
                self.conversation.append(&t, width, &self.theme);
            }
            Event::Progress {
                generated,
                tok_s,
                stats,
            } => {
                if let Some(g) = &mut self.generation {
                    g.generated = generated;
                    g.tok_s = tok_s;
                }
                self.timeline.stats = stats;
            }
            Event::Finished {
                stop,
                prompt_tokens,
                generated,
                tok_s,
                replied,
            } => {
                let streamed = self.generation.take().is_some_and(|g| g.streaming);
                let prefill_cut = !replied;
                if replied && !streamed {
                    // A reply with no visible text (stopped at once, or only an end token).
                    self.conversation.push(Role::Assistant, String::new());
                }
                if generated > 0 {
                    self.last_tok_s = Some(tok_s);
                }
                match stop {
                    StopReason::Cancelled if prefill_cut => self.note(format!(
                        "stopped during the prompt ({prompt_tokens} tokens read; the rest is read with your next message)"
                    )),
                    StopReason::Cancelled => self.note(format!("stopped after {generated} tokens")),
                    StopReason::Length => self.note(format!(
                        "the reply reached max_tokens ({generated}); /set max_tokens N allows longer ones"
                    )),
                    StopReason::EndOfTurn => {
                        if self.notice.as_ref().is_some_and(|n| n.stopping) {
                            self.notice = None;
                        }
                    }
                }
                if let Some(inspect) = &self.inspect {
                    return vec![Effect::Worker(Command::Inspect(inspect.message))];
                }
            }
            Event::HistoryRead { tokens } => {
                let total = self
                    .generation
                    .take()
                    .and_then(|g| g.prefill)
                    .map(|(_, t)| t);
                let stopped = total.is_some_and(|t| tokens < t);
                if stopped {
                    self.note(format!(
                        "stopped reading the history ({tokens} tokens read; the rest is read with your next message)"
                    ));
                } else {
                    self.note(format!("history read ({tokens} tokens)"));
                }
            }
            Event::TakenBack { text } => {
                self.conversation.pop_if(Role::Assistant);
                self.conversation.pop_if(Role::User);
                self.conversation.push(Role::User, text);
                self.conversation.to_bottom();
            }
            Event::NotTakenBack { text } => {
                self.generation = None;
                if self.input.text().is_empty() {
                    self.input.set(&text);
                }
                self.error(format!(
                    "your last message can no longer be replaced (the conversation was opened or \
                     pinned since); {} sends this as a new message",
                    self.keymap.key_of(Action::Send)
                ));
            }
            Event::Regenerating => {
                self.conversation.pop_if(Role::Assistant);
                self.generation = Some(Generation::default());
                self.conversation.to_bottom();
            }
            Event::Timeline(t) => self.apply_timeline(t),
            Event::Inspect(view) => {
                if let Some(inspect) = &mut self.inspect {
                    inspect.show(view);
                }
            }
            Event::Sessions(items) => match &mut self.overlay {
                Some(Overlay::Sessions(list)) => list.refresh(items),
                _ => {
                    let list = SessionList::new(items, self.session_id);
                    self.overlay = Some(Overlay::Sessions(list));
                }
            },
            Event::Settings(s) => self.settings = Some(s),
            Event::Saved { .. } => {
                // A save that works again clears the note that one failed.
                if self
                    .notice
                    .as_ref()
                    .is_some_and(|n| n.text.starts_with("saving failed"))
                {
                    self.notice = None;
                }
            }
            Event::Notice(n) => self.note(super::words::notice(&n)),
            Event::Error(e) => {
                self.error(e);
                self.generation = None;
            }
            Event::Stopped => {
                if self.quitting {
                    return vec![Effect::Exit];
                }
                self.worker_alive = false;
                self.generation = None;
                if self.notice.as_ref().is_none_or(|n| !n.error) {
                    self.error("the generation worker stopped; see the log file");
                }
            }
        }
        Vec::new()
    }

    /// Takes the engine's map of the Λ: dims evicted text, marks pinned messages.
    fn apply_timeline(&mut self, t: Timeline) {
        self.timeline = t;
        self.mark_messages();
    }

    /// Marks the loaded messages by the map held: a message it does not list is wholly evicted
    /// (when the engine knows it).
    fn mark_messages(&mut self) {
        let t = &self.timeline;
        for m in &mut self.conversation.messages {
            let (segments, pinned) = match t.messages.binary_search_by_key(&m.index, |x| x.index) {
                Ok(i) => {
                    let map = &t.messages[i];
                    let pinned = t
                        .pinned
                        .iter()
                        .any(|p| p.start < map.tokens.end && map.tokens.start < p.end);
                    (map.segments.clone(), pinned)
                }
                Err(_) if m.index < t.message_count => {
                    (vec![(0..m.content.len(), TokenState::Evicted)], false)
                }
                Err(_) => continue,
            };
            if m.segments != segments || m.pinned != pinned {
                m.segments = segments;
                m.pinned = pinned;
                m.touch();
            }
        }
    }

    /// After a scroll up: when the view reached the first loaded message and older ones exist,
    /// asks for the page before it.
    fn load_older(&mut self) -> Vec<Effect> {
        if self.loading_older || !self.conversation.wants_older() {
            return Vec::new();
        }
        self.loading_older = true;
        vec![Effect::Worker(Command::LoadMessages {
            before: self.conversation.first(),
            count: OLDER_PAGE,
        })]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        CacheStats, InspectView, KvType, LambdaParams, MessageMap, SamplingParams, SessionSummary,
        ShownMessage, TokenInfo, TokenState,
    };

    fn settings() -> Settings {
        Settings {
            params: LambdaParams::new(4, 64, None).unwrap(),
            sampling: SamplingParams::default(),
            max_tokens: 100,
            recall: None,
            kv_type: KvType::F16,
            raw: false,
            attention_view: true,
            server: None,
        }
    }

    fn app() -> App {
        let mut app = App::new(Keymap::default(), Theme::default(), (100, 30));
        app.update(Msg::Worker(Event::Ready {
            model: "Test".into(),
            settings: settings(),
        }));
        app
    }

    fn key(app: &mut App, code: KeyCode, modifiers: KeyModifiers) -> Vec<Effect> {
        app.update(Msg::Key(KeyEvent::new(code, modifiers)))
    }

    fn press(app: &mut App, code: KeyCode) -> Vec<Effect> {
        key(app, code, KeyModifiers::NONE)
    }

    fn type_text(app: &mut App, text: &str) {
        for c in text.chars() {
            press(app, KeyCode::Char(c));
        }
    }

    fn send(app: &mut App, text: &str) -> Vec<Effect> {
        type_text(app, text);
        press(app, KeyCode::Enter)
    }

    fn finish(app: &mut App, replied: bool) {
        app.update(Msg::Worker(Event::Finished {
            stop: StopReason::EndOfTurn,
            prompt_tokens: 5,
            generated: 2,
            tok_s: 10.0,
            replied,
        }));
    }

    /// A file inserted by its absolute path is sent as a message, not read as a command.
    #[test]
    fn an_inserted_file_is_sent_as_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.rs");
        std::fs::write(&path, "fn a() {}\n").unwrap();
        let mut app = app();
        let block = crate::tui::attach::read(&path.to_string_lossy()).unwrap();
        app.update(Msg::Attached(Ok(block.clone())));
        assert_eq!(
            press(&mut app, KeyCode::Enter),
            [Effect::Worker(Command::Send(block))]
        );
    }

    /// Up on an empty box takes the last user message; Enter asks the worker to replace the
    /// exchange, and the pane follows what the worker says: the old message and its reply give
    /// way to the new one, or (when it cannot be replaced) the text comes back to the box.
    #[test]
    fn up_on_an_empty_box_edits_the_last_message_and_enter_replaces_it() {
        let mut app = app();
        send(&mut app, "one");
        app.update(Msg::Worker(Event::Text("reply one".into())));
        finish(&mut app, true);
        send(&mut app, "two");
        app.update(Msg::Worker(Event::Text("reply two".into())));
        finish(&mut app, true);
        assert!(press(&mut app, KeyCode::Up).is_empty());
        assert!(app.replacing);
        assert_eq!(app.input.text(), "two");
        // Esc keeps the exchange as it was.
        press(&mut app, KeyCode::Esc);
        assert!(!app.replacing && app.input.is_empty());
        press(&mut app, KeyCode::Up);
        type_text(&mut app, "!");
        assert_eq!(
            press(&mut app, KeyCode::Enter),
            [Effect::Worker(Command::ReplaceLast("two!".into()))]
        );
        assert!(!app.replacing && app.generation.is_some());
        assert_eq!(
            app.conversation.messages.len(),
            4,
            "nothing changes before the worker says"
        );
        app.update(Msg::Worker(Event::TakenBack {
            text: "two!".into(),
        }));
        app.update(Msg::Worker(Event::Text("reply two!".into())));
        finish(&mut app, true);
        let shown: Vec<&str> = app
            .conversation
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(shown, ["one", "reply one", "two!", "reply two!"]);
        // The worker could not: the text comes back, nothing is lost.
        press(&mut app, KeyCode::Up);
        press(&mut app, KeyCode::Enter);
        app.update(Msg::Worker(Event::NotTakenBack {
            text: "two!".into(),
        }));
        assert!(app.generation.is_none());
        assert_eq!(app.input.text(), "two!");
        assert!(app.notice.as_ref().is_some_and(|n| n.error));
        assert_eq!(app.conversation.messages.len(), 4);
        // A second Up leaves the edit for the history of sent messages.
        app.input.set("");
        press(&mut app, KeyCode::Up);
        assert!(app.replacing);
        press(&mut app, KeyCode::Up);
        assert!(!app.replacing);
        assert!(app.input.is_browsing());
    }

    #[test]
    fn enter_sends_and_streamed_text_becomes_the_reply() {
        let mut app = app();
        assert_eq!(
            send(&mut app, "hi there"),
            [Effect::Worker(Command::Send("hi there".into()))]
        );
        assert!(app.input.is_empty() && app.generation.is_some());
        app.update(Msg::Worker(Event::Text("Hel".into())));
        app.update(Msg::Worker(Event::Text("lo".into())));
        finish(&mut app, true);
        let roles: Vec<Role> = app.conversation.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::User, Role::Assistant]);
        assert_eq!(app.conversation.messages[1].content, "Hello");
        assert!(app.generation.is_none());
        assert_eq!(app.last_tok_s, Some(10.0));
    }

    #[test]
    fn a_message_typed_during_a_reply_is_kept_and_esc_stops() {
        let mut app = app();
        send(&mut app, "first");
        assert!(send(&mut app, "second").is_empty());
        assert_eq!(app.input.text(), "second");
        assert!(app.notice.as_ref().is_some_and(|n| n.error));
        assert_eq!(press(&mut app, KeyCode::Esc), [Effect::Cancel]);
        // Stopped during the prompt: no assistant message, on either side.
        app.update(Msg::Worker(Event::Finished {
            stop: StopReason::Cancelled,
            prompt_tokens: 3,
            generated: 0,
            tok_s: 0.0,
            replied: false,
        }));
        assert_eq!(app.conversation.messages.len(), 1);
        assert!(
            app.notice
                .as_ref()
                .unwrap()
                .text
                .contains("stopped during the prompt")
        );
    }

    #[test]
    fn newline_paste_and_printable_bindings() {
        let mut app = app();
        assert!(matches!(press(&mut app, KeyCode::Char('?')).as_slice(), []));
        assert!(matches!(app.overlay, Some(Overlay::Help)));
        press(&mut app, KeyCode::Char('x'));
        assert!(app.overlay.is_none(), "any key closes help");
        type_text(&mut app, "why?");
        assert_eq!(
            app.input.text(),
            "why?",
            "? types when the input is not empty"
        );
        key(&mut app, KeyCode::Enter, KeyModifiers::ALT);
        app.update(Msg::Paste("line 1\r\nline 2\n".into()));
        assert_eq!(app.input.text(), "why?\nline 1\nline 2\n");
        assert!(app.conversation.messages.is_empty(), "a paste never sends");
    }

    #[test]
    fn history_and_completion() {
        let mut app = app();
        send(&mut app, "one");
        finish(&mut app, true);
        press(&mut app, KeyCode::Up);
        assert_eq!(app.input.text(), "one");
        press(&mut app, KeyCode::Down);
        assert_eq!(app.input.text(), "");
        assert!(!app.replacing);
        // Up twice: the edit, then the history; Down twice: back to the empty box.
        press(&mut app, KeyCode::Up);
        press(&mut app, KeyCode::Up);
        assert!(app.input.is_browsing() && !app.replacing);
        press(&mut app, KeyCode::Down);
        press(&mut app, KeyCode::Down);
        assert_eq!(app.input.text(), "");
        type_text(&mut app, "/sess");
        press(&mut app, KeyCode::Tab);
        assert_eq!(app.input.text(), "/sessions");
    }

    #[test]
    fn slash_commands() {
        let mut app = app();
        send(&mut app, "question");
        app.update(Msg::Worker(Event::Text("```\ncode\n```".into())));
        finish(&mut app, true);
        assert_eq!(send(&mut app, "/pin 1"), [Effect::Worker(Command::Pin(0))]);
        assert_eq!(send(&mut app, "/copy 1"), [Effect::Copy("code\n".into())]);
        assert!(send(&mut app, "/copy 9").is_empty());
        assert!(
            app.notice
                .as_ref()
                .unwrap()
                .text
                .contains("no code block 9")
        );
        assert_eq!(
            send(&mut app, "/set max_tokens 7"),
            [Effect::Worker(Command::SetMaxTokens(7))]
        );
        assert_eq!(
            send(&mut app, "/regen"),
            [Effect::Worker(Command::Regenerate)]
        );
        assert!(send(&mut app, "/bogus").is_empty());
        assert_eq!(
            app.input.text(),
            "/bogus",
            "a bad command stays to be fixed"
        );
        app.input.take();
        assert_eq!(
            send(&mut app, "/file notes/a b.txt"),
            [Effect::Attach("notes/a b.txt".into())]
        );
        assert_eq!(app.input.text(), "", "the command line is gone");
        let messages = app.conversation.messages.len();
        app.update(Msg::Attached(
            Ok("File a.txt:\n```txt\nhello\n```\n".into()),
        ));
        assert_eq!(
            app.input.text(),
            "File a.txt:\n```txt\nhello\n```\n",
            "to send or edit"
        );
        assert!(
            app.notice
                .as_ref()
                .is_some_and(|n| !n.error && n.text.contains("a.txt"))
        );
        assert_eq!(
            app.conversation.messages.len(),
            messages,
            "an inserted file is not sent"
        );
        app.input.take();
        app.update(Msg::Attached(Err("x.png is not UTF-8 text".into())));
        assert!(app.notice.as_ref().is_some_and(|n| n.error));
        assert!(send(&mut app, "/file").is_empty(), "usage");
        app.input.take();
        assert_eq!(
            send(&mut app, "/export out.md"),
            [Effect::Worker(Command::Export("out.md".into()))]
        );
        assert_eq!(
            send(&mut app, "/new"),
            [Effect::Worker(Command::NewSession)]
        );
        assert_eq!(
            send(&mut app, "/quit"),
            [Effect::Cancel, Effect::Worker(Command::Shutdown)]
        );
        assert!(app.quitting);
        assert_eq!(app.update(Msg::Worker(Event::Stopped)), [Effect::Exit]);
    }

    #[test]
    fn timeline_marks_pinned_and_evicted_messages() {
        let mut app = app();
        send(&mut app, "old");
        finish(&mut app, true);
        let map = |index, tokens: std::ops::Range<u64>, state| MessageMap {
            index,
            tokens,
            segments: vec![(0..3, state)],
        };
        app.update(Msg::Worker(Event::Timeline(Timeline {
            stats: CacheStats {
                window_start: 100,
                ..CacheStats::default()
            },
            n_global: 4,
            n_local: 64,
            pinned: vec![std::ops::Range { start: 10, end: 12 }],
            recalled: Vec::new(),
            message_count: 2,
            messages: vec![
                map(0, 10..12, TokenState::Pinned),
                map(1, 20..30, TokenState::Evicted),
            ],
        })));
        assert!(app.conversation.messages[0].pinned);
        assert!(app.conversation.messages[1].fully_evicted());
        assert_eq!(
            send(&mut app, "/unpin"),
            [Effect::Worker(Command::Unpin(0))]
        );
    }

    #[test]
    fn older_messages_loaded_on_scroll_are_dimmed_as_evicted() {
        let mut app = app();
        let shown = |index| ShownMessage {
            index,
            role: if index % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            },
            content: format!("message {index}"),
            code_before: 0,
        };
        app.update(Msg::Worker(Event::Opened {
            id: Some(1),
            title: "long".into(),
            total: 10,
            messages: (8..10).map(shown).collect(),
        }));
        app.update(Msg::Worker(Event::Timeline(Timeline {
            stats: CacheStats::default(),
            n_global: 4,
            n_local: 64,
            pinned: Vec::new(),
            recalled: Vec::new(),
            message_count: 10,
            messages: vec![MessageMap {
                index: 9,
                tokens: 90..100,
                segments: vec![(0..9, TokenState::Window)],
            }],
        })));
        app.update(Msg::Worker(Event::Messages((5..8).map(shown).collect())));
        let evicted: Vec<bool> = app
            .conversation
            .messages
            .iter()
            .map(|m| m.fully_evicted())
            .collect();
        assert_eq!(evicted, [true, true, true, true, false]);
    }

    #[test]
    fn inspect_mode_moves_through_tokens_and_messages() {
        let mut app = app();
        send(&mut app, "a");
        finish(&mut app, true);
        assert_eq!(
            press(&mut app, KeyCode::F(3)),
            [Effect::Worker(Command::Inspect(1))]
        );
        let token = |position| TokenInfo {
            position,
            id: 1,
            text: "t".into(),
            state: TokenState::Window,
            share: 0.1,
        };
        app.update(Msg::Worker(Event::Inspect(InspectView {
            message: 1,
            tokens: vec![token(5), token(6), token(7)],
        })));
        assert_eq!(app.inspect.as_ref().unwrap().cursor, 2);
        press(&mut app, KeyCode::Left);
        press(&mut app, KeyCode::Left);
        press(&mut app, KeyCode::Left);
        assert_eq!(app.inspect.as_ref().unwrap().cursor, 0);
        assert_eq!(
            press(&mut app, KeyCode::Up),
            [Effect::Worker(Command::Inspect(0))]
        );
        assert!(
            press(&mut app, KeyCode::Up).is_empty(),
            "no message before the first"
        );
        press(&mut app, KeyCode::Esc);
        assert!(app.inspect.is_none());
    }

    #[test]
    fn session_list_opens_renames_and_deletes() {
        let mut app = app();
        let summary = |id, title: &str| SessionSummary {
            id,
            title: title.into(),
            model: "m.gguf".into(),
            messages: 2,
            updated: 0,
        };
        assert_eq!(
            press(&mut app, KeyCode::F(4)),
            [Effect::Worker(Command::ListSessions)]
        );
        app.update(Msg::Worker(Event::Sessions(vec![
            summary(7, "a"),
            summary(3, "b"),
        ])));
        press(&mut app, KeyCode::Down);
        press(&mut app, KeyCode::Char('r'));
        press(&mut app, KeyCode::Backspace);
        type_text(&mut app, "renamed");
        assert_eq!(
            press(&mut app, KeyCode::Enter),
            [Effect::Worker(Command::RenameSession(3, "renamed".into()))]
        );
        assert!(
            press(&mut app, KeyCode::Char('d')).is_empty(),
            "delete asks first"
        );
        assert_eq!(
            press(&mut app, KeyCode::Char('d')),
            [Effect::Worker(Command::DeleteSession(3))]
        );
        assert_eq!(
            press(&mut app, KeyCode::Enter),
            [Effect::Worker(Command::OpenSession(3))]
        );
        assert!(app.overlay.is_none());
    }

    #[test]
    fn load_failure_and_terminate() {
        let mut app = App::new(Keymap::default(), Theme::default(), (80, 24));
        app.update(Msg::Worker(Event::LoadFailed {
            reason: "no such file".into(),
            hint: "check --model".into(),
        }));
        assert!(matches!(app.phase, Phase::Failed { .. }));
        assert!(send(&mut app, "hello").is_empty());
        assert_eq!(
            app.update(Msg::Terminate),
            [Effect::Cancel, Effect::Worker(Command::Shutdown)]
        );
        assert!(app.update(Msg::Terminate).is_empty(), "quitting once");
    }

    #[test]
    fn reading_the_history_again_ends_with_its_own_event() {
        let mut app = app();
        app.update(Msg::Worker(Event::Prefill {
            done: 32,
            total: 64,
        }));
        assert!(
            app.generation.is_some(),
            "the status bar shows the progress"
        );
        app.update(Msg::Worker(Event::HistoryRead { tokens: 64 }));
        assert!(app.generation.is_none());
        assert!(app.conversation.messages.is_empty());
        assert_eq!(
            app.notice.as_ref().unwrap().text,
            "history read (64 tokens)"
        );
        app.update(Msg::Worker(Event::Prefill {
            done: 32,
            total: 64,
        }));
        app.update(Msg::Worker(Event::HistoryRead { tokens: 32 }));
        assert!(
            app.notice
                .as_ref()
                .unwrap()
                .text
                .starts_with("stopped reading the history")
        );
    }

    #[test]
    fn a_crashed_worker_is_reported_and_quitting_exits_at_once() {
        let mut app = app();
        send(&mut app, "hi");
        app.update(Msg::Worker(Event::Error(
            "the generation worker crashed".into(),
        )));
        app.update(Msg::Worker(Event::Stopped));
        assert!(app.generation.is_none());
        assert!(app.notice.as_ref().unwrap().text.contains("crashed"));
        assert_eq!(
            key(&mut app, KeyCode::Char('q'), KeyModifiers::CONTROL),
            [Effect::Exit]
        );
    }
}
