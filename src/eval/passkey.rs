//! `eval passkey`: the passkey retrieval task of Landmark Attention and LM-Infinite. A five-digit
//! number is hidden at a chosen depth of repetitive filler text and asked for at the end; the
//! model answers greedily. Inside the Λ (within `n_local` of the question, or among the sinks) the
//! key is attended and should be found; once evicted it cannot be, and the table says so.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::attention::LambdaParams;
use crate::engine::Engine;
use crate::model::Logits;
use crate::tokenizer::Tokenizer;

use super::meter::Meter;
use super::{EvalError, Mode, argmax, feed, last_row, new_cache};

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
                let answer = answer(engine, params, &prompt.tokens)?;
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
fn answer(engine: &Engine, params: LambdaParams, prompt: &[u32]) -> Result<String, EvalError> {
    let mut cache = new_cache(engine, params);
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
