//! Markdown of a message → styled lines for the conversation pane: headings, paragraphs,
//! emphasis, inline code, lists, quotes, rules and fenced code blocks (highlighted, framed and
//! numbered for `/copy N`).
//!
//! Each piece of text knows the bytes of the message it came from (pulldown-cmark's source
//! offsets), so text whose tokens the model no longer attends to is dimmed exactly where the
//! eviction boundary falls.

use std::ops::Range;

use pulldown_cmark::{CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};
use ratatui::style::{Modifier, Style};
use ratatui::text::Span;

use super::highlight::{Class, Highlighter};
use super::theme::Theme;
use super::wrap::{StyledLine, str_width};
use crate::protocol::TokenState;

/// A message rendered to logical lines, and its code blocks (for `/copy`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    pub lines: Vec<StyledLine>,
    pub code_blocks: Vec<String>,
}

enum Container {
    Quote,
    /// A list item: the width of its bullet.
    Item(usize),
}

struct Renderer<'a> {
    src: &'a str,
    theme: &'a Theme,
    states: &'a [(Range<usize>, TokenState)],
    lines: Vec<StyledLine>,
    current: Vec<Span<'static>>,
    containers: Vec<Container>,
    /// Bullet to draw on the next line's first row.
    bullet: Option<String>,
    styles: Vec<Style>,
    /// Numbering of the open lists (`None` for bullets).
    lists: Vec<Option<u64>>,
    code: Option<(String, String, usize)>,
    code_blocks: Vec<String>,
    first_code: usize,
}

/// Renders `src` with `base` as the text style; code blocks are numbered from `first_code + 1`.
/// `states` maps byte ranges of `src` to the state of their tokens.
pub fn render(
    src: &str,
    first_code: usize,
    theme: &Theme,
    base: Style,
    states: &[(Range<usize>, TokenState)],
) -> Rendered {
    let mut r = Renderer {
        src,
        theme,
        states,
        lines: Vec::new(),
        current: Vec::new(),
        containers: Vec::new(),
        bullet: None,
        styles: vec![base],
        lists: Vec::new(),
        code: None,
        code_blocks: Vec::new(),
        first_code,
    };
    for (event, range) in Parser::new_ext(src, Options::ENABLE_STRIKETHROUGH).into_offset_iter() {
        r.event(event, range);
    }
    r.flush();
    if let Some((lang, text, start)) = r.code.take() {
        // A reply still streaming its code block.
        r.emit_code(&lang, &text, start);
    }
    while r.lines.last().is_some_and(|l| l.spans.is_empty()) {
        r.lines.pop();
    }
    Rendered {
        lines: r.lines,
        code_blocks: r.code_blocks,
    }
}

impl Renderer<'_> {
    fn style(&self) -> Style {
        self.styles.last().copied().unwrap_or_default()
    }

    fn push_style(&mut self, f: impl FnOnce(Style) -> Style) {
        let s = f(self.style());
        self.styles.push(s);
    }

    fn state_at(&self, byte: usize) -> TokenState {
        self.states
            .iter()
            .find(|(r, _)| r.contains(&byte))
            .map_or(TokenState::Window, |(_, s)| *s)
    }

    fn with_state(&self, style: Style, state: TokenState) -> Style {
        match state {
            TokenState::Evicted => style.fg(self.theme.evicted).add_modifier(Modifier::DIM),
            // Evicted, but the model sees it again: its own shade, not dimmed.
            TokenState::Recalled => style.fg(self.theme.recalled),
            _ => style,
        }
    }

    /// Spans for `text` that came from `range` of the source, split where the token state
    /// changes (when the text is the source verbatim; otherwise one state for all of it).
    fn spans(&self, text: &str, range: Range<usize>, style: Style) -> Vec<Span<'static>> {
        let verbatim = self.src.get(range.clone()) == Some(text);
        if !verbatim || self.states.len() <= 1 {
            let style = self.with_state(style, self.state_at(range.start));
            return vec![Span::styled(text.to_string(), style)];
        }
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            let at = range.start + pos;
            let (state, segment_end) = self
                .states
                .iter()
                .find(|(r, _)| r.contains(&at))
                .map_or((TokenState::Window, range.end), |(r, s)| {
                    (*s, r.end.min(range.end))
                });
            let mut end = segment_end - range.start;
            if end <= pos {
                end = text.len();
            }
            while !text.is_char_boundary(end) {
                end += 1;
            }
            out.push(Span::styled(
                text[pos..end].to_string(),
                self.with_state(style, state),
            ));
            pos = end;
        }
        out
    }

    fn prefixes(&self) -> (Vec<Span<'static>>, Option<Vec<Span<'static>>>) {
        let mut prefix = Vec::new();
        for c in &self.containers {
            match c {
                Container::Quote => {
                    prefix.push(Span::styled("▎ ", Style::default().fg(self.theme.accent)))
                }
                Container::Item(w) => prefix.push(Span::raw(" ".repeat(*w))),
            }
        }
        let first = self.bullet.as_ref().map(|b| {
            let mut p = prefix.clone();
            if let Some(last) = p.last_mut() {
                *last = Span::styled(b.clone(), Style::default().fg(self.theme.accent));
            }
            p
        });
        (prefix, first)
    }

    fn flush(&mut self) {
        if self.current.is_empty() {
            return;
        }
        let (prefix, first_prefix) = self.prefixes();
        self.bullet = None;
        self.lines.push(StyledLine {
            prefix,
            first_prefix,
            spans: std::mem::take(&mut self.current),
            hard: false,
        });
    }

    fn blank(&mut self) {
        self.flush();
        let in_item = self
            .containers
            .iter()
            .any(|c| matches!(c, Container::Item(_)));
        if !in_item && self.lines.last().is_some_and(|l| !l.spans.is_empty()) {
            self.lines.push(StyledLine::default());
        }
    }

    fn event(&mut self, event: Event<'_>, range: Range<usize>) {
        if let Some((_, text, _)) = self.code.as_mut() {
            match event {
                Event::Text(t) => text.push_str(&t),
                Event::End(TagEnd::CodeBlock) => {
                    if let Some((lang, text, start)) = self.code.take() {
                        self.emit_code(&lang, &text, start);
                        self.blank();
                    }
                }
                _ => {}
            }
            return;
        }
        match event {
            Event::Start(tag) => self.start(tag, range),
            Event::End(tag) => self.end(tag),
            Event::Text(t) => {
                let spans = self.spans(&t, range, self.style());
                self.current.extend(spans);
            }
            Event::Code(t) => {
                let style = self.style().fg(self.theme.code);
                let inner = range.start + 1..range.end.saturating_sub(1);
                self.current.extend(self.spans(&t, inner, style));
            }
            // A chat reply's single line breaks are meant (poems, lists without markers):
            // kept, unlike a Markdown document's.
            Event::SoftBreak | Event::HardBreak => self.flush(),
            Event::Rule => {
                self.flush();
                let rule = Span::styled("─".repeat(40), Style::default().fg(self.theme.evicted));
                self.lines.push(StyledLine::new(vec![rule]));
                self.blank();
            }
            Event::TaskListMarker(done) => {
                self.current
                    .push(Span::raw(if done { "[x] " } else { "[ ] " }));
            }
            Event::Html(t) | Event::InlineHtml(t) => {
                for (i, line) in t.split('\n').enumerate() {
                    if i > 0 {
                        self.flush();
                    }
                    if !line.is_empty() {
                        self.current
                            .push(Span::styled(line.to_string(), self.style()));
                    }
                }
            }
            Event::FootnoteReference(t) | Event::InlineMath(t) | Event::DisplayMath(t) => {
                self.current.push(Span::styled(t.to_string(), self.style()));
            }
        }
    }

    fn start(&mut self, tag: Tag<'_>, range: Range<usize>) {
        match tag {
            Tag::Heading { level, .. } => {
                self.flush();
                let hashes = match level {
                    HeadingLevel::H1 => 1,
                    HeadingLevel::H2 => 2,
                    HeadingLevel::H3 => 3,
                    _ => 4,
                };
                self.push_style(|s| s.add_modifier(Modifier::BOLD).fg(self.theme.accent));
                self.current.push(Span::styled(
                    format!("{} ", "#".repeat(hashes)),
                    self.style(),
                ));
            }
            Tag::BlockQuote(_) => {
                self.flush();
                self.containers.push(Container::Quote);
            }
            Tag::CodeBlock(kind) => {
                self.flush();
                let lang = match kind {
                    CodeBlockKind::Fenced(l) => l.to_string(),
                    CodeBlockKind::Indented => String::new(),
                };
                // Byte where the code text starts: after the opening fence line.
                let start = match self.src[range.clone()].find('\n') {
                    Some(nl) if self.src[range.start..].starts_with(['`', '~']) => {
                        range.start + nl + 1
                    }
                    _ => range.start,
                };
                self.code = Some((lang, String::new(), start));
            }
            Tag::List(first) => {
                self.flush();
                self.lists.push(first);
            }
            Tag::Item => {
                self.flush();
                let bullet = match self.lists.last_mut() {
                    Some(Some(n)) => {
                        *n += 1;
                        format!("{}. ", *n - 1)
                    }
                    _ => "• ".to_string(),
                };
                self.containers.push(Container::Item(str_width(&bullet)));
                self.bullet = Some(bullet);
            }
            Tag::Emphasis => self.push_style(|s| s.add_modifier(Modifier::ITALIC)),
            Tag::Strong => self.push_style(|s| s.add_modifier(Modifier::BOLD)),
            Tag::Strikethrough => self.push_style(|s| s.add_modifier(Modifier::CROSSED_OUT)),
            Tag::Link { .. } => self.push_style(|s| s.add_modifier(Modifier::UNDERLINED)),
            _ => {}
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Paragraph => self.blank(),
            TagEnd::Heading(_) => {
                self.styles.pop();
                self.blank();
            }
            TagEnd::BlockQuote(_) => {
                self.flush();
                self.containers.pop();
                self.blank();
            }
            TagEnd::List(_) => {
                self.flush();
                self.lists.pop();
                if self.lists.is_empty() {
                    self.blank();
                }
            }
            TagEnd::Item => {
                self.flush();
                self.containers.pop();
            }
            TagEnd::Emphasis | TagEnd::Strong | TagEnd::Strikethrough | TagEnd::Link => {
                self.styles.pop();
            }
            _ => {}
        }
    }

    fn emit_code(&mut self, lang: &str, text: &str, start: usize) {
        self.code_blocks.push(text.to_string());
        let number = self.first_code + self.code_blocks.len();
        let frame = Style::default().fg(self.theme.evicted);
        let (prefix, _) = self.prefixes();
        let label = if lang.is_empty() {
            format!("╭─ [{number}] ")
        } else {
            format!("╭─ [{number}] {lang} ")
        };
        let mut header = prefix.clone();
        header.push(Span::styled(label, frame));
        self.lines.push(StyledLine::new(header));
        let mut highlighter = Highlighter::new(lang);
        let verbatim = self.src.get(start..start + text.len()) == Some(text);
        let mut offset = 0;
        let mut code_prefix = prefix.clone();
        code_prefix.push(Span::styled("│ ", frame));
        for line in text.strip_suffix('\n').unwrap_or(text).split('\n') {
            let line_start = if verbatim { start + offset } else { start };
            offset += line.len() + 1;
            let state = self.state_at(line_start);
            let line = line.replace('\t', "    ");
            let spans = highlighter
                .line(&line)
                .into_iter()
                .map(|(r, class)| {
                    let base = Style::default().fg(self.theme.code);
                    let style = match class {
                        Class::Plain => Style::default(),
                        Class::Keyword => base.add_modifier(Modifier::BOLD),
                        Class::String => Style::default().fg(self.theme.assistant),
                        Class::Number => Style::default().fg(self.theme.system),
                        Class::Comment => Style::default()
                            .fg(self.theme.evicted)
                            .add_modifier(Modifier::ITALIC),
                    };
                    Span::styled(line[r].to_string(), self.with_state(style, state))
                })
                .collect();
            self.lines.push(StyledLine {
                prefix: code_prefix.clone(),
                first_prefix: None,
                spans,
                hard: true,
            });
        }
        let mut footer = prefix;
        footer.push(Span::styled("╰─", frame));
        self.lines.push(StyledLine::new(footer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tui::wrap::wrap;

    fn plain(src: &str) -> Vec<String> {
        let r = render(src, 0, &Theme::default(), Style::default(), &[]);
        r.lines
            .iter()
            .flat_map(|l| wrap(l, 80))
            .map(|l| l.spans.iter().map(|s| s.content.as_ref()).collect())
            .collect()
    }

    #[test]
    fn blocks_lists_and_code() {
        let src = "# Title\n\nSome *text* and `code`.\n\n- one\n- two\n  1. nested\n\n```rust\nfn main() {}\n```\n> quoted";
        assert_eq!(
            plain(src),
            [
                "# Title",
                "",
                "Some text and code.",
                "",
                "• one",
                "• two",
                "  1. nested",
                "",
                "╭─ [1] rust ",
                "│ fn main() {}",
                "╰─",
                "",
                "▎ quoted",
            ]
        );
    }

    #[test]
    fn code_blocks_are_numbered_and_collected() {
        let src = "a\n```\nx = 1\n```\nb\n```py\ny\n```";
        let r = render(src, 4, &Theme::default(), Style::default(), &[]);
        assert_eq!(r.code_blocks, ["x = 1\n", "y\n"]);
        assert_eq!(crate::protocol::code_blocks(src), r.code_blocks);
        let text: String = r
            .lines
            .iter()
            .flat_map(|l| l.spans.iter().map(|s| s.content.to_string()))
            .collect();
        assert!(text.contains("[5]") && text.contains("[6] py"), "{text}");
    }

    #[test]
    fn an_unterminated_fence_still_renders_while_streaming() {
        assert_eq!(plain("```rust\nlet a"), ["╭─ [1] rust ", "│ let a", "╰─"]);
    }

    #[test]
    fn evicted_bytes_are_dimmed_exactly() {
        let theme = Theme::default();
        let src = "hello brave new world";
        let states = [(0..6, TokenState::Evicted), (6..21, TokenState::Window)];
        let r = render(src, 0, &theme, Style::default(), &states);
        let spans = &r.lines[0].spans;
        assert_eq!(spans[0].content, "hello ");
        assert_eq!(spans[0].style.fg, Some(theme.evicted));
        assert_eq!(spans[1].content, "brave new world");
        assert_eq!(spans[1].style.fg, None);
    }
}
