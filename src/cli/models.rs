//! `lambdachat models`: the models on this machine — the data dir (the default model, GGUF
//! files and converted directories put there) and the Hugging Face cache (`hf:` references).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::fetch::{self, DEFAULT_MODEL, GEMMA3_270M, KnownModel, QWEN_1_5B};
use crate::hub::{self, HubRef};
use crate::progress::Stderr;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Models in the data dir and the Hugging Face cache (the default)
    List,
    /// Download a model: `default`, `gemma3-270m`, `qwen2.5-coder-1.5b`, or hf:ORG/REPO[@REVISION][:FILE]
    Pull { model: String },
    /// Delete a model: a file or directory name in the data dir, a known name, or hf:ORG/REPO
    Rm { model: String },
    /// Print where a model is on disk, without downloading it
    Path { model: String },
}

/// The models `pull` knows by name.
const KNOWN: &[(&str, &KnownModel)] = &[
    ("default", &DEFAULT_MODEL),
    ("gemma3-270m", &GEMMA3_270M),
    ("qwen2.5-coder-1.5b", &QWEN_1_5B),
];

fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub fn run(command: Option<ModelsCommand>) -> Result<i32> {
    match command.unwrap_or(ModelsCommand::List) {
        ModelsCommand::List => list(),
        ModelsCommand::Pull { model } => {
            let path = match HubRef::parse(&model)? {
                Some(r) => hub::resolve(&r, &Stderr)?,
                None => match known(&model) {
                    Some(m) => fetch::ensure(m)?,
                    None => bail!(
                        "unknown model '{model}': pull takes `default`, `gemma3-270m`, `qwen2.5-coder-1.5b` or hf:ORG/REPO[@REVISION][:FILE]"
                    ),
                },
            };
            println!("{}", path.display());
            Ok(0)
        }
        ModelsCommand::Path { model } => {
            println!("{}", local_path(&model)?.display());
            Ok(0)
        }
        ModelsCommand::Rm { model } => {
            let path = match HubRef::parse(&model)? {
                Some(r) if r.file.is_some() || r.revision != "main" => {
                    bail!("rm removes whole repositories: write hf:{}", r.repo)
                }
                Some(r) => {
                    let dir = hub::repo_dir(&r);
                    if !dir.is_dir() {
                        bail!("hf:{} is not in the Hugging Face cache", r.repo);
                    }
                    dir
                }
                None => local_path(&model)?,
            };
            remove(&path)?;
            eprintln!("removed {}", path.display());
            Ok(0)
        }
    }
}

/// Where `model` (a known name, a name in the data dir, or an `hf:` reference) is on disk.
fn local_path(model: &str) -> Result<PathBuf> {
    if let Some(r) = HubRef::parse(model)? {
        return hub::cached(&r).with_context(|| {
            format!(
                "{model} is not in the Hugging Face cache ({}); `lambdachat models pull {model}` fetches it",
                hub::cache().path().display()
            )
        });
    }
    let dir = fetch::models_dir()?;
    let name = known(model).map_or(model, |m| m.file_name);
    let path = dir.join(name);
    if !path.exists() || name.contains('/') || name.starts_with('.') {
        bail!("no model '{model}' in {}", dir.display());
    }
    Ok(path)
}

fn remove(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    r.with_context(|| format!("removing {}", path.display()))
}

fn list() -> Result<i32> {
    let dir = fetch::models_dir()?;
    println!("data dir  {}", dir.display());
    let mut entries: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let is_model = name.ends_with(".gguf") || path.join("config.json").is_file();
            let size = if path.is_dir() {
                hub::dir_size(&path)
            } else {
                e.metadata().ok()?.len()
            };
            (is_model && !name.starts_with('.')).then_some((name, size))
        })
        .collect();
    entries.sort();
    if entries.is_empty() {
        println!("  (none yet: `lambdachat` fetches the default model on first use)");
    }
    for (name, size) in entries {
        let tag = KNOWN
            .iter()
            .find(|(_, m)| m.file_name == name)
            .map(|(n, _)| format!("  ({n})"))
            .unwrap_or_default();
        println!("  {name:<48} {:>10}{tag}", mb(size));
    }
    println!("HF cache  {}", hub::cache().path().display());
    let repos = hub::cached_repos();
    if repos.is_empty() {
        println!("  (empty)");
    }
    for (id, _, size) in repos {
        println!("  {:<48} {:>10}", format!("hf:{id}"), mb(size));
    }
    Ok(0)
}
