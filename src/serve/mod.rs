//! `rustrag serve`: the [`Pipeline`] behind HTTP, models loaded once.
//!
//! - its own API (`/v1/retrieve`, `/v1/answer`, streaming per-token provenance as server-sent
//!   events) and an OpenAI-compatible `/v1/chat/completions`;
//! - `/healthz`, Prometheus `/metrics`, `/openapi.json` (the one description of the routes,
//!   [`openapi`]), and a page at `/` that streams an answer with each token shaded by its document;
//! - a bounded queue ([`queue`]): requests over [`ServeConfig::queue_capacity`] get 503 with
//!   `Retry-After`; answers are decoded by one worker that batches concurrent questions with equal
//!   settings within [`ServeConfig::batch_window_ms`];
//! - knowledge-base hot swap ([`state`]): a new `CURRENT` generation of the served KB (after
//!   `rustrag index add`/`reembed`) or a KB path posted to the loopback-only `/admin/kb` is opened
//!   beside the old one and swapped in; requests in flight finish on the pipeline they started with.

pub mod api;
pub mod handlers;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod queue;
pub mod state;

use crate::rag::pipeline::{Pipeline, PipelineConfig};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Server settings, with documented defaults.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Knowledge base built by `rustrag index build`. Required.
    pub kb: PathBuf,
    /// Decoder-only generator (GGUF file or a `rustrag train` directory). Required.
    pub generator: PathBuf,
    /// Address to listen on. Default 127.0.0.1:8080.
    pub addr: SocketAddr,
    /// Retrieval and decoding settings; requests override the answer settings per call.
    /// Default: [`PipelineConfig::default`] (hybrid retrieval, f32 weights, batches of 4).
    pub pipeline: PipelineConfig,
    /// Requests admitted at once, waiting or running (retrieve and answer alike); the next one
    /// gets 503 with `Retry-After`. Default 64.
    pub queue_capacity: usize,
    /// `Retry-After` seconds of a 503. Default 1.
    pub retry_after_s: u64,
    /// How long the answer worker waits for more questions with the same settings before decoding
    /// a batch (up to `pipeline.batch_size` questions). Default 5 ms.
    pub batch_window_ms: u64,
    /// A request not answered (or a stream not finished) within this many seconds gets 504 (a
    /// stream ends with an `error` event) and its decoding stops. Default 120.
    pub request_timeout_s: u64,
    /// Largest request body in bytes; larger ones get 413. Default 64 KiB.
    pub max_body_bytes: usize,
    /// Most documents per question a request may ask for (`n_docs`, `k`). Default 20.
    pub max_n_docs: usize,
    /// Most tokens a request may ask to generate (`max_new_tokens`, `max_tokens`). Default 256.
    pub max_new_tokens: usize,
    /// Most questions in one `/v1/retrieve` request. Default 64.
    pub max_questions: usize,
    /// How often the KB's `CURRENT` generation is checked for a change, in ms. Default 1000.
    pub kb_poll_ms: u64,
    /// Seconds between re-checks of every block checksum of the served KB's mapped files
    /// ([`crate::kb::KnowledgeBase::scrub_every`]): catches data corrupted on disk while it is
    /// served in any file (passage reads check their own blocks as they go; the embeddings and
    /// the HNSW graph only this way). A failure fails every passage read and dense search, and
    /// `/healthz` (503). One core for about 0.1 s per GB. Default 21600 (6 hours, [`crate::kb::DEFAULT_SCRUB_INTERVAL_S`]); 0: off.
    pub kb_scrub_interval_s: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            kb: PathBuf::new(),
            generator: PathBuf::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            pipeline: PipelineConfig::default(),
            queue_capacity: 64,
            retry_after_s: 1,
            batch_window_ms: 5,
            request_timeout_s: 120,
            max_body_bytes: 64 << 10,
            max_n_docs: 20,
            max_new_tokens: 256,
            max_questions: 64,
            kb_poll_ms: 1000,
            kb_scrub_interval_s: crate::kb::DEFAULT_SCRUB_INTERVAL_S,
        }
    }
}

/// Load the models, bind `config.addr` and serve until Ctrl-C / SIGTERM. `on_listening` is told
/// the bound address (port 0 picks a free one) once the server accepts connections.
pub fn serve(config: ServeConfig, on_listening: impl FnOnce(SocketAddr)) -> Result<()> {
    let pipeline = Pipeline::open(&config.kb, &config.generator, config.pipeline.clone())
        .with_context(|| {
            format!(
                "opening the knowledge base {} with the generator {}",
                config.kb.display(),
                config.generator.display()
            )
        })?;
    // Retrievals run on the blocking pool: more of them at once than cores only adds latency, and
    // every thread keeps its own malloc arena (freed buffers are kept for reuse,
    // `reuse_freed_memory`), so the pool is as large as the machine.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("rustrag-serve")
        .max_blocking_threads(cores.max(2))
        .build()?;
    runtime.block_on(async move {
        let app = state::App::new(config.clone(), pipeline)?;
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let addr = listener.local_addr()?;
        tokio::spawn(state::watch_kb(
            app.clone(),
            Duration::from_millis(config.kb_poll_ms.max(10)),
        ));
        let router = handlers::router(app.clone());
        on_listening(addr);
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")?;
        app.queue.close();
        Ok::<_, anyhow::Error>(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// The shared handle every handler gets.
pub type AppRef = Arc<state::App>;
