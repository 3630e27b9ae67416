//! Soft wrap of styled text by display width: CJK and emoji take two cells, combining marks none,
//! and control characters (a model can emit an escape sequence) are shown as `�`, never sent
//! to the terminal.

use ratatui::style::Style;
use ratatui::text::{Line, Span};
use unicode_width::UnicodeWidthChar;

/// One logical line before wrapping.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StyledLine {
    /// Drawn at the start of every row the line wraps to (indent, quote bar, code border).
    pub prefix: Vec<Span<'static>>,
    /// Drawn instead of `prefix` on the first row (a list bullet), same width.
    pub first_prefix: Option<Vec<Span<'static>>>,
    pub spans: Vec<Span<'static>>,
    /// Break anywhere (code) instead of between words.
    pub hard: bool,
}

impl StyledLine {
    pub fn new(spans: Vec<Span<'static>>) -> Self {
        Self {
            spans,
            ..Self::default()
        }
    }
}

/// Display width of a character, with control characters counted as the `�` they become.
pub fn char_width(c: char) -> usize {
    if c.is_control() {
        1
    } else {
        c.width().unwrap_or(0)
    }
}

pub fn str_width(s: &str) -> usize {
    s.chars().map(char_width).sum()
}

/// Wraps `line` into rows of at most `width` cells.
///
/// A pane too narrow for the line's prefix (indent, quote bar, bullet) and one more cell drops
/// the prefix; a character wider than the room left is drawn as `…`. So no row is ever wider
/// than `width`, however narrow the terminal.
pub fn wrap(line: &StyledLine, width: usize) -> Vec<Line<'static>> {
    let width = width.max(1);
    let spans_width =
        |spans: &[Span<'static>]| -> usize { spans.iter().map(|s| str_width(&s.content)).sum() };
    // The first row's prefix (a bullet) can be the wider one, inside a quote in a list.
    let prefix_width =
        spans_width(&line.prefix).max(line.first_prefix.as_deref().map_or(0, spans_width));
    let show_prefix = prefix_width < width;
    let avail = if show_prefix {
        width - prefix_width
    } else {
        width
    };
    let chars: Vec<(char, Style, usize)> = line
        .spans
        .iter()
        .flat_map(|s| {
            let style = s.style;
            s.content.chars().map(move |c| {
                let c = if c.is_control() { '\u{FFFD}' } else { c };
                let c = if char_width(c) > avail { '…' } else { c };
                (c, style, char_width(c))
            })
        })
        .collect();
    let mut rows: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    let mut used = 0;
    // Index just after the last space of the current row: where a word wrap may break.
    let mut last_break = None;
    let mut i = 0;
    while i < chars.len() {
        let w = chars[i].2;
        if used + w > avail && i > start {
            let end = match last_break {
                Some(b) if !line.hard && b > start && b < i + 1 => b,
                _ => i,
            };
            rows.push((start, end));
            start = end;
            used = chars[start..i].iter().map(|c| c.2).sum();
            last_break = None;
            continue;
        }
        used += w;
        if chars[i].0 == ' ' {
            last_break = Some(i + 1);
        }
        i += 1;
    }
    rows.push((start, chars.len()));
    rows.into_iter()
        .enumerate()
        .map(|(row, (a, b))| {
            let mut spans = match (&line.first_prefix, row) {
                _ if !show_prefix => Vec::new(),
                (Some(first), 0) => first.clone(),
                _ => line.prefix.clone(),
            };
            let mut run = String::new();
            let mut style = None;
            for (c, s, _) in &chars[a..b] {
                if style.is_some_and(|st| st != *s) {
                    spans.push(Span::styled(
                        std::mem::take(&mut run),
                        style.unwrap_or_default(),
                    ));
                }
                style = Some(*s);
                run.push(*c);
            }
            if !run.is_empty() {
                spans.push(Span::styled(run, style.unwrap_or_default()));
            }
            Line::from(spans)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(lines: &[Line<'_>]) -> Vec<String> {
        lines
            .iter()
            .map(|l| l.spans.iter().map(|s| s.content.as_ref()).collect())
            .collect()
    }

    #[test]
    fn wraps_between_words() {
        let l = StyledLine::new(vec![Span::raw("the quick brown fox")]);
        assert_eq!(text(&wrap(&l, 10)), ["the quick ", "brown fox"]);
    }

    #[test]
    fn long_words_and_code_break_anywhere() {
        let l = StyledLine::new(vec![Span::raw("abcdefghij klm")]);
        assert_eq!(text(&wrap(&l, 4)), ["abcd", "efgh", "ij ", "klm"]);
        let code = StyledLine {
            hard: true,
            ..StyledLine::new(vec![Span::raw("let x = 1;")])
        };
        assert_eq!(text(&wrap(&code, 4)), ["let ", "x = ", "1;"]);
    }

    #[test]
    fn wide_characters_take_two_cells() {
        let l = StyledLine::new(vec![Span::raw("日本語のテキスト")]);
        let rows = text(&wrap(&l, 5));
        assert_eq!(rows, ["日本", "語の", "テキ", "スト"]);
        let l = StyledLine::new(vec![Span::raw("ok 🎉🎉")]);
        assert_eq!(text(&wrap(&l, 4)), ["ok ", "🎉🎉"]);
    }

    #[test]
    fn prefix_repeats_and_controls_are_neutralized() {
        let l = StyledLine {
            prefix: vec![Span::raw("> ")],
            ..StyledLine::new(vec![Span::raw("aaaa bbbb \u{1b}[2J")])
        };
        assert_eq!(text(&wrap(&l, 8)), ["> aaaa ", "> bbbb ", "> �[2J"]);
        assert_eq!(text(&wrap(&StyledLine::default(), 8)), [""]);
    }
}
