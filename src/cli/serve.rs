//! `lambdachat serve`: the model behind an OpenAI-compatible HTTP API (see `server`).

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use super::RunArgs;
use crate::config::Config;
use crate::server::{self, Generator, GeneratorOptions, SavedOptions, ServerState};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Address to listen on; anything but a loopback address needs --api-key
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Key clients must send as `Authorization: Bearer KEY`
    #[arg(long, env = "LAMBDACHAT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Conversations kept live in RAM, each one bounded Λ cache; the least recently used go first
    #[arg(long, default_value_t = 4)]
    pub conversations: usize,
    /// Idle conversations beyond --conversations kept on disk (in the data dir, per port; not
    /// with --port 0) and restored on their next request; the least recently used go first; 0
    /// drops them
    #[arg(long, default_value_t = 16)]
    pub saved_conversations: usize,
    /// Requests that may wait while one is answered; more are refused with 429
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// The longest reply a request may ask for, and what it gets when it does not say
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
}

/// Where idle conversations wait: a store of the server's own per port (so two servers never
/// share one), in the data dir; none when none are to be kept, when the port is any free one
/// (a later server could not know its store), or when there is no data dir.
fn saved_options(port: u16, max: usize) -> Option<SavedOptions> {
    if max == 0 || port == 0 {
        return None;
    }
    match crate::fetch::data_dir() {
        Ok(dir) => Some(SavedOptions {
            db: dir
                .join("serve")
                .join(format!("port-{port}"))
                .join("conversations.db"),
            max,
        }),
        Err(e) => {
            tracing::warn!("idle conversations will not be kept on disk: {e}");
            None
        }
    }
}

pub fn run(args: ServeArgs, config: &Config) -> Result<i32> {
    // Before anything is fetched or loaded: an exposed server without a key never starts.
    server::check_exposure(&args.host, args.api_key.as_deref())?;
    let settings = args.run.settings(config)?;
    let (engine, params) = settings.load()?;
    let model = engine.path.file_stem().map_or_else(
        || engine.model.info().name.clone(),
        |s| s.to_string_lossy().into_owned(),
    );
    let generator = Generator::start(
        engine.clone(),
        GeneratorOptions {
            params,
            conversations: args.conversations,
            queue: args.queue,
            recall: settings.recall_setup()?,
            saved: saved_options(args.port, args.saved_conversations),
        },
    )
    .context("starting the generation thread")?;
    let state = Arc::new(ServerState::new(
        generator,
        model.clone(),
        settings.sampling.clone(),
        args.max_tokens,
        args.api_key.as_deref(),
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the server's runtime")?;
    runtime.block_on(async {
        let listener = server::bind(&args.host, args.port).await?;
        let addr = listener.local_addr().context("reading the bound address")?;
        eprintln!(
            "serving {model} on http://{addr}/v1 (Λ: n_global {}, n_local {}; {} conversations live at most; Ctrl-C stops)",
            params.n_global, params.n_local, args.conversations
        );
        if engine.template.is_fallback() {
            eprintln!(
                "note: the model has no chat template of its own; chat completions are written in \
                 {}. A base model answers better through /v1/completions (raw text)",
                engine.template.fallback_name()
            );
        }
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        server::serve(listener, state, shutdown)
            .await
            .context("serving")?;
        anyhow::Ok(())
    })?;
    Ok(0)
}
