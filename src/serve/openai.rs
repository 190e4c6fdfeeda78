//! `POST /v1/chat/completions`, OpenAI-compatible: RAG over the last user message. Greedy by
//! default; `temperature` > 0 samples from the RAG-Token marginal (with `top_p` and `seed`).
//! Sources ride in an extra `sources` field (and each streamed chunk's `provenance`), which
//! OpenAI clients ignore. Optional fields are nullable (null = absent), as in OpenAI's schema.

use super::api::{check_question, integer, null_as_default, AnswerSettings, ApiError, JsonBody};
use super::handlers::{answered, enqueue, limits, timed_out, timeout};
use super::queue::JobEvent;
use super::AppRef;
use crate::rag::RagMode;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The fields accepted; any other is refused by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// Echoed back; the served generator answers whatever is named.
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// Generated tokens at most (default 64). With `max_completion_tokens` too, the smaller
    /// one: both are caps.
    #[serde(default, deserialize_with = "integer")]
    pub max_tokens: Option<usize>,
    #[serde(default, deserialize_with = "integer")]
    pub max_completion_tokens: Option<usize>,
    /// In [0, 2]; absent or 0: greedy (OpenAI's default is 1: here a client asks to sample).
    pub temperature: Option<f64>,
    /// In [0, 1]; used when sampling.
    pub top_p: Option<f64>,
    /// Up to 4 strings; the answer ends before the first.
    pub stop: Option<Stop>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    /// The final chunk carries usage either way.
    pub stream_options: Option<StreamOptions>,
    /// Absent or 1.
    #[serde(default, deserialize_with = "integer")]
    pub n: Option<usize>,
    pub user: Option<String>,
    /// Seed of the sampling (a negative one is read as its two's-complement u64).
    #[serde(default, deserialize_with = "integer")]
    pub seed: Option<i64>,
    /// rustrag: documents per answer.
    #[serde(default, deserialize_with = "integer")]
    pub n_docs: Option<usize>,
    /// rustrag: `token` (default) or `sequence` (not streamed).
    pub mode: Option<RagMode>,
}

/// `stream_options`: only `include_usage`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    /// A string, or a list of `{"type": "text", "text": …}` parts.
    pub content: Value,
    pub name: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The text of a message's content: a string, or text parts joined.
fn content_text(field: &str, content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    _ => {
                        return Err(ApiError::field(
                            &format!("{field}[{j}]"),
                            "only text parts ({\"type\": \"text\", \"text\": …}) are supported",
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::field(
            field,
            "content must be a string or a list of text parts",
        )),
    }
}

/// The question: the text of the last user message. Every message is checked as the document
/// states it (content a string or text parts; a user message's text not blank and within the
/// question limit), not only the one answered, so the server refuses what the document refuses.
fn question(messages: &[ChatMessage], limits: &super::api::Limits) -> Result<String, ApiError> {
    let mut last = None;
    for (i, m) in messages.iter().enumerate() {
        let field = format!("messages[{i}].content");
        let text = content_text(&field, &m.content)?;
        if m.role == "user" {
            check_question(&field, &text, limits)?;
            last = Some(text);
        }
    }
    last.ok_or_else(|| ApiError::field("messages", "no message with role `user`"))
}

/// `text` cut before the first stop string, and whether one was found.
fn cut_at_stop(text: &str, stops: &[String]) -> (usize, bool) {
    stops
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .map_or((text.len(), false), |i| (i, true))
}

pub async fn models(State(app): State<AppRef>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": model_name(&app),
        "object": "model",
        "created": 0,
        "owned_by": "rustrag",
    }]}))
}

fn model_name(app: &AppRef) -> String {
    app.config
        .generator
        .file_name()
        .map_or("rustrag".into(), |n| n.to_string_lossy().into_owned())
}

pub async fn chat_completions(
    State(app): State<AppRef>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    if let Some(n) = req.n {
        if n != 1 {
            return Err(ApiError::field(
                "n",
                format!("one choice per request: n must be 1, got {n}"),
            ));
        }
    }
    let stops = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > 4 || stops.iter().any(String::is_empty) {
        return Err(ApiError::field("stop", "up to 4 non-empty stop strings"));
    }
    let p = app.pipeline();
    let limits = limits(&app, &p);
    let question = question(&req.messages, &limits)?;
    // Each cap within the server's limit on its own (the document bounds both), then the smaller.
    for (f, v) in [
        ("max_tokens", req.max_tokens),
        ("max_completion_tokens", req.max_completion_tokens),
    ] {
        if let Some(v) = v.filter(|&v| v == 0 || v > limits.max_new_tokens) {
            return Err(ApiError::field(
                f,
                format!(
                    "{f} must be between 1 and {} (ServeConfig::max_new_tokens), got {v}",
                    limits.max_new_tokens
                ),
            ));
        }
    }
    // The OpenAI name of the cap that was given (the smaller one when both were).
    let max_field = match (req.max_tokens, req.max_completion_tokens) {
        (Some(a), Some(b)) if b < a => "max_completion_tokens",
        (None, Some(_)) => "max_completion_tokens",
        _ => "max_tokens",
    };
    let settings = AnswerSettings {
        mode: req.mode,
        n_docs: req.n_docs,
        max_new_tokens: match (req.max_tokens, req.max_completion_tokens) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
        provenance: false,
        stream: req.stream,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed.map(|s| s as u64),
        ..Default::default()
    };
    let field = |name: &'static str| match name {
        "max_new_tokens" => max_field,
        other => other,
    };
    let (opts, max_new) = settings.options(&limits, 64, field)?;
    let prompt_tokens = p
        .rag
        .generator_tokenizer
        .inner
        .encode(question.as_str(), false)
        .map_or(0, |e| e.len());
    drop(p);
    let model = req.model.unwrap_or_else(|| model_name(&app));
    let id = format!("chatcmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let created = unix_now();
    let mut rx = enqueue(&app, question, opts, arrived)?;
    let deadline = tokio::time::Instant::from_std(arrived) + timeout(&app);
    if !req.stream {
        let a = answered(&app, &mut rx, deadline, max_new).await?;
        let (cut, stopped) = cut_at_stop(&a.answer, &stops);
        let completion = a.ids.len().saturating_sub(1);
        let finish = if stopped { "stop" } else { a.finish_reason };
        return Ok(Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": &a.answer[..cut]},
                "finish_reason": finish,
                "logprobs": null,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            },
            "sources": a.sources,
            "kb": a.kb,
            "timings": a.timings,
        }))
        .into_response());
    }
    let chunk = move |delta: Value, finish: Option<&str>, extra: Value| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        Event::default().data(c.to_string())
    };
    let eos = app.pipeline().rag.generator.special_ids().eos;
    let state = ChatStream {
        rx: Some(rx),
        first: true,
        done: false,
        text: String::new(),
        sent: 0,
        stops,
        started: false,
        generated: 0,
        prompt_tokens,
        max_new,
        eos,
    };
    Ok(Sse::new(chat_events(state, app, deadline, chunk))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The state of one streamed chat completion.
struct ChatStream {
    rx: Option<tokio::sync::mpsc::UnboundedReceiver<JobEvent>>,
    first: bool,
    done: bool,
    /// The answer so far, and how much of it was sent.
    text: String,
    sent: usize,
    stops: Vec<String>,
    /// A non-whitespace character was generated (leading whitespace is trimmed, as the
    /// non-streamed answer is).
    started: bool,
    generated: usize,
    prompt_tokens: usize,
    max_new: usize,
    eos: u32,
}

impl ChatStream {
    /// The next events to send (None: the stream is over).
    async fn next(
        &mut self,
        app: &AppRef,
        deadline: tokio::time::Instant,
        chunk: &(impl Fn(Value, Option<&str>, Value) -> Event + Clone),
    ) -> Option<Vec<Event>> {
        if self.done {
            return None;
        }
        if self.first {
            self.first = false;
            return Some(vec![chunk(
                json!({"role": "assistant", "content": ""}),
                None,
                json!({}),
            )]);
        }
        let rx = self.rx.as_mut()?;
        let event = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Some(self.fail(timed_out(app))),
            Ok(None) => {
                return Some(self.fail(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the answer worker dropped the request",
                )))
            }
            Ok(Some(e)) => e,
        };
        match event {
            JobEvent::Sources(sources) => {
                Some(vec![chunk(json!({}), None, json!({ "sources": sources }))])
            }
            JobEvent::Token {
                id,
                text,
                doc_posterior,
                position,
            } => {
                self.generated += 1;
                let mut piece = if id == self.eos { String::new() } else { text };
                if !self.started {
                    piece = piece.trim_start().to_string();
                    self.started = !piece.is_empty();
                }
                self.text.push_str(&piece);
                let (cut, stopped) = cut_at_stop(&self.text, &self.stops);
                // Hold back what could be the start of a stop string.
                // and trailing whitespace (the non-streamed answer is trimmed).
                let safe = match stopped {
                    true => cut,
                    false => held_back(&self.text, &self.stops).min(self.text.trim_end().len()),
                };
                let out = self.text[self.sent..safe.max(self.sent)].to_string();
                self.sent = safe.max(self.sent);
                let provenance = json!({"provenance": {"position": position, "id": id, "doc_posterior": doc_posterior}});
                let mut events = vec![chunk(json!({ "content": out }), None, provenance)];
                if stopped {
                    // Dropping the receiver stops the decode at the next token.
                    self.rx = None;
                    events.push(self.finish(chunk, "stop", json!({})));
                }
                Some(events)
            }
            JobEvent::Done { result, kb, .. } => {
                let rest = self.text[self.sent..].trim_end().to_string();
                let reason = if self.generated >= self.max_new {
                    "length"
                } else {
                    "stop"
                };
                let mut events = Vec::new();
                if !rest.is_empty() {
                    events.push(chunk(json!({ "content": rest }), None, json!({})));
                }
                events.push(self.finish(
                    chunk,
                    reason,
                    json!({"sources": result.sources, "kb": kb}),
                ));
                Some(events)
            }
            JobEvent::Failed(e) => Some(self.fail(e)),
        }
    }

    fn finish(
        &mut self,
        chunk: &impl Fn(Value, Option<&str>, Value) -> Event,
        reason: &str,
        mut extra: Value,
    ) -> Event {
        self.done = true;
        extra["usage"] = json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.generated,
            "total_tokens": self.prompt_tokens + self.generated,
        });
        chunk(json!({}), Some(reason), extra)
    }

    fn fail(&mut self, e: ApiError) -> Vec<Event> {
        self.done = true;
        vec![Event::default().data(e.body().to_string())]
    }
}

/// The end of `text` that may still grow into a stop string is held back: the byte offset up to
/// which `text` can be sent.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut safe = text.len();
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                safe = safe.min(text.len() - i);
            }
        }
    }
    safe
}

/// The chunks of a streamed chat completion, then OpenAI's `data: [DONE]`. Dropping it (the
/// client went away) drops the receiver: the worker stops at the next token.
fn chat_events(
    state: ChatStream,
    app: AppRef,
    deadline: tokio::time::Instant,
    chunk: impl Fn(Value, Option<&str>, Value) -> Event + Clone + Send + 'static,
) -> impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>> {
    use futures_util::StreamExt;
    futures_util::stream::unfold(Some(state), move |state| {
        let (app, chunk) = (app.clone(), chunk.clone());
        async move {
            let mut st = state?;
            match st.next(&app, deadline, &chunk).await {
                Some(events) => Some((events, Some(st))),
                None => Some((vec![Event::default().data("[DONE]")], None)),
            }
        }
    })
    .flat_map(|events| futures_util::stream::iter(events.into_iter().map(Ok)))
}
