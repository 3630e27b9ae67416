//! Writes that survive a crash or a power loss: a file is written aside, synced, renamed into
//! place, and its directory synced, so after a crash there is either the old file or the whole
//! new one — never one of the right size full of zeros (a rename can reach the disk before the
//! data it names). Plus the permissions of what is private (conversations, logs).

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// Syncs a file's data and metadata to disk.
pub fn sync_file(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// Syncs a directory: its entries (a rename, a new file) reach the disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Syncs every file under `dir` (and the directories themselves), for a directory about to be
/// renamed into place.
pub fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            sync_file(&path)?;
        }
    }
    sync_dir(dir)
}

/// Renames `from` (already synced) to `to` and syncs the directory that holds `to`.
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::rename(from, to)?;
    sync_dir(parent(to))
}

/// Writes `contents` to `path` durably: aside, synced, renamed, directory synced.
pub fn write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.partial", std::process::id()));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Removes what killed runs left in `dir`: files and folders named `….PID.partial`,
/// `….PID.wheels` or `….partial-PID` whose process no longer runs (a live run's are kept).
pub fn remove_abandoned(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = writer_pid(&name) else {
            continue;
        };
        if process_is_gone(pid) {
            let path = entry.path();
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
}

/// The process id in the name of a file being written, if it is one.
fn writer_pid(name: &str) -> Option<u32> {
    if let Some((_, pid)) = name.rsplit_once(".partial-") {
        return pid.parse().ok();
    }
    let stem = name
        .strip_suffix(".partial")
        .or_else(|| name.strip_suffix(".wheels"))?;
    stem.rsplit_once('.')?.1.parse().ok()
}

/// Whether no process `pid` runs (only known where `/proc` is; elsewhere it is assumed alive).
fn process_is_gone(pid: u32) -> bool {
    Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes a directory of private data (conversations, logs, models) readable by its owner only
/// (best effort: on a file system without permissions nothing changes).
pub fn restrict_dir(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Makes a private file readable and writable by its owner only (best effort).
pub fn restrict_file(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_write_replaces_the_file_whole_and_leaves_nothing_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.csv");
        write(&path, b"old").unwrap();
        write(&path, b"new contents").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new contents");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no partial file left");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("x");
        assert!(write(&path, b"x").is_err());
        assert!(!path.exists());
    }

    #[test]
    fn what_killed_runs_left_is_removed_and_live_runs_kept() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let dead = 4_000_000_000u32;
        let keep = [
            format!("m.gguf.{me}.partial"),
            format!(".out.partial-{me}"),
            "notes.partial.txt".to_string(),
            "m.gguf".to_string(),
        ];
        let gone = [
            format!("m.gguf.{dead}.partial"),
            format!(".out.csv.{dead}.partial"),
            format!(".model.partial-{dead}"),
        ];
        for name in keep.iter().chain(&gone) {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        let wheels = dir.path().join(format!("m.gguf.{dead}.wheels"));
        fs::create_dir_all(wheels.join("pkg")).unwrap();
        remove_abandoned(dir.path());
        for name in &keep {
            assert!(dir.path().join(name).exists(), "{name} kept");
        }
        for name in &gone {
            assert!(!dir.path().join(name).exists(), "{name} removed");
        }
        assert!(!wheels.exists());
    }

    #[cfg(unix)]
    #[test]
    fn private_places_are_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"").unwrap();
        restrict_dir(dir.path());
        restrict_file(&file);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.path()), 0o700);
        assert_eq!(mode(&file), 0o600);
    }
}
