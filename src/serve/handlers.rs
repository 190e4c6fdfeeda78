//! The routes: one table ([`routes`]) builds the router and is what `/openapi.json` is checked
//! against.

use super::api::{
    check_n_docs, check_question, AnswerRequest, AnswerResponse, AnswerSettings, ApiError,
    BodyLimit, JsonBody, Limits, RetrieveRequest, RetrieveResponse, RetrieveResult, TokenOut,
};
use super::queue::{kb_info, Job, JobEvent, Slot};
use super::AppRef;
use crate::rag::pipeline::{AnswerOptions, Pipeline};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Extension, Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

/// The page at `/`, compiled in (no CDN: it works offline).
const INDEX_HTML: &str = include_str!("assets/index.html");

/// Every route: (method, path, handler).
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<AppRef>)> {
    vec![
        (Method::GET, "/", get(page)),
        (Method::GET, "/healthz", get(healthz)),
        (Method::GET, "/metrics", get(metrics)),
        (Method::GET, "/openapi.json", get(openapi)),
        (Method::POST, "/v1/retrieve", post(retrieve)),
        (Method::POST, "/v1/answer", post(answer)),
        (
            Method::POST,
            "/v1/chat/completions",
            post(super::openai::chat_completions),
        ),
        (Method::GET, "/v1/models", get(super::openai::models)),
        (Method::POST, "/admin/kb", post(admin_kb)),
    ]
}

/// `(method, path)` of every route, lowercase method (as OpenAPI writes it).
pub fn route_list() -> Vec<(String, String)> {
    routes()
        .into_iter()
        .map(|(m, p, _)| (m.as_str().to_lowercase(), p.to_string()))
        .collect()
}

/// The router over `app`: routes, JSON 404, request metrics, the body limit, and a panic in a
/// handler answered 500 as JSON.
pub fn router(app: AppRef) -> Router {
    let limit = BodyLimit(app.config.max_body_bytes);
    let mut r: Router<AppRef> = Router::new();
    for (_, path, handler) in routes() {
        r = r.route(path, handler);
    }
    r.fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(app.clone(), record))
        .layer(Extension(limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(app)
}

fn panicked(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let msg = err
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| err.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!("a handler panicked: {msg}");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error (a panic, caught): {msg}"),
    )
    .into_response()
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {method} {} (GET /openapi.json lists them)",
            uri.path()
        ),
    )
}

/// Requests by route and status, time to the response head.
async fn record(State(app): State<AppRef>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    app.metrics.request(
        &method,
        &route,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

pub(crate) fn limits(app: &AppRef, p: &Pipeline) -> Limits {
    Limits {
        max_n_docs: app.config.max_n_docs,
        max_new_tokens: app.config.max_new_tokens,
        max_question_chars: p.config.max_question_chars,
        kb_len: p.kb_len(),
    }
}

/// A slot, or 503 with Retry-After.
pub(crate) fn admit(app: &AppRef) -> Result<Slot, ApiError> {
    app.admission.try_acquire().ok_or_else(|| {
        app.metrics.rejected_full.fetch_add(1, Ordering::Relaxed);
        ApiError {
            retry_after: Some(app.config.retry_after_s),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the server is at capacity ({} requests in; ServeConfig::queue_capacity): retry later",
                    app.admission.capacity()
                ),
            )
        }
    })
}

pub(crate) fn timeout(app: &AppRef) -> Duration {
    Duration::from_secs(app.config.request_timeout_s)
}

pub(crate) fn timed_out(app: &AppRef) -> ApiError {
    app.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "not answered within {} s (ServeConfig::request_timeout_s)",
            app.config.request_timeout_s
        ),
    )
}

/// Queue one question; the receiver of its events.
pub(crate) fn enqueue(
    app: &AppRef,
    question: String,
    opts: AnswerOptions,
    arrived: Instant,
) -> Result<UnboundedReceiver<JobEvent>, ApiError> {
    let slot = admit(app)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    app.queue.push(Job {
        question,
        opts,
        events: tx,
        arrived,
        slot,
    })?;
    Ok(rx)
}

/// The answer of a job (its other events skipped), within the request timeout.
pub(crate) async fn answered(
    app: &AppRef,
    rx: &mut UnboundedReceiver<JobEvent>,
    deadline: tokio::time::Instant,
    max_new: usize,
) -> Result<AnswerResponse, ApiError> {
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(timed_out(app)),
            Ok(None) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the answer worker dropped the request",
                ))
            }
            Ok(Some(JobEvent::Failed(e))) => return Err(e),
            Ok(Some(JobEvent::Done {
                result,
                kb,
                timings,
            })) => return Ok(AnswerResponse::new(*result, max_new, kb, timings)),
            Ok(Some(_)) => {}
        }
    }
}

async fn page() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// 200 with `status: ok`; 503 with `status: kb_corrupt` once a block check of the served KB
/// failed (every retrieval fails then, so a balancer should stop sending requests).
async fn healthz(State(app): State<AppRef>) -> Response {
    let p = app.pipeline();
    let integrity = p.knowledge_base().map(|k| k.integrity_status());
    let corrupt = integrity.as_ref().is_some_and(|i| i.error.is_some());
    let body = Json(serde_json::json!({
        "status": if corrupt { "kb_corrupt" } else { "ok" },
        "kb": kb_info(&p),
        "kb_integrity": integrity,
        "generator": app.config.generator.display().to_string(),
        "retriever": p.config.retriever,
        "queue": {"depth": app.admission.depth(), "capacity": app.admission.capacity()},
    }));
    match corrupt {
        true => (StatusCode::SERVICE_UNAVAILABLE, body).into_response(),
        false => body.into_response(),
    }
}

async fn metrics(State(app): State<AppRef>) -> Response {
    let p = app.pipeline();
    let kb = p.knowledge_base();
    let generation = kb
        .and_then(|k| k.generation().map(str::to_string))
        .unwrap_or_default();
    let body = app.metrics.render(
        app.admission.depth(),
        app.admission.capacity(),
        &generation,
        kb.map(|k| k.integrity_status()).as_ref(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The document with the limits in force now (a KB swap can change the KB size).
async fn openapi(State(app): State<AppRef>) -> Json<serde_json::Value> {
    let p = app.pipeline();
    Json(super::openapi::document(&super::openapi::DocLimits::new(
        &app.config,
        &limits(&app, &p),
        p.config.retriever,
    )))
}

async fn retrieve(
    State(app): State<AppRef>,
    JsonBody(req): JsonBody<RetrieveRequest>,
) -> Result<Json<RetrieveResponse>, ApiError> {
    let p = app.pipeline();
    let limits = limits(&app, &p);
    let questions = match (req.question, req.questions) {
        (Some(q), None) => vec![q],
        (None, Some(qs)) => qs,
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "questions",
                "give `question` or `questions`, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::field(
                "question",
                "missing field `question` (or `questions`)",
            ))
        }
    };
    if questions.is_empty() || questions.len() > app.config.max_questions {
        return Err(ApiError::field(
            "questions",
            format!(
                "between 1 and {} questions (ServeConfig::max_questions), got {}",
                app.config.max_questions,
                questions.len()
            ),
        ));
    }
    for (i, q) in questions.iter().enumerate() {
        check_question(&format!("questions[{i}]"), q, &limits)?;
    }
    let k = req.k.unwrap_or(3);
    check_n_docs("k", k, &limits)?;
    if let Some(r) = req.retriever {
        if r != p.config.retriever {
            return Err(ApiError::field(
                "retriever",
                format!(
                    "this server retrieves with {:?} (`rustrag serve --retriever`); one retriever is loaded",
                    p.config.retriever
                ),
            ));
        }
    }
    if let Some(t) = req.prior_temperature {
        if !(t.is_finite() && t > 0.0) {
            return Err(ApiError::field(
                "prior_temperature",
                format!("prior_temperature must be positive and finite, got {t}"),
            ));
        }
    }
    let slot = admit(&app)?;
    let opts = AnswerOptions {
        n_docs: Some(k),
        prior_temperature: req.prior_temperature,
        ..Default::default()
    };
    let retriever = p.config.retriever;
    let kb = kb_info(&p);
    let qs = questions.clone();
    let work = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        p.sources(&qs, &opts)
    });
    let sources = match tokio::time::timeout(timeout(&app), work).await {
        Err(_) => return Err(timed_out(&app)),
        Ok(Err(join)) => {
            app.metrics.panics.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error: {join}"),
            ));
        }
        Ok(Ok(r)) => r.map_err(|e| ApiError::internal(&e))?,
    };
    Ok(Json(RetrieveResponse {
        retriever,
        kb,
        results: questions
            .into_iter()
            .zip(sources)
            .map(|(question, sources)| RetrieveResult { question, sources })
            .collect(),
    }))
}

async fn answer(
    State(app): State<AppRef>,
    JsonBody(req): JsonBody<AnswerRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let p = app.pipeline();
    let limits = limits(&app, &p);
    check_question("question", &req.question, &limits)?;
    let settings = AnswerSettings {
        mode: req.mode,
        n_docs: req.n_docs,
        beams: req.beams,
        max_new_tokens: req.max_new_tokens,
        min_new_tokens: req.min_new_tokens,
        prior_temperature: req.prior_temperature,
        sequence_decoding: req.sequence_decoding,
        provenance: req.provenance.unwrap_or(true),
        stream: req.stream,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
    };
    let (opts, max_new) = settings.options(&limits, 32, |f| f)?;
    drop(p);
    let mut rx = enqueue(&app, req.question, opts, arrived)?;
    let deadline = tokio::time::Instant::from_std(arrived) + timeout(&app);
    if !req.stream {
        let a = answered(&app, &mut rx, deadline, max_new).await?;
        return Ok(Json(a).into_response());
    }
    Ok(Sse::new(answer_events(app, rx, deadline, max_new))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Server-sent events of a streamed answer: `sources`, `token`…, then `done` (or `error`).
/// Dropping it (the client went away) drops the receiver: the worker stops at the next token.
fn answer_events(
    app: AppRef,
    rx: UnboundedReceiver<JobEvent>,
    deadline: tokio::time::Instant,
    max_new: usize,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(Some(rx), move |rx| {
        let app = app.clone();
        async move {
            let mut rx = rx?;
            let json = |name: &str, v: &dyn erased::Json| {
                Event::default()
                    .event(name)
                    .data(v.to_json().unwrap_or_default())
            };
            let event = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return Some((Ok(json("error", &timed_out(&app).body())), None)),
                Ok(None) => {
                    let e = ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the answer worker dropped the request",
                    );
                    return Some((Ok(json("error", &e.body())), None));
                }
                Ok(Some(e)) => e,
            };
            Some(match event {
                JobEvent::Sources(sources) => {
                    (Ok(json("sources", &SourcesEvent { sources })), Some(rx))
                }
                JobEvent::Token {
                    position,
                    id,
                    text,
                    doc_posterior,
                } => (
                    Ok(json(
                        "token",
                        &TokenOut {
                            position,
                            id,
                            text,
                            doc_posterior,
                        },
                    )),
                    Some(rx),
                ),
                JobEvent::Done {
                    result,
                    kb,
                    timings,
                } => (
                    Ok(json(
                        "done",
                        &AnswerResponse::new(*result, max_new, kb, timings),
                    )),
                    None,
                ),
                JobEvent::Failed(e) => (Ok(json("error", &e.body())), None),
            })
        }
    })
}

/// The first event of a streamed answer.
#[derive(serde::Serialize)]
struct SourcesEvent {
    sources: Vec<crate::rag::pipeline::Source>,
}

/// Serialization behind a `dyn` (the event payloads differ in type).
mod erased {
    pub trait Json {
        fn to_json(&self) -> serde_json::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Result<String> {
            serde_json::to_string(self)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminKbRequest {
    /// A knowledge base built by `rustrag index build`.
    path: PathBuf,
}

/// Serve another KB (loopback clients only). Requests in flight finish on the old one.
async fn admin_kb(
    State(app): State<AppRef>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    JsonBody(req): JsonBody<AdminKbRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !peer.ip().is_loopback() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "/admin/kb answers loopback clients only",
        ));
    }
    if req.path.as_os_str().is_empty() {
        return Err(ApiError::field("path", "the path is empty"));
    }
    // No knowledge base there is a reference to nothing: 404 naming `path` (a KB that exists but
    // cannot be served stays a 400).
    let is_kb = req.path.join(crate::kb::atomic::CURRENT).is_file()
        || req.path.join(crate::kb::manifest::MANIFEST_FILE).is_file();
    if !is_kb {
        return Err(ApiError {
            param: Some("path".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no knowledge base at {:?} (no CURRENT or manifest file); build one with `rustrag index build`",
                    req.path
                ),
            )
        });
    }
    app.swap_kb(req.path.clone(), false)
        .await
        .map_err(|e| ApiError::field("path", format!("{e:#}")))?;
    Ok(Json(serde_json::json!({"kb": kb_info(&app.pipeline())})))
}
