//! Measuring LM-Infinite's claims on the user's own model: perplexity far beyond the training
//! length (`ppl`), passkey retrieval inside and outside the Λ (`passkey`), bounded attention
//! entropy (`entropy`), and decode cost against context length (`cost`).
//!
//! Every evaluation compares attention *modes*, which are all the same [`HostCache`] code with
//! different parameters, so differences come from the rule and nothing else: `vanilla` is
//! ordinary causal attention (a window as long as the text, no sinks), `lambda` the configured
//! Λ, `window` the same window without sinks.
//!
//! Each evaluation is one file: its arguments (a clap `Args` struct), and an [`Evaluation`] that
//! checks them before the model loads, runs, and returns a [`Report`] (a table, CSV files,
//! charts and JSON). `cli/eval.rs` has the one run loop that loads the model, runs any of them
//! and writes and prints the report; a new evaluation is a file here and a variant there.
//!
//! [`HostCache`]: crate::attention::HostCache

pub mod cost;
pub mod entropy;
pub mod facts;
pub mod meter;
pub mod nll;
pub mod output;
pub mod passkey;
pub mod ppl;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;

use crate::attention::recall::{Recall, RecallParams, RecallParamsError};
use crate::attention::{AttentionError, KvCache, LambdaParams};
use crate::engine::Engine;
use crate::model::{Logits, ModelError};

use meter::Meter;
use output::{Csv, LineChart, OutDir, Table};

/// Everything an evaluation can reject or fail on.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} is not UTF-8 text (invalid byte at offset {1})")]
    NotUtf8(PathBuf, usize),
    #[error("{0} is empty: there is nothing to evaluate")]
    EmptyText(PathBuf),
    #[error("the text is {0} token(s) long: at least 2 are needed to predict one")]
    TooShort(usize),
    #[error("unknown mode '{0}' (modes: vanilla, lambda, window, recall)")]
    UnknownMode(String),
    #[error("no modes given (modes: vanilla, lambda, window, recall)")]
    NoModes,
    #[error("bad length '{0}': expected a positive number of tokens such as 512, 4k or 1m")]
    BadLength(String),
    #[error("no lengths given")]
    NoLengths,
    #[error("bad depth '{0}': expected a fraction between 0 and 1")]
    BadDepth(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("cannot draw {0}: {1}")]
    Plot(PathBuf, String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Params(#[from] crate::attention::ParamsError),
    #[error("{0}")]
    RecallParams(#[from] RecallParamsError),
    #[error("{0}")]
    Attention(#[from] AttentionError),
    #[error("the recall store failed: {0}")]
    RecallStore(String),
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
}

/// One evaluation as `lambdachat eval` runs it.
pub trait Evaluation: Sync {
    /// What [`Self::prepare`] read (a text, say), handed to [`Self::run`].
    type Input: Send;

    /// Checks and reads what needs no model: its errors come before anything is loaded or
    /// written.
    fn prepare(&self) -> Result<Self::Input, EvalError>;

    /// Runs on the loaded model and reports.
    fn run(&self, input: Self::Input, run: &RunContext<'_>) -> Result<Report, EvalError>;
}

/// What a run has at hand.
pub struct RunContext<'a> {
    pub engine: &'a Arc<Engine>,
    /// The Λ of the `lambda` mode (and the window of `window`).
    pub lambda: LambdaParams,
    /// Bytes vanilla's KV cache may take.
    pub vanilla_budget: u64,
    /// How the `recall` mode recalls.
    pub recall: RecallSetup,
    /// Where the report goes; an evaluation may write partial results there as it goes.
    pub out: &'a OutDir,
    /// No progress on stderr.
    pub quiet: bool,
}

impl RunContext<'_> {
    /// A progress meter for `total` units of work.
    pub fn meter(&self, total: u64, unit: &'static str) -> Meter {
        let meter = Meter::new("", total, unit);
        if self.quiet { meter.silent() } else { meter }
    }

    /// The model's name, for headings and chart titles.
    pub fn model_name(&self) -> &str {
        &self.engine.model.info().name
    }
}

/// What an evaluation found: printed as a table (or as JSON), written as CSV files and plots.
pub struct Report {
    /// The line above the table: what was measured, on what.
    pub heading: String,
    pub table: Table,
    /// Sentences below the table (where vanilla stopped, lengths cut, example misses).
    pub notes: Vec<String>,
    /// CSV files by name.
    pub csv: Vec<(&'static str, Csv)>,
    /// SVG plots by name.
    pub charts: Vec<(&'static str, LineChart)>,
    /// The results as JSON (`--json`); the run adds `notes` and `files`.
    pub json: serde_json::Map<String, serde_json::Value>,
}

/// An attention rule to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Ordinary causal attention over everything (the window is as long as the text).
    Vanilla,
    /// Λ: the configured sinks, window and distance limit.
    Lambda,
    /// The same window without sinks (G = 0): what the sinks are worth.
    Window,
    /// Λ with recall of evicted blocks (docs/ALGORITHM.md §10).
    Recall,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Vanilla => "vanilla",
            Mode::Lambda => "lambda",
            Mode::Window => "window",
            Mode::Recall => "recall",
        }
    }

    /// Parses one mode of a `--modes vanilla,lambda,window` list.
    pub fn parse(name: &str) -> Result<Mode, EvalError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "vanilla" => Ok(Mode::Vanilla),
            "lambda" | "λ" => Ok(Mode::Lambda),
            "window" => Ok(Mode::Window),
            "recall" => Ok(Mode::Recall),
            _ => Err(EvalError::UnknownMode(name.trim().to_string())),
        }
    }

    /// The modes of a list in their order, each once.
    pub fn distinct(list: &[Mode]) -> Result<Vec<Mode>, EvalError> {
        let mut modes = Vec::new();
        for &mode in list {
            if !modes.contains(&mode) {
                modes.push(mode);
            }
        }
        if modes.is_empty() {
            return Err(EvalError::NoModes);
        }
        Ok(modes)
    }

    /// The cache parameters of this mode for a run of `total` tokens under the Λ `lambda`.
    pub fn params(self, lambda: LambdaParams, total: usize) -> Result<LambdaParams, EvalError> {
        Ok(match self {
            Mode::Vanilla => LambdaParams::new(0, total.max(1), None)?,
            Mode::Lambda | Mode::Recall => lambda,
            Mode::Window => LambdaParams::new(0, lambda.n_local, None)?,
        })
    }
}

/// How the passes over a text run (`ppl`, `entropy`).
pub struct TextPlan<'a> {
    /// The Λ of the `lambda` mode (and the window of `window`).
    pub lambda: LambdaParams,
    /// Bucket ends (sorted).
    pub ends: &'a [usize],
    /// Tokens per forward.
    pub chunk: usize,
    /// Bytes vanilla's KV cache may take.
    pub vanilla_budget: u64,
    /// How the `recall` mode recalls.
    pub recall: &'a RecallSetup,
}

/// Parses one length of a `--lengths 512,1k,4k,1m` list (k = 1024, m = 1024²: `32k` is the
/// 32,768-token training length).
pub fn parse_length(item: &str) -> Result<usize, EvalError> {
    let item = item.trim();
    let lower = item.to_ascii_lowercase();
    let (digits, unit) = match lower.strip_suffix('k') {
        Some(d) => (d, 1024),
        None => match lower.strip_suffix('m') {
            Some(d) => (d, 1024 * 1024),
            None => (lower.as_str(), 1),
        },
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|&n| n > 0)
        .ok_or_else(|| EvalError::BadLength(item.to_string()))
}

/// Lengths sorted, without repeats; at least one.
pub fn sorted_lengths(list: &[usize]) -> Result<Vec<usize>, EvalError> {
    let mut lengths = list.to_vec();
    if lengths.is_empty() {
        return Err(EvalError::NoLengths);
    }
    lengths.sort_unstable();
    lengths.dedup();
    Ok(lengths)
}

/// Parses one depth of a `--depths 0.1,0.5` list: a fraction of the prompt, 0 (start) to 1
/// (end).
pub fn parse_depth(item: &str) -> Result<f64, EvalError> {
    match item.trim().parse::<f64>() {
        Ok(d) if (0.0..=1.0).contains(&d) => Ok(d),
        _ => Err(EvalError::BadDepth(item.trim().to_string())),
    }
}

/// A token count as the lengths are written: `4k`, `1m`, or the plain number.
pub fn short_count(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}m", n >> 20)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}k", n >> 10)
    } else {
        n.to_string()
    }
}

/// What a text evaluation (`ppl`, `entropy`) reads and checks before the model loads.
pub struct TextInput {
    pub text: String,
    /// Bucket ends asked for, sorted.
    pub lengths: Vec<usize>,
    pub modes: Vec<Mode>,
}

impl TextInput {
    /// Checks the lengths and modes, then reads the text.
    pub fn read(path: &Path, lengths: &[usize], modes: &[Mode]) -> Result<Self, EvalError> {
        let lengths = sorted_lengths(lengths)?;
        let modes = Mode::distinct(modes)?;
        Ok(Self {
            text: read_text(path)?,
            lengths,
            modes,
        })
    }
}

/// The tokens of a text evaluation's document, cut at its last length.
pub struct TextTokens {
    pub tokens: Vec<u32>,
    /// Bucket ends: the lengths asked for that the text reaches, the text's end closing them.
    pub ends: Vec<usize>,
    /// Says so when the text is shorter than the lengths asked for.
    pub notes: Vec<String>,
}

impl TextTokens {
    /// Tokenizes the input's text as one document and fits its lengths to it.
    pub fn new(engine: &Engine, input: &TextInput) -> Result<Self, EvalError> {
        let lengths = &input.lengths;
        let mut tokens = document_tokens(engine, &input.text)?;
        if tokens.len() < 2 {
            return Err(EvalError::TooShort(tokens.len()));
        }
        let (ends, cut) = fit_lengths(lengths, tokens.len());
        let mut notes = Vec::new();
        if cut {
            notes.push(format!(
                "the text is {} tokens long: lengths past it are cut, the last bucket ends there",
                tokens.len()
            ));
        }
        tokens.truncate(ends.last().copied().unwrap_or(tokens.len()));
        Ok(Self {
            tokens,
            ends,
            notes,
        })
    }
}

impl<'a> TextPlan<'a> {
    /// A pass over tokens bucketed by `ends` under `run`, in forwards of `chunk` tokens.
    pub fn new(run: &'a RunContext<'_>, ends: &'a [usize], chunk: usize) -> Self {
        Self {
            lambda: run.lambda,
            ends,
            chunk: chunk.max(1),
            vanilla_budget: run.vanilla_budget,
            recall: &run.recall,
        }
    }
}

/// Reads a text file for evaluation: it must be UTF-8 and not empty.
pub fn read_text(path: &Path) -> Result<String, EvalError> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::Read(path.to_path_buf(), e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| EvalError::NotUtf8(path.to_path_buf(), e.utf8_error().valid_up_to()))?;
    if text.trim().is_empty() {
        return Err(EvalError::EmptyText(path.to_path_buf()));
    }
    Ok(text)
}

/// The text's tokens as the model reads a document: BOS first when the model adds one.
pub fn document_tokens(engine: &Engine, text: &str) -> Result<Vec<u32>, EvalError> {
    let tok = &engine.tokenizer;
    let mut tokens: Vec<u32> = tok.bos.filter(|_| tok.add_bos).into_iter().collect();
    tokens.extend(
        tok.encode(text)
            .map_err(|e| EvalError::Tokenizer(e.to_string()))?,
    );
    Ok(tokens)
}

/// The lengths a text of `available` tokens can serve: those beyond it are dropped and the text's
/// own length closes the list. Returns the lengths and whether any were cut.
pub fn fit_lengths(lengths: &[usize], available: usize) -> (Vec<usize>, bool) {
    let mut fit: Vec<usize> = lengths
        .iter()
        .copied()
        .filter(|&l| l <= available)
        .collect();
    let cut = fit.len() < lengths.len();
    if cut && fit.last() != Some(&available) {
        fit.push(available);
    }
    (fit, cut)
}

/// One chart series per mode: the points of `items` of that mode, by distance (`passkey`,
/// `facts`: accuracy against how far back the answer was).
pub fn series_by_mode<T>(
    modes: &[Mode],
    items: &[T],
    mode_of: impl Fn(&T) -> Mode,
    point: impl Fn(&T) -> (f64, f64),
) -> Vec<output::Series> {
    modes
        .iter()
        .map(|&m| {
            let mut points: Vec<(f64, f64)> = items
                .iter()
                .filter(|i| mode_of(i) == m)
                .map(&point)
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            output::Series {
                name: m.name().into(),
                points,
            }
        })
        .collect()
}

/// How the `recall` mode recalls: its parameters and the folder of its stores.
#[derive(Debug, Clone)]
pub struct RecallSetup {
    pub params: RecallParams,
    pub dir: PathBuf,
}

/// A fresh cache of `params` for the engine's model and device; in the `recall` mode with a
/// new recall store (removed when the cache goes).
pub fn new_cache(
    engine: &Engine,
    mode: Mode,
    params: LambdaParams,
    recall: &RecallSetup,
) -> Result<KvCache, EvalError> {
    let layers = engine.model.layer_geometry(params);
    let mut cache = engine.empty_cache(params);
    if mode == Mode::Recall {
        recall.params.check_layers(&layers)?;
        cache.set_recall(Recall::temporary_in(recall.params, &layers, &recall.dir))?;
    }
    Ok(cache)
}

/// A recall store's failure during a pass (a cache's or a session's), if any: the pass's
/// figures would not be recall's, so the evaluation stops.
pub fn check_recall(failure: Option<String>) -> Result<(), EvalError> {
    match failure {
        Some(e) => Err(EvalError::RecallStore(e)),
        None => Ok(()),
    }
}

/// Runs `tokens` through the model, in chunks of at most `chunk`, calling `each` with every
/// chunk's start and logits (`rows`: every row with [`Logits::All`], else the last).
pub fn feed(
    engine: &Engine,
    cache: &mut KvCache,
    tokens: &[u32],
    chunk: usize,
    rows: Logits,
    mut each: impl FnMut(usize, &[u32], Tensor, &KvCache) -> Result<(), EvalError>,
) -> Result<(), EvalError> {
    let mut start = 0;
    for piece in tokens.chunks(chunk.max(1)) {
        let logits = engine.model.forward(piece, cache, rows)?;
        check_recall(cache.recall_failure())?;
        each(start, piece, logits, cache)?;
        start += piece.len();
    }
    Ok(())
}

/// Bytes the KV cache of `params` holds after `tokens` tokens (sliding layers capped at their
/// window), keys and values of the engine's type: what `vanilla` needs before it starts.
pub fn kv_bytes_at(engine: &Engine, params: LambdaParams, tokens: usize) -> u64 {
    engine
        .model
        .layer_geometry(params)
        .iter()
        .map(|g| {
            let slots = tokens.min(g.window) + tokens.min(g.n_global);
            engine
                .kv_type
                .bytes_for(slots * g.n_kv_heads * g.head_dim * 2) as u64
        })
        .sum()
}

/// Memory the system can still give this process (`MemAvailable`), if known.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// How many of `wanted` tokens `mode` may run: all of them, except vanilla, whose cache grows
/// with every token and stops where `budget` bytes end. Returns the count and, when vanilla
/// stops early, the sentence that says why.
pub fn run_limit(
    engine: &Engine,
    mode: Mode,
    wanted: usize,
    budget: u64,
) -> (usize, Option<String>) {
    if mode != Mode::Vanilla {
        return (wanted, None);
    }
    let bytes = |t: usize| {
        LambdaParams::new(0, t.max(1), None).map_or(u64::MAX, |p| kv_bytes_at(engine, p, t))
    };
    if bytes(wanted) <= budget {
        return (wanted, None);
    }
    // Bytes grow monotonically with the token count: bisect.
    let (mut lo, mut hi) = (0usize, wanted);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if bytes(mid) <= budget {
            lo = mid
        } else {
            hi = mid
        }
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let why = format!(
        "vanilla stopped at {lo} of {wanted} tokens: its KV cache would need {:.1} GiB for all of them, over the memory budget of {:.1} GiB (--vanilla-memory)",
        gib(bytes(wanted)),
        gib(budget)
    );
    (lo, Some(why))
}

/// Resident set size of this process, from /proc (0 where unavailable).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The greedy next token of a row of logits.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0 as u32
}

/// The cache's parameters as the tables print them.
pub fn describe(params: LambdaParams) -> String {
    format!(
        "n_global {}, n_local {}, distance_limit {}",
        params.n_global, params.n_local, params.distance_limit
    )
}

/// The last row of a logits tensor, on the host.
pub fn last_row(logits: &Tensor) -> Result<Vec<f32>, EvalError> {
    let err = |e: candle_core::Error| ModelError::Forward(crate::error::candle_msg(&e));
    let rows = logits.dim(0).map_err(err)?;
    Ok(logits
        .get(rows - 1)
        .and_then(|r| r.to_vec1::<f32>())
        .map_err(err)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_with_units_sorted_and_deduplicated() {
        let parsed: Vec<usize> = "4k, 512,1k,4096,1m"
            .split(',')
            .map(|l| parse_length(l).unwrap())
            .collect();
        assert_eq!(
            sorted_lengths(&parsed).unwrap(),
            vec![512, 1024, 4096, 1 << 20]
        );
        for bad in ["0", "-3", "4x", "k", "1.5k", "99999999999999999999m", ""] {
            assert!(
                matches!(parse_length(bad), Err(EvalError::BadLength(_))),
                "{bad}"
            );
        }
        assert!(matches!(sorted_lengths(&[]), Err(EvalError::NoLengths)));
        assert_eq!(parse_depth(" 0.25").unwrap(), 0.25);
        assert!(matches!(parse_depth("1.5"), Err(EvalError::BadDepth(d)) if d == "1.5"));
        assert_eq!(short_count(32768), "32k");
        assert_eq!(short_count(1 << 20), "1m");
        assert_eq!(short_count(1000), "1000");
    }

    #[test]
    fn modes_parse_and_map_to_parameters() {
        let list: Vec<Mode> = ["lambda", " vanilla", "λ"]
            .iter()
            .map(|m| Mode::parse(m).unwrap())
            .collect();
        assert_eq!(
            Mode::distinct(&list).unwrap(),
            vec![Mode::Lambda, Mode::Vanilla]
        );
        assert!(matches!(
            Mode::parse("full"),
            Err(EvalError::UnknownMode(m)) if m == "full"
        ));
        assert!(matches!(Mode::distinct(&[]), Err(EvalError::NoModes)));
        let lambda = LambdaParams::new(8, 64, Some(32)).unwrap();
        assert_eq!(Mode::Lambda.params(lambda, 1000).unwrap(), lambda);
        let w = Mode::Window.params(lambda, 1000).unwrap();
        assert_eq!((w.n_global, w.n_local), (0, 64));
        let v = Mode::Vanilla.params(lambda, 1000).unwrap();
        assert_eq!((v.n_global, v.n_local), (0, 1000));
    }

    #[test]
    fn lengths_beyond_the_text_are_cut_to_it() {
        assert_eq!(fit_lengths(&[100, 200], 500), (vec![100, 200], false));
        assert_eq!(
            fit_lengths(&[100, 200, 800], 500),
            (vec![100, 200, 500], true)
        );
        assert_eq!(fit_lengths(&[800, 900], 500), (vec![500], true));
        assert_eq!(fit_lengths(&[100, 500, 900], 500), (vec![100, 500], true));
    }

    #[test]
    fn text_must_be_utf8_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(&path, b"ok \xff\xfe").unwrap();
        assert!(matches!(read_text(&path), Err(EvalError::NotUtf8(_, 3))));
        std::fs::write(&path, " \n\t").unwrap();
        assert!(matches!(read_text(&path), Err(EvalError::EmptyText(_))));
        assert!(matches!(
            read_text(&dir.path().join("missing")),
            Err(EvalError::Read(..))
        ));
        std::fs::write(&path, "In the beginning").unwrap();
        assert_eq!(read_text(&path).unwrap(), "In the beginning");
    }
}
