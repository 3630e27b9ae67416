//! Key bindings: every action, its config name, what it does and its default keys. The help
//! overlay is generated from this table, and `[keymap]` in the config file rebinds any action.
//!
//! Printable keys (`?`) bound to an action only act when the input is empty, so they can still
//! be typed in a message.

use std::collections::HashMap;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::config::{Config, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Send,
    Newline,
    Stop,
    Quit,
    Help,
    Visualizer,
    Inspect,
    Sessions,
    Regenerate,
    Complete,
    HistoryPrev,
    HistoryNext,
    ScrollUp,
    ScrollDown,
    PageUp,
    PageDown,
    Top,
    Bottom,
}

/// `(action, config name, description, default keys)`, in the order help shows them.
pub const ACTIONS: &[(Action, &str, &str, &[&str])] = &[
    (Action::Send, "send", "send the message", &["enter"]),
    (
        Action::Newline,
        "newline",
        "new line in the message",
        &["alt+enter", "ctrl+j"],
    ),
    (
        Action::Stop,
        "stop",
        "stop the reply / close a panel",
        &["esc"],
    ),
    (Action::Quit, "quit", "save and quit", &["ctrl+q", "ctrl+c"]),
    (Action::Help, "help", "this help", &["?", "f1"]),
    (
        Action::Visualizer,
        "visualizer",
        "show/hide the attention window",
        &["ctrl+t", "f2"],
    ),
    (
        Action::Inspect,
        "inspect",
        "inspect tokens of a message",
        &["ctrl+o", "f3"],
    ),
    (Action::Sessions, "sessions", "saved conversations", &["f4"]),
    (
        Action::Regenerate,
        "regenerate",
        "new reply to the last message",
        &["ctrl+r"],
    ),
    (
        Action::Complete,
        "complete",
        "complete a /command",
        &["tab"],
    ),
    (
        Action::HistoryPrev,
        "history_prev",
        "previous sent message",
        &["up"],
    ),
    (
        Action::HistoryNext,
        "history_next",
        "next sent message",
        &["down"],
    ),
    (
        Action::ScrollUp,
        "scroll_up",
        "scroll up",
        &["ctrl+up", "shift+up"],
    ),
    (
        Action::ScrollDown,
        "scroll_down",
        "scroll down",
        &["ctrl+down", "shift+down"],
    ),
    (Action::PageUp, "page_up", "page up", &["pageup"]),
    (Action::PageDown, "page_down", "page down", &["pagedown"]),
    (Action::Top, "top", "first message", &["ctrl+home"]),
    (
        Action::Bottom,
        "bottom",
        "last message (follow the reply)",
        &["ctrl+end"],
    ),
];

/// Keys of the inspect mode and the session list (fixed; shown in help and in their panels).
pub const INSPECT_KEYS: &[(&str, &str)] = &[
    ("left/right", "previous/next token"),
    ("up/down", "previous/next message"),
    ("home/end", "first/last token"),
    ("esc", "leave inspect mode"),
];

pub const SESSION_KEYS: &[(&str, &str)] = &[
    ("up/down", "select"),
    ("enter", "open"),
    ("r", "rename"),
    ("d", "delete"),
    ("n", "new conversation"),
    ("esc", "close"),
];

/// A key with its modifiers, normalized (a typed `?` carries no SHIFT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub code: KeyCode,
    pub modifiers: KeyModifiers,
}

impl Key {
    pub fn from_event(e: &KeyEvent) -> Self {
        let mut modifiers =
            e.modifiers & (KeyModifiers::CONTROL | KeyModifiers::ALT | KeyModifiers::SHIFT);
        let code = match e.code {
            KeyCode::Char(c) => {
                modifiers -= KeyModifiers::SHIFT;
                KeyCode::Char(if modifiers.contains(KeyModifiers::CONTROL) {
                    c.to_ascii_lowercase()
                } else {
                    c
                })
            }
            KeyCode::BackTab => {
                modifiers -= KeyModifiers::SHIFT;
                KeyCode::BackTab
            }
            other => other,
        };
        Self { code, modifiers }
    }

    /// Whether this key types a character (bindings on such keys apply to an empty input only).
    pub fn is_printable(&self) -> bool {
        matches!(self.code, KeyCode::Char(_)) && (self.modifiers - KeyModifiers::SHIFT).is_empty()
    }
}

/// Parses `"ctrl+alt+enter"`, `"?"`, `"f2"`, `"pageup"`…
pub fn parse_key(spec: &str) -> Result<Key, String> {
    let spec = spec.trim();
    let mut modifiers = KeyModifiers::NONE;
    let mut rest = spec;
    loop {
        let lower = rest.to_ascii_lowercase();
        let (m, len) = if lower.starts_with("ctrl+") {
            (KeyModifiers::CONTROL, 5)
        } else if lower.starts_with("alt+") {
            (KeyModifiers::ALT, 4)
        } else if lower.starts_with("shift+") {
            (KeyModifiers::SHIFT, 6)
        } else {
            break;
        };
        modifiers |= m;
        rest = &rest[len..];
    }
    let name = rest.to_ascii_lowercase();
    let code = match name.as_str() {
        "enter" | "return" => KeyCode::Enter,
        "esc" | "escape" => KeyCode::Esc,
        "tab" => KeyCode::Tab,
        "backtab" => KeyCode::BackTab,
        "backspace" => KeyCode::Backspace,
        "delete" | "del" => KeyCode::Delete,
        "insert" => KeyCode::Insert,
        "home" => KeyCode::Home,
        "end" => KeyCode::End,
        "pageup" => KeyCode::PageUp,
        "pagedown" => KeyCode::PageDown,
        "up" => KeyCode::Up,
        "down" => KeyCode::Down,
        "left" => KeyCode::Left,
        "right" => KeyCode::Right,
        "space" => KeyCode::Char(' '),
        f if f.len() >= 2
            && f.starts_with('f')
            && f[1..].parse::<u8>().is_ok_and(|n| (1..=12).contains(&n)) =>
        {
            KeyCode::F(f[1..].parse().unwrap_or(1))
        }
        _ => {
            let mut chars = rest.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => KeyCode::Char(c),
                _ => return Err(format!("unknown key \"{spec}\"")),
            }
        }
    };
    Ok(Key::from_event(&KeyEvent::new(code, modifiers)))
}

/// Writes a key the way the config file spells it.
pub fn key_name(key: &Key) -> String {
    let mut s = String::new();
    for (m, name) in [
        (KeyModifiers::CONTROL, "ctrl+"),
        (KeyModifiers::ALT, "alt+"),
        (KeyModifiers::SHIFT, "shift+"),
    ] {
        if key.modifiers.contains(m) {
            s.push_str(name);
        }
    }
    match key.code {
        KeyCode::Char(' ') => s.push_str("space"),
        KeyCode::Char(c) => s.push(c),
        KeyCode::F(n) => s.push_str(&format!("f{n}")),
        KeyCode::PageUp => s.push_str("pageup"),
        KeyCode::PageDown => s.push_str("pagedown"),
        other => s.push_str(&format!("{other:?}").to_ascii_lowercase()),
    }
    s
}

#[derive(Debug, Clone)]
pub struct Keymap {
    bindings: HashMap<Key, Action>,
}

impl Default for Keymap {
    fn default() -> Self {
        let mut bindings = HashMap::new();
        for (action, _, _, keys) in ACTIONS {
            for k in *keys {
                if let Ok(key) = parse_key(k) {
                    bindings.insert(key, *action);
                }
            }
        }
        Self { bindings }
    }
}

impl Keymap {
    /// The defaults with `[keymap]` of the config applied: a listed action gets exactly the
    /// keys given (and loses its defaults); a key bound twice is an error.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mut map = Self::default();
        let mut taken: HashMap<Key, &str> = HashMap::new();
        for (name, keys) in &config.keymap {
            let Some((action, ..)) = ACTIONS.iter().find(|(_, n, ..)| n == name) else {
                let names: Vec<&str> = ACTIONS.iter().map(|a| a.1).collect();
                return Err(config.error_at(
                    keys.span(),
                    format!("unknown action \"{name}\" (actions: {})", names.join(", ")),
                ));
            };
            map.bindings.retain(|_, a| a != action);
            for spec in keys.get_ref().keys() {
                let key = parse_key(spec).map_err(|e| config.error_at(keys.span(), e))?;
                if let Some(other) = taken.insert(key, name.as_str())
                    && other != name
                {
                    return Err(config.error_at(
                        keys.span(),
                        format!("\"{spec}\" is also bound to \"{other}\""),
                    ));
                }
                // A key the user gives takes over from another action's default.
                map.bindings.insert(key, *action);
            }
        }
        Ok(map)
    }

    pub fn action(&self, key: &Key) -> Option<Action> {
        self.bindings.get(key).copied()
    }

    /// The keys bound to `action`, as the config spells them, sorted.
    pub fn keys_of(&self, action: Action) -> Vec<String> {
        let mut keys: Vec<String> = self
            .bindings
            .iter()
            .filter(|(_, a)| **a == action)
            .map(|(k, _)| key_name(k))
            .collect();
        keys.sort_by_key(|k| (k.len(), k.clone()));
        keys
    }

    /// `(keys, description)` of every action, in help order.
    pub fn help(&self) -> Vec<(String, &'static str)> {
        ACTIONS
            .iter()
            .map(|(action, _, what, _)| (self.keys_of(*action).join(" "), *what))
            .filter(|(keys, _)| !keys.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parses_and_names_keys() {
        for spec in [
            "ctrl+q",
            "alt+enter",
            "?",
            "f2",
            "pageup",
            "ctrl+up",
            "shift+down",
            "space",
        ] {
            let key = parse_key(spec).unwrap();
            assert_eq!(key_name(&key), spec);
        }
        assert_eq!(parse_key("Ctrl+Q").unwrap(), parse_key("ctrl+q").unwrap());
        assert!(parse_key("ctrl+nope").is_err());
        assert!(parse_key("f13").is_err());
    }

    #[test]
    fn shifted_characters_match_their_binding() {
        let typed = KeyEvent::new(KeyCode::Char('?'), KeyModifiers::SHIFT);
        assert_eq!(
            Keymap::default().action(&Key::from_event(&typed)),
            Some(Action::Help)
        );
    }

    #[test]
    fn config_rebinds_and_reports_errors() {
        let c = Config::parse("[keymap]\nquit = [\"ctrl+x\"]\n", Path::new("c.toml")).unwrap();
        let map = Keymap::from_config(&c).unwrap();
        assert_eq!(map.keys_of(Action::Quit), ["ctrl+x"]);
        assert_eq!(map.action(&parse_key("ctrl+q").unwrap()), None);

        let c = Config::parse("[keymap]\nfly = \"f5\"\n", Path::new("c.toml")).unwrap();
        let err = Keymap::from_config(&c).unwrap_err().to_string();
        assert!(
            err.starts_with("c.toml:2:7: unknown action \"fly\""),
            "{err}"
        );

        let c = Config::parse("[keymap]\nsend = \"ctrl+zz\"\n", Path::new("c.toml")).unwrap();
        let err = Keymap::from_config(&c).unwrap_err().to_string();
        assert_eq!(err, "c.toml:2:8: unknown key \"ctrl+zz\"");

        let c = Config::parse(
            "[keymap]\nsend = \"f9\"\nquit = \"f9\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert!(Keymap::from_config(&c).is_err());
    }

    #[test]
    fn the_example_config_spells_out_the_defaults() {
        let text = include_str!("../../config.example.toml");
        let c = Config::parse(text, Path::new("config.example.toml")).unwrap();
        assert_eq!(
            Keymap::from_config(&c).unwrap().help(),
            Keymap::default().help()
        );
        assert_eq!(c.keymap.len(), ACTIONS.len());
    }

    #[test]
    fn help_lists_every_bound_action() {
        let help = Keymap::default().help();
        assert_eq!(help.len(), ACTIONS.len());
        assert_eq!(help[0], ("enter".to_string(), "send the message"));
    }
}
