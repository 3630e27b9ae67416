//! A `lambdachat serve` in the test's process, on the tiny model and a free port of 127.0.0.1,
//! for the tests that drive it over HTTP (`serve`, `connect`).

use std::sync::Arc;
use std::time::Duration;

use lambdachat::attention::LambdaParams;
use lambdachat::engine::Engine;
use lambdachat::sampling::SamplingParams;
use lambdachat::server::{self, Generator, GeneratorOptions, ServerState};

pub struct Options {
    pub key: Option<&'static str>,
    pub queue: usize,
    pub conversations: usize,
    pub max_tokens: usize,
    pub read_timeout: Duration,
    /// The saved conversations' database and how many it keeps.
    pub saved: Option<(std::path::PathBuf, usize)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            key: None,
            queue: 4,
            conversations: 4,
            max_tokens: 64,
            read_timeout: Duration::from_secs(30),
            saved: None,
        }
    }
}

/// Starts a server on the tiny model; returns its base URL.
pub fn start(options: Options) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    super::tiny::write_gguf(&path, "qwen2");
    let engine = Arc::new(Engine::load(&path).unwrap());
    let generator = Generator::start(
        engine,
        GeneratorOptions {
            params: LambdaParams::new(4, 32, None).unwrap(),
            conversations: options.conversations,
            queue: options.queue,
            recall: None,
            saved: options
                .saved
                .map(|(db, max)| server::SavedOptions { db, max }),
        },
    )
    .unwrap();
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let mut state = ServerState::new(
        generator,
        "tiny".into(),
        greedy,
        options.max_tokens,
        options.key,
    );
    state.read_timeout = options.read_timeout;
    let state = Arc::new(state);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _dir = dir;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = server::bind("127.0.0.1", 0).await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            server::serve(listener, state, std::future::pending())
                .await
                .unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}
