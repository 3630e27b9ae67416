//! Colours of the screen, overridable in `[theme]` of the config file (names such as `"cyan"`,
//! `"light-blue"`, `"#88c0d0"` or a 256-colour index).

use std::str::FromStr;

use ratatui::style::Color;

use crate::config::{Config, ConfigError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Theme {
    pub user: Color,
    pub assistant: Color,
    pub system: Color,
    /// Borders of the focused pane, titles, the cursor token.
    pub accent: Color,
    /// Code blocks and inline code.
    pub code: Color,
    /// Sinks (the first `n_global` tokens) in the visualizer.
    pub global: Color,
    /// The window in the visualizer.
    pub window: Color,
    /// Evicted tokens: the visualizer and the dimmed text of the conversation.
    pub evicted: Color,
    /// Pinned messages and tokens.
    pub pinned: Color,
    /// Evicted tokens recall brought back for the next token.
    pub recalled: Color,
    pub error: Color,
}

impl Default for Theme {
    fn default() -> Self {
        Self {
            user: Color::Cyan,
            assistant: Color::Green,
            system: Color::Magenta,
            accent: Color::Blue,
            code: Color::Yellow,
            global: Color::Yellow,
            window: Color::Green,
            evicted: Color::DarkGray,
            pinned: Color::Magenta,
            recalled: Color::LightCyan,
            error: Color::Red,
        }
    }
}

/// Config names of the themable elements.
pub const ELEMENTS: &[&str] = &[
    "user",
    "assistant",
    "system",
    "accent",
    "code",
    "global",
    "window",
    "evicted",
    "pinned",
    "recalled",
    "error",
];

impl Theme {
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mut theme = Self::default();
        for (name, value) in &config.theme {
            let color = Color::from_str(value.get_ref()).map_err(|_| {
                config.error_at(
                    value.span(),
                    format!(
                        "\"{}\" is not a colour (try \"cyan\", \"#88c0d0\" or 0-255)",
                        value.get_ref()
                    ),
                )
            })?;
            let slot = match name.as_str() {
                "user" => &mut theme.user,
                "assistant" => &mut theme.assistant,
                "system" => &mut theme.system,
                "accent" => &mut theme.accent,
                "code" => &mut theme.code,
                "global" => &mut theme.global,
                "window" => &mut theme.window,
                "evicted" => &mut theme.evicted,
                "pinned" => &mut theme.pinned,
                "recalled" => &mut theme.recalled,
                "error" => &mut theme.error,
                _ => {
                    return Err(config.error_at(
                        value.span(),
                        format!(
                            "unknown theme element \"{name}\" (elements: {})",
                            ELEMENTS.join(", ")
                        ),
                    ));
                }
            };
            *slot = color;
        }
        Ok(theme)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_example_config_spells_out_the_defaults() {
        let text = include_str!("../../config.example.toml");
        let c = Config::parse(text, Path::new("config.example.toml")).unwrap();
        assert_eq!(Theme::from_config(&c).unwrap(), Theme::default());
        assert_eq!(c.theme.len(), ELEMENTS.len());
    }

    #[test]
    fn config_sets_colours_and_rejects_bad_ones() {
        let c = Config::parse(
            "[theme]\nuser = \"#102030\"\nevicted = \"gray\"\n",
            Path::new("t"),
        )
        .unwrap();
        let t = Theme::from_config(&c).unwrap();
        assert_eq!(t.user, Color::Rgb(0x10, 0x20, 0x30));
        assert_eq!(t.evicted, Color::Gray);
        let c = Config::parse("[theme]\nuser = \"blurple\"\n", Path::new("t")).unwrap();
        assert!(
            Theme::from_config(&c)
                .unwrap_err()
                .to_string()
                .starts_with("t:2:8: ")
        );
        let c = Config::parse("[theme]\nborder = \"red\"\n", Path::new("t")).unwrap();
        assert!(Theme::from_config(&c).is_err());
    }
}
