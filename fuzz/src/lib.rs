//! What the fuzz targets share: a scratch path per process and a tiny model to run things on.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use lambdachat::engine::Engine;

#[path = "../../tests/common/tiny.rs"]
#[allow(dead_code)]
pub mod tiny;

/// A file path of this process's own, on a memory-backed file system when there is one (a
/// target that writes its input to a file every execution would otherwise be disk bound).
pub fn scratch(name: &str) -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    let base = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("lambdachat-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir.join(name)
}

/// The tiny random Qwen2 model of the tests, loaded once per process.
pub fn tiny_engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = scratch("tiny-qwen2.gguf");
            tiny::write_gguf(&path, "qwen2");
            Arc::new(Engine::load(&path).expect("the tiny model loads"))
        })
        .clone()
}
