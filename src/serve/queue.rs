//! Admission and the answer worker.
//!
//! [`Admission`] bounds the requests in the server (waiting or running); a [`Slot`] is held until
//! the request is finished and released on drop, whatever way it ends (answered, failed, timed
//! out, the client gone). Answers are decoded by one worker thread (one decode at a time uses
//! every core): it takes the next question, waits up to the batching window for more with the
//! same settings, and runs them through [`Pipeline::answer_streamed`] together, telling each
//! request its sources and tokens as they come. When every reader of a batch has gone away the
//! decode stops at the next token.

use super::api::{ApiError, KbInfo, Timings};
use super::state::App;
use crate::rag::model::generated_end;
use crate::rag::pipeline::{AnswerEvent, AnswerOptions, Pipeline, QaResult, Source};
use crate::rag::RagMode;
use axum::http::StatusCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Requests admitted at once.
pub struct Admission {
    depth: AtomicUsize,
    capacity: usize,
}

/// One admitted request; released on drop.
pub struct Slot(Arc<Admission>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.depth.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            depth: AtomicUsize::new(0),
            capacity,
        })
    }

    /// A slot, or None when `capacity` requests are in.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d < self.capacity).then_some(d + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// What a request is told about its answer.
#[derive(Debug)]
pub enum JobEvent {
    Sources(Vec<Source>),
    Token {
        position: usize,
        id: u32,
        text: String,
        doc_posterior: Vec<f32>,
    },
    Done {
        result: Box<QaResult>,
        kb: KbInfo,
        timings: Timings,
    },
    Failed(ApiError),
}

/// One question waiting for the worker.
pub struct Job {
    pub question: String,
    pub opts: AnswerOptions,
    pub events: UnboundedSender<JobEvent>,
    pub arrived: Instant,
    pub slot: Slot,
}

/// The worker's inbox.
pub struct AnswerQueue {
    tx: Mutex<Option<SyncSender<Job>>>,
}

/// Stops the decode: every reader of the batch went away.
#[derive(Debug)]
struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("every client of the batch went away")
    }
}

impl std::error::Error for Cancelled {}

impl AnswerQueue {
    /// Start the worker. Its inbox holds `capacity` jobs (admission keeps it from filling).
    pub fn start(app: std::sync::Weak<App>, capacity: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
        std::thread::Builder::new()
            .name("rustrag-answer".into())
            .spawn(move || worker(app, rx))
            .expect("spawning the answer worker thread");
        Self {
            tx: Mutex::new(Some(tx)),
        }
    }

    /// Queue `job` (its slot already taken).
    pub fn push(&self, job: Job) -> Result<(), ApiError> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = tx.as_ref() else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ));
        };
        tx.try_send(job).map_err(|e| {
            let msg = match e {
                TrySendError::Full(_) => "the answer queue is full",
                TrySendError::Disconnected(_) => "the answer worker stopped",
            };
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, msg)
        })
    }

    /// Stop taking jobs; the worker ends when its inbox is empty.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn worker(app: std::sync::Weak<App>, rx: Receiver<Job>) {
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let Some(app) = app.upgrade() else { return };
        // A request whose client left while it waited is dropped (and its slot with it).
        if first.events.is_closed() {
            app.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let max = app.pipeline().config.batch_size;
        let window = Duration::from_millis(app.config.batch_window_ms);
        let deadline = Instant::now() + window;
        let mut batch = vec![first];
        while batch.len() < max {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) if j.events.is_closed() => {
                    app.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                Ok(j) if j.opts == batch[0].opts => batch.push(j),
                Ok(j) => {
                    held = Some(j);
                    break;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        run_batch(&app, batch);
    }
}

/// Decode `batch` (equal options) on the pipeline live now and tell every job its outcome.
fn run_batch(app: &App, batch: Vec<Job>) {
    let pipeline = app.pipeline();
    let kb = kb_info(&pipeline);
    let started = Instant::now();
    let metrics = &app.metrics;
    metrics.batches.fetch_add(1, Ordering::Relaxed);
    metrics
        .batched_questions
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    for j in &batch {
        metrics.queue_wait((started - j.arrived).as_secs_f64());
    }
    let questions: Vec<String> = batch.iter().map(|j| j.question.clone()).collect();
    let opts = batch[0].opts.clone();
    let streamable = opts.mode == Some(RagMode::Token) && opts.beams == Some(1);
    let mut first_token: Vec<Option<Instant>> = vec![None; batch.len()];
    let mut last_token: Vec<Option<Instant>> = vec![None; batch.len()];
    let mut counts = vec![0usize; batch.len()];
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut on_event = |e: AnswerEvent<'_>| -> anyhow::Result<()> {
            match e {
                AnswerEvent::Sources { question, sources } => {
                    let _ = batch[question]
                        .events
                        .send(JobEvent::Sources(sources.to_vec()));
                }
                AnswerEvent::Token {
                    question,
                    position,
                    id,
                    text,
                    doc_posterior,
                } => {
                    let now = Instant::now();
                    if first_token[question].is_none() {
                        first_token[question] = Some(now);
                        metrics.first_token((now - batch[question].arrived).as_secs_f64());
                    }
                    last_token[question] = Some(now);
                    counts[question] += 1;
                    metrics.tokens_generated.fetch_add(1, Ordering::Relaxed);
                    let _ = batch[question].events.send(JobEvent::Token {
                        position,
                        id,
                        text: text.to_string(),
                        doc_posterior: doc_posterior.to_vec(),
                    });
                }
            }
            if batch.iter().all(|j| j.events.is_closed()) {
                return Err(Cancelled.into());
            }
            Ok(())
        };
        match streamable {
            true => pipeline.answer_streamed(&questions, &opts, &mut on_event),
            false => pipeline.answer_with(&questions, &opts),
        }
    }));
    let done = Instant::now();
    match outcome {
        Ok(Ok(mut results)) => {
            // A batch pads its shorter answers: each request sees its own tokens only.
            let eos = pipeline.rag.generator.special_ids().eos;
            let pad = pipeline.rag.generator_pad();
            for a in results.iter_mut().flat_map(|r| r.answers.iter_mut()) {
                a.ids.truncate(generated_end(&a.ids, eos, pad));
            }
            let batch_size = batch.len();
            for (i, (job, result)) in batch.into_iter().zip(results).enumerate() {
                let generated = result
                    .answers
                    .first()
                    .map_or(0, |a| a.ids.len().saturating_sub(1));
                if !streamable {
                    metrics
                        .tokens_generated
                        .fetch_add(generated as u64, Ordering::Relaxed);
                }
                let ms = |t: Instant| (t - job.arrived).as_secs_f64() * 1e3;
                let tokens_per_s = match (first_token[i], last_token[i]) {
                    (Some(f), Some(l)) if counts[i] > 1 && l > f => {
                        Some((counts[i] - 1) as f64 / (l - f).as_secs_f64())
                    }
                    _ => None,
                };
                let timings = Timings {
                    queue_ms: ms(started),
                    first_token_ms: first_token[i].map(ms),
                    total_ms: ms(done),
                    generated_tokens: generated,
                    tokens_per_s,
                    batch_size,
                };
                finish(
                    job,
                    JobEvent::Done {
                        result: Box::new(result),
                        kb: kb.clone(),
                        timings,
                    },
                );
            }
        }
        Ok(Err(e)) if e.downcast_ref::<Cancelled>().is_some() => {
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err(e)) => {
            tracing::warn!("answering failed: {e:#}");
            let err = ApiError::internal(&e);
            for j in batch {
                finish(j, JobEvent::Failed(err.clone()));
            }
        }
        Err(panic) => {
            metrics.panics.fetch_add(1, Ordering::Relaxed);
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!("the pipeline panicked: {msg}");
            let err = ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error (a panic, caught): {msg}"),
            );
            for j in batch {
                finish(j, JobEvent::Failed(err.clone()));
            }
        }
    }
    // A cancelled `batch` drops here: every slot is released.
}

/// Release a job's slot, then send its last event: a client that reads the response and asks
/// again (or reads /metrics) finds the slot free.
fn finish(job: Job, last: JobEvent) {
    let Job { events, slot, .. } = job;
    drop(slot);
    let _ = events.send(last);
}

/// What a response says about the KB it was computed on.
pub fn kb_info(p: &Pipeline) -> KbInfo {
    match p.knowledge_base() {
        Some(kb) => KbInfo {
            path: kb.root().display().to_string(),
            generation: kb.generation().map(str::to_string),
            passages: kb.len(),
        },
        None => KbInfo {
            path: String::new(),
            generation: None,
            passages: p.kb_len(),
        },
    }
}
