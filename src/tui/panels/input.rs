//! The message box: its state is an [`Editor`]; this module reads its keys (editing, new line,
//! completion, the history of sent messages) and draws it with the completion list of
//! /commands above it.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph};

use crate::tui::commands::complete;
use crate::tui::editor::Editor;
use crate::tui::keymap::{Action, Keymap};
use crate::tui::theme::Theme;
use crate::tui::wrap::str_width;

/// Most rows the input box grows to.
const MAX_ROWS: usize = 8;

/// Carries out an action of the message box; `false` for any other.
pub fn act(editor: &mut Editor, action: Action) -> bool {
    match action {
        Action::Newline => editor.insert_char('\n'),
        Action::Complete => {
            if let Some((line, _)) = complete(editor.text()).first() {
                editor.set(line);
            }
        }
        Action::HistoryPrev => {
            if !editor.up() {
                editor.history_prev();
            }
        }
        Action::HistoryNext => {
            if !editor.down() {
                editor.history_next();
            }
        }
        other => return editor.edit(other),
    }
    true
}

/// Rows the box takes at `width`, its top border included.
pub fn height(editor: &Editor, width: u16) -> u16 {
    editor.height(width.saturating_sub(2) as usize, MAX_ROWS) as u16 + 1
}

/// What the box looks like now.
pub struct InputLook<'a> {
    pub theme: &'a Theme,
    pub keymap: &'a Keymap,
    /// A reply is streaming (the hint says how to stop it).
    pub replying: bool,
    /// The box holds the last user message, to replace it.
    pub replacing: bool,
    /// The terminal cursor belongs here (no panel in front).
    pub focused: bool,
}

pub fn draw(frame: &mut Frame<'_>, area: Rect, editor: &Editor, look: InputLook<'_>) {
    let InputLook {
        theme,
        keymap,
        replying,
        replacing,
        focused,
    } = look;
    let hint = if replacing {
        format!(
            " editing your last message · {} replaces it and its reply · {} keeps them ",
            keymap.key_of(Action::Send),
            keymap.key_of(Action::Stop)
        )
    } else if replying {
        format!(
            " replying… ({} stops; you can type the next message) ",
            keymap.key_of(Action::Stop)
        )
    } else {
        format!(
            " message · {} sends · {} new line ",
            keymap.key_of(Action::Send),
            keymap.key_of(Action::Newline)
        )
    };
    let block = Block::default()
        .borders(Borders::TOP)
        .border_style(Style::default().fg(theme.accent))
        .title(Span::styled(hint, Style::default().fg(theme.evicted)));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let text_area = Rect::new(
        inner.x + 1,
        inner.y,
        inner.width.saturating_sub(2),
        inner.height,
    );
    let (rows, (x, y)) = editor.layout(text_area.width as usize, text_area.height as usize);
    let lines: Vec<Line<'static>> = rows.into_iter().map(Line::from).collect();
    frame.render_widget(Paragraph::new(lines), text_area);
    if focused {
        frame.set_cursor_position((text_area.x + x, text_area.y + y));
    }
}

/// The /commands that complete what is typed, in a box above the input (at `input`).
pub fn draw_completion(
    frame: &mut Frame<'_>,
    input: Rect,
    editor: &Editor,
    theme: &Theme,
    keymap: &Keymap,
) {
    let items = complete(editor.text());
    if items.is_empty() || items.len() == 1 && items[0].0.trim_end() == editor.text().trim_end() {
        return;
    }
    let shown = items.len().min(8) as u16;
    let width = items
        .iter()
        .map(|(n, w)| str_width(n) + str_width(w) + 4)
        .max()
        .unwrap_or(10)
        .min(input.width as usize) as u16;
    let rect = Rect::new(
        input.x + 1,
        input.y.saturating_sub(shown + 2),
        width + 2,
        shown + 2,
    );
    let lines: Vec<Line<'static>> = items
        .iter()
        .take(8)
        .enumerate()
        .map(|(i, (name, what))| {
            let style = if i == 0 {
                Style::default().add_modifier(Modifier::REVERSED)
            } else {
                Style::default()
            };
            Line::from(vec![
                Span::styled(name.clone(), style.fg(theme.accent)),
                Span::styled(format!("  {what}"), Style::default().fg(theme.evicted)),
            ])
        })
        .collect();
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::bordered()
                .title(format!(" {} completes ", keymap.key_of(Action::Complete)))
                .border_style(Style::default().fg(theme.evicted)),
        ),
        rect,
    );
}
