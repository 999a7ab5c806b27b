//! Drawing a [`View`] on any ratatui backend; `--once` draws on the
//! `TestBackend` and prints its cells, so tests and scripts see the same frame
//! as a terminal (less the colours).

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;

use super::view::{rate_text, Connection, ReasonRow, View};

/// A fill bar `width` cells wide: "█" for the filled part, "░" for the rest.
pub fn bar(fill: f64, width: usize) -> String {
    let filled = ((fill.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    // Anything above zero shows at least one cell.
    let filled = if fill > 0.0 { filled.max(1) } else { filled };
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

const BAR_WIDTH: usize = 30;
/// Upstream (2), latency, buffer, spool, drain.
const HEADER_ROWS: u16 = 6;
/// Header, three signals, a blank line.
const TABLE_ROWS: u16 = 5;

/// Lay `view` out on the frame.
pub fn draw(frame: &mut Frame, view: &View) {
    let area = frame.area();
    let block = Block::default().borders(Borders::ALL).title(Span::styled(
        view.title.clone(),
        Style::default().add_modifier(Modifier::BOLD),
    ));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [top, table, reasons, footer] = Layout::vertical([
        Constraint::Length(HEADER_ROWS),
        Constraint::Length(TABLE_ROWS),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(inner);

    let up_style = match view.upstream_up {
        Some(true) => Style::default().fg(Color::Green),
        Some(false) => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        None => Style::default().fg(Color::Yellow),
    };
    let fill_style = |fill: f64| match fill {
        f if f >= 0.9 => Style::default().fg(Color::Red),
        f if f >= 0.5 => Style::default().fg(Color::Yellow),
        _ => Style::default().fg(Color::Green),
    };
    let header = vec![
        Line::from(vec![
            Span::raw("upstream  "),
            Span::styled(view.upstream.clone(), up_style),
        ]),
        match &view.upstream_error {
            Some(e) => Line::styled(format!("          last error: {e}"), up_style),
            None => Line::from(""),
        },
        Line::from(format!("latency   {}", view.latency)),
        Line::from(vec![
            Span::raw("buffer    "),
            Span::styled(
                bar(view.buffer_fill, BAR_WIDTH),
                fill_style(view.buffer_fill),
            ),
            Span::raw(format!(" {}", view.buffer_text)),
        ]),
        Line::from(vec![
            Span::raw("spool     "),
            Span::styled(bar(view.spool_fill, BAR_WIDTH), fill_style(view.spool_fill)),
            Span::raw(format!(" {}", view.spool_text)),
        ]),
        Line::from(format!("drain     {}", view.drain)),
    ];
    frame.render_widget(Paragraph::new(header), top);

    let mut rows = vec![Line::styled(
        format!(
            "{:<8} {:>9} {:>9} {:>11} {:>11} {:>9} {:>9} {:>8} {:>8}",
            "signal",
            "in/s",
            "out/s",
            "accepted",
            "forwarded",
            "spooled",
            "replayed",
            "refused",
            "dropped"
        ),
        Style::default().add_modifier(Modifier::BOLD | Modifier::UNDERLINED),
    )];
    let r = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), rate_text);
    for s in &view.signals {
        rows.push(Line::from(format!(
            "{:<8} {:>9} {:>9} {:>11} {:>11} {:>9} {:>9} {:>8} {:>8}",
            s.signal,
            r(s.in_rate),
            r(s.out_rate),
            s.accepted,
            s.forwarded,
            s.spooled,
            s.replayed,
            s.refused,
            s.dropped
        )));
    }
    frame.render_widget(Paragraph::new(rows), table);

    let mut lines = Vec::new();
    for (title, unit, list) in [
        ("refused", "requests", &view.refusals),
        ("dropped", "items", &view.drops),
    ] {
        if list.is_empty() {
            lines.push(Line::from(format!("{title}: none")));
            continue;
        }
        lines.push(Line::from(format!("{title} ({unit}):")));
        for row in list {
            lines.push(Line::styled(
                format!(
                    "  {:<8} {:<22} {:>10} total  {:>9}/s",
                    row.signal,
                    row.reason,
                    row.total,
                    r(row.rate)
                ),
                Style::default().fg(Color::Yellow),
            ));
        }
    }
    frame.render_widget(Paragraph::new(lines), reasons);

    let (state, style) = match &view.connection {
        Connection::Live => ("live".to_owned(), Style::default().fg(Color::Green)),
        Connection::Connecting => ("connecting…".to_owned(), Style::default().fg(Color::Yellow)),
        Connection::Lost(why) => (
            format!("CONNECTION LOST (retrying every second): {why}"),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
    };
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(state, style),
            Span::raw(format!(
                " · refresh {} · q quits",
                humantime::format_duration(view.interval)
            )),
        ])),
        footer,
    );
}

/// The rows the view needs at most (so `--once` prints no empty tail).
pub fn height(view: &View) -> u16 {
    let reasons = |l: &Vec<ReasonRow>| l.len().max(1) + usize::from(!l.is_empty());
    let rows = 2
        + usize::from(HEADER_ROWS + TABLE_ROWS)
        + reasons(&view.refusals)
        + reasons(&view.drops)
        + 1;
    u16::try_from(rows).unwrap_or(u16::MAX)
}

/// Screen width `--once` renders at.
pub const TEXT_WIDTH: u16 = 110;

/// `view` as plain text lines (no colours), as `top --once` prints it.
pub fn text(view: &View) -> String {
    let backend = ratatui::backend::TestBackend::new(TEXT_WIDTH, height(view));
    // The test backend cannot fail: its error type is `Infallible`.
    let Ok(mut terminal) = ratatui::Terminal::new(backend);
    let Ok(_) = terminal.draw(|f| draw(f, view));
    buffer_text(terminal.backend().buffer())
}

/// A buffer's symbols, one line per row, trailing spaces trimmed.
pub fn buffer_text(buffer: &ratatui::buffer::Buffer) -> String {
    let area = buffer.area;
    let mut out = String::new();
    for y in area.top()..area.bottom() {
        let mut line = String::new();
        for x in area.left()..area.right() {
            if let Some(cell) = buffer.cell((x, y)) {
                line.push_str(cell.symbol());
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
