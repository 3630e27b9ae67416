//! Drawing: the layout of the screen (title, conversation, visualizer, inspect, input, status
//! bar, overlays), each panel drawn by its own module. Views read the [`App`] and draw; they never
//! change what the user sees the state to be (the conversation's row cache and "reached the top"
//! flag are the only things they touch).

use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Wrap};

use super::app::{App, Generation, Overlay, Phase};
use super::keymap::Action;
use super::panels::{help, input, inspect, visualizer};
use super::widgets::centered_text;
use super::wrap::str_width;
use crate::progress::thousands;

/// Smallest terminal the layout fits in.
pub const MIN_SIZE: (u16, u16) = (40, 12);

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
    let theme = &app.theme;
    let visualizer_rows = if app.visualizer { visualizer::ROWS } else { 0 };
    let inspect_rows = if app.inspect.is_some() {
        inspect::ROWS
    } else {
        0
    };
    let [title, body, vis, insp, input_area, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(visualizer_rows),
        Constraint::Length(inspect_rows),
        Constraint::Length(input::height(&app.input, area.width)),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_title(frame, app, title);
    let params = app.settings.as_ref().map(|s| s.params);
    match &app.phase {
        Phase::Ready => app
            .conversation
            .draw(frame, body, theme, &app.keymap, params),
        Phase::Loading(what) => centered_text(
            frame,
            body,
            vec![Line::from(Span::styled(
                what.clone(),
                Style::default().fg(theme.accent),
            ))],
        ),
        Phase::Failed { reason, hint } => centered_text(
            frame,
            body,
            vec![
                Line::from(Span::styled(
                    "The model could not be loaded",
                    Style::default()
                        .fg(theme.error)
                        .add_modifier(Modifier::BOLD),
                )),
                Line::from(""),
                Line::from(reason.clone()),
                Line::from(""),
                Line::from(Span::styled(
                    hint.clone(),
                    Style::default().fg(theme.accent),
                )),
                Line::from(""),
                Line::from(format!(
                    "Press {} to quit.",
                    app.keymap.keys_of(Action::Quit).join(" or ")
                )),
            ],
        ),
    }
    if app.visualizer {
        match app.settings.as_ref() {
            Some(s) if !s.attention_view => {
                let server = s.server.as_deref().unwrap_or("this server");
                visualizer::draw_unavailable(frame, vis, theme, server);
            }
            _ => {
                let distance_limit = params.map_or(0, |p| p.distance_limit);
                visualizer::draw(frame, vis, theme, &app.timeline, distance_limit);
            }
        }
    }
    if let Some(i) = &app.inspect {
        let role = app.conversation.get(i.message).map(|m| m.role);
        i.draw(frame, insp, (theme, &app.keymap), role, &app.timeline.stats);
    }
    let look = input::InputLook {
        theme,
        keymap: &app.keymap,
        replying: app.generation.is_some(),
        replacing: app.replacing,
        focused: app.overlay.is_none() && app.inspect.is_none() && !app.quitting,
    };
    input::draw(frame, input_area, &app.input, look);
    draw_status(frame, app, status);
    if app.overlay.is_none() {
        input::draw_completion(frame, input_area, &app.input, theme, &app.keymap);
    }
    match &app.overlay {
        Some(Overlay::Help) => help::draw(frame, area, theme, &app.keymap),
        Some(Overlay::Sessions(list)) => {
            list.draw(frame, area, (theme, &app.keymap), app.session_id)
        }
        None => {}
    }
}

fn draw_title(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let accent = Style::default()
        .fg(app.theme.accent)
        .add_modifier(Modifier::BOLD);
    let dim = Style::default().fg(app.theme.evicted);
    let help = format!("{} help", app.keymap.keys_of(Action::Help).join("/"));
    let mut spans = vec![Span::styled(" λ lambdachat", accent)];
    if !app.model.is_empty() {
        spans.push(Span::styled(" · ", dim));
        spans.push(Span::raw(app.model.clone()));
    }
    if let Some(server) = app.settings.as_ref().and_then(|s| s.server.as_deref()) {
        spans.push(Span::styled(" @ ", dim));
        spans.push(Span::raw(server.to_string()));
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
        // "ready" only once a message can be sent: while the model loads, Enter keeps the text.
        None => spans.push(Span::styled(
            match (&app.phase, app.last_tok_s) {
                (Phase::Loading(_), _) => " loading".to_string(),
                (Phase::Failed { .. }, _) => " no model".to_string(),
                (Phase::Ready, Some(t)) => format!(" ready · last {t:.1} tok/s"),
                (Phase::Ready, None) => " ready".to_string(),
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
    // A server that is not lambdachat's says nothing of its cache.
    if app.settings.as_ref().is_some_and(|s| !s.attention_view) {
        frame.render_widget(Paragraph::new(Line::from(spans)), area);
        return;
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
    // Said even when 0: nothing scored well enough, so nothing is remembered.
    if app.settings.as_ref().is_some_and(|s| s.recall.is_some()) {
        spans.extend([
            sep(),
            Span::styled("recalled ", dim),
            Span::raw(thousands(s.recalled)),
        ]);
    }
    if s.pinned > 0 {
        spans.extend([
            sep(),
            Span::styled(
                format!("pinned {}", thousands(s.pinned)),
                Style::default().fg(app.theme.pinned),
            ),
        ]);
    }
    if app.settings.as_ref().is_some_and(|s| s.raw) {
        spans.extend([sep(), Span::styled("raw", dim)]);
    }
    let kv_type = app.settings.as_ref().map(|s| s.kv_type.name());
    spans.extend([
        sep(),
        Span::raw(format!("KV {:.1} MiB", s.bytes as f64 / (1 << 20) as f64)),
    ]);
    if let Some(name) = kv_type {
        spans.extend([Span::raw(" "), Span::styled(name, dim)]);
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
