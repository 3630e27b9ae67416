//! Logs go to a file in the data dir, never to the terminal (the TUI owns it).

use std::sync::OnceLock;

static GUARD: OnceLock<tracing_appender::non_blocking::WorkerGuard> = OnceLock::new();

/// Starts file logging (`$data_dir/logs/lambdachat.log`, level from `LAMBDACHAT_LOG`, default
/// `info`). Without a writable data dir, logging is off: it never blocks the program.
pub fn init() {
    let Ok(dir) = crate::fetch::data_dir().map(|d| d.join("logs")) else {
        return;
    };
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let appender = tracing_appender::rolling::never(&dir, "lambdachat.log");
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAMBDACHAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ok = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_env_filter(filter)
        .try_init()
        .is_ok();
    if ok {
        let _ = GUARD.set(guard);
    }
}
