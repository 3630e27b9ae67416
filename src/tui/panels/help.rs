//! The help overlay (`?`, F1): every key of every panel and every /command, generated from the
//! keymap and the command table, so it says what the handlers do. Any key closes it.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Wrap};

use crate::tui::commands::COMMANDS;
use crate::tui::keymap::{Context, Keymap};
use crate::tui::theme::Theme;
use crate::tui::widgets::{key_line, popup, wrapped_rows};

pub fn draw(frame: &mut Frame<'_>, area: Rect, theme: &Theme, keymap: &Keymap) {
    let key_style = Style::default()
        .fg(theme.accent)
        .add_modifier(Modifier::BOLD);
    let head = |t: &str| {
        Line::from(Span::styled(
            t.to_string(),
            Style::default().add_modifier(Modifier::BOLD | Modifier::UNDERLINED),
        ))
    };
    let row = |k: String, what: &str, w: usize| {
        Line::from(vec![
            Span::styled(format!("{k:>w$}  "), key_style),
            Span::raw(what.to_string()),
        ])
    };
    let mut keys = vec![head("Keys")];
    for (k, what) in keymap.help(Context::Chat) {
        keys.push(row(k, what, 20));
    }
    let mut more = vec![head("Commands")];
    for (name, args, what) in COMMANDS {
        more.push(row(
            format!("/{name} {args}").trim_end().to_string(),
            what,
            14,
        ));
    }
    more.push(Line::from(""));
    more.push(head("Inspect mode"));
    for (k, what) in keymap.help(Context::Inspect) {
        more.push(row(k, what, 14));
    }
    let two_columns = area.width >= 110;
    let width = if two_columns { 124 } else { 78 };
    // The inner width of the column the key lines are in (they wrap).
    let column = width.min(area.width.saturating_sub(2)).saturating_sub(2)
        - if two_columns { 58 } else { 0 };
    let mut wrapped = 0;
    for (title, context) in [
        ("Session list", Context::Sessions),
        ("Editing", Context::Editing),
    ] {
        let line = key_line(&keymap.help(context));
        wrapped += wrapped_rows(&line, column as usize) - 1;
        more.push(Line::from(""));
        more.push(head(title));
        more.push(Line::from(line));
    }
    let rows = if two_columns {
        keys.len().max(more.len() + wrapped)
    } else {
        keys.len() + 1 + more.len() + wrapped
    };
    let rect = popup(area, width, rows as u16 + 2);
    frame.render_widget(Clear, rect);
    let block = Block::bordered()
        .title(" Help · any key closes ")
        .border_style(Style::default().fg(theme.accent));
    let inner = block.inner(rect);
    frame.render_widget(block, rect);
    if two_columns {
        let [left, right] =
            Layout::horizontal([Constraint::Length(58), Constraint::Min(10)]).areas(inner);
        frame.render_widget(Paragraph::new(keys), left);
        frame.render_widget(Paragraph::new(more).wrap(Wrap { trim: false }), right);
    } else {
        keys.push(Line::from(""));
        keys.extend(more);
        frame.render_widget(Paragraph::new(keys).wrap(Wrap { trim: false }), inner);
    }
}
