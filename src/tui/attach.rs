//! `/file PATH`: a text file put into the message being written, as a fenced block under its
//! name (`File PATH:`), so the model sees where the text came from and where it ends. The UI reads the file
//! itself (a small read, at most [`MAX_FILE`]); what cannot be inserted is said plainly: a file
//! too large, one that is not UTF-8 text, one that cannot be read.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest file `/file` inserts: far more than a window of text, and still quick to read.
pub const MAX_FILE: u64 = 256 << 10;

/// `text` in a fenced block whose fence is longer than any run of backticks inside it, with
/// `info` (a language, or nothing) after the opening fence.
pub fn fenced(text: &str, info: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    format!("{fence}{info}\n{}\n{fence}", text.trim_end_matches('\n'))
}

/// `~/x` under the home directory; anything else as given (relative to the working directory).
fn expand(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// The block to insert for the file at `path` (its name, then its text fenced), or why not.
pub fn read(path: &str) -> Result<String, String> {
    let full = expand(path);
    let file = std::fs::File::open(&full).map_err(|e| format!("cannot read {path}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if meta.is_dir() {
        return Err(format!(
            "{path} is a directory; /file inserts one text file"
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(format!(
            "{path} is larger than {} KiB; /file inserts smaller files",
            MAX_FILE >> 10
        ));
    }
    let text = String::from_utf8(bytes)
        .ok()
        .filter(|t| !t.contains('\0'))
        .ok_or_else(|| format!("{path} is not UTF-8 text (a binary file?); /file inserts text"))?;
    let language = full
        .extension()
        .and_then(|e| e.to_str())
        .filter(|e| e.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or("");
    // "File " first: a label starting with the path's `/` would make the message a command.
    Ok(format!("File {path}:\n{}\n", fenced(&text, language)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_outgrow_the_backticks_inside() {
        assert_eq!(fenced("a\nb\n", ""), "```\na\nb\n```");
        assert_eq!(
            fenced("x ```rust\ny\n```", "md"),
            "````md\nx ```rust\ny\n```\n````"
        );
    }

    #[test]
    fn a_text_file_is_inserted_and_anything_else_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
        std::fs::write(at("main.rs"), "fn main() {}\n").unwrap();
        assert_eq!(
            read(&at("main.rs")).unwrap(),
            format!("File {}:\n```rs\nfn main() {{}}\n```\n", at("main.rs"))
        );
        std::fs::write(at("logo.png"), b"\x89PNG\r\n\x1a\n\0\0").unwrap();
        assert!(
            read(&at("logo.png"))
                .unwrap_err()
                .contains("not UTF-8 text")
        );
        std::fs::write(at("nul.txt"), "a\0b").unwrap();
        assert!(read(&at("nul.txt")).unwrap_err().contains("not UTF-8 text"));
        std::fs::write(at("big.log"), vec![b'a'; MAX_FILE as usize + 1]).unwrap();
        assert!(
            read(&at("big.log"))
                .unwrap_err()
                .contains("larger than 256 KiB")
        );
        std::fs::write(at("edge.txt"), vec![b'a'; MAX_FILE as usize]).unwrap();
        assert!(read(&at("edge.txt")).is_ok(), "exactly the limit is fine");
        assert!(
            read(&at("missing.txt"))
                .unwrap_err()
                .starts_with("cannot read")
        );
        assert!(read(&at("")).unwrap_err().contains("directory"));
    }
}
