//! Model output on its way to a terminal: escape sequences and control characters removed, so
//! a model cannot move the cursor, retitle the window, rewrite the clipboard (OSC 52) or hide
//! text. Piped output is passed through untouched (it is data then, and may need them).

use std::io::{IsTerminal, StdoutLock, Write};

/// Where a streamed reply goes: stdout, cleaned when stdout is a terminal.
pub struct ReplyOut {
    out: StdoutLock<'static>,
    clean: Option<TerminalText>,
}

impl ReplyOut {
    pub fn stdout() -> Self {
        let out = std::io::stdout();
        let clean = out.is_terminal().then(TerminalText::default);
        Self {
            out: out.lock(),
            clean,
        }
    }

    /// Writes a piece of the reply now (a closed pipe is not an error worth stopping for).
    pub fn write(&mut self, text: &str) {
        let _ = match &mut self.clean {
            Some(c) => self.out.write_all(c.clean(text).as_bytes()),
            None => self.out.write_all(text.as_bytes()),
        };
        let _ = self.out.flush();
    }
}

/// Removes terminal control from streamed text. Keeps state between pieces, since a sequence
/// can be split across tokens.
#[derive(Debug, Default)]
pub struct TerminalText {
    state: State,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Text,
    /// After ESC.
    Escape,
    /// In a control sequence (`ESC [` or CSI), up to its final byte.
    Csi,
    /// In a string (`ESC ]` OSC, `ESC P` DCS, `ESC _`, `ESC ^`, `ESC X`), up to BEL or ST.
    Str,
    /// In a string, after an ESC (ST is `ESC \`).
    StrEscape,
}

impl TerminalText {
    /// What of `piece` may reach a terminal: text, newlines and tabs.
    pub fn clean(&mut self, piece: &str) -> String {
        let mut out = String::with_capacity(piece.len());
        for c in piece.chars() {
            self.state = match (self.state, c) {
                (State::Text, '\u{1b}') => State::Escape,
                (State::Text, '\u{9b}') => State::Csi,
                (State::Text, '\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}') => State::Str,
                (State::Text, '\n' | '\t') => {
                    out.push(c);
                    State::Text
                }
                (State::Text, c) if c.is_control() => State::Text,
                (State::Text, c) => {
                    out.push(c);
                    State::Text
                }
                (State::Escape, '[') => State::Csi,
                (State::Escape, ']' | 'P' | '_' | '^' | 'X') => State::Str,
                // Two-character sequences (`ESC 7`, `ESC c`…): dropped whole.
                (State::Escape, _) => State::Text,
                (State::Csi, '\u{40}'..='\u{7e}') => State::Text,
                (State::Csi, _) => State::Csi,
                (State::Str, '\u{7}' | '\u{9c}') => State::Text,
                (State::Str, '\u{1b}') => State::StrEscape,
                (State::Str, _) => State::Str,
                (State::StrEscape, '\\') => State::Text,
                (State::StrEscape, _) => State::Str,
            };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean_all(pieces: &[&str]) -> String {
        let mut t = TerminalText::default();
        pieces.iter().map(|p| t.clean(p)).collect()
    }

    #[test]
    fn escape_sequences_and_controls_are_removed_even_split_across_pieces() {
        assert_eq!(
            clean_all(&["plain text\n\tindented"]),
            "plain text\n\tindented"
        );
        assert_eq!(clean_all(&["\u{1b}[31mred\u{1b}[0m"]), "red");
        assert_eq!(clean_all(&["a\u{1b}", "[2", "J", "b"]), "ab");
        // OSC 52 (write the clipboard) and a window title, ended by BEL and by ST.
        assert_eq!(clean_all(&["x\u{1b}]52;c;ZXZpbA==\u{7}y"]), "xy");
        assert_eq!(clean_all(&["\u{1b}]0;pwned", "\u{1b}\\", "ok"]), "ok");
        assert_eq!(
            clean_all(&["bell\u{7} back\u{8}space\r del\u{7f}"]),
            "bell backspace del"
        );
        assert_eq!(clean_all(&["c1\u{9b}1;1Hcsi"]), "c1csi");
        assert_eq!(clean_all(&["日本語 🦀"]), "日本語 🦀");
    }
}
