//! `eval passkey`: the passkey retrieval task of Landmark Attention and LM-Infinite. A five-digit
//! number is hidden at a chosen depth of repetitive filler text and asked for at the end; the
//! model answers greedily. Inside the Λ (within `n_local` of the question, or among the sinks) the
//! key is attended and should be found; once evicted it cannot be, and the table says so.

use clap::Args;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

use crate::attention::{KvCache, LambdaParams};
use crate::engine::Engine;
use crate::model::Logits;
use crate::tokenizer::Tokenizer;

use super::meter::Meter;
use super::output::{Csv, LineChart, Table};
use super::{
    EvalError, Evaluation, Mode, RecallSetup, Report, RunContext, argmax, describe, feed, last_row,
    new_cache, parse_depth, parse_length, series_by_mode, short_count, sorted_lengths,
};

/// `eval passkey`'s arguments.
#[derive(Args)]
pub struct PasskeyArgs {
    /// Prompt lengths in tokens (k = 1024)
    #[arg(long, value_delimiter = ',', value_parser = parse_length, default_value = "1k,4k,8k")]
    pub lengths: Vec<usize>,
    /// Where the key sits in the filler: 0 = start, 1 = end
    #[arg(long, value_delimiter = ',', value_parser = parse_depth, default_value = "0.1,0.5,0.9")]
    pub depths: Vec<f64>,
    /// Prompts per length and depth (each with its own key)
    #[arg(long, default_value_t = 2)]
    pub trials: usize,
    /// Attention modes: vanilla, lambda, window, recall
    #[arg(long, value_delimiter = ',', value_parser = Mode::parse, default_value = "vanilla,lambda,window")]
    pub modes: Vec<Mode>,
    /// Seed of the keys
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl Evaluation for PasskeyArgs {
    /// The checked lengths and modes.
    type Input = (Vec<usize>, Vec<Mode>);

    fn prepare(&self) -> Result<Self::Input, EvalError> {
        if self.depths.is_empty() {
            return Err(EvalError::BadDepth(String::new()));
        }
        if self.trials == 0 {
            return Err(EvalError::Invalid("--trials must be at least 1".into()));
        }
        Ok((sorted_lengths(&self.lengths)?, Mode::distinct(&self.modes)?))
    }

    fn run(
        &self,
        (lengths, modes): Self::Input,
        run: &RunContext<'_>,
    ) -> Result<Report, EvalError> {
        let plan = Plan {
            lambda: run.lambda,
            recall: &run.recall,
            lengths: &lengths,
            depths: &self.depths,
            trials: self.trials,
            seed: self.seed,
        };
        let per_mode = lengths.len() * self.depths.len() * self.trials;
        let mut meter = run.meter((per_mode * modes.len()) as u64, "trials");
        let mut cells = Vec::new();
        for &mode in &modes {
            cells.extend(evaluate(run.engine, mode, &plan, &mut meter)?);
        }
        meter.finish();
        let mut csv = Csv::new(&[
            "mode",
            "length",
            "depth",
            "trials",
            "correct",
            "accuracy",
            "key_distance",
            "key_attended",
        ]);
        for c in &cells {
            csv.row(&[
                c.mode.name().into(),
                c.length.to_string(),
                c.depth.to_string(),
                c.trials.to_string(),
                c.correct.to_string(),
                format!("{:.3}", c.correct as f64 / c.trials as f64),
                format!("{:.0}", c.key_distance),
                c.key_attended.to_string(),
            ]);
        }
        let chart = LineChart {
            title: format!("Passkey retrieval: {}", run.model_name()),
            x_label: "tokens between the key and the question".into(),
            y_label: "accuracy".into(),
            log_x: true,
            log_y: false,
            series: series_by_mode(
                &modes,
                &cells,
                |c| c.mode,
                |c| (c.key_distance, c.correct as f64 / c.trials as f64),
            ),
        };
        let mut table = Table::new(
            "length  depth  key distance",
            modes.iter().map(|m| m.name().to_string()),
        );
        let per_mode: Vec<Vec<&Cell>> = modes
            .iter()
            .map(|&m| cells.iter().filter(|c| c.mode == m).collect())
            .collect();
        for (i, first) in per_mode[0].iter().enumerate() {
            let mut row = vec![format!(
                "{:<6}  {:<5}  {:>12.0}",
                short_count(first.length),
                first.depth,
                first.key_distance
            )];
            for cells in &per_mode {
                let c = cells[i];
                let mark = if c.key_attended { "" } else { " (evicted)" };
                row.push(format!("{}/{}{mark}", c.correct, c.trials));
            }
            table.row(row);
        }
        let misses = cells
            .iter()
            .filter_map(|c| {
                c.example_miss.as_ref().map(|a| {
                    format!(
                        "{} at {} depth {}: answered {a:?}",
                        c.mode.name(),
                        short_count(c.length),
                        c.depth
                    )
                })
            })
            .take(5)
            .collect();
        let json = json!({"model": run.model_name(), "cells": cells});
        Ok(Report {
            heading: format!(
                "passkey retrieval, {}; lambda: {}; {} trial(s) per cell, greedy",
                run.model_name(),
                describe(run.lambda),
                self.trials
            ),
            table,
            notes: misses,
            csv: vec![("passkey.csv", csv)],
            charts: vec![("passkey.svg", chart)],
            json: json.as_object().cloned().unwrap_or_default(),
        })
    }
}

const TASK: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.\n";
const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const QUESTION: &str = "What is the pass key? The pass key is";
/// Greedy tokens generated for the answer (a five-digit number and a little slack).
const ANSWER_TOKENS: usize = 8;

/// One generated prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    pub key: u32,
    /// Token position where the key's sentence starts.
    pub key_position: usize,
}

impl Prompt {
    /// Tokens between the key's sentence and the end of the prompt: how far back the model must
    /// look.
    pub fn key_distance(&self) -> usize {
        self.tokens.len() - self.key_position
    }
}

/// Builds a prompt of about `length` tokens (never more) with `key` after `depth` (0 = start,
/// 1 = end) of the filler.
pub fn make_prompt(
    tokenizer: &Tokenizer,
    length: usize,
    depth: f64,
    key: u32,
) -> Result<Prompt, EvalError> {
    let enc = |s: &str| {
        tokenizer
            .encode(s)
            .map_err(|e| EvalError::Tokenizer(e.to_string()))
    };
    let bos: Vec<u32> = tokenizer
        .bos
        .filter(|_| tokenizer.add_bos)
        .into_iter()
        .collect();
    let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
    let fixed = bos.len() + enc(TASK)?.len() + enc(&needle)?.len() + enc(QUESTION)?.len();
    let unit = enc(FILLER)?.len().max(1);
    let build = |n: usize| -> Result<Prompt, EvalError> {
        let before = ((n as f64) * depth).round() as usize;
        let head = format!("{TASK}{}", FILLER.repeat(before));
        let mut tokens = bos.clone();
        tokens.extend(enc(&head)?);
        let key_position = tokens.len();
        let tail = format!("{needle}{}{QUESTION}", FILLER.repeat(n - before));
        tokens.extend(enc(&tail)?);
        Ok(Prompt {
            tokens,
            key,
            key_position,
        })
    };
    // Tokens are nearly additive over whole sentences; shrink until the prompt fits.
    let mut n = length.saturating_sub(fixed) / unit;
    loop {
        let prompt = build(n)?;
        if prompt.tokens.len() <= length || n == 0 {
            if prompt.tokens.len() > length {
                return Err(EvalError::Invalid(format!(
                    "a passkey prompt needs at least {} tokens; {length} is too short",
                    prompt.tokens.len()
                )));
            }
            return Ok(prompt);
        }
        n -= 1;
    }
}

/// `units` sentences of the passkey task's filler: also the context of `eval cost`.
pub fn filler(units: usize) -> String {
    FILLER.repeat(units)
}

/// The first run of digits in `answer`, if any.
pub fn first_number(answer: &str) -> Option<u32> {
    let digits: String = answer
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// One (mode, length, depth) cell: trials and how many found the key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cell {
    pub mode: Mode,
    pub length: usize,
    pub depth: f64,
    pub trials: usize,
    pub correct: usize,
    /// Mean tokens between the key and the question.
    pub key_distance: f64,
    /// Whether the key is still attended when the question is read (in the window or a sink),
    /// under this mode: where the Λ predicts success.
    pub key_attended: bool,
    /// The first wrong answer, to show what the model said instead.
    pub example_miss: Option<String>,
}

/// The grid of an evaluation.
pub struct Plan<'a> {
    pub lambda: LambdaParams,
    /// How the `recall` mode recalls.
    pub recall: &'a RecallSetup,
    /// Prompt lengths in tokens.
    pub lengths: &'a [usize],
    /// Where the key goes, 0 (start) to 1 (end).
    pub depths: &'a [f64],
    pub trials: usize,
    /// Seed of the keys.
    pub seed: u64,
}

/// Runs the plan's trials per length and depth under `mode`.
pub fn evaluate(
    engine: &Engine,
    mode: Mode,
    plan: &Plan<'_>,
    meter: &mut Meter,
) -> Result<Vec<Cell>, EvalError> {
    let Plan {
        lambda,
        recall,
        lengths,
        depths,
        trials,
        seed,
    } = *plan;
    meter.relabel(format!("passkey {}", mode.name()));
    let mut cells = Vec::new();
    for &length in lengths {
        // Each (length, depth) draws the same keys in every mode: the modes see the same prompts.
        for (d, &depth) in depths.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(seed ^ ((length as u64) << 20) ^ d as u64);
            let (mut correct, mut distance, mut attended, mut miss) = (0, 0usize, true, None);
            for _ in 0..trials {
                let key = rng.random_range(10_000..100_000u32);
                let prompt = make_prompt(&engine.tokenizer, length, depth, key)?;
                let params = mode.params(lambda, prompt.tokens.len() + ANSWER_TOKENS)?;
                let cache = new_cache(engine, mode, params, recall)?;
                let answer = answer(engine, cache, &prompt.tokens)?;
                if first_number(&answer) == Some(key) {
                    correct += 1;
                } else if miss.is_none() {
                    miss = Some(answer.trim().to_string());
                }
                distance += prompt.key_distance();
                attended &=
                    prompt.key_distance() < params.n_local || prompt.key_position < params.n_global;
                meter.advance(1);
            }
            cells.push(Cell {
                mode,
                length,
                depth,
                trials,
                correct,
                key_distance: distance as f64 / trials.max(1) as f64,
                key_attended: attended,
                example_miss: miss,
            });
        }
    }
    Ok(cells)
}

/// The greedy continuation of `prompt` (up to [`ANSWER_TOKENS`], stopping at a newline or a stop
/// token).
fn answer(engine: &Engine, mut cache: KvCache, prompt: &[u32]) -> Result<String, EvalError> {
    let mut row = Vec::new();
    feed(
        engine,
        &mut cache,
        prompt,
        512,
        Logits::Last,
        |_, _, logits, _| {
            row = last_row(&logits)?;
            Ok(())
        },
    )?;
    let mut ids = Vec::new();
    for _ in 0..ANSWER_TOKENS {
        let id = argmax(&row);
        if engine.is_stop(id) {
            break;
        }
        ids.push(id);
        let text = engine
            .tokenizer
            .decode(&ids)
            .map_err(|e| EvalError::Tokenizer(e.to_string()))?;
        if text.trim_start().contains('\n') {
            break;
        }
        row = last_row(&engine.model.forward(&[id], &mut cache, Logits::Last)?)?;
    }
    engine
        .tokenizer
        .decode(&ids)
        .map_err(|e| EvalError::Tokenizer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_number_reads_the_answer() {
        assert_eq!(first_number(" 71432. Remember"), Some(71432));
        assert_eq!(first_number("is 7 1432"), Some(7));
        assert_eq!(first_number("unknown"), None);
    }
}
