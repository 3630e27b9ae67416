//! `hf:ORG/REPO[@REVISION][:FILE]` model references.
//!
//! Resolution reads the Hugging Face cache first (`$HF_HOME/hub`, laid out as `huggingface_hub`
//! lays it out), so a model downloaded once opens offline; only what the cache lacks is fetched
//! from the Hub (`$HF_ENDPOINT`, the token file beside the cache), with a progress bar on stderr.
//! Without `:FILE` the reference names a safetensors directory (config.json, tokenizer, weights),
//! or the repo's only `.gguf` file.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use hf_hub::{Cache, Repo, RepoType};
use serde_json::Value as Json;

use crate::model::gguf::gguf_files_in;
use crate::progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("'{0}' is not a model reference: write hf:ORG/REPO[@REVISION][:FILE]")]
    BadReference(String),
    #[error(
        "hf:{repo}: {file} is not in the Hugging Face cache ({cache}) and the Hub is not reachable"
    )]
    NotCached {
        repo: String,
        file: String,
        cache: PathBuf,
    },
    #[error("hf:{repo}: {file}: {msg}")]
    Download {
        repo: String,
        file: String,
        msg: String,
    },
    #[error("hf:{0} holds several GGUF files; name one: {1}")]
    Ambiguous(String, String),
    #[error("hf:{0} has neither config.json nor a .gguf file")]
    NotAModel(String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("hf:{0}: '{1}' is not a file name inside the repository (no absolute paths, no `..`)")]
    BadFileName(String, String),
}

/// Whether `name` stays inside the directory it is joined to: relative, without `..`, `.` or
/// empty parts, without backslashes or drive letters. File names come from references people
/// paste and from a repository's own listing and index, which a hostile repository writes.
pub fn is_inside_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && !name.contains(':')
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Seconds a download may go without receiving a byte before it is given up as stalled
/// (`LAMBDACHAT_HUB_STALL_SECS` changes it, for tests).
fn stall_limit() -> Duration {
    let secs = std::env::var("LAMBDACHAT_HUB_STALL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// A parsed `hf:` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
}

impl HubRef {
    /// `None` when `s` is not an `hf:` reference (a path), an error when it is a malformed one.
    pub fn parse(s: &str) -> Result<Option<Self>, HubError> {
        let Some(rest) = s.strip_prefix("hf:") else {
            return Ok(None);
        };
        let bad = || HubError::BadReference(s.to_string());
        let (repo_rev, file) = match rest.split_once(':') {
            Some((r, f)) if is_inside_name(f) => (r, Some(f.to_string())),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        let (repo, revision) = match repo_rev.split_once('@') {
            Some((r, v)) if !v.is_empty() => (r, v.to_string()),
            Some(_) => return Err(bad()),
            None => (repo_rev, "main".to_string()),
        };
        let valid = repo
            .split_once('/')
            .is_some_and(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'));
        if !valid {
            return Err(bad());
        }
        Ok(Some(Self {
            repo: repo.to_string(),
            revision,
            file,
        }))
    }

    fn hub_repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

/// The Hugging Face cache (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
pub fn cache() -> Cache {
    Cache::from_env()
}

/// Where the cache keeps `r`'s repository (`models--ORG--REPO`), whether or not it is there.
pub fn repo_dir(r: &HubRef) -> PathBuf {
    cache().path().join(r.hub_repo().folder_name())
}

/// The cached snapshot directory of `r`, if its revision has been downloaded: a branch or tag
/// through `refs/`, a commit hash directly.
fn snapshot_dir(r: &HubRef) -> Option<PathBuf> {
    let repo_dir = repo_dir(r);
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(&r.revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| r.revision.clone());
    let dir = repo_dir.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// Local path of `r` without any download: the cached file or model directory.
pub fn cached(r: &HubRef) -> Option<PathBuf> {
    let dir = snapshot_dir(r)?;
    match &r.file {
        Some(f) => Some(dir.join(f)).filter(|p| p.exists()),
        None if dir.join("config.json").is_file() => Some(dir),
        None => match gguf_files_in(&dir).as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        },
    }
}

/// Resolves `r` to a local path, downloading what the cache lacks.
pub fn resolve(r: &HubRef, progress: &dyn Progress) -> Result<PathBuf, HubError> {
    if let Some(p) = cached(r) {
        return Ok(p);
    }
    let offline = |file: &str| HubError::NotCached {
        repo: r.repo.clone(),
        file: file.to_string(),
        cache: cache().path().clone(),
    };
    if !crate::fetch::hub_reachable() {
        return Err(offline(r.file.as_deref().unwrap_or("config.json")));
    }
    // $HF_TOKEN beats the token file, as in huggingface_hub.
    let token = std::env::var("HF_TOKEN").ok().or_else(|| cache().token());
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_token(token)
        .with_progress(false)
        .build()
        .map_err(|e| download_err(r, "the Hub client", &e))?;
    let repo = api.repo(r.hub_repo());
    let get = |file: &str| {
        if !is_inside_name(file) {
            return Err(HubError::BadFileName(r.repo.clone(), file.to_string()));
        }
        download(&api, r, file, progress)
    };
    if let Some(f) = &r.file {
        return get(f);
    }
    let info = repo
        .info()
        .map_err(|e| download_err(r, "the repository listing", &e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let has = |f: &str| files.iter().any(|x| x == f);
    if !has("config.json") {
        let mut ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
        ggufs.sort();
        return match ggufs.as_slice() {
            [] => Err(HubError::NotAModel(r.repo.clone())),
            [one] => get(one),
            many => Err(HubError::Ambiguous(
                r.repo.clone(),
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        };
    }
    let config = get("config.json")?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        if has(f) {
            get(f)?;
        }
    }
    if has("model.safetensors.index.json") {
        let index = get("model.safetensors.index.json")?;
        let text = std::fs::read_to_string(&index).map_err(|e| HubError::Io(index.clone(), e))?;
        let json: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
        let mut shards: Vec<&str> = json
            .get("weight_map")
            .and_then(Json::as_object)
            .map(|m| m.values().filter_map(Json::as_str).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        for s in shards {
            get(s)?;
        }
    } else if has("model.safetensors") {
        get("model.safetensors")?;
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// What the download thread reports.
enum Report {
    Start(u64, String),
    Bytes(u64),
    Done(Result<PathBuf, String>),
}

/// Downloads `file` of `r` on a thread of its own, forwarding its progress, and gives up when no
/// byte arrives for [`stall_limit`] (the Hub client has no read time-out: a stalled connection
/// would hang the program forever). A given-up thread is left to its socket; its partial file
/// stays in the Hub cache's own incomplete state, never in a snapshot.
fn download(
    api: &hf_hub::api::sync::Api,
    r: &HubRef,
    file: &str,
    progress: &dyn Progress,
) -> Result<PathBuf, HubError> {
    let (tx, rx) = mpsc::channel();
    let (api, hub_repo, name) = (api.clone(), r.hub_repo(), file.to_string());
    std::thread::Builder::new()
        .name("lambdachat-download".into())
        .spawn(move || {
            let forward = Forward(tx.clone());
            let result = api
                .repo(hub_repo)
                .download_with_progress(&name, forward)
                .map_err(|e| e.to_string());
            let _ = tx.send(Report::Done(result));
        })
        .map_err(|e| download_err(r, file, &e))?;
    let limit = stall_limit();
    let (mut shown, mut done, mut total) = (None, 0u64, 0u64);
    let mut name = file.to_string();
    loop {
        match rx.recv_timeout(limit) {
            Ok(Report::Start(size, n)) => (total, done, name) = (size, 0, n),
            Ok(Report::Bytes(n)) => {
                done += n;
                let percent = (done * 100).checked_div(total).unwrap_or(100);
                if shown != Some(percent) {
                    shown = Some(percent);
                    progress.bytes(&name, done, total);
                }
            }
            Ok(Report::Done(result)) => return result.map_err(|e| download_err(r, file, &e)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let why = format!(
                    "the download stalled (no data for {} s after {done} bytes); try again",
                    limit.as_secs()
                );
                return Err(download_err(r, file, &why));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(download_err(r, file, &"the download thread stopped"));
            }
        }
    }
}

fn download_err(r: &HubRef, file: &str, e: &dyn std::fmt::Display) -> HubError {
    let msg = e.to_string();
    // The status as the HTTP client words it: a bare "401" could be part of a port or a path.
    let status = |code: &str| msg.contains(&format!("status code {code}"));
    let hint = if status("401") || status("403") {
        " (a private or gated repo needs a token: $HF_TOKEN or the token file)"
    } else if status("404") {
        " (no such repo, revision or file)"
    } else {
        ""
    };
    HubError::Download {
        repo: r.repo.clone(),
        file: file.to_string(),
        msg: format!("{msg}{hint}"),
    }
}

/// Cached repositories: (`ORG/REPO`, directory, bytes on disk).
pub fn cached_repos() -> Vec<(String, PathBuf, u64)> {
    let root = cache().path().clone();
    let mut v: Vec<(String, PathBuf, u64)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix("models--")?.replacen("--", "/", 1);
            let path = e.path();
            let size = dir_size(&path.join("blobs"));
            Some((id, path, size))
        })
        .collect();
    v.sort();
    v
}

/// Bytes of the files under `dir`, following links to files (an HF snapshot links to its
/// blobs).
pub fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| match (e.file_type(), std::fs::metadata(e.path())) {
            (Ok(t), _) if t.is_dir() => dir_size(&e.path()),
            (_, Ok(m)) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

/// hf-hub's progress callbacks, sent to the thread that waits for the download.
struct Forward(mpsc::Sender<Report>);

impl hf_hub::api::Progress for Forward {
    fn init(&mut self, size: usize, filename: &str) {
        let _ = self
            .0
            .send(Report::Start(size as u64, filename.to_string()));
    }

    fn update(&mut self, size: usize) {
        let _ = self.0.send(Report::Bytes(size as u64));
    }

    fn finish(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_revision_and_file() {
        let r = HubRef::parse("hf:Qwen/Qwen3-0.6B").unwrap().unwrap();
        assert_eq!(
            (r.repo.as_str(), r.revision.as_str(), r.file),
            ("Qwen/Qwen3-0.6B", "main", None)
        );
        let r = HubRef::parse("hf:org/repo@v1.0:sub/model.gguf")
            .unwrap()
            .unwrap();
        assert_eq!(r.revision, "v1.0");
        assert_eq!(r.file.as_deref(), Some("sub/model.gguf"));
        assert_eq!(HubRef::parse("models/x.gguf").unwrap(), None);
        for bad in [
            "hf:",
            "hf:a/b:../../etc/passwd",
            "hf:a/b:/etc/passwd",
            "hf:a/b:sub/../../x.gguf",
            "hf:a/b:./x.gguf",
            "hf:a/b:sub//x.gguf",
            "hf:noslash",
            "hf:a/b/c",
            "hf:/b",
            "hf:a/b@",
            "hf:a/b:",
        ] {
            assert!(HubRef::parse(bad).is_err(), "{bad}");
        }
    }

    /// The hint follows the HTTP status, not digits elsewhere in the message (a local test
    /// server on port 40113 once read as "401").
    #[test]
    fn download_hints_follow_the_status() {
        let r = HubRef::parse("hf:org/repo").unwrap().unwrap();
        let hint = |msg: &str| download_err(&r, "f", &msg).to_string();
        let url = "http://127.0.0.1:40113/api/models/org/repo/revision/main";
        assert!(hint(&format!("{url}: status code 404")).contains("(no such repo"));
        assert!(hint(&format!("{url}: status code 401")).contains("needs a token"));
        assert!(hint(&format!("{url}: status code 403")).contains("needs a token"));
        let other = hint(&format!("{url}: status code 500"));
        assert!(!other.contains("(no such repo") && !other.contains("needs a token"));
    }
}
