//! lambdachat: chat with a local LLM for as long as you like.
//!
//! The model attends through LM-Infinite's Λ-shaped attention over a bounded KV cache, so memory
//! and per-token latency stay constant however long the conversation grows. See
//! docs/ARCHITECTURE.md for the map of modules and the data flow of one chat turn.

pub mod attention;
pub mod chat;
pub mod cli;
pub mod config;
pub mod convert;
pub mod device;
pub mod durable;
pub mod engine;
pub mod error;
pub mod eval;
#[cfg(feature = "faults")]
pub mod faults;
pub mod fetch;
pub mod hub;
pub mod kernels;
pub mod logging;
pub mod model;
pub mod progress;
pub mod protocol;
pub mod remote;
pub mod sampling;
pub mod server;
pub mod session;
pub mod store;
pub mod tokenizer;
pub mod tui;
pub mod worker;
