//! `lambdachat bench serve`: `lambdachat serve` as its clients see it, in one process: a server
//! on a free local port and a client that drives it over HTTP, as `--connect` does.
//!
//! - **Time to first token of a continued conversation**, turn after turn: each request sends
//!   the whole conversation (OpenAI's way), the server continues its Λ cache and feeds only the
//!   new message, so the time should not grow with the conversation.
//! - **Decode speed through SSE** against the same engine decoding in this process (as `bench
//!   decode` does), alternated round by round so both see the same machine.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::Args;

use super::RunArgs;
use crate::config::Config;
use crate::engine::Engine;
use crate::remote::{Client, Piece, StreamEnd};
use crate::sampling::SamplingParams;
use crate::server::{self, Generator, GeneratorOptions, ServerState};
use crate::session::Session;

#[derive(Args)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Turns of the conversation whose time to first token is measured
    #[arg(long, default_value_t = 200)]
    pub turns: usize,
    /// Longest reply of each of those turns, in tokens
    #[arg(long, default_value_t = 16)]
    pub reply_tokens: usize,
    /// Tokens each round of the decode comparison generates, over SSE and in this process
    #[arg(long, default_value_t = 200)]
    pub decode_tokens: usize,
    /// Rounds of the decode comparison (SSE and in-process alternated); 0 skips it
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Then this many rounds of one turn of the long conversation and one of a second one just
    /// past the point where its Λ filled, alternating: their mean times to first token side
    /// by side (0 skips them)
    #[arg(long, default_value_t = 0)]
    pub alternate: usize,
}

/// Turns whose figures are printed (those within `--turns`, and the last).
const CHECKPOINTS: [usize; 9] = [1, 2, 5, 10, 20, 50, 100, 150, 200];

pub fn run(args: ServeBenchArgs, config: &Config) -> Result<i32> {
    if args.turns == 0 || args.reply_tokens == 0 || args.decode_tokens == 0 {
        bail!("--turns, --reply-tokens and --decode-tokens must be at least 1");
    }
    let settings = args.run.settings(config)?;
    let (engine, params) = settings.load()?;
    let base = start_server(
        engine.clone(),
        params,
        args.decode_tokens.max(args.reply_tokens),
    )?;
    let client = Client::new(&base, None)?;
    println!(
        "serve benchmark: {}, greedy",
        super::bench::setup(&engine, params)
    );
    let capacity = (params.n_global + params.n_local) as u64;
    let long = conversation_ttft(&client, &args, capacity)?;
    if args.alternate > 0 {
        alternate(&client, long, capacity, &args)?;
    }
    if args.rounds > 0 {
        decode_speed(&client, &engine, params, &args)?;
    }
    Ok(0)
}

/// A server on 127.0.0.1 and a free port, on a thread of its own; its base URL.
fn start_server(
    engine: Arc<Engine>,
    params: crate::attention::LambdaParams,
    max_tokens: usize,
) -> Result<String> {
    let generator = Generator::start(
        engine,
        GeneratorOptions {
            params,
            conversations: 2,
            queue: 2,
            recall: None,
            saved: None,
        },
    )
    .context("starting the generation thread")?;
    let state = Arc::new(ServerState::new(
        generator,
        "bench".into(),
        SamplingParams::default(),
        max_tokens,
        None,
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the server's runtime")?;
    let listener = runtime.block_on(server::bind("127.0.0.1", 0))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || {
            let served = runtime.block_on(server::serve(listener, state, std::future::pending()));
            if let Err(e) = served {
                tracing::error!("the benchmark's server stopped: {e}");
            }
        })
        .context("starting the server thread")?;
    Ok(format!("http://{addr}"))
}

/// One streamed request, greedy: its text, the client's times, and how it ended.
struct Streamed {
    text: String,
    pieces: usize,
    /// From sending the request to the first text.
    ttft_s: f64,
    /// From the first text to the last.
    stream_s: f64,
    end: StreamEnd,
}

fn stream(client: &Client, messages: &serde_json::Value, max_tokens: usize) -> Result<Streamed> {
    let body = serde_json::json!({
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": max_tokens,
        "temperature": 0.0,
    });
    let sent = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = sent;
    let mut text = String::new();
    let mut pieces = 0;
    let end = client.stream_chat(&body, &AtomicBool::new(false), &mut |piece| {
        if let Piece::Text(t) = piece {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            pieces += 1;
            text.push_str(&t);
        }
    })?;
    let first = first.unwrap_or(last);
    Ok(Streamed {
        text,
        pieces,
        ttft_s: (first - sent).as_secs_f64(),
        stream_s: (last - first).as_secs_f64(),
        end,
    })
}

/// A conversation as a client holds it: every message, sent whole with each turn.
struct Conversation {
    messages: Vec<serde_json::Value>,
    turns: usize,
}

impl Conversation {
    fn new(system: &str) -> Self {
        Self {
            messages: vec![serde_json::json!({"role": "system", "content": system})],
            turns: 0,
        }
    }

    /// One more question and its streamed reply (kept for the next turn); the size of the
    /// request.
    fn turn(&mut self, client: &Client, reply_tokens: usize) -> Result<(Streamed, usize)> {
        self.turns += 1;
        self.messages.push(serde_json::json!({
            "role": "user",
            "content": format!("Tell me one fact about the number {}.", self.turns),
        }));
        let all = serde_json::Value::Array(self.messages.clone());
        let bytes = all.to_string().len();
        let s = stream(client, &all, reply_tokens)?;
        self.messages
            .push(serde_json::json!({"role": "assistant", "content": s.text}));
        Ok((s, bytes))
    }
}

/// A usage extension's counter.
fn counter(end: &StreamEnd, key: &str) -> u64 {
    end.extension
        .as_ref()
        .and_then(|e| e.get(key))
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

/// Turn after turn of one conversation, the time to first token at the checkpoints, and the
/// means of ten turns: the first continued ones, the first after the Λ filled (`capacity`
/// tokens: from then on a turn's attention costs the same), and the last.
fn conversation_ttft(
    client: &Client,
    args: &ServeBenchArgs,
    capacity: u64,
) -> Result<Conversation> {
    println!(
        "\none conversation, {} turns of a short question and a reply of at most {} tokens:",
        args.turns, args.reply_tokens
    );
    println!(
        "{:>6} {:>10} {:>10} {:>12} {:>11} {:>12}",
        "turn", "TTFT ms", "tokens fed", "tokens seen", "continued", "request KiB"
    );
    let mut chat = Conversation::new("You are a helpful assistant. Answer in one sentence.");
    let mut ttft = Vec::with_capacity(args.turns);
    let mut filled_at = None;
    for turn in 1..=args.turns {
        let (s, bytes) = chat.turn(client, args.reply_tokens)?;
        let request_kib = bytes as f64 / 1024.0;
        ttft.push(s.ttft_s);
        if filled_at.is_none() && counter(&s.end, "tokens_seen") >= capacity {
            filled_at = Some(turn);
        }
        if CHECKPOINTS.contains(&turn) || turn == args.turns {
            println!(
                "{turn:>6} {:>10.1} {:>10} {:>12} {:>11} {:>12.1}",
                s.ttft_s * 1e3,
                counter(&s.end, "tokens_fed"),
                counter(&s.end, "tokens_seen"),
                s.end
                    .extension
                    .as_ref()
                    .and_then(|e| e.get("continued"))
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
                request_kib
            );
        }
    }
    // Turn 1 reads the system prompt too; the continued ones start at turn 2.
    let mean_of = |first: usize| {
        let last = (first + 9).min(args.turns);
        (first, last, 1e3 * mean(&ttft[first - 1..last]))
    };
    let early = mean_of(2.min(args.turns));
    let late = mean_of(args.turns.saturating_sub(9).max(1));
    let say = |(a, b, ms): (usize, usize, f64)| format!("turns {a}–{b} {ms:.1} ms");
    println!("time to first token, means of up to 10 turns:");
    println!("  continued, the window filling:  {}", say(early));
    match filled_at {
        Some(full) if full + 9 < late.0 => {
            let filled = mean_of(full);
            println!("  the Λ full ({capacity} tokens):    {}", say(filled));
            println!(
                "  the last:                       {} ({:.2}× the Λ-full turns, {:.2}× the first)",
                say(late),
                late.2 / filled.2,
                late.2 / early.2
            );
        }
        _ => println!(
            "  the last:                       {} ({:.2}× the first; the Λ of {capacity} tokens did not fill \
             10 turns before the end: more --turns show the flat part)",
            say(late),
            late.2 / early.2
        ),
    }
    Ok(chat)
}

/// Rounds of one turn of `long` and one of a second conversation whose Λ has just filled,
/// alternated: both attend a full Λ, so a difference would be the length's own cost.
fn alternate(
    client: &Client,
    mut long: Conversation,
    capacity: u64,
    args: &ServeBenchArgs,
) -> Result<()> {
    let mut young = Conversation::new("You are a helpful assistant. Answer in one short sentence.");
    loop {
        let (s, _) = young.turn(client, args.reply_tokens)?;
        if counter(&s.end, "tokens_seen") >= capacity || young.turns >= long.turns {
            break;
        }
    }
    println!(
        "
{} rounds alternated: a turn of the long conversation (from turn {}), one of a second \
         one whose Λ just filled (from turn {}):",
        args.alternate,
        long.turns + 1,
        young.turns + 1
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut seen_a, mut seen_b) = (0, 0);
    for _ in 0..args.alternate {
        let (s, _) = long.turn(client, args.reply_tokens)?;
        a.push(s.ttft_s * 1e3);
        seen_a = counter(&s.end, "tokens_seen");
        let (s, _) = young.turn(client, args.reply_tokens)?;
        b.push(s.ttft_s * 1e3);
        seen_b = counter(&s.end, "tokens_seen");
    }
    let (ma, mb) = (mean(&a), mean(&b));
    println!(
        "time to first token, means: long {ma:.1} ms ({:.1}–{:.1}; {seen_a} tokens seen), young {mb:.1} ms ({:.1}–{:.1}; {seen_b} tokens seen): {:.2}×",
        min(&a),
        max(&a),
        min(&b),
        max(&b),
        ma / mb
    );
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// Rounds of SSE and in-process decoding, alternated; means and ranges.
fn decode_speed(
    client: &Client,
    engine: &Arc<Engine>,
    params: crate::attention::LambdaParams,
    args: &ServeBenchArgs,
) -> Result<()> {
    let n = args.decode_tokens;
    println!(
        "\ndecode speed, {n} tokens a round, {} rounds alternated (tok/s):",
        args.rounds
    );
    println!(
        "{:>6} {:>12} {:>14} {:>14}",
        "round", "in-process", "SSE (server)", "SSE (client)"
    );
    let (mut local, mut server_side, mut client_side) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        local.push(decode_in_process(engine, params, n)?);
        // A conversation of its own each round (no cache to continue), long enough to decode
        // all the tokens.
        let messages = serde_json::json!([
            {"role": "system", "content": format!("Round {round}.")},
            {"role": "user", "content": "Count from 1 to 1000, one number per line."},
        ]);
        let s = stream(client, &messages, n)?;
        server_side.push(s.end.server_tok_s().unwrap_or(0.0));
        client_side.push((s.pieces.saturating_sub(1)) as f64 / s.stream_s.max(1e-9));
        println!(
            "{round:>6} {:>12.2} {:>14.2} {:>14.2}{}",
            local[round - 1],
            server_side[round - 1],
            client_side[round - 1],
            if s.pieces < n {
                format!("   (the reply ended after {} pieces)", s.pieces)
            } else {
                String::new()
            }
        );
    }
    let stats = |v: &[f64]| (mean(v), min(v), max(v));
    let (l, s, c) = (stats(&local), stats(&server_side), stats(&client_side));
    println!(
        "means: in-process {:.2} ({:.2}–{:.2}), SSE measured by the server {:.2} ({:.2}–{:.2}, {:.3}×), at the client {:.2} ({:.2}–{:.2}, {:.3}×)",
        l.0,
        l.1,
        l.2,
        s.0,
        s.1,
        s.2,
        s.0 / l.0,
        c.0,
        c.1,
        c.2,
        c.0 / l.0
    );
    Ok(())
}

/// `n` greedy tokens decoded by a session of this process after a short prompt, as `bench
/// decode` does; tok/s.
fn decode_in_process(
    engine: &Arc<Engine>,
    params: crate::attention::LambdaParams,
    n: usize,
) -> Result<f64> {
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let mut session = Session::new(engine.clone(), params, greedy, None)?;
    let prompt = engine
        .tokenizer
        .encode("Count from 1 to 1000, one number per line.")?;
    Device::Cpu.with_context(|| -> Result<f64> {
        let mut logits = session.feed(&prompt)?;
        let start = Instant::now();
        for _ in 0..n {
            let id = session.sample(&logits)?;
            logits = session.feed(&[id])?;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
}
