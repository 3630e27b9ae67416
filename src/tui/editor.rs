//! The text editor of the message box (and of a title being renamed): multi-line text with a
//! cursor, the editing actions of the keymap, and the history of sent messages.
//!
//! Layout for drawing looks only at the lines around the cursor (and at most
//! [`LONG_LINE_WINDOW`] bytes of a very long line), so a 1 MB paste costs one insertion, not a
//! re-layout of the whole text at every frame.

use std::collections::VecDeque;

use unicode_width::UnicodeWidthChar;

use super::keymap::Action;

/// Bytes of a long line laid out on each side of the cursor.
const LONG_LINE_WINDOW: usize = 16 * 1024;
/// Bytes of sent messages kept for recall: the oldest go first (the last one always stays), so
/// an endless chat's input history does not grow with it.
const HISTORY_BYTES: usize = 256 << 10;

#[derive(Debug, Clone, Default)]
pub struct Editor {
    text: String,
    /// Byte index into `text`, always on a char boundary.
    cursor: usize,
    history: VecDeque<String>,
    /// Bytes of text in `history`.
    history_bytes: usize,
    /// Index into `history` while browsing it.
    browsing: Option<usize>,
    /// What was being typed before browsing started.
    draft: String,
}

fn width(c: char) -> usize {
    if c == '\t' {
        4
    } else if c.is_control() {
        1
    } else {
        c.width().unwrap_or(0)
    }
}

impl Editor {
    /// Carries out an editing action (`Context::Editing` of the keymap); `false` for any other.
    pub fn edit(&mut self, action: Action) -> bool {
        match action {
            Action::CharLeft => self.left(),
            Action::CharRight => self.right(),
            Action::WordLeft => self.word_left(),
            Action::WordRight => self.word_right(),
            Action::LineStart => self.home(),
            Action::LineEnd => self.end(),
            Action::LineUp => {
                self.up();
            }
            Action::LineDown => {
                self.down();
            }
            Action::DeleteBack => self.backspace(),
            Action::DeleteForward => self.delete(),
            Action::DeleteWord => self.delete_word(),
            Action::DeleteToLineStart => self.delete_to_line_start(),
            _ => return false,
        }
        true
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn cursor(&self) -> usize {
        self.cursor
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    pub fn set(&mut self, text: &str) {
        self.text = text.to_string();
        self.cursor = self.text.len();
    }

    pub fn insert_str(&mut self, s: &str) {
        // Terminals send CR for Enter in pasted text; keep one newline convention.
        let s = s.replace("\r\n", "\n").replace('\r', "\n");
        self.text.insert_str(self.cursor, &s);
        self.cursor += s.len();
        self.browsing = None;
    }

    pub fn insert_char(&mut self, c: char) {
        self.text.insert(self.cursor, c);
        self.cursor += c.len_utf8();
        self.browsing = None;
    }

    fn prev_boundary(&self, from: usize) -> usize {
        self.text[..from]
            .char_indices()
            .next_back()
            .map_or(0, |(i, _)| i)
    }

    fn next_boundary(&self, from: usize) -> usize {
        self.text[from..]
            .chars()
            .next()
            .map_or(from, |c| from + c.len_utf8())
    }

    pub fn backspace(&mut self) {
        if self.cursor > 0 {
            let p = self.prev_boundary(self.cursor);
            self.text.replace_range(p..self.cursor, "");
            self.cursor = p;
        }
    }

    pub fn delete(&mut self) {
        let n = self.next_boundary(self.cursor);
        self.text.replace_range(self.cursor..n, "");
    }

    pub fn left(&mut self) {
        self.cursor = self.prev_boundary(self.cursor);
    }

    pub fn right(&mut self) {
        self.cursor = self.next_boundary(self.cursor);
    }

    /// Moves to the start of the previous word.
    pub fn word_left(&mut self) {
        let before = &self.text[..self.cursor];
        let trimmed = before.trim_end();
        self.cursor = trimmed
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map_or(0, |(i, c)| i + c.len_utf8());
    }

    /// Moves past the end of the next word.
    pub fn word_right(&mut self) {
        let after = &self.text[self.cursor..];
        let skip = after.len() - after.trim_start().len();
        let rest = &after[skip..];
        let word = rest.find(char::is_whitespace).unwrap_or(rest.len());
        self.cursor += skip + word;
    }

    /// Deletes the word before the cursor.
    pub fn delete_word(&mut self) {
        let end = self.cursor;
        self.word_left();
        self.text.replace_range(self.cursor..end, "");
    }

    fn line_start(&self, at: usize) -> usize {
        self.text[..at].rfind('\n').map_or(0, |i| i + 1)
    }

    fn line_end(&self, at: usize) -> usize {
        self.text[at..]
            .find('\n')
            .map_or(self.text.len(), |i| at + i)
    }

    pub fn home(&mut self) {
        self.cursor = self.line_start(self.cursor);
    }

    pub fn end(&mut self) {
        self.cursor = self.line_end(self.cursor);
    }

    /// Deletes from the cursor to the start of its line.
    pub fn delete_to_line_start(&mut self) {
        let start = self.line_start(self.cursor);
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    /// Moves up one line, keeping the column; `false` on the first line.
    pub fn up(&mut self) -> bool {
        let start = self.line_start(self.cursor);
        if start == 0 {
            return false;
        }
        let column = self.text[start..self.cursor].chars().count();
        let prev_start = self.line_start(start - 1);
        self.cursor = self.column_at(prev_start, start - 1, column);
        true
    }

    /// Moves down one line, keeping the column; `false` on the last line.
    pub fn down(&mut self) -> bool {
        let end = self.line_end(self.cursor);
        if end == self.text.len() {
            return false;
        }
        let column = self.text[self.line_start(self.cursor)..self.cursor]
            .chars()
            .count();
        let next_end = self.line_end(end + 1);
        self.cursor = self.column_at(end + 1, next_end, column);
        true
    }

    fn column_at(&self, start: usize, end: usize, column: usize) -> usize {
        self.text[start..end]
            .char_indices()
            .nth(column)
            .map_or(end, |(i, _)| start + i)
    }

    /// Takes the text to send and remembers it in the history.
    pub fn take(&mut self) -> String {
        let text = std::mem::take(&mut self.text);
        self.cursor = 0;
        self.browsing = None;
        if !text.trim().is_empty() && self.history.back() != Some(&text) {
            self.history_bytes += text.len();
            self.history.push_back(text.clone());
            while self.history_bytes > HISTORY_BYTES && self.history.len() > 1 {
                let oldest = self.history.pop_front().unwrap_or_default();
                self.history_bytes -= oldest.len();
            }
        }
        text
    }

    /// Whether the box shows a sent message from the history (not the draft).
    pub fn is_browsing(&self) -> bool {
        self.browsing.is_some()
    }

    /// Makes the box come back empty from the history (the draft was not the user's own).
    pub fn forget_draft(&mut self) {
        self.draft.clear();
    }

    /// Shows the previous sent message (the draft is kept for coming back).
    pub fn history_prev(&mut self) {
        let i = match self.browsing {
            None if self.history.is_empty() => return,
            None => {
                self.draft = self.text.clone();
                self.history.len() - 1
            }
            Some(0) => 0,
            Some(i) => i - 1,
        };
        self.browsing = Some(i);
        self.text = self.history[i].clone();
        self.cursor = self.text.len();
    }

    pub fn history_next(&mut self) {
        let Some(i) = self.browsing else { return };
        if i + 1 < self.history.len() {
            self.browsing = Some(i + 1);
            self.text = self.history[i + 1].clone();
        } else {
            self.browsing = None;
            self.text = std::mem::take(&mut self.draft);
        }
        self.cursor = self.text.len();
    }

    /// Rows to draw in a box `cols` wide and `rows` high, and the cursor's `(x, y)` in it.
    /// Lines wrap at the box width; only lines near the cursor are laid out.
    pub fn layout(&self, cols: usize, rows: usize) -> (Vec<String>, (u16, u16)) {
        let cols = cols.max(1);
        let rows = rows.max(1);
        let wrap_line = |start: usize, end: usize, cursor: Option<usize>| {
            // A very long line: lay out only a window around the cursor (or its tail).
            let focus = cursor.unwrap_or(end);
            let mut from = focus.saturating_sub(LONG_LINE_WINDOW).max(start);
            while !self.text.is_char_boundary(from) {
                from += 1;
            }
            let mut to = (focus + LONG_LINE_WINDOW).min(end);
            while !self.text.is_char_boundary(to) {
                to -= 1;
            }
            let mut out: Vec<String> = vec![String::new()];
            let mut used = 0;
            let mut at = None;
            for (i, c) in self.text[from..to].char_indices() {
                let w = width(c);
                if used + w > cols {
                    out.push(String::new());
                    used = 0;
                }
                if cursor == Some(from + i) {
                    at = Some((used, out.len() - 1));
                }
                let shown = match c {
                    '\t' => "    ".to_string(),
                    c if c.is_control() => "\u{FFFD}".to_string(),
                    c => c.to_string(),
                };
                if let Some(last) = out.last_mut() {
                    last.push_str(&shown);
                }
                used += w;
            }
            if cursor.is_some() && at.is_none() {
                if used >= cols {
                    out.push(String::new());
                    used = 0;
                }
                at = Some((used, out.len() - 1));
            }
            (out, at)
        };
        let start = self.line_start(self.cursor);
        let end = self.line_end(self.cursor);
        let (mut lines, at) = wrap_line(start, end, Some(self.cursor));
        let (cx, mut cy) = at.unwrap_or((0, 0));
        // Lines above the cursor's, until the box is full.
        let mut above_end = start;
        while above_end > 0 && lines.len() < rows * 2 {
            let s = self.line_start(above_end - 1);
            let (mut wrapped, _) = wrap_line(s, above_end - 1, None);
            cy += wrapped.len();
            wrapped.append(&mut lines);
            lines = wrapped;
            above_end = s;
        }
        // Lines below it.
        let mut below_start = end;
        while below_start < self.text.len() && lines.len() < cy + rows {
            let e = self.line_end(below_start + 1);
            let (mut wrapped, _) = wrap_line(below_start + 1, e, None);
            lines.append(&mut wrapped);
            below_start = e;
        }
        // Scroll so that the cursor row is visible, as low as possible.
        let first = (cy + 1).saturating_sub(rows);
        let visible: Vec<String> = lines.into_iter().skip(first).take(rows).collect();
        (visible, (cx as u16, (cy - first) as u16))
    }

    /// Rows the text needs at `cols` wide, up to `max` (for sizing the input box).
    pub fn height(&self, cols: usize, max: usize) -> usize {
        let cols = cols.max(1);
        let mut rows = 0;
        for line in self.text.split('\n') {
            let w: usize = line.chars().take(cols * max).map(width).sum();
            rows += w / cols + 1;
            if rows >= max {
                return max;
            }
        }
        rows.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editing_and_moving() {
        let mut e = Editor::default();
        e.insert_str("hello world\r\nsecond");
        assert_eq!(e.text(), "hello world\nsecond");
        assert!(e.up());
        assert_eq!(e.cursor(), 6);
        assert!(!e.up());
        e.word_right();
        assert_eq!(e.cursor(), 11);
        e.delete_word();
        assert_eq!(e.text(), "hello \nsecond");
        assert!(e.down());
        e.end();
        e.backspace();
        e.insert_char('é');
        assert_eq!(e.text(), "hello \nseconé");
        e.left();
        e.delete();
        assert_eq!(e.text(), "hello \nsecon");
        e.home();
        e.delete_to_line_start();
        assert_eq!(e.cursor(), 7);
    }

    #[test]
    fn history_keeps_a_bounded_tail() {
        let mut e = Editor::default();
        let long = "x".repeat(HISTORY_BYTES / 4);
        for i in 0..10 {
            e.insert_str(&format!("{i}{long}"));
            e.take();
        }
        assert!(e.history_bytes <= HISTORY_BYTES);
        assert_eq!(e.history.len(), 3);
        e.history_prev();
        assert!(e.text().starts_with('9'));
        let mut e = Editor::default();
        e.insert_str(&"y".repeat(2 * HISTORY_BYTES));
        e.take();
        e.history_prev();
        assert_eq!(
            e.text().len(),
            2 * HISTORY_BYTES,
            "the last one always stays"
        );
    }

    #[test]
    fn history_keeps_the_draft() {
        let mut e = Editor::default();
        e.insert_str("first");
        e.take();
        e.insert_str("second");
        e.take();
        e.insert_str("draft");
        e.history_prev();
        assert_eq!(e.text(), "second");
        e.history_prev();
        e.history_prev();
        assert_eq!(e.text(), "first");
        e.history_next();
        e.history_next();
        assert_eq!(e.text(), "draft");
    }

    #[test]
    fn layout_wraps_and_places_the_cursor() {
        let mut e = Editor::default();
        e.insert_str("abcdef\n日本語");
        let (rows, cursor) = e.layout(4, 5);
        assert_eq!(rows, ["abcd", "ef", "日本", "語"]);
        assert_eq!(cursor, (2, 3));
        // Only the last rows fit: the cursor row stays visible.
        let (rows, cursor) = e.layout(4, 2);
        assert_eq!(rows, ["日本", "語"]);
        assert_eq!(cursor, (2, 1));
        assert_eq!(e.height(4, 10), 4);
    }

    #[test]
    fn a_megabyte_paste_lays_out_around_the_cursor() {
        let mut e = Editor::default();
        let big = "x".repeat(1 << 20);
        e.insert_str(&big);
        // The cursor's row is the last, full rows above it (laid out from a 16 KiB window).
        let (rows, (x, y)) = e.layout(80, 8);
        assert_eq!(rows.len(), 8);
        assert!(rows[..7].iter().all(|r| r.len() == 80));
        assert_eq!((x as usize, y), (rows[7].len(), 7));
        assert_eq!(e.height(80, 8), 8);
    }
}
