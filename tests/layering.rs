//! The layering of docs/ARCHITECTURE.md, held against the code: every `crate::` path in a
//! module's source (comments aside) must name a module its row of the "Layers" table allows,
//! and every module of `src/` must have a row. So the layering cannot drift silently: an upward
//! import fails here until the table (and with it the design) is changed on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The "Layers" table: `| module | may import |`, one row per top-level module.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let table = doc
        .split("## Layers")
        .nth(1)
        .expect("docs/ARCHITECTURE.md has a \"## Layers\" section");
    let mut rows = BTreeMap::new();
    for line in table.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (module, imports) = (cells[1].trim_matches('`'), cells[2]);
        if module == "module" || module.starts_with("---") {
            continue;
        }
        let imports = imports
            .split(',')
            .map(|m| m.trim().trim_matches('`').to_string())
            .filter(|m| !m.is_empty() && m != "—" && m != "everything")
            .collect();
        let everything = cells[2].contains("everything");
        rows.insert(
            module.to_string(),
            if everything {
                BTreeSet::from(["*".to_string()])
            } else {
                imports
            },
        );
    }
    rows
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate modules a source file names in code: `crate::x::…` and `crate::{x::…, y}` (nested
/// groups and groups over several lines included).
fn crate_modules(source: &str) -> BTreeSet<String> {
    let code: Vec<&str> = source
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect();
    let code = code.join("\n");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            found.insert(ident(rest));
            continue;
        };
        // The group's top-level items, up to its closing brace.
        let (mut depth, mut item_start) = (0, 0);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    found.insert(ident(&group[item_start..i]));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    found.insert(ident(&group[item_start..i]));
                    item_start = i + 1;
                }
                _ => {}
            }
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

#[test]
fn modules_import_only_what_their_layer_allows() {
    let allowed = allowed();
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut modules = BTreeSet::new();
    let mut violations = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        modules.insert(module.clone());
        let Some(may) = allowed.get(&module) else {
            continue;
        };
        if may.contains("*") {
            continue;
        }
        let source = std::fs::read_to_string(file).unwrap();
        for used in crate_modules(&source) {
            if used != module && !may.contains(&used) {
                violations.push(format!("{} imports `{used}`", rel.display()));
            }
        }
    }
    let missing: Vec<&String> = modules
        .iter()
        .filter(|m| !allowed.contains_key(*m))
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a row in docs/ARCHITECTURE.md's Layers table: {missing:?}"
    );
    let stale: Vec<&String> = allowed.keys().filter(|m| !modules.contains(*m)).collect();
    assert!(
        stale.is_empty(),
        "rows for modules that do not exist: {stale:?}"
    );
    assert!(
        violations.is_empty(),
        "imports outside the layer (docs/ARCHITECTURE.md, Layers):\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scanner_sees_grouped_and_inline_paths_but_not_comments() {
    let source = "use crate::{attention::X, chat::{A, B},\n    engine};\n\
                  let x = crate::model::load(); // crate::tui::app\n// crate::worker\n";
    assert_eq!(
        crate_modules(source).into_iter().collect::<Vec<_>>(),
        ["attention", "chat", "engine", "model"]
    );
}
