//! `eval facts`: memory of a real chat. A conversation, run through the session and the model's
//! chat template, states facts ("The code of the blue door is 4812.") spread over a long filler
//! conversation, then asks for each one. Unlike the passkey, the facts sit in user turns among
//! varied text, and the answers come through the same path a user's do. Accuracy per mode and
//! per distance between a fact and its question.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Args;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

use crate::attention::LambdaParams;
use crate::engine::Engine;
use crate::sampling::SamplingParams;
use crate::session::Session;

use super::meter::Meter;
use super::output::{Csv, LineChart, Table};
use super::passkey::first_number;
use super::{
    EvalError, Evaluation, Mode, RecallSetup, Report, RunContext, check_recall, describe,
    parse_length, read_text, series_by_mode, short_count, sorted_lengths,
};

/// What is locked, and by which code: one subject per fact.
const SUBJECTS: [&str; 10] = [
    "blue door",
    "red box",
    "green safe",
    "yellow locker",
    "silver gate",
    "black chest",
    "white cabinet",
    "orange vault",
    "purple drawer",
    "golden padlock",
];
/// Tokens of the reply to a filler or fact message (an acknowledgement; what it says does not
/// matter, and one token keeps the run about reading).
const ACK_TOKENS: usize = 1;
/// Tokens of an answer: a four-digit code and some slack.
const ANSWER_TOKENS: usize = 12;
/// Characters of one filler message (about 400 tokens of English).
const FILLER_CHARS: usize = 1600;

/// `eval facts`'s arguments.
#[derive(Args)]
pub struct FactsArgs {
    /// Conversation lengths in tokens before the questions (k = 1024)
    #[arg(long, value_delimiter = ',', value_parser = parse_length, default_value = "16k")]
    pub lengths: Vec<usize>,
    /// Facts stated, 1 to 10
    #[arg(long, default_value_t = 10)]
    pub facts: usize,
    /// Attention modes: vanilla, lambda, window, recall
    #[arg(long, value_delimiter = ',', value_parser = Mode::parse, default_value = "vanilla,lambda,recall")]
    pub modes: Vec<Mode>,
    /// Filler text (UTF-8); without it, generated varied sentences
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Seed of the codes and the generated filler
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// One fact's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FactResult {
    pub mode: Mode,
    pub length: usize,
    pub subject: &'static str,
    pub code: u32,
    /// Tokens between the fact's message and its question.
    pub distance: u64,
    pub answer: String,
    pub correct: bool,
}

impl Evaluation for FactsArgs {
    /// The lengths, the modes and the filler text, if one was given.
    type Input = (Vec<usize>, Vec<Mode>, Option<String>);

    fn prepare(&self) -> Result<Self::Input, EvalError> {
        if !(1..=SUBJECTS.len()).contains(&self.facts) {
            return Err(EvalError::Invalid(format!(
                "--facts must be 1 to {}, not {}",
                SUBJECTS.len(),
                self.facts
            )));
        }
        let text = self.text.as_deref().map(read_text).transpose()?;
        Ok((
            sorted_lengths(&self.lengths)?,
            Mode::distinct(&self.modes)?,
            text,
        ))
    }

    fn run(
        &self,
        (lengths, modes, text): Self::Input,
        run: &RunContext<'_>,
    ) -> Result<Report, EvalError> {
        let mut meter = run.meter(
            (lengths.iter().sum::<usize>() * modes.len()) as u64,
            "tokens",
        );
        let mut results = Vec::new();
        let mut notes = Vec::new();
        for &mode in &modes {
            meter.relabel(format!("facts {}", mode.name()));
            for &length in &lengths {
                let plan = Plan {
                    length,
                    facts: self.facts,
                    seed: self.seed,
                    text: text.as_deref(),
                };
                match converse(run, mode, &plan, &mut meter)? {
                    Some(r) => results.extend(r),
                    None => notes.push(format!(
                        "vanilla at {}: its KV cache would pass --vanilla-memory; not run",
                        short_count(length)
                    )),
                }
            }
        }
        meter.finish();
        Ok(report(run, &lengths, &modes, results, notes))
    }
}

/// One conversation's shape.
struct Plan<'a> {
    length: usize,
    facts: usize,
    seed: u64,
    text: Option<&'a str>,
}

/// Runs one conversation under `mode`: filler and facts, then a question per fact. `None` when
/// vanilla's cache would not fit its budget.
fn converse(
    run: &RunContext<'_>,
    mode: Mode,
    plan: &Plan<'_>,
    meter: &mut Meter,
) -> Result<Option<Vec<FactResult>>, EvalError> {
    let engine = run.engine;
    // Room for the questions and the template's tokens after the filler.
    let total = plan.length + 2048;
    if mode == Mode::Vanilla {
        let params = LambdaParams::new(0, total, None)?;
        if super::kv_bytes_at(engine, params, total) > run.vanilla_budget {
            return Ok(None);
        }
    }
    let mut session = new_session(engine, mode, run.lambda, total, &run.recall)?;
    let mut rng = StdRng::seed_from_u64(plan.seed ^ plan.length as u64);
    let codes: Vec<u32> = (0..plan.facts)
        .map(|_| rng.random_range(1000..10_000))
        .collect();
    let mut filler = Filler::new(plan.text, plan.seed);
    // Filler messages until the length is reached, the facts spread over its first 90% after
    // the first message (so no fact sits among the sinks).
    let per_message = engine
        .tokenizer
        .encode(&filler.peek())
        .map_err(|e| EvalError::Tokenizer(e.to_string()))?
        .len()
        .max(1);
    let messages = plan.length.div_ceil(per_message).max(plan.facts + 1);
    let at = |f: usize| 1 + f * (messages - 1) * 9 / (10 * plan.facts);
    let mut stated = vec![0u64; plan.facts];
    let never = AtomicBool::new(false);
    let say = |session: &mut Session, text: &str, max: usize| {
        session
            .turn(text, Some(max), &never, &mut |_| {})
            .map(|r| r.reply)
    };
    let mut counted = 0u64;
    for m in 0..messages {
        for (f, code) in codes.iter().enumerate() {
            if at(f) == m {
                stated[f] = session.token_count();
                let fact = format!(
                    "Please remember this: the code of the {} is {code}.",
                    SUBJECTS[f]
                );
                say(&mut session, &fact, ACK_TOKENS)?;
            }
        }
        let passage = format!(
            "Here is a passage to read:\n\n{}\n\nReply with OK.",
            filler.next()
        );
        say(&mut session, &passage, ACK_TOKENS)?;
        // The meter counts up to the planned length (the last message may go past it).
        let now = session.token_count().min(plan.length as u64);
        meter.advance(now.saturating_sub(counted));
        counted = counted.max(now);
    }
    check_recall(session.recall_failure())?;
    let mut results = Vec::with_capacity(plan.facts);
    for (f, &code) in codes.iter().enumerate() {
        let distance = session.token_count() - stated[f];
        let question = format!(
            "What is the code of the {}? Answer with the number only.",
            SUBJECTS[f]
        );
        let answer = say(&mut session, &question, ANSWER_TOKENS)?;
        results.push(FactResult {
            mode,
            length: plan.length,
            subject: SUBJECTS[f],
            code,
            distance,
            correct: first_number(&answer) == Some(code),
            // One line, for the table's notes and the CSV.
            answer: answer.split_whitespace().collect::<Vec<_>>().join(" "),
        });
    }
    check_recall(session.recall_failure())?;
    Ok(Some(results))
}

/// A greedy session for `mode`: vanilla's window holds all `total` tokens; recall's stores go
/// where `recall` says.
fn new_session(
    engine: &Arc<Engine>,
    mode: Mode,
    lambda: LambdaParams,
    total: usize,
    recall: &RecallSetup,
) -> Result<Session, EvalError> {
    let sampling = SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        ..SamplingParams::default()
    };
    let params = mode.params(lambda, total)?;
    let mut session = Session::new(engine.clone(), params, sampling, None)?;
    if mode == Mode::Recall {
        recall
            .params
            .check_layers(&engine.model.layer_geometry(params))?;
        session.set_recall(Some((recall.params, recall.dir.clone())))?;
    }
    Ok(session)
}

/// Filler passages: consecutive pieces of the given text, or sentences drawn from word lists
/// (varied, without digits, so no number competes with the codes).
#[derive(Clone)]
struct Filler<'a> {
    text: Option<&'a str>,
    /// Byte offset of the next piece of the text.
    at: usize,
    seed: u64,
    /// Passages drawn so far (each generated one has its own seed).
    drawn: u64,
}

impl<'a> Filler<'a> {
    fn new(text: Option<&'a str>, seed: u64) -> Self {
        Self {
            text,
            at: 0,
            seed,
            drawn: 0,
        }
    }

    /// The next passage, without moving on.
    fn peek(&self) -> String {
        self.clone().next()
    }

    fn next(&mut self) -> String {
        match self.text {
            Some(text) => {
                if self.at >= text.len() {
                    self.at = 0;
                }
                let mut end = (self.at + FILLER_CHARS).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                let piece = text[self.at..end].to_string();
                self.at = end;
                piece
            }
            None => {
                const WHO: [&str; 8] = [
                    "The miller",
                    "A traveller",
                    "The old captain",
                    "My neighbour",
                    "The baker",
                    "A young student",
                    "The gardener",
                    "The innkeeper",
                ];
                const DID: [&str; 8] = [
                    "walked past",
                    "painted",
                    "talked about",
                    "repaired",
                    "looked at",
                    "wrote a letter about",
                    "dreamed of",
                    "asked about",
                ];
                const WHAT: [&str; 8] = [
                    "the quiet harbour",
                    "a crooked bridge",
                    "the long winter",
                    "an empty market",
                    "the northern road",
                    "a small chapel",
                    "the river mill",
                    "an orchard of pears",
                ];
                const HOW: [&str; 6] = [
                    "before the rain came",
                    "while the bells rang",
                    "with great care",
                    "late in the evening",
                    "as the fog lifted",
                    "without a word",
                ];
                let mut rng = StdRng::seed_from_u64(
                    self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.drawn,
                );
                self.drawn += 1;
                let mut out = String::with_capacity(FILLER_CHARS + 80);
                while out.len() < FILLER_CHARS {
                    let r = &mut rng;
                    out.push_str(&format!(
                        "{} {} {} {}. ",
                        WHO[r.random_range(0..WHO.len())],
                        DID[r.random_range(0..DID.len())],
                        WHAT[r.random_range(0..WHAT.len())],
                        HOW[r.random_range(0..HOW.len())]
                    ));
                }
                out
            }
        }
    }
}

/// The table (accuracy per length and distance third, per mode), the CSV of every fact and
/// the chart of accuracy against distance.
fn report(
    run: &RunContext<'_>,
    lengths: &[usize],
    modes: &[Mode],
    results: Vec<FactResult>,
    mut notes: Vec<String>,
) -> Report {
    let mut csv = Csv::new(&[
        "mode", "length", "subject", "code", "distance", "correct", "answer",
    ]);
    for r in &results {
        csv.row(&[
            r.mode.name().into(),
            r.length.to_string(),
            r.subject.into(),
            r.code.to_string(),
            r.distance.to_string(),
            r.correct.to_string(),
            r.answer.clone(),
        ]);
    }
    let mut table = Table::new(
        "length  facts  mean distance",
        modes.iter().map(|m| m.name().to_string()),
    );
    for &length in lengths {
        // Thirds by order of statement: the earliest facts are the farthest.
        let reference: Vec<&FactResult> = modes
            .iter()
            .find_map(|&m| {
                let of: Vec<&FactResult> = results
                    .iter()
                    .filter(|r| r.mode == m && r.length == length)
                    .collect();
                (!of.is_empty()).then_some(of)
            })
            .unwrap_or_default();
        let n = reference.len();
        for third in 0..3 {
            let range = third * n / 3..(third + 1) * n / 3;
            if range.is_empty() {
                continue;
            }
            let mean = reference[range.clone()]
                .iter()
                .map(|r| r.distance as f64)
                .sum::<f64>()
                / range.len() as f64;
            let mut row = vec![format!(
                "{:<6}  {:>5}  {:>13.0}",
                short_count(length),
                format!("{}–{}", range.start + 1, range.end),
                mean
            )];
            for &m in modes {
                let of: Vec<&FactResult> = results
                    .iter()
                    .filter(|r| r.mode == m && r.length == length)
                    .collect();
                row.push(if of.is_empty() {
                    "—".into()
                } else {
                    let cell = &of[range.clone()];
                    format!(
                        "{}/{}",
                        cell.iter().filter(|r| r.correct).count(),
                        cell.len()
                    )
                });
            }
            table.row(row);
        }
    }
    if let Some(miss) = results.iter().find(|r| !r.correct) {
        notes.push(format!(
            "{} at {}: asked for the {} ({}), answered \"{}\"",
            miss.mode.name(),
            short_count(miss.length),
            miss.subject,
            miss.code,
            miss.answer
        ));
    }
    let chart = LineChart {
        title: format!("Facts recalled in a chat: {}", run.model_name()),
        x_label: "tokens between the fact and its question".into(),
        y_label: "correct".into(),
        log_x: true,
        log_y: false,
        series: series_by_mode(
            modes,
            &results,
            |r| r.mode,
            |r| (r.distance as f64, r.correct as u8 as f64),
        ),
    };
    let mut json = serde_json::Map::new();
    json.insert("results".into(), json!(results));
    Report {
        heading: format!(
            "facts in a chat, {}; lambda: {}; greedy",
            run.model_name(),
            describe(run.lambda)
        ),
        table,
        notes,
        csv: vec![("facts.csv", csv)],
        charts: vec![("facts.svg", chart)],
        json,
    }
}
