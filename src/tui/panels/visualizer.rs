//! The attention-window visualizer: the whole conversation as a timeline drawn as the Λ. Its
//! state is the engine's [`Timeline`] (which the status bar shares) and whether it is shown;
//! its one key (show/hide) is the chat's.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};

use crate::progress::thousands;
use crate::protocol::{Timeline, TokenState, window_start};
use crate::tui::theme::Theme;
use crate::tui::widgets::state_color;

/// Rows of the panel, borders included.
pub const ROWS: u16 = 8;

/// The panel for a server that does not say what its cache attends (one that is not a
/// lambdachat server): what is missing and why, rather than an empty Λ.
pub fn draw_unavailable(frame: &mut Frame<'_>, area: Rect, theme: &Theme, server: &str) {
    let block = Block::default()
        .borders(Borders::TOP | Borders::BOTTOM)
        .border_style(Style::default().fg(theme.evicted))
        .title(Span::styled(
            " Attention window ",
            Style::default().fg(theme.accent),
        ));
    let lines = vec![
        Line::from(format!("Not available for {server}.")),
        Line::from(Span::styled(
            "It is not a lambdachat server, so it does not say what its cache attends; \
             the chat itself works as usual. `lambdachat serve` on that machine shows the Λ here.",
            Style::default().fg(theme.evicted),
        )),
    ];
    let inner = block.inner(area);
    frame.render_widget(block, area);
    frame.render_widget(
        Paragraph::new(lines).wrap(ratatui::widgets::Wrap { trim: true }),
        inner,
    );
}

/// The Λ over the whole conversation: each row is a query position (sampled from the first
/// token to the next one), each column a span of key positions, coloured by how that query
/// sees them: the sink stripe on the left, the window as a diagonal band, evicted dots between;
/// on the last row (the next token), the blocks recall brings back.
pub fn draw(frame: &mut Frame<'_>, area: Rect, theme: &Theme, t: &Timeline, distance_limit: u64) {
    let title = format!(
        " Attention window · Λ = {} sinks + {}-token window · D = {} ",
        t.n_global,
        thousands(t.n_local),
        distance_limit
    );
    let block = Block::default()
        .borders(Borders::TOP | Borders::BOTTOM)
        .border_style(Style::default().fg(theme.evicted))
        .title(Span::styled(title, Style::default().fg(theme.accent)));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let width = inner.width.saturating_sub(1).max(1) as u64;
    // Positions 0..=next, the next token included.
    let next = t.stats.tokens_seen;
    let total = next + 1;
    // The axis spans at least the Λ's capacity: the window fills it, then slides along.
    let axis = total.max(t.n_global + t.n_local).max(width);
    let bucket = |c: u64| {
        (
            c * axis / width,
            ((c + 1) * axis / width).max(c * axis / width + 1),
        )
    };
    let mask_rows = inner.height.saturating_sub(2) as u64;
    let mut lines = Vec::new();
    for r in 0..mask_rows {
        let query = ((r + 1) * total / mask_rows.max(1)).saturating_sub(1);
        let mut spans = Vec::with_capacity(width as usize);
        for c in 0..width {
            let (a, b) = bucket(c);
            let b = b.min(total);
            let (ch, state) = if a > query {
                (' ', None)
            } else if a < t.n_global {
                ('█', Some(TokenState::Global))
            } else if b > window_start(query, t.n_local) {
                ('█', Some(TokenState::Window))
            } else if t.pinned.iter().any(|p| p.start < b && a < p.end) {
                ('█', Some(TokenState::Pinned))
            } else if query == next && t.recalled.iter().any(|p| p.start < b && a < p.end) {
                ('█', Some(TokenState::Recalled))
            } else {
                ('·', Some(TokenState::Evicted))
            };
            let style = state.map_or(Style::default(), |s| {
                Style::default().fg(state_color(theme, s))
            });
            spans.push(Span::styled(ch.to_string(), style));
        }
        lines.push(Line::from(spans));
    }
    // Message boundaries and the generation point.
    let mut marks = vec![' '; width as usize + 1];
    for m in &t.messages {
        let c = (m.tokens.start * width / axis) as usize;
        if c < marks.len() {
            marks[c] = '┆';
        }
    }
    if let Some(mark) = marks.get_mut((total * width / axis) as usize) {
        *mark = '▲';
    }
    lines.push(Line::from(Span::styled(
        marks.into_iter().collect::<String>(),
        Style::default().fg(theme.evicted),
    )));
    let s = &t.stats;
    let key = |label: &str, n: u64, state| {
        vec![
            Span::styled("■ ", Style::default().fg(state_color(theme, state))),
            Span::raw(format!("{label} {}  ", thousands(n))),
        ]
    };
    let mut legend = Vec::new();
    legend.extend(key(
        "sinks",
        s.attended_global - s.pinned,
        TokenState::Global,
    ));
    legend.extend(key("window", s.attended_window, TokenState::Window));
    legend.extend(key("pinned", s.pinned, TokenState::Pinned));
    if s.recalled > 0 {
        legend.extend(key("recalled", s.recalled, TokenState::Recalled));
    }
    legend.extend(key("evicted", s.evicted, TokenState::Evicted));
    legend.push(Span::styled(
        format!("▲ next token #{}  ┆ message start", thousands(next + 1)),
        Style::default().fg(theme.evicted),
    ));
    lines.push(Line::from(legend));
    frame.render_widget(Paragraph::new(lines), inner);
}
