//! Slash commands: the table (help and completion are generated from it) and the parser. Parsing
//! is pure: a typed line becomes a [`SlashCommand`] or an error message for the status line.

use crate::protocol::{LambdaParams, SamplingParams, Settings};

/// `(name, arguments, description)`, in the order help shows them.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    ("help", "", "keys and commands"),
    ("new", "", "new conversation (this one stays saved)"),
    ("sessions", "", "saved conversations: open, rename, delete"),
    ("system", "TEXT", "set the system prompt"),
    ("raw", "on|off", "continue text as written (no template)"),
    (
        "set",
        "KEY VALUE",
        "change a setting; /set alone lists them",
    ),
    ("pin", "[N]", "keep message N attended forever (last)"),
    ("unpin", "[N]", "stop pinning message N (last pinned)"),
    ("regen", "", "new reply to the last message"),
    ("copy", "[N]", "copy code block N or the last reply"),
    ("file", "PATH", "insert a text file into the message"),
    ("export", "[FILE]", "write the conversation as Markdown"),
    ("clear", "", "delete this conversation, start afresh"),
    ("quit", "", "save and quit"),
];

/// Keys `/set` accepts.
pub const SETTINGS: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "max_tokens",
    "n_global",
    "n_local",
];

#[derive(Debug, Clone, PartialEq)]
pub enum SlashCommand {
    Help,
    New,
    Sessions,
    System(String),
    /// Raw text continuation on or off.
    Raw(bool),
    ShowSettings,
    SetSampling(SamplingParams),
    SetMaxTokens(usize),
    SetLambda(LambdaParams),
    /// Message number (1-based, as shown), or the default.
    Pin(Option<usize>),
    Unpin(Option<usize>),
    Regen,
    Copy(Option<usize>),
    /// A text file to insert into the message being written.
    File(String),
    Export(Option<String>),
    Clear,
    Quit,
}

fn number(arg: &str, what: &str) -> Result<Option<usize>, String> {
    if arg.is_empty() {
        return Ok(None);
    }
    match arg.parse::<usize>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => Err(format!("{what} must be a number from 1, not \"{arg}\"")),
    }
}

/// Parses a line that starts with `/`.
pub fn parse(line: &str, settings: &Settings) -> Result<SlashCommand, String> {
    let line = line.trim();
    let body = line.strip_prefix('/').unwrap_or(line);
    let (name, arg) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
    let arg = arg.trim();
    let no_arg = |c: SlashCommand| {
        if arg.is_empty() {
            Ok(c)
        } else {
            Err(format!("/{name} takes no argument"))
        }
    };
    match name {
        "help" => no_arg(SlashCommand::Help),
        "new" => no_arg(SlashCommand::New),
        "sessions" => no_arg(SlashCommand::Sessions),
        "regen" => no_arg(SlashCommand::Regen),
        "clear" => no_arg(SlashCommand::Clear),
        "quit" | "exit" => no_arg(SlashCommand::Quit),
        "system" if arg.is_empty() => Err("usage: /system TEXT".into()),
        "system" => Ok(SlashCommand::System(arg.to_string())),
        "raw" => match arg {
            "on" => Ok(SlashCommand::Raw(true)),
            "off" => Ok(SlashCommand::Raw(false)),
            _ => Err("usage: /raw on|off".into()),
        },
        "pin" => number(arg, "the message").map(SlashCommand::Pin),
        "unpin" => number(arg, "the message").map(SlashCommand::Unpin),
        "copy" => number(arg, "the code block").map(SlashCommand::Copy),
        "file" if arg.is_empty() => Err("usage: /file PATH".into()),
        "file" => Ok(SlashCommand::File(arg.to_string())),
        "export" => Ok(SlashCommand::Export(
            (!arg.is_empty()).then(|| arg.to_string()),
        )),
        "set" if arg.is_empty() => Ok(SlashCommand::ShowSettings),
        "set" => parse_set(arg, settings),
        "" => Err("type a command after /, for example /help".into()),
        other => Err(format!("unknown command /{other} (/help lists them)")),
    }
}

fn parse_set(arg: &str, settings: &Settings) -> Result<SlashCommand, String> {
    let (key, value) = arg
        .split_once(char::is_whitespace)
        .map(|(k, v)| (k, v.trim()))
        .ok_or_else(|| format!("usage: /set KEY VALUE (keys: {})", SETTINGS.join(", ")))?;
    let float = || {
        value
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{key} must be a number, not \"{value}\""))
    };
    let int = || {
        value
            .parse::<usize>()
            .map_err(|_| format!("{key} must be a whole number, not \"{value}\""))
    };
    let mut s = settings.sampling.clone();
    let p = settings.params;
    let lambda = |g: usize, l: usize| {
        // D follows the window when it was at its default; otherwise it is kept if it fits.
        let d = if p.distance_limit == p.n_local as u64 {
            None
        } else {
            Some(p.distance_limit.min(l as u64))
        };
        LambdaParams::new(g, l, d)
            .map(SlashCommand::SetLambda)
            .map_err(|e| e.to_string())
    };
    match key {
        "temperature" => s.temperature = float()?,
        "top_p" => s.top_p = float()?,
        "min_p" => s.min_p = float()?,
        "repeat_penalty" => s.repeat_penalty = float()?,
        "top_k" => s.top_k = int()?,
        "max_tokens" => {
            return match int()? {
                0 => Err("max_tokens must be at least 1".into()),
                n => Ok(SlashCommand::SetMaxTokens(n)),
            };
        }
        "n_global" => return lambda(int()?, p.n_local),
        "n_local" => return lambda(p.n_global, int()?),
        other => {
            return Err(format!(
                "unknown setting \"{other}\" (settings: {})",
                SETTINGS.join(", ")
            ));
        }
    }
    s.validate().map_err(|e| e.to_string())?;
    Ok(SlashCommand::SetSampling(s))
}

/// Completions of a partly typed command line: `(completed line, description)`.
pub fn complete(line: &str) -> Vec<(String, &'static str)> {
    let Some(body) = line.strip_prefix('/') else {
        return Vec::new();
    };
    if let Some(rest) = body.strip_prefix("set ") {
        if rest.contains(' ') {
            return Vec::new();
        }
        return SETTINGS
            .iter()
            .filter(|k| k.starts_with(rest))
            .map(|k| (format!("/set {k} "), "setting"))
            .collect();
    }
    if body.contains(char::is_whitespace) {
        return Vec::new();
    }
    COMMANDS
        .iter()
        .filter(|(name, ..)| name.starts_with(body))
        .map(|(name, args, what)| {
            let sep = if args.is_empty() { "" } else { " " };
            (format!("/{name}{sep}"), *what)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::KvType;

    fn settings() -> Settings {
        Settings {
            params: LambdaParams::new(64, 4096, None).unwrap(),
            sampling: SamplingParams::default(),
            max_tokens: 512,
            recall: None,
            kv_type: KvType::F16,
            raw: false,
            attention_view: true,
            server: None,
        }
    }

    #[test]
    fn parses_commands() {
        let s = settings();
        assert_eq!(parse("/pin 3", &s), Ok(SlashCommand::Pin(Some(3))));
        assert_eq!(parse("/pin", &s), Ok(SlashCommand::Pin(None)));
        assert_eq!(parse("/copy 2", &s), Ok(SlashCommand::Copy(Some(2))));
        assert_eq!(
            parse("/system  Be brief. ", &s),
            Ok(SlashCommand::System("Be brief.".into()))
        );
        assert_eq!(
            parse("/export notes.md", &s),
            Ok(SlashCommand::Export(Some("notes.md".into())))
        );
        assert_eq!(parse("/set", &s), Ok(SlashCommand::ShowSettings));
        assert!(parse("/pin 0", &s).unwrap_err().contains("number from 1"));
        assert!(
            parse("/frobnicate", &s)
                .unwrap_err()
                .contains("unknown command")
        );
        assert!(
            parse("/new now", &s)
                .unwrap_err()
                .contains("takes no argument")
        );
        assert!(parse("/system", &s).unwrap_err().contains("usage"));
        assert_eq!(parse("/raw on", &s), Ok(SlashCommand::Raw(true)));
        assert_eq!(parse("/raw  off ", &s), Ok(SlashCommand::Raw(false)));
        assert!(parse("/raw yes", &s).unwrap_err().contains("/raw on|off"));
        assert!(parse("/raw", &s).unwrap_err().contains("/raw on|off"));
    }

    #[test]
    fn set_validates_values() {
        let s = settings();
        match parse("/set temperature 0.2", &s) {
            Ok(SlashCommand::SetSampling(p)) => assert_eq!(p.temperature, 0.2),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse("/set max_tokens 64", &s),
            Ok(SlashCommand::SetMaxTokens(64))
        );
        match parse("/set n_local 1024", &s) {
            Ok(SlashCommand::SetLambda(p)) => {
                assert_eq!((p.n_global, p.n_local, p.distance_limit), (64, 1024, 1024))
            }
            other => panic!("{other:?}"),
        }
        assert!(parse("/set top_p 2", &s).unwrap_err().contains("top_p"));
        assert!(parse("/set n_local 0", &s).unwrap_err().contains("n_local"));
        assert!(
            parse("/set n_global 5000", &s)
                .unwrap_err()
                .contains("larger than n_local")
        );
        assert!(
            parse("/set temperature hot", &s)
                .unwrap_err()
                .contains("number")
        );
        assert!(
            parse("/set warp 9", &s)
                .unwrap_err()
                .contains("unknown setting")
        );
        assert!(parse("/set temperature", &s).unwrap_err().contains("usage"));
    }

    #[test]
    fn completes_names_and_settings() {
        let c = complete("/s");
        let names: Vec<&str> = c.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["/sessions", "/system ", "/set "]);
        assert_eq!(complete("/set te")[0].0, "/set temperature ");
        assert!(complete("hello").is_empty());
        assert!(complete("/pin 3").is_empty());
    }
}
