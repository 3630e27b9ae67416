//! Small drawing pieces the panels share.

use ratatui::Frame;
use ratatui::layout::{Alignment, Rect};
use ratatui::style::Color;
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Wrap};

use super::theme::Theme;
use super::wrap::str_width;
use crate::protocol::TokenState;

/// Lines centred in `area`, wrapped.
pub fn centered_text(frame: &mut Frame<'_>, area: Rect, lines: Vec<Line<'static>>) {
    let h = (lines.len() as u16 + 2).min(area.height);
    let rect = Rect::new(
        area.x + 2,
        area.y + area.height.saturating_sub(h) / 2,
        area.width.saturating_sub(4),
        h,
    );
    frame.render_widget(
        Paragraph::new(lines)
            .alignment(Alignment::Center)
            .wrap(Wrap { trim: true }),
        rect,
    );
}

/// A `width` × `height` box centred in `area` (smaller where `area` is).
pub fn popup(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width.saturating_sub(2));
    let h = height.min(area.height.saturating_sub(2));
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

/// The colour of a token state, as the visualizer's legend shows it.
pub fn state_color(theme: &Theme, state: TokenState) -> Color {
    match state {
        TokenState::Global => theme.global,
        TokenState::Pinned => theme.pinned,
        TokenState::Window => theme.window,
        TokenState::Evicted => theme.evicted,
        TokenState::Recalled => theme.recalled,
    }
}

/// `(keys, what)` help lines as one line: `up/down select · enter open`.
pub fn key_line(help: &[(String, &str)]) -> String {
    let keys: Vec<String> = help.iter().map(|(k, what)| format!("{k} {what}")).collect();
    keys.join(" · ")
}

/// Rows `text` takes when wrapped at spaces into `width` columns (as a wrapping paragraph lays
/// it out): at least one.
pub fn wrapped_rows(text: &str, width: usize) -> usize {
    let width = width.max(1);
    let (mut rows, mut used) = (1, 0);
    for word in text.split(' ') {
        let w = str_width(word);
        if used > 0 && used + 1 + w > width {
            rows += 1;
            used = 0;
        }
        used += if used > 0 { 1 + w } else { w };
        // A word longer than the line is cut across rows.
        while used > width {
            rows += 1;
            used -= width;
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_wrapped_text() {
        assert_eq!(wrapped_rows("", 10), 1);
        assert_eq!(wrapped_rows("aaa bbb", 7), 1);
        assert_eq!(wrapped_rows("aaa bbb", 6), 2);
        assert_eq!(wrapped_rows("aaa bbb ccc", 7), 2);
        assert_eq!(wrapped_rows("abcdefghij", 4), 3);
    }
}
