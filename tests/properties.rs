//! Properties over arbitrary input (proptest): the chat screen's text handling never panics,
//! never draws past its width and never sends a control character to the terminal; the editor's
//! cursor stays on a character boundary; the sampler answers with an id in the vocabulary for
//! any logits; and the Λ cache equals the oracle under random pins, chunks and a snapshot
//! restored mid-run.

use std::ops::Range;

use lambdachat::attention::{
    AttentionCache, AttentionInput, HostCache, LambdaParams, LayerGeometry, Rope, RopeStyle,
    reference_lambda_attention_pinned,
};
use lambdachat::sampling::{Sampler, SamplingParams};
use lambdachat::tui::editor::Editor;
use lambdachat::tui::keymap::Action;
use lambdachat::tui::markdown;
use lambdachat::tui::theme::Theme;
use lambdachat::tui::wrap::{str_width, wrap};
use proptest::prelude::*;
use ratatui::style::Style;

/// Text of the kinds a model writes: Markdown punctuation, wide and combining characters,
/// emoji, tabs, newlines, and control characters (escape sequences included).
fn text() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "# ",
        "## ",
        "- ",
        "1. ",
        "> ",
        "```",
        "```rust\n",
        "`",
        "**",
        "*",
        "_",
        "[a](b)",
        "|",
        "\n",
        "\n\n",
        "\t",
        " ",
        "    ",
        "word",
        "averyveryverylongwordwithoutanyspaces",
        "日本語",
        "한국어",
        "é",
        "e\u{301}",
        "🦀",
        "👩‍💻",
        "\u{1b}[31m",
        "\u{1b}]52;c;eA==\u{7}",
        "\u{7}",
        "\u{8}",
        "\r",
        "\u{0}",
        "\u{9b}",
        "\u{200b}",
        "\u{fe0f}",
        "---\n",
        "* * *",
        "<b>",
        "&amp;",
        "$x$",
        "1)",
        "-\t",
        "~~~",
        "  \n",
    ]);
    prop::collection::vec(pieces, 0..60).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Markdown rendered and wrapped at any width from 1 to 300 cells: no panic, every row
    /// within the width, no control character in any row.
    #[test]
    fn markdown_rows_fit_and_carry_no_control_characters(src in text(), width in 1usize..=300) {
        let theme = Theme::default();
        let rendered = markdown::render(&src, 0, &theme, Style::default(), &[]);
        for line in &rendered.lines {
            for row in wrap(line, width) {
                let mut cells = 0;
                for span in &row.spans {
                    prop_assert!(
                        !span.content.chars().any(char::is_control),
                        "control character in {:?}", span.content
                    );
                    cells += str_width(&span.content);
                }
                prop_assert!(cells <= width, "a row of {} cells at width {}: {:?}", cells, width, row);
            }
        }
    }

    /// Any sequence of edits keeps the cursor on a character boundary inside the text.
    #[test]
    fn editing_keeps_the_cursor_on_a_character_boundary(
        ops in prop::collection::vec((0usize..16, text()), 0..80),
    ) {
        let actions = [
            Action::CharLeft, Action::CharRight, Action::WordLeft, Action::WordRight,
            Action::LineStart, Action::LineEnd, Action::LineUp, Action::LineDown,
            Action::DeleteBack, Action::DeleteForward, Action::DeleteWord,
            Action::DeleteToLineStart,
        ];
        let mut editor = Editor::default();
        for (op, s) in ops {
            match op {
                12 => editor.insert_str(&s),
                13 => {
                    if let Some(c) = s.chars().next() {
                        editor.insert_char(c);
                    }
                }
                14 => {
                    editor.take();
                    editor.history_prev();
                }
                15 => editor.history_next(),
                n => {
                    editor.edit(actions[n]);
                }
            }
            let (text, cursor) = (editor.text(), editor.cursor());
            prop_assert!(cursor <= text.len() && text.is_char_boundary(cursor));
            let (rows, _) = editor.layout(1 + s.len() % 40, 1 + op % 5);
            let escape = rows.iter().any(|r| r.contains('\x1b'));
            prop_assert!(!escape, "an escape character in the editor's rows");
        }
    }

    /// Any logits — NaN and ±∞ included — give an id below the vocabulary size; only logits
    /// that are all NaN give an error.
    #[test]
    fn the_sampler_answers_inside_the_vocabulary(
        logits in prop::collection::vec(
            prop_oneof![
                -100.0f32..100.0,
                Just(f32::NAN),
                Just(f32::INFINITY),
                Just(f32::NEG_INFINITY),
                Just(f32::MAX),
                Just(-f32::MAX),
            ],
            1..200,
        ),
        temperature in prop_oneof![Just(0.0f32), 0.01f32..3.0],
        top_k in 0usize..50,
        top_p in 0.01f32..=1.0,
        min_p in 0.0f32..0.5,
        history in prop::collection::vec(0u32..300, 0..20),
        seed in any::<u64>(),
    ) {
        let params = SamplingParams {
            temperature, top_k, top_p, min_p, repeat_penalty: 1.3, repeat_last_n: 16, seed,
        };
        let mut sampler = Sampler::new(params).unwrap();
        let mut l = logits.clone();
        match sampler.sample(&mut l, &history) {
            Ok(id) => prop_assert!((id as usize) < logits.len()),
            Err(_) => prop_assert!(logits.iter().all(|x| x.is_nan()), "{:?}", logits),
        }
    }
}

/// Random pins, random chunks, and the cache saved and restored halfway: every output row
/// equals the dense oracle's with the same pins.
fn cache_case() -> impl Strategy<Value = (usize, usize, Vec<Range<u64>>, Vec<usize>, usize)> {
    (1usize..4, 4usize..12).prop_flat_map(|(g, l)| {
        let pins = prop::collection::vec((0u64..60, 1u64..5), 0..4).prop_map(|v| {
            let mut v: Vec<Range<u64>> = v.into_iter().map(|(s, n)| s..s + n).collect();
            v.sort_by_key(|r| r.start);
            let mut out: Vec<Range<u64>> = Vec::new();
            for r in v {
                match out.last_mut() {
                    Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                    _ => out.push(r),
                }
            }
            out
        });
        let chunks = prop::collection::vec(1usize..9, 4..16);
        (Just(g), Just(l), pins, chunks, 0usize..16)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(120))]

    #[test]
    fn the_lambda_cache_equals_the_oracle(
        (g, l, pins, chunks, restore_at) in cache_case(),
        seed in any::<u64>(),
    ) {
        let (hd, heads, kv) = (8, 4, 2);
        let t: usize = chunks.iter().sum();
        let params = LambdaParams::new(g, l, None).unwrap();
        let mut state = seed | 1;
        let mut random = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                })
                .collect()
        };
        let (q, k, v) = (random(t * heads * hd, 2.0), random(t * kv * hd, 4.0), random(t * kv * hd, 2.0));
        let rope = Rope::new(hd, 10_000.0, RopeStyle::Neox);
        let scale = 1.0 / (hd as f32).sqrt();
        let expected =
            reference_lambda_attention_pinned(&q, &k, &v, t, heads, kv, hd, params, &pins, &rope, scale);
        let layers = vec![LayerGeometry::full(params, kv, hd)];
        let mut cache = HostCache::new(params, layers.clone());
        for p in &pins {
            cache.pin(p.clone());
        }
        let mut got = Vec::new();
        let mut pos = 0;
        for (n, &chunk) in chunks.iter().enumerate() {
            if n == restore_at % chunks.len() {
                let bytes = cache.to_snapshot().unwrap();
                cache = HostCache::from_snapshot(&bytes, params, layers.clone()).unwrap();
            }
            let rows = |x: &[f32], h: usize| x[pos * h * hd..(pos + chunk) * h * hd].to_vec();
            let (qs, ks, vs) = (rows(&q, heads), rows(&k, kv), rows(&v, kv));
            let input = AttentionInput {
                q: &qs, k: &ks, v: &vs, n_tokens: chunk, n_heads: heads, rope: &rope, scale,
            };
            got.extend(cache.attend(0, &input).unwrap());
            cache.advance(chunk);
            pos += chunk;
        }
        prop_assert_eq!(got.len(), expected.len());
        for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
            prop_assert!(((*a as f64) - b).abs() < 1e-4, "value {} (token {}): {} vs {}", i, i / (heads * hd), a, b);
        }
    }
}
