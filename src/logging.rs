//! Logs go to a file in the data dir, never to the terminal (the TUI owns it). The file is
//! private (the data dir is its owner's only), capped in size (one previous file is kept, so
//! an endless chat never fills the disk with its log), and flushed at exit.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

static GUARD: Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> = Mutex::new(None);

/// Bytes a log file grows to before it becomes `lambdachat.log.1` and a new one starts.
const LOG_CAP: u64 = 8 << 20;

/// Starts file logging (`$data_dir/logs/lambdachat.log`, level from `LAMBDACHAT_LOG`, default
/// `info`). Without a writable data dir, logging is off: it never blocks the program.
pub fn init() {
    let Ok(data) = crate::fetch::data_dir() else {
        return;
    };
    let dir = data.join("logs");
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    crate::durable::restrict_dir(&data);
    crate::durable::restrict_dir(&dir);
    let Ok(log) = CappedLog::open(dir.join("lambdachat.log"), LOG_CAP) else {
        return;
    };
    let (writer, guard) = tracing_appender::non_blocking(log);
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAMBDACHAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ok = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_env_filter(filter)
        .try_init()
        .is_ok();
    if ok && let Ok(mut g) = GUARD.lock() {
        *g = Some(guard);
    }
}

/// Writes out the log lines still queued (call before the process exits: `exit` runs no
/// destructors of statics, and the last lines are the ones that explain an exit).
pub fn finish() {
    if let Ok(mut g) = GUARD.lock() {
        g.take();
    }
}

/// A log file that starts afresh past `cap` bytes, keeping the previous one as `NAME.1`.
struct CappedLog {
    path: PathBuf,
    file: File,
    written: u64,
    cap: u64,
}

impl CappedLog {
    fn open(path: PathBuf, cap: u64) -> std::io::Result<Self> {
        let file = Self::append(&path)?;
        let written = file.metadata()?.len();
        let mut log = Self {
            path,
            file,
            written,
            cap,
        };
        if log.written >= cap {
            log.rotate()?;
        }
        Ok(log)
    }

    fn append(path: &std::path::Path) -> std::io::Result<File> {
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(path)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(&self.path, PathBuf::from(old))?;
        self.file = Self::append(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.cap && self.written > 0 {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_starts_afresh_past_its_cap_keeping_one_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.log");
        let mut log = CappedLog::open(path.clone(), 100).unwrap();
        for i in 0..30 {
            writeln!(log, "line {i:04}").unwrap();
        }
        log.flush().unwrap();
        let now = std::fs::metadata(&path).unwrap().len();
        let before = std::fs::metadata(dir.path().join("l.log.1")).unwrap().len();
        assert!(now <= 100 && before <= 100, "{now} {before}");
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("line 0029")
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        // Reopened past its cap, it starts afresh at once.
        std::fs::write(&path, vec![b'x'; 200]).unwrap();
        CappedLog::open(path.clone(), 100).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}
