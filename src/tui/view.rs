//! Drawing. Views read the [`App`] and draw; they never change what the user sees the state to
//! be (the conversation's row cache and "reached the top" flag are the only things they touch).

use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

use super::app::{App, Generation, Overlay, Phase};
use super::commands::{COMMANDS, complete};
use super::keymap::{INSPECT_KEYS, SESSION_KEYS};
use super::wrap::str_width;
use crate::progress::thousands;
use crate::protocol::{Role, TokenState};

/// Smallest terminal the layout fits in.
pub const MIN_SIZE: (u16, u16) = (40, 12);
/// Rows of the visualizer panel, borders included.
const VISUALIZER_ROWS: u16 = 8;
const INSPECT_ROWS: u16 = 7;
/// Most rows the input box grows to.
const INPUT_MAX_ROWS: usize = 8;

pub fn draw(frame: &mut Frame<'_>, app: &App) {
    let area = frame.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        let text = vec![
            Line::from("The terminal is too small for lambdachat."),
            Line::from(format!(
                "It needs {}×{}; it is {}×{}.",
                MIN_SIZE.0, MIN_SIZE.1, area.width, area.height
            )),
        ];
        let y = area.height.saturating_sub(4) / 2;
        let rect = Rect::new(area.x, area.y + y, area.width, 4.min(area.height - y));
        frame.render_widget(
            Paragraph::new(text)
                .alignment(Alignment::Center)
                .wrap(Wrap { trim: true }),
            rect,
        );
        return;
    }
    let input_rows = app
        .input
        .height(area.width.saturating_sub(2) as usize, INPUT_MAX_ROWS) as u16;
    let visualizer = if app.visualizer { VISUALIZER_ROWS } else { 0 };
    let inspect = if app.inspect.is_some() {
        INSPECT_ROWS
    } else {
        0
    };
    let [title, body, vis, insp, input, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(visualizer),
        Constraint::Length(inspect),
        Constraint::Length(input_rows + 1),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_title(frame, app, title);
    match &app.phase {
        Phase::Ready => draw_conversation(frame, app, body),
        Phase::Loading(what) => centered_text(
            frame,
            body,
            vec![Line::from(Span::styled(
                what.clone(),
                Style::default().fg(app.theme.accent),
            ))],
        ),
        Phase::Failed { reason, hint } => centered_text(
            frame,
            body,
            vec![
                Line::from(Span::styled(
                    "The model could not be loaded",
                    Style::default()
                        .fg(app.theme.error)
                        .add_modifier(Modifier::BOLD),
                )),
                Line::from(""),
                Line::from(reason.clone()),
                Line::from(""),
                Line::from(Span::styled(
                    hint.clone(),
                    Style::default().fg(app.theme.accent),
                )),
                Line::from(""),
                Line::from(format!(
                    "Press {} to quit.",
                    app.keymap.keys_of(super::keymap::Action::Quit).join(" or ")
                )),
            ],
        ),
    }
    if app.visualizer {
        draw_visualizer(frame, app, vis);
    }
    if app.inspect.is_some() {
        draw_inspect(frame, app, insp);
    }
    draw_input(frame, app, input);
    draw_status(frame, app, status);
    draw_completion(frame, app, input);
    match &app.overlay {
        Some(Overlay::Help) => draw_help(frame, app, area),
        Some(Overlay::Sessions(_)) => draw_sessions(frame, app, area),
        None => {}
    }
}

fn centered_text(frame: &mut Frame<'_>, area: Rect, lines: Vec<Line<'static>>) {
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

fn draw_title(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let accent = Style::default()
        .fg(app.theme.accent)
        .add_modifier(Modifier::BOLD);
    let dim = Style::default().fg(app.theme.evicted);
    let help = format!(
        "{} help",
        app.keymap.keys_of(super::keymap::Action::Help).join("/")
    );
    let mut spans = vec![Span::styled(" λ lambdachat", accent)];
    if !app.model.is_empty() {
        spans.push(Span::styled(" · ", dim));
        spans.push(Span::raw(app.model.clone()));
    }
    spans.push(Span::styled(" · ", dim));
    spans.push(Span::styled(
        app.title.clone(),
        Style::default().add_modifier(Modifier::ITALIC),
    ));
    let left = str_width(&spans.iter().map(|s| s.content.as_ref()).collect::<String>());
    // The help hint goes first when the line is short of room.
    if left + str_width(&help) + 2 <= area.width as usize {
        let pad = area.width as usize - left - str_width(&help) - 1;
        spans.push(Span::raw(" ".repeat(pad)));
        spans.push(Span::styled(help, dim));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_conversation(frame: &mut Frame<'_>, app: &App, area: Rect) {
    if app.conversation.messages.is_empty() {
        let (g, l) = app
            .settings
            .as_ref()
            .map_or((0, 0), |s| (s.params.n_global, s.params.n_local));
        let lines = vec![
            Line::from(Span::styled(
                "Chat for as long as you like.",
                Style::default()
                    .fg(app.theme.accent)
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
                "Type a message and press Enter · / for commands · ? for help",
                Style::default().fg(app.theme.evicted),
            )),
        ];
        return centered_text(frame, area, lines);
    }
    let lines = app
        .conversation
        .visible(area.width, area.height as usize, &app.theme);
    frame.render_widget(Paragraph::new(lines), area);
    if app.conversation.scroll > 0 {
        let label = " ↓ more below (ctrl+end) ";
        let w = str_width(label) as u16;
        if area.width > w {
            let rect = Rect::new(area.x + area.width - w, area.y + area.height - 1, w, 1);
            frame.render_widget(
                Paragraph::new(Span::styled(
                    label,
                    Style::default().fg(Color::Black).bg(app.theme.accent),
                )),
                rect,
            );
        }
    }
}

fn state_color(app: &App, state: TokenState) -> Color {
    match state {
        TokenState::Global => app.theme.global,
        TokenState::Pinned => app.theme.pinned,
        TokenState::Window => app.theme.window,
        TokenState::Evicted => app.theme.evicted,
    }
}

/// The Λ over the whole conversation: each row is a query position (sampled from the first
/// token to the next one), each column a span of key positions, coloured by how that query
/// sees them: the sink stripe on the left, the window as a diagonal band, evicted dots between.
fn draw_visualizer(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let t = &app.timeline;
    let title = format!(
        " Attention window · Λ = {} sinks + {}-token window · D = {} ",
        t.n_global,
        thousands(t.n_local),
        app.settings.as_ref().map_or(0, |s| s.params.distance_limit)
    );
    let block = Block::default()
        .borders(Borders::TOP | Borders::BOTTOM)
        .border_style(Style::default().fg(app.theme.evicted))
        .title(Span::styled(title, Style::default().fg(app.theme.accent)));
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
            } else if b + t.n_local > query + 1 {
                ('█', Some(TokenState::Window))
            } else if t.pinned.iter().any(|p| p.start < b && a < p.end) {
                ('█', Some(TokenState::Pinned))
            } else {
                ('·', Some(TokenState::Evicted))
            };
            let style = state.map_or(Style::default(), |s| {
                Style::default().fg(state_color(app, s))
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
        Style::default().fg(app.theme.evicted),
    )));
    let s = &t.stats;
    let key = |label: &str, n: u64, state| {
        vec![
            Span::styled("■ ", Style::default().fg(state_color(app, state))),
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
    legend.extend(key("evicted", s.evicted, TokenState::Evicted));
    legend.push(Span::styled(
        format!("▲ next token #{}  ┆ message start", thousands(next + 1)),
        Style::default().fg(app.theme.evicted),
    ));
    lines.push(Line::from(legend));
    frame.render_widget(Paragraph::new(lines), inner);
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

fn draw_inspect(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let Some(inspect) = &app.inspect else { return };
    let role = app
        .conversation
        .messages
        .get(inspect.message)
        .map_or("", |m| match m.role {
            Role::User => "you",
            Role::Assistant => "assistant",
            Role::System => "system",
        });
    let count = inspect.view.as_ref().map_or(0, |v| v.tokens.len());
    let title = format!(
        " Inspect · message #{} ({role}) · token {}/{} ",
        inspect.message + 1,
        (inspect.cursor + 1).min(count),
        count
    );
    let block = Block::default()
        .borders(Borders::TOP | Borders::BOTTOM)
        .border_style(Style::default().fg(app.theme.accent))
        .title(Span::styled(title, Style::default().fg(app.theme.accent)));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(view) = &inspect.view else {
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
    let cursor = inspect.cursor.min(view.tokens.len() - 1);
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
                .fg(app.theme.evicted)
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
        / app
            .timeline
            .stats
            .attended_global
            .saturating_add(app.timeline.stats.attended_window + 1)
            .max(1) as f32;
    let state = match tok.state {
        TokenState::Global => "sink (global)",
        TokenState::Pinned => "pinned",
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
        Span::styled(state, Style::default().fg(state_color(app, tok.state))),
        Span::raw(format!(
            " · attention {:.2}% ({:.1}× mean)",
            tok.share * 100.0,
            tok.share / mean
        )),
    ]));
    let keys: Vec<String> = INSPECT_KEYS
        .iter()
        .map(|(k, what)| format!("{k} {what}"))
        .collect();
    lines.push(Line::from(Span::styled(
        keys.join(" · "),
        Style::default().fg(app.theme.evicted),
    )));
    frame.render_widget(Paragraph::new(lines), inner);
}

fn draw_input(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let hint = if app.generation.is_some() {
        " replying… (esc stops; you can type the next message) "
    } else {
        " message · enter sends · alt+enter new line "
    };
    let block = Block::default()
        .borders(Borders::TOP)
        .border_style(Style::default().fg(app.theme.accent))
        .title(Span::styled(hint, Style::default().fg(app.theme.evicted)));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let text_area = Rect::new(
        inner.x + 1,
        inner.y,
        inner.width.saturating_sub(2),
        inner.height,
    );
    let (rows, (x, y)) = app
        .input
        .layout(text_area.width as usize, text_area.height as usize);
    let lines: Vec<Line<'static>> = rows.into_iter().map(Line::from).collect();
    frame.render_widget(Paragraph::new(lines), text_area);
    if app.overlay.is_none() && app.inspect.is_none() && !app.quitting {
        frame.set_cursor_position((text_area.x + x, text_area.y + y));
    }
}

fn draw_status(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let dim = Style::default().fg(app.theme.evicted);
    let sep = || Span::styled(" │ ", dim);
    let s = &app.timeline.stats;
    let mut spans = vec![];
    match &app.generation {
        Some(Generation {
            prefill: Some((done, total)),
            streaming: false,
            ..
        }) => spans.push(Span::styled(
            format!(
                " reading prompt {}% ({}/{})",
                done * 100 / (*total).max(1),
                thousands(*done as u64),
                thousands(*total as u64)
            ),
            Style::default().fg(app.theme.accent),
        )),
        Some(g) => spans.push(Span::styled(
            format!(" replying · {} tok · {:.1} tok/s", g.generated, g.tok_s),
            Style::default().fg(app.theme.assistant),
        )),
        None => spans.push(Span::styled(
            match app.last_tok_s {
                Some(t) => format!(" ready · last {t:.1} tok/s"),
                None => " ready".to_string(),
            },
            dim,
        )),
    }
    // The notice comes right after the state: on a narrow terminal the counters are cut, not it.
    if let Some(n) = &app.notice {
        let style = if n.error {
            Style::default()
                .fg(app.theme.error)
                .add_modifier(Modifier::BOLD)
        } else {
            Style::default().fg(app.theme.accent)
        };
        spans.extend([sep(), Span::styled(n.text.clone(), style)]);
    }
    let capacity = app
        .settings
        .as_ref()
        .map_or(0, |s| (s.params.n_global + s.params.n_local) as u64);
    spans.extend([
        sep(),
        Span::raw(format!("{} tokens", thousands(s.tokens_seen))),
        sep(),
        Span::styled("attending ", dim),
        Span::raw(format!(
            "{}+{} / {}",
            thousands(s.attended_global),
            thousands(s.attended_window),
            thousands(capacity)
        )),
        sep(),
        Span::styled("evicted ", dim),
        Span::raw(thousands(s.evicted)),
    ]);
    if s.pinned > 0 {
        spans.extend([
            sep(),
            Span::styled(
                format!("pinned {}", thousands(s.pinned)),
                Style::default().fg(app.theme.pinned),
            ),
        ]);
    }
    spans.extend([
        sep(),
        Span::raw(format!("KV {:.1} MiB", s.bytes as f64 / (1 << 20) as f64)),
    ]);
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_completion(frame: &mut Frame<'_>, app: &App, input: Rect) {
    if app.overlay.is_some() {
        return;
    }
    let items = complete(app.input.text());
    if items.is_empty() || items.len() == 1 && items[0].0.trim_end() == app.input.text().trim_end()
    {
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
                Span::styled(name.clone(), style.fg(app.theme.accent)),
                Span::styled(format!("  {what}"), Style::default().fg(app.theme.evicted)),
            ])
        })
        .collect();
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::bordered()
                .title(" tab completes ")
                .border_style(Style::default().fg(app.theme.evicted)),
        ),
        rect,
    );
}

fn popup(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width.saturating_sub(2));
    let h = height.min(area.height.saturating_sub(2));
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn draw_help(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let key_style = Style::default()
        .fg(app.theme.accent)
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
    for (k, what) in app.keymap.help() {
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
    for (k, what) in INSPECT_KEYS {
        more.push(row(k.to_string(), what, 14));
    }
    more.push(Line::from(""));
    more.push(head("Session list"));
    let session_keys: Vec<String> = SESSION_KEYS
        .iter()
        .map(|(k, w)| format!("{k} {w}"))
        .collect();
    more.push(Line::from(session_keys.join(" · ")));
    let two_columns = area.width >= 110;
    let rows = if two_columns {
        // One more for the session keys' line, which wraps.
        keys.len().max(more.len() + 1)
    } else {
        keys.len() + more.len() + 1
    };
    let rect = popup(area, if two_columns { 124 } else { 78 }, rows as u16 + 2);
    frame.render_widget(Clear, rect);
    let block = Block::bordered()
        .title(" Help · any key closes ")
        .border_style(Style::default().fg(app.theme.accent));
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
        frame.render_widget(Paragraph::new(keys), inner);
    }
}

fn draw_sessions(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let Some(Overlay::Sessions(list)) = &app.overlay else {
        return;
    };
    let rect = popup(area, 80, (list.items.len() as u16 + 5).clamp(8, 24));
    let mut lines = Vec::new();
    if list.items.is_empty() {
        lines.push(Line::from(Span::styled(
            "No saved conversations yet.",
            Style::default().fg(app.theme.evicted),
        )));
    }
    let visible = rect.height.saturating_sub(5) as usize;
    let first = list.selected.saturating_sub(visible.saturating_sub(1));
    for (i, s) in list.items.iter().enumerate().skip(first).take(visible) {
        let selected = i == list.selected;
        let current = Some(s.id) == app.session_id;
        let title = match (&list.renaming, selected) {
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
        let head = format!("{} {title}", if current { "●" } else { " " });
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
            Span::styled(detail, Style::default().fg(app.theme.evicted)),
        ]));
    }
    lines.push(Line::from(""));
    let footer = if list.confirm_delete {
        Span::styled(
            "press d again to delete this conversation",
            Style::default().fg(app.theme.error),
        )
    } else if list.renaming.is_some() {
        Span::styled(
            "enter saves the new title · esc cancels",
            Style::default().fg(app.theme.evicted),
        )
    } else {
        let keys: Vec<String> = SESSION_KEYS
            .iter()
            .map(|(k, what)| format!("{k} {what}"))
            .collect();
        Span::styled(keys.join(" · "), Style::default().fg(app.theme.evicted))
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
                .border_style(Style::default().fg(app.theme.accent)),
        ),
        rect,
    );
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
    fn numbers_and_heat() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(heat(0.0), Color::Rgb(40, 40, 120));
        assert_eq!(heat(1.0), Color::Rgb(240, 50, 40));
        assert_eq!(token_label(" a\n"), "·a⏎");
        assert_eq!(token_label(""), "∅");
        assert_eq!(age(5), "just now");
        assert_eq!(age(125), "2 min ago");
        assert_eq!(age(7300), "2 h ago");
        assert_eq!(age(3 * 86_400), "3 days ago");
    }
}
