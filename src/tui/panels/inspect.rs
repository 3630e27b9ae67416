//! Inspect mode: a cursor that moves token by token through one message, showing each token's
//! id, position, state and the share of attention the last generated token gave it.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};

use crate::progress::thousands;
use crate::protocol::{CacheStats, InspectView, Role, TokenState};
use crate::tui::keymap::{Action, Context, Keymap};
use crate::tui::theme::Theme;
use crate::tui::widgets::{key_line, state_color};
use crate::tui::wrap::str_width;

/// Rows of the panel, borders included.
pub const ROWS: u16 = 7;

#[derive(Debug, Clone, PartialEq)]
pub struct Inspect {
    pub message: usize,
    pub cursor: usize,
    /// The engine's numbers for the message (`None` until they arrive).
    pub view: Option<InspectView>,
}

/// What a key did in inspect mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// The cursor moved (or stayed) within the message.
    Stay,
    /// To another message, whose view must be asked for.
    ToMessage(usize),
    Leave,
}

impl Inspect {
    /// Inspect message `message`, the cursor on its last token once the view arrives.
    pub fn open(message: usize) -> Self {
        Self {
            message,
            cursor: usize::MAX,
            view: None,
        }
    }

    /// Carries out an action of inspect mode (`Context::Inspect`) in a conversation of
    /// `messages` messages; `None` for any other action.
    pub fn act(&mut self, action: Action, messages: usize) -> Option<Move> {
        let tokens = self.view.as_ref().map_or(0, |v| v.tokens.len());
        match action {
            Action::LeaveInspect => return Some(Move::Leave),
            Action::PrevToken => self.cursor = self.cursor.min(tokens).saturating_sub(1),
            Action::NextToken => {
                self.cursor = (self.cursor.saturating_add(1)).min(tokens.saturating_sub(1))
            }
            Action::FirstToken => self.cursor = 0,
            Action::LastToken => self.cursor = tokens.saturating_sub(1),
            Action::PrevMessage if self.message > 0 => return Some(self.to(self.message - 1)),
            Action::NextMessage if self.message + 1 < messages => {
                return Some(self.to(self.message + 1));
            }
            Action::PrevMessage | Action::NextMessage => {}
            _ => return None,
        }
        Some(Move::Stay)
    }

    fn to(&mut self, message: usize) -> Move {
        *self = Self {
            message,
            cursor: 0,
            view: None,
        };
        Move::ToMessage(message)
    }

    /// Takes the engine's view when it is of this message.
    pub fn show(&mut self, view: InspectView) {
        if self.message == view.message {
            let n = view.tokens.len();
            self.cursor = self.cursor.min(n.saturating_sub(1));
            self.view = Some(view);
        }
    }

    /// Draws the panel; `role` is the inspected message's, `stats` the cache's now.
    pub fn draw(
        &self,
        frame: &mut Frame<'_>,
        area: Rect,
        look: (&Theme, &Keymap),
        role: Option<Role>,
        stats: &CacheStats,
    ) {
        let (theme, keymap) = look;
        let role = role.map_or("", |r| match r {
            Role::User => "you",
            Role::Assistant => "assistant",
            Role::System => "system",
        });
        let count = self.view.as_ref().map_or(0, |v| v.tokens.len());
        let title = format!(
            " Inspect · message #{} ({role}) · token {}/{} ",
            self.message + 1,
            (self.cursor + 1).min(count),
            count
        );
        let block = Block::default()
            .borders(Borders::TOP | Borders::BOTTOM)
            .border_style(Style::default().fg(theme.accent))
            .title(Span::styled(title, Style::default().fg(theme.accent)));
        let inner = block.inner(area);
        frame.render_widget(block, area);
        let Some(view) = &self.view else {
            frame.render_widget(Paragraph::new("asking the model…"), inner);
            return;
        };
        if view.tokens.is_empty() {
            frame.render_widget(
                Paragraph::new("this message has no tokens in the model yet"),
                inner,
            );
            return;
        }
        let max = view
            .tokens
            .iter()
            .map(|t| t.share)
            .fold(0f32, f32::max)
            .max(1e-12);
        let width = inner.width as usize;
        let cursor = self.cursor.min(view.tokens.len() - 1);
        // Start far enough back that the cursor sits on the second of three rows.
        let mut start = cursor;
        let mut used = 0;
        while start > 0 && used < width {
            used += str_width(&token_label(&view.tokens[start - 1].text)) + 1;
            start -= 1;
        }
        let mut rows: Vec<Vec<Span<'static>>> = vec![Vec::new()];
        let mut col = 0;
        for (i, tok) in view.tokens.iter().enumerate().skip(start) {
            let label = token_label(&tok.text);
            let w = str_width(&label) + 1;
            if col + w > width {
                if rows.len() == 3 {
                    break;
                }
                rows.push(Vec::new());
                col = 0;
            }
            let mut style = Style::default().bg(heat(tok.share / max)).fg(Color::Black);
            if tok.state == TokenState::Evicted {
                style = Style::default()
                    .fg(theme.evicted)
                    .add_modifier(Modifier::DIM);
            }
            if i == cursor {
                style = style.add_modifier(Modifier::REVERSED | Modifier::BOLD);
            }
            if let Some(row) = rows.last_mut() {
                row.push(Span::styled(label, style));
                row.push(Span::raw(" "));
            }
            col += w;
        }
        let tok = &view.tokens[cursor];
        let mean = 1.0
            / stats
                .attended_global
                .saturating_add(stats.attended_window + 1)
                .max(1) as f32;
        let state = match tok.state {
            TokenState::Global => "sink (global)",
            TokenState::Pinned => "pinned",
            TokenState::Recalled => "recalled",
            TokenState::Window => "in the window",
            TokenState::Evicted => "evicted",
        };
        let mut lines: Vec<Line<'static>> = rows.into_iter().map(Line::from).collect();
        lines.push(Line::from(vec![
            Span::styled(
                format!("token {:?}", tok.text),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!(
                "  id {} · position {} · ",
                tok.id,
                thousands(tok.position)
            )),
            Span::styled(state, Style::default().fg(state_color(theme, tok.state))),
            Span::raw(format!(
                " · attention {:.2}% ({:.1}× mean)",
                tok.share * 100.0,
                tok.share / mean
            )),
        ]));
        lines.push(Line::from(Span::styled(
            key_line(&keymap.help(Context::Inspect)),
            Style::default().fg(theme.evicted),
        )));
        frame.render_widget(Paragraph::new(lines), inner);
    }
}

/// Heat colour of an attention share relative to the largest one: dark blue → yellow → red.
pub fn heat(relative: f32) -> Color {
    let x = relative.clamp(0.0, 1.0);
    let (r, g, b) = if x < 0.5 {
        let u = x / 0.5;
        (40.0 + 200.0 * u, 40.0 + 160.0 * u, 120.0 - 80.0 * u)
    } else {
        let u = (x - 0.5) / 0.5;
        (240.0, 200.0 - 150.0 * u, 40.0)
    };
    Color::Rgb(r as u8, g as u8, b as u8)
}

/// A token's text made visible: spaces and line breaks shown, controls escaped.
fn token_label(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        match c {
            '\n' => out.push('⏎'),
            '\t' => out.push('⇥'),
            ' ' => out.push('·'),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    if out.is_empty() { "∅".into() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_and_labels() {
        assert_eq!(heat(0.0), Color::Rgb(40, 40, 120));
        assert_eq!(heat(1.0), Color::Rgb(240, 50, 40));
        assert_eq!(token_label(" a\n"), "·a⏎");
        assert_eq!(token_label(""), "∅");
    }
}
