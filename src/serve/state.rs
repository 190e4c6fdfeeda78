//! The server's state and knowledge-base hot swap.
//!
//! The live [`Pipeline`] sits behind an `Arc` that requests clone when they start: swapping in a
//! new one (a new `CURRENT` generation of the served KB, or another KB posted to `/admin/kb`)
//! never disturbs a request in flight, which finishes on the pipeline it cloned. The new pipeline
//! is opened completely (a KB generation is immutable once `CURRENT` names it, see
//! [`crate::kb::atomic`]) before it is swapped in, so no request sees a half-written KB; the
//! generator is shared between them ([`Pipeline::reopen_kb`]).

use super::metrics::Metrics;
use super::queue::{Admission, AnswerQueue};
use super::ServeConfig;
use crate::kb::atomic::current_generation_name;
use crate::rag::pipeline::Pipeline;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Everything the handlers share.
pub struct App {
    pub config: ServeConfig,
    pipeline: RwLock<Arc<Pipeline>>,
    pub admission: Arc<Admission>,
    pub queue: AnswerQueue,
    pub metrics: Metrics,
    /// One swap at a time (the poller and `/admin/kb`).
    swap: tokio::sync::Mutex<()>,
}

impl App {
    pub fn new(config: ServeConfig, pipeline: Pipeline) -> Result<Arc<Self>> {
        if config.queue_capacity == 0 {
            anyhow::bail!("queue_capacity must be at least 1");
        }
        scrub(&pipeline, &config);
        Ok(Arc::new_cyclic(|weak| Self {
            admission: Admission::new(config.queue_capacity),
            queue: AnswerQueue::start(weak.clone(), config.queue_capacity),
            config,
            pipeline: RwLock::new(Arc::new(pipeline)),
            metrics: Metrics::default(),
            swap: tokio::sync::Mutex::new(()),
        }))
    }

    /// The live pipeline (a request keeps the one it took to the end).
    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.pipeline
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Open the KB at `root` (its live generation) with the served generator and swap it in.
    /// `only_if_moved`: only when `root` is the served KB and `CURRENT` names a new generation.
    /// Returns whether a swap happened.
    pub async fn swap_kb(self: &Arc<Self>, root: PathBuf, only_if_moved: bool) -> Result<bool> {
        let _one = self.swap.lock().await;
        let current = self.pipeline();
        if only_if_moved && !generation_moved(&current, &root)? {
            return Ok(false);
        }
        let reopened = tokio::task::spawn_blocking(move || current.reopen_kb(&root)).await??;
        scrub(&reopened, &self.config);
        let generation = reopened
            .knowledge_base()
            .and_then(|k| k.generation().map(str::to_string));
        *self.pipeline.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(reopened);
        self.metrics
            .kb_swaps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("knowledge base swapped in: generation {generation:?}");
        Ok(true)
    }
}

/// Re-check the blocks of the KB about to be served every `kb_scrub_interval_s` (its thread
/// ends when the KB is dropped, after a swap).
fn scrub(p: &Pipeline, config: &ServeConfig) {
    if let Some(kb) = p.knowledge_base() {
        kb.scrub_every(Duration::from_secs(config.kb_scrub_interval_s));
    }
}

/// `root` is the served KB and its `CURRENT` names another generation than the served one (a
/// poll that raced with `/admin/kb` finds another KB served, and leaves it).
fn generation_moved(p: &Pipeline, root: &Path) -> Result<bool> {
    let Some(kb) = p.knowledge_base() else {
        return Ok(false);
    };
    if kb.root() != root {
        return Ok(false);
    }
    Ok(current_generation_name(root)?.as_deref() != kb.generation())
}

/// Poll the served KB's `CURRENT` every `every` and swap in a new generation when it moves.
pub async fn watch_kb(app: Arc<App>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(root) = app
            .pipeline()
            .knowledge_base()
            .map(|k| k.root().to_path_buf())
        else {
            return;
        };
        if let Err(e) = app.swap_kb(root.clone(), true).await {
            // Keep serving the generation we have; a writer may be mid-commit.
            tracing::warn!("{}: not swapped in: {e:#}", root.display());
        }
    }
}
