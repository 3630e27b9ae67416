//! The engine's notices in this screen's words. The engine says what happened
//! ([`crate::protocol::Notice`]); the commands a sentence suggests are this UI's.

use crate::progress::thousands;
use crate::protocol::Notice;

/// The status line's sentence for `notice`.
pub fn notice(notice: &Notice) -> String {
    match notice {
        Notice::NothingToRegenerate => "nothing to regenerate yet".into(),
        Notice::SystemPromptSet {
            this_conversation: true,
        } => "system prompt set for this conversation".into(),
        Notice::SystemPromptSet {
            this_conversation: false,
        } => "system prompt set for new conversations (/new); this one has read its own already"
            .into(),
        Notice::Pinned { tokens, lost: 0 } => {
            format!("pinned {} tokens: they stay attended", thousands(*tokens))
        }
        Notice::Pinned { tokens, lost } => format!(
            "pinned {} tokens; {} had already been evicted and cannot come back",
            thousands(tokens - lost),
            thousands(*lost)
        ),
        Notice::RawSet {
            on: true,
            this_conversation: true,
        } => "raw mode: your text is continued as written, with no chat template".into(),
        Notice::RawSet {
            on: false,
            this_conversation: true,
        } => "chat mode: turns are written in the chat template".into(),
        Notice::RawSet {
            on,
            this_conversation: false,
        } => format!(
            "raw mode {} for new conversations (/new); this one keeps its own mode",
            if *on { "on" } else { "off" }
        ),
        Notice::NoOwnTemplate { format } => {
            format!("no chat template in this model ({format} used); a base model? /raw on")
        }
        Notice::NothingToPin => "that message has no tokens yet".into(),
        Notice::Unpinned => "unpinned".into(),
        Notice::Exported(path) => format!("exported to {}", path.display()),
        Notice::NoSessionToResume => "no saved session to resume".into(),
        Notice::LambdaChanged { n_global, n_local } => {
            format!("Λ = {n_global} sinks + {n_local}-token window; feeding the history again…")
        }
        Notice::Resumed {
            title,
            from_snapshot: true,
        } => format!("resumed \"{title}\" from its KV snapshot"),
        Notice::Resumed {
            title,
            from_snapshot: false,
        } => format!("resumed \"{title}\"; feeding its history again (no current snapshot)"),
        Notice::ResumedRemote { title, held: true } => {
            format!("resumed \"{title}\"; the server still holds its cache")
        }
        Notice::ResumedRemote { title, held: false } => {
            format!("resumed \"{title}\"; the server reads it with your next message")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_say_what_was_lost() {
        let said = |tokens, lost| notice(&Notice::Pinned { tokens, lost });
        assert_eq!(said(12, 0), "pinned 12 tokens: they stay attended");
        assert_eq!(
            said(12, 5),
            "pinned 7 tokens; 5 had already been evicted and cannot come back"
        );
    }
}
