//! `lambdachat eval` end to end on short texts (the long runs of docs/RESULTS.md are not CI's
//! job): the modes' relations that must hold exactly, vanilla against llama.cpp, the passkey
//! generator, and bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::cli::{assert_clean_error, run};
use lambdachat::engine::Engine;
use lambdachat::eval::passkey::make_prompt;
use lambdachat::fetch::{GEMMA3_270M, ensure};

fn gemma() -> String {
    ensure(&GEMMA3_270M).unwrap().to_string_lossy().into_owned()
}

fn genesis() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/genesis-1-3.txt").to_string()
}

/// Runs `lambdachat eval …` and returns stdout, failing with stderr on a non-zero exit.
fn eval(args: &[&str]) -> String {
    let mut full = vec!["eval"];
    full.extend_from_slice(args);
    full.push("--quiet");
    let out = run(&full);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// A CSV file as rows of column → value.
fn read_csv(path: &Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split(','))
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn rows<'a>(csv: &'a [HashMap<String, String>], mode: &str) -> Vec<&'a HashMap<String, String>> {
    csv.iter().filter(|r| r["mode"] == mode).collect()
}

fn num(row: &HashMap<String, String>, col: &str) -> f64 {
    row[col].parse().unwrap()
}

fn out_dir(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// `llama-perplexity -f genesis-1-3.txt -c 1024 -b 1024 --chunks 1 -t 2` (llama.cpp from
/// llama-cpp-python 0.3.36): one chunk of 1,024 tokens, scoring the predictions of tokens
/// 513..1023 — exactly the bucket `[513, 1024)` of a vanilla `eval ppl` over the same text.
const LLAMA_CPP_GEMMA3: f64 = 1.8674;
const LLAMA_CPP_QWEN2: f64 = 9.1007;

#[test]
fn vanilla_ppl_agrees_with_llama_perplexity_within_1_percent() {
    let dir = tempfile::tempdir().unwrap();
    let qwen = common::default_model_path();
    for (model, expected) in [
        (gemma(), LLAMA_CPP_GEMMA3),
        (qwen.to_string_lossy().into_owned(), LLAMA_CPP_QWEN2),
    ] {
        let out = out_dir(&dir, "ppl");
        let o = out.to_str().unwrap();
        eval(&[
            "ppl",
            "-m",
            &model,
            "--text",
            &genesis(),
            "--lengths",
            "513,1024",
            "--modes",
            "vanilla",
            "--out",
            o,
        ]);
        let csv = read_csv(&out.join("ppl.csv"));
        let bucket = rows(&csv, "vanilla")
            .into_iter()
            .find(|r| r["start"] == "513")
            .unwrap();
        assert_eq!(bucket["tokens"], "511");
        let ppl = num(bucket, "ppl");
        let rel = (ppl - expected).abs() / expected;
        assert!(rel < 0.01, "{model}: ppl {ppl} vs llama.cpp {expected}");
    }
}

#[test]
fn ppl_modes_relate_as_the_rule_says() {
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir, "small");
    let o = out.to_str().unwrap();
    let common = [
        "ppl",
        "-m",
        &gemma(),
        "--text",
        &genesis(),
        "--lengths",
        "64,256,512",
    ];
    let mut args = common.to_vec();
    args.extend(["--n-global", "4", "--n-local", "64", "--out", o]);
    let table = eval(&args);
    assert!(
        table.contains("64–256") && table.contains("wrote"),
        "{table}"
    );
    let csv = read_csv(&out.join("ppl.csv"));
    let (v, l, w) = (
        rows(&csv, "vanilla"),
        rows(&csv, "lambda"),
        rows(&csv, "window"),
    );
    assert_eq!((v.len(), l.len(), w.len()), (3, 3, 3));
    // Positions below the window see everything in every mode: the same numbers.
    assert_eq!(v[0]["mean_nll"], l[0]["mean_nll"]);
    assert_eq!(v[0]["mean_nll"], w[0]["mean_nll"]);
    // Past the window the modes attend differently, and the sinks change the result.
    assert_ne!(v[2]["mean_nll"], l[2]["mean_nll"]);
    assert_ne!(l[2]["mean_nll"], w[2]["mean_nll"]);
    // Λ's cache stops growing; vanilla's keeps growing.
    assert_eq!(l[1]["kv_bytes"], l[2]["kv_bytes"]);
    assert!(num(v[2], "kv_bytes") > num(v[1], "kv_bytes"));
    let svg = std::fs::read_to_string(out.join("ppl.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("window"));

    // A window as long as the text: Λ is vanilla, number for number.
    let out = out_dir(&dir, "wide");
    let o = out.to_str().unwrap();
    let mut args = common.to_vec();
    args.extend([
        "--n-local",
        "512",
        "--modes",
        "vanilla,lambda",
        "--out",
        o,
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&eval(&args)).unwrap();
    let results = json["results"].as_array().unwrap();
    let (v, l) = (
        results[0]["buckets"].as_array().unwrap(),
        results[1]["buckets"].as_array().unwrap(),
    );
    assert_eq!(v.len(), 3);
    for (a, b) in v.iter().zip(l) {
        for key in ["start", "end", "tokens", "mean_nll", "ppl"] {
            assert_eq!(a[key], b[key], "{key}");
        }
    }
    assert_eq!(results[0]["ppl"], results[1]["ppl"]);
}

#[test]
fn lengths_past_the_text_use_what_there_is() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(
        &short,
        "In the beginning God created the heaven and the earth. ".repeat(8),
    )
    .unwrap();
    let out = out_dir(&dir, "o");
    let table = eval(&[
        "ppl",
        "-m",
        &gemma(),
        "--text",
        short.to_str().unwrap(),
        "--lengths",
        "32,4k,1m",
        "--modes",
        "lambda",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(table.contains("lengths past it are cut"), "{table}");
    let csv = read_csv(&out.join("ppl.csv"));
    let last = csv.last().unwrap();
    let n: usize = last["end"].parse().unwrap();
    assert!(
        n > 32 && n < 200,
        "the last bucket ends at the text's length, {n}"
    );
}

#[test]
fn vanilla_stops_where_its_memory_budget_ends_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir, "v");
    let table = eval(&[
        "ppl",
        "-m",
        &gemma(),
        "--text",
        &genesis(),
        "--lengths",
        "64,256",
        "--modes",
        "vanilla,lambda",
        "--n-local",
        "64",
        "--vanilla-memory",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(table.contains("note: vanilla stopped at"), "{table}");
    let csv = read_csv(&out.join("ppl.csv"));
    let (v, l) = (rows(&csv, "vanilla"), rows(&csv, "lambda"));
    assert_eq!(v[0]["tokens"], "63");
    let partial: usize = v[1]["tokens"].parse().unwrap();
    assert!(
        partial > 0 && partial < 192,
        "vanilla's second bucket is cut short: {partial}"
    );
    assert!(num(v[1], "kv_bytes") <= 4.0 * 1048576.0);
    // Λ is bounded by its window and runs the whole text.
    assert_eq!(l[1]["tokens"], "192");
}

#[test]
fn passkey_prompts_hide_the_key_where_asked() {
    let engine = Engine::load(Path::new(&gemma())).unwrap();
    let tok = &engine.tokenizer;
    let mut last_position = 0;
    for depth in [0.0, 0.5, 1.0] {
        let p = make_prompt(tok, 1000, depth, 12345).unwrap();
        assert!(
            p.tokens.len() <= 1000 && p.tokens.len() > 900,
            "{}",
            p.tokens.len()
        );
        assert!(p.key_position >= last_position);
        last_position = p.key_position;
        let text = tok.decode(&p.tokens[p.key_position..]).unwrap();
        assert!(text.starts_with("The pass key is 12345."), "{text}");
        assert!(text.ends_with("What is the pass key? The pass key is"));
    }
    assert!(last_position > 800, "depth 1 puts the key near the end");
    assert!(make_prompt(tok, 20, 0.5, 12345).is_err());
}

#[test]
fn passkey_is_found_inside_the_window_and_lost_outside() {
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir, "pk");
    eval(&[
        "passkey",
        "-m",
        &gemma(),
        "--lengths",
        "512",
        "--depths",
        "0.05,0.9",
        "--trials",
        "2",
        "--n-global",
        "8",
        "--n-local",
        "256",
        "--out",
        out.to_str().unwrap(),
    ]);
    let csv = read_csv(&out.join("passkey.csv"));
    assert_eq!(csv.len(), 6);
    for r in &csv {
        let near = num(r, "key_distance") < 256.0;
        let attended = r["key_attended"] == "true";
        assert_eq!(attended, near || r["mode"] == "vanilla", "{r:?}");
        if attended {
            assert_eq!(r["correct"], "2", "the model finds an attended key: {r:?}");
        } else {
            assert_eq!(r["correct"], "0", "an evicted key cannot be found: {r:?}");
        }
    }
}

/// The key evicted from the Λ is lost to Λ alone and found again by recall (docs/ALGORITHM.md
/// §10), which stores what left the window and attends to the best-matching blocks. (Measured
/// beside it: with `--recall-blocks 2`, or the key 683 tokens back, Gemma's three recalling
/// layers do not find it at this tiny window; docs/RESULTS.md §6.)
#[test]
fn an_evicted_passkey_is_found_again_with_recall() {
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir, "pk-recall");
    eval(&[
        "passkey",
        "-m",
        &gemma(),
        "--lengths",
        "1k",
        "--depths",
        "0.1",
        "--trials",
        "2",
        "--n-global",
        "8",
        "--n-local",
        "256",
        "--modes",
        "lambda,recall",
        "--out",
        out.to_str().unwrap(),
    ]);
    let csv = read_csv(&out.join("passkey.csv"));
    assert_eq!(csv.len(), 2);
    for r in &csv {
        assert_eq!(r["key_attended"], "false", "the key is evicted: {r:?}");
        let expected = if r["mode"] == "recall" { "2" } else { "0" };
        assert_eq!(r["correct"], expected, "{r:?}");
    }
}

/// `eval facts` runs a chat through the session: every fact asked once per mode, the first
/// stated farthest from its question.
#[test]
fn facts_are_stated_in_a_chat_and_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir, "facts");
    let stdout = eval(&[
        "facts",
        "-m",
        &gemma(),
        "--lengths",
        "1k",
        "--facts",
        "3",
        "--n-local",
        "256",
        "--modes",
        "lambda,recall",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("facts in a chat"), "{stdout}");
    let csv = read_csv(&out.join("facts.csv"));
    assert_eq!(csv.len(), 6);
    for mode in ["lambda", "recall"] {
        let facts = rows(&csv, mode);
        let distances: Vec<f64> = facts.iter().map(|r| num(r, "distance")).collect();
        // Asked in the order stated: the first fact is the farthest from its question (facts
        // stated back to back may be closer to theirs than the next one, asked later).
        assert!(distances.iter().all(|&d| d > 0.0), "{distances:?}");
        assert!(distances[0] > distances[2], "{distances:?}");
        // The codes are four digits, the same in every mode.
        for (r, l) in facts.iter().zip(rows(&csv, "lambda")) {
            assert_eq!(r["code"].len(), 4);
            assert_eq!(r["code"], l["code"]);
        }
    }
}

#[test]
fn entropy_grows_under_vanilla_and_stops_under_lambda() {
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir, "h");
    let table = eval(&[
        "entropy",
        "-m",
        &gemma(),
        "--text",
        &genesis(),
        "--lengths",
        "64,512,1k",
        "--n-local",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(table.contains("full-attention layers"), "{table}");
    let csv = read_csv(&out.join("entropy.csv"));
    // 18 layers × 3 buckets × 2 modes.
    assert_eq!(csv.len(), 18 * 3 * 2);
    let mean = |mode: &str, start: &str| {
        let r: Vec<f64> = csv
            .iter()
            .filter(|r| r["mode"] == mode && r["start"] == start && r["layer"] == "5")
            .map(|r| num(r, "entropy"))
            .collect();
        r[0]
    };
    // Layer 5 is a full-attention layer of Gemma 3 (every sixth).
    assert_eq!(mean("vanilla", "0"), mean("lambda", "0"));
    assert!(mean("vanilla", "512") > mean("lambda", "512") + 0.2);
}

#[test]
fn cost_measures_both_modes_at_each_length() {
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir, "c");
    let table = eval(&[
        "cost",
        "-m",
        &gemma(),
        "--lengths",
        "128,1k",
        "--decode-tokens",
        "2",
        "--n-local",
        "128",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        table.contains("speed-up") && table.contains("memory ratio"),
        "{table}"
    );
    let csv = read_csv(&out.join("cost.csv"));
    assert_eq!(csv.len(), 4);
    let at = |mode: &str, len: &str| {
        csv.iter()
            .find(|r| r["mode"] == mode && r["length"] == len)
            .unwrap()
    };
    assert!(num(at("vanilla", "1024"), "kv_bytes") > 2.0 * num(at("lambda", "1024"), "kv_bytes"));
    assert_eq!(
        at("lambda", "128")["kv_bytes"],
        at("lambda", "1024")["kv_bytes"]
    );
    assert!(num(at("lambda", "1024"), "ms_per_token") > 0.0);
    for f in ["cost-time.svg", "cost-memory.svg"] {
        assert!(out.join(f).exists());
    }
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir, "never");
    let o = out.to_str().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, b"caf\xe9 latin-1").unwrap();
    let g = gemma();
    let ppl = |text: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "ppl",
            "-m",
            &g,
            "--text",
            text.to_str().unwrap(),
            "--out",
            o,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    assert_clean_error(&ppl(&empty, &[]), "is empty");
    assert_clean_error(
        &ppl(&binary, &[]),
        "is not UTF-8 text (invalid byte at offset 3)",
    );
    assert_clean_error(
        &ppl(Path::new(&genesis()), &["--modes", "lambda,full"]),
        "unknown mode 'full'",
    );
    assert_clean_error(
        &ppl(Path::new(&genesis()), &["--lengths", "4q"]),
        "bad length '4q'",
    );
    assert_clean_error(&ppl(&dir.path().join("missing.txt"), &[]), "cannot read");
    assert!(
        !out.exists(),
        "nothing is created for a run that never started"
    );
    // An output path that cannot be written: refused before the model is even loaded.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let out = run(&[
        "eval",
        "ppl",
        "-m",
        &g,
        "--text",
        &genesis(),
        "--out",
        blocker.join("sub").to_str().unwrap(),
    ]);
    assert_clean_error(&out, "cannot write");
    let out = run(&["eval", "passkey", "-m", &g, "--depths", "1.5", "--out", o]);
    assert_clean_error(&out, "bad depth '1.5'");
}
