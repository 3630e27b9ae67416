//! Progress of a long evaluation on stderr: done/total, rate and ETA. Redrawn in place on a
//! terminal (at most twice a second); one line every 30 s when stderr is a file or a pipe, so a
//! log of an hour-long run stays readable.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::progress::thousands;

pub struct Meter {
    label: String,
    unit: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    last_draw: Option<Instant>,
    terminal: bool,
    quiet: bool,
}

impl Meter {
    /// A meter for `total` units (`unit`: "tokens", "trials") of work named `label`.
    pub fn new(label: impl Into<String>, total: u64, unit: &'static str) -> Self {
        Self {
            label: label.into(),
            unit,
            total,
            done: 0,
            start: Instant::now(),
            last_draw: None,
            terminal: std::io::stderr().is_terminal(),
            quiet: false,
        }
    }

    /// A meter that draws nothing (tests, `--quiet`).
    pub fn silent(mut self) -> Self {
        self.quiet = true;
        self
    }

    /// Renames the work in progress (the next mode of a run), keeping the totals.
    pub fn relabel(&mut self, label: impl Into<String>) {
        self.label = label.into();
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records `n` more units done and redraws when due.
    pub fn advance(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        let every = if self.terminal {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(30)
        };
        if self.last_draw.is_none_or(|t| t.elapsed() >= every) {
            self.draw();
        }
    }

    /// Draws the final state and ends the line.
    pub fn finish(&mut self) {
        self.draw();
        if self.terminal && !self.quiet {
            eprintln!();
        }
    }

    fn draw(&mut self) {
        self.last_draw = Some(Instant::now());
        if self.quiet {
            return;
        }
        let line = self.line();
        if self.terminal {
            eprint!("\r{line}\x1b[K");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }

    /// "ppl lambda  12,288/49,152 tokens  25%  105.3 tokens/s  ETA 5m50s".
    pub fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let rate = self.done as f64 / secs.max(1e-9);
        let percent = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let eta = if self.done == 0 {
            "--".to_string()
        } else {
            duration_text((self.total - self.done) as f64 / rate)
        };
        format!(
            "{}  {}/{} {}  {percent}%  {rate:.1} {}/s  elapsed {}  ETA {eta}",
            self.label,
            thousands(self.done),
            thousands(self.total),
            self.unit,
            self.unit,
            duration_text(secs)
        )
    }
}

/// `1h02m`, `5m50s`, `42s`.
pub fn duration_text(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(duration_text(42.4), "42s");
        assert_eq!(duration_text(350.0), "5m50s");
        assert_eq!(duration_text(3720.0), "1h02m");
    }

    #[test]
    fn line_shows_progress_and_an_eta() {
        let mut m = Meter::new("ppl lambda", 1000, "tokens").silent();
        assert!(m.line().contains("ETA --"));
        m.advance(250);
        let line = m.line();
        assert!(
            line.starts_with("ppl lambda  250/1,000 tokens  25%"),
            "{line}"
        );
        assert!(!line.contains("ETA --"), "{line}");
        m.advance(10_000);
        assert!(m.line().contains("1,000/1,000 tokens  100%"));
    }
}
