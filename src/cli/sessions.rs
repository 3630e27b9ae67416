//! `lambdachat sessions`: the saved conversations from the command line (the chat's session
//! list, F4, does the same on screen). `lambdachat --resume ID` opens one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::store::Store;

#[derive(Subcommand)]
pub enum SessionsCommand {
    /// List saved conversations, most recent first
    List,
    /// Give a conversation a new title
    Rename { id: i64, title: String },
    /// Delete a conversation and its saved cache
    Delete { id: i64 },
    /// Write a conversation as Markdown (to stdout without FILE)
    Export { id: i64, file: Option<PathBuf> },
}

fn open() -> Result<Store> {
    let dir = crate::fetch::data_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::durable::restrict_dir(&dir);
    Ok(Store::open(&dir.join("sessions.db"))?)
}

pub fn run(command: Option<SessionsCommand>) -> Result<i32> {
    let store = open()?;
    match command.unwrap_or(SessionsCommand::List) {
        SessionsCommand::List => {
            let list = store.list()?;
            if list.is_empty() {
                eprintln!("no saved conversations yet");
            }
            for s in list {
                let model = std::path::Path::new(&s.model)
                    .file_name()
                    .map_or(s.model.clone(), |f| f.to_string_lossy().into_owned());
                println!(
                    "{:>5}  {:>4} messages  {model}  {}",
                    s.id, s.messages, s.title
                );
            }
        }
        SessionsCommand::Rename { id, title } => store.rename(id, &title)?,
        SessionsCommand::Delete { id } => store.delete(id)?,
        SessionsCommand::Export { id, file } => match file {
            // Written aside and renamed into place: an interrupted export leaves no half file.
            Some(path) => {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                let tmp = path.with_file_name(format!(
                    ".{}.{}.partial",
                    name.unwrap_or_default(),
                    std::process::id()
                ));
                let mut out = std::io::BufWriter::new(
                    std::fs::File::create(&tmp)
                        .with_context(|| format!("writing {}", tmp.display()))?,
                );
                store.export(id, &mut out)?;
                out.into_inner()
                    .map_err(|e| e.into_error())
                    .and_then(|f| f.sync_all())
                    .and_then(|()| crate::durable::rename(&tmp, &path))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            None => store.export(id, &mut std::io::stdout().lock())?,
        },
    }
    Ok(0)
}
