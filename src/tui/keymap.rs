//! Key bindings: every action of every panel, where it is read, its config name, what it does
//! and its default keys ([`BINDINGS`]). The handlers look keys up here and the help overlay is
//! generated from the same table, so the two cannot drift; `[keymap]` in the config file rebinds
//! any action.
//!
//! Printable keys (`?`) bound to an action only act when the input is empty, so they can still
//! be typed in a message.

use std::collections::HashMap;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::config::{Config, ConfigError};

/// Where a key is read. Each panel reads its own keys; the chat's keys work wherever the panel
/// in front does not take a key, and the editing keys edit the message (or a title being
/// renamed) when nothing else took them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Context {
    Chat,
    Editing,
    Inspect,
    Sessions,
    /// Renaming a conversation in the session list.
    Rename,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    // The chat.
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
    // Editing text.
    CharLeft,
    CharRight,
    WordLeft,
    WordRight,
    LineStart,
    LineEnd,
    LineUp,
    LineDown,
    DeleteBack,
    DeleteForward,
    DeleteWord,
    DeleteToLineStart,
    // Inspect mode.
    PrevToken,
    NextToken,
    PrevMessage,
    NextMessage,
    FirstToken,
    LastToken,
    LeaveInspect,
    // The session list.
    SelectUp,
    SelectDown,
    Open,
    Rename,
    Delete,
    NewConversation,
    CloseList,
    // Renaming a conversation.
    SaveTitle,
    CancelRename,
}

/// How help shows an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Help {
    /// A line of its own.
    Own(&'static str),
    /// One line with the next binding: `left/right  previous/next token`.
    PairWithNext(&'static str),
    /// On the previous binding's line.
    Paired,
}

/// One action: where it is read, its name in the config file, its help and its default keys.
pub struct Binding {
    pub action: Action,
    pub context: Context,
    pub name: &'static str,
    pub help: Help,
    pub keys: &'static [&'static str],
}

const fn bind(
    context: Context,
    action: Action,
    name: &'static str,
    help: Help,
    keys: &'static [&'static str],
) -> Binding {
    Binding {
        action,
        context,
        name,
        help,
        keys,
    }
}

use Context::{Chat, Editing, Inspect as InspectMode, Rename as Renaming, Sessions as List};
use Help::{Own, PairWithNext, Paired};

/// Every action, in the order help shows them: the one table both the handlers and the help
/// read, and what `[keymap]` in the config file rebinds.
pub const BINDINGS: &[Binding] = &[
    bind(
        Chat,
        Action::Send,
        "send",
        Own("send the message"),
        &["enter"],
    ),
    bind(
        Chat,
        Action::Newline,
        "newline",
        Own("new line in the message"),
        &["alt+enter", "ctrl+j"],
    ),
    bind(
        Chat,
        Action::Stop,
        "stop",
        Own("stop the reply / close a panel"),
        &["esc"],
    ),
    bind(
        Chat,
        Action::Quit,
        "quit",
        Own("save and quit"),
        &["ctrl+q", "ctrl+c"],
    ),
    bind(Chat, Action::Help, "help", Own("this help"), &["?", "f1"]),
    bind(
        Chat,
        Action::Visualizer,
        "visualizer",
        Own("show/hide the attention window"),
        &["ctrl+t", "f2"],
    ),
    bind(
        Chat,
        Action::Inspect,
        "inspect",
        Own("inspect tokens of a message"),
        &["ctrl+o", "f3"],
    ),
    bind(
        Chat,
        Action::Sessions,
        "sessions",
        Own("saved conversations"),
        &["f4"],
    ),
    bind(
        Chat,
        Action::Regenerate,
        "regenerate",
        Own("new reply to the last message"),
        &["ctrl+r"],
    ),
    bind(
        Chat,
        Action::Complete,
        "complete",
        Own("complete a /command"),
        &["tab"],
    ),
    bind(
        Chat,
        Action::HistoryPrev,
        "history_prev",
        Own("edit the last message; again: sent ones"),
        &["up"],
    ),
    bind(
        Chat,
        Action::HistoryNext,
        "history_next",
        Own("next sent message"),
        &["down"],
    ),
    bind(
        Chat,
        Action::ScrollUp,
        "scroll_up",
        Own("scroll up"),
        &["ctrl+up", "shift+up"],
    ),
    bind(
        Chat,
        Action::ScrollDown,
        "scroll_down",
        Own("scroll down"),
        &["ctrl+down", "shift+down"],
    ),
    bind(Chat, Action::PageUp, "page_up", Own("page up"), &["pageup"]),
    bind(
        Chat,
        Action::PageDown,
        "page_down",
        Own("page down"),
        &["pagedown"],
    ),
    bind(
        Chat,
        Action::Top,
        "top",
        Own("first message"),
        &["ctrl+home"],
    ),
    bind(
        Chat,
        Action::Bottom,
        "bottom",
        Own("last message (follow the reply)"),
        &["ctrl+end"],
    ),
    bind(
        Editing,
        Action::CharLeft,
        "char_left",
        PairWithNext("character"),
        &["left"],
    ),
    bind(Editing, Action::CharRight, "char_right", Paired, &["right"]),
    bind(
        Editing,
        Action::WordLeft,
        "word_left",
        PairWithNext("word"),
        &["ctrl+left", "alt+left"],
    ),
    bind(
        Editing,
        Action::WordRight,
        "word_right",
        Paired,
        &["ctrl+right", "alt+right"],
    ),
    bind(
        Editing,
        Action::LineStart,
        "line_start",
        PairWithNext("start/end of line"),
        &["home", "ctrl+a"],
    ),
    bind(
        Editing,
        Action::LineEnd,
        "line_end",
        Paired,
        &["end", "ctrl+e"],
    ),
    bind(
        Editing,
        Action::LineUp,
        "line_up",
        PairWithNext("line above/below"),
        &["up"],
    ),
    bind(Editing, Action::LineDown, "line_down", Paired, &["down"]),
    bind(
        Editing,
        Action::DeleteBack,
        "delete_back",
        PairWithNext("delete before/after"),
        &["backspace"],
    ),
    bind(
        Editing,
        Action::DeleteForward,
        "delete_forward",
        Paired,
        &["delete"],
    ),
    bind(
        Editing,
        Action::DeleteWord,
        "delete_word",
        Own("delete a word"),
        &["ctrl+w", "ctrl+backspace", "alt+backspace"],
    ),
    bind(
        Editing,
        Action::DeleteToLineStart,
        "delete_to_line_start",
        Own("delete to the line's start"),
        &["ctrl+u"],
    ),
    bind(
        InspectMode,
        Action::PrevToken,
        "prev_token",
        PairWithNext("previous/next token"),
        &["left"],
    ),
    bind(
        InspectMode,
        Action::NextToken,
        "next_token",
        Paired,
        &["right"],
    ),
    bind(
        InspectMode,
        Action::PrevMessage,
        "prev_message",
        PairWithNext("previous/next message"),
        &["up"],
    ),
    bind(
        InspectMode,
        Action::NextMessage,
        "next_message",
        Paired,
        &["down"],
    ),
    bind(
        InspectMode,
        Action::FirstToken,
        "first_token",
        PairWithNext("first/last token"),
        &["home"],
    ),
    bind(
        InspectMode,
        Action::LastToken,
        "last_token",
        Paired,
        &["end"],
    ),
    bind(
        InspectMode,
        Action::LeaveInspect,
        "leave_inspect",
        Own("leave inspect mode"),
        &["esc"],
    ),
    bind(
        List,
        Action::SelectUp,
        "select_up",
        PairWithNext("select"),
        &["up"],
    ),
    bind(List, Action::SelectDown, "select_down", Paired, &["down"]),
    bind(List, Action::Open, "open", Own("open"), &["enter"]),
    bind(List, Action::Rename, "rename", Own("rename"), &["r"]),
    bind(List, Action::Delete, "delete", Own("delete"), &["d"]),
    bind(
        List,
        Action::NewConversation,
        "new_conversation",
        Own("new conversation"),
        &["n"],
    ),
    bind(
        List,
        Action::CloseList,
        "close_list",
        Own("close"),
        &["esc"],
    ),
    bind(
        Renaming,
        Action::SaveTitle,
        "save_title",
        Own("saves the new title"),
        &["enter"],
    ),
    bind(
        Renaming,
        Action::CancelRename,
        "cancel_rename",
        Own("cancels"),
        &["esc"],
    ),
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
    bindings: HashMap<(Context, Key), Action>,
}

impl Default for Keymap {
    fn default() -> Self {
        let mut bindings = HashMap::new();
        for b in BINDINGS {
            for k in b.keys {
                if let Ok(key) = parse_key(k) {
                    bindings.insert((b.context, key), b.action);
                }
            }
        }
        Self { bindings }
    }
}

impl Keymap {
    /// The defaults with `[keymap]` of the config applied: a listed action gets exactly the
    /// keys given (and loses its defaults); a key bound twice in one context is an error.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mut map = Self::default();
        let mut taken: HashMap<(Context, Key), &str> = HashMap::new();
        for (name, keys) in &config.keymap {
            let Some(binding) = BINDINGS.iter().find(|b| b.name == name) else {
                let names: Vec<&str> = BINDINGS.iter().map(|b| b.name).collect();
                return Err(config.error_at(
                    keys.span(),
                    format!("unknown action \"{name}\" (actions: {})", names.join(", ")),
                ));
            };
            let context = binding.context;
            map.bindings
                .retain(|(c, _), a| *c != context || *a != binding.action);
            for spec in keys.get_ref().keys() {
                let key = parse_key(spec).map_err(|e| config.error_at(keys.span(), e))?;
                if let Some(other) = taken.insert((context, key), name.as_str())
                    && other != name
                {
                    return Err(config.error_at(
                        keys.span(),
                        format!("\"{spec}\" is also bound to \"{other}\""),
                    ));
                }
                // A key the user gives takes over from another action's default.
                map.bindings.insert((context, key), binding.action);
            }
        }
        Ok(map)
    }

    /// The action `key` does in `context`, if any.
    pub fn action(&self, context: Context, key: &Key) -> Option<Action> {
        self.bindings.get(&(context, *key)).copied()
    }

    /// The editing action of `key`. Editing keys act with or without shift (shift+left moves
    /// like left), as text fields do.
    pub fn editing(&self, key: &Key) -> Option<Action> {
        let unshifted = Key {
            code: key.code,
            modifiers: key.modifiers - KeyModifiers::SHIFT,
        };
        self.action(Context::Editing, key)
            .or_else(|| self.action(Context::Editing, &unshifted))
    }

    /// The keys bound to `action`, as the config spells them, sorted.
    pub fn keys_of(&self, action: Action) -> Vec<String> {
        let mut keys: Vec<String> = self
            .bindings
            .iter()
            .filter(|(_, a)| **a == action)
            .map(|((_, k), _)| key_name(k))
            .collect();
        keys.sort_by_key(|k| (k.len(), k.clone()));
        keys
    }

    /// The key to name for `action` in a sentence: its first default key while that is still
    /// bound to it, else the first key bound to it (empty when none is).
    pub fn key_of(&self, action: Action) -> String {
        let bound = self.keys_of(action);
        BINDINGS
            .iter()
            .find(|b| b.action == action)
            .and_then(|b| b.keys.iter().find(|k| bound.iter().any(|x| x == *k)))
            .map(|k| k.to_string())
            .or_else(|| bound.into_iter().next())
            .unwrap_or_default()
    }

    /// `(keys, description)` of every action of `context`, in help order; paired actions share
    /// a line (`left/right`).
    pub fn help(&self, context: Context) -> Vec<(String, &'static str)> {
        let bindings: Vec<&Binding> = BINDINGS.iter().filter(|b| b.context == context).collect();
        let mut lines = Vec::new();
        for (i, b) in bindings.iter().enumerate() {
            let keys = self.keys_of(b.action).join(" ");
            match b.help {
                Help::Own(what) => lines.push((keys, what)),
                Help::PairWithNext(what) => {
                    let next = bindings
                        .get(i + 1)
                        .map(|n| self.keys_of(n.action).join(" "))
                        .unwrap_or_default();
                    let both = match (keys.is_empty(), next.is_empty()) {
                        (false, false) => format!("{keys}/{next}"),
                        _ => keys + &next,
                    };
                    lines.push((both, what));
                }
                Help::Paired => {}
            }
        }
        lines.retain(|(keys, _)| !keys.is_empty());
        lines
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
            Keymap::default().action(Context::Chat, &Key::from_event(&typed)),
            Some(Action::Help)
        );
    }

    #[test]
    fn config_rebinds_and_reports_errors() {
        let c = Config::parse("[keymap]\nquit = [\"ctrl+x\"]\n", Path::new("c.toml")).unwrap();
        let map = Keymap::from_config(&c).unwrap();
        assert_eq!(map.keys_of(Action::Quit), ["ctrl+x"]);
        assert_eq!(
            map.action(Context::Chat, &parse_key("ctrl+q").unwrap()),
            None
        );

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
        let (ours, theirs) = (Keymap::from_config(&c).unwrap(), Keymap::default());
        for context in CONTEXTS {
            assert_eq!(ours.help(context), theirs.help(context));
        }
        assert_eq!(c.keymap.len(), BINDINGS.len());
    }

    const CONTEXTS: [Context; 5] = [
        Context::Chat,
        Context::Editing,
        Context::Inspect,
        Context::Sessions,
        Context::Rename,
    ];

    #[test]
    fn help_lists_every_bound_action() {
        let help = Keymap::default().help(Context::Chat);
        let chat = BINDINGS.iter().filter(|b| b.context == Context::Chat);
        assert_eq!(help.len(), chat.count());
        assert_eq!(help[0], ("enter".to_string(), "send the message"));
        let inspect = Keymap::default().help(Context::Inspect);
        assert_eq!(
            inspect[0],
            ("left/right".to_string(), "previous/next token")
        );
    }

    #[test]
    fn every_action_is_bound_once_and_pairs_close() {
        for (i, b) in BINDINGS.iter().enumerate() {
            let same = BINDINGS
                .iter()
                .filter(|o| o.action == b.action || o.name == b.name);
            assert_eq!(same.count(), 1, "{}", b.name);
            if let Help::PairWithNext(_) = b.help {
                let next = &BINDINGS[i + 1];
                assert!(next.help == Help::Paired && next.context == b.context);
            }
            if b.help == Help::Paired {
                assert!(matches!(BINDINGS[i - 1].help, Help::PairWithNext(_)));
            }
        }
        // A key does one thing per context.
        for context in CONTEXTS {
            let mut seen = std::collections::HashSet::new();
            for b in BINDINGS.iter().filter(|b| b.context == context) {
                for k in b.keys {
                    assert!(
                        seen.insert(parse_key(k).unwrap()),
                        "{k} twice in {context:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_same_key_serves_each_context() {
        let map = Keymap::default();
        let esc = parse_key("esc").unwrap();
        assert_eq!(map.action(Context::Chat, &esc), Some(Action::Stop));
        assert_eq!(
            map.action(Context::Inspect, &esc),
            Some(Action::LeaveInspect)
        );
        assert_eq!(map.action(Context::Sessions, &esc), Some(Action::CloseList));
        assert_eq!(
            map.action(Context::Rename, &esc),
            Some(Action::CancelRename)
        );
        // Rebinding one context's action leaves the others' keys alone.
        let text = "[keymap]\nleave_inspect = \"q\"\n";
        let c = Config::parse(text, Path::new("c.toml")).unwrap();
        let map = Keymap::from_config(&c).unwrap();
        assert_eq!(map.action(Context::Inspect, &esc), None);
        assert_eq!(map.action(Context::Chat, &esc), Some(Action::Stop));
    }
}
