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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use candle_core::Device;
use tokio::sync::mpsc::UnboundedSender;

use super::openai::{Checked, FinishReason, Input, LambdaUsage, Usage};
use crate::attention::LambdaParams;
use crate::attention::recall::RecallParams;
use crate::chat::{Message, Role};
use crate::engine::Engine;
use crate::protocol::StopReason;
use crate::session::{Session, SessionError, TurnEvent};

/// What a job sends back while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Reply text, in order.
    Text(String),
    /// The reply ended.
    Done(FinishReason, Usage),
    /// The job failed (nothing more follows).
    Failed(String),
}

/// A checked request and where its events go.
pub struct Job {
    pub request: Checked,
    pub events: UnboundedSender<Event>,
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
    jobs: SyncSender<Job>,
}

impl Generator {
    /// Starts the generation thread.
    pub fn start(engine: Arc<Engine>, options: GeneratorOptions) -> std::io::Result<Self> {
        let (jobs, queue) = sync_channel(options.queue);
        std::thread::Builder::new()
            .name("generation".into())
            .spawn(move || run(Conversations::new(engine, options), queue))?;
        Ok(Self { jobs })
    }

    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => Refused::Busy,
            TrySendError::Disconnected(_) => Refused::Gone,
        })
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

/// A conversation the generator holds: what the client knows of it and its session.
struct Live {
    known: Known,
    session: Session,
    used: u64,
}

/// A conversation as the client sees it, which a later request may extend.
#[derive(Debug, Clone, PartialEq)]
enum Known {
    /// The messages, every reply as it was sent.
    Chat(Vec<Message>),
    /// A raw text: the prompts and completions as sent, one after the other.
    Text(String),
}

impl Known {
    /// How much of `input` this conversation already holds (messages or bytes), when `input`
    /// extends it: a chat by at least one message, a text by at least one byte.
    fn extended_by(&self, input: &Input) -> Option<usize> {
        match (self, input) {
            (Self::Chat(known), Input::Chat(messages)) => {
                (known.len() < messages.len() && messages.starts_with(known)).then_some(known.len())
            }
            (Self::Text(known), Input::Text { prompt, .. }) => (known.len() < prompt.len()
                && prompt.starts_with(known.as_str()))
            .then_some(known.len()),
            _ => None,
        }
    }
}

struct Conversations {
    engine: Arc<Engine>,
    options: GeneratorOptions,
    live: Vec<Live>,
    clock: u64,
}

impl Conversations {
    fn new(engine: Arc<Engine>, options: GeneratorOptions) -> Self {
        Self {
            engine,
            options,
            live: Vec::new(),
            clock: 0,
        }
    }

    /// The live conversation that `input` extends (the longest such), taken out.
    fn take_prefix_of(&mut self, input: &Input) -> Option<Live> {
        let best = self
            .live
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.known.extended_by(input).map(|n| (i, n)))
            .max_by_key(|&(_, n)| n)
            .map(|(i, _)| i)?;
        Some(self.live.swap_remove(best))
    }

    /// Keeps `live`, dropping the least recently used conversations beyond the limit.
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
                self.live.swap_remove(oldest);
            }
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
            crate::sampling::SamplingParams::default(),
            system.clone(),
        )?;
        session.set_raw(matches!(input, Input::Text { .. }));
        session.set_recall(self.options.recall.clone())?;
        let known = match input {
            Input::Chat(_) => Known::Chat(
                system
                    .map(|s| Message::new(Role::System, s))
                    .into_iter()
                    .collect(),
            ),
            Input::Text { .. } => Known::Text(String::new()),
        };
        Ok(Live {
            known,
            session,
            used: 0,
        })
    }

    fn answer(&mut self, job: Job) -> Result<(), SessionError> {
        let Job { request, events } = job;
        let continued = self.take_prefix_of(&request.input);
        let is_continued = continued.is_some();
        let mut live = match continued {
            Some(l) => l,
            None => self.fresh(&request.input)?,
        };
        let session = &mut live.session;
        session.set_sampling(request.sampling.clone())?;
        let reused = session.token_count();
        let start = std::time::Instant::now();
        let (fed, user) = match (&live.known, &request.input) {
            (Known::Chat(known), Input::Chat(messages)) => {
                read_exchanges(session, &messages[known.len()..])?
            }
            (Known::Text(known), Input::Text { prompt, echo }) => {
                if *echo {
                    let _ = events.send(Event::Text(prompt.clone()));
                }
                (0, prompt[known.len()..].to_string())
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
            if let TurnEvent::Text(t) = e {
                let (text, hit) = stops.push(t);
                send(text, &mut sent);
                if hit {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        })?;
        if !stops.hit {
            send(stops.finish(), &mut sent);
        }
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
        let _ = events.send(Event::Done(finish, usage));
        if report.stop == StopReason::Cancelled && !stops.hit {
            // The client left: nobody knows this reply, so no request will continue it.
            return Ok(());
        }
        live.known = match request.input {
            Input::Chat(mut messages) => {
                messages.push(Message::new(Role::Assistant, sent));
                Known::Chat(messages)
            }
            // What the client can send back: the prompt and the completion it was sent.
            Input::Text { prompt, .. } => Known::Text(prompt + &sent),
        };
        self.keep(live);
        Ok(())
    }
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
