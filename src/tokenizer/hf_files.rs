//! The tokenizer side of a Hugging Face model directory: `tokenizer.json` (required),
//! `tokenizer_config.json` (special tokens, BOS rule, chat template), `chat_template.jinja`
//! (newer repos keep the template there) and `generation_config.json` (end-of-sequence ids).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::TokenizerError;

#[derive(Debug, Default)]
pub struct HfTokenizerFiles {
    pub tokenizer_json: PathBuf,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: Option<bool>,
    /// `generation_config.json`'s `eos_token_id` (one id or a list).
    pub eos_ids: Vec<u32>,
}

fn read_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| TokenizerError::Build(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Build(format!("{}: {e}", path.display())))
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": …}`.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(String::from),
        _ => None,
    }
}

/// `chat_template` as a string, or the `default` entry of a list of named templates.
fn template(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => {
            let named = |n: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some(n))
            };
            named("default")
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(String::from)
        }
        _ => None,
    }
}

pub fn ids(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|i| i as u32).into_iter().collect(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(|n| n.as_u64().map(|i| i as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl HfTokenizerFiles {
    pub fn read(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_json = dir.join("tokenizer.json");
        if !tokenizer_json.is_file() {
            return Err(TokenizerError::Missing(format!(
                "{} has no tokenizer.json",
                dir.display()
            )));
        }
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| TokenizerError::Build(format!("{}: {e}", jinja.display())))?,
            )
        } else {
            template(config.get("chat_template"))
        };
        Ok(Self {
            tokenizer_json,
            chat_template,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
            add_bos_token: config.get("add_bos_token").and_then(Json::as_bool),
            eos_ids: ids(generation.get("eos_token_id")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tokens_templates_and_ids_in_their_several_shapes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                "add_bos_token": true,
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [2, 7]}"#,
        )
        .unwrap();
        let f = HfTokenizerFiles::read(dir.path()).unwrap();
        assert_eq!(f.bos_token.as_deref(), Some("<s>"));
        assert_eq!(f.eos_token.as_deref(), Some("</s>"));
        assert_eq!(f.add_bos_token, Some(true));
        assert_eq!(f.chat_template.as_deref(), Some("D"));
        assert_eq!(f.eos_ids, vec![2, 7]);
        // A chat_template.jinja file wins over the config's template.
        std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
        let f = HfTokenizerFiles::read(dir.path()).unwrap();
        assert_eq!(f.chat_template.as_deref(), Some("J"));
    }

    #[test]
    fn a_directory_without_tokenizer_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = HfTokenizerFiles::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no tokenizer.json"), "{e}");
    }
}
