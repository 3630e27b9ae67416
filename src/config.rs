//! The configuration file: `config.toml` in the XDG config dir (`~/.config/lambdachat/`),
//! or the file named by `--config` or `LAMBDACHAT_CONFIG`. Every key is optional; command-line
//! flags beat the file, the file beats the built-in defaults. `config.example.toml` documents
//! every key.
//!
//! A file that does not parse, or holds an unknown key or a bad value, is an error that names
//! its line and column: nothing starts on a half-understood configuration.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Environment variable naming the config file (beaten by `--config`).
pub const CONFIG_ENV: &str = "LAMBDACHAT_CONFIG";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, String),
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// A key binding list: one key (`"ctrl+q"`) or several (`["ctrl+q", "ctrl+c"]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum KeyList {
    One(String),
    Many(Vec<String>),
}

impl KeyList {
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Self::One(k) => vec![k.as_str()],
            Self::Many(ks) => ks.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LambdaConfig {
    pub n_global: Option<usize>,
    pub n_local: Option<usize>,
    pub distance_limit: Option<u64>,
    /// `f32` or `f16`: how the cache holds keys and values (checked by the command line, which
    /// knows the cache's types).
    pub kv_type: Option<Spanned<String>>,
}

/// Recall of evicted context (docs/ALGORITHM.md §10).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecallConfig {
    pub enabled: Option<bool>,
    pub blocks: Option<usize>,
    pub from_layer: Option<usize>,
    pub every: Option<usize>,
    pub cache_mib: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// GGUF file; without it the default model is fetched.
    pub model: Option<PathBuf>,
    /// System prompt of new conversations.
    pub system: Option<String>,
    /// Longest reply, in tokens.
    pub max_tokens: Option<usize>,
    /// MiB the saved KV caches of all conversations may take on disk together.
    pub snapshot_budget_mib: Option<u64>,
    #[serde(default)]
    pub lambda: LambdaConfig,
    #[serde(default)]
    pub recall: RecallConfig,
    #[serde(default)]
    pub sampling: SamplingConfig,
    /// Colour of each themed element (checked by the TUI, which knows the element names).
    #[serde(default)]
    pub theme: BTreeMap<String, Spanned<String>>,
    /// Keys of each action (checked by the TUI's keymap).
    #[serde(default)]
    pub keymap: BTreeMap<String, Spanned<KeyList>>,
    /// Where the file was read from, and its text (to place errors found later).
    #[serde(skip)]
    origin: Option<(PathBuf, String)>,
}

impl Config {
    /// The config file to read: `--config`, else `$LAMBDACHAT_CONFIG`, else the XDG default.
    /// The first two must exist; the default may be absent.
    pub fn locate(explicit: Option<&Path>) -> Option<(PathBuf, bool)> {
        if let Some(p) = explicit {
            return Some((p.to_path_buf(), true));
        }
        if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
            return Some((PathBuf::from(p), true));
        }
        directories::ProjectDirs::from("", "", "lambdachat")
            .map(|d| (d.config_dir().join("config.toml"), false))
    }

    /// Reads the configuration (an empty one when no file is set up).
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let Some((path, required)) = Self::locate(explicit) else {
            return Ok(Self::default());
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Self::default()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ConfigError::Missing(path)),
            Err(e) => Err(ConfigError::Read(path, e.to_string())),
        }
    }

    /// Parses `text` read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_column(text, s.start));
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        config.origin = Some((path.to_path_buf(), text.to_string()));
        Ok(config)
    }

    /// An error about the value at `span` of the file (for checks made after parsing).
    pub fn error_at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (path, (line, column)) = match &self.origin {
            Some((path, text)) => (path.clone(), line_column(text, span.start)),
            None => (PathBuf::from("<config>"), (1, 1)),
        };
        ConfigError::Invalid {
            path,
            line,
            column,
            message: message.into(),
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(text: &str) -> (usize, usize, String) {
        match Config::parse(text, Path::new("c.toml")) {
            Err(ConfigError::Invalid {
                line,
                column,
                message,
                ..
            }) => (line, column, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn the_example_file_parses_and_sets_every_section() {
        let text = include_str!("../config.example.toml");
        let c = Config::parse(text, Path::new("config.example.toml")).unwrap();
        assert_eq!(c.lambda.n_global, Some(64));
        assert_eq!(
            c.lambda.kv_type.as_ref().map(|t| t.get_ref().as_str()),
            Some("f16")
        );
        assert_eq!(c.sampling.temperature, Some(0.7));
        assert!(c.theme.contains_key("user"));
        assert!(c.keymap.contains_key("send"));
    }

    #[test]
    fn errors_name_line_and_column() {
        let (line, column, message) = invalid("[lambda]\nn_global = 4\nn_locl = 5\n");
        assert_eq!((line, column), (3, 1));
        assert!(message.contains("unknown field `n_locl`"), "{message}");
        let (line, column, message) = invalid("[sampling]\ntemperature = \"hot\"\n");
        assert_eq!((line, column), (2, 15));
        assert!(message.contains("f32"), "{message}");
        let (line, _, _) = invalid("model = \n");
        assert_eq!(line, 1);
    }

    #[test]
    fn later_checks_point_at_the_value() {
        let text = "[keymap]\nsend = \"ctrl+nope\"\n";
        let c = Config::parse(text, Path::new("c.toml")).unwrap();
        let span = c.keymap["send"].span();
        let err = c.error_at(span, "unknown key");
        assert_eq!(err.to_string(), "c.toml:2:8: unknown key");
    }

    #[test]
    fn an_explicit_file_must_exist() {
        let missing = Path::new("/nonexistent/lambdachat.toml");
        assert_eq!(
            Config::load(Some(missing)),
            Err(ConfigError::Missing(missing.to_path_buf()))
        );
    }
}
