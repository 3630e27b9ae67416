//! The conversation panel: messages, their rendered rows cached per width, scrolling (the keys
//! that scroll it), and drawing.
//!
//! Scrolling counts rows up from the bottom, so drawing walks messages from the last one back
//! and stops once the screen is full: a frame costs the same for 10 messages or 10,000, and
//! only messages that changed (the streaming reply, a new eviction boundary) are re-rendered.

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::rc::Rc;

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::progress::thousands;
use crate::protocol::code_blocks;
use crate::protocol::{LambdaParams, Role, ShownMessage, TokenState};
use crate::tui::keymap::{Action, Keymap};
use crate::tui::markdown;
use crate::tui::theme::Theme;
use crate::tui::widgets::centered_text;
use crate::tui::wrap::{StyledLine, str_width, wrap};

/// Rows the conversation scrolls per wheel step and per line key.
pub const SCROLL_STEP: usize = 3;

/// Rows of a message drawn at a width, for a version of it.
type CachedRows = (u16, u64, Rc<Vec<Line<'static>>>);

pub struct ChatMessage {
    /// Its index in the conversation (shown as `#index+1`).
    pub index: usize,
    pub role: Role,
    pub content: String,
    /// Code blocks in the messages before this one (its own are numbered from here + 1).
    pub first_code: usize,
    pub code_blocks: Vec<String>,
    /// Byte ranges of the content and the state of their tokens.
    pub segments: Vec<(std::ops::Range<usize>, TokenState)>,
    pub pinned: bool,
    /// The message inspect mode is looking at.
    pub inspected: bool,
    /// Bumped on every change, to invalidate the cached rows.
    version: u64,
    cache: RefCell<Option<CachedRows>>,
}

impl ChatMessage {
    pub fn new(index: usize, role: Role, content: String, first_code: usize) -> Self {
        Self {
            index,
            role,
            code_blocks: code_blocks(&content),
            content,
            first_code,
            segments: Vec::new(),
            pinned: false,
            inspected: false,
            version: 0,
            cache: RefCell::new(None),
        }
    }

    pub fn touch(&mut self) {
        self.version += 1;
    }

    /// Whether every token of the message has been evicted.
    pub fn fully_evicted(&self) -> bool {
        !self.segments.is_empty() && self.segments.iter().all(|(_, s)| *s == TokenState::Evicted)
    }

    /// Rows of this message at `width`, header and trailing blank row included.
    pub fn rows(&self, width: u16, theme: &Theme) -> Rc<Vec<Line<'static>>> {
        if let Some((w, v, rows)) = &*self.cache.borrow()
            && *w == width
            && *v == self.version
        {
            return rows.clone();
        }
        let rows = Rc::new(self.render(width, theme));
        *self.cache.borrow_mut() = Some((width, self.version, rows.clone()));
        rows
    }

    /// Rows cached now (0 when none).
    fn cached_rows(&self) -> usize {
        self.cache
            .borrow()
            .as_ref()
            .map_or(0, |(_, _, rows)| rows.len())
    }

    fn render(&self, width: u16, theme: &Theme) -> Vec<Line<'static>> {
        let index = self.index;
        let (name, color) = match self.role {
            Role::User => ("You", theme.user),
            Role::Assistant => ("Assistant", theme.assistant),
            Role::System => ("System", theme.system),
        };
        let mut header_style = Style::default().fg(color).add_modifier(Modifier::BOLD);
        if self.fully_evicted() {
            header_style = header_style.add_modifier(Modifier::DIM);
        }
        let mut header = vec![
            Span::styled(format!("▍{name}"), header_style),
            Span::styled(
                format!("  #{}", index + 1),
                Style::default().fg(theme.evicted),
            ),
        ];
        if self.pinned {
            header.push(Span::styled(
                "  ◆ pinned",
                Style::default().fg(theme.pinned),
            ));
        }
        if self.fully_evicted() {
            header.push(Span::styled(
                "  evicted",
                Style::default().fg(theme.evicted),
            ));
        } else if self
            .segments
            .iter()
            .any(|(_, s)| *s == TokenState::Recalled)
        {
            header.push(Span::styled(
                "  ↺ recalled",
                Style::default().fg(theme.recalled),
            ));
        }
        if self.inspected {
            let style = Style::default()
                .fg(theme.accent)
                .add_modifier(Modifier::BOLD);
            header.push(Span::styled("  ◀ inspecting", style));
        }
        let mut rows = vec![Line::from(header)];
        let body = markdown::render(
            &self.content,
            self.first_code,
            theme,
            Style::default(),
            &self.segments,
        );
        let indent = Span::raw("  ");
        for line in &body.lines {
            let mut line: StyledLine = line.clone();
            line.prefix.insert(0, indent.clone());
            if let Some(first) = line.first_prefix.as_mut() {
                first.insert(0, indent.clone());
            }
            rows.extend(wrap(&line, width as usize));
        }
        rows.push(Line::default());
        rows
    }
}

/// A message loaded from the engine.
fn loaded(m: ShownMessage) -> ChatMessage {
    ChatMessage::new(m.index, m.role, m.content, m.code_before)
}

/// `enter` → `Enter`, for a key named in a sentence.
fn capitalized(key: &str) -> String {
    let mut chars = key.chars();
    chars
        .next()
        .map_or(String::new(), |c| c.to_uppercase().chain(chars).collect())
}

/// Messages kept loaded while the view follows the bottom, and the most text they may hold
/// (the last two messages stay whatever their size); older ones are loaded again when the user
/// scrolls up to them, and let go once the view is back at the bottom.
pub const LOADED_MESSAGES: usize = 400;
pub const LOADED_BYTES: usize = 512 << 10;
/// Rendered rows kept cached over all messages (a few hundred KiB); past it, the caches of
/// messages off the screen are dropped.
pub const CACHED_ROWS: usize = 5_000;

/// The conversation as the screen has it: a window of its messages (the newest last, older ones
/// loaded on demand), scrolled from the bottom.
#[derive(Default)]
pub struct Conversation {
    /// The loaded messages, contiguous, in order.
    pub messages: Vec<ChatMessage>,
    /// Messages in the whole conversation.
    pub total: usize,
    /// Rows scrolled up from the bottom; 0 follows the stream.
    pub scroll: usize,
    /// Set by the last draw when the view reached the first row (scrolling up stops there).
    pub at_top: Cell<bool>,
}

impl Conversation {
    /// The conversation's last messages (`total` in all).
    pub fn opened(total: usize, messages: Vec<ShownMessage>) -> Self {
        let mut c = Self {
            total,
            ..Self::default()
        };
        c.messages = messages.into_iter().map(loaded).collect();
        c
    }

    pub fn code_count(&self) -> usize {
        self.messages
            .last()
            .map_or(0, |m| m.first_code + m.code_blocks.len())
    }

    /// Index of the first loaded message.
    pub fn first(&self) -> usize {
        self.messages.first().map_or(self.total, |m| m.index)
    }

    /// Loaded message `index` (its index in the conversation).
    pub fn get(&self, index: usize) -> Option<&ChatMessage> {
        self.messages.get(index.checked_sub(self.first())?)
    }

    pub fn push(&mut self, role: Role, content: String) {
        let first = self.code_count();
        self.messages
            .push(ChatMessage::new(self.total, role, content, first));
        self.total += 1;
        // Following the stream: what scrolled off the top is let go.
        if self.scroll == 0 {
            let mut bytes: usize = self.messages.iter().map(|m| m.content.len()).sum();
            let mut extra = self.messages.len().saturating_sub(LOADED_MESSAGES);
            bytes -= self.messages[..extra]
                .iter()
                .map(|m| m.content.len())
                .sum::<usize>();
            while bytes > LOADED_BYTES && self.messages.len() - extra > 2 {
                bytes -= self.messages[extra].content.len();
                extra += 1;
            }
            self.messages.drain(..extra);
        }
    }

    /// Drops the last message when it is `role`'s (a reply being regenerated, an exchange
    /// taken back).
    pub fn pop_if(&mut self, role: Role) {
        if self.messages.last().is_some_and(|m| m.role == role) {
            self.messages.pop();
            self.total -= 1;
        }
    }

    /// Older messages loaded again (those just before the first loaded one, in order).
    pub fn prepend(&mut self, older: Vec<ShownMessage>) {
        let first = self.first();
        let older: Vec<ChatMessage> = older
            .into_iter()
            .filter(|m| m.index < first)
            .map(loaded)
            .collect();
        let contiguous = older.last().is_some_and(|m| m.index + 1 == first)
            && older.windows(2).all(|w| w[0].index + 1 == w[1].index);
        if contiguous {
            self.messages.splice(0..0, older);
            self.at_top.set(false);
        }
    }

    /// Whether the view is at the first loaded row with older messages not loaded.
    pub fn wants_older(&self) -> bool {
        self.at_top.get() && self.first() > 0
    }

    /// Keeps the rendered rows within [`CACHED_ROWS`]: when over, the messages outside
    /// `keep` (those on screen) drop theirs.
    fn limit_cache(&self, keep: Range<usize>) {
        let cached: usize = self.messages.iter().map(ChatMessage::cached_rows).sum();
        if cached > CACHED_ROWS {
            for (i, m) in self.messages.iter().enumerate() {
                if !keep.contains(&i) {
                    m.cache.replace(None);
                }
            }
        }
    }

    /// Appends streamed text to the last message, keeping the view still unless it follows.
    pub fn append(&mut self, text: &str, width: u16, theme: &Theme) {
        if self.messages.is_empty() {
            return;
        }
        let index = self.messages.len() - 1;
        let before = if self.scroll > 0 {
            self.messages[index].rows(width, theme).len()
        } else {
            0
        };
        let last = &mut self.messages[index];
        last.content.push_str(text);
        last.code_blocks = code_blocks(&last.content);
        last.touch();
        if self.scroll > 0 {
            let after = self.messages[index].rows(width, theme).len();
            self.scroll += after.saturating_sub(before);
        }
    }

    /// Code block `n` (1-based, as numbered on screen).
    pub fn code_block(&self, n: usize) -> Option<&str> {
        let m = self
            .messages
            .iter()
            .find(|m| n > m.first_code && n <= m.first_code + m.code_blocks.len())?;
        m.code_blocks.get(n - m.first_code - 1).map(String::as_str)
    }

    /// Marks the message inspect mode looks at (none with `None`) and scrolls so that it ends
    /// at the bottom of the pane.
    pub fn inspect(&mut self, index: Option<usize>, width: u16, theme: &Theme) {
        for m in &mut self.messages {
            let on = Some(m.index) == index;
            if m.inspected != on {
                m.inspected = on;
                m.touch();
            }
        }
        if let Some(index) = index {
            self.scroll = self
                .messages
                .iter()
                .filter(|m| m.index > index)
                .map(|m| m.rows(width, theme).len())
                .sum();
            self.at_top.set(false);
        }
    }

    pub fn scroll_up(&mut self, rows: usize) {
        if !self.at_top.get() {
            self.scroll += rows;
        }
    }

    pub fn scroll_down(&mut self, rows: usize) {
        self.scroll = self.scroll.saturating_sub(rows);
        self.at_top.set(false);
    }

    pub fn to_top(&mut self) {
        self.scroll = usize::MAX / 2;
    }

    pub fn to_bottom(&mut self) {
        self.scroll = 0;
        self.at_top.set(false);
    }

    /// Carries out the chat's scroll actions (`page` rows a page); `false` for any other action.
    pub fn scroll_by(&mut self, action: Action, page: usize) -> bool {
        match action {
            Action::ScrollUp => self.scroll_up(SCROLL_STEP),
            Action::ScrollDown => self.scroll_down(SCROLL_STEP),
            Action::PageUp => self.scroll_up(page),
            Action::PageDown => self.scroll_down(page),
            Action::Top => self.to_top(),
            Action::Bottom => self.to_bottom(),
            _ => return false,
        }
        true
    }

    /// Draws the conversation, or the welcome text (which names the Λ of `params`) while it is
    /// empty.
    pub fn draw(
        &self,
        frame: &mut Frame<'_>,
        area: Rect,
        theme: &Theme,
        keymap: &Keymap,
        params: Option<LambdaParams>,
    ) {
        if self.messages.is_empty() {
            let (g, l) = params.map_or((0, 0), |p| (p.n_global, p.n_local));
            let lines = vec![
                Line::from(Span::styled(
                    "Chat for as long as you like.",
                    Style::default()
                        .fg(theme.accent)
                        .add_modifier(Modifier::BOLD),
                )),
                Line::from(""),
                Line::from(format!(
                    "The model attends to the first {} tokens and the last {} (Λ attention).",
                    thousands(g as u64),
                    thousands(l as u64)
                )),
                Line::from("Older text is evicted — dimmed here — and memory stays flat."),
                Line::from(""),
                Line::from(Span::styled(
                    format!(
                        "Type a message and press {} · / for commands · {} for help",
                        capitalized(&keymap.key_of(Action::Send)),
                        keymap.key_of(Action::Help)
                    ),
                    Style::default().fg(theme.evicted),
                )),
            ];
            return centered_text(frame, area, lines);
        }
        let lines = self.visible(area.width, area.height as usize, theme);
        frame.render_widget(Paragraph::new(lines), area);
        if self.scroll > 0 {
            let label = format!(" ↓ more below ({}) ", keymap.key_of(Action::Bottom));
            let w = str_width(&label) as u16;
            if area.width > w {
                let rect = Rect::new(area.x + area.width - w, area.y + area.height - 1, w, 1);
                frame.render_widget(
                    Paragraph::new(Span::styled(
                        label,
                        Style::default().fg(Color::Black).bg(theme.accent),
                    )),
                    rect,
                );
            }
        }
    }

    /// The rows to draw in a `width` × `height` pane, walking back from the last message.
    pub fn visible(&self, width: u16, height: usize, theme: &Theme) -> Vec<Line<'static>> {
        let want = self.scroll.saturating_add(height);
        let mut chunks: Vec<Rc<Vec<Line<'static>>>> = Vec::new();
        let mut have = 0;
        let mut reached_top = true;
        let mut shown = self.messages.len();
        for (i, m) in self.messages.iter().enumerate().rev() {
            if have >= want {
                reached_top = false;
                break;
            }
            let rows = m.rows(width, theme);
            have += rows.len();
            chunks.push(rows);
            shown = i;
        }
        self.limit_cache(shown..self.messages.len());
        // Scrolled up to (or past) the first row: clamp, and tell scrolling to stop.
        let reached_top = reached_top && have <= want;
        let skip_from_bottom = if reached_top {
            have.saturating_sub(height)
        } else {
            self.scroll
        };
        self.at_top
            .set(reached_top && self.scroll >= skip_from_bottom);
        let all: Vec<&Line<'static>> = chunks.iter().rev().flat_map(|c| c.iter()).collect();
        let end = all.len().saturating_sub(skip_from_bottom);
        let start = end.saturating_sub(height);
        all[start..end].iter().map(|l| (*l).clone()).collect()
    }
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

    fn conversation(n: usize) -> Conversation {
        let mut c = Conversation::default();
        for i in 0..n {
            c.push(Role::User, format!("message {i}"));
        }
        c
    }

    #[test]
    fn shows_the_bottom_and_scrolls_up_to_the_top() {
        let theme = Theme::default();
        let mut c = conversation(100);
        // A screen filled exactly by the last message is not the top of the conversation.
        c.visible(40, 3, &theme);
        assert!(!c.at_top.get());
        assert_eq!(
            text(&c.visible(40, 4, &theme)),
            ["", "▍You  #100", "  message 99", ""]
        );
        c.scroll_up(3);
        assert_eq!(
            text(&c.visible(40, 4, &theme)),
            ["", "▍You  #99", "  message 98", ""]
        );
        c.to_top();
        let top = text(&c.visible(40, 4, &theme));
        assert_eq!(top[0], "▍You  #1");
        assert!(c.at_top.get());
        let before = c.scroll;
        c.scroll_up(5);
        assert_eq!(c.scroll, before);
        c.to_bottom();
        assert!(!c.at_top.get());
    }

    #[test]
    fn streaming_keeps_a_scrolled_view_still() {
        let theme = Theme::default();
        let mut c = conversation(10);
        c.push(Role::Assistant, String::new());
        c.scroll_up(6);
        let before = text(&c.visible(20, 5, &theme));
        c.append("a long line of streamed words that wraps", 20, &theme);
        assert_eq!(text(&c.visible(20, 5, &theme)), before);
        c.to_bottom();
        c.append(" more", 20, &theme);
        let rows = text(&c.visible(20, 5, &theme));
        assert!(rows.iter().any(|r| r.contains("more")), "{rows:?}");
    }

    #[test]
    fn following_keeps_a_bounded_tail_of_messages() {
        let mut c = conversation(LOADED_MESSAGES + 50);
        assert_eq!(c.messages.len(), LOADED_MESSAGES);
        assert_eq!(c.total, LOADED_MESSAGES + 50);
        assert_eq!(c.first(), 50);
        let big = "x".repeat(LOADED_BYTES / 4);
        for _ in 0..10 {
            c.push(Role::User, big.clone());
        }
        let bytes: usize = c.messages.iter().map(|m| m.content.len()).sum();
        assert!(bytes <= LOADED_BYTES, "{bytes} bytes loaded");
        assert_eq!(c.total, LOADED_MESSAGES + 60);
        assert_eq!(c.first() + c.messages.len(), c.total, "the newest stay");
        // Messages larger than the budget: the last two stay all the same.
        c.push(Role::User, "y".repeat(LOADED_BYTES));
        c.push(Role::Assistant, "z".repeat(LOADED_BYTES));
        assert_eq!(c.messages.len(), 2);
        // Scrolled up, nothing is let go.
        c.scroll = 3;
        c.push(Role::User, big.clone());
        assert_eq!(c.messages.len(), 3);
    }

    #[test]
    fn code_blocks_are_numbered_across_messages() {
        let mut c = Conversation::default();
        c.push(Role::Assistant, "```\na\n```\n```\nb\n```".into());
        c.push(Role::User, "no code".into());
        c.push(Role::Assistant, "```rust\nc\n```".into());
        assert_eq!(c.code_block(1), Some("a\n"));
        assert_eq!(c.code_block(3), Some("c\n"));
        assert_eq!(c.code_block(4), None);
        assert_eq!(c.code_block(0), None);
    }
}
