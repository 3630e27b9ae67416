//! `lambdachat serve`: an OpenAI-compatible HTTP server whose conversations run on Λ caches.
//!
//! - `POST /v1/chat/completions`: streaming (server-sent events ending in `data: [DONE]`) or
//!   not; `usage` carries a `lambdachat` extension (tokens reused, fed, seen, attended,
//!   evicted; KV bytes).
//! - `POST /v1/completions`: a text continued raw, with no chat template (base models), in the
//!   same two ways; a prompt that extends an earlier prompt and its completion continues it.
//! - `GET /v1/models`, `GET /health`.
//! - lambdachat's extension, for the chat connected with `--connect`: `GET /lambdachat/v1/info`
//!   (the Λ) and `POST /lambdachat/v1/conversation` (a held conversation's timeline, a
//!   message's tokens, pins). While a streamed reply's prompt is read, SSE comments
//!   (`: prefill DONE/TOTAL`, which OpenAI clients skip) say how far it got.
//!
//! The HTTP side (axum on a current-thread tokio runtime) checks requests and never touches the
//! model; [`generator`] runs every job on one thread that owns the live conversations. Errors
//! take OpenAI's shape (`{"error": {message, type, param, code}}`) with the matching status.
//! With an API key every route but `/health` needs `Authorization: Bearer KEY`, compared in
//! constant time. Message text is never logged.

mod generator;
mod openai;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use generator::{Event, Refused};
pub use generator::{Generator, GeneratorOptions, SavedOptions};
use openai::{ApiError, ChatRequest, Checked, FinishReason, TextRequest, Usage};

use crate::protocol::{LookRequest, Looked, ServerInfo};
use crate::sampling::SamplingParams;

/// What the HTTP side needs.
pub struct ServerState {
    pub generator: Generator,
    /// The model's name in responses and `/v1/models`.
    pub model: String,
    /// Sampling when a request does not say.
    pub sampling: SamplingParams,
    /// The most tokens a reply may ask for (and what it gets when it does not ask).
    pub max_tokens: usize,
    /// Requests whose body is larger are refused (413).
    pub max_body_bytes: usize,
    /// SHA-256 of the API key, when there is one.
    api_key: Option<[u8; 32]>,
    /// The longest a client may take to send a request's headers or its body, and the longest
    /// a kept-alive connection may stay idle.
    pub read_timeout: Duration,
    started: u64,
    requests: AtomicU64,
}

impl ServerState {
    pub fn new(
        generator: Generator,
        model: String,
        sampling: SamplingParams,
        max_tokens: usize,
        api_key: Option<&str>,
    ) -> Self {
        Self {
            generator,
            model,
            sampling,
            max_tokens,
            max_body_bytes: 4 << 20,
            api_key: api_key.map(digest),
            read_timeout: Duration::from_secs(30),
            started: now(),
            requests: AtomicU64::new(0),
        }
    }
}

/// Why the server will not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to listen on {0} without an API key: anyone who can reach it could use the model (pass --api-key KEY or set LAMBDACHAT_API_KEY, or listen on 127.0.0.1)"
    )]
    NeedsKey(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
}

/// Checks that a server on `host` may start with or without a key: anything but a loopback
/// address needs one.
pub fn check_exposure(host: &str, api_key: Option<&str>) -> Result<(), ServeError> {
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback || api_key.is_some_and(|k| !k.is_empty()) {
        Ok(())
    } else {
        Err(ServeError::NeedsKey(host.to_string()))
    }
}

/// Binds `host:port` (port 0: any free port).
pub async fn bind(host: &str, port: u16) -> Result<tokio::net::TcpListener, ServeError> {
    let addr = format!("{host}:{port}");
    tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| ServeError::Bind(addr, e))
}

/// Serves on `listener` until `shutdown` completes. Each connection is HTTP/1.1 with a limit
/// on the time its request headers may take, which also closes a kept-alive connection that
/// stays idle that long; a request body must arrive within the same time (408).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ServerState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let timeout = state.read_timeout;
    let app = router(state);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
}

pub fn router(state: Arc<ServerState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(text_completions))
        .route("/v1/models", get(models))
        .route("/lambdachat/v1/info", get(info))
        .route("/lambdachat/v1/conversation", post(conversation))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equal digests, compared without an early exit (the time says nothing about the key).
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(
    State(state): State<Arc<ServerState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|k| digest(k.trim()));
        if !given.is_some_and(|g| same_digest(&g, key)) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                "a valid API key is needed: Authorization: Bearer KEY",
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        &format!("no route {} {}", request.method(), request.uri().path()),
    )
}

async fn models(State(state): State<Arc<ServerState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": state.model,
            "object": "model",
            "created": state.started,
            "owned_by": "lambdachat",
        }]
    }))
}

async fn info(State(state): State<Arc<ServerState>>) -> Json<ServerInfo> {
    let params = state.generator.params;
    Json(ServerInfo {
        model: state.model.clone(),
        n_global: params.n_global,
        n_local: params.n_local,
        distance_limit: params.distance_limit,
        kv_type: state.generator.kv_type.name().to_string(),
        max_tokens: state.max_tokens,
    })
}

/// A look at a held conversation (see [`LookRequest`]): queued with the replies, as the
/// generation thread owns the conversations.
async fn conversation(
    State(state): State<Arc<ServerState>>,
    request: Request,
) -> Result<Json<Looked>, ApiError> {
    let body: LookRequest = read_json(&state, request, "a conversation look").await?;
    let (events, mut replies) = unbounded_channel();
    state.generator.look(body, events).map_err(refusal)?;
    match replies.recv().await {
        Some(Event::Looked(looked)) => Ok(Json(looked)),
        Some(Event::NotHeld) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "conversation_not_held",
            "the server holds no conversation with exactly these messages (it reads them anew \
             with the next request)",
        )),
        Some(Event::Failed(message)) => Err(ApiError::invalid(&message, Some("look"))),
        _ => Err(failed("the generator stopped before answering".into())),
    }
}

/// Why a job was not queued, in OpenAI's shape.
fn refusal(refused: Refused) -> ApiError {
    match refused {
        Refused::Busy => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "server_busy",
            "the server is busy with other requests; retry shortly",
        ),
        Refused::Gone => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "generator_stopped",
            "the model is not running any more; restart the server",
        ),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which of OpenAI's endpoints a reply takes the shape of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `/v1/chat/completions`: a message, streamed as deltas.
    Chat,
    /// `/v1/completions`: a text, streamed as pieces of it.
    Text,
}

async fn chat_completions(
    State(state): State<Arc<ServerState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let body: ChatRequest = read_json(&state, request, "a chat request").await?;
    let checked = body.check(&state.sampling, state.max_tokens)?;
    respond(state, checked, Shape::Chat).await
}

async fn text_completions(
    State(state): State<Arc<ServerState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let body: TextRequest = read_json(&state, request, "a completion request").await?;
    let checked = body.check(&state.sampling, state.max_tokens)?;
    respond(state, checked, Shape::Text).await
}

/// The request's body, read within the read time-out and the size limit, parsed as JSON into
/// `T` (`what` names it in the error).
async fn read_json<T: serde::de::DeserializeOwned>(
    state: &ServerState,
    request: Request,
    what: &str,
) -> Result<T, ApiError> {
    let too_large = || {
        let message = format!(
            "the request body is larger than {} bytes",
            state.max_body_bytes
        );
        ApiError::unreadable(StatusCode::PAYLOAD_TOO_LARGE, message)
    };
    // A body announced too large is refused before it is sent.
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > state.max_body_bytes as u64) {
        return Err(too_large());
    }
    let body = request.into_body();
    let bytes = tokio::time::timeout(
        state.read_timeout,
        axum::body::to_bytes(body, state.max_body_bytes),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            &format!(
                "the request body did not arrive within {} s",
                state.read_timeout.as_secs()
            ),
        )
    })?
    .map_err(|e| {
        let over = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if over {
            too_large()
        } else {
            ApiError::unreadable(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
            )
        }
    })?;
    // Any content type: curl's `-d` says form data, and what is sent is JSON all the same.
    serde_json::from_slice(&bytes).map_err(|e| {
        let status = match e.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::unreadable(status, format!("the request body is not {what}: {e}"))
    })
}

/// Queues a checked request and answers with its reply, streamed or whole, in `shape`.
async fn respond(
    state: Arc<ServerState>,
    request: Checked,
    shape: Shape,
) -> Result<Response, ApiError> {
    let (events, replies) = unbounded_channel();
    let stream = request.stream;
    let include_usage = request.include_usage;
    state.generator.submit(request, events).map_err(refusal)?;
    let n = state.requests.fetch_add(1, Ordering::Relaxed);
    let prefix = match shape {
        Shape::Chat => "chatcmpl",
        Shape::Text => "cmpl",
    };
    let id = format!("{prefix}-{:x}-{n}", state.started);
    let reply = Reply {
        shape,
        id,
        created: now(),
        model: state.model.clone(),
    };
    if stream {
        let chunks = stream_chunks(reply, replies, include_usage);
        return Ok(Sse::new(chunks)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let (text, finish, usage) = collect(replies).await?;
    Ok(Json(reply.whole(&text, finish, &usage)).into_response())
}

/// One reply's identity, and its JSON in the shape of the endpoint it answers.
struct Reply {
    shape: Shape,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    /// The whole reply, for a request that does not stream.
    fn whole(&self, text: &str, finish: FinishReason, usage: &Usage) -> serde_json::Value {
        let value = match self.shape {
            Shape::Chat => serde_json::to_value(openai::Completion {
                id: &self.id,
                object: "chat.completion",
                created: self.created,
                model: &self.model,
                choices: vec![openai::Choice {
                    index: 0,
                    message: openai::ReplyMessage {
                        role: "assistant",
                        content: text,
                    },
                    finish_reason: finish,
                }],
                usage,
            }),
            Shape::Text => serde_json::to_value(openai::TextCompletion {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: vec![openai::TextChoice {
                    text,
                    index: 0,
                    logprobs: None,
                    finish_reason: Some(finish),
                }],
                usage: Some(usage),
            }),
        };
        value.unwrap_or_default()
    }

    /// One streamed chunk: text (or, for a chat, the role's opening when `opening`), the
    /// finish reason, or the usage alone (with no choice, as OpenAI sends it).
    fn chunk(&self, piece: Piece<'_>) -> SseEvent {
        let choice = |text: Option<&str>, finish: Option<FinishReason>| match self.shape {
            Shape::Chat => serde_json::json!({
                "index": 0,
                "delta": openai::Delta {
                    role: matches!(piece, Piece::Opening).then_some("assistant"),
                    content: text,
                },
                "finish_reason": finish,
            }),
            Shape::Text => serde_json::to_value(openai::TextChoice {
                text: text.unwrap_or(""),
                index: 0,
                logprobs: None,
                finish_reason: finish,
            })
            .unwrap_or_default(),
        };
        let (choices, usage) = match piece {
            Piece::Opening => (vec![choice(Some(""), None)], None),
            Piece::Text(t) => (vec![choice(Some(t), None)], None),
            Piece::Finish(f) => (vec![choice(None, Some(f))], None),
            Piece::Usage(u) => (Vec::new(), Some(u)),
        };
        let object = match self.shape {
            Shape::Chat => "chat.completion.chunk",
            Shape::Text => "text_completion",
        };
        let mut body = serde_json::json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            body["usage"] = serde_json::to_value(u).unwrap_or_default();
        }
        SseEvent::default().data(body.to_string())
    }
}

/// What one streamed chunk carries.
#[derive(Clone, Copy)]
enum Piece<'a> {
    /// A chat reply's first chunk: the role, and empty content.
    Opening,
    Text(&'a str),
    Finish(FinishReason),
    Usage(&'a Usage),
}

fn failed(message: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "generation_failed",
        &message,
    )
}

/// A whole reply, for a request that does not stream.
async fn collect(
    mut replies: UnboundedReceiver<Event>,
) -> Result<(String, FinishReason, Usage), ApiError> {
    let mut text = String::new();
    while let Some(event) = replies.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done(finish, usage) => return Ok((text, finish, usage)),
            Event::Failed(message) => return Err(failed(message)),
            Event::Prefill { .. } | Event::Looked(_) | Event::NotHeld => {}
        }
    }
    Err(failed(
        "the generator stopped before the reply ended".into(),
    ))
}

/// The reply as OpenAI's chunks: for a chat the role first, then text as it comes, the finish
/// reason, the usage when asked for, and `[DONE]`. Dropped when the client goes away, which
/// closes the channel and so stops the generation.
fn stream_chunks(
    reply: Reply,
    replies: UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let opening = (reply.shape == Shape::Chat).then(|| reply.chunk(Piece::Opening));
    let state = (replies, VecDeque::from_iter(opening), false);
    let reply = Arc::new(reply);
    futures::stream::unfold(state, move |(mut replies, mut queue, mut ended)| {
        let reply = reply.clone();
        async move {
            while queue.is_empty() && !ended {
                let event = replies.recv().await;
                ended = !matches!(event, Some(Event::Text(_) | Event::Prefill { .. }));
                match event {
                    Some(Event::Text(t)) => queue.push_back(reply.chunk(Piece::Text(&t))),
                    Some(Event::Prefill { done, total }) => {
                        let note = format!("prefill {done}/{total}");
                        queue.push_back(SseEvent::default().comment(note));
                    }
                    Some(Event::Done(finish, usage)) => {
                        queue.push_back(reply.chunk(Piece::Finish(finish)));
                        if include_usage {
                            queue.push_back(reply.chunk(Piece::Usage(&usage)));
                        }
                    }
                    Some(Event::Failed(message)) => {
                        queue.push_back(
                            SseEvent::default().data(failed(message).body().to_string()),
                        );
                    }
                    Some(Event::Looked(_) | Event::NotHeld) | None => {
                        let gone = failed("the generator stopped before the reply ended".into());
                        queue.push_back(SseEvent::default().data(gone.body().to_string()));
                    }
                }
                if ended {
                    queue.push_back(SseEvent::default().data("[DONE]"));
                }
            }
            let event = queue.pop_front()?;
            Some((Ok(event), (replies, queue, ended)))
        }
    })
}
