//! Progress of long set-up steps (model downloads). The command-line tools print it on stderr;
//! the chat shows it on its loading screen, because there the terminal belongs to the TUI and
//! a stray line on stderr would be drawn over it.

use std::io::Write;

pub trait Progress: Sync {
    /// A one-line message ("fetching X", "model stored at Y").
    fn note(&self, text: &str);

    /// `done` of `total` bytes of `file` are downloaded.
    fn bytes(&self, file: &str, done: u64, total: u64);
}

/// Progress on stderr, the download line redrawn in place.
pub struct Stderr;

impl Progress for Stderr {
    fn note(&self, text: &str) {
        eprintln!("lambdachat: {text}");
    }

    fn bytes(&self, file: &str, done: u64, total: u64) {
        eprint!("\r{}", download_line(file, done, total));
        if done >= total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

/// "downloading FILE  12.3/45.6 MB  27%".
pub fn download_line(file: &str, done: u64, total: u64) -> String {
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    format!(
        "downloading {file}  {:.1}/{:.1} MB  {percent:>3}%",
        done as f64 / 1e6,
        total as f64 / 1e6
    )
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
