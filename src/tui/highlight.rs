//! A small syntax highlighter for code blocks: comments, strings, numbers and keywords of the
//! languages a coding model writes most (Rust, Python, JavaScript/TypeScript, C/C++, Go, Java,
//! shell, TOML/JSON/YAML). A lexer per line with block-comment state carried over, not a parser:
//! it must keep up with a streaming reply, and a full grammar engine would cost more build time
//! and binary size than the colours are worth.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Plain,
    Keyword,
    String,
    Number,
    Comment,
}

struct Lang {
    line_comment: &'static [&'static str],
    block_comment: Option<(&'static str, &'static str)>,
    keywords: &'static [&'static str],
}

const RUST: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
    "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub",
    "ref", "return", "self", "Self", "static", "struct", "super", "trait", "true", "type",
    "unsafe", "use", "where", "while",
];
const PYTHON: &[&str] = &[
    "and", "as", "assert", "async", "await", "break", "class", "continue", "def", "del", "elif",
    "else", "except", "False", "finally", "for", "from", "global", "if", "import", "in", "is",
    "lambda", "None", "nonlocal", "not", "or", "pass", "raise", "return", "True", "try", "while",
    "with", "yield", "self",
];
const JS: &[&str] = &[
    "async",
    "await",
    "break",
    "case",
    "catch",
    "class",
    "const",
    "continue",
    "default",
    "delete",
    "do",
    "else",
    "export",
    "extends",
    "false",
    "finally",
    "for",
    "function",
    "if",
    "import",
    "in",
    "instanceof",
    "interface",
    "let",
    "new",
    "null",
    "of",
    "return",
    "switch",
    "this",
    "throw",
    "true",
    "try",
    "type",
    "typeof",
    "undefined",
    "var",
    "void",
    "while",
    "yield",
];
const C: &[&str] = &[
    "auto",
    "bool",
    "break",
    "case",
    "char",
    "class",
    "const",
    "continue",
    "default",
    "delete",
    "do",
    "double",
    "else",
    "enum",
    "extern",
    "false",
    "float",
    "for",
    "if",
    "include",
    "int",
    "long",
    "namespace",
    "new",
    "nullptr",
    "private",
    "public",
    "return",
    "short",
    "signed",
    "sizeof",
    "static",
    "struct",
    "switch",
    "template",
    "this",
    "true",
    "typedef",
    "union",
    "unsigned",
    "using",
    "void",
    "volatile",
    "while",
];
const GO: &[&str] = &[
    "break",
    "case",
    "chan",
    "const",
    "continue",
    "default",
    "defer",
    "else",
    "false",
    "for",
    "func",
    "go",
    "if",
    "import",
    "interface",
    "map",
    "nil",
    "package",
    "range",
    "return",
    "select",
    "struct",
    "switch",
    "true",
    "type",
    "var",
];
const JAVA: &[&str] = &[
    "abstract",
    "boolean",
    "break",
    "case",
    "catch",
    "class",
    "continue",
    "default",
    "do",
    "double",
    "else",
    "extends",
    "false",
    "final",
    "finally",
    "float",
    "for",
    "if",
    "implements",
    "import",
    "int",
    "interface",
    "long",
    "new",
    "null",
    "package",
    "private",
    "protected",
    "public",
    "return",
    "static",
    "super",
    "switch",
    "this",
    "throw",
    "throws",
    "true",
    "try",
    "void",
    "while",
];
const SHELL: &[&str] = &[
    "case", "do", "done", "elif", "else", "esac", "export", "fi", "for", "function", "if", "in",
    "local", "return", "then", "while",
];
const DATA: &[&str] = &["true", "false", "null"];

fn lang(name: &str) -> Option<Lang> {
    let slash: &[&str] = &["//"];
    let hash: &[&str] = &["#"];
    let c_block = Some(("/*", "*/"));
    Some(match name.to_ascii_lowercase().as_str() {
        "rust" | "rs" => Lang {
            line_comment: slash,
            block_comment: c_block,
            keywords: RUST,
        },
        "python" | "py" => Lang {
            line_comment: hash,
            block_comment: None,
            keywords: PYTHON,
        },
        "javascript" | "js" | "typescript" | "ts" | "jsx" | "tsx" => Lang {
            line_comment: slash,
            block_comment: c_block,
            keywords: JS,
        },
        "c" | "cpp" | "c++" | "h" | "hpp" | "cc" => Lang {
            line_comment: slash,
            block_comment: c_block,
            keywords: C,
        },
        "go" => Lang {
            line_comment: slash,
            block_comment: c_block,
            keywords: GO,
        },
        "java" | "kotlin" => Lang {
            line_comment: slash,
            block_comment: c_block,
            keywords: JAVA,
        },
        "sh" | "bash" | "shell" | "zsh" | "console" => Lang {
            line_comment: hash,
            block_comment: None,
            keywords: SHELL,
        },
        "toml" | "yaml" | "yml" | "ini" => Lang {
            line_comment: hash,
            block_comment: None,
            keywords: DATA,
        },
        "json" => Lang {
            line_comment: &[],
            block_comment: None,
            keywords: DATA,
        },
        _ => return None,
    })
}

/// Highlights a code block line by line: `(byte range, class)` runs covering each line.
pub struct Highlighter {
    lang: Option<Lang>,
    in_block_comment: bool,
}

impl Highlighter {
    pub fn new(language: &str) -> Self {
        Self {
            lang: lang(language.split([',', ' ']).next().unwrap_or("")),
            in_block_comment: false,
        }
    }

    pub fn line(&mut self, line: &str) -> Vec<(std::ops::Range<usize>, Class)> {
        let Some(lang) = &self.lang else {
            return vec![(0..line.len(), Class::Plain)];
        };
        let mut out: Vec<(std::ops::Range<usize>, Class)> = Vec::new();
        let mut push = |r: std::ops::Range<usize>, c: Class| {
            if r.is_empty() {
                return;
            }
            match out.last_mut() {
                Some((last, lc)) if *lc == c && last.end == r.start => last.end = r.end,
                _ => out.push((r, c)),
            }
        };
        let b = line.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let rest = &line[i..];
            if self.in_block_comment {
                let end = lang.block_comment.map_or("", |bc| bc.1);
                match rest.find(end) {
                    Some(at) => {
                        push(i..i + at + end.len(), Class::Comment);
                        i += at + end.len();
                        self.in_block_comment = false;
                    }
                    None => {
                        push(i..b.len(), Class::Comment);
                        i = b.len();
                    }
                }
                continue;
            }
            if lang.line_comment.iter().any(|c| rest.starts_with(c)) {
                push(i..b.len(), Class::Comment);
                break;
            }
            if let Some((open, _)) = lang.block_comment
                && rest.starts_with(open)
            {
                self.in_block_comment = true;
                push(i..i + open.len(), Class::Comment);
                i += open.len();
                continue;
            }
            let c = b[i];
            if c == b'"' || c == b'\'' || c == b'`' {
                let mut j = i + 1;
                while j < b.len() && b[j] != c {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                let end = (j + 1).min(b.len());
                push(i..end, Class::String);
                i = end;
                continue;
            }
            if c.is_ascii_digit() {
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'.' || b[j] == b'_')
                {
                    j += 1;
                }
                push(i..j, Class::Number);
                i = j;
                continue;
            }
            if c.is_ascii_alphabetic() || c == b'_' {
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                let class = if lang.keywords.contains(&&line[i..j]) {
                    Class::Keyword
                } else {
                    Class::Plain
                };
                push(i..j, class);
                i = j;
                continue;
            }
            // Any other character (UTF-8 sequences included) is plain.
            let len = rest.chars().next().map_or(1, char::len_utf8);
            push(i..i + len, Class::Plain);
            i += len;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(lang: &str, line: &str) -> Vec<(String, Class)> {
        Highlighter::new(lang)
            .line(line)
            .into_iter()
            .map(|(r, c)| (line[r].to_string(), c))
            .collect()
    }

    #[test]
    fn rust_line() {
        let got = classes("rust", "let n = 42; // answer");
        assert_eq!(got[0], ("let".into(), Class::Keyword));
        assert!(got.contains(&("42".into(), Class::Number)));
        assert_eq!(got.last().unwrap(), &("// answer".into(), Class::Comment));
    }

    #[test]
    fn strings_escapes_and_block_comments_span_lines() {
        let got = classes("python", r#"print("a \" b") # hi"#);
        assert!(got.contains(&(r#""a \" b""#.into(), Class::String)));
        let mut h = Highlighter::new("c");
        assert_eq!(h.line("x /* start").last().unwrap().1, Class::Comment);
        assert_eq!(h.line("still */ int y;")[0], (0..8, Class::Comment));
    }

    #[test]
    fn unknown_languages_are_plain() {
        assert_eq!(
            classes("brainfuck", "+++."),
            [("+++.".to_string(), Class::Plain)]
        );
        assert_eq!(classes("rust", "é"), [("é".to_string(), Class::Plain)]);
    }
}
