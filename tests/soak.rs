//! A million-token chat on a tiny synthetic model, through the real binary's `bench soak`
//! (worker, store and chat screen), in 5,000 turns: once the window is full, memory, time to
//! first token and the database's growth per token stay flat, each turn writes no more than its
//! new tokens' keys and values plus 64 KiB, and turn 5,000 answers as fast as turn 10 of a
//! young conversation, measured turn for turn in alternation.

mod common;

use common::cli::lambdachat;
use common::tiny::write_gguf;
use serde_json::Value;

const TOKENS: u64 = 1_000_000;
const TURN_TOKENS: u64 = 200;
const EVERY: u64 = 50_000;

struct Checkpoint {
    tokens: f64,
    turns: f64,
    rss: f64,
    ttft_ms: f64,
    db: f64,
    kv: f64,
    kv_token: f64,
    written: f64,
}

/// The last line: the long conversation's mean time to first token over a young one's.
struct Alternation {
    ratio: f64,
    long_turn: f64,
    young_turn: f64,
}

fn soak(dir: &std::path::Path) -> (Vec<Checkpoint>, Alternation) {
    let model = dir.join("tiny-qwen2.gguf");
    write_gguf(&model, "qwen2");
    let out = lambdachat()
        .args(["bench", "soak", "--json", "--model"])
        .arg(&model)
        .arg("--dir")
        .arg(dir.join("store"))
        .args([
            "--tokens",
            &TOKENS.to_string(),
            "--turn-tokens",
            &TURN_TOKENS.to_string(),
            "--every",
            &EVERY.to_string(),
            "--reply-tokens",
            "8",
            "--n-global",
            "8",
            "--alternate",
            "20",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "soak failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let number = |v: &Value, k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("no number {k} in {v}"))
    };
    let (last, checkpoints) = lines.split_last().expect("no output");
    let alternation = Alternation {
        ratio: number(last, "ratio"),
        long_turn: number(last, "long_turn"),
        young_turn: number(last, "young_turn"),
    };
    let checkpoints = checkpoints
        .iter()
        .map(|v| {
            let f = |k: &str| number(v, k);
            Checkpoint {
                tokens: f("tokens"),
                turns: f("turns"),
                rss: f("rss_bytes"),
                ttft_ms: f("ttft_ms"),
                db: f("db_bytes"),
                kv: f("kv_bytes"),
                kv_token: f("kv_token_bytes"),
                written: f("written_bytes"),
            }
        })
        .collect();
    (checkpoints, alternation)
}

#[test]
fn a_million_token_chat_stays_flat() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("soak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (points, alternation) = soak(&dir);
    for p in &points {
        eprintln!(
            "{:>8} tokens {:>4} turns: RSS {:.1} MiB, TTFT {:.2} ms, DB {:.2} MiB, KV {:.2} MiB, \
             written {:.1} MiB",
            p.tokens,
            p.turns,
            p.rss / 1048576.0,
            p.ttft_ms,
            p.db / 1048576.0,
            p.kv / 1048576.0,
            p.written / 1048576.0
        );
    }
    assert!(points.len() >= 15, "{} checkpoints", points.len());
    let last = points.last().unwrap();
    assert!(last.tokens >= TOKENS as f64);
    // The window (256 tokens) filled in the first turn; the first checkpoints still see the
    // allocator and the page cache settle, so the slopes start at 200,000 tokens.
    let base = points.iter().find(|p| p.tokens >= 200_000.0).unwrap();
    let span = last.tokens - base.tokens;

    let rss_per_100k = (last.rss - base.rss) / span * 100_000.0;
    assert!(
        rss_per_100k < 1048576.0,
        "RSS grew {:.0} KiB per 100,000 tokens",
        rss_per_100k / 1024.0
    );

    // Per-turn time: the late turns' mean against the early ones' (generous: a shared CI
    // machine; a pass over the history would grow it fivefold over this span).
    let third = points.len() / 3;
    let mean = |ps: &[Checkpoint]| ps.iter().map(|p| p.ttft_ms).sum::<f64>() / ps.len() as f64;
    let early = mean(&points[1..1 + third]);
    let late = mean(&points[points.len() - third..]);
    assert!(
        late < early * 1.5 + 2.0,
        "time to first token grew from {early:.2} ms to {late:.2} ms"
    );

    // The same, turn for turn: the long conversation against a young one, alternating.
    eprintln!(
        "turn {} against turn {}: {:.3}× the time to first token",
        alternation.long_turn, alternation.young_turn, alternation.ratio
    );
    assert!(alternation.long_turn >= 4_500.0 && alternation.young_turn <= 20.0);
    assert!(
        alternation.ratio < 1.35,
        "turn {} took {:.2}× as long to answer as turn {}",
        alternation.long_turn,
        alternation.ratio,
        alternation.young_turn
    );

    // Bytes written per turn: the new tokens' keys and values and 64 KiB, no more.
    let turns = last.turns - base.turns;
    let written_per_turn = (last.written - base.written) / turns;
    let tokens_per_turn = span / turns;
    let bound = tokens_per_turn * last.kv_token + 65536.0;
    assert!(last.kv_token > 0.0);
    assert!(
        written_per_turn <= bound,
        "{written_per_turn:.0} bytes written per turn of {tokens_per_turn:.0} tokens \
         (bound {bound:.0})"
    );
    // Where the platform counts written bytes, the saves did write (else the bound is vacuous):
    // at least half the new tokens' slots, or of the whole file for a turn longer than it.
    if std::fs::read_to_string("/proc/self/io").is_ok() {
        let slots = (tokens_per_turn * last.kv_token).min(last.kv);
        assert!(
            written_per_turn > slots * 0.5,
            "only {written_per_turn:.0} bytes written per turn: the saves did not reach the disk"
        );
    }

    // The database grows with the history it keeps (text, token ids), nothing per turn more;
    // the KV file does not grow at all.
    let db_per_token = (last.db - base.db) / span;
    assert!(
        db_per_token < 64.0,
        "the database grew {db_per_token:.1} bytes per token"
    );
    assert_eq!(last.kv, base.kv, "the KV file grew");
}
