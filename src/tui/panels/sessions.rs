//! The session list (F4): saved conversations to open, rename, delete, or start anew.

use crossterm::event::{KeyCode, KeyModifiers};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use crate::progress::thousands;
use crate::protocol::{Command, SessionSummary};
use crate::tui::editor::Editor;
use crate::tui::keymap::{Action, Context, Key, Keymap};
use crate::tui::theme::Theme;
use crate::tui::widgets::{key_line, popup};
use crate::tui::wrap::str_width;

#[derive(Debug, Clone, Default)]
pub struct SessionList {
    pub items: Vec<SessionSummary>,
    pub selected: usize,
    /// The new title being typed, while renaming the selected conversation.
    pub renaming: Option<Editor>,
    /// `delete` was pressed once: the next one deletes.
    pub confirm_delete: bool,
}

/// What a key did in the list.
#[derive(Debug, Clone, PartialEq)]
pub enum ListOutcome {
    Stay,
    /// Ask the engine for this.
    Command(Command),
    /// Close the list, then ask the engine for this (if anything).
    Close(Option<Command>),
}

impl SessionList {
    /// The list of `items`, the conversation `current` selected when it is among them.
    pub fn new(items: Vec<SessionSummary>, current: Option<i64>) -> Self {
        let selected = items
            .iter()
            .position(|s| Some(s.id) == current)
            .unwrap_or(0);
        Self {
            items,
            selected,
            ..Self::default()
        }
    }

    /// New items from the engine (after a rename or a delete), the selection kept in range.
    pub fn refresh(&mut self, items: Vec<SessionSummary>) {
        self.selected = self.selected.min(items.len().saturating_sub(1));
        self.items = items;
    }

    /// A key while the list is open; `chat` is what the key does in the chat (the keys that
    /// stop a reply or open the list close it).
    pub fn key(&mut self, keymap: &Keymap, key: &Key, chat: Option<Action>) -> ListOutcome {
        if let Some(editor) = &mut self.renaming {
            match keymap.action(Context::Rename, key) {
                Some(Action::CancelRename) => self.renaming = None,
                Some(Action::SaveTitle) => {
                    let title = editor.text().trim().to_string();
                    self.renaming = None;
                    if let (false, Some(s)) = (title.is_empty(), self.items.get(self.selected)) {
                        return ListOutcome::Command(Command::RenameSession(s.id, title));
                    }
                }
                _ => match (keymap.editing(key), key.code) {
                    (Some(action), _) => {
                        editor.edit(action);
                    }
                    (None, KeyCode::Char(c)) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                        editor.insert_char(c)
                    }
                    _ => {}
                },
            }
            return ListOutcome::Stay;
        }
        // Any key but a second `delete` cancels a delete being confirmed.
        let confirm = std::mem::take(&mut self.confirm_delete);
        let selected = self.items.get(self.selected).map(|s| s.id);
        match keymap.action(Context::Sessions, key) {
            Some(Action::SelectUp) => self.selected = self.selected.saturating_sub(1),
            Some(Action::SelectDown) => {
                self.selected = (self.selected + 1).min(self.items.len().saturating_sub(1))
            }
            Some(Action::Open) => {
                if let Some(id) = selected {
                    return ListOutcome::Close(Some(Command::OpenSession(id)));
                }
            }
            Some(Action::Rename) => {
                if let Some(s) = self.items.get(self.selected) {
                    let mut e = Editor::default();
                    e.set(&s.title);
                    self.renaming = Some(e);
                }
            }
            Some(Action::Delete) => {
                if let Some(id) = selected {
                    if confirm {
                        return ListOutcome::Command(Command::DeleteSession(id));
                    }
                    self.confirm_delete = true;
                }
            }
            Some(Action::NewConversation) => return ListOutcome::Close(Some(Command::NewSession)),
            Some(Action::CloseList) => return ListOutcome::Close(None),
            _ if matches!(chat, Some(Action::Stop | Action::Sessions)) => {
                return ListOutcome::Close(None);
            }
            _ => {}
        }
        ListOutcome::Stay
    }

    /// Draws the list over `area`; `current` is the open conversation.
    pub fn draw(
        &self,
        frame: &mut Frame<'_>,
        area: Rect,
        look: (&Theme, &Keymap),
        current: Option<i64>,
    ) {
        let (theme, keymap) = look;
        let rect = popup(area, 80, (self.items.len() as u16 + 5).clamp(8, 24));
        let mut lines = Vec::new();
        if self.items.is_empty() {
            lines.push(Line::from(Span::styled(
                "No saved conversations yet.",
                Style::default().fg(theme.evicted),
            )));
        }
        let visible = rect.height.saturating_sub(5) as usize;
        let first = self.selected.saturating_sub(visible.saturating_sub(1));
        for (i, s) in self.items.iter().enumerate().skip(first).take(visible) {
            let selected = i == self.selected;
            let title = match (&self.renaming, selected) {
                (Some(editor), true) => format!("{}▏", editor.text()),
                _ => s.title.clone(),
            };
            let style = if selected {
                Style::default().add_modifier(Modifier::REVERSED)
            } else {
                Style::default()
            };
            let model = std::path::Path::new(&s.model)
                .file_name()
                .map_or(s.model.clone(), |f| f.to_string_lossy().into_owned());
            let mark = if Some(s.id) == current { "●" } else { " " };
            let head = format!("{mark} {title}");
            let mut detail = format!(
                "  {} messages · {}",
                thousands(s.messages as u64),
                age(now_secs().saturating_sub(s.updated))
            );
            // The model's file name only where the line has room for it.
            let room = rect.width.saturating_sub(2) as usize;
            if str_width(&head) + str_width(&detail) + str_width(&model) + 3 <= room {
                detail.push_str(&format!(" · {model}"));
            }
            lines.push(Line::from(vec![
                Span::styled(head, style),
                Span::styled(detail, Style::default().fg(theme.evicted)),
            ]));
        }
        lines.push(Line::from(""));
        let footer = if self.confirm_delete {
            Span::styled(
                format!(
                    "press {} again to delete this conversation",
                    keymap.key_of(Action::Delete)
                ),
                Style::default().fg(theme.error),
            )
        } else {
            let context = if self.renaming.is_some() {
                Context::Rename
            } else {
                Context::Sessions
            };
            Span::styled(
                key_line(&keymap.help(context)),
                Style::default().fg(theme.evicted),
            )
        };
        // Keep the footer on the last inner row, whatever the list's length.
        let inner_rows = rect.height.saturating_sub(2) as usize;
        while lines.len() + 1 < inner_rows {
            lines.push(Line::from(""));
        }
        lines.truncate(inner_rows.saturating_sub(1));
        lines.push(Line::from(footer));
        frame.render_widget(Clear, rect);
        frame.render_widget(
            Paragraph::new(lines).block(
                Block::bordered()
                    .title(" Conversations ")
                    .border_style(Style::default().fg(theme.accent)),
            ),
            rect,
        );
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `95` → `2 min ago`: how long ago a conversation was saved.
pub fn age(secs: i64) -> String {
    match secs {
        s if s < 60 => "just now".into(),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(age(5), "just now");
        assert_eq!(age(125), "2 min ago");
        assert_eq!(age(7300), "2 h ago");
        assert_eq!(age(3 * 86_400), "3 days ago");
    }
}
